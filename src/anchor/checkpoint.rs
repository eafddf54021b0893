//! Checkpoint files: `{store.root}/_checkpoints/{seq:012}.json` pins one custody row outside
//! the database, and `{seq:012}.tsr` beside it is the timestamp authority's answer for it.
//! Both are written by the store's own create-only writer (`files`): for `fs` like packages,
//! a temp file, fsync, read-only, linked into place without ever replacing a file.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use super::AnchorError;

/// The directory under `store.root` that holds checkpoints and tokens.
pub const CHECKPOINT_DIR: &str = "_checkpoints";
/// Checkpoint files are small; anything larger is not one of ours and is not read whole.
const MAX_CHECKPOINT_BYTES: u64 = 64 * 1024;

/// The content of one checkpoint file (docs/evidence-format.md §9), keys in this order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The custody row this checkpoint pins: the chain head the verify run checked.
    pub seq: i64,
    pub row_hash: String,
    /// When the checkpoint was written.
    pub at: String,
    /// Custody rows the run recomputed (from seq 1 to `seq`).
    pub rows: i64,
    /// Evidence rows in the database at that moment.
    pub evidence: i64,
    pub host: Option<String>,
    pub lrvault_version: String,
    /// What wrote it: `"verify"` (the chain was recomputed from seq 1 up to `seq` and every
    /// check passed) or `"archive"` (the head an archive pass left, pinned without a walk;
    /// `rows` is 0). Absent in checkpoints written before this key existed (all by verify).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// [`Checkpoint::by`] of a verify run's checkpoint.
pub const BY_VERIFY: &str = "verify";
/// [`Checkpoint::by`] of an archive pass's checkpoint.
pub const BY_ARCHIVE: &str = "archive";

impl Checkpoint {
    /// The exact bytes written to the file (and hashed for the timestamp request).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a checkpoint serialises");
        bytes.push(b'\n');
        bytes
    }

    pub fn parse(bytes: &[u8]) -> Result<Checkpoint, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("not a checkpoint: {e}"))
    }
}

/// `000000000042.json`
pub fn checkpoint_file_name(seq: i64) -> String {
    format!("{seq:012}.json")
}

/// `000000000042.tsr`
pub fn token_file_name(seq: i64) -> String {
    format!("{seq:012}.tsr")
}

/// Path of a checkpoint or token file relative to `store.root`, as recorded in `anchors`.
pub fn rel_path(file_name: &str) -> String {
    format!("{CHECKPOINT_DIR}/{file_name}")
}

/// One `{seq}.json` found in the checkpoint directory, and its token when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointFile {
    /// The seq its name says.
    pub seq: i64,
    pub json: PathBuf,
    pub tsr: Option<PathBuf>,
}

/// What the checkpoint directory holds, by seq: checkpoints (with their tokens), and token
/// files whose checkpoint is missing. Partial files are skipped; other names are listed as
/// strays.
#[derive(Debug, Default)]
pub struct Listing {
    pub checkpoints: Vec<CheckpointFile>,
    pub orphan_tokens: Vec<PathBuf>,
    pub strays: Vec<PathBuf>,
}

/// Lists `{store.root}/_checkpoints/` (empty when it does not exist yet).
pub fn list(store_root: &Path) -> Result<Listing, AnchorError> {
    let dir = store_root.join(CHECKPOINT_DIR);
    let mut listing = Listing::default();
    let read_dir = match fs::read_dir(&dir) {
        Ok(read_dir) => read_dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(listing),
        Err(source) => return Err(AnchorError::io(&dir, "listing", source)),
    };
    let mut tokens = std::collections::BTreeMap::new();
    let mut jsons = std::collections::BTreeMap::new();
    for entry in read_dir {
        let path = entry
            .map_err(|source| AnchorError::io(&dir, "listing", source))?
            .path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.ends_with(".partial") {
            continue;
        }
        let seq_of = |ext: &str| {
            name.strip_suffix(ext)
                .filter(|digits| digits.len() == 12 && digits.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|digits| digits.parse::<i64>().ok())
        };
        if let Some(seq) = seq_of(".json") {
            jsons.insert(seq, path);
        } else if let Some(seq) = seq_of(".tsr") {
            tokens.insert(seq, path);
        } else {
            listing.strays.push(path);
        }
    }
    for (seq, json) in jsons {
        let tsr = tokens.remove(&seq);
        listing.checkpoints.push(CheckpointFile { seq, json, tsr });
    }
    listing.orphan_tokens = tokens.into_values().collect();
    listing.strays.sort();
    Ok(listing)
}

/// Reads a checkpoint file's bytes (bounded).
pub fn read_bytes(path: &Path) -> Result<Vec<u8>, AnchorError> {
    let file = File::open(path).map_err(|source| AnchorError::io(path, "opening", source))?;
    let mut bytes = Vec::new();
    io::Read::read_to_end(
        &mut io::Read::take(file, MAX_CHECKPOINT_BYTES + 1),
        &mut bytes,
    )
    .map_err(|source| AnchorError::io(path, "reading", source))?;
    if bytes.len() as u64 > MAX_CHECKPOINT_BYTES {
        return Err(AnchorError::TooLarge(path.to_path_buf()));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(seq: i64) -> Checkpoint {
        Checkpoint {
            seq,
            row_hash: "ab".repeat(32),
            at: "2026-11-27T13:05:00.123Z".into(),
            rows: seq,
            evidence: 3,
            host: Some("vault1".into()),
            lrvault_version: "0.1.0".into(),
            by: Some(BY_VERIFY.into()),
        }
    }

    #[test]
    fn bytes_are_pretty_json_in_key_order() {
        let text = String::from_utf8(checkpoint(42).to_bytes()).unwrap();
        let keys: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix('"'))
            .filter_map(|l| l.split('"').next())
            .collect();
        assert_eq!(
            keys,
            [
                "seq",
                "row_hash",
                "at",
                "rows",
                "evidence",
                "host",
                "lrvault_version",
                "by"
            ]
        );
        assert!(text.ends_with("}\n"));
        assert_eq!(Checkpoint::parse(text.as_bytes()).unwrap(), checkpoint(42));
        assert!(Checkpoint::parse(b"{\"seq\": 1}").is_err());
        // A checkpoint written before `by` existed still parses, and is written back as it was.
        let mut old = checkpoint(42);
        old.by = None;
        let old_text = String::from_utf8(old.to_bytes()).unwrap();
        assert!(!old_text.contains("\"by\""));
        assert_eq!(Checkpoint::parse(old_text.as_bytes()).unwrap(), old);
    }

    #[test]
    fn listing_pairs_tokens_with_checkpoints_and_names_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let cp_dir = dir.path().join(CHECKPOINT_DIR);
        fs::create_dir_all(&cp_dir).unwrap();
        for name in [
            checkpoint_file_name(7),
            token_file_name(7),
            token_file_name(9),
            "notes.txt".into(),
            "000000000011.json.partial".into(),
        ] {
            fs::write(cp_dir.join(name), b"x").unwrap();
        }
        let listing = list(dir.path()).unwrap();
        assert_eq!(listing.checkpoints.len(), 1);
        assert_eq!(listing.checkpoints[0].seq, 7);
        assert!(listing.checkpoints[0].tsr.is_some());
        assert_eq!(listing.orphan_tokens, vec![cp_dir.join("000000000009.tsr")]);
        assert_eq!(listing.strays, vec![cp_dir.join("notes.txt")]);
    }
}
