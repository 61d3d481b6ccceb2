//! `analytics`: the facts the analytics formulas of DOMAIN.md §5.3 are
//! computed from, one small table per kind of fact, each row keyed by what
//! it is about and stamped with its business time (`occurred_at`):
//!
//! - `an_customer_spells`: each period an account was a customer (from
//!   `AccountBecameCustomer` to `AccountChurned`), for churn, retention
//!   cohorts and lead-to-customer conversion;
//! - `an_orders`, `an_payments`, `an_refunds`: net revenue (net of tax,
//!   cancellations and refunds), cost when known, for AOV, frequency, repeat
//!   purchase, CLV and RFM;
//! - `an_nps`: every NPS answer (the latest per contact counts);
//! - `an_leads`, `an_deals`, `an_campaigns`, `an_campaign_costs`,
//!   `an_touches`: lead capture and conversion, deals won, campaign cost and
//!   responses, for campaign ROI with first- and last-touch attribution.
//!
//! No personal value is read: only ids, amounts, scores and times.
use crate::Tx;
use crm_domain::account::{AccountEvent, AccountKind};
use crm_domain::campaign::{CampaignEvent, Member};
use crm_domain::commerce::{OrderEvent, PaymentEvent};
use crm_domain::contact::ContactEvent;
use crm_domain::lead::LeadEvent;
use crm_domain::opportunity::OpportunityEvent;
use crm_event_store::RecordedEvent;

use crate::runtime::{ApplyError, ApplyFuture, Projection};
use crate::state::decode;

pub struct Analytics;

pub const NAME: &str = "analytics";

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS an_tenant (
    tenant_id text NOT NULL PRIMARY KEY,
    time_zone text NOT NULL
);
CREATE TABLE IF NOT EXISTS an_accounts (
    tenant_id   text    NOT NULL,
    account_id  uuid    NOT NULL,
    kind        text    NOT NULL,
    segment     text    NOT NULL,
    PRIMARY KEY (tenant_id, account_id)
) WITH (fillfactor = 70);
CREATE TABLE IF NOT EXISTS an_customer_spells (
    tenant_id  text        NOT NULL,
    account_id uuid        NOT NULL,
    started_at timestamptz NOT NULL,
    trigger    text        NOT NULL,
    ended_at   timestamptz,
    PRIMARY KEY (tenant_id, account_id, started_at)
) WITH (fillfactor = 70);
CREATE TABLE IF NOT EXISTS an_orders (
    tenant_id    text        NOT NULL,
    order_id     uuid        NOT NULL,
    account_id   uuid,
    status       text        NOT NULL,
    paid         boolean     NOT NULL,
    cancelled    boolean     NOT NULL,
    net_minor    bigint      NOT NULL,
    cost_minor   bigint,
    currency     text        NOT NULL,
    ordered_at   timestamptz NOT NULL,
    deal_id      uuid,
    PRIMARY KEY (tenant_id, order_id)
) WITH (fillfactor = 70);
CREATE INDEX IF NOT EXISTS an_orders_by_account ON an_orders (tenant_id, account_id, ordered_at);
-- The ERP customer of an order recorded without an account: linking it
-- later resolves the order.
ALTER TABLE an_orders ADD COLUMN IF NOT EXISTS source text NOT NULL DEFAULT '';
ALTER TABLE an_orders ADD COLUMN IF NOT EXISTS customer_ref text NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS an_orders_unlinked ON an_orders (tenant_id, source, customer_ref)
    WHERE account_id IS NULL;
