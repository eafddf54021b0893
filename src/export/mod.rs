//! `lrvault export`: an examiner's handover kit (DESIGN §2, §7a). For the selected evidence it
//! copies the packages, the custody rows that concern them and every chain row from the
//! first of those up to the checkpoint that covers them, that checkpoint and its RFC 3161
//! token, the TSA's CA certificate, a stand-alone checking script and a README of checks with
//! standard tools. Each exported package gets an EXPORTED custody row.

mod kit;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::json;

use crate::config::Config;
use crate::custody::{self, Event, EventKind};
use crate::db::{Db, DbError, write_tx};
use crate::error::UserError;

/// `lrvault export` flags.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("selection").required(true).args(["evidence", "action", "since"])))]
pub struct Args {
    /// One package, by evidence id
    #[arg(long, value_name = "ID")]
    pub evidence: Option<String>,
    /// Every package of one machine action
    #[arg(long, value_name = "ID")]
    pub action: Option<String>,
    /// Packages of the actions created since DATE (YYYY-MM-DD, RFC 3339, or an age like 30d)
    #[arg(long, value_name = "DATE")]
    pub since: Option<String>,
    /// ... and before DATE (exclusive)
    #[arg(long, value_name = "DATE", requires = "since")]
    pub until: Option<String>,
    /// Only this tenant's packages
    #[arg(long, value_name = "T")]
    pub tenant: Option<String>,
    /// Where to write the kit (a new or empty directory)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Who receives the kit (recorded in the EXPORTED custody rows)
    #[arg(long, value_name = "NAME")]
    pub recipient: Option<String>,
}

/// The selection as SQL parameters over `v_evidence`.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub evidence: Option<String>,
    pub action: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub tenant: Option<String>,
}

impl Selection {
    /// `WHERE` clause over `v_evidence e`, with parameters ?1..?5.
    pub const FILTER: &'static str =
        "(?1 IS NULL OR e.evidence_id = ?1) AND (?2 IS NULL OR e.action_id = ?2)
         AND (?3 IS NULL OR e.action_created_at >= ?3) AND (?4 IS NULL OR e.action_created_at < ?4)
         AND (?5 IS NULL OR e.tenant = ?5)";

    pub fn params(&self) -> [&Option<String>; 5] {
        [
            &self.evidence,
            &self.action,
            &self.since,
            &self.until,
            &self.tenant,
        ]
    }
}

/// The covering checkpoint and the chain segment the kit carries.
#[derive(Debug, Clone)]
pub struct Coverage {
    pub packages: i64,
    /// First custody row that concerns the selection; the segment runs from it to the checkpoint.
    pub first_seq: i64,
    pub last_concerned_seq: i64,
    pub checkpoint: crate::anchor::Checkpoint,
    pub checkpoint_path: String,
    pub token_path: Option<String>,
}

pub async fn run(config: &Path, args: Args) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(config)?;
    cfg.select_tenants(args.tenant.as_deref())?;
    let now = crate::time::now();
    let date = |d: &Option<String>| {
        d.as_deref()
            .map(|d| crate::time::parse_user_date(d, now).map(crate::time::fmt))
            .transpose()
    };
    let selection = Selection {
        evidence: args.evidence.clone(),
        action: args.action.clone(),
        since: date(&args.since)?,
        until: date(&args.until)?,
        tenant: args.tenant.clone(),
    };
    check_out_dir(&args.out)?;
    let db = Db::open(&cfg.database.path)?;
    let coverage = match coverage(&cfg, &db, &selection).await? {
        Some(c) => c,
        None => {
            eprintln!("lrvault: no archived evidence matches the selection; nothing exported");
            return Ok(ExitCode::from(1));
        }
    };
    let export_id = uuid::Uuid::now_v7().to_string();
    let out = std::path::absolute(&args.out)?;
    let written = {
        let (cfg, selection, coverage, out) = (
            cfg.clone(),
            selection.clone(),
            coverage.clone(),
            out.clone(),
        );
        let meta = kit::Meta {
            export_id: export_id.clone(),
            recipient: args.recipient.clone(),
            selection: describe(&args),
            actor: custody::actor("*"),
        };
        tokio::task::spawn_blocking(move || kit::write(&cfg, &selection, &coverage, &meta, &out))
            .await??
    };
    record(
        &cfg, &db, &selection, &coverage, &export_id, &args, &out, &written,
    )
    .await?;
    println!(
        "exported {} packages to {}: custody rows {}..{} up to checkpoint {} ({}); SHA256SUMS {}",
        coverage.packages,
        out.display(),
        coverage.first_seq,
        coverage.checkpoint.seq,
        coverage.checkpoint_path,
        if coverage.token_path.is_some() {
            "with its RFC 3161 token"
        } else {
            "no token yet"
        },
        written.sums_sha256
    );
    Ok(ExitCode::SUCCESS)
}

