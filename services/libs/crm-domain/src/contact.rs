//! Contact: a person the tenant does business with (DOMAIN.md §2.3).
//!
//! Emails are unique per tenant (hard reservation on the lowercased address);
//! archived contacts refuse everything but restore.
use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::{Aggregate, Context, DomainEvent, MergeParties, UniqueKey};
use crate::common::{
    Change, Lifecycle, LifecycleChanged, Reason, diff, is_bcp47, is_e164, is_email, is_iana_zone,
    normalize_email, text_ok,
};
use crate::error::{DomainError, Violations};
use crate::records::{CommonCommand, CommonEvent, RecordMeta};

pub const MAX_EMAILS: usize = 10;
pub const MAX_PHONES: usize = 10;
/// Consent purposes of DOMAIN.md §2.3.
pub const CONSENT_PURPOSES: &[&str] = &[
    "marketing_email",
    "marketing_sms",
    "marketing_call",
    "profiling",
    "third_party_sharing",
];
/// GDPR legal bases.
pub const LEGAL_BASES: &[&str] = &[
    "consent",
    "contract",
    "legal_obligation",
    "vital_interests",
    "public_task",
    "legitimate_interests",
];
pub const CHANNELS: &[&str] = &["email", "phone", "sms", "chat", "mail"];
pub const PHONE_KINDS: &[&str] = &["mobile", "work", "home", "other"];

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonName {
    pub given: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub family: String,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Email {
    pub address: String,
    pub primary: bool,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phone {
    pub number: String,
    pub kind: String,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preferences {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub channel: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub language: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub time_zone: String,
    #[serde(default)]
    pub do_not_contact: bool,
}

/// Everything a new contact is created with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContactDetails {
    pub name: PersonName,
    pub emails: Vec<Email>,
    pub phones: Vec<Phone>,
    pub title: String,
    pub preferences: Preferences,
}

/// The fields an update replaces; `None` keeps the current value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContactDetailsPatch {
    pub name: Option<PersonName>,
    pub emails: Option<Vec<Email>>,
    pub phones: Option<Vec<Phone>>,
    pub title: Option<String>,
    pub preferences: Option<Preferences>,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    pub granted: bool,
    pub source: String,
    pub basis: String,
    pub decided_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContactCommand {
    Create(ContactDetails),
    UpdateDetails(ContactDetailsPatch),
    ChangeConsent {
        purpose: String,
        granted: bool,
        source: String,
        basis: String,
    },
    Archive(Reason),
    Restore(Reason),
    /// `account_active` is the handler's fact about the account, valid now.
    LinkToAccount {
        account_id: Uuid,
        role: String,
        primary: bool,
        account_active: bool,
    },
    /// Owner, tags and shares (see [`crate::records`]).
    Common(CommonCommand),
    UnlinkFromAccount {
        account_id: Uuid,
    },
    /// 0–10; the latest response per contact counts for NPS.
    RecordNpsResponse {
        score: u8,
        comment: String,
    },
    /// Forget the person (DESIGN §6): `request` names the data subject's
    /// request (1–200 characters). The handler allows it to admins only and
    /// then destroys the contact's key, so every personal field ever stored
    /// becomes unreadable.
    ErasePersonalData {
        request: String,
    },
}

/// The person's data was erased: the record keeps its ids, times and
/// amounts; its personal fields are unreadable from now on.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonalDataErased {
    /// The data subject's request, e.g. a ticket number.
    pub request: String,
    pub occurred_at: Timestamp,
}

/// A contact's link to an account; at most one is primary.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactLinkedToAccount {
    pub account_id: Uuid,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub role: String,
    pub primary: bool,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactCreated {
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    pub name: PersonName,
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    pub emails: Vec<Email>,
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    pub phones: Vec<Phone>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub title: String,
    #[serde(default)]
    pub preferences: Preferences,
    pub occurred_at: Timestamp,
}

/// `ContactCreated` as schema version 1 stored it: one `full_name` string.
/// Read through [`ContactCreatedV1::upcast`]; never written any more.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactCreatedV1 {
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    pub full_name: String,
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    pub emails: Vec<Email>,
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    #[serde(default)]
    pub phones: Vec<Phone>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub title: String,
    #[serde(default)]
    pub preferences: Preferences,
    pub occurred_at: Timestamp,
}

impl ContactCreatedV1 {
    /// v1 → v2: the family name is the last word of `full_name`, the given
    /// names the words before it (a single word is a given name).
    pub fn upcast(self) -> ContactCreated {
        let full = self.full_name.trim();
        let name = match full.rsplit_once(char::is_whitespace) {
            Some((given, family)) => PersonName {
                given: given.trim().to_owned(),
                family: family.to_owned(),
            },
            None => PersonName {
                given: full.to_owned(),
                family: String::new(),
            },
        };
        ContactCreated {
            name,
            emails: self.emails,
            phones: self.phones,
            title: self.title,
            preferences: self.preferences,
            occurred_at: self.occurred_at,
        }
    }
}

/// Only the fields that really changed.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactChanges {
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Change<PersonName>>,
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emails: Option<Change<Vec<Email>>>,
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phones: Option<Change<Vec<Phone>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<Change<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferences: Option<Change<Preferences>>,
}

