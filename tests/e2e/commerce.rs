//! `crm.v1.Commerce`: ERP upserts converge, versions only move forward,
//! orders map to accounts by tax id, refunds are bounded.
use crm_proto::v1::{
    AccountKind, CancelOrderRequest, CreateAccountRequest, CreditTerms, ExternalRef,
    IssueRefundRequest, Money, OrderLine, RecordCustomerRequest, RecordOrderRequest,
    RecordPaymentRequest, UpdateAccountDetailsRequest,
};
use tonic::Code;

use crate::support::{TestApp, bad_fields, cny, error_info};

fn external(id: &str, version: u64) -> Option<ExternalRef> {
    Some(ExternalRef {
        source: "erp".into(),
        external_id: id.into(),
        external_version: version,
    })
}

fn order(version: u64, status: &str) -> RecordOrderRequest {
    RecordOrderRequest {
        external: external("SO-1", version),
        customer_tax_id: "91310000ma1fl0000x".into(),
        customer_ref: "C-42".into(),
        status: status.into(),
        lines: vec![
            OrderLine {
                sku: "A".into(),
                quantity: 2,
                unit_price: cny(10_000),
                line_total: cny(20_000),
                line_cost: None,
            },
            OrderLine {
                sku: "B".into(),
                quantity: 1,
                unit_price: cny(5_000),
                line_total: cny(5_000),
                line_cost: None,
            },
        ],
        net: cny(25_000),
        tax: cny(3_250),
        gross: cny(28_250),
        ordered_on: "2026-11-01".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn erp_orders_upsert_map_to_accounts_and_ignore_old_versions() {
    let app = TestApp::spawn().await;
    let account = CreateAccountRequest {
        kind: AccountKind::Company.into(),
        name: "Acme".into(),
        tax_id: "91310000MA1FL0000X".into(),
        ..Default::default()
    };
    let account_id = app
        .accounts()
        .create_account(app.request(account))
        .await
        .unwrap()
        .into_inner()
        .stream_id;

    let first = app
        .commerce()
        .record_order(app.erp(order(1, "placed")))
        .await
        .unwrap()
        .into_inner();
    let resent = app
        .commerce()
        .record_order(app.erp(order(1, "placed")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (resent.stream_id.as_str(), resent.unchanged),
        (first.stream_id.as_str(), true)
    );
    let paid = app
        .commerce()
        .record_order(app.erp(order(3, "paid")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (paid.stream_id.as_str(), paid.stream_version),
        (first.stream_id.as_str(), 2)
    );
    let late = app
        .commerce()
        .record_order(app.erp(order(2, "confirmed")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (late.stream_version, late.unchanged),
        (2, true),
        "an older version changes nothing"
    );
    // The same version again with other details: the first outcome, not a
    // reused-key error (the server's key stands for the ERP version).
    let again = app
        .commerce()
        .record_order(app.erp(order(3, "shipped")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.stream_version, again.unchanged), (2, true));
    // An external id of up to 200 characters (the proto's limit) needs no
    // client key: the server's stays within the key limit.
    let mut long = order(1, "placed");
    long.external.as_mut().unwrap().external_id = "订".repeat(67) + &"9".repeat(120);
    long.customer_tax_id = String::new();
    long.customer_ref = "C-43".into();
    app.commerce()
        .record_order(app.erp(long.clone()))
        .await
        .unwrap();
    let replayed = app
        .commerce()
        .record_order(app.erp(long))
        .await
        .unwrap()
        .into_inner();
    assert!(replayed.unchanged);

    let stored = app.stored().await;
    let recorded: Vec<_> = stored
        .iter()
        .filter(|(t, _, _)| t == "OrderRecorded")
        .collect();
    assert_eq!(recorded.len(), 3, "SO-1 twice, the long id once");
    assert_eq!(recorded[0].1["account_id"], account_id, "mapped by tax id");

    let cancel = CancelOrderRequest {
        options: None,
        external: external("SO-1", 4),
        reason: "returned".into(),
    };
    assert_eq!(
        app.commerce()
            .cancel_order(app.erp(cancel))
            .await
            .unwrap()
            .into_inner()
            .stream_version,
        3
    );
    app.stop().await;
}

#[tokio::test]
async fn inconsistent_orders_and_excess_refunds_are_refused() {
    let app = TestApp::spawn().await;
    let mut bad = order(1, "placed");
    bad.net = cny(24_000);
    bad.lines[1].line_total = Some(Money {
        amount_minor: 5_000,
        currency: "EUR".into(),
    });
    assert_eq!(
        bad_fields(&app.commerce().record_order(app.erp(bad)).await.unwrap_err()),
        ["lines[1].line_total.currency", "net", "gross"]
    );
    let mut bad = order(0, "lost");
    bad.external.as_mut().unwrap().source = "ERP 1".into();
    assert_eq!(
        bad_fields(&app.commerce().record_order(app.erp(bad)).await.unwrap_err()),
        ["external.source", "external.external_version", "status"]
    );
    let mut bad = order(1, "placed");
    bad.external = None;
    assert_eq!(
        bad_fields(&app.commerce().record_order(app.erp(bad)).await.unwrap_err()),
        ["external"]
    );

    let invoice = crm_proto::v1::RecordInvoiceRequest {
        external: external("INV-1", 1),
        number: "2026-0001".into(),
        issued_on: "2026-11-03".into(),
        due_on: "2026-11-01".into(),
        net: cny(25_000),
        tax: cny(3_250),
        gross: cny(28_000),
        ..Default::default()
    };
    assert_eq!(
        bad_fields(
            &app.commerce()
                .record_invoice(app.erp(invoice.clone()))
                .await
                .unwrap_err()
        ),
        ["due_on", "gross"]
    );
    let invoice = crm_proto::v1::RecordInvoiceRequest {
        due_on: "2026-12-03".into(),
        gross: cny(28_250),
        ..invoice
    };
    app.commerce()
        .record_invoice(app.erp(invoice))
        .await
        .unwrap();

    let payment = RecordPaymentRequest {
        external: external("PAY-1", 1),
        amount: cny(28_250),
        paid_on: "2026-11-02".into(),
        ..Default::default()
    };
    app.commerce()
        .record_payment(app.erp(payment))
        .await
        .unwrap();
    let refund = |minor: i64, id: &str| IssueRefundRequest {
        options: None,
        payment: external("PAY-1", 1),
        amount: cny(minor),
        refund_id: id.into(),
        refunded_on: "2026-11-05".into(),
    };
    app.commerce()
        .issue_refund(app.erp(refund(20_000, "R-1")))
        .await
        .unwrap();
    assert!(
        app.commerce()
            .issue_refund(app.erp(refund(20_000, "R-1")))
            .await
            .unwrap()
            .into_inner()
            .unchanged,
        "same refund id: once"
    );
    // More than is left of the payment; neither a refund id nor a key (a
    // resend could not be told apart).
    for (request, field) in [
        (refund(9_000, "R-2"), "amount.amount_minor"),
        (refund(1_000, ""), "refund_id"),
    ] {
        let status = app
            .commerce()
            .issue_refund(app.erp(request))
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), [field]);
    }
    let status = app
        .commerce()
        .issue_refund(app.erp(IssueRefundRequest {
            payment: external("PAY-404", 1),
            ..refund(1, "R-3")
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // The same refund id on another payment of the same source is another
    // refund: recorded, not answered with the first one's outcome.
    app.commerce()
        .record_payment(app.erp(RecordPaymentRequest {
            external: external("PAY-2", 1),
            amount: cny(28_250),
            paid_on: "2026-11-02".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let other = app
        .commerce()
        .issue_refund(app.erp(IssueRefundRequest {
            payment: external("PAY-2", 1),
            ..refund(20_000, "R-1")
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!other.unchanged, "{other:?}");
    let refunds = app
        .stored()
        .await
        .iter()
        .filter(|(t, _, _)| t == "RefundIssued")
        .count();
    assert_eq!(refunds, 2);
    app.stop().await;
}

fn customer(account_id: &str, version: u64, tax_id: &str) -> RecordCustomerRequest {
    RecordCustomerRequest {
        external: external("C-42", version),
        account_id: account_id.into(),
        tax_id: tax_id.into(),
        credit_terms: Some(CreditTerms {
            limit: cny(5_000_000),
            payment_days: 30,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_erp_links_accounts_owns_their_tax_id_and_credit_terms_and_maps_orders() {
    let app = TestApp::spawn().await;
    let create = |name: &str, tax_id: &str| CreateAccountRequest {
        kind: AccountKind::Company.into(),
        name: name.into(),
        tax_id: tax_id.into(),
        ..Default::default()
    };
    let mut ids = Vec::new();
    for (name, tax_id) in [("Acme", "TAX-A"), ("Globex", "TAX-B")] {
        let reply = app
            .accounts()
            .create_account(app.request(create(name, tax_id)))
            .await
            .unwrap();
        ids.push(reply.into_inner().stream_id);
    }
    let (acme, globex) = (ids[0].clone(), ids[1].clone());

    // Credit terms come from the ERP only.
    let owned = |status: tonic::Status, field: &str| {
        let (reason, metadata) = error_info(&status);
        assert_eq!(
            (status.code(), reason.as_str(), metadata["field"].as_str()),
            (Code::FailedPrecondition, "FIELD_OWNED_EXTERNALLY", field)
        );
    };
    let terms = Some(CreditTerms {
        limit: cny(1),
        payment_days: 1,
    });
    let with_terms = CreateAccountRequest {
        credit_terms: terms.clone(),
        ..create("Initech", "")
    };
    owned(
        app.accounts()
            .create_account(app.request(with_terms))
            .await
            .unwrap_err(),
        "credit_terms",
    );
    let update = |id: &str| UpdateAccountDetailsRequest {
        account_id: id.into(),
        ..Default::default()
    };
    owned(
        app.accounts()
            .update_account_details(app.request(UpdateAccountDetailsRequest {
                credit_terms: terms,
                ..update(&acme)
            }))
            .await
            .unwrap_err(),
        "credit_terms",
    );

    // Bad syncs and unknown customers store nothing.
    let before = app.stored().await.len();
    let mut bad = customer(&acme, 1, "tax id with spaces");
    bad.external.as_mut().unwrap().source = "S A P".into();
    bad.credit_terms.as_mut().unwrap().limit = cny(-1);
    let status = app
        .commerce()
        .record_customer(app.erp(bad))
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&status),
        [
            "external.source",
            "tax_id",
            "credit_terms.limit.amount_minor"
        ]
    );
    // ERP data comes from the ERP's service account (or an admin) only.
    for roles in [None, Some("sales_rep")] {
        let mut request = app.request(customer(&acme, 1, ""));
        if let Some(roles) = roles {
            request
                .metadata_mut()
                .insert("x-roles", roles.parse().unwrap());
        }
        let status = app.commerce().record_customer(request).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        let status = app
            .commerce()
            .record_order(app.request(order(1, "placed")))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    let status = app
        .commerce()
        .record_customer(app.erp(customer(&acme, 1, "tax id with spaces")))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["tax_id"]);
    let status = app
        .commerce()
        .record_customer(app.erp(customer("", 1, "TAX-UNKNOWN")))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).1["field"].as_str()),
        (Code::FailedPrecondition, "account_id")
    );
    assert_eq!(app.stored().await.len(), before);

    // Linked by tax id; the ERP's tax id and terms replace the CRM's.
    let linked = app
        .commerce()
        .record_customer(app.erp(customer("", 1, "TAX-A2")))
        .await;
    assert_eq!(
        linked.unwrap_err().code(),
        Code::FailedPrecondition,
        "TAX-A2 is nobody's yet"
    );
    let linked = app
        .commerce()
        .record_customer(app.erp(customer("", 1, "tax-a")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(linked.stream_id, acme);
    let stored = app.stored().await;
    let changes = &stored.last().unwrap().1["changes"];
    assert_eq!(changes["credit_terms"]["new"]["payment_days"], 30);
    assert_eq!(changes["external_refs"]["new"][0]["external_id"], "C-42");
    let renamed = app
        .commerce()
        .record_customer(app.erp(customer("", 2, "TAX-A2")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (renamed.stream_id.as_str(), renamed.stream_version),
        (acme.as_str(), 3)
    );
    let resent = app
        .commerce()
        .record_customer(app.erp(customer("", 2, "TAX-A2")))
        .await
        .unwrap()
        .into_inner();
    assert!(resent.unchanged);

    // Now the ERP owns Acme's tax id; Globex's is still the CRM's.
    owned(
        app.accounts()
            .update_account_details(app.request(UpdateAccountDetailsRequest {
                tax_id: Some("TAX-NEW".into()),
                ..update(&acme)
            }))
            .await
            .unwrap_err(),
        "tax_id",
    );
    app.accounts()
        .update_account_details(app.request(UpdateAccountDetailsRequest {
            tax_id: Some("TAX-B2".into()),
            ..update(&globex)
        }))
        .await
        .unwrap();

    // One account per ERP customer, and one customer per source and account.
    let status = app
        .commerce()
        .record_customer(app.erp(customer(&globex, 3, "")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    let mut other = customer(&acme, 1, "");
    other.external.as_mut().unwrap().external_id = "C-43".into();
    let status = app
        .commerce()
        .record_customer(app.erp(other))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);

    // Orders naming the customer map to its account, whatever their tax id.
    let order = RecordOrderRequest {
        customer_tax_id: "TAX-B2".into(),
        ..order(1, "placed")
    };
    app.commerce().record_order(app.erp(order)).await.unwrap();
    let stored = app.stored().await;
    let recorded = stored
        .iter()
        .find(|(t, _, _)| t == "OrderRecorded")
        .unwrap();
    assert_eq!(recorded.1["account_id"], acme.as_str());
    app.stop().await;
}

#[tokio::test]
async fn orders_recorded_before_their_customer_is_linked_resolve_in_the_read_models() {
    let app = TestApp::spawn().await;
    let acme = crate::support::company(&app, "Acme").await;
    // No account, no tax id anyone holds: the order stays unlinked.
    let unlinked = RecordOrderRequest {
        customer_tax_id: String::new(),
        ..order(1, "paid")
    };
    let order_id = app
        .commerce()
        .record_order(app.erp(unlinked))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let order_id = uuid::Uuid::parse_str(&order_id).unwrap();
    let acme_id = uuid::Uuid::parse_str(&acme).unwrap();
    let db = app.db.client().await;
    let read = || order_in_read_models(&db, order_id);
    crm_test_support::eventually(
        std::time::Duration::from_secs(20),
        "the unlinked order in every read model",
        || async { (read().await == (Some(None), Some(None), true)).then_some(()) },
    )
    .await;

    // The ERP links Acme to customer C-42: the order is Acme's now.
    app.commerce()
        .record_customer(app.erp(customer(&acme, 1, "")))
        .await
        .unwrap();
    crm_test_support::eventually(
        std::time::Duration::from_secs(20),
        "the order resolved to its account",
        || async {
            (read().await == (Some(Some(acme_id)), Some(Some(acme_id)), false)).then_some(())
        },
    )
    .await;
    // Its events are not rewritten.
    let stored = app.stored().await;
    let recorded = stored
        .iter()
        .find(|(t, _, _)| t == "OrderRecorded")
        .unwrap();
    assert!(
        recorded
            .1
            .get("account_id")
            .is_none_or(serde_json::Value::is_null)
    );
    app.stop().await;
}

/// An order the command path recorded unlinked just as its ERP customer was
/// linked (the lookup raced the link) resolves when the read models see it.
#[tokio::test]
async fn an_order_that_raced_its_customers_link_resolves_on_arrival() {
    use crm_event_store::{
        AppendEvents, EventStore, ExpectedVersion, Metadata, NewEvent, StoreOptions, StreamAppend,
    };
    let app = TestApp::spawn().await;
    let acme = crate::support::company(&app, "Acme").await;
    let acme_id = uuid::Uuid::parse_str(&acme).unwrap();
    app.commerce()
        .record_customer(app.erp(customer(&acme, 1, "")))
        .await
        .unwrap();
    // The order as the command path would have stored it had its lookup
    // run just before the link: no account, the linked customer's ref.
    let template = RecordOrderRequest {
        customer_tax_id: String::new(),
        customer_ref: "C-99".into(),
        ..order(1, "paid")
    };
    app.commerce()
        .record_order(app.erp(template))
        .await
        .unwrap();
    let stored = app.stored().await;
    let mut payload = stored
        .iter()
        .find(|(t, _, _)| t == "OrderRecorded")
        .unwrap()
        .1
        .clone();
    assert!(
        payload
            .get("account_id")
            .is_none_or(serde_json::Value::is_null)
    );
    payload["customer_ref"] = "C-42".into();
    payload["external"]["external_id"] = "SO-RACE".into();
    let order_id = uuid::Uuid::now_v7();
    let store = EventStore::connect(app.db.config(), StoreOptions::default())
        .await
        .unwrap();
    store
        .append(AppendEvents {
            tenant_id: crm_domain::TenantId::parse(&app.tenant).unwrap(),
            streams: vec![StreamAppend {
                stream_type: "order".into(),
                stream_id: order_id,
                expected: ExpectedVersion::NoStream,
                events: vec![NewEvent::new("OrderRecorded", payload)],
            }],
            idempotency_key: None,
            metadata: Metadata {
                actor: "service:erp".into(),
                ..Metadata::default()
            },
            reservations: Vec::new(),
            subject_keys: Vec::new(),
            request_fingerprint: None,
        })
        .await
        .unwrap();
    let db = app.db.client().await;
    crm_test_support::eventually(
        std::time::Duration::from_secs(20),
        "the raced order on its account in every read model",
        || async {
            let (c360, analytics, unmatched) = order_in_read_models(&db, order_id).await;
            // The data-quality process manager has seen the raced order
            // (the last event) when its position reached it.
            let dq_caught_up = db
                .query_opt(
                    "SELECT 1 FROM projections WHERE name = 'data_quality' \
                     AND position >= (SELECT max(global_position) FROM events)",
                    &[],
                )
                .await
                .unwrap()
                .is_some();
            let acme = Some(Some(acme_id));
            (c360 == acme && analytics == acme && !unmatched && dq_caught_up).then_some(())
        },
    )
    .await;
    store.shutdown().await;
    app.stop().await;
}

/// Where an order stands in the read models: its account in Customer 360
/// and in analytics (`None` before the row is there), and whether data
/// quality lists it as unmatched.
async fn order_in_read_models(
    db: &tokio_postgres::Client,
    order_id: uuid::Uuid,
) -> (Option<Option<uuid::Uuid>>, Option<Option<uuid::Uuid>>, bool) {
    let account = |table: &'static str| async move {
        db.query_opt(
            &format!("SELECT account_id FROM {table} WHERE order_id = $1"),
            &[&order_id],
        )
        .await
        .unwrap()
        .map(|row| row.get::<_, Option<uuid::Uuid>>(0))
    };
    let unmatched = db
        .query_opt(
            "SELECT 1 FROM dq_unmatched_orders WHERE order_id = $1",
            &[&order_id],
        )
        .await
        .unwrap()
        .is_some();
    (
        account("c360_orders").await,
        account("an_orders").await,
        unmatched,
    )
}
