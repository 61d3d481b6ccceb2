//! Personal data under per-subject keys (crypto-shredding, DESIGN §6).
//!
//! Every contact, lead and person account (a *data subject*) gets a random
//! 256-bit key. Before
//! its events are appended, every string under a property the event's JSON
//! Schema marks `x-personal` (names, emails, phones, free text) is replaced by
//! `enc:v1:<base64(nonce ‖ ChaCha20-Poly1305 ciphertext)>`, bound to the
//! tenant and subject. Ids, times, amounts and flags stay clear. Reading
//! decrypts with the key; once [`crm_event_store::EventStore::erase_subject`]
//! has destroyed it, every such string reads as empty, in the store, on NATS
//! and in every copy, while the events themselves never change.
use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::Value;
use uuid::Uuid;

/// Stream types whose streams may be data subjects: every contact and lead,
/// and the accounts of kind `person` (B2C).
pub const SUBJECT_STREAM_TYPES: [&str; 3] = ["contact", "lead", "account"];
const PREFIX: &str = "enc:v1:";
/// What an encrypted string reads as once its key is gone.
pub const ERASED: &str = "";

pub fn is_subject(stream_type: &str) -> bool {
    SUBJECT_STREAM_TYPES.contains(&stream_type)
}

/// A fresh random key.
pub fn new_key() -> Result<[u8; 32], String> {
    let mut key = [0u8; 32];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| "no system randomness".to_owned())?;
    Ok(key)
}

/// One subject's key, with what its ciphertexts are bound to.
pub struct SubjectKey {
    key: LessSafeKey,
    aad: Vec<u8>,
}

impl SubjectKey {
    pub fn new(bytes: &[u8], tenant: &str, subject: Uuid) -> Option<Self> {
        let key = UnboundKey::new(&CHACHA20_POLY1305, bytes).ok()?;
        let mut aad = tenant.as_bytes().to_vec();
        aad.push(0);
        aad.extend_from_slice(subject.as_bytes());
        Some(Self {
            key: LessSafeKey::new(key),
            aad,
        })
    }

    fn seal_with(&self, nonce: [u8; NONCE_LEN], plaintext: &str) -> Result<String, String> {
        let mut data = plaintext.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&self.aad),
                &mut data,
            )
            .map_err(|_| "encryption failed".to_owned())?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&data);
        Ok(format!("{PREFIX}{}", STANDARD_NO_PAD.encode(sealed)))
    }

    fn open(&self, text: &str) -> Option<String> {
        let sealed = STANDARD_NO_PAD.decode(text.strip_prefix(PREFIX)?).ok()?;
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, data) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut data = data.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(&self.aad), &mut data)
            .ok()?;
        String::from_utf8(plain.to_vec()).ok()
    }
}

type PersonalProperties = HashMap<&'static str, HashMap<u32, HashSet<String>>>;

/// Property names the schemas mark `x-personal`, per event type and schema
/// version of the subject stream types.
fn personal_properties() -> &'static PersonalProperties {
    static PROPERTIES: OnceLock<PersonalProperties> = OnceLock::new();
    PROPERTIES.get_or_init(|| {
        let mut map: PersonalProperties = HashMap::new();
        for schema in crm_domain::schemas::event_schemas() {
            if !is_subject(schema.stream_type) {
                continue;
            }
            let mut names = HashSet::new();
            collect_personal(schema.schema.as_value(), &mut names);
            if !names.is_empty() {
                map.entry(schema.event_type)
                    .or_default()
                    .insert(schema.schema_version, names);
            }
        }
        map
    })
}

fn personal_names(event_type: &str, schema_version: u32) -> Option<&'static HashSet<String>> {
    personal_properties()
        .get(event_type)
        .and_then(|versions| versions.get(&schema_version))
}

fn collect_personal(schema: &Value, names: &mut HashSet<String>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::Object(properties)) = map.get("properties") {
                for (name, property) in properties {
                    if property.get("x-personal") == Some(&Value::Bool(true)) {
                        names.insert(name.clone());
                    }
                }
            }
            for value in map.values() {
                collect_personal(value, names);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_personal(v, names)),
        _ => {}
    }
}

/// Whether an event of this type carries personal fields.
pub fn has_personal_fields(event_type: &str, schema_version: u32) -> bool {
    personal_names(event_type, schema_version).is_some()
}

/// Encrypts, in `payload`, every string under a personal property of this
/// event type.
pub fn seal(
    payload: &mut Value,
    event_type: &str,
    schema_version: u32,
    key: &SubjectKey,
) -> Result<(), String> {
    let Some(names) = personal_names(event_type, schema_version) else {
        return Ok(());
    };
    seal_under(payload, names, &mut Sealer::new(key))
}

/// Seals strings with nonces drawn from the system in one call per batch of
/// 32 (one system call per event instead of one per string).
struct Sealer<'k> {
    key: &'k SubjectKey,
    nonces: [u8; NONCE_LEN * 32],
    used: usize,
}

impl<'k> Sealer<'k> {
    fn new(key: &'k SubjectKey) -> Self {
        Self {
            key,
            nonces: [0; NONCE_LEN * 32],
            used: 32,
        }
    }

