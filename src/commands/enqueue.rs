//! `lrvault enqueue`: fetch the given machine actions (Get MachineAction) and queue their
//! commands (an investigation package's one result).

use std::process::ExitCode;

use clap::Args as ClapArgs;

use super::{TenantArg, exit_code, setup};
use crate::config::ConfigFile;
use crate::error::UserError;
use crate::jobs::discover;

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub tenant: TenantArg,
    /// Machine action ids, or - to read ids (one per line) from stdin
    #[arg(required = true, value_name = "ACTION_ID")]
    pub ids: Vec<String>,
}

pub async fn run(config: &ConfigFile, args: Args) -> anyhow::Result<ExitCode> {
    let (ctx, tenants) = setup(config, args.tenant.tenant.as_deref())?;
    let [tenant] = tenants.as_slice() else {
        return Err(
            UserError::new("enqueue needs --tenant when several tenants are configured").into(),
        );
    };
    let ids: Vec<String> = if args.ids == ["-"] {
        std::io::read_to_string(std::io::stdin())?
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    } else {
        args.ids
    };
    let mut ok = true;
    for id in ids {
        let action = match tenant.client.get_action(&id).await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("lrvault: action {id}: {e}");
                ok = false;
                continue;
            }
        };
        if let Some(kind) = action
            .action_type()
            .filter(|k| !tenant.cfg.collect.iter().any(|c| c == k))
        {
            eprintln!(
                "lrvault: action {id} has type {kind}; tenant '{}' collects {}",
                tenant.cfg.name,
                tenant.cfg.collect.join(", ")
            );
            ok = false;
            continue;
        }
        let status = action.status().unwrap_or("unknown").to_string();
        if !ctx.cfg.discovery.statuses.contains(&status) {
            eprintln!(
                "lrvault: action {id} is {status}, not finished; discovery will queue it once it is"
            );
            ok = false;
            continue;
        }
        let s =
            discover::record_actions(&ctx, tenant, vec![action], discover::Source::Enqueue).await?;
        if s.known > 0 {
            println!("{id}: already queued");
        } else {
            println!("{id}: {} results queued, {} skipped", s.queued, s.skipped);
        }
    }
    Ok(exit_code(ok))
}
