//! The kit's directory, written only through directory handles. `--out` must not exist: the
//! kit is built in a new 0700 directory beside it (`.{name}.partial-{export id}`), every
//! directory is made with `mkdirat` and entered with `O_NOFOLLOW`, every file is created with
//! `O_CREAT | O_EXCL | O_NOFOLLOW` (packages 0440, other files 0600), and the whole is renamed
//! to `--out` (never over anything) once complete. A symlink or file that appears in it while
//! it is written is never followed nor written over: the export stops. Until the kit is kept,
//! dropping it removes everything it made, so a failed export leaves no half-built directory.
//! Paths inside the kit are store keys ([`check_rel`]); a package is read from the `fs` store
//! the same way ([`open_beneath`]), so no symlink in the store leads the copy elsewhere.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, fsync, unlinkat};

/// Mode of the kit's packages.
pub const PACKAGE_MODE: u32 = 0o440;
/// Mode of every other file of the kit.
pub const FILE_MODE: u32 = 0o600;
/// Mode of the kit's directories, `--out` included.
pub const DIR_MODE: u32 = 0o700;

#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// `--out` is there already (a user error: exit 2).
    #[error("--out {} already exists; an export creates a new directory", .0.display())]
    Exists(PathBuf),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Something the kit did not make appeared in it while it was written.
    #[error("{} appeared in the kit while it was written (not made by lrvault); nothing was written through it", .0.display())]
    Planted(PathBuf),
    #[error("'{path}' is not a valid path in a kit or store: {reason}")]
    BadPath { path: String, reason: String },
}

impl KitError {
    fn io(op: &'static str, path: impl Into<PathBuf>, errno: impl Into<io::Error>) -> KitError {
        KitError::Io {
            op,
            path: path.into(),
            source: errno.into(),
        }
    }
}

/// A path inside the kit or the store as the store validates its keys (`/`-separated, no
/// empty, `.` or `..` segment, not absolute), each segment made of the characters the store's
/// own names use (`[A-Za-z0-9._-]`, docs/evidence-format.md), so no path read from the database can leave
/// the kit, nor carry anything a shell or a README would read as code.
pub fn check_rel(rel: &str) -> Result<(), KitError> {
    let bad = |reason: String| KitError::BadPath {
        path: rel.to_string(),
        reason,
    };
    crate::store::check_key(rel).map_err(|e| bad(e.to_string()))?;
    match rel
        .split('/')
        .find(|seg| crate::package::path_component(seg) != *seg)
    {
        Some(seg) => Err(bad(format!(
            "segment '{seg}' has characters outside [A-Za-z0-9._-] or is all dots"
        ))),
        None => Ok(()),
    }
}

/// `rel`'s directory part and its last segment (`"a/b/c.zip"` → `("a/b", "c.zip")`).
fn split(rel: &str) -> (&str, &str) {
    rel.rsplit_once('/').unwrap_or(("", rel))
}

fn mode(bits: u32) -> Mode {
    Mode::from_bits_truncate(bits as nix::libc::mode_t)
}

/// The kit being written.
pub struct KitDir {
    parent: OwnedFd,
    /// The kit's current name in `parent`: the staging name, then `--out`'s.
    name: OsString,
    out: PathBuf,
    root: OwnedFd,
    dirs: HashMap<String, OwnedFd>,
    /// Every entry this kit made, in order (relative path, is a directory).
    made: Vec<(String, bool)>,
    /// Entries found where the kit was about to make one (planted): never followed, removed
    /// with the kit when it is discarded (unlinking a symlink does not follow it).
    foreign: Vec<String>,
    sums: BTreeMap<String, String>,
    kept: bool,
}

