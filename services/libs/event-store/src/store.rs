//! `EventStore`: the handle every role uses. Owns the connection pool, the
//! writer task and the NOTIFY listener.
use std::sync::Arc;
use std::time::Duration;

use crm_domain::TenantId;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::append::PreparedAppend;
use crate::read::{EventStream, RecordedEvent, decode, read_range, select_events, to_i64};
use crate::snapshot::{self, Snapshot};
use crate::subscribe::SubscriptionTask;
use crate::writer::{self, Counters, Job, WriterConfig, WriterStats};
use crate::{AppendError, AppendEvents, Appended, Filter, ReadError, StoreError, Subscription};

/// Tuning of one store instance. The defaults suit `crm all`.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Connections in the pool (the writer uses one at a time).
    pub pool_size: usize,
    /// Appends queued for the writer before callers wait.
    pub queue_depth: usize,
    /// Most appends and events committed in one transaction.
    pub max_batch_appends: usize,
    pub max_batch_events: usize,
    /// How often subscribers look for new events when no wake-up arrives
    /// (a safety net: NOTIFY normally wakes them at once).
    pub poll_interval: Duration,
    /// Events buffered per subscription before the reader waits.
    pub subscription_buffer: usize,
    /// Most events a subscription reads per query (and holds in memory
    /// besides its buffer).
    pub subscription_chunk: usize,
    /// How long a live subscription waits after a wake-up before reading,
    /// so a burst of commits costs one read (a latency of this much).
    pub subscription_linger: Duration,
    /// Fault injection for tests: hold every batch transaction open this long
    /// after writing and before committing.
    pub pause_before_commit: Option<Duration>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            queue_depth: 4096,
            max_batch_appends: 512,
            max_batch_events: 1_000,
            poll_interval: Duration::from_secs(1),
            subscription_buffer: 1024,
            subscription_chunk: 1000,
            subscription_linger: Duration::from_millis(2),
            pause_before_commit: None,
        }
    }
}

/// The event store. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct EventStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    writer: mpsc::Sender<Job>,
    head: watch::Receiver<u64>,
    options: StoreOptions,
    stats: Arc<Counters>,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

/// The events of one stream (`$1` tenant, `$2` stream id) from version `$3`
/// on, at most `$4`, oldest first: for a reader on a connection of its own
/// (a projection's transaction), each row decoded by [`crate::decode_row`].
pub const READ_STREAM: &str = select_events!(
    "WHERE tenant_id = $1 AND stream_id = $2 AND stream_version >= $3 \
     ORDER BY stream_version LIMIT $4"
);

const READ_STREAM_BACKWARD: &str = select_events!(
    "WHERE tenant_id = $1 AND stream_id = $2 AND stream_version <= $3 \
     ORDER BY stream_version DESC LIMIT $4"
);

pub(crate) async fn committed_head(client: &deadpool_postgres::Client) -> Result<u64, ReadError> {
    let statement = client
        .prepare_cached("SELECT position FROM log_head WHERE id = 1")
        .await?;
    let head: i64 = client.query_one(&statement, &[]).await?.get(0);
    Ok(u64::try_from(head).unwrap_or(0))
}

/// Builds a pool whose connections time out statements and identify themselves.
///
/// With `generic_plans`, statements are planned once per connection: right for
/// the writer, whose statements take arrays and whose plans never change with
/// the values, and where re-planning each batch costs more than executing it.
pub(crate) fn build_pool(
    config: &tokio_postgres::Config,
    size: usize,
    generic_plans: bool,
) -> Result<Pool, StoreError> {
    let mut config = config.clone();
    config.application_name("crm");
    if generic_plans {
        let options = config.get_options().unwrap_or_default().to_owned();
        config.options(format!("{options} -c plan_cache_mode=force_generic_plan"));
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()?)
}