-- Which account each ERP customer is linked to: an order recorded unlinked
-- just as its customer was linked resolves on arrival.
CREATE TABLE IF NOT EXISTS an_erp_links (
    tenant_id   text NOT NULL,
    source      text NOT NULL,
    external_id text NOT NULL,
    account_id  uuid NOT NULL,
    PRIMARY KEY (tenant_id, source, external_id)
);
CREATE TABLE IF NOT EXISTS an_payments (
    tenant_id  text NOT NULL,
    payment_id uuid NOT NULL,
    account_id uuid,
    PRIMARY KEY (tenant_id, payment_id)
);
CREATE TABLE IF NOT EXISTS an_refunds (
    tenant_id   text        NOT NULL,
    payment_id  uuid        NOT NULL,
    position    bigint      NOT NULL,
    account_id  uuid,
    amount_minor bigint     NOT NULL,
    currency    text        NOT NULL,
    refunded_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, payment_id, position)
);
CREATE TABLE IF NOT EXISTS an_nps (
    tenant_id   text        NOT NULL,
    contact_id  uuid        NOT NULL,
    position    bigint      NOT NULL,
    score       smallint    NOT NULL,
    answered_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, contact_id, position)
);
CREATE TABLE IF NOT EXISTS an_leads (
    tenant_id    text        NOT NULL,
    lead_id      uuid        NOT NULL,
    captured_at  timestamptz NOT NULL,
    channel      text        NOT NULL,
    campaign_id  uuid,
    account_id   uuid,
    deal_id      uuid,
    converted_at timestamptz,
    PRIMARY KEY (tenant_id, lead_id)
) WITH (fillfactor = 70);
CREATE TABLE IF NOT EXISTS an_deals (
    tenant_id    text        NOT NULL,
    deal_id      uuid        NOT NULL,
    account_id   uuid        NOT NULL,
    contact_id   uuid,
    lead_id      uuid,
    opened_at    timestamptz NOT NULL,
    won_at       timestamptz,
    amount_minor bigint      NOT NULL,
    currency     text        NOT NULL,
    PRIMARY KEY (tenant_id, deal_id)
) WITH (fillfactor = 70);
CREATE TABLE IF NOT EXISTS an_campaigns (
    tenant_id   text NOT NULL,
    campaign_id uuid NOT NULL,
    parent_id   uuid,
    name        text NOT NULL,
    currency    text NOT NULL,
    PRIMARY KEY (tenant_id, campaign_id)
);
CREATE TABLE IF NOT EXISTS an_campaign_costs (
    tenant_id    text        NOT NULL,
    campaign_id  uuid        NOT NULL,
    position     bigint      NOT NULL,
    amount_minor bigint      NOT NULL,
    currency     text        NOT NULL,
    PRIMARY KEY (tenant_id, campaign_id, position)
);
CREATE TABLE IF NOT EXISTS an_touches (
    tenant_id    text        NOT NULL,
    campaign_id  uuid        NOT NULL,
    member_kind  text        NOT NULL,
    member_id    uuid        NOT NULL,
    position     bigint      NOT NULL,
    touched_at   timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, campaign_id, member_id, position)
);
CREATE INDEX IF NOT EXISTS an_touches_by_member ON an_touches (tenant_id, member_id, touched_at)";

type Time = std::time::SystemTime;

fn position(event: &RecordedEvent) -> i64 {
    i64::try_from(event.global_position).unwrap_or(i64::MAX)
}

async fn account(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let Some(decoded) = crate::state::decoded::<AccountEvent>(event)? else {
        return Ok(());
    };
    let (tenant, id) = (&event.tenant_id, &event.stream_id);
    match &*decoded {
        AccountEvent::Created(created) => {
            let kind = match created.kind {
                AccountKind::Person => "person",
                AccountKind::Company => "company",
            };
            tx.execute(
                "INSERT INTO an_accounts (tenant_id, account_id, kind, segment) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, account_id) DO NOTHING",
                &[tenant, id, &kind, &created.segment],
            )
            .await?;
        }
        AccountEvent::Merged(merged) => {
            crate::erp_links::resolve_orders(tx, event, &merged.changes, &LINKS).await?
        }
        AccountEvent::DetailsUpdated(updated) => {
            crate::erp_links::resolve_orders(tx, event, &updated.changes, &LINKS).await?;
            if let Some(segment) = &updated.changes.segment {
                tx.execute(
                    "UPDATE an_accounts SET segment = $3 WHERE tenant_id = $1 AND account_id = $2",
                    &[tenant, id, &segment.new],
                )
                .await?;
            }
        }
        AccountEvent::BecameCustomer(became) => {
            let at: Time = became.occurred_at.into();
            tx.execute(
                "INSERT INTO an_customer_spells (tenant_id, account_id, started_at, trigger) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, account_id, started_at) DO NOTHING",
                &[tenant, id, &at, &became.trigger],
            )
            .await?;
        }
        AccountEvent::Churned(churned) => {
            let at: Time = churned.occurred_at.into();
            tx.execute(
                "UPDATE an_customer_spells SET ended_at = $3 \
                 WHERE tenant_id = $1 AND account_id = $2 AND ended_at IS NULL",
                &[tenant, id, &at],
            )
            .await?;
        }
        _ => {}
    }
    Ok(())
}

