//! `crm.v1.Customer360`: one account's whole picture (DOMAIN.md §5.4) and
//! its timeline, from the `customer_360` read model joined at query time
//! with the sales (`pipeline_board`), service (`service_queue`,
//! `sla_clock`, `service_metrics`), `analytics` and `engagement` read
//! models. No query reads the event log.
//!
//! Who belongs to an account is resolved here, not stored: the account and
//! the accounts merged into it; the contacts linked to any of them (a merged
//! contact as its survivor) and the contacts merged into those; and every
//! deal, ticket, order, invoice, payment, activity and SLA tracker whose
//! `c360_about` names one of them. A link made later, or a merge, therefore
//! changes what an account shows without rewriting a row.
//!
//! Personal fields are decrypted here with each person's key
//! ([`PersonalReader`]); people the read model knows to be erased are never
//! opened, so their names read as empty strings, and so do the subjects of
//! the tickets they requested.
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use crm_domain::Violations;
use crm_domain::account::{Account, AccountKind};
use crm_domain::common::Lifecycle;
use crm_domain::contact::Contact;
use crm_event_store::EventStore;
use crm_projections::{
    ANALYTICS, CUSTOMER_360, ENGAGEMENT, PIPELINE_BOARD, SERVICE_METRICS, SERVICE_QUEUE, SLA_CLOCK,
    TIMELINE_KINDS,
};
use crm_proto::v1::customer360_server::Customer360;
use crm_proto::v1::{
    AccountProfile, AccountValue, Balance, ChurnRisk, ConsentDecision, ContactPreferences,
    CsatSummary, CustomerContact, CustomerInvoice, CustomerOrder, CustomerPayment, CustomerView,
    EmailAddress, GetCustomer360Request, ListTimelineReply, ListTimelineRequest, Money, NpsAnswer,
    NpsSummary, OpenDeal, OpenTicket, PersonName, PhoneNumber, Purchases, RfmScore, SlaClock,
    TimelineEntry, Touch, WonDeals,
};
use deadpool_postgres::Object;
use jiff::Timestamp;
use tokio_postgres::Row;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::personal_reader::{Keys, PersonalReader};
use super::{bad_token, count, page, page_size, ready_all, unavailable};
use crate::command::{Caller, ServiceError};

/// Items per list of a 360 when the request names no limit, and the most.
const DEFAULT_LIMIT: u32 = 20;
const MAX_LIMIT: u32 = 100;

/// Every read model a 360 reads.
const VIEW_MODELS: [&str; 7] = [
    CUSTOMER_360,
    PIPELINE_BOARD,
    SERVICE_QUEUE,
    SLA_CLOCK,
    SERVICE_METRICS,
    ANALYTICS,
    ENGAGEMENT,
];

/// Why `quality` is unset.
const QUALITY_NOTE: &str = "not computed yet: the data-quality read models (DOMAIN.md §5.5) \
     do not feed the 360";

#[derive(Clone)]
pub struct Customer360Service {
    pool: super::ReadModels,
    wait: Duration,
    personal: PersonalReader,
}

impl Customer360Service {
    pub fn new(pool: super::ReadModels, store: EventStore, wait: Duration) -> Self {
        Self {
            pool,
            wait,
            personal: PersonalReader::new(store),
        }
    }
}

