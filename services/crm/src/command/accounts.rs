//! `crm.v1.Accounts`: proto requests → account commands.
use crm_domain::DomainError;
use crm_domain::account::{
    Account, AccountCommand, AccountDetails, AccountDetailsPatch, AccountKind, AccountMergeChoices,
    MAX_PARENT_DEPTH, ParentFacts,
};
use crm_proto::v1 as pb;
use crm_proto::v1::accounts_server::Accounts;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::contacts::reason;
use super::fields::{merge_ids, optional_id};
use super::{Caller, CommandHandler, Options, Pinned, ServiceError, parse_id};

pub struct AccountsService {
    handler: CommandHandler,
}

impl AccountsService {
    pub fn new(handler: CommandHandler) -> Self {
        Self { handler }
    }

    /// Whether `parent_id` can be a parent, and its ancestors (nearest
    /// first), read up the hierarchy until the top, a repeat, or one past
    /// the depth limit; with a pin on each account read, so two accounts
    /// made each other's parent at once cannot both land (a cycle).
    async fn parent_facts(
        &self,
        caller: &Caller,
        parent_id: Option<Uuid>,
    ) -> Result<(ParentFacts, Vec<Pinned>), ServiceError> {
        let Some(parent_id) = parent_id else {
            return Ok((ParentFacts::default(), Vec::new()));
        };
        let (parent, pin) = self
            .handler
            .fact::<Account>(&caller.tenant, parent_id)
            .await?;
        let mut pins: Vec<Pinned> = pin.into_iter().collect();
        let mut facts = ParentFacts {
            usable: parent.usable(),
            ancestors: Vec::new(),
        };
        let mut next = parent.parent_id;
        while let Some(id) = next {
            if facts.ancestors.contains(&id) || facts.ancestors.len() >= MAX_PARENT_DEPTH {
                break;
            }
            facts.ancestors.push(id);
            let (ancestor, pin) = self.handler.fact::<Account>(&caller.tenant, id).await?;
            pins.extend(pin);
            next = ancestor.parent_id;
        }
        Ok((facts, pins))
    }
}

