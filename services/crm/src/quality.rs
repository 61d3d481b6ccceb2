//! The data-quality process manager (DOMAIN.md §5.5, §2.11, worked example
//! C): finds duplicate contacts, leads and accounts and keeps the
//! data-quality read models.
//!
//! Personal fields are stored encrypted (ADR 0006), so matching needs the
//! clear values: this runs in the crm crate, on the projection runtime like
//! the other process managers ([`crate::process`]), and reads a record's
//! clear state through the command handler (`CommandHandler::load`) when one
//! of its events arrives. Its tables never hold a clear personal value: ids,
//! kinds, owners, rule and field names, scores, flags, times, and keyed
//! hashes (HMAC under the server's reservation key, per tenant) of the
//! blocking keys of [`crm_domain::quality::blocking_keys`].
//!
//! | event | effect |
//! |---|---|
//! | contact, lead, account created / updated / linked / restored / merged (survivor) | the record's row; its blocking keys; every record sharing a key and comparable (same kind, or a lead and a contact) is scored, and a score ≥ the tenant's `duplicate_threshold` (80) sends `Suspect` to the pair's `duplicate_pair` stream |
//! | any other event of such a record | the row again (owner, status, completeness, last modified) |
//! | archived, merged into another, converted (lead) | drops out: no blocking keys, out of the lists |
//! | RecordsMerged | the pair survivor–loser becomes `merged` |
//! | PersonalDataErased | every row of the subject removed |
//! | opportunity events | the deal's row (owner, open, last modified) |
//! | OpportunityStalled, AccountChurnRiskFlagged | nothing: the scheduler's flags modify no record |
//! | ActivityLogged, ActivityCompleted | the targets' last touch; the touch's outcome checked |
//! | OrderRecorded | unmatched while it has no account |
//! | TenantSettingsPublished | threshold and stale days |
//! | DuplicateSuspected, DuplicateDismissed | `duplicate_candidates` |
//!
//! Every `Suspect` carries the idempotency key
//! `quality:<triggering event id>:<n>` (`n`: the candidate's place among
//! those sharing a key); the pair's aggregate makes a repeated suspicion a
//! no-op and keeps a dismissed pair dismissed, so a redelivery or a replay
//! appends nothing new. Not rebuildable: its effect is the commands it sent.
use crm_domain::account::{Account, AccountEvent, AccountStatus};
use crm_domain::activity::ActivityEvent;
use crm_domain::commerce::{Order, OrderEvent};
use crm_domain::common::Lifecycle;
use crm_domain::configuration::{ConfigContent, Published, TenantSettings};
use crm_domain::contact::{Contact, ContactEvent};
use crm_domain::duplicates::{
    DuplicateCommand, DuplicateEvent, DuplicateKind, DuplicatePair, pair_id, sorted_pair,
};
use crm_domain::lead::{Lead, LeadEvent, LeadStatus};
use crm_domain::opportunity::{Opportunity, OpportunityEvent};
use crm_domain::quality::{
    ACCOUNT_FIELDS, CONTACT_FIELDS, DEFAULT_THRESHOLD, FieldWeight, LEAD_FIELDS, MatchRecord,
    RecordKind, blocking_keys, comparable, completeness, country_code_ok, credit_code_ok, email_ok,
    follow_up_quality_ok, phone_ok, score,
};
use crm_domain::records::CommonEvent;
use crm_domain::{Aggregate, DomainError, TenantId};
use crm_event_store::RecordedEvent;
use crm_projections::Tx;
use crm_projections::{ApplyError, Projection};
use jiff::Timestamp;
use uuid::Uuid;

use crate::command::{CommandHandler, ServiceError};
use crate::process::{Sender, decode, malformed};

pub const NAME: &str = "data_quality";

/// An email address that is not one.
pub const EMAIL_SYNTAX: &str = "email_syntax";
/// A phone number not in E.164.
pub const PHONE_E164: &str = "phone_e164";
/// A region that is no ISO 3166-1 country (`en-UK`).
pub const ISO_COUNTRY: &str = "iso_country";
/// An 18-character tax id that is no valid China unified social credit code.
pub const TAX_ID_CHECK_DIGIT: &str = "tax_id_check_digit";
/// A touch whose outcome says too little (fewer than 20 characters).
pub const OUTCOME_TOO_SHORT: &str = "outcome_too_short";
/// A required field left empty.
pub const MISSING_REQUIRED: &str = "missing_required";
/// Every rule an issue may name.
pub const ISSUE_RULES: &[&str] = &[
    EMAIL_SYNTAX,
    PHONE_E164,
    ISO_COUNTRY,
    TAX_ID_CHECK_DIGIT,
    OUTCOME_TOO_SHORT,
    MISSING_REQUIRED,
];
/// Record kinds of the read models.
pub const RECORD_KINDS: &[&str] = &["contact", "lead", "account", "deal", "activity"];
/// Default days without a touch before a record is stale (DOMAIN.md §5.5).
pub const STALE_DAYS_LEAD: i32 = 30;
pub const STALE_DAYS_DEAL: i32 = 14;
pub const STALE_DAYS_CUSTOMER: i32 = 90;
/// Days unmodified before any record is stale.
pub const STALE_DAYS_UNMODIFIED: i32 = 365;
/// Most records one record is compared with per event (those sharing a
/// blocking key, by id): a block as large as a popular company stays bounded.
const MAX_CANDIDATES: i64 = 200;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS record_quality (
    tenant_id           text        NOT NULL,
    record_id           uuid        NOT NULL,
    kind                text        NOT NULL,
    owner               text        NOT NULL,
    active              boolean     NOT NULL,
    merged_into         uuid,
    open                boolean     NOT NULL,
    issues              jsonb       NOT NULL,
    issue_rules         text[]      NOT NULL,
    missing_required    text[]      NOT NULL,
    missing_recommended text[]      NOT NULL,
    completeness        smallint,
    created_at          timestamptz NOT NULL,
    last_touch          timestamptz,
    last_modified       timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, record_id)
);
CREATE TABLE IF NOT EXISTS quality_summary (
    tenant_id        text   NOT NULL,
    owner            text   NOT NULL,
    kind             text   NOT NULL,
    records          bigint NOT NULL,
    completeness_sum bigint NOT NULL,
    PRIMARY KEY (tenant_id, owner, kind)
);
CREATE TABLE IF NOT EXISTS duplicate_candidates (
    tenant_id      text        NOT NULL,
    pair_id        uuid        NOT NULL,
    record_a       uuid        NOT NULL,
    record_b       uuid        NOT NULL,
    kind           text        NOT NULL,
    rules          text[]      NOT NULL,
    score          smallint    NOT NULL,
    status         text        NOT NULL,
    suspected_at   timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    dismiss_reason text        NOT NULL DEFAULT '',
    PRIMARY KEY (tenant_id, pair_id)
);
CREATE INDEX IF NOT EXISTS duplicate_candidates_a ON duplicate_candidates (tenant_id, record_a);
CREATE INDEX IF NOT EXISTS duplicate_candidates_b ON duplicate_candidates (tenant_id, record_b);
CREATE INDEX IF NOT EXISTS duplicate_candidates_page
    ON duplicate_candidates (tenant_id, status, score DESC, pair_id);
