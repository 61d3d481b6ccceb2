//! The customer lifecycle process manager (DOMAIN.md §2.2): an account
//! becomes a customer on its first won deal or paid order, and a churned
//! account that wins or pays again is reactivated — `AccountBecameCustomer`
//! with the trigger `first_won_deal`, `first_order` or `reactivation`,
//! `occurred_at` = the deal's or order's.
//!
//! Runs on the projection runtime like the SLA process manager (see
//! [`crate::process`]): its tables know each deal's account and each
//! account's status as of the event it handles.
use crm_domain::Aggregate;
use crm_domain::account::{Account, AccountCommand, AccountEvent};
use crm_domain::commerce::OrderEvent;
use crm_domain::opportunity::OpportunityEvent;
use crm_event_store::RecordedEvent;
use crm_projections::Tx;
use crm_projections::{ApplyError, Projection};
use jiff::Timestamp;
use uuid::Uuid;

use crate::command::CommandHandler;
use crate::process::{Sender, decode};

pub const NAME: &str = "customer_lifecycle";

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS lifecycle_deals (
    tenant_id  text NOT NULL,
    deal_id    uuid NOT NULL,
    account_id uuid NOT NULL,
    PRIMARY KEY (tenant_id, deal_id)
);
CREATE TABLE IF NOT EXISTS lifecycle_accounts (
    tenant_id  text NOT NULL,
    account_id uuid NOT NULL,
    status     text NOT NULL,
    PRIMARY KEY (tenant_id, account_id)
)";

pub struct CustomerLifecycle {
    sender: Sender,
}

impl CustomerLifecycle {
    pub fn new(handler: CommandHandler) -> Self {
        Self {
            sender: Sender::new(handler, "lifecycle", "system:lifecycle"),
        }
    }

    async fn status(
        tx: &Tx<'_>,
        event: &RecordedEvent,
        account_id: Uuid,
    ) -> Result<String, ApplyError> {
        Ok(tx
            .query_opt(
                "SELECT status FROM lifecycle_accounts WHERE tenant_id = $1 AND account_id = $2",
                &[&event.tenant_id, &account_id],
            )
            .await?
            .map_or_else(|| "prospect".to_owned(), |row| row.get(0)))
    }

    async fn set_status(
        tx: &Tx<'_>,
        event: &RecordedEvent,
        account_id: Uuid,
        status: &str,
    ) -> Result<(), ApplyError> {
        tx.execute(
            "INSERT INTO lifecycle_accounts (tenant_id, account_id, status) VALUES ($1, $2, $3) \
             ON CONFLICT (tenant_id, account_id) DO UPDATE SET status = EXCLUDED.status",
            &[&event.tenant_id, &account_id, &status],
        )
        .await?;
        Ok(())
    }

    /// A won deal or a paid order of `account_id` at `occurred_at`.
    async fn bought(
        &self,
        tx: &Tx<'_>,
        event: &RecordedEvent,
        account_id: Uuid,
        occurred_at: Timestamp,
        first: &str,
    ) -> Result<(), ApplyError> {
        let trigger = match Self::status(tx, event, account_id).await?.as_str() {
            "customer" => return Ok(()),
            "churned" => "reactivation",
            _ => first,
        };
        self.sender
            .send::<Account>(
                tx,
                event,
                0,
                account_id,
                occurred_at,
                AccountCommand::MarkCustomer {
                    trigger: trigger.to_owned(),
                },
            )
            .await?;
        // Known at once, so a second purchase in the same batch sends nothing.
        Self::set_status(tx, event, account_id, "customer").await
    }
}

impl Projection for CustomerLifecycle {
    crm_projections::projection_names!(NAME, SCHEMA, ["lifecycle_deals", "lifecycle_accounts"]);

    fn rebuildable(&self) -> bool {
        false
    }

    fn stream_types(&self) -> &'static [&'static str] {
        &["account", "opportunity", "order"]
    }

    fn apply<'a>(
        &'a self,
        tx: &'a Tx<'_>,
        event: &'a RecordedEvent,
    ) -> crm_projections::ApplyFuture<'a> {
        Box::pin(async move {
            match event.stream_type.as_str() {
                t if t == Account::STREAM_TYPE => match decode::<AccountEvent>(event)? {
                    Some(AccountEvent::BecameCustomer(_)) => {
                        Self::set_status(tx, event, event.stream_id, "customer").await?;
                    }
                    Some(AccountEvent::Churned(_)) => {
                        Self::set_status(tx, event, event.stream_id, "churned").await?;
                    }
                    _ => {}
                },
                t if t == <crm_domain::opportunity::Opportunity as Aggregate>::STREAM_TYPE => {
                    match decode::<OpportunityEvent>(event)? {
                        Some(OpportunityEvent::Opened(opened)) => {
                            tx.execute(
                                "INSERT INTO lifecycle_deals (tenant_id, deal_id, account_id) \
                                 VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                                &[&event.tenant_id, &event.stream_id, &opened.account_id],
                            )
                            .await?;
                        }
                        Some(OpportunityEvent::Won(won)) => {
                            let account = tx
                                .query_opt(
                                    "SELECT account_id FROM lifecycle_deals \
                                     WHERE tenant_id = $1 AND deal_id = $2",
                                    &[&event.tenant_id, &event.stream_id],
                                )
                                .await?;
                            if let Some(row) = account {
                                self.bought(
                                    tx,
                                    event,
                                    row.get(0),
                                    won.occurred_at,
                                    "first_won_deal",
                                )
                                .await?;
                            }
                        }
                        _ => {}
                    }
                }
                t if t == <crm_domain::commerce::Order as Aggregate>::STREAM_TYPE => {
                    if let Some(OrderEvent::Recorded(order)) = decode::<OrderEvent>(event)?
                        && crm_domain::commerce::PAID_STATUSES.contains(&order.status.as_str())
                        && let Some(account_id) = order.account_id
                    {
                        self.bought(tx, event, account_id, order.occurred_at, "first_order")
                            .await?;
                    }
                }
                _ => {}
            }
            Ok(())
        })
    }
}
