//! Building blocks every aggregate shares: business time, reasons, changes,
//! record lifecycle, and format checks.
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::error::{DomainError, Violations};

/// How far ahead of the clock `occurred_at` may be.
pub const MAX_FUTURE_SECONDS: i64 = 5 * 60;

/// The years a business time or date may fall in (1900 to 2200): enough for
/// any backdated record, and every read model can store it (PostgreSQL's
/// `timestamptz` and `date` stop at 4713 BC; a value they refuse would stop
/// a projection for every tenant).
pub const BUSINESS_YEARS: std::ops::RangeInclusive<i16> = 1900..=2200;

/// Whether a date falls in [`BUSINESS_YEARS`].
pub fn is_business_date(date: jiff::civil::Date) -> bool {
    BUSINESS_YEARS.contains(&date.year())
}

/// Whether an instant falls in [`BUSINESS_YEARS`] (in UTC).
pub fn is_business_time(at: Timestamp) -> bool {
    is_business_date(at.to_zoned(jiff::tz::TimeZone::UTC).date())
}

/// What the handler passes in besides the command: facts valid at command
/// time only, never fetched by the domain.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub now: Timestamp,
}

/// Resolves a command's business time: given, or now; never more than five
/// minutes ahead.
pub fn occurred_at(given: Option<Timestamp>, clock: Clock) -> Result<Timestamp, DomainError> {
    let at = given.unwrap_or(clock.now);
    if at.as_second() > clock.now.as_second() + MAX_FUTURE_SECONDS {
        return Err(DomainError::invalid(
            "options.occurred_at",
            "must not be more than 5 minutes in the future",
        ));
    }
    if !is_business_time(at) {
        return Err(DomainError::invalid(
            "options.occurred_at",
            "must be in the years 1900 to 2200",
        ));
    }
    Ok(at)
}

/// A field's value before and after an update, as update events carry it.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change<T> {
    pub old: T,
    pub new: T,
}

/// `Some(change)` when `new` differs from `old`.
pub fn diff<T: PartialEq + Clone>(old: &T, new: Option<&T>) -> Option<Change<T>> {
    match new {
        Some(new) if new != old => Some(Change {
            old: old.clone(),
            new: new.clone(),
        }),
        _ => None,
    }
}

/// A reason: tenant code plus free text.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    pub code: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
}

impl Reason {
    pub(crate) fn validate(&self, field: &str, violations: &mut Violations) {
        violations.check(
            is_code(&self.code, 64),
            format!("{field}.code"),
            "must be 1 to 64 of [a-z0-9_]",
        );
        violations.check(
            self.text.chars().count() <= 2000,
            format!("{field}.text"),
            "must be at most 2000 characters",
        );
    }
}

/// Money: integer minor units and an ISO 4217 currency. No floats anywhere.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    pub amount_minor: i64,
    /// Three uppercase letters, e.g. `EUR`, `CNY`.
    pub currency: String,
}

/// The largest amount, either way, that a command may state: 10^15 minor
/// units (ten trillion in a currency of cents). Far beyond any real deal or
/// order, and small enough that the read models' sums over thousands of them
/// stay within 64 bits.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000_000;

/// Whether `amount_minor` is within [`MAX_AMOUNT_MINOR`] either way.
pub fn amount_ok(amount_minor: i64) -> bool {
    amount_minor.unsigned_abs() <= MAX_AMOUNT_MINOR.unsigned_abs()
}

impl Money {
    pub(crate) fn validate(&self, field: &str, violations: &mut Violations) {
        violations.check(
            amount_ok(self.amount_minor),
            format!("{field}.amount_minor"),
            "must be at most 10^15 minor units either way",
        );
        violations.check(
            self.currency.len() == 3 && self.currency.bytes().all(|b| b.is_ascii_uppercase()),
            format!("{field}.currency"),
            "must be an ISO 4217 code such as EUR",
        );
    }
}

/// Whether a record is live or archived (no hard delete, DOMAIN.md §1.2).
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lifecycle {
    #[default]
    Active,
    Archived,
}

impl Lifecycle {
    /// The `RecordArchived` payload for a live record (the caller checks that
    /// it is live).
    pub fn archive(
        self,
        reason: Reason,
        occurred_at: Timestamp,
    ) -> Result<LifecycleChanged, DomainError> {
        let mut v = Violations::default();
        reason.validate("reason", &mut v);
        v.into_result()?;
        Ok(LifecycleChanged {
            reason,
            occurred_at,
        })
    }

    /// The `RecordRestored` payload; only archived records restore.
    pub fn restore(
        self,
        reason: Reason,
        occurred_at: Timestamp,
    ) -> Result<LifecycleChanged, DomainError> {
        if self == Self::Active {
            return Err(DomainError::InvalidTransition {
                from: "active",
                to: "active",
            });
        }
        self.archive(reason, occurred_at)
    }
}

/// `RecordArchived`/`RecordRestored` payload.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleChanged {
    pub reason: Reason,
    pub occurred_at: Timestamp,
}

/// 1 to `max` of `[a-z0-9_]`.
pub fn is_code(value: &str, max: usize) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Trimmed text of 1 to `max` characters (or 0 when `optional`).
pub fn text_ok(value: &str, max: usize, optional: bool) -> bool {
    let n = value.chars().count();
    (optional || !value.trim().is_empty()) && n <= max && !value.chars().any(char::is_control)
}

