//! Issue 10: `docs/operations.md`, run as written. Every shell block the guide marks
//! `<!-- test: NAME -->` is taken from the file itself and run with bash, in order, against
//! the simulator: install layout, first start, a backup while an archive pass runs,
//! re-queueing a failed result (and a wrong id, exit 1), a restore after a crash that left a
//! WAL, of a backup that holds that result as failed (issue 20: `verify` ends clean), a secret
//! rotation whose wrong new secret leaves the service running on the old one, an upgrade.
//!
//! What a test cannot do without root and systemd is stood in for, and only that:
//! - the guide's absolute paths (`/etc/lrvault`, `/var/lib/lrvault`, …) are moved under a
//!   temporary root ([`MOVED`]), and `lrvault` without `--config` finds the moved config
//!   through `LRVAULT_CONFIG`;
//! - `systemctl`, `journalctl`, `systemd-run`, `systemd-sysusers`, `systemd-tmpfiles` and
//!   `cargo` are stand-ins (`ops_stubs/`): the unit the guide installed is run by its own
//!   `ExecStart=`, `StateDirectory=`, `UMask=` and `LoadCredential=` lines, but as this user
//!   and without a sandbox; the tmpfiles.d directories are made with their modes, no user is
//!   created and nothing is chowned;
//! - the config is edited as 1.3 says an operator edits it: the tenant's ids and URLs (the
//!   simulator), `client_secret_file = "contoso"` (1.4), and quicker schedules;
//! - the crash is a SIGKILL, and the secret rotation's "add a secret in Entra" is the
//!   simulator's.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lrvault_sim::{Fault, SimConfig, SimHandle, Simulator};

use crate::common::{check_bag, files_under, sha256_hex, wait_until};
use crate::custody_chain;

/// The paths the guide names that the test moves under its temporary root.
const MOVED: [&str; 9] = [
    "/etc/lrvault",
    "/etc/systemd/system",
    "/usr/bin",
    "/usr/lib/sysusers.d",
    "/usr/lib/tmpfiles.d",
    "/usr/share/doc/lrvault",
    "/var/lib/lrvault",
    "/var/backups/lrvault",
    "/var/log/journal",
];

/// The procedures, in the order the test runs them.
const STEPS: [&str; 12] = [
    "install-binary",
    "install-config",
    "install-secret",
    "install-unit",
    "first-start",
    "service-user",
    "backup",
    "find-failed",
    "requeue",
    "restore",
    "rotate-secret",
    "upgrade",
];

/// The marked shell blocks of the guide, by name.
fn guide() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    let mut blocks = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .strip_prefix("<!-- test: ")
            .and_then(|l| l.strip_suffix(" -->"))
        else {
            continue;
        };
        assert_eq!(lines.next(), Some("```sh"), "{name}: a sh block follows");
        let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        let fresh = blocks.insert(name.to_string(), body.join("\n") + "\n");
        assert!(fresh.is_none(), "{name} marked twice");
    }
    for step in STEPS {
        assert!(blocks.contains_key(step), "docs/operations.md lost {step}");
    }
    blocks
}

/// A temporary machine: the moved paths, the stand-ins, a checkout of the source.
struct Machine {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    checkout: PathBuf,
    guide: BTreeMap<String, String>,
}

