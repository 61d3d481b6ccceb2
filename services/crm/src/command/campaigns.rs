//! `crm.v1.Campaigns`: proto requests → campaign commands, with the member's
//! consent looked up first.
use crm_domain::DomainError;
use crm_domain::campaign::{
    Campaign, CampaignCommand, CampaignPlan, CampaignStatus, Member, purpose_for,
};
use crm_domain::contact::Contact;
use crm_domain::lead::Lead;
use crm_proto::v1 as pb;
use crm_proto::v1::campaigns_server::Campaigns;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::fields::{date, money, optional_id};
use super::{Caller, CommandHandler, Options, Pinned, ServiceError, parse_id};

pub struct CampaignsService {
    handler: CommandHandler,
}

impl CampaignsService {
    pub fn new(handler: CommandHandler) -> Self {
        Self { handler }
    }

    /// Whether campaign `id` may reach `member` (its consent for the
    /// campaign's channel, and not do-not-contact), with a pin on each
    /// person record read: consent withdrawn before the member's append makes
    /// the command read it again.
    async fn consent_of(
        &self,
        caller: &Caller,
        id: Uuid,
        member: Member,
    ) -> Result<(bool, Vec<Pinned>), ServiceError> {
        let tenant = &caller.tenant;
        let campaign = self
            .handler
            .state_or_default::<Campaign>(tenant, id)
            .await?;
        match member {
            Member::Contact(contact_id) => {
                let (contact, pin) = self.handler.fact::<Contact>(tenant, contact_id).await?;
                // An erased person keeps no consent to act on, a merged one
                // lives on as the survivor, an archived one is out of use.
                if !contact.usable() {
                    return Err(ServiceError::Domain(DomainError::InvalidReference {
                        field: "contact_id",
                    }));
                }
                Ok((
                    may_contact(&contact, &campaign.channel),
                    pin.into_iter().collect(),
                ))
            }
            Member::Lead(lead_id) => {
                let (lead, pin) = self.handler.fact::<Lead>(tenant, lead_id).await?;
                if !lead.usable() {
                    return Err(ServiceError::Domain(DomainError::InvalidReference {
                        field: "lead_id",
                    }));
                }
                let mut pins: Vec<Pinned> = pin.into_iter().collect();
                let consented = match &lead.converted_to {
                    // The person lives on as the contact: its consent and
                    // do-not-contact decide, not the lead's frozen copy.
                    Some(converted) => {
                        let (contact, pin) = self
                            .handler
                            .fact::<Contact>(tenant, converted.contact_id)
                            .await?;
                        pins.extend(pin);
                        may_contact(&contact, &campaign.channel)
                    }
                    // As for a contact: the consent the lead was captured
                    // with (or given later) for the campaign's channel.
                    None => purpose_for(&campaign.channel)
                        .is_none_or(|purpose| lead.consent.get(purpose).is_some_and(|c| c.granted)),
                };
                Ok((consented, pins))
            }
        }
    }

    async fn run(
        &self,
        caller: Caller,
        options: Options,
        id: Uuid,
        command: CampaignCommand,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let reply = self
            .handler
            .execute::<Campaign>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }
}

/// Whether a campaign on `channel` may reach the person `contact`: the
/// consent the channel needs (if any) is granted and they did not ask not to
/// be contacted.
fn may_contact(contact: &Contact, channel: &str) -> bool {
    purpose_for(channel).is_none_or(|purpose| {
        contact.consent.get(purpose).is_some_and(|c| c.granted)
            && !contact.preferences.do_not_contact
    })
}

