//! `customer_360`: what the other read models do not keep about a customer
//! (DOMAIN.md §5.4), for `crm.v1.Customer360`:
//!
//! - `c360_accounts`, `c360_contacts`: each account's and contact's state as
//!   the domain's own `evolve` builds it, with the instants the 360 shows
//!   (created, customer since, churned, churn risk flagged);
//! - `c360_contact_links`: which contacts are linked to which accounts, with
//!   role and primary flag (ContactLinkedToAccount / Unlinked);
//! - `c360_aliases`: merged records (RecordMergedInto) and their survivor,
//!   kept resolved along chains of merges; children of a loser stay where
//!   they are and the queries alias them (DOMAIN.md §2.11);
//! - `c360_about`: which accounts and contacts each child record concerns: a
//!   deal its account; a ticket its account and requester; an order, invoice
//!   or payment its account; an activity its account and contact targets (and
//!   those of the deals and tickets it targets); an SLA tracker its ticket's;
//! - `c360_tickets`, `c360_touches`, `c360_orders`, `c360_invoices`,
//!   `c360_payments`: the facts the 360 lists that no other read model keeps
//!   (requester and subject; activities and whether they count as a touch;
//!   delivery dates, invoices, payments and refunds);
//! - `c360_timeline`: one row per event worth showing, with its business
//!   time, a short summary and the stream it came from.
//!
//! Personal fields (names, emails, phones of contacts and person accounts)
//! are kept exactly as the events carry them: encrypted under the person's
//! key. The query decrypts them with that key, so an erasure (key destroyed)
//! makes them read as empty here too. Summaries hold no personal value: only
//! codes, ids, amounts, dates and the names of changed fields.
use crate::Tx;
use crm_domain::DomainEvent;
use crm_domain::account::{Account, AccountChanges, AccountEvent, AccountKind};
use crm_domain::activity::{ActivityEvent, Target};
use crm_domain::commerce::{InvoiceEvent, OrderEvent, PaymentEvent};
use crm_domain::common::Money;
use crm_domain::contact::{Contact, ContactChanges, ContactEvent};
use crm_domain::opportunity::OpportunityEvent;
use crm_domain::records::CommonEvent;
use crm_domain::sla::SlaEvent;
use crm_domain::ticket::TicketEvent;
use crm_event_store::RecordedEvent;
use uuid::Uuid;

use crate::runtime::{ApplyError, ApplyFuture, Projection};
use crate::state::decode;

/// The row state [`crate::state::evolve_row`] reads (a `static`: the
/// rebuild cache knows the row by its address).
static STATE_ACCOUNT: &str =
    "SELECT state FROM c360_accounts WHERE tenant_id = $1 AND account_id = $2";

/// The row state [`crate::state::evolve_row`] reads (a `static`: the
/// rebuild cache knows the row by its address).
static STATE_CONTACT: &str =
    "SELECT state FROM c360_contacts WHERE tenant_id = $1 AND contact_id = $2";

pub struct Customer360;

pub const NAME: &str = "customer_360";

/// The kinds of timeline entries, as `ListTimeline` filters them.
pub const TIMELINE_KINDS: &[&str] = &[
    "account", "contact", "deal", "ticket", "sla", "activity", "order", "invoice", "payment",
];

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS c360_accounts (
    tenant_id       text        NOT NULL,
    account_id      uuid        NOT NULL,
    state           json        NOT NULL,
    merged_into     uuid,
    erased          boolean     NOT NULL,
    created_at      timestamptz,
    customer_since  timestamptz,
    churned_at      timestamptz,
    churn_risk_at   timestamptz,
    churn_risk_days integer,
    position        bigint      NOT NULL,
    PRIMARY KEY (tenant_id, account_id)
) WITH (fillfactor = 70);
CREATE TABLE IF NOT EXISTS c360_contacts (
    tenant_id   text        NOT NULL,
    contact_id  uuid        NOT NULL,
    state       json        NOT NULL,
    merged_into uuid,
    erased      boolean     NOT NULL,
    created_at  timestamptz,
    position    bigint      NOT NULL,
    PRIMARY KEY (tenant_id, contact_id)
) WITH (fillfactor = 70);
CREATE TABLE IF NOT EXISTS c360_contact_links (
    tenant_id  text    NOT NULL,
    contact_id uuid    NOT NULL,
    account_id uuid    NOT NULL,
    role       text    NOT NULL,
    is_primary boolean NOT NULL,
    PRIMARY KEY (tenant_id, contact_id, account_id)
);
CREATE INDEX IF NOT EXISTS c360_contact_links_by_account
    ON c360_contact_links (tenant_id, account_id);