/// This read model's ERP link statements (see [`crate::erp_links`]).
static LINKS: crate::erp_links::LinkStatements = crate::erp_links::LinkStatements {
    record: "INSERT INTO an_erp_links (tenant_id, account_id, source, external_id) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, source, external_id) \
             DO UPDATE SET account_id = EXCLUDED.account_id",
    resolve: "UPDATE an_orders SET account_id = $2 \
              WHERE tenant_id = $1 AND account_id IS NULL AND source = $3 AND customer_ref = $4",
    lookup: "SELECT account_id FROM an_erp_links \
             WHERE tenant_id = $1 AND source = $2 AND external_id = $3",
};

async fn order(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let (tenant, id) = (&event.tenant_id, &event.stream_id);
    match crate::state::decoded::<OrderEvent>(event)?.as_deref() {
        Some(OrderEvent::Recorded(order)) => {
            // Cost is known only when every line carries one.
            let cost: Option<i64> = order
                .lines
                .iter()
                .map(|line| line.line_cost.as_ref().map(|c| c.amount_minor))
                .sum();
            let ordered_at: Time = order.occurred_at.into();
            let account_id = crate::erp_links::order_account(tx, event, order, &LINKS).await?;
            tx.execute(
                "INSERT INTO an_orders (tenant_id, order_id, account_id, status, paid, cancelled, \
                   net_minor, cost_minor, currency, ordered_at, deal_id, source, customer_ref) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
                 ON CONFLICT (tenant_id, order_id) DO UPDATE SET \
                   account_id = COALESCE(EXCLUDED.account_id, an_orders.account_id), \
                   source = EXCLUDED.source, customer_ref = EXCLUDED.customer_ref, \
                   status = EXCLUDED.status, paid = an_orders.paid OR EXCLUDED.paid, \
                   net_minor = EXCLUDED.net_minor, cost_minor = EXCLUDED.cost_minor, \
                   currency = EXCLUDED.currency, deal_id = EXCLUDED.deal_id",
                &[
                    tenant,
                    id,
                    &account_id,
                    &order.status,
                    &crm_domain::commerce::PAID_STATUSES.contains(&order.status.as_str()),
                    // Not cancelled (a parameter: see `bulk::CopyIn`).
                    &false,
                    &order.totals.net.amount_minor,
                    &cost,
                    &order.totals.net.currency,
                    &ordered_at,
                    &order.deal_id,
                    &order.external.source,
                    &order.customer_ref,
                ],
            )
            .await?;
        }
        Some(OrderEvent::Cancelled(_)) => {
            tx.execute(
                "UPDATE an_orders SET cancelled = true WHERE tenant_id = $1 AND order_id = $2",
                &[tenant, id],
            )
            .await?;
        }
        None => {}
    }
    Ok(())
}

