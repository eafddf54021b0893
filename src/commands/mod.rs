//! One module per command, each with its clap `Args` and its `run()`: it validates its flags
//! into the objects that do the work, prints what the user asked for and returns the exit
//! code. `cli` only parses and dispatches; errors become one line in `main`.

pub mod archive;
pub mod audit;
pub mod backfill;
pub mod backup;
pub mod case;
pub mod check_credentials;
#[cfg(feature = "simulator")]
pub mod demo;
pub mod discover;
pub mod enqueue;
pub mod export;
pub mod migrate;
pub mod requeue;
pub mod restore;
pub mod run;
#[cfg(feature = "simulator")]
pub mod simulate;
pub mod status;
pub mod verify;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigFile};
use crate::db::Db;
use crate::jobs::{Context, Tenant};

/// `--tenant T`, shared by the commands that act on tenants.
#[derive(Debug, Args)]
pub struct TenantArg {
    /// Act on this tenant only (default: every configured tenant)
    #[arg(long, value_name = "T")]
    pub tenant: Option<String>,
}

/// Who ran a command that records an operator's act (`requeue`, `case`): the user this
/// process runs as, and the login behind `sudo` when there is one.
pub(crate) fn operator() -> String {
    let me = crate::access::process_user();
    match std::env::var("SUDO_USER") {
        Ok(u) if !u.is_empty() => format!("{me} (sudo by {u})"),
        _ => me,
    }
}

/// Loads the config, opens the database (at this lrvault's schema: it never migrates) and
/// builds the selected tenants' clients (reading their secrets).
fn setup(
    config: &ConfigFile,
    tenant: Option<&str>,
) -> anyhow::Result<(Arc<Context>, Vec<Arc<Tenant>>)> {
    let cfg = Arc::new(config.load()?);
    cfg.check_writable()?;
    let db = open_db(&cfg, config)?;
    let ctx = Context::new(cfg, db, CancellationToken::new())?;
    let tenants = ctx.tenants(tenant)?.into_iter().map(Arc::new).collect();
    Ok((Arc::new(ctx), tenants))
}

/// Opens the database `cfg` names at this lrvault's schema; a database that does not exist
/// yet is refused with the first-start hint for `config` (exit code 2).
fn open_db(cfg: &Config, config: &ConfigFile) -> Result<Db, crate::db::DbError> {
    Db::open(&cfg.database.path).map_err(|e| e.for_config(&config.path))
}

/// Takes the instance lock of the database at `db` for a command that changes it as a whole
/// (`migrate`, `restore`); a running daemon's lock is refused with `why` in front.
fn take_lock(db: &Path, why: &'static str) -> anyhow::Result<crate::db::InstanceLock> {
    crate::db::InstanceLock::take(db).map_err(|e| match e {
        crate::db::DbError::Locked(_) => anyhow::Error::new(e).context(why),
        e => e.into(),
    })
}

/// At the end of a one-shot command that wrote (whatever its exit code, unless it was refused
/// with an error): folds the WAL into the database file and truncates it, as a clean stop of the daemon does, so no commit of this
/// command lives only in `lrvault.db-wal`. Only when this process may write the database
/// (never root over the service user's files), and never waiting: a daemon using the
/// database at that moment keeps its WAL and checkpoints it itself.
pub fn checkpoint_after(config: &ConfigFile) {
    let Ok(cfg) = config.load() else {
        return;
    };
    let [wal, _] = crate::access::sqlite_sidecars(&cfg.database.path);
    if wal.metadata().is_ok_and(|m| m.len() > 0) && cfg.check_writable().is_ok() {
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE;
        match rusqlite::Connection::open_with_flags(&cfg.database.path, flags) {
            Ok(conn) => crate::db::fold_wal(&conn),
            Err(e) => tracing::debug!(error = %e, "no WAL checkpoint: the database does not open"),
        }
    }
}

/// 0 when everything worked, 1 when work is left or failed.
fn exit_code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
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

/// The names of `tenants`, for the queries that take them.
fn names(tenants: &[Arc<Tenant>]) -> Vec<String> {
    tenants.iter().map(|t| t.cfg.name.clone()).collect()
}
