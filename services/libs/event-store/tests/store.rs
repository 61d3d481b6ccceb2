//! The event store against a real PostgreSQL, one database per test.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test
use std::time::Duration;

use crm_domain::TenantId;
use crm_event_store::{
    AppendError, AppendEvents, EventStore, ExpectedVersion, Filter, JsonText, Metadata, NewEvent,
    Snapshot, StoreOptions, StreamAppend,
};
use crm_test_support::TestDb;
use futures_util::StreamExt;
use serde_json::json;
use uuid::Uuid;

async fn store(db: &TestDb) -> EventStore {
    EventStore::connect(db.config(), StoreOptions::default())
        .await
        .expect("connect store")
}

/// A store (another process, say) whose every batch holds the log's lock
/// for 400 ms before it commits.
async fn pausing_store(db: &TestDb) -> EventStore {
    EventStore::connect(
        db.config(),
        StoreOptions {
            pause_before_commit: Some(Duration::from_millis(400)),
            ..StoreOptions::default()
        },
    )
    .await
    .expect("connect store")
}

/// Starts `request` on a [`pausing_store`] and returns once its batch has
/// written and holds its transaction, and the log's lock, open.
async fn holding_the_log(
    db: &TestDb,
    slow: &EventStore,
    request: AppendEvents,
) -> tokio::task::JoinHandle<Result<crm_event_store::Appended, AppendError>> {
    let append = tokio::spawn({
        let slow = slow.clone();
        async move { slow.append(request).await }
    });
    db.until_a_backend("state = 'idle in transaction' AND query LIKE 'WITH head AS%'")
        .await;
    append
}

/// A new contact's creation with stream `pinned` (of `stream_type`) pinned
/// at `version`.
fn pinned_create(stream_type: &str, pinned: Uuid, version: u64) -> AppendEvents {
    request(
        "t",
        vec![
            one(
                stream_type,
                pinned,
                ExpectedVersion::Pinned(version),
                Vec::new(),
            ),
            one(
                "contact",
                Uuid::now_v7(),
                ExpectedVersion::NoStream,
                vec![created(2)],
            ),
        ],
        None,
    )
}

fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).unwrap()
}

