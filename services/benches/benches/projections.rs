//! `just bench projections`:
//!
//! - `rebuild_all`: every rebuildable read model rebuilt (blue/green, as
//!   `crm projections rebuild` does, all at once) over a stored log of at
//!   least 1M CRM events of a realistic mix (deals through their stages,
//!   tickets answered and solved, paid orders, captured leads), in events/s,
//!   next to one raw streamed `SELECT` of the same events in the same run;
//! - `freshness_p99`: at half of the command path's peak load, the p99 from
//!   a command's reply to a query that sees it (`min_position` = the reply's
//!   position), next to the command p99 itself.
use std::time::{Duration, Instant};

use crm_benches::{Latencies, connect, phase_duration, progress, report};
use crm_domain::DomainEvent;
use crm_domain::commerce::{ExternalRef, OrderEvent, OrderLine, OrderRecorded, OrderTotals};
use crm_domain::common::Money;
use crm_domain::contact::PersonName;
use crm_domain::lead::{LeadCaptured, LeadEvent, LeadSource};
use crm_domain::opportunity::{
    DealSource, Direction, OpportunityEvent, OpportunityOpened, OpportunityStageChanged,
    OpportunityWon,
};
use crm_domain::pipeline::ForecastCategory;
use crm_domain::ticket::{
    AuthorRole, Channel, Priority, ServiceSnapshot, TicketEvent, TicketMessageAdded, TicketOpened,
    TicketSolved, TicketStatus, TicketStatusChanged, TicketType,
};
use crm_platform::Config;
use crm_proto::v1::contacts_client::ContactsClient;
use crm_proto::v1::sales_queries_client::SalesQueriesClient;
use crm_proto::v1::{
    CreateContactRequest, GetPipelineBoardRequest, PersonName as PbName, QueryOptions,
};
use crm_test_support::{TestDb, TestNats};
use futures_util::StreamExt;
use jiff::Timestamp;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn events_to_rebuild() -> u64 {
    std::env::var("BENCH_PROJECTION_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000)
}

/// One stored event: stream type, stream id, version, type, payload.
type Row = (&'static str, Uuid, i64, &'static str, String);

fn payload<E: DomainEvent>(event: &E) -> (&'static str, String) {
    (
        event.event_type(),
        serde_json::to_string(event).expect("serializes"),
    )
}

fn eur(amount_minor: i64) -> Money {
    Money {
        amount_minor,
        currency: "EUR".into(),
    }
}

/// The events of one unit of business (16 events): a deal through two
/// stages to won or lost, a ticket opened, answered, solved, a paid order,
/// a captured lead, a second deal left open.
fn unit(n: u64, pipeline: Uuid, at: Timestamp) -> Vec<Row> {
    let account = Uuid::now_v7();
    let owner = format!("user:rep{}", n % 20);
    let mut rows = Vec::with_capacity(16);
    let mut push = |stream_type: &'static str,
                    stream: Uuid,
                    version: i64,
                    (event_type, body): (&'static str, String)| {
        rows.push((stream_type, stream, version, event_type, body));
    };
    for (d, close) in [(0u64, true), (1, false)] {
        let deal = Uuid::now_v7();
        let amount = eur(100_000 + ((n * 7 + d) % 50) as i64 * 10_000);
        push(
            "opportunity",
            deal,
            1,
            payload(&OpportunityEvent::Opened(OpportunityOpened {
                name: format!("Deal {n}-{d}"),
                account_id: account,
                contact_id: None,
                pipeline_id: pipeline,
                pipeline_version: 1,
                stage: "qualification".into(),
                amount: amount.clone(),
                probability_bp: 1000,
                category: ForecastCategory::Pipeline,
                close_date: jiff::civil::date(2026, 12, 31),
                owner: owner.clone(),
                source: DealSource::default(),
                occurred_at: at,
            })),
        );
        let mut version = 1;
        for (from, to, bp) in [
            ("qualification", "discovery", 2500),
            ("discovery", "proposal", 5000),
        ] {
            version += 1;
            push(
                "opportunity",
                deal,
                version,
                payload(&OpportunityEvent::StageChanged(OpportunityStageChanged {
                    from: from.into(),
                    to: to.into(),
                    probability_bp: bp,
                    category: ForecastCategory::BestCase,
                    direction: Direction::Forward,
                    pipeline_version: None,
                    occurred_at: at,
                })),
            );
        }
        if close {
            push(
                "opportunity",
                deal,
                version + 1,
                payload(&OpportunityEvent::Won(OpportunityWon {
                    amount,
                    stage: "won".into(),
                    owner: owner.clone(),
                    occurred_at: at,
                })),
            );
        }
    }
    let ticket = Uuid::now_v7();
    push(
        "ticket",
        ticket,
        1,
        payload(&TicketEvent::Opened(TicketOpened {
            requester_id: Uuid::now_v7(),
            account_id: Some(account),
            channel: Channel::Email,
            ticket_type: TicketType::Question,
            category: "billing".into(),
            priority: Priority::Normal,
            subject: "Invoice question".into(),
            follow_up_of: None,
            occurred_at: at,
        })),
    );
    push(
        "ticket",
        ticket,
        2,
        payload(&TicketEvent::MessageAdded(TicketMessageAdded {
            author_role: AuthorRole::Agent,
            author: format!("agent:{}", n % 10),
            public: true,
            body: "We are on it".into(),
            occurred_at: at,
        })),
    );
    push(
        "ticket",
        ticket,
        3,
        payload(&TicketEvent::StatusChanged(TicketStatusChanged {
            from: TicketStatus::New,
            to: TicketStatus::Open,
            occurred_at: at,
        })),
    );
    push(
        "ticket",
        ticket,
        4,
        payload(&TicketEvent::Solved(TicketSolved {
            resolution: "Explained the invoice".into(),
            root_cause: String::new(),
            snapshot: ServiceSnapshot::default(),
            occurred_at: at,
        })),
    );
    let order = Uuid::now_v7();
    push(
        "order",
        order,
        1,
        payload(&OrderEvent::Recorded(OrderRecorded {
            external: ExternalRef {
                source: "erp".into(),
                external_id: format!("SO-{n}"),
                external_version: 1,
            },
            account_id: Some(account),
            customer_ref: format!("C-{n}"),
            deal_id: None,
            status: "paid".into(),
            lines: vec![OrderLine {
                sku: "A".into(),
                quantity: 1,
                unit_price: eur(50_000),
                line_total: eur(50_000),
                line_cost: Some(eur(30_000)),
            }],
            totals: OrderTotals {
                net: eur(50_000),
                tax: eur(0),
                gross: eur(50_000),
            },
            ordered_on: jiff::civil::date(2026, 6, 1),
            promised_delivery: None,
            occurred_at: at,
        })),
    );
    push(
        "lead",
        Uuid::now_v7(),
        1,
        payload(&LeadEvent::Captured(LeadCaptured {
            name: PersonName {
                given: "enc:v1:bench".into(),
                family: String::new(),
            },
            company: "Bench Ltd".into(),
            emails: vec![],
            phones: vec![],
            source: LeadSource {
                channel: "web".into(),
                ..LeadSource::default()
            },
            consent: Default::default(),
            occurred_at: at,
        })),
    );
    rows
}

/// Stores `count` events (whole units, at least `count`) of tenant `bench`
/// with dense positions, in chunks, with progress; returns how many.
async fn fill_mix(db: &TestDb, count: u64) -> u64 {
    let client = connect(db).await;
    let metadata = serde_json::to_string(&crm_benches::metadata()).expect("metadata");
    let pipeline = Uuid::now_v7();
    let at: Timestamp = "2026-06-01T09:00:00Z".parse().expect("time");
    let insert = client
        .prepare(
            "INSERT INTO events (global_position, event_id, tenant_id, stream_type, stream_id, \
               stream_version, event_type, schema_version, payload, metadata) \
             SELECT p, gen_random_uuid(), 'bench', st, s, v, et, 1, pl::jsonb, $6::text::jsonb \
             FROM unnest($1::bigint[], $2::text[], $3::uuid[], $4::bigint[], $5::text[], \
                         $7::text[]) AS x(p, st, s, v, et, pl)",
        )
        .await
        .expect("prepare");
    let mut position = 0u64;
    let mut n = 0u64;
    let mut last_report = Instant::now();
    while position < count {
        let mut rows: Vec<Row> = Vec::with_capacity(10_000);
        while rows.len() < 10_000 {
            rows.extend(unit(n, pipeline, at));
            n += 1;
        }
        let positions: Vec<i64> = (1..=rows.len() as i64)
            .map(|i| position as i64 + i)
            .collect();
        let stream_types: Vec<&str> = rows.iter().map(|r| r.0).collect();
        let streams: Vec<Uuid> = rows.iter().map(|r| r.1).collect();
        let versions: Vec<i64> = rows.iter().map(|r| r.2).collect();
        let types: Vec<&str> = rows.iter().map(|r| r.3).collect();
        let payloads: Vec<&str> = rows.iter().map(|r| r.4.as_str()).collect();
        client
            .execute(
                &insert,
                &[
                    &positions,
                    &stream_types,
                    &streams,
                    &versions,
                    &types,
                    &metadata,
                    &payloads,
                ],
            )
            .await
            .expect("fill");
        position += rows.len() as u64;
        if last_report.elapsed() > Duration::from_secs(5) {
            progress(&format!("stored {position} of {count} events"));
            last_report = Instant::now();
        }
    }
    client
        .execute(
            "UPDATE log_head SET position = $1 WHERE id = 1",
            &[&(position as i64)],
        )
        .await
        .expect("move the head");
    client
        .batch_execute("VACUUM ANALYZE events")
        .await
        .expect("vacuum");
    position
}

/// The ceiling: every row streamed by one SELECT, decoded as the store does.
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
    let mut seen = 0u64;
    while let Some(row) = rows.next().await {
        let row = row.expect("row");
        let _: i64 = row.get(0);
        let _: &str = row.get(8);
        let _: &str = row.get(9);
        seen += 1;
    }
    assert_eq!(seen, count, "raw select saw every row");
    count as f64 / started.elapsed().as_secs_f64()
}

