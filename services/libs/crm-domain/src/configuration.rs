//! Versioned configuration (DOMAIN.md §2.10): business calendars, SLA
//! policies, commission plans and sales targets. Each is a stream of
//! `...Published` events carrying the full content and a version number, so
//! history is read under the rules then in force. Publishing the same
//! content again changes nothing; every publish checks its invariants.
use std::collections::{BTreeMap, BTreeSet};
use std::marker::PhantomData;

use jiff::Timestamp;
use jiff::civil::{Date, Time};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregate, Context, DomainEvent};
use crate::common::{Money, is_iana_zone, text_ok};
use crate::error::{DomainError, Violations};

/// One kind of configuration content.
pub trait ConfigContent:
    Clone + std::fmt::Debug + PartialEq + Eq + Serialize + DeserializeOwned
{
    const STREAM_TYPE: &'static str;
    const EVENT_TYPE: &'static str;
    /// Every invariant of the content, each broken one named.
    fn validate(&self, v: &mut Violations);
}

/// A published version.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(deserialize = "C: DeserializeOwned"))]
pub struct Published<C> {
    pub version: u32,
    pub content: C,
    pub occurred_at: Timestamp,
}

impl<C: ConfigContent> DomainEvent for Published<C> {
    fn event_type(&self) -> &'static str {
        C::EVENT_TYPE
    }

    fn occurred_at(&self) -> jiff::Timestamp {
        self.occurred_at
    }

    fn decode<'de, D: serde::Deserializer<'de>>(
        event_type: &str,
        _: u32,
        payload: D,
    ) -> Result<Option<Self>, D::Error> {
        if event_type == C::EVENT_TYPE {
            Ok(Some(Deserialize::deserialize(payload)?))
        } else {
            Ok(None)
        }
    }
}

/// Publishes a new version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish<C>(pub C);

/// The current and every earlier version of one configuration record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(deserialize = "C: DeserializeOwned"))]
pub struct Config<C> {
    pub versions: Vec<C>,
    #[serde(skip)]
    kind: PhantomData<C>,
}

impl<C> Default for Config<C> {
    fn default() -> Self {
        Self {
            versions: Vec::new(),
            kind: PhantomData,
        }
    }
}

impl<C: ConfigContent> Config<C> {
    pub fn current(&self) -> Option<&C> {
        self.versions.last()
    }

    /// Version `n` (1-based).
    pub fn version(&self, n: u32) -> Option<&C> {
        self.versions.get((n as usize).checked_sub(1)?)
    }
}

impl<C: ConfigContent> Aggregate for Config<C> {
    type Command = Publish<C>;
    type Event = Published<C>;
    const STREAM_TYPE: &'static str = C::STREAM_TYPE;

    fn exists(&self) -> bool {
        !self.versions.is_empty()
    }

    fn decide(
        &self,
        Publish(content): Publish<C>,
        context: Context,
    ) -> Result<Vec<Published<C>>, DomainError> {
        let occurred_at = context.occurred_at()?;
        let mut v = Violations::default();
        content.validate(&mut v);
        v.into_result()?;
        if self.current() == Some(&content) {
            return Ok(vec![]);
        }
        Ok(vec![Published {
            version: self.versions.len() as u32 + 1,
            content,
            occurred_at,
        }])
    }

    fn evolve(mut self, event: &Published<C>) -> Self {
        self.versions.push(event.content.clone());
        self
    }
}

// ---------------------------------------------------------------- calendar

/// Working hours of one weekday, `[start, end)` in the calendar's zone.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingHours {
    /// 1 = Monday … 7 = Sunday.
    pub weekday: u8,
    pub start: Time,
    pub end: Time,
}

/// A date that works differently: a holiday (no hours) or a make-up workday.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DateOverride {
    pub date: Date,
    /// Empty: closed all day (a holiday).
    #[serde(default)]
    pub hours: Vec<(Time, Time)>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusinessCalendar {
    pub name: String,
    /// IANA zone, e.g. `Asia/Shanghai`.
    pub time_zone: String,
    pub weekly: Vec<WorkingHours>,
    #[serde(default)]
    pub overrides: Vec<DateOverride>,
}

