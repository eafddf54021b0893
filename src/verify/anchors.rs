//! Step 4 of a verify run (§7a rules 5, 8, 9): every checkpoint must pin a row of the chain
//! with that row's hash (a checkpoint beyond the head means a truncated chain, another hash a
//! rewritten one); every token must verify against its checkpoint's bytes, `tsa_ca_file` and
//! `tsa_policy`, and have been issued within `max_token_delay`; every checkpoint and token
//! that the `anchors` table or the chain (`ANCHORED`, `VERIFIED` rows) names must still be
//! there, with the bytes the chain recorded; with a witness, its copies must equal the local
//! ones and its newest checkpoint must pin the chain. Then this run's own checkpoint is
//! written.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension};
use sha2::Digest;

use super::Report;
use super::defect::{Defect, Recorder};
use super::snapshot::Snapshot;
use crate::anchor::{self, Checkpoint, CheckpointFile, TrustAnchors};
use crate::db::{Db, DbError};
use crate::store::Blocking;

/// A checkpoint that verified but has no token yet.
pub type Unstamped = (CheckpointFile, Checkpoint);

/// What the anchor checks need besides the connection.
pub struct Inputs<'a> {
    /// The local directory whose `_checkpoints/` holds the store's anchor files.
    pub root: &'a Path,
    pub trust: Option<&'a TrustAnchors>,
    pub policy: Option<&'a str>,
    pub max_token_delay: Duration,
    pub witness: Option<&'a Blocking>,
}

/// The chain's own record of the anchors: ANCHORED rows by checkpoint seq, and the
/// checkpoints VERIFIED rows name.
struct Named {
    anchored: HashMap<i64, (i64, String)>,
    verified: Vec<(i64, String, Option<String>)>,
}

