//! `service_metrics`: one row per ticket with its service times, reopens,
//! satisfaction rating and complaint facts (DOMAIN.md §5.2, §5.3), for
//! `GetServiceMetrics`, `GetCsat` and `GetComplaintStats`.
//!
//! - **First response**: opened → the first public agent message, in
//!   calendar seconds (shown as minutes). Business minutes are the SLA
//!   clocks' (`sla_clock`, `GetTicketSla`): they depend on the policy and
//!   calendar in force, which this model does not follow.
//! - **Resolution**: opened → the latest solve. A reopen clears it (and the
//!   root cause) until the ticket is solved again.
//! - **Credit**: a solved ticket is credited to the assignee and queue of
//!   its `TicketSolved` snapshot; an unsolved one to its current assignee
//!   and queue. A later reassignment does not move the credit.
//! - **CSAT**: the latest rating of the ticket (log order, as the aggregate
//!   keeps it) with the assignee and queue of that rating's snapshot, dated
//!   by its business time.
//! - **Complaints**: tickets whose current type is `complaint`, with their
//!   category and, once solved, root cause.
use crm_domain::ticket::{AuthorRole, Ticket, TicketEvent, TicketType};
use crm_event_store::RecordedEvent;
use std::time::SystemTime;

use crate::runtime::{ApplyError, ApplyFuture, Projection};

/// The row state [`crate::state::evolve_row`] reads (a `static`: the
/// rebuild cache knows the row by its address).
static STATE: &str = "SELECT state FROM service_metrics WHERE tenant_id = $1 AND ticket_id = $2";

pub struct ServiceMetrics;

pub const NAME: &str = "service_metrics";

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS service_metrics (
    tenant_id              text        NOT NULL,
    ticket_id              uuid        NOT NULL,
    ticket_type            text        NOT NULL,
    complaint              boolean     NOT NULL,
    category               text        NOT NULL,
    channel                text        NOT NULL,
    queue                  text        NOT NULL,
    agent                  text        NOT NULL,
    opened_at              timestamptz NOT NULL,
    first_response_at      timestamptz,
    first_response_seconds bigint,
    solved_at              timestamptz,
    resolution_seconds     bigint,
    root_cause             text        NOT NULL,
    reopen_count           integer     NOT NULL,
    csat_score             smallint,
    csat_at                timestamptz,
    csat_agent             text,
    csat_queue             text,
    state                  json,               -- NULL after a rebuild (crate::state)
    position               bigint      NOT NULL,
    PRIMARY KEY (tenant_id, ticket_id)
) WITH (fillfactor = 70);
ALTER TABLE service_metrics ALTER COLUMN state DROP NOT NULL;
CREATE INDEX IF NOT EXISTS service_metrics_opened ON service_metrics (tenant_id, opened_at);
CREATE INDEX IF NOT EXISTS service_metrics_solved
    ON service_metrics (tenant_id, solved_at) WHERE solved_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS service_metrics_csat
    ON service_metrics (tenant_id, csat_at) WHERE csat_at IS NOT NULL";

/// The row's figures besides the ticket's state.
#[derive(Clone, Default)]
struct Figures {
    channel: String,
    queue: String,
    agent: String,
    opened_at: Option<SystemTime>,
    first_response_at: Option<SystemTime>,
    solved_at: Option<SystemTime>,
    root_cause: String,
    csat_score: Option<i16>,
    csat_at: Option<SystemTime>,
    csat_agent: Option<String>,
    csat_queue: Option<String>,
}

/// Whole seconds from `from` to `to` (never negative: a backdated reply
/// before the opening counts as immediate).
fn seconds(from: Option<SystemTime>, to: Option<SystemTime>) -> Option<i64> {
    let (from, to) = (from?, to?);
    Some(
        to.duration_since(from)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
    )
}

/// Reads a row's [`Figures`] (a `static`: the rebuild cache knows them by
/// its address).
static FIGURES: &str = "SELECT channel, queue, agent, opened_at, first_response_at, solved_at, \
       root_cause, csat_score, csat_at, csat_agent, csat_queue \
     FROM service_metrics WHERE tenant_id = $1 AND ticket_id = $2";

impl Figures {
    /// As PostgreSQL stores them (times to the microsecond), for the
    /// rebuild cache: the figures a rebuild goes on from must be the ones a
    /// read would return.
    fn as_stored(&self) -> Self {
        let micros = |t: Option<SystemTime>| t.map(crate::state::to_microseconds);
        Self {
            opened_at: micros(self.opened_at),
            first_response_at: micros(self.first_response_at),
            solved_at: micros(self.solved_at),
            csat_at: micros(self.csat_at),
            ..self.clone()
        }
    }
}

impl ServiceMetrics {
    async fn figures(tx: &crate::Tx<'_>, event: &RecordedEvent) -> Result<Figures, ApplyError> {
        if let Some(figures) = tx
            .cache()
            .and_then(|cache| cache.take::<Figures>(FIGURES, &event.tenant_id, event.stream_id))
        {
            return Ok(figures);
        }
        if crate::state::first_of_stream(event) {
            return Ok(Figures::default());
        }
        let row = tx
            .query_opt(FIGURES, &[&event.tenant_id, &event.stream_id])
            .await?;
        Ok(row.map_or_else(Figures::default, |row| Figures {
            channel: row.get(0),
            queue: row.get(1),
            agent: row.get(2),
            opened_at: row.get(3),
            first_response_at: row.get(4),
            solved_at: row.get(5),
            root_cause: row.get(6),
            csat_score: row.get(7),
            csat_at: row.get(8),
            csat_agent: row.get(9),
            csat_queue: row.get(10),
        }))
    }
}