fn rfc3339(time: SystemTime) -> String {
    Timestamp::try_from(time)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn time_at(row: &Row, i: usize) -> String {
    row.get::<_, Option<SystemTime>>(i)
        .map(rfc3339)
        .unwrap_or_default()
}

fn text_at(row: &Row, i: usize) -> String {
    row.get::<_, Option<String>>(i).unwrap_or_default()
}

fn money(amount_minor: i64, currency: &str) -> Option<Money> {
    Some(Money {
        amount_minor,
        currency: currency.to_owned(),
    })
}

fn total(rows: &[Row], column: usize) -> u32 {
    rows.first().map_or(0, |row| {
        u32::try_from(count(row, column)).unwrap_or(u32::MAX)
    })
}

/// The account a request names, and who belongs to it.
struct Scope {
    /// The account shown (the survivor of a merge).
    account_id: Uuid,
    /// The merged account the request named, if it named one.
    redirected_from: Option<Uuid>,
    /// The account and the accounts merged into it.
    accounts: Vec<Uuid>,
    /// Linked contacts (survivors), in the order the 360 lists them, with
    /// their link's role and primary flag and the contacts merged into them.
    contacts: Vec<LinkedContact>,
    /// The accounts, the linked contacts and every contact merged into them:
    /// the records whose children belong to the account.
    records: Vec<Uuid>,
}

struct LinkedContact {
    contact_id: Uuid,
    role: String,
    primary: bool,
    merged_from: Vec<Uuid>,
}

/// Resolves `requested` (following merges) and gathers who belongs to it.
/// NOT_FOUND for no account of the tenant.
async fn scope(client: &Object, tenant: &str, requested: Uuid) -> Result<Scope, Status> {
    let row = client
        .query_opt(
            "SELECT a.merged_into, al.survivor_id FROM c360_accounts a \
             LEFT JOIN c360_aliases al ON al.tenant_id = a.tenant_id AND al.loser_id = a.account_id \
             WHERE a.tenant_id = $1 AND a.account_id = $2",
            &[&tenant, &requested],
        )
        .await
        .map_err(unavailable)?
        .ok_or_else(|| Status::not_found(format!("no account {requested}")))?;
    let merged_into: Option<Uuid> = row.get(0);
    let survivor: Option<Uuid> = row.get(1);
    let (account_id, redirected_from) = match merged_into {
        Some(direct) => (survivor.unwrap_or(direct), Some(requested)),
        None => (requested, None),
    };
    let losers = client
        .query(
            "SELECT loser_id FROM c360_aliases WHERE tenant_id = $1 AND survivor_id = $2 \
             AND stream_type = 'account' ORDER BY loser_id",
            &[&tenant, &account_id],
        )
        .await
        .map_err(unavailable)?;
    let mut accounts = vec![account_id];
    accounts.extend(losers.iter().map(|row| row.get::<_, Uuid>(0)));
    let rows = client
        .query(
            "WITH linked AS ( \
               SELECT COALESCE(al.survivor_id, l.contact_id) AS contact_id, l.role, l.is_primary \
               FROM c360_contact_links l LEFT JOIN c360_aliases al \
                 ON al.tenant_id = l.tenant_id AND al.loser_id = l.contact_id \
               WHERE l.tenant_id = $1 AND l.account_id = ANY($2)), \
             grouped AS (SELECT contact_id, bool_or(is_primary) AS is_primary, \
               (array_agg(role ORDER BY is_primary DESC, role DESC))[1] AS role \
               FROM linked GROUP BY contact_id) \
             SELECT g.contact_id, g.role, g.is_primary, \
               ARRAY(SELECT a.loser_id FROM c360_aliases a WHERE a.tenant_id = $1 \
                     AND a.survivor_id = g.contact_id ORDER BY a.loser_id) \
             FROM grouped g JOIN c360_contacts c ON c.tenant_id = $1 AND c.contact_id = g.contact_id \
             ORDER BY g.is_primary DESC, c.created_at NULLS LAST, g.contact_id",
            &[&tenant, &accounts],
        )
        .await
        .map_err(unavailable)?;
    let contacts: Vec<LinkedContact> = rows
        .iter()
        .map(|row| LinkedContact {
            contact_id: row.get(0),
            role: row.get(1),
            primary: row.get(2),
            merged_from: row.get(3),
        })
        .collect();
    let mut records = accounts.clone();
    for contact in &contacts {
        records.push(contact.contact_id);
        records.extend(&contact.merged_from);
    }
    Ok(Scope {
        account_id,
        redirected_from,
        accounts,
        contacts,
        records,
    })
}

/// The account's stored row: its state and the instants the 360 shows.
struct AccountRow {
    state: serde_json::Value,
    kind_person: bool,
    erased: bool,
    created_at: String,
    customer_since: String,
    churned_at: String,
    churn_risk_at: String,
    churn_risk_days: u32,
}

async fn account_row(client: &Object, tenant: &str, account: Uuid) -> Result<AccountRow, Status> {
    let row = client
        .query_opt(
            "SELECT state, erased, created_at, customer_since, churned_at, churn_risk_at, \
               churn_risk_days FROM c360_accounts WHERE tenant_id = $1 AND account_id = $2",
            &[&tenant, &account],
        )
        .await
        .map_err(unavailable)?
        .ok_or_else(|| Status::not_found(format!("no account {account}")))?;
    let state: serde_json::Value = row.get(0);
    Ok(AccountRow {
        kind_person: state.get("kind").and_then(|k| k.as_str()) == Some("person"),
        state,
        erased: row.get(1),
        created_at: time_at(&row, 2),
        customer_since: time_at(&row, 3),
        churned_at: time_at(&row, 4),
        churn_risk_at: time_at(&row, 5),
        churn_risk_days: row
            .get::<_, Option<i32>>(6)
            .map_or(0, |d| u32::try_from(d).unwrap_or(0)),
    })
}

fn stored_state<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, Status> {
    serde_json::from_value(value).map_err(|e| {
        tracing::error!(error = %e, "a customer_360 row does not decode");
        Status::internal("internal error")
    })
}

fn profile(account: &Account, row: &AccountRow) -> AccountProfile {
    AccountProfile {
        kind: match account.kind {
            AccountKind::Company => "company".into(),
            AccountKind::Person => "person".into(),
        },
        name: account.name.clone(),
        status: account.status.name().into(),
        archived: account.lifecycle == Lifecycle::Archived,
        domains: account.domains.clone(),
        industry: account.industry.clone(),
        tax_id: account.tax_id.clone(),
        segment: account.segment.clone(),
        parent_id: account.parent_id.map(|p| p.to_string()).unwrap_or_default(),
        owner: account.meta.owner.clone().unwrap_or_default(),
        team: account.meta.team.clone().unwrap_or_default(),
        created_at: row.created_at.clone(),
        customer_since: row.customer_since.clone(),
        churned_at: if account.status == crm_domain::account::AccountStatus::Churned {
            row.churned_at.clone()
        } else {
            String::new()
        },
        erased: account.erased,
    }
}

fn contact_view(
    linked: &LinkedContact,
    contact: Contact,
    nps: Option<NpsAnswer>,
) -> CustomerContact {
    CustomerContact {
        contact_id: linked.contact_id.to_string(),
        name: Some(PersonName {
            given: contact.name.given,
            family: contact.name.family,
        }),
        emails: contact
            .emails
            .into_iter()
            .map(|e| EmailAddress {
                address: e.address,
                primary: e.primary,
            })
            .collect(),
        phones: contact
            .phones
            .into_iter()
            .map(|p| PhoneNumber {
                number: p.number,
                kind: p.kind,
            })
            .collect(),
        title: contact.title,
        role: linked.role.clone(),
        primary: linked.primary,
        preferences: Some(ContactPreferences {
            channel: contact.preferences.channel,
            language: contact.preferences.language,
            time_zone: contact.preferences.time_zone,
            do_not_contact: contact.preferences.do_not_contact,
        }),
        consent: contact
            .consent
            .into_iter()
            .map(|(purpose, decision)| ConsentDecision {
                purpose,
                granted: decision.granted,
                source: decision.source,
                basis: decision.basis,
                decided_at: decision.decided_at.to_string(),
            })
            .collect(),
        latest_nps: nps,
        archived: contact.lifecycle == Lifecycle::Archived,
        erased: contact.erased,
        merged_from: linked.merged_from.iter().map(Uuid::to_string).collect(),
    }
}

/// Delivery status of an order at `today` (`YYYY-MM-DD`, UTC).
fn delivery(
    status: &str,
    cancelled: bool,
    cancel_reason: &str,
    promised: &str,
    today: &str,
) -> &'static str {
    if cancelled {
        return if cancel_reason == "returned" {
            "returned"
        } else {
            "cancelled"
        };
    }
    match status {
        "delivered" => "delivered",
        _ if !promised.is_empty() && promised < today => "late",
        "shipped" => "shipped",
        _ => "pending",
    }
}