impl ContactChanges {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactDetailsUpdated {
    pub changes: ContactChanges,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactConsentChanged {
    pub purpose: String,
    pub granted: bool,
    pub source: String,
    pub basis: String,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactUnlinkedFromAccount {
    pub account_id: Uuid,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NpsResponseRecorded {
    pub score: u8,
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
    pub occurred_at: Timestamp,
}

/// The survivor of a merge: what it took from the losers.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordsMerged {
    pub losers: Vec<Uuid>,
    pub changes: ContactChanges,
    /// Consent decisions of losers that are newer than the survivor's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consent: BTreeMap<String, Consent>,
    pub occurred_at: Timestamp,
}

/// A loser of a merge: from now on it answers with its survivor.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordMergedInto {
    pub survivor: Uuid,
    pub occurred_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ContactEvent {
    Created(ContactCreated),
    DetailsUpdated(ContactDetailsUpdated),
    ConsentChanged(ContactConsentChanged),
    Archived(LifecycleChanged),
    Restored(LifecycleChanged),
    LinkedToAccount(ContactLinkedToAccount),
    Merged(RecordsMerged),
    MergedInto(RecordMergedInto),
    Common(CommonEvent),
    UnlinkedFromAccount(ContactUnlinkedFromAccount),
    NpsRecorded(NpsResponseRecorded),
    PersonalDataErased(PersonalDataErased),
}

impl DomainEvent for ContactEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Common(event) => event.event_type(),
            Self::Created(_) => "ContactCreated",
            Self::DetailsUpdated(_) => "ContactDetailsUpdated",
            Self::ConsentChanged(_) => "ContactConsentChanged",
            Self::Archived(_) => "RecordArchived",
            Self::Restored(_) => "RecordRestored",
            Self::LinkedToAccount(_) => "ContactLinkedToAccount",
            Self::UnlinkedFromAccount(_) => "ContactUnlinkedFromAccount",
            Self::NpsRecorded(_) => "NpsResponseRecorded",
            Self::Merged(_) => "RecordsMerged",
            Self::MergedInto(_) => "RecordMergedInto",
            Self::PersonalDataErased(_) => "PersonalDataErased",
        }
    }

    fn occurred_at(&self) -> jiff::Timestamp {
        match self {
            Self::Common(event) => event.occurred_at(),
            Self::Created(e) => e.occurred_at,
            Self::DetailsUpdated(e) => e.occurred_at,
            Self::ConsentChanged(e) => e.occurred_at,
            Self::Archived(e) => e.occurred_at,
            Self::Restored(e) => e.occurred_at,
            Self::LinkedToAccount(e) => e.occurred_at,
            Self::UnlinkedFromAccount(e) => e.occurred_at,
            Self::NpsRecorded(e) => e.occurred_at,
            Self::Merged(e) => e.occurred_at,
            Self::MergedInto(e) => e.occurred_at,
            Self::PersonalDataErased(e) => e.occurred_at,
        }
    }

    fn schema_version(&self) -> u32 {
        match self {
            Self::Created(_) => 2,
            _ => 1,
        }
    }

    fn decode<'de, D: serde::Deserializer<'de>>(
        event_type: &str,
        schema_version: u32,
        payload: D,
    ) -> Result<Option<Self>, D::Error> {
        Ok(Some(match (event_type, schema_version) {
            ("ContactCreated", 1) => {
                Self::Created(ContactCreatedV1::deserialize(payload)?.upcast())
            }
            ("ContactCreated", _) => Self::Created(Deserialize::deserialize(payload)?),
            ("ContactDetailsUpdated", _) => {
                Self::DetailsUpdated(Deserialize::deserialize(payload)?)
            }
            ("ContactConsentChanged", _) => {
                Self::ConsentChanged(Deserialize::deserialize(payload)?)
            }
            ("RecordArchived", _) => Self::Archived(Deserialize::deserialize(payload)?),
            ("RecordRestored", _) => Self::Restored(Deserialize::deserialize(payload)?),
            ("RecordsMerged", _) => Self::Merged(Deserialize::deserialize(payload)?),
            ("ContactUnlinkedFromAccount", _) => {
                Self::UnlinkedFromAccount(Deserialize::deserialize(payload)?)
            }
            ("NpsResponseRecorded", _) => Self::NpsRecorded(Deserialize::deserialize(payload)?),
            ("PersonalDataErased", _) => {
                Self::PersonalDataErased(Deserialize::deserialize(payload)?)
            }
            ("RecordMergedInto", _) => Self::MergedInto(Deserialize::deserialize(payload)?),
            ("ContactLinkedToAccount", _) => {
                Self::LinkedToAccount(Deserialize::deserialize(payload)?)
            }
            _ => return Ok(CommonEvent::decode(event_type, payload)?.map(Self::Common)),
        }))
    }
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    pub exists: bool,
    pub lifecycle: Lifecycle,
    pub name: PersonName,
    pub emails: Vec<Email>,
    pub phones: Vec<Phone>,
    pub title: String,
    pub preferences: Preferences,
    pub consent: BTreeMap<String, Consent>,
    #[serde(default)]
    pub accounts: Vec<AccountLink>,
    #[serde(default)]
    pub merged_into: Option<Uuid>,
    #[serde(default)]
    pub meta: RecordMeta,
    #[serde(default)]
    pub nps: Option<u8>,
    /// Personal data erased: refuses every command.
    #[serde(default)]
    pub erased: bool,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountLink {
    pub account_id: Uuid,
    pub role: String,
    pub primary: bool,
}

fn validate_name(name: &PersonName, v: &mut Violations) {
    v.check(
        text_ok(&name.given, 200, false),
        "name.given",
        "must be 1 to 200 characters",
    );
    v.check(
        text_ok(&name.family, 200, true),
        "name.family",
        "must be at most 200 characters",
    );
}

/// Validates emails and makes exactly one primary (the first, if none is).
pub(crate) fn validate_emails(emails: &[Email], field: &str, v: &mut Violations) -> Vec<Email> {
    v.check(
        emails.len() <= MAX_EMAILS,
        field,
        "must have at most 10 addresses",
    );
    let mut seen = BTreeSet::new();
    for (i, email) in emails.iter().enumerate() {
        // A lead keeps the address as given: padding counts too.
        v.check(
            is_email(email.address.trim()) && email.address.len() <= 300,
            format!("{field}[{i}].address"),
            "must be an email address",
        );
        v.check(
            seen.insert(normalize_email(&email.address)),
            format!("{field}[{i}].address"),
            "appears twice",
        );
    }
    let primaries = emails.iter().filter(|e| e.primary).count();
    v.check(
        primaries <= 1,
        field,
        "must have at most one primary address",
    );
    let mut normalized: Vec<Email> = emails
        .iter()
        .map(|e| Email {
            address: e.address.trim().to_owned(),
            primary: e.primary,
        })
        .collect();
    if primaries == 0
        && let Some(first) = normalized.first_mut()
    {
        first.primary = true;
    }
    normalized
}

pub(crate) fn validate_phones(phones: &[Phone], field: &str, v: &mut Violations) -> Vec<Phone> {
    v.check(
        phones.len() <= MAX_PHONES,
        field,
        "must have at most 10 numbers",
    );
    phones
        .iter()
        .enumerate()
        .map(|(i, phone)| {
            v.check(
                is_e164(&phone.number),
                format!("{field}[{i}].number"),
                "must be E.164, e.g. +8613800138000",
            );
            let kind = if phone.kind.is_empty() {
                "other".to_owned()
            } else {
                phone.kind.clone()
            };
            v.check(
                PHONE_KINDS.contains(&kind.as_str()),
                format!("{field}[{i}].kind"),
                "must be mobile, work, home or other",
            );
            Phone {
                number: phone.number.clone(),
                kind,
            }
        })
        .collect()
}

fn validate_preferences(p: &Preferences, v: &mut Violations) {
    v.check(
        p.channel.is_empty() || CHANNELS.contains(&p.channel.as_str()),
        "preferences.channel",
        "must be email, phone, sms, chat or mail",
    );
    v.check(
        p.language.is_empty() || is_bcp47(&p.language),
        "preferences.language",
        "must be a BCP 47 language tag, e.g. en-GB",
    );
    v.check(
        p.time_zone.is_empty() || is_iana_zone(&p.time_zone),
        "preferences.time_zone",
        "must be an IANA time zone, e.g. Asia/Shanghai",
    );
}

impl Contact {
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

impl Contact {
    /// Whether other records may take it in (a campaign's member): it
    /// exists, is active, and was neither merged away nor erased.
    pub fn usable(&self) -> bool {
        self.exists
            && self.lifecycle == Lifecycle::Active
            && self.merged_into.is_none()
            && !self.erased
    }
}

impl Aggregate for Contact {
    type Command = ContactCommand;
    type Event = ContactEvent;
    const STREAM_TYPE: &'static str = "contact";

