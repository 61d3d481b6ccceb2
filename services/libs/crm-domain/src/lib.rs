//! The CRM's pure domain: identifiers, commands, events, state, `decide` and
//! `evolve`. No I/O and no async here, by design: everything the domain needs
//! from the outside world (other aggregates' facts, the clock) is passed in.
//!
//! Each aggregate implements [`Aggregate`]; its events implement
//! [`DomainEvent`] (stable names, schema versions, decoding with upcasting).
pub mod account;
pub mod activity;
mod aggregate;
pub mod campaign;
pub mod commerce;
pub mod common;
pub mod configuration;
pub mod contact;
pub mod conversion;
mod error;
pub mod lead;
pub mod opportunity;
pub mod pipeline;
pub mod records;
#[cfg(feature = "schemas")]
pub mod schemas;
pub mod targets;
mod tenant;
pub mod ticket;

#[cfg(test)]
mod testing;

pub use aggregate::{Aggregate, Context, DomainEvent, MAX_MERGE_LOSERS, Mergeable, UniqueKey};
pub use error::{DomainError, Violation, Violations};
pub use tenant::{InvalidTenantId, TenantId};
