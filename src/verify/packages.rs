//! Step 2 of a verify run (§7a items 2–4): every evidence row in scope against its ARCHIVED
//! custody row (the reference), its package's bytes, BagIt manifests and `retrieval.json`, and
//! the `custody_head` the package pins. Evidence rows are read a page at a time, each page in
//! its own short read, so hours of hashing never hold a snapshot open.
//!
//! In an object store (docs/operations.md §14) the package read is exactly the version its ARCHIVED row
//! names, streamed into a temporary copy in the spool (checked, then deleted); a key that
//! now serves another version (or a delete marker) is a defect even though the recorded
//! version is intact. With `--sample N`, N packages picked at random are read; every
//! evidence row is still compared with its ARCHIVED row.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use super::Scope;
use super::defect::{Defect, Recorder};
use super::snapshot::Snapshot;
use crate::cells::Cells;
use crate::db::DbError;
use crate::store::{Blocking, Verdict};

mod identity;
use identity::{action_of, check_identity, read_tags};

const PAGE: i64 = 256;

#[derive(Debug, Default)]
pub struct Stats {
    pub checked: usize,
    /// Packages archived before `custody_head` existed.
    pub legacy: usize,
}

/// One evidence row as stored, with the problems its types already showed.
struct EvidenceRow {
    rowid: i64,
    id: String,
    tenant: String,
    action_id: String,
    index: Option<i64>,
    payload_name: String,
    payload_size: Option<i64>,
    payload_sha256: String,
    package_path: String,
    package_sha256: String,
    /// The columns only the ARCHIVED detail of schema version 5 and later records, as
    /// `(column, value)`, NULL as `Value::Null`.
    more: Vec<(&'static str, Value)>,
    archived_at: String,
    /// The action's `raw_json` and `requestor`, looked up when the package is read.
    action: Option<(String, Option<String>)>,
    problems: Vec<String>,
}

/// The evidence columns compared with the ARCHIVED detail key of the same name when the
/// detail has it (every ARCHIVED row since schema version 5).
const MORE_COLUMNS: [&str; 5] = [
    "payload_md5",
    "original_name",
    "original_size",
    "original_sha256",
    "package_size",
];

/// What the chain says was archived: the ARCHIVED row's columns and detail.
struct Archived {
    seq: i64,
    at: String,
    detail: Value,
    payload_sha256: Option<String>,
    package_path: Option<String>,
    package_sha256: Option<String>,
    payload_size: Option<i64>,
    payload_name: Option<String>,
    evidence_id: Option<String>,
    /// The head an adopted package pins when a restore took its rows away.
    custody_head_superseded: Option<(i64, String)>,
    /// The object version and ETag an object store gave the package (docs/operations.md §14).
    version_id: Option<String>,
    etag: Option<String>,
}

/// Where the packages are read from: `store.root` for `fs`, the object store otherwise.
pub struct Packages<'a> {
    pub root: &'a Path,
    pub store: &'a Blocking,
}

pub fn check(
    conn: &Connection,
    packages: &Packages<'_>,
    scope: &Scope,
    snap: &Snapshot,
    rec: &mut Recorder,
) -> anyhow::Result<Stats> {
    let since = scope.since.map(crate::time::fmt);
    let sample = match scope.sample {
        Some(n) => Some(sample_rowids(
            conn,
            scope.tenant.as_deref(),
            since.as_deref(),
            n,
        )?),
        None => None,
    };
    let total = sample.as_ref().map_or(snap.in_scope, |s| s.len() as u64);
    let bar = scope
        .interactive
        .then(|| crate::progress::Progress::with_unit("packages", total, "packages"));
    let mut stats = Stats::default();
    let mut after = 0i64;
    loop {
        // By rowid, so a row whose evidence_id is mistyped is still visited. (A VACUUM running
        // during verify could renumber rowids; the next run covers what this one skipped.)
        let page = read_page(conn, after, scope.tenant.as_deref(), since.as_deref())?;
        let Some(last) = page.last() else { break };
        after = last.rowid;
        for row in page {
            let read = sample.as_ref().is_none_or(|s| s.contains(&row.rowid));
            let Some(outcome) = check_one(conn, packages, snap, row, read)? else {
                continue;
            };
            if !read {
                // Compared with its ARCHIVED row only: not a checked package.
                if let Some(defect) = outcome.defect {
                    rec.defect(defect)?;
                }
                continue;
            }
            stats.checked += 1;
            stats.legacy += usize::from(outcome.legacy);
            if outcome.chain_suspect {
                rec.suspect_chain();
            }
            rec.outcome(outcome.evidence_id.clone(), outcome.defect.is_none())?;
            if let Some(defect) = outcome.defect {
                rec.defect(defect)?;
            }
            if let Some(bar) = &bar {
                bar.inc();
            }
        }
    }
    if let Some(bar) = &bar {
        bar.finish();
    }
    Ok(stats)
}

