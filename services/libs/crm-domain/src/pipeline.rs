//! Pipeline configuration (DOMAIN.md §2.10): versioned stage lists. Closed
//! deals keep the version they closed under. Open deals follow each new
//! version (a process manager moves them): a deal whose open stage the new
//! version drops goes to the stage the version's `stage_mapping` names, so
//! a version that drops an open stage must map it.
use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregate, Context, DomainEvent};
use crate::common::{is_code, text_ok};
use crate::error::{DomainError, Violations};

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    Open,
    Won,
    Lost,
}

/// Forecast categories, nested: closed ⊂ commit ⊂ best case ⊂ pipeline.
#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForecastCategory {
    Pipeline,
    BestCase,
    Commit,
    Closed,
    Omitted,
}

impl ForecastCategory {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "pipeline" => Self::Pipeline,
            "best_case" => Self::BestCase,
            "commit" => Self::Commit,
            "closed" => Self::Closed,
            "omitted" => Self::Omitted,
            _ => return None,
        })
    }
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// Stable code, e.g. `proposal`.
    pub key: String,
    pub name: String,
    pub kind: StageKind,
    /// Default probability in basis points (10000 = 100 %).
    pub probability_bp: u32,
    pub category: ForecastCategory,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_days_in_stage: Option<u32>,
    /// What a deal must have before it enters this stage (opened in it,
    /// moved or reopened into it, or won for the won stage): some of
    /// [`REQUIRABLE_FIELDS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_fields: Vec<String>,
}

/// What a stage may require of a deal: a positive amount, a primary
/// contact, at least one product line.
pub const REQUIRABLE_FIELDS: [&str; 3] = ["amount", "contact_id", "line_items"];

impl Stage {
    /// The required fields `has` says a deal lacks, in the order of
    /// [`REQUIRABLE_FIELDS`].
    pub fn missing(&self, has: impl Fn(&str) -> bool) -> Vec<&'static str> {
        REQUIRABLE_FIELDS
            .into_iter()
            .filter(|field| self.required_fields.iter().any(|r| r == field) && !has(field))
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PipelineCommand {
    /// Publishes a new version with these stages, open stages in order;
    /// `stage_mapping` maps each open stage of the current version that the
    /// new one drops to an open stage of the new one.
    Publish {
        name: String,
        stages: Vec<Stage>,
        stage_mapping: BTreeMap<String, String>,
    },
}

#[cfg_attr(feature = "schemas", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelinePublished {
    pub version: u32,
    pub name: String,
    pub stages: Vec<Stage>,
    /// Where open deals in a stage this version drops go (dropped key →
    /// open stage of this version).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stage_mapping: BTreeMap<String, String>,
    pub occurred_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum PipelineEvent {
    Published(PipelinePublished),
}

impl DomainEvent for PipelineEvent {
    fn event_type(&self) -> &'static str {
        "PipelinePublished"
    }

    fn occurred_at(&self) -> jiff::Timestamp {
        match self {
            Self::Published(e) => e.occurred_at,
        }
    }

