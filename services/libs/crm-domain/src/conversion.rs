//! Lead conversion: one decision over three streams (DOMAIN.md §2.1), appended
//! atomically by the handler. Pure, like every `decide`: the existing account
//! (if the caller chose one) and the ids are passed in.
use uuid::Uuid;

use crate::account::{Account, AccountCommand, AccountDetails, AccountEvent, AccountKind};
use crate::aggregate::{Aggregate, Context};
use crate::contact::{Contact, ContactCommand, ContactDetails, ContactEvent};
use crate::error::DomainError;
use crate::lead::{Lead, LeadConverted, LeadEvent, LeadStatus};
use crate::opportunity::{
    DealDetails, DealFacts, DealSource, Opportunity, OpportunityCommand, OpportunityEvent,
};

/// Where the conversion writes.
#[derive(Clone, Debug)]
pub struct ConversionTargets<'a> {
    /// The lead's own id (the deal records where it came from).
    pub lead_id: Uuid,
    /// The account to create (when `existing_account` is `None`) or use.
    pub account_id: Uuid,
    /// The existing account's state, when the caller named one.
    pub existing_account: Option<&'a Account>,
    pub contact_id: Uuid,
    /// The tenant lets leads convert from `working` too (tenant settings).
    pub allow_working: bool,
    /// A deal to open in the same conversion: its id, its details (account,
    /// contact and source are filled in here) and its pipeline.
    pub opportunity: Option<(Uuid, DealDetails, &'a DealFacts)>,
}

/// The events of each stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversion {
    pub lead: Vec<LeadEvent>,
    pub account: Vec<AccountEvent>,
    pub contact: Vec<ContactEvent>,
    pub opportunity: Vec<OpportunityEvent>,
}

/// Converts a qualified lead into a contact linked to a new or existing
/// account. Each part is decided by its own aggregate, so every rule of
/// account and contact creation holds here too.
pub fn convert(
    lead: &Lead,
    targets: ConversionTargets<'_>,
    context: Context,
) -> Result<Conversion, DomainError> {
    if !lead.exists {
        return Err(DomainError::NotFound);
    }
    // As every other command of the lead (`Lead::decide`): an erased, merged
    // or archived lead takes no conversion.
    if lead.erased {
        return Err(DomainError::RecordErased);
    }
    if let Some(survivor) = lead.merged_into {
        return Err(DomainError::RecordMerged { survivor });
    }
    lead.meta.refuse_if_archived(false)?;
    let convertible = lead.status == LeadStatus::Qualified
        || (targets.allow_working && lead.status == LeadStatus::Working);
    if !convertible {
        return Err(DomainError::InvalidTransition {
            from: lead.status.name(),
            to: "converted",
        });
    }
    let occurred_at = context.occurred_at()?;
    let account = match targets.existing_account {
        Some(existing) => {
            if !existing.usable() {
                return Err(DomainError::InvalidReference {
                    field: "account_id",
                });
            }
            Vec::new()
        }
        None => {
            if lead.company.is_empty() {
                return Err(DomainError::invalid(
                    "account_id",
                    "is required when the lead has no company",
                ));
            }
            Account::default()
                .decide(
                    AccountCommand::Create {
                        self_id: targets.account_id,
                        details: AccountDetails {
                            kind: AccountKind::Company,
                            name: lead.company.clone(),
                            ..AccountDetails::default()
                        },
                    },
                    context,
                )
                // The account's name is the lead's company.
                .map_err(|error| match error {
                    DomainError::Invalid(violations) => lead_data(
                        violations
                            .into_iter()
                            .map(|v| {
                                let field = if v.field == "name" {
                                    "company"
                                } else {
                                    &v.field
                                };
                                crate::Violation::new(field, v.rule)
                            })
                            .collect(),
                    ),
                    other => other,
                })?
        }
    };
    let mut name = lead.name.clone();
    if name.given.trim().is_empty() {
        return Err(lead_data(vec![crate::Violation::new(
            "name.given",
            "is required to become a contact",
        )]));
    }
    name.given = name.given.trim().to_owned();
    let created = Contact::default()
        .decide(
            ContactCommand::Create(ContactDetails {
                name,
                // As a contact stores them: trimmed (a lead keeps them as
                // given).
                emails: lead
                    .emails
                    .iter()
                    .map(|e| crate::contact::Email {
                        address: e.address.trim().to_owned(),
                        ..e.clone()
                    })
                    .collect(),
                phones: lead.phones.clone(),
                ..ContactDetails::default()
            }),
            context,
        )
        .map_err(|error| match error {
            DomainError::Invalid(violations) => lead_data(violations),
            other => other,
        })?;
    let state = Contact::default().replay(created.iter());
    let linked = state.decide(
        ContactCommand::LinkToAccount {
            account_id: targets.account_id,
            role: String::new(),
            primary: true,
            account_active: true,
        },
        context,
    )?;
    // The consent the lead was given goes with the person (DOMAIN.md §2.3):
    // one decision per purpose, as the contact's own commands record it.
    let mut consented = Vec::new();
    let mut contact_state = state.replay(linked.iter());
    for (purpose, consent) in &lead.consent {
        let events = contact_state
            .decide(
                ContactCommand::ChangeConsent {
                    purpose: purpose.clone(),
                    granted: consent.granted,
                    source: consent.source.clone(),
                    basis: consent.basis.clone(),
                },
                context,
            )
            .map_err(|error| match error {
                DomainError::Invalid(violations) => lead_data(
                    violations
                        .into_iter()
                        .map(|v| crate::Violation::new(format!("consent.{}", v.field), v.rule))
                        .collect(),
                ),
                other => other,
            })?;
        // Dated when the person decided, not when the lead converted: a
        // later merge keeps each purpose's latest decision by that date.
        let events: Vec<ContactEvent> = events
            .into_iter()
            .map(|event| match event {
                ContactEvent::ConsentChanged(changed) => {
                    ContactEvent::ConsentChanged(crate::contact::ContactConsentChanged {
                        occurred_at: consent.decided_at,
                        ..changed
                    })
                }
                other => other,
            })
            .collect();
        contact_state = contact_state.replay(events.iter());
        consented.extend(events);
    }
    let opportunity_id = targets.opportunity.as_ref().map(|(id, _, _)| *id);
    let opportunity = match targets.opportunity {
        Some((_, details, facts)) => {
            let details = DealDetails {
                account_id: targets.account_id,
                contact_id: Some(targets.contact_id),
                source: DealSource {
                    lead_id: Some(targets.lead_id),
                    channel: lead.source.channel.clone(),
                    campaign_id: lead.source.campaign_id,
                },
                ..details
            };
            // The account and contact are created in this very append, or
            // were checked.
            let facts = DealFacts {
                account_active: true,
                contact_usable: true,
                ..facts.clone()
            };
            Opportunity::default()
                .decide(OpportunityCommand::Open(details, facts), context)
                .map_err(|error| prefixed("opportunity", error))?
        }
        None => Vec::new(),
    };
    Ok(Conversion {
        lead: vec![LeadEvent::Converted(LeadConverted {
            account_id: targets.account_id,
            account_created: targets.existing_account.is_none(),
            contact_id: targets.contact_id,
            opportunity_id,
            occurred_at,
        })],
        account,
        contact: created.into_iter().chain(linked).chain(consented).collect(),
        opportunity,
    })
}

