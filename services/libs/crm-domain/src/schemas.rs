//! JSON Schemas of every event payload, per stream type, event type and
//! schema version, generated from the Rust types (feature `schemas`).
//! `crm schemas write` stores them under `schemas/`; a test fails when the
//! checked-in files differ from what the code generates.
use schemars::{JsonSchema, Schema, SchemaGenerator};

use crate::account::{
    AccountBecameCustomer, AccountChurnRiskFlagged, AccountChurned, AccountCreated,
    AccountDetailsUpdated, AccountMergedInto, AccountsMerged,
};
use crate::activity::{
    ActivityCompleted, ActivityDetailsUpdated, ActivityLogged, ActivityScheduled, TaskOverdue,
};
use crate::campaign::{
    CampaignCostRecorded, CampaignDetailsUpdated, CampaignMemberAdded, CampaignMemberAddedV1,
    CampaignMemberResponded, CampaignMemberRespondedV1, CampaignPlanned,
};
use crate::commerce::{
    InvoiceIssued, OrderCancelled, OrderRecorded, PaymentReceived, ProductRecorded, RefundIssued,
};
use crate::common::LifecycleChanged;
use crate::configuration::{
    AgentAvailability, BusinessCalendar, CommissionPlan, Published, Queue, SlaPolicy, Team,
    TenantSettings,
};
use crate::contact::{
    ContactConsentChanged, ContactCreated, ContactCreatedV1, ContactDetailsUpdated,
    ContactLinkedToAccount, ContactUnlinkedFromAccount, NpsResponseRecorded, PersonalDataErased,
    RecordMergedInto, RecordsMerged,
};
use crate::duplicates::{DuplicateDismissed, DuplicateSuspected};
use crate::lead::{
    LeadCaptured, LeadConverted, LeadDetailsUpdated, LeadMergedInto, LeadStatusChanged, LeadsMerged,
};
use crate::opportunity::{
    OpportunityDetailsUpdated, OpportunityForecastFieldsChanged, OpportunityLineItemsChanged,
    OpportunityLost, OpportunityOpened, OpportunityReopened, OpportunityStageChanged,
    OpportunityStalled, OpportunityWon,
};
use crate::pipeline::PipelinePublished;
use crate::records::{OwnerChanged, RecordShareRevoked, RecordShared, TagsChanged};
use crate::sla::{SlaAlarm, SlaClockPaused, SlaClockResumed, SlaPolicyApplied, SlaTargetMet};
use crate::targets::SalesTargetAllocated;
use crate::ticket::{
    CsatRatingReceived, TicketAssigned, TicketClosed, TicketEscalated, TicketMessageAdded,
    TicketOpened, TicketReopened, TicketSolved, TicketStatusChanged, TicketTriaged,
};

/// One event payload's schema.
pub struct EventSchema {
    pub stream_type: &'static str,
    pub event_type: &'static str,
    pub schema_version: u32,
    pub schema: Schema,
}

impl EventSchema {
    /// Path under `schemas/`, e.g. `contact/ContactCreated.v2.json`.
    pub fn path(&self) -> String {
        format!(
            "{}/{}.v{}.json",
            self.stream_type, self.event_type, self.schema_version
        )
    }
}

fn schema<T: JsonSchema>(
    stream_type: &'static str,
    event_type: &'static str,
    schema_version: u32,
) -> EventSchema {
    let mut schema = SchemaGenerator::default().into_root_schema_for::<T>();
    schema.insert(
        "$id".to_owned(),
        format!("https://crm.example/schemas/{stream_type}/{event_type}.v{schema_version}.json")
            .into(),
    );
    schema.insert("title".to_owned(), event_type.into());
    schema.insert("x-schema-version".to_owned(), schema_version.into());
    EventSchema {
        stream_type,
        event_type,
        schema_version,
        schema,
    }
}

