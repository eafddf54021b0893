//! `lrvault backup --to FILE`: an online copy of the database, made with SQLite's backup API
//! while the daemon runs, integrity-checked, mode 0600, and recorded in custody (`BACKED_UP`
//! with the copy's SHA-256 and where it went). The evidence store is copied beside it with
//! rsync (docs/operations.md §10); [`super::restore`] puts both back.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args as ClapArgs;
use serde_json::json;

use crate::config::ConfigFile;
use crate::custody::{self, Event, EventKind, Head};
use crate::db::{self, DbError};
use crate::error::UserError;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The copy to write: a new file (an existing one is never overwritten); missing
    /// directories are created, mode 0700
    #[arg(long, value_name = "FILE")]
    pub to: PathBuf,
}

/// A file operation that failed, with its path.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {path}: {source}")]
pub struct FileError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

pub(super) fn file_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FileError {
    let path = path.to_path_buf();
    move |source| FileError { op, path, source }
}

/// What a database copy holds, as checked after it was written.
#[derive(Debug, Clone)]
pub struct Checked {
    pub bytes: u64,
    pub sha256: String,
    pub schema_version: i64,
    /// The last custody row inside the copy.
    pub custody_head: Head,
}

pub async fn run(config: &ConfigFile, args: Args) -> anyhow::Result<ExitCode> {
    let cfg = config.load()?;
    let to = destination(&args.to)?;
    if to.symlink_metadata().is_ok() {
        return Err(UserError::new(format!(
            "{} already exists; a backup never overwrites a file: choose a new name",
            to.display()
        ))
        .into());
    }
    let db = super::open_db(&cfg, config)?;
    let (from, dest) = (cfg.database.path.clone(), to.clone());
    let copy = tokio::task::spawn_blocking(move || make_copy(&from, &dest)).await??;
    let (tenant, actor) = match cfg.tenants.as_slice() {
        [only] => (only.name.clone(), custody::actor(&only.client_id)),
        _ => ("*".to_string(), custody::actor("*")),
    };
    let detail = json!({
        "sha256": copy.sha256,
        "to": to.display().to_string(),
        "bytes": copy.bytes,
        "schema_version": copy.schema_version,
        "custody_head": copy.custody_head,
        "integrity_check": "ok",
    });
    let event = Event::new(&tenant, "*", None, EventKind::BackedUp, &actor).detail(detail);
    let row = custody::record(&db, event).await?;
    println!(
        "backed up {} to {}: {} bytes, sha256 {}, integrity_check ok, custody head seq {}; recorded as BACKED_UP seq {}",
        cfg.database.path.display(),
        to.display(),
        copy.bytes,
        copy.sha256,
        copy.custody_head.seq,
        row.seq
    );
    Ok(ExitCode::SUCCESS)
}

/// `--to`, checked before anything is opened: absolute (a one-shot under `systemd-run` runs
/// in `/`, where a relative name means something else), in a directory this user can create
/// files in.
fn destination(to: &Path) -> Result<PathBuf, UserError> {
    if to.is_relative() {
        return Err(UserError::new(format!(
            "backup --to {} is a relative path; write it absolute, in a directory the service user can write (e.g. /var/lib/lrvault/backup/lrvault-$(date -u +%Y%m%dT%H%M%SZ).db)",
            to.display()
        )));
    }
    let dir = to.parent().unwrap_or(Path::new("/"));
    crate::access::check_dir_writable("the backup directory", dir).map_err(UserError::new)?;
    Ok(to.to_path_buf())
}

/// Writes the copy as `<to>.partial` (0600), checks it, and links it to `to` only when it
/// is complete and sound, so `to` never names half a backup. Refuses an existing `to`.
fn make_copy(from: &Path, to: &Path) -> anyhow::Result<Checked> {
    if let Some(dir) = to.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(file_err("create directory", dir))?;
    }
    let partial = with_suffix(to, ".partial");
    File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow::Error::new(UserError::new(format!(
                    "{} exists: an interrupted backup left it (or one is running); remove it and try again",
                    partial.display()
                )))
            } else {
                file_err("create", &partial)(e).into()
            }
        })?;
    let result = copy_check_link(from, &partial, to);
    // On success the partial is a second name of `to`; on failure it is half a copy.
    let _ = std::fs::remove_file(&partial);
    result
}

fn copy_check_link(from: &Path, partial: &Path, to: &Path) -> anyhow::Result<Checked> {
    db::online_copy(from, partial)?;
    let (schema_version, custody_head) = check_copy(partial).with_context(|| {
        format!(
            "the copy failed its check and was not kept (the database itself may be damaged: run lrvault verify); nothing was written to {}",
            to.display()
        )
    })?;
    File::open(partial)
        .and_then(|f| f.sync_all())
        .map_err(file_err("fsync", partial))?;
    let (bytes, sha256) = file_sha256(partial)?;
    std::fs::hard_link(partial, to).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::Error::new(UserError::new(format!(
                "{} appeared while the backup ran; it was not overwritten",
                to.display()
            )))
        } else {
            file_err("link the finished copy to", to)(e).into()
        }
    })?;
    if let Some(dir) = to.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(file_err("fsync directory", dir))?;
    }
    Ok(Checked {
        bytes,
        sha256,
        schema_version,
        custody_head,
    })
}

/// Runs SQLite's full integrity check on a copy and turns it into a self-contained file in
/// rollback-journal mode (readable with no `-wal` or `-shm` beside it; a restore puts it
/// back in WAL mode). Returns its schema version and custody head.
pub(super) fn check_copy(path: &Path) -> anyhow::Result<(i64, Head)> {
    let open_err = |source| DbError::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = rusqlite::Connection::open(path).map_err(open_err)?;
    let problems = db::integrity_problems(&conn, true)?;
    if !problems.is_empty() {
        anyhow::bail!(
            "SQLite's integrity check failed ({} problems, first: {})",
            problems.len(),
            problems[0]
        );
    }
    conn.pragma_update_and_check(None, "journal_mode", "DELETE", |r| r.get::<_, String>(0))
        .map_err(open_err)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(open_err)?;
    if version == 0 {
        anyhow::bail!("not an lrvault database (schema version 0)");
    }
    let (seq, row_hash) = custody::head(&conn)?;
    conn.close().map_err(|(_, e)| open_err(e))?;
    Ok((version, Head { seq, row_hash }))
}

/// Size and SHA-256 of a file, read in chunks.
pub(super) fn file_sha256(path: &Path) -> Result<(u64, String), FileError> {
    hash_through(path, |_| Ok(()))
}

/// Copies `from` to the new file `to` (mode `mode`), hashing as it goes; fsyncs `to`.
pub(super) fn copy_hashed(from: &Path, to: &Path, mode: u32) -> Result<(u64, String), FileError> {
    let mut dest = File::options()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(to)
        .map_err(file_err("create", to))?;
    let out = hash_through(from, |chunk| {
        dest.write_all(chunk).map_err(file_err("write", to))
    })?;
    dest.sync_all().map_err(file_err("fsync", to))?;
    Ok(out)
}

/// Reads `path` in chunks, hashing each and handing it to `each`; returns size and SHA-256.
fn hash_through(
    path: &Path,
    each: impl FnMut(&[u8]) -> Result<(), FileError>,
) -> Result<(u64, String), FileError> {
    let f = File::open(path).map_err(file_err("open", path))?;
    crate::package::sha256_through(f, |e| file_err("read", path)(e), each)
}

/// `path` with `suffix` appended to its file name.
pub(super) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}