/// `n` evidence rowids in scope, picked uniformly at random (reservoir sampling: one
/// streamed read, memory for `n` ids).
fn sample_rowids(
    conn: &Connection,
    tenant: Option<&str>,
    since: Option<&str>,
    n: usize,
) -> Result<std::collections::HashSet<i64>, DbError> {
    use rand::Rng;
    let mut stmt = conn
        .prepare(
            "SELECT rowid FROM evidence WHERE (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR archived_at >= ?2)",
        )
        .map_err(DbError::sql("sample evidence"))?;
    let mut rows = stmt
        .query(params![tenant, since])
        .map_err(DbError::sql("sample evidence"))?;
    let mut rng = rand::rng();
    let mut reservoir: Vec<i64> = Vec::with_capacity(n.min(1 << 20));
    let mut seen = 0usize;
    while let Some(r) = rows.next().map_err(DbError::sql("sample evidence"))? {
        let rowid: i64 = r.get(0).map_err(DbError::sql("sample evidence"))?;
        seen += 1;
        if reservoir.len() < n {
            reservoir.push(rowid);
        } else {
            let j = rng.random_range(0..seen);
            if j < n {
                reservoir[j] = rowid;
            }
        }
    }
    Ok(reservoir.into_iter().collect())
}

fn read_page(
    conn: &Connection,
    after: i64,
    tenant: Option<&str>,
    since: Option<&str>,
) -> Result<Vec<EvidenceRow>, DbError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT rowid, evidence_id, tenant, action_id, command_index, payload_name, payload_size,
                    payload_sha256, package_path, package_sha256, archived_at,
                    payload_md5, original_name, original_size, original_sha256, package_size
             FROM evidence WHERE rowid > ?1 AND (?2 IS NULL OR tenant = ?2) AND (?3 IS NULL OR archived_at >= ?3)
             ORDER BY rowid LIMIT ?4",
        )
        .map_err(DbError::sql("read evidence"))?;
    let rows = stmt
        .query_map(params![after, tenant, since, PAGE], |r| {
            let mut c = Cells::new(r);
            let rowid = r.get(0)?;
            let id = c.text(1, "evidence_id").unwrap_or_default().to_string();
            Ok(EvidenceRow {
                rowid,
                id: if id.is_empty() {
                    format!("(rowid {rowid})")
                } else {
                    id
                },
                tenant: c.text(2, "tenant").unwrap_or("?").to_string(),
                action_id: c.text(3, "action_id").unwrap_or("?").to_string(),
                index: c.int(4, "command_index"),
                payload_name: c.text(5, "payload_name").unwrap_or_default().to_string(),
                payload_size: c.int(6, "payload_size"),
                payload_sha256: c.text(7, "payload_sha256").unwrap_or_default().to_string(),
                package_path: c.text(8, "package_path").unwrap_or_default().to_string(),
                package_sha256: c.text(9, "package_sha256").unwrap_or_default().to_string(),
                archived_at: c.text(10, "archived_at").unwrap_or_default().to_string(),
                action: None,
                more: MORE_COLUMNS
                    .iter()
                    .enumerate()
                    .map(|(i, name)| (*name, cell_json(r, 11 + i)))
                    .collect(),
                problems: c
                    .problems
                    .into_iter()
                    .map(|p| format!("evidence row: {p}"))
                    .collect(),
            })
        })
        .map_err(DbError::sql("read evidence"))?;
    rows.collect::<Result<_, _>>()
        .map_err(DbError::sql("read evidence"))
}

