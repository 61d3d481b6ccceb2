//! `just bench append`: the store's append path against plain tokio-postgres
//! INSERTs into a scratch table of the same shape, in the same run.
use std::time::Instant;

use crm_benches::{
    Latencies, Rate, contact_payload, create_raw_table, metadata, phase_duration, progress,
    raw_inserts, report,
};
use crm_domain::TenantId;
use crm_event_store::{
    AppendEvents, EventStore, ExpectedVersion, NewEvent, StoreOptions, StreamAppend,
};
use crm_test_support::TestDb;
use uuid::Uuid;

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
                        subject_keys: Vec::new(),
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
    create_raw_table(&db).await;
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
    // Batches alternate with their ceiling, so both see the same machine and
    // tables of about the same size (the noise of a shared machine drifts).
    let rounds = std::env::var("BENCH_BATCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(2)
        .max(1);
    let (mut raw_batch, mut ours_batch) = (0.0, 0.0);
    let before = store.writer_stats();
    for round in 1..=rounds {
        progress(&format!(
            "raw: batches of 1000 rows, 4 tasks (round {round}/{rounds})"
        ));
        raw_batch += raw_inserts(&db, 4, 1000).await.0 / rounds as f64;
        progress(&format!(
            "store: batches of 1000 events, 4 callers (round {round}/{rounds})"
        ));
        ours_batch += store_appends(&store, 4, 1000).await.0 / rounds as f64;
    }
    let after = store.writer_stats();
    progress(&format!(
        "store: {} of {} batches written before taking the log lock, {} fell back",
        after.written_ahead - before.written_ahead,
        after.batches - before.batches,
        after.fell_back - before.fell_back,
    ));
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
