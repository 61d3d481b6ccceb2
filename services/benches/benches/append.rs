//! `just bench append`: the store's append path against plain tokio-postgres
//! INSERTs into a scratch table of the same shape, in the same run.
use std::sync::Arc;
use std::time::Instant;

use crm_benches::{Latencies, Rate, contact_payload, phase_duration, progress, report};
use crm_domain::TenantId;
use crm_event_store::{
    AppendEvents, EventStore, ExpectedVersion, Metadata, NewEvent, StoreOptions, StreamAppend,
};
use crm_test_support::TestDb;
use tokio_postgres::NoTls;
use uuid::Uuid;

const RAW_INSERT: &str = "INSERT INTO raw_events (event_id, tenant_id, stream_type, stream_id, \
     stream_version, event_type, schema_version, payload, metadata) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::jsonb, $9::text::jsonb)";

const RAW_BATCH: &str = "INSERT INTO raw_events (event_id, tenant_id, stream_type, stream_id, \
     stream_version, event_type, schema_version, payload, metadata) \
     SELECT e, t, st, s, v, et, sv, pl::jsonb, md::jsonb \
     FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::bigint[], $6::text[], \
                 $7::int[], $8::text[], $9::text[]) AS x(e, t, st, s, v, et, sv, pl, md)";

fn metadata() -> Metadata {
    Metadata {
        actor: "user:bench".into(),
        roles: vec!["sales_rep".into()],
        correlation_id: Some(Uuid::now_v7().to_string()),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        ..Metadata::default()
    }
}

