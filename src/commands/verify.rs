//! `lrvault verify`: the database, every package and the custody chain against their
//! anchors (see [`crate::verify`]); exit 3 on any defect.

use std::process::ExitCode;

use crate::config::ConfigFile;

use crate::verify::{Scope, is_damaged, verify_scope};

/// `lrvault verify` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this tenant's packages and store directory (the chain and anchors are always checked whole)
    #[arg(long, value_name = "T")]
    pub tenant: Option<String>,
    /// Only packages archived since DATE (YYYY-MM-DD, RFC 3339, or an age like 30d)
    #[arg(long, value_name = "DATE")]
    pub since: Option<String>,
    /// Check only the database, the custody chain and its anchors, not the packages
    #[arg(long)]
    pub chain_only: bool,
    /// Run SQLite's full integrity_check instead of quick_check
    #[arg(long)]
    pub full: bool,
    /// Read back only N packages picked at random (for very large stores); every evidence
    /// row is still compared with the chain, and the chain is checked whole. 0 reads none:
    /// the database and the chain alone
    #[arg(long, value_name = "N")]
    pub sample: Option<u64>,
}

/// The command: exit 0 when everything verifies, 3 on any defect.
pub async fn run(config: &ConfigFile, args: Args) -> anyhow::Result<ExitCode> {
    let cfg = config.load()?;
    cfg.select_tenants(args.tenant.as_deref())?;
    let since = args
        .since
        .map(|s| crate::time::parse_user_date(&s, crate::time::now()))
        .transpose()?;
    let db = match super::open_db(&cfg, config) {
        Ok(db) => db,
        Err(e) if is_damaged(&e) => {
            eprintln!(
                "lrvault: defect: database {} is damaged and cannot be verified or take a VERIFY_FAILED row: {}",
                cfg.database.path.display(),
                crate::error::one_line(&e.into())
            );
            return Ok(ExitCode::from(3));
        }
        Err(e) => return Err(e.into()),
    };
    let scope = Scope {
        tenant: args.tenant,
        since,
        chain_only: args.chain_only,
        full: args.full,
        interactive: true,
        sample: args.sample.map(|n| n as usize),
    };
    let report = verify_scope(&cfg, &db, &scope).await?;
    match &report.unrecorded {
        None => println!("{}", report.summary()),
        Some(why) => eprintln!(
            "lrvault: defect: database {} is damaged and cannot record this run's defects: {why}",
            cfg.database.path.display()
        ),
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
