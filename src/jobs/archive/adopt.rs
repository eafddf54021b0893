//! Adoption: a package found at its final path (`fs`), in the spool, or already in the
//! object store, without an evidence row, was left by a crash after the move (or the upload)
//! and before the commit. It is re-checked from scratch and recorded as it is, never
//! downloaded again and never overwritten; a spool copy is published first (HEAD + hash: an
//! object already uploaded is taken as it is, never uploaded twice). After a restore, and at
//! the start of every pass for the spool, [`adopt_in_place`] does this at once for every
//! package waiting locally.

use serde_json::Value;

use std::path::Path;

use super::Outcome;
use super::attempt::{Plan, archived_or_lost, read_retrieval};
use crate::custody;
use crate::db::DbError;
use crate::jobs::Context;
use crate::jobs::failure::{Failure, ProcessFailure};
use crate::package::{self, PackageCheck};
use crate::queue::{self, EvidenceRecord, Key};
use crate::store::{LocalCopy, Stored};

/// What [`adopt_in_place`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InPlace {
    /// Packages re-checked and recorded as archived.
    pub adopted: usize,
    /// Packages in place that do not verify: their results are `failed` with the reason
    /// (the package is left as it is).
    pub refused: Vec<String>,
    /// Spool copies that could not be adopted now; their results retry (charged).
    pub retry: usize,
}

/// Adopts every `pending` result whose package is already at its final path (`fs`) or in
/// the spool: after a restore, the packages written after the backup was taken; at each
/// pass, the spool copies a crash or an unavailable store left. No MDE call is made; a spool
/// copy is published (at most a HEAD and a hash when it is already in the store). Each is
/// re-checked from scratch and gets one ARCHIVED row (`adopted: true`); results of tenants
/// no longer configured are left alone. A store failure stops the round (the rest wait).
pub async fn adopt_in_place(ctx: &Context) -> Result<InPlace, DbError> {
    let root = ctx.store.staging_root().to_path_buf();
    let in_place: Vec<Key> = ctx
        .db
        .read(move |c| {
            let mut stmt = c
                .prepare(
                    "SELECT r.tenant, r.action_id, r.command_index, a.created_at, coalesce(r.command_type, '')
                     FROM results r JOIN actions a ON a.tenant = r.tenant AND a.action_id = r.action_id
                     WHERE r.state = 'pending' ORDER BY a.created_at, r.action_id, r.command_index",
                )
                .map_err(DbError::sql("select pending results"))?;
            let mut rows = stmt.query([]).map_err(DbError::sql("select pending results"))?;
            let mut keys = Vec::new();
            while let Some(r) = rows.next().map_err(DbError::sql("select pending results"))? {
                let key = Key {
                    tenant: r.get(0).map_err(DbError::sql("read pending result"))?,
                    action_id: r.get(1).map_err(DbError::sql("read pending result"))?,
                    index: r.get(2).map_err(DbError::sql("read pending result"))?,
                };
                let created: String = r.get(3).map_err(DbError::sql("read pending result"))?;
                let command_type: String = r.get(4).map_err(DbError::sql("read pending result"))?;
                let created = crate::time::parse_api(&created).unwrap_or_else(crate::time::now);
                let rel = package::package_rel_path(
                    &key.tenant,
                    created,
                    &key.action_id,
                    key.index,
                    &command_type,
                );
                if root.join(rel).exists() {
                    keys.push(key);
                }
            }
            Ok(keys)
        })
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
        match adopt(ctx, &actor, &plan).await {
            Ok(Outcome::Archived) => out.adopted += 1,
            Ok(_) => {}
            Err(failure) => {
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
        }
    }
    Ok(out)
}

/// The package a crash left for `plan` before its commit, adopted: at its final path
/// (`fs`) or in the spool, else (object stores) already published under its key. `None`
/// when there is none, and the result is to be downloaded.
pub(super) async fn leftover(
    ctx: &Context,
    actor: &str,
    plan: &Plan<'_>,
) -> Result<Option<Outcome>, Failure> {
    if ctx.store.staging_root().join(&plan.rel_path).exists() {
        return adopt(ctx, actor, plan).await.map(Some);
    }
    if !ctx.store.is_object() {
        return Ok(None);
    }
    let rel = plan.rel_str();
    match ctx.store.fetch_current(&rel).await {
        Ok(Some((stored, copy))) => adopt_published(ctx, actor, plan, stored, copy)
            .await
            .map(Some),
        Ok(None) => Ok(None),
        Err(e) => Err(Failure::from_store(&e)),
    }
}

/// Re-verifies the package at `plan`'s path (in place, or in the spool) and commits it as
/// archived, as `actor`, publishing it first when the store is an object store.
pub(super) async fn adopt(ctx: &Context, actor: &str, plan: &Plan<'_>) -> Result<Outcome, Failure> {
    let rel = plan.rel_str();
    let root = ctx.store.staging_root();
    let path = root.join(&rel);
    let whence = if ctx.store.is_object() {
        format!("a package is already in the spool at {rel}")
    } else {
        format!("a package is already at {rel}")
    };
    let check = match check_whole(&path, &whence).await {
        Ok(check) => check,
        // A spool copy is not evidence yet: one that does not verify is set aside and the
        // result downloaded again.
        Err(refused) if ctx.store.is_object() => {
            if let Ok(to) = ctx.store.quarantine(&rel).await {
                tracing::error!(package = rel, set_aside = %to.display(), reason = refused.reason(), "a spool copy does not verify; set aside");
            }
            return Err(Failure::retry(refused.reason()));
        }
        Err(refused) => return Err(refused),
    };
    // The package's directory entries must be durable before the database says it exists.
    sync_dirs(&path, root).map_err(|e| Failure::from_package(&e))?;
    let record = record_of(ctx, &rel, &path, check).await?;
    let k = &plan.claimed.key;
    let outcome = super::publish::record(ctx, actor, k, record).await?;
    if outcome == Outcome::Archived {
        tracing::info!(tenant = %k.tenant, action = %k.action_id, index = k.index, package = rel, "adopted a verified package left by an interrupted run");
    }
    Ok(outcome)
}

