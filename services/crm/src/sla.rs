//! The SLA process manager (DOMAIN.md §2.7, §4): turns what happens to a
//! ticket into commands on its SLA tracker (`ticket_sla`), and escalates a
//! ticket whose clock breached.
//!
//! It runs on the projection runtime: a durable JetStream consumer, events in
//! log order, its own tables (the SLA policies and calendars in force, and
//! each ticket's status and applied policy) written in the same transaction
//! as its position, so it always sees the configuration as of the event it
//! handles. Every command carries the idempotency key
//! `sla:<triggering event id>:<n>`, so a redelivery, a restart or a batch
//! retried after a failure appends nothing twice.
//!
//! | ticket event | tracker command |
//! |---|---|
//! | TicketOpened | Apply first response and resolution (policy: lowest `order` matching the type) |
//! | TicketTriaged (priority or type) | Apply again, same start and elapsed |
//! | TicketStatusChanged | Pause / Resume (pending: every clock; on hold: resolution) |
//! | TicketMessageAdded (agent, public) | Meet first response and next response |
//! | TicketMessageAdded (customer) | Apply next response, unless one is running |
//! | TicketSolved | Meet resolution and next response |
//! | TicketReopened | Apply resolution again (first response never restarts) |
//! | SlaBreached | Escalate the ticket one level (`sla_breach`) |
use std::collections::BTreeMap;

use crm_domain::TenantId;
use crm_domain::configuration::{BusinessCalendar, ConfigContent, Published, SlaPolicy};
use crm_domain::sla::{SlaCommand, SlaEvent, SlaMetric, SlaRules, SlaTracker, tracker_id};
use crm_domain::ticket::{
    AuthorRole, Ticket, TicketCommand, TicketEvent, TicketStatus, TicketType,
};
use crm_event_store::RecordedEvent;
use crm_projections::Tx;
use crm_projections::{ApplyError, Projection};
use jiff::Timestamp;
use uuid::Uuid;

use crate::command::CommandHandler;
use crate::process::{Sender, decode, malformed};

pub const NAME: &str = "sla_process";

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS sla_policies (
    tenant_id  text    NOT NULL,
    policy_id  uuid    NOT NULL,
    version    integer NOT NULL,
    sort_order bigint  NOT NULL,
    content    jsonb   NOT NULL,
    PRIMARY KEY (tenant_id, policy_id)
);
CREATE TABLE IF NOT EXISTS sla_calendars (
    tenant_id   text    NOT NULL,
    calendar_id uuid    NOT NULL,
    version     integer NOT NULL,
    content     jsonb   NOT NULL,
    PRIMARY KEY (tenant_id, calendar_id, version)
);
CREATE TABLE IF NOT EXISTS sla_tickets (
    tenant_id        text    NOT NULL,
    ticket_id        uuid    NOT NULL,
    ticket_type      text    NOT NULL,
    priority         text    NOT NULL,
    status           text    NOT NULL,
    policy_id        uuid,
    calendar_id      uuid,
    calendar_version integer,
    PRIMARY KEY (tenant_id, ticket_id)
)";

pub struct SlaProcess {
    handler: CommandHandler,
    sender: Sender,
}

impl SlaProcess {
    pub fn new(handler: CommandHandler) -> Self {
        Self {
            sender: Sender::new(handler.clone(), "sla", "system:sla"),
            handler,
        }
    }
}

/// A ticket as the process manager tracks it.
struct TicketRow {
    ticket_type: String,
    priority: String,
    status: String,
    policy_id: Option<Uuid>,
    calendar: Option<(Uuid, u32)>,
}

/// The metrics a ticket status pauses under `policy`: pending pauses every
/// clock, on hold only resolution (DOMAIN.md §4), each when the policy lists
/// the status.
fn paused_by(status: &str, policy: &SlaPolicy) -> Vec<SlaMetric> {
    if !policy.pause_statuses.iter().any(|s| s == status) {
        return vec![];
    }
    match status {
        "pending" => SlaMetric::ALL.to_vec(),
        "on_hold" => vec![SlaMetric::Resolution],
        _ => vec![],
    }
}

