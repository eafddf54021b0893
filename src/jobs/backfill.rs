//! `lrvault backfill`: a one-shot harvest of a past window. Lists the actions of the
//! collected types (live response, investigation packages) created in the window (paging List MachineActions), queues them, and drains their results
//! within the quota until every one is terminal — resumable: the queue is in the database,
//! so a stopped backfill continues where it stopped when run again. `--dry-run` lists and
//! counts only.

use std::sync::Arc;
use std::time::Duration;

use super::archive;
use super::discover::{self, Source, Window};
use super::{Context, Tenant};
use crate::db::DbError;
use crate::mde::RawAction;
use crate::queue::{self, ResultState, Scope};
use crate::quota::{self, Endpoint};

/// Counts for one tenant's window.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    pub actions: usize,
    pub unfinished: usize,
    /// Results that still need a link call (not yet archived or terminal).
    pub to_fetch: u64,
    /// Of `to_fetch`, investigation packages (their getPackageUri quota is 2/min and 120/h).
    pub packages: u64,
    /// Listed actions that are investigation package collections.
    pub package_actions: usize,
    /// Results already archived, unavailable or failed from earlier runs.
    pub already_done: u64,
    /// Commands without a result (PutFile, failed, never ran).
    pub without_result: u64,
    /// List pages (one quota call each) this count took.
    pub list_calls: u64,
}

/// Lists the window and counts what a backfill would do, changing nothing but the ledger.
/// Page by page: only the listed actions' results are looked up, a page at a time.
pub async fn plan(ctx: &Context, tenant: &Tenant, window: &Window) -> anyhow::Result<Plan> {
    let mut p = Plan::default();
    let statuses = &ctx.cfg.discovery.statuses;
    let mut pages = discover::Pages::new(ctx, tenant, window)?;
    while let Some(actions) = pages.next().await? {
        let ids = actions
            .iter()
            .filter_map(|a| a.id().map(str::to_string))
            .collect();
        let known = known_states(ctx, &tenant.cfg.name, ids).await?;
        for action in &actions {
            p.count(action, statuses, &known);
        }
    }
    p.list_calls = pages.calls();
    Ok(p)
}

impl Plan {
    /// Adds one listed action, given the states of results already queued.
    fn count(&mut self, action: &RawAction, statuses: &[String], known: &KnownStates) {
        self.actions += 1;
        let package = action.action_type() == Some(crate::config::INVESTIGATION_PACKAGE);
        self.package_actions += usize::from(package);
        if !action
            .status()
            .is_some_and(|s| statuses.iter().any(|x| x == s))
        {
            self.unfinished += 1;
            return;
        }
        let id = action.id().unwrap_or_default();
        for cmd in action.commands() {
            match known.get(&(id.to_string(), cmd.index)) {
                Some(ResultState::Archived | ResultState::Unavailable | ResultState::Failed) => {
                    self.already_done += 1
                }
                Some(ResultState::Skipped) => self.without_result += 1,
                Some(ResultState::Pending | ResultState::Downloading) => self.fetch(package),
                None if discover::skip_reason(
                    cmd.command_type.as_deref(),
                    cmd.status.as_deref(),
                )
                .is_some() =>
                {
                    self.without_result += 1
                }
                None => self.fetch(package),
            }
        }
    }
}

impl Plan {
    fn fetch(&mut self, package: bool) {
        self.to_fetch += 1;
        self.packages += u64::from(package);
    }
}

/// States of the results of some actions, by (action id, command index).
type KnownStates = std::collections::HashMap<(String, u32), ResultState>;

/// The states of `tenant`'s results of the actions `ids` (one page's worth).
async fn known_states(
    ctx: &Context,
    tenant: &str,
    ids: Vec<String>,
) -> Result<KnownStates, DbError> {
    let tenant = tenant.to_string();
    ctx.db
        .read(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT command_index, state FROM results WHERE tenant = ?1 AND action_id = ?2",
                )
                .map_err(DbError::sql("read results"))?;
            let mut out = KnownStates::new();
            for id in ids {
                let rows = stmt
                    .query_map(rusqlite::params![tenant, id], |r| {
                        Ok((r.get::<_, u32>(0)?, r.get(1)?))
                    })
                    .map_err(DbError::sql("read results"))?;
                for row in rows {
                    let (index, state) = row.map_err(DbError::sql("read results"))?;
                    out.insert((id.clone(), index), state);
                }
            }
            Ok(out)
        })
        .await
}

/// When `links` more result links and `packages` more package links can have been made for
/// `tenant` at the earliest (from the quota ledger), each endpoint on its own bucket.
#[derive(Debug, Clone, Copy)]
pub struct QuotaEta {
    pub links: Duration,
    pub packages: Duration,
}

impl QuotaEta {
    /// Both buckets drain at the same time: the later of the two.
    pub fn both(self) -> Duration {
        self.links.max(self.packages)
    }
}

