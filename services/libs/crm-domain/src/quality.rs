//! Data quality (DOMAIN.md §5.5): the pure rules behind duplicate candidates,
//! invalid records and completeness. Projections feed records in and store
//! what comes out; nothing here reads or writes anything.
//!
//! - **Normalisation**: the forms values are compared in (email lowercased,
//!   phone E.164, names NFKC and case-folded, companies without legal
//!   suffixes).
//! - **Matching**: [`blocking_keys`] picks which pairs to compare at all,
//!   [`score`] says how alike two records are and why.
//! - **Format checks**: one `…_ok` function per rule of the invalid list.
//! - **Completeness**: the weighted share of filled fields, and which fields
//!   count for contacts, leads and accounts.
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;
use uuid::Uuid;

use crate::account::normalize_tax_id;
use crate::common::{is_e164, is_email};

pub use crate::common::normalize_email;

// ---------------------------------------------------------------------------
// Normalisation
// ---------------------------------------------------------------------------

/// Calling codes for the countries a national number may be given in
/// (ISO 3166-1 alpha-2 → ITU-T E.164 country code). Other countries need
/// numbers written internationally (`+…` or `00…`).
const CALLING_CODES: &[(&str, &str)] = &[
    ("AE", "971"),
    ("AT", "43"),
    ("AU", "61"),
    ("BE", "32"),
    ("BR", "55"),
    ("CA", "1"),
    ("CH", "41"),
    ("CN", "86"),
    ("DE", "49"),
    ("DK", "45"),
    ("ES", "34"),
    ("FI", "358"),
    ("FR", "33"),
    ("GB", "44"),
    ("HK", "852"),
    ("ID", "62"),
    ("IE", "353"),
    ("IN", "91"),
    ("IT", "39"),
    ("JP", "81"),
    ("KR", "82"),
    ("MO", "853"),
    ("MX", "52"),
    ("MY", "60"),
    ("NL", "31"),
    ("NO", "47"),
    ("NZ", "64"),
    ("PH", "63"),
    ("PL", "48"),
    ("PT", "351"),
    ("RU", "7"),
    ("SE", "46"),
    ("SG", "65"),
    ("TH", "66"),
    ("TW", "886"),
    ("US", "1"),
    ("VN", "84"),
    ("ZA", "27"),
];

/// A phone number in E.164 (`+8613800138000`), or `None` when it cannot be
/// made one (letters, too few or too many digits, no known country).
///
/// Full-width characters are folded (NFKC); spaces, dashes, dots, slashes and
/// parentheses are dropped, as is the `(0)` trunk hint in international
/// numbers. `00` becomes `+`. Without a `+`:
/// - 11 digits starting `13`–`19` are a China mobile (`+86…`), unless
///   `default_country` is in the North American plan (`US`, `CA`), where
///   such a number is `1` plus a ten-digit national number;
/// - `86` followed by such a mobile is `+86…`;
/// - anything else is a national number of `default_country` (ISO 3166-1
///   alpha-2, from [`CALLING_CODES`]), its trunk prefix (`0`; `1` in North
///   America; `8` in Russia; none in Italy) dropped.
pub fn normalize_phone(raw: &str, default_country: Option<&str>) -> Option<String> {
    let text: String = raw.trim().nfkc().collect();
    let international = text.starts_with('+') || text.starts_with("00");
    let text = if international {
        text.replace("(0)", "")
    } else {
        text
    };
    let mut digits = String::with_capacity(text.len());
    let mut plus = false;
    for (i, c) in text.chars().enumerate() {
        match c {
            '0'..='9' => digits.push(c),
            '+' if i == 0 => plus = true,
            '-' | '.' | '(' | ')' | '/' | '\u{2010}'..='\u{2015}' => {}
            c if c.is_whitespace() => {}
            _ => return None,
        }
    }
    let candidate = if plus {
        format!("+{digits}")
    } else if let Some(rest) = digits.strip_prefix("00") {
        format!("+{rest}")
    } else {
        national_to_e164(&digits, default_country)?
    };
    is_e164(&candidate).then_some(candidate)
}

/// Eleven digits starting `13` to `19`: the China mobile numbering plan.
fn is_china_mobile(digits: &str) -> bool {
    let bytes = digits.as_bytes();
    bytes.len() == 11
        && bytes[0] == b'1'
        && (b'3'..=b'9').contains(&bytes[1])
        && bytes.iter().all(u8::is_ascii_digit)
}