#[tonic::async_trait]
impl Accounts for AccountsService {
    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("CreateAccount", request.options.as_ref(), &request)?;
        let id = parse_id("account_id", &request.account_id, true)?;
        let kind = match pb::AccountKind::try_from(request.kind) {
            Ok(pb::AccountKind::Company) => AccountKind::Company,
            Ok(pb::AccountKind::Person) => AccountKind::Person,
            _ => return Err(ServiceError::invalid("kind", "must be COMPANY or PERSON").into()),
        };
        let parent_id = optional_id("parent_id", &request.parent_id)?;
        refuse_erp_fields(request.credit_terms.is_some())?;
        let details = AccountDetails {
            kind,
            name: request.name,
            domains: request.domains,
            industry: request.industry,
            tax_id: request.tax_id,
            parent_id,
            segment: request.segment,
            parent: ParentFacts::default(),
        };
        super::precheck(
            &Account::default(),
            AccountCommand::Create {
                self_id: id,
                details: details.clone(),
            },
        )?;
        let (this, caller, details) = (self, &caller, &details);
        let reply = self
            .handler
            .execute_on::<Account, _>(caller, id, &options, || async move {
                let (parent, pins) = this.parent_facts(caller, parent_id).await?;
                let details = AccountDetails {
                    parent,
                    ..details.clone()
                };
                Ok((
                    AccountCommand::Create {
                        self_id: id,
                        details,
                    },
                    pins,
                ))
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn erase_account_personal_data(
        &self,
        request: Request<pb::EraseAccountPersonalDataRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse(
            "EraseAccountPersonalData",
            request.options.as_ref(),
            &request,
        )?;
        let id = parse_id("account_id", &request.account_id, false)?;
        let reply = self
            .handler
            .erase::<Account>(
                &caller,
                id,
                &options,
                AccountCommand::ErasePersonalData {
                    request: request.request,
                },
            )
            .await?;
        Ok(Response::new(reply))
    }

    async fn flag_account_churn_risk(
        &self,
        request: Request<pb::FlagAccountChurnRiskRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        super::configuration::require_role(&caller, &["system"], "send time-driven commands")?;
        let request = request.into_inner();
        let options = Options::parse("FlagAccountChurnRisk", request.options.as_ref(), &request)?;
        let id = parse_id("account_id", &request.account_id, false)?;
        // The scheduler found the inactivity in the read models.
        let command = AccountCommand::FlagChurnRisk {
            days_inactive: request.days_inactive,
            inactive: true,
        };
        let reply = self
            .handler
            .execute::<Account>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn update_account_details(
        &self,
        request: Request<pb::UpdateAccountDetailsRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("UpdateAccountDetails", request.options.as_ref(), &request)?;
        let id = parse_id("account_id", &request.account_id, false)?;
        let parent_id = request
            .parent_id
            .as_deref()
            .map(|id| optional_id("parent_id", id))
            .transpose()?;
        refuse_erp_fields(request.credit_terms.is_some())?;
        let patch = AccountDetailsPatch {
            name: request.name,
            tax_id: request.tax_id,
            domains: request.domains.map(|d| d.items),
            industry: request.industry,
            parent_id,
            segment: request.segment,
            parent: ParentFacts::default(),
        };
        // As if on some live account: only the input can fail here.
        let live = Account {
            exists: true,
            ..Account::default()
        };
        super::precheck(
            &live,
            AccountCommand::UpdateDetails {
                self_id: id,
                patch: patch.clone(),
            },
        )?;
        let (this, caller, patch) = (self, &caller, &patch);
        let reply = self
            .handler
            .execute_on::<Account, _>(caller, id, &options, || async move {
                let (parent, pins) = this.parent_facts(caller, parent_id.flatten()).await?;
                let patch = AccountDetailsPatch {
                    parent,
                    ..patch.clone()
                };
                Ok((AccountCommand::UpdateDetails { self_id: id, patch }, pins))
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn mark_account_churned(
        &self,
        request: Request<pb::MarkAccountChurnedRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("MarkAccountChurned", request.options.as_ref(), &request)?;
        let id = parse_id("account_id", &request.account_id, false)?;
        let command = AccountCommand::MarkChurned {
            reason: request.reason,
        };
        let reply = self
            .handler
            .execute::<Account>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn archive_account(
        &self,
        request: Request<pb::ArchiveAccountRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("ArchiveAccount", request.options.as_ref(), &request)?;
        let id = parse_id("account_id", &request.account_id, false)?;
        let command = AccountCommand::Archive(reason(request.reason));
        let reply = self
            .handler
            .execute::<Account>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn restore_account(
        &self,
        request: Request<pb::RestoreAccountRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("RestoreAccount", request.options.as_ref(), &request)?;
        let id = parse_id("account_id", &request.account_id, false)?;
        let command = AccountCommand::Restore(reason(request.reason));
        let reply = self
            .handler
            .execute::<Account>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn merge_accounts(
        &self,
        request: Request<pb::MergeAccountsRequest>,
    ) -> Result<Response<pb::MergeAccountsReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("MergeAccounts", request.options.as_ref(), &request)?;
        let (survivor, losers) = merge_ids(&request.survivor_id, &request.loser_ids)?;
        let choices = AccountMergeChoices {
            name_from: optional_id("name_from", &request.name_from)?,
            industry_from: optional_id("industry_from", &request.industry_from)?,
            segment_from: optional_id("segment_from", &request.segment_from)?,
        };
        let merged = self
            .handler
            .merge_records::<Account>(
                &caller,
                survivor,
                &losers,
                &choices,
                request.dry_run,
                &options,
            )
            .await?;
        Ok(Response::new(pb::MergeAccountsReply {
            survivor: merged.survivor,
            merged: merged.merged,
            changes_json: merged.changes_json,
            dry_run: merged.dry_run,
        }))
    }
}

/// Credit terms belong to the ERP (DOMAIN.md §7): a value in a CRM request
/// is refused rather than ignored.
fn refuse_erp_fields(credit_terms: bool) -> Result<(), ServiceError> {
    if credit_terms {
        return Err(ServiceError::Domain(DomainError::FieldOwnedExternally {
            field: "credit_terms",
        }));
    }
    Ok(())
}
