//! Duplicate pairs (DOMAIN.md §5.5, §2.11): two records suspected to be the
//! same contact, lead or account, and a person's decision that they are
//! not.
//!
//! One `duplicate_pair` stream per pair of records, its id derived from the
//! two record ids ([`pair_id`]), so every suspicion of the same two records
//! lands on the same stream whichever of them triggered it. The data-quality
//! process manager sends [`DuplicateCommand::Suspect`]; a sales manager sends
//! [`DuplicateCommand::Dismiss`]. A dismissed pair stays dismissed: a later
//! suspicion is `NotApplicable`. Merges are facts of the records' own
//! streams (`RecordsMerged`), not of the pair.
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::{Aggregate, Context, DomainEvent};
use crate::common::Reason;
use crate::error::{DomainError, Violations};

named_enum!(
    /// Which records a pair holds: two of one kind, or a lead and a contact
    /// (a lead may be someone already known).
    DuplicateKind { Contact = "contact", Lead = "lead", Account = "account", LeadContact = "lead_contact" }
);

named_enum!(
    /// Where a pair stands.
    PairStatus { Suspected = "suspected", Dismissed = "dismissed" }
);

/// The evidence a suspicion may name, in the order it is listed (the rules
/// of [`crate::quality::score`]).
pub const RULES: &[&str] = &["email", "tax_id", "phone", "domain", "name", "company"];

/// The two ids in ascending order: a pair's identity.
pub fn sorted_pair(a: Uuid, b: Uuid) -> [Uuid; 2] {
    if a <= b { [a, b] } else { [b, a] }
}

/// The pair's stream id: a UUIDv5 of the two record ids, sorted, so the
/// same two records always meet on one stream.
pub fn pair_id(a: Uuid, b: Uuid) -> Uuid {
    const NAMESPACE: Uuid = Uuid::from_u128(0x3b8e_7f21_54a9_4d0c_a6e2_91c4_0d5f_8e17);
    let [low, high] = sorted_pair(a, b);
    let mut name = [0u8; 32];
    name[..16].copy_from_slice(low.as_bytes());
    name[16..].copy_from_slice(high.as_bytes());
    Uuid::new_v5(&NAMESPACE, &name)
}

/// Two records look like the same one.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DuplicateSuspected {
    /// The two records, ascending.
    pub record_ids: [Uuid; 2],
    pub kind: DuplicateKind,
    /// The evidence that held, in the order email, tax_id, phone, domain,
    /// name, company; e.g. `["phone", "name"]`.
    pub rules: Vec<String>,
    /// 0 to 100: the highest rule that held.
    pub score: u8,
    pub occurred_at: Timestamp,
}

/// A person decided the two records are not the same.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DuplicateDismissed {
    /// The two records, ascending.
    pub record_ids: [Uuid; 2],
    pub reason: Reason,
    pub occurred_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum DuplicateEvent {
    Suspected(DuplicateSuspected),
    Dismissed(DuplicateDismissed),
}

