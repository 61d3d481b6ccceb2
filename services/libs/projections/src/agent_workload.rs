//! `agent_workload`: per agent, availability (status, capacity, skills), the
//! queues they belong to, their open tickets (in all and per channel) and
//! when a ticket was last assigned to them (DOMAIN.md §5.2), for
//! `GetAgentLoad`.
//!
//! Availability comes from `AgentAvailabilityChanged`, membership from
//! `QueuePublished` (each version replaces the queue's members). Each
//! ticket's row keeps its state as the domain's own `evolve` builds it, so
//! the assignee is exactly the aggregate's (an assignment, or an agent's
//! first reply on an unassigned ticket); a ticket counts as open for its
//! assignee until solved or closed, and again when reopened. The open
//! counts are summed per agent at query time from the tickets' rows (an
//! index covers the open ones). `last_assigned_at` is the latest business
//! time of a `TicketAssigned` naming the agent.
use crm_domain::configuration::{AgentAvailability, ConfigContent, Published, Queue};
use crm_domain::ticket::{Ticket, TicketEvent, TicketStatus};
use crm_event_store::RecordedEvent;

use crate::runtime::{ApplyError, ApplyFuture, Projection};
use crate::state::decode;

/// The row state [`crate::state::evolve_row`] reads (a `static`: the
/// rebuild cache knows the row by its address).
static STATE: &str =
    "SELECT state FROM agent_workload_tickets WHERE tenant_id = $1 AND ticket_id = $2";

pub struct AgentWorkload;

pub const NAME: &str = "agent_workload";

/// An agent seen only as an assignee or queue member, who never published
/// availability.
pub const UNKNOWN_STATUS: &str = "unknown";

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS agent_workload (
    tenant_id        text        NOT NULL,
    agent            text        NOT NULL,
    status           text        NOT NULL,
    capacity         integer     NOT NULL,
    skills           text[]      NOT NULL,
    last_assigned_at timestamptz,
    position         bigint      NOT NULL,
    PRIMARY KEY (tenant_id, agent)
) WITH (fillfactor = 70);
CREATE TABLE IF NOT EXISTS agent_workload_members (
    tenant_id text NOT NULL,
    queue_id  text NOT NULL,
    agent     text NOT NULL,
    PRIMARY KEY (tenant_id, queue_id, agent)
);
CREATE TABLE IF NOT EXISTS agent_workload_tickets (
    tenant_id text    NOT NULL,
    ticket_id uuid    NOT NULL,
    channel   text    NOT NULL,
    assignee  text    NOT NULL,
    open      boolean NOT NULL,
    state     json,           -- NULL after a rebuild (crate::state)
    position  bigint  NOT NULL,
    PRIMARY KEY (tenant_id, ticket_id)
) WITH (fillfactor = 70);
ALTER TABLE agent_workload_tickets ALTER COLUMN state DROP NOT NULL;
CREATE INDEX IF NOT EXISTS agent_workload_open
    ON agent_workload_tickets (tenant_id, assignee, channel) WHERE open";

fn position(event: &RecordedEvent) -> i64 {
    i64::try_from(event.global_position).unwrap_or(i64::MAX)
}

/// Adds `agent` with an unknown status when first seen.
async fn known(tx: &crate::Tx<'_>, event: &RecordedEvent, agent: &str) -> Result<(), ApplyError> {
    tx.execute(
        "INSERT INTO agent_workload (tenant_id, agent, status, capacity, skills, position) \
         VALUES ($1, $2, $3, 0, '{}'::text[], $4) ON CONFLICT (tenant_id, agent) DO NOTHING",
        &[&event.tenant_id, &agent, &UNKNOWN_STATUS, &position(event)],
    )
    .await?;
    Ok(())
}