struct Outcome {
    evidence_id: String,
    defect: Option<Defect>,
    legacy: bool,
    chain_suspect: bool,
}

/// Checks one evidence row (its package too when `read`); `None` when its ARCHIVED row is
/// newer than the verified head (the next run checks it).
fn check_one(
    conn: &Connection,
    packages: &Packages<'_>,
    snap: &Snapshot,
    mut row: EvidenceRow,
    read: bool,
) -> anyhow::Result<Option<Outcome>> {
    let archived = archived_rows(conn, &row)?;
    if !archived.is_empty() && archived.iter().all(|a| a.seq > snap.head.seq) {
        return Ok(None);
    }
    let mut chain_suspect = false;
    let reference = match archived.as_slice() {
        [one] => Some(one),
        [] => {
            row.problems
                .push("no ARCHIVED custody row for this evidence".into());
            chain_suspect = true;
            None
        }
        many => {
            let seqs: Vec<String> = many.iter().map(|a| a.seq.to_string()).collect();
            row.problems.push(format!(
                "{} ARCHIVED custody rows (seq {}), expected one",
                many.len(),
                seqs.join(", ")
            ));
            chain_suspect = true;
            None
        }
    };
    if let Some(a) = reference {
        compare_row_with_archived(&mut row, a);
        compare_more_with_archived(&mut row, a, a.seq > snap.v5_mark);
    }
    let mut legacy = false;
    // The chain names the package; the evidence row must agree (checked above).
    let rel = reference
        .and_then(|a| a.package_path.clone())
        .unwrap_or_else(|| row.package_path.clone());
    if read && !rel.is_empty() {
        row.action = action_of(conn, &row)?;
        let head = if packages.store.store().is_object() {
            check_stored_package(packages.store, &rel, &mut row, reference)?
        } else {
            check_package_file(&packages.root.join(&rel), &mut row, reference).0
        };
        match head {
            PinnedHead::Present(seq, hash) => {
                chain_suspect |= check_custody_head(conn, &mut row, reference, seq, &hash)?;
            }
            PinnedHead::Absent if reference.is_some_and(|a| a.seq <= snap.upgrade_mark) => {
                legacy = true;
            }
            PinnedHead::Absent => row
                .problems
                .push("retrieval.json has no custody_head".into()),
            PinnedHead::Unknown => {}
        }
    }
    let defect = (!row.problems.is_empty()).then(|| Defect::Evidence {
        evidence_id: row.id.clone(),
        tenant: row.tenant.clone(),
        action_id: row.action_id.clone(),
        index: row.index,
        package_path: rel,
        payload_sha256: reference
            .and_then(|a| a.payload_sha256.clone())
            .unwrap_or_else(|| row.payload_sha256.clone()),
        problems: std::mem::take(&mut row.problems),
    });
    Ok(Some(Outcome {
        evidence_id: row.id,
        defect,
        legacy,
        chain_suspect,
    }))
}

fn archived_rows(conn: &Connection, row: &EvidenceRow) -> Result<Vec<Archived>, DbError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT seq, evidence_sha256, package_path, detail, at FROM custody_log
             WHERE tenant = ?1 AND action_id = ?2 AND command_index = ?3 AND event = 'ARCHIVED' ORDER BY seq",
        )
        .map_err(DbError::sql("read ARCHIVED rows"))?;
    let rows = stmt
        .query_map(params![row.tenant, row.action_id, row.index], |r| {
            let detail: Value = r
                .get_ref(3)?
                .as_str()
                .ok()
                .and_then(|d| serde_json::from_str(d).ok())
                .unwrap_or(Value::Null);
            let text = |v: &Value| v.as_str().map(str::to_string);
            Ok(Archived {
                seq: r.get(0)?,
                at: crate::cells::shown(r, 4),
                payload_sha256: r.get_ref(1)?.as_str().ok().map(str::to_string),
                package_path: r.get_ref(2)?.as_str().ok().map(str::to_string),
                package_sha256: text(&detail["package_sha256"]),
                payload_size: detail["payload_size"].as_i64(),
                payload_name: text(&detail["payload_name"]),
                evidence_id: text(&detail["evidence_id"]),
                custody_head_superseded: detail["custody_head_superseded"]["seq"]
                    .as_i64()
                    .zip(text(&detail["custody_head_superseded"]["row_hash"])),
                version_id: text(&detail["version_id"]),
                etag: text(&detail["etag"]),
                detail,
            })
        })
        .map_err(DbError::sql("read ARCHIVED rows"))?;
    rows.collect::<Result<_, _>>()
        .map_err(DbError::sql("read ARCHIVED rows"))
}

