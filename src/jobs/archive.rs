//! The archive pass: each due `pending` result is claimed (a lease in its row), its download
//! link minted, the blob streamed into a BagIt package while it is hashed, checked against
//! the server's length and MD5, moved into the store, and recorded (`evidence` row, result
//! `archived`, LINK_ISSUED / DOWNLOADED / ARCHIVED custody rows).
//!
//! State machine of a result: pending → downloading → archived | unavailable | failed, or
//! back to pending with a backoff when the attempt can be retried.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rusqlite::{OptionalExtension, params};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::{Context, Tenant};
use crate::custody::{self, Event, EventKind};
use crate::db::{DbError, write_tx};
use crate::fetch::{self, FetchError, Transfer};
use crate::mde::{MdeError, RawAction};
use crate::package::{self, BagInfo, PackageError, PackageSink, PackageSpec};

/// How long a claim on a result lasts without renewal.
const LEASE: Duration = Duration::from_secs(600);
/// How often a working download renews its lease.
const LEASE_RENEW: Duration = Duration::from_secs(60);
/// Mid-body interruptions resumed with Range on the same link before the attempt fails.
const MAX_RESUMES_PER_LINK: u32 = 3;

/// What a pass did.
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

/// One result to work on.
#[derive(Debug, Clone)]
pub struct Key {
    pub tenant: String,
    pub action_id: String,
    pub index: u32,
}

/// How one result ended in this pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Archived,
    Unavailable,
    Failed,
    RetryLater,
    ClaimedElsewhere,
}

/// Which results a pass works on.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// At most this many results (per pass, across tenants).
    pub max: Option<usize>,
    /// Only actions created in `[since, until)` (backfill windows).
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    pub machine_id: Option<String>,
}

impl Scope {
    /// The SQL condition selecting a tenant's results in this scope, over `results r JOIN
    /// actions a`; bind it with [`Scope::bind`].
    pub const FILTER: &'static str = "r.tenant = :tenant
        AND (:since IS NULL OR a.created_at >= :since) AND (:until IS NULL OR a.created_at < :until)
        AND (:machine IS NULL OR a.machine_id = :machine)";

    /// Values for [`Scope::FILTER`]'s named parameters.
    pub fn bind(&self, tenant: &str) -> ScopeParams {
        ScopeParams {
            tenant: tenant.to_string(),
            since: self.since.map(crate::time::fmt),
            until: self.until.map(crate::time::fmt),
            machine: self.machine_id.clone(),
        }
    }
}

/// Owned values of a scope's SQL parameters (movable onto the DB thread).
pub struct ScopeParams {
    tenant: String,
    since: Option<String>,
    until: Option<String>,
    machine: Option<String>,
}

impl ScopeParams {
    /// The named parameters, plus `extra` ones a query adds.
    pub fn named<'a>(
        &'a self,
        extra: &[(&'a str, &'a dyn rusqlite::ToSql)],
    ) -> Vec<(&'a str, &'a dyn rusqlite::ToSql)> {
        let mut p: Vec<(&str, &dyn rusqlite::ToSql)> = vec![
            (":tenant", &self.tenant),
            (":since", &self.since),
            (":until", &self.until),
            (":machine", &self.machine),
        ];
        p.extend_from_slice(extra);
        p
    }
}

/// Due results of one tenant in `scope`, oldest action first, commands in index order.
pub async fn due_results(ctx: &Context, tenant: &str, scope: &Scope) -> Result<Vec<Key>, DbError> {
    let bound = scope.bind(tenant);
    let limit = scope.max.map_or(-1, |m| m as i64);
    ctx.db
        .call(move |c| {
            let now = crate::time::now_str();
            let mut stmt = c
                .prepare(&format!(
                    "SELECT r.tenant, r.action_id, r.command_index FROM results r
                     JOIN actions a ON a.tenant = r.tenant AND a.action_id = r.action_id
                     WHERE {} AND r.state = 'pending' AND (r.next_attempt_at IS NULL OR r.next_attempt_at <= :now)
                     ORDER BY a.created_at, r.action_id, r.command_index
                     LIMIT :limit",
                    Scope::FILTER
                ))
                .map_err(DbError::sql("select due results"))?;
            let rows = stmt
                .query_map(bound.named(&[(":now", &now), (":limit", &limit)]).as_slice(), |r| {
                    Ok(Key { tenant: r.get(0)?, action_id: r.get(1)?, index: r.get(2)? })
                })
                .map_err(DbError::sql("select due results"))?;
            rows.collect::<Result<Vec<_>, _>>().map_err(DbError::sql("select due results"))
        })
        .await
}

/// A `downloading` row: tenant, action, index, lease owner, lease end, action creation, command type.
type InFlight = (
    String,
    String,
    u32,
    Option<String>,
    Option<String>,
    String,
    String,
);

