//! Step 3 of a verify run (§7a item 6): every file under a tenant's directory of the store
//! must be a package some evidence row names. A download in progress is not a defect: its
//! `*.partial` (and, between the rename and the database commit, its finished zip) belong to
//! a result in state `downloading`, which is asked afresh whenever a file is not explained.
//! In an object store the same holds for every key below a tenant's prefix (listed, never
//! held in memory), and an object uploaded but not yet committed belongs to a result in
//! state `downloading` too.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension};

use super::Scope;
use super::defect::{Defect, Recorder};
use crate::db::DbError;
use crate::queue::ResultState;
use crate::store::Blocking;

pub fn check(
    conn: &Connection,
    root: &Path,
    store: &Blocking,
    scope: &Scope,
    rec: &mut Recorder,
) -> anyhow::Result<()> {
    if store.store().is_object() {
        return check_objects(conn, store, scope, rec);
    }
    check_files(conn, root, scope, rec)?;
    Ok(())
}

/// The keys below each tenant's prefix (`_checkpoints` is checked with the anchors).
fn check_objects(
    conn: &Connection,
    store: &Blocking,
    scope: &Scope,
    rec: &mut Recorder,
) -> anyhow::Result<()> {
    let prefix = scope
        .tenant
        .as_deref()
        .map(|t| format!("{}/", crate::package::path_component(t)))
        .unwrap_or_default();
    let mut in_flight: Option<HashSet<String>> = None;
    for listed in store.list(&prefix) {
        let key = listed?.key;
        if key.starts_with('_') || key.starts_with('.') {
            continue;
        }
        if let Some(problem) = unexplained(conn, &key, || true, &mut in_flight)? {
            let problem = problem.replace("file", "object");
            rec.defect(Defect::StoreFile { path: key, problem })?;
        }
    }
    Ok(())
}

fn check_files(
    conn: &Connection,
    root: &Path,
    scope: &Scope,
    rec: &mut Recorder,
) -> Result<(), DbError> {
    let mut pending: Vec<PathBuf> = tenant_dirs(root, scope.tenant.as_deref());
    let mut in_flight: Option<HashSet<String>> = None;
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                rec.defect(Defect::StoreFile {
                    path: rel(root, &dir),
                    problem: format!("directory cannot be read: {e}"),
                })?;
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(path),
                Ok(t) if t.is_file() => {
                    let rel = rel(root, &path);
                    if let Some(problem) =
                        unexplained(conn, &rel, || path.exists(), &mut in_flight)?
                    {
                        rec.defect(Defect::StoreFile { path: rel, problem })?;
                    }
                }
                _ => rec.defect(Defect::StoreFile {
                    path: rel(root, &path),
                    problem: "not a regular file (symlink or special file)".into(),
                })?,
            }
        }
    }
    Ok(())
}

/// The tenant directories to walk: the one asked for, or every top-level directory whose
/// name does not start with `_` or `.` (`_checkpoints` is checked with the anchors).
fn tenant_dirs(root: &Path, tenant: Option<&str>) -> Vec<PathBuf> {
    if let Some(t) = tenant {
        let dir = root.join(crate::package::path_component(t));
        return if dir.is_dir() { vec![dir] } else { vec![] };
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('_') && !n.starts_with('.'))
        })
        .collect();
    dirs.sort();
    dirs
}

fn rel(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// `None` when an evidence row or a download in progress accounts for the file at `rel`
/// (or when it is gone: `still_there`).
fn unexplained(
    conn: &Connection,
    rel: &str,
    still_there: impl Fn() -> bool,
    in_flight: &mut Option<HashSet<String>>,
) -> Result<Option<String>, DbError> {
    let rel = rel.to_string();
    // `<package>.<writer tag>.partial` belongs to the package it is being written for.
    let (final_rel, partial) = match crate::package::partial_target(Path::new(&rel)) {
        Some(target) => (target.to_string_lossy().into_owned(), true),
        None => (rel.clone(), rel.ends_with(".partial")),
    };
    if !partial && named_by_evidence(conn, &rel)? {
        return Ok(None);
    }
    if in_flight
        .as_ref()
        .is_some_and(|set| set.contains(&final_rel))
    {
        return Ok(None);
    }
    // Not explained by the rows seen so far: ask again (a download may have just started or
    // finished), and look whether the file is still there.
    let fresh = downloading(conn)?;
    let explained = fresh.contains(&final_rel) || (!partial && named_by_evidence(conn, &rel)?);
    *in_flight = Some(fresh);
    if explained || !still_there() {
        return Ok(None);
    }
    Ok(Some(if partial {
        "partial file that no download in progress accounts for".into()
    } else {
        "no evidence row names this file".into()
    }))
}

fn named_by_evidence(conn: &Connection, rel: &str) -> Result<bool, DbError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM evidence WHERE package_path = ?1")
        .map_err(DbError::sql("look up package path"))?
        .query_row([rel], |_| Ok(()))
        .optional()
        .map_err(DbError::sql("look up package path"))?
        .is_some())
}

/// Package paths (relative to the store root) of the results being downloaded right now.
fn downloading(conn: &Connection) -> Result<HashSet<String>, DbError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT r.tenant, r.action_id, r.command_index, a.created_at, coalesce(r.command_type, '')
             FROM results r JOIN actions a ON a.tenant = r.tenant AND a.action_id = r.action_id
             WHERE r.state = ?1",
        )
        .map_err(DbError::sql("read downloading results"))?;
    let rows = stmt
        .query_map([ResultState::Downloading], |r| {
            // Read leniently: a mistyped row explains no file, it does not stop the check.
            let text = |i| crate::cells::shown(r, i);
            Ok((
                text(0),
                text(1),
                r.get_ref(2)?
                    .as_i64()
                    .ok()
                    .and_then(|i| u32::try_from(i).ok()),
                text(3),
                text(4),
            ))
        })
        .map_err(DbError::sql("read downloading results"))?;
    let mut paths = HashSet::new();
    for row in rows {
        let (tenant, action_id, index, created, ctype) =
            row.map_err(DbError::sql("read downloading results"))?;
        if let (Some(created), Some(index)) = (crate::time::parse_api(&created), index) {
            let path =
                crate::package::package_rel_path(&tenant, created, &action_id, index, &ctype);
            paths.insert(path.to_string_lossy().into_owned());
        }
    }
    Ok(paths)
}