fn one(
    stream_type: &str,
    stream_id: Uuid,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> StreamAppend {
    StreamAppend {
        stream_type: stream_type.into(),
        stream_id,
        expected,
        events,
    }
}

fn request(tenant_id: &str, streams: Vec<StreamAppend>, key: Option<&str>) -> AppendEvents {
    AppendEvents {
        tenant_id: tenant(tenant_id),
        streams,
        idempotency_key: key.map(str::to_owned),
        metadata: Metadata {
            actor: "user:ada".into(),
            ..Metadata::default()
        },
        reservations: Vec::new(),
        subject_keys: Vec::new(),
        request_fingerprint: None,
    }
}

/// The creation of contact `id` under idempotency `key`, standing for a
/// request with `fingerprint`.
fn keyed_create(id: Uuid, key: &str, fingerprint: [u8; 32]) -> AppendEvents {
    let mut keyed = request(
        "t",
        vec![one(
            "contact",
            id,
            ExpectedVersion::NoStream,
            vec![created(1)],
        )],
        Some(key),
    );
    keyed.request_fingerprint = Some(fingerprint);
    keyed
}

fn created(n: u64) -> NewEvent {
    NewEvent::new("ContactCreated", json!({ "n": n }))
}

async fn count_events(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn append_stores_the_full_envelope_and_reads_back_in_order() {
    let db = TestDb::create().await;
    let store = store(&db).await;
    let stream_id = Uuid::now_v7();
    let mut metadata = Metadata {
        actor: "user:ada".into(),
        ..Metadata::default()
    };
    metadata.correlation_id = Some("corr-1".into());
    metadata.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    let events = vec![
        created(1),
        NewEvent::new("ContactDetailsUpdated", json!({"changes": {}})),
    ];
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let appended = store
        .append(AppendEvents {
            tenant_id: tenant("acme"),
            streams: vec![one("contact", stream_id, ExpectedVersion::NoStream, events)],
            idempotency_key: None,
            metadata: metadata.clone(),
            reservations: Vec::new(),
            subject_keys: Vec::new(),
            request_fingerprint: None,
        })
        .await
        .unwrap();
    assert_eq!((appended.first_position, appended.last_position), (1, 2));
    assert_eq!(
        (
            appended.streams[0].first_version,
            appended.streams[0].last_version
        ),
        (1, 2)
    );
    assert!(!appended.replayed);

    let read = store
        .read_stream(&tenant("acme"), stream_id, 1, 100)
        .await
        .unwrap();
    assert_eq!(read.len(), 2);
    for (i, event) in read.iter().enumerate() {
        assert_eq!(event.global_position, i as u64 + 1);
        assert_eq!(event.stream_version, i as u64 + 1);
        assert_eq!(event.event_id, ids[i]);
        assert_eq!(event.tenant_id, "acme");
        assert_eq!(event.stream_type, "contact");
        assert_eq!(event.schema_version, 1);
        assert_eq!(event.metadata.parse::<Metadata>().unwrap(), metadata);
    }
    assert_eq!(read[0].event_type, "ContactCreated");
    assert_eq!(
        read[0].payload.parse::<serde_json::Value>().unwrap(),
        json!({"n": 1})
    );
    assert_eq!(
        store
            .read_stream(&tenant("acme"), stream_id, 2, 100)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        store
            .read_stream(&tenant("other"), stream_id, 1, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.head().await.unwrap(), 2);
    store.shutdown().await;
}

#[tokio::test]
async fn expected_version_conflicts_carry_the_current_version_and_store_nothing() {
    let db = TestDb::create().await;
    let store = store(&db).await;
    let id = Uuid::now_v7();
    store
        .append(request(
            "t",
            vec![one(
                "contact",
                id,
                ExpectedVersion::NoStream,
                vec![created(1)],
            )],
            None,
        ))
        .await
        .unwrap();
    store
        .append(request(
            "t",
            vec![one(
                "contact",
                id,
                ExpectedVersion::Exact(1),
                vec![created(2)],
            )],
            None,
        ))
        .await
        .unwrap();

    for (expected, label) in [
        (ExpectedVersion::NoStream, "no stream"),
        (ExpectedVersion::Exact(0), "no stream"),
        (ExpectedVersion::Exact(1), "1"),
        (ExpectedVersion::Exact(7), "7"),
    ] {
        match store
            .append(request(
                "t",
                vec![one("contact", id, expected, vec![created(9)])],
                None,
            ))
            .await
        {
            Err(AppendError::VersionConflict {
                stream_id,
                expected,
                current,
            }) => {
                assert_eq!((stream_id, expected.as_str(), current), (id, label, 2));
            }
            other => panic!("expected a conflict for {label}, got {other:?}"),
        }
    }
    let missing = Uuid::now_v7();
    match store
        .append(request(
            "t",
            vec![one(
                "contact",
                missing,
                ExpectedVersion::Exact(3),
                vec![created(1)],
            )],
            None,
        ))
        .await
    {
        Err(AppendError::VersionConflict { current: 0, .. }) => {}
        other => panic!("expected a conflict on a missing stream, got {other:?}"),
    }
    match store
        .append(request(
            "t",
            vec![one("lead", id, ExpectedVersion::Any, vec![created(1)])],
            None,
        ))
        .await
    {
        Err(AppendError::WrongStreamType { actual, .. }) => assert_eq!(actual, "contact"),
        other => panic!("expected wrong stream type, got {other:?}"),
    }
    // Any appends to an existing stream of the right type.
    let appended = store
        .append(request(
            "t",
            vec![one("contact", id, ExpectedVersion::Any, vec![created(3)])],
            None,
        ))
        .await
        .unwrap();
    assert_eq!(appended.streams[0].last_version, 3);
    assert_eq!(count_events(&db).await, 3);
    store.shutdown().await;
}

#[tokio::test]
async fn the_same_idempotency_key_replays_the_outcome_and_appends_nothing() {
    let db = TestDb::create().await;
    let store = store(&db).await;
    let id = Uuid::now_v7();
    let make = |payload: u64| {
        request(
            "t",
            vec![one(
                "contact",
                id,
                ExpectedVersion::NoStream,
                vec![created(payload)],
            )],
            Some("create-ada"),
        )
    };
    let first = store.append(make(1)).await.unwrap();
    // A retry carries new event ids (made anew by the caller) but asks the same.
    let again = store.append(make(1)).await.unwrap();
    assert!(again.replayed);
    assert_eq!(
        (
            again.first_position,
            again.last_position,
            again.streams.clone()
        ),
        (
            first.first_position,
            first.last_position,
            first.streams.clone()
        )
    );
    // Even after other appends moved the stream on: the key wins over the version check.
    store
        .append(request(
            "t",
            vec![one(
                "contact",
                id,
                ExpectedVersion::Exact(1),
                vec![created(2)],
            )],
            None,
        ))
        .await
        .unwrap();
    assert_eq!(
        store.append(make(1)).await.unwrap().first_position,
        first.first_position
    );
    match store.append(make(2)).await {
        Err(AppendError::IdempotencyKeyReused { key }) => assert_eq!(key, "create-ada"),
        other => panic!("expected key reuse error, got {other:?}"),
    }
    // Keys are per tenant.
    let other_tenant = request(
        "u",
        vec![one(
            "contact",
            id,
            ExpectedVersion::NoStream,
            vec![created(1)],
        )],
        Some("create-ada"),
    );
    assert!(!store.append(other_tenant).await.unwrap().replayed);
    assert_eq!(count_events(&db).await, 3);
    store.shutdown().await;
}

#[tokio::test]
async fn concurrent_retries_with_one_key_append_once() {
    let db = TestDb::create().await;
    let store = store(&db).await;
    let id = Uuid::now_v7();
    let mut calls = Vec::new();
    for _ in 0..50 {
        let store = store.clone();
        let req = request(
            "t",
            vec![one(
                "contact",
                id,
                ExpectedVersion::NoStream,
                vec![created(1)],
            )],
            Some("k"),
        );
        calls.push(tokio::spawn(async move { store.append(req).await }));
    }
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(call.await.unwrap().expect("every retry succeeds"));
    }
    assert_eq!(outcomes.iter().filter(|o| !o.replayed).count(), 1);
    assert!(
        outcomes
            .iter()
            .all(|o| o.first_position == outcomes[0].first_position)
    );
    assert_eq!(count_events(&db).await, 1);
    store.shutdown().await;
}

#[tokio::test]
async fn a_multi_stream_append_is_all_or_nothing() {
    let db = TestDb::create().await;
    let store = store(&db).await;
    let (lead, account, contact) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    store
        .append(request(
            "t",
            vec![one(
                "lead",
                lead,
                ExpectedVersion::NoStream,
                vec![NewEvent::new("LeadCaptured", json!({}))],
            )],
            None,
        ))
        .await
        .unwrap();
    store
        .append(request(
            "t",
            vec![one(
                "contact",
                contact,
                ExpectedVersion::NoStream,
                vec![created(1)],
            )],
            None,
        ))
        .await
        .unwrap();
    // The contact must not exist yet: it does, so nothing of the conversion lands.
    let conversion = |contact_expected| {
        request(
            "t",
            vec![
                one(
                    "account",
                    account,
                    ExpectedVersion::NoStream,
                    vec![NewEvent::new("AccountCreated", json!({}))],
                ),
                one(
                    "contact",
                    contact,
                    contact_expected,
                    vec![NewEvent::new("ContactLinkedToAccount", json!({}))],
                ),
                one(
                    "lead",
                    lead,
                    ExpectedVersion::Exact(1),
                    vec![NewEvent::new("LeadConverted", json!({}))],
                ),
            ],
            None,
        )
    };
    assert!(matches!(
        store.append(conversion(ExpectedVersion::NoStream)).await,
        Err(AppendError::VersionConflict { .. })
    ));
    assert_eq!(count_events(&db).await, 2);
    assert!(
        store
            .read_stream(&tenant("t"), account, 1, 10)
            .await
            .unwrap()
            .is_empty()
    );

    let done = store
        .append(conversion(ExpectedVersion::Exact(1)))
        .await
        .unwrap();
    assert_eq!((done.first_position, done.last_position), (3, 5));
    let versions: Vec<(Uuid, u64)> = done
        .streams
        .iter()
        .map(|s| (s.stream_id, s.last_version))
        .collect();
    assert_eq!(versions, vec![(account, 1), (contact, 2), (lead, 2)]);
    store.shutdown().await;
}

#[tokio::test]
async fn group_commit_gives_each_caller_its_own_outcome() {
    let db = TestDb::create().await;
    let store = store(&db).await;
    // 20 streams, 10 callers per stream all expecting version 0: exactly one
    // wins per stream, the others see a conflict at version 1.
    let streams: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    let mut calls = Vec::new();
    for round in 0..10 {
        for id in &streams {
            let store = store.clone();
            let req = request(
                "t",
                vec![one(
                    "contact",
                    *id,
                    ExpectedVersion::NoStream,
                    vec![created(round)],
                )],
                None,
            );
            calls.push(tokio::spawn(async move { store.append(req).await }));
        }
    }
    let (mut ok, mut conflicts) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(AppendError::VersionConflict { current: 1, .. }) => conflicts += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, conflicts), (20, 180));
    assert_eq!(count_events(&db).await, 20);
    // Few transactions did the work: the batches shared commits.
    let commits: i64 = db
        .client()
        .await
        .query_one("SELECT count(DISTINCT xmin::text) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        commits < 20,
        "expected batching, got {commits} transactions for 20 appends"
    );
    store.shutdown().await;
}

