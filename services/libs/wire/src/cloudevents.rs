//! The wire format: CloudEvents 1.0 in binary content mode over NATS headers.
//!
//! Every context attribute travels as a `ce-<attribute>` header; the event's
//! JSON payload is the message body. `Content-Type` repeats
//! `datacontenttype`, as SDKs that detect the content mode from it expect.
//! The mapping is documented for consumers in `docs/events.md`.
use std::fmt::Write as _;

use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use crm_event_store::{JsonText, Metadata, RecordedEvent};

/// CloudEvents header names (binary mode: `ce-` + attribute name).
pub mod header {
    pub const SPECVERSION: &str = "ce-specversion";
    pub const ID: &str = "ce-id";
    pub const TYPE: &str = "ce-type";
    pub const SOURCE: &str = "ce-source";
    pub const SUBJECT: &str = "ce-subject";
    pub const TIME: &str = "ce-time";
    pub const DATACONTENTTYPE: &str = "ce-datacontenttype";
    /// The `$id` of the payload's JSON Schema under `schemas/`.
    pub const DATASCHEMA: &str = "ce-dataschema";
    /// Extensions (lowercase alphanumeric names, as CloudEvents requires).
    pub const TENANT: &str = "ce-tenantid";
    pub const STREAM_TYPE: &str = "ce-streamtype";
    pub const POSITION: &str = "ce-globalposition";
    pub const STREAM_VERSION: &str = "ce-streamversion";
    pub const SCHEMA_VERSION: &str = "ce-schemaversion";
    pub const ACTOR: &str = "ce-actorid";
    pub const CORRELATION: &str = "ce-correlationid";
    pub const CAUSATION: &str = "ce-causationid";
    /// The distributed-tracing extension's attribute.
    pub const TRACEPARENT: &str = "ce-traceparent";
    pub const CONTENT_TYPE: &str = "Content-Type";
}

pub const SPEC_VERSION: &str = "1.0";
pub const CONTENT_TYPE: &str = "application/json";

/// Why an event cannot be put on the wire. Stored events are validated at
/// append, so this means a corrupt row: the relay stops on it, loudly.
#[derive(Debug, thiserror::Error)]
#[error("event at position {position} cannot be published: {reason}")]
pub struct WireError {
    pub position: u64,
    pub reason: String,
}

/// `<prefix>.<tenant>.<stream_type>.<stream_id>.<event_type>`.
pub fn subject(prefix: &str, event: &RecordedEvent) -> Result<String, WireError> {
    for (name, token) in [
        ("tenant_id", event.tenant_id.as_str()),
        ("stream_type", event.stream_type.as_str()),
        ("event_type", event.event_type.as_str()),
    ] {
        if !is_subject_token(token) {
            return Err(WireError {
                position: event.global_position,
                reason: format!("{name} {token:?} is not a NATS subject token"),
            });
        }
    }
    Ok(format!(
        "{prefix}.{}.{}.{}.{}",
        event.tenant_id, event.stream_type, event.stream_id, event.event_type
    ))
}

/// The stream type and event type a subject built by [`subject`] names,
/// read from its last tokens (the prefix may hold dots); `None` for a
/// subject of another shape. Lets a consumer pass over events it does not
/// handle without decoding them.
pub fn kind(subject: &str) -> Option<(&str, &str)> {
    let mut tokens = subject.rsplitn(5, '.');
    let event_type = tokens.next()?;
    let _stream_id = tokens.next()?;
    let stream_type = tokens.next()?;
    let _tenant = tokens.next()?;
    let _prefix = tokens.next()?;
    Some((stream_type, event_type))
}

fn is_subject_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `ce-type`: reverse-DNS style, versioned with the contract.
pub fn event_type(event_type: &str) -> String {
    format!("crm.v1.{event_type}")
}

/// `ce-source`: the tenant's collection of this kind of record.
pub fn source(tenant_id: &str, stream_type: &str) -> String {
    format!("/crm/tenants/{tenant_id}/{stream_type}")
}

