//! `lrvault migrate`: apply pending database migrations.

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;
use crate::db::Db;

pub async fn run(config: &Path) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(config)?;
    let db = Db::open(&cfg.database.path)?;
    println!(
        "database {} is at schema version {}",
        db.path().display(),
        crate::db::schema_version_known()
    );
    Ok(ExitCode::SUCCESS)
}