/// Adopts the object the store already holds under `plan`'s key (an upload whose commit a
/// crash cut off), checked from a local copy of exactly the version the store serves.
async fn adopt_published(
    ctx: &Context,
    actor: &str,
    plan: &Plan<'_>,
    stored: Stored,
    copy: LocalCopy,
) -> Result<Outcome, Failure> {
    let rel = plan.rel_str();
    let whence = format!(
        "the store already holds {} (version {})",
        stored.location,
        stored.version_id.as_deref().unwrap_or("-")
    );
    let check = check_whole(copy.path(), &whence).await?;
    let mut record = record_of(ctx, &rel, copy.path(), check).await?;
    drop(copy);
    record.extra.extend(stored.custody_detail());
    let k = &plan.claimed.key;
    let committed = queue::commit_archived(&ctx.db, k, &ctx.owner, actor, record).await;
    let outcome = archived_or_lost(committed)?;
    if outcome == Outcome::Archived {
        tracing::info!(tenant = %k.tenant, action = %k.action_id, index = k.index, location = %stored.location, version_id = ?stored.version_id, "adopted a verified package already in the store (an interrupted run uploaded it); nothing uploaded again");
    }
    Ok(outcome)
}

/// The BagIt check of a whole package; `whence` says where it was found, for the refusal.
async fn check_whole(path: &Path, whence: &str) -> Result<PackageCheck, Failure> {
    let owned = path.to_path_buf();
    let check = tokio::task::spawn_blocking(move || package::check_package(&owned))
        .await
        .map_err(|e| Failure::retry(e.to_string()))?
        .map_err(|e| Failure::refused(format!("{whence} and cannot be read: {e}")))?;
    if !check.problems.is_empty() {
        return Err(Failure::refused(format!(
            "{whence} and does not verify: {}",
            check.problems.join("; ")
        )));
    }
    Ok(check)
}

/// The evidence record of a checked package at `path` (its key `rel`), from what the
/// package itself says.
async fn record_of(
    ctx: &Context,
    rel: &str,
    path: &Path,
    check: PackageCheck,
) -> Result<EvidenceRecord, Failure> {
    let retrieval = read_retrieval(path, &check.bag_name);
    let extra = pinned_head_check(ctx, rel, retrieval.as_ref()).await?;
    let get = |k: &str| retrieval.as_ref().and_then(|r| r.get(k)).cloned();
    let text = |k: &str| get(k).as_ref().and_then(Value::as_str).map(str::to_string);
    Ok(EvidenceRecord {
        payload_name: check.payload_name.clone(),
        payload_size: check.payload_size,
        payload_sha256: check.payload_sha256.clone(),
        payload_md5: retrieval.as_ref().and_then(checked_md5),
        original_name: text("original_name"),
        original_size: get("original_size").as_ref().and_then(Value::as_u64),
        original_sha256: text("original_sha256"),
        package_path: rel.to_string(),
        package_size: check.package_size,
        package_sha256: check.package_sha256,
        adopted: true,
        extra,
    })
}

/// The package's `custody_head` must be a row of this chain; after a restore it may pin a
/// row that lives on in the replaced database only, which the ARCHIVED row then says
/// (`custody_head_superseded`, checked by `verify`). Anything else is refused.
async fn pinned_head_check(
    ctx: &Context,
    rel: &str,
    retrieval: Option<&Value>,
) -> Result<serde_json::Map<String, Value>, Failure> {
    let mut extra = serde_json::Map::new();
    let Some(head) = retrieval
        .and_then(|r| r.get("custody_head"))
        .and_then(|h| serde_json::from_value::<custody::Head>(h.clone()).ok())
    else {
        return Ok(extra); // written before packages pinned the chain
    };
    let probe = head.clone();
    let (in_chain, restored) = ctx
        .db
        .read(move |c| Ok((custody::has_row(c, &probe)?, custody::first_restore(c)?)))
        .await
        .map_err(Failure::database)?;
    match (in_chain, restored) {
        (true, _) => {}
        (false, Some(_)) => {
            extra.insert("custody_head_superseded".into(), serde_json::json!(head));
        }
        (false, None) => {
            return Err(Failure::refused(format!(
                "a package is already at {rel} but pins custody seq {} (row_hash {}), which is not in this chain and no restore explains",
                head.seq, head.row_hash
            )));
        }
    }
    Ok(extra)
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

/// fsyncs the directories from the package's up to the store root, so a crash after the
/// commit cannot lose the package's directory entry.
fn sync_dirs(
    package: &std::path::Path,
    root: &std::path::Path,
) -> Result<(), package::PackageError> {
    for dir in package.ancestors().skip(1) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| package::PackageError::Io {
                path: dir.to_path_buf(),
                op: "fsyncing directory",
                source,
            })?;
        if dir == root {
            break;
        }
    }
    Ok(())
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
