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
use crate::query::{EventLogService, ProjectionsAdminService, SalesService, ServiceQueriesService};
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
    let commands = crate::command::CommandHandler::new(store.clone(), &config.reservation_key()?);
    let projections = projections(&commands);
    let read_models = read_model_pool(config, &projections).await?;
    let workers = CancellationToken::new();
    let tasks = TaskTracker::new();
    let background = background_runtime().map_err(|e| RunError::Background(e.to_string()))?;
    let handle = background.handle().clone();
    tasks.spawn_on(
        Relay::new(
            store.clone(),
            config.pg_config()?,
            config.nats_url.clone(),
            RelayOptions::from_config(config),
        )
        .run(workers.clone()),
        &handle,
    );
    let positions = spawn_projectors(
        &tasks,
        &handle,
        config,
        &store,
        projections.clone(),
        &[],
        &workers,
    )?;
    if config.scheduler_interval_ms > 0 {
        tasks.spawn_on(
            scheduler(config, commands.clone(), read_models.clone()).run(workers.clone()),
            &handle,
        );
    }
    tasks.close();
    let services = Services {
        commands: Some(commands),
        ..query_services(
            config,
            &store,
            crate::query::ReadModels::with_positions(read_models, positions),
            projections,
            &shutdown,
        )
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
    background.shutdown_background();
    stop_store(config, &store).await;
    served
}

/// Nice value of the background roles' threads in `crm all` (relay,
/// projectors, scheduler): the command and query paths come first on a
/// busy machine; the background still gets what they leave.
const BACKGROUND_NICE: i32 = 10;

/// The runtime of `crm all`'s background roles: threads of their own (one
/// per core, as the main runtime) at a lower CPU priority. Measured on two
/// cores: the command p50 at one caller fell from 2.8-3.2x to 2.4-2.7x the
/// raw INSERT, the background keeping up as before.
fn background_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .thread_name("crm-background")
        .on_thread_start(|| {
            // On Linux the nice value is per thread: this one's only.
            let thread = rustix::thread::gettid();
            if let Err(error) = rustix::process::setpriority_process(Some(thread), BACKGROUND_NICE)
            {
                tracing::debug!(%error, "a background thread keeps its priority");
            }
        })
        .enable_all()
        .build()
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

/// The projector role: the named projections (all when `names` is empty),
/// until `shutdown` is cancelled.
pub async fn run_projectors(
    config: &Config,
    names: &[String],
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let store = start_store(config).await?;
    let commands = crate::command::CommandHandler::new(store.clone(), &config.reservation_key()?);
    let projections = projections(&commands);
    // Creates the tables; the projectors have a pool of their own.
    read_model_pool(config, &projections).await?;
    let tasks = TaskTracker::new();
    spawn_projectors(
        &tasks,
        &tokio::runtime::Handle::current(),
        config,
        &store,
        projections,
        names,
        &shutdown,
    )?;
    tasks.close();
    tasks.wait().await;
    stop_store(config, &store).await;
    Ok(())
}

/// The scheduler role alone, until `shutdown` is cancelled.
pub async fn run_scheduler(config: &Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let store = start_store(config).await?;
    let commands = crate::command::CommandHandler::new(store.clone(), &config.reservation_key()?);
    let read_models = read_model_pool(config, &projections(&commands)).await?;
    scheduler(config, commands, read_models).run(shutdown).await;
    stop_store(config, &store).await;
    Ok(())
}

fn scheduler(
    config: &Config,
    commands: crate::command::CommandHandler,
    read_models: deadpool_postgres::Pool,
) -> crate::scheduler::Scheduler {
    crate::scheduler::Scheduler::new(
        commands,
        read_models,
        std::sync::Arc::new(crate::scheduler::SystemClock),
        std::time::Duration::from_millis(config.scheduler_interval_ms.max(1)),
    )
}

