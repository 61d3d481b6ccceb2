//! `crm.v1.ServiceQueries`: the service read models.
use std::time::Duration;

use crm_domain::sla::SlaMetric;
use crm_projections::{AGENT_WORKLOAD, SERVICE_METRICS, SERVICE_QUEUE, SLA_CLOCK};
use crm_proto::v1::service_queries_server::ServiceQueries;
use crm_proto::v1::{
    AgentLoad, AgentLoadRow, AgingBucket, AtRiskClock, BacklogAging, ChannelLoad, ComplaintGroup,
    ComplaintStats, CsatGroup, CsatReport, DurationStats, GetAgentLoadRequest,
    GetBacklogAgingRequest, GetComplaintStatsRequest, GetCsatRequest, GetQueueStatsRequest,
    GetServiceMetricsRequest, GetSlaComplianceRequest, GetTicketSlaRequest, ListAtRiskReply,
    ListAtRiskRequest, ListQueueReply, ListQueueRequest, MetricCompliance, QueueStats,
    QueueStatsRow, QueuedTicket, ServiceMetrics, SlaClock, SlaCompliance, TicketSla,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{bad_token, bounded, count, page, page_size, ready, token_parts, unavailable};
use crate::command::{Caller, ServiceError};

#[derive(Clone)]
pub struct ServiceQueriesService {
    pool: super::ReadModels,
    wait: Duration,
}

impl ServiceQueriesService {
    pub fn new(pool: super::ReadModels, wait: Duration) -> Self {
        Self { pool, wait }
    }
}

/// Rows GetQueueStats answers at most (queue × priority × assignee).
const MAX_QUEUE_STATS_ROWS: i64 = 10_000;

fn rfc3339(time: std::time::SystemTime) -> String {
    jiff::Timestamp::try_from(time)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Columns of `sla_clock` a [`SlaClock`] is made of, after the ticket id.
pub(super) const CLOCK_COLUMNS: &str = "ticket_id, metric, state, target_minutes, start_at, due, warn_at, \
    paused_since, elapsed_seconds, warned, breached, breached_at, met_at, policy_id, \
    policy_version";

pub(super) fn clock(row: &tokio_postgres::Row) -> SlaClock {
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

use super::instant;

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

/// `[from, to)` of a period: RFC 3339 instants, `from` < `to`, at most 10
/// years apart.
fn period(
    from: &str,
    to: &str,
) -> Result<(std::time::SystemTime, std::time::SystemTime), ServiceError> {
    let from = instant("from", from)?;
    let to = instant("to", to)?;
    if to <= from || to.duration_since(from) > jiff::SignedDuration::from_hours(24 * 3660) {
        return Err(ServiceError::invalid(
            "to",
            "must be after from, at most 10 years",
        ));
    }
    Ok((from.into(), to.into()))
}

/// An optional queue filter: empty, or a queue's UUID (as tickets name it).
fn queue_filter(queue_id: &str) -> Result<String, ServiceError> {
    if queue_id.is_empty() {
        return Ok(String::new());
    }
    Uuid::parse_str(queue_id)
        .map(|id| id.to_string())
        .map_err(|_| ServiceError::invalid("queue_id", "must be a UUID"))
}

/// The agent a page of agents starts after, written as its hex bytes.
fn agent_token(agent: &str) -> String {
    agent.bytes().map(|b| format!("{b:02x}")).collect()
}

fn parse_agent_token(token: &str) -> Result<String, ServiceError> {
    if !token.len().is_multiple_of(2) || token.len() > 400 {
        return Err(bad_token());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2).unwrap_or("-"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| bad_token())?;
    String::from_utf8(bytes).map_err(|_| bad_token())
}

fn minutes(row: &tokio_postgres::Row, i: usize) -> Option<u64> {
    row.get::<_, Option<i64>>(i)
        .map(|m| u64::try_from(m).unwrap_or(0))
}

/// `part` × 10000 ÷ `whole`, rounded down; `None` when `whole` is 0.
fn basis_points(part: u64, whole: u64) -> Option<u32> {
    (whole > 0).then(|| u32::try_from(part * 10_000 / whole).unwrap_or(u32::MAX))
}

/// SQL of [`DurationStats`] over a column of seconds: count, then median,
/// mean and p90 in whole minutes (rounded, halves up).
fn duration_sql(column: &str) -> String {
    format!(
        "count({column}), \
         round((percentile_cont(0.5) WITHIN GROUP (ORDER BY {column}))::numeric / 60)::bigint, \
         round(avg({column}) / 60)::bigint, \
         round((percentile_cont(0.9) WITHIN GROUP (ORDER BY {column}))::numeric / 60)::bigint"
    )
}

fn duration_stats(row: &tokio_postgres::Row, first: usize) -> DurationStats {
    DurationStats {
        count: count(row, first),
        median_minutes: minutes(row, first + 1),
        mean_minutes: minutes(row, first + 2),
        p90_minutes: minutes(row, first + 3),
    }
}

fn csat_group(key: String, ratings: u64, satisfied: u64) -> CsatGroup {
    CsatGroup {
        key,
        ratings,
        satisfied,
        csat_bp: basis_points(satisfied, ratings),
    }
}

fn complaint_group(row: &tokio_postgres::Row) -> ComplaintGroup {
    ComplaintGroup {
        key: row.get(0),
        complaints: count(row, 1),
        solved: count(row, 2),
        mean_resolution_minutes: minutes(row, 3),
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
        // rank.due.opened.ticket (µs), as the order below.
        let after: Option<(i16, i64, i64, Uuid)> = if request.page_token.is_empty() {
            None
        } else {
            let mut parts = request.page_token.splitn(4, '.');
            let (rank, due, opened, id) = (parts.next(), parts.next(), parts.next(), parts.next());
            match (
                rank.and_then(|p| p.parse().ok()),
                due.and_then(|p| p.parse().ok()),
                opened.and_then(|p| p.parse().ok()),
                id.and_then(|p| Uuid::parse_str(p).ok()),
            ) {
                (Some(rank), Some(due), Some(opened), Some(id)) => Some((rank, due, opened, id)),
                _ => return Err(bad_token().into()),
            }
        };
        // Ordered as DOMAIN.md §5.2 says, by priority then due: the
        // earliest due of the ticket's running SLA clocks (the `sla_clock`
        // read model), tickets without one last; then the oldest first. The
        // list waits only for its own read model: the clocks order it as far
        // as they have been applied (a stopped SLA projection does not stop
        // the queue).
        let (client, position) =
            ready(&self.pool, SERVICE_QUEUE, request.options, self.wait).await?;
        let (rank, due, opened, id) = after.unwrap_or((-1, i64::MIN, i64::MIN, Uuid::nil()));
        let rows = client
            .query(
                "SELECT * FROM ( \
                   SELECT q.ticket_id, q.queue, q.status, q.priority, q.ticket_type, q.complaint, \
                     q.assignee, q.opened_at, q.escalation_level, q.priority_rank, \
                     COALESCE((EXTRACT(EPOCH FROM d.due) * 1000000)::bigint, \
                              9223372036854775807) AS due_micros, \
                     d.due, COALESCE(d.breached, false), \
                     (EXTRACT(EPOCH FROM q.opened_at) * 1000000)::bigint AS opened_micros \
                   FROM service_queue q LEFT JOIN LATERAL ( \
                     SELECT min(c.due) AS due, bool_or(c.breached) AS breached FROM sla_clock c \
                     WHERE c.tenant_id = q.tenant_id AND c.ticket_id = q.ticket_id \
                       AND c.state = 'running') d ON true \
                   WHERE q.tenant_id = $1 AND q.status NOT IN ('solved', 'closed') \
                     AND ($2 = '' OR q.queue = $2) AND ($3 = '' OR q.assignee = $3)) t \
                 WHERE (priority_rank, due_micros, opened_micros, ticket_id) > ($4, $5, $6, $7) \
                 ORDER BY priority_rank, due_micros, opened_micros, ticket_id LIMIT $8",
                &[
                    &caller.tenant.as_str(),
                    &request.queue,
                    &request.assignee,
                    &rank,
                    &due,
                    &opened,
                    &id,
                    &i64::from(size + 1),
                ],
            )
            .await
            .map_err(unavailable)?;
        let (rows, next_page_token) = page(&rows, size, |last| {
            format!(
                "{}.{}.{}.{}",
                last.get::<_, i16>(9),
                last.get::<_, i64>(10),
                last.get::<_, i64>(13),
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
                next_due: row
                    .get::<_, Option<std::time::SystemTime>>(11)
                    .map(rfc3339)
                    .unwrap_or_default(),
                sla_breached: row.get(12),
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
        bounded("queue", &request.queue)?;
        let (client, position) =
            ready(&self.pool, SERVICE_QUEUE, request.options, self.wait).await?;
        let rows = client
            .query(
                "SELECT queue, priority, assignee, count(*) FROM service_queue \
                 WHERE tenant_id = $1 AND status NOT IN ('solved', 'closed') \
                   AND ($2 = '' OR queue = $2) \
                 GROUP BY queue, priority, priority_rank, assignee \
                 ORDER BY queue, priority_rank, assignee LIMIT $3",
                &[
                    &caller.tenant.as_str(),
                    &request.queue,
                    &(MAX_QUEUE_STATS_ROWS + 1),
                ],
            )
            .await
            .map_err(unavailable)?;
        let truncated = rows.len() as i64 > MAX_QUEUE_STATS_ROWS;
        Ok(Response::new(QueueStats {
            truncated,
            rows: rows
                .iter()
                .take(MAX_QUEUE_STATS_ROWS as usize)
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

    async fn get_agent_load(
        &self,
        request: Request<GetAgentLoadRequest>,
    ) -> Result<Response<AgentLoad>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let queue = queue_filter(&request.queue_id)?;
        let size = page_size(request.page_size)?;
        let after = parse_agent_token(&request.page_token)?;
        let (client, position) =
            ready(&self.pool, AGENT_WORKLOAD, request.options, self.wait).await?;
        let tenant = caller.tenant.as_str();
        let rows = client
            .query(
                "SELECT a.agent, a.status, a.capacity, a.skills, a.last_assigned_at \
                 FROM agent_workload a \
                 WHERE a.tenant_id = $1 AND a.agent > $2 \
                   AND ($3 = '' OR EXISTS (SELECT 1 FROM agent_workload_members m \
                        WHERE m.tenant_id = a.tenant_id AND m.queue_id = $3 \
                          AND m.agent = a.agent)) \
                 ORDER BY a.agent LIMIT $4",
                &[&tenant, &after, &queue, &i64::from(size + 1)],
            )
            .await
            .map_err(unavailable)?;
        let (rows, next_page_token) = page(&rows, size, |last| agent_token(last.get(0)));
        let agents: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        let open = client
            .query(
                "SELECT assignee, channel, count(*) FROM agent_workload_tickets \
                 WHERE tenant_id = $1 AND open AND assignee = ANY($2) \
                 GROUP BY assignee, channel ORDER BY assignee, channel",
                &[&tenant, &agents],
            )
            .await
            .map_err(unavailable)?;
        let agents = rows
            .iter()
            .map(|row| {
                let agent: String = row.get(0);
                let open_per_channel: Vec<ChannelLoad> = open
                    .iter()
                    .filter(|o| o.get::<_, &str>(0) == agent)
                    .map(|o| ChannelLoad {
                        channel: o.get(1),
                        open_tickets: u32::try_from(count(o, 2)).unwrap_or(u32::MAX),
                    })
                    .collect();
                let open_tickets: u32 = open_per_channel.iter().map(|c| c.open_tickets).sum();
                let capacity = u32::try_from(row.get::<_, i32>(2)).unwrap_or(0);
                AgentLoadRow {
                    agent,
                    status: row.get(1),
                    capacity,
                    skills: row.get(3),
                    open_tickets,
                    open_per_channel,
                    load_bp: basis_points(u64::from(open_tickets), u64::from(capacity)),
                    last_assigned_at: row
                        .get::<_, Option<std::time::SystemTime>>(4)
                        .map(rfc3339)
                        .unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(AgentLoad {
            agents,
            next_page_token,
            position,
        }))
    }

    async fn get_service_metrics(
        &self,
        request: Request<GetServiceMetricsRequest>,
    ) -> Result<Response<ServiceMetrics>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let (from, to) = period(&request.from, &request.to)?;
        let by_solved = match request.basis.as_str() {
            "" | "opened" => false,
            "solved" => true,
            _ => return Err(ServiceError::invalid("basis", "must be opened or solved").into()),
        };
        let queue = queue_filter(&request.queue_id)?;
        bounded("agent", &request.agent)?;
        let (client, position) =
            ready(&self.pool, SERVICE_METRICS, request.options, self.wait).await?;
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), {}, {}, \
                       count(*) FILTER (WHERE reopen_count > 0), \
                       count(*) FILTER (WHERE solved_at IS NOT NULL OR reopen_count > 0) \
                     FROM service_metrics \
                     WHERE tenant_id = $1 \
                       AND CASE WHEN $4 THEN solved_at >= $2 AND solved_at < $3 \
                                ELSE opened_at >= $2 AND opened_at < $3 END \
                       AND ($5 = '' OR queue = $5) AND ($6 = '' OR agent = $6)",
                    duration_sql("first_response_seconds"),
                    duration_sql("resolution_seconds"),
                ),
                &[
                    &caller.tenant.as_str(),
                    &from,
                    &to,
                    &by_solved,
                    &queue,
                    &request.agent,
                ],
            )
            .await
            .map_err(unavailable)?;
        let (reopened, ever_solved) = (count(&row, 9), count(&row, 10));
        Ok(Response::new(ServiceMetrics {
            tickets: count(&row, 0),
            first_response: Some(duration_stats(&row, 1)),
            resolution: Some(duration_stats(&row, 5)),
            reopened,
            ever_solved,
            reopen_rate_bp: basis_points(reopened, ever_solved),
            position,
        }))
    }

    async fn get_csat(
        &self,
        request: Request<GetCsatRequest>,
    ) -> Result<Response<CsatReport>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let (from, to) = period(&request.from, &request.to)?;
        let (client, position) =
            ready(&self.pool, SERVICE_METRICS, request.options, self.wait).await?;
        let groups = |column: &'static str| {
            let client = &client;
            let tenant = caller.tenant.as_str();
            async move {
                let rows = client
                    .query(
                        &format!(
                            "SELECT {column}, count(*), count(*) FILTER (WHERE csat_score >= 4) \
                             FROM service_metrics \
                             WHERE tenant_id = $1 AND csat_at >= $2 AND csat_at < $3 \
                             GROUP BY {column} ORDER BY {column}"
                        ),
                        &[&tenant, &from, &to],
                    )
                    .await
                    .map_err(unavailable)?;
                Ok::<_, Status>(
                    rows.iter()
                        .map(|row| csat_group(row.get(0), count(row, 1), count(row, 2)))
                        .collect::<Vec<_>>(),
                )
            }
        };
        let per_agent = groups("csat_agent").await?;
        let per_queue = groups("csat_queue").await?;
        let ratings = per_agent.iter().map(|g| g.ratings).sum();
        let satisfied = per_agent.iter().map(|g| g.satisfied).sum();
        Ok(Response::new(CsatReport {
            overall: Some(csat_group(String::new(), ratings, satisfied)),
            per_agent,
            per_queue,
            position,
        }))
    }

    async fn get_complaint_stats(
        &self,
        request: Request<GetComplaintStatsRequest>,
    ) -> Result<Response<ComplaintStats>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let (from, to) = period(&request.from, &request.to)?;
        let (client, position) =
            ready(&self.pool, SERVICE_METRICS, request.options, self.wait).await?;
        let groups = |column: &'static str| {
            let client = &client;
            let tenant = caller.tenant.as_str();
            async move {
                let rows = client
                    .query(
                        &format!(
                            "SELECT {column}, count(*), count(resolution_seconds), \
                               round(avg(resolution_seconds) / 60)::bigint \
                             FROM service_metrics \
                             WHERE tenant_id = $1 AND complaint \
                               AND opened_at >= $2 AND opened_at < $3 \
                             GROUP BY {column} ORDER BY {column}"
                        ),
                        &[&tenant, &from, &to],
                    )
                    .await
                    .map_err(unavailable)?;
                Ok::<_, Status>(rows.iter().map(complaint_group).collect::<Vec<_>>())
            }
        };
        let per_category = groups("category").await?;
        let per_root_cause = groups("root_cause").await?;
        Ok(Response::new(ComplaintStats {
            complaints: per_category.iter().map(|g| g.complaints).sum(),
            per_category,
            per_root_cause,
            position,
        }))
    }
}