CREATE TABLE IF NOT EXISTS c360_aliases (
    tenant_id   text NOT NULL,
    loser_id    uuid NOT NULL,
    survivor_id uuid NOT NULL,
    stream_type text NOT NULL,
    PRIMARY KEY (tenant_id, loser_id)
);
CREATE INDEX IF NOT EXISTS c360_aliases_by_survivor ON c360_aliases (tenant_id, survivor_id);
CREATE TABLE IF NOT EXISTS c360_about (
    tenant_id   text NOT NULL,
    stream_id   uuid NOT NULL,
    stream_type text NOT NULL,
    about_kind  text NOT NULL,
    about_id    uuid NOT NULL,
    PRIMARY KEY (tenant_id, stream_id, about_id)
);
-- By the record's id alone (ids are unique across tenants; queries still
-- filter by tenant): led by the tenant's text, a rebuild's sorted pass cost
-- about three times as much (see c360_timeline_by_stream). A table made
-- before, with (tenant_id, about_id, stream_type), gets it at its next
-- rebuild; both serve the queries.
CREATE INDEX IF NOT EXISTS c360_about_by_record ON c360_about (about_id, stream_type);
CREATE TABLE IF NOT EXISTS c360_tickets (
    tenant_id    text        NOT NULL,
    ticket_id    uuid        NOT NULL,
    requester_id uuid        NOT NULL,
    account_id   uuid,
    subject      text        NOT NULL,
    opened_at    timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, ticket_id)
);
CREATE TABLE IF NOT EXISTS c360_touches (
    tenant_id    text        NOT NULL,
    activity_id  uuid        NOT NULL,
    kind         text        NOT NULL,
    direction    text        NOT NULL,
    outcome      text        NOT NULL,
    state        text        NOT NULL,
    subject      text        NOT NULL,
    assignee     text        NOT NULL,
    due          timestamptz,
    overdue      boolean     NOT NULL,
    occurred_at  timestamptz NOT NULL,
    completed_at timestamptz,
    touched_at   timestamptz,
    PRIMARY KEY (tenant_id, activity_id)
) WITH (fillfactor = 70);
CREATE TABLE IF NOT EXISTS c360_orders (
    tenant_id         text        NOT NULL,
    order_id          uuid        NOT NULL,
    account_id        uuid,
    source            text        NOT NULL,
    external_id       text        NOT NULL,
    status            text        NOT NULL,
    cancelled         boolean     NOT NULL,
    cancel_reason     text        NOT NULL,
    net_minor         bigint      NOT NULL,
    tax_minor         bigint      NOT NULL,
    gross_minor       bigint      NOT NULL,
    currency          text        NOT NULL,
    ordered_on        date        NOT NULL,
    promised_delivery date,
    deal_id           uuid,
    ordered_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, order_id)
) WITH (fillfactor = 70);
CREATE INDEX IF NOT EXISTS c360_orders_by_account ON c360_orders (tenant_id, account_id);
-- The ERP customer of an order recorded without an account: linking it
-- later resolves the order.
ALTER TABLE c360_orders ADD COLUMN IF NOT EXISTS customer_ref text NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS c360_orders_unlinked ON c360_orders (tenant_id, source, customer_ref)
    WHERE account_id IS NULL;
-- Which account each ERP customer is linked to: an order recorded unlinked
-- just as its customer was linked resolves on arrival.
CREATE TABLE IF NOT EXISTS c360_erp_links (
    tenant_id   text NOT NULL,
    source      text NOT NULL,
    external_id text NOT NULL,
    account_id  uuid NOT NULL,
    PRIMARY KEY (tenant_id, source, external_id)
);
CREATE TABLE IF NOT EXISTS c360_invoices (
    tenant_id     text        NOT NULL,
    invoice_id    uuid        NOT NULL,
    account_id    uuid,
    number        text        NOT NULL,
    fapiao_number text        NOT NULL,
    issued_on     date        NOT NULL,
    due_on        date        NOT NULL,
    net_minor     bigint      NOT NULL,
    tax_minor     bigint      NOT NULL,
    gross_minor   bigint      NOT NULL,
    currency      text        NOT NULL,
    order_ids     uuid[]      NOT NULL,
    occurred_at   timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, invoice_id)
) WITH (fillfactor = 70);
CREATE INDEX IF NOT EXISTS c360_invoices_by_account ON c360_invoices (tenant_id, account_id);
CREATE TABLE IF NOT EXISTS c360_payments (
    tenant_id      text        NOT NULL,
    payment_id     uuid        NOT NULL,
    account_id     uuid,
    external_id    text        NOT NULL,
    amount_minor   bigint      NOT NULL,
    refunded_minor bigint      NOT NULL,
    currency       text        NOT NULL,
    paid_on        date        NOT NULL,
    order_ids      uuid[]      NOT NULL,
    occurred_at    timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, payment_id)
) WITH (fillfactor = 70);
CREATE INDEX IF NOT EXISTS c360_payments_by_account ON c360_payments (tenant_id, account_id);
CREATE TABLE IF NOT EXISTS c360_timeline (
    tenant_id   text        NOT NULL,
    position    bigint      NOT NULL,
    occurred_at timestamptz NOT NULL,
    kind        text        NOT NULL,
    event_type  text        NOT NULL,
    summary     text        NOT NULL,
    stream_type text        NOT NULL,
    stream_id   uuid        NOT NULL,
    PRIMARY KEY (tenant_id, position)
);
-- By the stream's id alone, as c360_about_by_record: psql, 847,000 rows,
-- 0.54 s to build against 1.6-1.8 s led by tenant_id (a table made before
-- gets it at its next rebuild).
CREATE INDEX IF NOT EXISTS c360_timeline_by_stream
    ON c360_timeline (stream_id, occurred_at DESC, position DESC)";

type Time = std::time::SystemTime;

fn position(event: &RecordedEvent) -> i64 {
    i64::try_from(event.global_position).unwrap_or(i64::MAX)
}

/// Digits after the decimal point of an ISO 4217 currency.
fn minor_digits(currency: &str) -> u32 {
    match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    }
}

/// `1234.50 CNY`: an amount for a summary, in the currency's own digits.
fn money(money: &Money) -> String {
    let digits = minor_digits(&money.currency);
    let sign = if money.amount_minor < 0 { "-" } else { "" };
    let units = money.amount_minor.unsigned_abs();
    if digits == 0 {
        return format!("{sign}{units} {}", money.currency);
    }
    let scale = 10u64.pow(digits);
    format!(
        "{sign}{}.{:0width$} {}",
        units / scale,
        units % scale,
        money.currency,
        width = digits as usize
    )
}

