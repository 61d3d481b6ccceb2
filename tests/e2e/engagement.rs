//! The scheduler's stalled-deal and churn-risk rules (DOMAIN.md §4) over the
//! `engagement` read model, driven by a clock of the test's: each fires once,
//! with `occurred_at` = when its condition became true, and a touch or a
//! paid order moves the clock.
use std::sync::{Arc, Mutex};

use crm_proto::v1::{
    ActivityTarget, ChangeOpportunityStageRequest, ExternalRef, LogActivityRequest,
    OpenOpportunityRequest, OrderLine, RecordOrderRequest,
};

use crate::support::{TestApp, TestClock, at, eur, settled, test_scheduler};

fn call(kind: &str, id: &str, when: &str) -> LogActivityRequest {
    LogActivityRequest {
        options: at(when),
        kind: "call".into(),
        direction: "outbound".into(),
        targets: vec![ActivityTarget {
            kind: kind.into(),
            id: id.into(),
        }],
        outcome: "Discussed next steps with the buyer".into(),
        body: "Call notes".into(),
        ..Default::default()
    }
}

fn payloads(
    stored: &[(String, serde_json::Value, serde_json::Value)],
    kind: &str,
) -> Vec<serde_json::Value> {
    stored
        .iter()
        .filter(|(t, _, _)| t == kind)
        .map(|(_, p, _)| p.clone())
        .collect()
}

