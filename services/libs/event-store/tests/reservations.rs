//! Unique values per tenant, reserved in the append's own transaction.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test
use crm_domain::TenantId;
use crm_event_store::{
    AppendError, AppendEvents, EventStore, ExpectedVersion, Metadata, NewEvent, Reservation,
    ReservationAction, StoreOptions, StreamAppend,
};
use crm_test_support::TestDb;
use serde_json::json;
use uuid::Uuid;

fn append(
    tenant: &str,
    stream_id: Uuid,
    reservations: Vec<(&str, &[u8], ReservationAction)>,
) -> AppendEvents {
    AppendEvents {
        tenant_id: TenantId::parse(tenant).unwrap(),
        streams: vec![StreamAppend {
            stream_type: "contact".into(),
            stream_id,
            expected: ExpectedVersion::Any,
            events: vec![NewEvent::new("ContactDetailsUpdated", json!({}))],
        }],
        idempotency_key: None,
        metadata: Metadata::default(),
        reservations: reservations
            .into_iter()
            .map(|(kind, hash, action)| Reservation {
                kind: kind.into(),
                key_hash: hash.to_vec(),
                stream_id,
                action,
            })
            .collect(),
        subject_keys: Vec::new(),
        request_fingerprint: None,
    }
}

const CLAIM: ReservationAction = ReservationAction::Claim;
const RELEASE: ReservationAction = ReservationAction::Release;

