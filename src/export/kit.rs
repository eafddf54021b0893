//! Writing an export kit: packages (each checked against its ARCHIVED row while it is
//! copied), `custody.db` (the chain segment, the evidence rows, the checkpoint), the
//! checkpoint and its token, the TSA's CA, `check_custody.py`, the README and `SHA256SUMS`.
//! Runs on a blocking thread; an object store is reached through [`Blocking`].

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, params};
use sha2::{Digest, Sha256};

use super::{Coverage, Selection};
use crate::anchor::TokenInfo;
use crate::config::Config;
use crate::db::Db;
use crate::store::Blocking;

const CHECK_SCRIPT: &str = include_str!("check_custody.py");

/// Who made the kit, for whom, and of what.
pub struct Meta {
    pub export_id: String,
    pub recipient: Option<String>,
    pub selection: String,
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
    /// SHA-256 of the SHA256SUMS file: recorded in custody, it pins every file of the kit.
    pub sums_sha256: String,
}

/// The first package, for the README's step-by-step example.
struct Example {
    evidence_id: String,
    package_path: String,
    bag: String,
}

pub fn write(
    cfg: &Config,
    from: &Source,
    sel: &Selection,
    coverage: &Coverage,
    meta: &Meta,
    out: &Path,
) -> anyhow::Result<Written> {
    fs::create_dir_all(out.join("packages"))?;
    let conn = Db::open_readonly(&cfg.database.path)?;
    let example = copy_packages(&conn, &cfg.store.root, &from.store, sel, out)?;
    write_custody_db(cfg, sel, coverage, meta, out)?;
    let token = copy_anchors(cfg, &from.anchors, coverage, out)?;
    fs::write(out.join("check_custody.py"), CHECK_SCRIPT)?;
    let has_ca = cfg.anchor.tsa_ca_file().is_some();
    fs::write(
        out.join("README.md"),
        readme(meta, coverage, token.as_ref(), example.as_ref(), has_ca),
    )?;
    let sums = sha256sums(out)?;
    fs::write(out.join("SHA256SUMS"), &sums)?;
    Ok(Written {
        sums_sha256: hex::encode(Sha256::digest(sums.as_bytes())),
    })
}

/// Copies each selected package, hashing it on the way: it must be the package its ARCHIVED
/// row records, or the export stops (run verify). From an object store, the copy is of the
/// version the ARCHIVED row names.
fn copy_packages(
    conn: &Connection,
    root: &Path,
    store: &Blocking,
    sel: &Selection,
    out: &Path,
) -> anyhow::Result<Option<Example>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT e.evidence_id, e.package_path, e.package_sha256, e.action_id, e.command_index
         FROM v_evidence e WHERE {} ORDER BY e.package_path",
        Selection::FILTER
    ))?;
    let mut rows = stmt.query(rusqlite::params_from_iter(sel.params()))?;
    let mut example = None;
    while let Some(r) = rows.next()? {
        let (evidence_id, path, recorded): (String, String, String) =
            (r.get(0)?, r.get(1)?, r.get(2)?);
        let (archived, version) = super::archived_package(conn, &path)?;
        let dest = out.join("packages").join(&path);
        fs::create_dir_all(dest.parent().unwrap_or(out))?;
        let copied = if store.store().is_object() {
            let s = store.store();
            store
                .wait(s.download_to(&path, version.as_deref(), &dest))?
                .0
        } else {
            copy_hashed(&root.join(&path), &dest)?
        };
        if archived.as_deref() != Some(copied.as_str()) || recorded != copied {
            anyhow::bail!(
                "package {path} (evidence {evidence_id}) hashes to {copied}, its ARCHIVED row says {}; nothing of it is handed over — run `lrvault verify`",
                archived.unwrap_or_else(|| "nothing".into())
            );
        }
        if example.is_none() {
            let (action_id, index): (String, i64) = (r.get(3)?, r.get(4)?);
            example = Some(Example {
                evidence_id,
                package_path: path,
                bag: format!("{}-{index:03}", crate::package::path_component(&action_id)),
            });
        }
    }
    Ok(example)
}

fn copy_hashed(from: &Path, to: &Path) -> io::Result<String> {
    let mut src = File::open(from)?;
    let mut dst = File::options().write(true).create_new(true).open(to)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n])?;
    }
    dst.sync_all()?;
    Ok(hex::encode(hasher.finalize()))
}

