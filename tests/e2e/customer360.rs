//! `crm.v1.Customer360`: one account's picture in one call and its timeline,
//! fed a worked scenario whose figures are computed by hand below; personal
//! data decrypted for the tenant and empty once erased; merged contacts and
//! accounts resolved to their survivor (DOMAIN.md §2.11, worked example C);
//! bad inputs and tenant isolation.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crm_proto::v1::customer360_client::Customer360Client;
use crm_proto::v1::{
    AccountKind, ActivityTarget, AddTicketMessageRequest, ChangeContactConsentRequest,
    ChangeOpportunityStageRequest, ChangeTagsRequest, CompleteActivityRequest, ContactPreferences,
    CreateAccountRequest, CreateContactRequest, CustomerView, EmailAddress,
    ErasePersonalDataRequest, ExternalRef, FlagAccountChurnRiskRequest, GetCustomer360Request,
    IssueRefundRequest, LinkContactToAccountRequest, ListTimelineRequest, LogActivityRequest,
    MergeAccountsRequest, MergeContactsRequest, OpenOpportunityRequest, OpenTicketRequest,
    OrderLine, PersonName, PhoneNumber, PipelineStage, PublishBusinessCalendarRequest,
    PublishPipelineRequest, PublishSlaPolicyRequest, QueryOptions, RecordCsatRequest,
    RecordInvoiceRequest, RecordNpsResponseRequest, RecordOrderRequest, RecordPaymentRequest,
    RecordRef, ScheduleActivityRequest, SlaTargets, SolveTicketRequest, StageKind, TimelineEntry,
    WinOpportunityRequest, WorkingHours,
};
use tonic::Code;

use crate::support::{
    TestApp, TestClock, as_caller, at, bad_fields, cny, first_column, settled, test_scheduler,
};

fn with_role<T>(app: &TestApp, role: &str, message: T) -> tonic::Request<T> {
    let mut request = app.request(message);
    request
        .metadata_mut()
        .insert("x-roles", role.parse().unwrap());
    request
}

fn client(app: &TestApp) -> Customer360Client<tonic::transport::Channel> {
    Customer360Client::new(app.channel.clone())
}

fn ts(text: &str) -> String {
    text.parse::<jiff::Timestamp>().unwrap().to_string()
}