/// The names of the fields an update changed (never their values).
fn changed(fields: &[(&str, bool)]) -> String {
    let names: Vec<&str> = fields
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| *name)
        .collect();
    format!("details updated: {}", names.join(", "))
}

fn account_changes(c: &AccountChanges) -> String {
    changed(&[
        ("name", c.name.is_some()),
        ("domains", c.domains.is_some()),
        ("industry", c.industry.is_some()),
        ("parent", c.parent_id.is_some()),
        ("segment", c.segment.is_some()),
        ("tax id", c.tax_id.is_some()),
        ("credit terms", c.credit_terms.is_some()),
        ("ERP link", c.external_refs.is_some()),
    ])
}

fn contact_changes(c: &ContactChanges) -> String {
    changed(&[
        ("name", c.name.is_some()),
        ("emails", c.emails.is_some()),
        ("phones", c.phones.is_some()),
        ("title", c.title.is_some()),
        ("preferences", c.preferences.is_some()),
    ])
}

/// What the shared record events mean on a timeline.
fn common(event: &CommonEvent) -> Option<String> {
    Some(match event {
        CommonEvent::OwnerChanged(owner) => format!("owner: {}", owner.new),
        CommonEvent::TagsChanged(tags) => {
            let added = tags.added.iter().map(|t| format!("+{t}"));
            let removed = tags.removed.iter().map(|t| format!("-{t}"));
            format!(
                "tags {}",
                added.chain(removed).collect::<Vec<_>>().join(" ")
            )
        }
        CommonEvent::Archived(_) => "archived".to_owned(),
        CommonEvent::Restored(_) => "restored".to_owned(),
        CommonEvent::Shared(_) | CommonEvent::ShareRevoked(_) => return None,
    })
}

/// A timeline row's time: to the microsecond as PostgreSQL reads the
/// payload's text (rounded, where tokio-postgres would cut), as the rows
/// written when the text was sent are.
fn timeline_time(at: jiff::Timestamp) -> std::time::SystemTime {
    at.round(jiff::Unit::Microsecond).unwrap_or(at).into()
}

