//! The CRM's pure domain: identifiers, commands, events, state, `decide` and
//! `evolve`. No I/O and no async here, by design: everything the domain needs
//! from the outside world (other aggregates' facts, the clock) is passed in.
//!
//! For now it holds the identifiers every layer shares; the aggregates arrive
//! with the command API.
mod tenant;

pub use tenant::{InvalidTenantId, TenantId};
