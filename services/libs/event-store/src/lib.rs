//! The event store: the only code that touches the `events` table.
//!
//! Positions are dense and commit-ordered: every append transaction takes the
//! row lock on `log_head`, assigns the next positions and commits before the
//! next one can start, so a reader that has seen position N has seen every
//! position below it. Appends from concurrent callers are batched by one writer
//! task into few transactions (group commit), yet each caller still gets its
//! own outcome: success, version conflict, or idempotent replay.
mod append;
mod error;
mod json;
mod migrate;
mod read;
mod snapshot;
mod store;
mod subscribe;
mod writer;

pub use append::{
    AppendEvents, Appended, AppendedStream, ExpectedVersion, Metadata, NewEvent, Reservation,
    ReservationAction, StreamAppend, SubjectKey, limits,
};
pub use error::{AppendError, ReadError, StoreError};
pub use json::JsonText;
pub use migrate::{MIGRATIONS, Migration, migrate, migrations_fingerprint};
pub use read::{Decoded, DecodedAs, EventStream, Filter, RecordedEvent, decode as decode_row};
pub use snapshot::Snapshot;
pub use store::{EventStore, READ_STREAM, StoreOptions};
pub use subscribe::Subscription;
pub use writer::WriterStats;

/// A stable 63-bit PostgreSQL advisory-lock key for a name (FNV-1a), e.g.
/// `crm-relay:<stream>`: roles that must run once per name (the relay's
/// leader, a projection's rebuild) lock it; distinct names never collide in
/// practice, so they never block each other.
pub fn advisory_lock_key(name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::try_from(hash >> 1).unwrap_or(0)
}

/// The PostgreSQL channel on which every append announces its last position.
pub const NOTIFY_CHANNEL: &str = "crm_events";
