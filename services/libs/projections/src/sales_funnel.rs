//! `sales_funnel`: the stage visits of every deal and the lead funnel
//! (DOMAIN.md §5.1 `stage_visit`, `win_loss`), for `GetFunnel`,
//! `GetStageDurations`, `GetSalesCycle`, `GetVelocity`, `GetLossReasons` and
//! `GetLeadFunnel`.
//!
//! A deal's row keeps its state as the domain's `evolve` builds it, plus what
//! the state forgets: when it was opened (its creation cohort), where it came
//! from, when it closed and why it was lost. Each stay in a stage is one
//! visit row: entered, exited and how it ended (`forward`, `backward`, `won`,
//! `lost`), numbered by the version of the deal's event that entered it. Pipelines keep their open stages' order per version, so queries
//! can rank the stages a deal reached. Everything is grouped by `occurred_at`
//! (business time); the tenant's zone, kept from its settings, places
//! instants in calendar months.
use crm_domain::Aggregate;
use crm_domain::configuration::TenantSettingsConfig;
use crm_domain::lead::{Lead, LeadEvent, LeadStatus};
use crm_domain::opportunity::{Direction, Opportunity, OpportunityEvent};
use crm_domain::pipeline::{PipelineConfig, PipelineEvent, StageKind};
use crm_event_store::RecordedEvent;

use crate::runtime::{ApplyError, ApplyFuture, Projection};

/// The row state [`crate::state::evolve_row`] reads (a `static`: the
/// rebuild cache knows the row by its address).
static STATE: &str = "SELECT state FROM sales_funnel_deals WHERE tenant_id = $1 AND deal_id = $2";

pub struct SalesFunnel;

pub const NAME: &str = "sales_funnel";

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS sales_funnel_settings (
    tenant_id text PRIMARY KEY,
    time_zone text NOT NULL
);
CREATE TABLE IF NOT EXISTS sales_funnel_stages (
    tenant_id   text    NOT NULL,
    pipeline_id uuid    NOT NULL,
    version     integer NOT NULL,
    stage       text    NOT NULL,
    kind        text    NOT NULL,
    open_order  integer,
    PRIMARY KEY (tenant_id, pipeline_id, version, stage)
);
CREATE TABLE IF NOT EXISTS sales_funnel_deals (
    tenant_id        text        NOT NULL,
    deal_id          uuid        NOT NULL,
    pipeline_id      uuid        NOT NULL,
    pipeline_version integer     NOT NULL,
    owner            text        NOT NULL,
    source_channel   text        NOT NULL,
    lead_id          uuid,
    campaign_id      uuid,
    opened_at        timestamptz NOT NULL,
    outcome          text        NOT NULL,
    amount_minor     bigint      NOT NULL,
    currency         text        NOT NULL,
    closed_at        timestamptz,
    loss_reason      text,
    archived         boolean     NOT NULL,
    state            json,               -- NULL after a rebuild (crate::state)
    position         bigint      NOT NULL,
    PRIMARY KEY (tenant_id, deal_id)
) WITH (fillfactor = 70);
ALTER TABLE sales_funnel_deals ALTER COLUMN state DROP NOT NULL;
CREATE INDEX IF NOT EXISTS sales_funnel_deals_cohort
    ON sales_funnel_deals (tenant_id, pipeline_id, opened_at);
CREATE INDEX IF NOT EXISTS sales_funnel_deals_closed
    ON sales_funnel_deals (tenant_id, closed_at) WHERE outcome <> 'open';
CREATE TABLE IF NOT EXISTS stage_visit (
    tenant_id  text        NOT NULL,
    deal_id    uuid        NOT NULL,
    visit      integer     NOT NULL,
    stage      text        NOT NULL,
    entered_at timestamptz NOT NULL,
    exited_at  timestamptz,
    exit_kind  text,
    PRIMARY KEY (tenant_id, deal_id, visit)
) WITH (fillfactor = 70);
CREATE INDEX IF NOT EXISTS stage_visit_exited
    ON stage_visit (tenant_id, exited_at) WHERE exited_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS lead_funnel (
    tenant_id      text        NOT NULL,
    lead_id        uuid        NOT NULL,
    channel        text        NOT NULL,
    campaign_id    uuid,
    captured_at    timestamptz NOT NULL,
    qualified_at   timestamptz,
    converted_at   timestamptz,
    opportunity_id uuid,
    merged         boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (tenant_id, lead_id)
) WITH (fillfactor = 70);
CREATE INDEX IF NOT EXISTS lead_funnel_captured ON lead_funnel (tenant_id, captured_at)";

