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
                Opportunity::STREAM_TYPE => match crate::state::decoded::<OpportunityEvent>(event)?
                    .as_deref()
                {
                    Some(OpportunityEvent::Won(won)) => {
                        let at: Time = won.occurred_at.into();
                        if let Some(cache) = tx.cache() {
                            // A rebuild: the teams from its memo of the
                            // tenant's teams, in an insert that gathers.
                            let key = tenant_key(&event.tenant_id);
                            let teams = match cache.take::<Teams>(TEAMS, &event.tenant_id, key) {
                                Some(teams) => teams,
                                None => Teams::read(tx, &event.tenant_id).await?,
                            };
                            let credited = teams.of(&won.owner);
                            cache.put(TEAMS, &event.tenant_id, key, teams);
                            tx.execute(
                                "INSERT INTO sales_credits (tenant_id, position, deal_id, kind, \
                                   owner, teams, occurred_at, won_at, amount_minor, currency, \
                                   recorded_at) \
                                 VALUES ($1, $2, $3, 'won'::text, $4, $5::text::text[], $6, $6, \
                                   $7, $8, $9) \
                                 ON CONFLICT (tenant_id, position) DO NOTHING",
                                &[
                                    &event.tenant_id,
                                    &position,
                                    &event.stream_id,
                                    &won.owner,
                                    &credited,
                                    &at,
                                    &won.amount.amount_minor,
                                    &won.amount.currency,
                                    &event.recorded_at,
                                ],
                            )
                            .await?;
                            return Ok(());
                        }
                        // The owner's teams now, and every team above them
                        // (the same as `Teams::of`).
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
                    if let Some(cache) = tx.cache() {
                        // The rebuild's memo of the tenant's teams is read
                        // again at the next win.
                        cache.take::<Teams>(TEAMS, &event.tenant_id, tenant_key(&event.tenant_id));
                    }
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

/// Where a rebuild keeps each tenant's [`Teams`] in its state cache
/// ([`crate::runtime::StateCache`]), under [`tenant_key`]. A `static`:
/// the cache tells its entries apart by this text's address.
static TEAMS: &str = "sales_performance: the tenant's teams";

/// The cache's row id for a tenant's memo (a hash: the cache checks the
/// tenant of what it gives back, so two tenants with one id only read
/// their teams again).
fn tenant_key(tenant: &str) -> uuid::Uuid {
    use std::hash::BuildHasher;
    let hashed =
        std::hash::BuildHasherDefault::<crate::runtime::FastHasher>::default().hash_one(tenant);
    uuid::Uuid::from_u64_pair(hashed, 0x7ea4_5000)
}

/// A tenant's teams as `sales_teams` holds them: (team, parent, members).
/// A rebuild reads them once and again after each team event, instead of
/// a recursive query per win.
struct Teams(Vec<(uuid::Uuid, Option<uuid::Uuid>, Vec<String>)>);

impl Teams {
    async fn read(tx: &crate::Tx<'_>, tenant: &str) -> Result<Self, ApplyError> {
        let rows = tx
            .query(
                "SELECT team_id, parent_id, members FROM sales_teams WHERE tenant_id = $1",
                &[&tenant],
            )
            .await?;
        // `try_get`: a NULL among a team's members stops the rebuild with
        // an error, not a panic.
        let teams = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect::<Result<_, tokio_postgres::Error>>()?;
        Ok(Self(teams))
    }

    /// What the live statement's recursive query gives for `owner`: as a
    /// `text[]` literal, sorted by team id, `team:<id>` for every team
    /// whose members include the owner and every parent above them (a
    /// parent named without a row of its own included, cycles stopped).
    fn of(&self, owner: &str) -> String {
        let mut found: std::collections::BTreeSet<uuid::Uuid> = self
            .0
            .iter()
            .filter(|(_, _, members)| members.iter().any(|m| m == owner))
            .map(|(team, _, _)| *team)
            .collect();
        let mut next: Vec<uuid::Uuid> = found.iter().copied().collect();
        while let Some(team) = next.pop() {
            for (_, parent, _) in self.0.iter().filter(|(id, _, _)| *id == team) {
                if let Some(parent) = parent
                    && found.insert(*parent)
                {
                    next.push(*parent);
                }
            }
        }
        let names: Vec<String> = found.iter().map(|team| format!("team:{team}")).collect();
        format!("{{{}}}", names.join(","))
    }
}
