//! The relay against real PostgreSQL and real NATS JetStream: every event
//! published once, in global order, as a valid CloudEvent, through relay
//! crashes, NATS restarts and leader changes.
use std::collections::HashSet;
use std::time::Duration;

use async_nats::HeaderMap;
use crm::relay::{Relay, RelayOptions, RelayStatus};
use crm_domain::TenantId;
use crm_event_store::{
    AppendEvents, EventStore, ExpectedVersion, Metadata, NewEvent, StoreOptions, StreamAppend,
};
use crm_test_support::{NatsServer, TestDb, TestNats, eventually};
use crm_wire::cloudevents::header;
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Published {
    subject: String,
    sequence: u64,
    headers: HeaderMap,
    payload: serde_json::Value,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.as_str())
}

fn position_of(message: &Published) -> u64 {
    header(&message.headers, header::POSITION)
        .and_then(|p| p.parse().ok())
        .expect("ce-globalposition on every message")
}

async fn store(db: &TestDb) -> EventStore {
    EventStore::connect(db.config(), StoreOptions::default())
        .await
        .unwrap()
}

fn options(nats: &TestNats) -> RelayOptions {
    RelayOptions {
        stream: nats.stream.clone(),
        subject_prefix: nats.subject_prefix.clone(),
        window: 256,
        ack_timeout: Duration::from_secs(2),
        checkpoint_interval: Duration::from_millis(50),
        standby_poll: Duration::from_millis(50),
        max_backoff: Duration::from_millis(300),
        ..RelayOptions::default()
    }
}

struct Running {
    status: watch::Receiver<RelayStatus>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

fn start_relay(store: &EventStore, db: &TestDb, url: &str, options: RelayOptions) -> Running {
    let relay = Relay::new(store.clone(), db.config().clone(), url.to_owned(), options);
    let status = relay.status();
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run(stop.clone()));
    Running { status, stop, task }
}

/// `count` events over a few tenants and streams, in appends of 1 to 5
/// events; returns the head.
async fn append_events(store: &EventStore, tenants: &[&str], count: usize) -> u64 {
    let mut written = 0;
    let mut head = 0;
    while written < count {
        let size = (written % 5 + 1).min(count - written);
        let tenant = tenants[written % tenants.len()];
        let events = (0..size)
            .map(|i| {
                NewEvent::new(
                    "ContactCreated",
                    json!({ "n": written + i, "note": "caf\u{e9}" }),
                )
            })
            .collect();
        let appended = store
            .append(AppendEvents {
                tenant_id: TenantId::parse(tenant).unwrap(),
                streams: vec![StreamAppend {
                    stream_type: "contact".into(),
                    stream_id: Uuid::now_v7(),
                    expected: ExpectedVersion::NoStream,
                    events,
                }],
                idempotency_key: None,
                metadata: Metadata {
                    actor: "user:ada lovelace".into(),
                    correlation_id: Some(format!("corr-{written}")),
                    causation_id: Some("cause-1".into()),
                    traceparent: Some(
                        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                    ),
                    ..Metadata::default()
                },
                reservations: Vec::new(),
                subject_keys: Vec::new(),
                request_fingerprint: None,
            })
            .await
            .unwrap();
        head = appended.last_position;
        written += size;
    }
    head
}

/// Every message of the stream, read by an ordered consumer (what a plain
/// NATS subscriber would do), optionally filtered by subject.
async fn read_all(nats: &TestNats, filter: &str) -> Vec<Published> {
    let js = nats.jetstream().await;
    let total = js
        .get_stream(&nats.stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    let mut messages = nats.ordered_messages(filter).await;
    let mut out = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_millis(500), messages.next()).await;
        let Ok(Some(message)) = next else { break };
        let message = message.unwrap();
        let sequence = message.info().unwrap().stream_sequence;
        out.push(Published {
            subject: message.subject.to_string(),
            sequence,
            headers: message.headers.clone().unwrap_or_default(),
            payload: serde_json::from_slice(&message.payload).unwrap(),
        });
        if out.len() as u64 >= total {
            break;
        }
    }
    out
}

/// Exactly positions 1..=head, in order, one message each.
fn assert_exactly_once_in_order(messages: &[Published], head: u64) {
    let positions: Vec<u64> = messages.iter().map(position_of).collect();
    let expected: Vec<u64> = (1..=head).collect();
    assert_eq!(positions.len() as u64, head, "one message per event");
    assert_eq!(positions, expected, "every position once, in order");
    let ids: HashSet<&str> = messages
        .iter()
        .map(|m| header(&m.headers, "Nats-Msg-Id").unwrap())
        .collect();
    assert_eq!(ids.len() as u64, head, "every Nats-Msg-Id once");
}

