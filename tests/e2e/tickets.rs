//! `crm.v1.Tickets` through a real client: the worked complaint flow and bad inputs.
use crm_proto::v1::{
    AddTicketMessageRequest, ChangeTicketStatusRequest, CloseTicketRequest, CommandOptions,
    EscalateTicketRequest, OpenTicketRequest, RecordCsatRequest, SolveTicketRequest,
    TriageTicketRequest,
};
use tonic::Code;

use crate::support::{TestApp, bad_fields, error_info};

/// A complaint from a new contact.
async fn complaint(app: &TestApp) -> OpenTicketRequest {
    OpenTicketRequest {
        requester_id: crate::support::person(app, "Li", "Wei").await,
        channel: "email".into(),
        r#type: "complaint".into(),
        category: "billing".into(),
        subject: "Charged twice".into(),
        ..OpenTicketRequest::default()
    }
}

fn say(id: &str, role: &str, body: &str) -> AddTicketMessageRequest {
    AddTicketMessageRequest {
        ticket_id: id.into(),
        author_role: role.into(),
        public: true,
        body: body.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_complaint_is_answered_waits_on_the_customer_is_solved_rated_and_closed() {
    let app = TestApp::spawn().await;
    let id = app
        .tickets()
        .open_ticket(app.request(complaint(&app).await))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    app.tickets()
        .escalate_ticket(app.request(EscalateTicketRequest {
            ticket_id: id.clone(),
            level: 1,
            rule: "sla_breach".into(),
            target: "service_manager".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    app.tickets()
        .add_ticket_message(app.request(say(&id, "agent", "Sorry, looking into it")))
        .await
        .unwrap();
    app.tickets()
        .change_ticket_status(app.request(ChangeTicketStatusRequest {
            options: None,
            ticket_id: id.clone(),
            status: "pending".into(),
        }))
        .await
        .unwrap();
    app.tickets()
        .add_ticket_message(app.request(say(&id, "customer", "Here is the receipt")))
        .await
        .unwrap();
    let status = app
        .tickets()
        .solve_ticket(app.request(SolveTicketRequest {
            ticket_id: id.clone(),
            resolution: "Refunded".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["root_cause"]);
    app.tickets()
        .solve_ticket(app.request(SolveTicketRequest {
            ticket_id: id.clone(),
            resolution: "Refunded".into(),
            root_cause: "double_charge".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    app.tickets()
        .record_csat(app.request(RecordCsatRequest {
            ticket_id: id.clone(),
            score: 4,
            ..Default::default()
        }))
        .await
        .unwrap();
    let closed = app
        .tickets()
        .close_ticket(app.request(CloseTicketRequest {
            options: None,
            ticket_id: id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();

    // The ticket's events, after its requester's contact.
    let stored: Vec<_> = app.stored().await.split_off(1);
    let types: Vec<&str> = stored.iter().map(|(t, _, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "TicketOpened",
            "TicketEscalated",
            "TicketMessageAdded",
            "TicketStatusChanged",
            "TicketStatusChanged",
            "TicketMessageAdded",
            "TicketStatusChanged",
            "TicketSolved",
            "CsatRatingReceived",
            "TicketClosed"
        ]
    );
    assert_eq!(closed.stream_version, 10);
    assert_eq!(
        stored[0].1["priority"], "high",
        "complaints default to high"
    );
    assert_eq!(
        stored[7].1["snapshot"]["assignee"], "user:ada",
        "the agent who answered first"
    );
    assert_eq!(stored[8].1["score"], 4);

    // Closed: no more agent messages.
    let status = app
        .tickets()
        .add_ticket_message(app.request(say(&id, "agent", "hello?")))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).0.as_str()),
        (Code::FailedPrecondition, "INVALID_TRANSITION")
    );
    assert_eq!(app.stored().await.len(), 1 + 10);
    app.stop().await;
}

fn with_options(
    mut request: AddTicketMessageRequest,
    key: &str,
    expected_version: Option<u64>,
) -> AddTicketMessageRequest {
    request.options = Some(CommandOptions {
        idempotency_key: key.into(),
        expected_version,
        ..Default::default()
    });
    request
}

/// Opens a complaint, solves and closes it; returns its id.
async fn closed_complaint(app: &TestApp) -> String {
    let id = app
        .tickets()
        .open_ticket(app.request(complaint(app).await))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    close(app, &id).await;
    id
}

async fn close(app: &TestApp, id: &str) {
    app.tickets()
        .solve_ticket(app.request(SolveTicketRequest {
            ticket_id: id.into(),
            resolution: "Refunded".into(),
            root_cause: "double_charge".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    app.tickets()
        .close_ticket(app.request(CloseTicketRequest {
            options: None,
            ticket_id: id.into(),
        }))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_customer_reply_to_a_closed_ticket_opens_a_linked_follow_up() {
    let app = TestApp::spawn().await;
    let id = closed_complaint(&app).await;
    let before = app.stored().await.len();

    // Bad replies change nothing.
    let stale = with_options(say(&id, "customer", "It happened again"), "", Some(2));
    let status = app
        .tickets()
        .add_ticket_message(app.request(stale))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    let internal = AddTicketMessageRequest {
        public: false,
        ..say(&id, "customer", "psst")
    };
    let status = app
        .tickets()
        .add_ticket_message(app.request(internal))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["public"]);
    let status = app
        .tickets()
        .add_ticket_message(app.request(say(&id, "customer", "  ")))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["body"]);
    assert_eq!(app.stored().await.len(), before);

    // The reply opens the follow-up, at the closed ticket's version.
    let reply = with_options(
        say(&id, "customer", "It happened again"),
        "reply-1",
        Some(3),
    );
    let first = app
        .tickets()
        .add_ticket_message(app.request(reply.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(first.stream_id, id);
    assert_eq!(first.stream_version, 2);
    let stored = app.stored().await;
    let opened = &stored[before];
    assert_eq!(
        (opened.0.as_str(), stored[before + 1].0.as_str()),
        ("TicketOpened", "TicketMessageAdded")
    );
    let original = &stored
        .iter()
        .find(|(t, _, _)| t == "TicketOpened")
        .unwrap()
        .1;
    assert_eq!(opened.1["follow_up_of"], id.as_str());
    for field in [
        "requester_id",
        "channel",
        "ticket_type",
        "category",
        "priority",
        "subject",
    ] {
        assert_eq!(opened.1[field], original[field], "{field}");
    }
    assert_eq!(stored[before + 1].1["author_role"], "customer");
    assert_eq!(stored[before + 1].1["body"], "It happened again");

    // A retry answers the first outcome; a second reply joins the follow-up.
    let again = app
        .tickets()
        .add_ticket_message(app.request(reply))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.stream_id.as_str(), again.stream_version),
        (first.stream_id.as_str(), 2)
    );
    assert!(again.unchanged);
    let second = app
        .tickets()
        .add_ticket_message(app.request(say(&id, "customer", "Still waiting")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (second.stream_id.as_str(), second.stream_version),
        (first.stream_id.as_str(), 3)
    );
    assert_eq!(app.stored().await.len(), before + 3);

    // Once the follow-up is closed too, the next reply opens its follow-up.
    close(&app, &first.stream_id).await;
    let third = app
        .tickets()
        .add_ticket_message(app.request(say(&id, "customer", "Once more")))
        .await
        .unwrap()
        .into_inner();
    assert!(third.stream_id != id && third.stream_id != first.stream_id);
    let stored = app.stored().await;
    let opened = stored
        .iter()
        .rev()
        .find(|(t, _, _)| t == "TicketOpened")
        .unwrap();
    assert_eq!(opened.1["follow_up_of"], first.stream_id.as_str());
    app.stop().await;
}

#[tokio::test]
async fn bad_ticket_inputs_are_refused_and_store_nothing() {
    let app = TestApp::spawn().await;
    let base = complaint(&app).await;
    let mut bad = base.clone();
    bad.r#type = "rant".into();
    assert_eq!(
        bad_fields(
            &app.tickets()
                .open_ticket(app.request(bad))
                .await
                .unwrap_err()
        ),
        ["type"]
    );
    let mut bad = base.clone();
    bad.channel = "pigeon".into();
    assert_eq!(
        bad_fields(
            &app.tickets()
                .open_ticket(app.request(bad))
                .await
                .unwrap_err()
        ),
        ["channel"]
    );
    let mut bad = base.clone();
    bad.requester_id = String::new();
    assert_eq!(
        bad_fields(
            &app.tickets()
                .open_ticket(app.request(bad))
                .await
                .unwrap_err()
        ),
        ["requester_id"]
    );
    let mut bad = base.clone();
    bad.subject = " ".into();
    bad.category = "Billing Stuff".into();
    assert_eq!(
        bad_fields(
            &app.tickets()
                .open_ticket(app.request(bad))
                .await
                .unwrap_err()
        ),
        ["subject", "category"]
    );
    // The requester is a contact (or a person account), the account an
    // account: ids of nothing are refused.
    for (field, requester, account) in [
        (
            "requester_id",
            uuid::Uuid::now_v7().to_string(),
            String::new(),
        ),
        (
            "account_id",
            base.requester_id.clone(),
            base.requester_id.clone(),
        ),
    ] {
        let status = app
            .tickets()
            .open_ticket(app.request(OpenTicketRequest {
                requester_id: requester,
                account_id: account,
                ..base.clone()
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(error_info(&status).1["field"], field);
    }
    // Only the requester's contact was stored.
    assert_eq!(app.stored().await.len(), 1);

    let id = app
        .tickets()
        .open_ticket(app.request(complaint(&app).await))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let status = app
        .tickets()
        .change_ticket_status(app.request(ChangeTicketStatusRequest {
            options: None,
            ticket_id: id.clone(),
            status: "solved".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["status"]);
    let status = app
        .tickets()
        .close_ticket(app.request(CloseTicketRequest {
            options: None,
            ticket_id: id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).1["from"], "new");
    let status = app
        .tickets()
        .record_csat(app.request(RecordCsatRequest {
            ticket_id: id.clone(),
            score: 5,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let internal_customer = AddTicketMessageRequest {
        public: false,
        ..say(&id, "customer", "psst")
    };
    assert_eq!(
        bad_fields(
            &app.tickets()
                .add_ticket_message(app.request(internal_customer))
                .await
                .unwrap_err()
        ),
        ["public"]
    );
    let triage = TriageTicketRequest {
        ticket_id: id.clone(),
        priority: Some("whenever".into()),
        ..Default::default()
    };
    assert_eq!(
        bad_fields(
            &app.tickets()
                .triage_ticket(app.request(triage))
                .await
                .unwrap_err()
        ),
        ["priority"]
    );
    let escalate = EscalateTicketRequest {
        ticket_id: id.clone(),
        level: 300,
        rule: "x".into(),
        target: "y".into(),
        ..Default::default()
    };
    assert_eq!(
        bad_fields(
            &app.tickets()
                .escalate_ticket(app.request(escalate))
                .await
                .unwrap_err()
        ),
        ["level"]
    );
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_eq!(
        app.tickets()
            .close_ticket(app.request(CloseTicketRequest {
                options: None,
                ticket_id: unknown
            }))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // The two requesters' contacts and the one ticket opened.
    assert_eq!(app.stored().await.len(), 3);
    app.stop().await;
}

#[tokio::test]
async fn tickets_go_to_eligible_agents_or_need_an_override() {
    use crm_proto::v1::{AssignTicketRequest, ChangeAgentAvailabilityRequest, PublishQueueRequest};
    let app = TestApp::spawn().await;
    let queue = PublishQueueRequest {
        name: "Billing".into(),
        members: vec!["agent:g".into(), "agent:h".into()],
        skills: vec!["billing".into()],
        routing: "round_robin".into(),
        ..Default::default()
    };
    let queue_id = app
        .configuration()
        .publish_queue(as_manager(&app, queue))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let availability = |agent: &str, status: &str| ChangeAgentAvailabilityRequest {
        options: None,
        agent: agent.into(),
        status: status.into(),
        capacity: 5,
        skills: vec!["billing".into()],
    };
    app.configuration()
        .change_agent_availability(as_manager(&app, availability("agent:g", "online")))
        .await
        .unwrap();
    app.configuration()
        .change_agent_availability(as_manager(&app, availability("agent:h", "offline")))
        .await
        .unwrap();
    // Changing someone else's availability needs the role.
    let status = app
        .configuration()
        .change_agent_availability(app.request(availability("agent:g", "away")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let id = app
        .tickets()
        .open_ticket(app.request(complaint(&app).await))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let assign = |assignee: &str, why: &str| AssignTicketRequest {
        options: None,
        ticket_id: id.clone(),
        queue_id: queue_id.clone(),
        assignee: assignee.into(),
        method: String::new(),
        override_reason: why.into(),
    };
    app.tickets()
        .assign_ticket(app.request(assign("agent:g", "")))
        .await
        .unwrap();
    let status = app
        .tickets()
        .assign_ticket(app.request(assign("agent:h", "")))
        .await
        .unwrap_err();
    assert_eq!(
        error_info(&status).1["field"],
        "assignee",
        "offline agents are not eligible"
    );
    let status = app
        .tickets()
        .assign_ticket(app.request(assign("agent:x", "")))
        .await
        .unwrap_err();
    assert_eq!(
        error_info(&status).1["field"],
        "assignee",
        "nor are non-members"
    );
    app.tickets()
        .assign_ticket(app.request(assign("agent:h", "customer asked for H")))
        .await
        .unwrap();
    let stored = app.stored().await;
    let assigned: Vec<_> = stored
        .iter()
        .filter(|(t, _, _)| t == "TicketAssigned")
        .collect();
    assert_eq!(assigned.len(), 2);
    assert_eq!(assigned[1].1["override_reason"], "customer asked for H");
    let unknown_queue = AssignTicketRequest {
        queue_id: uuid::Uuid::now_v7().to_string(),
        ..assign("agent:g", "")
    };
    assert_eq!(
        error_info(
            &app.tickets()
                .assign_ticket(app.request(unknown_queue))
                .await
                .unwrap_err()
        )
        .1["field"],
        "queue_id"
    );
    app.stop().await;
}

fn as_manager<T>(app: &TestApp, message: T) -> tonic::Request<T> {
    let mut request = app.request(message);
    request
        .metadata_mut()
        .insert("x-roles", "service_manager".parse().unwrap());
    request
}
