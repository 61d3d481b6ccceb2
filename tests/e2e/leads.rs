//! `crm.v1.Leads`: capture, status moves, and the atomic conversion.
use crm_proto::v1::{
    AccountKind, ArchiveAccountRequest, CaptureLeadRequest, ChangeLeadStatusRequest,
    CommandOptions, ConvertLeadRequest, ConvertedOpportunity, CreateAccountRequest,
    CreateContactRequest, EmailAddress, LeadSource, Money, PersonName, Reason,
};
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{TestApp, bad_fields, error_info};

pub(crate) fn li_wei(email: &str, company: &str) -> CaptureLeadRequest {
    CaptureLeadRequest {
        name: Some(PersonName {
            given: "Li".into(),
            family: "Wei".into(),
        }),
        company: company.into(),
        emails: vec![EmailAddress {
            address: email.into(),
            primary: true,
        }],
        source: Some(LeadSource {
            channel: "web".into(),
            utm_source: "newsletter".into(),
            ..LeadSource::default()
        }),
        ..CaptureLeadRequest::default()
    }
}

/// Consent to marketing email, ticked on a web form.
pub(crate) fn email_consent() -> crm_proto::v1::LeadConsent {
    crm_proto::v1::LeadConsent {
        purpose: "marketing_email".into(),
        granted: true,
        source: "web_form".into(),
        basis: "consent".into(),
    }
}

fn move_to(id: &str, to: &str) -> ChangeLeadStatusRequest {
    ChangeLeadStatusRequest {
        lead_id: id.into(),
        status: to.into(),
        ..ChangeLeadStatusRequest::default()
    }
}

/// A lead captured and moved to qualified; returns its id.
pub(crate) async fn qualified_lead(app: &TestApp, email: &str, company: &str) -> String {
    qualify(app, li_wei(email, company)).await
}

/// The lead `capture` captures, moved to qualified; returns its id.
pub(crate) async fn qualify(app: &TestApp, capture: CaptureLeadRequest) -> String {
    let id = app
        .leads()
        .capture_lead(app.request(capture))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    for to in ["working", "qualified"] {
        app.leads()
            .change_lead_status(app.request(move_to(&id, to)))
            .await
            .unwrap();
    }
    id
}

pub(crate) fn convert(lead: &str, account: &str, key: &str) -> ConvertLeadRequest {
    ConvertLeadRequest {
        options: Some(CommandOptions {
            idempotency_key: key.into(),
            ..CommandOptions::default()
        }),
        lead_id: lead.into(),
        account_id: account.into(),
        opportunity: None,
    }
}

