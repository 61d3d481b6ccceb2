//! What every aggregate offers the command handler: a stream type, commands
//! decided purely against state, events folded into state, and the unique
//! values the state holds (so the handler can reserve them atomically).
use std::collections::BTreeSet;

use jiff::Timestamp;
use serde::Serialize;

use crate::error::DomainError;

/// Facts from outside the aggregate, valid at command time only.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    /// The handler's clock.
    pub now: Timestamp,
    /// Business time the caller gave, if any.
    pub occurred_at: Option<Timestamp>,
}

impl Context {
    pub fn at(now: Timestamp) -> Self {
        Self {
            now,
            occurred_at: None,
        }
    }

    /// The command's business time (given or now; never > 5 minutes ahead).
    pub fn occurred_at(&self) -> Result<Timestamp, DomainError> {
        crate::common::occurred_at(self.occurred_at, crate::common::Clock { now: self.now })
    }
}

/// A unique value: its kind (`email`, `tax_id`) and normalized form.
pub type UniqueKey = (&'static str, String);

pub trait Aggregate:
    Default + Clone + std::fmt::Debug + PartialEq + Serialize + serde::de::DeserializeOwned
{
    type Command;
    type Event: DomainEvent;

    /// The stream type in subjects and the log; stable forever.
    const STREAM_TYPE: &'static str;

    /// The state's serialized shape, for snapshots. Bump it whenever the state
    /// struct changes: older snapshots are then ignored and rebuilt from events.
    const SNAPSHOT_VERSION: u32 = 1;

    /// Whether a create event has been applied.
    fn exists(&self) -> bool;

    /// Whether the command creates the record. The handler may then decide it
    /// on empty state without reading the stream first: the append expects
    /// "no stream", and if the stream exists after all, it reads and decides
    /// again (which then refuses the create).
    fn creates(_command: &Self::Command) -> bool {
        false
    }

    /// The events a command produces, or why it is refused. Pure.
    fn decide(
        &self,
        command: Self::Command,
        context: Context,
    ) -> Result<Vec<Self::Event>, DomainError>;

    /// The state after one event. Total: never fails, never panics.
    fn evolve(self, event: &Self::Event) -> Self;

    /// Unique values this state holds (hard reservations).
    fn unique_keys(&self) -> BTreeSet<UniqueKey> {
        BTreeSet::new()
    }

    /// Whether the state holds a person's data (a contact, a lead, a person
    /// account): such state is never stored in the clear (its snapshots are
    /// sealed under the person's key).
    fn holds_personal_data(&self) -> bool {
        false
    }

    /// Folds events into a state.
    fn replay<'a>(self, events: impl IntoIterator<Item = &'a Self::Event>) -> Self
    where
        Self::Event: 'a,
    {
        events.into_iter().fold(self, Self::evolve)
    }
}

/// An event type with a stable name and a schema version.
pub trait DomainEvent: Serialize + Sized + Clone + std::fmt::Debug + PartialEq {
    /// Past-tense PascalCase, e.g. `ContactCreated`; stable forever.
    fn event_type(&self) -> &'static str;

    /// When it happened, in business time: every event carries one.
    fn occurred_at(&self) -> Timestamp;

    /// The payload's current schema version.
    fn schema_version(&self) -> u32 {
        1
    }

    /// Reads a stored payload of `event_type`, upcasting older schema
    /// versions. `Ok(None)` for an event type this aggregate does not know.
    fn decode<'de, D: serde::Deserializer<'de>>(
        event_type: &str,
        schema_version: u32,
        payload: D,
    ) -> Result<Option<Self>, D::Error>;
}

/// The most losers one merge takes (DOMAIN.md §2.11).
pub const MAX_MERGE_LOSERS: usize = 10;

/// The records of one merge, checked: the survivor and every loser usable
/// (by the aggregate's own rule), 1 to [`MAX_MERGE_LOSERS`] losers, distinct
/// and not the survivor.
pub struct MergeParties<'a, A> {
    survivor_id: uuid::Uuid,
    survivor: &'a A,
    losers: &'a [(uuid::Uuid, A)],
}

impl<'a, A> MergeParties<'a, A> {
    pub fn check(
        survivor_id: uuid::Uuid,
        survivor: &'a A,
        losers: &'a [(uuid::Uuid, A)],
        usable: impl Fn(&A) -> Result<(), DomainError>,
    ) -> Result<Self, DomainError> {
        usable(survivor)?;
        let mut v = crate::error::Violations::default();
        v.check(
            !losers.is_empty() && losers.len() <= MAX_MERGE_LOSERS,
            "loser_ids",
            "must name 1 to 10 records",
        );
        let mut ids = BTreeSet::new();
        v.check(
            losers
                .iter()
                .all(|(id, _)| *id != survivor_id && ids.insert(*id)),
            "loser_ids",
            "must be distinct and not the survivor",
        );
        v.into_result()?;
        for (_, loser) in losers {
            usable(loser)?;
        }
        Ok(Self {
            survivor_id,
            survivor,
            losers,
        })
    }

    /// The record a single-valued field comes from: the survivor unless a
    /// choice names one of the losers.
    pub fn pick(
        &self,
        field: &'static str,
        from: Option<uuid::Uuid>,
    ) -> Result<&'a A, DomainError> {
        match from {
            None => Ok(self.survivor),
            Some(id) if id == self.survivor_id => Ok(self.survivor),
            Some(id) => self
                .losers
                .iter()
                .find(|(loser, _)| *loser == id)
                .map(|(_, record)| record)
                .ok_or_else(|| {
                    DomainError::invalid(field, "must be the survivor or one of the losers")
                }),
        }
    }
}

/// An aggregate whose duplicates merge (DOMAIN.md §2.11): one append writes
/// the survivor's events and each loser's, and the losers' unique values move
/// to the survivor.
pub trait Mergeable: Aggregate {
    /// Which record each single-valued field comes from.
    type Choices;

    /// The survivor's events and each loser's. Pure.
    #[allow(clippy::type_complexity)]
    fn merge(
        survivor_id: uuid::Uuid,
        survivor: &Self,
        losers: &[(uuid::Uuid, Self)],
        choices: &Self::Choices,
        context: Context,
    ) -> Result<(Vec<Self::Event>, Vec<(uuid::Uuid, Vec<Self::Event>)>), DomainError>;
}
