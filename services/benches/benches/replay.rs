//! `just bench replay`: gRPC `Subscribe` from position 0 over a big stored log
//! (a real tonic client on loopback against the query role in this process),
//! next to one raw streamed SELECT of the same rows in the same run.
use std::time::{Duration, Instant};

use crm_benches::{connect, fill_events, progress, report};
use crm_platform::Config;
use crm_proto::v1::SubscribeRequest;
use crm_proto::v1::event_log_client::EventLogClient;
use crm_test_support::TestDb;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

fn events_to_replay() -> u64 {
    std::env::var("BENCH_REPLAY_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000)
}

/// The ceiling: every row streamed by one SELECT, each column decoded as the
/// store decodes it.
async fn raw_select(db: &TestDb, count: u64) -> f64 {
    let client = connect(db).await;
    let started = Instant::now();
    let rows = client
        .query_raw(
            "SELECT global_position, event_id, tenant_id, stream_type, stream_id, stream_version, \
             event_type, schema_version, payload::text, metadata::text, recorded_at \
             FROM events WHERE global_position > $1 ORDER BY global_position",
            [0i64],
        )
        .await
        .expect("select");
    let mut rows = std::pin::pin!(rows);
    let (mut seen, mut bytes) = (0u64, 0usize);
    while let Some(row) = rows.next().await {
        let row = row.expect("row");
        let _: i64 = row.get(0);
        let _: uuid::Uuid = row.get(1);
        let tenant: &str = row.get(2);
        let _: uuid::Uuid = row.get(4);
        let payload: &str = row.get(8);
        let metadata: &str = row.get(9);
        let _: std::time::SystemTime = row.get(10);
        bytes += tenant.len() + payload.len() + metadata.len();
        seen += 1;
    }
    assert_eq!(seen, count, "raw select saw every row ({bytes} bytes)");
    count as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let count = events_to_replay();
    let db = TestDb::create().await;
    progress(&format!("database {}, storing {count} events", db.name));
    fill_events(&db, count).await;

    progress("raw streamed SELECT");
    let ceiling = raw_select(&db, count).await;

    let mut config = Config::from_env();
    config.pg_url = db.url();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { crm::run_query(&config, listener, shutdown).await }
    });
    let started = Instant::now();
    while !matches!(crm::health_check(address).await, Ok(true)) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "crm query did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = EventLogClient::new(channel).max_decoding_message_size(64 << 20);
    progress("gRPC Subscribe from position 0");
    let mut request = tonic::Request::new(SubscribeRequest::default());
    request
        .metadata_mut()
        .insert("x-tenant-id", "bench".parse().expect("tenant"));
    request
        .metadata_mut()
        .insert("x-actor-id", "user:auditor".parse().expect("actor"));
    let started = Instant::now();
    let mut stream = client
        .subscribe(request)
        .await
        .expect("subscribe")
        .into_inner();
    let mut last = 0u64;
    while last < count {
        let batch = stream
            .next()
            .await
            .expect("the subscription goes on")
            .expect("a batch");
        for event in &batch.events {
            assert_eq!(event.global_position, last + 1, "in order, no gap");
            last = event.global_position;
        }
    }
    let value = count as f64 / started.elapsed().as_secs_f64();
    drop(stream);
    shutdown.cancel();
    let _ = server.await;
    report("replay", value, "events/s", ceiling);
}
