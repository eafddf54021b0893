//! Adoption (docs/evidence-format.md §9): a package found at a result's path (`fs`), in the spool,
//! or already in the object store, without an evidence row, is adopted only when this
//! database was writing it: the result's DOWNLOADED row with the package's payload SHA-256,
//! then a PUBLISHING row for that path with the package's own SHA-256, recorded before the
//! package was placed. That is a crash after the move (or the upload) and before the commit;
//! the package is re-checked from scratch and recorded as it is, never downloaded again and
//! never overwritten; a spool copy is published first (HEAD + hash: an object already
//! uploaded is taken as it is, never uploaded twice).
//!
//! Anything else found there (a planted bag, another result's package, one a restore left
//! behind, a file that is no package) is quarantined with a QUARANTINED custody row, and the
//! result is downloaded as usual: a file is moved under `_quarantine/`; an object that cannot
//! be moved stays where it is (recorded with its version, a copy kept under the spool's
//! `_quarantine/`), and the new package goes over it only conditionally
//! ([`crate::store::Store::publish_over`]). After a restore, and at the start of every pass
//! for the spool, [`adopt_in_place`] does this at once for every package waiting locally;
//! after a restore, [`requeue_found`] first returns to the queue the results the backup did
//! not hold as archived whose packages the store holds, whatever their state in the backup.

use serde_json::{Value, json};

use std::collections::HashSet;
use std::path::Path;

use super::Outcome;
use super::attempt::{Plan, archived_or_lost};
use crate::custody::{self, Event, EventKind};
use crate::db::DbError;
use crate::jobs::Context;
use crate::jobs::failure::{Failure, ProcessFailure};
use crate::package::{self, PackageCheck};
use crate::queue::{self, EvidenceRecord, Key, ResultState};
use crate::store::{LocalCopy, ObjectVersion, Stored};

/// What [`adopt_in_place`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InPlace {
    /// Packages re-checked and recorded as archived.
    pub adopted: usize,
    /// Results refused for good while adopting (the store refused the package): `failed`
    /// with the reason.
    pub refused: Vec<String>,
    /// Spool copies that could not be adopted now; their results retry (charged).
    pub retry: usize,
    /// Packages this database was not writing: quarantined, their results downloaded anew.
    pub quarantined: usize,
}

/// Adopts every `pending` result whose package is already at its final path (`fs`) or in
/// the spool, when this database was writing it (see the module docs), and quarantines the
/// others: after a restore, the packages written after the backup was taken; at each pass,
/// the spool copies a crash or an unavailable store left. No MDE call is made; a spool copy
/// is published (at most a HEAD and a hash when it is already in the store). Each adopted
/// package is re-checked from scratch and gets one ARCHIVED row (`adopted: true`); results of
/// tenants no longer configured are left alone. A store failure stops the round.
///
/// `listed`: the keys a walk of the spool just found (a pass); `None` looks at each pending
/// result's path instead (after a restore, where the store may be large and the pending few).
pub async fn adopt_in_place(
    ctx: &Context,
    listed: Option<&HashSet<String>>,
) -> Result<InPlace, DbError> {
    let root = ctx.store.staging_root().to_path_buf();
    let listed = listed.cloned();
    let in_place: Vec<Key> = ctx
        .db
        .read(move |c| pending_in_place(c, &root, listed.as_ref()))
        .await?;
    let mut out = InPlace::default();
    for key in in_place {
        let Some(t) = ctx.cfg.tenants.iter().find(|t| t.name == key.tenant) else {
            continue;
        };
        let actor = crate::custody::actor(&t.client_id);
        let Some(claimed) = queue::claim(&ctx.db, &key, &ctx.owner).await? else {
            continue;
        };
        let plan = Plan::new(&claimed);
        let failure = match adopt(ctx, &actor, &plan).await {
            Ok(Some(Outcome::Archived)) => {
                out.adopted += 1;
                continue;
            }
            Ok(Some(_)) => continue,
            Ok(None) => {
                // Nothing of the result's went wrong: it is due again at once, uncharged.
                out.quarantined += 1;
                let again = queue::Settlement::Retry {
                    reason: QUARANTINED_RETRY.into(),
                    backoff: std::time::Duration::ZERO,
                    charge: false,
                    scope: "result",
                };
                queue::settle(&ctx.db, &claimed, &ctx.owner, &actor, again).await?;
                continue;
            }
            Err(failure) => failure,
        };
        let settlement = failure.settlement(claimed.attempts, &ctx.cfg.download);
        let failed = !matches!(settlement, queue::Settlement::Retry { .. });
        queue::settle(&ctx.db, &claimed, &ctx.owner, &actor, settlement).await?;
        if let Failure::Process(ProcessFailure::Store { .. }) = &failure {
            super::publish::store_trouble(ctx, &failure);
            break;
        }
        if failed {
            out.refused.push(failure.reason().to_string());
        } else {
            out.retry += 1;
        }
    }
    Ok(out)
}

