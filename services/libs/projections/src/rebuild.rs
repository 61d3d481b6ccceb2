//! Blue/green rebuild of projections from the event store.
//!
//! Each projection's new tables are built in a schema of their own
//! (`rebuild_<name>`, found first on its rebuild connection's search path,
//! so the projection's own SQL writes there unchanged), from position 0 to
//! the log's head, in transactions of `chunk` events. Several projections
//! rebuilt together share one read of the log: each event goes to those
//! that read it (`reads`, as their live consumers) and `handles` it, each
//! projection applying on its own connection. The indexes only queries use
//! ([`Projection::query_indexes`]) are created once the tables are full.
//! Then, per projection, in one transaction that holds the live status row
//! (so its projector waits), the rebuild catches up to the live position,
//! the live tables are dropped, the new ones moved in, and the live
//! position set: readers see the old tables or the new ones, never a mix.
use std::sync::Arc;

use crm_event_store::{EventStore, Filter, RecordedEvent};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::NoTls;

use crate::fresh::Fresh;
use crate::runtime::{Projection, STATUS_SCHEMA, StateCache, Tx};

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("PostgreSQL: {}", crate::runtime::described(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("no PostgreSQL connection: {0}")]
    Pool(String),
    #[error("event store: {0}")]
    Read(#[from] crm_event_store::ReadError),
    #[error("{projection}: event at position {position} cannot be applied: {error}")]
    Poison {
        projection: &'static str,
        position: u64,
        error: String,
    },
    #[error("a rebuild of {0} is already running")]
    AlreadyRunning(String),
    #[error(
        "{projection}: {index}, named among its query indexes, is not a non-unique index its schema creates"
    )]
    NotAQueryIndex {
        projection: &'static str,
        index: &'static str,
    },
    #[error(
        "{projection}: {key}, named among its rebuild keys, is not a primary key its schema creates"
    )]
    NotARebuildKey {
        projection: &'static str,
        key: &'static str,
    },
}

/// How far a rebuild has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub position: u64,
    pub head: u64,
}

/// Events per rebuild transaction: what `crm projections rebuild` and the
/// admin RPC use. Larger chunks mean fewer and larger statements per table:
/// each `COPY` into a table costs PostgreSQL 15 time that grows with the
/// square of the rows it buffers (every buffered row's slot pins the
/// table's tuple descriptor in the statement's resource owner, whose hash
/// of one repeated pointer probes linearly), up to its buffer of 1,000 rows
/// or 64 kB. 25,000 rather than 5,000 took a 1M-event rebuild's PostgreSQL
/// time from 13.9–14.3 to 12.8–13.0 cpu-s (`docs/benchmarks.md`). The
/// first chunks are smaller (see `chunk_after`).
pub const CHUNK: u64 = 25_000;

/// Rebuilds `projection` and swaps it in; returns the position it swapped
/// in at. `progress` is called after every chunk.
pub async fn rebuild(
    projection: Arc<dyn Projection>,
    store: &EventStore,
    pg: &tokio_postgres::Config,
    chunk: u64,
    progress: impl FnMut(Progress),
) -> Result<u64, RebuildError> {
    let swapped = rebuild_many(vec![projection], store, pg, chunk, progress).await?;
    Ok(swapped.first().map_or(0, |(_, position)| *position))
}

/// One message to a projection's rebuild worker.
enum Work {
    /// The next events it handles, in log order (up to [`BATCH`]: one
    /// message, and one wake-up of the worker, per batch, not per event).
    Events(Vec<Arc<RecordedEvent>>),
    /// Every event up to here has been sent: commit.
    Through(u64),
    /// The log has been read to its head: the tables are full. (Not sent
    /// when the reading stops early: then nothing is swapped in, and
    /// nothing more is built.)
    End,
}

