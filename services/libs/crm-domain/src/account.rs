//! Account: a company, or a person buying for themselves (DOMAIN.md §2.2).
//!
//! `Prospect → Customer → Churned → Customer`. The tax id is unique per tenant
//! (hard reservation); archived accounts refuse everything but restore.
use std::collections::BTreeSet;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::{Aggregate, Context, DomainEvent, MergeParties, UniqueKey};
use crate::commerce::ExternalRef;
use crate::common::{
    Change, Lifecycle, LifecycleChanged, Money, Reason, diff, is_code, is_domain, text_ok,
};
use crate::error::{DomainError, Violations};
use crate::records::{CommonCommand, CommonEvent, RecordMeta};

pub const MAX_DOMAINS: usize = 20;
pub const CHURN_REASONS: &[&str] = &["contract_ended", "cancelled", "inactive"];
pub const CUSTOMER_TRIGGERS: &[&str] = &["first_won_deal", "first_order", "reactivation"];

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    #[default]
    Company,
    Person,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountStatus {
    #[default]
    Prospect,
    Customer,
    Churned,
}

impl AccountStatus {
    pub fn name(self) -> &'static str {
        match self {
            Self::Prospect => "prospect",
            Self::Customer => "customer",
            Self::Churned => "churned",
        }
    }
}

/// Longest chain of parents an account may sit under.
pub const MAX_PARENT_DEPTH: usize = 32;

/// What the handler knows about a proposed parent account (facts valid at
/// command time).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParentFacts {
    /// The parent exists, is an account of the tenant and is not archived.
    pub usable: bool,
    /// The parent's own ancestors, nearest first, at most
    /// [`MAX_PARENT_DEPTH`] (more means the hierarchy is too deep).
    pub ancestors: Vec<Uuid>,
}

