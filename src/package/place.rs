//! Where a package is written and how it is put in place: partial names (`<final>.<tag>.partial`,
//! one per writer), the move into place that never overwrites (hard link, else
//! `renameat2(RENAME_NOREPLACE)`), and the directory fsyncs that make it durable (docs/evidence-format.md).

use std::fs::{self, File};
use std::io;
use std::path::{Component, Path, PathBuf};

use super::PackageError;

/// Links `partial` to `final_path` (fails if it exists), drops the partial name and fsyncs the
/// directory, and every directory up to `created_from`'s parent when this package created
/// `created_from`, so the new entries survive a crash.
pub(crate) fn move_into_place(
    partial: &Path,
    final_path: &Path,
    created_from: Option<&Path>,
) -> Result<(), PackageError> {
    match fs::hard_link(partial, final_path) {
        Ok(()) => {
            if let Err(e) = fs::remove_file(partial) {
                // The package is in place; a leftover name is swept by remove_stale_partials.
                tracing::warn!(path = %partial.display(), error = %e,
                    "package linked into place but partial name not removed");
            }
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(PackageError::Exists(final_path.to_path_buf()));
        }
        Err(link_err) => rename_noreplace(partial, final_path, link_err)?,
    }
    let dir = final_path.parent().unwrap_or(Path::new("."));
    // New directories are only durable once their own entries are synced in their parents.
    let up_to = created_from.and_then(Path::parent).unwrap_or(dir);
    sync_dirs(dir, up_to)
}

/// Fallback for filesystems without hard links.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn rename_noreplace(from: &Path, to: &Path, _link_err: io::Error) -> Result<(), PackageError> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EEXIST) => Err(PackageError::Exists(to.to_path_buf())),
        Err(errno) => Err(PackageError::Io {
            path: to.to_path_buf(),
            op: "moving package into place at",
            source: io::Error::from(errno),
        }),
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn rename_noreplace(_from: &Path, to: &Path, link_err: io::Error) -> Result<(), PackageError> {
    Err(PackageError::Io {
        path: to.to_path_buf(),
        op: "linking package into place at",
        source: link_err,
    })
}

/// fsyncs `dir` and each of its ancestors up to `up_to` (inclusive; just `dir` when `up_to`
/// is not one of them).
pub fn sync_dirs(dir: &Path, up_to: &Path) -> Result<(), PackageError> {
    for d in dir.ancestors() {
        File::open(d)
            .and_then(|d| d.sync_all())
            .map_err(|source| PackageError::Io {
                path: d.to_path_buf(),
                op: "fsyncing directory",
                source,
            })?;
        if d == up_to || !d.starts_with(up_to) {
            break;
        }
    }
    Ok(())
}

/// Creates the partial file exclusively; the package must not exist yet.
pub(crate) fn create_partial(
    parent: &Path,
    final_path: &Path,
    partial: &Path,
) -> Result<File, PackageError> {
    fs::create_dir_all(parent).map_err(|source| PackageError::Io {
        path: parent.to_path_buf(),
        op: "creating directory",
        source,
    })?;
    if fs::symlink_metadata(final_path).is_ok() {
        return Err(PackageError::Exists(final_path.to_path_buf()));
    }
    let open = || File::options().write(true).create_new(true).open(partial);
    // The spool's sweep removes directories it empties: one may go between the two calls.
    match open() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(parent).and_then(|()| open())
        }
        r => r,
    }
    .map_err(|source| PackageError::Io {
        path: partial.to_path_buf(),
        op: "creating partial package",
        source,
    })
}

/// The outermost directory between `store_root` (inclusive) and `dir` that does not exist yet.
pub(crate) fn first_missing_ancestor(dir: &Path, store_root: &Path) -> Option<PathBuf> {
    let mut missing = None;
    for ancestor in dir.ancestors() {
        if ancestor.exists() {
            break;
        }
        missing = Some(ancestor.to_path_buf());
        if ancestor == store_root {
            break;
        }
    }
    missing
}