async fn connect(db: &TestDb) -> tokio_postgres::Client {
    let (client, connection) = db.config().connect(NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// Raw ceiling: `tasks` connections, each inserting `rows_per_tx` rows per
/// autocommit statement. Returns rows/s and per-statement latencies.
async fn raw_inserts(db: &TestDb, tasks: usize, rows_per_tx: usize) -> (f64, Latencies) {
    let metadata = Arc::new(serde_json::to_string(&metadata()).expect("metadata"));
    let deadline = Instant::now() + phase_duration();
    let rate = Rate::start();
    let mut workers = Vec::new();
    for _ in 0..tasks {
        let client = connect(db).await;
        let metadata = metadata.clone();
        workers.push(tokio::spawn(async move {
            let single = client.prepare(RAW_INSERT).await.expect("prepare");
            let batch = client.prepare(RAW_BATCH).await.expect("prepare");
            let stream_id = Uuid::now_v7();
            let (mut rows, mut version, mut latencies) = (0u64, 0i64, Latencies::default());
            while Instant::now() < deadline {
                let started = Instant::now();
                if rows_per_tx == 1 {
                    version += 1;
                    let payload = contact_payload(version as u64).to_string();
                    client
                        .execute(
                            &single,
                            &[
                                &Uuid::now_v7(),
                                &"bench",
                                &"contact",
                                &stream_id,
                                &version,
                                &"ContactCreated",
                                &1i32,
                                &payload,
                                &metadata.as_str(),
                            ],
                        )
                        .await
                        .expect("raw insert");
                } else {
                    let mut ids = Vec::with_capacity(rows_per_tx);
                    let mut versions = Vec::with_capacity(rows_per_tx);
                    let mut payloads = Vec::with_capacity(rows_per_tx);
                    for _ in 0..rows_per_tx {
                        version += 1;
                        ids.push(Uuid::now_v7());
                        versions.push(version);
                        payloads.push(contact_payload(version as u64).to_string());
                    }
                    let n = rows_per_tx;
                    client
                        .execute(
                            &batch,
                            &[
                                &ids,
                                &vec!["bench"; n],
                                &vec!["contact"; n],
                                &vec![stream_id; n],
                                &versions,
                                &vec!["ContactCreated"; n],
                                &vec![1i32; n],
                                &payloads,
                                &vec![metadata.as_str(); n],
                            ],
                        )
                        .await
                        .expect("raw batch insert");
                }
                latencies.record(started.elapsed());
                rows += rows_per_tx as u64;
            }
            (rows, latencies)
        }));
    }
    let (mut total, mut latencies) = (0, Latencies::default());
    for worker in workers {
        let (rows, worker_latencies) = worker.await.expect("worker");
        total += rows;
        latencies.extend(worker_latencies);
    }
    (rate.per_second(total), latencies)
}

/// Our path: `callers` tasks, each appending `events_per_append` events per
/// call to its own stream with an exact expected version.
async fn store_appends(
    store: &EventStore,
    callers: usize,
    events_per_append: usize,
) -> (f64, Latencies) {
    let deadline = Instant::now() + phase_duration();
    let rate = Rate::start();
    let tenant = TenantId::parse("bench").expect("tenant");
    let mut workers = Vec::new();
    for _ in 0..callers {
        let store = store.clone();
        let tenant = tenant.clone();
        workers.push(tokio::spawn(async move {
            let stream_id = Uuid::now_v7();
            let (mut version, mut latencies) = (0u64, Latencies::default());
            while Instant::now() < deadline {
                let events = (0..events_per_append)
                    .map(|i| NewEvent::new("ContactCreated", contact_payload(version + i as u64)))
                    .collect();
                let expected = if version == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(version)
                };
                let started = Instant::now();
                store
                    .append(AppendEvents {
                        tenant_id: tenant.clone(),
                        streams: vec![StreamAppend {
                            stream_type: "contact".into(),
                            stream_id,
                            expected,
                            events,
                        }],
                        idempotency_key: None,
                        metadata: metadata(),
                        reservations: Vec::new(),
                        request_fingerprint: None,
                    })
                    .await
                    .expect("append");
                latencies.record(started.elapsed());
                version += events_per_append as u64;
            }
            (version, latencies)
        }));
    }
    let (mut total, mut latencies) = (0, Latencies::default());
    for worker in workers {
        let (events, worker_latencies) = worker.await.expect("worker");
        total += events;
        latencies.extend(worker_latencies);
    }
    (rate.per_second(total), latencies)
}

#[tokio::main]
async fn main() {
    let db = TestDb::create().await;
    let setup = connect(&db).await;
    setup
        .batch_execute(
            "CREATE TABLE raw_events (LIKE events INCLUDING ALL); \
             CREATE SEQUENCE raw_positions OWNED BY raw_events.global_position; \
             ALTER TABLE raw_events ALTER global_position SET DEFAULT nextval('raw_positions')",
        )
        .await
        .expect("scratch table");
    let store = EventStore::connect(db.config(), StoreOptions::default())
        .await
        .expect("store");
    progress(&format!(
        "database {}, {:?} per phase",
        db.name,
        phase_duration()
    ));

    progress("raw: one INSERT per transaction, 1 task");
    let (raw_1, mut raw_1_latency) = raw_inserts(&db, 1, 1).await;
    progress("raw: one INSERT per transaction, 32 tasks");
    let (raw_32, _) = raw_inserts(&db, 32, 1).await;
    progress("raw: batches of 1000 rows, 4 tasks");
    let (raw_batch, _) = raw_inserts(&db, 4, 1000).await;

    progress("store: single-event appends, 1 caller");
    let (ours_1, mut ours_1_latency) = store_appends(&store, 1, 1).await;
    progress("store: single-event appends, 32 callers");
    let before = store.writer_stats();
    let (ours_32, _) = store_appends(&store, 32, 1).await;
    let after = store.writer_stats();
    progress(&format!(
        "store: {:.1} appends per transaction at 32 callers",
        (after.appends - before.appends) as f64 / (after.batches - before.batches).max(1) as f64
    ));
    progress("store: batches of 1000 events, 4 callers");
    let (ours_batch, _) = store_appends(&store, 4, 1000).await;
    store.shutdown().await;

    report("append_single_32", ours_32, "events/s", raw_32);
    report("append_single_1", ours_1, "events/s", raw_1);
    report(
        "append_p50_latency_1",
        ours_1_latency.percentile_ms(50.0),
        "ms",
        raw_1_latency.percentile_ms(50.0),
    );
    report("append_batch_4", ours_batch, "events/s", raw_batch);
}