CREATE TABLE IF NOT EXISTS dq_blocking_keys (
    tenant_id text  NOT NULL,
    key_hash  bytea NOT NULL,
    record_id uuid  NOT NULL,
    kind      text  NOT NULL,
    PRIMARY KEY (tenant_id, key_hash, record_id)
);
CREATE INDEX IF NOT EXISTS dq_blocking_keys_record ON dq_blocking_keys (tenant_id, record_id);
CREATE TABLE IF NOT EXISTS dq_settings (
    tenant_id           text     PRIMARY KEY,
    duplicate_threshold smallint NOT NULL,
    stale_days_lead     integer  NOT NULL,
    stale_days_deal     integer  NOT NULL,
    stale_days_customer integer  NOT NULL
);
CREATE TABLE IF NOT EXISTS dq_activity_targets (
    tenant_id   text NOT NULL,
    activity_id uuid NOT NULL,
    record_id   uuid NOT NULL,
    PRIMARY KEY (tenant_id, activity_id, record_id)
);
CREATE TABLE IF NOT EXISTS dq_unmatched_orders (
    tenant_id   text        NOT NULL,
    order_id    uuid        NOT NULL,
    ordered_on  date        NOT NULL,
    recorded_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, order_id)
);
-- The ERP customer it names: linking an account to it resolves the order.
ALTER TABLE dq_unmatched_orders ADD COLUMN IF NOT EXISTS source text NOT NULL DEFAULT '';
ALTER TABLE dq_unmatched_orders ADD COLUMN IF NOT EXISTS customer_ref text NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS dq_unmatched_orders_by_customer
    ON dq_unmatched_orders (tenant_id, source, customer_ref);
-- Which account each ERP customer is linked to: an order recorded unlinked
-- just as its customer was linked is matched on arrival.
CREATE TABLE IF NOT EXISTS dq_erp_links (
    tenant_id   text NOT NULL,
    source      text NOT NULL,
    external_id text NOT NULL,
    PRIMARY KEY (tenant_id, source, external_id)
)";

pub struct DataQuality {
    handler: CommandHandler,
    sender: Sender,
    /// What was read ahead for the batch being applied, and the blocking
    /// keys it has written so far.
    batch: std::sync::Mutex<Batch>,
}

/// A batch's new records: the first events of records with no later event
/// stored yet. Such a record's clear state is that event's (no read of the
/// store), and its duplicate candidates are found from the blocking keys
/// stored before the batch (read for all of them at once) and those the
/// batch wrote before it (kept here): no read per record, so the batch's
/// writes go out together.
#[derive(Default)]
struct Batch {
    /// By the position of its first event: its view, until applied.
    new_records: std::collections::HashMap<u64, Option<View>>,
    /// By the same position: what that event means, decoded once.
    effects: std::collections::HashMap<u64, (RecordKind, Effect)>,
    /// The records (of `tenant` and kind) stored before the batch under
    /// each key hash of the new records, by record id, at most `per_key`.
    stored: std::collections::HashMap<(String, Vec<u8>), Vec<Candidate>>,
    per_key: usize,
    /// The records in `stored`.
    stored_ids: std::collections::HashSet<(String, Uuid)>,
    /// The key hashes of the new records.
    hashes: std::collections::HashSet<(String, Vec<u8>)>,
    /// The keys the batch wrote, by record: its kind and hashes (none:
    /// deleted). Only of records a new record's lookup may meet: those in
    /// `stored`, and those given one of `hashes`.
    written: std::collections::HashMap<(String, Uuid), Option<Keys>>,
    /// The new records that have a row already (their first event is
    /// applied again, after a reset): their summary share is withdrawn
    /// before it is added again. The others have none to withdraw.
    recorded: std::collections::HashSet<(String, Uuid)>,
    /// The new records (by first event's position) whose summary share was
    /// added for the whole batch at once, summed per owner and kind (adding
    /// commutes; one write per key would be one statement each).
    summed: std::collections::HashSet<u64>,
}

/// A record sharing a key hash, and its kind.
type Candidate = (Uuid, String);

/// A record's kind and key hashes.
type Keys = (String, Vec<Vec<u8>>);

impl Batch {
    /// Remembers the keys the batch gave `id` (`None`: none), where a new
    /// record's lookup may meet them.
    fn wrote(&mut self, tenant: &str, id: Uuid, keys: Option<Keys>) {
        let record = (tenant.to_owned(), id);
        let meets = self.stored_ids.contains(&record)
            || self.written.contains_key(&record)
            || keys.as_ref().is_some_and(|(_, hashes)| {
                hashes
                    .iter()
                    .any(|hash| self.hashes.contains(&(tenant.to_owned(), hash.clone())))
            });
        if meets {
            self.written.insert(record, keys);
        }
    }

    /// The records sharing a key hash with `id`'s `hashes`, as the table
    /// holds them now: at most [`MAX_CANDIDATES`] per key and in all, by
    /// record id, each with its kind (what the candidate lookup reads).
    /// `None` when what was read ahead cannot tell: a key's rows were cut at
    /// `per_key` and too many of them were rewritten since.
    fn candidates(&self, tenant: &str, id: Uuid, hashes: &[Vec<u8>]) -> Option<Vec<Candidate>> {
        let max = usize::try_from(MAX_CANDIDATES).unwrap_or(usize::MAX);
        let mut found: std::collections::BTreeMap<Uuid, String> = Default::default();
        for hash in hashes {
            let stored = self
                .stored
                .get(&(tenant.to_owned(), hash.clone()))
                .map_or(&[][..], Vec::as_slice);
            let mut sharing: Vec<(Uuid, &str)> = stored
                .iter()
                .filter(|(other, _)| {
                    *other != id && !self.written.contains_key(&(tenant.to_owned(), *other))
                })
                .map(|(other, kind)| (*other, kind.as_str()))
                .collect();
            if stored.len() >= self.per_key && sharing.len() < max {
                return None; // rows past the cut may belong in
            }
            sharing.extend(self.written.iter().filter_map(|((t, other), keys)| {
                let (kind, hashes) = keys.as_ref()?;
                (t == tenant && *other != id && hashes.contains(hash))
                    .then_some((*other, kind.as_str()))
            }));
            sharing.sort_unstable();
            sharing.truncate(max);
            for (other, kind) in sharing {
                let entry = found.entry(other).or_insert_with(|| kind.to_owned());
                if kind < entry.as_str() {
                    *entry = kind.to_owned();
                }
            }
        }
        Some(found.into_iter().take(max).collect())
    }
}

impl DataQuality {
    pub fn new(handler: CommandHandler) -> Self {
        Self {
            sender: Sender::new(handler.clone(), "quality", "system:data_quality"),
            handler,
            batch: Default::default(),
        }
    }

    fn batch(&self) -> std::sync::MutexGuard<'_, Batch> {
        self.batch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `event` is the first of a record, announced for this batch,
    /// and the store holds no later one: its state is what that event makes,
    /// and it has no blocking keys but (when the event is replayed) those
    /// that event gave it.
    fn is_new_record(&self, event: &RecordedEvent) -> bool {
        event.stream_version == 1
            && self
                .batch()
                .new_records
                .contains_key(&event.global_position)
    }

