//! `crm.v1.Accounts` through a real client.
use crm_proto::v1::{
    AccountKind, ArchiveAccountRequest, CreateAccountRequest, Domains, MarkAccountChurnedRequest,
    Reason, RestoreAccountRequest, UpdateAccountDetailsRequest, UpdateContactDetailsRequest,
};
use tonic::Code;

use crate::support::{TestApp, bad_fields, error_info};

fn acme(tax_id: &str) -> CreateAccountRequest {
    CreateAccountRequest {
        kind: AccountKind::Company.into(),
        name: "Acme Ltd".into(),
        domains: vec!["acme.example".into()],
        industry: "Manufacturing".into(),
        tax_id: tax_id.into(),
        segment: "enterprise".into(),
        ..CreateAccountRequest::default()
    }
}

#[tokio::test]
async fn accounts_are_created_updated_archived_and_restored() {
    let app = TestApp::spawn().await;
    let created = app
        .accounts()
        .create_account(app.request(acme("91310000MA1FL0000X")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.stream_version, 1);
    let update = UpdateAccountDetailsRequest {
        account_id: created.stream_id.clone(),
        domains: Some(Domains {
            items: vec!["acme.example".into(), "acme-group.example".into()],
        }),
        name: Some("Acme Ltd".into()),
        ..UpdateAccountDetailsRequest::default()
    };
    let updated = app
        .accounts()
        .update_account_details(app.request(update))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.stream_version, 2);
    let stored = app.stored().await;
    assert_eq!(
        stored[1].1["changes"]["domains"]["new"],
        serde_json::json!(["acme.example", "acme-group.example"])
    );
    assert!(
        stored[1].1["changes"].get("name").is_none(),
        "unchanged fields are not recorded"
    );

    let reason = Some(Reason {
        code: "duplicate".into(),
        text: "merged by hand".into(),
    });
    app.accounts()
        .archive_account(app.request(ArchiveAccountRequest {
            options: None,
            account_id: created.stream_id.clone(),
            reason: reason.clone(),
        }))
        .await
        .unwrap();
    let restored = app
        .accounts()
        .restore_account(app.request(RestoreAccountRequest {
            options: None,
            account_id: created.stream_id.clone(),
            reason,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(restored.stream_version, 4);
    app.stop().await;
}

#[tokio::test]
async fn tax_ids_are_unique_and_rules_answer_failed_precondition() {
    let app = TestApp::spawn().await;
    let created = app
        .accounts()
        .create_account(app.request(acme("91310000MA1FL0000X")))
        .await
        .unwrap()
        .into_inner();
    let status = app
        .accounts()
        .create_account(app.request(acme("91310000ma1fl0000x")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(error_info(&status).1["holder"], created.stream_id);
    // Accounts without a tax id do not collide.
    app.accounts()
        .create_account(app.request(acme("")))
        .await
        .unwrap();
    app.accounts()
        .create_account(app.request(acme("")))
        .await
        .unwrap();

    let churn = MarkAccountChurnedRequest {
        options: None,
        account_id: created.stream_id.clone(),
        reason: "cancelled".into(),
    };
    let status = app
        .accounts()
        .mark_account_churned(app.request(churn))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let (reason, metadata) = error_info(&status);
    assert_eq!(
        (
            reason.as_str(),
            metadata["from"].as_str(),
            metadata["to"].as_str()
        ),
        ("INVALID_TRANSITION", "prospect", "churned")
    );
    app.stop().await;
}

#[tokio::test]
async fn bad_account_inputs_are_invalid_argument() {
    let app = TestApp::spawn().await;
    let mut bad = acme("12 34");
    bad.kind = AccountKind::Unspecified.into();
    assert_eq!(
        bad_fields(
            &app.accounts()
                .create_account(app.request(bad))
                .await
                .unwrap_err()
        ),
        ["kind"]
    );
    let mut bad = acme("12 34");
    bad.name = String::new();
    bad.domains = vec!["nope".into()];
    bad.parent_id = "not-a-uuid".into();
    assert_eq!(
        bad_fields(
            &app.accounts()
                .create_account(app.request(bad))
                .await
                .unwrap_err()
        ),
        ["parent_id"]
    );
    let mut bad = acme("12 34");
    bad.name = String::new();
    bad.domains = vec!["nope".into()];
    assert_eq!(
        bad_fields(
            &app.accounts()
                .create_account(app.request(bad))
                .await
                .unwrap_err()
        ),
        ["name", "domains[0]", "tax_id"]
    );
    let mut own_parent = acme("");
    let id = uuid::Uuid::now_v7().to_string();
    own_parent.account_id = id.clone();
    own_parent.parent_id = id;
    assert_eq!(
        bad_fields(
            &app.accounts()
                .create_account(app.request(own_parent))
                .await
                .unwrap_err()
        ),
        ["parent_id"]
    );
    assert!(app.stored().await.is_empty());

    // An account id used as a contact id is not a contact.
    let account = app
        .accounts()
        .create_account(app.request(acme("")))
        .await
        .unwrap()
        .into_inner();
    let as_contact = UpdateContactDetailsRequest {
        contact_id: account.stream_id,
        title: Some("x".into()),
        ..Default::default()
    };
    assert_eq!(
        app.contacts()
            .update_contact_details(app.request(as_contact))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    app.stop().await;
}

#[tokio::test]
async fn duplicate_accounts_merge_and_the_tax_id_moves() {
    use crm_proto::v1::MergeAccountsRequest;
    let app = TestApp::spawn().await;
    let mut plain = acme("");
    plain.domains = vec!["acme.example".into()];
    let survivor = app
        .accounts()
        .create_account(app.request(plain))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let mut with_tax = acme("91310000MA1FL0000X");
    with_tax.domains = vec!["acme-group.example".into()];
    let loser = app
        .accounts()
        .create_account(app.request(with_tax))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let merge = MergeAccountsRequest {
        survivor_id: survivor.clone(),
        loser_ids: vec![loser.clone()],
        ..Default::default()
    };
    let merged = app
        .accounts()
        .merge_accounts(app.manager(merge.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(merged.changes_json.contains("acme-group.example"));
    // The tax id now belongs to the survivor.
    let status = app
        .accounts()
        .create_account(app.request(acme("91310000MA1FL0000X")))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).1["holder"], survivor);
    let status = app
        .accounts()
        .merge_accounts(app.manager(merge))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).1["survivor"], survivor);
    // Nothing may point at the merged-away account: not a child account,
    // not a contact's link.
    let mut child = acme("");
    child.parent_id = loser.clone();
    let status = app
        .accounts()
        .create_account(app.request(child))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).0.as_str()),
        (tonic::Code::FailedPrecondition, "INVALID_REFERENCE")
    );
    let contact = app
        .contacts()
        .create_contact(app.request(crm_proto::v1::CreateContactRequest {
            name: Some(crm_proto::v1::PersonName {
                given: "Li".into(),
                family: "Wei".into(),
            }),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let status = app
        .contacts()
        .link_contact_to_account(app.request(crm_proto::v1::LinkContactToAccountRequest {
            contact_id: contact,
            account_id: loser,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).0.as_str()),
        (tonic::Code::FailedPrecondition, "INVALID_REFERENCE")
    );
    app.stop().await;
}

#[tokio::test]
async fn parents_must_exist_and_the_hierarchy_never_loops() {
    let app = TestApp::spawn().await;
    let create = |parent: &str| {
        let mut request = acme("");
        request.parent_id = parent.into();
        app.request(request)
    };
    let top = app
        .accounts()
        .create_account(create(""))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let middle = app
        .accounts()
        .create_account(create(&top))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let bottom = app
        .accounts()
        .create_account(create(&middle))
        .await
        .unwrap()
        .into_inner()
        .stream_id;

    // A parent that does not exist.
    let status = app
        .accounts()
        .create_account(create(&uuid::Uuid::now_v7().to_string()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(error_info(&status).0, "INVALID_REFERENCE");

    // The top under its own grandchild would be a loop; nothing is stored.
    let before = app.stored().await.len();
    let status = app
        .accounts()
        .update_account_details(app.request(UpdateAccountDetailsRequest {
            account_id: top.clone(),
            parent_id: Some(bottom.clone()),
            ..UpdateAccountDetailsRequest::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(error_info(&status).0, "INVALID_REFERENCE");
    assert_eq!(app.stored().await.len(), before);

    // Moving the bottom directly under the top is fine.
    app.accounts()
        .update_account_details(app.request(UpdateAccountDetailsRequest {
            account_id: bottom.clone(),
            parent_id: Some(top.clone()),
            ..UpdateAccountDetailsRequest::default()
        }))
        .await
        .unwrap();
    app.stop().await;
}

/// Long streams load from a snapshot plus the newer events; a snapshot of an
/// older state format is ignored. (Contacts' and leads' snapshots are sealed:
/// see `a_subjects_snapshot_is_sealed_and_erasure_makes_it_unreadable`.)
#[tokio::test]
async fn long_streams_load_from_snapshots_and_ignore_outdated_ones() {
    let app = TestApp::spawn().await;
    let id = app
        .accounts()
        .create_account(app.request(acme("")))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let industry = |industry: &str, expected: Option<u64>| {
        app.request(UpdateAccountDetailsRequest {
            options: expected.map(|v| crm_proto::v1::CommandOptions {
                expected_version: Some(v),
                ..Default::default()
            }),
            account_id: id.clone(),
            industry: Some(industry.into()),
            ..UpdateAccountDetailsRequest::default()
        })
    };
    for n in 0..120 {
        app.accounts()
            .update_account_details(industry(&format!("Industry {n}"), None))
            .await
            .unwrap();
    }
    let client = app.db.client().await;
    let (snapshot_version, _) = crate::support::snapshot_of(&app, &id).await;
    assert_eq!(snapshot_version, 100);
    // Loading from the snapshot sees the current state: a repeat is a no-op.
    let same = app
        .accounts()
        .update_account_details(industry("Industry 119", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((same.stream_version, same.unchanged), (121, true));
    // A snapshot of an older state format is ignored, not trusted.
    client
        .execute(
            "UPDATE snapshots SET schema_version = 99, state = '{\"garbage\": true}'",
            &[],
        )
        .await
        .unwrap();
    let changed = app
        .accounts()
        .update_account_details(industry("Retail", Some(121)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(changed.stream_version, 122);
    let same = app
        .accounts()
        .update_account_details(industry("Retail", None))
        .await
        .unwrap()
        .into_inner();
    assert!(same.unchanged);
    app.stop().await;
}

#[tokio::test]
async fn person_accounts_keep_their_name_encrypted_and_can_be_erased() {
    use crm_proto::v1::EraseAccountPersonalDataRequest;
    let app = TestApp::spawn().await;
    let person = app
        .accounts()
        .create_account(app.request(CreateAccountRequest {
            kind: AccountKind::Person.into(),
            name: "Wang Fang".into(),
            ..CreateAccountRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let company = app
        .accounts()
        .create_account(app.request(acme("")))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let stored = app.stored().await;
    assert!(
        !stored[0].1.to_string().contains("Wang Fang"),
        "{:?}",
        stored[0].1
    );
    assert_eq!(stored[1].1["name"], "Acme Ltd", "company names stay clear");
    // The person's name decrypts for the state: renaming to it is a no-op.
    let same = app
        .accounts()
        .update_account_details(app.request(UpdateAccountDetailsRequest {
            account_id: person.clone(),
            name: Some("Wang Fang".into()),
            ..UpdateAccountDetailsRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(same.unchanged);
    let erase = |id: &str| {
        let mut request = app.request(EraseAccountPersonalDataRequest {
            account_id: id.into(),
            request: "DSR-77".into(),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("x-roles", "admin".parse().unwrap());
        request
    };
    let status = app
        .accounts()
        .erase_account_personal_data(erase(&company))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(error_info(&status).0, "INVALID_TRANSITION");
    app.accounts()
        .erase_account_personal_data(erase(&person))
        .await
        .unwrap();
    let status = app
        .accounts()
        .update_account_details(app.request(UpdateAccountDetailsRequest {
            account_id: person,
            industry: Some("Retail".into()),
            ..UpdateAccountDetailsRequest::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(error_info(&status).0, "RECORD_ERASED");
    app.stop().await;
}

/// Two accounts made each other's parent at once: each read the other
/// without a parent, but only one lands; the other, decided again once the
/// first is stored, would close a loop and is refused.
#[tokio::test]
async fn two_accounts_made_each_others_parent_at_once_form_no_loop() {
    let app = TestApp::spawn().await;
    let a = crate::support::company(&app, "A").await;
    let b = crate::support::company(&app, "B").await;
    let reparent = |id: &str, parent: &str| {
        let request = app.request(UpdateAccountDetailsRequest {
            account_id: id.into(),
            parent_id: Some(parent.into()),
            ..UpdateAccountDetailsRequest::default()
        });
        let mut accounts = app.accounts();
        tokio::spawn(async move { accounts.update_account_details(request).await })
    };
    let hold = crate::support::LogHold::take(&app).await;
    let first = reparent(&a, &b);
    hold.until_an_append_waits(&app).await;
    let second = reparent(&b, &a);
    hold.release().await;
    first.await.unwrap().unwrap();
    let status = second.await.unwrap().unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).0.as_str()),
        (Code::FailedPrecondition, "INVALID_REFERENCE")
    );
    app.stop().await;
}
