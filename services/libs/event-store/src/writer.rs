//! The writer: one task per store that turns queued appends into few
//! transactions (group commit in the application).
//!
//! Each batch is one transaction that holds the row lock on `log_head` from
//! before it reads anything until it commits, so transactions commit in
//! position order across every process writing the log, and positions are
//! dense. Within the batch each append is decided on its own, so each caller
//! gets its own conflict, replay or success.
//!
//! **Fast path: one statement.** When every append states the exact version
//! of its streams (or "no stream") and no key repeats within the batch, the
//! writer already knows every stream version it will write. It sends one
//! guarded write in autocommit: the statement locks `log_head`, checks that
//! each stream is at the version the batch assumes and that no idempotency key
//! exists yet, writes at head + offset, and commits. If the guard fails,
//! nothing is written and the batch takes the careful path. If the statement
//! had to wait for the lock (another process was appending), its guard read
//! an older snapshot; it can then only pass wrongly for a stream or key that
//! the other process just wrote, and the unique constraints on
//! (tenant, stream, version) and on keys reject the write, so the batch is
//! retried on the careful path. Versions are dense, so no stale guard can let
//! a wrong write through.
//!
//! **Careful path, two round trips.** BEGIN, the lock and reads of every
//! touched stream's version and every key; then the writer decides each append
//! in queue order (conflict, replay, key reused, accepted), and sends the same
//! write statement (whose guard then holds) with COMMIT.
//!
//! If the database rejects a batch, it rolled back as a whole, so every append
//! in it is retried alone, which attributes the failure to the one that caused
//! it. If the connection fails during commit, the outcome is unknown and is
//! reported as such (a retry with the same idempotency key is safe).
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::types::{ToSql, Type};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span};
use uuid::Uuid;

use crate::append::{
    Appended, AppendedStream, ExpectedVersion, PreparedAppend, Reservation, ReservationAction,
};
use crate::error::AppendError;

pub(crate) struct Job {
    pub append: PreparedAppend,
    pub reply: oneshot::Sender<Result<Appended, AppendError>>,
}

pub(crate) struct WriterConfig {
    pub max_batch_appends: usize,
    pub max_batch_events: usize,
    pub pause_before_commit: Option<Duration>,
    pub stats: Arc<Counters>,
}

/// Running totals of the writer's work, for metrics and benchmarks.
#[derive(Default)]
pub(crate) struct Counters {
    pub batches: AtomicU64,
    pub appends: AtomicU64,
    pub events: AtomicU64,
}

/// A snapshot of the writer's totals since the store started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Transactions the writer ran.
    pub batches: u64,
    /// Append requests it handled (committed, refused or replayed).
    pub appends: u64,
    /// Events it committed.
    pub events: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> WriterStats {
        WriterStats {
            batches: self.batches.load(Ordering::Relaxed),
            appends: self.appends.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
        }
    }
}

const LOCK_HEAD: &str = "SELECT position FROM log_head WHERE id = 1 FOR UPDATE";

/// The last event of each stream: one backward probe of the
/// (tenant_id, stream_id, stream_version) index per stream.
const SELECT_STREAMS: &str = "SELECT k.tenant_id, k.stream_id, e.stream_type, e.stream_version \
     FROM unnest($1::text[], $2::uuid[]) AS k(tenant_id, stream_id) \
     CROSS JOIN LATERAL ( \
       SELECT stream_type, stream_version FROM events \
       WHERE events.tenant_id = k.tenant_id AND events.stream_id = k.stream_id \
       ORDER BY stream_version DESC LIMIT 1) e";

// Every lookup below is a correlated subquery per requested key (LATERAL ...
// LIMIT 1), not a join: the writer's statements use generic plans, made once
// per connection, and a join planned while a table was small would stay a
// sequential scan however large the table grows.

const SELECT_KEYS: &str = "SELECT k.tenant_id, k.key, i.request_hash, i.first_position, \
       i.last_position, i.streams::text \
     FROM unnest($1::text[], $2::text[]) AS k(tenant_id, key) \
     CROSS JOIN LATERAL ( \
       SELECT * FROM idempotency_keys i \
       WHERE i.tenant_id = k.tenant_id AND i.key = k.key LIMIT 1) i";

const SELECT_RESERVATIONS: &str = "SELECT c.tenant_id, c.kind, c.key_hash, r.stream_id \
     FROM unnest($1::text[], $2::text[], $3::bytea[]) AS c(tenant_id, kind, key_hash) \
     CROSS JOIN LATERAL ( \
       SELECT stream_id FROM reservations r \
       WHERE r.tenant_id = c.tenant_id AND r.kind = c.kind AND r.key_hash = c.key_hash \
       LIMIT 1) r";

