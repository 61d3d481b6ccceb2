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
//! of its streams (or "no stream"), pins none (a pin has no row of its own
//! for a constraint to catch a stale guard with) and no key repeats within
//! the batch, the writer already knows every stream version it will write.
//! It sends one
//! guarded write in autocommit: the statement locks `log_head`, checks that
//! each existing stream is at the version the batch assumes, writes at
//! head + offset, and commits. If the guard fails, nothing is written and the
//! batch takes the careful path. What the guard leaves out the constraints
//! refuse, also sending the batch the careful way: a stream expected not to
//! exist that does already has a first event, which the unique
//! (tenant, stream, version) index refuses; an idempotency key that exists,
//! its primary key; a value claimed by another stream, the claim's
//! `crm_require`. All three are unique violations, so the common batch (new
//! streams, a claim) reads nothing but the head. If the statement
//! had to wait for the lock (another process was appending), its guard read
//! an older snapshot; it can then only pass wrongly for a stream that the
//! other process just wrote, and the same unique constraint rejects the
//! write. Versions are dense, so no stale guard can let a wrong write
//! through.
//!
//! **Careful path, two round trips.** BEGIN, the lock and reads of every
//! touched stream's version and every key; then the writer decides each append
//! in queue order (conflict, replay, key reused, accepted), and sends the same
//! write statement (whose guard then holds) with COMMIT.
//!
//! **Writing ahead of the lock, for large batches.** A batch of 100 events
//! or more spends most of its time inserting, and the lock made every other
//! batch wait for that. Such batches form a chain instead (at most three in
//! flight, see [`run_speculative`]): each predicts where it starts (where the
//! batch before ends), inserts its rows there in its own transaction without
//! the lock, so several batches insert at once, then, once the batch before
//! has ended, takes the lock, moves the head from exactly the predicted
//! position, and commits. A wrong prediction (the batch before was refused,
//! or another process wrote) fails that check and rolls the batch back; it is
//! then decided as above, with the lock first. Ordering and density rest on
//! the same rule as everywhere: the head moves only under the lock and only
//! from where the committing batch's rows start.
//!
//! If the database rejects a batch, it rolled back as a whole, so every append
//! in it is retried alone, which attributes the failure to the one that caused
//! it. If the connection fails during commit, the outcome is unknown and is
//! reported as such (a retry with the same idempotency key is safe).
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

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
    pub written_ahead: AtomicU64,
    pub fell_back: AtomicU64,
    pub decided_under_lock: AtomicU64,
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
    /// Batches committed by writing before taking the log lock.
    pub written_ahead: u64,
    /// Batches that tried to and rolled back (then took the lock first).
    pub fell_back: u64,
    /// Appends decided the careful way (read under the lock, then written:
    /// two round trips), rather than in one guarded statement.
    pub decided_under_lock: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> WriterStats {
        WriterStats {
            batches: self.batches.load(Ordering::Relaxed),
            appends: self.appends.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
            written_ahead: self.written_ahead.load(Ordering::Relaxed),
            fell_back: self.fell_back.load(Ordering::Relaxed),
            decided_under_lock: self.decided_under_lock.load(Ordering::Relaxed),
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
/// the batch assumes ($1-$4), or, where the variant checks them, an
/// idempotency key already exists ($5-$6) or a claimed value ($22-$25) is
/// held by another stream. Releases are $26-$29. A claim that lost a race
/// after the guard (stale snapshot), or that the guard did not check, aborts
/// the statement through `crm_require` with a unique violation, so a claim is
/// never silently dropped.
///
/// The variants keep each batch free of work it does not need: a part whose
/// arrays are empty is left out (an empty `unnest` still costs the executor
/// its set-up). All take the same 37 parameters ($21 is the event count, or
/// the predicted head when written ahead). Transfers ($30-$34: tenant, kind,
/// hash, from, to) are written unconditionally: only the careful path writes
/// them, after checking under the lock that the holder is `from`, `to` or
/// nobody.
fn write_sql(v: Variant) -> String {
    let mut checks: Vec<&str> = Vec::new();
    if v.guard {
        checks.push(
            "NOT EXISTS ( \
               SELECT 1 FROM unnest($1::text[], $2::uuid[], $3::text[], $4::bigint[]) \
                    AS g(tenant_id, stream_id, stream_type, version) \
               LEFT JOIN LATERAL ( \
                 SELECT e.stream_type, e.stream_version FROM events e \
                 WHERE e.tenant_id = g.tenant_id AND e.stream_id = g.stream_id \
                 ORDER BY e.stream_version DESC LIMIT 1) cur ON true \
               WHERE coalesce(cur.stream_version, 0) <> g.version OR cur.stream_type <> g.stream_type)",
        );
    }
    if v.keys && v.checked {
        checks.push(
            "NOT EXISTS ( \
               SELECT 1 FROM unnest($5::text[], $6::text[]) AS k(tenant_id, key) \
               CROSS JOIN LATERAL ( \
                 SELECT 1 FROM idempotency_keys i \
                 WHERE i.tenant_id = k.tenant_id AND i.key = k.key LIMIT 1) i)",
        );
    }
    if v.claims && v.checked {
        checks.push(
            "NOT EXISTS ( \
               SELECT 1 FROM unnest($22::text[], $23::text[], $24::bytea[], $25::uuid[]) \
                    AS c(tenant_id, kind, key_hash, stream_id) \
               CROSS JOIN LATERAL ( \
                 SELECT r.stream_id FROM reservations r \
                 WHERE r.tenant_id = c.tenant_id AND r.kind = c.kind AND r.key_hash = c.key_hash \
                 LIMIT 1) r \
               WHERE r.stream_id <> c.stream_id)",
        );
    }
    let ok = if checks.is_empty() {
        "SELECT true".to_owned()
    } else {
        format!("SELECT {}", checks.join(" AND "))
    };
    let head = if v.speculative {
        "SELECT $21::bigint AS position"
    } else {
        "SELECT position FROM log_head WHERE id = 1 FOR UPDATE"
    };
    let mut sql = format!(
        "WITH head AS ({head}), \
         ok AS ({ok} AS ok), \
         new_events AS ( \
           INSERT INTO events (global_position, event_id, tenant_id, stream_type, stream_id, \
                               stream_version, event_type, schema_version, payload, metadata) \
           SELECT head.position + x.o, x.e, x.t, x.st, x.s, x.v, x.et, x.sv, x.pl::jsonb, x.md::jsonb \
           FROM unnest($7::bigint[], $8::uuid[], $9::text[], $10::text[], $11::uuid[], $12::bigint[], \
                       $13::text[], $14::int[], $15::text[], $16::text[]) \
                AS x(o, e, t, st, s, v, et, sv, pl, md), head, ok \
           WHERE ok.ok)"
    );
    if !v.speculative {
        sql.push_str(
            ", new_head AS ( \
               UPDATE log_head SET position = head.position + $21::bigint FROM head, ok \
               WHERE log_head.id = 1 AND ok.ok AND $21::bigint > 0), \
             notified AS ( \
               SELECT pg_notify('crm_events', (head.position + $21::bigint)::text) \
               FROM head, ok WHERE ok.ok AND $21::bigint > 0)",
        );
    }
    if v.keys {
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
    if v.releases {
        sql.push_str(
            ", released AS ( \
               DELETE FROM reservations WHERE ctid = ANY (ARRAY( \
                 SELECT r.ctid FROM unnest($26::text[], $27::text[], $28::bytea[], $29::uuid[]) \
                      AS x(t, k, h, s) \
                 CROSS JOIN LATERAL ( \
                   SELECT ctid FROM reservations r \
                   WHERE r.tenant_id = x.t AND r.kind = x.k AND r.key_hash = x.h AND r.stream_id = x.s \
                   LIMIT 1) r, ok \
                 WHERE ok.ok)))",
        );
    }
    if v.claims {
        sql.push_str(
            ", claimed AS ( \
               INSERT INTO reservations (tenant_id, kind, key_hash, stream_id) \
               SELECT x.t, x.k, x.h, x.s \
               FROM unnest($22::text[], $23::text[], $24::bytea[], $25::uuid[]) AS x(t, k, h, s), ok \
               WHERE ok.ok \
               ON CONFLICT (tenant_id, kind, key_hash) DO UPDATE SET stream_id = EXCLUDED.stream_id \
               WHERE reservations.stream_id = EXCLUDED.stream_id \
               RETURNING 1)",
        );
    }
    if v.transfers {
        sql.push_str(
            ", transferred AS ( \
               INSERT INTO reservations (tenant_id, kind, key_hash, stream_id) \
               SELECT x.t, x.k, x.h, x.s \
               FROM unnest($30::text[], $31::text[], $32::bytea[], $34::uuid[]) AS x(t, k, h, s), ok \
               WHERE ok.ok \
               ON CONFLICT (tenant_id, kind, key_hash) DO UPDATE SET stream_id = EXCLUDED.stream_id)",
        );
    }
    if v.subject_keys {
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
    if v.speculative {
        sql.push_str(
            " SELECT crm_require(ok.ok, 'a stream or key moved since the batch was planned'), \
               head.position, 0::bigint",
        );
    } else {
        sql.push_str(" SELECT ok.ok, head.position, (SELECT count(*) FROM notified)");
    }
    if v.subject_keys {
        sql.push_str(
            ", crm_require(NOT ok.ok \
                 OR (SELECT count(*) FROM subject_keys_written) = cardinality($35::text[]), \
                 'a data subject already has a key')",
        );
    }
    if v.claims {
        sql.push_str(
            ", crm_require(NOT ok.ok OR (SELECT count(*) FROM claimed) = cardinality($22::text[]), \
                 'a reserved value was claimed by another stream meanwhile')",
        );
    }
    sql.push_str(" FROM ok, head");
    sql
}

/// Which parts a write statement holds (see [`write_sql`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Variant {
    /// Streams to check against their expected versions ($1-$4).
    guard: bool,
    /// The guard also checks idempotency keys and claims. Without it the
    /// constraints refuse them: a key's primary key, a claim's `crm_require`
    /// (both a unique violation, on which the writer decides again under
    /// the lock).
    checked: bool,
    keys: bool,
    claims: bool,
    releases: bool,
    transfers: bool,
    subject_keys: bool,
    /// Written ahead of the lock at a predicted head.
    speculative: bool,
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

fn write_variant(variant: Variant) -> &'static str {
    static VARIANTS: LazyLock<Mutex<HashMap<Variant, &'static str>>> =
        LazyLock::new(Mutex::default);
    let mut variants = VARIANTS.lock().unwrap_or_else(|e| e.into_inner());
    // At most 2^8 texts, each made once and kept for the process's life.
    variants
        .entry(variant)
        .or_insert_with(|| Box::leak(write_sql(variant).into_boxed_str()))
}

/// Batches in flight at once when appends are large: they write ahead of the
/// lock, in parallel, and commit in turn. Small appends gain more from fewer,
/// larger batches (group commit), so they keep one batch in flight.
pub(crate) const MAX_IN_FLIGHT: usize = 3;
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
    let mut chain = Chain::new();
    loop {
        if drained && in_flight.is_empty() && deferred.is_empty() {
            break;
        }
        let limit = if last_events >= PIPELINE_FROM_EVENTS {
            MAX_IN_FLIGHT
        } else {
            1
        };
        let room = in_flight.len() < limit && (in_flight.is_empty() || !chain.draining());
        // Start a batch when there is room and work that needs no waiting.
        if room {
            let ready = match deferred.pop_front() {
                Some(job) => Some(job),
                None => queue.try_recv().ok(),
            };
            if let Some(first) = ready {
                let batch = gather(first, &mut deferred, &mut queue, &config, busy).await;
                busy = batch.len() > 1;
                last_events = batch.iter().map(|job| job.append.n_events).sum();
                let link = chain.link(in_flight.is_empty(), &head, last_events, &config);
                in_flight.push_back(start(&pool, batch, &head, &config, link));
                continue;
            }
        }
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
                    let link = chain.link(in_flight.is_empty(), &head, last_events, &config);
                    in_flight.push_back(start(&pool, batch, &head, &config, link));
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
/// one had several appends), up to two yields let callers that were just
/// answered send their next append into this batch instead of the next: a
/// caller needs to be woken, prepare its append and send it, and on two
/// worker threads one turn is not enough for most of them (one yield gave
/// ~27 appends per transaction at 32 callers, two give 32).
///
/// Appends that pin a stream are decided under the lock (see
/// [`optimistic_plan`]), so a batch holds either only them or none of them:
/// one pinned append does not take a whole batch off the one-statement
/// path. The batch ends at the first append of the other kind, which starts
/// the next one: batches stay in queue order.
async fn gather(
    first: Job,
    deferred: &mut VecDeque<Job>,
    queue: &mut mpsc::Receiver<Job>,
    config: &WriterConfig,
    busy: bool,
) -> Vec<Job> {
    let pinned = first.append.pinned;
    let mut n_events = first.append.n_events;
    let mut batch = vec![first];
    let mut yields = if busy { 2 } else { 0 };
    while batch.len() < config.max_batch_appends && n_events < config.max_batch_events {
        let next = match deferred.pop_front() {
            Some(job) => job,
            None => match queue.try_recv() {
                Ok(job) => job,
                Err(_) if yields > 0 => {
                    yields -= 1;
                    tokio::task::yield_now().await;
                    continue;
                }
                Err(_) => break,
            },
        };
        if next.append.pinned != pinned {
            deferred.push_front(next);
            break;
        }
        n_events += next.append.n_events;
        batch.push(next);
    }
    batch
}

/// The batches of a pipeline that write before they lock (see
/// [`run_speculative`]): where the next one starts and which batch it comes
/// after.
struct Chain {
    /// Where the last batch started ends: the next one's first position - 1.
    end: u64,
    /// This writer's namespace for the advisory locks that order the chain.
    namespace: i32,
    sequence: i32,
    /// The last batch started, while it is in flight: its lock and the
    /// signal it gives once it holds that lock.
    last: Option<Predecessor>,
    /// Set by a batch of the chain that could not go ahead: the positions
    /// predicted for later batches are wrong, so none starts until the
    /// pipeline has drained.
    broken: Arc<AtomicBool>,
    /// Set by a batch that found the head moved by someone else (a writer in
    /// another process): writing ahead then wastes work, so batches take the
    /// lock first for a while.
    foreign: Arc<AtomicBool>,
    quiet_until: Option<Instant>,
    ahead: bool,
}

/// How long a writer takes the lock first after it saw another process
/// write the log between its own batches.
const QUIET_AFTER_FOREIGN_WRITE: Duration = Duration::from_secs(1);

impl Chain {
    fn new() -> Self {
        Self {
            end: 0,
            // The random tail of a UUIDv7: distinct per writer, so two
            // processes' chains do not wait for each other's locks.
            namespace: {
                let id = Uuid::now_v7();
                let b = id.as_bytes();
                i32::from_le_bytes([b[12], b[13], b[14], b[15]])
            },
            sequence: 0,
            last: None,
            broken: Arc::default(),
            foreign: Arc::default(),
            quiet_until: None,
            ahead: false,
        }
    }

    /// The link for a new batch of `n_events`, or `None` when it takes the
    /// lock first. Once a batch in flight writes before locking, every batch
    /// started while it is in flight must too: one that locked first would
    /// write at the positions the other holds and wait for it, while the
    /// other waits for the lock.
    fn link(
        &mut self,
        idle: bool,
        head: &watch::Sender<u64>,
        n_events: usize,
        config: &WriterConfig,
    ) -> Option<Link> {
        if idle {
            self.end = *head.borrow();
            self.last = None;
            self.broken.store(false, Ordering::Relaxed);
            let now = Instant::now();
            if self.foreign.swap(false, Ordering::Relaxed) {
                self.quiet_until = Some(now + QUIET_AFTER_FOREIGN_WRITE);
            }
            self.ahead = config.pause_before_commit.is_none()
                && self.quiet_until.is_none_or(|until| now >= until);
        }
        // Only a pipeline that starts idle may write ahead: every batch in
        // flight is then part of it.
        let chained = self.ahead && (self.last.is_some() || n_events >= PIPELINE_FROM_EVENTS);
        if !chained {
            self.last = None;
            return None;
        }
        self.sequence = self.sequence.wrapping_add(1);
        let (held, held_signal) = oneshot::channel();
        let (committed, committed_signal) = oneshot::channel();
        let link = Link {
            base: self.end,
            lock: (self.namespace, self.sequence),
            held,
            committed,
            after: self
                .last
                .replace((self.sequence, held_signal, committed_signal)),
            broken: self.broken.clone(),
            foreign: self.foreign.clone(),
        };
        self.end += n_events as u64;
        Some(link)
    }

    /// Whether a new batch must wait for the batches in flight to finish.
    fn draining(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }
}

/// Where a speculative batch starts and which batch it waits for.
struct Link {
    /// The head this batch assumes: where the batch before it ends.
    base: u64,
    /// The advisory lock this batch holds for its whole transaction, so the
    /// batch after it can wait for it inside PostgreSQL (where a deadlock is
    /// seen and broken) rather than in this process.
    lock: (i32, i32),
    /// Sent once this batch holds its lock.
    held: oneshot::Sender<()>,
    /// Sent once this batch has ended: whether it committed ahead.
    committed: oneshot::Sender<bool>,
    /// The batch before; `None` for the first batch of a pipeline.
    after: Option<Predecessor>,
    broken: Arc<AtomicBool>,
    foreign: Arc<AtomicBool>,
}

/// The batch before in a chain: its lock's sequence (same namespace) and its
/// `held` and `committed` signals.
type Predecessor = (i32, oneshot::Receiver<()>, oneshot::Receiver<bool>);

fn start<'a>(
    pool: &'a Pool,
    batch: Vec<Job>,
    head: &'a watch::Sender<u64>,
    config: &'a WriterConfig,
    link: Option<Link>,
) -> impl std::future::Future<Output = Vec<Job>> + 'a {
    let n_events: usize = batch.iter().map(|job| job.append.n_events).sum();
    config.stats.batches.fetch_add(1, Ordering::Relaxed);
    config
        .stats
        .appends
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    let span = info_span!("append_batch", n_appends = batch.len(), n_events);
    commit_batch(pool, batch, head, config, link).instrument(span)
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
    link: Option<Link>,
) -> Vec<Job> {
    let appends: Vec<&PreparedAppend> = batch.iter().map(|job| &job.append).collect();
    match try_commit(pool, &appends, config, link).await {
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
                deferred.extend(Box::pin(commit_batch(pool, vec![job], head, config, None)).await);
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
            // A pin was only checked: the outcome lists what was written.
            if !stream.events.is_empty() {
                appended.push(AppendedStream {
                    stream_id: stream.stream_id,
                    first_version,
                    last_version: state.current,
                });
            }
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

    /// Records each touched stream's version before the batch as a guard;
    /// with `skip_new`, not for streams expected not to exist: the unique
    /// (tenant, stream, version) index refuses their first event if they do.
    fn guard(&mut self, streams: &StreamVersions<'a>, skip_new: bool) {
        for ((tenant, id), state) in streams {
            if skip_new && state.before == 0 {
                continue;
            }
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
                // A pin is checked by the guard alone, which reads a
                // snapshot from before the lock when the statement waited
                // for it: a write to the stream meanwhile would pass unseen,
                // with no unique constraint to catch it. Pins are decided
                // under the lock.
                ExpectedVersion::Any | ExpectedVersion::Pinned(_) => return None,
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
    plan.guard(&streams, true);
    Some(plan)
}

async fn try_commit(
    pool: &Pool,
    appends: &[&PreparedAppend],
    config: &WriterConfig,
    mut link: Option<Link>,
) -> Result<(Vec<Decision>, u64), BatchError> {
    // A lock-first batch can be chosen as a deadlock victim when a writer in
    // another process writes ahead of the lock at the same positions (the
    // other side gives up after `ahead_lock_timeout!()`, but PostgreSQL may pick
    // this one first): nothing was written, so it is tried again.
    let mut attempt = 1;
    loop {
        match try_commit_once(pool, appends, config, link.take()).await {
            Err(BatchError::RolledBack(error)) if attempt < 3 && is_transient(&error) => {
                tracing::warn!(error = %describe(&error), attempt, "batch rolled back; trying again");
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

fn is_transient(error: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    error.code().is_some_and(|code| {
        *code == SqlState::T_R_DEADLOCK_DETECTED || *code == SqlState::LOCK_NOT_AVAILABLE
    })
}

async fn try_commit_once(
    pool: &Pool,
    appends: &[&PreparedAppend],
    config: &WriterConfig,
    link: Option<Link>,
) -> Result<(Vec<Decision>, u64), BatchError> {
    let client = pool.get().await.map_err(|e| BatchError::Connection {
        message: e.to_string(),
        during_commit: false,
    })?;
    let outcome = async {
        if let Some(link) = link {
            if let Some(done) = run_speculative(&client, optimistic_plan(appends), link).await? {
                config.stats.written_ahead.fetch_add(1, Ordering::Relaxed);
                return Ok(done);
            }
            config.stats.fell_back.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(plan) = optimistic_plan(appends) {
            match run_fast(&client, plan, config).await {
                Ok(Some(done)) => return Ok(done),
                Ok(None) => {}
                // A constraint refused what the guard does not check (a
                // stream expected new that exists, a key that exists, a
                // value held by another stream), or the guard read a
                // snapshot from before the lock was free (the statement
                // waited for another batch) and passed for a stream that
                // batch had just written. Decide under the lock.
                Err(BatchError::RolledBack(error))
                    if error.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                }
                Err(error) => return Err(error),
            }
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
/// `checked` as for [`write_statement`].
async fn write_and_commit(
    client: &deadpool_postgres::Client,
    statements: &Statements,
    plan: &WritePlan<'_>,
    checked: bool,
    config: &WriterConfig,
) -> Result<(bool, u64), BatchError> {
    let pg = |e| BatchError::from_pg(e, false);
    let n_events = plan.n_events as i64;
    let params = write_params(plan, &n_events);
    let write = write_statement(client, plan, checked, false).await?;
    let written = client.query_one(&write, &params);
    let row = if let Some(pause) = config.pause_before_commit {
        let row = match written.await {
            Ok(row) => row,
            Err(error) => {
                // The fast path decides again under the lock on this
                // connection: end the failed transaction first.
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(pg(error));
            }
        };
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
/// `checked`: the guard checks idempotency keys and claims as well (the
/// careful path, which read them under the lock and must not fail on them).
async fn write_statement(
    client: &deadpool_postgres::Client,
    plan: &WritePlan<'_>,
    checked: bool,
    speculative: bool,
) -> Result<tokio_postgres::Statement, BatchError> {
    let variant = Variant {
        guard: !plan.guard_ids.is_empty(),
        checked,
        keys: !plan.keys.is_empty(),
        claims: !plan.claim_tenants.is_empty(),
        releases: !plan.release_tenants.is_empty(),
        transfers: !plan.transfer_tenants.is_empty(),
        subject_keys: !plan.subject_ids.is_empty(),
        speculative,
    };
    client
        .prepare_typed_cached(write_variant(variant), &WRITE_TYPES)
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
        let write = write_and_commit(client, &statements, &plan, false, config);
        let (begun, written) = futures_util::future::join(begin, write).await;
        begun.map_err(pg)?;
        written?
    } else {
        let n_events = plan.n_events as i64;
        let write = write_statement(client, &plan, false, false).await?;
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

/// How long a batch that writes before locking waits for a row or for the
/// log lock before it gives up and takes the lock first instead. Its write
/// waits for a row only when another transaction writes the same stream
/// version or key, and the log lock is normally free by the time the batch
/// before has ended; a longer wait means a writer in another process holds
/// the lock and may be waiting for this batch's rows, a deadlock that this
/// ends sooner than PostgreSQL's detector would (`deadlock_timeout`, 1 s).
macro_rules! ahead_lock_timeout {
    () => {
        "100ms"
    };
}

/// The message of MOVE_HEAD's refusal, which the writer tells apart from
/// other refusals.
macro_rules! head_moved {
    () => {
        "the log head moved"
    };
}

/// Takes a speculative batch's own advisory lock (never contended: the
/// batch after waits for it only once it is held).
const HOLD_LOCK: &str = "SELECT pg_advisory_xact_lock($1::int, $2::int)";
/// Moves the head past a speculative batch if it is at `base`; waits for the
/// log lock first. No condition on the position in the WHERE clause: a READ
/// COMMITTED UPDATE skips, without waiting, a row whose version in its
/// snapshot fails the condition. A wrong start aborts the transaction, which
/// undoes the move.
const MOVE_HEAD: &str = concat!(
    "WITH moved AS ( \
       UPDATE log_head SET position = position + $2::bigint \
       WHERE id = 1 RETURNING position - $2::bigint AS before) \
     SELECT crm_require(coalesce((SELECT before FROM moved) = $1::bigint, false), '",
    head_moved!(),
    "'), pg_notify('crm_events', ($1::bigint + $2::bigint)::text)"
);
/// Opens a batch that writes ahead, with its lock timeout.
const BEGIN_AHEAD: &str = concat!(
    "BEGIN; SET LOCAL lock_timeout = '",
    ahead_lock_timeout!(),
    "'"
);

/// A batch that writes before it locks, so that its inserts run while the
/// batches before it still write and commit. One transaction, one round
/// trip plus a signal between batches:
///
/// 1. BEGIN, this batch's advisory lock, and the guarded write at positions
///    from `link.base` are sent at once; once the lock is held the batch
///    after this one is told.
/// 2. Once the batch before holds its own advisory lock: wait for that lock
///    (the batch before has ended), move the head from exactly `link.base`
///    under the log lock, and COMMIT.
///
/// Positions stay dense and commit-ordered: the head moves, under the log
/// lock, only from where this batch's rows start. Every wait that can close a
/// cycle (a row another batch wrote, an advisory lock, the log lock) is a
/// wait inside PostgreSQL, whose deadlock detector breaks it; the one wait in
/// this process (for the batch before to hold its advisory lock) ends without
/// any lock, as that lock is the first thing the batch before takes.
///
/// `None` when the batch could not go this way (no optimistic plan, a guard
/// or unique constraint refused it, or the head was not at `base`): it rolled
/// back and nothing was written. The chain is then marked broken so no later
/// batch starts from a position predicted past it.
async fn run_speculative(
    client: &deadpool_postgres::Client,
    plan: Option<WritePlan<'_>>,
    link: Link,
) -> Result<Option<(Vec<Decision>, u64)>, BatchError> {
    let Link {
        base,
        lock,
        held,
        committed,
        after,
        broken,
        foreign,
    } = link;
    let (after_held, after_committed) = match after {
        Some((sequence, held, committed)) => (Some((sequence, held)), Some(committed)),
        None => (None, None),
    };
    let outcome = match plan {
        Some(plan) => speculate(client, plan, base, lock, held, after_held).await,
        None => Ok(Ahead::RolledBack),
    };
    let _ = committed.send(matches!(outcome, Ok(Ahead::Committed(_))));
    match outcome {
        Ok(Ahead::Committed(done)) => return Ok(Some(done)),
        Ok(Ahead::HeadMoved) => {
            // The batch before ended (this one waited for it). If it
            // committed where this one expected, someone else moved the head.
            let before_committed = match after_committed {
                Some(signal) => signal.await.unwrap_or(false),
                None => true,
            };
            if before_committed {
                foreign.store(true, Ordering::Relaxed);
            }
        }
        Ok(Ahead::RolledBack) | Err(_) => {
            // Fall back only once the batch before has ended: locking first
            // while it is in flight would write at its positions, wait for
            // its rows, and make it time out and roll back.
            if let Some(signal) = after_committed {
                let _ = signal.await;
            }
        }
    }
    broken.store(true, Ordering::Relaxed);
    outcome.map(|_| None)
}

/// How a batch that wrote ahead of the lock ended.
enum Ahead {
    Committed((Vec<Decision>, u64)),
    /// Refused before the head: a guard, a constraint, a lock timeout.
    RolledBack,
    /// The head was not where the batch started.
    HeadMoved,
}

async fn speculate(
    client: &deadpool_postgres::Client,
    plan: WritePlan<'_>,
    base: u64,
    lock: (i32, i32),
    held: oneshot::Sender<()>,
    after: Option<(i32, oneshot::Receiver<()>)>,
) -> Result<Ahead, BatchError> {
    use futures_util::future::{join, join3, maybe_done};
    use std::pin::pin;
    use std::task::Poll;
    let pg = |e| BatchError::from_pg(e, false);
    let statements = statements(client).await?;
    let write = write_statement(client, &plan, false, true).await?;
    let hold_lock = client.prepare_cached(HOLD_LOCK).await.map_err(pg)?;
    let move_head = client
        .prepare_typed_cached(MOVE_HEAD, &[Type::INT8, Type::INT8])
        .await
        .map_err(pg)?;
    let base_position = base as i64;
    let n_events = plan.n_events as i64;
    {
        let params = write_params(&plan, &base_position);

        // Step 1: each request goes out when its future is first polled, in
        // this order; the write runs while this task waits for the batch before.
        let mut begun = pin!(maybe_done(client.batch_execute(BEGIN_AHEAD)));
        let mut holding = pin!(maybe_done(async {
            let holding = client.query_one(&hold_lock, &[&lock.0, &lock.1]).await;
            if holding.is_ok() {
                let _ = held.send(());
            }
            holding
        }));
        let mut written = pin!(maybe_done(client.query_one(&write, &params)));
        futures_util::future::poll_fn(|cx| {
            let _ = begun.as_mut().poll(cx);
            let _ = holding.as_mut().poll(cx);
            let _ = written.as_mut().poll(cx);
            Poll::Ready(())
        })
        .await;
        // A write refused before it was sent (its parameters did not
        // encode) leaves the transaction healthy: a COMMIT would move the
        // head past rows that were never written. End it instead.
        let unsent =
            matches!(written.as_mut().output_mut(), Some(Err(e)) if e.as_db_error().is_none());
        if unsent && let Some(Err(error)) = written.as_mut().take_output() {
            let _ = join(holding.as_mut(), begun.as_mut()).await;
            client.batch_execute("ROLLBACK").await.map_err(pg)?;
            return Err(pg(error));
        }
        let before = async {
            let (sequence, signal) = after?;
            // Dropped unsent: the batch before never took its lock, so it is
            // not writing ahead of this one.
            signal.await.ok().map(|()| (lock.0, sequence))
        };
        let ((), before) = join(holding.as_mut(), before).await;

        // Step 2: pipelined behind the write.
        let waited = async {
            match before {
                Some((namespace, sequence)) => {
                    client
                        .batch_execute(&format!(
                            "SET LOCAL lock_timeout = 0; \
                             SELECT pg_advisory_xact_lock_shared({namespace}, {sequence}); \
                             SET LOCAL lock_timeout = '{}'",
                            ahead_lock_timeout!()
                        ))
                        .await
                }
                None => Ok(()),
            }
        };
        let ((), (), (waited, moved, committed)) = join3(
            begun.as_mut(),
            written.as_mut(),
            join3(
                waited,
                client.query_one(&move_head, &[&base_position, &n_events]),
                client.execute(&statements.commit, &[]),
            ),
        )
        .await;
        committed.map_err(|e| BatchError::from_pg(e, true))?;
        // Every step was awaited to its end, so each has its output.
        let steps = [
            begun.as_mut().take_output().map_or(Ok(()), |r| r),
            holding
                .as_mut()
                .take_output()
                .map_or(Ok(()), |r| r.map(drop)),
            written
                .as_mut()
                .take_output()
                .map_or(Ok(()), |r| r.map(drop)),
            waited,
            moved.map(drop),
        ];
        for step in steps {
            if let Err(error) = step {
                return match error.as_db_error() {
                    None => Err(pg(error)),
                    Some(db) if db.message() == head_moved!() => Ok(Ahead::HeadMoved),
                    // Refused: the transaction rolled back (the COMMIT said so).
                    Some(_) => Ok(Ahead::RolledBack),
                };
            }
        }
    }
    let new_head = base + plan.n_events;
    Ok(Ahead::Committed((plan.into_decisions(base), new_head)))
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
    plan.guard(&streams, false);
    let (ok, written_head) = write_and_commit(client, &statements, &plan, true, config).await?;
    if !ok || written_head != head {
        // We hold the lock, so the state cannot have moved: the database is
        // not what this writer expects. Report rather than guess.
        return Err(BatchError::Inconsistent);
    }
    let decided = plan
        .decisions
        .iter()
        .filter(|d| matches!(d, Decision::Done(_)))
        .count();
    config
        .stats
        .decided_under_lock
        .fetch_add(decided as u64, Ordering::Relaxed);
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
            ExpectedVersion::Exact(n) | ExpectedVersion::Pinned(n) => state.current == n,
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
