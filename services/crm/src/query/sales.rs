//! `crm.v1.SalesQueries`: the sales read models.
use std::time::{Duration, SystemTime};

use crm_projections::{PIPELINE_BOARD, SALES_FUNNEL, SALES_PERFORMANCE};
use crm_proto::v1::sales_queries_server::SalesQueries;
use crm_proto::v1::{
    Attainment, CommissionLine, CommissionStatement, Forecast, ForecastAmounts, ForecastByCurrency,
    Funnel, FunnelCohort, FunnelStep, GetAttainmentRequest, GetCommissionStatementRequest,
    GetForecastRequest, GetFunnelRequest, GetLeadFunnelRequest, GetLeaderboardRequest,
    GetLossReasonsRequest, GetPipelineBoardRequest, GetSalesCycleRequest, GetStageDurationsRequest,
    GetVelocityRequest, GetWinRateRequest, LeadFunnel, LeadFunnelRow, Leaderboard,
    LeaderboardEntry, LossReasonRow, LossReasons, NodeAttainment, PipelineBoard, SalesCycle,
    SalesDurationStats, SalesFiscalPeriod, StageColumn, StageDuration, StageDurations, Velocity,
    VelocityByCurrency, WinRate, WinRateByValue,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{bad_token, bounded, page, page_size, ready, unavailable};
use crate::command::{Caller, ServiceError};

#[derive(Clone)]
pub struct SalesService {
    pool: super::ReadModels,
    wait: Duration,
}

impl SalesService {
    /// `wait`: the longest a query waits for its `min_position`.
    pub fn new(pool: super::ReadModels, wait: Duration) -> Self {
        Self { pool, wait }
    }
}

/// Aggregates of a column `d` of seconds: count, mean (rounded down),
/// nearest-rank median and p90 (see [`stats`]).
const STATS: &str = "count(*), COALESCE(floor(avg(d)), 0)::bigint, \
    COALESCE(percentile_disc(0.5) WITHIN GROUP (ORDER BY d), 0)::bigint, \
    COALESCE(percentile_disc(0.9) WITHIN GROUP (ORDER BY d), 0)::bigint";

/// The [`STATS`] columns of `row` from `first` on.
fn stats(row: &tokio_postgres::Row, first: usize) -> SalesDurationStats {
    SalesDurationStats {
        count: u64::try_from(row.get::<_, i64>(first)).unwrap_or(0),
        mean_seconds: row.get(first + 1),
        median_seconds: row.get(first + 2),
        p90_seconds: row.get(first + 3),
    }
}

/// `part ÷ whole × 10000`, rounded down; `None` when `whole` is not positive.
fn rate_bp(part: i128, whole: i128) -> Option<u32> {
    (whole > 0).then(|| u32::try_from((part * 10_000 / whole).max(0)).unwrap_or(u32::MAX))
}

fn pipeline(field: &'static str, text: &str) -> Result<Uuid, ServiceError> {
    Uuid::parse_str(text).map_err(|_| ServiceError::invalid(field, "must be a UUID"))
}

/// An optional pipeline filter: empty for every pipeline.
fn optional_pipeline(text: &str) -> Result<Option<Uuid>, ServiceError> {
    if text.is_empty() {
        Ok(None)
    } else {
        pipeline("pipeline_id", text).map(Some)
    }
}

/// `[from, to)` of RFC 3339 instants, at most 10 years long.
fn period(from: &str, to: &str) -> Result<(SystemTime, SystemTime), ServiceError> {
    let (from, to) = (super::instant("from", from)?, super::instant("to", to)?);
    if to <= from || to.duration_since(from) > jiff::SignedDuration::from_hours(24 * 3660) {
        return Err(ServiceError::invalid(
            "to",
            "must be after from, at most 10 years",
        ));
    }
    Ok((from.into(), to.into()))
}

/// A calendar month, `YYYY-MM`, as its first day.
fn month(field: &'static str, text: &str) -> Result<jiff::civil::Date, ServiceError> {
    let bad = || ServiceError::invalid(field, "must be a month, YYYY-MM");
    let (year, month) = text.split_once('-').ok_or_else(bad)?;
    if year.len() != 4
        || month.len() != 2
        || !year
            .bytes()
            .chain(month.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let (year, month): (i16, i8) = (
        year.parse().map_err(|_| bad())?,
        month.parse().map_err(|_| bad())?,
    );
    if !(1900..=2200).contains(&year) {
        return Err(bad());
    }
    jiff::civil::Date::new(year, month, 1).map_err(|_| bad())
}

/// The instant the month `months` after `first` starts in `zone`.
fn month_start(zone: &str, first: jiff::civil::Date, months: i64) -> Result<SystemTime, Status> {
    let internal = |e: jiff::Error| Status::internal(format!("calendar: {e}"));
    let tz = jiff::tz::TimeZone::get(zone).map_err(internal)?;
    let day = first
        .checked_add(jiff::Span::new().months(months))
        .map_err(internal)?;
    Ok(day.to_zoned(tz).map_err(internal)?.timestamp().into())
}

fn rfc3339(time: SystemTime) -> String {
    jiff::Timestamp::try_from(time)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn is_currency(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

/// The node a page of attainment starts after (hex of its bytes in the
/// token); empty before the first page.
fn node_token(token: &str) -> Result<String, ServiceError> {
    if !token.len().is_multiple_of(2) || token.len() > 400 {
        return Err(bad_token());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad_token)?;
    String::from_utf8(bytes).map_err(|_| bad_token())
}

/// The tenant's zone for calendar months (UTC until it has settings).
async fn funnel_zone(client: &tokio_postgres::Client, tenant: &str) -> Result<String, Status> {
    let row = client
        .query_opt(
            "SELECT time_zone FROM sales_funnel_settings WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .map_err(unavailable)?;
    Ok(row.map_or_else(|| "UTC".to_owned(), |row| row.get(0)))
}

/// The latest version of a pipeline and its open stages in order;
/// NOT_FOUND when the read model knows no such pipeline.
async fn open_stages(
    client: &tokio_postgres::Client,
    tenant: &str,
    pipeline_id: Uuid,
) -> Result<(i32, Vec<String>), Status> {
    let rows = client
        .query(
            "SELECT version, stage FROM sales_funnel_stages \
             WHERE tenant_id = $1 AND pipeline_id = $2 AND kind = 'open' AND version = \
               (SELECT max(version) FROM sales_funnel_stages \
                WHERE tenant_id = $1 AND pipeline_id = $2) \
             ORDER BY open_order",
            &[&tenant, &pipeline_id],
        )
        .await
        .map_err(unavailable)?;
    let Some(version) = rows.first().map(|row| row.get::<_, i32>(0)) else {
        return Err(Status::not_found(format!("no pipeline {pipeline_id}")));
    };
    Ok((version, rows.iter().map(|row| row.get(1)).collect()))
}

/// A board's columns: each of the pipeline's `open` stages in order, one
/// column per currency or a single empty one; then the columns of stages the
/// current version no longer has (deals that have not followed it yet), by
/// stage code. `columns` comes ordered by stage, then currency.
fn board_order(open: &[String], columns: &mut Vec<StageColumn>) -> Vec<StageColumn> {
    let mut board = Vec::with_capacity(columns.len() + open.len());
    for stage in open {
        let before = board.len();
        board.extend(columns.extract_if(.., |c| &c.stage == stage));
        if board.len() == before {
            board.push(StageColumn {
                stage: stage.clone(),
                ..StageColumn::default()
            });
        }
    }
    board.append(columns);
    board
}

/// A fiscal period as the projection stores it: a month (quarter 0), a
/// quarter (month 0) or the year (both 0).
struct Fiscal {
    year: i16,
    quarter: i16,
    month: i16,
}

impl Fiscal {
    fn parse(period: Option<SalesFiscalPeriod>) -> Result<Self, ServiceError> {
        let period = period.ok_or_else(|| ServiceError::invalid("period", "is required"))?;
        if !(2000..=2100).contains(&period.fiscal_year) {
            return Err(ServiceError::invalid(
                "period.fiscal_year",
                "must be 2000 to 2100",
            ));
        }
        if period.quarter > 4 {
            return Err(ServiceError::invalid("period.quarter", "must be 0 to 4"));
        }
        if period.month > 12 {
            return Err(ServiceError::invalid("period.month", "must be 0 to 12"));
        }
        if period.month > 0 && period.quarter > 0 && (period.month - 1) / 3 + 1 != period.quarter {
            return Err(ServiceError::invalid(
                "period.month",
                "must lie in the quarter",
            ));
        }
        let small = |n: u32| i16::try_from(n).unwrap_or(0);
        Ok(Self {
            year: small(period.fiscal_year),
            quarter: if period.month > 0 {
                0
            } else {
                small(period.quarter)
            },
            month: small(period.month),
        })
    }

    /// How many months the period spans.
    fn months(&self) -> i64 {
        if self.month > 0 {
            1
        } else if self.quarter > 0 {
            3
        } else {
            12
        }
    }
}

/// The stream of a fiscal year's bookings targets: the id the command side
/// derives for `AllocateSalesTarget`.
fn target_stream(tenant: &str, fiscal_year: i16) -> Result<Uuid, Status> {
    let tenant = crm_domain::TenantId::parse(tenant)
        .map_err(|_| ServiceError::invalid("x-tenant-id", "must be 1 to 64 of [A-Za-z0-9_-]"))?;
    Ok(crate::command::tenant_scoped_id(
        &tenant,
        &format!("sales_target:{fiscal_year}:bookings"),
    ))
}

/// What the performance queries need of the tenant's settings.
struct PerformanceSettings {
    zone: jiff::tz::TimeZone,
    fiscal_year_start_month: i8,
    reporting_currency: String,
}

impl PerformanceSettings {
    /// The tenant's settings; UTC, January and no reporting currency until
    /// it has published some.
    async fn load(client: &tokio_postgres::Client, tenant: &str) -> Result<Self, Status> {
        let row = client
            .query_opt(
                "SELECT time_zone, fiscal_year_start_month, reporting_currency \
                 FROM sales_perf_settings WHERE tenant_id = $1",
                &[&tenant],
            )
            .await
            .map_err(unavailable)?;
        let (zone, start, reporting_currency) = match row {
            Some(row) => (row.get::<_, String>(0), row.get::<_, i16>(1), row.get(2)),
            None => ("UTC".to_owned(), 1, String::new()),
        };
        Ok(Self {
            zone: jiff::tz::TimeZone::get(&zone)
                .map_err(|e| Status::internal(format!("time zone {zone}: {e}")))?,
            fiscal_year_start_month: i8::try_from(start).unwrap_or(1),
            reporting_currency,
        })
    }

    /// `[start, end)` of a fiscal period.
    fn bounds(&self, fiscal: &Fiscal) -> Result<(jiff::Timestamp, jiff::Timestamp), Status> {
        let internal = |e: jiff::Error| Status::internal(format!("calendar: {e}"));
        let year_start = jiff::civil::Date::new(fiscal.year, self.fiscal_year_start_month, 1)
            .map_err(internal)?;
        let (offset, length) = if fiscal.month > 0 {
            (i64::from(fiscal.month) - 1, 1)
        } else if fiscal.quarter > 0 {
            ((i64::from(fiscal.quarter) - 1) * 3, 3)
        } else {
            (0, 12)
        };
        let start = year_start
            .checked_add(jiff::Span::new().months(offset))
            .map_err(internal)?;
        let end = start
            .checked_add(jiff::Span::new().months(length))
            .map_err(internal)?;
        let instant = |day: jiff::civil::Date| {
            day.to_zoned(self.zone.clone())
                .map(|zoned| zoned.timestamp())
                .map_err(internal)
        };
        Ok((instant(start)?, instant(end)?))
    }

    /// The end of the period as long as `fiscal`'s (a month, a quarter or a
    /// year of the fiscal calendar) that holds `at`.
    fn end_of_period_holding(
        &self,
        fiscal: &Fiscal,
        at: jiff::Timestamp,
    ) -> Result<jiff::Timestamp, Status> {
        let internal = |e: jiff::Error| Status::internal(format!("calendar: {e}"));
        let date = at.to_zoned(self.zone.clone()).date();
        // Months since the fiscal calendar's origin (year 0's start month).
        let months = i64::from(date.year()) * 12 + i64::from(date.month())
            - i64::from(self.fiscal_year_start_month);
        let length = fiscal.months();
        let first =
            months.div_euclid(length) * length + length + i64::from(self.fiscal_year_start_month)
                - 1;
        let end = jiff::civil::Date::new(
            i16::try_from(first.div_euclid(12))
                .map_err(|_| Status::internal("calendar: year out of range"))?,
            i8::try_from(first.rem_euclid(12) + 1).unwrap_or(1),
            1,
        )
        .map_err(internal)?;
        end.to_zoned(self.zone.clone())
            .map(|zoned| zoned.timestamp())
            .map_err(internal)
    }
}

#[tonic::async_trait]
impl SalesQueries for SalesService {
    async fn get_pipeline_board(
        &self,
        request: Request<GetPipelineBoardRequest>,
    ) -> Result<Response<PipelineBoard>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let pipeline_id = Uuid::parse_str(&request.pipeline_id)
            .map_err(|_| ServiceError::invalid("pipeline_id", "must be a UUID"))?;
        if request.owner.len() > 200 {
            return Err(ServiceError::invalid("owner", "must be at most 200 characters").into());
        }
        let (client, position) =
            ready(&self.pool, PIPELINE_BOARD, request.options, self.wait).await?;
        let tenant = caller.tenant.as_str();
        let rows = client
            .query(
                "SELECT stage, COALESCE(currency, ''), count(*), \
                   COALESCE(sum(amount_minor), 0)::bigint, COALESCE(sum(weighted_minor), 0)::bigint \
                 FROM pipeline_board \
                 WHERE tenant_id = $1 AND pipeline_id = $2 AND outcome = 'open' AND NOT archived \
                   AND ($3 = '' OR owner = $3) \
                 GROUP BY 1, 2 ORDER BY 1, 2",
                &[&tenant, &pipeline_id, &request.owner],
            )
            .await
            .map_err(super::unavailable)?;
        let mut columns: Vec<StageColumn> = rows
            .iter()
            .map(|row| StageColumn {
                stage: row.get(0),
                currency: row.get(1),
                deal_count: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
                amount_minor: row.get(3),
                weighted_minor: row.get(4),
            })
            .collect();
        // The columns follow the pipeline's open stages, in order, as the
        // sales funnel knows them. Only a courtesy: the board does not wait
        // for that read model, and without it (not there yet, lagging, or
        // not run with this one; read last, as its failure ends the
        // snapshot) falls back to stage codes.
        let open = match open_stages(&client, tenant, pipeline_id).await {
            Ok((_, open)) => Some(open),
            Err(status) if status.code() == tonic::Code::NotFound => None,
            Err(status) => {
                tracing::warn!(%status, "pipeline board: stage order unavailable");
                None
            }
        };
        if open.is_none() && columns.is_empty() {
            return Err(Status::not_found(format!("no pipeline {pipeline_id}")));
        }
        Ok(Response::new(PipelineBoard {
            stages: board_order(open.as_deref().unwrap_or_default(), &mut columns),
            position,
        }))
    }

    async fn get_win_rate(
        &self,
        request: Request<GetWinRateRequest>,
    ) -> Result<Response<WinRate>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let from = super::instant("from", &request.from)?;
        let to = super::instant("to", &request.to)?;
        if to <= from || to.duration_since(from) > jiff::SignedDuration::from_hours(24 * 3660) {
            return Err(ServiceError::invalid("to", "must be after from, at most 10 years").into());
        }
        if request.owner.len() > 200 {
            return Err(ServiceError::invalid("owner", "must be at most 200 characters").into());
        }
        let (client, position) =
            ready(&self.pool, PIPELINE_BOARD, request.options, self.wait).await?;
        let (from, to): (std::time::SystemTime, std::time::SystemTime) = (from.into(), to.into());
        let rows = client
            .query(
                "SELECT COALESCE(currency, ''), \
                   count(*) FILTER (WHERE outcome = 'won'), \
                   count(*) FILTER (WHERE outcome = 'lost'), \
                   COALESCE(sum(amount_minor) FILTER (WHERE outcome = 'won'), 0)::bigint, \
                   COALESCE(sum(amount_minor) FILTER (WHERE outcome = 'lost'), 0)::bigint \
                 FROM pipeline_board \
                 WHERE tenant_id = $1 AND outcome IN ('won', 'lost') \
                   AND closed_at >= $2 AND closed_at < $3 AND ($4 = '' OR owner = $4) \
                 GROUP BY 1 ORDER BY 1",
                &[&caller.tenant.as_str(), &from, &to, &request.owner],
            )
            .await
            .map_err(super::unavailable)?;
        let rate = |won: i128, lost: i128| -> u32 {
            if won + lost <= 0 {
                0
            } else {
                u32::try_from(won * 10_000 / (won + lost)).unwrap_or(0)
            }
        };
        let (mut won, mut lost) = (0u64, 0u64);
        let mut by_value = Vec::new();
        for row in &rows {
            let (w, l): (i64, i64) = (row.get(1), row.get(2));
            won += u64::try_from(w).unwrap_or(0);
            lost += u64::try_from(l).unwrap_or(0);
            let (won_minor, lost_minor): (i64, i64) = (row.get(3), row.get(4));
            by_value.push(WinRateByValue {
                currency: row.get(0),
                won_minor,
                lost_minor,
                win_rate_bp: rate(i128::from(won_minor), i128::from(lost_minor)),
            });
        }
        Ok(Response::new(WinRate {
            won,
            lost,
            win_rate_bp: rate(i128::from(won), i128::from(lost)),
            by_value,
            position,
        }))
    }

    async fn get_forecast(
        &self,
        request: Request<GetForecastRequest>,
    ) -> Result<Response<Forecast>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let from = super::date("from_date", &request.from_date)?;
        let to = super::date("to_date", &request.to_date)?;
        if to <= from {
            return Err(ServiceError::invalid("to_date", "must be after from_date").into());
        }
        if request.owner.len() > 200 {
            return Err(ServiceError::invalid("owner", "must be at most 200 characters").into());
        }
        let (client, position) =
            ready(&self.pool, PIPELINE_BOARD, request.options, self.wait).await?;
        let rows = client
            .query(
                "SELECT COALESCE(currency, ''), category, count(*), \
                   COALESCE(sum(amount_minor), 0)::bigint, COALESCE(sum(weighted_minor), 0)::bigint \
                 FROM pipeline_board \
                 WHERE tenant_id = $1 AND NOT archived AND outcome <> 'lost' \
                   AND close_date >= $2::text::date AND close_date < $3::text::date \
                   AND ($4 = '' OR owner = $4) \
                 GROUP BY 1, 2 ORDER BY 1",
                &[
                    &caller.tenant.as_str(),
                    &from.to_string(),
                    &to.to_string(),
                    &request.owner,
                ],
            )
            .await
            .map_err(super::unavailable)?;
        // Each category counts in itself and every wider one.
        const LADDER: [&str; 4] = ["closed", "commit", "best_case", "pipeline"];
        let mut currencies: Vec<ForecastByCurrency> = Vec::new();
        for row in &rows {
            let currency: String = row.get(0);
            let category: Option<String> = row.get(1);
            let Some(rung) = category
                .as_deref()
                .and_then(|c| LADDER.iter().position(|l| *l == c))
            else {
                continue; // omitted
            };
            if currencies.last().is_none_or(|c| c.currency != currency) {
                currencies.push(ForecastByCurrency {
                    currency: currency.clone(),
                    closed: Some(ForecastAmounts::default()),
                    commit: Some(ForecastAmounts::default()),
                    best_case: Some(ForecastAmounts::default()),
                    pipeline: Some(ForecastAmounts::default()),
                });
            }
            let Some(entry) = currencies.last_mut() else {
                continue;
            };
            let (deals, amount, weighted): (i64, i64, i64) = (row.get(2), row.get(3), row.get(4));
            let levels = [
                &mut entry.closed,
                &mut entry.commit,
                &mut entry.best_case,
                &mut entry.pipeline,
            ];
            for level in levels.into_iter().skip(rung).flatten() {
                level.deals += u64::try_from(deals).unwrap_or(0);
                level.amount_minor = level.amount_minor.saturating_add(amount);
                level.weighted_minor = level.weighted_minor.saturating_add(weighted);
            }
        }
        Ok(Response::new(Forecast {
            currencies,
            position,
        }))
    }

    async fn get_funnel(
        &self,
        request: Request<GetFunnelRequest>,
    ) -> Result<Response<Funnel>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let pipeline_id = pipeline("pipeline_id", &request.pipeline_id)?;
        let first = month("cohort_from", &request.cohort_from)?;
        let last = month("cohort_to", &request.cohort_to)?;
        let months =
            i32::from(last.year() - first.year()) * 12 + i32::from(last.month() - first.month());
        if !(0..120).contains(&months) {
            return Err(ServiceError::invalid(
                "cohort_to",
                "must be cohort_from or later, at most 120 months",
            )
            .into());
        }
        bounded("owner", &request.owner)?;
        bounded("source_channel", &request.source_channel)?;
        let (client, position) =
            ready(&self.pool, SALES_FUNNEL, request.options, self.wait).await?;
        let tenant = caller.tenant.as_str();
        let zone = funnel_zone(&client, tenant).await?;
        let (version, stages) = open_stages(&client, tenant, pipeline_id).await?;
        // Each cohort month's start in the tenant's zone, and the end of the
        // last: deals are put in months by these instants (computed here,
        // with the same zone rules the tenant's settings were checked
        // against, not PostgreSQL's own zone database).
        let bounds = (0..=i64::from(months) + 1)
            .map(|k| month_start(&zone, first, k))
            .collect::<Result<Vec<SystemTime>, Status>>()?;
        let labels: Vec<String> = (0..=i64::from(months))
            .map(|k| {
                first
                    .checked_add(jiff::Span::new().months(k))
                    .map(|d| format!("{:04}-{:02}", d.year(), d.month()))
                    .unwrap_or_default()
            })
            .collect();
        let (start, end) = (bounds[0], bounds[bounds.len() - 1]);
        // Per deal the highest open stage (by the current version's order)
        // it ever visited; a won deal reaches every stage and `won`.
        let won_level = i32::try_from(stages.len()).unwrap_or(i32::MAX);
        let rows = client
            .query(
                "WITH stages AS ( \
                   SELECT stage, open_order FROM sales_funnel_stages \
                   WHERE tenant_id = $1 AND pipeline_id = $2 AND version = $3 AND kind = 'open'), \
                 deals AS ( \
                   SELECT width_bucket(d.opened_at, $4::timestamptz[]) AS cohort, \
                     CASE WHEN d.outcome = 'won' THEN $9::integer ELSE \
                       (SELECT max(s.open_order) FROM stage_visit v JOIN stages s USING (stage) \
                        WHERE v.tenant_id = $1 AND v.deal_id = d.deal_id) END AS level \
                   FROM sales_funnel_deals d \
                   WHERE d.tenant_id = $1 AND d.pipeline_id = $2 AND NOT d.archived \
                     AND d.opened_at >= $5 AND d.opened_at < $6 \
                     AND ($7 = '' OR d.owner = $7) AND ($8 = '' OR d.source_channel = $8)) \
                 SELECT cohort, level, count(*) FROM deals GROUP BY 1, 2 ORDER BY 1, 2",
                &[
                    &tenant,
                    &pipeline_id,
                    &version,
                    &bounds,
                    &start,
                    &end,
                    &request.owner,
                    &request.source_channel,
                    &won_level,
                ],
            )
            .await
            .map_err(unavailable)?;
        // (cohort → deals opened, deals per level reached)
        let steps = stages.len() + 1;
        let mut cohorts: std::collections::BTreeMap<String, (u64, Vec<u64>)> =
            std::collections::BTreeMap::new();
        for row in &rows {
            // Buckets 1..=months+1: every deal opened in [start, end).
            let Some(label) = usize::try_from(row.get::<_, i32>(0) - 1)
                .ok()
                .and_then(|i| labels.get(i))
            else {
                continue;
            };
            let entry = cohorts
                .entry(label.clone())
                .or_insert_with(|| (0, vec![0; steps]));
            let deals = u64::try_from(row.get::<_, i64>(2)).unwrap_or(0);
            entry.0 += deals;
            let level = row
                .get::<_, Option<i32>>(1)
                .and_then(|l| usize::try_from(l).ok());
            if let Some(level) = level.filter(|l| *l < steps) {
                entry.1[level] += deals;
            }
        }
        let names: Vec<String> = stages
            .into_iter()
            .chain(std::iter::once("won".to_owned()))
            .collect();
        let cohort = |cohort: String, opened: u64, levels: &[u64]| {
            // Deals reaching step k: those whose highest level is k or more.
            let mut reached = vec![0u64; levels.len()];
            let mut running = 0;
            for k in (0..levels.len()).rev() {
                running += levels[k];
                reached[k] = running;
            }
            FunnelCohort {
                cohort,
                opened,
                steps: names
                    .iter()
                    .enumerate()
                    .map(|(k, stage)| FunnelStep {
                        stage: stage.clone(),
                        deals: reached[k],
                        conversion_bp: reached
                            .get(k + 1)
                            .and_then(|next| rate_bp(i128::from(*next), i128::from(reached[k]))),
                    })
                    .collect(),
            }
        };
        let mut total_levels = vec![0u64; steps];
        let mut total_opened = 0;
        for (opened, levels) in cohorts.values() {
            total_opened += opened;
            for (sum, n) in total_levels.iter_mut().zip(levels) {
                *sum += n;
            }
        }
        Ok(Response::new(Funnel {
            pipeline_version: u32::try_from(version).unwrap_or(0),
            total: Some(cohort(String::new(), total_opened, &total_levels)),
            cohorts: cohorts
                .into_iter()
                .map(|(month, (opened, levels))| cohort(month, opened, &levels))
                .collect(),
            position,
        }))
    }

    async fn get_stage_durations(
        &self,
        request: Request<GetStageDurationsRequest>,
    ) -> Result<Response<StageDurations>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let pipeline_id = pipeline("pipeline_id", &request.pipeline_id)?;
        let (from, to) = period(&request.from, &request.to)?;
        bounded("owner", &request.owner)?;
        let (client, position) =
            ready(&self.pool, SALES_FUNNEL, request.options, self.wait).await?;
        let tenant = caller.tenant.as_str();
        let (_, stages) = open_stages(&client, tenant, pipeline_id).await?;
        let rows = client
            .query(
                &format!(
                    "SELECT stage, {STATS} FROM ( \
                       SELECT v.stage, EXTRACT(EPOCH FROM (v.exited_at - v.entered_at))::bigint AS d \
                       FROM stage_visit v JOIN sales_funnel_deals deal \
                         ON deal.tenant_id = v.tenant_id AND deal.deal_id = v.deal_id \
                       WHERE v.tenant_id = $1 AND deal.pipeline_id = $2 AND NOT deal.archived \
                         AND v.exited_at >= $3 AND v.exited_at < $4 \
                         AND ($5 = '' OR deal.owner = $5)) visits \
                     GROUP BY stage"
                ),
                &[&tenant, &pipeline_id, &from, &to, &request.owner],
            )
            .await
            .map_err(unavailable)?;
        let stages = stages
            .into_iter()
            .map(|stage| {
                let duration = rows
                    .iter()
                    .find(|row| row.get::<_, &str>(0) == stage)
                    .map_or_else(SalesDurationStats::default, |row| stats(row, 1));
                StageDuration {
                    stage,
                    duration: Some(duration),
                }
            })
            .collect();
        Ok(Response::new(StageDurations { stages, position }))
    }

    async fn get_sales_cycle(
        &self,
        request: Request<GetSalesCycleRequest>,
    ) -> Result<Response<SalesCycle>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let (from, to) = period(&request.from, &request.to)?;
        let pipeline_id = optional_pipeline(&request.pipeline_id)?;
        bounded("owner", &request.owner)?;
        let (client, position) =
            ready(&self.pool, SALES_FUNNEL, request.options, self.wait).await?;
        let row = client
            .query_one(
                &format!(
                    "SELECT {STATS} FROM ( \
                       SELECT EXTRACT(EPOCH FROM (closed_at - opened_at))::bigint AS d \
                       FROM sales_funnel_deals \
                       WHERE tenant_id = $1 AND outcome = 'won' AND NOT archived \
                         AND closed_at >= $2 AND closed_at < $3 \
                         AND ($4::uuid IS NULL OR pipeline_id = $4) \
                         AND ($5 = '' OR owner = $5)) won"
                ),
                &[
                    &caller.tenant.as_str(),
                    &from,
                    &to,
                    &pipeline_id,
                    &request.owner,
                ],
            )
            .await
            .map_err(unavailable)?;
        Ok(Response::new(SalesCycle {
            cycle: Some(stats(&row, 0)),
            position,
        }))
    }

    async fn get_velocity(
        &self,
        request: Request<GetVelocityRequest>,
    ) -> Result<Response<Velocity>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let (from, to) = period(&request.from, &request.to)?;
        let pipeline_id = optional_pipeline(&request.pipeline_id)?;
        bounded("owner", &request.owner)?;
        let (client, position) =
            ready(&self.pool, SALES_FUNNEL, request.options, self.wait).await?;
        let rows = client
            .query(
                "SELECT currency, open, won, lost, won_minor::text, cycle_seconds::text FROM ( \
                   SELECT currency, \
                     count(*) FILTER (WHERE outcome = 'open') AS open, \
                     count(*) FILTER (WHERE outcome = 'won' AND closed) AS won, \
                     count(*) FILTER (WHERE outcome = 'lost' AND closed) AS lost, \
                     COALESCE(sum(amount_minor) FILTER (WHERE outcome = 'won' AND closed), 0) \
                       AS won_minor, \
                     COALESCE(sum(EXTRACT(EPOCH FROM (closed_at - opened_at))::bigint) \
                       FILTER (WHERE outcome = 'won' AND closed), 0) AS cycle_seconds \
                   FROM (SELECT *, closed_at >= $2 AND closed_at < $3 AS closed \
                         FROM sales_funnel_deals \
                         WHERE tenant_id = $1 AND NOT archived \
                           AND ($4::uuid IS NULL OR pipeline_id = $4) \
                           AND ($5 = '' OR owner = $5)) deals \
                   GROUP BY currency) per_currency \
                 WHERE open + won + lost > 0 ORDER BY currency",
                &[
                    &caller.tenant.as_str(),
                    &from,
                    &to,
                    &pipeline_id,
                    &request.owner,
                ],
            )
            .await
            .map_err(unavailable)?;
        let big = |text: &str| text.parse::<i128>().unwrap_or(0);
        let currencies = rows
            .iter()
            .map(|row| {
                let count = |i| i128::from(row.get::<_, i64>(i));
                let (open, won, lost) = (count(1), count(2), count(3));
                let won_minor = big(row.get(4));
                let cycle_seconds = big(row.get(5));
                let average = |sum: i128| {
                    sum.checked_div(won)
                        .map_or(0, |average| i64::try_from(average).unwrap_or(i64::MAX))
                };
                // open × (won ÷ (won + lost)) × (Σ won ÷ won) ÷ (Σ cycle ÷ won ÷
                // 86400), exact, rounded down once.
                let denominator = (won + lost) * cycle_seconds;
                let velocity = (won > 0 && denominator > 0).then(|| {
                    [won, won_minor, 86_400]
                        .into_iter()
                        .try_fold(open, i128::checked_mul)
                        .map_or(i64::MAX, |v| {
                            i64::try_from(v / denominator).unwrap_or(i64::MAX)
                        })
                });
                VelocityByCurrency {
                    currency: row.get(0),
                    open_deals: u64::try_from(open).unwrap_or(0),
                    won: u64::try_from(won).unwrap_or(0),
                    lost: u64::try_from(lost).unwrap_or(0),
                    win_rate_bp: rate_bp(won, won + lost).unwrap_or(0),
                    average_won_minor: average(won_minor),
                    average_cycle_seconds: average(cycle_seconds),
                    velocity_minor_per_day: velocity,
                }
            })
            .collect();
        Ok(Response::new(Velocity {
            currencies,
            position,
        }))
    }

    async fn get_loss_reasons(
        &self,
        request: Request<GetLossReasonsRequest>,
    ) -> Result<Response<LossReasons>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let (from, to) = period(&request.from, &request.to)?;
        let pipeline_id = optional_pipeline(&request.pipeline_id)?;
        bounded("owner", &request.owner)?;
        let (client, position) =
            ready(&self.pool, SALES_FUNNEL, request.options, self.wait).await?;
        let rows = client
            .query(
                "SELECT COALESCE(loss_reason, ''), currency, count(*), \
                   COALESCE(sum(amount_minor), 0)::bigint \
                 FROM sales_funnel_deals \
                 WHERE tenant_id = $1 AND outcome = 'lost' AND NOT archived \
                   AND closed_at >= $2 AND closed_at < $3 \
                   AND ($4::uuid IS NULL OR pipeline_id = $4) AND ($5 = '' OR owner = $5) \
                 GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2",
                &[
                    &caller.tenant.as_str(),
                    &from,
                    &to,
                    &pipeline_id,
                    &request.owner,
                ],
            )
            .await
            .map_err(unavailable)?;
        Ok(Response::new(LossReasons {
            reasons: rows
                .iter()
                .map(|row| LossReasonRow {
                    reason: row.get(0),
                    currency: row.get(1),
                    lost: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
                    amount_minor: row.get(3),
                })
                .collect(),
            position,
        }))
    }

    async fn get_lead_funnel(
        &self,
        request: Request<GetLeadFunnelRequest>,
    ) -> Result<Response<LeadFunnel>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let (from, to) = period(&request.from, &request.to)?;
        let (client, position) =
            ready(&self.pool, SALES_FUNNEL, request.options, self.wait).await?;
        let rows = client
            .query(
                "SELECT lead.channel, count(*), \
                   count(*) FILTER (WHERE lead.qualified_at IS NOT NULL \
                                       OR lead.converted_at IS NOT NULL), \
                   count(*) FILTER (WHERE lead.converted_at IS NOT NULL), \
                   count(*) FILTER (WHERE lead.converted_at IS NOT NULL AND deal.outcome = 'won') \
                 FROM lead_funnel lead LEFT JOIN sales_funnel_deals deal \
                   ON deal.tenant_id = lead.tenant_id AND deal.deal_id = lead.opportunity_id \
                 WHERE lead.tenant_id = $1 AND NOT lead.merged \
                   AND lead.captured_at >= $2 AND lead.captured_at < $3 \
                 GROUP BY 1 ORDER BY 1",
                &[&caller.tenant.as_str(), &from, &to],
            )
            .await
            .map_err(unavailable)?;
        let channels = rows
            .iter()
            .map(|row| {
                let count = |i| row.get::<_, i64>(i);
                let (captured, qualified, converted, won) =
                    (count(1), count(2), count(3), count(4));
                let step = |to: i64, from: i64| rate_bp(i128::from(to), i128::from(from));
                LeadFunnelRow {
                    channel: row.get(0),
                    captured: u64::try_from(captured).unwrap_or(0),
                    qualified: u64::try_from(qualified).unwrap_or(0),
                    converted: u64::try_from(converted).unwrap_or(0),
                    won: u64::try_from(won).unwrap_or(0),
                    qualified_bp: step(qualified, captured),
                    converted_bp: step(converted, qualified),
                    won_bp: step(won, converted),
                }
            })
            .collect();
        Ok(Response::new(LeadFunnel { channels, position }))
    }

    async fn get_attainment(
        &self,
        request: Request<GetAttainmentRequest>,
    ) -> Result<Response<Attainment>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let fiscal = Fiscal::parse(request.period)?;
        bounded("node", &request.node)?;
        let size = page_size(request.page_size)?;
        let after = node_token(&request.page_token)?;
        let (client, position) =
            ready(&self.pool, SALES_PERFORMANCE, request.options, self.wait).await?;
        let tenant = caller.tenant.as_str();
        let settings = PerformanceSettings::load(&client, tenant).await?;
        let (start, end) = settings.bounds(&fiscal)?;
        let (start_time, end_time): (SystemTime, SystemTime) = (start.into(), end.into());
        // The node's credit holders: itself and, unless it is a team (teams
        // are credited by snapshot), every node below it in the target
        // tree whose allocation overlaps the period.
        let rows = client
            .query(
                "WITH RECURSIVE nodes AS ( \
                   SELECT node, parent, amount_minor, currency FROM sales_targets \
                   WHERE tenant_id = $1 AND target_id = $2 AND quarter = $3 AND month = $4 \
                     AND ($5 = '' OR node = $5) AND node > $6 \
                   ORDER BY node LIMIT $7), \
                 tree(root, node) AS ( \
                   SELECT node, node FROM nodes \
                   UNION \
                   SELECT tree.root, t.node FROM sales_targets t JOIN tree ON t.parent = tree.node \
                   WHERE t.tenant_id = $1 AND t.target_id = $2 AND tree.node NOT LIKE 'team:%' \
                     AND (($3 = 0 AND $4 = 0) OR (t.quarter = 0 AND t.month = 0) \
                       OR (t.month = 0 AND $4 = 0 AND t.quarter = $3) \
                       OR (t.month > 0 AND t.month = $4) \
                       OR (t.month = 0 AND $4 > 0 AND t.quarter = ($4 - 1) / 3 + 1) \
                       OR (t.month > 0 AND $4 = 0 AND $3 = (t.month - 1) / 3 + 1))) \
                 SELECT n.node, COALESCE(n.parent, ''), n.amount_minor, n.currency, \
                   (SELECT COALESCE(sum(c.amount_minor), 0)::bigint FROM sales_credits c \
                    WHERE c.tenant_id = $1 AND c.currency = n.currency \
                      AND c.occurred_at >= $8 AND c.occurred_at < $9 \
                      AND (c.owner IN (SELECT tr.node FROM tree tr WHERE tr.root = n.node) \
                        OR c.teams && ARRAY(SELECT tr.node FROM tree tr WHERE tr.root = n.node))) \
                 FROM nodes n ORDER BY n.node",
                &[
                    &tenant,
                    &target_stream(tenant, fiscal.year)?,
                    &fiscal.quarter,
                    &fiscal.month,
                    &request.node,
                    &after,
                    &i64::from(size + 1),
                    &start_time,
                    &end_time,
                ],
            )
            .await
            .map_err(unavailable)?;
        let (rows, next_page_token) = page(&rows, size, |last| {
            last.get::<_, &str>(0)
                .bytes()
                .map(|b| format!("{b:02x}"))
                .collect()
        });
        let nodes = rows
            .iter()
            .map(|row| {
                let (target, credited): (i64, i64) = (row.get(2), row.get(4));
                NodeAttainment {
                    node: row.get(0),
                    parent: row.get(1),
                    target_minor: target,
                    currency: row.get(3),
                    credited_minor: credited,
                    attainment_bp: (target > 0).then(|| {
                        i64::try_from(i128::from(credited) * 10_000 / i128::from(target))
                            .unwrap_or(i64::MAX)
                    }),
                }
            })
            .collect();
        Ok(Response::new(Attainment {
            period_start: start.to_string(),
            period_end: end.to_string(),
            nodes,
            next_page_token,
            position,
        }))
    }

    async fn get_commission_statement(
        &self,
        request: Request<GetCommissionStatementRequest>,
    ) -> Result<Response<CommissionStatement>, Status> {
        use crm_domain::commission::{Credit, statement};
        use crm_domain::configuration::CommissionPlan;
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        if request.rep.is_empty() {
            return Err(ServiceError::invalid("rep", "is required").into());
        }
        bounded("rep", &request.rep)?;
        let fiscal = Fiscal::parse(request.period)?;
        let size = page_size(request.page_size)?;
        // The last line of the page before: its event position and the
        // credited total there (which changes if a credit lands before it).
        let after: Option<(u64, i64)> = if request.page_token.is_empty() {
            None
        } else {
            let (position, total) = request.page_token.split_once('.').ok_or_else(bad_token)?;
            Some((
                position.parse().map_err(|_| bad_token())?,
                total.parse().map_err(|_| bad_token())?,
            ))
        };
        let (client, position) =
            ready(&self.pool, SALES_PERFORMANCE, request.options, self.wait).await?;
        let tenant = caller.tenant.as_str();
        let settings = PerformanceSettings::load(&client, tenant).await?;
        let (start, end) = settings.bounds(&fiscal)?;
        let last_day = end.to_zoned(settings.zone.clone()).date().to_string();
        // Each plan's version in force on the period's last day, then the
        // latest effective of those listing the rep.
        let plans = client
            .query(
                "SELECT DISTINCT ON (plan_id) plan_id, version, content, effective_from::text, \
                   position, metric, $3 = ANY(reps) \
                 FROM commission_plans \
                 WHERE tenant_id = $1 AND effective_from < $2::text::date \
                 ORDER BY plan_id, effective_from DESC, version DESC",
                &[&tenant, &last_day, &request.rep],
            )
            .await
            .map_err(unavailable)?;
        let Some(chosen) = plans
            .iter()
            .filter(|row| row.get::<_, &str>(5) == "bookings" && row.get::<_, bool>(6))
            .max_by_key(|row| (row.get::<_, String>(3), row.get::<_, i64>(4)))
        else {
            return Err(Status::not_found(format!(
                "no bookings commission plan in force lists {} in that period",
                request.rep
            )));
        };
        let plan: CommissionPlan = serde_json::from_value(chosen.get(2))
            .map_err(|e| Status::internal(format!("stored plan: {e}")))?;
        let target = client
            .query_opt(
                "SELECT amount_minor, currency FROM sales_targets \
                 WHERE tenant_id = $1 AND target_id = $2 AND node = $3 \
                   AND quarter = $4 AND month = $5",
                &[
                    &tenant,
                    &target_stream(tenant, fiscal.year)?,
                    &request.rep,
                    &fiscal.quarter,
                    &fiscal.month,
                ],
            )
            .await
            .map_err(unavailable)?;
        let (start_time, end_time): (SystemTime, SystemTime) = (start.into(), end.into());
        // The period's own credits, and those of earlier periods recorded in
        // it (posted late when their period was frozen by then).
        let rows = client
            .query(
                "SELECT position, deal_id, kind, occurred_at, won_at, amount_minor, currency, \
                   recorded_at \
                 FROM sales_credits \
                 WHERE tenant_id = $1 AND owner = $2 AND occurred_at >= $3 AND occurred_at < $4 \
                 UNION ALL \
                 SELECT position, deal_id, kind, occurred_at, won_at, amount_minor, currency, \
                   recorded_at \
                 FROM sales_credits \
                 WHERE tenant_id = $1 AND owner = $2 AND $5 \
                   AND recorded_at >= $3 AND recorded_at < $4 AND occurred_at < $3 \
                 ORDER BY 4, 1",
                &[
                    &tenant,
                    &request.rep,
                    &start_time,
                    &end_time,
                    &plan.payout_grace_days.is_some(),
                ],
            )
            .await
            .map_err(unavailable)?;
        let grace = plan
            .payout_grace_days
            .map(|days| jiff::SignedDuration::from_hours(i64::from(days) * 24));
        let (target_minor, currency) = match &target {
            Some(row) => (row.get::<_, i64>(0), row.get::<_, String>(1)),
            None if !settings.reporting_currency.is_empty() => {
                (0, settings.reporting_currency.clone())
            }
            None => (
                0,
                rows.first()
                    .map(|row| row.get::<_, String>(6))
                    .unwrap_or_default(),
            ),
        };
        let clawback = std::time::Duration::from_secs(u64::from(plan.clawback_days) * 86_400);
        // (credit, deal, kind) of every line: wins, and reopened wins within
        // the clawback window.
        let mut credits = Vec::new();
        let mut cited = std::collections::HashMap::new();
        for row in &rows {
            let (kind, occurred_at, won_at): (String, SystemTime, SystemTime) =
                (row.get(2), row.get(3), row.get(4));
            if row.get::<_, String>(6) != currency {
                continue;
            }
            let recorded_at: Option<SystemTime> = row.get(7);
            // Where the credit counts: its own period, unless that was
            // frozen (end + grace) when it was recorded; then the period it
            // was recorded in, at that time.
            let mut posted_at = None;
            if let (Some(grace), Some(recorded_at)) = (grace, recorded_at) {
                let occurred = jiff::Timestamp::try_from(occurred_at)
                    .map_err(|e| Status::internal(format!("stored time: {e}")))?;
                let recorded = jiff::Timestamp::try_from(recorded_at)
                    .map_err(|e| Status::internal(format!("stored time: {e}")))?;
                let frozen_at = settings
                    .end_of_period_holding(&fiscal, occurred)?
                    .checked_add(grace)
                    .map_err(|e| Status::internal(format!("calendar: {e}")))?;
                let late = recorded > frozen_at;
                let own = occurred >= start && occurred < end;
                match (own, late) {
                    (true, false) => {}
                    (false, true) => posted_at = Some(recorded),
                    // Recorded after this period froze: it counts where it
                    // was recorded. Or an earlier period's credit recorded
                    // here before that period froze: it counts there.
                    _ => continue,
                }
            }
            if kind == "reopened"
                && occurred_at.duration_since(won_at).unwrap_or_default() > clawback
            {
                continue;
            }
            let event_position = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
            let occurred_at = jiff::Timestamp::try_from(occurred_at)
                .map_err(|e| Status::internal(format!("stored time: {e}")))?;
            credits.push(Credit {
                position: event_position,
                // A late line takes its place by when it was posted.
                occurred_at: posted_at.unwrap_or(occurred_at),
                delta_minor: row.get(5),
            });
            cited.insert(
                event_position,
                (row.get::<_, Uuid>(1), kind, occurred_at, posted_at),
            );
        }
        let computed = statement(&plan, target_minor, &credits);
        // The whole statement is computed (each line's totals depend on all
        // before it); the reply carries one page of its lines.
        let first = match after {
            None => 0,
            Some((after, total)) => {
                computed
                    .lines
                    .iter()
                    .position(|line| line.position == after && line.credited_total == total)
                    .ok_or_else(|| {
                        Status::failed_precondition(
                            "the statement changed since the page token was made (a credit \
                             was recorded before its line); start again from the first page",
                        )
                    })?
                    + 1
            }
        };
        let page_lines = computed.lines.iter().skip(first).take(size as usize);
        let next_page_token = if computed.lines.len() > first + size as usize {
            page_lines
                .clone()
                .next_back()
                .map(|line| format!("{}.{}", line.position, line.credited_total))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let lines = page_lines
            .map(|line| {
                let (deal, kind, occurred_at, posted_at) = cited
                    .get(&line.position)
                    .map(|(deal, kind, occurred_at, posted_at)| {
                        (
                            deal.to_string(),
                            kind.clone(),
                            occurred_at.to_string(),
                            posted_at.map(|t| t.to_string()).unwrap_or_default(),
                        )
                    })
                    .unwrap_or_default();
                CommissionLine {
                    event_position: line.position,
                    occurred_at,
                    posted_at,
                    deal_id: deal,
                    kind,
                    credit_delta_minor: line.credit_delta,
                    credited_total_minor: line.credited_total,
                    tier: u32::try_from(line.tier).unwrap_or(u32::MAX),
                    payout_delta_minor: line.payout_delta,
                    payout_total_minor: line.payout_total,
                }
            })
            .collect();
        Ok(Response::new(CommissionStatement {
            rep: request.rep,
            period_start: start.to_string(),
            period_end: end.to_string(),
            plan_id: chosen.get::<_, Uuid>(0).to_string(),
            plan_version: u32::try_from(chosen.get::<_, i32>(1)).unwrap_or(0),
            plan_name: plan.name.clone(),
            target_minor,
            currency,
            lines,
            credited_minor: computed.credited_total,
            payout_minor: computed.payout_total,
            position,
            next_page_token,
        }))
    }

    async fn get_leaderboard(
        &self,
        request: Request<GetLeaderboardRequest>,
    ) -> Result<Response<Leaderboard>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let fiscal = Fiscal::parse(request.period)?;
        if !["won_amount", "won_count"].contains(&request.metric.as_str()) {
            return Err(ServiceError::invalid("metric", "must be won_amount or won_count").into());
        }
        let scope = match request.scope.as_str() {
            "" | "all" => String::new(),
            scope => match scope.strip_prefix("team:").map(Uuid::parse_str) {
                Some(Ok(team)) => format!("team:{team}"),
                _ => {
                    return Err(
                        ServiceError::invalid("scope", "must be all or team:<team id>").into(),
                    );
                }
            },
        };
        if !request.currency.is_empty() && !is_currency(&request.currency) {
            return Err(
                ServiceError::invalid("currency", "must be an ISO 4217 code such as EUR").into(),
            );
        }
        let size = page_size(request.page_size)?;
        // The last entry of the page before, by its place in the order (not
        // its rank, which moves when credits land between pages): figure,
        // when it was reached (µs), the event's position, the rep.
        let after: Option<(i64, i64, i64, String)> = if request.page_token.is_empty() {
            None
        } else {
            let mut parts = request.page_token.splitn(4, '.');
            let mut number = || parts.next().and_then(|p| p.parse::<i64>().ok());
            let (total, micros, at) = (number(), number(), number());
            match (total, micros, at, parts.next()) {
                (Some(total), Some(micros), Some(at), Some(rep)) => {
                    Some((total, micros, at, rep.to_owned()))
                }
                _ => return Err(bad_token().into()),
            }
        };
        let (client, position) =
            ready(&self.pool, SALES_PERFORMANCE, request.options, self.wait).await?;
        let tenant = caller.tenant.as_str();
        let settings = PerformanceSettings::load(&client, tenant).await?;
        let count = request.metric == "won_count";
        let currency = if count {
            String::new()
        } else if !request.currency.is_empty() {
            request.currency.clone()
        } else if !settings.reporting_currency.is_empty() {
            settings.reporting_currency.clone()
        } else {
            return Err(ServiceError::invalid(
                "currency",
                "is required while the tenant has no reporting currency",
            )
            .into());
        };
        let (start, end) = settings.bounds(&fiscal)?;
        let (start_time, end_time): (SystemTime, SystemTime) = (start.into(), end.into());
        // Each rep's figure, and when their running figure first reached it.
        let rows = client
            .query(
                "WITH credits AS ( \
                   SELECT owner, occurred_at, position, \
                     CASE WHEN $4 THEN CASE kind WHEN 'won' THEN 1 ELSE -1 END \
                          ELSE amount_minor END AS delta \
                   FROM sales_credits \
                   WHERE tenant_id = $1 AND occurred_at >= $2 AND occurred_at < $3 \
                     AND ($4 OR currency = $5) AND ($6 = '' OR $6 = ANY(teams))), \
                 running AS ( \
                   SELECT owner, occurred_at, position, \
                     sum(delta) OVER (PARTITION BY owner ORDER BY occurred_at, position \
                                      ROWS UNBOUNDED PRECEDING) AS running, \
                     sum(delta) OVER (PARTITION BY owner) AS total \
                   FROM credits), \
                 reached AS ( \
                   SELECT DISTINCT ON (owner) owner, total, occurred_at, position FROM running \
                   WHERE running >= total ORDER BY owner, occurred_at, position), \
                 ranked AS ( \
                   SELECT row_number() OVER (ORDER BY total DESC, occurred_at, position, owner) \
                     AS rank, owner, total::bigint AS total, occurred_at, position, \
                     (EXTRACT(EPOCH FROM occurred_at) * 1000000)::bigint AS micros \
                   FROM reached) \
                 SELECT rank, owner, total, occurred_at, micros, position FROM ranked \
                 WHERE NOT $7 OR total < $8 OR (total = $8 AND (micros, position, owner) > ($9, $10, $11)) \
                 ORDER BY rank LIMIT $12",
                &[
                    &tenant,
                    &start_time,
                    &end_time,
                    &count,
                    &currency,
                    &scope,
                    &after.is_some(),
                    &after.as_ref().map_or(0, |a| a.0),
                    &after.as_ref().map_or(0, |a| a.1),
                    &after.as_ref().map_or(0, |a| a.2),
                    &after.as_ref().map_or("", |a| a.3.as_str()),
                    &i64::from(size + 1),
                ],
            )
            .await
            .map_err(unavailable)?;
        let (rows, next_page_token) = page(&rows, size, |last| {
            format!(
                "{}.{}.{}.{}",
                last.get::<_, i64>(2),
                last.get::<_, i64>(4),
                last.get::<_, i64>(5),
                last.get::<_, &str>(1)
            )
        });
        let entries = rows
            .iter()
            .map(|row| LeaderboardEntry {
                rank: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
                rep: row.get(1),
                value: row.get(2),
                reached_at: rfc3339(row.get(3)),
            })
            .collect();
        Ok(Response::new(Leaderboard {
            period_start: start.to_string(),
            period_end: end.to_string(),
            entries,
            next_page_token,
            position,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(stage: &str, currency: &str, deal_count: u64) -> StageColumn {
        StageColumn {
            stage: stage.into(),
            currency: currency.into(),
            deal_count,
            ..StageColumn::default()
        }
    }

    #[test]
    fn a_board_follows_the_stage_order_and_keeps_dropped_stages_last() {
        let open = ["lead", "proposal", "closing"].map(str::to_owned);
        // As the query orders them: by stage code, then currency.
        let mut columns = vec![
            column("closing", "EUR", 1),
            column("closing", "USD", 2),
            column("demo", "EUR", 3),
            column("lead", "EUR", 4),
        ];
        let board: Vec<(String, String, u64)> = board_order(&open, &mut columns)
            .into_iter()
            .map(|c| (c.stage, c.currency, c.deal_count))
            .collect();
        let expected = [
            ("lead", "EUR", 4),
            ("proposal", "", 0),
            ("closing", "EUR", 1),
            ("closing", "USD", 2),
            ("demo", "EUR", 3),
        ]
        .map(|(s, c, n)| (s.to_owned(), c.to_owned(), n));
        assert_eq!(board, expected);
    }
}
