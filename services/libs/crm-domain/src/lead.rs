//! Lead: a prospect, the unit of attribution (DOMAIN.md §2.1).
//!
//! `New → Working ⇄ Nurturing → Qualified → Converted`; any open state may go
//! to `Disqualified` (with a reason) and back to `Working`. Converted is final.
//! Leads reserve no unique values: duplicates among leads are data quality's
//! business. Conversion is decided by [`crate::conversion`], across streams.
use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregate, Context, DomainEvent, MergeParties};
use crate::common::{Change, Reason, is_code, text_ok};
use crate::contact::{
    CONSENT_PURPOSES, Consent, Email, LEGAL_BASES, PersonName, Phone, validate_emails,
    validate_phones,
};
use crate::error::{DomainError, Violations};
use crate::records::{CommonCommand, CommonEvent, RecordMeta};

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeadStatus {
    #[default]
    New,
    Working,
    Nurturing,
    Qualified,
    Disqualified,
    Converted,
}

impl LeadStatus {
    pub fn name(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Working => "working",
            Self::Nurturing => "nurturing",
            Self::Qualified => "qualified",
            Self::Disqualified => "disqualified",
            Self::Converted => "converted",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::New,
            Self::Working,
            Self::Nurturing,
            Self::Qualified,
            Self::Disqualified,
            Self::Converted,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }

    fn is_open(self) -> bool {
        matches!(
            self,
            Self::New | Self::Working | Self::Nurturing | Self::Qualified
        )
    }

    /// The moves ChangeLeadStatus allows (conversion has its own command).
    pub fn may_become(self, to: Self) -> bool {
        use LeadStatus::*;
        match (self, to) {
            (New, Working) | (Working, Nurturing) | (Nurturing, Working) => true,
            (Working | Nurturing, Qualified) => true,
            (from, Disqualified) => from.is_open(),
            (Disqualified, Working) => true,
            _ => false,
        }
    }
}

/// Where a lead came from.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeadSource {
    /// e.g. `web`, `event`, `referral`, `import`.
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<uuid::Uuid>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub utm_source: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub utm_medium: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub utm_campaign: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeadDetails {
    pub name: PersonName,
    pub company: String,
    pub emails: Vec<Email>,
    pub phones: Vec<Phone>,
    pub source: LeadSource,
    /// Consent decisions captured with the lead (e.g. a web form's box).
    pub consent: Vec<LeadConsent>,
}

/// `current` consent with `decisions` applied (each decided at `at`; an
/// unchanged decision keeps its time), every bad field in `v`.
fn decide_consent(
    mut current: BTreeMap<String, Consent>,
    decisions: Vec<LeadConsent>,
    at: Timestamp,
    v: &mut Violations,
) -> BTreeMap<String, Consent> {
    let mut seen = std::collections::BTreeSet::new();
    for (i, decision) in decisions.into_iter().enumerate() {
        v.check(
            CONSENT_PURPOSES.contains(&decision.purpose.as_str()),
            format!("consent[{i}].purpose"),
            "must be a consent purpose",
        );
        v.check(
            text_ok(&decision.source, 100, false),
            format!("consent[{i}].source"),
            "must be 1 to 100 characters",
        );
        v.check(
            LEGAL_BASES.contains(&decision.basis.as_str()),
            format!("consent[{i}].basis"),
            "must be a legal basis",
        );
        v.check(
            seen.insert(decision.purpose.clone()),
            format!("consent[{i}].purpose"),
            "appears twice",
        );
        let same = current.get(&decision.purpose).is_some_and(|c| {
            c.granted == decision.granted
                && c.source == decision.source
                && c.basis == decision.basis
        });
        if !same {
            current.insert(
                decision.purpose,
                Consent {
                    granted: decision.granted,
                    source: decision.source,
                    basis: decision.basis,
                    decided_at: at,
                },
            );
        }
    }
    current
}

/// One consent decision given with a lead, as a contact's ChangeConsent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeadConsent {
    pub purpose: String,
    pub granted: bool,
    pub source: String,
    pub basis: String,
}

/// The fields an update replaces; `None` keeps the current value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeadDetailsPatch {
    pub name: Option<PersonName>,
    pub company: Option<String>,
    pub emails: Option<Vec<Email>>,
    pub phones: Option<Vec<Phone>>,
    /// Consent decisions to record, per purpose; other purposes stay.
    pub consent: Vec<LeadConsent>,
}

