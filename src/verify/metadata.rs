//! Rule 7 of docs/evidence-format.md §9, the database half: every column that `audit` and `export` show is
//! compared with its source of truth in the chain, inside the snapshot's read transaction.
//! - `actions` against the action's DISCOVERED row (machine, device name, requestor, comment,
//!   status, times, raw JSON, tenant);
//! - each evidence row's `package_path` against the path its action and result give it
//!   (`{tenant}/{created date}/{action}/{index}-{type}.zip`, docs/evidence-format.md), so an action that was
//!   backdated or moved, or a package swapped for another result's, no longer lines up.
//!
//! The package half (the bag's name, `External-Identifier`, `machine-action.json` and
//! `retrieval.json` against these rows) is in `packages`. Rows written before schema version 5
//! lack some of these fields in their DISCOVERED detail; docs/audit.md says which.

use rusqlite::{Connection, params};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::Scope;
use super::defect::{Defect, Recorder};
use crate::cells::Cells;
use crate::db::DbError;

/// The `actions` columns compared with the DISCOVERED detail key of the same name.
const ACTION_COLUMNS: [&str; 8] = [
    "machine_id",
    "computer_dns_name",
    "requestor",
    "requestor_comment",
    "status",
    "created_at",
    "last_update_at",
    "source",
];

/// Every action in scope against its DISCOVERED row (exactly one, in this chain).
pub fn check_actions(
    conn: &Connection,
    scope: &Scope,
    v5_mark: i64,
    rec: &mut Recorder,
) -> Result<(), DbError> {
    let mut stmt = conn
        .prepare(
            "SELECT a.tenant, a.action_id, a.machine_id, a.computer_dns_name, a.requestor,
                    a.requestor_comment, a.status, a.created_at, a.last_update_at, a.source,
                    a.discovered_at, a.raw_json,
                    (SELECT count(*) FROM custody_log c WHERE c.tenant = a.tenant AND c.action_id = a.action_id
                        AND c.command_index IS NULL AND c.event = 'DISCOVERED'),
                    d.seq, d.at, d.detail
             FROM actions a
             LEFT JOIN custody_log d ON d.seq = (
                 SELECT min(c.seq) FROM custody_log c WHERE c.tenant = a.tenant AND c.action_id = a.action_id
                     AND c.command_index IS NULL AND c.event = 'DISCOVERED')
             WHERE ?1 IS NULL OR a.tenant = ?1
             ORDER BY a.rowid",
        )
        .map_err(DbError::sql("read actions"))?;
    let mut rows = stmt
        .query(params![scope.tenant])
        .map_err(DbError::sql("read actions"))?;
    while let Some(r) = rows.next().map_err(DbError::sql("read actions"))? {
        let mut c = Cells::new(r);
        let tenant = c.text(0, "tenant").unwrap_or("?").to_string();
        let action_id = c.text(1, "action_id").unwrap_or("?").to_string();
        let ours: Vec<Option<String>> = (0..ACTION_COLUMNS.len())
            .map(|i| {
                c.opt_text(2 + i, ACTION_COLUMNS[i])
                    .flatten()
                    .map(str::to_string)
            })
            .collect();
        let discovered_at = c.text(10, "discovered_at").unwrap_or_default().to_string();
        let raw_json = c.text(11, "raw_json").unwrap_or_default().to_string();
        let count = c.int(12, "count").unwrap_or(0);
        let mut problems: Vec<String> = c
            .problems
            .into_iter()
            .map(|p| format!("action row: {p}"))
            .collect();
        let discovered = r.get::<_, Option<i64>>(13).ok().flatten().map(|seq| {
            let at: String = r.get(14).unwrap_or_default();
            let detail: Value = r
                .get::<_, String>(15)
                .ok()
                .and_then(|d| serde_json::from_str(&d).ok())
                .unwrap_or(Value::Null);
            (seq, at, detail)
        });
        match (count, discovered) {
            (1, Some((seq, at, detail))) => {
                let action = ActionRow {
                    columns: &ours,
                    discovered_at: &discovered_at,
                    raw_json: &raw_json,
                };
                problems.extend(action.compare(seq, &at, &detail, seq > v5_mark));
            }
            (0, _) | (_, None) => problems.push(format!(
                "no DISCOVERED custody row for action {action_id} of tenant {tenant}"
            )),
            (n, _) => problems.push(format!("{n} DISCOVERED custody rows, expected one")),
        }
        if !problems.is_empty() {
            rec.defect(Defect::Action {
                tenant,
                action_id,
                problems,
            })?;
        }
    }
    Ok(())
}

/// One `actions` row as stored.
struct ActionRow<'a> {
    /// In the order of [`ACTION_COLUMNS`].
    columns: &'a [Option<String>],
    discovered_at: &'a str,
    raw_json: &'a str,
}