/// The guarded write. Positions are offsets from the head read under the lock.
/// `ok` is false, and nothing is written, when a stream is not at the version
/// the batch assumes ($1-$4), an idempotency key already exists ($5-$6), or a
/// claimed value ($22-$25) is held by another stream. Releases are $26-$29.
/// A claim that lost a race after the guard (stale snapshot) aborts the
/// statement through `crm_require`, so a claim is never silently dropped.
///
/// Four variants (with or without idempotency keys, with or without
/// reservations) keep the common batch free of work it does not need; all
/// take the same 34 parameters. Transfers ($30-$34: tenant, kind, hash, from,
/// to) are written unconditionally: only the careful path writes them, after
/// checking under the lock that the holder is `from`, `to` or nobody.
fn write_sql(keys: bool, reservations: bool, subject_keys: bool) -> String {
    let mut ok = String::from(
        "SELECT NOT EXISTS ( \
           SELECT 1 FROM unnest($1::text[], $2::uuid[], $3::text[], $4::bigint[]) \
                AS g(tenant_id, stream_id, stream_type, version) \
           LEFT JOIN LATERAL ( \
             SELECT e.stream_type, e.stream_version FROM events e \
             WHERE e.tenant_id = g.tenant_id AND e.stream_id = g.stream_id \
             ORDER BY e.stream_version DESC LIMIT 1) cur ON true \
           WHERE coalesce(cur.stream_version, 0) <> g.version OR cur.stream_type <> g.stream_type)",
    );
    if keys {
        ok.push_str(
            " AND NOT EXISTS ( \
               SELECT 1 FROM unnest($5::text[], $6::text[]) AS k(tenant_id, key) \
               CROSS JOIN LATERAL ( \
                 SELECT 1 FROM idempotency_keys i \
                 WHERE i.tenant_id = k.tenant_id AND i.key = k.key LIMIT 1) i)",
        );
    }
    if reservations {
        ok.push_str(
            " AND NOT EXISTS ( \
               SELECT 1 FROM unnest($22::text[], $23::text[], $24::bytea[], $25::uuid[]) \
                    AS c(tenant_id, kind, key_hash, stream_id) \
               CROSS JOIN LATERAL ( \
                 SELECT r.stream_id FROM reservations r \
                 WHERE r.tenant_id = c.tenant_id AND r.kind = c.kind AND r.key_hash = c.key_hash \
                 LIMIT 1) r \
               WHERE r.stream_id <> c.stream_id)",
        );
    }
    let mut sql = format!(
        "WITH head AS (SELECT position FROM log_head WHERE id = 1 FOR UPDATE), \
         ok AS ({ok} AS ok), \
         new_events AS ( \
           INSERT INTO events (global_position, event_id, tenant_id, stream_type, stream_id, \
                               stream_version, event_type, schema_version, payload, metadata) \
           SELECT head.position + x.o, x.e, x.t, x.st, x.s, x.v, x.et, x.sv, x.pl::jsonb, x.md::jsonb \
           FROM unnest($7::bigint[], $8::uuid[], $9::text[], $10::text[], $11::uuid[], $12::bigint[], \
                       $13::text[], $14::int[], $15::text[], $16::text[]) \
                AS x(o, e, t, st, s, v, et, sv, pl, md), head, ok \
           WHERE ok.ok), \
         new_head AS ( \
           UPDATE log_head SET position = head.position + $21::bigint FROM head, ok \
           WHERE log_head.id = 1 AND ok.ok AND $21::bigint > 0), \
         notified AS ( \
           SELECT pg_notify('crm_events', (head.position + $21::bigint)::text) \
           FROM head, ok WHERE ok.ok AND $21::bigint > 0)"
    );
    if keys {
        sql.push_str(
            ", outcomes AS ( \
               INSERT INTO idempotency_keys \
                 (tenant_id, key, request_hash, first_position, last_position, streams) \
               SELECT k.t, k.k, k.h, head.position + k.f, head.position + k.l, k.s::jsonb \
               FROM unnest($5::text[], $6::text[], $17::bytea[], $18::bigint[], $19::bigint[], \
                           $20::text[]) AS k(t, k, h, f, l, s), head, ok \
               WHERE ok.ok)",
        );
    }
    if reservations {
        sql.push_str(
            ", released AS ( \
               DELETE FROM reservations WHERE ctid = ANY (ARRAY( \
                 SELECT r.ctid FROM unnest($26::text[], $27::text[], $28::bytea[], $29::uuid[]) \
                      AS x(t, k, h, s) \
                 CROSS JOIN LATERAL ( \
                   SELECT ctid FROM reservations r \
                   WHERE r.tenant_id = x.t AND r.kind = x.k AND r.key_hash = x.h AND r.stream_id = x.s \
                   LIMIT 1) r, ok \
                 WHERE ok.ok)) \
               AND cardinality($26::text[]) > 0), \
             claimed AS ( \
               INSERT INTO reservations (tenant_id, kind, key_hash, stream_id) \
               SELECT x.t, x.k, x.h, x.s \
               FROM unnest($22::text[], $23::text[], $24::bytea[], $25::uuid[]) AS x(t, k, h, s), ok \
               WHERE ok.ok \
               ON CONFLICT (tenant_id, kind, key_hash) DO UPDATE SET stream_id = EXCLUDED.stream_id \
               WHERE reservations.stream_id = EXCLUDED.stream_id \
               RETURNING 1), \
             transferred AS ( \
               INSERT INTO reservations (tenant_id, kind, key_hash, stream_id) \
               SELECT x.t, x.k, x.h, x.s \
               FROM unnest($30::text[], $31::text[], $32::bytea[], $34::uuid[]) AS x(t, k, h, s), ok \
               WHERE ok.ok \
               ON CONFLICT (tenant_id, kind, key_hash) DO UPDATE SET stream_id = EXCLUDED.stream_id)",
        );
    }
    if subject_keys {
        sql.push_str(
            ", subject_keys_written AS ( \
               INSERT INTO subject_keys (tenant_id, subject_id, key) \
               SELECT x.t, x.s, x.k \
               FROM unnest($35::text[], $36::uuid[], $37::bytea[]) AS x(t, s, k), ok \
               WHERE ok.ok \
               ON CONFLICT (tenant_id, subject_id) DO NOTHING \
               RETURNING 1)",
        );
    }
    sql.push_str(" SELECT ok.ok, head.position, (SELECT count(*) FROM notified)");
    if subject_keys {
        sql.push_str(
            ", crm_require(NOT ok.ok \
                 OR (SELECT count(*) FROM subject_keys_written) = cardinality($35::text[]), \
                 'a data subject already has a key')",
        );
    }
    if reservations {
        sql.push_str(
            ", crm_require(NOT ok.ok OR (SELECT count(*) FROM claimed) = cardinality($22::text[]), \
                 'a reserved value was claimed by another stream meanwhile')",
        );
    }
    sql.push_str(" FROM ok, head");
    sql
}

