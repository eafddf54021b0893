//! The archive pass: each due `pending` result is claimed, its download link minted, the blob
//! streamed into a BagIt package while it is hashed, checked against the server's length and
//! MD5, moved into the store (or, for an object store, into the spool and then published),
//! and recorded. The steps of one attempt are in [`attempt`]; leftovers of crashes are
//! adopted in [`adopt`]; publication and the store's guards are in [`publish`]; the state
//! transitions are the queue's ([`crate::queue`]); who pays for a failure is decided in
//! [`super::failure`].

mod adopt;
mod attempt;
mod publish;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::breaker::{self, Admission};
use super::failure::{Failure, ProcessFailure};
use super::{Context, Tenant};
use crate::db::DbError;
use crate::package;
use crate::queue::{self, Claimed, Settlement};

pub use crate::queue::{Key, Scope};
pub use adopt::{InPlace, adopt_in_place, requeue_found};

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
    /// Results handed back uncharged (the tenant's side or this host was in trouble).
    pub deferred: usize,
    /// Tenants whose pass could not run (e.g. a database error), one line each.
    pub tenant_errors: Vec<String>,
    /// Tenants whose pass stopped or did not start because their breaker is open, one line
    /// each (the breaker logs its own changes).
    pub breakers: Vec<String>,
    /// Why the pass started no (more) results because of the object store: it is paused
    /// after a failure, or the spool is full of packages waiting for it.
    pub store: Option<String>,
    /// Each tenant's own outcome: did its pass go well (for `job_runs`).
    pub tenants: std::collections::BTreeMap<String, bool>,
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
        self.deferred += o.deferred;
        self.tenant_errors.extend(o.tenant_errors);
        self.breakers.extend(o.breakers);
        self.store = self.store.take().or(o.store);
        self.tenants.extend(o.tenants);
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} archived, {} unavailable, {} failed, {} to retry later",
            self.archived, self.unavailable, self.failed, self.retry_later
        )?;
        if self.deferred > 0 {
            write!(f, ", {} handed back (attempts unchanged)", self.deferred)?;
        }
        Ok(())
    }
}

impl Summary {
    fn count(&mut self, o: Outcome) {
        match o {
            Outcome::Archived => self.archived += 1,
            Outcome::Unavailable => self.unavailable += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::RetryLater => self.retry_later += 1,
            Outcome::Deferred => self.deferred += 1,
            Outcome::ClaimedElsewhere => self.claimed_elsewhere += 1,
        }
    }

    /// Work is left that a later pass will do (retries, deferred or unstarted results, a
    /// tenant that could not be served).
    pub fn work_left(&self) -> bool {
        self.retry_later > 0
            || self.deferred > 0
            || self.not_started > 0
            || !self.tenant_errors.is_empty()
            || !self.breakers.is_empty()
            || self.store.is_some()
    }
}

impl Summary {
    /// Closes a tenant's part of the pass: its own outcome, and its open breaker if any.
    fn with_breaker(mut self, tenant: &Tenant) -> Summary {
        let line = breaker::open_line(tenant);
        let ok = self.failed == 0 && line.is_none() && self.store.is_none();
        self.breakers.extend(line);
        self.tenants.insert(tenant.cfg.name.clone(), ok);
        self
    }
}

/// How one result ended in this pass (the pass [`Summary`] counts these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Archived,
    Unavailable,
    Failed,
    /// Failed; a later attempt (charged) will retry it.
    RetryLater,
    /// Handed back uncharged: the tenant's side or this host was in trouble.
    Deferred,
    ClaimedElsewhere,
}

/// Callback for progress: called once per finished result.
pub type OnResult = Arc<dyn Fn(&Key, Outcome) + Send + Sync>;

