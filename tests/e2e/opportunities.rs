//! `crm.v1.Pipelines` and `crm.v1.Opportunities` through a real client.
use crm_proto::v1::{
    AccountKind, ChangeOpportunityForecastRequest, ChangeOpportunityStageRequest,
    CreateAccountRequest, LoseOpportunityRequest, Money, OpenOpportunityRequest, PipelineStage,
    PublishPipelineRequest, Reason, ReopenOpportunityRequest, StageKind, WinOpportunityRequest,
};
use tonic::Code;

use crate::configuration::with_roles;
use crate::support::{TestApp, bad_fields, error_info};

fn stage(key: &str, kind: StageKind, probability_bp: u32, category: &str) -> PipelineStage {
    PipelineStage {
        key: key.into(),
        name: key.into(),
        kind: kind.into(),
        probability_bp,
        category: category.into(),
        max_days_in_stage: 14,
        required_fields: vec![],
    }
}

fn pipeline(qualification_bp: u32) -> Vec<PipelineStage> {
    vec![
        stage(
            "qualification",
            StageKind::Open,
            qualification_bp,
            "pipeline",
        ),
        stage("proposal", StageKind::Open, 5000, "best_case"),
        stage("negotiation", StageKind::Open, 8000, "commit"),
        stage("won", StageKind::Won, 10_000, "closed"),
        stage("lost", StageKind::Lost, 0, "omitted"),
    ]
}

pub(crate) async fn setup(app: &TestApp) -> (String, String) {
    let account = CreateAccountRequest {
        kind: AccountKind::Company.into(),
        name: "Acme".into(),
        ..Default::default()
    };
    let account_id = app
        .accounts()
        .create_account(app.request(account))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let publish = PublishPipelineRequest {
        name: "Sales".into(),
        stages: pipeline(1000),
        ..Default::default()
    };
    let pipeline_id = app
        .pipelines()
        .publish_pipeline(with_roles(app, publish, "sales_manager"))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    (account_id, pipeline_id)
}

/// Records the product `WIDGET` (EUR 10,000.00) from the ERP; its id.
async fn widget(app: &TestApp) -> String {
    use crm_proto::v1::{ExternalRef, RecordProductRequest};
    let product = RecordProductRequest {
        external: Some(ExternalRef {
            source: "erp".into(),
            external_id: "P-1".into(),
            external_version: 1,
        }),
        sku: "WIDGET".into(),
        name: "Widget".into(),
        price: Some(Money {
            amount_minor: 1_000_000,
            currency: "EUR".into(),
        }),
        ..Default::default()
    };
    app.commerce()
        .record_product(app.erp(product))
        .await
        .unwrap()
        .into_inner()
        .stream_id
}

pub(crate) fn deal(account_id: &str, pipeline_id: &str) -> OpenOpportunityRequest {
    OpenOpportunityRequest {
        name: "Acme renewal".into(),
        account_id: account_id.into(),
        pipeline_id: pipeline_id.into(),
        stage: "qualification".into(),
        amount: Some(Money {
            amount_minor: 30_000_000,
            currency: "EUR".into(),
        }),
        close_date: "2026-12-31".into(),
        ..Default::default()
    }
}

/// A deal opened on `account_id` in `pipeline_id` (see [`deal`]); its id.
async fn open_deal(app: &TestApp, account_id: &str, pipeline_id: &str) -> String {
    app.opportunities()
        .open_opportunity(app.request(deal(account_id, pipeline_id)))
        .await
        .unwrap()
        .into_inner()
        .stream_id
}

pub(crate) fn to_stage(id: &str, stage: &str) -> ChangeOpportunityStageRequest {
    ChangeOpportunityStageRequest {
        options: None,
        opportunity_id: id.into(),
        stage: stage.into(),
    }
}

/// Loses `id` for `reason` (a loss reason code), with `options`.
pub(crate) fn lost(
    id: &str,
    reason: &str,
    options: Option<crm_proto::v1::CommandOptions>,
) -> crm_proto::v1::LoseOpportunityRequest {
    crm_proto::v1::LoseOpportunityRequest {
        options,
        opportunity_id: id.into(),
        reason: Some(crm_proto::v1::Reason {
            code: reason.into(),
            text: String::new(),
        }),
        competitor: String::new(),
    }
}

