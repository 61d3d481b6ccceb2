//! Sales targets (DOMAIN.md §2.10): one stream per fiscal year and metric,
//! allocated top-down — company → team → rep, year → quarter → month. A
//! child's period lies within its parent's; allocating more than the parent
//! holds is allowed but reported on the event.
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregate, Context, DomainEvent};
use crate::common::{Money, text_ok};
use crate::error::{DomainError, Violations};

pub const METRICS: &[&str] = &["bookings", "collections", "margin"];

/// A fiscal period: the year, or one of its quarters (1–4), or one of its
/// months (1–12, counted from the fiscal year's start).
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Period {
    pub quarter: Option<u8>,
    pub month: Option<u8>,
}

impl Period {
    pub const YEAR: Self = Self {
        quarter: None,
        month: None,
    };

    fn valid(self) -> bool {
        match (self.quarter, self.month) {
            (None, None) => true,
            (Some(q), None) => (1..=4).contains(&q),
            (None, Some(m)) => (1..=12).contains(&m),
            (Some(q), Some(m)) => {
                (1..=4).contains(&q) && (1..=12).contains(&m) && (m - 1) / 3 + 1 == q
            }
        }
    }

    /// Whether `self` lies within `outer` (and is not the same period).
    pub fn within(self, outer: Self) -> bool {
        let quarter_of = |p: Self| p.quarter.or(p.month.map(|m| (m - 1) / 3 + 1));
        match (outer.quarter, outer.month) {
            (None, None) => self != outer,
            (Some(q), None) => self.month.is_some() && quarter_of(self) == Some(q),
            _ => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocate {
    /// e.g. `company`, `team:emea`, `user:rep1`.
    pub node: String,
    /// The node this one's target comes from; `None` for the root.
    pub parent: Option<String>,
    pub period: Period,
    pub amount: Money,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SalesTargetAllocated {
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub period: Period,
    pub amount: Money,
    /// The parent's children now hold more than the parent (reported, not
    /// refused: targets are often padded on purpose).
    pub over_allocated: bool,
    pub occurred_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TargetEvent {
    Allocated(SalesTargetAllocated),
}

impl DomainEvent for TargetEvent {
    fn event_type(&self) -> &'static str {
        "SalesTargetAllocated"
    }

    fn occurred_at(&self) -> jiff::Timestamp {
        match self {
            Self::Allocated(e) => e.occurred_at,
        }
    }

    fn decode<'de, D: serde::Deserializer<'de>>(
        event_type: &str,
        _: u32,
        payload: D,
    ) -> Result<Option<Self>, D::Error> {
        Ok(match event_type {
            "SalesTargetAllocated" => Some(Self::Allocated(Deserialize::deserialize(payload)?)),
            _ => None,
        })
    }
}

/// One node's target for one period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub node: String,
    pub period: Period,
    pub parent: Option<String>,
    pub amount_minor: i64,
}

/// One fiscal year's targets for one metric.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SalesTargets {
    pub currency: Option<String>,
    pub allocations: Vec<Allocation>,
}

impl SalesTargets {
    fn get(&self, node: &str, period: Period) -> Option<&Allocation> {
        self.allocations
            .iter()
            .find(|a| a.node == node && a.period == period)
    }

    /// In i128: the children's amounts are each an i64, their sum need
    /// not be.
    fn children_total(&self, parent: &str, parent_period: Period) -> i128 {
        self.allocations
            .iter()
            .filter(|a| {
                a.parent.as_deref() == Some(parent)
                    && (a.period == parent_period || a.period.within(parent_period))
            })
            .map(|a| i128::from(a.amount_minor))
            .sum()
    }
}

impl Aggregate for SalesTargets {
    type Command = Allocate;
    type Event = TargetEvent;
    const STREAM_TYPE: &'static str = "sales_target";

    fn exists(&self) -> bool {
        !self.allocations.is_empty()
    }

    fn decide(&self, command: Allocate, context: Context) -> Result<Vec<TargetEvent>, DomainError> {
        let occurred_at = context.occurred_at()?;
        let mut v = Violations::default();
        v.check(
            text_ok(&command.node, 200, false),
            "node",
            "must be 1 to 200 characters",
        );
        // The request's fields: a quarter 1-4, a month 1-12 (within the
        // quarter, when both are given).
        let period = command.period;
        let quarter_ok = period.quarter.is_none_or(|q| (1..=4).contains(&q));
        let month_ok = period.month.is_none_or(|m| (1..=12).contains(&m));
        v.check(quarter_ok, "quarter", "must be 0 (the year) or 1-4");
        v.check(month_ok, "month", "must be 0 or 1-12");
        v.check(
            !(quarter_ok && month_ok) || period.valid(),
            "month",
            "must lie within the quarter",
        );
        v.check(
            command
                .parent
                .as_deref()
                .is_none_or(|parent| text_ok(parent, 200, false)),
            "parent",
            "must be 1 to 200 characters",
        );
        command.amount.validate("amount", &mut v);
        v.check(
            command.amount.amount_minor >= 0,
            "amount.amount_minor",
            "must not be negative",
        );
        if let Some(currency) = &self.currency {
            v.check(
                &command.amount.currency == currency,
                "amount.currency",
                "must be the targets' currency",
            );
        }
        v.check(
            command.parent.as_deref() != Some(command.node.as_str()),
            "parent",
            "must not be the node itself",
        );
        v.into_result()?;
        // The parent must hold a target for this period or one containing it.
        let parent_period = match &command.parent {
            None => None,
            Some(parent) => Some(
                self.allocations
                    .iter()
                    .filter(|a| {
                        &a.node == parent
                            && (a.period == command.period || command.period.within(a.period))
                    })
                    .map(|a| a.period)
                    .max()
                    .ok_or(DomainError::InvalidReference { field: "parent" })?,
            ),
        };
        let current = self.get(&command.node, command.period);
        if current.is_some_and(|a| {
            a.parent == command.parent && a.amount_minor == command.amount.amount_minor
        }) {
            return Ok(vec![]);
        }
        let over_allocated = match (&command.parent, parent_period) {
            (Some(parent), Some(period)) => {
                let parent_amount = self.get(parent, period).map_or(0, |a| a.amount_minor);
                let others = self.children_total(parent, period)
                    - current
                        .filter(|a| a.parent.as_deref() == Some(parent.as_str()))
                        .map_or(0, |a| i128::from(a.amount_minor));
                others + i128::from(command.amount.amount_minor) > i128::from(parent_amount)
            }
            _ => false,
        };
        Ok(vec![TargetEvent::Allocated(SalesTargetAllocated {
            node: command.node,
            parent: command.parent,
            period: command.period,
            amount: command.amount,
            over_allocated,
            occurred_at,
        })])
    }

    fn evolve(mut self, event: &TargetEvent) -> Self {
        let TargetEvent::Allocated(allocated) = event;
        self.currency = Some(allocated.amount.currency.clone());
        self.allocations
            .retain(|a| !(a.node == allocated.node && a.period == allocated.period));
        self.allocations.push(Allocation {
            node: allocated.node.clone(),
            period: allocated.period,
            parent: allocated.parent.clone(),
            amount_minor: allocated.amount.amount_minor,
        });
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{given, now};

    fn eur(amount_minor: i64) -> Money {
        Money {
            amount_minor,
            currency: "EUR".into(),
        }
    }

    fn allocate(node: &str, parent: Option<&str>, period: Period, amount: i64) -> Allocate {
        Allocate {
            node: node.into(),
            parent: parent.map(str::to_owned),
            period,
            amount: eur(amount),
        }
    }

    fn state(commands: Vec<Allocate>) -> SalesTargets {
        commands
            .into_iter()
            .fold(SalesTargets::default(), |state, command| {
                let events = state.decide(command, crate::Context::at(now())).unwrap();
                state.replay(events.iter())
            })
    }

    const Q1: Period = Period {
        quarter: Some(1),
        month: None,
    };

    #[test]
    fn targets_flow_down_and_over_allocation_is_reported() {
        let base = state(vec![
            allocate("company", None, Period::YEAR, 4_000_000),
            allocate("team:emea", Some("company"), Period::YEAR, 2_500_000),
        ]);
        let over = base
            .decide(
                allocate("team:apac", Some("company"), Period::YEAR, 2_000_000),
                crate::Context::at(now()),
            )
            .unwrap();
        assert!(matches!(&over[0], TargetEvent::Allocated(a) if a.over_allocated));
        let fits = base
            .decide(
                allocate("team:apac", Some("company"), Period::YEAR, 1_500_000),
                crate::Context::at(now()),
            )
            .unwrap();
        assert!(matches!(&fits[0], TargetEvent::Allocated(a) if !a.over_allocated));
        // Quarters of a rep come from the team's year.
        let rep = base
            .decide(
                allocate("user:rep1", Some("team:emea"), Q1, 600_000),
                crate::Context::at(now()),
            )
            .unwrap();
        assert!(matches!(&rep[0], TargetEvent::Allocated(a) if !a.over_allocated));
    }

    #[test]
    fn the_largest_children_are_over_allocated_not_wrapped() {
        given::<SalesTargets>([])
            .when(allocate("company", None, Period::YEAR, i64::MAX))
            .then_invalid(&["amount.amount_minor"]);
        let base = state(vec![
            allocate("company", None, Period::YEAR, 100),
            allocate(
                "team:a",
                Some("company"),
                Period::YEAR,
                crate::common::MAX_AMOUNT_MINOR,
            ),
        ]);
        let over = base
            .decide(
                allocate("team:b", Some("company"), Period::YEAR, 1),
                crate::Context::at(now()),
            )
            .unwrap();
        assert!(matches!(&over[0], TargetEvent::Allocated(a) if a.over_allocated));
    }

    #[test]
    fn parents_must_hold_a_containing_period() {
        let base = state(vec![allocate("company", None, Q1, 1_000_000)]);
        given::<SalesTargets>([])
            .when(allocate("team:emea", Some("company"), Period::YEAR, 1))
            .then_error(DomainError::InvalidReference { field: "parent" });
        // A year target cannot come from a quarter.
        assert_eq!(
            base.decide(
                allocate("team:emea", Some("company"), Period::YEAR, 1),
                crate::Context::at(now())
            ),
            Err(DomainError::InvalidReference { field: "parent" })
        );
        let march = Period {
            quarter: None,
            month: Some(3),
        };
        assert!(
            base.decide(
                allocate("team:emea", Some("company"), march, 1),
                crate::Context::at(now())
            )
            .is_ok()
        );
        let bad = Period {
            quarter: Some(2),
            month: Some(1),
        };
        given::<SalesTargets>([])
            .when(allocate("company", None, bad, -1))
            .then_invalid(&["month", "amount.amount_minor"]);
    }
}