/// One timeline row for `event`, which happened at `at` (its decoded
/// payload's `occurred_at`).
async fn timeline(
    tx: &Tx<'_>,
    event: &RecordedEvent,
    at: jiff::Timestamp,
    kind: &str,
    summary: &str,
) -> Result<(), ApplyError> {
    // A rebuild adds the key once the table is full (`rebuild_keys`): its
    // rows go by COPY, without a conflict clause.
    let sql = match tx.in_rebuild() {
        true => {
            "INSERT INTO c360_timeline (tenant_id, position, occurred_at, kind, event_type, \
               summary, stream_type, stream_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        }
        false => {
            "INSERT INTO c360_timeline (tenant_id, position, occurred_at, kind, event_type, \
               summary, stream_type, stream_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (tenant_id, position) DO NOTHING"
        }
    };
    tx.execute(
        sql,
        &[
            &event.tenant_id,
            &position(event),
            &timeline_time(at),
            &kind,
            &event.event_type,
            &summary,
            &event.stream_type,
            &event.stream_id,
        ],
    )
    .await?;
    Ok(())
}

/// Replaces what the event's stream concerns: `(about_kind, about_id)`.
async fn set_about(
    tx: &Tx<'_>,
    event: &RecordedEvent,
    about: &[(&str, Uuid)],
) -> Result<(), ApplyError> {
    // Only the stream's own events write its rows: at its first there are
    // none to delete.
    if !crate::state::first_of_stream(event) {
        tx.execute(
            "DELETE FROM c360_about WHERE tenant_id = $1 AND stream_id = $2",
            &[&event.tenant_id, &event.stream_id],
        )
        .await?;
    }
    for (kind, id) in about {
        tx.execute(
            "INSERT INTO c360_about (tenant_id, stream_id, stream_type, about_kind, about_id) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, stream_id, about_id) DO NOTHING",
            &[
                &event.tenant_id,
                &event.stream_id,
                &event.stream_type,
                kind,
                id,
            ],
        )
        .await?;
    }
    Ok(())
}

/// Adds to the event's stream what stream `from` concerns.
async fn copy_about(tx: &Tx<'_>, event: &RecordedEvent, from: Uuid) -> Result<(), ApplyError> {
    tx.execute(
        "INSERT INTO c360_about (tenant_id, stream_id, stream_type, about_kind, about_id) \
         SELECT tenant_id, $2, $3, about_kind, about_id FROM c360_about \
         WHERE tenant_id = $1 AND stream_id = $4 ON CONFLICT (tenant_id, stream_id, about_id) DO NOTHING",
        &[
            &event.tenant_id,
            &event.stream_id,
            &event.stream_type,
            &from,
        ],
    )
    .await?;
    Ok(())
}

/// The event's stream was merged into `survivor`: it and every record
/// merged into it before now resolve to `survivor`.
async fn alias(tx: &Tx<'_>, event: &RecordedEvent, survivor: Uuid) -> Result<(), ApplyError> {
    tx.execute(
        "INSERT INTO c360_aliases (tenant_id, loser_id, survivor_id, stream_type) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, loser_id) \
         DO UPDATE SET survivor_id = EXCLUDED.survivor_id",
        &[
            &event.tenant_id,
            &event.stream_id,
            &survivor,
            &event.stream_type,
        ],
    )
    .await?;
    tx.execute(
        "UPDATE c360_aliases SET survivor_id = $3 WHERE tenant_id = $1 AND survivor_id = $2",
        &[&event.tenant_id, &event.stream_id, &survivor],
    )
    .await?;
    Ok(())
}

async fn account(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let Some((state, decoded)) =
        crate::state::evolve_row::<Account>(tx, STATE_ACCOUNT, event).await?
    else {
        return Ok(());
    };
    let state = crate::state::kept(tx, STATE_ACCOUNT, event, state);
    let json = crate::state::stored(&*state);
    let mut created_at: Option<Time> = None;
    let mut customer_since: Option<Time> = None;
    // (whether churned_at changes, its new value)
    let mut churned: (bool, Option<Time>) = (false, None);
    let mut risk: (Option<Time>, Option<i32>) = (None, None);
    let summary = match &*decoded {
        AccountEvent::Created(created) => {
            created_at = Some(created.occurred_at.into());
            Some(match created.kind {
                AccountKind::Company => "company account created".to_owned(),
                AccountKind::Person => "person account created".to_owned(),
            })
        }
        AccountEvent::DetailsUpdated(updated) => {
            crate::erp_links::resolve_orders(tx, event, &updated.changes, &LINKS).await?;
            Some(account_changes(&updated.changes))
        }
        AccountEvent::BecameCustomer(became) => {
            customer_since = Some(became.occurred_at.into());
            churned = (true, None);
            Some(format!("became a customer ({})", became.trigger))
        }
        AccountEvent::ChurnRiskFlagged(flagged) => {
            risk = (
                Some(flagged.occurred_at.into()),
                Some(i32::try_from(flagged.days_inactive).unwrap_or(i32::MAX)),
            );
            Some(format!(
                "churn risk: no activity for {} days",
                flagged.days_inactive
            ))
        }
        AccountEvent::Churned(gone) => {
            churned = (true, Some(gone.occurred_at.into()));
            Some(format!("churned ({})", gone.reason))
        }
        AccountEvent::Archived(_) => Some("archived".to_owned()),
        AccountEvent::Restored(_) => Some("restored".to_owned()),
        AccountEvent::Common(common_event) => common(common_event),
        AccountEvent::Merged(merged) => {
            crate::erp_links::resolve_orders(tx, event, &merged.changes, &LINKS).await?;
            Some(format!(
                "{} duplicate account(s) merged into this one",
                merged.losers.len()
            ))
        }
        AccountEvent::MergedInto(merged) => {
            alias(tx, event, merged.survivor).await?;
            Some(format!("merged into account {}", merged.survivor))
        }
        AccountEvent::PersonalDataErased(_) => Some("personal data erased".to_owned()),
    };
    tx.execute(
        "INSERT INTO c360_accounts (tenant_id, account_id, state, merged_into, erased, created_at, \
           customer_since, churned_at, churn_risk_at, churn_risk_days, position) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
         ON CONFLICT (tenant_id, account_id) DO UPDATE SET state = EXCLUDED.state, \
           merged_into = EXCLUDED.merged_into, erased = EXCLUDED.erased, \
           created_at = COALESCE(EXCLUDED.created_at, c360_accounts.created_at), \
           customer_since = COALESCE(c360_accounts.customer_since, EXCLUDED.customer_since), \
           churned_at = CASE WHEN $12 THEN EXCLUDED.churned_at ELSE c360_accounts.churned_at END, \
           churn_risk_at = COALESCE(EXCLUDED.churn_risk_at, c360_accounts.churn_risk_at), \
           churn_risk_days = COALESCE(EXCLUDED.churn_risk_days, c360_accounts.churn_risk_days), \
           position = EXCLUDED.position",
        &[
            &event.tenant_id,
            &event.stream_id,
            &json,
            &state.merged_into,
            &state.erased,
            &created_at,
            &customer_since,
            &churned.1,
            &risk.0,
            &risk.1,
            &position(event),
            &churned.0,
        ],
    )
    .await?;
    if let Some(summary) = summary {
        timeline(tx, event, decoded.occurred_at(), "account", &summary).await?;
    }
    Ok(())
}

async fn contact(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let Some((state, decoded)) =
        crate::state::evolve_row::<Contact>(tx, STATE_CONTACT, event).await?
    else {
        return Ok(());
    };
    let state = crate::state::kept(tx, STATE_CONTACT, event, state);
    let json = crate::state::stored(&*state);
    let created_at: Option<Time> = match &*decoded {
        ContactEvent::Created(created) => Some(created.occurred_at.into()),
        _ => None,
    };
    tx.execute(
        "INSERT INTO c360_contacts (tenant_id, contact_id, state, merged_into, erased, created_at, \
           position) VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (tenant_id, contact_id) DO UPDATE SET state = EXCLUDED.state, \
           merged_into = EXCLUDED.merged_into, erased = EXCLUDED.erased, \
           created_at = COALESCE(EXCLUDED.created_at, c360_contacts.created_at), \
           position = EXCLUDED.position",
        &[
            &event.tenant_id,
            &event.stream_id,
            &json,
            &state.merged_into,
            &state.erased,
            &created_at,
            &position(event),
        ],
    )
    .await?;
    if matches!(
        *decoded,
        ContactEvent::LinkedToAccount(_) | ContactEvent::UnlinkedFromAccount(_)
    ) {
        tx.execute(
            "DELETE FROM c360_contact_links WHERE tenant_id = $1 AND contact_id = $2",
            &[&event.tenant_id, &event.stream_id],
        )
        .await?;
        for link in &state.accounts {
            tx.execute(
                "INSERT INTO c360_contact_links (tenant_id, contact_id, account_id, role, \
                   is_primary) VALUES ($1, $2, $3, $4, $5)",
                &[
                    &event.tenant_id,
                    &event.stream_id,
                    &link.account_id,
                    &link.role,
                    &link.primary,
                ],
            )
            .await?;
        }
    }
    let summary = match &*decoded {
        ContactEvent::Created(_) => Some("contact created".to_owned()),
        ContactEvent::DetailsUpdated(updated) => Some(contact_changes(&updated.changes)),
        ContactEvent::ConsentChanged(consent) => Some(format!(
            "consent {} {} ({}, {})",
            consent.purpose,
            if consent.granted {
                "granted"
            } else {
                "withdrawn"
            },
            consent.source,
            consent.basis
        )),
        ContactEvent::LinkedToAccount(link) => Some(format!(
            "linked to account {}{}{}",
            link.account_id,
            if link.role.is_empty() {
                String::new()
            } else {
                format!(" as {}", link.role)
            },
            if link.primary { " (primary)" } else { "" }
        )),
        ContactEvent::UnlinkedFromAccount(unlinked) => {
            Some(format!("unlinked from account {}", unlinked.account_id))
        }
        ContactEvent::NpsRecorded(nps) => Some(format!("NPS answer {}", nps.score)),
        ContactEvent::Merged(merged) => Some(format!(
            "{} duplicate contact(s) merged into this one",
            merged.losers.len()
        )),
        ContactEvent::MergedInto(merged) => {
            alias(tx, event, merged.survivor).await?;
            Some(format!("merged into contact {}", merged.survivor))
        }
        ContactEvent::PersonalDataErased(_) => Some("personal data erased".to_owned()),
        ContactEvent::Archived(_) => Some("archived".to_owned()),
        ContactEvent::Restored(_) => Some("restored".to_owned()),
        ContactEvent::Common(common_event) => common(common_event),
    };
    if let Some(summary) = summary {
        timeline(tx, event, decoded.occurred_at(), "contact", &summary).await?;
    }
    Ok(())
}

async fn deal(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let Some(decoded) = crate::state::decoded::<OpportunityEvent>(event)? else {
        return Ok(());
    };
    let summary = match &*decoded {
        OpportunityEvent::Opened(opened) => {
            // A deal concerns its account only: its contact's other
            // accounts do not see it.
            set_about(tx, event, &[("account", opened.account_id)]).await?;
            Some(format!(
                "deal opened in {}: {}",
                opened.stage,
                money(&opened.amount)
            ))
        }
        OpportunityEvent::StageChanged(moved) => {
            Some(format!("deal stage {} → {}", moved.from, moved.to))
        }
        OpportunityEvent::Won(won) => Some(format!("deal won: {}", money(&won.amount))),
        OpportunityEvent::Lost(lost) => Some(format!("deal lost ({})", lost.reason.code)),
        OpportunityEvent::Reopened(reopened) => {
            Some(format!("deal reopened in {}", reopened.stage))
        }
        OpportunityEvent::Stalled(stalled) => Some(format!(
            "deal stalled in {} ({}, {} days)",
            stalled.stage, stalled.rule, stalled.days
        )),
        OpportunityEvent::ForecastFieldsChanged(_)
        | OpportunityEvent::LineItemsChanged(_)
        | OpportunityEvent::DetailsUpdated(_)
        | OpportunityEvent::Common(_) => None,
    };
    if let Some(summary) = summary {
        timeline(tx, event, decoded.occurred_at(), "deal", &summary).await?;
    }
    Ok(())
}

async fn ticket(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let Some(decoded) = crate::state::decoded::<TicketEvent>(event)? else {
        return Ok(());
    };
    let summary = match &*decoded {
        TicketEvent::Opened(opened) => {
            let at: Time = opened.occurred_at.into();
            // The subject stays as the event carries it (encrypted when the
            // event is); the query opens it with the requester's key.
            tx.execute(
                "INSERT INTO c360_tickets (tenant_id, ticket_id, requester_id, account_id, subject, \
                   opened_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, ticket_id) DO NOTHING",
                &[
                    &event.tenant_id,
                    &event.stream_id,
                    &opened.requester_id,
                    &opened.account_id,
                    &opened.subject,
                    &at,
                ],
            )
            .await?;
            let mut about = vec![("contact", opened.requester_id)];
            if let Some(account_id) = opened.account_id {
                about.push(("account", account_id));
            }
            set_about(tx, event, &about).await?;
            Some(format!(
                "{} opened via {} ({})",
                opened.ticket_type.name(),
                opened.channel.name(),
                opened.priority.name()
            ))
        }
        TicketEvent::StatusChanged(status) => Some(format!(
            "ticket status {} → {}",
            status.from.name(),
            status.to.name()
        )),
        TicketEvent::Escalated(escalated) => Some(format!(
            "ticket escalated to level {} ({})",
            escalated.level, escalated.rule
        )),
        TicketEvent::Solved(solved) => Some(if solved.root_cause.is_empty() {
            "ticket solved".to_owned()
        } else {
            format!("ticket solved (root cause {})", solved.root_cause)
        }),
        TicketEvent::Reopened(reopened) => Some(format!("ticket reopened ({})", reopened.cause)),
        TicketEvent::Closed(closed) => Some(format!("ticket closed ({})", closed.how)),
        TicketEvent::CsatReceived(rating) => Some(format!("CSAT rating {}/5", rating.score)),
        TicketEvent::Triaged(_)
        | TicketEvent::Assigned(_)
        | TicketEvent::MessageAdded(_)
        | TicketEvent::Common(_) => None,
    };
    if let Some(summary) = summary {
        timeline(tx, event, decoded.occurred_at(), "ticket", &summary).await?;
    }
    Ok(())
}

async fn sla(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    match crate::state::decoded::<SlaEvent>(event)?.as_deref() {
        Some(SlaEvent::PolicyApplied(applied)) => {
            set_about(tx, event, &[]).await?;
            copy_about(tx, event, applied.ticket_id).await?;
        }
        Some(SlaEvent::Breached(alarm)) => {
            let summary = format!("SLA {} breached", alarm.metric.name());
            timeline(tx, event, alarm.occurred_at, "sla", &summary).await?;
        }
        _ => {}
    }
    Ok(())
}

/// What an activity's targets concern: accounts and contacts directly, and
/// what the deals and tickets it targets concern.
async fn activity_about(
    tx: &Tx<'_>,
    event: &RecordedEvent,
    targets: &[Target],
) -> Result<(), ApplyError> {
    let direct: Vec<(&str, Uuid)> = targets
        .iter()
        .filter_map(|t| match t.kind.as_str() {
            "account" => Some(("account", t.id)),
            "contact" => Some(("contact", t.id)),
            _ => None,
        })
        .collect();
    set_about(tx, event, &direct).await?;
    for target in targets {
        if target.kind == "opportunity" || target.kind == "ticket" {
            copy_about(tx, event, target.id).await?;
        }
    }
    Ok(())
}

async fn activity(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let Some(decoded) = crate::state::decoded::<ActivityEvent>(event)? else {
        return Ok(());
    };
    let (tenant, id) = (&event.tenant_id, &event.stream_id);
    let summary = match &*decoded {
        ActivityEvent::Logged(logged) => {
            let at: Time = logged.occurred_at.into();
            // Logged items are touches, except notes (DOMAIN.md §2.5).
            let touched: Option<Time> = (logged.kind != "note").then_some(at);
            tx.execute(
                "INSERT INTO c360_touches (tenant_id, activity_id, kind, direction, outcome, state, \
                   subject, assignee, overdue, occurred_at, touched_at) \
                 VALUES ($1, $2, $3, $4, $5, 'logged'::text, ''::text, ''::text, false, $6, $7) \
                 ON CONFLICT (tenant_id, activity_id) DO NOTHING",
                &[
                    tenant,
                    id,
                    &logged.kind,
                    &logged.direction,
                    &logged.outcome,
                    &at,
                    &touched,
                ],
            )
            .await?;
            activity_about(tx, event, &logged.targets).await?;
            let direction = if logged.direction.is_empty() {
                String::new()
            } else {
                format!(" {}", logged.direction)
            };
            Some(if logged.outcome.is_empty() {
                format!("{}{direction} logged", logged.kind)
            } else {
                format!("{}{direction} logged: {}", logged.kind, logged.outcome)
            })
        }
        ActivityEvent::Scheduled(scheduled) => {
            let at: Time = scheduled.occurred_at.into();
            let due: Time = scheduled.due.into();
            tx.execute(
                "INSERT INTO c360_touches (tenant_id, activity_id, kind, direction, outcome, state, \
                   subject, assignee, due, overdue, occurred_at) \
                 VALUES ($1, $2, $3, ''::text, ''::text, 'scheduled'::text, $4, $5, $6, false, $7) \
                 ON CONFLICT (tenant_id, activity_id) DO NOTHING",
                &[
                    tenant,
                    id,
                    &scheduled.kind,
                    &scheduled.subject,
                    &scheduled.assignee,
                    &due,
                    &at,
                ],
            )
            .await?;
            activity_about(tx, event, &scheduled.targets).await?;
            Some(format!(
                "{} scheduled for {}",
                scheduled.kind, scheduled.due
            ))
        }
        ActivityEvent::Completed(completed) => {
            let at: Time = completed.occurred_at.into();
            // A held meeting is a touch.
            let kind: Option<String> = tx
                .query_opt(
                    "UPDATE c360_touches SET state = 'completed', outcome = $3, completed_at = $4, \
                       touched_at = CASE WHEN kind = 'meeting' AND $3 = 'held' THEN $4 \
                                         ELSE touched_at END \
                     WHERE tenant_id = $1 AND activity_id = $2 RETURNING kind",
                    &[tenant, id, &completed.outcome, &at],
                )
                .await?
                .map(|row| row.get(0));
            Some(format!(
                "{} completed: {}",
                kind.as_deref().unwrap_or("activity"),
                completed.outcome
            ))
        }
        ActivityEvent::Overdue(overdue) => {
            tx.execute(
                "UPDATE c360_touches SET overdue = true WHERE tenant_id = $1 AND activity_id = $2",
                &[tenant, id],
            )
            .await?;
            Some(format!("overdue since {}", overdue.due))
        }
        ActivityEvent::DetailsUpdated(updated) => {
            let c = &updated.changes;
            let due: Option<Time> = c.due.as_ref().map(|d| d.new.into());
            tx.execute(
                "UPDATE c360_touches SET due = COALESCE($3, due), \
                   overdue = CASE WHEN $3::timestamptz IS NULL THEN overdue ELSE false END, \
                   assignee = COALESCE($4, assignee), subject = COALESCE($5, subject) \
                 WHERE tenant_id = $1 AND activity_id = $2",
                &[
                    tenant,
                    id,
                    &due,
                    &c.assignee.as_ref().map(|a| a.new.as_str()),
                    &c.subject.as_ref().map(|s| s.new.as_str()),
                ],
            )
            .await?;
            c.due
                .as_ref()
                .map(|due| format!("rescheduled for {}", due.new))
        }
    };
    if let Some(summary) = summary {
        timeline(tx, event, decoded.occurred_at(), "activity", &summary).await?;
    }
    Ok(())
}

/// This read model's ERP link statements (see [`crate::erp_links`]).
static LINKS: crate::erp_links::LinkStatements = crate::erp_links::LinkStatements {
    record: "INSERT INTO c360_erp_links (tenant_id, account_id, source, external_id) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, source, external_id) \
             DO UPDATE SET account_id = EXCLUDED.account_id",
    resolve: "UPDATE c360_orders SET account_id = $2 \
              WHERE tenant_id = $1 AND account_id IS NULL AND source = $3 AND customer_ref = $4",
    lookup: "SELECT account_id FROM c360_erp_links \
             WHERE tenant_id = $1 AND source = $2 AND external_id = $3",
};

async fn order(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let (tenant, id) = (&event.tenant_id, &event.stream_id);
    match crate::state::decoded::<OrderEvent>(event)?.as_deref() {
        Some(OrderEvent::Recorded(order)) => {
            let at: Time = order.occurred_at.into();
            let account_id = crate::erp_links::order_account(tx, event, order, &LINKS).await?;
            tx.execute(
                "INSERT INTO c360_orders (tenant_id, order_id, account_id, source, external_id, \
                   status, cancelled, cancel_reason, net_minor, tax_minor, gross_minor, currency, \
                   ordered_on, promised_delivery, deal_id, ordered_at, updated_at, customer_ref) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
                   $17, $18) \
                 ON CONFLICT (tenant_id, order_id) DO UPDATE SET \
                   account_id = COALESCE(EXCLUDED.account_id, c360_orders.account_id), \
                   customer_ref = EXCLUDED.customer_ref, \
                   status = EXCLUDED.status, net_minor = EXCLUDED.net_minor, \
                   tax_minor = EXCLUDED.tax_minor, gross_minor = EXCLUDED.gross_minor, \
                   currency = EXCLUDED.currency, ordered_on = EXCLUDED.ordered_on, \
                   promised_delivery = EXCLUDED.promised_delivery, deal_id = EXCLUDED.deal_id, \
                   updated_at = EXCLUDED.updated_at",
                &[
                    tenant,
                    id,
                    &account_id,
                    &order.external.source,
                    &order.external.external_id,
                    &order.status,
                    // Not cancelled, no reason: parameters, so that a new
                    // row goes by COPY in a rebuild (`bulk::CopyIn`).
                    &false,
                    &"",
                    &order.totals.net.amount_minor,
                    &order.totals.tax.amount_minor,
                    &order.totals.gross.amount_minor,
                    &order.totals.gross.currency,
                    &order.ordered_on,
                    &order.promised_delivery,
                    &order.deal_id,
                    &at,
                    &at,
                    &order.customer_ref,
                ],
            )
            .await?;
            // The resolved account: a raced order shows on its timeline too.
            let about: Vec<(&str, Uuid)> = account_id.map(|a| ("account", a)).into_iter().collect();
            set_about(tx, event, &about).await?;
            let summary = format!(
                "order {} {}: {}",
                order.external.external_id,
                order.status,
                money(&order.totals.gross)
            );
            timeline(tx, event, order.occurred_at, "order", &summary).await?;
        }
        Some(OrderEvent::Cancelled(cancelled)) => {
            let at: Time = cancelled.occurred_at.into();
            let number: Option<String> = tx
                .query_opt(
                    "UPDATE c360_orders SET cancelled = true, cancel_reason = $3, updated_at = $4 \
                     WHERE tenant_id = $1 AND order_id = $2 RETURNING external_id",
                    &[tenant, id, &cancelled.reason, &at],
                )
                .await?
                .map(|row| row.get(0));
            let summary = format!("order {} {}", number.unwrap_or_default(), cancelled.reason);
            timeline(tx, event, cancelled.occurred_at, "order", &summary).await?;
        }
        None => {}
    }
    Ok(())
}

