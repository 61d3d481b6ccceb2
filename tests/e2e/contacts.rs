//! `crm.v1.Contacts` through a real client: happy paths and bad inputs.
use crm_proto::v1::{
    ArchiveContactRequest, ChangeContactConsentRequest, CommandOptions, ContactPreferences,
    CreateContactRequest, EmailAddress, EmailAddresses, PersonName, PhoneNumber, Reason,
    RestoreContactRequest, UpdateContactDetailsRequest,
};
use tonic::Code;

use crate::support::{TestApp, as_caller, bad_fields, error_info, first_column};

fn ada(email: &str) -> CreateContactRequest {
    CreateContactRequest {
        options: None,
        contact_id: String::new(),
        name: Some(PersonName {
            given: "Ada".into(),
            family: "Lovelace".into(),
        }),
        emails: vec![EmailAddress {
            address: email.into(),
            primary: true,
        }],
        phones: vec![PhoneNumber {
            number: "+442071838750".into(),
            kind: "work".into(),
        }],
        title: "Analyst".into(),
        preferences: Some(ContactPreferences {
            channel: "email".into(),
            language: "en-GB".into(),
            time_zone: "Europe/London".into(),
            do_not_contact: false,
        }),
    }
}

/// Sends UpdateContactDetails as the test's caller.
async fn update_details(
    app: &TestApp,
    request: UpdateContactDetailsRequest,
) -> Result<crm_proto::v1::CommandReply, tonic::Status> {
    app.contacts()
        .update_contact_details(app.request(request))
        .await
        .map(tonic::Response::into_inner)
}

/// Creates [`ada`] with `ada@example.com`; her id.
async fn create_ada(app: &TestApp) -> String {
    app.contacts()
        .create_contact(app.request(ada("ada@example.com")))
        .await
        .unwrap()
        .into_inner()
        .stream_id
}

fn with_key(mut request: CreateContactRequest, key: &str) -> CreateContactRequest {
    request.options = Some(CommandOptions {
        idempotency_key: key.into(),
        ..CommandOptions::default()
    });
    request
}

fn update_title(id: &str, title: &str, expected: Option<u64>) -> UpdateContactDetailsRequest {
    UpdateContactDetailsRequest {
        options: Some(CommandOptions {
            expected_version: expected,
            ..CommandOptions::default()
        }),
        contact_id: id.into(),
        title: Some(title.into()),
        ..UpdateContactDetailsRequest::default()
    }
}

fn reason(code: &str) -> Option<Reason> {
    Some(Reason {
        code: code.into(),
        text: String::new(),
    })
}