impl ConfigContent for BusinessCalendar {
    const STREAM_TYPE: &'static str = "business_calendar";
    const EVENT_TYPE: &'static str = "BusinessCalendarPublished";

    fn validate(&self, v: &mut Violations) {
        v.check(
            text_ok(&self.name, 100, false),
            "name",
            "must be 1 to 100 characters",
        );
        v.check(
            is_iana_zone(&self.time_zone),
            "time_zone",
            "must be an IANA time zone",
        );
        v.check(
            !self.weekly.is_empty(),
            "weekly",
            "needs at least one working interval",
        );
        v.check(
            self.weekly.len() <= MAX_WEEKLY_INTERVALS,
            "weekly",
            "must have at most 70 intervals",
        );
        v.check(
            self.overrides.len() <= MAX_OVERRIDES,
            "overrides",
            "must have at most 1000 dates",
        );
        if self.weekly.len() > MAX_WEEKLY_INTERVALS || self.overrides.len() > MAX_OVERRIDES {
            return; // no per-item checks of an oversized list
        }
        for (i, hours) in self.weekly.iter().enumerate() {
            v.check(
                (1..=7).contains(&hours.weekday),
                format!("weekly[{i}].weekday"),
                "must be 1 (Monday) to 7 (Sunday)",
            );
            v.check(
                hours.start < hours.end,
                format!("weekly[{i}].end"),
                "must be after start",
            );
            let overlaps = self.weekly[..i].iter().any(|other| {
                other.weekday == hours.weekday && other.start < hours.end && hours.start < other.end
            });
            v.check(
                !overlaps,
                format!("weekly[{i}]"),
                "overlaps another interval of the same day",
            );
        }
        let mut dates = BTreeSet::new();
        for (i, day) in self.overrides.iter().enumerate() {
            v.check(
                dates.insert(day.date),
                format!("overrides[{i}].date"),
                "appears twice",
            );
            v.check(
                day.hours.iter().all(|(start, end)| start < end),
                format!("overrides[{i}].hours"),
                "each interval must end after it starts",
            );
            v.check(
                day.hours.len() <= 10,
                format!("overrides[{i}].hours"),
                "must have at most 10 intervals",
            );
            v.check(
                text_ok(&day.name, 100, true),
                format!("overrides[{i}].name"),
                "must be at most 100 characters",
            );
        }
    }
}

/// Working intervals a calendar's week may hold (ten a day).
pub const MAX_WEEKLY_INTERVALS: usize = 70;
/// Dated exceptions one calendar may hold (years of holidays).
pub const MAX_OVERRIDES: usize = 1000;
/// Skills a queue needs or an agent has.
pub const MAX_SKILLS: usize = 50;

// --------------------------------------------------------------- SLA policy

/// Targets in business minutes for one priority.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlaTargets {
    /// `low`, `normal`, `high` or `urgent`.
    pub priority: String,
    pub first_response_minutes: u32,
    pub next_response_minutes: u32,
    pub resolution_minutes: u32,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlaPolicy {
    pub name: String,
    /// Lower applies first among matching policies.
    pub order: u32,
    /// Ticket types the policy applies to; empty: all.
    #[serde(default)]
    pub ticket_types: Vec<String>,
    pub targets: Vec<SlaTargets>,
    /// The business calendar (a stream id); `None`: 24×7.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calendar_id: Option<uuid::Uuid>,
    /// Statuses that pause the clocks (default: pending).
    pub pause_statuses: Vec<String>,
    /// Percent of a target at which a warning fires (1–99).
    pub warning_percent: u8,
}

const PRIORITIES: &[&str] = &["low", "normal", "high", "urgent"];
const TICKET_TYPES: &[&str] = &["question", "incident", "request", "complaint"];

