//! The projection runtime and the pipeline board: read-your-writes through
//! gRPC, redelivery and restarts that change nothing, holes refilled from the
//! store, a poison event that stops the projection loudly.
use std::sync::Arc;
use std::time::Duration;

use crm_domain::TenantId;
use crm_event_store::{
    AppendEvents, EventStore, ExpectedVersion, Metadata, NewEvent, StoreOptions, StreamAppend,
};
use crm_projections::{PIPELINE_BOARD, PipelineBoard, Projector, ProjectorOptions};
use crm_proto::v1::sales_queries_client::SalesQueriesClient;
use crm_proto::v1::{GetPipelineBoardRequest, QueryOptions, StageColumn};
use crm_test_support::{TestDb, TestNats, eventually};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use uuid::Uuid;

use crate::opportunities::{deal, setup, to_stage};
use crate::support::{TestApp, bad_fields, first_column};

fn board_request(pipeline_id: &str, min_position: u64) -> GetPipelineBoardRequest {
    GetPipelineBoardRequest {
        options: Some(QueryOptions { min_position }),
        pipeline_id: pipeline_id.into(),
        owner: String::new(),
    }
}

fn column(stage: &str, count: u64, amount: i64, weighted: i64) -> StageColumn {
    StageColumn {
        stage: stage.into(),
        currency: "EUR".into(),
        deal_count: count,
        amount_minor: amount,
        weighted_minor: weighted,
    }
}

#[tokio::test]
async fn a_command_position_as_min_position_reads_the_write_on_the_board() {
    let app = TestApp::spawn_with(|config| config.query_min_position_wait_ms = 10_000).await;
    let (account, pipeline) = setup(&app).await;
    let mut sales = SalesQueriesClient::new(app.channel.clone());
    // Two deals of 300,000.00 EUR at qualification (10 %), one moved on to
    // negotiation (80 %).
    app.opportunities()
        .open_opportunity(app.request(deal(&account, &pipeline)))
        .await
        .unwrap();
    let second = app
        .opportunities()
        .open_opportunity(app.request(deal(&account, &pipeline)))
        .await
        .unwrap()
        .into_inner();
    let moved = app
        .opportunities()
        .change_opportunity_stage(app.request(to_stage(&second.stream_id, "negotiation")))
        .await
        .unwrap()
        .into_inner();
    // The columns' order comes from the sales funnel's copy of the pipeline.
    crate::support::reached(&app, "sales_funnel", moved.global_position).await;
    let board = sales
        .get_pipeline_board(app.request(board_request(&pipeline, moved.global_position)))
        .await
        .unwrap()
        .into_inner();
    assert!(board.position >= moved.global_position);
    // weighted = amount × probability ÷ 10000: 30,000,000 × 1000 ÷ 10000 and
    // 30,000,000 × 8000 ÷ 10000.
    // The pipeline's open stages in order, an empty column where no deal is.
    assert_eq!(
        board.stages,
        vec![
            column("qualification", 1, 30_000_000, 3_000_000),
            StageColumn {
                stage: "proposal".into(),
                ..StageColumn::default()
            },
            column("negotiation", 1, 30_000_000, 24_000_000),
        ]
    );
    app.stop().await;
}