fn describe(args: &Args) -> String {
    let mut parts = Vec::new();
    for (flag, value) in [
        ("--evidence", &args.evidence),
        ("--action", &args.action),
        ("--since", &args.since),
        ("--until", &args.until),
        ("--tenant", &args.tenant),
    ] {
        if let Some(v) = value {
            parts.push(format!("{flag} {v}"));
        }
    }
    parts.join(" ")
}

/// The kit goes into a new directory, or an empty one; nothing is ever overwritten.
fn check_out_dir(out: &Path) -> Result<(), UserError> {
    match std::fs::read_dir(out).map(|mut entries| entries.next().is_none()) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(UserError::new(format!("--out {}: {e}", out.display()))),
        Ok(true) => Ok(()),
        Ok(false) => Err(UserError::new(format!(
            "--out {} is not empty; an export goes into a new or empty directory",
            out.display()
        ))),
    }
}

/// Finds what the selection covers and the earliest checkpoint at or after its last custody
/// row. Without one (no verify since), runs `verify --chain-only`, which writes it.
async fn coverage(cfg: &Config, db: &Db, sel: &Selection) -> anyhow::Result<Option<Coverage>> {
    let path = cfg.database.path.clone();
    let find = |sel: Selection| {
        let path = path.clone();
        let root = cfg.store.root.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let conn = Db::open_readonly(&path)?;
            let Some((packages, first, last)) = concerned(&conn, &sel)? else {
                return Ok(None);
            };
            Ok(Some((
                packages,
                first,
                last,
                covering_checkpoint(&conn, &root, last)?,
            )))
        })
    };
    let Some((packages, first_seq, last, mut found)) = find(sel.clone()).await?? else {
        return Ok(None);
    };
    if found.is_none() {
        let scope = crate::verify::Scope {
            chain_only: true,
            ..Default::default()
        };
        let report = crate::verify::verify_scope(cfg, db, &scope).await?;
        if !report.ok() {
            anyhow::bail!(
                "the custody chain does not verify ({} defects); run `lrvault verify` and resolve them before exporting",
                report.chain_defects
            );
        }
        found = find(sel.clone()).await??.and_then(|(.., cp)| cp);
    }
    let (checkpoint, checkpoint_path, token_path) =
        found.ok_or_else(|| anyhow::anyhow!("no checkpoint covers custody seq {last}"))?;
    Ok(Some(Coverage {
        packages,
        first_seq,
        last_concerned_seq: last,
        checkpoint,
        checkpoint_path,
        token_path,
    }))
}