impl ConfigContent for SlaPolicy {
    const STREAM_TYPE: &'static str = "sla_policy";
    const EVENT_TYPE: &'static str = "SlaPolicyPublished";

    fn validate(&self, v: &mut Violations) {
        v.check(
            text_ok(&self.name, 100, false),
            "name",
            "must be 1 to 100 characters",
        );
        let mut types = BTreeSet::new();
        for (i, t) in self
            .ticket_types
            .iter()
            .enumerate()
            .take(TICKET_TYPES.len() + 1)
        {
            v.check(
                TICKET_TYPES.contains(&t.as_str()),
                format!("ticket_types[{i}]"),
                "must be a ticket type",
            );
            v.check(
                types.insert(t.as_str()),
                format!("ticket_types[{i}]"),
                "appears twice",
            );
        }
        let mut seen = BTreeSet::new();
        for (i, target) in self.targets.iter().enumerate() {
            v.check(
                PRIORITIES.contains(&target.priority.as_str()),
                format!("targets[{i}].priority"),
                "must be low, normal, high or urgent",
            );
            v.check(
                seen.insert(target.priority.as_str()),
                format!("targets[{i}].priority"),
                "appears twice",
            );
            v.check(
                target.first_response_minutes > 0
                    && target.next_response_minutes > 0
                    && target.resolution_minutes > 0,
                format!("targets[{i}]"),
                "every target must be positive",
            );
            v.check(
                target.first_response_minutes <= target.resolution_minutes,
                format!("targets[{i}].resolution_minutes"),
                "must not be shorter than the first response",
            );
        }
        v.check(
            seen.len() == PRIORITIES.len(),
            "targets",
            "needs targets for low, normal, high and urgent",
        );
        let mut statuses = BTreeSet::new();
        for (i, status) in self.pause_statuses.iter().enumerate().take(3) {
            v.check(
                ["pending", "on_hold"].contains(&status.as_str()),
                format!("pause_statuses[{i}]"),
                "must be pending or on_hold",
            );
            v.check(
                statuses.insert(status.as_str()),
                format!("pause_statuses[{i}]"),
                "appears twice",
            );
        }
        v.check(
            (1..=99).contains(&self.warning_percent),
            "warning_percent",
            "must be 1 to 99",
        );
    }
}

// ---------------------------------------------------------- commission plan