/// The worst state of a ticket's clocks (see `OpenTicket.sla_state`).
fn sla_state(clocks: &[SlaClock]) -> &'static str {
    let open = |c: &&SlaClock| c.state != "met";
    if clocks.is_empty() {
        "none"
    } else if clocks.iter().filter(open).any(|c| c.breached) {
        "breached"
    } else if clocks.iter().any(|c| c.state == "running" && c.warned) {
        "warning"
    } else if clocks.iter().any(|c| c.state == "running") {
        "on_track"
    } else if clocks.iter().any(|c| c.state == "paused") {
        "paused"
    } else {
        "met"
    }
}

/// The subquery of the children of `$2` (records) of one stream type.
fn children(stream_type: &str) -> String {
    format!(
        "SELECT stream_id FROM c360_about WHERE tenant_id = $1 AND stream_type = '{stream_type}' \
         AND about_id = ANY($2)"
    )
}

impl Customer360Service {
    async fn purchases(
        &self,
        client: &Object,
        tenant: &str,
        accounts: &[Uuid],
        limit: i64,
        today: &str,
    ) -> Result<Purchases, Status> {
        let orders = client
            .query(
                "SELECT order_id, source, external_id, status, cancelled, cancel_reason, \
                   net_minor, gross_minor, currency, ordered_on::text, promised_delivery::text, \
                   deal_id, count(*) OVER () \
                 FROM c360_orders WHERE tenant_id = $1 AND account_id = ANY($2) \
                 ORDER BY ordered_on DESC, ordered_at DESC, order_id DESC LIMIT $3",
                &[&tenant, &accounts, &limit],
            )
            .await
            .map_err(unavailable)?;
        let invoices = client
            .query(
                "SELECT invoice_id, number, fapiao_number, issued_on::text, due_on::text, \
                   gross_minor, currency, order_ids, count(*) OVER () \
                 FROM c360_invoices WHERE tenant_id = $1 AND account_id = ANY($2) \
                 ORDER BY issued_on DESC, occurred_at DESC, invoice_id DESC LIMIT $3",
                &[&tenant, &accounts, &limit],
            )
            .await
            .map_err(unavailable)?;
        let payments = client
            .query(
                "SELECT payment_id, external_id, amount_minor, currency, refunded_minor, \
                   paid_on::text, count(*) OVER () \
                 FROM c360_payments WHERE tenant_id = $1 AND account_id = ANY($2) \
                 ORDER BY paid_on DESC, occurred_at DESC, payment_id DESC LIMIT $3",
                &[&tenant, &accounts, &limit],
            )
            .await
            .map_err(unavailable)?;
        let balances = client
            .query(
                "WITH inv AS (SELECT currency, sum(gross_minor)::bigint AS amount \
                   FROM c360_invoices WHERE tenant_id = $1 AND account_id = ANY($2) \
                   GROUP BY currency), \
                 pay AS (SELECT currency, sum(amount_minor - refunded_minor)::bigint AS amount \
                   FROM c360_payments WHERE tenant_id = $1 AND account_id = ANY($2) \
                   GROUP BY currency) \
                 SELECT cur.currency, COALESCE(inv.amount, 0), COALESCE(pay.amount, 0) \
                 FROM (SELECT currency FROM inv UNION SELECT currency FROM pay) cur \
                 LEFT JOIN inv USING (currency) LEFT JOIN pay USING (currency) ORDER BY 1",
                &[&tenant, &accounts],
            )
            .await
            .map_err(unavailable)?;
        Ok(Purchases {
            orders_total: total(&orders, 12),
            orders: orders
                .iter()
                .map(|row| {
                    let currency: String = row.get(8);
                    let status: String = row.get(3);
                    let promised = text_at(row, 10);
                    CustomerOrder {
                        order_id: row.get::<_, Uuid>(0).to_string(),
                        source: row.get(1),
                        external_id: row.get(2),
                        delivery: delivery(&status, row.get(4), row.get(5), &promised, today)
                            .to_owned(),
                        status,
                        ordered_on: row.get(9),
                        promised_delivery: promised,
                        net: money(row.get(6), &currency),
                        gross: money(row.get(7), &currency),
                        deal_id: row
                            .get::<_, Option<Uuid>>(11)
                            .map(|d| d.to_string())
                            .unwrap_or_default(),
                    }
                })
                .collect(),
            invoices_total: total(&invoices, 8),
            invoices: invoices
                .iter()
                .map(|row| CustomerInvoice {
                    invoice_id: row.get::<_, Uuid>(0).to_string(),
                    number: row.get(1),
                    fapiao_number: row.get(2),
                    issued_on: row.get(3),
                    due_on: row.get(4),
                    gross: money(row.get(5), row.get(6)),
                    order_ids: row
                        .get::<_, Vec<Uuid>>(7)
                        .iter()
                        .map(Uuid::to_string)
                        .collect(),
                })
                .collect(),
            payments_total: total(&payments, 6),
            payments: payments
                .iter()
                .map(|row| CustomerPayment {
                    payment_id: row.get::<_, Uuid>(0).to_string(),
                    external_id: row.get(1),
                    amount: money(row.get(2), row.get(3)),
                    refunded_minor: row.get(4),
                    paid_on: row.get(5),
                })
                .collect(),
            balances: balances
                .iter()
                .map(|row| {
                    let (invoiced, paid): (i64, i64) = (row.get(1), row.get(2));
                    Balance {
                        currency: row.get(0),
                        invoiced_minor: invoiced,
                        paid_minor: paid,
                        balance_minor: invoiced - paid,
                    }
                })
                .collect(),
        })
    }

