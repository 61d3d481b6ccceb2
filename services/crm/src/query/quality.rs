//! `crm.v1.DataQuality`: the data-quality read models kept by the
//! `data_quality` process manager ([`crate::quality`]), and the one
//! data-quality command, DismissDuplicate.
use std::time::{Duration, SystemTime};

use crm_domain::common::Reason;
use crm_domain::duplicates::{
    DuplicateCommand, DuplicateKind, DuplicatePair, pair_id, sorted_pair,
};
use crm_proto::v1::data_quality_server::DataQuality;
use crm_proto::v1::{
    CommandReply, Completeness, DismissDuplicateRequest, DqReport, DuplicateCandidate, FieldCount,
    GetCompletenessRequest, GetDqReportRequest, InvalidRecord, KindCompleteness, KindCount,
    ListDuplicateCandidatesReply, ListDuplicateCandidatesRequest, ListInvalidRecordsReply,
    ListInvalidRecordsRequest, ListStaleRecordsReply, ListStaleRecordsRequest, OwnerCompleteness,
    RecordCompleteness, RecordIssue, RuleCount, StaleRecord,
};
use jiff::Timestamp;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{bad_token, bounded, count, page, page_size, ready, unavailable};
use crate::command::{Caller, CommandHandler, Options, ServiceError, require_role};
use crate::quality::{
    ISSUE_RULES, MISSING_REQUIRED, NAME, RECORD_KINDS, STALE_DAYS_CUSTOMER, STALE_DAYS_DEAL,
    STALE_DAYS_LEAD, STALE_DAYS_UNMODIFIED,
};

/// Roles that may dismiss a duplicate (DOMAIN.md §6: merges are theirs).
const DISMISS_ROLES: &[&str] = &["sales_manager", "admin"];
/// Kinds staleness is judged for.
const STALE_KINDS: &[&str] = &["contact", "lead", "account", "deal"];
const PAIR_STATUSES: &[&str] = &["suspected", "dismissed", "merged"];

#[derive(Clone)]
pub struct DataQualityService {
    pool: super::ReadModels,
    wait: Duration,
    handler: CommandHandler,
}

impl DataQualityService {
    pub fn new(pool: super::ReadModels, wait: Duration, handler: CommandHandler) -> Self {
        Self {
            pool,
            wait,
            handler,
        }
    }
}