impl SlaProcess {
    async fn ticket(tx: &Tx<'_>, event: &RecordedEvent) -> Result<Option<TicketRow>, ApplyError> {
        let row = tx
            .query_opt(
                "SELECT ticket_type, priority, status, policy_id, calendar_id, calendar_version \
                 FROM sla_tickets WHERE tenant_id = $1 AND ticket_id = $2",
                &[&event.tenant_id, &event.stream_id],
            )
            .await?;
        Ok(row.map(|row| TicketRow {
            ticket_type: row.get(0),
            priority: row.get(1),
            status: row.get(2),
            policy_id: row.get(3),
            calendar: row
                .get::<_, Option<Uuid>>(4)
                .zip(row.get::<_, Option<i32>>(5).map(|v| v as u32)),
        }))
    }

    async fn save_ticket(
        tx: &Tx<'_>,
        event: &RecordedEvent,
        ticket: &TicketRow,
    ) -> Result<(), ApplyError> {
        tx.execute(
            "INSERT INTO sla_tickets (tenant_id, ticket_id, ticket_type, priority, status, \
               policy_id, calendar_id, calendar_version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (tenant_id, ticket_id) DO UPDATE SET ticket_type = EXCLUDED.ticket_type, \
               priority = EXCLUDED.priority, status = EXCLUDED.status, \
               policy_id = EXCLUDED.policy_id, calendar_id = EXCLUDED.calendar_id, \
               calendar_version = EXCLUDED.calendar_version",
            &[
                &event.tenant_id,
                &event.stream_id,
                &ticket.ticket_type,
                &ticket.priority,
                &ticket.status,
                &ticket.policy_id,
                &ticket.calendar.map(|(id, _)| id),
                &ticket.calendar.map(|(_, v)| v as i32),
            ],
        )
        .await?;
        Ok(())
    }

    /// The policy for a ticket type: lowest `order` whose types match.
    async fn policy_for(
        tx: &Tx<'_>,
        event: &RecordedEvent,
        ticket_type: &str,
    ) -> Result<Option<(Uuid, u32, SlaPolicy)>, ApplyError> {
        let rows = tx
            .query(
                "SELECT policy_id, version, content FROM sla_policies WHERE tenant_id = $1 \
                 ORDER BY sort_order, policy_id",
                &[&event.tenant_id],
            )
            .await?;
        for row in rows {
            let policy: SlaPolicy =
                serde_json::from_value(row.get(2)).map_err(|e| malformed(event, e))?;
            if policy.ticket_types.is_empty()
                || policy.ticket_types.iter().any(|t| t == ticket_type)
            {
                return Ok(Some((row.get(0), row.get::<_, i32>(1) as u32, policy)));
            }
        }
        Ok(None)
    }

    async fn policy(
        tx: &Tx<'_>,
        event: &RecordedEvent,
        id: Uuid,
    ) -> Result<Option<SlaPolicy>, ApplyError> {
        let row = tx
            .query_opt(
                "SELECT content FROM sla_policies WHERE tenant_id = $1 AND policy_id = $2",
                &[&event.tenant_id, &id],
            )
            .await?;
        row.map(|row| serde_json::from_value(row.get(0)).map_err(|e| malformed(event, e)))
            .transpose()
    }

    /// A calendar version, or the newest when `version` is `None`.
    async fn calendar(
        tx: &Tx<'_>,
        event: &RecordedEvent,
        id: Uuid,
        version: Option<u32>,
    ) -> Result<Option<(u32, BusinessCalendar)>, ApplyError> {
        let row = tx
            .query_opt(
                "SELECT version, content FROM sla_calendars \
                 WHERE tenant_id = $1 AND calendar_id = $2 AND ($3::integer IS NULL OR version = $3) \
                 ORDER BY version DESC LIMIT 1",
                &[&event.tenant_id, &id, &version.map(|v| v as i32)],
            )
            .await?;
        row.map(|row| {
            let content = serde_json::from_value(row.get(1)).map_err(|e| malformed(event, e))?;
            Ok((row.get::<_, i32>(0) as u32, content))
        })
        .transpose()
    }