impl ActionRow<'_> {
    /// What differs from the DISCOVERED row at `seq`. `exact`: the row was written by schema
    /// version 5 or later, which records every column and stamps discovered_at with its time.
    fn compare(&self, seq: i64, at: &str, detail: &Value, exact: bool) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, ours) in ACTION_COLUMNS.iter().zip(self.columns) {
            let Some(recorded) = detail.get(*name) else {
                if exact {
                    problems.push(format!("its DISCOVERED row (seq {seq}) has no {name}"));
                }
                continue;
            };
            if recorded.as_str() != ours.as_deref() {
                problems.push(format!(
                    "the action's {name} is {}, its DISCOVERED row (seq {seq}) says {}",
                    shown(ours.as_deref()),
                    shown(recorded.as_str())
                ));
            }
        }
        let times_agree = if exact {
            self.discovered_at == at
        } else {
            self.discovered_at <= at
        };
        if !times_agree {
            problems.push(format!(
                "the action's discovered_at is {}, its DISCOVERED row (seq {seq}) is at {at}",
                self.discovered_at
            ));
        }
        match detail.get("raw_sha256").and_then(Value::as_str) {
            Some(recorded) => {
                let raw = hex::encode(Sha256::digest(self.raw_json.as_bytes()));
                if raw != recorded {
                    problems.push(format!(
                        "the action's raw_json hashes to {raw}, its DISCOVERED row (seq {seq}) says {recorded}"
                    ));
                }
            }
            None if exact => {
                problems.push(format!("its DISCOVERED row (seq {seq}) has no raw_sha256"))
            }
            None => {}
        }
        problems
    }
}

fn shown(v: Option<&str>) -> String {
    v.map_or("NULL".to_string(), |s| format!("{s:?}"))
}

/// Every evidence row in scope at the path its action and result give it (docs/evidence-format.md).
pub fn check_package_paths(
    conn: &Connection,
    scope: &Scope,
    rec: &mut Recorder,
) -> Result<(), DbError> {
    let mut stmt = conn
        .prepare(
            "SELECT e.evidence_id, e.tenant, e.action_id, e.command_index, e.package_path, e.payload_sha256,
                    a.created_at, r.command_type, a.action_id IS NOT NULL, r.action_id IS NOT NULL
             FROM evidence e
             LEFT JOIN actions a ON a.tenant = e.tenant AND a.action_id = e.action_id
             LEFT JOIN results r ON r.tenant = e.tenant AND r.action_id = e.action_id
                                AND r.command_index = e.command_index
             WHERE (?1 IS NULL OR e.tenant = ?1) AND (?2 IS NULL OR e.archived_at >= ?2)
             ORDER BY e.rowid",
        )
        .map_err(DbError::sql("read evidence paths"))?;
    let mut rows = stmt
        .query(params![scope.tenant, scope.since.map(crate::time::fmt)])
        .map_err(DbError::sql("read evidence paths"))?;
    while let Some(r) = rows.next().map_err(DbError::sql("read evidence paths"))? {
        let mut c = Cells::new(r);
        let id = c.text(0, "evidence_id").unwrap_or("?").to_string();
        let tenant = c.text(1, "tenant").unwrap_or("?").to_string();
        let action_id = c.text(2, "action_id").unwrap_or("?").to_string();
        let index = c.int(3, "command_index");
        let path = c.text(4, "package_path").unwrap_or_default().to_string();
        let sha = c.text(5, "payload_sha256").unwrap_or_default().to_string();
        let created = c.text(6, "created_at").map(str::to_string);
        let command_type = r
            .get::<_, Option<String>>(7)
            .ok()
            .flatten()
            .unwrap_or_default();
        let (has_action, has_result): (bool, bool) =
            (r.get(8).unwrap_or(false), r.get(9).unwrap_or(false));
        let problem = if !has_action {
            Some(format!("no action {action_id} of tenant {tenant}"))
        } else if !has_result {
            Some("no result row for this evidence".to_string())
        } else {
            expected_path(
                &tenant,
                created.as_deref(),
                &action_id,
                index,
                &command_type,
            )
            .filter(|expected| *expected != path)
            .map(|expected| {
                format!("the package path should be {expected} for this action and result")
            })
        };
        if let Some(problem) = problem {
            rec.defect(Defect::Evidence {
                evidence_id: id,
                tenant,
                action_id,
                index,
                package_path: path,
                payload_sha256: sha,
                problems: vec![problem],
            })?;
        }
    }
    Ok(())
}

/// The §7 path of a result's package, or None when the stored values cannot make one (their
/// types are already a defect of their own rows).
fn expected_path(
    tenant: &str,
    created: Option<&str>,
    action_id: &str,
    index: Option<i64>,
    command_type: &str,
) -> Option<String> {
    let created = crate::time::parse_api(created?)?;
    let index = u32::try_from(index?).ok()?;
    let path = crate::package::package_rel_path(tenant, created, action_id, index, command_type);
    Some(path.to_string_lossy().into_owned())
}
