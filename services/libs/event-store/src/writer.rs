//! The writer: one task per store that turns queued appends into few
//! transactions (group commit in the application).
//!
//! Each batch transaction:
//! 1. locks `log_head` (so transactions commit in position order across every
//!    process writing the log),
//! 2. reads the current version of every stream and every idempotency key the
//!    batch touches,
//! 3. decides each append in queue order against that state plus the appends
//!    already accepted in the batch (so each caller gets its own conflict or
//!    success),
//! 4. writes events, stream versions, idempotency outcomes and the new head in
//!    one statement, notifies listeners, and commits.
//!
//! If the database rejects a batch, it rolled back as a whole, so every append
//! in it is retried alone, which attributes the failure to the one that caused
//! it. If the connection fails during commit, the outcome is unknown and is
//! reported as such (a retry with the same idempotency key is safe).
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span};
use uuid::Uuid;

use crate::append::{Appended, AppendedStream, ExpectedVersion, PreparedAppend};
use crate::error::AppendError;

pub(crate) struct Job {
    pub append: PreparedAppend,
    pub reply: oneshot::Sender<Result<Appended, AppendError>>,
}

pub(crate) struct WriterConfig {
    pub max_batch_appends: usize,
    pub max_batch_events: usize,
    pub pause_before_commit: Option<Duration>,
}

const LOCK_HEAD: &str = "SELECT position FROM log_head WHERE id = 1 FOR UPDATE";

const SELECT_STREAMS: &str = "SELECT s.tenant_id, s.stream_id, s.stream_type, s.version \
     FROM streams s JOIN unnest($1::text[], $2::uuid[]) AS k(tenant_id, stream_id) \
     USING (tenant_id, stream_id)";

const SELECT_KEYS: &str = "SELECT i.tenant_id, i.key, i.request_hash, i.outcome::text \
     FROM idempotency_keys i JOIN unnest($1::text[], $2::text[]) AS k(tenant_id, key) \
     USING (tenant_id, key)";

const WRITE_BATCH: &str = "WITH new_events AS ( \
       INSERT INTO events (global_position, event_id, tenant_id, stream_type, stream_id, \
                           stream_version, event_type, schema_version, payload, metadata) \
       SELECT p, e, t, st, s, v, et, sv, pl::jsonb, md::jsonb \
       FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::uuid[], $6::bigint[], \
                   $7::text[], $8::int[], $9::text[], $10::text[]) \
            AS x(p, e, t, st, s, v, et, sv, pl, md) \
     ), stream_versions AS ( \
       INSERT INTO streams (tenant_id, stream_id, stream_type, version) \
       SELECT * FROM unnest($11::text[], $12::uuid[], $13::text[], $14::bigint[]) \
       ON CONFLICT (tenant_id, stream_id) \
       DO UPDATE SET version = EXCLUDED.version, updated_at = now() \
     ), outcomes AS ( \
       INSERT INTO idempotency_keys (tenant_id, key, request_hash, outcome) \
       SELECT t, k, h, o::jsonb FROM unnest($15::text[], $16::text[], $17::bytea[], $18::text[]) \
            AS x(t, k, h, o) \
     ), new_head AS ( \
       UPDATE log_head SET position = $19 WHERE id = 1 \
     ) \
     SELECT pg_notify('crm_events', $19::text)";