impl KitDir {
    /// Makes the staging directory beside `out` (absolute, not existing), 0700, owned by us.
    pub fn create(out: &Path, id: &str) -> Result<KitDir, KitError> {
        let (Some(parent_path), Some(name)) = (out.parent(), out.file_name()) else {
            return Err(KitError::BadPath {
                path: out.display().to_string(),
                reason: "--out needs a parent directory and a name".into(),
            });
        };
        let parent = openat(
            AT_FDCWD,
            parent_path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| KitError::io("opening the directory of --out", parent_path, e))?;
        match fstatat(&parent, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(KitError::io("looking at --out", out, e)),
            Ok(_) => return Err(KitError::Exists(out.to_path_buf())),
        }
        let mut staging = OsString::from(".");
        staging.push(name);
        staging.push(format!(".partial-{id}"));
        let staging_path = parent_path.join(&staging);
        mkdirat(&parent, staging.as_os_str(), mode(DIR_MODE))
            .map_err(|e| KitError::io("creating the kit's directory", &staging_path, e))?;
        let root = open_dir(&parent, staging.as_os_str())
            .map_err(|e| KitError::io("opening the kit's directory", &staging_path, e))?;
        let kit = KitDir {
            parent,
            name: staging,
            out: out.to_path_buf(),
            root,
            dirs: HashMap::new(),
            made: Vec::new(),
            foreign: Vec::new(),
            sums: BTreeMap::new(),
            kept: false,
        };
        let st = fstat(&kit.root).map_err(|e| KitError::io("checking", &staging_path, e))?;
        if st.st_uid != nix::unistd::geteuid().as_raw() {
            return Err(KitError::Planted(staging_path));
        }
        fchmod(&kit.root, mode(DIR_MODE))
            .map_err(|e| KitError::io("setting the mode of", &staging_path, e))?;
        Ok(kit)
    }

    /// Where the kit is now (the staging directory until [`publish`](Self::publish)).
    pub fn path(&self) -> PathBuf {
        self.out.with_file_name(&self.name)
    }

    /// Every file written so far and its SHA-256, by relative path.
    pub fn sums(&self) -> &BTreeMap<String, String> {
        &self.sums
    }

    /// The handle of directory `rel` ("" = the kit), made (0700) when this kit has not made
    /// it yet. One that is there without this kit having made it was planted: refused.
    fn dir(&mut self, rel: &str) -> Result<&OwnedFd, KitError> {
        if !rel.is_empty() && !self.dirs.contains_key(rel) {
            let (up, seg) = split(rel);
            self.dir(up)?;
            let parent = if up.is_empty() {
                &self.root
            } else {
                &self.dirs[up]
            };
            let path = self.path().join(rel);
            match mkdirat(parent, seg, mode(DIR_MODE)) {
                Ok(()) => self.made.push((rel.to_string(), true)),
                Err(Errno::EEXIST) => {
                    self.foreign.push(rel.to_string());
                    return Err(KitError::Planted(path));
                }
                Err(e) => return Err(KitError::io("creating", path, e)),
            }
            let fd = open_dir(parent, seg).map_err(|e| KitError::io("opening", &path, e))?;
            fchmod(&fd, mode(DIR_MODE))
                .map_err(|e| KitError::io("setting the mode of", &path, e))?;
            self.dirs.insert(rel.to_string(), fd);
        }
        Ok(if rel.is_empty() {
            &self.root
        } else {
            &self.dirs[rel]
        })
    }

    /// Creates file `rel` exclusively, never through a symlink.
    fn create_file(&mut self, rel: &str) -> Result<File, KitError> {
        check_rel(rel)?;
        let (up, name) = split(rel);
        let path = self.path().join(rel);
        let dir = self.dir(up)?;
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW;
        match openat(dir, name, flags | OFlag::O_CLOEXEC, mode(FILE_MODE)) {
            Ok(fd) => {
                self.made.push((rel.to_string(), false));
                Ok(File::from(fd))
            }
            Err(Errno::EEXIST | Errno::ELOOP) => {
                self.foreign.push(rel.to_string());
                Err(KitError::Planted(path))
            }
            Err(e) => Err(KitError::io("creating", path, e)),
        }
    }

    /// Writes file `rel` with `bytes`; returns its SHA-256.
    pub fn write(&mut self, rel: &str, bytes: &[u8], mode_bits: u32) -> Result<String, KitError> {
        self.copy_from(rel, &mut &bytes[..], mode_bits)
    }

    /// Streams `src` into the new file `rel`, hashing it; fsynced, then given `mode_bits`.
    /// Returns its SHA-256.
    pub fn copy_from(
        &mut self,
        rel: &str,
        src: &mut dyn Read,
        mode_bits: u32,
    ) -> Result<String, KitError> {
        let mut file = self.create_file(rel)?;
        let path = self.path().join(rel);
        let io = |op, e| KitError::io(op, &path, e);
        let (_, sha) = crate::package::sha256_through(
            src,
            |e| io("reading the source of", e),
            |chunk| file.write_all(chunk).map_err(|e| io("writing", e)),
        )?;
        fchmod(&file, mode(mode_bits)).map_err(|e| io("setting the mode of", e.into()))?;
        file.sync_all().map_err(|e| io("syncing", e))?;
        self.sums.insert(rel.to_string(), sha.clone());
        Ok(sha)
    }