/// How many results of `tenants` in `scope` are due now (for progress totals).
pub async fn due_count(
    ctx: &Context,
    tenants: &[Arc<Tenant>],
    scope: &Scope,
) -> Result<usize, DbError> {
    let mut n = 0;
    for t in tenants {
        let bound = scope.bind(&t.cfg.name);
        n += ctx
            .db
            .call(move |c| {
                let now = crate::time::now_str();
                c.query_row(
                    &format!(
                        "SELECT count(*) FROM results r JOIN actions a ON a.tenant = r.tenant AND a.action_id = r.action_id
                         WHERE {} AND r.state = 'pending' AND (r.next_attempt_at IS NULL OR r.next_attempt_at <= :now)",
                        Scope::FILTER
                    ),
                    bound.named(&[(":now", &now)]).as_slice(),
                    |r| r.get::<_, i64>(0),
                )
                .map_err(DbError::sql("count due results"))
            })
            .await? as usize;
    }
    Ok(scope.max.map_or(n, |m| n.min(m)))
}

/// Returns crashed downloads (`downloading` with an expired lease or a dead owner) to
/// `pending`, removing their partial files. A package already in place (a crash between the
/// rename and the DB commit) is left for the next attempt to adopt after re-verifying it.
/// The first call of a process also sweeps the store for partial files no lease explains.
pub async fn recover(ctx: &Context) -> Result<usize, DbError> {
    let me = ctx.owner.clone();
    let root = ctx.cfg.store.root.clone();
    let (n, live) = ctx
        .db
        .call(move |c| {
            let tx = write_tx(c)?;
            let rows: Vec<InFlight> = {
                let mut stmt = tx
                    .prepare(
                        "SELECT r.tenant, r.action_id, r.command_index, r.lease_owner, r.lease_until, a.created_at,
                                coalesce(r.command_type, '')
                         FROM results r JOIN actions a ON a.tenant = r.tenant AND a.action_id = r.action_id
                         WHERE r.state = 'downloading'",
                    )
                    .map_err(DbError::sql("select downloading results"))?;
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)))
                    .map_err(DbError::sql("select downloading results"))?
                    .collect::<Result<_, _>>()
                    .map_err(DbError::sql("select downloading results"))?
            };
            let now = crate::time::now_str();
            let mut n = 0;
            let mut stale_partials = Vec::new();
            let mut live = std::collections::HashSet::new();
            for (tenant, action_id, index, owner, until, created, ctype) in rows {
                let partial = crate::time::parse_api(&created).map(|created| {
                    let rel = package::package_rel_path(&tenant, created, &action_id, index, &ctype);
                    partial_path(&root.join(rel))
                });
                let expired = until.as_deref().is_none_or(|u| u < now.as_str());
                let dead = owner.as_deref().is_none_or(|o| super::owner_is_dead(o, &me));
                if !(expired || dead) {
                    live.extend(partial);
                    continue;
                }
                tx.execute(
                    "UPDATE results SET state = 'pending', lease_owner = NULL, lease_until = NULL, updated_at = ?4,
                            last_error = 'interrupted download (process stopped); retrying'
                     WHERE tenant = ?1 AND action_id = ?2 AND command_index = ?3 AND state = 'downloading'",
                    params![tenant, action_id, index, now],
                )
                .map_err(DbError::sql("recover result"))?;
                stale_partials.extend(partial);
                tracing::info!(tenant = %tenant, action = %action_id, index, "returned an interrupted download to the queue");
                n += 1;
            }
            tx.commit().map_err(DbError::sql("commit recovery"))?;
            // Only once the rows are pending again: a crash here leaves them for the next run.
            for p in stale_partials {
                match std::fs::remove_file(&p) {
                    Ok(()) => tracing::info!(path = %p.display(), "removed the partial package of an interrupted download"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!(path = %p.display(), error = %e, "could not remove a partial package"),
                }
            }
            Ok((n, live))
        })
        .await?;
    sweep_orphan_partials(ctx, live).await;
    Ok(n)
}

