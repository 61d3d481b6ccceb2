//! Snapshots: the latest folded state of a long stream, with the version it
//! covers, so loading reads the snapshot plus the newer events only.
use uuid::Uuid;

use crate::JsonText;

/// A stored snapshot. `schema_version` is the state's format: a snapshot with
/// an older format than the code's is ignored and rebuilt from events.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub stream_type: String,
    pub stream_id: Uuid,
    pub version: u64,
    pub schema_version: u32,
    pub state: JsonText,
}

pub(crate) const SAVE: &str = "INSERT INTO snapshots \
       (tenant_id, stream_id, stream_type, version, schema_version, state) \
     VALUES ($1, $2, $3, $4, $5, $6::text::jsonb) \
     ON CONFLICT (tenant_id, stream_id) DO UPDATE \
       SET version = EXCLUDED.version, schema_version = EXCLUDED.schema_version, \
           state = EXCLUDED.state, taken_at = now() \
     WHERE snapshots.version <= EXCLUDED.version";

/// [`SAVE`] for a data subject's (sealed) snapshot: only while the subject's
/// key exists, whose row it locks, so an erasure (which deletes the key, then
/// the snapshots) either waits for it and deletes it, or went first and
/// leaves nothing to save.
pub(crate) const SAVE_SUBJECT: &str = "WITH k AS ( \
       SELECT 1 FROM subject_keys WHERE tenant_id = $1 AND subject_id = $2 FOR KEY SHARE) \
     INSERT INTO snapshots \
       (tenant_id, stream_id, stream_type, version, schema_version, state) \
     SELECT $1, $2, $3, $4, $5, $6::text::jsonb FROM k \
     ON CONFLICT (tenant_id, stream_id) DO UPDATE \
       SET version = EXCLUDED.version, schema_version = EXCLUDED.schema_version, \
           state = EXCLUDED.state, taken_at = now() \
     WHERE snapshots.version <= EXCLUDED.version";

pub(crate) const LOAD: &str = "SELECT stream_type, version, schema_version, state \
     FROM snapshots WHERE tenant_id = $1 AND stream_id = $2";
