//! The `fs` backend (the package directory of docs/evidence-format.md, unchanged) and the local-file work
//! every backend shares: the spool, streamed copies out of the store.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use super::{ByteStream, Expected, Listed, SpoolSweep, StoreError, Stored, hash_stream};
use crate::config::StoreBackend;

/// Packages and checkpoints are read-only once in place (docs/evidence-format.md).
const READ_ONLY: u32 = 0o440;

#[derive(Debug)]
pub(super) struct FsStore {
    root: PathBuf,
}

fn io_error(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { path, op, source }
}

impl FsStore {
    pub(super) fn new(root: &Path) -> Self {
        FsStore {
            root: root.to_path_buf(),
        }
    }

    pub(super) fn location(&self, key: &str) -> String {
        if key.is_empty() {
            self.root.display().to_string()
        } else {
            self.root.join(key).display().to_string()
        }
    }

    fn stored(&self, key: &str, size: u64) -> Stored {
        Stored {
            backend: StoreBackend::Fs,
            location: self.location(key),
            version_id: None,
            etag: None,
            size,
        }
    }

    /// The package writer already moved the package into place: check it is there.
    pub(super) async fn locate(
        &self,
        key: &str,
        expected: &Expected,
    ) -> Result<Stored, StoreError> {
        let path = self.root.join(key);
        let len = tokio::fs::metadata(&path)
            .await
            .map_err(io_error(&path, "reading size of package"))?
            .len();
        if len != expected.size {
            return Err(StoreError::Changed {
                path,
                reason: format!("{len} bytes, {} were checked", expected.size),
            });
        }
        Ok(self.stored(key, len))
    }

    pub(super) async fn find(
        &self,
        key: &str,
        expected: &Expected,
    ) -> Result<Option<Stored>, StoreError> {
        let path = self.root.join(key);
        match tokio::fs::metadata(&path).await {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&path, "looking up")(e)),
            Ok(_) => {}
        }
        let (sha256, size) = hash_stream(self.read(key, None).await?).await?;
        if sha256 != expected.sha256 || size != expected.size {
            return Err(StoreError::Conflict {
                location: self.location(key),
                reason: format!(
                    "SHA-256 {sha256} ({size} bytes), the package has {}",
                    expected.sha256
                ),
            });
        }
        Ok(Some(self.stored(key, size)))
    }

    pub(super) async fn read(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<ByteStream, StoreError> {
        let path = self.root.join(key);
        if let Some(v) = version_id {
            return Err(no_versions(key, v));
        }
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(io_error(&path, "opening"))?;
        Ok(
            tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024)
                .map_err(move |source| StoreError::Io {
                    path: path.clone(),
                    op: "reading",
                    source,
                })
                .boxed(),
        )
    }

    /// Every regular file below `prefix`, except the writer's `*.partial` files.
    pub(super) fn list(
        &self,
        prefix: &str,
    ) -> Pin<Box<dyn Stream<Item = Result<Listed, StoreError>> + Send + '_>> {
        walk(self.root.clone(), prefix)
            .try_filter(|l| std::future::ready(!l.key.ends_with(".partial")))
            .boxed()
    }

    pub(super) async fn put_small(&self, key: &str, bytes: Bytes) -> Result<Stored, StoreError> {
        let expected = Expected::of(&bytes);
        let size = expected.size;
        let stream = futures_util::stream::once(async move { Ok(bytes) }).boxed();
        match write_stream(stream, &self.root.join(key)).await {
            Ok(_) => Ok(self.stored(key, size)),
            // A retry after a crash: the same bytes are already there.
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
                self.find(key, &expected)
                    .await?
                    .ok_or_else(|| StoreError::Conflict {
                        location: self.location(key),
                        reason: "vanished while being compared".into(),
                    })
            }
            Err(e) => Err(e),
        }
    }
}

pub(super) fn no_versions(key: &str, version: &str) -> StoreError {
    StoreError::InvalidKey {
        key: key.to_string(),
        reason: format!("the fs store keeps no versions (asked for version {version})"),
    }
}

/// Streams `stream` into a new temporary file in `dir` (removed when the returned path is
/// dropped); nothing is fsynced, the copy is only read back once.
pub(super) async fn write_temp(
    mut stream: ByteStream,
    dir: &Path,
) -> Result<tempfile::TempPath, StoreError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(io_error(dir, "creating directory"))?;
    let (file, path) = tempfile::Builder::new()
        .prefix("copy-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io_error(dir, "creating a temporary copy in"))?
        .into_parts();
    let mut file = tokio::fs::File::from_std(file);
    while let Some(chunk) = stream.next().await {
        file.write_all(&chunk?)
            .await
            .map_err(io_error(&path, "writing"))?;
    }
    file.flush().await.map_err(io_error(&path, "writing"))?;
    Ok(path)
}

/// Moves `root/key` to `root/{dir}/{key}.{timestamp}` and removes the directories it leaves.
pub(super) async fn quarantine(root: &Path, key: &str, dir: &str) -> Result<PathBuf, StoreError> {
    let from = root.join(key);
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let to = root.join(dir).join(format!("{key}.{stamp}"));
    if let Some(parent) = to.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(io_error(parent, "creating directory"))?;
    }
    tokio::fs::rename(&from, &to)
        .await
        .map_err(io_error(&from, "setting aside"))?;
    remove_with_empty_parents(root, key).await?;
    Ok(to)
}

