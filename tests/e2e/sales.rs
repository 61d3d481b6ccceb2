//! `crm.v1.SalesQueries` beyond the board (DOMAIN.md §5.1): funnel, stage
//! durations, sales cycle, velocity, loss reasons, lead funnel, target
//! attainment, commission statements and the leaderboard. Each scenario is
//! fed through the command API in business time (`options.occurred_at`) and
//! read with `min_position` = the last command's position; the figures are
//! worked out by hand in the comments.
use crm_proto::v1::sales_queries_client::SalesQueriesClient;
use crm_proto::v1::{
    AllocateSalesTargetRequest, CaptureLeadRequest, ChangeLeadStatusRequest, CommissionTier,
    ConvertLeadRequest, ConvertedOpportunity, FunnelCohort, GetAttainmentRequest,
    GetCommissionStatementRequest, GetFunnelRequest, GetLeadFunnelRequest, GetLeaderboardRequest,
    GetLossReasonsRequest, GetSalesCycleRequest, GetStageDurationsRequest, GetVelocityRequest,
    LeadSource, Money, PublishCommissionPlanRequest, PublishTeamRequest,
    PublishTenantSettingsRequest, QueryOptions, Reason, ReopenOpportunityRequest,
    SalesDurationStats, SalesFiscalPeriod, WinOpportunityRequest,
};
use tonic::Code;
use tonic::transport::Channel;

use crate::configuration::with_roles;
use crate::opportunities::{deal, setup, to_stage};
use crate::support::{TestApp, as_caller, at, bad_fields};

const DAY: i64 = 86_400;

fn read(min_position: u64) -> Option<QueryOptions> {
    Some(QueryOptions { min_position })
}

/// A request from a tenant with nothing in it.
fn other_tenant<T>(message: T) -> tonic::Request<T> {
    as_caller(message, Some("t-other-sales"), Some("user:ada"))
}

fn sales(app: &TestApp) -> SalesQueriesClient<Channel> {
    SalesQueriesClient::new(app.channel.clone())
}

fn money(amount_minor: i64, currency: &str) -> Option<Money> {
    Some(Money {
        amount_minor,
        currency: currency.into(),
    })
}

fn fiscal(fiscal_year: u32, quarter: u32, month: u32) -> Option<SalesFiscalPeriod> {
    Some(SalesFiscalPeriod {
        fiscal_year,
        quarter,
        month,
    })
}

/// The commands of a scenario, each at its business time; remembers the
/// last position reached.
struct Deals<'a> {
    app: &'a TestApp,
    account: String,
    pipeline: String,
    last: u64,
}

impl Deals<'_> {
    fn seen(&mut self, position: u64) {
        self.last = self.last.max(position);
    }

    async fn open(
        &mut self,
        stage: &str,
        owner: &str,
        minor: i64,
        currency: &str,
        when: &str,
    ) -> String {
        let mut request = deal(&self.account, &self.pipeline);
        request.stage = stage.into();
        request.owner = owner.into();
        request.amount = money(minor, currency);
        request.options = at(when);
        let reply = self
            .app
            .opportunities()
            .open_opportunity(self.app.request(request))
            .await
            .unwrap()
            .into_inner();
        self.seen(reply.global_position);
        reply.stream_id
    }

    async fn stage(&mut self, id: &str, stage: &str, when: &str) {
        let mut request = to_stage(id, stage);
        request.options = at(when);
        let reply = self
            .app
            .opportunities()
            .change_opportunity_stage(self.app.request(request))
            .await
            .unwrap()
            .into_inner();
        self.seen(reply.global_position);
    }

    async fn win(&mut self, id: &str, when: &str) {
        let reply = self
            .app
            .opportunities()
            .win_opportunity(self.app.request(WinOpportunityRequest {
                options: at(when),
                opportunity_id: id.into(),
            }))
            .await
            .unwrap()
            .into_inner();
        self.seen(reply.global_position);
    }

    async fn lose(&mut self, id: &str, reason: &str, when: &str) {
        let reply = self
            .app
            .opportunities()
            .lose_opportunity(
                self.app
                    .request(crate::opportunities::lost(id, reason, at(when))),
            )
            .await
            .unwrap()
            .into_inner();
        self.seen(reply.global_position);
    }

    /// Reopening a won deal needs a sales manager.
    async fn reopen(&mut self, id: &str, stage: &str, when: &str) {
        let request = ReopenOpportunityRequest {
            options: at(when),
            opportunity_id: id.into(),
            stage: stage.into(),
        };
        let reply = self
            .app
            .opportunities()
            .reopen_opportunity(with_roles(self.app, request, "sales_manager"))
            .await
            .unwrap()
            .into_inner();
        self.seen(reply.global_position);
    }

    async fn team(&mut self, id: &str, members: &[&str], when: &str) -> String {
        self.team_under(id, "", members, when).await
    }

    /// A team (a new one when `id` is empty) under `parent` (none when
    /// empty); returns its id.
    async fn team_under(&mut self, id: &str, parent: &str, members: &[&str], when: &str) -> String {
        let request = PublishTeamRequest {
            options: at(when),
            team_id: id.into(),
            name: "East".into(),
            parent_id: parent.into(),
            manager: "user:m".into(),
            members: members.iter().map(|m| (*m).to_owned()).collect(),
        };
        let reply = self
            .app
            .configuration()
            .publish_team(with_roles(self.app, request, "sales_manager"))
            .await
            .unwrap()
            .into_inner();
        self.seen(reply.global_position);
        reply.stream_id
    }

    async fn target(&mut self, node: &str, parent: &str, quarter: u32, minor: i64) {
        let request = AllocateSalesTargetRequest {
            options: None,
            fiscal_year: 2026,
            metric: "bookings".into(),
            node: node.into(),
            parent: parent.into(),
            quarter,
            month: 0,
            amount: money(minor, "CNY"),
        };
        let reply = self
            .app
            .configuration()
            .allocate_sales_target(with_roles(self.app, request, "sales_manager"))
            .await
            .unwrap()
            .into_inner();
        self.seen(reply.global_position);
    }

    async fn lead(&mut self, email: &str, channel: &str, when: &str) -> String {
        let request = CaptureLeadRequest {
            options: at(when),
            source: Some(LeadSource {
                channel: channel.into(),
                ..LeadSource::default()
            }),
            ..crate::leads::li_wei(email, "Wei Trading")
        };
        let reply = self
            .app
            .leads()
            .capture_lead(self.app.request(request))
            .await
            .unwrap()
            .into_inner();
        self.seen(reply.global_position);
        reply.stream_id
    }

    async fn lead_status(&mut self, id: &str, status: &str, when: &str) {
        let reason = (status == "disqualified").then(|| Reason {
            code: "no_fit".into(),
            text: String::new(),
        });
        let reply = self
            .app
            .leads()
            .change_lead_status(self.app.request(ChangeLeadStatusRequest {
                options: at(when),
                lead_id: id.into(),
                status: status.into(),
                reason,
            }))
            .await
            .unwrap()
            .into_inner();
        self.seen(reply.global_position);
    }

    /// Converts a qualified lead with a deal in `qualification`; returns the
    /// deal.
    async fn convert(
        &mut self,
        lead: &str,
        owner: &str,
        minor: i64,
        currency: &str,
        when: &str,
    ) -> String {
        let reply = self
            .app
            .leads()
            .convert_lead(self.app.request(ConvertLeadRequest {
                options: at(when),
                lead_id: lead.into(),
                account_id: String::new(),
                opportunity: Some(ConvertedOpportunity {
                    name: "First order".into(),
                    pipeline_id: self.pipeline.clone(),
                    stage: "qualification".into(),
                    amount: money(minor, currency),
                    close_date: "2026-12-31".into(),
                    owner: owner.into(),
                }),
            }))
            .await
            .unwrap()
            .into_inner();
        self.seen(reply.global_position);
        reply.opportunity_id
    }
}