fn national_to_e164(digits: &str, default_country: Option<&str>) -> Option<String> {
    let calling_code = default_country.and_then(|country| {
        CALLING_CODES
            .iter()
            .find(|(code, _)| code.eq_ignore_ascii_case(country.trim()))
            .map(|(_, calling)| *calling)
    });
    if calling_code != Some("1") && is_china_mobile(digits) {
        return Some(format!("+86{digits}"));
    }
    if let Some(mobile) = digits.strip_prefix("86")
        && is_china_mobile(mobile)
    {
        return Some(format!("+{digits}"));
    }
    let calling_code = calling_code?;
    let national = match calling_code {
        "1" => digits.strip_prefix('1').filter(|rest| rest.len() == 10),
        "7" => digits.strip_prefix('8').filter(|rest| rest.len() == 10),
        "39" => None,
        _ => digits.strip_prefix('0'),
    }
    .unwrap_or(digits);
    Some(format!("+{calling_code}{national}"))
}

/// A person's name in the form names are compared in: Unicode NFKC (so
/// full-width `Ｌｉ Ｗｅｉ` becomes `Li Wei`), lowercased, whitespace runs
/// collapsed to one space, trimmed.
pub fn normalize_name(raw: &str) -> String {
    let folded = raw.nfkc().collect::<String>().to_lowercase();
    folded.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Legal-form words dropped from the end of company names (compared after
/// [`normalize_name`] and without trailing dots: `Inc.` is `inc`).
const LEGAL_SUFFIXES: &[&str] = &[
    "ag",
    "b.v",
    "bv",
    "co",
    "company",
    "corp",
    "corporation",
    "gmbh",
    "inc",
    "incorporated",
    "limited",
    "llc",
    "llp",
    "ltd",
    "n.v",
    "nv",
    "plc",
    "pty",
    "s.a",
    "s.a.s",
    "s.r.l",
    "sa",
    "sas",
    "srl",
];

/// Chinese legal forms, matched as plain suffixes (no word break in CJK
/// text); longest first.
const CJK_LEGAL_SUFFIXES: &[&str] = &["股份有限公司", "有限责任公司", "有限公司", "公司"];

/// Punctuation trimmed from the end of company names, between suffixes too
/// (`Acme, Inc.` → `acme`).
const TRAILING_PUNCTUATION: &[char] =
    &['.', ',', ';', ':', '-', '&', '/', '!', '?', '·', '、', '。'];

/// A company name in the form companies are compared in: [`normalize_name`],
/// commas as spaces, then legal suffixes (`Inc.`, `Co., Ltd.`, `GmbH`,
/// `有限公司`, `股份有限公司` …) and trailing punctuation removed, repeatedly.
/// A name that is nothing but a legal form keeps it (`Limited` stays
/// `limited`), so it never matches the empty string.
pub fn normalize_company(raw: &str) -> String {
    let name = normalize_name(&raw.replace([',', '，'], " "));
    let mut rest = name.as_str();
    loop {
        let trimmed =
            rest.trim_end_matches(|c: char| c.is_whitespace() || TRAILING_PUNCTUATION.contains(&c));
        match strip_legal_suffix(trimmed) {
            Some(shorter) if !shorter.trim().is_empty() => rest = shorter,
            _ => return trimmed.to_owned(),
        }
    }
}

fn strip_legal_suffix(name: &str) -> Option<&str> {
    if let Some(shorter) = CJK_LEGAL_SUFFIXES
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
    {
        return Some(shorter);
    }
    let (head, last) = name.rsplit_once(' ')?;
    LEGAL_SUFFIXES.contains(&last).then_some(head)
}

/// A domain in the form domains are compared in: lowercased, without scheme,
/// path, `www.` or a trailing dot (`https://www.Acme.com/` → `acme.com`).
pub fn normalize_domain(raw: &str) -> String {
    let lower = raw.trim().to_lowercase();
    let without_scheme = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
        .unwrap_or(&lower);
    let host = without_scheme.split('/').next().unwrap_or_default();
    let host = host.trim_end_matches('.');
    host.strip_prefix("www.").unwrap_or(host).to_owned()
}

// ---------------------------------------------------------------------------
// Similarity
// ---------------------------------------------------------------------------

/// Jaro–Winkler similarity in `0.0..=1.0`, over Unicode scalar values:
/// Jaro, plus 0.1 × (common prefix, at most 4) × (1 − Jaro), without a
/// boost threshold. Two empty strings are identical (1.0); one empty string
/// matches nothing (0.0).
pub fn jaro_winkler(a: &str, b: &str) -> f64 {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let jaro = jaro(&a, &b);
    let prefix = a.iter().zip(&b).take(4).take_while(|(x, y)| x == y).count();
    jaro + prefix as f64 * 0.1 * (1.0 - jaro)
}

fn jaro(a: &[char], b: &[char]) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let window = (a.len().max(b.len()) / 2).saturating_sub(1);
    let mut b_used = vec![false; b.len()];
    let mut a_matched = Vec::with_capacity(a.len());
    for (i, &ca) in a.iter().enumerate() {
        let lo = i.saturating_sub(window);
        let hi = (i + window + 1).min(b.len());
        if let Some(j) = (lo..hi).find(|&j| !b_used[j] && b[j] == ca) {
            b_used[j] = true;
            a_matched.push(ca);
        }
    }
    if a_matched.is_empty() {
        return 0.0;
    }
    let b_matched = b.iter().zip(&b_used).filter(|(_, used)| **used);
    let half_transpositions = a_matched
        .iter()
        .zip(b_matched)
        .filter(|(x, (y, _))| *x != *y)
        .count();
    let m = a_matched.len() as f64;
    let t = half_transpositions as f64 / 2.0;
    (m / a.len() as f64 + m / b.len() as f64 + (m - t) / m) / 3.0
}

// ---------------------------------------------------------------------------
// Matching
// ---------------------------------------------------------------------------

/// Names at least this Jaro–Winkler-similar (after [`normalize_name`]) count
/// as the same name.
pub const NAME_SIMILARITY: f64 = 0.92;

/// The default score from which a pair is a duplicate candidate
/// (`DuplicateSuspected`); tenants may set their own.
pub const DEFAULT_THRESHOLD: u8 = 80;

/// Same normalized email or tax id.
pub const SCORE_EMAIL_OR_TAX_ID: u8 = 100;
/// Same E.164 phone and similar names.
pub const SCORE_PHONE_AND_NAME: u8 = 95;
/// Same E.164 phone.
pub const SCORE_PHONE: u8 = 90;
/// Same domain.
pub const SCORE_DOMAIN: u8 = 85;
/// Similar names and the same normalized company.
pub const SCORE_NAME_AND_COMPANY: u8 = 80;

named_enum!(
    /// Which kind of record a [`MatchRecord`] stands for.
    RecordKind { Contact = "contact", Lead = "lead", Account = "account" }
);

/// Whether records of these kinds are compared: the same kind, or a lead
/// against a contact (a lead may be someone already known).
pub fn comparable(a: RecordKind, b: RecordKind) -> bool {
    a == b
        || matches!(
            (a, b),
            (RecordKind::Lead, RecordKind::Contact) | (RecordKind::Contact, RecordKind::Lead)
        )
}

/// What matching sees of a contact, lead or account. Values are raw; every
/// comparison normalizes them. `name` is the person's (or account's) full
/// name; `company` is a lead's company or a contact's account name (empty
/// for accounts, whose name is `name`); `domains` are an account's web
/// domains (not email domains, which free-mail providers share).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatchRecord {
    pub id: Uuid,
    pub kind: RecordKind,
    pub name: String,
    pub company: String,
    pub emails: Vec<String>,
    pub phones: Vec<String>,
    pub tax_id: Option<String>,
    pub domains: Vec<String>,
}

