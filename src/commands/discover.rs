//! `lrvault discover`: one discovery pass now.

use std::process::ExitCode;

use super::{TenantArg, exit_code, setup};
use crate::config::ConfigFile;
use crate::jobs::discover;

pub async fn run(config: &ConfigFile, args: TenantArg) -> anyhow::Result<ExitCode> {
    let (ctx, tenants) = setup(config, args.tenant.as_deref())?;
    let mut ok = true;
    let results = discover::lookback_all(&ctx, &tenants).await;
    for (tenant, result) in tenants.iter().zip(results) {
        match result {
            Ok(s) => println!("{}: {s}", tenant.cfg.name),
            Err(e) => {
                ok = false;
                eprintln!(
                    "lrvault: {}: discovery failed: {}",
                    tenant.cfg.name,
                    crate::error::one_line(&e)
                );
            }
        }
    }
    Ok(exit_code(ok))
}
