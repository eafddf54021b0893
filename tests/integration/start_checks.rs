//! Issue 10: what lrvault checks before it does any work: absolute paths, a database directory,
//! database file and store this user can write (and root not writing into the service user's
//! files), secret files and their contents, schedules, and what `status` and `audit` say before
//! the first start. Each is one line on stderr and exit code 2, checked word for word.
//!
//! Permission checks need a user the files refuse: as root the binary runs as `nobody`
//! (65534); as another user the directories are simply made read-only for their owner.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};

use crate::cli::{lrvault, one_line_error, run};

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    Uid::effective().is_root()
}

use lrvault::access::{group_label as group, user_label as user};

/// `owned by …, group …, mode 0555` of an existing path.
fn found(path: &Path) -> String {
    lrvault::access::describe(&path.metadata().unwrap())
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A temp directory others may enter (the binary may run as `nobody`).
fn open_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    let path = dir.path().canonicalize().unwrap();
    (dir, path)
}

/// A directory this test's lrvault (see [`refused`]) may write.
fn writable_dir(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    if is_root() {
        nix::unistd::chown(
            path,
            Some(Uid::from_raw(NOBODY)),
            Some(Gid::from_raw(NOBODY)),
        )
        .unwrap();
    }
    path.to_path_buf()
}

/// Runs `lrvault --config cfg args` as the user the read-only files refuse (`nobody` when
/// the test runs as root, who may write anywhere; else this user) and expects one line and
/// exit code 2; returns (the line, that user).
fn refused(cfg: &Path, args: &[&str]) -> (String, String) {
    let mut c = lrvault();
    let me = if is_root() {
        c.uid(NOBODY).gid(NOBODY);
        user(NOBODY)
    } else {
        user(Uid::effective().as_raw())
    };
    (one_line_error(c.arg("--config").arg(cfg).args(args)), me)
}

/// A config at `dir/c.toml` with these database and store paths and one tenant whose secret
/// comes from `secret` (a TOML `key = value` line); the API is a closed local port.
fn config(dir: &Path, db: &str, store: &str, secret: &str) -> PathBuf {
    let path = dir.join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\npath = {db:?}\n[store]\nroot = {store:?}\n[[tenant]]\nname = \"contoso\"\ntenant_id = \"t\"\nclient_id = \"c\"\n{secret}\napi_base = \"http://127.0.0.1:9\"\nlogin_base = \"http://127.0.0.1:9\"\n"
        ),
    )
    .unwrap();
    chmod(&path, 0o644);
    path
}

fn paths(dir: &Path) -> (String, String) {
    (
        dir.join("lrvault.db").display().to_string(),
        dir.join("evidence").display().to_string(),
    )
}

#[test]
fn relative_paths_in_the_config_are_refused_with_their_key() {
    let (_t, dir) = open_dir();
    let (db, store) = paths(&dir);
    for (key, db, store, value) in [
        ("database.path", "lrvault.db", store.as_str(), "lrvault.db"),
        ("store.root", db.as_str(), "evidence", "evidence"),
    ] {
        let cfg = config(&dir, db, store, "client_secret_env = \"X\"");
        for cmd in [&["status"][..], &["archive"], &["backup", "--to", "/tmp/x"]] {
            let line = one_line_error(
                lrvault()
                    .arg("--config")
                    .arg(&cfg)
                    .args(cmd)
                    .current_dir(&dir),
            );
            assert_eq!(
                line,
                format!(
                    "lrvault: invalid config: {key} = \"{value}\" is a relative path; write it absolute: lrvault never resolves paths against the working directory"
                )
            );
        }
    }
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "nothing but the config was created"
    );
}