async fn scenario(app: &TestApp) -> Deals<'_> {
    let (account, pipeline) = setup(app).await;
    Deals {
        app,
        account,
        pipeline,
        last: 0,
    }
}

/// (stage, deals reaching it, conversion to the next step) of a cohort.
fn steps(cohort: &FunnelCohort) -> Vec<(&str, u64, Option<u32>)> {
    cohort
        .steps
        .iter()
        .map(|s| (s.stage.as_str(), s.deals, s.conversion_bp))
        .collect()
}

fn durations(stats: Option<SalesDurationStats>) -> (u64, i64, i64, i64) {
    let stats = stats.unwrap();
    (
        stats.count,
        stats.mean_seconds,
        stats.median_seconds,
        stats.p90_seconds,
    )
}

/// DOMAIN.md §8 example A, with the tenant's fiscal year starting in April
/// in Asia/Shanghai (UTC+8): FY2026 Q1 is [2026-03-31T16:00Z,
/// 2026-06-30T16:00Z). Rep R: target 1,000,000.00 CNY for Q1, 900,000.00
/// already won, then the lead's 300,000.00 deal is won: attainment 120 %,
/// commission 40,000.00, the deal's line 13,000.00. Reopening it within
/// the plan's 30-day clawback is a negative line; reopening an older win
/// after 30 days only lowers attainment.
#[tokio::test]
async fn worked_example_a_attainment_and_commission_with_a_clawback() {
    let app = TestApp::spawn_with(|config| config.query_min_position_wait_ms = 10_000).await;
    let mut s = scenario(&app).await;
    let settings = PublishTenantSettingsRequest {
        fiscal_year_start_month: 4,
        ..crate::support::tenant_settings("Asia/Shanghai", "CNY")
    };
    app.configuration()
        .publish_tenant_settings(with_roles(&app, settings, "admin"))
        .await
        .unwrap();
    let team = s
        .team("", &["user:r", "user:s"], "2026-03-01T00:00:00Z")
        .await;
    let team_node = format!("team:{team}");
    // FY2026 bookings: company (year) → team (Q1) → reps (Q1).
    s.target("company", "", 0, 400_000_000).await;
    s.target(&team_node, "company", 1, 150_000_000).await;
    s.target("user:r", &team_node, 1, 100_000_000).await;
    s.target("user:s", &team_node, 1, 50_000_000).await;
    let plan = PublishCommissionPlanRequest {
        options: None,
        plan_id: String::new(),
        name: "AE FY2026".into(),
        effective_from: "2026-04-01".into(),
        metric: "bookings".into(),
        tier_basis: "attainment".into(),
        tier_mode: "marginal".into(),
        tiers: vec![
            CommissionTier {
                from: 0,
                rate_bp: 300,
            },
            CommissionTier {
                from: 10_000,
                rate_bp: 500,
            },
            CommissionTier {
                from: 15_000,
                rate_bp: 800,
            },
        ],
        cap: None,
        clawback_days: 30,
        payout_grace_days: None,
        reps: vec!["user:r".into()],
    };
    let plan_id = app
        .configuration()
        .publish_commission_plan(with_roles(&app, plan, "sales_manager"))
        .await
        .unwrap()
        .into_inner()
        .stream_id;

    // 23:00 on 31 March in Shanghai: fiscal 2025, outside Q1.
    let x = s
        .open(
            "qualification",
            "user:r",
            7_000_000,
            "CNY",
            "2026-03-20T00:00:00Z",
        )
        .await;
    s.win(&x, "2026-03-31T15:00:00Z").await;
    // R's 900,000.00 already credited: 500,000.00 and 400,000.00.
    let e1 = s
        .open(
            "qualification",
            "user:r",
            50_000_000,
            "CNY",
            "2026-04-03T02:00:00Z",
        )
        .await;
    s.win(&e1, "2026-04-10T02:00:00Z").await;
    let e2 = s
        .open(
            "qualification",
            "user:r",
            40_000_000,
            "CNY",
            "2026-04-06T02:00:00Z",
        )
        .await;
    s.win(&e2, "2026-04-20T02:00:00Z").await;
    // S, in the team, wins 200,000.00.
    let s1 = s
        .open(
            "qualification",
            "user:s",
            20_000_000,
            "CNY",
            "2026-04-07T02:00:00Z",
        )
        .await;
    s.win(&s1, "2026-04-25T02:00:00Z").await;
    // The lead becomes a 300,000.00 deal of R's, which moves to proposal
    // and is won.
    let lead = s
        .lead("li.wei@example.cn", "web", "2026-05-01T02:00:00Z")
        .await;
    s.lead_status(&lead, "working", "2026-05-02T02:00:00Z")
        .await;
    s.lead_status(&lead, "qualified", "2026-05-03T02:00:00Z")
        .await;
    let o = s
        .convert(&lead, "user:r", 30_000_000, "CNY", "2026-05-10T02:00:00Z")
        .await;
    s.stage(&o, "proposal", "2026-05-15T02:00:00Z").await;
    s.win(&o, "2026-05-20T02:00:00Z").await;
    // S leaves the team, then wins 100,000.00: S's credit, not the team's.
    s.team(&team, &["user:r"], "2026-06-01T00:00:00Z").await;
    let s2 = s
        .open(
            "qualification",
            "user:s",
            10_000_000,
            "CNY",
            "2026-06-02T02:00:00Z",
        )
        .await;
    s.win(&s2, "2026-06-05T02:00:00Z").await;

    let mut queries = sales(&app);
    let attainment = |node: &str, quarter: u32, last: u64| GetAttainmentRequest {
        options: read(last),
        period: fiscal(2026, quarter, 0),
        node: node.into(),
        page_size: 0,
        page_token: String::new(),
    };
    let q1 = queries
        .get_attainment(app.request(attainment("", 1, s.last)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (q1.period_start.as_str(), q1.period_end.as_str()),
        ("2026-03-31T16:00:00Z", "2026-06-30T16:00:00Z")
    );
    let figures = |reply: &crm_proto::v1::Attainment| -> Vec<(String, i64, i64, Option<i64>)> {
        reply
            .nodes
            .iter()
            .map(|n| {
                (
                    n.node.clone(),
                    n.target_minor,
                    n.credited_minor,
                    n.attainment_bp,
                )
            })
            .collect()
    };
    // Team (by snapshot): E1 + E2 + S1 + O = 50 + 40 + 20 + 30 = 140
    // (×1,000,000 minor) of 150 → 9333 bp; S2 came after S left.
    // R: 50 + 40 + 30 = 120 of 100 → 12000 bp (X is fiscal 2025).
    // S: 20 + 10 = 30 of 50 → 6000 bp.
    assert_eq!(
        figures(&q1),
        [
            (team_node.clone(), 150_000_000, 140_000_000, Some(9333)),
            ("user:r".to_owned(), 100_000_000, 120_000_000, Some(12_000)),
            ("user:s".to_owned(), 50_000_000, 30_000_000, Some(6000)),
        ]
    );
    assert_eq!(q1.nodes[1].parent, team_node);
    assert_eq!(q1.nodes[1].currency, "CNY");
    // The company is credited through the tree: the team's 140 of 400 →
    // 3500 bp for the fiscal year.
    let year = queries
        .get_attainment(app.request(attainment("company", 0, s.last)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        figures(&year),
        [("company".to_owned(), 400_000_000, 140_000_000, Some(3500))]
    );
    assert_eq!(
        (year.period_start.as_str(), year.period_end.as_str()),
        ("2026-03-31T16:00:00Z", "2027-03-31T16:00:00Z")
    );

    let statement_request = |rep: &str, last: u64| GetCommissionStatementRequest {
        options: read(last),
        rep: rep.into(),
        period: fiscal(2026, 1, 0),
        ..Default::default()
    };
    let statement = queries
        .get_commission_statement(app.request(statement_request("user:r", s.last)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            statement.plan_id.as_str(),
            statement.plan_version,
            statement.plan_name.as_str()
        ),
        (plan_id.as_str(), 1, "AE FY2026")
    );
    assert_eq!(
        (statement.target_minor, statement.currency.as_str()),
        (100_000_000, "CNY")
    );
    let lines = |statement: &crm_proto::v1::CommissionStatement| -> Vec<(String, String, i64, i64, u32, i64, i64)> {
        statement
            .lines
            .iter()
            .map(|l| {
                (
                    l.deal_id.clone(),
                    l.kind.clone(),
                    l.credit_delta_minor,
                    l.credited_total_minor,
                    l.tier,
                    l.payout_delta_minor,
                    l.payout_total_minor,
                )
            })
            .collect()
    };
    let line = |deal: &str,
                kind: &str,
                credit: i64,
                total: i64,
                tier: u32,
                payout: i64,
                payout_total: i64| {
        (
            deal.to_owned(),
            kind.to_owned(),
            credit,
            total,
            tier,
            payout,
            payout_total,
        )
    };
    // 500,000 × 3 % = 15,000; 900,000 × 3 % = 27,000 (+12,000);
    // 1,000,000 × 3 % + 200,000 × 5 % = 40,000 (+13,000), in the 100 % band.
    assert_eq!(
        lines(&statement),
        [
            line(&e1, "won", 50_000_000, 50_000_000, 0, 1_500_000, 1_500_000),
            line(&e2, "won", 40_000_000, 90_000_000, 0, 1_200_000, 2_700_000),
            line(&o, "won", 30_000_000, 120_000_000, 1, 1_300_000, 4_000_000),
        ]
    );
    assert!(statement.next_page_token.is_empty());
    // Two lines a page: the same lines, each page with the whole totals.
    let paged = |page_token: &str| GetCommissionStatementRequest {
        page_size: 2,
        page_token: page_token.into(),
        ..statement_request("user:r", s.last)
    };
    let first = queries
        .get_commission_statement(app.request(paged("")))
        .await
        .unwrap()
        .into_inner();
    let second = queries
        .get_commission_statement(app.request(paged(&first.next_page_token)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!([lines(&first), lines(&second)].concat(), lines(&statement));
    assert_eq!(
        (
            first.payout_minor,
            second.payout_minor,
            second.next_page_token.as_str()
        ),
        (4_000_000, 4_000_000, "")
    );
    let status = queries
        .get_commission_statement(app.request(paged("the third")))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["page_token"]);
    let status = queries
        .get_commission_statement(app.request(paged("999999999.0")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        (statement.credited_minor, statement.payout_minor),
        (120_000_000, 4_000_000)
    );
    assert_eq!(statement.lines[2].occurred_at, "2026-05-20T02:00:00Z");
    assert!(statement.lines[0].event_position < statement.lines[2].event_position);

    let leaderboard = GetLeaderboardRequest {
        options: read(s.last),
        period: fiscal(2026, 1, 0),
        metric: "won_amount".into(),
        scope: String::new(),
        currency: String::new(), // the reporting currency, CNY
        page_size: 0,
        page_token: String::new(),
    };
    let board = queries
        .get_leaderboard(app.request(leaderboard.clone()))
        .await
        .unwrap()
        .into_inner();
    let ranks: Vec<(u64, &str, i64)> = board
        .entries
        .iter()
        .map(|e| (e.rank, e.rep.as_str(), e.value))
        .collect();
    assert_eq!(
        ranks,
        [(1, "user:r", 120_000_000), (2, "user:s", 30_000_000)]
    );

    // S is on no plan.
    let status = queries
        .get_commission_statement(app.request(statement_request("user:s", s.last)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // O reopened 21 days after its win (within 30): a clawback line,
    // 40,000 → 27,000. E1 reopened 66 days after its win: no line, but
    // neither R nor the team is credited with it any more.
    s.reopen(&o, "proposal", "2026-06-10T02:00:00Z").await;
    s.reopen(&e1, "proposal", "2026-06-15T02:00:00Z").await;
    let statement = queries
        .get_commission_statement(app.request(statement_request("user:r", s.last)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(statement.lines.len(), 4);
    assert_eq!(
        lines(&statement)[3],
        line(
            &o,
            "reopened",
            -30_000_000,
            90_000_000,
            0,
            -1_300_000,
            2_700_000
        )
    );
    assert_eq!(
        (statement.credited_minor, statement.payout_minor),
        (90_000_000, 2_700_000)
    );
    let q1 = queries
        .get_attainment(app.request(attainment("", 1, s.last)))
        .await
        .unwrap()
        .into_inner();
    // R: 120 − 30 − 50 = 40 of 100 → 4000 bp; team: 140 − 80 = 60 of 150.
    assert_eq!(
        figures(&q1)[..2],
        [
            (team_node.clone(), 150_000_000, 60_000_000, Some(4000)),
            ("user:r".to_owned(), 100_000_000, 40_000_000, Some(4000)),
        ]
    );

    // Another tenant sees none of it.
    let empty = queries
        .get_attainment(other_tenant(attainment("", 1, s.last)))
        .await
        .unwrap()
        .into_inner();
    assert!(empty.nodes.is_empty());
    let status = queries
        .get_commission_statement(other_tenant(statement_request("user:r", s.last)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = queries
        .get_leaderboard(other_tenant(leaderboard))
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&status),
        ["currency"],
        "no reporting currency there"
    );
    app.stop().await;
}

/// Each win credits the teams its owner is in and every team above them,
/// as they are when it is applied; a rebuild (which works them out from a
/// memo of the tenant's teams instead of a recursive query per win, read
/// again after each team change) credits the same, chunk after chunk.
#[tokio::test]
async fn a_rebuild_credits_each_win_to_the_same_nested_teams_as_the_live_projection() {
    let app = TestApp::spawn().await;
    let mut s = scenario(&app).await;
    let when = "2026-04-01T00:00:00Z";
    let top = s.team("", &["user:a"], when).await;
    let middle = s.team_under("", &top, &["user:b", "user:c"], when).await;
    let bottom = s.team_under("", &middle, &["user:c"], when).await;
    let mut wins = Vec::new();
    for owner in ["user:a", "user:b", "user:c", "user:d"] {
        wins.push(s.open("qualification", owner, 1_000, "EUR", when).await);
    }
    for deal in &wins {
        s.win(deal, "2026-04-02T00:00:00Z").await;
    }
    // D joins the bottom team (C leaves it); the next wins see that.
    s.team_under(&bottom, &middle, &["user:d"], "2026-04-03T00:00:00Z")
        .await;
    for owner in ["user:c", "user:d"] {
        let deal = s.open("qualification", owner, 1_000, "EUR", when).await;
        s.win(&deal, "2026-04-04T00:00:00Z").await;
    }
    crate::support::settled(&app).await;
    let db = app.db.client().await;
    let credits = || async {
        db.query(
            "SELECT owner, array_to_string(teams, ' ') FROM sales_credits ORDER BY position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, String>(1)))
        .collect::<Vec<_>>()
    };
    let live = credits().await;
    let teams = |ids: &[&str]| {
        let mut ids: Vec<uuid::Uuid> = ids.iter().map(|id| id.parse().unwrap()).collect();
        ids.sort();
        ids.iter()
            .map(|id| format!("team:{id}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let owners = |owner: &str, ids: &[&str]| (owner.to_owned(), teams(ids));
    assert_eq!(
        live,
        [
            owners("user:a", &[&top]),
            owners("user:b", &[&middle, &top]),
            owners("user:c", &[&bottom, &middle, &top]),
            owners("user:d", &[]),
            owners("user:c", &[&middle, &top]),
            owners("user:d", &[&bottom, &middle, &top]),
        ]
    );
    let store = crm_event_store::EventStore::connect(
        app.db.config(),
        crm_event_store::StoreOptions::default(),
    )
    .await
    .unwrap();
    // Chunks of 3 events: team changes and wins meet in one chunk and
    // across chunks.
    let performance = crm_projections::all()
        .into_iter()
        .find(|p| p.name() == crm_projections::SALES_PERFORMANCE)
        .unwrap();
    crm_projections::rebuild(performance, &store, app.db.config(), 3, |_| {})
        .await
        .unwrap();
    assert_eq!(credits().await, live);
    store.shutdown().await;
    app.stop().await;
}

/// Cohort months are the tenant's: in Asia/Shanghai (UTC+8), a deal opened
/// at 2026-09-30T17:00Z is October's, one at 15:00Z September's.
#[tokio::test]
async fn funnel_cohorts_are_months_in_the_tenants_zone() {
    let app = TestApp::spawn_with(|config| config.query_min_position_wait_ms = 10_000).await;
    let mut s = scenario(&app).await;
    let settings = crate::support::tenant_settings("Asia/Shanghai", "EUR");
    app.configuration()
        .publish_tenant_settings(with_roles(&app, settings, "admin"))
        .await
        .unwrap();
    for at in ["2026-09-30T15:00:00Z", "2026-09-30T17:00:00Z"] {
        s.open("qualification", "user:ada", 1_000, "EUR", at).await;
    }
    let reply = sales(&app)
        .get_funnel(app.request(GetFunnelRequest {
            options: read(s.last),
            pipeline_id: s.pipeline.clone(),
            cohort_from: "2026-09".into(),
            cohort_to: "2026-10".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let cohorts: Vec<(&str, u64)> = reply
        .cohorts
        .iter()
        .map(|c| (c.cohort.as_str(), c.opened))
        .collect();
    assert_eq!(cohorts, [("2026-09", 1), ("2026-10", 1)]);
    app.stop().await;
}

/// Stage conversion per creation cohort with a skip and a re-entry, stage
/// durations, the sales cycle, velocity and loss reasons (DOMAIN.md §5.1),
/// in UTC (no tenant settings).
#[tokio::test]
async fn the_funnel_counts_skips_and_re_entries_once_and_cycle_and_velocity_follow() {
    let app = TestApp::spawn_with(|config| config.query_min_position_wait_ms = 10_000).await;
    let mut s = scenario(&app).await;
    const OWNER: &str = "user:ada";
    // D1: qualification → proposal → negotiation → won.
    let d1 = s
        .open(
            "qualification",
            OWNER,
            10_000_000,
            "EUR",
            "2026-10-01T00:00:00Z",
        )
        .await;
    s.stage(&d1, "proposal", "2026-10-03T00:00:00Z").await;
    s.stage(&d1, "negotiation", "2026-10-08T00:00:00Z").await;
    s.win(&d1, "2026-10-10T00:00:00Z").await;
    // D2 skips proposal, then is lost on price.
    let d2 = s
        .open(
            "qualification",
            OWNER,
            20_000_000,
            "EUR",
            "2026-10-01T00:00:00Z",
        )
        .await;
    s.stage(&d2, "negotiation", "2026-10-05T00:00:00Z").await;
    s.lose(&d2, "price", "2026-10-11T00:00:00Z").await;
    // D3 enters proposal twice and stays open.
    let d3 = s
        .open(
            "qualification",
            OWNER,
            30_000_000,
            "EUR",
            "2026-10-02T00:00:00Z",
        )
        .await;
    s.stage(&d3, "proposal", "2026-10-04T00:00:00Z").await;
    s.stage(&d3, "qualification", "2026-10-06T00:00:00Z").await;
    s.stage(&d3, "proposal", "2026-10-07T00:00:00Z").await;
    // D4 is lost from qualification for want of budget.
    let d4 = s
        .open(
            "qualification",
            OWNER,
            30_000_000,
            "EUR",
            "2026-10-02T00:00:00Z",
        )
        .await;
    s.lose(&d4, "no_budget", "2026-10-12T00:00:00Z").await;
    // D5 (Bo's) opens in proposal, skipping qualification.
    s.open(
        "proposal",
        "user:bo",
        40_000_000,
        "EUR",
        "2026-10-03T00:00:00Z",
    )
    .await;
    // D6, of the September cohort, is won in October.
    let d6 = s
        .open(
            "qualification",
            OWNER,
            5_000_000,
            "EUR",
            "2026-09-20T00:00:00Z",
        )
        .await;
    s.win(&d6, "2026-10-05T00:00:00Z").await;

    let mut queries = sales(&app);
    let funnel = |from: &str, to: &str, owner: &str| GetFunnelRequest {
        options: read(s.last),
        pipeline_id: s.pipeline.clone(),
        cohort_from: from.into(),
        cohort_to: to.into(),
        owner: owner.into(),
        source_channel: String::new(),
    };
    let reply = queries
        .get_funnel(app.request(funnel("2026-09", "2026-10", "")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.pipeline_version, 1);
    // Highest stage reached: D1, D6 won (every stage); D2 negotiation (its
    // skipped proposal counts); D3 and D5 proposal (D3 once); D4
    // qualification. Reaching ≥ qualification 6, ≥ proposal 5, ≥
    // negotiation 3, won 2: 5 ÷ 6 = 8333 bp, 3 ÷ 5 = 6000, 2 ÷ 3 = 6666.
    let total = reply.total.unwrap();
    assert_eq!(total.opened, 6);
    assert_eq!(
        steps(&total),
        [
            ("qualification", 6, Some(8333)),
            ("proposal", 5, Some(6000)),
            ("negotiation", 3, Some(6666)),
            ("won", 2, None),
        ]
    );
    // Per cohort: September only D6; October D1-D5: 5, 4 (8000), 2 (5000),
    // 1 (5000). Counting visits instead would give proposal 3 deals but 4
    // visits.
    let cohorts: Vec<(&str, u64)> = reply
        .cohorts
        .iter()
        .map(|c| (c.cohort.as_str(), c.opened))
        .collect();
    assert_eq!(cohorts, [("2026-09", 1), ("2026-10", 5)]);
    assert_eq!(
        steps(&reply.cohorts[0]),
        [
            ("qualification", 1, Some(10_000)),
            ("proposal", 1, Some(10_000)),
            ("negotiation", 1, Some(10_000)),
            ("won", 1, None),
        ]
    );
    assert_eq!(
        steps(&reply.cohorts[1]),
        [
            ("qualification", 5, Some(8000)),
            ("proposal", 4, Some(5000)),
            ("negotiation", 2, Some(5000)),
            ("won", 1, None),
        ]
    );
    // Bo's October: D5 reached qualification (skipped) and proposal.
    let bo = queries
        .get_funnel(app.request(funnel("2026-10", "2026-10", "user:bo")))
        .await
        .unwrap()
        .into_inner()
        .total
        .unwrap();
    assert_eq!(
        steps(&bo),
        [
            ("qualification", 1, Some(10_000)),
            ("proposal", 1, Some(0)),
            ("negotiation", 0, None),
            ("won", 0, None),
        ]
    );

    // Visits that ended in October:
    // qualification: D1 2 d, D2 4 d, D3 2 d and 1 d, D4 10 d, D6 15 d →
    //   sorted 1, 2, 2, 4, 10, 15: mean 34 ÷ 6 d = 489,600 s, median (3rd
    //   of 6) 2 d, p90 (6th) 15 d;
    // proposal: D1 5 d, D3 2 d (its second visit is open) → mean 3.5 d,
    //   median 2 d, p90 5 d;
    // negotiation: D1 2 d, D2 6 d → mean 4 d, median 2 d, p90 6 d.
    let (from, to) = (
        "2026-10-01T00:00:00Z".to_owned(),
        "2026-11-01T00:00:00Z".to_owned(),
    );
    let stages = queries
        .get_stage_durations(app.request(GetStageDurationsRequest {
            options: read(s.last),
            pipeline_id: s.pipeline.clone(),
            from: from.clone(),
            to: to.clone(),
            owner: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .stages;
    let stages: Vec<(String, (u64, i64, i64, i64))> = stages
        .into_iter()
        .map(|s| (s.stage, durations(s.duration)))
        .collect();
    assert_eq!(
        stages,
        [
            ("qualification".to_owned(), (6, 489_600, 2 * DAY, 15 * DAY)),
            ("proposal".to_owned(), (2, 302_400, 2 * DAY, 5 * DAY)),
            ("negotiation".to_owned(), (2, 4 * DAY, 2 * DAY, 6 * DAY)),
        ]
    );

    // Won in October: D1 after 9 d, D6 after 15 d → mean 12 d, median 9 d,
    // p90 15 d.
    let cycle = queries
        .get_sales_cycle(app.request(GetSalesCycleRequest {
            options: read(s.last),
            from: from.clone(),
            to: to.clone(),
            pipeline_id: s.pipeline.clone(),
            owner: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(durations(cycle.cycle), (2, 12 * DAY, 9 * DAY, 15 * DAY));

    // Velocity (EUR): 2 open (D3, D5) × win rate 2 ÷ 4 × average won
    // (100,000.00 + 50,000.00) ÷ 2 = 7,500,000 minor ÷ 12 days =
    // 625,000 minor per day.
    let velocity = queries
        .get_velocity(app.request(GetVelocityRequest {
            options: read(s.last),
            from: from.clone(),
            to: to.clone(),
            pipeline_id: String::new(),
            owner: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(velocity.currencies.len(), 1);
    let eur = &velocity.currencies[0];
    assert_eq!(
        (
            eur.currency.as_str(),
            eur.open_deals,
            eur.won,
            eur.lost,
            eur.win_rate_bp,
            eur.average_won_minor,
            eur.average_cycle_seconds,
            eur.velocity_minor_per_day
        ),
        ("EUR", 2, 2, 2, 5000, 7_500_000, 12 * DAY, Some(625_000))
    );

    // Lost in October: one on no_budget (D4, 300,000.00), one on price (D2,
    // 200,000.00); ties by reason code.
    let losses = queries
        .get_loss_reasons(app.request(GetLossReasonsRequest {
            options: read(s.last),
            from: from.clone(),
            to: to.clone(),
            pipeline_id: String::new(),
            owner: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    let losses: Vec<(&str, &str, u64, i64)> = losses
        .reasons
        .iter()
        .map(|r| {
            (
                r.reason.as_str(),
                r.currency.as_str(),
                r.lost,
                r.amount_minor,
            )
        })
        .collect();
    assert_eq!(
        losses,
        [
            ("no_budget", "EUR", 1, 30_000_000),
            ("price", "EUR", 1, 20_000_000)
        ]
    );

    // Another tenant knows no such pipeline and no losses.
    let status = queries
        .get_funnel(other_tenant(funnel("2026-09", "2026-10", "")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let none = queries
        .get_loss_reasons(other_tenant(GetLossReasonsRequest {
            options: None,
            from,
            to,
            pipeline_id: String::new(),
            owner: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(none.reasons.is_empty());
    app.stop().await;
}

/// Leads captured in October by source channel: captured → qualified →
/// converted → won, where won is the converted deal's outcome; the stage
/// funnel filtered by the deals' source channel.
#[tokio::test]
async fn the_lead_funnel_follows_each_source_to_the_won_deal() {
    let app = TestApp::spawn_with(|config| config.query_min_position_wait_ms = 10_000).await;
    let mut s = scenario(&app).await;
    // web: L1 converted and won, L2 qualified, L3 only captured.
    let l1 = s
        .lead("l1@example.com", "web", "2026-10-01T00:00:00Z")
        .await;
    s.lead_status(&l1, "working", "2026-10-02T00:00:00Z").await;
    s.lead_status(&l1, "qualified", "2026-10-03T00:00:00Z")
        .await;
    let won = s
        .convert(&l1, "user:ada", 10_000_000, "EUR", "2026-10-04T00:00:00Z")
        .await;
    s.win(&won, "2026-10-10T00:00:00Z").await;
    let l2 = s
        .lead("l2@example.com", "web", "2026-10-02T00:00:00Z")
        .await;
    s.lead_status(&l2, "working", "2026-10-03T00:00:00Z").await;
    s.lead_status(&l2, "qualified", "2026-10-04T00:00:00Z")
        .await;
    s.lead("l3@example.com", "web", "2026-10-03T00:00:00Z")
        .await;
    // event: L4 converted (its deal still open), L5 disqualified.
    let l4 = s
        .lead("l4@example.com", "event", "2026-10-04T00:00:00Z")
        .await;
    s.lead_status(&l4, "working", "2026-10-05T00:00:00Z").await;
    s.lead_status(&l4, "qualified", "2026-10-05T12:00:00Z")
        .await;
    s.convert(&l4, "user:ada", 20_000_000, "EUR", "2026-10-06T00:00:00Z")
        .await;
    let l5 = s
        .lead("l5@example.com", "event", "2026-10-05T00:00:00Z")
        .await;
    s.lead_status(&l5, "disqualified", "2026-10-06T00:00:00Z")
        .await;
    // referral: captured in September, outside the period.
    s.lead("l6@example.com", "referral", "2026-09-15T00:00:00Z")
        .await;

    let mut queries = sales(&app);
    let funnel = queries
        .get_lead_funnel(app.request(GetLeadFunnelRequest {
            options: read(s.last),
            from: "2026-10-01T00:00:00Z".into(),
            to: "2026-11-01T00:00:00Z".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let rows: Vec<_> = funnel
        .channels
        .iter()
        .map(|c| {
            (
                c.channel.as_str(),
                (c.captured, c.qualified, c.converted, c.won),
                (c.qualified_bp, c.converted_bp, c.won_bp),
            )
        })
        .collect();
    // event: 2 → 1 (5000) → 1 (10000) → 0 (0).
    // web: 3 → 2 (6666) → 1 (5000) → 1 (10000).
    assert_eq!(
        rows,
        [
            ("event", (2, 1, 1, 0), (Some(5000), Some(10_000), Some(0))),
            ("web", (3, 2, 1, 1), (Some(6666), Some(5000), Some(10_000))),
        ]
    );

    // The deals remember their lead's channel.
    let by_source = |channel: &str| GetFunnelRequest {
        options: read(s.last),
        pipeline_id: s.pipeline.clone(),
        cohort_from: "2026-10".into(),
        cohort_to: "2026-10".into(),
        owner: String::new(),
        source_channel: channel.into(),
    };
    let web = queries
        .get_funnel(app.request(by_source("web")))
        .await
        .unwrap()
        .into_inner()
        .total
        .unwrap();
    assert_eq!(
        steps(&web),
        [
            ("qualification", 1, Some(10_000)),
            ("proposal", 1, Some(10_000)),
            ("negotiation", 1, Some(10_000)),
            ("won", 1, None),
        ]
    );
    let event = queries
        .get_funnel(app.request(by_source("event")))
        .await
        .unwrap()
        .into_inner()
        .total
        .unwrap();
    assert_eq!((event.opened, event.steps[1].deals), (1, 0));
    app.stop().await;
}

/// Ties go to the first to reach the figure (DOMAIN.md §5.1), a reopened
/// win lowers the running figure without moving when it was first
/// reached; team scope by snapshot; pages that hold while ranks move.
#[tokio::test]
async fn the_leaderboard_ranks_ties_by_who_reached_the_figure_first() {
    let app = TestApp::spawn_with(|config| config.query_min_position_wait_ms = 10_000).await;
    let mut s = scenario(&app).await;
    let team = s
        .team("", &["user:a", "user:b"], "2026-09-01T00:00:00Z")
        .await;
    // (rep, amount, won at): t0 … t5, and D's last win reopened at t6.
    let mut last_of_d = String::new();
    for (rep, minor, when) in [
        ("user:d", 20_000_000, "2026-10-01T10:00:00Z"),
        ("user:a", 10_000_000, "2026-10-02T10:00:00Z"),
        ("user:b", 20_000_000, "2026-10-03T10:00:00Z"),
        ("user:a", 10_000_000, "2026-10-04T10:00:00Z"),
        ("user:c", 30_000_000, "2026-10-05T10:00:00Z"),
        ("user:d", 10_000_000, "2026-10-06T10:00:00Z"),
    ] {
        let id = s
            .open("qualification", rep, minor, "EUR", "2026-09-20T00:00:00Z")
            .await;
        s.win(&id, when).await;
        last_of_d = id;
    }
    s.reopen(&last_of_d, "proposal", "2026-10-07T10:00:00Z")
        .await;

    let mut queries = sales(&app);
    // Fiscal year = calendar year (no settings): month 10 is October.
    let board =
        |metric: &str, scope: &str, page_size: u32, page_token: &str| GetLeaderboardRequest {
            options: read(s.last),
            period: fiscal(2026, 0, 10),
            metric: metric.into(),
            scope: scope.into(),
            currency: "EUR".into(),
            page_size,
            page_token: page_token.into(),
        };
    let ranks = |reply: &crm_proto::v1::Leaderboard| -> Vec<(u64, String, i64)> {
        reply
            .entries
            .iter()
            .map(|e| (e.rank, e.rep.clone(), e.value))
            .collect()
    };
    let entry = |rank: u64, rep: &str, value: i64| (rank, rep.to_owned(), value);
    // C 300,000.00; then 200,000.00 each: D first reached it at t0 (its
    // t5 win was taken back at t6), B at t2, A at t3.
    let amounts = queries
        .get_leaderboard(app.request(board("won_amount", "all", 0, "")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ranks(&amounts),
        [
            entry(1, "user:c", 30_000_000),
            entry(2, "user:d", 20_000_000),
            entry(3, "user:b", 20_000_000),
            entry(4, "user:a", 20_000_000),
        ]
    );
    assert_eq!(amounts.entries[1].reached_at, "2026-10-01T10:00:00Z");
    assert_eq!(amounts.next_page_token, "");
    assert_eq!(
        (amounts.period_start.as_str(), amounts.period_end.as_str()),
        ("2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z")
    );
    // By count: A 2; then 1 each, first reached by D (t0), B (t2), C (t4).
    let counts = queries
        .get_leaderboard(app.request(board("won_count", "", 0, "")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ranks(&counts),
        [
            entry(1, "user:a", 2),
            entry(2, "user:d", 1),
            entry(3, "user:b", 1),
            entry(4, "user:c", 1),
        ]
    );
    // The team's members only.
    let team_board = queries
        .get_leaderboard(app.request(board("won_amount", &format!("team:{team}"), 0, "")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ranks(&team_board),
        [
            entry(1, "user:b", 20_000_000),
            entry(2, "user:a", 20_000_000)
        ]
    );
    // Two pages of two.
    let first = queries
        .get_leaderboard(app.request(board("won_amount", "all", 2, "")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ranks(&first),
        [
            entry(1, "user:c", 30_000_000),
            entry(2, "user:d", 20_000_000)
        ]
    );
    let second = queries
        .get_leaderboard(app.request(board("won_amount", "all", 2, &first.next_page_token)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ranks(&second),
        [
            entry(3, "user:b", 20_000_000),
            entry(4, "user:a", 20_000_000)
        ]
    );
    assert_eq!(second.next_page_token, "");
    // A win landing between pages moves the ranks, not where the next page
    // starts: E leads now, and the page after D's entry still starts at B.
    let id = s
        .open(
            "qualification",
            "user:e",
            40_000_000,
            "EUR",
            "2026-09-20T00:00:00Z",
        )
        .await;
    s.win(&id, "2026-10-08T10:00:00Z").await;
    let again = queries
        .get_leaderboard(app.request(GetLeaderboardRequest {
            options: read(s.last),
            period: fiscal(2026, 0, 10),
            metric: "won_amount".into(),
            scope: "all".into(),
            currency: "EUR".into(),
            page_size: 2,
            page_token: first.next_page_token.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ranks(&again),
        [
            entry(4, "user:b", 20_000_000),
            entry(5, "user:a", 20_000_000)
        ]
    );
    app.stop().await;
}

/// Every new query refuses bad input naming the field, and says when the
/// read model has not reached the asked position.
#[tokio::test]
async fn sales_queries_refuse_bad_input_naming_the_field() {
    let app = TestApp::spawn_with(|config| config.query_min_position_wait_ms = 200).await;
    let mut q = sales(&app);
    let (from, to) = ("2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
    let pipeline = uuid::Uuid::now_v7().to_string();
    let long = "x".repeat(201);

    let funnel = GetFunnelRequest {
        options: None,
        pipeline_id: pipeline.clone(),
        cohort_from: "2026-01".into(),
        cohort_to: "2026-03".into(),
        owner: String::new(),
        source_channel: String::new(),
    };
    for (bad, field) in [
        (
            GetFunnelRequest {
                pipeline_id: "nope".into(),
                ..funnel.clone()
            },
            "pipeline_id",
        ),
        (
            GetFunnelRequest {
                cohort_from: "2026-13".into(),
                ..funnel.clone()
            },
            "cohort_from",
        ),
        (
            GetFunnelRequest {
                cohort_to: "2025-12".into(),
                ..funnel.clone()
            },
            "cohort_to",
        ),
        (
            GetFunnelRequest {
                owner: long.clone(),
                ..funnel.clone()
            },
            "owner",
        ),
        (
            GetFunnelRequest {
                source_channel: long.clone(),
                ..funnel.clone()
            },
            "source_channel",
        ),
    ] {
        let status = q.get_funnel(app.request(bad)).await.unwrap_err();
        assert_eq!(bad_fields(&status), [field]);
    }
    assert_eq!(
        q.get_funnel(app.request(funnel)).await.unwrap_err().code(),
        Code::NotFound,
        "an unknown pipeline"
    );

    let durations = GetStageDurationsRequest {
        options: None,
        pipeline_id: pipeline.clone(),
        from: from.into(),
        to: to.into(),
        owner: String::new(),
    };
    for (bad, field) in [
        (
            GetStageDurationsRequest {
                pipeline_id: String::new(),
                ..durations.clone()
            },
            "pipeline_id",
        ),
        (
            GetStageDurationsRequest {
                from: "yesterday".into(),
                ..durations.clone()
            },
            "from",
        ),
        (
            GetStageDurationsRequest {
                to: from.into(),
                ..durations.clone()
            },
            "to",
        ),
    ] {
        let status = q.get_stage_durations(app.request(bad)).await.unwrap_err();
        assert_eq!(bad_fields(&status), [field]);
    }

    let status = q
        .get_sales_cycle(app.request(GetSalesCycleRequest {
            options: None,
            from: from.into(),
            to: String::new(),
            pipeline_id: String::new(),
            owner: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["to"]);
    let status = q
        .get_sales_cycle(app.request(GetSalesCycleRequest {
            options: None,
            from: from.into(),
            to: to.into(),
            pipeline_id: "x".into(),
            owner: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["pipeline_id"]);
    let status = q
        .get_velocity(app.request(GetVelocityRequest {
            options: None,
            from: "2026-10-01".into(),
            to: to.into(),
            pipeline_id: String::new(),
            owner: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["from"]);
    let status = q
        .get_loss_reasons(app.request(GetLossReasonsRequest {
            options: None,
            from: from.into(),
            to: to.into(),
            pipeline_id: String::new(),
            owner: long.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["owner"]);
    let status = q
        .get_lead_funnel(app.request(GetLeadFunnelRequest {
            options: None,
            from: to.into(),
            to: from.into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["to"]);

    let attainment = GetAttainmentRequest {
        options: None,
        period: fiscal(2026, 1, 0),
        node: String::new(),
        page_size: 0,
        page_token: String::new(),
    };
    for (bad, field) in [
        (
            GetAttainmentRequest {
                period: None,
                ..attainment.clone()
            },
            "period",
        ),
        (
            GetAttainmentRequest {
                period: fiscal(1999, 0, 0),
                ..attainment.clone()
            },
            "period.fiscal_year",
        ),
        (
            GetAttainmentRequest {
                period: fiscal(2026, 5, 0),
                ..attainment.clone()
            },
            "period.quarter",
        ),
        (
            GetAttainmentRequest {
                period: fiscal(2026, 0, 13),
                ..attainment.clone()
            },
            "period.month",
        ),
        (
            GetAttainmentRequest {
                period: fiscal(2026, 1, 4),
                ..attainment.clone()
            },
            "period.month",
        ),
        (
            GetAttainmentRequest {
                node: long.clone(),
                ..attainment.clone()
            },
            "node",
        ),
        (
            GetAttainmentRequest {
                page_size: 201,
                ..attainment.clone()
            },
            "page_size",
        ),
        (
            GetAttainmentRequest {
                page_token: "zz".into(),
                ..attainment.clone()
            },
            "page_token",
        ),
    ] {
        let status = q.get_attainment(app.request(bad)).await.unwrap_err();
        assert_eq!(bad_fields(&status), [field]);
    }

    let statement = GetCommissionStatementRequest {
        options: None,
        rep: "user:r".into(),
        period: fiscal(2026, 1, 0),
        ..Default::default()
    };
    for (bad, field) in [
        (
            GetCommissionStatementRequest {
                rep: String::new(),
                ..statement.clone()
            },
            "rep",
        ),
        (
            GetCommissionStatementRequest {
                rep: long.clone(),
                ..statement.clone()
            },
            "rep",
        ),
        (
            GetCommissionStatementRequest {
                period: fiscal(2026, 0, 0).map(|p| SalesFiscalPeriod {
                    fiscal_year: 2101,
                    ..p
                }),
                ..statement.clone()
            },
            "period.fiscal_year",
        ),
    ] {
        let status = q
            .get_commission_statement(app.request(bad))
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), [field]);
    }

    let board = GetLeaderboardRequest {
        options: None,
        period: fiscal(2026, 4, 0),
        metric: "won_amount".into(),
        scope: String::new(),
        currency: String::new(),
        page_size: 0,
        page_token: String::new(),
    };
    for (bad, field) in [
        (
            GetLeaderboardRequest {
                metric: "happiness".into(),
                ..board.clone()
            },
            "metric",
        ),
        (
            GetLeaderboardRequest {
                scope: "team:nope".into(),
                ..board.clone()
            },
            "scope",
        ),
        (
            GetLeaderboardRequest {
                currency: "eur".into(),
                ..board.clone()
            },
            "currency",
        ),
        (
            GetLeaderboardRequest {
                currency: "EUR".into(),
                page_token: "x".into(),
                ..board.clone()
            },
            "page_token",
        ),
        // No currency asked and no reporting currency to fall back on.
        (board.clone(), "currency"),
        (
            GetLeaderboardRequest {
                period: None,
                ..board.clone()
            },
            "period",
        ),
    ] {
        let status = q.get_leaderboard(app.request(bad)).await.unwrap_err();
        assert_eq!(bad_fields(&status), [field]);
    }

    // A position the read models have not reached: UNAVAILABLE after the
    // bounded wait; no tenant: refused before anything is read.
    let status = q
        .get_leaderboard(app.request(GetLeaderboardRequest {
            options: read(1_000_000),
            currency: "EUR".into(),
            ..board.clone()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status = q
        .get_lead_funnel(as_caller(
            GetLeadFunnelRequest {
                options: None,
                from: from.into(),
                to: to.into(),
            },
            None,
            Some("user:ada"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    app.stop().await;
}

/// A plan with `payout_grace_days` freezes a period that many days after it
/// ends (DOMAIN.md §5.1). Events are recorded now, whatever their business
/// time, so with 60 days of grace (UTC, fiscal year = calendar year):
/// - a win in June 2025 (frozen since 30 August 2025) recorded now posts to
///   the current month, at the time it was recorded, and June pays nothing;
/// - a win in the previous month (ended at most 31 days ago: not frozen)
///   stays there;
/// - a win early this month is this month's.
///
/// With a flat 10 % of the amount: the current month pays 10 % of both.
#[tokio::test]
async fn a_frozen_period_keeps_its_statement_and_late_credits_post_to_the_current_one() {
    let app = TestApp::spawn_with(|config| config.query_min_position_wait_ms = 10_000).await;
    let mut s = scenario(&app).await;
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    let month_start = now.date().first_of_month();
    let previous = month_start
        .checked_sub(jiff::Span::new().months(1))
        .unwrap();
    let plan = |grace: Option<u32>| PublishCommissionPlanRequest {
        options: None,
        plan_id: String::new(),
        name: "Flat".into(),
        effective_from: "2025-01-01".into(),
        metric: "bookings".into(),
        tier_basis: "amount".into(),
        tier_mode: "marginal".into(),
        tiers: vec![CommissionTier {
            from: 0,
            rate_bp: 1_000,
        }],
        cap: None,
        clawback_days: 30,
        payout_grace_days: grace,
        reps: vec!["user:r".into()],
    };
    let status = app
        .configuration()
        .publish_commission_plan(with_roles(&app, plan(Some(366)), "admin"))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["payout_grace_days"]);
    app.configuration()
        .publish_commission_plan(with_roles(&app, plan(Some(60)), "admin"))
        .await
        .unwrap();

    let june = s
        .open(
            "qualification",
            "user:r",
            1_000_000,
            "CNY",
            "2025-06-01T00:00:00Z",
        )
        .await;
    s.win(&june, "2025-06-15T00:00:00Z").await;
    let recorded_from = jiff::Timestamp::now();
    let late_position = s.last;
    let before = s
        .open(
            "qualification",
            "user:r",
            2_000_000,
            "CNY",
            &format!("{previous}T00:00:00Z"),
        )
        .await;
    s.win(&before, &format!("{previous}T12:00:00Z")).await;
    let this = s
        .open(
            "qualification",
            "user:r",
            3_000_000,
            "CNY",
            &format!("{month_start}T00:00:00Z"),
        )
        .await;
    s.win(&this, &format!("{month_start}T00:01:00Z")).await;

    let mut queries = sales(&app);
    let statement = |year: i16, month: i8, last: u64| GetCommissionStatementRequest {
        options: read(last),
        rep: "user:r".into(),
        period: fiscal(year as u32, 0, month as u32),
        ..Default::default()
    };
    let lines = |statement: &crm_proto::v1::CommissionStatement| -> Vec<(String, i64, i64, bool)> {
        statement
            .lines
            .iter()
            .map(|l| {
                (
                    l.deal_id.clone(),
                    l.credit_delta_minor,
                    l.payout_total_minor,
                    !l.posted_at.is_empty(),
                )
            })
            .collect()
    };
    let june_statement = queries
        .get_commission_statement(app.request(statement(2025, 6, s.last)))
        .await
        .unwrap()
        .into_inner();
    assert!(june_statement.lines.is_empty(), "{june_statement:?}");
    assert_eq!(june_statement.payout_minor, 0);

    let previous_statement = queries
        .get_commission_statement(app.request(statement(previous.year(), previous.month(), s.last)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        lines(&previous_statement),
        [(before.clone(), 2_000_000, 200_000, false)]
    );

    let current = queries
        .get_commission_statement(app.request(statement(
            month_start.year(),
            month_start.month(),
            s.last,
        )))
        .await
        .unwrap()
        .into_inner();
    if jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date()
        .first_of_month()
        != month_start
    {
        return; // the month turned during the test: the late line went on.
    }
    // This month's own win first (00:01 on the 1st), then June's, posted
    // when it was recorded.
    assert_eq!(
        lines(&current),
        [
            (this.clone(), 3_000_000, 300_000, false),
            (june.clone(), 1_000_000, 400_000, true),
        ]
    );
    let late = &current.lines[1];
    assert_eq!(late.occurred_at, "2025-06-15T00:00:00Z");
    assert!(late.event_position <= late_position);
    let posted: jiff::Timestamp = late.posted_at.parse().unwrap();
    assert!(posted <= recorded_from, "{posted} after {recorded_from}");
    assert!(
        posted
            >= month_start
                .to_zoned(jiff::tz::TimeZone::UTC)
                .unwrap()
                .timestamp()
    );
    assert_eq!(
        (current.credited_minor, current.payout_minor),
        (4_000_000, 400_000)
    );
}

/// A read-model query PostgreSQL refuses for good is INTERNAL (a retry would
/// fail the same way); one it could not finish this time is UNAVAILABLE.
#[tokio::test]
async fn deterministic_query_failures_are_internal_and_transient_ones_unavailable() {
    let app = TestApp::spawn().await;
    let db = app.db.client().await;
    let status = crm::query::unavailable(db.query("SELECT 1 / 0", &[]).await.unwrap_err());
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("22012"), "{status:?}");
    let status = crm::query::unavailable(db.query("SELEKT 1", &[]).await.unwrap_err());
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    // A table a rolling deploy or a rebuild's swap may not have yet: retry.
    let status = crm::query::unavailable(
        db.query("SELECT * FROM no_such_read_model", &[])
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    db.batch_execute("SET statement_timeout = 1").await.unwrap();
    let status = crm::query::unavailable(db.query("SELECT pg_sleep(1)", &[]).await.unwrap_err());
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status = crm::query::unavailable("pool timed out".to_owned());
    assert_eq!(status.code(), Code::Unavailable);
    app.stop().await;
}

/// Every statement of a query reads one snapshot, read-only, and the
/// connection goes back to the pool outside any transaction however the
/// query ended (answered, or dropped in the middle of a statement).
#[tokio::test]
async fn a_query_reads_one_snapshot_and_leaves_no_transaction_behind() {
    let db = crm_test_support::TestDb::create().await;
    let raw = db.client().await;
    raw.batch_execute("CREATE TABLE snapshot_probe (n int); INSERT INTO snapshot_probe VALUES (1)")
        .await
        .unwrap();
    let manager = deadpool_postgres::Manager::new(db.config().clone(), tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(1)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .unwrap();
    // The rows `client` sees; outside any transaction (a read-only one
    // answers true, an aborted one fails).
    async fn rows_outside_a_transaction(client: &tokio_postgres::Client) -> i64 {
        let row = client
            .query_one(
                "SELECT current_setting('transaction_read_only')::bool, \
                        (SELECT count(*) FROM snapshot_probe)",
                &[],
            )
            .await
            .unwrap();
        assert!(!row.get::<_, bool>(0), "left in a read-only transaction");
        row.get(1)
    }
    let snapshot = crm::query::Snapshot::begin(&pool).await.unwrap();
    let count = "SELECT count(*) FROM snapshot_probe";
    let mut seen = Vec::new();
    for insert in ["SELECT", "INSERT INTO snapshot_probe VALUES (2)"] {
        raw.execute(insert, &[]).await.unwrap();
        seen.push(
            snapshot
                .query_one(count, &[])
                .await
                .unwrap()
                .get::<_, i64>(0),
        );
    }
    // The row committed by another connection after the first statement is
    // unseen.
    assert_eq!(seen, [1, 1]);
    let refused = snapshot
        .execute("INSERT INTO snapshot_probe VALUES (3)", &[])
        .await
        .unwrap_err();
    assert_eq!(refused.code().map(|c| c.code()), Some("25006"), "{refused}");
    drop(snapshot);
    // The pool's one connection, back outside the (failed) transaction.
    assert_eq!(
        rows_outside_a_transaction(&pool.get().await.unwrap()).await,
        2
    );

    // A query cancelled mid-statement (the caller went away).
    let snapshot = crm::query::Snapshot::begin(&pool).await.unwrap();
    let cancelled = tokio::time::timeout(
        std::time::Duration::from_millis(20),
        snapshot.query_one("SELECT pg_sleep(0.3)", &[]),
    )
    .await;
    assert!(cancelled.is_err());
    drop(snapshot);
    let client = pool.get().await.unwrap();
    raw.execute("INSERT INTO snapshot_probe VALUES (4)", &[])
        .await
        .unwrap();
    assert_eq!(rows_outside_a_transaction(&client).await, 3);
}
