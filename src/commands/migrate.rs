//! `lrvault migrate`: create the database, or apply its pending migrations, under the
//! instance lock: never while a daemon runs on it (docs/operations.md §11).

use std::process::ExitCode;

use crate::config::ConfigFile;

pub async fn run(config: &ConfigFile) -> anyhow::Result<ExitCode> {
    let cfg = config.load()?;
    let path = &cfg.database.path;
    let lock = super::take_lock(
        path,
        "cannot migrate while the daemon runs; restart it, which migrates when it starts, or stop it first (systemctl stop lrvault)",
    )?;
    let done = crate::db::migrate(&lock)?;
    let was = match done.from {
        0 => " (created)".to_string(),
        from if from == done.to => String::new(),
        from => format!(" (was {from})"),
    };
    println!(
        "database {} is at schema version {}{was}",
        path.display(),
        done.to
    );
    Ok(ExitCode::SUCCESS)
}