#[tokio::test]
async fn bad_requests_are_refused_and_store_nothing() {
    let db = TestDb::create().await;
    let store = store(&db).await;
    let id = Uuid::now_v7();
    let huge = "x".repeat(crm_event_store::limits::MAX_PAYLOAD_BYTES);
    let cases = vec![
        (request("t", vec![], None), "streams"),
        (
            request(
                "t",
                vec![one("contact", id, ExpectedVersion::Any, vec![])],
                None,
            ),
            "streams[0].events",
        ),
        (
            request(
                "t",
                vec![one("", id, ExpectedVersion::Any, vec![created(1)])],
                None,
            ),
            "streams[0].stream_type",
        ),
        (
            request(
                "t",
                vec![one(
                    "contact",
                    id,
                    ExpectedVersion::Any,
                    vec![NewEvent::new("has space", json!({}))],
                )],
                None,
            ),
            "streams[0].events[0].event_type",
        ),
        (
            request(
                "t",
                vec![one(
                    "contact",
                    id,
                    ExpectedVersion::Any,
                    vec![NewEvent::new("E", json!("text"))],
                )],
                None,
            ),
            "streams[0].events[0].payload",
        ),
        (
            request(
                "t",
                vec![one(
                    "contact",
                    id,
                    ExpectedVersion::Any,
                    vec![NewEvent::new("E", json!({ "big": huge }))],
                )],
                None,
            ),
            "streams[0].events[0].payload",
        ),
        (
            request(
                "t",
                vec![one(
                    "contact",
                    id,
                    ExpectedVersion::Exact(u64::MAX),
                    vec![created(1)],
                )],
                None,
            ),
            "streams[0].expected",
        ),
        (
            request(
                "t",
                vec![one("contact", id, ExpectedVersion::Any, vec![created(1)])],
                Some(&"k".repeat(201)),
            ),
            "idempotency_key",
        ),
    ];
    for (req, field) in cases {
        match store.append(req).await {
            Err(AppendError::Invalid { field: got, .. }) => assert_eq!(got, field),
            other => panic!("expected invalid {field}, got {other:?}"),
        }
    }
    let mut zero = created(1);
    zero.schema_version = 0;
    assert!(matches!(
        store
            .append(request(
                "t",
                vec![one("contact", id, ExpectedVersion::Any, vec![zero])],
                None
            ))
            .await,
        Err(AppendError::Invalid { .. })
    ));
    assert_eq!(count_events(&db).await, 0);
    store.shutdown().await;
}

#[tokio::test]
async fn an_event_id_never_lands_twice() {
    let db = TestDb::create().await;
    let store = store(&db).await;
    let event = created(1);
    store
        .append(request(
            "t",
            vec![one(
                "contact",
                Uuid::now_v7(),
                ExpectedVersion::Any,
                vec![event.clone()],
            )],
            None,
        ))
        .await
        .unwrap();
    let again = store
        .append(request(
            "t",
            vec![one(
                "contact",
                Uuid::now_v7(),
                ExpectedVersion::Any,
                vec![event],
            )],
            None,
        ))
        .await;
    assert!(
        matches!(
            again,
            Err(AppendError::Unavailable {
                outcome_unknown: false,
                ..
            })
        ),
        "{again:?}"
    );
    assert_eq!(count_events(&db).await, 1);
    // The writer is still healthy afterwards.
    store
        .append(request(
            "t",
            vec![one(
                "contact",
                Uuid::now_v7(),
                ExpectedVersion::Any,
                vec![created(2)],
            )],
            None,
        ))
        .await
        .unwrap();
    assert_eq!(store.head().await.unwrap(), 2);
    store.shutdown().await;
}

