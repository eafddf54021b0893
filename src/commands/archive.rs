//! `lrvault archive`: drain the queue once now, within the quota.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args as ClapArgs;

use super::{TenantArg, cancel_on_ctrl_c, exit_code, names, setup};
use crate::config::ConfigFile;
use crate::jobs::{self, archive};
use crate::queue::{self, Scope};

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub tenant: TenantArg,
    /// Archive at most N results in this pass
    #[arg(long, value_name = "N")]
    pub max: Option<usize>,
}

pub async fn run(config: &ConfigFile, args: Args) -> anyhow::Result<ExitCode> {
    let (ctx, tenants) = setup(config, args.tenant.tenant.as_deref())?;
    ctx.check_worm().await?;
    let scope = Scope {
        max: args.max,
        ..Default::default()
    };
    let due = queue::due_count(&ctx.db, &names(&tenants), &scope).await? as u64;
    let progress = Arc::new(crate::progress::Progress::new("archiving", due));
    let p = progress.clone();
    cancel_on_ctrl_c(
        ctx.cancel.clone(),
        "stopping after the downloads in progress",
    );
    let started = crate::time::now_str();
    let summary =
        archive::archive(&ctx, &tenants, &scope, Some(Arc::new(move |_, _| p.inc()))).await?;
    progress.finish();
    println!("{summary}");
    tracing::debug!(peak_rss_kib = peak_rss_kib(), "archive pass finished");
    for e in summary
        .tenant_errors
        .iter()
        .chain(&summary.breakers)
        .chain(&summary.store)
    {
        eprintln!("lrvault: {e}");
    }
    for (name, ok) in &summary.tenants {
        let line = summary.to_string();
        jobs::record_job_run(&ctx.db, "archive", name, started.clone(), *ok, line).await;
    }
    Ok(exit_code(!summary.work_left()))
}

/// This process's peak resident memory (VmHWM), for the memory-flatness check.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
