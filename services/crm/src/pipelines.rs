//! The pipeline process manager (DOMAIN.md §2.10): when a pipeline gets a
//! new version, every open deal of the pipeline follows it
//! (`OpportunityCommand::FollowPipeline`): into the stage of the same key, or
//! the one the version's `stage_mapping` names for a stage it dropped. A deal
//! opened or reopened under an older version (one that raced the publish)
//! follows as soon as the process manager sees it, and so does an archived
//! deal once restored. Closed deals keep their version. A move is dated when
//! the process manager makes it (history is not backdated), and it does not
//! check the stage's required fields (they apply to users' moves).
//!
//! Versions published before stage mappings existed may have dropped a
//! stage without one: deals left in such a stage stay on their version.
//!
//! Runs on the projection runtime like the other process managers (see
//! [`crate::process`]): its tables know each deal's pipeline, version and
//! whether it is open, and each pipeline's newest version, as of the event
//! it handles.
use crm_domain::Aggregate;
use crm_domain::opportunity::{Opportunity, OpportunityCommand, OpportunityEvent};
use crm_domain::pipeline::{PipelineConfig, PipelineEvent};
use crm_domain::records::CommonEvent;
use crm_event_store::RecordedEvent;
use crm_projections::{ApplyError, Projection, Tx};
use uuid::Uuid;

use crate::command::{CommandHandler, ServiceError};
use crate::process::{Sender, decode, malformed};

pub const NAME: &str = "pipeline_follow";

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS pipeline_follow_deals (
    tenant_id   text    NOT NULL,
    deal_id     uuid    NOT NULL,
    pipeline_id uuid    NOT NULL,
    version     integer NOT NULL,
    open        boolean NOT NULL,
    PRIMARY KEY (tenant_id, deal_id)
);
CREATE INDEX IF NOT EXISTS pipeline_follow_open_deals
    ON pipeline_follow_deals (tenant_id, pipeline_id, deal_id) WHERE open;
CREATE TABLE IF NOT EXISTS pipeline_follow_versions (
    tenant_id   text    NOT NULL,
    pipeline_id uuid    NOT NULL,
    version     integer NOT NULL,
    PRIMARY KEY (tenant_id, pipeline_id)
)";

pub struct PipelineFollow {
    sender: Sender,
    handler: CommandHandler,
}

impl PipelineFollow {
    pub fn new(handler: CommandHandler) -> Self {
        Self {
            sender: Sender::new(handler.clone(), "pipeline", "system:pipelines"),
            handler,
        }
    }

    /// The newest version of `pipeline_id` this process manager has seen.
    async fn newest(
        tx: &Tx<'_>,
        event: &RecordedEvent,
        pipeline_id: Uuid,
    ) -> Result<i32, ApplyError> {
        Ok(tx
            .query_opt(
                "SELECT version FROM pipeline_follow_versions \
                 WHERE tenant_id = $1 AND pipeline_id = $2",
                &[&event.tenant_id, &pipeline_id],
            )
            .await?
            .map_or(0, |row| row.get(0)))
    }

    /// The pipeline's configuration as it is now.
    async fn config(
        &self,
        event: &RecordedEvent,
        pipeline_id: Uuid,
    ) -> Result<PipelineConfig, ApplyError> {
        let tenant =
            crm_domain::TenantId::parse(&event.tenant_id).map_err(|e| malformed(event, e))?;
        self.handler
            .state_or_default::<PipelineConfig>(&tenant, pipeline_id)
            .await
            .map_err(|e| match e {
                ServiceError::Unavailable(why) => ApplyError::Transient(why),
                other => malformed(event, other),
            })
    }

    /// Sends deal `deal_id` after `pipeline`'s current version (the `n`-th
    /// command `event` causes), dated now: that is when it moves.
    async fn follow(
        &self,
        tx: &Tx<'_>,
        event: &RecordedEvent,
        n: usize,
        deal_id: Uuid,
        pipeline: PipelineConfig,
    ) -> Result<(), ApplyError> {
        self.sender
            .send::<Opportunity>(
                tx,
                event,
                n,
                deal_id,
                jiff::Timestamp::now(),
                OpportunityCommand::FollowPipeline { pipeline },
            )
            .await
    }

    /// Sends an open deal of `pipeline_id` at `version` after a newer
    /// version, when the process manager has seen one.
    async fn catch_up(
        &self,
        tx: &Tx<'_>,
        event: &RecordedEvent,
        deal_id: Uuid,
        pipeline_id: Uuid,
        version: i32,
    ) -> Result<(), ApplyError> {
        if Self::newest(tx, event, pipeline_id).await? > version {
            let pipeline = self.config(event, pipeline_id).await?;
            self.follow(tx, event, 0, deal_id, pipeline).await?;
        }
        Ok(())
    }

