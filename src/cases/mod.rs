//! Cases (docs/operations.md §17): the incidents evidence is collected for. An action joins a
//! case at discovery when its `requestorComment` names it (`case_pattern`), and an operator
//! adds or removes an action or a package by hand. Each change is a `CASE_TAGGED` /
//! `CASE_UNTAGGED` custody row (detail `{case, note, by}`), written in the same transaction as
//! its line in `case_marks`, the latest mark of each (case, target) that the views of
//! docs/audit.md §8 read; [`chain_differences`] holds that table to the chain for `verify`.
//! Legal holds are in [`hold`].

pub mod hold;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde_json::json;

use crate::config::CasePattern;
use crate::custody::{self, Event, EventKind};
use crate::db::DbError;

/// The `case_marks` line of one (case, target): ?1 case, ?2 tenant, ?3 action, ?4 index.
const MARK_OF: &str = "case_id = ?1 AND tenant = ?2 AND action_id = ?3 AND command_index IS ?4";

/// What a mark names: a whole action (every package it has or will have) or one package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Action {
        tenant: String,
        action_id: String,
    },
    Package {
        tenant: String,
        action_id: String,
        command_index: u32,
        evidence_id: String,
        payload_sha256: String,
        package_path: String,
    },
}

impl Target {
    pub fn tenant(&self) -> &str {
        match self {
            Target::Action { tenant, .. } | Target::Package { tenant, .. } => tenant,
        }
    }

    fn action_id(&self) -> &str {
        match self {
            Target::Action { action_id, .. } | Target::Package { action_id, .. } => action_id,
        }
    }

    fn command_index(&self) -> Option<u32> {
        match self {
            Target::Action { .. } => None,
            Target::Package { command_index, .. } => Some(*command_index),
        }
    }

    /// The parameters of [`MARK_OF`]: `case` and this target.
    fn mark_params<'a>(&'a self, case: &'a str) -> impl rusqlite::Params + 'a {
        (case, self.tenant(), self.action_id(), self.command_index())
    }

    /// `action <id>` or `package <evidence id>`, for messages.
    pub fn describe(&self) -> String {
        match self {
            Target::Action { action_id, .. } => format!("action {action_id}"),
            Target::Package { evidence_id, .. } => format!("package {evidence_id}"),
        }
    }
}

/// Who and why: the `note` and `by` of a CASE_* row, and the custody actor.
#[derive(Debug, Clone)]
pub struct Marker<'a> {
    pub note: Option<&'a str>,
    /// `pattern`, or the operator (the user, and the `sudo` user behind it).
    pub by: &'a str,
    pub actor: &'a str,
}

/// Appends the CASE_TAGGED (`tagged`) or CASE_UNTAGGED row for `target` and records it as
/// the target's latest mark, inside the caller's transaction. Returns the row's seq.
pub fn mark(
    tx: &Transaction<'_>,
    case: &str,
    target: &Target,
    tagged: bool,
    who: &Marker<'_>,
) -> Result<i64, DbError> {
    let kind = if tagged {
        EventKind::CaseTagged
    } else {
        EventKind::CaseUntagged
    };
    let mut detail = json!({ "case": case, "note": who.note, "by": who.by });
    let mut event = Event::new(
        target.tenant(),
        target.action_id(),
        target.command_index(),
        kind,
        who.actor,
    );
    if let Target::Package {
        evidence_id,
        payload_sha256,
        package_path,
        ..
    } = target
    {
        detail["evidence_id"] = json!(evidence_id);
        event.evidence_sha256 = Some(payload_sha256);
        event.package_path = Some(package_path);
    }
    let head = custody::append(tx, &event.detail(detail))?;
    tx.execute(
        &format!("DELETE FROM case_marks WHERE {MARK_OF}"),
        target.mark_params(case),
    )
    .map_err(DbError::sql("replace case mark"))?;
    tx.execute(
        "INSERT INTO case_marks (case_id, tenant, action_id, command_index, tagged, seq)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            case,
            target.tenant(),
            target.action_id(),
            target.command_index(),
            tagged,
            head.seq
        ],
    )
    .map_err(DbError::sql("record case mark"))?;
    Ok(head.seq)
}

/// Tags a newly discovered action with every case its comment names (`by: "pattern"`), in
/// the discovery's transaction; the cases tagged.
pub fn tag_from_comment(
    tx: &Transaction<'_>,
    tenant: &str,
    action_id: &str,
    actor: &str,
    pattern: &CasePattern,
    comment: Option<&str>,
) -> Result<Vec<String>, DbError> {
    let cases = comment.map(|c| pattern.cases(c)).unwrap_or_default();
    let target = Target::Action {
        tenant: tenant.to_string(),
        action_id: action_id.to_string(),
    };
    for case in &cases {
        let note = format!("requestorComment matches case_pattern {}", pattern.as_str());
        let who = Marker {
            note: Some(&note),
            by: "pattern",
            actor,
        };
        mark(tx, case, &target, true, &who)?;
    }
    Ok(cases)
}