/// Parameter types of every write variant, so a variant may leave some unused.
const WRITE_TYPES: [Type; 37] = [
    Type::TEXT_ARRAY,
    Type::UUID_ARRAY,
    Type::TEXT_ARRAY,
    Type::INT8_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::INT8_ARRAY,
    Type::UUID_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::UUID_ARRAY,
    Type::INT8_ARRAY,
    Type::TEXT_ARRAY,
    Type::INT4_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::BYTEA_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
    Type::TEXT_ARRAY,
    Type::INT8,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::BYTEA_ARRAY,
    Type::UUID_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::BYTEA_ARRAY,
    Type::UUID_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::BYTEA_ARRAY,
    Type::UUID_ARRAY,
    Type::UUID_ARRAY,
    Type::TEXT_ARRAY,
    Type::UUID_ARRAY,
    Type::BYTEA_ARRAY,
];

fn write_variant(keys: bool, reservations: bool, subject_keys: bool) -> &'static str {
    static VARIANTS: OnceLock<Vec<String>> = OnceLock::new();
    let variants = VARIANTS.get_or_init(|| {
        (0..8)
            .map(|i| write_sql(i & 1 != 0, i & 2 != 0, i & 4 != 0))
            .collect()
    });
    &variants[usize::from(keys) + 2 * usize::from(reservations) + 4 * usize::from(subject_keys)]
}

/// Batches in flight at once when appends are large. The second one's
/// statement is already at the server, waiting for the log lock, while the
/// first commits, so the lock never waits for a round trip between batches
/// (order is still the lock's). Small appends gain more from fewer, larger
/// batches (group commit), so they keep one batch in flight.
const MAX_IN_FLIGHT: usize = 2;
/// Events in the last batch from which a second batch may be in flight.
const PIPELINE_FROM_EVENTS: usize = 100;

/// Runs until cancelled, then drains what is queued and returns.
pub(crate) async fn run(
    pool: Pool,
    mut queue: mpsc::Receiver<Job>,
    head: watch::Sender<u64>,
    config: WriterConfig,
    cancel: CancellationToken,
) {
    let mut deferred: VecDeque<Job> = VecDeque::new();
    let mut in_flight = FuturesOrdered::new();
    let mut closed = false;
    let mut drained = false;
    let mut busy = false;
    let mut last_events = 0;
    loop {
        if drained && in_flight.is_empty() && deferred.is_empty() {
            break;
        }
        let limit = if last_events >= PIPELINE_FROM_EVENTS {
            MAX_IN_FLIGHT
        } else {
            1
        };
        // Start a batch when there is room and work that needs no waiting.
        if in_flight.len() < limit {
            let ready = match deferred.pop_front() {
                Some(job) => Some(job),
                None => queue.try_recv().ok(),
            };
            if let Some(first) = ready {
                let batch = gather(first, &mut deferred, &mut queue, &config, busy).await;
                busy = batch.len() > 1;
                last_events = batch.iter().map(|job| job.append.n_events).sum();
                in_flight.push_back(start(&pool, batch, &head, &config));
                continue;
            }
        }
        let room = in_flight.len() < limit;
        tokio::select! {
            biased;
            done = in_flight.next(), if !in_flight.is_empty() => {
                if let Some(again) = done {
                    deferred.extend(again);
                }
            }
            job = queue.recv(), if room && !drained => match job {
                Some(first) => {
                    let batch = gather(first, &mut deferred, &mut queue, &config, busy).await;
                    busy = batch.len() > 1;
                    last_events = batch.iter().map(|job| job.append.n_events).sum();
                    in_flight.push_back(start(&pool, batch, &head, &config));
                }
                // Closed (shutdown) and empty: finish what is in flight.
                None => drained = true,
            },
            () = cancel.cancelled(), if !closed => {
                queue.close();
                closed = true;
            }
        }
    }
}

/// Fills a batch from what is queued now. When batches are busy (the last
/// one had several appends), one yield lets callers that were just answered
/// send their next append into this batch instead of the next.
async fn gather(
    first: Job,
    deferred: &mut VecDeque<Job>,
    queue: &mut mpsc::Receiver<Job>,
    config: &WriterConfig,
    busy: bool,
) -> Vec<Job> {
    let mut n_events = first.append.n_events;
    let mut batch = vec![first];
    let mut yielded = !busy;
    while batch.len() < config.max_batch_appends && n_events < config.max_batch_events {
        let next = match deferred.pop_front() {
            Some(job) => job,
            None => match queue.try_recv() {
                Ok(job) => job,
                Err(_) if !yielded => {
                    yielded = true;
                    tokio::task::yield_now().await;
                    continue;
                }
                Err(_) => break,
            },
        };
        n_events += next.append.n_events;
        batch.push(next);
    }
    batch
}

