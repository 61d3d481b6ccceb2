//! `crm.v1.ServiceQueries`: the service read models.
use std::time::Duration;

use crm_domain::sla::SlaMetric;
use crm_projections::{SERVICE_QUEUE, SLA_CLOCK};
use crm_proto::v1::service_queries_server::ServiceQueries;
use crm_proto::v1::{
    AgingBucket, AtRiskClock, BacklogAging, GetBacklogAgingRequest, GetQueueStatsRequest,
    GetSlaComplianceRequest, GetTicketSlaRequest, ListAtRiskReply, ListAtRiskRequest,
    ListQueueReply, ListQueueRequest, MetricCompliance, QueueStats, QueueStatsRow, QueuedTicket,
    SlaClock, SlaCompliance, TicketSla,
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

fn page_size(requested: u32) -> Result<u32, ServiceError> {
    match requested {
        0 => Ok(DEFAULT_PAGE),
        n if n <= MAX_PAGE => Ok(n),
        _ => Err(ServiceError::invalid("page_size", "must be 0 to 200")),
    }
}

/// The first `size` of `rows` (fetched with one extra) and the token of the
/// next page (empty on the last), made from the page's last row.
fn page(
    rows: &[tokio_postgres::Row],
    size: u32,
    token: impl Fn(&tokio_postgres::Row) -> String,
) -> (&[tokio_postgres::Row], String) {
    let more = rows.len() > size as usize;
    let rows = &rows[..rows.len().min(size as usize)];
    let next = match (more, rows.last()) {
        (true, Some(last)) => token(last),
        _ => String::new(),
    };
    (rows, next)
}

/// The three dot-separated parts of a page token this server gave.
fn token_parts(token: &str) -> Result<Option<[&str; 3]>, ServiceError> {
    if token.is_empty() {
        return Ok(None);
    }
    let mut parts = token.splitn(3, '.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), Some(c)) => Ok(Some([a, b, c])),
        _ => Err(bad_token()),
    }
}

fn bad_token() -> ServiceError {
    ServiceError::invalid("page_token", "is not a token this server gave")
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
    let Some([rank, micros, id]) = token_parts(token)? else {
        return Ok(None);
    };
    match (rank.parse(), micros.parse(), Uuid::parse_str(id)) {
        (Ok(rank), Ok(micros), Ok(id)) => Ok(Some((rank, micros, id))),
        _ => Err(bad_token()),
    }
}

fn rfc3339(time: std::time::SystemTime) -> String {
    jiff::Timestamp::try_from(time)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Columns of `sla_clock` a [`SlaClock`] is made of, after the ticket id.
const CLOCK_COLUMNS: &str = "ticket_id, metric, state, target_minutes, start_at, due, warn_at, \
    paused_since, elapsed_seconds, warned, breached, breached_at, met_at, policy_id, \
    policy_version";

fn clock(row: &tokio_postgres::Row) -> SlaClock {
    let time = |i: usize| {
        row.get::<_, Option<std::time::SystemTime>>(i)
            .map(rfc3339)
            .unwrap_or_default()
    };
    SlaClock {
        metric: row.get(1),
        state: row.get(2),
        target_minutes: u32::try_from(row.get::<_, i32>(3)).unwrap_or(0),
        start: time(4),
        due: time(5),
        warn_at: time(6),
        paused_since: time(7),
        elapsed_minutes: row.get::<_, i64>(8) / 60,
        warned: row.get(9),
        breached: row.get(10),
        breached_at: time(11),
        met_at: time(12),
        policy_id: row.get::<_, Uuid>(13).to_string(),
        policy_version: u32::try_from(row.get::<_, i32>(14)).unwrap_or(0),
    }
}

fn instant(field: &'static str, text: &str) -> Result<jiff::Timestamp, ServiceError> {
    text.parse::<jiff::Timestamp>()
        .map_err(|_| ServiceError::invalid(field, "must be an RFC 3339 instant"))
}

/// The keyset a page of at-risk clocks starts after: (due in microseconds,
/// ticket id, metric), written as `micros.uuid.metric`.
fn parse_risk_token(token: &str) -> Result<Option<(i64, Uuid, String)>, ServiceError> {
    let Some([micros, id, metric]) = token_parts(token)? else {
        return Ok(None);
    };
    match (
        micros.parse(),
        Uuid::parse_str(id),
        SlaMetric::parse(metric),
    ) {
        (Ok(micros), Ok(id), Some(_)) => Ok(Some((micros, id, metric.to_owned()))),
        _ => Err(bad_token()),
    }
}

#[tonic::async_trait]
impl ServiceQueries for ServiceQueriesService {
    async fn get_ticket_sla(
        &self,
        request: Request<GetTicketSlaRequest>,
    ) -> Result<Response<TicketSla>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let ticket_id = Uuid::parse_str(&request.ticket_id)
            .map_err(|_| ServiceError::invalid("ticket_id", "must be a UUID"))?;
        let (client, position) = ready(&self.pool, SLA_CLOCK, request.options, self.wait).await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {CLOCK_COLUMNS} FROM sla_clock WHERE tenant_id = $1 AND ticket_id = $2 \
                     ORDER BY CASE metric WHEN 'first_response' THEN 0 \
                       WHEN 'next_response' THEN 1 ELSE 2 END"
                ),
                &[&caller.tenant.as_str(), &ticket_id],
            )
            .await
            .map_err(unavailable)?;
        if rows.is_empty() {
            return Err(Status::not_found(format!(
                "no SLA clocks for ticket {ticket_id}"
            )));
        }
        Ok(Response::new(TicketSla {
            ticket_id: ticket_id.to_string(),
            clocks: rows.iter().map(clock).collect(),
            position,
        }))
    }

    async fn list_at_risk(
        &self,
        request: Request<ListAtRiskRequest>,
    ) -> Result<Response<ListAtRiskReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let due_before = if request.due_before.is_empty() {
            jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24)
        } else {
            instant("due_before", &request.due_before)?
        };
        if !request.metric.is_empty() && SlaMetric::parse(&request.metric).is_none() {
            return Err(ServiceError::invalid(
                "metric",
                "must be first_response, next_response or resolution",
            )
            .into());
        }
        let size = page_size(request.page_size)?;
        let after = parse_risk_token(&request.page_token)?;
        let (client, position) = ready(&self.pool, SLA_CLOCK, request.options, self.wait).await?;
        let (micros, id, metric) = after.unwrap_or((i64::MIN, Uuid::nil(), String::new()));
        let due_before: std::time::SystemTime = due_before.into();
        let rows = client
            .query(
                &format!(
                    "SELECT {CLOCK_COLUMNS}, (EXTRACT(EPOCH FROM due) * 1000000)::bigint \
                     FROM sla_clock WHERE tenant_id = $1 AND state = 'running' AND due < $2 \
                       AND ($3 = '' OR metric = $3) \
                       AND ((EXTRACT(EPOCH FROM due) * 1000000)::bigint, ticket_id, metric) \
                           > ($4, $5, $6) \
                     ORDER BY due, ticket_id, metric LIMIT $7"
                ),
                &[
                    &caller.tenant.as_str(),
                    &due_before,
                    &request.metric,
                    &micros,
                    &id,
                    &metric,
                    &i64::from(size + 1),
                ],
            )
            .await
            .map_err(unavailable)?;
        let (rows, next_page_token) = page(&rows, size, |last| {
            format!(
                "{}.{}.{}",
                last.get::<_, i64>(15),
                last.get::<_, Uuid>(0),
                last.get::<_, String>(1)
            )
        });
        Ok(Response::new(ListAtRiskReply {
            clocks: rows
                .iter()
                .map(|row| AtRiskClock {
                    ticket_id: row.get::<_, Uuid>(0).to_string(),
                    clock: Some(clock(row)),
                })
                .collect(),
            next_page_token,
            position,
        }))
    }

    async fn get_sla_compliance(
        &self,
        request: Request<GetSlaComplianceRequest>,
    ) -> Result<Response<SlaCompliance>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let from = instant("from", &request.from)?;
        let to = instant("to", &request.to)?;
        if to <= from || to.duration_since(from) > jiff::SignedDuration::from_hours(24 * 3660) {
            return Err(ServiceError::invalid("to", "must be after from, at most 10 years").into());
        }
        let (client, position) = ready(&self.pool, SLA_CLOCK, request.options, self.wait).await?;
        let (from, to): (std::time::SystemTime, std::time::SystemTime) = (from.into(), to.into());
        let rows = client
            .query(
                "SELECT metric, \
                   count(*) FILTER (WHERE state = 'met' AND NOT breached \
                                      AND met_at >= $2 AND met_at < $3), \
                   count(*) FILTER (WHERE breached AND breached_at >= $2 AND breached_at < $3) \
                 FROM sla_clock WHERE tenant_id = $1 GROUP BY metric",
                &[&caller.tenant.as_str(), &from, &to],
            )
            .await
            .map_err(unavailable)?;
        let metrics = SlaMetric::ALL
            .iter()
            .map(|metric| {
                let row = rows.iter().find(|r| r.get::<_, &str>(0) == metric.name());
                let count = |i| row.map_or(0, |r| u64::try_from(r.get::<_, i64>(i)).unwrap_or(0));
                let (met_on_time, breached) = (count(1), count(2));
                let total = met_on_time + breached;
                MetricCompliance {
                    metric: metric.name().to_owned(),
                    met_on_time,
                    breached,
                    compliance_bp: (total > 0)
                        .then(|| u32::try_from(met_on_time * 10_000 / total).unwrap_or(0)),
                }
            })
            .collect();
        Ok(Response::new(SlaCompliance { metrics, position }))
    }

    async fn list_queue(
        &self,
        request: Request<ListQueueRequest>,
    ) -> Result<Response<ListQueueReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        bounded("queue", &request.queue)?;
        bounded("assignee", &request.assignee)?;
        let size = page_size(request.page_size)?;
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
        let (rows, next_page_token) = page(&rows, size, |last| {
            format!(
                "{}.{}.{}",
                last.get::<_, i16>(9),
                last.get::<_, i64>(10),
                last.get::<_, Uuid>(0)
            )
        });
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
