//! `service_queue`: one row per ticket with its queue, status, priority,
//! assignee and when it was opened (DOMAIN.md §5.2), for `ListQueue`,
//! `GetQueueStats` and `GetBacklogAging`.
use crm_domain::ticket::{Priority, Ticket, TicketEvent, TicketType};
use crm_event_store::RecordedEvent;

use crate::runtime::{ApplyFuture, Projection};

/// The row state [`crate::state::evolve_row`] reads (a `static`: the
/// rebuild cache knows the row by its address).
static STATE: &str = "SELECT state FROM service_queue WHERE tenant_id = $1 AND ticket_id = $2";

pub struct ServiceQueue;

pub const NAME: &str = "service_queue";

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS service_queue (
    tenant_id        text        NOT NULL,
    ticket_id        uuid        NOT NULL,
    queue            text        NOT NULL,
    status           text        NOT NULL,
    priority         text        NOT NULL,
    priority_rank    smallint    NOT NULL,
    ticket_type      text        NOT NULL,
    complaint        boolean     NOT NULL,
    assignee         text        NOT NULL,
    opened_at        timestamptz NOT NULL,
    escalation_level smallint    NOT NULL,
    reopen_count     integer     NOT NULL,
    status_since     timestamptz,
    state            json,               -- NULL after a rebuild (crate::state)
    position         bigint      NOT NULL,
    PRIMARY KEY (tenant_id, ticket_id)
) WITH (fillfactor = 70);
ALTER TABLE service_queue ALTER COLUMN state DROP NOT NULL;
CREATE INDEX IF NOT EXISTS service_queue_open
    ON service_queue (tenant_id, queue, priority_rank, opened_at, ticket_id)
    WHERE status NOT IN ('solved', 'closed');
ALTER TABLE service_queue ADD COLUMN IF NOT EXISTS status_since timestamptz;
CREATE INDEX IF NOT EXISTS service_queue_waiting
    ON service_queue (status_since) WHERE status IN ('pending', 'solved')";

/// Most urgent first.
pub fn priority_rank(priority: Priority) -> i16 {
    match priority {
        Priority::Urgent => 0,
        Priority::High => 1,
        Priority::Normal => 2,
        Priority::Low => 3,
    }
}

impl Projection for ServiceQueue {
    crate::projection_names!(NAME, SCHEMA, ["service_queue"]);

    fn query_indexes(&self) -> &'static [&'static str] {
        &["service_queue_open", "service_queue_waiting"]
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
            // The opening instant is the business time of TicketOpened (else
            // when the first event seen was recorded); TicketOpened is a
            // ticket's first event, so later events keep the stored one (the
            // upsert leaves it alone).
            let opened_at: std::time::SystemTime = match &*decoded {
                TicketEvent::Opened(opened) => opened.occurred_at.into(),
                _ => event.recorded_at,
            };
            let priority = ticket.priority.unwrap_or(Priority::Normal);
            let ticket = crate::state::kept(tx, STATE, event, ticket);
            let state = crate::state::cached(tx, &*ticket);
            tx.execute(
                "INSERT INTO service_queue (tenant_id, ticket_id, queue, status, priority, \
                   priority_rank, ticket_type, complaint, assignee, opened_at, escalation_level, \
                   reopen_count, state, position, status_since) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
                 ON CONFLICT (tenant_id, ticket_id) DO UPDATE SET queue = EXCLUDED.queue, \
                   status = EXCLUDED.status, priority = EXCLUDED.priority, \
                   priority_rank = EXCLUDED.priority_rank, ticket_type = EXCLUDED.ticket_type, \
                   complaint = EXCLUDED.complaint, assignee = EXCLUDED.assignee, \
                   escalation_level = EXCLUDED.escalation_level, \
                   reopen_count = EXCLUDED.reopen_count, state = EXCLUDED.state, \
                   position = EXCLUDED.position, status_since = EXCLUDED.status_since",
                &[
                    &event.tenant_id,
                    &event.stream_id,
                    &ticket.queue.clone().unwrap_or_default(),
                    &ticket.status.map(|s| s.name()).unwrap_or("new"),
                    &priority.name(),
                    &priority_rank(priority),
                    &ticket.ticket_type.map(|t| t.name()).unwrap_or("question"),
                    &(ticket.ticket_type == Some(TicketType::Complaint)),
                    &ticket.assignee.clone().unwrap_or_default(),
                    &opened_at,
                    &i16::from(ticket.escalation_level),
                    &i32::try_from(ticket.reopen_count).unwrap_or(i32::MAX),
                    &state,
                    &i64::try_from(event.global_position).unwrap_or(i64::MAX),
                    &ticket.status_since.map(std::time::SystemTime::from),
                ],
            )
            .await?;
            Ok(())
        })
    }
}
