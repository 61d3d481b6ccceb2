//! The SLA tracker (`ticket_sla`, DOMAIN.md §2.7) and business-hours clocks
//! (§4).
//!
//! One tracker per ticket, keyed by the ticket id and written only by the SLA
//! process manager and the scheduler, so timers never race agents on the
//! ticket's version. Each metric (first response, next response, resolution)
//! has a clock: `Running ⇄ Paused → Met`, with a target in business minutes,
//! the instant it started, the business time elapsed, when it falls due and
//! when it warns. Business time is walked through a [`BusinessCalendar`]
//! (zone, daylight saving, holidays, make-up workdays), or is plain wall
//! time (24×7) when the policy names no calendar.
//!
//! `decide` is pure: the caller passes the policy in force and the calendar
//! content; the tracker records which versions it used.
use std::collections::BTreeMap;

use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::{Aggregate, Context, DomainEvent};
use crate::configuration::BusinessCalendar;
use crate::error::DomainError;

named_enum!(
    /// What a clock measures.
    SlaMetric { FirstResponse = "first_response", NextResponse = "next_response", Resolution = "resolution" }
);
named_enum!(
    /// Where a clock stands; `Met` is final (a reopened ticket's resolution
    /// clock is re-applied, keeping its elapsed time).
    ClockState { Running = "running", Paused = "paused", Met = "met" }
);

/// The tracker's stream id for a ticket: derived, one per ticket (the
/// ticket's own stream belongs to the ticket).
pub fn tracker_id(ticket_id: Uuid) -> Uuid {
    const NAMESPACE: Uuid = Uuid::from_u128(0x6d0f_3c1e_8a55_4c7e_9f0b_5e1d_2c3a_7b41);
    Uuid::new_v5(&NAMESPACE, ticket_id.as_bytes())
}

/// Longest a clock may walk a calendar looking for working time (ten years).
const MAX_DAYS: usize = 3660;

// ------------------------------------------------------------ business time

impl BusinessCalendar {
    fn zone(&self) -> TimeZone {
        TimeZone::get(&self.time_zone).unwrap_or(TimeZone::UTC)
    }

    /// Working intervals of `date` in the calendar's zone, in order: the
    /// override of that date if any (a holiday has none), else the weekday's.
    pub fn hours_on(&self, date: Date) -> Vec<(Time, Time)> {
        let mut hours: Vec<(Time, Time)> = match self.overrides.iter().find(|day| day.date == date)
        {
            Some(day) => day.hours.clone(),
            None => {
                let weekday = date.weekday().to_monday_one_offset();
                self.weekly
                    .iter()
                    .filter(|h| i8::try_from(h.weekday).ok() == Some(weekday))
                    .map(|h| (h.start, h.end))
                    .collect()
            }
        };
        hours.sort();
        hours
    }

    /// Working intervals as instants, from the day holding `from` on, each
    /// clipped to start no earlier than `from`; at most [`MAX_DAYS`] days.
    fn intervals_from(&self, from: Timestamp) -> impl Iterator<Item = (Timestamp, Timestamp)> {
        let zone = self.zone();
        let first = from.to_zoned(zone.clone()).date();
        std::iter::successors(Some(first), |day| day.tomorrow().ok())
            .take(MAX_DAYS)
            .flat_map(move |day| {
                let zone = zone.clone();
                self.hours_on(day)
                    .into_iter()
                    .filter_map(move |(start, end)| {
                        let start = day.to_datetime(start).to_zoned(zone.clone()).ok()?;
                        let end = day.to_datetime(end).to_zoned(zone.clone()).ok()?;
                        Some((start.timestamp(), end.timestamp()))
                    })
                    .collect::<Vec<_>>()
            })
            .filter(move |(_, end)| *end > from)
            .map(move |(start, end)| (start.max(from), end))
    }
}

/// Business seconds in `[from, to)`: working time of `calendar`, or wall
/// time without one.
pub fn business_seconds(
    calendar: Option<&BusinessCalendar>,
    from: Timestamp,
    to: Timestamp,
) -> i64 {
    if to <= from {
        return 0;
    }
    let Some(calendar) = calendar else {
        return to.duration_since(from).as_secs();
    };
    let mut total = 0;
    for (start, end) in calendar.intervals_from(from) {
        if start >= to {
            break;
        }
        total += end.min(to).duration_since(start).as_secs();
    }
    total
}

/// The instant `seconds` of business time after `from` (`from` itself for
/// zero or less); `None` when the calendar has no such working time within
/// ten years.
pub fn add_business_seconds(
    calendar: Option<&BusinessCalendar>,
    from: Timestamp,
    seconds: i64,
) -> Option<Timestamp> {
    if seconds <= 0 {
        return Some(from);
    }
    let Some(calendar) = calendar else {
        return from.checked_add(SignedDuration::from_secs(seconds)).ok();
    };
    let mut left = seconds;
    for (start, end) in calendar.intervals_from(from) {
        let available = end.duration_since(start).as_secs();
        if available >= left {
            return start.checked_add(SignedDuration::from_secs(left)).ok();
        }
        left -= available;
    }
    None
}

