//! `crm.v1.Activities`: logged interactions, scheduled work, synced messages.
use crm_proto::v1::{
    ActivityTarget, CompleteActivityRequest, LogActivityRequest, ScheduleActivityRequest,
};
use tonic::Code;

use crate::support::{TestApp, bad_fields, error_info};

fn target(kind: &str, id: &str) -> ActivityTarget {
    ActivityTarget {
        kind: kind.into(),
        id: id.into(),
    }
}

fn email(contact_id: &str, external_id: &str) -> LogActivityRequest {
    LogActivityRequest {
        kind: "email".into(),
        direction: "inbound".into(),
        targets: vec![target("contact", contact_id)],
        body: "About the renewal…".into(),
        external_id: external_id.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn synced_messages_converge_and_scheduled_work_completes() {
    let app = TestApp::spawn().await;
    let ada = crate::support::person(&app, "Ada", "").await;
    let first = app
        .activities()
        .log_activity(app.request(email(&ada, "<msg-1@mail>")))
        .await
        .unwrap()
        .into_inner();
    let again = app
        .activities()
        .log_activity(app.request(email(&ada, "<msg-1@mail>")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.stream_id.as_str(), again.unchanged),
        (first.stream_id.as_str(), true)
    );
    let other = app
        .activities()
        .log_activity(app.request(email(&ada, "<msg-2@mail>")))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.stream_id, first.stream_id);
    // A re-sync under an idempotency key is kept under it like any request
    // that changed nothing: another message under the key is refused.
    let keyed = |external_id: &str| {
        let mut request = email(&ada, external_id);
        request.options = Some(crm_proto::v1::CommandOptions {
            idempotency_key: "sync-batch-7".into(),
            ..Default::default()
        });
        app.request(request)
    };
    let resynced = app
        .activities()
        .log_activity(keyed("<msg-1@mail>"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (resynced.stream_id.as_str(), resynced.unchanged),
        (first.stream_id.as_str(), true)
    );
    let status = app
        .activities()
        .log_activity(keyed("<msg-3@mail>"))
        .await
        .unwrap_err();
    assert_eq!(
        (
            status.code(),
            crate::support::error_info(&status).0.as_str()
        ),
        (tonic::Code::FailedPrecondition, "IDEMPOTENCY_KEY_REUSED")
    );

    let schedule = ScheduleActivityRequest {
        kind: "meeting".into(),
        targets: vec![target("contact", &ada)],
        due: "2026-12-01T10:00:00Z".into(),
        subject: "Kick-off".into(),
        ..Default::default()
    };
    let meeting = app
        .activities()
        .schedule_activity(app.request(schedule))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let complete = CompleteActivityRequest {
        options: None,
        activity_id: meeting.clone(),
        outcome: "held".into(),
        notes: String::new(),
    };
    assert_eq!(
        app.activities()
            .complete_activity(app.request(complete))
            .await
            .unwrap()
            .into_inner()
            .stream_version,
        2
    );
    let stored = app.stored().await;
    let scheduled = stored
        .iter()
        .find(|(t, _, _)| t == "ActivityScheduled")
        .unwrap();
    assert_eq!(
        scheduled.1["assignee"], "user:ada",
        "defaults to the caller"
    );
    let status = app
        .activities()
        .complete_activity(app.request(CompleteActivityRequest {
            options: None,
            activity_id: first.stream_id,
            outcome: "done".into(),
            notes: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(
        error_info(&status).0,
        "INVALID_TRANSITION",
        "logged items do not complete"
    );
    app.stop().await;
}

#[tokio::test]
async fn activities_need_existing_targets_of_the_named_kind() {
    let app = TestApp::spawn().await;
    let ada = crate::support::person(&app, "Ada", "").await;
    let status = app
        .activities()
        .log_activity(app.request(email(&uuid::Uuid::now_v7().to_string(), "")))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).1["field"].as_str()),
        (Code::FailedPrecondition, "targets")
    );
    let mut wrong_kind = email(&ada, "");
    wrong_kind.targets = vec![target("account", &ada)];
    assert_eq!(
        error_info(
            &app.activities()
                .log_activity(app.request(wrong_kind))
                .await
                .unwrap_err()
        )
        .0,
        "INVALID_REFERENCE"
    );
    // More than 20 targets: refused by count before any is looked up.
    let mut crowded = email(&ada, "");
    crowded.targets = vec![target("contact", &ada); 21];
    assert_eq!(
        bad_fields(
            &app.activities()
                .log_activity(app.request(crowded))
                .await
                .unwrap_err()
        ),
        ["targets"]
    );
    // A target of an unknown kind is an input error, named, even when it
    // names no record.
    let mut unknown_kind = email(&ada, "");
    unknown_kind.kind = "fax".into();
    unknown_kind.targets = vec![target("widget", &uuid::Uuid::now_v7().to_string())];
    assert_eq!(
        bad_fields(
            &app.activities()
                .log_activity(app.request(unknown_kind))
                .await
                .unwrap_err()
        ),
        ["kind", "targets[0].kind"]
    );
    let mut bad = email(&ada, "");
    bad.kind = "fax".into();
    bad.direction = "sideways".into();
    assert_eq!(
        bad_fields(
            &app.activities()
                .log_activity(app.request(bad))
                .await
                .unwrap_err()
        ),
        ["kind", "direction"]
    );
    let mut bad = email(&ada, "");
    bad.targets = vec![target("contact", "nope")];
    assert_eq!(
        bad_fields(
            &app.activities()
                .log_activity(app.request(bad))
                .await
                .unwrap_err()
        ),
        ["targets[0].id"]
    );
    let schedule = ScheduleActivityRequest {
        kind: "meeting".into(),
        targets: vec![target("contact", &ada)],
        due: "tomorrow".into(),
        subject: "x".into(),
        ..Default::default()
    };
    assert_eq!(
        bad_fields(
            &app.activities()
                .schedule_activity(app.request(schedule))
                .await
                .unwrap_err()
        ),
        ["due"]
    );
    assert_eq!(app.stored().await.len(), 1, "only the contact");
    app.stop().await;
}

/// The scheduler's time-driven commands: only for `x-roles: system`, and
/// NOT_APPLICABLE once their condition is gone.
#[tokio::test]
async fn time_driven_commands_are_for_the_scheduler_and_check_their_condition() {
    use crm_proto::v1::{
        FlagAccountChurnRiskRequest, FlagOpportunityStalledRequest, MarkTaskOverdueRequest,
    };
    let app = TestApp::spawn().await;
    fn as_system<T>(app: &TestApp, message: T) -> tonic::Request<T> {
        let mut request = app.request(message);
        request
            .metadata_mut()
            .insert("x-roles", "system".parse().unwrap());
        request
    }
    // A deal flagged stalled once.
    let (account, pipeline) = crate::opportunities::setup(&app).await;
    let deal = app
        .opportunities()
        .open_opportunity(app.request(crate::opportunities::deal(&account, &pipeline)))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let stalled = |rule: &str| FlagOpportunityStalledRequest {
        opportunity_id: deal.clone(),
        rule: rule.into(),
        days: 14,
        ..Default::default()
    };
    let status = app
        .opportunities()
        .flag_opportunity_stalled(app.request(stalled("stage_age")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let flagged = app
        .opportunities()
        .flag_opportunity_stalled(as_system(&app, stalled("stage_age")))
        .await
        .unwrap()
        .into_inner();
    assert!(!flagged.unchanged);
    let again = app
        .opportunities()
        .flag_opportunity_stalled(as_system(&app, stalled("stage_age")))
        .await
        .unwrap()
        .into_inner();
    assert!(again.unchanged, "once per stage");
    let status = app
        .opportunities()
        .flag_opportunity_stalled(as_system(&app, stalled("moon_phase")))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), vec!["rule"]);

    // A prospect is no churn risk.
    let status = app
        .accounts()
        .flag_account_churn_risk(as_system(
            &app,
            FlagAccountChurnRiskRequest {
                account_id: account,
                days_inactive: 90,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).0, "NOT_APPLICABLE");

    // A task not due yet is not overdue.
    let ada = crate::support::person(&app, "Ada", "").await;
    let task = app
        .activities()
        .schedule_activity(app.request(ScheduleActivityRequest {
            kind: "task".into(),
            targets: vec![target("contact", &ada)],
            due: (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24)).to_string(),
            subject: "Send the offer".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let status = app
        .activities()
        .mark_task_overdue(as_system(
            &app,
            MarkTaskOverdueRequest {
                activity_id: task,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).0, "NOT_APPLICABLE");
    app.stop().await;
}

/// Schedules the task "Send the offer" about contact `ada`, due at `due`.
async fn send_the_offer(app: &TestApp, ada: &str, due: jiff::Timestamp) -> String {
    app.activities()
        .schedule_activity(app.request(ScheduleActivityRequest {
            kind: "task".into(),
            targets: vec![target("contact", ada)],
            due: due.to_string(),
            subject: "Send the offer".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id
}

/// The scheduler, driven by a clock of the test's: a task falls due once,
/// with `occurred_at` = its due time, and a repeated tick changes nothing.
#[tokio::test]
async fn the_scheduler_marks_a_task_overdue_exactly_once_at_its_due_time() {
    use std::sync::{Arc, Mutex};

    use crate::support::{TestClock, test_scheduler};

    let app = TestApp::spawn().await;
    let ada = crate::support::person(&app, "Ada", "").await;
    let due = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1))
        .round(jiff::Unit::Second)
        .unwrap();
    let task = send_the_offer(&app, &ada, due).await;
    let db = app.db.client().await;
    crm_test_support::eventually(
        std::time::Duration::from_secs(20),
        "the task in scheduled_tasks",
        || async {
            db.query_opt("SELECT 1 FROM scheduled_tasks", &[])
                .await
                .ok()
                .flatten()
        },
    )
    .await;

    let clock = Arc::new(TestClock(Mutex::new(jiff::Timestamp::now())));
    let (scheduler, store) = test_scheduler(&app, clock.clone()).await;
    assert_eq!(scheduler.tick().await.appended, 0, "not due yet");
    *clock.0.lock().unwrap() = due + jiff::SignedDuration::from_hours(1);
    assert_eq!(scheduler.tick().await.appended, 1);
    // The read model may still show it open: the idempotency key makes the
    // repeat a no-op.
    assert_eq!(scheduler.tick().await.appended, 0);
    let overdue: Vec<serde_json::Value> = app
        .stored()
        .await
        .into_iter()
        .filter(|(event_type, _, _)| event_type == "TaskOverdue")
        .map(|(_, payload, _)| payload)
        .collect();
    assert_eq!(overdue.len(), 1, "exactly once");
    assert_eq!(
        overdue[0]["occurred_at"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .unwrap(),
        due,
        "when the condition became true, not when the tick ran"
    );
    assert_eq!(
        overdue[0]["due"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .unwrap(),
        due
    );
    let _ = task;
    store.shutdown().await;
    app.stop().await;
}

#[tokio::test]
async fn rescheduled_work_falls_overdue_at_its_new_due_time() {
    use std::sync::{Arc, Mutex};

    use crm_proto::v1::UpdateActivityDetailsRequest;

    use crate::support::{TestClock, test_scheduler};

    let app = TestApp::spawn().await;
    let ada = crate::support::person(&app, "Ada", "").await;
    let due = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1))
        .round(jiff::Unit::Second)
        .unwrap();
    let later = due + jiff::SignedDuration::from_hours(3);
    let task = send_the_offer(&app, &ada, due).await;
    let update = |due: Option<String>, assignee: Option<&str>| UpdateActivityDetailsRequest {
        options: None,
        activity_id: task.clone(),
        due,
        assignee: assignee.map(Into::into),
        subject: None,
    };

    // Bad input and unknown items change nothing.
    let before = app.stored().await.len();
    let status = app
        .activities()
        .update_activity_details(app.request(update(Some("tomorrow".into()), None)))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["due"]);
    let status = app
        .activities()
        .update_activity_details(app.request(update(None, Some(""))))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["assignee"]);
    let status = app
        .activities()
        .update_activity_details(app.request(UpdateActivityDetailsRequest {
            activity_id: uuid::Uuid::now_v7().to_string(),
            ..update(Some(later.to_string()), None)
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(app.stored().await.len(), before);

    let reply = app
        .activities()
        .update_activity_details(app.request(update(Some(later.to_string()), Some("user:ana"))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.stream_version, 2);
    let db = app.db.client().await;
    let later_at: std::time::SystemTime = later.into();
    crm_test_support::eventually(
        std::time::Duration::from_secs(20),
        "the new due time in scheduled_tasks",
        || async {
            db.query_opt(
                "SELECT 1 FROM scheduled_tasks WHERE due = $1 AND assignee = 'user:ana'",
                &[&later_at],
            )
            .await
            .ok()
            .flatten()
        },
    )
    .await;
    let clock = Arc::new(TestClock(Mutex::new(
        due + jiff::SignedDuration::from_hours(1),
    )));
    let (scheduler, store) = test_scheduler(&app, clock.clone()).await;
    assert_eq!(
        scheduler.tick().await.appended,
        0,
        "the old due time passed"
    );
    *clock.0.lock().unwrap() = later + jiff::SignedDuration::from_hours(1);
    assert_eq!(scheduler.tick().await.appended, 1);
    let stored = app.stored().await;
    let (_, overdue, _) = stored.iter().find(|(t, _, _)| t == "TaskOverdue").unwrap();
    assert_eq!(
        overdue["due"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .unwrap(),
        later
    );
    assert_eq!(overdue["assignee"], "user:ana");

    // Moved away and back to the due time that already fired: it falls
    // overdue again.
    let mut position = 0;
    for to in [later + jiff::SignedDuration::from_hours(3), later] {
        let reply = app
            .activities()
            .update_activity_details(app.request(update(Some(to.to_string()), None)))
            .await
            .unwrap();
        position = i64::try_from(reply.into_inner().global_position).unwrap();
    }
    crm_test_support::eventually(
        std::time::Duration::from_secs(20),
        "the task open again at its old due time",
        || async {
            db.query_opt(
                "SELECT 1 FROM scheduled_tasks WHERE due = $1 AND NOT overdue AND position = $2",
                &[&later_at, &position],
            )
            .await
            .ok()
            .flatten()
        },
    )
    .await;
    assert_eq!(scheduler.tick().await.appended, 1);
    let overdue = app
        .stored()
        .await
        .into_iter()
        .filter(|(t, _, _)| t == "TaskOverdue")
        .count();
    assert_eq!(overdue, 2);

    // Completed work is not rescheduled.
    app.activities()
        .complete_activity(app.request(crm_proto::v1::CompleteActivityRequest {
            activity_id: task.clone(),
            outcome: "done".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let status = app
        .activities()
        .update_activity_details(app.request(update(Some(due.to_string()), None)))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).0.as_str()),
        (tonic::Code::FailedPrecondition, "INVALID_TRANSITION")
    );
    store.shutdown().await;
    app.stop().await;
}
