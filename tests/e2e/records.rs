//! `crm.v1.Records`: owner, tags and shares on any main record.
use crm_proto::v1::{
    AssignOwnerRequest, CaptureLeadRequest, ChangeTagsRequest, CreateContactRequest, EmailAddress,
    LeadSource, PersonName, RecordRef, RevokeShareRequest, ShareRecordRequest,
};
use tonic::Code;

use crate::support::{TestApp, bad_fields};

fn record(kind: &str, id: &str) -> Option<RecordRef> {
    Some(RecordRef {
        r#type: kind.into(),
        id: id.into(),
    })
}

#[tokio::test]
async fn owners_tags_and_shares_work_on_every_record_type() {
    let app = TestApp::spawn().await;
    let contact = CreateContactRequest {
        name: Some(PersonName {
            given: "Ada".into(),
            family: String::new(),
        }),
        ..Default::default()
    };
    let contact = app
        .contacts()
        .create_contact(app.request(contact))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let lead = CaptureLeadRequest {
        name: Some(PersonName {
            given: "Li".into(),
            family: String::new(),
        }),
        emails: vec![EmailAddress {
            address: "li@example.cn".into(),
            primary: true,
        }],
        source: Some(LeadSource {
            channel: "web".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let lead = app
        .leads()
        .capture_lead(app.request(lead))
        .await
        .unwrap()
        .into_inner()
        .stream_id;

    for (kind, id) in [("contact", &contact), ("lead", &lead)] {
        let assign = AssignOwnerRequest {
            options: None,
            record: record(kind, id),
            owner: "user:rep".into(),
            team: "team:emea".into(),
            method: String::new(),
        };
        assert_eq!(
            app.records()
                .assign_owner(app.request(assign.clone()))
                .await
                .unwrap()
                .into_inner()
                .stream_version,
            2
        );
        assert!(
            app.records()
                .assign_owner(app.request(assign))
                .await
                .unwrap()
                .into_inner()
                .unchanged
        );
        let tags = ChangeTagsRequest {
            options: None,
            record: record(kind, id),
            add: vec!["vip".into()],
            remove: vec![],
        };
        app.records().change_tags(app.request(tags)).await.unwrap();
        let share = ShareRecordRequest {
            options: None,
            record: record(kind, id),
            grantee: "user:mgr".into(),
            level: "edit".into(),
            expires_at: String::new(),
        };
        app.records()
            .share_record(app.request(share))
            .await
            .unwrap();
        let revoke = RevokeShareRequest {
            options: None,
            record: record(kind, id),
            grantee: "user:mgr".into(),
        };
        assert_eq!(
            app.records()
                .revoke_share(app.request(revoke))
                .await
                .unwrap()
                .into_inner()
                .stream_version,
            5
        );
    }
    let stored = app.stored().await;
    let owner = stored.iter().find(|(t, _, _)| t == "OwnerChanged").unwrap();
    assert_eq!(
        (owner.1["new"].as_str(), owner.1["team"].as_str()),
        (Some("user:rep"), Some("team:emea"))
    );

    // Bad inputs.
    let wrong_type = AssignOwnerRequest {
        options: None,
        record: record("invoice", &contact),
        owner: "x".into(),
        team: String::new(),
        method: String::new(),
    };
    assert_eq!(
        bad_fields(
            &app.records()
                .assign_owner(app.request(wrong_type))
                .await
                .unwrap_err()
        ),
        ["record.type"]
    );
    let mismatched = AssignOwnerRequest {
        options: None,
        record: record("lead", &contact),
        owner: "x".into(),
        team: String::new(),
        method: String::new(),
    };
    assert_eq!(
        app.records()
            .assign_owner(app.request(mismatched))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let bad_tag = ChangeTagsRequest {
        options: None,
        record: record("contact", &contact),
        add: vec!["Not A Tag".into()],
        remove: vec![],
    };
    assert_eq!(
        bad_fields(
            &app.records()
                .change_tags(app.request(bad_tag))
                .await
                .unwrap_err()
        ),
        ["add[0]"]
    );
    let past = ShareRecordRequest {
        options: None,
        record: record("contact", &contact),
        grantee: "user:x".into(),
        level: "admin".into(),
        expires_at: "2000-01-01T00:00:00Z".into(),
    };
    assert_eq!(
        bad_fields(
            &app.records()
                .share_record(app.request(past))
                .await
                .unwrap_err()
        ),
        ["level", "expires_at"]
    );
    let no_record = ChangeTagsRequest {
        options: None,
        record: None,
        add: vec![],
        remove: vec![],
    };
    assert_eq!(
        bad_fields(
            &app.records()
                .change_tags(app.request(no_record))
                .await
                .unwrap_err()
        ),
        ["record"]
    );
    app.stop().await;
}

#[tokio::test]
async fn any_main_record_can_be_archived_and_restored() {
    use crm_proto::v1::{
        ArchiveRecordRequest, Reason, RestoreRecordRequest, UpdateLeadDetailsRequest,
    };
    let app = TestApp::spawn().await;
    let lead = CaptureLeadRequest {
        name: Some(PersonName {
            given: "Li".into(),
            family: String::new(),
        }),
        company: "Wei Trading".into(),
        source: Some(LeadSource {
            channel: "web".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let lead = app
        .leads()
        .capture_lead(app.request(lead))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let reason = || {
        Some(Reason {
            code: "duplicate".into(),
            text: String::new(),
        })
    };
    let archive = ArchiveRecordRequest {
        options: None,
        record: record("lead", &lead),
        reason: reason(),
    };
    app.records()
        .archive_record(app.request(archive.clone()))
        .await
        .unwrap();
    let update = UpdateLeadDetailsRequest {
        lead_id: lead.clone(),
        company: Some("Other".into()),
        ..Default::default()
    };
    let status = app
        .leads()
        .update_lead_details(app.request(update.clone()))
        .await
        .unwrap_err();
    assert_eq!(crate::support::error_info(&status).0, "RECORD_ARCHIVED");
    assert_eq!(
        crate::support::error_info(
            &app.records()
                .archive_record(app.request(archive))
                .await
                .unwrap_err()
        )
        .0,
        "RECORD_ARCHIVED"
    );
    let restore = RestoreRecordRequest {
        options: None,
        record: record("lead", &lead),
        reason: reason(),
    };
    app.records()
        .restore_record(app.request(restore))
        .await
        .unwrap();
    app.leads()
        .update_lead_details(app.request(update))
        .await
        .unwrap();

    // Contacts keep their own archive commands; the shared ones reach them too.
    let contact = CreateContactRequest {
        name: Some(PersonName {
            given: "Ada".into(),
            family: String::new(),
        }),
        ..Default::default()
    };
    let contact = app
        .contacts()
        .create_contact(app.request(contact))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let archive = ArchiveRecordRequest {
        options: None,
        record: record("contact", &contact),
        reason: reason(),
    };
    app.records()
        .archive_record(app.request(archive))
        .await
        .unwrap();
    let tags = ChangeTagsRequest {
        options: None,
        record: record("contact", &contact),
        add: vec!["vip".into()],
        remove: vec![],
    };
    assert_eq!(
        crate::support::error_info(
            &app.records()
                .change_tags(app.request(tags))
                .await
                .unwrap_err()
        )
        .0,
        "RECORD_ARCHIVED"
    );
    let missing_reason = ArchiveRecordRequest {
        options: None,
        record: record("lead", &lead),
        reason: None,
    };
    assert_eq!(
        bad_fields(
            &app.records()
                .archive_record(app.request(missing_reason))
                .await
                .unwrap_err()
        ),
        ["reason.code"]
    );
    app.stop().await;
}