#[tokio::test]
async fn a_deal_moves_through_its_pipeline_version_and_is_won() {
    let app = TestApp::spawn().await;
    let (account_id, pipeline_id) = setup(&app).await;
    let id = open_deal(&app, &account_id, &pipeline_id).await;

    // A new pipeline version: the open deal follows it (the process
    // manager), keeping its stage.
    let republish = PublishPipelineRequest {
        pipeline_id: pipeline_id.clone(),
        name: "Sales".into(),
        stages: pipeline(2000),
        ..Default::default()
    };
    assert_eq!(
        app.pipelines()
            .publish_pipeline(with_roles(&app, republish, "admin"))
            .await
            .unwrap()
            .into_inner()
            .stream_version,
        2
    );
    crm_test_support::eventually(
        std::time::Duration::from_secs(20),
        "the open deal on version 2",
        || async {
            app.stored().await.into_iter().find(|(t, p, _)| {
                t == "OpportunityDetailsUpdated" && p["changes"]["pipeline_version"]["new"] == 2
            })
        },
    )
    .await;

    app.opportunities()
        .change_opportunity_stage(app.request(to_stage(&id, "negotiation")))
        .await
        .unwrap();
    app.opportunities()
        .change_opportunity_stage(app.request(to_stage(&id, "qualification")))
        .await
        .unwrap();
    let forecast = ChangeOpportunityForecastRequest {
        opportunity_id: id.clone(),
        probability_bp: Some(2500),
        ..Default::default()
    };
    app.opportunities()
        .change_opportunity_forecast(app.request(forecast))
        .await
        .unwrap();
    let won = app
        .opportunities()
        .win_opportunity(app.request(WinOpportunityRequest {
            options: None,
            opportunity_id: id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(won.stream_version, 6);

    let stored: Vec<_> = app
        .stored()
        .await
        .into_iter()
        .filter(|(t, _, _)| t.starts_with("Opportunity"))
        .collect();
    let types: Vec<&str> = stored.iter().map(|(t, _, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "OpportunityOpened",
            "OpportunityDetailsUpdated",
            "OpportunityStageChanged",
            "OpportunityStageChanged",
            "OpportunityForecastFieldsChanged",
            "OpportunityWon"
        ]
    );
    assert_eq!(
        (
            stored[0].1["pipeline_version"].as_u64(),
            stored[0].1["probability_bp"].as_u64()
        ),
        (Some(1), Some(1000))
    );
    assert_eq!(
        (
            stored[2].1["probability_bp"].as_u64(),
            stored[2].1["direction"].as_str()
        ),
        (Some(8000), Some("forward"))
    );
    // Back to qualification under version 2's default, the deal's version
    // now.
    assert_eq!(
        (
            stored[3].1["probability_bp"].as_u64(),
            stored[3].1["direction"].as_str()
        ),
        (Some(2000), Some("backward"))
    );
    assert_eq!(stored[5].1["amount"]["amount_minor"], 30_000_000);
    app.stop().await;
}

#[tokio::test]
async fn reopening_a_won_deal_needs_a_sales_manager() {
    let app = TestApp::spawn().await;
    let (account_id, pipeline_id) = setup(&app).await;
    let id = open_deal(&app, &account_id, &pipeline_id).await;
    app.opportunities()
        .win_opportunity(app.request(WinOpportunityRequest {
            options: None,
            opportunity_id: id.clone(),
        }))
        .await
        .unwrap();
    let reopen = ReopenOpportunityRequest {
        options: None,
        opportunity_id: id.clone(),
        stage: "proposal".into(),
    };
    let status = app
        .opportunities()
        .reopen_opportunity(app.request(reopen.clone()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let mut as_manager = app.request(reopen);
    as_manager
        .metadata_mut()
        .insert("x-roles", "sales_rep, sales_manager".parse().unwrap());
    assert_eq!(
        app.opportunities()
            .reopen_opportunity(as_manager)
            .await
            .unwrap()
            .into_inner()
            .stream_version,
        3
    );
    // (Process managers append on their own: find the reopening.)
    let (_, _, metadata) = app
        .stored()
        .await
        .into_iter()
        .rfind(|(t, _, _)| t == "OpportunityReopened")
        .unwrap();
    assert_eq!(
        metadata["roles"],
        serde_json::json!(["sales_rep", "sales_manager"])
    );

    // Lost deals reopen without the role; a lost reason is required.
    let lose = LoseOpportunityRequest {
        options: None,
        opportunity_id: id.clone(),
        reason: None,
        competitor: String::new(),
    };
    assert_eq!(
        bad_fields(
            &app.opportunities()
                .lose_opportunity(app.request(lose.clone()))
                .await
                .unwrap_err()
        ),
        ["reason.code"]
    );
    let lose = LoseOpportunityRequest {
        reason: Some(Reason {
            code: "price".into(),
            text: String::new(),
        }),
        ..lose
    };
    app.opportunities()
        .lose_opportunity(app.request(lose))
        .await
        .unwrap();
    let reopen = ReopenOpportunityRequest {
        options: None,
        opportunity_id: id,
        stage: "qualification".into(),
    };
    app.opportunities()
        .reopen_opportunity(app.request(reopen))
        .await
        .unwrap();
    app.stop().await;
}

#[tokio::test]
async fn bad_deals_and_pipelines_are_refused() {
    let app = TestApp::spawn().await;
    let (account_id, pipeline_id) = setup(&app).await;
    let before = app.stored().await.len();
    let unknown = uuid::Uuid::now_v7().to_string();

    let status = app
        .opportunities()
        .open_opportunity(app.request(deal(&unknown, &pipeline_id)))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).1["field"].as_str()),
        (Code::FailedPrecondition, "account_id")
    );
    let status = app
        .opportunities()
        .open_opportunity(app.request(deal(&account_id, &unknown)))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).1["field"], "pipeline_id");
    // Input errors come before the lookups: an unknown account and pipeline
    // do not hide a bad name.
    let mut nameless = deal(&unknown, &unknown);
    nameless.name = " ".into();
    let status = app
        .opportunities()
        .open_opportunity(app.request(nameless))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["name"]);
    let mut won_stage = deal(&account_id, &pipeline_id);
    won_stage.stage = "won".into();
    let status = app
        .opportunities()
        .open_opportunity(app.request(won_stage))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).1["field"], "stage");
    let mut bad = deal(&account_id, &pipeline_id);
    bad.close_date = "31/12/2026".into();
    assert_eq!(
        bad_fields(
            &app.opportunities()
                .open_opportunity(app.request(bad))
                .await
                .unwrap_err()
        ),
        ["close_date"]
    );
    let mut bad = deal(&account_id, &pipeline_id);
    bad.amount = Some(Money {
        amount_minor: -5,
        currency: "eur".into(),
    });
    assert_eq!(
        bad_fields(
            &app.opportunities()
                .open_opportunity(app.request(bad))
                .await
                .unwrap_err()
        ),
        ["amount.currency", "amount.amount_minor"]
    );
    let mut bad = deal(&account_id, &pipeline_id);
    bad.amount = None;
    assert_eq!(
        bad_fields(
            &app.opportunities()
                .open_opportunity(app.request(bad))
                .await
                .unwrap_err()
        ),
        ["amount"]
    );

    let mut stages = pipeline(1000);
    stages.retain(|s| s.key != "won");
    stages[0].category = "someday".into();
    let publish = PublishPipelineRequest {
        name: "Broken".into(),
        stages,
        ..Default::default()
    };
    assert_eq!(
        bad_fields(
            &app.pipelines()
                .publish_pipeline(with_roles(&app, publish, "sales_manager"))
                .await
                .unwrap_err()
        ),
        ["stages[0].category"]
    );
    let mut stages = pipeline(1000);
    stages.retain(|s| s.key != "won");
    let publish = PublishPipelineRequest {
        name: "Broken".into(),
        stages,
        ..Default::default()
    };
    assert_eq!(
        bad_fields(
            &app.pipelines()
                .publish_pipeline(with_roles(&app, publish, "sales_manager"))
                .await
                .unwrap_err()
        ),
        ["stages"]
    );
    // Publishing is configuration: a caller without the role is refused
    // before anything is read or stored.
    for roles in ["", "sales_rep"] {
        let publish = PublishPipelineRequest {
            name: "Mine".into(),
            stages: pipeline(1000),
            ..Default::default()
        };
        let status = app
            .pipelines()
            .publish_pipeline(if roles.is_empty() {
                app.request(publish)
            } else {
                with_roles(&app, publish, roles)
            })
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), error_info(&status).0.as_str()),
            (Code::PermissionDenied, "PERMISSION_DENIED"),
            "{roles}"
        );
    }

    let id = open_deal(&app, &account_id, &pipeline_id).await;
    let other_currency = ChangeOpportunityForecastRequest {
        opportunity_id: id.clone(),
        amount: Some(Money {
            amount_minor: 1,
            currency: "USD".into(),
        }),
        ..Default::default()
    };
    assert_eq!(
        bad_fields(
            &app.opportunities()
                .change_opportunity_forecast(app.request(other_currency))
                .await
                .unwrap_err()
        ),
        ["amount.currency"]
    );
    let status = app
        .opportunities()
        .change_opportunity_stage(app.request(to_stage(&unknown, "proposal")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        app.stored().await.len(),
        before + 1,
        "only the one valid deal was stored"
    );
    app.stop().await;
}

