//! `sla_clock`: every SLA clock of every ticket (DOMAIN.md §5.2): metric,
//! target, start, due, warning instant, paused since, elapsed business time,
//! state and breach, for `GetTicketSla`, `ListAtRisk`, `GetSlaCompliance` and
//! the scheduler's warning and breach rules.
use crm_domain::sla::{ClockState, SlaTracker};
use crm_event_store::RecordedEvent;

use crate::runtime::{ApplyFuture, Projection};

/// The row state [`crate::state::evolve_row`] reads (a `static`: the
/// rebuild cache knows the row by its address).
static STATE: &str = "SELECT state FROM sla_trackers WHERE tenant_id = $1 AND tracker_id = $2";

pub struct SlaClock;

pub const NAME: &str = "sla_clock";

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS sla_trackers (
    tenant_id  text   NOT NULL,
    tracker_id uuid   NOT NULL,
    state      json,          -- NULL after a rebuild (crate::state)
    position   bigint NOT NULL,
    PRIMARY KEY (tenant_id, tracker_id)
) WITH (fillfactor = 70);
ALTER TABLE sla_trackers ALTER COLUMN state DROP NOT NULL;
CREATE TABLE IF NOT EXISTS sla_clock (
    tenant_id       text        NOT NULL,
    ticket_id       uuid        NOT NULL,
    metric          text        NOT NULL,
    policy_id       uuid        NOT NULL,
    policy_version  integer     NOT NULL,
    target_minutes  integer     NOT NULL,
    start_at        timestamptz NOT NULL,
    due             timestamptz,
    warn_at         timestamptz,
    paused_since    timestamptz,
    elapsed_seconds bigint      NOT NULL,
    state           text        NOT NULL,
    warned          boolean     NOT NULL,
    breached        boolean     NOT NULL,
    breached_at     timestamptz,
    met_at          timestamptz,
    position        bigint      NOT NULL,
    PRIMARY KEY (tenant_id, ticket_id, metric)
) WITH (fillfactor = 70);
CREATE INDEX IF NOT EXISTS sla_clock_due
    ON sla_clock (due) WHERE state = 'running' AND NOT breached;
CREATE INDEX IF NOT EXISTS sla_clock_warn
    ON sla_clock (warn_at) WHERE state = 'running' AND NOT warned;
CREATE INDEX IF NOT EXISTS sla_clock_at_risk
    ON sla_clock (tenant_id, due, ticket_id, metric) WHERE state = 'running'";

impl Projection for SlaClock {
    crate::projection_names!(NAME, SCHEMA, ["sla_trackers", "sla_clock"]);

    fn query_indexes(&self) -> &'static [&'static str] {
        &["sla_clock_due", "sla_clock_warn", "sla_clock_at_risk"]
    }

    fn stream_types(&self) -> &'static [&'static str] {
        &["ticket_sla"]
    }

    fn apply<'a>(&'a self, tx: &'a crate::Tx<'_>, event: &'a RecordedEvent) -> ApplyFuture<'a> {
        Box::pin(async move {
            let Some((tracker, _)) =
                crate::state::evolve_row::<SlaTracker>(tx, STATE, event).await?
            else {
                return Ok(());
            };
            let (Some(policy_id), Some(ticket_id)) = (tracker.policy_id, tracker.ticket_id) else {
                return Ok(());
            };
            let position = i64::try_from(event.global_position).unwrap_or(i64::MAX);
            let tracker = crate::state::kept(tx, STATE, event, tracker);
            let state = crate::state::cached(tx, &*tracker);
            tx.execute(
                "INSERT INTO sla_trackers (tenant_id, tracker_id, state, position) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, tracker_id) \
                 DO UPDATE SET state = EXCLUDED.state, position = EXCLUDED.position",
                &[&event.tenant_id, &event.stream_id, &state, &position],
            )
            .await?;
            type Time = Option<std::time::SystemTime>;
            for (metric, clock) in &tracker.clocks {
                let paused_since: Time =
                    (clock.state == ClockState::Paused).then(|| clock.since.into());
                let met_at: Time = (clock.state == ClockState::Met).then(|| clock.since.into());
                let due: Time = clock.due.map(Into::into);
                let warn_at: Time = clock.warn_at.map(Into::into);
                let breached_at: Time = clock.breached_at.map(Into::into);
                let start: std::time::SystemTime = clock.start.into();
                tx.execute(
                    "INSERT INTO sla_clock (tenant_id, ticket_id, metric, policy_id, \
                       policy_version, target_minutes, start_at, due, warn_at, paused_since, \
                       elapsed_seconds, state, warned, breached, breached_at, met_at, position) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
                       $16, $17) \
                     ON CONFLICT (tenant_id, ticket_id, metric) DO UPDATE SET \
                       policy_id = EXCLUDED.policy_id, policy_version = EXCLUDED.policy_version, \
                       target_minutes = EXCLUDED.target_minutes, start_at = EXCLUDED.start_at, \
                       due = EXCLUDED.due, warn_at = EXCLUDED.warn_at, \
                       paused_since = EXCLUDED.paused_since, \
                       elapsed_seconds = EXCLUDED.elapsed_seconds, state = EXCLUDED.state, \
                       warned = EXCLUDED.warned, breached = EXCLUDED.breached, \
                       breached_at = EXCLUDED.breached_at, met_at = EXCLUDED.met_at, \
                       position = EXCLUDED.position",
                    &[
                        &event.tenant_id,
                        &ticket_id,
                        &metric.name(),
                        &policy_id,
                        &i32::try_from(tracker.policy_version).unwrap_or(i32::MAX),
                        &i32::try_from(clock.target_minutes).unwrap_or(i32::MAX),
                        &start,
                        &due,
                        &warn_at,
                        &paused_since,
                        &clock.elapsed_seconds,
                        &clock.state.name(),
                        &clock.warned,
                        &clock.breached,
                        &breached_at,
                        &met_at,
                        &position,
                    ],
                )
                .await?;
            }
            Ok(())
        })
    }
}
