//! Adoption: a package found at its final path without an evidence row was left by a crash
//! after the move and before the commit. It is re-checked from scratch and recorded as it
//! is, never downloaded again and never overwritten.

use serde_json::Value;

use super::Outcome;
use super::attempt::{Plan, archived_or_lost, read_retrieval};
use crate::jobs::failure::Failure;
use crate::jobs::{Context, Tenant};
use crate::package;
use crate::queue::{self, EvidenceRecord};

/// Re-verifies the package at `plan`'s path and commits it as archived.
pub(super) async fn adopt(
    ctx: &Context,
    tenant: &Tenant,
    plan: &Plan<'_>,
) -> Result<Outcome, Failure> {
    let rel = plan.rel_str();
    let path = ctx.cfg.store.root.join(&rel);
    let check = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || package::check_package(&path))
            .await
            .map_err(|e| Failure::retry(e.to_string()))?
            .map_err(|e| {
                Failure::refused(format!(
                    "a package is already at {rel} and cannot be read: {e}"
                ))
            })?
    };
    if !check.problems.is_empty() {
        return Err(Failure::refused(format!(
            "a package is already at {rel} and does not verify: {}",
            check.problems.join("; ")
        )));
    }
    // The package's directory entries must be durable before the database says it exists.
    sync_dirs(&path, &ctx.cfg.store.root).map_err(|e| Failure::from_package(&e))?;
    let retrieval = read_retrieval(&path, &check.bag_name);
    let get = |k: &str| retrieval.as_ref().and_then(|r| r.get(k)).cloned();
    let text = |k: &str| get(k).as_ref().and_then(Value::as_str).map(str::to_string);
    let record = EvidenceRecord {
        payload_name: check.payload_name.clone(),
        payload_size: check.payload_size,
        payload_sha256: check.payload_sha256.clone(),
        payload_md5: retrieval.as_ref().and_then(checked_md5),
        original_name: text("original_name"),
        original_size: get("original_size").as_ref().and_then(Value::as_u64),
        original_sha256: text("original_sha256"),
        package_path: rel.clone(),
        package_size: check.package_size,
        package_sha256: check.package_sha256,
        adopted: true,
    };
    let k = &plan.claimed.key;
    let committed = queue::commit_archived(&ctx.db, k, &ctx.owner, &tenant.actor, record).await;
    let outcome = archived_or_lost(committed)?;
    if outcome == Outcome::Archived {
        tracing::info!(tenant = %k.tenant, action = %k.action_id, index = k.index, package = rel, "adopted a verified package left by an interrupted run");
    }
    Ok(outcome)
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
