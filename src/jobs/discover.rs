//! Discovery and queueing: finished actions of the tenant's `collect` types (live response,
//! investigation packages) become `actions` rows, each of their commands — an investigation
//! package's one result — a `results` row (`pending` when it has a result to fetch, `skipped` with the
//! reason otherwise), with DISCOVERED / QUEUED / SKIPPED custody rows. Known actions are
//! skipped cheaply, so every pass may re-scan the whole lookback window.

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};
use serde_json::json;

use super::breaker::{self, Admission};
use super::failure::Failure;
use super::{Context, Tenant};
use crate::config::CasePattern;
use crate::custody::{self, Event, EventKind};
use crate::db::{DbError, write_tx};
use crate::mde::RawAction;
use crate::queue::{self, NewResult, ResultState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Discover,
    Enqueue,
    Backfill,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Discover => "discover",
            Source::Enqueue => "enqueue",
            Source::Backfill => "backfill",
        }
    }
}

/// What a discovery pass found.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// Actions of the collected types the API listed.
    pub listed: usize,
    /// Of those, still running (picked up by a later pass).
    pub unfinished: usize,
    /// Already known before this pass.
    pub known: usize,
    pub new_actions: usize,
    pub queued: usize,
    pub skipped: usize,
}

impl std::ops::AddAssign for Summary {
    fn add_assign(&mut self, o: Summary) {
        self.listed += o.listed;
        self.unfinished += o.unfinished;
        self.known += o.known;
        self.new_actions += o.new_actions;
        self.queued += o.queued;
        self.skipped += o.skipped;
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} actions listed, {} new, {} already known, {} unfinished; {} results queued, {} skipped",
            self.listed, self.new_actions, self.known, self.unfinished, self.queued, self.skipped
        )
    }
}

/// The creation-time window of a pass.
#[derive(Debug, Clone)]
pub struct Window {
    pub since: DateTime<Utc>,
    pub until: Option<DateTime<Utc>>,
    pub machine_id: Option<String>,
}

/// One pass for one tenant: list the window page by page, recording every finished action
/// not yet known as its page arrives.
pub async fn discover(
    ctx: &Context,
    tenant: &Tenant,
    window: &Window,
    source: Source,
) -> anyhow::Result<Summary> {
    let mut total = Summary::default();
    let mut pages = Pages::new(ctx, tenant, window)?;
    while let Some(actions) = pages.next().await? {
        total += record_actions(ctx, tenant, actions, source).await?;
    }
    Ok(total)
}

/// A tenant's List window, page by page, behind its breaker: while the breaker is open only a
/// due probe calls the API, and a tenant-scope failure opens it.
pub struct Pages<'a> {
    ctx: &'a Context,
    tenant: &'a Tenant,
    pager: crate::mde::ListPager<'a>,
}

impl<'a> Pages<'a> {
    pub fn new(ctx: &'a Context, tenant: &'a Tenant, window: &Window) -> anyhow::Result<Pages<'a>> {
        if let Admission::Wait { .. } = tenant.breaker.admit() {
            let line = breaker::open_line(tenant).unwrap_or_default();
            anyhow::bail!("{line}");
        }
        let pager = tenant.client.list_window(
            window.since,
            window.until,
            window.machine_id.as_deref(),
            ctx.cfg.discovery.page_size,
        )?;
        Ok(Pages { ctx, tenant, pager })
    }

    /// The next page's actions, or None after the last one.
    pub async fn next(&mut self) -> anyhow::Result<Option<Vec<RawAction>>> {
        match self.pager.next_page().await {
            Ok(page) => {
                if !breaker::answered(&self.ctx.db, self.tenant).await {
                    breaker::clear_left_open(&self.ctx.db, self.tenant).await;
                }
                Ok(page)
            }
            Err(e) => {
                let failure = Failure::from_api(e);
                if let Failure::Tenant(t) = &failure {
                    breaker::trouble(&self.ctx.db, self.tenant, t).await;
                } else {
                    self.tenant.breaker.release_probe();
                }
                anyhow::bail!("tenant '{}': {}", self.tenant.cfg.name, failure.reason())
            }
        }
    }

    /// List calls made so far.
    pub fn calls(&self) -> u64 {
        self.pager.pages
    }
}

