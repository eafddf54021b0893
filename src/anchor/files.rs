//! Where anchor files live: under `{store.root}/_checkpoints/` for the `fs` store, under the
//! same keys in an object store (DESIGN §7b), written create-only with
//! [`Store::put_small`]. Readers that walk the checkpoint directory get a local one either
//! way ([`local_root`]): the store root itself, or a mirror of the store's checkpoints in the
//! spool, removed when dropped.

use std::path::{Path, PathBuf};

use futures_util::StreamExt;

use super::AnchorError;
use super::checkpoint::{self, CHECKPOINT_DIR};
use crate::config::Config;
use crate::store::{Store, StoreError};

/// Checkpoints and tokens are small; anything larger is not one of ours.
const MAX_ANCHOR_BYTES: u64 = 1 << 20;

/// A directory whose `_checkpoints/` holds the deployment's anchor files.
pub struct LocalRoot {
    path: PathBuf,
    _mirror: Option<tempfile::TempDir>,
}

impl LocalRoot {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The anchor files as a local directory: `fs_root` for the `fs` store, or a fresh mirror
/// of every key under `_checkpoints/` of an object store.
pub async fn local_root(store: &Store, fs_root: &Path) -> Result<LocalRoot, StoreError> {
    if !store.is_object() {
        return Ok(LocalRoot {
            path: fs_root.to_path_buf(),
            _mirror: None,
        });
    }
    // Not in the spool's `_tmp`: another process's start-up sweep removes what is there
    // after an hour, and a long verify reads this mirror only at its end.
    let mirror = tempfile::Builder::new()
        .prefix("lrvault-anchors-")
        .tempdir()
        .map_err(|source| StoreError::Io {
            path: std::env::temp_dir(),
            op: "creating a temporary directory in",
            source,
        })?;
    let mut listed = store.list(&format!("{CHECKPOINT_DIR}/"));
    while let Some(item) = listed.next().await {
        let key = item?.key;
        store
            .download_to(&key, None, &mirror.path().join(&key))
            .await?;
    }
    Ok(LocalRoot {
        path: mirror.path().to_path_buf(),
        _mirror: Some(mirror),
    })
}

/// Writes a new anchor file at `rel` (under `_checkpoints/`); [`AnchorError::Exists`] when
/// there is one already (the `fs` store), or one with other bytes (an object store).
pub async fn put_new(
    cfg: &Config,
    store: &Store,
    rel: &str,
    bytes: Vec<u8>,
) -> Result<(), AnchorError> {
    if !store.is_object() {
        let path = cfg.store.root.join(rel);
        return tokio::task::spawn_blocking(move || checkpoint::write_new_file(&path, &bytes))
            .await
            .map_err(|e| AnchorError::io(Path::new(rel), "writing", std::io::Error::other(e)))?;
    }
    match store.put_small(rel, bytes.into()).await {
        Ok(_) => Ok(()),
        Err(StoreError::Conflict { location, .. }) => Err(AnchorError::Exists(location.into())),
        Err(e) => Err(e.into()),
    }
}

/// The bytes of the anchor file at `rel`, wherever it is (bounded).
pub async fn read(cfg: &Config, store: &Store, rel: &str) -> Result<Vec<u8>, AnchorError> {
    if !store.is_object() {
        let path = cfg.store.root.join(rel);
        return tokio::task::spawn_blocking(move || checkpoint::read_bytes(&path))
            .await
            .map_err(|e| AnchorError::io(Path::new(rel), "reading", std::io::Error::other(e)))?;
    }
    store
        .read_small(rel, MAX_ANCHOR_BYTES)
        .await?
        .ok_or_else(|| AnchorError::Missing(store.location(rel).unwrap_or_else(|_| rel.into())))
}
