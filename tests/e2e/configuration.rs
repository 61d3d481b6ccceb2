//! `crm.v1.Configuration`: role-checked, versioned, validated.
use crm_proto::v1::{
    CommissionTier, DateOverride, PublishBusinessCalendarRequest, PublishCommissionPlanRequest,
    PublishSlaPolicyRequest, SlaTargets, WorkingHours,
};
use tonic::Code;

use crate::support::{TestApp, bad_fields, error_info};

pub(crate) fn with_roles<T>(app: &TestApp, message: T, roles: &str) -> tonic::Request<T> {
    let mut request = app.request(message);
    request
        .metadata_mut()
        .insert("x-roles", roles.parse().unwrap());
    request
}

fn calendar(id: &str) -> PublishBusinessCalendarRequest {
    PublishBusinessCalendarRequest {
        options: None,
        calendar_id: id.into(),
        name: "Shanghai office".into(),
        time_zone: "Asia/Shanghai".into(),
        weekly: (1..=5)
            .map(|weekday| WorkingHours {
                weekday,
                start: "09:00".into(),
                end: "18:00".into(),
            })
            .collect(),
        overrides: vec![DateOverride {
            date: "2026-10-01".into(),
            hours: vec![],
            name: "National Day".into(),
        }],
    }
}

#[tokio::test]
async fn calendars_and_policies_are_versioned_and_need_the_right_role() {
    let app = TestApp::spawn().await;
    let status = app
        .configuration()
        .publish_business_calendar(app.request(calendar("")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let first = app
        .configuration()
        .publish_business_calendar(with_roles(&app, calendar(""), "service_manager"))
        .await
        .unwrap()
        .into_inner();
    let same = app
        .configuration()
        .publish_business_calendar(with_roles(&app, calendar(&first.stream_id), "admin"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((same.stream_version, same.unchanged), (1, true));
    // A client's id is a UUIDv7: other versions are the server's derived ids
    // (version 5), which a first publish would take over.
    let derived = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, b"crm:tenant_settings");
    for id in [
        derived.to_string(),
        "9f8b1c2e-4a5d-4e6f-8a7b-1c2d3e4f5a6b".to_owned(),
    ] {
        let status = app
            .configuration()
            .publish_business_calendar(with_roles(&app, calendar(&id), "admin"))
            .await
            .unwrap_err();
        assert_eq!(crate::support::bad_fields(&status), ["calendar_id"]);
    }
    let mut saturday = calendar(&first.stream_id);
    saturday.overrides.push(DateOverride {
        date: "2026-10-11".into(),
        hours: vec!["09:00-18:00".into()],
        name: "Make-up workday".into(),
    });
    let second = app
        .configuration()
        .publish_business_calendar(with_roles(&app, saturday, "admin"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.stream_version, 2);

    let targets = |priority: &str, first_response: u32| SlaTargets {
        priority: priority.into(),
        first_response_minutes: first_response,
        next_response_minutes: 240,
        resolution_minutes: 960,
    };
    let policy = PublishSlaPolicyRequest {
        name: "Complaints".into(),
        order: 1,
        ticket_types: vec!["complaint".into()],
        targets: vec![
            targets("low", 480),
            targets("normal", 240),
            targets("high", 120),
            targets("urgent", 60),
        ],
        calendar_id: first.stream_id.clone(),
        pause_statuses: vec!["pending".into()],
        warning_percent: 75,
        ..Default::default()
    };
    app.configuration()
        .publish_sla_policy(with_roles(&app, policy.clone(), "service_manager"))
        .await
        .unwrap();
    // A calendar never published would silently count 24×7.
    let unknown_calendar = PublishSlaPolicyRequest {
        calendar_id: uuid::Uuid::now_v7().to_string(),
        ..policy.clone()
    };
    let status = app
        .configuration()
        .publish_sla_policy(with_roles(&app, unknown_calendar, "service_manager"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let (reason, metadata) = crate::support::error_info(&status);
    assert_eq!(
        (reason.as_str(), metadata["field"].as_str()),
        ("INVALID_REFERENCE", "calendar_id")
    );
    let mut bad = policy;
    bad.targets.truncate(3);
    bad.warning_percent = 0;
    let status = app
        .configuration()
        .publish_sla_policy(with_roles(&app, bad, "service_manager"))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["targets", "warning_percent"]);
    app.stop().await;
}

#[tokio::test]
async fn commission_plans_check_their_tiers() {
    let app = TestApp::spawn().await;
    let plan = PublishCommissionPlanRequest {
        name: "AE 2026".into(),
        effective_from: "2026-01-01".into(),
        metric: "bookings".into(),
        tier_basis: "attainment".into(),
        tiers: vec![
            CommissionTier {
                from: 0,
                rate_bp: 300,
            },
            CommissionTier {
                from: 10_000,
                rate_bp: 500,
            },
            CommissionTier {
                from: 15_000,
                rate_bp: 800,
            },
        ],
        clawback_days: 90,
        payout_grace_days: None,
        reps: vec!["user:rep".into()],
        ..Default::default()
    };
    let status = app
        .configuration()
        .publish_commission_plan(with_roles(&app, plan.clone(), "service_manager"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    app.configuration()
        .publish_commission_plan(with_roles(&app, plan.clone(), "sales_manager"))
        .await
        .unwrap();
    let stored = app.stored().await;
    assert_eq!(
        stored[0].1["content"]["tier_mode"], "marginal",
        "the default mode"
    );
    let mut bad = plan;
    bad.tiers[0].from = 100;
    bad.effective_from = "soon".into();
    assert_eq!(
        bad_fields(
            &app.configuration()
                .publish_commission_plan(with_roles(&app, bad, "admin"))
                .await
                .unwrap_err()
        ),
        ["effective_from"]
    );
    app.stop().await;
}

#[tokio::test]
async fn tenant_settings_are_admin_only_and_teams_never_cycle() {
    use crm_proto::v1::{PublishTeamRequest, PublishTenantSettingsRequest};
    let app = TestApp::spawn().await;
    let settings = PublishTenantSettingsRequest {
        fiscal_year_start_month: 4,
        ..crate::support::tenant_settings("Asia/Shanghai", "CNY")
    };
    assert_eq!(
        app.configuration()
            .publish_tenant_settings(with_roles(&app, settings.clone(), "sales_manager"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let first = app
        .configuration()
        .publish_tenant_settings(with_roles(&app, settings.clone(), "admin"))
        .await
        .unwrap()
        .into_inner();
    let second = app
        .configuration()
        .publish_tenant_settings(with_roles(
            &app,
            PublishTenantSettingsRequest {
                fiscal_year_start_month: 1,
                ..settings
            },
            "admin",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (second.stream_id.as_str(), second.stream_version),
        (first.stream_id.as_str(), 2),
        "one record per tenant"
    );

    let team = |id: &str, parent: &str| PublishTeamRequest {
        options: None,
        team_id: id.into(),
        name: "Team".into(),
        parent_id: parent.into(),
        manager: "user:mgr".into(),
        members: vec![],
    };
    let root = app
        .configuration()
        .publish_team(with_roles(&app, team("", ""), "admin"))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let child = app
        .configuration()
        .publish_team(with_roles(&app, team("", &root), "admin"))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let status = app
        .configuration()
        .publish_team(with_roles(&app, team(&root, &child), "admin"))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["parent_id"]);
    let unknown = uuid::Uuid::now_v7().to_string();
    let status = app
        .configuration()
        .publish_team(with_roles(&app, team("", &unknown), "admin"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    app.stop().await;
}

#[tokio::test]
async fn sales_targets_are_allocated_top_down() {
    use crm_proto::v1::{AllocateSalesTargetRequest, Money};
    let app = TestApp::spawn().await;
    let allocate =
        |node: &str, parent: &str, quarter: u32, amount: i64| AllocateSalesTargetRequest {
            options: None,
            fiscal_year: 2026,
            metric: "bookings".into(),
            node: node.into(),
            parent: parent.into(),
            quarter,
            month: 0,
            amount: Some(Money {
                amount_minor: amount,
                currency: "EUR".into(),
            }),
        };
    let status = app
        .configuration()
        .allocate_sales_target(with_roles(
            &app,
            allocate("company", "", 0, 4_000_000),
            "agent",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    app.configuration()
        .allocate_sales_target(with_roles(
            &app,
            allocate("company", "", 0, 4_000_000),
            "sales_manager",
        ))
        .await
        .unwrap();
    app.configuration()
        .allocate_sales_target(with_roles(
            &app,
            allocate("team:emea", "company", 0, 3_000_000),
            "sales_manager",
        ))
        .await
        .unwrap();
    let over = app
        .configuration()
        .allocate_sales_target(with_roles(
            &app,
            allocate("team:apac", "company", 0, 2_000_000),
            "sales_manager",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        over.stream_version, 3,
        "one stream per fiscal year and metric"
    );
    let stored = app.stored().await;
    assert_eq!(stored[2].1["over_allocated"], true);
    let status = app
        .configuration()
        .allocate_sales_target(with_roles(
            &app,
            allocate("user:rep", "team:nowhere", 1, 1),
            "sales_manager",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let mut bad = allocate("user:rep", "team:emea", 7, 1);
    bad.metric = "happiness".into();
    assert_eq!(
        bad_fields(
            &app.configuration()
                .allocate_sales_target(with_roles(&app, bad, "sales_manager"))
                .await
                .unwrap_err()
        ),
        ["metric"]
    );
    let bad = allocate("user:rep", "team:emea", 7, 1);
    assert_eq!(
        bad_fields(
            &app.configuration()
                .allocate_sales_target(with_roles(&app, bad, "sales_manager"))
                .await
                .unwrap_err()
        ),
        ["quarter"]
    );
    let bad = AllocateSalesTargetRequest {
        month: 4,
        parent: "x".repeat(201),
        ..allocate("user:rep", "team:emea", 1, 1)
    };
    assert_eq!(
        bad_fields(
            &app.configuration()
                .allocate_sales_target(with_roles(&app, bad, "sales_manager"))
                .await
                .unwrap_err()
        ),
        ["month", "parent"]
    );
    app.stop().await;
}

#[tokio::test]
async fn uniqueness_modes_per_tenant_decide_which_values_are_reserved() {
    use crm_proto::v1::{
        CreateContactRequest, EmailAddress, PersonName, PhoneNumber, PublishTenantSettingsRequest,
    };
    let app = TestApp::spawn().await;
    let contact = |email: &str, phone: &str| CreateContactRequest {
        name: Some(PersonName {
            given: "Ada".into(),
            family: "Lovelace".into(),
        }),
        emails: vec![EmailAddress {
            address: email.into(),
            primary: true,
        }],
        phones: vec![PhoneNumber {
            number: phone.into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    // Defaults: phones are soft (a shared phone is fine), emails hard.
    app.contacts()
        .create_contact(app.request(contact("a@example.com", "+442071838750")))
        .await
        .unwrap();
    app.contacts()
        .create_contact(app.request(contact("b@example.com", "+442071838750")))
        .await
        .unwrap();
    let status = app
        .contacts()
        .create_contact(app.request(contact("a@example.com", "+442071838751")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::AlreadyExists);

    // The tenant makes phones hard and emails soft.
    let settings = PublishTenantSettingsRequest {
        uniqueness: [
            ("phone".to_owned(), "hard".to_owned()),
            ("email".to_owned(), "soft".to_owned()),
        ]
        .into(),
        ..crate::support::tenant_settings("Europe/London", "GBP")
    };
    app.configuration()
        .publish_tenant_settings(with_roles(&app, settings.clone(), "admin"))
        .await
        .unwrap();
    let first = app
        .contacts()
        .create_contact(app.request(contact("c@example.com", "+442071838799")))
        .await
        .unwrap()
        .into_inner();
    let status = app
        .contacts()
        .create_contact(app.request(contact("d@example.com", "+442071838799")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
    assert_eq!(error_info(&status).1["holder"], first.stream_id);
    app.contacts()
        .create_contact(app.request(contact("c@example.com", "+442071838700")))
        .await
        .expect("a soft email may repeat");

    // Unknown kinds and modes are refused naming the field.
    let mut bad = settings;
    bad.uniqueness = [("phone".to_owned(), "strict".to_owned())].into();
    let status = app
        .configuration()
        .publish_tenant_settings(with_roles(&app, bad.clone(), "admin"))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), vec!["uniqueness.phone"]);
    bad.uniqueness = [("shoe_size".to_owned(), "hard".to_owned())].into();
    let status = app
        .configuration()
        .publish_tenant_settings(with_roles(&app, bad, "admin"))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), vec!["uniqueness.shoe_size"]);
    app.stop().await;
}
