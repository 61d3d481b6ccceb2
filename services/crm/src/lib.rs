//! The CRM's roles as library functions, so the binary and the tests start
//! them the same way: `run_*(config, listener, shutdown)`.
//!
//! - `all`: every role in one process (development and small installs).
//! - `command`: the command gRPC services alone.
//! - `migrate`: apply pending migrations and exit.
//! - `demo seed`: load demo data through the public API.
//! - `schemas write|check`: the JSON Schemas of event payloads.
//!
//! More roles (command, relay, projector, query, scheduler) join as they land;
//! each is the same code as inside `all`, scaled by deployment.
mod all;
pub mod command;
pub mod demo;
mod grpc;
pub mod lifecycle;
pub mod pipelines;
pub mod process;
pub mod quality;
pub mod query;
pub mod relay;
pub mod router;
pub mod scheduler;
pub mod schemas;
pub mod sla;

pub use all::{
    projections_status, rebuild_projections, run_all, run_command, run_migrate, run_projectors,
    run_query, run_relay, run_scheduler,
};
pub use grpc::health_check;

/// Why a role stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] crm_platform::ConfigError),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error(transparent)]
    Store(#[from] crm_event_store::StoreError),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("read-model connection pool: {0}")]
    Pool(String),
    #[error("cannot start the background roles' threads: {0}")]
    Background(String),
    #[error("no read-model connection: {0}")]
    ReadModels(#[source] deadpool_postgres::PoolError),
    #[error("rebuild failed: {0}")]
    Rebuild(String),
    #[error("no projection named {0:?}; known: {1}")]
    UnknownProjection(String, String),
    #[error("{0} is a process manager: its effect is the commands it sent, so it is never rebuilt")]
    NotRebuildable(String),
}