    fn exists(&self) -> bool {
        self.exists
    }

    fn holds_personal_data(&self) -> bool {
        true
    }

    fn creates(command: &Self::Command) -> bool {
        matches!(command, ContactCommand::Create(_))
    }

    fn decide(
        &self,
        command: ContactCommand,
        context: Context,
    ) -> Result<Vec<ContactEvent>, DomainError> {
        let occurred_at = context.occurred_at()?;
        // Their own lifecycle handles archiving (it predates the shared one).
        let command = match command {
            ContactCommand::Common(CommonCommand::Archive(reason)) => {
                ContactCommand::Archive(reason)
            }
            ContactCommand::Common(CommonCommand::Restore(reason)) => {
                ContactCommand::Restore(reason)
            }
            other => other,
        };
        match command {
            ContactCommand::Common(command) => {
                self.live()?;
                Ok(self
                    .meta
                    .decide(command, occurred_at)?
                    .into_iter()
                    .map(ContactEvent::Common)
                    .collect())
            }
            ContactCommand::Create(details) => {
                if self.exists {
                    return Err(DomainError::AlreadyExists {
                        key: "contact_id",
                        holder: None,
                    });
                }
                let mut v = Violations::default();
                validate_name(&details.name, &mut v);
                let emails = validate_emails(&details.emails, "emails", &mut v);
                let phones = validate_phones(&details.phones, "phones", &mut v);
                v.check(
                    text_ok(&details.title, 200, true),
                    "title",
                    "must be at most 200 characters",
                );
                validate_preferences(&details.preferences, &mut v);
                v.into_result()?;
                Ok(vec![ContactEvent::Created(ContactCreated {
                    name: details.name,
                    emails,
                    phones,
                    title: details.title,
                    preferences: details.preferences,
                    occurred_at,
                })])
            }
            ContactCommand::UpdateDetails(patch) => {
                self.live()?;
                let mut v = Violations::default();
                if let Some(name) = &patch.name {
                    validate_name(name, &mut v);
                }
                let emails = patch
                    .emails
                    .as_deref()
                    .map(|e| validate_emails(e, "emails", &mut v));
                let phones = patch
                    .phones
                    .as_deref()
                    .map(|p| validate_phones(p, "phones", &mut v));
                if let Some(title) = &patch.title {
                    v.check(
                        text_ok(title, 200, true),
                        "title",
                        "must be at most 200 characters",
                    );
                }
                if let Some(preferences) = &patch.preferences {
                    validate_preferences(preferences, &mut v);
                }
                v.into_result()?;
                let changes = ContactChanges {
                    name: diff(&self.name, patch.name.as_ref()),
                    emails: diff(&self.emails, emails.as_ref()),
                    phones: diff(&self.phones, phones.as_ref()),
                    title: diff(&self.title, patch.title.as_ref()),
                    preferences: diff(&self.preferences, patch.preferences.as_ref()),
                };
                if changes.is_empty() {
                    return Ok(vec![]);
                }
                Ok(vec![ContactEvent::DetailsUpdated(ContactDetailsUpdated {
                    changes,
                    occurred_at,
                })])
            }
            ContactCommand::ChangeConsent {
                purpose,
                granted,
                source,
                basis,
            } => {
                self.live()?;
                let mut v = Violations::default();
                v.check(
                    CONSENT_PURPOSES.contains(&purpose.as_str()),
                    "purpose",
                    "must be a consent purpose",
                );
                v.check(
                    text_ok(&source, 100, false),
                    "source",
                    "must be 1 to 100 characters",
                );
                v.check(
                    LEGAL_BASES.contains(&basis.as_str()),
                    "basis",
                    "must be a legal basis",
                );
                v.into_result()?;
                if let Some(current) = self.consent.get(&purpose)
                    && current.granted == granted
                    && current.source == source
                    && current.basis == basis
                {
                    return Ok(vec![]);
                }
                Ok(vec![ContactEvent::ConsentChanged(ContactConsentChanged {
                    purpose,
                    granted,
                    source,
                    basis,
                    occurred_at,
                })])
            }
            ContactCommand::LinkToAccount {
                account_id,
                role,
                primary,
                account_active,
            } => {
                self.live()?;
                if !account_active {
                    return Err(DomainError::InvalidReference {
                        field: "account_id",
                    });
                }
                let mut v = Violations::default();
                v.check(
                    role.is_empty() || crate::common::is_code(&role, 64),
                    "role",
                    "must be a code of [a-z0-9_]",
                );
                v.into_result()?;
                let current = self.accounts.iter().find(|a| a.account_id == account_id);
                if current.is_some_and(|a| a.role == role && a.primary == primary) {
                    return Ok(vec![]);
                }
                Ok(vec![ContactEvent::LinkedToAccount(
                    ContactLinkedToAccount {
                        account_id,
                        role,
                        primary,
                        occurred_at,
                    },
                )])
            }
            ContactCommand::UnlinkFromAccount { account_id } => {
                self.live()?;
                if !self.accounts.iter().any(|a| a.account_id == account_id) {
                    return Ok(vec![]);
                }
                Ok(vec![ContactEvent::UnlinkedFromAccount(
                    ContactUnlinkedFromAccount {
                        account_id,
                        occurred_at,
                    },
                )])
            }
            ContactCommand::RecordNpsResponse { score, comment } => {
                self.live()?;
                let mut v = Violations::default();
                v.check(score <= 10, "score", "must be 0 to 10");
                v.check(
                    text_ok(&comment, 2000, true),
                    "comment",
                    "must be at most 2000 characters",
                );
                v.into_result()?;
                Ok(vec![ContactEvent::NpsRecorded(NpsResponseRecorded {
                    score,
                    comment,
                    occurred_at,
                })])
            }
            ContactCommand::ErasePersonalData { request } => {
                // Allowed on archived and merged records too: the law does
                // not wait for a restore. Erasing twice changes nothing.
                if !self.exists {
                    return Err(DomainError::NotFound);
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
                Ok(vec![ContactEvent::PersonalDataErased(PersonalDataErased {
                    request: request.trim().to_owned(),
                    occurred_at,
                })])
            }
            ContactCommand::Archive(reason) => {
                self.live()?;
                Ok(vec![ContactEvent::Archived(
                    self.lifecycle.archive(reason, occurred_at)?,
                )])
            }
            ContactCommand::Restore(reason) => {
                if !self.exists {
                    return Err(DomainError::NotFound);
                }
                if let Some(survivor) = self.merged_into {
                    return Err(DomainError::RecordMerged { survivor });
                }
                Ok(vec![ContactEvent::Restored(
                    self.lifecycle.restore(reason, occurred_at)?,
                )])
            }
        }
    }

    fn evolve(mut self, event: &ContactEvent) -> Self {
        match event {
            ContactEvent::Common(event) => self.meta.evolve(event),
            ContactEvent::Created(created) => {
                self.exists = true;
                self.name = created.name.clone();
                self.emails = created.emails.clone();
                self.phones = created.phones.clone();
                self.title = created.title.clone();
                self.preferences = created.preferences.clone();
            }
            ContactEvent::DetailsUpdated(updated) => {
                let c = &updated.changes;
                if let Some(change) = &c.name {
                    self.name = change.new.clone();
                }
                if let Some(change) = &c.emails {
                    self.emails = change.new.clone();
                }
                if let Some(change) = &c.phones {
                    self.phones = change.new.clone();
                }
                if let Some(change) = &c.title {
                    self.title = change.new.clone();
                }
                if let Some(change) = &c.preferences {
                    self.preferences = change.new.clone();
                }
            }
            ContactEvent::ConsentChanged(consent) => {
                self.consent.insert(
                    consent.purpose.clone(),
                    Consent {
                        granted: consent.granted,
                        source: consent.source.clone(),
                        basis: consent.basis.clone(),
                        decided_at: consent.occurred_at,
                    },
                );
            }
            ContactEvent::LinkedToAccount(link) => {
                if link.primary {
                    for other in &mut self.accounts {
                        other.primary = false;
                    }
                }
                self.accounts.retain(|a| a.account_id != link.account_id);
                self.accounts.push(AccountLink {
                    account_id: link.account_id,
                    role: link.role.clone(),
                    primary: link.primary,
                });
            }
            ContactEvent::Merged(merged) => {
                self = self.evolve(&ContactEvent::DetailsUpdated(ContactDetailsUpdated {
                    changes: merged.changes.clone(),
                    occurred_at: merged.occurred_at,
                }));
                for (purpose, consent) in &merged.consent {
                    self.consent.insert(purpose.clone(), consent.clone());
                }
            }
            ContactEvent::MergedInto(merged) => self.merged_into = Some(merged.survivor),
            ContactEvent::UnlinkedFromAccount(unlinked) => {
                self.accounts
                    .retain(|a| a.account_id != unlinked.account_id);
            }
            ContactEvent::NpsRecorded(nps) => self.nps = Some(nps.score),
            ContactEvent::PersonalDataErased(_) => {
                self.erased = true;
                self.name = PersonName::default();
                self.emails.clear();
                self.phones.clear();
                self.title.clear();
            }
            ContactEvent::Archived(_) => self.lifecycle = Lifecycle::Archived,
            ContactEvent::Restored(_) => self.lifecycle = Lifecycle::Active,
        }
        self
    }

    fn unique_keys(&self) -> BTreeSet<UniqueKey> {
        if self.merged_into.is_some() {
            return BTreeSet::new();
        }
        // Phones are soft by default: the handler reserves only the kinds the
        // tenant keeps hard.
        self.emails
            .iter()
            .map(|e| ("email", normalize_email(&e.address)))
            .chain(self.phones.iter().map(|p| ("phone", p.number.clone())))
            .collect()
    }
}

/// Which record each single-valued field comes from; `None` keeps the
/// survivor's. Emails and phones are the union of all records'.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeChoices {
    pub name_from: Option<Uuid>,
    pub title_from: Option<Uuid>,
    pub preferences_from: Option<Uuid>,
}

/// The events of a merge, per stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeOutcome {
    pub survivor: Vec<ContactEvent>,
    pub losers: Vec<(Uuid, Vec<ContactEvent>)>,
}

impl crate::aggregate::Mergeable for Contact {
    type Choices = MergeChoices;

