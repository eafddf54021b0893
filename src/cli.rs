//! The command line: clap definitions and dispatch. Each command lives in its own module
//! under [`crate::commands`], with its flags and its `run()`; errors become one line in [`main`], which
//! the binary calls.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{ConfigFile, Credentials};

use crate::commands::{
    self, TenantArg, archive, audit, backfill, backup, case, check_credentials, enqueue, export,
    requeue, restore, status, verify,
};
#[cfg(feature = "simulator")]
use crate::commands::{demo, simulate};

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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: scheduled discover, archive and verify jobs until SIGTERM/SIGINT
    Run,
    /// Run one discovery pass now: queue the commands of finished live-response actions
    Discover(TenantArg),
    /// Drain the queue once now, honouring the quota (exit 1 if results are left to retry)
    Archive(archive::Args),
    /// Harvest a past window: list, queue and archive every result of the live-response
    /// actions created in it; exits when every result is terminal (run again to resume)
    Backfill(backfill::Args),
    /// Fetch the given machine actions (Get MachineAction) and queue their commands
    Enqueue(enqueue::Args),
    /// Check the database, every package and the custody chain against their anchors; write a
    /// checkpoint (exit 3 on any defect)
    Verify(verify::Args),
    /// Write an examiner's handover kit: packages, the custody rows and chain that cover them,
    /// the covering checkpoint and its token, and a README of checks with standard tools
    Export(export::Args),
    /// Compliance queries over the audit views
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Evidence grouped by case: list, show, tag and untag actions or packages, legal hold
    #[command(subcommand)]
    Case(case::CaseCommand),
    /// Queue depth by state, quota use, last job runs and the custody head
    Status(status::Args),
    /// Apply pending database migrations
    Migrate,
    /// Take a token with the configured (or given) client secret and make one cheap API call;
    /// changes nothing (exit 0 works, 1 refused, 2 configuration)
    CheckCredentials(check_credentials::Args),
    /// Put failed (or unavailable) results back to pending with their attempts reset
    /// (custody QUEUED); exit 1 when none matches
    Requeue(requeue::Args),
    /// Copy the database while the daemon runs (SQLite online backup, mode 0600,
    /// integrity-checked, custody BACKED_UP)
    Backup(backup::Args),
    /// Put a backup in place of the database, with the daemon stopped: integrity check, the
    /// old database and its WAL set aside, start-up recovery
    Restore(restore::Args),
    /// Run the built-in MDE API + blob simulator
    #[cfg(feature = "simulator")]
    Simulate(simulate::Args),
    /// Run the whole pipeline against the simulator on loopback and show the result
    #[cfg(feature = "simulator")]
    Demo(demo::Args),
}

impl Command {
    /// A one-shot command that writes the database (its WAL is checkpointed when it ends;
    /// `run` checkpoints its own at a clean stop).
    fn writes(&self) -> bool {
        match self {
            Command::Run | Command::Audit(_) | Command::Status(_) => false,
            Command::Case(case::CaseCommand::List { .. } | case::CaseCommand::Show { .. }) => false,
            #[cfg(feature = "simulator")]
            Command::Simulate(_) | Command::Demo(_) => false,
            _ => true,
        }
    }
}

/// The whole program after the process settings of `main.rs`: parse the command line, set up
/// logging, run the command on a multi-threaded runtime, and turn the outcome into an exit
/// code (one line on stderr for an error). It lives here rather than in `main.rs` so the
/// runtime's `block_on` and everything it instantiates are compiled once, in the library.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli);
    // systemd's LoadCredential= directory, read here once and passed down: nothing below
    // reads or changes the process environment for it.
    let credentials = Credentials::new(std::env::var_os("CREDENTIALS_DIRECTORY").map(Into::into));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lrvault: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli, credentials)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("lrvault: {}", crate::error::one_line(&err));
            ExitCode::from(crate::error::exit_code(&err))
        }
    }
}