/// A plausible email address: one `@`, a local part, a dotted domain of
/// letters, digits and hyphens. Deliberately strict for interactive input.
pub fn is_email(value: &str) -> bool {
    if value.len() > 254 || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let Some((local, domain)) = value.split_once('@') else {
        return false;
    };
    !local.is_empty() && local.len() <= 64 && !domain.contains('@') && is_domain(domain)
}

/// A DNS name with at least two labels: `example.com`.
pub fn is_domain(value: &str) -> bool {
    let labels: Vec<&str> = value.split('.').collect();
    labels.len() >= 2
        && value.len() <= 253
        && labels.iter().all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        })
}

/// E.164: `+`, a non-zero digit, then 7 to 14 more digits.
pub fn is_e164(value: &str) -> bool {
    let Some(digits) = value.strip_prefix('+') else {
        return false;
    };
    (8..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// A well-formed BCP 47 tag (language, optional script, region, variants),
/// e.g. `en`, `en-GB`, `zh-Hans-CN`.
pub fn is_bcp47(value: &str) -> bool {
    // RFC 5646 §4.4.1: 35 characters hold every tag worth keeping.
    if value.len() > 35 {
        return false;
    }
    let mut parts = value.split('-');
    let Some(language) = parts.next() else {
        return false;
    };
    if !((2..=3).contains(&language.len()) && language.bytes().all(|b| b.is_ascii_alphabetic())) {
        return false;
    }
    parts.all(|p| (1..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// A time zone the IANA database knows, e.g. `Asia/Shanghai`.
pub fn is_iana_zone(value: &str) -> bool {
    value.contains('/') && jiff::tz::TimeZone::get(value).is_ok() || value == "UTC"
}

/// Lowercased, trimmed email: the form uniqueness compares.
pub fn normalize_email(value: &str) -> String {
    value.trim().to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn business_time_is_bounded_to_years_1900_to_2200() {
        let clock = Clock {
            now: "2026-03-02T10:00:00Z".parse().expect("time"),
        };
        for good in ["1900-01-01T00:00:00Z", "1999-12-31T23:59:59Z"] {
            let at: Timestamp = good.parse().expect("time");
            assert_eq!(occurred_at(Some(at), clock), Ok(at), "{good}");
        }
        for bad in [
            "1899-12-31T23:59:59Z",
            "0001-01-01T00:00:00Z",
            "-009999-06-01T00:00:00Z",
        ] {
            let at: Timestamp = bad.parse().expect("time");
            let refused = occurred_at(Some(at), clock).unwrap_err();
            assert!(
                matches!(&refused, DomainError::Invalid(v) if v[0].field == "options.occurred_at"),
                "{bad}: {refused:?}"
            );
        }
        assert!(is_business_date(jiff::civil::date(2200, 12, 31)));
        assert!(!is_business_date(jiff::civil::date(2201, 1, 1)));
        assert!(!is_business_date(jiff::civil::date(0, 1, 1)));
    }

    #[test]
    fn formats_accept_good_and_refuse_bad_values() {
        for good in ["ada@example.com", "a.b+c@sub.example.co.uk", "李@例子.中国"] {
            assert!(is_email(good), "{good}");
        }
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a b@example.com",
            "a@b@c.com",
            "ada@-x.com",
        ] {
            assert!(!is_email(bad), "{bad}");
        }
        for good in ["+8613800138000", "+442071838750", "+12025550123"] {
            assert!(is_e164(good), "{good}");
        }
        for bad in [
            "",
            "13800138000",
            "+0123456789",
            "+86-138-0013-8000",
            "+123",
            "+1234567890123456",
        ] {
            assert!(!is_e164(bad), "{bad}");
        }
        for good in ["en", "en-GB", "zh-Hans-CN", "de-CH-1996"] {
            assert!(is_bcp47(good), "{good}");
        }
        for bad in ["", "e", "english", "en_GB", "en--GB"] {
            assert!(!is_bcp47(bad), "{bad}");
        }
        for good in [
            "Asia/Shanghai",
            "Europe/London",
            "America/Argentina/Buenos_Aires",
            "UTC",
        ] {
            assert!(is_iana_zone(good), "{good}");
        }
        for bad in ["", "Mars/Olympus", "CST", "Asia/Shangai"] {
            assert!(!is_iana_zone(bad), "{bad}");
        }
        assert!(is_code("contract_ended", 64) && !is_code("Contract", 64) && !is_code("", 64));
    }

    #[test]
    fn business_time_may_be_past_but_not_far_future() {
        let clock = Clock {
            now: "2026-11-28T10:00:00Z".parse().unwrap(),
        };
        assert_eq!(occurred_at(None, clock).unwrap(), clock.now);
        let past: Timestamp = "2020-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(occurred_at(Some(past), clock).unwrap(), past);
        let soon: Timestamp = "2026-11-28T10:05:00Z".parse().unwrap();
        assert!(occurred_at(Some(soon), clock).is_ok());
        let later: Timestamp = "2026-11-28T10:05:01Z".parse().unwrap();
        assert!(matches!(
            occurred_at(Some(later), clock),
            Err(DomainError::Invalid(_))
        ));
    }
}
