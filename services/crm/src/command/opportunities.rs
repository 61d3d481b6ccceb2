//! `crm.v1.Pipelines` and `crm.v1.Opportunities`: proto requests → commands,
//! with the facts a deal's decisions need (account active, pipeline versions,
//! the caller's roles) loaded first.
use crm_domain::DomainError;
use crm_domain::account::Account;
use crm_domain::common::Money;
use crm_domain::contact::Contact;
use crm_domain::opportunity::{
    DealDetails, DealFacts, ForecastPatch, Opportunity, OpportunityCommand,
};
use crm_domain::pipeline::{ForecastCategory, PipelineCommand, PipelineConfig, Stage, StageKind};
use crm_proto::v1 as pb;
use crm_proto::v1::opportunities_server::Opportunities;
use crm_proto::v1::pipelines_server::Pipelines;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::contacts::reason;
use super::fields::{date, money, optional_id};
use super::{Caller, CommandHandler, Options, Pinned, ServiceError, parse_id};

/// Roles that may reopen a won deal.
const REOPEN_WON_ROLES: &[&str] = &["sales_manager", "admin"];

pub struct PipelinesService {
    handler: CommandHandler,
}

impl PipelinesService {
    pub fn new(handler: CommandHandler) -> Self {
        Self { handler }
    }
}

pub struct OpportunitiesService {
    handler: CommandHandler,
}

impl OpportunitiesService {
    pub fn new(handler: CommandHandler) -> Self {
        Self { handler }
    }

    /// The facts a deal's command is decided on, from its account and
    /// pipeline (the empty state for one that does not exist or is another
    /// kind of record), with a pin on the account: only opening a deal reads
    /// whether it is active. A pipeline needs none: a deal decides on its own
    /// published version of the pipeline, and published versions never
    /// change.
    async fn facts(
        &self,
        caller: &Caller,
        account_id: Option<Uuid>,
        pipeline_id: Option<Uuid>,
    ) -> Result<(DealFacts, Vec<Pinned>), ServiceError> {
        let mut pins = Vec::new();
        let account_active = match account_id {
            Some(id) => {
                let (account, pin) = self.handler.fact::<Account>(&caller.tenant, id).await?;
                pins.extend(pin);
                account.usable()
            }
            None => false,
        };
        let pipeline = match pipeline_id {
            Some(id) => {
                self.handler
                    .state_or_default::<PipelineConfig>(&caller.tenant, id)
                    .await?
            }
            None => PipelineConfig::default(),
        };
        let facts = DealFacts {
            contact_usable: false,
            account_active,
            pipeline,
            may_reopen_won: caller
                .roles
                .iter()
                .any(|r| REOPEN_WON_ROLES.contains(&r.as_str())),
        };
        Ok((facts, pins))
    }

    /// Whether `contact_id` names a contact a deal may name, and the pin on
    /// it.
    async fn contact_usable(
        &self,
        caller: &Caller,
        contact_id: Uuid,
    ) -> Result<(bool, Option<Pinned>), ServiceError> {
        let (contact, pin) = self
            .handler
            .fact::<Contact>(&caller.tenant, contact_id)
            .await?;
        Ok((contact.usable(), pin))
    }

    /// Facts for a command on an existing deal: its pipeline (the deal's
    /// account is not asked about once the deal is open).
    async fn deal_facts(&self, caller: &Caller, id: Uuid) -> Result<DealFacts, ServiceError> {
        let deal = self
            .handler
            .state_or_default::<Opportunity>(&caller.tenant, id)
            .await?;
        Ok(self.facts(caller, None, deal.pipeline_id).await?.0)
    }
}

/// A stage key as a request names it, checked before any lookup.
pub(crate) fn stage_key(field: &str, value: String) -> Result<String, ServiceError> {
    if crm_domain::common::is_code(&value, 64) {
        Ok(value)
    } else {
        Err(ServiceError::invalid(field, "must be a code of [a-z0-9_]"))
    }
}

fn category(field: &'static str, value: &str) -> Result<ForecastCategory, ServiceError> {
    ForecastCategory::parse(value).ok_or_else(|| {
        ServiceError::invalid(
            field,
            "must be pipeline, best_case, commit, closed or omitted",
        )
    })
}

fn stages(stages: Vec<pb::PipelineStage>) -> Result<Vec<Stage>, ServiceError> {
    stages
        .into_iter()
        .enumerate()
        .map(|(i, stage)| {
            let kind = match pb::StageKind::try_from(stage.kind) {
                Ok(pb::StageKind::Open) => StageKind::Open,
                Ok(pb::StageKind::Won) => StageKind::Won,
                Ok(pb::StageKind::Lost) => StageKind::Lost,
                _ => {
                    return Err(ServiceError::Domain(DomainError::invalid(
                        format!("stages[{i}].kind"),
                        "must be OPEN, WON or LOST",
                    )));
                }
            };
            let category = ForecastCategory::parse(&stage.category).ok_or_else(|| {
                ServiceError::Domain(DomainError::invalid(
                    format!("stages[{i}].category"),
                    "must be pipeline, best_case, commit, closed or omitted",
                ))
            })?;
            Ok(Stage {
                key: stage.key,
                name: stage.name,
                kind,
                probability_bp: stage.probability_bp,
                category,
                max_days_in_stage: (stage.max_days_in_stage > 0).then_some(stage.max_days_in_stage),
                required_fields: stage.required_fields,
            })
        })
        .collect()
}