/// Only the fields that really changed.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeadChanges {
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Change<PersonName>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company: Option<Change<String>>,
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emails: Option<Change<Vec<Email>>>,
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phones: Option<Change<Vec<Phone>>>,
    /// Consent per purpose (a merge keeps each purpose's latest decision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent: Option<Change<BTreeMap<String, Consent>>>,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeadDetailsUpdated {
    pub changes: LeadChanges,
    pub occurred_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeadCommand {
    Capture(LeadDetails),
    ChangeStatus {
        to: LeadStatus,
        reason: Option<Reason>,
    },
    /// Owner, tags and shares (see [`crate::records`]).
    Common(CommonCommand),
    /// Replaces the given fields; refused once converted.
    UpdateDetails(LeadDetailsPatch),
    /// Forget the person (admins only, by the handler), as for contacts:
    /// the lead's key is destroyed afterwards.
    ErasePersonalData {
        request: String,
    },
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeadCaptured {
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    pub name: PersonName,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub company: String,
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    #[serde(default)]
    pub emails: Vec<Email>,
    #[cfg_attr(feature = "schemas", schemars(extend("x-personal" = true)))]
    #[serde(default)]
    pub phones: Vec<Phone>,
    pub source: LeadSource,
    /// Consent per purpose given with the lead, decided at `occurred_at`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consent: BTreeMap<String, Consent>,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeadStatusChanged {
    pub from: LeadStatus,
    pub to: LeadStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeadConverted {
    pub account_id: uuid::Uuid,
    /// True when the conversion created the account, false for an existing one.
    pub account_created: bool,
    pub contact_id: uuid::Uuid,
    /// The deal opened in the same conversion, if one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opportunity_id: Option<uuid::Uuid>,
    pub occurred_at: Timestamp,
}

/// The survivor of a lead merge.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeadsMerged {
    pub losers: Vec<uuid::Uuid>,
    pub changes: LeadChanges,
    pub occurred_at: Timestamp,
}

/// A loser of a lead merge.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeadMergedInto {
    pub survivor: uuid::Uuid,
    pub occurred_at: Timestamp,
}

/// Which lead the name and company come from; `None`: the survivor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeadMergeChoices {
    pub name_from: Option<uuid::Uuid>,
    pub company_from: Option<uuid::Uuid>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum LeadEvent {
    Captured(LeadCaptured),
    StatusChanged(LeadStatusChanged),
    Converted(LeadConverted),
    Common(CommonEvent),
    DetailsUpdated(LeadDetailsUpdated),
    Merged(LeadsMerged),
    MergedInto(LeadMergedInto),
    PersonalDataErased(crate::contact::PersonalDataErased),
}