#[tokio::test]
async fn line_items_need_recorded_products_and_set_the_amount() {
    use crm_proto::v1::{ChangeOpportunityLineItemsRequest, LineItem};
    let app = TestApp::spawn().await;
    let (account_id, pipeline_id) = setup(&app).await;
    let id = open_deal(&app, &account_id, &pipeline_id).await;
    let product_id = widget(&app).await;
    let lines = |product: &str, quantity: u32| ChangeOpportunityLineItemsRequest {
        options: None,
        opportunity_id: id.clone(),
        lines: vec![LineItem {
            product_id: product.into(),
            quantity,
            unit_price: Some(Money {
                amount_minor: 1_000_000,
                currency: "EUR".into(),
            }),
        }],
    };
    let reply = app
        .opportunities()
        .change_opportunity_line_items(app.request(lines(&product_id, 3)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.stream_version, 3, "line items and the new amount");
    let stored = app.stored().await;
    let forecast = stored
        .iter()
        .rev()
        .find(|(t, _, _)| t == "OpportunityForecastFieldsChanged")
        .unwrap();
    assert_eq!(
        forecast.1["changes"]["amount"]["new"]["amount_minor"],
        3_000_000
    );
    let status = app
        .opportunities()
        .change_opportunity_line_items(app.request(lines(&account_id, 1)))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).1["field"].as_str()),
        (Code::FailedPrecondition, "lines")
    );
    assert_eq!(
        bad_fields(
            &app.opportunities()
                .change_opportunity_line_items(app.request(lines(&product_id, 0)))
                .await
                .unwrap_err()
        ),
        ["lines[0].quantity"]
    );
    // Over 200 lines: refused by count, before any product is looked up;
    // and a quantity whose total leaves i64 is refused, not capped.
    let mut too_many = lines(&product_id, 1);
    too_many.lines = vec![too_many.lines[0].clone(); 201];
    assert_eq!(
        bad_fields(
            &app.opportunities()
                .change_opportunity_line_items(app.request(too_many))
                .await
                .unwrap_err()
        ),
        ["lines"]
    );
    let mut huge = lines(&product_id, u32::MAX);
    huge.lines[0].unit_price = Some(Money {
        amount_minor: 10_000_000_000,
        currency: "EUR".into(),
    });
    assert_eq!(
        bad_fields(
            &app.opportunities()
                .change_opportunity_line_items(app.request(huge))
                .await
                .unwrap_err()
        ),
        ["lines[0].quantity"]
    );
    app.stop().await;
}

