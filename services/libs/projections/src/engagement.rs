//! `engagement`: when deals and customers were last touched, for the
//! scheduler's stalled-deal and churn-risk rules (DOMAIN.md §4):
//!
//! - `eng_deals`: each open deal's stage, when it entered it, its last touch
//!   (an activity logged or completed on it) and whether it is flagged
//!   stalled — a stage change clears the flag, a touch restarts the clock;
//! - `eng_stage_limits`: each pipeline stage's `max_days_in_stage` (its
//!   newest version);
//! - `eng_accounts`: each account's customer status, last touch (on the
//!   account or one of its deals), last paid order, and whether it is
//!   flagged at risk — a touch or a paid order clears the flag.
use crate::Tx;
use crm_domain::account::AccountEvent;
use crm_domain::activity::{ActivityEvent, Target};
use crm_domain::commerce::OrderEvent;
use crm_domain::opportunity::OpportunityEvent;
use crm_domain::pipeline::PipelineEvent;
use crm_event_store::RecordedEvent;
use uuid::Uuid;

use crate::runtime::{ApplyError, ApplyFuture, Projection};
use crate::state::decode;

pub struct Engagement;

pub const NAME: &str = "engagement";

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS eng_stage_limits (
    tenant_id   text    NOT NULL,
    pipeline_id uuid    NOT NULL,
    stage       text    NOT NULL,
    max_days    integer NOT NULL,
    PRIMARY KEY (tenant_id, pipeline_id, stage)
);
CREATE TABLE IF NOT EXISTS eng_deals (
    tenant_id        text        NOT NULL,
    deal_id          uuid        NOT NULL,
    account_id       uuid        NOT NULL,
    pipeline_id      uuid        NOT NULL,
    stage            text        NOT NULL,
    stage_entered_at timestamptz NOT NULL,
    last_touch_at    timestamptz NOT NULL,
    open             boolean     NOT NULL,
    stalled          boolean     NOT NULL,
    PRIMARY KEY (tenant_id, deal_id)
) WITH (fillfactor = 70);
CREATE INDEX IF NOT EXISTS eng_deals_open ON eng_deals (last_touch_at) WHERE open AND NOT stalled;
CREATE TABLE IF NOT EXISTS eng_accounts (
    tenant_id          text        NOT NULL,
    account_id         uuid        NOT NULL,
    customer           boolean     NOT NULL,
    customer_since     timestamptz,
    last_touch_at      timestamptz,
    last_paid_order_at timestamptz,
    at_risk            boolean     NOT NULL,
    PRIMARY KEY (tenant_id, account_id)
) WITH (fillfactor = 70);
CREATE TABLE IF NOT EXISTS eng_tenants (
    tenant_id             text    NOT NULL PRIMARY KEY,
    inactivity_churn_days integer
);
CREATE TABLE IF NOT EXISTS eng_activities (
    tenant_id   text  NOT NULL,
    activity_id uuid  NOT NULL,
    targets     jsonb NOT NULL,
    PRIMARY KEY (tenant_id, activity_id)
)";

type Time = std::time::SystemTime;

/// Writes an account's row in one statement: a new row is an empty one
/// (not a customer, not at risk) with the change made; an existing one
/// takes the change. `sql` inserts `$1` tenant, `$2` account, then the
/// columns `values` are for, and says in its `DO UPDATE` what changes.
/// (One upsert, not an insert then an update: a rebuild sends the new
/// rows of a chunk by COPY, with no update after.)
async fn account_row(
    tx: &Tx<'_>,
    sql: &'static str,
    tenant: &str,
    account: Uuid,
    values: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<(), ApplyError> {
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&tenant, &account];
    params.extend_from_slice(values);
    tx.execute(sql, &params).await?;
    Ok(())
}

/// A touch at `at` of every target (deals, and accounts directly or
/// through their deals).
async fn touch(tx: &Tx<'_>, tenant: &str, targets: &[Target], at: Time) -> Result<(), ApplyError> {
    for target in targets {
        match target.kind.as_str() {
            "opportunity" => {
                let account = tx
                    .query_opt(
                        "UPDATE eng_deals SET last_touch_at = greatest(last_touch_at, $3) \
                         WHERE tenant_id = $1 AND deal_id = $2 RETURNING account_id",
                        &[&tenant, &target.id, &at],
                    )
                    .await?;
                if let Some(row) = account {
                    touch_account(tx, tenant, row.get(0), at).await?;
                }
            }
            "account" => touch_account(tx, tenant, target.id, at).await?,
            _ => {}
        }
    }
    Ok(())
}