    fn seal(&mut self, plaintext: &str) -> Result<String, String> {
        if self.used == 32 {
            SystemRandom::new()
                .fill(&mut self.nonces)
                .map_err(|_| "no system randomness".to_owned())?;
            self.used = 0;
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&self.nonces[self.used * NONCE_LEN..(self.used + 1) * NONCE_LEN]);
        self.used += 1;
        self.key.seal_with(nonce, plaintext)
    }
}

fn seal_under(
    value: &mut Value,
    names: &HashSet<String>,
    key: &mut Sealer<'_>,
) -> Result<(), String> {
    match value {
        Value::Object(map) => {
            for (name, value) in map.iter_mut() {
                if names.contains(name) {
                    seal_strings(value, key)?;
                } else {
                    seal_under(value, names, key)?;
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                seal_under(item, names, key)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Every string is sealed, even one that already reads like a sealed one:
/// payloads carry what the caller sent or what was opened on load, never
/// stored ciphertext, so text that starts with the prefix is the caller's
/// own and must not be stored in clear.
fn seal_strings(value: &mut Value, key: &mut Sealer<'_>) -> Result<(), String> {
    match value {
        Value::String(text) => *text = key.seal(text)?,
        Value::Object(map) => {
            for value in map.values_mut() {
                seal_strings(value, key)?;
            }
        }
        Value::Array(items) => {
            for item in items {
                seal_strings(item, key)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// `text` encrypted whole under `key` (a subject's snapshot).
pub fn seal_text(text: &str, key: &SubjectKey) -> Result<String, String> {
    Sealer::new(key).seal(text)
}

/// What [`seal_text`] sealed, or `None` when it does not open under `key`.
pub fn open_text(sealed: &str, key: &SubjectKey) -> Option<String> {
    key.open(sealed)
}

/// Whether stored JSON text holds encrypted strings.
pub fn is_sealed(json: &str) -> bool {
    json.contains(PREFIX)
}

/// Decrypts every encrypted string in `value`; with no key (erased) or a
/// string that does not open, it reads as [`ERASED`].
pub fn open(value: &mut Value, key: Option<&SubjectKey>) {
    match value {
        Value::String(text) if text.starts_with(PREFIX) => {
            *text = key
                .and_then(|key| key.open(text))
                .unwrap_or_else(|| ERASED.to_owned());
        }
        Value::Object(map) => map.values_mut().for_each(|v| open(v, key)),
        Value::Array(items) => items.iter_mut().for_each(|v| open(v, key)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(subject: u128) -> SubjectKey {
        SubjectKey::new(&new_key().unwrap(), "acme", Uuid::from_u128(subject)).unwrap()
    }

    #[test]
    fn personal_strings_are_sealed_and_open_only_with_their_key() {
        let mut payload = serde_json::json!({
            "name": { "given": "Ada", "family": "Lovelace" },
            "emails": [{ "address": "ada@example.com", "primary": true }],
            "phones": [],
            "title": "Countess",
            "preferences": { "language": "en-GB" },
            "occurred_at": "2026-11-29T10:00:00Z"
        });
        let original = payload.clone();
        let ada = key(1);
        seal(&mut payload, "ContactCreated", 2, &ada).unwrap();
        let text = payload.to_string();
        for secret in ["Ada", "Lovelace", "ada@example.com"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(payload["emails"][0]["primary"], true, "flags stay clear");
        assert_eq!(
            payload["occurred_at"], original["occurred_at"],
            "times stay clear"
        );
        assert_eq!(
            payload["preferences"], original["preferences"],
            "not personal"
        );
        assert!(is_sealed(&text));

        let mut opened = payload.clone();
        open(&mut opened, Some(&ada));
        assert_eq!(opened, original);
        // Another subject's key, or none: the personal strings read as empty.
        let mut wrong = payload.clone();
        open(&mut wrong, Some(&key(2)));
        assert_eq!(wrong["name"]["given"], ERASED);
        let mut erased = payload;
        open(&mut erased, None);
        assert_eq!(erased["emails"][0]["address"], ERASED);
        assert_eq!(erased["preferences"], original["preferences"]);
    }

    #[test]
    fn text_that_reads_like_a_sealed_string_is_sealed_too() {
        let mut payload = serde_json::json!({
            "name": { "given": "enc:v1:Ada", "family": "Lovelace" },
            "emails": [{ "address": "enc:v1:ada@example.com", "primary": true }],
            "phones": [],
            "occurred_at": "2026-11-29T10:00:00Z"
        });
        let original = payload.clone();
        let ada = key(1);
        seal(&mut payload, "ContactCreated", 2, &ada).unwrap();
        let text = payload.to_string();
        for secret in ["Ada", "ada@example.com"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        let mut opened = payload.clone();
        open(&mut opened, Some(&ada));
        assert_eq!(opened, original);
        // Erasing the key makes them unreadable like any other.
        let mut erased = payload;
        open(&mut erased, None);
        assert_eq!(erased["name"]["given"], ERASED);
    }

    #[test]
    fn the_schemas_mark_what_is_personal() {
        assert!(has_personal_fields("ContactCreated", 2));
        assert!(has_personal_fields("ContactDetailsUpdated", 1));
        assert!(has_personal_fields("LeadCaptured", 1));
        assert!(!has_personal_fields("ContactConsentChanged", 1));
        assert!(!has_personal_fields("PersonalDataErased", 1));
    }
}
