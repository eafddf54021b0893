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
pub enum Format {
    Table,
    Csv,
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
    /// Fetch the given machine actions (Get MachineAction) and queue their commands
    Enqueue {
        #[command(flatten)]
        tenant: TenantArg,
        /// Machine action ids, or - to read ids (one per line) from stdin
        #[arg(required = true, value_name = "ACTION_ID")]
        ids: Vec<String>,
    },
    /// Re-hash every package and its payload and check the custody chain (exit 3 on any mismatch)
    Verify {
        #[command(flatten)]
        tenant: TenantArg,
        /// Only packages archived since DATE (YYYY-MM-DD, RFC 3339, or an age like 30d)
        #[arg(long, value_name = "DATE")]
        since: Option<String>,
        /// Check only the custody chain, not the packages
        #[arg(long)]
        chain_only: bool,
    },
    /// Compliance queries over the audit views
    #[command(subcommand)]
    Audit(crate::audit::AuditCommand),
    /// Queue depth by state, quota use, last job runs and the custody head
    Status {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
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
            crate::status::status(&cfg, format == Format::Json)
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
                let started = crate::time::now_str();
                let window = discover::Window {
                    since: crate::time::now()
                        - chrono::Duration::from_std(ctx.cfg.discovery.lookback)?,
                    until: None,
                    machine_id: None,
                };
                match discover::discover(&ctx, tenant, &window, discover::Source::Discover).await {
                    Ok(s) => {
                        println!("{}: {s}", tenant.cfg.name);
                        jobs::record_job_run(
                            &ctx.db,
                            "discover",
                            &tenant.cfg.name,
                            started,
                            true,
                            s.to_string(),
                        )
                        .await;
                    }
                    Err(e) => {
                        failed = true;
                        let line = crate::error::one_line(&e);
                        eprintln!("lrvault: {}: discovery failed: {line}", tenant.cfg.name);
                        jobs::record_job_run(
                            &ctx.db,
                            "discover",
                            &tenant.cfg.name,
                            started,
                            false,
                            line,
                        )
                        .await;
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
            let progress = Arc::new(crate::progress::Progress::new("archiving", due, true));
            let p = progress.clone();
            let cancel = ctx.cancel.clone();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!(
                        "lrvault: stopping after the downloads in progress (Ctrl-C again to abort)"
                    );
                    cancel.cancel();
                }
            });
            let started = crate::time::now_str();
            let summary =
                archive::archive(&ctx, &tenants, &scope, Some(Arc::new(move |_, _| p.inc())))
                    .await?;
            progress.finish();
            println!("{summary}");
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
            let retryable_left = summary.retry_later > 0 || summary.not_started > 0;
            Ok(if retryable_left {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
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
        Command::Verify {
            tenant,
            since,
            chain_only,
        } => {
            let cfg = Arc::new(Config::load(&cli.config)?);
            let since = since
                .map(|s| crate::time::parse_user_date(&s, crate::time::now()))
                .transpose()?;
            let db = Db::open(&cfg.database.path)?;
            crate::verify::run(&cfg, &db, tenant.tenant.as_deref(), since, chain_only).await
        }
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