/// Runs until cancelled, then drains what is queued and returns.
pub(crate) async fn run(
    pool: Pool,
    mut queue: mpsc::Receiver<Job>,
    head: watch::Sender<u64>,
    config: WriterConfig,
    cancel: CancellationToken,
) {
    let mut deferred: VecDeque<Job> = VecDeque::new();
    let mut closed = false;
    loop {
        let first = match deferred.pop_front() {
            Some(job) => job,
            None => {
                let next = if closed {
                    queue.recv().await
                } else {
                    tokio::select! {
                        biased;
                        job = queue.recv() => job,
                        () = cancel.cancelled() => {
                            queue.close();
                            closed = true;
                            continue;
                        }
                    }
                };
                match next {
                    Some(job) => job,
                    None => break,
                }
            }
        };
        let mut n_events = first.append.n_events;
        let mut batch = vec![first];
        while batch.len() < config.max_batch_appends && n_events < config.max_batch_events {
            let next = match deferred.pop_front() {
                Some(job) => job,
                None => match queue.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            n_events += next.append.n_events;
            batch.push(next);
        }
        let span = info_span!("append_batch", n_appends = batch.len(), n_events);
        let again = commit_batch(&pool, batch, &head, &config)
            .instrument(span)
            .await;
        deferred.extend(again);
    }
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

#[derive(Debug, thiserror::Error)]
enum BatchError {
    /// The server refused a statement: the transaction did not commit.
    #[error("rolled back: {0}")]
    RolledBack(tokio_postgres::Error),
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
            Self::RolledBack(error) => AppendError::Unavailable {
                message: error.to_string(),
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

/// Column vectors for the batch's one write statement.
#[derive(Default)]
struct Rows<'a> {
    positions: Vec<i64>,
    event_ids: Vec<Uuid>,
    tenants: Vec<&'a str>,
    stream_types: Vec<&'a str>,
    stream_ids: Vec<Uuid>,
    versions: Vec<i64>,
    event_types: Vec<&'a str>,
    schema_versions: Vec<i32>,
    payloads: Vec<&'a str>,
    metadata: Vec<&'a str>,
    key_tenants: Vec<&'a str>,
    keys: Vec<&'a str>,
    key_hashes: Vec<&'a [u8]>,
    outcomes: Vec<String>,
}

type StreamKey<'a> = (&'a str, Uuid);

async fn try_commit(
    pool: &Pool,
    appends: &[&PreparedAppend],
    config: &WriterConfig,
) -> Result<(Vec<Decision>, u64), BatchError> {
    let client = pool.get().await.map_err(|e| BatchError::Connection {
        message: e.to_string(),
        during_commit: false,
    })?;
    let outcome = run_batch(&client, appends, config).await;
    if outcome.is_err() {
        // Never hand a connection in an unknown transaction state back to the
        // pool: detach and close it (closing rolls back whatever is open).
        drop(deadpool_postgres::Object::take(client));
    }
    outcome
}

/// One batch transaction on `client`, in two round trips: BEGIN, the lock and
/// the reads go out together (the server runs them in order, so the reads'
/// snapshots are taken after the lock is held); then the write and COMMIT.
async fn run_batch(
    client: &deadpool_postgres::Client,
    appends: &[&PreparedAppend],
    config: &WriterConfig,
) -> Result<(Vec<Decision>, u64), BatchError> {
    let pg = |e| BatchError::from_pg(e, false);
    let begin = client.prepare_cached("BEGIN").await.map_err(pg)?;
    let lock = client.prepare_cached(LOCK_HEAD).await.map_err(pg)?;
    let select_streams = client.prepare_cached(SELECT_STREAMS).await.map_err(pg)?;
    let select_keys = client.prepare_cached(SELECT_KEYS).await.map_err(pg)?;
    let write = client.prepare_cached(WRITE_BATCH).await.map_err(pg)?;
    let commit = client.prepare_cached("COMMIT").await.map_err(pg)?;

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
    // READ COMMITTED (the default): each statement after the lock sees every
    // transaction that committed before we got it.
    let (_, head_row, stream_rows, key_rows) = futures_util::future::try_join4(
        client.execute(&begin, &[]),
        client.query_one(&lock, &[]),
        client.query(&select_streams, &[&stream_tenants, &stream_ids]),
        client.query(&select_keys, &[&key_tenants, &keys]),
    )
    .await
    .map_err(pg)?;
    let head: i64 = head_row.get(0);

    // Current state of every stream the batch touches: (type, version).
    let mut streams: HashMap<(String, Uuid), (String, u64)> = HashMap::new();
    for row in &stream_rows {
        let version: i64 = row.get(3);
        streams.insert(
            (row.get(0), row.get(1)),
            (row.get(2), u64::try_from(version).unwrap_or(0)),
        );
    }
    let mut stored_keys: HashMap<(String, String), (Vec<u8>, String)> = HashMap::new();
    for row in &key_rows {
        stored_keys.insert((row.get(0), row.get(1)), (row.get(2), row.get(3)));
    }

    let mut rows = Rows::default();
    let mut position = u64::try_from(head).unwrap_or(0);
    let mut batch_keys: HashSet<(&str, &str)> = HashSet::new();
    let mut stream_updates: HashMap<StreamKey<'_>, (&str, u64)> = HashMap::new();
    let mut decisions = Vec::with_capacity(appends.len());

    for append in appends {
        let request = &append.request;
        let tenant = request.tenant_id.as_str();
        if let Some(key) = request.idempotency_key.as_deref() {
            if let Some((hash, outcome)) = stored_keys.get(&(tenant.to_owned(), key.to_owned())) {
                decisions.push(Decision::Done(replay(append, key, hash, outcome)));
                continue;
            }
            if batch_keys.contains(&(tenant, key)) {
                decisions.push(Decision::Defer);
                continue;
            }
        }
        if let Err(error) = check_versions(append, &streams) {
            decisions.push(Decision::Done(Err(error)));
            continue;
        }
        let first_position = position + 1;
        let mut appended = Vec::with_capacity(request.streams.len());
        let mut payloads = append.payloads.iter();
        for stream in &request.streams {
            let entry = streams
                .entry((tenant.to_owned(), stream.stream_id))
                .or_insert_with(|| (stream.stream_type.clone(), 0));
            let first_version = entry.1 + 1;
            for event in &stream.events {
                position += 1;
                entry.1 += 1;
                rows.positions.push(position as i64);
                rows.event_ids.push(event.event_id);
                rows.tenants.push(tenant);
                rows.stream_types.push(&stream.stream_type);
                rows.stream_ids.push(stream.stream_id);
                rows.versions.push(entry.1 as i64);
                rows.event_types.push(&event.event_type);
                rows.schema_versions.push(event.schema_version as i32);
                rows.payloads
                    .push(payloads.next().map(String::as_str).unwrap_or("{}"));
                rows.metadata.push(&append.metadata);
            }
            stream_updates.insert((tenant, stream.stream_id), (&stream.stream_type, entry.1));
            appended.push(AppendedStream {
                stream_id: stream.stream_id,
                first_version,
                last_version: entry.1,
            });
        }
        let outcome = Appended {
            first_position,
            last_position: position,
            streams: appended,
            replayed: false,
        };
        if let Some(key) = request.idempotency_key.as_deref() {
            batch_keys.insert((tenant, key));
            rows.key_tenants.push(tenant);
            rows.keys.push(key);
            rows.key_hashes.push(&append.fingerprint);
            rows.outcomes
                .push(serde_json::to_string(&outcome).unwrap_or_default());
        }
        decisions.push(Decision::Done(Ok(outcome)));
    }

    let new_head = position;
    if new_head > head as u64 {
        let mut update_tenants = Vec::with_capacity(stream_updates.len());
        let mut update_ids = Vec::with_capacity(stream_updates.len());
        let mut update_types = Vec::with_capacity(stream_updates.len());
        let mut update_versions = Vec::with_capacity(stream_updates.len());
        for ((tenant, id), (stream_type, version)) in &stream_updates {
            update_tenants.push(*tenant);
            update_ids.push(*id);
            update_types.push(*stream_type);
            update_versions.push(*version as i64);
        }
        let new_head_param = new_head as i64;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 19] = [
            &rows.positions,
            &rows.event_ids,
            &rows.tenants,
            &rows.stream_types,
            &rows.stream_ids,
            &rows.versions,
            &rows.event_types,
            &rows.schema_versions,
            &rows.payloads,
            &rows.metadata,
            &update_tenants,
            &update_ids,
            &update_types,
            &update_versions,
            &rows.key_tenants,
            &rows.keys,
            &rows.key_hashes,
            &rows.outcomes,
            &new_head_param,
        ];
        let written = client.query_one(&write, &params);
        if let Some(pause) = config.pause_before_commit {
            written.await.map_err(pg)?;
            tokio::time::sleep(pause).await;
            client
                .execute(&commit, &[])
                .await
                .map_err(|e| BatchError::from_pg(e, true))?;
        } else {
            // Pipelined: if the write fails, the server answers the COMMIT
            // with a rollback, and the write's error is what we report.
            let (written, committed) =
                futures_util::future::join(written, client.execute(&commit, &[])).await;
            written.map_err(pg)?;
            committed.map_err(|e| BatchError::from_pg(e, true))?;
        }
    } else {
        client
            .execute(&commit, &[])
            .await
            .map_err(|e| BatchError::from_pg(e, true))?;
    }
    Ok((decisions, new_head))
}

fn replay(
    append: &PreparedAppend,
    key: &str,
    stored_hash: &[u8],
    stored_outcome: &str,
) -> Result<Appended, AppendError> {
    if stored_hash != append.fingerprint {
        return Err(AppendError::IdempotencyKeyReused {
            key: key.to_owned(),
        });
    }
    let mut outcome: Appended =
        serde_json::from_str(stored_outcome).map_err(|e| AppendError::Unavailable {
            message: format!("stored idempotency outcome is unreadable: {e}"),
            outcome_unknown: false,
        })?;
    outcome.replayed = true;
    Ok(outcome)
}

fn check_versions(
    append: &PreparedAppend,
    streams: &HashMap<(String, Uuid), (String, u64)>,
) -> Result<(), AppendError> {
    let tenant = append.request.tenant_id.as_str().to_owned();
    for stream in &append.request.streams {
        let current = streams.get(&(tenant.clone(), stream.stream_id));
        if let Some((stream_type, _)) = current
            && *stream_type != stream.stream_type
        {
            return Err(AppendError::WrongStreamType {
                stream_id: stream.stream_id,
                actual: stream_type.clone(),
            });
        }
        let current_version = current.map_or(0, |(_, version)| *version);
        let ok = match stream.expected {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current_version == 0,
            ExpectedVersion::Exact(n) => current_version == n,
        };
        if !ok {
            return Err(AppendError::VersionConflict {
                stream_id: stream.stream_id,
                expected: stream.expected.describe(),
                current: current_version,
            });
        }
    }
    Ok(())
}
