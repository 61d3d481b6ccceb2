//! `pipeline_board`: one row per deal with its stage, amount, probability and
//! weighted value (DOMAIN.md §5.1), for `GetPipelineBoard`.
//!
//! The row keeps the deal's state as the domain's own `evolve` builds it, so
//! the read model can never disagree with the aggregate about what an event
//! means; the columns are derived from that state.
use crm_domain::Aggregate;
use crm_domain::opportunity::{Opportunity, OpportunityEvent};
use crm_event_store::RecordedEvent;

use crate::runtime::{ApplyFuture, Projection};

/// The row state [`crate::state::evolve_row`] reads (a `static`: the
/// rebuild cache knows the row by its address).
static STATE: &str = "SELECT state FROM pipeline_board WHERE tenant_id = $1 AND deal_id = $2";

pub struct PipelineBoard;

pub const NAME: &str = "pipeline_board";

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS pipeline_board (
    tenant_id      text    NOT NULL,
    deal_id        uuid    NOT NULL,
    name           text    NOT NULL,
    pipeline_id    uuid,
    stage          text    NOT NULL,
    outcome        text    NOT NULL,
    archived       boolean NOT NULL,
    amount_minor   bigint,
    currency       text,
    probability_bp integer NOT NULL,
    weighted_minor bigint,
    category       text,
    close_date     date,
    owner          text    NOT NULL,
    state          json,           -- NULL after a rebuild (crate::state)
    position       bigint  NOT NULL,
    closed_at      timestamptz,
    stalled        boolean,
    PRIMARY KEY (tenant_id, deal_id)
) WITH (fillfactor = 70);
ALTER TABLE pipeline_board ALTER COLUMN state DROP NOT NULL;
-- Added after the first release: run `crm projections rebuild pipeline_board`
-- to fill it for deals closed before.
ALTER TABLE pipeline_board ADD COLUMN IF NOT EXISTS closed_at timestamptz;
-- Added when rebuilds began to leave `state` out: NULL in a row written
-- before, whose `state` holds the flag instead.
ALTER TABLE pipeline_board ADD COLUMN IF NOT EXISTS stalled boolean;
CREATE INDEX IF NOT EXISTS pipeline_board_closed
    ON pipeline_board (tenant_id, closed_at) WHERE outcome <> 'open';
CREATE INDEX IF NOT EXISTS pipeline_board_by_stage
    ON pipeline_board (tenant_id, pipeline_id, stage) WHERE outcome = 'open'";

fn text<T: serde::Serialize>(value: &T) -> Option<String> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(text)) => Some(text),
        _ => None,
    }
}

impl Projection for PipelineBoard {
    crate::projection_names!(NAME, SCHEMA, ["pipeline_board"]);

    fn query_indexes(&self) -> &'static [&'static str] {
        &["pipeline_board_closed", "pipeline_board_by_stage"]
    }

    fn stream_types(&self) -> &'static [&'static str] {
        &["opportunity"]
    }

    fn apply<'a>(&'a self, tx: &'a crate::Tx<'_>, event: &'a RecordedEvent) -> ApplyFuture<'a> {
        Box::pin(async move {
            if event.stream_type != Opportunity::STREAM_TYPE {
                return Ok(());
            }
            let Some((deal, decoded)) =
                crate::state::evolve_row::<Opportunity>(tx, STATE, event).await?
            else {
                return Ok(());
            };
            let amount = deal.amount.as_ref().map(|m| m.amount_minor);
            let currency = deal.amount.as_ref().map(|m| m.currency.clone());
            let weighted = amount.map(|a| {
                i64::try_from(i128::from(a) * i128::from(deal.probability_bp) / 10_000)
                    .unwrap_or(i64::MAX)
            });
            let deal = crate::state::kept(tx, STATE, event, deal);
            let state_json = crate::state::cached(tx, &*deal);
            let outcome = text(&deal.outcome).unwrap_or_default();
            let category = deal.category.as_ref().and_then(text);
            let archived = deal.meta.lifecycle == crm_domain::common::Lifecycle::Archived;
            let close_date = deal.close_date;
            let probability = i32::try_from(deal.probability_bp).unwrap_or(i32::MAX);
            let position = i64::try_from(event.global_position).unwrap_or(i64::MAX);
            tx.execute(
                "INSERT INTO pipeline_board (tenant_id, deal_id, name, pipeline_id, stage, outcome, \
                   archived, amount_minor, currency, probability_bp, weighted_minor, category, \
                   close_date, owner, state, position, closed_at, stalled) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
                   $18) \
                 ON CONFLICT (tenant_id, deal_id) DO UPDATE SET name = EXCLUDED.name, \
                   pipeline_id = EXCLUDED.pipeline_id, stage = EXCLUDED.stage, \
                   outcome = EXCLUDED.outcome, archived = EXCLUDED.archived, \
                   amount_minor = EXCLUDED.amount_minor, currency = EXCLUDED.currency, \
                   probability_bp = EXCLUDED.probability_bp, \
                   weighted_minor = EXCLUDED.weighted_minor, category = EXCLUDED.category, \
                   close_date = EXCLUDED.close_date, owner = EXCLUDED.owner, \
                   state = EXCLUDED.state, position = EXCLUDED.position, \
                   stalled = EXCLUDED.stalled",
                &[
                    &event.tenant_id,
                    &event.stream_id,
                    &deal.name,
                    &deal.pipeline_id,
                    &deal.stage,
                    &outcome,
                    &archived,
                    &amount,
                    &currency,
                    &probability,
                    &weighted,
                    &category,
                    &close_date,
                    &deal.owner,
                    &state_json,
                    &position,
                    // Set only by the statement below (a new row is not
                    // closed; an update keeps it). A parameter, so that a
                    // close in the same rebuild chunk can fold into a new
                    // row's insert.
                    &None::<std::time::SystemTime>,
                    &deal.stalled,
                ],
            )
            .await?;
            // When the deal was won or lost (business time): set by the
            // event that closes it, cleared by the one that reopens it (a
            // closed deal is reopened before it can close again), kept in
            // between. A statement of its own, so that the row's repeats
            // in a batch collapse into one write.
            let closed_at: Option<Option<std::time::SystemTime>> = match &*decoded {
                OpportunityEvent::Won(won) => Some(Some(won.occurred_at.into())),
                OpportunityEvent::Lost(lost) => Some(Some(lost.occurred_at.into())),
                OpportunityEvent::Reopened(_) => Some(None),
                _ => None,
            };
            if let Some(closed_at) = closed_at {
                tx.execute(
                    "UPDATE pipeline_board SET closed_at = $3 WHERE tenant_id = $1 AND deal_id = $2",
                    &[&event.tenant_id, &event.stream_id, &closed_at],
                )
                .await?;
            }
            Ok(())
        })
    }
}