fn start<'a>(
    pool: &'a Pool,
    batch: Vec<Job>,
    head: &'a watch::Sender<u64>,
    config: &'a WriterConfig,
) -> impl std::future::Future<Output = Vec<Job>> + 'a {
    let n_events: usize = batch.iter().map(|job| job.append.n_events).sum();
    config.stats.batches.fetch_add(1, Ordering::Relaxed);
    config
        .stats
        .appends
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    let span = info_span!("append_batch", n_appends = batch.len(), n_events);
    commit_batch(pool, batch, head, config).instrument(span)
}

/// What the writer decided for one append of a batch.
enum Decision {
    Done(Result<Appended, AppendError>),
    /// Same idempotency key as an earlier append of this batch: decide it in
    /// the next batch, once the first one's outcome is stored.
    Defer,
}

/// Commits one batch and answers its callers; returns the deferred jobs.
async fn commit_batch(
    pool: &Pool,
    batch: Vec<Job>,
    head: &watch::Sender<u64>,
    config: &WriterConfig,
) -> Vec<Job> {
    let appends: Vec<&PreparedAppend> = batch.iter().map(|job| &job.append).collect();
    match try_commit(pool, &appends, config).await {
        Ok((decisions, new_head)) => {
            let committed: u64 = decisions
                .iter()
                .map(|decision| match decision {
                    Decision::Done(Ok(appended)) if !appended.replayed => {
                        appended.last_position + 1 - appended.first_position
                    }
                    _ => 0,
                })
                .sum();
            config.stats.events.fetch_add(committed, Ordering::Relaxed);
            head.send_if_modified(|known| {
                let newer = new_head > *known;
                if newer {
                    *known = new_head;
                }
                newer
            });
            let mut deferred = Vec::new();
            for (job, decision) in batch.into_iter().zip(decisions) {
                match decision {
                    Decision::Done(outcome) => {
                        // The caller may have given up waiting; nothing to do then.
                        let _ = job.reply.send(outcome);
                    }
                    Decision::Defer => deferred.push(job),
                }
            }
            deferred
        }
        Err(BatchError::RolledBack(error)) if batch.len() > 1 => {
            tracing::warn!(%error, n_appends = batch.len(), "batch rolled back; retrying its appends one by one");
            let mut deferred = Vec::new();
            for job in batch {
                deferred.extend(Box::pin(commit_batch(pool, vec![job], head, config)).await);
            }
            deferred
        }
        Err(error) => {
            tracing::error!(%error, "append failed");
            for job in batch {
                let _ = job.reply.send(Err(error.to_append_error()));
            }
            Vec::new()
        }
    }
}

/// A database error with the server's own message and SQLSTATE, which the
/// plain Display ("db error") leaves out.
pub(crate) fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
enum BatchError {
    /// The server refused a statement: the transaction did not commit.
    #[error("rolled back: {}", describe(.0))]
    RolledBack(tokio_postgres::Error),
    /// The guarded write failed although the lock was held since the reads.
    #[error("the log changed under the writer's lock")]
    Inconsistent,
    /// No connection, or the connection broke: before the commit was sent the
    /// batch did not happen; during the commit nobody knows.
    #[error("connection failed: {message}")]
    Connection {
        message: String,
        during_commit: bool,
    },
}

impl BatchError {
    fn from_pg(error: tokio_postgres::Error, during_commit: bool) -> Self {
        if error.as_db_error().is_some() {
            Self::RolledBack(error)
        } else {
            Self::Connection {
                message: error.to_string(),
                during_commit,
            }
        }
    }

    fn to_append_error(&self) -> AppendError {
        match self {
            Self::Inconsistent => AppendError::Unavailable {
                message: self.to_string(),
                outcome_unknown: false,
            },
            Self::RolledBack(error) => AppendError::Unavailable {
                message: describe(error),
                outcome_unknown: false,
            },
            Self::Connection {
                message,
                during_commit,
            } => AppendError::Unavailable {
                message: message.clone(),
                outcome_unknown: *during_commit,
            },
        }
    }
}

/// Everything the write statement needs, positions as offsets (1-based)
/// from the head.
#[derive(Default)]
struct WritePlan<'a> {
    // Guards: each touched stream's version before the batch.
    guard_tenants: Vec<&'a str>,
    guard_ids: Vec<Uuid>,
    guard_types: Vec<&'a str>,
    guard_versions: Vec<i64>,
    // Events.
    offsets: Vec<i64>,
    event_ids: Vec<Uuid>,
    tenants: Vec<&'a str>,
    stream_types: Vec<&'a str>,
    stream_ids: Vec<Uuid>,
    versions: Vec<i64>,
    event_types: Vec<&'a str>,
    schema_versions: Vec<i32>,
    payloads: Vec<&'a str>,
    metadata: Vec<&'a str>,
    // Idempotency outcomes.
    key_tenants: Vec<&'a str>,
    keys: Vec<&'a str>,
    key_hashes: Vec<&'a [u8]>,
    key_first: Vec<i64>,
    key_last: Vec<i64>,
    key_streams: Vec<String>,
    // Reservations claimed and released.
    claim_tenants: Vec<&'a str>,
    claim_kinds: Vec<&'a str>,
    claim_hashes: Vec<&'a [u8]>,
    claim_streams: Vec<Uuid>,
    release_tenants: Vec<&'a str>,
    release_kinds: Vec<&'a str>,
    release_hashes: Vec<&'a [u8]>,
    release_streams: Vec<Uuid>,
    transfer_tenants: Vec<&'a str>,
    transfer_kinds: Vec<&'a str>,
    transfer_hashes: Vec<&'a [u8]>,
    transfer_from: Vec<Uuid>,
    transfer_to: Vec<Uuid>,
    // Data subjects' new keys.
    subject_tenants: Vec<&'a str>,
    subject_ids: Vec<Uuid>,
    subject_keys: Vec<&'a [u8]>,
    /// Per append: its outcome with offsets, or why it was refused.
    decisions: Vec<Decision>,
    n_events: u64,
}

