//! The witness part of step 4 (docs/evidence-format.md §9): every file the witness holds under
//! `_checkpoints/` must be in the store with the same bytes, and the witness's newest
//! checkpoint must pin a row of the chain with that row's hash, so a chain cut or rewritten
//! below it shows even when every local anchor was rewritten to match. Files the witness
//! lacks (a crash or an outage between the two writes) are copied to it, create-only, when
//! they passed every other check.

use std::collections::HashSet;
use std::path::Path;

use rusqlite::Connection;
use sha2::Digest;

use super::defect::{Defect, Recorder};
use super::snapshot::Snapshot;
use crate::anchor::{self, Checkpoint};
use crate::db::DbError;
use crate::store::Blocking;

pub fn check(
    conn: &Connection,
    snap: &Snapshot,
    root: &Path,
    witness: &Blocking,
    good: &[String],
    superseded: &HashSet<(i64, String)>,
    rec: &mut Recorder,
) -> Result<(), DbError> {
    let store = witness.store();
    let mut keys = Vec::new();
    for item in witness.list(&format!("{}/", anchor::CHECKPOINT_DIR)) {
        match item {
            Ok(listed) => keys.push(listed.key),
            Err(e) => {
                return rec.defect(Defect::Checkpoint {
                    file: format!("witness {}", store.describe()),
                    seq: None,
                    problem: format!("cannot list the witness, so nothing was compared: {e}"),
                });
            }
        }
    }
    keys.sort();
    let mut newest: Option<(Checkpoint, String)> = None;
    for key in &keys {
        let location = store.location(key).unwrap_or_else(|_| key.clone());
        let bytes = match witness.read_small(key, anchor::MAX_ANCHOR_BYTES) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => continue,
            Err(e) => {
                rec.defect(Defect::Checkpoint {
                    file: location,
                    seq: None,
                    problem: format!("cannot read the witness's copy: {e}"),
                })?;
                continue;
            }
        };
        if let Some(problem) = compare(root, key, &bytes) {
            rec.defect(Defect::Checkpoint {
                file: location.clone(),
                seq: seq_of(key),
                problem,
            })?;
        }
        if let Ok(cp) = Checkpoint::parse(&bytes)
            && !superseded.contains(&(cp.seq, cp.row_hash.clone()))
            && newest.as_ref().is_none_or(|(n, _)| cp.seq > n.seq)
        {
            newest = Some((cp, location));
        }
    }
    if let Some((cp, location)) = newest
        && let Err(problem) =
            super::anchors::pins_chain(conn, snap, &cp, "the witness's newest checkpoint pins")
    {
        rec.defect(Defect::Checkpoint {
            file: location,
            seq: Some(cp.seq),
            problem,
        })?;
    }
    let held: HashSet<&String> = keys.iter().collect();
    for rel in good.iter().filter(|rel| !held.contains(rel)) {
        let Ok(bytes) = anchor::read_bytes(&root.join(rel)) else {
            continue;
        };
        if let Err(e) = witness.wait(store.put_small(rel, bytes.into())) {
            rec.defect(Defect::Checkpoint {
                file: rel.clone(),
                seq: seq_of(rel),
                problem: format!("the witness lacks it and did not take it: {e}"),
            })?;
        } else {
            tracing::info!(file = %rel, "copied to the witness, which lacked it");
        }
    }
    Ok(())
}

/// Why the store's copy of `key` is not the witness's `bytes`, if it is not.
fn compare(root: &Path, key: &str, bytes: &[u8]) -> Option<String> {
    let sha = |b: &[u8]| hex::encode(sha2::Sha256::digest(b));
    match anchor::read_bytes(&root.join(key)) {
        Err(_) => Some(format!(
            "the witness holds it (SHA-256 {}), the store does not (deleted?)",
            sha(bytes)
        )),
        Ok(local) if local != bytes => Some(format!(
            "the store's {key} (SHA-256 {}) differs from the witness's copy (SHA-256 {}) (rewritten)",
            sha(&local),
            sha(bytes)
        )),
        Ok(_) => None,
    }
}

/// The seq a `_checkpoints/{seq:012}.{json,tsr}` key names.
fn seq_of(key: &str) -> Option<i64> {
    let name = key.rsplit('/').next()?;
    name.split('.').next()?.parse().ok()
}