/// Why a result whose found package was quarantined goes back to the queue.
const QUARANTINED_RETRY: &str = "the package found at its path was quarantined (not written by this database); downloading it afresh";

/// The `pending` results whose package path is one of the `listed` keys, or without a
/// list, whose path under `root` holds a file.
fn pending_in_place(
    c: &rusqlite::Connection,
    root: &Path,
    listed: Option<&HashSet<String>>,
) -> Result<Vec<Key>, DbError> {
    Ok(with_package_paths(c, &[ResultState::Pending])?
        .into_iter()
        .filter(|(_, rel)| match listed {
            Some(listed) => listed.contains(rel),
            None => root.join(rel).exists(),
        })
        .map(|(key, _)| key)
        .collect())
}

/// The results in one of `states`, oldest action first, each with the path (and key) its
/// package has in the store.
fn with_package_paths(
    c: &rusqlite::Connection,
    states: &[ResultState],
) -> Result<Vec<(Key, String)>, DbError> {
    let read = |e| DbError::sql("read a result")(e);
    let marks = vec!["?"; states.len()].join(", ");
    let mut stmt = c
        .prepare(&format!(
            "SELECT r.tenant, r.action_id, r.command_index, a.created_at, coalesce(r.command_type, '')
             FROM results r JOIN actions a ON a.tenant = r.tenant AND a.action_id = r.action_id
             WHERE r.state IN ({marks}) ORDER BY a.created_at, r.action_id, r.command_index"
        ))
        .map_err(DbError::sql("select results"))?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(states))
        .map_err(DbError::sql("select results"))?;
    let mut keys = Vec::new();
    while let Some(r) = rows.next().map_err(read)? {
        let key = Key {
            tenant: r.get(0).map_err(read)?,
            action_id: r.get(1).map_err(read)?,
            index: r.get(2).map_err(read)?,
        };
        let created: String = r.get(3).map_err(read)?;
        let command_type: String = r.get(4).map_err(read)?;
        let created = crate::time::parse_api(&created).unwrap_or_else(crate::time::now);
        let rel = package::package_rel_path(
            &key.tenant,
            created,
            &key.action_id,
            key.index,
            &command_type,
        );
        keys.push((key, rel.to_string_lossy().into_owned()));
    }
    Ok(keys)
}

/// After a restore: the results the backup holds as `failed`, `unavailable` or `skipped`
/// whose key in the store holds a package go back to `pending` (QUEUED, `requeued_by`
/// restore). The replaced database archived them after the backup was taken (a failed
/// result re-queued and fetched, say); as pending results they are adopted, or their package
/// quarantined and the result fetched again, by [`adopt_in_place`] and the next pass, like
/// every other package written after the backup. Returns how many.
pub async fn requeue_found(ctx: &Context) -> anyhow::Result<usize> {
    let candidates = ctx
        .db
        .read(|c| {
            with_package_paths(
                c,
                &[
                    ResultState::Failed,
                    ResultState::Unavailable,
                    ResultState::Skipped,
                ],
            )
        })
        .await?;
    let mut found = Vec::new();
    for (key, rel) in candidates {
        if ctx.store.current(&rel).await?.is_some() {
            found.push(key);
        }
    }
    if found.is_empty() {
        return Ok(0);
    }
    let actors = ctx
        .cfg
        .tenants
        .iter()
        .map(|t| (t.name.clone(), custody::actor(&t.client_id)))
        .collect();
    let detail = json!({
        "requeued_by": "restore",
        "reason": "after a restore: the store holds a package for this result, which the backup does not hold as archived",
    });
    let keys = queue::requeue(&ctx.db, actors, queue::Requeue::Keys(found), detail).await?;
    Ok(keys.len())
}

