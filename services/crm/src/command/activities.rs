//! `crm.v1.Activities`: proto requests → activity commands, with the targets
//! checked to exist (as the kind the caller named) first.
use crm_domain::TenantId;
use crm_domain::activity::{Activity, ActivityCommand, Target};
use crm_proto::v1 as pb;
use crm_proto::v1::activities_server::Activities;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::fields::tenant_scoped_id;
use super::{Caller, CommandHandler, Options, ServiceError, parse_id};

pub struct ActivitiesService {
    handler: CommandHandler,
}

impl ActivitiesService {
    pub fn new(handler: CommandHandler) -> Self {
        Self { handler }
    }

    /// Whether every target exists in the caller's tenant as the kind named.
    async fn targets_exist(
        &self,
        tenant: &TenantId,
        targets: &[Target],
    ) -> Result<bool, ServiceError> {
        for target in targets {
            if !self
                .handler
                .is_a(tenant, target.id, &[target.kind.as_str()])
                .await?
            {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// The request's targets, counted before any is parsed or looked up.
fn targets(targets: Vec<pb::ActivityTarget>) -> Result<Vec<Target>, ServiceError> {
    if targets.len() > crm_domain::activity::MAX_TARGETS {
        return Err(ServiceError::invalid(
            "targets",
            "must have at most 20 targets",
        ));
    }
    targets
        .into_iter()
        .enumerate()
        .map(|(i, target)| {
            let id = Uuid::parse_str(&target.id).map_err(|_| {
                ServiceError::Domain(crm_domain::DomainError::invalid(
                    format!("targets[{i}].id"),
                    "must be a UUID",
                ))
            })?;
            Ok(Target {
                kind: target.kind,
                id,
            })
        })
        .collect()
}

/// An activity id derived from a synced message's external id (UUIDv5 under a
/// per-tenant namespace).
fn from_external_id(tenant: &TenantId, external_id: &str) -> Uuid {
    tenant_scoped_id(tenant, &format!("activity:{external_id}"))
}

#[tonic::async_trait]
impl Activities for ActivitiesService {
    async fn log_activity(
        &self,
        request: Request<pb::LogActivityRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("LogActivity", request.options.as_ref(), &request)?;
        let derived = request.activity_id.is_empty() && !request.external_id.is_empty();
        let id = if derived {
            from_external_id(&caller.tenant, &request.external_id)
        } else {
            parse_id("activity_id", &request.activity_id, true)?
        };
        let targets = targets(request.targets)?;
        let mut command = ActivityCommand::Log {
            kind: request.kind,
            direction: request.direction,
            targets,
            outcome: request.outcome,
            body: request.body,
            external_id: request.external_id,
            targets_exist: true,
        };
        super::precheck(&Activity::default(), command.clone())?;
        if let ActivityCommand::Log {
            targets,
            targets_exist,
            ..
        } = &mut command
        {
            *targets_exist = self.targets_exist(&caller.tenant, targets).await?;
        }
        let reply = self
            .handler
            .execute::<Activity>(&caller, id, &options, command)
            .await;
        // A re-synced message is the same activity: answer it, change nothing.
        let reply = match reply {
            Err(ServiceError::Domain(crm_domain::DomainError::AlreadyExists { .. })) if derived => {
                let (_, version, position) =
                    self.handler.load::<Activity>(&caller.tenant, id).await?;
                self.handler
                    .unchanged(&caller, id, version, position, &options)
                    .await?
            }
            other => other?,
        };
        Ok(Response::new(reply))
    }

    async fn schedule_activity(
        &self,
        request: Request<pb::ScheduleActivityRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("ScheduleActivity", request.options.as_ref(), &request)?;
        let id = parse_id("activity_id", &request.activity_id, true)?;
        let due = super::fields::timestamp("due", &request.due)?;
        let targets = targets(request.targets)?;
        let mut command = ActivityCommand::Schedule {
            kind: request.kind,
            targets,
            due,
            assignee: if request.assignee.is_empty() {
                caller.actor.clone()
            } else {
                request.assignee
            },
            subject: request.subject,
            targets_exist: true,
        };
        super::precheck(&Activity::default(), command.clone())?;
        if let ActivityCommand::Schedule {
            targets,
            targets_exist,
            ..
        } = &mut command
        {
            *targets_exist = self.targets_exist(&caller.tenant, targets).await?;
        }
        let reply = self
            .handler
            .execute::<Activity>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn mark_task_overdue(
        &self,
        request: Request<pb::MarkTaskOverdueRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        super::configuration::require_role(&caller, &["system"], "send time-driven commands")?;
        let request = request.into_inner();
        let options = Options::parse("MarkTaskOverdue", request.options.as_ref(), &request)?;
        let id = parse_id("activity_id", &request.activity_id, false)?;
        let reply = self
            .handler
            .execute::<Activity>(&caller, id, &options, ActivityCommand::MarkTaskOverdue)
            .await?;
        Ok(Response::new(reply))
    }

    async fn complete_activity(
        &self,
        request: Request<pb::CompleteActivityRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("CompleteActivity", request.options.as_ref(), &request)?;
        let id = parse_id("activity_id", &request.activity_id, false)?;
        let command = ActivityCommand::Complete {
            outcome: request.outcome,
            notes: request.notes,
        };
        let reply = self
            .handler
            .execute::<Activity>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn update_activity_details(
        &self,
        request: Request<pb::UpdateActivityDetailsRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("UpdateActivityDetails", request.options.as_ref(), &request)?;
        let id = parse_id("activity_id", &request.activity_id, false)?;
        let due = request
            .due
            .as_deref()
            .map(|due| super::fields::timestamp("due", due))
            .transpose()?;
        let command = ActivityCommand::UpdateDetails {
            due,
            assignee: request.assignee,
            subject: request.subject,
        };
        let reply = self
            .handler
            .execute::<Activity>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }
}