#[tokio::test]
async fn board_queries_refuse_bad_input_and_say_when_the_model_lags() {
    let app = TestApp::spawn_with(|config| config.query_min_position_wait_ms = 200).await;
    let mut sales = SalesQueriesClient::new(app.channel.clone());
    let status = sales
        .get_pipeline_board(app.request(board_request("nope", 0)))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), vec!["pipeline_id"]);
    let pipeline = Uuid::now_v7().to_string();
    let status = sales
        .get_pipeline_board(app.request(board_request(&pipeline, 1_000_000)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("pipeline_board"), "{status:?}");
    // A projection stopped by a poison event will not get there by waiting:
    // FAILED_PRECONDITION, without its error (which may name other tenants'
    // data).
    app.db
        .client()
        .await
        .execute(
            "UPDATE projections SET state = 'failed', last_error = 'secret detail', \
             error_position = 7 WHERE name = 'pipeline_board'",
            &[],
        )
        .await
        .unwrap();
    let status = sales
        .get_pipeline_board(app.request(board_request(&pipeline, 1_000_000)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("position 7"), "{status:?}");
    assert!(!status.message().contains("secret"), "{status:?}");
    app.db
        .client()
        .await
        .execute(
            "UPDATE projections SET state = 'running', last_error = NULL, \
             error_position = NULL WHERE name = 'pipeline_board'",
            &[],
        )
        .await
        .unwrap();
    let status = sales
        .get_pipeline_board(crate::support::as_caller(
            board_request(&pipeline, 0),
            None,
            Some("u"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // A pipeline never published.
    let status = sales
        .get_pipeline_board(app.request(board_request(&pipeline, 0)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    app.stop().await;
}

// --- the runtime, driven directly ---

struct Setup {
    db: TestDb,
    nats: TestNats,
    store: EventStore,
    pool: deadpool_postgres::Pool,
}

async fn setup_runtime() -> Setup {
    let db = TestDb::create().await;
    let nats = TestNats::shared();
    let store = EventStore::connect(db.config(), StoreOptions::default())
        .await
        .unwrap();
    let manager = deadpool_postgres::Manager::new(db.config().clone(), tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(4)
        .build()
        .unwrap();
    Setup {
        db,
        nats,
        store,
        pool,
    }
}

fn opened(pipeline: Uuid, amount: i64) -> serde_json::Value {
    json!({
        "name": "Deal", "account_id": Uuid::now_v7(), "pipeline_id": pipeline,
        "pipeline_version": 1, "stage": "qualification", "probability_bp": 2500,
        "category": "pipeline", "amount": { "amount_minor": amount, "currency": "EUR" },
        "close_date": "2026-12-31", "owner": "user:ada",
        "occurred_at": "2026-11-29T10:00:00Z"
    })
}

/// Appends `event` as a new opportunity stream of tenant acme; its position.
async fn append_deal(store: &EventStore, event: NewEvent) -> u64 {
    append_to_deal(store, Uuid::now_v7(), ExpectedVersion::NoStream, event).await
}

/// Appends `event` to the opportunity stream `deal` of tenant acme; its
/// position.
async fn append_to_deal(
    store: &EventStore,
    deal: Uuid,
    expected: ExpectedVersion,
    event: NewEvent,
) -> u64 {
    store
        .append(AppendEvents {
            tenant_id: TenantId::parse("acme").unwrap(),
            streams: vec![StreamAppend {
                stream_type: "opportunity".into(),
                stream_id: deal,
                expected,
                events: vec![event],
            }],
            idempotency_key: None,
            metadata: Metadata {
                actor: "user:ada".into(),
                ..Metadata::default()
            },
            reservations: Vec::new(),
            subject_keys: Vec::new(),
            request_fingerprint: None,
        })
        .await
        .unwrap()
        .last_position
}

/// `count` opened deals of `amount`, one append each; returns the positions.
async fn open_deals(store: &EventStore, pipeline: Uuid, count: usize, amount: i64) -> Vec<u64> {
    let mut positions = Vec::new();
    for _ in 0..count {
        let event = NewEvent::new("OpportunityOpened", opened(pipeline, amount));
        positions.push(append_deal(store, event).await);
    }
    positions
}

/// Publishes the stored events at `positions` as the relay would (stream
/// sequence = position only where nothing is skipped).
async fn publish(setup: &Setup, positions: &[u64]) {
    use futures_util::StreamExt;
    let js = setup.nats.jetstream().await;
    // Under a full parallel suite JetStream's API may time out for a moment;
    // the stream must exist before anything can be published.
    let config = async_nats::jetstream::stream::Config {
        name: setup.nats.stream.clone(),
        subjects: vec![format!("{}.>", setup.nats.subject_prefix)],
        ..Default::default()
    };
    let mut attempt = 0;
    while let Err(error) = js.get_or_create_stream(config.clone()).await {
        attempt += 1;
        assert!(attempt < 10, "the test stream: {error}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut events = setup
        .store
        .read_all(0, &crm_event_store::Filter::default())
        .await
        .unwrap();
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        if positions.contains(&event.global_position) {
            let subject =
                crm_wire::cloudevents::subject(&setup.nats.subject_prefix, &event).unwrap();
            js.send_publish(subject, crm_wire::cloudevents::message(&event))
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }
}

fn projector(setup: &Setup) -> Projector {
    projector_of(setup, Arc::new(PipelineBoard))
}

fn projector_of(setup: &Setup, projection: Arc<dyn crm_projections::Projection>) -> Projector {
    projector_waiting(setup, projection, Duration::from_millis(300))
}

/// A projector that waits `tail_refill_after` for a message not delivered
/// yet before reading its event from the store.
fn projector_waiting(
    setup: &Setup,
    projection: Arc<dyn crm_projections::Projection>,
    tail_refill_after: Duration,
) -> Projector {
    Projector::new(
        projection,
        setup.store.clone(),
        setup.pool.clone(),
        setup.nats.url.clone(),
        ProjectorOptions {
            stream: setup.nats.stream.clone(),
            subject_prefix: setup.nats.subject_prefix.clone(),
            fetch_wait: Duration::from_millis(100),
            tail_refill_after,
            ..ProjectorOptions::default()
        },
    )
}

async fn run_until(
    setup: &Setup,
    position: u64,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let projector = projector(setup);
    let applied = projector.position();
    let stop = CancellationToken::new();
    let task = tokio::spawn(projector.run(stop.clone()));
    eventually(Duration::from_secs(20), "the projection to apply", || {
        let now = *applied.borrow();
        async move { (now >= position).then_some(()) }
    })
    .await;
    (stop, task)
}

async fn board_rows(setup: &Setup) -> Vec<String> {
    setup
        .db
        .client()
        .await
        .query(
            "SELECT row_to_json(b)::text FROM pipeline_board b ORDER BY deal_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Rebuilds `projection` in chunks of 100 events and swaps it in.
async fn rebuild_in(
    setup: &Setup,
    projection: Arc<dyn crm_projections::Projection>,
) -> Result<u64, crm_projections::RebuildError> {
    crm_projections::rebuild(projection, &setup.store, setup.db.config(), 100, |_| {}).await
}

/// How many rows `table` holds (live tables, in `public`).
async fn rows_in(setup: &Setup, table: &str) -> i64 {
    setup
        .db
        .client()
        .await
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

async fn status(setup: &Setup) -> crm_projections::ProjectionStatus {
    let client = setup.db.client().await;
    crm_projections::statuses(&client)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.name == PIPELINE_BOARD)
        .unwrap()
}

/// A metric exporter that keeps the latest value of every `u64` counter and
/// gauge by (name, `projection` attribute).
#[derive(Clone, Default)]
struct CapturedMetrics(Arc<std::sync::Mutex<std::collections::HashMap<(String, String), u64>>>);

impl CapturedMetrics {
    fn get(&self, name: &str, projection: &str) -> Option<u64> {
        self.0
            .lock()
            .unwrap()
            .get(&(name.to_owned(), projection.to_owned()))
            .copied()
    }
}

impl opentelemetry_sdk::metrics::exporter::PushMetricExporter for CapturedMetrics {
    async fn export(
        &self,
        metrics: &opentelemetry_sdk::metrics::data::ResourceMetrics,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
        let mut values = self.0.lock().unwrap();
        for scope in metrics.scope_metrics() {
            for metric in scope.metrics() {
                let points: Vec<(Vec<&opentelemetry::KeyValue>, u64)> = match metric.data() {
                    AggregatedMetrics::U64(MetricData::Sum(sum)) => sum
                        .data_points()
                        .map(|p| (p.attributes().collect(), p.value()))
                        .collect(),
                    AggregatedMetrics::U64(MetricData::Gauge(gauge)) => gauge
                        .data_points()
                        .map(|p| (p.attributes().collect(), p.value()))
                        .collect(),
                    _ => continue,
                };
                for (attributes, value) in points {
                    let projection = attributes
                        .iter()
                        .find(|kv| kv.key.as_str() == "projection")
                        .map(|kv| kv.value.to_string())
                        .unwrap_or_default();
                    values.insert((metric.name().to_owned(), projection), value);
                }
            }
        }
        Ok(())
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }

    fn temporality(&self) -> opentelemetry_sdk::metrics::Temporality {
        opentelemetry_sdk::metrics::Temporality::Cumulative
    }
}

/// Captures the OpenTelemetry metrics of whatever runs in this process from
/// now on. One provider per process: nextest runs each test in a process of
/// its own, `cargo test` runs them side by side (so figures are compared
/// with `>=` where another test's projector could add to them).
fn capture_metrics() -> (
    CapturedMetrics,
    opentelemetry_sdk::metrics::SdkMeterProvider,
) {
    static CAPTURE: std::sync::OnceLock<(
        CapturedMetrics,
        opentelemetry_sdk::metrics::SdkMeterProvider,
    )> = std::sync::OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let captured = CapturedMetrics::default();
            let meters = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
                .with_reader(
                    opentelemetry_sdk::metrics::PeriodicReader::builder(captured.clone()).build(),
                )
                .build();
            opentelemetry::global::set_meter_provider(meters.clone());
            (captured, meters)
        })
        .clone()
}

/// A row's state column that an earlier version made `jsonb` goes on
/// working: its rows are read back and written again as events come; a
/// rebuild makes it `json`, with the same figures.
#[tokio::test]
async fn a_state_column_left_as_jsonb_by_an_earlier_version_works_until_a_rebuild_makes_it_json() {
    let setup = setup_runtime().await;
    let pipeline = Uuid::now_v7();
    let first = open_deals(&setup.store, pipeline, 3, 1_000).await;
    publish(&setup, &first).await;
    let (stop, task) = run_until(&setup, *first.last().unwrap()).await;
    stop.cancel();
    task.await.unwrap();
    let client = setup.db.client().await;
    client
        .batch_execute("ALTER TABLE pipeline_board ALTER COLUMN state TYPE jsonb")
        .await
        .unwrap();
    let state_type = || async {
        client
            .query_one(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
                 WHERE attrelid = 'pipeline_board'::regclass AND attname = 'state'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    let figures = || {
        first_column::<String>(
            &client,
            "SELECT deal_id::text || ' ' || stage || ' ' || probability_bp || ' ' || \
               COALESCE(state->>'stage', 'left-out') FROM pipeline_board ORDER BY deal_id",
        )
    };
    // The first deal moves on: its stored state is read and evolved.
    let deal: Uuid = client
        .query_one(
            "SELECT deal_id FROM pipeline_board ORDER BY deal_id LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let moved = append_to_deal(
        &setup.store,
        deal,
        ExpectedVersion::Exact(1),
        NewEvent::new(
            "OpportunityStageChanged",
            json!({
                "from": "qualification", "to": "proposal", "probability_bp": 6000,
                "category": "pipeline", "direction": "forward",
                "occurred_at": "2026-11-30T10:00:00Z"
            }),
        ),
    )
    .await;
    let more = open_deals(&setup.store, pipeline, 1, 1_000).await;
    publish(&setup, &[moved, more[0]]).await;
    let (stop, task) = run_until(&setup, more[0]).await;
    stop.cancel();
    task.await.unwrap();
    assert_eq!(state_type().await, "jsonb", "left as it was");
    let live = figures().await;
    assert_eq!(live.len(), 4, "{live:?}");
    assert_eq!(
        live[0],
        format!("{deal} proposal 6000 proposal"),
        "the moved deal, from its stored state"
    );

    rebuild_in(&setup, Arc::new(PipelineBoard)).await.unwrap();
    assert_eq!(state_type().await, "json");
    // The state only the projection reads is left out by the rebuild.
    let left_out: Vec<String> = live
        .iter()
        .map(|line| line.replace(" proposal 6000 proposal", " proposal 6000 left-out"))
        .map(|line| {
            line.replace(
                " qualification 2500 qualification",
                " qualification 2500 left-out",
            )
        })
        .collect();
    assert_eq!(
        figures().await,
        left_out,
        "the same figures after the rebuild"
    );
    setup.store.shutdown().await;
}

#[tokio::test]
async fn redelivery_and_restart_change_no_figure_and_holes_are_refilled_from_the_store() {
    let (captured, meters) = capture_metrics();
    let setup = setup_runtime().await;
    let pipeline = Uuid::now_v7();
    let positions = open_deals(&setup.store, pipeline, 10, 100_000).await;
    // JetStream "lost" positions 4 to 6.
    let delivered: Vec<u64> = positions
        .iter()
        .copied()
        .filter(|p| !(4..=6).contains(p))
        .collect();
    publish(&setup, &delivered).await;
    let (stop, task) = run_until(&setup, 10).await;
    stop.cancel();
    task.await.unwrap();
    let first = board_rows(&setup).await;
    assert_eq!(first.len(), 10, "every deal, the refilled ones too");
    let status = status(&setup).await;
    assert_eq!(
        (
            status.position,
            status.holes_refilled,
            status.state.as_str(),
            status.lag_events
        ),
        (10, 3, "running", 0)
    );
    meters.force_flush().unwrap();
    assert!(
        captured.get("crm.projection.holes_refilled", PIPELINE_BOARD) >= Some(3),
        "the refill is counted in a metric"
    );
    assert!(captured.get("crm.projection.position", PIPELINE_BOARD) > Some(0));
    assert!(captured.get("crm.projection.events", PIPELINE_BOARD) >= Some(10));
    assert!(captured.get("crm.projection.batches", PIPELINE_BOARD) >= Some(1));
    let sums: (i64, i64) = {
        let row = setup
            .db
            .client()
            .await
            .query_one(
                "SELECT sum(amount_minor)::bigint, sum(weighted_minor)::bigint FROM pipeline_board",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    // 10 × 100,000 minor units; weighted at 25 %.
    assert_eq!(sums, (1_000_000, 250_000));

    // Redelivery of everything (the durable consumer reset to the start)
    // and a restart change nothing.
    let js = setup.nats.jetstream().await;
    let stream = js.get_stream(&setup.nats.stream).await.unwrap();
    // The board reads one stream type: its one consumer is filtered by it.
    let durable = format!("projection_{PIPELINE_BOARD}__opportunity");
    stream.delete_consumer(&durable).await.unwrap();
    stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some(durable),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::All,
            filter_subject: format!("{}.*.opportunity.*.*", setup.nats.subject_prefix),
            ..Default::default()
        })
        .await
        .unwrap();
    let more = open_deals(&setup.store, pipeline, 1, 100_000).await;
    publish(&setup, &more).await;
    let (stop, task) = run_until(&setup, 11).await;
    stop.cancel();
    task.await.unwrap();
    let second = board_rows(&setup).await;
    assert_eq!(second.len(), 11);
    assert!(
        first.iter().all(|row| second.contains(row)),
        "redelivered events changed no row"
    );
    setup.store.shutdown().await;
}

/// Records the events it is given, in order: `recorder` reads leads and
/// deals, `answers` only the `Answered` events of contacts.
struct Recorder {
    name: &'static str,
    seen: std::sync::Mutex<Vec<u64>>,
    /// The events of each `read_ahead`, in calls.
    ahead: std::sync::Mutex<Vec<Vec<u64>>>,
    /// Events applied that the last `read_ahead` did not announce.
    unannounced: std::sync::Mutex<Vec<u64>>,
}

impl Recorder {
    fn new(name: &'static str) -> Arc<Self> {
        Arc::new(Self {
            name,
            seen: std::sync::Mutex::default(),
            ahead: std::sync::Mutex::default(),
            unannounced: std::sync::Mutex::default(),
        })
    }

    fn seen(&self) -> Vec<u64> {
        self.seen.lock().unwrap().clone()
    }
}

impl crm_projections::Projection for Recorder {
    fn name(&self) -> &'static str {
        self.name
    }

    fn schema(&self) -> &'static str {
        "CREATE TABLE IF NOT EXISTS recorded (position bigint PRIMARY KEY, stream_type text NOT NULL)"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["recorded"]
    }

    fn stream_types(&self) -> &'static [&'static str] {
        match self.name {
            "answers" => &["contact"],
            _ => &["lead", "opportunity"],
        }
    }

    fn only_event_type(&self, _stream_type: &str) -> Option<&'static str> {
        (self.name == "answers").then_some("Answered")
    }

    fn read_ahead<'a>(
        &'a self,
        _tx: &'a crm_projections::Tx<'_>,
        events: &'a [&'a crm_event_store::RecordedEvent],
    ) -> crm_projections::ApplyFuture<'a> {
        let positions = events.iter().map(|e| e.global_position).collect();
        self.ahead.lock().unwrap().push(positions);
        Box::pin(async { Ok(()) })
    }

    fn apply<'a>(
        &'a self,
        tx: &'a crm_projections::Tx<'_>,
        event: &'a crm_event_store::RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            let announced = self
                .ahead
                .lock()
                .unwrap()
                .last()
                .is_some_and(|batch| batch.contains(&event.global_position));
            if !announced {
                self.unannounced.lock().unwrap().push(event.global_position);
            }
            self.seen.lock().unwrap().push(event.global_position);
            tx.execute(
                "INSERT INTO recorded (position, stream_type) VALUES ($1, $2)",
                &[&(event.global_position as i64), &event.stream_type],
            )
            .await?;
            Ok(())
        })
    }
}

/// Appends one event of `stream_type` as a new stream of tenant acme.
async fn append_of(store: &EventStore, stream_type: &str) -> u64 {
    append_typed(store, stream_type, "Recorded").await
}

/// Appends one `event_type` event of `stream_type` as a new stream of
/// tenant acme.
async fn append_typed(store: &EventStore, stream_type: &str, event_type: &str) -> u64 {
    store
        .append(AppendEvents {
            tenant_id: TenantId::parse("acme").unwrap(),
            streams: vec![StreamAppend {
                stream_type: stream_type.into(),
                stream_id: Uuid::now_v7(),
                expected: ExpectedVersion::NoStream,
                events: vec![NewEvent::new(event_type, json!({ "n": 1 }))],
            }],
            idempotency_key: None,
            metadata: Metadata::default(),
            reservations: Vec::new(),
            subject_keys: Vec::new(),
            request_fingerprint: None,
        })
        .await
        .unwrap()
        .last_position
}

#[tokio::test]
async fn a_projector_of_several_stream_types_gets_only_theirs_in_log_order_and_refills_each_hole() {
    let setup = setup_runtime().await;
    let mut log = Vec::new();
    for stream_type in [
        "lead",
        "opportunity",
        "contact",
        "lead",
        "opportunity",
        "contact",
        "opportunity",
        "lead",
        "contact",
    ] {
        log.push((append_of(&setup.store, stream_type).await, stream_type));
    }
    let at = |i: usize| log[i].0;
    // A lead and a deal lost: their consumers deliver later ones, so they
    // are holes, refilled at once (the wait for a message still on its way
    // is a minute here, longer than the test).
    let (lost_lead, lost_deal) = (at(3), at(4));
    let published: Vec<u64> = log
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| *p != lost_deal && *p != lost_lead)
        .collect();
    publish(&setup, &published).await;
    // Consumers of an earlier version (unfiltered; of a type no longer
    // read) are deleted at start; another projection's are left alone.
    let js = setup.nats.jetstream().await;
    let stream = js.get_stream(&setup.nats.stream).await.unwrap();
    for (durable, filter) in [
        ("projection_recorder", ">".to_owned()),
        ("projection_recorder__contact", "*.*.contact.*.*".to_owned()),
        ("projection_recorder_b__lead", "*.*.lead.*.*".to_owned()),
        ("projection_answers__contact", "*.*.contact.*.*".to_owned()),
    ] {
        stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                durable_name: Some(durable.to_owned()),
                filter_subject: format!("{}.{filter}", setup.nats.subject_prefix),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    let recorder = Recorder::new("recorder");
    let patient = projector_waiting(&setup, recorder.clone(), Duration::from_secs(60));
    let mut applied = patient.applied();
    let stop = CancellationToken::new();
    let task = tokio::spawn(patient.run(stop.clone()));
    let head = at(8);
    tokio::time::timeout(Duration::from_secs(20), applied.reached(head))
        .await
        .expect("the projector moves past the contacts it is never sent");
    let mut theirs: Vec<u64> = log
        .iter()
        .filter(|(_, t)| *t != "contact")
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(
        recorder.seen(),
        theirs,
        "leads and deals, each once, in log order, the lost ones refilled"
    );
    let holes = || async {
        crm_projections::statuses(&setup.db.client().await)
            .await
            .unwrap()
            .into_iter()
            .find(|s| s.name == "recorder")
            .unwrap()
            .holes_refilled
    };
    assert_eq!(holes().await, 2);
    // Each batch was announced before it was applied (holes included),
    // with nothing of other types.
    let announced: Vec<u64> = recorder.ahead.lock().unwrap().concat();
    assert_eq!(
        announced, theirs,
        "read ahead: the batches' events, in order"
    );
    assert!(recorder.unannounced.lock().unwrap().is_empty());

    // One consumer per stream type, each filtered by it.
    for stream_type in ["lead", "opportunity"] {
        let info = stream
            .consumer_info(format!("projection_recorder__{stream_type}"))
            .await
            .unwrap();
        assert_eq!(
            info.config.filter_subject,
            format!("{}.*.{stream_type}.*.*", setup.nats.subject_prefix)
        );
    }
    assert!(stream.consumer_info("projection_recorder").await.is_err());
    assert!(
        stream
            .consumer_info("projection_recorder__contact")
            .await
            .is_err()
    );
    for others in ["projection_recorder_b__lead", "projection_answers__contact"] {
        assert!(stream.consumer_info(others).await.is_ok(), "{others} kept");
    }
    stop.cancel();
    task.await.unwrap();

    // After a restart: the lost messages arriving late change nothing; a
    // lead, a deal and a lead lost at the tail (nothing later from their
    // consumers) are read from the store once the wait runs out, all three
    // after one wait, not one wait each.
    publish(&setup, &[lost_lead, lost_deal]).await;
    let mut tail = Vec::new();
    for stream_type in ["lead", "opportunity", "lead"] {
        tail.push(append_of(&setup.store, stream_type).await);
    }
    let later = append_of(&setup.store, "contact").await;
    publish(&setup, &[later]).await;
    let projector = projector_waiting(&setup, recorder.clone(), Duration::from_secs(3));
    let mut applied = projector.applied();
    let stop = CancellationToken::new();
    let task = tokio::spawn(projector.run(stop.clone()));
    tokio::time::timeout(Duration::from_secs(8), applied.reached(later))
        .await
        .expect("one wait for the three lost at the tail");
    theirs.extend(&tail);
    assert_eq!(recorder.seen(), theirs, "nothing applied twice");
    assert_eq!(holes().await, 5);
    assert_eq!(rows_in(&setup, "recorded").await, theirs.len() as i64);
    stop.cancel();
    task.await.unwrap();
    setup.store.shutdown().await;
}

#[tokio::test]
async fn a_projector_of_one_event_type_gets_only_that_type_and_waits_for_no_other() {
    let setup = setup_runtime().await;
    let mut log = Vec::new();
    for event_type in ["Recorded", "Answered", "Recorded", "Answered", "Recorded"] {
        log.push((
            append_typed(&setup.store, "contact", event_type).await,
            event_type,
        ));
    }
    let positions: Vec<u64> = log.iter().map(|(p, _)| *p).collect();
    publish(&setup, &positions).await;
    let answers = Recorder::new("answers");
    // A wait of a minute for messages on their way: expecting one of the
    // other event types would show as a timeout here.
    let projector = projector_waiting(&setup, answers.clone(), Duration::from_secs(60));
    let mut applied = projector.applied();
    let stop = CancellationToken::new();
    let task = tokio::spawn(projector.run(stop.clone()));
    tokio::time::timeout(Duration::from_secs(20), applied.reached(positions[4]))
        .await
        .expect("the projector passes the events it is never sent");
    let theirs: Vec<u64> = log
        .iter()
        .filter(|(_, t)| *t == "Answered")
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(answers.seen(), theirs);
    let js = setup.nats.jetstream().await;
    let stream = js.get_stream(&setup.nats.stream).await.unwrap();
    let info = stream
        .consumer_info("projection_answers__contact__Answered")
        .await
        .unwrap();
    assert_eq!(
        info.config.filter_subject,
        format!("{}.*.contact.*.Answered", setup.nats.subject_prefix)
    );
    let status = crm_projections::statuses(&setup.db.client().await)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.name == "answers")
        .unwrap();
    assert_eq!(status.holes_refilled, 0, "{status:?}");
    stop.cancel();
    task.await.unwrap();
    setup.store.shutdown().await;
}

