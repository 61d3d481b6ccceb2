//! `crm.v1.AnalyticsQueries`: the formulas of DOMAIN.md §5.3 over the
//! `analytics` read model. Months are bounded in the tenant's zone (its
//! settings; UTC until published); periods are `[from, to)`; rates are basis
//! points, rounded down; money stays in integer minor units.
use std::time::{Duration, SystemTime};

use crm_projections::ANALYTICS;
use crm_proto::v1::analytics_queries_server::AnalyticsQueries;
use crm_proto::v1::{
    AccountValue, AnalyticsPeriod, CampaignRoi, Churn, ChurnMonth, CurrencyRevenue, CustomerValue,
    GetCampaignRoiRequest, GetChurnRequest, GetCustomerValueRequest, GetLeadConversionRequest,
    GetNpsRequest, GetPredictiveClvRequest, GetRetentionCohortsRequest, GetRevenueRequest,
    GetRfmRequest, LeadConversion, LeadConversionMonth, Nps, PredictiveClv, RetentionCohort,
    RetentionCohorts, Revenue, Rfm, RfmScore, RfmSegmentCount, SegmentClv,
};
use jiff::SignedDuration;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{bad_token, count, page, page_size, ready, unavailable};
use crate::command::{Caller, ServiceError};

#[derive(Clone)]
pub struct AnalyticsService {
    pool: super::ReadModels,
    wait: Duration,
}

impl AnalyticsService {
    pub fn new(pool: super::ReadModels, wait: Duration) -> Self {
        Self { pool, wait }
    }
}

use super::instant;

/// A period's bounds, checked.
fn period(period: Option<AnalyticsPeriod>) -> Result<(SystemTime, SystemTime), ServiceError> {
    let period = period.ok_or_else(|| ServiceError::invalid("period", "is required"))?;
    let from = instant("period.from", &period.from)?;
    let to = instant("period.to", &period.to)?;
    if to <= from || to.duration_since(from) > SignedDuration::from_hours(24 * 3660) {
        return Err(ServiceError::invalid(
            "period.to",
            "must be after from, at most 10 years",
        ));
    }
    Ok((from.into(), to.into()))
}

/// `YYYY-MM` → the month's first day.
fn month(field: &'static str, text: &str) -> Result<Date, ServiceError> {
    let bad = || ServiceError::invalid(field, "must be a month YYYY-MM");
    let (year, month) = text.split_once('-').ok_or_else(bad)?;
    if year.len() != 4 || month.len() != 2 {
        return Err(bad());
    }
    let year: i16 = year.parse().map_err(|_| bad())?;
    let month: i8 = month.parse().map_err(|_| bad())?;
    // In the years every read model can hold (so the month after it, and
    // its start in any zone, always exist).
    if !crm_domain::common::BUSINESS_YEARS.contains(&year) {
        return Err(ServiceError::invalid(
            field,
            "must be in the years 1900 to 2200",
        ));
    }
    Date::new(year, month, 1).map_err(|_| bad())
}

/// The months `from..=to` (at most `limit`), checked.
fn months(
    from: &str,
    to: &str,
    limit: usize,
    to_field: &'static str,
) -> Result<Vec<Date>, ServiceError> {
    let first = month("from_month", from)?;
    let last = month(to_field, to)?;
    if last < first {
        return Err(ServiceError::invalid(
            to_field,
            "must not be before from_month",
        ));
    }
    let mut months = vec![first];
    while let Some(&current) = months.last() {
        if current >= last {
            break;
        }
        if months.len() >= limit {
            return Err(ServiceError::invalid(
                to_field,
                if limit == 120 {
                    "must be at most 120 months after from_month"
                } else {
                    "must be at most 60 months after from_month"
                },
            ));
        }
        let next = current
            .checked_add(jiff::Span::new().months(1))
            .map_err(|_| ServiceError::invalid(to_field, "is out of range"))?;
        months.push(next);
    }
    Ok(months)
}

fn next_month(month: Date) -> Date {
    month
        .checked_add(jiff::Span::new().months(1))
        .unwrap_or(month)
}

