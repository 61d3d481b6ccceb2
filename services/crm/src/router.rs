//! The router (DOMAIN.md §5.2): a process manager that gives a ticket
//! waiting in a queue to an eligible agent.
//!
//! A ticket **waits** while it is open (not solved or closed), has a queue
//! and no assignee. An agent is **eligible** for a queue when online, a
//! member of it, holding every skill the queue asks for, and below capacity
//! (open tickets < capacity). The queue's routing picks among them:
//! `round_robin` the oldest `last_assigned_at` (never assigned first, then
//! by agent id), `least_loaded` the lowest open ÷ capacity, ties by round
//! robin ([`choose`]).
//!
//! | event | routes |
//! |---|---|
//! | a ticket event leaving it waiting (it entered a queue without an assignee, or still waits) | that ticket |
//! | a ticket of an agent's solved, closed or given to someone else | the waiting tickets of the agent's queues |
//! | AgentAvailabilityChanged to online (coming online, more capacity, new skills) | the waiting tickets of the agent's queues |
//! | QueuePublished (members, skills or routing changed) | the queue's waiting tickets |
//!
//! Waiting tickets go most urgent first, then longest waiting. With no
//! eligible agent a ticket waits until one of these events; when its queue
//! names an overflow queue, the scheduler moves a ticket that has waited
//! `overflow_after_minutes` there (unassigned, method `overflow`), where it
//! is routed afresh.
//!
//! It runs on the projection runtime like the SLA process manager
//! (`sla.rs`, ADR 0007): events in log order, its own tables (queues,
//! agents, tickets as the domain's `evolve` builds them) written in the
//! same transaction as its position. Each `Assign` it sends:
//! - carries the idempotency key `router:<triggering event id>:<n>`, so a
//!   batch retried after a failure appends nothing twice (its tables are
//!   rolled back with it, so it decides the same again);
//! - expects the ticket's stream at the version the router last saw, so it
//!   never overrides what happened to the ticket since (a manual
//!   assignment, a solve): on a conflict it lets the ticket be, and routes
//!   it again from the later events;
//! - updates its own tables at once (the ticket's assignee, the agent's
//!   `last_assigned_at`), so the next decision sees it before the
//!   `TicketAssigned` comes back through the log.
//!
//! Every row keeps the version of the stream it was last updated from, and
//! an event at or below it is skipped: replaying the log over the tables
//! (a lost checkpoint) decides nothing again.
use std::cmp::Ordering;
use std::collections::BTreeSet;

use crm_domain::configuration::{AgentAvailability, ConfigContent, Published, Queue};
use crm_domain::ticket::{Priority, Ticket, TicketCommand, TicketEvent, TicketStatus};
use crm_domain::{Aggregate, DomainError, TenantId};
use crm_event_store::RecordedEvent;
use crm_projections::Tx;
use crm_projections::{ApplyError, Projection, priority_rank};
use jiff::Timestamp;
use uuid::Uuid;

use crate::command::{Caller, CommandHandler, Options, ServiceError};
use crate::process::{decode, malformed};

pub const NAME: &str = "router";

/// Most waiting tickets one event looks at.
const MAX_WAITING: i64 = 500;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS router_queues (
    tenant_id text    NOT NULL,
    queue_id  text    NOT NULL,
    version   bigint  NOT NULL,
    members   text[]  NOT NULL,
    skills    text[]  NOT NULL,
    routing   text    NOT NULL,
    PRIMARY KEY (tenant_id, queue_id)
);
CREATE TABLE IF NOT EXISTS router_agents (
    tenant_id        text        NOT NULL,
    agent            text        NOT NULL,
    version          bigint      NOT NULL,
    status           text        NOT NULL,
    capacity         integer     NOT NULL,
    skills           text[]      NOT NULL,
    last_assigned_at timestamptz,
    PRIMARY KEY (tenant_id, agent)
);
CREATE TABLE IF NOT EXISTS router_tickets (
    tenant_id     text        NOT NULL,
    ticket_id     uuid        NOT NULL,
    version       bigint      NOT NULL,
    queue         text        NOT NULL,
    assignee      text        NOT NULL,
    open          boolean     NOT NULL,
    priority_rank smallint    NOT NULL,
    waiting_since timestamptz,
    state         jsonb       NOT NULL,
    PRIMARY KEY (tenant_id, ticket_id)
);
CREATE INDEX IF NOT EXISTS router_tickets_waiting
    ON router_tickets (tenant_id, queue, priority_rank, waiting_since, ticket_id)
    WHERE waiting_since IS NOT NULL;