/// The conversion of worked example A: the lead becomes account, contact
/// and a 300,000 deal in one append, and the deal knows its lead.
#[tokio::test]
async fn a_conversion_opens_the_deal_in_the_same_append() {
    let app = TestApp::spawn().await;
    let (_, pipeline_id) = crate::opportunities::setup(&app).await;
    let lead = qualified_lead(&app, "li.wei@example.cn", "Wei Trading").await;
    let before = app.stored().await.len();
    let deal = |amount_minor: i64, stage: &str| ConvertedOpportunity {
        name: "Wei Trading first order".into(),
        pipeline_id: pipeline_id.clone(),
        stage: stage.into(),
        amount: Some(Money {
            amount_minor,
            currency: "CNY".into(),
        }),
        close_date: "2026-12-31".into(),
        owner: "user:r".into(),
    };
    // Bad deal fields are named under `opportunity` and store nothing.
    for (bad, field) in [
        (deal(-1, "qualification"), "opportunity.amount.amount_minor"),
        (
            ConvertedOpportunity {
                close_date: "31/12/2026".into(),
                ..deal(1, "qualification")
            },
            "opportunity.close_date",
        ),
        (
            ConvertedOpportunity {
                pipeline_id: "nope".into(),
                ..deal(1, "qualification")
            },
            "opportunity.pipeline_id",
        ),
    ] {
        let status = app
            .leads()
            .convert_lead(app.request(ConvertLeadRequest {
                opportunity: Some(bad),
                ..convert(&lead, "", "")
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(bad_fields(&status), [field]);
    }
    let status = app
        .leads()
        .convert_lead(app.request(ConvertLeadRequest {
            opportunity: Some(deal(1, "nowhere")),
            ..convert(&lead, "", "")
        }))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).0, "INVALID_REFERENCE");
    assert_eq!(app.stored().await.len(), before, "nothing stored");

    let reply = app
        .leads()
        .convert_lead(app.request(ConvertLeadRequest {
            opportunity: Some(deal(30_000_000, "qualification")),
            ..convert(&lead, "", "convert-with-deal")
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!reply.opportunity_id.is_empty());
    let rows = app
        .db
        .client()
        .await
        .query(
            "SELECT event_type, stream_id::text, payload, xmin::text FROM events \
             WHERE global_position > $1 AND stream_type <> 'duplicate_pair' \
             ORDER BY global_position",
            &[&(before as i64)],
        )
        .await
        .unwrap();
    let types: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        types,
        [
            "LeadConverted",
            "AccountCreated",
            "ContactCreated",
            "ContactLinkedToAccount",
            "OpportunityOpened"
        ]
    );
    let transactions: std::collections::HashSet<String> = rows.iter().map(|r| r.get(3)).collect();
    assert_eq!(transactions.len(), 1, "one transaction");
    let converted: serde_json::Value = rows[0].get(2);
    assert_eq!(converted["opportunity_id"], reply.opportunity_id.as_str());
    let opened: serde_json::Value = rows[4].get(2);
    assert_eq!(rows[4].get::<_, String>(1), reply.opportunity_id);
    assert_eq!(opened["account_id"], reply.account_id.as_str());
    assert_eq!(opened["contact_id"], reply.contact_id.as_str());
    assert_eq!(opened["source"]["lead_id"], lead.as_str());
    assert_eq!(opened["source"]["channel"], "web");
    assert_eq!(opened["owner"], "user:r");
    // The retry answers the same deal.
    let again = app
        .leads()
        .convert_lead(app.request(ConvertLeadRequest {
            opportunity: Some(deal(30_000_000, "qualification")),
            ..convert(&lead, "", "convert-with-deal")
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.opportunity_id, again.unchanged),
        (reply.opportunity_id, true)
    );
    app.stop().await;
}

#[tokio::test]
async fn converting_a_lead_writes_account_contact_and_lead_in_one_append() {
    let app = TestApp::spawn().await;
    let lead = qualified_lead(&app, "li.wei@example.cn", "Wei Trading 有限公司").await;
    let before = app.stored().await.len();
    let reply = app
        .leads()
        .convert_lead(app.request(convert(&lead, "", "convert-1")))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.account_created);
    assert_eq!(reply.lead.as_ref().unwrap().stream_version, 4);

    let rows = app.db.client().await
        .query("SELECT event_type, stream_id::text, global_position, xmin::text FROM events WHERE global_position > $1 AND stream_type <> 'duplicate_pair' ORDER BY global_position", &[&(before as i64)])
        .await.unwrap();
    let types: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        types,
        [
            "LeadConverted",
            "AccountCreated",
            "ContactCreated",
            "ContactLinkedToAccount"
        ]
    );
    let transactions: std::collections::HashSet<String> = rows.iter().map(|r| r.get(3)).collect();
    assert_eq!(transactions.len(), 1, "one transaction");
    assert_eq!(rows[1].get::<_, String>(1), reply.account_id);
    assert_eq!(rows[2].get::<_, String>(1), reply.contact_id);
    assert_eq!(reply.global_position as i64, rows[3].get::<_, i64>(2));

    // A converted lead's details are frozen.
    let update = crm_proto::v1::UpdateLeadDetailsRequest {
        lead_id: lead.clone(),
        company: Some("Other".into()),
        ..Default::default()
    };
    let status = app
        .leads()
        .update_lead_details(app.request(update))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).0, "INVALID_TRANSITION");

    // The retry answers the same records; without the key, the lead is converted already.
    let again = app
        .leads()
        .convert_lead(app.request(convert(&lead, "", "convert-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            again.contact_id.as_str(),
            again.account_id.as_str(),
            again.unchanged
        ),
        (reply.contact_id.as_str(), reply.account_id.as_str(), true)
    );
    let status = app
        .leads()
        .convert_lead(app.request(convert(&lead, "", "")))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).0.as_str()),
        (Code::FailedPrecondition, "INVALID_TRANSITION")
    );
    assert_eq!(app.stored().await.len(), before + 4);

    // The new contact holds the lead's email like any contact.
    let taken = CreateContactRequest {
        name: Some(PersonName {
            given: "Other".into(),
            family: String::new(),
        }),
        emails: vec![EmailAddress {
            address: "LI.WEI@example.cn".into(),
            primary: true,
        }],
        ..CreateContactRequest::default()
    };
    let status = app
        .contacts()
        .create_contact(app.request(taken))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).1["holder"], reply.contact_id);
    app.stop().await;
}