#[test]
fn an_unwritable_database_directory_store_or_database_file_names_owner_mode_and_user() {
    let (_t, dir) = open_dir();
    let locked = dir.join("locked");
    std::fs::create_dir(&locked).unwrap();
    chmod(&locked, 0o555);
    let fine = writable_dir(&dir.join("fine"));

    // The database's directory.
    let (db, store) = paths(&locked);
    let (_, fine_store) = paths(&fine);
    let cfg = config(&dir, &db, &fine_store, "client_secret_env = \"X\"");
    let (line, me) = refused(&cfg, &["migrate"]);
    assert_eq!(
        line,
        format!(
            "lrvault: the database directory {} is not writable: it is {}, and this process runs as {me}; run lrvault as the user that owns it (the service user, see docs/operations.md §4) or give that user the directory",
            locked.display(),
            found(&locked)
        )
    );

    // The store, which does not exist yet: its parent is what refuses.
    let (fine_db, _) = paths(&fine);
    let cfg = config(&dir, &fine_db, &store, "client_secret_env = \"X\"");
    let (line, me) = refused(&cfg, &["archive"]);
    assert_eq!(
        line,
        format!(
            "lrvault: store.root {store} cannot be created in {}: it is {}, and this process runs as {me}; run lrvault as the user that owns it (the service user, see docs/operations.md §4) or give that user the directory",
            locked.display(),
            found(&locked)
        )
    );
    assert!(
        !Path::new(&fine_db).exists(),
        "refused before the database was opened"
    );

    // A database file (here its -wal) left by another user: the "readonly database" case.
    let wal = fine.join("lrvault.db-wal");
    std::fs::write(&wal, b"").unwrap();
    chmod(&wal, 0o444);
    let cfg = config(&dir, &fine_db, &fine_store, "client_secret_env = \"X\"");
    let (line, me) = refused(&cfg, &["migrate"]);
    assert_eq!(
        line,
        format!(
            "lrvault: database file {} is not writable: it is {}, and this process runs as {me}; a command run as another user (root?) created it: give it back to the service user (chown --reference={} {})",
            wal.display(),
            found(&wal),
            fine.display(),
            wal.display()
        )
    );
}

#[test]
fn root_is_refused_over_files_the_service_user_owns() {
    if !is_root() {
        eprintln!("skipped: only root can be refused here");
        return;
    }
    let (_t, dir) = open_dir();
    let state = writable_dir(&dir.join("state"));
    let (db, store) = paths(&state);
    let cfg = config(&dir, &db, &store, "client_secret_env = \"X\"");
    let line = one_line_error(lrvault().arg("--config").arg(&cfg).arg("migrate"));
    assert_eq!(
        line,
        format!(
            "lrvault: refusing to write to database {db} as root: {} belongs to {}, and files root creates there would lock the service out; run the command as that user (docs/operations.md §4)",
            state.display(),
            user(NOBODY)
        )
    );
    // The service user creates it; root is still refused, now by the file itself.
    let (code, _, err) = run(lrvault()
        .arg("--config")
        .arg(&cfg)
        .arg("migrate")
        .uid(NOBODY)
        .gid(NOBODY));
    assert_eq!(code, 0, "{err}");
    let line = one_line_error(lrvault().arg("--config").arg(&cfg).arg("archive"));
    assert_eq!(
        line,
        format!(
            "lrvault: refusing to write to database {db} as root: it belongs to {}, and files root creates there would lock the service out; run the command as that user (docs/operations.md §4)",
            user(NOBODY)
        )
    );
    let line = one_line_error(lrvault().arg("--config").arg(&cfg).args([
        "backup",
        "--to",
        &dir.join("b.db").display().to_string(),
    ]));
    assert!(
        line.starts_with(&format!(
            "lrvault: refusing to write to database {db} as root: it belongs to {}",
            user(NOBODY)
        )),
        "{line}"
    );
    // Reading is fine as root.
    let (code, _, err) = run(lrvault().arg("--config").arg(&cfg).arg("status"));
    assert_eq!(code, 0, "{err}");
}

/// `discover` with the secret file holding `bytes` (mode `mode`); (exit code, stderr).
fn discover_with_secret(dir: &Path, bytes: &[u8], mode: u32) -> (i32, String, PathBuf) {
    let secret = dir.join("secret");
    std::fs::write(&secret, bytes).unwrap();
    chmod(&secret, mode);
    let (db, store) = paths(dir);
    let cfg = config(
        dir,
        &db,
        &store,
        &format!("client_secret_file = {:?}", secret.display().to_string()),
    );
    created(&cfg);
    let (code, _, err) = run(lrvault().arg("--config").arg(&cfg).arg("discover"));
    (code, err, secret)
}