/// Decodes `event` as one of `A`'s; `None` when it is not.
pub(crate) fn decode<A: Aggregate>(event: &RecordedEvent) -> Result<Option<A::Event>, ApplyError> {
    if event.stream_type != A::STREAM_TYPE {
        return Ok(None);
    }
    crate::state::decode::<A::Event>(event)
}

type Time = std::time::SystemTime;

impl Projection for SalesFunnel {
    crate::projection_names!(
        NAME,
        SCHEMA,
        [
            "sales_funnel_settings",
            "sales_funnel_stages",
            "sales_funnel_deals",
            "stage_visit",
            "lead_funnel"
        ]
    );

    fn query_indexes(&self) -> &'static [&'static str] {
        &[
            "sales_funnel_deals_cohort",
            "sales_funnel_deals_closed",
            "stage_visit_exited",
            "lead_funnel_captured",
        ]
    }

    fn stream_types(&self) -> &'static [&'static str] {
        &["opportunity", "lead", "pipeline_config", "tenant_settings"]
    }

    fn apply<'a>(&'a self, tx: &'a crate::Tx<'_>, event: &'a RecordedEvent) -> ApplyFuture<'a> {
        match event.stream_type.as_str() {
            Opportunity::STREAM_TYPE => Box::pin(apply_deal(tx, event)),
            Lead::STREAM_TYPE => Box::pin(apply_lead(tx, event)),
            PipelineConfig::STREAM_TYPE => Box::pin(apply_pipeline(tx, event)),
            TenantSettingsConfig::STREAM_TYPE => Box::pin(apply_settings(tx, event)),
            _ => Box::pin(std::future::ready(Ok(()))),
        }
    }
}

/// A published pipeline's stages, in order.
async fn apply_pipeline(tx: &crate::Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let Some(PipelineEvent::Published(published)) = decode::<PipelineConfig>(event)? else {
        return Ok(());
    };
    let version = i32::try_from(published.version).unwrap_or(i32::MAX);
    let mut open_order = 0i32;
    for stage in &published.stages {
        let (kind, order) = match stage.kind {
            StageKind::Open => {
                open_order += 1;
                ("open", Some(open_order - 1))
            }
            StageKind::Won => ("won", None),
            StageKind::Lost => ("lost", None),
        };
        tx.execute(
            "INSERT INTO sales_funnel_stages \
                   (tenant_id, pipeline_id, version, stage, kind, open_order) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (tenant_id, pipeline_id, version, stage) DO UPDATE \
                 SET kind = EXCLUDED.kind, open_order = EXCLUDED.open_order",
            &[
                &event.tenant_id,
                &event.stream_id,
                &version,
                &stage.key,
                &kind,
                &order,
            ],
        )
        .await?;
    }
    Ok(())
}

/// The tenant's time zone.
async fn apply_settings(tx: &crate::Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let Some(published) = decode::<TenantSettingsConfig>(event)? else {
        return Ok(());
    };
    tx.execute(
        "INSERT INTO sales_funnel_settings (tenant_id, time_zone) VALUES ($1, $2) \
             ON CONFLICT (tenant_id) DO UPDATE SET time_zone = EXCLUDED.time_zone",
        &[&event.tenant_id, &published.content.time_zone],
    )
    .await?;
    Ok(())
}

/// Where a rebuild keeps each deal's open visit (the number it was
/// entered with) in its state cache ([`crate::runtime::StateCache`]). A
/// `static`: the cache tells its entries apart by this text's address.
static OPEN_VISIT: &str = "sales_funnel: the deal's open visit";

/// The deal follows `version` of its pipeline, when set.
async fn set_version(
    tx: &crate::Tx<'_>,
    event: &RecordedEvent,
    version: Option<u32>,
) -> Result<(), ApplyError> {
    if let Some(version) = version {
        let version = i32::try_from(version).unwrap_or(i32::MAX);
        tx.execute(
            "UPDATE sales_funnel_deals SET pipeline_version = $3 \
             WHERE tenant_id = $1 AND deal_id = $2",
            &[&event.tenant_id, &event.stream_id, &version],
        )
        .await?;
    }
    Ok(())
}

