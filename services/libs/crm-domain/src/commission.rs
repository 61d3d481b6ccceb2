//! Tiered sales commission (DOMAIN.md §5.1): what a [`CommissionPlan`] pays
//! for a period's credited total, and the statement that explains how the
//! total was reached, one line per credited change.
//!
//! Pure arithmetic on minor units and basis points, exact in `i128`:
//!
//! - **Rounding.** The period payout is computed exactly and rounded down
//!   once, on the period total; it is never rounded per band or per line. A
//!   statement line is the difference of two rounded totals, so the lines sum
//!   exactly to the period payout.
//! - **Band edges.** With `tier_basis = "attainment"` a tier starting at
//!   `from` basis points starts at the credited amount `target × from ÷ 10000`;
//!   edges are compared exactly (as `credited × 10000` against
//!   `target × from`), never truncated. With `"amount"`, `from` is already an
//!   amount in minor units. A total exactly on an edge has reached that band.
//! - **Nothing credited.** A zero or negative credited total pays 0.
//! - **No target.** With the attainment basis, a target of 0 (or below) puts
//!   every edge at 0: any credit is at infinite attainment, so the whole
//!   credited amount lies in the last tier, at its rate, in either mode.
//! - **Cap.** The cap applies last, to the rounded payout; it is read in the
//!   plan's own currency (a cap below 0 counts as 0).
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::configuration::CommissionPlan;

/// Basis points in a whole: 10000 bp = 100 %.
const WHOLE_BP: i128 = 10_000;

/// A change to the credited total of one rep's period: a won deal (+amount),
/// a reversal such as a reopen, refund or cancel (−amount).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    /// The cited event's global position; breaks ties in `occurred_at`.
    pub position: u64,
    pub occurred_at: Timestamp,
    /// Minor units; negative for a reversal.
    pub delta_minor: i64,
}

/// One credited change and the change of the period payout it caused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementLine {
    /// The cited event's global position.
    pub position: u64,
    pub occurred_at: Timestamp,
    /// The credit's change, minor units.
    pub credit_delta: i64,
    /// The period's credited total after this credit, minor units.
    pub credited_total: i64,
    /// Index in the plan's `tiers` of the band the credited total reached
    /// (0 when nothing is credited).
    pub tier: usize,
    /// The change of the period payout: this line's payout total minus the
    /// previous line's. Negative for a reversal that lowers the payout.
    pub payout_delta: i64,
    /// The period payout after this credit, minor units, capped.
    pub payout_total: i64,
}

/// A period's commission statement: its lines in (`occurred_at`, position)
/// order and the totals. The lines' `payout_delta`s sum to `payout_total`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    pub lines: Vec<StatementLine>,
    /// Minor units: the sum of every credit.
    pub credited_total: i64,
    /// Minor units: [`payout`] of `credited_total`.
    pub payout_total: i64,
}

/// The commission, in minor units, for a period whose credited total is
/// `credited_minor` against `target_minor`: marginal (each band's portion at
/// its rate; the default for any mode but `"whole_amount"`) or whole-amount
/// (everything at the rate of the band reached), rounded down once, then
/// capped. See the module documentation for the edge cases.
pub fn payout(plan: &CommissionPlan, target_minor: i64, credited_minor: i64) -> i64 {
    if credited_minor <= 0 {
        return 0;
    }
    let scale = Scale::new(plan, target_minor);
    let top = scale.lift(credited_minor);
    // The payout times `scale.unit × WHOLE_BP`, exact.
    let numerator = if plan.tier_mode == "whole_amount" {
        let rate = scale
            .reached(plan, top)
            .and_then(|index| plan.tiers.get(index))
            .map_or(0, |tier| i128::from(tier.rate_bp));
        top * rate
    } else {
        let mut numerator = 0i128;
        for (index, tier) in plan.tiers.iter().enumerate() {
            let start = scale.edge(tier.from).clamp(0, top);
            let end = plan
                .tiers
                .get(index + 1)
                .map_or(top, |next| scale.edge(next.from).clamp(0, top));
            // Both ends lie in [0, top] and rate_bp is a u32, so no term
            // overflows; saturating only guards plans whose tiers overlap.
            numerator = numerator.saturating_add((end - start).max(0) * i128::from(tier.rate_bp));
        }
        numerator
    };
    // Non-negative, so integer division rounds down.
    let rounded = numerator / (scale.unit * WHOLE_BP);
    let uncapped = i64::try_from(rounded).unwrap_or(i64::MAX);
    match &plan.cap {
        Some(cap) => uncapped.min(cap.amount_minor.max(0)),
        None => uncapped,
    }
}