    fn decode<'de, D: serde::Deserializer<'de>>(
        event_type: &str,
        _schema_version: u32,
        payload: D,
    ) -> Result<Option<Self>, D::Error> {
        Ok(match event_type {
            "PipelinePublished" => Some(Self::Published(Deserialize::deserialize(payload)?)),
            _ => None,
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineConfig {
    pub name: String,
    /// Every published version's stages; deals refer to theirs.
    pub versions: BTreeMap<u32, Vec<Stage>>,
    /// Each version's `stage_mapping` (versions that dropped no open stage
    /// have none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mappings: BTreeMap<u32, BTreeMap<String, String>>,
}

impl PipelineConfig {
    pub fn current_version(&self) -> Option<u32> {
        self.versions.keys().next_back().copied()
    }

    /// A stage of a given version.
    pub fn stage(&self, version: u32, key: &str) -> Option<&Stage> {
        self.versions.get(&version)?.iter().find(|s| s.key == key)
    }

    /// Whether `key` is an open stage of `version`.
    pub fn is_open_stage(&self, version: u32, key: &str) -> bool {
        self.stage(version, key)
            .is_some_and(|s| s.kind == StageKind::Open)
    }

    /// Where an open deal in stage `stage` of version `from` stands in the
    /// current version: `(version, stage)`, following each later version's
    /// mapping for a stage it dropped. `None` when it is already current,
    /// or a later version dropped its stage without mapping it.
    pub fn follow(&self, from: u32, stage: &str) -> Option<(u32, String)> {
        let current = self.current_version()?;
        if current <= from {
            return None;
        }
        let mut stage = stage.to_owned();
        for (&version, _) in self.versions.range(from + 1..) {
            if !self.is_open_stage(version, &stage) {
                stage = self.mappings.get(&version)?.get(&stage)?.clone();
            }
        }
        Some((current, stage))
    }

    /// An open stage's position among the open stages of its version.
    pub fn open_order(&self, version: u32, key: &str) -> Option<usize> {
        self.versions
            .get(&version)?
            .iter()
            .filter(|s| s.kind == StageKind::Open)
            .position(|s| s.key == key)
    }
}

fn validate(name: &str, stages: &[Stage]) -> Result<(), DomainError> {
    let mut v = Violations::default();
    v.check(
        text_ok(name, 100, false),
        "name",
        "must be 1 to 100 characters",
    );
    v.check(stages.len() <= 30, "stages", "must have at most 30 stages");
    let mut keys = BTreeSet::new();
    for (i, stage) in stages.iter().enumerate() {
        v.check(
            is_code(&stage.key, 64),
            format!("stages[{i}].key"),
            "must be a code of [a-z0-9_]",
        );
        v.check(
            keys.insert(stage.key.as_str()),
            format!("stages[{i}].key"),
            "appears twice",
        );
        v.check(
            text_ok(&stage.name, 100, false),
            format!("stages[{i}].name"),
            "must be 1 to 100 characters",
        );
        let mut required = BTreeSet::new();
        for (j, field) in stage.required_fields.iter().enumerate() {
            v.check(
                REQUIRABLE_FIELDS.contains(&field.as_str()),
                format!("stages[{i}].required_fields[{j}]"),
                "must be amount, contact_id or line_items",
            );
            v.check(
                required.insert(field.as_str()),
                format!("stages[{i}].required_fields[{j}]"),
                "appears twice",
            );
        }
        v.check(
            stage.kind != StageKind::Lost || stage.required_fields.is_empty(),
            format!("stages[{i}].required_fields"),
            "must be empty for a lost stage",
        );
        match stage.kind {
            StageKind::Won => {
                v.check(
                    stage.probability_bp == 10_000,
                    format!("stages[{i}].probability_bp"),
                    "must be 10000 for the won stage",
                );
                v.check(
                    stage.category == ForecastCategory::Closed,
                    format!("stages[{i}].category"),
                    "must be closed for the won stage",
                );
            }
            StageKind::Lost => {
                v.check(
                    stage.probability_bp == 0,
                    format!("stages[{i}].probability_bp"),
                    "must be 0 for a lost stage",
                );
                v.check(
                    stage.category == ForecastCategory::Omitted,
                    format!("stages[{i}].category"),
                    "must be omitted for a lost stage",
                );
            }
            StageKind::Open => {
                v.check(
                    stage.probability_bp <= 10_000,
                    format!("stages[{i}].probability_bp"),
                    "must be 0 to 10000",
                );
                v.check(
                    !matches!(stage.category, ForecastCategory::Closed),
                    format!("stages[{i}].category"),
                    "must not be closed for an open stage",
                );
            }
        }
    }
    let count = |kind| stages.iter().filter(|s| s.kind == kind).count();
    v.check(
        count(StageKind::Open) >= 1,
        "stages",
        "needs at least one open stage",
    );
    v.check(
        count(StageKind::Won) == 1,
        "stages",
        "needs exactly one won stage",
    );
    v.check(
        count(StageKind::Lost) >= 1,
        "stages",
        "needs at least one lost stage",
    );
    v.into_result()
}

/// Every open stage of `current` that `stages` drops (or makes won or lost)
/// is mapped to an open stage of `stages`, and nothing else is mapped.
fn validate_mapping(
    current: &[Stage],
    stages: &[Stage],
    mapping: &BTreeMap<String, String>,
) -> Result<(), DomainError> {
    let open = |list: &[Stage], key: &str| {
        list.iter()
            .any(|s| s.key == key && s.kind == StageKind::Open)
    };
    let mut v = Violations::default();
    v.check(
        mapping.len() <= 30,
        "stage_mapping",
        "must have at most 30 entries",
    );
    v.into_result()?;
    let mut v = Violations::default();
    for stage in current.iter().filter(|s| s.kind == StageKind::Open) {
        v.check(
            open(stages, &stage.key) || mapping.contains_key(&stage.key),
            format!("stage_mapping.{}", stage.key),
            "is required: the new version drops this open stage",
        );
    }
    for (from, to) in mapping {
        v.check(
            open(current, from) && !open(stages, from),
            format!("stage_mapping.{from}"),
            "must be an open stage of the current version that the new one drops",
        );
        v.check(
            open(stages, to),
            format!("stage_mapping.{from}"),
            "must name an open stage of the new version",
        );
    }
    v.into_result()
}

impl Aggregate for PipelineConfig {
    type Command = PipelineCommand;
    type Event = PipelineEvent;
    const STREAM_TYPE: &'static str = "pipeline_config";
    /// 2: the state keeps each version's stage mapping.
    const SNAPSHOT_VERSION: u32 = 2;

    fn exists(&self) -> bool {
        !self.versions.is_empty()
    }

    fn decide(
        &self,
        command: PipelineCommand,
        context: Context,
    ) -> Result<Vec<PipelineEvent>, DomainError> {
        let occurred_at = context.occurred_at()?;
        let PipelineCommand::Publish {
            name,
            stages,
            stage_mapping,
        } = command;
        validate(&name, &stages)?;
        let current = self
            .current_version()
            .and_then(|v| self.versions.get(&v))
            .map(Vec::as_slice)
            .unwrap_or_default();
        validate_mapping(current, &stages, &stage_mapping)?;
        if let Some(current) = self.current_version()
            && self.versions.get(&current) == Some(&stages)
            && self.name == name
        {
            return Ok(vec![]);
        }
        Ok(vec![PipelineEvent::Published(PipelinePublished {
            version: self.current_version().unwrap_or(0) + 1,
            name,
            stages,
            stage_mapping,
            occurred_at,
        })])
    }

    fn evolve(mut self, event: &PipelineEvent) -> Self {
        let PipelineEvent::Published(published) = event;
        self.name = published.name.clone();
        self.versions
            .insert(published.version, published.stages.clone());
        if !published.stage_mapping.is_empty() {
            self.mappings
                .insert(published.version, published.stage_mapping.clone());
        }
        self
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::{given, now};

    pub(crate) fn stage(
        key: &str,
        kind: StageKind,
        probability_bp: u32,
        category: ForecastCategory,
    ) -> Stage {
        Stage {
            key: key.into(),
            name: key.to_uppercase(),
            kind,
            probability_bp,
            category,
            max_days_in_stage: Some(14),
            required_fields: vec![],
        }
    }

    pub(crate) fn standard() -> Vec<Stage> {
        vec![
            stage(
                "qualification",
                StageKind::Open,
                1000,
                ForecastCategory::Pipeline,
            ),
            stage(
                "proposal",
                StageKind::Open,
                5000,
                ForecastCategory::BestCase,
            ),
            stage(
                "negotiation",
                StageKind::Open,
                8000,
                ForecastCategory::Commit,
            ),
            stage("won", StageKind::Won, 10_000, ForecastCategory::Closed),
            stage("lost", StageKind::Lost, 0, ForecastCategory::Omitted),
        ]
    }

    pub(crate) fn published() -> PipelineEvent {
        PipelineEvent::Published(PipelinePublished {
            version: 1,
            name: "Sales".into(),
            stages: standard(),
            stage_mapping: BTreeMap::new(),
            occurred_at: now(),
        })
    }

    #[test]
    fn publishing_numbers_versions_and_skips_repeats() {
        given::<PipelineConfig>([])
            .when(PipelineCommand::Publish {
                name: "Sales".into(),
                stages: standard(),
                stage_mapping: BTreeMap::new(),
            })
            .then(vec![published()]);
        given::<PipelineConfig>([published()])
            .when(PipelineCommand::Publish {
                name: "Sales".into(),
                stages: standard(),
                stage_mapping: BTreeMap::new(),
            })
            .then(vec![]);
        let mut changed = standard();
        changed[0].probability_bp = 2000;
        let state = given::<PipelineConfig>([published()])
            .when(PipelineCommand::Publish {
                name: "Sales".into(),
                stages: changed.clone(),
                stage_mapping: BTreeMap::new(),
            })
            .then(vec![PipelineEvent::Published(PipelinePublished {
                version: 2,
                name: "Sales".into(),
                stages: changed,
                stage_mapping: BTreeMap::new(),
                occurred_at: now(),
            })]);
        assert_eq!(state.current_version(), Some(2));
        assert_eq!(
            state.stage(1, "qualification").unwrap().probability_bp,
            1000,
            "old versions stay"
        );
        assert_eq!(state.open_order(2, "negotiation"), Some(2));
    }

    #[test]
    fn invariants_of_a_pipeline_are_enforced() {
        let mut bad = standard();
        bad[3].probability_bp = 9000;
        bad[4].category = ForecastCategory::Pipeline;
        bad.push(stage(
            "won",
            StageKind::Won,
            10_000,
            ForecastCategory::Closed,
        ));
        given::<PipelineConfig>([])
            .when(PipelineCommand::Publish {
                name: "Sales".into(),
                stages: bad,
                stage_mapping: BTreeMap::new(),
            })
            .then_invalid(&[
                "stages[3].probability_bp",
                "stages[4].category",
                "stages[5].key",
                "stages",
            ]);
        let only_open = vec![stage("a", StageKind::Open, 100, ForecastCategory::Closed)];
        given::<PipelineConfig>([])
            .when(PipelineCommand::Publish {
                name: String::new(),
                stages: only_open,
                stage_mapping: BTreeMap::new(),
            })
            .then_invalid(&["name", "stages[0].category", "stages", "stages"]);
    }

    #[test]
    fn required_fields_are_known_unique_and_not_on_lost_stages() {
        let mut stages = standard();
        stages[1].required_fields = vec!["line_items".into(), "contact_id".into()];
        stages[3].required_fields = vec!["amount".into()];
        given::<PipelineConfig>([])
            .when(PipelineCommand::Publish {
                name: "Sales".into(),
                stages: stages.clone(),
                stage_mapping: BTreeMap::new(),
            })
            .then_ok();
        stages[1].required_fields = vec!["budget".into(), "contact_id".into(), "contact_id".into()];
        stages[4].required_fields = vec!["amount".into()];
        given::<PipelineConfig>([])
            .when(PipelineCommand::Publish {
                name: "Sales".into(),
                stages,
                stage_mapping: BTreeMap::new(),
            })
            .then_invalid(&[
                "stages[1].required_fields[0]",
                "stages[1].required_fields[2]",
                "stages[4].required_fields",
            ]);
    }

    #[test]
    fn a_version_that_drops_an_open_stage_maps_it_and_deals_follow() {
        let mut next = standard();
        next.remove(1); // proposal
        next[0].key = "discovery".into(); // qualification renamed
        let publish = |mapping: &[(&str, &str)]| PipelineCommand::Publish {
            name: "Sales".into(),
            stages: next.clone(),
            stage_mapping: mapping
                .iter()
                .map(|(from, to)| ((*from).to_owned(), (*to).to_owned()))
                .collect(),
        };
        given::<PipelineConfig>([published()])
            .when(publish(&[("proposal", "negotiation")]))
            .then_invalid(&["stage_mapping.qualification"]);
        given::<PipelineConfig>([published()])
            .when(publish(&[
                ("qualification", "won"),
                ("proposal", "negotiation"),
                ("negotiation", "discovery"),
            ]))
            .then_invalid(&["stage_mapping.negotiation", "stage_mapping.qualification"]);
        let state = given::<PipelineConfig>([published()])
            .when(publish(&[
                ("qualification", "discovery"),
                ("proposal", "negotiation"),
            ]))
            .then_ok();
        assert_eq!(state.current_version(), Some(2));
        assert_eq!(state.follow(1, "proposal"), Some((2, "negotiation".into())));
        assert_eq!(
            state.follow(1, "negotiation"),
            Some((2, "negotiation".into()))
        );
        assert_eq!(state.follow(2, "negotiation"), None, "already current");
        // A third version that keeps every stage: deals follow both steps.
        let mut third = next.clone();
        third[0].probability_bp = 1500;
        let state = state.replay(
            [PipelineEvent::Published(PipelinePublished {
                version: 3,
                name: "Sales".into(),
                stages: third,
                stage_mapping: BTreeMap::new(),
                occurred_at: now(),
            })]
            .iter(),
        );
        assert_eq!(
            state.follow(1, "qualification"),
            Some((3, "discovery".into()))
        );
    }
}
