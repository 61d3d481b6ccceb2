//! `crm.v1.Tickets`: proto requests → ticket commands.
use crm_domain::ticket::{
    AuthorRole, Channel, Priority, Ticket, TicketCommand, TicketDetails, TicketStatus, TicketType,
    TriagePatch,
};
use crm_proto::v1 as pb;
use crm_proto::v1::tickets_server::Tickets;
use tonic::{Request, Response, Status};

use crm_domain::DomainError;
use uuid::Uuid;

use super::fields::tenant_scoped_id;
use super::{Caller, CommandHandler, Options, ServiceError, parse_id};

pub struct TicketsService {
    handler: CommandHandler,
}

impl TicketsService {
    pub fn new(handler: CommandHandler) -> Self {
        Self { handler }
    }

    async fn run(
        &self,
        caller: Caller,
        options: Options,
        id: uuid::Uuid,
        command: TicketCommand,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let reply = self
            .handler
            .execute::<Ticket>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }
}

/// How many closed follow-ups a customer reply passes before it gives up.
const MAX_FOLLOW_UP_HOPS: usize = 20;

/// The id of the follow-up of closed ticket `of`: derived, so that concurrent
/// replies and retries converge on one follow-up.
pub fn follow_up_id(tenant: &crm_domain::TenantId, of: Uuid) -> Uuid {
    tenant_scoped_id(tenant, &format!("ticket_follow_up:{of}"))
}

impl TicketsService {
    /// A ticket's subject, as its first event (`TicketOpened`) has it: the
    /// state keeps no personal text.
    async fn subject(&self, caller: &Caller, id: Uuid) -> Result<String, ServiceError> {
        let events = self
            .handler
            .store
            .read_stream(&caller.tenant, id, 1, 1)
            .await
            .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
        let opened = events
            .first()
            .filter(|e| e.event_type == "TicketOpened")
            .ok_or_else(|| ServiceError::Internal(format!("ticket {id} has no TicketOpened")))?;
        let payload: serde_json::Value = opened
            .payload
            .as_str()
            .parse()
            .map_err(|e| ServiceError::Internal(format!("ticket {id}: {e}")))?;
        Ok(payload["subject"].as_str().unwrap_or_default().to_owned())
    }

    /// A customer's reply to closed ticket `closed` (DOMAIN.md §2.6): it
    /// goes to the ticket's follow-up, opened with this reply when there is
    /// none yet; a closed follow-up passes it to its own follow-up. The
    /// caller's expected version is the closed ticket's.
    async fn follow_up(
        &self,
        caller: &Caller,
        options: &Options,
        closed: Uuid,
        author: String,
        body: String,
    ) -> Result<pb::CommandReply, ServiceError> {
        let (state, version, _) = self.handler.load::<Ticket>(&caller.tenant, closed).await?;
        if let Some(expected) = options.expected_version
            && expected != version
        {
            return Err(ServiceError::VersionConflict { current: version });
        }
        let options = Options {
            expected_version: None,
            ..options.clone()
        };
        let (mut of, mut of_state) = (closed, state);
        for _ in 0..MAX_FOLLOW_UP_HOPS {
            let id = follow_up_id(&caller.tenant, of);
            let next = self
                .handler
                .state_or_default::<Ticket>(&caller.tenant, id)
                .await?;
            if next.is_closed() {
                (of, of_state) = (id, next);
                continue;
            }
            let command = if next.exists {
                TicketCommand::AddMessage {
                    author_role: AuthorRole::Customer,
                    author: author.clone(),
                    public: true,
                    body: body.clone(),
                }
            } else {
                let subject = self.subject(caller, of).await?;
                let details = of_state.follow_up_details(subject).ok_or_else(|| {
                    ServiceError::Internal(format!("closed ticket {of} has no details"))
                })?;
                TicketCommand::OpenFollowUp {
                    of,
                    details,
                    author: author.clone(),
                    body: body.clone(),
                }
            };
            match self
                .handler
                .execute::<Ticket>(caller, id, &options, command)
                .await
            {
                // Another reply opened it first: add to it.
                Err(ServiceError::Domain(DomainError::AlreadyExists { .. })) => {
                    let command = TicketCommand::AddMessage {
                        author_role: AuthorRole::Customer,
                        author: author.clone(),
                        public: true,
                        body: body.clone(),
                    };
                    return self
                        .handler
                        .execute::<Ticket>(caller, id, &options, command)
                        .await;
                }
                other => return other,
            }
        }
        Err(ServiceError::Domain(DomainError::InvalidTransition {
            from: "closed",
            to: "changed",
        }))
    }
}