/// The service never outlives the test, even one that fails half-way.
impl Drop for Machine {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.root.join("run/lrvault.pid"))
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Machine {
    fn new() -> Machine {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        for d in [
            "etc/systemd/system",
            "usr/bin",
            "usr/lib/sysusers.d",
            "usr/lib/tmpfiles.d",
            "usr/share/doc",
            "var/lib",
            "var/backups",
            "run",
            "stub-bin",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let stubs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration/ops_stubs");
        for e in std::fs::read_dir(stubs).unwrap() {
            let e = e.unwrap();
            let to = root.join("stub-bin").join(e.file_name());
            std::fs::copy(e.path(), &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // The checkout the install steps run in, with the binary already built.
        let checkout = root.join("src/lrvault");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        for d in ["target/release", "systemd", "packaging", "docs"] {
            std::fs::create_dir_all(checkout.join(d)).unwrap();
        }
        std::fs::copy(
            env!("CARGO_BIN_EXE_lrvault"),
            checkout.join("target/release/lrvault"),
        )
        .unwrap();
        for f in [
            "config.example.toml",
            "README.md",
            "systemd/lrvault.service",
            "packaging/lrvault.sysusers",
            "packaging/lrvault.tmpfiles",
        ] {
            std::fs::copy(repo.join(f), checkout.join(f)).unwrap();
        }
        for e in std::fs::read_dir(repo.join("docs")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), checkout.join("docs").join(e.file_name())).unwrap();
        }
        Machine {
            _tmp: tmp,
            root,
            checkout,
            guide: guide(),
        }
    }

    /// `text` with the guide's paths moved under the root.
    fn map(&self, text: &str) -> String {
        MOVED.iter().fold(text.to_string(), |t, p| {
            t.replace(p, &format!("{}{p}", self.root.display()))
        })
    }

    /// A path of the machine, e.g. `at("/var/lib/lrvault/lrvault.db")`.
    fn at(&self, path: &str) -> PathBuf {
        PathBuf::from(self.map(path))
    }

    /// Runs `script` with bash (`set -eu`, as a careful operator's shell), `as_lrvault` defined
    /// as section 4 defines it; (exit code, stdout, stderr).
    fn sh(&self, script: &str, env: &[(&str, &str)]) -> (i32, String, String) {
        let text = format!("set -eu\n{}\n{}", self.guide["service-user"], script);
        let path = format!(
            "{}:{}:{}",
            self.root.join("stub-bin").display(),
            self.root.join("usr/bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new("bash")
            .arg("-c")
            .arg(self.map(&text))
            .current_dir(&self.checkout)
            .env("PATH", path)
            .env("LRV_ROOT", &self.root)
            .env("LRVAULT_CONFIG", self.at("/etc/lrvault/lrvault.toml"))
            .env_remove("RUST_LOG")
            .env_remove("CREDENTIALS_DIRECTORY")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs the guide's block `name` (after `edit`) and expects exit 0; its stdout.
    fn step(&self, name: &str, edit: impl Fn(String) -> String, env: &[(&str, &str)]) -> String {
        let (code, out, err) = self.sh(&edit(self.guide[name].clone()), env);
        assert_eq!(
            code,
            0,
            "step {name} failed:\n{out}\n{err}\n{}",
            self.journal()
        );
        out
    }

    fn journal(&self) -> String {
        std::fs::read_to_string(self.at("/var/log/journal/lrvault.log")).unwrap_or_default()
    }

    fn db(&self) -> PathBuf {
        self.at("/var/lib/lrvault/lrvault.db")
    }

    fn count(&self, sql: &str) -> i64 {
        rusqlite::Connection::open_with_flags(self.db(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| c.query_row(sql, [], |r| r.get(0)))
            .unwrap_or(-1)
    }

    async fn wait_for(&self, what: &str, sql: &str) {
        let ok = wait_until(Duration::from_secs(90), || self.count(sql) > 0).await;
        assert!(ok, "timed out waiting for {what}\n{}", self.journal());
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// 1.3's "then edit it": the simulator's tenant (its URLs written over the cloud's preset),
/// the secret by its credential name, schedules of seconds, one attempt per result (so the
/// simulator's one failing download leaves a `failed` result to re-queue) and short retries.
fn edit_config(m: &Machine, sim: &SimHandle) {
    let path = m.at("/etc/lrvault/lrvault.toml");
    let t = &sim.sim.tenants()[0];
    let base = sim.base_url();
    let set = [
        ("tenant_id = ", format!("{:?}", t.tenant_id)),
        ("client_id = ", format!("{:?}", t.client_id)),
        ("client_secret_file = ", "\"contoso\"".to_string()),
        ("api_base = ", format!("{base:?}")),
        ("login_base = ", format!("{base:?}")),
        ("download_hosts = ", "[\"127.0.0.1\"]".to_string()),
        ("discover = ", "\"*/5 * * * * *\"".to_string()),
        ("archive = ", "\"*/2 * * * * *\"".to_string()),
        ("max_attempts = ", "1".to_string()),
        ("retry_base = ", "\"200ms\"".to_string()),
        ("retry_max = ", "\"2s\"".to_string()),
    ];
    let text = m.map(&std::fs::read_to_string(&path).unwrap());
    let mut out = String::new();
    for line in text.lines() {
        // The example leaves the cloud's host keys commented out: set means uncommented.
        let key = line.strip_prefix("# ").unwrap_or(line);
        match set.iter().find(|(k, _)| key.starts_with(k)) {
            Some((k, v)) => out += &format!("{k}{v}\n"),
            None => out += &format!("{line}\n"),
        }
    }
    for (k, _) in &set {
        assert_eq!(out.lines().filter(|l| l.starts_with(k)).count(), 1, "{k}");
    }
    std::fs::write(&path, out).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operations_guide_runs_as_written() {
    let sim = Simulator::new(SimConfig {
        seed: 5,
        actions: 14,
        max_getfile_size: 30_000,
        faults: vec![Fault::Blob5xx(1), Fault::Slow(5_000), Fault::TokenTtl(4)],
        ..SimConfig::default()
    })
    .start()
    .await
    .unwrap();
    let m = Machine::new();
    let secret = sim.sim.tenants()[0].client_secret.clone();

    install(&m, &sim, &secret);
    first_start(&m).await;
    let backup = backup_during_a_pass(&m).await;
    let requeued = requeue(&m).await;
    restore_after_a_crash(&m, &backup, &requeued).await;
    rotate_the_secret(&m, &sim, &secret).await;
    let out = m.step("upgrade", |s| s, &[]);
    assert_eq!(out, "1\n", "one start since the binary was replaced");
    let (code, out, _) = m.sh("systemctl is-active lrvault", &[]);
    assert_eq!((code, out.as_str()), (0, "active\n"));

    // Every result the simulator has is archived once, and verifies.
    m.wait_for(
        "the queue to drain",
        "SELECT count(*) = 0 FROM results WHERE state NOT IN ('archived', 'skipped')",
    )
    .await;
    m.sh("systemctl stop lrvault", &[]);
    everything_archived_once(&m, &sim);
}

/// 1.1 to 1.5, and what `status` says before the first start.
fn install(m: &Machine, sim: &SimHandle, secret: &str) {
    m.step("install-binary", |s| s, &[]);
    m.step("install-config", |s| s, &[]);
    edit_config(m, sim);
    m.step("install-secret", |s| s, &[("CONTOSO_SECRET", secret)]);
    m.step("install-unit", |s| s, &[]);
    assert_eq!(mode(&m.at("/usr/bin/lrvault")), 0o755);
    assert_eq!(mode(&m.at("/var/lib/lrvault")), 0o750);
    assert_eq!(mode(&m.at("/etc/lrvault/lrvault.toml")), 0o644);
    assert_eq!(mode(&m.at("/etc/lrvault/secrets")), 0o700);
    let file = m.at("/etc/lrvault/secrets/contoso");
    assert_eq!(mode(&file), 0o600);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), secret);
    assert_eq!(
        std::fs::read(m.at("/etc/systemd/system/lrvault.service")).unwrap(),
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/systemd/lrvault.service"
        ))
        .unwrap()
    );
    assert!(m.at("/usr/share/doc/lrvault/operations.md").exists());
    // Before the first start: no database, and a hint that does not say "as root".
    let (code, _, err) = m.sh("lrvault status", &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("does not exist yet: start the service (systemctl start lrvault)"),
        "{err}"
    );
    assert!(!m.db().exists());
}

/// 1.6: the service creates its state directory (mode from the unit) and the database.
async fn first_start(m: &Machine) {
    let out = m.step("first-start", |s| s, &[]);
    assert!(out.contains("lrvault daemon started"), "{out}");
    assert!(out.contains("Queue by state:"), "{out}");
    assert_eq!(mode(&m.at("/var/lib/lrvault")), 0o750);
    assert!(m.db().exists());
}

/// Section 9: the simulator's one failing download left a `failed` result (in the backup
/// too); the guide finds it and re-queues it with `lrvault requeue` as the service user, and
/// it is archived. A wrong id is refused with exit 1 and nothing written. Returns the
/// result's (action, index).
async fn requeue(m: &Machine) -> (String, u32) {
    let out = m.step("find-failed", |s| s, &[]);
    let failed: Vec<&str> = out.lines().filter(|l| l.contains("|failed|")).collect();
    assert_eq!(failed.len(), 1, "{out}");
    let f: Vec<&str> = failed[0].split('|').collect();
    assert_eq!(f[0], "contoso", "{out}");
    let (action, index) = (f[1].to_string(), f[2].to_string());
    let with = |action: &str, index: &str| {
        let action = action.to_string();
        let index = index.to_string();
        move |s: String| {
            assert_eq!(s.matches("'<action id>'").count(), 1);
            assert_eq!(s.matches("--index 2 ").count(), 1);
            s.replace("'<action id>'", &format!("'{action}'"))
                .replace("--index 2 ", &format!("--index {index} "))
        }
    };
    // A wrong id: exit 1, one line, no re-queue row (the daemon goes on writing its own).
    let rows = || {
        m.count("SELECT count(*) FROM custody_log WHERE json_extract(detail, '$.requeued_by') IS NOT NULL")
    };
    let before = rows();
    let (code, out, err) = m.sh(
        &with("no-such-action", &index)(m.guide["requeue"].clone()),
        &[],
    );
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert_eq!(
        err,
        format!(
            "lrvault: no failed or unavailable result of tenant 'contoso' matches --action no-such-action --index {index}; nothing re-queued\n"
        )
    );
    assert_eq!(rows(), before, "nothing written");
    let out = m.step("requeue", with(&action, &index), &[]);
    assert_eq!(
        out,
        format!(
            "re-queued 1 result; the next archive pass fetches it:\ncontoso {action} {index}\n"
        )
    );
    m.wait_for(
        "the re-queued result to be archived",
        &format!(
            "SELECT count(*) FROM results WHERE action_id = '{action}' AND command_index = {index} AND state = 'archived'"
        ),
    )
    .await;
    let index: u32 = index.parse().unwrap();
    // The history stays: the FAILED row, the QUEUED row that says who and why, the new attempt.
    let conn =
        rusqlite::Connection::open_with_flags(m.db(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    assert_eq!(
        events(&conn, &action, index),
        [
            "LINK_ISSUED",
            "FAILED",
            "QUEUED",
            "LINK_ISSUED",
            "DOWNLOADED",
            "PUBLISHING",
            "ARCHIVED"
        ],
        "{action}/{index}"
    );
    let (reason, from): (String, String) = conn
        .query_row(
            "SELECT json_extract(detail, '$.reason'), json_extract(detail, '$.from_state') FROM custody_log
             WHERE event = 'QUEUED' AND action_id = ?1 AND command_index = ?2 ORDER BY seq DESC LIMIT 1",
            rusqlite::params![action, index],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (reason.as_str(), from.as_str()),
        ("ticket IR-1234", "failed")
    );
    (action, index)
}

/// A result's custody events after its discovery, in order.
fn events(conn: &rusqlite::Connection, action: &str, index: u32) -> Vec<String> {
    let mut st = conn
        .prepare(
            "SELECT event FROM custody_log WHERE action_id = ?1 AND command_index = ?2
               AND event <> 'DISCOVERED' AND seq > (SELECT min(seq) FROM custody_log
                 WHERE event = 'QUEUED' AND action_id = ?1 AND command_index = ?2) ORDER BY seq",
        )
        .unwrap();
    st.query_map(rusqlite::params![action, index], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Section 10, while a download is running: the copy is 0600 and recorded; the evidence copy
/// has every package and no partial file.
async fn backup_during_a_pass(m: &Machine) -> PathBuf {
    m.wait_for(
        "a download in progress, after a package was archived and one failed",
        "SELECT (SELECT count(*) FROM results WHERE state = 'downloading') > 0
            AND (SELECT count(*) FROM results WHERE state = 'archived') > 0
            AND (SELECT count(*) FROM results WHERE state = 'failed') > 0",
    )
    .await;
    // A partial package beside the finished ones, as a running download leaves it.
    let partial = m.at("/var/lib/lrvault/evidence/contoso/in-progress.zip.partial");
    std::fs::create_dir_all(partial.parent().unwrap()).unwrap();
    std::fs::write(&partial, b"half a package").unwrap();
    m.step("backup", |s| s, &[]);
    std::fs::remove_file(&partial).unwrap();
    let backups: Vec<PathBuf> = std::fs::read_dir(m.at("/var/backups/lrvault"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "db"))
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    let backup = backups[0].clone();
    assert_eq!(mode(&backup), 0o600);
    let (sha, to): (String, String) = rusqlite::Connection::open_with_flags(
        m.db(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap()
    .query_row(
        "SELECT json_extract(detail, '$.sha256'), json_extract(detail, '$.to') FROM custody_log WHERE event = 'BACKED_UP'",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap();
    assert_eq!(sha, sha256_hex(&std::fs::read(&backup).unwrap()));
    assert_eq!(
        PathBuf::from(to).file_name(),
        backup.file_name(),
        "written in the state directory, then moved out"
    );
    let copied = files_under(&m.at("/var/backups/lrvault/evidence"));
    assert!(!copied.is_empty(), "{}", m.journal());
    assert!(
        copied
            .iter()
            .all(|p| p.extension().is_some_and(|x| x == "zip")),
        "{copied:?}"
    );
    // The copy caught the pass unfinished.
    let open: i64 =
        rusqlite::Connection::open_with_flags(&backup, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap()
            .query_row(
                "SELECT count(*) FROM results WHERE state IN ('pending', 'downloading')",
                [],
                |r| r.get(0),
            )
            .unwrap();
    assert!(open > 0);
    backup
}

/// Section 10's restore, after the daemon was killed and left a WAL. The result
/// `requeued` was failed in the backup and archived after it: the restore re-queues it, its
/// package is quarantined, and it is fetched again; `verify` ends clean (exit 0).
async fn restore_after_a_crash(m: &Machine, backup: &Path, requeued: &(String, u32)) {
    let archived_in_backup: i64 =
        rusqlite::Connection::open_with_flags(backup, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap()
            .query_row(
                "SELECT count(*) FROM results WHERE state = 'archived'",
                [],
                |r| r.get(0),
            )
            .unwrap();
    // More work after the backup (the re-queued result among it); the daemon's last commits
    // are in its WAL when it is killed.
    m.wait_for(
        "more work after the backup",
        &format!(
            "SELECT (SELECT count(*) FROM results WHERE state = 'archived') > {archived_in_backup}"
        ),
    )
    .await;
    let (code, _, err) = m.sh("systemctl kill --signal=SIGKILL lrvault", &[]);
    assert_eq!(code, 0, "{err}");
    let wal = m.at("/var/lib/lrvault/lrvault.db-wal");
    assert!(
        std::fs::metadata(&wal).unwrap().len() > 0,
        "the crash left a WAL"
    );

    let out = m.step("restore", |s| s, &[]);
    assert!(
        out.contains(&format!(
            "restored {} from {} (",
            m.db().display(),
            m.at("/var/lib/lrvault/restore.db").display()
        )),
        "{out}"
    );
    assert!(
        out.contains("; integrity_check ok; schema version"),
        "{out}"
    );
    // The packages archived after the backup were not the restored database's own (no
    // DOWNLOADED and PUBLISHING rows in it): quarantined, as the guide says, not adopted.
    assert!(out.contains(" adopted, 0 refused\n"), "{out}");
    assert!(
        out.contains("\n1 results the backup holds as failed, unavailable or skipped have a package in the store (archived after the backup): re-queued"),
        "{out}"
    );
    let quarantined: i64 =
        rusqlite::Connection::open_with_flags(m.db(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap()
            .query_row(
                "SELECT count(*) FROM custody_log WHERE event = 'QUARANTINED'",
                [],
                |r| r.get(0),
            )
            .unwrap();
    assert!(quarantined >= 1, "{out}");
    assert_eq!(
        files_under(&m.at("/var/lib/lrvault/evidence/_quarantine")).len() as i64,
        quarantined
    );
    assert!(
        out.contains("(0 defects); custody chain:") && out.contains(" rows (0 defects)"),
        "verify after the restore: {out}"
    );
    assert!(!m.at("/var/lib/lrvault/restore.db").exists());
    let aside: Vec<String> = std::fs::read_dir(m.at("/var/lib/lrvault"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".replaced-"))
        .collect();
    assert_eq!(
        aside.len(),
        2,
        "the crashed database and its WAL: {aside:?}"
    );
    let (action, index) = requeued;
    m.wait_for(
        "the result failed in the backup to be archived again",
        &format!(
            "SELECT count(*) FROM results WHERE action_id = '{action}' AND command_index = {index} AND state = 'archived'"
        ),
    )
    .await;
    let conn =
        rusqlite::Connection::open_with_flags(m.db(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    assert_eq!(
        events(&conn, action, *index),
        [
            "LINK_ISSUED",
            "FAILED",
            "QUEUED",
            "QUARANTINED",
            "ATTEMPT_FAILED",
            "LINK_ISSUED",
            "DOWNLOADED",
            "PUBLISHING",
            "ARCHIVED"
        ],
        "{action}/{index}: the backup's rows, then the restore's"
    );
}

/// 1.7: a wrong new secret is refused by the check: nothing swapped, the service not
/// restarted, still running on the old secret. Then a new secret is added (the simulator
/// plays Entra), written, checked, swapped, the service restarted; once the old secret is
/// deleted, the daemon's token refreshes still succeed.
async fn rotate_the_secret(m: &Machine, sim: &SimHandle, old: &str) {
    let tenant_id = sim.sim.tenants()[0].tenant_id.clone();
    let file = m.at("/etc/lrvault/secrets/contoso");
    let pid = || std::fs::read_to_string(m.root.join("run/lrvault.pid")).unwrap();
    let running = pid();
    let (code, out, err) = m.sh(
        &m.guide["rotate-secret"],
        &[("NEW_SECRET", "not-the-secret")],
    );
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    let refused: Vec<&str> = err.lines().filter(|l| l.starts_with("lrvault: ")).collect();
    assert_eq!(refused.len(), 1, "{err}");
    assert!(
        refused[0]
            .starts_with("lrvault: tenant 'contoso': refused: token request refused (HTTP 401)")
            && refused[0].ends_with("/contoso.new)"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), old, "not swapped");
    assert!(!m.at("/etc/lrvault/secrets/contoso.old").exists());
    assert_eq!(pid(), running, "not restarted");
    let (code, out, _) = m.sh("systemctl is-active lrvault", &[]);
    assert_eq!((code, out.as_str()), (0, "active\n"));

    let new = "rotated-secret-2";
    sim.sim.add_client_secret(&tenant_id, new);
    let out = m.step("rotate-secret", |s| s, &[("NEW_SECRET", new)]);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("tenant 'contoso': the credentials work (client_secret_file ")).count(),
        2,
        "checked before the swap and after the restart: {out}"
    );
    assert!(!out.contains("Open breakers"), "{out}");
    assert_ne!(pid(), running, "restarted");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), new);
    assert_eq!(mode(&file), 0o600);
    let kept = m.at("/etc/lrvault/secrets/contoso.old");
    assert_eq!(
        std::fs::read_to_string(&kept).unwrap(),
        old,
        "the old one is kept"
    );
    assert_eq!(mode(&kept), 0o600);
    sim.sim.remove_client_secret(&tenant_id, old);
    let seen = sim.sim.requests().len();
    let tokens_after = || {
        sim.sim.requests()[seen..]
            .iter()
            .filter(|r| r.endpoint == "token")
            .map(|r| r.status)
            .collect::<Vec<_>>()
    };
    // Tokens live 4 s here: the daemon refreshes every 2 s, with the new secret only.
    if !wait_until(Duration::from_secs(60), || tokens_after().len() >= 2).await {
        let log = std::fs::read_to_string(m.at("/var/log/journal/lrvault.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "fewer than 2 token requests in 60 s: {:?}; the daemon's last lines:\n{}",
            tokens_after(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    assert!(
        tokens_after().iter().all(|s| *s == 200),
        "{:?}",
        tokens_after()
    );
    let (code, out, err) = m.sh("lrvault status", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("Open breakers"), "{out}");
}

/// The end: one package per result the simulator has, each archived once, nothing else in
/// the store, `verify` clean, the chain rechecked independently.
fn everything_archived_once(m: &Machine, sim: &SimHandle) {
    let tenant_id = sim.sim.tenants()[0].tenant_id.clone();
    let expected: BTreeMap<(String, u32), String> = crate::common::archivable(&sim.sim, &tenant_id)
        .into_iter()
        .map(|x| ((x.action_id, x.index), x.sha256))
        .collect();
    let conn =
        rusqlite::Connection::open_with_flags(m.db(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut st = conn
        .prepare(
            "SELECT e.action_id, e.command_index, e.payload_sha256, e.package_path,
                    (SELECT count(*) FROM custody_log c WHERE c.event = 'ARCHIVED'
                       AND c.action_id = e.action_id AND c.command_index = e.command_index)
             FROM evidence e",
        )
        .unwrap();
    let rows: Vec<((String, u32), String, String, i64)> = st
        .query_map([], |r| {
            Ok(((r.get(0)?, r.get(1)?), r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), expected.len());
    let store = m.at("/var/lib/lrvault/evidence");
    for (key, sha, path, archived) in &rows {
        assert_eq!(expected.get(key), Some(sha), "{key:?}");
        assert_eq!(*archived, 1, "{key:?} archived once");
        let (_, payload, _) = check_bag(&store.join(path));
        assert_eq!(&sha256_hex(&payload), sha);
    }
    assert_eq!(
        files_under(&store)
            .iter()
            .filter(|f| !f.starts_with(store.join("_checkpoints")))
            .filter(|f| !f.starts_with(store.join("_quarantine")))
            .count(),
        rows.len(),
        "nothing else in the store (beside verify's checkpoints and the quarantine)"
    );
    custody_chain::recheck(&conn);
    let (code, out, err) = m.sh(
        "as_lrvault /usr/bin/lrvault --config /etc/lrvault/lrvault.toml verify",
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
}