/// Removes partial files that no `downloading` row accounts for (once per process and store),
/// sparing those a live lease covers and any written to in the last lease period.
async fn sweep_orphan_partials(ctx: &Context, live: std::collections::HashSet<PathBuf>) {
    static SWEPT: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let root = ctx.cfg.store.root.clone();
    {
        let mut swept = SWEPT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if swept.contains(&root) {
            return;
        }
        swept.push(root.clone());
    }
    let res = tokio::task::spawn_blocking(move || {
        let now = std::time::SystemTime::now();
        package::remove_stale_partials_except(&root, |path, meta| {
            let recent = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_none_or(|age| age < LEASE);
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

fn partial_path(final_path: &std::path::Path) -> PathBuf {
    let mut s = final_path.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
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
    let budget = Arc::new(std::sync::atomic::AtomicUsize::new(
        scope.max.unwrap_or(usize::MAX),
    ));
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
        let s = match done? {
            Ok(s) => s,
            Err(e) => {
                summary.tenant_errors.push(crate::error::one_line(&e));
                continue;
            }
        };
        summary += s;
    }
    Ok(summary)
}

async fn archive_tenant(
    ctx: &Arc<Context>,
    tenant: &Arc<Tenant>,
    scope: &Scope,
    on_result: Option<OnResult>,
    budget: &std::sync::atomic::AtomicUsize,
) -> anyhow::Result<Summary> {
    use std::sync::atomic::Ordering;
    let mut summary = Summary::default();
    let due = due_results(ctx, &tenant.cfg.name, scope).await?;
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
            count(&mut summary, done?);
        }
    }
    while let Some(done) = tasks.join_next().await {
        count(&mut summary, done?);
    }
    summary.not_started = due_count - started;
    Ok(summary)
}

fn count(s: &mut Summary, o: Outcome) {
    match o {
        Outcome::Archived => s.archived += 1,
        Outcome::Unavailable => s.unavailable += 1,
        Outcome::Failed => s.failed += 1,
        Outcome::RetryLater => s.retry_later += 1,
        Outcome::ClaimedElsewhere => s.claimed_elsewhere += 1,
    }
}

/// Everything about a claimed result that the download needs.
struct Job {
    key: Key,
    action: RawAction,
    created: chrono::DateTime<chrono::Utc>,
    command_type: String,
    params: Vec<(String, String)>,
    attempts: u32,
}

/// Archives one result; never returns an error: every failure ends in a state.
pub async fn archive_one(ctx: &Context, tenant: &Tenant, key: &Key) -> Outcome {
    let job = match claim(ctx, key).await {
        Ok(Some(job)) => job,
        Ok(None) => return Outcome::ClaimedElsewhere,
        Err(e) => {
            tracing::error!(tenant = %key.tenant, action = %key.action_id, index = key.index, error = %e, "cannot claim result");
            return Outcome::RetryLater;
        }
    };
    // Keep the claim alive while the transfer runs.
    let renewer = {
        let db = ctx.db.clone();
        let k = key.clone();
        let owner = ctx.owner.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE_RENEW).await;
                let (k, owner) = (k.clone(), owner.clone());
                let _ = db
                    .call(move |c| {
                        c.execute(
                            "UPDATE results SET lease_until = ?5 WHERE tenant = ?1 AND action_id = ?2 AND command_index = ?3
                             AND lease_owner = ?4 AND state = 'downloading'",
                            params![k.tenant, k.action_id, k.index, owner, lease_until()],
                        )
                        .map_err(DbError::sql("renew lease"))
                    })
                    .await;
            }
        })
    };
    let result = attempt(ctx, tenant, &job).await;
    renewer.abort();
    match result {
        Ok(outcome) => outcome,
        Err(end) => settle(ctx, tenant, &job, end).await,
    }
}

fn lease_until() -> String {
    crate::time::fmt(crate::time::now() + chrono::Duration::from_std(LEASE).unwrap_or_default())
}

async fn claim(ctx: &Context, key: &Key) -> Result<Option<Job>, DbError> {
    let k = key.clone();
    let owner = ctx.owner.clone();
    let row = ctx
        .db
        .call(move |c| {
            let tx = write_tx(c)?;
            let n = tx
                .execute(
                    "UPDATE results SET state = 'downloading', lease_owner = ?4, lease_until = ?5, updated_at = ?6
                     WHERE tenant = ?1 AND action_id = ?2 AND command_index = ?3 AND state = 'pending'",
                    params![k.tenant, k.action_id, k.index, owner, lease_until(), crate::time::now_str()],
                )
                .map_err(DbError::sql("claim result"))?;
            if n == 0 {
                return Ok(None);
            }
            let row = tx
                .query_row(
                    "SELECT a.raw_json, a.created_at, coalesce(r.command_type, ''), r.command_json, r.attempts
                     FROM results r JOIN actions a ON a.tenant = r.tenant AND a.action_id = r.action_id
                     WHERE r.tenant = ?1 AND r.action_id = ?2 AND r.command_index = ?3",
                    params![k.tenant, k.action_id, k.index],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?, r.get::<_, u32>(4)?)),
                )
                .optional()
                .map_err(DbError::sql("load claimed result"))?;
            tx.commit().map_err(DbError::sql("commit claim"))?;
            Ok(row)
        })
        .await?;
    let Some((raw, created, command_type, command_json, attempts)) = row else {
        return Ok(None);
    };
    let action = RawAction::parse(raw).unwrap_or_else(|e| RawAction {
        raw: String::new(),
        value: json!({ "unreadable": e }),
    });
    let params = serde_json::from_str::<Value>(&command_json)
        .ok()
        .and_then(|c| {
            let wrapper = RawAction {
                raw: String::new(),
                value: json!({ "commands": [c] }),
            };
            wrapper.commands().into_iter().next().map(|c| c.params)
        })
        .unwrap_or_default();
    Ok(Some(Job {
        key: key.clone(),
        created: crate::time::parse_api(&created).unwrap_or_else(crate::time::now),
        action,
        command_type,
        params,
        attempts,
    }))
}