async fn invoice(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let Some(InvoiceEvent::Issued(invoice)) = decode::<InvoiceEvent>(event)? else {
        return Ok(());
    };
    let at: Time = invoice.occurred_at.into();
    tx.execute(
        "INSERT INTO c360_invoices (tenant_id, invoice_id, account_id, number, fapiao_number, \
           issued_on, due_on, net_minor, tax_minor, gross_minor, currency, order_ids, occurred_at) \
         VALUES ($1, $2, $3, $4, $5, $6::text::date, $7::text::date, $8, $9, $10, $11, $12, $13) \
         ON CONFLICT (tenant_id, invoice_id) DO UPDATE SET account_id = EXCLUDED.account_id, \
           number = EXCLUDED.number, fapiao_number = EXCLUDED.fapiao_number, \
           issued_on = EXCLUDED.issued_on, due_on = EXCLUDED.due_on, \
           net_minor = EXCLUDED.net_minor, tax_minor = EXCLUDED.tax_minor, \
           gross_minor = EXCLUDED.gross_minor, currency = EXCLUDED.currency, \
           order_ids = EXCLUDED.order_ids",
        &[
            &event.tenant_id,
            &event.stream_id,
            &invoice.account_id,
            &invoice.number,
            &invoice.fapiao_number,
            &invoice.issued_on.to_string(),
            &invoice.due_on.to_string(),
            &invoice.totals.net.amount_minor,
            &invoice.totals.tax.amount_minor,
            &invoice.totals.gross.amount_minor,
            &invoice.totals.gross.currency,
            &invoice.order_ids,
            &at,
        ],
    )
    .await?;
    let about: Vec<(&str, Uuid)> = invoice
        .account_id
        .map(|a| ("account", a))
        .into_iter()
        .collect();
    set_about(tx, event, &about).await?;
    let summary = format!(
        "invoice {} issued: {}, due {}",
        invoice.number,
        money(&invoice.totals.gross),
        invoice.due_on
    );
    timeline(tx, event, invoice.occurred_at, "invoice", &summary).await
}