impl AgentWorkload {
    async fn on_availability(tx: &crate::Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
        let Some(published) = decode::<Published<AgentAvailability>>(event)? else {
            return Ok(());
        };
        let content = published.content;
        tx.execute(
            "INSERT INTO agent_workload (tenant_id, agent, status, capacity, skills, position) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, agent) DO UPDATE SET \
               status = EXCLUDED.status, capacity = EXCLUDED.capacity, \
               skills = EXCLUDED.skills, position = EXCLUDED.position",
            &[
                &event.tenant_id,
                &content.agent,
                &content.status,
                &i32::try_from(content.capacity).unwrap_or(i32::MAX),
                &content.skills,
                &position(event),
            ],
        )
        .await?;
        Ok(())
    }

    async fn on_queue(tx: &crate::Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
        let Some(published) = decode::<Published<Queue>>(event)? else {
            return Ok(());
        };
        let queue_id = event.stream_id.to_string();
        tx.execute(
            "DELETE FROM agent_workload_members WHERE tenant_id = $1 AND queue_id = $2",
            &[&event.tenant_id, &queue_id],
        )
        .await?;
        for member in &published.content.members {
            tx.execute(
                "INSERT INTO agent_workload_members (tenant_id, queue_id, agent) \
                 VALUES ($1, $2, $3) ON CONFLICT (tenant_id, queue_id, agent) DO NOTHING",
                &[&event.tenant_id, &queue_id, member],
            )
            .await?;
            known(tx, event, member).await?;
        }
        Ok(())
    }

    async fn on_ticket(tx: &crate::Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
        let Some((ticket, decoded)) = crate::state::evolve_row::<Ticket>(tx, STATE, event).await?
        else {
            return Ok(());
        };
        // Set by the ticket's first event (it is opened), which inserts the
        // row; later events keep it.
        let channel = match &*decoded {
            TicketEvent::Opened(opened) => opened.channel.name(),
            _ => "",
        };
        let assignee = ticket.assignee.clone().unwrap_or_default();
        let open = ticket.exists
            && !matches!(
                ticket.status,
                Some(TicketStatus::Solved | TicketStatus::Closed)
            );
        let ticket = crate::state::kept(tx, STATE, event, ticket);
        let state = crate::state::cached(tx, &*ticket);
        tx.execute(
            "INSERT INTO agent_workload_tickets (tenant_id, ticket_id, channel, assignee, open, \
               state, position) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (tenant_id, ticket_id) DO UPDATE SET \
               assignee = EXCLUDED.assignee, open = EXCLUDED.open, state = EXCLUDED.state, \
               position = EXCLUDED.position",
            &[
                &event.tenant_id,
                &event.stream_id,
                &channel,
                &assignee,
                &open,
                &state,
                &position(event),
            ],
        )
        .await?;
        if !assignee.is_empty() {
            known(tx, event, &assignee).await?;
        }
        if let TicketEvent::Assigned(assigned) = &*decoded
            && let Some(agent) = &assigned.assignee
        {
            let at: std::time::SystemTime = assigned.occurred_at.into();
            tx.execute(
                "UPDATE agent_workload SET last_assigned_at = GREATEST(last_assigned_at, $3), \
                   position = $4 WHERE tenant_id = $1 AND agent = $2",
                &[&event.tenant_id, agent, &at, &position(event)],
            )
            .await?;
        }
        Ok(())
    }
}

impl Projection for AgentWorkload {
    crate::projection_names!(
        NAME,
        SCHEMA,
        [
            "agent_workload",
            "agent_workload_members",
            "agent_workload_tickets"
        ]
    );

    fn query_indexes(&self) -> &'static [&'static str] {
        &["agent_workload_open"]
    }

    fn stream_types(&self) -> &'static [&'static str] {
        &["agent", "queue", "ticket"]
    }

    fn apply<'a>(&'a self, tx: &'a crate::Tx<'_>, event: &'a RecordedEvent) -> ApplyFuture<'a> {
        match event.stream_type.as_str() {
            t if t == AgentAvailability::STREAM_TYPE => Box::pin(Self::on_availability(tx, event)),
            t if t == Queue::STREAM_TYPE => Box::pin(Self::on_queue(tx, event)),
            _ => Box::pin(Self::on_ticket(tx, event)),
        }
    }
}