/// A duplicate candidate's strength and evidence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Match {
    /// 0 to 100: the highest rule that held.
    pub score: u8,
    /// Every piece of evidence that held, in the order `email`, `tax_id`,
    /// `phone`, `domain`, `name` (similar names), `company` (same
    /// normalized company), e.g. `["phone", "name"]`.
    pub rules: Vec<&'static str>,
}

fn email_keys(r: &MatchRecord) -> BTreeSet<String> {
    r.emails
        .iter()
        .map(|e| normalize_email(e))
        .filter(|e| !e.is_empty())
        .collect()
}

fn phone_keys(r: &MatchRecord) -> BTreeSet<String> {
    r.phones
        .iter()
        .filter_map(|p| normalize_phone(p, None))
        .collect()
}

fn domain_keys(r: &MatchRecord) -> BTreeSet<String> {
    r.domains
        .iter()
        .map(|d| normalize_domain(d))
        .filter(|d| !d.is_empty())
        .collect()
}

fn tax_key(r: &MatchRecord) -> Option<String> {
    r.tax_id
        .as_deref()
        .map(normalize_tax_id)
        .filter(|t| !t.is_empty())
}

/// The blocks a record falls in: only records sharing a key are scored.
/// `email:<email>`, `phone:<E.164>`, `tax:<tax id>`, `domain:<domain>`, and
/// `np:<first 3 characters of the name>|<company>` when both are non-empty,
/// all normalized; sorted, without repeats.
pub fn blocking_keys(r: &MatchRecord) -> Vec<String> {
    let mut keys = BTreeSet::new();
    keys.extend(email_keys(r).into_iter().map(|e| format!("email:{e}")));
    keys.extend(phone_keys(r).into_iter().map(|p| format!("phone:{p}")));
    keys.extend(tax_key(r).map(|t| format!("tax:{t}")));
    keys.extend(domain_keys(r).into_iter().map(|d| format!("domain:{d}")));
    let name = normalize_name(&r.name);
    let company = normalize_company(&r.company);
    if !name.is_empty() && !company.is_empty() {
        let prefix: String = name.chars().take(3).collect();
        keys.insert(format!("np:{prefix}|{company}"));
    }
    keys.into_iter().collect()
}

