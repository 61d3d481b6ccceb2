//! Campaign: a marketing effort with a budget, costs, members and responses
//! (DOMAIN.md §2.8). `Planned → Active → Completed | Aborted`. Members join
//! only with consent for the campaign's channel.
use std::collections::BTreeMap;

use jiff::Timestamp;
use jiff::civil::Date;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::{Aggregate, Context, DomainEvent};
use crate::common::{Change, Money, diff, is_code, text_ok};
use crate::error::{DomainError, Violations};

pub const CHANNELS: &[&str] = &["email", "sms", "phone", "event", "web", "social", "print"];
pub const TYPES: &[&str] = &[
    "newsletter",
    "webinar",
    "trade_show",
    "paid_ads",
    "outbound",
    "referral",
];

/// The consent purpose a channel needs, if any (DOMAIN.md §2.3).
pub fn purpose_for(channel: &str) -> Option<&'static str> {
    match channel {
        "email" => Some("marketing_email"),
        "sms" => Some("marketing_sms"),
        "phone" => Some("marketing_call"),
        _ => None,
    }
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignStatus {
    #[default]
    Planned,
    Active,
    Completed,
    Aborted,
}

impl CampaignStatus {
    pub fn name(self) -> &'static str {
        match self {
            Self::Planned => "planned",
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Aborted => "aborted",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [Self::Planned, Self::Active, Self::Completed, Self::Aborted]
            .into_iter()
            .find(|s| s.name() == name)
    }