/// Tracks, per stream, the version before the batch and as the batch goes.
type StreamVersions<'a> = HashMap<(&'a str, Uuid), StreamState<'a>>;

struct StreamState<'a> {
    stream_type: &'a str,
    before: u64,
    current: u64,
}

impl<'a> WritePlan<'a> {
    /// Adds an accepted append whose streams' current versions are in `streams`.
    fn accept(&mut self, append: &'a PreparedAppend, streams: &mut StreamVersions<'a>) {
        let request = &append.request;
        let tenant = request.tenant_id.as_str();
        let first_offset = self.n_events + 1;
        let mut payloads = append.payloads.iter();
        let mut appended = Vec::with_capacity(request.streams.len());
        for stream in &request.streams {
            let state = streams
                .entry((tenant, stream.stream_id))
                .or_insert(StreamState {
                    stream_type: &stream.stream_type,
                    before: 0,
                    current: 0,
                });
            let first_version = state.current + 1;
            for event in &stream.events {
                self.n_events += 1;
                state.current += 1;
                self.offsets.push(self.n_events as i64);
                self.event_ids.push(event.event_id);
                self.tenants.push(tenant);
                self.stream_types.push(&stream.stream_type);
                self.stream_ids.push(stream.stream_id);
                self.versions.push(state.current as i64);
                self.event_types.push(&event.event_type);
                self.schema_versions.push(event.schema_version as i32);
                self.payloads
                    .push(payloads.next().map(String::as_str).unwrap_or("{}"));
                self.metadata.push(&append.metadata);
            }
            appended.push(AppendedStream {
                stream_id: stream.stream_id,
                first_version,
                last_version: state.current,
            });
        }
        for subject in &request.subject_keys {
            self.subject_tenants.push(tenant);
            self.subject_ids.push(subject.subject_id);
            self.subject_keys.push(&subject.key);
        }
        for reservation in &request.reservations {
            let (tenants, kinds, hashes, streams) = match reservation.action {
                ReservationAction::Transfer { from } => {
                    self.transfer_tenants.push(tenant);
                    self.transfer_kinds.push(&reservation.kind);
                    self.transfer_hashes.push(&reservation.key_hash);
                    self.transfer_from.push(from);
                    self.transfer_to.push(reservation.stream_id);
                    continue;
                }
                ReservationAction::Claim => (
                    &mut self.claim_tenants,
                    &mut self.claim_kinds,
                    &mut self.claim_hashes,
                    &mut self.claim_streams,
                ),
                ReservationAction::Release => (
                    &mut self.release_tenants,
                    &mut self.release_kinds,
                    &mut self.release_hashes,
                    &mut self.release_streams,
                ),
            };
            tenants.push(tenant);
            kinds.push(&reservation.kind);
            hashes.push(&reservation.key_hash);
            streams.push(reservation.stream_id);
        }
        if let Some(key) = request.idempotency_key.as_deref() {
            self.key_tenants.push(tenant);
            self.keys.push(key);
            self.key_hashes.push(&append.fingerprint);
            self.key_first.push(first_offset as i64);
            self.key_last.push(self.n_events as i64);
            self.key_streams
                .push(serde_json::to_string(&appended).unwrap_or_else(|_| "[]".into()));
        }
        self.decisions.push(Decision::Done(Ok(Appended {
            first_position: first_offset,
            last_position: self.n_events,
            streams: appended,
            replayed: false,
        })));
    }

    /// Records each touched stream's version before the batch as a guard.
    fn guard(&mut self, streams: &StreamVersions<'a>) {
        for ((tenant, id), state) in streams {
            self.guard_tenants.push(tenant);
            self.guard_ids.push(*id);
            self.guard_types.push(state.stream_type);
            self.guard_versions.push(state.before as i64);
        }
    }

    /// Turns offsets into positions once the head is known.
    fn into_decisions(self, head: u64) -> Vec<Decision> {
        self.decisions
            .into_iter()
            .map(|decision| match decision {
                Decision::Done(Ok(mut appended)) if !appended.replayed => {
                    appended.first_position += head;
                    appended.last_position += head;
                    Decision::Done(Ok(appended))
                }
                other => other,
            })
            .collect()
    }
}

