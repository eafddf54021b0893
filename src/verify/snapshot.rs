//! Step 1 of a verify run, in one read transaction on a read-only connection (one snapshot;
//! the daemon's writers go on): SQLite's integrity check, the custody chain recomputed from
//! seq 1, the rows that say something was archived while its evidence row is gone, and the
//! case marks against the chain's CASE_* rows.

use std::time::Instant;

use rusqlite::Connection;

use super::Scope;
use super::defect::{Defect, Recorder};
use crate::cells::shown;
use crate::custody::{self, Head};
use crate::db::DbError;
use crate::queue::ResultState;

/// What the snapshot saw.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// False when SQLite's integrity check failed: nothing else the database says is used.
    pub readable: bool,
    pub head: Head,
    pub rows: i64,
    pub chain_secs: f64,
    /// CPU seconds of the walk's reading and hashing threads.
    pub chain_cpu_secs: (f64, f64),
    /// Evidence rows in the database, and those the package step will look at.
    pub evidence: i64,
    pub in_scope: u64,
    /// Custody seq at which schema version 4 was applied: packages archived up to it were
    /// written before `retrieval.json` carried `custody_head`.
    pub upgrade_mark: i64,
    /// Custody seq at which schema version 5 was applied: DISCOVERED and ARCHIVED rows after it
    /// record every column the audit shows (docs/evidence-format.md §9); older ones some of them.
    pub v5_mark: i64,
}

pub fn check(
    conn: &mut Connection,
    scope: &Scope,
    rec: &mut Recorder,
) -> Result<Snapshot, DbError> {
    let tx = conn
        .transaction()
        .map_err(DbError::sql("begin read transaction"))?;
    let mut snap = Snapshot {
        readable: true,
        head: Head {
            seq: 0,
            row_hash: custody::GENESIS_HASH.into(),
        },
        rows: 0,
        chain_secs: 0.0,
        chain_cpu_secs: (0.0, 0.0),
        evidence: 0,
        in_scope: 0,
        upgrade_mark: 0,
        v5_mark: 0,
    };
    if let Some(problem) = integrity_problem(&tx, scope.full) {
        snap.readable = false;
        rec.defect(Defect::Database { problem })?;
        return Ok(snap);
    }
    schema_and_cases(&tx, rec)?;
    let started = Instant::now();
    match walk_chain(&tx, scope, rec) {
        Ok(walk) => {
            snap.rows = walk.rows;
            snap.head = walk.head;
            snap.chain_cpu_secs = (walk.reader_cpu_secs, walk.hasher_cpu_secs);
        }
        Err(e) => {
            snap.readable = false;
            rec.defect(Defect::Database {
                problem: format!("the custody log cannot be read: {e}"),
            })?;
            return Ok(snap);
        }
    }
    snap.chain_secs = started.elapsed().as_secs_f64();
    // A RESTORED row only a restore could have written (docs/evidence-format.md §9).
    match custody::restore_defects(&tx) {
        Ok(found) => {
            for (seq, problem) in found {
                rec.defect(Defect::Chain { seq, problem })?;
            }
        }
        Err(e) => rec.defect(Defect::Database {
            problem: format!("RESTORED rows cannot be read: {e}"),
        })?,
    }
    let counts = (|| -> rusqlite::Result<(i64, i64, i64, i64)> {
        let evidence = tx.query_row("SELECT count(*) FROM evidence", [], |r| r.get(0))?;
        let in_scope = tx.query_row(
            "SELECT count(*) FROM evidence WHERE (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR archived_at >= ?2)",
            rusqlite::params![scope.tenant, scope.since.map(crate::time::fmt)],
            |r| r.get(0),
        )?;
        let mark = |version: i64| {
            tx.query_row(
                "SELECT custody_seq FROM schema_upgrades WHERE version = ?1",
                [version],
                |r| r.get(0),
            )
            .unwrap_or(0)
        };
        Ok((evidence, in_scope, mark(4), mark(5)))
    })();
    match counts {
        Ok((evidence, in_scope, mark, v5_mark)) => {
            snap.evidence = evidence;
            snap.in_scope = in_scope.max(0) as u64;
            snap.upgrade_mark = mark;
            snap.v5_mark = v5_mark;
        }
        Err(e) => rec.defect(Defect::Database {
            problem: format!("the evidence table cannot be read: {e}"),
        })?,
    }
    if !scope.chain_only {
        if let Err(e) = archived_without_evidence(&tx, scope, snap.head.seq, rec) {
            rec.defect(Defect::Database {
                problem: format!("ARCHIVED rows cannot be matched with evidence: {e}"),
            })?;
        }
        // What audit and export show, against the chain (docs/evidence-format.md §9).
        if let Err(e) = super::metadata::check_actions(&tx, scope, snap.v5_mark, rec) {
            rec.defect(Defect::Database {
                problem: format!("actions cannot be matched with their DISCOVERED rows: {e}"),
            })?;
        }
        if let Err(e) = super::metadata::check_package_paths(&tx, scope, rec) {
            rec.defect(Defect::Database {
                problem: format!("package paths cannot be checked: {e}"),
            })?;
        }
    }
    Ok(snap)
}