fn init_tracing(cli: &Cli) {
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let level = match (cli.verbose, cli.quiet) {
        (0, 0) => LevelFilter::INFO,
        (1, _) => LevelFilter::DEBUG,
        (v, _) if v >= 2 => LevelFilter::TRACE,
        (_, 1) => LevelFilter::WARN,
        _ => LevelFilter::ERROR,
    };
    // The filter alone decides what is logged; the format layer only writes.
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref(), level);
    let format = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let logs = tracing_subscriber::registry().with(filter);
    match cli.log_format {
        LogFormat::Text => logs.with(format).init(),
        LogFormat::Json => logs.with(format.json()).init(),
    }
}

/// What is logged: `RUST_LOG` (`target=level,...`, docs/operations.md §7) when it is set and
/// parses; otherwise `level` for lrvault and warnings for the crates beneath it.
fn log_filter(
    rust_log: Option<&str>,
    level: tracing_subscriber::filter::LevelFilter,
) -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    rust_log
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| v.parse::<Targets>().ok())
        .unwrap_or_else(|| {
            Targets::new()
                .with_target("lrvault", level)
                .with_default(LevelFilter::WARN)
        })
}

/// Runs the parsed command; `Ok` carries the exit code. `credentials` is where relative
/// secret files and the object store's credentials are looked up (`main` reads
/// `$CREDENTIALS_DIRECTORY` once).
pub async fn run(cli: Cli, credentials: Credentials) -> anyhow::Result<ExitCode> {
    // Absolute from here on: messages that paste it into a command for another working
    // directory (systemd-run runs in /) stay right.
    let path = std::path::absolute(&cli.config).unwrap_or(cli.config);
    let config = &ConfigFile { path, credentials };
    let wrote = cli.command.writes();
    let result = match cli.command {
        Command::Run => commands::run::run(config).await,
        Command::Discover(args) => commands::discover::run(config, args).await,
        Command::Archive(args) => archive::run(config, args).await,
        Command::Backfill(args) => backfill::run(config, args).await,
        Command::Enqueue(args) => enqueue::run(config, args).await,
        Command::Verify(args) => verify::run(config, args).await,
        Command::Export(args) => export::run(config, args).await,
        Command::Audit(cmd) => audit::run(config, cmd).await,
        Command::Case(cmd) => case::run(config, cmd).await,
        Command::Status(args) => status::run(config, args).await,
        Command::Migrate => commands::migrate::run(config).await,
        Command::CheckCredentials(args) => check_credentials::run(config, args).await,
        Command::Requeue(args) => requeue::run(config, args).await,
        Command::Backup(args) => backup::run(config, args).await,
        Command::Restore(args) => restore::run(config, args).await,
        #[cfg(feature = "simulator")]
        Command::Simulate(args) => simulate::run(args).await,
        #[cfg(feature = "simulator")]
        Command::Demo(args) => demo::run(args).await,
    };
    // A command refused with an error wrote nothing of its own: its database stays as it was.
    if wrote && result.is_ok() {
        commands::checkpoint_after(config);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;
    use tracing_subscriber::filter::LevelFilter;

    #[test]
    fn rust_log_wins_when_it_parses_and_the_flags_decide_otherwise() {
        let f = log_filter(None, LevelFilter::INFO);
        assert!(f.would_enable("lrvault::jobs", &Level::INFO));
        assert!(!f.would_enable("lrvault::jobs", &Level::DEBUG));
        assert!(f.would_enable("lrvault_sim::server", &Level::INFO));
        assert!(!f.would_enable("reqwest::connect", &Level::INFO));
        assert!(f.would_enable("reqwest::connect", &Level::WARN));
        let f = log_filter(Some("lrvault=debug,reqwest=info"), LevelFilter::ERROR);
        assert!(f.would_enable("lrvault::mde", &Level::DEBUG));
        assert!(f.would_enable("reqwest::connect", &Level::INFO));
        assert!(!f.would_enable("hyper_util", &Level::ERROR));
        let f = log_filter(Some("debug"), LevelFilter::ERROR);
        assert!(f.would_enable("hyper_util", &Level::DEBUG));
        // Empty or unreadable: as if unset.
        for unreadable in ["", "  ", "lrvault=loud"] {
            let f = log_filter(Some(unreadable), LevelFilter::WARN);
            assert!(f.would_enable("lrvault", &Level::WARN), "{unreadable:?}");
            assert!(!f.would_enable("lrvault", &Level::INFO), "{unreadable:?}");
        }
    }
}