#[tokio::test]
async fn read_all_filters_by_tenant_stream_type_event_type_and_stream() {
    let db = TestDb::create().await;
    let store = store(&db).await;
    let a_contact = Uuid::now_v7();
    store
        .append(request(
            "a",
            vec![one(
                "contact",
                a_contact,
                ExpectedVersion::Any,
                vec![
                    created(1),
                    NewEvent::new("ContactDetailsUpdated", json!({})),
                ],
            )],
            None,
        ))
        .await
        .unwrap();
    store
        .append(request(
            "a",
            vec![one(
                "lead",
                Uuid::now_v7(),
                ExpectedVersion::Any,
                vec![NewEvent::new("LeadCaptured", json!({}))],
            )],
            None,
        ))
        .await
        .unwrap();
    store
        .append(request(
            "b",
            vec![one(
                "contact",
                Uuid::now_v7(),
                ExpectedVersion::Any,
                vec![created(2)],
            )],
            None,
        ))
        .await
        .unwrap();
    let positions = |filter: Filter, after: u64| {
        let store = store.clone();
        async move {
            let events: Vec<_> = store
                .read_all(after, &filter)
                .await
                .unwrap()
                .collect()
                .await;
            events
                .into_iter()
                .map(|e| e.unwrap().global_position)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(positions(Filter::default(), 0).await, vec![1, 2, 3, 4]);
    assert_eq!(positions(Filter::default(), 2).await, vec![3, 4]);
    assert_eq!(
        positions(Filter::tenant(tenant("a")), 0).await,
        vec![1, 2, 3]
    );
    assert_eq!(positions(Filter::tenant(tenant("b")), 0).await, vec![4]);
    assert_eq!(
        positions(
            Filter {
                stream_types: vec!["contact".into()],
                ..Filter::tenant(tenant("a"))
            },
            0
        )
        .await,
        vec![1, 2]
    );
    assert_eq!(
        positions(
            Filter {
                event_types: vec!["ContactCreated".into()],
                ..Filter::default()
            },
            0
        )
        .await,
        vec![1, 4]
    );
    assert_eq!(
        positions(
            Filter {
                stream_id: Some(a_contact),
                ..Filter::default()
            },
            1
        )
        .await,
        vec![2]
    );
    assert!(store.read_all(u64::MAX, &Filter::default()).await.is_err());
    store.shutdown().await;
}

#[tokio::test]
async fn stream_versions_count_each_streams_events_per_tenant_in_the_order_asked() {
    let db = TestDb::create().await;
    let store = store(&db).await;
    let (three, one_event, none) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    store
        .append(request(
            "acme",
            vec![
                one(
                    "contact",
                    three,
                    ExpectedVersion::NoStream,
                    vec![created(1), created(2)],
                ),
                one(
                    "contact",
                    one_event,
                    ExpectedVersion::NoStream,
                    vec![created(3)],
                ),
            ],
            None,
        ))
        .await
        .unwrap();
    store
        .append(request(
            "acme",
            vec![one(
                "contact",
                three,
                ExpectedVersion::Exact(2),
                vec![created(4)],
            )],
            None,
        ))
        .await
        .unwrap();
    let versions = store
        .stream_versions(&tenant("acme"), &[none, three, one_event, three])
        .await
        .unwrap();
    assert_eq!(versions, vec![0, 3, 1, 3]);
    // Another tenant's streams are not this tenant's.
    let versions = store
        .stream_versions(&tenant("other"), &[three, one_event])
        .await
        .unwrap();
    assert_eq!(versions, vec![0, 0]);
    assert!(
        store
            .stream_versions(&tenant("acme"), &[])
            .await
            .unwrap()
            .is_empty()
    );
    store.shutdown().await;
}

#[tokio::test]
async fn snapshots_keep_the_newest_version() {
    let db = TestDb::create().await;
    let store = store(&db).await;
    let id = Uuid::now_v7();
    assert_eq!(store.load_snapshot(&tenant("t"), id).await.unwrap(), None);
    let snapshot = |version: u64| Snapshot {
        stream_type: "opportunity".into(),
        stream_id: id,
        version,
        schema_version: 1,
        state: JsonText(format!("{{\"version\": {version}}}")),
    };
    store
        .save_snapshot(&tenant("t"), &snapshot(10))
        .await
        .unwrap();
    store
        .save_snapshot(&tenant("t"), &snapshot(5))
        .await
        .unwrap();
    let loaded = store
        .load_snapshot(&tenant("t"), id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(loaded.version, 10);
    assert_eq!(
        loaded.state.parse::<serde_json::Value>().unwrap(),
        json!({"version": 10})
    );
    store
        .save_snapshot(&tenant("t"), &snapshot(20))
        .await
        .unwrap();
    assert_eq!(
        store
            .load_snapshot(&tenant("t"), id)
            .await
            .unwrap()
            .unwrap()
            .version,
        20
    );
    assert_eq!(
        store.load_snapshot(&tenant("other"), id).await.unwrap(),
        None
    );
    store.shutdown().await;
}

#[tokio::test]
async fn migrations_are_idempotent_and_refuse_edited_files() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    assert_eq!(crm_event_store::migrate(&mut client).await.unwrap(), 0);
    client
        .execute(
            "UPDATE schema_migrations SET checksum = 'tampered' WHERE version = 1",
            &[],
        )
        .await
        .unwrap();
    let error = crm_event_store::migrate(&mut client).await.unwrap_err();
    assert!(error.to_string().contains("was edited"), "{error}");
}

#[tokio::test]
async fn a_subscription_switches_from_history_to_live_without_loss_or_repeat() {
    let db = TestDb::create().await;
    let store = store(&db).await;
    // History first.
    for n in 0..500 {
        store
            .append(request(
                "t",
                vec![one(
                    "contact",
                    Uuid::now_v7(),
                    ExpectedVersion::NoStream,
                    vec![created(n)],
                )],
                None,
            ))
            .await
            .unwrap();
    }
    let mut subscription = store.subscribe(0, Filter::default());
    // Live writes from several tasks while the subscriber is mid-history.
    let mut writers = Vec::new();
    for w in 0..8 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..250 {
                let req = request(
                    "t",
                    vec![one(
                        "contact",
                        Uuid::now_v7(),
                        ExpectedVersion::NoStream,
                        vec![created(w * 1000 + n)],
                    )],
                    None,
                );
                store.append(req).await.unwrap();
            }
        }));
    }
    let total = 500 + 8 * 250;
    expect_positions(&mut subscription, total).await;
    for writer in writers {
        writer.await.unwrap();
    }
    // Nothing more arrives: no duplicate after the switch.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), subscription.next())
            .await
            .is_err()
    );
    // A filtered subscription from the middle sees only its tenant.
    store
        .append(request(
            "other",
            vec![one(
                "contact",
                Uuid::now_v7(),
                ExpectedVersion::NoStream,
                vec![created(1)],
            )],
            None,
        ))
        .await
        .unwrap();
    let mut filtered = store.subscribe(total - 1, Filter::tenant(tenant("other")));
    let event = filtered.next().await.unwrap().unwrap();
    assert_eq!(
        (event.tenant_id.as_str(), event.global_position),
        ("other", total + 1)
    );
    store.shutdown().await;
}