/// Creates the database `cfg` names, as the first start does: `discover` only opens it.
fn created(cfg: &Path) {
    let (code, _, err) = run(lrvault().arg("--config").arg(cfg).arg("migrate"));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_secret_file_every_user_can_read_is_refused() {
    let (_t, dir) = open_dir();
    let (code, err, secret) = discover_with_secret(&dir, b"s3cret", 0o644);
    assert_eq!(code, 2, "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "lrvault: tenant 'contoso': client_secret_file {} is readable by every user ({}); chmod 0600 it (0640 with the service's group) and rotate the secret if others may have read it",
            secret.display(),
            found(&secret)
        )
    );
    assert!(!err.contains("s3cret"));
    // 0600 passes the check: the command gets as far as the (closed) API port.
    let (code, err, _) = discover_with_secret(&dir, b"s3cret", 0o600);
    assert_eq!(code, 1, "{err}");
    assert!(!err.contains("client_secret_file"), "{err}");
    if is_root() {
        // A group this process is not in may read it: one warning, and the work goes on.
        let (_, _, secret) = discover_with_secret(&dir, b"s3cret", 0o640);
        nix::unistd::chown(&secret, None, Some(Gid::from_raw(NOBODY))).unwrap();
        let cfg = dir.join("c.toml");
        let (code, _, err) = run(lrvault().arg("--config").arg(&cfg).arg("discover"));
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains(&format!(
                "client_secret_file is readable by group {}, which this process is not in; only its owner and the service need it",
                group(NOBODY)
            )),
            "{err}"
        );
    }
}

#[test]
fn secret_contents_an_editor_mangled_are_refused_without_showing_them() {
    let (_t, dir) = open_dir();
    let only_one = "only one final newline is allowed (write it with printf '%s')";
    for (bytes, problem) in [
        (
            &b"\xef\xbb\xbfs3cret"[..],
            "starts with a byte order mark (U+FEFF); save it as plain UTF-8 without BOM"
                .to_string(),
        ),
        (
            b"s3cret\r\n",
            format!(
                "ends with a carriage return (\\r, a Windows line ending) after the secret; {only_one}"
            ),
        ),
        (
            b"s3cret \n",
            format!("ends with a space after the secret; {only_one}"),
        ),
        (
            b"s3cret\n\n",
            format!("ends with a second newline after the secret; {only_one}"),
        ),
        (
            b"\ts3cret\n",
            "starts with a tab; the file must hold the secret value alone".to_string(),
        ),
        (
            b"secret-id\ns3cret\n",
            "holds more than one line; it must hold the secret value alone".to_string(),
        ),
        (b"\n", "is empty".to_string()),
    ] {
        let (code, err, secret) = discover_with_secret(&dir, bytes, 0o600);
        assert_eq!(code, 2, "{err}");
        assert_eq!(
            err.trim_end(),
            format!(
                "lrvault: tenant 'contoso': client_secret_file {} {problem}",
                secret.display()
            )
        );
        assert!(!err.contains("s3cret"), "{err}");
    }
    // One final newline is the one thing allowed.
    let (code, err, _) = discover_with_secret(&dir, b"s3cret\n", 0o600);
    assert_eq!(code, 1, "past the secret, to the closed API port: {err}");
    // An environment variable gets the same checks.
    let (db, store) = paths(&dir);
    let cfg = config(
        &dir,
        &db,
        &store,
        "client_secret_env = \"LRVAULT_T_SECRET\"",
    );
    let line = one_line_error(
        lrvault()
            .arg("--config")
            .arg(&cfg)
            .env("LRVAULT_T_SECRET", "s3cret\r\n")
            .arg("discover"),
    );
    assert_eq!(
        line,
        format!(
            "lrvault: tenant 'contoso': client_secret_env LRVAULT_T_SECRET ends with a carriage return (\\r, a Windows line ending) after the secret; {only_one}"
        )
    );
}