/// Percent-encodes what the binding says must not appear raw in a header
/// value: space, `"`, `%` and anything outside printable ASCII.
fn encode_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if (0x21..=0x7e).contains(&byte) && byte != b'"' && byte != b'%' {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The JetStream publish of `event`: CloudEvents headers, `Nats-Msg-Id` =
/// event id, JSON body.
pub fn message(event: &RecordedEvent) -> PublishMessage {
    PublishMessage::build()
        .headers(headers(event))
        .message_id(event.event_id.to_string())
        .payload(event.payload.as_str().to_owned().into())
}

/// The CloudEvents headers of `event`.
pub fn headers(event: &RecordedEvent) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::SPECVERSION, SPEC_VERSION);
    headers.insert(header::ID, event.event_id.to_string().as_str());
    headers.insert(header::TYPE, event_type(&event.event_type).as_str());
    headers.insert(
        header::SOURCE,
        source(&event.tenant_id, &event.stream_type).as_str(),
    );
    headers.insert(header::SUBJECT, event.stream_id.to_string().as_str());
    headers.insert(
        header::TIME,
        jiff::Timestamp::try_from(event.recorded_at)
            .map(|t| t.to_string())
            .unwrap_or_default()
            .as_str(),
    );
    headers.insert(header::DATACONTENTTYPE, CONTENT_TYPE);
    headers.insert(header::CONTENT_TYPE, CONTENT_TYPE);
    headers.insert(
        header::DATASCHEMA,
        format!(
            "https://crm.example/schemas/{}/{}.v{}.json",
            event.stream_type, event.event_type, event.schema_version
        )
        .as_str(),
    );
    headers.insert(header::TENANT, event.tenant_id.as_str());
    headers.insert(header::STREAM_TYPE, event.stream_type.as_str());
    headers.insert(header::POSITION, event.global_position.to_string().as_str());
    headers.insert(
        header::STREAM_VERSION,
        event.stream_version.to_string().as_str(),
    );
    headers.insert(
        header::SCHEMA_VERSION,
        event.schema_version.to_string().as_str(),
    );
    // Metadata was written by the store from a typed `Metadata`; if a row
    // holds something else, the event still goes out, without these.
    if let Ok(metadata) = event.metadata.parse::<Metadata>() {
        headers.insert(header::ACTOR, encode_value(&metadata.actor).as_str());
        if let Some(id) = &metadata.correlation_id {
            headers.insert(header::CORRELATION, encode_value(id).as_str());
        }
        if let Some(id) = &metadata.causation_id {
            headers.insert(header::CAUSATION, encode_value(id).as_str());
        }
        if let Some(traceparent) = &metadata.traceparent {
            headers.insert(header::TRACEPARENT, encode_value(traceparent).as_str());
        }
    }
    headers
}

