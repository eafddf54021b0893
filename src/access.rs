//! Who may read and write lrvault's files. The checks made before a command writes anything
//! (the database's directory and file, the evidence store) and before a secret is used (a
//! secret file others can read), each failing with one line that names the path, its owner
//! and mode, and the user this process runs as, so the fix is obvious from the message.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{AccessFlags, Gid, Group, Uid, User};

/// `name (uid N)`, or `uid N` when the name is unknown (a dynamic user seen from outside).
pub fn user_label(uid: u32) -> String {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("{} (uid {uid})", u.name),
        _ => format!("uid {uid}"),
    }
}

/// `name (gid N)`, or `gid N`.
pub fn group_label(gid: u32) -> String {
    match Group::from_gid(Gid::from_raw(gid)) {
        Ok(Some(g)) => format!("{} (gid {gid})", g.name),
        _ => format!("gid {gid}"),
    }
}

/// The user this process acts as (its effective uid).
pub fn process_user() -> String {
    user_label(Uid::effective().as_raw())
}

/// `owned by root (uid 0), group adm (gid 4), mode 0640`.
pub fn describe(meta: &Metadata) -> String {
    format!(
        "owned by {}, group {}, mode {:04o}",
        user_label(meta.uid()),
        group_label(meta.gid()),
        meta.mode() & 0o7777
    )
}

/// The path itself when it exists, else its nearest existing ancestor (what a
/// `create_dir_all` would have to write into).
fn nearest_existing(path: &Path) -> Option<&Path> {
    path.ancestors()
        .find(|p| !p.as_os_str().is_empty() && p.symlink_metadata().is_ok())
}

/// Why this process cannot write `path` (`it is owned by …, and this process runs as …`),
/// or `None` when it can. Judged with the effective ids, as the kernel will judge the write.
fn denied(path: &Path, dir: bool) -> Option<String> {
    let mode = if dir {
        AccessFlags::W_OK | AccessFlags::X_OK
    } else {
        AccessFlags::R_OK | AccessFlags::W_OK
    };
    match nix::unistd::eaccess(path, mode) {
        Ok(()) => None,
        Err(Errno::EROFS) => Some("it is on a read-only file system".into()),
        Err(_) => {
            let found = path
                .metadata()
                .map(|m| format!("it is {}", describe(&m)))
                .unwrap_or_else(|e| format!("it cannot be inspected: {e}"));
            Some(format!(
                "{found}, and this process runs as {}",
                process_user()
            ))
        }
    }
}

/// Checks that this process can create and write files in directory `dir` (created later
/// if missing: then its nearest existing ancestor must be writable). `what` names the
/// config key or role for the message.
pub fn check_dir_writable(what: &str, dir: &Path) -> Result<(), String> {
    let Some(existing) = nearest_existing(dir) else {
        return Ok(());
    };
    let Some(why) = denied(existing, true) else {
        return Ok(());
    };
    let verb = if existing == dir {
        format!("{what} {} is not writable", dir.display())
    } else {
        format!(
            "{what} {} cannot be created in {}",
            dir.display(),
            existing.display()
        )
    };
    Err(format!(
        "{verb}: {why}; run lrvault as the user that owns it (the service user, see docs/operations.md §4) or give that user the directory"
    ))
}

/// Before opening the database at `path` for writing: this process must be able to write its
/// directory and the database files that exist, and must not be root over a database the
/// service user owns. Each refusal is one line naming the path, its owner and mode, and this
/// user. The one write check of the database, made at start-up and by every open for
/// writing.
pub fn check_database_writable(path: &Path) -> Result<(), String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let [wal, shm] = sqlite_sidecars(path);
    check_not_root_over("database", path)?;
    check_dir_writable("the database directory", dir)?;
    check_file_writable("database file", path)?;
    check_file_writable("database file", &wal)?;
    check_file_writable("database file", &shm)
}

