//! Step 4 of a verify run (§7a item 5): every checkpoint must pin a row of the chain with
//! that row's hash (a checkpoint beyond the head means a truncated chain, another hash a
//! rewritten one), every token must verify against its checkpoint's bytes and `tsa_ca_file`,
//! and every checkpoint the `anchors` table records must still be in the store. Then this
//! run's own checkpoint is written.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

use super::Report;
use super::defect::{Defect, Recorder};
use super::snapshot::Snapshot;
use crate::anchor::{self, Checkpoint, CheckpointFile, TrustAnchors};
use crate::config::Config;
use crate::db::{Db, DbError};

/// A checkpoint that verified but has no token yet.
pub type Unstamped = (CheckpointFile, Checkpoint);

const MAX_TOKEN_BYTES: u64 = 1 << 20;

pub fn check(
    conn: &Connection,
    root: &Path,
    snap: &Snapshot,
    trust: Option<&TrustAnchors>,
    rec: &mut Recorder,
) -> Result<Vec<Unstamped>, DbError> {
    let listing = match anchor::list(root) {
        Ok(listing) => listing,
        Err(e) => {
            rec.defect(Defect::Checkpoint {
                file: anchor::CHECKPOINT_DIR.into(),
                seq: None,
                problem: e.to_string(),
            })?;
            return Ok(Vec::new());
        }
    };
    let mut unstamped = Vec::new();
    let superseded = crate::custody::superseded_checkpoints(conn)?;
    for file in &listing.checkpoints {
        let name = file_name(&file.json);
        match check_one(conn, snap, trust, file, &superseded) {
            Ok(Checked::Stamped) => {}
            Ok(Checked::Unstamped(cp)) => unstamped.push((file.clone(), cp)),
            Err(problem) => rec.defect(Defect::Checkpoint {
                file: name,
                seq: Some(file.seq),
                problem,
            })?,
        }
    }
    for tsr in &listing.orphan_tokens {
        rec.defect(Defect::Checkpoint {
            file: file_name(tsr),
            seq: None,
            problem: "a token whose checkpoint is missing (deleted?)".into(),
        })?;
    }
    for (seq, path, tsr_path) in recorded(conn)? {
        let gone = |p: &str| !root.join(p).exists();
        let problem = if gone(&path) {
            "recorded in the anchors table but missing from the store (deleted?)"
        } else if tsr_path.as_deref().is_some_and(gone) {
            "its token is recorded in the anchors table but missing from the store (deleted?)"
        } else {
            continue;
        };
        rec.defect(Defect::Checkpoint {
            file: path,
            seq: Some(seq),
            problem: problem.into(),
        })?;
    }
    Ok(unstamped)
}

enum Checked {
    Stamped,
    Unstamped(Checkpoint),
}

fn check_one(
    conn: &Connection,
    snap: &Snapshot,
    trust: Option<&TrustAnchors>,
    file: &CheckpointFile,
    superseded: &std::collections::HashSet<(i64, String)>,
) -> Result<Checked, String> {
    let bytes = anchor::read_bytes(&file.json).map_err(|e| e.to_string())?;
    let cp = Checkpoint::parse(&bytes)?;
    if cp.seq != file.seq {
        return Err(format!(
            "its name says seq {}, it pins seq {}",
            file.seq, cp.seq
        ));
    }
    let chain_hash: Option<String> = conn
        .query_row(
            "SELECT row_hash FROM custody_log WHERE seq = ?1",
            [cp.seq],
            |r| Ok(crate::cells::shown(r, 0)),
        )
        .optional()
        .map_err(|e| format!("cannot read custody seq {}: {e}", cp.seq))?;
    let restored_away = superseded.contains(&(cp.seq, cp.row_hash.clone()));
    match chain_hash {
        // A restore took this row away; its RESTORED row names the checkpoint, whose rows
        // live on in the replaced database. Its token still has to verify.
        _ if restored_away => {}
        None => {
            return Err(format!(
                "pins custody seq {} (row_hash {}), beyond the chain's head seq {} (truncated chain)",
                cp.seq, cp.row_hash, snap.head.seq
            ));
        }
        Some(hash) if hash != cp.row_hash => {
            return Err(format!(
                "pins custody seq {} with row_hash {}, the chain's row has {hash} (rewritten chain)",
                cp.seq, cp.row_hash
            ));
        }
        Some(_) => {}
    }
    let Some(tsr) = &file.tsr else {
        return Ok(Checked::Unstamped(cp));
    };
    let token = read_token(tsr)?;
    anchor::verify_token(&token, &bytes, trust)
        .map_err(|e| format!("its token {} does not verify: {e}", file_name(tsr)))?;
    Ok(Checked::Stamped)
}

fn read_token(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TOKEN_BYTES).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read its token {}: {e}", file_name(path)))?;
    Ok(bytes)
}

fn file_name(path: &Path) -> String {
    format!(
        "{}/{}",
        anchor::CHECKPOINT_DIR,
        path.file_name().unwrap_or_default().to_string_lossy()
    )
}

/// (seq, checkpoint_path, tsr_path) of every row in `anchors`.
fn recorded(conn: &Connection) -> Result<Vec<(i64, String, Option<String>)>, DbError> {
    let mut stmt = conn
        .prepare("SELECT seq, checkpoint_path, tsr_path FROM anchors ORDER BY seq")
        .map_err(DbError::sql("read anchors"))?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get_ref(0)?.as_i64().unwrap_or(0),
                crate::cells::shown(r, 1),
                r.get_ref(2)?.as_str().ok().map(str::to_string),
            ))
        })
        .map_err(DbError::sql("read anchors"))?;
    rows.collect::<Result<_, _>>()
        .map_err(DbError::sql("read anchors"))
}

/// Writes this run's checkpoint for the head it verified; returns its path under the store.
pub async fn write_checkpoint(
    cfg: &Config,
    db: &Db,
    store: &crate::store::Store,
    report: &Report,
) -> anyhow::Result<String> {
    let cp = Checkpoint {
        seq: report.chain_head.seq,
        row_hash: report.chain_head.row_hash.clone(),
        at: crate::time::now_str(),
        rows: report.chain_rows,
        evidence: report.evidence_rows,
        host: crate::custody::hostname(),
        lrvault_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    anchor::write_checkpoint(cfg, db, store, &cp).await
}

/// The checkpoint at `rel` (just written) as a candidate for a token.
pub fn checkpoint_file(root: &Path, rel: &str) -> anyhow::Result<Unstamped> {
    let json = root.join(rel);
    let cp = Checkpoint::parse(&anchor::read_bytes(&json)?).map_err(anyhow::Error::msg)?;
    Ok((
        CheckpointFile {
            seq: cp.seq,
            json,
            tsr: None,
        },
        cp,
    ))
}
