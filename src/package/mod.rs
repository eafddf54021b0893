//! Evidence packages: one BagIt (RFC 8493) bag per command result, zipped and written
//! atomically into the store (docs/evidence-format.md).
//!
//! The pieces: `names` turns API-supplied strings into safe paths and payload names
//! ([`package_rel_path`], [`payload_base_name`], [`sanitize_file_name`]), `writer` streams a
//! download into `<final>.<tag>.partial` while hashing it ([`PackageWriter`]), `zipout` writes
//! the zip container front to back, `tagfiles` the BagIt tag files, `place` names partials and
//! moves a package into place without overwriting, `compression` decides per payload how its
//! entry is laid out ([`CompressionChoice`], [`EntryLayout`]), `pool` holds the process's
//! threads for writing and hashing packages ([`PackageThreads`]), `hashers` runs the payload's
//! and the package's hashes in lanes on them, `readback` reads the file back behind the
//! writer, `check` re-reads a package entry by entry after writing and for `lrvault verify`
//! ([`check_package`]), `tags` reads a finished package's tag files back ([`TagFiles`]), and `transcript` extracts the few fields we record from RunScript
//! output ([`parse_transcript`]).
//! All of it is synchronous std code meant to run on a blocking thread.

mod check;
mod compression;
mod hashers;
mod names;
mod partial;
mod place;
mod pool;
mod readback;
mod sink;
mod tagfiles;
mod tags;
mod transcript;
mod writer;
mod zipout;

use std::io;
use std::path::PathBuf;

pub use check::{PackageCheck, check_package, remove_stale_partials, remove_stale_partials_except};
pub use compression::{CompressionChoice, EntryLayout, EntryMethod};
pub use names::{
    investigation_package_name, package_rel_path, path_component, payload_base_name,
    sanitize_file_name,
};
pub use place::{partial_path_for, partial_target, partial_writer_gone, partials_of, sync_dirs};
pub use pool::PackageThreads;
pub use sink::{PackageSink, SealedPackage, StreamedPackage};
pub use tags::TagFiles;
pub use transcript::{Transcript, parse_transcript};
pub use writer::PackageWriter;

pub use crate::config::Compression;

/// Whether the delivered payload bytes are gzip-wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadEncoding {
    Gzip,
    None,
}

/// The values written to `bag-info.txt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BagInfo {
    pub source_organization: String,
    /// `"{tenant}/{action_id}/{index}"`.
    pub external_identifier: String,
    /// `YYYY-MM-DD`.
    pub bagging_date: String,
    /// The requestor of the live-response action.
    pub contact_name: Option<String>,
    pub external_description: String,
}

/// Everything known about one command result before its bytes arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageSpec {
    pub store_root: PathBuf,
    /// From [`package_rel_path`].
    pub rel_path: PathBuf,
    /// `"{action_id}-{index:03}"`.
    pub bag_name: String,
    /// Already sanitised, from [`payload_base_name`].
    pub payload_base_name: String,
    /// True for GetFile: `.gz` is appended when the bytes are gzip.
    pub gz_suffix_if_gzip: bool,
    /// Exact bytes the API returned for the action.
    pub machine_action_json: Vec<u8>,
    pub bag_info: BagInfo,
    pub compression: Compression,
    /// Content-Length when known; `None` or close to 4 GiB and above => zip64 entry.
    pub expected_size: Option<u64>,
    /// Compute the payload's MD5: only worth its time when the server sent one to check.
    pub compute_md5: bool,
    /// The process's threads that write and hash packages.
    pub threads: PackageThreads,
}

/// Hashes and sizes of one payload, known once its last byte has been written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadDigests {
    /// Base name, plus `.gz` when gzip and `gz_suffix_if_gzip`.
    pub payload_name: String,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
    /// Only when [`PackageSpec::compute_md5`] asked for it.
    pub md5: Option<[u8; 16]>,
    pub encoding: PayloadEncoding,
    /// Of the gunzipped stream, when gzip and it decoded fully.
    pub original_size: Option<u64>,
    pub original_sha256: Option<String>,
    /// How the payload entry was written, and why.
    pub compression: CompressionChoice,
}

/// Where a finished package is and what its bytes hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageInfo {
    /// Relative to `store.root`.
    pub rel_path: PathBuf,
    pub package_size: u64,
    /// Lowercase hex SHA-256 of the whole zip file.
    pub package_sha256: String,
}

/// Failures while writing, moving or checking a package; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("{op} {}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("evidence package already exists, refusing to overwrite it: {}", .0.display())]
    Exists(PathBuf),
    #[error("{op} zip archive {}", path.display())]
    Zip {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: zip::result::ZipError,
    },
    #[error("package {} failed verification: {reason}", path.display())]
    Verify { path: PathBuf, reason: String },
    #[error("invalid package path {}: {reason}", path.display())]
    InvalidPath { path: PathBuf, reason: &'static str },
    #[error("payload bytes written to {} after its digests were taken", path.display())]
    AlreadyFinalized { path: PathBuf },
    #[error("package writer task failed: {0}")]
    Task(String),
}

