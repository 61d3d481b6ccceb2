//! Who is calling: tenant and actor from request metadata (credentials come
//! with the authentication work), plus the trace identifiers stored with
//! every event.
use crm_domain::TenantId;
use crm_event_store::Metadata;
use tonic::metadata::MetadataMap;
use uuid::Uuid;

use super::{Options, ServiceError};

#[derive(Clone, Debug)]
pub struct Caller {
    pub tenant: TenantId,
    pub actor: String,
    /// Role codes from `x-roles` (comma-separated), e.g. `sales_manager`.
    pub roles: Vec<String>,
    pub correlation_id: String,
    pub causation_id: Option<String>,
    pub traceparent: Option<String>,
}

fn text<'a>(
    metadata: &'a MetadataMap,
    name: &'static str,
) -> Result<Option<&'a str>, ServiceError> {
    match metadata.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(Some)
            .map_err(|_| ServiceError::invalid(name, "must be visible ASCII")),
    }
}

fn bounded(name: &'static str, value: &str) -> Result<String, ServiceError> {
    if value.is_empty() || value.len() > 200 {
        return Err(ServiceError::invalid(name, "must be 1 to 200 characters"));
    }
    Ok(value.to_owned())
}

impl Caller {
    /// The system itself (the scheduler, process managers) acting in a
    /// tenant: role `system`, a fresh correlation id.
    pub fn system(tenant: TenantId, actor: &str) -> Self {
        Self {
            tenant,
            actor: actor.to_owned(),
            roles: vec!["system".to_owned()],
            correlation_id: Uuid::now_v7().to_string(),
            causation_id: None,
            traceparent: None,
        }
    }

    pub fn from_metadata(metadata: &MetadataMap) -> Result<Self, ServiceError> {
        let tenant = text(metadata, "x-tenant-id")?
            .ok_or(ServiceError::Unauthenticated("missing x-tenant-id"))?;
        let tenant = TenantId::parse(tenant).map_err(|_| {
            ServiceError::invalid("x-tenant-id", "must be 1 to 64 of [A-Za-z0-9_-]")
        })?;
        let actor = text(metadata, "x-actor-id")?
            .ok_or(ServiceError::Unauthenticated("missing x-actor-id"))?;
        let actor = bounded("x-actor-id", actor)?;
        let roles = match text(metadata, "x-roles")? {
            None => Vec::new(),
            Some(roles) => roles
                .split(',')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(|r| {
                    if crm_domain::common::is_code(r, 64) {
                        Ok(r.to_owned())
                    } else {
                        Err(ServiceError::invalid(
                            "x-roles",
                            "must be role codes of [a-z0-9_], comma-separated",
                        ))
                    }
                })
                .collect::<Result<_, _>>()?,
        };
        let correlation_id = match text(metadata, "x-correlation-id")? {
            Some(id) => bounded("x-correlation-id", id)?,
            None => Uuid::now_v7().to_string(),
        };
        let causation_id = text(metadata, "x-causation-id")?
            .map(|id| bounded("x-causation-id", id))
            .transpose()?;
        // W3C trace context: version-traceid-parentid-flags, 55 characters.
        let traceparent = text(metadata, "traceparent")?
            .filter(|t| t.len() == 55 && t.split('-').count() == 4)
            .map(str::to_owned);
        Ok(Self {
            tenant,
            actor,
            roles,
            correlation_id,
            causation_id,
            traceparent,
        })
    }

    pub(crate) fn metadata(&self, options: &Options) -> Metadata {
        Metadata {
            actor: self.actor.clone(),
            roles: self.roles.clone(),
            correlation_id: Some(self.correlation_id.clone()),
            causation_id: self.causation_id.clone(),
            command_id: options.idempotency_key.clone(),
            traceparent: self.traceparent.clone(),
        }
    }
}
