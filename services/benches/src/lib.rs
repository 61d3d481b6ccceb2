//! Shared pieces of the release benchmarks: timing, percentiles, and the one
//! output format every benchmark prints, next to the raw ceiling measured in
//! the same run:
//!
//! `BENCH name=<name> value=<n> unit=<unit> ceiling=<n> ratio=<n>`
/// The benchmarks run the product's code in their own process, so they use
/// the allocator the `crm` binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crm_event_store::Metadata;
use crm_test_support::TestDb;
use tokio_postgres::NoTls;
use uuid::Uuid;

/// How long each measured phase runs: `BENCH_SECS`, default 5.
pub fn phase_duration() -> Duration {
    let secs = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(5.0);
    Duration::from_secs_f64(secs)
}

/// Prints one figure with its ceiling and their ratio.
pub fn report(name: &str, value: f64, unit: &str, ceiling: f64) {
    let ratio = if ceiling > 0.0 { value / ceiling } else { 0.0 };
    println!(
        "BENCH name={name} value={value:.3} unit={unit} ceiling={ceiling:.3} ratio={ratio:.2}"
    );
}

/// Progress for a human watching, on stderr so the BENCH block stays clean.
pub fn progress(message: &str) {
    eprintln!("[bench] {message}");
}

/// Latencies collected by one phase.
#[derive(Default)]
pub struct Latencies(Vec<Duration>);

impl Latencies {
    pub fn record(&mut self, took: Duration) {
        self.0.push(took);
    }

    pub fn extend(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    /// The `p`-th percentile (0..=100) in milliseconds.
    pub fn percentile_ms(&mut self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.sort_unstable();
        let rank = ((p / 100.0) * (self.0.len() - 1) as f64).round() as usize;
        self.0[rank.min(self.0.len() - 1)].as_secs_f64() * 1000.0
    }
}

/// Counts units done by concurrent workers over a phase.
pub struct Rate {
    started: Instant,
}

impl Rate {
    pub fn start() -> Self {
        Self {
            started: Instant::now(),
        }
    }

    pub fn per_second(&self, units: u64) -> f64 {
        units as f64 / self.started.elapsed().as_secs_f64()
    }
}

/// A realistic event payload (a created contact), about 300 bytes.
pub fn contact_payload(n: u64) -> serde_json::Value {
    serde_json::json!({
        "name": { "given": "Ada", "family": format!("Lovelace-{n}") },
        "emails": [{ "address": format!("ada.{n}@example.com"), "primary": true }],
        "phones": [{ "number": "+8613800138000", "kind": "mobile" }],
        "preferences": { "channel": "email", "language": "en-GB", "time_zone": "Europe/London" },
        "occurred_at": "2026-11-28T10:00:00Z"
    })
}

/// The raw ceiling's scratch table: the events table's shape (columns,
/// constraints, indexes), positions from a plain sequence.
pub async fn create_raw_table(db: &TestDb) {
    connect(db)
        .await
        .batch_execute(
            "CREATE TABLE raw_events (LIKE events INCLUDING ALL); \
             CREATE SEQUENCE raw_positions OWNED BY raw_events.global_position; \
             ALTER TABLE raw_events ALTER global_position SET DEFAULT nextval('raw_positions')",
        )
        .await
        .expect("scratch table");
}

const RAW_INSERT: &str = "INSERT INTO raw_events (event_id, tenant_id, stream_type, stream_id, \
     stream_version, event_type, schema_version, payload, metadata) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::jsonb, $9::text::jsonb)";

const RAW_BATCH: &str = "INSERT INTO raw_events (event_id, tenant_id, stream_type, stream_id, \
     stream_version, event_type, schema_version, payload, metadata) \
     SELECT e, t, st, s, v, et, sv, pl::jsonb, md::jsonb \
     FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::bigint[], $6::text[], \
                 $7::int[], $8::text[], $9::text[]) AS x(e, t, st, s, v, et, sv, pl, md)";

pub fn metadata() -> Metadata {
    Metadata {
        actor: "user:bench".into(),
        roles: vec!["sales_rep".into()],
        correlation_id: Some(Uuid::now_v7().to_string()),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        ..Metadata::default()
    }
}

pub async fn connect(db: &TestDb) -> tokio_postgres::Client {
    let (client, connection) = db.config().connect(NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// Raw ceiling: `tasks` connections, each inserting `rows_per_tx` rows per
/// autocommit statement. Returns rows/s and per-statement latencies.
pub async fn raw_inserts(db: &TestDb, tasks: usize, rows_per_tx: usize) -> (f64, Latencies) {
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

/// Fills the events table with `count` created-contact events of tenant
/// `bench` (the same shape as [`contact_payload`] and [`metadata`]) straight
/// in SQL, in chunks with progress, and moves the log head. For benchmarks
/// that read a big log.
pub async fn fill_events(db: &TestDb, count: u64) {
    let client = connect(db).await;
    let chunk = 100_000u64;
    let mut from = 1u64;
    while from <= count {
        let to = (from + chunk - 1).min(count);
        client
            .execute(
                "INSERT INTO events (global_position, event_id, tenant_id, stream_type, stream_id, \
                   stream_version, event_type, schema_version, payload, metadata) \
                 SELECT g, gen_random_uuid(), 'bench', 'contact', gen_random_uuid(), 1, \
                   'ContactCreated', 1, \
                   jsonb_build_object( \
                     'name', jsonb_build_object('given', 'Ada', 'family', 'Lovelace-' || g), \
                     'emails', jsonb_build_array(jsonb_build_object( \
                        'address', 'ada.' || g || '@example.com', 'primary', true)), \
                     'phones', jsonb_build_array(jsonb_build_object( \
                        'number', '+8613800138000', 'kind', 'mobile')), \
                     'preferences', jsonb_build_object('channel', 'email', \
                        'language', 'en-GB', 'time_zone', 'Europe/London'), \
                     'occurred_at', '2026-11-28T10:00:00Z'), \
                   jsonb_build_object('actor', 'user:bench', \
                     'roles', jsonb_build_array('sales_rep'), \
                     'correlation_id', gen_random_uuid()::text, \
                     'traceparent', '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01') \
                 FROM generate_series($1::bigint, $2::bigint) AS g",
                &[&(from as i64), &(to as i64)],
            )
            .await
            .expect("fill events");
        progress(&format!("stored {to} of {count} events"));
        from = to + 1;
    }
    client
        .execute(
            "UPDATE log_head SET position = $1 WHERE id = 1",
            &[&(count as i64)],
        )
        .await
        .expect("move the head");
    client
        .batch_execute("VACUUM ANALYZE events")
        .await
        .expect("vacuum");
}
