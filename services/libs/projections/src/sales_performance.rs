//! `sales_performance`: sales targets, credits, commission plans and team
//! membership (DOMAIN.md §5.1 `target_attainment`, `commission_statement`,
//! `leaderboard`), for `GetAttainment`, `GetCommissionStatement` and
//! `GetLeaderboard`.
//!
//! A *credit* is one row per event that changes what a rep has won: a win
//! (+amount, the owner as the event snapshots it) and the reopening of a won
//! deal (−the win's amount, for the same rep). Each credit also keeps the
//! teams the owner belonged to when the win was applied (Team records'
//! `members`, with every ancestor team), so teams are credited by snapshot:
//! a rep changing teams later moves none of their earlier wins. Periods are
//! not stored: queries sum credits by `occurred_at` between the period's
//! bounds, which they compute from the tenant's zone and fiscal year start
//! (kept here from its settings), so late events and settings changes need
//! no recomputation.
use crm_domain::Aggregate;
use crm_domain::configuration::{CommissionPlanConfig, TeamConfig, TenantSettingsConfig};
use crm_domain::opportunity::{Opportunity, OpportunityEvent, Outcome};
use crm_domain::targets::{SalesTargets, TargetEvent};
use crm_event_store::RecordedEvent;

use crate::runtime::{ApplyError, ApplyFuture, Projection};
use crate::sales_funnel::decode;

pub struct SalesPerformance;

pub const NAME: &str = "sales_performance";

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS sales_perf_settings (
    tenant_id               text     PRIMARY KEY,
    time_zone               text     NOT NULL,
    fiscal_year_start_month smallint NOT NULL,
    reporting_currency      text     NOT NULL
);
CREATE TABLE IF NOT EXISTS sales_teams (
    tenant_id text   NOT NULL,
    team_id   uuid   NOT NULL,
    parent_id uuid,
    members   text[] NOT NULL,
    PRIMARY KEY (tenant_id, team_id)
);
CREATE TABLE IF NOT EXISTS sales_targets (
    tenant_id    text     NOT NULL,
    target_id    uuid     NOT NULL,
    node         text     NOT NULL,
    quarter      smallint NOT NULL,
    month        smallint NOT NULL,
    parent       text,
    amount_minor bigint   NOT NULL,
    currency     text     NOT NULL,
    PRIMARY KEY (tenant_id, target_id, node, quarter, month)
);
CREATE INDEX IF NOT EXISTS sales_targets_children
    ON sales_targets (tenant_id, target_id, parent);
CREATE TABLE IF NOT EXISTS sales_credits (
    tenant_id    text        NOT NULL,
    position     bigint      NOT NULL,
    deal_id      uuid        NOT NULL,
    kind         text        NOT NULL,
    owner        text        NOT NULL,
    teams        text[]      NOT NULL,
    occurred_at  timestamptz NOT NULL,
    won_at       timestamptz NOT NULL,
    amount_minor bigint      NOT NULL,
    currency     text        NOT NULL,
    PRIMARY KEY (tenant_id, position)
);
CREATE INDEX IF NOT EXISTS sales_credits_by_time
    ON sales_credits (tenant_id, occurred_at, position);
CREATE INDEX IF NOT EXISTS sales_credits_by_owner
    ON sales_credits (tenant_id, owner, occurred_at, position);
CREATE INDEX IF NOT EXISTS sales_credits_by_deal
    ON sales_credits (tenant_id, deal_id, position);
-- When the credit's event was recorded: a commission plan's frozen periods
-- (payout_grace_days) go by it. NULL in rows written before it was kept.
ALTER TABLE sales_credits ADD COLUMN IF NOT EXISTS recorded_at timestamptz;
CREATE INDEX IF NOT EXISTS sales_credits_by_recorded
    ON sales_credits (tenant_id, owner, recorded_at);
CREATE TABLE IF NOT EXISTS commission_plans (
    tenant_id      text    NOT NULL,
    plan_id        uuid    NOT NULL,
    version        integer NOT NULL,
    effective_from date    NOT NULL,
    metric         text    NOT NULL,
    reps           text[]  NOT NULL,
    content        jsonb   NOT NULL,
    position       bigint  NOT NULL,
    PRIMARY KEY (tenant_id, plan_id, version)
)";

type Time = std::time::SystemTime;

impl Projection for SalesPerformance {
    crate::projection_names!(
        NAME,
        SCHEMA,
        [
            "sales_perf_settings",
            "sales_teams",
            "sales_targets",
            "sales_credits",
            "commission_plans"
        ]
    );