async fn account(app: &TestApp, name: &str, when: &str) -> String {
    app.accounts()
        .create_account(app.request(CreateAccountRequest {
            options: at(when),
            kind: AccountKind::Company.into(),
            name: name.into(),
            domains: vec![format!("{}.example", name.to_lowercase().replace(' ', "-"))],
            industry: "wholesale".into(),
            segment: "smb".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id
}

async fn contact(
    app: &TestApp,
    given: &str,
    family: &str,
    email: &str,
    phone: &str,
    when: &str,
) -> String {
    app.contacts()
        .create_contact(app.request(CreateContactRequest {
            options: at(when),
            name: Some(PersonName {
                given: given.into(),
                family: family.into(),
            }),
            emails: vec![EmailAddress {
                address: email.into(),
                primary: true,
            }],
            phones: vec![PhoneNumber {
                number: phone.into(),
                kind: "mobile".into(),
            }],
            title: "Buyer".into(),
            preferences: Some(ContactPreferences {
                channel: "email".into(),
                language: "zh-CN".into(),
                time_zone: "Asia/Shanghai".into(),
                do_not_contact: false,
            }),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id
}

async fn link(app: &TestApp, contact: &str, account: &str, role: &str, primary: bool, when: &str) {
    app.contacts()
        .link_contact_to_account(app.request(LinkContactToAccountRequest {
            options: at(when),
            contact_id: contact.into(),
            account_id: account.into(),
            role: role.into(),
            primary,
        }))
        .await
        .unwrap();
}

fn external(id: &str, version: u64) -> Option<ExternalRef> {
    Some(ExternalRef {
        source: "erp".into(),
        external_id: id.into(),
        external_version: version,
    })
}

/// An order of one line, `net` + 13 % tax.
#[allow(clippy::too_many_arguments)]
async fn order(
    app: &TestApp,
    account: &str,
    id: &str,
    status: &str,
    net: i64,
    ordered: &str,
    promised: &str,
    when: &str,
) -> String {
    let tax = net * 13 / 100;
    app.commerce()
        .record_order(app.erp(RecordOrderRequest {
            options: at(when),
            external: external(id, 1),
            account_id: account.into(),
            customer_ref: "C-42".into(),
            status: status.into(),
            lines: vec![OrderLine {
                sku: "WIDGET".into(),
                quantity: 1,
                unit_price: cny(net),
                line_total: cny(net),
                line_cost: None,
            }],
            net: cny(net),
            tax: cny(tax),
            gross: cny(net + tax),
            ordered_on: ordered.into(),
            promised_delivery: promised.into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id
}

fn target(kind: &str, id: &str) -> ActivityTarget {
    ActivityTarget {
        kind: kind.into(),
        id: id.into(),
    }
}

async fn log(
    app: &TestApp,
    kind: &str,
    direction: &str,
    targets: Vec<ActivityTarget>,
    outcome: &str,
    when: &str,
) {
    app.activities()
        .log_activity(app.request(LogActivityRequest {
            options: at(when),
            kind: kind.into(),
            direction: direction.into(),
            targets,
            outcome: outcome.into(),
            body: "What was said stays in the activity".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
}

async fn nps(app: &TestApp, contact: &str, score: u32, when: &str) {
    app.contacts()
        .record_nps_response(app.request(RecordNpsResponseRequest {
            options: at(when),
            contact_id: contact.into(),
            score,
            comment: String::new(),
        }))
        .await
        .unwrap();
}

async fn ticket(
    app: &TestApp,
    requester: &str,
    account: &str,
    kind: &str,
    priority: &str,
    subject: &str,
    when: &str,
) -> String {
    app.tickets()
        .open_ticket(app.request(OpenTicketRequest {
            options: at(when),
            requester_id: requester.into(),
            account_id: account.into(),
            channel: "email".into(),
            r#type: kind.into(),
            priority: priority.into(),
            subject: subject.into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id
}

/// Mon–Fri 09:00–18:00 Asia/Shanghai; incidents at high priority: first
/// response 2 h, resolution 16 business hours.
async fn incident_policy(app: &TestApp) {
    let calendar = app
        .configuration()
        .publish_business_calendar(with_role(
            app,
            "service_manager",
            PublishBusinessCalendarRequest {
                options: at("2026-11-01T00:00:00Z"),
                name: "Shanghai office".into(),
                time_zone: "Asia/Shanghai".into(),
                weekly: (1..=5)
                    .map(|weekday| WorkingHours {
                        weekday,
                        start: "09:00".into(),
                        end: "18:00".into(),
                    })
                    .collect(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let targets = |priority: &str, first, resolution| SlaTargets {
        priority: priority.into(),
        first_response_minutes: first,
        next_response_minutes: 1440,
        resolution_minutes: resolution,
    };
    app.configuration()
        .publish_sla_policy(with_role(
            app,
            "service_manager",
            PublishSlaPolicyRequest {
                options: at("2026-11-01T00:00:00Z"),
                name: "Incidents".into(),
                order: 1,
                ticket_types: vec!["incident".into()],
                targets: vec![
                    targets("urgent", 60, 480),
                    targets("high", 120, 960),
                    targets("normal", 240, 1920),
                    targets("low", 480, 2880),
                ],
                calendar_id: calendar,
                pause_statuses: vec!["pending".into()],
                warning_percent: 75,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
}

async fn pipeline(app: &TestApp) -> String {
    let stage = |key: &str, kind: StageKind, probability_bp: u32, category: &str| PipelineStage {
        key: key.into(),
        name: key.into(),
        kind: kind.into(),
        probability_bp,
        category: category.into(),
        max_days_in_stage: 14,
        required_fields: vec![],
    };
    app.pipelines()
        .publish_pipeline(crate::configuration::with_roles(
            app,
            PublishPipelineRequest {
                options: at("2026-11-01T00:00:00Z"),
                name: "Sales".into(),
                stages: vec![
                    stage("qualification", StageKind::Open, 1000, "pipeline"),
                    stage("proposal", StageKind::Open, 5000, "best_case"),
                    stage("won", StageKind::Won, 10_000, "closed"),
                    stage("lost", StageKind::Lost, 0, "omitted"),
                ],
                ..Default::default()
            },
            "sales_manager",
        ))
        .await
        .unwrap()
        .into_inner()
        .stream_id
}

async fn deal(
    app: &TestApp,
    account: &str,
    pipeline: &str,
    name: &str,
    amount: i64,
    when: &str,
) -> String {
    app.opportunities()
        .open_opportunity(app.request(OpenOpportunityRequest {
            options: at(when),
            name: name.into(),
            account_id: account.into(),
            pipeline_id: pipeline.into(),
            stage: "qualification".into(),
            amount: cny(amount),
            close_date: "2026-12-31".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id
}

async fn view(app: &TestApp, account: &str, min_position: u64) -> CustomerView {
    client(app)
        .get_customer360(app.request(GetCustomer360Request {
            options: Some(QueryOptions { min_position }),
            account_id: account.into(),
            as_of: "2026-11-21T00:00:00Z".into(),
            limit: 0,
        }))
        .await
        .unwrap()
        .into_inner()
}

/// Every page of the account's timeline, `size` entries at a time.
async fn timeline(
    app: &TestApp,
    account: &str,
    kinds: &[&str],
    size: u32,
    min_position: u64,
) -> Vec<TimelineEntry> {
    let mut entries = Vec::new();
    let mut token = String::new();
    loop {
        let page = client(app)
            .list_timeline(app.request(ListTimelineRequest {
                options: Some(QueryOptions { min_position }),
                account_id: account.into(),
                kinds: kinds.iter().map(|k| (*k).to_owned()).collect(),
                page_size: size,
                page_token: token,
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= size as usize);
        entries.extend(page.entries);
        if page.next_page_token.is_empty() {
            return entries;
        }
        token = page.next_page_token;
    }
}

fn summaries(entries: &[TimelineEntry]) -> Vec<(String, String)> {
    entries
        .iter()
        .map(|e| (e.occurred_at.clone(), e.summary.clone()))
        .collect()
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(when, what)| (ts(when), (*what).to_owned()))
        .collect()
}

#[tokio::test]
async fn the_360_shows_every_section_the_timeline_merges_them_and_erasure_blanks_the_person() {
    // No background scheduler: the test's clock drives the SLA rules.
    let app = TestApp::spawn_with(|config| {
        config.scheduler_interval_ms = 0;
        config.query_min_position_wait_ms = 10_000;
    })
    .await;
    let clock = Arc::new(TestClock(Mutex::new(
        "2026-11-01T00:00:00Z".parse().unwrap(),
    )));
    let (scheduler, store) = test_scheduler(&app, clock.clone()).await;
    incident_policy(&app).await;
    let pipeline = pipeline(&app).await;

    // Mon 16 Nov: the account, tagged; Li Wei (primary buyer, consents to
    // marketing email) and Zhang Min; the duplicate "Ｌｉ Ｗｅｉ" (example C).
    let acme = account(&app, "Acme Trading", "2026-11-16T01:00:00Z").await;
    app.records()
        .change_tags(app.request(ChangeTagsRequest {
            options: at("2026-11-16T01:01:00Z"),
            record: Some(RecordRef {
                r#type: "account".into(),
                id: acme.clone(),
            }),
            add: vec!["vip".into(), "key_account".into()],
            remove: vec![],
        }))
        .await
        .unwrap();
    let li = contact(
        &app,
        "Wei",
        "Li",
        "li.wei@acme.example",
        "+8613800138000",
        "2026-11-16T01:05:00Z",
    )
    .await;
    let zhang = contact(
        &app,
        "Min",
        "Zhang",
        "zhang.min@acme.example",
        "+8613900139000",
        "2026-11-16T01:06:00Z",
    )
    .await;
    let dup = contact(
        &app,
        "Ｗｅｉ",
        "Ｌｉ",
        "wei.li@home.example",
        "+8613800138000",
        "2026-11-16T01:07:00Z",
    )
    .await;
    link(&app, &li, &acme, "buyer", true, "2026-11-16T01:08:00Z").await;
    link(&app, &zhang, &acme, "", false, "2026-11-16T01:09:00Z").await;
    app.contacts()
        .change_contact_consent(app.request(ChangeContactConsentRequest {
            options: at("2026-11-16T01:10:00Z"),
            contact_id: li.clone(),
            purpose: "marketing_email".into(),
            granted: true,
            source: "web_form".into(),
            basis: "consent".into(),
        }))
        .await
        .unwrap();

    // Deals: D1 300,000.00 opened Mon, won Tue; D2 120,000.00 opened Tue,
    // moved to proposal (50 %: weighted 60,000.00).
    let d1 = deal(
        &app,
        &acme,
        &pipeline,
        "Acme renewal",
        30_000_000,
        "2026-11-16T02:00:00Z",
    )
    .await;
    // Purchases: SO-1001 delivered (1,000.00 + 130.00 tax), the first paid
    // order (the account becomes a customer then); SO-1002 shipped (2,000.00
    // + 260.00), promised for the 19th: late on the 21st.
    let o1 = order(
        &app,
        &acme,
        "SO-1001",
        "delivered",
        100_000,
        "2026-11-16",
        "2026-11-20",
        "2026-11-16T06:00:00Z",
    )
    .await;
    app.opportunities()
        .win_opportunity(app.request(WinOpportunityRequest {
            options: at("2026-11-17T03:00:00Z"),
            opportunity_id: d1.clone(),
        }))
        .await
        .unwrap();
    let d2 = deal(
        &app,
        &acme,
        &pipeline,
        "Acme expansion",
        12_000_000,
        "2026-11-17T04:00:00Z",
    )
    .await;
    app.opportunities()
        .change_opportunity_stage(app.request(ChangeOpportunityStageRequest {
            options: at("2026-11-17T05:00:00Z"),
            opportunity_id: d2.clone(),
            stage: "proposal".into(),
        }))
        .await
        .unwrap();
    let o2 = order(
        &app,
        &acme,
        "SO-1002",
        "shipped",
        200_000,
        "2026-11-18",
        "2026-11-19",
        "2026-11-18T04:00:00Z",
    )
    .await;
    // One invoice for both: 3,000.00 + 390.00 = 3,390.00. A payment of
    // 1,130.00, 130.00 of it refunded: paid 1,000.00, balance 2,390.00.
    app.commerce()
        .record_invoice(app.erp(RecordInvoiceRequest {
            options: at("2026-11-18T09:00:00Z"),
            external: external("INV-1", 1),
            account_id: acme.clone(),
            order_ids: vec![o1.clone(), o2.clone()],
            number: "2026-0001".into(),
            fapiao_number: "044001900111".into(),
            issued_on: "2026-11-18".into(),
            due_on: "2026-12-18".into(),
            net: cny(300_000),
            tax: cny(39_000),
            gross: cny(339_000),
        }))
        .await
        .unwrap();
    app.commerce()
        .record_payment(app.erp(RecordPaymentRequest {
            options: at("2026-11-19T02:00:00Z"),
            external: external("PAY-1", 1),
            account_id: acme.clone(),
            amount: cny(113_000),
            order_ids: vec![o1.clone()],
            paid_on: "2026-11-19".into(),
        }))
        .await
        .unwrap();
    app.commerce()
        .issue_refund(app.erp(IssueRefundRequest {
            options: at("2026-11-19T03:00:00Z"),
            payment: external("PAY-1", 1),
            amount: cny(13_000),
            refund_id: "R-1".into(),
            refunded_on: "2026-11-19".into(),
        }))
        .await
        .unwrap();

    // Tickets. T2: Li's question, answered, solved and rated 4 on Tuesday.
    let t2 = ticket(
        &app,
        &li,
        &acme,
        "question",
        "normal",
        "How do I export orders?",
        "2026-11-17T06:00:00Z",
    )
    .await;
    app.tickets()
        .add_ticket_message(app.request(AddTicketMessageRequest {
            options: at("2026-11-17T07:00:00Z"),
            ticket_id: t2.clone(),
            author_role: "agent".into(),
            author: "agent:g".into(),
            public: true,
            body: "Use the export button".into(),
        }))
        .await
        .unwrap();
    app.tickets()
        .solve_ticket(app.request(SolveTicketRequest {
            options: at("2026-11-17T08:00:00Z"),
            ticket_id: t2.clone(),
            resolution: "Explained the export".into(),
            root_cause: String::new(),
        }))
        .await
        .unwrap();
    app.tickets()
        .record_csat(app.request(RecordCsatRequest {
            options: at("2026-11-17T09:00:00Z"),
            ticket_id: t2.clone(),
            score: 4,
            comment: String::new(),
        }))
        .await
        .unwrap();
    // T1: Zhang's incident, high, Wed 09:00 Shanghai (01:00Z): first
    // response due 11:00 (03:00Z), resolution 540 minutes on Wednesday +
    // 420 on Thursday = Thu 16:00 (08:00Z). T3: the duplicate's question,
    // with no account: no SLA policy matches questions.
    let t1 = ticket(
        &app,
        &zhang,
        &acme,
        "incident",
        "high",
        "Shipment damaged",
        "2026-11-18T01:00:00Z",
    )
    .await;
    let t3 = ticket(
        &app,
        &dup,
        "",
        "question",
        "normal",
        "Invoice copy please",
        "2026-11-18T02:00:00Z",
    )
    .await;
    // Wait for the SLA process manager to apply T1's clocks, then let the
    // clock pass the warning (02:30Z) and the due time (03:00Z).
    crm_test_support::eventually(Duration::from_secs(20), "T1's SLA clocks", || async {
        let db = app.db.client().await;
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM sla_clock WHERE ticket_id = $1::text::uuid",
                &[&t1],
            )
            .await
            .ok()?
            .get(0);
        (n > 0).then_some(())
    })
    .await;
    clock.set("2026-11-18T02:30:00Z");
    scheduler.tick().await;
    settled(&app).await;
    clock.set("2026-11-18T03:00:00Z");
    scheduler.tick().await;
    store.shutdown().await;

    // Activities: a call on the account (a touch), a note on Li (no touch),
    // an email from Zhang (a touch, through the contact), a meeting on D2,
    // held Thursday (a touch, through the deal).
    log(
        &app,
        "call",
        "outbound",
        vec![target("account", &acme)],
        "agreed renewal terms",
        "2026-11-17T02:00:00Z",
    )
    .await;
    log(
        &app,
        "note",
        "",
        vec![target("contact", &li)],
        "",
        "2026-11-17T07:00:00Z",
    )
    .await;
    log(
        &app,
        "email",
        "inbound",
        vec![target("contact", &zhang)],
        "asked for invoice",
        "2026-11-18T05:00:00Z",
    )
    .await;
    let meeting = app
        .activities()
        .schedule_activity(app.request(ScheduleActivityRequest {
            options: at("2026-11-18T06:00:00Z"),
            kind: "meeting".into(),
            targets: vec![target("opportunity", &d2)],
            due: "2026-11-19T02:00:00Z".into(),
            assignee: "user:ada".into(),
            subject: "Expansion review".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    app.activities()
        .complete_activity(app.request(CompleteActivityRequest {
            options: at("2026-11-19T03:30:00Z"),
            activity_id: meeting.clone(),
            outcome: "held".into(),
            notes: "Went well".into(),
        }))
        .await
        .unwrap();

    // NPS: Li 6 then 9 (latest), Zhang 8, the duplicate 10 before the merge
    // (older than Li's 9, so Li's latest stays 9). The duplicate consents to
    // SMS: the merge keeps the latest decision per purpose.
    nps(&app, &li, 6, "2026-11-17T10:00:00Z").await;
    nps(&app, &zhang, 8, "2026-11-18T07:00:00Z").await;
    nps(&app, &dup, 10, "2026-11-18T08:00:00Z").await;
    nps(&app, &li, 9, "2026-11-19T05:00:00Z").await;
    app.contacts()
        .change_contact_consent(app.request(ChangeContactConsentRequest {
            options: at("2026-11-18T09:30:00Z"),
            contact_id: dup.clone(),
            purpose: "marketing_sms".into(),
            granted: true,
            source: "sms_keyword".into(),
            basis: "consent".into(),
        }))
        .await
        .unwrap();
    // Example C step 3: the duplicate merged into Li.
    app.contacts()
        .merge_contacts(app.manager(MergeContactsRequest {
            options: at("2026-11-19T06:00:00Z"),
            survivor_id: li.clone(),
            loser_ids: vec![dup.clone()],
            ..Default::default()
        }))
        .await
        .unwrap();
    // The scheduler's churn-risk flag (sent here by hand, as `system`).
    app.accounts()
        .flag_account_churn_risk(with_role(
            &app,
            "system",
            FlagAccountChurnRiskRequest {
                options: at("2026-11-20T00:00:00Z"),
                account_id: acme.clone(),
                days_inactive: 90,
            },
        ))
        .await
        .unwrap();
    let head = settled(&app).await;

    let before = view(&app, &acme, head).await;
    assert_eq!(before.account_id, acme);
    assert!(before.redirected_from.is_empty());
    assert!(before.position >= head);

    // Profile: a customer since its first paid order (the lifecycle
    // process manager), tagged.
    let profile = before.profile.clone().unwrap();
    assert_eq!(
        (
            profile.kind.as_str(),
            profile.name.as_str(),
            profile.status.as_str(),
            profile.archived,
            profile.industry.as_str(),
            profile.segment.as_str(),
        ),
        (
            "company",
            "Acme Trading",
            "customer",
            false,
            "wholesale",
            "smb"
        )
    );
    assert_eq!(profile.domains, ["acme-trading.example"]);
    assert_eq!(profile.created_at, ts("2026-11-16T01:00:00Z"));
    assert_eq!(profile.customer_since, ts("2026-11-16T06:00:00Z"));
    assert_eq!(profile.churned_at, "");
    assert_eq!(before.tags, ["key_account", "vip"]);

    // Contacts: Li (primary, with the duplicate merged in) then Zhang, in
    // clear for the tenant.
    assert_eq!(before.contacts_total, 2);
    let ids: Vec<&str> = before
        .contacts
        .iter()
        .map(|c| c.contact_id.as_str())
        .collect();
    assert_eq!(ids, [li.as_str(), zhang.as_str()]);
    let li_view = &before.contacts[0];
    assert_eq!(
        li_view.name,
        Some(PersonName {
            given: "Wei".into(),
            family: "Li".into()
        })
    );
    let emails: Vec<(&str, bool)> = li_view
        .emails
        .iter()
        .map(|e| (e.address.as_str(), e.primary))
        .collect();
    assert_eq!(
        emails,
        [
            ("li.wei@acme.example", true),
            ("wei.li@home.example", false)
        ],
        "the union of the merged contacts' addresses"
    );
    assert_eq!(li_view.phones.len(), 1, "the same number once");
    assert_eq!(li_view.phones[0].number, "+8613800138000");
    assert_eq!((li_view.role.as_str(), li_view.primary), ("buyer", true));
    assert_eq!(li_view.merged_from, std::slice::from_ref(&dup));
    assert_eq!(li_view.preferences.as_ref().unwrap().language, "zh-CN");
    let consent: Vec<(&str, bool, &str, &str)> = li_view
        .consent
        .iter()
        .map(|c| {
            (
                c.purpose.as_str(),
                c.granted,
                c.source.as_str(),
                c.decided_at.as_str(),
            )
        })
        .collect();
    assert_eq!(
        consent,
        [
            (
                "marketing_email",
                true,
                "web_form",
                ts("2026-11-16T01:10:00Z").as_str()
            ),
            (
                "marketing_sms",
                true,
                "sms_keyword",
                ts("2026-11-18T09:30:00Z").as_str()
            ),
        ]
    );
    assert_eq!(li_view.latest_nps.as_ref().unwrap().score, 9);
    let zhang_view = &before.contacts[1];
    assert_eq!(zhang_view.name.as_ref().unwrap().given, "Min");
    assert_eq!(zhang_view.emails[0].address, "zhang.min@acme.example");
    assert!(zhang_view.consent.is_empty(), "Zhang gave no consent");
    assert!(!zhang_view.primary && !zhang_view.erased);
    assert_eq!(zhang_view.latest_nps.as_ref().unwrap().score, 8);

    // Purchases, newest first; SO-1002 was promised for the 19th and is only
    // shipped on the 21st: late.
    let purchases = before.purchases.clone().unwrap();
    let orders: Vec<(&str, &str, &str, i64)> = purchases
        .orders
        .iter()
        .map(|o| {
            (
                o.external_id.as_str(),
                o.status.as_str(),
                o.delivery.as_str(),
                o.gross.as_ref().unwrap().amount_minor,
            )
        })
        .collect();
    assert_eq!(
        orders,
        [
            ("SO-1002", "shipped", "late", 226_000),
            ("SO-1001", "delivered", "delivered", 113_000)
        ]
    );
    assert_eq!(purchases.orders[0].promised_delivery, "2026-11-19");
    assert_eq!(purchases.orders_total, 2);
    assert_eq!(purchases.invoices_total, 1);
    let invoice = &purchases.invoices[0];
    assert_eq!(
        (
            invoice.number.as_str(),
            invoice.due_on.as_str(),
            invoice.gross.as_ref().unwrap().amount_minor
        ),
        ("2026-0001", "2026-12-18", 339_000)
    );
    assert_eq!(invoice.order_ids, [o1.clone(), o2.clone()]);
    assert_eq!(purchases.payments_total, 1);
    assert_eq!(
        (
            purchases.payments[0].amount.as_ref().unwrap().amount_minor,
            purchases.payments[0].refunded_minor
        ),
        (113_000, 13_000)
    );
    // Balance: invoiced 3,390.00 − (1,130.00 − 130.00) = 2,390.00.
    assert_eq!(purchases.balances.len(), 1);
    let balance = &purchases.balances[0];
    assert_eq!(
        (
            balance.currency.as_str(),
            balance.invoiced_minor,
            balance.paid_minor,
            balance.balance_minor
        ),
        ("CNY", 339_000, 100_000, 239_000)
    );

    // Deals: D2 open at proposal (120,000.00 × 50 % = 60,000.00); D1 won.
    assert_eq!(before.open_deals_total, 1);
    let open = &before.open_deals[0];
    assert_eq!(
        (
            open.deal_id.as_str(),
            open.stage.as_str(),
            open.amount.as_ref().unwrap().amount_minor,
            open.probability_bp,
            open.weighted_minor,
            open.category.as_str(),
            open.close_date.as_str()
        ),
        (
            d2.as_str(),
            "proposal",
            12_000_000,
            5000,
            6_000_000,
            "best_case",
            "2026-12-31"
        )
    );
    assert_eq!(before.won_deals.len(), 1);
    assert_eq!(
        (before.won_deals[0].deals, before.won_deals[0].amount_minor),
        (1, 30_000_000)
    );

    // Open tickets: T1 (high) before T3 (normal); T3 is the duplicate's,
    // shown under its survivor Li (example C step 4). T1 breached its first
    // response and was escalated; its resolution runs until Thu 08:00Z.
    assert_eq!(before.open_tickets_total, 2);
    let tickets: Vec<(&str, &str, &str, &str)> = before
        .open_tickets
        .iter()
        .map(|t| {
            (
                t.ticket_id.as_str(),
                t.subject.as_str(),
                t.priority.as_str(),
                t.sla_state.as_str(),
            )
        })
        .collect();
    assert_eq!(
        tickets,
        [
            (t1.as_str(), "Shipment damaged", "high", "breached"),
            (t3.as_str(), "Invoice copy please", "normal", "none"),
        ]
    );
    let t1_view = &before.open_tickets[0];
    assert_eq!(t1_view.requester_id, zhang);
    assert_eq!(t1_view.escalation_level, 1);
    let first = t1_view
        .sla
        .iter()
        .find(|c| c.metric == "first_response")
        .unwrap();
    assert!(first.breached);
    assert_eq!(first.due, ts("2026-11-18T03:00:00Z"));
    let resolution = t1_view
        .sla
        .iter()
        .find(|c| c.metric == "resolution")
        .unwrap();
    assert_eq!(
        (resolution.state.as_str(), resolution.breached),
        ("running", false)
    );
    assert_eq!(resolution.due, ts("2026-11-19T08:00:00Z"));
    assert_eq!(before.open_tickets[1].requester_id, dup);

    // Last touches: the held meeting, Zhang's email, the call (the note is
    // no touch).
    let touches: Vec<(&str, &str, &str)> = before
        .last_touches
        .iter()
        .map(|t| (t.kind.as_str(), t.outcome.as_str(), t.touched_at.as_str()))
        .collect();
    assert_eq!(
        touches,
        [
            ("meeting", "held", ts("2026-11-19T03:30:00Z").as_str()),
            (
                "email",
                "asked for invoice",
                ts("2026-11-18T05:00:00Z").as_str()
            ),
            (
                "call",
                "agreed renewal terms",
                ts("2026-11-17T02:00:00Z").as_str()
            ),
        ]
    );
    assert_eq!(before.last_touch_at, ts("2026-11-19T03:30:00Z"));

    // NPS over each contact's latest: Li 9 (promoter), Zhang 8 (passive):
    // (1 − 0) ÷ 2 = 50 %.
    let nps = before.nps.unwrap();
    assert_eq!(
        (
            nps.responses,
            nps.promoters,
            nps.passives,
            nps.detractors,
            nps.nps_bp
        ),
        (2, 1, 1, 0, Some(5_000))
    );
    // CSAT: T2's 4 of 5: 1 satisfied of 1.
    let csat = before.csat.clone().unwrap();
    assert_eq!(
        (
            csat.ratings,
            csat.satisfied,
            csat.csat_bp,
            csat.latest_score
        ),
        (1, 1, Some(10_000), Some(4))
    );
    assert_eq!(csat.latest_at, ts("2026-11-17T09:00:00Z"));
    // CLV: 1,000.00 + 2,000.00 net − 130.00 refunded = 2,870.00; no costs.
    assert_eq!(before.clv.len(), 1);
    let clv = &before.clv[0];
    assert_eq!(
        (
            clv.net_revenue_minor,
            clv.margin_minor,
            clv.paid_orders,
            clv.historical_clv_minor
        ),
        (287_000, None, 2, 287_000)
    );
    // RFM at the 21st: last paid order on the 18th at 04:00Z, 2 days 20 h
    // ago: 2 days; 2 orders, 3,000.00 less 130.00 refunded (as the CLV); the
    // tenant's only buyer: quintile 1.
    let rfm = before.rfm.clone().unwrap();
    assert_eq!(
        (
            rfm.recency_days,
            rfm.frequency,
            rfm.monetary_minor,
            rfm.r,
            rfm.f,
            rfm.m,
            rfm.segment.as_str()
        ),
        (2, 2, 287_000, 1, 1, 1, "other")
    );
    // Churn risk: flagged on the 20th with nothing since; the last touch of
    // the account or its deals (the meeting, Thu 03:30Z) is 1 day 20.5 h
    // before the 21st: 1 day.
    let risk = before.churn_risk.clone().unwrap();
    assert!(risk.flagged);
    assert_eq!(risk.flagged_at, ts("2026-11-20T00:00:00Z"));
    assert_eq!(risk.flagged_days_inactive, 90);
    assert_eq!(risk.last_touch_at, ts("2026-11-19T03:30:00Z"));
    assert_eq!(risk.last_paid_order_at, ts("2026-11-18T04:00:00Z"));
    assert_eq!(risk.days_inactive, Some(1));
    assert!(before.quality.is_none());
    assert!(before.quality_note.contains("not computed yet"));

    // The read model keeps personal fields as the events carry them.
    let db = app.db.client().await;
    let stored: Vec<String> = first_column(&db, "SELECT state::text FROM c360_contacts").await;
    assert_eq!(stored.len(), 3);
    for state in &stored {
        assert!(state.contains("enc:v1:"), "{state}");
        for secret in ["Zhang", "li.wei@acme.example", "+8613900139000"] {
            assert!(!state.contains(secret), "{secret} in {state}");
        }
    }

    // The timeline: newest first, pages of 7 give the same as one page.
    let everything = timeline(&app, &acme, &[], 200, head).await;
    assert_eq!(timeline(&app, &acme, &[], 7, head).await, everything);
    assert!(everything.len() > 30, "{}", everything.len());
    for pair in everything.windows(2) {
        let key = |e: &TimelineEntry| {
            (
                e.occurred_at.parse::<jiff::Timestamp>().unwrap(),
                e.position,
            )
        };
        assert!(key(&pair[0]) > key(&pair[1]), "{pair:?}");
    }
    assert_eq!(
        (
            everything[0].kind.as_str(),
            everything[0].event_type.as_str()
        ),
        ("account", "AccountChurnRiskFlagged")
    );
    assert_eq!(everything[0].summary, "churn risk: no activity for 90 days");
    // The duplicate's ticket and its merge show under the survivor.
    assert!(
        everything
            .iter()
            .any(|e| e.stream_id == t3 && e.event_type == "TicketOpened")
    );
    assert!(
        everything
            .iter()
            .any(|e| e.stream_id == dup && e.event_type == "RecordMergedInto")
    );
    // Kinds filter.
    let money = timeline(&app, &acme, &["order", "invoice", "payment"], 2, head).await;
    assert_eq!(
        summaries(&money),
        pairs(&[
            ("2026-11-19T03:00:00Z", "refund issued: 130.00 CNY"),
            ("2026-11-19T02:00:00Z", "payment received: 1130.00 CNY"),
            (
                "2026-11-18T09:00:00Z",
                "invoice 2026-0001 issued: 3390.00 CNY, due 2026-12-18"
            ),
            ("2026-11-18T04:00:00Z", "order SO-1002 shipped: 2260.00 CNY"),
            (
                "2026-11-16T06:00:00Z",
                "order SO-1001 delivered: 1130.00 CNY"
            ),
        ])
    );
    let deals = timeline(&app, &acme, &["deal"], 50, head).await;
    assert_eq!(
        summaries(&deals),
        pairs(&[
            (
                "2026-11-17T05:00:00Z",
                "deal stage qualification → proposal"
            ),
            (
                "2026-11-17T04:00:00Z",
                "deal opened in qualification: 120000.00 CNY"
            ),
            ("2026-11-17T03:00:00Z", "deal won: 300000.00 CNY"),
            (
                "2026-11-16T02:00:00Z",
                "deal opened in qualification: 300000.00 CNY"
            ),
        ])
    );
    let activities = timeline(&app, &acme, &["activity"], 50, head).await;
    assert_eq!(
        summaries(&activities),
        pairs(&[
            ("2026-11-19T03:30:00Z", "meeting completed: held"),
            (
                "2026-11-18T06:00:00Z",
                "meeting scheduled for 2026-11-19T02:00:00Z"
            ),
            (
                "2026-11-18T05:00:00Z",
                "email inbound logged: asked for invoice"
            ),
            ("2026-11-17T07:00:00Z", "note logged"),
            (
                "2026-11-17T02:00:00Z",
                "call outbound logged: agreed renewal terms"
            ),
        ])
    );
    let sla = timeline(&app, &acme, &["sla"], 50, head).await;
    assert_eq!(
        summaries(&sla),
        pairs(&[("2026-11-18T03:00:00Z", "SLA first_response breached")])
    );
    assert_eq!(sla[0].stream_type, "ticket_sla");
    // Nothing personal in a summary.
    for entry in &everything {
        for secret in ["Wei", "Zhang", "Min", "@", "+86", "Shipment"] {
            assert!(!entry.summary.contains(secret), "{entry:?}");
        }
    }

    // Zhang asks to be forgotten: their name, addresses and the subject of
    // their ticket read as empty; everything else stays.
    let erased = app
        .contacts()
        .erase_personal_data(with_role(
            &app,
            "admin",
            ErasePersonalDataRequest {
                options: at("2026-11-20T01:00:00Z"),
                contact_id: zhang.clone(),
                request: "DSR-7".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let after = view(&app, &acme, erased.global_position).await;
    let zhang_after = &after.contacts[1];
    assert_eq!(zhang_after.contact_id, zhang);
    assert!(zhang_after.erased);
    assert_eq!(zhang_after.name, Some(PersonName::default()));
    assert!(zhang_after.emails.is_empty() && zhang_after.phones.is_empty());
    assert_eq!(
        zhang_after.latest_nps, zhang_view.latest_nps,
        "ids and scores stay"
    );
    assert_eq!(after.open_tickets[0].subject, "");
    assert_eq!(after.open_tickets[1].subject, "Invoice copy please");
    assert_eq!(after.contacts[0], before.contacts[0], "Li is untouched");
    let mut unchanged = after.clone();
    unchanged.contacts = before.contacts.clone();
    unchanged.open_tickets[0].subject = "Shipment damaged".into();
    unchanged.position = before.position;
    assert_eq!(unchanged, before, "everything else stays");
    let latest = timeline(&app, &acme, &[], 1, erased.global_position).await;
    assert_eq!(
        (latest[0].stream_id.as_str(), latest[0].summary.as_str()),
        (zhang.as_str(), "personal data erased")
    );
    app.stop().await;
}

#[tokio::test]
async fn a_merged_account_answers_with_its_survivor_and_brings_what_it_had() {
    let app = TestApp::spawn().await;
    let globex = account(&app, "Globex", "2026-11-10T01:00:00Z").await;
    let globex_ltd = account(&app, "Globex Ltd", "2026-11-10T02:00:00Z").await;
    let buyer = contact(
        &app,
        "Hui",
        "Chen",
        "chen.hui@globex.example",
        "+8613700137000",
        "2026-11-10T03:00:00Z",
    )
    .await;
    link(
        &app,
        &buyer,
        &globex_ltd,
        "buyer",
        true,
        "2026-11-10T04:00:00Z",
    )
    .await;
    order(
        &app,
        &globex,
        "G-1",
        "paid",
        40_000,
        "2026-11-11",
        "",
        "2026-11-11T01:00:00Z",
    )
    .await;
    order(
        &app,
        &globex_ltd,
        "G-2",
        "paid",
        10_000,
        "2026-11-12",
        "",
        "2026-11-12T01:00:00Z",
    )
    .await;
    // Both become customers (the lifecycle process manager) before the
    // merge: it refuses to mark a merged account.
    settled(&app).await;
    let merged = app
        .accounts()
        .merge_accounts(app.manager(MergeAccountsRequest {
            options: at("2026-11-13T01:00:00Z"),
            survivor_id: globex.clone(),
            loser_ids: vec![globex_ltd.clone()],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let head = settled(&app)
        .await
        .max(merged.survivor.unwrap().global_position);

    let redirected = view(&app, &globex_ltd, head).await;
    assert_eq!(redirected.account_id, globex);
    assert_eq!(redirected.redirected_from, globex_ltd);
    assert_eq!(redirected.profile.as_ref().unwrap().name, "Globex");
    // The loser's contact, order and revenue count as the survivor's:
    // 400.00 + 100.00 net.
    assert_eq!(redirected.contacts.len(), 1);
    assert_eq!(redirected.contacts[0].contact_id, buyer);
    assert_eq!(redirected.contacts[0].name.as_ref().unwrap().given, "Hui");
    assert_eq!(redirected.purchases.as_ref().unwrap().orders_total, 2);
    assert_eq!(redirected.clv[0].net_revenue_minor, 50_000);
    let direct = view(&app, &globex, head).await;
    assert!(direct.redirected_from.is_empty());
    let mut same = redirected.clone();
    same.redirected_from.clear();
    same.position = direct.position;
    assert_eq!(same, direct);

    let page = client(&app)
        .list_timeline(app.request(ListTimelineRequest {
            options: Some(QueryOptions { min_position: head }),
            account_id: globex_ltd.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (page.account_id.as_str(), page.redirected_from.as_str()),
        (globex.as_str(), globex_ltd.as_str())
    );
    let merged_into = format!("merged into account {globex}");
    assert!(page.entries.iter().any(|e| e.summary == merged_into));
    assert!(
        page.entries
            .iter()
            .any(|e| e.summary == "order G-2 paid: 113.00 CNY")
    );

    // Another tenant sees no such account; nor is a contact an account.
    let stranger = client(&app)
        .get_customer360(as_caller(
            GetCustomer360Request {
                account_id: globex.clone(),
                ..Default::default()
            },
            Some("someone-else"),
            Some("user:eve"),
        ))
        .await
        .unwrap_err();
    assert_eq!(stranger.code(), Code::NotFound);
    let stranger = client(&app)
        .list_timeline(as_caller(
            ListTimelineRequest {
                account_id: globex.clone(),
                ..Default::default()
            },
            Some("someone-else"),
            Some("user:eve"),
        ))
        .await
        .unwrap_err();
    assert_eq!(stranger.code(), Code::NotFound);
    let not_an_account = client(&app)
        .get_customer360(app.request(GetCustomer360Request {
            account_id: buyer.clone(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(not_an_account.code(), Code::NotFound);
    app.stop().await;
}

#[tokio::test]
async fn bad_customer_360_inputs_name_their_fields() {
    let app = TestApp::spawn().await;
    let mut customers = client(&app);
    let status = customers
        .get_customer360(app.request(GetCustomer360Request {
            options: None,
            account_id: "nope".into(),
            as_of: "yesterday".into(),
            limit: 101,
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["account_id", "as_of", "limit"]);
    let status = customers
        .get_customer360(app.request(GetCustomer360Request {
            options: None,
            account_id: uuid::Uuid::now_v7().to_string(),
            as_of: "-009999-06-01T00:00:00Z".into(),
            limit: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["as_of"]);
    let unknown = customers
        .get_customer360(app.request(GetCustomer360Request {
            account_id: uuid::Uuid::now_v7().to_string(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let status = customers
        .list_timeline(app.request(ListTimelineRequest {
            account_id: String::new(),
            kinds: vec!["deal".into(), "gossip".into()],
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["account_id", "kinds[1]"]);
    let account = uuid::Uuid::now_v7().to_string();
    for (request, field) in [
        (
            ListTimelineRequest {
                account_id: account.clone(),
                page_size: 201,
                ..Default::default()
            },
            "page_size",
        ),
        (
            ListTimelineRequest {
                account_id: account.clone(),
                page_token: "not-a-token".into(),
                ..Default::default()
            },
            "page_token",
        ),
    ] {
        let status = customers
            .list_timeline(app.request(request))
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), [field]);
    }
    let anonymous = customers
        .get_customer360(as_caller(
            GetCustomer360Request {
                account_id: account.clone(),
                ..Default::default()
            },
            None,
            Some("user:eve"),
        ))
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    // A position the read models cannot reach in the wait: UNAVAILABLE.
    let future = customers
        .get_customer360(app.request(GetCustomer360Request {
            options: Some(QueryOptions {
                min_position: 1_000_000,
            }),
            account_id: account,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(future.code(), Code::Unavailable);
    app.stop().await;
}
