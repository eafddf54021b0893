//! The last step of an attempt (docs/operations.md §14): the checked package goes to the store, the
//! ARCHIVED row records where (`store`, `version_id`, `etag`), and only then is the spool
//! copy removed. For `fs` the package is already in place and the row is as it always was.
//! An object someone else put under the key is quarantined in place first, and the package
//! goes over it conditionally (docs/evidence-format.md §9).
//!
//! Also the pass's guards for an object store: the store breaker (a store that failed
//! pauses every pass; one cheap probe per interval tests it again) and the spool bound (no
//! new download starts while `store.spool_max_waiting` packages wait for the store).

use super::Outcome;
use super::attempt::archived_or_lost;
use crate::jobs::Context;
use crate::jobs::breaker::Admission;
use crate::jobs::failure::{Failure, ProcessFailure, TenantFailure, TenantTrouble};
use crate::queue::{self, EvidenceRecord, Key};
use crate::store::{Expected, StoreError};

/// Publishes the finished, checked package `rec` names, then commits it as archived and
/// releases the spool copy. A lost lease leaves the copy for the process that took over.
pub(super) async fn record(
    ctx: &Context,
    actor: &str,
    key: &Key,
    mut rec: EvidenceRecord,
) -> Result<Outcome, Failure> {
    let rel = rec.package_path.clone();
    let expected = Expected {
        sha256: rec.package_sha256.clone(),
        size: rec.package_size,
    };
    let stored = match ctx.store.publish(&rel, &expected).await {
        Ok(stored) => stored,
        // Someone else's object under the key (docs/evidence-format.md §9): quarantined in place,
        // and this package goes over it only while the key still serves exactly that object.
        Err(StoreError::Conflict { .. })
            if let Some(over) = super::adopt::squatted(ctx, actor, key, &rel).await? =>
        {
            match ctx.store.publish_over(&rel, &expected, &over).await {
                Ok(stored) => stored,
                Err(e) => return Err(refused(ctx, &rel, &e).await),
            }
        }
        Err(e) => return Err(refused(ctx, &rel, &e).await),
    };
    store_answered(ctx);
    rec.extra.extend(stored.custody_detail());
    if let Some(hold) = hold_if_held(ctx, key, &rel).await? {
        rec.extra.insert("legal_hold".into(), hold);
    }
    let committed = queue::commit_archived(&ctx.db, key, &ctx.owner, actor, rec).await;
    let outcome = archived_or_lost(committed)?;
    if outcome == Outcome::Archived
        && let Err(e) = ctx.store.release(&rel).await
    {
        tracing::warn!(package = rel, error = %e, "could not remove the spool copy of an archived package; the next pass's sweep removes it");
    }
    Ok(outcome)
}

/// A package of an action in a held case is held as it is published, before its ARCHIVED
/// row (docs/operations.md §17): a crash in between publishes (adopts) and holds it again. The
/// row's `legal_hold` names the cases and, on S3, the versions held.
async fn hold_if_held(
    ctx: &Context,
    key: &Key,
    rel: &str,
) -> Result<Option<serde_json::Value>, Failure> {
    let (tenant, action) = (key.tenant.clone(), key.action_id.clone());
    let cases = ctx
        .db
        .read(move |c| crate::cases::held_cases(c, &tenant, &action))
        .await
        .map_err(Failure::database)?;
    if cases.is_empty() {
        return Ok(None);
    }
    let versions = match ctx.store.legal_hold(rel, true).await {
        Ok(versions) => versions,
        Err(e) => return Err(refused(ctx, rel, &e).await),
    };
    Ok(Some(serde_json::json!({
        "cases": cases,
        "enforced": ctx.store.enforces_legal_hold(),
        "versions": versions,
    })))
}

/// The failure a refused publication is. A spool copy the store cannot take as it is (the
/// key holds another object, or the copy changed after its check) is set aside, so a retry
/// starts afresh and the spool bound does not count it.
async fn refused(ctx: &Context, rel: &str, e: &StoreError) -> Failure {
    let failure = Failure::from_store(e);
    if ctx.store.is_object()
        && matches!(e, StoreError::Conflict { .. } | StoreError::Changed { .. })
    {
        match ctx.store.quarantine(rel).await {
            Ok(to) => {
                tracing::error!(package = rel, set_aside = %to.display(), error = %e, "the store refused the package; its spool copy is set aside for an operator")
            }
            Err(q) => {
                tracing::error!(package = rel, error = %e, set_aside_error = %q, "the store refused the package and its spool copy could not be set aside")
            }
        }
    }
    failure
}

/// A store failure: opens (or keeps open) the store breaker, so passes start no result
/// until a probe finds the store answering again.
pub(super) fn store_trouble(ctx: &Context, failure: &Failure) {
    let Failure::Process(ProcessFailure::Store { reason }) = failure else {
        return;
    };
    let (open, trip) = ctx.store_breaker.trip(&TenantFailure {
        kind: TenantTrouble::Outage,
        reason: reason.clone(),
    });
    if trip != crate::jobs::breaker::Trip::AlreadyOpen {
        tracing::error!(store = %ctx.store.describe(), reason = %open.reason, next_probe_at = %open.next_probe_at,
            "evidence store unavailable; archive passes start no result until it answers (packages wait in the spool, no attempt is charged)");
    }
}

/// The store took or gave something: closes the store breaker if it was open.
fn store_answered(ctx: &Context) {
    if ctx.store_breaker.close() {
        tracing::info!(store = %ctx.store.describe(), "the evidence store answers again");
    }
}

/// May a pass start results now, as far as the store is concerned? `Err` is the line the
/// pass reports when it may not.
pub(super) async fn store_admits(ctx: &Context) -> Result<(), String> {
    match ctx.store_breaker.admit() {
        Admission::Go => Ok(()),
        Admission::Probe => match ctx.store.probe().await {
            Ok(()) => {
                store_answered(ctx);
                Ok(())
            }
            Err(e) => {
                let failure = Failure::from_store(&e);
                store_trouble(ctx, &failure);
                Err(paused_line(ctx))
            }
        },
        Admission::Wait { .. } => Err(paused_line(ctx)),
    }
}

/// The line for a pass that stopped because the store breaker is open.
pub(super) fn paused_line(ctx: &Context) -> String {
    match ctx.store_breaker.open() {
        Some(o) => format!(
            "evidence store {}: {} (paused since {}; next probe at {})",
            ctx.store.describe(),
            o.reason,
            o.since,
            o.next_probe_at
        ),
        None => format!("evidence store {}: paused", ctx.store.describe()),
    }
}

/// `Some(line)` when the spool holds `store.spool_max_waiting` finished packages or more:
/// no new download starts until the store has taken some.
pub(super) async fn spool_full(ctx: &Context) -> Option<String> {
    if !ctx.store.is_object() {
        return None;
    }
    let max = ctx.cfg.store.object_store()?.spool_max_waiting;
    let files = match ctx.store.spool_files().await {
        Ok(files) => files,
        Err(e) => return Some(format!("the spool cannot be read: {e}")),
    };
    (files.len() >= max).then(|| {
        let bytes: u64 = files.iter().map(|f| f.size).sum();
        format!(
            "the spool {} holds {} packages ({bytes} bytes) waiting for the store {} (store.spool_max_waiting = {max}); no new download starts until the store takes them",
            ctx.store.staging_root().display(),
            files.len(),
            ctx.store.describe()
        )
    })
}
