//! `crm.v1.Leads`: proto requests → lead commands and the conversion.
use crm_domain::contact::PersonName;
use crm_domain::lead::{
    Lead, LeadCommand, LeadConsent, LeadDetails, LeadDetailsPatch, LeadMergeChoices, LeadSource,
    LeadStatus,
};
use crm_proto::v1 as pb;
use crm_proto::v1::leads_server::Leads;
use tonic::{Request, Response, Status};

use super::contacts::{emails, phones, reason};
use super::fields::{merge_ids, optional_id};
use super::{Caller, CommandHandler, Options, ServiceError, parse_id};

/// One decision per purpose at most (there are five purposes).
const MAX_CONSENT_DECISIONS: usize = 5;

fn consent(decisions: Vec<pb::LeadConsent>) -> Result<Vec<LeadConsent>, ServiceError> {
    if decisions.len() > MAX_CONSENT_DECISIONS {
        return Err(ServiceError::invalid(
            "consent",
            "must hold at most 5 decisions, one per purpose",
        ));
    }
    Ok(decisions
        .into_iter()
        .map(|c| LeadConsent {
            purpose: c.purpose,
            granted: c.granted,
            source: c.source,
            basis: c.basis,
        })
        .collect())
}

pub struct LeadsService {
    handler: CommandHandler,
}

impl LeadsService {
    pub fn new(handler: CommandHandler) -> Self {
        Self { handler }
    }
}

fn source(source: Option<pb::LeadSource>) -> Result<LeadSource, ServiceError> {
    let source = source.unwrap_or_default();
    let campaign_id = optional_id("source.campaign_id", &source.campaign_id)?;
    Ok(LeadSource {
        channel: source.channel,
        campaign_id,
        utm_source: source.utm_source,
        utm_medium: source.utm_medium,
        utm_campaign: source.utm_campaign,
    })
}

#[tonic::async_trait]
impl Leads for LeadsService {
    async fn capture_lead(
        &self,
        request: Request<pb::CaptureLeadRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("CaptureLead", request.options.as_ref(), &request)?;
        let id = parse_id("lead_id", &request.lead_id, true)?;
        let name = request.name.unwrap_or_default();
        let command = LeadCommand::Capture(LeadDetails {
            name: PersonName {
                given: name.given,
                family: name.family,
            },
            company: request.company,
            emails: emails(request.emails),
            phones: phones(request.phones),
            source: source(request.source)?,
            consent: consent(request.consent)?,
        });
        super::precheck(&Lead::default(), command.clone())?;
        if let Some(reply) = self.handler.replayed(&caller, id, &options).await? {
            return Ok(Response::new(reply));
        }
        // The campaign the lead is attributed to must exist (ROI counts it).
        if let LeadCommand::Capture(LeadDetails {
            source:
                LeadSource {
                    campaign_id: Some(campaign),
                    ..
                },
            ..
        }) = &command
        {
            self.handler
                .refers_to(
                    &caller.tenant,
                    *campaign,
                    &["campaign"],
                    "source.campaign_id",
                )
                .await?;
        }
        let reply = self
            .handler
            .execute::<Lead>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn update_lead_details(
        &self,
        request: Request<pb::UpdateLeadDetailsRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("UpdateLeadDetails", request.options.as_ref(), &request)?;
        let id = parse_id("lead_id", &request.lead_id, false)?;
        let command = LeadCommand::UpdateDetails(LeadDetailsPatch {
            name: request.name.map(|n| PersonName {
                given: n.given,
                family: n.family,
            }),
            company: request.company,
            emails: request.emails.map(|e| emails(e.items)),
            phones: request.phones.map(|p| phones(p.items)),
            consent: consent(request.consent)?,
        });
        let reply = self
            .handler
            .execute::<Lead>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn erase_lead_personal_data(
        &self,
        request: Request<pb::EraseLeadPersonalDataRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("EraseLeadPersonalData", request.options.as_ref(), &request)?;
        let id = parse_id("lead_id", &request.lead_id, false)?;
        let reply = self
            .handler
            .erase::<Lead>(
                &caller,
                id,
                &options,
                LeadCommand::ErasePersonalData {
                    request: request.request,
                },
            )
            .await?;
        Ok(Response::new(reply))
    }

    async fn change_lead_status(
        &self,
        request: Request<pb::ChangeLeadStatusRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("ChangeLeadStatus", request.options.as_ref(), &request)?;
        let id = parse_id("lead_id", &request.lead_id, false)?;
        let to = LeadStatus::parse(&request.status)
            .filter(|status| *status != LeadStatus::Converted)
            .ok_or_else(|| {
                ServiceError::invalid(
                    "status",
                    "must be new, working, nurturing, qualified or disqualified",
                )
            })?;
        let command = LeadCommand::ChangeStatus {
            to,
            reason: request.reason.map(|r| reason(Some(r))),
        };
        let reply = self
            .handler
            .execute::<Lead>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn convert_lead(
        &self,
        request: Request<pb::ConvertLeadRequest>,
    ) -> Result<Response<pb::ConvertLeadReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("ConvertLead", request.options.as_ref(), &request)?;
        let id = parse_id("lead_id", &request.lead_id, false)?;
        let account = optional_id("account_id", &request.account_id)?;
        let deal = match request.opportunity {
            Some(deal) => Some(crate::command::DealRequest {
                name: deal.name,
                pipeline_id: parse_id("opportunity.pipeline_id", &deal.pipeline_id, false)?,
                stage: super::opportunities::stage_key("opportunity.stage", deal.stage)?,
                amount: super::fields::money("opportunity.amount", deal.amount)?,
                close_date: super::fields::date("opportunity.close_date", &deal.close_date)?,
                owner: if deal.owner.is_empty() {
                    caller.actor.clone()
                } else {
                    deal.owner
                },
            }),
            None => None,
        };
        let reply = self
            .handler
            .convert_lead(&caller, id, account, deal, &options)
            .await?;
        Ok(Response::new(reply))
    }

    async fn merge_leads(
        &self,
        request: Request<pb::MergeLeadsRequest>,
    ) -> Result<Response<pb::MergeLeadsReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("MergeLeads", request.options.as_ref(), &request)?;
        let (survivor, losers) = merge_ids(&request.survivor_id, &request.loser_ids)?;
        let choices = LeadMergeChoices {
            name_from: optional_id("name_from", &request.name_from)?,
            company_from: optional_id("company_from", &request.company_from)?,
        };
        let merged = self
            .handler
            .merge_records::<Lead>(
                &caller,
                survivor,
                &losers,
                &choices,
                request.dry_run,
                &options,
            )
            .await?;
        Ok(Response::new(pb::MergeLeadsReply {
            survivor: merged.survivor,
            merged: merged.merged,
            changes_json: merged.changes_json,
            dry_run: merged.dry_run,
        }))
    }
}
