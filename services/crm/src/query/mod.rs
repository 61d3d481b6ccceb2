//! The query role: read-side gRPC services: the event log (`Subscribe`,
//! `ReadAll`, `ReadStream`) and the read-model queries (`SalesQueries`; more
//! as the projections land).
mod admin;
mod analytics;
mod customer360;
mod event_log;
mod personal_reader;
mod quality;
mod sales;
mod service;

pub use admin::ProjectionsAdminService;
pub use analytics::AnalyticsService;
pub use customer360::Customer360Service;
pub use event_log::EventLogService;
pub use quality::DataQualityService;
pub use sales::SalesService;
pub use service::ServiceQueriesService;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crm_proto::v1::QueryOptions;

use crate::command::ServiceError;

/// Page size when a request names none, and the largest allowed.
pub(crate) const DEFAULT_PAGE: u32 = 50;
pub(crate) const MAX_PAGE: u32 = 200;
use deadpool_postgres::Pool;
use tonic::Status;

/// Where the read models are: their database, and (when the projectors run
/// in this process, as in `crm all`) each projection's applied position as
/// it moves, so a query waiting for `min_position` wakes the moment it is
/// applied instead of polling.
#[derive(Clone)]
pub struct ReadModels {
    pool: Pool,
    positions: Option<Arc<HashMap<&'static str, crm_projections::Applied>>>,
}

impl ReadModels {
    /// Read models maintained elsewhere: waits poll their status rows.
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            positions: None,
        }
    }

    /// Read models whose projectors run in this process.
    pub fn with_positions(
        pool: Pool,
        positions: HashMap<&'static str, crm_projections::Applied>,
    ) -> Self {
        Self {
            pool,
            positions: Some(Arc::new(positions)),
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }
}

/// A snapshot of the read-model database, once `projection` has applied the
/// caller's `min_position`; with the position applied.
pub(crate) async fn ready(
    read_models: &ReadModels,
    projection: &'static str,
    options: Option<QueryOptions>,
    wait: Duration,
) -> Result<(Snapshot, u64), Status> {
    ready_all(read_models, &[projection], options, wait).await
}

/// Why `projection` has not reached `min_position` in time. A projection
/// stopped by a poison event will not reach it by waiting: that is
/// FAILED_PRECONDITION (its error stays with the operators: it may name
/// another tenant's data); otherwise UNAVAILABLE, retry.
async fn not_yet(
    read_models: &ReadModels,
    projection: &str,
    position: u64,
    min_position: u64,
) -> Status {
    let stopped = match read_models.pool.get().await {
        Ok(client) => client
            .query_opt(
                "SELECT error_position FROM projections WHERE name = $1 AND state = 'failed'",
                &[&projection],
            )
            .await
            .ok()
            .flatten()
            .map(|row| row.get::<_, Option<i64>>(0)),
        Err(_) => None,
    };
    match stopped {
        Some(at) => Status::failed_precondition(format!(
            "read model {projection} is stopped at an event it cannot apply (position {}) and \
             will not reach {min_position} until an operator fixes it",
            at.map_or_else(|| "unknown".to_owned(), |p| p.to_string())
        )),
        None => Status::unavailable(format!(
            "read model {projection} has applied position {position}, not yet {min_position}; retry"
        )),
    }
}

/// A snapshot once every one of `projections` has applied the caller's
/// `min_position` (one deadline for all), with the lowest position applied.
/// While it waits it holds no connection: waiting queries must never starve
/// the projectors they wait for of connections from the same pool.
pub(crate) async fn ready_all(
    read_models: &ReadModels,
    projections: &[&'static str],
    options: Option<QueryOptions>,
    wait: Duration,
) -> Result<(Snapshot, u64), Status> {
    let not_ready = |e: &dyn std::fmt::Display| Status::unavailable(format!("read models: {e}"));
    let min_position = options.map_or(0, |o| o.min_position);
    let deadline = tokio::time::Instant::now() + wait;
    // In-process projectors: wait on their positions.
    if let Some(positions) = &read_models.positions
        && projections.iter().all(|p| positions.contains_key(p))
    {
        let mut lowest = u64::MAX;
        for projection in projections {
            positions[projection].want(min_position);
        }
        for projection in projections {
            let mut applied = positions[projection].clone();
            match tokio::time::timeout_at(deadline, applied.reached(min_position)).await {
                Ok(position) => lowest = lowest.min(position),
                Err(_) => {
                    return Err(
                        not_yet(read_models, projection, applied.now(), min_position).await,
                    );
                }
            }
        }
        let snapshot = Snapshot::begin(&read_models.pool).await?;
        return Ok((snapshot, if lowest == u64::MAX { 0 } else { lowest }));
    }
    let names: Vec<&str> = projections.to_vec();
    let mut pause = Duration::from_millis(2);
    loop {
        // The positions are read in the snapshot the query then reads, so
        // the position answered is exactly the one its rows reflect.
        let client = Snapshot::begin(&read_models.pool).await?;
        let row = client
            .query_one(
                "SELECT name, position FROM projections WHERE name = ANY($1) \
                 UNION ALL SELECT NULL, NULL ORDER BY 2 NULLS LAST LIMIT 1",
                &[&names],
            )
            .await
            .map_err(|e| not_ready(&e))?;
        let lowest = row
            .get::<_, Option<i64>>(1)
            .map_or(0, |p| u64::try_from(p).unwrap_or(0));
        let laggard: Option<String> = row.get(0);
        if lowest >= min_position || min_position == 0 {
            return Ok((client, lowest));
        }
        drop(client);
        if tokio::time::Instant::now() + pause > deadline {
            let name = laggard
                .as_deref()
                .unwrap_or(projections.first().copied().unwrap_or("?"));
            return Err(not_yet(read_models, name, lowest, min_position).await);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

/// A read-model connection inside one `REPEATABLE READ, READ ONLY`
/// transaction: every statement of a query reads the same committed state,
/// so a page and its total, or the parts of a Customer 360 view, agree even
/// while the projectors commit between them. It derefs to the pooled client.
///
/// Dropping it, however the query ended (answered, an error, or the caller
/// gone mid-statement), ends the transaction before the connection goes back
/// to the pool: a task sends `ROLLBACK` (nothing was written) and, if that
/// fails, closes the connection instead. A connection is never returned to
/// the pool inside a transaction.
pub struct Snapshot(Option<deadpool_postgres::Object>);

impl Snapshot {
    pub async fn begin(pool: &Pool) -> Result<Self, Status> {
        let client = pool
            .get()
            .await
            .map_err(|e| Status::unavailable(format!("read models: {e}")))?;
        // Owned before the first await that can fail or be cancelled, so
        // the drop below ends whatever BEGIN started.
        let snapshot = Self(Some(client));
        snapshot
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(unavailable)?;
        Ok(snapshot)
    }
}

impl std::ops::Deref for Snapshot {
    type Target = deadpool_postgres::Object;

    fn deref(&self) -> &Self::Target {
        self.0
            .as_ref()
            .expect("a snapshot holds its client until dropped")
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let Some(client) = self.0.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if client.batch_execute("ROLLBACK").await.is_err() {
                        drop(deadpool_postgres::Object::take(client));
                    }
                });
            }
            Err(_) => drop(deadpool_postgres::Object::take(client)),
        }
    }
}