/// How alike two records are (DOMAIN.md §5.5), or `None` when no rule holds
/// (or both are the same record). The score is the highest rule that holds:
/// same email or tax id 100; same phone 95 with similar names, else 90; same
/// domain 85; similar names (Jaro–Winkler ≥ [`NAME_SIMILARITY`]) with the
/// same non-empty company 80. Kinds are not checked: see [`comparable`].
pub fn score(a: &MatchRecord, b: &MatchRecord) -> Option<Match> {
    if a.id == b.id {
        return None;
    }
    let email = !email_keys(a).is_disjoint(&email_keys(b));
    let tax_id = tax_key(a).is_some_and(|t| tax_key(b) == Some(t));
    let phone = !phone_keys(a).is_disjoint(&phone_keys(b));
    let domain = !domain_keys(a).is_disjoint(&domain_keys(b));
    let (name_a, name_b) = (normalize_name(&a.name), normalize_name(&b.name));
    let name = !name_a.is_empty()
        && !name_b.is_empty()
        && jaro_winkler(&name_a, &name_b) >= NAME_SIMILARITY;
    let company_a = normalize_company(&a.company);
    let company = !company_a.is_empty() && company_a == normalize_company(&b.company);

    let score = [
        (email || tax_id, SCORE_EMAIL_OR_TAX_ID),
        (phone && name, SCORE_PHONE_AND_NAME),
        (phone, SCORE_PHONE),
        (domain, SCORE_DOMAIN),
        (name && company, SCORE_NAME_AND_COMPANY),
    ]
    .into_iter()
    .filter(|(held, _)| *held)
    .map(|(_, score)| score)
    .max()?;
    let rules = [
        (email, "email"),
        (tax_id, "tax_id"),
        (phone, "phone"),
        (domain, "domain"),
        (name, "name"),
        (company, "company"),
    ]
    .into_iter()
    .filter(|(held, _)| *held)
    .map(|(_, rule)| rule)
    .collect();
    Some(Match { score, rules })
}

// ---------------------------------------------------------------------------
// Format checks
// ---------------------------------------------------------------------------

/// Email syntax: one `@`, a non-empty local part, a dotted domain, no spaces
/// (the same check commands apply).
pub fn email_ok(value: &str) -> bool {
    is_email(value)
}

/// E.164: `+`, then 8 to 15 digits not starting with 0.
pub fn phone_ok(value: &str) -> bool {
    is_e164(value)
}

/// The ISO 3166-1 alpha-2 codes officially assigned, sorted.
pub const COUNTRY_CODES: &[&str] = &[
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ",
    "BA", "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS",
    "BT", "BV", "BW", "BY", "BZ", "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN",
    "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ", "DE", "DJ", "DK", "DM", "DO", "DZ", "EC", "EE",
    "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "GA", "GB", "GD", "GE", "GF",
    "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK", "HM",
    "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM",
    "JO", "JP", "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB", "LC",
    "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK",
    "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS", "MT", "MU", "MV", "MW", "MX", "MY", "MZ", "NA",
    "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ", "OM", "PA", "PE", "PF", "PG",
    "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS", "RU", "RW",
    "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS",
    "ST", "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO",
    "TR", "TT", "TV", "TW", "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE", "VG", "VI",
    "VN", "VU", "WF", "WS", "YE", "YT", "ZA", "ZM", "ZW",
];

/// An assigned ISO 3166-1 alpha-2 country code, uppercase (`CN`, `GB`).
pub fn country_code_ok(value: &str) -> bool {
    COUNTRY_CODES.binary_search(&value).is_ok()
}

/// An ISO 4217 currency code by shape: three uppercase ASCII letters (`CNY`,
/// `EUR`), as [`crate::common::Money`] requires. Whether the code is
/// currently assigned is not checked.
pub fn currency_code_ok(value: &str) -> bool {
    value.len() == 3 && value.bytes().all(|b| b.is_ascii_uppercase())
}