/// The fast path's plan, if the batch qualifies: every stream's expected
/// version is exact (or "no stream") and consistent within the batch, and no
/// idempotency key repeats.
fn optimistic_plan<'a>(appends: &[&'a PreparedAppend]) -> Option<WritePlan<'a>> {
    let mut streams: StreamVersions<'a> = HashMap::new();
    let mut keys = HashSet::new();
    let mut reserved = HashSet::new();
    let mut plan = WritePlan::default();
    for append in appends {
        let request = &append.request;
        let tenant = request.tenant_id.as_str();
        if let Some(key) = request.idempotency_key.as_deref()
            && !keys.insert((tenant, key))
        {
            return None;
        }
        // Transfers are only written after reading the holders under the lock.
        if request
            .reservations
            .iter()
            .any(|r| matches!(r.action, ReservationAction::Transfer { .. }))
        {
            return None;
        }
        // A value touched by two appends of the batch needs deciding in order.
        for reservation in &request.reservations {
            if !reserved.insert((
                tenant,
                reservation.kind.as_str(),
                reservation.key_hash.as_slice(),
            )) {
                return None;
            }
        }
        for stream in &request.streams {
            let expected = match stream.expected {
                ExpectedVersion::Any => return None,
                ExpectedVersion::NoStream => 0,
                ExpectedVersion::Exact(n) => n,
            };
            match streams.get(&(tenant, stream.stream_id)) {
                Some(state)
                    if state.current != expected || state.stream_type != stream.stream_type =>
                {
                    return None;
                }
                Some(_) => {}
                None => {
                    streams.insert(
                        (tenant, stream.stream_id),
                        StreamState {
                            stream_type: &stream.stream_type,
                            before: expected,
                            current: expected,
                        },
                    );
                }
            }
        }
        plan.accept(append, &mut streams);
    }
    plan.guard(&streams);
    Some(plan)
}

async fn try_commit(
    pool: &Pool,
    appends: &[&PreparedAppend],
    config: &WriterConfig,
) -> Result<(Vec<Decision>, u64), BatchError> {
    let client = pool.get().await.map_err(|e| BatchError::Connection {
        message: e.to_string(),
        during_commit: false,
    })?;
    let outcome = async {
        if let Some(plan) = optimistic_plan(appends)
            && let Some(done) = run_fast(&client, plan, config).await?
        {
            return Ok(done);
        }
        run_careful(&client, appends, config).await
    }
    .await;
    if outcome.is_err() {
        // Never hand a connection in an unknown transaction state back to the
        // pool: detach and close it (closing rolls back whatever is open).
        drop(deadpool_postgres::Object::take(client));
    }
    outcome
}

struct Statements {
    begin: tokio_postgres::Statement,
    lock: tokio_postgres::Statement,
    commit: tokio_postgres::Statement,
}

async fn statements(client: &deadpool_postgres::Client) -> Result<Statements, BatchError> {
    let pg = |e| BatchError::from_pg(e, false);
    Ok(Statements {
        begin: client.prepare_cached("BEGIN").await.map_err(pg)?,
        lock: client.prepare_cached(LOCK_HEAD).await.map_err(pg)?,
        commit: client.prepare_cached("COMMIT").await.map_err(pg)?,
    })
}

/// Sends the guarded write and COMMIT (pipelined unless a test pause sits
/// between them); returns whether the guard held and the head before the write.
async fn write_and_commit(
    client: &deadpool_postgres::Client,
    statements: &Statements,
    plan: &WritePlan<'_>,
    config: &WriterConfig,
) -> Result<(bool, u64), BatchError> {
    let pg = |e| BatchError::from_pg(e, false);
    let n_events = plan.n_events as i64;
    let params = write_params(plan, &n_events);
    let write = write_statement(client, plan).await?;
    let written = client.query_one(&write, &params);
    let row = if let Some(pause) = config.pause_before_commit {
        let row = written.await.map_err(pg)?;
        tokio::time::sleep(pause).await;
        client
            .execute(&statements.commit, &[])
            .await
            .map_err(|e| BatchError::from_pg(e, true))?;
        row
    } else {
        // If the write fails, the server answers the COMMIT with a rollback,
        // and the write's error is what we report.
        let (written, committed) =
            futures_util::future::join(written, client.execute(&statements.commit, &[])).await;
        let row = written.map_err(pg)?;
        committed.map_err(|e| BatchError::from_pg(e, true))?;
        row
    };
    let ok: bool = row.get(0);
    let head: i64 = row.get(1);
    Ok((ok, u64::try_from(head).unwrap_or(0)))
}

/// The write variant this plan needs, prepared once per connection.
async fn write_statement(
    client: &deadpool_postgres::Client,
    plan: &WritePlan<'_>,
) -> Result<tokio_postgres::Statement, BatchError> {
    let keys = !plan.keys.is_empty();
    let reservations = !plan.claim_tenants.is_empty()
        || !plan.release_tenants.is_empty()
        || !plan.transfer_tenants.is_empty();
    let subject_keys = !plan.subject_ids.is_empty();
    client
        .prepare_typed_cached(
            write_variant(keys, reservations, subject_keys),
            &WRITE_TYPES,
        )
        .await
        .map_err(|e| BatchError::from_pg(e, false))
}