/// The evidence row must say what its ARCHIVED row says.
fn compare_row_with_archived(row: &mut EvidenceRow, a: &Archived) {
    let size = row.payload_size.map(|s| s.to_string());
    let fields: [(&str, Option<&str>, Option<String>); 6] = [
        ("evidence_id", Some(&row.id), a.evidence_id.clone()),
        (
            "payload_sha256",
            Some(&row.payload_sha256),
            a.payload_sha256.clone(),
        ),
        (
            "package_path",
            Some(&row.package_path),
            a.package_path.clone(),
        ),
        (
            "package_sha256",
            Some(&row.package_sha256),
            a.package_sha256.clone(),
        ),
        (
            "payload_size",
            size.as_deref(),
            a.payload_size.map(|s| s.to_string()),
        ),
        (
            "payload_name",
            Some(&row.payload_name),
            a.payload_name.clone(),
        ),
    ];
    let mut problems = Vec::new();
    for (name, ours, chain) in fields {
        if ours != chain.as_deref() {
            problems.push(format!(
                "the evidence row's {name} is {}, its ARCHIVED row (seq {}) says {}",
                ours.unwrap_or("unreadable"),
                a.seq,
                chain.as_deref().unwrap_or("nothing")
            ));
        }
    }
    row.problems.extend(problems);
}

/// The columns of schema version 5's ARCHIVED detail, and `archived_at` against the row's
/// time. `exact`: the row was written by version 5 or later, which records every column and
/// stamps archived_at with the ARCHIVED row's time; an older row's time may follow it by the
/// moments its transaction took.
fn compare_more_with_archived(row: &mut EvidenceRow, a: &Archived, exact: bool) {
    for (name, ours) in &row.more {
        match a.detail.get(*name) {
            Some(recorded) if recorded != ours => row.problems.push(format!(
                "the evidence row's {name} is {ours}, its ARCHIVED row (seq {}) says {recorded}",
                a.seq
            )),
            None if exact => row
                .problems
                .push(format!("its ARCHIVED row (seq {}) has no {name}", a.seq)),
            _ => {}
        }
    }
    let agree = if exact {
        row.archived_at == a.at
    } else {
        row.archived_at <= a.at
    };
    if !agree {
        row.problems.push(format!(
            "the evidence row's archived_at is {}, its ARCHIVED row (seq {}) is at {}",
            row.archived_at, a.seq, a.at
        ));
    }
}

/// A cell as JSON (TEXT as a string, INTEGER as a number, NULL as null), as the ARCHIVED
/// detail holds it.
fn cell_json(r: &rusqlite::Row<'_>, i: usize) -> Value {
    use rusqlite::types::ValueRef;
    match r.get_ref(i) {
        Ok(ValueRef::Integer(n)) => Value::from(n),
        Ok(ValueRef::Text(t)) => Value::from(String::from_utf8_lossy(t).into_owned()),
        Ok(ValueRef::Real(f)) => Value::from(f),
        Ok(ValueRef::Blob(_)) => Value::from("(blob)"),
        _ => Value::Null,
    }
}

enum PinnedHead {
    Present(i64, String),
    Absent,
    /// retrieval.json could not be read (already a problem).
    Unknown,
}

