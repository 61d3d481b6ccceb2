//! `crm demo seed` goes through the public API and can run twice.
use crate::support::TestApp;

#[tokio::test]
async fn the_demo_seed_fills_a_tenant_and_a_second_run_changes_nothing() {
    let app = TestApp::spawn().await;
    let first = crm::demo::seed(app.address, "demo").await.unwrap();
    let status_moves = stored_status_moves(&app).await;
    let commands = first.accounts
        + first.contacts
        + first.consents
        + first.leads
        + status_moves
        + first.conversions;
    assert_eq!(
        (first.leads, first.conversions),
        (
            crm::demo::LEADS,
            crm::demo::LEADS / crm::demo::CONVERT_EVERY
        )
    );
    assert_eq!(
        (first.accounts, first.contacts, first.unchanged),
        (
            crm::demo::ACCOUNTS,
            crm::demo::ACCOUNTS * crm::demo::CONTACTS_PER_ACCOUNT,
            0
        )
    );
    let stored = app.stored().await.len();
    // Each conversion appends four events (lead, account, contact created and linked).
    assert_eq!(stored, commands + 3 * first.conversions);

    let second = crm::demo::seed(app.address, "demo").await.unwrap();
    assert_eq!(
        second.unchanged, commands,
        "every command answered from the first run"
    );
    assert_eq!(
        app.stored().await.len(),
        stored,
        "nothing appended the second time"
    );
    app.stop().await;
}

async fn stored_status_moves(app: &TestApp) -> usize {
    app.stored()
        .await
        .iter()
        .filter(|(event_type, _, _)| event_type == "LeadStatusChanged")
        .count()
}