fn write_params<'p>(plan: &'p WritePlan<'_>, n_events: &'p i64) -> [&'p (dyn ToSql + Sync); 37] {
    [
        &plan.guard_tenants,
        &plan.guard_ids,
        &plan.guard_types,
        &plan.guard_versions,
        &plan.key_tenants,
        &plan.keys,
        &plan.offsets,
        &plan.event_ids,
        &plan.tenants,
        &plan.stream_types,
        &plan.stream_ids,
        &plan.versions,
        &plan.event_types,
        &plan.schema_versions,
        &plan.payloads,
        &plan.metadata,
        &plan.key_hashes,
        &plan.key_first,
        &plan.key_last,
        &plan.key_streams,
        n_events,
        &plan.claim_tenants,
        &plan.claim_kinds,
        &plan.claim_hashes,
        &plan.claim_streams,
        &plan.release_tenants,
        &plan.release_kinds,
        &plan.release_hashes,
        &plan.release_streams,
        &plan.transfer_tenants,
        &plan.transfer_kinds,
        &plan.transfer_hashes,
        &plan.transfer_from,
        &plan.transfer_to,
        &plan.subject_tenants,
        &plan.subject_ids,
        &plan.subject_keys,
    ]
}

/// One round trip, one statement: in autocommit, the guarded write takes the
/// lock, writes and commits. `None` when the guard
/// failed (nothing was written).
async fn run_fast(
    client: &deadpool_postgres::Client,
    plan: WritePlan<'_>,
    config: &WriterConfig,
) -> Result<Option<(Vec<Decision>, u64)>, BatchError> {
    let pg = |e| BatchError::from_pg(e, false);
    let statements = statements(client).await?;
    let (ok, head) = if config.pause_before_commit.is_some() {
        // Fault injection needs a transaction to hold open.
        let begin = client.execute(&statements.begin, &[]);
        let write = write_and_commit(client, &statements, &plan, config);
        let (begun, written) = futures_util::future::join(begin, write).await;
        begun.map_err(pg)?;
        written?
    } else {
        let n_events = plan.n_events as i64;
        let write = write_statement(client, &plan).await?;
        let row = client
            .query_one(&write, &write_params(&plan, &n_events))
            .await
            .map_err(|e| BatchError::from_pg(e, true))?;
        let head: i64 = row.get(1);
        (row.get::<_, bool>(0), u64::try_from(head).unwrap_or(0))
    };
    if !ok {
        return Ok(None);
    }
    let new_head = head + plan.n_events;
    Ok(Some((plan.into_decisions(head), new_head)))
}

/// Two round trips: read the state under the lock, decide each append, write.
async fn run_careful(
    client: &deadpool_postgres::Client,
    appends: &[&PreparedAppend],
    config: &WriterConfig,
) -> Result<(Vec<Decision>, u64), BatchError> {
    let pg = |e| BatchError::from_pg(e, false);
    let statements = statements(client).await?;
    let select_streams = client.prepare_cached(SELECT_STREAMS).await.map_err(pg)?;
    let select_keys = client.prepare_cached(SELECT_KEYS).await.map_err(pg)?;
    let select_reservations = client
        .prepare_cached(SELECT_RESERVATIONS)
        .await
        .map_err(pg)?;
    let mut claim_tenants = Vec::new();
    let mut claim_kinds = Vec::new();
    let mut claim_hashes = Vec::new();
    for append in appends {
        for reservation in &append.request.reservations {
            if reservation.action != ReservationAction::Release {
                claim_tenants.push(append.request.tenant_id.as_str());
                claim_kinds.push(reservation.kind.as_str());
                claim_hashes.push(reservation.key_hash.as_slice());
            }
        }
    }

    let mut stream_tenants = Vec::new();
    let mut stream_ids = Vec::new();
    let mut key_tenants = Vec::new();
    let mut keys = Vec::new();
    for append in appends {
        let tenant = append.request.tenant_id.as_str();
        for stream in &append.request.streams {
            stream_tenants.push(tenant);
            stream_ids.push(stream.stream_id);
        }
        if let Some(key) = &append.request.idempotency_key {
            key_tenants.push(tenant);
            keys.push(key.as_str());
        }
    }
    // The server runs these in order, so the reads' snapshots (READ
    // COMMITTED) are taken once the lock is held: they see every commit
    // before ours.
    let (_, head_row, stream_rows, key_rows, reservation_rows) = futures_util::future::try_join5(
        client.execute(&statements.begin, &[]),
        client.query_one(&statements.lock, &[]),
        client.query(&select_streams, &[&stream_tenants, &stream_ids]),
        client.query(&select_keys, &[&key_tenants, &keys]),
        client.query(
            &select_reservations,
            &[&claim_tenants, &claim_kinds, &claim_hashes],
        ),
    )
    .await
    .map_err(pg)?;
    let mut holders: HashMap<(String, String, Vec<u8>), Uuid> = HashMap::new();
    for row in &reservation_rows {
        holders.insert((row.get(0), row.get(1), row.get(2)), row.get(3));
    }
    let head: i64 = head_row.get(0);
    let head = u64::try_from(head).unwrap_or(0);

    let mut stored_streams: HashMap<(String, Uuid), (String, u64)> = HashMap::new();
    for row in &stream_rows {
        let version: i64 = row.get(3);
        stored_streams.insert(
            (row.get(0), row.get(1)),
            (row.get(2), u64::try_from(version).unwrap_or(0)),
        );
    }
    let mut stored_keys: HashMap<(String, String), StoredOutcome> = HashMap::new();
    for row in &key_rows {
        stored_keys.insert(
            (row.get(0), row.get(1)),
            StoredOutcome {
                hash: row.get(2),
                first_position: row.get(3),
                last_position: row.get(4),
                streams: row.get(5),
            },
        );
    }

    let mut plan = WritePlan::default();
    let mut streams: StreamVersions<'_> = HashMap::new();
    let mut batch_keys: HashSet<(&str, &str)> = HashSet::new();
    let mut batch_reserved: HashSet<(&str, &str, &[u8])> = HashSet::new();
    for append in appends {
        let request = &append.request;
        let tenant = request.tenant_id.as_str();
        if let Some(key) = request.idempotency_key.as_deref() {
            if let Some(stored) = stored_keys.get(&(tenant.to_owned(), key.to_owned())) {
                plan.decisions
                    .push(Decision::Done(stored.replay(append, key)));
                continue;
            }
            if batch_keys.contains(&(tenant, key)) {
                plan.decisions.push(Decision::Defer);
                continue;
            }
        }
        // A value an earlier append of this batch claimed or released is
        // decided in the next batch: one statement cannot both write and then
        // see the same reservation row.
        if request
            .reservations
            .iter()
            .any(|r| batch_reserved.contains(&(tenant, r.kind.as_str(), r.key_hash.as_slice())))
        {
            plan.decisions.push(Decision::Defer);
            continue;
        }
        // Bring every stream of this append into the batch's view.
        for stream in &request.streams {
            streams
                .entry((tenant, stream.stream_id))
                .or_insert_with(|| {
                    match stored_streams.get(&(tenant.to_owned(), stream.stream_id)) {
                        Some((stored_type, version)) => StreamState {
                            stream_type: stored_type.as_str(),
                            before: *version,
                            current: *version,
                        },
                        None => StreamState {
                            stream_type: &stream.stream_type,
                            before: 0,
                            current: 0,
                        },
                    }
                });
        }
        let checked = check_versions(append, &streams)
            .and_then(|()| check_reservations(tenant, &request.reservations, &holders));
        match checked {
            Ok(()) => {
                if let Some(key) = request.idempotency_key.as_deref() {
                    batch_keys.insert((tenant, key));
                }
                for r in &request.reservations {
                    batch_reserved.insert((tenant, r.kind.as_str(), r.key_hash.as_slice()));
                }
                plan.accept(append, &mut streams);
            }
            Err(error) => plan.decisions.push(Decision::Done(Err(error))),
        }
    }
    // Streams only looked at by refused appends need no guard, but guarding
    // them is harmless: their versions are what we just read.
    plan.guard(&streams);
    let (ok, written_head) = write_and_commit(client, &statements, &plan, config).await?;
    if !ok || written_head != head {
        // We hold the lock, so the state cannot have moved: the database is
        // not what this writer expects. Report rather than guess.
        return Err(BatchError::Inconsistent);
    }
    let new_head = head + plan.n_events;
    Ok((plan.into_decisions(head), new_head))
}

