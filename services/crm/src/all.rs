//! `crm all` (every role in one process), `crm command` and `crm migrate`.
//!
//! Shutdown drains in order: gRPC intake first (health goes NOT_SERVING,
//! in-flight calls finish), then the workers (the event store's writer commits
//! what is queued), each phase bounded by the grace period.
use crm_event_store::{EventStore, StoreOptions};
use crm_platform::Config;
use tokio::net::TcpListener;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use crate::RunError;

/// Applies pending migrations of every component.
pub async fn run_migrate(config: &Config) -> Result<usize, RunError> {
    let pg = config.pg_config()?;
    let (mut client, connection) = pg.connect(NoTls).await.map_err(RunError::Connect)?;
    let driver = tokio::spawn(connection);
    let applied = crm_event_store::migrate(&mut client).await?;
    drop(client);
    let _ = driver.await;
    Ok(applied)
}

/// Runs every role until `shutdown` is cancelled, then drains and returns.
/// Today the command role is the only one that exists; the relay,
/// projectors, query and scheduler roles join here as they land.
pub async fn run_all(
    config: &Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    run_command(config, listener, shutdown).await
}

/// The command role alone: migrations, the event store and the command gRPC
/// services (with health and reflection), until `shutdown` is cancelled.
pub async fn run_command(
    config: &Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    config.validate()?;
    let applied = run_migrate(config).await?;
    tracing::info!(applied, "migrations checked");
    let store = EventStore::connect(
        &config.pg_config()?,
        StoreOptions {
            pool_size: config.pg_pool_size,
            ..StoreOptions::default()
        },
    )
    .await?;
    let commands = crate::command::CommandHandler::new(store.clone(), &config.reservation_key()?);
    let served = crate::grpc::serve(listener, shutdown.clone(), commands).await;
    if tokio::time::timeout(config.shutdown_grace(), store.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("event store did not drain within the grace period");
    }
    tracing::info!("stopped");
    served
}
