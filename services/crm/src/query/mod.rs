//! The query role: read-side gRPC services: the event log (`Subscribe`,
//! `ReadAll`, `ReadStream`) and the read-model queries (`SalesQueries`; more
//! as the projections land).
mod admin;
mod event_log;
mod sales;
mod service;

pub use admin::ProjectionsAdminService;
pub use event_log::EventLogService;
pub use sales::SalesService;
pub use service::ServiceQueriesService;

use std::time::Duration;

use crm_proto::v1::QueryOptions;
use deadpool_postgres::Pool;
use tonic::Status;

/// A client on the read-model database, once `projection` has applied the
/// caller's `min_position`; with the position applied.
pub(crate) async fn ready(
    pool: &Pool,
    projection: &'static str,
    options: Option<QueryOptions>,
    wait: Duration,
) -> Result<(deadpool_postgres::Object, u64), Status> {
    let unavailable = |e: &dyn std::fmt::Display| Status::unavailable(format!("read models: {e}"));
    let client = pool.get().await.map_err(|e| unavailable(&e))?;
    let min_position = options.map_or(0, |o| o.min_position);
    match crm_projections::wait_for_position(&client, projection, min_position, wait)
        .await
        .map_err(|e| unavailable(&e))?
    {
        Ok(position) => Ok((client, position)),
        Err(position) => Err(Status::unavailable(format!(
            "read model {projection} has applied position {position}, not yet {min_position}; retry"
        ))),
    }
}
