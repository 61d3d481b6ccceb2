//! `crm.v1.Commerce`: ERP upserts keyed by (source, external id).
use crm_domain::account::{
    Account, AccountCommand, CreditTerms, EXTERNAL_REF, external_ref_key, normalize_tax_id,
    validate_erp_sync, validated_tax_id,
};
use crm_domain::commerce::{
    ExternalRef, Invoice, Order, OrderCommand, OrderLine, OrderTotals, Payment, PaymentCommand,
    Product, RecordInvoice, RecordOrder, RecordProduct,
};
use crm_domain::common::Money;
use crm_domain::{Aggregate, TenantId};
use crm_proto::v1 as pb;
use crm_proto::v1::commerce_server::Commerce;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::fields::{date, money, optional_id, tenant_scoped_id};
use super::{Caller, CommandHandler, Options, ServiceError, parse_id};

pub struct CommerceService {
    handler: CommandHandler,
}

impl CommerceService {
    pub fn new(handler: CommandHandler) -> Self {
        Self { handler }
    }

    async fn run<A: Aggregate>(
        &self,
        caller: Caller,
        mut options: Options,
        external: &ExternalRef,
        command: A::Command,
    ) -> Result<Response<pb::CommandReply>, Status>
    where
        A::Command: Clone,
    {
        let id = keyed::<A>(&caller, &mut options, external);
        let reply = self
            .handler
            .execute::<A>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }
}

/// The record's id, derived from its external reference, and (unless the
/// caller gave one) the idempotency key of this version of it.
fn keyed<A: Aggregate>(caller: &Caller, options: &mut Options, external: &ExternalRef) -> Uuid {
    if options.idempotency_key.is_none() {
        let version = external.external_version.to_string();
        server_key(
            options,
            A::STREAM_TYPE,
            &[&external.source, &external.external_id, &version],
        );
    }
    derived_id(&caller.tenant, A::STREAM_TYPE, external)
}

impl CommerceService {
    /// The account holding unique value `value` of `kind`, if any.
    async fn holder(
        &self,
        tenant: &TenantId,
        kind: &str,
        value: &str,
    ) -> Result<Option<Uuid>, ServiceError> {
        let hash = self.handler.key_hash(tenant, kind, value);
        self.handler
            .store
            .reservation_holder(tenant, kind, &hash)
            .await
            .map_err(|e| ServiceError::Unavailable(e.to_string()))
    }
}

/// Who may send ERP records (DOMAIN.md §6-7): the ERP's service account
/// (role `erp_sync`) or an admin. They own tax ids, credit terms and every
/// commerce document; a user must not forge them.
pub const ERP_ROLES: [&str; 2] = ["erp_sync", "admin"];

fn require_erp(caller: &Caller) -> Result<(), ServiceError> {
    super::configuration::require_role(caller, &ERP_ROLES, "record ERP data")
}

/// The idempotency key the server gives an ERP resend that came without
/// one: `kind:` and the SHA-256 of the parts (each length-prefixed), 64 hex
/// digits, so it stays within the 200-byte key limit however long the
/// external ids are. The key also stands for the request (as a process
/// manager's does): resending the same ERP version with other details
/// returns the first outcome and changes nothing.
fn server_key(options: &mut Options, kind: &str, parts: &[&str]) {
    use sha2::{Digest, Sha256};
    use std::fmt::Write;
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let mut key = format!("{kind}:");
    for byte in hasher.finalize() {
        let _ = write!(key, "{byte:02x}");
    }
    options.fingerprint = Sha256::digest(key.as_bytes()).into();
    options.idempotency_key = Some(key);
}

/// The CRM id of an ERP record: UUIDv5 of (stream type, source, external id)
/// under a per-tenant namespace, so every resend lands on the same stream.
fn derived_id(tenant: &TenantId, stream_type: &str, external: &ExternalRef) -> Uuid {
    tenant_scoped_id(
        tenant,
        &format!("{stream_type}:{}:{}", external.source, external.external_id),
    )
}

/// A reference to a record the ERP sent before: its key, checked before the
/// record is looked up.
fn reference(field: &str, key: &ExternalRef) -> Result<(), ServiceError> {
    let mut v = crm_domain::Violations::default();
    key.validate_key(field, &mut v);
    v.into_result().map_err(ServiceError::Domain)
}

/// Counted before each is parsed.
fn count_orders(order_ids: &[String]) -> Result<(), ServiceError> {
    if order_ids.len() > crm_domain::commerce::MAX_ORDER_IDS {
        return Err(ServiceError::invalid(
            "order_ids",
            "must have at most 100 orders",
        ));
    }
    Ok(())
}

fn external(
    field: &'static str,
    value: Option<pb::ExternalRef>,
) -> Result<ExternalRef, ServiceError> {
    let value = value.ok_or_else(|| ServiceError::invalid(field, "is required"))?;
    Ok(ExternalRef {
        source: value.source,
        external_id: value.external_id,
        external_version: value.external_version,
    })
}