    /// The rules of `policy` for a ticket of `priority`, with its calendar.
    async fn rules(
        tx: &Tx<'_>,
        event: &RecordedEvent,
        (policy_id, version, policy): (Uuid, u32, &SlaPolicy),
        priority: &str,
    ) -> Result<SlaRules, ApplyError> {
        let targets = policy
            .targets
            .iter()
            .find(|t| t.priority == priority)
            .map(|t| {
                BTreeMap::from([
                    (SlaMetric::FirstResponse, t.first_response_minutes),
                    (SlaMetric::NextResponse, t.next_response_minutes),
                    (SlaMetric::Resolution, t.resolution_minutes),
                ])
            })
            .unwrap_or_default();
        let calendar = match policy.calendar_id {
            Some(id) => match Self::calendar(tx, event, id, None).await? {
                Some((version, content)) => Some((id, version, content)),
                None => {
                    tracing::warn!(%id, "the SLA policy's calendar is not published; counting 24x7");
                    None
                }
            },
            None => None,
        };
        Ok(SlaRules {
            policy_id,
            policy_version: version,
            targets,
            warning_percent: policy.warning_percent,
            calendar,
        })
    }

    /// The calendar content a ticket's clocks run on.
    async fn ticket_calendar(
        tx: &Tx<'_>,
        event: &RecordedEvent,
        ticket: &TicketRow,
    ) -> Result<Option<BusinessCalendar>, ApplyError> {
        Ok(match ticket.calendar {
            Some((id, version)) => Self::calendar(tx, event, id, Some(version))
                .await?
                .map(|(_, c)| c),
            None => None,
        })
    }

