//! The archive pass: each due `pending` result is claimed, its download link minted, the blob
//! streamed into a BagIt package while it is hashed, checked against the server's length and
//! MD5, moved into the store, and recorded. The steps of one attempt are in [`attempt`]; the
//! state transitions are the queue's ([`crate::queue`]); who pays for a failure is decided in
//! [`super::failure`].

mod adopt;
mod attempt;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

use super::failure::Failure;
use super::{Context, Tenant};
use crate::db::DbError;
use crate::package;
use crate::queue::{self, Claimed, Settlement};

pub use crate::queue::{Key, Scope};

/// How often a working download renews its lease.
const LEASE_RENEW: Duration = Duration::from_secs(60);

/// What one archive pass did, added up over its tenants.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub archived: usize,
    pub unavailable: usize,
    pub failed: usize,
    /// Attempts that failed and were rescheduled.
    pub retry_later: usize,
    /// Results another process had claimed first.
    pub claimed_elsewhere: usize,
    /// Due results left when the pass stopped (cancelled or `--max`).
    pub not_started: usize,
    /// Crashed downloads returned to pending before the pass.
    pub recovered: usize,
    /// Tenants whose pass could not run (e.g. the token request was refused), one line each.
    pub tenant_errors: Vec<String>,
}

impl std::ops::AddAssign for Summary {
    fn add_assign(&mut self, o: Summary) {
        self.archived += o.archived;
        self.unavailable += o.unavailable;
        self.failed += o.failed;
        self.retry_later += o.retry_later;
        self.claimed_elsewhere += o.claimed_elsewhere;
        self.not_started += o.not_started;
        self.recovered += o.recovered;
        self.tenant_errors.extend(o.tenant_errors);
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} archived, {} unavailable, {} failed, {} to retry later",
            self.archived, self.unavailable, self.failed, self.retry_later
        )
    }
}

impl Summary {
    fn count(&mut self, o: Outcome) {
        match o {
            Outcome::Archived => self.archived += 1,
            Outcome::Unavailable => self.unavailable += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::RetryLater => self.retry_later += 1,
            Outcome::ClaimedElsewhere => self.claimed_elsewhere += 1,
        }
    }
}

/// How one result ended in this pass (the pass [`Summary`] counts these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Archived,
    Unavailable,
    Failed,
    RetryLater,
    ClaimedElsewhere,
}

/// Callback for progress: called once per finished result.
pub type OnResult = Arc<dyn Fn(&Key, Outcome) + Send + Sync>;

/// One pass over the due results of `tenants` in `scope`. Each tenant has its own loop and
/// `download.concurrency` download slots, so a tenant waiting on its quota never holds up
/// another. New results stop starting when the context is cancelled.
pub async fn archive(
    ctx: &Arc<Context>,
    tenants: &[Arc<Tenant>],
    scope: &Scope,
    on_result: Option<OnResult>,
) -> anyhow::Result<Summary> {
    let mut summary = Summary {
        recovered: recover(ctx).await?,
        ..Default::default()
    };
    ctx.governor.prune().await?;
    // `max` is shared by all tenants: hand out the budget as results start.
    let budget = Arc::new(AtomicUsize::new(scope.max.unwrap_or(usize::MAX)));
    let mut loops = tokio::task::JoinSet::new();
    for tenant in tenants {
        let (ctx, tenant, scope, on_result, budget) = (
            ctx.clone(),
            tenant.clone(),
            scope.clone(),
            on_result.clone(),
            budget.clone(),
        );
        loops.spawn(async move { archive_tenant(&ctx, &tenant, &scope, on_result, &budget).await });
    }
    while let Some(done) = loops.join_next().await {
        // One tenant's failure (bad credentials, DB error) must not stop the others.
        match done? {
            Ok(s) => summary += s,
            Err(e) => summary.tenant_errors.push(crate::error::one_line(&e)),
        }
    }
    Ok(summary)
}

async fn archive_tenant(
    ctx: &Arc<Context>,
    tenant: &Arc<Tenant>,
    scope: &Scope,
    on_result: Option<OnResult>,
    budget: &AtomicUsize,
) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let due = queue::due(&ctx.db, &tenant.cfg.name, scope).await?;
    let due_count = due.len();
    if due_count > 0 {
        // Bad credentials are a configuration problem, not a property of any result: stop
        // here rather than spending every result's attempts on them.
        tenant
            .client
            .check_auth()
            .await
            .map_err(|e| anyhow::anyhow!("tenant '{}': {e}", tenant.cfg.name))?;
    }
    let slots = Arc::new(Semaphore::new(ctx.cfg.download.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let mut started = 0;
    for key in due {
        // A download slot first: links are only minted when they can be used at once.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p?,
            _ = ctx.cancel.cancelled() => break,
        };
        if budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .is_err()
        {
            break;
        }
        started += 1;
        let (ctx, tenant, on_result) = (ctx.clone(), tenant.clone(), on_result.clone());
        tasks.spawn(async move {
            let outcome = archive_one(&ctx, &tenant, &key).await;
            drop(permit);
            if let Some(cb) = &on_result {
                cb(&key, outcome);
            }
            outcome
        });
        // Collect finished tasks as we go so the set does not grow with the queue.
        while let Some(done) = tasks.try_join_next() {
            summary.count(done?);
        }
    }
    while let Some(done) = tasks.join_next().await {
        summary.count(done?);
    }
    summary.not_started = due_count - started;
    Ok(summary)
}