/// `custody.db`: the chain segment, the evidence rows (as `v_evidence` shows them), the
/// checkpoint, and the export's own facts. Copied by SQLite itself from the attached
/// database, so memory stays flat whatever the size.
fn write_custody_db(
    cfg: &Config,
    sel: &Selection,
    coverage: &Coverage,
    meta: &Meta,
    out: &Path,
) -> anyhow::Result<()> {
    let mut kit = Connection::open_with_flags(
        out.join("custody.db"),
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_URI,
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
         CREATE TABLE evidence AS SELECT * FROM src.v_evidence WHERE 0;
         CREATE TABLE checkpoints (seq INTEGER PRIMARY KEY, row_hash TEXT NOT NULL, file TEXT NOT NULL,
                                   token TEXT, gen_time TEXT);
         CREATE TABLE export (key TEXT PRIMARY KEY, value TEXT);",
    )?;
    tx.execute(
        "INSERT INTO custody_log SELECT * FROM src.custody_log WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq",
        params![coverage.first_seq, coverage.checkpoint.seq],
    )?;
    tx.execute(
        &format!(
            "INSERT INTO evidence SELECT * FROM src.v_evidence e WHERE {} ORDER BY e.package_path",
            Selection::FILTER
        ),
        rusqlite::params_from_iter(sel.params()),
    )?;
    let file = |name: &str| format!("checkpoints/{name}");
    tx.execute(
        "INSERT INTO checkpoints (seq, row_hash, file, token, gen_time)
         VALUES (?1, ?2, ?3, ?4, (SELECT gen_time FROM src.anchors WHERE seq = ?1))",
        params![
            coverage.checkpoint.seq,
            coverage.checkpoint.row_hash,
            file(&crate::anchor::checkpoint_file_name(
                coverage.checkpoint.seq
            )),
            coverage
                .token_path
                .as_ref()
                .map(|_| file(&crate::anchor::token_file_name(coverage.checkpoint.seq))),
        ],
    )?;
    for (key, value) in [
        ("export_id", Some(meta.export_id.clone())),
        ("created_at", Some(crate::time::now_str())),
        ("actor", Some(meta.actor.clone())),
        ("recipient", meta.recipient.clone()),
        ("selection", Some(meta.selection.clone())),
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

/// Copies the checkpoint, its token (checked first) and the TSA's CA into the kit.
fn copy_anchors(
    cfg: &Config,
    root: &Path,
    coverage: &Coverage,
    out: &Path,
) -> anyhow::Result<Option<TokenInfo>> {
    let dir = out.join("checkpoints");
    fs::create_dir_all(&dir)?;
    let json = root.join(&coverage.checkpoint_path);
    let bytes = crate::anchor::read_bytes(&json)?;
    fs::write(
        dir.join(crate::anchor::checkpoint_file_name(coverage.checkpoint.seq)),
        &bytes,
    )?;
    if let Some(ca) = cfg.anchor.tsa_ca_file() {
        fs::copy(ca, out.join("tsa-ca.pem"))?;
    }
    let Some(tsr) = &coverage.token_path else {
        return Ok(None);
    };
    let token = fs::read(root.join(tsr))?;
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
    fs::write(
        dir.join(crate::anchor::token_file_name(coverage.checkpoint.seq)),
        token,
    )?;
    Ok(Some(info))
}

/// `sha256sum` lines for every file in the kit but SHA256SUMS itself, sorted by path.
fn sha256sums(out: &Path) -> io::Result<String> {
    let mut files = Vec::new();
    let mut pending = vec![out.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path != out.join("SHA256SUMS") {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut sums = String::new();
    for path in files {
        let mut hasher = Sha256::new();
        io::copy(&mut File::open(&path)?, &mut hasher)?;
        let rel: PathBuf = path.strip_prefix(out).unwrap_or(&path).to_path_buf();
        sums += &format!("{}  {}\n", hex::encode(hasher.finalize()), rel.display());
    }
    Ok(sums)
}

fn readme(
    meta: &Meta,
    coverage: &Coverage,
    token: Option<&TokenInfo>,
    example: Option<&Example>,
    has_ca: bool,
) -> String {
    let seq = coverage.checkpoint.seq;
    let json = format!("checkpoints/{}", crate::anchor::checkpoint_file_name(seq));
    let tsr = format!("checkpoints/{}", crate::anchor::token_file_name(seq));
    let mut text = format!(
        include_str!("README.head.md"),
        export_id = meta.export_id,
        actor = meta.actor,
        recipient = meta.recipient.as_deref().unwrap_or("(not given)"),
        selection = meta.selection,
        packages = coverage.packages,
        first = coverage.first_seq,
        last = coverage.last_concerned_seq,
        seq = seq,
        row_hash = coverage.checkpoint.row_hash,
        json = json,
    );
    text += &match (token, has_ca) {
        (Some(info), true) => format!(
            include_str!("README.token.md"),
            json = json,
            tsr = tsr,
            gen_time = info.gen_time,
            gen_time_unix = info.gen_time_unix,
            signer = info.signer,
        ),
        (Some(info), false) => format!(
            "## 2. Trusted time\n\n`{tsr}` is an RFC 3161 token from {} ({}); lrvault was not configured with the TSA's CA \
             certificate, so check it against the TSA's published root:\n`openssl ts -verify -data {json} -in {tsr} -CAfile <the TSA's root>.pem`.\n\n",
            info.signer, info.gen_time
        ),
        (None, _) => format!(
            "## 2. Trusted time\n\nNo RFC 3161 token was available for `{json}` when this kit was made (no timestamp \
             authority configured, or it had not answered yet). The checkpoint is then anchored only by the copies \
             held outside this kit.\n\n"
        ),
    };
    text += include_str!("README.chain.md");
    if let Some(ex) = example {
        text += &format!(
            include_str!("README.package.md"),
            evidence_id = ex.evidence_id,
            path = ex.package_path,
            bag = ex.bag,
        );
    }
    text
}