async fn payment(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let (tenant, id) = (&event.tenant_id, &event.stream_id);
    match crate::state::decoded::<PaymentEvent>(event)?.as_deref() {
        Some(PaymentEvent::Received(received)) => {
            tx.execute(
                "INSERT INTO an_payments (tenant_id, payment_id, account_id) VALUES ($1, $2, $3) \
                 ON CONFLICT (tenant_id, payment_id) DO UPDATE SET account_id = EXCLUDED.account_id",
                &[tenant, id, &received.account_id],
            )
            .await?;
        }
        Some(PaymentEvent::Refunded(refund)) => {
            let at: Time = refund.occurred_at.into();
            tx.execute(
                "INSERT INTO an_refunds (tenant_id, payment_id, position, account_id, amount_minor, \
                   currency, refunded_at) \
                 SELECT $1, $2, $3, (SELECT account_id FROM an_payments \
                                     WHERE tenant_id = $1 AND payment_id = $2), $4, $5, $6 \
                 ON CONFLICT (tenant_id, payment_id, position) DO NOTHING",
                &[
                    tenant,
                    id,
                    &position(event),
                    &refund.amount.amount_minor,
                    &refund.amount.currency,
                    &at,
                ],
            )
            .await?;
        }
        None => {}
    }
    Ok(())
}

async fn lead(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let (tenant, id) = (&event.tenant_id, &event.stream_id);
    match crate::state::decoded::<LeadEvent>(event)?.as_deref() {
        Some(LeadEvent::Captured(captured)) => {
            let at: Time = captured.occurred_at.into();
            tx.execute(
                "INSERT INTO an_leads (tenant_id, lead_id, captured_at, channel, campaign_id) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, lead_id) DO NOTHING",
                &[
                    tenant,
                    id,
                    &at,
                    &captured.source.channel,
                    &captured.source.campaign_id,
                ],
            )
            .await?;
        }
        Some(LeadEvent::Converted(converted)) => {
            let at: Time = converted.occurred_at.into();
            tx.execute(
                "UPDATE an_leads SET account_id = $3, deal_id = $4, converted_at = $5 \
                 WHERE tenant_id = $1 AND lead_id = $2",
                &[
                    tenant,
                    id,
                    &converted.account_id,
                    &converted.opportunity_id,
                    &at,
                ],
            )
            .await?;
        }
        _ => {}
    }
    Ok(())
}

async fn deal(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let (tenant, id) = (&event.tenant_id, &event.stream_id);
    match crate::state::decoded::<OpportunityEvent>(event)?.as_deref() {
        Some(OpportunityEvent::Opened(opened)) => {
            let at: Time = opened.occurred_at.into();
            tx.execute(
                "INSERT INTO an_deals (tenant_id, deal_id, account_id, contact_id, lead_id, \
                   opened_at, amount_minor, currency, won_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (tenant_id, deal_id) DO NOTHING",
                &[
                    tenant,
                    id,
                    &opened.account_id,
                    &opened.contact_id,
                    &opened.source.lead_id,
                    &at,
                    &opened.amount.amount_minor,
                    &opened.amount.currency,
                    // Not won yet (a parameter, so that a win in the same
                    // rebuild chunk can fold into this insert).
                    &None::<Time>,
                ],
            )
            .await?;
        }
        Some(OpportunityEvent::Won(won)) => {
            let at: Time = won.occurred_at.into();
            tx.execute(
                "UPDATE an_deals SET won_at = $3, amount_minor = $4, currency = $5 \
                 WHERE tenant_id = $1 AND deal_id = $2",
                &[
                    tenant,
                    id,
                    &at,
                    &won.amount.amount_minor,
                    &won.amount.currency,
                ],
            )
            .await?;
        }
        Some(OpportunityEvent::Reopened(_)) => {
            tx.execute(
                "UPDATE an_deals SET won_at = NULL WHERE tenant_id = $1 AND deal_id = $2",
                &[tenant, id],
            )
            .await?;
        }
        _ => {}
    }
    Ok(())
}