fn rfc3339(time: SystemTime) -> String {
    Timestamp::try_from(time)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn optional_time(row: &tokio_postgres::Row, i: usize) -> String {
    row.get::<_, Option<SystemTime>>(i)
        .map(rfc3339)
        .unwrap_or_default()
}

/// Empty, or one of `allowed`.
fn one_of(
    field: &'static str,
    value: &str,
    allowed: &[&str],
    rule: &'static str,
) -> Result<(), ServiceError> {
    if value.is_empty() || allowed.contains(&value) {
        Ok(())
    } else {
        Err(ServiceError::invalid(field, rule))
    }
}

fn optional_uuid(field: &'static str, value: &str) -> Result<Option<Uuid>, ServiceError> {
    if value.is_empty() {
        return Ok(None);
    }
    Uuid::parse_str(value)
        .map(Some)
        .map_err(|_| ServiceError::invalid(field, "must be a UUID"))
}

/// `as_of`, or now when empty.
fn as_of(value: &str) -> Result<Timestamp, ServiceError> {
    if value.is_empty() {
        return Ok(Timestamp::now());
    }
    super::instant("as_of", value)
}

/// A page token that is a record id (pages ordered by record id).
fn id_token(token: &str) -> Result<Uuid, ServiceError> {
    if token.is_empty() {
        return Ok(Uuid::nil());
    }
    Uuid::parse_str(token).map_err(|_| bad_token())
}

/// A page of pairs starts after (score, pair id): `score.uuid`.
fn pair_token(token: &str) -> Result<(i16, Uuid), ServiceError> {
    if token.is_empty() {
        return Ok((i16::MAX, Uuid::nil()));
    }
    let (score, id) = token.split_once('.').ok_or_else(bad_token)?;
    match (score.parse::<i16>(), Uuid::parse_str(id)) {
        (Ok(score), Ok(id)) if (0..=100).contains(&score) => Ok((score, id)),
        _ => Err(bad_token()),
    }
}

/// A page of owners starts after an owner, written as its hex bytes.
fn owner_token(owner: &str) -> String {
    owner.bytes().map(|b| format!("{b:02x}")).collect()
}

fn parse_owner_token(token: &str) -> Result<Option<String>, ServiceError> {
    if token.is_empty() {
        return Ok(None);
    }
    if !token.len().is_multiple_of(2) || token.len() > 400 {
        return Err(bad_token());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2).unwrap_or("-"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| bad_token())?;
    String::from_utf8(bytes).map(Some).map_err(|_| bad_token())
}

/// Mean completeness in basis points over `records`, rounded down.
fn mean_bp(sum: i64, records: i64) -> Option<u32> {
    (records > 0).then(|| u32::try_from(sum * 100 / records).unwrap_or(0))
}

fn days(row: &tokio_postgres::Row, i: usize) -> u32 {
    u32::try_from(row.get::<_, i64>(i).max(0)).unwrap_or(u32::MAX)
}

/// The stale test of every active record at `$2` (business time), with the
/// tenant's stale days over the defaults, as columns `no_touch`,
/// `unmodified`, `touch_days` and `modified_days`; `$1` is the tenant.
fn stale_sql() -> String {
    format!(
        "SELECT r.record_id, r.kind, r.owner, r.last_touch, r.last_modified, \
           floor(extract(epoch FROM ($2 - coalesce(r.last_touch, r.created_at))) / 86400)::bigint \
             AS touch_days, \
           floor(extract(epoch FROM ($2 - r.last_modified)) / 86400)::bigint AS modified_days, \
           (r.open AND coalesce(r.last_touch, r.created_at) <= $2 - make_interval(days => \
              CASE r.kind WHEN 'lead' THEN s.lead WHEN 'deal' THEN s.deal \
                          ELSE s.customer END)) AS no_touch, \
           (r.last_modified <= $2 - make_interval(days => {STALE_DAYS_UNMODIFIED})) \
             AS unmodified \
         FROM record_quality r, \
           (SELECT coalesce(max(stale_days_lead), {STALE_DAYS_LEAD}) AS lead, \
                   coalesce(max(stale_days_deal), {STALE_DAYS_DEAL}) AS deal, \
                   coalesce(max(stale_days_customer), {STALE_DAYS_CUSTOMER}) AS customer \
            FROM dq_settings WHERE tenant_id = $1) s \
         WHERE r.tenant_id = $1 AND r.active AND r.created_at <= $2 \
           AND r.kind IN ('contact', 'lead', 'account', 'deal')"
    )
}

/// A suspected pair counts while both its records are active.
const BOTH_ACTIVE: &str = "NOT EXISTS (SELECT 1 FROM record_quality r \
    WHERE r.tenant_id = d.tenant_id AND r.record_id IN (d.record_a, d.record_b) \
      AND NOT r.active)";

#[tonic::async_trait]
impl DataQuality for DataQualityService {
    async fn list_duplicate_candidates(
        &self,
        request: Request<ListDuplicateCandidatesRequest>,
    ) -> Result<Response<ListDuplicateCandidatesReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let status = if request.status.is_empty() {
            "suspected"
        } else {
            request.status.as_str()
        };
        one_of(
            "status",
            status,
            PAIR_STATUSES,
            "must be suspected, dismissed or merged",
        )?;
        one_of(
            "kind",
            &request.kind,
            &DuplicateKind::ALL
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>(),
            "must be contact, lead, account or lead_contact",
        )?;
        let record = optional_uuid("record_id", &request.record_id)?;
        let size = page_size(request.page_size)?;
        let (after_score, after_pair) = pair_token(&request.page_token)?;
        let (client, position) = ready(&self.pool, NAME, request.options, self.wait).await?;
        let rows = client
            .query(
                &format!(
                    "SELECT d.pair_id, d.record_a, d.record_b, d.kind, d.rules, d.score, d.status, \
                       d.suspected_at, d.updated_at, d.dismiss_reason \
                     FROM duplicate_candidates d \
                     WHERE d.tenant_id = $1 AND d.status = $2 AND ($3 = '' OR d.kind = $3) \
                       AND ($4::uuid IS NULL OR d.record_a = $4 OR d.record_b = $4) \
                       AND (d.status <> 'suspected' OR {BOTH_ACTIVE}) \
                       AND (d.score < $5 OR (d.score = $5 AND d.pair_id > $6)) \
                     ORDER BY d.score DESC, d.pair_id LIMIT $7"
                ),
                &[
                    &caller.tenant.as_str(),
                    &status,
                    &request.kind,
                    &record,
                    &after_score,
                    &after_pair,
                    &i64::from(size + 1),
                ],
            )
            .await
            .map_err(unavailable)?;
        let (rows, next_page_token) = page(&rows, size, |last| {
            format!("{}.{}", last.get::<_, i16>(5), last.get::<_, Uuid>(0))
        });
        let candidates = rows
            .iter()
            .map(|row| DuplicateCandidate {
                pair_id: row.get::<_, Uuid>(0).to_string(),
                record_ids: vec![
                    row.get::<_, Uuid>(1).to_string(),
                    row.get::<_, Uuid>(2).to_string(),
                ],
                kind: row.get(3),
                rules: row.get(4),
                score: u32::try_from(row.get::<_, i16>(5)).unwrap_or(0),
                status: row.get(6),
                suspected_at: rfc3339(row.get(7)),
                updated_at: rfc3339(row.get(8)),
                dismiss_reason: row.get(9),
            })
            .collect();
        Ok(Response::new(ListDuplicateCandidatesReply {
            candidates,
            next_page_token,
            position,
        }))
    }

    async fn dismiss_duplicate(
        &self,
        request: Request<DismissDuplicateRequest>,
    ) -> Result<Response<CommandReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let options = Options::parse("DismissDuplicate", request.options.as_ref(), &request)?;
        require_role(&caller, DISMISS_ROLES, "dismiss duplicates")?;
        if request.record_ids.len() != 2 {
            return Err(
                ServiceError::invalid("record_ids", "must name exactly two records").into(),
            );
        }
        let mut ids = [Uuid::nil(); 2];
        let mut violations = Vec::new();
        for (i, text) in request.record_ids.iter().enumerate() {
            match Uuid::parse_str(text) {
                Ok(id) => ids[i] = id,
                Err(_) => violations.push(crm_domain::Violation::new(
                    format!("record_ids[{i}]"),
                    "must be a UUID",
                )),
            }
        }
        if !violations.is_empty() {
            return Err(ServiceError::Domain(crm_domain::DomainError::Invalid(violations)).into());
        }
        if ids[0] == ids[1] {
            return Err(
                ServiceError::invalid("record_ids", "must be two different records").into(),
            );
        }
        let reason = request.reason.unwrap_or_default();
        let command = DuplicateCommand::Dismiss {
            record_ids: sorted_pair(ids[0], ids[1]),
            reason: Reason {
                code: reason.code,
                text: reason.text,
            },
        };
        let reply = self
            .handler
            .execute::<DuplicatePair>(&caller, pair_id(ids[0], ids[1]), &options, command)
            .await?;
        Ok(Response::new(reply))
    }

    async fn list_invalid_records(
        &self,
        request: Request<ListInvalidRecordsRequest>,
    ) -> Result<Response<ListInvalidRecordsReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        one_of(
            "kind",
            &request.kind,
            RECORD_KINDS,
            "must be contact, lead, account, deal or activity",
        )?;
        one_of(
            "rule",
            &request.rule,
            ISSUE_RULES,
            "must be a data-quality rule",
        )?;
        bounded("owner", &request.owner)?;
        let size = page_size(request.page_size)?;
        let after = id_token(&request.page_token)?;
        let (client, position) = ready(&self.pool, NAME, request.options, self.wait).await?;
        let rows = client
            .query(
                "SELECT record_id, kind, owner, issues FROM record_quality \
                 WHERE tenant_id = $1 AND active AND issue_rules <> '{}' \
                   AND ($2 = '' OR kind = $2) AND ($3 = '' OR $3 = ANY(issue_rules)) \
                   AND ($4 = '' OR owner = $4) AND record_id > $5 \
                 ORDER BY record_id LIMIT $6",
                &[
                    &caller.tenant.as_str(),
                    &request.kind,
                    &request.rule,
                    &request.owner,
                    &after,
                    &i64::from(size + 1),
                ],
            )
            .await
            .map_err(unavailable)?;
        let (rows, next_page_token) = page(&rows, size, |last| last.get::<_, Uuid>(0).to_string());
        let records = rows
            .iter()
            .map(|row| {
                let issues: serde_json::Value = row.get(3);
                InvalidRecord {
                    record_id: row.get::<_, Uuid>(0).to_string(),
                    kind: row.get(1),
                    owner: row.get(2),
                    issues: issues
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|issue| RecordIssue {
                            field: issue["field"].as_str().unwrap_or_default().to_owned(),
                            rule: issue["rule"].as_str().unwrap_or_default().to_owned(),
                        })
                        .collect(),
                }
            })
            .collect();
        Ok(Response::new(ListInvalidRecordsReply {
            records,
            next_page_token,
            position,
        }))
    }

    async fn list_stale_records(
        &self,
        request: Request<ListStaleRecordsRequest>,
    ) -> Result<Response<ListStaleRecordsReply>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let as_of = as_of(&request.as_of)?;
        one_of(
            "kind",
            &request.kind,
            STALE_KINDS,
            "must be contact, lead, account or deal",
        )?;
        bounded("owner", &request.owner)?;
        let size = page_size(request.page_size)?;
        let after = id_token(&request.page_token)?;
        let (client, position) = ready(&self.pool, NAME, request.options, self.wait).await?;
        let at: SystemTime = as_of.into();
        let rows = client
            .query(
                &format!(
                    "SELECT * FROM ({}) stale \
                     WHERE (no_touch OR unmodified) AND ($3 = '' OR kind = $3) \
                       AND ($4 = '' OR owner = $4) AND record_id > $5 \
                     ORDER BY record_id LIMIT $6",
                    stale_sql()
                ),
                &[
                    &caller.tenant.as_str(),
                    &at,
                    &request.kind,
                    &request.owner,
                    &after,
                    &i64::from(size + 1),
                ],
            )
            .await
            .map_err(unavailable)?;
        let (rows, next_page_token) = page(&rows, size, |last| last.get::<_, Uuid>(0).to_string());
        let records = rows
            .iter()
            .map(|row| {
                let mut reasons = Vec::new();
                if row.get::<_, bool>(7) {
                    reasons.push("no_touch".to_owned());
                }
                if row.get::<_, bool>(8) {
                    reasons.push("unmodified".to_owned());
                }
                StaleRecord {
                    record_id: row.get::<_, Uuid>(0).to_string(),
                    kind: row.get(1),
                    owner: row.get(2),
                    reasons,
                    last_touch: optional_time(row, 3),
                    last_modified: rfc3339(row.get(4)),
                    days_without_touch: days(row, 5),
                    days_unmodified: days(row, 6),
                }
            })
            .collect();
        Ok(Response::new(ListStaleRecordsReply {
            records,
            next_page_token,
            as_of: as_of.to_string(),
            position,
        }))
    }

    async fn get_completeness(
        &self,
        request: Request<GetCompletenessRequest>,
    ) -> Result<Response<Completeness>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let record = optional_uuid("record_id", &request.record_id)?;
        bounded("owner", &request.owner)?;
        let size = page_size(request.page_size)?;
        let after = parse_owner_token(&request.page_token)?;
        let (client, position) = ready(&self.pool, NAME, request.options, self.wait).await?;
        let tenant = caller.tenant.as_str();
        if let Some(record_id) = record {
            let row = client
                .query_opt(
                    "SELECT kind, owner, completeness, missing_required, missing_recommended, \
                       active FROM record_quality \
                     WHERE tenant_id = $1 AND record_id = $2 AND completeness IS NOT NULL",
                    &[&tenant, &record_id],
                )
                .await
                .map_err(unavailable)?
                .ok_or_else(|| {
                    Status::not_found(format!("no contact, lead or account {record_id}"))
                })?;
            return Ok(Response::new(Completeness {
                record: Some(RecordCompleteness {
                    record_id: record_id.to_string(),
                    kind: row.get(0),
                    owner: row.get(1),
                    completeness: u32::try_from(row.get::<_, i16>(2)).unwrap_or(0),
                    missing_required: row.get(3),
                    missing_recommended: row.get(4),
                    active: row.get(5),
                }),
                owners: Vec::new(),
                next_page_token: String::new(),
                position,
            }));
        }
        let rows = client
            .query(
                "SELECT owner, sum(records)::bigint, sum(completeness_sum)::bigint \
                 FROM quality_summary \
                 WHERE tenant_id = $1 AND ($2 = '' OR owner = $2) \
                   AND ($3::text IS NULL OR owner > $3) \
                 GROUP BY owner HAVING sum(records) > 0 ORDER BY owner LIMIT $4",
                &[&tenant, &request.owner, &after, &i64::from(size + 1)],
            )
            .await
            .map_err(unavailable)?;
        let (rows, next_page_token) = page(&rows, size, |last| owner_token(last.get::<_, &str>(0)));
        let owners: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        let kinds = client
            .query(
                "SELECT owner, kind, records, completeness_sum FROM quality_summary \
                 WHERE tenant_id = $1 AND owner = ANY($2) AND records > 0 ORDER BY owner, kind",
                &[&tenant, &owners],
            )
            .await
            .map_err(unavailable)?;
        let owners = rows
            .iter()
            .map(|row| {
                let owner: String = row.get(0);
                let (records, sum): (i64, i64) = (row.get(1), row.get(2));
                OwnerCompleteness {
                    kinds: kinds
                        .iter()
                        .filter(|k| k.get::<_, &str>(0) == owner)
                        .map(|k| {
                            let (records, sum): (i64, i64) = (k.get(2), k.get(3));
                            KindCompleteness {
                                kind: k.get(1),
                                records: u64::try_from(records).unwrap_or(0),
                                mean_completeness_bp: mean_bp(sum, records).unwrap_or(0),
                            }
                        })
                        .collect(),
                    owner,
                    records: u64::try_from(records).unwrap_or(0),
                    mean_completeness_bp: mean_bp(sum, records).unwrap_or(0),
                }
            })
            .collect();
        Ok(Response::new(Completeness {
            record: None,
            owners,
            next_page_token,
            position,
        }))
    }

    async fn get_dq_report(
        &self,
        request: Request<GetDqReportRequest>,
    ) -> Result<Response<DqReport>, Status> {
        let caller = Caller::from_metadata(request.metadata())?;
        let request = request.into_inner();
        let as_of = as_of(&request.as_of)?;
        let (client, position) = ready(&self.pool, NAME, request.options, self.wait).await?;
        let tenant = caller.tenant.as_str();
        let invalid_rules: Vec<&str> = ISSUE_RULES
            .iter()
            .copied()
            .filter(|rule| *rule != MISSING_REQUIRED)
            .collect();
        let pairs = client
            .query_one(
                &format!(
                    "SELECT count(*) FILTER (WHERE status = 'suspected' AND {BOTH_ACTIVE}), \
                       count(*) FILTER (WHERE status = 'dismissed'), \
                       count(*) FILTER (WHERE status = 'merged') \
                     FROM duplicate_candidates d WHERE tenant_id = $1"
                ),
                &[&tenant],
            )
            .await
            .map_err(unavailable)?;
        let by_rule = client
            .query(
                "SELECT rule, count(*) FROM record_quality, unnest(issue_rules) AS rule \
                 WHERE tenant_id = $1 AND active AND rule = ANY($2) GROUP BY rule ORDER BY rule",
                &[&tenant, &invalid_rules],
            )
            .await
            .map_err(unavailable)?;
        let by_field = client
            .query(
                "SELECT kind, field, count(*) FROM record_quality, \
                   unnest(missing_required) AS field \
                 WHERE tenant_id = $1 AND active GROUP BY kind, field ORDER BY kind, field",
                &[&tenant],
            )
            .await
            .map_err(unavailable)?;
        let records = client
            .query_one(
                "SELECT count(*) FILTER (WHERE issue_rules && $2::text[]), \
                   count(*) FILTER (WHERE missing_required <> '{}') \
                 FROM record_quality WHERE tenant_id = $1 AND active",
                &[&tenant, &invalid_rules],
            )
            .await
            .map_err(unavailable)?;
        let at: SystemTime = as_of.into();
        let stale = client
            .query(
                &format!(
                    "SELECT kind, count(*) FILTER (WHERE no_touch), \
                       count(*) FILTER (WHERE unmodified), \
                       count(*) FILTER (WHERE no_touch OR unmodified) \
                     FROM ({}) stale GROUP BY kind ORDER BY kind",
                    stale_sql()
                ),
                &[&tenant, &at],
            )
            .await
            .map_err(unavailable)?;
        let orders = client
            .query_one(
                "SELECT count(*) FROM dq_unmatched_orders WHERE tenant_id = $1",
                &[&tenant],
            )
            .await
            .map_err(unavailable)?;
        let summary = client
            .query_one(
                "SELECT coalesce(sum(records), 0)::bigint, \
                   coalesce(sum(completeness_sum), 0)::bigint \
                 FROM quality_summary WHERE tenant_id = $1",
                &[&tenant],
            )
            .await
            .map_err(unavailable)?;
        let kind_counts = |column: usize| -> Vec<KindCount> {
            stale
                .iter()
                .filter(|row| row.get::<_, i64>(column) > 0)
                .map(|row| KindCount {
                    kind: row.get(0),
                    records: count(row, column),
                })
                .collect()
        };
        let (n_records, sum): (i64, i64) = (summary.get(0), summary.get(1));
        Ok(Response::new(DqReport {
            duplicates_open: count(&pairs, 0),
            duplicates_dismissed: count(&pairs, 1),
            duplicates_merged: count(&pairs, 2),
            invalid_by_rule: by_rule
                .iter()
                .map(|row| RuleCount {
                    rule: row.get(0),
                    records: count(row, 1),
                })
                .collect(),
            invalid_records: count(&records, 0),
            missing_by_field: by_field
                .iter()
                .map(|row| FieldCount {
                    kind: row.get(0),
                    field: row.get(1),
                    records: count(row, 2),
                })
                .collect(),
            incomplete_records: count(&records, 1),
            stale_no_touch: kind_counts(1),
            stale_unmodified: kind_counts(2),
            stale_records: stale.iter().map(|row| count(row, 3)).sum(),
            unmatched_orders: count(&orders, 0),
            records: u64::try_from(n_records).unwrap_or(0),
            mean_completeness_bp: mean_bp(sum, n_records),
            as_of: as_of.to_string(),
            position,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_refuse_garbage() {
        let id = Uuid::now_v7();
        assert_eq!(pair_token(&format!("95.{id}")).unwrap(), (95, id));
        assert_eq!(pair_token("").unwrap(), (i16::MAX, Uuid::nil()));
        for bad in ["95", "x.y", "101.00000000-0000-0000-0000-000000000000"] {
            assert!(pair_token(bad).is_err(), "{bad}");
        }
        let owner = "user:李";
        assert_eq!(
            parse_owner_token(&owner_token(owner)).unwrap().as_deref(),
            Some(owner)
        );
        assert!(parse_owner_token("zz").is_err());
        assert_eq!(mean_bp(163, 2), Some(8150));
        assert_eq!(mean_bp(0, 0), None);
    }
}