// ------------------------------------------------ helpers the queries share

/// The first year a query time or date may name: no record is older
/// (commands refuse business times before 1900), and the queries' SQL and
/// date arithmetic need room below it (PostgreSQL refuses years before
/// 4713 BC; jiff panics subtracting past its year -9999). Later bounds are
/// free: a far-future `to` or `due_before` is a common "no limit".
const FIRST_QUERY_YEAR: i16 = 1900;

/// An RFC 3339 instant from the year 1900 on.
pub(crate) fn instant(field: &'static str, text: &str) -> Result<jiff::Timestamp, ServiceError> {
    let at = text
        .parse::<jiff::Timestamp>()
        .map_err(|_| ServiceError::invalid(field, "must be an RFC 3339 instant"))?;
    if !queryable(at) {
        return Err(ServiceError::invalid(field, "must not be before 1900"));
    }
    Ok(at)
}

/// Whether a query may name `at` (from the year 1900 on, in UTC).
pub(crate) fn queryable(at: jiff::Timestamp) -> bool {
    at.to_zoned(jiff::tz::TimeZone::UTC).year() >= FIRST_QUERY_YEAR
}

/// A `YYYY-MM-DD` date from the year 1900 on (see [`instant`]).
pub(crate) fn date(field: &'static str, text: &str) -> Result<jiff::civil::Date, ServiceError> {
    let date = text
        .parse::<jiff::civil::Date>()
        .map_err(|_| ServiceError::invalid(field, "must be a date, YYYY-MM-DD"))?;
    if date.year() < FIRST_QUERY_YEAR {
        return Err(ServiceError::invalid(field, "must not be before 1900"));
    }
    Ok(date)
}

/// The status of a failed read-model query. PostgreSQL's deterministic
/// refusals (SQLSTATE classes 22 data exception, 23 integrity, 42 syntax or
/// access, XX internal) would fail again on retry: INTERNAL, naming only the
/// SQLSTATE (the server logs the rest, which may quote data). Everything else
/// (a lost connection, a busy pool, a cancelled or conflicting statement, and
/// an undefined table or column, which a rolling deploy or a rebuild's swap
/// can cause for a moment) is UNAVAILABLE: a retry may succeed.
pub fn unavailable<E: std::fmt::Display + 'static>(error: E) -> Status {
    let any: &dyn std::any::Any = &error;
    if let Some(code) = any
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::code)
        && matches!(code.code().get(..2), Some("22" | "23" | "42" | "XX"))
        && !matches!(code.code(), "42P01" | "42703")
    {
        tracing::error!(%error, sqlstate = code.code(), "read-model query failed");
        return Status::internal(format!(
            "read models: the query failed (SQLSTATE {})",
            code.code()
        ));
    }
    Status::unavailable(format!("read models: {error}"))
}

pub(crate) fn page_size(requested: u32) -> Result<u32, ServiceError> {
    match requested {
        0 => Ok(DEFAULT_PAGE),
        n if n <= MAX_PAGE => Ok(n),
        _ => Err(ServiceError::invalid("page_size", "must be 0 to 200")),
    }
}

/// The first `size` of `rows` (fetched with one extra) and the token of the
/// next page (empty on the last), made from the page's last row.
pub(crate) fn page(
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

pub(crate) fn bad_token() -> ServiceError {
    ServiceError::invalid("page_token", "is not a token this server gave")
}

/// The three dot-separated parts of a page token this server gave.
pub(crate) fn token_parts(token: &str) -> Result<Option<[&str; 3]>, ServiceError> {
    if token.is_empty() {
        return Ok(None);
    }
    let mut parts = token.splitn(3, '.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), Some(c)) => Ok(Some([a, b, c])),
        _ => Err(bad_token()),
    }
}

pub(crate) fn bounded(field: &'static str, value: &str) -> Result<(), ServiceError> {
    if value.len() > 200 {
        return Err(ServiceError::invalid(
            field,
            "must be at most 200 characters",
        ));
    }
    Ok(())
}

pub(crate) fn count(row: &tokio_postgres::Row, i: usize) -> u64 {
    u64::try_from(row.get::<_, i64>(i)).unwrap_or(0)
}