/// One band of a tiered plan: from `from_bp` (inclusive) to the next band's
/// start, paid at `rate_bp` (basis points).
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommissionTier {
    /// Attainment in basis points (10000 = 100 %) or amount in minor units,
    /// per the plan's basis.
    pub from: i64,
    pub rate_bp: u32,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommissionPlan {
    pub name: String,
    pub effective_from: Date,
    /// `bookings`, `collections` or `margin`.
    pub metric: String,
    /// `attainment` or `amount`.
    pub tier_basis: String,
    /// `marginal` (each band at its rate, the default) or `whole_amount`.
    pub tier_mode: String,
    /// Contiguous from 0, increasing.
    pub tiers: Vec<CommissionTier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<Money>,
    pub clawback_days: u32,
    /// Days after a period ends until it is paid and frozen (DOMAIN.md
    /// §5.1): a credit recorded later than that no longer changes the
    /// period's statement but posts to the period in which it is recorded.
    /// `None`: periods never freeze.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payout_grace_days: Option<u32>,
    /// Reps on the plan (user ids).
    pub reps: Vec<String>,
}

impl ConfigContent for CommissionPlan {
    const STREAM_TYPE: &'static str = "commission_plan";
    const EVENT_TYPE: &'static str = "CommissionPlanPublished";

    fn validate(&self, v: &mut Violations) {
        v.check(
            text_ok(&self.name, 100, false),
            "name",
            "must be 1 to 100 characters",
        );
        v.check(
            ["bookings", "collections", "margin"].contains(&self.metric.as_str()),
            "metric",
            "must be bookings, collections or margin",
        );
        v.check(
            ["attainment", "amount"].contains(&self.tier_basis.as_str()),
            "tier_basis",
            "must be attainment or amount",
        );
        v.check(
            ["marginal", "whole_amount"].contains(&self.tier_mode.as_str()),
            "tier_mode",
            "must be marginal or whole_amount",
        );
        v.check(!self.tiers.is_empty(), "tiers", "needs at least one tier");
        v.check(
            self.tiers.len() <= 50,
            "tiers",
            "must have at most 50 tiers",
        );
        v.check(
            self.reps.len() <= 1000,
            "reps",
            "must have at most 1000 reps",
        );
        v.check(
            self.tiers.first().is_none_or(|t| t.from == 0),
            "tiers[0].from",
            "the first tier starts at 0",
        );
        for (i, pair) in self.tiers.windows(2).enumerate() {
            v.check(
                pair[1].from > pair[0].from,
                format!("tiers[{}].from", i + 1),
                "must be above the previous tier's start",
            );
        }
        for (i, tier) in self.tiers.iter().enumerate() {
            v.check(
                tier.rate_bp <= 10_000,
                format!("tiers[{i}].rate_bp"),
                "must be 0 to 10000",
            );
        }
        if let Some(cap) = &self.cap {
            cap.validate("cap", v);
            v.check(cap.amount_minor > 0, "cap.amount_minor", "must be positive");
        }
        v.check(
            self.clawback_days <= 730,
            "clawback_days",
            "must be at most 730",
        );
        v.check(
            self.payout_grace_days.is_none_or(|days| days <= 365),
            "payout_grace_days",
            "must be at most 365",
        );
        v.check(
            self.reps.iter().all(|r| text_ok(r, 200, false)),
            "reps",
            "each rep must be 1 to 200 characters",
        );
    }
}

// ------------------------------------------------------ queue, team, agent

/// A service queue: who may take its tickets and how they are routed.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queue {
    pub name: String,
    /// Agent user ids.
    pub members: Vec<String>,
    /// Skills an agent needs to be routed tickets of this queue.
    #[serde(default)]
    pub skills: Vec<String>,
    /// `round_robin` or `least_loaded`.
    pub routing: String,
    /// Where tickets go when no agent is eligible for too long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overflow_queue_id: Option<uuid::Uuid>,
    /// How long a ticket waits with no eligible agent before it overflows
    /// ([`DEFAULT_OVERFLOW_AFTER_MINUTES`] when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overflow_after_minutes: Option<u32>,
}

/// How long a ticket waits for an eligible agent before it moves to its
/// queue's overflow queue, unless the queue says otherwise.
pub const DEFAULT_OVERFLOW_AFTER_MINUTES: u32 = 30;

impl Queue {
    /// Where and after how many minutes of waiting a ticket overflows.
    pub fn overflow(&self) -> Option<(uuid::Uuid, u32)> {
        self.overflow_queue_id.map(|queue| {
            (
                queue,
                self.overflow_after_minutes
                    .unwrap_or(DEFAULT_OVERFLOW_AFTER_MINUTES),
            )
        })
    }
}

impl ConfigContent for Queue {
    const STREAM_TYPE: &'static str = "queue";
    const EVENT_TYPE: &'static str = "QueuePublished";

    fn validate(&self, v: &mut Violations) {
        v.check(
            text_ok(&self.name, 100, false),
            "name",
            "must be 1 to 100 characters",
        );
        v.check(
            self.members.len() <= 500,
            "members",
            "must have at most 500 agents",
        );
        let mut seen = BTreeSet::new();
        for (i, member) in self.members.iter().enumerate() {
            v.check(
                text_ok(member, 200, false),
                format!("members[{i}]"),
                "must be 1 to 200 characters",
            );
            v.check(
                seen.insert(member.as_str()),
                format!("members[{i}]"),
                "appears twice",
            );
        }
        v.check(
            self.skills.len() <= MAX_SKILLS,
            "skills",
            "must have at most 50 skills",
        );
        for (i, skill) in self.skills.iter().enumerate().take(MAX_SKILLS + 1) {
            v.check(
                crate::common::is_code(skill, 64),
                format!("skills[{i}]"),
                "must be a code of [a-z0-9_]",
            );
        }
        v.check(
            self.overflow_after_minutes
                .is_none_or(|minutes| (1..=10_080).contains(&minutes)),
            "overflow_after_minutes",
            "must be 1 to 10080 (a week)",
        );
        v.check(
            self.overflow_after_minutes.is_none() || self.overflow_queue_id.is_some(),
            "overflow_after_minutes",
            "needs an overflow_queue_id",
        );
        v.check(
            ["round_robin", "least_loaded"].contains(&self.routing.as_str()),
            "routing",
            "must be round_robin or least_loaded",
        );
    }
}

