//! Where anchor files live: under `_checkpoints/` of the evidence store (`{store.root}` for
//! `fs`, the same keys in an object store, docs/operations.md §14) and, with `[anchor] witness`, under the
//! same keys of the witness (§7a rule 9). Every write goes through the store's own
//! create-only small-file writer ([`Store::put_small`]); every read through
//! [`Store::read_small`]. Readers that walk the checkpoint directory get a local one either
//! way ([`local_root`]): the store root itself, or a mirror of the store's checkpoints in a
//! temporary directory, removed when dropped.

use std::path::{Path, PathBuf};

use futures_util::StreamExt;

use super::AnchorError;
use super::checkpoint::CHECKPOINT_DIR;
use crate::config::{Backend, Config, ObjectStoreConfig, StoreBackend, StoreConfig, Witness};
use crate::store::{Store, StoreError};

/// Checkpoints and tokens are small; anything larger is not one of ours.
pub const MAX_ANCHOR_BYTES: u64 = 1 << 20;

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

/// Writes a new anchor file at `rel` (under `_checkpoints/`) create-only; the same bytes
/// already there are fine, other bytes are [`AnchorError::Exists`] (never replaced).
pub async fn put_new(store: &Store, rel: &str, bytes: Vec<u8>) -> Result<(), AnchorError> {
    match store.put_small(rel, bytes.into()).await {
        Ok(_) => Ok(()),
        Err(StoreError::Conflict { location, .. }) => Err(AnchorError::Exists(location.into())),
        Err(e) => Err(e.into()),
    }
}

/// The bytes of the anchor file at `rel` (bounded).
pub async fn read(store: &Store, rel: &str) -> Result<Vec<u8>, AnchorError> {
    store
        .read_small(rel, MAX_ANCHOR_BYTES)
        .await?
        .ok_or_else(|| AnchorError::Missing(store.location(rel).unwrap_or_else(|_| rel.into())))
}

/// Copies the anchor file `rel` to the witness, create-only. A failure is logged, not
/// returned: the witness never holds up archiving or verify, and the next verify compares the
/// two homes, copies what the witness lacks and reports what differs.
pub async fn to_witness(witness: Option<&Store>, rel: &str, bytes: &[u8]) {
    let Some(witness) = witness else {
        return;
    };
    if let Err(e) = put_new(witness, rel, bytes.to_vec()).await {
        tracing::warn!(file = rel, witness = %witness.describe(), error = %e,
            "the witness did not take this anchor file; the next verify compares and retries");
    }
}

/// Opens the `[anchor] witness` store (no network I/O), or `None` when there is none.
pub fn open_witness(cfg: &Config) -> Result<Option<Store>, StoreError> {
    open_witness_with(cfg, &|name| cfg.credentials.lookup(name))
}

/// [`open_witness`] with the credential variables looked up by `lookup` (tests). An object
/// witness takes `WITNESS_<NAME>` before `<NAME>` (`WITNESS_AWS_ACCESS_KEY_ID`, ...), so it
/// can use another account's keys than the store. Its endpoint and region are
/// `WITNESS_ENDPOINT` / `WITNESS_REGION` when set, else `[store]`'s when the store is of the
/// same kind, else the provider's defaults (S3: `us-east-1`). Its other object-store keys
/// (credentials, retries, spool) are the store's, or their defaults beside an `fs` store.
pub fn open_witness_with(
    cfg: &Config,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Store>, StoreError> {
    let Some(witness) = cfg.anchor.witness() else {
        return Ok(None);
    };
    let like_store = |kind: StoreBackend, bucket: &str, prefix: &str| {
        let same = cfg.store.kind() == kind;
        let mut object = match cfg.store.object_store() {
            Some(o) => o.clone(),
            None => ObjectStoreConfig::new(bucket),
        };
        object.bucket = bucket.to_string();
        object.prefix = prefix.to_string();
        object.endpoint = match lookup("WITNESS_ENDPOINT") {
            Some(e) => Some(url::Url::parse(&e).map_err(|err| {
                StoreError::Refused(crate::error::UserError::new(format!(
                    "WITNESS_ENDPOINT '{e}' is not a URL: {err}"
                )))
            })?),
            None if same => object.endpoint,
            None => None,
        };
        let backend = match (kind, &cfg.store.backend) {
            (StoreBackend::S3, store) => {
                let region = lookup("WITNESS_REGION").or_else(|| match store {
                    Backend::S3 { region, .. } => Some(region.clone()),
                    _ => None,
                });
                Backend::S3 {
                    object,
                    region: region.unwrap_or_else(|| "us-east-1".into()),
                }
            }
            _ => Backend::Azure(object),
        };
        Ok::<_, StoreError>(StoreConfig::object(backend))
    };
    let (store_cfg, account) = match witness {
        Witness::Dir(root) => (StoreConfig::fs(root.clone()), None),
        Witness::S3 { bucket, prefix } => (like_store(StoreBackend::S3, bucket, prefix)?, None),
        Witness::Azure {
            account,
            container,
            prefix,
        } => (
            like_store(StoreBackend::Azure, container, prefix)?,
            Some(account.clone()),
        ),
    };
    let witness_lookup = |name: &str| {
        if name == "AZURE_STORAGE_ACCOUNT_NAME" && account.is_some() {
            return account.clone();
        }
        lookup(&format!("WITNESS_{name}")).or_else(|| lookup(name))
    };
    Store::open_with(&store_cfg, &witness_lookup).map(Some)
}