    async fn on_ticket(
        &self,
        tx: &Tx<'_>,
        event: &RecordedEvent,
        decoded: TicketEvent,
    ) -> Result<(), ApplyError> {
        let ticket_id = event.stream_id;
        let tracker = tracker_id(ticket_id);
        if let TicketEvent::Opened(opened) = &decoded {
            let mut ticket = TicketRow {
                ticket_type: opened.ticket_type.name().to_owned(),
                priority: opened.priority.name().to_owned(),
                status: TicketStatus::New.name().to_owned(),
                policy_id: None,
                calendar: None,
            };
            if let Some((id, version, policy)) =
                Self::policy_for(tx, event, &ticket.ticket_type).await?
            {
                let rules =
                    Self::rules(tx, event, (id, version, &policy), &ticket.priority).await?;
                ticket.policy_id = Some(id);
                ticket.calendar = rules.calendar.as_ref().map(|(id, v, _)| (*id, *v));
                let command = SlaCommand::Apply {
                    ticket_id,
                    rules,
                    metrics: vec![SlaMetric::FirstResponse, SlaMetric::Resolution],
                    paused: vec![],
                    cause: "opened".into(),
                };
                self.sender
                    .send::<SlaTracker>(tx, event, 0, tracker, opened.occurred_at, command)
                    .await?;
            }
            return Self::save_ticket(tx, event, &ticket).await;
        }
        let Some(mut ticket) = Self::ticket(tx, event).await? else {
            return Ok(()); // opened before this process existed
        };
        let status_before = ticket.status.clone();
        match &decoded {
            TicketEvent::Triaged(triaged) => {
                let changes = &triaged.changes;
                if let Some(change) = &changes.priority {
                    ticket.priority = change.new.name().to_owned();
                }
                if let Some(change) = &changes.ticket_type {
                    ticket.ticket_type = change.new.name().to_owned();
                }
                if (changes.priority.is_some() || changes.ticket_type.is_some())
                    && ticket.policy_id.is_some()
                    && let Some((id, version, policy)) =
                        Self::policy_for(tx, event, &ticket.ticket_type).await?
                {
                    let cause = if Some(id) == ticket.policy_id {
                        "priority_changed"
                    } else {
                        "policy_changed"
                    };
                    let rules =
                        Self::rules(tx, event, (id, version, &policy), &ticket.priority).await?;
                    ticket.policy_id = Some(id);
                    ticket.calendar = rules.calendar.as_ref().map(|(id, v, _)| (*id, *v));
                    let command = SlaCommand::Apply {
                        ticket_id,
                        rules,
                        metrics: SlaMetric::ALL.to_vec(),
                        paused: paused_by(&ticket.status, &policy),
                        cause: cause.into(),
                    };
                    self.sender
                        .send::<SlaTracker>(tx, event, 0, tracker, triaged.occurred_at, command)
                        .await?;
                }
            }
            TicketEvent::StatusChanged(changed) => ticket.status = changed.to.name().to_owned(),
            TicketEvent::Solved(_) => ticket.status = TicketStatus::Solved.name().to_owned(),
            TicketEvent::Reopened(_) => ticket.status = TicketStatus::Open.name().to_owned(),
            TicketEvent::Closed(_) => ticket.status = TicketStatus::Closed.name().to_owned(),
            _ => {}
        }
        let Some(policy_id) = ticket.policy_id else {
            return Self::save_ticket(tx, event, &ticket).await;
        };
        let Some(policy) = Self::policy(tx, event, policy_id).await? else {
            return Self::save_ticket(tx, event, &ticket).await;
        };
        let calendar = Self::ticket_calendar(tx, event, &ticket).await?;
        let meet = |metric| SlaCommand::Meet {
            metric,
            calendar: calendar.clone(),
        };
        let mut commands: Vec<(Timestamp, SlaCommand)> = Vec::new();
        match &decoded {
            TicketEvent::StatusChanged(changed) => {
                let before = paused_by(&status_before, &policy);
                let after = paused_by(&ticket.status, &policy);
                let pause: Vec<_> = after
                    .iter()
                    .filter(|m| !before.contains(m))
                    .copied()
                    .collect();
                let resume: Vec<_> = before
                    .iter()
                    .filter(|m| !after.contains(m))
                    .copied()
                    .collect();
                if !pause.is_empty() {
                    commands.push((
                        changed.occurred_at,
                        SlaCommand::Pause {
                            metrics: pause,
                            status: ticket.status.clone(),
                            calendar: calendar.clone(),
                        },
                    ));
                }
                if !resume.is_empty() {
                    commands.push((
                        changed.occurred_at,
                        SlaCommand::Resume {
                            metrics: resume,
                            calendar: calendar.clone(),
                        },
                    ));
                }
            }
            TicketEvent::MessageAdded(message) => match message.author_role {
                AuthorRole::Agent if message.public => {
                    commands.push((message.occurred_at, meet(SlaMetric::FirstResponse)));
                    commands.push((message.occurred_at, meet(SlaMetric::NextResponse)));
                }
                AuthorRole::Customer => {
                    let (id, version) =
                        (policy_id, self.policy_version(tx, event, policy_id).await?);
                    let rules =
                        Self::rules(tx, event, (id, version, &policy), &ticket.priority).await?;
                    commands.push((
                        message.occurred_at,
                        SlaCommand::Apply {
                            ticket_id,
                            rules,
                            metrics: vec![SlaMetric::NextResponse],
                            paused: paused_by(&ticket.status, &policy),
                            cause: "customer_message".into(),
                        },
                    ));
                }
                _ => {}
            },
            TicketEvent::Solved(solved) => {
                commands.push((solved.occurred_at, meet(SlaMetric::Resolution)));
                commands.push((solved.occurred_at, meet(SlaMetric::NextResponse)));
            }
            TicketEvent::Reopened(reopened) => {
                let version = self.policy_version(tx, event, policy_id).await?;
                let rules =
                    Self::rules(tx, event, (policy_id, version, &policy), &ticket.priority).await?;
                ticket.calendar = rules.calendar.as_ref().map(|(id, v, _)| (*id, *v));
                commands.push((
                    reopened.occurred_at,
                    SlaCommand::Apply {
                        ticket_id,
                        rules,
                        metrics: vec![SlaMetric::Resolution],
                        paused: vec![],
                        cause: "reopened".into(),
                    },
                ));
            }
            _ => {}
        }
        for (n, (occurred_at, command)) in commands.into_iter().enumerate() {
            self.sender
                .send::<SlaTracker>(tx, event, n, tracker, occurred_at, command)
                .await?;
        }
        Self::save_ticket(tx, event, &ticket).await
    }