    fn merge(
        survivor_id: Uuid,
        survivor: &Self,
        losers: &[(Uuid, Self)],
        choices: &MergeChoices,
        context: Context,
    ) -> Result<(Vec<ContactEvent>, Vec<(Uuid, Vec<ContactEvent>)>), DomainError> {
        let outcome = merge(survivor_id, survivor, losers, choices, context)?;
        Ok((outcome.survivor, outcome.losers))
    }
}

/// Merges `losers` into the survivor (DOMAIN.md §2.11). None may be merged
/// or archived; consent follows the latest decision per purpose.
pub fn merge(
    survivor_id: Uuid,
    survivor: &Contact,
    losers: &[(Uuid, Contact)],
    choices: &MergeChoices,
    context: Context,
) -> Result<MergeOutcome, DomainError> {
    let occurred_at = context.occurred_at()?;
    let parties = MergeParties::check(survivor_id, survivor, losers, |contact: &Contact| {
        contact.live()
    })?;
    let pick = |field, from| parties.pick(field, from);
    let name = pick("name_from", choices.name_from)?.name.clone();
    let title = pick("title_from", choices.title_from)?.title.clone();
    let preferences = pick("preferences_from", choices.preferences_from)?
        .preferences
        .clone();
    let mut emails = survivor.emails.clone();
    let mut phones = survivor.phones.clone();
    let mut consent: BTreeMap<String, Consent> = BTreeMap::new();
    for (_, loser) in losers {
        for email in &loser.emails {
            if !emails
                .iter()
                .any(|e| normalize_email(&e.address) == normalize_email(&email.address))
            {
                emails.push(Email {
                    address: email.address.clone(),
                    primary: emails.is_empty(),
                });
            }
        }
        for phone in &loser.phones {
            if !phones.iter().any(|p| p.number == phone.number) {
                phones.push(phone.clone());
            }
        }
        for (purpose, decision) in &loser.consent {
            let newest = consent
                .get(purpose)
                .or_else(|| survivor.consent.get(purpose))
                .is_none_or(|current| decision.decided_at > current.decided_at);
            if newest {
                consent.insert(purpose.clone(), decision.clone());
            }
        }
    }
    if emails.len() > MAX_EMAILS || phones.len() > MAX_PHONES {
        return Err(DomainError::invalid(
            "loser_ids",
            "the merged contact would have more than 10 emails or phones",
        ));
    }
    let changes = ContactChanges {
        name: diff(&survivor.name, Some(&name)),
        emails: diff(&survivor.emails, Some(&emails)),
        phones: diff(&survivor.phones, Some(&phones)),
        title: diff(&survivor.title, Some(&title)),
        preferences: diff(&survivor.preferences, Some(&preferences)),
    };
    Ok(MergeOutcome {
        survivor: vec![ContactEvent::Merged(RecordsMerged {
            losers: losers.iter().map(|(id, _)| *id).collect(),
            changes,
            consent,
            occurred_at,
        })],
        losers: losers
            .iter()
            .map(|(id, _)| {
                (
                    *id,
                    vec![ContactEvent::MergedInto(RecordMergedInto {
                        survivor: survivor_id,
                        occurred_at,
                    })],
                )
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The email keys among a contact's unique keys (phones are there too).
    fn email_keys(contact: &Contact) -> BTreeSet<UniqueKey> {
        contact
            .unique_keys()
            .into_iter()
            .filter(|(kind, _)| *kind == "email")
            .collect()
    }
    use crate::testing::{given, now};
    use proptest::prelude::*;

    fn ada() -> ContactDetails {
        ContactDetails {
            name: PersonName {
                given: "Ada".into(),
                family: "Lovelace".into(),
            },
            emails: vec![Email {
                address: "Ada@Example.com".into(),
                primary: false,
            }],
            phones: vec![Phone {
                number: "+442071838750".into(),
                kind: String::new(),
            }],
            title: "Analyst".into(),
            preferences: Preferences {
                channel: "email".into(),
                language: "en-GB".into(),
                time_zone: "Europe/London".into(),
                do_not_contact: false,
            },
        }
    }

    fn created() -> ContactEvent {
        ContactEvent::Created(ContactCreated {
            name: PersonName {
                given: "Ada".into(),
                family: "Lovelace".into(),
            },
            emails: vec![Email {
                address: "Ada@Example.com".into(),
                primary: true,
            }],
            phones: vec![Phone {
                number: "+442071838750".into(),
                kind: "other".into(),
            }],
            title: "Analyst".into(),
            preferences: Preferences {
                channel: "email".into(),
                language: "en-GB".into(),
                time_zone: "Europe/London".into(),
                do_not_contact: false,
            },
            occurred_at: now(),
        })
    }

    fn archived() -> ContactEvent {
        ContactEvent::Archived(LifecycleChanged {
            reason: Reason {
                code: "left_company".into(),
                text: String::new(),
            },
            occurred_at: now(),
        })
    }

    fn reason() -> Reason {
        Reason {
            code: "left_company".into(),
            text: "moved on".into(),
        }
    }

    #[test]
    fn erasing_forgets_the_person_once_and_then_refuses_every_command() {
        let state = given::<Contact>([created()])
            .when(ContactCommand::ErasePersonalData {
                request: " DSR-42 ".into(),
            })
            .then(vec![ContactEvent::PersonalDataErased(PersonalDataErased {
                request: "DSR-42".into(),
                occurred_at: now(),
            })]);
        assert!(state.erased);
        assert_eq!(state.name, PersonName::default());
        assert!(state.emails.is_empty() && state.phones.is_empty());
        assert!(
            state.unique_keys().is_empty(),
            "erasure drops the reservations"
        );
        let erased = [
            created(),
            ContactEvent::PersonalDataErased(PersonalDataErased {
                request: "DSR-42".into(),
                occurred_at: now(),
            }),
        ];
        given::<Contact>(erased.clone())
            .when(ContactCommand::ErasePersonalData {
                request: "DSR-43".into(),
            })
            .then(vec![]);
        given::<Contact>(erased)
            .when(ContactCommand::RecordNpsResponse {
                score: 9,
                comment: String::new(),
            })
            .then_error(DomainError::RecordErased);
        given::<Contact>([created()])
            .when(ContactCommand::ErasePersonalData {
                request: String::new(),
            })
            .then_invalid(&["request"]);
        given::<Contact>([])
            .when(ContactCommand::ErasePersonalData {
                request: "DSR-1".into(),
            })
            .then_error(DomainError::NotFound);
    }

    #[test]
    fn create_makes_the_first_email_primary_and_reserves_it_lowercased() {
        let state = given::<Contact>([])
            .when(ContactCommand::Create(ada()))
            .then(vec![created()]);
        assert_eq!(
            email_keys(&state),
            BTreeSet::from([("email", "ada@example.com".to_owned())])
        );
    }

    #[test]
    fn create_twice_is_already_exists() {
        given::<Contact>([created()])
            .when(ContactCommand::Create(ada()))
            .then_error(DomainError::AlreadyExists {
                key: "contact_id",
                holder: None,
            });
    }

    #[test]
    fn create_lists_every_bad_field() {
        let mut bad = ada();
        bad.name.given = " ".into();
        bad.emails = vec![
            Email {
                address: "not-an-email".into(),
                primary: true,
            },
            Email {
                address: "b@example.com".into(),
                primary: true,
            },
        ];
        bad.phones = vec![Phone {
            number: "138 0013 8000".into(),
            kind: "pager".into(),
        }];
        bad.preferences.language = "english".into();
        bad.preferences.time_zone = "Mars/Olympus".into();
        bad.preferences.channel = "pigeon".into();
        given::<Contact>([])
            .when(ContactCommand::Create(bad))
            .then_invalid(&[
                "name.given",
                "emails[0].address",
                "emails",
                "phones[0].number",
                "phones[0].kind",
                "preferences.channel",
                "preferences.language",
                "preferences.time_zone",
            ]);
    }

    #[test]
    fn duplicate_emails_in_one_contact_are_refused_case_insensitively() {
        let mut bad = ada();
        bad.emails.push(Email {
            address: "ADA@example.COM".into(),
            primary: false,
        });
        given::<Contact>([])
            .when(ContactCommand::Create(bad))
            .then_invalid(&["emails[1].address"]);
    }

    #[test]
    fn too_many_emails_are_refused() {
        let mut bad = ada();
        bad.emails = (0..11)
            .map(|i| Email {
                address: format!("a{i}@example.com"),
                primary: i == 0,
            })
            .collect();
        given::<Contact>([])
            .when(ContactCommand::Create(bad))
            .then_invalid(&["emails"]);
    }

    #[test]
    fn a_future_occurred_at_is_refused_but_the_past_is_fine() {
        given::<Contact>([])
            .at("2026-11-28T11:00:00Z")
            .when(ContactCommand::Create(ada()))
            .then_invalid(&["options.occurred_at"]);
        let events = given::<Contact>([])
            .at("2020-01-01T00:00:00Z")
            .when(ContactCommand::Create(ada()));
        assert!(events.result.is_ok());
    }

    #[test]
    fn update_records_only_what_changed() {
        let patch = ContactDetailsPatch {
            title: Some("CTO".into()),
            name: Some(PersonName {
                given: "Ada".into(),
                family: "Lovelace".into(),
            }),
            ..ContactDetailsPatch::default()
        };
        let state = given::<Contact>([created()])
            .when(ContactCommand::UpdateDetails(patch))
            .then(vec![ContactEvent::DetailsUpdated(ContactDetailsUpdated {
                changes: ContactChanges {
                    title: Some(Change {
                        old: "Analyst".into(),
                        new: "CTO".into(),
                    }),
                    ..ContactChanges::default()
                },
                occurred_at: now(),
            })]);
        assert_eq!(state.title, "CTO");
    }

    #[test]
    fn an_update_that_changes_nothing_appends_nothing() {
        let patch = ContactDetailsPatch {
            title: Some("Analyst".into()),
            ..ContactDetailsPatch::default()
        };
        given::<Contact>([created()])
            .when(ContactCommand::UpdateDetails(patch))
            .then(vec![]);
    }

    #[test]
    fn changing_emails_moves_the_reservation() {
        let patch = ContactDetailsPatch {
            emails: Some(vec![Email {
                address: "ada@new.example".into(),
                primary: true,
            }]),
            ..ContactDetailsPatch::default()
        };
        let outcome = given::<Contact>([created()]).when(ContactCommand::UpdateDetails(patch));
        assert!(outcome.result.is_ok());
        assert_eq!(
            email_keys(&outcome.state),
            BTreeSet::from([("email", "ada@example.com".to_owned())]),
            "state before the change"
        );
        let after = given::<Contact>([created()])
            .when(ContactCommand::UpdateDetails(ContactDetailsPatch {
                emails: Some(vec![Email {
                    address: "ada@new.example".into(),
                    primary: true,
                }]),
                ..ContactDetailsPatch::default()
            }))
            .then(vec![ContactEvent::DetailsUpdated(ContactDetailsUpdated {
                changes: ContactChanges {
                    emails: Some(Change {
                        old: vec![Email {
                            address: "Ada@Example.com".into(),
                            primary: true,
                        }],
                        new: vec![Email {
                            address: "ada@new.example".into(),
                            primary: true,
                        }],
                    }),
                    ..ContactChanges::default()
                },
                occurred_at: now(),
            })]);
        assert_eq!(
            email_keys(&after),
            BTreeSet::from([("email", "ada@new.example".to_owned())])
        );
    }

    #[test]
    fn commands_on_a_missing_contact_are_not_found() {
        given::<Contact>([])
            .when(ContactCommand::UpdateDetails(ContactDetailsPatch::default()))
            .then_error(DomainError::NotFound);
        given::<Contact>([])
            .when(ContactCommand::Archive(reason()))
            .then_error(DomainError::NotFound);
        given::<Contact>([])
            .when(ContactCommand::Restore(reason()))
            .then_error(DomainError::NotFound);
    }

    #[test]
    fn consent_is_recorded_per_purpose_and_repeats_are_no_ops() {
        let command = || ContactCommand::ChangeConsent {
            purpose: "marketing_email".into(),
            granted: true,
            source: "web_form".into(),
            basis: "consent".into(),
        };
        let state =
            given::<Contact>([created()])
                .when(command())
                .then(vec![ContactEvent::ConsentChanged(ContactConsentChanged {
                    purpose: "marketing_email".into(),
                    granted: true,
                    source: "web_form".into(),
                    basis: "consent".into(),
                    occurred_at: now(),
                })]);
        assert!(state.consent["marketing_email"].granted);
        let events: Vec<ContactEvent> = vec![
            created(),
            ContactEvent::ConsentChanged(ContactConsentChanged {
                purpose: "marketing_email".into(),
                granted: true,
                source: "web_form".into(),
                basis: "consent".into(),
                occurred_at: now(),
            }),
        ];
        given::<Contact>(events).when(command()).then(vec![]);
    }

    #[test]
    fn consent_refuses_unknown_purposes_and_bases() {
        given::<Contact>([created()])
            .when(ContactCommand::ChangeConsent {
                purpose: "spam".into(),
                granted: true,
                source: String::new(),
                basis: "whim".into(),
            })
            .then_invalid(&["purpose", "source", "basis"]);
    }

    #[test]
    fn archived_contacts_refuse_all_but_restore() {
        given::<Contact>([created()])
            .when(ContactCommand::Archive(reason()))
            .then(vec![ContactEvent::Archived(LifecycleChanged {
                reason: reason(),
                occurred_at: now(),
            })]);
        given::<Contact>([created(), archived()])
            .when(ContactCommand::UpdateDetails(ContactDetailsPatch::default()))
            .then_error(DomainError::RecordArchived);
        given::<Contact>([created(), archived()])
            .when(ContactCommand::Archive(reason()))
            .then_error(DomainError::RecordArchived);
        let state = given::<Contact>([created(), archived()])
            .when(ContactCommand::Restore(reason()))
            .then(vec![ContactEvent::Restored(LifecycleChanged {
                reason: reason(),
                occurred_at: now(),
            })]);
        assert_eq!(state.lifecycle, Lifecycle::Active);
        given::<Contact>([created()])
            .when(ContactCommand::Restore(reason()))
            .then_error(DomainError::InvalidTransition {
                from: "active",
                to: "active",
            });
    }

    #[test]
    fn nps_scores_range_from_0_to_10_and_unlinking_is_idempotent() {
        given::<Contact>([created()])
            .when(ContactCommand::RecordNpsResponse {
                score: 11,
                comment: String::new(),
            })
            .then_invalid(&["score"]);
        let state = given::<Contact>([created()])
            .when(ContactCommand::RecordNpsResponse {
                score: 9,
                comment: "great".into(),
            })
            .then(vec![ContactEvent::NpsRecorded(NpsResponseRecorded {
                score: 9,
                comment: "great".into(),
                occurred_at: now(),
            })]);
        assert_eq!(state.nps, Some(9));
        let linked = ContactEvent::LinkedToAccount(ContactLinkedToAccount {
            account_id: Uuid::from_u128(5),
            role: String::new(),
            primary: true,
            occurred_at: now(),
        });
        let state = given::<Contact>([created(), linked.clone()])
            .when(ContactCommand::UnlinkFromAccount {
                account_id: Uuid::from_u128(5),
            })
            .then(vec![ContactEvent::UnlinkedFromAccount(
                ContactUnlinkedFromAccount {
                    account_id: Uuid::from_u128(5),
                    occurred_at: now(),
                },
            )]);
        assert!(state.accounts.is_empty());
        given::<Contact>([created()])
            .when(ContactCommand::UnlinkFromAccount {
                account_id: Uuid::from_u128(5),
            })
            .then(vec![]);
    }

    #[test]
    fn reasons_need_a_code() {
        given::<Contact>([created()])
            .when(ContactCommand::Archive(Reason {
                code: "Left Company".into(),
                text: String::new(),
            }))
            .then_invalid(&["reason.code"]);
    }

    #[test]
    fn payloads_round_trip_through_their_stored_form() {
        for event in [created(), archived()] {
            let json = serde_json::to_string(&event).unwrap();
            let mut de = serde_json::Deserializer::from_str(&json);
            let back = ContactEvent::decode(event.event_type(), event.schema_version(), &mut de)
                .unwrap()
                .unwrap();
            assert_eq!(back, event);
        }
        let mut de = serde_json::Deserializer::from_str("{}");
        assert_eq!(
            ContactEvent::decode("SomethingElse", 1, &mut de).unwrap(),
            None
        );
    }

    #[test]
    fn contact_created_v1_is_upcast_to_v2_on_read() {
        let v1 = r#"{"full_name": " Ada King Lovelace ", "emails": [{"address": "ada@example.com", "primary": true}],
                     "occurred_at": "2026-11-28T10:00:00Z"}"#;
        let mut de = serde_json::Deserializer::from_str(v1);
        let Some(ContactEvent::Created(created)) =
            ContactEvent::decode("ContactCreated", 1, &mut de).unwrap()
        else {
            panic!("not a ContactCreated");
        };
        assert_eq!(
            created.name,
            PersonName {
                given: "Ada King".into(),
                family: "Lovelace".into()
            }
        );
        assert!(created.phones.is_empty());
        assert_eq!(created.occurred_at, now());
        let mono = ContactCreatedV1 {
            full_name: "Prince".into(),
            emails: vec![],
            phones: vec![],
            title: String::new(),
            preferences: Preferences::default(),
            occurred_at: now(),
        };
        assert_eq!(
            mono.upcast().name,
            PersonName {
                given: "Prince".into(),
                family: String::new()
            }
        );
        // Today's writes are version 2.
        assert_eq!(created_event_version(), 2);
    }

    fn created_event_version() -> u32 {
        created().schema_version()
    }

    #[test]
    fn merging_takes_the_union_of_emails_the_chosen_fields_and_the_latest_consent() {
        let survivor = Contact::default().replay([created()].iter());
        let loser_created = ContactEvent::Created(ContactCreated {
            name: PersonName {
                given: "Ｌｉ".into(),
                family: "Wei".into(),
            },
            emails: vec![
                Email {
                    address: "li@example.cn".into(),
                    primary: true,
                },
                Email {
                    address: "ada@example.com".into(),
                    primary: false,
                },
            ],
            phones: vec![Phone {
                number: "+8613800138000".into(),
                kind: "mobile".into(),
            }],
            title: "Buyer".into(),
            preferences: Preferences::default(),
            occurred_at: now(),
        });
        let later: Timestamp = "2026-11-28T11:00:00Z".parse().unwrap();
        let consent = ContactEvent::ConsentChanged(ContactConsentChanged {
            purpose: "profiling".into(),
            granted: true,
            source: "web".into(),
            basis: "consent".into(),
            occurred_at: later,
        });
        let loser_id = Uuid::from_u128(2);
        let loser = Contact::default().replay([loser_created, consent].iter());
        let choices = MergeChoices {
            title_from: Some(loser_id),
            ..MergeChoices::default()
        };
        let outcome = merge(
            Uuid::from_u128(1),
            &survivor,
            &[(loser_id, loser.clone())],
            &choices,
            crate::Context::at(now()),
        )
        .unwrap();
        let merged = survivor.clone().replay(outcome.survivor.iter());
        let addresses: Vec<&str> = merged.emails.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(
            addresses,
            ["Ada@Example.com", "li@example.cn"],
            "case-insensitive duplicates collapse"
        );
        assert_eq!(merged.emails.iter().filter(|e| e.primary).count(), 1);
        assert_eq!(merged.title, "Buyer");
        assert_eq!(merged.name.given, "Ada", "the survivor's name by default");
        assert!(merged.consent["profiling"].granted);
        let gone = loser.clone().replay(outcome.losers[0].1.iter());
        assert_eq!(gone.merged_into, Some(Uuid::from_u128(1)));
        assert!(
            gone.unique_keys().is_empty(),
            "the loser's keys move to the survivor"
        );
        assert_eq!(
            gone.decide(ContactCommand::Archive(reason()), crate::Context::at(now())),
            Err(DomainError::RecordMerged {
                survivor: Uuid::from_u128(1)
            })
        );
        // The survivor cannot absorb itself, merged or archived records.
        assert!(matches!(
            merge(
                Uuid::from_u128(1),
                &survivor,
                &[(Uuid::from_u128(1), survivor.clone())],
                &choices,
                crate::Context::at(now())
            ),
            Err(DomainError::Invalid(_))
        ));
        assert_eq!(
            merge(
                Uuid::from_u128(3),
                &survivor,
                &[(loser_id, gone)],
                &MergeChoices::default(),
                crate::Context::at(now())
            ),
            Err(DomainError::RecordMerged {
                survivor: Uuid::from_u128(1)
            })
        );
        let archived_loser = Contact::default().replay([created(), archived()].iter());
        assert_eq!(
            merge(
                Uuid::from_u128(1),
                &survivor,
                &[(loser_id, archived_loser)],
                &MergeChoices::default(),
                crate::Context::at(now())
            ),
            Err(DomainError::RecordArchived)
        );
        let stranger = MergeChoices {
            name_from: Some(Uuid::from_u128(99)),
            ..MergeChoices::default()
        };
        assert!(matches!(
            merge(
                Uuid::from_u128(1),
                &survivor,
                &[(loser_id, loser)],
                &stranger,
                crate::Context::at(now())
            ),
            Err(DomainError::Invalid(_))
        ));
    }

    fn arb_command() -> impl Strategy<Value = ContactCommand> {
        let title = "[A-Za-z ]{0,30}";
        prop_oneof![
            Just(ContactCommand::Create(ada())),
            title.prop_map(|t| ContactCommand::UpdateDetails(ContactDetailsPatch {
                title: Some(t),
                ..ContactDetailsPatch::default()
            })),
            "[a-z@.]{0,20}".prop_map(|a| ContactCommand::UpdateDetails(ContactDetailsPatch {
                emails: Some(vec![Email {
                    address: a,
                    primary: true
                }]),
                ..ContactDetailsPatch::default()
            })),
            (0usize..6, any::<bool>()).prop_map(|(p, g)| ContactCommand::ChangeConsent {
                purpose: CONSENT_PURPOSES.get(p).copied().unwrap_or("bogus").into(),
                granted: g,
                source: "web".into(),
                basis: "consent".into()
            }),
            Just(ContactCommand::Archive(Reason {
                code: "x".into(),
                text: String::new()
            })),
            Just(ContactCommand::Restore(Reason {
                code: "x".into(),
                text: String::new()
            })),
        ]
    }

    proptest! {
        /// Whatever commands arrive, deciding never panics, refused commands
        /// leave state alone, and replaying the accepted events rebuilds the
        /// state exactly; emails stay unique and one is primary.
        #[test]
        fn replay_rebuilds_state_and_invariants_hold(commands in proptest::collection::vec(arb_command(), 0..40)) {
            let mut state = Contact::default();
            let mut log = Vec::new();
            for command in commands {
                if let Ok(events) = state.decide(command, crate::Context::at(now())) {
                    state = state.replay(events.iter());
                    log.extend(events);
                }
            }
            prop_assert_eq!(Contact::default().replay(log.iter()), state.clone());
            if !state.emails.is_empty() {
                prop_assert_eq!(state.emails.iter().filter(|e| e.primary).count(), 1);
            }
            prop_assert_eq!(email_keys(&state).len(), state.emails.len());
        }
    }
}
