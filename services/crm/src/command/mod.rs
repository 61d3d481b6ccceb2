//! The command role: gRPC commands → load the record → `decide` → append.
//!
//! One generic path serves every aggregate: it loads the stream, lets the
//! aggregate decide, reserves the unique values that the new state holds
//! (and releases those it no longer does) in the same append, and answers
//! with the stream version and the global position reached. Without a
//! caller-given expected version, a concurrent change is retried on fresh
//! state; with one, it is `ABORTED` with the current version. A retried
//! request with the same idempotency key gets the first answer.
mod accounts;
mod activities;
mod caller;
mod campaigns;
mod commerce;
mod configuration;
mod contacts;
mod error;
mod fields;
pub(crate) use fields::tenant_scoped_id;
mod leads;
mod opportunities;
pub(crate) mod personal;
mod records;
mod tickets;

use std::collections::BTreeSet;

use crm_domain::account::Account;
use crm_domain::contact::Contact;
use crm_domain::conversion::ConversionTargets;
use crm_domain::lead::Lead;
use crm_domain::{Aggregate, Context, DomainEvent, Mergeable, TenantId};
use crm_event_store::{
    AppendError, AppendEvents, Appended, EventStore, ExpectedVersion, NewEvent, RecordedEvent,
    Reservation, ReservationAction, StreamAppend,
};
use crm_proto::v1::{CommandOptions, CommandReply, ConvertLeadReply};
use hmac::{Hmac, KeyInit, Mac};
use jiff::Timestamp;
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub use accounts::AccountsService;
pub use activities::ActivitiesService;
pub use caller::Caller;
pub use campaigns::CampaignsService;
pub use commerce::CommerceService;
pub use configuration::ConfigurationService;
pub(crate) use configuration::require_role;
pub use contacts::ContactsService;
pub use error::ServiceError;
pub use leads::LeadsService;
pub use opportunities::{OpportunitiesService, PipelinesService};
pub use records::RecordsService;
pub use tickets::TicketsService;

/// Longest stream the command path folds from events (snapshots take over
/// for longer ones).
const MAX_STREAM_EVENTS: u64 = 100_000;
/// A snapshot is taken each time a stream passes a multiple of this many
/// events.
pub const SNAPSHOT_EVERY: u64 = 100;
/// Attempts on concurrent changes when the caller gave no expected version.
const MAX_ATTEMPTS: usize = 3;
/// Largest request a command service accepts.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// The command options of one request, parsed.
#[derive(Clone, Debug)]
pub struct Options {
    pub idempotency_key: Option<String>,
    pub expected_version: Option<u64>,
    pub occurred_at: Option<Timestamp>,
    /// Hash of the whole request: a retry with the same key must match it.
    pub fingerprint: [u8; 32],
    /// A request that changes nothing is recorded under its idempotency key
    /// too, so that a retry replays "unchanged" and another request under
    /// the key is refused. Callers' requests are; the system's own commands
    /// (process managers, the scheduler) are not: their keys name a trigger,
    /// and a command that had nothing to do yet may act on a later attempt.
    pub record_unchanged: bool,
}

impl Options {
    /// Options of a command the system sends itself (process managers, the
    /// scheduler): a deterministic key that also stands for the request.
    pub fn internal(idempotency_key: String, occurred_at: Timestamp) -> Self {
        let fingerprint = Sha256::digest(idempotency_key.as_bytes()).into();
        Self {
            idempotency_key: Some(idempotency_key),
            expected_version: None,
            occurred_at: Some(occurred_at),
            fingerprint,
            record_unchanged: false,
        }
    }

    /// Parses `options` of a request whose encoded form is `request`.
    pub fn parse(
        method: &str,
        options: Option<&CommandOptions>,
        request: &impl prost::Message,
    ) -> Result<Self, ServiceError> {
        let mut hasher = Sha256::new();
        hasher.update(method.as_bytes());
        hasher.update([0]);
        hasher.update(request.encode_to_vec());
        let fingerprint = hasher.finalize().into();
        let Some(options) = options else {
            return Ok(Self {
                idempotency_key: None,
                expected_version: None,
                occurred_at: None,
                fingerprint,
                record_unchanged: true,
            });
        };
        let key = &options.idempotency_key;
        if key.len() > crm_event_store::limits::MAX_IDEMPOTENCY_KEY_LEN
            || key.chars().any(char::is_control)
        {
            return Err(ServiceError::invalid(
                "options.idempotency_key",
                "must be at most 200 bytes without control characters",
            ));
        }
        let occurred_at = if options.occurred_at.is_empty() {
            None
        } else {
            Some(options.occurred_at.parse::<Timestamp>().map_err(|_| {
                ServiceError::invalid("options.occurred_at", "must be an RFC 3339 timestamp")
            })?)
        };
        if options
            .expected_version
            .is_some_and(|v| v > i64::MAX as u64)
        {
            return Err(ServiceError::invalid(
                "options.expected_version",
                "out of range",
            ));
        }
        Ok(Self {
            idempotency_key: (!key.is_empty()).then(|| key.clone()),
            expected_version: options.expected_version,
            occurred_at,
            fingerprint,
            record_unchanged: true,
        })
    }
}

/// Input errors before the lookups they would spoil (a parent chain, an
/// activity's targets): `command` decided on `state` with its facts not yet
/// looked up. Only a malformed request (`INVALID_ARGUMENT`) fails here; the
/// real decision, with the facts and the handler's clock, follows.
pub(crate) fn precheck<A: Aggregate>(state: &A, command: A::Command) -> Result<(), ServiceError> {
    let context = Context {
        now: Timestamp::now(),
        // The business time is the real decision's to check.
        occurred_at: None,
    };
    match state.decide(command, context) {
        Err(invalid @ crm_domain::DomainError::Invalid(_)) => Err(ServiceError::Domain(invalid)),
        _ => Ok(()),
    }
}

/// Parses a record id. `new_if_empty` (creates): an empty id gets a fresh
/// UUIDv7, and a given one must be a UUIDv7.
pub fn parse_id(
    field: &'static str,
    value: &str,
    new_if_empty: bool,
) -> Result<Uuid, ServiceError> {
    if value.is_empty() {
        return if new_if_empty {
            Ok(Uuid::now_v7())
        } else {
            Err(ServiceError::invalid(field, "is required"))
        };
    }
    let id = Uuid::parse_str(value).map_err(|_| ServiceError::invalid(field, "must be a UUID"))?;
    if new_if_empty && id.get_version_num() != 7 {
        return Err(ServiceError::invalid(field, "must be a UUIDv7"));
    }
    Ok(id)
}

