//! The query role: read-side gRPC services. Today the event log
//! (`Subscribe`, `ReadAll`, `ReadStream`); the read-model queries join as the
//! projections land.
mod event_log;

pub use event_log::EventLogService;