/// The gap test: many writers on several store instances (as several processes
/// would be), one of which holds each of its transactions open before commit,
/// while two catch-up readers run throughout. Neither reader may ever see a
/// later position before an earlier one; both must end with every position
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reader_sees_no_gap_under_concurrent_writers() {
    const WRITERS_PER_STORE: u64 = 16;
    const STORES: u64 = 3;
    const EVENTS_PER_APPEND: u64 = 5;
    const APPENDS_PER_WRITER: u64 = 420;
    let total = STORES * WRITERS_PER_STORE * APPENDS_PER_WRITER * EVENTS_PER_APPEND + 40 * 2; // plus the slow store's appends
    assert!(total >= 100_000);
    let db = TestDb::create().await;
    let mut stores = Vec::new();
    for _ in 0..STORES {
        stores.push(store(&db).await);
    }
    let slow = slow_store(&db).await;

    let readers = spawn_readers(&stores[0], &db, total).await;

    let mut writers = Vec::new();
    for store in &stores {
        for w in 0..WRITERS_PER_STORE {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                let id = Uuid::now_v7();
                for n in 0..APPENDS_PER_WRITER {
                    let events = (0..EVENTS_PER_APPEND)
                        .map(|e| created(w * 1_000_000 + n * 10 + e))
                        .collect();
                    let expected = if n == 0 {
                        ExpectedVersion::NoStream
                    } else {
                        ExpectedVersion::Exact(n * EVENTS_PER_APPEND)
                    };
                    store
                        .append(request(
                            "t",
                            vec![one("contact", id, expected, events)],
                            None,
                        ))
                        .await
                        .unwrap();
                }
            }));
        }
    }
    // The slow store's transactions sit open (lock held, rows written) while
    // the others queue up behind the lock.
    let slow_writer = {
        let slow = slow.clone();
        tokio::spawn(async move {
            for _ in 0..40 {
                let events = vec![created(1), created(2)];
                slow.append(request(
                    "t",
                    vec![one(
                        "contact",
                        Uuid::now_v7(),
                        ExpectedVersion::NoStream,
                        events,
                    )],
                    None,
                ))
                .await
                .unwrap();
            }
        })
    };
    for writer in writers {
        writer.await.unwrap();
    }
    slow_writer.await.unwrap();
    readers.await;
    assert_log_is_dense(&db, total).await;
    for store in stores {
        store.shutdown().await;
    }
    slow.shutdown().await;
}

/// Reads positions 1 to `last` from a subscription that starts at 0: each
/// exactly once, in order, none more than 60 s after the one before.
async fn expect_positions(subscription: &mut crm_event_store::Subscription, last: u64) {
    for expected in 1..=last {
        let event = tokio::time::timeout(Duration::from_secs(60), subscription.next())
            .await
            .expect("subscription stalled")
            .expect("subscription ended")
            .expect("read failed");
        assert_eq!(
            event.global_position, expected,
            "subscription saw a gap or a repeat"
        );
    }
}

/// A store that holds each transaction open for 40 ms before it commits.
async fn slow_store(db: &TestDb) -> EventStore {
    EventStore::connect(
        db.config(),
        StoreOptions {
            pause_before_commit: Some(Duration::from_millis(40)),
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap()
}

/// Two catch-up readers running until they have seen `total` events: the
/// store's subscription and a naive poller that reads whatever is visible
/// past its last position, with no knowledge of the head. Neither may see a
/// later position before an earlier one, nor a position twice. The returned
/// future ends when both have seen every position.
async fn spawn_readers(
    store: &EventStore,
    db: &TestDb,
    total: u64,
) -> impl std::future::Future<Output = ()> {
    // The store's subscription.
    let mut subscription = store.subscribe(0, Filter::default());
    let subscriber = tokio::spawn(async move { expect_positions(&mut subscription, total).await });
    // The poller.
    let poll_client = db.client().await;
    let poller = tokio::spawn(async move {
        let mut last: i64 = 0;
        while (last as u64) < total {
            let rows = poll_client
                .query("SELECT global_position FROM events WHERE global_position > $1 ORDER BY global_position LIMIT 5000", &[&last])
                .await
                .unwrap();
            for row in rows {
                let position: i64 = row.get(0);
                assert_eq!(
                    position,
                    last + 1,
                    "poller saw position {position} right after {last}"
                );
                last = position;
            }
        }
    });
    async move {
        subscriber.await.unwrap();
        poller.await.unwrap();
    }
}

/// Every position from 1 to `total` once, every event once, and every
/// stream's versions dense.
async fn assert_log_is_dense(db: &TestDb, total: u64) {
    let client = db.client().await;
    let row = client.query_one("SELECT count(*), min(global_position), max(global_position), count(DISTINCT event_id) FROM events", &[]).await.unwrap();
    let (count, min, max, distinct): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        (count as u64, min, max as u64, distinct as u64),
        (total, 1, total, total)
    );
    let streams_ok: bool = client
        .query_one("SELECT bool_and(v = n) FROM (SELECT max(stream_version) v, count(*) n FROM events GROUP BY stream_id) s", &[])
        .await.unwrap().get(0);
    assert!(streams_ok, "stream versions are not dense");
}

/// Large appends let the writer keep several batches in flight; positions and
/// versions must stay dense and every caller must get its own outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_appends_in_pipelined_batches_keep_positions_dense() {
    let db = TestDb::create().await;
    let store = store(&db).await;
    let mut subscription = store.subscribe(0, Filter::default());
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let id = Uuid::now_v7();
            let mut outcomes = Vec::new();
            for n in 0..10u64 {
                let events = (0..150)
                    .map(|e| created(w * 10_000 + n * 150 + e))
                    .collect();
                let expected = if n == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(n * 150)
                };
                outcomes.push(
                    store
                        .append(request(
                            "t",
                            vec![one("contact", id, expected, events)],
                            None,
                        ))
                        .await
                        .unwrap(),
                );
            }
            outcomes
        }));
    }
    let mut ranges = Vec::new();
    for writer in writers {
        for outcome in writer.await.unwrap() {
            assert_eq!(outcome.last_position - outcome.first_position, 149);
            ranges.push((outcome.first_position, outcome.last_position));
        }
    }
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        assert_eq!(pair[0].1 + 1, pair[1].0, "outcomes overlap or leave a hole");
    }
    expect_positions(&mut subscription, 12_000).await;
    let stats = store.writer_stats();
    assert_eq!(stats.events, 12_000);
    assert!(
        stats.written_ahead > 0,
        "no batch wrote before taking the lock: {stats:?}"
    );
    store.shutdown().await;
}