    fn query_indexes(&self) -> &'static [&'static str] {
        // Not sales_credits_by_deal: a reopened deal reads its last credit.
        &[
            "sales_targets_children",
            "sales_credits_by_time",
            "sales_credits_by_owner",
            "sales_credits_by_recorded",
        ]
    }

    fn stream_types(&self) -> &'static [&'static str] {
        &[
            "opportunity",
            "sales_target",
            "commission_plan",
            "team",
            "tenant_settings",
        ]
    }

    fn apply<'a>(&'a self, tx: &'a crate::Tx<'_>, event: &'a RecordedEvent) -> ApplyFuture<'a> {
        Box::pin(async move {
            let malformed = |reason: String| ApplyError::Payload {
                event_type: event.event_type.clone(),
                reason,
            };
            let position = i64::try_from(event.global_position).unwrap_or(i64::MAX);
            match event.stream_type.as_str() {
                Opportunity::STREAM_TYPE => match decode::<Opportunity>(event)? {
                    Some(OpportunityEvent::Won(won)) => {
                        let at: Time = won.occurred_at.into();
                        // The owner's teams now, and every team above them.
                        tx.execute(
                            "WITH RECURSIVE teams(team_id) AS ( \
                               SELECT team_id FROM sales_teams \
                               WHERE tenant_id = $1 AND $4 = ANY(members) \
                               UNION \
                               SELECT t.parent_id FROM sales_teams t JOIN teams USING (team_id) \
                               WHERE t.tenant_id = $1 AND t.parent_id IS NOT NULL) \
                             INSERT INTO sales_credits (tenant_id, position, deal_id, kind, owner, \
                               teams, occurred_at, won_at, amount_minor, currency, recorded_at) \
                             SELECT $1, $2, $3, 'won', $4, \
                               COALESCE((SELECT array_agg('team:' || team_id::text \
                                         ORDER BY team_id) FROM teams), '{}'), \
                               $5, $5, $6, $7, $8 \
                             ON CONFLICT (tenant_id, position) DO NOTHING",
                            &[
                                &event.tenant_id,
                                &position,
                                &event.stream_id,
                                &won.owner,
                                &at,
                                &won.amount.amount_minor,
                                &won.amount.currency,
                                &event.recorded_at,
                            ],
                        )
                        .await?;
                    }
                    Some(OpportunityEvent::Reopened(reopened))
                        if reopened.previous_outcome == Outcome::Won =>
                    {
                        // Takes back the deal's last win from the rep and
                        // teams it credited.
                        let at: Time = reopened.occurred_at.into();
                        tx.execute(
                            "INSERT INTO sales_credits (tenant_id, position, deal_id, kind, \
                               owner, teams, occurred_at, won_at, amount_minor, currency, \
                               recorded_at) \
                             SELECT tenant_id, $2, deal_id, 'reopened', owner, teams, $4, \
                               occurred_at, -amount_minor, currency, $5 \
                             FROM sales_credits \
                             WHERE tenant_id = $1 AND deal_id = $3 AND kind = 'won' \
                             ORDER BY position DESC LIMIT 1 \
                             ON CONFLICT (tenant_id, position) DO NOTHING",
                            &[
                                &event.tenant_id,
                                &position,
                                &event.stream_id,
                                &at,
                                &event.recorded_at,
                            ],
                        )
                        .await?;
                    }
                    _ => {}
                },
                SalesTargets::STREAM_TYPE => {
                    let Some(TargetEvent::Allocated(allocated)) = decode::<SalesTargets>(event)?
                    else {
                        return Ok(());
                    };
                    // One shape per period: a month (its quarter implied), a
                    // quarter, or the year (0, 0).
                    let (quarter, month) = match (allocated.period.quarter, allocated.period.month)
                    {
                        (_, Some(month)) => (0i16, i16::from(month)),
                        (Some(quarter), None) => (i16::from(quarter), 0),
                        (None, None) => (0, 0),
                    };
                    tx.execute(
                        "INSERT INTO sales_targets (tenant_id, target_id, node, quarter, month, \
                           parent, amount_minor, currency) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                         ON CONFLICT (tenant_id, target_id, node, quarter, month) DO UPDATE \
                         SET parent = EXCLUDED.parent, amount_minor = EXCLUDED.amount_minor, \
                           currency = EXCLUDED.currency",
                        &[
                            &event.tenant_id,
                            &event.stream_id,
                            &allocated.node,
                            &quarter,
                            &month,
                            &allocated.parent,
                            &allocated.amount.amount_minor,
                            &allocated.amount.currency,
                        ],
                    )
                    .await?;
                }
                CommissionPlanConfig::STREAM_TYPE => {
                    let Some(published) = decode::<CommissionPlanConfig>(event)? else {
                        return Ok(());
                    };
                    let plan = &published.content;
                    let content =
                        serde_json::to_value(plan).map_err(|e| malformed(format!("plan: {e}")))?;
                    tx.execute(
                        "INSERT INTO commission_plans (tenant_id, plan_id, version, \
                           effective_from, metric, reps, content, position) \
                         VALUES ($1, $2, $3, $4::text::date, $5, $6, $7, $8) \
                         ON CONFLICT (tenant_id, plan_id, version) DO NOTHING",
                        &[
                            &event.tenant_id,
                            &event.stream_id,
                            &i32::try_from(published.version).unwrap_or(i32::MAX),
                            &plan.effective_from.to_string(),
                            &plan.metric,
                            &plan.reps,
                            &content,
                            &position,
                        ],
                    )
                    .await?;
                }
                TeamConfig::STREAM_TYPE => {
                    let Some(published) = decode::<TeamConfig>(event)? else {
                        return Ok(());
                    };
                    let team = &published.content;
                    tx.execute(
                        "INSERT INTO sales_teams (tenant_id, team_id, parent_id, members) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, team_id) DO UPDATE \
                         SET parent_id = EXCLUDED.parent_id, members = EXCLUDED.members",
                        &[
                            &event.tenant_id,
                            &event.stream_id,
                            &team.parent_id,
                            &team.members,
                        ],
                    )
                    .await?;
                }
                TenantSettingsConfig::STREAM_TYPE => {
                    let Some(published) = decode::<TenantSettingsConfig>(event)? else {
                        return Ok(());
                    };
                    let settings = &published.content;
                    tx.execute(
                        "INSERT INTO sales_perf_settings (tenant_id, time_zone, \
                           fiscal_year_start_month, reporting_currency) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id) DO UPDATE \
                         SET time_zone = EXCLUDED.time_zone, \
                           fiscal_year_start_month = EXCLUDED.fiscal_year_start_month, \
                           reporting_currency = EXCLUDED.reporting_currency",
                        &[
                            &event.tenant_id,
                            &settings.time_zone,
                            &i16::from(settings.fiscal_year_start_month),
                            &settings.reporting_currency,
                        ],
                    )
                    .await?;
                }
                _ => {}
            }
            Ok(())
        })
    }
}
