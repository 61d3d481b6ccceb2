//! `crm.v1.Records`: owner, tags and shares on any main record, dispatched
//! to the record's own aggregate.
use crm_domain::account::{Account, AccountCommand};
use crm_domain::contact::{Contact, ContactCommand};
use crm_domain::lead::{Lead, LeadCommand};
use crm_domain::opportunity::{Opportunity, OpportunityCommand};
use crm_domain::records::CommonCommand;
use crm_domain::ticket::{Ticket, TicketCommand};
use crm_proto::v1 as pb;
use crm_proto::v1::records_server::Records;
use tonic::{Request, Response, Status};

use super::{Caller, CommandHandler, Options, ServiceError, parse_id};

pub struct RecordsService {
    handler: CommandHandler,
}

impl RecordsService {
    pub fn new(handler: CommandHandler) -> Self {
        Self { handler }
    }

    async fn run(
        &self,
        caller: Caller,
        options: Options,
        record: Option<pb::RecordRef>,
        command: CommonCommand,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let record = record.ok_or_else(|| ServiceError::invalid("record", "is required"))?;
        let id = parse_id("record.id", &record.id, false)?;
        let handler = &self.handler;
        let reply = match record.r#type.as_str() {
            "contact" => {
                handler
                    .execute::<Contact>(&caller, id, &options, ContactCommand::Common(command))
                    .await
            }
            "account" => {
                handler
                    .execute::<Account>(&caller, id, &options, AccountCommand::Common(command))
                    .await
            }
            "lead" => {
                handler
                    .execute::<Lead>(&caller, id, &options, LeadCommand::Common(command))
                    .await
            }
            "opportunity" => {
                handler
                    .execute::<Opportunity>(
                        &caller,
                        id,
                        &options,
                        OpportunityCommand::Common(command),
                    )
                    .await
            }
            "ticket" => {
                handler
                    .execute::<Ticket>(&caller, id, &options, TicketCommand::Common(command))
                    .await
            }
            _ => Err(ServiceError::invalid(
                "record.type",
                "must be contact, account, lead, opportunity or ticket",
            )),
        }?;
        Ok(Response::new(reply))
    }
}

#[tonic::async_trait]
impl Records for RecordsService {
    async fn assign_owner(
        &self,
        request: Request<pb::AssignOwnerRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("AssignOwner", request.options.as_ref(), &request)?;
        let command = CommonCommand::AssignOwner {
            owner: request.owner,
            team: (!request.team.is_empty()).then_some(request.team),
            method: if request.method.is_empty() {
                "manual".to_owned()
            } else {
                request.method
            },
        };
        self.run(caller, options, request.record, command).await
    }

    async fn change_tags(
        &self,
        request: Request<pb::ChangeTagsRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("ChangeTags", request.options.as_ref(), &request)?;
        let command = CommonCommand::ChangeTags {
            add: request.add,
            remove: request.remove,
        };
        self.run(caller, options, request.record, command).await
    }

    async fn share_record(
        &self,
        request: Request<pb::ShareRecordRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("ShareRecord", request.options.as_ref(), &request)?;
        let expires_at = if request.expires_at.is_empty() {
            None
        } else {
            Some(super::fields::timestamp("expires_at", &request.expires_at)?)
        };
        let command = CommonCommand::Share {
            grantee: request.grantee,
            level: request.level,
            expires_at,
        };
        self.run(caller, options, request.record, command).await
    }

    async fn revoke_share(
        &self,
        request: Request<pb::RevokeShareRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("RevokeShare", request.options.as_ref(), &request)?;
        self.run(
            caller,
            options,
            request.record,
            CommonCommand::RevokeShare {
                grantee: request.grantee,
            },
        )
        .await
    }

    async fn archive_record(
        &self,
        request: Request<pb::ArchiveRecordRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("ArchiveRecord", request.options.as_ref(), &request)?;
        let command = CommonCommand::Archive(super::contacts::reason(request.reason));
        self.run(caller, options, request.record, command).await
    }

    async fn restore_record(
        &self,
        request: Request<pb::RestoreRecordRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("RestoreRecord", request.options.as_ref(), &request)?;
        let command = CommonCommand::Restore(super::contacts::reason(request.reason));
        self.run(caller, options, request.record, command).await
    }
}
