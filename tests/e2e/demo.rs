//! `crm demo seed` goes through the public API and can run twice.
use crate::support::TestApp;

async fn stored_count(app: &TestApp, event_type: &str) -> usize {
    app.stored()
        .await
        .iter()
        .filter(|(stored, _, _)| stored == event_type)
        .count()
}

#[tokio::test]
async fn the_demo_seed_fills_a_tenant_and_a_second_run_changes_nothing() {
    let app = TestApp::spawn().await;
    let first = crm::demo::seed(app.address, "demo").await.unwrap();
    assert_eq!(
        (
            first.accounts,
            first.contacts,
            first.leads,
            first.conversions,
            first.opportunities,
            first.unchanged
        ),
        (
            crm::demo::ACCOUNTS,
            crm::demo::ACCOUNTS * crm::demo::CONTACTS_PER_ACCOUNT,
            crm::demo::LEADS,
            crm::demo::LEADS / crm::demo::CONVERT_EVERY,
            2 * crm::demo::ACCOUNTS,
            0
        )
    );
    let moves = stored_count(&app, "LeadStatusChanged").await
        + stored_count(&app, "OpportunityStageChanged").await
        + stored_count(&app, "OpportunityWon").await
        + stored_count(&app, "OpportunityLost").await;
    assert!(
        stored_count(&app, "OpportunityWon").await > 0
            && stored_count(&app, "OpportunityLost").await > 0
    );
    let commands = 1 // the pipeline
        + first.accounts
        + first.contacts
        + first.consents
        + first.leads
        + first.conversions
        + first.opportunities
        + first.more
        + moves;
    // What the seed appended (process managers and the scheduler append
    // more, as `system:*` actors, while it runs).
    let seeded = || async {
        app.stored()
            .await
            .iter()
            .filter(|(_, _, meta)| meta["actor"] == "system:demo-seed")
            .count()
    };
    let stored = seeded().await;
    // Each conversion appends five events (lead, account, contact created and
    // linked, the deal opened), and the lead's consent for its contact (every
    // converted demo lead gave one: every sixth lead converts, every second
    // gave consent); an agent's first reply to a new ticket also opens it
    // (18 of the 24 demo tickets are answered).
    assert_eq!(stored, commands + 5 * first.conversions + 18);

    let second = crm::demo::seed(app.address, "demo").await.unwrap();
    assert_eq!(
        second.unchanged, commands,
        "every command answered from the first run"
    );
    assert_eq!(seeded().await, stored, "nothing appended the second time");
    assert!(
        first.more >= 150,
        "service, commerce, campaign and NPS data: {first:?}"
    );
    app.stop().await;
}
