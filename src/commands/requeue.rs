//! `lrvault requeue`: puts `failed` (or `unavailable`) results back to `pending`, attempts
//! reset, each with a QUEUED custody row saying who did it and why (docs/operations.md §9).
//! Says how many; exit 1, with nothing written, when no result matches.

use std::process::ExitCode;

use clap::Args as ClapArgs;
use serde_json::json;

use crate::config::ConfigFile;
use crate::db::Db;
use crate::queue::{self, Requeue};

#[derive(Debug, ClapArgs)]
#[command(group(clap::ArgGroup::new("selection").required(true).args(["evidence", "action", "state"])))]
pub struct Args {
    /// The result an evidence row names (an archived result is never re-queued: says so)
    #[arg(long, value_name = "ID")]
    pub evidence: Option<String>,
    /// The failed or unavailable results of this machine action
    #[arg(long, value_name = "ID")]
    pub action: Option<String>,
    /// Only this command of the action
    #[arg(long, value_name = "N", requires = "action")]
    pub index: Option<u32>,
    /// Every result in this state (only `failed`)
    #[arg(long, value_name = "STATE", value_parser = ["failed"])]
    pub state: Option<String>,
    /// With --state: only results that failed at or after DATE (YYYY-MM-DD, RFC 3339, 30d)
    #[arg(long, value_name = "DATE", requires = "state")]
    pub since: Option<String>,
    /// Only this tenant's results (default: every configured tenant)
    #[arg(long, value_name = "T")]
    pub tenant: Option<String>,
    /// Why, for the custody row (e.g. a ticket number)
    #[arg(long, value_name = "TEXT", default_value = "re-queued by an operator")]
    pub reason: String,
}

pub async fn run(config: &ConfigFile, args: Args) -> anyhow::Result<ExitCode> {
    let cfg = config.load()?;
    let tenants = cfg.select_tenants(args.tenant.as_deref())?;
    let actors: Vec<(String, String)> = tenants
        .iter()
        .map(|t| (t.name.clone(), crate::custody::actor(&t.client_id)))
        .collect();
    let since = args
        .since
        .as_deref()
        .map(|s| crate::time::parse_user_date(s, crate::time::now()))
        .transpose()?;
    cfg.check_writable()?;
    let db = Db::open(&cfg.database.path)?;
    let (select, what) = match (&args.evidence, &args.action) {
        (Some(id), _) => match evidence_result(&db, id).await? {
            Ok(select) => (select, format!("--evidence {id}")),
            Err(why) => return none_matched(&why),
        },
        (None, Some(action)) => (
            Requeue::Action {
                action_id: action.clone(),
                index: args.index,
            },
            match args.index {
                Some(i) => format!("--action {action} --index {i}"),
                None => format!("--action {action}"),
            },
        ),
        (None, None) => (
            Requeue::Failed { since },
            match &args.since {
                Some(s) => format!("--state failed --since {s}"),
                None => "--state failed".into(),
            },
        ),
    };
    let detail = json!({ "requeued_by": super::operator(), "reason": args.reason });
    let keys = queue::requeue(&db, actors, select, detail).await?;
    if keys.is_empty() {
        let scope = match &args.tenant {
            Some(t) => format!(" of tenant '{t}'"),
            None => String::new(),
        };
        return none_matched(&format!(
            "no failed or unavailable result{scope} matches {what}"
        ));
    }
    println!(
        "re-queued {} result{}; the next archive pass fetches {}:",
        keys.len(),
        if keys.len() == 1 { "" } else { "s" },
        if keys.len() == 1 { "it" } else { "them" }
    );
    for k in &keys {
        println!("{} {} {}", k.tenant, k.action_id, k.index);
    }
    Ok(ExitCode::SUCCESS)
}

/// Exit 1, nothing written: says why on one line.
fn none_matched(why: &str) -> anyhow::Result<ExitCode> {
    eprintln!("lrvault: {why}; nothing re-queued");
    Ok(ExitCode::from(1))
}

/// The result an evidence row names, as a selection (its command only); `Err` says why
/// there is none. An evidence row exists only for an archived result, which stays as
/// recorded: that is said, not re-queued.
async fn evidence_result(db: &Db, id: &str) -> anyhow::Result<Result<Requeue, String>> {
    let owned = id.to_string();
    let row: Option<(String, String, u32, String)> = db
        .read(move |c| {
            use rusqlite::OptionalExtension;
            c.query_row(
                "SELECT e.tenant, e.action_id, e.command_index, r.state FROM evidence e
                 JOIN results r USING (tenant, action_id, command_index) WHERE e.evidence_id = ?1",
                [owned],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(crate::db::DbError::sql("look up the evidence row"))
        })
        .await?;
    let Some((tenant, action_id, index, state)) = row else {
        return Ok(Err(format!("no evidence row has the id {id}")));
    };
    if state == "archived" {
        return Ok(Err(format!(
            "evidence {id} is the archived package of {tenant} {action_id} {index}: an archived result is never re-queued (its package and evidence row stay as recorded; verify checks them)"
        )));
    }
    Ok(Ok(Requeue::Action {
        action_id,
        index: Some(index),
    }))
}