async fn rebuild_all(db: &TestDb, count: u64) -> f64 {
    let store =
        crm_event_store::EventStore::connect(db.config(), crm_event_store::StoreOptions::default())
            .await
            .expect("store");
    {
        let client = connect(db).await;
        for projection in crm_projections::all() {
            crm_projections::ensure_schema(&client, projection.as_ref())
                .await
                .expect("schema");
        }
    }
    let started = Instant::now();
    let mut last_report = Instant::now();
    let swapped = crm_projections::rebuild_many(
        crm_projections::all(),
        &store,
        db.config(),
        crm_projections::REBUILD_CHUNK,
        |p| {
            if last_report.elapsed() > Duration::from_secs(5) {
                progress(&format!("rebuilt to {} of {}", p.position, p.head));
                last_report = Instant::now();
            }
        },
    )
    .await
    .expect("rebuild");
    for (name, at) in swapped {
        assert_eq!(at, count, "{name} rebuilt to the head");
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    store.shutdown().await;
    rate
}

fn caller<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-tenant-id", "fresh".parse().expect("ascii"));
    request
        .metadata_mut()
        .insert("x-actor-id", "user:bench".parse().expect("ascii"));
    request
}

fn contact(n: u64) -> CreateContactRequest {
    CreateContactRequest {
        name: Some(PbName {
            given: "Ada".into(),
            family: format!("Lovelace-{n}"),
        }),
        ..Default::default()
    }
}