/// The package a crash left for `plan` before its commit, adopted: at its final path
/// (`fs`) or in the spool, else (object stores) already published under its key. `None`
/// when there is none, or when what is there was quarantined: the result is to be
/// downloaded.
pub(super) async fn leftover(
    ctx: &Context,
    actor: &str,
    plan: &Plan<'_>,
) -> Result<Option<Outcome>, Failure> {
    let local = ctx.store.staging_root().join(&plan.rel_path);
    // An error other than "not there" (a directory that cannot be searched) is the
    // adoption's to report, as it reads the file.
    if tokio::fs::try_exists(&local).await.unwrap_or(true) {
        return adopt(ctx, actor, plan).await;
    }
    if !ctx.store.is_object() {
        return Ok(None);
    }
    let rel = plan.rel_str();
    match ctx.store.fetch_current(&rel).await {
        Ok(Some((stored, copy))) => adopt_published(ctx, actor, plan, stored, copy).await,
        Ok(None) => Ok(None),
        Err(e) => Err(Failure::from_store(&e)),
    }
}

/// Re-verifies the package at `plan`'s path (in place, or in the spool) and, when this
/// database was writing it, commits it as archived, as `actor`, publishing it first when
/// the store is an object store. `None`: it was quarantined.
pub(super) async fn adopt(
    ctx: &Context,
    actor: &str,
    plan: &Plan<'_>,
) -> Result<Option<Outcome>, Failure> {
    let rel = plan.rel_str();
    let root = ctx.store.staging_root();
    let path = root.join(&rel);
    let whence = if ctx.store.is_object() {
        format!("a package is already in the spool at {rel}")
    } else {
        format!("a package is already at {rel}")
    };
    let (check, retrieval) = match check_whole(&path, &whence).await? {
        Ok(checked) => checked,
        Err(refused) => {
            quarantine_file(ctx, actor, plan, None, &refused).await?;
            return Ok(None);
        }
    };
    if let Err(why) = own_package(ctx, plan, &check, retrieval.as_ref()).await? {
        quarantine_file(
            ctx,
            actor,
            plan,
            Some(&check),
            &format!("{whence} but {why}"),
        )
        .await?;
        return Ok(None);
    }
    // The package's directory entries must be durable before the database says it exists.
    let (dir, up_to) = (
        path.parent().unwrap_or(root).to_path_buf(),
        root.to_path_buf(),
    );
    tokio::task::spawn_blocking(move || package::sync_dirs(&dir, &up_to))
        .await
        .map_err(|e| Failure::retry(e.to_string()))?
        .map_err(|e| Failure::from_package(&e))?;
    let record = record_of(&rel, check, retrieval.as_ref());
    let k = &plan.claimed.key;
    let outcome = super::publish::record(ctx, actor, k, record).await?;
    if outcome == Outcome::Archived {
        tracing::info!(tenant = %k.tenant, action = %k.action_id, index = k.index, package = rel, "adopted a verified package this database was writing when an earlier run stopped");
    }
    Ok(Some(outcome))
}

/// Adopts the object the store already holds under `plan`'s key (an upload whose commit a
/// crash cut off), checked from a local copy of exactly the version the store serves; one
/// this database was not writing is quarantined in place (`None`).
async fn adopt_published(
    ctx: &Context,
    actor: &str,
    plan: &Plan<'_>,
    stored: Stored,
    copy: LocalCopy,
) -> Result<Option<Outcome>, Failure> {
    let rel = plan.rel_str();
    let whence = format!(
        "the store already holds {} (version {})",
        stored.location,
        stored.version_id.as_deref().unwrap_or("-")
    );
    let (check, retrieval) = match check_whole(copy.path(), &whence).await? {
        Ok(checked) => checked,
        Err(refused) => {
            quarantine_object(ctx, actor, plan, stored, copy, &refused).await?;
            return Ok(None);
        }
    };
    if let Err(why) = own_package(ctx, plan, &check, retrieval.as_ref()).await? {
        let reason = format!("{whence} but {why}");
        quarantine_object(ctx, actor, plan, stored, copy, &reason).await?;
        return Ok(None);
    }
    let mut record = record_of(&rel, check, retrieval.as_ref());
    drop(copy);
    record.extra.extend(stored.custody_detail());
    let k = &plan.claimed.key;
    let committed = queue::commit_archived(&ctx.db, k, &ctx.owner, actor, record).await;
    let outcome = archived_or_lost(committed)?;
    if outcome == Outcome::Archived {
        tracing::info!(tenant = %k.tenant, action = %k.action_id, index = k.index, location = %stored.location, version_id = ?stored.version_id, "adopted a verified package already in the store (an interrupted run uploaded it); nothing uploaded again");
    }
    Ok(Some(outcome))
}