/// Who may merge duplicates (DOMAIN.md §6): a sales manager or an admin.
pub const MERGE_ROLES: &[&str] = &["sales_manager", "admin"];

/// Runs commands for every aggregate against one event store.
#[derive(Clone)]
pub struct CommandHandler {
    store: EventStore,
    /// HMAC key for reservation hashes: values are compared, never stored.
    reservation_key: std::sync::Arc<[u8]>,
    /// Each tenant's uniqueness modes, read from its settings, kept for
    /// [`UNIQUENESS_TTL`].
    uniqueness: std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<TenantId, (std::time::Instant, Uniqueness)>>,
    >,
    /// Data subjects' keys, kept for [`SUBJECT_KEY_TTL`].
    subject_keys: std::sync::Arc<std::sync::Mutex<SubjectKeys>>,
    /// "Now" for decisions (the system clock; a test's for the scheduler).
    clock: std::sync::Arc<dyn Fn() -> Timestamp + Send + Sync>,
}

/// A subject's key when it was read, or `None` once this process erased
/// the subject (erasure is final: no key is ever made again, so the marker
/// never goes stale; it keeps a read that raced the erasure out).
type SubjectKeys = std::collections::HashMap<
    (TenantId, Uuid),
    (
        std::time::Instant,
        Option<std::sync::Arc<personal::SubjectKey>>,
    ),
>;

/// Keeps the key cache bounded: past 100,000 entries the keys go (they are
/// read again), the erasure markers stay unless they alone fill it.
fn trim(cache: &mut SubjectKeys) {
    if cache.len() > 100_000 {
        cache.retain(|_, (_, key)| key.is_none());
        if cache.len() > 100_000 {
            cache.clear();
        }
    }
}

/// The keys [`CommandHandler::seal`] made for new subjects of one tenant.
struct NewKeys {
    tenant: TenantId,
    keys: Vec<(Uuid, std::sync::Arc<personal::SubjectKey>)>,
}

/// How long a data subject's key is kept in memory: after an erasure in
/// another process, this one stops reading the subject's personal data
/// within this time (the erasing process at once).
const SUBJECT_KEY_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a tenant's uniqueness modes are reused before its settings are
/// read again: a change of mode applies within this time.
const UNIQUENESS_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// Which kinds of unique values a tenant keeps hard (reserved).
#[derive(Clone, Debug, Default)]
pub(crate) struct Uniqueness(Option<crm_domain::configuration::TenantSettings>);

impl Uniqueness {
    /// The keys of `keys` whose kind is hard for the tenant.
    pub(crate) fn hard(
        &self,
        keys: BTreeSet<crm_domain::UniqueKey>,
    ) -> BTreeSet<crm_domain::UniqueKey> {
        use crm_domain::configuration::{UniquenessMode, default_uniqueness_mode};
        keys.into_iter()
            .filter(|(kind, _)| {
                let mode = match &self.0 {
                    Some(settings) => settings.uniqueness_mode(kind),
                    None => default_uniqueness_mode(kind),
                };
                mode == UniquenessMode::Hard
            })
            .collect()
    }
}

impl CommandHandler {
    pub fn new(store: EventStore, reservation_key: &[u8]) -> Self {
        Self {
            store,
            reservation_key: reservation_key.into(),
            uniqueness: Default::default(),
            subject_keys: Default::default(),
            clock: std::sync::Arc::new(Timestamp::now),
        }
    }

    /// The same handler deciding with another clock (tests of time-driven
    /// rules).
    pub fn with_clock(
        mut self,
        clock: std::sync::Arc<dyn Fn() -> Timestamp + Send + Sync>,
    ) -> Self {
        self.clock = clock;
        self
    }

    /// A data subject's key; with `create`, made on first use. `None` when
    /// the subject has none (never needed, or erased).
    async fn subject_key(
        &self,
        tenant: &TenantId,
        subject: Uuid,
        create: bool,
    ) -> Result<Option<std::sync::Arc<personal::SubjectKey>>, ServiceError> {
        let cache_key = (tenant.clone(), subject);
        if let Ok(cache) = self.subject_keys.lock() {
            match cache.get(&cache_key) {
                Some((_, None)) => return Ok(None),
                Some((read_at, Some(key))) if read_at.elapsed() < SUBJECT_KEY_TTL => {
                    return Ok(Some(key.clone()));
                }
                _ => {}
            }
        }
        let unavailable = |e: crm_event_store::ReadError| ServiceError::Unavailable(e.to_string());
        let bytes = if create {
            let candidate = personal::new_key().map_err(ServiceError::Internal)?;
            self.store
                .subject_key_or_insert(tenant, subject, &candidate)
                .await
                .map_err(unavailable)?
        } else {
            self.store
                .subject_key(tenant, subject)
                .await
                .map_err(unavailable)?
        };
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let key = personal::SubjectKey::new(&bytes, tenant.as_str(), subject).ok_or_else(|| {
            ServiceError::Internal(format!("subject key of {subject} is malformed"))
        })?;
        let key = std::sync::Arc::new(key);
        if let Ok(mut cache) = self.subject_keys.lock() {
            // Erased while the key was being read: the erasure wins.
            if matches!(cache.get(&cache_key), Some((_, None))) {
                return Ok(None);
            }
            trim(&mut cache);
            cache.insert(cache_key, (std::time::Instant::now(), Some(key.clone())));
        }
        Ok(Some(key))
    }

    /// Encrypts the personal fields of the events of `subjects` (the streams
    /// of `request` whose state holds a person's data, as the caller's states
    /// say) under each subject's key.
    ///
    /// Returns the keys made for new subjects, which [`Self::remember`]
    /// caches once the append has stored them.
    async fn seal(
        &self,
        request: &mut AppendEvents,
        subjects: &[Uuid],
    ) -> Result<NewKeys, ServiceError> {
        let mut made = Vec::new();
        let mut new_keys = Vec::new();
        for stream in &mut request.streams {
            if !subjects.contains(&stream.stream_id)
                || !stream
                    .events
                    .iter()
                    .any(|e| personal::has_personal_fields(&e.event_type, e.schema_version))
            {
                continue;
            }
            let key = if stream.expected == crm_event_store::ExpectedVersion::NoStream {
                // A new subject: a fresh key, stored in the same transaction
                // as its first events (cached only once read back).
                let bytes = personal::new_key().map_err(ServiceError::Internal)?;
                new_keys.push(crm_event_store::SubjectKey {
                    subject_id: stream.stream_id,
                    key: bytes.to_vec(),
                });
                let key =
                    personal::SubjectKey::new(&bytes, request.tenant_id.as_str(), stream.stream_id)
                        .map(std::sync::Arc::new)
                        .ok_or_else(|| ServiceError::Internal("bad key length".into()))?;
                made.push((stream.stream_id, key.clone()));
                key
            } else {
                self.subject_key(&request.tenant_id, stream.stream_id, true)
                    .await?
                    .ok_or(ServiceError::Domain(crm_domain::DomainError::RecordErased))?
            };
            for event in &mut stream.events {
                personal::seal(
                    &mut event.payload,
                    &event.event_type,
                    event.schema_version,
                    &key,
                )
                .map_err(ServiceError::Internal)?;
            }
        }
        request.subject_keys.extend(new_keys);
        Ok(NewKeys {
            tenant: request.tenant_id.clone(),
            keys: made,
        })
    }

