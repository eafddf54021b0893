//! Where evidence packages and checkpoints live (docs/evidence-format.md, §7a, §7b), behind one type:
//! [`Store`]. The `fs` backend is the package directory of §7, exactly as before; `s3` and
//! `azure` are object stores (through the `object_store` crate) that nobody can rewrite once
//! their WORM retention is set.
//!
//! The life of a package on an object store:
//! 1. the package writer builds and checks it under [`Store::staging_root`] (the spool), at
//!    the §7 relative path, which is also its key below `store.prefix`;
//! 2. [`Store::publish`] uploads it create-only (or, when large, as a multipart upload, which
//!    `object_store` cannot make conditional: the HEAD below comes first), every request
//!    carrying a SHA-256 the service checks, and returns what the ARCHIVED custody row records
//!    ([`Stored::custody_detail`]). It first looks for the object (HEAD + hash), so a crash
//!    between upload and commit is recovered without a second upload or a second version;
//! 3. once the row is committed, [`Store::release`] removes the spool copy. A crash before
//!    that leaves the copy, which [`Store::sweep_spool`] removes at the next start when its
//!    key is archived, and which the archive path publishes again when it is not.
//!
//! `verify` reads back exactly the version custody names ([`Store::local_copy`] into the
//! spool), checks it, then asks whether the key still serves it ([`Store::judge`]); it lists keys for its "file no evidence row names" check
//! ([`Store::list`]); `export` copies packages out ([`Store::download_to`]); checkpoints and
//! their tokens go up with [`Store::put_small`]. Code on a blocking thread reaches the store
//! through [`Blocking`].
//!
//! The spool's own directories start with `_` (tenant names never do): `_tmp` holds copies
//! read back for checking (removed when dropped), `_quarantine` spool copies the store
//! refused or that changed after their check (kept for an operator, never uploaded).

mod backends;
mod fs;
mod hold;
mod object;
mod worm;

use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;
use sha2::Digest;

use crate::config::{Backend, Credentials, StoreBackend, StoreConfig};
use crate::error::UserError;

pub use object::{PART_SIZE, PARTS_IN_FLIGHT, SINGLE_PUT_MAX, part_size};
pub use worm::WormStatus;

/// The spool directory of temporary copies read back from the store.
const TEMP_DIR: &str = "_tmp";
/// The spool directory of copies set aside (a conflict in the store, or altered).
pub const QUARANTINE_DIR: &str = "_quarantine";

/// A stream of an object's bytes, read in flat memory.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, StoreError>> + Send>>;

/// The SHA-256 (lowercase hex) and size the package writer checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub sha256: String,
    pub size: u64,
}

impl Expected {
    /// The SHA-256 and size of bytes in memory (a checkpoint, a token).
    pub fn of(bytes: &[u8]) -> Expected {
        Expected {
            sha256: hex::encode(sha2::Sha256::digest(bytes)),
            size: bytes.len() as u64,
        }
    }
}

/// Where an object ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub backend: StoreBackend,
    /// `s3://bucket/key`, `azure://account/container/key`, or the file's path (`fs`).
    pub location: String,
    /// The object version, when the store keeps versions (S3 with Object Lock always does).
    pub version_id: Option<String>,
    pub etag: Option<String>,
    pub size: u64,
}

impl Stored {
    /// The keys the ARCHIVED custody row's detail gains on an object store (docs/operations.md §14):
    /// `store`, `version_id` when there is one, `etag`. Empty for `fs`, whose rows stay as
    /// they were.
    pub fn custody_detail(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut detail = serde_json::Map::new();
        if self.backend == StoreBackend::Fs {
            return detail;
        }
        detail.insert("store".into(), self.location.clone().into());
        if let Some(v) = &self.version_id {
            detail.insert("version_id".into(), v.clone().into());
        }
        if let Some(e) = &self.etag {
            detail.insert("etag".into(), e.clone().into());
        }
        detail
    }
}