/// `crm projections rebuild NAME...` (or `all`): rebuilds projections from
/// the event store into fresh tables over one shared read of the log and
/// swaps each in (blue/green), showing progress (a bar on a terminal, log
/// lines otherwise). Live projectors may keep running; returns the position
/// each swapped in at.
pub async fn rebuild_projections(
    config: &Config,
    names: &[String],
) -> Result<Vec<(&'static str, u64)>, RunError> {
    use std::io::{IsTerminal, Write};
    let store = start_store(config).await?;
    let commands = crate::command::CommandHandler::new(store.clone(), &config.reservation_key()?);
    let known = projections(&commands);
    read_model_pool(config, &known).await?;
    let rebuildable = || known.iter().filter(|p| p.rebuildable());
    let mut chosen: Vec<std::sync::Arc<dyn crm_projections::Projection>> = Vec::new();
    for name in names {
        if name == "all" {
            chosen.extend(rebuildable().cloned());
            continue;
        }
        let projection = known.iter().find(|p| p.name() == name).ok_or_else(|| {
            let names: Vec<_> = rebuildable().map(|p| p.name()).collect();
            RunError::UnknownProjection(name.to_owned(), names.join(", "))
        })?;
        if !projection.rebuildable() {
            return Err(RunError::NotRebuildable(name.to_owned()));
        }
        chosen.push(projection.clone());
    }
    let mut seen = std::collections::HashSet::new();
    chosen.retain(|p| seen.insert(p.name()));
    let name = chosen
        .iter()
        .map(|p| p.name())
        .collect::<Vec<_>>()
        .join(",");
    let name = name.as_str();
    let terminal = std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    let mut last_log = started;
    let result = crm_projections::rebuild_many(
        chosen,
        &store,
        &config.pg_config()?,
        crm_projections::REBUILD_CHUNK,
        |progress| {
            let percent = if progress.head == 0 {
                100.0
            } else {
                100.0 * progress.position as f64 / progress.head as f64
            };
            let rate = progress.position as f64 / started.elapsed().as_secs_f64().max(0.001);
            if terminal {
                let filled = (percent / 5.0) as usize;
                let mut err = std::io::stderr();
                let _ = write!(
                    err,
                    "\r[{}{}] {percent:5.1}% {}/{} events, {rate:.0} events/s ",
                    "#".repeat(filled.min(20)),
                    ".".repeat(20 - filled.min(20)),
                    progress.position,
                    progress.head
                );
                let _ = err.flush();
            } else if last_log.elapsed() >= std::time::Duration::from_secs(2)
                || progress.position >= progress.head
            {
                last_log = std::time::Instant::now();
                tracing::info!(
                    projection = name,
                    position = progress.position,
                    head = progress.head,
                    percent,
                    events_per_second = rate,
                    "rebuild progress"
                );
            }
        },
    )
    .await;
    if terminal {
        eprintln!();
    }
    stop_store(config, &store).await;
    result.map_err(|e| RunError::Rebuild(e.to_string()))
}

/// Every projection's position, state and lag (`crm projections status`).
pub async fn projections_status(
    config: &Config,
) -> Result<Vec<crm_projections::ProjectionStatus>, RunError> {
    config.validate()?;
    let store = start_store(config).await?;
    let commands = crate::command::CommandHandler::new(store.clone(), &config.reservation_key()?);
    let pool = read_model_pool(config, &projections(&commands)).await?;
    stop_store(config, &store).await;
    let client = pool.get().await.map_err(RunError::ReadModels)?;
    crm_projections::statuses(&client)
        .await
        .map_err(RunError::Connect)
}

/// Every projection and process manager this binary runs.
fn projections(
    commands: &crate::command::CommandHandler,
) -> Vec<std::sync::Arc<dyn crm_projections::Projection>> {
    let mut all = crm_projections::all();
    all.push(std::sync::Arc::new(crate::sla::SlaProcess::new(
        commands.clone(),
    )));
    all.push(std::sync::Arc::new(crate::router::Router::new(
        commands.clone(),
    )));
    all.push(std::sync::Arc::new(
        crate::lifecycle::CustomerLifecycle::new(commands.clone()),
    ));
    all.push(std::sync::Arc::new(crate::quality::DataQuality::new(
        commands.clone(),
    )));
    all.push(std::sync::Arc::new(crate::pipelines::PipelineFollow::new(
        commands.clone(),
    )));
    all
}