    async fn deal(&self, tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
        let (tenant, deal_id) = (&event.tenant_id, event.stream_id);
        match decode::<OpportunityEvent>(event)? {
            Some(OpportunityEvent::Opened(opened)) => {
                let version = i32::try_from(opened.pipeline_version).unwrap_or(i32::MAX);
                tx.execute(
                    "INSERT INTO pipeline_follow_deals \
                       (tenant_id, deal_id, pipeline_id, version, open) \
                     VALUES ($1, $2, $3, $4, true) ON CONFLICT DO NOTHING",
                    &[tenant, &deal_id, &opened.pipeline_id, &version],
                )
                .await?;
                self.catch_up(tx, event, deal_id, opened.pipeline_id, version)
                    .await?;
            }
            Some(OpportunityEvent::Won(_) | OpportunityEvent::Lost(_)) => {
                tx.execute(
                    "UPDATE pipeline_follow_deals SET open = false \
                     WHERE tenant_id = $1 AND deal_id = $2",
                    &[tenant, &deal_id],
                )
                .await?;
            }
            Some(OpportunityEvent::Reopened(_)) => {
                let row = tx
                    .query_opt(
                        "UPDATE pipeline_follow_deals SET open = true \
                         WHERE tenant_id = $1 AND deal_id = $2 RETURNING pipeline_id, version",
                        &[tenant, &deal_id],
                    )
                    .await?;
                if let Some(row) = row {
                    self.catch_up(tx, event, deal_id, row.get(0), row.get(1))
                        .await?;
                }
            }
            // An archived deal refused to move; restored, it follows.
            Some(OpportunityEvent::Common(CommonEvent::Restored(_))) => {
                let row = tx
                    .query_opt(
                        "SELECT pipeline_id, version FROM pipeline_follow_deals \
                         WHERE tenant_id = $1 AND deal_id = $2 AND open",
                        &[tenant, &deal_id],
                    )
                    .await?;
                if let Some(row) = row {
                    self.catch_up(tx, event, deal_id, row.get(0), row.get(1))
                        .await?;
                }
            }
            Some(OpportunityEvent::StageChanged(changed)) => {
                if let Some(version) = changed.pipeline_version {
                    let version = i32::try_from(version).unwrap_or(i32::MAX);
                    tx.execute(
                        "UPDATE pipeline_follow_deals SET version = $3 \
                         WHERE tenant_id = $1 AND deal_id = $2",
                        &[tenant, &deal_id, &version],
                    )
                    .await?;
                }
            }
            Some(OpportunityEvent::DetailsUpdated(updated)) => {
                if let Some(change) = &updated.changes.pipeline_version {
                    let version = i32::try_from(change.new).unwrap_or(i32::MAX);
                    tx.execute(
                        "UPDATE pipeline_follow_deals SET version = $3 \
                         WHERE tenant_id = $1 AND deal_id = $2",
                        &[tenant, &deal_id, &version],
                    )
                    .await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    async fn pipeline(&self, tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
        let Some(PipelineEvent::Published(published)) = decode::<PipelineEvent>(event)? else {
            return Ok(());
        };
        let (tenant, pipeline_id) = (&event.tenant_id, event.stream_id);
        let version = i32::try_from(published.version).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO pipeline_follow_versions (tenant_id, pipeline_id, version) \
             VALUES ($1, $2, $3) ON CONFLICT (tenant_id, pipeline_id) \
             DO UPDATE SET version = GREATEST(pipeline_follow_versions.version, EXCLUDED.version)",
            &[tenant, &pipeline_id, &version],
        )
        .await?;
        // In a stable order, so that a redelivery numbers its commands (and
        // so their idempotency keys) the same way.
        let deals = tx
            .query(
                "SELECT deal_id FROM pipeline_follow_deals \
                 WHERE tenant_id = $1 AND pipeline_id = $2 AND open AND version < $3 \
                 ORDER BY deal_id",
                &[tenant, &pipeline_id, &version],
            )
            .await?;
        if deals.is_empty() {
            return Ok(());
        }
        let pipeline = self.config(event, pipeline_id).await?;
        for (n, row) in deals.iter().enumerate() {
            self.follow(tx, event, n, row.get(0), pipeline.clone())
                .await?;
        }
        Ok(())
    }
}

impl Projection for PipelineFollow {
    crm_projections::projection_names!(
        NAME,
        SCHEMA,
        ["pipeline_follow_deals", "pipeline_follow_versions"]
    );

    fn rebuildable(&self) -> bool {
        false
    }

    fn stream_types(&self) -> &'static [&'static str] {
        &["opportunity", "pipeline_config"]
    }

    fn apply<'a>(
        &'a self,
        tx: &'a Tx<'_>,
        event: &'a RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            match event.stream_type.as_str() {
                t if t == Opportunity::STREAM_TYPE => self.deal(tx, event).await,
                t if t == PipelineConfig::STREAM_TYPE => self.pipeline(tx, event).await,
                _ => Ok(()),
            }
        })
    }
}