fn paid_order(account: &str, id: &str, when: &str) -> RecordOrderRequest {
    RecordOrderRequest {
        options: at(when),
        external: Some(ExternalRef {
            source: "erp".into(),
            external_id: id.into(),
            external_version: 1,
        }),
        account_id: account.into(),
        customer_ref: "C-1".into(),
        status: "paid".into(),
        lines: vec![OrderLine {
            sku: "A".into(),
            quantity: 1,
            unit_price: eur(1_000),
            line_total: eur(1_000),
            line_cost: None,
        }],
        net: eur(1_000),
        tax: eur(0),
        gross: eur(1_000),
        ordered_on: when[..10].into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn stalled_deals_and_churn_risk_fire_once_when_their_condition_became_true() {
    let app = TestApp::spawn_with(|config| config.scheduler_interval_ms = 0).await;
    let clock = Arc::new(TestClock(Mutex::new(
        "2026-01-01T00:00:00Z".parse().unwrap(),
    )));
    let (scheduler, store) = test_scheduler(&app, clock.clone()).await;
    let (account, pipeline) = crate::opportunities::setup(&app).await;

    // Two deals opened Mar 1 09:00 in `qualification` (at most 14 days).
    let open = |name: &str| OpenOpportunityRequest {
        options: at("2026-03-01T09:00:00Z"),
        stage: "qualification".into(),
        name: name.into(),
        ..crate::opportunities::deal(&account, &pipeline)
    };
    let quiet = app
        .opportunities()
        .open_opportunity(app.request(open("Quiet")))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let busy = app
        .opportunities()
        .open_opportunity(app.request(open("Busy")))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    // The busy deal is called on Mar 10 and moves on Mar 12.
    app.activities()
        .log_activity(app.request(call("opportunity", &busy, "2026-03-10T09:00:00Z")))
        .await
        .unwrap();
    app.opportunities()
        .change_opportunity_stage(app.request(ChangeOpportunityStageRequest {
            options: at("2026-03-12T09:00:00Z"),
            opportunity_id: busy.clone(),
            stage: "proposal".into(),
        }))
        .await
        .unwrap();
    settled(&app).await;

    clock.set("2026-03-15T08:59:00Z");
    assert_eq!(scheduler.tick().await.appended, 0, "not yet");
    // Mar 15 09:00 the quiet deal has spent 14 days in its stage (and gone
    // 14 days untouched: one flag, by the stage-age rule).
    clock.set("2026-03-16T00:00:00Z");
    assert_eq!(scheduler.tick().await.appended, 1);
    settled(&app).await;
    assert_eq!(scheduler.tick().await.appended, 0, "once");
    // The busy deal: last touched Mar 10 → untouched for 14 days on Mar 24
    // 09:00 (its stage, entered Mar 12, would only age out on Mar 26).
    clock.set("2026-03-25T00:00:00Z");
    assert_eq!(scheduler.tick().await.appended, 1);
    settled(&app).await;
    assert_eq!(scheduler.tick().await.appended, 0);
    let stored = app.stored().await;
    let stalled = payloads(&stored, "OpportunityStalled");
    assert_eq!(stalled.len(), 2);
    assert_eq!(
        (
            stalled[0]["rule"].as_str(),
            stalled[0]["days"].as_u64(),
            stalled[0]["stage"].as_str()
        ),
        (Some("stage_age"), Some(14), Some("qualification"))
    );
    assert_eq!(stalled[0]["occurred_at"], "2026-03-15T09:00:00Z");
    assert_eq!(
        (stalled[1]["rule"].as_str(), stalled[1]["stage"].as_str()),
        (Some("no_touch"), Some("proposal"))
    );
    assert_eq!(stalled[1]["occurred_at"], "2026-03-24T09:00:00Z");
    let _ = quiet;

    // Churn risk: the account became a customer with a paid order on Jan 5
    // (the lifecycle process manager) and was called on Feb 1; its latest
    // touch is the busy deal's call on Mar 10 (a deal's touch is its
    // account's too): at risk 90 days later, Jun 8 09:00.
    app.commerce()
        .record_order(app.erp(paid_order(&account, "SO-1", "2026-01-05T09:00:00Z")))
        .await
        .unwrap();
    app.activities()
        .log_activity(app.request(call("account", &account, "2026-02-01T09:00:00Z")))
        .await
        .unwrap();
    settled(&app).await;
    clock.set("2026-06-08T08:00:00Z");
    assert_eq!(scheduler.tick().await.appended, 0);
    clock.set("2026-06-09T00:00:00Z");
    assert_eq!(scheduler.tick().await.appended, 1);
    settled(&app).await;
    assert_eq!(scheduler.tick().await.appended, 0, "once");
    // A paid order on Jul 1 clears the flag: the next risk is Sep 29 09:00.
    app.commerce()
        .record_order(app.erp(paid_order(&account, "SO-2", "2026-07-01T09:00:00Z")))
        .await
        .unwrap();
    settled(&app).await;
    clock.set("2026-09-29T08:00:00Z");
    assert_eq!(scheduler.tick().await.appended, 0);
    clock.set("2026-09-30T00:00:00Z");
    assert_eq!(scheduler.tick().await.appended, 1);
    let stored = app.stored().await;
    let risks = payloads(&stored, "AccountChurnRiskFlagged");
    let times: Vec<&str> = risks
        .iter()
        .map(|p| p["occurred_at"].as_str().unwrap())
        .collect();
    assert_eq!(times, ["2026-06-08T09:00:00Z", "2026-09-29T09:00:00Z"]);
    assert_eq!(risks[0]["days_inactive"], 90);

    // Inactivity churn, opted in at 365 days: the last paid order was Jul 1,
    // so the account is churned (`inactive`) on Jul 1 2027 09:00, once.
    let settings = crm_proto::v1::PublishTenantSettingsRequest {
        inactivity_churn_days: Some(365),
        ..crate::support::tenant_settings("UTC", "EUR")
    };
    app.configuration()
        .publish_tenant_settings(crate::configuration::with_roles(&app, settings, "admin"))
        .await
        .unwrap();
    settled(&app).await;
    clock.set("2027-07-01T08:00:00Z");
    let before = scheduler.tick().await.appended;
    settled(&app).await;
    clock.set("2027-07-02T00:00:00Z");
    assert!(scheduler.tick().await.appended >= 1);
    settled(&app).await;
    let stored = app.stored().await;
    let churned = payloads(&stored, "AccountChurned");
    assert_eq!(churned.len(), 1, "{before} before; once");
    assert_eq!(churned[0]["reason"], "inactive");
    assert_eq!(churned[0]["occurred_at"], "2027-07-01T09:00:00Z");
    assert_eq!(scheduler.tick().await.appended, 0, "once");
    store.shutdown().await;
    app.stop().await;
}

/// A rule that cannot run does not hold up the others: with the router's
/// tables gone (the queue-overflow rule reads them), the stalled-deal rule,
/// which runs after it, still flags the deal, and the tick counts one
/// failed rule.
#[tokio::test]
async fn a_failing_rule_does_not_stop_the_rules_after_it() {
    let app = TestApp::spawn_with(|config| config.scheduler_interval_ms = 0).await;
    let clock = Arc::new(TestClock(Mutex::new(
        "2026-01-01T00:00:00Z".parse().unwrap(),
    )));
    let (scheduler, store) = test_scheduler(&app, clock.clone()).await;
    let (account, pipeline) = crate::opportunities::setup(&app).await;
    app.opportunities()
        .open_opportunity(app.request(OpenOpportunityRequest {
            options: at("2026-03-01T09:00:00Z"),
            stage: "qualification".into(),
            name: "Quiet".into(),
            ..crate::opportunities::deal(&account, &pipeline)
        }))
        .await
        .unwrap();
    settled(&app).await;
    app.db
        .client()
        .await
        .batch_execute("ALTER TABLE router_tickets RENAME TO router_tickets_away")
        .await
        .unwrap();
    clock.set("2026-03-16T00:00:00Z");
    let tick = scheduler.tick().await;
    assert_eq!((tick.appended, tick.failed), (1, 1), "{tick:?}");
    assert_eq!(payloads(&app.stored().await, "OpportunityStalled").len(), 1);
    store.shutdown().await;
}