pub fn check(
    conn: &Connection,
    snap: &Snapshot,
    inputs: &Inputs<'_>,
    rec: &mut Recorder,
) -> Result<Vec<Unstamped>, DbError> {
    let listing = match anchor::list(inputs.root) {
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
    let named = Named {
        anchored: anchor::anchored(conn)?,
        verified: verified_checkpoints(conn)?,
    };
    let superseded = crate::custody::superseded_checkpoints(conn)?;
    let mut unstamped = Vec::new();
    // Files that passed every check: only these are copied to a witness that lacks them.
    let mut good = Vec::new();
    for file in &listing.checkpoints {
        let name = file_name(&file.json);
        let checked = check_one(conn, snap, inputs, file, &superseded)
            .and_then(|c| against_chain_record(file, c, &named));
        match checked {
            Ok(Checked::Stamped(_)) => {
                good.push(name);
                good.push(anchor::rel_path(&anchor::token_file_name(file.seq)));
            }
            Ok(Checked::Unstamped(cp)) => {
                good.push(name);
                unstamped.push((file.clone(), cp));
            }
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
    let present: HashSet<i64> = listing.checkpoints.iter().map(|f| f.seq).collect();
    recorded_files(conn, inputs.root, rec)?;
    named_files(inputs.root, &named, &present, rec)?;
    if let Some(witness) = inputs.witness {
        super::witness::check(conn, snap, inputs.root, witness, &good, &superseded, rec)?;
    }
    Ok(unstamped)
}

enum Checked {
    /// With the token's SHA-256.
    Stamped(String),
    Unstamped(Checkpoint),
}

/// A checkpoint's token against the chain's ANCHORED row for it: the token it names must be
/// there, with those bytes (never fetched again: a new token would launder a rewritten chain).
fn against_chain_record(
    file: &CheckpointFile,
    checked: Checked,
    named: &Named,
) -> Result<Checked, String> {
    let Some((row, sha)) = named.anchored.get(&file.seq) else {
        return Ok(checked);
    };
    match &checked {
        Checked::Unstamped(_) => Err(format!(
            "custody seq {row} (ANCHORED) names its token {} (SHA-256 {sha}), which is missing (deleted?); a token is never fetched again",
            anchor::token_file_name(file.seq)
        )),
        Checked::Stamped(found) if found != sha => Err(format!(
            "its token {} has SHA-256 {found}, custody seq {row} (ANCHORED) names {sha} (replaced token)",
            anchor::token_file_name(file.seq)
        )),
        Checked::Stamped(_) => Ok(checked),
    }
}

fn check_one(
    conn: &Connection,
    snap: &Snapshot,
    inputs: &Inputs<'_>,
    file: &CheckpointFile,
    superseded: &HashSet<(i64, String)>,
) -> Result<Checked, String> {
    let bytes = anchor::read_bytes(&file.json).map_err(|e| e.to_string())?;
    let cp = Checkpoint::parse(&bytes)?;
    if cp.seq != file.seq {
        return Err(format!(
            "its name says seq {}, it pins seq {}",
            file.seq, cp.seq
        ));
    }
    let restored_away = superseded.contains(&(cp.seq, cp.row_hash.clone()));
    if !restored_away {
        // A restore took a superseded row away; its RESTORED row names the checkpoint, whose
        // rows live on in the replaced database. Its token still has to verify.
        pins_chain(conn, snap, &cp, "pins")?;
    }
    let Some(tsr) = &file.tsr else {
        return Ok(Checked::Unstamped(cp));
    };
    let token = read_token(tsr)?;
    let info = anchor::verify_token_policy(&token, &bytes, inputs.trust, inputs.policy)
        .map_err(|e| format!("its token {} does not verify: {e}", file_name(tsr)))?;
    if let Some(late) = anchor::late_token(&cp, &info.gen_time, inputs.max_token_delay) {
        return Err(late);
    }
    Ok(Checked::Stamped(hex::encode(sha2::Sha256::digest(&token))))
}

/// `cp` must name a row of the chain with that row's hash; `verb` starts the message.
pub(super) fn pins_chain(
    conn: &Connection,
    snap: &Snapshot,
    cp: &Checkpoint,
    verb: &str,
) -> Result<(), String> {
    let chain_hash: Option<String> = conn
        .query_row(
            "SELECT row_hash FROM custody_log WHERE seq = ?1",
            [cp.seq],
            |r| Ok(crate::cells::shown(r, 0)),
        )
        .optional()
        .map_err(|e| format!("cannot read custody seq {}: {e}", cp.seq))?;
    match chain_hash {
        None => Err(format!(
            "{verb} custody seq {} (row_hash {}), beyond the chain's head seq {} (truncated chain)",
            cp.seq, cp.row_hash, snap.head.seq
        )),
        Some(hash) if hash != cp.row_hash => Err(format!(
            "{verb} custody seq {} with row_hash {}, the chain's row has {hash} (rewritten chain)",
            cp.seq, cp.row_hash
        )),
        Some(_) => Ok(()),
    }
}

fn read_token(path: &Path) -> Result<Vec<u8>, String> {
    anchor::read_bytes(path).map_err(|e| format!("cannot read its token {}: {e}", file_name(path)))
}

fn file_name(path: &Path) -> String {
    format!(
        "{}/{}",
        anchor::CHECKPOINT_DIR,
        path.file_name().unwrap_or_default().to_string_lossy()
    )
}

/// Every checkpoint and token the `anchors` table records must still be in the store.
fn recorded_files(conn: &Connection, root: &Path, rec: &mut Recorder) -> Result<(), DbError> {
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
    Ok(())
}

/// Every checkpoint the chain names (ANCHORED and VERIFIED rows) must still be in the store,
/// with the bytes a VERIFIED row recorded (docs/evidence-format.md §9), even when its `anchors` row
/// went with it.
fn named_files(
    root: &Path,
    named: &Named,
    present: &HashSet<i64>,
    rec: &mut Recorder,
) -> Result<(), DbError> {
    let mut anchored: Vec<_> = named.anchored.iter().collect();
    anchored.sort();
    for (cp_seq, (row, _)) in anchored {
        if !present.contains(cp_seq) {
            rec.defect(Defect::Checkpoint {
                file: anchor::rel_path(&anchor::checkpoint_file_name(*cp_seq)),
                seq: Some(*cp_seq),
                problem: format!(
                    "custody seq {row} (ANCHORED) names this checkpoint and its token; the store has neither (deleted?)"
                ),
            })?;
        }
    }
    for (row, path, sha) in &named.verified {
        let problem = match anchor::read_bytes(&root.join(path)) {
            Err(_) => format!(
                "custody seq {row} (VERIFIED) names this checkpoint; the store does not have it (deleted?)"
            ),
            Ok(bytes) => match sha {
                Some(sha) if *sha != hex::encode(sha2::Sha256::digest(&bytes)) => format!(
                    "custody seq {row} (VERIFIED) recorded its SHA-256 as {sha}; the file's differs (rewritten checkpoint)"
                ),
                _ => continue,
            },
        };
        rec.defect(Defect::Checkpoint {
            file: path.clone(),
            seq: None,
            problem,
        })?;
    }
    Ok(())
}

/// (VERIFIED seq, checkpoint path, checkpoint SHA-256 when recorded) of every VERIFIED row
/// that names a checkpoint.
fn verified_checkpoints(conn: &Connection) -> Result<Vec<(i64, String, Option<String>)>, DbError> {
    let mut stmt = conn
        .prepare(
            "SELECT seq, json_extract(detail, '$.checkpoint'), json_extract(detail, '$.checkpoint_sha256')
             FROM custody_log
             WHERE event = 'VERIFIED' AND json_valid(detail)
               AND json_type(detail, '$.checkpoint') = 'text'
             ORDER BY seq",
        )
        .map_err(DbError::sql("read VERIFIED rows"))?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .map_err(DbError::sql("read VERIFIED rows"))?;
    rows.collect::<Result<_, _>>()
        .map_err(DbError::sql("read VERIFIED rows"))
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

/// Writes this run's checkpoint for the head it verified (and copies it to the witness);
/// returns its path under the store.
pub async fn write_checkpoint(
    db: &Db,
    store: &crate::store::Store,
    witness: Option<&crate::store::Store>,
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
        by: Some(anchor::BY_VERIFY.into()),
    };
    anchor::write_checkpoint(db, store, witness, &cp).await
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