CREATE INDEX IF NOT EXISTS router_tickets_open
    ON router_tickets (tenant_id, assignee) WHERE open;
-- Where and when a queue's waiting tickets overflow (the scheduler reads it).
ALTER TABLE router_queues ADD COLUMN IF NOT EXISTS overflow_queue text;
ALTER TABLE router_queues ADD COLUMN IF NOT EXISTS overflow_after_minutes integer";

/// An agent the router may give a ticket of some queue to: online, a
/// member, skilled (checked by the caller), with their load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub agent: String,
    pub open: u32,
    pub capacity: u32,
    pub last_assigned_at: Option<Timestamp>,
}

/// Round robin order: never assigned first, then the oldest last
/// assignment, then by agent id.
fn round_robin(a: &Candidate, b: &Candidate) -> Ordering {
    (a.last_assigned_at, &a.agent).cmp(&(b.last_assigned_at, &b.agent))
}

/// Least loaded order: lowest open ÷ capacity (compared exactly, as
/// cross products), ties by round robin.
fn least_loaded(a: &Candidate, b: &Candidate) -> Ordering {
    let load_a = u64::from(a.open) * u64::from(b.capacity);
    let load_b = u64::from(b.open) * u64::from(a.capacity);
    load_a.cmp(&load_b).then_with(|| round_robin(a, b))
}

/// The agent `routing` gives the next ticket to, among those below
/// capacity; `None` when nobody is.
pub fn choose<'a>(routing: &str, candidates: &'a [Candidate]) -> Option<&'a Candidate> {
    let below_capacity = candidates.iter().filter(|c| c.open < c.capacity);
    match routing {
        "least_loaded" => below_capacity.min_by(|a, b| least_loaded(a, b)),
        _ => below_capacity.min_by(|a, b| round_robin(a, b)),
    }
}

pub struct Router {
    handler: CommandHandler,
}

impl Router {
    pub fn new(handler: CommandHandler) -> Self {
        Self { handler }
    }
}

/// A ticket as the router keeps it.
#[derive(Default)]
struct TicketRow {
    version: i64,
    queue: String,
    assignee: String,
    open: bool,
    waiting_since: Option<Timestamp>,
    state: Ticket,
}

impl TicketRow {
    fn waiting(&self) -> bool {
        self.open && !self.queue.is_empty() && self.assignee.is_empty()
    }
}

/// A ticket waiting for an agent.
struct Waiting {
    ticket_id: Uuid,
    version: i64,
    queue: String,
    since: Timestamp,
}

/// Commands sent for one event, numbered for their idempotency keys.
struct Trigger<'a> {
    event: &'a RecordedEvent,
    occurred_at: Timestamp,
    sent: usize,
}