impl Projection for ServiceMetrics {
    crate::projection_names!(NAME, SCHEMA, ["service_metrics"]);

    fn query_indexes(&self) -> &'static [&'static str] {
        &[
            "service_metrics_opened",
            "service_metrics_solved",
            "service_metrics_csat",
        ]
    }

    fn stream_types(&self) -> &'static [&'static str] {
        &["ticket"]
    }

    fn apply<'a>(&'a self, tx: &'a crate::Tx<'_>, event: &'a RecordedEvent) -> ApplyFuture<'a> {
        Box::pin(async move {
            let Some((ticket, decoded)) =
                crate::state::evolve_row::<Ticket>(tx, STATE, event).await?
            else {
                return Ok(());
            };
            let mut figures = Self::figures(tx, event).await?;
            match &*decoded {
                TicketEvent::Opened(opened) => {
                    figures.channel = opened.channel.name().to_owned();
                    figures.opened_at = Some(opened.occurred_at.into());
                }
                TicketEvent::MessageAdded(message)
                    if message.author_role == AuthorRole::Agent
                        && message.public
                        && figures.first_response_at.is_none() =>
                {
                    figures.first_response_at = Some(message.occurred_at.into());
                }
                TicketEvent::Solved(solved) => {
                    figures.solved_at = Some(solved.occurred_at.into());
                    figures.root_cause = solved.root_cause.clone();
                    figures.agent = solved.snapshot.assignee.clone().unwrap_or_default();
                    figures.queue = solved.snapshot.queue.clone().unwrap_or_default();
                }
                TicketEvent::Reopened(_) => {
                    figures.solved_at = None;
                    figures.root_cause.clear();
                }
                TicketEvent::CsatReceived(rating) => {
                    figures.csat_score = Some(i16::from(rating.score));
                    figures.csat_at = Some(rating.occurred_at.into());
                    figures.csat_agent = Some(rating.snapshot.assignee.clone().unwrap_or_default());
                    figures.csat_queue = Some(rating.snapshot.queue.clone().unwrap_or_default());
                }
                _ => {}
            }
            if figures.solved_at.is_none() {
                figures.agent = ticket.assignee.clone().unwrap_or_default();
                figures.queue = ticket.queue.clone().unwrap_or_default();
            }
            let Some(opened_at) = figures.opened_at else {
                return Ok(()); // a ticket opened before the log's start
            };
            let ticket = crate::state::kept(tx, STATE, event, ticket);
            let state = crate::state::cached(tx, &*ticket);
            crate::state::written(tx, FIGURES, event, figures.as_stored());
            tx.execute(
                "INSERT INTO service_metrics (tenant_id, ticket_id, ticket_type, complaint, \
                   category, channel, queue, agent, opened_at, first_response_at, \
                   first_response_seconds, solved_at, resolution_seconds, root_cause, \
                   reopen_count, csat_score, csat_at, csat_agent, csat_queue, state, position) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
                   $17, $18, $19, $20, $21) \
                 ON CONFLICT (tenant_id, ticket_id) DO UPDATE SET \
                   ticket_type = EXCLUDED.ticket_type, complaint = EXCLUDED.complaint, \
                   category = EXCLUDED.category, channel = EXCLUDED.channel, \
                   queue = EXCLUDED.queue, agent = EXCLUDED.agent, \
                   opened_at = EXCLUDED.opened_at, first_response_at = EXCLUDED.first_response_at, \
                   first_response_seconds = EXCLUDED.first_response_seconds, \
                   solved_at = EXCLUDED.solved_at, resolution_seconds = EXCLUDED.resolution_seconds, \
                   root_cause = EXCLUDED.root_cause, reopen_count = EXCLUDED.reopen_count, \
                   csat_score = EXCLUDED.csat_score, csat_at = EXCLUDED.csat_at, \
                   csat_agent = EXCLUDED.csat_agent, csat_queue = EXCLUDED.csat_queue, \
                   state = EXCLUDED.state, position = EXCLUDED.position",
                &[
                    &event.tenant_id,
                    &event.stream_id,
                    &ticket.ticket_type.map(|t| t.name()).unwrap_or("question"),
                    &(ticket.ticket_type == Some(TicketType::Complaint)),
                    &ticket.category,
                    &figures.channel,
                    &figures.queue,
                    &figures.agent,
                    &opened_at,
                    &figures.first_response_at,
                    &seconds(figures.opened_at, figures.first_response_at),
                    &figures.solved_at,
                    &seconds(figures.opened_at, figures.solved_at),
                    &figures.root_cause,
                    &i32::try_from(ticket.reopen_count).unwrap_or(i32::MAX),
                    &figures.csat_score,
                    &figures.csat_at,
                    &figures.csat_agent,
                    &figures.csat_queue,
                    &state,
                    &i64::try_from(event.global_position).unwrap_or(i64::MAX),
                ],
            )
            .await?;
            Ok(())
        })
    }
}