/// Index in the plan's `tiers` of the band that `credited_minor` reaches
/// against `target_minor`: the last tier whose start it is at or above.
/// 0 when nothing is credited or no tier is reached.
pub fn tier_reached(plan: &CommissionPlan, target_minor: i64, credited_minor: i64) -> usize {
    if credited_minor <= 0 {
        return 0;
    }
    let scale = Scale::new(plan, target_minor);
    scale.reached(plan, scale.lift(credited_minor)).unwrap_or(0)
}

/// The statement of a period: `credits` recomputed in (`occurred_at`,
/// `position`) order whatever order they arrive in, one line per credit. Each
/// line's `payout_delta` is the change of the period payout total, so a
/// reversal is a negative line and the lines sum to the total exactly.
///
/// The running credited total saturates at the `i64` bounds rather than
/// wrapping (unreachable with real amounts).
pub fn statement(plan: &CommissionPlan, target_minor: i64, credits: &[Credit]) -> Statement {
    let mut ordered: Vec<&Credit> = credits.iter().collect();
    ordered.sort_by_key(|credit| (credit.occurred_at, credit.position));
    let mut credited_total = 0i64;
    let mut payout_total = 0i64;
    let lines = ordered
        .into_iter()
        .map(|credit| {
            credited_total = credited_total.saturating_add(credit.delta_minor);
            let new_payout_total = payout(plan, target_minor, credited_total);
            // Both totals lie in [0, i64::MAX]: the difference cannot overflow.
            let payout_delta = new_payout_total - payout_total;
            payout_total = new_payout_total;
            StatementLine {
                position: credit.position,
                occurred_at: credit.occurred_at,
                credit_delta: credit.delta_minor,
                credited_total,
                tier: tier_reached(plan, target_minor, credited_total),
                payout_delta,
                payout_total,
            }
        })
        .collect();
    Statement {
        lines,
        credited_total,
        payout_total,
    }
}

/// The common scale of band edges and credited amounts, chosen so that edges
/// are exact integers: attainment edges `target × from` against credited
/// amounts × 10000; amount edges `from` against credited amounts as they are.
struct Scale {
    attainment: bool,
    /// The target in minor units, at least 0 (attainment basis only).
    target: i128,
    /// How many scaled units make one minor unit.
    unit: i128,
}

impl Scale {
    fn new(plan: &CommissionPlan, target_minor: i64) -> Self {
        let attainment = plan.tier_basis == "attainment";
        Self {
            attainment,
            target: i128::from(target_minor.max(0)),
            unit: if attainment { WHOLE_BP } else { 1 },
        }
    }

    /// A credited amount (minor units) on this scale.
    fn lift(&self, amount_minor: i64) -> i128 {
        i128::from(amount_minor) * self.unit
    }

    /// Where a tier starting at `from` starts, on this scale. `target × from`
    /// is at most 2^126 in magnitude, within `i128`.
    fn edge(&self, from: i64) -> i128 {
        if self.attainment {
            self.target * i128::from(from)
        } else {
            i128::from(from)
        }
    }