/// Undoes [`encode_value`].
fn decode_value(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        if let Some(byte) = escaped {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads a published message back into the stored event it came from. The
/// metadata is rebuilt from the headers (actor, correlation, causation,
/// traceparent); roles are not on the wire.
pub fn decode(headers: Option<&HeaderMap>, payload: &[u8]) -> Result<RecordedEvent, WireError> {
    let position = position(headers).ok_or_else(|| WireError {
        position: 0,
        reason: format!("no {} header", header::POSITION),
    })?;
    let missing = |name: &str| WireError {
        position,
        reason: format!("missing or malformed {name}"),
    };
    let headers = headers.ok_or_else(|| missing("headers"))?;
    let text = |name: &'static str| {
        headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .ok_or_else(|| missing(name))
    };
    let number = |name: &'static str| text(name)?.parse::<u64>().map_err(|_| missing(name));
    let event_type = text(header::TYPE)?;
    let event_type = event_type
        .strip_prefix("crm.v1.")
        .ok_or_else(|| missing(header::TYPE))?
        .to_owned();
    let recorded_at = text(header::TIME)?
        .parse::<jiff::Timestamp>()
        .map_err(|_| missing(header::TIME))?;
    let optional = |name: &'static str| headers.get(name).map(|v| decode_value(v.as_str()));
    let metadata = Metadata {
        actor: optional(header::ACTOR).unwrap_or_default(),
        correlation_id: optional(header::CORRELATION),
        causation_id: optional(header::CAUSATION),
        traceparent: optional(header::TRACEPARENT),
        ..Metadata::default()
    };
    let payload = std::str::from_utf8(payload).map_err(|_| missing("UTF-8 body"))?;
    Ok(RecordedEvent {
        global_position: position,
        event_id: text(header::ID)?.parse().map_err(|_| missing(header::ID))?,
        tenant_id: text(header::TENANT)?,
        stream_type: text(header::STREAM_TYPE)?,
        stream_id: text(header::SUBJECT)?
            .parse()
            .map_err(|_| missing(header::SUBJECT))?,
        stream_version: number(header::STREAM_VERSION)?,
        event_type,
        schema_version: u32::try_from(number(header::SCHEMA_VERSION)?)
            .map_err(|_| missing(header::SCHEMA_VERSION))?,
        payload: JsonText(payload.to_owned()),
        metadata: JsonText(serde_json::to_string(&metadata).map_err(|_| missing("metadata"))?),
        recorded_at: recorded_at.into(),
        decoded: Default::default(),
    })
}

/// The global position a published message carries, if it is one of ours.
pub fn position(headers: Option<&HeaderMap>) -> Option<u64> {
    headers?.get(header::POSITION)?.as_str().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subject_names_its_stream_type_and_event_type() {
        let id = uuid::Uuid::now_v7();
        assert_eq!(
            kind(&format!("crm.test.events.acme.contact.{id}.ContactCreated")),
            Some(("contact", "ContactCreated"))
        );
        assert_eq!(kind("events.acme.contact.ContactCreated"), None);
    }

    #[test]
    fn header_values_are_percent_encoded_where_the_binding_requires() {
        assert_eq!(encode_value("abc-1_2"), "abc-1_2");
        assert_eq!(encode_value("a b\"c%"), "a%20b%22c%25");
        assert_eq!(encode_value("é"), "%C3%A9");
    }

    #[test]
    fn a_message_decodes_back_into_its_event() {
        let event = RecordedEvent {
            global_position: 42,
            event_id: uuid::Uuid::now_v7(),
            tenant_id: "acme".into(),
            stream_type: "contact".into(),
            stream_id: uuid::Uuid::now_v7(),
            stream_version: 3,
            event_type: "ContactCreated".into(),
            schema_version: 2,
            payload: JsonText(r#"{"a":1}"#.into()),
            metadata: JsonText(
                serde_json::to_string(&Metadata {
                    actor: "user:ada lovelace%".into(),
                    correlation_id: Some("c 1".into()),
                    ..Metadata::default()
                })
                .unwrap_or_default(),
            ),
            recorded_at: std::time::SystemTime::UNIX_EPOCH
                + std::time::Duration::from_micros(1_700_000_000_123_456),
            decoded: Default::default(),
        };
        let headers = headers(&event);
        let decoded = decode(Some(&headers), event.payload.as_str().as_bytes()).expect("decodes");
        assert_eq!(
            decoded.metadata.parse::<Metadata>().ok().map(|m| m.actor),
            Some("user:ada lovelace%".into())
        );
        assert_eq!(
            RecordedEvent {
                metadata: event.metadata.clone(),
                ..decoded
            },
            event
        );
        assert!(decode(None, b"{}").is_err());
    }

    #[test]
    fn subject_tokens_refuse_separators_and_wildcards() {
        assert!(is_subject_token("contact"));
        assert!(is_subject_token("ContactCreated"));
        assert!(is_subject_token("tenant-1_a"));
        for bad in ["", "a.b", "a b", "*", ">", "a*"] {
            assert!(!is_subject_token(bad), "{bad:?}");
        }
    }
}