impl DomainEvent for DuplicateEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Suspected(_) => "DuplicateSuspected",
            Self::Dismissed(_) => "DuplicateDismissed",
        }
    }

    fn occurred_at(&self) -> jiff::Timestamp {
        match self {
            Self::Suspected(e) => e.occurred_at,
            Self::Dismissed(e) => e.occurred_at,
        }
    }

    fn decode<'de, D: serde::Deserializer<'de>>(
        event_type: &str,
        _schema_version: u32,
        payload: D,
    ) -> Result<Option<Self>, D::Error> {
        Ok(Some(match event_type {
            "DuplicateSuspected" => Self::Suspected(Deserialize::deserialize(payload)?),
            "DuplicateDismissed" => Self::Dismissed(Deserialize::deserialize(payload)?),
            _ => return Ok(None),
        }))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DuplicateCommand {
    /// The process manager found the two records alike. Repeating the same
    /// evidence changes nothing; new evidence (another score or rules) is
    /// recorded again; a dismissed pair is `NotApplicable`.
    Suspect {
        record_ids: [Uuid; 2],
        kind: DuplicateKind,
        rules: Vec<String>,
        score: u8,
    },
    /// The two records are not duplicates; a pair never suspected is
    /// `NotFound`, an already dismissed one is left as it is.
    Dismiss {
        record_ids: [Uuid; 2],
        reason: Reason,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DuplicatePair {
    pub record_ids: Option<[Uuid; 2]>,
    pub kind: Option<DuplicateKind>,
    pub rules: Vec<String>,
    pub score: u8,
    pub status: Option<PairStatus>,
    pub dismissed_for: Option<Reason>,
}

fn check_ids(record_ids: &[Uuid; 2], current: Option<[Uuid; 2]>, v: &mut Violations) {
    v.check(
        record_ids[0] < record_ids[1] && !record_ids[0].is_nil(),
        "record_ids",
        "must be two distinct records, ascending",
    );
    v.check(
        current.is_none_or(|ids| ids == *record_ids),
        "record_ids",
        "must be this pair's records",
    );
}

impl Aggregate for DuplicatePair {
    type Command = DuplicateCommand;
    type Event = DuplicateEvent;
    const STREAM_TYPE: &'static str = "duplicate_pair";

    fn exists(&self) -> bool {
        self.record_ids.is_some()
    }

    fn decide(
        &self,
        command: DuplicateCommand,
        context: Context,
    ) -> Result<Vec<DuplicateEvent>, DomainError> {
        let occurred_at = context.occurred_at()?;
        match command {
            DuplicateCommand::Suspect {
                record_ids,
                kind,
                rules,
                score,
            } => {
                let mut v = Violations::default();
                check_ids(&record_ids, self.record_ids, &mut v);
                let positions: Option<Vec<usize>> = rules
                    .iter()
                    .map(|rule| RULES.iter().position(|known| known == rule))
                    .collect();
                v.check(
                    !rules.is_empty()
                        && positions.is_some_and(|p| p.windows(2).all(|w| w[0] < w[1])),
                    "rules",
                    "must be 1 to 6 of email, tax_id, phone, domain, name, company, in that order",
                );
                v.check(score <= 100, "score", "must be 0 to 100");
                v.into_result()?;
                match self.status {
                    Some(PairStatus::Dismissed) => Err(DomainError::NotApplicable {
                        rule: "duplicate_dismissed",
                    }),
                    Some(PairStatus::Suspected)
                        if self.kind == Some(kind)
                            && self.rules == rules
                            && self.score == score =>
                    {
                        Ok(vec![])
                    }
                    _ => Ok(vec![DuplicateEvent::Suspected(DuplicateSuspected {
                        record_ids,
                        kind,
                        rules,
                        score,
                        occurred_at,
                    })]),
                }
            }
            DuplicateCommand::Dismiss { record_ids, reason } => {
                let mut v = Violations::default();
                check_ids(&record_ids, self.record_ids, &mut v);
                reason.validate("reason", &mut v);
                v.into_result()?;
                match self.status {
                    None => Err(DomainError::NotFound),
                    Some(PairStatus::Dismissed) => Ok(vec![]),
                    Some(PairStatus::Suspected) => {
                        Ok(vec![DuplicateEvent::Dismissed(DuplicateDismissed {
                            record_ids,
                            reason,
                            occurred_at,
                        })])
                    }
                }
            }
        }
    }

    fn evolve(mut self, event: &DuplicateEvent) -> Self {
        match event {
            DuplicateEvent::Suspected(suspected) => {
                self.record_ids = Some(suspected.record_ids);
                self.kind = Some(suspected.kind);
                self.rules = suspected.rules.clone();
                self.score = suspected.score;
                if self.status != Some(PairStatus::Dismissed) {
                    self.status = Some(PairStatus::Suspected);
                }
            }
            DuplicateEvent::Dismissed(dismissed) => {
                self.record_ids = Some(dismissed.record_ids);
                self.status = Some(PairStatus::Dismissed);
                self.dismissed_for = Some(dismissed.reason.clone());
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{given, now};

    fn ids() -> [Uuid; 2] {
        sorted_pair(Uuid::from_u128(2), Uuid::from_u128(1))
    }

    fn suspect(score: u8, rules: &[&str]) -> DuplicateCommand {
        DuplicateCommand::Suspect {
            record_ids: ids(),
            kind: DuplicateKind::Contact,
            rules: rules.iter().map(|r| (*r).to_owned()).collect(),
            score,
        }
    }

    fn suspected(score: u8, rules: &[&str]) -> DuplicateEvent {
        DuplicateEvent::Suspected(DuplicateSuspected {
            record_ids: ids(),
            kind: DuplicateKind::Contact,
            rules: rules.iter().map(|r| (*r).to_owned()).collect(),
            score,
            occurred_at: now(),
        })
    }

    fn not_duplicates() -> Reason {
        Reason {
            code: "different_people".into(),
            text: "Namesakes at one company".into(),
        }
    }

    #[test]
    fn a_pair_has_one_stream_whichever_record_comes_first() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(pair_id(a, b), pair_id(b, a));
        assert_ne!(pair_id(a, b), pair_id(a, Uuid::now_v7()));
        assert_eq!(sorted_pair(b, a), [a, b]);
        assert_eq!(pair_id(a, b).get_version_num(), 5);
    }

    #[test]
    fn suspecting_is_idempotent_and_new_evidence_is_recorded() {
        given::<DuplicatePair>([])
            .when(suspect(95, &["phone", "name"]))
            .then(vec![suspected(95, &["phone", "name"])]);
        given::<DuplicatePair>([suspected(95, &["phone", "name"])])
            .when(suspect(95, &["phone", "name"]))
            .then(vec![]);
        given::<DuplicatePair>([suspected(95, &["phone", "name"])])
            .when(suspect(100, &["email", "phone", "name"]))
            .then(vec![suspected(100, &["email", "phone", "name"])]);
    }

    #[test]
    fn a_dismissed_pair_stays_dismissed() {
        let dismissed = DuplicateEvent::Dismissed(DuplicateDismissed {
            record_ids: ids(),
            reason: not_duplicates(),
            occurred_at: now(),
        });
        let state = given::<DuplicatePair>([suspected(95, &["phone", "name"])])
            .when(DuplicateCommand::Dismiss {
                record_ids: ids(),
                reason: not_duplicates(),
            })
            .then(vec![dismissed.clone()]);
        assert_eq!(state.status, Some(PairStatus::Dismissed));
        given::<DuplicatePair>([suspected(95, &["phone", "name"]), dismissed.clone()])
            .when(suspect(100, &["email"]))
            .then_error(DomainError::NotApplicable {
                rule: "duplicate_dismissed",
            });
        given::<DuplicatePair>([suspected(95, &["phone", "name"]), dismissed])
            .when(DuplicateCommand::Dismiss {
                record_ids: ids(),
                reason: not_duplicates(),
            })
            .then(vec![]);
    }

    #[test]
    fn only_a_suspected_pair_can_be_dismissed() {
        given::<DuplicatePair>([])
            .when(DuplicateCommand::Dismiss {
                record_ids: ids(),
                reason: not_duplicates(),
            })
            .then_error(DomainError::NotFound);
    }

    #[test]
    fn bad_commands_name_every_field() {
        let [low, high] = ids();
        given::<DuplicatePair>([])
            .when(DuplicateCommand::Suspect {
                record_ids: [high, low],
                kind: DuplicateKind::Lead,
                rules: vec!["name".into(), "email".into()],
                score: 101,
            })
            .then_invalid(&["record_ids", "rules", "score"]);
        given::<DuplicatePair>([])
            .when(suspect(90, &[]))
            .then_invalid(&["rules"]);
        given::<DuplicatePair>([])
            .when(suspect(90, &["shoe_size"]))
            .then_invalid(&["rules"]);
        given::<DuplicatePair>([suspected(95, &["phone", "name"])])
            .when(DuplicateCommand::Dismiss {
                record_ids: [low, Uuid::from_u128(3)],
                reason: Reason {
                    code: "Not A Code".into(),
                    text: String::new(),
                },
            })
            .then_invalid(&["record_ids", "reason.code"]);
    }
}