/// The 31 characters of a unified social credit code (no I, O, Z, S, V).
const CREDIT_CODE_ALPHABET: &str = "0123456789ABCDEFGHJKLMNPQRTUWXY";
/// GB 32100-2015 weights of positions 1 to 17 (3^(i-1) mod 31).
const CREDIT_CODE_WEIGHTS: [usize; 17] = [
    1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
];

/// A China unified social credit code (GB 32100-2015): 18 characters of
/// [`CREDIT_CODE_ALPHABET`] (letters uppercase), positions 3 to 8 the
/// administrative division digits, and the 18th the check character:
/// `31 − (Σ valueᵢ·weightᵢ mod 31)`, with 31 written as `0`.
pub fn credit_code_ok(value: &str) -> bool {
    let values: Option<Vec<usize>> = value
        .chars()
        .map(|c| CREDIT_CODE_ALPHABET.find(c))
        .collect();
    let Some(values) = values else {
        return false;
    };
    if values.len() != 18 || values[2..8].iter().any(|v| *v > 9) {
        return false;
    }
    let sum: usize = values
        .iter()
        .zip(CREDIT_CODE_WEIGHTS)
        .map(|(value, weight)| value * weight)
        .sum();
    let check = (31 - sum % 31) % 31;
    values[17] == check
}

/// Characters a touch's outcome needs to count as a real follow-up.
pub const MIN_OUTCOME_CHARS: usize = 20;

/// A touch's outcome says something: at least [`MIN_OUTCOME_CHARS`]
/// characters (Unicode scalar values) once trimmed.
pub fn follow_up_quality_ok(outcome: &str) -> bool {
    outcome.trim().chars().count() >= MIN_OUTCOME_CHARS
}

// ---------------------------------------------------------------------------
// Completeness
// ---------------------------------------------------------------------------

/// Weight of a required field in [`completeness`].
pub const REQUIRED_WEIGHT: u64 = 3;
/// Weight of a recommended field in [`completeness`].
pub const RECOMMENDED_WEIGHT: u64 = 1;

/// A field that counts towards completeness: required or recommended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldWeight {
    pub name: &'static str,
    pub required: bool,
}

impl FieldWeight {
    const fn required(name: &'static str) -> Self {
        Self {
            name,
            required: true,
        }
    }

    const fn recommended(name: &'static str) -> Self {
        Self {
            name,
            required: false,
        }
    }

    /// [`REQUIRED_WEIGHT`] or [`RECOMMENDED_WEIGHT`].
    pub fn weight(self) -> u64 {
        if self.required {
            REQUIRED_WEIGHT
        } else {
            RECOMMENDED_WEIGHT
        }
    }
}

/// Σ wᵢ·filledᵢ ÷ Σ wᵢ × 100, rounded down: 0 to 100. No fields at all is
/// complete (100).
pub fn completeness(fields: &[(FieldWeight, bool)]) -> u8 {
    let total: u64 = fields.iter().map(|(field, _)| field.weight()).sum();
    if total == 0 {
        return 100;
    }
    let filled: u64 = fields
        .iter()
        .filter(|(_, filled)| *filled)
        .map(|(field, _)| field.weight())
        .sum();
    u8::try_from(filled * 100 / total).unwrap_or(100)
}

/// A contact: a name and an email to reach them are required; a phone, a
/// title, a linked account, an owner and a preferred language recommended.
pub const CONTACT_FIELDS: &[FieldWeight] = &[
    FieldWeight::required("name"),
    FieldWeight::required("email"),
    FieldWeight::recommended("phone"),
    FieldWeight::recommended("title"),
    FieldWeight::recommended("account"),
    FieldWeight::recommended("owner"),
    FieldWeight::recommended("language"),
];

/// A lead: name, company and email are required to work it; a phone, its
/// source channel and an owner recommended.
pub const LEAD_FIELDS: &[FieldWeight] = &[
    FieldWeight::required("name"),
    FieldWeight::required("company"),
    FieldWeight::required("email"),
    FieldWeight::recommended("phone"),
    FieldWeight::recommended("source"),
    FieldWeight::recommended("owner"),
];