/// Checks that an existing file can be read and written (the database and its `-wal` and
/// `-shm`, which a command run as root may have left owned by root).
pub fn check_file_writable(what: &str, file: &Path) -> Result<(), String> {
    if file.symlink_metadata().is_err() {
        return Ok(());
    }
    match denied(file, false) {
        None => Ok(()),
        Some(why) => Err(format!(
            "{what} {} is not writable: {why}; a command run as another user (root?) created it: give it back to the service user (chown --reference={} {})",
            file.display(),
            file.parent().unwrap_or(Path::new("/")).display(),
            file.display()
        )),
    }
}

/// Root can write anywhere, which is the danger: files it creates beside a database the
/// service user owns (a new `-wal`, packages, directories) lock the service out. Refuses
/// when this process is root and `path` (or its nearest existing ancestor) belongs to
/// another user.
pub fn check_not_root_over(what: &str, path: &Path) -> Result<(), String> {
    if !Uid::effective().is_root() {
        return Ok(());
    }
    let Some(existing) = nearest_existing(path) else {
        return Ok(());
    };
    let Ok(meta) = existing.metadata() else {
        return Ok(());
    };
    if meta.uid() == 0 {
        return Ok(());
    }
    let owner = if existing == path {
        "it".to_string()
    } else {
        existing.display().to_string()
    };
    Err(format!(
        "refusing to write to {what} {} as root: {owner} belongs to {}, and files root creates there would lock the service out; run the command as that user (docs/operations.md §4)",
        path.display(),
        user_label(meta.uid())
    ))
}

/// The `-wal` and `-shm` files SQLite keeps beside a WAL database.
pub fn sqlite_sidecars(db: &Path) -> [PathBuf; 2] {
    ["-wal", "-shm"].map(|suffix| {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    })
}

/// Who besides root and this process's user could change `meta`'s file: its owner when it
/// is another user, a group other than root's and this process's, or every user. `None`
/// when nobody else can. A sticky directory (`/tmp`) lets others add entries, not replace
/// this one, so `sticky_ok` accepts it for directories.
fn other_writers(meta: &Metadata, sticky_ok: bool) -> Option<String> {
    let me = Uid::effective().as_raw();
    let mode = meta.mode();
    if meta.uid() != 0 && meta.uid() != me {
        return Some(format!("its owner {}", user_label(meta.uid())));
    }
    if mode & 0o002 != 0 && !(sticky_ok && mode & 0o1000 != 0) {
        return Some("every user".into());
    }
    let gid = meta.gid();
    if mode & 0o020 != 0 && gid != 0 && gid != Gid::effective().as_raw() {
        return Some(format!("the group {}", group_label(gid)));
    }
    None
}

/// Before the config is read: it decides where the client secret is sent (`login_base`) and
/// where evidence goes, so only root and the user this process runs as may change it (the
/// file and its directory); and when it cannot be read, the message says why (owner, mode,
/// this user), not which option names it. A missing file is left to the caller.
pub fn check_config_file(path: &Path) -> Result<(), String> {
    let Ok(meta) = path.metadata() else {
        return Ok(());
    };
    if let Err(e) = nix::unistd::eaccess(path, AccessFlags::R_OK) {
        return Err(format!(
            "cannot read config file {}: {}: it is {}, and this process runs as {}; make it readable by the service user (chmod 0644: it holds no secrets)",
            path.display(),
            std::io::Error::from(e),
            describe(&meta),
            process_user()
        ));
    }
    if let Some(who) = other_writers(&meta, false) {
        return Err(format!(
            "config file {} can be changed by {who} ({}); it decides where the client secret is sent: make it root's and not writable by others (chown root:root, chmod 0644)",
            path.display(),
            describe(&meta)
        ));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some((dir, meta)) = dir.and_then(|d| Some((d, d.metadata().ok()?)))
        && let Some(who) = other_writers(&meta, true)
    {
        return Err(format!(
            "config file {} is in the directory {}, which {who} can change ({}); whoever can write the directory can replace the file: make it root's and not writable by others (chown root:root, chmod 0755)",
            path.display(),
            dir.display(),
            describe(&meta)
        ));
    }
    Ok(())
}

/// The daemon never runs as root unless told to: the database, its `-wal` and every package it
/// creates would belong to root and lock the service user out (docs/operations.md §1.6).
/// `allow` is `LRVAULT_ALLOW_ROOT=1`, for a container where root is the only user.
pub fn check_daemon_user(euid: u32, allow: bool) -> Result<(), String> {
    if euid != 0 || allow {
        return Ok(());
    }
    Err("refusing to run the daemon as root: the database, its -wal and the packages it creates would belong to root and lock the service user out; start the service (systemctl start lrvault), which runs it as the service user, or set LRVAULT_ALLOW_ROOT=1 where root is the only user (a container)".into())
}

/// Who besides the owner can read a secret file, judged from its mode and group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretExposure {
    /// Only the owner, root and this process's own groups.
    Private,
    /// A group this process is not in can read it (a warning, not a refusal).
    Group(String),
    /// Every user on the machine can read it.
    World,
}