#[tonic::async_trait]
impl Pipelines for PipelinesService {
    async fn publish_pipeline(
        &self,
        request: Request<pb::PublishPipelineRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        // Configuration, as the other publishes: a new version changes the
        // stages and probabilities of every deal opened after it.
        super::configuration::require_role(
            &caller,
            &["admin", "sales_manager"],
            "publish pipelines",
        )?;
        let request = request.into_inner();
        let options = Options::parse("PublishPipeline", request.options.as_ref(), &request)?;
        // A UUIDv7, as every id a client chooses: not one of the server's
        // derived ids, which a pipeline published first would take over.
        let id = super::configuration::config_id(
            &self.handler,
            &caller.tenant,
            "pipeline_id",
            &request.pipeline_id,
        )
        .await?;
        let command = PipelineCommand::Publish {
            name: request.name,
            stages: stages(request.stages)?,
            stage_mapping: request.stage_mapping.into_iter().collect(),
        };
        let reply = self
            .handler
            .execute::<PipelineConfig>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }
}

#[tonic::async_trait]
impl Opportunities for OpportunitiesService {
    async fn open_opportunity(
        &self,
        request: Request<pb::OpenOpportunityRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("OpenOpportunity", request.options.as_ref(), &request)?;
        let id = parse_id("opportunity_id", &request.opportunity_id, true)?;
        let account_id = parse_id("account_id", &request.account_id, false)?;
        let pipeline_id = parse_id("pipeline_id", &request.pipeline_id, false)?;
        let contact_id = if request.contact_id.is_empty() {
            None
        } else {
            Some(parse_id("contact_id", &request.contact_id, false)?)
        };
        let details = DealDetails {
            name: request.name,
            account_id,
            contact_id,
            pipeline_id,
            stage: stage_key("stage", request.stage)?,
            amount: money("amount", request.amount)?,
            close_date: date("close_date", &request.close_date)?,
            owner: if request.owner.is_empty() {
                caller.actor.clone()
            } else {
                request.owner
            },
            source: crm_domain::opportunity::DealSource::default(),
        };
        // Input errors before the lookups they would spoil.
        crm_domain::opportunity::validate_details(&details).map_err(ServiceError::Domain)?;
        let (this, caller, details) = (self, &caller, &details);
        let reply = self
            .handler
            .execute_on::<Opportunity, _>(caller, id, &options, || async move {
                let (facts, mut pins) = this
                    .facts(caller, Some(account_id), Some(pipeline_id))
                    .await?;
                let contact_usable = match contact_id {
                    Some(contact_id) => {
                        let (usable, pin) = this.contact_usable(caller, contact_id).await?;
                        pins.extend(pin);
                        usable
                    }
                    None => true,
                };
                let facts = DealFacts {
                    contact_usable,
                    ..facts
                };
                Ok((OpportunityCommand::Open(details.clone(), facts), pins))
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn change_opportunity_stage(
        &self,
        request: Request<pb::ChangeOpportunityStageRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("ChangeOpportunityStage", request.options.as_ref(), &request)?;
        let id = parse_id("opportunity_id", &request.opportunity_id, false)?;
        let to = stage_key("stage", request.stage)?;
        let facts = self.deal_facts(&caller, id).await?;
        let command = OpportunityCommand::ChangeStage { to, facts };
        let reply = self
            .handler
            .execute::<Opportunity>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn update_opportunity_details(
        &self,
        request: Request<pb::UpdateOpportunityDetailsRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse(
            "UpdateOpportunityDetails",
            request.options.as_ref(),
            &request,
        )?;
        let id = parse_id("opportunity_id", &request.opportunity_id, false)?;
        let contact_id = request
            .contact_id
            .as_deref()
            .map(|c| optional_id("contact_id", c))
            .transpose()?;
        let name = &request.name;
        let command = |contact_usable| OpportunityCommand::UpdateDetails {
            name: name.clone(),
            contact_id,
            contact_usable,
        };
        let live = Opportunity {
            exists: true,
            ..Opportunity::default()
        };
        super::precheck(&live, command(true))?;
        let (this, caller, command) = (self, &caller, &command);
        let reply = self
            .handler
            .execute_on::<Opportunity, _>(caller, id, &options, || async move {
                Ok(match contact_id {
                    Some(Some(contact)) => {
                        let (usable, pin) = this.contact_usable(caller, contact).await?;
                        (command(usable), pin.into_iter().collect())
                    }
                    _ => (command(true), Vec::new()),
                })
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn change_opportunity_forecast(
        &self,
        request: Request<pb::ChangeOpportunityForecastRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse(
            "ChangeOpportunityForecast",
            request.options.as_ref(),
            &request,
        )?;
        let id = parse_id("opportunity_id", &request.opportunity_id, false)?;
        let patch = ForecastPatch {
            amount: request
                .amount
                .map(|m| money("amount", Some(m)))
                .transpose()?,
            close_date: request
                .close_date
                .as_deref()
                .map(|d| date("close_date", d))
                .transpose()?,
            probability_bp: request.probability_bp,
            category: request
                .category
                .as_deref()
                .map(|c| category("category", c))
                .transpose()?,
        };
        let command = OpportunityCommand::ChangeForecastFields(patch);
        let reply = self
            .handler
            .execute::<Opportunity>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn change_opportunity_line_items(
        &self,
        request: Request<pb::ChangeOpportunityLineItemsRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse(
            "ChangeOpportunityLineItems",
            request.options.as_ref(),
            &request,
        )?;
        let id = parse_id("opportunity_id", &request.opportunity_id, false)?;
        // Counted before any product is looked up: an oversized list costs
        // no reads.
        if request.lines.len() > crm_domain::opportunity::MAX_LINES {
            return Err(ServiceError::invalid("lines", "must have at most 200 lines").into());
        }
        let mut lines = Vec::with_capacity(request.lines.len());
        for (i, line) in request.lines.into_iter().enumerate() {
            let product_id = Uuid::parse_str(&line.product_id).map_err(|_| {
                ServiceError::Domain(DomainError::invalid(
                    format!("lines[{i}].product_id"),
                    "must be a UUID",
                ))
            })?;
            let unit_price = line.unit_price.ok_or_else(|| {
                ServiceError::Domain(DomainError::invalid(
                    format!("lines[{i}].unit_price"),
                    "is required",
                ))
            })?;
            lines.push(crm_domain::opportunity::LineItem {
                product_id,
                quantity: line.quantity,
                unit_price: Money {
                    amount_minor: unit_price.amount_minor,
                    currency: unit_price.currency,
                },
            });
        }
        // The lines' own checks (quantity, the deal's currency, totals) on
        // the deal as it is, before one lookup per product.
        let (deal, _, _) = self.handler.load::<Opportunity>(&caller.tenant, id).await?;
        super::precheck(
            &deal,
            OpportunityCommand::ChangeLineItems {
                lines: lines.clone(),
                products_exist: true,
            },
        )?;
        let mut products_exist = true;
        let distinct: std::collections::BTreeSet<Uuid> =
            lines.iter().map(|line| line.product_id).collect();
        for product_id in distinct {
            if !self
                .handler
                .is_a(&caller.tenant, product_id, &["product"])
                .await?
            {
                products_exist = false;
                break;
            }
        }
        let command = OpportunityCommand::ChangeLineItems {
            lines,
            products_exist,
        };
        let reply = self
            .handler
            .execute::<Opportunity>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn flag_opportunity_stalled(
        &self,
        request: Request<pb::FlagOpportunityStalledRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        super::configuration::require_role(&caller, &["system"], "send time-driven commands")?;
        let request = request.into_inner();
        let options = Options::parse("FlagOpportunityStalled", request.options.as_ref(), &request)?;
        let id = parse_id("opportunity_id", &request.opportunity_id, false)?;
        // The scheduler found the condition in the read models.
        let command = OpportunityCommand::FlagStalled {
            rule: request.rule,
            days: request.days,
            stalled: true,
        };
        let reply = self
            .handler
            .execute::<Opportunity>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn win_opportunity(
        &self,
        request: Request<pb::WinOpportunityRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("WinOpportunity", request.options.as_ref(), &request)?;
        let id = parse_id("opportunity_id", &request.opportunity_id, false)?;
        // Only the pipeline: the won stage's required fields.
        let command = OpportunityCommand::Win {
            facts: self.deal_facts(&caller, id).await?,
        };
        let reply = self
            .handler
            .execute::<Opportunity>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn lose_opportunity(
        &self,
        request: Request<pb::LoseOpportunityRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("LoseOpportunity", request.options.as_ref(), &request)?;
        let id = parse_id("opportunity_id", &request.opportunity_id, false)?;
        let command = OpportunityCommand::Lose {
            reason: reason(request.reason),
            competitor: request.competitor,
            facts: DealFacts::default(),
        };
        let reply = self
            .handler
            .execute::<Opportunity>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn reopen_opportunity(
        &self,
        request: Request<pb::ReopenOpportunityRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("ReopenOpportunity", request.options.as_ref(), &request)?;
        let id = parse_id("opportunity_id", &request.opportunity_id, false)?;
        let stage = stage_key("stage", request.stage)?;
        let facts = self.deal_facts(&caller, id).await?;
        let command = OpportunityCommand::Reopen { stage, facts };
        let reply = self
            .handler
            .execute::<Opportunity>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }
}
