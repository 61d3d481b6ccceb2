//! Conversions every service shares: optional ids, money, dates and times,
//! and ids derived from a tenant-scoped name.
use crm_domain::TenantId;
use crm_domain::common::Money;
use crm_proto::v1 as pb;
use jiff::Timestamp;
use jiff::civil::{Date, Time};
use uuid::Uuid;

use super::{ServiceError, parse_id};

/// A record id derived from a name within the tenant (UUIDv5 under a
/// per-tenant namespace), so that retries, resends and re-syncs converge on
/// the same record.
pub fn tenant_scoped_id(tenant: &TenantId, name: &str) -> Uuid {
    let namespace = Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("crm:{tenant}").as_bytes());
    Uuid::new_v5(&namespace, name.as_bytes())
}

/// An id that may be empty.
pub fn optional_id(field: &'static str, value: &str) -> Result<Option<Uuid>, ServiceError> {
    if value.is_empty() {
        Ok(None)
    } else {
        parse_id(field, value, false).map(Some)
    }
}

/// A required amount.
pub fn money(field: impl Into<String>, value: Option<pb::Money>) -> Result<Money, ServiceError> {
    let value = value.ok_or_else(|| ServiceError::invalid(field, "is required"))?;
    Ok(Money {
        amount_minor: value.amount_minor,
        currency: value.currency,
    })
}

/// A `YYYY-MM-DD` date.
pub fn date(field: impl Into<String>, value: &str) -> Result<Date, ServiceError> {
    match value.parse::<Date>() {
        Ok(date) if crm_domain::common::is_business_date(date) => Ok(date),
        Ok(_) => Err(ServiceError::invalid(
            field,
            "must be in the years 1900 to 2200",
        )),
        Err(_) => Err(ServiceError::invalid(field, "must be a date YYYY-MM-DD")),
    }
}

/// An RFC 3339 instant in the years 1900 to 2200.
pub fn timestamp(field: impl Into<String>, value: &str) -> Result<Timestamp, ServiceError> {
    let field = field.into();
    let at = value
        .parse::<Timestamp>()
        .map_err(|_| ServiceError::invalid(field.clone(), "must be an RFC 3339 timestamp"))?;
    if !crm_domain::common::is_business_time(at) {
        return Err(ServiceError::invalid(
            field,
            "must be in the years 1900 to 2200",
        ));
    }
    Ok(at)
}

/// An `HH:MM` time.
pub fn time(field: impl Into<String>, value: &str) -> Result<Time, ServiceError> {
    value
        .parse::<Time>()
        .map_err(|_| ServiceError::invalid(field, "must be a time HH:MM"))
}

/// A merge request's survivor and losers. The loser count is checked before
/// any id is parsed, so an oversized list is refused without work.
pub fn merge_ids(
    survivor_id: &str,
    loser_ids: &[String],
) -> Result<(Uuid, Vec<Uuid>), ServiceError> {
    let survivor = parse_id("survivor_id", survivor_id, false)?;
    if loser_ids.len() > crm_domain::MAX_MERGE_LOSERS {
        return Err(ServiceError::invalid(
            "loser_ids",
            "must name 1 to 10 records",
        ));
    }
    let losers = loser_ids
        .iter()
        .map(|id| parse_id("loser_ids", id, false))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((survivor, losers))
}