#[tonic::async_trait]
impl Campaigns for CampaignsService {
    async fn plan_campaign(
        &self,
        request: Request<pb::PlanCampaignRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("PlanCampaign", request.options.as_ref(), &request)?;
        let id = parse_id("campaign_id", &request.campaign_id, true)?;
        let plan = CampaignPlan {
            name: request.name,
            campaign_type: request.r#type,
            channel: request.channel,
            parent_id: optional_id("parent_id", &request.parent_id)?,
            starts_on: date("starts_on", &request.starts_on)?,
            ends_on: date("ends_on", &request.ends_on)?,
            budget: money("budget", request.budget)?,
            owner: if request.owner.is_empty() {
                caller.actor.clone()
            } else {
                request.owner
            },
            utm_campaign: request.utm_campaign,
        };
        let command = CampaignCommand::Plan { self_id: id, plan };
        super::precheck(&Campaign::default(), command.clone())?;
        if let Some(reply) = self.handler.replayed(&caller, id, &options).await? {
            return Ok(Response::new(reply));
        }
        // The parent must be a campaign that exists already: so it is older
        // than this one, and parents can never form a cycle. (Existence only,
        // which never changes back: a retry still replays.)
        if let CampaignCommand::Plan {
            plan:
                CampaignPlan {
                    parent_id: Some(parent),
                    ..
                },
            ..
        } = &command
            && !self
                .handler
                .state_or_default::<Campaign>(&caller.tenant, *parent)
                .await?
                .exists
        {
            return Err(
                ServiceError::Domain(crm_domain::DomainError::InvalidReference {
                    field: "parent_id",
                })
                .into(),
            );
        }
        self.run(caller, options, id, command).await
    }

    async fn change_campaign_status(
        &self,
        request: Request<pb::ChangeCampaignStatusRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("ChangeCampaignStatus", request.options.as_ref(), &request)?;
        let id = parse_id("campaign_id", &request.campaign_id, false)?;
        let to = CampaignStatus::parse(&request.status)
            .filter(|s| *s != CampaignStatus::Planned)
            .ok_or_else(|| {
                ServiceError::invalid("status", "must be active, completed or aborted")
            })?;
        self.run(caller, options, id, CampaignCommand::ChangeStatus { to })
            .await
    }

    async fn record_campaign_cost(
        &self,
        request: Request<pb::RecordCampaignCostRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("RecordCampaignCost", request.options.as_ref(), &request)?;
        let id = parse_id("campaign_id", &request.campaign_id, false)?;
        let command = CampaignCommand::RecordCost {
            amount: money("amount", request.amount)?,
            spent_on: date("spent_on", &request.spent_on)?,
            source: request.source,
        };
        self.run(caller, options, id, command).await
    }

    async fn add_campaign_member(
        &self,
        request: Request<pb::AddCampaignMemberRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("AddCampaignMember", request.options.as_ref(), &request)?;
        let id = parse_id("campaign_id", &request.campaign_id, false)?;
        let member = member(&request.contact_id, &request.lead_id)?;
        // A retry replays whatever the member's consent or state is now.
        if let Some(reply) = self.handler.replayed(&caller, id, &options).await? {
            return Ok(Response::new(reply));
        }
        let (this, caller) = (self, &caller);
        let reply = self
            .handler
            .execute_on::<Campaign, _>(caller, id, &options, || async move {
                let (consented, pins) = this.consent_of(caller, id, member).await?;
                Ok((CampaignCommand::AddMember { member, consented }, pins))
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn record_campaign_response(
        &self,
        request: Request<pb::RecordCampaignResponseRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("RecordCampaignResponse", request.options.as_ref(), &request)?;
        let id = parse_id("campaign_id", &request.campaign_id, false)?;
        let member = member(&request.contact_id, &request.lead_id)?;
        self.run(
            caller,
            options,
            id,
            CampaignCommand::RecordResponse {
                member,
                response: request.response,
            },
        )
        .await
    }
}

/// The member a request names: exactly one of `contact_id` and `lead_id`.
fn member(contact_id: &str, lead_id: &str) -> Result<Member, ServiceError> {
    match (contact_id.is_empty(), lead_id.is_empty()) {
        (false, true) => Ok(Member::Contact(parse_id("contact_id", contact_id, false)?)),
        (true, false) => Ok(Member::Lead(parse_id("lead_id", lead_id, false)?)),
        (true, true) => Err(ServiceError::invalid(
            "contact_id",
            "is required (or lead_id): exactly one of them",
        )),
        (false, false) => Err(ServiceError::invalid(
            "lead_id",
            "must be empty when contact_id is given: exactly one of them",
        )),
    }
}