/// Rebuilds `projections` over one shared read of the log and swaps each in;
/// returns the position each swapped in at, in order. `progress` is called
/// after every chunk has been handed to every projection. The first failure
/// stops them all; nothing is swapped unless every one reached the head.
pub async fn rebuild_many(
    projections: Vec<Arc<dyn Projection>>,
    store: &EventStore,
    pg: &tokio_postgres::Config,
    chunk: u64,
    mut progress: impl FnMut(Progress),
) -> Result<Vec<(&'static str, u64)>, RebuildError> {
    let began = std::time::Instant::now();
    // The first alone (it may create the live status table, which two
    // sessions cannot both create at once), then the others together: each
    // creates only its own schema's tables, on its own connection.
    let mut prepared = Vec::with_capacity(projections.len());
    if let Some((first, others)) = projections.split_first() {
        prepared.push(prepare(first.as_ref(), pg).await?);
        prepared.extend(
            futures_util::future::try_join_all(
                others
                    .iter()
                    .map(|projection| prepare(projection.as_ref(), pg)),
            )
            .await?,
        );
    }
    tracing::info!(
        projections = projections.len(),
        seconds = began.elapsed().as_secs_f64(),
        "rebuild tables created"
    );
    let mut senders = Vec::with_capacity(projections.len());
    let mut workers = Vec::with_capacity(projections.len());
    for (projection, prepared) in projections.iter().zip(prepared) {
        // Room for the reader to run well ahead (events are shared, so a
        // slot is a few pointers): one worker's commit must not stall the
        // others.
        let (sender, receiver) = mpsc::channel(AHEAD / BATCH);
        senders.push(sender);
        workers.push(tokio::spawn(work(
            projection.clone(),
            prepared,
            receiver,
            pg.clone(),
        )));
    }
    let read = async {
        let mut position = 0u64;
        let mut batches: Vec<Vec<Arc<RecordedEvent>>> = vec![Vec::new(); senders.len()];
        loop {
            let head = store.head().await?;
            if head <= position {
                for sender in &senders {
                    // A worker gone has failed: its error is reported below.
                    let _ = sender.send(Work::End).await;
                }
                return Ok::<_, RebuildError>(position);
            }
            while position < head {
                let until = head.min(position + chunk_after(position, chunk));
                let mut events = store.replay(position, until, Filter::default());
                while let Some(event) = events.next().await {
                    let mut event = event?;
                    // Handed to every read model: decoded once for all.
                    event.decoded = crm_event_store::Decoded::shared();
                    let event = Arc::new(event);
                    for ((projection, sender), batch) in
                        projections.iter().zip(&senders).zip(&mut batches)
                    {
                        // What its live consumers deliver and it handles.
                        if projection.reads(&event.stream_type, &event.event_type)
                            && projection.handles(&event.stream_type, &event.event_type)
                        {
                            batch.push(event.clone());
                            if batch.len() >= BATCH
                                && sender
                                    .send(Work::Events(std::mem::take(batch)))
                                    .await
                                    .is_err()
                            {
                                return Ok(position); // that worker failed: see below
                            }
                        }
                    }
                }
                for (sender, batch) in senders.iter().zip(&mut batches) {
                    if !batch.is_empty()
                        && sender
                            .send(Work::Events(std::mem::take(batch)))
                            .await
                            .is_err()
                    {
                        return Ok(position);
                    }
                    if sender.send(Work::Through(until)).await.is_err() {
                        return Ok(position);
                    }
                }
                position = until;
                progress(Progress { position, head });
            }
        }
    };
    let read = read.await;
    drop(senders);
    // A worker's failure is the cause when the reader stopped early.
    let mut built = Vec::with_capacity(workers.len());
    let mut failed = None;
    for worker in workers {
        match worker.await {
            Ok(Ok(done)) => built.push(done),
            Ok(Err(error)) => {
                failed.get_or_insert(error);
            }
            Err(join) => {
                failed.get_or_insert(RebuildError::Pool(format!("rebuild worker: {join}")));
            }
        }
    }
    if let Some(error) = failed {
        return Err(error);
    }
    let read = read?;
    let mut swapped = Vec::with_capacity(built.len());
    for (projection, (client, position)) in projections.iter().zip(built) {
        debug_assert_eq!(position, read);
        let position = swap(projection.as_ref(), store, client, position).await?;
        swapped.push((projection.name(), position));
    }
    Ok(swapped)
}

/// A rebuild's connection, and the statements that create the indexes and
/// keys it adds once its tables are full ([`Projection::query_indexes`],
/// [`Projection::rebuild_keys`]).
struct Prepared {
    client: Object,
    deferred_indexes: Vec<String>,
    /// The rebuild tables its schema left empty, with their columns' types:
    /// a worker knows which keys they hold ([`Fresh`]).
    empty: Vec<(String, crate::fresh::Columns)>,
}

