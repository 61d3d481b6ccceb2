//! `crm.v1.ProjectionsAdmin`: projection status and rebuilds over gRPC.
use std::pin::Pin;
use std::sync::Arc;

use crm_event_store::EventStore;
use crm_projections::{Projection, RebuildError};
use crm_proto::v1::projections_admin_server::ProjectionsAdmin;
use crm_proto::v1::{
    ListProjectionsReply, ListProjectionsRequest, ProjectionStatus, RebuildProgress,
    RebuildProjectionRequest,
};
use deadpool_postgres::Pool;
use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::command::{Caller, ServiceError};

#[derive(Clone)]
pub struct ProjectionsAdminService {
    store: EventStore,
    pool: Pool,
    pg: tokio_postgres::Config,
    /// Every projection and process manager this server knows.
    known: Vec<Arc<dyn Projection>>,
}

impl ProjectionsAdminService {
    pub fn new(
        store: EventStore,
        pool: Pool,
        pg: tokio_postgres::Config,
        known: Vec<Arc<dyn Projection>>,
    ) -> Self {
        Self {
            store,
            pool,
            pg,
            known,
        }
    }
}

/// The read models are shared by every tenant: operating them is for the
/// platform's operators, not a tenant's admin.
fn admin(request_metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
    let caller = Caller::from_metadata(request_metadata)?;
    crate::command::require_role(&caller, &["operator"], "operate projections")?;
    Ok(())
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<RebuildProgress, Status>> + Send>>;

#[tonic::async_trait]
impl ProjectionsAdmin for ProjectionsAdminService {
    type RebuildProjectionStream = ProgressStream;

    async fn list_projections(
        &self,
        request: Request<ListProjectionsRequest>,
    ) -> Result<Response<ListProjectionsReply>, Status> {
        admin(request.metadata())?;
        let client = self.pool.get().await.map_err(super::unavailable)?;
        let statuses = crm_projections::statuses(&client)
            .await
            .map_err(super::unavailable)?;
        Ok(Response::new(ListProjectionsReply {
            projections: statuses
                .into_iter()
                .map(|s| ProjectionStatus {
                    name: s.name,
                    position: s.position,
                    state: s.state,
                    lag_events: s.lag_events,
                    lag_seconds: s.lag_seconds,
                    holes_refilled: s.holes_refilled,
                    last_error: s.last_error.unwrap_or_default(),
                    error_position: s.error_position.unwrap_or(0),
                })
                .collect(),
        }))
    }

    async fn rebuild_projection(
        &self,
        request: Request<RebuildProjectionRequest>,
    ) -> Result<Response<Self::RebuildProjectionStream>, Status> {
        admin(request.metadata())?;
        let name = request.into_inner().name;
        let projection: Arc<dyn Projection> = self
            .known
            .iter()
            .find(|p| p.name() == name)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no projection named {name:?}")))?;
        if !projection.rebuildable() {
            return Err(Status::failed_precondition(format!(
                "{name} is a process manager: its effect is the commands it sent, so it is never rebuilt"
            )));
        }
        let (sender, receiver) = mpsc::channel(16);
        let (store, pg) = (self.store.clone(), self.pg.clone());
        // The rebuild runs to its end even if the caller goes away; progress
        // that the caller does not read in time is dropped, the end is not.
        tokio::spawn(async move {
            let progress = sender.clone();
            let result = crm_projections::rebuild(
                projection,
                &store,
                &pg,
                crm_projections::REBUILD_CHUNK,
                |p| {
                    let _ = progress.try_send(Ok(RebuildProgress {
                        position: p.position,
                        head: p.head,
                        done: false,
                    }));
                },
            )
            .await;
            let last = match result {
                Ok(position) => Ok(RebuildProgress {
                    position,
                    head: position,
                    done: true,
                }),
                Err(RebuildError::AlreadyRunning(name)) => Err(Status::failed_precondition(
                    format!("a rebuild of {name} is already running"),
                )),
                Err(error) => {
                    tracing::error!(%error, "rebuild failed");
                    Err(Status::from(ServiceError::Internal(error.to_string())))
                }
            };
            let _ = sender.send(last).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }
}