#[tokio::test]
async fn a_message_that_does_not_decode_is_read_from_the_store_instead() {
    let setup = setup_runtime().await;
    let first = append_of(&setup.store, "lead").await;
    let second = append_of(&setup.store, "lead").await;
    publish(&setup, &[first]).await;
    // The second as a message whose `ce-time` is garbled.
    let js = setup.nats.jetstream().await;
    let event = {
        use futures_util::StreamExt;
        let mut events = setup
            .store
            .read_all(second - 1, &crm_event_store::Filter::default())
            .await
            .unwrap();
        events.next().await.unwrap().unwrap()
    };
    let mut headers = crm_wire::cloudevents::headers(&event);
    headers.insert(crm_wire::cloudevents::header::TIME, "not a time");
    js.publish_with_headers(
        crm_wire::cloudevents::subject(&setup.nats.subject_prefix, &event).unwrap(),
        headers,
        event.payload.as_str().to_owned().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let recorder = Recorder::new("recorder");
    let projector = projector_of(&setup, recorder.clone());
    let mut applied = projector.applied();
    let stop = CancellationToken::new();
    let task = tokio::spawn(projector.run(stop.clone()));
    tokio::time::timeout(Duration::from_secs(20), applied.reached(second))
        .await
        .expect("the event behind the garbled message is read from the store");
    assert_eq!(recorder.seen(), vec![first, second]);
    let status = crm_projections::statuses(&setup.db.client().await)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.name == "recorder")
        .unwrap();
    assert_eq!(
        (status.state.as_str(), status.holes_refilled),
        ("running", 1)
    );
    stop.cancel();
    task.await.unwrap();
    setup.store.shutdown().await;
}

#[tokio::test]
async fn a_poison_event_stops_the_projection_loudly_and_skips_nothing() {
    let (captured, meters) = capture_metrics();
    let setup = setup_runtime().await;
    let pipeline = Uuid::now_v7();
    let mut positions = open_deals(&setup.store, pipeline, 2, 500).await;
    let bad = append_deal(
        &setup.store,
        NewEvent::new("OpportunityOpened", json!({ "bogus": true })),
    )
    .await;
    positions.push(bad);
    positions.extend(open_deals(&setup.store, pipeline, 1, 500).await);
    publish(&setup, &positions).await;
    let projector = projector(&setup);
    // The run ends by itself on the poison event.
    tokio::time::timeout(
        Duration::from_secs(20),
        projector.run(CancellationToken::new()),
    )
    .await
    .expect("the projector stops on the poison event");
    let status = status(&setup).await;
    assert_eq!(status.state, "failed");
    assert_eq!(status.position, bad - 1, "applied up to the event before");
    assert_eq!(status.error_position, Some(bad));
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("OpportunityOpened"),
        "{status:?}"
    );
    assert_eq!(status.lag_events, 2);
    assert_eq!(
        board_rows(&setup).await.len(),
        2,
        "nothing after it applied"
    );
    meters.force_flush().unwrap();
    assert!(
        captured.get("crm.projection.poison", PIPELINE_BOARD) >= Some(1),
        "the stop is counted in a metric"
    );
    setup.store.shutdown().await;
}

/// The board's rows without their `state` (which a rebuild leaves out),
/// and each row's `state` (`None`: NULL), by deal.
async fn board_rows_and_states(
    setup: &Setup,
) -> (Vec<String>, Vec<(Uuid, Option<serde_json::Value>)>) {
    let rows = setup
        .db
        .client()
        .await
        .query(
            "SELECT (to_jsonb(b) - 'state')::text, deal_id, state FROM pipeline_board b \
             ORDER BY deal_id",
            &[],
        )
        .await
        .unwrap();
    (
        rows.iter().map(|row| row.get(0)).collect(),
        rows.iter().map(|row| (row.get(1), row.get(2))).collect(),
    )
}

/// A deal's state as the domain folds its stream's events in the store.
async fn folded_deal(store: &EventStore, deal: Uuid) -> serde_json::Value {
    use crm_domain::Aggregate;
    let events = store
        .read_stream(&TenantId::parse("acme").unwrap(), deal, 1, 1_000)
        .await
        .unwrap();
    let decoded: Vec<crm_domain::opportunity::OpportunityEvent> = events
        .iter()
        .map(|event| crm_projections::decode(event).unwrap().unwrap())
        .collect();
    serde_json::to_value(crm_domain::opportunity::Opportunity::default().replay(&decoded)).unwrap()
}

#[tokio::test]
async fn a_rebuild_equals_the_live_tables_and_swaps_in_while_the_projector_runs() {
    let setup = setup_runtime().await;
    let pipeline = Uuid::now_v7();
    let positions = open_deals(&setup.store, pipeline, 30, 1_000).await;
    publish(&setup, &positions).await;
    let (stop, task) = run_until(&setup, 30).await;
    let (live, live_states) = board_rows_and_states(&setup).await;
    assert!(
        live_states.iter().all(|(_, state)| state.is_some()),
        "applied live, every row keeps its deal's state"
    );

    let mut seen = Vec::new();
    let swapped_at = crm_projections::rebuild(
        Arc::new(PipelineBoard),
        &setup.store,
        setup.db.config(),
        7,
        |progress| seen.push(progress),
    )
    .await
    .unwrap();
    assert_eq!(swapped_at, 30);
    assert!(
        seen.windows(2).all(|w| w[0].position < w[1].position),
        "progress moves forward: {seen:?}"
    );
    assert_eq!(seen.last().map(|p| (p.position, p.head)), Some((30, 30)));
    let (rebuilt, rebuilt_states) = board_rows_and_states(&setup).await;
    assert_eq!(rebuilt, live, "the rebuild equals the live tables");
    assert!(
        rebuilt_states.iter().all(|(_, state)| state.is_none()),
        "a rebuild leaves out the state only the projection reads"
    );
    let schemas: i64 = setup
        .db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'rebuild_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schemas, 0, "the rebuild schema is gone");

    // The live projector goes on with the swapped-in tables: new deals,
    // and the next event of each rebuilt deal, whose state it folds from
    // the deal's events in the store.
    let mut more = open_deals(&setup.store, pipeline, 5, 1_000).await;
    for (deal, _) in &rebuilt_states {
        let moved = NewEvent::new(
            "OpportunityStageChanged",
            json!({
                "from": "qualification", "to": "discovery", "probability_bp": 5000,
                "category": "best_case", "direction": "forward",
                "occurred_at": "2026-11-30T10:00:00Z"
            }),
        );
        more.push(append_to_deal(&setup.store, *deal, ExpectedVersion::Exact(1), moved).await);
    }
    publish(&setup, &more).await;
    eventually(
        Duration::from_secs(20),
        "the live projector to go on",
        || async { (status(&setup).await.position == 65).then_some(()) },
    )
    .await;
    let (rows, states) = board_rows_and_states(&setup).await;
    assert_eq!(rows.len(), 35);
    let moved: Vec<&String> = rows
        .iter()
        .filter(|row| row.contains(r#""stage": "discovery""#))
        .collect();
    assert_eq!(moved.len(), 30, "every rebuilt deal moved: {rows:?}");
    assert!(
        moved
            .iter()
            .all(|row| row.contains(r#""name": "Deal""#) && row.contains(r#""amount_minor": 1000"#)),
        "what the deals' first events said is kept: {moved:?}"
    );
    for (deal, state) in states {
        assert_eq!(
            state,
            Some(folded_deal(&setup.store, deal).await),
            "applied live again, the row keeps its deal's whole state"
        );
    }
    stop.cancel();
    task.await.unwrap();
    setup.store.shutdown().await;
}

/// A read model whose table refuses position 3: its write fails only in
/// PostgreSQL, after the event was applied in Rust.
struct RefusesThree;

impl crm_projections::Projection for RefusesThree {
    crm_projections::projection_names!(
        "refuses_three",
        "CREATE TABLE IF NOT EXISTS refuses_three (
            position bigint PRIMARY KEY CHECK (position <> 3),
            seen     bigint NOT NULL
        )",
        ["refuses_three"]
    );

    fn apply<'a>(
        &'a self,
        tx: &'a crm_projections::Tx<'_>,
        event: &'a crm_event_store::RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            let position = i64::try_from(event.global_position).unwrap();
            // A read between writes sees the writes queued before it.
            let seen: i64 = tx
                .query_one("SELECT count(*) FROM refuses_three", &[])
                .await?
                .get(0);
            tx.execute(
                "INSERT INTO refuses_three (position, seen) VALUES ($1, $2)",
                &[&position, &seen],
            )
            .await?;
            tx.execute(
                "UPDATE refuses_three SET seen = seen + 100 WHERE position = $1",
                &[&position],
            )
            .await?;
            Ok(())
        })
    }
}