/// The business time of an event (every payload carries `occurred_at`),
/// or its commit time.
fn occurred_at(event: &RecordedEvent) -> Timestamp {
    #[derive(serde::Deserialize)]
    struct When {
        occurred_at: Timestamp,
    }
    serde_json::from_str::<When>(event.payload.as_str())
        .ok()
        .map(|w| w.occurred_at)
        .or_else(|| Timestamp::try_from(event.recorded_at).ok())
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

fn version(event: &RecordedEvent) -> i64 {
    i64::try_from(event.stream_version).unwrap_or(i64::MAX)
}

fn system(time: Option<Timestamp>) -> Option<std::time::SystemTime> {
    time.map(Into::into)
}

fn timestamp(time: Option<std::time::SystemTime>) -> Option<Timestamp> {
    time.and_then(|t| Timestamp::try_from(t).ok())
}

impl Router {
    async fn ticket(tx: &Tx<'_>, event: &RecordedEvent) -> Result<Option<TicketRow>, ApplyError> {
        let row = tx
            .query_opt(
                "SELECT version, queue, assignee, open, waiting_since, state FROM router_tickets \
                 WHERE tenant_id = $1 AND ticket_id = $2",
                &[&event.tenant_id, &event.stream_id],
            )
            .await?;
        row.map(|row| {
            Ok(TicketRow {
                version: row.get(0),
                queue: row.get(1),
                assignee: row.get(2),
                open: row.get(3),
                waiting_since: timestamp(row.get(4)),
                state: serde_json::from_value(row.get(5))
                    .map_err(|e| malformed(event, format!("stored state: {e}")))?,
            })
        })
        .transpose()
    }

    async fn on_ticket(
        &self,
        tx: &Tx<'_>,
        event: &RecordedEvent,
        decoded: TicketEvent,
    ) -> Result<(), ApplyError> {
        let before = Self::ticket(tx, event).await?.unwrap_or_default();
        if version(event) <= before.version {
            return Ok(()); // seen before
        }
        let at = occurred_at(event);
        let state = before.state.clone().evolve(&decoded);
        let mut after = TicketRow {
            version: version(event),
            queue: state.queue.clone().unwrap_or_default(),
            assignee: state.assignee.clone().unwrap_or_default(),
            open: state.exists
                && !matches!(
                    state.status,
                    Some(TicketStatus::Solved | TicketStatus::Closed)
                ),
            waiting_since: None,
            state,
        };
        if after.waiting() {
            after.waiting_since = if before.waiting() && before.queue == after.queue {
                before.waiting_since
            } else {
                Some(at)
            };
        }
        let stored = serde_json::to_value(&after.state).map_err(|e| malformed(event, e))?;
        let rank = priority_rank(after.state.priority.unwrap_or(Priority::Normal));
        tx.execute(
            "INSERT INTO router_tickets (tenant_id, ticket_id, version, queue, assignee, open, \
               priority_rank, waiting_since, state) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (tenant_id, ticket_id) DO UPDATE SET version = EXCLUDED.version, \
               queue = EXCLUDED.queue, assignee = EXCLUDED.assignee, open = EXCLUDED.open, \
               priority_rank = EXCLUDED.priority_rank, waiting_since = EXCLUDED.waiting_since, \
               state = EXCLUDED.state",
            &[
                &event.tenant_id,
                &event.stream_id,
                &after.version,
                &after.queue,
                &after.assignee,
                &after.open,
                &rank,
                &system(after.waiting_since),
                &stored,
            ],
        )
        .await?;
        if let TicketEvent::Assigned(assigned) = &decoded
            && let Some(agent) = &assigned.assignee
        {
            Self::assigned_at(tx, event, agent, assigned.occurred_at).await?;
        }
        let mut trigger = Trigger {
            event,
            occurred_at: at,
            sent: 0,
        };
        if let Some(since) = after.waiting_since {
            let waiting = Waiting {
                ticket_id: event.stream_id,
                version: after.version,
                queue: after.queue.clone(),
                since,
            };
            self.route(tx, &mut trigger, &waiting).await?;
        }
        let freed = before.open
            && !before.assignee.is_empty()
            && (!after.open || after.assignee != before.assignee);
        if freed {
            let queues = Self::queues_of(tx, event, &before.assignee).await?;
            self.drain(tx, &mut trigger, &queues).await?;
        }
        Ok(())
    }

    /// Records an assignment to `agent` at `at` (the latest wins).
    async fn assigned_at(
        tx: &Tx<'_>,
        event: &RecordedEvent,
        agent: &str,
        at: Timestamp,
    ) -> Result<(), ApplyError> {
        let at: std::time::SystemTime = at.into();
        tx.execute(
            "INSERT INTO router_agents (tenant_id, agent, version, status, capacity, skills, \
               last_assigned_at) VALUES ($1, $2, 0, 'offline', 0, '{}', $3) \
             ON CONFLICT (tenant_id, agent) DO UPDATE \
             SET last_assigned_at = GREATEST(router_agents.last_assigned_at, $3)",
            &[&event.tenant_id, &agent, &at],
        )
        .await?;
        Ok(())
    }

    async fn on_agent(&self, tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
        let Some(published) = decode::<Published<AgentAvailability>>(event)? else {
            return Ok(());
        };
        let agent = published.content;
        let seen: Option<i64> = tx
            .query_opt(
                "SELECT version FROM router_agents WHERE tenant_id = $1 AND agent = $2",
                &[&event.tenant_id, &agent.agent],
            )
            .await?
            .map(|row| row.get(0));
        if seen.is_some_and(|seen| version(event) <= seen) {
            return Ok(());
        }
        tx.execute(
            "INSERT INTO router_agents (tenant_id, agent, version, status, capacity, skills) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, agent) DO UPDATE SET \
               version = EXCLUDED.version, status = EXCLUDED.status, \
               capacity = EXCLUDED.capacity, skills = EXCLUDED.skills",
            &[
                &event.tenant_id,
                &agent.agent,
                &version(event),
                &agent.status,
                &i32::try_from(agent.capacity).unwrap_or(i32::MAX),
                &agent.skills,
            ],
        )
        .await?;
        if agent.status == "online" {
            let queues = Self::queues_of(tx, event, &agent.agent).await?;
            let mut trigger = Trigger {
                event,
                occurred_at: published.occurred_at,
                sent: 0,
            };
            self.drain(tx, &mut trigger, &queues).await?;
        }
        Ok(())
    }

    async fn on_queue(&self, tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
        let Some(published) = decode::<Published<Queue>>(event)? else {
            return Ok(());
        };
        let queue_id = event.stream_id.to_string();
        let seen: Option<i64> = tx
            .query_opt(
                "SELECT version FROM router_queues WHERE tenant_id = $1 AND queue_id = $2",
                &[&event.tenant_id, &queue_id],
            )
            .await?
            .map(|row| row.get(0));
        if seen.is_some_and(|seen| version(event) <= seen) {
            return Ok(());
        }
        let queue = published.content;
        let overflow = queue.overflow();
        tx.execute(
            "INSERT INTO router_queues (tenant_id, queue_id, version, members, skills, routing, \
               overflow_queue, overflow_after_minutes) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (tenant_id, queue_id) DO UPDATE SET \
               version = EXCLUDED.version, members = EXCLUDED.members, \
               skills = EXCLUDED.skills, routing = EXCLUDED.routing, \
               overflow_queue = EXCLUDED.overflow_queue, \
               overflow_after_minutes = EXCLUDED.overflow_after_minutes",
            &[
                &event.tenant_id,
                &queue_id,
                &version(event),
                &queue.members,
                &queue.skills,
                &queue.routing,
                &overflow.map(|(queue, _)| queue.to_string()),
                &overflow.map(|(_, minutes)| i32::try_from(minutes).unwrap_or(i32::MAX)),
            ],
        )
        .await?;
        let mut trigger = Trigger {
            event,
            occurred_at: published.occurred_at,
            sent: 0,
        };
        self.drain(tx, &mut trigger, &[queue_id]).await
    }

    /// The queues `agent` is a member of.
    async fn queues_of(
        tx: &Tx<'_>,
        event: &RecordedEvent,
        agent: &str,
    ) -> Result<Vec<String>, ApplyError> {
        let rows = tx
            .query(
                "SELECT queue_id FROM router_queues WHERE tenant_id = $1 AND $2 = ANY(members) \
                 ORDER BY queue_id",
                &[&event.tenant_id, &agent],
            )
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Routes the waiting tickets of `queues`, most urgent first, then
    /// longest waiting; a queue nobody is eligible for is passed over.
    async fn drain(
        &self,
        tx: &Tx<'_>,
        trigger: &mut Trigger<'_>,
        queues: &[String],
    ) -> Result<(), ApplyError> {
        if queues.is_empty() {
            return Ok(());
        }
        let rows = tx
            .query(
                "SELECT ticket_id, version, queue, waiting_since FROM router_tickets \
                 WHERE tenant_id = $1 AND queue = ANY($2) AND waiting_since IS NOT NULL \
                 ORDER BY priority_rank, waiting_since, ticket_id LIMIT $3",
                &[&trigger.event.tenant_id, &queues, &MAX_WAITING],
            )
            .await?;
        let mut exhausted = BTreeSet::new();
        for row in rows {
            let waiting = Waiting {
                ticket_id: row.get(0),
                version: row.get(1),
                queue: row.get(2),
                since: timestamp(row.get(3)).unwrap_or(trigger.occurred_at),
            };
            if exhausted.contains(&waiting.queue) {
                continue;
            }
            if !self.route(tx, trigger, &waiting).await? {
                exhausted.insert(waiting.queue);
                if exhausted.len() == queues.len() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Gives `waiting` to the agent its queue's routing picks. `false` when
    /// nobody is eligible for the queue.
    async fn route(
        &self,
        tx: &Tx<'_>,
        trigger: &mut Trigger<'_>,
        waiting: &Waiting,
    ) -> Result<bool, ApplyError> {
        let event = trigger.event;
        let Some(queue) = tx
            .query_opt(
                "SELECT routing, members, skills FROM router_queues \
                 WHERE tenant_id = $1 AND queue_id = $2",
                &[&event.tenant_id, &waiting.queue],
            )
            .await?
        else {
            return Ok(false); // a queue the router has not seen published
        };
        let routing: String = queue.get(0);
        let members: Vec<String> = queue.get(1);
        let skills: Vec<String> = queue.get(2);
        let rows = tx
            .query(
                "SELECT a.agent, a.capacity, a.last_assigned_at, \
                   (SELECT count(*) FROM router_tickets t \
                    WHERE t.tenant_id = a.tenant_id AND t.assignee = a.agent AND t.open) \
                 FROM router_agents a \
                 WHERE a.tenant_id = $1 AND a.agent = ANY($2) AND a.status = 'online' \
                   AND a.skills @> $3",
                &[&event.tenant_id, &members, &skills],
            )
            .await?;
        let candidates: Vec<Candidate> = rows
            .iter()
            .map(|row| Candidate {
                agent: row.get(0),
                capacity: u32::try_from(row.get::<_, i32>(1)).unwrap_or(0),
                last_assigned_at: timestamp(row.get(2)),
                open: u32::try_from(row.get::<_, i64>(3)).unwrap_or(u32::MAX),
            })
            .collect();
        let Some(chosen) = choose(&routing, &candidates) else {
            return Ok(false);
        };
        let agent = chosen.agent.clone();
        let at = trigger.occurred_at.max(waiting.since);
        let n = trigger.sent;
        trigger.sent += 1;
        let command = TicketCommand::Assign {
            queue: waiting.queue.clone(),
            assignee: Some(agent.clone()),
            method: routing,
            eligible: true,
            override_reason: String::new(),
        };
        if self.send(tx, event, n, waiting, at, command).await? {
            tx.execute(
                "UPDATE router_tickets SET assignee = $3, waiting_since = NULL \
                 WHERE tenant_id = $1 AND ticket_id = $2",
                &[&event.tenant_id, &waiting.ticket_id, &agent],
            )
            .await?;
            Self::assigned_at(tx, event, &agent, at).await?;
        }
        Ok(true)
    }

    /// Sends one assignment; `true` when it took effect (now or before, by
    /// its key), `false` when the ticket moved on meanwhile.
    async fn send(
        &self,
        tx: &Tx<'_>,
        event: &RecordedEvent,
        n: usize,
        waiting: &Waiting,
        occurred_at: Timestamp,
        command: TicketCommand,
    ) -> Result<bool, ApplyError> {
        // The writes queued before go first (see `process::Sender::send`).
        tx.flush().await?;
        let tenant = TenantId::parse(&event.tenant_id).map_err(|e| malformed(event, e))?;
        let mut caller = Caller::system(tenant, "system:router");
        caller.causation_id = Some(event.event_id.to_string());
        let mut options = Options::internal(format!("router:{}:{n}", event.event_id), occurred_at);
        options.expected_version = u64::try_from(waiting.version).ok();
        match self
            .handler
            .execute::<Ticket>(&caller, waiting.ticket_id, &options, command)
            .await
        {
            Ok(_) => Ok(true),
            // The ticket changed since the router last saw it (assigned by
            // hand, solved, closed, archived): its later events decide.
            Err(
                ServiceError::VersionConflict { .. }
                | ServiceError::Domain(
                    DomainError::InvalidTransition { .. }
                    | DomainError::NotFound
                    | DomainError::RecordArchived
                    | DomainError::RecordMerged { .. }
                    | DomainError::RecordErased,
                ),
            ) => Ok(false),
            Err(error @ (ServiceError::Unavailable(_) | ServiceError::Contention)) => {
                Err(ApplyError::Transient(error.to_string()))
            }
            Err(error) => Err(malformed(event, format!("assignment refused: {error}"))),
        }
    }
}

impl Projection for Router {
    crm_projections::projection_names!(
        NAME,
        SCHEMA,
        ["router_queues", "router_agents", "router_tickets"]
    );

    fn rebuildable(&self) -> bool {
        false
    }

    fn stream_types(&self) -> &'static [&'static str] {
        &["queue", "agent", "ticket"]
    }

    fn apply<'a>(
        &'a self,
        tx: &'a Tx<'_>,
        event: &'a RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            match event.stream_type.as_str() {
                t if t == Queue::STREAM_TYPE => self.on_queue(tx, event).await,
                t if t == AgentAvailability::STREAM_TYPE => self.on_agent(tx, event).await,
                t if t == Ticket::STREAM_TYPE => match decode::<TicketEvent>(event)? {
                    Some(decoded) => self.on_ticket(tx, event, decoded).await,
                    None => Ok(()),
                },
                _ => Ok(()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(name: &str, open: u32, capacity: u32, last: Option<&str>) -> Candidate {
        Candidate {
            agent: name.into(),
            open,
            capacity,
            last_assigned_at: last.map(|t| t.parse().unwrap()),
        }
    }

    #[test]
    fn round_robin_picks_the_longest_unassigned_below_capacity() {
        let agents = [
            agent("agent:a", 1, 2, Some("2026-03-02T09:03:00Z")),
            agent("agent:b", 0, 3, Some("2026-03-02T09:01:00Z")),
            agent("agent:c", 1, 2, Some("2026-03-02T09:02:00Z")),
        ];
        assert_eq!(choose("round_robin", &agents).unwrap().agent, "agent:b");
        // Never assigned goes first; ties by agent id.
        let fresh = [agent("agent:z", 0, 1, None), agent("agent:y", 0, 1, None)];
        assert_eq!(choose("round_robin", &fresh).unwrap().agent, "agent:y");
        // Full agents are passed over; nobody below capacity: nobody.
        let full = [agent("agent:a", 2, 2, None), agent("agent:b", 0, 0, None)];
        assert_eq!(choose("round_robin", &full), None);
    }

    #[test]
    fn least_loaded_compares_shares_exactly_and_ties_by_round_robin() {
        // Loads 1/2 = 0.5, 2/4 = 0.5, 1/3 ≈ 0.33: the lowest wins.
        let agents = [
            agent("agent:x", 1, 2, None),
            agent("agent:y", 2, 4, Some("2026-03-02T10:03:00Z")),
            agent("agent:z", 1, 3, Some("2026-03-02T10:02:00Z")),
        ];
        assert_eq!(choose("least_loaded", &agents).unwrap().agent, "agent:z");
        // 1/2 and 2/4 tie: the one assigned longer ago.
        let tied = [
            agent("agent:x", 1, 2, Some("2026-03-02T10:00:00Z")),
            agent("agent:y", 2, 4, Some("2026-03-02T10:03:00Z")),
        ];
        assert_eq!(choose("least_loaded", &tied).unwrap().agent, "agent:x");
    }
}