#[test]
fn a_relative_secret_name_says_where_it_was_looked_up() {
    let (_t, dir) = open_dir();
    let (db, store) = paths(&dir);
    let cfg = config(&dir, &db, &store, "client_secret_file = \"contoso\"");
    created(&cfg);
    let line = one_line_error(
        lrvault()
            .arg("--config")
            .arg(&cfg)
            .env_remove("CREDENTIALS_DIRECTORY")
            .current_dir(&dir)
            .arg("discover"),
    );
    assert_eq!(
        line,
        format!(
            "lrvault: tenant 'contoso': cannot read client_secret_file contoso: No such file or directory (os error 2) (the relative name was looked up in the working directory {} because $CREDENTIALS_DIRECTORY is not set: run under systemd with LoadCredential=, or write an absolute path)",
            dir.display()
        )
    );
    // Under systemd the name is a credential.
    let creds = dir.join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("contoso"), "s3cret").unwrap();
    chmod(&creds.join("contoso"), 0o400);
    let (code, _, err) = run(lrvault()
        .arg("--config")
        .arg(&cfg)
        .env("CREDENTIALS_DIRECTORY", &creds)
        .arg("discover"));
    assert_eq!(code, 1, "found, then the closed API port: {err}");
    assert!(!err.contains("client_secret_file"), "{err}");
}

#[test]
fn a_bad_schedule_is_one_line_before_anything_starts() {
    let (_t, dir) = open_dir();
    let (db, store) = paths(&dir);
    let cfg = config(&dir, &db, &store, "client_secret_env = \"X\"");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    // Five fields: the classic crontab mistake.
    text += "[schedule]\ndiscover = \"*/5 * * * *\"\n";
    std::fs::write(&cfg, text).unwrap();
    let line = one_line_error(lrvault().arg("--config").arg(&cfg).arg("run"));
    assert_eq!(
        line,
        "lrvault: invalid cron expression for schedule.discover '*/5 * * * *': it has 5 fields; lrvault takes exactly 6, seconds first (sec min hour day-of-month month day-of-week), in UTC"
    );
    assert!(!Path::new(&db).exists(), "nothing was opened");
}

#[test]
fn before_the_first_start_every_command_but_run_and_migrate_shows_how_to_migrate_as_the_service_user()
 {
    let (_t, dir) = open_dir();
    let (db, store) = paths(&dir);
    let cfg = config(&dir, &db, &store, "client_secret_env = \"X\"");
    let exe = env!("CARGO_BIN_EXE_lrvault");
    let migrate = format!("{exe} --config {} migrate", cfg.display());
    let expected = format!(
        "lrvault: database {db} does not exist yet: start the service (systemctl start lrvault), which creates it as the service user, or run migrate as that user: systemd-run --wait --pty --collect -p User=lrvault -p Group=lrvault -p StateDirectory=lrvault -p UMask=0027 {migrate} (or: sudo -u lrvault {migrate}); not as root, whose files would lock the service out"
    );
    let backup = dir.join("b.db").display().to_string();
    for cmd in [
        &["status"][..],
        &["audit", "evidence"],
        &["audit", "quota"],
        &["discover"],
        &["archive"],
        &["verify"],
        &["backup", "--to", &backup],
    ] {
        let line = one_line_error(lrvault().arg("--config").arg(&cfg).args(cmd));
        assert_eq!(line, expected, "{cmd:?}");
    }
    // Issue 20: a relative --config is pasted absolute (systemd-run runs the command in /).
    let line = one_line_error(
        lrvault()
            .args(["--config", "c.toml", "status"])
            .current_dir(&dir),
    );
    assert_eq!(line, expected);
    assert!(!Path::new(&db).exists(), "only run and migrate create it");
    // The unit the hint imitates runs as the user and state directory it names.
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/lrvault.service"
    ))
    .unwrap();
    for line in [
        "User=lrvault",
        "Group=lrvault",
        "StateDirectory=lrvault",
        "UMask=0027",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line}");
    }
}