/// The [`QuotaEta`] of `links` result links and `packages` package links for `tenant`.
pub async fn quota_eta(
    ctx: &Context,
    tenant: &str,
    links: u64,
    packages: u64,
) -> Result<QuotaEta, DbError> {
    let tenant = tenant.to_string();
    let limits = ctx.cfg.quota.clone();
    ctx.db
        .read(move |c| {
            let now = crate::time::now_ms();
            let eta = |endpoint, n| -> Result<Duration, DbError> {
                let past = quota::recent_calls(c, &tenant, endpoint, &limits, now)?;
                Ok(quota::eta(&past, n, endpoint, &limits, now))
            };
            Ok(QuotaEta {
                links: eta(Endpoint::Link, links)?,
                packages: eta(Endpoint::PackageUri, packages)?,
            })
        })
        .await
}

/// Investigation packages of `tenant` still to be archived (pending or downloading), for the
/// ETA of a running backfill.
pub async fn open_packages(ctx: &Context, tenant: &str) -> Result<u64, DbError> {
    let tenant = tenant.to_string();
    ctx.db
        .read(move |c| {
            c.query_row(
                "SELECT count(*) FROM results WHERE tenant = ?1 AND command_type = ?2
                 AND state IN ('pending', 'downloading')",
                rusqlite::params![tenant, crate::mde::PACKAGE_COMMAND],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(DbError::sql("count open investigation packages"))
        })
        .await
}

/// The states of a window's results when a backfill run ends, per tenant.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    pub archived: i64,
    pub unavailable: i64,
    pub skipped: i64,
    pub failed: i64,
    /// Still pending or downloading (stopped early).
    pub unfinished: i64,
}

impl Totals {
    pub fn complete(&self) -> bool {
        self.failed == 0 && self.unfinished == 0
    }
}

/// Queues the window and drains it until every result in it is terminal (or cancelled).
/// `progress` is told the number of results to go and called once per finished result.
pub async fn run(
    ctx: &Arc<Context>,
    tenant: &Arc<Tenant>,
    window: &Window,
    on_total: impl Fn(u64),
    on_result: Option<archive::OnResult>,
) -> anyhow::Result<Totals> {
    let s = discover::discover(ctx, tenant, window, Source::Backfill).await?;
    tracing::info!(tenant = %tenant.cfg.name, "backfill window: {s}");
    let scope = Scope {
        max: None,
        since: Some(window.since),
        until: window.until,
        machine_id: window.machine_id.clone(),
    };
    let open = |counts: &queue::StateCounts| -> i64 {
        counts
            .iter()
            .filter(|(st, _)| st.is_open())
            .map(|(_, n)| n)
            .sum()
    };
    let counts = queue::counts(&ctx.db, &tenant.cfg.name, &scope).await?;
    on_total(open(&counts) as u64);
    let tenants = [tenant.clone()];
    loop {
        if ctx.cancel.is_cancelled() {
            break;
        }
        let pass = archive::archive(ctx, &tenants, &scope, on_result.clone()).await?;
        if let Some(e) = pass.tenant_errors.first() {
            anyhow::bail!("{e}");
        }
        // Refused credentials are the operator's to fix; an outage is waited out (the
        // breaker paces the probes, and Ctrl-C stops the wait).
        if let (Some(line), Some(open)) = (pass.breakers.first(), tenant.breaker.open())
            && open.kind == super::failure::TenantTrouble::Refused
        {
            anyhow::bail!("{line}");
        }
        let counts = queue::counts(&ctx.db, &tenant.cfg.name, &scope).await?;
        if open(&counts) == 0 {
            break;
        }
        // Wait for the earliest retry (backoff) or for results another process holds.
        let wait = match queue::next_retry(&ctx.db, &tenant.cfg.name, &scope).await? {
            Some(at) => (at - crate::time::now()).to_std().unwrap_or(Duration::ZERO),
            None => Duration::from_millis(500),
        }
        .max(tenant.breaker.until_probe().unwrap_or_default())
        .max(ctx.store_breaker.until_probe().unwrap_or_default())
        .clamp(Duration::from_millis(50), Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ctx.cancel.cancelled() => break,
        }
    }
    let c = queue::counts(&ctx.db, &tenant.cfg.name, &scope).await?;
    let get = |st: ResultState| c.get(&st).copied().unwrap_or(0);
    Ok(Totals {
        archived: get(ResultState::Archived),
        unavailable: get(ResultState::Unavailable),
        skipped: get(ResultState::Skipped),
        failed: get(ResultState::Failed),
        unfinished: open(&c),
    })
}

/// Human duration: `3h 12m`, `4m 05s`, `12s`.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(fmt_duration(Duration::from_secs(12)), "12s");
        assert_eq!(fmt_duration(Duration::from_secs(245)), "4m 05s");
        assert_eq!(
            fmt_duration(Duration::from_secs(3 * 3600 + 12 * 60 + 5)),
            "3h 12m"
        );
    }
}