    /// The version of each of `stream_ids` in the store (0: none).
    pub(crate) async fn stream_versions(
        &self,
        tenant: &TenantId,
        stream_ids: &[Uuid],
    ) -> Result<Vec<u64>, ServiceError> {
        self.store
            .stream_versions(tenant, stream_ids)
            .await
            .map_err(|e| ServiceError::Unavailable(e.to_string()))
    }

    /// Caches the keys an append stored for new subjects (not when it was
    /// an idempotent replay: the stored keys are then those of the first
    /// append), so that reading the new records back needs no query.
    fn remember(&self, new_keys: NewKeys, appended: &Appended) {
        if appended.replayed || new_keys.keys.is_empty() {
            return;
        }
        if let Ok(mut cache) = self.subject_keys.lock() {
            trim(&mut cache);
            let now = std::time::Instant::now();
            for (subject, key) in new_keys.keys {
                let entry = cache
                    .entry((new_keys.tenant.clone(), subject))
                    .or_insert((now, Some(key.clone())));
                // Erased here meanwhile: the marker stays.
                if entry.1.is_some() {
                    *entry = (now, Some(key));
                }
            }
        }
    }

    /// An erasure command (admins only): stores its event, then destroys the
    /// subject's key (again, on a retry), so every personal field of the
    /// record becomes unreadable everywhere.
    pub(crate) async fn erase<A: Aggregate>(
        &self,
        caller: &Caller,
        stream_id: Uuid,
        options: &Options,
        command: A::Command,
    ) -> Result<CommandReply, ServiceError>
    where
        A::Command: Clone,
    {
        configuration::require_role(caller, &["admin"], "erase personal data")?;
        let reply = self
            .execute::<A>(caller, stream_id, options, command)
            .await?;
        self.erase_subject(&caller.tenant, stream_id).await?;
        Ok(reply)
    }

    /// Destroys a data subject's key (after its erasure event is stored):
    /// its personal fields become unreadable everywhere.
    pub(crate) async fn erase_subject(
        &self,
        tenant: &TenantId,
        subject: Uuid,
    ) -> Result<(), ServiceError> {
        self.store
            .erase_subject(tenant, subject)
            .await
            .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
        if let Ok(mut cache) = self.subject_keys.lock() {
            cache.insert((tenant.clone(), subject), (std::time::Instant::now(), None));
        }
        Ok(())
    }

    /// The tenant's uniqueness modes (its settings over the defaults).
    pub(crate) async fn uniqueness(&self, tenant: &TenantId) -> Result<Uniqueness, ServiceError> {
        if let Ok(cache) = self.uniqueness.lock()
            && let Some((read_at, modes)) = cache.get(tenant)
            && read_at.elapsed() < UNIQUENESS_TTL
        {
            return Ok(modes.clone());
        }
        let settings = self
            .state_or_default::<crm_domain::configuration::TenantSettingsConfig>(
                tenant,
                configuration::tenant_settings_id(tenant),
            )
            .await?
            .current()
            .cloned();
        let modes = Uniqueness(settings);
        if let Ok(mut cache) = self.uniqueness.lock() {
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(tenant.clone(), (std::time::Instant::now(), modes.clone()));
        }
        Ok(modes)
    }

    /// A keyed hash of a data-quality blocking key (`crate::quality`): the
    /// read model compares values without holding them.
    pub(crate) fn blocking_hash(&self, tenant: &TenantId, key: &str) -> Vec<u8> {
        self.key_hash(tenant, "data_quality", key)
    }

