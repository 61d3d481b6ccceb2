//! `just bench relay`: the relay publishing a stored log to JetStream, next to
//! raw pipelined JetStream publishing of the same messages (same subjects,
//! headers and bodies, the same ack window) in the same run.
use std::time::{Duration, Instant};

use async_nats::jetstream;
use crm::relay::{Relay, RelayOptions};
use crm_benches::{fill_events, progress, report};
use crm_event_store::{EventStore, Filter, StoreOptions};
use crm_test_support::{TestDb, TestNats};
use crm_wire::cloudevents;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;

fn events_to_publish() -> u64 {
    std::env::var("BENCH_RELAY_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000)
}

/// The ceiling: the relay's messages published by a bare loop with the same
/// window of acks in flight, no database in the way.
async fn raw_publish(
    raw: &TestNats,
    messages: Vec<(String, jetstream::message::PublishMessage)>,
    window: usize,
) -> f64 {
    let js = jetstream::context::ContextBuilder::new()
        .max_ack_inflight(window)
        .backpressure_on_inflight(true)
        .build(raw.jetstream().await.client());
    js.create_stream(jetstream::stream::Config {
        name: raw.stream.clone(),
        subjects: vec![format!("{}.>", raw.subject_prefix)],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("raw stream");
    let count = messages.len();
    let started = Instant::now();
    let mut inflight = FuturesOrdered::new();
    for (subject, message) in messages {
        if inflight.len() >= window {
            let ack: Result<_, _> = inflight.next().await.expect("an ack in flight");
            ack.expect("raw ack");
        }
        let ack = js
            .send_publish(subject, message)
            .await
            .expect("raw publish");
        inflight.push_back(ack.into_future());
    }
    while let Some(ack) = inflight.next().await {
        ack.expect("raw ack");
    }
    count as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let count = events_to_publish();
    let db = TestDb::create().await;
    progress(&format!("database {}, storing {count} events", db.name));
    fill_events(&db, count).await;
    let store = EventStore::connect(db.config(), StoreOptions::default())
        .await
        .expect("store");
    let options = RelayOptions::default();

    // The same messages the relay will send, built before timing starts.
    let raw = TestNats::shared();
    let mut messages = Vec::with_capacity(count as usize);
    let mut events = store.read_all(0, &Filter::default()).await.expect("read");
    while let Some(event) = events.next().await {
        let event = event.expect("event");
        let subject = cloudevents::subject(&raw.subject_prefix, &event).expect("subject");
        messages.push((subject, cloudevents::message(&event)));
    }
    drop(events);
    progress("raw pipelined JetStream publishing");
    let ceiling = raw_publish(&raw, messages, options.window).await;

    progress("the relay");
    let ours = TestNats::shared();
    let relay = Relay::new(
        store.clone(),
        db.config().clone(),
        ours.url.clone(),
        RelayOptions {
            stream: ours.stream.clone(),
            subject_prefix: ours.subject_prefix.clone(),
            ..options
        },
    );
    let mut status = relay.status();
    let stop = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let running = tokio::spawn(relay.run(stop.clone()));
    while status.borrow_and_update().published < count {
        tokio::time::timeout(Duration::from_secs(120), status.changed())
            .await
            .expect("the relay to make progress")
            .expect("relay status");
    }
    let value = count as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    running.await.expect("relay stops");
    store.shutdown().await;
    report("relay", value, "events/s", ceiling);
}
