//! `crm.v1.Configuration`: versioned configuration, role-checked.
use crm_domain::DomainError;
use crm_domain::common::Money;
use crm_domain::configuration::{
    AgentAvailability, AgentConfig, BusinessCalendar, BusinessCalendarConfig, CommissionPlan,
    CommissionPlanConfig, CommissionTier, DateOverride, Publish, Queue, QueueConfig, SlaPolicy,
    SlaPolicyConfig, SlaTargets, Team, TeamConfig, TenantSettings, TenantSettingsConfig,
    UniquenessMode, WorkingHours,
};
use crm_proto::v1 as pb;
use crm_proto::v1::configuration_server::Configuration;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::fields::{date, optional_id, tenant_scoped_id, time};
use super::{Caller, CommandHandler, Options, ServiceError, parse_id};

pub struct ConfigurationService {
    handler: CommandHandler,
}

impl ConfigurationService {
    pub fn new(handler: CommandHandler) -> Self {
        Self { handler }
    }
}

pub(crate) fn require_role(
    caller: &Caller,
    roles: &[&str],
    action: &'static str,
) -> Result<(), ServiceError> {
    if caller.roles.iter().any(|r| roles.contains(&r.as_str())) {
        Ok(())
    } else {
        Err(ServiceError::Domain(DomainError::PermissionDenied {
            action,
        }))
    }
}

/// A configuration's id: new when empty, else a UUIDv7 as every id a client
/// chooses (DOMAIN.md §1.1). Other versions are the server's own derived ids
/// (tenant settings, an agent's availability, a conversion's records), which
/// a configuration published first under them would take over; such an id
/// is taken only for a record that exists under it already (published before
/// ids had to be UUIDv7: its new versions; a record of another kind answers
/// NOT_FOUND as before).
pub(crate) async fn config_id(
    handler: &CommandHandler,
    tenant: &crm_domain::TenantId,
    field: &'static str,
    value: &str,
) -> Result<Uuid, ServiceError> {
    match parse_id(field, value, true) {
        Ok(id) => Ok(id),
        Err(not_v7) => {
            let id = parse_id(field, value, false)?;
            let existing = handler
                .store
                .stream_type(tenant, id)
                .await
                .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
            if existing.is_some() {
                Ok(id)
            } else {
                Err(not_v7)
            }
        }
    }
}

#[tonic::async_trait]
impl Configuration for ConfigurationService {
    async fn publish_business_calendar(
        &self,
        request: Request<pb::PublishBusinessCalendarRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        require_role(
            &caller,
            &["admin", "service_manager"],
            "publish business calendars",
        )?;
        let request = request.into_inner();
        let options = Options::parse(
            "PublishBusinessCalendar",
            request.options.as_ref(),
            &request,
        )?;
        let id = config_id(
            &self.handler,
            &caller.tenant,
            "calendar_id",
            &request.calendar_id,
        )
        .await?;
        let weekly = request
            .weekly
            .iter()
            .enumerate()
            .map(|(i, hours)| {
                Ok(WorkingHours {
                    weekday: u8::try_from(hours.weekday).unwrap_or(0),
                    start: time(format!("weekly[{i}].start"), &hours.start)?,
                    end: time(format!("weekly[{i}].end"), &hours.end)?,
                })
            })
            .collect::<Result<Vec<_>, ServiceError>>()?;
        let overrides = request
            .overrides
            .iter()
            .enumerate()
            .map(|(i, day)| {
                let hours = day
                    .hours
                    .iter()
                    .map(|interval| {
                        let field = || format!("overrides[{i}].hours");
                        let (start, end) = interval
                            .split_once('-')
                            .ok_or_else(|| ServiceError::invalid(field(), "must be HH:MM-HH:MM"))?;
                        Ok((time(field(), start)?, time(field(), end)?))
                    })
                    .collect::<Result<Vec<_>, ServiceError>>()?;
                Ok(DateOverride {
                    date: date(format!("overrides[{i}].date"), &day.date)?,
                    hours,
                    name: day.name.clone(),
                })
            })
            .collect::<Result<Vec<_>, ServiceError>>()?;
        let content = BusinessCalendar {
            name: request.name,
            time_zone: request.time_zone,
            weekly,
            overrides,
        };
        let reply = self
            .handler
            .execute::<BusinessCalendarConfig>(&caller, id, &options, Publish(content))
            .await?;
        Ok(Response::new(reply))
    }