/// Classifies a secret file's readers. Group bits are allowed for this process's own groups
/// and for root's group: systemd's credentials carry an ACL whose mask shows as group read,
/// and `root:lrvault 0640` is how a static service user is given a file it does not own.
pub fn secret_exposure(meta: &Metadata) -> SecretExposure {
    let mode = meta.mode();
    if mode & 0o006 != 0 {
        return SecretExposure::World;
    }
    if mode & 0o060 == 0 || meta.gid() == 0 {
        return SecretExposure::Private;
    }
    let gid = Gid::from_raw(meta.gid());
    let mine = gid == Gid::effective() || nix::unistd::getgroups().is_ok_and(|g| g.contains(&gid));
    if mine {
        SecretExposure::Private
    } else {
        SecretExposure::Group(group_label(meta.gid()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secret_exposure_by_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "x").unwrap();
        let at = |mode: u32| {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            secret_exposure(&p.metadata().unwrap())
        };
        assert_eq!(at(0o600), SecretExposure::Private);
        assert_eq!(at(0o400), SecretExposure::Private);
        assert_eq!(at(0o644), SecretExposure::World);
        assert_eq!(at(0o602), SecretExposure::World);
        // The file's group is this process's own: allowed.
        assert_eq!(at(0o640), SecretExposure::Private);
    }

    #[test]
    fn only_root_or_this_user_may_change_the_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = dir.path().join("lrvault.toml");
        std::fs::write(&p, "").unwrap();
        let set = |mode: u32| {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            check_config_file(&p)
        };
        assert_eq!(set(0o644), Ok(()));
        let meta = p.metadata().unwrap();
        assert_eq!(
            set(0o666),
            Err(format!(
                "config file {} can be changed by every user (owned by {}, group {}, mode 0666); it decides where the client secret is sent: make it root's and not writable by others (chown root:root, chmod 0644)",
                p.display(),
                user_label(meta.uid()),
                group_label(meta.gid())
            ))
        );
        set(0o644).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            check_config_file(&p)
                .unwrap_err()
                .contains("which every user can change (")
        );
        // A sticky directory (/tmp) lets others add files, not replace this one.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(check_config_file(&p), Ok(()));
        assert_eq!(check_config_file(&dir.path().join("missing.toml")), Ok(()));
    }

    #[test]
    fn the_daemon_refuses_root_unless_allowed() {
        assert_eq!(check_daemon_user(1000, false), Ok(()));
        assert_eq!(check_daemon_user(0, true), Ok(()));
        assert!(
            check_daemon_user(0, false)
                .unwrap_err()
                .starts_with("refusing to run the daemon as root: ")
        );
    }

    #[test]
    fn sidecars_sit_beside_the_database() {
        assert_eq!(
            sqlite_sidecars(Path::new("/v/l.db")),
            [PathBuf::from("/v/l.db-wal"), PathBuf::from("/v/l.db-shm")]
        );
    }

    #[test]
    fn a_missing_directory_is_judged_by_its_nearest_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        assert_eq!(nearest_existing(&deep), Some(dir.path()));
        check_dir_writable("store.root", &deep).unwrap();
    }
}
