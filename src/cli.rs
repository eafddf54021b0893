//! The command line: clap definitions and dispatch. Each command validates its flags into
//! the objects that do the work and returns an exit code; errors become one line in `main`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::Db;
use crate::error::UserError;
use crate::jobs::{self, Context, archive, discover};

#[derive(Debug, Parser)]
#[command(
    name = "lrvault",
    version,
    about = "Archive Microsoft Defender for Endpoint live-response results as hashed evidence with a chain of custody"
)]
pub struct Cli {
    /// Configuration file
    #[arg(
        long,
        global = true,
        env = "LRVAULT_CONFIG",
        default_value = "/etc/lrvault/lrvault.toml"
    )]
    pub config: PathBuf,
    /// Log format on stderr
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// More log output (-v debug, -vv trace)
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Less log output (-q warnings, -qq errors only)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub quiet: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum StatusFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: scheduled discover, archive and verify jobs until SIGTERM/SIGINT
    Run,
    /// Run one discovery pass now: queue the commands of finished live-response actions
    Discover(TenantArg),
    /// Drain the queue once now, honouring the quota (exit 1 if results are left to retry)
    Archive {
        #[command(flatten)]
        tenant: TenantArg,
        /// Archive at most N results in this pass
        #[arg(long, value_name = "N")]
        max: Option<usize>,
    },
    /// Harvest a past window: list, queue and archive every result of the live-response
    /// actions created in it; exits when every result is terminal (run again to resume)
    Backfill {
        /// Start of the window: YYYY-MM-DD (UTC midnight), RFC 3339, or an age like 30d / 12h
        #[arg(long, value_name = "DATE")]
        since: String,
        /// End of the window (exclusive; default: now)
        #[arg(long, value_name = "DATE")]
        until: Option<String>,
        #[command(flatten)]
        tenant: TenantArg,
        /// Only actions on this machine (machine id)
        #[arg(long, value_name = "ID")]
        machine: Option<String>,
        /// Print the number of actions and results, the API calls needed and the ETA; change
        /// nothing (its List calls are real, so they are in the quota ledger)
        #[arg(long)]
        dry_run: bool,
    },
    /// Fetch the given machine actions (Get MachineAction) and queue their commands
    Enqueue {
        #[command(flatten)]
        tenant: TenantArg,
        /// Machine action ids, or - to read ids (one per line) from stdin
        #[arg(required = true, value_name = "ACTION_ID")]
        ids: Vec<String>,
    },
    /// Check the database, every package and the custody chain against their anchors; write a
    /// checkpoint (exit 3 on any defect)
    Verify(crate::verify::Args),
    /// Write an examiner's handover kit: packages, the custody rows and chain that cover them,
    /// the covering checkpoint and its token, and a README of checks with standard tools
    Export(crate::export::Args),
    /// Compliance queries over the audit views
    #[command(subcommand)]
    Audit(crate::audit::AuditCommand),
    /// Queue depth by state, quota use, last job runs and the custody head
    Status {
        #[arg(long, value_enum, default_value_t = StatusFormat::Table)]
        format: StatusFormat,
    },
    /// Apply pending database migrations
    Migrate,
    /// Run the built-in MDE API + blob simulator
    Simulate(crate::demo::SimulateArgs),
    /// Run the whole pipeline against the simulator on loopback and show the result
    Demo {
        /// Where to put the demo's config, database and evidence (default: a new temp dir)
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct TenantArg {
    /// Act on this tenant only (default: every configured tenant)
    #[arg(long, value_name = "T")]
    pub tenant: Option<String>,
}

/// Runs the parsed command; `Ok` carries the exit code.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Simulate(args) => crate::demo::simulate(args).await,
        Command::Demo { dir } => crate::demo::demo(dir).await,
        Command::Migrate => {
            let cfg = Config::load(&cli.config)?;
            let db = Db::open(&cfg.database.path)?;
            println!(
                "database {} is at schema version {}",
                db.path().display(),
                crate::db::schema_version_known()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { format } => {
            let cfg = Config::load(&cli.config)?;
            crate::status::status(&cfg, format == StatusFormat::Json)
        }
        Command::Audit(cmd) => {
            let cfg = Config::load(&cli.config)?;
            crate::audit::run(&cfg, cmd)
        }
        Command::Run => {
            let cfg = Arc::new(Config::load(&cli.config)?);
            crate::daemon::run(cfg).await
        }
        Command::Discover(t) => {
            let (ctx, tenants) = setup(&cli.config, t.tenant.as_deref())?;
            let mut failed = false;
            for tenant in &tenants {
                match discover::lookback_pass(&ctx, tenant).await {
                    Ok(s) => println!("{}: {s}", tenant.cfg.name),
                    Err(e) => {
                        failed = true;
                        eprintln!(
                            "lrvault: {}: discovery failed: {}",
                            tenant.cfg.name,
                            crate::error::one_line(&e)
                        );
                    }
                }
            }
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Archive { tenant, max } => {
            let (ctx, tenants) = setup(&cli.config, tenant.tenant.as_deref())?;
            let ctx = Arc::new(ctx);
            let tenants: Vec<_> = tenants.into_iter().map(Arc::new).collect();
            let names: Vec<String> = tenants.iter().map(|t| t.cfg.name.clone()).collect();
            let scope = archive::Scope {
                max,
                ..Default::default()
            };
            let due = archive::due_count(&ctx, &tenants, &scope).await? as u64;
            let progress = Arc::new(crate::progress::Progress::new("archiving", due));
            let p = progress.clone();
            cancel_on_ctrl_c(
                ctx.cancel.clone(),
                "stopping after the downloads in progress",
            );
            let started = crate::time::now_str();
            let summary =
                archive::archive(&ctx, &tenants, &scope, Some(Arc::new(move |_, _| p.inc())))
                    .await?;
            progress.finish();
            println!("{summary}");
            tracing::debug!(peak_rss_kib = peak_rss_kib(), "archive pass finished");
            for e in &summary.tenant_errors {
                eprintln!("lrvault: {e}");
            }
            for name in &names {
                jobs::record_job_run(
                    &ctx.db,
                    "archive",
                    name,
                    started.clone(),
                    summary.failed == 0,
                    summary.to_string(),
                )
                .await;
            }
            let retryable_left = summary.retry_later > 0
                || summary.not_started > 0
                || !summary.tenant_errors.is_empty();
            Ok(if retryable_left {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Backfill {
            since,
            until,
            tenant,
            machine,
            dry_run,
        } => {
            let now = crate::time::now();
            let since = crate::time::parse_user_date(&since, now)?;
            let until = until
                .map(|u| crate::time::parse_user_date(&u, now))
                .transpose()?;
            if until.is_some_and(|u| u <= since) {
                return Err(UserError::new("--until must be later than --since").into());
            }
            if let Some(m) = &machine
                && !m.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return Err(UserError::new(format!(
                    "invalid machine id '{m}' (expected 40 hex characters)"
                ))
                .into());
            }
            // The API filters on whole seconds.
            let since = chrono::DurationRound::duration_trunc(since, chrono::Duration::seconds(1))
                .unwrap_or(since);
            let window = discover::Window {
                since,
                until,
                machine_id: machine,
            };
            let (ctx, tenants) = setup(&cli.config, tenant.tenant.as_deref())?;
            backfill(Arc::new(ctx), tenants, window, dry_run).await
        }
        Command::Enqueue { tenant, ids } => {
            let (ctx, tenants) = setup(&cli.config, tenant.tenant.as_deref())?;
            let [tenant] = tenants.as_slice() else {
                return Err(UserError::new(
                    "enqueue needs --tenant when several tenants are configured",
                )
                .into());
            };
            enqueue(&ctx, tenant, ids).await
        }
        Command::Verify(args) => crate::verify::run(&cli.config, args).await,
        Command::Export(args) => crate::export::run(&cli.config, args).await,
    }
}

/// Loads config, opens (and migrates) the DB, builds the selected tenants' clients.
fn setup(
    config: &std::path::Path,
    tenant: Option<&str>,
) -> anyhow::Result<(Context, Vec<jobs::Tenant>)> {
    let cfg = Arc::new(Config::load(config)?);
    let db = Db::open(&cfg.database.path)?;
    let ctx = Context::new(cfg, db, CancellationToken::new())?;
    let tenants = ctx.tenants(tenant)?;
    Ok((ctx, tenants))
}

async fn backfill(
    ctx: Arc<Context>,
    tenants: Vec<jobs::Tenant>,
    window: discover::Window,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    use jobs::backfill::{self, fmt_duration};
    let span = format!(
        "{} .. {}",
        crate::time::fmt(window.since),
        window.until.map_or("now".to_string(), crate::time::fmt)
    );
    let q = &ctx.cfg.quota;
    if dry_run {
        for t in &tenants {
            let p = backfill::plan(&ctx, t, &window).await?;
            let eta = backfill::quota_eta(&ctx, &t.cfg.name, p.to_fetch).await?;
            println!(
                "{}: window {span}: {} live-response actions ({} unfinished); {} results to fetch, {} already done, {} without a result",
                t.cfg.name, p.actions, p.unfinished, p.to_fetch, p.already_done, p.without_result
            );
            println!(
                "{}: calls needed: {} result links (+ {} List call{} made for this count); at {}/min and {}/h per endpoint: ETA {}",
                t.cfg.name,
                p.to_fetch,
                p.list_calls,
                if p.list_calls == 1 { "" } else { "s" },
                q.per_minute,
                q.per_hour,
                fmt_duration(eta)
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    cancel_on_ctrl_c(
        ctx.cancel.clone(),
        "stopping after the downloads in progress; run the same backfill again to resume",
    );
    let mut complete = true;
    for t in tenants {
        let t = Arc::new(t);
        let progress = Arc::new(crate::progress::Progress::new(
            &format!("backfill {}", t.cfg.name),
            0,
        ));
        let ticker = tokio::spawn(show_quota_eta(
            progress.clone(),
            ctx.clone(),
            t.cfg.name.clone(),
        ));
        let (p_total, p_done) = (progress.clone(), progress.clone());
        let started = crate::time::now_str();
        let outcome = backfill::run(
            &ctx,
            &t,
            &window,
            move |total| p_total.set_total(total),
            Some(Arc::new(move |_, _| p_done.inc())),
        )
        .await;
        ticker.abort();
        let outcome = outcome?;
        progress.finish();
        println!(
            "{}: window {span}: {} archived, {} unavailable, {} skipped (no result), {} failed, {} not finished",
            t.cfg.name,
            outcome.archived,
            outcome.unavailable,
            outcome.skipped,
            outcome.failed,
            outcome.unfinished
        );
        jobs::record_job_run(
            &ctx.db,
            "backfill",
            &t.cfg.name,
            started,
            outcome.complete(),
            format!("window {span}: {outcome:?}"),
        )
        .await;
        complete &= outcome.complete();
    }
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// This process's peak resident memory (VmHWM), for the memory-flatness check.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Keeps the progress note on the ETA from the quota ledger (not from the rate so far: a
/// backlog drains in bursts of per_minute until the hour window is full).
async fn show_quota_eta(
    progress: Arc<crate::progress::Progress>,
    ctx: Arc<Context>,
    tenant: String,
) {
    loop {
        let left = progress.total().saturating_sub(progress.done());
        if let Ok(eta) = jobs::backfill::quota_eta(&ctx, &tenant, left).await {
            progress.set_note(format!("ETA {} (quota)", jobs::backfill::fmt_duration(eta)));
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

/// Ctrl-C once stops starting new work (`cancel`); a second Ctrl-C exits at once (the next
/// run's recovery returns interrupted downloads to the queue).
fn cancel_on_ctrl_c(cancel: CancellationToken, message: &'static str) {
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_err() {
            return;
        }
        eprintln!("lrvault: {message} (Ctrl-C again to stop at once)");
        cancel.cancel();
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    });
}

async fn enqueue(
    ctx: &Context,
    tenant: &jobs::Tenant,
    ids: Vec<String>,
) -> anyhow::Result<ExitCode> {
    let ids: Vec<String> = if ids == ["-"] {
        std::io::read_to_string(std::io::stdin())?
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    } else {
        ids
    };
    let mut ok = true;
    for id in ids {
        match tenant.client.get_action(&id).await {
            Ok(action) => {
                let status = action.status().unwrap_or("unknown").to_string();
                if !ctx.cfg.discovery.statuses.contains(&status) {
                    eprintln!(
                        "lrvault: action {id} is {status}, not finished; discovery will queue it once it is"
                    );
                    ok = false;
                    continue;
                }
                let s =
                    discover::record_actions(ctx, tenant, vec![action], discover::Source::Enqueue)
                        .await?;
                if s.known > 0 {
                    println!("{id}: already queued");
                } else {
                    println!("{id}: {} results queued, {} skipped", s.queued, s.skipped);
                }
            }
            Err(e) => {
                eprintln!("lrvault: action {id}: {e}");
                ok = false;
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