impl DomainEvent for LeadEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Common(event) => event.event_type(),
            Self::Captured(_) => "LeadCaptured",
            Self::DetailsUpdated(_) => "LeadDetailsUpdated",
            Self::StatusChanged(_) => "LeadStatusChanged",
            Self::Converted(_) => "LeadConverted",
            Self::Merged(_) => "RecordsMerged",
            Self::MergedInto(_) => "RecordMergedInto",
            Self::PersonalDataErased(_) => "PersonalDataErased",
        }
    }

    fn occurred_at(&self) -> jiff::Timestamp {
        match self {
            Self::Common(event) => event.occurred_at(),
            Self::Captured(e) => e.occurred_at,
            Self::DetailsUpdated(e) => e.occurred_at,
            Self::StatusChanged(e) => e.occurred_at,
            Self::Converted(e) => e.occurred_at,
            Self::Merged(e) => e.occurred_at,
            Self::MergedInto(e) => e.occurred_at,
            Self::PersonalDataErased(e) => e.occurred_at,
        }
    }

    fn decode<'de, D: serde::Deserializer<'de>>(
        event_type: &str,
        _schema_version: u32,
        payload: D,
    ) -> Result<Option<Self>, D::Error> {
        Ok(Some(match event_type {
            "PersonalDataErased" => Self::PersonalDataErased(Deserialize::deserialize(payload)?),
            "LeadCaptured" => Self::Captured(Deserialize::deserialize(payload)?),
            "LeadDetailsUpdated" => Self::DetailsUpdated(Deserialize::deserialize(payload)?),
            "LeadStatusChanged" => Self::StatusChanged(Deserialize::deserialize(payload)?),
            "LeadConverted" => Self::Converted(Deserialize::deserialize(payload)?),
            "RecordsMerged" => Self::Merged(Deserialize::deserialize(payload)?),
            "RecordMergedInto" => Self::MergedInto(Deserialize::deserialize(payload)?),
            _ => return Ok(CommonEvent::decode(event_type, payload)?.map(Self::Common)),
        }))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lead {
    pub exists: bool,
    pub status: LeadStatus,
    pub name: PersonName,
    pub company: String,
    pub emails: Vec<Email>,
    pub phones: Vec<Phone>,
    pub source: LeadSource,
    /// Consent per purpose (DOMAIN.md §2.3's purposes), as for a contact.
    #[serde(default)]
    pub consent: BTreeMap<String, Consent>,
    pub converted_to: Option<LeadConverted>,
    #[serde(default)]
    pub meta: RecordMeta,
    #[serde(default)]
    pub merged_into: Option<uuid::Uuid>,
    /// Personal data erased: refuses every command.
    #[serde(default)]
    pub erased: bool,
}

impl Lead {
    /// Whether other records may take it in (a campaign's member): it
    /// exists, is active, and was neither merged away nor erased.
    pub fn usable(&self) -> bool {
        self.exists
            && self.meta.lifecycle == crate::common::Lifecycle::Active
            && self.merged_into.is_none()
            && !self.erased
    }
}

impl Aggregate for Lead {
    type Command = LeadCommand;
    type Event = LeadEvent;
    const STREAM_TYPE: &'static str = "lead";

    fn exists(&self) -> bool {
        self.exists
    }

    fn holds_personal_data(&self) -> bool {
        true
    }

    fn creates(command: &LeadCommand) -> bool {
        matches!(command, LeadCommand::Capture(_))
    }

    fn decide(
        &self,
        command: LeadCommand,
        context: Context,
    ) -> Result<Vec<LeadEvent>, DomainError> {
        let occurred_at = context.occurred_at()?;
        if let LeadCommand::ErasePersonalData { request } = command {
            // Allowed whatever the lead's state; erasing twice changes nothing.
            if !self.exists {
                return Err(DomainError::NotFound);
            }
            if self.erased {
                return Ok(vec![]);
            }
            if !crate::common::text_ok(&request, 200, false) {
                return Err(DomainError::invalid(
                    "request",
                    "must be 1 to 200 characters",
                ));
            }
            return Ok(vec![LeadEvent::PersonalDataErased(
                crate::contact::PersonalDataErased {
                    request: request.trim().to_owned(),
                    occurred_at,
                },
            )]);
        }
        if self.erased {
            return Err(DomainError::RecordErased);
        }
        if let Some(survivor) = self.merged_into {
            return Err(DomainError::RecordMerged { survivor });
        }
        self.meta.refuse_if_archived(matches!(
            command,
            LeadCommand::Common(CommonCommand::Restore(_))
        ))?;
        match command {
            LeadCommand::ErasePersonalData { .. } => Ok(vec![]), // decided above
            LeadCommand::Common(command) => {
                if !self.exists {
                    return Err(DomainError::NotFound);
                }
                Ok(self
                    .meta
                    .decide(command, occurred_at)?
                    .into_iter()
                    .map(LeadEvent::Common)
                    .collect())
            }
            LeadCommand::Capture(details) => {
                if self.exists {
                    return Err(DomainError::AlreadyExists {
                        key: "lead_id",
                        holder: None,
                    });
                }
                let mut v = Violations::default();
                v.check(
                    text_ok(&details.name.given, 200, true),
                    "name.given",
                    "must be at most 200 characters",
                );
                v.check(
                    text_ok(&details.name.family, 200, true),
                    "name.family",
                    "must be at most 200 characters",
                );
                v.check(
                    text_ok(&details.company, 200, true),
                    "company",
                    "must be at most 200 characters",
                );
                // Interactive capture rejects bad formats (imports keep them
                // raw); the lead stores what was given, as given.
                validate_emails(&details.emails, "emails", &mut v);
                validate_phones(&details.phones, "phones", &mut v);
                v.check(
                    !details.emails.is_empty()
                        || !details.phones.is_empty()
                        || !details.company.trim().is_empty(),
                    "emails",
                    "a lead needs an email, a phone or a company",
                );
                v.check(
                    is_code(&details.source.channel, 64),
                    "source.channel",
                    "must be a code of [a-z0-9_]",
                );
                // As a campaign's own `utm_campaign`: at most 200 characters,
                // no control characters.
                for (text, field) in [
                    (&details.source.utm_source, "source.utm_source"),
                    (&details.source.utm_medium, "source.utm_medium"),
                    (&details.source.utm_campaign, "source.utm_campaign"),
                ] {
                    v.check(
                        crate::common::text_ok(text, 200, true),
                        field,
                        "must be at most 200 characters",
                    );
                }
                let consent = decide_consent(BTreeMap::new(), details.consent, occurred_at, &mut v);
                v.into_result()?;
                Ok(vec![LeadEvent::Captured(LeadCaptured {
                    name: details.name,
                    company: details.company.trim().to_owned(),
                    emails: details.emails,
                    phones: details.phones,
                    source: details.source,
                    consent,
                    occurred_at,
                })])
            }
            LeadCommand::UpdateDetails(patch) => {
                if !self.exists {
                    return Err(DomainError::NotFound);
                }
                if self.status == LeadStatus::Converted {
                    return Err(DomainError::InvalidTransition {
                        from: "converted",
                        to: "updated",
                    });
                }
                let mut v = Violations::default();
                if let Some(name) = &patch.name {
                    v.check(
                        text_ok(&name.given, 200, true),
                        "name.given",
                        "must be at most 200 characters",
                    );
                    v.check(
                        text_ok(&name.family, 200, true),
                        "name.family",
                        "must be at most 200 characters",
                    );
                }
                if let Some(company) = &patch.company {
                    v.check(
                        text_ok(company, 200, true),
                        "company",
                        "must be at most 200 characters",
                    );
                }
                if let Some(emails) = &patch.emails {
                    validate_emails(emails, "emails", &mut v);
                }
                if let Some(phones) = &patch.phones {
                    validate_phones(phones, "phones", &mut v);
                }
                let consent =
                    decide_consent(self.consent.clone(), patch.consent, occurred_at, &mut v);
                v.into_result()?;
                let company = patch.company.map(|c| c.trim().to_owned());
                let changes = LeadChanges {
                    name: crate::common::diff(&self.name, patch.name.as_ref()),
                    company: crate::common::diff(&self.company, company.as_ref()),
                    emails: crate::common::diff(&self.emails, patch.emails.as_ref()),
                    phones: crate::common::diff(&self.phones, patch.phones.as_ref()),
                    consent: crate::common::diff(&self.consent, Some(&consent)),
                };
                if changes == LeadChanges::default() {
                    return Ok(vec![]);
                }
                Ok(vec![LeadEvent::DetailsUpdated(LeadDetailsUpdated {
                    changes,
                    occurred_at,
                })])
            }
            LeadCommand::ChangeStatus { to, reason } => {
                if !self.exists {
                    return Err(DomainError::NotFound);
                }
                if self.status == to {
                    return Ok(vec![]);
                }
                if !self.status.may_become(to) {
                    return Err(DomainError::InvalidTransition {
                        from: self.status.name(),
                        to: to.name(),
                    });
                }
                let mut v = Violations::default();
                match &reason {
                    Some(reason) => reason.validate("reason", &mut v),
                    None => v.check(
                        to != LeadStatus::Disqualified,
                        "reason",
                        "is required to disqualify",
                    ),
                }
                v.into_result()?;
                Ok(vec![LeadEvent::StatusChanged(LeadStatusChanged {
                    from: self.status,
                    to,
                    reason,
                    occurred_at,
                })])
            }
        }
    }

    fn evolve(mut self, event: &LeadEvent) -> Self {
        match event {
            LeadEvent::PersonalDataErased(_) => {
                self.erased = true;
                self.name = PersonName::default();
                self.emails.clear();
                self.phones.clear();
            }
            LeadEvent::Merged(merged) => {
                self = self.evolve(&LeadEvent::DetailsUpdated(LeadDetailsUpdated {
                    changes: merged.changes.clone(),
                    occurred_at: merged.occurred_at,
                }));
            }
            LeadEvent::MergedInto(merged) => self.merged_into = Some(merged.survivor),
            LeadEvent::Common(event) => self.meta.evolve(event),
            LeadEvent::Captured(captured) => {
                self.exists = true;
                self.name = captured.name.clone();
                self.company = captured.company.clone();
                self.emails = captured.emails.clone();
                self.phones = captured.phones.clone();
                self.source = captured.source.clone();
                self.consent = captured.consent.clone();
            }
            LeadEvent::DetailsUpdated(updated) => {
                let c = &updated.changes;
                if let Some(change) = &c.name {
                    self.name = change.new.clone();
                }
                if let Some(change) = &c.company {
                    self.company = change.new.clone();
                }
                if let Some(change) = &c.emails {
                    self.emails = change.new.clone();
                }
                if let Some(change) = &c.phones {
                    self.phones = change.new.clone();
                }
                if let Some(change) = &c.consent {
                    self.consent = change.new.clone();
                }
            }
            LeadEvent::StatusChanged(changed) => self.status = changed.to,
            LeadEvent::Converted(converted) => {
                self.status = LeadStatus::Converted;
                self.converted_to = Some(converted.clone());
            }
        }
        self
    }
}

impl crate::aggregate::Mergeable for Lead {
    type Choices = LeadMergeChoices;

    fn merge(
        survivor_id: uuid::Uuid,
        survivor: &Self,
        losers: &[(uuid::Uuid, Self)],
        choices: &LeadMergeChoices,
        context: Context,
    ) -> Result<(Vec<LeadEvent>, Vec<(uuid::Uuid, Vec<LeadEvent>)>), DomainError> {
        let occurred_at = context.occurred_at()?;
        let usable = |lead: &Lead| -> Result<(), DomainError> {
            if !lead.exists {
                return Err(DomainError::NotFound);
            }
            // DOMAIN.md §2.11: erased parties take no part in a merge.
            if lead.erased {
                return Err(DomainError::RecordErased);
            }
            if let Some(survivor) = lead.merged_into {
                return Err(DomainError::RecordMerged { survivor });
            }
            if lead.status == LeadStatus::Converted {
                return Err(DomainError::InvalidTransition {
                    from: "converted",
                    to: "merged",
                });
            }
            lead.meta.refuse_if_archived(false)
        };
        let parties = MergeParties::check(survivor_id, survivor, losers, usable)?;
        let pick = |field, from| parties.pick(field, from);
        let name = pick("name_from", choices.name_from)?.name.clone();
        let company = pick("company_from", choices.company_from)?.company.clone();
        let mut emails = survivor.emails.clone();
        let mut phones = survivor.phones.clone();
        for (_, loser) in losers {
            for email in &loser.emails {
                let key = crate::common::normalize_email(&email.address);
                if !emails
                    .iter()
                    .any(|e| crate::common::normalize_email(&e.address) == key)
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
        }
        // As a contact's merge: the lead must still be able to become a
        // contact, which holds at most 10 of each.
        if emails.len() > crate::contact::MAX_EMAILS || phones.len() > crate::contact::MAX_PHONES {
            return Err(DomainError::invalid(
                "loser_ids",
                "the merged lead would have more than 10 emails or phones",
            ));
        }
        // Consent by the latest decision per purpose (DOMAIN.md §2.11).
        let mut consent = survivor.consent.clone();
        for (_, loser) in losers {
            for (purpose, decision) in &loser.consent {
                if consent
                    .get(purpose)
                    .is_none_or(|kept| kept.decided_at < decision.decided_at)
                {
                    consent.insert(purpose.clone(), decision.clone());
                }
            }
        }
        let changes = LeadChanges {
            name: crate::common::diff(&survivor.name, Some(&name)),
            company: crate::common::diff(&survivor.company, Some(&company)),
            emails: crate::common::diff(&survivor.emails, Some(&emails)),
            phones: crate::common::diff(&survivor.phones, Some(&phones)),
            consent: crate::common::diff(&survivor.consent, Some(&consent)),
        };
        Ok((
            vec![LeadEvent::Merged(LeadsMerged {
                losers: losers.iter().map(|(id, _)| *id).collect(),
                changes,
                occurred_at,
            })],
            losers
                .iter()
                .map(|(id, _)| {
                    (
                        *id,
                        vec![LeadEvent::MergedInto(LeadMergedInto {
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

    fn captured() -> LeadEvent {
        LeadEvent::Captured(LeadCaptured {
            name: PersonName {
                given: "Li".into(),
                family: "Wei".into(),
            },
            company: "Wei Trading".into(),
            emails: vec![],
            phones: vec![],
            source: LeadSource {
                channel: "web".into(),
                ..LeadSource::default()
            },
            consent: Default::default(),
            occurred_at: now(),
        })
    }

    fn moved(from: LeadStatus, to: LeadStatus) -> LeadEvent {
        LeadEvent::StatusChanged(LeadStatusChanged {
            from,
            to,
            reason: None,
            occurred_at: now(),
        })
    }

    #[test]
    fn an_erased_lead_forgets_the_person_and_refuses_the_rest() {
        let erase = |request: &str| LeadCommand::ErasePersonalData {
            request: request.into(),
        };
        let state = given::<Lead>([captured()]).when(erase("DSR-7")).then_ok();
        assert!(state.erased && state.emails.is_empty() && state.phones.is_empty());
        assert_eq!(state.name, PersonName::default());
        let erased = LeadEvent::PersonalDataErased(crate::contact::PersonalDataErased {
            request: "DSR-7".into(),
            occurred_at: now(),
        });
        given::<Lead>([captured(), erased.clone()])
            .when(erase("DSR-8"))
            .then(vec![]);
        given::<Lead>([captured(), erased])
            .when(LeadCommand::ChangeStatus {
                to: LeadStatus::Working,
                reason: None,
            })
            .then_error(DomainError::RecordErased);
        given::<Lead>([])
            .when(erase("DSR-9"))
            .then_error(DomainError::NotFound);
    }

    #[test]
    fn capture_needs_an_email_a_phone_or_a_company_and_valid_formats() {
        let details = LeadDetails {
            name: PersonName {
                given: "Li".into(),
                family: "Wei".into(),
            },
            company: "Wei Trading".into(),
            source: LeadSource {
                channel: "web".into(),
                ..LeadSource::default()
            },
            ..LeadDetails::default()
        };
        given::<Lead>([])
            .when(LeadCommand::Capture(details.clone()))
            .then(vec![captured()]);
        let mut empty = details.clone();
        empty.company = String::new();
        given::<Lead>([])
            .when(LeadCommand::Capture(empty))
            .then_invalid(&["emails"]);
        let mut bad = details;
        bad.emails = vec![Email {
            address: "nope".into(),
            primary: true,
        }];
        bad.source.channel = "Web Site".into();
        bad.source.utm_campaign = "x".repeat(201);
        bad.source.utm_medium = "line\nbreak".into();
        given::<Lead>([])
            .when(LeadCommand::Capture(bad))
            .then_invalid(&[
                "emails[0].address",
                "source.channel",
                "source.utm_medium",
                "source.utm_campaign",
            ]);
    }

    fn decision(purpose: &str, granted: bool) -> LeadConsent {
        LeadConsent {
            purpose: purpose.into(),
            granted,
            source: "web_form".into(),
            basis: "consent".into(),
        }
    }

    /// Consent captured with a lead, changed later per purpose, and merged
    /// by the latest decision (DOMAIN.md §2.11).
    #[test]
    fn a_lead_keeps_consent_per_purpose_and_a_merge_keeps_the_latest() {
        let details = |consent: Vec<LeadConsent>| LeadDetails {
            company: "Wei Trading".into(),
            source: LeadSource {
                channel: "web".into(),
                ..LeadSource::default()
            },
            consent,
            ..LeadDetails::default()
        };
        let state = given::<Lead>([])
            .when(LeadCommand::Capture(details(vec![decision(
                "marketing_email",
                true,
            )])))
            .then_ok();
        assert!(state.consent["marketing_email"].granted);
        let mut bad = decision("marketing_fax", true);
        bad.source = String::new();
        bad.basis = "because".into();
        given::<Lead>([])
            .when(LeadCommand::Capture(details(vec![
                bad,
                decision("profiling", true),
                decision("profiling", false),
            ])))
            .then_invalid(&[
                "consent[0].purpose",
                "consent[0].source",
                "consent[0].basis",
                "consent[2].purpose",
            ]);
        // A later decision on one purpose; the same decision again is none.
        let later = crate::Context::at(now() + jiff::SignedDuration::from_hours(1));
        let update = |consent| {
            LeadCommand::UpdateDetails(LeadDetailsPatch {
                consent,
                ..LeadDetailsPatch::default()
            })
        };
        let events = state
            .decide(update(vec![decision("marketing_sms", true)]), later)
            .unwrap();
        let updated = state.clone().replay(events.iter());
        assert_eq!(updated.consent.len(), 2);
        assert_eq!(
            updated.decide(update(vec![decision("marketing_sms", true)]), later),
            Ok(vec![])
        );
        // The survivor withdrew email consent after the loser gave it: the
        // withdrawal stands; the loser's SMS consent, newer, is taken.
        let survivor = given::<Lead>([])
            .when(LeadCommand::Capture(details(vec![decision(
                "marketing_email",
                false,
            )])))
            .then_ok();
        let mut loser = updated;
        loser.consent.get_mut("marketing_email").unwrap().decided_at =
            now() - jiff::SignedDuration::from_hours(1);
        let (events, _) = <Lead as crate::aggregate::Mergeable>::merge(
            uuid::Uuid::from_u128(1),
            &survivor,
            &[(uuid::Uuid::from_u128(2), loser)],
            &LeadMergeChoices::default(),
            crate::Context::at(now() + jiff::SignedDuration::from_hours(2)),
        )
        .unwrap();
        let merged = survivor.replay(events.iter());
        assert!(!merged.consent["marketing_email"].granted);
        assert!(merged.consent["marketing_sms"].granted);
    }

    #[test]
    fn duplicate_leads_merge_and_converted_ones_do_not() {
        use crate::aggregate::Mergeable;
        let with_email = LeadEvent::Captured(LeadCaptured {
            name: PersonName {
                given: "Li".into(),
                family: "Wei".into(),
            },
            company: String::new(),
            emails: vec![Email {
                address: "li@example.cn".into(),
                primary: true,
            }],
            phones: vec![],
            source: LeadSource {
                channel: "event".into(),
                ..LeadSource::default()
            },
            consent: Default::default(),
            occurred_at: now(),
        });
        let survivor = Lead::default().replay([captured()].iter());
        let loser = Lead::default().replay([with_email].iter());
        let choices = LeadMergeChoices::default();
        let (events, losers) = Lead::merge(
            uuid::Uuid::from_u128(1),
            &survivor,
            &[(uuid::Uuid::from_u128(2), loser.clone())],
            &choices,
            crate::Context::at(now()),
        )
        .unwrap();
        let merged = survivor.clone().replay(events.iter());
        assert_eq!(merged.emails.len(), 1);
        assert_eq!(merged.company, "Wei Trading");
        let gone = loser.clone().replay(losers[0].1.iter());
        assert_eq!(
            gone.decide(
                LeadCommand::ChangeStatus {
                    to: LeadStatus::Working,
                    reason: None
                },
                crate::Context::at(now())
            ),
            Err(DomainError::RecordMerged {
                survivor: uuid::Uuid::from_u128(1)
            })
        );
        let converted = Lead::default().replay(
            [
                captured(),
                LeadEvent::Converted(LeadConverted {
                    account_id: uuid::Uuid::nil(),
                    account_created: true,
                    contact_id: uuid::Uuid::nil(),
                    opportunity_id: None,
                    occurred_at: now(),
                }),
            ]
            .iter(),
        );
        assert!(matches!(
            Lead::merge(
                uuid::Uuid::from_u128(1),
                &survivor,
                &[(uuid::Uuid::from_u128(3), converted)],
                &choices,
                crate::Context::at(now())
            ),
            Err(DomainError::InvalidTransition { .. })
        ));
        // An erased loser takes no part; nor does a merge past 10 emails.
        let mut erased = loser.clone();
        erased.erased = true;
        assert_eq!(
            Lead::merge(
                uuid::Uuid::from_u128(1),
                &survivor,
                &[(uuid::Uuid::from_u128(4), erased)],
                &choices,
                crate::Context::at(now())
            )
            .unwrap_err(),
            DomainError::RecordErased
        );
        let many = |from: usize| {
            let mut lead = loser.clone();
            lead.emails = (from..from + 6)
                .map(|i| Email {
                    address: format!("li{i}@example.cn"),
                    primary: i == from,
                })
                .collect();
            lead
        };
        let refused = Lead::merge(
            uuid::Uuid::from_u128(1),
            &many(0),
            &[(uuid::Uuid::from_u128(5), many(6))],
            &choices,
            crate::Context::at(now()),
        )
        .unwrap_err();
        assert!(
            matches!(&refused, DomainError::Invalid(v) if v[0].field == "loser_ids"),
            "{refused:?}"
        );
    }

    #[test]
    fn archived_leads_refuse_all_but_restore() {
        use crate::records::CommonCommand;
        let reason = Reason {
            code: "duplicate".into(),
            text: String::new(),
        };
        let archived = given::<Lead>([captured()])
            .when(LeadCommand::Common(CommonCommand::Archive(reason.clone())))
            .result
            .unwrap();
        let history: Vec<LeadEvent> = [captured()].into_iter().chain(archived).collect();
        given::<Lead>(history.clone())
            .when(LeadCommand::ChangeStatus {
                to: LeadStatus::Working,
                reason: None,
            })
            .then_error(DomainError::RecordArchived);
        given::<Lead>(history.clone())
            .when(LeadCommand::Common(CommonCommand::Archive(reason.clone())))
            .then_error(DomainError::RecordArchived);
        let restored = given::<Lead>(history)
            .when(LeadCommand::Common(CommonCommand::Restore(reason)))
            .result
            .unwrap();
        assert_eq!(restored.len(), 1);
    }

    #[test]
    fn details_update_until_conversion() {
        let patch = LeadDetailsPatch {
            company: Some("Wei Trading Ltd".into()),
            ..LeadDetailsPatch::default()
        };
        let state = given::<Lead>([captured()])
            .when(LeadCommand::UpdateDetails(patch.clone()))
            .then(vec![LeadEvent::DetailsUpdated(LeadDetailsUpdated {
                changes: LeadChanges {
                    company: Some(Change {
                        old: "Wei Trading".into(),
                        new: "Wei Trading Ltd".into(),
                    }),
                    ..LeadChanges::default()
                },
                occurred_at: now(),
            })]);
        assert_eq!(state.company, "Wei Trading Ltd");
        let bad = LeadDetailsPatch {
            emails: Some(vec![Email {
                address: "nope".into(),
                primary: true,
            }]),
            ..LeadDetailsPatch::default()
        };
        given::<Lead>([captured()])
            .when(LeadCommand::UpdateDetails(bad))
            .then_invalid(&["emails[0].address"]);
        let converted = LeadEvent::Converted(LeadConverted {
            account_id: uuid::Uuid::nil(),
            account_created: true,
            contact_id: uuid::Uuid::nil(),
            opportunity_id: None,
            occurred_at: now(),
        });
        given::<Lead>([captured(), converted])
            .when(LeadCommand::UpdateDetails(patch))
            .then_error(DomainError::InvalidTransition {
                from: "converted",
                to: "updated",
            });
    }

    #[test]
    fn status_moves_follow_the_lifecycle() {
        given::<Lead>([captured()])
            .when(LeadCommand::ChangeStatus {
                to: LeadStatus::Working,
                reason: None,
            })
            .then(vec![moved(LeadStatus::New, LeadStatus::Working)]);
        given::<Lead>([captured()])
            .when(LeadCommand::ChangeStatus {
                to: LeadStatus::Qualified,
                reason: None,
            })
            .then_error(DomainError::InvalidTransition {
                from: "new",
                to: "qualified",
            });
        given::<Lead>([captured()])
            .when(LeadCommand::ChangeStatus {
                to: LeadStatus::Disqualified,
                reason: None,
            })
            .then_invalid(&["reason"]);
        let reason = Reason {
            code: "no_budget".into(),
            text: String::new(),
        };
        given::<Lead>([captured()])
            .when(LeadCommand::ChangeStatus {
                to: LeadStatus::Disqualified,
                reason: Some(reason.clone()),
            })
            .then(vec![LeadEvent::StatusChanged(LeadStatusChanged {
                from: LeadStatus::New,
                to: LeadStatus::Disqualified,
                reason: Some(reason),
                occurred_at: now(),
            })]);
        given::<Lead>([captured(), moved(LeadStatus::New, LeadStatus::Disqualified)])
            .when(LeadCommand::ChangeStatus {
                to: LeadStatus::Working,
                reason: None,
            })
            .then(vec![moved(LeadStatus::Disqualified, LeadStatus::Working)]);
        given::<Lead>([captured(), moved(LeadStatus::New, LeadStatus::Working)])
            .when(LeadCommand::ChangeStatus {
                to: LeadStatus::Working,
                reason: None,
            })
            .then(vec![]);
        given::<Lead>([captured()])
            .when(LeadCommand::ChangeStatus {
                to: LeadStatus::Converted,
                reason: None,
            })
            .then_error(DomainError::InvalidTransition {
                from: "new",
                to: "converted",
            });
    }
}