#[tokio::test]
async fn a_conversion_that_fails_on_any_stream_stores_nothing() {
    let app = TestApp::spawn().await;
    // Another contact already holds the lead's email.
    let holder = CreateContactRequest {
        name: Some(PersonName {
            given: "Mei".into(),
            family: "Chen".into(),
        }),
        emails: vec![EmailAddress {
            address: "li.wei@example.cn".into(),
            primary: true,
        }],
        ..CreateContactRequest::default()
    };
    app.contacts()
        .create_contact(app.request(holder))
        .await
        .unwrap();
    let lead = qualified_lead(&app, "li.wei@example.cn", "Wei Trading").await;
    let before = app.stored().await.len();
    let status = app
        .leads()
        .convert_lead(app.request(convert(&lead, "", "")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(
        app.stored().await.len(),
        before,
        "no account, no contact, lead unchanged"
    );
    app.stop().await;
}

#[tokio::test]
async fn conversion_links_an_existing_account_and_refuses_unusable_ones() {
    let app = TestApp::spawn().await;
    let account = CreateAccountRequest {
        kind: AccountKind::Company.into(),
        name: "Acme".into(),
        ..CreateAccountRequest::default()
    };
    let account_id = app
        .accounts()
        .create_account(app.request(account))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let lead = qualified_lead(&app, "li.wei@example.cn", "").await;
    let reply = app
        .leads()
        .convert_lead(app.request(convert(&lead, &account_id, "")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (reply.account_id.as_str(), reply.account_created),
        (account_id.as_str(), false)
    );

    let archived_lead = qualified_lead(&app, "mei@example.cn", "").await;
    let archive = ArchiveAccountRequest {
        options: None,
        account_id: account_id.clone(),
        reason: Some(Reason {
            code: "closed".into(),
            text: String::new(),
        }),
    };
    app.accounts()
        .archive_account(app.request(archive))
        .await
        .unwrap();
    let status = app
        .leads()
        .convert_lead(app.request(convert(&archived_lead, &account_id, "")))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).0.as_str()),
        (Code::FailedPrecondition, "INVALID_REFERENCE")
    );
    let unknown = uuid::Uuid::now_v7().to_string();
    let status = app
        .leads()
        .convert_lead(app.request(convert(&archived_lead, &unknown, "")))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).0, "INVALID_REFERENCE");
    // A lead without a company needs an account to convert into.
    let status = app
        .leads()
        .convert_lead(app.request(convert(&archived_lead, "", "")))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["account_id"]);
    app.stop().await;
}