    /// Open deals (a page of them, and how many) and won deals per currency.
    async fn deals(
        &self,
        client: &Object,
        tenant: &str,
        accounts: &[Uuid],
        limit: i64,
    ) -> Result<(Vec<OpenDeal>, u32, Vec<WonDeals>), Status> {
        let deals = children("opportunity");
        let open = client
            .query(
                &format!(
                    "SELECT deal_id, name, stage, amount_minor, currency, probability_bp, \
                       weighted_minor, category, close_date::text, owner, \
                       COALESCE(stalled, (state->>'stalled')::boolean, false), count(*) OVER () \
                     FROM pipeline_board WHERE tenant_id = $1 AND outcome = 'open' \
                       AND NOT archived AND deal_id IN ({deals}) \
                     ORDER BY close_date NULLS LAST, deal_id LIMIT $3"
                ),
                &[&tenant, &accounts, &limit],
            )
            .await
            .map_err(unavailable)?;
        let won = client
            .query(
                &format!(
                    "SELECT currency, count(*), COALESCE(sum(amount_minor), 0)::bigint \
                     FROM pipeline_board WHERE tenant_id = $1 AND outcome = 'won' \
                       AND deal_id IN ({deals}) GROUP BY currency ORDER BY currency"
                ),
                &[&tenant, &accounts],
            )
            .await
            .map_err(unavailable)?;
        let open_deals = open
            .iter()
            .map(|row| {
                let currency = text_at(row, 4);
                OpenDeal {
                    deal_id: row.get::<_, Uuid>(0).to_string(),
                    name: row.get(1),
                    stage: row.get(2),
                    amount: row
                        .get::<_, Option<i64>>(3)
                        .and_then(|a| money(a, &currency)),
                    probability_bp: u32::try_from(row.get::<_, i32>(5)).unwrap_or(0),
                    weighted_minor: row.get::<_, Option<i64>>(6).unwrap_or(0),
                    category: text_at(row, 7),
                    close_date: text_at(row, 8),
                    owner: row.get(9),
                    stalled: row.get(10),
                }
            })
            .collect();
        let won_deals = won
            .iter()
            .map(|row| WonDeals {
                currency: text_at(row, 0),
                deals: count(row, 1),
                amount_minor: row.get(2),
            })
            .collect();
        Ok((open_deals, total(&open, 11), won_deals))
    }

