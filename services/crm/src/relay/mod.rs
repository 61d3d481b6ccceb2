//! The relay: tails the event store in global order and publishes every event
//! to a JetStream stream as a CloudEvent, each exactly once and in order.
//!
//! - **In order, exactly once.** Every publish carries
//!   `Nats-Expected-Last-Sequence`, the stream sequence the previous event
//!   got, so the server refuses a message that is not next: a publish that
//!   failed cannot be overtaken by the later ones already in the ack window.
//!   After any failure the relay asks the stream where it ends (the last
//!   message's `ce-globalposition`) and resumes right after it. Restarts work
//!   the same way, so nothing depends on the duplicate window; `Nats-Msg-Id`
//!   (the event id) still gives server-side dedup against other publishers.
//! - **Pipelined.** Up to `window` publishes wait for their acks at once.
//! - **Checkpointed.** The last acknowledged position goes to the
//!   `checkpoints` table (`relay:<stream>`), at most every
//!   `checkpoint_interval`; it is the lag metric, and where to start when the
//!   stream holds no message to tell.
//! - **One active relay per log**: a session-level PostgreSQL advisory lock on
//!   a dedicated connection. Standbys retry it; a leader whose lock connection
//!   drops stops publishing at once.
//! - **NATS down**: the relay backs off and retries; commands keep working
//!   (they never wait for the relay) and nothing is skipped.
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use crm_event_store::{EventStore, Filter, ReadError};
use crm_wire::cloudevents;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How the relay publishes. Defaults suit `crm all`.
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// JetStream stream name.
    pub stream: String,
    /// First subject tokens; events go to
    /// `<prefix>.<tenant>.<stream_type>.<stream_id>.<event_type>`.
    pub subject_prefix: String,
    /// Publishes awaiting their ack at once.
    pub window: usize,
    /// How long an ack may take before the relay resynchronises.
    pub ack_timeout: Duration,
    /// Least time between two checkpoint writes.
    pub checkpoint_interval: Duration,
    /// How often a standby tries to become the leader.
    pub standby_poll: Duration,
    /// Longest wait between two attempts when NATS or PostgreSQL fails.
    pub max_backoff: Duration,
    /// The stream's duplicate window (server-side dedup by `Nats-Msg-Id`).
    pub duplicate_window: Duration,
    /// How long the stream keeps messages; zero keeps them forever.
    pub max_age: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            stream: "CRM_EVENTS".into(),
            subject_prefix: "crm.v1".into(),
            window: 1024,
            ack_timeout: Duration::from_secs(5),
            checkpoint_interval: Duration::from_millis(250),
            standby_poll: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5),
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::ZERO,
        }
    }
}

impl RelayOptions {
    /// The options `crm relay` / `crm all` take from the configuration.
    pub fn from_config(config: &crm_platform::Config) -> Self {
        Self {
            stream: config.relay_stream.clone(),
            subject_prefix: config.relay_subject_prefix.clone(),
            window: config.relay_window,
            max_age: Duration::from_secs(config.relay_max_age_days * 86_400),
            ..Self::default()
        }
    }

    pub fn checkpoint_name(&self) -> String {
        format!("relay:{}", self.stream)
    }

    /// The JetStream stream the relay creates or updates at startup.
    pub fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            description: Some("CRM events, published by the relay in global order".into()),
            subjects: vec![format!("{}.>", self.subject_prefix)],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age: self.max_age,
            duplicate_window: self.duplicate_window,
            num_replicas: 1,
            allow_direct: true,
            deny_delete: true,
            ..Default::default()
        }
    }

    fn lock_key(&self) -> i64 {
        crm_event_store::advisory_lock_key(&format!("crm-relay:{}", self.stream))
    }
}

/// What a relay is doing, for status and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStatus {
    pub leader: bool,
    /// The last position acknowledged by JetStream in this process.
    pub published: u64,
}

/// Why a relay session ended; all but `Stopped` and `LockLost` are retried.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("event store: {0}")]
    Read(#[from] ReadError),
    #[error(transparent)]
    Wire(#[from] cloudevents::WireError),
    #[error(
        "stream {stream} holds message {sequence} without a ce-globalposition header: only the relay may publish to it"
    )]
    ForeignMessage { stream: String, sequence: u64 },
    #[error(
        "message for position {position} was not stored next in the stream (expected sequence {expected}, {got}); resynchronising"
    )]
    OutOfPlace {
        position: u64,
        expected: u64,
        got: String,
    },
    #[error("the leadership lock's PostgreSQL connection closed")]
    LockConnectionLost,
    #[error("the event subscription ended")]
    SubscriptionEnded,
}