/// The targets `actions` and `evidence` name (an action id may be known in several tenants);
/// `Err` lists the ids this database does not know.
pub fn resolve(
    conn: &Connection,
    actions: &[String],
    evidence: &[String],
) -> Result<Result<Vec<Target>, String>, DbError> {
    let mut targets = Vec::new();
    let mut unknown = Vec::new();
    for id in actions {
        let mut stmt = conn
            .prepare_cached("SELECT tenant FROM actions WHERE action_id = ?1 ORDER BY tenant")
            .map_err(DbError::sql("look up action"))?;
        let tenants: Vec<String> = stmt
            .query_map([id], |r| r.get(0))
            .and_then(Iterator::collect)
            .map_err(DbError::sql("look up action"))?;
        if tenants.is_empty() {
            unknown.push(format!("action {id}"));
        }
        targets.extend(tenants.into_iter().map(|tenant| Target::Action {
            tenant,
            action_id: id.clone(),
        }));
    }
    for id in evidence {
        let found = conn
            .query_row(
                "SELECT tenant, action_id, command_index, payload_sha256, package_path
                 FROM evidence WHERE evidence_id = ?1",
                [id],
                |r| {
                    Ok(Target::Package {
                        tenant: r.get(0)?,
                        action_id: r.get(1)?,
                        command_index: r.get(2)?,
                        evidence_id: id.clone(),
                        payload_sha256: r.get(3)?,
                        package_path: r.get(4)?,
                    })
                },
            )
            .optional()
            .map_err(DbError::sql("look up evidence"))?;
        match found {
            Some(t) => targets.push(t),
            None => unknown.push(format!("evidence {id}")),
        }
    }
    if unknown.is_empty() {
        Ok(Ok(targets))
    } else {
        Ok(Err(unknown.join(", ")))
    }
}

/// Would marking `target` `tagged` change the case? A package counts as in the case when the
/// case's view holds it (by its own tag or its action's).
pub fn would_change(
    conn: &Connection,
    case: &str,
    target: &Target,
    tagged: bool,
) -> Result<bool, DbError> {
    let own: Option<bool> = conn
        .query_row(
            &format!("SELECT tagged FROM case_marks WHERE {MARK_OF}"),
            target.mark_params(case),
            |r| r.get(0),
        )
        .optional()
        .map_err(DbError::sql("read case mark"))?;
    let present = match target {
        Target::Action { .. } => own == Some(true),
        Target::Package { evidence_id, .. } => conn
            .query_row(
                "SELECT count(*) > 0 FROM v_case_evidence WHERE case_id = ?1 AND evidence_id = ?2",
                params![case, evidence_id],
                |r| r.get(0),
            )
            .map_err(DbError::sql("read case membership"))?,
    };
    Ok(match target {
        // A package already in through its action still gets its own tag, so that untagging
        // the action later leaves it in.
        Target::Package { .. } if tagged => own != Some(true),
        _ => present != tagged,
    })
}

/// The held cases the action `action_id` of `tenant` is tagged into (a package of it is
/// held as it is published).
pub fn held_cases(
    conn: &Connection,
    tenant: &str,
    action_id: &str,
) -> Result<Vec<String>, DbError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT DISTINCT m.case_id FROM case_marks m
             JOIN v_case_holds h ON h.case_id = m.case_id AND h.held = 1
             WHERE m.tenant = ?1 AND m.action_id = ?2 AND m.command_index IS NULL AND m.tagged = 1
             ORDER BY m.case_id",
        )
        .map_err(DbError::sql("read held cases"))?;
    stmt.query_map(params![tenant, action_id], |r| r.get(0))
        .and_then(Iterator::collect)
        .map_err(DbError::sql("read held cases"))
}