    /// Open tickets with their SLA clocks (a page of them, and how many).
    async fn tickets(
        &self,
        client: &Object,
        caller: &Caller,
        records: &[Uuid],
        limit: i64,
    ) -> Result<(Vec<OpenTicket>, u32), Status> {
        let tenant = caller.tenant.as_str();
        let rows = client
            .query(
                &format!(
                    "SELECT q.ticket_id, t.subject, t.requester_id, COALESCE(r.erased, false), \
                       q.status, q.priority, q.ticket_type, q.queue, q.assignee, q.opened_at, \
                       q.escalation_level, count(*) OVER () \
                     FROM service_queue q \
                     JOIN c360_tickets t ON t.tenant_id = q.tenant_id AND t.ticket_id = q.ticket_id \
                     LEFT JOIN c360_contacts r ON r.tenant_id = t.tenant_id \
                       AND r.contact_id = t.requester_id \
                     WHERE q.tenant_id = $1 AND q.status NOT IN ('solved', 'closed') \
                       AND q.ticket_id IN ({}) \
                     ORDER BY q.priority_rank, q.opened_at, q.ticket_id LIMIT $3",
                    children("ticket")
                ),
                &[&tenant, &records, &limit],
            )
            .await
            .map_err(unavailable)?;
        let ids: Vec<Uuid> = rows.iter().map(|row| row.get(0)).collect();
        let clock_rows = client
            .query(
                &format!(
                    "SELECT {CLOCK_COLUMNS} FROM sla_clock WHERE tenant_id = $1 AND ticket_id = ANY($2) \
                 ORDER BY ticket_id, CASE metric WHEN 'first_response' THEN 0 \
                   WHEN 'next_response' THEN 1 ELSE 2 END",
                    CLOCK_COLUMNS = super::service::CLOCK_COLUMNS
                ),
                &[&tenant, &ids],
            )
            .await
            .map_err(unavailable)?;
        let mut clocks: HashMap<Uuid, Vec<SlaClock>> = HashMap::new();
        for row in &clock_rows {
            clocks
                .entry(row.get(0))
                .or_default()
                .push(super::service::clock(row));
        }
        let requesters = rows
            .iter()
            .map(|row| (row.get::<_, Uuid>(2), row.get::<_, bool>(3)));
        let keys = self.personal.keys(&caller.tenant, requesters).await?;
        let tickets = rows
            .iter()
            .map(|row| {
                let ticket_id: Uuid = row.get(0);
                let requester: Uuid = row.get(2);
                let erased: bool = row.get(3);
                let sla = clocks.remove(&ticket_id).unwrap_or_default();
                OpenTicket {
                    ticket_id: ticket_id.to_string(),
                    // Free text about an erased requester reads as empty.
                    subject: if erased {
                        String::new()
                    } else {
                        keys.open_text(requester, row.get(1))
                    },
                    requester_id: requester.to_string(),
                    status: row.get(4),
                    priority: row.get(5),
                    ticket_type: row.get(6),
                    queue: row.get(7),
                    assignee: row.get(8),
                    opened_at: time_at(row, 9),
                    escalation_level: u32::try_from(row.get::<_, i16>(10)).unwrap_or(0),
                    sla_state: sla_state(&sla).to_owned(),
                    sla,
                }
            })
            .collect();
        Ok((tickets, total(&rows, 11)))
    }

    /// The latest touches and when the newest was.
    async fn touches(
        &self,
        client: &Object,
        tenant: &str,
        records: &[Uuid],
        limit: i64,
    ) -> Result<(Vec<Touch>, String), Status> {
        let rows = client
            .query(
                &format!(
                    "SELECT activity_id, kind, direction, outcome, touched_at FROM c360_touches \
                     WHERE tenant_id = $1 AND touched_at IS NOT NULL AND activity_id IN ({}) \
                     ORDER BY touched_at DESC, activity_id DESC LIMIT $3",
                    children("activity")
                ),
                &[&tenant, &records, &limit],
            )
            .await
            .map_err(unavailable)?;
        let last = rows.first().map(|row| time_at(row, 4)).unwrap_or_default();
        let touches = rows
            .iter()
            .map(|row| Touch {
                activity_id: row.get::<_, Uuid>(0).to_string(),
                kind: row.get(1),
                direction: row.get(2),
                outcome: row.get(3),
                touched_at: time_at(row, 4),
            })
            .collect();
        Ok((touches, last))
    }

    /// Each contact's latest NPS answer (merged contacts' answers counted
    /// as their survivor's), by survivor.
    async fn nps(
        &self,
        client: &Object,
        tenant: &str,
        records: &[Uuid],
    ) -> Result<HashMap<Uuid, NpsAnswer>, Status> {
        let rows = client
            .query(
                "SELECT DISTINCT ON (who) who, score, answered_at FROM ( \
                   SELECT COALESCE(al.survivor_id, n.contact_id) AS who, n.score, n.answered_at, \
                     n.position \
                   FROM an_nps n LEFT JOIN c360_aliases al \
                     ON al.tenant_id = n.tenant_id AND al.loser_id = n.contact_id \
                   WHERE n.tenant_id = $1 AND n.contact_id = ANY($2)) x \
                 ORDER BY who, answered_at DESC, position DESC",
                &[&tenant, &records],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows
            .iter()
            .map(|row| {
                (
                    row.get(0),
                    NpsAnswer {
                        score: u32::try_from(row.get::<_, i16>(1)).unwrap_or(0),
                        answered_at: time_at(row, 2),
                    },
                )
            })
            .collect())
    }

