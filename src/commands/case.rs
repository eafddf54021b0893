//! `lrvault case`: evidence grouped by incident (docs/operations.md §17, see [`crate::cases`]).
//! `list` and `show` read the case views of docs/audit.md §8; `tag` and `untag` write
//! CASE_TAGGED / CASE_UNTAGGED rows with the operator's identity (unknown ids: exit 1, nothing
//! written); `hold` and `release` set or lift the case's legal hold.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::json;

use crate::cases::{self, Marker};
use crate::config::ConfigFile;
use crate::db::{Db, DbError, write_tx};
use crate::error::UserError;
use crate::render::{Format, Rows, json_text};

#[derive(Debug, Subcommand)]
pub enum CaseCommand {
    /// Every case: its packages, bytes, devices, time span, legal hold and last verify
    List {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// One case: its summary and every package in it
    Show {
        case: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Add actions or packages to a case (custody CASE_TAGGED)
    Tag(Marks),
    /// Remove actions or packages from a case (custody CASE_UNTAGGED)
    Untag(Marks),
    /// Put a legal hold on the case's objects (S3 Object Lock; recorded only on fs and azure)
    Hold { case: String },
    /// Lift the case's legal hold (the retention period still applies)
    Release { case: String },
}

/// `CASE (--action ID | --evidence ID)... [--note TEXT]`
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("targets").required(true).multiple(true).args(["actions", "evidence"])))]
pub struct Marks {
    case: String,
    /// A machine action (every package it has or will have)
    #[arg(long = "action", value_name = "ID")]
    actions: Vec<String>,
    /// One package, by evidence id
    #[arg(long = "evidence", value_name = "ID")]
    evidence: Vec<String>,
    /// Why (recorded in the custody rows)
    #[arg(long, value_name = "TEXT")]
    note: Option<String>,
}

pub async fn run(config: &ConfigFile, cmd: CaseCommand) -> anyhow::Result<ExitCode> {
    let cfg = config.load()?;
    match cmd {
        CaseCommand::List { format } => {
            let conn = Db::open_for_reading(&cfg.database.path, &config.path)?;
            let rows = Rows::query(&conn, "SELECT * FROM v_cases ORDER BY case_id", &[])
                .map_err(DbError::sql("case list"))?;
            print!("{}", rows.render(format));
            Ok(ExitCode::SUCCESS)
        }
        CaseCommand::Show { case, format } => {
            let conn = Db::open_for_reading(&cfg.database.path, &config.path)?;
            let store = crate::store::Store::open(&cfg.store, &cfg.credentials)?;
            show(&conn, &case_arg(&case)?, &store, format)
        }
        CaseCommand::Tag(marks) => change(&cfg, config, marks, true).await,
        CaseCommand::Untag(marks) => change(&cfg, config, marks, false).await,
        CaseCommand::Hold { case } => hold(&cfg, config, &case_arg(&case)?, true).await,
        CaseCommand::Release { case } => hold(&cfg, config, &case_arg(&case)?, false).await,
    }
}

/// A case id as given, checked and normalised like the ones `case_pattern` finds.
fn case_arg(text: &str) -> Result<String, UserError> {
    crate::config::case_id(text).ok_or_else(|| {
        UserError::new(format!(
            "case {text:?} is not a case id (1 to {} characters, no control characters)",
            crate::config::MAX_CASE_ID
        ))
    })
}