/// Why an attempt did not archive.
enum End {
    /// The API says there is no result (404/400 on the link call).
    Unavailable {
        reason: String,
        http_status: Option<u16>,
        code: Option<String>,
    },
    /// Refused for good (link outside the allowlist, redirect): failed at once.
    Refused { reason: String },
    /// May work later (5xx, timeouts, integrity...): backoff, then failed after max_attempts.
    Retry { reason: String },
    /// Not this result's fault (credentials refused): back to pending, no attempt counted.
    Deferred { reason: String },
    /// The evidence store ran out of space: not the result's fault either, so no attempt is
    /// counted, but it backs off and is logged as an error an operator must act on.
    StoreFull { reason: String },
}

async fn custody_event(ctx: &Context, ev: Event<'_>) -> Result<(), DbError> {
    let (tenant, action_id, actor) = (
        ev.tenant.to_string(),
        ev.action_id.to_string(),
        ev.actor.to_string(),
    );
    let (evidence_sha256, package_path) = (
        ev.evidence_sha256.map(str::to_string),
        ev.package_path.map(str::to_string),
    );
    let (idx, kind, detail) = (ev.command_index, ev.kind, ev.detail.clone());
    ctx.db
        .call(move |c| {
            let tx = write_tx(c)?;
            custody::append(
                &tx,
                &Event {
                    evidence_sha256: evidence_sha256.as_deref(),
                    package_path: package_path.as_deref(),
                    ..Event::new(&tenant, &action_id, idx, kind, &actor).detail(detail)
                },
            )?;
            tx.commit().map_err(DbError::sql("commit custody row"))
        })
        .await
}

/// Opens the blob (status and headers checked), creates the package writer on the first
/// response — when the size is known, so zip64 is used only for payloads that need it — and
/// streams the body into it. The outer error is a writer that could not be created.
async fn open_and_stream(
    ctx: &Context,
    url: &url::Url,
    transfer: &mut Transfer,
    sink: &mut Option<PackageSink>,
    spec_for: &impl Fn(Option<u64>, bool) -> PackageSpec,
    job: &Job,
) -> Result<Result<(), FetchError>, End> {
    let opened = match fetch::open(&ctx.blob, url, transfer).await {
        Ok(o) => o,
        Err(e) => return Ok(Err(e)),
    };
    if sink.is_none() {
        let created = PackageSink::create(
            spec_for(transfer.total, transfer.server_md5.is_some()),
            job.command_type == "RunScript",
        )
        .await
        .map_err(|e| package_end(&e))?;
        *sink = Some(created);
    }
    let Some(sink) = sink.as_ref() else {
        return Ok(Err(FetchError::Sink));
    };
    Ok(fetch::stream(opened, transfer, sink.sender()).await)
}

