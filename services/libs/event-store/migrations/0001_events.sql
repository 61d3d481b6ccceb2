-- The event log. Positions are dense and commit-ordered: every append takes
-- the row lock on log_head, so transactions commit in position order (see
-- docs/adr/0001-global-order.md).
CREATE TABLE log_head (
    id        smallint PRIMARY KEY CHECK (id = 1),
    position  bigint   NOT NULL CHECK (position >= 0)
);
INSERT INTO log_head (id, position) VALUES (1, 0);

CREATE TABLE events (
    global_position bigint      PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    tenant_id       text        NOT NULL,
    stream_type     text        NOT NULL,
    stream_id       uuid        NOT NULL,
    stream_version  bigint      NOT NULL CHECK (stream_version >= 1),
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL CHECK (schema_version >= 1),
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, stream_id, stream_version)
);
CREATE INDEX events_by_tenant ON events (tenant_id, global_position);

-- Idempotency: the outcome of every append that carried a key, written in the
-- append's own transaction and kept forever.
CREATE TABLE idempotency_keys (
    tenant_id     text        NOT NULL,
    key           text        NOT NULL,
    request_hash  bytea       NOT NULL,
    first_position bigint     NOT NULL,
    last_position  bigint     NOT NULL,
    streams       jsonb       NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, key)
);

-- Latest snapshot per stream, with the version it covers.
CREATE TABLE snapshots (
    tenant_id       text        NOT NULL,
    stream_id       uuid        NOT NULL,
    stream_type     text        NOT NULL,
    version         bigint      NOT NULL CHECK (version >= 1),
    schema_version  integer     NOT NULL CHECK (schema_version >= 1),
    state           jsonb       NOT NULL,
    taken_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, stream_id)
);
