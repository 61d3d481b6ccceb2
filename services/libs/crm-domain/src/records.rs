//! What every main record shares (DOMAIN.md §2.11): an owner and team, tags,
//! and shares with other users. Each main aggregate embeds a [`RecordMeta`]
//! and forwards [`CommonCommand`]s to it, so the rules are written once.
use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::common::{Lifecycle, LifecycleChanged, Reason, is_code, text_ok};
use crate::error::{DomainError, Violations};

pub const MAX_TAGS: usize = 50;
/// Users and teams one record is shared with at most.
pub const MAX_SHARES: usize = 200;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommonCommand {
    /// `method`: `manual`, `round_robin` or `rule`.
    AssignOwner {
        owner: String,
        team: Option<String>,
        method: String,
    },
    ChangeTags {
        add: Vec<String>,
        remove: Vec<String>,
    },
    /// `level`: `read` or `edit`.
    Share {
        grantee: String,
        level: String,
        expires_at: Option<Timestamp>,
    },
    RevokeShare {
        grantee: String,
    },
    /// Archived records refuse everything but restore (no hard delete).
    Archive(Reason),
    Restore(Reason),
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerChanged {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<String>,
    pub new: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    pub method: String,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagsChanged {
    #[serde(default)]
    pub added: Vec<String>,
    #[serde(default)]
    pub removed: Vec<String>,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordShared {
    pub grantee: String,
    pub level: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordShareRevoked {
    pub grantee: String,
    pub occurred_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum CommonEvent {
    OwnerChanged(OwnerChanged),
    TagsChanged(TagsChanged),
    Shared(RecordShared),
    ShareRevoked(RecordShareRevoked),
    Archived(LifecycleChanged),
    Restored(LifecycleChanged),
}

impl CommonEvent {
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::OwnerChanged(_) => "OwnerChanged",
            Self::TagsChanged(_) => "TagsChanged",
            Self::Shared(_) => "RecordShared",
            Self::ShareRevoked(_) => "RecordShareRevoked",
            Self::Archived(_) => "RecordArchived",
            Self::Restored(_) => "RecordRestored",
        }
    }

    /// When it happened in business time.
    pub fn occurred_at(&self) -> jiff::Timestamp {
        match self {
            Self::OwnerChanged(e) => e.occurred_at,
            Self::TagsChanged(e) => e.occurred_at,
            Self::Shared(e) => e.occurred_at,
            Self::ShareRevoked(e) => e.occurred_at,
            Self::Archived(e) => e.occurred_at,
            Self::Restored(e) => e.occurred_at,
        }
    }

    /// Reads one of the shared event types; `None` for any other type.
    pub fn decode<'de, D: serde::Deserializer<'de>>(
        event_type: &str,
        payload: D,
    ) -> Result<Option<Self>, D::Error> {
        Ok(Some(match event_type {
            "OwnerChanged" => Self::OwnerChanged(Deserialize::deserialize(payload)?),
            "TagsChanged" => Self::TagsChanged(Deserialize::deserialize(payload)?),
            "RecordShared" => Self::Shared(Deserialize::deserialize(payload)?),
            "RecordShareRevoked" => Self::ShareRevoked(Deserialize::deserialize(payload)?),
            "RecordArchived" => Self::Archived(Deserialize::deserialize(payload)?),
            "RecordRestored" => Self::Restored(Deserialize::deserialize(payload)?),
            _ => return Ok(None),
        }))
    }
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub level: String,
    pub expires_at: Option<Timestamp>,
}

/// Owner, team, tags and shares of one record.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordMeta {
    pub owner: Option<String>,
    pub team: Option<String>,
    pub tags: BTreeSet<String>,
    pub shares: BTreeMap<String, Share>,
    #[serde(default)]
    pub lifecycle: Lifecycle,
}

impl RecordMeta {
    /// Archived records refuse every command but restore.
    pub fn refuse_if_archived(&self, restoring: bool) -> Result<(), DomainError> {
        if self.lifecycle == Lifecycle::Archived && !restoring {
            return Err(DomainError::RecordArchived);
        }
        Ok(())
    }

    pub fn decide(
        &self,
        command: CommonCommand,
        occurred_at: Timestamp,
    ) -> Result<Vec<CommonEvent>, DomainError> {
        match command {
            CommonCommand::AssignOwner {
                owner,
                team,
                method,
            } => {
                let mut v = Violations::default();
                v.check(
                    text_ok(&owner, 200, false),
                    "owner",
                    "must be 1 to 200 characters",
                );
                v.check(
                    team.as_deref().is_none_or(|t| text_ok(t, 200, false)),
                    "team",
                    "must be 1 to 200 characters",
                );
                v.check(
                    ["manual", "round_robin", "rule"].contains(&method.as_str()),
                    "method",
                    "must be manual, round_robin or rule",
                );
                v.into_result()?;
                if self.owner.as_deref() == Some(owner.as_str()) && self.team == team {
                    return Ok(vec![]);
                }
                Ok(vec![CommonEvent::OwnerChanged(OwnerChanged {
                    old: self.owner.clone(),
                    new: owner,
                    team,
                    method,
                    occurred_at,
                })])
            }
            CommonCommand::ChangeTags { add, remove } => {
                let mut v = Violations::default();
                v.check(add.len() <= MAX_TAGS, "add", "must have at most 50 tags");
                v.check(
                    remove.len() <= MAX_TAGS,
                    "remove",
                    "must have at most 50 tags",
                );
                v.into_result()?;
                let mut v = Violations::default();
                for (field, tags) in [("add", &add), ("remove", &remove)] {
                    for (i, tag) in tags.iter().enumerate() {
                        v.check(
                            is_code(tag, 64),
                            format!("{field}[{i}]"),
                            "must be a code of [a-z0-9_]",
                        );
                    }
                }
                let added: BTreeSet<String> =
                    add.into_iter().filter(|t| !self.tags.contains(t)).collect();
                let removed: BTreeSet<String> = remove
                    .into_iter()
                    .filter(|t| self.tags.contains(t) && !added.contains(t))
                    .collect();
                v.check(
                    self.tags.len() + added.len() - removed.len() <= MAX_TAGS,
                    "add",
                    "a record has at most 50 tags",
                );
                v.into_result()?;
                if added.is_empty() && removed.is_empty() {
                    return Ok(vec![]);
                }
                Ok(vec![CommonEvent::TagsChanged(TagsChanged {
                    added: added.into_iter().collect(),
                    removed: removed.into_iter().collect(),
                    occurred_at,
                })])
            }
            CommonCommand::Share {
                grantee,
                level,
                expires_at,
            } => {
                let mut v = Violations::default();
                v.check(
                    text_ok(&grantee, 200, false),
                    "grantee",
                    "must be 1 to 200 characters",
                );
                v.check(
                    level == "read" || level == "edit",
                    "level",
                    "must be read or edit",
                );
                v.check(
                    expires_at.is_none_or(|at| at > occurred_at),
                    "expires_at",
                    "must be in the future",
                );
                v.check(
                    self.owner.as_deref() != Some(grantee.as_str()),
                    "grantee",
                    "is the owner already",
                );
                v.check(
                    self.shares.len() < MAX_SHARES || self.shares.contains_key(&grantee),
                    "grantee",
                    "a record is shared with at most 200 grantees",
                );
                v.into_result()?;
                if self.shares.get(&grantee)
                    == Some(&Share {
                        level: level.clone(),
                        expires_at,
                    })
                {
                    return Ok(vec![]);
                }
                Ok(vec![CommonEvent::Shared(RecordShared {
                    grantee,
                    level,
                    expires_at,
                    occurred_at,
                })])
            }
            CommonCommand::RevokeShare { grantee } => {
                if !text_ok(&grantee, 200, false) {
                    return Err(DomainError::invalid(
                        "grantee",
                        "must be 1 to 200 characters",
                    ));
                }
                if !self.shares.contains_key(&grantee) {
                    return Ok(vec![]);
                }
                Ok(vec![CommonEvent::ShareRevoked(RecordShareRevoked {
                    grantee,
                    occurred_at,
                })])
            }
            CommonCommand::Archive(reason) => {
                self.refuse_if_archived(false)?;
                Ok(vec![CommonEvent::Archived(
                    self.lifecycle.archive(reason, occurred_at)?,
                )])
            }
            CommonCommand::Restore(reason) => Ok(vec![CommonEvent::Restored(
                self.lifecycle.restore(reason, occurred_at)?,
            )]),
        }
    }

    pub fn evolve(&mut self, event: &CommonEvent) {
        match event {
            CommonEvent::OwnerChanged(changed) => {
                self.owner = Some(changed.new.clone());
                self.team = changed.team.clone();
            }
            CommonEvent::TagsChanged(changed) => {
                self.tags.extend(changed.added.iter().cloned());
                for tag in &changed.removed {
                    self.tags.remove(tag);
                }
            }
            CommonEvent::Shared(shared) => {
                self.shares.insert(
                    shared.grantee.clone(),
                    Share {
                        level: shared.level.clone(),
                        expires_at: shared.expires_at,
                    },
                );
            }
            CommonEvent::ShareRevoked(revoked) => {
                self.shares.remove(&revoked.grantee);
            }
            CommonEvent::Archived(_) => self.lifecycle = Lifecycle::Archived,
            CommonEvent::Restored(_) => self.lifecycle = Lifecycle::Active,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::now;

    #[test]
    fn owners_tags_and_shares_change_only_when_they_really_change() {
        let mut meta = RecordMeta::default();
        let assign = CommonCommand::AssignOwner {
            owner: "user:rep".into(),
            team: Some("team:emea".into()),
            method: "manual".into(),
        };
        let events = meta.decide(assign.clone(), now()).unwrap();
        assert!(matches!(&events[0], CommonEvent::OwnerChanged(c) if c.old.is_none()));
        meta.evolve(&events[0]);
        assert!(meta.decide(assign, now()).unwrap().is_empty());

        let tags = meta
            .decide(
                CommonCommand::ChangeTags {
                    add: vec!["vip".into(), "vip".into()],
                    remove: vec!["cold".into()],
                },
                now(),
            )
            .unwrap();
        assert_eq!(
            tags,
            vec![CommonEvent::TagsChanged(TagsChanged {
                added: vec!["vip".into()],
                removed: vec![],
                occurred_at: now()
            })]
        );
        meta.evolve(&tags[0]);
        assert!(matches!(
            meta.decide(
                CommonCommand::ChangeTags {
                    add: vec!["Not A Code".into()],
                    remove: vec![]
                },
                now()
            ),
            Err(DomainError::Invalid(_))
        ));

        assert!(matches!(
            meta.decide(
                CommonCommand::Share {
                    grantee: "user:rep".into(),
                    level: "read".into(),
                    expires_at: None
                },
                now()
            ),
            Err(DomainError::Invalid(_))
        ));
        let shared = meta
            .decide(
                CommonCommand::Share {
                    grantee: "user:mgr".into(),
                    level: "edit".into(),
                    expires_at: None,
                },
                now(),
            )
            .unwrap();
        meta.evolve(&shared[0]);
        assert!(
            meta.decide(
                CommonCommand::Share {
                    grantee: "user:mgr".into(),
                    level: "edit".into(),
                    expires_at: None
                },
                now()
            )
            .unwrap()
            .is_empty()
        );
        let revoked = meta
            .decide(
                CommonCommand::RevokeShare {
                    grantee: "user:mgr".into(),
                },
                now(),
            )
            .unwrap();
        meta.evolve(&revoked[0]);
        assert!(meta.shares.is_empty());
        assert!(
            meta.decide(
                CommonCommand::RevokeShare {
                    grantee: "user:mgr".into()
                },
                now()
            )
            .unwrap()
            .is_empty()
        );
    }
}