// ----------------------------------------------------------------- tracker

/// The policy in force for a ticket, as the process manager found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlaRules {
    pub policy_id: Uuid,
    pub policy_version: u32,
    /// Target in business minutes per metric, for the ticket's priority.
    pub targets: BTreeMap<SlaMetric, u32>,
    pub warning_percent: u8,
    /// The calendar's stream id, version and content; `None`: 24×7.
    pub calendar: Option<(Uuid, u32, BusinessCalendar)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlaCommand {
    /// Starts the clocks of `metrics`, or re-applies them under new rules
    /// with the same start and elapsed time (a priority or policy change, a
    /// reopen). `paused`: the metrics the ticket's status pauses now.
    /// `cause`: `opened`, `priority_changed`, `policy_changed`, `reopened`
    /// or `customer_message` (starts next response when none is running).
    Apply {
        ticket_id: Uuid,
        rules: SlaRules,
        metrics: Vec<SlaMetric>,
        paused: Vec<SlaMetric>,
        cause: String,
    },
    /// Stops the running clocks of `metrics`, keeping their elapsed time.
    Pause {
        metrics: Vec<SlaMetric>,
        status: String,
        calendar: Option<BusinessCalendar>,
    },
    /// Restarts the paused clocks of `metrics`; their due is recomputed.
    Resume {
        metrics: Vec<SlaMetric>,
        calendar: Option<BusinessCalendar>,
    },
    /// The target was reached (a public reply, the ticket solved).
    Meet {
        metric: SlaMetric,
        calendar: Option<BusinessCalendar>,
    },
    /// The scheduler: the clock reached the warning share at `at`.
    Warn { metric: SlaMetric, at: Timestamp },
    /// The scheduler: the clock fell due at `due` without being met.
    Breach { metric: SlaMetric, due: Timestamp },
}

/// One clock as applied.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedClock {
    pub metric: SlaMetric,
    pub target_minutes: u32,
    pub start: Timestamp,
    /// Business time counted before this event.
    pub elapsed_seconds: i64,
    pub state: ClockState,
    /// When the target falls due (running clocks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<Timestamp>,
    /// When the warning share is reached (running, not yet warned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_at: Option<Timestamp>,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlaPolicyApplied {
    pub ticket_id: Uuid,
    pub policy_id: Uuid,
    pub policy_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calendar_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calendar_version: Option<u32>,
    pub warning_percent: u8,
    pub cause: String,
    pub clocks: Vec<AppliedClock>,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PausedClock {
    pub metric: SlaMetric,
    pub elapsed_seconds: i64,
    pub elapsed_minutes: i64,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlaClockPaused {
    /// The ticket status that paused the clocks.
    pub status: String,
    pub clocks: Vec<PausedClock>,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumedClock {
    pub metric: SlaMetric,
    pub due: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_at: Option<Timestamp>,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlaClockResumed {
    pub clocks: Vec<ResumedClock>,
    pub occurred_at: Timestamp,
}

/// A warning or a breach: `occurred_at` is when the condition became true.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlaAlarm {
    pub ticket_id: Uuid,
    pub metric: SlaMetric,
    pub due: Timestamp,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlaTargetMet {
    pub metric: SlaMetric,
    /// Business minutes from start to now, paused time excluded.
    pub business_minutes: i64,
    /// Wall-clock minutes from start to now.
    pub calendar_minutes: i64,
    pub elapsed_seconds: i64,
    /// Met late (breached before, or past the target now).
    pub breached: bool,
    pub occurred_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum SlaEvent {
    PolicyApplied(SlaPolicyApplied),
    Paused(SlaClockPaused),
    Resumed(SlaClockResumed),
    WarningReached(SlaAlarm),
    Breached(SlaAlarm),
    TargetMet(SlaTargetMet),
}

impl DomainEvent for SlaEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::PolicyApplied(_) => "SlaPolicyApplied",
            Self::Paused(_) => "SlaClockPaused",
            Self::Resumed(_) => "SlaClockResumed",
            Self::WarningReached(_) => "SlaWarningReached",
            Self::Breached(_) => "SlaBreached",
            Self::TargetMet(_) => "SlaTargetMet",
        }
    }

    fn occurred_at(&self) -> jiff::Timestamp {
        match self {
            Self::PolicyApplied(e) => e.occurred_at,
            Self::Paused(e) => e.occurred_at,
            Self::Resumed(e) => e.occurred_at,
            Self::WarningReached(e) => e.occurred_at,
            Self::Breached(e) => e.occurred_at,
            Self::TargetMet(e) => e.occurred_at,
        }
    }

    fn decode<'de, D: serde::Deserializer<'de>>(
        event_type: &str,
        _schema_version: u32,
        payload: D,
    ) -> Result<Option<Self>, D::Error> {
        Ok(Some(match event_type {
            "SlaPolicyApplied" => Self::PolicyApplied(Deserialize::deserialize(payload)?),
            "SlaClockPaused" => Self::Paused(Deserialize::deserialize(payload)?),
            "SlaClockResumed" => Self::Resumed(Deserialize::deserialize(payload)?),
            "SlaWarningReached" => Self::WarningReached(Deserialize::deserialize(payload)?),
            "SlaBreached" => Self::Breached(Deserialize::deserialize(payload)?),
            "SlaTargetMet" => Self::TargetMet(Deserialize::deserialize(payload)?),
            _ => return Ok(None),
        }))
    }
}

/// One metric's clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clock {
    pub target_minutes: u32,
    pub start: Timestamp,
    /// Business seconds counted up to `since`.
    pub elapsed_seconds: i64,
    /// When the clock last started running (or was applied).
    pub since: Timestamp,
    pub state: ClockState,
    pub due: Option<Timestamp>,
    pub warn_at: Option<Timestamp>,
    pub warned: bool,
    pub breached: bool,
    /// When it breached (the due instant, or when it was met late).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breached_at: Option<Timestamp>,
}