async fn wait_published(status: &watch::Receiver<RelayStatus>, head: u64) {
    eventually(
        Duration::from_secs(30),
        "the relay to publish the head",
        || {
            let status = *status.borrow();
            async move { (status.published >= head).then_some(()) }
        },
    )
    .await;
}

#[tokio::test]
async fn every_event_is_published_once_in_order_as_a_complete_cloudevent() {
    let db = TestDb::create().await;
    let nats = TestNats::shared();
    let store = store(&db).await;
    let head = append_events(&store, &["acme", "globex"], 300).await;
    let relay = start_relay(&store, &db, &nats.url, options(&nats));
    wait_published(&relay.status, head).await;
    let messages = read_all(&nats, ">").await;
    assert_exactly_once_in_order(&messages, head);

    let stored = db
        .client()
        .await
        .query(
            "SELECT global_position, event_id, tenant_id, stream_id, stream_version, payload::text \
             FROM events ORDER BY global_position",
            &[],
        )
        .await
        .unwrap();
    for (message, row) in messages.iter().zip(&stored) {
        let event_id: Uuid = row.get(1);
        let tenant: String = row.get(2);
        let stream_id: Uuid = row.get(3);
        let version: i64 = row.get(4);
        let payload: String = row.get(5);
        let h = |name| header(&message.headers, name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(h(header::SPECVERSION), "1.0");
        assert_eq!(h(header::ID), event_id.to_string());
        assert_eq!(h("Nats-Msg-Id"), event_id.to_string());
        assert_eq!(h(header::TYPE), "crm.v1.ContactCreated");
        assert_eq!(h(header::SOURCE), format!("/crm/tenants/{tenant}/contact"));
        assert_eq!(h(header::SUBJECT), stream_id.to_string());
        assert_eq!(h(header::DATACONTENTTYPE), "application/json");
        assert_eq!(h(header::CONTENT_TYPE), "application/json");
        assert_eq!(h(header::TENANT), tenant);
        assert_eq!(h(header::STREAM_TYPE), "contact");
        assert_eq!(h(header::STREAM_VERSION), version.to_string());
        assert_eq!(h(header::SCHEMA_VERSION), "1");
        assert_eq!(h(header::ACTOR), "user:ada%20lovelace", "percent-encoded");
        assert!(h(header::CORRELATION).starts_with("corr-"));
        assert_eq!(h(header::CAUSATION), "cause-1");
        assert_eq!(
            h(header::TRACEPARENT),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert!(
            h(header::TIME).parse::<jiff::Timestamp>().is_ok(),
            "ce-time is RFC 3339: {}",
            h(header::TIME)
        );
        assert!(h(header::DATASCHEMA).ends_with("/contact/ContactCreated.v1.json"));
        assert_eq!(
            message.subject,
            format!(
                "{}.{tenant}.contact.{stream_id}.ContactCreated",
                nats.subject_prefix
            )
        );
        let stored: serde_json::Value = serde_json::from_str(&payload).unwrap();
        assert_eq!(message.payload, stored, "the body is the payload");
        assert_eq!(message.sequence, position_of(message));
    }

    // A subscriber filters by subject: one tenant's events, still in order.
    let acme = read_all(&nats, &format!("{}.acme.>", nats.subject_prefix)).await;
    assert!(!acme.is_empty());
    assert!(
        acme.iter()
            .all(|m| header(&m.headers, header::TENANT) == Some("acme"))
    );
    assert!(
        acme.windows(2)
            .all(|w| position_of(&w[0]) < position_of(&w[1]))
    );
    assert_eq!(
        acme.len()
            + read_all(&nats, &format!("{}.globex.>", nats.subject_prefix))
                .await
                .len(),
        head as usize
    );

    // The checkpoint catches up and live events keep flowing.
    let more = append_events(&store, &["acme"], 7).await;
    wait_published(&relay.status, more).await;
    eventually(Duration::from_secs(10), "the checkpoint", || async {
        let saved = store
            .load_checkpoint(&format!("relay:{}", nats.stream))
            .await
            .unwrap();
        (saved == more).then_some(())
    })
    .await;
    relay.stop.cancel();
    relay.task.await.unwrap();
}

#[tokio::test]
async fn a_relay_killed_mid_batch_resumes_without_loss_or_duplicate() {
    let db = TestDb::create().await;
    let nats = TestNats::shared();
    let store = store(&db).await;
    let head = append_events(&store, &["acme"], 6_000).await;
    let first = start_relay(&store, &db, &nats.url, options(&nats));
    eventually(Duration::from_secs(30), "the relay to be mid-way", || {
        let published = first.status.borrow().published;
        async move { (published >= 1_000).then_some(()) }
    })
    .await;
    // A crash: no drain, no final checkpoint.
    first.task.abort();
    let _ = first.task.await;
    let published_before = first.status.borrow().published;
    assert!(published_before < head, "killed before the end");
    let second = start_relay(&store, &db, &nats.url, options(&nats));
    wait_published(&second.status, head).await;
    assert_exactly_once_in_order(&read_all(&nats, ">").await, head);
    second.stop.cancel();
    second.task.await.unwrap();
}

#[tokio::test]
async fn the_relay_survives_a_nats_crash_and_commands_keep_working() {
    let mut server = NatsServer::start();
    let db = TestDb::create().await;
    let nats = TestNats::on(server.url());
    let store = store(&db).await;
    append_events(&store, &["acme"], 500).await;
    let relay = start_relay(&store, &db, &nats.url, options(&nats));
    wait_published(&relay.status, 500).await;

    server.kill();
    // Appends do not depend on NATS.
    let head = append_events(&store, &["acme"], 700).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(relay.status.borrow().published < head);
    server.restart();
    let head = append_events(&store, &["acme", "globex"], 300).await;
    wait_published(&relay.status, head).await;
    assert_exactly_once_in_order(&read_all(&nats, ">").await, head);
    relay.stop.cancel();
    relay.task.await.unwrap();
}

#[tokio::test]
async fn only_the_leader_publishes_and_a_standby_takes_over() {
    let db = TestDb::create().await;
    let nats = TestNats::shared();
    let store = store(&db).await;
    let first = start_relay(&store, &db, &nats.url, options(&nats));
    eventually(Duration::from_secs(10), "a leader", || {
        let leader = first.status.borrow().leader;
        async move { leader.then_some(()) }
    })
    .await;
    let second = start_relay(&store, &db, &nats.url, options(&nats));
    let head = append_events(&store, &["acme"], 200).await;
    wait_published(&first.status, head).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!second.status.borrow().leader, "the second relay stands by");
    assert_eq!(
        second.status.borrow().published,
        0,
        "a standby publishes nothing"
    );

    first.stop.cancel();
    first.task.await.unwrap();
    let head = append_events(&store, &["acme"], 200).await;
    wait_published(&second.status, head).await;
    assert!(second.status.borrow().leader);
    assert_exactly_once_in_order(&read_all(&nats, ">").await, head);
    second.stop.cancel();
    second.task.await.unwrap();
}

/// The example consumer (`examples/python-consumer`): nats-py and the stock
/// CloudEvents SDK, nothing of ours.
#[tokio::test]
async fn a_subscriber_with_only_nats_and_a_cloudevents_sdk_receives_the_demo_in_order() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let setup = std::process::Command::new("bash")
        .arg(root.join("examples/python-consumer/setup.sh"))
        .output()
        .expect("run the consumer's setup");
    assert!(
        setup.status.success(),
        "examples/python-consumer/setup.sh failed: {}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let python = String::from_utf8(setup.stdout).unwrap().trim().to_owned();

    let app = crate::support::TestApp::spawn().await;
    crm::demo::seed(app.address, "demo").await.unwrap();
    let stored = app
        .db
        .client()
        .await
        .query(
            "SELECT event_id, event_type FROM events WHERE tenant_id = 'demo' ORDER BY global_position",
            &[],
        )
        .await
        .unwrap();
    assert!(stored.len() > 500, "a demo run is hundreds of events");

    // Bounded whatever the consumer does (coreutils `timeout`: exit 124).
    let mut consume = std::process::Command::new("timeout");
    consume
        .arg("300")
        .arg(python)
        .arg(root.join("examples/python-consumer/consume.py"))
        .args(["--url", &app.nats.url, "--stream", &app.nats.stream])
        .args(["--subject", &format!("{}.demo.>", app.nats.subject_prefix)])
        .args(["--expect", &stored.len().to_string()])
        // The whole suite runs beside it on two cores: allow long pauses.
        .args(["--idle-timeout", "90"]);
    // Off the test's runtime, which runs `crm all` (the relay must go on
    // publishing while the consumer reads).
    let consumed = tokio::task::spawn_blocking(move || consume.output())
        .await
        .unwrap()
        .expect("run the consumer");
    assert!(
        consumed.status.success(),
        "consumer failed ({}): {}",
        consumed.status,
        String::from_utf8_lossy(&consumed.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(consumed.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), stored.len());
    for (line, row) in lines.iter().zip(&stored) {
        let id: Uuid = row.get(0);
        let event_type: String = row.get(1);
        assert_eq!(line["id"], id.to_string(), "same events, same order");
        assert_eq!(line["type"], format!("crm.v1.{event_type}"));
        assert_eq!(line["tenant"], "demo");
        assert!(line["data"].is_object(), "the SDK decoded the JSON body");
    }
    app.stop().await;
}