#[tonic::async_trait]
impl Commerce for CommerceService {
    async fn record_product(
        &self,
        request: Request<pb::RecordProductRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        require_erp(&caller)?;
        let request = request.into_inner();
        let options = Options::parse("RecordProduct", request.options.as_ref(), &request)?;
        let external = external("external", request.external)?;
        let command = RecordProduct {
            external: external.clone(),
            sku: request.sku,
            name: request.name,
            category: request.category,
            price: money("price", request.price)?,
            cost: request.cost.map(|c| money("cost", Some(c))).transpose()?,
        };
        self.run::<Product>(caller, options, &external, command)
            .await
    }

    async fn record_order(
        &self,
        request: Request<pb::RecordOrderRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        require_erp(&caller)?;
        let request = request.into_inner();
        let options = Options::parse("RecordOrder", request.options.as_ref(), &request)?;
        let external = external("external", request.external)?;
        let mut account_id = optional_id("account_id", &request.account_id)?;
        // Only a lookup key: bounded always, and one that is no valid tax id
        // matches no account (the order stays unlinked for data quality).
        if request.customer_tax_id.chars().count() > 100 {
            return Err(
                ServiceError::invalid("customer_tax_id", "must be at most 100 characters").into(),
            );
        }
        let lines = request
            .lines
            .into_iter()
            .enumerate()
            .map(|(i, line)| {
                let field = |name: &str| format!("lines[{i}].{name}");
                let required = |name: &str, m: Option<pb::Money>| {
                    m.map(|m| Money {
                        amount_minor: m.amount_minor,
                        currency: m.currency,
                    })
                    .ok_or_else(|| {
                        ServiceError::Domain(crm_domain::DomainError::invalid(
                            field(name),
                            "is required",
                        ))
                    })
                };
                Ok(OrderLine {
                    sku: line.sku,
                    quantity: line.quantity,
                    unit_price: required("unit_price", line.unit_price)?,
                    line_total: required("line_total", line.line_total)?,
                    line_cost: line.line_cost.map(|m| Money {
                        amount_minor: m.amount_minor,
                        currency: m.currency,
                    }),
                })
            })
            .collect::<Result<Vec<_>, ServiceError>>()?;
        let mut order = RecordOrder {
            external: external.clone(),
            account_id: None,
            customer_ref: request.customer_ref,
            deal_id: optional_id("deal_id", &request.deal_id)?,
            status: request.status,
            lines,
            totals: OrderTotals {
                net: money("net", request.net)?,
                tax: money("tax", request.tax)?,
                gross: money("gross", request.gross)?,
            },
            ordered_on: date("ordered_on", &request.ordered_on)?,
            promised_delivery: if request.promised_delivery.is_empty() {
                None
            } else {
                Some(date("promised_delivery", &request.promised_delivery)?)
            },
        };
        // The order's own checks (lines, totals, currency) before the
        // lookups of its customer.
        super::precheck(&Order::default(), OrderCommand::Record(order.clone()))?;
        // A resend of an order recorded earlier replays, whatever the
        // lookups below would say now.
        let mut keyed_options = options.clone();
        let id = keyed::<Order>(&caller, &mut keyed_options, &external);
        if let Some(reply) = self.handler.replayed(&caller, id, &keyed_options).await? {
            return Ok(Response::new(reply));
        }
        // Ids the ERP states must name the CRM's records.
        if let Some(account) = account_id {
            self.handler
                .refers_to(&caller.tenant, account, &["account"], "account_id")
                .await?;
        }
        if let Some(deal) = order.deal_id {
            self.handler
                .refers_to(&caller.tenant, deal, &["opportunity"], "deal_id")
                .await?;
        }
        if account_id.is_none() && !order.customer_ref.is_empty() {
            let key = external_ref_key(&external.source, &order.customer_ref);
            account_id = self.holder(&caller.tenant, EXTERNAL_REF, &key).await?;
        }
        if account_id.is_none()
            && let Ok(tax_id) = validated_tax_id("customer_tax_id", &request.customer_tax_id)
            && !tax_id.is_empty()
        {
            account_id = self.holder(&caller.tenant, "tax_id", &tax_id).await?;
        }
        order.account_id = account_id;
        self.run::<Order>(caller, options, &external, OrderCommand::Record(order))
            .await
    }

    async fn cancel_order(
        &self,
        request: Request<pb::CancelOrderRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        require_erp(&caller)?;
        let request = request.into_inner();
        let mut options = Options::parse("CancelOrder", request.options.as_ref(), &request)?;
        let external = external("external", request.external)?;
        reference("external", &external)?;
        if options.idempotency_key.is_none() {
            server_key(
                &mut options,
                "order-cancel",
                &[&external.source, &external.external_id],
            );
        }
        self.run::<Order>(
            caller,
            options,
            &external,
            OrderCommand::Cancel {
                reason: request.reason,
            },
        )
        .await
    }