/// A connection of its own for `projection`'s rebuild: holds the rebuild
/// lock, creates the rebuild schema and its tables, without the indexes
/// only queries use.
async fn prepare(
    projection: &dyn Projection,
    pg: &tokio_postgres::Config,
) -> Result<Prepared, RebuildError> {
    let name = projection.name();
    let schema = format!("rebuild_{name}");
    let manager = Manager::from_config(
        pg.clone(),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(1)
        .build()
        .map_err(|e| RebuildError::Pool(e.to_string()))?;
    let client = pool
        .get()
        .await
        .map_err(|e| RebuildError::Pool(e.to_string()))?;
    // One rebuild per projection at a time (held until this connection ends).
    let lock_key = crm_event_store::advisory_lock_key(&format!("crm-rebuild:{name}"));
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&lock_key])
        .await?
        .get(0);
    if !locked {
        return Err(RebuildError::AlreadyRunning(name.to_owned()));
    }
    // The live status row first (in `public`, the default path), then the
    // rebuild's own tables and status row in its schema. Its commits need not
    // wait for the disk: a crash loses only the rebuild, which starts over.
    // Its `ANALYZE`s only need to show the planner that the tables grew
    // (index lookups, not scans): a sample of 3,000 rows, not 30,000. The
    // swapped-in tables keep those statistics until autovacuum analyses
    // them with the usual target, once a tenth of their rows are newer than
    // the last `ANALYZE` (at once for rebuilds past `LAST_ANALYZE` events).
    client
        .batch_execute(&format!(
            "SET synchronous_commit = off; SET default_statistics_target = 10; \
             {STATUS_SCHEMA}; INSERT INTO projections (name) VALUES ('{name}') \
             ON CONFLICT DO NOTHING; \
             DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; \
             SET search_path TO {schema}, public; {STATUS_SCHEMA}; {}; \
             INSERT INTO projections (name) VALUES ('{name}');",
            projection.schema()
        ))
        .await?;
    // No autovacuum while they fill: it would compete for the CPU, and one
    // still running at the swap holds it up until PostgreSQL cancels it
    // (after `deadlock_timeout`, a second per table). `swap` turns it back on.
    let no_autovacuum: String = projection
        .tables()
        .iter()
        .map(|table| format!("ALTER TABLE {schema}.{table} SET (autovacuum_enabled = false); "))
        .collect();
    client.batch_execute(&no_autovacuum).await?;
    // The indexes only queries use: their definitions kept as the schema
    // made them (names, columns, predicates), then dropped until `finish`.
    let mut deferred_indexes = Vec::new();
    for &index in projection.query_indexes() {
        // Only an index that enforces nothing: a unique one (a primary key,
        // a constraint's, an `ON CONFLICT` target) must hold while rows go in.
        let definition: Option<String> = client
            .query_opt(
                "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i \
                 WHERE i.indexrelid = to_regclass($1) AND NOT i.indisunique \
                   AND NOT i.indisexclusion",
                &[&format!("{schema}.{index}")],
            )
            .await?
            .map(|row| row.get(0));
        let Some(definition) = definition else {
            return Err(RebuildError::NotAQueryIndex {
                projection: name,
                index,
            });
        };
        client
            .batch_execute(&format!("DROP INDEX {schema}.{index}"))
            .await?;
        deferred_indexes.push(definition);
    }
    // The primary keys only live writes rely on: dropped until `finish`
    // adds them again, as the schema made them: the index first (a build
    // that can run beside the table's other index builds), then the key
    // made of it.
    for &key in projection.rebuild_keys() {
        let found = client
            .query_opt(
                "SELECT t.relname::text, pg_get_indexdef(c.conindid) FROM pg_constraint c \
                 JOIN pg_class t ON t.oid = c.conrelid \
                 WHERE c.conname = $1 AND c.contype = 'p' \
                   AND c.connamespace = to_regnamespace($2)",
                &[&key, &schema],
            )
            .await?;
        let Some(row) = found else {
            return Err(RebuildError::NotARebuildKey {
                projection: name,
                key,
            });
        };
        let (table, definition): (String, String) = (row.get(0), row.get(1));
        client
            .batch_execute(&format!(
                "ALTER TABLE {schema}.{table} DROP CONSTRAINT {key}"
            ))
            .await?;
        deferred_indexes.push(format!(
            "{definition}; ALTER TABLE {schema}.{table} ADD CONSTRAINT {key} \
             PRIMARY KEY USING INDEX {key}"
        ));
    }
    // Which tables have no trigger (which could write rows unseen), with
    // their columns' types; then which of those the schema left empty.
    let rows = client
        .query(
            "SELECT c.relname::text, \
               NOT EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal), \
               ARRAY(SELECT a.attname::text FROM pg_attribute a \
                     WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                     ORDER BY a.attnum), \
               ARRAY(SELECT a.atttypid FROM pg_attribute a \
                     WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                     ORDER BY a.attnum) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = ANY($2)",
            &[&schema, &projection.tables()],
        )
        .await?;
    let mut empty = Vec::new();
    for row in rows {
        let table: String = row.get(0);
        let untriggered: bool = row.get(1);
        let has_rows: bool = client
            .query_one(
                &format!("SELECT EXISTS (SELECT FROM {schema}.{table})"),
                &[],
            )
            .await?
            .get(0);
        if untriggered && !has_rows {
            let names: Vec<String> = row.get(2);
            let types: Vec<u32> = row.get(3);
            empty.push((table, names.into_iter().zip(types).collect()));
        }
    }
    Ok(Prepared {
        client,
        deferred_indexes,
        empty,
    })
}