async fn attempt(ctx: &Context, tenant: &Tenant, job: &Job) -> Result<Outcome, End> {
    let key = &job.key;
    let cfg = &ctx.cfg;
    let rel_path = package::package_rel_path(
        &key.tenant,
        job.created,
        &key.action_id,
        key.index,
        &job.command_type,
    );
    let rel_str = rel_path.to_string_lossy().into_owned();
    let final_path = cfg.store.root.join(&rel_path);

    // A package already in place (a crash after the rename, before the DB commit) is adopted
    // once it re-verifies; nothing is downloaded twice.
    if final_path.exists() {
        return adopt(ctx, tenant, job, &rel_str).await;
    }

    let (base_name, original_name) = package::payload_base_name(&job.command_type, &job.params);
    let bag_info = BagInfo {
        source_organization: format!("lrvault tenant {}", key.tenant),
        external_identifier: format!("{}/{}/{}", key.tenant, key.action_id, key.index),
        bagging_date: crate::time::now().format("%Y-%m-%d").to_string(),
        contact_name: job.action.requestor().map(str::to_string),
        external_description: format!(
            "MDE live response {} result, command {} of action {} on {}{}",
            job.command_type,
            key.index,
            key.action_id,
            job.action
                .computer_dns_name()
                .unwrap_or("an unknown device"),
            job.action
                .requestor_comment()
                .map(|c| format!("; comment: {c}"))
                .unwrap_or_default()
        ),
    };
    let spec_for = |expected_size, compute_md5| PackageSpec {
        store_root: cfg.store.root.clone(),
        rel_path: rel_path.clone(),
        bag_name: format!(
            "{}-{:03}",
            package::path_component(&key.action_id),
            key.index
        ),
        payload_base_name: base_name.clone(),
        gz_suffix_if_gzip: job.command_type == "GetFile",
        machine_action_json: job.action.raw.as_bytes().to_vec(),
        bag_info: bag_info.clone(),
        compression: cfg.store.compression,
        expected_size,
        compute_md5,
    };

    let started_at = crate::time::now_str();
    let mut transfer = Transfer::default();
    let mut writer: Option<PackageSink> = None;
    let mut link_issues = 0u32;
    let mut last_link = (String::new(), String::new());
    // Every way out of the download loop that is not a finished body must remove the
    // partial package: the writer is aborted below when the block ends in an error.
    let downloaded: Result<(), End> = async {
        'links: loop {
            if ctx.cancel.is_cancelled() {
                return Err(retry("stopped before the download finished"));
            }
            let link = tenant
                .client
                .result_link(&key.action_id, key.index)
                .await
                .map_err(link_error)?;
            link_issues += 1;
            let checked = tenant.allow.check(&link);
            let (host, path) = match &checked {
                Ok(url) => fetch::link_host_path(url),
                Err(_) => url::Url::parse(&link)
                    .map(|u| fetch::link_host_path(&u))
                    .unwrap_or_default(),
            };
            last_link = (host.clone(), path.clone());
            custody_event(
                ctx,
                Event::new(
                    &key.tenant,
                    &key.action_id,
                    Some(key.index),
                    EventKind::LinkIssued,
                    &tenant.actor,
                )
                .detail(json!({ "link_host": host, "link_path": path, "issue": link_issues })),
            )
            .await
            .map_err(|e| retry(&e.to_string()))?;
            let url = checked.map_err(|refused| End::Refused {
                reason: refused.to_string(),
            })?;

            let mut resumes = 0;
            loop {
                let rejected = match open_and_stream(ctx, &url, &mut transfer, &mut writer, &spec_for, job).await? {
                    Ok(()) => return Ok(()),
                    Err(FetchError::LinkRejected { code }) => {
                        format!("download link refused (403{})", crate::http::code_suffix(&code))
                    }
                    Err(FetchError::LinkExpired { expiry }) => {
                        format!("download link expired at {expiry} before use")
                    }
                    Err(FetchError::Interrupted {
                        received, message, ..
                    }) if resumes < MAX_RESUMES_PER_LINK && received > 0 => {
                        resumes += 1;
                        tracing::info!(tenant = %key.tenant, action = %key.action_id, index = key.index, received, error = %message, "transfer interrupted; resuming with Range");
                        continue;
                    }
                    Err(FetchError::Redirect { status, location }) => {
                        return Err(End::Refused {
                            reason: format!("blob host redirected (HTTP {status}) to {location}"),
                        });
                    }
                    Err(FetchError::Sink) => {
                        return Err(writer_error(writer.take()).await);
                    }
                    Err(e) => return Err(retry(&e.to_string())),
                };
                if link_issues > cfg.download.max_link_reissues {
                    return Err(End::Refused {
                        reason: format!(
                            "{rejected} after {} re-issues",
                            cfg.download.max_link_reissues
                        ),
                    });
                }
                tracing::info!(tenant = %key.tenant, action = %key.action_id, index = key.index, reason = %rejected, "minting a new download link");
                continue 'links;
            }
        }
    }
    .await;
    if let Err(end) = downloaded {
        if let Some(sink) = writer.take() {
            sink.abort().await;
        }
        return Err(end);
    }
    let Some(sink) = writer else {
        return Err(retry("no download happened"));
    };
    let streamed = sink.close().await.map_err(|e| package_end(&e))?;
    let digests = streamed.digests.clone();
    // The MD5 is computed only when the first response carried a claim.
    let checked = match digests.md5 {
        Some(md5) => transfer.check_complete(&md5),
        None if transfer.server_md5.is_some() => Err(FetchError::Integrity(
            "an MD5 claim arrived only on a resumed request; the MD5 was not computed".into(),
        )),
        None => transfer.check_complete(&[0; 16]),
    };
    let md5_check = match checked {
        Ok(check) => check,
        Err(e) => {
            streamed.abort().await;
            return Err(retry(&e.to_string()));
        }
    };
    let finished_at = crate::time::now_str();
    custody_event(
        ctx,
        Event {
            evidence_sha256: Some(&digests.sha256),
            ..Event::new(
                &key.tenant,
                &key.action_id,
                Some(key.index),
                EventKind::Downloaded,
                &tenant.actor,
            )
            .detail(json!({
                "bytes": digests.size,
                "md5_check": md5_check,
                "http_status": transfer.http_status,
                "link_host": last_link.0,
                "link_path": last_link.1,
                "link_issues": link_issues,
                "ranges": transfer.ranges,
            }))
        },
    )
    .await
    .map_err(|e| retry(&e.to_string()))?;

    let transcript = streamed
        .head
        .as_deref()
        .and_then(package::parse_transcript)
        .map(|t| json!({ "script_name": t.script_name, "exit_code": t.exit_code }));
    let retrieval = json!({
        "link_host": last_link.0,
        "link_path": last_link.1,
        "http_status": transfer.http_status,
        "headers": transfer.headers,
        "started_at": started_at,
        "finished_at": finished_at,
        "bytes": digests.size,
        "sha256": digests.sha256,
        "md5_check": md5_check,
        "compression": digests.compression,
        "encoding": digests.encoding,
        "original_name": original_name,
        "original_size": digests.original_size,
        "original_sha256": digests.original_sha256,
        "transcript": transcript,
        "link_issues": link_issues,
        "attempts": job.attempts + 1,
        "ranges": transfer.ranges,
        "lrvault_version": env!("CARGO_PKG_VERSION"),
        "host": crate::custody::hostname(),
    });
    let retrieval_bytes = serde_json::to_vec_pretty(&retrieval).unwrap_or_default();
    let info = streamed
        .finish(retrieval_bytes)
        .await
        .map_err(|e| package_end(&e))?;
    let record = EvidenceRecord {
        payload_name: digests.payload_name.clone(),
        payload_size: digests.size,
        payload_sha256: digests.sha256.clone(),
        payload_md5: digests
            .md5
            .filter(|_| md5_check == "match")
            .map(hex::encode),
        original_name,
        original_size: digests.original_size,
        original_sha256: digests.original_sha256.clone(),
        package_path: rel_str,
        package_size: info.package_size,
        package_sha256: info.package_sha256,
        adopted: false,
    };
    archived_or_lost(commit_archived(ctx, tenant, key, record).await)
}

