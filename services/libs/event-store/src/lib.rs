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
pub use read::{EventStream, Filter, RecordedEvent};
pub use snapshot::Snapshot;
pub use store::{EventStore, StoreOptions};
pub use subscribe::Subscription;
pub use writer::WriterStats;

/// The PostgreSQL channel on which every append announces its last position.
pub const NOTIFY_CHANNEL: &str = "crm_events";
