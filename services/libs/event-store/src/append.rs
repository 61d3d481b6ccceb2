//! What an append asks for and what it returns, with the validation and the
//! request fingerprint that idempotency compares.
use crm_domain::TenantId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::AppendError;

/// Limits on one append request; larger requests are refused as invalid.
pub mod limits {
    /// Streams written atomically by one append.
    pub const MAX_STREAMS: usize = 100;
    /// Events in one append, over all its streams.
    pub const MAX_EVENTS: usize = 10_000;
    /// Serialized size of one event payload.
    pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;
    /// Length of an idempotency key.
    pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 200;
    /// Unique-value reservations claimed or released by one append.
    pub const MAX_RESERVATIONS: usize = 100;
    /// Length of a reservation's key hash.
    pub const MAX_KEY_HASH_LEN: usize = 64;
    /// Length of a stream type or event type name.
    pub const MAX_NAME_LEN: usize = 128;
}

/// The version a stream must be at for the append to happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream must not exist yet (same as `Exact(0)`).
    NoStream,
    /// The stream's last event has exactly this version (1-based).
    Exact(u64),
    /// The stream is only checked, as with `Exact`, and gets no event (a
    /// pin, see [`StreamAppend`]). The version is at least 1.
    Pinned(u64),
}

impl ExpectedVersion {
    pub(crate) fn describe(self) -> String {
        match self {
            Self::Any => "any".to_owned(),
            Self::NoStream | Self::Exact(0) => "no stream".to_owned(),
            Self::Exact(n) | Self::Pinned(n) => n.to_string(),
        }
    }
}

/// One event to append. `event_id` should be a UUIDv7 made by the caller, so
/// a retried request carries the same id.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    pub payload: serde_json::Value,
}

impl NewEvent {
    /// A new event with a fresh UUIDv7 id and schema version 1.
    pub fn new(event_type: impl Into<String>, payload: serde_json::Value) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version: 1,
            payload,
        }
    }
}

/// Events for one stream, checked against the stream's expected version.
///
/// A stream expected [`ExpectedVersion::Pinned`] has no events and is only
/// checked (a pin): an append decided on another record (e.g. a conversion
/// onto an existing account) names it at the version it read, so the append
/// fails with a version conflict if that record moved meanwhile. Every other
/// stream has events, and claims, releases and subject keys name those.
#[derive(Clone, Debug)]
pub struct StreamAppend {
    pub stream_type: String,
    pub stream_id: Uuid,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

/// Who caused the events and within which trace. Stored with every event.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub actor: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// Claims or releases a unique value for a stream, in the append's transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReservationAction {
    /// The value becomes the stream's; refused if another stream holds it.
    Claim,
    /// The stream gives the value up (no effect if it does not hold it).
    Release,
    /// The value passes from `from` (another stream of the same append, e.g.
    /// a merged record) to this stream; refused if a third stream holds it.
    Transfer { from: Uuid },
}

/// A unique value within a tenant, such as a contact's email. `key_hash` is
/// an HMAC of the normalized value made by the caller, so the store never
/// sees the value itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// What kind of value, e.g. `email`, `tax_id`.
    pub kind: String,
    pub key_hash: Vec<u8>,
    /// The stream that claims or releases it: one of the append's written
    /// streams (not a pin).
    pub stream_id: Uuid,
    pub action: ReservationAction,
}

/// A data subject's encryption key, written with an append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectKey {
    /// One of the append's written streams (not a pin).
    pub subject_id: Uuid,
    /// 32 random bytes.
    pub key: Vec<u8>,
}

/// One atomic append: every stream's events land, or none do.
#[derive(Clone, Debug)]
pub struct AppendEvents {
    pub tenant_id: TenantId,
    pub streams: Vec<StreamAppend>,
    /// The same key with the same request replays the first outcome and
    /// appends nothing, forever. Scoped to the tenant.
    pub idempotency_key: Option<String>,
    pub metadata: Metadata,
    /// Unique values claimed or released atomically with the events.
    pub reservations: Vec<Reservation>,
    /// Data subjects' keys stored atomically with the events (see
    /// [`crate::EventStore::subject_key`]): a new subject's key lands with its
    /// first events, or not at all.
    pub subject_keys: Vec<SubjectKey>,
    /// What a retry with the same idempotency key must match. `None`: a hash
    /// of the events' types and payloads. Command handlers pass a hash of the
    /// command instead, since a retried command may produce events that
    /// differ (e.g. in `occurred_at`).
    pub request_fingerprint: Option<[u8; 32]>,
}

