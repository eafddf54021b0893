//! `lrvault verify`: re-hash packages and the custody chain (see [`crate::verify`]).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args as ClapArgs;

use super::TenantArg;
use crate::config::Config;
use crate::db::Db;

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub tenant: TenantArg,
    /// Only packages archived since DATE (YYYY-MM-DD, RFC 3339, or an age like 30d)
    #[arg(long, value_name = "DATE")]
    pub since: Option<String>,
    /// Check only the custody chain, not the packages
    #[arg(long)]
    pub chain_only: bool,
}

pub async fn run(config: &Path, args: Args) -> anyhow::Result<ExitCode> {
    let cfg = Arc::new(Config::load(config)?);
    let since = args
        .since
        .map(|s| crate::time::parse_user_date(&s, crate::time::now()))
        .transpose()?;
    let db = Db::open(&cfg.database.path)?;
    crate::verify::run(
        &cfg,
        &db,
        args.tenant.tenant.as_deref(),
        since,
        args.chain_only,
    )
    .await
}