/// Outcome of the final commit. A lost lease means another process recovered the result
/// while this one was still working: the package stays where it is and that process adopts
/// it, so nothing is recorded twice.
fn archived_or_lost(committed: Result<bool, DbError>) -> Result<Outcome, End> {
    match committed {
        Ok(true) => Ok(Outcome::Archived),
        Ok(false) => Ok(Outcome::ClaimedElsewhere),
        Err(e) => Err(retry(&e.to_string())),
    }
}

/// Map an API error on the link call to how the attempt ends.
fn link_error(e: MdeError) -> End {
    if matches!(e, MdeError::Token { .. }) && !e.is_retryable() {
        End::Deferred {
            reason: e.to_string(),
        }
    } else if e.is_no_result() {
        End::Unavailable {
            reason: e.to_string(),
            http_status: e.http_status(),
            code: e.api_code().map(str::to_string),
        }
    } else {
        retry(&e.to_string())
    }
}

fn retry(reason: &str) -> End {
    End::Retry {
        reason: reason.to_string(),
    }
}

/// The error with its sources on one line (the OS error is what tells "disk full" apart).
fn package_error_text(e: &PackageError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        source = s.source();
    }
    if e.is_disk_full() {
        format!("evidence store is full: {text}")
    } else {
        text
    }
}

/// A package error ends the attempt; a full store is told apart so it is logged as such.
fn package_end(e: &PackageError) -> End {
    if e.is_disk_full() {
        End::StoreFull {
            reason: package_error_text(e),
        }
    } else {
        retry(&package_error_text(e))
    }
}

/// The writer's own error after it stopped consuming (e.g. disk full). The writer removed
/// its partial when it dropped out with the error.
async fn writer_error(sink: Option<PackageSink>) -> End {
    match sink {
        Some(sink) => match sink.close().await {
            Err(e) => package_end(&e),
            Ok(streamed) => {
                streamed.abort().await;
                retry("package writer stopped")
            }
        },
        None => retry("package writer stopped"),
    }
}

struct EvidenceRecord {
    payload_name: String,
    payload_size: u64,
    payload_sha256: String,
    payload_md5: Option<String>,
    original_name: Option<String>,
    original_size: Option<u64>,
    original_sha256: Option<String>,
    package_path: String,
    package_size: u64,
    package_sha256: String,
    adopted: bool,
}