fn show(
    conn: &rusqlite::Connection,
    case: &str,
    store: &crate::store::Store,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let summary = Rows::query(conn, "SELECT * FROM v_cases WHERE case_id = ?1", &[&case])
        .map_err(DbError::sql("case show"))?;
    if summary.rows.is_empty() {
        eprintln!("lrvault: no case {case} (`lrvault case list` shows the cases)");
        return Ok(ExitCode::from(1));
    }
    let packages = Rows::query(
        conn,
        "SELECT * FROM v_case_evidence WHERE case_id = ?1 ORDER BY action_created_at, action_id, command_index",
        &[&case],
    )
    .map_err(DbError::sql("case show"))?;
    let held: bool = conn
        .query_row(
            "SELECT coalesce((SELECT held FROM v_case_holds WHERE case_id = ?1), 0)",
            [case],
            |r| r.get(0),
        )
        .map_err(DbError::sql("case show"))?;
    let hold = hold_line(held, store);
    match format {
        Format::Json => {
            let doc = json!({
                "case": summary.to_json()[0],
                "legal_hold": { "held": held, "enforced_by_store": store.enforces_legal_hold(), "note": hold },
                "packages": packages.to_json(),
            });
            println!("{}", json_text(&doc));
        }
        // CSV is one table: the packages, each row naming its case.
        Format::Csv => print!("{}", packages.render(Format::Csv)),
        Format::Table => {
            print!("{}", summary.render(Format::Table));
            println!("\nlegal hold: {hold}\n");
            print!("{}", packages.render(Format::Table));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `case show` says of the hold, plainly when the store does not enforce it.
fn hold_line(held: bool, store: &crate::store::Store) -> String {
    match (held, store.enforces_legal_hold()) {
        (false, _) => "none".into(),
        (true, true) => format!(
            "held: S3 Object Lock legal hold on every version of the case's objects in {}",
            store.describe()
        ),
        (true, false) => format!(
            "recorded, NOT enforced: the store {} has no legal hold; only the custody log records it",
            store.describe()
        ),
    }
}

/// `case tag` / `case untag`: every id resolved first (an unknown one writes nothing), then
/// one row per target whose membership changes, all in one transaction.
async fn change(
    cfg: &crate::config::Config,
    config: &ConfigFile,
    marks: Marks,
    tagged: bool,
) -> anyhow::Result<ExitCode> {
    let case = case_arg(&marks.case)?;
    let db = super::open_db(cfg, config)?;
    let actors: std::collections::HashMap<String, String> = cfg
        .tenants
        .iter()
        .map(|t| (t.name.clone(), crate::custody::actor(&t.client_id)))
        .collect();
    let by = super::operator();
    let (case_in, note) = (case.clone(), marks.note.clone());
    let outcome = db
        .call(move |c| {
            let tx = write_tx(c)?;
            let targets = match cases::resolve(&tx, &marks.actions, &marks.evidence)? {
                Ok(t) => t,
                Err(unknown) => return Ok(Err(unknown)),
            };
            let (mut changed, mut unchanged) = (Vec::new(), Vec::new());
            for target in targets {
                if !cases::would_change(&tx, &case_in, &target, tagged)? {
                    unchanged.push(target.describe());
                    continue;
                }
                let actor = actors
                    .get(target.tenant())
                    .cloned()
                    .unwrap_or_else(|| crate::custody::actor("*"));
                let who = Marker {
                    note: note.as_deref(),
                    by: &by,
                    actor: &actor,
                };
                let seq = cases::mark(&tx, &case_in, &target, tagged, &who)?;
                changed.push(format!("{} (seq {seq})", target.describe()));
            }
            tx.commit().map_err(DbError::sql("commit case marks"))?;
            Ok(Ok((changed, unchanged)))
        })
        .await?;
    let verb = if tagged { "tagged" } else { "untagged" };
    match outcome {
        Err(unknown) => {
            eprintln!("lrvault: case {case}: unknown {unknown}; nothing written");
            Ok(ExitCode::from(1))
        }
        Ok((changed, unchanged)) => {
            let mut line = format!("case {case}: {} {verb}", changed.len());
            if !changed.is_empty() {
                line += &format!(" ({})", changed.join(", "));
            }
            if !unchanged.is_empty() {
                let state = if tagged { "already in" } else { "not in" };
                line += &format!(
                    "; {} {state} the case ({})",
                    unchanged.len(),
                    unchanged.join(", ")
                );
            }
            println!("{line}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `case hold` / `case release`.
async fn hold(
    cfg: &crate::config::Config,
    config: &ConfigFile,
    case: &str,
    on: bool,
) -> anyhow::Result<ExitCode> {
    let db = super::open_db(cfg, config)?;
    let store = crate::store::Store::open(&cfg.store, &cfg.credentials)?;
    let actor = crate::custody::actor("*");
    let by = super::operator();
    let change = cases::hold::Change {
        case,
        on,
        by: &by,
        actor: &actor,
    };
    let applied = match cases::hold::apply(&db, &store, change).await {
        Ok(applied) => applied,
        Err(e) => {
            eprintln!("lrvault: case {case}: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let versions: usize = applied.objects.values().map(Vec::len).sum();
    let rows: Vec<String> = applied.rows.iter().map(i64::to_string).collect();
    let what = if on {
        "LEGAL_HOLD_SET"
    } else {
        "LEGAL_HOLD_RELEASED"
    };
    if applied.enforced {
        println!(
            "case {case}: legal hold {} on {versions} versions of {} objects in {}; recorded as {what} seq {}",
            if on { "set" } else { "released" },
            applied.objects.len(),
            store.describe(),
            rows.join(", ")
        );
    } else {
        println!(
            "case {case}: legal hold {} for {} objects, recorded as {what} seq {}; NOT enforced: the store {} has no legal hold",
            if on { "recorded" } else { "release recorded" },
            applied.objects.len(),
            rows.join(", "),
            store.describe()
        );
    }
    Ok(ExitCode::SUCCESS)
}
