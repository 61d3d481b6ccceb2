//! `TenantId`: the one key that separates customers of the CRM.
//!
//! It appears in every event, every row and every NATS subject
//! (`crm.v1.<tenant>...`), so it is restricted to characters that are safe in
//! all three: ASCII letters, digits, `_` and `-`, 1 to 64 of them.
use std::fmt;

/// A validated tenant identifier. Cannot be constructed invalid.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct TenantId(String);

/// Why a string is not a tenant id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTenantId {
    #[error("tenant id is empty")]
    Empty,
    #[error("tenant id is longer than {max} characters")]
    TooLong { max: usize },
    #[error("tenant id may only contain ASCII letters, digits, '_' and '-'")]
    BadCharacter,
}

impl TenantId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(value: &str) -> Result<Self, InvalidTenantId> {
        if value.is_empty() {
            return Err(InvalidTenantId::Empty);
        }
        if value.len() > Self::MAX_LEN {
            return Err(InvalidTenantId::TooLong { max: Self::MAX_LEN });
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(InvalidTenantId::BadCharacter);
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for TenantId {
    type Err = InvalidTenantId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for TenantId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_subject_safe_names() {
        assert_eq!(
            TenantId::parse("acme-01_eu").unwrap().as_str(),
            "acme-01_eu"
        );
    }

    #[test]
    fn rejects_empty_long_and_subject_breaking_names() {
        assert_eq!(TenantId::parse(""), Err(InvalidTenantId::Empty));
        assert_eq!(
            TenantId::parse(&"a".repeat(65)),
            Err(InvalidTenantId::TooLong { max: 64 })
        );
        for bad in ["a.b", "a*", "a>", "a b", "ü"] {
            assert_eq!(
                TenantId::parse(bad),
                Err(InvalidTenantId::BadCharacter),
                "{bad}"
            );
        }
    }
}
