//! The NATS wire format of events: CloudEvents 1.0 in binary content mode.
//! The relay writes it ([`cloudevents::message`]); projections read it back
//! ([`cloudevents::decode`]). Documented for consumers in `docs/events.md`.
pub mod cloudevents;