/// Archives one result; never returns an error: every failure ends in a state.
pub async fn archive_one(ctx: &Context, tenant: &Tenant, key: &Key) -> Outcome {
    let claimed = match queue::claim(&ctx.db, key, &ctx.owner).await {
        Ok(Some(c)) => c,
        Ok(None) => return Outcome::ClaimedElsewhere,
        Err(e) => {
            tracing::error!(tenant = %key.tenant, action = %key.action_id, index = key.index, error = %e, "cannot claim result");
            return Outcome::RetryLater;
        }
    };
    match with_lease(ctx, key, attempt::attempt(ctx, tenant, &claimed)).await {
        Ok(outcome) => outcome,
        Err(failure) => settle(ctx, tenant, &claimed, failure).await,
    }
}

/// Runs `work` while renewing the lease on `key` from the same task: when the work ends
/// (or panics), the renewal ends with it.
async fn with_lease<T>(ctx: &Context, key: &Key, work: impl Future<Output = T>) -> T {
    let mut renew =
        tokio::time::interval_at(tokio::time::Instant::now() + LEASE_RENEW, LEASE_RENEW);
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = renew.tick() => {
                if let Err(e) = queue::renew(&ctx.db, key, &ctx.owner).await {
                    tracing::warn!(tenant = %key.tenant, action = %key.action_id, index = key.index, error = %e, "cannot renew the lease");
                }
            }
        }
    }
}

/// Puts a failed attempt's end into the queue, provided this process still holds the lease.
async fn settle(ctx: &Context, tenant: &Tenant, claimed: &Claimed, failure: Failure) -> Outcome {
    let settlement = failure.settlement(claimed.attempts, &ctx.cfg.download);
    let outcome = match &settlement {
        Settlement::Unavailable { .. } => Outcome::Unavailable,
        Settlement::Failed { .. } => Outcome::Failed,
        Settlement::Retry { .. } => Outcome::RetryLater,
    };
    let retry_in_s = match &settlement {
        Settlement::Retry { backoff, .. } => backoff.as_secs(),
        _ => 0,
    };
    let recorded = queue::settle(&ctx.db, claimed, &ctx.owner, &tenant.actor, settlement).await;
    let k = &claimed.key;
    let reason = failure.reason();
    match (recorded, outcome) {
        (Err(e), _) => {
            tracing::error!(tenant = %k.tenant, action = %k.action_id, index = k.index, error = %e, "cannot record the result state")
        }
        (Ok(false), _) => {
            tracing::warn!(tenant = %k.tenant, action = %k.action_id, index = k.index, reason, "result was recovered by another process while this attempt ran; leaving it to that process");
            return Outcome::ClaimedElsewhere;
        }
        (Ok(true), Outcome::RetryLater)
            if matches!(
                failure,
                Failure::Process(super::failure::ProcessFailure::StoreFull { .. })
            ) =>
        {
            tracing::error!(tenant = %k.tenant, action = %k.action_id, index = k.index, retry_in_s, reason, "evidence store is full; the result stays pending and is retried later")
        }
        (Ok(true), Outcome::RetryLater) => {
            tracing::warn!(tenant = %k.tenant, action = %k.action_id, index = k.index, retry_in_s, reason, "attempt failed; will retry")
        }
        (Ok(true), Outcome::Unavailable) => {
            tracing::warn!(tenant = %k.tenant, action = %k.action_id, index = k.index, reason, "result unavailable")
        }
        (Ok(true), _) => {
            tracing::error!(tenant = %k.tenant, action = %k.action_id, index = k.index, reason, "result failed")
        }
    }
    outcome
}

/// The partial file of a result's package, from its row.
fn partial_of(root: &std::path::Path, flight: &queue::InFlight) -> Option<PathBuf> {
    let created = flight.created?;
    let k = &flight.key;
    let rel = package::package_rel_path(
        &k.tenant,
        created,
        &k.action_id,
        k.index,
        &flight.command_type,
    );
    Some(package::partial_path_for(&root.join(rel)))
}

/// Returns crashed downloads to `pending` and removes their partial files. A package already
/// in place (a crash between the rename and the DB commit) is left for the next attempt to
/// adopt after re-verifying it. The first call of a process also sweeps the store for
/// partial files no lease explains.
pub async fn recover(ctx: &Context) -> Result<usize, DbError> {
    let found = queue::recover(&ctx.db, &ctx.owner).await?;
    let root = ctx.cfg.store.root.clone();
    for flight in &found.returned {
        let k = &flight.key;
        tracing::info!(tenant = %k.tenant, action = %k.action_id, index = k.index, "returned an interrupted download to the queue");
        // Only now that the row is pending again: a crash here leaves it for the next run.
        let Some(p) = partial_of(&root, flight) else {
            continue;
        };
        match std::fs::remove_file(&p) {
            Ok(()) => {
                tracing::info!(path = %p.display(), "removed the partial package of an interrupted download")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "could not remove a partial package")
            }
        }
    }
    if !ctx.partials_swept.swap(true, Ordering::SeqCst) {
        let live = found
            .live
            .iter()
            .filter_map(|f| partial_of(&root, f))
            .collect();
        sweep_orphan_partials(root, live).await;
    }
    Ok(found.returned.len())
}

/// Removes partial files that no `downloading` row accounts for, sparing those a live lease
/// covers and any written to in the last lease period.
async fn sweep_orphan_partials(root: PathBuf, live: std::collections::HashSet<PathBuf>) {
    let res = tokio::task::spawn_blocking(move || {
        let now = std::time::SystemTime::now();
        package::remove_stale_partials_except(&root, |path, meta| {
            let recent = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_none_or(|age| age < queue::LEASE);
            live.contains(path) || recent
        })
    })
    .await;
    match res {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not sweep the store for partial packages"),
        Err(e) => tracing::warn!(error = %e, "could not sweep the store for partial packages"),
    }
}
