//! A case's legal hold (docs/operations.md §17). On `s3`, `case hold` puts an Object Lock legal
//! hold on every version of the case's packages and of the checkpoints (and tokens) that cover
//! them, and `case release` lifts it; the retention period still applies either way. Each is a
//! case-level custody row (`LEGAL_HOLD_SET` / `LEGAL_HOLD_RELEASED`, tenant and action `*`,
//! detail `{case, by, enforced, store, objects}` naming every key and version changed). A
//! package archived later into a held case is held as it is published, before its ARCHIVED
//! row. On `fs` and `azure` the hold is recorded, `enforced: false`: the store does not
//! enforce it.

use std::collections::BTreeMap;

use rusqlite::Connection;
use serde_json::json;

use crate::custody::{self, Event, EventKind};
use crate::db::{Db, DbError};
use crate::store::{Store, StoreError};

/// One hold or release: the case, which way, who asked (`by`) and the custody actor.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    pub case: &'a str,
    pub on: bool,
    pub by: &'a str,
    pub actor: &'a str,
}

/// What one `case hold` / `case release` did.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Keys the hold was put on or lifted from, each with its versions (none on fs/azure).
    pub objects: BTreeMap<String, Vec<String>>,
    /// The custody rows written.
    pub rows: Vec<i64>,
    pub enforced: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error(transparent)]
    Db(#[from] DbError),
    /// Some objects were changed, then one refused; the rows written name what was done.
    #[error("{source} ({done} objects done before it; run the command again to finish)")]
    Store {
        done: usize,
        #[source]
        source: StoreError,
    },
}

/// The keys a case's hold covers: its packages and the checkpoint (and token) that covers
/// each package's ARCHIVED row.
pub fn keys(conn: &Connection, case: &str) -> Result<Vec<String>, DbError> {
    let mut stmt = conn
        .prepare(
            "WITH pkg AS (SELECT v.package_path,
                                 (SELECT max(c.seq) FROM custody_log c
                                   WHERE c.event = 'ARCHIVED' AND c.package_path = v.package_path) AS seq
                          FROM v_case_evidence v WHERE v.case_id = ?1),
                  cover AS (SELECT (SELECT a.seq FROM anchors a WHERE a.seq >= pkg.seq ORDER BY a.seq LIMIT 1) AS seq
                            FROM pkg)
             SELECT package_path FROM pkg
             UNION SELECT a.checkpoint_path FROM anchors a JOIN cover ON cover.seq = a.seq
             UNION SELECT a.tsr_path FROM anchors a JOIN cover ON cover.seq = a.seq WHERE a.tsr_path IS NOT NULL
             ORDER BY 1",
        )
        .map_err(DbError::sql("list the keys of a case"))?;
    stmt.query_map([case], |r| r.get(0))
        .and_then(Iterator::collect)
        .map_err(DbError::sql("list the keys of a case"))
}

/// Puts (`on`) or lifts the case's hold and records it. Keys are changed first, then the row
/// is written; packages published meanwhile (which saw the old state) are changed after the
/// row, with a second row naming them.
pub async fn apply(db: &Db, store: &Store, change: Change<'_>) -> Result<Applied, HoldError> {
    let mut applied = Applied {
        enforced: store.enforces_legal_hold(),
        ..Applied::default()
    };
    for round in 0..2 {
        let case_owned = change.case.to_string();
        let all = db.read(move |c| keys(c, &case_owned)).await?;
        let todo: Vec<String> = all
            .into_iter()
            .filter(|k| !applied.objects.contains_key(k))
            .collect();
        if round > 0 && todo.is_empty() {
            break;
        }
        let mut changed = BTreeMap::new();
        for key in todo {
            match store.legal_hold(&key, change.on).await {
                Ok(versions) => changed.insert(key, versions),
                Err(source) => {
                    let done = applied.objects.len() + changed.len();
                    if !changed.is_empty() {
                        applied
                            .rows
                            .push(record(db, store, change, &changed).await?);
                    }
                    return Err(HoldError::Store { done, source });
                }
            };
        }
        applied
            .rows
            .push(record(db, store, change, &changed).await?);
        applied.objects.extend(changed);
    }
    Ok(applied)
}

/// A checkpoint just written (`_checkpoints/{seq}.json` at `key`) that covers packages of held
/// cases is held too, on S3, with a LEGAL_HOLD_SET row per case (`by: "checkpoint"`); the
/// cases. Called by the checkpoint writer; a failure there is logged, and `case hold` run
/// again holds the checkpoint.
pub async fn hold_checkpoint(
    db: &Db,
    store: &Store,
    seq: i64,
    key: &str,
) -> Result<Vec<String>, HoldError> {
    if !store.enforces_legal_hold() {
        return Ok(Vec::new());
    }
    let cases = db.read(move |c| covered_held_cases(c, seq)).await?;
    if cases.is_empty() {
        return Ok(cases);
    }
    let versions = store
        .legal_hold(key, true)
        .await
        .map_err(|source| HoldError::Store { done: 0, source })?;
    let objects = BTreeMap::from([(key.to_string(), versions)]);
    let actor = custody::actor("*");
    for case in &cases {
        let change = Change {
            case,
            on: true,
            by: "checkpoint",
            actor: &actor,
        };
        record(db, store, change, &objects).await?;
    }
    Ok(cases)
}

/// The held cases with a package whose ARCHIVED row the checkpoint at `seq` is the first to
/// cover.
fn covered_held_cases(conn: &Connection, seq: i64) -> Result<Vec<String>, DbError> {
    let mut stmt = conn
        .prepare(
            "SELECT DISTINCT v.case_id FROM v_case_evidence v
             JOIN v_case_holds h ON h.case_id = v.case_id AND h.held = 1
             JOIN custody_log c ON c.event = 'ARCHIVED' AND c.package_path = v.package_path
             WHERE c.seq <= ?1 AND c.seq > coalesce((SELECT max(a.seq) FROM anchors a WHERE a.seq < ?1), 0)
             ORDER BY v.case_id",
        )
        .map_err(DbError::sql("read the held cases of a checkpoint"))?;
    stmt.query_map([seq], |r| r.get(0))
        .and_then(Iterator::collect)
        .map_err(DbError::sql("read the held cases of a checkpoint"))
}

/// The case-level LEGAL_HOLD_SET / LEGAL_HOLD_RELEASED row.
async fn record(
    db: &Db,
    store: &Store,
    change: Change<'_>,
    objects: &BTreeMap<String, Vec<String>>,
) -> Result<i64, DbError> {
    let kind = if change.on {
        EventKind::LegalHoldSet
    } else {
        EventKind::LegalHoldReleased
    };
    let objects: Vec<_> = objects
        .iter()
        .map(|(key, versions)| json!({ "key": key, "versions": versions }))
        .collect();
    let detail = json!({
        "case": change.case,
        "by": change.by,
        "enforced": store.enforces_legal_hold(),
        "store": store.describe(),
        "objects": objects,
    });
    let head = custody::record(
        db,
        Event::new("*", "*", None, kind, change.actor).detail(detail),
    )
    .await?;
    Ok(head.seq)
}