#[tokio::test]
async fn a_rebuild_reads_its_own_queued_writes_and_names_the_event_whose_write_fails() {
    let setup = setup_runtime().await;
    let pipeline = Uuid::now_v7();
    open_deals(&setup.store, pipeline, 2, 1_000).await;
    let rebuild = || rebuild_in(&setup, Arc::new(RefusesThree));
    // Two events: every write is queued and lands, in order.
    let swapped_at = rebuild().await.unwrap();
    assert_eq!(swapped_at, 2);
    let rows: Vec<(i64, i64)> = setup
        .db
        .client()
        .await
        .query("SELECT position, seen FROM refuses_three ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(rows, vec![(1, 100), (2, 101)]);

    // Event 3's insert fails in PostgreSQL when the queue is sent (at the
    // end of the 100-event chunk, after events 4 and 5 were applied): the
    // error names event 3, and the live table keeps what it had.
    open_deals(&setup.store, pipeline, 3, 1_000).await;
    let error = rebuild().await.unwrap_err();
    match &error {
        crm_projections::RebuildError::Poison {
            projection,
            position,
            error,
        } => {
            assert_eq!(*projection, "refuses_three");
            assert_eq!(*position, 3, "{error}");
            assert!(error.contains("check constraint"), "{error}");
        }
        other => panic!("expected a poison event, got {other}"),
    }
    assert_eq!(
        rows_in(&setup, "refuses_three").await,
        2,
        "nothing swapped in"
    );
    setup.store.shutdown().await;
}

/// A read model whose primary key only guards its live writes: a rebuild
/// (`rebuild_keys`: the key named) writes `k = position % modulo` by plain
/// INSERTs and adds the key at the end.
struct KeyedLog {
    keys: &'static [&'static str],
    modulo: i64,
}

impl crm_projections::Projection for KeyedLog {
    crm_projections::projection_names!(
        "keyed_log",
        "CREATE TABLE IF NOT EXISTS keyed_log (k bigint PRIMARY KEY, v bigint NOT NULL)",
        ["keyed_log"]
    );

    fn rebuild_keys(&self) -> &'static [&'static str] {
        self.keys
    }

    fn apply<'a>(
        &'a self,
        tx: &'a crm_projections::Tx<'_>,
        event: &'a crm_event_store::RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            let p = i64::try_from(event.global_position).unwrap();
            let sql = match tx.in_rebuild() {
                true => "INSERT INTO keyed_log (k, v) VALUES ($1, $2)",
                false => "INSERT INTO keyed_log (k, v) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING",
            };
            tx.execute(sql, &[&(p % self.modulo), &p]).await?;
            Ok(())
        })
    }
}

/// A rebuild drops the keys a projection names as only its live writes'
/// and adds them once its tables are full; it refuses a name that is not
/// a primary key of its schema, and fails (the live table as it was) when
/// a row was written twice under one.
#[tokio::test]
async fn a_rebuild_adds_its_deferred_keys_at_the_end_and_fails_on_a_row_written_twice() {
    let setup = setup_runtime().await;
    open_deals(&setup.store, Uuid::now_v7(), 300, 1_000).await;
    let client = setup.db.client().await;
    let keyed = |keys, modulo| Arc::new(KeyedLog { keys, modulo });
    crm_projections::ensure_schema(&client, keyed(&["keyed_log_pkey"], 1_000).as_ref())
        .await
        .unwrap();
    client
        .batch_execute("INSERT INTO keyed_log (k, v) VALUES (-1, -1)")
        .await
        .unwrap();
    let live = || first_column::<i64>(&client, "SELECT k FROM keyed_log ORDER BY k");
    let error = rebuild_in(&setup, keyed(&["keyed_log_by_nothing"], 1_000))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            crm_projections::RebuildError::NotARebuildKey {
                projection: "keyed_log",
                key: "keyed_log_by_nothing"
            }
        ),
        "{error}"
    );
    // Events 251 to 300 write the keys of events 1 to 50 again.
    let error = rebuild_in(&setup, keyed(&["keyed_log_pkey"], 250))
        .await
        .unwrap_err();
    assert!(format!("{error:?}").contains("keyed_log_pkey"), "{error:?}");
    assert_eq!(live().await, vec![-1], "the live table as it was");
    let swapped = rebuild_in(&setup, keyed(&["keyed_log_pkey"], 1_000))
        .await
        .unwrap();
    assert_eq!(swapped, 300);
    assert_eq!(live().await, (1..=300).collect::<Vec<i64>>());
    let key: String = client
        .query_one(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE conrelid = 'public.keyed_log'::regclass AND contype = 'p' \
               AND conname = 'keyed_log_pkey'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(key, "PRIMARY KEY (k)");
    setup.store.shutdown().await;
}

/// A read model that names, among the indexes only its queries use, the
/// ones given.
struct NamesQueryIndexes(&'static [&'static str]);

impl crm_projections::Projection for NamesQueryIndexes {
    crm_projections::projection_names!(
        "names_query_indexes",
        "CREATE TABLE IF NOT EXISTS names_query_indexes (
            position bigint PRIMARY KEY,
            stream   uuid   NOT NULL
        );
        CREATE INDEX IF NOT EXISTS names_query_indexes_by_stream
            ON names_query_indexes (stream)",
        ["names_query_indexes"]
    );

    fn query_indexes(&self) -> &'static [&'static str] {
        self.0
    }

    fn apply<'a>(
        &'a self,
        tx: &'a crm_projections::Tx<'_>,
        event: &'a crm_event_store::RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            tx.execute(
                "INSERT INTO names_query_indexes (position, stream) VALUES ($1, $2)",
                &[
                    &i64::try_from(event.global_position).unwrap(),
                    &event.stream_id,
                ],
            )
            .await?;
            Ok(())
        })
    }
}

/// A rebuild refuses, before it reads anything, a projection that names
/// among its query indexes one its schema does not create, or its primary
/// key (which must hold while rows go in); the live table stays as it was,
/// and the next attempt is not locked out.
#[tokio::test]
async fn a_rebuild_refuses_a_query_index_that_is_missing_or_unique() {
    let setup = setup_runtime().await;
    let pipeline = Uuid::now_v7();
    open_deals(&setup.store, pipeline, 2, 1_000).await;
    let client = setup.db.client().await;
    crm_projections::ensure_schema(&client, &NamesQueryIndexes(&[]))
        .await
        .unwrap();
    client
        .batch_execute(
            "INSERT INTO names_query_indexes (position, stream) \
             VALUES (42, '0190d1a0-0000-7000-8000-000000000000')",
        )
        .await
        .unwrap();
    for (names, refused) in [
        (
            &[
                "names_query_indexes_by_stream",
                "names_query_indexes_by_nothing",
            ][..],
            "names_query_indexes_by_nothing",
        ),
        (
            &["names_query_indexes_pkey"][..],
            "names_query_indexes_pkey",
        ),
    ] {
        let names: &'static [&'static str] = Box::leak(names.to_vec().into_boxed_slice());
        for attempt in 1..=2 {
            let error = rebuild_in(&setup, Arc::new(NamesQueryIndexes(names)))
                .await
                .unwrap_err();
            match &error {
                crm_projections::RebuildError::NotAQueryIndex { projection, index } => {
                    assert_eq!(*projection, "names_query_indexes");
                    assert_eq!(*index, refused, "attempt {attempt}");
                }
                other => panic!("expected a refused query index, got {other}"),
            }
            assert!(error.to_string().contains(refused), "{error}");
        }
        let rows: Vec<i64> =
            first_column(&client, "SELECT position FROM names_query_indexes").await;
        assert_eq!(rows, vec![42], "the live table as it was");
    }
    // Named right, it rebuilds, with its query index created at the end.
    let swapped = rebuild_in(
        &setup,
        Arc::new(NamesQueryIndexes(&["names_query_indexes_by_stream"])),
    )
    .await
    .unwrap();
    assert_eq!(swapped, 2);
    assert_eq!(rows_in(&setup, "names_query_indexes").await, 2);
    let indexes: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public' \
             AND indexname = 'names_query_indexes_by_stream'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(indexes, 1);
    setup.store.shutdown().await;
}

/// A read model that updates a few rows again and again: the queued
/// UPDATEs of one statement go out gathered, several per key.
struct Tallies;

impl crm_projections::Projection for Tallies {
    crm_projections::projection_names!(
        "tallies",
        "CREATE TABLE IF NOT EXISTS tallies (
            k    bigint PRIMARY KEY,
            n    bigint NOT NULL,
            last bigint NOT NULL
        );
        CREATE TABLE IF NOT EXISTS tally_log (
            position bigint PRIMARY KEY,
            k        bigint NOT NULL
        )",
        ["tallies", "tally_log"]
    );

    fn apply<'a>(
        &'a self,
        tx: &'a crm_projections::Tx<'_>,
        event: &'a crm_event_store::RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            let position = i64::try_from(event.global_position).unwrap();
            let k = position % 3;
            if position <= 3 {
                tx.execute("INSERT INTO tallies (k, n, last) VALUES ($1, 0, 0)", &[&k])
                    .await?;
            }
            tx.execute(
                "UPDATE tallies SET n = n + 1, last = $2 WHERE k = $1 AND n >= 0",
                &[&k, &position],
            )
            .await?;
            // Another table between them: the UPDATEs still gather.
            tx.execute(
                "INSERT INTO tally_log (position, k) VALUES ($1, $2)",
                &[&position, &k],
            )
            .await?;
            Ok(())
        })
    }
}

/// `events` stored events rebuilt into `projection` in chunks of 100 (ten:
/// every write in one queue); the setup and a client of its database.
async fn rebuilt_over(
    projection: Arc<dyn crm_projections::Projection>,
    events: i64,
) -> (Setup, tokio_postgres::Client) {
    let setup = setup_runtime().await;
    open_deals(&setup.store, Uuid::now_v7(), events as usize, 1_000).await;
    let swapped_at = rebuild_in(&setup, projection).await.unwrap();
    assert_eq!(swapped_at, events as u64);
    let client = setup.db.client().await;
    (setup, client)
}

