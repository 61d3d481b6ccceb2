//! Request limits found by a systematic pass over the command requests: each
//! oversized or malformed field is INVALID_ARGUMENT by name, before any
//! lookup, and stores nothing.
use crm_proto::v1::{
    AddTicketMessageRequest, AssignTicketRequest, CancelOrderRequest,
    ChangeOpportunityStageRequest, ChangeTagsRequest, ContactPreferences, CreateContactRequest,
    EmailAddress, ExternalRef, IssueRefundRequest, LinkContactToAccountRequest, PersonName,
    RecordOrderRequest, RecordRef, RevokeShareRequest,
};

use crate::support::{TestApp, bad_fields};

#[tokio::test]
async fn oversized_and_malformed_fields_are_refused_by_name() {
    let app = TestApp::spawn().await;
    let account = crate::support::company(&app, "Acme").await;
    let before = app.stored().await.len();
    let record = || {
        Some(RecordRef {
            r#type: "account".into(),
            id: account.clone(),
        })
    };

    let many: Vec<String> = (0..51).map(|i| format!("tag_{i}")).collect();
    let status = app
        .records()
        .change_tags(app.request(ChangeTagsRequest {
            record: record(),
            add: many.clone(),
            remove: many,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["add", "remove"]);
    let status = app
        .records()
        .change_tags(app.request(ChangeTagsRequest {
            record: record(),
            remove: vec!["Not A Code".into()],
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["remove[0]"]);
    let status = app
        .records()
        .revoke_share(app.request(RevokeShareRequest {
            record: record(),
            grantee: "u".repeat(201),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["grantee"]);

    let status = app
        .opportunities()
        .change_opportunity_stage(app.request(ChangeOpportunityStageRequest {
            opportunity_id: uuid::Uuid::now_v7().to_string(),
            stage: "s".repeat(65),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["stage"]);

    let contact = |language: &str, address: String| CreateContactRequest {
        name: Some(PersonName {
            given: "Ana".into(),
            family: String::new(),
        }),
        emails: vec![EmailAddress {
            address,
            ..Default::default()
        }],
        preferences: Some(ContactPreferences {
            language: language.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let long_tag = format!("en-{}", ["abcdefgh"; 5].join("-"));
    let status = app
        .contacts()
        .create_contact(app.request(contact(&long_tag, "ana@example.com".into())))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["preferences.language"]);
    let padded = format!("{}ana@example.com", " ".repeat(400));
    let status = app
        .contacts()
        .create_contact(app.request(contact("en", padded)))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["emails[0].address"]);

    // The ERP's references are checked before they are looked up.
    let bad_ref = || {
        Some(ExternalRef {
            source: "S A P".into(),
            external_id: "x".repeat(201),
            external_version: 1,
        })
    };
    let status = app
        .commerce()
        .cancel_order(app.erp(CancelOrderRequest {
            external: bad_ref(),
            reason: "cancelled".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&status),
        ["external.source", "external.external_id"]
    );
    let status = app
        .commerce()
        .issue_refund(app.erp(IssueRefundRequest {
            payment: bad_ref(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&status),
        ["payment.source", "payment.external_id"]
    );
    let status = app
        .commerce()
        .record_order(app.erp(RecordOrderRequest {
            external: Some(ExternalRef {
                source: "erp".into(),
                external_id: "SO-1".into(),
                external_version: 1,
            }),
            customer_tax_id: "t".repeat(300),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["customer_tax_id"]);
    assert_eq!(app.stored().await.len(), before);
    app.stop().await;
}

/// Input is checked before the lookups of the records it names: bad input
/// naming records that do not exist is INVALID_ARGUMENT by field, not
/// NOT_FOUND or INVALID_REFERENCE from a lookup made for nothing.
#[tokio::test]
async fn bad_input_is_refused_before_the_records_it_names_are_read() {
    let app = TestApp::spawn().await;
    let unknown = || uuid::Uuid::now_v7().to_string();
    let status = app
        .tickets()
        .assign_ticket(app.request(AssignTicketRequest {
            ticket_id: unknown(),
            queue_id: unknown(),
            assignee: "a".repeat(201),
            method: "by_hand".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["method", "assignee"]);
    let status = app
        .contacts()
        .link_contact_to_account(app.request(LinkContactToAccountRequest {
            contact_id: unknown(),
            account_id: unknown(),
            role: "Decision Maker".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["role"]);
    let status = app
        .tickets()
        .add_ticket_message(app.request(AddTicketMessageRequest {
            ticket_id: unknown(),
            author_role: "customer".into(),
            public: true,
            body: "b".repeat(100_001),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["body"]);
    // A lead's consent: one decision per purpose, known purposes.
    let mut lead = crate::leads::li_wei("li@example.cn", "Wei Trading");
    lead.consent = vec![crate::leads::email_consent(); 6];
    let status = app
        .leads()
        .capture_lead(app.request(lead.clone()))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["consent"]);
    lead.consent = vec![crate::leads::email_consent(); 2];
    lead.consent[0].purpose = "marketing_fax".into();
    lead.consent[1].basis = "whim".into();
    let status = app
        .leads()
        .capture_lead(app.request(lead))
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&status),
        ["consent[0].purpose", "consent[1].basis"]
    );
    // An amount the read models could not sum.
    let mut huge = crate::opportunities::deal(&unknown(), &unknown());
    huge.amount.as_mut().unwrap().amount_minor = 5_000_000_000_000_000_000;
    let status = app
        .opportunities()
        .open_opportunity(app.request(huge))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["amount.amount_minor"]);
    app.stop().await;
}

/// Ids a command stores as references must name records of the right kind:
/// FAILED_PRECONDITION, INVALID_REFERENCE on the field, nothing stored.
#[tokio::test]
async fn references_to_records_that_do_not_exist_are_refused() {
    let app = TestApp::spawn().await;
    let unknown = uuid::Uuid::now_v7().to_string();
    let expect = |status: tonic::Status, field: &str| {
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert_eq!(crate::support::error_info(&status).1["field"], field);
    };
    let mut lead = crate::leads::li_wei("li@example.cn", "Wei Trading");
    lead.source.as_mut().unwrap().campaign_id = unknown.clone();
    expect(
        app.leads()
            .capture_lead(app.request(lead))
            .await
            .unwrap_err(),
        "source.campaign_id",
    );
    let order = |account_id: &str, deal_id: &str| RecordOrderRequest {
        external: Some(ExternalRef {
            source: "erp".into(),
            external_id: "SO-1".into(),
            external_version: 1,
        }),
        account_id: account_id.into(),
        deal_id: deal_id.into(),
        status: "paid".into(),
        lines: vec![crm_proto::v1::OrderLine {
            sku: "A".into(),
            quantity: 1,
            unit_price: crate::support::cny(100),
            line_total: crate::support::cny(100),
            line_cost: None,
        }],
        net: crate::support::cny(100),
        tax: crate::support::cny(0),
        gross: crate::support::cny(100),
        ordered_on: "2026-01-05".into(),
        ..Default::default()
    };
    expect(
        app.commerce()
            .record_order(app.erp(order(&unknown, "")))
            .await
            .unwrap_err(),
        "account_id",
    );
    expect(
        app.commerce()
            .record_order(app.erp(order("", &unknown)))
            .await
            .unwrap_err(),
        "deal_id",
    );
    assert!(app.stored().await.is_empty());
    app.stop().await;
}
