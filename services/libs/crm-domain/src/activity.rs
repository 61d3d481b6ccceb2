//! Activity: one interaction or planned piece of work, linked to the records
//! it concerns (DOMAIN.md §2.5).
//!
//! Logged kinds (call, email, SMS, chat, visit, note) happened already;
//! scheduled kinds (meeting, task, call-back) go `Scheduled → Completed` with
//! an outcome. Messages synced from mail or chat systems carry their external
//! id, and the handler derives the activity id from it, so a re-sync
//! converges on the same record.
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::{Aggregate, Context, DomainEvent};
use crate::common::{Change, diff, text_ok};
use crate::error::{DomainError, Violations};

pub const MAX_TARGETS: usize = 20;
pub const LOGGED_KINDS: &[&str] = &["call", "email", "sms", "chat", "visit", "note"];
pub const SCHEDULED_KINDS: &[&str] = &["meeting", "task", "call_back"];
pub const TARGET_KINDS: &[&str] = &["lead", "contact", "account", "opportunity", "ticket"];
pub const OUTCOMES: &[&str] = &["done", "held", "no_show", "cancelled"];

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Target {
    /// The target's stream type: lead, contact, account, opportunity, ticket.
    pub kind: String,
    pub id: Uuid,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActivityCommand {
    /// `targets_exist`: the handler found every target, of its kind.
    Log {
        kind: String,
        direction: String,
        targets: Vec<Target>,
        outcome: String,
        body: String,
        external_id: String,
        targets_exist: bool,
    },
    Schedule {
        kind: String,
        targets: Vec<Target>,
        due: Timestamp,
        assignee: String,
        subject: String,
        targets_exist: bool,
    },
    Complete {
        outcome: String,
        notes: String,
    },
    /// Sent by the scheduler at the due time (`occurred_at` = the due
    /// instant): the scheduled item is still open [NotApplicable].
    MarkTaskOverdue,
    /// Reschedules, reassigns or retitles a scheduled item that is not
    /// completed; a new due time clears the overdue flag.
    UpdateDetails {
        due: Option<Timestamp>,
        assignee: Option<String>,
        subject: Option<String>,
    },
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityChanges {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<Change<Timestamp>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignee: Option<Change<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Change<String>>,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityDetailsUpdated {
    pub changes: ActivityChanges,
    pub occurred_at: Timestamp,
}

/// A scheduled item passed its due time while still open.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOverdue {
    pub due: Timestamp,
    pub assignee: String,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityLogged {
    pub kind: String,
    /// `inbound`, `outbound`, or empty for notes and visits.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub direction: String,
    pub targets: Vec<Target>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub outcome: String,
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub body: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub external_id: String,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityScheduled {
    pub kind: String,
    pub targets: Vec<Target>,
    pub due: Timestamp,
    pub assignee: String,
    pub subject: String,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityCompleted {
    pub outcome: String,
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub notes: String,
    pub occurred_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ActivityEvent {
    Logged(ActivityLogged),
    Scheduled(ActivityScheduled),
    Completed(ActivityCompleted),
    Overdue(TaskOverdue),
    DetailsUpdated(ActivityDetailsUpdated),
}

impl DomainEvent for ActivityEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Logged(_) => "ActivityLogged",
            Self::Scheduled(_) => "ActivityScheduled",
            Self::Completed(_) => "ActivityCompleted",
            Self::Overdue(_) => "TaskOverdue",
            Self::DetailsUpdated(_) => "ActivityDetailsUpdated",
        }
    }

    fn occurred_at(&self) -> jiff::Timestamp {
        match self {
            Self::Logged(e) => e.occurred_at,
            Self::Scheduled(e) => e.occurred_at,
            Self::Completed(e) => e.occurred_at,
            Self::Overdue(e) => e.occurred_at,
            Self::DetailsUpdated(e) => e.occurred_at,
        }
    }

    fn decode<'de, D: serde::Deserializer<'de>>(
        event_type: &str,
        _schema_version: u32,
        payload: D,
    ) -> Result<Option<Self>, D::Error> {
        Ok(Some(match event_type {
            "ActivityLogged" => Self::Logged(Deserialize::deserialize(payload)?),
            "ActivityScheduled" => Self::Scheduled(Deserialize::deserialize(payload)?),
            "ActivityCompleted" => Self::Completed(Deserialize::deserialize(payload)?),
            "TaskOverdue" => Self::Overdue(Deserialize::deserialize(payload)?),
            "ActivityDetailsUpdated" => Self::DetailsUpdated(Deserialize::deserialize(payload)?),
            _ => return Ok(None),
        }))
    }
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivityState {
    #[default]
    None,
    Logged,
    Scheduled,
    Completed,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    pub state: ActivityState,
    pub kind: String,
    pub targets: Vec<Target>,
    pub outcome: String,
    #[serde(default)]
    pub due: Option<Timestamp>,
    #[serde(default)]
    pub assignee: String,
    #[serde(default)]
    pub overdue: bool,
    /// A scheduled item's subject.
    #[serde(default)]
    pub subject: String,
}

/// Checks the targets' count and kinds into `v`. Whether they exist is
/// decided after every input error is known ([`refs_exist`]).
fn validate_targets(targets: &[Target], v: &mut Violations) {
    v.check(!targets.is_empty(), "targets", "needs at least one target");
    v.check(
        targets.len() <= MAX_TARGETS,
        "targets",
        "must have at most 20 targets",
    );
    for (i, target) in targets.iter().enumerate() {
        v.check(
            TARGET_KINDS.contains(&target.kind.as_str()),
            format!("targets[{i}].kind"),
            "must be lead, contact, account, opportunity or ticket",
        );
    }
}

/// After the input checks: every target names a record of its kind.
fn refs_exist(exist: bool) -> Result<(), DomainError> {
    if exist {
        Ok(())
    } else {
        Err(DomainError::InvalidReference { field: "targets" })
    }
}

impl Aggregate for Activity {
    type Command = ActivityCommand;
    type Event = ActivityEvent;
    const STREAM_TYPE: &'static str = "activity";
    /// 2: the state keeps a scheduled item's subject.
    const SNAPSHOT_VERSION: u32 = 2;

    fn exists(&self) -> bool {
        self.state != ActivityState::None
    }

    fn creates(command: &ActivityCommand) -> bool {
        matches!(
            command,
            ActivityCommand::Log { .. } | ActivityCommand::Schedule { .. }
        )
    }

    fn decide(
        &self,
        command: ActivityCommand,
        context: Context,
    ) -> Result<Vec<ActivityEvent>, DomainError> {
        let occurred_at = context.occurred_at()?;
        match command {
            ActivityCommand::Log {
                kind,
                direction,
                mut targets,
                outcome,
                body,
                external_id,
                targets_exist,
            } => {
                if self.exists() {
                    return Err(DomainError::AlreadyExists {
                        key: "activity_id",
                        holder: None,
                    });
                }
                let mut v = Violations::default();
                v.check(
                    LOGGED_KINDS.contains(&kind.as_str()),
                    "kind",
                    "must be call, email, sms, chat, visit or note",
                );
                v.check(
                    direction.is_empty() || direction == "inbound" || direction == "outbound",
                    "direction",
                    "must be inbound, outbound or empty",
                );
                v.check(
                    text_ok(&outcome, 200, true),
                    "outcome",
                    "must be at most 200 characters",
                );
                v.check(
                    body.chars().count() <= 50_000,
                    "body",
                    "must be at most 50000 characters",
                );
                v.check(
                    text_ok(&external_id, 500, true),
                    "external_id",
                    "must be at most 500 characters",
                );
                validate_targets(&targets, &mut v);
                v.into_result()?;
                refs_exist(targets_exist)?;
                targets.sort();
                targets.dedup();
                Ok(vec![ActivityEvent::Logged(ActivityLogged {
                    kind,
                    direction,
                    targets,
                    outcome,
                    body,
                    external_id,
                    occurred_at,
                })])
            }
            ActivityCommand::Schedule {
                kind,
                mut targets,
                due,
                assignee,
                subject,
                targets_exist,
            } => {
                if self.exists() {
                    return Err(DomainError::AlreadyExists {
                        key: "activity_id",
                        holder: None,
                    });
                }
                let mut v = Violations::default();
                v.check(
                    SCHEDULED_KINDS.contains(&kind.as_str()),
                    "kind",
                    "must be meeting, task or call_back",
                );
                v.check(
                    text_ok(&assignee, 200, false),
                    "assignee",
                    "must be 1 to 200 characters",
                );
                v.check(
                    text_ok(&subject, 300, false),
                    "subject",
                    "must be 1 to 300 characters",
                );
                validate_targets(&targets, &mut v);
                v.into_result()?;
                refs_exist(targets_exist)?;
                targets.sort();
                targets.dedup();
                Ok(vec![ActivityEvent::Scheduled(ActivityScheduled {
                    kind,
                    targets,
                    due,
                    assignee,
                    subject,
                    occurred_at,
                })])
            }
            ActivityCommand::UpdateDetails {
                due,
                assignee,
                subject,
            } => {
                match self.state {
                    ActivityState::None => return Err(DomainError::NotFound),
                    ActivityState::Scheduled => {}
                    ActivityState::Logged => {
                        return Err(DomainError::InvalidTransition {
                            from: "logged",
                            to: "changed",
                        });
                    }
                    ActivityState::Completed => {
                        return Err(DomainError::InvalidTransition {
                            from: "completed",
                            to: "changed",
                        });
                    }
                }
                let mut v = Violations::default();
                if let Some(assignee) = &assignee {
                    v.check(
                        text_ok(assignee, 200, false),
                        "assignee",
                        "must be 1 to 200 characters",
                    );
                }
                if let Some(subject) = &subject {
                    v.check(
                        text_ok(subject, 300, false),
                        "subject",
                        "must be 1 to 300 characters",
                    );
                }
                v.into_result()?;
                let changes = ActivityChanges {
                    due: self.due.and_then(|old| diff(&old, due.as_ref())),
                    assignee: diff(&self.assignee, assignee.as_ref()),
                    subject: diff(&self.subject, subject.as_ref()),
                };
                if changes == ActivityChanges::default() {
                    return Ok(vec![]);
                }
                Ok(vec![ActivityEvent::DetailsUpdated(
                    ActivityDetailsUpdated {
                        changes,
                        occurred_at,
                    },
                )])
            }
            ActivityCommand::MarkTaskOverdue => {
                if self.state == ActivityState::None {
                    return Err(DomainError::NotFound);
                }
                if self.overdue {
                    return Ok(vec![]);
                }
                match (self.state, self.due) {
                    (ActivityState::Scheduled, Some(due)) if occurred_at >= due => {
                        Ok(vec![ActivityEvent::Overdue(TaskOverdue {
                            due,
                            assignee: self.assignee.clone(),
                            occurred_at,
                        })])
                    }
                    _ => Err(DomainError::NotApplicable {
                        rule: "task overdue",
                    }),
                }
            }
            ActivityCommand::Complete { outcome, notes } => {
                match self.state {
                    ActivityState::None => return Err(DomainError::NotFound),
                    ActivityState::Scheduled => {}
                    ActivityState::Logged => {
                        return Err(DomainError::InvalidTransition {
                            from: "logged",
                            to: "completed",
                        });
                    }
                    ActivityState::Completed if self.outcome == outcome => return Ok(vec![]),
                    ActivityState::Completed => {
                        return Err(DomainError::InvalidTransition {
                            from: "completed",
                            to: "completed",
                        });
                    }
                }
                let mut v = Violations::default();
                v.check(
                    OUTCOMES.contains(&outcome.as_str()),
                    "outcome",
                    "must be done, held, no_show or cancelled",
                );
                v.check(
                    notes.chars().count() <= 20_000,
                    "notes",
                    "must be at most 20000 characters",
                );
                v.into_result()?;
                Ok(vec![ActivityEvent::Completed(ActivityCompleted {
                    outcome,
                    notes,
                    occurred_at,
                })])
            }
        }
    }

    fn evolve(mut self, event: &ActivityEvent) -> Self {
        match event {
            ActivityEvent::Logged(logged) => {
                self.state = ActivityState::Logged;
                self.kind = logged.kind.clone();
                self.targets = logged.targets.clone();
                self.outcome = logged.outcome.clone();
            }
            ActivityEvent::Scheduled(scheduled) => {
                self.state = ActivityState::Scheduled;
                self.kind = scheduled.kind.clone();
                self.targets = scheduled.targets.clone();
                self.due = Some(scheduled.due);
                self.assignee = scheduled.assignee.clone();
                self.subject = scheduled.subject.clone();
            }
            ActivityEvent::DetailsUpdated(updated) => {
                let c = &updated.changes;
                if let Some(change) = &c.due {
                    self.due = Some(change.new);
                    // A new due time: it may fall overdue again.
                    self.overdue = false;
                }
                if let Some(change) = &c.assignee {
                    self.assignee = change.new.clone();
                }
                if let Some(change) = &c.subject {
                    self.subject = change.new.clone();
                }
            }
            ActivityEvent::Overdue(_) => self.overdue = true,
            ActivityEvent::Completed(completed) => {
                self.state = ActivityState::Completed;
                self.outcome = completed.outcome.clone();
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{given, now};

    fn contact() -> Target {
        Target {
            kind: "contact".into(),
            id: Uuid::from_u128(1),
        }
    }

    fn scheduled() -> ActivityEvent {
        ActivityEvent::Scheduled(ActivityScheduled {
            kind: "meeting".into(),
            targets: vec![contact()],
            due: now(),
            assignee: "user:rep".into(),
            subject: "Kick-off".into(),
            occurred_at: now(),
        })
    }

    fn log(kind: &str, targets: Vec<Target>, exist: bool) -> ActivityCommand {
        ActivityCommand::Log {
            kind: kind.into(),
            direction: "outbound".into(),
            targets,
            outcome: "interested".into(),
            body: "Talked about the renewal".into(),
            external_id: String::new(),
            targets_exist: exist,
        }
    }

    #[test]
    fn an_open_task_past_due_is_marked_overdue_once() {
        let ActivityEvent::Scheduled(s) = scheduled() else {
            unreachable!()
        };
        let at = |t: jiff::Timestamp| t.to_string();
        let overdue = given::<Activity>([scheduled()])
            .at(&at(s.due))
            .when(ActivityCommand::MarkTaskOverdue)
            .then(vec![ActivityEvent::Overdue(TaskOverdue {
                due: s.due,
                assignee: s.assignee.clone(),
                occurred_at: s.due,
            })]);
        assert!(overdue.overdue);
        let marked = ActivityEvent::Overdue(TaskOverdue {
            due: s.due,
            assignee: s.assignee.clone(),
            occurred_at: s.due,
        });
        given::<Activity>([scheduled(), marked])
            .at(&at(s.due))
            .when(ActivityCommand::MarkTaskOverdue)
            .then(vec![]);
        // Done before the due time, or not due yet: the rule does not apply.
        let done = ActivityEvent::Completed(ActivityCompleted {
            outcome: "done".into(),
            notes: String::new(),
            occurred_at: s.occurred_at,
        });
        given::<Activity>([scheduled(), done])
            .at(&at(s.due))
            .when(ActivityCommand::MarkTaskOverdue)
            .then_error(DomainError::NotApplicable {
                rule: "task overdue",
            });
        given::<Activity>([])
            .when(ActivityCommand::MarkTaskOverdue)
            .then_error(DomainError::NotFound);
    }

    #[test]
    fn logging_needs_a_known_kind_and_existing_targets() {
        let events = given::<Activity>([])
            .when(log("call", vec![contact(), contact()], true))
            .result
            .unwrap();
        assert!(
            matches!(&events[0], ActivityEvent::Logged(l) if l.targets.len() == 1),
            "duplicate targets collapse"
        );
        given::<Activity>([])
            .when(log("fax", vec![], true))
            .then_invalid(&["kind", "targets"]);
        given::<Activity>([])
            .when(log("call", vec![contact()], false))
            .then_error(DomainError::InvalidReference { field: "targets" });
        // Input errors come first, even when the targets do not exist.
        let widget = Target {
            kind: "widget".into(),
            id: Uuid::from_u128(9),
        };
        given::<Activity>([])
            .when(log("fax", vec![widget], false))
            .then_invalid(&["kind", "targets[0].kind"]);
        given::<Activity>([])
            .at("2026-11-28T11:00:00Z")
            .when(log("call", vec![contact()], true))
            .then_invalid(&["options.occurred_at"]);
    }

    #[test]
    fn scheduled_work_completes_once() {
        let complete = |outcome: &str| ActivityCommand::Complete {
            outcome: outcome.into(),
            notes: String::new(),
        };
        let state = given::<Activity>([scheduled()])
            .when(complete("held"))
            .then(vec![ActivityEvent::Completed(ActivityCompleted {
                outcome: "held".into(),
                notes: String::new(),
                occurred_at: now(),
            })]);
        assert_eq!(state.state, ActivityState::Completed);
        let done = ActivityEvent::Completed(ActivityCompleted {
            outcome: "held".into(),
            notes: String::new(),
            occurred_at: now(),
        });
        given::<Activity>([scheduled(), done.clone()])
            .when(complete("held"))
            .then(vec![]);
        given::<Activity>([scheduled(), done])
            .when(complete("no_show"))
            .then_error(DomainError::InvalidTransition {
                from: "completed",
                to: "completed",
            });
        given::<Activity>([scheduled()])
            .when(complete("great"))
            .then_invalid(&["outcome"]);
        given::<Activity>([])
            .when(complete("done"))
            .then_error(DomainError::NotFound);
    }

    #[test]
    fn a_scheduled_item_is_rescheduled_and_may_fall_overdue_again() {
        let later = now() + jiff::SignedDuration::from_hours(48);
        let marked = ActivityEvent::Overdue(TaskOverdue {
            due: now(),
            assignee: "user:rep".into(),
            occurred_at: now(),
        });
        let update = |due: Option<Timestamp>, assignee: Option<&str>, subject: Option<&str>| {
            ActivityCommand::UpdateDetails {
                due,
                assignee: assignee.map(Into::into),
                subject: subject.map(Into::into),
            }
        };
        let state = given::<Activity>([scheduled(), marked])
            .when(update(Some(later), Some("user:ana"), Some("Kick-off")))
            .then(vec![ActivityEvent::DetailsUpdated(
                ActivityDetailsUpdated {
                    changes: ActivityChanges {
                        due: Some(Change {
                            old: now(),
                            new: later,
                        }),
                        assignee: Some(Change {
                            old: "user:rep".into(),
                            new: "user:ana".into(),
                        }),
                        subject: None,
                    },
                    occurred_at: now(),
                },
            )]);
        assert!(!state.overdue);
        assert_eq!(state.due, Some(later));
        // The scheduler's command for the old due time no longer applies.
        assert_eq!(
            state.decide(
                ActivityCommand::MarkTaskOverdue,
                crate::aggregate::Context::at(now())
            ),
            Err(DomainError::NotApplicable {
                rule: "task overdue"
            })
        );
        given::<Activity>([scheduled()])
            .when(update(Some(now()), None, Some("Kick-off")))
            .then(vec![]);
        given::<Activity>([scheduled()])
            .when(update(None, Some(""), Some(" ")))
            .then_invalid(&["assignee", "subject"]);
        let done = ActivityEvent::Completed(ActivityCompleted {
            outcome: "done".into(),
            notes: String::new(),
            occurred_at: now(),
        });
        given::<Activity>([scheduled(), done])
            .when(update(Some(later), None, None))
            .then_error(DomainError::InvalidTransition {
                from: "completed",
                to: "changed",
            });
        given::<Activity>([])
            .when(update(Some(later), None, None))
            .then_error(DomainError::NotFound);
    }
}
