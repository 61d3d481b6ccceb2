//! SLA clocks end to end: the SLA process manager applies, pauses, resumes
//! and meets a ticket's clocks; the scheduler, driven by a clock of the
//! test's, warns, breaches (and the process manager escalates) and
//! auto-closes; `crm.v1.ServiceQueries` shows the clocks and the compliance.
//! Worked example B of DOMAIN.md with its figures computed by hand.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crm::scheduler::Scheduler;
use crm_proto::v1::service_queries_client::ServiceQueriesClient;
use crm_proto::v1::{
    AddTicketMessageRequest, ChangeTicketStatusRequest, GetSlaComplianceRequest,
    GetTicketSlaRequest, ListAtRiskRequest, OpenTicketRequest, PublishBusinessCalendarRequest,
    PublishSlaPolicyRequest, RecordCsatRequest, SlaClock, SlaTargets, SolveTicketRequest,
    WorkingHours,
};
use jiff::Timestamp;
use tonic::Code;

use crate::support::{TestApp, TestClock, all_pages, at, bad_fields, test_scheduler};

/// An app without its own scheduler, and a scheduler on a test clock.
async fn app_and_scheduler() -> (
    TestApp,
    Scheduler,
    Arc<TestClock>,
    crm_event_store::EventStore,
) {
    let app = TestApp::spawn_with(|config| {
        config.scheduler_interval_ms = 0;
        config.query_min_position_wait_ms = 10_000;
    })
    .await;
    let clock = Arc::new(TestClock(Mutex::new(
        "2026-11-01T00:00:00Z".parse().unwrap(),
    )));
    let (scheduler, store) = test_scheduler(&app, clock.clone()).await;
    (app, scheduler, clock, store)
}