    /// Finds, with one query per tenant, which records created in the batch
    /// have no later event stored; makes their views and reads, with one
    /// query per tenant, the records stored under their key hashes.
    async fn read_batch(&self, tx: &Tx<'_>, events: &[&RecordedEvent]) -> Result<(), ApplyError> {
        *self.batch() = Batch::default();
        let mut firsts: std::collections::BTreeMap<&str, Vec<&RecordedEvent>> = Default::default();
        for event in events {
            if event.stream_version == 1
                && [
                    Contact::STREAM_TYPE,
                    Lead::STREAM_TYPE,
                    Account::STREAM_TYPE,
                ]
                .contains(&event.stream_type.as_str())
            {
                firsts
                    .entry(event.tenant_id.as_str())
                    .or_default()
                    .push(event);
            }
        }
        let per_key = MAX_CANDIDATES.saturating_add(i64::try_from(events.len()).unwrap_or(0));
        self.batch().per_key = usize::try_from(per_key).unwrap_or(usize::MAX);
        for (tenant, firsts) in firsts {
            let Ok(tenant_id) = TenantId::parse(tenant) else {
                continue; // applying its events reports the bad tenant
            };
            let ids: Vec<Uuid> = firsts.iter().map(|event| event.stream_id).collect();
            let versions = self
                .handler
                .stream_versions(&tenant_id, &ids)
                .await
                .map_err(|error| ApplyError::Transient(error.to_string()))?;
            let (mut hashes, mut new_ids, mut shares) = (Vec::new(), Vec::new(), Vec::new());
            for (event, version) in firsts.into_iter().zip(versions) {
                if version != 1 {
                    continue;
                }
                // One that does not decode is left to its own event (poison).
                let Ok(Some((kind, effect))) = record_event(event) else {
                    continue;
                };
                new_ids.push(event.stream_id);
                self.batch().new_records.insert(event.global_position, None);
                let view = match self.view(event, &tenant_id, kind, event.stream_id).await {
                    Ok(view) => view,
                    Err(error @ ApplyError::Transient(_)) => return Err(error),
                    Err(_) => {
                        // Not read ahead: applying it meets the error at
                        // its own position (poison).
                        self.batch().new_records.remove(&event.global_position);
                        continue;
                    }
                };
                if let Some(record) = view
                    .as_ref()
                    .filter(|view| view.active)
                    .and_then(|view| view.matching.as_ref())
                {
                    hashes.extend(
                        blocking_keys(record)
                            .iter()
                            .map(|key| self.handler.blocking_hash(&tenant_id, key)),
                    );
                }
                // Its share of the summary, when applying the event will add
                // it (as `on_record` goes).
                let counts = !(effect.ignored || effect.erased || effect.time_only);
                self.batch()
                    .effects
                    .insert(event.global_position, (kind, effect));
                let share = view
                    .as_ref()
                    .filter(|_| counts)
                    .filter(|view| view.active && !view.erased)
                    .and_then(|view| {
                        let completeness = view.completeness()?;
                        Some((view.owner.clone(), view.kind, completeness))
                    });
                if let Some(share) = share {
                    shares.push((event.stream_id, event.global_position, share));
                }
                self.batch().new_records.insert(event.global_position, view);
            }
            if !new_ids.is_empty() {
                let rows = tx
                    .query(
                        // A probe of the primary key per id (`= ANY` let a
                        // generic plan read the tenant's rows: 25 ms).
                        "SELECT r.record_id FROM unnest($2::uuid[]) AS i(id) \
                         CROSS JOIN LATERAL (SELECT record_id FROM record_quality \
                           WHERE tenant_id = $1 AND record_id = i.id LIMIT 1) r",
                        &[&tenant, &new_ids],
                    )
                    .await?;
                let mut batch = self.batch();
                for row in rows {
                    batch.recorded.insert((tenant.to_owned(), row.get(0)));
                }
            }
            // The shares of the records with no row yet, summed.
            let mut sums: std::collections::BTreeMap<(String, &str), (i64, i64, u64)> =
                Default::default();
            for (id, position, (owner, kind, completeness)) in shares {
                let mut batch = self.batch();
                if batch.recorded.contains(&(tenant.to_owned(), id)) {
                    continue; // withdrawn and added again by its event
                }
                batch.summed.insert(position);
                let sum = sums.entry((owner, kind)).or_insert((0, 0, position));
                sum.0 += 1;
                sum.1 += i64::from(completeness);
            }
            for ((owner, kind), (records, completeness, first)) in sums {
                // A refusal is blamed on the first record it sums.
                tx.applying(first);
                Self::summary(tx, tenant, &owner, kind, records, completeness).await?;
            }
            if hashes.is_empty() {
                continue;
            }
            hashes.sort_unstable();
            hashes.dedup();
            self.batch()
                .hashes
                .extend(hashes.iter().map(|hash| (tenant.to_owned(), hash.clone())));
            let rows = tx
                .query(
                    "SELECT h.key_hash, k.record_id, k.kind FROM unnest($2::bytea[]) AS h(key_hash) \
                     CROSS JOIN LATERAL (SELECT record_id, kind FROM dq_blocking_keys \
                       WHERE tenant_id = $1 AND key_hash = h.key_hash \
                       ORDER BY record_id LIMIT $3) k",
                    &[&tenant, &hashes, &per_key],
                )
                .await?;
            let mut batch = self.batch();
            for row in rows {
                let id: Uuid = row.get(1);
                batch.stored_ids.insert((tenant.to_owned(), id));
                batch
                    .stored
                    .entry((tenant.to_owned(), row.get(0)))
                    .or_default()
                    .push((id, row.get(2)));
            }
        }
        Ok(())
    }
}

/// What a record's row says, from its clear state.
struct View {
    kind: &'static str,
    /// For matching (contacts, leads, accounts).
    matching: Option<MatchRecord>,
    owner: String,
    /// Not archived, merged, erased or converted.
    active: bool,
    merged_into: Option<Uuid>,
    /// Subject to the no-touch rule: an open lead or deal, a customer.
    open: bool,
    erased: bool,
    issues: Vec<(String, &'static str)>,
    /// Completeness fields and whether each is filled (contacts, leads,
    /// accounts).
    fields: Vec<(FieldWeight, bool)>,
}

impl View {
    fn missing(&self, required: bool) -> Vec<&'static str> {
        self.fields
            .iter()
            .filter(|(field, filled)| field.required == required && !filled)
            .map(|(field, _)| field.name)
            .collect()
    }

    fn completeness(&self) -> Option<i16> {
        (!self.fields.is_empty()).then(|| i16::from(completeness(&self.fields)))
    }
}

/// What an event of a contact, lead or account means beyond a new state.
#[derive(Default)]
struct Effect {
    /// Match the record again (its identifying fields may have changed).
    rematch: bool,
    /// Merged into this record (it is the survivor).
    losers: Vec<Uuid>,
    /// This record was merged into another.
    survivor: Option<Uuid>,
    erased: bool,
    /// Only its last modification moves (consent, NPS, tags, shares): the
    /// record is not loaded.
    time_only: bool,
    /// Nothing changes: a flag the scheduler raised is no modification.
    ignored: bool,
    /// ERP customers (source, external id) the account is newly linked to:
    /// their unmatched orders are matched now.
    links: Vec<(String, String)>,
}

impl Effect {
    fn rematch() -> Self {
        Self {
            rematch: true,
            ..Self::default()
        }
    }

    fn time_only() -> Self {
        Self {
            time_only: true,
            ..Self::default()
        }
    }

    fn ignored() -> Self {
        Self {
            ignored: true,
            ..Self::default()
        }
    }
}

fn person_name(given: &str, family: &str) -> String {
    format!("{} {}", given.trim(), family.trim())
        .trim()
        .to_owned()
}

fn fields(list: &'static [FieldWeight], filled: impl Fn(&str) -> bool) -> Vec<(FieldWeight, bool)> {
    list.iter().map(|f| (*f, filled(f.name))).collect()
}