    async fn policy_version(
        &self,
        tx: &Tx<'_>,
        event: &RecordedEvent,
        id: Uuid,
    ) -> Result<u32, ApplyError> {
        let row = tx
            .query_one(
                "SELECT version FROM sla_policies WHERE tenant_id = $1 AND policy_id = $2",
                &[&event.tenant_id, &id],
            )
            .await?;
        Ok(row.get::<_, i32>(0) as u32)
    }

    /// A breached clock escalates its ticket one level.
    async fn on_breach(
        &self,
        tx: &Tx<'_>,
        event: &RecordedEvent,
        breach: &crm_domain::sla::SlaAlarm,
    ) -> Result<(), ApplyError> {
        let tenant = TenantId::parse(&event.tenant_id).map_err(|e| malformed(event, e))?;
        let (ticket, _, _) = match self.handler.load::<Ticket>(&tenant, breach.ticket_id).await {
            Ok(loaded) => loaded,
            Err(error) => return Err(ApplyError::Transient(error.to_string())),
        };
        if !ticket.exists {
            return Ok(());
        }
        let target = if ticket.ticket_type == Some(TicketType::Complaint) {
            "service_manager"
        } else {
            "queue_lead"
        };
        let command = TicketCommand::Escalate {
            level: ticket.escalation_level.saturating_add(1),
            rule: "sla_breach".into(),
            target: target.into(),
        };
        self.sender
            .send::<Ticket>(tx, event, 0, breach.ticket_id, breach.occurred_at, command)
            .await
    }
}

impl Projection for SlaProcess {
    crm_projections::projection_names!(
        NAME,
        SCHEMA,
        ["sla_policies", "sla_calendars", "sla_tickets"]
    );

    fn rebuildable(&self) -> bool {
        false
    }

    fn stream_types(&self) -> &'static [&'static str] {
        &["sla_policy", "business_calendar", "ticket", "ticket_sla"]
    }

    fn apply<'a>(
        &'a self,
        tx: &'a Tx<'_>,
        event: &'a RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            match event.stream_type.as_str() {
                t if t == SlaPolicy::STREAM_TYPE => {
                    let Some(published) = decode::<Published<SlaPolicy>>(event)? else {
                        return Ok(());
                    };
                    let content = serde_json::to_value(&published.content)
                        .map_err(|e| malformed(event, e))?;
                    tx.execute(
                        "INSERT INTO sla_policies (tenant_id, policy_id, version, sort_order, content) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, policy_id) DO UPDATE \
                         SET version = EXCLUDED.version, sort_order = EXCLUDED.sort_order, \
                           content = EXCLUDED.content",
                        &[
                            &event.tenant_id,
                            &event.stream_id,
                            &(published.version as i32),
                            &i64::from(published.content.order),
                            &content,
                        ],
                    )
                    .await?;
                }
                t if t == BusinessCalendar::STREAM_TYPE => {
                    let Some(published) = decode::<Published<BusinessCalendar>>(event)? else {
                        return Ok(());
                    };
                    let content = serde_json::to_value(&published.content)
                        .map_err(|e| malformed(event, e))?;
                    tx.execute(
                        "INSERT INTO sla_calendars (tenant_id, calendar_id, version, content) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                        &[
                            &event.tenant_id,
                            &event.stream_id,
                            &(published.version as i32),
                            &content,
                        ],
                    )
                    .await?;
                }
                t if t == <Ticket as crm_domain::Aggregate>::STREAM_TYPE => {
                    if let Some(decoded) = decode::<TicketEvent>(event)? {
                        self.on_ticket(tx, event, decoded).await?;
                    }
                }
                t if t == <SlaTracker as crm_domain::Aggregate>::STREAM_TYPE => {
                    if let Some(SlaEvent::Breached(breach)) = decode::<SlaEvent>(event)? {
                        self.on_breach(tx, event, &breach).await?;
                    }
                }
                _ => {}
            }
            Ok(())
        })
    }
}