    async fn publish_sla_policy(
        &self,
        request: Request<pb::PublishSlaPolicyRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        require_role(
            &caller,
            &["admin", "service_manager"],
            "publish SLA policies",
        )?;
        let request = request.into_inner();
        let options = Options::parse("PublishSlaPolicy", request.options.as_ref(), &request)?;
        let id = config_id(
            &self.handler,
            &caller.tenant,
            "policy_id",
            &request.policy_id,
        )
        .await?;
        let content = SlaPolicy {
            name: request.name,
            order: request.order,
            ticket_types: request.ticket_types,
            targets: request
                .targets
                .into_iter()
                .map(|t| SlaTargets {
                    priority: t.priority,
                    first_response_minutes: t.first_response_minutes,
                    next_response_minutes: t.next_response_minutes,
                    resolution_minutes: t.resolution_minutes,
                })
                .collect(),
            calendar_id: optional_id("calendar_id", &request.calendar_id)?,
            pause_statuses: request.pause_statuses,
            warning_percent: u8::try_from(request.warning_percent).unwrap_or(0),
        };
        super::precheck(&SlaPolicyConfig::default(), Publish(content.clone()))?;
        if let Some(reply) = self.handler.replayed(&caller, id, &options).await? {
            return Ok(Response::new(reply));
        }
        // A calendar that was never published would count every hour (24×7)
        // without a word.
        if let Some(calendar) = content.calendar_id {
            self.handler
                .published::<crm_domain::configuration::BusinessCalendar>(
                    &caller.tenant,
                    calendar,
                    "calendar_id",
                )
                .await?;
        }
        let reply = self
            .handler
            .execute::<SlaPolicyConfig>(&caller, id, &options, Publish(content))
            .await?;
        Ok(Response::new(reply))
    }

    async fn publish_commission_plan(
        &self,
        request: Request<pb::PublishCommissionPlanRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        require_role(
            &caller,
            &["admin", "sales_manager"],
            "publish commission plans",
        )?;
        let request = request.into_inner();
        let options = Options::parse("PublishCommissionPlan", request.options.as_ref(), &request)?;
        let id = config_id(&self.handler, &caller.tenant, "plan_id", &request.plan_id).await?;
        let content = CommissionPlan {
            name: request.name,
            effective_from: date("effective_from", &request.effective_from)?,
            metric: request.metric,
            tier_basis: request.tier_basis,
            tier_mode: if request.tier_mode.is_empty() {
                "marginal".to_owned()
            } else {
                request.tier_mode
            },
            tiers: request
                .tiers
                .into_iter()
                .map(|t| CommissionTier {
                    from: t.from,
                    rate_bp: t.rate_bp,
                })
                .collect(),
            cap: request.cap.map(|m| Money {
                amount_minor: m.amount_minor,
                currency: m.currency,
            }),
            clawback_days: request.clawback_days,
            payout_grace_days: request.payout_grace_days,
            reps: request.reps,
        };
        let reply = self
            .handler
            .execute::<CommissionPlanConfig>(&caller, id, &options, Publish(content))
            .await?;
        Ok(Response::new(reply))
    }

    async fn publish_tenant_settings(
        &self,
        request: Request<pb::PublishTenantSettingsRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        require_role(&caller, &["admin"], "change tenant settings")?;
        let request = request.into_inner();
        let options = Options::parse("PublishTenantSettings", request.options.as_ref(), &request)?;
        let id = tenant_settings_id(&caller.tenant);
        let content = TenantSettings {
            time_zone: request.time_zone,
            fiscal_year_start_month: u8::try_from(request.fiscal_year_start_month).unwrap_or(0),
            reporting_currency: request.reporting_currency,
            convert_from_working: request.convert_from_working,
            duplicate_threshold: u8::try_from(request.duplicate_threshold).unwrap_or(u8::MAX),
            stale_days_lead: request.stale_days_lead,
            stale_days_deal: request.stale_days_deal,
            stale_days_customer: request.stale_days_customer,
            inactivity_churn_days: request.inactivity_churn_days,
            uniqueness: request
                .uniqueness
                .into_iter()
                .map(|(kind, mode)| {
                    let mode = match mode.as_str() {
                        "hard" => UniquenessMode::Hard,
                        "soft" => UniquenessMode::Soft,
                        _ => {
                            return Err(ServiceError::invalid(
                                format!("uniqueness.{kind}"),
                                "must be hard or soft",
                            ));
                        }
                    };
                    Ok((kind, mode))
                })
                .collect::<Result<_, _>>()?,
        };
        let reply = self
            .handler
            .execute::<TenantSettingsConfig>(&caller, id, &options, Publish(content))
            .await?;
        Ok(Response::new(reply))
    }

    async fn publish_team(
        &self,
        request: Request<pb::PublishTeamRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        require_role(
            &caller,
            &["admin", "sales_manager", "service_manager"],
            "publish teams",
        )?;
        let request = request.into_inner();
        let options = Options::parse("PublishTeam", request.options.as_ref(), &request)?;
        let id = config_id(&self.handler, &caller.tenant, "team_id", &request.team_id).await?;
        let parent_id = optional_id("parent_id", &request.parent_id)?;
        let content = Team {
            name: request.name,
            parent_id,
            manager: request.manager,
            members: request.members,
        };
        super::precheck(&TeamConfig::default(), Publish(content.clone()))?;
        // The parent must be a team, and following parents must not lead back
        // here (bounded walk: trees deeper than 32 levels are refused too).
        let mut next = parent_id;
        let mut depth = 0;
        while let Some(ancestor) = next {
            if ancestor == id || depth == 32 {
                return Err(
                    ServiceError::invalid("parent_id", "would make a cycle of teams").into(),
                );
            }
            let team: Team = self
                .handler
                .published(&caller.tenant, ancestor, "parent_id")
                .await?;
            next = team.parent_id;
            depth += 1;
        }
        let reply = self
            .handler
            .execute::<TeamConfig>(&caller, id, &options, Publish(content))
            .await?;
        Ok(Response::new(reply))
    }

