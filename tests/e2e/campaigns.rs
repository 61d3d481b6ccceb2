//! `crm.v1.Campaigns`: consent-checked members, costs, responses.
use crm_proto::v1::{
    AddCampaignMemberRequest, ChangeCampaignStatusRequest, ChangeContactConsentRequest,
    CreateContactRequest, Money, PersonName, PlanCampaignRequest, RecordCampaignCostRequest,
    RecordCampaignResponseRequest,
};
use tonic::Code;

use crate::support::{TestApp, bad_fields, error_info};

fn plan(channel: &str) -> PlanCampaignRequest {
    PlanCampaignRequest {
        name: "Spring newsletter".into(),
        r#type: "newsletter".into(),
        channel: channel.into(),
        starts_on: "2026-03-01".into(),
        ends_on: "2026-03-31".into(),
        budget: Some(Money {
            amount_minor: 2_000_000,
            currency: "EUR".into(),
        }),
        ..Default::default()
    }
}

fn member(campaign: &str, contact: &str) -> AddCampaignMemberRequest {
    AddCampaignMemberRequest {
        options: None,
        campaign_id: campaign.into(),
        contact_id: contact.into(),
        lead_id: String::new(),
    }
}

/// A campaign planned on `channel`; its id.
async fn planned(app: &TestApp, channel: &str) -> String {
    app.campaigns()
        .plan_campaign(app.request(plan(channel)))
        .await
        .unwrap()
        .into_inner()
        .stream_id
}

#[tokio::test]
async fn email_campaign_members_need_marketing_email_consent() {
    let app = TestApp::spawn().await;
    let campaign = planned(&app, "email").await;
    let ada = crate::support::person(&app, "Ada", "").await;
    let status = app
        .campaigns()
        .add_campaign_member(app.request(member(&campaign, &ada)))
        .await
        .unwrap_err();
    let (reason, metadata) = error_info(&status);
    assert_eq!(
        (status.code(), reason.as_str(), metadata["purpose"].as_str()),
        (
            Code::FailedPrecondition,
            "CONSENT_MISSING",
            "marketing_email"
        )
    );

    let consent = ChangeContactConsentRequest {
        options: None,
        contact_id: ada.clone(),
        purpose: "marketing_email".into(),
        granted: true,
        source: "web_form".into(),
        basis: "consent".into(),
    };
    app.contacts()
        .change_contact_consent(app.request(consent))
        .await
        .unwrap();
    let added = app
        .campaigns()
        .add_campaign_member(app.request(member(&campaign, &ada)))
        .await
        .unwrap()
        .into_inner();
    let again = app
        .campaigns()
        .add_campaign_member(app.request(member(&campaign, &ada)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.stream_version, again.unchanged),
        (added.stream_version, true)
    );

    let respond = RecordCampaignResponseRequest {
        options: None,
        campaign_id: campaign.clone(),
        contact_id: ada,
        response: "clicked".into(),
        lead_id: String::new(),
    };
    app.campaigns()
        .record_campaign_response(app.request(respond))
        .await
        .unwrap();
    let cost = |minor: i64| RecordCampaignCostRequest {
        options: None,
        campaign_id: campaign.clone(),
        amount: Some(Money {
            amount_minor: minor,
            currency: "EUR".into(),
        }),
        spent_on: "2026-03-02".into(),
        source: "invoice".into(),
    };
    app.campaigns()
        .record_campaign_cost(app.request(cost(20_000)))
        .await
        .unwrap();
    app.campaigns()
        .record_campaign_cost(app.request(cost(-5_000)))
        .await
        .unwrap();
    let activate = ChangeCampaignStatusRequest {
        options: None,
        campaign_id: campaign,
        status: "active".into(),
    };
    assert_eq!(
        app.campaigns()
            .change_campaign_status(app.request(activate))
            .await
            .unwrap()
            .into_inner()
            .stream_version,
        6
    );
    app.stop().await;
}

