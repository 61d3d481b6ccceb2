//! Domain errors: values with data, mapped to gRPC statuses at the edge
//! (DOMAIN.md §1.3).
use uuid::Uuid;

/// One bad field of a command and the rule it breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Path of the field as the caller named it, e.g. `emails[1].address`.
    pub field: String,
    /// The rule, e.g. `must be an email address`.
    pub rule: &'static str,
}

impl Violation {
    /// A path longer than [`MAX_FIELD_PATH`] (one built from the caller's
    /// own keys) is cut there, on a character boundary, and marked `…`.
    pub fn new(field: impl Into<String>, rule: &'static str) -> Self {
        let mut field = field.into();
        if field.len() > MAX_FIELD_PATH {
            let mut end = MAX_FIELD_PATH;
            while !field.is_char_boundary(end) {
                end -= 1;
            }
            field.truncate(end);
            field.push('…');
        }
        Self { field, rule }
    }
}

/// Why a command was refused. Nothing is appended for any of these.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The command is malformed; every bad field is listed.
    #[error("invalid command: {}", .0.iter().map(|v| format!("{} {}", v.field, v.rule)).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Violation>),
    /// The record does not exist (or is not visible to the caller).
    #[error("not found")]
    NotFound,
    /// The record to create exists already.
    #[error("{key} already exists")]
    AlreadyExists {
        key: &'static str,
        holder: Option<Uuid>,
    },
    /// The state does not allow this change.
    #[error("cannot go from {from} to {to}")]
    InvalidTransition {
        from: &'static str,
        to: &'static str,
    },
    /// A referenced record is missing or not usable.
    #[error("{field} refers to a record that is missing or inactive")]
    InvalidReference { field: &'static str },
    /// Marketing to this person on this channel needs a consent they have not
    /// given.
    #[error("no {purpose} consent")]
    ConsentMissing { purpose: &'static str },
    /// The caller's role does not allow this.
    #[error("not allowed to {action}")]
    PermissionDenied { action: &'static str },
    /// The record was merged into `survivor`; use that one.
    #[error("the record was merged into {survivor}")]
    RecordMerged { survivor: Uuid },
    /// Archived records refuse everything but restore.
    #[error("the record is archived")]
    RecordArchived,
    /// The record's personal data was erased; it takes no more commands.
    #[error("the record's personal data was erased")]
    RecordErased,
    /// A time-driven condition no longer holds (e.g. the deal moved).
    #[error("{rule} does not apply any more")]
    NotApplicable { rule: &'static str },
    /// The record lacks what the stage it would enter requires (the
    /// pipeline's `required_fields`); the fields are set by other commands.
    #[error("stage {stage} requires {}", .fields.join(", "))]
    RequiredFieldsMissing {
        stage: String,
        fields: Vec<&'static str>,
    },
    /// The field belongs to an external system of record (the ERP) once the
    /// record is linked to it (DOMAIN.md §7).
    #[error("{field} is owned by the external system")]
    FieldOwnedExternally { field: &'static str },
    /// The data of another record the command builds on (e.g. the lead a
    /// conversion turns into a contact) breaks a rule the new record must
    /// keep. Not the request's fault: the `record` is fixed by its own
    /// commands first. Each bad field is named under `record`.
    #[error("the {record}'s data cannot be used: {}", .violations.iter().map(|v| format!("{} {}", v.field, v.rule)).collect::<Vec<_>>().join("; "))]
    RecordDataInvalid {
        record: &'static str,
        violations: Vec<Violation>,
    },
}

impl DomainError {
    pub fn invalid(field: impl Into<String>, rule: &'static str) -> Self {
        Self::Invalid(vec![Violation::new(field, rule)])
    }

    /// A short machine-readable reason, for `google.rpc.ErrorInfo`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "VALIDATION_FAILED",
            Self::NotFound => "NOT_FOUND",
            Self::AlreadyExists { .. } => "ALREADY_EXISTS",
            Self::InvalidTransition { .. } => "INVALID_TRANSITION",
            Self::InvalidReference { .. } => "INVALID_REFERENCE",
            Self::RecordArchived => "RECORD_ARCHIVED",
            Self::RecordErased => "RECORD_ERASED",
            Self::NotApplicable { .. } => "NOT_APPLICABLE",
            Self::RecordMerged { .. } => "RECORD_MERGED",
            Self::PermissionDenied { .. } => "PERMISSION_DENIED",
            Self::ConsentMissing { .. } => "CONSENT_MISSING",
            Self::RequiredFieldsMissing { .. } => "REQUIRED_FIELDS_MISSING",
            Self::FieldOwnedExternally { .. } => "FIELD_OWNED_EXTERNALLY",
            Self::RecordDataInvalid { .. } => "RECORD_DATA_INVALID",
        }
    }
}

/// Collects violations, so a command reports every bad field at once, up
/// to [`MAX_VIOLATIONS`]: a huge invalid list must not make an error too
/// large for the caller to read.
#[derive(Default)]
pub struct Violations(Vec<Violation>);

/// Violations one error reports at most; later ones are dropped.
pub const MAX_VIOLATIONS: usize = 100;

/// Longest field path an error names: a path built from the caller's own
/// keys (a map key, say) is cut there, on a character boundary.
pub const MAX_FIELD_PATH: usize = 200;

impl Violations {
    pub fn add(&mut self, field: impl Into<String>, rule: &'static str) {
        if self.0.len() < MAX_VIOLATIONS {
            self.0.push(Violation::new(field, rule));
        }
    }

    pub fn check(&mut self, ok: bool, field: impl Into<String>, rule: &'static str) {
        if !ok {
            self.add(field, rule);
        }
    }

    pub fn into_result(self) -> Result<(), DomainError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DomainError::Invalid(self.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_stay_readable_however_bad_the_request() {
        let mut v = Violations::default();
        for i in 0..10_000 {
            v.add(format!("domains[{i}]"), "must be a domain");
        }
        v.add("é".repeat(300), "is wrong");
        let Err(DomainError::Invalid(violations)) = v.into_result() else {
            panic!("invalid");
        };
        assert_eq!(violations.len(), MAX_VIOLATIONS);
        assert_eq!(violations[99].field, "domains[99]");

        let mut v = Violations::default();
        v.add(format!("stage_mapping.{}", "é".repeat(300)), "is wrong");
        let Err(DomainError::Invalid(violations)) = v.into_result() else {
            panic!("invalid");
        };
        assert!(violations[0].field.len() <= MAX_FIELD_PATH + '…'.len_utf8());
        assert!(violations[0].field.starts_with("stage_mapping.é"));
        assert!(violations[0].field.ends_with('…'));
    }
}
