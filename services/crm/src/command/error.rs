//! Errors of the command path and their one mapping to gRPC statuses.
//! Details go to the log; the client gets the code, a short message, and
//! machine-readable details (`BadRequest`, `ErrorInfo`).
use crm_domain::{DomainError, Violation};
use crm_event_store::AppendError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use uuid::Uuid;

const DOMAIN: &str = "crm.v1";

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Missing or malformed caller identity.
    #[error("unauthenticated: {0}")]
    Unauthenticated(&'static str),
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// The caller's expected version did not match.
    #[error("stream is at version {current}")]
    VersionConflict { current: u64 },
    /// A unique value of another record.
    #[error("{kind} already belongs to {holder}")]
    AlreadyReserved { kind: String, holder: Uuid },
    #[error("idempotency key reused for a different request")]
    IdempotencyKeyReused,
    /// Concurrent writers kept moving the record; the caller may retry.
    #[error("the record kept changing; retry")]
    Contention,
    /// A record the command was decided on moved before its append (see
    /// `CommandHandler::execute_on`, which decides again).
    #[error("a record the command depends on changed")]
    FactMoved,
    /// A position or version beyond what exists; `current` is the newest.
    #[error("{field} is beyond the current {current}")]
    OutOfRange { field: &'static str, current: u64 },
    /// A per-process limit (e.g. open subscriptions) is reached.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(&'static str),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl ServiceError {
    pub fn invalid(field: impl Into<String>, rule: &'static str) -> Self {
        Self::Domain(DomainError::invalid(field, rule))
    }
}

impl From<AppendError> for ServiceError {
    fn from(error: AppendError) -> Self {
        match error {
            AppendError::VersionConflict { current, .. } => Self::VersionConflict { current },
            AppendError::AlreadyReserved { kind, holder } => Self::AlreadyReserved { kind, holder },
            AppendError::IdempotencyKeyReused { .. } => Self::IdempotencyKeyReused,
            AppendError::Invalid { field, rule } => {
                Self::Domain(DomainError::Invalid(vec![Violation::new(field, rule)]))
            }
            AppendError::WrongStreamType { .. } => Self::Domain(DomainError::NotFound),
            AppendError::ShuttingDown => Self::Unavailable("shutting down".into()),
            AppendError::Unavailable { message, .. } => Self::Unavailable(message),
        }
    }
}

fn info(reason: &str, metadata: Vec<(String, String)>) -> ErrorDetails {
    ErrorDetails::with_error_info(
        reason,
        DOMAIN,
        metadata
            .into_iter()
            .collect::<std::collections::HashMap<_, _>>(),
    )
}

impl From<crm_event_store::ReadError> for ServiceError {
    fn from(error: crm_event_store::ReadError) -> Self {
        use crm_event_store::ReadError;
        match error {
            ReadError::Invalid { field, rule } => Self::invalid(field, rule),
            ReadError::Database(_) | ReadError::Pool(_) => Self::Unavailable(error.to_string()),
            ReadError::Corrupt(_) => Self::Internal(error.to_string()),
        }
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::Unauthenticated(why) => Status::unauthenticated(why),
            ServiceError::Domain(DomainError::Invalid(violations)) => {
                let mut details = ErrorDetails::new();
                for violation in &violations {
                    details.add_bad_request_violation(violation.field.clone(), violation.rule);
                }
                let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
                Status::with_error_details(
                    Code::InvalidArgument,
                    format!("invalid request: {}", fields.join(", ")),
                    details,
                )
            }
            ServiceError::Domain(DomainError::NotFound) => Status::not_found("record not found"),
            ServiceError::Domain(error @ DomainError::PermissionDenied { .. }) => {
                let reason = error.reason();
                Status::with_error_details(
                    Code::PermissionDenied,
                    error.to_string(),
                    info(reason, vec![]),
                )
            }
            ServiceError::Domain(error @ DomainError::AlreadyExists { .. }) => {
                let reason = error.reason();
                Status::with_error_details(
                    Code::AlreadyExists,
                    error.to_string(),
                    info(reason, vec![]),
                )
            }
            ServiceError::Domain(
                ref error @ DomainError::RecordDataInvalid {
                    record,
                    ref violations,
                },
            ) => {
                let reason = error.reason();
                let message = error.to_string();
                let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
                let mut details = info(
                    reason,
                    vec![
                        ("record".to_owned(), record.to_owned()),
                        ("fields".to_owned(), fields.join(",")),
                    ],
                );
                for violation in violations {
                    details.add_precondition_failure_violation(
                        "RECORD_DATA",
                        violation.field.clone(),
                        violation.rule,
                    );
                }
                Status::with_error_details(Code::FailedPrecondition, message, details)
            }
            ServiceError::Domain(error) => {
                let reason = error.reason();
                let metadata = match &error {
                    DomainError::InvalidTransition { from, to } => {
                        vec![
                            ("from".to_owned(), (*from).to_owned()),
                            ("to".to_owned(), (*to).to_owned()),
                        ]
                    }
                    DomainError::InvalidReference { field } => {
                        vec![("field".to_owned(), (*field).to_owned())]
                    }
                    DomainError::ConsentMissing { purpose } => {
                        vec![("purpose".to_owned(), (*purpose).to_owned())]
                    }
                    DomainError::RecordMerged { survivor } => {
                        vec![("survivor".to_owned(), survivor.to_string())]
                    }
                    DomainError::RequiredFieldsMissing { stage, fields } => {
                        vec![
                            ("stage".to_owned(), stage.clone()),
                            ("fields".to_owned(), fields.join(",")),
                        ]
                    }
                    DomainError::FieldOwnedExternally { field } => {
                        vec![("field".to_owned(), (*field).to_owned())]
                    }
                    _ => vec![],
                };
                Status::with_error_details(
                    Code::FailedPrecondition,
                    error.to_string(),
                    info(reason, metadata),
                )
            }
            ServiceError::OutOfRange { field, current } => Status::with_error_details(
                Code::OutOfRange,
                format!("{field} is beyond the current {current}"),
                info(
                    "BEYOND_CURRENT",
                    vec![
                        ("field".to_owned(), field.to_owned()),
                        ("current".to_owned(), current.to_string()),
                    ],
                ),
            ),
            ServiceError::ResourceExhausted(what) => Status::resource_exhausted(what),
            ServiceError::VersionConflict { current } => Status::with_error_details(
                Code::Aborted,
                format!("stream is at version {current}"),
                info(
                    "VERSION_CONFLICT",
                    vec![("current_version".to_owned(), current.to_string())],
                ),
            ),
            ServiceError::AlreadyReserved { kind, holder } => Status::with_error_details(
                Code::AlreadyExists,
                format!("this {kind} already belongs to another record"),
                info(
                    "ALREADY_EXISTS",
                    vec![
                        ("key".to_owned(), kind),
                        ("holder".to_owned(), holder.to_string()),
                    ],
                ),
            ),
            ServiceError::IdempotencyKeyReused => Status::with_error_details(
                Code::FailedPrecondition,
                "the idempotency key was used for a different request",
                info("IDEMPOTENCY_KEY_REUSED", vec![]),
            ),
            ServiceError::Contention | ServiceError::FactMoved => {
                Status::aborted("the record kept changing; retry")
            }
            ServiceError::Unavailable(message) => {
                tracing::warn!(%message, "command unavailable");
                Status::unavailable("temporarily unavailable; retry with the same idempotency key")
            }
            ServiceError::Internal(message) => {
                tracing::error!(%message, "command failed");
                Status::internal("internal error")
            }
        }
    }
}