async fn touch_account(
    tx: &Tx<'_>,
    tenant: &str,
    account: Uuid,
    at: Time,
) -> Result<(), ApplyError> {
    account_row(
        tx,
        "INSERT INTO eng_accounts (tenant_id, account_id, customer, last_touch_at, at_risk) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, account_id) DO UPDATE SET \
           last_touch_at = greatest(eng_accounts.last_touch_at, EXCLUDED.last_touch_at), \
           at_risk = EXCLUDED.at_risk",
        tenant,
        account,
        &[&false, &at, &false],
    )
    .await
}

async fn pipeline(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    if let Some(PipelineEvent::Published(published)) =
        crate::state::decoded::<PipelineEvent>(event)?.as_deref()
    {
        for stage in &published.stages {
            let Some(days) = stage.max_days_in_stage else {
                tx.execute(
                    "DELETE FROM eng_stage_limits WHERE tenant_id = $1 AND pipeline_id = $2 \
                     AND stage = $3",
                    &[&event.tenant_id, &event.stream_id, &stage.key],
                )
                .await?;
                continue;
            };
            tx.execute(
                "INSERT INTO eng_stage_limits (tenant_id, pipeline_id, stage, max_days) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, pipeline_id, stage) \
                 DO UPDATE SET max_days = EXCLUDED.max_days",
                &[
                    &event.tenant_id,
                    &event.stream_id,
                    &stage.key,
                    &i32::try_from(days).unwrap_or(i32::MAX),
                ],
            )
            .await?;
        }
    }
    Ok(())
}

async fn deal(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let (tenant, id) = (event.tenant_id.as_str(), &event.stream_id);
    match crate::state::decoded::<OpportunityEvent>(event)?.as_deref() {
        Some(OpportunityEvent::Opened(opened)) => {
            let at: Time = opened.occurred_at.into();
            tx.execute(
                "INSERT INTO eng_deals (tenant_id, deal_id, account_id, pipeline_id, stage, \
                   stage_entered_at, last_touch_at, open, stalled) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (tenant_id, deal_id) DO NOTHING",
                &[
                    &tenant,
                    id,
                    &opened.account_id,
                    &opened.pipeline_id,
                    &opened.stage,
                    &at,
                    &at,
                    &true,
                    &false,
                ],
            )
            .await?;
        }
        // A deal that follows a new pipeline version into the stage mapped
        // for its dropped one did not progress: its stage clock and stalled
        // flag stay.
        Some(OpportunityEvent::StageChanged(changed)) if changed.pipeline_version.is_some() => {
            tx.execute(
                "UPDATE eng_deals SET stage = $3 WHERE tenant_id = $1 AND deal_id = $2",
                &[&tenant, id, &changed.to],
            )
            .await?;
        }
        Some(OpportunityEvent::StageChanged(changed)) => {
            let at: Time = changed.occurred_at.into();
            tx.execute(
                "UPDATE eng_deals SET stage = $3, stage_entered_at = $4, stalled = $5 \
                 WHERE tenant_id = $1 AND deal_id = $2",
                &[&tenant, id, &changed.to, &at, &false],
            )
            .await?;
        }
        Some(OpportunityEvent::Stalled(_)) => {
            tx.execute(
                "UPDATE eng_deals SET stalled = $3 WHERE tenant_id = $1 AND deal_id = $2",
                &[&tenant, id, &true],
            )
            .await?;
        }
        Some(OpportunityEvent::Won(_) | OpportunityEvent::Lost(_)) => {
            tx.execute(
                "UPDATE eng_deals SET open = $3 WHERE tenant_id = $1 AND deal_id = $2",
                &[&tenant, id, &false],
            )
            .await?;
        }
        Some(OpportunityEvent::Reopened(reopened)) => {
            let at: Time = reopened.occurred_at.into();
            tx.execute(
                "UPDATE eng_deals SET open = true, stalled = false, stage = $3, \
                   stage_entered_at = $4, last_touch_at = greatest(last_touch_at, $4) \
                 WHERE tenant_id = $1 AND deal_id = $2",
                &[&tenant, id, &reopened.stage, &at],
            )
            .await?;
        }
        _ => {}
    }
    Ok(())
}

async fn activity(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let (tenant, id) = (event.tenant_id.as_str(), &event.stream_id);
    match crate::state::decoded::<ActivityEvent>(event)?.as_deref() {
        Some(ActivityEvent::Logged(logged)) => {
            touch(tx, tenant, &logged.targets, logged.occurred_at.into()).await?;
        }
        Some(ActivityEvent::Scheduled(scheduled)) => {
            let targets =
                serde_json::to_value(&scheduled.targets).map_err(|e| ApplyError::Payload {
                    event_type: event.event_type.clone(),
                    reason: e.to_string(),
                })?;
            tx.execute(
                "INSERT INTO eng_activities (tenant_id, activity_id, targets) VALUES ($1, $2, $3) \
                 ON CONFLICT (tenant_id, activity_id) DO UPDATE SET targets = EXCLUDED.targets",
                &[&tenant, id, &targets],
            )
            .await?;
        }
        Some(ActivityEvent::Completed(completed)) => {
            let row = tx
                .query_opt(
                    "SELECT targets FROM eng_activities WHERE tenant_id = $1 AND activity_id = $2",
                    &[&tenant, id],
                )
                .await?;
            if let Some(row) = row {
                let targets: Vec<Target> =
                    serde_json::from_value(row.get(0)).map_err(|e| ApplyError::Payload {
                        event_type: event.event_type.clone(),
                        reason: e.to_string(),
                    })?;
                touch(tx, tenant, &targets, completed.occurred_at.into()).await?;
            }
        }
        _ => {}
    }
    Ok(())
}

