//! `crm.v1.AnalyticsQueries` over the `analytics` read model, and the
//! customer lifecycle process manager: the formulas of DOMAIN.md §5.3 fed
//! small scenarios whose figures are worked out by hand below.
use std::time::Duration;

use crm_proto::v1::analytics_queries_client::AnalyticsQueriesClient;
use crm_proto::v1::{
    AccountKind, AddCampaignMemberRequest, AnalyticsPeriod, CancelOrderRequest,
    ChangeLeadStatusRequest, ChangeOpportunityStageRequest, ConvertLeadRequest,
    ConvertedOpportunity, CreateAccountRequest, CreateContactRequest, ExternalRef,
    GetCampaignRoiRequest, GetChurnRequest, GetCustomerValueRequest, GetLeadConversionRequest,
    GetNpsRequest, GetPredictiveClvRequest, GetRetentionCohortsRequest, GetRevenueRequest,
    GetRfmRequest, IssueRefundRequest, MarkAccountChurnedRequest, OrderLine, PersonName,
    PlanCampaignRequest, QueryOptions, RecordCampaignCostRequest, RecordCampaignResponseRequest,
    RecordNpsResponseRequest, RecordOrderRequest, RecordPaymentRequest, WinOpportunityRequest,
};
use tonic::Code;

use crate::support::{TestApp, at, bad_fields, cny};

/// Waits until every stored event (including those the process managers
/// append) is in the analytics read model; returns the options to query at.
async fn caught_up(app: &TestApp, lifecycle_events: usize) -> Option<QueryOptions> {
    crm_test_support::eventually(Duration::from_secs(20), "the lifecycle events", || async {
        let n = app
            .stored()
            .await
            .iter()
            .filter(|(t, _, _)| t == "AccountBecameCustomer")
            .count();
        (n >= lifecycle_events).then_some(())
    })
    .await;
    let head: i64 = app
        .db
        .client()
        .await
        .query_one("SELECT max(global_position) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    Some(QueryOptions {
        min_position: head as u64,
    })
}