/// The package in an object store: the version the ARCHIVED row names, read into a
/// temporary copy and checked like a file; then whether the key still serves that version.
/// A store that cannot be read stops the run (an outage is not a defect of the evidence).
fn check_stored_package(
    store: &Blocking,
    rel: &str,
    row: &mut EvidenceRow,
    a: Option<&Archived>,
) -> anyhow::Result<PinnedHead> {
    let version = a.and_then(|a| a.version_id.as_deref());
    let location = store
        .store()
        .location(rel)
        .unwrap_or_else(|_| rel.to_string());
    let copy = match store.wait(store.store().local_copy(rel, version)) {
        Ok(copy) => copy,
        Err(e) if e.is_not_found() => {
            row.problems.push(format!(
                "missing from the store: {location} (version {}) cannot be read",
                version.unwrap_or("current")
            ));
            return Ok(PinnedHead::Unknown);
        }
        Err(e) if matches!(e, crate::store::StoreError::InvalidKey { .. }) => {
            row.problems.push(format!("cannot read the package: {e}"));
            return Ok(PinnedHead::Unknown);
        }
        Err(e) => anyhow::bail!("reading {location} from the store: {e}"),
    };
    let (head, found) = check_package_file(copy.path(), row, a);
    drop(copy);
    let recorded = a
        .and_then(|a| a.package_sha256.clone())
        .unwrap_or_else(|| row.package_sha256.clone());
    if found.is_none_or(|(sha, _)| sha != recorded) {
        return Ok(head); // altered or unreadable: already a problem
    }
    let etag = a.and_then(|a| a.etag.as_deref());
    match store.wait(store.store().judge(rel, version, etag))? {
        Verdict::Intact => {}
        Verdict::Superseded { current: Some(c) } => row.problems.push(format!(
            "{location} now serves another object (version {}, {} bytes, ETag {}) over the version its ARCHIVED row names ({}), which is intact",
            c.version_id.as_deref().unwrap_or("-"),
            c.size,
            c.etag.as_deref().unwrap_or("-"),
            version.unwrap_or("-")
        )),
        Verdict::Superseded { current: None } => row.problems.push(format!(
            "{location} now serves nothing (a delete marker) over the version its ARCHIVED row names ({}), which is intact",
            version.unwrap_or("-")
        )),
    }
    Ok(head)
}

/// Re-hashes the package and checks it against the ARCHIVED row (or, without one, the
/// evidence row); returns the `custody_head` its retrieval.json pins, and the package's
/// SHA-256 and size when it could be read.
fn check_package_file(
    path: &Path,
    row: &mut EvidenceRow,
    a: Option<&Archived>,
) -> (PinnedHead, Option<(String, u64)>) {
    let check = match crate::package::check_package(path) {
        Ok(check) => check,
        Err(e) => {
            row.problems.push(format!("cannot read the package: {e}"));
            return (PinnedHead::Unknown, None);
        }
    };
    let found = Some((check.package_sha256.clone(), check.package_size));
    row.problems.extend(check.problems.iter().cloned());
    let (whose, package_sha, payload_sha, size, name) = match a {
        Some(a) => (
            format!("its ARCHIVED row (seq {})", a.seq),
            a.package_sha256.clone().unwrap_or_default(),
            a.payload_sha256.clone().unwrap_or_default(),
            a.payload_size,
            a.payload_name.clone().unwrap_or_default(),
        ),
        None => (
            "the evidence row".to_string(),
            row.package_sha256.clone(),
            row.payload_sha256.clone(),
            row.payload_size,
            row.payload_name.clone(),
        ),
    };
    let mut mismatch = |what: &str, found: String, recorded: String| {
        if found != recorded {
            row.problems.push(format!(
                "the package's {what} is {found}, {whose} says {recorded}"
            ));
        }
    };
    mismatch("SHA-256", check.package_sha256.clone(), package_sha);
    mismatch(
        "payload SHA-256",
        check.payload_sha256.clone(),
        payload_sha.clone(),
    );
    mismatch(
        "payload size",
        check.payload_size.to_string(),
        size.map_or("nothing".into(), |s| s.to_string()),
    );
    mismatch("payload name", check.payload_name.clone(), name);
    let tags = match read_tags(path, &check.bag_name) {
        Ok(tags) => tags,
        Err(problem) => {
            row.problems.push(problem);
            return (PinnedHead::Unknown, found);
        }
    };
    check_identity(row, &check.bag_name, &tags);
    let retrieval = tags.retrieval;
    if retrieval["sha256"].as_str() != Some(payload_sha.as_str()) {
        row.problems.push(format!(
            "retrieval.json says sha256 {}, {whose} says {payload_sha}",
            retrieval["sha256"]
        ));
    }
    if retrieval["bytes"].as_u64() != Some(check.payload_size) {
        row.problems.push(format!(
            "retrieval.json says {} bytes, the payload has {}",
            retrieval["bytes"], check.payload_size
        ));
    }
    let head = match &retrieval["custody_head"] {
        Value::Null => PinnedHead::Absent,
        head => match (head["seq"].as_i64(), head["row_hash"].as_str()) {
            (Some(seq), Some(hash)) => PinnedHead::Present(seq, hash.to_string()),
            _ => {
                row.problems.push(format!(
                    "retrieval.json has a malformed custody_head: {head}"
                ));
                PinnedHead::Unknown
            }
        },
    };
    (head, found)
}