/// The evidence row, the result state and the ARCHIVED custody row, in one transaction.
/// `Ok(false)` (nothing written) when this process no longer holds the result's lease.
async fn commit_archived(
    ctx: &Context,
    tenant: &Tenant,
    key: &Key,
    rec: EvidenceRecord,
) -> Result<bool, DbError> {
    let k = key.clone();
    let actor = tenant.actor.clone();
    let owner = ctx.owner.clone();
    ctx.db
        .call(move |c| {
            let tx = write_tx(c)?;
            let held: Option<i64> = tx
                .query_row(
                    "SELECT 1 FROM results WHERE tenant = ?1 AND action_id = ?2 AND command_index = ?3
                       AND state = 'downloading' AND lease_owner = ?4",
                    params![k.tenant, k.action_id, k.index, owner],
                    |r| r.get(0),
                )
                .optional()
                .map_err(DbError::sql("check result lease"))?;
            if held.is_none() {
                return Ok(false);
            }
            let evidence_id = uuid::Uuid::now_v7().to_string();
            let now = crate::time::now_str();
            tx.execute(
                "INSERT INTO evidence (evidence_id, tenant, action_id, command_index, payload_name, payload_size,
                     payload_sha256, payload_md5, original_name, original_size, original_sha256, package_path,
                     package_size, package_sha256, archived_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                params![
                    evidence_id,
                    k.tenant,
                    k.action_id,
                    k.index,
                    rec.payload_name,
                    rec.payload_size as i64,
                    rec.payload_sha256,
                    rec.payload_md5,
                    rec.original_name,
                    rec.original_size.map(|s| s as i64),
                    rec.original_sha256,
                    rec.package_path,
                    rec.package_size as i64,
                    rec.package_sha256,
                    now
                ],
            )
            .map_err(DbError::sql("insert evidence"))?;
            tx.execute(
                "UPDATE results SET state = 'archived', evidence_id = ?4, attempts = attempts + 1, last_error = NULL,
                        next_attempt_at = NULL, lease_owner = NULL, lease_until = NULL, updated_at = ?5
                 WHERE tenant = ?1 AND action_id = ?2 AND command_index = ?3",
                params![k.tenant, k.action_id, k.index, evidence_id, now],
            )
            .map_err(DbError::sql("mark result archived"))?;
            let mut detail = json!({
                "evidence_id": evidence_id,
                "package_sha256": rec.package_sha256,
                "payload_size": rec.payload_size,
                "payload_name": rec.payload_name,
            });
            if rec.adopted {
                detail["adopted"] = json!(true);
            }
            custody::append(
                &tx,
                &Event {
                    evidence_sha256: Some(&rec.payload_sha256),
                    package_path: Some(&rec.package_path),
                    ..Event::new(&k.tenant, &k.action_id, Some(k.index), EventKind::Archived, &actor).detail(detail)
                },
            )?;
            tx.commit().map_err(DbError::sql("commit archived result"))?;
            Ok(true)
        })
        .await
}