/// Creates the indexes only queries use on full rebuild tables, each in one
/// sorted pass. Run by each worker as soon as it has applied everything, so
/// that the projections finish in parallel; a projection's indexes are
/// built at once, each but the first on a connection of its own (`pg`), so
/// that the last projection's do not queue on one core (one that gets no
/// connection, the server being full, is built on the worker's own after).
///
/// The tables are logged from the start: with the rebuild's commits not
/// waiting for the disk, writing their WAL as they fill costs less than
/// filling them unlogged and rewriting each into the WAL at the end
/// (`SET LOGGED`), measured in `docs/benchmarks.md`.
async fn finish(
    client: &Object,
    pg: &tokio_postgres::Config,
    deferred_indexes: &[String],
) -> Result<(), RebuildError> {
    let Some((first, others)) = deferred_indexes.split_first() else {
        return Ok(());
    };
    // `Ok(false)`: no connection to be had; built on the worker's own
    // connection afterwards instead.
    let other = |definition: &String| {
        let definition = format!("SET synchronous_commit = off; {definition}");
        async move {
            let Ok((extra, connection)) = pg.connect(NoTls).await else {
                return Ok(false);
            };
            let connection = tokio::spawn(connection);
            let built = extra.batch_execute(&definition).await;
            drop(extra);
            let _ = connection.await;
            built.map(|()| true).map_err(RebuildError::from)
        }
    };
    let (own, built) = tokio::join!(
        client.batch_execute(first),
        futures_util::future::join_all(others.iter().map(other))
    );
    own?;
    for (definition, built) in others.iter().zip(built) {
        if !built? {
            client.batch_execute(definition).await?;
        }
    }
    Ok(())
}

/// The most events of a rebuild's first chunk; the chunks after it double
/// up to the rebuild's chunk (see [`FIRST_ANALYZE`]).
const FIRST_CHUNK: u64 = 5_000;

/// The events of the chunk that starts after `position`: the first ones
/// smaller (doubling up to `chunk`), since a worker analyses its tables
/// only between transactions, and its plans must stop scanning the growing
/// tables early.
fn chunk_after(position: u64, chunk: u64) -> u64 {
    chunk.min(position.max(FIRST_CHUNK)).max(1)
}

/// Events per message from the reader to a rebuild worker.
const BATCH: usize = 256;

/// How far (in events) the reader may run ahead of a rebuild worker.
const AHEAD: usize = 65_536;

/// Events applied by a rebuild worker before it first analyses its tables
/// (then again each time the count doubles, up to [`LAST_ANALYZE`]).
const FIRST_ANALYZE: u64 = 500;

/// Past this many events the plans are index lookups that more rows do not
/// change, and each `ANALYZE` (a 30,000-row sample per table) only costs:
/// autovacuum keeps the statistics of the swapped-in tables from there.
const LAST_ANALYZE: u64 = 64_000;