async fn events(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_claimed_value_is_refused_to_other_streams_naming_the_holder() {
    let db = TestDb::create().await;
    let store = EventStore::connect(db.config(), StoreOptions::default())
        .await
        .unwrap();
    let (ada, bob) = (Uuid::now_v7(), Uuid::now_v7());
    store
        .append(append("t", ada, vec![("email", b"h-ada", CLAIM)]))
        .await
        .unwrap();
    // The holder may claim it again (a retry, or an update that keeps it).
    store
        .append(append("t", ada, vec![("email", b"h-ada", CLAIM)]))
        .await
        .unwrap();
    match store
        .append(append(
            "t",
            bob,
            vec![("email", b"h-ada", CLAIM), ("phone", b"p", CLAIM)],
        ))
        .await
    {
        Err(AppendError::AlreadyReserved { kind, holder }) => {
            assert_eq!((kind.as_str(), holder), ("email", ada))
        }
        other => panic!("expected already reserved, got {other:?}"),
    }
    assert_eq!(events(&db).await, 2, "the refused append stored nothing");
    // Nor its other claim.
    store
        .append(append("t", Uuid::now_v7(), vec![("phone", b"p", CLAIM)]))
        .await
        .unwrap();
    // Another kind or another tenant is another value.
    store
        .append(append("t", bob, vec![("tax_id", b"h-ada", CLAIM)]))
        .await
        .unwrap();
    store
        .append(append("u", bob, vec![("email", b"h-ada", CLAIM)]))
        .await
        .unwrap();
    // Released, it is free for the next stream.
    store
        .append(append("t", ada, vec![("email", b"h-ada", RELEASE)]))
        .await
        .unwrap();
    store
        .append(append("t", bob, vec![("email", b"h-ada", CLAIM)]))
        .await
        .unwrap();
    // Releasing what one does not hold changes nothing.
    store
        .append(append("t", ada, vec![("email", b"h-ada", RELEASE)]))
        .await
        .unwrap();
    assert!(matches!(
        store.append(append("t", ada, vec![("email", b"h-ada", CLAIM)])).await,
        Err(AppendError::AlreadyReserved { holder, .. }) if holder == bob
    ));
    store.shutdown().await;
}

#[tokio::test]
async fn concurrent_claims_of_one_value_from_several_processes_let_exactly_one_win() {
    let db = TestDb::create().await;
    // Three store instances stand for three processes sharing the log lock.
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(
            EventStore::connect(db.config(), StoreOptions::default())
                .await
                .unwrap(),
        );
    }
    for round in 0..5u8 {
        let value = [round; 8];
        let mut calls = Vec::new();
        for i in 0..30 {
            let store = stores[i % 3].clone();
            let request = append("t", Uuid::now_v7(), vec![("email", &value, CLAIM)]);
            calls.push(tokio::spawn(async move { store.append(request).await }));
        }
        let (mut won, mut refused) = (0, 0);
        for call in calls {
            match call.await.unwrap() {
                Ok(_) => won += 1,
                Err(AppendError::AlreadyReserved { .. }) => refused += 1,
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!((won, refused), (1, 29), "round {round}");
    }
    let holders: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM reservations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(holders, 5);
    assert_eq!(events(&db).await, 5);
    for store in stores {
        store.shutdown().await;
    }
}

#[tokio::test]
async fn malformed_reservations_are_refused() {
    let db = TestDb::create().await;
    let store = EventStore::connect(db.config(), StoreOptions::default())
        .await
        .unwrap();
    let id = Uuid::now_v7();
    let mut foreign = append("t", id, vec![("email", b"h", CLAIM)]);
    foreign.reservations[0].stream_id = Uuid::now_v7();
    let cases = [
        (
            append("t", id, vec![("", b"h", CLAIM)]),
            "reservations[0].kind",
        ),
        (
            append("t", id, vec![("email", b"", CLAIM)]),
            "reservations[0].key_hash",
        ),
        (
            append("t", id, vec![("email", &[7u8; 65], CLAIM)]),
            "reservations[0].key_hash",
        ),
        (
            append(
                "t",
                id,
                vec![("email", b"h", CLAIM), ("email", b"h", RELEASE)],
            ),
            "reservations[1]",
        ),
        (foreign, "reservations[0].stream_id"),
    ];
    for (request, field) in cases {
        match store.append(request).await {
            Err(AppendError::Invalid { field: got, .. }) => assert_eq!(got, field),
            other => panic!("expected invalid {field}, got {other:?}"),
        }
    }
    assert_eq!(events(&db).await, 0);
    store.shutdown().await;
}

#[tokio::test]
async fn a_value_transfers_between_streams_of_one_append() {
    let db = TestDb::create().await;
    let store = EventStore::connect(db.config(), StoreOptions::default())
        .await
        .unwrap();
    let (loser, survivor, other) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    store
        .append(append("t", loser, vec![("email", b"h-1", CLAIM)]))
        .await
        .unwrap();
    store
        .append(append("t", other, vec![("email", b"h-2", CLAIM)]))
        .await
        .unwrap();
    let merge = |hash: &[u8]| {
        let mut request = append("t", survivor, vec![]);
        request.streams.push(StreamAppend {
            stream_type: "contact".into(),
            stream_id: loser,
            expected: ExpectedVersion::Any,
            events: vec![NewEvent::new("RecordMergedInto", json!({}))],
        });
        request.reservations.push(Reservation {
            kind: "email".into(),
            key_hash: hash.to_vec(),
            stream_id: survivor,
            action: ReservationAction::Transfer { from: loser },
        });
        request
    };
    // Held by the loser: moves to the survivor.
    store.append(merge(b"h-1")).await.unwrap();
    let holder: Uuid = db
        .client()
        .await
        .query_one(
            "SELECT stream_id FROM reservations WHERE key_hash = $1",
            &[&b"h-1".as_slice()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(holder, survivor);
    // Held by a third stream: refused, nothing stored.
    let before = events(&db).await;
    match store.append(merge(b"h-2")).await {
        Err(AppendError::AlreadyReserved { holder, .. }) => assert_eq!(holder, other),
        result => panic!("expected already reserved, got {result:?}"),
    }
    assert_eq!(events(&db).await, before);
    // Held by nobody: the survivor gets it.
    store.append(merge(b"h-3")).await.unwrap();
    // The loser can no longer claim what moved.
    assert!(matches!(
        store.append(append("t", loser, vec![("email", b"h-1", CLAIM)])).await,
        Err(AppendError::AlreadyReserved { holder, .. }) if holder == survivor
    ));
    // `from` must be another stream of the same append.
    let mut bad = append("t", survivor, vec![]);
    bad.reservations.push(Reservation {
        kind: "email".into(),
        key_hash: b"h-9".to_vec(),
        stream_id: survivor,
        action: ReservationAction::Transfer { from: other },
    });
    assert!(
        matches!(store.append(bad).await, Err(AppendError::Invalid { field, .. }) if field == "reservations[0].from")
    );
    store.shutdown().await;
}