async fn campaign(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    let (tenant, id) = (&event.tenant_id, &event.stream_id);
    match crate::state::decoded::<CampaignEvent>(event)?.as_deref() {
        Some(CampaignEvent::Planned(planned)) => {
            tx.execute(
                "INSERT INTO an_campaigns (tenant_id, campaign_id, parent_id, name, currency) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, campaign_id) DO NOTHING",
                &[
                    tenant,
                    id,
                    &planned.parent_id,
                    &planned.name,
                    &planned.budget.currency,
                ],
            )
            .await?;
        }
        Some(CampaignEvent::CostRecorded(cost)) => {
            tx.execute(
                "INSERT INTO an_campaign_costs (tenant_id, campaign_id, position, amount_minor, \
                   currency) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, campaign_id, position) DO NOTHING",
                &[
                    tenant,
                    id,
                    &position(event),
                    &cost.amount.amount_minor,
                    &cost.amount.currency,
                ],
            )
            .await?;
        }
        Some(CampaignEvent::MemberResponded(responded)) => {
            let (kind, member) = match responded.member {
                Member::Contact(member) => ("contact", member),
                Member::Lead(member) => ("lead", member),
            };
            let at: Time = responded.occurred_at.into();
            tx.execute(
                "INSERT INTO an_touches (tenant_id, campaign_id, member_kind, member_id, position, \
                   touched_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, campaign_id, member_id, position) DO NOTHING",
                &[tenant, id, &kind, &member, &position(event), &at],
            )
            .await?;
        }
        _ => {}
    }
    Ok(())
}

async fn contact(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    if let Some(ContactEvent::NpsRecorded(nps)) =
        crate::state::decoded::<ContactEvent>(event)?.as_deref()
    {
        let at: Time = nps.occurred_at.into();
        tx.execute(
            "INSERT INTO an_nps (tenant_id, contact_id, position, score, answered_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, contact_id, position) DO NOTHING",
            &[
                &event.tenant_id,
                &event.stream_id,
                &position(event),
                &i16::from(nps.score),
                &at,
            ],
        )
        .await?;
    }
    Ok(())
}

/// The tenant's zone: periods are `[start, end)` in it (DOMAIN.md §5.3).
async fn settings(tx: &Tx<'_>, event: &RecordedEvent) -> Result<(), ApplyError> {
    use crm_domain::configuration::{Published, TenantSettings};
    if let Some(published) = decode::<Published<TenantSettings>>(event)? {
        tx.execute(
            "INSERT INTO an_tenant (tenant_id, time_zone) VALUES ($1, $2) \
             ON CONFLICT (tenant_id) DO UPDATE SET time_zone = EXCLUDED.time_zone",
            &[&event.tenant_id, &published.content.time_zone],
        )
        .await?;
    }
    Ok(())
}

impl Projection for Analytics {
    crate::projection_names!(
        NAME,
        SCHEMA,
        [
            "an_tenant",
            "an_accounts",
            "an_customer_spells",
            "an_orders",
            "an_erp_links",
            "an_payments",
            "an_refunds",
            "an_nps",
            "an_leads",
            "an_deals",
            "an_campaigns",
            "an_campaign_costs",
            "an_touches",
        ]
    );

    fn query_indexes(&self) -> &'static [&'static str] {
        &["an_orders_by_account", "an_touches_by_member"]
    }

    fn stream_types(&self) -> &'static [&'static str] {
        &[
            "account",
            "contact",
            "order",
            "payment",
            "lead",
            "opportunity",
            "campaign",
            "tenant_settings",
        ]
    }

    fn only_event_type(&self, stream_type: &str) -> Option<&'static str> {
        // Of a contact's events only NPS answers count here: its consumer
        // of contact events is filtered by that type.
        (stream_type == "contact").then_some("NpsResponseRecorded")
    }

    fn apply<'a>(&'a self, tx: &'a Tx<'_>, event: &'a RecordedEvent) -> ApplyFuture<'a> {
        match event.stream_type.as_str() {
            "account" => Box::pin(account(tx, event)),
            "order" => Box::pin(order(tx, event)),
            "payment" => Box::pin(payment(tx, event)),
            "lead" => Box::pin(lead(tx, event)),
            "opportunity" => Box::pin(deal(tx, event)),
            "campaign" => Box::pin(campaign(tx, event)),
            "contact" => Box::pin(contact(tx, event)),
            "tenant_settings" => Box::pin(settings(tx, event)),
            _ => Box::pin(std::future::ready(Ok(()))),
        }
    }
}
