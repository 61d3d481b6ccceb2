//! Orders and their ERP customers (DOMAIN.md §7), as the read models that
//! list orders by account keep them: an order recorded without an account
//! resolves once an account is linked to its customer (`customer_ref` of
//! the order's source), and an order recorded just as its customer was
//! linked resolves on arrival. Each read model has its own link table and
//! orders table; these are its statements.
use crm_domain::account::AccountChanges;
use crm_domain::commerce::OrderRecorded;
use crm_event_store::RecordedEvent;
use uuid::Uuid;

use crate::{ApplyError, Tx};

/// One read model's statements: `record` upserts a link ($1 tenant,
/// $2 account, $3 source, $4 external id), `resolve` assigns that account
/// to the orders still without one (same parameters), `lookup` reads the
/// account of a link ($1 tenant, $2 source, $3 external id).
pub(crate) struct LinkStatements {
    pub record: &'static str,
    pub resolve: &'static str,
    pub lookup: &'static str,
}

/// The account links `changes` adds: recorded, and the orders of those
/// customers recorded without an account become the account's.
pub(crate) async fn resolve_orders(
    tx: &Tx<'_>,
    event: &RecordedEvent,
    changes: &AccountChanges,
    sql: &LinkStatements,
) -> Result<(), ApplyError> {
    for (source, customer_ref) in crm_domain::account::new_links(changes) {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&event.tenant_id, &event.stream_id, &source, &customer_ref];
        tx.execute(sql.record, &params).await?;
        tx.execute(sql.resolve, &params).await?;
    }
    Ok(())
}

/// The account an order belongs to: its own, else the one linked to its
/// customer (an order whose command-side lookup raced the link).
pub(crate) async fn order_account(
    tx: &Tx<'_>,
    event: &RecordedEvent,
    order: &OrderRecorded,
    sql: &LinkStatements,
) -> Result<Option<Uuid>, ApplyError> {
    if order.account_id.is_some() || order.customer_ref.is_empty() {
        return Ok(order.account_id);
    }
    Ok(tx
        .query_opt(
            sql.lookup,
            &[
                &event.tenant_id,
                &order.external.source,
                &order.customer_ref,
            ],
        )
        .await?
        .map(|row| row.get(0)))
}
