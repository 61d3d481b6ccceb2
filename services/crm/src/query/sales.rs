//! `crm.v1.SalesQueries`: the sales read models.
use std::time::Duration;

use crm_projections::PIPELINE_BOARD;
use crm_proto::v1::sales_queries_server::SalesQueries;
use crm_proto::v1::{
    Forecast, ForecastAmounts, ForecastByCurrency, GetForecastRequest, GetPipelineBoardRequest,
    GetWinRateRequest, PipelineBoard, StageColumn, WinRate, WinRateByValue,
};
use deadpool_postgres::Pool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::ready;
use crate::command::{Caller, ServiceError};

#[derive(Clone)]
pub struct SalesService {
    pool: Pool,
    wait: Duration,
}

impl SalesService {
    /// `wait`: the longest a query waits for its `min_position`.
    pub fn new(pool: Pool, wait: Duration) -> Self {
        Self { pool, wait }
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
        let rows = client
            .query(
                "SELECT stage, COALESCE(currency, ''), count(*), \
                   COALESCE(sum(amount_minor), 0)::bigint, COALESCE(sum(weighted_minor), 0)::bigint \
                 FROM pipeline_board \
                 WHERE tenant_id = $1 AND pipeline_id = $2 AND outcome = 'open' AND NOT archived \
                   AND ($3 = '' OR owner = $3) \
                 GROUP BY 1, 2 ORDER BY 1, 2",
                &[&caller.tenant.as_str(), &pipeline_id, &request.owner],
            )
            .await
            .map_err(|e| Status::unavailable(format!("read models: {e}")))?;
        let stages = rows
            .iter()
            .map(|row| StageColumn {
                stage: row.get(0),
                currency: row.get(1),
                deal_count: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
                amount_minor: row.get(3),
                weighted_minor: row.get(4),
            })
            .collect();
        Ok(Response::new(PipelineBoard { stages, position }))
    }

    async fn get_win_rate(
        &self,
        request: Request<GetWinRateRequest>,
    ) -> Result<Response<WinRate>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let instant = |field: &'static str, text: &str| {
            text.parse::<jiff::Timestamp>()
                .map_err(|_| ServiceError::invalid(field, "must be an RFC 3339 instant"))
        };
        let from = instant("from", &request.from)?;
        let to = instant("to", &request.to)?;
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
            .map_err(|e| Status::unavailable(format!("read models: {e}")))?;
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
        let date = |field: &'static str, text: &str| {
            text.parse::<jiff::civil::Date>()
                .map_err(|_| ServiceError::invalid(field, "must be a date, YYYY-MM-DD"))
        };
        let from = date("from_date", &request.from_date)?;
        let to = date("to_date", &request.to_date)?;
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
            .map_err(|e| Status::unavailable(format!("read models: {e}")))?;
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
                level.amount_minor += amount;
                level.weighted_minor += weighted;
            }
        }
        Ok(Response::new(Forecast {
            currencies,
            position,
        }))
    }
}