fn nats(error: impl std::fmt::Display) -> RelayError {
    RelayError::Nats(error.to_string())
}

enum Ended {
    Stopped,
    LockLost,
}

/// The relay role.
pub struct Relay {
    store: EventStore,
    pg: tokio_postgres::Config,
    nats_url: String,
    options: RelayOptions,
    status: watch::Sender<RelayStatus>,
}

impl Relay {
    pub fn new(
        store: EventStore,
        pg: tokio_postgres::Config,
        nats_url: String,
        options: RelayOptions,
    ) -> Self {
        Self {
            store,
            pg,
            nats_url,
            options,
            status: watch::Sender::new(RelayStatus::default()),
        }
    }

    pub fn status(&self) -> watch::Receiver<RelayStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown`: standby until the lock is ours, then publishes.
    /// Returns only on shutdown; every failure is logged and retried.
    pub async fn run(self, shutdown: CancellationToken) {
        let span = tracing::info_span!("relay", stream = %self.options.stream);
        self.run_inner(shutdown).instrument(span).await;
    }

    async fn run_inner(&self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.options.max_backoff);
        loop {
            let lock = match self.acquire_leadership(&shutdown).await {
                Ok(Some(lock)) => lock,
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(%error, "relay cannot reach PostgreSQL for leadership; retrying");
                    if !backoff.wait(&shutdown, None).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            tracing::info!("relay is the leader");
            self.status.send_modify(|s| s.leader = true);
            let ended = self.lead(&lock, &shutdown).await;
            self.status.send_modify(|s| s.leader = false);
            lock.release().await;
            match ended {
                Ended::Stopped => return,
                Ended::LockLost => {
                    tracing::warn!("relay lost its leadership lock; standing by");
                }
            }
        }
    }

    /// Waits for the advisory lock; `None` on shutdown.
    async fn acquire_leadership(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<LeaderLock>, RelayError> {
        let mut config = self.pg.clone();
        config.application_name("crm-relay-lock");
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        let (client, connection) = config.connect(NoTls).await?;
        let lost = CancellationToken::new();
        let driver = tokio::spawn({
            let lost = lost.clone();
            async move {
                let _ = connection.await;
                lost.cancel();
            }
        });
        let lock = LeaderLock {
            client,
            key: self.options.lock_key(),
            lost,
            driver,
        };
        let mut announced = false;
        loop {
            let row = lock
                .client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&lock.key])
                .await?;
            if row.get::<_, bool>(0) {
                return Ok(Some(lock));
            }
            if !announced {
                tracing::info!("another relay is the leader; standing by");
                announced = true;
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                () = lock.lost.cancelled() => return Err(RelayError::LockConnectionLost),
                () = tokio::time::sleep(self.options.standby_poll) => {}
            }
        }
    }

    /// Publishes while the lock holds; NATS failures back off and retry.
    async fn lead(&self, lock: &LeaderLock, shutdown: &CancellationToken) -> Ended {
        let mut backoff = Backoff::new(self.options.max_backoff);
        loop {
            let before = self.status.borrow().published;
            match self.session(lock, shutdown).await {
                Ok(ended) => return ended,
                Err(error) => {
                    if self.status.borrow().published > before {
                        backoff.reset();
                    }
                    tracing::warn!(%error, retry_in_ms = backoff.next_ms(), "relay session failed; retrying");
                }
            }
            if !backoff.wait(shutdown, Some(&lock.lost)).await {
                return if shutdown.is_cancelled() {
                    Ended::Stopped
                } else {
                    Ended::LockLost
                };
            }
        }
    }

    /// One NATS connection's worth of publishing.
    async fn session(
        &self,
        lock: &LeaderLock,
        shutdown: &CancellationToken,
    ) -> Result<Ended, RelayError> {
        let options = &self.options;
        let client = async_nats::ConnectOptions::new()
            .name("crm-relay")
            .connection_timeout(Duration::from_secs(5))
            .connect(self.nats_url.as_str())
            .await
            .map_err(nats)?;
        let js = jetstream::context::ContextBuilder::new()
            .timeout(options.ack_timeout)
            .max_ack_inflight(options.window)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let (mut after, mut last_sequence) = self.resume_point(&js).await?;
        tracing::info!(after, last_sequence, "relay publishing");
        let mut events = self.store.subscribe(after, Filter::default());
        let mut inflight = FuturesOrdered::new();
        let mut saved = after;
        let mut last_save = Instant::now();
        let checkpoint_name = options.checkpoint_name();
        loop {
            let checkpoint_due = last_save + options.checkpoint_interval;
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    // Finish what is in flight, then checkpoint.
                    let drain = async {
                        while let Some((position, expected, ack)) = inflight.next().await {
                            if check_ack(position, expected, ack).is_err() {
                                break;
                            }
                            after = position;
                        }
                    };
                    let _ = tokio::time::timeout(options.ack_timeout, drain).await;
                    self.published(after);
                    if after > saved {
                        self.store.save_checkpoint(&checkpoint_name, after).await?;
                    }
                    client.drain().await.ok();
                    return Ok(Ended::Stopped);
                }
                () = lock.lost.cancelled() => return Ok(Ended::LockLost),
                Some((position, expected, ack)) = inflight.next(), if !inflight.is_empty() => {
                    check_ack(position, expected, ack)?;
                    after = position;
                    self.published(after);
                }
                event = events.next(), if inflight.len() < options.window => {
                    let event = event.ok_or(RelayError::SubscriptionEnded)??;
                    let subject = cloudevents::subject(&options.subject_prefix, &event)?;
                    let position = event.global_position;
                    let publish = cloudevents::message(&event).expected_last_sequence(last_sequence);
                    let ack = js
                        .send_publish(subject, publish)
                        .instrument(tracing::debug_span!("publish", position))
                        .await
                        .map_err(nats)?;
                    last_sequence += 1;
                    let expected = last_sequence;
                    inflight.push_back(async move { (position, expected, ack.await) });
                }
                () = tokio::time::sleep_until(checkpoint_due), if after > saved => {
                    self.store.save_checkpoint(&checkpoint_name, after).await?;
                    tracing::debug!(position = after, "relay checkpoint");
                    saved = after;
                    last_save = Instant::now();
                }
            }
        }
    }

    /// Where the stream ends: (last position published, last stream sequence).
    /// Creates or updates the stream first.
    async fn resume_point(&self, js: &jetstream::Context) -> Result<(u64, u64), RelayError> {
        let options = &self.options;
        js.create_or_update_stream(options.stream_config())
            .await
            .map_err(nats)?;
        let mut stream = js.get_stream(&options.stream).await.map_err(nats)?;
        let state = stream.info().await.map_err(nats)?.state.clone();
        let checkpoint = self
            .store
            .load_checkpoint(&options.checkpoint_name())
            .await?;
        if state.messages == 0 {
            // Nothing to ask: a new stream, or one whose messages aged out.
            return Ok((checkpoint, state.last_sequence));
        }
        let last = stream
            .get_raw_message(state.last_sequence)
            .await
            .map_err(nats)?;
        let position = cloudevents::position(Some(&last.headers)).ok_or_else(|| {
            RelayError::ForeignMessage {
                stream: options.stream.clone(),
                sequence: state.last_sequence,
            }
        })?;
        if position < checkpoint {
            tracing::warn!(
                stream_position = position,
                checkpoint,
                "the stream ends before the checkpoint (JetStream lost acknowledged messages); republishing from the stream's end"
            );
        }
        Ok((position, state.last_sequence))
    }

    fn published(&self, position: u64) {
        self.status.send_if_modified(|s| {
            let changed = s.published != position;
            s.published = position;
            changed
        });
    }
}

fn check_ack(
    position: u64,
    expected: u64,
    ack: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
) -> Result<(), RelayError> {
    match ack {
        Ok(ack) if ack.sequence == expected && !ack.duplicate => Ok(()),
        Ok(ack) => Err(RelayError::OutOfPlace {
            position,
            expected,
            got: format!("got sequence {} duplicate {}", ack.sequence, ack.duplicate),
        }),
        Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
            Err(RelayError::OutOfPlace {
                position,
                expected,
                got: "refused: wrong last sequence".into(),
            })
        }
        Err(error) => Err(nats(error)),
    }
}

/// The leadership lock: held while its connection lives.
struct LeaderLock {
    client: tokio_postgres::Client,
    key: i64,
    lost: CancellationToken,
    driver: tokio::task::JoinHandle<()>,
}

impl LeaderLock {
    async fn release(self) {
        let _ = self
            .client
            .execute("SELECT pg_advisory_unlock($1)", &[&self.key])
            .await;
        drop(self.client);
        let _ = self.driver.await;
    }
}

/// Exponential backoff from 100 ms up to a ceiling.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Self {
            next: Duration::from_millis(100),
            max,
        }
    }

    fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }

    fn next_ms(&self) -> u128 {
        self.next.as_millis()
    }

    /// Sleeps the current delay and doubles it; false if `shutdown` (or
    /// `lost`) fired first.
    async fn wait(
        &mut self,
        shutdown: &CancellationToken,
        lost: Option<&CancellationToken>,
    ) -> bool {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        let lost = async {
            match lost {
                Some(token) => token.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = lost => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}
