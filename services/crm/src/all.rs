//! `crm all` (every role in one process), `crm command`, `crm relay`,
//! `crm query` and `crm migrate`.
//!
//! Shutdown drains in order: gRPC intake first (health goes NOT_SERVING,
//! in-flight calls finish), then the workers (the event store's writer commits
//! what is queued), each phase bounded by the grace period.
use crm_event_store::{EventStore, StoreOptions};
use crm_platform::Config;
use tokio::net::TcpListener;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::RunError;
use crate::grpc::Services;
use crate::query::EventLogService;
use crate::relay::{Relay, RelayOptions};

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

/// Runs every role until `shutdown` is cancelled, then drains and returns:
/// the command services and the relay today; projectors, query and
/// scheduler join here as they land.
pub async fn run_all(
    config: &Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let store = start_store(config).await?;
    let workers = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(
        Relay::new(
            store.clone(),
            config.pg_config()?,
            config.nats_url.clone(),
            RelayOptions::from_config(config),
        )
        .run(workers.clone()),
    );
    tasks.close();
    let commands = crate::command::CommandHandler::new(store.clone(), &config.reservation_key()?);
    let event_log = EventLogService::new(
        store.clone(),
        config.query_max_subscriptions,
        shutdown.clone(),
    );
    let services = Services {
        commands: Some(commands),
        event_log: Some(event_log),
    };
    let served = crate::grpc::serve(listener, shutdown.clone(), services).await;
    // Intake is closed and in-flight calls are done: stop the workers (the
    // relay finishes its acks and checkpoints), then drain the writer.
    workers.cancel();
    if tokio::time::timeout(config.shutdown_grace(), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("workers did not stop within the grace period");
    }
    stop_store(config, &store).await;
    served
}

/// The relay role alone, until `shutdown` is cancelled.
pub async fn run_relay(config: &Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let store = start_store(config).await?;
    Relay::new(
        store.clone(),
        config.pg_config()?,
        config.nats_url.clone(),
        RelayOptions::from_config(config),
    )
    .run(shutdown)
    .await;
    stop_store(config, &store).await;
    Ok(())
}

/// Validates the configuration, migrates, and opens the event store.
async fn start_store(config: &Config) -> Result<EventStore, RunError> {
    config.validate()?;
    let applied = run_migrate(config).await?;
    tracing::info!(applied, "migrations checked");
    Ok(EventStore::connect(
        &config.pg_config()?,
        StoreOptions {
            pool_size: config.pg_pool_size,
            ..StoreOptions::default()
        },
    )
    .await?)
}

async fn stop_store(config: &Config, store: &EventStore) {
    if tokio::time::timeout(config.shutdown_grace(), store.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("event store did not drain within the grace period");
    }
    tracing::info!("stopped");
}

/// The command role alone: migrations, the event store and the command gRPC
/// services (with health and reflection), until `shutdown` is cancelled.
pub async fn run_command(
    config: &Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let store = start_store(config).await?;
    let commands = crate::command::CommandHandler::new(store.clone(), &config.reservation_key()?);
    let services = Services {
        commands: Some(commands),
        event_log: None,
    };
    let served = crate::grpc::serve(listener, shutdown.clone(), services).await;
    stop_store(config, &store).await;
    served
}

/// The query role alone: the read-side gRPC services (today the event log),
/// until `shutdown` is cancelled.
pub async fn run_query(
    config: &Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let store = start_store(config).await?;
    let event_log = EventLogService::new(
        store.clone(),
        config.query_max_subscriptions,
        shutdown.clone(),
    );
    let services = Services {
        commands: None,
        event_log: Some(event_log),
    };
    let served = crate::grpc::serve(listener, shutdown.clone(), services).await;
    stop_store(config, &store).await;
    served
}
