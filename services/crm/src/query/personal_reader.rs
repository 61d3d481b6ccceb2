//! Personal fields at query time (ADR 0006): read models keep names, emails
//! and phones as the events carry them, encrypted under each person's key;
//! a query opens them with the keys of the people it shows, read from the
//! event store's `subject_keys` and kept briefly, as the command handler
//! does. Without a key (erased) every encrypted string reads as empty.
//!
//! Read models also know who was erased (`PersonalDataErased`, applied
//! before the key is destroyed): callers pass those people as erased, so a
//! key still cached here, or not yet destroyed, is never used for them, and
//! an erasure shows as soon as the read model has applied it.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crm_domain::TenantId;
use crm_event_store::EventStore;
use futures_util::future::try_join_all;
use serde_json::Value;
use uuid::Uuid;

use crate::command::ServiceError;
use crate::command::personal::{self, SubjectKey};

/// How long a key is reused before it is read again (as the command
/// handler's cache).
const KEY_TTL: Duration = Duration::from_secs(60);
/// Most keys kept; the cache is emptied past it.
const MAX_CACHED: usize = 100_000;

type Cache = HashMap<(TenantId, Uuid), (Instant, Arc<SubjectKey>)>;

/// Reads data subjects' keys for queries.
#[derive(Clone)]
pub(crate) struct PersonalReader {
    store: EventStore,
    cache: Arc<Mutex<Cache>>,
}

/// The keys of the people one reply shows.
#[derive(Default)]
pub(crate) struct Keys(HashMap<Uuid, Arc<SubjectKey>>);

impl PersonalReader {
    pub(crate) fn new(store: EventStore) -> Self {
        Self {
            store,
            cache: Arc::default(),
        }
    }

    /// The keys of `subjects` that exist; an erased subject gets none,
    /// whatever is cached.
    pub(crate) async fn keys(
        &self,
        tenant: &TenantId,
        subjects: impl IntoIterator<Item = (Uuid, bool)>,
    ) -> Result<Keys, ServiceError> {
        let mut keys = HashMap::new();
        let mut missing = Vec::new();
        {
            let cache = self.cache.lock().ok();
            for (subject, erased) in subjects {
                if erased || keys.contains_key(&subject) || missing.contains(&subject) {
                    continue;
                }
                match cache
                    .as_ref()
                    .and_then(|cache| cache.get(&(tenant.clone(), subject)))
                {
                    Some((read_at, key)) if read_at.elapsed() < KEY_TTL => {
                        keys.insert(subject, key.clone());
                    }
                    _ => missing.push(subject),
                }
            }
        }
        let read = try_join_all(missing.into_iter().map(|subject| async move {
            let bytes = self
                .store
                .subject_key(tenant, subject)
                .await
                .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
            let key = match bytes {
                Some(bytes) => Some(Arc::new(
                    SubjectKey::new(&bytes, tenant.as_str(), subject).ok_or_else(|| {
                        ServiceError::Internal(format!("subject key of {subject} is malformed"))
                    })?,
                )),
                None => None,
            };
            Ok::<_, ServiceError>((subject, key))
        }))
        .await?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() > MAX_CACHED {
                cache.clear();
            }
            for (subject, key) in &read {
                if let Some(key) = key {
                    cache.insert((tenant.clone(), *subject), (Instant::now(), key.clone()));
                }
            }
        }
        keys.extend(
            read.into_iter()
                .filter_map(|(subject, key)| key.map(|key| (subject, key))),
        );
        Ok(Keys(keys))
    }
}

impl Keys {
    /// `value` with every encrypted string opened with `subject`'s key (or
    /// read as empty without one).
    pub(crate) fn open(&self, subject: Uuid, mut value: Value) -> Value {
        personal::open(&mut value, self.0.get(&subject).map(Arc::as_ref));
        value
    }

    /// One string, opened with `subject`'s key when it is encrypted.
    pub(crate) fn open_text(&self, subject: Uuid, text: String) -> String {
        match self.open(subject, Value::String(text)) {
            Value::String(text) => text,
            _ => String::new(),
        }
    }
}