/// An archived lead is refused like every other command of it, and the
/// refusal stores nothing: restored, the same lead converts.
#[tokio::test]
async fn an_archived_lead_does_not_convert() {
    let app = TestApp::spawn().await;
    let lead = qualified_lead(&app, "archived@example.cn", "Archived Trading").await;
    crate::support::set_archived(&app, "lead", &lead, true).await;
    let status = app
        .leads()
        .convert_lead(app.request(convert(&lead, "", "")))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).0.as_str()),
        (Code::FailedPrecondition, "RECORD_ARCHIVED")
    );
    crate::support::set_archived(&app, "lead", &lead, false).await;
    let reply = app
        .leads()
        .convert_lead(app.request(convert(&lead, "", "")))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.account_created);
    app.stop().await;
}

#[tokio::test]
async fn lead_status_moves_and_bad_inputs() {
    let app = TestApp::spawn().await;
    let id = app
        .leads()
        .capture_lead(app.request(li_wei("li@example.cn", "")))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let status = app
        .leads()
        .change_lead_status(app.request(move_to(&id, "qualified")))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).1["from"].as_str()),
        (Code::FailedPrecondition, "new")
    );
    assert_eq!(
        bad_fields(
            &app.leads()
                .change_lead_status(app.request(move_to(&id, "converted")))
                .await
                .unwrap_err()
        ),
        ["status"]
    );
    assert_eq!(
        bad_fields(
            &app.leads()
                .change_lead_status(app.request(move_to(&id, "disqualified")))
                .await
                .unwrap_err()
        ),
        ["reason"]
    );
    let status_code = app
        .leads()
        .convert_lead(app.request(convert(&id, "", "")))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status_code).0, "INVALID_TRANSITION");

    let mut nothing = li_wei("", "");
    nothing.emails.clear();
    assert_eq!(
        bad_fields(
            &app.leads()
                .capture_lead(app.request(nothing))
                .await
                .unwrap_err()
        ),
        ["emails"]
    );
    let mut bad = li_wei("not-an-email", "Acme");
    bad.source.as_mut().unwrap().channel = String::new();
    assert_eq!(
        bad_fields(
            &app.leads()
                .capture_lead(app.request(bad))
                .await
                .unwrap_err()
        ),
        ["emails[0].address", "source.channel"]
    );
    let update = crm_proto::v1::UpdateLeadDetailsRequest {
        lead_id: id.clone(),
        company: Some("Wei Trading".into()),
        ..Default::default()
    };
    assert_eq!(
        app.leads()
            .update_lead_details(app.request(update))
            .await
            .unwrap()
            .into_inner()
            .stream_version,
        2
    );
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_eq!(
        app.leads()
            .change_lead_status(app.request(move_to(&unknown, "working")))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    app.stop().await;
}

#[tokio::test]
async fn tenants_may_let_working_leads_convert() {
    use crm_proto::v1::PublishTenantSettingsRequest;
    let app = TestApp::spawn().await;
    let id = app
        .leads()
        .capture_lead(app.request(li_wei("li@example.cn", "Wei Trading")))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    app.leads()
        .change_lead_status(app.request(move_to(&id, "working")))
        .await
        .unwrap();
    let status = app
        .leads()
        .convert_lead(app.request(convert(&id, "", "")))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).1["from"], "working");

    let settings = PublishTenantSettingsRequest {
        convert_from_working: true,
        ..crate::support::tenant_settings("Asia/Shanghai", "CNY")
    };
    let mut request = app.request(settings);
    request
        .metadata_mut()
        .insert("x-roles", "admin".parse().unwrap());
    app.configuration()
        .publish_tenant_settings(request)
        .await
        .unwrap();
    let converted = app
        .leads()
        .convert_lead(app.request(convert(&id, "", "")))
        .await
        .unwrap()
        .into_inner();
    assert!(converted.account_created);
    app.stop().await;
}