/// Commands from `callers` tasks for one phase, each waiting `pause`
/// between commands; with `query`, each reply's position is then awaited
/// through a query. Returns commands/s, command latencies, freshness.
async fn run_phase(
    channel: &tonic::transport::Channel,
    callers: u64,
    pause: Duration,
    query: bool,
) -> (f64, Latencies, Latencies) {
    let deadline = Instant::now() + phase_duration();
    let started = Instant::now();
    let mut workers = Vec::new();
    for caller_n in 0..callers {
        let channel = channel.clone();
        workers.push(tokio::spawn(async move {
            let mut contacts = ContactsClient::new(channel.clone());
            let mut sales = SalesQueriesClient::new(channel);
            let (mut n, mut commands, mut fresh) =
                (0u64, Latencies::default(), Latencies::default());
            while Instant::now() < deadline {
                let began = Instant::now();
                let reply = contacts
                    .create_contact(caller(contact(caller_n * 1_000_000 + n)))
                    .await
                    .expect("command")
                    .into_inner();
                commands.record(began.elapsed());
                if query {
                    let replied = Instant::now();
                    sales
                        .get_pipeline_board(caller(GetPipelineBoardRequest {
                            options: Some(QueryOptions {
                                min_position: reply.global_position,
                            }),
                            pipeline_id: Uuid::nil().to_string(),
                            owner: String::new(),
                        }))
                        .await
                        // No such pipeline: answered once the board has
                        // applied the command, which is what is measured.
                        .or_else(|status| match status.code() {
                            tonic::Code::NotFound => Ok(tonic::Response::new(Default::default())),
                            _ => Err(status),
                        })
                        .expect("the query sees the command");
                    fresh.record(replied.elapsed());
                }
                n += 1;
                if !pause.is_zero() {
                    tokio::time::sleep(pause.saturating_sub(began.elapsed())).await;
                }
            }
            (n, commands, fresh)
        }));
    }
    let (mut total, mut commands, mut fresh) = (0, Latencies::default(), Latencies::default());
    for worker in workers {
        let (n, c, f) = worker.await.expect("worker");
        total += n;
        commands.extend(c);
        fresh.extend(f);
    }
    (
        total as f64 / started.elapsed().as_secs_f64(),
        commands,
        fresh,
    )
}