struct StoredOutcome {
    hash: Vec<u8>,
    first_position: i64,
    last_position: i64,
    streams: String,
}

impl StoredOutcome {
    fn replay(&self, append: &PreparedAppend, key: &str) -> Result<Appended, AppendError> {
        if self.hash != append.fingerprint {
            return Err(AppendError::IdempotencyKeyReused {
                key: key.to_owned(),
            });
        }
        let streams: Vec<AppendedStream> =
            serde_json::from_str(&self.streams).map_err(|e| AppendError::Unavailable {
                message: format!("stored idempotency outcome is unreadable: {e}"),
                outcome_unknown: false,
            })?;
        Ok(Appended {
            first_position: u64::try_from(self.first_position).unwrap_or(0),
            last_position: u64::try_from(self.last_position).unwrap_or(0),
            streams,
            replayed: true,
        })
    }
}

fn check_reservations(
    tenant: &str,
    reservations: &[Reservation],
    holders: &HashMap<(String, String, Vec<u8>), Uuid>,
) -> Result<(), AppendError> {
    for reservation in reservations {
        let allowed_from = match reservation.action {
            ReservationAction::Release => continue,
            ReservationAction::Claim => None,
            ReservationAction::Transfer { from } => Some(from),
        };
        let key = (
            tenant.to_owned(),
            reservation.kind.clone(),
            reservation.key_hash.clone(),
        );
        if let Some(holder) = holders.get(&key)
            && *holder != reservation.stream_id
            && Some(*holder) != allowed_from
        {
            return Err(AppendError::AlreadyReserved {
                kind: reservation.kind.clone(),
                holder: *holder,
            });
        }
    }
    Ok(())
}

fn check_versions(
    append: &PreparedAppend,
    streams: &StreamVersions<'_>,
) -> Result<(), AppendError> {
    let tenant = append.request.tenant_id.as_str();
    for stream in &append.request.streams {
        let Some(state) = streams.get(&(tenant, stream.stream_id)) else {
            continue;
        };
        if state.current > 0 && state.stream_type != stream.stream_type {
            return Err(AppendError::WrongStreamType {
                stream_id: stream.stream_id,
                actual: state.stream_type.to_owned(),
            });
        }
        let ok = match stream.expected {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => state.current == 0,
            ExpectedVersion::Exact(n) => state.current == n,
        };
        if !ok {
            return Err(AppendError::VersionConflict {
                stream_id: stream.stream_id,
                expected: stream.expected.describe(),
                current: state.current,
            });
        }
    }
    Ok(())
}