/// The BagIt check of a whole package, and its `retrieval.json` when it can be read (on a
/// blocking thread); `whence` says where it was found. The inner `Err` is why it is no
/// package (unreadable, or not a valid bag).
async fn check_whole(
    path: &Path,
    whence: &str,
) -> Result<Result<(PackageCheck, Option<Value>), String>, Failure> {
    let owned = path.to_path_buf();
    let checked = tokio::task::spawn_blocking(move || {
        package::check_package(&owned).map(|check| {
            let retrieval = package::TagFiles::open(&owned, &check.bag_name)
                .and_then(|mut tags| tags.retrieval())
                .ok();
            (check, retrieval)
        })
    })
    .await
    .map_err(|e| Failure::retry(e.to_string()))?;
    Ok(match checked {
        Err(e) => Err(format!("{whence} and cannot be read: {e}")),
        Ok((check, _)) if !check.problems.is_empty() => Err(format!(
            "{whence} and does not verify: {}",
            check.problems.join("; ")
        )),
        Ok(checked) => Ok(checked),
    })
}

/// Was this database writing the checked package (its `retrieval.json`)? Its result's
/// DOWNLOADED row with the package's payload SHA-256, a PUBLISHING row after it for this path
/// with the package's SHA-256, and the package's `custody_head` naming that DOWNLOADED row.
/// The inner `Err` says what is missing.
async fn own_package(
    ctx: &Context,
    plan: &Plan<'_>,
    check: &PackageCheck,
    retrieval: Option<&Value>,
) -> Result<Result<(), String>, Failure> {
    let k = plan.claimed.key.clone();
    let (rel, payload, package) = (
        plan.rel_str(),
        check.payload_sha256.clone(),
        check.package_sha256.clone(),
    );
    let found = ctx
        .db
        .read(move |c| intent_rows(c, &k, &rel, &payload, &package))
        .await
        .map_err(Failure::database)?;
    let downloaded = match found {
        Err(why) => return Ok(Err(why)),
        Ok(head) => head,
    };
    let pinned = retrieval
        .and_then(|r| r.get("custody_head").cloned())
        .and_then(|h| serde_json::from_value::<custody::Head>(h).ok());
    Ok(match pinned {
        Some(head) if head == downloaded => Ok(()),
        Some(head) => Err(format!(
            "pins custody seq {} (row_hash {}), not its DOWNLOADED row (seq {})",
            head.seq, head.row_hash, downloaded.seq
        )),
        None => Err("pins no custody row".into()),
    })
}

/// The result's DOWNLOADED row (payload SHA-256 `payload`) followed by a PUBLISHING row for
/// `rel` with package SHA-256 `package`; the inner `Err` names what this database lacks.
fn intent_rows(
    c: &rusqlite::Connection,
    k: &Key,
    rel: &str,
    payload: &str,
    package: &str,
) -> Result<Result<custody::Head, String>, DbError> {
    use rusqlite::{OptionalExtension, params};
    let head = c
        .query_row(
            "SELECT d.seq, d.row_hash FROM custody_log d
             WHERE d.event = 'DOWNLOADED' AND d.tenant = ?1 AND d.action_id = ?2 AND d.command_index = ?3
               AND d.evidence_sha256 = ?4
               AND EXISTS (SELECT 1 FROM custody_log p
                   WHERE p.event = 'PUBLISHING' AND p.package_path = ?5 AND p.seq > d.seq
                     AND p.tenant = d.tenant AND p.action_id = d.action_id
                     AND p.command_index = d.command_index AND p.evidence_sha256 = d.evidence_sha256
                     AND json_extract(p.detail, '$.package_sha256') = ?6)
             ORDER BY d.seq DESC LIMIT 1",
            params![k.tenant, k.action_id, k.index, payload, rel, package],
            |r| {
                Ok(custody::Head {
                    seq: r.get(0)?,
                    row_hash: r.get(1)?,
                })
            },
        )
        .optional()
        .map_err(DbError::sql("look up the publishing intent"))?;
    if let Some(head) = head {
        return Ok(Ok(head));
    }
    let downloaded: bool = c
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM custody_log WHERE event = 'DOWNLOADED' AND tenant = ?1
                 AND action_id = ?2 AND command_index = ?3 AND evidence_sha256 = ?4)",
            params![k.tenant, k.action_id, k.index, payload],
            |r| r.get(0),
        )
        .map_err(DbError::sql("look up the DOWNLOADED row"))?;
    Ok(Err(if downloaded {
        format!("this database recorded no publishing intent for it (package SHA-256 {package})")
    } else {
        format!(
            "this database has no DOWNLOADED row of this result with its payload (SHA-256 {payload})"
        )
    }))
}