/// What an append wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    /// Global position of the first and last event written (contiguous).
    pub first_position: u64,
    pub last_position: u64,
    pub streams: Vec<AppendedStream>,
    /// True when this is the stored outcome of an earlier request with the
    /// same idempotency key: nothing was appended this time.
    #[serde(skip)]
    pub replayed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendedStream {
    pub stream_id: Uuid,
    pub first_version: u64,
    pub last_version: u64,
}

/// An append checked and serialized by the calling task, ready for the writer.
pub(crate) struct PreparedAppend {
    pub request: AppendEvents,
    /// Each event's payload as JSON text, in request order.
    pub payloads: Vec<String>,
    pub metadata: String,
    /// Fingerprint of what the request asks for, compared on idempotent retry
    /// (all zeros for a request without an idempotency key).
    pub fingerprint: [u8; 32],
    pub n_events: usize,
    /// Whether a stream is pinned: the writer decides such appends under
    /// the lock, in batches of their own.
    pub pinned: bool,
}

fn invalid(field: impl Into<String>, rule: &'static str) -> AppendError {
    AppendError::Invalid {
        field: field.into(),
        rule,
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= limits::MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

impl PreparedAppend {
    /// Validates the request and serializes what the writer needs, off the
    /// writer's task.
    pub(crate) fn new(mut request: AppendEvents) -> Result<Self, AppendError> {
        if request.streams.is_empty() {
            return Err(invalid("streams", "must not be empty"));
        }
        if request.streams.len() > limits::MAX_STREAMS {
            return Err(invalid("streams", "too many streams in one append"));
        }
        if let Some(key) = &request.idempotency_key
            && (key.is_empty() || key.len() > limits::MAX_IDEMPOTENCY_KEY_LEN)
        {
            return Err(invalid(
                "idempotency_key",
                "must be 1 to 200 bytes when present",
            ));
        }
        let n_events: usize = request.streams.iter().map(|s| s.events.len()).sum();
        if n_events > limits::MAX_EVENTS {
            return Err(invalid("streams", "too many events in one append"));
        }
        // Only a keyed request is ever compared, so only it pays for hashing.
        let keyed = request.idempotency_key.is_some();
        let mut hasher = Sha256::new();
        let mut feed = |bytes: &[u8]| {
            if keyed {
                hasher.update((bytes.len() as u64).to_le_bytes());
                hasher.update(bytes);
            }
        };
        feed(request.tenant_id.as_str().as_bytes());
        let mut payloads = Vec::with_capacity(n_events);
        let mut seen = std::collections::HashSet::with_capacity(request.streams.len());
        for (i, stream) in request.streams.iter_mut().enumerate() {
            if !valid_name(&stream.stream_type) {
                return Err(invalid(
                    format!("streams[{i}].stream_type"),
                    "must be 1 to 128 of [A-Za-z0-9_.]",
                ));
            }
            if !seen.insert(stream.stream_id) {
                return Err(invalid(
                    format!("streams[{i}].stream_id"),
                    "appears twice in one append",
                ));
            }
            match stream.expected {
                ExpectedVersion::Pinned(n) if n == 0 || n > i64::MAX as u64 => {
                    return Err(invalid(
                        format!("streams[{i}].expected"),
                        "a pin's version must be 1 to 2^63-1",
                    ));
                }
                ExpectedVersion::Pinned(_) if !stream.events.is_empty() => {
                    return Err(invalid(
                        format!("streams[{i}].events"),
                        "must be empty for a pinned stream",
                    ));
                }
                ExpectedVersion::Pinned(_) => {}
                ExpectedVersion::Exact(n) if n > i64::MAX as u64 => {
                    return Err(invalid(format!("streams[{i}].expected"), "out of range"));
                }
                _ if stream.events.is_empty() => {
                    return Err(invalid(format!("streams[{i}].events"), "must not be empty"));
                }
                _ => {}
            }
            feed(stream.stream_type.as_bytes());
            feed(stream.stream_id.as_bytes());
            feed(stream.expected.describe().as_bytes());
            for (j, event) in stream.events.iter_mut().enumerate() {
                if !valid_name(&event.event_type) {
                    return Err(invalid(
                        format!("streams[{i}].events[{j}].event_type"),
                        "must be 1 to 128 of [A-Za-z0-9_.]",
                    ));
                }
                if event.schema_version == 0 || event.schema_version > i32::MAX as u32 {
                    return Err(invalid(
                        format!("streams[{i}].events[{j}].schema_version"),
                        "must be at least 1",
                    ));
                }
                if !event.payload.is_object() {
                    return Err(invalid(
                        format!("streams[{i}].events[{j}].payload"),
                        "must be a JSON object",
                    ));
                }
                // Straight into a byte buffer (`to_string`, via Display, would
                // pass every write through a `fmt::Formatter`).
                let payload = serde_json::to_string(&event.payload).map_err(|_| {
                    invalid(
                        format!("streams[{i}].events[{j}].payload"),
                        "must serialize to JSON",
                    )
                })?;
                if payload.len() > limits::MAX_PAYLOAD_BYTES {
                    return Err(invalid(
                        format!("streams[{i}].events[{j}].payload"),
                        "larger than 1 MiB",
                    ));
                }
                feed(event.event_type.as_bytes());
                feed(&event.schema_version.to_le_bytes());
                feed(payload.as_bytes());
                payloads.push(payload);
                // Only the text goes on. Freed here, on the caller's thread
                // and while still in cache, the tree costs a fraction of
                // freeing it on the writer's task after the commit.
                event.payload = serde_json::Value::Null;
            }
        }
        if n_events == 0 {
            return Err(invalid("streams", "must hold at least one event"));
        }
        // Streams that get events: the only ones values and keys may name.
        let written: std::collections::HashSet<Uuid> = request
            .streams
            .iter()
            .filter(|s| !s.events.is_empty())
            .map(|s| s.stream_id)
            .collect();
        let mut keyed = std::collections::HashSet::new();
        for (i, subject) in request.subject_keys.iter().enumerate() {
            if subject.key.len() != 32 {
                return Err(invalid(
                    format!("subject_keys[{i}].key"),
                    "must be 32 bytes",
                ));
            }
            if !written.contains(&subject.subject_id) {
                return Err(invalid(
                    format!("subject_keys[{i}].subject_id"),
                    "must be one of the append's written streams",
                ));
            }
            if !keyed.insert(subject.subject_id) {
                return Err(invalid(
                    format!("subject_keys[{i}].subject_id"),
                    "appears twice",
                ));
            }
        }
        if request.reservations.len() > limits::MAX_RESERVATIONS {
            return Err(invalid(
                "reservations",
                "too many reservations in one append",
            ));
        }
        let mut reserved = std::collections::HashSet::new();
        for (i, reservation) in request.reservations.iter().enumerate() {
            if !valid_name(&reservation.kind) {
                return Err(invalid(
                    format!("reservations[{i}].kind"),
                    "must be 1 to 128 of [A-Za-z0-9_.]",
                ));
            }
            if reservation.key_hash.is_empty()
                || reservation.key_hash.len() > limits::MAX_KEY_HASH_LEN
            {
                return Err(invalid(
                    format!("reservations[{i}].key_hash"),
                    "must be 1 to 64 bytes",
                ));
            }
            if !written.contains(&reservation.stream_id) {
                return Err(invalid(
                    format!("reservations[{i}].stream_id"),
                    "must be one of the append's written streams",
                ));
            }
            if !reserved.insert((&reservation.kind, &reservation.key_hash)) {
                return Err(invalid(
                    format!("reservations[{i}]"),
                    "the same value appears twice in one append",
                ));
            }
            feed(reservation.kind.as_bytes());
            feed(&reservation.key_hash);
            feed(reservation.stream_id.as_bytes());
            match reservation.action {
                ReservationAction::Claim => feed(b"claim"),
                ReservationAction::Release => feed(b"release"),
                ReservationAction::Transfer { from } => {
                    if !written.contains(&from) || from == reservation.stream_id {
                        return Err(invalid(
                            format!("reservations[{i}].from"),
                            "must be another of the append's written streams",
                        ));
                    }
                    feed(b"transfer");
                    feed(from.as_bytes());
                }
            }
        }
        let metadata = serde_json::to_string(&request.metadata)
            .map_err(|_| invalid("metadata", "must serialize to JSON"))?;
        let fingerprint = request
            .request_fingerprint
            .unwrap_or_else(|| hasher.finalize().into());
        let pinned = request
            .streams
            .iter()
            .any(|s| matches!(s.expected, ExpectedVersion::Pinned(_)));
        Ok(Self {
            request,
            payloads,
            metadata,
            fingerprint,
            n_events,
            pinned,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(payload: serde_json::Value) -> AppendEvents {
        AppendEvents {
            tenant_id: TenantId::parse("t1").unwrap(),
            streams: vec![StreamAppend {
                stream_type: "contact".into(),
                stream_id: Uuid::nil(),
                expected: ExpectedVersion::NoStream,
                events: vec![NewEvent::new("ContactCreated", payload)],
            }],
            idempotency_key: Some("k".into()),
            metadata: Metadata::default(),
            reservations: Vec::new(),
            subject_keys: Vec::new(),
            request_fingerprint: None,
        }
    }

    #[test]
    fn fingerprint_ignores_event_ids_and_metadata_but_not_payload() {
        let a = PreparedAppend::new(request(serde_json::json!({"name": "Ada"}))).unwrap();
        let mut again = request(serde_json::json!({"name": "Ada"}));
        again.metadata.correlation_id = Some("other".into());
        let b = PreparedAppend::new(again).unwrap();
        let c = PreparedAppend::new(request(serde_json::json!({"name": "Bob"}))).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_ne!(a.fingerprint, c.fingerprint);
    }

    #[test]
    fn rejects_malformed_requests_naming_the_field() {
        let field_of = |r: AppendEvents| match PreparedAppend::new(r) {
            Err(AppendError::Invalid { field, .. }) => field,
            other => panic!("expected invalid, got {:?}", other.map(|p| p.n_events)),
        };
        let mut r = request(serde_json::json!({}));
        r.streams.clear();
        assert_eq!(field_of(r), "streams");
        let r = request(serde_json::json!([1]));
        assert_eq!(field_of(r), "streams[0].events[0].payload");
        let mut r = request(serde_json::json!({}));
        r.streams[0].events[0].event_type = "bad type".into();
        assert_eq!(field_of(r), "streams[0].events[0].event_type");
        let mut r = request(serde_json::json!({}));
        r.streams.push(r.streams[0].clone());
        assert_eq!(field_of(r), "streams[1].stream_id");
        let mut r = request(serde_json::json!({}));
        r.idempotency_key = Some(String::new());
        assert_eq!(field_of(r), "idempotency_key");
        let mut r = request(serde_json::json!({}));
        r.streams[0].events.clear();
        assert_eq!(field_of(r), "streams[0].events");
        // A pin alone appends nothing; a pin has no events and a version.
        let mut r = request(serde_json::json!({}));
        r.streams[0].events.clear();
        r.streams[0].expected = ExpectedVersion::Pinned(1);
        assert_eq!(field_of(r), "streams");
        let mut r = request(serde_json::json!({}));
        r.streams[0].expected = ExpectedVersion::Pinned(1);
        assert_eq!(field_of(r), "streams[0].events");
        let mut r = request(serde_json::json!({}));
        r.streams[0].events.clear();
        r.streams[0].expected = ExpectedVersion::Pinned(0);
        assert_eq!(field_of(r), "streams[0].expected");
        let mut r = request(serde_json::json!({}));
        r.streams[0].events.clear();
        r.streams[0].expected = ExpectedVersion::Exact(1);
        assert_eq!(field_of(r), "streams[0].events");
    }
}