/// One pass over the due results of `tenants` in `scope`. Each tenant has its own loop, and
/// the loops take turns at the process's `download.concurrency` transfer slots
/// ([`Context::transfers`](crate::jobs::Context)), so a tenant waiting on its quota never holds
/// up another. New results stop starting when the context is cancelled.
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
    match recover_spool(ctx).await? {
        Ok(adopted) => {
            summary.archived += adopted.adopted;
            summary.failed += adopted.refused.len();
            summary.retry_later += adopted.retry;
        }
        Err(line) => summary.store = Some(line),
    }
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
        loops.spawn(async move {
            let result = archive_tenant(&ctx, &tenant, &scope, on_result, &budget).await;
            (tenant.cfg.name.clone(), result)
        });
    }
    while let Some(done) = loops.join_next().await {
        // One tenant's failure (an outage, bad credentials, a DB error) must not stop the
        // others.
        let (name, result) = done?;
        match result {
            Ok(s) => summary += s,
            Err(e) => {
                summary.tenant_errors.push(crate::error::one_line(&e));
                summary.tenants.insert(name, false);
            }
        }
    }
    if summary.archived > 0 {
        end_with_checkpoint(ctx).await;
    }
    Ok(summary)
}

/// A pass that archived something ends with a checkpoint of the chain's head, its token and
/// their witness copies (docs/evidence-format.md §9), so what is not yet anchored is at most one pass
/// of work. Nothing here fails the pass: a TSA or witness that is down only delays its part
/// (the next verify fetches the token and fills the witness), and a checkpoint that cannot be
/// written is logged for verify to report.
async fn end_with_checkpoint(ctx: &Context) {
    let written = async {
        let witness = crate::anchor::open_witness(&ctx.cfg)?;
        crate::anchor::checkpoint_head(&ctx.cfg, &ctx.db, &ctx.store, witness.as_ref()).await
    }
    .await;
    match written {
        Ok((path, tokens)) => tracing::info!(checkpoint = %path, tokens = tokens.fetched.len(),
            token_error = tokens.error.as_deref().unwrap_or(""), "archive pass anchored the chain's head"),
        Err(e) => tracing::warn!(error = %crate::error::one_line(&e),
            "archive pass could not write its checkpoint; the next verify writes one"),
    }
}

async fn archive_tenant(
    ctx: &Arc<Context>,
    tenant: &Arc<Tenant>,
    scope: &Scope,
    on_result: Option<OnResult>,
    budget: &AtomicUsize,
) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let probing = match tenant.breaker.admit() {
        Admission::Go => false,
        Admission::Probe => true,
        Admission::Wait { .. } => return Ok(summary.with_breaker(tenant)),
    };
    let _probe = breaker::ProbeTaken(probing.then_some(&tenant.breaker));
    let mut due = queue::due(&ctx.db, &tenant.cfg.name, scope)
        .await?
        .into_iter();
    let due_count = due.len();
    if due_count == 0 {
        return Ok(summary.with_breaker(tenant));
    }
    // The object store paused, or its spool full: no result starts (none is charged).
    let store_line = match publish::store_admits(ctx).await {
        Ok(()) => publish::spool_full(ctx).await,
        Err(line) => Some(line),
    };
    if let Some(line) = store_line {
        summary.not_started = due_count;
        summary.store = Some(line);
        return Ok(summary.with_breaker(tenant));
    }
    // A token first: refused credentials or a down token endpoint are the tenant's trouble,
    // not any result's, so stop here rather than charging results for them.
    if let Err(e) = tenant.client.check_auth().await {
        if let Failure::Tenant(t) = Failure::from_api(e) {
            breaker::trouble(&ctx.db, tenant, &t).await;
            summary.not_started = due_count;
            return Ok(summary.with_breaker(tenant));
        }
        anyhow::bail!(
            "tenant '{}': cannot count the token call in the quota ledger",
            tenant.cfg.name
        );
    }
    let mut started = 0;
    if probing {
        // While the breaker is open, one result goes alone: its calls are the probe.
        let Some((key, _)) = due.next() else {
            unreachable!("due_count > 0")
        };
        started += 1;
        let outcome = archive_one(ctx, tenant, &key).await;
        summary.count(outcome);
        if let Some(cb) = &on_result {
            cb(&key, outcome);
        }
        if tenant.breaker.open().is_some() && outcome == Outcome::Deferred {
            summary.not_started = due_count - started;
            return Ok(summary.with_breaker(tenant));
        }
        breaker::answered(&ctx.db, tenant).await;
    }
    // One lane per link bucket: a tenant's investigation packages (getPackageUri, 2/min) wait
    // on their own quota and never hold up its live-response results.
    let (packages, results): (Vec<_>, Vec<_>) =
        due.partition(|(_, t)| link_endpoint(t) == crate::quota::Endpoint::PackageUri);
    let lanes = [
        (results, crate::quota::Endpoint::Link),
        (packages, crate::quota::Endpoint::PackageUri),
    ]
    .map(|(keys, endpoint)| {
        let keys = keys.into_iter().map(|(k, _)| k).collect();
        lane(ctx, tenant, keys, endpoint, on_result.clone(), budget)
    });
    let [a, b] = lanes;
    let (a, b) = tokio::join!(a, b);
    for (lane_summary, lane_started) in [a?, b?] {
        summary += lane_summary;
        started += lane_started;
    }
    summary.not_started = due_count - started;
    Ok(summary.with_breaker(tenant))
}

