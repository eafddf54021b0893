//! Writing an export kit into a [`KitDir`]: packages (each checked against its ARCHIVED row
//! while it is copied), `custody.db` (the chain segment, the evidence rows, the checkpoint's
//! `anchors` row), the checkpoint and its token, the TSA's CA for reference,
//! `check_custody.py`, the README and `SHA256SUMS`. Runs on a blocking thread; an object store
//! is reached through [`Blocking`]. Whatever SQLite or the object store write by path
//! (`custody.db`, a downloaded package) is made in a private temporary directory beside the
//! database and copied into the kit through its handle.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, params};
use sha2::{Digest, Sha256};

use super::kitdir::{FILE_MODE, KitDir, PACKAGE_MODE, check_rel, open_beneath};
use super::{Coverage, Selection};
use crate::anchor::TokenInfo;
use crate::config::Config;
use crate::db::Db;
use crate::store::Blocking;

const CHECK_SCRIPT: &str = include_str!("check_custody.py");
/// Largest checkpoint, token or CA file copied into a kit.
const MAX_ANCHOR_BYTES: u64 = 1 << 20;

/// Who made the kit, for whom, and of what.
pub struct Meta {
    pub export_id: String,
    pub recipient: Option<String>,
    pub selection: String,
    /// The case the kit was made for (`export --case`).
    pub case: Option<String>,
    pub actor: String,
}

/// Where the packages and checkpoints are read.
pub struct Source {
    pub store: Blocking,
    /// A directory whose `_checkpoints/` holds the anchor files (`store.root`, or a mirror).
    pub anchors: PathBuf,
}

/// What was written.
pub struct Written {
    /// SHA-256 of the SHA256SUMS file: printed, and recorded in the EXPORTED custody rows of
    /// the live database (which come after the kit's segment, so the kit cannot hold them).
    pub sums_sha256: String,
}

pub fn write(
    cfg: &Config,
    from: &Source,
    sel: &Selection,
    coverage: &Coverage,
    meta: &Meta,
    kit: &mut KitDir,
) -> anyhow::Result<Written> {
    let db_dir = cfg.database.path.parent().unwrap_or_else(|| Path::new("."));
    let private = tempfile::Builder::new()
        .prefix(".lrvault-export-")
        .tempdir_in(db_dir)
        .map_err(|e| {
            anyhow::anyhow!(
                "creating a temporary directory in {}: {e}",
                db_dir.display()
            )
        })?;
    let conn = Db::open_readonly(&cfg.database.path)?;
    copy_packages(
        &conn,
        &cfg.store.root,
        &from.store,
        sel,
        kit,
        private.path(),
    )?;
    let db_tmp = private.path().join("custody.db");
    write_custody_db(cfg, sel, coverage, meta, &db_tmp)?;
    kit.copy_from("custody.db", &mut File::open(&db_tmp)?, FILE_MODE)?;
    let token = copy_anchors(cfg, &from.anchors, coverage, kit)?;
    kit.write("check_custody.py", CHECK_SCRIPT.as_bytes(), FILE_MODE)?;
    let text = super::readme::readme(meta, coverage, token.as_ref());
    kit.write("README.md", text.as_bytes(), FILE_MODE)?;
    let sums: String = kit
        .sums()
        .iter()
        .map(|(path, sha)| format!("{sha}  {path}\n"))
        .collect();
    kit.write("SHA256SUMS", sums.as_bytes(), FILE_MODE)?;
    Ok(Written {
        sums_sha256: hex::encode(Sha256::digest(sums.as_bytes())),
    })
}

