//! Data quality end to end (DOMAIN.md §5.5, worked example C): the
//! `data_quality` process manager suspects duplicates from the clear values
//! it reads through the command handler, keeps invalid, incomplete and stale
//! records and unmatched orders, and `crm.v1.DataQuality` serves them, with
//! figures computed by hand in the comments.
use std::time::Duration;

use crm_domain::duplicates::pair_id;
use crm_proto::v1::data_quality_client::DataQualityClient;
use crm_proto::v1::{
    AccountKind, ActivityTarget, AssignOwnerRequest, CaptureLeadRequest, ContactPreferences,
    CreateAccountRequest, CreateContactRequest, DismissDuplicateRequest, DuplicateCandidate,
    EmailAddress, EmailAddresses, ErasePersonalDataRequest, ExternalRef, GetCompletenessRequest,
    GetDqReportRequest, KindCompleteness, LeadSource, ListDuplicateCandidatesRequest,
    ListInvalidRecordsRequest, ListStaleRecordsRequest, LogActivityRequest, MergeContactsRequest,
    OrderLine, PersonName, PhoneNumber, PublishTenantSettingsRequest, QueryOptions, Reason,
    RecordOrderRequest, RecordRef, UpdateContactDetailsRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::support::{TestApp, as_caller, at, bad_fields, cny};

async fn app() -> TestApp {
    TestApp::spawn_with(|config| config.query_min_position_wait_ms = 10_000).await
}

fn dq(app: &TestApp) -> DataQualityClient<Channel> {
    DataQualityClient::new(app.channel.clone())
}

fn with_roles<T>(app: &TestApp, roles: &str, message: T) -> Request<T> {
    let mut request = app.request(message);
    request
        .metadata_mut()
        .insert("x-roles", roles.parse().unwrap());
    request
}

fn after(position: u64) -> Option<QueryOptions> {
    Some(QueryOptions {
        min_position: position,
    })
}

fn person(given: &str, family: &str, emails: &[&str], phones: &[&str]) -> CreateContactRequest {
    CreateContactRequest {
        name: Some(PersonName {
            given: given.into(),
            family: family.into(),
        }),
        emails: emails
            .iter()
            .map(|address| EmailAddress {
                address: (*address).into(),
                primary: false,
            })
            .collect(),
        phones: phones
            .iter()
            .map(|number| PhoneNumber {
                number: (*number).into(),
                kind: "mobile".into(),
            })
            .collect(),
        ..CreateContactRequest::default()
    }
}

/// Creates a contact; its id and the log position reached.
async fn create(app: &TestApp, request: CreateContactRequest) -> (String, u64) {
    let reply = app
        .contacts()
        .create_contact(app.request(request))
        .await
        .unwrap()
        .into_inner();
    (reply.stream_id, reply.global_position)
}

async fn candidates(app: &TestApp, status: &str, min_position: u64) -> Vec<DuplicateCandidate> {
    dq(app)
        .list_duplicate_candidates(app.request(ListDuplicateCandidatesRequest {
            options: after(min_position),
            status: status.into(),
            ..ListDuplicateCandidatesRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .candidates
}

/// Waits until `count` pairs are suspected (the process manager appends
/// them after the records' events).
async fn suspected(app: &TestApp, count: usize) -> Vec<DuplicateCandidate> {
    crm_test_support::eventually(Duration::from_secs(20), "the suspected pairs", || async {
        let found = candidates(app, "", 0).await;
        (found.len() == count).then_some(found)
    })
    .await
}

fn sorted(a: &str, b: &str) -> Vec<String> {
    let mut ids = vec![a.to_owned(), b.to_owned()];
    ids.sort();
    ids
}

/// The pair as (record ids, kind, rules, score, status).
fn pair(candidate: &DuplicateCandidate) -> (Vec<String>, &str, Vec<&str>, u32, &str) {
    (
        candidate.record_ids.clone(),
        candidate.kind.as_str(),
        candidate.rules.iter().map(String::as_str).collect(),
        candidate.score,
        candidate.status.as_str(),
    )
}

async fn stored_of_type(app: &TestApp, event_type: &str) -> Vec<(serde_json::Value, String)> {
    app.db
        .client()
        .await
        .query(
            "SELECT payload, metadata->>'actor' FROM events WHERE event_type = $1 \
             ORDER BY global_position",
            &[&event_type],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Every row of the data-quality tables as text.
async fn quality_tables_text(app: &TestApp) -> String {
    let db = app.db.client().await;
    let mut text = String::new();
    for table in [
        "record_quality",
        "quality_summary",
        "duplicate_candidates",
        "dq_blocking_keys",
        "dq_activity_targets",
        "dq_unmatched_orders",
    ] {
        for row in db
            .query(&format!("SELECT row_to_json(t)::text FROM {table} t"), &[])
            .await
            .unwrap()
        {
            text.push_str(row.get::<_, &str>(0));
            text.push('\n');
        }
    }
    text
}

#[tokio::test]
async fn worked_example_c_suspects_phone_and_name_95_merges_and_a_dismissal_holds() {
    let app = app().await;
    // 1. P1 {Li Wei, +8613800138000}; P2 {full-width "Ｌｉ Ｗｅｉ", the same
    // mobile}. Phones are soft-unique, so both are allowed. (DOMAIN.md writes
    // P2's number "+86-138-0013-8000"; interactive commands accept E.164
    // only, and `normalize_phone` folds that form to the same number, as the
    // domain's unit test of example C shows.)
    let (p1, _) = create(&app, person("Li", "Wei", &[], &["+8613800138000"])).await;
    let (p2, _) = create(&app, person("Ｌｉ", "Ｗｅｉ", &[], &["+8613800138000"])).await;

    // 2. DuplicateSuspected† {P1, P2, phone + name, 95}: the same E.164
    // phone (90) with names that fold (NFKC, case) to "li wei" (95).
    let found = suspected(&app, 1).await;
    assert_eq!(
        pair(&found[0]),
        (
            sorted(&p1, &p2),
            "contact",
            vec!["phone", "name"],
            95,
            "suspected"
        )
    );
    let (p1_id, p2_id) = (p1.parse().unwrap(), p2.parse().unwrap());
    assert_eq!(found[0].pair_id, pair_id(p1_id, p2_id).to_string());
    let events = stored_of_type(&app, "DuplicateSuspected").await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].0["record_ids"],
        serde_json::json!(sorted(&p1, &p2))
    );
    assert_eq!(events[0].0["score"], 95);
    assert_eq!(events[0].1, "system:data_quality");

    // 3. MergeRecords: P2 into P1; the pair shows merged.
    let merged = app
        .contacts()
        .merge_contacts(app.manager(MergeContactsRequest {
            survivor_id: p1.clone(),
            loser_ids: vec![p2.clone()],
            ..MergeContactsRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .survivor
        .unwrap()
        .global_position;
    let merged_pairs = candidates(&app, "merged", merged).await;
    assert_eq!(
        pair(&merged_pairs[0]),
        (
            sorted(&p1, &p2),
            "contact",
            vec!["phone", "name"],
            95,
            "merged"
        )
    );
    assert!(candidates(&app, "", merged).await.is_empty());

    // A dismissed pair stays dismissed, whatever happens to its records.
    let (p3, _) = create(&app, person("Wang", "Fang", &[], &["+8613900139000"])).await;
    let (p4, _) = create(&app, person("WANG", "FANG", &[], &["+8613900139000"])).await;
    let found = suspected(&app, 1).await;
    assert_eq!(found[0].record_ids, sorted(&p3, &p4));
    let dismiss = |roles: &str| {
        with_roles(
            &app,
            roles,
            DismissDuplicateRequest {
                options: None,
                record_ids: vec![p4.clone(), p3.clone()],
                reason: Some(Reason {
                    code: "different_people".into(),
                    text: "Namesakes in two cities".into(),
                }),
            },
        )
    };
    let refused = dq(&app)
        .dismiss_duplicate(dismiss("sales_rep"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let dismissed = dq(&app)
        .dismiss_duplicate(dismiss("sales_manager"))
        .await
        .unwrap()
        .into_inner();
    assert!(!dismissed.unchanged);
    let again = dq(&app)
        .dismiss_duplicate(dismiss("admin"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.unchanged, "dismissing twice changes nothing");
    let listed = candidates(&app, "dismissed", dismissed.global_position).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].status.as_str(), listed[0].dismiss_reason.as_str()),
        ("dismissed", "different_people")
    );
    // Later updates of both records make the process manager match them
    // again (phone + name, 95): the pair answers NOT_APPLICABLE, nothing is
    // appended and the pair stays dismissed.
    let mut updated = 0;
    for id in [&p3, &p4] {
        updated = app
            .contacts()
            .update_contact_details(app.request(UpdateContactDetailsRequest {
                contact_id: id.clone(),
                emails: Some(EmailAddresses {
                    items: vec![EmailAddress {
                        address: format!("fang.{}@example.cn", &id[id.len() - 8..]),
                        primary: true,
                    }],
                }),
                ..UpdateContactDetailsRequest::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .global_position;
    }
    assert_eq!(candidates(&app, "dismissed", updated).await.len(), 1);
    assert!(candidates(&app, "", updated).await.is_empty());
    assert_eq!(stored_of_type(&app, "DuplicateSuspected").await.len(), 2);

    // No clear personal value reaches the data-quality tables.
    let tables = quality_tables_text(&app).await;
    for secret in [
        "Wei",
        "Wang",
        "8613800138000",
        "8613900139000",
        "example.cn",
    ] {
        assert!(!tables.contains(secret), "{secret} in the tables");
    }

    // Redelivery: the process manager applies the whole log again (its
    // position reset to 0); every suspicion it sends again carries a key it
    // used before or meets a pair that is already so: only the nudge lands.
    let db = app.db.client().await;
    let all_events = || async {
        db.query_one("SELECT count(*) FROM events", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let before = all_events().await;
    // Every row but the nudge's, and the summary: the same after the replay.
    let rows = |except: String| {
        let db = &db;
        async move {
            let mut text = String::new();
            for row in db
                .query(
                    "SELECT row_to_json(r)::text FROM record_quality r \
                     WHERE record_id::text <> $1 ORDER BY record_id",
                    &[&except],
                )
                .await
                .unwrap()
            {
                text.push_str(row.get::<_, &str>(0));
                text.push('\n');
            }
            text
        }
    };
    let summary = || async {
        db.query(
            "SELECT owner, kind, records, completeness_sum FROM quality_summary ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| {
            let (owner, kind): (String, String) = (row.get(0), row.get(1));
            ((owner, kind), (row.get::<_, i64>(2), row.get::<_, i64>(3)))
        })
        .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (rows_before, mut summary_before) = (rows(String::new()).await, summary().await);
    crate::support::reset_position(&app, "data_quality").await;
    let (nudge_id, nudge) = create(&app, person("Nudge", "", &[], &[])).await;
    crate::support::reached(&app, "data_quality", nudge).await;
    assert_eq!(all_events().await, before + 1, "only the nudge");
    assert_eq!(
        rows(nudge_id.clone()).await,
        rows_before,
        "records replayed"
    );
    let share = db
        .query_one(
            "SELECT owner, kind, completeness::bigint FROM record_quality \
             WHERE record_id::text = $1",
            &[&nudge_id],
        )
        .await
        .unwrap();
    let entry = summary_before
        .entry((share.get(0), share.get(1)))
        .or_insert((0, 0));
    entry.0 += 1;
    entry.1 += share.get::<_, i64>(2);
    assert_eq!(summary().await, summary_before, "each record counted once");
    assert_eq!(candidates(&app, "merged", nudge).await.len(), 1);
    assert_eq!(candidates(&app, "dismissed", nudge).await.len(), 1);
    assert!(candidates(&app, "", nudge).await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn the_same_email_in_another_case_scores_100_and_the_tenant_threshold_applies() {
    let app = app().await;
    // A lead against a contact: emails compare lowercased.
    let (ada, _) = create(&app, person("Ada", "Lovelace", &["ada@example.com"], &[])).await;
    let lead = app
        .leads()
        .capture_lead(app.request(CaptureLeadRequest {
            name: Some(PersonName {
                given: "Augusta".into(),
                family: "King".into(),
            }),
            company: "Analytical Engines".into(),
            emails: vec![EmailAddress {
                address: "ADA@Example.COM".into(),
                primary: true,
            }],
            source: Some(LeadSource {
                channel: "web".into(),
                ..LeadSource::default()
            }),
            ..CaptureLeadRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let found = suspected(&app, 1).await;
    assert_eq!(
        pair(&found[0]),
        (
            sorted(&ada, &lead),
            "lead_contact",
            vec!["email"],
            100,
            "suspected"
        )
    );

    // The tenant raises its threshold to 96 and keeps emails soft-unique.
    let settings = app
        .configuration()
        .publish_tenant_settings(with_roles(
            &app,
            "admin",
            PublishTenantSettingsRequest {
                duplicate_threshold: 96,
                uniqueness: [("email".to_owned(), "soft".to_owned())].into(),
                ..crate::support::tenant_settings("Asia/Shanghai", "CNY")
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(settings.global_position > 0);
    // Two contacts with one email in two cases: allowed (soft), 100 ≥ 96.
    let (grace, _) = create(
        &app,
        person("Grace", "Hopper", &["grace@navy.example"], &[]),
    )
    .await;
    let (other, _) = create(
        &app,
        person("Amazing", "Grace", &["Grace@Navy.Example"], &[]),
    )
    .await;
    // Phone and name: 95 < 96, not suspected any more.
    create(&app, person("Zhang", "Min", &[], &["+8613700137001"])).await;
    let (_, last) = create(&app, person("Zhang", "Min", &[], &["+8613700137001"])).await;
    let found = suspected(&app, 2).await;
    let listed = candidates(&app, "", last).await;
    assert_eq!(listed.len(), 2, "the 95 pair stays below the threshold");
    let emails = found
        .iter()
        .find(|c| c.kind == "contact")
        .expect("the contacts' pair");
    assert_eq!(
        pair(emails),
        (
            sorted(&grace, &other),
            "contact",
            vec!["email"],
            100,
            "suspected"
        )
    );
    // Highest score first, then by pair id; pages of one.
    let first = dq(&app)
        .list_duplicate_candidates(app.request(ListDuplicateCandidatesRequest {
            page_size: 1,
            ..ListDuplicateCandidatesRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.candidates.len(), 1);
    let second = dq(&app)
        .list_duplicate_candidates(app.request(ListDuplicateCandidatesRequest {
            page_size: 1,
            page_token: first.next_page_token.clone(),
            ..ListDuplicateCandidatesRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.candidates.len(), 1);
    assert!(second.next_page_token.is_empty());
    assert!(first.candidates[0].pair_id < second.candidates[0].pair_id);
    // Only the pairs of a record, or of a kind.
    let of_lead = dq(&app)
        .list_duplicate_candidates(app.request(ListDuplicateCandidatesRequest {
            record_id: lead.clone(),
            ..ListDuplicateCandidatesRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .candidates;
    assert_eq!(of_lead.len(), 1);
    assert_eq!(of_lead[0].kind, "lead_contact");
    app.stop().await;
}

fn order(id: &str, account_id: &str, tax_id: &str) -> RecordOrderRequest {
    RecordOrderRequest {
        options: at("2026-01-10T09:00:00Z"),
        external: Some(ExternalRef {
            source: "erp".into(),
            external_id: id.into(),
            external_version: 1,
        }),
        account_id: account_id.into(),
        customer_tax_id: tax_id.into(),
        customer_ref: "C-7".into(),
        status: "paid".into(),
        lines: vec![OrderLine {
            sku: "A".into(),
            quantity: 1,
            unit_price: cny(10_000),
            line_total: cny(10_000),
            line_cost: None,
        }],
        net: cny(10_000),
        tax: cny(1_300),
        gross: cny(11_300),
        ordered_on: "2026-01-10".into(),
        ..RecordOrderRequest::default()
    }
}

async fn stale(
    app: &TestApp,
    as_of: &str,
    kind: &str,
    min_position: u64,
) -> Vec<(String, Vec<String>, u32, u32)> {
    dq(app)
        .list_stale_records(app.request(ListStaleRecordsRequest {
            options: after(min_position),
            as_of: as_of.into(),
            kind: kind.into(),
            ..ListStaleRecordsRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .records
        .into_iter()
        .map(|r| {
            (
                r.record_id,
                r.reasons,
                r.days_without_touch,
                r.days_unmodified,
            )
        })
        .collect()
}

/// A listed invalid record: id, kind, (field, rule) of each issue.
type Listed<'a> = (String, &'a str, Vec<(&'a str, &'a str)>);

#[tokio::test]
async fn invalid_incomplete_stale_and_unmatched_records_add_up_by_hand() {
    let app = app().await;
    // C1: every contact field but an account; language `en-UK` (UK is no
    // ISO 3166-1 country). Completeness: name 3 + email 3 + phone 1 +
    // title 1 + owner 1 + language 1 = 10 of 11 → 90.
    let mut c1 = person("Mei", "Chen", &["mei@example.cn"], &["+8613500135000"]);
    c1.title = "Buyer".into();
    c1.preferences = Some(ContactPreferences {
        language: "en-UK".into(),
        ..ContactPreferences::default()
    });
    c1.options = at("2026-01-05T09:00:00Z");
    let (c1, _) = create(&app, c1).await;
    app.records()
        .assign_owner(app.request(AssignOwnerRequest {
            options: at("2026-01-05T10:00:00Z"),
            record: Some(RecordRef {
                r#type: "contact".into(),
                id: c1.clone(),
            }),
            owner: "user:ada".into(),
            ..AssignOwnerRequest::default()
        }))
        .await
        .unwrap();
    // C2: a name only, created a year before: 3 of 11 → 27; email missing.
    let mut c2 = person("Solo", "", &[], &[]);
    c2.options = at("2025-01-01T09:00:00Z");
    let (c2, _) = create(&app, c2).await;
    // L1: name 3 + company 3 + email 3 + source 1 = 10 of 12 → 83.
    let l1 = app
        .leads()
        .capture_lead(app.request(CaptureLeadRequest {
            options: at("2026-01-01T09:00:00Z"),
            name: Some(PersonName {
                given: "Li".into(),
                family: "Na".into(),
            }),
            company: "Globex Ltd".into(),
            emails: vec![EmailAddress {
                address: "lina@globex.example".into(),
                primary: true,
            }],
            source: Some(LeadSource {
                channel: "web".into(),
                ..LeadSource::default()
            }),
            ..CaptureLeadRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    // A1: no owner (required); name 3 + domain 1 + industry 1 + tax id 1 =
    // 6 of 10 → 60; its tax id's check character should be 3, not 4.
    let a1 = app
        .accounts()
        .create_account(app.request(CreateAccountRequest {
            options: at("2026-01-02T09:00:00Z"),
            kind: AccountKind::Company as i32,
            name: "Initech".into(),
            domains: vec!["initech.example".into()],
            industry: "software".into(),
            tax_id: "91350100M000100Y44".into(),
            ..CreateAccountRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    // Touches: one on C1 whose outcome says nothing (T1), one on L1.
    let touch = |target: (&str, &str), outcome: &str, when: &str| LogActivityRequest {
        options: at(when),
        kind: "call".into(),
        direction: "outbound".into(),
        targets: vec![ActivityTarget {
            kind: target.0.into(),
            id: target.1.into(),
        }],
        outcome: outcome.into(),
        ..LogActivityRequest::default()
    };
    let t1 = app
        .activities()
        .log_activity(app.request(touch(("contact", &c1), "ok", "2026-01-06T09:00:00Z")))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    app.activities()
        .log_activity(app.request(touch(
            ("lead", &l1),
            "Agreed to a demo next Tuesday",
            "2026-01-20T09:00:00Z",
        )))
        .await
        .unwrap();
    // Orders: one matches no account; A1's paid order makes it a customer.
    app.commerce()
        .record_order(app.erp(order("SO-1", "", "91110000802100433B")))
        .await
        .unwrap();
    app.commerce()
        .record_order(app.erp(order("SO-2", &a1, "")))
        .await
        .unwrap();
    // The lifecycle process manager marks A1 a customer; 103 days after its
    // creation without a touch it is stale (≥ 90).
    let position =
        crm_test_support::eventually(Duration::from_secs(20), "A1 a customer", || async {
            let db = app.db.client().await;
            db.query_opt(
                "SELECT global_position FROM events WHERE event_type = 'AccountBecameCustomer'",
                &[],
            )
            .await
            .unwrap()
            .map(|row| u64::try_from(row.get::<_, i64>(0)).unwrap())
        })
        .await;

    // Invalid or incomplete, by record id, every issue named.
    let invalid = dq(&app)
        .list_invalid_records(app.request(ListInvalidRecordsRequest {
            options: after(position),
            ..ListInvalidRecordsRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let mut expected = vec![
        (
            c1.clone(),
            "contact",
            vec![("preferences.language", "iso_country")],
        ),
        (c2.clone(), "contact", vec![("email", "missing_required")]),
        (
            a1.clone(),
            "account",
            vec![
                ("tax_id", "tax_id_check_digit"),
                ("owner", "missing_required"),
            ],
        ),
        (
            t1.clone(),
            "activity",
            vec![("outcome", "outcome_too_short")],
        ),
    ];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    let got: Vec<Listed> = invalid
        .records
        .iter()
        .map(|r| {
            (
                r.record_id.clone(),
                r.kind.as_str(),
                r.issues
                    .iter()
                    .map(|i| (i.field.as_str(), i.rule.as_str()))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(got, expected);
    let by_rule = dq(&app)
        .list_invalid_records(app.request(ListInvalidRecordsRequest {
            rule: "tax_id_check_digit".into(),
            ..ListInvalidRecordsRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(by_rule.len(), 1);
    assert_eq!(by_rule[0].record_id, a1);
    let owned: Vec<String> = dq(&app)
        .list_invalid_records(app.request(ListInvalidRecordsRequest {
            owner: "user:ada".into(),
            page_size: 1,
            ..ListInvalidRecordsRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .records
        .into_iter()
        .map(|r| r.record_id)
        .collect();
    assert_eq!(
        owned,
        [c1.clone().min(t1.clone())],
        "C1 and T1 are ada's; page of one"
    );

    // Completeness of one record, and per owner: ada owns C1 (90 → 9000 bp);
    // C2, L1 and A1 have no owner: (27 + 83 + 60) ÷ 3 = 56.66 → 5666 bp.
    let c1_completeness = dq(&app)
        .get_completeness(app.request(GetCompletenessRequest {
            record_id: c1.clone(),
            ..GetCompletenessRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(
        (
            c1_completeness.completeness,
            c1_completeness.missing_required.clone(),
            c1_completeness.missing_recommended.clone(),
            c1_completeness.owner.as_str()
        ),
        (90, vec![], vec!["account".to_owned()], "user:ada")
    );
    let owners = dq(&app)
        .get_completeness(app.request(GetCompletenessRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .owners;
    let figures: Vec<(&str, u64, u32)> = owners
        .iter()
        .map(|o| (o.owner.as_str(), o.records, o.mean_completeness_bp))
        .collect();
    assert_eq!(figures, [("", 3, 5666), ("user:ada", 1, 9000)]);
    let kind = |k: &str, records, bp| KindCompleteness {
        kind: k.into(),
        records,
        mean_completeness_bp: bp,
    };
    assert_eq!(
        owners[0].kinds,
        [
            kind("account", 1, 6000),
            kind("contact", 1, 2700),
            kind("lead", 1, 8300)
        ]
    );

    // Staleness at a chosen instant. 2026-02-10: C2 unmodified since
    // 2025-01-01 (405 days ≥ 365); L1 touched 21 days before (< 30); A1 a
    // customer 39 days without a touch (< 90).
    assert_eq!(
        stale(&app, "2026-02-10T09:00:00Z", "", position).await,
        [(c2.clone(), vec!["unmodified".to_owned()], 405, 405)]
    );
    // 2026-02-20: L1's last touch is 31 days old.
    let mut expected = vec![
        (c2.clone(), vec!["unmodified".to_owned()], 415, 415),
        (l1.clone(), vec!["no_touch".to_owned()], 31, 50),
    ];
    expected.sort();
    assert_eq!(
        stale(&app, "2026-02-20T09:00:00Z", "", position).await,
        expected
    );
    assert_eq!(
        stale(&app, "2026-02-20T09:00:00Z", "lead", position).await,
        [(l1.clone(), vec!["no_touch".to_owned()], 31, 50)]
    );
    // Before the others existed, C2 was young.
    assert!(
        stale(&app, "2025-06-01T00:00:00Z", "", position)
            .await
            .is_empty()
    );

    // The periodic check at 2026-04-15: C2 unmodified; L1 85 days and A1
    // 103 days without a touch.
    let report = dq(&app)
        .get_dq_report(app.request(GetDqReportRequest {
            options: after(position),
            as_of: "2026-04-15T09:00:00Z".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let rules: Vec<(&str, u64)> = report
        .invalid_by_rule
        .iter()
        .map(|r| (r.rule.as_str(), r.records))
        .collect();
    assert_eq!(
        rules,
        [
            ("iso_country", 1),
            ("outcome_too_short", 1),
            ("tax_id_check_digit", 1)
        ]
    );
    let missing: Vec<(&str, &str, u64)> = report
        .missing_by_field
        .iter()
        .map(|f| (f.kind.as_str(), f.field.as_str(), f.records))
        .collect();
    assert_eq!(missing, [("account", "owner", 1), ("contact", "email", 1)]);
    let kinds = |counts: &[crm_proto::v1::KindCount]| -> Vec<(String, u64)> {
        counts.iter().map(|c| (c.kind.clone(), c.records)).collect()
    };
    assert_eq!(
        kinds(&report.stale_no_touch),
        [("account".to_owned(), 1), ("lead".to_owned(), 1)]
    );
    assert_eq!(kinds(&report.stale_unmodified), [("contact".to_owned(), 1)]);
    // (90 + 27 + 83 + 60) ÷ 4 = 65 % → 6500 bp.
    assert_eq!(
        (
            report.duplicates_open,
            report.invalid_records,
            report.incomplete_records,
            report.stale_records,
            report.unmatched_orders,
            report.records,
            report.mean_completeness_bp
        ),
        (0, 3, 2, 3, 1, 4, Some(6500))
    );

    // The tenant gives leads 40 days: L1 (31) is no longer stale.
    let settings = app
        .configuration()
        .publish_tenant_settings(with_roles(
            &app,
            "admin",
            PublishTenantSettingsRequest {
                stale_days_lead: 40,
                ..crate::support::tenant_settings("Asia/Shanghai", "CNY")
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .global_position;
    assert!(
        stale(&app, "2026-02-20T09:00:00Z", "lead", settings)
            .await
            .is_empty()
    );
    app.stop().await;
}

#[tokio::test]
async fn erasing_a_subject_removes_its_rows() {
    let app = app().await;
    let (erased, _) = create(
        &app,
        person("Zhao", "Lei", &["zhao@example.com"], &["+8613600136000"]),
    )
    .await;
    let (kept, _) = create(&app, person("Zhao", "Lei", &[], &["+8613600136000"])).await;
    let found = suspected(&app, 1).await;
    assert_eq!(found[0].record_ids, sorted(&erased, &kept));

    let position = app
        .contacts()
        .erase_personal_data(with_roles(
            &app,
            "admin",
            ErasePersonalDataRequest {
                options: None,
                contact_id: erased.clone(),
                request: "DSR-7".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .global_position;
    for status in ["", "dismissed", "merged"] {
        assert!(candidates(&app, status, position).await.is_empty());
    }
    let missing = dq(&app)
        .get_completeness(app.request(GetCompletenessRequest {
            record_id: erased.clone(),
            ..GetCompletenessRequest::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    dq(&app)
        .get_completeness(app.request(GetCompletenessRequest {
            record_id: kept.clone(),
            ..GetCompletenessRequest::default()
        }))
        .await
        .unwrap();
    let db = app.db.client().await;
    let id: uuid::Uuid = erased.parse().unwrap();
    for (table, column) in [
        ("record_quality", "record_id"),
        ("dq_blocking_keys", "record_id"),
        ("duplicate_candidates", "record_a"),
        ("duplicate_candidates", "record_b"),
    ] {
        let n: i64 = db
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE {column} = $1"),
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{table}.{column}");
    }
    let report = dq(&app)
        .get_dq_report(app.request(GetDqReportRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((report.duplicates_open, report.records), (0, 1));
    app.stop().await;
}

#[tokio::test]
async fn bad_inputs_name_their_fields_and_tenants_are_isolated() {
    let app = app().await;
    let (p, _) = create(&app, person("Sun", "Yue", &[], &["+8613300133000"])).await;
    let (q, _) = create(&app, person("Sun", "Yue", &[], &["+8613300133000"])).await;
    suspected(&app, 1).await;

    // Another tenant sees none of it and cannot dismiss it.
    let other = |message| as_caller(message, Some("other-tenant"), Some("user:eve"));
    let listed = dq(&app)
        .list_duplicate_candidates(other(ListDuplicateCandidatesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.candidates.is_empty());
    let status = dq(&app)
        .get_completeness(as_caller(
            GetCompletenessRequest {
                record_id: p.clone(),
                ..GetCompletenessRequest::default()
            },
            Some("other-tenant"),
            Some("user:eve"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let mut request = as_caller(
        DismissDuplicateRequest {
            options: None,
            record_ids: vec![p.clone(), q.clone()],
            reason: Some(Reason {
                code: "different_people".into(),
                text: String::new(),
            }),
        },
        Some("other-tenant"),
        Some("user:eve"),
    );
    request
        .metadata_mut()
        .insert("x-roles", "admin".parse().unwrap());
    assert_eq!(
        dq(&app)
            .dismiss_duplicate(request)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let report = dq(&app)
        .get_dq_report(as_caller(
            GetDqReportRequest::default(),
            Some("other-tenant"),
            Some("user:eve"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((report.duplicates_open, report.records), (0, 0));
    let unauthenticated = dq(&app)
        .get_dq_report(as_caller(
            GetDqReportRequest::default(),
            None,
            Some("user:eve"),
        ))
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);

    // Bad inputs: INVALID_ARGUMENT naming each field.
    let list = |f: fn(&mut ListDuplicateCandidatesRequest)| {
        let mut request = ListDuplicateCandidatesRequest::default();
        f(&mut request);
        app.request(request)
    };
    for (request, field) in [
        (list(|r| r.status = "open".into()), "status"),
        (list(|r| r.kind = "person".into()), "kind"),
        (list(|r| r.record_id = "not-a-uuid".into()), "record_id"),
        (list(|r| r.page_size = 201), "page_size"),
        (list(|r| r.page_token = "garbage".into()), "page_token"),
    ] {
        let status = dq(&app)
            .list_duplicate_candidates(request)
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), [field]);
    }
    let dismiss = |ids: Vec<String>, code: &str| {
        with_roles(
            &app,
            "sales_manager",
            DismissDuplicateRequest {
                options: None,
                record_ids: ids,
                reason: Some(Reason {
                    code: code.into(),
                    text: String::new(),
                }),
            },
        )
    };
    let fresh = || uuid::Uuid::now_v7().to_string();
    for (request, fields) in [
        (dismiss(vec![p.clone()], "x"), vec!["record_ids"]),
        (
            dismiss(vec!["x".into(), "y".into()], "x"),
            vec!["record_ids[0]", "record_ids[1]"],
        ),
        (dismiss(vec![p.clone(), p.clone()], "x"), vec!["record_ids"]),
        (
            dismiss(vec![fresh(), fresh()], "Not A Code"),
            vec!["reason.code"],
        ),
    ] {
        let status = dq(&app).dismiss_duplicate(request).await.unwrap_err();
        assert_eq!(bad_fields(&status), fields);
    }
    let never = dq(&app)
        .dismiss_duplicate(dismiss(vec![fresh(), fresh()], "different_people"))
        .await
        .unwrap_err();
    assert_eq!(never.code(), Code::NotFound, "a pair never suspected");
    let no_role = dq(&app)
        .dismiss_duplicate(app.request(DismissDuplicateRequest {
            options: None,
            record_ids: vec![p.clone(), q.clone()],
            reason: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(no_role.code(), Code::PermissionDenied);

    let invalid = |f: fn(&mut ListInvalidRecordsRequest)| {
        let mut request = ListInvalidRecordsRequest::default();
        f(&mut request);
        app.request(request)
    };
    for (request, field) in [
        (invalid(|r| r.kind = "ticket".into()), "kind"),
        (invalid(|r| r.rule = "bogus".into()), "rule"),
        (invalid(|r| r.owner = "o".repeat(201)), "owner"),
        (invalid(|r| r.page_token = "nope".into()), "page_token"),
    ] {
        let status = dq(&app).list_invalid_records(request).await.unwrap_err();
        assert_eq!(bad_fields(&status), [field]);
    }
    for (request, field) in [
        (
            ListStaleRecordsRequest {
                as_of: "yesterday".into(),
                ..ListStaleRecordsRequest::default()
            },
            "as_of",
        ),
        (
            ListStaleRecordsRequest {
                kind: "activity".into(),
                ..ListStaleRecordsRequest::default()
            },
            "kind",
        ),
    ] {
        let status = dq(&app)
            .list_stale_records(app.request(request))
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), [field]);
    }
    for (request, field) in [
        (
            GetCompletenessRequest {
                record_id: "nope".into(),
                ..GetCompletenessRequest::default()
            },
            "record_id",
        ),
        (
            GetCompletenessRequest {
                page_token: "zz".into(),
                ..GetCompletenessRequest::default()
            },
            "page_token",
        ),
    ] {
        let status = dq(&app)
            .get_completeness(app.request(request))
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), [field]);
    }
    let status = dq(&app)
        .get_dq_report(app.request(GetDqReportRequest {
            options: None,
            as_of: "2026-13-01".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["as_of"]);
    app.stop().await;
}

#[tokio::test]
async fn an_open_deal_is_stale_after_14_days_without_a_touch() {
    let app = app().await;
    let (account, pipeline) = crate::opportunities::setup(&app).await;
    let open = |name: &str| {
        let mut request = crate::opportunities::deal(&account, &pipeline);
        request.name = name.into();
        request.options = at("2026-03-01T09:00:00Z");
        app.request(request)
    };
    let d1 = app
        .opportunities()
        .open_opportunity(open("Touched"))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let d2 = app
        .opportunities()
        .open_opportunity(open("Lost"))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    app.activities()
        .log_activity(app.request(LogActivityRequest {
            options: at("2026-03-05T09:00:00Z"),
            kind: "email".into(),
            direction: "outbound".into(),
            targets: vec![ActivityTarget {
                kind: "opportunity".into(),
                id: d1.clone(),
            }],
            outcome: "Sent the revised quote to procurement".into(),
            ..LogActivityRequest::default()
        }))
        .await
        .unwrap();
    let lost = app
        .opportunities()
        .lose_opportunity(app.request(crate::opportunities::lost(
            &d2,
            "price",
            at("2026-03-02T09:00:00Z"),
        )))
        .await
        .unwrap()
        .into_inner()
        .global_position;
    // D1 was touched on 03-05: 13 days on 03-18, 14 on 03-19 (≥ 14); it was
    // opened (last modified) 18 days before. D2 is closed: never stale for
    // want of a touch.
    assert!(
        stale(&app, "2026-03-18T09:00:00Z", "deal", lost)
            .await
            .is_empty()
    );
    assert_eq!(
        stale(&app, "2026-03-19T09:00:00Z", "deal", lost).await,
        [(d1, vec!["no_touch".to_owned()], 14, 18)]
    );
    app.stop().await;
}

#[tokio::test]
async fn duplicates_created_together_are_suspected_once_whatever_batch_they_land_in() {
    let app = app().await;
    // Created at once, so the process manager most likely takes them in one
    // batch: each finds the others from the keys stored before the batch
    // and those the batch wrote before it.
    let (a, b, c) = tokio::join!(
        create(&app, person("Li", "Wei", &[], &["+8613800138111"])),
        create(&app, person("Ｌｉ", "Ｗｅｉ", &[], &["+8613800138111"])),
        create(&app, person("Zhang", "San", &[], &["+8613900139222"])),
    );
    let found = suspected(&app, 1).await;
    assert_eq!(found[0].record_ids, sorted(&a.0, &b.0));
    assert_eq!((found[0].score, found[0].kind.as_str()), (95, "contact"));
    // A later duplicate of the first two meets both (keys stored earlier).
    let (d, _) = create(&app, person("Li", "Wei", &[], &["+8613800138111"])).await;
    let found = suspected(&app, 3).await;
    let with_d = found.iter().filter(|p| p.record_ids.contains(&d)).count();
    assert_eq!(with_d, 2);
    assert!(!found.iter().any(|p| p.record_ids.contains(&c.0)));
    app.stop().await;
}