/// An agent's availability for routing.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentAvailability {
    pub agent: String,
    /// `online`, `away` or `offline`.
    pub status: String,
    /// Open tickets the agent may hold at once.
    pub capacity: u32,
    #[serde(default)]
    pub skills: Vec<String>,
}

impl ConfigContent for AgentAvailability {
    const STREAM_TYPE: &'static str = "agent";
    const EVENT_TYPE: &'static str = "AgentAvailabilityChanged";

    fn validate(&self, v: &mut Violations) {
        v.check(
            text_ok(&self.agent, 200, false),
            "agent",
            "must be 1 to 200 characters",
        );
        v.check(
            ["online", "away", "offline"].contains(&self.status.as_str()),
            "status",
            "must be online, away or offline",
        );
        v.check(self.capacity <= 1000, "capacity", "must be at most 1000");
        v.check(
            self.skills.len() <= MAX_SKILLS,
            "skills",
            "must have at most 50 skills",
        );
        for (i, skill) in self.skills.iter().enumerate().take(MAX_SKILLS + 1) {
            v.check(
                crate::common::is_code(skill, 64),
                format!("skills[{i}]"),
                "must be a code of [a-z0-9_]",
            );
        }
    }
}

pub type QueueConfig = Config<Queue>;
pub type AgentConfig = Config<AgentAvailability>;

// ------------------------------------------------------- tenant and teams

/// How a kind of unique value is kept unique within a tenant.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UniquenessMode {
    /// A second record with the value is refused (`AlreadyExists`, naming
    /// the holder), checked in the append's transaction.
    Hard,
    /// Allowed; duplicates are only detected (data quality).
    Soft,
}

/// Kinds of unique values records produce.
pub const UNIQUE_KINDS: [&str; 4] = ["email", "tax_id", "phone", "domain"];

/// DOMAIN.md defaults: email and tax id hard; phone and domain soft.
pub fn default_uniqueness_mode(kind: &str) -> UniquenessMode {
    match kind {
        "phone" | "domain" => UniquenessMode::Soft,
        _ => UniquenessMode::Hard,
    }
}

/// Tenant-wide settings.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantSettings {
    /// IANA zone reports bucket by.
    pub time_zone: String,
    /// First month of the fiscal year (1–12).
    pub fiscal_year_start_month: u8,
    /// ISO 4217 currency reports are in.
    pub reporting_currency: String,
    /// Leads may convert from `working` as well as `qualified`.
    #[serde(default)]
    pub convert_from_working: bool,
    /// Duplicate score at which a pair is suspected (0–100).
    pub duplicate_threshold: u8,
    /// Days without a touch before records count as stale, per kind.
    pub stale_days_lead: u32,
    pub stale_days_deal: u32,
    pub stale_days_customer: u32,
    /// Per kind of unique value (`email`, `tax_id`, `phone`, `domain`), the
    /// mode when not the default. Switching a kind to hard applies to values
    /// written from then on; earlier duplicates stay for data quality.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub uniqueness: BTreeMap<String, UniquenessMode>,
    /// Opt-in: a customer with no paid order for this many days is churned
    /// (`inactive`) by the scheduler (DOMAIN.md §4). `None`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactivity_churn_days: Option<u32>,
}