/// Copies each selected package, hashing it on the way: it must be the package its ARCHIVED
/// row records, or the export stops (run verify). Every path read from the database is
/// checked first, as the store checks its keys; a bad one names its evidence id. From an
/// object store, the copy is of the version the ARCHIVED row names.
fn copy_packages(
    conn: &Connection,
    root: &Path,
    store: &Blocking,
    sel: &Selection,
    kit: &mut KitDir,
    private: &Path,
) -> anyhow::Result<()> {
    let mut stmt = conn.prepare(&format!(
        "SELECT e.evidence_id, e.package_path, e.package_sha256
         FROM v_evidence e WHERE {} ORDER BY e.package_path",
        Selection::FILTER
    ))?;
    let mut rows = stmt.query(rusqlite::params_from_iter(sel.params()))?;
    let mut n = 0;
    while let Some(r) = rows.next()? {
        let (evidence_id, path, recorded): (String, String, String) =
            (r.get(0)?, r.get(1)?, r.get(2)?);
        check_rel(&evidence_id)
            .and_then(|()| check_rel(&path))
            .map_err(|e| {
                anyhow::anyhow!(
                    "evidence {evidence_id}: {e}; nothing exported — run `lrvault verify`"
                )
            })?;
        let (archived, version) = super::archived_package(conn, &path)?;
        let dest = format!("packages/{path}");
        n += 1;
        let tmp = private.join(format!("{n}.zip"));
        let copied = copy_package(root, store, &path, version.as_deref(), kit, &dest, &tmp)
            .map_err(|e| anyhow::anyhow!("evidence {evidence_id}: {e}"))?;
        if archived.as_deref() != Some(copied.as_str()) || recorded != copied {
            anyhow::bail!(
                "package {path} (evidence {evidence_id}) hashes to {copied}, its ARCHIVED row says {}; nothing of it is handed over — run `lrvault verify`",
                archived.unwrap_or_else(|| "nothing".into())
            );
        }
    }
    Ok(())
}

/// Copies one package into the kit at `dest`; returns its SHA-256. From `fs`, read through
/// handles (no symlink in the store followed); from an object store, downloaded into the
/// private directory first (the store's client writes by path).
fn copy_package(
    root: &Path,
    store: &Blocking,
    key: &str,
    version: Option<&str>,
    kit: &mut KitDir,
    dest: &str,
    tmp: &Path,
) -> anyhow::Result<String> {
    if !store.store().is_object() {
        return Ok(kit.copy_from(dest, &mut open_beneath(root, key)?, PACKAGE_MODE)?);
    }
    let s = store.store();
    store.wait(s.download_to(key, version, tmp))?;
    let copied = kit.copy_from(dest, &mut File::open(tmp)?, PACKAGE_MODE)?;
    std::fs::remove_file(tmp)?;
    Ok(copied)
}