#[tokio::test]
async fn stages_refuse_deals_without_their_required_fields() {
    use crm_proto::v1::{ChangeOpportunityLineItemsRequest, LineItem};
    let app = TestApp::spawn().await;
    let (account_id, _) = setup(&app).await;
    let mut stages = pipeline(1000);
    stages[1].required_fields = vec!["line_items".into(), "contact_id".into()];
    stages[3].required_fields = vec!["contact_id".into()];

    // Unknown names and lost stages with requirements are refused.
    let mut bad = stages.clone();
    bad[2].required_fields = vec!["budget".into()];
    bad[4].required_fields = vec!["amount".into()];
    let publish = |stages| PublishPipelineRequest {
        name: "Demanding".into(),
        stages,
        ..Default::default()
    };
    let status = app
        .pipelines()
        .publish_pipeline(with_roles(&app, publish(bad), "admin"))
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&status),
        ["stages[2].required_fields[0]", "stages[4].required_fields"]
    );
    let pipeline_id = app
        .pipelines()
        .publish_pipeline(with_roles(&app, publish(stages), "admin"))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let id = open_deal(&app, &account_id, &pipeline_id).await;
    let before = app.stored().await.len();

    let missing = |status: tonic::Status| {
        let (reason, metadata) = error_info(&status);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(reason, "REQUIRED_FIELDS_MISSING");
        (metadata["stage"].clone(), metadata["fields"].clone())
    };
    let to_proposal = |id: &str| ChangeOpportunityStageRequest {
        opportunity_id: id.into(),
        stage: "proposal".into(),
        ..Default::default()
    };
    let status = app
        .opportunities()
        .change_opportunity_stage(app.request(to_proposal(&id)))
        .await
        .unwrap_err();
    assert_eq!(
        missing(status),
        ("proposal".into(), "contact_id,line_items".into())
    );
    let win = |id: &str| WinOpportunityRequest {
        opportunity_id: id.into(),
        ..Default::default()
    };
    let status = app
        .opportunities()
        .win_opportunity(app.request(win(&id)))
        .await
        .unwrap_err();
    assert_eq!(missing(status), ("won".into(), "contact_id".into()));
    let mut in_proposal = deal(&account_id, &pipeline_id);
    in_proposal.stage = "proposal".into();
    let status = app
        .opportunities()
        .open_opportunity(app.request(in_proposal))
        .await
        .unwrap_err();
    assert_eq!(
        missing(status),
        ("proposal".into(), "contact_id,line_items".into())
    );
    // A contact that does not exist is no contact.
    let mut ghost = deal(&account_id, &pipeline_id);
    ghost.contact_id = uuid::Uuid::now_v7().to_string();
    let status = app
        .opportunities()
        .open_opportunity(app.request(ghost))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).1["field"], "contact_id");
    assert_eq!(app.stored().await.len(), before);

    // A deal with a contact and a line moves on and is won.
    let contact_id = crate::support::person(&app, "Ana", "Lima").await;
    let mut with_contact = deal(&account_id, &pipeline_id);
    with_contact.contact_id = contact_id;
    let id = app
        .opportunities()
        .open_opportunity(app.request(with_contact))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let product_id = widget(&app).await;
    let status = app
        .opportunities()
        .change_opportunity_stage(app.request(to_proposal(&id)))
        .await
        .unwrap_err();
    assert_eq!(missing(status), ("proposal".into(), "line_items".into()));
    app.opportunities()
        .change_opportunity_line_items(app.request(ChangeOpportunityLineItemsRequest {
            options: None,
            opportunity_id: id.clone(),
            lines: vec![LineItem {
                product_id,
                quantity: 2,
                unit_price: Some(Money {
                    amount_minor: 1_000_000,
                    currency: "EUR".into(),
                }),
            }],
        }))
        .await
        .unwrap();
    app.opportunities()
        .change_opportunity_stage(app.request(to_proposal(&id)))
        .await
        .unwrap();
    app.opportunities()
        .win_opportunity(app.request(win(&id)))
        .await
        .unwrap();
    app.stop().await;
}