/// The scheduled discovery pass: the configured lookback window up to now, recorded in
/// `job_runs` (for `status`) whether it succeeds or not.
pub async fn lookback_pass(ctx: &Context, tenant: &Tenant) -> anyhow::Result<Summary> {
    let started = crate::time::now_str();
    let window = Window {
        since: crate::time::now() - chrono::Duration::from_std(ctx.cfg.discovery.lookback)?,
        until: None,
        machine_id: None,
    };
    let result = discover(ctx, tenant, &window, Source::Discover).await;
    let (ok, summary) = match &result {
        Ok(s) => (true, s.to_string()),
        Err(e) => (false, crate::error::one_line(e)),
    };
    super::record_job_run(&ctx.db, "discover", &tenant.cfg.name, started, ok, summary).await;
    result
}

/// Actions recorded per writer job: a page of thousands of new actions is written in short
/// turns, so archive commits of other tenants never wait long for the writer.
const RECORD_BATCH: usize = 64;

/// Tenants discovered at the same time: a tenant whose API is slow (up to its read timeout)
/// holds up only its own turn, while the List calls and writes of many tenants stay spread out.
pub const DISCOVER_PARALLEL: usize = 4;

/// Records the finished ones of `actions` (others are counted as unfinished).
pub async fn record_actions(
    ctx: &Context,
    tenant: &Tenant,
    actions: Vec<RawAction>,
    source: Source,
) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let mut actions = actions.into_iter().peekable();
    while actions.peek().is_some() {
        let batch: Vec<RawAction> = actions.by_ref().take(RECORD_BATCH).collect();
        let statuses = ctx.cfg.discovery.statuses.clone();
        let collect = tenant.cfg.collect.clone();
        let tenant_name = tenant.cfg.name.clone();
        let actor = tenant.actor.clone();
        let pattern = tenant.cfg.case_pattern.clone();
        let s = ctx
            .db
            .call(move |conn| {
                let mut s = Summary::default();
                for action in batch {
                    // List filters on type server-side; enqueue may name any action.
                    if action
                        .action_type()
                        .is_some_and(|t| !collect.iter().any(|c| c == t))
                    {
                        continue;
                    }
                    s.listed += 1;
                    if !action
                        .status()
                        .is_some_and(|st| statuses.iter().any(|x| x == st))
                    {
                        s.unfinished += 1;
                        continue;
                    }
                    match record_action(conn, &tenant_name, &actor, &pattern, &action, source)? {
                        None => s.known += 1,
                        Some((queued, skipped)) => {
                            s.new_actions += 1;
                            s.queued += queued;
                            s.skipped += skipped;
                        }
                    }
                }
                Ok(s)
            })
            .await?;
        summary += s;
    }
    Ok(summary)
}

/// The scheduled pass of every tenant in `tenants`, [`DISCOVER_PARALLEL`] at a time; each
/// tenant's outcome in the order given.
pub async fn lookback_all(
    ctx: &Context,
    tenants: &[std::sync::Arc<Tenant>],
) -> Vec<anyhow::Result<Summary>> {
    let gate = tokio::sync::Semaphore::new(DISCOVER_PARALLEL);
    let mut passes = Vec::with_capacity(tenants.len());
    for tenant in tenants {
        let gate = &gate;
        let pass: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send + '_>> =
            Box::pin(async move {
                let _turn = gate.acquire().await;
                lookback_pass(ctx, tenant).await
            });
        passes.push(pass);
    }
    futures_util::future::join_all(passes).await
}

/// The DISCOVERED row's detail: the action's columns as the `actions` row stores them (verify
/// compares the two), and the SHA-256 of its raw JSON.
fn discovered_detail(
    action: &RawAction,
    source: Source,
    created: &str,
    commands: usize,
) -> serde_json::Value {
    use sha2::Digest;
    let mut detail = json!({
        "source": source.as_str(),
        "status": action.status(),
        "machine_id": action.machine_id(),
        "computer_dns_name": action.computer_dns_name(),
        "requestor": action.requestor(),
        "requestor_comment": action.requestor_comment(),
        "created_at": created,
        "last_update_at": action.last_update().map(crate::time::fmt),
        "raw_sha256": hex::encode(sha2::Sha256::digest(action.raw.as_bytes())),
        "commands": commands,
    });
    // Indexes that contradict each other are recorded; the commands are keyed by position.
    if let Some(problem) = action.index_discrepancy() {
        tracing::warn!(
            action = action.id().unwrap_or_default(),
            problem,
            "command indexes are inconsistent; results are keyed by position"
        );
        detail["index_discrepancy"] = json!(problem);
        detail["indexed_by"] = json!("position");
    }
    detail
}