#[tokio::test]
async fn bad_campaign_inputs_are_refused() {
    let app = TestApp::spawn().await;
    let mut bad = plan("pigeon");
    bad.ends_on = "2026-02-01".into();
    assert_eq!(
        bad_fields(
            &app.campaigns()
                .plan_campaign(app.request(bad))
                .await
                .unwrap_err()
        ),
        ["channel", "ends_on"]
    );
    let mut bad = plan("email");
    bad.starts_on = "March".into();
    assert_eq!(
        bad_fields(
            &app.campaigns()
                .plan_campaign(app.request(bad))
                .await
                .unwrap_err()
        ),
        ["starts_on"]
    );
    let campaign = planned(&app, "event").await;
    // A parent must be a campaign already planned: so parents never form a
    // cycle (A under B, then B under A).
    let child = |parent: &str| PlanCampaignRequest {
        parent_id: parent.into(),
        ..plan("email")
    };
    let status = app
        .campaigns()
        .plan_campaign(app.request(child(&uuid::Uuid::now_v7().to_string())))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(error_info(&status).1["field"], "parent_id");
    app.campaigns()
        .plan_campaign(app.request(child(&campaign)))
        .await
        .unwrap();
    let unknown = uuid::Uuid::now_v7().to_string();
    let status = app
        .campaigns()
        .add_campaign_member(app.request(member(&campaign, &unknown)))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).0, "INVALID_REFERENCE");
    // An archived contact is no member either.
    let archived = app
        .contacts()
        .create_contact(app.request(CreateContactRequest {
            name: Some(PersonName {
                given: "Ada".into(),
                family: "Lovelace".into(),
            }),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    app.contacts()
        .archive_contact(app.request(crm_proto::v1::ArchiveContactRequest {
            options: None,
            contact_id: archived.clone(),
            reason: Some(crm_proto::v1::Reason {
                code: "left_company".into(),
                text: String::new(),
            }),
        }))
        .await
        .unwrap();
    let status = app
        .campaigns()
        .add_campaign_member(app.request(member(&campaign, &archived)))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).0.as_str()),
        (Code::FailedPrecondition, "INVALID_REFERENCE")
    );
    let other_currency = RecordCampaignCostRequest {
        options: None,
        campaign_id: campaign.clone(),
        amount: Some(Money {
            amount_minor: 1,
            currency: "USD".into(),
        }),
        spent_on: "2026-03-02".into(),
        source: "invoice".into(),
    };
    assert_eq!(
        bad_fields(
            &app.campaigns()
                .record_campaign_cost(app.request(other_currency))
                .await
                .unwrap_err()
        ),
        ["amount.currency"]
    );
    // A cost, or a total of costs, beyond 10^15 minor units is refused (not
    // wrapped), and a date outside the years 1900 to 2200 is refused by name.
    let huge = |minor: i64, spent_on: &str| RecordCampaignCostRequest {
        options: None,
        campaign_id: campaign.clone(),
        amount: Some(Money {
            amount_minor: minor,
            currency: "EUR".into(),
        }),
        spent_on: spent_on.into(),
        source: "invoice".into(),
    };
    app.campaigns()
        .record_campaign_cost(app.request(huge(900_000_000_000_000, "2026-03-02")))
        .await
        .unwrap();
    for minor in [i64::MAX, 200_000_000_000_000] {
        assert_eq!(
            bad_fields(
                &app.campaigns()
                    .record_campaign_cost(app.request(huge(minor, "2026-03-02")))
                    .await
                    .unwrap_err()
            ),
            ["amount.amount_minor"]
        );
    }
    assert_eq!(
        bad_fields(
            &app.campaigns()
                .record_campaign_cost(app.request(huge(-1, "0001-03-02")))
                .await
                .unwrap_err()
        ),
        ["spent_on"]
    );
    let complete = ChangeCampaignStatusRequest {
        options: None,
        campaign_id: campaign,
        status: "completed".into(),
    };
    assert_eq!(
        error_info(
            &app.campaigns()
                .change_campaign_status(app.request(complete))
                .await
                .unwrap_err()
        )
        .0,
        "INVALID_TRANSITION"
    );
    // The plan, its child, the one cost that fit and the archived contact
    // (created, archived): every refusal stored nothing.
    assert_eq!(app.stored().await.len(), 5);
    app.stop().await;
}