/// Mon–Fri 09:00–18:00 Asia/Shanghai, and a policy for complaints: high
/// priority first response 2 h, next response 24 h, resolution 16 h.
async fn complaint_policy(app: &TestApp) {
    let calendar = app
        .configuration()
        .publish_business_calendar(as_manager(
            app,
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
    let targets = |priority: &str, first, next, resolution| SlaTargets {
        priority: priority.into(),
        first_response_minutes: first,
        next_response_minutes: next,
        resolution_minutes: resolution,
    };
    app.configuration()
        .publish_sla_policy(as_manager(
            app,
            PublishSlaPolicyRequest {
                options: at("2026-11-01T00:00:00Z"),
                name: "Complaints".into(),
                order: 1,
                ticket_types: vec!["complaint".into()],
                targets: vec![
                    targets("urgent", 60, 240, 480),
                    targets("high", 120, 1440, 960),
                    targets("normal", 240, 1440, 1920),
                    targets("low", 480, 2880, 2880),
                ],
                calendar_id: calendar,
                pause_statuses: vec!["pending".into(), "on_hold".into()],
                warning_percent: 75,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
}

fn as_manager<T>(app: &TestApp, message: T) -> tonic::Request<T> {
    let mut request = app.request(message);
    request
        .metadata_mut()
        .insert("x-roles", "service_manager".parse().unwrap());
    request
}

async fn clocks(app: &TestApp, ticket: &str) -> Option<Vec<SlaClock>> {
    ServiceQueriesClient::new(app.channel.clone())
        .get_ticket_sla(app.request(GetTicketSlaRequest {
            ticket_id: ticket.into(),
            ..Default::default()
        }))
        .await
        .ok()
        .map(|reply| reply.into_inner().clocks)
}

/// Waits until the ticket's clock `metric` satisfies `check`.
async fn until(
    app: &TestApp,
    ticket: &str,
    what: &str,
    check: impl Fn(&SlaClock) -> bool,
) -> SlaClock {
    crm_test_support::eventually(Duration::from_secs(20), what, || async {
        clocks(app, ticket)
            .await?
            .into_iter()
            .find(|clock| check(clock))
    })
    .await
}

fn ts(text: &str) -> String {
    text.parse::<Timestamp>().unwrap().to_string()
}

#[tokio::test]
async fn the_worked_complaint_breaches_first_response_meets_resolution_and_auto_closes() {
    let (app, scheduler, clock, store) = app_and_scheduler().await;
    complaint_policy(&app).await;
    let set_clock = |text: &str| clock.set(text);

    // Fri 17:00 (09:00Z): a complaint, high by default.
    let ticket = app
        .tickets()
        .open_ticket(app.request(OpenTicketRequest {
            options: at("2026-11-13T09:00:00Z"),
            requester_id: crate::support::person(&app, "Ticket", "Requester").await,
            channel: "email".into(),
            r#type: "complaint".into(),
            category: "billing".into(),
            subject: "Charged twice".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    // First response due Mon 10:00 (warning 09:30), resolution Tue 15:00.
    let first = until(&app, &ticket, "first response applied", |c| {
        c.metric == "first_response"
    })
    .await;
    assert_eq!(first.due, ts("2026-11-16T02:00:00Z"));
    assert_eq!(first.warn_at, ts("2026-11-16T01:30:00Z"));
    assert_eq!(first.target_minutes, 120);
    let resolution = until(&app, &ticket, "resolution applied", |c| {
        c.metric == "resolution"
    })
    .await;
    assert_eq!(resolution.due, ts("2026-11-17T07:00:00Z"));

    // Nothing is due on Monday 09:00.
    set_clock("2026-11-16T01:00:00Z");
    assert_eq!(scheduler.tick().await.appended, 0);
    // Mon 09:30 the warning, 10:00 the breach (then the escalation).
    set_clock("2026-11-16T01:30:00Z");
    assert_eq!(scheduler.tick().await.appended, 1);
    until(&app, &ticket, "first response warned", |c| {
        c.metric == "first_response" && c.warned
    })
    .await;
    set_clock("2026-11-16T02:00:00Z");
    assert_eq!(scheduler.tick().await.appended, 1);
    assert_eq!(scheduler.tick().await.appended, 0, "once");
    until(&app, &ticket, "first response breached", |c| {
        c.metric == "first_response" && c.breached
    })
    .await;
    crm_test_support::eventually(Duration::from_secs(20), "the escalation", || async {
        app.stored()
            .await
            .into_iter()
            .find(|(event_type, _, _)| event_type == "TicketEscalated")
            .map(|(_, payload, _)| payload)
    })
    .await;

    // Mon 10:20 the agent answers: met after 140 business minutes, late.
    app.tickets()
        .add_ticket_message(app.request(AddTicketMessageRequest {
            options: at("2026-11-16T02:20:00Z"),
            ticket_id: ticket.clone(),
            author_role: "agent".into(),
            author: "agent:g".into(),
            public: true,
            body: "We are looking into it".into(),
        }))
        .await
        .unwrap();
    let first = until(&app, &ticket, "first response met", |c| {
        c.metric == "first_response" && c.state == "met"
    })
    .await;
    assert_eq!(first.elapsed_minutes, 140);
    assert!(first.breached);

    // Mon 11:00 pending on the customer: resolution paused at 180 minutes.
    app.tickets()
        .change_ticket_status(app.request(ChangeTicketStatusRequest {
            options: at("2026-11-16T03:00:00Z"),
            ticket_id: ticket.clone(),
            status: "pending".into(),
        }))
        .await
        .unwrap();
    let resolution = until(&app, &ticket, "resolution paused", |c| {
        c.metric == "resolution" && c.state == "paused"
    })
    .await;
    assert_eq!(resolution.elapsed_minutes, 180);
    assert_eq!(resolution.paused_since, ts("2026-11-16T03:00:00Z"));
    // Its old due passes while paused: no breach.
    set_clock("2026-11-17T07:30:00Z");
    assert_eq!(scheduler.tick().await.appended, 0);

    // Tue 10:00 the customer replies: open again, resolution due Wed 14:00
    // (warning Wed 10:00).
    app.tickets()
        .add_ticket_message(app.request(AddTicketMessageRequest {
            options: at("2026-11-17T02:00:00Z"),
            ticket_id: ticket.clone(),
            author_role: "customer".into(),
            author: "customer".into(),
            public: true,
            body: "Here is the receipt".into(),
        }))
        .await
        .unwrap();
    let resolution = until(&app, &ticket, "resolution resumed", |c| {
        c.metric == "resolution" && c.state == "running" && c.elapsed_minutes == 180
    })
    .await;
    assert_eq!(resolution.due, ts("2026-11-18T06:00:00Z"));
    assert_eq!(resolution.warn_at, ts("2026-11-18T02:00:00Z"));
    // The unanswered reply started next response.
    until(&app, &ticket, "next response running", |c| {
        c.metric == "next_response" && c.state == "running"
    })
    .await;

    // Wed 10:00 the resolution warning.
    set_clock("2026-11-18T02:00:00Z");
    assert_eq!(scheduler.tick().await.appended, 1);
    until(&app, &ticket, "resolution warned", |c| {
        c.metric == "resolution" && c.warned
    })
    .await;

    // Wed 11:30 solved: 810 business minutes, on time; rated 4.
    app.tickets()
        .solve_ticket(app.request(SolveTicketRequest {
            options: at("2026-11-18T03:30:00Z"),
            ticket_id: ticket.clone(),
            resolution: "Refunded the second charge".into(),
            root_cause: "duplicate_charge".into(),
        }))
        .await
        .unwrap();
    app.tickets()
        .record_csat(app.request(RecordCsatRequest {
            options: at("2026-11-18T04:00:00Z"),
            ticket_id: ticket.clone(),
            score: 4,
            comment: String::new(),
        }))
        .await
        .unwrap();
    let resolution = until(&app, &ticket, "resolution met", |c| {
        c.metric == "resolution" && c.state == "met"
    })
    .await;
    assert_eq!(resolution.elapsed_minutes, 810);
    assert!(!resolution.breached);

    // Sun 11:30 (four days after solving) it closes by itself, once.
    crm_test_support::eventually(
        Duration::from_secs(20),
        "solved in service_queue",
        || async {
            app.db
            .client()
            .await
            .query_opt(
                "SELECT 1 FROM service_queue WHERE status = 'solved' AND status_since IS NOT NULL",
                &[],
            )
            .await
            .ok()
            .flatten()
        },
    )
    .await;
    set_clock("2026-11-22T03:29:00Z");
    assert_eq!(scheduler.tick().await.appended, 0);
    set_clock("2026-11-22T03:30:00Z");
    assert_eq!(scheduler.tick().await.appended, 1);
    assert_eq!(scheduler.tick().await.appended, 0);

    // The whole story, as stored.
    let stored = app.stored().await;
    let sla: Vec<(String, serde_json::Value)> = stored
        .iter()
        .filter(|(event_type, _, _)| {
            event_type.starts_with("Sla") && event_type != "SlaPolicyPublished"
        })
        .map(|(event_type, payload, _)| (event_type.clone(), payload.clone()))
        .collect();
    let types: Vec<&str> = sla.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "SlaPolicyApplied",  // opened
            "SlaWarningReached", // Mon 09:30
            "SlaBreached",       // Mon 10:00
            "SlaTargetMet",      // first response, Mon 10:20
            "SlaClockPaused",    // Mon 11:00
            "SlaPolicyApplied",  // next response, Tue 10:00 (paused until...)
            "SlaClockResumed",   // ...the ticket opens again
            "SlaWarningReached", // resolution, Wed 10:00
            "SlaTargetMet",      // resolution, Wed 11:30
            "SlaTargetMet",      // next response, answered by solving
        ]
    );
    let time = |payload: &serde_json::Value| payload["occurred_at"].as_str().unwrap().to_owned();
    assert_eq!(
        time(&sla[1].1),
        ts("2026-11-16T01:30:00Z"),
        "when it became true"
    );
    assert_eq!(time(&sla[2].1), ts("2026-11-16T02:00:00Z"));
    assert_eq!(sla[3].1["business_minutes"], 140);
    assert_eq!(sla[3].1["breached"], true);
    assert_eq!(sla[4].1["clocks"][0]["elapsed_minutes"], 180);
    let resumed = sla[6].1["clocks"].as_array().unwrap();
    let resolution = resumed
        .iter()
        .find(|c| c["metric"] == "resolution")
        .unwrap();
    assert_eq!(resolution["due"], ts("2026-11-18T06:00:00Z"));
    assert_eq!(sla[5].1["cause"], "customer_message");
    assert_eq!(sla[8].1["business_minutes"], 810);
    let escalated: Vec<_> = stored
        .iter()
        .filter(|(t, _, _)| t == "TicketEscalated")
        .collect();
    assert_eq!(escalated.len(), 1);
    assert_eq!(escalated[0].1["rule"], "sla_breach");
    assert_eq!(escalated[0].1["target"], "service_manager");
    assert_eq!(escalated[0].1["occurred_at"], ts("2026-11-16T02:00:00Z"));
    let closed: Vec<_> = stored
        .iter()
        .filter(|(t, _, _)| t == "TicketClosed")
        .collect();
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].1["how"], "auto");
    assert_eq!(closed[0].1["occurred_at"], ts("2026-11-22T03:30:00Z"));

    // Compliance in November: first response 0 of 1, the others on time.
    let mut queries = ServiceQueriesClient::new(app.channel.clone());
    let compliance = queries
        .get_sla_compliance(app.request(GetSlaComplianceRequest {
            from: "2026-11-01T00:00:00Z".into(),
            to: "2026-12-01T00:00:00Z".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let figures: Vec<(String, u64, u64, Option<u32>)> = compliance
        .metrics
        .into_iter()
        .map(|m| (m.metric, m.met_on_time, m.breached, m.compliance_bp))
        .collect();
    assert_eq!(
        figures,
        [
            ("first_response".to_owned(), 0, 1, Some(0)),
            ("next_response".to_owned(), 1, 0, Some(10_000)),
            ("resolution".to_owned(), 1, 0, Some(10_000)),
        ]
    );
    // Redelivery: the process manager applies the whole log again (its
    // position reset to 0, as after losing its checkpoint); every command it
    // sends again is one it sent before, so nothing new is appended.
    let before = app.stored().await.len();
    crate::support::reset_position(&app, "sla_process").await;
    let nudge = crate::support::nudge(&app).await;
    crate::support::reached(&app, "sla_process", nudge).await;
    assert_eq!(app.stored().await.len(), before + 2, "only the nudge");

    // Nothing is running any more (a far-future bound means "no limit").
    let at_risk = queries
        .list_at_risk(app.request(ListAtRiskRequest {
            due_before: "9000-01-01T00:00:00Z".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(at_risk.clocks.is_empty());
    store.shutdown().await;
    app.stop().await;
}

#[tokio::test]
async fn clocks_at_risk_page_soonest_first_and_bad_queries_are_refused() {
    let (app, _scheduler, _clock, store) = app_and_scheduler().await;
    complaint_policy(&app).await;
    let mut tickets = Vec::new();
    for hour in ["01", "02", "03"] {
        let id = app
            .tickets()
            .open_ticket(app.request(OpenTicketRequest {
                // Mon 09:00, 10:00, 11:00 local.
                options: at(&format!("2026-11-16T{hour}:00:00Z")),
                requester_id: crate::support::person(&app, "Ticket", "Requester").await,
                channel: "email".into(),
                r#type: "complaint".into(),
                subject: "Broken".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .stream_id;
        until(&app, &id, "clocks applied", |c| c.metric == "resolution").await;
        tickets.push(id);
    }
    // A question has no policy: no clocks.
    let question = app
        .tickets()
        .open_ticket(app.request(OpenTicketRequest {
            requester_id: crate::support::person(&app, "Ticket", "Requester").await,
            channel: "chat".into(),
            r#type: "question".into(),
            subject: "Opening hours?".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let mut queries = ServiceQueriesClient::new(app.channel.clone());
    let status = queries
        .get_ticket_sla(app.request(GetTicketSlaRequest {
            ticket_id: question.stream_id.clone(),
            options: Some(crm_proto::v1::QueryOptions {
                min_position: question.global_position,
            }),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // First responses, two a page, soonest first: 11:00, 12:00, 13:00 local.
    let seen = all_pages(|page_token| {
        let (mut queries, app) = (queries.clone(), &app);
        async move {
            let page = queries
                .list_at_risk(app.request(ListAtRiskRequest {
                    due_before: "2030-01-01T00:00:00Z".into(),
                    metric: "first_response".into(),
                    page_size: 2,
                    page_token,
                    ..Default::default()
                }))
                .await
                .unwrap()
                .into_inner();
            assert!(page.clocks.len() <= 2);
            let clocks = page.clocks.into_iter();
            let items = clocks.map(|c| (c.ticket_id, c.clock.unwrap().due));
            (items.collect(), page.next_page_token)
        }
    })
    .await;
    let expected: Vec<(String, String)> = tickets
        .iter()
        .zip(["03", "04", "05"])
        .map(|(id, hour)| (id.clone(), ts(&format!("2026-11-16T{hour}:00:00Z"))))
        .collect();
    assert_eq!(seen, expected);
    // Due before Mon 12:00 local: only the first.
    let early = queries
        .list_at_risk(app.request(ListAtRiskRequest {
            due_before: "2026-11-16T04:00:00Z".into(),
            metric: "first_response".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(early.clocks.len(), 1);

    // ListQueue: by priority, then by the earliest running due. Once the
    // first ticket's first response is met, its next due (next response,
    // resolution) is later than the others' first responses, so it moves
    // behind them; the question, a normal ticket with no clock, comes after
    // the (high) complaints.
    let replied = app
        .tickets()
        .add_ticket_message(app.request(AddTicketMessageRequest {
            options: at("2026-11-16T01:30:00Z"),
            ticket_id: tickets[0].clone(),
            author_role: "agent".into(),
            author: "agent:g".into(),
            public: true,
            body: "On it".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    until(&app, &tickets[0], "first response met", |c| {
        c.metric == "first_response" && c.state == "met"
    })
    .await;
    let listed = all_pages(|page_token| {
        let (mut queries, app) = (queries.clone(), &app);
        async move {
            let page = queries
                .list_queue(app.request(crm_proto::v1::ListQueueRequest {
                    options: Some(crm_proto::v1::QueryOptions {
                        min_position: replied.global_position,
                    }),
                    page_size: 2,
                    page_token,
                    ..Default::default()
                }))
                .await
                .unwrap()
                .into_inner();
            let tickets = page.tickets.into_iter();
            let items = tickets.map(|t| (t.ticket_id, t.next_due));
            (items.collect::<Vec<_>>(), page.next_page_token)
        }
    })
    .await;
    let order: Vec<&str> = listed.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        order,
        [
            tickets[1].as_str(),
            tickets[2].as_str(),
            tickets[0].as_str(),
            question.stream_id.as_str()
        ]
    );
    assert_eq!(listed[0].1, ts("2026-11-16T04:00:00Z"));
    assert!(listed[2].1 > listed[1].1, "{listed:?}");
    assert_eq!(listed[3].1, "", "no clock, no due");

    // Bad queries name their field.
    let bad = |status: tonic::Status| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        bad_fields(&status)
    };
    let status = queries
        .get_ticket_sla(app.request(GetTicketSlaRequest {
            ticket_id: "not-a-uuid".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad(status), ["ticket_id"]);
    for (request, field) in [
        (
            ListAtRiskRequest {
                metric: "lunch".into(),
                ..Default::default()
            },
            "metric",
        ),
        (
            ListAtRiskRequest {
                page_size: 500,
                ..Default::default()
            },
            "page_size",
        ),
        (
            ListAtRiskRequest {
                page_token: "nonsense".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            ListAtRiskRequest {
                due_before: "tomorrow".into(),
                ..Default::default()
            },
            "due_before",
        ),
        (
            ListAtRiskRequest {
                due_before: "0001-01-01T00:00:00Z".into(),
                ..Default::default()
            },
            "due_before",
        ),
    ] {
        let status = queries
            .list_at_risk(app.request(request))
            .await
            .unwrap_err();
        assert_eq!(bad(status), [field]);
    }
    let status = queries
        .get_sla_compliance(app.request(GetSlaComplianceRequest {
            from: "2026-12-01T00:00:00Z".into(),
            to: "2026-11-01T00:00:00Z".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad(status), ["to"]);
    // Another tenant sees none of these clocks.
    let status = queries
        .get_ticket_sla(crate::support::as_caller(
            GetTicketSlaRequest {
                ticket_id: tickets[0].clone(),
                ..Default::default()
            },
            Some("someone-else"),
            Some("user:eve"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    store.shutdown().await;
    app.stop().await;
}
