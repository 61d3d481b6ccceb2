//! The query role: read-side gRPC services: the event log (`Subscribe`,
//! `ReadAll`, `ReadStream`) and the read-model queries (`SalesQueries`; more
//! as the projections land).
mod admin;
mod event_log;
mod sales;
mod service;

pub use admin::ProjectionsAdminService;
pub use event_log::EventLogService;
pub use sales::SalesService;
pub use service::ServiceQueriesService;
