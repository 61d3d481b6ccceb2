//! Purchase history owned by the ERP (DOMAIN.md §2.9): products, orders and
//! payments (with refunds). The CRM keeps copies, keyed by (source, external
//! id) through derived stream ids; each record carries a monotonic
//! `external_version`, so an older or repeated version changes nothing.
use jiff::Timestamp;
use jiff::civil::Date;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::{Aggregate, Context, DomainEvent};
use crate::common::{Money, is_code, text_ok};
use crate::error::{DomainError, Violations};

/// The ERP's identity of a record.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalRef {
    /// The sending system, e.g. `sap_prod`.
    pub source: String,
    pub external_id: String,
    pub external_version: u64,
}

/// Orders one invoice or payment may name.
pub const MAX_ORDER_IDS: usize = 100;

impl ExternalRef {
    /// Named as the requests carry it: their `external` field.
    pub fn validate(&self, v: &mut Violations) {
        self.validate_key("external", v);
        v.check(
            self.external_version >= 1,
            "external.external_version",
            "must be at least 1",
        );
    }

    /// The source and external id alone (a reference to a record), named
    /// `<field>.source` and `<field>.external_id`.
    pub fn validate_key(&self, field: &str, v: &mut Violations) {
        v.check(
            is_code(&self.source, 64),
            format!("{field}.source"),
            "must be a code of [a-z0-9_]",
        );
        v.check(
            text_ok(&self.external_id, 200, false),
            format!("{field}.external_id"),
            "must be 1 to 200 characters",
        );
    }
}

fn same_currency(money: &Money, currency: &str, field: &str, v: &mut Violations) {
    money.validate(field, v);
    v.check(
        money.currency == currency,
        format!("{field}.currency"),
        "must be the record's currency",
    );
}