async fn payment(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let (tenant, id) = (&event.tenant_id, &event.stream_id);
    match crate::state::decoded::<PaymentEvent>(event)?.as_deref() {
        Some(PaymentEvent::Received(received)) => {
            let at: Time = received.occurred_at.into();
            tx.execute(
                "INSERT INTO c360_payments (tenant_id, payment_id, account_id, external_id, \
                   amount_minor, refunded_minor, currency, paid_on, order_ids, occurred_at) \
                 VALUES ($1, $2, $3, $4, $5, 0, $6, $7::text::date, $8, $9) \
                 ON CONFLICT (tenant_id, payment_id) DO UPDATE SET \
                   account_id = EXCLUDED.account_id, amount_minor = EXCLUDED.amount_minor, \
                   currency = EXCLUDED.currency, paid_on = EXCLUDED.paid_on, \
                   order_ids = EXCLUDED.order_ids",
                &[
                    tenant,
                    id,
                    &received.account_id,
                    &received.external.external_id,
                    &received.amount.amount_minor,
                    &received.amount.currency,
                    &received.paid_on.to_string(),
                    &received.order_ids,
                    &at,
                ],
            )
            .await?;
            let about: Vec<(&str, Uuid)> = received
                .account_id
                .map(|a| ("account", a))
                .into_iter()
                .collect();
            set_about(tx, event, &about).await?;
            let summary = format!("payment received: {}", money(&received.amount));
            timeline(tx, event, received.occurred_at, "payment", &summary).await?;
        }
        Some(PaymentEvent::Refunded(refund)) => {
            tx.execute(
                "UPDATE c360_payments SET refunded_minor = refunded_minor + $3 \
                 WHERE tenant_id = $1 AND payment_id = $2",
                &[tenant, id, &refund.amount.amount_minor],
            )
            .await?;
            let summary = format!("refund issued: {}", money(&refund.amount));
            timeline(tx, event, refund.occurred_at, "payment", &summary).await?;
        }
        None => {}
    }
    Ok(())
}