async fn account(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let (tenant, id) = (event.tenant_id.as_str(), event.stream_id);
    match crate::state::decoded::<AccountEvent>(event)?.as_deref() {
        Some(AccountEvent::BecameCustomer(became)) => {
            let at: Time = became.occurred_at.into();
            account_row(
                tx,
                "INSERT INTO eng_accounts (tenant_id, account_id, customer, customer_since, \
                   at_risk) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, account_id) DO UPDATE SET \
                   customer = EXCLUDED.customer, customer_since = EXCLUDED.customer_since, \
                   at_risk = EXCLUDED.at_risk",
                tenant,
                id,
                &[&true, &at, &false],
            )
            .await?;
        }
        Some(AccountEvent::Churned(_)) => {
            account_row(
                tx,
                "INSERT INTO eng_accounts (tenant_id, account_id, customer, at_risk) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, account_id) DO UPDATE SET \
                   customer = EXCLUDED.customer, at_risk = EXCLUDED.at_risk",
                tenant,
                id,
                &[&false, &false],
            )
            .await?;
        }
        Some(AccountEvent::ChurnRiskFlagged(_)) => {
            account_row(
                tx,
                "INSERT INTO eng_accounts (tenant_id, account_id, customer, at_risk) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, account_id) DO UPDATE SET \
                   at_risk = EXCLUDED.at_risk",
                tenant,
                id,
                &[&false, &true],
            )
            .await?;
        }
        _ => {}
    }
    Ok(())
}

async fn order(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    if let Some(OrderEvent::Recorded(order)) =
        crate::state::decoded::<OrderEvent>(event)?.as_deref()
        && crm_domain::commerce::PAID_STATUSES.contains(&order.status.as_str())
        && let Some(account) = order.account_id
    {
        let at: Time = order.occurred_at.into();
        account_row(
            tx,
            "INSERT INTO eng_accounts (tenant_id, account_id, customer, last_paid_order_at, \
               at_risk) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, account_id) DO UPDATE SET \
               last_paid_order_at = greatest(eng_accounts.last_paid_order_at, \
                 EXCLUDED.last_paid_order_at), \
               at_risk = EXCLUDED.at_risk",
            &event.tenant_id,
            account,
            &[&false, &at, &false],
        )
        .await?;
    }
    Ok(())
}

/// The tenant's opt-in inactivity churn.
async fn settings(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    use crm_domain::configuration::{Published, TenantSettings};
    if let Some(published) = decode::<Published<TenantSettings>>(event)? {
        let days = published
            .content
            .inactivity_churn_days
            .map(|d| i32::try_from(d).unwrap_or(i32::MAX));
        tx.execute(
            "INSERT INTO eng_tenants (tenant_id, inactivity_churn_days) VALUES ($1, $2) \
             ON CONFLICT (tenant_id) DO UPDATE SET \
               inactivity_churn_days = EXCLUDED.inactivity_churn_days",
            &[&event.tenant_id, &days],
        )
        .await?;
    }
    Ok(())
}

impl Projection for Engagement {
    crate::projection_names!(
        NAME,
        SCHEMA,
        [
            "eng_stage_limits",
            "eng_deals",
            "eng_accounts",
            "eng_activities",
            "eng_tenants"
        ]
    );

    fn query_indexes(&self) -> &'static [&'static str] {
        &["eng_deals_open"]
    }

    fn stream_types(&self) -> &'static [&'static str] {
        &[
            "pipeline_config",
            "opportunity",
            "activity",
            "account",
            "order",
            "tenant_settings",
        ]
    }

    fn apply<'a>(&'a self, tx: &'a Tx<'_>, event: &'a RecordedEvent) -> ApplyFuture<'a> {
        match event.stream_type.as_str() {
            "pipeline_config" => Box::pin(pipeline(tx, event)),
            "opportunity" => Box::pin(deal(tx, event)),
            "activity" => Box::pin(activity(tx, event)),
            "account" => Box::pin(account(tx, event)),
            "order" => Box::pin(order(tx, event)),
            "tenant_settings" => Box::pin(settings(tx, event)),
            _ => Box::pin(std::future::ready(Ok(()))),
        }
    }
}