/// `rel_path` must stay inside the store: relative, no `..`, `.` or root components.
pub(crate) fn check_rel_path(rel_path: &Path) -> Result<(), PackageError> {
    let bad = rel_path.as_os_str().is_empty()
        || rel_path
            .components()
            .any(|c| !matches!(c, Component::Normal(_)));
    if bad {
        return Err(PackageError::InvalidPath {
            path: rel_path.to_path_buf(),
            reason: "must be relative to the store root, without '.' or '..' components",
        });
    }
    Ok(())
}

/// `<final>.<tag>.partial`: where one writer writes a package before moving it into place.
pub fn partial_path_for(final_path: &Path, tag: &str) -> PathBuf {
    let mut name = final_path.as_os_str().to_os_string();
    name.push(format!(".{tag}.partial"));
    PathBuf::from(name)
}

/// The package a partial file was being written for (`<final>.<tag>.partial` → `<final>`).
pub fn partial_target(partial: &Path) -> Option<PathBuf> {
    let name = partial.file_name()?.to_str()?;
    let (target, _tag) = name.strip_suffix(".partial")?.rsplit_once('.')?;
    Some(partial.with_file_name(target))
}

/// True when the process that wrote `partial` (its tag's pid) is no longer alive on this host:
/// its partial can go however recent it is. False when the name has no tag or the process (or
/// a process reusing its pid) is alive.
pub fn partial_writer_gone(partial: &Path) -> bool {
    let Some(name) = partial.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let Some((_, tag)) = name
        .strip_suffix(".partial")
        .and_then(|n| n.rsplit_once('.'))
    else {
        return false;
    };
    match tag
        .split_once('-')
        .and_then(|(pid, _)| pid.parse::<i32>().ok())
    {
        Some(pid) if pid as u32 != std::process::id() => matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        ),
        _ => false,
    }
}

/// Every writer's partial file of the package at `final_path`.
pub fn partials_of(final_path: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (final_path.parent(), final_path.file_name()) else {
        return Vec::new();
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| partial_target(p).is_some_and(|t| t.file_name() == Some(name)))
        .collect();
    out.sort();
    out
}

/// Unique per writer: this process and a random part.
pub(crate) fn writer_tag() -> String {
    format!("{}-{:08x}", std::process::id(), rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_missing_ancestor_stops_at_the_store_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        assert_eq!(
            first_missing_ancestor(&root.join("t/2026"), &root),
            Some(root.clone())
        );
        fs::create_dir_all(root.join("t")).unwrap();
        assert_eq!(
            first_missing_ancestor(&root.join("t/2026/11"), &root),
            Some(root.join("t/2026"))
        );
        assert_eq!(first_missing_ancestor(&root.join("t"), &root), None);
    }

    #[test]
    fn sync_dirs_stops_at_its_bound_and_names_a_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        fs::create_dir_all(&deep).unwrap();
        sync_dirs(&deep, dir.path()).unwrap();
        sync_dirs(&deep, &deep).unwrap();
        let missing = dir.path().join("gone");
        match sync_dirs(&missing, dir.path()) {
            Err(PackageError::Io { path, op, .. }) => {
                assert_eq!((path, op), (missing, "fsyncing directory"));
            }
            other => panic!("expected an fsync error, got {other:?}"),
        }
    }

    #[test]
    fn a_partial_names_the_package_it_was_for() {
        let p = partial_path_for(Path::new("/s/t/000-GetFile.zip"), "12-abcd");
        assert_eq!(p, Path::new("/s/t/000-GetFile.zip.12-abcd.partial"));
        assert_eq!(
            partial_target(&p).unwrap(),
            Path::new("/s/t/000-GetFile.zip")
        );
        assert_eq!(partial_target(Path::new("/s/x.zip")), None);
    }

    #[test]
    fn a_partial_whose_writer_is_gone_is_known_by_its_tag() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let at = |tag: &str| partial_path_for(Path::new("/s/t/000-GetFile.zip"), tag);
        assert!(partial_writer_gone(&at(&format!("{dead}-0badcafe"))));
        assert!(!partial_writer_gone(&at(&format!(
            "{}-0badcafe",
            std::process::id()
        ))));
        assert!(!partial_writer_gone(&at("1-0badcafe")), "pid 1 is alive");
        assert!(!partial_writer_gone(Path::new(
            "/s/t/000-GetFile.zip.partial"
        )));
    }
}
