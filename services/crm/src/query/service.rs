//! `crm.v1.ServiceQueries`: the service read models.
use std::time::Duration;

use crm_projections::SERVICE_QUEUE;
use crm_proto::v1::service_queries_server::ServiceQueries;
use crm_proto::v1::{
    AgingBucket, BacklogAging, GetBacklogAgingRequest, GetQueueStatsRequest, ListQueueReply,
    ListQueueRequest, QueueStats, QueueStatsRow, QueuedTicket,
};
use deadpool_postgres::Pool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::ready;
use crate::command::{Caller, ServiceError};

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 200;

#[derive(Clone)]
pub struct ServiceQueriesService {
    pool: Pool,
    wait: Duration,
}

impl ServiceQueriesService {
    pub fn new(pool: Pool, wait: Duration) -> Self {
        Self { pool, wait }
    }
}

fn unavailable(error: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("read models: {error}"))
}

fn bounded(field: &'static str, value: &str) -> Result<(), ServiceError> {
    if value.len() > 200 {
        return Err(ServiceError::invalid(
            field,
            "must be at most 200 characters",
        ));
    }
    Ok(())
}

/// The keyset a page starts after: (priority rank, opened at in
/// microseconds, ticket id), written as `rank.micros.uuid`.
fn parse_token(token: &str) -> Result<Option<(i16, i64, Uuid)>, ServiceError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || ServiceError::invalid("page_token", "is not a token this server gave");
    let mut parts = token.splitn(3, '.');
    let rank = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let micros = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let id = parts
        .next()
        .and_then(|p| Uuid::parse_str(p).ok())
        .ok_or_else(bad)?;
    Ok(Some((rank, micros, id)))
}

fn rfc3339(time: std::time::SystemTime) -> String {
    jiff::Timestamp::try_from(time)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

#[tonic::async_trait]
impl ServiceQueries for ServiceQueriesService {
    async fn list_queue(
        &self,
        request: Request<ListQueueRequest>,
    ) -> Result<Response<ListQueueReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        bounded("queue", &request.queue)?;
        bounded("assignee", &request.assignee)?;
        let size = match request.page_size {
            0 => DEFAULT_PAGE,
            n if n <= MAX_PAGE => n,
            _ => return Err(ServiceError::invalid("page_size", "must be 0 to 200").into()),
        };
        let after = parse_token(&request.page_token)?;
        let (client, position) =
            ready(&self.pool, SERVICE_QUEUE, request.options, self.wait).await?;
        let (rank, micros, id) = after.unwrap_or((-1, i64::MIN, Uuid::nil()));
        let rows = client
            .query(
                "SELECT ticket_id, queue, status, priority, ticket_type, complaint, assignee, \
                   opened_at, escalation_level, priority_rank, \
                   (EXTRACT(EPOCH FROM opened_at) * 1000000)::bigint \
                 FROM service_queue \
                 WHERE tenant_id = $1 AND status NOT IN ('solved', 'closed') \
                   AND ($2 = '' OR queue = $2) AND ($3 = '' OR assignee = $3) \
                   AND (priority_rank, (EXTRACT(EPOCH FROM opened_at) * 1000000)::bigint, ticket_id) \
                       > ($4, $5, $6) \
                 ORDER BY priority_rank, opened_at, ticket_id LIMIT $7",
                &[
                    &caller.tenant.as_str(),
                    &request.queue,
                    &request.assignee,
                    &rank,
                    &micros,
                    &id,
                    &i64::from(size + 1),
                ],
            )
            .await
            .map_err(unavailable)?;
        let more = rows.len() > size as usize;
        let rows = &rows[..rows.len().min(size as usize)];
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => format!(
                "{}.{}.{}",
                last.get::<_, i16>(9),
                last.get::<_, i64>(10),
                last.get::<_, Uuid>(0)
            ),
            _ => String::new(),
        };
        let tickets = rows
            .iter()
            .map(|row| QueuedTicket {
                ticket_id: row.get::<_, Uuid>(0).to_string(),
                queue: row.get(1),
                status: row.get(2),
                priority: row.get(3),
                ticket_type: row.get(4),
                complaint: row.get(5),
                assignee: row.get(6),
                opened_at: rfc3339(row.get(7)),
                escalation_level: u32::try_from(row.get::<_, i16>(8)).unwrap_or(0),
            })
            .collect();
        Ok(Response::new(ListQueueReply {
            tickets,
            next_page_token,
            position,
        }))
    }

    async fn get_queue_stats(
        &self,
        request: Request<GetQueueStatsRequest>,
    ) -> Result<Response<QueueStats>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let (client, position) =
            ready(&self.pool, SERVICE_QUEUE, request.options, self.wait).await?;
        let rows = client
            .query(
                "SELECT queue, priority, assignee, count(*) FROM service_queue \
                 WHERE tenant_id = $1 AND status NOT IN ('solved', 'closed') \
                 GROUP BY queue, priority, priority_rank, assignee \
                 ORDER BY queue, priority_rank, assignee",
                &[&caller.tenant.as_str()],
            )
            .await
            .map_err(unavailable)?;
        Ok(Response::new(QueueStats {
            rows: rows
                .iter()
                .map(|row| QueueStatsRow {
                    queue: row.get(0),
                    priority: row.get(1),
                    assignee: row.get(2),
                    open_tickets: u64::try_from(row.get::<_, i64>(3)).unwrap_or(0),
                })
                .collect(),
            position,
        }))
    }

    async fn get_backlog_aging(
        &self,
        request: Request<GetBacklogAgingRequest>,
    ) -> Result<Response<BacklogAging>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        bounded("queue", &request.queue)?;
        let (client, position) =
            ready(&self.pool, SERVICE_QUEUE, request.options, self.wait).await?;
        let row = client
            .query_one(
                "SELECT \
                   count(*) FILTER (WHERE age < interval '1 day'), \
                   count(*) FILTER (WHERE age >= interval '1 day' AND age < interval '3 days'), \
                   count(*) FILTER (WHERE age >= interval '3 days' AND age < interval '7 days'), \
                   count(*) FILTER (WHERE age >= interval '7 days') \
                 FROM (SELECT now() - opened_at AS age FROM service_queue \
                       WHERE tenant_id = $1 AND status NOT IN ('solved', 'closed') \
                         AND ($2 = '' OR queue = $2)) open",
                &[&caller.tenant.as_str(), &request.queue],
            )
            .await
            .map_err(unavailable)?;
        let buckets = ["0-1d", "1-3d", "3-7d", "7d+"]
            .iter()
            .enumerate()
            .map(|(i, age)| AgingBucket {
                age: (*age).to_owned(),
                open_tickets: u64::try_from(row.get::<_, i64>(i)).unwrap_or(0),
            })
            .collect();
        Ok(Response::new(BacklogAging { buckets, position }))
    }
}
