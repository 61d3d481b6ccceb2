#!/usr/bin/env python3
"""Follow CRM events with nothing but NATS and the CloudEvents SDK.

Reads the relay's JetStream stream with a pull consumer of its own, filtered by
subject, and decodes every message with the stock CloudEvents SDK (binary
content mode: `ce-*` headers, JSON body). Prints one JSON line per event.

    pip install nats-py cloudevents
    python consume.py --subject 'crm.v1.demo.>'            # follow forever
    python consume.py --subject 'crm.v1.demo.>' --expect 500  # stop after 500

See docs/events.md for the subjects and attributes.
"""
import argparse
import asyncio
import json
import sys

import nats
from cloudevents.http import from_http


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    parser.add_argument("--stream", default="CRM_EVENTS")
    parser.add_argument("--subject", default="crm.v1.>",
                        help="subject filter, e.g. crm.v1.<tenant>.contact.>")
    parser.add_argument("--expect", type=int, default=0,
                        help="stop after this many events (0: follow forever)")
    parser.add_argument("--idle-timeout", type=float, default=20.0,
                        help="with --expect: give up after this many idle seconds")
    args = parser.parse_args()

    nc = await nats.connect(args.url)
    js = nc.jetstream()
    # A pull consumer of our own (ephemeral): everything from the start, in
    # stream order, fetched in batches and acknowledged, so a slow reader
    # only waits (no push flow control to stall).
    sub = await js.pull_subscribe(args.subject, durable=None, stream=args.stream)
    received, last_position, idle = 0, 0, 0.0
    try:
        while args.expect == 0 or received < args.expect:
            try:
                # A partial batch comes back when the second is up.
                batch = await sub.fetch(batch=256, timeout=1.0)
            except nats.errors.TimeoutError:
                idle += 1.0
                if args.expect and idle >= args.idle_timeout:
                    raise
                continue
            idle = 0.0
            for msg in batch:
                event = from_http(dict(msg.headers or {}), msg.data)
                position = int(event["globalposition"])
                if position <= last_position:
                    print(f"out of order: {position} after {last_position}", file=sys.stderr)
                    return 1
                last_position = position
                received += 1
                print(json.dumps({
                    "id": event["id"],
                    "type": event["type"],
                    "source": event["source"],
                    "subject": event["subject"],
                    "time": event["time"],
                    "position": position,
                    "tenant": event["tenantid"],
                    "data": event.data,
                }), flush=True)
                await msg.ack()
                if args.expect and received >= args.expect:
                    break
    except nats.errors.TimeoutError:
        print(f"timed out after {received} events", file=sys.stderr)
        return 2
    finally:
        await nc.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