/// Batches of large appends write before they take the log lock (see the
/// writer's docs). Here that path meets everything that can break it: stale
/// expected versions (the batch rolls back, the pipeline drains, the append
/// is decided under the lock), two callers racing for one stream in one
/// process and across two, a second store writing the same log at the same
/// time (whose positions the first one's predictions do not know), and a
/// third that holds each transaction open before commit. Both readers must
/// see every position once, in order; every caller must get its own outcome;
/// and nothing may hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writing_ahead_of_the_lock_keeps_the_log_dense_under_conflicts_and_other_writers() {
    const EVENTS: u64 = 120;
    const WRITERS_PER_STORE: u64 = 4;
    const APPENDS_PER_WRITER: u64 = 12;
    const RACE_ROUNDS: u64 = 4;
    const SLOW_APPENDS: u64 = 10;
    let db = TestDb::create().await;
    let stores = [store(&db).await, store(&db).await];
    let slow = slow_store(&db).await;
    // Two races (one within a store, one across the stores), each round won
    // by exactly one caller.
    let total = 2 * WRITERS_PER_STORE * APPENDS_PER_WRITER * EVENTS
        + 2 * RACE_ROUNDS * EVENTS
        + SLOW_APPENDS * 2;
    let readers = spawn_readers(&stores[0], &db, total).await;
    let batch = |from: u64| -> Vec<NewEvent> { (from..from + EVENTS).map(created).collect() };
    let expected_at = |version: u64| {
        if version == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(version)
        }
    };

    let mut tasks = tokio::task::JoinSet::new();
    for (s, store) in stores.iter().enumerate() {
        for w in 0..WRITERS_PER_STORE {
            let store = store.clone();
            tasks.spawn(async move {
                let id = Uuid::now_v7();
                let mut version = 0;
                for n in 0..APPENDS_PER_WRITER {
                    let from = (s as u64 * 100 + w) * 1_000_000 + n * EVENTS;
                    if n % 4 == 3 {
                        // One version behind: refused, with the current version.
                        let stale = store
                            .append(request(
                                "t",
                                vec![one("contact", id, expected_at(version - EVENTS), batch(from))],
                                None,
                            ))
                            .await;
                        assert!(
                            matches!(stale, Err(AppendError::VersionConflict { current, .. }) if current == version),
                            "a stale append got {stale:?}"
                        );
                    }
                    let appended = store
                        .append(request(
                            "t",
                            vec![one("contact", id, expected_at(version), batch(from))],
                            None,
                        ))
                        .await
                        .unwrap();
                    assert_eq!(appended.last_position - appended.first_position, EVENTS - 1);
                    version += EVENTS;
                }
            });
        }
    }
    // Races: in each round both callers append to the same stream at the
    // same version, at the same moment; one wins, the other is told the
    // version it lost to.
    for racers in [[&stores[0], &stores[0]], [&stores[0], &stores[1]]] {
        let id = Uuid::now_v7();
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let wins = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        for (r, store) in racers.into_iter().enumerate() {
            let (store, barrier, wins) = (store.clone(), barrier.clone(), wins.clone());
            tasks.spawn(async move {
                for round in 0..RACE_ROUNDS {
                    let version = round * EVENTS;
                    barrier.wait().await;
                    let outcome = store
                        .append(request(
                            "t",
                            vec![one(
                                "contact",
                                id,
                                expected_at(version),
                                batch(9_000_000 + r as u64 * 1_000 + round),
                            )],
                            None,
                        ))
                        .await;
                    match outcome {
                        Ok(_) => {
                            wins.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Err(AppendError::VersionConflict { current, .. }) => {
                            assert_eq!(current, version + EVENTS);
                        }
                        Err(error) => panic!("a racer got {error:?}"),
                    }
                    // Both have an outcome before the next round starts.
                    barrier.wait().await;
                    assert_eq!(wins.load(std::sync::atomic::Ordering::SeqCst), round + 1);
                }
            });
        }
    }
    {
        let slow = slow.clone();
        tasks.spawn(async move {
            for n in 0..SLOW_APPENDS {
                slow.append(request(
                    "t",
                    vec![one(
                        "contact",
                        Uuid::now_v7(),
                        ExpectedVersion::NoStream,
                        vec![created(n), created(n + 1)],
                    )],
                    None,
                ))
                .await
                .unwrap();
            }
        });
    }
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(task) = tasks.join_next().await {
            task.unwrap();
        }
        readers.await;
    })
    .await
    .expect("writers or readers hung");
    assert_log_is_dense(&db, total).await;
    // Both paths ran: batches written ahead, and batches that rolled back
    // and took the lock first (stale versions at least; a store whose
    // predictions the other store keeps spoiling may never write ahead).
    let stats: Vec<_> = stores.iter().map(EventStore::writer_stats).collect();
    assert!(
        stats.iter().any(|s| s.written_ahead > 0) && stats.iter().all(|s| s.fell_back > 0),
        "{stats:?}"
    );
    for store in stores {
        store.shutdown().await;
    }
    slow.shutdown().await;
}

/// A new data subject's key lands with its first events or not at all, and
/// erasing it is final.
#[tokio::test]
async fn subject_keys_land_with_their_append_and_erasure_is_final() {
    use crm_event_store::SubjectKey;
    let db = TestDb::create().await;
    let store = store(&db).await;
    let acme = tenant("acme");
    let ada = Uuid::now_v7();
    let with_key = |expected, key: Vec<u8>, subject| {
        let mut request = request(
            "acme",
            vec![one("contact", ada, expected, vec![created(1)])],
            None,
        );
        request.subject_keys = vec![SubjectKey {
            subject_id: subject,
            key,
        }];
        request
    };
    // Refused appends store no key.
    assert!(matches!(
        store
            .append(with_key(ExpectedVersion::Exact(3), vec![7; 32], ada))
            .await,
        Err(AppendError::VersionConflict { .. })
    ));
    assert_eq!(store.subject_key(&acme, ada).await.unwrap(), None);
    for (key, subject, field) in [
        (vec![7; 31], ada, "subject_keys[0].key"),
        (vec![7; 32], Uuid::now_v7(), "subject_keys[0].subject_id"),
    ] {
        match store
            .append(with_key(ExpectedVersion::NoStream, key, subject))
            .await
        {
            Err(AppendError::Invalid { field: got, .. }) => assert_eq!(got, field),
            other => panic!("expected invalid {field}, got {other:?}"),
        }
    }
    // Accepted: the key is there, and a later insert keeps it.
    store
        .append(with_key(ExpectedVersion::NoStream, vec![7; 32], ada))
        .await
        .unwrap();
    assert_eq!(
        store.subject_key(&acme, ada).await.unwrap(),
        Some(vec![7; 32])
    );
    assert_eq!(
        store
            .subject_key_or_insert(&acme, ada, &[9; 32])
            .await
            .unwrap(),
        Some(vec![7; 32])
    );
    // Erased: gone for good, never made again.
    store.erase_subject(&acme, ada).await.unwrap();
    store.erase_subject(&acme, ada).await.unwrap();
    assert_eq!(store.subject_key(&acme, ada).await.unwrap(), None);
    assert_eq!(
        store
            .subject_key_or_insert(&acme, ada, &[9; 32])
            .await
            .unwrap(),
        None
    );
    store.shutdown().await;
}