    async fn record_invoice(
        &self,
        request: Request<pb::RecordInvoiceRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        require_erp(&caller)?;
        let request = request.into_inner();
        let options = Options::parse("RecordInvoice", request.options.as_ref(), &request)?;
        let external = external("external", request.external)?;
        count_orders(&request.order_ids)?;
        let order_ids = request
            .order_ids
            .iter()
            .map(|id| parse_id("order_ids", id, false))
            .collect::<Result<Vec<_>, _>>()?;
        let command = RecordInvoice {
            external: external.clone(),
            account_id: optional_id("account_id", &request.account_id)?,
            order_ids,
            number: request.number,
            fapiao_number: request.fapiao_number,
            issued_on: date("issued_on", &request.issued_on)?,
            due_on: date("due_on", &request.due_on)?,
            totals: OrderTotals {
                net: money("net", request.net)?,
                tax: money("tax", request.tax)?,
                gross: money("gross", request.gross)?,
            },
        };
        self.run::<Invoice>(caller, options, &external, command)
            .await
    }

    async fn record_payment(
        &self,
        request: Request<pb::RecordPaymentRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        require_erp(&caller)?;
        let request = request.into_inner();
        let options = Options::parse("RecordPayment", request.options.as_ref(), &request)?;
        let external = external("external", request.external)?;
        count_orders(&request.order_ids)?;
        let order_ids = request
            .order_ids
            .iter()
            .map(|id| parse_id("order_ids", id, false))
            .collect::<Result<Vec<_>, _>>()?;
        let command = PaymentCommand::Record {
            external: external.clone(),
            account_id: optional_id("account_id", &request.account_id)?,
            amount: money("amount", request.amount)?,
            order_ids,
            paid_on: date("paid_on", &request.paid_on)?,
        };
        self.run::<Payment>(caller, options, &external, command)
            .await
    }

    async fn issue_refund(
        &self,
        request: Request<pb::IssueRefundRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        require_erp(&caller)?;
        let request = request.into_inner();
        let mut options = Options::parse("IssueRefund", request.options.as_ref(), &request)?;
        let payment = external("payment", request.payment)?;
        reference("payment", &payment)?;
        if options.idempotency_key.is_none() {
            // Without a key or an id, a resent refund would refund again.
            if request.refund_id.is_empty() {
                return Err(ServiceError::invalid(
                    "refund_id",
                    "is required without an idempotency key",
                )
                .into());
            }
            // A refund id is unique within its payment, not its source.
            server_key(
                &mut options,
                "refund",
                &[&payment.source, &payment.external_id, &request.refund_id],
            );
        }
        let command = PaymentCommand::Refund {
            amount: money("amount", request.amount)?,
            external_id: request.refund_id,
            refunded_on: date("refunded_on", &request.refunded_on)?,
        };
        let id = derived_id(&caller.tenant, Payment::STREAM_TYPE, &payment);
        let reply = self
            .handler
            .execute::<Payment>(&caller, id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn record_customer(
        &self,
        request: Request<pb::RecordCustomerRequest>,
    ) -> Result<Response<pb::CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        require_erp(&caller)?;
        let request = request.into_inner();
        let mut options = Options::parse("RecordCustomer", request.options.as_ref(), &request)?;
        let external = external("external", request.external)?;
        let credit_terms = request
            .credit_terms
            .map(|terms| {
                Ok::<_, ServiceError>(CreditTerms {
                    limit: money("credit_terms.limit", terms.limit)?,
                    payment_days: terms.payment_days,
                })
            })
            .transpose()?;
        // Input errors before the lookups they would spoil.
        validate_erp_sync(&external, &request.tax_id, credit_terms.as_ref())
            .map_err(ServiceError::Domain)?;
        let mut account_id = optional_id("account_id", &request.account_id)?;
        if account_id.is_none() {
            let key = external_ref_key(&external.source, &external.external_id);
            account_id = self.holder(&caller.tenant, EXTERNAL_REF, &key).await?;
        }
        if account_id.is_none() && !request.tax_id.is_empty() {
            let tax_id = normalize_tax_id(&request.tax_id);
            account_id = self.holder(&caller.tenant, "tax_id", &tax_id).await?;
        }
        let Some(account_id) = account_id else {
            return Err(
                ServiceError::Domain(crm_domain::DomainError::InvalidReference {
                    field: "account_id",
                })
                .into(),
            );
        };
        if options.idempotency_key.is_none() {
            let version = external.external_version.to_string();
            let account = account_id.to_string();
            server_key(
                &mut options,
                "customer",
                &[&external.source, &external.external_id, &version, &account],
            );
        }
        let command = AccountCommand::SyncFromErp {
            external,
            tax_id: request.tax_id,
            credit_terms,
        };
        let reply = self
            .handler
            .execute::<Account>(&caller, account_id, &options, command)
            .await?;
        Ok(Response::new(reply))
    }
}