impl TenantSettings {
    /// The mode of a kind of unique value for this tenant.
    pub fn uniqueness_mode(&self, kind: &str) -> UniquenessMode {
        self.uniqueness
            .get(kind)
            .copied()
            .unwrap_or_else(|| default_uniqueness_mode(kind))
    }
}

impl ConfigContent for TenantSettings {
    const STREAM_TYPE: &'static str = "tenant_settings";
    const EVENT_TYPE: &'static str = "TenantSettingsPublished";

    fn validate(&self, v: &mut Violations) {
        v.check(
            is_iana_zone(&self.time_zone),
            "time_zone",
            "must be an IANA time zone",
        );
        v.check(
            (1..=12).contains(&self.fiscal_year_start_month),
            "fiscal_year_start_month",
            "must be 1 to 12",
        );
        v.check(
            self.reporting_currency.len() == 3
                && self
                    .reporting_currency
                    .bytes()
                    .all(|b| b.is_ascii_uppercase()),
            "reporting_currency",
            "must be an ISO 4217 code such as EUR",
        );
        v.check(
            self.duplicate_threshold <= 100,
            "duplicate_threshold",
            "must be 0 to 100",
        );
        for (field, days) in [
            ("stale_days_lead", self.stale_days_lead),
            ("stale_days_deal", self.stale_days_deal),
            ("stale_days_customer", self.stale_days_customer),
        ] {
            v.check((1..=3650).contains(&days), field, "must be 1 to 3650 days");
        }
        v.check(
            self.inactivity_churn_days
                .is_none_or(|days| (30..=3650).contains(&days)),
            "inactivity_churn_days",
            "must be 30 to 3650 days",
        );
        for kind in self.uniqueness.keys() {
            v.check(
                UNIQUE_KINDS.contains(&kind.as_str()),
                format!("uniqueness.{kind}"),
                "must be email, tax_id, phone or domain",
            );
        }
    }
}

/// A sales or service team; teams nest (no cycles).
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Team {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<uuid::Uuid>,
    pub manager: String,
    #[serde(default)]
    pub members: Vec<String>,
}

impl ConfigContent for Team {
    const STREAM_TYPE: &'static str = "team";
    const EVENT_TYPE: &'static str = "TeamPublished";

    fn validate(&self, v: &mut Violations) {
        v.check(
            text_ok(&self.name, 100, false),
            "name",
            "must be 1 to 100 characters",
        );
        v.check(
            text_ok(&self.manager, 200, false),
            "manager",
            "must be 1 to 200 characters",
        );
        v.check(
            self.members.len() <= 1000,
            "members",
            "must have at most 1000 members",
        );
        let mut seen = BTreeSet::new();
        for (i, member) in self.members.iter().enumerate().take(1001) {
            v.check(
                text_ok(member, 200, false),
                format!("members[{i}]"),
                "must be 1 to 200 characters",
            );
            v.check(
                seen.insert(member.as_str()),
                format!("members[{i}]"),
                "appears twice",
            );
        }
    }
}

pub type TenantSettingsConfig = Config<TenantSettings>;
pub type TeamConfig = Config<Team>;

