//! Anchors: the custody chain held outside the database (docs/evidence-format.md §9). A checkpoint file under
//! `{store.root}/_checkpoints/` (or those keys of an object store, `files`) pins one chain
//! row; an RFC 3161 token from a timestamp authority pins the checkpoint to a trusted time,
//! and an `ANCHORED` custody row records each token for good; the `anchors` table records
//! both files. With `[anchor] witness` every file is also written create-only to a second
//! home out of the host's reach. `verify` writes a checkpoint per run, and so does every
//! archive pass that archived something; verify adopts what a crash left unrecorded
//! (`reconcile`), fetches missing tokens and checks them all; `export` copies the ones that
//! cover what it hands over.

mod checkpoint;
mod files;
mod reconcile;
mod record;
mod tsa;

use std::path::{Path, PathBuf};

pub use checkpoint::{
    BY_ARCHIVE, BY_VERIFY, CHECKPOINT_DIR, Checkpoint, CheckpointFile, Listing,
    checkpoint_file_name, list, read_bytes, rel_path, token_file_name,
};
pub use files::{
    LocalRoot, MAX_ANCHOR_BYTES, local_root, open_witness, open_witness_with, to_witness,
};
pub use reconcile::{Reconciled, anchored, reconcile};
pub use record::{
    Stamp, TokenRun, checkpoint_head, fetch_missing_tokens, late_token, record_checkpoint,
    write_checkpoint,
};
pub use tsa::{
    TokenInfo, TokenRequest, TrustAnchors, TsaError, fetch_token, verify_token, verify_token_policy,
};

/// Failures reading or writing anchor files; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{} already exists with other bytes; anchor files are never replaced", .0.display())]
    Exists(PathBuf),
    #[error("{} is too large to be a checkpoint", .0.display())]
    TooLarge(PathBuf),
    #[error("{0} is not in the store")]
    Missing(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(
        "checkpoint {} already exists and pins another row (seq {seq}, row_hash {found}); not replaced", path.display()
    )]
    Conflict {
        path: PathBuf,
        seq: i64,
        found: String,
    },
}

impl AnchorError {
    pub(crate) fn io(path: &Path, op: &'static str, source: std::io::Error) -> AnchorError {
        AnchorError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}