/// Moves the file at `plan`'s path aside under `_quarantine/` and records it (QUARANTINED).
async fn quarantine_file(
    ctx: &Context,
    actor: &str,
    plan: &Plan<'_>,
    check: Option<&PackageCheck>,
    reason: &str,
) -> Result<(), Failure> {
    let rel = plan.rel_str();
    let path = ctx.store.staging_root().join(&rel);
    let (sha256, size) = file_sha256(&path).await?;
    let to = ctx
        .store
        .quarantine(&rel)
        .await
        .map_err(|e| Failure::from_store(&e))?;
    let moved_to = to
        .strip_prefix(ctx.store.staging_root())
        .unwrap_or(&to)
        .to_string_lossy()
        .into_owned();
    tracing::error!(
        package = rel,
        moved_to,
        sha256,
        reason,
        "a package this database was not writing was found at a result's path; quarantined, the result is downloaded"
    );
    let detail = json!({ "reason": reason, "sha256": sha256, "size": size, "moved_to": moved_to });
    let payload = check.map(|c| c.payload_sha256.as_str());
    record_quarantined(ctx, actor, &plan.claimed.key, &rel, payload, detail).await
}

/// Records an object at `plan`'s key that cannot be moved (see [`quarantine_in_place`]).
async fn quarantine_object(
    ctx: &Context,
    actor: &str,
    plan: &Plan<'_>,
    stored: Stored,
    copy: LocalCopy,
    reason: &str,
) -> Result<(), Failure> {
    let rel = plan.rel_str();
    quarantine_in_place(ctx, actor, &plan.claimed.key, &rel, stored, copy, reason)
        .await
        .map(|_| ())
}

/// Records the object `stored` under `rel`, which cannot be moved, as QUARANTINED (left in
/// place, with its version; a copy kept under the spool's `_quarantine/`). The result's
/// new package goes over it only with [`crate::store::Store::publish_over`]. Returns the
/// object's version.
async fn quarantine_in_place(
    ctx: &Context,
    actor: &str,
    k: &Key,
    rel: &str,
    stored: Stored,
    copy: LocalCopy,
    reason: &str,
) -> Result<ObjectVersion, Failure> {
    let (sha256, size) = file_sha256(copy.path()).await?;
    let kept = match ctx.store.keep_aside(rel, copy).await {
        Ok(p) => Some(p.to_string_lossy().into_owned()),
        Err(e) => {
            tracing::warn!(package = rel, error = %e, "could not keep a copy of a quarantined object");
            None
        }
    };
    tracing::error!(location = %stored.location, version_id = ?stored.version_id, sha256, reason, "an object this database was not writing is under a result's key; quarantined in place, the result is downloaded");
    let detail = json!({
        "reason": reason, "sha256": sha256, "size": size, "left_in_place": stored.location,
        "version_id": stored.version_id, "etag": stored.etag, "kept_copy": kept,
    });
    record_quarantined(ctx, actor, k, rel, None, detail).await?;
    Ok(ObjectVersion {
        version_id: stored.version_id,
        etag: stored.etag,
        size: stored.size,
    })
}

/// Appends the QUARANTINED row for what was found at `rel`, the path of `k`'s package.
async fn record_quarantined(
    ctx: &Context,
    actor: &str,
    k: &Key,
    rel: &str,
    payload_sha256: Option<&str>,
    detail: Value,
) -> Result<(), Failure> {
    let event = Event {
        evidence_sha256: payload_sha256.filter(|s| !s.is_empty()),
        package_path: Some(rel),
        ..Event::new(
            &k.tenant,
            &k.action_id,
            Some(k.index),
            EventKind::Quarantined,
            actor,
        )
        .detail(detail)
    };
    custody::record(&ctx.db, event)
        .await
        .map(|_| ())
        .map_err(Failure::database)
}