impl EventStore {
    /// Connects, starts the writer and the listener. Does not migrate: call
    /// [`crate::migrate`] first.
    pub async fn connect(
        config: &tokio_postgres::Config,
        options: StoreOptions,
    ) -> Result<Self, StoreError> {
        let pool = build_pool(config, options.pool_size, false)?;
        // A connection per batch the writer has in flight, and one that
        // stands by for when one is being replaced.
        let writer_pool = build_pool(config, crate::writer::MAX_IN_FLIGHT + 1, true)?;
        let head_now = {
            let client = pool.get().await?;
            committed_head(&client).await?
        };
        let (head_sender, head) = watch::channel(head_now);
        let (writer, queue) = mpsc::channel(options.queue_depth);
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        let stats = Arc::new(Counters::default());
        tasks.spawn(
            writer::run(
                writer_pool,
                queue,
                head_sender.clone(),
                WriterConfig {
                    max_batch_appends: options.max_batch_appends,
                    max_batch_events: options.max_batch_events,
                    pause_before_commit: options.pause_before_commit,
                    stats: stats.clone(),
                },
                cancel.clone(),
            )
            .instrument(tracing::info_span!("event_store_writer")),
        );
        tasks.spawn(
            listen(config.clone(), head_sender, cancel.clone())
                .instrument(tracing::info_span!("event_store_listener")),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                writer,
                head,
                options,
                stats,
                tasks,
                cancel,
            }),
        })
    }

    /// Appends events to one or more streams atomically. See [`AppendEvents`].
    #[tracing::instrument(
        name = "append",
        skip_all,
        err(Display),
        fields(tenant_id = %request.tenant_id, n_streams = request.streams.len(), first_position, replayed)
    )]
    pub async fn append(&self, request: AppendEvents) -> Result<Appended, AppendError> {
        let append = PreparedAppend::new(request)?;
        let (reply, outcome) = oneshot::channel();
        self.inner
            .writer
            .send(Job { append, reply })
            .await
            .map_err(|_| AppendError::ShuttingDown)?;
        let appended = outcome.await.map_err(|_| AppendError::ShuttingDown)??;
        let span = tracing::Span::current();
        span.record("first_position", appended.first_position);
        span.record("replayed", appended.replayed);
        Ok(appended)
    }

    /// Up to `max_count` events of one stream, from `from_version` (1-based) on.
    pub async fn read_stream(
        &self,
        tenant_id: &TenantId,
        stream_id: Uuid,
        from_version: u64,
        max_count: u64,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.read_stream_in(READ_STREAM, tenant_id, stream_id, from_version, max_count)
            .await
    }

    /// Up to `max_count` events of one stream, from `from_version` down
    /// (newest first).
    pub async fn read_stream_backward(
        &self,
        tenant_id: &TenantId,
        stream_id: Uuid,
        from_version: u64,
        max_count: u64,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.read_stream_in(
            READ_STREAM_BACKWARD,
            tenant_id,
            stream_id,
            from_version,
            max_count,
        )
        .await
    }

    #[tracing::instrument(name = "read_stream", skip(self, sql, tenant_id), err(Display), fields(tenant_id = %tenant_id))]
    async fn read_stream_in(
        &self,
        sql: &'static str,
        tenant_id: &TenantId,
        stream_id: Uuid,
        from_version: u64,
        max_count: u64,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        let from = to_i64(from_version, "from_version")?;
        let limit = to_i64(max_count, "max_count")?;
        let client = self.inner.pool.get().await?;
        let statement = client.prepare_cached(sql).await?;
        let rows = client
            .query(
                &statement,
                &[&tenant_id.as_str(), &stream_id, &from, &limit],
            )
            .await?;
        rows.iter().map(decode).collect()
    }

    /// The version of a stream's last event; `None` when the tenant has no
    /// such stream.
    pub async fn stream_version(
        &self,
        tenant_id: &TenantId,
        stream_id: Uuid,
    ) -> Result<Option<u64>, ReadError> {
        let client = self.inner.pool.get().await?;
        let statement = client
            .prepare_cached(
                "SELECT max(stream_version) FROM events WHERE tenant_id = $1 AND stream_id = $2",
            )
            .await?;
        let version: Option<i64> = client
            .query_one(&statement, &[&tenant_id.as_str(), &stream_id])
            .await?
            .get(0);
        Ok(version.and_then(|v| u64::try_from(v).ok()))
    }

    /// Every committed event after `after` that passes `filter`, in position
    /// order, streamed. Ends at the head as of the start of the read.
    #[tracing::instrument(name = "read_all", skip_all, err(Display), fields(after))]
    pub async fn read_all(&self, after: u64, filter: &Filter) -> Result<EventStream, ReadError> {
        let client = self.inner.pool.get().await?;
        read_range(client, after, i64::MAX as u64, filter).await
    }

    /// History after `after`, then live events, in position order, with no gap
    /// and no duplicate. Ends when the store shuts down.
    pub fn subscribe(&self, after: u64, filter: Filter) -> Subscription {
        self.subscription_task(None)
            .spawn(&self.inner.tasks, after, filter)
    }

    /// Like [`Self::subscribe`], but ends after position `until` (replay of a
    /// fixed range, e.g. up to the head at the time of a call).
    pub fn replay(&self, after: u64, until: u64, filter: Filter) -> Subscription {
        self.subscription_task(Some(until))
            .spawn(&self.inner.tasks, after, filter)
    }

    fn subscription_task(&self, until: Option<u64>) -> SubscriptionTask {
        SubscriptionTask {
            pool: self.inner.pool.clone(),
            head: self.inner.head.clone(),
            poll_interval: self.inner.options.poll_interval,
            cancel: self.inner.cancel.child_token(),
            buffer: self.inner.options.subscription_buffer,
            chunk: self.inner.options.subscription_chunk.max(1),
            linger: self.inner.options.subscription_linger,
            until,
        }
    }

    /// The stream holding a reserved unique value, if any.
    pub async fn reservation_holder(
        &self,
        tenant_id: &TenantId,
        kind: &str,
        key_hash: &[u8],
    ) -> Result<Option<Uuid>, ReadError> {
        let client = self.inner.pool.get().await?;
        let statement = client
            .prepare_cached(
                "SELECT stream_id FROM reservations \
                 WHERE tenant_id = $1 AND kind = $2 AND key_hash = $3",
            )
            .await?;
        let row = client
            .query_opt(&statement, &[&tenant_id.as_str(), &kind, &key_hash])
            .await?;
        Ok(match row {
            Some(row) => Some(row.try_get(0)?),
            None => None,
        })
    }

    /// The type of a tenant's stream, or `None` when the tenant has no such
    /// stream.
    pub async fn stream_type(
        &self,
        tenant_id: &TenantId,
        stream_id: Uuid,
    ) -> Result<Option<String>, ReadError> {
        let client = self.inner.pool.get().await?;
        let statement = client
            .prepare_cached(
                "SELECT stream_type FROM events WHERE tenant_id = $1 AND stream_id = $2 \
                 ORDER BY stream_version LIMIT 1",
            )
            .await?;
        let row = client
            .query_opt(&statement, &[&tenant_id.as_str(), &stream_id])
            .await?;
        Ok(match row {
            Some(row) => Some(row.try_get(0)?),
            None => None,
        })
    }

    /// The stored outcome of an append made with this idempotency key, with
    /// the fingerprint it was made with, if any.
    pub async fn idempotent_outcome(
        &self,
        tenant_id: &TenantId,
        key: &str,
    ) -> Result<Option<([u8; 32], Appended)>, ReadError> {
        let client = self.inner.pool.get().await?;
        let statement = client
            .prepare_cached(
                "SELECT request_hash, first_position, last_position, streams::text \
                 FROM idempotency_keys WHERE tenant_id = $1 AND key = $2",
            )
            .await?;
        let Some(row) = client
            .query_opt(&statement, &[&tenant_id.as_str(), &key])
            .await?
        else {
            return Ok(None);
        };
        let hash: Vec<u8> = row.try_get(0)?;
        let first: i64 = row.try_get(1)?;
        let last: i64 = row.try_get(2)?;
        let streams: String = row.try_get(3)?;
        let corrupt = |what: &str| ReadError::Corrupt(format!("idempotency key {key:?}: {what}"));
        Ok(Some((
            hash.try_into()
                .map_err(|_| corrupt("fingerprint is not 32 bytes"))?,
            Appended {
                first_position: u64::try_from(first).map_err(|_| corrupt("position"))?,
                last_position: u64::try_from(last).map_err(|_| corrupt("position"))?,
                streams: serde_json::from_str(&streams).map_err(|e| corrupt(&e.to_string()))?,
                replayed: true,
            },
        )))
    }

    /// Records under an idempotency key that the request changed nothing:
    /// `stream_id` stays at `version`, whose last event is at `position`. A
    /// retry with the key then replays that outcome, and another request
    /// under the key is refused, as after an append. When the key already
    /// holds an outcome (a concurrent request under it won), that outcome is
    /// returned as replayed, or [`AppendError::IdempotencyKeyReused`] if it
    /// belongs to another request. Nothing else is written.
    #[tracing::instrument(
        name = "record_unchanged",
        skip_all,
        err(Display),
        fields(%tenant_id, %stream_id, version = version, replayed)
    )]
    pub async fn record_unchanged(
        &self,
        tenant_id: &TenantId,
        key: &str,
        fingerprint: [u8; 32],
        stream_id: Uuid,
        version: u64,
        position: u64,
    ) -> Result<Appended, AppendError> {
        if key.is_empty() || key.len() > crate::limits::MAX_IDEMPOTENCY_KEY_LEN {
            return Err(AppendError::Invalid {
                field: "idempotency_key".into(),
                rule: "must be 1 to 200 bytes",
            });
        }
        let unavailable = |error: &dyn std::fmt::Display| AppendError::Unavailable {
            message: error.to_string(),
            // A lost reply may hide a committed insert: a retry with the key
            // is safe either way.
            outcome_unknown: true,
        };
        let out_of_range = |field: &str| AppendError::Invalid {
            field: field.into(),
            rule: "must be below 2^63",
        };
        let position_sql = i64::try_from(position).map_err(|_| out_of_range("position"))?;
        if i64::try_from(version).is_err() {
            return Err(out_of_range("version"));
        }
        let outcome = Appended {
            first_position: position,
            last_position: position,
            streams: vec![crate::AppendedStream {
                stream_id,
                first_version: version,
                last_version: version,
            }],
            replayed: false,
        };
        let streams = serde_json::to_string(&outcome.streams).map_err(|e| unavailable(&e))?;
        let client = self.inner.pool.get().await.map_err(|e| unavailable(&e))?;
        // Under the log's lock, like every write of a key: the writer reads
        // keys under it and then writes with a guard that no key it read as
        // free exists, so a key must not appear in between.
        let statement = client
            .prepare_cached(
                "WITH head AS (SELECT position FROM log_head WHERE id = 1 FOR UPDATE) \
                 INSERT INTO idempotency_keys \
                   (tenant_id, key, request_hash, first_position, last_position, streams) \
                 SELECT $1::text, $2::text, $3::bytea, $4::bigint, $4::bigint, $5::text::jsonb \
                 FROM head \
                 ON CONFLICT (tenant_id, key) DO NOTHING",
            )
            .await
            .map_err(|e| unavailable(&e))?;
        let inserted = client
            .execute(
                &statement,
                &[
                    &tenant_id.as_str(),
                    &key,
                    &fingerprint.as_slice(),
                    &position_sql,
                    &streams,
                ],
            )
            .await
            .map_err(|e| unavailable(&e))?;
        if inserted == 1 {
            tracing::Span::current().record("replayed", false);
            return Ok(outcome);
        }
        drop(client);
        match self
            .idempotent_outcome(tenant_id, key)
            .await
            .map_err(|e| unavailable(&e))?
        {
            Some((stored, appended)) if stored == fingerprint => {
                tracing::Span::current().record("replayed", true);
                Ok(appended)
            }
            Some(_) => Err(AppendError::IdempotencyKeyReused {
                key: key.to_owned(),
            }),
            None => Err(unavailable(&"the key's outcome vanished")),
        }
    }

    /// The writer's totals since this store started (batches, appends, events).
    pub fn writer_stats(&self) -> WriterStats {
        self.inner.stats.snapshot()
    }

    /// The position of the last committed event (0 for an empty log).
    pub async fn head(&self) -> Result<u64, ReadError> {
        let client = self.inner.pool.get().await?;
        committed_head(&client).await
    }

    /// The committed head, and the positions and stream types of the
    /// committed events after `after` up to `until` (and the head) whose
    /// stream type is one of `stream_types` (and whose event type is the
    /// one at the same index of `event_types`, unless that is empty), in
    /// order, at most `limit`: what consumers filtered by stream type (and
    /// event type) must have delivered there.
    pub async fn positions(
        &self,
        after: u64,
        until: u64,
        stream_types: &[&str],
        event_types: &[&str],
        limit: u64,
    ) -> Result<(u64, Vec<(u64, String)>), ReadError> {
        let client = self.inner.pool.get().await?;
        let statement = client
            .prepare_cached(
                "SELECT h.position, e.global_position, e.stream_type \
                 FROM log_head h LEFT JOIN LATERAL ( \
                   SELECT global_position, stream_type FROM events \
                   WHERE global_position > $1 AND global_position <= least($2, h.position) \
                   AND stream_type = ANY($3) \
                   AND EXISTS (SELECT 1 FROM unnest($3::text[], $5::text[]) AS f(st, et) \
                     WHERE f.st = stream_type AND (f.et = '' OR f.et = event_type)) \
                   ORDER BY global_position LIMIT $4) e ON true \
                 WHERE h.id = 1 ORDER BY e.global_position",
            )
            .await?;
        let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
        let rows = client
            .query(
                &statement,
                &[
                    &signed(after),
                    &signed(until),
                    &stream_types,
                    &signed(limit),
                    &event_types,
                ],
            )
            .await?;
        let head = rows.first().map_or(0, |row| unsigned(row.get(0)));
        let found = rows
            .iter()
            .filter_map(|row| {
                let position: Option<i64> = row.get(1);
                Some((unsigned(position?), row.get::<_, Option<String>>(2)?))
            })
            .collect();
        Ok((head, found))
    }

    /// The version of each of `stream_ids` (the number of its events; 0
    /// for a stream with none), in the order given.
    pub async fn stream_versions(
        &self,
        tenant_id: &TenantId,
        stream_ids: &[Uuid],
    ) -> Result<Vec<u64>, ReadError> {
        let client = self.inner.pool.get().await?;
        let statement = client
            .prepare_cached(
                "SELECT coalesce((SELECT e.stream_version FROM events e \
                   WHERE e.tenant_id = $1 AND e.stream_id = s.id \
                   ORDER BY e.stream_version DESC LIMIT 1), 0) \
                 FROM unnest($2::uuid[]) WITH ORDINALITY AS s(id, n) ORDER BY s.n",
            )
            .await?;
        let rows = client
            .query(&statement, &[&tenant_id.as_str(), &stream_ids])
            .await?;
        Ok(rows
            .iter()
            .map(|row| u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
            .collect())
    }

    /// A data subject's key: `Some` when it exists; `None` when it was never
    /// made or was destroyed by [`Self::erase_subject`].
    pub async fn subject_key(
        &self,
        tenant_id: &TenantId,
        subject_id: Uuid,
    ) -> Result<Option<Vec<u8>>, ReadError> {
        let client = self.inner.pool.get().await?;
        let statement = client
            .prepare_cached("SELECT key FROM subject_keys WHERE tenant_id = $1 AND subject_id = $2")
            .await?;
        Ok(client
            .query_opt(&statement, &[&tenant_id.as_str(), &subject_id])
            .await?
            .map(|row| row.get(0)))
    }

    /// The subject's key, storing `candidate` as it when it has none. `None`
    /// when the subject was erased: no key is ever made for it again.
    ///
    /// The insert commits without waiting for its WAL flush: the appends
    /// that use the key come later in the WAL, so their own durable commit
    /// makes the key durable too (and a key lost with an append that never
    /// happened is simply made again). One round trip, no fsync.
    pub async fn subject_key_or_insert(
        &self,
        tenant_id: &TenantId,
        subject_id: Uuid,
        candidate: &[u8],
    ) -> Result<Option<Vec<u8>>, ReadError> {
        // Literals are safe: tenant ids are [A-Za-z0-9_-], the rest is a
        // UUID and hex.
        let tenant = tenant_id.as_str();
        let key: String = candidate.iter().map(|b| format!("{b:02x}")).collect();
        let sql = format!(
            "BEGIN; SET LOCAL synchronous_commit TO OFF; \
             WITH inserted AS ( \
               INSERT INTO subject_keys (tenant_id, subject_id, key) \
               SELECT '{tenant}', '{subject_id}', '\\x{key}'::bytea WHERE NOT EXISTS ( \
                 SELECT 1 FROM erased_subjects \
                 WHERE tenant_id = '{tenant}' AND subject_id = '{subject_id}') \
               ON CONFLICT (tenant_id, subject_id) DO NOTHING RETURNING key) \
             SELECT encode(key, 'hex') FROM inserted \
             UNION ALL \
             SELECT encode(key, 'hex') FROM subject_keys \
             WHERE tenant_id = '{tenant}' AND subject_id = '{subject_id}' \
             LIMIT 1; \
             COMMIT;"
        );
        let client = self.inner.pool.get().await?;
        let messages = client.simple_query(&sql).await?;
        let hex = messages.iter().find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        });
        hex.map(|hex| {
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|_| ReadError::Corrupt(format!("subject key of {subject_id}")))
        })
        .transpose()
    }

    /// Destroys a subject's key (and its stream's snapshot, sealed under that
    /// key) and remembers the erasure. Idempotent.
    #[tracing::instrument(name = "erase_subject", skip(self), fields(tenant_id = %tenant_id), err(Display))]
    pub async fn erase_subject(
        &self,
        tenant_id: &TenantId,
        subject_id: Uuid,
    ) -> Result<(), ReadError> {
        let mut client = self.inner.pool.get().await?;
        let tx = client.transaction().await?;
        let tenant = tenant_id.as_str();
        tx.execute(
            "INSERT INTO erased_subjects (tenant_id, subject_id) VALUES ($1, $2) \
             ON CONFLICT DO NOTHING",
            &[&tenant, &subject_id],
        )
        .await?;
        tx.execute(
            "DELETE FROM subject_keys WHERE tenant_id = $1 AND subject_id = $2",
            &[&tenant, &subject_id],
        )
        .await?;
        tx.execute(
            "DELETE FROM snapshots WHERE tenant_id = $1 AND stream_id = $2",
            &[&tenant, &subject_id],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The checkpoint saved under `name` (0 when none was saved yet).
    pub async fn load_checkpoint(&self, name: &str) -> Result<u64, ReadError> {
        let client = self.inner.pool.get().await?;
        let statement = client
            .prepare_cached("SELECT position FROM checkpoints WHERE name = $1")
            .await?;
        let position: Option<i64> = client
            .query_opt(&statement, &[&name])
            .await?
            .map(|row| row.get(0));
        Ok(position.map_or(0, |p| u64::try_from(p).unwrap_or(0)))
    }

    /// Saves `position` as the checkpoint `name`. A checkpoint never moves
    /// back: saving a lower position than the stored one changes nothing.
    #[tracing::instrument(name = "save_checkpoint", skip(self), err(Display))]
    pub async fn save_checkpoint(&self, name: &str, position: u64) -> Result<(), ReadError> {
        let position = to_i64(position, "position")?;
        let client = self.inner.pool.get().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO checkpoints (name, position) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, updated_at = now() \
                 WHERE checkpoints.position < EXCLUDED.position",
            )
            .await?;
        client.execute(&statement, &[&name, &position]).await?;
        Ok(())
    }

    /// Stores `state` as the snapshot of a stream at `version`, unless a newer
    /// snapshot is already stored.
    pub async fn save_snapshot(
        &self,
        tenant_id: &TenantId,
        snapshot: &Snapshot,
    ) -> Result<(), ReadError> {
        self.save_snapshot_with(snapshot::SAVE, tenant_id, snapshot)
            .await
    }

    /// [`Self::save_snapshot`] for a data subject's stream, whose snapshot is
    /// sealed under its key: stored only while the key exists, so it never
    /// outlives an erasure (see [`Self::erase_subject`]).
    pub async fn save_subject_snapshot(
        &self,
        tenant_id: &TenantId,
        snapshot: &Snapshot,
    ) -> Result<(), ReadError> {
        self.save_snapshot_with(snapshot::SAVE_SUBJECT, tenant_id, snapshot)
            .await
    }

    #[tracing::instrument(name = "save_snapshot", skip_all, err(Display), fields(tenant_id = %tenant_id, stream_id = %snapshot.stream_id, version = snapshot.version))]
    async fn save_snapshot_with(
        &self,
        sql: &str,
        tenant_id: &TenantId,
        snapshot: &Snapshot,
    ) -> Result<(), ReadError> {
        let version = to_i64(snapshot.version, "version")?;
        let schema_version =
            i32::try_from(snapshot.schema_version).map_err(|_| ReadError::Invalid {
                field: "schema_version",
                rule: "out of range",
            })?;
        let client = self.inner.pool.get().await?;
        let statement = client.prepare_cached(sql).await?;
        client
            .execute(
                &statement,
                &[
                    &tenant_id.as_str(),
                    &snapshot.stream_id,
                    &snapshot.stream_type,
                    &version,
                    &schema_version,
                    &snapshot.state.as_str(),
                ],
            )
            .await?;
        Ok(())
    }

    /// The latest snapshot of a stream, if any.
    pub async fn load_snapshot(
        &self,
        tenant_id: &TenantId,
        stream_id: Uuid,
    ) -> Result<Option<Snapshot>, ReadError> {
        let client = self.inner.pool.get().await?;
        let statement = client.prepare_cached(snapshot::LOAD).await?;
        let Some(row) = client
            .query_opt(&statement, &[&tenant_id.as_str(), &stream_id])
            .await?
        else {
            return Ok(None);
        };
        let version: i64 = row.try_get(1)?;
        let schema_version: i32 = row.try_get(2)?;
        Ok(Some(Snapshot {
            stream_type: row.try_get(0)?,
            stream_id,
            version: u64::try_from(version).unwrap_or(0),
            schema_version: u32::try_from(schema_version).unwrap_or(0),
            state: row.try_get(3)?,
        }))
    }

    /// Stops taking appends, commits what is queued, ends subscriptions and
    /// the listener, and waits for all of it.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

/// Follows NOTIFYs from other processes' appends and wakes local subscribers.
/// Reconnects with backoff; subscribers also poll, so a lost connection only
/// adds latency.
async fn listen(
    config: tokio_postgres::Config,
    head: watch::Sender<u64>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    while !cancel.is_cancelled() {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                backoff = Duration::from_millis(100);
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let listen_sql = format!("LISTEN {}", crate::NOTIFY_CHANNEL);
                let mut listening = std::pin::pin!(client.batch_execute(&listen_sql));
                let mut subscribed = false;
                // The connection only makes progress while its messages are
                // polled, so they are polled while LISTEN runs too.
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        result = &mut listening, if !subscribed => {
                            if let Err(error) = result {
                                tracing::warn!(%error, "LISTEN failed");
                                break;
                            }
                            subscribed = true;
                        }
                        message = messages.next() => match message {
                            Some(Ok(AsyncMessage::Notification(note))) => {
                                if let Ok(position) = note.payload().parse::<u64>() {
                                    head.send_if_modified(|known| {
                                        let newer = position > *known;
                                        if newer {
                                            *known = position;
                                        }
                                        newer
                                    });
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(error)) => {
                                tracing::warn!(%error, "listener connection failed");
                                break;
                            }
                            None => break,
                        },
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "listener cannot connect"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