    fn may_become(self, to: Self) -> bool {
        matches!(
            (self, to),
            (Self::Planned, Self::Active)
                | (Self::Planned | Self::Active, Self::Aborted)
                | (Self::Active, Self::Completed)
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CampaignPlan {
    pub name: String,
    pub campaign_type: String,
    pub channel: String,
    pub parent_id: Option<Uuid>,
    pub starts_on: Date,
    pub ends_on: Date,
    pub budget: Money,
    pub owner: String,
    pub utm_campaign: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CampaignCommand {
    Plan {
        self_id: Uuid,
        plan: CampaignPlan,
    },
    ChangeStatus {
        to: CampaignStatus,
    },
    RecordCost {
        amount: Money,
        spent_on: Date,
        source: String,
    },
    /// `consented`: the handler's fact that the member may be reached on the
    /// campaign's channel (a contact's consent for it, or no consent needed).
    AddMember {
        member: Member,
        consented: bool,
    },
    RecordResponse {
        member: Member,
        response: String,
    },
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignPlanned {
    pub name: String,
    pub campaign_type: String,
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<Uuid>,
    pub starts_on: Date,
    pub ends_on: Date,
    pub budget: Money,
    pub owner: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub utm_campaign: String,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignDetailsUpdated {
    pub changes: CampaignChanges,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignChanges {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Change<CampaignStatus>>,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignCostRecorded {
    /// Negative amounts correct earlier costs.
    pub amount: Money,
    pub spent_on: Date,
    pub source: String,
    pub occurred_at: Timestamp,
}

/// Who a campaign reaches: a contact, or a lead (the unit of attribution).
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum Member {
    Contact(Uuid),
    Lead(Uuid),
}

impl Member {
    /// The request field that names this member.
    pub fn field(self) -> &'static str {
        match self {
            Self::Contact(_) => "contact_id",
            Self::Lead(_) => "lead_id",
        }
    }
}

/// Schema version 2: the member is a contact or a lead.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignMemberAdded {
    pub member: Member,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignMemberResponded {
    pub member: Member,
    /// Response code, e.g. `opened`, `clicked`, `registered`, `attended`.
    pub response: String,
    pub occurred_at: Timestamp,
}

/// Schema version 1 (contacts only); read through [`Self::upcast`].
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignMemberAddedV1 {
    pub contact_id: Uuid,
    pub occurred_at: Timestamp,
}

impl CampaignMemberAddedV1 {
    pub fn upcast(self) -> CampaignMemberAdded {
        CampaignMemberAdded {
            member: Member::Contact(self.contact_id),
            occurred_at: self.occurred_at,
        }
    }
}

/// Schema version 1 (contacts only); read through [`Self::upcast`].
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignMemberRespondedV1 {
    pub contact_id: Uuid,
    pub response: String,
    pub occurred_at: Timestamp,
}

impl CampaignMemberRespondedV1 {
    pub fn upcast(self) -> CampaignMemberResponded {
        CampaignMemberResponded {
            member: Member::Contact(self.contact_id),
            response: self.response,
            occurred_at: self.occurred_at,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum CampaignEvent {
    Planned(CampaignPlanned),
    DetailsUpdated(CampaignDetailsUpdated),
    CostRecorded(CampaignCostRecorded),
    MemberAdded(CampaignMemberAdded),
    MemberResponded(CampaignMemberResponded),
}

impl DomainEvent for CampaignEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Planned(_) => "CampaignPlanned",
            Self::DetailsUpdated(_) => "CampaignDetailsUpdated",
            Self::CostRecorded(_) => "CampaignCostRecorded",
            Self::MemberAdded(_) => "CampaignMemberAdded",
            Self::MemberResponded(_) => "CampaignMemberResponded",
        }
    }

    fn occurred_at(&self) -> jiff::Timestamp {
        match self {
            Self::Planned(e) => e.occurred_at,
            Self::DetailsUpdated(e) => e.occurred_at,
            Self::CostRecorded(e) => e.occurred_at,
            Self::MemberAdded(e) => e.occurred_at,
            Self::MemberResponded(e) => e.occurred_at,
        }
    }

    fn schema_version(&self) -> u32 {
        match self {
            Self::MemberAdded(_) | Self::MemberResponded(_) => 2,
            _ => 1,
        }
    }

    fn decode<'de, D: serde::Deserializer<'de>>(
        event_type: &str,
        schema_version: u32,
        payload: D,
    ) -> Result<Option<Self>, D::Error> {
        Ok(Some(match (event_type, schema_version) {
            ("CampaignPlanned", _) => Self::Planned(Deserialize::deserialize(payload)?),
            ("CampaignDetailsUpdated", _) => {
                Self::DetailsUpdated(Deserialize::deserialize(payload)?)
            }
            ("CampaignCostRecorded", _) => Self::CostRecorded(Deserialize::deserialize(payload)?),
            ("CampaignMemberAdded", 1) => {
                Self::MemberAdded(CampaignMemberAddedV1::deserialize(payload)?.upcast())
            }
            ("CampaignMemberAdded", _) => Self::MemberAdded(Deserialize::deserialize(payload)?),
            ("CampaignMemberResponded", 1) => {
                Self::MemberResponded(CampaignMemberRespondedV1::deserialize(payload)?.upcast())
            }
            ("CampaignMemberResponded", _) => {
                Self::MemberResponded(Deserialize::deserialize(payload)?)
            }
            _ => return Ok(None),
        }))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Campaign {
    pub exists: bool,
    pub status: CampaignStatus,
    pub channel: String,
    pub currency: String,
    /// Total recorded cost in minor units (corrections included).
    pub cost_minor: i64,
    /// Contact members and their latest response.
    pub members: BTreeMap<Uuid, Option<String>>,
    /// Lead members and their latest response.
    #[serde(default)]
    pub lead_members: BTreeMap<Uuid, Option<String>>,
}

impl Campaign {
    fn responses(&self, member: Member) -> &BTreeMap<Uuid, Option<String>> {
        match member {
            Member::Contact(_) => &self.members,
            Member::Lead(_) => &self.lead_members,
        }
    }

    fn responses_mut(&mut self, member: Member) -> (&mut BTreeMap<Uuid, Option<String>>, Uuid) {
        match member {
            Member::Contact(id) => (&mut self.members, id),
            Member::Lead(id) => (&mut self.lead_members, id),
        }
    }

    /// Whether `member` joined this campaign.
    pub fn has_member(&self, member: Member) -> bool {
        let (Member::Contact(id) | Member::Lead(id)) = member;
        self.responses(member).contains_key(&id)
    }
}

impl Aggregate for Campaign {
    type Command = CampaignCommand;
    type Event = CampaignEvent;
    const STREAM_TYPE: &'static str = "campaign";

    fn exists(&self) -> bool {
        self.exists
    }

    fn creates(command: &CampaignCommand) -> bool {
        matches!(command, CampaignCommand::Plan { .. })
    }

    fn decide(
        &self,
        command: CampaignCommand,
        context: Context,
    ) -> Result<Vec<CampaignEvent>, DomainError> {
        let occurred_at = context.occurred_at()?;
        if !self.exists && !matches!(command, CampaignCommand::Plan { .. }) {
            return Err(DomainError::NotFound);
        }
        match command {
            CampaignCommand::Plan { self_id, plan } => {
                if self.exists {
                    return Err(DomainError::AlreadyExists {
                        key: "campaign_id",
                        holder: None,
                    });
                }
                let mut v = Violations::default();
                v.check(
                    text_ok(&plan.name, 200, false),
                    "name",
                    "must be 1 to 200 characters",
                );
                v.check(
                    TYPES.contains(&plan.campaign_type.as_str()),
                    "type",
                    "must be a campaign type",
                );
                v.check(
                    CHANNELS.contains(&plan.channel.as_str()),
                    "channel",
                    "must be a campaign channel",
                );
                v.check(
                    plan.parent_id != Some(self_id),
                    "parent_id",
                    "must not be the campaign itself",
                );
                v.check(
                    plan.ends_on >= plan.starts_on,
                    "ends_on",
                    "must not be before starts_on",
                );
                plan.budget.validate("budget", &mut v);
                v.check(
                    plan.budget.amount_minor >= 0,
                    "budget.amount_minor",
                    "must not be negative",
                );
                v.check(
                    text_ok(&plan.owner, 200, false),
                    "owner",
                    "must be 1 to 200 characters",
                );
                v.check(
                    text_ok(&plan.utm_campaign, 200, true),
                    "utm_campaign",
                    "must be at most 200 characters",
                );
                v.into_result()?;
                Ok(vec![CampaignEvent::Planned(CampaignPlanned {
                    name: plan.name,
                    campaign_type: plan.campaign_type,
                    channel: plan.channel,
                    parent_id: plan.parent_id,
                    starts_on: plan.starts_on,
                    ends_on: plan.ends_on,
                    budget: plan.budget,
                    owner: plan.owner,
                    utm_campaign: plan.utm_campaign,
                    occurred_at,
                })])
            }
            CampaignCommand::ChangeStatus { to } => {
                if self.status == to {
                    return Ok(vec![]);
                }
                if !self.status.may_become(to) {
                    return Err(DomainError::InvalidTransition {
                        from: self.status.name(),
                        to: to.name(),
                    });
                }
                Ok(vec![CampaignEvent::DetailsUpdated(
                    CampaignDetailsUpdated {
                        changes: CampaignChanges {
                            status: diff(&self.status, Some(&to)),
                        },
                        occurred_at,
                    },
                )])
            }
            CampaignCommand::RecordCost {
                amount,
                spent_on,
                source,
            } => {
                let mut v = Violations::default();
                amount.validate("amount", &mut v);
                v.check(
                    amount.currency == self.currency,
                    "amount.currency",
                    "must be the campaign's currency",
                );
                v.check(
                    amount.amount_minor != 0,
                    "amount.amount_minor",
                    "must not be zero",
                );
                v.check(
                    // (An amount itself out of range is named once, above.)
                    !crate::common::amount_ok(amount.amount_minor)
                        || self
                            .cost_minor
                            .checked_add(amount.amount_minor)
                            .is_some_and(crate::common::amount_ok),
                    "amount.amount_minor",
                    "would take the campaign's total cost out of range",
                );
                v.check(
                    is_code(&source, 64),
                    "source",
                    "must be a code of [a-z0-9_]",
                );
                v.into_result()?;
                Ok(vec![CampaignEvent::CostRecorded(CampaignCostRecorded {
                    amount,
                    spent_on,
                    source,
                    occurred_at,
                })])
            }
            CampaignCommand::AddMember { member, consented } => {
                if matches!(
                    self.status,
                    CampaignStatus::Completed | CampaignStatus::Aborted
                ) {
                    return Err(DomainError::InvalidTransition {
                        from: self.status.name(),
                        to: "member added",
                    });
                }
                if self.has_member(member) {
                    return Ok(vec![]);
                }
                if let Some(purpose) = purpose_for(&self.channel)
                    && !consented
                {
                    return Err(DomainError::ConsentMissing { purpose });
                }
                Ok(vec![CampaignEvent::MemberAdded(CampaignMemberAdded {
                    member,
                    occurred_at,
                })])
            }
            CampaignCommand::RecordResponse { member, response } => {
                if !self.has_member(member) {
                    return Err(DomainError::InvalidReference {
                        field: member.field(),
                    });
                }
                if !is_code(&response, 64) {
                    return Err(DomainError::invalid(
                        "response",
                        "must be a code of [a-z0-9_]",
                    ));
                }
                Ok(vec![CampaignEvent::MemberResponded(
                    CampaignMemberResponded {
                        member,
                        response,
                        occurred_at,
                    },
                )])
            }
        }
    }

    fn evolve(mut self, event: &CampaignEvent) -> Self {
        match event {
            CampaignEvent::Planned(planned) => {
                self.exists = true;
                self.channel = planned.channel.clone();
                self.currency = planned.budget.currency.clone();
            }
            CampaignEvent::DetailsUpdated(updated) => {
                if let Some(change) = &updated.changes.status {
                    self.status = change.new;
                }
            }
            // `decide` keeps the total in range; evolve never panics.
            CampaignEvent::CostRecorded(cost) => {
                self.cost_minor = self.cost_minor.saturating_add(cost.amount.amount_minor);
            }
            CampaignEvent::MemberAdded(added) => {
                let (members, id) = self.responses_mut(added.member);
                members.insert(id, None);
            }
            CampaignEvent::MemberResponded(responded) => {
                let (members, id) = self.responses_mut(responded.member);
                members.insert(id, Some(responded.response.clone()));
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{given, now};

    fn plan(channel: &str) -> CampaignPlan {
        CampaignPlan {
            name: "Spring newsletter".into(),
            campaign_type: "newsletter".into(),
            channel: channel.into(),
            parent_id: None,
            starts_on: Date::constant(2026, 3, 1),
            ends_on: Date::constant(2026, 3, 31),
            budget: Money {
                amount_minor: 2_000_000,
                currency: "EUR".into(),
            },
            owner: "user:mkt".into(),
            utm_campaign: "spring".into(),
        }
    }

    fn planned(channel: &str) -> Vec<CampaignEvent> {
        Campaign::default()
            .decide(
                CampaignCommand::Plan {
                    self_id: Uuid::from_u128(9),
                    plan: plan(channel),
                },
                crate::Context::at(now()),
            )
            .unwrap()
    }

    #[test]
    fn plans_need_ordered_dates_and_a_known_channel() {
        let mut bad = plan("pigeon");
        bad.ends_on = Date::constant(2026, 2, 1);
        given::<Campaign>([])
            .when(CampaignCommand::Plan {
                self_id: Uuid::from_u128(9),
                plan: bad,
            })
            .then_invalid(&["channel", "ends_on"]);
    }

    #[test]
    fn members_need_consent_for_the_channel_and_join_once() {
        let ada = Uuid::from_u128(1);
        given::<Campaign>(planned("email"))
            .when(CampaignCommand::AddMember {
                member: Member::Contact(ada),
                consented: false,
            })
            .then_error(DomainError::ConsentMissing {
                purpose: "marketing_email",
            });
        let state = given::<Campaign>(planned("event"))
            .when(CampaignCommand::AddMember {
                member: Member::Contact(ada),
                consented: false,
            })
            .then(vec![CampaignEvent::MemberAdded(CampaignMemberAdded {
                member: Member::Contact(ada),
                occurred_at: now(),
            })]);
        assert!(
            state.members.contains_key(&ada),
            "events need no marketing consent"
        );
        let mut joined = planned("email");
        joined.push(CampaignEvent::MemberAdded(CampaignMemberAdded {
            member: Member::Contact(ada),
            occurred_at: now(),
        }));
        given::<Campaign>(joined.clone())
            .when(CampaignCommand::AddMember {
                member: Member::Contact(ada),
                consented: true,
            })
            .then(vec![]);
        given::<Campaign>(joined.clone())
            .when(CampaignCommand::RecordResponse {
                member: Member::Contact(Uuid::from_u128(2)),
                response: "clicked".into(),
            })
            .then_error(DomainError::InvalidReference {
                field: "contact_id",
            });
        // The same id as a lead is another member.
        given::<Campaign>(joined.clone())
            .when(CampaignCommand::RecordResponse {
                member: Member::Lead(ada),
                response: "clicked".into(),
            })
            .then_error(DomainError::InvalidReference { field: "lead_id" });
        given::<Campaign>(joined)
            .when(CampaignCommand::RecordResponse {
                member: Member::Contact(ada),
                response: "clicked".into(),
            })
            .then(vec![CampaignEvent::MemberResponded(
                CampaignMemberResponded {
                    member: Member::Contact(ada),
                    response: "clicked".into(),
                    occurred_at: now(),
                },
            )]);
    }

    #[test]
    fn leads_join_and_respond_as_members_of_their_own() {
        let lead = Uuid::from_u128(5);
        let state = given::<Campaign>(planned("email"))
            .when(CampaignCommand::AddMember {
                member: Member::Lead(lead),
                consented: true,
            })
            .then(vec![CampaignEvent::MemberAdded(CampaignMemberAdded {
                member: Member::Lead(lead),
                occurred_at: now(),
            })]);
        assert!(state.has_member(Member::Lead(lead)));
        assert!(!state.has_member(Member::Contact(lead)));
    }

    #[test]
    fn version_1_member_events_are_upcast_to_contact_members() {
        let v1 = r#"{"contact_id": "00000000-0000-0000-0000-000000000007", "response": "opened", "occurred_at": "2026-03-02T10:00:00Z"}"#;
        let mut de = serde_json::Deserializer::from_str(v1);
        let event = CampaignEvent::decode("CampaignMemberResponded", 1, &mut de)
            .expect("decodes")
            .expect("known");
        assert_eq!(
            event,
            CampaignEvent::MemberResponded(CampaignMemberResponded {
                member: Member::Contact(Uuid::from_u128(7)),
                response: "opened".into(),
                occurred_at: "2026-03-02T10:00:00Z".parse().expect("time"),
            })
        );
        assert_eq!(event.schema_version(), 2);
    }

    #[test]
    fn costs_stay_in_the_campaign_currency_and_may_be_corrected() {
        let cost = |minor: i64, currency: &str| CampaignCommand::RecordCost {
            amount: Money {
                amount_minor: minor,
                currency: currency.into(),
            },
            spent_on: Date::constant(2026, 3, 2),
            source: "invoice".into(),
        };
        let mut history = planned("email");
        history.extend(
            Campaign::default()
                .replay(planned("email").iter())
                .decide(cost(20_000, "EUR"), crate::Context::at(now()))
                .unwrap(),
        );
        history.extend(
            Campaign::default()
                .replay(history.iter())
                .decide(cost(-5_000, "EUR"), crate::Context::at(now()))
                .unwrap(),
        );
        assert_eq!(
            Campaign::default().replay(history.iter()).cost_minor,
            15_000
        );
        given::<Campaign>(planned("email"))
            .when(cost(1, "USD"))
            .then_invalid(&["amount.currency"]);
        // A total beyond MAX_AMOUNT_MINOR is refused, not wrapped (nor a
        // panic), and so is a single cost beyond it.
        given::<Campaign>(planned("email"))
            .when(cost(i64::MAX, "EUR"))
            .then_invalid(&["amount.amount_minor"]);
        let mut history = planned("email");
        history.extend(
            Campaign::default()
                .replay(history.iter())
                .decide(
                    cost(crate::common::MAX_AMOUNT_MINOR, "EUR"),
                    crate::Context::at(now()),
                )
                .unwrap(),
        );
        given::<Campaign>(history)
            .when(cost(1, "EUR"))
            .then_invalid(&["amount.amount_minor"]);
    }

    #[test]
    fn the_status_lifecycle() {
        given::<Campaign>(planned("email"))
            .when(CampaignCommand::ChangeStatus {
                to: CampaignStatus::Completed,
            })
            .then_error(DomainError::InvalidTransition {
                from: "planned",
                to: "completed",
            });
        let state = given::<Campaign>(planned("email"))
            .when(CampaignCommand::ChangeStatus {
                to: CampaignStatus::Active,
            })
            .then(vec![CampaignEvent::DetailsUpdated(
                CampaignDetailsUpdated {
                    changes: CampaignChanges {
                        status: Some(Change {
                            old: CampaignStatus::Planned,
                            new: CampaignStatus::Active,
                        }),
                    },
                    occurred_at: now(),
                },
            )]);
        assert_eq!(state.status, CampaignStatus::Active);
        given::<Campaign>([])
            .when(CampaignCommand::ChangeStatus {
                to: CampaignStatus::Active,
            })
            .then_error(DomainError::NotFound);
    }
}