/// The object that a package about to be published under `rel` may go over: the one the
/// key serves when a QUARANTINED row recorded exactly it, or else (someone else's object
/// appeared there) that object, quarantined in place now. `None` when the key is empty.
pub(super) async fn squatted(
    ctx: &Context,
    actor: &str,
    k: &Key,
    rel: &str,
) -> Result<Option<ObjectVersion>, Failure> {
    if let Some(over) = quarantined_current(ctx, rel).await? {
        return Ok(Some(over));
    }
    let Some((stored, copy)) = ctx
        .store
        .fetch_current(rel)
        .await
        .map_err(|e| Failure::from_store(&e))?
    else {
        return Ok(None);
    };
    let reason = format!(
        "the store holds another object under {} (version {}) when this database's package was to be published there",
        stored.location,
        stored.version_id.as_deref().unwrap_or("-")
    );
    quarantine_in_place(ctx, actor, k, rel, stored, copy, &reason)
        .await
        .map(Some)
}

/// The object `rel` now serves when a QUARANTINED row of this database recorded exactly it
/// (same version, or same ETag without versions): the only object a new package may go
/// over. `None` when the key serves anything else.
async fn quarantined_current(ctx: &Context, rel: &str) -> Result<Option<ObjectVersion>, Failure> {
    let Some(current) = ctx
        .store
        .current(rel)
        .await
        .map_err(|e| Failure::from_store(&e))?
    else {
        return Ok(None);
    };
    let (key, version, etag) = (
        rel.to_string(),
        current.version_id.clone(),
        current.etag.clone(),
    );
    let recorded = ctx
        .db
        .read(move |c| {
            c.query_row(
                "SELECT EXISTS (SELECT 1 FROM custody_log WHERE event = 'QUARANTINED' AND package_path = ?1
                   AND json_extract(detail, '$.left_in_place') IS NOT NULL
                   AND coalesce(json_extract(detail, '$.version_id'), '') = coalesce(?2, '')
                   AND coalesce(json_extract(detail, '$.etag'), '') = coalesce(?3, ''))",
                rusqlite::params![key, version, etag],
                |r| r.get::<_, bool>(0),
            )
            .map_err(DbError::sql("look up the quarantined object"))
        })
        .await
        .map_err(Failure::database)?;
    Ok(recorded.then_some(current))
}

/// The SHA-256 and size of a local file.
async fn file_sha256(path: &Path) -> Result<(String, u64), Failure> {
    use sha2::Digest;
    let owned = path.to_path_buf();
    let hashed = tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&owned)?;
        let mut hasher = sha2::Sha256::new();
        let size = std::io::copy(&mut file, &mut hasher)?;
        Ok::<_, std::io::Error>((hex::encode(hasher.finalize()), size))
    })
    .await
    .map_err(|e| Failure::retry(e.to_string()))?;
    hashed.map_err(|e| Failure::retry(format!("{}: {e}", path.display())))
}

/// The evidence record of a checked package (its key `rel`), from what the package itself
/// says (its `retrieval.json`).
fn record_of(rel: &str, check: PackageCheck, retrieval: Option<&Value>) -> EvidenceRecord {
    let get = |k: &str| retrieval.and_then(|r| r.get(k)).cloned();
    let text = |k: &str| get(k).as_ref().and_then(Value::as_str).map(str::to_string);
    EvidenceRecord {
        payload_name: check.payload_name.clone(),
        payload_size: check.payload_size,
        payload_sha256: check.payload_sha256.clone(),
        payload_md5: retrieval.and_then(checked_md5),
        original_name: text("original_name"),
        original_size: get("original_size").as_ref().and_then(Value::as_u64),
        original_sha256: text("original_sha256"),
        package_path: rel.to_string(),
        package_size: check.package_size,
        package_sha256: check.package_sha256,
        adopted: true,
        extra: Default::default(),
    }
}

/// The MD5 the original download checked against the server's claim, as `retrieval.json`
/// recorded it (hex), when it matched.
fn checked_md5(retrieval: &Value) -> Option<String> {
    use base64::Engine;
    if retrieval.get("md5_check").and_then(Value::as_str) != Some("match") {
        return None;
    }
    let headers = retrieval.get("headers")?;
    let claim = ["x-ms-blob-content-md5", "content-md5"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(Value::as_str))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(claim.trim())
        .ok()?;
    (bytes.len() == 16).then(|| hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_md5_comes_back_from_retrieval_json() {
        let r = serde_json::json!({
            "md5_check": "match",
            "headers": { "content-md5": "1B2M2Y8AsgTpgAmY7PhCfg==" }
        });
        assert_eq!(
            checked_md5(&r).as_deref(),
            Some("d41d8cd98f00b204e9800998ecf8427e")
        );
        let absent = serde_json::json!({ "md5_check": "absent", "headers": {} });
        assert_eq!(checked_md5(&absent), None);
    }
}