/// (packages, first concerned seq, last concerned seq) of the selection.
fn concerned(conn: &Connection, sel: &Selection) -> Result<Option<(i64, i64, i64)>, DbError> {
    let sql = format!(
        "WITH sel AS (SELECT e.tenant, e.action_id, e.command_index FROM v_evidence e WHERE {})
         SELECT (SELECT count(*) FROM sel), min(c.seq), max(c.seq)
         FROM sel JOIN custody_log c ON c.tenant = sel.tenant AND c.action_id = sel.action_id
              AND (c.command_index = sel.command_index OR c.command_index IS NULL)",
        Selection::FILTER
    );
    let (packages, first, last): (i64, Option<i64>, Option<i64>) = conn
        .query_row(&sql, rusqlite::params_from_iter(sel.params()), |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .map_err(DbError::sql("select evidence to export"))?;
    Ok(match (packages, first, last) {
        (n, Some(first), Some(last)) if n > 0 => Some((n, first, last)),
        _ => None,
    })
}

type Found = Option<(crate::anchor::Checkpoint, String, Option<String>)>;

/// The earliest recorded checkpoint at or after `seq` whose file is there and pins the
/// chain's row.
fn covering_checkpoint(conn: &Connection, root: &Path, seq: i64) -> anyhow::Result<Found> {
    let mut stmt = conn.prepare(
        "SELECT a.seq, a.checkpoint_path, a.tsr_path, c.row_hash FROM anchors a
         JOIN custody_log c ON c.seq = a.seq WHERE a.seq >= ?1 ORDER BY a.seq",
    )?;
    let mut rows = stmt.query([seq])?;
    while let Some(r) = rows.next()? {
        let (path, tsr, chain_hash): (String, Option<String>, String) =
            (r.get(1)?, r.get(2)?, r.get(3)?);
        let Ok(bytes) = crate::anchor::read_bytes(&root.join(&path)) else {
            continue;
        };
        match crate::anchor::Checkpoint::parse(&bytes) {
            Ok(cp) if cp.row_hash == chain_hash => {
                let tsr = tsr.filter(|t| root.join(t).exists());
                return Ok(Some((cp, path, tsr)));
            }
            _ => continue,
        }
    }
    Ok(None)
}

/// One EXPORTED row per exported package, in one transaction.
#[allow(clippy::too_many_arguments)]
async fn record(
    cfg: &Config,
    db: &Db,
    sel: &Selection,
    coverage: &Coverage,
    export_id: &str,
    args: &Args,
    out: &Path,
    written: &kit::Written,
) -> anyhow::Result<()> {
    let sel = sel.clone();
    let actors: std::collections::HashMap<String, String> = cfg
        .tenants
        .iter()
        .map(|t| (t.name.clone(), custody::actor(&t.client_id)))
        .collect();
    let detail = json!({
        "export_id": export_id,
        "recipient": args.recipient,
        "out": out.display().to_string(),
        "selection": describe(args),
        "packages": coverage.packages,
        "checkpoint_seq": coverage.checkpoint.seq,
        "custody_rows": [coverage.first_seq, coverage.checkpoint.seq],
        "sha256sums": written.sums_sha256,
    });
    db.call(move |c| {
        let tx = write_tx(c)?;
        let rows: Vec<(String, String, String, u32, String, String)> = {
            let mut stmt = tx
                .prepare(&format!(
                    "SELECT e.evidence_id, e.tenant, e.action_id, e.command_index, e.payload_sha256, e.package_path
                     FROM v_evidence e WHERE {} ORDER BY e.package_path",
                    Selection::FILTER
                ))
                .map_err(DbError::sql("select exported evidence"))?;
            stmt.query_map(rusqlite::params_from_iter(sel.params()), |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })
            .map_err(DbError::sql("select exported evidence"))?
            .collect::<Result<_, _>>()
            .map_err(DbError::sql("select exported evidence"))?
        };
        for (evidence_id, tenant, action_id, index, sha, path) in rows {
            let mut detail = detail.clone();
            detail["evidence_id"] = json!(evidence_id);
            let actor = actors.get(&tenant).cloned().unwrap_or_else(|| custody::actor("*"));
            custody::append(
                &tx,
                &Event {
                    evidence_sha256: Some(&sha),
                    package_path: Some(&path),
                    ..Event::new(&tenant, &action_id, Some(index), EventKind::Exported, &actor).detail(detail)
                },
            )?;
        }
        tx.commit().map_err(DbError::sql("commit export"))
    })
    .await?;
    Ok(())
}

/// The ARCHIVED row's package SHA-256 for a package path (the chain is the reference).
pub(crate) fn archived_package_sha256(
    conn: &Connection,
    package_path: &str,
) -> Result<Option<String>, DbError> {
    conn.query_row(
        "SELECT json_extract(detail, '$.package_sha256') FROM custody_log
         WHERE event = 'ARCHIVED' AND package_path = ?1 ORDER BY seq DESC LIMIT 1",
        params![package_path],
        |r| r.get(0),
    )
    .optional()
    .map(Option::flatten)
    .map_err(DbError::sql("read ARCHIVED row"))
}
