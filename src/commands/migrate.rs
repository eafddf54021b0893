//! `lrvault migrate`: apply pending database migrations.

use std::process::ExitCode;

use crate::config::ConfigFile;
use crate::db::Db;

pub async fn run(config: &ConfigFile) -> anyhow::Result<ExitCode> {
    let cfg = config.load()?;
    let db = Db::open(&cfg.database.path)?;
    println!(
        "database {} is at schema version {}",
        db.path().display(),
        crate::db::schema_version_known()
    );
    Ok(ExitCode::SUCCESS)
}