/// `table`'s rows as pairs of the columns `k` and `column`, by `k`.
async fn pairs<B: for<'a> tokio_postgres::types::FromSql<'a>>(
    client: &tokio_postgres::Client,
    table: &str,
    column: &str,
) -> Vec<(i64, B)> {
    client
        .query(&format!("SELECT k, {column} FROM {table} ORDER BY k"), &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// The rows (k, n, last) of a tally table, by k.
async fn tallies(client: &tokio_postgres::Client, table: &str) -> Vec<(i64, i64, i64)> {
    client
        .query(&format!("SELECT k, n, last FROM {table} ORDER BY k"), &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

#[tokio::test]
async fn gathered_updates_of_one_row_apply_in_order_each_once() {
    // One chunk: events 4 to 10 update the three rows in one queue.
    let (setup, client) = rebuilt_over(Arc::new(Tallies), 10).await;
    let rows = tallies(&client, "tallies").await;
    // k = position % 3: 0 <- 3, 6, 9; 1 <- 1, 4, 7, 10; 2 <- 2, 5, 8.
    assert_eq!(rows, vec![(0, 3, 9), (1, 4, 10), (2, 3, 8)]);
    let logged: i64 = client
        .query_one("SELECT count(*) FROM tally_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 10);
    setup.store.shutdown().await;
}

/// A read model whose inserts meet keys already there in every way a
/// rebuild's record of keys must follow: `DO NOTHING` and `DO UPDATE` of
/// keys written before (in the same chunk and in earlier ones), a keyed
/// DELETE after which the key is inserted again, and, late, an
/// `INSERT ... SELECT` (sent alone) that adds keys the next inserts meet;
/// and a read that moves a key (`UPDATE ... RETURNING`) right behind the
/// first queued insert of its table.
struct Rekeyed;

/// Events of [`Rekeyed`]'s test; the `INSERT ... SELECT` comes at
/// [`REKEYED_COPY_AT`].
const REKEYED_EVENTS: i64 = 300;
const REKEYED_COPY_AT: i64 = 250;

impl crm_projections::Projection for Rekeyed {
    crm_projections::projection_names!(
        "rekeyed",
        "CREATE TABLE IF NOT EXISTS rekeyed_firsts (k bigint PRIMARY KEY, v bigint NOT NULL);
        CREATE TABLE IF NOT EXISTS rekeyed_lasts (k bigint PRIMARY KEY, v bigint NOT NULL);
        CREATE TABLE IF NOT EXISTS rekeyed_moved (k bigint PRIMARY KEY, v bigint NOT NULL)",
        ["rekeyed_firsts", "rekeyed_lasts", "rekeyed_moved"]
    );

    fn apply<'a>(
        &'a self,
        tx: &'a crm_projections::Tx<'_>,
        event: &'a crm_event_store::RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            let p = i64::try_from(event.global_position).unwrap();
            let first = "INSERT INTO rekeyed_firsts (k, v) VALUES ($1, $2) \
                         ON CONFLICT (k) DO NOTHING";
            tx.execute(first, &[&(p % 5), &p]).await?;
            tx.execute(
                "INSERT INTO rekeyed_lasts (k, v) VALUES ($1, $2) \
                 ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
                &[&(p % 7), &p],
            )
            .await?;
            if p % 11 == 0 {
                tx.execute("DELETE FROM rekeyed_firsts WHERE k = $1", &[&((p + 1) % 5)])
                    .await?;
            }
            if p == REKEYED_COPY_AT {
                tx.execute(
                    "INSERT INTO rekeyed_firsts (k, v) SELECT k + 100, v FROM rekeyed_firsts",
                    &[],
                )
                .await?;
            }
            if p > REKEYED_COPY_AT {
                tx.execute(first, &[&(100 + p % 5), &p]).await?;
            }
            let moved = "INSERT INTO rekeyed_moved (k, v) VALUES ($1, $2) \
                         ON CONFLICT (k) DO NOTHING";
            if p == 1 {
                tx.execute(moved, &[&1i64, &p]).await?;
                tx.query_opt(
                    "UPDATE rekeyed_moved SET k = 100 WHERE k = $1 RETURNING v",
                    &[&1i64],
                )
                .await?;
            }
            if p == 2 {
                tx.execute(moved, &[&100i64, &p]).await?;
            }
            Ok(())
        })
    }
}

/// A table's (k, v) rows, by k.
type KeyValues = Vec<(i64, i64)>;

/// [`Rekeyed`]'s tables as its statements leave them, worked out here.
fn rekeyed_expected() -> (KeyValues, KeyValues) {
    use std::collections::BTreeMap;
    let (mut firsts, mut lasts) = (BTreeMap::new(), BTreeMap::new());
    for p in 1..=REKEYED_EVENTS {
        firsts.entry(p % 5).or_insert(p);
        lasts.insert(p % 7, p);
        if p % 11 == 0 {
            firsts.remove(&((p + 1) % 5));
        }
        if p == REKEYED_COPY_AT {
            let copies: Vec<(i64, i64)> = firsts.iter().map(|(k, v)| (k + 100, *v)).collect();
            firsts.extend(copies);
        }
        if p > REKEYED_COPY_AT {
            firsts.entry(100 + p % 5).or_insert(p);
        }
    }
    (firsts.into_iter().collect(), lasts.into_iter().collect())
}

/// A rebuild sends the inserts of keys its fresh tables do not hold yet
/// without a conflict check; keys already there, deleted, or added by a
/// statement it cannot follow still end as the statements say, over
/// three chunks of 100 events.
#[tokio::test]
async fn a_rebuild_that_skips_conflict_checks_for_new_keys_leaves_every_row_as_its_statements_say()
{
    let (setup, client) = rebuilt_over(Arc::new(Rekeyed), REKEYED_EVENTS).await;
    let rows = |table| pairs::<i64>(&client, table, "v");
    let (firsts, lasts) = rekeyed_expected();
    // Deleted keys came back: none is missing for good.
    assert_eq!(firsts.len(), 10);
    assert_eq!(rows("rekeyed_firsts").await, firsts);
    assert_eq!(rows("rekeyed_lasts").await, lasts);
    // Key 1 moved to 100 at event 1; event 2's insert of 100 does nothing.
    assert_eq!(rows("rekeyed_moved").await, vec![(100, 1)]);
    setup.store.shutdown().await;
}

/// A read model whose new rows' keys are updated before the rows are
/// inserted, in the same chunk: an UPDATE that finds no row must stay
/// ahead of the insert of its key, however the rebuild moves new rows
/// ahead of the updates of other keys. `visits`: each event closes the
/// row of the event before (a row of an earlier chunk at a chunk's start),
/// "closes" the row of the event after (not there yet: no effect), and
/// inserts its own. `lone`: once per chunk, one such early UPDATE alone.
/// `spans`: only the row of the event before is closed, so the new rows
/// of a chunk go ahead of the UPDATE of the last row of the chunk before,
/// with the closing UPDATEs of the chunk folded into them.
struct EarlyUpdates;

/// Events of [`EarlyUpdates`]'s test (three chunks of 100).
const EARLY_EVENTS: i64 = 300;

impl crm_projections::Projection for EarlyUpdates {
    crm_projections::projection_names!(
        "early_updates",
        "CREATE TABLE IF NOT EXISTS early_visits (k bigint PRIMARY KEY, closed bigint);
        CREATE TABLE IF NOT EXISTS early_lone (k bigint PRIMARY KEY, closed bigint);
        CREATE TABLE IF NOT EXISTS early_spans (k bigint PRIMARY KEY, closed bigint)",
        ["early_visits", "early_lone", "early_spans"]
    );

    fn apply<'a>(
        &'a self,
        tx: &'a crm_projections::Tx<'_>,
        event: &'a crm_event_store::RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            let p = i64::try_from(event.global_position).unwrap();
            let close = "UPDATE early_visits SET closed = $2 WHERE k = $1";
            tx.execute(close, &[&(p - 1), &p]).await?;
            tx.execute(close, &[&(p + 1), &p]).await?;
            tx.execute(
                "INSERT INTO early_visits (k, closed) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING",
                &[&p, &None::<i64>],
            )
            .await?;
            if p % 100 == 50 {
                tx.execute(
                    "UPDATE early_lone SET closed = $2 WHERE k = $1",
                    &[&(p + 1), &p],
                )
                .await?;
            }
            tx.execute(
                "INSERT INTO early_lone (k, closed) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING",
                &[&p, &None::<i64>],
            )
            .await?;
            tx.execute(
                "UPDATE early_spans SET closed = $2 WHERE k = $1",
                &[&(p - 1), &p],
            )
            .await?;
            tx.execute(
                "INSERT INTO early_spans (k, closed) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING",
                &[&p, &None::<i64>],
            )
            .await?;
            Ok(())
        })
    }
}

/// Rows 1 to `events`, each closed by the event after it; the last open.
fn closed_by_the_next(events: i64) -> Vec<(i64, Option<i64>)> {
    (1..=events)
        .map(|k| (k, (k < events).then_some(k + 1)))
        .collect()
}

/// Rows 1 to `events`, each with its column still NULL.
fn untouched(events: i64) -> Vec<(i64, Option<i64>)> {
    (1..=events).map(|k| (k, None)).collect()
}

#[tokio::test]
async fn a_rebuild_keeps_an_update_that_found_no_row_ahead_of_the_insert_of_its_key() {
    let (setup, client) = rebuilt_over(Arc::new(EarlyUpdates), EARLY_EVENTS).await;
    let rows = |table| pairs::<Option<i64>>(&client, table, "closed");
    let visits = closed_by_the_next(EARLY_EVENTS);
    assert_eq!(rows("early_visits").await, visits);
    assert_eq!(rows("early_spans").await, visits);
    assert_eq!(rows("early_lone").await, untouched(EARLY_EVENTS));
    setup.store.shutdown().await;
}

/// A read model whose UPDATE names its key in a parameter of another type
/// (`int4`) than its inserts (`int8`): the same key, other bytes. The
/// UPDATE finds no row (its key's insert comes after it) and must stay
/// ahead of that insert.
struct MixedKeyTypes;

impl crm_projections::Projection for MixedKeyTypes {
    crm_projections::projection_names!(
        "mixed_key_types",
        "CREATE TABLE IF NOT EXISTS mixed_keys (k bigint PRIMARY KEY, v bigint NOT NULL)",
        ["mixed_keys"]
    );

    fn apply<'a>(
        &'a self,
        tx: &'a crm_projections::Tx<'_>,
        event: &'a crm_event_store::RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            let p = i64::try_from(event.global_position).unwrap();
            let insert = "INSERT INTO mixed_keys (k, v) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING";
            tx.execute(insert, &[&(p + 1_000), &p]).await?;
            tx.execute(
                "UPDATE mixed_keys SET v = $2 WHERE k = $1::int4",
                &[&i32::try_from(p).unwrap(), &-1_i64],
            )
            .await?;
            tx.execute(insert, &[&p, &p]).await?;
            Ok(())
        })
    }
}

#[tokio::test]
async fn writes_of_one_key_in_parameters_of_other_types_keep_their_order() {
    let (setup, client) = rebuilt_over(Arc::new(MixedKeyTypes), 150).await;
    let updated: i64 = client
        .query_one("SELECT count(*) FROM mixed_keys WHERE v = -1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(updated, 0, "every UPDATE came before its key's row");
    setup.store.shutdown().await;
}

/// A read model of tables without a key: `plain_log` only gets rows,
/// which a rebuild sends by COPY; in `plain_visits` each event first marks
/// the row of the event after as seen early (not there yet: no effect),
/// then closes the row of the event before, then adds its own, and no row
/// may go ahead of an UPDATE queued before it.
struct PlainRows;

impl crm_projections::Projection for PlainRows {
    crm_projections::projection_names!(
        "plain_rows",
        "CREATE TABLE IF NOT EXISTS plain_log (k bigint NOT NULL, v text NOT NULL);
        CREATE TABLE IF NOT EXISTS plain_visits (k bigint NOT NULL, closed bigint, early bigint)",
        ["plain_log", "plain_visits"]
    );

    fn apply<'a>(
        &'a self,
        tx: &'a crm_projections::Tx<'_>,
        event: &'a crm_event_store::RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            let p = i64::try_from(event.global_position).unwrap();
            tx.execute(
                "INSERT INTO plain_log (k, v) VALUES ($1, $2)",
                &[&p, &format!("event {p}")],
            )
            .await?;
            tx.execute(
                "UPDATE plain_visits SET early = $2 WHERE k = $1",
                &[&(p + 1), &p],
            )
            .await?;
            tx.execute(
                "UPDATE plain_visits SET closed = $2 WHERE k = $1",
                &[&(p - 1), &p],
            )
            .await?;
            tx.execute(
                "INSERT INTO plain_visits (k, closed) VALUES ($1, $2)",
                &[&p, &None::<i64>],
            )
            .await?;
            Ok(())
        })
    }
}

#[tokio::test]
async fn a_rebuild_sends_the_rows_of_a_table_without_a_key_in_order_with_its_updates() {
    let (setup, client) = rebuilt_over(Arc::new(PlainRows), EARLY_EVENTS).await;
    let log: Vec<(i64, String)> = (1..=EARLY_EVENTS)
        .map(|k| (k, format!("event {k}")))
        .collect();
    assert_eq!(pairs::<String>(&client, "plain_log", "v").await, log);
    // Each visit closed by the event after it; the last one open; none
    // marked by the event before it.
    let visits = |column| pairs::<Option<i64>>(&client, "plain_visits", column);
    assert_eq!(visits("closed").await, closed_by_the_next(EARLY_EVENTS));
    assert_eq!(visits("early").await, untouched(EARLY_EVENTS));
    setup.store.shutdown().await;
}

/// A read model whose rows are inserted, then updated by key in the same
/// chunk, in every way a rebuild's folding of UPDATEs into the plain
/// INSERT of a new row must get right: UPDATEs of some columns and of
/// others, to NULL, an UPDATE that reads the row (`c = c + $2`, which
/// does not fold and ends what may fold behind it), a delete and a new
/// insert of the key with an UPDATE after it, an UPDATE of a row that a
/// `DO NOTHING` insert met already there (which must still apply), and an
/// UPDATE by a NULL key (which finds no row). `folded_whole`'s rows are
/// each inserted and updated within one chunk, nothing else.
struct Folded;

/// Events of [`Folded`]'s test (three chunks of 100; a key's four events
/// fall in one chunk, but for the repeat inserts of earlier keys).
const FOLDED_EVENTS: i64 = 300;

/// A row of [`Folded`]'s table: (k, a, b, c).
type FoldedRow = (i64, Option<i64>, Option<String>, i64);

