//! The examiner's handover kit of `lrvault export` (README.md, §7a). For the selected evidence it
//! copies the packages, the custody rows that concern them and every chain row from the
//! first of those up to the checkpoint that covers them, that checkpoint and its RFC 3161
//! token, the TSA's CA certificate, a stand-alone checking script and a README of checks with
//! standard tools. The kit is written into a new directory through its handle and appears at
//! `--out` only when complete ([`KitDir`]). Each exported package then gets an EXPORTED
//! custody row. From an object store (docs/operations.md §14) packages are copied out by the version their
//! ARCHIVED rows name, and the checkpoints are read from the store.

mod kit;
mod kitdir;
mod readme;

pub use kitdir::{DIR_MODE, FILE_MODE, KitDir, KitError, PACKAGE_MODE, check_rel};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::json;

use crate::anchor::LocalRoot;
use crate::config::Config;
use crate::custody::{self, Event, EventKind};
use crate::db::{Db, DbError, write_tx};
use crate::store::{Blocking, Store};

/// The selection as SQL parameters over `v_evidence`.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub evidence: Option<String>,
    pub action: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub tenant: Option<String>,
    /// Only packages whose ARCHIVED row is at or before this seq: set once the selection's
    /// extent is known, so that every later read (packages, `custody.db`, EXPORTED rows)
    /// sees the same packages while the daemon goes on archiving.
    pub archived_through: Option<i64>,
    /// Only the packages of this case (`v_case_evidence`, docs/audit.md §8).
    pub case: Option<String>,
}

impl Selection {
    /// `WHERE` clause over `v_evidence e`, with parameters ?1..?7.
    pub const FILTER: &'static str =
        "(?1 IS NULL OR e.evidence_id = ?1) AND (?2 IS NULL OR e.action_id = ?2)
         AND (?3 IS NULL OR e.action_created_at >= ?3) AND (?4 IS NULL OR e.action_created_at < ?4)
         AND (?5 IS NULL OR e.tenant = ?5)
         AND (?6 IS NULL OR EXISTS (SELECT 1 FROM custody_log c WHERE c.event = 'ARCHIVED'
                                    AND c.package_path = e.package_path AND c.seq <= ?6))
         AND (?7 IS NULL OR EXISTS (SELECT 1 FROM v_case_evidence k
                                    WHERE k.case_id = ?7 AND k.evidence_id = e.evidence_id))";