    async fn allocate_sales_target(
        &self,
        request: Request<pb::AllocateSalesTargetRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        use crm_domain::targets::{Allocate, METRICS, Period, SalesTargets};
        let caller = Caller::from_metadata(request.metadata())?;
        require_role(
            &caller,
            &["admin", "sales_manager"],
            "allocate sales targets",
        )?;
        let request = request.into_inner();
        let options = Options::parse("AllocateSalesTarget", request.options.as_ref(), &request)?;
        if !(2000..=2100).contains(&request.fiscal_year) {
            return Err(ServiceError::invalid("fiscal_year", "must be 2000 to 2100").into());
        }
        if !METRICS.contains(&request.metric.as_str()) {
            return Err(
                ServiceError::invalid("metric", "must be bookings, collections or margin").into(),
            );
        }
        let amount = request
            .amount
            .ok_or_else(|| ServiceError::invalid("amount", "is required"))?;
        let id = tenant_scoped_id(
            &caller.tenant,
            &format!("sales_target:{}:{}", request.fiscal_year, request.metric),
        );
        let small = |value: u32| u8::try_from(value).ok().filter(|v| *v > 0);
        let command = Allocate {
            node: request.node,
            parent: (!request.parent.is_empty()).then_some(request.parent),
            period: Period {
                quarter: if request.quarter == 0 {
                    None
                } else {
                    Some(small(request.quarter).unwrap_or(u8::MAX))
                },
                month: if request.month == 0 {
                    None
                } else {
                    Some(small(request.month).unwrap_or(u8::MAX))
                },
            },
            amount: Money {
                amount_minor: amount.amount_minor,
                currency: amount.currency,
            },
        };
        let reply = self
            .handler
            .execute::<SalesTargets>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn publish_queue(
        &self,
        request: Request<pb::PublishQueueRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        require_role(&caller, &["admin", "service_manager"], "publish queues")?;
        let request = request.into_inner();
        let options = Options::parse("PublishQueue", request.options.as_ref(), &request)?;
        let id = config_id(&self.handler, &caller.tenant, "queue_id", &request.queue_id).await?;
        let content = Queue {
            name: request.name,
            members: request.members,
            skills: request.skills,
            routing: request.routing,
            overflow_queue_id: optional_id("overflow_queue_id", &request.overflow_queue_id)?,
            overflow_after_minutes: request.overflow_after_minutes,
        };
        super::precheck(&QueueConfig::default(), Publish(content.clone()))?;
        if let Some(overflow) = content.overflow_queue_id {
            if overflow == id {
                return Err(
                    ServiceError::invalid("overflow_queue_id", "must be another queue").into(),
                );
            }
            // Tickets will be moved there without a person looking: it must
            // be a published queue of the tenant.
            self.handler
                .published::<Queue>(&caller.tenant, overflow, "overflow_queue_id")
                .await?;
        }
        let reply = self
            .handler
            .execute::<QueueConfig>(&caller, id, &options, Publish(content))
            .await?;
        Ok(Response::new(reply))
    }

    async fn change_agent_availability(
        &self,
        request: Request<pb::ChangeAgentAvailabilityRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse(
            "ChangeAgentAvailability",
            request.options.as_ref(),
            &request,
        )?;
        let agent = if request.agent.is_empty() {
            caller.actor.clone()
        } else {
            request.agent
        };
        if agent != caller.actor {
            require_role(
                &caller,
                &["admin", "service_manager"],
                "change another agent's availability",
            )?;
        }
        let id = agent_id(&caller.tenant, &agent);
        let content = AgentAvailability {
            agent,
            status: request.status,
            capacity: request.capacity,
            skills: request.skills,
        };
        let reply = self
            .handler
            .execute::<AgentConfig>(&caller, id, &options, Publish(content))
            .await?;
        Ok(Response::new(reply))
    }
}

/// The tenant's one settings record.
pub(crate) fn tenant_settings_id(tenant: &crm_domain::TenantId) -> Uuid {
    tenant_scoped_id(tenant, "tenant_settings")
}

/// The record of an agent: derived from the agent's user id.
pub(crate) fn agent_id(tenant: &crm_domain::TenantId, agent: &str) -> Uuid {
    tenant_scoped_id(tenant, &format!("agent:{agent}"))
}