impl crm_projections::Projection for Folded {
    crm_projections::projection_names!(
        "folded",
        "CREATE TABLE IF NOT EXISTS folded (
            k bigint PRIMARY KEY,
            a bigint,
            b text,
            c bigint NOT NULL
        );
        CREATE TABLE IF NOT EXISTS folded_whole (
            k bigint PRIMARY KEY,
            a bigint,
            b text
        )",
        ["folded", "folded_whole"]
    );

    fn apply<'a>(
        &'a self,
        tx: &'a crm_projections::Tx<'_>,
        event: &'a crm_event_store::RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            let p = i64::try_from(event.global_position).unwrap();
            let (k, step) = ((p - 1) / 4, (p - 1) % 4);
            let insert = "INSERT INTO folded (k, a, b, c) VALUES ($1, $2, $3, $4) \
                          ON CONFLICT (k) DO NOTHING";
            let set_ab = "UPDATE folded SET a = $2, b = $3 WHERE k = $1";
            let set_c = "UPDATE folded SET c = $2 WHERE k = $1";
            match step {
                0 => {
                    tx.execute(insert, &[&k, &p, &None::<String>, &0i64])
                        .await?;
                }
                1 => tx.execute(set_ab, &[&k, &p, &format!("b{p}")]).await?,
                2 if k % 3 == 0 => {
                    tx.execute("UPDATE folded SET c = c + $2 WHERE k = $1", &[&k, &p])
                        .await?
                }
                2 => tx.execute(set_c, &[&k, &p]).await?,
                _ => {
                    tx.execute(set_ab, &[&k, &-p, &None::<String>]).await?;
                    if k % 5 == 0 {
                        tx.execute("DELETE FROM folded WHERE k = $1", &[&k]).await?;
                        tx.execute(insert, &[&k, &p, &"again", &1i64]).await?;
                        tx.execute(set_c, &[&k, &(p * 10)]).await?;
                    }
                }
            };
            if p % 10 == 7 && k >= 1 {
                tx.execute(insert, &[&(k - 1), &0i64, &"dup", &0i64])
                    .await?;
                tx.execute(set_c, &[&(k - 1), &(p + 1000)]).await?;
            }
            if p % 25 == 0 {
                tx.execute(set_ab, &[&None::<i64>, &p, &"nobody"]).await?;
            }
            let whole = match step {
                0 => {
                    "INSERT INTO folded_whole (k, a, b) VALUES ($1, $2, $3) \
                      ON CONFLICT (k) DO NOTHING"
                }
                _ => "UPDATE folded_whole SET a = $2, b = $3 WHERE k = $1",
            };
            let b = (step > 0).then(|| format!("w{p}"));
            tx.execute(whole, &[&k, &p, &b]).await?;
            Ok(())
        })
    }
}

/// [`Folded`]'s two tables as its statements leave them, worked out here.
fn folded_expected() -> (Vec<FoldedRow>, Vec<(i64, i64, String)>) {
    use std::collections::BTreeMap;
    let mut rows: BTreeMap<i64, (Option<i64>, Option<String>, i64)> = BTreeMap::new();
    let mut whole = BTreeMap::new();
    for p in 1..=FOLDED_EVENTS {
        let (k, step) = ((p - 1) / 4, (p - 1) % 4);
        match step {
            0 => {
                rows.entry(k).or_insert((Some(p), None, 0));
            }
            1 => {
                let row = rows.get_mut(&k).unwrap();
                (row.0, row.1) = (Some(p), Some(format!("b{p}")));
            }
            2 if k % 3 == 0 => rows.get_mut(&k).unwrap().2 += p,
            2 => rows.get_mut(&k).unwrap().2 = p,
            _ => {
                let row = rows.get_mut(&k).unwrap();
                (row.0, row.1) = (Some(-p), None);
                if k % 5 == 0 {
                    rows.insert(k, (Some(p), Some("again".into()), p * 10));
                }
            }
        }
        if p % 10 == 7 && k >= 1 {
            rows.get_mut(&(k - 1)).unwrap().2 = p + 1000;
        }
        whole.insert(k, (p, format!("w{p}")));
    }
    (
        rows.into_iter()
            .map(|(k, (a, b, c))| (k, a, b, c))
            .collect(),
        whole.into_iter().map(|(k, (a, b))| (k, a, b)).collect(),
    )
}

/// A rebuild folds a keyed UPDATE of a row inserted earlier in its chunk
/// into that row's insert, and every row still ends as its statements say.
#[tokio::test]
async fn a_rebuild_that_folds_updates_into_the_insert_of_a_new_row_leaves_every_row_as_its_statements_say()
 {
    let (setup, client) = rebuilt_over(Arc::new(Folded), FOLDED_EVENTS).await;
    let (rows, whole) = folded_expected();
    assert_eq!(rows.len(), 75);
    let stored: Vec<FoldedRow> = client
        .query("SELECT k, a, b, c FROM folded ORDER BY k", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    assert_eq!(stored, rows);
    let stored: Vec<(i64, i64, String)> = client
        .query("SELECT k, a, b FROM folded_whole ORDER BY k", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(stored, whole);
    // Each of its 75 rows written once: inserted into the first 75 slots
    // of its first page, never updated (an UPDATE leaves a new version in
    // another slot).
    let last: String = client
        .query_one("SELECT max(ctid)::text FROM folded_whole", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(last, "(0,75)");
    setup.store.shutdown().await;
}

/// SQL for a test read model: a one-row table `$counter` (column `n`) that
/// a trigger on `$table` adds one to per `$each` (`ROW` or `STATEMENT`) of
/// the `$events` written. Read models have no triggers; these only count.
macro_rules! counted_by_trigger {
    ($counter:literal, $events:literal, $table:literal, $each:literal) => {
        concat!(
            "CREATE TABLE IF NOT EXISTS ",
            $counter,
            " (n bigint NOT NULL);
            INSERT INTO ",
            $counter,
            " SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM ",
            $counter,
            ");
            CREATE OR REPLACE FUNCTION ",
            $counter,
            "_counted() RETURNS trigger LANGUAGE plpgsql AS
                'BEGIN UPDATE ",
            $counter,
            " SET n = n + 1; RETURN NULL; END';
            CREATE OR REPLACE TRIGGER ",
            $counter,
            "_counted AFTER ",
            $events,
            " ON ",
            $table,
            "
                FOR EACH ",
            $each,
            " EXECUTE FUNCTION ",
            $counter,
            "_counted()"
        )
    };
}

/// What the trigger of [`counted_by_trigger`] counted in `counter`.
async fn counted(client: &tokio_postgres::Client, counter: &str) -> i64 {
    client
        .query_one(&format!("SELECT n FROM {counter}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// A read model whose rows are rewritten at every event: an upsert of the
/// row but for a column it sets only when it inserts (`since`), and an
/// insert of a key's first event (both collapse), with
/// one write of another statement between two upserts of one key. A
/// trigger counts the row versions written (read models have none; this
/// one only counts).
struct Latest;

impl crm_projections::Projection for Latest {
    crm_projections::projection_names!(
        "latest",
        concat!(
            "CREATE TABLE IF NOT EXISTS latest (
            k     bigint PRIMARY KEY,
            v     bigint NOT NULL,
            at    bigint NOT NULL,
            since bigint NOT NULL
        );
        CREATE TABLE IF NOT EXISTS latest_first (
            k     bigint PRIMARY KEY,
            first bigint NOT NULL
        );
        CREATE TABLE IF NOT EXISTS latest_nulls (
            k  bigint UNIQUE,
            at bigint NOT NULL
        );",
            counted_by_trigger!("latest_writes", "INSERT OR UPDATE", "latest", "ROW")
        ),
        ["latest", "latest_first", "latest_nulls", "latest_writes"]
    );

    fn apply<'a>(
        &'a self,
        tx: &'a crm_projections::Tx<'_>,
        event: &'a crm_event_store::RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            let position = i64::try_from(event.global_position).unwrap();
            let k = position % 3;
            tx.execute(
                "INSERT INTO latest (k, v, at, since) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v, at = EXCLUDED.at",
                &[&k, &(position * 10), &position, &position],
            )
            .await?;
            tx.execute(
                "INSERT INTO latest_first (k, first) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING",
                &[&k, &position],
            )
            .await?;
            if position <= 2 {
                // A NULL key conflicts with nothing: two rows.
                tx.execute(
                    "INSERT INTO latest_nulls (k, at) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING",
                    &[&None::<i64>, &position],
                )
                .await?;
            }
            if position == 5 {
                // k = 2: between its upserts at 2 and 5 and the one at 8.
                tx.execute("UPDATE latest SET v = v + 1 WHERE k = $1", &[&k])
                    .await?;
            }
            Ok(())
        })
    }
}

#[tokio::test]
async fn rows_rewritten_at_every_event_go_out_once_as_they_end_up() {
    // One chunk: all ten events' writes in one queue.
    let (setup, client) = rebuilt_over(Arc::new(Latest), 10).await;
    let rows: Vec<(i64, i64, i64, i64)> = client
        .query("SELECT k, v, at, since FROM latest ORDER BY k", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    // k = position % 3: 0 <- 3, 6, 9; 1 <- 1, 4, 7, 10; 2 <- 2, 5, +1, 8
    // (the upsert at 8 comes after the +1, so it decides); `since` is the
    // first upsert's.
    assert_eq!(rows, vec![(0, 90, 9, 3), (1, 100, 10, 1), (2, 80, 8, 2)]);
    let first: Vec<(i64, i64)> = client
        .query("SELECT k, first FROM latest_first ORDER BY k", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(first, vec![(0, 3), (1, 1), (2, 2)]);
    let nulls: i64 = client
        .query_one("SELECT count(*) FROM latest_nulls", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(nulls, 2, "writes of a NULL key are not one row");
    // Row versions written: one per key for 0 and 1; for 2 the upserts at
    // 2 and 5 as one, the +1, the upsert at 8. One per write would be 11.
    let written = counted(&client, "latest_writes").await;
    assert_eq!(written, 5);
    setup.store.shutdown().await;
}

/// Visits of two keys, as `stage_visit` keeps them: each event closes its
/// key's open visit (an UPDATE by the key alone) and opens one (an INSERT
/// by key and visit). A statement-level trigger counts the statements.
struct Visits;

impl crm_projections::Projection for Visits {
    crm_projections::projection_names!(
        "visits",
        concat!(
            "CREATE TABLE IF NOT EXISTS visits (
            k      bigint NOT NULL,
            v      bigint NOT NULL,
            closed bigint,
            PRIMARY KEY (k, v)
        );",
            counted_by_trigger!(
                "visit_statements",
                "INSERT OR UPDATE",
                "visits",
                "STATEMENT"
            )
        ),
        ["visits", "visit_statements"]
    );

    fn apply<'a>(
        &'a self,
        tx: &'a crm_projections::Tx<'_>,
        event: &'a crm_event_store::RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            let position = i64::try_from(event.global_position).unwrap();
            let k = position % 2;
            // The first write names key and visit; the next, the key alone.
            if position > 1 {
                tx.execute(
                    "UPDATE visits SET closed = $2 WHERE k = $1 AND closed IS NULL",
                    &[&k, &position],
                )
                .await?;
            }
            let open = "INSERT INTO visits (k, v) VALUES ($1, $2) ON CONFLICT (k, v) DO NOTHING";
            tx.execute(open, &[&k, &position]).await?;
            if position == 10 {
                // Right after a visit of the same key by the same
                // statement: another row, which it does not stand for.
                tx.execute(open, &[&k, &100i64]).await?;
            }
            Ok(())
        })
    }
}

#[tokio::test]
async fn writes_that_name_more_columns_gather_with_those_of_fewer_in_order() {
    let (setup, client) = rebuilt_over(Arc::new(Visits), 10).await;
    let visits: Vec<(i64, i64, Option<i64>)> = client
        .query("SELECT k, v, closed FROM visits ORDER BY k, v", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    // Each visit closed by its key's next event, the last one open.
    let expected = [
        (0, 2, Some(4)),
        (0, 4, Some(6)),
        (0, 6, Some(8)),
        (0, 8, Some(10)),
        (0, 10, None),
        (0, 100, None),
        (1, 1, Some(3)),
        (1, 3, Some(5)),
        (1, 5, Some(7)),
        (1, 7, Some(9)),
        (1, 9, None),
    ];
    assert_eq!(visits, expected);
    // Told apart by the key alone, the two keys' writes pair up: the first
    // insert, then per two events one UPDATE and one INSERT (one each for
    // the last event, and one for the extra visit). One statement per
    // write would be 20.
    let statements = counted(&client, "visit_statements").await;
    assert_eq!(statements, 12);
    setup.store.shutdown().await;
}

/// Rows about three streams, replaced at every event of a stream (as
/// `c360_about` keeps them): a DELETE of the stream's rows, then two
/// INSERTs. A statement-level trigger counts the statements.
struct Abouts;

impl crm_projections::Projection for Abouts {
    crm_projections::projection_names!(
        "abouts",
        concat!(
            "CREATE TABLE IF NOT EXISTS abouts (
            s bigint NOT NULL,
            a bigint NOT NULL,
            PRIMARY KEY (s, a)
        );",
            counted_by_trigger!(
                "about_statements",
                "INSERT OR DELETE",
                "abouts",
                "STATEMENT"
            )
        ),
        ["abouts", "about_statements"]
    );

    fn apply<'a>(
        &'a self,
        tx: &'a crm_projections::Tx<'_>,
        event: &'a crm_event_store::RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            let position = i64::try_from(event.global_position).unwrap();
            let stream = position % 3;
            tx.execute("DELETE FROM abouts WHERE s = $1", &[&stream])
                .await?;
            for about in [position, position + 100] {
                tx.execute(
                    "INSERT INTO abouts (s, a) VALUES ($1, $2) ON CONFLICT (s, a) DO NOTHING",
                    &[&stream, &about],
                )
                .await?;
            }
            Ok(())
        })
    }
}