/// `PRAGMA quick_check` (or `integrity_check`): `None` when SQLite says "ok".
fn integrity_problem(conn: &Connection, full: bool) -> Option<String> {
    let pragma = if full {
        "integrity_check"
    } else {
        "quick_check"
    };
    let result = (|| -> rusqlite::Result<Vec<String>> {
        let mut stmt = conn.prepare(&format!("PRAGMA {pragma}(20)"))?;
        let rows = stmt.query_map([], |r| Ok(shown(r, 0)))?;
        rows.collect()
    })();
    match result {
        Ok(lines) if lines == ["ok"] => None,
        Ok(lines) => Some(format!(
            "SQLite {pragma} found damage: {}",
            lines.join("; ")
        )),
        Err(e) => Some(format!("SQLite {pragma} could not run: {e}")),
    }
}

fn walk_chain(
    conn: &Connection,
    scope: &Scope,
    rec: &mut Recorder,
) -> Result<custody::ChainWalk, DbError> {
    let total: i64 = conn
        .query_row("SELECT coalesce(max(seq), 0) FROM custody_log", [], |r| {
            r.get(0)
        })
        .map_err(DbError::sql("read custody head"))?;
    let bar = scope.interactive.then(|| {
        crate::progress::Progress::with_unit("custody chain", total.max(0) as u64, "rows")
    });
    let mut failed = None;
    let walk = custody::walk(
        conn,
        |d| {
            if failed.is_none()
                && let Err(e) = rec.defect(Defect::Chain {
                    seq: d.seq,
                    problem: d.problem,
                })
            {
                failed = Some(e);
            }
        },
        |n| {
            if let Some(bar) = &bar {
                bar.inc_by(n);
            }
        },
    )?;
    if let Some(bar) = &bar {
        bar.finish();
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(walk),
    }
}

/// §7a item 2 from the chain's side: an ARCHIVED row (within the verified chain) whose
/// evidence row is gone, and a result marked `archived` without evidence.
fn archived_without_evidence(
    conn: &Connection,
    scope: &Scope,
    head: i64,
    rec: &mut Recorder,
) -> Result<(), DbError> {
    let since = scope.since.map(crate::time::fmt);
    let mut stmt = conn
        .prepare(
            "SELECT c.seq, c.tenant, c.action_id, c.command_index, c.package_path FROM custody_log c
             WHERE c.event = 'ARCHIVED' AND c.seq <= ?1
               AND (?2 IS NULL OR c.tenant = ?2) AND (?3 IS NULL OR c.at >= ?3)
               AND NOT EXISTS (SELECT 1 FROM evidence e WHERE e.tenant = c.tenant
                               AND e.action_id = c.action_id AND e.command_index = c.command_index)
             ORDER BY c.seq",
        )
        .map_err(DbError::sql("find ARCHIVED rows without evidence"))?;
    let mut rows = stmt
        .query(rusqlite::params![head, scope.tenant, since])
        .map_err(DbError::sql("find ARCHIVED rows without evidence"))?;
    while let Some(r) = rows.next().map_err(DbError::sql("read ARCHIVED row"))? {
        rec.defect(Defect::Custody {
            seq: r.get_ref(0).ok().and_then(|v| v.as_i64().ok()).unwrap_or(0),
            tenant: shown(r, 1),
            action_id: shown(r, 2),
            index: r.get_ref(3).ok().and_then(|v| v.as_i64().ok()),
            package_path: r
                .get_ref(4)
                .ok()
                .and_then(|v| v.as_str().ok())
                .map(str::to_string),
            problem: "no evidence row for this ARCHIVED custody row (deleted?)".into(),
        })?;
    }
    let mut stmt = conn
        .prepare(
            "SELECT r.tenant, r.action_id, r.command_index FROM results r
             WHERE r.state = ?3 AND (?1 IS NULL OR r.tenant = ?1) AND (?2 IS NULL OR r.updated_at >= ?2)
               AND NOT EXISTS (SELECT 1 FROM evidence e WHERE e.tenant = r.tenant
                               AND e.action_id = r.action_id AND e.command_index = r.command_index)",
        )
        .map_err(DbError::sql("find archived results without evidence"))?;
    let mut rows = stmt
        .query(rusqlite::params![
            scope.tenant,
            since,
            ResultState::Archived
        ])
        .map_err(DbError::sql("find archived results without evidence"))?;
    while let Some(r) = rows.next().map_err(DbError::sql("read result row"))? {
        rec.defect(Defect::Result {
            tenant: shown(r, 0),
            action_id: shown(r, 1),
            index: r
                .get_ref(2)
                .ok()
                .and_then(|v| v.as_i64().ok())
                .unwrap_or(-1),
            problem: "state archived but no evidence row".into(),
        })?;
    }
    Ok(())
}

/// The schema against the migrations, and the case marks against the chain.
fn schema_and_cases(tx: &Connection, rec: &mut Recorder) -> Result<(), DbError> {
    // The append-only triggers and every view the auditor reads are what the migrations
    // made (docs/evidence-format.md §9); anything dropped, altered or added is a defect.
    match crate::db::schema_differences(tx) {
        Ok(differences) => {
            for (object, problem) in differences {
                rec.defect(Defect::Schema { object, problem })?;
            }
        }
        Err(e) => rec.defect(Defect::Database {
            problem: format!("the schema cannot be compared with the migrations: {e}"),
        })?,
    }
    // Case membership is the chain's (docs/audit.md §8): `case_marks` holds exactly the latest
    // CASE_* row of every target, so a membership edited behind the chain's back is a defect.
    match crate::cases::chain_differences(tx) {
        Ok(differences) => {
            for (case, problem) in differences {
                rec.defect(Defect::Case { case, problem })?;
            }
        }
        Err(e) => rec.defect(Defect::Database {
            problem: format!("case marks cannot be compared with the chain: {e}"),
        })?,
    }
    Ok(())
}
