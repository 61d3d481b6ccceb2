//! `crm.v1.EventLog` through a real client: Subscribe (history, then live,
//! under concurrent writes), ReadAll, ReadStream, filters, tenant isolation
//! and the bad inputs.
use std::time::Duration;

use crm_proto::v1::event_log_client::EventLogClient;
use crm_proto::v1::{
    CreateContactRequest, EmailAddress, Event, EventBatch, EventFilter, PersonName, ReadAllRequest,
    ReadDirection, ReadStreamRequest, SubscribeRequest, UpdateContactDetailsRequest,
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::support::{TestApp, as_caller, bad_fields};

fn event_log(app: &TestApp) -> EventLogClient<Channel> {
    EventLogClient::new(app.channel.clone())
}

fn contact(n: usize) -> CreateContactRequest {
    CreateContactRequest {
        name: Some(PersonName {
            given: format!("Person{n}"),
            family: "Tester".into(),
        }),
        emails: vec![EmailAddress {
            address: format!("p{n}-{}@example.com", uuid::Uuid::now_v7().simple()),
            primary: true,
        }],
        ..CreateContactRequest::default()
    }
}

/// Creates a contact as `tenant`; returns (stream id, position).
async fn create(app: &TestApp, tenant: &str, n: usize) -> (String, u64) {
    let reply = app
        .contacts()
        .create_contact(as_caller(contact(n), Some(tenant), Some("user:ada")))
        .await
        .unwrap()
        .into_inner();
    (reply.stream_id, reply.global_position)
}

/// Reads batches until `count` events arrived (or panics after 20 s).
async fn take(stream: &mut Streaming<EventBatch>, count: usize) -> Vec<Event> {
    let mut events = Vec::new();
    while events.len() < count {
        let batch = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("events in time")
            .expect("the stream to go on")
            .expect("no error");
        assert!(!batch.events.is_empty(), "batches are never empty");
        events.extend(batch.events);
    }
    events
}

fn positions(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.global_position).collect()
}