pub type BusinessCalendarConfig = Config<BusinessCalendar>;
pub type SlaPolicyConfig = Config<SlaPolicy>;
pub type CommissionPlanConfig = Config<CommissionPlan>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{given, now};

    fn plan(mode: &str) -> CommissionPlan {
        CommissionPlan {
            name: "AE 2026".into(),
            effective_from: Date::constant(2026, 1, 1),
            metric: "bookings".into(),
            tier_basis: "attainment".into(),
            tier_mode: mode.into(),
            tiers: vec![
                CommissionTier {
                    from: 0,
                    rate_bp: 300,
                },
                CommissionTier {
                    from: 10_000,
                    rate_bp: 500,
                },
                CommissionTier {
                    from: 15_000,
                    rate_bp: 800,
                },
            ],
            cap: None,
            clawback_days: 90,
            payout_grace_days: None,
            reps: vec!["user:rep".into()],
        }
    }

    /// DOMAIN.md §5.1: target 1,000,000, credited 1,300,000.
    #[test]
    fn tiered_commission_matches_the_worked_figures() {
        let marginal = plan("marginal");
        assert_eq!(
            crate::commission::payout(&marginal, 1_000_000, 1_300_000),
            45_000
        );
        let whole = plan("whole_amount");
        assert_eq!(
            crate::commission::payout(&whole, 1_000_000, 1_300_000),
            65_000
        );
        // The cliff of whole-amount plans.
        assert_eq!(
            crate::commission::payout(&whole, 1_000_000, 999_000),
            29_970
        );
        assert_eq!(
            crate::commission::payout(&whole, 1_000_000, 1_000_000),
            50_000
        );
        // Worked example A: 900,000 then 1,200,000 credited → 27,000 then 40,000.
        assert_eq!(
            crate::commission::payout(&marginal, 1_000_000, 900_000),
            27_000
        );
        assert_eq!(
            crate::commission::payout(&marginal, 1_000_000, 1_200_000),
            40_000
        );
        let capped = CommissionPlan {
            cap: Some(Money {
                amount_minor: 30_000,
                currency: "EUR".into(),
            }),
            ..plan("marginal")
        };
        assert_eq!(
            crate::commission::payout(&capped, 1_000_000, 1_300_000),
            30_000
        );
    }

    #[test]
    fn plans_need_contiguous_increasing_tiers_from_zero() {
        let mut bad = plan("marginal");
        bad.tiers = vec![
            CommissionTier {
                from: 100,
                rate_bp: 300,
            },
            CommissionTier {
                from: 50,
                rate_bp: 20_000,
            },
        ];
        bad.tier_mode = "progressive".into();
        given::<CommissionPlanConfig>([])
            .when(Publish(bad))
            .then_invalid(&[
                "tier_mode",
                "tiers[0].from",
                "tiers[1].from",
                "tiers[1].rate_bp",
            ]);
        let published = given::<CommissionPlanConfig>([])
            .when(Publish(plan("marginal")))
            .then(vec![Published {
                version: 1,
                content: plan("marginal"),
                occurred_at: now(),
            }]);
        assert_eq!(published.current(), Some(&plan("marginal")));
        given::<CommissionPlanConfig>([Published {
            version: 1,
            content: plan("marginal"),
            occurred_at: now(),
        }])
        .when(Publish(plan("marginal")))
        .then(vec![]);
    }

    fn calendar() -> BusinessCalendar {
        let nine = Time::constant(9, 0, 0, 0);
        let six = Time::constant(18, 0, 0, 0);
        BusinessCalendar {
            name: "Shanghai office".into(),
            time_zone: "Asia/Shanghai".into(),
            weekly: (1..=5)
                .map(|weekday| WorkingHours {
                    weekday,
                    start: nine,
                    end: six,
                })
                .collect(),
            overrides: vec![DateOverride {
                date: Date::constant(2026, 10, 1),
                hours: vec![],
                name: "National Day".into(),
            }],
        }
    }

    #[test]
    fn tenant_settings_and_teams_check_their_invariants() {
        let settings = TenantSettings {
            time_zone: "Asia/Shanghai".into(),
            fiscal_year_start_month: 4,
            reporting_currency: "CNY".into(),
            convert_from_working: false,
            duplicate_threshold: 80,
            stale_days_lead: 30,
            stale_days_deal: 14,
            stale_days_customer: 90,
            uniqueness: BTreeMap::from([("phone".to_owned(), UniquenessMode::Hard)]),
            inactivity_churn_days: Some(365),
        };
        assert_eq!(settings.uniqueness_mode("phone"), UniquenessMode::Hard);
        assert_eq!(settings.uniqueness_mode("email"), UniquenessMode::Hard);
        assert_eq!(settings.uniqueness_mode("domain"), UniquenessMode::Soft);
        given::<TenantSettingsConfig>([])
            .when(Publish(settings.clone()))
            .result
            .unwrap();
        let bad = TenantSettings {
            fiscal_year_start_month: 13,
            reporting_currency: "yuan".into(),
            stale_days_deal: 0,
            uniqueness: BTreeMap::from([("shoe_size".to_owned(), UniquenessMode::Soft)]),
            inactivity_churn_days: Some(7),
            ..settings
        };
        given::<TenantSettingsConfig>([])
            .when(Publish(bad))
            .then_invalid(&[
                "fiscal_year_start_month",
                "reporting_currency",
                "stale_days_deal",
                "inactivity_churn_days",
                "uniqueness.shoe_size",
            ]);
        let team = Team {
            name: "EMEA".into(),
            parent_id: None,
            manager: "user:mgr".into(),
            members: vec!["user:a".into(), "user:a".into(), String::new()],
        };
        given::<TeamConfig>([])
            .when(Publish(team))
            .then_invalid(&["members[1]", "members[2]"]);
    }

    #[test]
    fn calendars_and_sla_policies_check_their_invariants() {
        given::<BusinessCalendarConfig>([])
            .when(Publish(calendar()))
            .result
            .unwrap();
        let mut bad = calendar();
        bad.time_zone = "Mars/Olympus".into();
        bad.weekly.push(WorkingHours {
            weekday: 1,
            start: Time::constant(17, 0, 0, 0),
            end: Time::constant(20, 0, 0, 0),
        });
        bad.weekly.push(WorkingHours {
            weekday: 8,
            start: Time::constant(10, 0, 0, 0),
            end: Time::constant(9, 0, 0, 0),
        });
        given::<BusinessCalendarConfig>([])
            .when(Publish(bad))
            .then_invalid(&[
                "time_zone",
                "weekly[5]",
                "weekly[6].weekday",
                "weekly[6].end",
            ]);
        // Lists are bounded (the overlap check compares every pair), and an
        // override's name and hours too.
        let mut big = calendar();
        big.weekly = vec![big.weekly[0].clone(); MAX_WEEKLY_INTERVALS + 1];
        given::<BusinessCalendarConfig>([])
            .when(Publish(big))
            .then_invalid(&["weekly"]);
        let mut named = calendar();
        named.overrides[0].name = "x".repeat(101);
        named.overrides[0].hours =
            vec![(Time::constant(9, 0, 0, 0), Time::constant(10, 0, 0, 0)); 11];
        given::<BusinessCalendarConfig>([])
            .when(Publish(named))
            .then_invalid(&["overrides[0].hours", "overrides[0].name"]);

        let targets = |priority: &str, first: u32| SlaTargets {
            priority: priority.into(),
            first_response_minutes: first,
            next_response_minutes: 240,
            resolution_minutes: 960,
        };
        let policy = SlaPolicy {
            name: "Complaints".into(),
            order: 1,
            ticket_types: vec!["complaint".into()],
            targets: vec![
                targets("low", 480),
                targets("normal", 240),
                targets("high", 120),
                targets("urgent", 60),
            ],
            calendar_id: None,
            pause_statuses: vec!["pending".into()],
            warning_percent: 75,
        };
        given::<SlaPolicyConfig>([])
            .when(Publish(policy.clone()))
            .result
            .unwrap();
        let mut twice = policy.clone();
        twice.ticket_types.push("complaint".into());
        twice.pause_statuses.push("pending".into());
        given::<SlaPolicyConfig>([])
            .when(Publish(twice))
            .then_invalid(&["ticket_types[1]", "pause_statuses[1]"]);
        let mut bad = policy;
        bad.targets.pop();
        bad.targets[0].resolution_minutes = 10;
        bad.warning_percent = 100;
        given::<SlaPolicyConfig>([])
            .when(Publish(bad))
            .then_invalid(&[
                "targets[0].resolution_minutes",
                "targets",
                "warning_percent",
            ]);
    }
}