/// What `verify` learns about one recorded object whose bytes it found intact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The key still serves the recorded version.
    Intact,
    /// The key now serves something else: a new version uploaded over the recorded one, or
    /// a delete marker (`current` is `None`).
    Superseded { current: Option<ObjectVersion> },
}

/// The identity of one object version as the store reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectVersion {
    pub version_id: Option<String>,
    pub etag: Option<String>,
    pub size: u64,
}

/// One key found by [`Store::list`], relative to the store (no prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
}

/// What [`Store::sweep_spool`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SpoolSweep {
    /// Spool copies of archived packages, removed.
    pub removed: Vec<String>,
    /// Spool copies still waiting to be published (their results are not archived).
    pub waiting: Vec<String>,
    pub waiting_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Something the operator must fix (credentials, bucket, WORM policy): exit code 2.
    #[error("{0}")]
    Refused(#[from] UserError),
    #[error("{op} {}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {location}: {source}")]
    Object {
        op: &'static str,
        location: String,
        #[source]
        source: object_store::Error,
    },
    /// The store holds an object under this key that is not this package. Nothing is
    /// overwritten; an operator must look at it.
    #[error("{location} already holds a different object ({reason}); refusing to publish over it")]
    Conflict { location: String, reason: String },
    /// The local copy no longer is the package that was checked.
    #[error("{} is not the checked package ({reason})", path.display())]
    Changed { path: PathBuf, reason: String },
    #[error("invalid store key '{key}': {reason}")]
    InvalidKey { key: String, reason: String },
    /// The store could not answer a WORM check (network, permissions, bad answer).
    #[error("checking the retention of {target}: {message}")]
    Worm { target: String, message: String },
    /// A legal hold could not be put on or lifted from an object.
    #[error("legal hold on {location}: {message}")]
    Hold { location: String, message: String },
}

impl StoreError {
    fn refused(message: impl Into<String>) -> Self {
        StoreError::Refused(UserError::new(message))
    }

    /// The object (or file) is not there.
    pub fn is_not_found(&self) -> bool {
        match self {
            StoreError::Object { source, .. } => {
                matches!(source, object_store::Error::NotFound { .. })
            }
            StoreError::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            _ => false,
        }
    }
}

/// A package's bytes on local disk, to be read by the zip checker: the file itself (`fs`),
/// or a copy streamed into the spool's `_tmp`, removed when this is dropped.
#[derive(Debug)]
pub enum LocalCopy {
    InPlace(PathBuf),
    Temp(tempfile::TempPath),
}

impl LocalCopy {
    pub fn path(&self) -> &Path {
        match self {
            LocalCopy::InPlace(p) => p,
            LocalCopy::Temp(t) => t,
        }
    }
}

/// The evidence store of one deployment.
#[derive(Debug)]
pub struct Store {
    backend: StoreBackend,
    staging_root: PathBuf,
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Fs(fs::FsStore),
    Object(object::ObjectBackend),
}

impl Store {
    /// Opens the configured store. Credentials come from the environment (`AWS_*`,
    /// `AZURE_STORAGE_*`, ...) or from systemd credentials of the same names
    /// (`$CREDENTIALS_DIRECTORY/AWS_SECRET_ACCESS_KEY`, ...), or from the instance's identity
    /// with `credentials = "instance"`. No network I/O happens here.
    pub fn open(cfg: &StoreConfig, credentials: &Credentials) -> Result<Store, StoreError> {
        Store::open_with(cfg, &|name| credentials.lookup(name))
    }