/// Every event type of every aggregate, each version that may be stored.
pub fn event_schemas() -> Vec<EventSchema> {
    let mut schemas = vec![
        schema::<ActivityLogged>("activity", "ActivityLogged", 1),
        schema::<ActivityScheduled>("activity", "ActivityScheduled", 1),
        schema::<ActivityCompleted>("activity", "ActivityCompleted", 1),
        schema::<ActivityDetailsUpdated>("activity", "ActivityDetailsUpdated", 1),
        schema::<TaskOverdue>("activity", "TaskOverdue", 1),
        schema::<AccountCreated>("account", "AccountCreated", 1),
        schema::<AccountsMerged>("account", "RecordsMerged", 1),
        schema::<AccountMergedInto>("account", "RecordMergedInto", 1),
        schema::<ProductRecorded>("product", "ProductRecorded", 1),
        schema::<OrderRecorded>("order", "OrderRecorded", 1),
        schema::<OrderCancelled>("order", "OrderCancelled", 1),
        schema::<InvoiceIssued>("invoice", "InvoiceIssued", 1),
        schema::<PaymentReceived>("payment", "PaymentReceived", 1),
        schema::<RefundIssued>("payment", "RefundIssued", 1),
        schema::<CampaignPlanned>("campaign", "CampaignPlanned", 1),
        schema::<CampaignDetailsUpdated>("campaign", "CampaignDetailsUpdated", 1),
        schema::<CampaignCostRecorded>("campaign", "CampaignCostRecorded", 1),
        schema::<CampaignMemberAddedV1>("campaign", "CampaignMemberAdded", 1),
        schema::<CampaignMemberAdded>("campaign", "CampaignMemberAdded", 2),
        schema::<CampaignMemberRespondedV1>("campaign", "CampaignMemberResponded", 1),
        schema::<CampaignMemberResponded>("campaign", "CampaignMemberResponded", 2),
        schema::<AccountDetailsUpdated>("account", "AccountDetailsUpdated", 1),
        schema::<AccountBecameCustomer>("account", "AccountBecameCustomer", 1),
        schema::<AccountChurned>("account", "AccountChurned", 1),
        schema::<AccountChurnRiskFlagged>("account", "AccountChurnRiskFlagged", 1),
        schema::<LifecycleChanged>("account", "RecordArchived", 1),
        schema::<LifecycleChanged>("account", "RecordRestored", 1),
        schema::<ContactCreatedV1>("contact", "ContactCreated", 1),
        schema::<ContactCreated>("contact", "ContactCreated", 2),
        schema::<ContactDetailsUpdated>("contact", "ContactDetailsUpdated", 1),
        schema::<ContactConsentChanged>("contact", "ContactConsentChanged", 1),
        schema::<LifecycleChanged>("contact", "RecordArchived", 1),
        schema::<LifecycleChanged>("contact", "RecordRestored", 1),
        schema::<ContactLinkedToAccount>("contact", "ContactLinkedToAccount", 1),
        schema::<RecordsMerged>("contact", "RecordsMerged", 1),
        schema::<PersonalDataErased>("contact", "PersonalDataErased", 1),
        schema::<PersonalDataErased>("lead", "PersonalDataErased", 1),
        schema::<PersonalDataErased>("account", "PersonalDataErased", 1),
        schema::<ContactUnlinkedFromAccount>("contact", "ContactUnlinkedFromAccount", 1),
        schema::<NpsResponseRecorded>("contact", "NpsResponseRecorded", 1),
        schema::<RecordMergedInto>("contact", "RecordMergedInto", 1),
        schema::<LeadCaptured>("lead", "LeadCaptured", 1),
        schema::<LeadStatusChanged>("lead", "LeadStatusChanged", 1),
        schema::<LeadDetailsUpdated>("lead", "LeadDetailsUpdated", 1),
        schema::<LeadsMerged>("lead", "RecordsMerged", 1),
        schema::<LeadMergedInto>("lead", "RecordMergedInto", 1),
        schema::<LeadConverted>("lead", "LeadConverted", 1),
        schema::<OpportunityOpened>("opportunity", "OpportunityOpened", 1),
        schema::<OpportunityStalled>("opportunity", "OpportunityStalled", 1),
        schema::<OpportunityStageChanged>("opportunity", "OpportunityStageChanged", 1),
        schema::<OpportunityForecastFieldsChanged>(
            "opportunity",
            "OpportunityForecastFieldsChanged",
            1,
        ),
        schema::<OpportunityWon>("opportunity", "OpportunityWon", 1),
        schema::<OpportunityLineItemsChanged>("opportunity", "OpportunityLineItemsChanged", 1),
        schema::<OpportunityDetailsUpdated>("opportunity", "OpportunityDetailsUpdated", 1),
        schema::<OpportunityLost>("opportunity", "OpportunityLost", 1),
        schema::<OpportunityReopened>("opportunity", "OpportunityReopened", 1),
        schema::<PipelinePublished>("pipeline_config", "PipelinePublished", 1),
        schema::<Published<BusinessCalendar>>("business_calendar", "BusinessCalendarPublished", 1),
        schema::<Published<SlaPolicy>>("sla_policy", "SlaPolicyPublished", 1),
        schema::<Published<CommissionPlan>>("commission_plan", "CommissionPlanPublished", 1),
        schema::<Published<Queue>>("queue", "QueuePublished", 1),
        schema::<Published<TenantSettings>>("tenant_settings", "TenantSettingsPublished", 1),
        schema::<Published<Team>>("team", "TeamPublished", 1),
        schema::<SalesTargetAllocated>("sales_target", "SalesTargetAllocated", 1),
        schema::<Published<AgentAvailability>>("agent", "AgentAvailabilityChanged", 1),
        schema::<TicketOpened>("ticket", "TicketOpened", 1),
        schema::<TicketTriaged>("ticket", "TicketTriaged", 1),
        schema::<TicketAssigned>("ticket", "TicketAssigned", 1),
        schema::<TicketMessageAdded>("ticket", "TicketMessageAdded", 1),
        schema::<TicketStatusChanged>("ticket", "TicketStatusChanged", 1),
        schema::<TicketEscalated>("ticket", "TicketEscalated", 1),
        schema::<TicketSolved>("ticket", "TicketSolved", 1),
        schema::<TicketReopened>("ticket", "TicketReopened", 1),
        schema::<TicketClosed>("ticket", "TicketClosed", 1),
        schema::<CsatRatingReceived>("ticket", "CsatRatingReceived", 1),
        schema::<SlaPolicyApplied>("ticket_sla", "SlaPolicyApplied", 1),
        schema::<SlaClockPaused>("ticket_sla", "SlaClockPaused", 1),
        schema::<SlaClockResumed>("ticket_sla", "SlaClockResumed", 1),
        schema::<SlaAlarm>("ticket_sla", "SlaWarningReached", 1),
        schema::<SlaAlarm>("ticket_sla", "SlaBreached", 1),
        schema::<SlaTargetMet>("ticket_sla", "SlaTargetMet", 1),
        schema::<DuplicateSuspected>("duplicate_pair", "DuplicateSuspected", 1),
        schema::<DuplicateDismissed>("duplicate_pair", "DuplicateDismissed", 1),
    ];
    // The shared record events, on every main record type.
    for stream_type in ["account", "contact", "lead", "opportunity", "ticket"] {
        schemas.push(schema::<OwnerChanged>(stream_type, "OwnerChanged", 1));
        schemas.push(schema::<TagsChanged>(stream_type, "TagsChanged", 1));
        schemas.push(schema::<RecordShared>(stream_type, "RecordShared", 1));
        schemas.push(schema::<RecordShareRevoked>(
            stream_type,
            "RecordShareRevoked",
            1,
        ));
    }
    // Contacts and accounts list their own archive events above.
    for stream_type in ["lead", "opportunity", "ticket"] {
        schemas.push(schema::<LifecycleChanged>(stream_type, "RecordArchived", 1));
        schemas.push(schema::<LifecycleChanged>(stream_type, "RecordRestored", 1));
    }
    schemas
}