/// Why a command has nothing to fetch, or None when it has a result.
pub fn skip_reason(command_type: Option<&str>, status: Option<&str>) -> Option<String> {
    match (command_type, status) {
        (Some("PutFile"), _) => Some("PutFile has no result by design".into()),
        (_, Some("Completed")) => None,
        (_, Some("Created")) => Some(
            "command never ran (status Created): an earlier command failed or the action ended"
                .into(),
        ),
        (_, Some(other)) => Some(format!("command status {other}")),
        (_, None) => Some("command has no status".into()),
    }
}

/// Inserts one action with its results and custody rows in one transaction. None when the
/// action was already known.
fn record_action(
    conn: &mut rusqlite::Connection,
    tenant: &str,
    actor: &str,
    pattern: &CasePattern,
    action: &RawAction,
    source: Source,
) -> Result<Option<(usize, usize)>, DbError> {
    let Some(action_id) = action.id() else {
        return Ok(None);
    };
    let tx = write_tx(conn)?;
    let known: Option<i64> = tx
        .query_row(
            "SELECT 1 FROM actions WHERE tenant = ?1 AND action_id = ?2",
            params![tenant, action_id],
            |r| r.get(0),
        )
        .optional()
        .map_err(DbError::sql("look up action"))?;
    if known.is_some() {
        return Ok(None);
    }
    // Without a creation time the package date falls back to discovery time.
    let created = action
        .created()
        .map(crate::time::fmt)
        .unwrap_or_else(crate::time::now_str);
    let commands = action.commands();
    let detail = discovered_detail(action, source, &created, commands.len());
    // The DISCOVERED row comes first: the action's discovered_at is that row's time, and every
    // column the audit shows is in its detail, so verify proves the action row (docs/evidence-format.md §9).
    let (_, discovered_at) = custody::append_at(
        &tx,
        &Event::new(tenant, action_id, None, EventKind::Discovered, actor).detail(detail),
    )?;
    tx.execute(
        "INSERT INTO actions (tenant, action_id, machine_id, computer_dns_name, requestor, requestor_comment,
                              status, created_at, last_update_at, raw_json, discovered_at, source)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            tenant,
            action_id,
            action.machine_id(),
            action.computer_dns_name(),
            action.requestor(),
            action.requestor_comment(),
            action.status(),
            created,
            action.last_update().map(crate::time::fmt),
            action.raw,
            discovered_at,
            source.as_str()
        ],
    )
    .map_err(DbError::sql("insert action"))?;
    // The cases the comment names join the action now (docs/operations.md §17).
    crate::cases::tag_from_comment(
        &tx,
        tenant,
        action_id,
        actor,
        pattern,
        action.requestor_comment(),
    )?;
    let (mut queued, mut skipped) = (0, 0);
    for cmd in &commands {
        let new = NewResult {
            index: cmd.index,
            command_type: cmd.command_type.as_deref(),
            command_json: cmd.raw.to_string(),
            command_status: cmd.status.as_deref(),
            skip_reason: skip_reason(cmd.command_type.as_deref(), cmd.status.as_deref()),
            errors: &cmd.errors,
        };
        match queue::insert(&tx, tenant, action_id, actor, &new)? {
            ResultState::Skipped => skipped += 1,
            _ => queued += 1,
        }
    }
    tx.commit().map_err(DbError::sql("commit action"))?;
    Ok(Some((queued, skipped)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_reasons() {
        assert_eq!(skip_reason(Some("RunScript"), Some("Completed")), None);
        assert_eq!(skip_reason(Some("GetFile"), Some("Completed")), None);
        assert_eq!(
            skip_reason(Some("PutFile"), Some("Completed")).unwrap(),
            "PutFile has no result by design"
        );
        assert_eq!(
            skip_reason(Some("GetFile"), Some("Failed")).unwrap(),
            "command status Failed"
        );
        assert!(
            skip_reason(Some("GetFile"), Some("Created"))
                .unwrap()
                .starts_with("command never ran")
        );
        assert_eq!(skip_reason(None, None).unwrap(), "command has no status");
    }
}