/// Issues of emails and phones, named as commands name them.
fn contact_point_issues(
    emails: &[crm_domain::contact::Email],
    phones: &[crm_domain::contact::Phone],
    issues: &mut Vec<(String, &'static str)>,
) {
    for (i, email) in emails.iter().enumerate() {
        if !email_ok(email.address.trim()) {
            issues.push((format!("emails[{i}].address"), EMAIL_SYNTAX));
        }
    }
    for (i, phone) in phones.iter().enumerate() {
        if !phone_ok(&phone.number) {
            issues.push((format!("phones[{i}].number"), PHONE_E164));
        }
    }
}

/// Whether a BCP 47 tag's region, if it has one, is an ISO 3166-1 country
/// (`en-GB` yes, `en-UK` no; numeric UN M.49 regions are not judged).
fn language_region_ok(tag: &str) -> bool {
    for subtag in tag.split('-').skip(1) {
        if subtag.len() == 1 {
            break; // an extension or private use follows
        }
        if subtag.len() == 2 && subtag.bytes().all(|b| b.is_ascii_alphabetic()) {
            return country_code_ok(&subtag.to_ascii_uppercase());
        }
    }
    true
}

fn missing_issues(issues: &mut Vec<(String, &'static str)>, fields: &[(FieldWeight, bool)]) {
    for (field, filled) in fields {
        if field.required && !filled {
            issues.push((field.name.to_owned(), MISSING_REQUIRED));
        }
    }
}

fn archived(lifecycle: Lifecycle, meta: &crm_domain::records::RecordMeta) -> bool {
    lifecycle == Lifecycle::Archived || meta.lifecycle == Lifecycle::Archived
}

/// The business time of an event (every payload carries `occurred_at`).
fn occurred_at(event: &RecordedEvent) -> Result<Timestamp, ApplyError> {
    #[derive(serde::Deserialize)]
    struct At {
        occurred_at: Timestamp,
    }
    event
        .payload
        .parse::<At>()
        .map(|at| at.occurred_at)
        .map_err(|e| malformed(event, e))
}

fn tenant(event: &RecordedEvent) -> Result<TenantId, ApplyError> {
    TenantId::parse(&event.tenant_id).map_err(|e| malformed(event, e))
}

fn duplicate_kind(a: RecordKind, b: RecordKind) -> DuplicateKind {
    match (a, b) {
        (RecordKind::Contact, RecordKind::Contact) => DuplicateKind::Contact,
        (RecordKind::Lead, RecordKind::Lead) => DuplicateKind::Lead,
        (RecordKind::Account, _) => DuplicateKind::Account,
        _ => DuplicateKind::LeadContact,
    }
}

impl DataQuality {
    /// A record's clear state, or `None` when there is none.
    async fn load<A: Aggregate>(
        &self,
        event: &RecordedEvent,
        tenant: &TenantId,
        id: Uuid,
    ) -> Result<Option<A>, ApplyError> {
        let loaded = if id == event.stream_id && self.is_new_record(event) {
            let from = (A::default(), 0, 0);
            let first = std::slice::from_ref(event);
            self.handler.fold::<A>(tenant, id, from, first).await
        } else {
            self.handler.load::<A>(tenant, id).await
        };
        match loaded {
            Ok((state, _, _)) => Ok(state.exists().then_some(state)),
            Err(ServiceError::Domain(DomainError::NotFound)) => Ok(None),
            Err(error @ (ServiceError::Unavailable(_) | ServiceError::Contention)) => {
                Err(ApplyError::Transient(error.to_string()))
            }
            Err(error) => Err(malformed(
                event,
                format!("{} {id} does not load: {error}", A::STREAM_TYPE),
            )),
        }
    }

    /// What the read models say of a record, from its current clear state.
    async fn view(
        &self,
        event: &RecordedEvent,
        tenant: &TenantId,
        kind: RecordKind,
        id: Uuid,
    ) -> Result<Option<View>, ApplyError> {
        let mut issues = Vec::new();
        Ok(Some(match kind {
            RecordKind::Contact => {
                let Some(contact) = self.load::<Contact>(event, tenant, id).await? else {
                    return Ok(None);
                };
                let link = contact
                    .accounts
                    .iter()
                    .find(|link| link.primary)
                    .or_else(|| contact.accounts.first());
                let company = match link {
                    Some(link) => self
                        .load::<Account>(event, tenant, link.account_id)
                        .await?
                        .map(|account| account.name)
                        .unwrap_or_default(),
                    None => String::new(),
                };
                contact_point_issues(&contact.emails, &contact.phones, &mut issues);
                if !language_region_ok(&contact.preferences.language) {
                    issues.push(("preferences.language".to_owned(), ISO_COUNTRY));
                }
                let fields = fields(CONTACT_FIELDS, |name| match name {
                    "name" => !contact.name.given.trim().is_empty(),
                    "email" => contact.emails.iter().any(|e| !e.address.is_empty()),
                    "phone" => contact.phones.iter().any(|p| !p.number.is_empty()),
                    "title" => !contact.title.trim().is_empty(),
                    "account" => !contact.accounts.is_empty(),
                    "owner" => contact.meta.owner.is_some(),
                    "language" => !contact.preferences.language.is_empty(),
                    _ => false,
                });
                missing_issues(&mut issues, &fields);
                View {
                    kind: RecordKind::Contact.name(),
                    matching: Some(MatchRecord {
                        id,
                        kind,
                        name: person_name(&contact.name.given, &contact.name.family),
                        company,
                        emails: contact.emails.iter().map(|e| e.address.clone()).collect(),
                        phones: contact.phones.iter().map(|p| p.number.clone()).collect(),
                        tax_id: None,
                        domains: Vec::new(),
                    }),
                    owner: contact.meta.owner.clone().unwrap_or_default(),
                    active: !contact.erased
                        && contact.merged_into.is_none()
                        && !archived(contact.lifecycle, &contact.meta),
                    merged_into: contact.merged_into,
                    open: false,
                    erased: contact.erased,
                    issues,
                    fields,
                }
            }
            RecordKind::Lead => {
                let Some(lead) = self.load::<Lead>(event, tenant, id).await? else {
                    return Ok(None);
                };
                contact_point_issues(&lead.emails, &lead.phones, &mut issues);
                let fields = fields(LEAD_FIELDS, |name| match name {
                    "name" => !person_name(&lead.name.given, &lead.name.family).is_empty(),
                    "company" => !lead.company.trim().is_empty(),
                    "email" => lead.emails.iter().any(|e| !e.address.is_empty()),
                    "phone" => lead.phones.iter().any(|p| !p.number.is_empty()),
                    "source" => !lead.source.channel.is_empty(),
                    "owner" => lead.meta.owner.is_some(),
                    _ => false,
                });
                missing_issues(&mut issues, &fields);
                let active = !lead.erased
                    && lead.merged_into.is_none()
                    && lead.status != LeadStatus::Converted
                    && !archived(Lifecycle::Active, &lead.meta);
                View {
                    kind: RecordKind::Lead.name(),
                    matching: Some(MatchRecord {
                        id,
                        kind,
                        name: person_name(&lead.name.given, &lead.name.family),
                        company: lead.company.clone(),
                        emails: lead.emails.iter().map(|e| e.address.clone()).collect(),
                        phones: lead.phones.iter().map(|p| p.number.clone()).collect(),
                        tax_id: None,
                        domains: Vec::new(),
                    }),
                    owner: lead.meta.owner.clone().unwrap_or_default(),
                    active,
                    merged_into: lead.merged_into,
                    open: active && lead.status != LeadStatus::Disqualified,
                    erased: lead.erased,
                    issues,
                    fields,
                }
            }
            RecordKind::Account => {
                let Some(account) = self.load::<Account>(event, tenant, id).await? else {
                    return Ok(None);
                };
                // Eighteen characters: read as a China unified social credit
                // code (other countries' tax ids are not judged).
                if account.tax_id.chars().count() == 18 && !credit_code_ok(&account.tax_id) {
                    issues.push(("tax_id".to_owned(), TAX_ID_CHECK_DIGIT));
                }
                let fields = fields(ACCOUNT_FIELDS, |name| match name {
                    "name" => !account.name.trim().is_empty(),
                    "owner" => account.meta.owner.is_some(),
                    "domain" => !account.domains.is_empty(),
                    "industry" => !account.industry.trim().is_empty(),
                    "segment" => !account.segment.trim().is_empty(),
                    "tax_id" => !account.tax_id.is_empty(),
                    _ => false,
                });
                missing_issues(&mut issues, &fields);
                let active = !account.erased
                    && account.merged_into.is_none()
                    && !archived(account.lifecycle, &account.meta);
                View {
                    kind: RecordKind::Account.name(),
                    matching: Some(MatchRecord {
                        id,
                        kind,
                        name: account.name.clone(),
                        company: String::new(),
                        emails: Vec::new(),
                        phones: Vec::new(),
                        tax_id: (!account.tax_id.is_empty()).then(|| account.tax_id.clone()),
                        domains: account.domains.clone(),
                    }),
                    owner: account.meta.owner.clone().unwrap_or_default(),
                    active,
                    merged_into: account.merged_into,
                    open: active && account.status == AccountStatus::Customer,
                    erased: account.erased,
                    issues,
                    fields,
                }
            }
        }))
    }

    async fn threshold(tx: &Tx<'_>, tenant: &str) -> Result<u8, ApplyError> {
        let row = tx
            .query_opt(
                "SELECT duplicate_threshold FROM dq_settings WHERE tenant_id = $1",
                &[&tenant],
            )
            .await?;
        Ok(row.map_or(DEFAULT_THRESHOLD, |row| {
            u8::try_from(row.get::<_, i16>(0)).unwrap_or(DEFAULT_THRESHOLD)
        }))
    }

    /// Adds `records` records' shares (their completeness summed) to their
    /// owner's mean ([`Self::withdraw`] takes one away).
    async fn summary(
        tx: &Tx<'_>,
        tenant: &str,
        owner: &str,
        kind: &str,
        records: i64,
        completeness: i64,
    ) -> Result<(), ApplyError> {
        tx.execute(
            "INSERT INTO quality_summary (tenant_id, owner, kind, records, completeness_sum) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, owner, kind) DO UPDATE \
             SET records = quality_summary.records + EXCLUDED.records, \
                 completeness_sum = quality_summary.completeness_sum + EXCLUDED.completeness_sum",
            &[&tenant, &owner, &kind, &records, &completeness],
        )
        .await?;
        Ok(())
    }

    /// Removes the record's current share of the summary (before its row
    /// changes or goes): a queued write that reads the row itself, so
    /// nothing is read here and a record's writes go out with its candidate
    /// lookup. An owner's row left at no records counts for nothing (the
    /// queries skip it) and is used again by the owner's next record.
    async fn withdraw(tx: &Tx<'_>, tenant: &str, id: Uuid) -> Result<(), ApplyError> {
        tx.execute(
            "INSERT INTO quality_summary (tenant_id, owner, kind, records, completeness_sum) \
             SELECT tenant_id, owner, kind, -1, -completeness FROM record_quality \
             WHERE tenant_id = $1 AND record_id = $2 AND active AND completeness IS NOT NULL \
             ON CONFLICT (tenant_id, owner, kind) DO UPDATE \
             SET records = quality_summary.records + EXCLUDED.records, \
                 completeness_sum = quality_summary.completeness_sum + EXCLUDED.completeness_sum",
            &[&tenant, &id],
        )
        .await?;
        Ok(())
    }

    async fn save_record(
        tx: &Tx<'_>,
        tenant: &str,
        id: Uuid,
        view: &View,
        at: Timestamp,
        withdraw: bool,
        add_share: bool,
    ) -> Result<(), ApplyError> {
        if withdraw {
            Self::withdraw(tx, tenant, id).await?;
        }
        let issues = serde_json::Value::Array(
            view.issues
                .iter()
                .map(|(field, rule)| serde_json::json!({ "field": field, "rule": rule }))
                .collect(),
        );
        let mut rules: Vec<&str> = view.issues.iter().map(|(_, rule)| *rule).collect();
        rules.sort_unstable();
        rules.dedup();
        let completeness = view.completeness();
        let at: std::time::SystemTime = at.into();
        tx.execute(
            "INSERT INTO record_quality (tenant_id, record_id, kind, owner, active, open, issues, \
               issue_rules, missing_required, missing_recommended, completeness, created_at, \
               last_modified, merged_into) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::text[], $9::text::text[], \
               $10::text::text[], $11, $12, $13, $14) \
             ON CONFLICT (tenant_id, record_id) DO UPDATE SET kind = EXCLUDED.kind, \
               owner = EXCLUDED.owner, active = EXCLUDED.active, open = EXCLUDED.open, \
               merged_into = EXCLUDED.merged_into, \
               issues = EXCLUDED.issues, issue_rules = EXCLUDED.issue_rules, \
               missing_required = EXCLUDED.missing_required, \
               missing_recommended = EXCLUDED.missing_recommended, \
               completeness = EXCLUDED.completeness, \
               created_at = LEAST(record_quality.created_at, EXCLUDED.created_at), \
               last_modified = GREATEST(record_quality.last_modified, EXCLUDED.last_modified)",
            &[
                &tenant,
                &id,
                &view.kind,
                &view.owner,
                &view.active,
                &view.open,
                &issues,
                // Arrays as text: scalar parameters let a batch's rows go
                // out as one statement.
                &text_array(&rules),
                &text_array(&view.missing(true)),
                &text_array(&view.missing(false)),
                &completeness,
                &at,
                &at,
                &view.merged_into,
            ],
        )
        .await?;
        if add_share
            && view.active
            && let Some(completeness) = completeness
        {
            let completeness = i64::from(completeness);
            Self::summary(tx, tenant, &view.owner, view.kind, 1, completeness).await?;
        }
        Ok(())
    }

    /// Every row of a record whose personal data is erased.
    async fn forget(&self, tx: &Tx<'_>, tenant: &str, id: Uuid) -> Result<(), ApplyError> {
        self.batch().wrote(tenant, id, None);
        Self::withdraw(tx, tenant, id).await?;
        for statement in [
            "DELETE FROM record_quality WHERE tenant_id = $1 AND record_id = $2",
            "DELETE FROM dq_blocking_keys WHERE tenant_id = $1 AND record_id = $2",
            "DELETE FROM duplicate_candidates WHERE tenant_id = $1 \
               AND (record_a = $2 OR record_b = $2)",
            "DELETE FROM dq_activity_targets WHERE tenant_id = $1 AND record_id = $2",
        ] {
            tx.execute(statement, &[&tenant, &id]).await?;
        }
        Ok(())
    }

    async fn mark_merged(
        tx: &Tx<'_>,
        tenant: &str,
        survivor: Uuid,
        loser: Uuid,
        at: Timestamp,
    ) -> Result<(), ApplyError> {
        let at: std::time::SystemTime = at.into();
        tx.execute(
            "UPDATE duplicate_candidates SET status = 'merged', \
               updated_at = GREATEST(updated_at, $3) \
             WHERE tenant_id = $1 AND pair_id = $2",
            &[&tenant, &pair_id(survivor, loser), &at],
        )
        .await?;
        Ok(())
    }

    /// The record's blocking keys, as keyed hashes, replacing its old ones.
    async fn save_keys(
        &self,
        tx: &Tx<'_>,
        tenant: &TenantId,
        id: Uuid,
        view: &View,
        keyless: bool,
    ) -> Result<Vec<Vec<u8>>, ApplyError> {
        if !keyless {
            tx.execute(
                "DELETE FROM dq_blocking_keys WHERE tenant_id = $1 AND record_id = $2",
                &[&tenant.as_str(), &id],
            )
            .await?;
        }
        let Some(record) = view.matching.as_ref().filter(|_| view.active) else {
            self.batch().wrote(tenant.as_str(), id, None);
            return Ok(Vec::new());
        };
        let hashes: Vec<Vec<u8>> = blocking_keys(record)
            .iter()
            .map(|key| self.handler.blocking_hash(tenant, key))
            .collect();
        let keys = Some((view.kind.to_owned(), hashes.clone()));
        self.batch().wrote(tenant.as_str(), id, keys);
        // One write per key: the batch's are sent as one statement.
        for hash in &hashes {
            tx.execute(
                "INSERT INTO dq_blocking_keys (tenant_id, key_hash, record_id, kind) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&tenant.as_str(), hash, &id, &view.kind],
            )
            .await?;
        }
        Ok(hashes)
    }

    /// Scores the record against every comparable active record sharing a
    /// blocking key, and suspects the pairs at or above the threshold. The
    /// candidates of a `new` record come from what was read ahead.
    #[allow(clippy::too_many_arguments)]
    async fn find_duplicates(
        &self,
        tx: &Tx<'_>,
        event: &RecordedEvent,
        tenant: &TenantId,
        record: &MatchRecord,
        hashes: &[Vec<u8>],
        at: Timestamp,
        new: bool,
    ) -> Result<(), ApplyError> {
        if hashes.is_empty() {
            return Ok(());
        }
        // Read ahead with the batch's other new records, where that tells.
        let known = if new {
            self.batch().candidates(tenant.as_str(), record.id, hashes)
        } else {
            None
        };
        let candidates: Vec<Candidate> = if let Some(known) = known {
            known
        } else {
            tx.query(
                // One probe of the primary key per blocking key: a plan
                // cached while the table was small must not scan the
                // tenant's rows instead (it did, through the record index:
                // a lookup per record then grew with the table).
                "SELECT k.record_id, min(k.kind) FROM unnest($2::bytea[]) AS h(key_hash) \
                 CROSS JOIN LATERAL (SELECT record_id, kind FROM dq_blocking_keys \
                   WHERE tenant_id = $1 AND key_hash = h.key_hash AND record_id <> $3 \
                   ORDER BY record_id LIMIT $4) k \
                 GROUP BY k.record_id ORDER BY k.record_id LIMIT $4",
                &[&tenant.as_str(), &hashes, &record.id, &MAX_CANDIDATES],
            )
            .await?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
        };
        if candidates.is_empty() {
            return Ok(()); // the usual case: no read of the threshold
        }
        let threshold = Self::threshold(tx, tenant.as_str()).await?;
        for (n, (other_id, other_kind)) in candidates.into_iter().enumerate() {
            let Some(other_kind) = RecordKind::parse(&other_kind) else {
                continue;
            };
            if !comparable(record.kind, other_kind) {
                continue;
            }
            let Some(other) = self.view(event, tenant, other_kind, other_id).await? else {
                continue;
            };
            let Some(other_record) = other.matching.as_ref().filter(|_| other.active) else {
                continue;
            };
            let Some(found) = score(record, other_record) else {
                continue;
            };
            if found.score < threshold {
                continue;
            }
            let command = DuplicateCommand::Suspect {
                record_ids: sorted_pair(record.id, other_id),
                kind: duplicate_kind(record.kind, other_kind),
                rules: found.rules.iter().map(|r| (*r).to_owned()).collect(),
                score: found.score,
            };
            self.sender
                .send::<DuplicatePair>(tx, event, n, pair_id(record.id, other_id), at, command)
                .await?;
        }
        Ok(())
    }

    async fn on_record(
        &self,
        tx: &Tx<'_>,
        event: &RecordedEvent,
        kind: RecordKind,
        effect: Effect,
    ) -> Result<(), ApplyError> {
        let tenant = tenant(event)?;
        let id = event.stream_id;
        let at = occurred_at(event)?;
        if effect.ignored {
            return Ok(());
        }
        for (source, customer_ref) in &effect.links {
            tx.execute(
                "INSERT INTO dq_erp_links (tenant_id, source, external_id) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
                &[&tenant.as_str(), source, customer_ref],
            )
            .await?;
            tx.execute(
                "DELETE FROM dq_unmatched_orders \
                 WHERE tenant_id = $1 AND source = $2 AND customer_ref = $3",
                &[&tenant.as_str(), source, customer_ref],
            )
            .await?;
        }
        if effect.erased {
            return self.forget(tx, tenant.as_str(), id).await;
        }
        if effect.time_only {
            return Self::modified(tx, tenant.as_str(), id, at).await;
        }
        for loser in &effect.losers {
            Self::mark_merged(tx, tenant.as_str(), id, *loser, at).await?;
        }
        if let Some(survivor) = effect.survivor {
            Self::mark_merged(tx, tenant.as_str(), survivor, id, at).await?;
        }
        let prepared = self
            .batch()
            .new_records
            .get_mut(&event.global_position)
            .filter(|_| id == event.stream_id)
            .and_then(Option::take);
        let view = match prepared {
            Some(view) => view,
            None => match self.view(event, &tenant, kind, id).await? {
                Some(view) => view,
                None => return Ok(()),
            },
        };
        if view.erased {
            return self.forget(tx, tenant.as_str(), id).await;
        }
        let new = self.is_new_record(event);
        // A new record has no share to withdraw nor keys to delete unless
        // its row is there (its first event applied again).
        let recorded = self
            .batch()
            .recorded
            .contains(&(tenant.as_str().to_owned(), id));
        let withdraw = !new || recorded;
        // Unless added for the batch at once (read ahead).
        let add_share = !self.batch().summed.contains(&event.global_position);
        Self::save_record(tx, tenant.as_str(), id, &view, at, withdraw, add_share).await?;
        let hashes = self.save_keys(tx, &tenant, id, &view, !withdraw).await?;
        if effect.rematch
            && let Some(record) = view.matching.as_ref().filter(|_| view.active)
        {
            self.find_duplicates(tx, event, &tenant, record, &hashes, at, new)
                .await?;
        }
        Ok(())
    }

    /// A record's last modification moves on; nothing else changes.
    async fn modified(
        tx: &Tx<'_>,
        tenant: &str,
        id: Uuid,
        at: Timestamp,
    ) -> Result<(), ApplyError> {
        let at: std::time::SystemTime = at.into();
        tx.execute(
            "UPDATE record_quality SET last_modified = GREATEST(last_modified, $3) \
             WHERE tenant_id = $1 AND record_id = $2",
            &[&tenant, &id, &at],
        )
        .await?;
        Ok(())
    }

    /// A deal's row, from its events alone (a deal holds no personal data
    /// and is not matched): owner, archived, open.
    async fn on_deal(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
        let tenant = event.tenant_id.as_str();
        let id = event.stream_id;
        let at = occurred_at(event)?;
        let Some(decoded) = decode::<OpportunityEvent>(event)? else {
            return Ok(());
        };
        let follows_pipeline = match &decoded {
            OpportunityEvent::StageChanged(moved) => moved.pipeline_version.is_some(),
            OpportunityEvent::DetailsUpdated(updated) => {
                updated.changes
                    == crm_domain::opportunity::DealChanges {
                        pipeline_version: updated.changes.pipeline_version.clone(),
                        ..Default::default()
                    }
            }
            _ => false,
        };
        if matches!(decoded, OpportunityEvent::Stalled(_)) || follows_pipeline {
            // The scheduler's flag, or a deal following a new version of
            // its pipeline: no one modified the deal.
            return Ok(());
        }
        let row = tx
            .query_opt(
                "SELECT owner, active, open FROM record_quality \
                 WHERE tenant_id = $1 AND record_id = $2",
                &[&tenant, &id],
            )
            .await?;
        let (mut owner, mut active, mut open): (String, bool, bool) = match (&decoded, row) {
            (OpportunityEvent::Opened(opened), _) => (opened.owner.clone(), true, true),
            (_, Some(row)) => (row.get(0), row.get(1), row.get(2)),
            (_, None) => return Ok(()),
        };
        match &decoded {
            OpportunityEvent::Common(CommonEvent::OwnerChanged(changed)) => {
                owner = changed.new.clone();
            }
            OpportunityEvent::Common(CommonEvent::Archived(_)) => active = false,
            OpportunityEvent::Common(CommonEvent::Restored(_)) => active = true,
            OpportunityEvent::Won(_) | OpportunityEvent::Lost(_) => open = false,
            OpportunityEvent::Reopened(_) => open = true,
            OpportunityEvent::Opened(_) => {}
            _ => return Self::modified(tx, tenant, id, at).await,
        }
        let view = View {
            kind: "deal",
            matching: None,
            owner,
            active,
            merged_into: None,
            open,
            erased: false,
            issues: Vec::new(),
            fields: Vec::new(),
        };
        Self::save_record(tx, tenant, id, &view, at, true, true).await
    }

    /// A touch: its targets' last touch moves on, and its outcome is judged.
    async fn touched(
        tx: &Tx<'_>,
        event: &RecordedEvent,
        targets: &[Uuid],
        outcome: &str,
        at: Timestamp,
    ) -> Result<(), ApplyError> {
        let tenant = event.tenant_id.as_str();
        let when: std::time::SystemTime = at.into();
        tx.execute(
            "UPDATE record_quality SET last_touch = GREATEST(last_touch, $3) \
             WHERE tenant_id = $1 AND record_id = ANY($2)",
            &[&tenant, &targets, &when],
        )
        .await?;
        let actor = event
            .metadata
            .parse::<serde_json::Value>()
            .ok()
            .and_then(|m| m.get("actor").and_then(|a| a.as_str()).map(str::to_owned))
            .unwrap_or_default();
        let issues = if follow_up_quality_ok(outcome) {
            Vec::new()
        } else {
            vec![("outcome".to_owned(), OUTCOME_TOO_SHORT)]
        };
        let view = View {
            kind: "activity",
            matching: None,
            owner: actor,
            active: true,
            merged_into: None,
            open: false,
            erased: false,
            issues,
            fields: Vec::new(),
        };
        Self::save_record(tx, tenant, event.stream_id, &view, at, true, true).await
    }

    async fn on_activity(&self, tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
        let tenant = event.tenant_id.as_str();
        match decode::<ActivityEvent>(event)? {
            Some(ActivityEvent::Logged(logged)) => {
                let targets: Vec<Uuid> = logged.targets.iter().map(|t| t.id).collect();
                Self::touched(tx, event, &targets, &logged.outcome, logged.occurred_at).await?;
            }
            Some(ActivityEvent::Scheduled(scheduled)) => {
                let targets: Vec<Uuid> = scheduled.targets.iter().map(|t| t.id).collect();
                tx.execute(
                    "INSERT INTO dq_activity_targets (tenant_id, activity_id, record_id) \
                     SELECT $1, $2, target FROM unnest($3::uuid[]) AS target \
                     WHERE EXISTS (SELECT 1 FROM record_quality r \
                                   WHERE r.tenant_id = $1 AND r.record_id = target) \
                     ON CONFLICT DO NOTHING",
                    &[&tenant, &event.stream_id, &targets],
                )
                .await?;
            }
            Some(ActivityEvent::Completed(completed)) => {
                let targets: Vec<Uuid> = tx
                    .query(
                        "SELECT record_id FROM dq_activity_targets \
                         WHERE tenant_id = $1 AND activity_id = $2",
                        &[&tenant, &event.stream_id],
                    )
                    .await?
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                Self::touched(
                    tx,
                    event,
                    &targets,
                    &completed.outcome,
                    completed.occurred_at,
                )
                .await?;
            }
            _ => {}
        }
        Ok(())
    }

    async fn on_order(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
        if let Some(OrderEvent::Recorded(order)) = decode::<OrderEvent>(event)? {
            let linked = order.account_id.is_some()
                || (!order.customer_ref.is_empty()
                    && tx
                        .query_opt(
                            "SELECT 1 FROM dq_erp_links \
                             WHERE tenant_id = $1 AND source = $2 AND external_id = $3",
                            &[
                                &event.tenant_id,
                                &order.external.source,
                                &order.customer_ref,
                            ],
                        )
                        .await?
                        .is_some());
            if linked {
                tx.execute(
                    "DELETE FROM dq_unmatched_orders WHERE tenant_id = $1 AND order_id = $2",
                    &[&event.tenant_id, &event.stream_id],
                )
                .await?;
            } else {
                let recorded: std::time::SystemTime = order.occurred_at.into();
                tx.execute(
                    "INSERT INTO dq_unmatched_orders \
                       (tenant_id, order_id, ordered_on, recorded_at, source, customer_ref) \
                     VALUES ($1, $2, $3::text::date, $4, $5, $6) \
                     ON CONFLICT (tenant_id, order_id) DO UPDATE \
                     SET ordered_on = EXCLUDED.ordered_on, recorded_at = EXCLUDED.recorded_at, \
                       source = EXCLUDED.source, customer_ref = EXCLUDED.customer_ref",
                    &[
                        &event.tenant_id,
                        &event.stream_id,
                        &order.ordered_on.to_string(),
                        &recorded,
                        &order.external.source,
                        &order.customer_ref,
                    ],
                )
                .await?;
            }
        }
        Ok(())
    }

    async fn on_settings(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
        let Some(published) = decode::<Published<TenantSettings>>(event)? else {
            return Ok(());
        };
        let settings = &published.content;
        let days = |d: u32| i32::try_from(d).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO dq_settings (tenant_id, duplicate_threshold, stale_days_lead, \
               stale_days_deal, stale_days_customer) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (tenant_id) DO UPDATE SET \
               duplicate_threshold = EXCLUDED.duplicate_threshold, \
               stale_days_lead = EXCLUDED.stale_days_lead, \
               stale_days_deal = EXCLUDED.stale_days_deal, \
               stale_days_customer = EXCLUDED.stale_days_customer",
            &[
                &event.tenant_id,
                &i16::from(settings.duplicate_threshold),
                &days(settings.stale_days_lead),
                &days(settings.stale_days_deal),
                &days(settings.stale_days_customer),
            ],
        )
        .await?;
        Ok(())
    }

    async fn on_pair(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
        let tenant = event.tenant_id.as_str();
        match decode::<DuplicateEvent>(event)? {
            Some(DuplicateEvent::Suspected(suspected)) => {
                let at: std::time::SystemTime = suspected.occurred_at.into();
                let [a, b] = suspected.record_ids;
                // A record erased since (its rows are gone) stays gone when
                // the log is applied again; a suspicion that raced the pair's
                // merge (decided on states read before it) is the merged pair.
                tx.execute(
                    "INSERT INTO duplicate_candidates (tenant_id, pair_id, record_a, record_b, \
                       kind, rules, score, status, suspected_at, updated_at) \
                     SELECT $1, $2, $3, $4, $5, $6, $7, \
                       CASE WHEN EXISTS (SELECT 1 FROM record_quality WHERE tenant_id = $1 \
                              AND ((record_id = $3 AND merged_into = $4) \
                                OR (record_id = $4 AND merged_into = $3))) \
                            THEN 'merged' ELSE 'suspected' END, $8, $8 \
                     WHERE (SELECT count(*) FROM record_quality \
                            WHERE tenant_id = $1 AND record_id IN ($3, $4)) = 2 \
                     ON CONFLICT (tenant_id, pair_id) DO UPDATE SET kind = EXCLUDED.kind, \
                       rules = EXCLUDED.rules, score = EXCLUDED.score, \
                       updated_at = GREATEST(duplicate_candidates.updated_at, EXCLUDED.updated_at)",
                    &[
                        &tenant,
                        &event.stream_id,
                        &a,
                        &b,
                        &suspected.kind.name(),
                        &suspected.rules,
                        &i16::from(suspected.score),
                        &at,
                    ],
                )
                .await?;
            }
            Some(DuplicateEvent::Dismissed(dismissed)) => {
                let at: std::time::SystemTime = dismissed.occurred_at.into();
                tx.execute(
                    "UPDATE duplicate_candidates SET \
                       status = CASE WHEN status = 'merged' THEN status ELSE 'dismissed' END, \
                       dismiss_reason = $3, updated_at = GREATEST(updated_at, $4) \
                     WHERE tenant_id = $1 AND pair_id = $2",
                    &[&tenant, &event.stream_id, &dismissed.reason.code, &at],
                )
                .await?;
            }
            None => {}
        }
        Ok(())
    }
}

/// What a shared record event means: a restore matches again, owner and
/// archive change the row, tags and shares only the time.
fn common_effect(event: &CommonEvent) -> Effect {
    match event {
        CommonEvent::Restored(_) => Effect::rematch(),
        CommonEvent::OwnerChanged(_) | CommonEvent::Archived(_) => Effect::default(),
        CommonEvent::TagsChanged(_) | CommonEvent::Shared(_) | CommonEvent::ShareRevoked(_) => {
            Effect::time_only()
        }
    }
}

/// `items` as a PostgreSQL array literal of text.
fn text_array(items: &[&str]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|item| format!("\"{}\"", item.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", quoted.join(","))
}

/// What a contact's, lead's or account's event means: its record's kind
/// and the event's effect; `None` for another event.
fn record_event(event: &RecordedEvent) -> Result<Option<(RecordKind, Effect)>, ApplyError> {
    Ok(match event.stream_type.as_str() {
        t if t == Contact::STREAM_TYPE => decode::<ContactEvent>(event)?
            .map(|decoded| (RecordKind::Contact, contact_effect(decoded))),
        t if t == Lead::STREAM_TYPE => {
            decode::<LeadEvent>(event)?.map(|decoded| (RecordKind::Lead, lead_effect(decoded)))
        }
        t if t == Account::STREAM_TYPE => decode::<AccountEvent>(event)?
            .map(|decoded| (RecordKind::Account, account_effect(decoded))),
        _ => None,
    })
}

fn contact_effect(event: ContactEvent) -> Effect {
    match event {
        ContactEvent::Created(_)
        | ContactEvent::DetailsUpdated(_)
        | ContactEvent::LinkedToAccount(_)
        | ContactEvent::UnlinkedFromAccount(_)
        | ContactEvent::Restored(_) => Effect::rematch(),
        ContactEvent::Common(common) => common_effect(&common),
        ContactEvent::ConsentChanged(_) | ContactEvent::NpsRecorded(_) => Effect::time_only(),
        ContactEvent::Merged(merged) => Effect {
            rematch: true,
            losers: merged.losers,
            ..Effect::default()
        },
        ContactEvent::MergedInto(into) => Effect {
            survivor: Some(into.survivor),
            ..Effect::default()
        },
        ContactEvent::PersonalDataErased(_) => Effect {
            erased: true,
            ..Effect::default()
        },
        _ => Effect::default(),
    }
}

fn lead_effect(event: LeadEvent) -> Effect {
    match event {
        LeadEvent::Captured(_) | LeadEvent::DetailsUpdated(_) => Effect::rematch(),
        LeadEvent::Common(common) => common_effect(&common),
        LeadEvent::Merged(merged) => Effect {
            rematch: true,
            losers: merged.losers,
            ..Effect::default()
        },
        LeadEvent::MergedInto(into) => Effect {
            survivor: Some(into.survivor),
            ..Effect::default()
        },
        LeadEvent::PersonalDataErased(_) => Effect {
            erased: true,
            ..Effect::default()
        },
        LeadEvent::StatusChanged(_) | LeadEvent::Converted(_) => Effect::default(),
    }
}

fn links(changes: &crm_domain::account::AccountChanges) -> Vec<(String, String)> {
    crm_domain::account::new_links(changes)
        .into_iter()
        .map(|(source, id)| (source.to_owned(), id.to_owned()))
        .collect()
}

fn account_effect(event: AccountEvent) -> Effect {
    match event {
        AccountEvent::DetailsUpdated(updated) => Effect {
            links: links(&updated.changes),
            ..Effect::rematch()
        },
        AccountEvent::Created(_) | AccountEvent::Restored(_) => Effect::rematch(),
        AccountEvent::Common(common) => common_effect(&common),
        AccountEvent::ChurnRiskFlagged(_) => Effect::ignored(),
        AccountEvent::Merged(merged) => Effect {
            rematch: true,
            links: links(&merged.changes),
            losers: merged.losers,
            ..Effect::default()
        },
        AccountEvent::MergedInto(into) => Effect {
            survivor: Some(into.survivor),
            ..Effect::default()
        },
        AccountEvent::PersonalDataErased(_) => Effect {
            erased: true,
            ..Effect::default()
        },
        _ => Effect::default(),
    }
}

impl Projection for DataQuality {
    crm_projections::projection_names!(
        NAME,
        SCHEMA,
        [
            "record_quality",
            "quality_summary",
            "duplicate_candidates",
            "dq_blocking_keys",
            "dq_settings",
            "dq_activity_targets",
            "dq_unmatched_orders",
            "dq_erp_links",
        ]
    );

    fn rebuildable(&self) -> bool {
        false
    }

    fn stream_types(&self) -> &'static [&'static str] {
        &[
            "contact",
            "lead",
            "account",
            "opportunity",
            "activity",
            "order",
            "tenant_settings",
            "duplicate_pair",
        ]
    }

    fn read_ahead<'a>(
        &'a self,
        tx: &'a Tx<'_>,
        events: &'a [&'a RecordedEvent],
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(self.read_batch(tx, events))
    }

    fn apply<'a>(
        &'a self,
        tx: &'a Tx<'_>,
        event: &'a RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            match event.stream_type.as_str() {
                t if [
                    Contact::STREAM_TYPE,
                    Lead::STREAM_TYPE,
                    Account::STREAM_TYPE,
                ]
                .contains(&t) =>
                {
                    // Decoded once: when read ahead, not again.
                    let read = self.batch().effects.remove(&event.global_position);
                    let meaning = match read {
                        Some(meaning) => Some(meaning),
                        None => record_event(event)?,
                    };
                    if let Some((kind, effect)) = meaning {
                        self.on_record(tx, event, kind, effect).await?;
                    }
                }
                t if t == Opportunity::STREAM_TYPE => Self::on_deal(tx, event).await?,
                t if t == <crm_domain::activity::Activity as Aggregate>::STREAM_TYPE => {
                    self.on_activity(tx, event).await?;
                }
                t if t == Order::STREAM_TYPE => Self::on_order(tx, event).await?,
                t if t == TenantSettings::STREAM_TYPE => Self::on_settings(tx, event).await?,
                t if t == DuplicatePair::STREAM_TYPE => Self::on_pair(tx, event).await?,
                _ => {}
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_arrays_are_quoted_postgresql_literals() {
        assert_eq!(text_array(&[]), "{}");
        assert_eq!(
            text_array(&["email", "a \"b\"", "c\\d", "e,f"]),
            r#"{"email","a \"b\"","c\\d","e,f"}"#
        );
    }

    #[test]
    fn language_regions_must_be_iso_countries() {
        for ok in ["", "en", "en-GB", "zh-Hans-CN", "es-419", "de-x-uk"] {
            assert!(language_region_ok(ok), "{ok}");
        }
        for bad in ["en-UK", "zh-Hans-XX", "pt-eu"] {
            assert!(!language_region_ok(bad), "{bad}");
        }
    }

    #[test]
    fn bad_emails_and_phones_are_named_as_commands_name_them() {
        use crm_domain::contact::{Email, Phone};
        let emails = [
            Email {
                address: "mei@example.cn".into(),
                primary: true,
            },
            Email {
                address: "mei at example".into(),
                primary: false,
            },
        ];
        let phones = [
            Phone {
                number: "+86-138-0013-8000".into(),
                kind: "mobile".into(),
            },
            Phone {
                number: "+8613800138000".into(),
                kind: "work".into(),
            },
        ];
        let mut issues = Vec::new();
        contact_point_issues(&emails, &phones, &mut issues);
        assert_eq!(
            issues,
            [
                ("emails[1].address".to_owned(), EMAIL_SYNTAX),
                ("phones[0].number".to_owned(), PHONE_E164)
            ]
        );
    }
}
