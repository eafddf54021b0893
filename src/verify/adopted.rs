//! Rule 14 of docs/evidence-format.md §9, as `verify` checks it: a package is adopted (found in place after
//! a crash and recorded without being downloaded again) only when this database itself was
//! writing it. So every ARCHIVED row whose detail says `adopted: true` must follow the
//! result's DOWNLOADED row with the same payload SHA-256, and a PUBLISHING row (the intent
//! recorded before the package was placed) for the same path with the same package
//! SHA-256. An adopted row without them is a defect naming its seq, path and evidence id.
//!
//! Adopted rows older than the chain's first PUBLISHING row were written by a release that
//! recorded no intents; they cannot be proven this way and are left to the other checks.

use rusqlite::{Connection, params};

use super::Scope;
use super::defect::{Defect, Recorder};
use crate::db::DbError;

/// Checks every adopted ARCHIVED row (of `scope.tenant`, when given).
pub fn check(conn: &Connection, scope: &Scope, rec: &mut Recorder) -> Result<(), DbError> {
    let sql = "SELECT a.seq, a.tenant, a.action_id, a.command_index, a.package_path,
                      json_extract(a.detail, '$.evidence_id'),
                      EXISTS (SELECT 1 FROM custody_log d
                          WHERE d.event = 'DOWNLOADED' AND d.seq < a.seq AND d.tenant = a.tenant
                            AND d.action_id = a.action_id AND d.command_index IS a.command_index
                            AND d.evidence_sha256 = a.evidence_sha256),
                      EXISTS (SELECT 1 FROM custody_log p
                          WHERE p.event = 'PUBLISHING' AND p.seq < a.seq AND p.package_path = a.package_path
                            AND json_extract(p.detail, '$.package_sha256') = json_extract(a.detail, '$.package_sha256'))
               FROM custody_log a
               WHERE a.event = 'ARCHIVED' AND json_valid(a.detail)
                 AND json_extract(a.detail, '$.adopted') IS 1
                 AND (?1 IS NULL OR a.tenant = ?1)
                 AND a.seq > (SELECT coalesce(min(seq), 9223372036854775807) FROM custody_log
                              WHERE event = 'PUBLISHING')
               ORDER BY a.seq";
    let mut stmt = conn
        .prepare(sql)
        .map_err(DbError::sql("read adopted ARCHIVED rows"))?;
    let mut rows = stmt
        .query(params![scope.tenant])
        .map_err(DbError::sql("read adopted ARCHIVED rows"))?;
    while let Some(r) = rows
        .next()
        .map_err(DbError::sql("read adopted ARCHIVED rows"))?
    {
        let (downloaded, publishing): (bool, bool) = (
            r.get(6)
                .map_err(DbError::sql("read adopted ARCHIVED rows"))?,
            r.get(7)
                .map_err(DbError::sql("read adopted ARCHIVED rows"))?,
        );
        if let Some(problem) = missing(downloaded, publishing) {
            let text = |i| crate::cells::shown(r, i);
            let evidence = text(5);
            rec.defect(Defect::Custody {
                seq: r.get_ref(0).ok().and_then(|v| v.as_i64().ok()).unwrap_or(0),
                tenant: text(1),
                action_id: text(2),
                index: r.get_ref(3).ok().and_then(|v| v.as_i64().ok()),
                package_path: r
                    .get_ref(4)
                    .ok()
                    .and_then(|v| v.as_str().ok())
                    .map(str::to_string),
                problem: format!(
                    "evidence {evidence} was adopted {problem} (docs/evidence-format.md §9)"
                ),
            })?;
        }
    }
    Ok(())
}

/// What an adopted row lacks, or `None` when it has both rows it needs.
fn missing(downloaded: bool, publishing: bool) -> Option<&'static str> {
    match (downloaded, publishing) {
        (true, true) => None,
        (false, true) => {
            Some("without an earlier DOWNLOADED row of its result with its payload SHA-256")
        }
        (true, false) => Some(
            "without an earlier publishing intent (PUBLISHING) for its path and package SHA-256",
        ),
        (false, false) => Some(
            "without an earlier DOWNLOADED row of its result with its payload SHA-256 nor a publishing intent (PUBLISHING) for its path and package SHA-256",
        ),
    }
}