/// A pool on the read models' database, with every projection's tables.
async fn read_model_pool(
    config: &Config,
    projections: &[std::sync::Arc<dyn crm_projections::Projection>],
) -> Result<deadpool_postgres::Pool, RunError> {
    let mut pg = config.pg_config()?;
    pg.application_name("crm-read-models");
    // Read models are derived: a projection batch lost in a crash before its
    // WAL flush is applied again from its checkpoint (written in the same
    // transaction), so their commits need not wait for the disk.
    let options = pg.get_options().unwrap_or_default().to_owned();
    pg.options(format!("{options} -c synchronous_commit=off"));
    pg.connect_timeout(std::time::Duration::from_secs(5));
    let manager = deadpool_postgres::Manager::new(pg, NoTls);
    let pool = deadpool_postgres::Pool::builder(manager)
        // For queries and the scheduler: the projectors have their own.
        .max_size(config.pg_pool_size)
        .wait_timeout(Some(std::time::Duration::from_secs(10)))
        .create_timeout(Some(std::time::Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| RunError::Pool(e.to_string()))?;
    let client = pool.get().await.map_err(RunError::ReadModels)?;
    for projection in projections {
        crm_projections::ensure_schema(&client, projection.as_ref())
            .await
            .map_err(RunError::Connect)?;
    }
    Ok(pool)
}

/// The projectors' pool on the read models' database: a connection per
/// projector, commits that do not wait for the disk (as
/// [`read_model_pool`]'s), and every statement planned once per connection.
/// A projector's statements find and write rows by key, whose best plan does
/// not depend on the values; left to choose, PostgreSQL planned some of them
/// anew at every call (the data-quality candidate lookup: 0.08 ms of
/// planning for 0.02 ms of execution).
fn projector_pool(config: &Config, projectors: usize) -> Result<deadpool_postgres::Pool, RunError> {
    let mut pg = config.pg_config()?;
    pg.application_name("crm-projectors");
    let options = pg.get_options().unwrap_or_default().to_owned();
    pg.options(format!(
        "{options} -c synchronous_commit=off -c plan_cache_mode=force_generic_plan"
    ));
    pg.connect_timeout(std::time::Duration::from_secs(5));
    let manager = deadpool_postgres::Manager::new(pg, NoTls);
    deadpool_postgres::Pool::builder(manager)
        .max_size(projectors.max(1))
        .wait_timeout(Some(std::time::Duration::from_secs(10)))
        .create_timeout(Some(std::time::Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| RunError::Pool(e.to_string()))
}

fn query_services(
    config: &Config,
    store: &EventStore,
    read_models: crate::query::ReadModels,
    projections: Vec<std::sync::Arc<dyn crm_projections::Projection>>,
    shutdown: &CancellationToken,
) -> Services {
    let wait = std::time::Duration::from_millis(config.query_min_position_wait_ms);
    Services {
        commands: None,
        event_log: Some(EventLogService::new(
            store.clone(),
            config.query_max_subscriptions,
            shutdown.clone(),
        )),
        sales: Some(SalesService::new(read_models.clone(), wait)),
        service: Some(ServiceQueriesService::new(read_models.clone(), wait)),
        analytics: Some(crate::query::AnalyticsService::new(
            read_models.clone(),
            wait,
        )),
        customer360: Some(crate::query::Customer360Service::new(
            read_models.clone(),
            store.clone(),
            wait,
        )),
        quality: config.reservation_key().ok().map(|key| {
            crate::query::DataQualityService::new(
                read_models.clone(),
                wait,
                crate::command::CommandHandler::new(store.clone(), &key),
            )
        }),
        admin: config.pg_config().ok().map(|pg| {
            ProjectionsAdminService::new(store.clone(), read_models.pool().clone(), pg, projections)
        }),
    }
}

/// Starts a projector per named projection (every one when `names` is empty).
fn spawn_projectors(
    tasks: &TaskTracker,
    on: &tokio::runtime::Handle,
    config: &Config,
    store: &EventStore,
    known: Vec<std::sync::Arc<dyn crm_projections::Projection>>,
    names: &[String],
    stop: &CancellationToken,
) -> Result<Positions, RunError> {
    for name in names {
        if !known.iter().any(|p| p.name() == name) {
            let names: Vec<_> = known.iter().map(|p| p.name()).collect();
            return Err(RunError::UnknownProjection(name.clone(), names.join(", ")));
        }
    }
    let chosen: Vec<_> = known
        .into_iter()
        .filter(|p| names.is_empty() || names.iter().any(|n| n == p.name()))
        .collect();
    // The schemas are in place: `read_model_pool` made them.
    let read_models = projector_pool(config, chosen.len())?;
    let mut positions = Positions::new();
    for projection in chosen {
        let projector_name = projection.name();
        let options = crm_projections::ProjectorOptions {
            stream: config.relay_stream.clone(),
            subject_prefix: config.relay_subject_prefix.clone(),
            ..crm_projections::ProjectorOptions::default()
        };
        let projector = crm_projections::Projector::new(
            projection,
            store.clone(),
            read_models.clone(),
            config.nats_url.clone(),
            options,
        );
        positions.insert(projector_name, projector.applied());
        tasks.spawn_on(projector.run(stop.clone()), on);
    }
    Ok(positions)
}

/// Each running projector's applied position, by projection name.
type Positions = std::collections::HashMap<&'static str, crm_projections::Applied>;

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
        sales: None,
        service: None,
        analytics: None,
        quality: None,
        customer360: None,
        admin: None,
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
    let commands = crate::command::CommandHandler::new(store.clone(), &config.reservation_key()?);
    let projections = projections(&commands);
    let read_models = read_model_pool(config, &projections).await?;
    let services = query_services(
        config,
        &store,
        crate::query::ReadModels::new(read_models),
        projections,
        &shutdown,
    );
    let served = crate::grpc::serve(listener, shutdown.clone(), services).await;
    stop_store(config, &store).await;
    served
}

#[cfg(test)]
mod tests {
    #[test]
    fn background_roles_run_below_the_request_paths() {
        let own = || rustix::process::getpriority_process(Some(rustix::thread::gettid()));
        let caller = own().expect("own priority");
        let background = super::background_runtime().expect("runtime");
        let theirs = background
            .block_on(background.spawn(async move { own() }))
            .expect("task")
            .expect("their priority");
        // A lower priority is a higher nice value. (A process already
        // niced further has nothing to check.)
        if caller < super::BACKGROUND_NICE {
            assert_eq!(theirs, super::BACKGROUND_NICE);
        }
        background.shutdown_background();
    }
}
