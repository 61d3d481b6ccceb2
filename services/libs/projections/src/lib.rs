//! Projections: read models built from the event log, with an exactly-once
//! effect.
//!
//! Each projection consumes the relay's JetStream stream through its own
//! durable consumers, one per stream type it reads
//! (`projection_<name>__<stream type>`, filtered by subject; one unfiltered
//! `projection_<name>` when it reads every type), so nats-server never sends
//! it the events of other types. It applies a batch of events to its tables
//! and writes its position in the same PostgreSQL transaction, skips
//! positions it has already applied, then acks. Positions are dense, and the
//! store says which positions of its stream types lie in a range, so the
//! events it receives are applied in log order across its consumers, and a
//! position missing from what a consumer delivers (JetStream can lose
//! acknowledged messages on a crash) is refilled from the event store before
//! going on: at once when that consumer has delivered a later one, after a
//! wait when it may still be on its way. Events of other types move its
//! position without a transaction, learnt from the store now and then, and
//! at once when a query waits for a position ([`Applied`]). A poison event
//! (one the projection cannot apply) stops that projection loudly: the
//! status row says `failed` with the error and position, and nothing is
//! skipped.
//!
//! Writing a projection: apply each event through the [`Tx`] it is given.
//! Writes (`Tx::execute`) are queued and go to PostgreSQL as one pipeline
//! before the next read, at commit, or when `Tx::flush` is called, in the
//! order given, so reads always see the writes before them; call
//! `Tx::flush` before any effect outside the transaction (a command sent,
//! a message published), as `Sender::send` in the process managers does.
//! A plain `INSERT ... VALUES (...)` whose values hold only parameters,
//! casts and plain functions, and an UPDATE or DELETE by key, is gathered
//! with its neighbours into one multi-row statement, and repeated writes of
//! one row that one write stands for go out once (see `bulk.rs`); read
//! models must not have triggers, foreign keys, rules or views, which that
//! relies on.
//!
//! In a rebuild, whose tables start empty and are written by its worker
//! alone, the worker records the keys each table holds (`fresh.rs`): an
//! `INSERT ... ON CONFLICT (key) DO ...` of a key not there yet goes out as
//! a plain INSERT, without PostgreSQL's conflict check (~40 % of such an
//! insert's cost). It stops following a table on any write it cannot
//! follow, so a projection needs nothing for it; it gains most when a
//! table's rows are added only by upserts on one conflict target with bare
//! parameters as key values, and removed only by DELETEs by that key.
//! A keyed UPDATE (`WHERE` the conflict target's columns and nothing
//! else, every value a parameter) of a row whose plain INSERT is queued
//! in the same flush is folded into that insert: the row is written once.
//! To let an UPDATE fold, give the insert every column the UPDATE sets,
//! each from a parameter of its own (a NULL where the row starts empty).
//! New rows go by binary `COPY` at the head of the flush (no statement
//! before them naming the table) when the INSERT's every value is a
//! parameter alone, without a cast, each taken once: pass literals, dates
//! and fallbacks as parameters rather than writing them in the SQL.
//! A plain INSERT (no conflict clause) in a rebuild goes by COPY too, under
//! the same rule. A primary key that only guards live writes against an
//! event applied twice (an `ON CONFLICT ... DO NOTHING` of rows only ever
//! added) can be named in [`Projection::rebuild_keys`]: a rebuild drops it
//! while its tables fill and adds it at the end (a row written twice then
//! fails the rebuild), and `apply` writes that table without the conflict
//! clause when [`Tx::in_rebuild`] (see `customer_360::timeline`).
//! In a rebuild each event is decoded once for all read models
//! (`state::decoded`, `crm_event_store::Decoded`).
//!
//! Tables whose rows are rewritten over their life (a deal through its
//! stages, a ticket through its states) leave 30% of each page free
//! (`fillfactor = 70`): an update then stays on its page and, when it
//! changes no column an index keys on or filters by, touches no index (a
//! HOT update). Two rounds of updates of 154,000 rows took 1.55 s so
//! against 2.62 s with full pages. The gain is largest in a rebuild, whose
//! tables lack the indexes only queries use (named by
//! [`Projection::query_indexes`], created once the tables are full); tables
//! made before the setting get it at their next rebuild. Tables only
//! appended to fill their pages.
mod agent_workload;
mod analytics;
mod bulk;
mod customer_360;
mod engagement;
mod erp_links;
mod fresh;
mod pipeline_board;
mod rebuild;
mod runtime;
mod sales_funnel;
mod sales_performance;
mod scheduled_tasks;
mod service_metrics;
mod service_queue;
mod sla_clock;
mod state;

pub use agent_workload::{AgentWorkload, NAME as AGENT_WORKLOAD};
pub use analytics::{Analytics, NAME as ANALYTICS};
pub use customer_360::{Customer360, NAME as CUSTOMER_360, TIMELINE_KINDS};
pub use engagement::{Engagement, NAME as ENGAGEMENT};
pub use pipeline_board::{NAME as PIPELINE_BOARD, PipelineBoard};
pub use rebuild::{CHUNK as REBUILD_CHUNK, Progress, RebuildError, rebuild, rebuild_many};
pub use runtime::{
    Applied, ApplyError, ApplyFuture, Projection, ProjectionStatus, Projector, ProjectorOptions,
    STATUS_SCHEMA, StateCache, Tx, applied_position, ensure_schema, statuses,
};
pub use sales_funnel::{NAME as SALES_FUNNEL, SalesFunnel};
pub use sales_performance::{NAME as SALES_PERFORMANCE, SalesPerformance};
pub use scheduled_tasks::{NAME as SCHEDULED_TASKS, ScheduledTasks};
pub use service_metrics::{NAME as SERVICE_METRICS, ServiceMetrics};
pub use service_queue::{NAME as SERVICE_QUEUE, ServiceQueue, priority_rank};
pub use sla_clock::{NAME as SLA_CLOCK, SlaClock};
pub use state::decode;

/// Every read model (`crm projector NAME` picks by [`Projection::name`]).
pub fn all() -> Vec<std::sync::Arc<dyn Projection>> {
    vec![
        std::sync::Arc::new(PipelineBoard),
        std::sync::Arc::new(ServiceQueue),
        std::sync::Arc::new(ScheduledTasks),
        std::sync::Arc::new(SlaClock),
        std::sync::Arc::new(SalesFunnel),
        std::sync::Arc::new(SalesPerformance),
        std::sync::Arc::new(AgentWorkload),
        std::sync::Arc::new(ServiceMetrics),
        std::sync::Arc::new(Analytics),
        std::sync::Arc::new(Engagement),
        std::sync::Arc::new(Customer360),
    ]
}