    async fn csat(
        &self,
        client: &Object,
        tenant: &str,
        records: &[Uuid],
    ) -> Result<CsatSummary, Status> {
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), count(*) FILTER (WHERE csat_score >= 4), \
                       (array_agg(csat_score ORDER BY csat_at DESC, ticket_id DESC))[1], \
                       max(csat_at) \
                     FROM service_metrics WHERE tenant_id = $1 AND csat_score IS NOT NULL \
                       AND ticket_id IN ({})",
                    children("ticket")
                ),
                &[&tenant, &records],
            )
            .await
            .map_err(unavailable)?;
        let (ratings, satisfied) = (count(&row, 0), count(&row, 1));
        Ok(CsatSummary {
            ratings,
            satisfied,
            csat_bp: (ratings > 0)
                .then(|| u32::try_from(satisfied * 10_000 / ratings).unwrap_or(0)),
            latest_score: row
                .get::<_, Option<i16>>(2)
                .map(|s| u32::try_from(s).unwrap_or(0)),
            latest_at: time_at(&row, 3),
        })
    }

    /// Historical CLV per currency (as `GetCustomerValue`, merged accounts
    /// included).
    async fn clv(
        &self,
        client: &Object,
        tenant: &str,
        accounts: &[Uuid],
    ) -> Result<Vec<AccountValue>, Status> {
        let rows = client
            .query(
                "WITH o AS (SELECT currency, sum(net_minor)::bigint AS net, count(*) AS orders, \
                     bool_and(cost_minor IS NOT NULL) AS costed, \
                     COALESCE(sum(cost_minor), 0)::bigint AS cost \
                   FROM an_orders WHERE tenant_id = $1 AND account_id = ANY($2) AND paid \
                     AND NOT cancelled GROUP BY currency), \
                 r AS (SELECT currency, sum(amount_minor)::bigint AS refunded FROM an_refunds \
                   WHERE tenant_id = $1 AND account_id = ANY($2) GROUP BY currency) \
                 SELECT cur.currency, COALESCE(o.net, 0) - COALESCE(r.refunded, 0), \
                   COALESCE(o.orders, 0), COALESCE(o.costed, true), COALESCE(o.cost, 0) \
                 FROM (SELECT currency FROM o UNION SELECT currency FROM r) cur \
                 LEFT JOIN o USING (currency) LEFT JOIN r USING (currency) ORDER BY 1",
                &[&tenant, &accounts],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows
            .iter()
            .map(|row| {
                let net: i64 = row.get(1);
                let costed: bool = row.get(3);
                let margin = costed.then(|| net.saturating_sub(row.get::<_, i64>(4)));
                AccountValue {
                    currency: row.get(0),
                    net_revenue_minor: net,
                    margin_minor: margin,
                    paid_orders: count(row, 2),
                    historical_clv_minor: margin.unwrap_or(net),
                }
            })
            .collect())
    }

    /// The account's RFM score among the tenant's buyers of the 365 days
    /// before `as_of` (as `GetRfm`; merged accounts count as their
    /// survivor).
    async fn rfm(
        &self,
        client: &Object,
        tenant: &str,
        account: Uuid,
        as_of: Timestamp,
    ) -> Result<Option<RfmScore>, Status> {
        let from: SystemTime = (as_of - jiff::SignedDuration::from_hours(24 * 365)).into();
        let as_of: SystemTime = as_of.into();
        let row = client
            .query_opt(
                &format!(
                    "WITH orders AS ( \
                       SELECT COALESCE(al.survivor_id, o.account_id) AS account_id, o.currency, \
                         o.ordered_at, o.net_minor \
                       FROM an_orders o LEFT JOIN c360_aliases al \
                         ON al.tenant_id = o.tenant_id AND al.loser_id = o.account_id \
                       WHERE o.tenant_id = $1 AND o.paid AND NOT o.cancelled \
                         AND o.account_id IS NOT NULL AND o.ordered_at >= $2 \
                         AND o.ordered_at < $3), \
                     refunds AS ( \
                       SELECT COALESCE(al.survivor_id, r.account_id) AS account_id, r.currency, \
                         r.amount_minor \
                       FROM an_refunds r LEFT JOIN c360_aliases al \
                         ON al.tenant_id = r.tenant_id AND al.loser_id = r.account_id \
                       WHERE r.tenant_id = $1 AND r.account_id IS NOT NULL \
                         AND r.refunded_at >= $2 AND r.refunded_at < $3), {} \
                     SELECT {} FROM segmented WHERE account_id = $4",
                    super::analytics::RFM_SEGMENTED,
                    super::analytics::RFM_COLUMNS
                ),
                &[&tenant, &from, &as_of, &account],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.as_ref().map(super::analytics::rfm_score))
    }

    /// Churn risk as the scheduler's rule sees it (`engagement`).
    async fn churn_risk(
        &self,
        client: &Object,
        tenant: &str,
        scope: &Scope,
        row: &AccountRow,
        as_of: Timestamp,
    ) -> Result<ChurnRisk, Status> {
        let engagement = client
            .query_one(
                "SELECT COALESCE(bool_or(customer AND at_risk) FILTER (WHERE account_id = $2), \
                   false), max(last_touch_at), max(last_paid_order_at) \
                 FROM eng_accounts WHERE tenant_id = $1 AND account_id = ANY($3)",
                &[&tenant, &scope.account_id, &scope.accounts],
            )
            .await
            .map_err(unavailable)?;
        let flagged: bool = engagement.get(0);
        let last_touch: Option<SystemTime> = engagement.get(1);
        let last_paid: Option<SystemTime> = engagement.get(2);
        let as_of: SystemTime = as_of.into();
        let days_inactive = last_touch.max(last_paid).map(|last| {
            as_of.duration_since(last).map_or(0, |d| {
                u32::try_from(d.as_secs() / 86_400).unwrap_or(u32::MAX)
            })
        });
        Ok(ChurnRisk {
            flagged,
            flagged_at: row.churn_risk_at.clone(),
            flagged_days_inactive: row.churn_risk_days,
            last_touch_at: last_touch.map(rfc3339).unwrap_or_default(),
            last_paid_order_at: last_paid.map(rfc3339).unwrap_or_default(),
            days_inactive,
        })
    }
}

