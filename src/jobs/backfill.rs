//! `lrvault backfill`: a one-shot harvest of a past window. Lists the live-response actions
//! created in the window (paging List MachineActions), queues them, and drains their results
//! within the quota until every one is terminal — resumable: the queue is in the database,
//! so a stopped backfill continues where it stopped when run again. `--dry-run` lists and
//! counts only.

use std::sync::Arc;
use std::time::Duration;

use super::archive;
use super::discover::{self, Source, Window};
use super::{Context, Tenant};
use crate::db::DbError;
use crate::queue::{self, ResultState, Scope};
use crate::quota::{self, Endpoint};

/// Counts for one tenant's window.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    pub actions: usize,
    pub unfinished: usize,
    /// Results that still need a link call (not yet archived or terminal).
    pub to_fetch: u64,
    /// Results already archived, unavailable or failed from earlier runs.
    pub already_done: u64,
    /// Commands without a result (PutFile, failed, never ran).
    pub without_result: u64,
    /// List pages (one quota call each) this count took.
    pub list_calls: u64,
}

/// Lists the window and counts what a backfill would do, changing nothing but the ledger.
pub async fn plan(ctx: &Context, tenant: &Tenant, window: &Window) -> anyhow::Result<Plan> {
    let listing = discover::list_window(ctx, tenant, window).await?;
    let actions = listing.actions;
    let mut p = Plan {
        list_calls: listing.pages,
        ..Default::default()
    };
    let name = tenant.cfg.name.clone();
    let statuses = ctx.cfg.discovery.statuses.clone();
    let known: Vec<(String, u32, ResultState)> = {
        let name = name.clone();
        ctx.db
            .call(move |c| {
                let mut stmt = c
                    .prepare(
                        "SELECT action_id, command_index, state FROM results WHERE tenant = ?1",
                    )
                    .map_err(DbError::sql("read results"))?;
                let rows = stmt
                    .query_map([name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .map_err(DbError::sql("read results"))?;
                rows.collect::<Result<Vec<_>, _>>()
                    .map_err(DbError::sql("read results"))
            })
            .await?
    };
    let known: std::collections::HashMap<(String, u32), ResultState> =
        known.into_iter().map(|(a, i, s)| ((a, i), s)).collect();
    for action in &actions {
        p.actions += 1;
        if !action
            .status()
            .is_some_and(|s| statuses.iter().any(|x| x == s))
        {
            p.unfinished += 1;
            continue;
        }
        let id = action.id().unwrap_or_default().to_string();
        for cmd in action.commands() {
            match known.get(&(id.clone(), cmd.index)) {
                Some(ResultState::Archived | ResultState::Unavailable | ResultState::Failed) => {
                    p.already_done += 1
                }
                Some(ResultState::Skipped) => p.without_result += 1,
                Some(ResultState::Pending | ResultState::Downloading) => p.to_fetch += 1,
                None if discover::skip_reason(
                    cmd.command_type.as_deref(),
                    cmd.status.as_deref(),
                )
                .is_some() =>
                {
                    p.without_result += 1
                }
                None => p.to_fetch += 1,
            }
        }
    }
    Ok(p)
}

/// Earliest time `n` more link calls can be made for `tenant` (from the quota ledger).
pub async fn quota_eta(ctx: &Context, tenant: &str, n: u64) -> Result<Duration, DbError> {
    let tenant = tenant.to_string();
    let limits = ctx.cfg.quota.clone();
    ctx.db
        .call(move |c| {
            let now = crate::time::now_ms();
            let past = quota::recent_calls(c, &tenant, Endpoint::Link, &limits, now)?;
            Ok(quota::eta(&past, n, &limits, now))
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
        let counts = queue::counts(&ctx.db, &tenant.cfg.name, &scope).await?;
        if open(&counts) == 0 {
            break;
        }
        // Wait for the earliest retry (backoff) or for results another process holds.
        let wait = match queue::next_retry(&ctx.db, &tenant.cfg.name, &scope).await? {
            Some(at) => (at - crate::time::now()).to_std().unwrap_or(Duration::ZERO),
            None => Duration::from_millis(500),
        }
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