/// `custody.db` at `path` (a private temporary file): the chain segment, the evidence rows
/// (as `v_evidence` shows them, plus `original_size`), the checkpoint's `anchors` row (the
/// columns of lrvault's `anchors`, paths relative to the kit), and the export's own facts.
/// Copied by SQLite itself from the attached database, so memory stays flat whatever the size.
fn write_custody_db(
    cfg: &Config,
    sel: &Selection,
    coverage: &Coverage,
    meta: &Meta,
    path: &Path,
) -> anyhow::Result<()> {
    let mut kit = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NOFOLLOW,
    )?;
    let source = url::Url::from_file_path(&cfg.database.path).map_err(|_| {
        anyhow::anyhow!(
            "database path {} is not absolute",
            cfg.database.path.display()
        )
    })?;
    kit.execute("ATTACH DATABASE ?1 AS src", [format!("{source}?mode=ro")])?;
    let tx = kit.transaction()?;
    tx.execute_batch(
        "CREATE TABLE custody_log AS SELECT * FROM src.custody_log WHERE 0;
         CREATE TABLE evidence AS SELECT e.*, ev.original_size FROM src.v_evidence e
             JOIN src.evidence ev ON ev.evidence_id = e.evidence_id WHERE 0;
         CREATE TABLE anchors (seq INTEGER PRIMARY KEY, row_hash TEXT NOT NULL, checkpoint_path TEXT NOT NULL,
                               tsa_url TEXT, tsr_path TEXT, gen_time TEXT, created_at TEXT);
         CREATE TABLE export (key TEXT PRIMARY KEY, value TEXT);",
    )?;
    tx.execute(
        "INSERT INTO custody_log SELECT * FROM src.custody_log WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq",
        params![coverage.first_seq, coverage.checkpoint.seq],
    )?;
    // The filter's custody_log is the source's, as everywhere else.
    let filter = Selection::FILTER
        .replace("FROM custody_log", "FROM src.custody_log")
        .replace("FROM v_case_evidence", "FROM src.v_case_evidence");
    tx.execute(
        &format!(
            "INSERT INTO evidence SELECT e.*, ev.original_size FROM src.v_evidence e
             JOIN src.evidence ev ON ev.evidence_id = e.evidence_id WHERE {filter} ORDER BY e.package_path"
        ),
        rusqlite::params_from_iter(sel.params()),
    )?;
    let seq = coverage.checkpoint.seq;
    let token = coverage
        .token_path
        .as_ref()
        .map(|_| kit_anchor(&crate::anchor::token_file_name(seq)));
    tx.execute(
        "INSERT INTO anchors (seq, row_hash, checkpoint_path, tsa_url, tsr_path, gen_time, created_at)
         SELECT ?1, ?2, ?3, CASE WHEN ?4 IS NULL THEN NULL ELSE tsa_url END, ?4,
                CASE WHEN ?4 IS NULL THEN NULL ELSE gen_time END, created_at
         FROM src.anchors WHERE seq = ?1",
        params![
            seq,
            coverage.checkpoint.row_hash,
            kit_anchor(&crate::anchor::checkpoint_file_name(seq)),
            token,
        ],
    )?;
    for (key, value) in [
        ("export_id", Some(meta.export_id.clone())),
        ("created_at", Some(crate::time::now_str())),
        ("actor", Some(meta.actor.clone())),
        ("recipient", meta.recipient.clone()),
        ("selection", Some(meta.selection.clone())),
        ("case", meta.case.clone()),
    ] {
        tx.execute(
            "INSERT INTO export (key, value) VALUES (?1, ?2)",
            params![key, value],
        )?;
    }
    tx.commit()?;
    kit.execute("DETACH DATABASE src", [])?;
    Ok(())
}

/// Where an anchor file goes in the kit: `checkpoints/{name}`.
pub(super) fn kit_anchor(name: &str) -> String {
    format!("checkpoints/{name}")
}

/// Reads a small file `rel` under `root` through handles (no symlink followed).
fn read_small(root: &Path, rel: &str) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_beneath(root, rel)?
        .take(MAX_ANCHOR_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_ANCHOR_BYTES {
        anyhow::bail!("{rel} is larger than {MAX_ANCHOR_BYTES} bytes");
    }
    Ok(bytes)
}

/// Copies the checkpoint, its token (checked first) and the TSA's CA into the kit.
fn copy_anchors(
    cfg: &Config,
    root: &Path,
    coverage: &Coverage,
    kit: &mut KitDir,
) -> anyhow::Result<Option<TokenInfo>> {
    let seq = coverage.checkpoint.seq;
    let bytes = read_small(root, &coverage.checkpoint_path)?;
    kit.write(
        &kit_anchor(&crate::anchor::checkpoint_file_name(seq)),
        &bytes,
        FILE_MODE,
    )?;
    if let Some(ca) = cfg.anchor.tsa_ca_file() {
        let mut pem = Vec::new();
        File::open(ca)?
            .take(MAX_ANCHOR_BYTES)
            .read_to_end(&mut pem)?;
        kit.write("tsa-ca.pem", &pem, FILE_MODE)?;
    }
    let Some(tsr) = &coverage.token_path else {
        return Ok(None);
    };
    let token = read_small(root, tsr)?;
    let trust = cfg
        .anchor
        .tsa_ca_file()
        .map(crate::anchor::TrustAnchors::load)
        .transpose()?;
    let info = crate::anchor::verify_token(&token, &bytes, trust.as_ref()).map_err(|e| {
        anyhow::anyhow!(
            "the token of {} does not verify: {e}",
            coverage.checkpoint_path
        )
    })?;
    kit.write(
        &kit_anchor(&crate::anchor::token_file_name(seq)),
        &token,
        FILE_MODE,
    )?;
    Ok(Some(info))
}