/// (row_hash, event, tenant, action_id, command_index, evidence_sha256) of a pinned row.
type PinnedRow = (String, String, String, String, Option<i64>, Option<String>);

/// §7a item 4: the pinned row must be in the chain with that hash, before the ARCHIVED row;
/// when it is the result's DOWNLOADED row, its payload hash must be the package's. Returns
/// true when the chain looks rewritten.
fn check_custody_head(
    conn: &Connection,
    row: &mut EvidenceRow,
    a: Option<&Archived>,
    seq: i64,
    hash: &str,
) -> Result<bool, DbError> {
    let pinned: Option<PinnedRow> = conn
        .prepare_cached(
            "SELECT row_hash, event, tenant, action_id, command_index, evidence_sha256 FROM custody_log WHERE seq = ?1",
        )
        .map_err(DbError::sql("read pinned custody row"))?
        .query_row([seq], |r| {
            let text = |i| crate::cells::shown(r, i);
            Ok((
                text(0),
                text(1),
                text(2),
                text(3),
                r.get_ref(4)?.as_i64().ok(),
                r.get_ref(5)?.as_str().ok().map(str::to_string),
            ))
        })
        .optional()
        .map_err(DbError::sql("read pinned custody row"))?;
    // After a restore, an adopted package may pin a row of the replaced database; its
    // ARCHIVED row says so, and a RESTORED row before it explains it.
    if let Some(a) = a
        && a.custody_head_superseded == Some((seq, hash.to_string()))
        && crate::custody::first_restore(conn)?.is_some_and(|r| r < a.seq)
        && pinned.as_ref().is_none_or(|p| p.0 != hash)
    {
        return Ok(false);
    }
    let Some((row_hash, event, tenant, action_id, index, sha)) = pinned else {
        row.problems.push(format!(
            "retrieval.json pins custody seq {seq}, which is not in the chain (truncated?)"
        ));
        return Ok(true);
    };
    if row_hash != hash {
        row.problems.push(format!(
            "retrieval.json pins custody seq {seq} with row_hash {hash}, the chain's row has {row_hash} (rewritten?)"
        ));
        return Ok(true);
    }
    if let Some(a) = a {
        if seq >= a.seq {
            row.problems.push(format!(
                "retrieval.json pins custody seq {seq}, not before its ARCHIVED row (seq {})",
                a.seq
            ));
        }
        let same_result = event == "DOWNLOADED"
            && tenant == row.tenant
            && action_id == row.action_id
            && index == row.index;
        if same_result && sha != a.payload_sha256 {
            row.problems.push(format!(
                "the DOWNLOADED row it pins (seq {seq}) has payload SHA-256 {}, the ARCHIVED row says {}",
                sha.unwrap_or_default(),
                a.payload_sha256.clone().unwrap_or_default()
            ));
        }
    }
    Ok(false)
}
