//! `crm.v1.Tickets` through a real client: the worked complaint flow and bad inputs.
use crm_proto::v1::{
    AddTicketMessageRequest, ChangeTicketStatusRequest, CloseTicketRequest, EscalateTicketRequest,
    OpenTicketRequest, RecordCsatRequest, SolveTicketRequest, TriageTicketRequest,
};
use tonic::Code;

use crate::support::{TestApp, bad_fields, error_info};

fn complaint() -> OpenTicketRequest {
    OpenTicketRequest {
        requester_id: uuid::Uuid::now_v7().to_string(),
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
        .open_ticket(app.request(complaint()))
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

    let stored: Vec<_> = app.stored().await;
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

    // Closed: no more messages.
    let status = app
        .tickets()
        .add_ticket_message(app.request(say(&id, "customer", "hello?")))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).0.as_str()),
        (Code::FailedPrecondition, "INVALID_TRANSITION")
    );
    app.stop().await;
}

#[tokio::test]
async fn bad_ticket_inputs_are_refused_and_store_nothing() {
    let app = TestApp::spawn().await;
    let mut bad = complaint();
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
    let mut bad = complaint();
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
    let mut bad = complaint();
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
    let mut bad = complaint();
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
    assert!(app.stored().await.is_empty());

    let id = app
        .tickets()
        .open_ticket(app.request(complaint()))
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
    assert_eq!(app.stored().await.len(), 1);
    app.stop().await;
}
