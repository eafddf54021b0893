//! `lrvault backfill`: harvest a past window (see [`crate::jobs::backfill`]), with a progress
//! bar whose ETA comes from the quota ledger; `--dry-run` counts and changes nothing.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args as ClapArgs;

use super::{TenantArg, cancel_on_ctrl_c, exit_code, setup};
use crate::config::ConfigFile;
use crate::error::UserError;
use crate::jobs::backfill::{self, fmt_duration};
use crate::jobs::discover::Window;
use crate::jobs::{self, Context, Tenant};
use crate::progress::Progress;
use crate::quota::Endpoint;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Start of the window: YYYY-MM-DD (UTC midnight), RFC 3339, or an age like 30d / 12h
    #[arg(long, value_name = "DATE")]
    pub since: String,
    /// End of the window (exclusive; default: now)
    #[arg(long, value_name = "DATE")]
    pub until: Option<String>,
    #[command(flatten)]
    pub tenant: TenantArg,
    /// Only actions on this machine (machine id: 40 hex characters)
    #[arg(long, value_name = "ID")]
    pub machine: Option<String>,
    /// Print the number of actions and results, the API calls needed and the ETA; change
    /// nothing (its List calls are real, so they are in the quota ledger)
    #[arg(long)]
    pub dry_run: bool,
}

impl Args {
    /// The window the flags describe, validated.
    fn window(&self) -> Result<Window, UserError> {
        let now = crate::time::now();
        let since = crate::time::parse_user_date(&self.since, now)?;
        let until = self
            .until
            .as_deref()
            .map(|u| crate::time::parse_user_date(u, now))
            .transpose()?;
        if until.is_some_and(|u| u <= since) {
            return Err(UserError::new("--until must be later than --since"));
        }
        if let Some(m) = &self.machine
            && !(m.len() == 40 && m.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(UserError::new(format!(
                "invalid machine id '{m}' (expected 40 hex characters)"
            )));
        }
        // The API filters on whole seconds.
        let since = chrono::DurationRound::duration_trunc(since, chrono::Duration::seconds(1))
            .unwrap_or(since);
        Ok(Window {
            since,
            until,
            machine_id: self.machine.clone(),
        })
    }
}

pub async fn run(config: &ConfigFile, args: Args) -> anyhow::Result<ExitCode> {
    let window = args.window()?;
    let (ctx, tenants) = setup(config, args.tenant.tenant.as_deref())?;
    let span = format!(
        "{} .. {}",
        crate::time::fmt(window.since),
        window.until.map_or("now".to_string(), crate::time::fmt)
    );
    if args.dry_run {
        for t in &tenants {
            dry_run(&ctx, t, &window, &span).await?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    ctx.check_worm().await?;
    cancel_on_ctrl_c(
        ctx.cancel.clone(),
        "stopping after the downloads in progress; run the same backfill again to resume",
    );
    let mut complete = true;
    for t in tenants {
        complete &= drain(&ctx, &t, &window, &span).await?;
    }
    Ok(exit_code(complete))
}

/// Prints what a backfill of `window` would do for `t`; investigation packages first, since
/// their quota (2/min, 120/h) decides how long a backfill with many of them takes.
async fn dry_run(ctx: &Context, t: &Tenant, window: &Window, span: &str) -> anyhow::Result<()> {
    let q = &ctx.cfg.quota;
    let p = backfill::plan(ctx, t, window).await?;
    let links = p.to_fetch - p.packages;
    let eta = backfill::quota_eta(ctx, &t.cfg.name, links, p.packages).await?;
    if p.packages > 0 {
        let pq = Endpoint::PackageUri.limits(q);
        println!(
            "{}: {} investigation packages to fetch: their links are limited to {}/min and {}/h, so they alone take at least {}",
            t.cfg.name,
            p.packages,
            pq.per_minute,
            pq.per_hour,
            fmt_duration(eta.packages)
        );
    }
    println!(
        "{}: window {span}: {} actions ({} live response, {} investigation packages; {} unfinished); {} results to fetch, {} already done, {} without a result",
        t.cfg.name,
        p.actions,
        p.actions - p.package_actions,
        p.package_actions,
        p.unfinished,
        p.to_fetch,
        p.already_done,
        p.without_result
    );
    println!(
        "{}: calls needed: {} result links and {} package links (+ {} List call{} made for this count); result links at {}/min and {}/h: ETA {}",
        t.cfg.name,
        links,
        p.packages,
        p.list_calls,
        if p.list_calls == 1 { "" } else { "s" },
        q.per_minute,
        q.per_hour,
        fmt_duration(eta.both())
    );
    Ok(())
}

/// Backfills `window` for `t` with a progress bar; true when every result is terminal.
async fn drain(
    ctx: &Arc<Context>,
    t: &Arc<Tenant>,
    window: &Window,
    span: &str,
) -> anyhow::Result<bool> {
    let progress = Arc::new(Progress::new(&format!("backfill {}", t.cfg.name), 0));
    let ticker = tokio::spawn(show_quota_eta(
        progress.clone(),
        ctx.clone(),
        t.cfg.name.clone(),
    ));
    let (p_total, p_done) = (progress.clone(), progress.clone());
    let started = crate::time::now_str();
    let totals = backfill::run(
        ctx,
        t,
        window,
        move |total| p_total.set_total(total),
        Some(Arc::new(move |_, _| p_done.inc())),
    )
    .await;
    ticker.abort();
    let totals = totals?;
    progress.finish();
    println!(
        "{}: window {span}: {} archived, {} unavailable, {} skipped (no result), {} failed, {} not finished",
        t.cfg.name,
        totals.archived,
        totals.unavailable,
        totals.skipped,
        totals.failed,
        totals.unfinished
    );
    let summary = format!("window {span}: {totals:?}");
    jobs::record_job_run(
        &ctx.db,
        "backfill",
        &t.cfg.name,
        started,
        totals.complete(),
        summary,
    )
    .await;
    Ok(totals.complete())
}

/// Keeps the progress note on the ETA from the quota ledger (not from the rate so far: a
/// backlog drains in bursts of per_minute until the hour window is full).
async fn show_quota_eta(progress: Arc<Progress>, ctx: Arc<Context>, tenant: String) {
    loop {
        let left = progress.total().saturating_sub(progress.done());
        let packages = backfill::open_packages(&ctx, &tenant)
            .await
            .unwrap_or_default()
            .min(left);
        if let Ok(eta) = backfill::quota_eta(&ctx, &tenant, left - packages, packages).await {
            progress.set_note(format!("ETA {} (quota)", fmt_duration(eta.both())));
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}