/// The keyset a timeline page starts after: (occurred at in microseconds,
/// position), written as `micros.position`.
fn timeline_token(token: &str) -> Result<(i64, i64), ServiceError> {
    if token.is_empty() {
        return Ok((i64::MAX, i64::MAX));
    }
    let (micros, position) = token.split_once('.').ok_or_else(bad_token)?;
    match (micros.parse(), position.parse()) {
        (Ok(micros), Ok(position)) => Ok((micros, position)),
        _ => Err(bad_token()),
    }
}

#[tonic::async_trait]
impl Customer360 for Customer360Service {
    async fn get_customer360(
        &self,
        request: Request<GetCustomer360Request>,
    ) -> Result<Response<CustomerView>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let mut v = Violations::default();
        let requested = Uuid::parse_str(&request.account_id).ok();
        v.check(requested.is_some(), "account_id", "must be a UUID");
        let as_of = if request.as_of.is_empty() {
            Some(Timestamp::now())
        } else {
            request
                .as_of
                .parse::<Timestamp>()
                .ok()
                .filter(|at| super::queryable(*at))
        };
        v.check(
            as_of.is_some(),
            "as_of",
            "must be an RFC 3339 instant from the year 1900 on",
        );
        v.check(request.limit <= MAX_LIMIT, "limit", "must be 0 to 100");
        v.into_result().map_err(ServiceError::from)?;
        let (Some(requested), Some(as_of)) = (requested, as_of) else {
            return Err(ServiceError::invalid("account_id", "must be a UUID").into());
        };
        let limit = i64::from(if request.limit == 0 {
            DEFAULT_LIMIT
        } else {
            request.limit
        });
        let (client, position) =
            ready_all(&self.pool, &VIEW_MODELS, request.options, self.wait).await?;
        let tenant = caller.tenant.as_str();
        let scope = scope(&client, tenant, requested).await?;
        let row = account_row(&client, tenant, scope.account_id).await?;

        // The people shown: the account (a person account), the first
        // `limit` contacts; erased ones are never opened.
        let shown: Vec<&LinkedContact> = scope.contacts.iter().take(limit as usize).collect();
        let shown_ids: Vec<Uuid> = shown.iter().map(|c| c.contact_id).collect();
        let contact_rows = client
            .query(
                "SELECT contact_id, state, erased FROM c360_contacts \
                 WHERE tenant_id = $1 AND contact_id = ANY($2)",
                &[&tenant, &shown_ids],
            )
            .await
            .map_err(unavailable)?;
        let mut subjects: Vec<(Uuid, bool)> = contact_rows
            .iter()
            .map(|r| (r.get::<_, Uuid>(0), r.get::<_, bool>(2)))
            .collect();
        if row.kind_person {
            subjects.push((scope.account_id, row.erased));
        }
        let keys: Keys = self.personal.keys(&caller.tenant, subjects).await?;
        let account: Account = stored_state(keys.open(scope.account_id, row.state.clone()))?;
        let mut states: HashMap<Uuid, Contact> = HashMap::new();
        for contact_row in &contact_rows {
            let id: Uuid = contact_row.get(0);
            states.insert(id, stored_state(keys.open(id, contact_row.get(1)))?);
        }
        let latest_nps = self.nps(&client, tenant, &scope.records).await?;
        let contacts = shown
            .iter()
            .filter_map(|linked| {
                let state = states.remove(&linked.contact_id)?;
                Some(contact_view(
                    linked,
                    state,
                    latest_nps.get(&linked.contact_id).cloned(),
                ))
            })
            .collect();
        let (responses, promoters, detractors) =
            latest_nps
                .values()
                .fold((0u64, 0u64, 0u64), |(n, p, d), answer| match answer.score {
                    9..=10 => (n + 1, p + 1, d),
                    0..=6 => (n + 1, p, d + 1),
                    _ => (n + 1, p, d),
                });
        let nps = NpsSummary {
            responses,
            promoters,
            passives: responses - promoters - detractors,
            detractors,
            nps_bp: (responses > 0).then(|| {
                i32::try_from((promoters as i64 - detractors as i64) * 10_000 / responses as i64)
                    .unwrap_or(0)
            }),
        };