async fn account(app: &TestApp, name: &str) -> String {
    app.accounts()
        .create_account(app.request(CreateAccountRequest {
            options: at("2025-12-01T00:00:00Z"),
            kind: AccountKind::Company.into(),
            name: name.into(),
            segment: "smb".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id
}

/// A paid order of `net` CNY (one line, with its cost when given) at `when`.
async fn paid_order(
    app: &TestApp,
    account: &str,
    id: &str,
    when: &str,
    net: i64,
    cost: Option<i64>,
) -> String {
    paid_order_in(app, account, id, when, net, cost, cny).await
}

/// [`paid_order`] in the currency `money` makes.
async fn paid_order_in(
    app: &TestApp,
    account: &str,
    id: &str,
    when: &str,
    net: i64,
    cost: Option<i64>,
    money: fn(i64) -> Option<crm_proto::v1::Money>,
) -> String {
    let cny = money;
    app.commerce()
        .record_order(app.erp(RecordOrderRequest {
            options: at(when),
            external: Some(ExternalRef {
                source: "erp".into(),
                external_id: id.into(),
                external_version: 1,
            }),
            account_id: account.into(),
            customer_ref: format!("C-{account}"),
            status: "paid".into(),
            lines: vec![OrderLine {
                sku: "A".into(),
                quantity: 1,
                unit_price: cny(net),
                line_total: cny(net),
                line_cost: cost.and_then(cny),
            }],
            net: cny(net),
            tax: cny(0),
            gross: cny(net),
            ordered_on: when[..10].into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .stream_id
}

async fn churn(app: &TestApp, account: &str, when: &str) {
    app.accounts()
        .mark_account_churned(app.request(MarkAccountChurnedRequest {
            options: at(when),
            account_id: account.into(),
            reason: "cancelled".into(),
        }))
        .await
        .unwrap();
}

fn period(from: &str, to: &str) -> Option<AnalyticsPeriod> {
    Some(AnalyticsPeriod {
        from: from.into(),
        to: to.into(),
    })
}

/// A customer is one at `t` when a spell [start, end) holds `t`, at both
/// ends of a month: a churn exactly at a month's end is that month's.
#[tokio::test]
async fn a_churn_exactly_at_a_month_end_counts_in_that_month() {
    let app = TestApp::spawn().await;
    let a1 = account(&app, "A1").await;
    let a2 = account(&app, "A2").await;
    paid_order(&app, &a1, "O1", "2026-01-05T10:00:00Z", 1_000, None).await;
    paid_order(&app, &a2, "O2", "2026-01-06T10:00:00Z", 1_000, None).await;
    caught_up(&app, 2).await;
    churn(&app, &a1, "2026-03-01T00:00:00Z").await;
    let options = caught_up(&app, 2).await;
    let churned = churn_in(&app, options, "2026-02", "2026-03").await;
    let months: Vec<(String, u64, u64)> = churned
        .months
        .iter()
        .map(|m| (m.month.clone(), m.customers_at_start, m.churned))
        .collect();
    assert_eq!(
        months,
        [("2026-02".to_owned(), 2, 1), ("2026-03".to_owned(), 1, 0)]
    );
    app.stop().await;
}

/// GetChurn for the months `from` to `to` (`YYYY-MM`).
async fn churn_in(
    app: &TestApp,
    options: Option<QueryOptions>,
    from: &str,
    to: &str,
) -> crm_proto::v1::Churn {
    AnalyticsQueriesClient::new(app.channel.clone())
        .get_churn(app.request(GetChurnRequest {
            options,
            from_month: from.into(),
            to_month: to.into(),
        }))
        .await
        .unwrap()
        .into_inner()
}

/// GetRevenue for January 2026, its first currency.
async fn january_revenue(
    app: &TestApp,
    options: Option<QueryOptions>,
) -> crm_proto::v1::CurrencyRevenue {
    revenue_from_january(app, options, "2026-02-01T00:00:00Z").await
}

/// GetRevenue from January 2026 until `to`, its first currency.
async fn revenue_from_january(
    app: &TestApp,
    options: Option<QueryOptions>,
    to: &str,
) -> crm_proto::v1::CurrencyRevenue {
    let revenue = AnalyticsQueriesClient::new(app.channel.clone())
        .get_revenue(app.request(GetRevenueRequest {
            options,
            period: period("2026-01-01T00:00:00Z", to),
        }))
        .await
        .unwrap()
        .into_inner();
    revenue.currencies[0].clone()
}

/// GetRfm as of 2026-03-01, every segment, the first page.
async fn rfm_on_march_1st(app: &TestApp, options: Option<QueryOptions>) -> crm_proto::v1::Rfm {
    AnalyticsQueriesClient::new(app.channel.clone())
        .get_rfm(app.request(GetRfmRequest {
            options,
            as_of: "2026-03-01T00:00:00Z".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
}

/// RFM never adds or compares amounts in different currencies: an account's
/// monetary value is in its main currency (most orders), scored against the
/// buyers of that currency.
#[tokio::test]
async fn rfm_keeps_each_currency_apart() {
    let app = TestApp::spawn().await;
    let (x, y) = (account(&app, "X").await, account(&app, "Y").await);
    paid_order(&app, &x, "X1", "2026-01-05T10:00:00Z", 1_000, None).await;
    paid_order(&app, &x, "X2", "2026-01-06T10:00:00Z", 2_000, None).await;
    let eur = crate::support::eur;
    paid_order_in(&app, &x, "X3", "2026-01-07T10:00:00Z", 900_000, None, eur).await;
    paid_order_in(&app, &y, "Y1", "2026-01-08T10:00:00Z", 50, None, eur).await;
    let options = caught_up(&app, 2).await;
    let rfm = rfm_on_march_1st(&app, options).await;
    let scores: Vec<(String, String, u32, i64, u32)> = rfm
        .accounts
        .iter()
        .map(|s| {
            let who = if s.account_id == x { "X" } else { "Y" };
            (
                who.to_owned(),
                s.currency.clone(),
                s.frequency,
                s.monetary_minor,
                s.m,
            )
        })
        .collect();
    let mut expected = vec![
        ("X".to_owned(), "CNY".to_owned(), 3, 3_000, 1),
        ("Y".to_owned(), "EUR".to_owned(), 1, 50, 1),
    ];
    if y < x {
        expected.reverse();
    }
    assert_eq!(scores, expected);
    app.stop().await;
}

/// Purchase frequency counts the orders of buying customers: an ERP order
/// linked to no account adds to revenue and orders, not to frequency.
#[tokio::test]
async fn unlinked_orders_do_not_inflate_purchase_frequency() {
    let app = TestApp::spawn().await;
    let a1 = account(&app, "A1").await;
    paid_order(&app, &a1, "O1", "2026-01-05T10:00:00Z", 1_000, None).await;
    paid_order(&app, &a1, "O2", "2026-01-06T10:00:00Z", 1_000, None).await;
    paid_order(&app, "", "O3", "2026-01-07T10:00:00Z", 1_000, None).await;
    let options = caught_up(&app, 1).await;
    let january = january_revenue(&app, options).await;
    assert_eq!(
        (
            january.net_revenue_minor,
            january.paid_orders,
            january.buying_customers,
            january.purchase_frequency_milli
        ),
        (3_000, 3, 1, 2_000)
    );
    app.stop().await;
}

#[tokio::test]
async fn churn_revenue_value_cohorts_and_rfm_follow_the_formulas() {
    let app = TestApp::spawn().await;
    let a1 = account(&app, "A1").await;
    let a2 = account(&app, "A2").await;
    let a3 = account(&app, "A3").await;
    let a4 = account(&app, "A4").await;
    let a5 = account(&app, "A5").await;
    // January: A1..A4 buy (A4's order is cancelled the next day); A2 gets
    // 500 of its 2,000 back. February: A1 buys again, A5 buys for the first
    // time; A1 churns on the 15th. March: A2 churns on the 20th.
    paid_order(&app, &a1, "O1", "2026-01-05T10:00:00Z", 1_000, Some(600)).await;
    let o3 = paid_order(&app, &a2, "O3", "2026-01-06T10:00:00Z", 2_000, None).await;
    paid_order(&app, &a3, "O4", "2026-01-07T10:00:00Z", 5_000, None).await;
    paid_order(&app, &a4, "O5", "2026-01-08T10:00:00Z", 4_000, None).await;
    app.commerce()
        .cancel_order(app.erp(CancelOrderRequest {
            options: at("2026-01-09T10:00:00Z"),
            external: Some(ExternalRef {
                source: "erp".into(),
                external_id: "O5".into(),
                external_version: 2,
            }),
            reason: "cancelled".into(),
        }))
        .await
        .unwrap();
    app.commerce()
        .record_payment(app.erp(RecordPaymentRequest {
            options: at("2026-01-10T10:00:00Z"),
            external: Some(ExternalRef {
                source: "erp".into(),
                external_id: "P1".into(),
                external_version: 1,
            }),
            account_id: a2.clone(),
            amount: cny(2_000),
            order_ids: vec![o3],
            paid_on: "2026-01-10".into(),
        }))
        .await
        .unwrap();
    app.commerce()
        .issue_refund(app.erp(IssueRefundRequest {
            options: at("2026-01-20T10:00:00Z"),
            payment: Some(ExternalRef {
                source: "erp".into(),
                external_id: "P1".into(),
                external_version: 1,
            }),
            amount: cny(500),
            refund_id: "R1".into(),
            refunded_on: "2026-01-20".into(),
        }))
        .await
        .unwrap();
    paid_order(&app, &a1, "O2", "2026-02-10T10:00:00Z", 3_000, Some(1_000)).await;
    paid_order(&app, &a5, "O6", "2026-02-03T10:00:00Z", 1_500, None).await;
    // Each account became a customer with its first paid order (the
    // lifecycle process manager): wait for all five before churning two.
    caught_up(&app, 5).await;
    churn(&app, &a1, "2026-02-15T10:00:00Z").await;
    churn(&app, &a2, "2026-03-20T10:00:00Z").await;
    let options = caught_up(&app, 5).await;
    let stored = app.stored().await;
    let triggers: Vec<&str> = stored
        .iter()
        .filter(|(t, _, _)| t == "AccountBecameCustomer")
        .map(|(_, p, _)| p["trigger"].as_str().unwrap())
        .collect();
    assert_eq!(triggers, ["first_order"; 5]);

    let mut analytics = AnalyticsQueriesClient::new(app.channel.clone());
    // Churn. January: nobody was a customer on Jan 1. February: A1..A4 were
    // (A5 was won in February and does not count); A1 left: 1/4. March: A2,
    // A3, A4, A5; A2 left: 1/4. Compound: 1 − 0.75 × 0.75 = 43.75 %.
    let churned = churn_in(&app, options, "2026-01", "2026-03").await;
    let months: Vec<(String, u64, u64, Option<u32>)> = churned
        .months
        .iter()
        .map(|m| (m.month.clone(), m.customers_at_start, m.churned, m.churn_bp))
        .collect();
    assert_eq!(
        months,
        [
            ("2026-01".to_owned(), 0, 0, None),
            ("2026-02".to_owned(), 4, 1, Some(2_500)),
            ("2026-03".to_owned(), 4, 1, Some(2_500)),
        ]
    );
    assert_eq!(churned.compound_churn_bp, 4_375);

    // Revenue in January: 1,000 + 2,000 + 5,000 (A4's cancelled) − 500
    // refunded = 7,500 over 3 orders from 3 customers.
    let january = january_revenue(&app, options).await;
    assert_eq!(
        (
            january.net_revenue_minor,
            january.paid_orders,
            january.buying_customers,
            january.average_order_value_minor,
            january.purchase_frequency_milli,
            january.repeat_purchase_bp
        ),
        (7_500, 3, 3, 2_500, 1_000, 0)
    );
    // January and February: + 3,000 (A1) + 1,500 (A5) = 12,000 over 5
    // orders from 4 customers: AOV 2,400, 1.25 orders each, 1 of 4 repeat.
    let both = &revenue_from_january(&app, options, "2026-03-01T00:00:00Z").await;
    assert_eq!(
        (
            both.net_revenue_minor,
            both.paid_orders,
            both.buying_customers,
            both.average_order_value_minor,
            both.purchase_frequency_milli,
            both.repeat_purchase_bp
        ),
        (12_000, 5, 4, 2_400, 1_250, 2_500)
    );

    // Historical CLV: A1 4,000 net, costs known (600 + 1,000): margin 2,400.
    // A2: 2,000 − 500 refunded, cost unknown: 1,500.
    let value = |account: String| {
        let mut analytics = analytics.clone();
        let request = app.request(GetCustomerValueRequest {
            options,
            account_id: account,
        });
        async move {
            analytics
                .get_customer_value(request)
                .await
                .unwrap()
                .into_inner()
                .values
        }
    };
    let v1 = value(a1.clone()).await;
    assert_eq!(
        (
            v1[0].net_revenue_minor,
            v1[0].margin_minor,
            v1[0].paid_orders,
            v1[0].historical_clv_minor
        ),
        (4_000, Some(2_400), 2, 2_400)
    );
    let v2 = value(a2.clone()).await;
    assert_eq!(
        (
            v2[0].net_revenue_minor,
            v2[0].margin_minor,
            v2[0].historical_clv_minor
        ),
        (1_500, None, 1_500)
    );

    // Retention: the January cohort is A1..A4 (4). Buying in January: A1,
    // A2, A3 (A4's order was cancelled): 75 %; in February: A1: 25 %; March: 0.
    let cohorts = analytics
        .get_retention_cohorts(app.request(GetRetentionCohortsRequest {
            options,
            from_month: "2026-01".into(),
            to_month: "2026-01".into(),
            horizon: 2,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cohorts.cohorts[0].size, 4);
    assert_eq!(cohorts.cohorts[0].retained_bp, [7_500, 2_500, 0]);

    // RFM on March 1st over the year before (whole days since the last
    // order, rounded down): A1 (18, 2 orders, 4,000), A2 (53, 1, 1,500 net of
    // its refund), A3
    // (52, 1, 5,000), A5 (25, 1, 1,500). Four buyers fill quintiles 1-4: A1 is the most recent and the
    // most frequent (R 4, F 4): a champion; nobody else reaches F ≥ 3 with
    // R ≤ 2 (A2: R 1, A3: R 2, F 1 or 2).
    let rfm = rfm_on_march_1st(&app, options).await;
    let segments: Vec<(String, u64)> = rfm
        .segments
        .iter()
        .map(|s| (s.segment.clone(), s.accounts))
        .collect();
    assert_eq!(
        segments,
        [("champions".to_owned(), 1), ("other".to_owned(), 3)]
    );
    let first = rfm.accounts.iter().find(|s| s.account_id == a1).unwrap();
    assert_eq!(
        (
            first.recency_days,
            first.frequency,
            first.monetary_minor,
            first.r,
            first.f,
            &*first.segment
        ),
        (18, 2, 4_000, 4, 4, "champions")
    );
    // A2's monetary value is net of the 500 refunded.
    let a2_score = rfm.accounts.iter().find(|s| s.account_id == a2).unwrap();
    assert_eq!(
        (a2_score.recency_days, a2_score.r, a2_score.monetary_minor),
        (53, 1, 1_500)
    );
    // Pages of one, in account order, cover the same four.
    let mut token = String::new();
    let mut seen = Vec::new();
    loop {
        let page = analytics
            .get_rfm(app.request(GetRfmRequest {
                options,
                as_of: "2026-03-01T00:00:00Z".into(),
                page_size: 1,
                page_token: token.clone(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.accounts.into_iter().map(|s| s.account_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut expected = vec![a1.clone(), a2.clone(), a3.clone(), a5.clone()];
    expected.sort();
    assert_eq!(seen, expected);

    // Predictive CLV as of April 1st (January to March measured) for the
    // "smb" segment: 5 orders, 12,000 net (refunds are not in AOV: 12,500 /
    // 5 = 2,500), 4 customers → 1.25 orders a year; margin where costs are
    // known: (4,000 − 1,600) / 4,000 = 60 %; churn 43.75 % → lifespan
    // 1 / 0.4375 years. CLV = 2,500 × 1.25 × 0.6 ÷ 0.4375 = 4,285 (down).
    let clv = analytics
        .get_predictive_clv(app.request(GetPredictiveClvRequest {
            options,
            as_of: "2026-04-01T00:00:00Z".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let smb = &clv.segments[0];
    assert_eq!(
        (
            smb.segment.as_str(),
            smb.customers,
            smb.average_order_value_minor,
            smb.orders_per_year_milli,
            smb.margin_bp,
            smb.annual_churn_bp,
            smb.predictive_clv_minor
        ),
        ("smb", 4, 2_500, 1_250, 6_000, 4_375, 4_285)
    );
    let _ = a4;
    app.stop().await;
}

#[tokio::test]
async fn example_a_attribution_gives_campaign_roi_14_and_a_customer() {
    let app = TestApp::spawn().await;
    let (_, pipeline_id) = crate::opportunities::setup(&app).await;
    let plan = |name: &str, parent: &str| PlanCampaignRequest {
        options: at("2026-01-01T00:00:00Z"),
        name: name.into(),
        r#type: "webinar".into(),
        channel: "email".into(),
        parent_id: parent.into(),
        starts_on: "2026-01-01".into(),
        ends_on: "2026-03-31".into(),
        budget: cny(5_000_000),
        ..Default::default()
    };
    let c = app
        .campaigns()
        .plan_campaign(app.request(plan("C", "")))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let d = app
        .campaigns()
        .plan_campaign(app.request(plan("D (follow-up)", &c)))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    // Step 1: C costs 20,000.00; L is captured from C and responds to it;
    // later it also responds to C's child D.
    app.campaigns()
        .record_campaign_cost(app.request(RecordCampaignCostRequest {
            options: at("2026-01-02T00:00:00Z"),
            campaign_id: c.clone(),
            amount: cny(2_000_000),
            spent_on: "2026-01-02".into(),
            source: "invoice".into(),
        }))
        .await
        .unwrap();
    let mut captured = crate::leads::li_wei("li@example.cn", "Wei Trading");
    captured.options = at("2026-01-10T00:00:00Z");
    captured.source.as_mut().unwrap().campaign_id = c.clone();
    captured.consent = vec![crate::leads::email_consent()];
    let lead = app
        .leads()
        .capture_lead(app.request(captured))
        .await
        .unwrap()
        .into_inner()
        .stream_id;
    let mut other = crate::leads::li_wei("other@example.cn", "Other Trading");
    other.options = at("2026-01-11T00:00:00Z");
    app.leads().capture_lead(app.request(other)).await.unwrap();
    for (campaign, when) in [(&c, "2026-01-12T00:00:00Z"), (&d, "2026-01-15T00:00:00Z")] {
        app.campaigns()
            .add_campaign_member(app.request(AddCampaignMemberRequest {
                options: at(when),
                campaign_id: campaign.clone(),
                lead_id: lead.clone(),
                ..Default::default()
            }))
            .await
            .unwrap();
        app.campaigns()
            .record_campaign_response(app.request(RecordCampaignResponseRequest {
                options: at(when),
                campaign_id: campaign.clone(),
                lead_id: lead.clone(),
                response: "registered".into(),
                ..Default::default()
            }))
            .await
            .unwrap();
    }
    for (to, when) in [
        ("working", "2026-01-16T00:00:00Z"),
        ("qualified", "2026-01-17T00:00:00Z"),
    ] {
        app.leads()
            .change_lead_status(app.request(ChangeLeadStatusRequest {
                options: at(when),
                lead_id: lead.clone(),
                status: to.into(),
                ..Default::default()
            }))
            .await
            .unwrap();
    }
    // Step 2: one append opens the 300,000.00 deal. Step 3: proposal, won.
    let converted = app
        .leads()
        .convert_lead(app.request(ConvertLeadRequest {
            options: at("2026-01-20T00:00:00Z"),
            lead_id: lead.clone(),
            account_id: String::new(),
            opportunity: Some(ConvertedOpportunity {
                name: "O".into(),
                pipeline_id,
                stage: "qualification".into(),
                amount: cny(30_000_000),
                close_date: "2026-03-31".into(),
                owner: "user:r".into(),
            }),
        }))
        .await
        .unwrap()
        .into_inner();
    app.opportunities()
        .change_opportunity_stage(app.request(ChangeOpportunityStageRequest {
            options: at("2026-01-25T00:00:00Z"),
            opportunity_id: converted.opportunity_id.clone(),
            stage: "proposal".into(),
        }))
        .await
        .unwrap();
    app.opportunities()
        .win_opportunity(app.request(WinOpportunityRequest {
            options: at("2026-01-30T00:00:00Z"),
            opportunity_id: converted.opportunity_id.clone(),
        }))
        .await
        .unwrap();
    // †: the account became a customer with the won deal.
    let options = caught_up(&app, 1).await;
    let stored = app.stored().await;
    let (_, became, meta) = stored
        .iter()
        .find(|(t, _, _)| t == "AccountBecameCustomer")
        .unwrap();
    assert_eq!(became["trigger"], "first_won_deal");
    assert_eq!(became["occurred_at"], "2026-01-30T00:00:00Z");
    assert_eq!(meta["actor"], "system:lifecycle");

    let mut analytics = AnalyticsQueriesClient::new(app.channel.clone());
    let roi = |campaign: &str, attribution: &str| {
        let mut analytics = analytics.clone();
        let request = app.request(GetCampaignRoiRequest {
            options,
            campaign_id: campaign.into(),
            attribution: attribution.into(),
        });
        async move {
            analytics
                .get_campaign_roi(request)
                .await
                .unwrap()
                .into_inner()
        }
    };
    // ROI of C (with D) = (300,000 − 20,000) ÷ 20,000 = 14, either way:
    // the first touch is C (the lead's source), the last D, inside C's tree.
    for attribution in ["", "first_touch", "last_touch"] {
        let c_roi = roi(&c, attribution).await;
        assert_eq!(
            (
                c_roi.campaigns,
                c_roi.cost_minor,
                c_roi.attributed_revenue_minor,
                c_roi.attributed_deals,
                c_roi.roi_bp
            ),
            (2, 2_000_000, 30_000_000, 1, Some(140_000)),
            "{attribution}"
        );
    }
    // D alone costs nothing: ROI undefined; it earns the deal only last-touch.
    let d_first = roi(&d, "first_touch").await;
    assert_eq!(
        (d_first.attributed_revenue_minor, d_first.roi_bp),
        (0, None)
    );
    let d_last = roi(&d, "last_touch").await;
    assert_eq!(
        (d_last.attributed_revenue_minor, d_last.roi_bp),
        (30_000_000, None)
    );

    // Lead → customer: of January's two leads, one's account became a
    // customer within 180 days: 50 %.
    let conversion = analytics
        .get_lead_conversion(app.request(GetLeadConversionRequest {
            options,
            from_month: "2026-01".into(),
            to_month: "2026-01".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let january = &conversion.months[0];
    assert_eq!(
        (january.leads, january.customers, january.conversion_bp),
        (2, 1, 5_000)
    );

    // NPS: latest answers 10, 9, 7, 3 and 10 (the fifth contact first said 2):
    // 3 promoters, 1 passive, 1 detractor of 5: (3 − 1) ÷ 5 = 40.
    let mut last = 0;
    for (n, scores) in [vec![10], vec![9], vec![7], vec![3], vec![2, 10]]
        .into_iter()
        .enumerate()
    {
        let contact = app
            .contacts()
            .create_contact(app.request(CreateContactRequest {
                name: Some(PersonName {
                    given: format!("P{n}"),
                    family: String::new(),
                }),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .stream_id;
        for (i, score) in scores.into_iter().enumerate() {
            last = app
                .contacts()
                .record_nps_response(app.request(RecordNpsResponseRequest {
                    options: at(&format!("2026-02-0{}T00:00:00Z", i + 1)),
                    contact_id: contact.clone(),
                    score,
                    comment: String::new(),
                }))
                .await
                .unwrap()
                .into_inner()
                .global_position;
        }
    }
    let nps = analytics
        .get_nps(app.request(GetNpsRequest {
            options: Some(QueryOptions { min_position: last }),
            period: period("2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            nps.responses,
            nps.promoters,
            nps.passives,
            nps.detractors,
            nps.nps_bp
        ),
        (5, 3, 1, 1, Some(4_000))
    );
    // Nothing answered in January.
    let none = analytics
        .get_nps(app.request(GetNpsRequest {
            options: None,
            period: period("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((none.responses, none.nps_bp), (0, None));
    app.stop().await;
}

#[tokio::test]
async fn bad_analytics_queries_name_their_field() {
    let app = TestApp::spawn().await;
    let mut analytics = AnalyticsQueriesClient::new(app.channel.clone());
    let invalid = |status: tonic::Status| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        bad_fields(&status)
    };
    let status = analytics
        .get_nps(app.request(GetNpsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(invalid(status), ["period"]);
    let status = analytics
        .get_revenue(app.request(GetRevenueRequest {
            period: period("yesterday", "2026-01-01T00:00:00Z"),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(invalid(status), ["period.from"]);
    // Before 1900: INVALID_ARGUMENT by name, not a database error
    // (PostgreSQL refuses years before 4713 BC) reported as UNAVAILABLE.
    let status = analytics
        .get_nps(app.request(GetNpsRequest {
            period: period("-009999-01-03T00:00:00Z", "-009999-02-01T00:00:00Z"),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(invalid(status), ["period.from"]);
    let status = analytics
        .get_revenue(app.request(GetRevenueRequest {
            period: period("2026-02-01T00:00:00Z", "2026-01-01T00:00:00Z"),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(invalid(status), ["period.to"]);
    for (from, to, field) in [
        ("2026-13", "2026-12", "from_month"),
        ("2026-1", "2026-12", "from_month"),
        ("2026-03", "2026-01", "to_month"),
        ("2000-01", "2026-01", "to_month"),
        // The month after December 9999 does not exist: refused by name,
        // not answered as an empty month.
        ("2026-01", "9999-12", "to_month"),
        ("0000-01", "2026-01", "from_month"),
    ] {
        let status = analytics
            .get_churn(app.request(GetChurnRequest {
                options: None,
                from_month: from.into(),
                to_month: to.into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(invalid(status), [field], "{from} {to}");
    }
    let status = analytics
        .get_retention_cohorts(app.request(GetRetentionCohortsRequest {
            from_month: "2026-01".into(),
            to_month: "2026-02".into(),
            horizon: 30,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(invalid(status), ["horizon"]);
    let status = analytics
        .get_campaign_roi(app.request(GetCampaignRoiRequest {
            campaign_id: "C".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(invalid(status), ["campaign_id"]);
    let status = analytics
        .get_campaign_roi(app.request(GetCampaignRoiRequest {
            campaign_id: uuid::Uuid::now_v7().to_string(),
            attribution: "middle_touch".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(invalid(status), ["attribution"]);
    let status = analytics
        .get_campaign_roi(app.request(GetCampaignRoiRequest {
            campaign_id: uuid::Uuid::now_v7().to_string(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = analytics
        .get_customer_value(app.request(GetCustomerValueRequest {
            account_id: uuid::Uuid::now_v7().to_string(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    for (request, field) in [
        (
            GetRfmRequest {
                as_of: "now".into(),
                ..Default::default()
            },
            "as_of",
        ),
        // Far in the past: refused by name (it used to panic the handler
        // computing a year before it).
        (
            GetRfmRequest {
                as_of: "-009999-06-01T00:00:00Z".into(),
                ..Default::default()
            },
            "as_of",
        ),
        (
            GetRfmRequest {
                as_of: "2026-03-01T00:00:00Z".into(),
                segment: "whales".into(),
                ..Default::default()
            },
            "segment",
        ),
        (
            GetRfmRequest {
                as_of: "2026-03-01T00:00:00Z".into(),
                page_size: 500,
                ..Default::default()
            },
            "page_size",
        ),
        (
            GetRfmRequest {
                as_of: "2026-03-01T00:00:00Z".into(),
                page_token: "x".into(),
                ..Default::default()
            },
            "page_token",
        ),
    ] {
        let status = analytics.get_rfm(app.request(request)).await.unwrap_err();
        assert_eq!(invalid(status), [field]);
    }
    // Another tenant's customer value is not found, not leaked.
    let account = account(&app, "Mine").await;
    let status = analytics
        .get_customer_value(crate::support::as_caller(
            GetCustomerValueRequest {
                account_id: account,
                ..Default::default()
            },
            Some("someone-else"),
            Some("user:eve"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    app.stop().await;
}