#[tokio::test]
async fn leads_join_campaigns_and_respond_and_members_are_named_once() {
    let app = TestApp::spawn().await;
    let campaign = planned(&app, "email").await;
    let lead = app
        .leads()
        .capture_lead(app.request(crate::leads::li_wei("li@example.com", "Wei Trading")))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let as_lead = |lead_id: &str| AddCampaignMemberRequest {
        campaign_id: campaign.clone(),
        lead_id: lead_id.into(),
        ..AddCampaignMemberRequest::default()
    };
    // An email campaign takes a lead only with its consent to marketing
    // email (DOMAIN.md §2.8), as it takes a contact.
    let status = app
        .campaigns()
        .add_campaign_member(app.request(as_lead(&lead)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(error_info(&status).0, "CONSENT_MISSING");
    app.leads()
        .update_lead_details(app.request(crm_proto::v1::UpdateLeadDetailsRequest {
            lead_id: lead.clone(),
            consent: vec![crate::leads::email_consent()],
            ..Default::default()
        }))
        .await
        .unwrap();
    app.campaigns()
        .add_campaign_member(app.request(as_lead(&lead)))
        .await
        .unwrap();
    app.campaigns()
        .record_campaign_response(app.request(RecordCampaignResponseRequest {
            campaign_id: campaign.clone(),
            lead_id: lead.clone(),
            response: "registered".into(),
            ..RecordCampaignResponseRequest::default()
        }))
        .await
        .unwrap();
    let stored = app.stored().await;
    let (_, responded, _) = stored.last().unwrap();
    assert_eq!(responded["member"]["kind"], "lead");
    assert_eq!(responded["member"]["id"], lead.as_str());

    // The lead's id is no contact member.
    let status = app
        .campaigns()
        .record_campaign_response(app.request(RecordCampaignResponseRequest {
            campaign_id: campaign.clone(),
            contact_id: lead.clone(),
            response: "clicked".into(),
            ..RecordCampaignResponseRequest::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).0, "INVALID_REFERENCE");
    // Unknown lead; both ids; neither.
    let status = app
        .campaigns()
        .add_campaign_member(app.request(as_lead(&uuid::Uuid::now_v7().to_string())))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).0.as_str()),
        (Code::FailedPrecondition, "INVALID_REFERENCE")
    );
    let mut both = as_lead(&lead);
    both.contact_id = lead.clone();
    let status = app
        .campaigns()
        .add_campaign_member(app.request(both))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), vec!["lead_id"]);
    let status = app
        .campaigns()
        .add_campaign_member(app.request(as_lead("")))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), vec!["contact_id"]);
    app.stop().await;
}

/// A converted lead lives on as its contact: the lead's consent went with
/// the person, and the contact's later do-not-contact decides whether a
/// campaign may still take the lead.
#[tokio::test]
async fn a_converted_lead_joins_campaigns_on_its_contacts_consent() {
    let app = TestApp::spawn().await;
    let campaign = planned(&app, "email").await;
    let mut capture = crate::leads::li_wei("li@example.com", "Wei Trading");
    capture.consent = vec![crate::leads::email_consent()];
    let lead = crate::leads::qualify(&app, capture).await;
    let converted = app
        .leads()
        .convert_lead(app.request(crm_proto::v1::ConvertLeadRequest {
            lead_id: lead.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let stored = app.stored().await;
    let consent = stored
        .iter()
        .find(|(t, _, _)| t == "ContactConsentChanged")
        .expect("the lead's consent went to the contact");
    assert_eq!(
        (
            consent.1["purpose"].as_str(),
            consent.1["granted"].as_bool()
        ),
        (Some("marketing_email"), Some(true))
    );
    app.contacts()
        .update_contact_details(app.request(crm_proto::v1::UpdateContactDetailsRequest {
            contact_id: converted.contact_id.clone(),
            preferences: Some(crm_proto::v1::ContactPreferences {
                do_not_contact: true,
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .unwrap();
    let status = app
        .campaigns()
        .add_campaign_member(app.request(AddCampaignMemberRequest {
            campaign_id: campaign,
            lead_id: lead,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(error_info(&status).0, "CONSENT_MISSING");
    app.stop().await;
}

/// Consent withdrawn while a member is being added (read granted, then
/// withdrawn before the member's append) keeps the person out: the pin on
/// the contact makes the command read the consent again.
#[tokio::test]
async fn consent_withdrawn_while_a_member_is_added_keeps_the_person_out() {
    let app = TestApp::spawn().await;
    let campaign = planned(&app, "email").await;
    let ada = crate::support::person(&app, "Ada", "").await;
    let consent = |granted: bool| ChangeContactConsentRequest {
        options: None,
        contact_id: ada.clone(),
        purpose: "marketing_email".into(),
        granted,
        source: "web_form".into(),
        basis: "consent".into(),
    };
    app.contacts()
        .change_contact_consent(app.request(consent(true)))
        .await
        .unwrap();
    let hold = crate::support::LogHold::take(&app).await;
    let (mut contacts, withdraw) = (app.contacts(), app.request(consent(false)));
    let withdraw = tokio::spawn(async move { contacts.change_contact_consent(withdraw).await });
    hold.until_an_append_waits(&app).await;
    let (mut campaigns, add) = (app.campaigns(), app.request(member(&campaign, &ada)));
    let add = tokio::spawn(async move { campaigns.add_campaign_member(add).await });
    hold.release().await;
    withdraw.await.unwrap().unwrap();
    let status = add.await.unwrap().unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).0.as_str()),
        (Code::FailedPrecondition, "CONSENT_MISSING")
    );
    app.stop().await;
}