    /// The last tier whose start is at or below `lifted`, if any.
    fn reached(&self, plan: &CommissionPlan, lifted: i128) -> Option<usize> {
        plan.tiers
            .iter()
            .rposition(|tier| self.edge(tier.from) <= lifted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::Money;
    use crate::configuration::CommissionTier;
    use jiff::civil::Date;
    use proptest::prelude::*;

    /// Amounts below are plain minor units throughout.
    fn plan(basis: &str, mode: &str, tiers: &[(i64, u32)]) -> CommissionPlan {
        CommissionPlan {
            name: "AE 2026".into(),
            effective_from: Date::constant(2026, 1, 1),
            metric: "bookings".into(),
            tier_basis: basis.into(),
            tier_mode: mode.into(),
            tiers: tiers
                .iter()
                .map(|&(from, rate_bp)| CommissionTier { from, rate_bp })
                .collect(),
            cap: None,
            clawback_days: 90,
            payout_grace_days: None,
            reps: vec!["user:rep".into()],
        }
    }

    /// DOMAIN.md §5.1: 0 % → 3 %, 100 % → 5 %, 150 % → 8 % of attainment.
    fn worked(mode: &str) -> CommissionPlan {
        plan(
            "attainment",
            mode,
            &[(0, 300), (10_000, 500), (15_000, 800)],
        )
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_767_225_600 + second).unwrap()
    }

    fn credit(position: u64, second: i64, delta_minor: i64) -> Credit {
        Credit {
            position,
            occurred_at: at(second),
            delta_minor,
        }
    }

    fn payout_deltas(statement: &Statement) -> Vec<i64> {
        statement.lines.iter().map(|l| l.payout_delta).collect()
    }

    #[test]
    fn marginal_pays_each_band_at_its_rate() {
        // 1,000,000 × 3 % = 30,000 + 300,000 × 5 % = 15,000 → 45,000.
        assert_eq!(payout(&worked("marginal"), 1_000_000, 1_300_000), 45_000);
        // 30,000 + 500,000 × 5 % = 25,000 + 100,000 × 8 % = 8,000 → 63,000.
        assert_eq!(payout(&worked("marginal"), 1_000_000, 1_600_000), 63_000);
        // An unknown mode is marginal, the default.
        assert_eq!(payout(&worked("progressive"), 1_000_000, 1_300_000), 45_000);
        assert_eq!(tier_reached(&worked("marginal"), 1_000_000, 1_300_000), 1);
    }

    #[test]
    fn whole_amount_pays_everything_at_the_band_reached_with_cliffs() {
        let whole = worked("whole_amount");
        // 1,300,000 × 5 % = 65,000.
        assert_eq!(payout(&whole, 1_000_000, 1_300_000), 65_000);
        // 999,000 × 3 % = 29,970; one more step reaches 100 %, on the edge:
        // 1,000,000 × 5 % = 50,000.
        assert_eq!(payout(&whole, 1_000_000, 999_000), 29_970);
        assert_eq!(payout(&whole, 1_000_000, 1_000_000), 50_000);
        assert_eq!(tier_reached(&whole, 1_000_000, 999_999), 0);
        assert_eq!(tier_reached(&whole, 1_000_000, 1_000_000), 1);
        // 1,500,000 × 8 % = 120,000.
        assert_eq!(payout(&whole, 1_000_000, 1_500_000), 120_000);
    }

    /// DOMAIN.md §8 example A: 900,000 credited earns 27,000; O's 300,000
    /// brings 1,200,000 → 30,000 + 200,000 × 5 % = 40,000, a +13,000 line.
    #[test]
    fn example_a_won_deal_line_is_13000() {
        let credits = [
            credit(10, 0, 500_000),
            credit(20, 60, 400_000),
            credit(30, 120, 300_000),
        ];
        let statement = statement(&worked("marginal"), 1_000_000, &credits);
        // 500,000 × 3 % = 15,000; 900,000 × 3 % = 27,000.
        assert_eq!(payout_deltas(&statement), [15_000, 12_000, 13_000]);
        let deal = &statement.lines[2];
        assert_eq!(deal.position, 30);
        assert_eq!(deal.credited_total, 1_200_000);
        assert_eq!(deal.tier, 1);
        assert_eq!(deal.payout_total, 40_000);
        assert_eq!(statement.lines[1].payout_total, 27_000);
        assert_eq!(statement.credited_total, 1_200_000);
        assert_eq!(statement.payout_total, 40_000);
    }

    #[test]
    fn a_reversal_is_a_negative_line_and_the_totals_go_back() {
        let credits = [
            credit(1, 0, 900_000),
            credit(2, 60, 300_000),
            credit(3, 120, -300_000),
        ];
        let statement = statement(&worked("marginal"), 1_000_000, &credits);
        // 27,000 → 40,000 → 27,000 again.
        assert_eq!(payout_deltas(&statement), [27_000, 13_000, -13_000]);
        let reversal = &statement.lines[2];
        assert_eq!(reversal.credit_delta, -300_000);
        assert_eq!(reversal.credited_total, 900_000);
        assert_eq!(reversal.tier, 0);
        assert_eq!(statement.payout_total, 27_000);
        assert_eq!(payout_deltas(&statement).iter().sum::<i64>(), 27_000);
    }

    #[test]
    fn lines_follow_occurred_at_then_position_whatever_the_input_order() {
        let credits = [
            credit(9, 120, 300_000),
            credit(7, 60, 100_000),
            credit(2, 0, 500_000),
            credit(5, 60, 200_000),
        ];
        let statement = statement(&worked("marginal"), 1_000_000, &credits);
        let order: Vec<u64> = statement.lines.iter().map(|l| l.position).collect();
        assert_eq!(order, [2, 5, 7, 9]);
        // Totals 500,000 / 700,000 / 800,000 / 1,100,000 → payouts 15,000 /
        // 21,000 / 24,000 / 30,000 + 100,000 × 5 % = 35,000.
        assert_eq!(payout_deltas(&statement), [15_000, 6_000, 3_000, 11_000]);
        assert_eq!(statement.payout_total, 35_000);
        assert_eq!(
            statement,
            super::statement(&worked("marginal"), 1_000_000, &{
                let mut sorted = credits.clone();
                sorted.sort_by_key(|c| (c.occurred_at, c.position));
                sorted
            })
        );
    }

    #[test]
    fn amount_basis_reads_tier_starts_as_minor_units() {
        // 0 → 2 %, 50,000 → 4 %, 200,000 → 10 %; the target is ignored.
        let tiers = [(0, 200), (50_000, 400), (200_000, 1_000)];
        let marginal = plan("amount", "marginal", &tiers);
        // 50,000 × 2 % = 1,000 + 150,000 × 4 % = 6,000 + 50,000 × 10 % =
        // 5,000 → 12,000.
        assert_eq!(payout(&marginal, 0, 250_000), 12_000);
        assert_eq!(payout(&marginal, 9_999_999, 250_000), 12_000);
        // 250,000 × 10 % = 25,000.
        let whole = plan("amount", "whole_amount", &tiers);
        assert_eq!(payout(&whole, 0, 250_000), 25_000);
        assert_eq!(tier_reached(&whole, 0, 199_999), 1);
    }

    #[test]
    fn the_cap_applies_last() {
        let mut capped = worked("whole_amount");
        capped.cap = Some(Money {
            amount_minor: 60_000,
            currency: "EUR".into(),
        });
        // 65,000 uncapped → 60,000; 29,970 is under the cap.
        assert_eq!(payout(&capped, 1_000_000, 1_300_000), 60_000);
        assert_eq!(payout(&capped, 1_000_000, 999_000), 29_970);
        // The line that crosses the cap only pays up to it.
        let statement = statement(
            &capped,
            1_000_000,
            &[credit(1, 0, 999_000), credit(2, 60, 301_000)],
        );
        assert_eq!(payout_deltas(&statement), [29_970, 30_030]);
    }

    #[test]
    fn nothing_credited_pays_nothing() {
        assert_eq!(payout(&worked("marginal"), 1_000_000, 0), 0);
        assert_eq!(payout(&worked("whole_amount"), 1_000_000, -500_000), 0);
        assert_eq!(tier_reached(&worked("marginal"), 1_000_000, -500_000), 0);
        // A reversal ordered before its win leaves the total below 0 for a line.
        let statement = statement(
            &worked("marginal"),
            1_000_000,
            &[credit(2, 0, -100_000), credit(1, 60, 100_000)],
        );
        assert_eq!(payout_deltas(&statement), [0, 0]);
        assert_eq!(statement.lines[0].credited_total, -100_000);
        assert_eq!(statement.credited_total, 0);
        assert!(
            super::statement(&worked("marginal"), 1, &[])
                .lines
                .is_empty()
        );
    }

    #[test]
    fn a_zero_target_pays_everything_at_the_last_tier() {
        // Infinite attainment: 100,000 × 8 % = 8,000 in either mode.
        assert_eq!(payout(&worked("marginal"), 0, 100_000), 8_000);
        assert_eq!(payout(&worked("whole_amount"), 0, 100_000), 8_000);
        assert_eq!(payout(&worked("marginal"), -5, 100_000), 8_000);
        assert_eq!(tier_reached(&worked("marginal"), 0, 1), 2);
        assert_eq!(tier_reached(&worked("marginal"), 0, 0), 0);
    }

    #[test]
    fn rounds_down_once_on_the_period_total() {
        // Target 3, edge at 50 % = 1.5 exactly: 1.5 × 50 % = 0.75 plus
        // 1.5 × 100 % = 1.5 → 2.25 → 2. Rounding each band down would give
        // 0 + 1 = 1; truncating the edge to 1 would give 0.5 + 2 = 2.5.
        let halves = plan("attainment", "marginal", &[(0, 5_000), (5_000, 10_000)]);
        assert_eq!(payout(&halves, 3, 3), 2);
        // 999 × 3.33 % = 33.2667 → 33, never up.
        let odd = plan("amount", "marginal", &[(0, 333)]);
        assert_eq!(payout(&odd, 0, 999), 33);
        // Lines are differences of rounded totals: 1 × 3.33 % = 0.0333 pays
        // nothing until the total reaches 31 (1.0323 → 1).
        let credits: Vec<Credit> = (0..31).map(|i| credit(i, 0, 1)).collect();
        let statement = statement(&odd, 0, &credits);
        assert_eq!(payout_deltas(&statement).iter().sum::<i64>(), 1);
        assert_eq!(statement.lines[29].payout_total, 0);
        assert_eq!(statement.lines[30].payout_delta, 1);
    }

    fn arb_plan() -> impl Strategy<Value = CommissionPlan> {
        (
            prop::bool::ANY,
            prop::bool::ANY,
            prop::collection::vec((1i64..20_000, 0u32..=10_000), 0..4),
            0u32..=10_000,
            prop::option::of(1i64..1_000_000),
        )
            .prop_map(|(attainment, whole, steps, first_rate, cap)| {
                let mut from = 0;
                let mut tiers = vec![(0, first_rate)];
                for (step, rate_bp) in steps {
                    from += step;
                    tiers.push((from, rate_bp));
                }
                let mut plan = plan(
                    if attainment { "attainment" } else { "amount" },
                    if whole { "whole_amount" } else { "marginal" },
                    &tiers,
                );
                plan.cap = cap.map(|amount_minor| Money {
                    amount_minor,
                    currency: "EUR".into(),
                });
                plan
            })
    }

    proptest! {
        /// More credit never pays less under a marginal plan, whatever its
        /// tiers, basis and cap.
        #[test]
        fn marginal_payout_never_decreases_as_credited_grows(
            plan in arb_plan(),
            target in -10i64..10_000_000,
            credited in -1_000i64..50_000_000,
            more in 0i64..50_000_000,
        ) {
            let mut plan = plan;
            plan.tier_mode = "marginal".into();
            let low = payout(&plan, target, credited);
            let high = payout(&plan, target, credited + more);
            prop_assert!(low <= high, "{low} > {high}");
            prop_assert!(low >= 0);
        }

        /// Statement lines sum exactly to the payout total, which is the
        /// payout of the credited total, whatever the order and the signs.
        #[test]
        fn statement_lines_sum_to_the_payout_total(
            plan in arb_plan(),
            target in 0i64..10_000_000,
            credits in prop::collection::vec((0u64..20, 0i64..10, -3_000_000i64..5_000_000), 0..30),
        ) {
            let credits: Vec<Credit> = credits
                .into_iter()
                .map(|(position, second, delta)| credit(position, second, delta))
                .collect();
            let statement = statement(&plan, target, &credits);
            let deltas: i64 = statement.lines.iter().map(|l| l.payout_delta).sum();
            prop_assert_eq!(deltas, statement.payout_total);
            let credited: i64 = credits.iter().map(|c| c.delta_minor).sum();
            prop_assert_eq!(statement.credited_total, credited);
            prop_assert_eq!(statement.payout_total, payout(&plan, target, credited));
            prop_assert_eq!(statement.lines.len(), credits.len());
            for pair in statement.lines.windows(2) {
                prop_assert!((pair[0].occurred_at, pair[0].position) <= (pair[1].occurred_at, pair[1].position));
            }
        }
    }
}