#[tokio::test]
async fn rows_deleted_and_written_again_per_key_gather_in_order() {
    let (setup, client) = rebuilt_over(Arc::new(Abouts), 10).await;
    let rows: Vec<(i64, i64)> = client
        .query("SELECT s, a FROM abouts ORDER BY s, a", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    // What each stream's last event wrote: 9, 10 and 8.
    assert_eq!(
        rows,
        vec![(0, 9), (0, 109), (1, 10), (1, 110), (2, 8), (2, 108)]
    );
    // Per three events (one of each stream): one DELETE, then the first
    // INSERTs, then the second ones. One statement per write would be 30.
    let statements = counted(&client, "about_statements").await;
    assert_eq!(statements, 12);
    setup.store.shutdown().await;
}

/// Two read models written in an order that only some tables allow to
/// change: `scoped_tallies` (its only unique index is its key) gets each
/// key's INSERT between the UPDATEs of other keys; `ledger` also has a
/// unique `code`, which one key frees before another takes it (by an
/// INSERT, then by an UPDATE).
struct Ledger;

impl crm_projections::Projection for Ledger {
    crm_projections::projection_names!(
        "ledger",
        "CREATE TABLE IF NOT EXISTS scoped_tallies (
            k    bigint PRIMARY KEY,
            n    bigint NOT NULL,
            last bigint NOT NULL
        );
        CREATE TABLE IF NOT EXISTS ledger (
            k    bigint PRIMARY KEY,
            code text NOT NULL UNIQUE
        )",
        ["scoped_tallies", "ledger"]
    );

    fn apply<'a>(
        &'a self,
        tx: &'a crm_projections::Tx<'_>,
        event: &'a crm_event_store::RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            let position = i64::try_from(event.global_position).unwrap();
            let k = (position + 1) / 2;
            let update = "UPDATE scoped_tallies SET n = n + 1, last = $2 WHERE k = $1";
            if position == 1 {
                // Before the row exists: changes nothing, but opens the
                // UPDATEs' first gathering ahead of the INSERTs' one, which
                // later keys' UPDATEs must not join.
                tx.execute(update, &[&k, &position]).await?;
            }
            if position % 2 == 1 {
                tx.execute(
                    "INSERT INTO scoped_tallies (k, n, last) VALUES ($1, 0, 0) \
                     ON CONFLICT (k) DO NOTHING",
                    &[&k],
                )
                .await?;
            }
            tx.execute(update, &[&k, &position]).await?;
            let insert = "INSERT INTO ledger (k, code) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING";
            match position {
                1 => tx.execute(insert, &[&1i64, &"x"]).await?,
                2 => {
                    tx.execute("UPDATE ledger SET code = $2 WHERE k = $1", &[&1i64, &"y"])
                        .await?
                }
                3 => tx.execute(insert, &[&2i64, &"x"]).await?,
                // One after the other these pass: k = 2 frees "x" for k = 1.
                4 => {
                    tx.execute("UPDATE ledger SET code = $2 WHERE k = $1", &[&2i64, &"w"])
                        .await?
                }
                5 => {
                    tx.execute("UPDATE ledger SET code = $2 WHERE k = $1", &[&1i64, &"x"])
                        .await?
                }
                _ => {}
            }
            Ok(())
        })
    }
}

