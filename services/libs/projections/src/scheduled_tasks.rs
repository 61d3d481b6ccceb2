//! `scheduled_tasks`: scheduled activities (meetings, tasks, call-backs)
//! with their due time and whether they are still open, for the scheduler's
//! "task due" rule (DOMAIN.md §4).
use crm_domain::activity::{Activity, ActivityState};
use crm_event_store::RecordedEvent;

use crate::runtime::{ApplyFuture, Projection};

/// The row state [`crate::state::evolve_row`] reads (a `static`: the
/// rebuild cache knows the row by its address).
static STATE: &str = "SELECT state FROM scheduled_tasks WHERE tenant_id = $1 AND activity_id = $2";

pub struct ScheduledTasks;

pub const NAME: &str = "scheduled_tasks";

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS scheduled_tasks (
    tenant_id    text        NOT NULL,
    activity_id  uuid        NOT NULL,
    due          timestamptz,
    assignee     text        NOT NULL,
    open         boolean     NOT NULL,
    overdue      boolean     NOT NULL,
    state        json,               -- NULL after a rebuild (crate::state)
    position     bigint      NOT NULL,
    PRIMARY KEY (tenant_id, activity_id)
) WITH (fillfactor = 70);
ALTER TABLE scheduled_tasks ALTER COLUMN state DROP NOT NULL;
CREATE INDEX IF NOT EXISTS scheduled_tasks_due
    ON scheduled_tasks (due) WHERE open AND NOT overdue";

impl Projection for ScheduledTasks {
    crate::projection_names!(NAME, SCHEMA, ["scheduled_tasks"]);

    fn query_indexes(&self) -> &'static [&'static str] {
        &["scheduled_tasks_due"]
    }

    fn stream_types(&self) -> &'static [&'static str] {
        &["activity"]
    }

    fn apply<'a>(&'a self, tx: &'a crate::Tx<'_>, event: &'a RecordedEvent) -> ApplyFuture<'a> {
        Box::pin(async move {
            let Some((activity, _)) =
                crate::state::evolve_row::<Activity>(tx, STATE, event).await?
            else {
                return Ok(());
            };
            if activity.due.is_none() {
                return Ok(()); // a logged item: nothing falls due
            }
            let due: Option<std::time::SystemTime> = activity.due.map(Into::into);
            let activity = crate::state::kept(tx, STATE, event, activity);
            let state = crate::state::cached(tx, &*activity);
            tx.execute(
                "INSERT INTO scheduled_tasks (tenant_id, activity_id, due, assignee, open, \
                   overdue, state, position) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (tenant_id, activity_id) DO UPDATE SET due = EXCLUDED.due, \
                   assignee = EXCLUDED.assignee, open = EXCLUDED.open, \
                   overdue = EXCLUDED.overdue, state = EXCLUDED.state, \
                   position = EXCLUDED.position",
                &[
                    &event.tenant_id,
                    &event.stream_id,
                    &due,
                    &activity.assignee,
                    &(activity.state == ActivityState::Scheduled),
                    &activity.overdue,
                    &state,
                    &i64::try_from(event.global_position).unwrap_or(i64::MAX),
                ],
            )
            .await?;
            Ok(())
        })
    }
}
