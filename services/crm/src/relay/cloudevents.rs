//! The wire format: CloudEvents 1.0 in binary content mode over NATS headers.
//!
//! Every context attribute travels as a `ce-<attribute>` header; the event's
//! JSON payload is the message body. `Content-Type` repeats
//! `datacontenttype`, as SDKs that detect the content mode from it expect.
//! The mapping is documented for consumers in `docs/events.md`.
use std::fmt::Write as _;

use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use crm_event_store::{Metadata, RecordedEvent};

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
    PublishMessage::build()
        .headers(headers)
        .message_id(event.event_id.to_string())
        .payload(event.payload.as_str().to_owned().into())
}

/// The global position a published message carries, if it is one of ours.
pub fn position(headers: Option<&HeaderMap>) -> Option<u64> {
    headers?.get(header::POSITION)?.as_str().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_percent_encoded_where_the_binding_requires() {
        assert_eq!(encode_value("abc-1_2"), "abc-1_2");
        assert_eq!(encode_value("a b\"c%"), "a%20b%22c%25");
        assert_eq!(encode_value("é"), "%C3%A9");
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