#[tokio::test]
async fn an_unchanged_outcome_is_kept_under_its_key_like_an_append() {
    let db = TestDb::create().await;
    let store = store(&db).await;
    let t = tenant("t");
    let id = Uuid::now_v7();
    let first = store
        .append(request(
            "t",
            vec![one(
                "contact",
                id,
                ExpectedVersion::NoStream,
                vec![created(1)],
            )],
            None,
        ))
        .await
        .unwrap();
    let (fingerprint, other) = ([7u8; 32], [8u8; 32]);

    let recorded = store
        .record_unchanged(&t, "noop", fingerprint, id, 1, first.last_position)
        .await
        .unwrap();
    assert!(!recorded.replayed);
    assert_eq!(
        (recorded.first_position, recorded.last_position),
        (first.last_position, first.last_position)
    );
    assert_eq!(
        (
            recorded.streams[0].stream_id,
            recorded.streams[0].last_version
        ),
        (id, 1)
    );
    // Recorded again: the first outcome, replayed.
    let again = store
        .record_unchanged(&t, "noop", fingerprint, id, 1, first.last_position)
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(
        (again.last_position, again.streams.clone()),
        (recorded.last_position, recorded.streams.clone())
    );
    // An append under the key with the same request replays the unchanged
    // outcome and writes nothing; another request under it is refused.
    let mut keyed = request(
        "t",
        vec![one(
            "contact",
            id,
            ExpectedVersion::Exact(1),
            vec![created(2)],
        )],
        Some("noop"),
    );
    keyed.request_fingerprint = Some(fingerprint);
    let replayed = store.append(keyed.clone()).await.unwrap();
    assert!(replayed.replayed);
    assert_eq!(
        (replayed.last_position, replayed.streams.clone()),
        (recorded.last_position, recorded.streams.clone())
    );
    keyed.request_fingerprint = Some(other);
    assert!(matches!(
        store.append(keyed).await,
        Err(AppendError::IdempotencyKeyReused { .. })
    ));
    assert!(matches!(
        store
            .record_unchanged(&t, "noop", other, id, 1, first.last_position)
            .await,
        Err(AppendError::IdempotencyKeyReused { .. })
    ));
    // A key an append holds: that append's outcome, or refused.
    let mut appended = request(
        "t",
        vec![one(
            "contact",
            id,
            ExpectedVersion::Exact(1),
            vec![created(3)],
        )],
        Some("append"),
    );
    appended.request_fingerprint = Some(fingerprint);
    let appended = store.append(appended).await.unwrap();
    let late = store
        .record_unchanged(&t, "append", fingerprint, id, 1, first.last_position)
        .await
        .unwrap();
    assert!(late.replayed);
    assert_eq!(
        (late.first_position, late.streams.clone()),
        (appended.first_position, appended.streams.clone())
    );
    assert!(matches!(
        store.record_unchanged(&t, "append", other, id, 1, 1).await,
        Err(AppendError::IdempotencyKeyReused { .. })
    ));
    // Keys are per tenant; an empty key is refused.
    assert!(
        !store
            .record_unchanged(&tenant("u"), "noop", other, id, 0, 0)
            .await
            .unwrap()
            .replayed
    );
    assert!(matches!(
        store.record_unchanged(&t, "", fingerprint, id, 1, 1).await,
        Err(AppendError::Invalid { .. })
    ));
    assert_eq!(count_events(&db).await, 2);
    store.shutdown().await;
}