impl Clock {
    fn target_seconds(&self) -> i64 {
        i64::from(self.target_minutes) * 60
    }

    /// Business seconds counted at `now`.
    fn elapsed_at(&self, calendar: Option<&BusinessCalendar>, now: Timestamp) -> i64 {
        match self.state {
            ClockState::Running => {
                self.elapsed_seconds + business_seconds(calendar, self.since, now)
            }
            ClockState::Paused | ClockState::Met => self.elapsed_seconds,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlaTracker {
    pub ticket_id: Option<Uuid>,
    pub policy_id: Option<Uuid>,
    pub policy_version: u32,
    pub calendar_id: Option<Uuid>,
    pub calendar_version: Option<u32>,
    pub warning_percent: u8,
    pub clocks: BTreeMap<SlaMetric, Clock>,
}

fn not_applicable() -> DomainError {
    DomainError::NotApplicable { rule: "sla" }
}

/// When a running clock with `elapsed` business seconds at `now` falls due
/// and warns.
fn schedule(
    calendar: Option<&BusinessCalendar>,
    now: Timestamp,
    target_seconds: i64,
    warning_percent: u8,
    elapsed: i64,
    warned: bool,
) -> Result<(Timestamp, Option<Timestamp>), DomainError> {
    let beyond = || DomainError::invalid("calendar", "has no working time within ten years");
    let due = add_business_seconds(calendar, now, target_seconds - elapsed).ok_or_else(beyond)?;
    let warn_at = if warned {
        None
    } else {
        let threshold = target_seconds * i64::from(warning_percent) / 100;
        Some(add_business_seconds(calendar, now, threshold - elapsed).ok_or_else(beyond)?)
    };
    Ok((due, warn_at))
}

impl SlaTracker {
    /// The calendar the tracker's clocks run on, as recorded.
    pub fn calendar_ref(&self) -> Option<(Uuid, u32)> {
        self.calendar_id.zip(self.calendar_version)
    }

    fn apply(
        &self,
        ticket_id: Uuid,
        rules: SlaRules,
        metrics: Vec<SlaMetric>,
        paused: &[SlaMetric],
        cause: String,
        now: Timestamp,
    ) -> Result<Vec<SlaEvent>, DomainError> {
        let calendar = rules.calendar.as_ref().map(|(_, _, c)| c);
        let mut clocks = Vec::new();
        let mut breaches = Vec::new();
        for metric in metrics {
            let Some(&target_minutes) = rules.targets.get(&metric) else {
                continue;
            };
            let existing = self.clocks.get(&metric);
            // A clock starts when the ticket opens, and next response with
            // each customer message once the previous one was answered;
            // every other cause re-applies clocks that exist.
            let fresh = match existing {
                None => {
                    cause == "opened"
                        || (metric == SlaMetric::NextResponse && cause == "customer_message")
                }
                Some(clock) => {
                    metric == SlaMetric::NextResponse
                        && cause == "customer_message"
                        && clock.state == ClockState::Met
                }
            };
            if cause == "customer_message" {
                let first_response_open = self
                    .clocks
                    .get(&SlaMetric::FirstResponse)
                    .is_some_and(|c| c.state != ClockState::Met);
                if metric != SlaMetric::NextResponse || !fresh || first_response_open {
                    // The first response, or an earlier unanswered message,
                    // already covers this one.
                    continue;
                }
            }
            if existing.is_none() && !fresh {
                continue;
            }
            let (start, elapsed, warned, breached) = match existing {
                Some(clock) if !fresh => {
                    if clock.state == ClockState::Met
                        && !(metric == SlaMetric::Resolution && cause == "reopened")
                    {
                        continue; // met is final
                    }
                    // Elapsed time was counted on the calendar then in force.
                    let elapsed = if clock.state == ClockState::Running {
                        clock.elapsed_seconds + business_seconds(calendar, clock.since, now)
                    } else {
                        clock.elapsed_seconds
                    };
                    (clock.start, elapsed, clock.warned, clock.breached)
                }
                _ => (now, 0, false, false),
            };
            let target_seconds = i64::from(target_minutes) * 60;
            let (state, due, warn_at) = if paused.contains(&metric) {
                (ClockState::Paused, None, None)
            } else {
                let (due, warn_at) = schedule(
                    calendar,
                    now,
                    target_seconds,
                    rules.warning_percent,
                    elapsed,
                    warned,
                )?;
                (ClockState::Running, Some(due), warn_at)
            };
            if state == ClockState::Running && elapsed >= target_seconds && !breached {
                // Already over under the new target: breached now.
                breaches.push(SlaEvent::Breached(SlaAlarm {
                    ticket_id,
                    metric,
                    due: now,
                    occurred_at: now,
                }));
            }
            clocks.push(AppliedClock {
                metric,
                target_minutes,
                start,
                elapsed_seconds: elapsed,
                state,
                due,
                warn_at,
            });
        }
        if clocks.is_empty() {
            return Ok(vec![]);
        }
        let (calendar_id, calendar_version) = match &rules.calendar {
            Some((id, version, _)) => (Some(*id), Some(*version)),
            None => (None, None),
        };
        let mut events = vec![SlaEvent::PolicyApplied(SlaPolicyApplied {
            ticket_id,
            policy_id: rules.policy_id,
            policy_version: rules.policy_version,
            calendar_id,
            calendar_version,
            warning_percent: rules.warning_percent,
            cause,
            clocks,
            occurred_at: now,
        })];
        events.extend(breaches);
        Ok(events)
    }
}

impl Aggregate for SlaTracker {
    type Command = SlaCommand;
    type Event = SlaEvent;
    const STREAM_TYPE: &'static str = "ticket_sla";

    fn exists(&self) -> bool {
        self.policy_id.is_some()
    }

    fn decide(&self, command: SlaCommand, context: Context) -> Result<Vec<SlaEvent>, DomainError> {
        let now = context.occurred_at()?;
        match command {
            SlaCommand::Apply {
                ticket_id,
                rules,
                metrics,
                paused,
                cause,
            } => {
                if self.ticket_id.is_some_and(|id| id != ticket_id) {
                    return Err(DomainError::invalid(
                        "ticket_id",
                        "is not this tracker's ticket",
                    ));
                }
                if !crate::common::is_code(&cause, 64) {
                    return Err(DomainError::invalid("cause", "must be a code of [a-z0-9_]"));
                }
                if rules.warning_percent == 0 || rules.warning_percent > 99 {
                    return Err(DomainError::invalid("warning_percent", "must be 1 to 99"));
                }
                self.apply(ticket_id, rules, metrics, &paused, cause, now)
            }
            SlaCommand::Pause {
                metrics,
                status,
                calendar,
            } => {
                let clocks: Vec<PausedClock> = self
                    .clocks
                    .iter()
                    .filter(|(m, c)| metrics.contains(m) && c.state == ClockState::Running)
                    .map(|(&metric, clock)| {
                        let elapsed = clock.elapsed_at(calendar.as_ref(), now);
                        PausedClock {
                            metric,
                            elapsed_seconds: elapsed,
                            elapsed_minutes: elapsed / 60,
                        }
                    })
                    .collect();
                if clocks.is_empty() {
                    return Ok(vec![]);
                }
                Ok(vec![SlaEvent::Paused(SlaClockPaused {
                    status,
                    clocks,
                    occurred_at: now,
                })])
            }
            SlaCommand::Resume { metrics, calendar } => {
                let mut clocks = Vec::new();
                for (&metric, clock) in &self.clocks {
                    if !metrics.contains(&metric) || clock.state != ClockState::Paused {
                        continue;
                    }
                    let (due, warn_at) = schedule(
                        calendar.as_ref(),
                        now,
                        clock.target_seconds(),
                        self.warning_percent,
                        clock.elapsed_seconds,
                        clock.warned,
                    )?;
                    clocks.push(ResumedClock {
                        metric,
                        due,
                        warn_at,
                    });
                }
                if clocks.is_empty() {
                    return Ok(vec![]);
                }
                Ok(vec![SlaEvent::Resumed(SlaClockResumed {
                    clocks,
                    occurred_at: now,
                })])
            }
            SlaCommand::Meet { metric, calendar } => {
                let Some(clock) = self.clocks.get(&metric) else {
                    return Ok(vec![]);
                };
                if clock.state == ClockState::Met {
                    return Ok(vec![]);
                }
                let elapsed = clock.elapsed_at(calendar.as_ref(), now);
                Ok(vec![SlaEvent::TargetMet(SlaTargetMet {
                    metric,
                    business_minutes: elapsed / 60,
                    calendar_minutes: now.duration_since(clock.start).as_secs().max(0) / 60,
                    elapsed_seconds: elapsed,
                    breached: clock.breached || elapsed > clock.target_seconds(),
                    occurred_at: now,
                })])
            }
            SlaCommand::Warn { metric, at } => {
                let clock = self.clocks.get(&metric).ok_or_else(not_applicable)?;
                if clock.state != ClockState::Running
                    || clock.warned
                    || clock.warn_at != Some(at)
                    || now < at
                {
                    return Err(not_applicable());
                }
                Ok(vec![SlaEvent::WarningReached(SlaAlarm {
                    ticket_id: self.ticket_id.unwrap_or_default(),
                    metric,
                    due: clock.due.unwrap_or(at),
                    occurred_at: at,
                })])
            }
            SlaCommand::Breach { metric, due } => {
                let clock = self.clocks.get(&metric).ok_or_else(not_applicable)?;
                if clock.state != ClockState::Running
                    || clock.breached
                    || clock.due != Some(due)
                    || now < due
                {
                    return Err(not_applicable());
                }
                Ok(vec![SlaEvent::Breached(SlaAlarm {
                    ticket_id: self.ticket_id.unwrap_or_default(),
                    metric,
                    due,
                    occurred_at: due,
                })])
            }
        }
    }

    fn evolve(mut self, event: &SlaEvent) -> Self {
        match event {
            SlaEvent::PolicyApplied(applied) => {
                self.ticket_id = Some(applied.ticket_id);
                self.policy_id = Some(applied.policy_id);
                self.policy_version = applied.policy_version;
                self.calendar_id = applied.calendar_id;
                self.calendar_version = applied.calendar_version;
                self.warning_percent = applied.warning_percent;
                for clock in &applied.clocks {
                    let (warned, breached, breached_at) = match self.clocks.get(&clock.metric) {
                        Some(old) if old.start == clock.start => {
                            (old.warned, old.breached, old.breached_at)
                        }
                        _ => (false, false, None),
                    };
                    self.clocks.insert(
                        clock.metric,
                        Clock {
                            target_minutes: clock.target_minutes,
                            start: clock.start,
                            elapsed_seconds: clock.elapsed_seconds,
                            since: applied.occurred_at,
                            state: clock.state,
                            due: clock.due,
                            warn_at: clock.warn_at,
                            warned,
                            breached,
                            breached_at,
                        },
                    );
                }
            }
            SlaEvent::Paused(paused) => {
                for p in &paused.clocks {
                    if let Some(clock) = self.clocks.get_mut(&p.metric) {
                        clock.elapsed_seconds = p.elapsed_seconds;
                        clock.since = paused.occurred_at;
                        clock.state = ClockState::Paused;
                        clock.due = None;
                        clock.warn_at = None;
                    }
                }
            }
            SlaEvent::Resumed(resumed) => {
                for r in &resumed.clocks {
                    if let Some(clock) = self.clocks.get_mut(&r.metric) {
                        clock.since = resumed.occurred_at;
                        clock.state = ClockState::Running;
                        clock.due = Some(r.due);
                        clock.warn_at = r.warn_at;
                    }
                }
            }
            SlaEvent::WarningReached(alarm) => {
                if let Some(clock) = self.clocks.get_mut(&alarm.metric) {
                    clock.warned = true;
                    clock.warn_at = None;
                }
            }
            SlaEvent::Breached(alarm) => {
                if let Some(clock) = self.clocks.get_mut(&alarm.metric) {
                    clock.breached = true;
                    clock.breached_at = Some(alarm.occurred_at);
                    clock.warned = true;
                    clock.warn_at = None;
                }
            }
            SlaEvent::TargetMet(met) => {
                if let Some(clock) = self.clocks.get_mut(&met.metric) {
                    clock.elapsed_seconds = met.elapsed_seconds;
                    clock.since = met.occurred_at;
                    clock.state = ClockState::Met;
                    clock.breached = met.breached;
                    if met.breached && clock.breached_at.is_none() {
                        clock.breached_at = Some(met.occurred_at);
                    }
                    clock.due = None;
                    clock.warn_at = None;
                }
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::{DateOverride, WorkingHours};
    use crate::testing::given;

    fn at(text: &str) -> Timestamp {
        text.parse().expect("timestamp")
    }

    /// Mon–Fri 09:00–18:00 in `zone`.
    fn office(zone: &str) -> BusinessCalendar {
        BusinessCalendar {
            name: "office".into(),
            time_zone: zone.into(),
            weekly: (1..=5)
                .map(|weekday| WorkingHours {
                    weekday,
                    start: Time::constant(9, 0, 0, 0),
                    end: Time::constant(18, 0, 0, 0),
                })
                .collect(),
            overrides: vec![],
        }
    }

    // Worked example B: Asia/Shanghai is UTC+8; Fri 2026-11-13 17:00 local
    // is 09:00Z.
    const TICKET: Uuid = Uuid::from_u128(42);

    const FRI_1700: &str = "2026-11-13T09:00:00Z";

    fn minutes(calendar: &BusinessCalendar, from: &str, to: &str) -> i64 {
        business_seconds(Some(calendar), at(from), at(to)) / 60
    }

    fn plus(calendar: &BusinessCalendar, from: &str, minutes: i64) -> Timestamp {
        add_business_seconds(Some(calendar), at(from), minutes * 60).expect("working time")
    }

    #[test]
    fn business_minutes_skip_nights_and_weekends() {
        let shanghai = office("Asia/Shanghai");
        // First response 2 h: Fri 17:00–18:00, Mon 09:00–10:00.
        assert_eq!(plus(&shanghai, FRI_1700, 120), at("2026-11-16T02:00:00Z"));
        // Resolution 16 h: Fri 1 h + Mon 9 h + Tue 6 h → Tue 15:00.
        assert_eq!(plus(&shanghai, FRI_1700, 960), at("2026-11-17T07:00:00Z"));
        // Fri 17:00 → Mon 10:20 is 140 business minutes.
        assert_eq!(minutes(&shanghai, FRI_1700, "2026-11-16T02:20:00Z"), 140);
        // Nothing counts outside working hours, and an empty span is zero.
        assert_eq!(
            minutes(&shanghai, "2026-11-14T01:00:00Z", "2026-11-15T12:00:00Z"),
            0
        );
        assert_eq!(minutes(&shanghai, FRI_1700, FRI_1700), 0);
        // Starting at night begins at the next opening.
        assert_eq!(
            plus(&shanghai, "2026-11-15T20:00:00Z", 30),
            at("2026-11-16T01:30:00Z")
        );
    }

    #[test]
    fn holidays_close_and_make_up_days_open() {
        let mut shanghai = office("Asia/Shanghai");
        shanghai.overrides = vec![
            DateOverride {
                date: jiff::civil::date(2026, 11, 16),
                hours: vec![],
                name: "holiday".into(),
            },
            DateOverride {
                date: jiff::civil::date(2026, 11, 14),
                hours: vec![(Time::constant(10, 0, 0, 0), Time::constant(12, 0, 0, 0))],
                name: "make-up Saturday".into(),
            },
        ];
        // Fri 17:00–18:00, then Saturday 10:00–11:00 (make-up day).
        assert_eq!(plus(&shanghai, FRI_1700, 120), at("2026-11-14T03:00:00Z"));
        // 4 h: Fri 1 h + Sat 2 h + (Mon is a holiday) Tue 09:00–10:00.
        assert_eq!(plus(&shanghai, FRI_1700, 240), at("2026-11-17T02:00:00Z"));
        assert_eq!(minutes(&shanghai, FRI_1700, "2026-11-17T02:00:00Z"), 240);
    }

    #[test]
    fn daylight_saving_moves_working_hours_with_the_wall_clock() {
        let mut berlin = office("Europe/Berlin");
        berlin.weekly = (1..=7)
            .map(|weekday| WorkingHours {
                weekday,
                start: Time::constant(9, 0, 0, 0),
                end: Time::constant(18, 0, 0, 0),
            })
            .collect();
        // Sat 2026-10-24 17:00 CEST (15:00Z) + 2 h → Sun 10:00 CET (09:00Z),
        // the clocks having gone back overnight.
        assert_eq!(
            plus(&berlin, "2026-10-24T15:00:00Z", 120),
            at("2026-10-25T09:00:00Z")
        );
    }

    #[test]
    fn without_a_calendar_business_time_is_wall_time() {
        assert_eq!(
            add_business_seconds(None, at(FRI_1700), 3600),
            Some(at("2026-11-13T10:00:00Z"))
        );
        assert_eq!(
            business_seconds(None, at(FRI_1700), at("2026-11-14T09:00:00Z")),
            86_400
        );
    }

    fn rules(first_response: u32, resolution: u32) -> SlaRules {
        SlaRules {
            policy_id: Uuid::from_u128(7),
            policy_version: 1,
            targets: BTreeMap::from([
                (SlaMetric::FirstResponse, first_response),
                (SlaMetric::NextResponse, 1440),
                (SlaMetric::Resolution, resolution),
            ]),
            warning_percent: 75,
            calendar: Some((Uuid::from_u128(9), 1, office("Asia/Shanghai"))),
        }
    }

    fn open_complaint() -> SlaCommand {
        SlaCommand::Apply {
            ticket_id: TICKET,
            rules: rules(120, 960),
            metrics: vec![SlaMetric::FirstResponse, SlaMetric::Resolution],
            paused: vec![],
            cause: "opened".into(),
        }
    }

    fn run(
        state: SlaTracker,
        occurred_at: &str,
        command: SlaCommand,
    ) -> (SlaTracker, Vec<SlaEvent>) {
        let events = state
            .decide(
                command,
                Context {
                    now: at("2026-11-29T00:00:00Z"),
                    occurred_at: Some(at(occurred_at)),
                },
            )
            .expect("the command was refused");
        (state.replay(events.iter()), events)
    }

    fn calendar() -> Option<BusinessCalendar> {
        Some(office("Asia/Shanghai"))
    }

    #[test]
    fn the_worked_complaint_breaches_its_first_response_and_meets_resolution() {
        // Fri 17:00: first response due Mon 10:00 (warn 09:30), resolution
        // due Tue 15:00.
        let (state, events) = run(SlaTracker::default(), FRI_1700, open_complaint());
        let SlaEvent::PolicyApplied(applied) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(applied.clocks[0].due, Some(at("2026-11-16T02:00:00Z")));
        assert_eq!(applied.clocks[0].warn_at, Some(at("2026-11-16T01:30:00Z")));
        assert_eq!(applied.clocks[1].due, Some(at("2026-11-17T07:00:00Z")));
        // A breach before its due is refused; Mon 09:30 warns, 10:00 breaches.
        given::<SlaTracker>(events.clone())
            .at("2026-11-16T01:59:00Z")
            .when(SlaCommand::Breach {
                metric: SlaMetric::FirstResponse,
                due: at("2026-11-16T02:00:00Z"),
            })
            .then_error(not_applicable());
        let (state, _) = run(
            state,
            "2026-11-16T01:30:00Z",
            SlaCommand::Warn {
                metric: SlaMetric::FirstResponse,
                at: at("2026-11-16T01:30:00Z"),
            },
        );
        let (state, events) = run(
            state,
            "2026-11-16T02:00:00Z",
            SlaCommand::Breach {
                metric: SlaMetric::FirstResponse,
                due: at("2026-11-16T02:00:00Z"),
            },
        );
        assert!(
            matches!(&events[0], SlaEvent::Breached(b) if b.occurred_at == at("2026-11-16T02:00:00Z"))
        );
        // Mon 10:20 the agent answers: met late after 140 business minutes.
        let (state, events) = run(
            state,
            "2026-11-16T02:20:00Z",
            SlaCommand::Meet {
                metric: SlaMetric::FirstResponse,
                calendar: calendar(),
            },
        );
        assert!(matches!(
            &events[0],
            SlaEvent::TargetMet(m) if m.business_minutes == 140 && m.breached
                && m.calendar_minutes == 2 * 24 * 60 + 17 * 60 + 20
        ));
        // A second breach or reply changes nothing: met is final.
        assert_eq!(
            state.decide(
                SlaCommand::Breach {
                    metric: SlaMetric::FirstResponse,
                    due: at("2026-11-16T02:00:00Z"),
                },
                Context::at(at("2026-11-29T00:00:00Z"))
            ),
            Err(not_applicable())
        );
        let (state, again) = run(
            state,
            "2026-11-16T02:30:00Z",
            SlaCommand::Meet {
                metric: SlaMetric::FirstResponse,
                calendar: calendar(),
            },
        );
        assert!(again.is_empty());
        // 11:00 pending: resolution paused after 180 business minutes.
        let (state, events) = run(
            state,
            "2026-11-16T03:00:00Z",
            SlaCommand::Pause {
                metrics: vec![SlaMetric::FirstResponse, SlaMetric::Resolution],
                status: "pending".into(),
                calendar: calendar(),
            },
        );
        assert_eq!(
            events,
            vec![SlaEvent::Paused(SlaClockPaused {
                status: "pending".into(),
                clocks: vec![PausedClock {
                    metric: SlaMetric::Resolution,
                    elapsed_seconds: 180 * 60,
                    elapsed_minutes: 180,
                }],
                occurred_at: at("2026-11-16T03:00:00Z"),
            })]
        );
        // The old due no longer breaches a paused clock.
        assert_eq!(
            state.decide(
                SlaCommand::Breach {
                    metric: SlaMetric::Resolution,
                    due: at("2026-11-17T07:00:00Z"),
                },
                Context {
                    now: at("2026-11-29T00:00:00Z"),
                    occurred_at: Some(at("2026-11-17T07:00:00Z")),
                }
            ),
            Err(not_applicable())
        );
        // Tue 10:00 the customer replies: due Wed 14:00, warning Wed 10:00.
        let (state, events) = run(
            state,
            "2026-11-17T02:00:00Z",
            SlaCommand::Resume {
                metrics: vec![SlaMetric::FirstResponse, SlaMetric::Resolution],
                calendar: calendar(),
            },
        );
        assert_eq!(
            events,
            vec![SlaEvent::Resumed(SlaClockResumed {
                clocks: vec![ResumedClock {
                    metric: SlaMetric::Resolution,
                    due: at("2026-11-18T06:00:00Z"),
                    warn_at: Some(at("2026-11-18T02:00:00Z")),
                }],
                occurred_at: at("2026-11-17T02:00:00Z"),
            })]
        );
        // Wed 11:30 solved: 810 business minutes, on time.
        let (_, events) = run(
            state,
            "2026-11-18T03:30:00Z",
            SlaCommand::Meet {
                metric: SlaMetric::Resolution,
                calendar: calendar(),
            },
        );
        assert!(matches!(
            &events[0],
            SlaEvent::TargetMet(m) if m.business_minutes == 810 && !m.breached
        ));
    }

    #[test]
    fn a_priority_change_keeps_start_and_elapsed_and_breaches_at_once_when_over() {
        let (state, _) = run(SlaTracker::default(), FRI_1700, open_complaint());
        // Mon 10:00: 120 minutes counted; the new first-response target is 60.
        let (state, events) = run(
            state,
            "2026-11-16T02:00:00Z",
            SlaCommand::Apply {
                ticket_id: TICKET,
                rules: SlaRules {
                    policy_version: 2,
                    ..rules(60, 480)
                },
                metrics: vec![SlaMetric::FirstResponse, SlaMetric::Resolution],
                paused: vec![],
                cause: "priority_changed".into(),
            },
        );
        let SlaEvent::PolicyApplied(applied) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(applied.clocks[0].start, at(FRI_1700));
        assert_eq!(applied.clocks[0].elapsed_seconds, 120 * 60);
        // Resolution 480: 360 left from Mon 10:00 → Mon 16:00.
        assert_eq!(applied.clocks[1].due, Some(at("2026-11-16T08:00:00Z")));
        assert_eq!(
            events[1],
            SlaEvent::Breached(SlaAlarm {
                ticket_id: TICKET,
                metric: SlaMetric::FirstResponse,
                due: at("2026-11-16T02:00:00Z"),
                occurred_at: at("2026-11-16T02:00:00Z"),
            })
        );
        assert!(state.clocks[&SlaMetric::FirstResponse].breached);
    }

    #[test]
    fn next_response_starts_with_an_unanswered_message_after_the_first_response() {
        let (state, _) = run(SlaTracker::default(), FRI_1700, open_complaint());
        let customer = || SlaCommand::Apply {
            ticket_id: TICKET,
            rules: rules(120, 960),
            metrics: vec![SlaMetric::NextResponse],
            paused: vec![],
            cause: "customer_message".into(),
        };
        // Before the first response it is covered by the first response.
        let (state, events) = run(state, "2026-11-16T01:00:00Z", customer());
        assert!(events.is_empty());
        let (state, _) = run(
            state,
            "2026-11-16T01:10:00Z",
            SlaCommand::Meet {
                metric: SlaMetric::FirstResponse,
                calendar: calendar(),
            },
        );
        let (state, events) = run(state, "2026-11-16T01:20:00Z", customer());
        assert!(
            matches!(&events[0], SlaEvent::PolicyApplied(a) if a.clocks[0].start == at("2026-11-16T01:20:00Z"))
        );
        // A second message while the first is unanswered keeps the oldest.
        let (state, events) = run(state, "2026-11-16T01:40:00Z", customer());
        assert!(events.is_empty());
        let (state, _) = run(
            state,
            "2026-11-16T02:20:00Z",
            SlaCommand::Meet {
                metric: SlaMetric::NextResponse,
                calendar: calendar(),
            },
        );
        // Answered: the next message starts a new clock.
        let (_, events) = run(state, "2026-11-16T03:00:00Z", customer());
        assert!(
            matches!(&events[0], SlaEvent::PolicyApplied(a) if a.clocks[0].start == at("2026-11-16T03:00:00Z"))
        );
    }

    #[test]
    fn a_reopened_ticket_resumes_resolution_but_never_first_response() {
        let (state, _) = run(SlaTracker::default(), FRI_1700, open_complaint());
        let meet = |metric| SlaCommand::Meet {
            metric,
            calendar: calendar(),
        };
        let (state, _) = run(
            state,
            "2026-11-16T01:10:00Z",
            meet(SlaMetric::FirstResponse),
        );
        let (state, _) = run(state, "2026-11-16T02:00:00Z", meet(SlaMetric::Resolution));
        // 60 + 60 = 120 minutes counted; reopened Tue 09:00.
        let (state, events) = run(
            state,
            "2026-11-17T01:00:00Z",
            SlaCommand::Apply {
                ticket_id: TICKET,
                rules: rules(120, 960),
                metrics: vec![SlaMetric::FirstResponse, SlaMetric::Resolution],
                paused: vec![],
                cause: "reopened".into(),
            },
        );
        let SlaEvent::PolicyApplied(applied) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(applied.clocks.len(), 1);
        assert_eq!(applied.clocks[0].metric, SlaMetric::Resolution);
        assert_eq!(applied.clocks[0].elapsed_seconds, 120 * 60);
        assert_eq!(
            state.clocks[&SlaMetric::Resolution].state,
            ClockState::Running
        );
        assert_eq!(
            state.clocks[&SlaMetric::FirstResponse].state,
            ClockState::Met
        );
    }

    #[test]
    fn a_paused_apply_waits_for_resume_and_warnings_fire_once() {
        let (state, events) = run(
            SlaTracker::default(),
            FRI_1700,
            SlaCommand::Apply {
                ticket_id: TICKET,
                rules: rules(120, 960),
                metrics: vec![SlaMetric::FirstResponse, SlaMetric::Resolution],
                paused: vec![SlaMetric::Resolution],
                cause: "opened".into(),
            },
        );
        let SlaEvent::PolicyApplied(applied) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(applied.clocks[1].state, ClockState::Paused);
        assert_eq!(applied.clocks[1].due, None);
        let warn = SlaCommand::Warn {
            metric: SlaMetric::FirstResponse,
            at: at("2026-11-16T01:30:00Z"),
        };
        let (state, _) = run(state, "2026-11-16T01:30:00Z", warn.clone());
        assert_eq!(
            state.decide(
                warn,
                Context {
                    now: at("2026-11-29T00:00:00Z"),
                    occurred_at: Some(at("2026-11-16T01:30:00Z")),
                }
            ),
            Err(not_applicable())
        );
        // A bad cause is refused naming the field.
        given::<SlaTracker>([])
            .when(SlaCommand::Apply {
                ticket_id: TICKET,
                rules: rules(120, 960),
                metrics: vec![SlaMetric::FirstResponse],
                paused: vec![],
                cause: "Not A Code".into(),
            })
            .then_invalid(&["cause"]);
    }
}