    /// Syncs every directory and renames the kit to `--out`, never over anything; checks that
    /// what is now at `--out` is this kit's directory.
    pub fn publish(&mut self) -> Result<(), KitError> {
        for fd in self.dirs.values().chain([&self.root]) {
            fsync(fd).map_err(|e| KitError::io("syncing", self.path(), e))?;
        }
        let out_name = self.out.file_name().unwrap_or_default().to_os_string();
        rename_noreplace(&self.parent, &self.name, &out_name).map_err(|e| match e {
            Errno::EEXIST | Errno::ENOTEMPTY => KitError::Exists(self.out.clone()),
            e => KitError::io("moving the kit to", &self.out, e),
        })?;
        let there = fstatat(
            &self.parent,
            out_name.as_os_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| KitError::io("checking", &self.out, e))?;
        let ours = fstat(&self.root).map_err(|e| KitError::io("checking", &self.out, e))?;
        if (there.st_dev, there.st_ino) != (ours.st_dev, ours.st_ino) {
            return Err(KitError::Planted(self.out.clone()));
        }
        self.name = out_name;
        fsync(&self.parent).map_err(|e| KitError::io("syncing the directory of", &self.out, e))
    }

    /// The kit stays: dropping it no longer removes it.
    pub fn keep(mut self) {
        self.kept = true;
    }

    /// Removes every entry this kit made or found planted (through the handles, following
    /// nothing), then its directory.
    fn discard(&mut self) {
        let foreign = self.foreign.iter().flat_map(|rel| {
            [(rel.clone(), false), (rel.clone(), true)] // a planted file or symlink, or an empty directory
        });
        let all: Vec<(String, bool)> = foreign.chain(self.made.iter().rev().cloned()).collect();
        for (rel, is_dir) in &all {
            let (up, name) = split(rel);
            let dir = if up.is_empty() {
                Some(&self.root)
            } else {
                self.dirs.get(up)
            };
            let how = if *is_dir {
                UnlinkatFlags::RemoveDir
            } else {
                UnlinkatFlags::NoRemoveDir
            };
            if let Some(dir) = dir {
                let _ = unlinkat(dir, name, how);
            }
        }
        if let Err(e) = unlinkat(
            &self.parent,
            self.name.as_os_str(),
            UnlinkatFlags::RemoveDir,
        ) {
            tracing::warn!(
                dir = %self.path().display(),
                error = %e,
                "the unfinished kit's directory could not be removed (it holds entries lrvault did not make)"
            );
        }
    }
}

impl Drop for KitDir {
    fn drop(&mut self) {
        if !self.kept {
            self.discard();
        }
    }
}

fn open_dir<P: ?Sized + nix::NixPath>(dir: impl AsFd, name: &P) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn rename_noreplace(dir: &OwnedFd, from: &OsString, to: &OsString) -> nix::Result<()> {
    nix::fcntl::renameat2(
        dir,
        from.as_os_str(),
        dir,
        to.as_os_str(),
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn rename_noreplace(_dir: &OwnedFd, _from: &OsString, _to: &OsString) -> nix::Result<()> {
    Err(Errno::ENOSYS)
}

/// Opens the regular file `rel` (a store key) under `root` without following a symlink in any
/// of its segments, and without blocking on a FIFO or device planted there.
pub fn open_beneath(root: &Path, rel: &str) -> Result<File, KitError> {
    check_rel(rel)?;
    let path = root.join(rel);
    let io = |e: Errno| KitError::io("opening", &path, e);
    let mut dir = openat(
        AT_FDCWD,
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)?;
    let (up, name) = split(rel);
    for seg in up.split('/').filter(|s| !s.is_empty()) {
        dir = open_dir(&dir, seg).map_err(io)?;
    }
    let fd = openat(
        &dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)?;
    let st = fstat(&fd).map_err(io)?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
        return Err(KitError::BadPath {
            path: path.display().to_string(),
            reason: "not a regular file".into(),
        });
    }
    // Regular files ignore O_NONBLOCK; clear it anyway so reads behave as usual.
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty())).map_err(io)?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests;