/// The instant a month starts in `zone`.
fn start_of(month: Date, zone: &TimeZone) -> SystemTime {
    month
        .to_datetime(jiff::civil::Time::midnight())
        .to_zoned(zone.clone())
        .map(|z| SystemTime::from(z.timestamp()))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn label(month: Date) -> String {
    format!("{:04}-{:02}", month.year(), month.month())
}

fn bp(part: u64, whole: u64) -> u32 {
    if whole == 0 {
        0
    } else {
        u32::try_from(u128::from(part) * 10_000 / u128::from(whole)).unwrap_or(u32::MAX)
    }
}

/// 1 − Π(1 − rᵢ), in basis points, rounded down.
fn compound(rates: impl IntoIterator<Item = (u64, u64)>) -> u32 {
    let kept: f64 = rates
        .into_iter()
        .filter(|(_, base)| *base > 0)
        .map(|(churned, base)| 1.0 - churned as f64 / base as f64)
        .product();
    ((1.0 - kept) * 10_000.0 + 1e-9)
        .floor()
        .clamp(0.0, 10_000.0) as u32
}

/// Customers at the start of `[start, end)` and those of them not customers
/// at its end, optionally per segment. An account is a customer at `t` when
/// a spell `[started_at, ended_at)` holds `t`: the same rule at both ends, so
/// a spell that ends exactly on a month's end is churn in that month, and
/// one that starts exactly on its start is in its base.
const CHURN_SQL: &str = "SELECT COALESCE(a.segment, ''), count(*), \
      count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM an_customer_spells e \
        WHERE e.tenant_id = $1 AND e.account_id = b.account_id AND e.started_at <= $3 \
          AND (e.ended_at IS NULL OR e.ended_at > $3))) \
    FROM (SELECT DISTINCT account_id FROM an_customer_spells \
          WHERE tenant_id = $1 AND started_at <= $2 AND (ended_at IS NULL OR ended_at > $2)) b \
    LEFT JOIN an_accounts a ON a.tenant_id = $1 AND a.account_id = b.account_id \
    GROUP BY 1";

impl AnalyticsService {
    /// The tenant's time zone (UTC until it sets one). A failed read is
    /// UNAVAILABLE and a stored zone this build does not know INTERNAL:
    /// monthly figures cut at the wrong midnight would be wrong, not late.
    async fn zone(
        &self,
        client: &deadpool_postgres::Object,
        tenant: &str,
    ) -> Result<TimeZone, Status> {
        let row = client
            .query_opt(
                "SELECT time_zone FROM an_tenant WHERE tenant_id = $1",
                &[&tenant],
            )
            .await
            .map_err(super::unavailable)?;
        let Some(row) = row else {
            return Ok(TimeZone::UTC);
        };
        let name: &str = row.get(0);
        TimeZone::get(name)
            .map_err(|_| Status::internal(format!("the tenant's time zone {name} is unknown")))
    }
}

/// Churn per segment in one month: segment → (customers at start, churned).
async fn churn_by_segment(
    client: &deadpool_postgres::Object,
    tenant: &str,
    start: SystemTime,
    end: SystemTime,
) -> Result<Vec<(String, u64, u64)>, Status> {
    let rows = client
        .query(CHURN_SQL, &[&tenant, &start, &end])
        .await
        .map_err(unavailable)?;
    Ok(rows
        .iter()
        .map(|row| (row.get(0), count(row, 1), count(row, 2)))
        .collect())
}

/// RFM (DOMAIN.md §5.3) after two CTEs the caller defines over the 365 days
/// before `$3`: `orders` (the paid, not cancelled orders: account_id,
/// currency, ordered_at, net_minor) and `refunds` (account_id, currency,
/// amount_minor). Every buyer's recency, frequency and monetary value,
/// scored in quintiles 1-5 (5 best; ties broken by account id) and
/// segmented, as `segmented`. Monetary is net of refunds, in the buyer's
/// main currency (most orders, then most revenue), and scored against the
/// buyers of that currency only: amounts in different currencies are never
/// added or compared.
pub(super) const RFM_SEGMENTED: &str = "per_currency AS ( \
       SELECT account_id, currency, count(*) AS n, sum(net_minor) AS net \
       FROM orders GROUP BY account_id, currency), \
     refunded AS ( \
       SELECT account_id, currency, sum(amount_minor) AS amount \
       FROM refunds GROUP BY account_id, currency), \
     main AS ( \
       SELECT DISTINCT ON (p.account_id) p.account_id, p.currency, \
         p.net - COALESCE(rf.amount, 0) AS monetary \
       FROM per_currency p LEFT JOIN refunded rf \
         ON rf.account_id = p.account_id AND rf.currency = p.currency \
       ORDER BY p.account_id, p.n DESC, p.net DESC, p.currency), \
     buyers AS ( \
       SELECT o.account_id, mc.currency, \
         floor(extract(epoch FROM ($3 - max(o.ordered_at))) / 86400)::bigint AS recency, \
         count(*) AS frequency, mc.monetary::bigint AS monetary \
       FROM orders o JOIN main mc ON mc.account_id = o.account_id \
       GROUP BY o.account_id, mc.currency, mc.monetary), \
     scored AS (SELECT *, \
       ntile(5) OVER (ORDER BY recency DESC, account_id) AS r, \
       ntile(5) OVER (ORDER BY frequency, account_id) AS f, \
       ntile(5) OVER (PARTITION BY currency ORDER BY monetary, account_id) AS m FROM buyers), \
     segmented AS (SELECT *, CASE WHEN r >= 4 AND f >= 4 THEN 'champions' \
       WHEN r <= 2 AND f >= 3 THEN 'at_risk' ELSE 'other' END AS segment FROM scored)";

/// The columns of `segmented` that [`rfm_score`] reads, in its order.
pub(super) const RFM_COLUMNS: &str =
    "account_id, recency, frequency, monetary, currency, r, f, m, segment";

pub(super) fn rfm_score(row: &tokio_postgres::Row) -> RfmScore {
    let score = |i| u32::try_from(row.get::<_, i32>(i)).unwrap_or(0);
    RfmScore {
        account_id: row.get::<_, Uuid>(0).to_string(),
        recency_days: u32::try_from(row.get::<_, i64>(1)).unwrap_or(0),
        frequency: u32::try_from(row.get::<_, i64>(2)).unwrap_or(0),
        monetary_minor: row.get(3),
        currency: row.get(4),
        r: score(5),
        f: score(6),
        m: score(7),
        segment: row.get(8),
    }
}

#[tonic::async_trait]
impl AnalyticsQueries for AnalyticsService {
    async fn get_nps(&self, request: Request<GetNpsRequest>) -> Result<Response<Nps>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let (from, to) = period(request.period)?;
        let (client, position) = ready(&self.pool, ANALYTICS, request.options, self.wait).await?;
        let row = client
            .query_one(
                "WITH latest AS (SELECT DISTINCT ON (contact_id) score FROM an_nps \
                   WHERE tenant_id = $1 AND answered_at >= $2 AND answered_at < $3 \
                   ORDER BY contact_id, answered_at DESC, position DESC) \
                 SELECT count(*), count(*) FILTER (WHERE score >= 9), \
                   count(*) FILTER (WHERE score BETWEEN 7 AND 8), \
                   count(*) FILTER (WHERE score <= 6) FROM latest",
                &[&caller.tenant.as_str(), &from, &to],
            )
            .await
            .map_err(unavailable)?;
        let (responses, promoters, passives, detractors) = (
            count(&row, 0),
            count(&row, 1),
            count(&row, 2),
            count(&row, 3),
        );
        let nps_bp = (responses > 0)
            .then(|| ((promoters as i64 - detractors as i64) * 10_000 / responses as i64) as i32);
        Ok(Response::new(Nps {
            responses,
            promoters,
            passives,
            detractors,
            nps_bp,
            position,
        }))
    }

    async fn get_churn(
        &self,
        request: Request<GetChurnRequest>,
    ) -> Result<Response<Churn>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let months = months(&request.from_month, &request.to_month, 120, "to_month")?;
        let (client, position) = ready(&self.pool, ANALYTICS, request.options, self.wait).await?;
        let tenant = caller.tenant.as_str();
        let zone = self.zone(&client, tenant).await?;
        let mut out = Vec::with_capacity(months.len());
        for month in months {
            let segments = churn_by_segment(
                &client,
                tenant,
                start_of(month, &zone),
                start_of(next_month(month), &zone),
            )
            .await?;
            let base: u64 = segments.iter().map(|s| s.1).sum();
            let churned: u64 = segments.iter().map(|s| s.2).sum();
            out.push(ChurnMonth {
                month: label(month),
                customers_at_start: base,
                churned,
                churn_bp: (base > 0).then(|| bp(churned, base)),
            });
        }
        let compound_churn_bp = compound(out.iter().map(|m| (m.churned, m.customers_at_start)));
        Ok(Response::new(Churn {
            months: out,
            compound_churn_bp,
            position,
        }))
    }

    async fn get_revenue(
        &self,
        request: Request<GetRevenueRequest>,
    ) -> Result<Response<Revenue>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let (from, to) = period(request.period)?;
        let (client, position) = ready(&self.pool, ANALYTICS, request.options, self.wait).await?;
        let rows = client
            .query(
                "WITH paid AS (SELECT account_id, net_minor, currency FROM an_orders \
                   WHERE tenant_id = $1 AND paid AND NOT cancelled \
                     AND ordered_at >= $2 AND ordered_at < $3), \
                 o AS (SELECT currency, sum(net_minor)::bigint AS net, count(*) AS orders, \
                         count(DISTINCT account_id) AS customers, count(account_id) AS linked \
                       FROM paid GROUP BY currency), \
                 rep AS (SELECT currency, count(*) FILTER (WHERE n >= 2) AS repeaters \
                         FROM (SELECT currency, account_id, count(*) AS n FROM paid \
                               WHERE account_id IS NOT NULL GROUP BY 1, 2) x GROUP BY currency), \
                 r AS (SELECT currency, sum(amount_minor)::bigint AS refunded FROM an_refunds \
                       WHERE tenant_id = $1 AND refunded_at >= $2 AND refunded_at < $3 \
                       GROUP BY currency) \
                 SELECT cur.currency, COALESCE(o.net, 0) - COALESCE(r.refunded, 0), \
                   COALESCE(o.orders, 0), COALESCE(o.customers, 0), COALESCE(rep.repeaters, 0), \
                   COALESCE(o.linked, 0) \
                 FROM (SELECT currency FROM o UNION SELECT currency FROM r) cur \
                 LEFT JOIN o USING (currency) LEFT JOIN r USING (currency) \
                 LEFT JOIN rep USING (currency) ORDER BY 1",
                &[&caller.tenant.as_str(), &from, &to],
            )
            .await
            .map_err(unavailable)?;
        let currencies = rows
            .iter()
            .map(|row| {
                let net: i64 = row.get(1);
                let (orders, customers, repeaters) = (count(row, 2), count(row, 3), count(row, 4));
                // Orders per buying customer: only orders with a customer
                // (an unlinked ERP order has none to count it against).
                let linked = count(row, 5);
                CurrencyRevenue {
                    currency: row.get(0),
                    net_revenue_minor: net,
                    paid_orders: orders,
                    buying_customers: customers,
                    average_order_value_minor: if orders == 0 { 0 } else { net / orders as i64 },
                    purchase_frequency_milli: (linked * 1000).checked_div(customers).unwrap_or(0),
                    repeat_purchase_bp: bp(repeaters, customers),
                }
            })
            .collect();
        Ok(Response::new(Revenue {
            currencies,
            position,
        }))
    }

    async fn get_customer_value(
        &self,
        request: Request<GetCustomerValueRequest>,
    ) -> Result<Response<CustomerValue>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let account_id = Uuid::parse_str(&request.account_id)
            .map_err(|_| ServiceError::invalid("account_id", "must be a UUID"))?;
        let (client, position) = ready(&self.pool, ANALYTICS, request.options, self.wait).await?;
        let tenant = caller.tenant.as_str();
        let known = client
            .query_opt(
                "SELECT 1 FROM an_accounts WHERE tenant_id = $1 AND account_id = $2",
                &[&tenant, &account_id],
            )
            .await
            .map_err(unavailable)?;
        if known.is_none() {
            return Err(Status::not_found(format!("no account {account_id}")));
        }
        let rows = client
            .query(
                "WITH o AS (SELECT currency, sum(net_minor)::bigint AS net, count(*) AS orders, \
                     bool_and(cost_minor IS NOT NULL) AS costed, \
                     COALESCE(sum(cost_minor), 0)::bigint AS cost \
                   FROM an_orders WHERE tenant_id = $1 AND account_id = $2 AND paid \
                     AND NOT cancelled GROUP BY currency), \
                 r AS (SELECT currency, sum(amount_minor)::bigint AS refunded FROM an_refunds \
                   WHERE tenant_id = $1 AND account_id = $2 GROUP BY currency) \
                 SELECT cur.currency, COALESCE(o.net, 0) - COALESCE(r.refunded, 0), \
                   COALESCE(o.orders, 0), COALESCE(o.costed, true), COALESCE(o.cost, 0) \
                 FROM (SELECT currency FROM o UNION SELECT currency FROM r) cur \
                 LEFT JOIN o USING (currency) LEFT JOIN r USING (currency) ORDER BY 1",
                &[&tenant, &account_id],
            )
            .await
            .map_err(unavailable)?;
        let values = rows
            .iter()
            .map(|row| {
                let net: i64 = row.get(1);
                let costed: bool = row.get(3);
                let margin = costed.then(|| net.saturating_sub(row.get::<_, i64>(4)));
                AccountValue {
                    currency: row.get(0),
                    net_revenue_minor: net,
                    margin_minor: margin,
                    paid_orders: count(row, 2),
                    historical_clv_minor: margin.unwrap_or(net),
                }
            })
            .collect();
        Ok(Response::new(CustomerValue {
            account_id: account_id.to_string(),
            values,
            position,
        }))
    }

    async fn get_predictive_clv(
        &self,
        request: Request<GetPredictiveClvRequest>,
    ) -> Result<Response<PredictiveClv>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let as_of = instant("as_of", &request.as_of)?;
        let (client, position) = ready(&self.pool, ANALYTICS, request.options, self.wait).await?;
        let tenant = caller.tenant.as_str();
        let zone = self.zone(&client, tenant).await?;
        // The 12 whole months before the month holding `as_of`.
        let this_month = as_of.to_zoned(zone.clone()).date().first_of_month();
        let mut months = Vec::with_capacity(12);
        let mut month = this_month;
        for _ in 0..12 {
            month = month
                .checked_sub(jiff::Span::new().months(1))
                .map_err(|_| ServiceError::invalid("as_of", "is out of range"))?;
            months.push(month);
        }
        months.reverse();
        let (from, to) = (start_of(months[0], &zone), start_of(this_month, &zone));
        let mut churn: std::collections::BTreeMap<String, Vec<(u64, u64)>> = Default::default();
        for &month in &months {
            for (segment, base, churned) in churn_by_segment(
                &client,
                tenant,
                start_of(month, &zone),
                start_of(next_month(month), &zone),
            )
            .await?
            {
                churn.entry(segment).or_default().push((churned, base));
            }
        }
        let rows = client
            .query(
                "SELECT COALESCE(a.segment, ''), o.currency, count(DISTINCT o.account_id), \
                   count(*), sum(o.net_minor)::bigint, \
                   COALESCE(sum(o.net_minor) FILTER (WHERE o.cost_minor IS NOT NULL), 0)::bigint, \
                   COALESCE(sum(o.cost_minor), 0)::bigint \
                 FROM an_orders o LEFT JOIN an_accounts a \
                   ON a.tenant_id = o.tenant_id AND a.account_id = o.account_id \
                 WHERE o.tenant_id = $1 AND o.paid AND NOT o.cancelled \
                   AND o.account_id IS NOT NULL AND o.ordered_at >= $2 AND o.ordered_at < $3 \
                 GROUP BY 1, 2 ORDER BY 1, 2",
                &[&tenant, &from, &to],
            )
            .await
            .map_err(unavailable)?;
        let segments = rows
            .iter()
            .map(|row| {
                let segment: String = row.get(0);
                let (customers, orders) = (count(row, 2), count(row, 3));
                let net: i64 = row.get(4);
                let (costed_net, cost): (i64, i64) = (row.get(5), row.get(6));
                let aov = if orders == 0 { 0 } else { net / orders as i64 };
                let margin_bp = if costed_net > 0 {
                    u32::try_from(
                        ((costed_net.saturating_sub(cost)).max(0) as i128 * 10_000
                            / costed_net as i128)
                            .min(10_000),
                    )
                    .unwrap_or(10_000)
                } else {
                    10_000
                };
                let annual_churn_bp = compound(churn.get(&segment).cloned().unwrap_or_default());
                // Lifespan = 1 ÷ annual churn, at most 10 years.
                let (life_num, life_den): (i128, i128) =
                    if annual_churn_bp == 0 || annual_churn_bp < 1_000 {
                        (10, 1)
                    } else {
                        (10_000, i128::from(annual_churn_bp))
                    };
                let clv = i128::from(aov) * i128::from(orders) * i128::from(margin_bp) * life_num
                    / (i128::from(customers.max(1)) * 10_000 * life_den);
                SegmentClv {
                    segment,
                    currency: row.get(1),
                    customers,
                    average_order_value_minor: aov,
                    orders_per_year_milli: (orders * 1000).checked_div(customers).unwrap_or(0),
                    margin_bp,
                    annual_churn_bp,
                    predictive_clv_minor: i64::try_from(clv).unwrap_or(i64::MAX),
                }
            })
            .collect();
        Ok(Response::new(PredictiveClv { segments, position }))
    }

    async fn get_retention_cohorts(
        &self,
        request: Request<GetRetentionCohortsRequest>,
    ) -> Result<Response<RetentionCohorts>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let cohorts = months(&request.from_month, &request.to_month, 60, "to_month")?;
        let horizon = match request.horizon {
            0 => 12,
            n @ 1..=24 => n as usize,
            _ => return Err(ServiceError::invalid("horizon", "must be 0 to 24").into()),
        };
        let (client, position) = ready(&self.pool, ANALYTICS, request.options, self.wait).await?;
        let tenant = caller.tenant.as_str();
        let zone = self.zone(&client, tenant).await?;
        let mut out = Vec::with_capacity(cohorts.len());
        for cohort in cohorts {
            let mut bounds = vec![cohort];
            for _ in 0..=horizon {
                let next = next_month(*bounds.last().unwrap_or(&cohort));
                bounds.push(next);
            }
            let starts: Vec<SystemTime> = bounds.iter().map(|m| start_of(*m, &zone)).collect();
            // Members: first became customers in the cohort month. For each
            // later month k, members with a paid order in it.
            let rows = client
                .query(
                    "WITH members AS (SELECT account_id FROM an_customer_spells \
                       WHERE tenant_id = $1 GROUP BY account_id \
                       HAVING min(started_at) >= $2 AND min(started_at) < $3) \
                     SELECT (SELECT count(*) FROM members), k, count(DISTINCT o.account_id) \
                     FROM unnest($4::timestamptz[], $5::timestamptz[]) \
                          WITH ORDINALITY AS b(start_at, end_at, k) \
                     LEFT JOIN an_orders o ON o.tenant_id = $1 AND o.paid AND NOT o.cancelled \
                       AND o.ordered_at >= b.start_at AND o.ordered_at < b.end_at \
                       AND o.account_id IN (SELECT account_id FROM members) \
                     GROUP BY k ORDER BY k",
                    &[
                        &tenant,
                        &starts[0],
                        &starts[1],
                        &starts[..starts.len() - 1].to_vec(),
                        &starts[1..].to_vec(),
                    ],
                )
                .await
                .map_err(unavailable)?;
            let size = rows.first().map_or(0, |row| count(row, 0));
            out.push(RetentionCohort {
                month: label(cohort),
                size,
                retained_bp: rows.iter().map(|row| bp(count(row, 2), size)).collect(),
            });
        }
        Ok(Response::new(RetentionCohorts {
            cohorts: out,
            position,
        }))
    }

    async fn get_lead_conversion(
        &self,
        request: Request<GetLeadConversionRequest>,
    ) -> Result<Response<LeadConversion>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let months = months(&request.from_month, &request.to_month, 60, "to_month")?;
        let (client, position) = ready(&self.pool, ANALYTICS, request.options, self.wait).await?;
        let tenant = caller.tenant.as_str();
        let zone = self.zone(&client, tenant).await?;
        let mut out = Vec::with_capacity(months.len());
        for month in months {
            let row = client
                .query_one(
                    "SELECT count(*), count(*) FILTER (WHERE EXISTS ( \
                       SELECT 1 FROM an_customer_spells s WHERE s.tenant_id = l.tenant_id \
                         AND s.account_id = l.account_id AND s.started_at >= l.captured_at \
                         AND s.started_at < l.captured_at + interval '180 days')) \
                     FROM an_leads l WHERE tenant_id = $1 AND captured_at >= $2 \
                       AND captured_at < $3",
                    &[
                        &tenant,
                        &start_of(month, &zone),
                        &start_of(next_month(month), &zone),
                    ],
                )
                .await
                .map_err(unavailable)?;
            let (leads, customers) = (count(&row, 0), count(&row, 1));
            out.push(LeadConversionMonth {
                month: label(month),
                leads,
                customers,
                conversion_bp: bp(customers, leads),
            });
        }
        Ok(Response::new(LeadConversion {
            months: out,
            position,
        }))
    }

    async fn get_campaign_roi(
        &self,
        request: Request<GetCampaignRoiRequest>,
    ) -> Result<Response<CampaignRoi>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let campaign_id = Uuid::parse_str(&request.campaign_id)
            .map_err(|_| ServiceError::invalid("campaign_id", "must be a UUID"))?;
        let (attribution, order) = match request.attribution.as_str() {
            "" | "first_touch" => ("first_touch", "ASC"),
            "last_touch" => ("last_touch", "DESC"),
            _ => {
                return Err(ServiceError::invalid(
                    "attribution",
                    "must be first_touch or last_touch",
                )
                .into());
            }
        };
        let (client, position) = ready(&self.pool, ANALYTICS, request.options, self.wait).await?;
        let tenant = caller.tenant.as_str();
        let Some(campaign) = client
            .query_opt(
                "SELECT currency FROM an_campaigns WHERE tenant_id = $1 AND campaign_id = $2",
                &[&tenant, &campaign_id],
            )
            .await
            .map_err(unavailable)?
        else {
            return Err(Status::not_found(format!("no campaign {campaign_id}")));
        };
        let currency: String = campaign.get(0);
        let row = client
            .query_one(
                &format!(
                    "WITH RECURSIVE tree(id, depth) AS ( \
                       SELECT $2::uuid, 0 \
                       UNION ALL SELECT c.campaign_id, t.depth + 1 FROM an_campaigns c \
                         JOIN tree t ON c.parent_id = t.id \
                         WHERE c.tenant_id = $1 AND t.depth < 32), \
                     touches AS ( \
                       SELECT d.deal_id, l.campaign_id, l.captured_at AS at, 0::bigint AS pos \
                       FROM an_deals d JOIN an_leads l \
                         ON l.tenant_id = d.tenant_id AND l.lead_id = d.lead_id \
                       WHERE d.tenant_id = $1 AND d.won_at IS NOT NULL \
                         AND l.campaign_id IS NOT NULL \
                       UNION ALL \
                       SELECT d.deal_id, t.campaign_id, t.touched_at, t.position \
                       FROM an_deals d JOIN an_touches t ON t.tenant_id = d.tenant_id \
                         AND (t.member_id = d.lead_id OR t.member_id = d.contact_id) \
                       WHERE d.tenant_id = $1 AND d.won_at IS NOT NULL \
                         AND t.touched_at < d.opened_at \
                         AND t.touched_at >= d.opened_at - interval '180 days'), \
                     chosen AS (SELECT DISTINCT ON (deal_id) deal_id, campaign_id FROM touches \
                       ORDER BY deal_id, at {order}, pos {order}) \
                     SELECT (SELECT count(DISTINCT id) FROM tree), \
                       (SELECT COALESCE(sum(amount_minor), 0)::bigint FROM an_campaign_costs \
                        WHERE tenant_id = $1 AND currency = $3 \
                          AND campaign_id IN (SELECT id FROM tree)), \
                       count(d.deal_id), COALESCE(sum(d.amount_minor), 0)::bigint \
                     FROM chosen c JOIN an_deals d ON d.tenant_id = $1 AND d.deal_id = c.deal_id \
                     WHERE c.campaign_id IN (SELECT id FROM tree) AND d.currency = $3"
                ),
                &[&tenant, &campaign_id, &currency],
            )
            .await
            .map_err(unavailable)?;
        let cost: i64 = row.get(1);
        let revenue: i64 = row.get(3);
        let roi_bp = (cost != 0).then(|| {
            i64::try_from((i128::from(revenue) - i128::from(cost)) * 10_000 / i128::from(cost))
                .unwrap_or(i64::MAX)
        });
        Ok(Response::new(CampaignRoi {
            campaign_id: campaign_id.to_string(),
            attribution: attribution.to_owned(),
            campaigns: count(&row, 0),
            currency,
            cost_minor: cost,
            attributed_revenue_minor: revenue,
            attributed_deals: count(&row, 2),
            roi_bp,
            position,
        }))
    }

    async fn get_rfm(&self, request: Request<GetRfmRequest>) -> Result<Response<Rfm>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let as_of = instant("as_of", &request.as_of)?;
        if !["", "champions", "at_risk", "other"].contains(&request.segment.as_str()) {
            return Err(
                ServiceError::invalid("segment", "must be champions, at_risk or other").into(),
            );
        }
        let size = page_size(request.page_size)?;
        let after = if request.page_token.is_empty() {
            Uuid::nil()
        } else {
            Uuid::parse_str(&request.page_token).map_err(|_| bad_token())?
        };
        let (client, position) = ready(&self.pool, ANALYTICS, request.options, self.wait).await?;
        let from: SystemTime = (as_of - SignedDuration::from_hours(24 * 365)).into();
        let as_of: SystemTime = as_of.into();
        let scored = format!(
            "WITH orders AS (SELECT account_id, currency, ordered_at, net_minor FROM an_orders \
               WHERE tenant_id = $1 AND paid AND NOT cancelled AND account_id IS NOT NULL \
                 AND ordered_at >= $2 AND ordered_at < $3), \
             refunds AS (SELECT account_id, currency, amount_minor FROM an_refunds \
               WHERE tenant_id = $1 AND account_id IS NOT NULL \
                 AND refunded_at >= $2 AND refunded_at < $3), {RFM_SEGMENTED}"
        );
        let tenant = caller.tenant.as_str();
        let counts = client
            .query(
                &format!(
                    "{scored} SELECT segment, count(*) FROM segmented GROUP BY segment ORDER BY segment"
                ),
                &[&tenant, &from, &as_of],
            )
            .await
            .map_err(unavailable)?;
        let rows = client
            .query(
                &format!(
                    "{scored} SELECT {RFM_COLUMNS} FROM segmented \
                     WHERE ($4 = '' OR segment = $4) AND account_id > $5 \
                     ORDER BY account_id LIMIT $6"
                ),
                &[
                    &tenant,
                    &from,
                    &as_of,
                    &request.segment,
                    &after,
                    &i64::from(size + 1),
                ],
            )
            .await
            .map_err(unavailable)?;
        let (rows, next_page_token) = page(&rows, size, |last| last.get::<_, Uuid>(0).to_string());
        Ok(Response::new(Rfm {
            segments: counts
                .iter()
                .map(|row| RfmSegmentCount {
                    segment: row.get(0),
                    accounts: count(row, 1),
                })
                .collect(),
            accounts: rows.iter().map(rfm_score).collect(),
            next_page_token,
            position,
        }))
    }
}