impl Projection for Customer360 {
    crate::projection_names!(
        NAME,
        SCHEMA,
        [
            "c360_accounts",
            "c360_contacts",
            "c360_contact_links",
            "c360_aliases",
            "c360_about",
            "c360_tickets",
            "c360_touches",
            "c360_orders",
            "c360_invoices",
            "c360_payments",
            "c360_timeline",
            "c360_erp_links",
        ]
    );

    fn query_indexes(&self) -> &'static [&'static str] {
        // Not c360_aliases_by_survivor: a merge re-points aliases by survivor.
        &[
            "c360_contact_links_by_account",
            "c360_about_by_record",
            "c360_orders_by_account",
            "c360_invoices_by_account",
            "c360_payments_by_account",
            "c360_timeline_by_stream",
        ]
    }

    fn rebuild_keys(&self) -> &'static [&'static str] {
        // One row per event at most: kept row by row it cost a rebuild
        // about 0.8 µs a row (847,000 rows per 1M events).
        &["c360_timeline_pkey"]
    }

    fn stream_types(&self) -> &'static [&'static str] {
        &[
            "account",
            "activity",
            "contact",
            "invoice",
            "opportunity",
            "order",
            "payment",
            "ticket",
            "ticket_sla",
        ]
    }

    fn apply<'a>(&'a self, tx: &'a Tx<'_>, event: &'a RecordedEvent) -> ApplyFuture<'a> {
        match event.stream_type.as_str() {
            "account" => Box::pin(account(tx, event)),
            "contact" => Box::pin(contact(tx, event)),
            "opportunity" => Box::pin(deal(tx, event)),
            "ticket" => Box::pin(ticket(tx, event)),
            "ticket_sla" => Box::pin(sla(tx, event)),
            "activity" => Box::pin(activity(tx, event)),
            "order" => Box::pin(order(tx, event)),
            "invoice" => Box::pin(invoice(tx, event)),
            "payment" => Box::pin(payment(tx, event)),
            _ => Box::pin(std::future::ready(Ok(()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeline_time_is_rounded_to_the_microsecond_as_postgresql_reads_it() {
        let time = |text: &str| timeline_time(text.parse().unwrap());
        let exact = |text: &str| -> std::time::SystemTime {
            let at: jiff::Timestamp = text.parse().unwrap();
            at.into()
        };
        assert_eq!(
            time("2026-11-16T01:00:00.123456789Z"),
            exact("2026-11-16T01:00:00.123457Z")
        );
        assert_eq!(
            time("2026-11-16T01:00:00.123456499Z"),
            exact("2026-11-16T01:00:00.123456Z")
        );
        assert_eq!(time("2026-11-16T01:00:00Z"), exact("2026-11-16T01:00:00Z"));
    }

    fn amount(amount_minor: i64, currency: &str) -> Money {
        Money {
            amount_minor,
            currency: currency.into(),
        }
    }

    #[test]
    fn amounts_read_in_their_currency_digits() {
        assert_eq!(money(&amount(113_000, "CNY")), "1130.00 CNY");
        assert_eq!(money(&amount(5, "EUR")), "0.05 EUR");
        assert_eq!(money(&amount(-250, "EUR")), "-2.50 EUR");
        assert_eq!(money(&amount(1500, "JPY")), "1500 JPY");
        assert_eq!(money(&amount(1_234, "KWD")), "1.234 KWD");
    }

    #[test]
    fn updates_name_the_fields_not_their_values() {
        let changes = ContactChanges {
            name: Some(crm_domain::common::Change {
                old: Default::default(),
                new: Default::default(),
            }),
            title: Some(crm_domain::common::Change {
                old: "CFO".into(),
                new: "CEO".into(),
            }),
            ..Default::default()
        };
        assert_eq!(contact_changes(&changes), "details updated: name, title");
    }
}
