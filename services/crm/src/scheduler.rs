//! The scheduler: appends the time-driven events of DOMAIN.md §4 as ordinary
//! commands from `system:scheduler`, each exactly once.
//!
//! Each tick reads what has fallen due from the read models and sends the
//! rule's command with `occurred_at` = when the condition became true and the
//! idempotency key `scheduler:<rule>:<stream>:<due instant>`, so a repeated
//! tick, a restart or a second scheduler changes nothing; a condition that
//! vanished meanwhile answers NOT_APPLICABLE and is skipped. Rules: task
//! due (`TaskOverdue`), SLA warning and breach (`SlaWarningReached`,
//! `SlaBreached`, from `sla_clock`), auto-solve of tickets pending on the
//! customer for 7 days and auto-close of tickets solved for 4 days (from
//! `service_queue`), stalled deals (stage older than the stage's
//! `max_days_in_stage`, or no touch for 14 days) and churn risk (a customer
//! with no touch or paid order for 90 days) and, for tenants that opted in
//! (`inactivity_churn_days`), inactivity churn, from `engagement`; and
//! queue overflow (a ticket nobody was eligible for during its queue's
//! `overflow_after_minutes` moves to the overflow queue), from the router's
//! tables.
use std::sync::Arc;
use std::time::Duration;

use std::time::SystemTime;

