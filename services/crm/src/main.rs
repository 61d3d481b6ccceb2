//! The `crm` binary: parses flags, loads configuration, starts telemetry and
//! calls the chosen role's library `run`.
use anyhow::Context;

/// mimalloc rather than glibc's malloc: a rebuild allocates and frees in many
/// threads at once, and glibc's arenas were a quarter of its CPU
/// (`docs/benchmarks.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use crm_platform::Config;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "crm", version, about = "Event-sourced CRM backend")]
struct Cli {
    #[command(flatten)]
    config: Config,
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Every role in one process: development and small installs.
    All,
    /// The command role alone (scale it out behind a load balancer).
    Command,
    /// The relay alone: publishes the event log to NATS JetStream. Run two or
    /// more for failover; one leads, the others stand by.
    Relay,
    /// The query role alone: read-side gRPC (the event log: Subscribe,
    /// ReadAll, ReadStream).
    Query,
    /// Projections (read models) alone: the named ones, or every one.
    Projector {
        /// e.g. `pipeline_board`; none: every projection.
        names: Vec<String>,
    },
    /// The scheduler alone: appends the time-driven events (tasks overdue
    /// today) exactly once each. Several may run; their commands converge.
    Scheduler,
    /// Projection administration.
    Projections {
        #[command(subcommand)]
        action: ProjectionsAction,
    },
    /// Apply pending database migrations and exit.
    Migrate,
    /// Exit 0 when the gRPC server at --grpc-addr reports SERVING.
    Health,
    /// JSON Schemas of event payloads.
    Schemas {
        #[command(subcommand)]
        action: SchemasAction,
    },
    /// Demo data.
    Demo {
        #[command(subcommand)]
        action: DemoAction,
    },
}

#[derive(Subcommand)]
enum SchemasAction {
    /// Write every event payload's JSON Schema under DIR.
    Write {
        #[arg(long, default_value = "schemas")]
        dir: std::path::PathBuf,
    },
    /// Exit non-zero when DIR differs from what the code generates.
    Check {
        #[arg(long, default_value = "schemas")]
        dir: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum ProjectionsAction {
    /// Every projection's position, state, lag and last error.
    Status,
    /// Rebuild projections from the event store into fresh tables, then
    /// swap each in atomically (live projectors may keep running). Several
    /// named together share one read of the log.
    Rebuild {
        /// e.g. `pipeline_board`, several, or `all` for every read model.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum DemoAction {
    /// Load demo accounts and contacts through the gRPC API at --grpc-addr.
    /// Safe to run again: nothing changes the second time.
    Seed {
        /// The tenant to seed.
        #[arg(long, default_value = "demo")]
        tenant: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config;
    if let Role::Schemas { action } = &cli.role {
        match action {
            SchemasAction::Write { dir } => {
                let changed = crm::schemas::write(dir)?;
                println!("{changed} schema file(s) written under {}", dir.display());
            }
            SchemasAction::Check { dir } => {
                let problems = crm::schemas::check(dir);
                anyhow::ensure!(
                    problems.is_empty(),
                    "schemas differ:\n  {}",
                    problems.join("\n  ")
                );
                println!("schemas under {} are current", dir.display());
            }
        }
        return Ok(());
    }
    if let Role::Health = cli.role {
        let serving = crm::health_check(config.grpc_addr)
            .await
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("health check of {}", config.grpc_addr))?;
        anyhow::ensure!(serving, "{} is not serving", config.grpc_addr);
        println!("SERVING");
        return Ok(());
    }
    config.validate()?;
    let telemetry = crm_platform::telemetry::init("crm", config.log_format)?;
    tracing::info!(?config, "starting");
    let result = match cli.role {
        Role::All | Role::Command | Role::Query => {
            let listener = tokio::net::TcpListener::bind(config.grpc_addr)
                .await
                .with_context(|| format!("cannot listen on {}", config.grpc_addr))?;
            let shutdown = CancellationToken::new();
            crm_platform::shutdown::cancel_on_signal(shutdown.clone());
            let run = match cli.role {
                Role::All => crm::run_all(&config, listener, shutdown).await,
                Role::Query => crm::run_query(&config, listener, shutdown).await,
                _ => crm::run_command(&config, listener, shutdown).await,
            };
            run.map_err(anyhow::Error::from)
        }
        Role::Relay => {
            let shutdown = CancellationToken::new();
            crm_platform::shutdown::cancel_on_signal(shutdown.clone());
            crm::run_relay(&config, shutdown)
                .await
                .map_err(anyhow::Error::from)
        }
        Role::Projector { names } => {
            let shutdown = CancellationToken::new();
            crm_platform::shutdown::cancel_on_signal(shutdown.clone());
            crm::run_projectors(&config, &names, shutdown)
                .await
                .map_err(anyhow::Error::from)
        }
        Role::Projections {
            action: ProjectionsAction::Status,
        } => crm::projections_status(&config)
            .await
            .map(|statuses| {
                println!(
                    "{:<20} {:>10} {:>10} {:>10} {:<8} {:>8}  last error",
                    "projection", "position", "lag", "lag (s)", "state", "refilled"
                );
                for s in statuses {
                    println!(
                        "{:<20} {:>10} {:>10} {:>10.1} {:<8} {:>8}  {}",
                        s.name,
                        s.position,
                        s.lag_events,
                        s.lag_seconds,
                        s.state,
                        s.holes_refilled,
                        match (s.error_position, s.last_error) {
                            (Some(at), Some(error)) => format!("at {at}: {error}"),
                            _ => String::new(),
                        }
                    );
                }
            })
            .map_err(anyhow::Error::from),
        Role::Projections {
            action: ProjectionsAction::Rebuild { names },
        } => crm::rebuild_projections(&config, &names)
            .await
            .map(|swapped| {
                for (name, position) in swapped {
                    println!("{name} rebuilt and swapped in at position {position}");
                }
            })
            .map_err(anyhow::Error::from),
        Role::Scheduler => {
            let shutdown = CancellationToken::new();
            crm_platform::shutdown::cancel_on_signal(shutdown.clone());
            crm::run_scheduler(&config, shutdown)
                .await
                .map_err(anyhow::Error::from)
        }
        Role::Migrate => crm::run_migrate(&config)
            .await
            .map(|applied| tracing::info!(applied, "migrations applied"))
            .map_err(anyhow::Error::from),
        Role::Demo {
            action: DemoAction::Seed { tenant },
        } => crm::demo::seed(config.grpc_addr, &tenant)
            .await
            .map(|seeded| {
                tracing::info!(?seeded, tenant, "demo data seeded");
                println!(
                    "demo tenant {tenant:?}: {} accounts, {} contacts, {} consents, {} leads, {} conversions, {} deals, {} service, commerce, campaign and NPS commands ({} commands already done)",
                    seeded.accounts,
                    seeded.contacts,
                    seeded.consents,
                    seeded.leads,
                    seeded.conversions,
                    seeded.opportunities,
                    seeded.more,
                    seeded.unchanged
                );
            })
            .map_err(anyhow::Error::from),
        Role::Health | Role::Schemas { .. } => Ok(()),
    };
    telemetry.shutdown();
    result
}
