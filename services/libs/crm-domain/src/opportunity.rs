//! Opportunity: a deal moving through a pipeline (DOMAIN.md §2.4).
//!
//! `Open(stage) → Won | Lost`, reopenable. A deal keeps the pipeline version
//! it was opened under; stage changes copy the stage's default probability and
//! forecast category, and overrides last until the next stage change.
use jiff::Timestamp;
use jiff::civil::Date;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::{Aggregate, Context, DomainEvent};
use crate::common::{Change, Money, Reason, diff, text_ok};
use crate::error::{DomainError, Violations};
use crate::pipeline::{ForecastCategory, PipelineConfig, Stage, StageKind};
use crate::records::{CommonCommand, CommonEvent, RecordMeta};

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    #[default]
    Open,
    Won,
    Lost,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Won => "won",
            Self::Lost => "lost",
        }
    }
}

/// What the handler knows about other aggregates when the command is decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DealFacts {
    /// The deal's account exists and is active. Only opening a deal reads
    /// it (commands on an open deal leave it false).
    pub account_active: bool,
    /// The pipeline's configuration (all versions).
    pub pipeline: PipelineConfig,
    /// The caller may reopen won deals (sales_manager or admin).
    pub may_reopen_won: bool,
    /// The primary contact a new deal names exists and is usable.
    pub contact_usable: bool,
}

/// Where a deal came from: the lead it was converted from, with the lead's
/// source channel and campaign (for funnels and campaign attribution).
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DealSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lead_id: Option<Uuid>,
    /// The lead's source channel, e.g. `web`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<Uuid>,
}