use crm_domain::account::{Account, AccountCommand};
use crm_domain::activity::{Activity, ActivityCommand};
use crm_domain::opportunity::{Opportunity, OpportunityCommand};
use crm_domain::sla::{SlaCommand, SlaMetric, SlaTracker, tracker_id};
use crm_domain::ticket::{AUTO_CLOSE_DAYS, AUTO_SOLVE_DAYS, Ticket, TicketCommand};
use crm_domain::{Aggregate, TenantId};
use deadpool_postgres::Pool;
use jiff::{SignedDuration, Timestamp};
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
    /// Rules that could not run this tick (logged; the others still ran).
    pub failed: usize,
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
            let tick = self
                .tick()
                .instrument(tracing::info_span!("scheduler_tick"))
                .await;
            if tick.appended > 0 || tick.failed > 0 {
                tracing::info!(
                    appended = tick.appended,
                    skipped = tick.skipped,
                    failed = tick.failed,
                    "scheduler tick"
                );
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// One pass over every rule. A rule that fails (its read model not
    /// there yet, the store unavailable) is logged and counted in
    /// [`Tick::failed`]; the rules after it still run.
    pub async fn tick(&self) -> Tick {
        let now = self.clock.now();
        let mut tick = Tick::default();
        let outcomes = [
            ("tasks_due", self.tasks_due(now, &mut tick).await),
            ("sla_alarms", self.sla_alarms(now, &mut tick).await),
            (
                "waiting_tickets",
                self.waiting_tickets(now, &mut tick).await,
            ),
            ("queue_overflow", self.queue_overflow(now, &mut tick).await),
            ("stalled_deals", self.stalled_deals(now, &mut tick).await),
            ("churn_risk", self.churn_risk(now, &mut tick).await),
            (
                "inactivity_churn",
                self.inactivity_churn(now, &mut tick).await,
            ),
        ];
        for (rule, outcome) in outcomes {
            if let Err(error) = outcome {
                tracing::warn!(rule, %error, "scheduler rule failed; retrying next tick");
                tick.failed += 1;
            }
        }
        tick
    }

    async fn due_rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, ServiceError> {
        let client = self
            .read_models
            .get()
            .await
            .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
        client
            .query(sql, params)
            .await
            .map_err(|e| ServiceError::Unavailable(e.to_string()))
    }

    /// Sends one rule's command as `system:scheduler`, counting the outcome.
    async fn send<A: Aggregate>(
        &self,
        tick: &mut Tick,
        tenant: &str,
        stream_id: Uuid,
        key: String,
        occurred_at: Timestamp,
        command: A::Command,
    ) -> Result<(), ServiceError>
    where
        A::Command: Clone,
    {
        self.send_at::<A>(tick, tenant, stream_id, None, key, occurred_at, command)
            .await
    }

    /// [`Self::send`], expecting the stream at `expected_version` when
    /// given: a stream that moved on since the read model saw it is
    /// skipped (its later events decide again).
    #[allow(clippy::too_many_arguments)]
    async fn send_at<A: Aggregate>(
        &self,
        tick: &mut Tick,
        tenant: &str,
        stream_id: Uuid,
        expected_version: Option<u64>,
        key: String,
        occurred_at: Timestamp,
        command: A::Command,
    ) -> Result<(), ServiceError>
    where
        A::Command: Clone,
    {
        let Ok(tenant) = TenantId::parse(tenant) else {
            return Ok(());
        };
        let caller = Caller::system(tenant, "system:scheduler");
        let mut options = Options::internal(key, occurred_at);
        options.expected_version = expected_version;
        match self
            .handler
            .execute::<A>(&caller, stream_id, &options, command)
            .await
        {
            Ok(reply) if !reply.unchanged => tick.appended += 1,
            Ok(_) => tick.skipped += 1,
            Err(
                ServiceError::Domain(crm_domain::DomainError::NotApplicable { .. })
                | ServiceError::VersionConflict { .. },
            ) => {
                tick.skipped += 1;
            }
            Err(error @ ServiceError::Unavailable(_)) => return Err(error),
            // One record refusing must not hold up the others.
            Err(error) => {
                tracing::warn!(%error, stream_id = %stream_id, "scheduled command refused");
                tick.skipped += 1;
            }
        }
        Ok(())
    }

    /// Task due: an open scheduled activity past its due time.
    async fn tasks_due(&self, now: Timestamp, tick: &mut Tick) -> Result<(), ServiceError> {
        let now_system: SystemTime = now.into();
        let rows = self
            .due_rows(
                "SELECT tenant_id, activity_id, due, position FROM scheduled_tasks \
                 WHERE open AND NOT overdue AND due <= $1 ORDER BY due LIMIT $2",
                &[&now_system, &BATCH],
            )
            .await?;
        for row in &rows {
            let activity_id: Uuid = row.get(1);
            let due = timestamp(row.get(2))?;
            // The position of the item's last event is part of the key: an
            // item rescheduled back to a due time that already fired is
            // marked again (the domain marks an item once per due anyway).
            let position: i64 = row.get(3);
            self.send::<Activity>(
                tick,
                row.get(0),
                activity_id,
                format!("scheduler:task_overdue:{activity_id}:{due}:{position}"),
                due,
                ActivityCommand::MarkTaskOverdue,
            )
            .await?;
        }
        Ok(())
    }

    /// SLA warning and breach: a running clock past its warning share or
    /// its due instant (the SLA process manager escalates the breach).
    async fn sla_alarms(&self, now: Timestamp, tick: &mut Tick) -> Result<(), ServiceError> {
        let now_system: SystemTime = now.into();
        for (rule, column, flag) in [
            ("sla_warning", "warn_at", "warned"),
            ("sla_breach", "due", "breached"),
        ] {
            let rows = self
                .due_rows(
                    &format!(
                        "SELECT tenant_id, ticket_id, metric, {column} FROM sla_clock \
                         WHERE state = 'running' AND NOT {flag} AND {column} <= $1 \
                         ORDER BY {column} LIMIT $2"
                    ),
                    &[&now_system, &BATCH],
                )
                .await?;
            for row in &rows {
                let ticket_id: Uuid = row.get(1);
                let metric_name: String = row.get(2);
                let Some(metric) = SlaMetric::parse(&metric_name) else {
                    continue;
                };
                let at = timestamp(row.get(3))?;
                let command = if rule == "sla_warning" {
                    SlaCommand::Warn { metric, at }
                } else {
                    SlaCommand::Breach { metric, due: at }
                };
                self.send::<SlaTracker>(
                    tick,
                    row.get(0),
                    tracker_id(ticket_id),
                    format!("scheduler:{rule}:{ticket_id}:{metric_name}:{at}"),
                    at,
                    command,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Auto-solve (pending on the customer for 7 days) and auto-close
    /// (solved for 4 days).
    async fn waiting_tickets(&self, now: Timestamp, tick: &mut Tick) -> Result<(), ServiceError> {
        for (rule, status, days) in [
            ("auto_solve", "pending", AUTO_SOLVE_DAYS),
            ("auto_close", "solved", AUTO_CLOSE_DAYS),
        ] {
            let waited = SignedDuration::from_hours(24 * days);
            let cutoff: SystemTime = (now - waited).into();
            let rows = self
                .due_rows(
                    "SELECT tenant_id, ticket_id, status_since FROM service_queue \
                     WHERE status = $1 AND status_since <= $2 ORDER BY status_since LIMIT $3",
                    &[&status, &cutoff, &BATCH],
                )
                .await?;
            for row in &rows {
                let ticket_id: Uuid = row.get(1);
                let since = timestamp(row.get(2))?;
                let command = if rule == "auto_solve" {
                    TicketCommand::AutoSolve { since }
                } else {
                    TicketCommand::AutoClose { since }
                };
                self.send::<Ticket>(
                    tick,
                    row.get(0),
                    ticket_id,
                    format!("scheduler:{rule}:{ticket_id}:{since}"),
                    since + waited,
                    command,
                )
                .await?;
            }
        }
        Ok(())
    }
}

impl Scheduler {
    /// Queue overflow: a ticket waiting in a queue with an overflow queue,
    /// with no eligible agent for the queue's `overflow_after_minutes`, moves
    /// there unassigned (the router then routes it in its new queue). Sent
    /// at the ticket version the router saw, so a ticket assigned meanwhile
    /// stays where it is.
    async fn queue_overflow(&self, now: Timestamp, tick: &mut Tick) -> Result<(), ServiceError> {
        let now_system: SystemTime = now.into();
        let rows = self
            .due_rows(
                "SELECT t.tenant_id, t.ticket_id, t.version, t.queue, q.overflow_queue, \
                   t.waiting_since, t.waiting_since + make_interval(mins => q.overflow_after_minutes) \
                 FROM router_tickets t JOIN router_queues q \
                   ON q.tenant_id = t.tenant_id AND q.queue_id = t.queue \
                 WHERE t.waiting_since IS NOT NULL AND q.overflow_queue IS NOT NULL \
                   AND t.waiting_since + make_interval(mins => q.overflow_after_minutes) <= $1 \
                 ORDER BY t.waiting_since, t.ticket_id LIMIT $2",
                &[&now_system, &BATCH],
            )
            .await?;
        for row in &rows {
            let ticket_id: Uuid = row.get(1);
            let queue: String = row.get(3);
            let since = timestamp(row.get(5))?;
            let due = timestamp(row.get(6))?;
            self.send_at::<Ticket>(
                tick,
                row.get(0),
                ticket_id,
                u64::try_from(row.get::<_, i64>(2)).ok(),
                format!("scheduler:queue_overflow:{ticket_id}:{queue}:{since}"),
                due,
                TicketCommand::Assign {
                    queue: row.get(4),
                    assignee: None,
                    method: "overflow".into(),
                    eligible: true,
                    override_reason: String::new(),
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Stalled deal: longer in its stage than the stage's
    /// `max_days_in_stage`, or no touch for 14 days.
    async fn stalled_deals(&self, now: Timestamp, tick: &mut Tick) -> Result<(), ServiceError> {
        let now_system: SystemTime = now.into();
        let rows = self
            .due_rows(
                "SELECT d.tenant_id, d.deal_id, 'stage_age', l.max_days, \
                   d.stage_entered_at + make_interval(days => l.max_days) AS due \
                 FROM eng_deals d JOIN eng_stage_limits l ON l.tenant_id = d.tenant_id \
                   AND l.pipeline_id = d.pipeline_id AND l.stage = d.stage \
                 WHERE d.open AND NOT d.stalled \
                   AND d.stage_entered_at + make_interval(days => l.max_days) <= $1 \
                 UNION ALL \
                 SELECT tenant_id, deal_id, 'no_touch', $2, \
                   last_touch_at + make_interval(days => $2) \
                 FROM eng_deals WHERE open AND NOT stalled \
                   AND last_touch_at + make_interval(days => $2) <= $1 \
                 ORDER BY 5, 3 DESC LIMIT $3",
                &[&now_system, &STALLED_NO_TOUCH_DAYS, &BATCH],
            )
            .await?;
        for row in &rows {
            let deal: Uuid = row.get(1);
            let rule: &str = row.get(2);
            let days: i32 = row.get(3);
            let due = timestamp(row.get(4))?;
            self.send::<Opportunity>(
                tick,
                row.get(0),
                deal,
                format!("scheduler:stalled_deal:{deal}:{rule}:{due}"),
                due,
                OpportunityCommand::FlagStalled {
                    rule: rule.to_owned(),
                    days: u32::try_from(days).unwrap_or(0),
                    stalled: true,
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Churn risk: a customer with no touch and no paid order for 90 days.
    async fn churn_risk(&self, now: Timestamp, tick: &mut Tick) -> Result<(), ServiceError> {
        let now_system: SystemTime = now.into();
        let rows = self
            .due_rows(
                "SELECT tenant_id, account_id, due FROM ( \
                   SELECT tenant_id, account_id, \
                     greatest(customer_since, last_touch_at, last_paid_order_at) \
                       + make_interval(days => $2) AS due \
                   FROM eng_accounts WHERE customer AND NOT at_risk) a \
                 WHERE due <= $1 ORDER BY due LIMIT $3",
                &[&now_system, &CHURN_RISK_DAYS, &BATCH],
            )
            .await?;
        for row in &rows {
            let account: Uuid = row.get(1);
            let due = timestamp(row.get(2))?;
            self.send::<Account>(
                tick,
                row.get(0),
                account,
                format!("scheduler:churn_risk:{account}:{due}"),
                due,
                AccountCommand::FlagChurnRisk {
                    days_inactive: u32::try_from(CHURN_RISK_DAYS).unwrap_or(90),
                    inactive: true,
                },
            )
            .await?;
        }
        Ok(())
    }
}

impl Scheduler {
    /// Inactivity churn (tenants that opted in): a customer with no paid
    /// order for the tenant's `inactivity_churn_days` is churned.
    async fn inactivity_churn(&self, now: Timestamp, tick: &mut Tick) -> Result<(), ServiceError> {
        let now_system: SystemTime = now.into();
        let rows = self
            .due_rows(
                "SELECT tenant_id, account_id, due FROM ( \
                   SELECT a.tenant_id, a.account_id, \
                     greatest(a.customer_since, a.last_paid_order_at) \
                       + make_interval(days => t.inactivity_churn_days) AS due \
                   FROM eng_accounts a JOIN eng_tenants t ON t.tenant_id = a.tenant_id \
                   WHERE a.customer AND t.inactivity_churn_days IS NOT NULL) c \
                 WHERE due <= $1 ORDER BY due LIMIT $2",
                &[&now_system, &BATCH],
            )
            .await?;
        for row in &rows {
            let account: Uuid = row.get(1);
            let due = timestamp(row.get(2))?;
            self.send::<Account>(
                tick,
                row.get(0),
                account,
                format!("scheduler:inactivity_churn:{account}:{due}"),
                due,
                AccountCommand::MarkChurned {
                    reason: "inactive".to_owned(),
                },
            )
            .await?;
        }
        Ok(())
    }
}

/// Days without a touch after which an open deal is stalled (DOMAIN §4).
const STALLED_NO_TOUCH_DAYS: i32 = 14;
/// Days without a touch or paid order after which a customer is at risk.
const CHURN_RISK_DAYS: i32 = 90;

fn timestamp(time: SystemTime) -> Result<Timestamp, ServiceError> {
    Timestamp::try_from(time).map_err(|e| ServiceError::Internal(format!("stored time: {e}")))
}
