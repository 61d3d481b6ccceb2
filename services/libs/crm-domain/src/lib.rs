//! The CRM's pure domain: identifiers, commands, events, state, `decide` and
//! `evolve`. No I/O and no async here, by design: everything the domain needs
//! from the outside world (other aggregates' facts, the clock) is passed in.
//!
//! Each aggregate implements [`Aggregate`]; its events implement
//! [`DomainEvent`] (stable names, schema versions, decoding with upcasting).
/// A closed set of names stored as snake_case text.
macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            pub fn name(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.name() == text)
            }
        }
    };
}

pub mod account;
pub mod activity;
mod aggregate;
pub mod campaign;
pub mod commerce;
pub mod commission;
pub mod common;
pub mod configuration;
pub mod contact;
pub mod conversion;
pub mod duplicates;
mod error;
pub mod lead;
pub mod opportunity;
pub mod pipeline;
pub mod quality;
pub mod records;
#[cfg(feature = "schemas")]
pub mod schemas;
pub mod sla;
pub mod targets;
mod tenant;
pub mod ticket;

#[cfg(test)]
mod testing;

pub use aggregate::{Aggregate, Context, DomainEvent, MAX_MERGE_LOSERS, Mergeable, UniqueKey};
pub use error::{DomainError, Violation, Violations};
pub use tenant::{InvalidTenantId, TenantId};