impl DealSource {
    fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DealDetails {
    pub name: String,
    pub account_id: Uuid,
    pub contact_id: Option<Uuid>,
    pub pipeline_id: Uuid,
    pub stage: String,
    pub amount: Money,
    pub close_date: Date,
    pub owner: String,
    /// Empty for a deal opened directly.
    pub source: DealSource,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForecastPatch {
    pub amount: Option<Money>,
    pub close_date: Option<Date>,
    pub probability_bp: Option<u32>,
    pub category: Option<ForecastCategory>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpportunityCommand {
    /// Sent by the scheduler (`occurred_at` = when the deal became stalled):
    /// `rule` is `stage_age` or `no_touch`, `days` the limit passed;
    /// `stalled` is the handler's fact that the condition still holds.
    FlagStalled {
        rule: String,
        days: u32,
        stalled: bool,
    },
    Open(DealDetails, DealFacts),
    ChangeStage {
        to: String,
        facts: DealFacts,
    },
    ChangeForecastFields(ForecastPatch),
    Win {
        facts: DealFacts,
    },
    Lose {
        reason: Reason,
        competitor: String,
        facts: DealFacts,
    },
    Reopen {
        stage: String,
        facts: DealFacts,
    },
    /// Owner, tags and shares (see [`crate::records`]).
    Common(CommonCommand),
    /// Sent by the pipeline process manager when its pipeline has a newer
    /// version: an open deal moves to it, into the stage of the same key or,
    /// when that version dropped it, the one its mapping names.
    FollowPipeline {
        pipeline: PipelineConfig,
    },
    /// Renames the deal or changes its primary contact (`Some(None)` clears
    /// it); `contact_usable` is the handler's fact that a new contact exists
    /// and is usable.
    UpdateDetails {
        name: Option<String>,
        contact_id: Option<Option<Uuid>>,
        contact_usable: bool,
    },
    /// Replaces the line items; `products_exist` is the handler's fact that
    /// every product is a known product record.
    ChangeLineItems {
        lines: Vec<LineItem>,
        products_exist: bool,
    },
}

/// Product lines a deal may hold.
pub const MAX_LINES: usize = 200;

/// One product line of a deal; its total is quantity × unit price.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineItem {
    pub product_id: Uuid,
    pub quantity: u32,
    pub unit_price: Money,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpportunityLineItemsChanged {
    #[serde(default)]
    pub added: Vec<LineItem>,
    #[serde(default)]
    pub changed: Vec<Change<LineItem>>,
    #[serde(default)]
    pub removed: Vec<LineItem>,
    /// Σ quantity × unit price of the new lines.
    pub total: Money,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpportunityOpened {
    pub name: String,
    pub account_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_id: Option<Uuid>,
    pub pipeline_id: Uuid,
    pub pipeline_version: u32,
    pub stage: String,
    pub amount: Money,
    pub probability_bp: u32,
    pub category: ForecastCategory,
    pub close_date: Date,
    pub owner: String,
    /// The lead it was converted from, if any.
    #[serde(default, skip_serializing_if = "DealSource::is_empty")]
    pub source: DealSource,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Forward,
    Backward,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpportunityStageChanged {
    pub from: String,
    pub to: String,
    pub probability_bp: u32,
    pub category: ForecastCategory,
    pub direction: Direction,
    /// Set when the move follows a new pipeline version that dropped
    /// `from`: the version `to` belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_version: Option<u32>,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DealChanges {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Change<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_id: Option<Change<Option<Uuid>>>,
    /// An open deal following a new version of its pipeline, its stage kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_version: Option<Change<u32>>,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpportunityDetailsUpdated {
    pub changes: DealChanges,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForecastChanges {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<Change<Money>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_date: Option<Change<Date>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probability_bp: Option<Change<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<Change<ForecastCategory>>,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpportunityForecastFieldsChanged {
    pub changes: ForecastChanges,
    pub occurred_at: Timestamp,
}

/// Won: the amount, and the owner as they were (credit goes by snapshot).
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpportunityWon {
    pub amount: Money,
    pub stage: String,
    pub owner: String,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpportunityLost {
    pub reason: Reason,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub competitor: String,
    pub stage: String,
    pub owner: String,
    pub occurred_at: Timestamp,
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpportunityReopened {
    pub previous_outcome: Outcome,
    pub stage: String,
    pub probability_bp: u32,
    pub category: ForecastCategory,
    pub occurred_at: Timestamp,
}

/// An open deal stayed too long in its stage, or without a touch.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpportunityStalled {
    /// `stage_age` or `no_touch`.
    pub rule: String,
    pub days: u32,
    /// The stage it stalled in.
    pub stage: String,
    pub occurred_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum OpportunityEvent {
    Stalled(OpportunityStalled),
    Opened(OpportunityOpened),
    StageChanged(OpportunityStageChanged),
    ForecastFieldsChanged(OpportunityForecastFieldsChanged),
    Won(OpportunityWon),
    Lost(OpportunityLost),
    Reopened(OpportunityReopened),
    Common(CommonEvent),
    LineItemsChanged(OpportunityLineItemsChanged),
    DetailsUpdated(OpportunityDetailsUpdated),
}

impl DomainEvent for OpportunityEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Common(event) => event.event_type(),
            Self::Stalled(_) => "OpportunityStalled",
            Self::Opened(_) => "OpportunityOpened",
            Self::StageChanged(_) => "OpportunityStageChanged",
            Self::ForecastFieldsChanged(_) => "OpportunityForecastFieldsChanged",
            Self::Won(_) => "OpportunityWon",
            Self::Lost(_) => "OpportunityLost",
            Self::Reopened(_) => "OpportunityReopened",
            Self::LineItemsChanged(_) => "OpportunityLineItemsChanged",
            Self::DetailsUpdated(_) => "OpportunityDetailsUpdated",
        }
    }

    fn occurred_at(&self) -> jiff::Timestamp {
        match self {
            Self::Common(event) => event.occurred_at(),
            Self::Stalled(e) => e.occurred_at,
            Self::Opened(e) => e.occurred_at,
            Self::StageChanged(e) => e.occurred_at,
            Self::ForecastFieldsChanged(e) => e.occurred_at,
            Self::Won(e) => e.occurred_at,
            Self::Lost(e) => e.occurred_at,
            Self::Reopened(e) => e.occurred_at,
            Self::LineItemsChanged(e) => e.occurred_at,
            Self::DetailsUpdated(e) => e.occurred_at,
        }
    }

    fn decode<'de, D: serde::Deserializer<'de>>(
        event_type: &str,
        _schema_version: u32,
        payload: D,
    ) -> Result<Option<Self>, D::Error> {
        Ok(Some(match event_type {
            "OpportunityStalled" => Self::Stalled(Deserialize::deserialize(payload)?),
            "OpportunityOpened" => Self::Opened(Deserialize::deserialize(payload)?),
            "OpportunityStageChanged" => Self::StageChanged(Deserialize::deserialize(payload)?),
            "OpportunityForecastFieldsChanged" => {
                Self::ForecastFieldsChanged(Deserialize::deserialize(payload)?)
            }
            "OpportunityWon" => Self::Won(Deserialize::deserialize(payload)?),
            "OpportunityLost" => Self::Lost(Deserialize::deserialize(payload)?),
            "OpportunityReopened" => Self::Reopened(Deserialize::deserialize(payload)?),
            "OpportunityLineItemsChanged" => {
                Self::LineItemsChanged(Deserialize::deserialize(payload)?)
            }
            "OpportunityDetailsUpdated" => Self::DetailsUpdated(Deserialize::deserialize(payload)?),
            _ => return Ok(CommonEvent::decode(event_type, payload)?.map(Self::Common)),
        }))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opportunity {
    pub exists: bool,
    pub outcome: Outcome,
    pub name: String,
    pub account_id: Option<Uuid>,
    pub pipeline_id: Option<Uuid>,
    pub pipeline_version: u32,
    pub stage: String,
    pub amount: Option<Money>,
    pub probability_bp: u32,
    pub category: Option<ForecastCategory>,
    pub close_date: Option<Date>,
    pub owner: String,
    #[serde(default)]
    pub meta: RecordMeta,
    #[serde(default)]
    pub lines: Vec<LineItem>,
    /// Flagged stalled in its current stage (cleared by a stage change).
    #[serde(default)]
    pub stalled: bool,
    /// The primary contact given when the deal was opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_id: Option<Uuid>,
}

/// A new deal's own input (name, amount, owner), checked before its facts
/// matter; the handler checks it before it looks them up.
pub fn validate_details(details: &DealDetails) -> Result<(), DomainError> {
    let mut v = Violations::default();
    v.check(
        text_ok(&details.name, 200, false),
        "name",
        "must be 1 to 200 characters",
    );
    details.amount.validate("amount", &mut v);
    v.check(
        details.amount.amount_minor >= 0,
        "amount.amount_minor",
        "must not be negative",
    );
    v.check(
        text_ok(&details.owner, 200, false),
        "owner",
        "must be 1 to 200 characters",
    );
    v.into_result()
}

/// A deal's name: 1 to 200 characters.
fn v_name(name: &str) -> Result<(), DomainError> {
    let mut v = Violations::default();
    v.check(
        text_ok(name, 200, false),
        "name",
        "must be 1 to 200 characters",
    );
    v.into_result()
}

/// `RequiredFieldsMissing` when a deal with this amount, contact and line
/// count may not enter `stage`.
fn may_enter(
    stage: &Stage,
    amount: Option<&Money>,
    contact_id: Option<Uuid>,
    lines: usize,
) -> Result<(), DomainError> {
    let missing = stage.missing(|field| match field {
        "amount" => amount.is_some_and(|a| a.amount_minor > 0),
        "contact_id" => contact_id.is_some(),
        "line_items" => lines > 0,
        _ => true,
    });
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DomainError::RequiredFieldsMissing {
            stage: stage.key.clone(),
            fields: missing,
        })
    }
}

impl Opportunity {
    /// The move of this open deal to `stage` of `version`; forward unless
    /// the stage comes before its current one. `pipeline_version`: set when
    /// the move changes the deal's version.
    fn moved(
        &self,
        pipeline: &PipelineConfig,
        version: u32,
        stage: &Stage,
        pipeline_version: Option<u32>,
        occurred_at: Timestamp,
    ) -> OpportunityEvent {
        let from_order = pipeline
            .open_order(self.pipeline_version, &self.stage)
            .unwrap_or(0);
        let to_order = pipeline.open_order(version, &stage.key).unwrap_or(0);
        OpportunityEvent::StageChanged(OpportunityStageChanged {
            from: self.stage.clone(),
            to: stage.key.clone(),
            probability_bp: stage.probability_bp,
            category: stage.category,
            direction: if to_order >= from_order {
                Direction::Forward
            } else {
                Direction::Backward
            },
            pipeline_version,
            occurred_at,
        })
    }

    /// Whether this deal may enter `stage` (its required fields).
    fn may_enter(&self, stage: &Stage) -> Result<(), DomainError> {
        may_enter(
            stage,
            self.amount.as_ref(),
            self.contact_id,
            self.lines.len(),
        )
    }

    fn open(&self) -> Result<(), DomainError> {
        if !self.exists {
            return Err(DomainError::NotFound);
        }
        if self.outcome != Outcome::Open {
            return Err(DomainError::InvalidTransition {
                from: self.outcome.name(),
                to: "open stage",
            });
        }
        Ok(())
    }
}

impl Aggregate for Opportunity {
    type Command = OpportunityCommand;
    type Event = OpportunityEvent;
    const STREAM_TYPE: &'static str = "opportunity";
    /// 2: an owner change moves `owner` (the outcome's credit) too; 3: the
    /// state keeps the primary contact (stages may require one); 4: a deal
    /// following a new pipeline version keeps its stalled flag.
    const SNAPSHOT_VERSION: u32 = 4;

    fn exists(&self) -> bool {
        self.exists
    }

    fn creates(command: &OpportunityCommand) -> bool {
        matches!(command, OpportunityCommand::Open(..))
    }

    fn decide(
        &self,
        command: OpportunityCommand,
        context: Context,
    ) -> Result<Vec<OpportunityEvent>, DomainError> {
        let occurred_at = context.occurred_at()?;
        self.meta.refuse_if_archived(matches!(
            command,
            OpportunityCommand::Common(CommonCommand::Restore(_))
        ))?;
        match command {
            OpportunityCommand::FlagStalled {
                rule,
                days,
                stalled,
            } => {
                if !self.exists {
                    return Err(DomainError::NotFound);
                }
                if self.outcome != Outcome::Open {
                    // Won or lost since the scheduler looked.
                    return Err(DomainError::NotApplicable {
                        rule: "stalled deal",
                    });
                }
                if !["stage_age", "no_touch"].contains(&rule.as_str()) {
                    return Err(DomainError::invalid(
                        "rule",
                        "must be stage_age or no_touch",
                    ));
                }
                if !stalled {
                    return Err(DomainError::NotApplicable {
                        rule: "stalled deal",
                    });
                }
                if self.stalled {
                    return Ok(vec![]);
                }
                Ok(vec![OpportunityEvent::Stalled(OpportunityStalled {
                    rule,
                    days,
                    stage: self.stage.clone(),
                    occurred_at,
                })])
            }
            OpportunityCommand::Common(command) => {
                if !self.exists {
                    return Err(DomainError::NotFound);
                }
                Ok(self
                    .meta
                    .decide(command, occurred_at)?
                    .into_iter()
                    .map(OpportunityEvent::Common)
                    .collect())
            }
            OpportunityCommand::Open(details, facts) => {
                if self.exists {
                    return Err(DomainError::AlreadyExists {
                        key: "opportunity_id",
                        holder: None,
                    });
                }
                validate_details(&details)?;
                if !facts.account_active {
                    return Err(DomainError::InvalidReference {
                        field: "account_id",
                    });
                }
                if details.contact_id.is_some() && !facts.contact_usable {
                    return Err(DomainError::InvalidReference {
                        field: "contact_id",
                    });
                }
                let version =
                    facts
                        .pipeline
                        .current_version()
                        .ok_or(DomainError::InvalidReference {
                            field: "pipeline_id",
                        })?;
                let stage = facts
                    .pipeline
                    .stage(version, &details.stage)
                    .filter(|s| s.kind == StageKind::Open)
                    .ok_or(DomainError::InvalidReference { field: "stage" })?;
                may_enter(stage, Some(&details.amount), details.contact_id, 0)?;
                Ok(vec![OpportunityEvent::Opened(OpportunityOpened {
                    name: details.name,
                    account_id: details.account_id,
                    contact_id: details.contact_id,
                    pipeline_id: details.pipeline_id,
                    pipeline_version: version,
                    stage: stage.key.clone(),
                    amount: details.amount,
                    probability_bp: stage.probability_bp,
                    category: stage.category,
                    close_date: details.close_date,
                    owner: details.owner,
                    source: details.source,
                    occurred_at,
                })])
            }
            OpportunityCommand::ChangeStage { to, facts } => {
                self.open()?;
                if to == self.stage {
                    return Ok(vec![]);
                }
                let version = self.pipeline_version;
                let stage = facts
                    .pipeline
                    .stage(version, &to)
                    .filter(|s| s.kind == StageKind::Open)
                    .ok_or(DomainError::InvalidReference { field: "stage" })?;
                self.may_enter(stage)?;
                Ok(vec![self.moved(
                    &facts.pipeline,
                    version,
                    stage,
                    None,
                    occurred_at,
                )])
            }
            OpportunityCommand::FollowPipeline { pipeline } => {
                if !self.exists {
                    return Err(DomainError::NotFound);
                }
                let not_applicable = DomainError::NotApplicable {
                    rule: "pipeline version move",
                };
                if self.outcome != Outcome::Open {
                    return Err(not_applicable);
                }
                let Some((version, to)) = pipeline.follow(self.pipeline_version, &self.stage)
                else {
                    return Err(not_applicable);
                };
                if to == self.stage {
                    return Ok(vec![OpportunityEvent::DetailsUpdated(
                        OpportunityDetailsUpdated {
                            changes: DealChanges {
                                pipeline_version: Some(Change {
                                    old: self.pipeline_version,
                                    new: version,
                                }),
                                ..DealChanges::default()
                            },
                            occurred_at,
                        },
                    )]);
                }
                let stage = pipeline
                    .stage(version, &to)
                    .filter(|s| s.kind == StageKind::Open)
                    .ok_or(not_applicable)?;
                Ok(vec![self.moved(
                    &pipeline,
                    version,
                    stage,
                    Some(version),
                    occurred_at,
                )])
            }
            OpportunityCommand::UpdateDetails {
                name,
                contact_id,
                contact_usable,
            } => {
                if !self.exists {
                    return Err(DomainError::NotFound);
                }
                let name = name.map(|n| n.trim().to_owned());
                if let Some(name) = &name {
                    v_name(name)?;
                }
                if matches!(contact_id, Some(Some(id)) if Some(id) != self.contact_id)
                    && !contact_usable
                {
                    return Err(DomainError::InvalidReference {
                        field: "contact_id",
                    });
                }
                let changes = DealChanges {
                    name: diff(&self.name, name.as_ref()),
                    contact_id: diff(&self.contact_id, contact_id.as_ref()),
                    pipeline_version: None,
                };
                if changes == DealChanges::default() {
                    return Ok(vec![]);
                }
                Ok(vec![OpportunityEvent::DetailsUpdated(
                    OpportunityDetailsUpdated {
                        changes,
                        occurred_at,
                    },
                )])
            }
            OpportunityCommand::ChangeForecastFields(patch) => {
                self.open()?;
                let mut v = Violations::default();
                if let Some(amount) = &patch.amount {
                    amount.validate("amount", &mut v);
                    v.check(
                        amount.amount_minor >= 0,
                        "amount.amount_minor",
                        "must not be negative",
                    );
                    v.check(
                        self.amount
                            .as_ref()
                            .is_none_or(|current| current.currency == amount.currency),
                        "amount.currency",
                        "must stay the deal's currency",
                    );
                }
                if let Some(p) = patch.probability_bp {
                    v.check(p <= 10_000, "probability_bp", "must be 0 to 10000");
                }
                if let Some(category) = patch.category {
                    v.check(
                        category != ForecastCategory::Closed,
                        "category",
                        "must not be closed for an open deal",
                    );
                }
                v.into_result()?;
                let changes = ForecastChanges {
                    amount: self
                        .amount
                        .as_ref()
                        .and_then(|old| diff(old, patch.amount.as_ref())),
                    close_date: self
                        .close_date
                        .and_then(|old| diff(&old, patch.close_date.as_ref())),
                    probability_bp: diff(&self.probability_bp, patch.probability_bp.as_ref()),
                    category: self
                        .category
                        .and_then(|old| diff(&old, patch.category.as_ref())),
                };
                if changes == ForecastChanges::default() {
                    return Ok(vec![]);
                }
                Ok(vec![OpportunityEvent::ForecastFieldsChanged(
                    OpportunityForecastFieldsChanged {
                        changes,
                        occurred_at,
                    },
                )])
            }
            OpportunityCommand::ChangeLineItems {
                lines,
                products_exist,
            } => {
                self.open()?;
                let currency = self
                    .amount
                    .as_ref()
                    .map(|m| m.currency.clone())
                    .unwrap_or_default();
                let mut v = Violations::default();
                v.check(
                    lines.len() <= MAX_LINES,
                    "lines",
                    "must have at most 200 lines",
                );
                let mut products = std::collections::BTreeSet::new();
                // In i128: each line fits an i64, their sum need not.
                let mut total: i128 = 0;
                for (i, line) in lines.iter().enumerate() {
                    v.check(
                        line.quantity > 0,
                        format!("lines[{i}].quantity"),
                        "must be positive",
                    );
                    v.check(
                        line.unit_price.currency == currency,
                        format!("lines[{i}].unit_price.currency"),
                        "must be the deal's currency",
                    );
                    v.check(
                        line.unit_price.amount_minor >= 0
                            && crate::common::amount_ok(line.unit_price.amount_minor),
                        format!("lines[{i}].unit_price.amount_minor"),
                        "must be 0 to 10^15 minor units",
                    );
                    v.check(
                        products.insert(line.product_id),
                        format!("lines[{i}].product_id"),
                        "appears twice",
                    );
                    let line_total = line
                        .unit_price
                        .amount_minor
                        .checked_mul(i64::from(line.quantity));
                    v.check(
                        line_total.is_some(),
                        format!("lines[{i}].quantity"),
                        "times the unit price is out of range",
                    );
                    total += i128::from(line_total.unwrap_or(0));
                }
                // The deal's amount is their sum: refused, not capped.
                let total = i64::try_from(total)
                    .ok()
                    .filter(|t| crate::common::amount_ok(*t));
                v.check(
                    total.is_some(),
                    "lines",
                    "their total must be at most 10^15 minor units",
                );
                let total = total.unwrap_or(0);
                v.into_result()?;
                if !lines.is_empty() && !products_exist {
                    return Err(DomainError::InvalidReference { field: "lines" });
                }
                let find =
                    |list: &[LineItem], id: Uuid| list.iter().find(|l| l.product_id == id).cloned();
                let added: Vec<LineItem> = lines
                    .iter()
                    .filter(|l| find(&self.lines, l.product_id).is_none())
                    .cloned()
                    .collect();
                let removed: Vec<LineItem> = self
                    .lines
                    .iter()
                    .filter(|l| find(&lines, l.product_id).is_none())
                    .cloned()
                    .collect();
                let changed: Vec<Change<LineItem>> = lines
                    .iter()
                    .filter_map(|new| {
                        find(&self.lines, new.product_id)
                            .filter(|old| old != new)
                            .map(|old| Change {
                                old,
                                new: new.clone(),
                            })
                    })
                    .collect();
                if added.is_empty() && removed.is_empty() && changed.is_empty() {
                    return Ok(vec![]);
                }
                let total = Money {
                    amount_minor: total,
                    currency,
                };
                let mut events = vec![OpportunityEvent::LineItemsChanged(
                    OpportunityLineItemsChanged {
                        added,
                        changed,
                        removed,
                        total: total.clone(),
                        occurred_at,
                    },
                )];
                // The new total becomes the deal's amount, as a forecast change.
                if let Some(amount) = self.amount.as_ref().and_then(|old| diff(old, Some(&total))) {
                    events.push(OpportunityEvent::ForecastFieldsChanged(
                        OpportunityForecastFieldsChanged {
                            changes: ForecastChanges {
                                amount: Some(amount),
                                ..ForecastChanges::default()
                            },
                            occurred_at,
                        },
                    ));
                }
                Ok(events)
            }
            OpportunityCommand::Win { facts } => {
                self.open()?;
                let won = facts
                    .pipeline
                    .versions
                    .get(&self.pipeline_version)
                    .and_then(|stages| stages.iter().find(|s| s.kind == StageKind::Won));
                if let Some(won) = won {
                    self.may_enter(won)?;
                }
                // Every won deal needs a positive amount, whatever its
                // pipeline requires.
                let amount = match &self.amount {
                    Some(amount) if amount.amount_minor > 0 => amount.clone(),
                    _ => {
                        return Err(DomainError::RequiredFieldsMissing {
                            stage: won.map_or_else(|| "won".to_owned(), |s| s.key.clone()),
                            fields: vec!["amount"],
                        });
                    }
                };
                Ok(vec![OpportunityEvent::Won(OpportunityWon {
                    amount,
                    stage: self.stage.clone(),
                    owner: self.owner.clone(),
                    occurred_at,
                })])
            }
            OpportunityCommand::Lose {
                reason,
                competitor,
                facts: _,
            } => {
                self.open()?;
                let mut v = Violations::default();
                reason.validate("reason", &mut v);
                v.check(
                    text_ok(&competitor, 200, true),
                    "competitor",
                    "must be at most 200 characters",
                );
                v.into_result()?;
                Ok(vec![OpportunityEvent::Lost(OpportunityLost {
                    reason,
                    competitor,
                    stage: self.stage.clone(),
                    owner: self.owner.clone(),
                    occurred_at,
                })])
            }
            OpportunityCommand::Reopen { stage, facts } => {
                if !self.exists {
                    return Err(DomainError::NotFound);
                }
                if self.outcome == Outcome::Open {
                    return Err(DomainError::InvalidTransition {
                        from: "open",
                        to: "open",
                    });
                }
                if self.outcome == Outcome::Won && !facts.may_reopen_won {
                    return Err(DomainError::PermissionDenied {
                        action: "reopen a won deal",
                    });
                }
                let definition = facts
                    .pipeline
                    .stage(self.pipeline_version, &stage)
                    .filter(|s| s.kind == StageKind::Open)
                    .ok_or(DomainError::InvalidReference { field: "stage" })?;
                self.may_enter(definition)?;
                Ok(vec![OpportunityEvent::Reopened(OpportunityReopened {
                    previous_outcome: self.outcome,
                    stage,
                    probability_bp: definition.probability_bp,
                    category: definition.category,
                    occurred_at,
                })])
            }
        }
    }

    fn evolve(mut self, event: &OpportunityEvent) -> Self {
        match event {
            OpportunityEvent::Stalled(_) => self.stalled = true,
            OpportunityEvent::Common(event) => {
                self.meta.evolve(event);
                // A new owner owns the deal's outcome (win and loss credit).
                if let crate::records::CommonEvent::OwnerChanged(changed) = event {
                    self.owner = changed.new.clone();
                }
            }
            OpportunityEvent::Opened(opened) => {
                self.exists = true;
                self.outcome = Outcome::Open;
                self.name = opened.name.clone();
                self.account_id = Some(opened.account_id);
                self.pipeline_id = Some(opened.pipeline_id);
                self.pipeline_version = opened.pipeline_version;
                self.stage = opened.stage.clone();
                self.amount = Some(opened.amount.clone());
                self.probability_bp = opened.probability_bp;
                self.category = Some(opened.category);
                self.close_date = Some(opened.close_date);
                self.owner = opened.owner.clone();
                self.contact_id = opened.contact_id;
            }
            OpportunityEvent::DetailsUpdated(updated) => {
                if let Some(change) = &updated.changes.name {
                    self.name = change.new.clone();
                }
                if let Some(change) = &updated.changes.contact_id {
                    self.contact_id = change.new;
                }
                if let Some(change) = &updated.changes.pipeline_version {
                    self.pipeline_version = change.new;
                }
            }
            OpportunityEvent::StageChanged(changed) => {
                match changed.pipeline_version {
                    // Following a new pipeline version is no progress: a
                    // stalled deal stays stalled.
                    Some(version) => self.pipeline_version = version,
                    None => self.stalled = false,
                }
                self.stage = changed.to.clone();
                self.probability_bp = changed.probability_bp;
                self.category = Some(changed.category);
            }
            OpportunityEvent::ForecastFieldsChanged(changed) => {
                let c = &changed.changes;
                if let Some(change) = &c.amount {
                    self.amount = Some(change.new.clone());
                }
                if let Some(change) = &c.close_date {
                    self.close_date = Some(change.new);
                }
                if let Some(change) = &c.probability_bp {
                    self.probability_bp = change.new;
                }
                if let Some(change) = &c.category {
                    self.category = Some(change.new);
                }
            }
            OpportunityEvent::LineItemsChanged(changed) => {
                self.lines
                    .retain(|l| !changed.removed.iter().any(|r| r.product_id == l.product_id));
                for change in &changed.changed {
                    if let Some(line) = self
                        .lines
                        .iter_mut()
                        .find(|l| l.product_id == change.new.product_id)
                    {
                        *line = change.new.clone();
                    }
                }
                self.lines.extend(changed.added.iter().cloned());
            }
            OpportunityEvent::Won(_) => {
                self.outcome = Outcome::Won;
                self.probability_bp = 10_000;
                self.category = Some(ForecastCategory::Closed);
            }
            OpportunityEvent::Lost(_) => {
                self.outcome = Outcome::Lost;
                self.probability_bp = 0;
                self.category = Some(ForecastCategory::Omitted);
            }
            OpportunityEvent::Reopened(reopened) => {
                self.outcome = Outcome::Open;
                self.stage = reopened.stage.clone();
                self.probability_bp = reopened.probability_bp;
                self.category = Some(reopened.category);
            }
        }
        self
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pipeline::tests::published;
    use crate::testing::{given, now};

    pub(crate) fn facts() -> DealFacts {
        DealFacts {
            account_active: true,
            pipeline: PipelineConfig::default().replay([published()].iter()),
            may_reopen_won: false,
            contact_usable: true,
        }
    }

    fn eur(amount_minor: i64) -> Money {
        Money {
            amount_minor,
            currency: "EUR".into(),
        }
    }

    fn date() -> Date {
        Date::constant(2026, 12, 31)
    }

    pub(crate) fn details() -> DealDetails {
        DealDetails {
            name: "Acme renewal".into(),
            account_id: Uuid::from_u128(1),
            contact_id: None,
            pipeline_id: Uuid::from_u128(2),
            stage: "qualification".into(),
            amount: eur(30_000_000),
            close_date: date(),
            owner: "user:rep".into(),
            source: DealSource::default(),
        }
    }

    fn opened() -> OpportunityEvent {
        OpportunityEvent::Opened(OpportunityOpened {
            name: "Acme renewal".into(),
            account_id: Uuid::from_u128(1),
            contact_id: None,
            pipeline_id: Uuid::from_u128(2),
            pipeline_version: 1,
            stage: "qualification".into(),
            amount: eur(30_000_000),
            probability_bp: 1000,
            category: ForecastCategory::Pipeline,
            close_date: date(),
            owner: "user:rep".into(),
            source: DealSource::default(),
            occurred_at: now(),
        })
    }

    fn won() -> OpportunityEvent {
        OpportunityEvent::Won(OpportunityWon {
            amount: eur(30_000_000),
            stage: "qualification".into(),
            owner: "user:rep".into(),
            occurred_at: now(),
        })
    }

    #[test]
    fn a_stalled_deal_is_flagged_once_per_stage() {
        let flag = |stalled| OpportunityCommand::FlagStalled {
            rule: "stage_age".into(),
            days: 14,
            stalled,
        };
        let state = given::<Opportunity>([opened()]).when(flag(true)).then_ok();
        assert!(state.stalled);
        let stalled = OpportunityEvent::Stalled(OpportunityStalled {
            rule: "stage_age".into(),
            days: 14,
            stage: state.stage.clone(),
            occurred_at: now(),
        });
        given::<Opportunity>([opened(), stalled])
            .when(flag(true))
            .then(vec![]);
        given::<Opportunity>([opened()])
            .when(flag(false))
            .then_error(DomainError::NotApplicable {
                rule: "stalled deal",
            });
        given::<Opportunity>([opened()])
            .when(OpportunityCommand::FlagStalled {
                rule: "moon_phase".into(),
                days: 1,
                stalled: true,
            })
            .then_invalid(&["rule"]);
    }

    #[test]
    fn open_copies_the_stage_defaults_of_the_current_pipeline_version() {
        given::<Opportunity>([])
            .when(OpportunityCommand::Open(details(), facts()))
            .then(vec![opened()]);
    }

    #[test]
    fn open_refuses_bad_references_and_values() {
        let inactive = DealFacts {
            account_active: false,
            ..facts()
        };
        given::<Opportunity>([])
            .when(OpportunityCommand::Open(details(), inactive))
            .then_error(DomainError::InvalidReference {
                field: "account_id",
            });
        let mut closed_stage = details();
        closed_stage.stage = "won".into();
        given::<Opportunity>([])
            .when(OpportunityCommand::Open(closed_stage, facts()))
            .then_error(DomainError::InvalidReference { field: "stage" });
        given::<Opportunity>([])
            .when(OpportunityCommand::Open(
                details(),
                DealFacts {
                    pipeline: PipelineConfig::default(),
                    ..facts()
                },
            ))
            .then_error(DomainError::InvalidReference {
                field: "pipeline_id",
            });
        let mut bad = details();
        bad.amount = Money {
            amount_minor: -1,
            currency: "euro".into(),
        };
        given::<Opportunity>([])
            .when(OpportunityCommand::Open(bad, facts()))
            .then_invalid(&["amount.currency", "amount.amount_minor"]);
    }

    #[test]
    fn stage_changes_copy_defaults_and_mark_backward_moves() {
        let state = given::<Opportunity>([opened()])
            .when(OpportunityCommand::ChangeStage {
                to: "negotiation".into(),
                facts: facts(),
            })
            .then(vec![OpportunityEvent::StageChanged(
                OpportunityStageChanged {
                    from: "qualification".into(),
                    to: "negotiation".into(),
                    probability_bp: 8000,
                    category: ForecastCategory::Commit,
                    direction: Direction::Forward,
                    pipeline_version: None,
                    occurred_at: now(),
                },
            )]);
        let back = state
            .decide(
                OpportunityCommand::ChangeStage {
                    to: "proposal".into(),
                    facts: facts(),
                },
                crate::Context::at(now()),
            )
            .unwrap();
        assert!(
            matches!(&back[0], OpportunityEvent::StageChanged(c) if c.direction == Direction::Backward && c.probability_bp == 5000)
        );
        given::<Opportunity>([opened()])
            .when(OpportunityCommand::ChangeStage {
                to: "lost".into(),
                facts: facts(),
            })
            .then_error(DomainError::InvalidReference { field: "stage" });
        given::<Opportunity>([opened(), won()])
            .when(OpportunityCommand::ChangeStage {
                to: "proposal".into(),
                facts: facts(),
            })
            .then_error(DomainError::InvalidTransition {
                from: "won",
                to: "open stage",
            });
    }

    #[test]
    fn forecast_overrides_keep_the_currency_and_the_range() {
        let patch = ForecastPatch {
            probability_bp: Some(2500),
            amount: Some(eur(35_000_000)),
            ..ForecastPatch::default()
        };
        let state = given::<Opportunity>([opened()])
            .when(OpportunityCommand::ChangeForecastFields(patch))
            .then(vec![OpportunityEvent::ForecastFieldsChanged(
                OpportunityForecastFieldsChanged {
                    changes: ForecastChanges {
                        amount: Some(Change {
                            old: eur(30_000_000),
                            new: eur(35_000_000),
                        }),
                        probability_bp: Some(Change {
                            old: 1000,
                            new: 2500,
                        }),
                        ..ForecastChanges::default()
                    },
                    occurred_at: now(),
                },
            )]);
        assert_eq!(state.probability_bp, 2500);
        let bad = ForecastPatch {
            amount: Some(Money {
                amount_minor: 1,
                currency: "USD".into(),
            }),
            probability_bp: Some(10_001),
            category: Some(ForecastCategory::Closed),
            ..ForecastPatch::default()
        };
        given::<Opportunity>([opened()])
            .when(OpportunityCommand::ChangeForecastFields(bad))
            .then_invalid(&["amount.currency", "probability_bp", "category"]);
    }

    #[test]
    fn line_items_set_the_amount_and_need_known_products() {
        let line = |product: u128, quantity: u32, price: i64| LineItem {
            product_id: Uuid::from_u128(product),
            quantity,
            unit_price: eur(price),
        };
        let events = given::<Opportunity>([opened()])
            .when(OpportunityCommand::ChangeLineItems {
                lines: vec![line(7, 3, 1_000_000), line(8, 1, 500_000)],
                products_exist: true,
            })
            .result
            .unwrap();
        assert!(
            matches!(&events[0], OpportunityEvent::LineItemsChanged(c) if c.added.len() == 2 && c.total == eur(3_500_000))
        );
        assert!(
            matches!(&events[1], OpportunityEvent::ForecastFieldsChanged(f) if f.changes.amount.as_ref().map(|c| c.new.amount_minor) == Some(3_500_000))
        );
        let state = Opportunity::default().replay([opened()].iter().chain(events.iter()));
        assert_eq!(state.lines.len(), 2);
        let again = state
            .decide(
                OpportunityCommand::ChangeLineItems {
                    lines: vec![line(7, 3, 1_000_000), line(8, 2, 500_000)],
                    products_exist: true,
                },
                crate::Context::at(now()),
            )
            .unwrap();
        assert!(
            matches!(&again[0], OpportunityEvent::LineItemsChanged(c) if c.changed.len() == 1 && c.added.is_empty())
        );
        given::<Opportunity>([opened()])
            .when(OpportunityCommand::ChangeLineItems {
                lines: vec![line(7, 1, 1)],
                products_exist: false,
            })
            .then_error(DomainError::InvalidReference { field: "lines" });
        given::<Opportunity>([opened()])
            .when(OpportunityCommand::ChangeLineItems {
                lines: vec![line(7, 0, 1), line(7, 1, 1)],
                products_exist: true,
            })
            .then_invalid(&["lines[0].quantity", "lines[1].product_id"]);
        // Amounts beyond i64 are refused, not capped.
        given::<Opportunity>([opened()])
            .when(OpportunityCommand::ChangeLineItems {
                lines: vec![line(7, u32::MAX, 10_000_000_000)],
                products_exist: true,
            })
            .then_invalid(&["lines[0].quantity"]);
        given::<Opportunity>([opened()])
            .when(OpportunityCommand::ChangeLineItems {
                lines: vec![line(7, 1, i64::MAX), line(8, 1, 1)],
                products_exist: true,
            })
            .then_invalid(&["lines[0].unit_price.amount_minor", "lines"]);
        // Each price and their total stay within MAX_AMOUNT_MINOR, so the
        // read models' sums stay within 64 bits.
        given::<Opportunity>([opened()])
            .when(OpportunityCommand::ChangeLineItems {
                lines: vec![line(7, 2, 600_000_000_000_000)],
                products_exist: true,
            })
            .then_invalid(&["lines"]);
        let too_much = DealDetails {
            name: "Acme renewal".into(),
            account_id: Uuid::from_u128(1),
            contact_id: None,
            pipeline_id: Uuid::from_u128(2),
            stage: "qualification".into(),
            amount: eur(crate::common::MAX_AMOUNT_MINOR + 1),
            close_date: date(),
            owner: "user:rep".into(),
            source: DealSource::default(),
        };
        assert_eq!(
            validate_details(&too_much),
            Err(DomainError::invalid(
                "amount.amount_minor",
                "must be at most 10^15 minor units either way"
            ))
        );
    }

    #[test]
    fn win_lose_and_reopen() {
        given::<Opportunity>([opened()])
            .when(OpportunityCommand::Win { facts: facts() })
            .then(vec![won()]);
        let free = OpportunityEvent::ForecastFieldsChanged(OpportunityForecastFieldsChanged {
            changes: ForecastChanges {
                amount: Some(Change {
                    old: eur(30_000_000),
                    new: eur(0),
                }),
                ..ForecastChanges::default()
            },
            occurred_at: now(),
        });
        given::<Opportunity>([opened(), free])
            .when(OpportunityCommand::Win { facts: facts() })
            .then_error(DomainError::RequiredFieldsMissing {
                stage: "won".into(),
                fields: vec!["amount"],
            });
        let reason = Reason {
            code: "price".into(),
            text: String::new(),
        };
        given::<Opportunity>([opened()])
            .when(OpportunityCommand::Lose {
                reason: reason.clone(),
                competitor: "Initech".into(),
                facts: facts(),
            })
            .then(vec![OpportunityEvent::Lost(OpportunityLost {
                reason,
                competitor: "Initech".into(),
                stage: "qualification".into(),
                owner: "user:rep".into(),
                occurred_at: now(),
            })]);
        given::<Opportunity>([opened(), won()])
            .when(OpportunityCommand::Reopen {
                stage: "proposal".into(),
                facts: facts(),
            })
            .then_error(DomainError::PermissionDenied {
                action: "reopen a won deal",
            });
        let manager = DealFacts {
            may_reopen_won: true,
            ..facts()
        };
        let state = given::<Opportunity>([opened(), won()])
            .when(OpportunityCommand::Reopen {
                stage: "proposal".into(),
                facts: manager,
            })
            .then(vec![OpportunityEvent::Reopened(OpportunityReopened {
                previous_outcome: Outcome::Won,
                stage: "proposal".into(),
                probability_bp: 5000,
                category: ForecastCategory::BestCase,
                occurred_at: now(),
            })]);
        assert_eq!(state.outcome, Outcome::Open);
        given::<Opportunity>([opened()])
            .when(OpportunityCommand::Reopen {
                stage: "proposal".into(),
                facts: facts(),
            })
            .then_error(DomainError::InvalidTransition {
                from: "open",
                to: "open",
            });
    }

    #[test]
    fn a_new_owner_is_credited_with_the_win() {
        let changed = OpportunityEvent::Common(crate::records::CommonEvent::OwnerChanged(
            crate::records::OwnerChanged {
                old: Some("user:rep".into()),
                new: "user:other".into(),
                team: None,
                method: "manual".into(),
                occurred_at: now(),
            },
        ));
        let events = given::<Opportunity>([opened(), changed])
            .when(OpportunityCommand::Win { facts: facts() })
            .result
            .unwrap();
        assert!(matches!(&events[0], OpportunityEvent::Won(won) if won.owner == "user:other"));
    }

    /// The standard pipeline where `proposal` needs a contact and line items
    /// and `won` a contact.
    fn demanding() -> DealFacts {
        let mut stages = crate::pipeline::tests::standard();
        for stage in &mut stages {
            stage.required_fields = match stage.key.as_str() {
                "proposal" => vec!["line_items".into(), "contact_id".into()],
                "won" => vec!["contact_id".into()],
                _ => vec![],
            };
        }
        DealFacts {
            pipeline: PipelineConfig::default().replay(
                [crate::pipeline::PipelineEvent::Published(
                    crate::pipeline::PipelinePublished {
                        version: 1,
                        name: "Sales".into(),
                        stages,
                        stage_mapping: Default::default(),
                        occurred_at: now(),
                    },
                )]
                .iter(),
            ),
            ..facts()
        }
    }

    #[test]
    fn stages_refuse_deals_without_their_required_fields() {
        let missing = |fields: Vec<&'static str>, stage: &str| DomainError::RequiredFieldsMissing {
            stage: stage.into(),
            fields,
        };
        given::<Opportunity>([opened()])
            .when(OpportunityCommand::ChangeStage {
                to: "proposal".into(),
                facts: demanding(),
            })
            .then_error(missing(vec!["contact_id", "line_items"], "proposal"));
        given::<Opportunity>([])
            .when(OpportunityCommand::Open(
                DealDetails {
                    stage: "proposal".into(),
                    contact_id: Some(Uuid::from_u128(5)),
                    ..details()
                },
                demanding(),
            ))
            .then_error(missing(vec!["line_items"], "proposal"));
        given::<Opportunity>([opened()])
            .when(OpportunityCommand::Win { facts: demanding() })
            .then_error(missing(vec!["contact_id"], "won"));

        // With a contact and a line, the deal moves and wins.
        let with_contact = match opened() {
            OpportunityEvent::Opened(o) => OpportunityEvent::Opened(OpportunityOpened {
                contact_id: Some(Uuid::from_u128(5)),
                ..o
            }),
            _ => unreachable!(),
        };
        let state = given::<Opportunity>([with_contact])
            .when(OpportunityCommand::ChangeLineItems {
                lines: vec![LineItem {
                    product_id: Uuid::from_u128(7),
                    quantity: 2,
                    unit_price: eur(1_000),
                }],
                products_exist: true,
            })
            .then_ok();
        let events = state
            .decide(
                OpportunityCommand::ChangeStage {
                    to: "proposal".into(),
                    facts: demanding(),
                },
                crate::aggregate::Context::at(now()),
            )
            .expect("all required fields present");
        let state = state.replay(events.iter());
        assert_eq!(state.stage, "proposal");
        let won = state
            .decide(
                OpportunityCommand::Win { facts: demanding() },
                crate::aggregate::Context::at(now()),
            )
            .expect("the won stage's contact is there");
        assert!(matches!(won[0], OpportunityEvent::Won(_)));
    }

    #[test]
    fn details_change_only_what_differs_and_contacts_must_be_usable() {
        let update = |name: Option<&str>, contact: Option<Option<u128>>, usable: bool| {
            OpportunityCommand::UpdateDetails {
                name: name.map(Into::into),
                contact_id: contact.map(|c| c.map(Uuid::from_u128)),
                contact_usable: usable,
            }
        };
        given::<Opportunity>([opened()])
            .when(update(Some(" Acme renewal "), Some(None), true))
            .then(vec![]);
        given::<Opportunity>([opened()])
            .when(update(None, Some(Some(5)), false))
            .then_error(DomainError::InvalidReference {
                field: "contact_id",
            });
        given::<Opportunity>([opened()])
            .when(update(Some(""), None, true))
            .then_invalid(&["name"]);
        given::<Opportunity>([])
            .when(update(Some("X"), None, true))
            .then_error(DomainError::NotFound);
        let state = given::<Opportunity>([opened()])
            .when(update(Some("Acme expansion"), Some(Some(5)), true))
            .then(vec![OpportunityEvent::DetailsUpdated(
                OpportunityDetailsUpdated {
                    changes: DealChanges {
                        name: Some(Change {
                            old: "Acme renewal".into(),
                            new: "Acme expansion".into(),
                        }),
                        contact_id: Some(Change {
                            old: None,
                            new: Some(Uuid::from_u128(5)),
                        }),
                        pipeline_version: None,
                    },
                    occurred_at: now(),
                },
            )]);
        assert_eq!(state.contact_id, Some(Uuid::from_u128(5)));
    }

    #[test]
    fn open_deals_follow_a_new_pipeline_version() {
        use crate::pipeline::{PipelineEvent, PipelinePublished};
        let mut next = crate::pipeline::tests::standard();
        next.remove(0); // qualification, mapped to proposal
        let v2 = PipelineEvent::Published(PipelinePublished {
            version: 2,
            name: "Sales".into(),
            stages: next,
            stage_mapping: [("qualification".to_owned(), "proposal".to_owned())].into(),
            occurred_at: now(),
        });
        let pipeline = facts().pipeline.replay([v2].iter());
        let follow = || OpportunityCommand::FollowPipeline {
            pipeline: pipeline.clone(),
        };
        let moved = given::<Opportunity>([opened()]).when(follow()).then(vec![
            OpportunityEvent::StageChanged(OpportunityStageChanged {
                from: "qualification".into(),
                to: "proposal".into(),
                probability_bp: 5000,
                category: ForecastCategory::BestCase,
                direction: Direction::Forward,
                pipeline_version: Some(2),
                occurred_at: now(),
            }),
        ]);
        assert_eq!(
            (moved.pipeline_version, moved.stage.as_str()),
            (2, "proposal")
        );
        // A stalled deal that follows stays stalled: it did not progress.
        let stalled = OpportunityEvent::Stalled(OpportunityStalled {
            rule: "stage_age".into(),
            days: 14,
            stage: "qualification".into(),
            occurred_at: now(),
        });
        let still = given::<Opportunity>([opened(), stalled])
            .when(follow())
            .then_ok();
        assert!(still.stalled);
        // Current already: nothing applies.
        assert_eq!(
            moved.decide(follow(), crate::aggregate::Context::at(now())),
            Err(DomainError::NotApplicable {
                rule: "pipeline version move"
            })
        );
        // A deal in a kept stage only changes version.
        let in_negotiation = OpportunityEvent::StageChanged(OpportunityStageChanged {
            from: "qualification".into(),
            to: "negotiation".into(),
            probability_bp: 8000,
            category: ForecastCategory::Commit,
            direction: Direction::Forward,
            pipeline_version: None,
            occurred_at: now(),
        });
        let kept = given::<Opportunity>([opened(), in_negotiation])
            .when(follow())
            .then(vec![OpportunityEvent::DetailsUpdated(
                OpportunityDetailsUpdated {
                    changes: DealChanges {
                        pipeline_version: Some(Change { old: 1, new: 2 }),
                        ..DealChanges::default()
                    },
                    occurred_at: now(),
                },
            )]);
        assert_eq!(
            (kept.pipeline_version, kept.stage.as_str()),
            (2, "negotiation")
        );
        // Closed deals keep their version.
        given::<Opportunity>([opened(), won()])
            .when(follow())
            .then_error(DomainError::NotApplicable {
                rule: "pipeline version move",
            });
    }
}
