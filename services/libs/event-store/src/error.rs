//! Error types of the store, one per operation family, as values the edge maps
//! to gRPC statuses.
use uuid::Uuid;

/// Why an append did not happen. Nothing was stored for any of these.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The request itself is malformed: `field` names the offending part.
    #[error("invalid append request: {field} {rule}")]
    Invalid { field: String, rule: &'static str },
    /// A stream was not at the expected version. `current` is 0 when the stream
    /// does not exist.
    #[error("stream {stream_id} is at version {current}, expected {expected}")]
    VersionConflict {
        stream_id: Uuid,
        expected: String,
        current: u64,
    },
    /// The stream exists with another stream type.
    #[error("stream {stream_id} is a {actual} stream")]
    WrongStreamType { stream_id: Uuid, actual: String },
    /// A unique value is held by another stream of the tenant.
    #[error("the {kind} is already held by stream {holder}")]
    AlreadyReserved { kind: String, holder: Uuid },
    /// The idempotency key was used before for a different request.
    #[error("idempotency key {key:?} was already used for a different request")]
    IdempotencyKeyReused { key: String },
    /// The store is shutting down and takes no more appends.
    #[error("the event store is shutting down")]
    ShuttingDown,
    /// The database could not be reached or failed. With `outcome_unknown` the
    /// append may have committed: retry with the same idempotency key.
    #[error("event store unavailable (outcome unknown: {outcome_unknown}): {message}")]
    Unavailable {
        message: String,
        outcome_unknown: bool,
    },
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("invalid read request: {field} {rule}")]
    Invalid {
        field: &'static str,
        rule: &'static str,
    },
    #[error("database error: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("malformed stored row: {0}")]
    Corrupt(String),
}

/// Why the store could not start or migrate.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("could not build the connection pool: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
    #[error(
        "migration {version} ({name}) was edited after it was applied: checksum {applied} in the database, {current} in the code"
    )]
    MigrationEdited {
        version: i32,
        name: String,
        applied: String,
        current: String,
    },
}