    /// [`Store::open`] with the credential variables looked up by `lookup` (tests).
    pub fn open_with(
        cfg: &StoreConfig,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Store, StoreError> {
        let inner = match &cfg.backend {
            Backend::Fs => Inner::Fs(fs::FsStore::new(&cfg.root)),
            Backend::S3 { .. } | Backend::Azure(_) => Inner::Object(backends::build(cfg, lookup)?),
        };
        Ok(Store {
            backend: cfg.kind(),
            staging_root: cfg.staging_dir().to_path_buf(),
            inner,
        })
    }

    /// An object store (packages pass through the spool), not the `fs` directory.
    pub fn is_object(&self) -> bool {
        matches!(self.inner, Inner::Object(_))
    }

    /// Where packages are written and checked before publication: `store.root` for `fs`
    /// (the package is then already in its final place), the spool for object stores.
    pub fn staging_root(&self) -> &Path {
        &self.staging_root
    }

    /// The local file of `key` under [`staging_root`](Self::staging_root).
    pub fn staging_path(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        Ok(self.staging_root.join(key))
    }

    /// Where `key` lives, as custody names it (`s3://bucket/prefix/key`, ...; a path for fs).
    pub fn location(&self, key: &str) -> Result<String, StoreError> {
        check_key(key)?;
        Ok(match &self.inner {
            Inner::Fs(f) => f.location(key),
            Inner::Object(o) => o.location(key),
        })
    }

    /// A one-line description for `status`: the directory, or the bucket and prefix.
    pub fn describe(&self) -> String {
        match &self.inner {
            Inner::Fs(f) => f.location(""),
            Inner::Object(o) => o.location(""),
        }
    }

    /// Publishes the finished, checked package at `staging_path(key)` under `key`.
    /// `fs`: the package is already in place; this checks its size and returns its path.
    /// Object stores: returns the existing object when it already holds these bytes (a crash
    /// between upload and commit), otherwise uploads it. The spool copy stays until
    /// [`release`](Self::release), which the caller calls once the ARCHIVED row is committed.
    pub async fn publish(&self, key: &str, expected: &Expected) -> Result<Stored, StoreError> {
        check_key(key)?;
        match &self.inner {
            Inner::Fs(f) => f.locate(key, expected).await,
            Inner::Object(o) => o.publish(key, &self.staging_root.join(key), expected).await,
        }
    }

    /// The published object under `key` when it holds exactly `expected` (HEAD, then a hash
    /// of that version); `None` when nothing is there; [`StoreError::Conflict`] when
    /// something else is.
    pub async fn find(&self, key: &str, expected: &Expected) -> Result<Option<Stored>, StoreError> {
        check_key(key)?;
        match &self.inner {
            Inner::Fs(f) => f.find(key, expected).await,
            Inner::Object(o) => o.find(key, expected).await,
        }
    }

    /// Removes the spool copy of a published package (and directories it leaves empty).
    /// A no-op for `fs`, where the staged package is the published one.
    pub async fn release(&self, key: &str) -> Result<(), StoreError> {
        check_key(key)?;
        match &self.inner {
            Inner::Fs(_) => Ok(()),
            Inner::Object(_) => fs::remove_with_empty_parents(&self.staging_root, key).await,
        }
    }

    /// Of the spool's `files` ([`spool_files`](Self::spool_files), walked once by the
    /// caller): removes the copies whose key `is_archived` (a crash between commit and
    /// release) and reports the ones still waiting for publication. Partial packages are the
    /// package writer's own sweep. A no-op for `fs`.
    pub async fn sweep_spool(
        &self,
        files: Vec<Listed>,
        is_archived: impl Fn(&str) -> bool,
    ) -> Result<SpoolSweep, StoreError> {
        match &self.inner {
            Inner::Fs(_) => Ok(SpoolSweep::default()),
            Inner::Object(_) => fs::sweep_spool(&self.staging_root, files, is_archived).await,
        }
    }

    /// Streams one object: exactly `version_id` when given.
    pub async fn read(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<ByteStream, StoreError> {
        check_key(key)?;
        match &self.inner {
            Inner::Fs(f) => f.read(key, version_id).await,
            Inner::Object(o) => o.read(key, version_id).await,
        }
    }

    /// A small object's bytes (a checkpoint, a token), at most `max` bytes; `None` when it
    /// is not there.
    pub async fn read_small(&self, key: &str, max: u64) -> Result<Option<Vec<u8>>, StoreError> {
        use futures_util::StreamExt;
        let mut stream = match self.read(key, None).await {
            Ok(s) => s,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            bytes.extend_from_slice(&chunk?);
            if bytes.len() as u64 > max {
                return Err(StoreError::InvalidKey {
                    key: key.to_string(),
                    reason: format!("larger than {max} bytes"),
                });
            }
        }
        Ok(Some(bytes))
    }

    /// Whether the key still serves the version an ARCHIVED row recorded (`version_id`, or
    /// on unversioned stores its `etag`). The caller has already read that version and found
    /// its bytes intact. `fs` keeps no versions: its file is the one the caller read.
    pub async fn judge(
        &self,
        key: &str,
        version_id: Option<&str>,
        etag: Option<&str>,
    ) -> Result<Verdict, StoreError> {
        check_key(key)?;
        let current = match &self.inner {
            Inner::Fs(_) => return Ok(Verdict::Intact),
            Inner::Object(o) => o.head(key, None).await?,
        };
        let same = current.as_ref().is_some_and(|c| match version_id {
            Some(v) => c.version_id.as_deref() == Some(v),
            None => c.etag.as_deref() == etag,
        });
        Ok(if same {
            Verdict::Intact
        } else {
            Verdict::Superseded { current }
        })
    }

    /// What the key serves now (HEAD; the file's size for `fs`); `None` when nothing.
    pub async fn current(&self, key: &str) -> Result<Option<ObjectVersion>, StoreError> {
        check_key(key)?;
        match &self.inner {
            Inner::Fs(_) => {
                let path = self.staging_root.join(key);
                match tokio::fs::metadata(&path).await {
                    Ok(m) => Ok(Some(ObjectVersion {
                        version_id: None,
                        etag: None,
                        size: m.len(),
                    })),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(StoreError::Io {
                        path,
                        op: "looking up",
                        source,
                    }),
                }
            }
            Inner::Object(o) => o.head(key, None).await,
        }
    }

    /// One cheap request that shows the store answers (a HEAD of a key nobody writes).
    pub async fn probe(&self) -> Result<(), StoreError> {
        match &self.inner {
            Inner::Fs(_) => Ok(()),
            Inner::Object(o) => o.head("_probe", None).await.map(|_| ()),
        }
    }

    /// The object (exactly `version_id` when given) as a local file for the zip checker:
    /// the file itself for `fs`, a streamed copy in the spool's `_tmp` for object stores
    /// (memory stays flat; the copy goes when the value is dropped).
    pub async fn local_copy(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<LocalCopy, StoreError> {
        check_key(key)?;
        match &self.inner {
            Inner::Fs(_) => match version_id {
                None => Ok(LocalCopy::InPlace(self.staging_root.join(key))),
                Some(v) => Err(fs::no_versions(key, v)),
            },
            Inner::Object(o) => {
                let stream = o.read(key, version_id).await?;
                let dir = self.staging_root.join(TEMP_DIR);
                fs::write_temp(stream, &dir).await.map(LocalCopy::Temp)
            }
        }
    }

    /// The object the key serves now, with a local copy of exactly that version: what a
    /// crash left published but not committed, to be checked and adopted. `None` when the
    /// key is empty. Object stores only (`fs` packages are adopted in place).
    pub async fn fetch_current(
        &self,
        key: &str,
    ) -> Result<Option<(Stored, LocalCopy)>, StoreError> {
        check_key(key)?;
        let Inner::Object(o) = &self.inner else {
            return Ok(None);
        };
        let Some(current) = o.head(key, None).await? else {
            return Ok(None);
        };
        let copy = self.local_copy(key, current.version_id.as_deref()).await?;
        let stored = Stored {
            backend: self.backend,
            location: o.location(key),
            version_id: current.version_id,
            etag: current.etag,
            size: current.size,
        };
        Ok(Some((stored, copy)))
    }

    /// The finished packages in the spool (not `*.partial`, not the spool's own `_`
    /// directories): those waiting for publication and those being published. Empty for `fs`.
    pub async fn spool_files(&self) -> Result<Vec<Listed>, StoreError> {
        use futures_util::TryStreamExt;
        if !self.is_object() {
            return Ok(Vec::new());
        }
        fs::spool_walk(&self.staging_root).try_collect().await
    }

    /// Sets the file at `staging_path(key)` aside under `_quarantine/` of the same
    /// directory: a spool copy the store refused or that changed after its check, or (`fs`
    /// and spool alike) a package found at a result's path that this database was not
    /// writing (docs/evidence-format.md §9). It is never uploaded nor adopted, and stays for an
    /// operator to examine. Returns where it went.
    pub async fn quarantine(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        fs::quarantine(&self.staging_root, key, QUARANTINE_DIR).await
    }

    /// Keeps a local copy of an object that cannot be moved (a locked version, or a store
    /// without versions) under the spool's `_quarantine/`, named after `key`. Returns where.
    pub async fn keep_aside(&self, key: &str, copy: LocalCopy) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        let LocalCopy::Temp(temp) = copy else {
            return self.quarantine(key).await;
        };
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
        let to = self
            .staging_root
            .join(QUARANTINE_DIR)
            .join(format!("{key}.{stamp}"));
        if let Some(parent) = to.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|source| StoreError::Io {
                    path: parent.to_path_buf(),
                    op: "creating directory",
                    source,
                })?;
        }
        temp.persist(&to).map_err(|e| StoreError::Io {
            path: to.clone(),
            op: "keeping a copy aside at",
            source: e.error,
        })?;
        Ok(to)
    }

