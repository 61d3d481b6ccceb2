//! Ticket: a service request, including complaints (DOMAIN.md §2.6).
//!
//! `New → Open ⇄ Pending (waiting on the customer) | OnHold (third party) →
//! Solved → Closed`. A customer reply reopens a solved ticket; after Closed
//! it opens a linked follow-up ticket ([`TicketCommand::OpenFollowUp`]). Complaints
//! default to high priority and need a root cause to be solved. Solved and
//! rated tickets keep a snapshot of the assignee and queue they had, for
//! per-agent metrics.
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::{Aggregate, Context, DomainEvent};
use crate::common::{Change, diff, is_code, text_ok};
use crate::error::{DomainError, Violations};
use crate::records::{CommonCommand, CommonEvent, RecordMeta};

named_enum!(TicketType { Question = "question", Incident = "incident", Request = "request", Complaint = "complaint" });
named_enum!(Priority { Low = "low", Normal = "normal", High = "high", Urgent = "urgent" });
named_enum!(Channel { Email = "email", Phone = "phone", Chat = "chat", Web = "web", Social = "social" });
named_enum!(
    /// Where a ticket stands.
    TicketStatus { New = "new", Open = "open", Pending = "pending", OnHold = "on_hold", Solved = "solved", Closed = "closed" }
);
named_enum!(AuthorRole { Customer = "customer", Agent = "agent", System = "system" });

