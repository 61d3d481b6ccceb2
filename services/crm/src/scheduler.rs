//! The scheduler: appends the time-driven events of DOMAIN.md §4 as ordinary
//! commands from `system:scheduler`, each exactly once.
//!
//! Each tick reads what has fallen due from the read models and sends the
//! rule's command with `occurred_at` = when the condition became true and the
//! idempotency key `scheduler:<rule>:<stream>:<due instant>`, so a repeated
//! tick, a restart or a second scheduler changes nothing; a condition that
//! vanished meanwhile answers NOT_APPLICABLE and is skipped. Today's rule:
//! task due (`TaskOverdue`); the SLA, auto-close, stalled-deal and churn
//! rules join as their read models land.
use std::sync::Arc;
use std::time::Duration;

use crm_domain::TenantId;
use crm_domain::activity::{Activity, ActivityCommand};
use crm_proto::v1 as pb;
use deadpool_postgres::Pool;
use jiff::Timestamp;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::command::{Caller, CommandHandler, Options, ServiceError};

/// Where the scheduler reads the time: the system clock, or a test's.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// Most commands one tick sends per rule.
const BATCH: i64 = 500;

pub struct Scheduler {
    handler: CommandHandler,
    read_models: Pool,
    clock: Arc<dyn Clock>,
    interval: Duration,
}

/// What one tick did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tick {
    /// Commands that appended an event.
    pub appended: usize,
    /// Already done before (idempotent replay) or no longer applicable.
    pub skipped: usize,
}

impl Scheduler {
    pub fn new(
        handler: CommandHandler,
        read_models: Pool,
        clock: Arc<dyn Clock>,
        interval: Duration,
    ) -> Self {
        Self {
            handler,
            read_models,
            clock,
            interval,
        }
    }

    /// Ticks every `interval` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            match self
                .tick()
                .instrument(tracing::info_span!("scheduler_tick"))
                .await
            {
                Ok(tick) if tick.appended > 0 => {
                    tracing::info!(
                        appended = tick.appended,
                        skipped = tick.skipped,
                        "scheduler tick"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "scheduler tick failed; retrying next tick"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// One pass over every rule.
    pub async fn tick(&self) -> Result<Tick, ServiceError> {
        let now = self.clock.now();
        let client = self
            .read_models
            .get()
            .await
            .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
        let now_system: std::time::SystemTime = now.into();
        let due = client
            .query(
                "SELECT tenant_id, activity_id, due FROM scheduled_tasks \
                 WHERE open AND NOT overdue AND due <= $1 ORDER BY due LIMIT $2",
                &[&now_system, &BATCH],
            )
            .await
            .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
        drop(client);
        let mut tick = Tick::default();
        for row in &due {
            let tenant: String = row.get(0);
            let activity_id: Uuid = row.get(1);
            let due: std::time::SystemTime = row.get(2);
            let due = Timestamp::try_from(due)
                .map_err(|e| ServiceError::Internal(format!("due time: {e}")))?;
            let Ok(tenant) = TenantId::parse(&tenant) else {
                continue;
            };
            let request = pb::MarkTaskOverdueRequest {
                options: Some(pb::CommandOptions {
                    idempotency_key: format!("scheduler:task_overdue:{activity_id}:{due}"),
                    expected_version: None,
                    occurred_at: due.to_string(),
                }),
                activity_id: activity_id.to_string(),
            };
            let options = Options::parse("MarkTaskOverdue", request.options.as_ref(), &request)?;
            let caller = Caller::system(tenant, "system:scheduler");
            match self
                .handler
                .execute::<Activity>(
                    &caller,
                    activity_id,
                    &options,
                    ActivityCommand::MarkTaskOverdue,
                )
                .await
            {
                Ok(reply) if !reply.unchanged => tick.appended += 1,
                Ok(_) => tick.skipped += 1,
                Err(ServiceError::Domain(crm_domain::DomainError::NotApplicable { .. })) => {
                    tick.skipped += 1;
                }
                Err(error) => return Err(error),
            }
        }
        Ok(tick)
    }
}