/// An open ticket, to check a command's input on before its lookups.
fn live_ticket() -> Ticket {
    Ticket {
        exists: true,
        status: Some(crm_domain::ticket::TicketStatus::Open),
        ..Ticket::default()
    }
}

fn one_of<T: Copy>(
    field: &'static str,
    value: &str,
    parse: fn(&str) -> Option<T>,
    rule: &'static str,
) -> Result<T, ServiceError> {
    parse(value).ok_or_else(|| ServiceError::invalid(field, rule))
}

const TYPES: &str = "must be question, incident, request or complaint";
const PRIORITIES: &str = "must be low, normal, high or urgent";

#[tonic::async_trait]
impl Tickets for TicketsService {
    async fn assign_ticket(
        &self,
        request: Request<pb::AssignTicketRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        use crm_domain::configuration::{AgentConfig, Queue};
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("AssignTicket", request.options.as_ref(), &request)?;
        let id = parse_id("ticket_id", &request.ticket_id, false)?;
        let queue_id = parse_id("queue_id", &request.queue_id, false)?;
        let assignee = (!request.assignee.is_empty()).then_some(request.assignee);
        let mut command = TicketCommand::Assign {
            queue: queue_id.to_string(),
            assignee: assignee.clone(),
            method: if request.method.is_empty() {
                "manual".to_owned()
            } else {
                request.method
            },
            eligible: true,
            override_reason: request.override_reason,
        };
        super::precheck(&live_ticket(), command.clone())?;
        let queue: Queue = self
            .handler
            .published(&caller.tenant, queue_id, "queue_id")
            .await?;
        let is_eligible = match &assignee {
            None => true,
            Some(agent) => {
                let availability = self
                    .handler
                    .state_or_default::<AgentConfig>(
                        &caller.tenant,
                        super::configuration::agent_id(&caller.tenant, agent),
                    )
                    .await?
                    .current()
                    .cloned();
                queue.members.contains(agent)
                    && availability.is_some_and(|a| {
                        a.status == "online"
                            && queue.skills.iter().all(|skill| a.skills.contains(skill))
                    })
            }
        };
        if let TicketCommand::Assign { eligible, .. } = &mut command {
            *eligible = is_eligible;
        }
        self.run(caller, options, id, command).await
    }