/// Closes the deal's open visit, if any. A deal has at most one (each
/// visit is closed before the next is entered). In a rebuild that
/// remembers which it is, by its row's key: an UPDATE of a visit entered
/// earlier in the chunk then folds into the visit's insert.
async fn exit_visit(
    tx: &crate::Tx<'_>,
    event: &RecordedEvent,
    at: Time,
    kind: &str,
) -> Result<(), ApplyError> {
    let open = tx
        .cache()
        .and_then(|cache| cache.take::<i32>(OPEN_VISIT, &event.tenant_id, event.stream_id))
        // A number saturated at the largest may name an earlier visit too.
        .filter(|visit| *visit < i32::MAX);
    match open {
        Some(visit) => {
            tx.execute(
                "UPDATE stage_visit SET exited_at = $4, exit_kind = $5 \
                 WHERE tenant_id = $1 AND deal_id = $2 AND visit = $3",
                &[&event.tenant_id, &event.stream_id, &visit, &at, &kind],
            )
            .await?
        }
        None => {
            tx.execute(
                "UPDATE stage_visit SET exited_at = $3, exit_kind = $4 \
                 WHERE tenant_id = $1 AND deal_id = $2 AND exited_at IS NULL",
                &[&event.tenant_id, &event.stream_id, &at, &kind],
            )
            .await?
        }
    };
    Ok(())
}

/// Starts the deal's next visit, numbered by the version of the event that
/// enters it: increasing per deal, known without a read (so a batch's
/// visits go out as one statement), and above the numbers of visits that
/// earlier versions counted one by one.
async fn enter_visit(
    tx: &crate::Tx<'_>,
    event: &RecordedEvent,
    stage: &str,
    at: Time,
) -> Result<(), ApplyError> {
    let visit = i32::try_from(event.stream_version).unwrap_or(i32::MAX);
    tx.execute(
        "INSERT INTO stage_visit (tenant_id, deal_id, visit, stage, entered_at, exited_at, \
           exit_kind) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant_id, deal_id, visit) DO NOTHING",
        &[
            &event.tenant_id,
            &event.stream_id,
            &visit,
            &stage,
            &at,
            // Open (parameters, so that closing it in the same rebuild
            // chunk can fold into this insert).
            &None::<Time>,
            &None::<&str>,
        ],
    )
    .await?;
    if let Some(cache) = tx.cache() {
        cache.put(OPEN_VISIT, &event.tenant_id, event.stream_id, visit);
    }
    Ok(())
}