/// Applies what the reader sends, one transaction per chunk; returns the
/// connection and the position reached.
async fn work(
    projection: Arc<dyn Projection>,
    prepared: Prepared,
    mut receiver: mpsc::Receiver<Work>,
    pg: tokio_postgres::Config,
) -> Result<(Object, u64), RebuildError> {
    let Prepared {
        mut client,
        deferred_indexes,
        empty,
    } = prepared;
    let fresh = Fresh::new(empty);
    let mut position = 0u64;
    let (mut applied, mut busy) = (0u64, std::time::Duration::ZERO);
    let cache = StateCache::default();
    // The tables start empty, so plans prepared early (statements are
    // prepared once per connection) would scan them whole as they grow:
    // analysing them as they double makes PostgreSQL plan again with what
    // is there (index lookups).
    let mut analyze_at = FIRST_ANALYZE;
    let analyze = format!("ANALYZE {}", projection.tables().join(", "));
    let mut ended = false;
    while let Some(mut work) = receiver.recv().await {
        match work {
            Work::End => {
                ended = true;
                break;
            }
            // A chunk without events of the projection's: no transaction
            // (the rebuild's own position is read by nothing but the swap,
            // which takes it from here).
            Work::Through(until) => {
                position = until;
                continue;
            }
            Work::Events(_) => {}
        }
        let tx = Tx::rebuilding(client.transaction().await?, &cache, &fresh);
        loop {
            match work {
                Work::End => {
                    ended = true;
                    break;
                }
                Work::Events(events) => {
                    let began = std::time::Instant::now();
                    for event in &events {
                        apply(projection.as_ref(), &tx, event).await?;
                    }
                    busy += began.elapsed();
                    applied += events.len() as u64;
                }
                Work::Through(until) => {
                    position = until;
                    break;
                }
            }
            match receiver.recv().await {
                Some(next) => work = next,
                // Rolled back: the reader stopped (see `rebuild_many`).
                None => {
                    drop(tx);
                    return Ok((client, position));
                }
            }
        }
        tx.execute(
            "UPDATE projections SET position = $1, updated_at = now()",
            &[&i64::try_from(position).unwrap_or(i64::MAX)],
        )
        .await?;
        let began = std::time::Instant::now();
        flush(projection.as_ref(), &tx, position).await?;
        tx.commit().await?;
        if applied >= analyze_at && analyze_at <= LAST_ANALYZE {
            client.batch_execute(&analyze).await?;
            analyze_at = applied.saturating_mul(2);
        }
        busy += began.elapsed();
        if ended {
            break;
        }
    }
    if !ended {
        // The reader stopped early: the rebuild fails (see `rebuild_many`).
        return Ok((client, position));
    }
    let plain_inserts = fresh.plain();
    tracing::info!(
        projection = projection.name(),
        applied,
        busy_seconds = busy.as_secs_f64(),
        position,
        plain_inserts,
        followed = fresh.followed().join(","),
        "rebuild applied"
    );
    let began = std::time::Instant::now();
    finish(&client, &pg, &deferred_indexes).await?;
    tracing::info!(
        projection = projection.name(),
        indexes = deferred_indexes.len(),
        seconds = began.elapsed().as_secs_f64(),
        "rebuild tables indexed"
    );
    Ok((client, position))
}

async fn apply(
    projection: &dyn Projection,
    tx: &Tx<'_>,
    event: &RecordedEvent,
) -> Result<(), RebuildError> {
    tx.applying(event.global_position);
    projection
        .apply(tx, event)
        .await
        .map_err(|error| poison(projection, tx, event.global_position, error))
}

/// Sends `tx`'s last queued writes (applied up to `position`): one that
/// fails is its event's poison.
async fn flush(
    projection: &dyn Projection,
    tx: &Tx<'_>,
    position: u64,
) -> Result<(), RebuildError> {
    tx.flush().await.map_err(|error| {
        let error = crate::runtime::described(&error);
        poison(projection, tx, position, error)
    })
}

/// `error` met while applying the event at `position`, unless it came from
/// an earlier event's deferred write.
fn poison(
    projection: &dyn Projection,
    tx: &Tx<'_>,
    position: u64,
    error: impl std::fmt::Display,
) -> RebuildError {
    let (position, error) = tx.blame(position, error);
    RebuildError::Poison {
        projection: projection.name(),
        position,
        error,
    }
}