#[tokio::test]
async fn subscribe_sends_history_then_live_events_exactly_once_in_order_under_concurrent_writes() {
    let app = TestApp::spawn().await;
    for n in 0..30 {
        create(&app, &app.tenant, n).await;
    }
    let mut subscription = event_log(&app)
        .subscribe(app.request(SubscribeRequest::default()))
        .await
        .unwrap()
        .into_inner();
    // Four writers run while the subscriber switches from history to live.
    let mut writers = Vec::new();
    for w in 0..4 {
        let (channel, tenant) = (app.channel.clone(), app.tenant.clone());
        writers.push(tokio::spawn(async move {
            let mut contacts = crm_proto::v1::contacts_client::ContactsClient::new(channel);
            for n in 0..40 {
                contacts
                    .create_contact(as_caller(contact(1000 * w + n), Some(&tenant), Some("u")))
                    .await
                    .unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let total = 30 + 4 * 40;
    let events = take(&mut subscription, total).await;
    assert_eq!(
        positions(&events),
        (1..=total as u64).collect::<Vec<_>>(),
        "every position once, in order, across the switch"
    );
    let first = &events[0];
    assert_eq!(first.tenant_id, app.tenant);
    assert_eq!(first.stream_type, "contact");
    assert_eq!(first.event_type, "ContactCreated");
    assert_eq!(first.stream_version, 1);
    let payload: serde_json::Value = serde_json::from_str(&first.payload_json).unwrap();
    assert!(
        payload["name"]["given"]
            .as_str()
            .unwrap()
            .starts_with("enc:v1:"),
        "personal fields stay encrypted on the wire: {payload}"
    );
    let metadata: serde_json::Value = serde_json::from_str(&first.metadata_json).unwrap();
    assert_eq!(metadata["actor"], "user:ada");
    assert!(first.recorded_at.ends_with('Z'), "{}", first.recorded_at);

    // Nothing more arrives than was written.
    let extra = tokio::time::timeout(Duration::from_millis(300), subscription.next()).await;
    assert!(extra.is_err(), "no event beyond the head");

    // Resuming after a position continues right after it; from_now sees
    // only what comes next.
    let mut resumed = event_log(&app)
        .subscribe(app.request(SubscribeRequest {
            after_position: 150,
            ..SubscribeRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let mut live = event_log(&app)
        .subscribe(app.request(SubscribeRequest {
            from_now: true,
            ..SubscribeRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let (_, position) = create(&app, &app.tenant, 9_999).await;
    assert_eq!(
        positions(&take(&mut resumed, 41).await),
        (151..=position).collect::<Vec<_>>()
    );
    assert_eq!(positions(&take(&mut live, 1).await), vec![position]);

    // Shutdown ends open subscriptions with UNAVAILABLE instead of hanging.
    app.stop().await;
    let ended = tokio::time::timeout(Duration::from_secs(10), live.next())
        .await
        .expect("the subscription to end at shutdown");
    match ended {
        Some(Err(status)) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
}

#[tokio::test]
async fn filters_and_tenants_are_enforced() {
    let app = TestApp::spawn().await;
    let other = format!("{}-other", app.tenant);
    let (mine, _) = create(&app, &app.tenant, 1).await;
    create(&app, &other, 2).await;
    let (_, position) = create(&app, &app.tenant, 3).await;
    app.contacts()
        .update_contact_details(app.request(UpdateContactDetailsRequest {
            contact_id: mine.clone(),
            title: Some("CTO".into()),
            ..UpdateContactDetailsRequest::default()
        }))
        .await
        .unwrap();
    create(&app, &other, 4).await;

    let read = |filter: Option<EventFilter>, tenant: String| {
        let mut client = event_log(&app);
        async move {
            let mut stream = client
                .read_all(as_caller(
                    ReadAllRequest {
                        filter,
                        ..ReadAllRequest::default()
                    },
                    Some(&tenant),
                    Some("auditor"),
                ))
                .await
                .unwrap()
                .into_inner();
            let mut events = Vec::new();
            while let Some(batch) = stream.next().await {
                events.extend(batch.unwrap().events);
            }
            events
        }
    };
    let all_mine = read(None, app.tenant.clone()).await;
    assert_eq!(
        positions(&all_mine),
        vec![1, 3, 4],
        "only the caller's tenant"
    );
    let theirs = read(None, other.clone()).await;
    assert_eq!(positions(&theirs), vec![2, 5]);
    let updates = read(
        Some(EventFilter {
            event_types: vec!["ContactDetailsUpdated".into()],
            ..EventFilter::default()
        }),
        app.tenant.clone(),
    )
    .await;
    assert_eq!(positions(&updates), vec![4]);
    let one_record = read(
        Some(EventFilter {
            stream_id: mine.clone(),
            stream_types: vec!["contact".into()],
            ..EventFilter::default()
        }),
        app.tenant.clone(),
    )
    .await;
    assert_eq!(positions(&one_record), vec![1, 4]);
    let none = read(
        Some(EventFilter {
            stream_types: vec!["ticket".into()],
            ..EventFilter::default()
        }),
        app.tenant.clone(),
    )
    .await;
    assert!(none.is_empty());

    // ReadAll stops at max_count.
    let mut limited = event_log(&app)
        .read_all(app.request(ReadAllRequest {
            max_count: 2,
            ..ReadAllRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(batch) = limited.next().await {
        got.extend(batch.unwrap().events);
    }
    assert_eq!(positions(&got), vec![1, 3]);

    // A subscription of another tenant never sees this tenant's events.
    let mut theirs_live = event_log(&app)
        .subscribe(as_caller(
            SubscribeRequest {
                after_position: position,
                ..SubscribeRequest::default()
            },
            Some(&other),
            Some("u"),
        ))
        .await
        .unwrap()
        .into_inner();
    create(&app, &app.tenant, 6).await;
    let (_, theirs_next) = create(&app, &other, 7).await;
    assert_eq!(
        positions(&take(&mut theirs_live, 2).await),
        vec![5, theirs_next]
    );
    app.stop().await;
}

#[tokio::test]
async fn read_stream_pages_forward_and_backward() {
    let app = TestApp::spawn().await;
    let (id, _) = create(&app, &app.tenant, 1).await;
    for title in ["A", "B", "C", "D"] {
        app.contacts()
            .update_contact_details(app.request(UpdateContactDetailsRequest {
                contact_id: id.clone(),
                title: Some(title.into()),
                ..UpdateContactDetailsRequest::default()
            }))
            .await
            .unwrap();
    }
    let page = |from_version: u64, direction: ReadDirection, max_count: u32| {
        let mut client = event_log(&app);
        let request = app.request(ReadStreamRequest {
            stream_id: id.clone(),
            from_version,
            direction: direction as i32,
            max_count,
        });
        async move { client.read_stream(request).await.unwrap().into_inner() }
    };
    let versions = |events: &[Event]| events.iter().map(|e| e.stream_version).collect::<Vec<_>>();
    let first = page(0, ReadDirection::Forward, 2).await;
    assert_eq!(
        (
            versions(&first.events),
            first.stream_version,
            first.next_version
        ),
        (vec![1, 2], 5, 3)
    );
    let last = page(5, ReadDirection::Forward, 2).await;
    assert_eq!((versions(&last.events), last.next_version), (vec![5], 0));
    let back = page(0, ReadDirection::Backward, 3).await;
    assert_eq!(
        (versions(&back.events), back.next_version),
        (vec![5, 4, 3], 2)
    );
    let back = page(2, ReadDirection::Backward, 3).await;
    assert_eq!((versions(&back.events), back.next_version), (vec![2, 1], 0));
    let all = page(0, ReadDirection::Unspecified, 0).await;
    assert_eq!(versions(&all.events), vec![1, 2, 3, 4, 5]);
    app.stop().await;
}

#[tokio::test]
async fn bad_event_log_requests_get_clear_statuses() {
    let app = TestApp::spawn().await;
    let (id, head) = create(&app, &app.tenant, 1).await;
    let mut log = event_log(&app);

    let status = log
        .subscribe(app.request(SubscribeRequest {
            after_position: head + 1,
            ..SubscribeRequest::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains(&head.to_string()), "{status:?}");
    let status = log
        .read_all(app.request(ReadAllRequest {
            after_position: 1_000,
            ..ReadAllRequest::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);

    let status = log
        .subscribe(app.request(SubscribeRequest {
            after_position: 1,
            from_now: true,
            ..SubscribeRequest::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), vec!["after_position"]);

    for (filter, field) in [
        (
            EventFilter {
                event_types: vec!["Contact.Created".into()],
                ..EventFilter::default()
            },
            "filter.event_types[0]",
        ),
        (
            EventFilter {
                stream_types: vec!["contact".into(), String::new()],
                ..EventFilter::default()
            },
            "filter.stream_types[1]",
        ),
        (
            EventFilter {
                stream_types: vec!["contact".into(); 21],
                ..EventFilter::default()
            },
            "filter.stream_types",
        ),
        (
            EventFilter {
                stream_id: "not-a-uuid".into(),
                ..EventFilter::default()
            },
            "filter.stream_id",
        ),
    ] {
        let status = log
            .subscribe(app.request(SubscribeRequest {
                filter: Some(filter),
                ..SubscribeRequest::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(bad_fields(&status), vec![field]);
    }

    let status = log
        .subscribe(as_caller(SubscribeRequest::default(), None, Some("u")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let read = |stream_id: &str, from_version: u64, max_count: u32, tenant: &str| {
        as_caller(
            ReadStreamRequest {
                stream_id: stream_id.into(),
                from_version,
                direction: 0,
                max_count,
            },
            Some(tenant),
            Some("u"),
        )
    };
    let status = log
        .read_stream(read("nope", 0, 0, &app.tenant))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), vec!["stream_id"]);
    let status = log
        .read_stream(read(&id, 0, 1001, &app.tenant))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), vec!["max_count"]);
    let status = log
        .read_stream(read(&id, 2, 0, &app.tenant))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    let unknown = uuid::Uuid::now_v7().to_string();
    let status = log
        .read_stream(read(&unknown, 0, 0, &app.tenant))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = log
        .read_stream(read(&id, 0, 0, "someone-else"))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::NotFound,
        "another tenant's record does not exist"
    );
    let request = app.request(ReadStreamRequest {
        stream_id: id.clone(),
        direction: 7,
        ..ReadStreamRequest::default()
    });
    let status = log.read_stream(request).await.unwrap_err();
    assert_eq!(bad_fields(&status), vec!["direction"]);
    app.stop().await;
}

#[tokio::test]
async fn a_slow_subscriber_holds_no_connection_and_open_streams_are_limited() {
    let app = TestApp::spawn_with(|config| config.query_max_subscriptions = 2).await;
    // 20,000 events, straight into the store.
    let store = crm_event_store::EventStore::connect(
        app.db.config(),
        crm_event_store::StoreOptions::default(),
    )
    .await
    .unwrap();
    for _ in 0..20 {
        store
            .append(crm_event_store::AppendEvents {
                tenant_id: crm_domain::TenantId::parse(&app.tenant).unwrap(),
                streams: vec![crm_event_store::StreamAppend {
                    stream_type: "contact".into(),
                    stream_id: uuid::Uuid::now_v7(),
                    expected: crm_event_store::ExpectedVersion::NoStream,
                    events: (0..1000)
                        .map(|n| {
                            crm_event_store::NewEvent::new(
                                "ContactCreated",
                                serde_json::json!({ "n": n, "padding": "x".repeat(200) }),
                            )
                        })
                        .collect(),
                }],
                idempotency_key: None,
                metadata: crm_event_store::Metadata {
                    actor: "user:ada".into(),
                    ..crm_event_store::Metadata::default()
                },
                reservations: Vec::new(),
                subject_keys: Vec::new(),
                request_fingerprint: None,
            })
            .await
            .unwrap();
    }
    let mut log = event_log(&app);
    let mut slow = log
        .subscribe(app.request(SubscribeRequest::default()))
        .await
        .unwrap()
        .into_inner();
    // The client reads nothing: the server's reader fills its bounded buffer
    // and waits, without keeping a query running. (The relay and the
    // projectors of `crm all` work through the 20,000 events meanwhile, at a
    // lower priority: their queries end, a stalled subscriber's would not.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = app.db.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let active = loop {
        let active: Vec<String> = client
            .query(
                "SELECT application_name || ': ' || left(query, 80) FROM pg_stat_activity \
                 WHERE datname = current_database() AND state = 'active' \
                 AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        if active.is_empty() || std::time::Instant::now() > deadline {
            break active;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        active.is_empty(),
        "no query runs for a stalled subscriber: {active:?}"
    );

    let second = log
        .subscribe(app.request(SubscribeRequest::default()))
        .await
        .unwrap();
    let status = log
        .read_all(app.request(ReadAllRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Closing a stream frees its place.
    drop(second);
    crm_test_support::eventually(Duration::from_secs(10), "a free place", || {
        let mut log = log.clone();
        let request = app.request(ReadAllRequest {
            max_count: 1,
            ..ReadAllRequest::default()
        });
        async move { log.read_all(request).await.ok() }
    })
    .await;

    // The slow subscriber still gets everything, in order.
    let events = take(&mut slow, 20_000).await;
    assert_eq!(positions(&events), (1..=20_000).collect::<Vec<_>>());
    store.shutdown().await;
    app.stop().await;
}