    fn key_hash(&self, tenant: &TenantId, kind: &str, value: &str) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.reservation_key)
            .expect("HMAC takes keys of any length");
        mac.update(tenant.as_str().as_bytes());
        mac.update(&[0]);
        mac.update(kind.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// A record's state, or the empty state when there is none (or it is
    /// another kind of record): for facts about other aggregates.
    pub(crate) async fn state_or_default<A: Aggregate>(
        &self,
        tenant: &TenantId,
        stream_id: Uuid,
    ) -> Result<A, ServiceError> {
        match self.load::<A>(tenant, stream_id).await {
            Ok((state, _, _)) => Ok(state),
            Err(ServiceError::Domain(crm_domain::DomainError::NotFound)) => Ok(A::default()),
            Err(other) => Err(other),
        }
    }

    /// The current version of the configuration record `id` a command names
    /// in `field`; `InvalidReference { field }` when none is published.
    pub(crate) async fn published<C: crm_domain::configuration::ConfigContent>(
        &self,
        tenant: &TenantId,
        id: Uuid,
        field: &'static str,
    ) -> Result<C, ServiceError> {
        self.state_or_default::<crm_domain::configuration::Config<C>>(tenant, id)
            .await?
            .current()
            .cloned()
            .ok_or(ServiceError::Domain(
                crm_domain::DomainError::InvalidReference { field },
            ))
    }

    /// FAILED_PRECONDITION (INVALID_REFERENCE on `field`) unless `id` is a
    /// stream of one of `types` in the tenant. Records are never deleted, so
    /// a reference that held once holds on every retry.
    pub(crate) async fn refers_to(
        &self,
        tenant: &TenantId,
        id: Uuid,
        types: &[&str],
        field: &'static str,
    ) -> Result<(), ServiceError> {
        if self.is_a(tenant, id, types).await? {
            Ok(())
        } else {
            Err(ServiceError::Domain(
                crm_domain::DomainError::InvalidReference { field },
            ))
        }
    }

    /// Whether `id` is a stream of one of `types` in the tenant.
    pub(crate) async fn is_a(
        &self,
        tenant: &TenantId,
        id: Uuid,
        types: &[&str],
    ) -> Result<bool, ServiceError> {
        let found = self
            .store
            .stream_type(tenant, id)
            .await
            .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
        Ok(found.is_some_and(|t| types.contains(&t.as_str())))
    }

    /// Folds a stream into state: the latest usable snapshot, then the events
    /// after it. Another stream type under this id reads as missing.
    pub(crate) async fn load<A: Aggregate>(
        &self,
        tenant: &TenantId,
        stream_id: Uuid,
    ) -> Result<(A, u64, u64), ServiceError> {
        let unavailable = |e: crm_event_store::ReadError| ServiceError::Unavailable(e.to_string());
        let stored = self
            .store
            .load_snapshot(tenant, stream_id)
            .await
            .map_err(unavailable)?
            .filter(|s| s.stream_type == A::STREAM_TYPE && s.schema_version == A::SNAPSHOT_VERSION);
        let mut snapshot = None;
        if let Some(stored) = stored {
            let (sealed, json) = match serde_json::from_str::<SealedSnapshot>(stored.state.as_str())
            {
                // A subject's, sealed: no key (erased: its snapshot goes
                // with it) or one it does not open under leaves it unread.
                Ok(SealedSnapshot { sealed }) => {
                    let json = match self.subject_key(tenant, stream_id, false).await? {
                        Some(key) => personal::open_text(&sealed, &key)
                            .ok_or("sealed snapshot does not open under the subject's key"),
                        None => Err("erased"),
                    };
                    (true, json)
                }
                Err(_) => (false, Ok(stored.state.as_str().to_owned())),
            };
            match json.map(|json| serde_json::from_str::<Snapshotted<A>>(&json)) {
                // A plain snapshot of a state holding personal data was
                // taken in the clear before snapshots were sealed, in an
                // older state format: not trusted.
                Ok(Ok(snapshotted)) if !sealed && snapshotted.state.holds_personal_data() => {
                    tracing::warn!(%stream_id, "unsealed snapshot of a data subject ignored");
                }
                Ok(Ok(snapshotted)) => {
                    snapshot = Some((snapshotted.state, stored.version, snapshotted.position));
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, %stream_id, "unreadable snapshot ignored; folding all events");
                }
                Err("erased") => {}
                Err(why) => tracing::warn!(%stream_id, why, "folding all events"),
            }
        }
        let from = snapshot.unwrap_or_default();
        let events = self
            .store
            .read_stream(tenant, stream_id, from.1 + 1, MAX_STREAM_EVENTS)
            .await
            .map_err(unavailable)?;
        self.fold(tenant, stream_id, from, &events).await
    }

    /// Folds `events` (the stream's own, in order, following the version
    /// `from` holds) into `from`'s state: `(state, version, position)`.
    /// Another stream type reads as missing.
    pub(crate) async fn fold<A: Aggregate>(
        &self,
        tenant: &TenantId,
        stream_id: Uuid,
        from: (A, u64, u64),
        events: &[RecordedEvent],
    ) -> Result<(A, u64, u64), ServiceError> {
        let (mut state, mut version, mut position) = from;
        let key = if personal::is_subject(A::STREAM_TYPE)
            && events
                .iter()
                .any(|e| personal::is_sealed(e.payload.as_str()))
        {
            self.subject_key(tenant, stream_id, false).await?
        } else {
            None
        };
        for stored in events {
            if stored.stream_type != A::STREAM_TYPE {
                return Err(crm_domain::DomainError::NotFound.into());
            }
            let does_not_decode = |e: serde_json::Error| {
                ServiceError::Internal(format!(
                    "event {} ({}) does not decode: {e}",
                    stored.global_position, stored.event_type
                ))
            };
            let decoded = if personal::is_sealed(stored.payload.as_str()) {
                let mut payload: serde_json::Value =
                    stored.payload.parse().map_err(does_not_decode)?;
                personal::open(&mut payload, key.as_deref());
                A::Event::decode(&stored.event_type, stored.schema_version, payload)
            } else {
                let mut payload = serde_json::Deserializer::from_str(stored.payload.as_str());
                A::Event::decode(&stored.event_type, stored.schema_version, &mut payload)
            };
            let event = decoded.map_err(does_not_decode)?.ok_or_else(|| {
                ServiceError::Internal(format!(
                    "event {} has type {} unknown to {}",
                    stored.global_position,
                    stored.event_type,
                    A::STREAM_TYPE
                ))
            })?;
            state = state.evolve(&event);
            version = stored.stream_version;
            position = stored.global_position;
        }
        Ok((state, version, position))
    }

    /// The first outcome of this request's idempotency key, if it has one:
    /// the reply a retry gets. Handlers that check anything against other
    /// records before [`Self::execute`] ask first, so a retry of a request
    /// accepted earlier replays even where those checks would now refuse it
    /// (IDEMPOTENCY_KEY_REUSED for another request under the key).
    pub(crate) async fn replayed(
        &self,
        caller: &Caller,
        stream_id: Uuid,
        options: &Options,
    ) -> Result<Option<CommandReply>, ServiceError> {
        Ok(self
            .first_outcome(caller, options)
            .await?
            .map(|appended| reply(stream_id, &appended)))
    }

    /// What the first request under this request's idempotency key
    /// appended, if there was one; IDEMPOTENCY_KEY_REUSED when that request
    /// was another. Every command's replay rests on it.
    async fn first_outcome(
        &self,
        caller: &Caller,
        options: &Options,
    ) -> Result<Option<Appended>, ServiceError> {
        let Some(key) = &options.idempotency_key else {
            return Ok(None);
        };
        let stored = self
            .store
            .idempotent_outcome(&caller.tenant, key)
            .await
            .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
        match stored {
            Some((fingerprint, _)) if fingerprint != options.fingerprint => {
                Err(ServiceError::IdempotencyKeyReused)
            }
            Some((_, appended)) => Ok(Some(appended)),
            None => Ok(None),
        }
    }

    /// Decides `command` against the stream's state and appends the result.
    #[tracing::instrument(
        name = "command",
        skip_all,
        err(Display),
        fields(tenant_id = %caller.tenant, %stream_id, stream_type = A::STREAM_TYPE, idempotent = options.idempotency_key.is_some())
    )]
    pub async fn execute<A: Aggregate>(
        &self,
        caller: &Caller,
        stream_id: Uuid,
        options: &Options,
        command: A::Command,
    ) -> Result<CommandReply, ServiceError>
    where
        A::Command: Clone,
    {
        match self
            .execute_pinned::<A>(caller, stream_id, options, command, &[])
            .await
        {
            // Nothing is pinned, so nothing pinned can move.
            Err(ServiceError::FactMoved) => Err(ServiceError::Contention),
            other => other,
        }
    }

    /// The state of another record a command's decision depends on (an
    /// account a deal opens on, a pipeline), with a pin at the version read:
    /// see [`Self::execute_on`]. The empty state and no pin when there is no
    /// such record (or it is another kind of record).
    pub(crate) async fn fact<A: Aggregate>(
        &self,
        tenant: &TenantId,
        stream_id: Uuid,
    ) -> Result<(A, Option<Pinned>), ServiceError> {
        match self.load::<A>(tenant, stream_id).await {
            Ok((state, version, _)) => Ok((
                state,
                // A missing stream folds to the empty state at version 0.
                (version > 0).then_some(Pinned {
                    stream_type: A::STREAM_TYPE,
                    stream_id,
                    version,
                }),
            )),
            Err(ServiceError::Domain(crm_domain::DomainError::NotFound)) => {
                Ok((A::default(), None))
            }
            Err(other) => Err(other),
        }
    }

    /// [`Self::execute`] for a command decided on facts about other records:
    /// `build` reads them ([`Self::fact`]) and returns the command with a pin
    /// on each record it read. The append checks that no pinned record moved
    /// since; if one did (an account archived while a deal opened on it),
    /// `build` reads the facts again and the command is decided anew.
    #[tracing::instrument(
        name = "command",
        skip_all,
        err(Display),
        fields(tenant_id = %caller.tenant, %stream_id, stream_type = A::STREAM_TYPE, idempotent = options.idempotency_key.is_some())
    )]
    pub async fn execute_on<A: Aggregate, Facts>(
        &self,
        caller: &Caller,
        stream_id: Uuid,
        options: &Options,
        mut build: impl FnMut() -> Facts,
    ) -> Result<CommandReply, ServiceError>
    where
        A::Command: Clone,
        Facts: Future<Output = Result<(A::Command, Vec<Pinned>), ServiceError>>,
    {
        for _ in 0..MAX_ATTEMPTS {
            let (command, pins) = build().await?;
            match self
                .execute_pinned::<A>(caller, stream_id, options, command, &pins)
                .await
            {
                Err(ServiceError::FactMoved) => {
                    tracing::debug!("a record the command read moved; reading it again");
                }
                other => return other,
            }
        }
        Err(ServiceError::Contention)
    }

    /// One decision and append; a pin that moved is `FactMoved`, for the
    /// caller to read its facts again (logged by the callers' spans only
    /// when it is their answer).
    async fn execute_pinned<A: Aggregate>(
        &self,
        caller: &Caller,
        stream_id: Uuid,
        options: &Options,
        command: A::Command,
        pins: &[Pinned],
    ) -> Result<CommandReply, ServiceError>
    where
        A::Command: Clone,
    {
        if let Some(replayed) = self.replayed(caller, stream_id, options).await? {
            return Ok(replayed);
        }
        // A create is first decided on empty state, without reading: the
        // append's "no stream" expectation catches an existing record.
        let mut assume_new = A::creates(&command) && options.expected_version.unwrap_or(0) == 0;
        for _ in 0..MAX_ATTEMPTS {
            let (state, version, position) = if std::mem::take(&mut assume_new) {
                (A::default(), 0, 0)
            } else {
                self.load::<A>(&caller.tenant, stream_id).await?
            };
            if let Some(expected) = options.expected_version
                && expected != version
            {
                return Err(ServiceError::VersionConflict { current: version });
            }
            let context = Context {
                now: (self.clock)(),
                occurred_at: options.occurred_at,
            };
            let events = state.decide(command.clone(), context)?;
            if events.is_empty() {
                return self
                    .unchanged(caller, stream_id, version, position, options)
                    .await;
            }
            let uniqueness = self.uniqueness(&caller.tenant).await?;
            let before = uniqueness.hard(state.unique_keys());
            let new_state = state.replay(events.iter());
            let after = uniqueness.hard(new_state.unique_keys());
            let mut request = self.append_request::<A>(
                caller, stream_id, version, options, &events, &before, &after,
            )?;
            // The command's own stream is checked anyway.
            for pin in pins.iter().filter(|pin| pin.stream_id != stream_id) {
                request.streams.push(pin.stream_append());
            }
            let subjects: &[Uuid] = if new_state.holds_personal_data() {
                &[stream_id]
            } else {
                &[]
            };
            let new_keys = self.seal(&mut request, subjects).await?;
            match self.store.append(request).await {
                Ok(appended) => {
                    self.remember(new_keys, &appended);
                    if A::STREAM_TYPE == <crm_domain::configuration::TenantSettings as crm_domain::configuration::ConfigContent>::STREAM_TYPE
                        && let Ok(mut cache) = self.uniqueness.lock()
                    {
                        // This process applies new settings at once; others
                        // within UNIQUENESS_TTL.
                        cache.remove(&caller.tenant);
                    }
                    let reply = reply(stream_id, &appended);
                    if !appended.replayed
                        && version / SNAPSHOT_EVERY != reply.stream_version / SNAPSHOT_EVERY
                    {
                        let (version, position) = (reply.stream_version, reply.global_position);
                        self.save_snapshot(caller, stream_id, new_state, version, position);
                    }
                    return Ok(reply);
                }
                Err(AppendError::VersionConflict {
                    stream_id: moved, ..
                }) if moved != stream_id => {
                    if pins.iter().any(|pin| pin.stream_id == moved) {
                        return Err(ServiceError::FactMoved);
                    }
                    return Err(ServiceError::Internal(format!(
                        "a conflict on stream {moved}, which the command did not write"
                    )));
                }
                Err(AppendError::VersionConflict { .. })
                    if options.expected_version.is_none() || version == 0 =>
                {
                    tracing::debug!("concurrent change; deciding again on fresh state");
                }
                // A create whose id names a record of another type: the id
                // is taken (DOMAIN.md §1.1), not unknown.
                Err(AppendError::WrongStreamType {
                    stream_id: taken, ..
                }) if A::creates(&command) && taken == stream_id => {
                    return Err(ServiceError::Domain(
                        crm_domain::DomainError::AlreadyExists {
                            key: id_field(A::STREAM_TYPE),
                            holder: None,
                        },
                    ));
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(ServiceError::Contention)
    }

    /// The reply to a request that changes nothing: `stream_id` stays at
    /// `version` (its last event at `position`). Recorded under the
    /// request's idempotency key when it has one (see
    /// [`Options::record_unchanged`]); if a concurrent request under the key
    /// was recorded first, its outcome is the answer.
    pub(crate) async fn unchanged(
        &self,
        caller: &Caller,
        stream_id: Uuid,
        version: u64,
        position: u64,
        options: &Options,
    ) -> Result<CommandReply, ServiceError> {
        if options.record_unchanged
            && let Some(key) = &options.idempotency_key
        {
            let outcome = self
                .store
                .record_unchanged(
                    &caller.tenant,
                    key,
                    options.fingerprint,
                    stream_id,
                    version,
                    position,
                )
                .await?;
            if outcome.replayed {
                return Ok(reply(stream_id, &outcome));
            }
        }
        Ok(CommandReply {
            stream_id: stream_id.to_string(),
            stream_version: version,
            global_position: position,
            unchanged: true,
        })
    }

    /// Stores a snapshot in the background: it only speeds up later loads.
    fn save_snapshot<A: Aggregate>(
        &self,
        caller: &Caller,
        stream_id: Uuid,
        state: A,
        version: u64,
        position: u64,
    ) {
        let personal = state.holds_personal_data();
        let json = match serde_json::to_string(&Snapshotted { position, state }) {
            Ok(json) => json,
            Err(error) => {
                tracing::warn!(%error, %stream_id, "state does not serialize; no snapshot");
                return;
            }
        };
        let handler = self.clone();
        let tenant = caller.tenant.clone();
        tokio::spawn(async move {
            // A subject's state holds its personal data in the clear: it is
            // stored sealed under the subject's key, so erasing the key makes
            // the snapshot unreadable with the events.
            let state = if personal {
                match handler.subject_key(&tenant, stream_id, false).await {
                    Ok(Some(key)) => match personal::seal_text(&json, &key) {
                        Ok(sealed) => serde_json::json!({ SEALED_SNAPSHOT: sealed }).to_string(),
                        Err(error) => {
                            tracing::warn!(%error, %stream_id, "snapshot not sealed; not saved");
                            return;
                        }
                    },
                    // Erased meanwhile, or the key is unreadable now.
                    Ok(None) => return,
                    Err(error) => {
                        tracing::warn!(%error, %stream_id, "no subject key; snapshot not saved");
                        return;
                    }
                }
            } else {
                json
            };
            let state = crm_event_store::JsonText(state);
            let store = &handler.store;
            let snapshot = crm_event_store::Snapshot {
                stream_type: A::STREAM_TYPE.to_owned(),
                stream_id,
                version,
                schema_version: A::SNAPSHOT_VERSION,
                state,
            };
            let saved = if personal {
                store.save_subject_snapshot(&tenant, &snapshot).await
            } else {
                store.save_snapshot(&tenant, &snapshot).await
            };
            if let Err(error) = saved {
                tracing::warn!(%error, %stream_id, "snapshot not saved");
            }
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn append_request<A: Aggregate>(
        &self,
        caller: &Caller,
        stream_id: Uuid,
        version: u64,
        options: &Options,
        events: &[A::Event],
        before: &BTreeSet<crm_domain::UniqueKey>,
        after: &BTreeSet<crm_domain::UniqueKey>,
    ) -> Result<AppendEvents, ServiceError> {
        Ok(AppendEvents {
            tenant_id: caller.tenant.clone(),
            streams: vec![stream_append::<A>(stream_id, version, events)?],
            idempotency_key: options.idempotency_key.clone(),
            metadata: caller.metadata(options),
            reservations: self.reservations(&caller.tenant, stream_id, before, after),
            subject_keys: Vec::new(),
            request_fingerprint: Some(options.fingerprint),
        })
    }

    /// A new stream's append, the claims for the unique values its events
    /// give it, and whether its state holds a person's data.
    fn new_stream<A: Aggregate>(
        &self,
        tenant: &TenantId,
        uniqueness: &Uniqueness,
        stream_id: Uuid,
        events: &[A::Event],
    ) -> Result<(StreamAppend, Vec<Reservation>, bool), ServiceError> {
        let state = A::default().replay(events.iter());
        let keys = uniqueness.hard(state.unique_keys());
        let claims = self.reservations(tenant, stream_id, &BTreeSet::new(), &keys);
        Ok((
            stream_append::<A>(stream_id, 0, events)?,
            claims,
            state.holds_personal_data(),
        ))
    }

    /// Claims for the keys `after` adds, releases for those it drops.
    fn reservations(
        &self,
        tenant: &TenantId,
        stream_id: Uuid,
        before: &BTreeSet<crm_domain::UniqueKey>,
        after: &BTreeSet<crm_domain::UniqueKey>,
    ) -> Vec<Reservation> {
        let reservation = |(kind, value): &crm_domain::UniqueKey, action| Reservation {
            kind: (*kind).to_owned(),
            key_hash: self.key_hash(tenant, kind, value),
            stream_id,
            action,
        };
        let mut reservations: Vec<Reservation> = after
            .difference(before)
            .map(|key| reservation(key, ReservationAction::Claim))
            .collect();
        reservations.extend(
            before
                .difference(after)
                .map(|key| reservation(key, ReservationAction::Release)),
        );
        reservations
    }

    /// Merges duplicate records in one atomic append over the survivor and
    /// every loser; the losers' unique values move to the survivor.
    #[tracing::instrument(name = "merge_records", skip_all, err(Display), fields(tenant_id = %caller.tenant, %survivor_id, n_losers = loser_ids.len()))]
    pub async fn merge_records<A: Mergeable>(
        &self,
        caller: &Caller,
        survivor_id: Uuid,
        loser_ids: &[Uuid],
        choices: &A::Choices,
        dry_run: bool,
        options: &Options,
    ) -> Result<Merged, ServiceError> {
        // Before anything is read: the reply (a dry run's too) shows every
        // party's personal fields in the clear.
        configuration::require_role(caller, MERGE_ROLES, "merge records")?;
        let merged: Vec<String> = loser_ids.iter().map(Uuid::to_string).collect();
        if !dry_run && let Some(appended) = self.first_outcome(caller, options).await? {
            return Ok(Merged {
                survivor: Some(reply(survivor_id, &appended)),
                merged,
                changes_json: String::new(),
                dry_run,
            });
        }
        for _ in 0..MAX_ATTEMPTS {
            let (survivor, version, position) = self.load::<A>(&caller.tenant, survivor_id).await?;
            if let Some(expected) = options.expected_version
                && expected != version
            {
                return Err(ServiceError::VersionConflict { current: version });
            }
            let mut losers = Vec::with_capacity(loser_ids.len());
            let mut versions = Vec::with_capacity(loser_ids.len());
            for id in loser_ids {
                let (loser, loser_version, _) = self.load::<A>(&caller.tenant, *id).await?;
                losers.push((*id, loser));
                versions.push(loser_version);
            }
            let context = Context {
                now: (self.clock)(),
                occurred_at: options.occurred_at,
            };
            let (survivor_events, loser_events) =
                A::merge(survivor_id, &survivor, &losers, choices, context)?;
            let changes_json = match survivor_events.first() {
                Some(event) => serde_json::to_string(event).map_err(|e| {
                    ServiceError::Internal(format!("event does not serialize: {e}"))
                })?,
                None => String::new(),
            };
            if dry_run {
                return Ok(Merged {
                    survivor: Some(CommandReply {
                        stream_id: survivor_id.to_string(),
                        stream_version: version,
                        global_position: position,
                        unchanged: true,
                    }),
                    merged,
                    changes_json,
                    dry_run,
                });
            }
            let uniqueness = self.uniqueness(&caller.tenant).await?;
            let before = uniqueness.hard(survivor.unique_keys());
            let after = uniqueness.hard(
                survivor
                    .clone()
                    .replay(survivor_events.iter())
                    .unique_keys(),
            );
            let mut reservations = Vec::new();
            for key in after.difference(&before) {
                let holder = losers
                    .iter()
                    .find(|(_, loser)| uniqueness.hard(loser.unique_keys()).contains(key))
                    .map(|(id, _)| *id);
                let action = match holder {
                    Some(from) => ReservationAction::Transfer { from },
                    None => ReservationAction::Claim,
                };
                reservations.push(Reservation {
                    kind: key.0.to_owned(),
                    key_hash: self.key_hash(&caller.tenant, key.0, &key.1),
                    stream_id: survivor_id,
                    action,
                });
            }
            let mut streams = vec![stream_append::<A>(survivor_id, version, &survivor_events)?];
            for ((id, events), loser_version) in loser_events.iter().zip(&versions) {
                streams.push(stream_append::<A>(*id, *loser_version, events)?);
                let (_, loser) = losers
                    .iter()
                    .find(|(loser, _)| loser == id)
                    .expect("every loser was loaded");
                for key in uniqueness.hard(loser.unique_keys()).difference(&after) {
                    reservations.push(Reservation {
                        kind: key.0.to_owned(),
                        key_hash: self.key_hash(&caller.tenant, key.0, &key.1),
                        stream_id: *id,
                        action: ReservationAction::Release,
                    });
                }
            }
            let mut request = AppendEvents {
                tenant_id: caller.tenant.clone(),
                streams,
                idempotency_key: options.idempotency_key.clone(),
                metadata: caller.metadata(options),
                reservations,
                subject_keys: Vec::new(),
                request_fingerprint: Some(options.fingerprint),
            };
            // Survivor and losers are one kind: all subjects, or none.
            let subjects: Vec<Uuid> = if survivor.holds_personal_data() {
                std::iter::once(survivor_id)
                    .chain(loser_ids.iter().copied())
                    .collect()
            } else {
                Vec::new()
            };
            let new_keys = self.seal(&mut request, &subjects).await?;
            match self.store.append(request).await {
                Ok(appended) => {
                    self.remember(new_keys, &appended);
                    return Ok(Merged {
                        survivor: Some(reply(survivor_id, &appended)),
                        merged,
                        changes_json,
                        dry_run,
                    });
                }
                // The caller's expected version is the survivor's: a loser
                // that moved meanwhile is decided again, not ABORTED with
                // the loser's version (read as the survivor's).
                Err(AppendError::VersionConflict { stream_id, .. })
                    if options.expected_version.is_none() || stream_id != survivor_id =>
                {
                    tracing::debug!("concurrent change; deciding the merge again");
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(ServiceError::Contention)
    }

    /// Converts a qualified lead in one atomic append over the lead, the new
    /// account (unless an existing one is named) and the new contact. The
    /// contact's and a new account's ids are derived from the lead, so a retry
    /// converges on the same records.
    #[tracing::instrument(name = "convert_lead", skip_all, err(Display), fields(tenant_id = %caller.tenant, %lead_id))]
    pub async fn convert_lead(
        &self,
        caller: &Caller,
        lead_id: Uuid,
        existing_account: Option<Uuid>,
        deal: Option<DealRequest>,
        options: &Options,
    ) -> Result<ConvertLeadReply, ServiceError> {
        let account_id = existing_account.unwrap_or_else(|| {
            fields::tenant_scoped_id(&caller.tenant, &format!("{lead_id}:account"))
        });
        let contact_id = fields::tenant_scoped_id(&caller.tenant, &format!("{lead_id}:contact"));
        let opportunity_id = deal
            .as_ref()
            .map(|_| fields::tenant_scoped_id(&caller.tenant, &format!("{lead_id}:opportunity")));
        let answer = |appended: &Appended| ConvertLeadReply {
            opportunity_id: opportunity_id.map(|id| id.to_string()).unwrap_or_default(),
            lead: Some(reply(lead_id, appended)),
            account_id: account_id.to_string(),
            account_created: appended.streams.iter().any(|s| s.stream_id == account_id),
            contact_id: contact_id.to_string(),
            global_position: appended.last_position,
            unchanged: appended.replayed,
        };
        if let Some(appended) = self.first_outcome(caller, options).await? {
            return Ok(answer(&appended));
        }
        // The deal's own fields before the pipeline is read (after the
        // replay: a retry of a conversion done earlier answers as it did).
        if let Some(deal) = &deal {
            crm_domain::conversion::check_deal(&deal.details())?;
        }
        let pipeline = match &deal {
            Some(deal) => Some(crm_domain::opportunity::DealFacts {
                account_active: true,
                pipeline: self
                    .state_or_default::<crm_domain::pipeline::PipelineConfig>(
                        &caller.tenant,
                        deal.pipeline_id,
                    )
                    .await?,
                may_reopen_won: false,
                contact_usable: true,
            }),
            None => None,
        };
        for _ in 0..MAX_ATTEMPTS {
            let (lead, lead_version, _) = self.load::<Lead>(&caller.tenant, lead_id).await?;
            if let Some(expected) = options.expected_version
                && expected != lead_version
            {
                return Err(ServiceError::VersionConflict {
                    current: lead_version,
                });
            }
            let (account, account_pin) = match existing_account {
                // Not an account (or another stream type): the empty state,
                // which conversion refuses as not usable.
                Some(id) => {
                    let (state, pin) = self.fact::<Account>(&caller.tenant, id).await?;
                    (Some(state), pin)
                }
                None => (None, None),
            };
            let uniqueness = self.uniqueness(&caller.tenant).await?;
            let allow_working = self
                .state_or_default::<crm_domain::configuration::TenantSettingsConfig>(
                    &caller.tenant,
                    configuration::tenant_settings_id(&caller.tenant),
                )
                .await?
                .current()
                .is_some_and(|s| s.convert_from_working);
            let context = Context {
                now: (self.clock)(),
                occurred_at: options.occurred_at,
            };
            let conversion = crm_domain::conversion::convert(
                &lead,
                ConversionTargets {
                    account_id,
                    existing_account: account.as_ref(),
                    contact_id,
                    allow_working,
                    lead_id,
                    opportunity: match (&deal, &pipeline, opportunity_id) {
                        (Some(deal), Some(facts), Some(id)) => Some((id, deal.details(), facts)),
                        _ => None,
                    },
                },
                context,
            )?;
            let mut streams = vec![stream_append::<Lead>(
                lead_id,
                lead_version,
                &conversion.lead,
            )?];
            let mut reservations = Vec::new();
            let mut subjects = vec![lead_id];
            if let Some(pin) = account_pin {
                // Pinned at the version the conversion was decided on: an
                // archive or merge of the account meanwhile fails the append,
                // and the conversion is decided again.
                streams.push(pin.stream_append());
            }
            if !conversion.account.is_empty() {
                let (stream, claims, personal) = self.new_stream::<Account>(
                    &caller.tenant,
                    &uniqueness,
                    account_id,
                    &conversion.account,
                )?;
                streams.push(stream);
                reservations.extend(claims);
                if personal {
                    subjects.push(account_id);
                }
            }
            let (stream, claims, _) = self.new_stream::<Contact>(
                &caller.tenant,
                &uniqueness,
                contact_id,
                &conversion.contact,
            )?;
            streams.push(stream);
            reservations.extend(claims);
            subjects.push(contact_id);
            if let Some(id) = opportunity_id {
                let (stream, claims, _) = self.new_stream::<crm_domain::opportunity::Opportunity>(
                    &caller.tenant,
                    &uniqueness,
                    id,
                    &conversion.opportunity,
                )?;
                streams.push(stream);
                reservations.extend(claims);
            }
            let mut request = AppendEvents {
                tenant_id: caller.tenant.clone(),
                streams,
                idempotency_key: options.idempotency_key.clone(),
                metadata: caller.metadata(options),
                reservations,
                subject_keys: Vec::new(),
                request_fingerprint: Some(options.fingerprint),
            };
            let new_keys = self.seal(&mut request, &subjects).await?;
            match self.store.append(request).await {
                Ok(appended) => {
                    self.remember(new_keys, &appended);
                    return Ok(answer(&appended));
                }
                // The caller's expected version is the lead's (see merges).
                Err(AppendError::VersionConflict { stream_id, .. })
                    if options.expected_version.is_none() || stream_id != lead_id =>
                {
                    tracing::debug!("concurrent change; deciding the conversion again");
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(ServiceError::Contention)
    }
}

/// Another record a command was decided on, at the version read: the
/// command's append fails if it moved meanwhile (a stream pinned in the
/// append, see [`crm_event_store::StreamAppend`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pinned {
    stream_type: &'static str,
    stream_id: Uuid,
    version: u64,
}

impl Pinned {
    fn stream_append(self) -> StreamAppend {
        StreamAppend {
            stream_type: self.stream_type.to_owned(),
            stream_id: self.stream_id,
            expected: ExpectedVersion::Pinned(self.version),
            events: Vec::new(),
        }
    }
}

/// The deal a lead conversion opens, as the caller asked for it.
pub struct DealRequest {
    pub name: String,
    pub pipeline_id: Uuid,
    pub stage: String,
    pub amount: crm_domain::common::Money,
    pub close_date: jiff::civil::Date,
    pub owner: String,
}

impl DealRequest {
    /// The deal's details; the conversion fills in account, contact and
    /// source.
    fn details(&self) -> crm_domain::opportunity::DealDetails {
        crm_domain::opportunity::DealDetails {
            name: self.name.clone(),
            account_id: Uuid::nil(),
            contact_id: None,
            pipeline_id: self.pipeline_id,
            stage: self.stage.clone(),
            amount: self.amount.clone(),
            close_date: self.close_date,
            owner: self.owner.clone(),
            source: crm_domain::opportunity::DealSource::default(),
        }
    }
}

/// The outcome of a merge (or its preview).
pub struct Merged {
    pub survivor: Option<CommandReply>,
    pub merged: Vec<String>,
    /// The survivor's merge event as JSON: what changed.
    pub changes_json: String,
    pub dry_run: bool,
}

/// The one field of a data subject's snapshot: its [`Snapshotted`] JSON
/// sealed under the subject's key.
const SEALED_SNAPSHOT: &str = "sealed";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SealedSnapshot {
    sealed: String,
}

/// A snapshot's content: the state and the position of its last event.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(bound(deserialize = "A: serde::de::DeserializeOwned"))]
struct Snapshotted<A> {
    position: u64,
    state: A,
}

/// One stream's part of an append: serialized events at the expected version.
fn stream_append<A: Aggregate>(
    stream_id: Uuid,
    version: u64,
    events: &[A::Event],
) -> Result<StreamAppend, ServiceError> {
    let mut new_events = Vec::with_capacity(events.len());
    for event in events {
        let payload = serde_json::to_value(event)
            .map_err(|e| ServiceError::Internal(format!("event does not serialize: {e}")))?;
        new_events.push(NewEvent {
            event_id: Uuid::now_v7(),
            event_type: event.event_type().to_owned(),
            schema_version: event.schema_version(),
            payload,
        });
    }
    Ok(StreamAppend {
        stream_type: A::STREAM_TYPE.to_owned(),
        stream_id,
        expected: if version == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(version)
        },
        events: new_events,
    })
}

/// The reply for an append. A replayed outcome names the stream the first
/// request wrote, which for a create with a server-made id is not the id this
/// retry was given.
fn reply(stream_id: Uuid, appended: &Appended) -> CommandReply {
    let stream = appended
        .streams
        .iter()
        .find(|s| s.stream_id == stream_id)
        .or_else(|| appended.streams.first());
    CommandReply {
        stream_id: stream.map_or(stream_id, |s| s.stream_id).to_string(),
        stream_version: stream.map_or(0, |s| s.last_version),
        global_position: appended.last_position,
        unchanged: appended.replayed,
    }
}

/// The request field that carries the id of a record of `stream_type`.
fn id_field(stream_type: &str) -> &'static str {
    match stream_type {
        "account" => "account_id",
        "activity" => "activity_id",
        "campaign" => "campaign_id",
        "contact" => "contact_id",
        "lead" => "lead_id",
        "opportunity" => "opportunity_id",
        "ticket" => "ticket_id",
        "product" => "product_id",
        "order" => "order_id",
        "invoice" => "invoice_id",
        "payment" => "payment_id",
        _ => "id",
    }
}