#[tokio::test]
async fn scoped_writes_of_other_keys_pass_each_other_only_where_no_other_unique_index_forbids() {
    let (setup, client) = rebuilt_over(Arc::new(Ledger), 10).await;
    let tallies = tallies(&client, "scoped_tallies").await;
    // Every key inserted before its own two updates, whatever else moved.
    assert_eq!(tallies, (1..=5).map(|k| (k, 2, 2 * k)).collect::<Vec<_>>());
    let ledger: Vec<(i64, String)> = client
        .query("SELECT k, code FROM ledger ORDER BY k", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(ledger, vec![(1, "x".to_owned()), (2, "w".to_owned())]);
    setup.store.shutdown().await;
}

#[tokio::test]
async fn a_projector_whose_deferred_write_fails_stops_on_that_event() {
    let setup = setup_runtime().await;
    let positions = open_deals(&setup.store, Uuid::now_v7(), 3, 1_000).await;
    publish(&setup, &positions).await;
    let projector = projector_of(&setup, Arc::new(RefusesThree));
    // Event 3's insert is queued and fails when the batch's writes go out
    // before its commit: the projector stops on event 3, with 1 and 2
    // applied.
    tokio::time::timeout(
        Duration::from_secs(20),
        projector.run(CancellationToken::new()),
    )
    .await
    .expect("the projector stops on the failing write");
    let client = setup.db.client().await;
    let status = crm_projections::statuses(&client)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.name == "refuses_three")
        .unwrap();
    assert_eq!(
        (
            status.state.as_str(),
            status.position,
            status.error_position
        ),
        ("failed", 2, Some(3))
    );
    let error = status.last_error.unwrap_or_default();
    assert!(error.contains("check constraint"), "{error}");
    let rows: Vec<i64> = client
        .query("SELECT position FROM refuses_three ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(rows, vec![1, 2]);
    setup.store.shutdown().await;
}

#[tokio::test]
async fn operators_list_and_rebuild_projections_over_grpc() {
    use crm_proto::v1::projections_admin_client::ProjectionsAdminClient;
    use crm_proto::v1::{ListProjectionsRequest, RebuildProjectionRequest};
    use tokio_stream::StreamExt;
    let app = TestApp::spawn().await;
    let (account, pipeline) = setup(&app).await;
    let opened = app
        .opportunities()
        .open_opportunity(app.request(deal(&account, &pipeline)))
        .await
        .unwrap()
        .into_inner();
    let mut admin = ProjectionsAdminClient::new(app.channel.clone());
    fn with_role<T>(app: &TestApp, message: T, role: &str) -> tonic::Request<T> {
        let mut request = app.request(message);
        request
            .metadata_mut()
            .insert("x-roles", role.parse().unwrap());
        request
    }
    fn as_admin<T>(app: &TestApp, message: T) -> tonic::Request<T> {
        with_role(app, message, "operator")
    }
    let status = admin
        .list_projections(app.request(ListProjectionsRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // A tenant's admin does not operate what every tenant shares.
    let status = admin
        .rebuild_projection(with_role(
            &app,
            RebuildProjectionRequest {
                name: PIPELINE_BOARD.into(),
            },
            "admin",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let listed = eventually(Duration::from_secs(20), "the board to catch up", || {
        let mut admin = admin.clone();
        let request = as_admin(&app, ListProjectionsRequest {});
        async move {
            let reply = admin.list_projections(request).await.ok()?.into_inner();
            reply
                .projections
                .into_iter()
                .find(|p| p.name == PIPELINE_BOARD && p.position >= opened.global_position)
        }
    })
    .await;
    assert_eq!((listed.state.as_str(), listed.lag_events), ("running", 0));

    let mut progress = admin
        .rebuild_projection(as_admin(
            &app,
            RebuildProjectionRequest {
                name: PIPELINE_BOARD.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(message) = progress.next().await {
        last = Some(message.unwrap());
    }
    let last = last.expect("a last message");
    assert!(
        last.done && last.position >= opened.global_position,
        "{last:?}"
    );
    let status = admin
        .rebuild_projection(as_admin(
            &app,
            RebuildProjectionRequest {
                name: "nope".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // A process manager's effect is the commands it sent: never rebuilt.
    for name in [
        "sla_process",
        "customer_lifecycle",
        "router",
        "data_quality",
        "pipeline_follow",
    ] {
        let status = admin
            .rebuild_projection(as_admin(
                &app,
                RebuildProjectionRequest { name: name.into() },
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{name}");
    }
    // The board still answers, from the rebuilt tables (its columns in the
    // order the sales funnel knows).
    crate::support::reached(&app, "sales_funnel", opened.global_position).await;
    let board = SalesQueriesClient::new(app.channel.clone())
        .get_pipeline_board(app.request(board_request(&pipeline, opened.global_position)))
        .await
        .unwrap()
        .into_inner();
    let held: Vec<(&str, u64)> = board
        .stages
        .iter()
        .map(|c| (c.stage.as_str(), c.deal_count))
        .collect();
    assert_eq!(
        held,
        [("qualification", 1), ("proposal", 0), ("negotiation", 0)]
    );
    app.stop().await;
}

#[tokio::test]
async fn the_service_queue_lists_pages_counts_and_ages_open_tickets() {
    use crm_proto::v1::service_queries_client::ServiceQueriesClient;
    use crm_proto::v1::{
        CommandOptions, GetBacklogAgingRequest, GetQueueStatsRequest, ListQueueRequest,
        OpenTicketRequest,
    };
    let app = TestApp::spawn_with(|config| config.query_min_position_wait_ms = 10_000).await;
    let ago = |days: i64| {
        (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24 * days)).to_string()
    };
    let mut last = 0;
    let mut ids = Vec::new();
    for (priority, opened) in [("low", ago(10)), ("urgent", ago(0)), ("normal", ago(2))] {
        let reply = app
            .tickets()
            .open_ticket(app.request(OpenTicketRequest {
                options: Some(CommandOptions {
                    occurred_at: opened,
                    ..CommandOptions::default()
                }),
                requester_id: crate::support::person(&app, "Ticket", "Requester").await,
                channel: "email".into(),
                r#type: "incident".into(),
                priority: priority.into(),
                subject: "Printer on fire".into(),
                ..OpenTicketRequest::default()
            }))
            .await
            .unwrap()
            .into_inner();
        last = reply.global_position;
        ids.push(reply.stream_id);
    }
    let mut service = ServiceQueriesClient::new(app.channel.clone());
    let read = |min_position: u64| Some(QueryOptions { min_position });

    // Most urgent first, a page of one at a time.
    let mut order = Vec::new();
    let mut token = String::new();
    loop {
        let page = service
            .list_queue(app.request(ListQueueRequest {
                options: read(last),
                page_size: 1,
                page_token: token.clone(),
                ..ListQueueRequest::default()
            }))
            .await
            .unwrap()
            .into_inner();
        order.extend(page.tickets.iter().map(|t| t.priority.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(order, vec!["urgent", "normal", "low"]);

    let stats = service
        .get_queue_stats(app.request(GetQueueStatsRequest {
            options: read(last),
            queue: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.truncated);
    // Another queue's stats hold none of these (unrouted: no queue).
    let elsewhere = service
        .get_queue_stats(app.request(GetQueueStatsRequest {
            options: read(last),
            queue: "nowhere".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(elsewhere.rows.is_empty());

    let counted: Vec<(String, u64)> = stats
        .rows
        .iter()
        .map(|r| (r.priority.clone(), r.open_tickets))
        .collect();
    assert_eq!(
        counted,
        vec![
            ("urgent".into(), 1),
            ("normal".into(), 1),
            ("low".into(), 1)
        ]
    );

    let aging = service
        .get_backlog_aging(app.request(GetBacklogAgingRequest {
            options: read(last),
            queue: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    let buckets: Vec<(String, u64)> = aging
        .buckets
        .iter()
        .map(|b| (b.age.clone(), b.open_tickets))
        .collect();
    assert_eq!(
        buckets,
        vec![
            ("0-1d".into(), 1),
            ("1-3d".into(), 1),
            ("3-7d".into(), 0),
            ("7d+".into(), 1)
        ]
    );

    // Bad input names the field.
    for (request, field) in [
        (
            ListQueueRequest {
                page_size: 500,
                ..ListQueueRequest::default()
            },
            "page_size",
        ),
        (
            ListQueueRequest {
                page_token: "garbage".into(),
                ..ListQueueRequest::default()
            },
            "page_token",
        ),
    ] {
        let status = service.list_queue(app.request(request)).await.unwrap_err();
        assert_eq!(bad_fields(&status), vec![field]);
    }
    app.stop().await;
}

/// Win rate = won ÷ (won + lost) closed in the period, by count and value
/// (DOMAIN.md §5.1), figures worked out by hand below.
#[tokio::test]
async fn win_rate_counts_the_deals_closed_in_the_period_by_count_and_value() {
    use crm_proto::v1::{
        CommandOptions, GetWinRateRequest, Money, ReopenOpportunityRequest, WinOpportunityRequest,
    };
    let app = TestApp::spawn_with(|config| config.query_min_position_wait_ms = 10_000).await;
    let (account, pipeline) = setup(&app).await;
    let at = |time: &str| {
        Some(CommandOptions {
            occurred_at: time.into(),
            ..CommandOptions::default()
        })
    };
    let open = |minor: i64| {
        let mut request = deal(&account, &pipeline);
        request.amount = Some(Money {
            amount_minor: minor,
            currency: "EUR".into(),
        });
        request.options = at("2026-10-01T09:00:00Z");
        app.request(request)
    };
    let (mut last, mut last_id) = (0, String::new());
    // (amount, how it closes, when)
    for (minor, close, when) in [
        (30_000_000, Some("won"), "2026-11-10T12:00:00Z"),
        (10_000_000, Some("won"), "2026-11-20T12:00:00Z"),
        (20_000_000, Some("lost"), "2026-11-25T12:00:00Z"),
        (50_000_000, Some("won"), "2026-10-15T12:00:00Z"), // before the period
        (70_000_000, None, ""),                            // still open
        // won before the period, reopened, lost in it (below)
        (40_000_000, Some("won"), "2026-10-20T12:00:00Z"),
    ] {
        let id = app
            .opportunities()
            .open_opportunity(open(minor))
            .await
            .unwrap()
            .into_inner()
            .stream_id;
        last_id.clone_from(&id);
        let reply = match close {
            Some("won") => app
                .opportunities()
                .win_opportunity(app.request(WinOpportunityRequest {
                    options: at(when),
                    opportunity_id: id,
                }))
                .await
                .unwrap(),
            Some(_) => app
                .opportunities()
                .lose_opportunity(app.request(crate::opportunities::lost(&id, "price", at(when))))
                .await
                .unwrap(),
            None => continue,
        };
        last = reply.into_inner().global_position;
    }
    // The last deal: reopened in October, lost in November. It closed in
    // the period, as a loss: the October win no longer counts.
    let reopened = app
        .opportunities()
        .reopen_opportunity(crate::configuration::with_roles(
            &app,
            ReopenOpportunityRequest {
                options: at("2026-10-25T12:00:00Z"),
                opportunity_id: last_id.clone(),
                stage: "proposal".into(),
            },
            "sales_manager",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(reopened.global_position > last);
    last = app
        .opportunities()
        .lose_opportunity(app.request(crate::opportunities::lost(
            &last_id,
            "timing",
            at("2026-11-26T12:00:00Z"),
        )))
        .await
        .unwrap()
        .into_inner()
        .global_position;
    let mut sales = SalesQueriesClient::new(app.channel.clone());
    let november = |owner: &str| GetWinRateRequest {
        options: Some(QueryOptions { min_position: last }),
        from: "2026-11-01T00:00:00Z".into(),
        to: "2026-12-01T00:00:00Z".into(),
        owner: owner.into(),
    };
    let rate = sales
        .get_win_rate(app.request(november("")))
        .await
        .unwrap()
        .into_inner();
    // 2 won, 2 lost: 2 ÷ 4 = 5000 bp. By value: 400,000.00 won and
    // 200,000.00 + 400,000.00 lost: 40,000,000 ÷ 100,000,000 = 4000 bp.
    assert_eq!((rate.won, rate.lost, rate.win_rate_bp), (2, 2, 5000));
    assert_eq!(rate.by_value.len(), 1);
    let eur = &rate.by_value[0];
    assert_eq!(
        (
            eur.currency.as_str(),
            eur.won_minor,
            eur.lost_minor,
            eur.win_rate_bp
        ),
        ("EUR", 40_000_000, 60_000_000, 4000)
    );
    let nobody = sales
        .get_win_rate(app.request(november("user:nobody")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((nobody.won, nobody.lost, nobody.win_rate_bp), (0, 0, 0));
    let mut backwards = november("");
    backwards.to = "2026-10-01T00:00:00Z".into();
    let status = sales
        .get_win_rate(app.request(backwards))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), vec!["to"]);
    app.stop().await;
}

/// The forecast ladder of DOMAIN.md §5.1 (closed ⊂ commit ⊂ best case ⊂
/// pipeline, a deal in its close-date period), figures worked out by hand.
#[tokio::test]
async fn the_forecast_climbs_the_category_ladder_for_the_period() {
    use crm_proto::v1::{ForecastAmounts, GetForecastRequest, Money, WinOpportunityRequest};
    let app = TestApp::spawn_with(|config| config.query_min_position_wait_ms = 10_000).await;
    let (account, pipeline) = setup(&app).await;
    let mut last = 0;
    // (amount in minor units, stage or outcome, close date)
    for (minor, to, close) in [
        (10_000_000, "won", "2026-12-10"),           // closed, 100 %
        (20_000_000, "negotiation", "2026-12-11"),   // commit, 80 %
        (30_000_000, "proposal", "2026-12-12"),      // best case, 50 %
        (40_000_000, "qualification", "2026-12-13"), // pipeline, 10 %
        (50_000_000, "lost", "2026-12-14"),          // omitted: counts nowhere
        (60_000_000, "negotiation", "2027-01-05"),   // another period
    ] {
        let mut request = deal(&account, &pipeline);
        request.amount = Some(Money {
            amount_minor: minor,
            currency: "EUR".into(),
        });
        request.close_date = close.into();
        let id = app
            .opportunities()
            .open_opportunity(app.request(request))
            .await
            .unwrap()
            .into_inner()
            .stream_id;
        let reply = match to {
            "qualification" => continue,
            "won" => app
                .opportunities()
                .win_opportunity(app.request(WinOpportunityRequest {
                    options: None,
                    opportunity_id: id,
                }))
                .await
                .unwrap(),
            "lost" => app
                .opportunities()
                .lose_opportunity(app.request(crate::opportunities::lost(&id, "price", None)))
                .await
                .unwrap(),
            stage => app
                .opportunities()
                .change_opportunity_stage(app.request(to_stage(&id, stage)))
                .await
                .unwrap(),
        };
        last = last.max(reply.into_inner().global_position);
    }
    let forecast = SalesQueriesClient::new(app.channel.clone())
        .get_forecast(app.request(GetForecastRequest {
            options: Some(QueryOptions { min_position: last }),
            from_date: "2026-12-01".into(),
            to_date: "2027-01-01".into(),
            owner: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(forecast.currencies.len(), 1);
    let eur = &forecast.currencies[0];
    let amounts = |deals, amount, weighted| {
        Some(ForecastAmounts {
            amount_minor: amount,
            weighted_minor: weighted,
            deals,
        })
    };
    // closed: 100,000.00 at 100 %.
    assert_eq!(eur.closed, amounts(1, 10_000_000, 10_000_000));
    // commit adds 200,000.00 at 80 % = 160,000.00.
    assert_eq!(eur.commit, amounts(2, 30_000_000, 26_000_000));
    // best case adds 300,000.00 at 50 % = 150,000.00.
    assert_eq!(eur.best_case, amounts(3, 60_000_000, 41_000_000));
    // pipeline adds 400,000.00 at 10 % = 40,000.00; the lost deal and the
    // January deal count nowhere.
    assert_eq!(eur.pipeline, amounts(4, 100_000_000, 45_000_000));
    app.stop().await;
}

/// Every read model, rebuilt from the store after the demo seed (accounts,
/// contacts, leads, deals, tickets under an SLA policy, orders, a campaign,
/// NPS) and what the process managers appended, equals its live tables row
/// for row.
#[tokio::test]
async fn every_read_model_rebuilds_to_its_live_tables_after_the_demo_seed() {
    let app = TestApp::spawn_with(|config| config.scheduler_interval_ms = 0).await;
    crm::demo::seed(app.address, "demo").await.unwrap();
    let head = crate::support::settled(&app).await;
    let db = app.db.client().await;
    let dump = |tables: &'static [&'static str]| {
        let db = &db;
        async move {
            let mut dumped = Vec::new();
            for table in tables {
                // Ordered without `state`, which a rebuild may leave out.
                let rows: Vec<serde_json::Value> = db
                    .query(
                        &format!(
                            "SELECT to_jsonb(t) FROM {table} t ORDER BY (to_jsonb(t) - 'state')::text"
                        ),
                        &[],
                    )
                    .await
                    .unwrap()
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                dumped.push((*table, rows));
            }
            dumped
        }
    };
    let store = EventStore::connect(app.db.config(), StoreOptions::default())
        .await
        .unwrap();
    // Indexes (those a rebuild creates once its tables are full among them),
    // persistence and storage options: as the schema made them.
    let shape = |tables: &'static [&'static str]| {
        let db = &db;
        async move {
            let tables: Vec<&str> = tables.to_vec();
            db.query(
                "SELECT c.relname::text, c.relpersistence::text, \
                        COALESCE(array_to_string(c.reloptions, ','), ''), \
                        COALESCE(i.indexdef, '') \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 LEFT JOIN pg_indexes i ON i.schemaname = n.nspname AND i.tablename = c.relname \
                 WHERE n.nspname = 'public' AND c.relname = ANY($1) \
                 ORDER BY 1, 4",
                &[&tables],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| {
                (1..4).fold(row.get::<_, String>(0), |line, i| {
                    line + " | " + &row.get::<_, String>(i)
                })
            })
            .collect::<Vec<_>>()
        }
    };
    let mut live = Vec::new();
    let mut live_shapes = Vec::new();
    for projection in crm_projections::all() {
        live_shapes.push(shape(projection.tables()).await);
        let dumped = dump(projection.tables()).await;
        assert!(
            dumped.iter().any(|(_, rows)| !rows.is_empty()),
            "{} has rows to compare",
            projection.name()
        );
        live.push(dumped);
    }
    // All at once, over one shared read of the log, in chunks of 500 events
    // (what `crm projections rebuild all` does).
    let swapped =
        crm_projections::rebuild_many(crm_projections::all(), &store, app.db.config(), 500, |_| {})
            .await
            .unwrap();
    assert_eq!(swapped.len(), live.len());
    let mut left_out = 0;
    for (((projection, (name, at)), live), live_shape) in crm_projections::all()
        .iter()
        .zip(swapped)
        .zip(live)
        .zip(live_shapes)
    {
        assert_eq!(name, projection.name());
        assert_eq!(at, head, "{name} rebuilt to the head");
        assert!(
            live_shape.iter().any(|line| line.contains("CREATE INDEX")),
            "{name} has secondary indexes to compare"
        );
        assert_eq!(
            shape(projection.tables()).await,
            live_shape,
            "{name}: indexes, persistence or options differ after the rebuild"
        );
        let rebuilt = dump(projection.tables()).await;
        for ((table, live), (_, rebuilt)) in live.iter().zip(&rebuilt) {
            assert_eq!(
                live.len(),
                rebuilt.len(),
                "{name}: {table}'s rows after the rebuild"
            );
            for (live, rebuilt) in live.iter().zip(rebuilt) {
                // A `state` only the projection reads is left out (NULL) by
                // a rebuild; one that queries read (the 360's accounts and
                // contacts) is kept.
                let (mut live, mut rebuilt) = (live.clone(), rebuilt.clone());
                if rebuilt.get("state") == Some(&serde_json::Value::Null) {
                    assert!(
                        !table.starts_with("c360_"),
                        "{name}: {table} keeps its state for queries"
                    );
                    live.as_object_mut().unwrap().remove("state");
                    rebuilt.as_object_mut().unwrap().remove("state");
                    left_out += 1;
                }
                assert!(live == rebuilt, "{name}: {table} differs after the rebuild");
            }
        }
    }
    assert!(left_out > 0, "the rebuild left states out");
    store.shutdown().await;
    app.stop().await;
}