/// An account: a name and an owner are required; a domain, an industry, a
/// segment and a tax id recommended (the tax id is ERP-owned, so its absence
/// is a hint, not a fault).
pub const ACCOUNT_FIELDS: &[FieldWeight] = &[
    FieldWeight::required("name"),
    FieldWeight::required("owner"),
    FieldWeight::recommended("domain"),
    FieldWeight::recommended("industry"),
    FieldWeight::recommended("segment"),
    FieldWeight::recommended("tax_id"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, company: &str) -> MatchRecord {
        MatchRecord {
            id: Uuid::now_v7(),
            kind: RecordKind::Contact,
            name: name.to_owned(),
            company: company.to_owned(),
            emails: Vec::new(),
            phones: Vec::new(),
            tax_id: None,
            domains: Vec::new(),
        }
    }

    fn assert_close(actual: f64, expected: f64) {
        assert!(
            (actual - expected).abs() < 0.001,
            "{actual} is not ≈ {expected}"
        );
    }

    #[test]
    fn phones_normalize_to_e164() {
        let cases = [
            ("+86-138-0013-8000", None, Some("+8613800138000")),
            ("+86 (138) 0013.8000", None, Some("+8613800138000")),
            ("13800138000", None, Some("+8613800138000")),
            ("138 0013 8000", Some("CN"), Some("+8613800138000")),
            ("8613800138000", None, Some("+8613800138000")),
            ("008613800138000", None, Some("+8613800138000")),
            (
                "＋８６ １３８ ００１３ ８０００",
                None,
                Some("+8613800138000"),
            ),
            ("010-1234 5678", Some("CN"), Some("+861012345678")),
            ("+44 (0)20 7183 8750", None, Some("+442071838750")),
            ("020 7183 8750", Some("gb"), Some("+442071838750")),
            ("(202) 555-0123", Some("US"), Some("+12025550123")),
            ("1-312-555-0123", Some("US"), Some("+13125550123")),
            ("06 1234 5678", Some("IT"), Some("+390612345678")),
            ("020 7183 8750", None, None),
            ("020 7183 8750", Some("XX"), None),
            ("+86 138 0013 8000 ext 5", None, None),
            ("+123", None, None),
            ("+1234567890123456", None, None),
            ("", None, None),
            ("12+345678901", None, None),
        ];
        for (raw, country, expected) in cases {
            assert_eq!(
                normalize_phone(raw, country).as_deref(),
                expected,
                "{raw} in {country:?}"
            );
        }
    }

    #[test]
    fn names_fold_width_case_and_spaces() {
        assert_eq!(normalize_name("Ｌｉ Ｗｅｉ"), "li wei");
        assert_eq!(normalize_name("  Li\u{3000}\t WEI "), "li wei");
        assert_eq!(normalize_name("李伟"), "李伟");
        assert_eq!(normalize_name(""), "");
        assert_eq!(normalize_email(" Ada@Example.COM "), "ada@example.com");
    }

    #[test]
    fn companies_lose_legal_suffixes_in_english_and_chinese() {
        for (raw, expected) in [
            ("Acme, Inc.", "acme"),
            ("ACME Inc", "acme"),
            ("Acme Ltd.", "acme"),
            ("Acme (Shanghai) Co., Ltd.", "acme (shanghai)"),
            ("Acme Co.,Ltd", "acme"),
            ("Siemens GmbH", "siemens"),
            ("Nestlé S.A.", "nestlé"),
            ("Smith & Co.", "smith"),
            ("Acme Corporation", "acme"),
            ("Acme Holdings PLC", "acme holdings"),
            ("阿里巴巴（中国）有限公司", "阿里巴巴(中国)"),
            ("华为技术有限公司", "华为技术"),
            ("平安银行股份有限公司", "平安银行"),
            ("Limited", "limited"),
            ("公司", "公司"),
            ("", ""),
        ] {
            assert_eq!(normalize_company(raw), expected, "{raw}");
        }
        assert_eq!(
            normalize_company("ACME Limited"),
            normalize_company("acme llc.")
        );
    }

    #[test]
    fn domains_drop_scheme_www_and_path() {
        assert_eq!(normalize_domain("https://www.Acme.com/about"), "acme.com");
        assert_eq!(normalize_domain(" acme.com. "), "acme.com");
        assert_eq!(normalize_domain(""), "");
    }

    #[test]
    fn jaro_winkler_matches_known_values() {
        assert_close(jaro_winkler("MARTHA", "MARHTA"), 0.961);
        assert_close(jaro_winkler("DWAYNE", "DUANE"), 0.840);
        assert_close(jaro_winkler("DIXON", "DICKSONX"), 0.813);
        assert_close(jaro_winkler("JELLYFISH", "SMELLYFISH"), 0.896);
        assert_close(jaro_winkler("same", "same"), 1.0);
        assert_close(jaro_winkler("abc", "xyz"), 0.0);
        assert_close(jaro_winkler("", ""), 1.0);
        assert_close(jaro_winkler("a", ""), 0.0);
        assert_close(
            jaro_winkler("DWAYNE", "DUANE"),
            jaro_winkler("DUANE", "DWAYNE"),
        );
        assert_close(jaro_winkler("李伟", "李伟"), 1.0);
    }

    #[test]
    fn worked_example_c_scores_phone_and_name_95() {
        let mut p1 = record("Li Wei", "");
        p1.phones = vec!["+8613800138000".into()];
        let mut p2 = record("Ｌｉ Ｗｅｉ", "");
        p2.phones = vec!["+86-138-0013-8000".into()];
        let found = score(&p1, &p2);
        assert_eq!(
            found,
            Some(Match {
                score: 95,
                rules: vec!["phone", "name"]
            })
        );
        assert_eq!(score(&p2, &p1), found);
        assert!(blocking_keys(&p1).contains(&"phone:+8613800138000".to_owned()));
        assert_eq!(blocking_keys(&p1), blocking_keys(&p2));
    }

    #[test]
    fn same_email_in_another_case_scores_100() {
        let mut a = record("Ada Lovelace", "");
        a.emails = vec!["Ada@Example.com".into()];
        let mut b = record("A. King", "");
        b.emails = vec!["other@example.org".into(), " ada@example.COM".into()];
        assert_eq!(
            score(&a, &b),
            Some(Match {
                score: 100,
                rules: vec!["email"]
            })
        );
    }

    #[test]
    fn each_rule_scores_as_section_5_5_says() {
        let mut a = MatchRecord {
            kind: RecordKind::Account,
            tax_id: Some("91350100m000100y43".into()),
            ..record("Acme", "")
        };
        let mut b = MatchRecord {
            kind: RecordKind::Account,
            tax_id: Some(" 91350100M000100Y43 ".into()),
            ..record("Globex", "")
        };
        assert_eq!(
            score(&a, &b).map(|m| (m.score, m.rules)),
            Some((100, vec!["tax_id"]))
        );

        a.tax_id = None;
        a.domains = vec!["acme.com".into()];
        b.domains = vec!["https://www.ACME.com/".into()];
        assert_eq!(
            score(&a, &b).map(|m| (m.score, m.rules)),
            Some((85, vec!["domain"]))
        );

        let mut c = record("Wang Fang", "");
        c.phones = vec!["13800138000".into()];
        let mut d = record("Zhang Min", "");
        d.phones = vec!["+86 138 0013 8000".into()];
        assert_eq!(
            score(&c, &d).map(|m| (m.score, m.rules)),
            Some((90, vec!["phone"]))
        );

        let e = record("Jonathan Smith", "Acme, Inc.");
        let f = record("Jonathon Smith", "ACME Ltd");
        assert_eq!(
            score(&e, &f).map(|m| (m.score, m.rules)),
            Some((80, vec!["name", "company"]))
        );
        let g = record("Jonathon Smith", "Globex Corp.");
        assert_eq!(score(&e, &g), None, "similar names at other companies");

        let h = record("李伟", "阿里巴巴（中国）有限公司");
        let i = record("李伟", "阿里巴巴(中国)股份有限公司");
        assert_eq!(score(&h, &i).map(|m| m.score), Some(80));
    }

    #[test]
    fn score_is_the_highest_rule_and_lists_all_evidence() {
        let mut a = record("Li Wei", "Acme Ltd");
        a.emails = vec!["li@acme.com".into()];
        a.phones = vec!["+8613800138000".into()];
        let mut b = record("LI WEI", "acme inc.");
        b.emails = vec!["LI@acme.com".into()];
        b.phones = vec!["13800138000".into()];
        assert_eq!(
            score(&a, &b),
            Some(Match {
                score: 100,
                rules: vec!["email", "phone", "name", "company"]
            })
        );
    }

    #[test]
    fn records_with_nothing_in_common_do_not_match() {
        let mut a = record("Li Wei", "Acme");
        a.emails = vec!["li@acme.com".into()];
        a.phones = vec!["+8613800138000".into()];
        let mut b = record("Maria Garcia", "Globex");
        b.emails = vec!["maria@globex.com".into()];
        b.phones = vec!["+34612345678".into()];
        assert_eq!(score(&a, &b), None);
        assert!(
            blocking_keys(&a)
                .iter()
                .all(|key| !blocking_keys(&b).contains(key))
        );
        // Empty fields never match each other, nor does a record itself.
        assert_eq!(score(&record("", ""), &record("", "")), None);
        assert_eq!(score(&a, &a), None);
    }

    #[test]
    fn blocking_keys_cover_every_identifier() {
        let r = MatchRecord {
            emails: vec!["Li@Acme.com".into(), "li@acme.com".into()],
            phones: vec!["138-0013-8000".into(), "not a phone".into()],
            tax_id: Some("91350100m000100y43".into()),
            domains: vec!["www.acme.com".into()],
            ..record("Li Wei", "Acme Co., Ltd.")
        };
        assert_eq!(
            blocking_keys(&r),
            [
                "domain:acme.com",
                "email:li@acme.com",
                "np:li |acme",
                "phone:+8613800138000",
                "tax:91350100M000100Y43",
            ]
        );
        assert!(blocking_keys(&record("Li Wei", "")).is_empty());
    }

    #[test]
    fn leads_compare_with_contacts_but_not_with_accounts() {
        use RecordKind::*;
        assert!(comparable(Lead, Contact) && comparable(Contact, Lead));
        assert!(comparable(Account, Account) && comparable(Lead, Lead));
        assert!(!comparable(Account, Contact) && !comparable(Lead, Account));
    }

    #[test]
    fn email_and_phone_formats() {
        assert!(email_ok("ada@example.com"));
        for bad in [
            "",
            "ada",
            "@example.com",
            "ada@example",
            "a b@example.com",
            "a@b@c.com",
        ] {
            assert!(!email_ok(bad), "{bad}");
        }
        assert!(phone_ok("+8613800138000"));
        for bad in [
            "13800138000",
            "+86-138-0013-8000",
            "+0123456789",
            "+1234567",
        ] {
            assert!(!phone_ok(bad), "{bad}");
        }
    }

    #[test]
    fn country_and_currency_codes() {
        assert_eq!(COUNTRY_CODES.len(), 249);
        assert!(
            COUNTRY_CODES.windows(2).all(|w| w[0] < w[1]),
            "sorted, unique"
        );
        for good in ["CN", "GB", "US", "DE", "HK", "ZW", "AD"] {
            assert!(country_code_ok(good), "{good}");
        }
        for bad in ["", "cn", "UK", "EU", "XX", "CHN", "C"] {
            assert!(!country_code_ok(bad), "{bad}");
        }
        for good in ["CNY", "EUR", "USD"] {
            assert!(currency_code_ok(good), "{good}");
        }
        for bad in ["", "cny", "EURO", "US", "€UR", "U$D"] {
            assert!(!currency_code_ok(bad), "{bad}");
        }
    }

    #[test]
    fn credit_codes_need_the_right_check_character() {
        for good in ["91350100M000100Y43", "91110000802100433B"] {
            assert!(credit_code_ok(good), "{good}");
        }
        for bad in [
            "",
            "91350100M000100Y44",  // wrong check character
            "911100001000000000",  // wrong check character (R)
            "91350100M000100Y4",   // 17 characters
            "91350100M000100Y430", // 19 characters
            "91350100m000100y43",  // lowercase
            "91350100M000I00Y43",  // I is not in the alphabet
            "913501A0M000100Y4Q",  // letter in the division code
        ] {
            assert!(!credit_code_ok(bad), "{bad}");
        }
    }

    #[test]
    fn follow_ups_need_twenty_characters_of_outcome() {
        assert!(!follow_up_quality_ok(""));
        assert!(!follow_up_quality_ok("   called   "));
        assert!(!follow_up_quality_ok("1234567890123456789"));
        assert!(follow_up_quality_ok("12345678901234567890"));
        assert!(follow_up_quality_ok(
            "Called, agreed to send a proposal by Friday."
        ));
        assert!(follow_up_quality_ok(
            "客户同意下周二上门演示，需要准备报价单和合同样本。"
        ));
    }

    #[test]
    fn completeness_weighs_required_three_and_recommended_one() {
        let fields: Vec<(FieldWeight, bool)> = CONTACT_FIELDS
            .iter()
            .map(|f| (*f, matches!(f.name, "name" | "email" | "phone")))
            .collect();
        // name 3 + email 3 + phone 1 of 3 + 3 + 5 × 1 = 7 / 11.
        assert_eq!(completeness(&fields), 63);
        let all: Vec<_> = LEAD_FIELDS.iter().map(|f| (*f, true)).collect();
        assert_eq!(completeness(&all), 100);
        let none: Vec<_> = ACCOUNT_FIELDS.iter().map(|f| (*f, false)).collect();
        assert_eq!(completeness(&none), 0);
        let only_recommended = [
            (FieldWeight::required("name"), false),
            (FieldWeight::recommended("title"), true),
        ];
        assert_eq!(completeness(&only_recommended), 25);
        assert_eq!(completeness(&[]), 100);
    }

    #[test]
    fn field_lists_are_unique_and_require_a_name() {
        for fields in [CONTACT_FIELDS, LEAD_FIELDS, ACCOUNT_FIELDS] {
            let names: BTreeSet<_> = fields.iter().map(|f| f.name).collect();
            assert_eq!(names.len(), fields.len());
            assert!(fields.iter().any(|f| f.name == "name" && f.required));
        }
    }
}