    async fn open_ticket(
        &self,
        request: Request<pb::OpenTicketRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("OpenTicket", request.options.as_ref(), &request)?;
        let id = parse_id("ticket_id", &request.ticket_id, true)?;
        let details = TicketDetails {
            requester_id: parse_id("requester_id", &request.requester_id, false)?,
            account_id: if request.account_id.is_empty() {
                None
            } else {
                Some(parse_id("account_id", &request.account_id, false)?)
            },
            channel: one_of(
                "channel",
                &request.channel,
                Channel::parse,
                "must be email, phone, chat, web or social",
            )?,
            ticket_type: one_of("type", &request.r#type, TicketType::parse, TYPES)?,
            category: request.category,
            priority: if request.priority.is_empty() {
                None
            } else {
                Some(one_of(
                    "priority",
                    &request.priority,
                    Priority::parse,
                    PRIORITIES,
                )?)
            },
            subject: request.subject,
        };
        super::precheck(&Ticket::default(), TicketCommand::Open(details.clone()))?;
        if let Some(reply) = self.handler.replayed(&caller, id, &options).await? {
            return Ok(Response::new(reply));
        }
        // The requester: a contact, or an account (a person's, B2C).
        self.handler
            .refers_to(
                &caller.tenant,
                details.requester_id,
                &["contact", "account"],
                "requester_id",
            )
            .await?;
        if let Some(account) = details.account_id {
            self.handler
                .refers_to(&caller.tenant, account, &["account"], "account_id")
                .await?;
        }
        self.run(caller, options, id, TicketCommand::Open(details))
            .await
    }

    async fn triage_ticket(
        &self,
        request: Request<pb::TriageTicketRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("TriageTicket", request.options.as_ref(), &request)?;
        let id = parse_id("ticket_id", &request.ticket_id, false)?;
        let patch = TriagePatch {
            ticket_type: request
                .r#type
                .as_deref()
                .map(|t| one_of("type", t, TicketType::parse, TYPES))
                .transpose()?,
            category: request.category,
            priority: request
                .priority
                .as_deref()
                .map(|p| one_of("priority", p, Priority::parse, PRIORITIES))
                .transpose()?,
        };
        self.run(caller, options, id, TicketCommand::Triage(patch))
            .await
    }

    async fn add_ticket_message(
        &self,
        request: Request<pb::AddTicketMessageRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("AddTicketMessage", request.options.as_ref(), &request)?;
        let id = parse_id("ticket_id", &request.ticket_id, false)?;
        let author_role = one_of(
            "author_role",
            &request.author_role,
            AuthorRole::parse,
            "must be customer, agent or system",
        )?;
        let author = if request.author.is_empty() {
            caller.actor.clone()
        } else {
            request.author
        };
        let command = TicketCommand::AddMessage {
            author_role,
            author: author.clone(),
            public: request.public,
            body: request.body.clone(),
        };
        // Before a closed ticket's follow-up lookups.
        super::precheck(&live_ticket(), command.clone())?;
        match self
            .handler
            .execute::<Ticket>(&caller, id, &options, command)
            .await
        {
            Err(ServiceError::Domain(DomainError::InvalidTransition {
                from: "closed", ..
            })) if author_role == AuthorRole::Customer => {
                if !request.public {
                    let rule = "customer messages are always public";
                    return Err(ServiceError::invalid("public", rule).into());
                }
                let reply = self
                    .follow_up(&caller, &options, id, author, request.body)
                    .await?;
                Ok(Response::new(reply))
            }
            other => Ok(Response::new(other?)),
        }
    }

    async fn change_ticket_status(
        &self,
        request: Request<pb::ChangeTicketStatusRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("ChangeTicketStatus", request.options.as_ref(), &request)?;
        let id = parse_id("ticket_id", &request.ticket_id, false)?;
        let to = TicketStatus::parse(&request.status)
            .filter(|s| {
                matches!(
                    s,
                    TicketStatus::Open | TicketStatus::Pending | TicketStatus::OnHold
                )
            })
            .ok_or_else(|| ServiceError::invalid("status", "must be open, pending or on_hold"))?;
        self.run(caller, options, id, TicketCommand::ChangeStatus { to })
            .await
    }

    async fn escalate_ticket(
        &self,
        request: Request<pb::EscalateTicketRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("EscalateTicket", request.options.as_ref(), &request)?;
        let id = parse_id("ticket_id", &request.ticket_id, false)?;
        let level = u8::try_from(request.level)
            .map_err(|_| ServiceError::invalid("level", "must be 1 to 255"))?;
        let command = TicketCommand::Escalate {
            level,
            rule: request.rule,
            target: request.target,
        };
        self.run(caller, options, id, command).await
    }

    async fn solve_ticket(
        &self,
        request: Request<pb::SolveTicketRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("SolveTicket", request.options.as_ref(), &request)?;
        let id = parse_id("ticket_id", &request.ticket_id, false)?;
        let command = TicketCommand::Solve {
            resolution: request.resolution,
            root_cause: request.root_cause,
        };
        self.run(caller, options, id, command).await
    }

    async fn reopen_ticket(
        &self,
        request: Request<pb::ReopenTicketRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("ReopenTicket", request.options.as_ref(), &request)?;
        let id = parse_id("ticket_id", &request.ticket_id, false)?;
        self.run(
            caller,
            options,
            id,
            TicketCommand::Reopen {
                cause: request.cause,
            },
        )
        .await
    }

    async fn close_ticket(
        &self,
        request: Request<pb::CloseTicketRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("CloseTicket", request.options.as_ref(), &request)?;
        let id = parse_id("ticket_id", &request.ticket_id, false)?;
        self.run(caller, options, id, TicketCommand::Close).await
    }

    async fn record_csat(
        &self,
        request: Request<pb::RecordCsatRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("RecordCsat", request.options.as_ref(), &request)?;
        let id = parse_id("ticket_id", &request.ticket_id, false)?;
        let score = u8::try_from(request.score).unwrap_or(0);
        self.run(
            caller,
            options,
            id,
            TicketCommand::RecordCsat {
                score,
                comment: request.comment,
            },
        )
        .await
    }
}