impl ParentFacts {
    /// The parent rule: it must be usable, must not have the account among
    /// its ancestors (no cycle), and the hierarchy stays bounded.
    fn check(&self, self_id: Uuid, parent_id: Uuid) -> Result<(), DomainError> {
        if parent_id == self_id {
            return Err(DomainError::invalid(
                "parent_id",
                "must not be the account itself",
            ));
        }
        if !self.usable || self.ancestors.contains(&self_id) {
            return Err(DomainError::InvalidReference { field: "parent_id" });
        }
        if self.ancestors.len() >= MAX_PARENT_DEPTH {
            return Err(DomainError::invalid(
                "parent_id",
                "would nest accounts more than 32 levels deep",
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountDetails {
    pub kind: AccountKind,
    pub name: String,
    pub domains: Vec<String>,
    pub industry: String,
    pub tax_id: String,
    pub parent_id: Option<Uuid>,
    pub segment: String,
    /// Facts about `parent_id`, when set.
    pub parent: ParentFacts,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountDetailsPatch {
    pub name: Option<String>,
    /// Refused once the account is linked to an ERP customer (the ERP owns
    /// it then, DOMAIN.md §7).
    pub tax_id: Option<String>,
    pub domains: Option<Vec<String>>,
    pub industry: Option<String>,
    pub parent_id: Option<Option<Uuid>>,
    pub segment: Option<String>,
    /// Facts about the new `parent_id`, when one is set.
    pub parent: ParentFacts,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccountCommand {
    /// `self_id` is the account's own id, to refuse itself as parent.
    Create {
        self_id: Uuid,
        details: AccountDetails,
    },
    UpdateDetails {
        self_id: Uuid,
        patch: AccountDetailsPatch,
    },
    /// Sent by the process manager on the first won deal or paid order.
    MarkCustomer {
        trigger: String,
    },
    /// Sent by the scheduler (`occurred_at` = when the account had been
    /// inactive long enough): `inactive` is the handler's fact that there
    /// has still been no touch or paid order for `days_inactive` days.
    FlagChurnRisk {
        days_inactive: u32,
        inactive: bool,
    },
    /// Forget the person behind a person (B2C) account, as for contacts;
    /// company accounts hold no personal data.
    ErasePersonalData {
        request: String,
    },
    MarkChurned {
        reason: String,
    },
    Archive(Reason),
    Restore(Reason),
    /// Owner, tags and shares (see [`crate::records`]).
    Common(CommonCommand),
    /// The ERP's customer master (DOMAIN.md §7): links the account to the
    /// ERP's customer `external` and sets the fields the ERP owns. A version
    /// not above the stored one for that source changes nothing.
    SyncFromErp {
        external: ExternalRef,
        tax_id: String,
        credit_terms: Option<CreditTerms>,
    },
}

/// External records an account may be linked to (one per source).
pub const MAX_EXTERNAL_REFS: usize = 10;

/// Payment terms the ERP grants the customer; the CRM only shows them.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditTerms {
    pub limit: Money,
    /// Days after invoicing that payment is due.
    pub payment_days: u32,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountCreated {
    pub kind: AccountKind,
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    pub name: String,
    #[serde(default)]
    pub domains: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub industry: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tax_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub segment: String,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountChanges {
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Change<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tax_id: Option<Change<String>>,
    /// ERP-owned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credit_terms: Option<Change<Option<CreditTerms>>>,
    /// The ERP records the account is linked to, with their versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_refs: Option<Change<Vec<ExternalRef>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domains: Option<Change<Vec<String>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub industry: Option<Change<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<Change<Option<Uuid>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<Change<String>>,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountDetailsUpdated {
    pub changes: AccountChanges,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountBecameCustomer {
    pub trigger: String,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountChurned {
    pub reason: String,
    pub occurred_at: Timestamp,
}

/// The survivor of an account merge.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountsMerged {
    pub losers: Vec<Uuid>,
    pub changes: AccountChanges,
    /// The tax id taken from a loser when the survivor had none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tax_id: Option<String>,
    pub occurred_at: Timestamp,
}

/// A loser of an account merge.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountMergedInto {
    pub survivor: Uuid,
    pub occurred_at: Timestamp,
}

/// Which account each single-valued field comes from; `None`: the survivor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountMergeChoices {
    pub name_from: Option<Uuid>,
    pub industry_from: Option<Uuid>,
    pub segment_from: Option<Uuid>,
}

/// A customer went quiet: no touch or paid order for `days_inactive` days.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountChurnRiskFlagged {
    /// `inactivity`.
    pub rule: String,
    pub days_inactive: u32,
    pub occurred_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum AccountEvent {
    ChurnRiskFlagged(AccountChurnRiskFlagged),
    PersonalDataErased(crate::contact::PersonalDataErased),
    Created(AccountCreated),
    DetailsUpdated(AccountDetailsUpdated),
    BecameCustomer(AccountBecameCustomer),
    Churned(AccountChurned),
    Archived(LifecycleChanged),
    Restored(LifecycleChanged),
    Common(CommonEvent),
    Merged(AccountsMerged),
    MergedInto(AccountMergedInto),
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Common(event) => event.event_type(),
            Self::ChurnRiskFlagged(_) => "AccountChurnRiskFlagged",
            Self::PersonalDataErased(_) => "PersonalDataErased",
            Self::Created(_) => "AccountCreated",
            Self::DetailsUpdated(_) => "AccountDetailsUpdated",
            Self::BecameCustomer(_) => "AccountBecameCustomer",
            Self::Churned(_) => "AccountChurned",
            Self::Merged(_) => "RecordsMerged",
            Self::MergedInto(_) => "RecordMergedInto",
            Self::Archived(_) => "RecordArchived",
            Self::Restored(_) => "RecordRestored",
        }
    }

    fn occurred_at(&self) -> jiff::Timestamp {
        match self {
            Self::Common(event) => event.occurred_at(),
            Self::ChurnRiskFlagged(e) => e.occurred_at,
            Self::PersonalDataErased(e) => e.occurred_at,
            Self::Created(e) => e.occurred_at,
            Self::DetailsUpdated(e) => e.occurred_at,
            Self::BecameCustomer(e) => e.occurred_at,
            Self::Churned(e) => e.occurred_at,
            Self::Merged(e) => e.occurred_at,
            Self::MergedInto(e) => e.occurred_at,
            Self::Archived(e) => e.occurred_at,
            Self::Restored(e) => e.occurred_at,
        }
    }

    fn decode<'de, D: serde::Deserializer<'de>>(
        event_type: &str,
        _schema_version: u32,
        payload: D,
    ) -> Result<Option<Self>, D::Error> {
        Ok(Some(match event_type {
            "AccountChurnRiskFlagged" => Self::ChurnRiskFlagged(Deserialize::deserialize(payload)?),
            "PersonalDataErased" => Self::PersonalDataErased(Deserialize::deserialize(payload)?),
            "AccountCreated" => Self::Created(Deserialize::deserialize(payload)?),
            "AccountDetailsUpdated" => Self::DetailsUpdated(Deserialize::deserialize(payload)?),
            "AccountBecameCustomer" => Self::BecameCustomer(Deserialize::deserialize(payload)?),
            "AccountChurned" => Self::Churned(Deserialize::deserialize(payload)?),
            "RecordsMerged" => Self::Merged(Deserialize::deserialize(payload)?),
            "RecordMergedInto" => Self::MergedInto(Deserialize::deserialize(payload)?),
            "RecordArchived" => Self::Archived(Deserialize::deserialize(payload)?),
            "RecordRestored" => Self::Restored(Deserialize::deserialize(payload)?),
            _ => return Ok(CommonEvent::decode(event_type, payload)?.map(Self::Common)),
        }))
    }
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub exists: bool,
    pub lifecycle: Lifecycle,
    pub status: AccountStatus,
    pub kind: AccountKind,
    pub name: String,
    pub domains: Vec<String>,
    pub industry: String,
    pub tax_id: String,
    pub parent_id: Option<Uuid>,
    pub segment: String,
    #[serde(default)]
    pub meta: RecordMeta,
    #[serde(default)]
    pub merged_into: Option<Uuid>,
    /// A person account whose personal data was erased.
    #[serde(default)]
    pub erased: bool,
    /// ERP customers this account is linked to: the ERP then owns its tax id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_refs: Vec<ExternalRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credit_terms: Option<CreditTerms>,
}

/// Checks an ERP sync's input; its normalized tax id. The handler calls it
/// before the lookups the input drives.
pub fn validate_erp_sync(
    external: &ExternalRef,
    tax_id: &str,
    credit_terms: Option<&CreditTerms>,
) -> Result<String, DomainError> {
    let mut v = Violations::default();
    external.validate(&mut v);
    let tax_id = validate_tax_id("tax_id", tax_id, &mut v);
    if let Some(terms) = credit_terms {
        terms.limit.validate("credit_terms.limit", &mut v);
        v.check(
            terms.limit.amount_minor >= 0,
            "credit_terms.limit.amount_minor",
            "must not be negative",
        );
        v.check(
            terms.payment_days <= 3650,
            "credit_terms.payment_days",
            "must be at most 3650",
        );
    }
    v.into_result()?;
    Ok(tax_id)
}

/// The normalized tax id, checked, as field `field`.
pub fn validated_tax_id(field: &str, tax_id: &str) -> Result<String, DomainError> {
    let mut v = Violations::default();
    let tax_id = validate_tax_id(field, tax_id, &mut v);
    v.into_result()?;
    Ok(tax_id)
}

/// The normalized tax id, checked.
fn validate_tax_id(field: &str, tax_id: &str, v: &mut Violations) -> String {
    let tax_id = normalize_tax_id(tax_id);
    v.check(
        tax_id.len() <= 50
            && tax_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-'),
        field,
        "must be at most 50 letters, digits or hyphens",
    );
    tax_id
}

fn validate_domains(domains: &[String], v: &mut Violations) -> Vec<String> {
    v.check(
        domains.len() <= MAX_DOMAINS,
        "domains",
        "must have at most 20 domains",
    );
    let mut seen = BTreeSet::new();
    let mut normalized = Vec::with_capacity(domains.len());
    for (i, domain) in domains.iter().enumerate() {
        let domain = domain.trim().to_lowercase();
        v.check(
            is_domain(&domain),
            format!("domains[{i}]"),
            "must be a domain such as example.com",
        );
        v.check(
            seen.insert(domain.clone()),
            format!("domains[{i}]"),
            "appears twice",
        );
        normalized.push(domain);
    }
    normalized
}

fn validate_segment(segment: &str, v: &mut Violations) {
    v.check(
        segment.is_empty() || is_code(segment, 64),
        "segment",
        "must be a code of [a-z0-9_]",
    );
}

/// The ERP customers `changes` links the account to anew: (source,
/// external id). Their orders recorded while unlinked now belong to the
/// account (DOMAIN.md §7: past orders resolve, unrewritten).
pub fn new_links(changes: &AccountChanges) -> Vec<(&str, &str)> {
    let Some(change) = &changes.external_refs else {
        return Vec::new();
    };
    change
        .new
        .iter()
        .filter(|r| {
            !change
                .old
                .iter()
                .any(|o| o.source == r.source && o.external_id == r.external_id)
        })
        .map(|r| (r.source.as_str(), r.external_id.as_str()))
        .collect()
}

/// The kind of unique key an ERP link holds: one account per ERP customer.
pub const EXTERNAL_REF: &str = "external_ref";

/// The unique value of an ERP link.
pub fn external_ref_key(source: &str, external_id: &str) -> String {
    format!("{source}:{external_id}")
}

/// Letters, digits and hyphens, uppercased: the form uniqueness compares.
pub fn normalize_tax_id(tax_id: &str) -> String {
    tax_id.trim().to_uppercase()
}

impl Account {
    fn live(&self) -> Result<(), DomainError> {
        if !self.exists {
            return Err(DomainError::NotFound);
        }
        if self.erased {
            return Err(DomainError::RecordErased);
        }
        if let Some(survivor) = self.merged_into {
            return Err(DomainError::RecordMerged { survivor });
        }
        if self.lifecycle == Lifecycle::Archived {
            return Err(DomainError::RecordArchived);
        }
        Ok(())
    }
}

impl Account {
    /// Whether other records may point at it (a contact's link, a deal, a
    /// child account, a converted lead): it exists, is active, and was
    /// neither merged away nor erased.
    pub fn usable(&self) -> bool {
        self.exists
            && self.lifecycle == Lifecycle::Active
            && self.merged_into.is_none()
            && !self.erased
    }
}

impl Aggregate for Account {
    type Command = AccountCommand;
    type Event = AccountEvent;
    const STREAM_TYPE: &'static str = "account";

    fn exists(&self) -> bool {
        self.exists
    }

    fn creates(command: &Self::Command) -> bool {
        matches!(command, AccountCommand::Create { .. })
    }

    fn decide(
        &self,
        command: AccountCommand,
        context: Context,
    ) -> Result<Vec<AccountEvent>, DomainError> {
        let occurred_at = context.occurred_at()?;
        // Their own lifecycle handles archiving (it predates the shared one).
        let command = match command {
            AccountCommand::Common(CommonCommand::Archive(reason)) => {
                AccountCommand::Archive(reason)
            }
            AccountCommand::Common(CommonCommand::Restore(reason)) => {
                AccountCommand::Restore(reason)
            }
            other => other,
        };
        match command {
            AccountCommand::Common(command) => {
                self.live()?;
                Ok(self
                    .meta
                    .decide(command, occurred_at)?
                    .into_iter()
                    .map(AccountEvent::Common)
                    .collect())
            }
            AccountCommand::Create { self_id, details } => {
                if self.exists {
                    return Err(DomainError::AlreadyExists {
                        key: "account_id",
                        holder: None,
                    });
                }
                let mut v = Violations::default();
                v.check(
                    text_ok(&details.name, 200, false),
                    "name",
                    "must be 1 to 200 characters",
                );
                let domains = validate_domains(&details.domains, &mut v);
                v.check(
                    text_ok(&details.industry, 100, true),
                    "industry",
                    "must be at most 100 characters",
                );
                let tax_id = validate_tax_id("tax_id", &details.tax_id, &mut v);
                v.check(
                    details.parent_id != Some(self_id),
                    "parent_id",
                    "must not be the account itself",
                );
                validate_segment(&details.segment, &mut v);
                v.into_result()?;
                if let Some(parent_id) = details.parent_id {
                    details.parent.check(self_id, parent_id)?;
                }
                Ok(vec![AccountEvent::Created(AccountCreated {
                    kind: details.kind,
                    name: details.name.trim().to_owned(),
                    domains,
                    industry: details.industry,
                    tax_id,
                    parent_id: details.parent_id,
                    segment: details.segment,
                    occurred_at,
                })])
            }
            AccountCommand::UpdateDetails { self_id, patch } => {
                self.live()?;
                let mut v = Violations::default();
                if let Some(name) = &patch.name {
                    v.check(
                        text_ok(name, 200, false),
                        "name",
                        "must be 1 to 200 characters",
                    );
                }
                let domains = patch
                    .domains
                    .as_deref()
                    .map(|d| validate_domains(d, &mut v));
                if let Some(industry) = &patch.industry {
                    v.check(
                        text_ok(industry, 100, true),
                        "industry",
                        "must be at most 100 characters",
                    );
                }
                if let Some(parent) = &patch.parent_id {
                    v.check(
                        *parent != Some(self_id),
                        "parent_id",
                        "must not be the account itself",
                    );
                }
                if let Some(segment) = &patch.segment {
                    validate_segment(segment, &mut v);
                }
                let tax_id = patch
                    .tax_id
                    .as_deref()
                    .map(|t| validate_tax_id("tax_id", t, &mut v));
                v.into_result()?;
                if !self.external_refs.is_empty()
                    && tax_id.as_ref().is_some_and(|t| t != &self.tax_id)
                {
                    return Err(DomainError::FieldOwnedExternally { field: "tax_id" });
                }
                if let Some(Some(parent_id)) = patch.parent_id
                    && self.parent_id != Some(parent_id)
                {
                    patch.parent.check(self_id, parent_id)?;
                }
                let name = patch.name.map(|n| n.trim().to_owned());
                let changes = AccountChanges {
                    name: diff(&self.name, name.as_ref()),
                    tax_id: diff(&self.tax_id, tax_id.as_ref()),
                    domains: diff(&self.domains, domains.as_ref()),
                    industry: diff(&self.industry, patch.industry.as_ref()),
                    parent_id: diff(&self.parent_id, patch.parent_id.as_ref()),
                    segment: diff(&self.segment, patch.segment.as_ref()),
                    ..AccountChanges::default()
                };
                if changes == AccountChanges::default() {
                    return Ok(vec![]);
                }
                Ok(vec![AccountEvent::DetailsUpdated(AccountDetailsUpdated {
                    changes,
                    occurred_at,
                })])
            }
            AccountCommand::SyncFromErp {
                external,
                tax_id,
                credit_terms,
            } => {
                let tax_id = validate_erp_sync(&external, &tax_id, credit_terms.as_ref())?;
                self.live()?;
                let mut refs = self.external_refs.clone();
                let linked = refs.len();
                match refs.iter_mut().find(|r| r.source == external.source) {
                    // Linked to another customer of this ERP already.
                    Some(known) if known.external_id != external.external_id => {
                        return Err(DomainError::AlreadyExists {
                            key: "external_ref",
                            holder: None,
                        });
                    }
                    // Not newer than what the ERP sent before: no change.
                    Some(known) if known.external_version >= external.external_version => {
                        return Ok(vec![]);
                    }
                    Some(known) => known.external_version = external.external_version,
                    None if linked >= MAX_EXTERNAL_REFS => {
                        return Err(DomainError::invalid(
                            "external.source",
                            "the account is linked to 10 sources already",
                        ));
                    }
                    None => refs.push(external),
                }
                let changes = AccountChanges {
                    tax_id: diff(&self.tax_id, Some(&tax_id)),
                    credit_terms: diff(&self.credit_terms, Some(&credit_terms)),
                    external_refs: diff(&self.external_refs, Some(&refs)),
                    ..AccountChanges::default()
                };
                Ok(vec![AccountEvent::DetailsUpdated(AccountDetailsUpdated {
                    changes,
                    occurred_at,
                })])
            }
            AccountCommand::MarkCustomer { trigger } => {
                self.live()?;
                if !CUSTOMER_TRIGGERS.contains(&trigger.as_str()) {
                    return Err(DomainError::invalid(
                        "trigger",
                        "must be first_won_deal, first_order or reactivation",
                    ));
                }
                if self.status == AccountStatus::Customer {
                    return Ok(vec![]);
                }
                Ok(vec![AccountEvent::BecameCustomer(AccountBecameCustomer {
                    trigger,
                    occurred_at,
                })])
            }
            AccountCommand::ErasePersonalData { request } => {
                if !self.exists {
                    return Err(DomainError::NotFound);
                }
                if self.kind != AccountKind::Person {
                    return Err(DomainError::InvalidTransition {
                        from: "company account",
                        to: "erased",
                    });
                }
                if self.erased {
                    return Ok(vec![]);
                }
                if !text_ok(&request, 200, false) {
                    return Err(DomainError::invalid(
                        "request",
                        "must be 1 to 200 characters",
                    ));
                }
                Ok(vec![AccountEvent::PersonalDataErased(
                    crate::contact::PersonalDataErased {
                        request: request.trim().to_owned(),
                        occurred_at,
                    },
                )])
            }
            AccountCommand::FlagChurnRisk {
                days_inactive,
                inactive,
            } => {
                self.live()?;
                if self.status != AccountStatus::Customer || !inactive {
                    return Err(DomainError::NotApplicable { rule: "churn risk" });
                }
                Ok(vec![AccountEvent::ChurnRiskFlagged(
                    AccountChurnRiskFlagged {
                        rule: "inactivity".into(),
                        days_inactive,
                        occurred_at,
                    },
                )])
            }
            AccountCommand::MarkChurned { reason } => {
                self.live()?;
                if !CHURN_REASONS.contains(&reason.as_str()) {
                    return Err(DomainError::invalid(
                        "reason",
                        "must be contract_ended, cancelled or inactive",
                    ));
                }
                if self.status != AccountStatus::Customer {
                    return Err(DomainError::InvalidTransition {
                        from: self.status.name(),
                        to: "churned",
                    });
                }
                Ok(vec![AccountEvent::Churned(AccountChurned {
                    reason,
                    occurred_at,
                })])
            }
            AccountCommand::Archive(reason) => {
                self.live()?;
                Ok(vec![AccountEvent::Archived(
                    self.lifecycle.archive(reason, occurred_at)?,
                )])
            }
            AccountCommand::Restore(reason) => {
                if !self.exists {
                    return Err(DomainError::NotFound);
                }
                if let Some(survivor) = self.merged_into {
                    return Err(DomainError::RecordMerged { survivor });
                }
                Ok(vec![AccountEvent::Restored(
                    self.lifecycle.restore(reason, occurred_at)?,
                )])
            }
        }
    }

    fn evolve(mut self, event: &AccountEvent) -> Self {
        match event {
            // A flag for read models and subscribers; the state does not change.
            AccountEvent::ChurnRiskFlagged(_) => {}
            AccountEvent::PersonalDataErased(_) => {
                self.erased = true;
                self.name.clear();
            }
            AccountEvent::Merged(merged) => {
                self = self.evolve(&AccountEvent::DetailsUpdated(AccountDetailsUpdated {
                    changes: merged.changes.clone(),
                    occurred_at: merged.occurred_at,
                }));
                if let Some(tax_id) = &merged.tax_id {
                    self.tax_id = tax_id.clone();
                }
            }
            AccountEvent::MergedInto(merged) => self.merged_into = Some(merged.survivor),
            AccountEvent::Common(event) => self.meta.evolve(event),
            AccountEvent::Created(created) => {
                self.exists = true;
                self.kind = created.kind;
                self.name = created.name.clone();
                self.domains = created.domains.clone();
                self.industry = created.industry.clone();
                self.tax_id = created.tax_id.clone();
                self.parent_id = created.parent_id;
                self.segment = created.segment.clone();
            }
            AccountEvent::DetailsUpdated(updated) => {
                let c = &updated.changes;
                if let Some(change) = &c.name {
                    self.name = change.new.clone();
                }
                if let Some(change) = &c.domains {
                    self.domains = change.new.clone();
                }
                if let Some(change) = &c.industry {
                    self.industry = change.new.clone();
                }
                if let Some(change) = &c.parent_id {
                    self.parent_id = change.new;
                }
                if let Some(change) = &c.segment {
                    self.segment = change.new.clone();
                }
                if let Some(change) = &c.tax_id {
                    self.tax_id = change.new.clone();
                }
                if let Some(change) = &c.credit_terms {
                    self.credit_terms = change.new.clone();
                }
                if let Some(change) = &c.external_refs {
                    self.external_refs = change.new.clone();
                }
            }
            AccountEvent::BecameCustomer(_) => self.status = AccountStatus::Customer,
            AccountEvent::Churned(_) => self.status = AccountStatus::Churned,
            AccountEvent::Archived(_) => self.lifecycle = Lifecycle::Archived,
            AccountEvent::Restored(_) => self.lifecycle = Lifecycle::Active,
        }
        self
    }

    fn holds_personal_data(&self) -> bool {
        self.kind == AccountKind::Person
    }

    fn unique_keys(&self) -> BTreeSet<UniqueKey> {
        if self.merged_into.is_some() {
            return BTreeSet::new();
        }
        // Domains are soft by default: the handler reserves only the kinds
        // the tenant keeps hard.
        let tax_id = (!self.tax_id.is_empty()).then(|| ("tax_id", self.tax_id.clone()));
        tax_id
            .into_iter()
            .chain(self.domains.iter().map(|d| ("domain", d.to_lowercase())))
            .chain(self.external_refs.iter().map(|r| {
                let key = external_ref_key(&r.source, &r.external_id);
                (EXTERNAL_REF, key)
            }))
            .collect()
    }
}

impl crate::aggregate::Mergeable for Account {
    type Choices = AccountMergeChoices;

    fn merge(
        survivor_id: Uuid,
        survivor: &Self,
        losers: &[(Uuid, Self)],
        choices: &AccountMergeChoices,
        context: Context,
    ) -> Result<(Vec<AccountEvent>, Vec<(Uuid, Vec<AccountEvent>)>), DomainError> {
        let occurred_at = context.occurred_at()?;
        let parties = MergeParties::check(survivor_id, survivor, losers, |account: &Account| {
            account.live()
        })?;
        // A person's name and a company's are kept differently (a person's
        // sealed, DOMAIN.md §1.2): a company must not take a person's
        // fields, nor the other way round.
        if losers.iter().any(|(_, loser)| loser.kind != survivor.kind) {
            return Err(DomainError::invalid(
                "loser_ids",
                "a person account and a company are not duplicates",
            ));
        }
        let pick = |field, from| parties.pick(field, from);
        let name = pick("name_from", choices.name_from)?.name.clone();
        let industry = pick("industry_from", choices.industry_from)?
            .industry
            .clone();
        let segment = pick("segment_from", choices.segment_from)?.segment.clone();
        let mut domains = survivor.domains.clone();
        let mut tax_id = None;
        // ERP links move to the survivor; two customers of one ERP are not
        // duplicates.
        let mut refs = survivor.external_refs.clone();
        let mut credit_terms = survivor.credit_terms.clone();
        for (_, loser) in losers {
            for link in &loser.external_refs {
                match refs.iter().find(|r| r.source == link.source) {
                    Some(known) if known.external_id != link.external_id => {
                        return Err(DomainError::invalid(
                            "loser_ids",
                            "accounts linked to different customers of one ERP are not duplicates",
                        ));
                    }
                    Some(_) => {}
                    None => refs.push(link.clone()),
                }
            }
            if credit_terms.is_none() {
                credit_terms = loser.credit_terms.clone();
            }
        }
        if refs.len() > MAX_EXTERNAL_REFS {
            return Err(DomainError::invalid(
                "loser_ids",
                "the merged account would be linked to more than 10 sources",
            ));
        }
        for (_, loser) in losers {
            for domain in &loser.domains {
                if !domains.contains(domain) {
                    domains.push(domain.clone());
                }
            }
            // An ERP-linked survivor's tax id is the ERP's: a CRM-entered
            // one of an unlinked loser does not fill it.
            let adoptable = survivor.external_refs.is_empty() || !loser.external_refs.is_empty();
            if adoptable && !loser.tax_id.is_empty() && loser.tax_id != survivor.tax_id {
                if !survivor.tax_id.is_empty()
                    || tax_id.as_ref().is_some_and(|t| t != &loser.tax_id)
                {
                    return Err(DomainError::invalid(
                        "loser_ids",
                        "accounts with different tax ids are not duplicates",
                    ));
                }
                tax_id = Some(loser.tax_id.clone());
            }
        }
        if domains.len() > MAX_DOMAINS {
            return Err(DomainError::invalid(
                "loser_ids",
                "the merged account would have more than 20 domains",
            ));
        }
        let changes = AccountChanges {
            name: diff(&survivor.name, Some(&name)),
            domains: diff(&survivor.domains, Some(&domains)),
            industry: diff(&survivor.industry, Some(&industry)),
            parent_id: None,
            segment: diff(&survivor.segment, Some(&segment)),
            external_refs: diff(&survivor.external_refs, Some(&refs)),
            credit_terms: diff(&survivor.credit_terms, Some(&credit_terms)),
            tax_id: None,
        };
        Ok((
            vec![AccountEvent::Merged(AccountsMerged {
                losers: losers.iter().map(|(id, _)| *id).collect(),
                changes,
                tax_id,
                occurred_at,
            })],
            losers
                .iter()
                .map(|(id, _)| {
                    (
                        *id,
                        vec![AccountEvent::MergedInto(AccountMergedInto {
                            survivor: survivor_id,
                            occurred_at,
                        })],
                    )
                })
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{given, now};

    fn id() -> Uuid {
        Uuid::from_u128(7)
    }

    fn acme() -> AccountDetails {
        AccountDetails {
            kind: AccountKind::Company,
            name: " Acme Ltd ".into(),
            domains: vec!["Acme.example".into()],
            industry: "Manufacturing".into(),
            tax_id: "91310000ma1fl0000x".into(),
            parent_id: None,
            segment: "enterprise".into(),
            parent: ParentFacts::default(),
        }
    }

    fn created() -> AccountEvent {
        AccountEvent::Created(AccountCreated {
            kind: AccountKind::Company,
            name: "Acme Ltd".into(),
            domains: vec!["acme.example".into()],
            industry: "Manufacturing".into(),
            tax_id: "91310000MA1FL0000X".into(),
            parent_id: None,
            segment: "enterprise".into(),
            occurred_at: now(),
        })
    }

    fn customer() -> AccountEvent {
        AccountEvent::BecameCustomer(AccountBecameCustomer {
            trigger: "first_won_deal".into(),
            occurred_at: now(),
        })
    }

    #[test]
    fn only_person_accounts_are_erased_and_the_event_reads_back() {
        let mut person = acme();
        person.kind = AccountKind::Person;
        person.tax_id = String::new();
        let person_created = AccountEvent::Created(AccountCreated {
            kind: AccountKind::Person,
            name: "Wang Fang".into(),
            domains: vec![],
            industry: String::new(),
            tax_id: String::new(),
            parent_id: None,
            segment: String::new(),
            occurred_at: now(),
        });
        let erase = || AccountCommand::ErasePersonalData {
            request: "DSR-1".into(),
        };
        let events = given::<Account>([person_created.clone()])
            .when(erase())
            .result
            .unwrap();
        let state = Account::default().replay([person_created.clone()].iter().chain(&events));
        assert!(state.erased && state.name.is_empty());
        for event in &events {
            let json = serde_json::to_string(event).unwrap();
            let mut de = serde_json::Deserializer::from_str(&json);
            let back = AccountEvent::decode(event.event_type(), event.schema_version(), &mut de)
                .unwrap()
                .unwrap();
            assert_eq!(&back, event);
        }
        given::<Account>([created()])
            .when(erase())
            .then_error(DomainError::InvalidTransition {
                from: "company account",
                to: "erased",
            });
        let mut erased = vec![person_created];
        erased.extend(events);
        given::<Account>(erased).when(erase()).then(vec![]);
    }

    #[test]
    fn only_an_inactive_customer_is_flagged_at_risk() {
        let flag = |inactive| AccountCommand::FlagChurnRisk {
            days_inactive: 90,
            inactive,
        };
        given::<Account>([created(), customer()])
            .when(flag(true))
            .then(vec![AccountEvent::ChurnRiskFlagged(
                AccountChurnRiskFlagged {
                    rule: "inactivity".into(),
                    days_inactive: 90,
                    occurred_at: now(),
                },
            )]);
        given::<Account>([created(), customer()])
            .when(flag(false))
            .then_error(DomainError::NotApplicable { rule: "churn risk" });
        given::<Account>([created()])
            .when(flag(true))
            .then_error(DomainError::NotApplicable { rule: "churn risk" });
    }

    #[test]
    fn create_normalizes_and_reserves_the_tax_id() {
        let state = given::<Account>([])
            .when(AccountCommand::Create {
                self_id: id(),
                details: acme(),
            })
            .then(vec![created()]);
        assert_eq!(state.status, AccountStatus::Prospect);
        assert_eq!(
            state.unique_keys(),
            BTreeSet::from([
                ("domain", "acme.example".to_owned()),
                ("tax_id", "91310000MA1FL0000X".to_owned())
            ])
        );
    }

    #[test]
    fn a_parent_must_exist_and_never_make_a_cycle() {
        let parent = Uuid::from_u128(77);
        let child = Uuid::from_u128(78);
        // Create under a parent that does not exist (or is archived).
        let mut under_missing = acme();
        under_missing.parent_id = Some(parent);
        given::<Account>([])
            .when(AccountCommand::Create {
                self_id: id(),
                details: under_missing.clone(),
            })
            .then_error(DomainError::InvalidReference { field: "parent_id" });
        // Under a usable parent: created with it.
        under_missing.parent = ParentFacts {
            usable: true,
            ancestors: vec![],
        };
        let state = given::<Account>([])
            .when(AccountCommand::Create {
                self_id: id(),
                details: under_missing,
            })
            .then_ok();
        assert_eq!(state.parent_id, Some(parent));
        // Moving the account under its own descendant (whose ancestors
        // include the account) would make a cycle.
        let under_child = |ancestors: Vec<Uuid>| AccountCommand::UpdateDetails {
            self_id: id(),
            patch: AccountDetailsPatch {
                parent_id: Some(Some(child)),
                parent: ParentFacts {
                    usable: true,
                    ancestors,
                },
                ..AccountDetailsPatch::default()
            },
        };
        given::<Account>([created()])
            .when(under_child(vec![id(), parent]))
            .then_error(DomainError::InvalidReference { field: "parent_id" });
        given::<Account>([created()])
            .when(under_child(vec![Uuid::from_u128(1); MAX_PARENT_DEPTH]))
            .then_invalid(&["parent_id"]);
        let moved = given::<Account>([created()])
            .when(under_child(vec![parent]))
            .then_ok();
        assert_eq!(moved.parent_id, Some(child));
    }

    #[test]
    fn create_refuses_bad_fields_and_itself_as_parent() {
        let mut bad = acme();
        bad.name = String::new();
        bad.domains = vec![
            "not a domain".into(),
            "x.example".into(),
            "X.example".into(),
        ];
        bad.tax_id = "12 34".into();
        bad.parent_id = Some(id());
        bad.segment = "Big Ones".into();
        given::<Account>([])
            .when(AccountCommand::Create {
                self_id: id(),
                details: bad,
            })
            .then_invalid(&[
                "name",
                "domains[0]",
                "domains[2]",
                "tax_id",
                "parent_id",
                "segment",
            ]);
        given::<Account>([created()])
            .when(AccountCommand::Create {
                self_id: id(),
                details: acme(),
            })
            .then_error(DomainError::AlreadyExists {
                key: "account_id",
                holder: None,
            });
    }

    #[test]
    fn update_records_only_real_changes() {
        let patch = AccountDetailsPatch {
            name: Some("Acme Ltd".into()),
            industry: Some("Robotics".into()),
            ..AccountDetailsPatch::default()
        };
        given::<Account>([created()])
            .when(AccountCommand::UpdateDetails {
                self_id: id(),
                patch,
            })
            .then(vec![AccountEvent::DetailsUpdated(AccountDetailsUpdated {
                changes: AccountChanges {
                    industry: Some(Change {
                        old: "Manufacturing".into(),
                        new: "Robotics".into(),
                    }),
                    ..AccountChanges::default()
                },
                occurred_at: now(),
            })]);
        let same = AccountDetailsPatch {
            segment: Some("enterprise".into()),
            ..AccountDetailsPatch::default()
        };
        given::<Account>([created()])
            .when(AccountCommand::UpdateDetails {
                self_id: id(),
                patch: same,
            })
            .then(vec![]);
    }

    #[test]
    fn the_lifecycle_is_prospect_customer_churned_customer() {
        given::<Account>([created()])
            .when(AccountCommand::MarkChurned {
                reason: "cancelled".into(),
            })
            .then_error(DomainError::InvalidTransition {
                from: "prospect",
                to: "churned",
            });
        let state = given::<Account>([created()])
            .when(AccountCommand::MarkCustomer {
                trigger: "first_won_deal".into(),
            })
            .then(vec![customer()]);
        assert_eq!(state.status, AccountStatus::Customer);
        given::<Account>([created(), customer()])
            .when(AccountCommand::MarkCustomer {
                trigger: "first_order".into(),
            })
            .then(vec![]);
        let churned = AccountEvent::Churned(AccountChurned {
            reason: "cancelled".into(),
            occurred_at: now(),
        });
        given::<Account>([created(), customer()])
            .when(AccountCommand::MarkChurned {
                reason: "cancelled".into(),
            })
            .then(vec![churned.clone()]);
        given::<Account>([created(), customer()])
            .when(AccountCommand::MarkChurned {
                reason: "bored".into(),
            })
            .then_invalid(&["reason"]);
        let back = given::<Account>([created(), customer(), churned])
            .when(AccountCommand::MarkCustomer {
                trigger: "reactivation".into(),
            })
            .then(vec![AccountEvent::BecameCustomer(AccountBecameCustomer {
                trigger: "reactivation".into(),
                occurred_at: now(),
            })]);
        assert_eq!(back.status, AccountStatus::Customer);
    }

    #[test]
    fn a_person_account_and_a_company_do_not_merge() {
        use crate::aggregate::Mergeable;
        let company = Account::default().replay([created()].iter());
        let person = Account {
            kind: AccountKind::Person,
            ..company.clone()
        };
        for (survivor, loser) in [(&company, &person), (&person, &company)] {
            let refused = Account::merge(
                id(),
                survivor,
                &[(Uuid::from_u128(8), loser.clone())],
                &AccountMergeChoices {
                    name_from: Some(Uuid::from_u128(8)),
                    ..AccountMergeChoices::default()
                },
                crate::Context::at(now()),
            );
            assert_eq!(
                refused,
                Err(DomainError::invalid(
                    "loser_ids",
                    "a person account and a company are not duplicates",
                ))
            );
        }
    }

    #[test]
    fn accounts_merge_domains_and_take_a_missing_tax_id() {
        use crate::aggregate::Mergeable;
        let survivor = Account::default().replay(
            Account::default()
                .decide(
                    AccountCommand::Create {
                        self_id: id(),
                        details: AccountDetails {
                            name: "Acme".into(),
                            domains: vec!["acme.example".into()],
                            ..Default::default()
                        },
                    },
                    crate::Context::at(now()),
                )
                .unwrap()
                .iter(),
        );
        let loser = Account::default().replay([created()].iter());
        let (events, losers) = Account::merge(
            id(),
            &survivor,
            &[(Uuid::from_u128(8), loser.clone())],
            &AccountMergeChoices::default(),
            crate::Context::at(now()),
        )
        .unwrap();
        let merged = survivor.clone().replay(events.iter());
        assert_eq!(
            merged.domains,
            vec!["acme.example".to_owned()],
            "same domain once"
        );
        assert_eq!(merged.tax_id, "91310000MA1FL0000X");
        let gone = loser.replay(losers[0].1.iter());
        assert!(gone.unique_keys().is_empty());
        assert_eq!(
            gone.decide(
                AccountCommand::MarkCustomer {
                    trigger: "first_order".into()
                },
                crate::Context::at(now())
            ),
            Err(DomainError::RecordMerged { survivor: id() })
        );
        // Different tax ids are not duplicates.
        let other = Account::default().replay([created()].iter());
        let mut survivor_with_tax = merged.clone();
        survivor_with_tax.tax_id = "OTHER".into();
        assert!(matches!(
            Account::merge(
                id(),
                &survivor_with_tax,
                &[(Uuid::from_u128(9), other)],
                &AccountMergeChoices::default(),
                crate::Context::at(now())
            ),
            Err(DomainError::Invalid(_))
        ));
    }

    #[test]
    fn archived_accounts_refuse_all_but_restore() {
        let reason = Reason {
            code: "duplicate".into(),
            text: String::new(),
        };
        let archived = AccountEvent::Archived(LifecycleChanged {
            reason: reason.clone(),
            occurred_at: now(),
        });
        given::<Account>([created(), archived.clone()])
            .when(AccountCommand::MarkCustomer {
                trigger: "first_order".into(),
            })
            .then_error(DomainError::RecordArchived);
        given::<Account>([created(), archived])
            .when(AccountCommand::Restore(reason.clone()))
            .then(vec![AccountEvent::Restored(LifecycleChanged {
                reason,
                occurred_at: now(),
            })]);
        given::<Account>([])
            .when(AccountCommand::Archive(Reason::default()))
            .then_error(DomainError::NotFound);
    }

    fn erp(version: u64) -> ExternalRef {
        ExternalRef {
            source: "sap".into(),
            external_id: "C-100".into(),
            external_version: version,
        }
    }

    fn sync(version: u64, tax_id: &str) -> AccountCommand {
        AccountCommand::SyncFromErp {
            external: erp(version),
            tax_id: tax_id.into(),
            credit_terms: Some(CreditTerms {
                limit: Money {
                    amount_minor: 5_000_000,
                    currency: "CNY".into(),
                },
                payment_days: 30,
            }),
        }
    }

    #[test]
    fn the_erp_links_an_account_and_then_owns_its_tax_id() {
        let linked = given::<Account>([created()])
            .when(sync(3, "91310000ma1fl0000y"))
            .then_ok();
        assert_eq!(linked.tax_id, "91310000MA1FL0000Y");
        assert_eq!(linked.external_refs, [erp(3)]);
        assert_eq!(
            linked.credit_terms.as_ref().map(|t| t.payment_days),
            Some(30)
        );
        assert!(
            linked
                .unique_keys()
                .contains(&(EXTERNAL_REF, "sap:C-100".to_owned()))
        );
        let update_tax = |tax_id: &str| AccountCommand::UpdateDetails {
            self_id: id(),
            patch: AccountDetailsPatch {
                tax_id: Some(tax_id.into()),
                ..AccountDetailsPatch::default()
            },
        };
        // The user may not change it now; naming the same value is no change.
        assert_eq!(
            linked.decide(update_tax("OTHER"), Context::at(now())),
            Err(DomainError::FieldOwnedExternally { field: "tax_id" })
        );
        assert_eq!(
            linked.decide(update_tax(" 91310000ma1fl0000y "), Context::at(now())),
            Ok(vec![])
        );
        // An older or equal version changes nothing; another customer of the
        // same ERP is refused.
        assert_eq!(
            linked.decide(sync(3, "NEWER"), Context::at(now())),
            Ok(vec![])
        );
        let other = AccountCommand::SyncFromErp {
            external: ExternalRef {
                external_id: "C-200".into(),
                ..erp(4)
            },
            tax_id: String::new(),
            credit_terms: None,
        };
        assert_eq!(
            linked.decide(other, Context::at(now())),
            Err(DomainError::AlreadyExists {
                key: "external_ref",
                holder: None
            })
        );
        // An unlinked account's tax id is the user's to change.
        let unlinked = given::<Account>([created()])
            .when(update_tax("NEW-1"))
            .then_ok();
        assert_eq!(unlinked.tax_id, "NEW-1");
    }

    #[test]
    fn erp_syncs_are_checked() {
        given::<Account>([created()])
            .when(AccountCommand::SyncFromErp {
                external: ExternalRef {
                    source: "S A P".into(),
                    external_id: String::new(),
                    external_version: 0,
                },
                tax_id: "no spaces allowed".into(),
                credit_terms: Some(CreditTerms {
                    limit: Money {
                        amount_minor: -1,
                        currency: "CNY".into(),
                    },
                    payment_days: 4000,
                }),
            })
            .then_invalid(&[
                "external.source",
                "external.external_id",
                "external.external_version",
                "tax_id",
                "credit_terms.limit.amount_minor",
                "credit_terms.payment_days",
            ]);
        given::<Account>([])
            .when(sync(1, ""))
            .then_error(DomainError::NotFound);
    }
}