impl PackageError {
    /// True when the disk or a quota filled up (ENOSPC / EDQUOT) anywhere in the error chain,
    /// so callers can pause the queue instead of burning retries.
    pub fn is_disk_full(&self) -> bool {
        let mut current: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(err) = current {
            if let Some(io_err) = err.downcast_ref::<io::Error>() {
                if io_error_is_disk_full(io_err) {
                    return true;
                }
                // io::Error::other(...) hides its payload from source(); look inside too.
                if let Some(inner) = io_err.get_ref()
                    && let Some(zip_err) = inner.downcast_ref::<zip::result::ZipError>()
                    && zip_error_is_disk_full(zip_err)
                {
                    return true;
                }
            }
            if let Some(zip_err) = err.downcast_ref::<zip::result::ZipError>()
                && zip_error_is_disk_full(zip_err)
            {
                return true;
            }
            current = err.source();
        }
        false
    }
}

fn zip_error_is_disk_full(err: &zip::result::ZipError) -> bool {
    matches!(err, zip::result::ZipError::Io(io_err) if io_error_is_disk_full(io_err))
}

/// ENOSPC or EDQUOT, however the OS reported it.
pub(crate) fn io_error_is_disk_full(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || matches!(
        err.raw_os_error(),
        Some(code) if code == nix::errno::Errno::ENOSPC as i32
            || code == nix::errno::Errno::EDQUOT as i32
    )
}

/// Small `Write` sink that hashes and counts what passes through it.
#[derive(Default)]
pub(crate) struct Sha256Counter {
    pub(crate) hasher: sha2::Sha256,
    pub(crate) len: u64,
}

impl io::Write for Sha256Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use sha2::Digest;
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Bytes read at a time by the package checks and read-backs.
pub(crate) const READ_BUFFER: usize = 1024 * 1024;

/// Hands everything `reader` yields to `f`, a buffer at a time; returns how many bytes.
pub(crate) fn for_each_chunk(
    reader: impl io::Read,
    f: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<u64> {
    read_chunks(reader, |e| e, f)
}

/// [`for_each_chunk`] with errors of the caller's own: a read error becomes `read_err(e)`.
fn read_chunks<E>(
    mut reader: impl io::Read,
    read_err: impl Fn(io::Error) -> E,
    mut f: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<u64, E> {
    let mut buf = vec![0u8; READ_BUFFER];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        f(&buf[..n])?;
        total += n as u64;
    }
}

/// Reads `reader` to its end, hashing every buffer and handing it to `each` (a copy's
/// writes); returns the size and SHA-256 (hex). A read error becomes `read_err(e)`. Serves
/// every hashed copy (the backup's files, the export kit's).
pub(crate) fn sha256_through<E>(
    reader: impl io::Read,
    read_err: impl Fn(io::Error) -> E,
    mut each: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(u64, String), E> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let size = read_chunks(reader, read_err, |chunk| {
        hasher.update(chunk);
        each(chunk)
    })?;
    Ok((size, hex::encode(hasher.finalize())))
}

#[cfg(test)]
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_full_is_found_through_the_chain() {
        let enospc = PackageError::Io {
            path: PathBuf::from("/x"),
            op: "writing payload to",
            source: io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32),
        };
        assert!(enospc.is_disk_full());
        let edquot = PackageError::Zip {
            path: PathBuf::from("/x"),
            op: "finishing",
            source: zip::result::ZipError::Io(io::Error::from_raw_os_error(
                nix::errno::Errno::EDQUOT as i32,
            )),
        };
        assert!(edquot.is_disk_full());
        let wrapped = PackageError::Io {
            path: PathBuf::from("/x"),
            op: "writing payload to",
            source: io::Error::other(zip::result::ZipError::Io(io::Error::from_raw_os_error(
                nix::errno::Errno::ENOSPC as i32,
            ))),
        };
        assert!(wrapped.is_disk_full());
        let other = PackageError::Io {
            path: PathBuf::from("/x"),
            op: "opening",
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        assert!(!other.is_disk_full());
        assert!(!PackageError::Exists(PathBuf::from("/x")).is_disk_full());
    }

    #[test]
    fn error_messages_name_the_path() {
        let err = PackageError::Exists(PathBuf::from("/store/t/a.zip"));
        assert_eq!(
            err.to_string(),
            "evidence package already exists, refusing to overwrite it: /store/t/a.zip"
        );
    }

    #[test]
    fn compression_config_spelling() {
        #[derive(serde::Deserialize)]
        struct C {
            compression: Compression,
        }
        let c: C = serde_json::from_str(r#"{"compression":"stored"}"#).unwrap();
        assert_eq!(c.compression, Compression::Stored);
        assert_eq!(
            serde_json::to_string(&PayloadEncoding::Gzip).unwrap(),
            "\"gzip\""
        );
        assert_eq!(Compression::default(), Compression::Auto);
    }
}