/// Starts `keys` in order, each once `endpoint`'s bucket has room for its link call and a
/// transfer slot is free; returns what finished and how many it started.
async fn lane(
    ctx: &Arc<Context>,
    tenant: &Arc<Tenant>,
    keys: Vec<Key>,
    endpoint: crate::quota::Endpoint,
    on_result: Option<OnResult>,
    budget: &AtomicUsize,
) -> anyhow::Result<(Summary, usize)> {
    let (mut summary, mut started) = (Summary::default(), 0);
    let mut tasks = tokio::task::JoinSet::new();
    for key in keys {
        // Room in the tenant's own quota for this link call, then a slot of the process's
        // budget, one at a time and in turn with the other tenants: links are only minted
        // when they can be used at once, and a tenant waiting on its quota holds no slot
        // another could use.
        let permit = tokio::select! {
            ready = ctx.governor.ready(&tenant.cfg.name, endpoint) => {
                ready?;
                tokio::select! {
                    p = ctx.transfers.acquire(&tenant.cfg.name) => p,
                    _ = ctx.cancel.cancelled() => break,
                }
            }
            _ = ctx.cancel.cancelled() => break,
        };
        // The tenant's side went down, or this host stopped: start nothing more.
        if tenant.breaker.open().is_some() || ctx.cancel.is_cancelled() {
            break;
        }
        // The store failed, or too many packages wait for it: start no new download.
        if ctx.store_breaker.open().is_some() {
            summary.store = Some(publish::paused_line(ctx));
            break;
        }
        if let Some(line) = publish::spool_full(ctx).await {
            summary.store = Some(line);
            break;
        }
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
    Ok((summary, started))
}

/// The quota bucket of a result's link call: `getPackageUri` for an investigation package,
/// GetLiveResponseResultDownloadLink for the rest.
fn link_endpoint(command_type: &str) -> crate::quota::Endpoint {
    if command_type == crate::mde::PACKAGE_COMMAND {
        crate::quota::Endpoint::PackageUri
    } else {
        crate::quota::Endpoint::Link
    }
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
    let work = attempt::attempt(ctx, tenant, &claimed);
    match queue::hold_lease(&ctx.db, key, &ctx.owner, LEASE_RENEW, work).await {
        Ok(outcome) => outcome,
        Err(failure) => {
            if let Failure::Tenant(t) = &failure {
                breaker::trouble(&ctx.db, tenant, t).await;
            }
            publish::store_trouble(ctx, &failure);
            settle(ctx, tenant, &claimed, failure).await
        }
    }
}

/// Puts a failed attempt's end into the queue, provided this process still holds the lease.
async fn settle(ctx: &Context, tenant: &Tenant, claimed: &Claimed, failure: Failure) -> Outcome {
    let settlement = failure.settlement(claimed.attempts, &ctx.cfg.download);
    let outcome = match &settlement {
        Settlement::Unavailable { .. } => Outcome::Unavailable,
        Settlement::Failed { .. } => Outcome::Failed,
        Settlement::Retry { charge: true, .. } => Outcome::RetryLater,
        Settlement::Retry { charge: false, .. } => Outcome::Deferred,
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
        (Ok(true), _) if matches!(failure, Failure::Process(ProcessFailure::StoreFull { .. })) => {
            tracing::error!(tenant = %k.tenant, action = %k.action_id, index = k.index, retry_in_s, reason, "evidence store is full; the result stays pending and is retried later")
        }
        (Ok(true), Outcome::Deferred) => {
            tracing::info!(tenant = %k.tenant, action = %k.action_id, index = k.index, reason, "result handed back to the queue, attempts unchanged")
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

/// Where a result's package goes, from its row.
fn package_of(root: &std::path::Path, flight: &queue::InFlight) -> Option<PathBuf> {
    let created = flight.created?;
    let k = &flight.key;
    let rel = package::package_rel_path(
        &k.tenant,
        created,
        &k.action_id,
        k.index,
        &flight.command_type,
    );
    Some(root.join(rel))
}

/// Returns crashed downloads to `pending` and removes their partial files. A package already
/// in place (a crash between the rename and the DB commit) is left for the next attempt to
/// adopt after re-verifying it. The first call of a process also sweeps the store (the
/// spool, for object stores) for partial files no lease explains.
pub async fn recover(ctx: &Context) -> Result<usize, DbError> {
    let found = queue::recover(&ctx.db, &ctx.owner).await?;
    let root = ctx.store.staging_root().to_path_buf();
    for flight in &found.returned {
        let k = &flight.key;
        tracing::info!(tenant = %k.tenant, action = %k.action_id, index = k.index, "returned an interrupted download to the queue");
        // Only now that the row is pending again: a crash here leaves it for the next run.
        let Some(package) = package_of(&root, flight) else {
            continue;
        };
        // A directory listing and file removals: on a blocking thread.
        let removed = tokio::task::spawn_blocking(move || remove_partials_of(&package)).await;
        if let Err(e) = removed {
            tracing::warn!(error = %e, "could not remove the partial packages of an interrupted download");
        }
    }
    if !ctx.partials_swept.swap(true, Ordering::SeqCst) {
        let live = found
            .live
            .iter()
            .filter_map(|f| package_of(&root, f))
            .collect();
        sweep_orphan_partials(root, live).await;
        // Read-back copies a crash left (a live one is written to or read within minutes).
        if let Err(e) = ctx.store.clean_temp(queue::LEASE * 6).await {
            tracing::warn!(error = %e, "could not clean the spool's temporary copies");
        }
    }
    Ok(found.returned.len())
}

/// Removes the partial files of the package `package` (blocking).
fn remove_partials_of(package: &std::path::Path) {
    for p in package::partials_of(package) {
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
}

/// Object stores, at the start of each pass, from one walk of the spool: removes the spool
/// copies of packages already archived (a crash between the commit and the removal), then
/// publishes and adopts the ones
/// whose results wait (a crash before the upload or the commit, or a store that was down),
/// before any new download; returns what it adopted and refused. `Err(line)` when the
/// store is paused and they must wait.
async fn recover_spool(ctx: &Context) -> Result<Result<InPlace, String>, DbError> {
    let none = || Ok(Ok(InPlace::default()));
    let files = match ctx.store.spool_files().await {
        Ok(files) if files.is_empty() => return none(),
        Ok(files) => files,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the spool");
            return none();
        }
    };
    let keys: Vec<String> = files.iter().map(|f| f.key.clone()).collect();
    let archived = ctx.db.read(move |c| archived_paths(c, &keys)).await?;
    let sweep = match ctx
        .store
        .sweep_spool(files, |key| archived.contains(key))
        .await
    {
        Ok(sweep) => sweep,
        Err(e) => {
            tracing::warn!(error = %e, "could not sweep the spool");
            return none();
        }
    };
    if sweep.waiting.is_empty() {
        return none();
    }
    tracing::info!(
        waiting = sweep.waiting.len(),
        bytes = sweep.waiting_bytes,
        "packages in the spool wait for the store"
    );
    if let Err(line) = publish::store_admits(ctx).await {
        return Ok(Err(line));
    }
    // The walk above is the pass's one look at the spool: adoption takes its list.
    let waiting = sweep.waiting.into_iter().collect();
    let adopted = adopt_in_place(ctx, Some(&waiting)).await?;
    for reason in &adopted.refused {
        tracing::error!(
            reason,
            "a package in the spool was refused; its result is failed"
        );
    }
    Ok(match ctx.store_breaker.open() {
        Some(_) => Err(publish::paused_line(ctx)),
        None => Ok(adopted),
    })
}

/// The `keys` some evidence row names.
fn archived_paths(
    c: &rusqlite::Connection,
    keys: &[String],
) -> Result<std::collections::HashSet<String>, DbError> {
    let mut stmt = c
        .prepare_cached("SELECT 1 FROM evidence WHERE package_path = ?1")
        .map_err(DbError::sql("look up package path"))?;
    let mut found = std::collections::HashSet::new();
    for key in keys {
        if stmt
            .exists([key])
            .map_err(DbError::sql("look up package path"))?
        {
            found.insert(key.clone());
        }
    }
    Ok(found)
}

/// Removes every partial file that no live lease covers, whatever its age: for when no
/// other writer can be running (`lrvault restore` holds the daemon's lock). Returns how many.
pub async fn sweep_partials(ctx: &Context) -> Result<usize, DbError> {
    let found = queue::recover(&ctx.db, &ctx.owner).await?;
    let root = ctx.store.staging_root().to_path_buf();
    let live: std::collections::HashSet<PathBuf> = found
        .live
        .iter()
        .filter_map(|f| package_of(&root, f))
        .collect();
    let removed = tokio::task::spawn_blocking(move || {
        package::remove_stale_partials_except(&root, |path, _| {
            package::partial_target(path).is_some_and(|p| live.contains(&p))
        })
    })
    .await
    .map_err(|e| DbError::Join(e.to_string()))?;
    match removed {
        Ok(paths) => Ok(paths.len()),
        Err(e) => {
            tracing::warn!(error = %e, "could not sweep the store for partial packages");
            Ok(0)
        }
    }
}

/// Removes partial files that no `downloading` row accounts for, sparing those of packages
/// a live lease covers (`live`) and any written to in the last lease period.
async fn sweep_orphan_partials(root: PathBuf, live: std::collections::HashSet<PathBuf>) {
    let res = tokio::task::spawn_blocking(move || {
        let now = std::time::SystemTime::now();
        package::remove_stale_partials_except(&root, |path, meta| {
            let recent = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_none_or(|age| age < queue::LEASE);
            // A partial written recently may belong to a download that claimed its result
            // after `live` was read, unless its writer is gone (a crash between returning a
            // result to the queue and removing its partial leaves exactly that).
            package::partial_target(path).is_some_and(|p| live.contains(&p))
                || (recent && !package::partial_writer_gone(path))
        })
    })
    .await;
    match res {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not sweep the store for partial packages"),
        Err(e) => tracing::warn!(error = %e, "could not sweep the store for partial packages"),
    }
}