        let today = as_of.to_zoned(jiff::tz::TimeZone::UTC).date().to_string();
        let purchases = self
            .purchases(&client, tenant, &scope.accounts, limit, &today)
            .await?;
        let (open_deals, open_deals_total, won_deals) =
            self.deals(&client, tenant, &scope.accounts, limit).await?;
        let (open_tickets, open_tickets_total) = self
            .tickets(&client, &caller, &scope.records, limit)
            .await?;
        let (last_touches, last_touch_at) =
            self.touches(&client, tenant, &scope.records, limit).await?;
        let csat = self.csat(&client, tenant, &scope.records).await?;
        let clv = self.clv(&client, tenant, &scope.accounts).await?;
        let rfm = self.rfm(&client, tenant, scope.account_id, as_of).await?;
        let churn_risk = self
            .churn_risk(&client, tenant, &scope, &row, as_of)
            .await?;
        Ok(Response::new(CustomerView {
            account_id: scope.account_id.to_string(),
            redirected_from: scope
                .redirected_from
                .map(|id| id.to_string())
                .unwrap_or_default(),
            profile: Some(profile(&account, &row)),
            tags: account.meta.tags.iter().cloned().collect(),
            contacts,
            contacts_total: u32::try_from(scope.contacts.len()).unwrap_or(u32::MAX),
            purchases: Some(purchases),
            open_deals,
            open_deals_total,
            won_deals,
            open_tickets,
            open_tickets_total,
            last_touches,
            last_touch_at,
            nps: Some(nps),
            csat: Some(csat),
            clv,
            rfm,
            churn_risk: Some(churn_risk),
            quality: None,
            quality_note: QUALITY_NOTE.to_owned(),
            position,
        }))
    }

    async fn list_timeline(
        &self,
        request: Request<ListTimelineRequest>,
    ) -> Result<Response<ListTimelineReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let mut v = Violations::default();
        let requested = Uuid::parse_str(&request.account_id).ok();
        v.check(requested.is_some(), "account_id", "must be a UUID");
        v.check(
            request.kinds.len() <= TIMELINE_KINDS.len(),
            "kinds",
            "must name at most 9 kinds",
        );
        for (i, kind) in request.kinds.iter().enumerate() {
            v.check(
                TIMELINE_KINDS.contains(&kind.as_str()),
                format!("kinds[{i}]"),
                "must be account, contact, deal, ticket, sla, activity, order, invoice or payment",
            );
        }
        v.into_result().map_err(ServiceError::from)?;
        let Some(requested) = requested else {
            return Err(ServiceError::invalid("account_id", "must be a UUID").into());
        };
        let size = page_size(request.page_size)?;
        let (micros, after) = timeline_token(&request.page_token)?;
        let (client, position) =
            ready_all(&self.pool, &[CUSTOMER_360], request.options, self.wait).await?;
        let tenant = caller.tenant.as_str();
        let scope = scope(&client, tenant, requested).await?;
        // The records' own streams and those the about table names, each
        // read by the stream index (an OR of the two would read every row
        // of the tenant).
        let rows = client
            .query(
                "SELECT position, occurred_at, kind, event_type, summary, stream_type, stream_id, \
                   (EXTRACT(EPOCH FROM occurred_at) * 1000000)::bigint \
                 FROM c360_timeline \
                 WHERE tenant_id = $1 \
                   AND stream_id IN (SELECT unnest($2::uuid[]) UNION SELECT stream_id \
                        FROM c360_about WHERE tenant_id = $1 AND about_id = ANY($2)) \
                   AND (cardinality($3::text[]) = 0 OR kind = ANY($3)) \
                   AND ((EXTRACT(EPOCH FROM occurred_at) * 1000000)::bigint, position) < ($4, $5) \
                 ORDER BY occurred_at DESC, position DESC LIMIT $6",
                &[
                    &tenant,
                    &scope.records,
                    &request.kinds,
                    &micros,
                    &after,
                    &i64::from(size + 1),
                ],
            )
            .await
            .map_err(unavailable)?;
        let (rows, next_page_token) = page(&rows, size, |last| {
            format!("{}.{}", last.get::<_, i64>(7), last.get::<_, i64>(0))
        });
        Ok(Response::new(ListTimelineReply {
            account_id: scope.account_id.to_string(),
            redirected_from: scope
                .redirected_from
                .map(|id| id.to_string())
                .unwrap_or_default(),
            entries: rows
                .iter()
                .map(|row| TimelineEntry {
                    position: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
                    occurred_at: time_at(row, 1),
                    kind: row.get(2),
                    event_type: row.get(3),
                    summary: row.get(4),
                    stream_type: row.get(5),
                    stream_id: row.get::<_, Uuid>(6).to_string(),
                })
                .collect(),
            next_page_token,
            position,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_follows_cancellation_status_and_promise() {
        let today = "2026-11-20";
        assert_eq!(delivery("shipped", true, "returned", "", today), "returned");
        assert_eq!(delivery("paid", true, "cancelled", "", today), "cancelled");
        assert_eq!(
            delivery("delivered", false, "", "2026-11-01", today),
            "delivered"
        );
        assert_eq!(delivery("shipped", false, "", "2026-11-19", today), "late");
        assert_eq!(
            delivery("shipped", false, "", "2026-11-20", today),
            "shipped"
        );
        assert_eq!(delivery("paid", false, "", "", today), "pending");
    }

    #[test]
    fn the_worst_clock_names_the_sla_state() {
        let clock = |state: &str, warned: bool, breached: bool| SlaClock {
            state: state.into(),
            warned,
            breached,
            ..Default::default()
        };
        assert_eq!(sla_state(&[]), "none");
        assert_eq!(
            sla_state(&[clock("met", true, true), clock("running", false, false)]),
            "on_track",
            "a target met late is history"
        );
        assert_eq!(
            sla_state(&[clock("running", true, false), clock("paused", false, true)]),
            "breached"
        );
        assert_eq!(sla_state(&[clock("running", true, false)]), "warning");
        assert_eq!(sla_state(&[clock("paused", false, false)]), "paused");
        assert_eq!(sla_state(&[clock("met", false, false)]), "met");
    }

    #[test]
    fn timeline_tokens_round_trip_and_reject_others() {
        assert_eq!(timeline_token("").unwrap(), (i64::MAX, i64::MAX));
        assert_eq!(
            timeline_token("1700000000000000.42").unwrap(),
            (1_700_000_000_000_000, 42)
        );
        assert!(timeline_token("x.1").is_err());
        assert!(timeline_token("12").is_err());
    }
}