/// Removes the entries of `dir` (files, and directories with all they hold) last modified
/// more than `age` ago.
pub(super) async fn remove_older_than(
    dir: &Path,
    age: std::time::Duration,
) -> Result<usize, StoreError> {
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_error(dir, "listing directory")(e)),
    };
    let now = std::time::SystemTime::now();
    let mut removed = 0;
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(io_error(dir, "listing directory"))?
    {
        let Ok(meta) = entry.metadata().await else {
            continue;
        };
        let old = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|a| a > age);
        let gone = match (old, meta.is_dir()) {
            (false, _) => false,
            (true, true) => tokio::fs::remove_dir_all(entry.path()).await.is_ok(),
            (true, false) => tokio::fs::remove_file(entry.path()).await.is_ok(),
        };
        removed += usize::from(gone);
    }
    Ok(removed)
}

/// Writes `stream` to `dest` by the package rules: `dest.partial`, fsync, linked into place
/// without overwriting (an existing `dest` is an `AlreadyExists` I/O error), 0440, directory
/// fsynced. Returns the SHA-256 and size written.
pub(super) async fn write_stream(
    mut stream: ByteStream,
    dest: &Path,
) -> Result<(String, u64), StoreError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(io_error(dir, "creating directory"))?;
    let mut partial = dest.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let written = async {
        let mut file = tokio::fs::File::create(&partial)
            .await
            .map_err(io_error(&partial, "creating"))?;
        let mut hasher = sha2::Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk)
                .await
                .map_err(io_error(&partial, "writing"))?;
        }
        file.sync_all()
            .await
            .map_err(io_error(&partial, "fsyncing"))?;
        tokio::fs::set_permissions(&partial, std::fs::Permissions::from_mode(READ_ONLY))
            .await
            .map_err(io_error(&partial, "making read-only"))?;
        tokio::fs::hard_link(&partial, dest)
            .await
            .map_err(io_error(
                dest,
                "moving into place (never over an existing file)",
            ))?;
        Ok::<_, StoreError>((hex::encode(hasher.finalize()), size))
    }
    .await;
    let _ = tokio::fs::remove_file(&partial).await;
    let written = written?;
    let d = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&d).and_then(|f| f.sync_all()))
        .await
        .map_err(|e| io_error(dir, "fsyncing directory")(io::Error::other(e)))?
        .map_err(io_error(dir, "fsyncing directory"))?;
    Ok(written)
}

/// Removes `root/key` and then each parent directory it leaves empty, up to `root`.
pub(super) async fn remove_with_empty_parents(root: &Path, key: &str) -> Result<(), StoreError> {
    let path = root.join(key);
    match tokio::fs::remove_file(&path).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(&path, "removing spool copy")(e)),
    }
    for dir in path.ancestors().skip(1) {
        if dir == root || !dir.starts_with(root) || tokio::fs::remove_dir(dir).await.is_err() {
            break;
        }
    }
    Ok(())
}

pub(super) async fn sweep_spool(
    root: &Path,
    files: Vec<Listed>,
    is_archived: impl Fn(&str) -> bool,
) -> Result<SpoolSweep, StoreError> {
    let mut sweep = SpoolSweep::default();
    for file in files {
        if is_archived(&file.key) {
            remove_with_empty_parents(root, &file.key).await?;
            tracing::info!(key = %file.key, "removed the spool copy of an archived package");
            sweep.removed.push(file.key);
        } else {
            sweep.waiting_bytes += file.size;
            sweep.waiting.push(file.key);
        }
    }
    sweep.removed.sort();
    sweep.waiting.sort();
    Ok(sweep)
}

/// The finished packages of the spool at `root`: every file but `*.partial` ones and those
/// in the spool's own directories (`_tmp`, `_quarantine`; tenant names never start with `_`).
pub(super) fn spool_walk(
    root: &Path,
) -> impl Stream<Item = Result<Listed, StoreError>> + Send + 'static {
    walk(root.to_path_buf(), "").try_filter(|l| {
        let own = l.key.starts_with('_') || l.key.ends_with(".partial");
        std::future::ready(!own)
    })
}

/// Regular files below `root/prefix` (symlinks neither followed nor listed), as keys.
fn walk(
    root: PathBuf,
    prefix: &str,
) -> impl Stream<Item = Result<Listed, StoreError>> + Send + 'static {
    let start = root.join(prefix.trim_end_matches('/'));
    let state = (root, vec![start], None::<tokio::fs::ReadDir>);
    futures_util::stream::try_unfold(state, |(root, mut pending, mut current)| async move {
        loop {
            let Some(dir) = current.as_mut() else {
                let Some(next) = pending.pop() else {
                    return Ok(None);
                };
                match tokio::fs::read_dir(&next).await {
                    Ok(rd) => current = Some(rd),
                    Err(e)
                        if e.kind() == io::ErrorKind::NotFound
                            || e.kind() == io::ErrorKind::NotADirectory => {}
                    Err(e) => return Err(io_error(&next, "listing directory")(e)),
                }
                continue;
            };
            let Some(entry) = dir
                .next_entry()
                .await
                .map_err(io_error(&root, "listing directory"))?
            else {
                current = None;
                continue;
            };
            let path = entry.path();
            let kind = entry
                .file_type()
                .await
                .map_err(io_error(&path, "reading file type of"))?;
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                let size = match entry.metadata().await {
                    Ok(m) => m.len(),
                    // Removed since it was listed (an archived package's spool copy released
                    // by a concurrent attempt): it is not there to list.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_error(&path, "reading size of")(e)),
                };
                let key = path
                    .strip_prefix(&root)
                    .unwrap_or(&path)
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                return Ok(Some((Listed { key, size }, (root, pending, current))));
            }
        }
    })
}