#[tokio::test]
async fn a_deal_without_an_amount_is_not_won() {
    let app = TestApp::spawn().await;
    let (account_id, pipeline_id) = setup(&app).await;
    let mut free = deal(&account_id, &pipeline_id);
    free.amount = Some(Money {
        amount_minor: 0,
        currency: "EUR".into(),
    });
    let id = app
        .opportunities()
        .open_opportunity(app.request(free))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let before = app.stored().await.len();
    let status = app
        .opportunities()
        .win_opportunity(app.request(WinOpportunityRequest {
            opportunity_id: id,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    let (reason, metadata) = error_info(&status);
    assert_eq!(
        (status.code(), reason.as_str(), metadata["fields"].as_str()),
        (
            Code::FailedPrecondition,
            "REQUIRED_FIELDS_MISSING",
            "amount"
        )
    );
    assert_eq!(app.stored().await.len(), before);
    app.stop().await;
}

#[tokio::test]
async fn a_deal_is_renamed_and_given_a_contact() {
    use crm_proto::v1::UpdateOpportunityDetailsRequest;
    let app = TestApp::spawn().await;
    let (account_id, pipeline_id) = setup(&app).await;
    let id = open_deal(&app, &account_id, &pipeline_id).await;
    let update = |name: Option<&str>, contact: Option<&str>| UpdateOpportunityDetailsRequest {
        options: None,
        opportunity_id: id.clone(),
        name: name.map(Into::into),
        contact_id: contact.map(Into::into),
    };
    let before = app.stored().await.len();
    let status = app
        .opportunities()
        .update_opportunity_details(app.request(update(Some(" "), Some("not-a-uuid"))))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["contact_id"]);
    let status = app
        .opportunities()
        .update_opportunity_details(app.request(update(Some(" "), None)))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["name"]);
    let ghost = uuid::Uuid::now_v7().to_string();
    let status = app
        .opportunities()
        .update_opportunity_details(app.request(update(None, Some(&ghost))))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).1["field"].as_str()),
        (Code::FailedPrecondition, "contact_id")
    );
    let status = app
        .opportunities()
        .update_opportunity_details(app.request(UpdateOpportunityDetailsRequest {
            opportunity_id: ghost,
            ..update(Some("X"), None)
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(app.stored().await.len(), before);

    let contact_id = crate::support::person(&app, "Ana", "Lima").await;
    let reply = app
        .opportunities()
        .update_opportunity_details(app.request(update(Some("Acme expansion"), Some(&contact_id))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.stream_version, 2);
    let stored = app.stored().await;
    let (event_type, payload, _) = stored.last().unwrap();
    assert_eq!(event_type, "OpportunityDetailsUpdated");
    assert_eq!(payload["changes"]["name"]["new"], "Acme expansion");
    assert_eq!(payload["changes"]["contact_id"]["new"], contact_id.as_str());
    let same = app
        .opportunities()
        .update_opportunity_details(
            app.request(update(Some(" Acme expansion "), Some(&contact_id))),
        )
        .await
        .unwrap()
        .into_inner();
    assert!(same.unchanged);
    let cleared = app
        .opportunities()
        .update_opportunity_details(app.request(update(None, Some(""))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cleared.stream_version, 3);
    app.stop().await;
}

#[tokio::test]
async fn open_deals_follow_a_new_pipeline_version_through_its_stage_mapping() {
    let app = TestApp::spawn().await;
    let (account_id, pipeline_id) = setup(&app).await;
    let mut ids = Vec::new();
    for stage in ["qualification", "proposal", "negotiation", "proposal"] {
        let mut request = deal(&account_id, &pipeline_id);
        request.stage = stage.into();
        let reply = app
            .opportunities()
            .open_opportunity(app.request(request))
            .await
            .unwrap();
        ids.push(reply.into_inner().stream_id);
    }
    let (kept, mapped, won, archived) = (
        ids[0].clone(),
        ids[1].clone(),
        ids[2].clone(),
        ids[3].clone(),
    );
    crate::support::set_archived(&app, "opportunity", &archived, true).await;
    app.opportunities()
        .win_opportunity(app.request(WinOpportunityRequest {
            opportunity_id: won.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();

    // Version 2 drops `proposal` and adds `discovery`.
    let mut stages = pipeline(1000);
    stages.remove(1);
    stages.insert(1, stage("discovery", StageKind::Open, 3000, "pipeline"));
    let publish = |mapping: &[(&str, &str)]| PublishPipelineRequest {
        pipeline_id: pipeline_id.clone(),
        name: "Sales".into(),
        stages: stages.clone(),
        stage_mapping: mapping
            .iter()
            .map(|(from, to)| ((*from).to_owned(), (*to).to_owned()))
            .collect(),
        ..Default::default()
    };
    // What callers stored (the lifecycle process manager may still be
    // appending the account's AccountBecameCustomer for the win above).
    let by_callers = || async {
        let stored = app.stored().await;
        stored
            .iter()
            .filter(|(_, _, meta)| !meta["actor"].as_str().unwrap_or("").starts_with("system:"))
            .count()
    };
    let before = by_callers().await;
    for (mapping, field) in [
        (vec![], "stage_mapping.proposal"),
        (vec![("proposal", "won")], "stage_mapping.proposal"),
        (
            vec![("proposal", "negotiation"), ("qualification", "discovery")],
            "stage_mapping.qualification",
        ),
    ] {
        let status = app
            .pipelines()
            .publish_pipeline(with_roles(&app, publish(&mapping), "admin"))
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), [field], "{mapping:?}");
    }
    assert_eq!(by_callers().await, before);
    app.pipelines()
        .publish_pipeline(with_roles(
            &app,
            publish(&[("proposal", "negotiation")]),
            "admin",
        ))
        .await
        .unwrap();

    // The process manager moves both open deals; the won one stays.
    let stored = crm_test_support::eventually(
        std::time::Duration::from_secs(20),
        "both open deals on version 2",
        || async {
            let stored = app.stored().await;
            let moved = stored
                .iter()
                .filter(|(t, p, _)| {
                    (t == "OpportunityStageChanged" && p["pipeline_version"] == 2)
                        || (t == "OpportunityDetailsUpdated"
                            && p["changes"]["pipeline_version"]["new"] == 2)
                })
                .count();
            (moved == 2).then_some(stored)
        },
    )
    .await;
    let moved = stored
        .iter()
        .find(|(t, _, _)| t == "OpportunityStageChanged")
        .unwrap();
    assert_eq!(
        (moved.1["from"].as_str(), moved.1["to"].as_str()),
        (Some("proposal"), Some("negotiation"))
    );
    assert_eq!(moved.2["actor"], "system:pipelines");
    let count = |stored: &[(String, serde_json::Value, serde_json::Value)]| {
        stored
            .iter()
            .filter(|(t, _, _)| t.starts_with("Opportunity"))
            .count()
    };
    let settled = count(&stored);

    // The kept deal is on version 2: its new stage is open to it.
    app.opportunities()
        .change_opportunity_stage(app.request(ChangeOpportunityStageRequest {
            opportunity_id: kept.clone(),
            stage: "discovery".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let status = app
        .opportunities()
        .change_opportunity_stage(app.request(ChangeOpportunityStageRequest {
            opportunity_id: mapped.clone(),
            stage: "proposal".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).1["field"], "stage");
    // The archived deal stayed; restored, it follows too.
    crate::support::set_archived(&app, "opportunity", &archived, false).await;
    let archived_id = archived.clone();
    crm_test_support::eventually(
        std::time::Duration::from_secs(20),
        "the restored deal on version 2",
        || async {
            let db = app.db.client().await;
            let id = uuid::Uuid::parse_str(&archived_id).unwrap();
            db.query_opt(
                "SELECT 1 FROM events WHERE stream_id = $1 \
                 AND event_type = 'OpportunityStageChanged' \
                 AND (payload->>'pipeline_version')::int = 2",
                &[&id],
            )
            .await
            .unwrap()
        },
    )
    .await;
    // Nothing else moved (the won deal keeps version 1): the user's move and
    // the restored deal's follow.
    assert_eq!(count(&app.stored().await), settled + 2);
    app.stop().await;
}

/// Commands read other records to decide (an account's state) before their
/// append. With the log held, an account is archived while a deal opens on
/// it, a contact links to it and a lead converts into it: each reads it
/// active, then finds at its append that it moved, reads it again and is
/// refused. Without the pins, all three would land on the archived account.
#[tokio::test]
async fn a_command_decided_on_a_record_that_moved_before_its_append_decides_again() {
    use crm_proto::v1::{ArchiveRecordRequest, LinkContactToAccountRequest, RecordRef};
    let app = TestApp::spawn().await;
    let (account_id, pipeline_id) = setup(&app).await;
    let contact_id = crate::support::person(&app, "Ada", "Lovelace").await;
    let lead = crate::leads::qualified_lead(&app, "li.wei@example.cn", "").await;
    let before = app.stored().await.len();

    let hold = crate::support::LogHold::take(&app).await;
    let archive = app.request(ArchiveRecordRequest {
        options: None,
        record: Some(RecordRef {
            r#type: "account".into(),
            id: account_id.clone(),
        }),
        reason: Some(Reason {
            code: "on_hold".into(),
            text: String::new(),
        }),
    });
    let mut records = app.records();
    let archive = tokio::spawn(async move { records.archive_record(archive).await });
    // The archive waits for the log; the commands read the account as it is
    // until the archive commits.
    hold.until_an_append_waits(&app).await;
    let (mut deals, open) = (
        app.opportunities(),
        app.request(deal(&account_id, &pipeline_id)),
    );
    let open = tokio::spawn(async move { deals.open_opportunity(open).await });
    let (mut leads, convert) = (
        app.leads(),
        app.request(crate::leads::convert(&lead, &account_id, "")),
    );
    let convert = tokio::spawn(async move { leads.convert_lead(convert).await });
    let link = app.request(LinkContactToAccountRequest {
        contact_id,
        account_id,
        ..Default::default()
    });
    let mut contacts = app.contacts();
    let link = tokio::spawn(async move { contacts.link_contact_to_account(link).await });
    // (Were the three slower to read the account than the release's pause,
    // they would read it archived and the test would pass without testing
    // the pins.)
    hold.release().await;

    archive.await.unwrap().unwrap();
    for status in [
        open.await.unwrap().unwrap_err(),
        link.await.unwrap().unwrap_err(),
        convert.await.unwrap().unwrap_err(),
    ] {
        assert_eq!(
            (status.code(), error_info(&status).0.as_str()),
            (Code::FailedPrecondition, "INVALID_REFERENCE"),
            "{status:?}"
        );
    }
    let stored = app.stored().await;
    assert_eq!(stored.len(), before + 1, "only the archive: {stored:?}");
    app.stop().await;
}

/// A pin refuses nothing by itself: a conversion onto an account that
/// changed in a way that does not matter (its industry) before the
/// conversion's append reads it again and converts.
#[tokio::test]
async fn a_conversion_onto_an_account_that_changed_harmlessly_converts() {
    use crm_proto::v1::UpdateAccountDetailsRequest;
    let app = TestApp::spawn().await;
    let (account_id, _) = setup(&app).await;
    let lead = crate::leads::qualified_lead(&app, "li.wei@example.cn", "").await;
    let hold = crate::support::LogHold::take(&app).await;
    let (mut accounts, update) = (
        app.accounts(),
        app.request(UpdateAccountDetailsRequest {
            account_id: account_id.clone(),
            industry: Some("Retail".into()),
            ..Default::default()
        }),
    );
    let update = tokio::spawn(async move { accounts.update_account_details(update).await });
    hold.until_an_append_waits(&app).await;
    let (mut leads, convert) = (
        app.leads(),
        app.request(crate::leads::convert(&lead, &account_id, "")),
    );
    let convert = tokio::spawn(async move { leads.convert_lead(convert).await });
    hold.release().await;
    let updated = update.await.unwrap().unwrap().into_inner();
    let converted = convert.await.unwrap().unwrap().into_inner();
    assert_eq!(
        (converted.account_id.as_str(), converted.account_created),
        (account_id.as_str(), false)
    );
    assert!(
        converted.global_position > updated.global_position,
        "stored after the update"
    );
    app.stop().await;
}