/// The swap: hold the live row, catch up to it, exchange the tables.
async fn swap(
    projection: &dyn Projection,
    store: &EventStore,
    mut client: Object,
    mut position: u64,
) -> Result<u64, RebuildError> {
    let name = projection.name();
    let schema = format!("rebuild_{name}");
    let tx = Tx::deferring(client.transaction().await?);
    let live: i64 = tx
        .query_one(
            "SELECT position FROM public.projections WHERE name = $1 FOR UPDATE",
            &[&name],
        )
        .await?
        .get(0);
    let live = u64::try_from(live).unwrap_or(0);
    if live > position {
        position = apply_range(projection, store, &tx, position, live).await?;
    }
    let mut swap = String::new();
    for table in projection.tables() {
        swap.push_str(&format!(
            "DROP TABLE IF EXISTS public.{table} CASCADE; \
             ALTER TABLE {schema}.{table} RESET (autovacuum_enabled); \
             ALTER TABLE {schema}.{table} SET SCHEMA public; "
        ));
    }
    tx.batch_execute(&swap).await?;
    tx.execute(
        "UPDATE public.projections SET position = $2, state = 'running', last_error = NULL, \
         error_position = NULL, updated_at = now() WHERE name = $1",
        &[&name, &i64::try_from(position).unwrap_or(i64::MAX)],
    )
    .await?;
    tx.commit().await?;
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await?;
    // Free the lock now, not when the connection has gone: a rebuild that
    // follows at once must not find it held.
    client
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .await?;
    drop(client);
    tracing::info!(projection = name, position, "rebuild swapped in");
    Ok(position)
}

/// Applies the stored events after `after` up to `until` in `tx`; returns
/// the new position.
async fn apply_range(
    projection: &dyn Projection,
    store: &EventStore,
    tx: &Tx<'_>,
    after: u64,
    until: u64,
) -> Result<u64, RebuildError> {
    let mut position = after;
    let mut events = store.replay(after, until, Filter::default());
    while let Some(event) = events.next().await {
        let event = event?;
        apply(projection, tx, &event).await?;
        position = event.global_position;
    }
    tx.execute(
        "UPDATE projections SET position = $1, updated_at = now()",
        &[&i64::try_from(position).unwrap_or(i64::MAX)],
    )
    .await?;
    flush(projection, tx, position).await?;
    Ok(position.max(until))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_chunks_are_smaller_and_double_up_to_the_chunk() {
        let mut position = 0;
        let mut chunks = Vec::new();
        while position < 100_000 {
            let chunk = chunk_after(position, 25_000);
            chunks.push(chunk);
            position += chunk;
        }
        assert_eq!(
            chunks,
            [5_000, 5_000, 10_000, 20_000, 25_000, 25_000, 25_000]
        );
        // A chunk below the first one's size stays as it is; never empty.
        assert_eq!(chunk_after(0, 100), 100);
        assert_eq!(chunk_after(7_000, 100), 100);
        assert_eq!(chunk_after(0, 0), 1);
    }

    /// A projection's deferred indexes are built on connections of their
    /// own; one that gets none is built on the worker's connection.
    #[tokio::test]
    async fn an_index_that_gets_no_connection_of_its_own_is_built_on_the_workers() {
        let db = crm_test_support::TestDb::create().await;
        let manager = Manager::from_config(
            db.config().clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager).max_size(1).build().unwrap();
        let client = pool.get().await.unwrap();
        client
            .batch_execute("CREATE TABLE t (a int, b int, c int)")
            .await
            .unwrap();
        let definitions: Vec<String> = ["a", "b", "c"]
            .iter()
            .map(|column| format!("CREATE INDEX t_{column} ON public.t ({column})"))
            .collect();
        let indexes = || async {
            let rows = client
                .query(
                    "SELECT indexname::text FROM pg_indexes WHERE tablename = 't' ORDER BY 1",
                    &[],
                )
                .await
                .unwrap();
            rows.iter().map(|row| row.get(0)).collect::<Vec<String>>()
        };
        // No server where the other connections would go.
        let mut nowhere = db.config().clone();
        nowhere.port(1);
        finish(&client, &nowhere, &definitions).await.unwrap();
        assert_eq!(indexes().await, ["t_a", "t_b", "t_c"]);
        // With connections: the same, built at once.
        client
            .batch_execute("DROP INDEX t_a, t_b, t_c")
            .await
            .unwrap();
        finish(&client, db.config(), &definitions).await.unwrap();
        assert_eq!(indexes().await, ["t_a", "t_b", "t_c"]);
        // A definition that fails fails the build.
        let bad = vec![
            "CREATE INDEX t_a ON public.t (a)".to_owned(),
            "CREATE INDEX t_z ON public.t (z)".to_owned(),
        ];
        client.batch_execute("DROP INDEX t_a").await.unwrap();
        assert!(finish(&client, db.config(), &bad).await.is_err());
    }
}