async fn apply_deal(tx: &crate::Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let Some((deal, decoded)) = crate::state::evolve_row::<Opportunity>(tx, STATE, event).await?
    else {
        return Ok(());
    };
    let deal = crate::state::kept(tx, STATE, event, deal);
    let state = crate::state::cached(tx, &*deal);
    let position = i64::try_from(event.global_position).unwrap_or(i64::MAX);
    let outcome = match deal.outcome {
        crm_domain::opportunity::Outcome::Open => "open",
        crm_domain::opportunity::Outcome::Won => "won",
        crm_domain::opportunity::Outcome::Lost => "lost",
    };
    let (amount, currency) = deal
        .amount
        .as_ref()
        .map_or((0, String::new()), |m| (m.amount_minor, m.currency.clone()));
    let archived = deal.meta.lifecycle == crm_domain::common::Lifecycle::Archived;
    if let OpportunityEvent::Opened(opened) = &*decoded {
        let opened_at: Time = opened.occurred_at.into();
        tx.execute(
            "INSERT INTO sales_funnel_deals (tenant_id, deal_id, pipeline_id, pipeline_version, \
               owner, source_channel, lead_id, campaign_id, opened_at, outcome, amount_minor, \
               currency, archived, state, position, closed_at, loss_reason) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
             ON CONFLICT (tenant_id, deal_id) DO NOTHING",
            &[
                &event.tenant_id,
                &event.stream_id,
                &opened.pipeline_id,
                &i32::try_from(opened.pipeline_version).unwrap_or(i32::MAX),
                &deal.owner,
                &opened.source.channel,
                &opened.source.lead_id,
                &opened.source.campaign_id,
                &opened_at,
                &outcome,
                &amount,
                &currency,
                &archived,
                &state,
                &position,
                // Not closed (parameters, so that a close in the same
                // rebuild chunk can fold into this insert).
                &None::<Time>,
                &None::<String>,
            ],
        )
        .await?;
        return enter_visit(tx, event, &opened.stage, opened_at).await;
    }
    // What the event changes besides the state: visits, closing and reason.
    // (closes, closed_at, loss reason)
    let closing: Option<(Option<Time>, Option<String>)> = match &*decoded {
        // Following a new pipeline version into the stage mapped for its
        // dropped one: the same visit, under the stage's new key.
        OpportunityEvent::StageChanged(changed) if changed.pipeline_version.is_some() => {
            tx.execute(
                "UPDATE stage_visit SET stage = $3 \
                 WHERE tenant_id = $1 AND deal_id = $2 AND exited_at IS NULL",
                &[&event.tenant_id, &event.stream_id, &changed.to],
            )
            .await?;
            set_version(tx, event, changed.pipeline_version).await?;
            None
        }
        OpportunityEvent::DetailsUpdated(updated) => {
            let version = updated.changes.pipeline_version.as_ref().map(|c| c.new);
            set_version(tx, event, version).await?;
            None
        }
        OpportunityEvent::StageChanged(changed) => {
            let at: Time = changed.occurred_at.into();
            let kind = match changed.direction {
                Direction::Forward => "forward",
                Direction::Backward => "backward",
            };
            exit_visit(tx, event, at, kind).await?;
            enter_visit(tx, event, &changed.to, at).await?;
            None
        }
        OpportunityEvent::Won(won) => {
            let at: Time = won.occurred_at.into();
            exit_visit(tx, event, at, "won").await?;
            Some((Some(at), None))
        }
        OpportunityEvent::Lost(lost) => {
            let at: Time = lost.occurred_at.into();
            exit_visit(tx, event, at, "lost").await?;
            Some((Some(at), Some(lost.reason.code.clone())))
        }
        OpportunityEvent::Reopened(reopened) => {
            enter_visit(tx, event, &reopened.stage, reopened.occurred_at.into()).await?;
            Some((None, None))
        }
        _ => None,
    };
    // Two statements, each of which collapses with its own repeats in a
    // batch (the state at every event, the closing only when it closes).
    tx.execute(
        "UPDATE sales_funnel_deals SET owner = $3, outcome = $4, amount_minor = $5, \
           currency = $6, archived = $7, state = $8, position = $9 \
         WHERE tenant_id = $1 AND deal_id = $2",
        &[
            &event.tenant_id,
            &event.stream_id,
            &deal.owner,
            &outcome,
            &amount,
            &currency,
            &archived,
            &state,
            &position,
        ],
    )
    .await?;
    if let Some((closed_at, loss_reason)) = closing {
        tx.execute(
            "UPDATE sales_funnel_deals SET closed_at = $3, loss_reason = $4 \
             WHERE tenant_id = $1 AND deal_id = $2",
            &[&event.tenant_id, &event.stream_id, &closed_at, &loss_reason],
        )
        .await?;
    }
    Ok(())
}

async fn apply_lead(tx: &crate::Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let Some(decoded) = crate::state::decoded::<LeadEvent>(event)? else {
        return Ok(());
    };
    match &*decoded {
        LeadEvent::Captured(captured) => {
            let at: Time = captured.occurred_at.into();
            tx.execute(
                "INSERT INTO lead_funnel (tenant_id, lead_id, channel, campaign_id, captured_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, lead_id) DO NOTHING",
                &[
                    &event.tenant_id,
                    &event.stream_id,
                    &captured.source.channel,
                    &captured.source.campaign_id,
                    &at,
                ],
            )
            .await?;
        }
        LeadEvent::StatusChanged(changed) if changed.to == LeadStatus::Qualified => {
            let at: Time = changed.occurred_at.into();
            tx.execute(
                "UPDATE lead_funnel SET qualified_at = COALESCE(qualified_at, $3) \
                 WHERE tenant_id = $1 AND lead_id = $2",
                &[&event.tenant_id, &event.stream_id, &at],
            )
            .await?;
        }
        LeadEvent::Converted(converted) => {
            let at: Time = converted.occurred_at.into();
            tx.execute(
                "UPDATE lead_funnel SET converted_at = $3, opportunity_id = $4 \
                 WHERE tenant_id = $1 AND lead_id = $2",
                &[
                    &event.tenant_id,
                    &event.stream_id,
                    &at,
                    &converted.opportunity_id,
                ],
            )
            .await?;
        }
        // A duplicate merged into another lead is not a lead of its own.
        LeadEvent::MergedInto(_) => {
            tx.execute(
                "UPDATE lead_funnel SET merged = true WHERE tenant_id = $1 AND lead_id = $2",
                &[&event.tenant_id, &event.stream_id],
            )
            .await?;
        }
        _ => {}
    }
    Ok(())
}