    pub fn params(&self) -> [&dyn rusqlite::ToSql; 7] {
        [
            &self.evidence,
            &self.action,
            &self.since,
            &self.until,
            &self.tenant,
            &self.archived_through,
            &self.case,
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

/// What to export, where to, and for whom.
#[derive(Debug, Clone)]
pub struct Request {
    pub selection: Selection,
    /// Where the kit goes: absolute, and nothing there yet.
    pub out: PathBuf,
    /// Who receives the kit (recorded in the EXPORTED custody rows).
    pub recipient: Option<String>,
    /// The selection as the user gave it (`--since 2026-11-01 --tenant contoso`).
    pub description: String,
}

/// A kit written.
#[derive(Debug, Clone)]
pub struct Exported {
    pub coverage: Coverage,
    /// SHA-256 of the kit's SHA256SUMS file.
    pub sums_sha256: String,
}

/// Writes the kit for `req` and records one EXPORTED row per package. `Ok(None)` when no
/// archived evidence matches the selection (nothing is written).
pub async fn export(cfg: &Config, db: &Db, req: &Request) -> anyhow::Result<Option<Exported>> {
    let store = Arc::new(Store::open(&cfg.store, &cfg.credentials)?);
    let Some((coverage, anchors)) = coverage(cfg, db, &store, &req.selection).await? else {
        return Ok(None);
    };
    // From here on the selection is the packages counted: none archived meanwhile.
    let req = &Request {
        selection: Selection {
            archived_through: Some(coverage.last_concerned_seq),
            ..req.selection.clone()
        },
        ..req.clone()
    };
    let export_id = uuid::Uuid::now_v7().to_string();
    let (written, kit) = {
        let (cfg, selection, coverage, out) = (
            cfg.clone(),
            req.selection.clone(),
            coverage.clone(),
            req.out.clone(),
        );
        let meta = kit::Meta {
            export_id: export_id.clone(),
            recipient: req.recipient.clone(),
            selection: req.description.clone(),
            case: req.selection.case.clone(),
            actor: custody::actor("*"),
        };
        let from = kit::Source {
            store: Blocking::new(store.clone()),
            anchors: anchors.path().to_path_buf(),
        };
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            // On any error the kit is dropped, which removes everything it wrote.
            let mut kit = KitDir::create(&out, &meta.export_id).map_err(user_error)?;
            let written = kit::write(&cfg, &from, &selection, &coverage, &meta, &mut kit)?;
            kit.publish().map_err(user_error)?;
            Ok((written, kit))
        })
        .await??
    };
    // Recorded only once the kit is at --out; a kit whose rows cannot be recorded is removed.
    record(cfg, db, req, &coverage, &export_id, &written).await?;
    kit.keep();
    Ok(Some(Exported {
        coverage,
        sums_sha256: written.sums_sha256,
    }))
}

/// Finds what the selection covers and the earliest checkpoint at or after its last custody
/// row. Without one (no verify since), runs `verify --chain-only`, which writes it. Also
/// returns where the checkpoints were read (a local mirror for an object store).
async fn coverage(
    cfg: &Config,
    db: &Db,
    store: &Arc<Store>,
    sel: &Selection,
) -> anyhow::Result<Option<(Coverage, LocalRoot)>> {
    let path = cfg.database.path.clone();
    let mut anchors = crate::anchor::local_root(store, &cfg.store.root).await?;
    let find = |sel: Selection, root: PathBuf| {
        let path = path.clone();
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
    let Some((packages, first_seq, last, mut found)) =
        find(sel.clone(), anchors.path().to_path_buf()).await??
    else {
        return Ok(None);
    };
    if found.is_none() {
        let scope = crate::verify::Scope {
            chain_only: true,
            ..Default::default()
        };
        let report = crate::verify::verify_with_store(cfg, db, store.clone(), &scope).await?;
        if !report.ok() {
            anyhow::bail!(
                "the custody chain does not verify ({} defects); run `lrvault verify` and resolve them before exporting",
                report.chain_defects
            );
        }
        anchors = crate::anchor::local_root(store, &cfg.store.root).await?;
        found = find(sel.clone(), anchors.path().to_path_buf())
            .await??
            .and_then(|(.., cp)| cp);
    }
    let (checkpoint, checkpoint_path, token_path) =
        found.ok_or_else(|| anyhow::anyhow!("no checkpoint covers custody seq {last}"))?;
    let coverage = Coverage {
        packages,
        first_seq,
        last_concerned_seq: last,
        checkpoint,
        checkpoint_path,
        token_path,
    };
    Ok(Some((coverage, anchors)))
}

/// `--out` already there is the user's to resolve (exit 2), in one line.
fn user_error(e: KitError) -> anyhow::Error {
    match e {
        KitError::Exists(_) => crate::error::UserError::new(e.to_string()).into(),
        e => e.into(),
    }
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
/// chain's row. Its paths are read from the database, so they are checked as store keys.
fn covering_checkpoint(conn: &Connection, root: &Path, seq: i64) -> anyhow::Result<Found> {
    let mut stmt = conn.prepare(
        "SELECT a.seq, a.checkpoint_path, a.tsr_path, c.row_hash FROM anchors a
         JOIN custody_log c ON c.seq = a.seq WHERE a.seq >= ?1 ORDER BY a.seq",
    )?;
    let mut rows = stmt.query([seq])?;
    while let Some(r) = rows.next()? {
        let (cp_seq, path, tsr, chain_hash): (i64, String, Option<String>, String) =
            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
        for p in std::iter::once(&path).chain(&tsr) {
            check_rel(p).map_err(|e| anyhow::anyhow!("anchors row seq {cp_seq}: {e}"))?;
        }
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
async fn record(
    cfg: &Config,
    db: &Db,
    req: &Request,
    coverage: &Coverage,
    export_id: &str,
    written: &kit::Written,
) -> anyhow::Result<()> {
    let sel = req.selection.clone();
    let actors: std::collections::HashMap<String, String> = cfg
        .tenants
        .iter()
        .map(|t| (t.name.clone(), custody::actor(&t.client_id)))
        .collect();
    let detail = json!({
        "export_id": export_id,
        "recipient": req.recipient,
        "out": req.out.display().to_string(),
        "selection": req.description,
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

/// The ARCHIVED row's package SHA-256 for a package path (the chain is the reference), and
/// the object version it names in an object store.
pub(crate) fn archived_package(
    conn: &Connection,
    package_path: &str,
) -> Result<(Option<String>, Option<String>), DbError> {
    conn.query_row(
        "SELECT json_extract(detail, '$.package_sha256'), json_extract(detail, '$.version_id')
         FROM custody_log WHERE event = 'ARCHIVED' AND package_path = ?1 ORDER BY seq DESC LIMIT 1",
        params![package_path],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
    .map(Option::unwrap_or_default)
    .map_err(DbError::sql("read ARCHIVED row"))
}