    /// Publishes like [`publish`](Self::publish), but over the object `over` that the key
    /// serves now (one a QUARANTINED custody row recorded): a single PUT conditional on that
    /// object's ETag, so nothing else is ever replaced. A versioned store (Object Lock always
    /// is) keeps `over` as an older version; a package too large for a single PUT is refused,
    /// as multipart uploads cannot be conditional. `fs` has nothing to go over.
    pub async fn publish_over(
        &self,
        key: &str,
        expected: &Expected,
        over: &ObjectVersion,
    ) -> Result<Stored, StoreError> {
        check_key(key)?;
        match &self.inner {
            Inner::Fs(f) => f.locate(key, expected).await,
            Inner::Object(o) => {
                o.publish_over(key, &self.staging_root.join(key), expected, over)
                    .await
            }
        }
    }

    /// Removes read-back copies in the spool's `_tmp` older than `age` (left by a crash).
    pub async fn clean_temp(&self, age: std::time::Duration) -> Result<usize, StoreError> {
        if !self.is_object() {
            return Ok(0);
        }
        fs::remove_older_than(&self.staging_root.join(TEMP_DIR), age).await
    }

    /// Every key below `prefix` (a relative key prefix such as `"contoso/"`, or `""`).
    pub fn list(
        &self,
        prefix: &str,
    ) -> Pin<Box<dyn Stream<Item = Result<Listed, StoreError>> + Send + '_>> {
        match &self.inner {
            Inner::Fs(f) => f.list(prefix),
            Inner::Object(o) => o.list(prefix),
        }
    }

    /// Writes a small object (a checkpoint, its `.tsr`) create-only. Writing the same bytes
    /// again returns the existing object; different bytes are a [`StoreError::Conflict`].
    /// `fs` follows the package rules: temp file, fsync, no overwrite, 0440.
    pub async fn put_small(&self, key: &str, bytes: Bytes) -> Result<Stored, StoreError> {
        check_key(key)?;
        match &self.inner {
            Inner::Fs(f) => f.put_small(key, bytes).await,
            Inner::Object(o) => o.put_small(key, bytes).await,
        }
    }

    /// Copies one object (exactly `version_id` when given) to the local file `dest`
    /// (temp file, fsync, rename; never over an existing file); returns its SHA-256 and size.
    pub async fn download_to(
        &self,
        key: &str,
        version_id: Option<&str>,
        dest: &Path,
    ) -> Result<(String, u64), StoreError> {
        let stream = self.read(key, version_id).await?;
        fs::write_stream(stream, dest).await
    }

    /// Whether a legal hold on this store is enforced by the store itself (S3 Object Lock);
    /// on `fs` and `azure` a case's hold is recorded only (docs/operations.md §17).
    pub fn enforces_legal_hold(&self) -> bool {
        self.backend == StoreBackend::S3
    }

    /// Puts (`on`) or lifts the S3 Object Lock legal hold on every version of `key`; the
    /// version ids. Nothing happens (and no version is named) where holds are not enforced.
    pub async fn legal_hold(&self, key: &str, on: bool) -> Result<Vec<String>, StoreError> {
        check_key(key)?;
        match &self.inner {
            Inner::Fs(_) => Ok(Vec::new()),
            Inner::Object(o) => o.legal_hold(key, on).await,
        }
    }

    /// Proves the store enforces retention: S3 Object Lock with a default COMPLIANCE
    /// retention, or an Azure container with version-level immutability and a policy.
    /// `fs` is always refused (a directory enforces nothing). Call at start when
    /// `StoreConfig::worm_required()`; `status` shows the returned value.
    pub async fn check_worm(&self) -> Result<WormStatus, StoreError> {
        match &self.inner {
            Inner::Fs(f) => Err(StoreError::refused(format!(
                "store.require_worm: the fs store {} cannot enforce retention; use backend \"s3\" or \"azure\"",
                f.location("")
            ))),
            Inner::Object(o) => o.check_worm().await,
        }
    }
}

