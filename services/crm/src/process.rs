//! What every process manager shares: it runs on the projection runtime (a
//! durable consumer, events in log order, its own tables written with its
//! position) and sends commands as a system actor, each with the
//! idempotency key `<prefix>:<triggering event id>:<n>` — so a redelivery, a
//! restart or a batch retried after an error appends nothing twice.
use crm_domain::{Aggregate, DomainError, TenantId};
use crm_event_store::RecordedEvent;
use crm_projections::ApplyError;
use jiff::Timestamp;
use uuid::Uuid;

use crate::command::{Caller, CommandHandler, Options, ServiceError};

/// Sends a process manager's commands.
#[derive(Clone)]
pub struct Sender {
    handler: CommandHandler,
    prefix: &'static str,
    actor: &'static str,
}

impl Sender {
    pub fn new(handler: CommandHandler, prefix: &'static str, actor: &'static str) -> Self {
        Self {
            handler,
            prefix,
            actor,
        }
    }

    /// Sends one command caused by `event`; `n` numbers the commands one
    /// event triggers. A merged record's command goes to its survivor. A
    /// command that no longer applies (`NOT_APPLICABLE`, a record that moved
    /// on, was archived, erased or is gone) is done; an unavailable store or
    /// a busy record is retried by the runtime; any other refusal stops the
    /// process manager loudly. The writes `tx` has queued go to PostgreSQL
    /// first, so a command never goes out ahead of a write before it that
    /// fails.
    pub async fn send<A: Aggregate>(
        &self,
        tx: &crm_projections::Tx<'_>,
        event: &RecordedEvent,
        n: usize,
        stream_id: Uuid,
        occurred_at: Timestamp,
        command: A::Command,
    ) -> Result<(), ApplyError>
    where
        A::Command: Clone,
    {
        tx.flush().await?;
        let tenant = TenantId::parse(&event.tenant_id).map_err(|e| malformed(event, e))?;
        let mut caller = Caller::system(tenant, self.actor);
        caller.causation_id = Some(event.event_id.to_string());
        let key = format!("{}:{}:{n}", self.prefix, event.event_id);
        let options = Options::internal(key, occurred_at);
        let mut stream_id = stream_id;
        // A merged record answers for its survivor (one hop per merge).
        for _ in 0..4 {
            match self
                .handler
                .execute::<A>(&caller, stream_id, &options, command.clone())
                .await
            {
                Err(ServiceError::Domain(DomainError::RecordMerged { survivor })) => {
                    stream_id = survivor;
                }
                outcome => return self.settle(event, outcome),
            }
        }
        Err(malformed(
            event,
            format!("{} command: merges chained too deep", self.prefix),
        ))
    }

    fn settle<T>(
        &self,
        event: &RecordedEvent,
        outcome: Result<T, ServiceError>,
    ) -> Result<(), ApplyError> {
        match outcome {
            Ok(_)
            | Err(ServiceError::Domain(
                DomainError::NotApplicable { .. } | DomainError::InvalidTransition { .. },
            )) => Ok(()),
            // The record went away meanwhile: nothing left to do.
            Err(ServiceError::Domain(
                DomainError::RecordArchived | DomainError::RecordErased | DomainError::NotFound,
            )) => {
                tracing::info!(prefix = self.prefix, event = %event.event_id, "record gone; command dropped");
                Ok(())
            }
            Err(
                error @ (ServiceError::Unavailable(_)
                | ServiceError::Contention
                | ServiceError::VersionConflict { .. }),
            ) => Err(ApplyError::Transient(error.to_string())),
            Err(error) => Err(malformed(
                event,
                format!("{} command refused: {error}", self.prefix),
            )),
        }
    }
}

/// A payload the process manager cannot use: it stops on it.
pub fn malformed(event: &RecordedEvent, reason: impl std::fmt::Display) -> ApplyError {
    ApplyError::Payload {
        event_type: event.event_type.clone(),
        reason: reason.to_string(),
    }
}

pub use crm_projections::decode;