impl TicketStatus {
    /// Moves ChangeTicketStatus allows; solving, reopening and closing have
    /// their own commands.
    pub fn may_become(self, to: Self) -> bool {
        use TicketStatus::*;
        matches!(
            (self, to),
            (New, Open)
                | (New | Open | OnHold, Pending)
                | (New | Open | Pending, OnHold)
                | (Pending | OnHold, Open)
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TicketDetails {
    pub requester_id: Uuid,
    pub account_id: Option<Uuid>,
    pub channel: Channel,
    pub ticket_type: TicketType,
    pub category: String,
    /// `None`: the type's default (high for complaints, normal otherwise).
    pub priority: Option<Priority>,
    pub subject: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TriagePatch {
    pub ticket_type: Option<TicketType>,
    pub category: Option<String>,
    pub priority: Option<Priority>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TicketCommand {
    Open(TicketDetails),
    Triage(TriagePatch),
    AddMessage {
        author_role: AuthorRole,
        author: String,
        public: bool,
        body: String,
    },
    ChangeStatus {
        to: TicketStatus,
    },
    Escalate {
        level: u8,
        rule: String,
        target: String,
    },
    Solve {
        resolution: String,
        root_cause: String,
    },
    Reopen {
        cause: String,
    },
    Close,
    RecordCsat {
        score: u8,
        comment: String,
    },
    /// `eligible`: the handler found the assignee a member of the queue,
    /// online, skilled and below capacity. Without that, only a recorded
    /// `override_reason` lets the assignment through.
    Assign {
        queue: String,
        assignee: Option<String>,
        method: String,
        eligible: bool,
        override_reason: String,
    },
    /// The scheduler: a ticket pending on the customer since `since` with no
    /// reply for [`AUTO_SOLVE_DAYS`] is solved.
    AutoSolve {
        since: Timestamp,
    },
    /// The scheduler: a ticket solved at `since` closes after
    /// [`AUTO_CLOSE_DAYS`].
    AutoClose {
        since: Timestamp,
    },
    /// A customer's reply to the closed ticket `of` opens this ticket as its
    /// follow-up: the closed ticket's requester, account, channel, type,
    /// category, priority and subject, and the reply as its first message.
    OpenFollowUp {
        of: Uuid,
        details: TicketDetails,
        author: String,
        body: String,
    },
    /// Owner, tags and shares (see [`crate::records`]).
    Common(CommonCommand),
}

/// Days a pending ticket waits for the customer before it is solved.
pub const AUTO_SOLVE_DAYS: i64 = 7;
/// Days a solved ticket stays open to a reply before it closes.
pub const AUTO_CLOSE_DAYS: i64 = 4;

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketOpened {
    pub requester_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<Uuid>,
    pub channel: Channel,
    pub ticket_type: TicketType,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub category: String,
    pub priority: Priority,
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    pub subject: String,
    /// The closed ticket a customer replied to, when this ticket is its
    /// follow-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow_up_of: Option<Uuid>,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriageChanges {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket_type: Option<Change<TicketType>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<Change<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Change<Priority>>,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketTriaged {
    pub changes: TriageChanges,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketMessageAdded {
    pub author_role: AuthorRole,
    pub author: String,
    pub public: bool,
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    pub body: String,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketAssigned {
    /// The queue (a stream id).
    pub queue: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignee: Option<String>,
    /// `manual`, `round_robin`, `least_loaded` or `rule`.
    pub method: String,
    /// Why an ineligible assignee was assigned anyway.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub override_reason: String,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketStatusChanged {
    pub from: TicketStatus,
    pub to: TicketStatus,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketEscalated {
    pub level: u8,
    pub rule: String,
    pub target: String,
    pub occurred_at: Timestamp,
}

/// Who and where the ticket was when it was solved or rated.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSnapshot {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignee: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    pub priority: Option<Priority>,
    pub ticket_type: Option<TicketType>,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketSolved {
    pub resolution: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub root_cause: String,
    pub snapshot: ServiceSnapshot,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketReopened {
    /// `customer_reply` or `manual`.
    pub cause: String,
    /// How many times the ticket has been reopened, this one included.
    pub count: u32,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketClosed {
    /// `manual`, or `auto` when the scheduler closes it.
    pub how: String,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsatRatingReceived {
    pub score: u8,
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
    pub snapshot: ServiceSnapshot,
    pub occurred_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TicketEvent {
    Opened(TicketOpened),
    Triaged(TicketTriaged),
    Assigned(TicketAssigned),
    MessageAdded(TicketMessageAdded),
    StatusChanged(TicketStatusChanged),
    Escalated(TicketEscalated),
    Solved(TicketSolved),
    Reopened(TicketReopened),
    Closed(TicketClosed),
    CsatReceived(CsatRatingReceived),
    Common(CommonEvent),
}

impl DomainEvent for TicketEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Common(event) => event.event_type(),
            Self::Opened(_) => "TicketOpened",
            Self::Triaged(_) => "TicketTriaged",
            Self::Assigned(_) => "TicketAssigned",
            Self::MessageAdded(_) => "TicketMessageAdded",
            Self::StatusChanged(_) => "TicketStatusChanged",
            Self::Escalated(_) => "TicketEscalated",
            Self::Solved(_) => "TicketSolved",
            Self::Reopened(_) => "TicketReopened",
            Self::Closed(_) => "TicketClosed",
            Self::CsatReceived(_) => "CsatRatingReceived",
        }
    }

    fn occurred_at(&self) -> jiff::Timestamp {
        match self {
            Self::Common(event) => event.occurred_at(),
            Self::Opened(e) => e.occurred_at,
            Self::Triaged(e) => e.occurred_at,
            Self::Assigned(e) => e.occurred_at,
            Self::MessageAdded(e) => e.occurred_at,
            Self::StatusChanged(e) => e.occurred_at,
            Self::Escalated(e) => e.occurred_at,
            Self::Solved(e) => e.occurred_at,
            Self::Reopened(e) => e.occurred_at,
            Self::Closed(e) => e.occurred_at,
            Self::CsatReceived(e) => e.occurred_at,
        }
    }

    fn decode<'de, D: serde::Deserializer<'de>>(
        event_type: &str,
        _schema_version: u32,
        payload: D,
    ) -> Result<Option<Self>, D::Error> {
        Ok(Some(match event_type {
            "TicketOpened" => Self::Opened(Deserialize::deserialize(payload)?),
            "TicketTriaged" => Self::Triaged(Deserialize::deserialize(payload)?),
            "TicketAssigned" => Self::Assigned(Deserialize::deserialize(payload)?),
            "TicketMessageAdded" => Self::MessageAdded(Deserialize::deserialize(payload)?),
            "TicketStatusChanged" => Self::StatusChanged(Deserialize::deserialize(payload)?),
            "TicketEscalated" => Self::Escalated(Deserialize::deserialize(payload)?),
            "TicketSolved" => Self::Solved(Deserialize::deserialize(payload)?),
            "TicketReopened" => Self::Reopened(Deserialize::deserialize(payload)?),
            "TicketClosed" => Self::Closed(Deserialize::deserialize(payload)?),
            "CsatRatingReceived" => Self::CsatReceived(Deserialize::deserialize(payload)?),
            _ => return Ok(CommonEvent::decode(event_type, payload)?.map(Self::Common)),
        }))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub exists: bool,
    pub status: Option<TicketStatus>,
    pub ticket_type: Option<TicketType>,
    pub priority: Option<Priority>,
    pub category: String,
    pub assignee: Option<String>,
    pub queue: Option<String>,
    pub escalation_level: u8,
    pub reopen_count: u32,
    pub csat: Option<u8>,
    /// When the ticket entered its current status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_since: Option<Timestamp>,
    /// What a follow-up copies (see [`Ticket::follow_up_details`]); not the
    /// subject, personal text the state does not hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Channel>,
    #[serde(default)]
    pub meta: RecordMeta,
}

/// When a ticket event happened.
fn event_time(event: &TicketEvent) -> Timestamp {
    match event {
        TicketEvent::Opened(e) => e.occurred_at,
        TicketEvent::Triaged(e) => e.occurred_at,
        TicketEvent::Assigned(e) => e.occurred_at,
        TicketEvent::MessageAdded(e) => e.occurred_at,
        TicketEvent::StatusChanged(e) => e.occurred_at,
        TicketEvent::Escalated(e) => e.occurred_at,
        TicketEvent::Solved(e) => e.occurred_at,
        TicketEvent::Reopened(e) => e.occurred_at,
        TicketEvent::Closed(e) => e.occurred_at,
        TicketEvent::CsatReceived(e) => e.occurred_at,
        TicketEvent::Common(_) => Timestamp::UNIX_EPOCH,
    }
}

impl Ticket {
    /// Whether the ticket is closed: a customer reply then opens a follow-up.
    pub fn is_closed(&self) -> bool {
        self.exists && self.status == Some(TicketStatus::Closed)
    }

    /// The details a follow-up of this ticket opens with, given the
    /// ticket's subject (from its `TicketOpened`).
    pub fn follow_up_details(&self, subject: String) -> Option<TicketDetails> {
        Some(TicketDetails {
            requester_id: self.requester_id?,
            account_id: self.account_id,
            channel: self.channel?,
            ticket_type: self.ticket_type?,
            category: self.category.clone(),
            priority: self.priority,
            subject,
        })
    }

    fn status(&self) -> Result<TicketStatus, DomainError> {
        self.status
            .filter(|_| self.exists)
            .ok_or(DomainError::NotFound)
    }

    fn not_closed(&self) -> Result<TicketStatus, DomainError> {
        let status = self.status()?;
        if status == TicketStatus::Closed {
            return Err(DomainError::InvalidTransition {
                from: "closed",
                to: "changed",
            });
        }
        Ok(status)
    }

    fn snapshot(&self) -> ServiceSnapshot {
        ServiceSnapshot {
            assignee: self.assignee.clone(),
            queue: self.queue.clone(),
            priority: self.priority,
            ticket_type: self.ticket_type,
        }
    }
}

fn category_ok(category: &str) -> bool {
    category.is_empty() || is_code(category, 64)
}

impl Ticket {
    fn open(
        &self,
        details: TicketDetails,
        follow_up_of: Option<Uuid>,
        occurred_at: Timestamp,
    ) -> Result<TicketOpened, DomainError> {
        if self.exists {
            return Err(DomainError::AlreadyExists {
                key: "ticket_id",
                holder: None,
            });
        }
        let mut v = Violations::default();
        v.check(
            text_ok(&details.subject, 300, false),
            "subject",
            "must be 1 to 300 characters",
        );
        v.check(
            category_ok(&details.category),
            "category",
            "must be a code of [a-z0-9_]",
        );
        v.into_result()?;
        let priority =
            details
                .priority
                .unwrap_or(if details.ticket_type == TicketType::Complaint {
                    Priority::High
                } else {
                    Priority::Normal
                });
        Ok(TicketOpened {
            requester_id: details.requester_id,
            account_id: details.account_id,
            channel: details.channel,
            ticket_type: details.ticket_type,
            category: details.category,
            priority,
            subject: details.subject.trim().to_owned(),
            follow_up_of,
            occurred_at,
        })
    }
}

/// A checked message.
fn message_added(
    author_role: AuthorRole,
    author: String,
    public: bool,
    body: String,
    occurred_at: Timestamp,
) -> Result<TicketMessageAdded, DomainError> {
    let mut v = Violations::default();
    v.check(
        text_ok(&body, 20_000, false),
        "body",
        "must be 1 to 20000 characters",
    );
    v.check(
        text_ok(&author, 200, false),
        "author",
        "must be 1 to 200 characters",
    );
    v.check(
        public || author_role != AuthorRole::Customer,
        "public",
        "customer messages are always public",
    );
    v.into_result()?;
    Ok(TicketMessageAdded {
        author_role,
        author,
        public,
        body,
        occurred_at,
    })
}

impl Aggregate for Ticket {
    type Command = TicketCommand;
    type Event = TicketEvent;
    const STREAM_TYPE: &'static str = "ticket";
    /// 2: the state records when the status last changed; 3: and what a
    /// follow-up copies.
    const SNAPSHOT_VERSION: u32 = 3;

    fn exists(&self) -> bool {
        self.exists
    }

    fn creates(command: &TicketCommand) -> bool {
        matches!(
            command,
            TicketCommand::Open(_) | TicketCommand::OpenFollowUp { .. }
        )
    }

    fn decide(
        &self,
        command: TicketCommand,
        context: Context,
    ) -> Result<Vec<TicketEvent>, DomainError> {
        let occurred_at = context.occurred_at()?;
        self.meta.refuse_if_archived(matches!(
            command,
            TicketCommand::Common(CommonCommand::Restore(_))
        ))?;
        match command {
            TicketCommand::Common(command) => {
                self.not_closed()?;
                Ok(self
                    .meta
                    .decide(command, occurred_at)?
                    .into_iter()
                    .map(TicketEvent::Common)
                    .collect())
            }
            TicketCommand::Open(details) => self
                .open(details, None, occurred_at)
                .map(|opened| vec![TicketEvent::Opened(opened)]),
            TicketCommand::OpenFollowUp {
                of,
                details,
                author,
                body,
            } => {
                let opened = self.open(details, Some(of), occurred_at)?;
                let message = message_added(AuthorRole::Customer, author, true, body, occurred_at)?;
                Ok(vec![
                    TicketEvent::Opened(opened),
                    TicketEvent::MessageAdded(message),
                ])
            }
            TicketCommand::Assign {
                queue,
                assignee,
                method,
                eligible,
                override_reason,
            } => {
                self.not_closed()?;
                let mut v = Violations::default();
                v.check(
                    ["manual", "round_robin", "least_loaded", "rule", "overflow"]
                        .contains(&method.as_str()),
                    "method",
                    "must be manual, round_robin, least_loaded, rule or overflow",
                );
                v.check(
                    text_ok(&override_reason, 500, true),
                    "override_reason",
                    "must be at most 500 characters",
                );
                // Checked here too: an override skips the queue's member
                // list, which is where an assignee is otherwise vetted.
                v.check(
                    assignee.as_deref().is_none_or(|a| text_ok(a, 200, false)),
                    "assignee",
                    "must be 1 to 200 characters",
                );
                v.into_result()?;
                if assignee.is_some() && !eligible && override_reason.trim().is_empty() {
                    return Err(DomainError::InvalidReference { field: "assignee" });
                }
                if self.queue.as_deref() == Some(queue.as_str()) && self.assignee == assignee {
                    return Ok(vec![]);
                }
                let override_reason = if eligible {
                    String::new()
                } else {
                    override_reason
                };
                Ok(vec![TicketEvent::Assigned(TicketAssigned {
                    queue,
                    assignee,
                    method,
                    override_reason,
                    occurred_at,
                })])
            }
            TicketCommand::Triage(patch) => {
                self.not_closed()?;
                if let Some(category) = &patch.category
                    && !category_ok(category)
                {
                    return Err(DomainError::invalid(
                        "category",
                        "must be a code of [a-z0-9_]",
                    ));
                }
                let changes = TriageChanges {
                    ticket_type: self
                        .ticket_type
                        .and_then(|old| diff(&old, patch.ticket_type.as_ref())),
                    category: diff(&self.category, patch.category.as_ref()),
                    priority: self
                        .priority
                        .and_then(|old| diff(&old, patch.priority.as_ref())),
                };
                if changes == TriageChanges::default() {
                    return Ok(vec![]);
                }
                Ok(vec![TicketEvent::Triaged(TicketTriaged {
                    changes,
                    occurred_at,
                })])
            }
            TicketCommand::AddMessage {
                author_role,
                author,
                public,
                body,
            } => {
                let status = self.not_closed()?;
                let mut events = vec![TicketEvent::MessageAdded(message_added(
                    author_role,
                    author,
                    public,
                    body,
                    occurred_at,
                )?)];
                match (author_role, status) {
                    // A customer reply reopens a solved ticket, or moves a
                    // ticket that waited on the customer back to open.
                    (AuthorRole::Customer, TicketStatus::Solved) => {
                        events.push(TicketEvent::Reopened(TicketReopened {
                            cause: "customer_reply".into(),
                            count: self.reopen_count + 1,
                            occurred_at,
                        }));
                    }
                    (AuthorRole::Customer, TicketStatus::Pending) => {
                        events.push(TicketEvent::StatusChanged(TicketStatusChanged {
                            from: TicketStatus::Pending,
                            to: TicketStatus::Open,
                            occurred_at,
                        }));
                    }
                    // An agent's public reply on a new ticket opens it.
                    (AuthorRole::Agent, TicketStatus::New) if public => {
                        events.push(TicketEvent::StatusChanged(TicketStatusChanged {
                            from: TicketStatus::New,
                            to: TicketStatus::Open,
                            occurred_at,
                        }));
                    }
                    _ => {}
                }
                Ok(events)
            }
            TicketCommand::ChangeStatus { to } => {
                let from = self.status()?;
                if from == to {
                    return Ok(vec![]);
                }
                if !from.may_become(to) {
                    return Err(DomainError::InvalidTransition {
                        from: from.name(),
                        to: to.name(),
                    });
                }
                Ok(vec![TicketEvent::StatusChanged(TicketStatusChanged {
                    from,
                    to,
                    occurred_at,
                })])
            }
            TicketCommand::Escalate {
                level,
                rule,
                target,
            } => {
                let status = self.not_closed()?;
                if status == TicketStatus::Solved {
                    return Err(DomainError::InvalidTransition {
                        from: "solved",
                        to: "escalated",
                    });
                }
                let mut v = Violations::default();
                v.check(
                    level > self.escalation_level,
                    "level",
                    "must be above the current escalation level",
                );
                v.check(is_code(&rule, 64), "rule", "must be a code of [a-z0-9_]");
                v.check(
                    text_ok(&target, 200, false),
                    "target",
                    "must be 1 to 200 characters",
                );
                v.into_result()?;
                Ok(vec![TicketEvent::Escalated(TicketEscalated {
                    level,
                    rule,
                    target,
                    occurred_at,
                })])
            }
            TicketCommand::Solve {
                resolution,
                root_cause,
            } => {
                let status = self.not_closed()?;
                if status == TicketStatus::Solved {
                    return Ok(vec![]);
                }
                let mut v = Violations::default();
                v.check(
                    text_ok(&resolution, 5000, false),
                    "resolution",
                    "must be 1 to 5000 characters",
                );
                v.check(
                    self.ticket_type != Some(TicketType::Complaint) || is_code(&root_cause, 64),
                    "root_cause",
                    "a complaint needs a root cause code",
                );
                v.check(
                    root_cause.is_empty() || is_code(&root_cause, 64),
                    "root_cause",
                    "must be a code of [a-z0-9_]",
                );
                v.into_result()?;
                Ok(vec![TicketEvent::Solved(TicketSolved {
                    resolution,
                    root_cause,
                    snapshot: self.snapshot(),
                    occurred_at,
                })])
            }
            TicketCommand::Reopen { cause } => {
                let status = self.status()?;
                if status != TicketStatus::Solved {
                    return Err(DomainError::InvalidTransition {
                        from: status.name(),
                        to: "open",
                    });
                }
                if !is_code(&cause, 64) {
                    return Err(DomainError::invalid("cause", "must be a code of [a-z0-9_]"));
                }
                Ok(vec![TicketEvent::Reopened(TicketReopened {
                    cause,
                    count: self.reopen_count + 1,
                    occurred_at,
                })])
            }
            TicketCommand::AutoSolve { since } => {
                let due = since + jiff::SignedDuration::from_hours(24 * AUTO_SOLVE_DAYS);
                if self.status()? != TicketStatus::Pending
                    || self.status_since != Some(since)
                    || occurred_at < due
                {
                    return Err(DomainError::NotApplicable { rule: "auto_solve" });
                }
                let root_cause = if self.ticket_type == Some(TicketType::Complaint) {
                    "customer_unresponsive".into()
                } else {
                    String::new()
                };
                Ok(vec![TicketEvent::Solved(TicketSolved {
                    resolution: format!(
                        "Solved automatically: no reply from the customer in {AUTO_SOLVE_DAYS} days"
                    ),
                    root_cause,
                    snapshot: self.snapshot(),
                    occurred_at,
                })])
            }
            TicketCommand::AutoClose { since } => {
                let due = since + jiff::SignedDuration::from_hours(24 * AUTO_CLOSE_DAYS);
                if self.status()? != TicketStatus::Solved
                    || self.status_since != Some(since)
                    || occurred_at < due
                {
                    return Err(DomainError::NotApplicable { rule: "auto_close" });
                }
                Ok(vec![TicketEvent::Closed(TicketClosed {
                    how: "auto".into(),
                    occurred_at,
                })])
            }
            TicketCommand::Close => {
                let status = self.status()?;
                match status {
                    TicketStatus::Closed => Ok(vec![]),
                    TicketStatus::Solved => Ok(vec![TicketEvent::Closed(TicketClosed {
                        how: "manual".into(),
                        occurred_at,
                    })]),
                    other => Err(DomainError::InvalidTransition {
                        from: other.name(),
                        to: "closed",
                    }),
                }
            }
            TicketCommand::RecordCsat { score, comment } => {
                let status = self.status()?;
                if !matches!(status, TicketStatus::Solved | TicketStatus::Closed) {
                    return Err(DomainError::InvalidTransition {
                        from: status.name(),
                        to: "rated",
                    });
                }
                let mut v = Violations::default();
                v.check((1..=5).contains(&score), "score", "must be 1 to 5");
                v.check(
                    text_ok(&comment, 2000, true),
                    "comment",
                    "must be at most 2000 characters",
                );
                v.into_result()?;
                Ok(vec![TicketEvent::CsatReceived(CsatRatingReceived {
                    score,
                    comment,
                    snapshot: self.snapshot(),
                    occurred_at,
                })])
            }
        }
    }

    fn evolve(mut self, event: &TicketEvent) -> Self {
        let before = self.status;
        match event {
            TicketEvent::Common(event) => self.meta.evolve(event),
            TicketEvent::Opened(opened) => {
                self.exists = true;
                self.status = Some(TicketStatus::New);
                self.ticket_type = Some(opened.ticket_type);
                self.priority = Some(opened.priority);
                self.category = opened.category.clone();
                self.requester_id = Some(opened.requester_id);
                self.account_id = opened.account_id;
                self.channel = Some(opened.channel);
            }
            TicketEvent::Triaged(triaged) => {
                let c = &triaged.changes;
                if let Some(change) = &c.ticket_type {
                    self.ticket_type = Some(change.new);
                }
                if let Some(change) = &c.category {
                    self.category = change.new.clone();
                }
                if let Some(change) = &c.priority {
                    self.priority = Some(change.new);
                }
            }
            TicketEvent::Assigned(assigned) => {
                self.queue = Some(assigned.queue.clone());
                self.assignee = assigned.assignee.clone();
            }
            TicketEvent::MessageAdded(message) => {
                if message.author_role == AuthorRole::Agent && self.assignee.is_none() {
                    self.assignee = Some(message.author.clone());
                }
            }
            TicketEvent::StatusChanged(changed) => self.status = Some(changed.to),
            TicketEvent::Escalated(escalated) => self.escalation_level = escalated.level,
            TicketEvent::Solved(_) => self.status = Some(TicketStatus::Solved),
            TicketEvent::Reopened(reopened) => {
                self.status = Some(TicketStatus::Open);
                self.reopen_count = reopened.count;
            }
            TicketEvent::Closed(_) => self.status = Some(TicketStatus::Closed),
            TicketEvent::CsatReceived(rating) => self.csat = Some(rating.score),
        }
        if self.status != before {
            self.status_since = Some(event_time(event));
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{given, now};

    fn complaint() -> TicketDetails {
        TicketDetails {
            requester_id: Uuid::from_u128(1),
            account_id: None,
            channel: Channel::Email,
            ticket_type: TicketType::Complaint,
            category: "billing".into(),
            priority: None,
            subject: "Charged twice".into(),
        }
    }

    fn opened() -> TicketEvent {
        TicketEvent::Opened(TicketOpened {
            requester_id: Uuid::from_u128(1),
            account_id: None,
            channel: Channel::Email,
            ticket_type: TicketType::Complaint,
            category: "billing".into(),
            priority: Priority::High,
            subject: "Charged twice".into(),
            follow_up_of: None,
            occurred_at: now(),
        })
    }

    fn message(role: AuthorRole, author: &str) -> TicketEvent {
        TicketEvent::MessageAdded(TicketMessageAdded {
            author_role: role,
            author: author.into(),
            public: true,
            body: "hello".into(),
            occurred_at: now(),
        })
    }

    fn status(from: TicketStatus, to: TicketStatus) -> TicketEvent {
        TicketEvent::StatusChanged(TicketStatusChanged {
            from,
            to,
            occurred_at: now(),
        })
    }

    fn say(role: AuthorRole, author: &str) -> TicketCommand {
        TicketCommand::AddMessage {
            author_role: role,
            author: author.into(),
            public: true,
            body: "hello".into(),
        }
    }

    #[test]
    fn complaints_default_to_high_priority() {
        given::<Ticket>([])
            .when(TicketCommand::Open(complaint()))
            .then(vec![opened()]);
        let events = Ticket::default()
            .decide(
                TicketCommand::Open(TicketDetails {
                    ticket_type: TicketType::Question,
                    ..complaint()
                }),
                crate::Context::at(now()),
            )
            .unwrap();
        assert!(matches!(&events[0], TicketEvent::Opened(o) if o.priority == Priority::Normal));
    }

    #[test]
    fn the_worked_complaint_flow() {
        // An agent's first public reply opens the ticket and makes them the assignee.
        let state = given::<Ticket>([opened()])
            .when(say(AuthorRole::Agent, "agent:g"))
            .then(vec![
                message(AuthorRole::Agent, "agent:g"),
                status(TicketStatus::New, TicketStatus::Open),
            ]);
        assert_eq!(state.assignee.as_deref(), Some("agent:g"));
        let history = vec![
            opened(),
            message(AuthorRole::Agent, "agent:g"),
            status(TicketStatus::New, TicketStatus::Open),
        ];
        given::<Ticket>(history.clone())
            .when(TicketCommand::ChangeStatus {
                to: TicketStatus::Pending,
            })
            .then(vec![status(TicketStatus::Open, TicketStatus::Pending)]);
        // The customer's reply moves a pending ticket back to open.
        let mut pending = history.clone();
        pending.push(status(TicketStatus::Open, TicketStatus::Pending));
        given::<Ticket>(pending.clone())
            .when(say(AuthorRole::Customer, "contact:1"))
            .then(vec![
                message(AuthorRole::Customer, "contact:1"),
                status(TicketStatus::Pending, TicketStatus::Open),
            ]);
        // A complaint needs a root cause; the solved event keeps the assignee.
        given::<Ticket>(history.clone())
            .when(TicketCommand::Solve {
                resolution: "Refunded".into(),
                root_cause: String::new(),
            })
            .then_invalid(&["root_cause"]);
        let solved = TicketEvent::Solved(TicketSolved {
            resolution: "Refunded".into(),
            root_cause: "double_charge".into(),
            snapshot: ServiceSnapshot {
                assignee: Some("agent:g".into()),
                queue: None,
                priority: Some(Priority::High),
                ticket_type: Some(TicketType::Complaint),
            },
            occurred_at: now(),
        });
        given::<Ticket>(history.clone())
            .when(TicketCommand::Solve {
                resolution: "Refunded".into(),
                root_cause: "double_charge".into(),
            })
            .then(vec![solved.clone()]);
        let mut done = history;
        done.push(solved);
        let rated = given::<Ticket>(done.clone())
            .when(TicketCommand::RecordCsat {
                score: 4,
                comment: String::new(),
            })
            .state;
        assert_eq!(rated.status, Some(TicketStatus::Solved));
        given::<Ticket>(done.clone())
            .when(TicketCommand::RecordCsat {
                score: 6,
                comment: String::new(),
            })
            .then_invalid(&["score"]);
        // A customer reply reopens a solved ticket and counts it.
        let outcome = given::<Ticket>(done.clone()).when(say(AuthorRole::Customer, "contact:1"));
        let events = outcome.result.unwrap();
        assert!(
            matches!(&events[1], TicketEvent::Reopened(r) if r.count == 1 && r.cause == "customer_reply")
        );
        // Closing needs solved; closed tickets take no more messages.
        given::<Ticket>(done.clone())
            .when(TicketCommand::Close)
            .then(vec![TicketEvent::Closed(TicketClosed {
                how: "manual".into(),
                occurred_at: now(),
            })]);
        done.push(TicketEvent::Closed(TicketClosed {
            how: "manual".into(),
            occurred_at: now(),
        }));
        given::<Ticket>(done.clone())
            .when(say(AuthorRole::Agent, "agent:g"))
            .then_error(DomainError::InvalidTransition {
                from: "closed",
                to: "changed",
            });
        given::<Ticket>(done)
            .when(TicketCommand::Close)
            .then(vec![]);
    }

    #[test]
    fn assignment_needs_an_eligible_agent_or_a_recorded_override() {
        let assign = |eligible: bool, why: &str| TicketCommand::Assign {
            queue: "q1".into(),
            assignee: Some("agent:g".into()),
            method: "manual".into(),
            eligible,
            override_reason: why.into(),
        };
        given::<Ticket>([opened()])
            .when(assign(false, ""))
            .then_error(DomainError::InvalidReference { field: "assignee" });
        let overridden = given::<Ticket>([opened()])
            .when(assign(false, "customer asked for G"))
            .result
            .unwrap();
        assert!(
            matches!(&overridden[0], TicketEvent::Assigned(a) if a.override_reason == "customer asked for G")
        );
        // An override skips the queue's member list: the name is checked.
        let mut unnamed = assign(false, "customer asked");
        if let TicketCommand::Assign { assignee, .. } = &mut unnamed {
            *assignee = Some("x".repeat(201));
        }
        given::<Ticket>([opened()])
            .when(unnamed)
            .then_invalid(&["assignee"]);
        let events = Ticket::default()
            .replay([opened()].iter())
            .decide(assign(true, "ignored"), crate::Context::at(now()))
            .unwrap();
        assert!(
            matches!(&events[0], TicketEvent::Assigned(a) if a.override_reason.is_empty() && a.assignee.as_deref() == Some("agent:g"))
        );
        let assigned = Ticket::default().replay([opened()].iter().chain(events.iter()));
        assert_eq!(
            assigned
                .decide(assign(true, ""), crate::Context::at(now()))
                .unwrap(),
            vec![]
        );
    }

    #[test]
    fn status_moves_and_escalations_follow_the_rules() {
        given::<Ticket>([opened()])
            .when(TicketCommand::ChangeStatus {
                to: TicketStatus::Solved,
            })
            .then_error(DomainError::InvalidTransition {
                from: "new",
                to: "solved",
            });
        given::<Ticket>([opened()])
            .when(TicketCommand::Close)
            .then_error(DomainError::InvalidTransition {
                from: "new",
                to: "closed",
            });
        given::<Ticket>([opened()])
            .when(TicketCommand::Escalate {
                level: 1,
                rule: "sla_breach".into(),
                target: "service_manager".into(),
            })
            .then(vec![TicketEvent::Escalated(TicketEscalated {
                level: 1,
                rule: "sla_breach".into(),
                target: "service_manager".into(),
                occurred_at: now(),
            })]);
        let escalated = TicketEvent::Escalated(TicketEscalated {
            level: 1,
            rule: "sla_breach".into(),
            target: "service_manager".into(),
            occurred_at: now(),
        });
        given::<Ticket>([opened(), escalated])
            .when(TicketCommand::Escalate {
                level: 1,
                rule: "again".into(),
                target: "x".into(),
            })
            .then_invalid(&["level"]);
        given::<Ticket>([opened()])
            .when(TicketCommand::AddMessage {
                author_role: AuthorRole::Customer,
                author: "c".into(),
                public: false,
                body: "x".into(),
            })
            .then_invalid(&["public"]);
        given::<Ticket>([])
            .when(TicketCommand::Close)
            .then_error(DomainError::NotFound);
        given::<Ticket>([opened()])
            .when(TicketCommand::Triage(TriagePatch {
                priority: Some(Priority::Urgent),
                category: Some("billing".into()),
                ..TriagePatch::default()
            }))
            .then(vec![TicketEvent::Triaged(TicketTriaged {
                changes: TriageChanges {
                    priority: Some(Change {
                        old: Priority::High,
                        new: Priority::Urgent,
                    }),
                    ..TriageChanges::default()
                },
                occurred_at: now(),
            })]);
    }

    #[test]
    fn pending_tickets_auto_solve_and_solved_tickets_auto_close_after_their_days() {
        let decide_at = |state: &Ticket, command, at: &str| {
            let at: Timestamp = at.parse().unwrap();
            state.decide(command, crate::Context::at(at))
        };
        let state = Ticket::default()
            .replay([opened(), status(TicketStatus::New, TicketStatus::Pending)].iter());
        // Pending since NOW (2026-11-28T10:00Z): solved 7 days later.
        let since = state.status_since.expect("status time");
        assert_eq!(since, now());
        // Too early, or a stale view of when it became pending: not applicable.
        let not_applicable = Err(DomainError::NotApplicable { rule: "auto_solve" });
        assert_eq!(
            decide_at(
                &state,
                TicketCommand::AutoSolve { since },
                "2026-12-05T09:59:00Z"
            ),
            not_applicable
        );
        assert_eq!(
            decide_at(
                &state,
                TicketCommand::AutoSolve {
                    since: "2026-11-20T10:00:00Z".parse().unwrap()
                },
                "2026-12-05T10:00:00Z"
            ),
            not_applicable
        );
        let events = decide_at(
            &state,
            TicketCommand::AutoSolve { since },
            "2026-12-05T10:00:00Z",
        )
        .unwrap();
        let solved = state.replay(events.iter());
        assert_eq!(solved.status, Some(TicketStatus::Solved));
        let solved_at = solved.status_since.unwrap();
        assert_eq!(
            solved_at,
            "2026-12-05T10:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(
            decide_at(
                &solved,
                TicketCommand::AutoClose { since: solved_at },
                "2026-12-09T09:00:00Z"
            ),
            Err(DomainError::NotApplicable { rule: "auto_close" })
        );
        let events = decide_at(
            &solved,
            TicketCommand::AutoClose { since: solved_at },
            "2026-12-09T10:00:00Z",
        )
        .unwrap();
        assert!(matches!(&events[0], TicketEvent::Closed(c) if c.how == "auto"));
        // An open ticket never auto-closes.
        given::<Ticket>([opened()])
            .when(TicketCommand::AutoClose { since: now() })
            .then_error(DomainError::NotApplicable { rule: "auto_close" });
    }

    fn closed_events() -> Vec<TicketEvent> {
        vec![
            opened(),
            TicketEvent::Solved(TicketSolved {
                resolution: "Refunded".into(),
                root_cause: "double_charge".into(),
                snapshot: ServiceSnapshot {
                    assignee: None,
                    queue: None,
                    priority: Some(Priority::High),
                    ticket_type: Some(TicketType::Complaint),
                },
                occurred_at: now(),
            }),
            TicketEvent::Closed(TicketClosed {
                how: "manual".into(),
                occurred_at: now(),
            }),
        ]
    }

    #[test]
    fn a_closed_ticket_knows_what_its_follow_up_copies() {
        let closed = given::<Ticket>(closed_events())
            .when(TicketCommand::Close)
            .then(vec![]);
        assert!(closed.is_closed());
        let details = closed
            .follow_up_details("Charged twice".into())
            .expect("an opened ticket");
        assert_eq!(
            details,
            TicketDetails {
                priority: Some(Priority::High),
                ..complaint()
            }
        );
        assert!(!Ticket::default().is_closed());
        assert_eq!(Ticket::default().follow_up_details(String::new()), None);
    }

    #[test]
    fn a_follow_up_opens_with_the_customer_reply() {
        let of = Uuid::from_u128(9);
        let command = TicketCommand::OpenFollowUp {
            of,
            details: complaint(),
            author: "ana@example.com".into(),
            body: "It happened again".into(),
        };
        let state = given::<Ticket>([]).when(command.clone()).then(vec![
            TicketEvent::Opened(TicketOpened {
                follow_up_of: Some(of),
                ..match opened() {
                    TicketEvent::Opened(o) => o,
                    _ => unreachable!(),
                }
            }),
            TicketEvent::MessageAdded(TicketMessageAdded {
                author_role: AuthorRole::Customer,
                author: "ana@example.com".into(),
                public: true,
                body: "It happened again".into(),
                occurred_at: now(),
            }),
        ]);
        assert_eq!(state.status, Some(TicketStatus::New));
        given::<Ticket>([opened()])
            .when(command)
            .then_error(DomainError::AlreadyExists {
                key: "ticket_id",
                holder: None,
            });
        given::<Ticket>([])
            .when(TicketCommand::OpenFollowUp {
                of,
                details: complaint(),
                author: String::new(),
                body: " ".into(),
            })
            .then_invalid(&["body", "author"]);
    }

    #[test]
    fn a_closed_ticket_still_refuses_messages_itself() {
        given::<Ticket>(closed_events())
            .when(say(AuthorRole::Customer, "ana"))
            .then_error(DomainError::InvalidTransition {
                from: "closed",
                to: "changed",
            });
    }
}