/// Where `case_marks` differs from the marks the chain's CASE_* rows make: one line per
/// case and target (`INC-1 action a1 (tenant t)`, and what the table says instead).
pub fn chain_differences(conn: &Connection) -> Result<Vec<(String, String)>, DbError> {
    let sql = "WITH chain AS (SELECT case_id, tenant, action_id, command_index, tagged, seq FROM v_case_marks_chain),
                    stored AS (SELECT case_id, tenant, action_id, command_index, tagged, seq FROM case_marks)
               SELECT 'in case_marks but not in the chain', * FROM (SELECT * FROM stored EXCEPT SELECT * FROM chain)
               UNION ALL
               SELECT 'in the chain but not in case_marks', * FROM (SELECT * FROM chain EXCEPT SELECT * FROM stored)
               ORDER BY 2, 3, 4, 5";
    let mut stmt = conn
        .prepare(sql)
        .map_err(DbError::sql("compare case marks with the chain"))?;
    let rows = stmt
        .query_map([], |r| {
            let (what, case, tenant, action): (String, Option<String>, String, String) =
                (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
            let (index, tagged, seq): (Option<i64>, i64, i64) = (r.get(4)?, r.get(5)?, r.get(6)?);
            let target = match index {
                None => format!("action {action}"),
                Some(i) => format!("action {action} command {i}"),
            };
            let mark = if tagged == 1 { "tagged" } else { "untagged" };
            Ok((
                case.unwrap_or_default(),
                format!("{target} (tenant {tenant}) {mark} at seq {seq}: {what}"),
            ))
        })
        .map_err(DbError::sql("compare case marks with the chain"))?;
    rows.collect::<Result<_, _>>()
        .map_err(DbError::sql("compare case marks with the chain"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{Db, write_tx};

    /// One action `a` with two archived packages (`e0`, `e1`), and the case marks given.
    fn setup() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_migrated(&dir.path().join("c.db")).unwrap();
        db.call_sync(|c| {
            c.execute_batch(
                "INSERT INTO actions (tenant, action_id, machine_id, created_at, raw_json, discovered_at, source)
                 VALUES ('t', 'a', 'm1', '2026-12-01T00:00:00.000Z', '{}', '2026-12-01T00:00:00.000Z', 'discover');",
            )
            .unwrap();
            for i in 0..2 {
                c.execute(
                    "INSERT INTO results (tenant, action_id, command_index, command_json, state, updated_at)
                     VALUES ('t', 'a', ?1, '{}', 'archived', '2026-12-01T00:00:00.000Z')",
                    [i],
                )
                .unwrap();
                c.execute(
                    "INSERT INTO evidence (evidence_id, tenant, action_id, command_index, payload_name, payload_size,
                         payload_sha256, package_path, package_size, package_sha256, archived_at)
                     VALUES ('e' || ?1, 't', 'a', ?1, 'p', 1, 's', 'pp' || ?1, 10, 'ps', '2026-12-01T00:00:02.000Z')",
                    [i],
                )
                .unwrap();
            }
            Ok(())
        })
        .unwrap();
        (dir, db)
    }

    fn marks(db: &Db, case: &str, ids: (&[&str], &[&str]), tagged: bool) -> usize {
        let (case, actions, evidence) = (
            case.to_string(),
            ids.0.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            ids.1.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        );
        db.call_sync(move |c| {
            let tx = write_tx(c)?;
            let who = Marker {
                note: Some("n"),
                by: "op",
                actor: "me",
            };
            let mut n = 0;
            for t in resolve(&tx, &actions, &evidence)?.unwrap() {
                if would_change(&tx, &case, &t, tagged)? {
                    mark(&tx, &case, &t, tagged, &who)?;
                    n += 1;
                }
            }
            tx.commit().unwrap();
            Ok(n)
        })
        .unwrap()
    }

    fn members(db: &Db, case: &str) -> Vec<String> {
        let case = case.to_string();
        db.call_sync(move |c| {
            let mut stmt = c
                .prepare("SELECT evidence_id FROM v_case_evidence WHERE case_id = ?1 ORDER BY evidence_id")
                .unwrap();
            Ok(stmt.query_map([case], |r| r.get(0)).unwrap().map(Result::unwrap).collect())
        })
        .unwrap()
    }

    #[test]
    fn a_package_mark_outranks_its_action_and_the_table_matches_the_chain() {
        let (_dir, db) = setup();
        assert_eq!(marks(&db, "INC-1", (&["a"], &[]), true), 1);
        assert_eq!(members(&db, "INC-1"), vec!["e0", "e1"]);
        assert_eq!(marks(&db, "INC-1", (&["a"], &[]), true), 0, "already in");
        assert_eq!(marks(&db, "INC-1", (&[], &["e1"]), false), 1);
        assert_eq!(members(&db, "INC-1"), vec!["e0"]);
        assert_eq!(marks(&db, "INC-1", (&[], &["e1"]), false), 0, "not in");
        assert_eq!(marks(&db, "INC-2", (&[], &["e1"]), true), 1);
        assert_eq!(marks(&db, "INC-1", (&["a"], &[]), false), 1);
        assert_eq!(members(&db, "INC-1"), Vec::<String>::new());
        assert_eq!(members(&db, "INC-2"), vec!["e1"]);
        let (diffs, unknown) = db
            .call_sync(|c| {
                let r = resolve(c, &["nope".into()], &["e0".into(), "gone".into()])?;
                Ok((chain_differences(c)?, r.unwrap_err()))
            })
            .unwrap();
        assert_eq!(diffs, vec![]);
        assert_eq!(unknown, "action nope, evidence gone");
        let diffs = db
            .call_sync(|c| {
                c.execute("UPDATE case_marks SET tagged = 1 WHERE command_index = 1 AND case_id = 'INC-1'", [])
                    .unwrap();
                c.execute("DELETE FROM case_marks WHERE case_id = 'INC-2'", []).unwrap();
                chain_differences(c)
            })
            .unwrap();
        assert_eq!(
            diffs,
            vec![
                ("INC-1".to_string(), "action a command 1 (tenant t) tagged at seq 2: in case_marks but not in the chain".to_string()),
                ("INC-1".to_string(), "action a command 1 (tenant t) untagged at seq 2: in the chain but not in case_marks".to_string()),
                ("INC-2".to_string(), "action a command 1 (tenant t) tagged at seq 3: in the chain but not in case_marks".to_string()),
            ]
        );
    }
}