/// Keys are §7 relative paths: `/`-separated, no empty, `.` or `..` segments, no leading `/`.
pub(crate) fn check_key(key: &str) -> Result<(), StoreError> {
    let bad = |reason: &str| {
        Err(StoreError::InvalidKey {
            key: key.to_string(),
            reason: reason.to_string(),
        })
    };
    if key.is_empty() {
        return bad("empty");
    }
    if key
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return bad("must be a relative path without empty, '.' or '..' segments");
    }
    if key.chars().any(|c| c.is_control() || c == '\\') {
        return bad("control characters and '\\' are not allowed");
    }
    Ok(())
}

/// The store for code on a blocking thread (the zip checker, SQLite reads): each call
/// runs the async call on the runtime the value was made in.
pub struct Blocking {
    store: std::sync::Arc<Store>,
    rt: tokio::runtime::Handle,
}

impl Blocking {
    /// Must be called inside the runtime (it keeps a handle to it).
    pub fn new(store: std::sync::Arc<Store>) -> Blocking {
        Blocking {
            store,
            rt: tokio::runtime::Handle::current(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Runs `fut` to its end; only from a thread outside the runtime's workers.
    pub fn wait<T>(&self, fut: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(fut)
    }

    /// The keys below `prefix`, one at a time (flat memory whatever the store's size).
    pub fn list(&self, prefix: &str) -> impl Iterator<Item = Result<Listed, StoreError>> + '_ {
        use futures_util::StreamExt;
        let mut stream = self.store.list(prefix);
        std::iter::from_fn(move || self.rt.block_on(stream.next()))
    }

    /// [`Store::read_small`], from a blocking thread.
    pub fn read_small(&self, key: &str, max: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.wait(self.store.read_small(key, max))
    }
}

/// SHA-256 (hex) and length of a stream, in flat memory.
async fn hash_stream(mut stream: ByteStream) -> Result<(String, u64), StoreError> {
    use futures_util::StreamExt;
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        size += chunk.len() as u64;
        hasher.update(&chunk);
    }
    Ok((hex::encode(hasher.finalize()), size))
}

#[cfg(test)]
mod tests;