// ---------------------------------------------------------------- product

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductRecorded {
    pub external: ExternalRef,
    pub sku: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub category: String,
    pub price: Money,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Money>,
    pub occurred_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordProduct {
    pub external: ExternalRef,
    pub sku: String,
    pub name: String,
    pub category: String,
    pub price: Money,
    pub cost: Option<Money>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ProductEvent {
    Recorded(ProductRecorded),
}

impl DomainEvent for ProductEvent {
    fn event_type(&self) -> &'static str {
        "ProductRecorded"
    }

    fn occurred_at(&self) -> jiff::Timestamp {
        match self {
            Self::Recorded(e) => e.occurred_at,
        }
    }

    fn decode<'de, D: serde::Deserializer<'de>>(
        event_type: &str,
        _: u32,
        payload: D,
    ) -> Result<Option<Self>, D::Error> {
        Ok(match event_type {
            "ProductRecorded" => Some(Self::Recorded(Deserialize::deserialize(payload)?)),
            _ => None,
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    pub external_version: u64,
    pub sku: String,
    pub price: Option<Money>,
}

impl Aggregate for Product {
    type Command = RecordProduct;
    type Event = ProductEvent;
    const STREAM_TYPE: &'static str = "product";

    fn exists(&self) -> bool {
        self.external_version > 0
    }

    fn decide(
        &self,
        command: RecordProduct,
        context: Context,
    ) -> Result<Vec<ProductEvent>, DomainError> {
        let occurred_at = context.occurred_at()?;
        let mut v = Violations::default();
        command.external.validate(&mut v);
        v.check(
            text_ok(&command.sku, 100, false),
            "sku",
            "must be 1 to 100 characters",
        );
        v.check(
            text_ok(&command.name, 200, false),
            "name",
            "must be 1 to 200 characters",
        );
        v.check(
            command.category.is_empty() || is_code(&command.category, 64),
            "category",
            "must be a code of [a-z0-9_]",
        );
        command.price.validate("price", &mut v);
        v.check(
            command.price.amount_minor >= 0,
            "price.amount_minor",
            "must not be negative",
        );
        if let Some(cost) = &command.cost {
            same_currency(cost, &command.price.currency, "cost", &mut v);
        }
        v.into_result()?;
        if command.external.external_version <= self.external_version {
            return Ok(vec![]);
        }
        Ok(vec![ProductEvent::Recorded(ProductRecorded {
            external: command.external,
            sku: command.sku,
            name: command.name,
            category: command.category,
            price: command.price,
            cost: command.cost,
            occurred_at,
        })])
    }

    fn evolve(mut self, event: &ProductEvent) -> Self {
        let ProductEvent::Recorded(recorded) = event;
        self.external_version = recorded.external.external_version;
        self.sku = recorded.sku.clone();
        self.price = Some(recorded.price.clone());
        self
    }
}

// ------------------------------------------------------------------ order

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: String,
    pub quantity: u32,
    pub unit_price: Money,
    pub line_total: Money,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line_cost: Option<Money>,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderTotals {
    /// Σ line totals.
    pub net: Money,
    pub tax: Money,
    /// net + tax.
    pub gross: Money,
}

// Commands and events are short-lived values moved once; boxing the large
// variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderCommand {
    Record(RecordOrder),
    Cancel { reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordOrder {
    pub external: ExternalRef,
    pub account_id: Option<Uuid>,
    pub customer_ref: String,
    pub deal_id: Option<Uuid>,
    pub status: String,
    pub lines: Vec<OrderLine>,
    pub totals: OrderTotals,
    pub ordered_on: Date,
    pub promised_delivery: Option<Date>,
}

pub const ORDER_STATUSES: &[&str] = &["placed", "confirmed", "paid", "shipped", "delivered"];
/// Order statuses that mean the customer paid (revenue, customer lifecycle).
pub const PAID_STATUSES: &[&str] = &["paid", "shipped", "delivered"];

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecorded {
    pub external: ExternalRef,
    /// The account the order maps to; `None` while no unique match exists
    /// (data quality lists those until a reference is linked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<Uuid>,
    pub customer_ref: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deal_id: Option<Uuid>,
    pub status: String,
    pub lines: Vec<OrderLine>,
    pub totals: OrderTotals,
    pub ordered_on: Date,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promised_delivery: Option<Date>,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    /// `cancelled` or `returned`.
    pub reason: String,
    pub occurred_at: Timestamp,
}

#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum OrderEvent {
    Recorded(OrderRecorded),
    Cancelled(OrderCancelled),
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Recorded(_) => "OrderRecorded",
            Self::Cancelled(_) => "OrderCancelled",
        }
    }

    fn occurred_at(&self) -> jiff::Timestamp {
        match self {
            Self::Recorded(e) => e.occurred_at,
            Self::Cancelled(e) => e.occurred_at,
        }
    }

    fn decode<'de, D: serde::Deserializer<'de>>(
        event_type: &str,
        _: u32,
        payload: D,
    ) -> Result<Option<Self>, D::Error> {
        Ok(Some(match event_type {
            "OrderRecorded" => Self::Recorded(Deserialize::deserialize(payload)?),
            "OrderCancelled" => Self::Cancelled(Deserialize::deserialize(payload)?),
            _ => return Ok(None),
        }))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub external_version: u64,
    pub cancelled: bool,
    pub status: String,
    pub gross: Option<Money>,
}

fn validate_order(order: &RecordOrder) -> Result<(), DomainError> {
    let mut v = Violations::default();
    order.external.validate(&mut v);
    v.check(
        ORDER_STATUSES.contains(&order.status.as_str()),
        "status",
        "must be placed, confirmed, paid, shipped or delivered",
    );
    v.check(
        text_ok(&order.customer_ref, 200, true),
        "customer_ref",
        "must be at most 200 characters",
    );
    v.check(
        !order.lines.is_empty() && order.lines.len() <= 500,
        "lines",
        "must have 1 to 500 lines",
    );
    let currency = order.totals.gross.currency.as_str();
    let mut sum: i64 = 0;
    for (i, line) in order.lines.iter().enumerate() {
        v.check(
            text_ok(&line.sku, 100, false),
            format!("lines[{i}].sku"),
            "must be 1 to 100 characters",
        );
        v.check(
            line.quantity > 0,
            format!("lines[{i}].quantity"),
            "must be positive",
        );
        same_currency(
            &line.unit_price,
            currency,
            &format!("lines[{i}].unit_price"),
            &mut v,
        );
        same_currency(
            &line.line_total,
            currency,
            &format!("lines[{i}].line_total"),
            &mut v,
        );
        if let Some(cost) = &line.line_cost {
            same_currency(cost, currency, &format!("lines[{i}].line_cost"), &mut v);
        }
        sum = sum.saturating_add(line.line_total.amount_minor);
    }
    order.totals.gross.validate("gross", &mut v);
    same_currency(&order.totals.net, currency, "net", &mut v);
    same_currency(&order.totals.tax, currency, "tax", &mut v);
    v.check(
        sum == order.totals.net.amount_minor,
        "net",
        "must equal the sum of the line totals",
    );
    v.check(
        order
            .totals
            .net
            .amount_minor
            .saturating_add(order.totals.tax.amount_minor)
            == order.totals.gross.amount_minor,
        "gross",
        "must equal net + tax",
    );
    v.into_result()
}

impl Aggregate for Order {
    type Command = OrderCommand;
    type Event = OrderEvent;
    const STREAM_TYPE: &'static str = "order";

    fn exists(&self) -> bool {
        self.external_version > 0
    }

    fn decide(
        &self,
        command: OrderCommand,
        context: Context,
    ) -> Result<Vec<OrderEvent>, DomainError> {
        let occurred_at = context.occurred_at()?;
        match command {
            OrderCommand::Record(order) => {
                validate_order(&order)?;
                if order.external.external_version <= self.external_version {
                    return Ok(vec![]);
                }
                Ok(vec![OrderEvent::Recorded(OrderRecorded {
                    external: order.external,
                    account_id: order.account_id,
                    customer_ref: order.customer_ref,
                    deal_id: order.deal_id,
                    status: order.status,
                    lines: order.lines,
                    totals: order.totals,
                    ordered_on: order.ordered_on,
                    promised_delivery: order.promised_delivery,
                    occurred_at,
                })])
            }
            OrderCommand::Cancel { reason } => {
                if !self.exists() {
                    return Err(DomainError::NotFound);
                }
                if reason != "cancelled" && reason != "returned" {
                    return Err(DomainError::invalid(
                        "reason",
                        "must be cancelled or returned",
                    ));
                }
                if self.cancelled {
                    return Ok(vec![]);
                }
                Ok(vec![OrderEvent::Cancelled(OrderCancelled {
                    reason,
                    occurred_at,
                })])
            }
        }
    }

    fn evolve(mut self, event: &OrderEvent) -> Self {
        match event {
            OrderEvent::Recorded(recorded) => {
                self.external_version = recorded.external.external_version;
                self.status = recorded.status.clone();
                self.gross = Some(recorded.totals.gross.clone());
            }
            OrderEvent::Cancelled(_) => self.cancelled = true,
        }
        self
    }
}

// ---------------------------------------------------------------- invoice

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceIssued {
    pub external: ExternalRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<Uuid>,
    /// The CRM ids of the orders invoiced.
    #[serde(default)]
    pub order_ids: Vec<Uuid>,
    pub number: String,
    /// China: the fapiao number, when issued.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fapiao_number: String,
    pub issued_on: Date,
    pub due_on: Date,
    pub totals: OrderTotals,
    pub occurred_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordInvoice {
    pub external: ExternalRef,
    pub account_id: Option<Uuid>,
    pub order_ids: Vec<Uuid>,
    pub number: String,
    pub fapiao_number: String,
    pub issued_on: Date,
    pub due_on: Date,
    pub totals: OrderTotals,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum InvoiceEvent {
    Issued(InvoiceIssued),
}

impl DomainEvent for InvoiceEvent {
    fn event_type(&self) -> &'static str {
        "InvoiceIssued"
    }

    fn occurred_at(&self) -> jiff::Timestamp {
        match self {
            Self::Issued(e) => e.occurred_at,
        }
    }

    fn decode<'de, D: serde::Deserializer<'de>>(
        event_type: &str,
        _: u32,
        payload: D,
    ) -> Result<Option<Self>, D::Error> {
        Ok(match event_type {
            "InvoiceIssued" => Some(Self::Issued(Deserialize::deserialize(payload)?)),
            _ => None,
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    pub external_version: u64,
    pub gross: Option<Money>,
}

impl Aggregate for Invoice {
    type Command = RecordInvoice;
    type Event = InvoiceEvent;
    const STREAM_TYPE: &'static str = "invoice";

    fn exists(&self) -> bool {
        self.external_version > 0
    }

    fn decide(
        &self,
        command: RecordInvoice,
        context: Context,
    ) -> Result<Vec<InvoiceEvent>, DomainError> {
        let occurred_at = context.occurred_at()?;
        let mut v = Violations::default();
        command.external.validate(&mut v);
        v.check(
            text_ok(&command.number, 100, false),
            "number",
            "must be 1 to 100 characters",
        );
        v.check(
            text_ok(&command.fapiao_number, 100, true),
            "fapiao_number",
            "must be at most 100 characters",
        );
        v.check(
            command.due_on >= command.issued_on,
            "due_on",
            "must not be before issued_on",
        );
        v.check(
            command.order_ids.len() <= MAX_ORDER_IDS,
            "order_ids",
            "must have at most 100 orders",
        );
        let totals = &command.totals;
        totals.gross.validate("gross", &mut v);
        same_currency(&totals.net, &totals.gross.currency, "net", &mut v);
        same_currency(&totals.tax, &totals.gross.currency, "tax", &mut v);
        v.check(
            totals
                .net
                .amount_minor
                .saturating_add(totals.tax.amount_minor)
                == totals.gross.amount_minor,
            "gross",
            "must equal net + tax",
        );
        v.into_result()?;
        if command.external.external_version <= self.external_version {
            return Ok(vec![]);
        }
        Ok(vec![InvoiceEvent::Issued(InvoiceIssued {
            external: command.external,
            account_id: command.account_id,
            order_ids: command.order_ids,
            number: command.number,
            fapiao_number: command.fapiao_number,
            issued_on: command.issued_on,
            due_on: command.due_on,
            totals: command.totals,
            occurred_at,
        })])
    }

    fn evolve(mut self, event: &InvoiceEvent) -> Self {
        let InvoiceEvent::Issued(issued) = event;
        self.external_version = issued.external.external_version;
        self.gross = Some(issued.totals.gross.clone());
        self
    }
}

// ---------------------------------------------------------------- payment

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentReceived {
    pub external: ExternalRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<Uuid>,
    pub amount: Money,
    /// The orders this payment settles, if known.
    #[serde(default)]
    pub order_ids: Vec<Uuid>,
    pub paid_on: Date,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundIssued {
    pub amount: Money,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub external_id: String,
    pub refunded_on: Date,
    pub occurred_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PaymentCommand {
    Record {
        external: ExternalRef,
        account_id: Option<Uuid>,
        amount: Money,
        order_ids: Vec<Uuid>,
        paid_on: Date,
    },
    /// Refunds never exceed what was paid minus earlier refunds.
    Refund {
        amount: Money,
        external_id: String,
        refunded_on: Date,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum PaymentEvent {
    Received(PaymentReceived),
    Refunded(RefundIssued),
}

impl DomainEvent for PaymentEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Received(_) => "PaymentReceived",
            Self::Refunded(_) => "RefundIssued",
        }
    }

    fn occurred_at(&self) -> jiff::Timestamp {
        match self {
            Self::Received(e) => e.occurred_at,
            Self::Refunded(e) => e.occurred_at,
        }
    }

    fn decode<'de, D: serde::Deserializer<'de>>(
        event_type: &str,
        _: u32,
        payload: D,
    ) -> Result<Option<Self>, D::Error> {
        Ok(Some(match event_type {
            "PaymentReceived" => Self::Received(Deserialize::deserialize(payload)?),
            "RefundIssued" => Self::Refunded(Deserialize::deserialize(payload)?),
            _ => return Ok(None),
        }))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub external_version: u64,
    pub amount: Option<Money>,
    pub refunded_minor: i64,
    pub refund_ids: Vec<String>,
}

impl Aggregate for Payment {
    type Command = PaymentCommand;
    type Event = PaymentEvent;
    const STREAM_TYPE: &'static str = "payment";

    fn exists(&self) -> bool {
        self.external_version > 0
    }

    fn decide(
        &self,
        command: PaymentCommand,
        context: Context,
    ) -> Result<Vec<PaymentEvent>, DomainError> {
        let occurred_at = context.occurred_at()?;
        match command {
            PaymentCommand::Record {
                external,
                account_id,
                amount,
                order_ids,
                paid_on,
            } => {
                let mut v = Violations::default();
                external.validate(&mut v);
                amount.validate("amount", &mut v);
                v.check(
                    amount.amount_minor > 0,
                    "amount.amount_minor",
                    "must be positive",
                );
                v.check(
                    order_ids.len() <= MAX_ORDER_IDS,
                    "order_ids",
                    "must have at most 100 orders",
                );
                v.into_result()?;
                if external.external_version <= self.external_version {
                    return Ok(vec![]);
                }
                if let Some(current) = &self.amount
                    && (current.currency != amount.currency
                        || amount.amount_minor < self.refunded_minor)
                {
                    return Err(DomainError::invalid(
                        "amount",
                        "must keep the currency and cover the refunds issued",
                    ));
                }
                Ok(vec![PaymentEvent::Received(PaymentReceived {
                    external,
                    account_id,
                    amount,
                    order_ids,
                    paid_on,
                    occurred_at,
                })])
            }
            PaymentCommand::Refund {
                amount,
                external_id,
                refunded_on,
            } => {
                let Some(paid) = &self.amount else {
                    return Err(DomainError::NotFound);
                };
                if !external_id.is_empty() && self.refund_ids.contains(&external_id) {
                    return Ok(vec![]);
                }
                let mut v = Violations::default();
                same_currency(&amount, &paid.currency, "amount", &mut v);
                v.check(
                    amount.amount_minor > 0,
                    "amount.amount_minor",
                    "must be positive",
                );
                v.check(
                    self.refunded_minor.saturating_add(amount.amount_minor) <= paid.amount_minor,
                    "amount.amount_minor",
                    "refunds must not exceed the payment",
                );
                v.check(
                    text_ok(&external_id, 200, true),
                    "refund_id",
                    "must be at most 200 characters",
                );
                v.into_result()?;
                Ok(vec![PaymentEvent::Refunded(RefundIssued {
                    amount,
                    external_id,
                    refunded_on,
                    occurred_at,
                })])
            }
        }
    }

    fn evolve(mut self, event: &PaymentEvent) -> Self {
        match event {
            PaymentEvent::Received(received) => {
                self.external_version = received.external.external_version;
                self.amount = Some(received.amount.clone());
            }
            PaymentEvent::Refunded(refund) => {
                self.refunded_minor += refund.amount.amount_minor;
                if !refund.external_id.is_empty() {
                    self.refund_ids.push(refund.external_id.clone());
                }
            }
        }
        self
    }
}

#[cfg(test)]
// Amounts are written as yuan_fen (282_50 is 282.50 CNY).
#[allow(clippy::inconsistent_digit_grouping)]
mod tests {
    use super::*;
    use crate::testing::{given, now};

    fn cny(minor: i64) -> Money {
        Money {
            amount_minor: minor,
            currency: "CNY".into(),
        }
    }

    fn external(version: u64) -> ExternalRef {
        ExternalRef {
            source: "erp".into(),
            external_id: "SO-1".into(),
            external_version: version,
        }
    }

    fn order(version: u64) -> RecordOrder {
        RecordOrder {
            external: external(version),
            account_id: None,
            customer_ref: "C-42".into(),
            deal_id: None,
            status: "placed".into(),
            lines: vec![
                OrderLine {
                    sku: "A".into(),
                    quantity: 2,
                    unit_price: cny(100_00),
                    line_total: cny(200_00),
                    line_cost: None,
                },
                OrderLine {
                    sku: "B".into(),
                    quantity: 1,
                    unit_price: cny(50_00),
                    line_total: cny(50_00),
                    line_cost: Some(cny(20_00)),
                },
            ],
            totals: OrderTotals {
                net: cny(250_00),
                tax: cny(32_50),
                gross: cny(282_50),
            },
            ordered_on: Date::constant(2026, 11, 1),
            promised_delivery: None,
        }
    }

    #[test]
    fn orders_need_consistent_totals_and_one_currency() {
        let mut bad = order(1);
        bad.totals.net = cny(249_00);
        bad.lines[1].line_total.currency = "EUR".into();
        given::<Order>([])
            .when(OrderCommand::Record(bad))
            .then_invalid(&["lines[1].line_total.currency", "net", "gross"]);
    }

    #[test]
    fn external_versions_only_move_forward() {
        let events = Order::default()
            .decide(OrderCommand::Record(order(2)), crate::Context::at(now()))
            .unwrap();
        assert_eq!(events.len(), 1);
        given::<Order>(events.clone())
            .when(OrderCommand::Record(order(2)))
            .then(vec![]);
        given::<Order>(events.clone())
            .when(OrderCommand::Record(order(1)))
            .then(vec![]);
        let newer = Order::default()
            .replay(events.iter())
            .decide(OrderCommand::Record(order(3)), crate::Context::at(now()))
            .unwrap();
        assert_eq!(newer.len(), 1);
        given::<Order>(events.clone())
            .when(OrderCommand::Cancel {
                reason: "returned".into(),
            })
            .then(vec![OrderEvent::Cancelled(OrderCancelled {
                reason: "returned".into(),
                occurred_at: now(),
            })]);
        given::<Order>([])
            .when(OrderCommand::Cancel {
                reason: "returned".into(),
            })
            .then_error(DomainError::NotFound);
    }

    #[test]
    fn refunds_never_exceed_the_payment() {
        let received = Payment::default()
            .decide(
                PaymentCommand::Record {
                    external: external(1),
                    account_id: None,
                    amount: cny(282_50),
                    order_ids: vec![],
                    paid_on: Date::constant(2026, 11, 2),
                },
                crate::Context::at(now()),
            )
            .unwrap();
        let refund = |minor: i64, id: &str| PaymentCommand::Refund {
            amount: cny(minor),
            external_id: id.into(),
            refunded_on: Date::constant(2026, 11, 5),
        };
        let state = given::<Payment>(received.clone())
            .when(refund(200_00, "R-1"))
            .then(vec![PaymentEvent::Refunded(RefundIssued {
                amount: cny(200_00),
                external_id: "R-1".into(),
                refunded_on: Date::constant(2026, 11, 5),
                occurred_at: now(),
            })]);
        assert_eq!(state.refunded_minor, 200_00);
        let mut history = received;
        history.push(PaymentEvent::Refunded(RefundIssued {
            amount: cny(200_00),
            external_id: "R-1".into(),
            refunded_on: Date::constant(2026, 11, 5),
            occurred_at: now(),
        }));
        given::<Payment>(history.clone())
            .when(refund(200_00, "R-1"))
            .then(vec![]);
        given::<Payment>(history.clone())
            .when(refund(90_00, "R-2"))
            .then_invalid(&["amount.amount_minor"]);
        given::<Payment>(history)
            .when(refund(82_50, "R-2"))
            .result
            .unwrap();
        given::<Payment>([])
            .when(refund(1, "R-9"))
            .then_error(DomainError::NotFound);
    }

    #[test]
    fn invoices_add_up_and_fall_due_after_issue() {
        let invoice = |version: u64, gross: i64| RecordInvoice {
            external: ExternalRef {
                source: "erp".into(),
                external_id: "INV-1".into(),
                external_version: version,
            },
            account_id: None,
            order_ids: vec![],
            number: "2026-0001".into(),
            fapiao_number: "044001900111".into(),
            issued_on: Date::constant(2026, 11, 3),
            due_on: Date::constant(2026, 12, 3),
            totals: OrderTotals {
                net: cny(250_00),
                tax: cny(32_50),
                gross: cny(gross),
            },
        };
        let issued = given::<Invoice>([])
            .when(invoice(1, 282_50))
            .result
            .unwrap();
        assert_eq!(issued.len(), 1);
        given::<Invoice>(issued)
            .when(invoice(1, 282_50))
            .then(vec![]);
        let mut late = invoice(1, 282_50);
        late.due_on = Date::constant(2026, 11, 1);
        late.order_ids = vec![Uuid::from_u128(1); MAX_ORDER_IDS + 1];
        given::<Invoice>([])
            .when(late)
            .then_invalid(&["due_on", "order_ids"]);
        given::<Invoice>([])
            .when(invoice(1, 300_00))
            .then_invalid(&["gross"]);
    }

    #[test]
    fn products_keep_one_currency() {
        let product = RecordProduct {
            external: external(1),
            sku: "A".into(),
            name: "Widget".into(),
            category: "widgets".into(),
            price: cny(100_00),
            cost: Some(Money {
                amount_minor: 40_00,
                currency: "EUR".into(),
            }),
        };
        given::<Product>([])
            .when(product)
            .then_invalid(&["cost.currency"]);
    }
}