async fn freshness() -> (f64, f64) {
    let db = TestDb::create().await;
    let nats = TestNats::shared();
    let mut config = Config::from_env();
    config.pg_url = db.url();
    config.nats_url = nats.url.clone();
    config.relay_stream = nats.stream.clone();
    config.relay_subject_prefix = nats.subject_prefix.clone();
    config.query_min_position_wait_ms = 10_000;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { crm::run_all(&config, listener, shutdown).await }
    });
    let started = Instant::now();
    while !matches!(crm::health_check(address).await, Ok(true)) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "crm all did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    progress("command peak: 32 callers back to back");
    let (peak, _, _) = run_phase(&channel, 32, Duration::ZERO, false).await;
    // Half the peak: 16 callers, each pacing itself to peak / 32 per second.
    let pause = Duration::from_secs_f64(32.0 / peak);
    progress(&format!(
        "half load: {:.0} commands/s, each followed by a min_position query",
        peak / 2.0
    ));
    let (_, mut commands, mut fresh) = run_phase(&channel, 16, pause, true).await;
    shutdown.cancel();
    let _ = server.await;
    (fresh.percentile_ms(99.0), commands.percentile_ms(99.0))
}

#[tokio::main]
async fn main() {
    // `RUST_LOG=warn just bench projections` shows what the roles log.
    let _telemetry = std::env::var("RUST_LOG").is_ok().then(|| {
        crm_platform::telemetry::init("crm-bench", crm_platform::LogFormat::Text)
            .expect("telemetry")
    });
    let count = events_to_rebuild();
    let db = TestDb::create().await;
    progress(&format!("database {}, storing {count} events", db.name));
    let count = fill_mix(&db, count).await;
    progress("raw streamed SELECT");
    let ceiling = raw_select(&db, count).await;
    progress(&format!(
        "rebuilding all {} read models at once",
        crm_projections::all().len()
    ));
    let rebuilt = rebuild_all(&db, count).await;
    let (fresh_p99, command_p99) = freshness().await;
    report("rebuild_all", rebuilt, "events/s", ceiling);
    report("freshness_p99", fresh_p99, "ms", command_p99);
}