/// The requested deal's own fields (name, amount, owner), named under
/// `opportunity.`: checked before the conversion's lookups.
pub fn check_deal(details: &DealDetails) -> Result<(), DomainError> {
    crate::opportunity::validate_details(details).map_err(|error| prefixed("opportunity", error))
}

/// The lead's own data breaks a rule of the record it would become: not the
/// request's fault (FAILED_PRECONDITION, fix the lead first), each field
/// named under `lead.`.
fn lead_data(violations: Vec<crate::Violation>) -> DomainError {
    DomainError::RecordDataInvalid {
        record: "lead",
        violations: violations
            .into_iter()
            .map(|v| crate::Violation::new(format!("lead.{}", v.field), v.rule))
            .collect(),
    }
}

/// A part's invalid fields, named under the request field they came from.
fn prefixed(prefix: &str, error: DomainError) -> DomainError {
    match error {
        DomainError::Invalid(violations) => DomainError::Invalid(
            violations
                .into_iter()
                .map(|v| crate::Violation::new(format!("{prefix}.{}", v.field), v.rule))
                .collect(),
        ),
        DomainError::InvalidReference { field } => DomainError::InvalidReference {
            field: match field {
                "pipeline_id" => "opportunity.pipeline_id",
                "stage" => "opportunity.stage",
                other => other,
            },
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::Lifecycle;
    use crate::contact::{Email, PersonName};
    use crate::lead::{LeadCaptured, LeadSource, LeadStatusChanged};
    use crate::testing::now;

    fn qualified(company: &str) -> Lead {
        let captured = LeadEvent::Captured(LeadCaptured {
            name: PersonName {
                given: "Li".into(),
                family: "Wei".into(),
            },
            company: company.into(),
            emails: vec![Email {
                address: "li.wei@example.cn".into(),
                primary: true,
            }],
            phones: vec![],
            source: LeadSource {
                channel: "web".into(),
                ..LeadSource::default()
            },
            consent: Default::default(),
            occurred_at: now(),
        });
        let steps = [
            (LeadStatus::New, LeadStatus::Working),
            (LeadStatus::Working, LeadStatus::Qualified),
        ]
        .map(|(from, to)| {
            LeadEvent::StatusChanged(LeadStatusChanged {
                from,
                to,
                reason: None,
                occurred_at: now(),
            })
        });
        Lead::default().replay([captured].iter().chain(steps.iter()))
    }

    /// The consent a lead was given goes to its contact, decision by
    /// decision.
    #[test]
    fn the_leads_consent_goes_to_the_contact() {
        let mut lead = qualified("Acme");
        lead.consent.insert(
            "marketing_email".into(),
            crate::contact::Consent {
                granted: true,
                source: "web_form".into(),
                basis: "consent".into(),
                decided_at: now(),
            },
        );
        let later = Context::at(now() + jiff::SignedDuration::from_hours(24));
        let conversion = convert(&lead, targets(), later).unwrap();
        let contact = Contact::default().replay(conversion.contact.iter());
        let consent = &contact.consent["marketing_email"];
        assert!(consent.granted);
        assert_eq!(consent.decided_at, now(), "when the person decided");
        assert_eq!(
            (consent.source.as_str(), consent.basis.as_str()),
            ("web_form", "consent")
        );
    }

    /// An active company account, id 9.
    fn acme() -> Account {
        Account::default().replay(
            Account::default()
                .decide(
                    AccountCommand::Create {
                        self_id: Uuid::from_u128(9),
                        details: AccountDetails {
                            name: "Acme".into(),
                            ..Default::default()
                        },
                    },
                    Context::at(now()),
                )
                .unwrap()
                .iter(),
        )
    }

    fn targets() -> ConversionTargets<'static> {
        ConversionTargets {
            account_id: Uuid::from_u128(1),
            existing_account: None,
            contact_id: Uuid::from_u128(2),
            allow_working: false,
            lead_id: Uuid::from_u128(3),
            opportunity: None,
        }
    }

    #[test]
    fn a_qualified_lead_becomes_account_contact_and_link() {
        let conversion = convert(
            &qualified("Wei Trading 有限公司"),
            targets(),
            Context::at(now()),
        )
        .unwrap();
        assert_eq!(conversion.account.len(), 1);
        let account = Account::default().replay(conversion.account.iter());
        assert_eq!(account.name, "Wei Trading 有限公司");
        let contact = Contact::default().replay(conversion.contact.iter());
        assert_eq!(contact.emails[0].address, "li.wei@example.cn");
        assert_eq!(contact.accounts[0].account_id, Uuid::from_u128(1));
        assert!(contact.accounts[0].primary);
        let lead = qualified("x").replay(conversion.lead.iter());
        assert_eq!(lead.status, LeadStatus::Converted);
    }

    #[test]
    fn a_conversion_can_open_a_deal_in_the_same_decision() {
        let facts = crate::opportunity::tests::facts();
        let details = crate::opportunity::tests::details();
        let lead = qualified("Wei Trading");
        let conversion = convert(
            &lead,
            ConversionTargets {
                opportunity: Some((Uuid::from_u128(4), details.clone(), &facts)),
                ..targets()
            },
            Context::at(now()),
        )
        .unwrap();
        let LeadEvent::Converted(converted) = &conversion.lead[0] else {
            panic!("{:?}", conversion.lead)
        };
        assert_eq!(converted.opportunity_id, Some(Uuid::from_u128(4)));
        let OpportunityEvent::Opened(opened) = &conversion.opportunity[0] else {
            panic!("{:?}", conversion.opportunity)
        };
        // On the new account, with the new contact, and where it came from.
        assert_eq!(opened.account_id, Uuid::from_u128(1));
        assert_eq!(opened.contact_id, Some(Uuid::from_u128(2)));
        assert_eq!(opened.source.lead_id, Some(Uuid::from_u128(3)));
        assert_eq!(opened.source.channel, "web");
        // A bad deal refuses the whole conversion, naming the deal's field.
        let bad = DealDetails {
            stage: "nowhere".into(),
            ..details.clone()
        };
        let refused = convert(
            &lead,
            ConversionTargets {
                opportunity: Some((Uuid::from_u128(4), bad, &facts)),
                ..targets()
            },
            Context::at(now()),
        );
        assert_eq!(
            refused,
            Err(DomainError::InvalidReference {
                field: "opportunity.stage"
            })
        );
        let bad = DealDetails {
            name: String::new(),
            ..details
        };
        let refused = convert(
            &lead,
            ConversionTargets {
                opportunity: Some((Uuid::from_u128(4), bad, &facts)),
                ..targets()
            },
            Context::at(now()),
        );
        assert!(
            matches!(refused, Err(DomainError::Invalid(v)) if v[0].field == "opportunity.name")
        );
    }

    /// Data the lead kept that its contact or account may not have is the
    /// lead's to fix, not the request's: a precondition, naming each field.
    #[test]
    fn a_lead_whose_data_cannot_become_a_contact_is_not_converted() {
        let refused = |lead: &Lead| match convert(lead, targets(), Context::at(now())) {
            Err(DomainError::RecordDataInvalid { record, violations }) => (
                record,
                violations.into_iter().map(|v| v.field).collect::<Vec<_>>(),
            ),
            other => panic!("expected RecordDataInvalid, got {other:?}"),
        };
        let mut lead = qualified("Acme");
        lead.name.given = "  ".into();
        assert_eq!(refused(&lead), ("lead", vec!["lead.name.given".to_owned()]));
        let mut lead = qualified("Acme");
        lead.emails[0].address = "not an address".into();
        assert_eq!(
            refused(&lead),
            ("lead", vec!["lead.emails[0].address".to_owned()])
        );
        let lead = qualified(&"A".repeat(201));
        assert_eq!(refused(&lead), ("lead", vec!["lead.company".to_owned()]));
        // The request's own fault stays INVALID_ARGUMENT.
        let lead = qualified("");
        assert!(matches!(
            convert(&lead, targets(), Context::at(now())),
            Err(DomainError::Invalid(v)) if v[0].field == "account_id"
        ));
    }

    #[test]
    fn an_existing_active_account_is_linked_not_created() {
        let existing = acme();
        let conversion = convert(
            &qualified(""),
            ConversionTargets {
                account_id: Uuid::from_u128(9),
                existing_account: Some(&existing),
                contact_id: Uuid::from_u128(2),
                allow_working: false,
                lead_id: Uuid::from_u128(3),
                opportunity: None,
            },
            Context::at(now()),
        )
        .unwrap();
        assert!(conversion.account.is_empty());
        let missing = Account::default();
        let refused = convert(
            &qualified(""),
            ConversionTargets {
                account_id: Uuid::from_u128(9),
                existing_account: Some(&missing),
                contact_id: Uuid::from_u128(2),
                allow_working: false,
                lead_id: Uuid::from_u128(3),
                opportunity: None,
            },
            Context::at(now()),
        );
        assert_eq!(
            refused.unwrap_err(),
            DomainError::InvalidReference {
                field: "account_id"
            }
        );
    }

    #[test]
    fn an_erased_merged_or_archived_lead_does_not_convert() {
        let mut erased = qualified("Acme");
        erased.erased = true;
        assert_eq!(
            convert(&erased, targets(), Context::at(now())).unwrap_err(),
            DomainError::RecordErased
        );
        let mut merged = qualified("Acme");
        merged.merged_into = Some(Uuid::from_u128(7));
        assert_eq!(
            convert(&merged, targets(), Context::at(now())).unwrap_err(),
            DomainError::RecordMerged {
                survivor: Uuid::from_u128(7)
            }
        );
        let mut archived = qualified("Acme");
        archived.meta.lifecycle = Lifecycle::Archived;
        assert_eq!(
            convert(&archived, targets(), Context::at(now())).unwrap_err(),
            DomainError::RecordArchived
        );
    }

    #[test]
    fn a_merged_or_erased_account_takes_no_converted_lead() {
        let active = acme();
        let mut merged = active.clone();
        merged.merged_into = Some(Uuid::from_u128(8));
        let mut erased = active;
        erased.erased = true;
        for account in [&merged, &erased] {
            let refused = convert(
                &qualified(""),
                ConversionTargets {
                    account_id: Uuid::from_u128(9),
                    existing_account: Some(account),
                    ..targets()
                },
                Context::at(now()),
            );
            assert_eq!(
                refused.unwrap_err(),
                DomainError::InvalidReference {
                    field: "account_id"
                }
            );
        }
    }

    #[test]
    fn only_qualified_leads_convert() {
        assert_eq!(
            convert(&Lead::default(), targets(), Context::at(now())).unwrap_err(),
            DomainError::NotFound
        );
        let mut working = qualified("Acme");
        working.status = LeadStatus::Working;
        assert_eq!(
            convert(&working, targets(), Context::at(now())).unwrap_err(),
            DomainError::InvalidTransition {
                from: "working",
                to: "converted"
            }
        );
        assert!(matches!(
            convert(&qualified(""), targets(), Context::at(now())),
            Err(DomainError::Invalid(_))
        ));
    }
}