#[tokio::test]
async fn create_contact_answers_version_and_position_and_stores_the_envelope() {
    let app = TestApp::spawn().await;
    let mut request = app.request(ada("ada@example.com"));
    request
        .metadata_mut()
        .insert("x-correlation-id", "corr-42".parse().unwrap());
    request.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    let reply = app
        .contacts()
        .create_contact(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (reply.stream_version, reply.global_position, reply.unchanged),
        (1, 1, false)
    );
    assert_eq!(
        uuid::Uuid::parse_str(&reply.stream_id)
            .unwrap()
            .get_version_num(),
        7
    );

    let stored = app.stored().await;
    assert_eq!(stored.len(), 1);
    let (event_type, payload, metadata) = &stored[0];
    assert_eq!(event_type, "ContactCreated");
    // Personal fields are stored encrypted under the contact's own key.
    let address = payload["emails"][0]["address"].as_str().unwrap();
    assert!(address.starts_with("enc:v1:"), "{address}");
    assert!(!payload.to_string().contains("ada@example.com"));
    assert_eq!(payload["emails"][0]["primary"], true, "flags stay clear");
    assert!(
        payload["phones"][0]["number"]
            .as_str()
            .unwrap()
            .starts_with("enc:v1:")
    );
    assert!(payload["occurred_at"].is_string());
    assert_eq!(metadata["actor"], "user:ada");
    assert_eq!(metadata["correlation_id"], "corr-42");
    assert_eq!(
        metadata["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );

    // The relay inside `crm all` publishes it to NATS, trace context included.
    let published = app
        .published(&format!("{}.>", app.nats.subject_prefix), 1)
        .await;
    let (subject, headers) = &published[0];
    assert_eq!(
        subject,
        &format!(
            "{}.{}.contact.{}.ContactCreated",
            app.nats.subject_prefix, app.tenant, reply.stream_id
        )
    );
    assert_eq!(headers.get("ce-globalposition").unwrap().as_str(), "1");
    assert_eq!(headers.get("ce-correlationid").unwrap().as_str(), "corr-42");
    assert_eq!(
        headers.get("ce-traceparent").unwrap().as_str(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_client_chosen_id_and_an_idempotency_key_make_retries_safe() {
    let app = TestApp::spawn().await;
    let id = uuid::Uuid::now_v7().to_string();
    let mut request = with_key(ada("ada@example.com"), "create-ada-1");
    request.contact_id = id.clone();
    let first = app
        .contacts()
        .create_contact(app.request(request.clone()))
        .await
        .unwrap()
        .into_inner();
    let again = app
        .contacts()
        .create_contact(app.request(request.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.stream_id, id);
    assert_eq!(
        (again.stream_id, again.stream_version, again.global_position),
        (id.clone(), 1, first.global_position)
    );
    assert!(again.unchanged, "a replay is flagged");
    assert_eq!(app.stored().await.len(), 1);

    // A retry of a create that let the server choose the id answers the
    // first id, not a new one.
    let server_made = with_key(ada("grace@example.com"), "create-grace");
    let first_grace = app
        .contacts()
        .create_contact(app.request(server_made.clone()))
        .await
        .unwrap()
        .into_inner();
    let again_grace = app
        .contacts()
        .create_contact(app.request(server_made))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again_grace.stream_id, first_grace.stream_id);
    assert_eq!(app.stored().await.len(), 2);

    // The same key for another request is refused, and stores nothing.
    let mut other = request.clone();
    other.title = "CTO".into();
    let status = app
        .contacts()
        .create_contact(app.request(other))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(error_info(&status).0, "IDEMPOTENCY_KEY_REUSED");

    // Without a key, creating the same id again is ALREADY_EXISTS.
    let mut plain = request;
    plain.options = None;
    let status = app
        .contacts()
        .create_contact(app.request(plain))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(app.stored().await.len(), 2);

    // An id that names a record of another type is taken too.
    let account = app
        .accounts()
        .create_account(app.request(crm_proto::v1::CreateAccountRequest {
            kind: crm_proto::v1::AccountKind::Company.into(),
            name: "Acme".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let mut taken = ada("taken@example.com");
    taken.contact_id = account;
    let status = app
        .contacts()
        .create_contact(app.request(taken))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).0.as_str()),
        (Code::AlreadyExists, "ALREADY_EXISTS")
    );
    assert_eq!(app.stored().await.len(), 3);
    app.stop().await;
}

#[tokio::test]
async fn a_request_that_changes_nothing_is_kept_under_its_idempotency_key() {
    let app = TestApp::spawn().await;
    let created = app
        .contacts()
        .create_contact(app.request(ada("ada@example.com")))
        .await
        .unwrap()
        .into_inner();
    let id = created.stream_id.clone();
    let keyed = |title: &str| {
        let mut request = update_title(&id, title, None);
        request.options.as_mut().unwrap().idempotency_key = "same-title".into();
        request
    };
    let unchanged = (1, created.global_position, true);

    // The title is already "Analyst": nothing to change.
    let first = update_details(&app, keyed("Analyst")).await.unwrap();
    assert_eq!(
        (first.stream_version, first.global_position, first.unchanged),
        unchanged
    );

    // The title moves on; a late retry of the first request replays its
    // outcome instead of setting the title back.
    let moved = update_details(&app, update_title(&id, "CTO", None))
        .await
        .unwrap();
    assert_eq!((moved.stream_version, moved.unchanged), (2, false));
    let retry = update_details(&app, keyed("Analyst")).await.unwrap();
    assert_eq!(
        (retry.stream_version, retry.global_position, retry.unchanged),
        unchanged
    );
    assert_eq!(app.stored().await.len(), 2, "the retry appended nothing");

    // Another request under the key is refused and changes nothing.
    let status = update_details(&app, keyed("CEO")).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(error_info(&status).0, "IDEMPOTENCY_KEY_REUSED");
    let stored = app.stored().await;
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[1].1["changes"]["title"]["new"], "CTO");
    app.stop().await;
}

/// Personal text that reads like an encrypted value is encrypted like any
/// other: never stored in the clear, and read back as sent.
#[tokio::test]
async fn personal_text_that_looks_encrypted_is_encrypted() {
    let app = TestApp::spawn().await;
    let mut request = ada("enc:v1:ada@example.com");
    request.name = Some(PersonName {
        // Secrets with characters base64 lacks (a space, `@`, `.`), so that
        // no ciphertext can contain them by chance.
        given: "enc:v1:Augusta Ada".into(),
        family: "Love lace".into(),
    });
    let id = app
        .contacts()
        .create_contact(app.request(request))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let stored = app.stored().await;
    let text = stored[0].1.to_string();
    for secret in ["Augusta Ada", "ada@example.com", "Love lace"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    // Read back (the update decides on the decrypted state): the email is
    // the one sent, so it is unchanged and only the title moves.
    let reply = app
        .contacts()
        .update_contact_details(app.request(UpdateContactDetailsRequest {
            contact_id: id,
            title: Some("Countess".into()),
            emails: Some(EmailAddresses {
                items: vec![EmailAddress {
                    address: "enc:v1:ada@example.com".into(),
                    primary: true,
                }],
            }),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.stream_version, 2);
    let stored = app.stored().await;
    let updated = stored[1].1.to_string();
    assert!(!updated.contains("ada@example.com"), "{updated}");
    assert!(
        !updated.contains("\"emails\""),
        "emails unchanged: {updated}"
    );
    app.stop().await;
}

#[tokio::test]
async fn emails_are_unique_per_tenant_and_move_with_updates() {
    let app = TestApp::spawn().await;
    let first = app
        .contacts()
        .create_contact(app.request(ada("ada@example.com")))
        .await
        .unwrap()
        .into_inner();
    let status = app
        .contacts()
        .create_contact(app.request(ada("ADA@Example.com ")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let (reason, metadata) = error_info(&status);
    assert_eq!(
        (
            reason.as_str(),
            metadata["key"].as_str(),
            metadata["holder"].as_str()
        ),
        ("ALREADY_EXISTS", "email", first.stream_id.as_str())
    );
    assert_eq!(
        app.stored().await.len(),
        1,
        "the refused contact stored nothing"
    );

    // Another tenant may use the same address.
    app.contacts()
        .create_contact(as_caller(
            ada("ada@example.com"),
            Some("another-tenant"),
            Some("user:bob"),
        ))
        .await
        .unwrap();

    // Changing the first contact's email frees the old one.
    let update = UpdateContactDetailsRequest {
        contact_id: first.stream_id.clone(),
        emails: Some(EmailAddresses {
            items: vec![EmailAddress {
                address: "ada@new.example".into(),
                primary: true,
            }],
        }),
        ..UpdateContactDetailsRequest::default()
    };
    let updated = app
        .contacts()
        .update_contact_details(app.request(update))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.stream_version, 2);
    app.contacts()
        .create_contact(app.request(ada("ada@example.com")))
        .await
        .unwrap();
    let status = app
        .contacts()
        .create_contact(app.request(ada("ada@new.example")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    app.stop().await;
}

#[tokio::test]
async fn bad_inputs_get_invalid_argument_naming_each_field() {
    let app = TestApp::spawn().await;
    let mut bad = ada("not-an-email");
    bad.name = Some(PersonName {
        given: String::new(),
        family: "x".into(),
    });
    bad.phones = vec![PhoneNumber {
        number: "138-0013-8000".into(),
        kind: String::new(),
    }];
    bad.preferences.as_mut().unwrap().time_zone = "Mars/Olympus".into();
    let status = app
        .contacts()
        .create_contact(app.request(bad))
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&status),
        [
            "name.given",
            "emails[0].address",
            "phones[0].number",
            "preferences.time_zone"
        ]
    );

    let mut missing_name = ada("a@example.com");
    missing_name.name = None;
    assert_eq!(
        bad_fields(
            &app.contacts()
                .create_contact(app.request(missing_name))
                .await
                .unwrap_err()
        ),
        ["name.given"]
    );

    let mut bad_id = ada("a@example.com");
    bad_id.contact_id = "not-a-uuid".into();
    assert_eq!(
        bad_fields(
            &app.contacts()
                .create_contact(app.request(bad_id))
                .await
                .unwrap_err()
        ),
        ["contact_id"]
    );
    let mut v4 = ada("a@example.com");
    v4.contact_id = "9b2c1a5e-8f0d-4c2e-9a77-3f1e2d4c5b6a".into();
    assert_eq!(
        bad_fields(
            &app.contacts()
                .create_contact(app.request(v4))
                .await
                .unwrap_err()
        ),
        ["contact_id"]
    );

    let mut future = ada("a@example.com");
    future.options = Some(CommandOptions {
        occurred_at: "2999-01-01T00:00:00Z".into(),
        ..CommandOptions::default()
    });
    assert_eq!(
        bad_fields(
            &app.contacts()
                .create_contact(app.request(future))
                .await
                .unwrap_err()
        ),
        ["options.occurred_at"]
    );
    // Backdating is allowed, but not before 1900: read models store the
    // time, and one they cannot store would stop them for every tenant.
    for ancient in ["1899-12-31T23:59:59Z", "-009999-06-01T00:00:00Z"] {
        let mut old = ada("a@example.com");
        old.options = Some(CommandOptions {
            occurred_at: ancient.into(),
            ..CommandOptions::default()
        });
        assert_eq!(
            bad_fields(
                &app.contacts()
                    .create_contact(app.request(old))
                    .await
                    .unwrap_err()
            ),
            ["options.occurred_at"],
            "{ancient}"
        );
    }
    let mut garbled = ada("a@example.com");
    garbled.options = Some(CommandOptions {
        occurred_at: "yesterday".into(),
        ..CommandOptions::default()
    });
    assert_eq!(
        bad_fields(
            &app.contacts()
                .create_contact(app.request(garbled))
                .await
                .unwrap_err()
        ),
        ["options.occurred_at"]
    );
    let long_key = with_key(ada("a@example.com"), &"k".repeat(201));
    assert_eq!(
        bad_fields(
            &app.contacts()
                .create_contact(app.request(long_key))
                .await
                .unwrap_err()
        ),
        ["options.idempotency_key"]
    );

    let update = UpdateContactDetailsRequest::default();
    assert_eq!(
        bad_fields(
            &app.contacts()
                .update_contact_details(app.request(update))
                .await
                .unwrap_err()
        ),
        ["contact_id"]
    );

    let consent = ChangeContactConsentRequest {
        contact_id: uuid::Uuid::now_v7().to_string(),
        ..Default::default()
    };
    assert_eq!(
        app.contacts()
            .change_contact_consent(app.request(consent))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Oversized requests are refused before any work.
    let mut huge = ada("a@example.com");
    huge.title = "x".repeat(300 * 1024);
    let status = app
        .contacts()
        .create_contact(app.request(huge))
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    assert!(
        app.stored().await.is_empty(),
        "nothing was stored by any bad request"
    );
    app.stop().await;
}

#[tokio::test]
async fn callers_without_a_valid_tenant_or_actor_are_refused() {
    let app = TestApp::spawn().await;
    let status = app
        .contacts()
        .create_contact(as_caller(ada("a@example.com"), None, Some("user:ada")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = app
        .contacts()
        .create_contact(as_caller(ada("a@example.com"), Some("acme"), None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = app
        .contacts()
        .create_contact(as_caller(
            ada("a@example.com"),
            Some("bad.tenant"),
            Some("user:ada"),
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["x-tenant-id"]);
    assert!(app.stored().await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn updates_check_versions_skip_no_ops_and_respect_tenants() {
    let app = TestApp::spawn().await;
    let created = app
        .contacts()
        .create_contact(app.request(ada("ada@example.com")))
        .await
        .unwrap()
        .into_inner();
    let id = created.stream_id.clone();

    let status = app
        .contacts()
        .update_contact_details(app.request(update_title(&id, "CTO", Some(5))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(error_info(&status).1["current_version"], "1");

    let updated = app
        .contacts()
        .update_contact_details(app.request(update_title(&id, "CTO", Some(1))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((updated.stream_version, updated.unchanged), (2, false));
    let same = app
        .contacts()
        .update_contact_details(app.request(update_title(&id, "CTO", None)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (same.stream_version, same.global_position, same.unchanged),
        (2, updated.global_position, true)
    );

    let (_, payload, _) = &app.stored().await[1];
    assert_eq!(
        payload["changes"],
        serde_json::json!({ "title": { "old": "Analyst", "new": "CTO" } })
    );

    // Another tenant cannot see or change it.
    let status = app
        .contacts()
        .update_contact_details(as_caller(
            update_title(&id, "Spy", None),
            Some("other"),
            Some("user:eve"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = app
        .contacts()
        .update_contact_details(app.request(update_title(
            &uuid::Uuid::now_v7().to_string(),
            "x",
            None,
        )))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(app.stored().await.len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn consent_archive_and_restore() {
    let app = TestApp::spawn().await;
    let id = create_ada(&app).await;
    let consent = ChangeContactConsentRequest {
        options: None,
        contact_id: id.clone(),
        purpose: "marketing_email".into(),
        granted: true,
        source: "web_form".into(),
        basis: "consent".into(),
    };
    assert_eq!(
        app.contacts()
            .change_contact_consent(app.request(consent.clone()))
            .await
            .unwrap()
            .into_inner()
            .stream_version,
        2
    );
    let mut bad = consent.clone();
    bad.purpose = "spam".into();
    bad.basis = "whim".into();
    assert_eq!(
        bad_fields(
            &app.contacts()
                .change_contact_consent(app.request(bad))
                .await
                .unwrap_err()
        ),
        ["purpose", "basis"]
    );

    let archive = ArchiveContactRequest {
        options: None,
        contact_id: id.clone(),
        reason: reason("left_company"),
    };
    app.contacts()
        .archive_contact(app.request(archive.clone()))
        .await
        .unwrap();
    let status = app
        .contacts()
        .update_contact_details(app.request(update_title(&id, "CTO", None)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(error_info(&status).0, "RECORD_ARCHIVED");
    let status = app
        .contacts()
        .archive_contact(app.request(archive))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).0, "RECORD_ARCHIVED");

    let restore = RestoreContactRequest {
        options: None,
        contact_id: id.clone(),
        reason: reason("returned"),
    };
    assert_eq!(
        app.contacts()
            .restore_contact(app.request(restore.clone()))
            .await
            .unwrap()
            .into_inner()
            .stream_version,
        4
    );
    let status = app
        .contacts()
        .restore_contact(app.request(restore))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(error_info(&status).0, "INVALID_TRANSITION");
    let no_reason = ArchiveContactRequest {
        options: None,
        contact_id: id,
        reason: None,
    };
    assert_eq!(
        bad_fields(
            &app.contacts()
                .archive_contact(app.request(no_reason))
                .await
                .unwrap_err()
        ),
        ["reason.code"]
    );
    app.stop().await;
}

#[tokio::test]
async fn duplicates_merge_atomically_and_the_loser_points_to_the_survivor() {
    use crm_proto::v1::MergeContactsRequest;
    let app = TestApp::spawn().await;
    let person = |given: &str, email: &str| CreateContactRequest {
        name: Some(PersonName {
            given: given.into(),
            family: "Wei".into(),
        }),
        emails: vec![EmailAddress {
            address: email.into(),
            primary: true,
        }],
        phones: vec![crm_proto::v1::PhoneNumber {
            number: "+8613800138000".into(),
            kind: "mobile".into(),
        }],
        ..CreateContactRequest::default()
    };
    let p1 = app
        .contacts()
        .create_contact(app.request(person("Li", "li.wei@example.cn")))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let p2 = app
        .contacts()
        .create_contact(app.request(person("Ｌｉ", "wei.li@work.example")))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let merge = |dry_run: bool| MergeContactsRequest {
        options: None,
        survivor_id: p1.clone(),
        loser_ids: vec![p2.clone()],
        name_from: String::new(),
        title_from: String::new(),
        preferences_from: String::new(),
        dry_run,
    };
    let before = app.stored().await.len();
    // Only a sales manager or an admin merges (DOMAIN.md §6), a dry run
    // too: its reply shows both parties' personal fields.
    for (dry_run, roles) in [
        (true, None),
        (false, None),
        (true, Some("sales_rep,auditor")),
    ] {
        let mut request = app.request(merge(dry_run));
        if let Some(roles) = roles {
            request
                .metadata_mut()
                .insert("x-roles", roles.parse().unwrap());
        }
        let status = app.contacts().merge_contacts(request).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    assert_eq!(app.stored().await.len(), before);
    let preview = app
        .contacts()
        .merge_contacts(app.manager(merge(true)))
        .await
        .unwrap()
        .into_inner();
    assert!(preview.dry_run && preview.changes_json.contains("wei.li@work.example"));
    assert_eq!(app.stored().await.len(), before, "a dry run stores nothing");

    let merged = app
        .contacts()
        .merge_contacts(app.manager(merge(false)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(merged.survivor.as_ref().unwrap().stream_version, 2);
    let rows = app.db.client().await
        .query("SELECT event_type, stream_id::text, xmin::text FROM events WHERE global_position > $1 AND stream_type <> 'duplicate_pair' ORDER BY global_position", &[&(before as i64)])
        .await.unwrap();
    let types: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        types,
        [
            ("RecordsMerged".to_owned(), p1.clone()),
            ("RecordMergedInto".to_owned(), p2.clone())
        ]
    );
    assert_eq!(
        rows[0].get::<_, String>(2),
        rows[1].get::<_, String>(2),
        "one transaction"
    );

    // The loser's email moved with it: it now belongs to the survivor.
    let status = app
        .contacts()
        .create_contact(app.request(person("X", "WEI.LI@work.example")))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).1["holder"], p1);
    // Commands on the loser name the survivor.
    let status = app
        .contacts()
        .update_contact_details(app.request(update_title(&p2, "CTO", None)))
        .await
        .unwrap_err();
    let (reason, metadata) = error_info(&status);
    assert_eq!(
        (
            status.code(),
            reason.as_str(),
            metadata["survivor"].as_str()
        ),
        (Code::FailedPrecondition, "RECORD_MERGED", p1.as_str())
    );
    // A merged record cannot be merged again, nor can the survivor absorb itself.
    let status = app
        .contacts()
        .merge_contacts(app.manager(merge(false)))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).0, "RECORD_MERGED");
    let mut itself = merge(false);
    itself.loser_ids = vec![p1.clone()];
    assert_eq!(
        bad_fields(
            &app.contacts()
                .merge_contacts(app.manager(itself))
                .await
                .unwrap_err()
        ),
        ["loser_ids"]
    );
    app.stop().await;
}

#[tokio::test]
async fn contacts_link_to_active_accounts_and_answer_nps() {
    use crm_proto::v1::{
        AccountKind, ArchiveAccountRequest, CreateAccountRequest, LinkContactToAccountRequest,
        RecordNpsResponseRequest, UnlinkContactFromAccountRequest,
    };
    let app = TestApp::spawn().await;
    let contact = app
        .contacts()
        .create_contact(app.request(ada("ada@example.com")))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let account = CreateAccountRequest {
        kind: AccountKind::Company.into(),
        name: "Acme".into(),
        ..Default::default()
    };
    let account = app
        .accounts()
        .create_account(app.request(account))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let link = LinkContactToAccountRequest {
        options: None,
        contact_id: contact.clone(),
        account_id: account.clone(),
        role: "buyer".into(),
        primary: true,
    };
    assert_eq!(
        app.contacts()
            .link_contact_to_account(app.request(link.clone()))
            .await
            .unwrap()
            .into_inner()
            .stream_version,
        2
    );
    assert!(
        app.contacts()
            .link_contact_to_account(app.request(link.clone()))
            .await
            .unwrap()
            .into_inner()
            .unchanged
    );
    let unlink = UnlinkContactFromAccountRequest {
        options: None,
        contact_id: contact.clone(),
        account_id: account.clone(),
    };
    app.contacts()
        .unlink_contact_from_account(app.request(unlink))
        .await
        .unwrap();
    let archive = ArchiveAccountRequest {
        options: None,
        account_id: account.clone(),
        reason: reason("closed"),
    };
    app.accounts()
        .archive_account(app.request(archive))
        .await
        .unwrap();
    let status = app
        .contacts()
        .link_contact_to_account(app.request(link))
        .await
        .unwrap_err();
    assert_eq!(
        error_info(&status).1["field"],
        "account_id",
        "archived accounts take no links"
    );

    let nps = |score: u32| RecordNpsResponseRequest {
        options: None,
        contact_id: contact.clone(),
        score,
        comment: String::new(),
    };
    app.contacts()
        .record_nps_response(app.request(nps(9)))
        .await
        .unwrap();
    assert_eq!(
        bad_fields(
            &app.contacts()
                .record_nps_response(app.request(nps(11)))
                .await
                .unwrap_err()
        ),
        ["score"]
    );
    app.stop().await;
}

#[tokio::test]
async fn erasing_personal_data_shreds_it_everywhere_and_frees_the_email() {
    use crm_proto::v1::ErasePersonalDataRequest;
    let app = TestApp::spawn().await;
    let id = create_ada(&app).await;
    app.contacts()
        .update_contact_details(app.request(update_title(&id, "Countess", None)))
        .await
        .unwrap();
    // The state decrypts: the same (encrypted) name and email again change
    // nothing.
    let same = app
        .contacts()
        .update_contact_details(app.request(UpdateContactDetailsRequest {
            contact_id: id.clone(),
            name: Some(PersonName {
                given: "Ada".into(),
                family: "Lovelace".into(),
            }),
            emails: Some(EmailAddresses {
                items: vec![EmailAddress {
                    address: "ada@example.com".into(),
                    primary: true,
                }],
            }),
            ..UpdateContactDetailsRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(same.unchanged, "decrypted state equals the request");
    let erase = |roles: &str| {
        let mut request = app.request(ErasePersonalDataRequest {
            contact_id: id.clone(),
            request: "DSR-2026-0042".into(),
            ..Default::default()
        });
        if !roles.is_empty() {
            request
                .metadata_mut()
                .insert("x-roles", roles.parse().unwrap());
        }
        request
    };
    let status = app
        .contacts()
        .erase_personal_data(erase("sales_rep"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let payloads = || async {
        let client = app.db.client().await;
        first_column::<String>(
            &client,
            "SELECT payload::text FROM events ORDER BY global_position",
        )
        .await
    };
    let stored_before = payloads().await;
    let erased = app
        .contacts()
        .erase_personal_data(erase("admin"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(erased.stream_version, 3);
    let db = app.db.client().await;
    let keys: i64 = db
        .query_one("SELECT count(*) FROM subject_keys", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(keys, 0, "the key is destroyed");
    let stored_after = payloads().await;
    assert_eq!(
        &stored_after[..stored_before.len()],
        &stored_before[..],
        "stored events never change"
    );
    // A retry is harmless and reports no change.
    let again = app
        .contacts()
        .erase_personal_data(erase("admin"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.unchanged);
    // The contact takes no more commands; its email is free again.
    let status = app
        .contacts()
        .update_contact_details(app.request(update_title(&id, "Lady", None)))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).0.as_str()),
        (Code::FailedPrecondition, "RECORD_ERASED")
    );
    app.contacts()
        .create_contact(app.request(ada("ada@example.com")))
        .await
        .expect("the erased contact's email is free");
    // No personal value was ever stored (or published: the relay sends the
    // stored payloads) in the clear.
    let all = payloads().await;
    for secret in ["ada@example.com", "Lovelace", "+442071838750"] {
        assert!(
            all.iter().all(|p| !p.contains(secret)),
            "{secret} stored in the clear"
        );
    }
    let status = app
        .contacts()
        .erase_personal_data(app.request(ErasePersonalDataRequest {
            contact_id: uuid::Uuid::now_v7().to_string(),
            request: "DSR-1".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    app.stop().await;
}

/// A contact's long stream is snapshotted sealed under the contact's key:
/// the stored row holds none of its personal data, loads open and use it,
/// a sealed text that does not open is ignored, and erasure deletes it.
#[tokio::test]
async fn a_subjects_snapshot_is_sealed_and_erasure_makes_it_unreadable() {
    use crm_proto::v1::ErasePersonalDataRequest;
    let app = TestApp::spawn().await;
    let id = create_ada(&app).await;
    // Version n + 2 has title "Title n".
    for n in 0..120 {
        update_details(&app, update_title(&id, &format!("Title {n}"), None))
            .await
            .unwrap();
    }
    let client = app.db.client().await;
    let (_, state) = crate::support::snapshot_of(&app, &id).await;
    // One string and nothing else: the state is sealed whole.
    let stored: serde_json::Value = serde_json::from_str(&state).unwrap();
    let fields = stored.as_object().unwrap();
    assert_eq!(fields.len(), 1, "{state}");
    assert!(
        fields["sealed"].as_str().unwrap().starts_with("enc:v1:"),
        "{state}"
    );
    let unchanged = |title: &str| {
        let request = update_title(&id, title, None);
        let app = &app;
        async move { update_details(app, request).await.unwrap().unchanged }
    };
    // Loads use it: claimed to cover every event, its state (version 100,
    // "Title 98") is what a command sees.
    client
        .execute("UPDATE snapshots SET version = 121", &[])
        .await
        .unwrap();
    assert!(unchanged("Title 98").await, "the sealed snapshot was read");
    // A sealed text that does not open is ignored: the events decide.
    client
        .execute(
            "UPDATE snapshots SET state = jsonb_build_object('sealed', \
               'enc:v1:' || md5(random()::text))",
            &[],
        )
        .await
        .unwrap();
    assert!(unchanged("Title 119").await, "folded from the events");

    let mut erase = app.request(ErasePersonalDataRequest {
        contact_id: id.clone(),
        request: "DSR-2026-0043".into(),
        ..Default::default()
    });
    erase
        .metadata_mut()
        .insert("x-roles", "admin".parse().unwrap());
    app.contacts().erase_personal_data(erase).await.unwrap();
    let left: Vec<i64> = first_column(&client, "SELECT version FROM snapshots").await;
    assert!(left.is_empty(), "erasure deletes the snapshot: {left:?}");
    app.stop().await;
}

/// A merge decided on a loser that changes before the merge's append is
/// decided again on the loser as it now is (its new title is the one the
/// survivor takes), not refused with the loser's version.
#[tokio::test]
async fn a_merge_whose_loser_moved_before_its_append_is_decided_again() {
    use crm_proto::v1::MergeContactsRequest;
    let app = TestApp::spawn().await;
    let survivor = create_ada(&app).await;
    let loser = app
        .contacts()
        .create_contact(app.request(ada("ada.l@work.example")))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let hold = crate::support::LogHold::take(&app).await;
    let (mut contacts, retitle) = (
        app.contacts(),
        app.request(update_title(&loser, "CTO", None)),
    );
    let retitle = tokio::spawn(async move { contacts.update_contact_details(retitle).await });
    hold.until_an_append_waits(&app).await;
    let (mut contacts, merge) = (
        app.contacts(),
        app.manager(MergeContactsRequest {
            options: Some(CommandOptions {
                expected_version: Some(1),
                ..CommandOptions::default()
            }),
            survivor_id: survivor.clone(),
            loser_ids: vec![loser.clone()],
            title_from: loser.clone(),
            ..MergeContactsRequest::default()
        }),
    );
    let merge = tokio::spawn(async move { contacts.merge_contacts(merge).await });
    hold.release().await;
    retitle.await.unwrap().unwrap();
    let merged = merge.await.unwrap().unwrap().into_inner();
    assert_eq!(merged.survivor.unwrap().stream_version, 2);
    let same = update_details(&app, update_title(&survivor, "CTO", None))
        .await
        .unwrap();
    assert!(same.unchanged, "the survivor took the loser's new title");
    app.stop().await;
}