/// Issue 20: a config that others can change is refused (it decides where the secret goes).
#[test]
fn a_config_others_can_change_is_refused() {
    let (_t, dir) = open_dir();
    let (db, store) = paths(&dir);
    let cfg = config(&dir, &db, &store, "client_secret_env = \"X\"");
    chmod(&cfg, 0o666);
    let line = one_line_error(lrvault().arg("--config").arg(&cfg).arg("status"));
    assert_eq!(
        line,
        format!(
            "lrvault: config file {} can be changed by every user ({}); it decides where the client secret is sent: make it root's and not writable by others (chown root:root, chmod 0644)",
            cfg.display(),
            found(&cfg)
        )
    );
    chmod(&cfg, 0o644);
    chmod(&dir, 0o777);
    let line = one_line_error(lrvault().arg("--config").arg(&cfg).arg("status"));
    assert_eq!(
        line,
        format!(
            "lrvault: config file {} is in the directory {}, which every user can change ({}); whoever can write the directory can replace the file: make it root's and not writable by others (chown root:root, chmod 0755)",
            cfg.display(),
            dir.display(),
            found(&dir)
        )
    );
    chmod(&dir, 0o755);
    assert!(
        !Path::new(&db).exists(),
        "refused before anything was opened"
    );
}

/// Issue 20: an unreadable config says why (owner, mode, this user), not "set --config".
#[test]
fn an_unreadable_config_names_its_owner_mode_and_this_user() {
    let (_t, dir) = open_dir();
    let (db, store) = paths(&dir);
    let cfg = config(&dir, &db, &store, "client_secret_env = \"X\"");
    // Root reads anything: as root, `nobody` is refused a 0600 file; otherwise mode 0200.
    chmod(&cfg, if is_root() { 0o600 } else { 0o200 });
    let (line, me) = refused(&cfg, &["status"]);
    assert_eq!(
        line,
        format!(
            "lrvault: cannot read config file {}: Permission denied (os error 13): it is {}, and this process runs as {me}; make it readable by the service user (chmod 0644: it holds no secrets)",
            cfg.display(),
            found(&cfg)
        )
    );
}

/// Issue 20: `run` as root is refused unless LRVAULT_ALLOW_ROOT=1 (a container's only user).
/// Not root: the same binary gets past that check (to the closed API port's config).
#[test]
fn the_daemon_refuses_to_run_as_root() {
    let (_t, dir) = open_dir();
    let (db, store) = paths(&dir);
    let cfg = config(&dir, &db, &store, "client_secret_env = \"X\"");
    let mut cmd = lrvault();
    cmd.env_remove("LRVAULT_ALLOW_ROOT")
        .arg("--config")
        .arg(&cfg)
        .arg("run");
    if is_root() {
        assert_eq!(
            one_line_error(&mut cmd),
            "lrvault: refusing to run the daemon as root: the database, its -wal and the packages it creates would belong to root and lock the service user out; start the service (systemctl start lrvault), which runs it as the service user, or set LRVAULT_ALLOW_ROOT=1 where root is the only user (a container)"
        );
        assert!(!Path::new(&db).exists(), "nothing was created");
    } else {
        let line = one_line_error(&mut cmd);
        assert!(!line.contains("as root"), "{line}");
    }
}

/// Issue 20: `backup --to` a relative path, or into a directory this user cannot write, is
/// refused before anything is opened, with the fix.
#[test]
fn backup_to_a_relative_or_unwritable_path_is_refused() {
    let (_t, dir) = open_dir();
    let state = writable_dir(&dir.join("state"));
    let (db, store) = paths(&state);
    let cfg = config(&dir, &db, &store, "client_secret_env = \"X\"");
    let (line, _) = refused(&cfg, &["backup", "--to", "lrvault-copy.db"]);
    assert_eq!(
        line,
        "lrvault: backup --to lrvault-copy.db is a relative path; write it absolute, in a directory the service user can write (e.g. /var/lib/lrvault/backup/lrvault-$(date -u +%Y%m%dT%H%M%SZ).db)"
    );
    let locked = dir.join("locked");
    std::fs::create_dir(&locked).unwrap();
    chmod(&locked, 0o555);
    let to = locked.join("copy.db");
    let (line, me) = refused(&cfg, &["backup", "--to", &to.display().to_string()]);
    assert_eq!(
        line,
        format!(
            "lrvault: the backup directory {} is not writable: it is {}, and this process runs as {me}; run lrvault as the user that owns it (the service user, see docs/operations.md §4) or give that user the directory",
            locked.display(),
            found(&locked)
        )
    );
    assert!(
        !Path::new(&db).exists(),
        "refused before the database was opened"
    );
}