#[tokio::test]
async fn a_pinned_stream_is_checked_and_not_written() {
    let db = TestDb::create().await;
    let store = store(&db).await;
    let (account, contact) = (Uuid::now_v7(), Uuid::now_v7());
    store
        .append(request(
            "t",
            vec![one(
                "account",
                account,
                ExpectedVersion::NoStream,
                vec![created(1)],
            )],
            None,
        ))
        .await
        .unwrap();
    let pinned = |version, stream_type| pinned_create(stream_type, account, version);
    // At the version read: the other stream is written, the pin is not.
    let appended = store.append(pinned(1, "account")).await.unwrap();
    assert_eq!(appended.streams.len(), 1);
    assert_ne!(appended.streams[0].stream_id, account);
    assert_eq!(
        store
            .read_stream(&tenant("t"), account, 1, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    // The pinned stream moved on: a conflict naming it, and nothing written.
    store
        .append(request(
            "t",
            vec![one(
                "account",
                account,
                ExpectedVersion::Exact(1),
                vec![created(3)],
            )],
            None,
        ))
        .await
        .unwrap();
    match store.append(pinned(1, "account")).await {
        Err(AppendError::VersionConflict {
            stream_id, current, ..
        }) => assert_eq!((stream_id, current), (account, 2)),
        other => panic!("expected a conflict on the pin, got {other:?}"),
    }
    // Of another type, or missing.
    assert!(matches!(
        store.append(pinned(2, "contact")).await,
        Err(AppendError::WrongStreamType { .. })
    ));
    let missing = pinned_create("account", Uuid::now_v7(), 1);
    assert!(matches!(
        store.append(missing).await,
        Err(AppendError::VersionConflict { current: 0, .. })
    ));
    // Only a pin has no events; a pin has a version; an append needs an
    // event.
    for (expected, events) in [
        (ExpectedVersion::NoStream, true),
        (ExpectedVersion::Any, true),
        (ExpectedVersion::Exact(2), true),
        (ExpectedVersion::Pinned(0), true),
        (ExpectedVersion::Pinned(2), false),
    ] {
        let mut streams = vec![one("account", account, expected, Vec::new())];
        if events {
            streams.push(one(
                "contact",
                contact,
                ExpectedVersion::NoStream,
                vec![created(5)],
            ));
        }
        assert!(
            matches!(
                store.append(request("t", streams, None)).await,
                Err(AppendError::Invalid { .. })
            ),
            "{expected:?}"
        );
    }
    assert_eq!(count_events(&db).await, 3);
    store.shutdown().await;
}

/// A pin is decided under the log's lock. Another writer (another process)
/// holds the lock while it writes the pinned stream; an append pinning the
/// version before that write waits, then conflicts. On the one-statement
/// fast path its guard would read the snapshot from before the wait and pass.
#[tokio::test]
async fn a_pin_sees_a_write_committed_while_it_waited_for_the_lock() {
    let db = TestDb::create().await;
    let slow = pausing_store(&db).await;
    let store = store(&db).await;
    let account = Uuid::now_v7();
    let write = |expected, n| {
        request(
            "t",
            vec![one("account", account, expected, vec![created(n)])],
            None,
        )
    };
    store
        .append(write(ExpectedVersion::NoStream, 1))
        .await
        .unwrap();
    let moving = holding_the_log(&db, &slow, write(ExpectedVersion::Exact(1), 2)).await;
    let outcome = store.append(pinned_create("account", account, 1)).await;
    moving.await.unwrap().unwrap();
    match outcome {
        Err(AppendError::VersionConflict {
            stream_id, current, ..
        }) => assert_eq!((stream_id, current), (account, 2)),
        other => panic!("expected a conflict on the pin, got {other:?}"),
    }
    assert_eq!(count_events(&db).await, 2);
    slow.shutdown().await;
    store.shutdown().await;
}

/// A no-op recorded while an append under the same key is in flight waits
/// for it and answers its outcome (the concurrent winner's, replayed).
#[tokio::test]
async fn an_unchanged_outcome_recorded_during_an_append_under_its_key_answers_the_append() {
    let db = TestDb::create().await;
    let slow = pausing_store(&db).await;
    let store = store(&db).await;
    let id = Uuid::now_v7();
    let fingerprint = [9u8; 32];
    let keyed = keyed_create(id, "k", fingerprint);
    let appending = holding_the_log(&db, &slow, keyed).await;
    let recorded = store
        .record_unchanged(&tenant("t"), "k", fingerprint, id, 0, 0)
        .await
        .unwrap();
    let appended = appending.await.unwrap().unwrap();
    assert!(recorded.replayed && !appended.replayed);
    assert_eq!(
        (recorded.last_position, recorded.streams),
        (appended.last_position, appended.streams)
    );
    slow.shutdown().await;
    store.shutdown().await;
}

/// The fault-injected fast path (a transaction held open before its commit)
/// ends a write that a constraint refused before it decides again under the
/// lock: an append under a key a no-op holds replays it.
#[tokio::test]
async fn a_pausing_store_replays_a_key_its_fast_path_collided_with() {
    let db = TestDb::create().await;
    let slow = pausing_store(&db).await;
    let id = Uuid::now_v7();
    let fingerprint = [5u8; 32];
    let recorded = slow
        .record_unchanged(&tenant("t"), "k", fingerprint, id, 0, 0)
        .await
        .unwrap();
    let keyed = keyed_create(id, "k", fingerprint);
    let replayed = slow.append(keyed).await.unwrap();
    assert!(replayed.replayed);
    assert_eq!(replayed.streams, recorded.streams);
    assert_eq!(count_events(&db).await, 0);
    slow.shutdown().await;
}

/// A subject's snapshot is stored only while the subject's key exists: never
/// without one, and never again once the subject is erased.
#[tokio::test]
async fn a_subjects_snapshot_is_saved_only_while_its_key_exists() {
    let db = TestDb::create().await;
    let store = store(&db).await;
    let t = tenant("t");
    let subject = Uuid::now_v7();
    let snapshot = Snapshot {
        stream_type: "contact".into(),
        stream_id: subject,
        version: 100,
        schema_version: 1,
        state: JsonText(r#"{"sealed": "enc:v1:AAAA"}"#.into()),
    };
    store.save_subject_snapshot(&t, &snapshot).await.unwrap();
    assert_eq!(
        store.load_snapshot(&t, subject).await.unwrap(),
        None,
        "no key"
    );
    store
        .subject_key_or_insert(&t, subject, &[7u8; 32])
        .await
        .unwrap();
    store.save_subject_snapshot(&t, &snapshot).await.unwrap();
    assert_eq!(
        store.load_snapshot(&t, subject).await.unwrap(),
        Some(snapshot.clone())
    );
    store.erase_subject(&t, subject).await.unwrap();
    assert_eq!(store.load_snapshot(&t, subject).await.unwrap(), None);
    store.save_subject_snapshot(&t, &snapshot).await.unwrap();
    assert_eq!(
        store.load_snapshot(&t, subject).await.unwrap(),
        None,
        "erased"
    );
    store.shutdown().await;
}

/// An append with a pin is decided under the lock, in a batch of its own:
/// the appends queued with it stay on the one-statement path.
#[tokio::test]
async fn a_pinned_append_does_not_take_its_neighbours_off_the_fast_path() {
    let db = TestDb::create().await;
    let slow = pausing_store(&db).await;
    let account = Uuid::now_v7();
    let create =
        |id, expected, events| request("t", vec![one("contact", id, expected, events)], None);
    slow.append(request(
        "t",
        vec![one(
            "account",
            account,
            ExpectedVersion::NoStream,
            vec![created(0)],
        )],
        None,
    ))
    .await
    .unwrap();
    // One batch holds the writer while the others queue behind it.
    let first = create(Uuid::now_v7(), ExpectedVersion::NoStream, vec![created(1)]);
    let first = holding_the_log(&db, &slow, first).await;
    let before = slow.writer_stats();
    let mut queued = Vec::new();
    for n in 0..21 {
        let store = slow.clone();
        let request = if n == 10 {
            pinned_create("account", account, 1)
        } else {
            create(Uuid::now_v7(), ExpectedVersion::NoStream, vec![created(n)])
        };
        queued.push(tokio::spawn(async move { store.append(request).await }));
    }
    first.await.unwrap().unwrap();
    for append in queued {
        append.await.unwrap().unwrap();
    }
    let after = slow.writer_stats();
    assert_eq!(after.appends - before.appends, 21, "the queued ones");
    assert_eq!(
        after.decided_under_lock - before.decided_under_lock,
        1,
        "only the pinned append: {after:?}"
    );
    assert_eq!(count_events(&db).await, 23);
    slow.shutdown().await;
}