/// Adopts a package found in place without an evidence row, after re-verifying it.
async fn adopt(ctx: &Context, tenant: &Tenant, job: &Job, rel: &str) -> Result<Outcome, End> {
    let path = ctx.cfg.store.root.join(rel);
    let check = tokio::task::spawn_blocking(move || package::check_package(&path))
        .await
        .map_err(|e| retry(&e.to_string()))?
        .map_err(|e| End::Refused {
            reason: format!("a package is already at {rel} and cannot be read: {e}"),
        })?;
    if !check.problems.is_empty() {
        return Err(End::Refused {
            reason: format!(
                "a package is already at {rel} and does not verify: {}",
                check.problems.join("; ")
            ),
        });
    }
    let retrieval = read_retrieval(&ctx.cfg.store.root.join(rel), &check.bag_name);
    let get_u64 = |k: &str| {
        retrieval
            .as_ref()
            .and_then(|r| r.get(k))
            .and_then(Value::as_u64)
    };
    let get_str = |k: &str| {
        retrieval
            .as_ref()
            .and_then(|r| r.get(k))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let record = EvidenceRecord {
        payload_name: check.payload_name.clone(),
        payload_size: check.payload_size,
        payload_sha256: check.payload_sha256.clone(),
        payload_md5: None,
        original_name: get_str("original_name"),
        original_size: get_u64("original_size"),
        original_sha256: get_str("original_sha256"),
        package_path: rel.to_string(),
        package_size: check.package_size,
        package_sha256: check.package_sha256,
        adopted: true,
    };
    if archived_or_lost(commit_archived(ctx, tenant, &job.key, record).await)?
        == Outcome::ClaimedElsewhere
    {
        return Ok(Outcome::ClaimedElsewhere);
    }
    tracing::info!(tenant = %job.key.tenant, action = %job.key.action_id, index = job.key.index, package = rel, "adopted a verified package left by an interrupted run");
    Ok(Outcome::Archived)
}

fn read_retrieval(path: &std::path::Path, bag: &str) -> Option<Value> {
    let file = std::fs::File::open(path).ok()?;
    let mut zip = zip::ZipArchive::new(file).ok()?;
    let entry = zip.by_name(&format!("{bag}/retrieval.json")).ok()?;
    serde_json::from_reader(std::io::Read::take(entry, 1 << 20)).ok()
}

/// Puts the attempt's end into the result row (and custody for terminal states), provided
/// this process still holds the result's lease.
async fn settle(ctx: &Context, tenant: &Tenant, job: &Job, end: End) -> Outcome {
    let k = job.key.clone();
    let actor = tenant.actor.clone();
    let owner = ctx.owner.clone();
    let max_attempts = ctx.cfg.download.max_attempts;
    let backoff = backoff(
        job.attempts + 1,
        ctx.cfg.download.retry_base,
        ctx.cfg.download.retry_max,
    );
    let last_attempt = job.attempts + 1 >= max_attempts;
    let store_full = matches!(end, End::StoreFull { .. });
    let (outcome, state, reason, event, detail) = match end {
        End::Unavailable {
            reason,
            http_status,
            code,
        } => (
            Outcome::Unavailable,
            "unavailable",
            reason.clone(),
            Some(EventKind::Unavailable),
            json!({ "reason": reason, "http_status": http_status, "error_code": code }),
        ),
        End::Refused { reason } => (
            Outcome::Failed,
            "failed",
            reason.clone(),
            Some(EventKind::Failed),
            json!({ "reason": reason, "attempts": job.attempts + 1 }),
        ),
        End::Retry { reason } if last_attempt => (
            Outcome::Failed,
            "failed",
            reason.clone(),
            Some(EventKind::Failed),
            json!({ "reason": reason, "attempts": job.attempts + 1 }),
        ),
        End::Retry { reason } => (Outcome::RetryLater, "pending", reason, None, Value::Null),
        End::Deferred { reason } => (Outcome::RetryLater, "deferred", reason, None, Value::Null),
        End::StoreFull { reason } => (Outcome::RetryLater, "store-full", reason, None, Value::Null),
    };
    // Deferred results go back to the queue as they were (no attempt, no backoff); a full
    // store backs off at the base delay without spending the result's attempts.
    let base = ctx.cfg.download.retry_base;
    let (state, attempt, backoff) = match state {
        "deferred" => ("pending", 0, Duration::ZERO),
        "store-full" => ("pending", 0, base),
        s => (s, 1, backoff),
    };
    let log_reason = reason.clone();
    let res = ctx
        .db
        .call(move |c| {
            let tx = write_tx(c)?;
            let next = (state == "pending")
                .then(|| crate::time::fmt(crate::time::now() + chrono::Duration::from_std(backoff).unwrap_or_default()));
            let n = tx.execute(
                "UPDATE results SET state = ?4, attempts = attempts + ?9, last_error = ?5, next_attempt_at = ?6,
                        lease_owner = NULL, lease_until = NULL, updated_at = ?7
                 WHERE tenant = ?1 AND action_id = ?2 AND command_index = ?3
                   AND state = 'downloading' AND lease_owner = ?8",
                params![k.tenant, k.action_id, k.index, state, reason, next, crate::time::now_str(), owner, attempt],
            )
            .map_err(DbError::sql("settle result"))?;
            if n == 0 {
                return Ok(false);
            }
            if let Some(kind) = event {
                custody::append(&tx, &Event::new(&k.tenant, &k.action_id, Some(k.index), kind, &actor).detail(detail))?;
            }
            tx.commit().map_err(DbError::sql("commit result state"))?;
            Ok(true)
        })
        .await;
    let key = &job.key;
    match (&res, outcome) {
        (Err(e), _) => {
            tracing::error!(tenant = %key.tenant, action = %key.action_id, index = key.index, error = %e, "cannot record the result state")
        }
        (Ok(false), _) => {
            tracing::warn!(tenant = %key.tenant, action = %key.action_id, index = key.index, reason = %log_reason, "result was recovered by another process while this attempt ran; leaving it to that process");
            return Outcome::ClaimedElsewhere;
        }
        (Ok(true), Outcome::RetryLater) if store_full => {
            tracing::error!(tenant = %key.tenant, action = %key.action_id, index = key.index, retry_in_s = backoff.as_secs(), reason = %log_reason, "evidence store is full; the result stays pending and is retried later")
        }
        (Ok(true), Outcome::RetryLater) => {
            tracing::warn!(tenant = %key.tenant, action = %key.action_id, index = key.index, retry_in_s = backoff.as_secs(), reason = %log_reason, "attempt failed; will retry")
        }
        (Ok(true), Outcome::Unavailable) => {
            tracing::warn!(tenant = %key.tenant, action = %key.action_id, index = key.index, reason = %log_reason, "result unavailable")
        }
        (Ok(true), _) => {
            tracing::error!(tenant = %key.tenant, action = %key.action_id, index = key.index, reason = %log_reason, "result failed")
        }
    }
    outcome
}

/// `base · 2^(attempt-1)`, capped at `max`, with jitter in [50%, 100%].
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max);
    let factor: f64 = rand::rng().random_range(0.5..=1.0);
    exp.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let (b, m) = (Duration::from_secs(30), Duration::from_secs(1800));
        for _ in 0..50 {
            let d1 = backoff(1, b, m);
            assert!(d1 >= Duration::from_secs(15) && d1 <= Duration::from_secs(30));
            let d3 = backoff(3, b, m);
            assert!(d3 >= Duration::from_secs(60) && d3 <= Duration::from_secs(120));
            let d30 = backoff(30, b, m);
            assert!(d30 >= Duration::from_secs(900) && d30 <= m);
        }
    }
}
