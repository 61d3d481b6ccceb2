//! Blue/green rebuild of one projection from the event store.
//!
//! The new tables are built in a schema of their own (`rebuild_<name>`, found
//! first on the rebuild connection's search path, so the projection's own
//! SQL writes there unchanged), from position 0 to the log's head, in
//! transactions of `chunk` events. Then, in one transaction that holds the
//! live projection's status row (so its projector waits), the rebuild catches
//! up to the live position, the live tables are dropped, the new ones moved
//! in, and the live position set: readers see the old tables or the new ones,
//! never a mix.
use std::sync::Arc;

use crm_event_store::{EventStore, Filter};
use futures_util::StreamExt;
use tokio_postgres::NoTls;

use crate::runtime::{Projection, STATUS_SCHEMA};

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("event store: {0}")]
    Read(#[from] crm_event_store::ReadError),
    #[error("event at position {position} cannot be applied: {error}")]
    Poison { position: u64, error: String },
    #[error("a rebuild of {0} is already running")]
    AlreadyRunning(String),
}

/// How far a rebuild has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub position: u64,
    pub head: u64,
}

/// Rebuilds `projection` and swaps it in; returns the position it swapped
/// in at. `progress` is called after every chunk.
pub async fn rebuild(
    projection: Arc<dyn Projection>,
    store: &EventStore,
    pg: &tokio_postgres::Config,
    chunk: u64,
    mut progress: impl FnMut(Progress),
) -> Result<u64, RebuildError> {
    let name = projection.name();
    let schema = format!("rebuild_{name}");
    let (mut client, connection) = pg.connect(NoTls).await?;
    let driver = tokio::spawn(connection);
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
    client
        .batch_execute(&format!(
            "SET synchronous_commit = off; \
             {STATUS_SCHEMA}; INSERT INTO projections (name) VALUES ('{name}') \
             ON CONFLICT DO NOTHING; \
             DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; \
             SET search_path TO {schema}, public; {STATUS_SCHEMA}; {}; \
             INSERT INTO projections (name) VALUES ('{name}');",
            projection.schema()
        ))
        .await?;
    let mut position = 0u64;
    loop {
        let head = store.head().await?;
        if head <= position {
            break;
        }
        while position < head {
            let until = head.min(position + chunk.max(1));
            let tx = client.transaction().await?;
            position = apply_range(projection.as_ref(), store, &tx, position, until).await?;
            tx.commit().await?;
            progress(Progress { position, head });
        }
    }
    // The swap: hold the live row, catch up to it, exchange the tables.
    let tx = client.transaction().await?;
    let live: i64 = tx
        .query_one(
            "SELECT position FROM public.projections WHERE name = $1 FOR UPDATE",
            &[&name],
        )
        .await?
        .get(0);
    let live = u64::try_from(live).unwrap_or(0);
    if live > position {
        position = apply_range(projection.as_ref(), store, &tx, position, live).await?;
    }
    let mut swap = String::new();
    for table in projection.tables() {
        swap.push_str(&format!(
            "DROP TABLE IF EXISTS public.{table} CASCADE; \
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
    drop(client);
    let _ = driver.await;
    tracing::info!(projection = name, position, "rebuild swapped in");
    Ok(position)
}

/// Applies the stored events after `after` up to `until` in `tx`; returns
/// the new position.
async fn apply_range(
    projection: &dyn Projection,
    store: &EventStore,
    tx: &tokio_postgres::Transaction<'_>,
    after: u64,
    until: u64,
) -> Result<u64, RebuildError> {
    let mut position = after;
    let mut events = store.replay(after, until, Filter::default());
    while let Some(event) = events.next().await {
        let event = event?;
        projection
            .apply(tx, &event)
            .await
            .map_err(|error| RebuildError::Poison {
                position: event.global_position,
                error: error.to_string(),
            })?;
        position = event.global_position;
    }
    tx.execute(
        "UPDATE projections SET position = $1, updated_at = now()",
        &[&i64::try_from(position).unwrap_or(i64::MAX)],
    )
    .await?;
    Ok(position.max(until))
}