#[tokio::test]
async fn duplicate_leads_merge_in_one_append() {
    use crm_proto::v1::MergeLeadsRequest;
    let app = TestApp::spawn().await;
    let survivor = app
        .leads()
        .capture_lead(app.request(li_wei("li@example.cn", "Wei Trading")))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let loser = app
        .leads()
        .capture_lead(app.request(li_wei("wei.li@work.example", "")))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let merge = MergeLeadsRequest {
        survivor_id: survivor.clone(),
        loser_ids: vec![loser.clone()],
        ..Default::default()
    };
    let merged = app
        .leads()
        .merge_leads(app.manager(merge.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(merged.changes_json.contains("wei.li@work.example"));
    let status = app
        .leads()
        .change_lead_status(app.request(move_to(&loser, "working")))
        .await
        .unwrap_err();
    assert_eq!(
        (
            error_info(&status).0.as_str(),
            error_info(&status).1["survivor"].as_str()
        ),
        ("RECORD_MERGED", survivor.as_str())
    );
    let status = app
        .leads()
        .merge_leads(app.manager(merge))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).0, "RECORD_MERGED");
    app.stop().await;
}

#[tokio::test]
async fn a_lead_can_be_erased_by_an_admin_and_then_refuses_commands() {
    use crm_proto::v1::{ChangeLeadStatusRequest, EraseLeadPersonalDataRequest};
    let app = TestApp::spawn().await;
    let lead = app
        .leads()
        .capture_lead(app.request(li_wei("li@example.com", "Wei Trading")))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let stored = app.stored().await;
    assert!(
        !stored[0].1.to_string().contains("li@example.com"),
        "personal fields are stored encrypted"
    );
    assert_eq!(
        stored[0].1["company"], "Wei Trading",
        "the company is not personal"
    );
    let mut erase = app.request(EraseLeadPersonalDataRequest {
        lead_id: lead.clone(),
        request: "DSR-9".into(),
        ..Default::default()
    });
    erase
        .metadata_mut()
        .insert("x-roles", "admin".parse().unwrap());
    app.leads().erase_lead_personal_data(erase).await.unwrap();
    let status = app
        .leads()
        .change_lead_status(app.request(ChangeLeadStatusRequest {
            lead_id: lead,
            status: "working".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).0, "RECORD_ERASED");
    app.stop().await;
}

/// Data the lead kept that its contact may not have (no given name) is the
/// lead's to fix first: a precondition naming each field, not a bad request. The request's own
/// fields are checked before anything is read: a malformed deal answers the
/// same for a lead that does not exist.
#[tokio::test]
async fn a_lead_whose_data_cannot_become_a_contact_is_refused_as_a_precondition() {
    let app = TestApp::spawn().await;
    let mut nameless = li_wei("li.wei@example.cn", "Wei Trading");
    nameless.name = Some(PersonName {
        given: String::new(),
        family: "Wei".into(),
    });
    let id = qualify(&app, nameless).await;
    let before = app.stored().await.len();
    let status = app
        .leads()
        .convert_lead(app.request(convert(&id, "", "")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let (reason, metadata) = error_info(&status);
    assert_eq!(reason, "RECORD_DATA_INVALID");
    assert_eq!(metadata["record"], "lead");
    assert_eq!(metadata["fields"], "lead.name.given");
    let failure = status.get_details_precondition_failure().unwrap();
    assert_eq!(failure.violations[0].subject, "lead.name.given");
    assert_eq!(app.stored().await.len(), before, "nothing stored");

    let mut request = convert(&uuid::Uuid::now_v7().to_string(), "", "");
    request.opportunity = Some(ConvertedOpportunity {
        name: "x".repeat(201),
        pipeline_id: uuid::Uuid::now_v7().to_string(),
        stage: "qualification".into(),
        amount: Some(Money {
            amount_minor: 100,
            currency: "EUR".into(),
        }),
        close_date: "2026-12-31".into(),
        owner: String::new(),
    });
    let status = app
        .leads()
        .convert_lead(app.request(request))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["opportunity.name"]);
    app.stop().await;
}
