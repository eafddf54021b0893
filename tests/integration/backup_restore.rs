//! Issue 10: `lrvault backup` while the daemon is in the middle of an archive pass, then a
//! crash that leaves a WAL, then `lrvault restore` from that backup. The backup is a sound
//! mid-pass snapshot (0600, integrity-checked, its SHA-256 in a BACKED_UP row); the restore
//! sets the crashed database aside with its WAL, adopts the packages written after the backup
//! only where the backup holds their DOWNLOADED and PUBLISHING rows (docs/design.md §7a rule 14; the
//! others are quarantined and downloaded again), and after the next passes every result is
//! archived exactly once and `verify` finds 0 defects.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use lrvault_sim::{Fault, SimConfig};

use crate::common::{Env, check_bag, env, files_under, sha256_hex, wait_until};
use crate::custody_chain;

/// Quick passes and small, slow payloads: a pass takes seconds, so a backup and a crash
/// land in its middle.
const CONFIG: &str = "[schedule]\ndiscover = \"0 0 * * * *\"\narchive = \"*/2 * * * * *\"\nverify = \"0 0 3 * * *\"\n\
                      [download]\nretry_base = \"100ms\"\nretry_max = \"1s\"\n";

fn sim() -> SimConfig {
    SimConfig {
        seed: 10,
        actions: 12,
        max_getfile_size: 120_000,
        faults: vec![Fault::Slow(60_000)],
        ..SimConfig::default()
    }
}

fn count(db: &Path, sql: &str) -> i64 {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| c.query_row(sql, [], |r| r.get(0)))
        .unwrap_or(-1)
}

fn daemon(e: &Env, log: &Path) -> Child {
    e.lrvault()
        .arg("run")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// (exit code, stdout, stderr) of the binary.
fn lrvault(e: &Env, args: &[&str]) -> (i32, String, String) {
    let out = e.lrvault().args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Results by state in the database at `db`.
fn states(db: &Path) -> BTreeMap<(String, u32), String> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let mut st = c
        .prepare("SELECT action_id, command_index, state FROM results")
        .unwrap();
    st.query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Takes backups until one holds a result in the middle of its download (a mid-pass
/// snapshot); returns its path.
async fn backup_mid_pass(e: &Env, dir: &Path) -> PathBuf {
    let live = e.cfg.database.path.clone();
    for i in 0..20 {
        let busy = || {
            count(
                &live,
                "SELECT count(*) FROM results WHERE state = 'downloading'",
            ) > 0
                && count(
                    &live,
                    "SELECT count(*) FROM results WHERE state = 'archived'",
                ) > 0
        };
        assert!(
            wait_until(Duration::from_secs(60), busy).await,
            "no pass running"
        );
        let to = dir.join(format!("backups/lrvault-{i}.db"));
        let (code, out, err) = lrvault(e, &["backup", "--to", to.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
        if states(&to).values().any(|s| s == "downloading") {
            return to;
        }
    }
    panic!("no backup caught a download in progress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_from_a_backup_taken_mid_pass_archives_every_result_once() {
    let e = env(sim(), CONFIG).await;
    let dir = e._dir.path().to_path_buf();
    let live = e.cfg.database.path.clone();
    let log = dir.join("daemon.log");
    let mut running = daemon(&e, &log);

    // 1. An online backup in the middle of a pass.
    let backup = backup_mid_pass(&e, &dir).await;
    let meta = std::fs::metadata(&backup).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let bytes = std::fs::read(&backup).unwrap();
    let (detail, tenant): (String, String) = e
        .reader()
        .query_row(
            "SELECT detail, tenant FROM custody_log WHERE event = 'BACKED_UP' ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let detail: serde_json::Value = serde_json::from_str(&detail).unwrap();
    assert_eq!(detail["sha256"], sha256_hex(&bytes));
    assert_eq!(detail["bytes"], bytes.len());
    assert_eq!(detail["to"], backup.display().to_string());
    assert_eq!(detail["integrity_check"], "ok");
    assert_eq!(tenant, "sim0");
    let copy =
        rusqlite::Connection::open_with_flags(&backup, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let check: String = copy
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let (seq, hash): (i64, String) = copy
        .query_row(
            "SELECT seq, row_hash FROM custody_log ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        detail["custody_head"],
        serde_json::json!({"seq": seq, "row_hash": hash})
    );
    drop(copy);
    assert!(!PathBuf::from(format!("{}-wal", backup.display())).exists());
    let in_backup = states(&backup);

    // A backup never overwrites; a restore never runs beside the daemon.
    let (code, _, err) = lrvault(&e, &["backup", "--to", backup.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "lrvault: {} already exists; a backup never overwrites a file: choose a new name",
            backup.display()
        )
    );
    let (code, _, err) = lrvault(&e, &["restore", "--from", backup.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "lrvault: cannot restore while the daemon runs; stop it first (systemctl stop lrvault): another lrvault daemon is already running on {} (pid {} holds lock {}.lock)",
            live.display(),
            running.id(),
            live.display()
        )
    );

    // 2. The pass goes on past the backup; then a crash in the middle of a download.
    let archived_in_backup = in_backup.values().filter(|s| *s == "archived").count() as i64;
    let later = || {
        count(
            &live,
            "SELECT count(*) FROM results WHERE state = 'archived'",
        ) >= archived_in_backup + 2
            && count(
                &live,
                "SELECT count(*) FROM results WHERE state = 'downloading'",
            ) > 0
    };
    assert!(
        wait_until(Duration::from_secs(60), later).await,
        "the pass did not go on"
    );
    running.kill().unwrap();
    running.wait().unwrap();
    let wal = PathBuf::from(format!("{}-wal", live.display()));
    assert!(
        std::fs::metadata(&wal).unwrap().len() > 0,
        "the crash left a WAL"
    );
    let crashed = states(&live);
    let store_at_crash: BTreeSet<PathBuf> = files_under(e.store()).into_iter().collect();

    // 3. Restore.
    let (code, out, err) = lrvault(&e, &["restore", "--from", backup.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with(&format!(
            "restored {} from {} ({} bytes, sha256 {}, recorded as BACKED_UP seq ",
            live.display(),
            backup.display(),
            bytes.len(),
            sha256_hex(&bytes)
        )),
        "{out}"
    );
    assert!(
        lines[0].ends_with(&format!(
            "; integrity_check ok; schema version {}; custody chain {seq} rows without a defect, head seq {seq} row_hash {hash}; it agrees with every checkpoint at or below its head)",
            lrvault::db::schema_version_known()
        )),
        "{out}"
    );
    // The crashed database is kept, paired with its own WAL; none of it is beside the new one.
    let aside: Vec<PathBuf> = std::fs::read_dir(live.parent().unwrap())
        .unwrap()
        .map(|d| d.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".replaced-"))
        .collect();
    assert_eq!(aside.len(), 2, "{aside:?}");
    let aside_db = aside
        .iter()
        .find(|p| !p.to_string_lossy().ends_with("-wal"))
        .unwrap();
    assert_eq!(
        states(aside_db),
        crashed,
        "the set-aside pair opens as the crashed database"
    );
    assert!(lines[1].contains(&aside_db.display().to_string()), "{out}");
    let returned = in_backup.values().filter(|s| *s == "downloading").count();
    let recovery = lines[2]
        .strip_prefix(&format!(
            "recovery: {returned} interrupted downloads returned to the queue, "
        ))
        .and_then(|l| l.split_once(" partial files removed, "))
        .and_then(|(_, l)| l.strip_suffix(" packages already in the store adopted, 0 refused"))
        .unwrap_or_else(|| panic!("{out}"));
    let adopted_now: usize = recovery.parse().unwrap();
    assert_eq!(
        count(
            &live,
            "SELECT count(*) FROM results WHERE state = 'downloading'"
        ),
        0
    );
    let restored = rusqlite::Connection::open(&live).unwrap();
    let check: String = restored
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    drop(restored);

    // 4. The next passes finish the queue; each result is archived once.
    for _ in 0..20 {
        let (code, _, _) = lrvault(&e, &["archive"]);
        if code == 0
            && count(
                &live,
                "SELECT count(*) FROM results WHERE state IN ('pending', 'downloading')",
            ) == 0
        {
            break;
        }
        e.wait_due().await;
    }
    let (code, out, err) = lrvault(&e, &["verify"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("(0 defects); custody chain:") && out.contains(" rows (0 defects)"),
        "{out}"
    );
    let adopted = final_state(&e);
    // docs/design.md §7a rule 14: the restore adopted only what the restored database itself was
    // writing (its DOWNLOADED and PUBLISHING rows are in the backup); every other package
    // written after the backup was quarantined and its result downloaded again.
    let archived_after_backup: BTreeSet<(String, u32)> = in_backup
        .iter()
        .filter(|(k, s)| *s != "archived" && crashed.get(*k).is_some_and(|c| c == "archived"))
        .map(|(k, _)| k.clone())
        .collect();
    assert!(!archived_after_backup.is_empty());
    let intents_in_backup = publishing_rows(&backup);
    let quarantined = quarantined_rows(&e);
    for key in &archived_after_backup {
        if intents_in_backup.contains(key) {
            assert!(adopted.contains_key(key), "{key:?} adopted");
        } else {
            assert!(!adopted.contains_key(key), "{key:?} not adopted");
            assert!(quarantined.contains_key(key), "{key:?} quarantined");
        }
    }
    assert!(
        adopted.keys().all(|k| intents_in_backup.contains(k)),
        "{adopted:?} vs {intents_in_backup:?}"
    );
    assert_eq!(
        adopted.len(),
        adopted_now,
        "all adoptions were the restore's"
    );
    for path in adopted.values() {
        assert!(
            store_at_crash.contains(path),
            "{path:?} was in the store before the restore"
        );
    }
    // Each quarantined package is kept under `_quarantine/`, as it was at the crash.
    let aside = files_under(&e.store().join("_quarantine"));
    assert_eq!(aside.len(), quarantined.len(), "{aside:?}");
    for (key, (rel, moved_to, sha)) in &quarantined {
        assert!(store_at_crash.contains(&e.store().join(rel)), "{key:?}");
        assert_eq!(
            sha256_hex(&std::fs::read(e.store().join(moved_to)).unwrap()),
            *sha
        );
    }
}

/// The results that have a PUBLISHING row in the database at `path`.
fn publishing_rows(path: &Path) -> BTreeSet<(String, u32)> {
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let mut st = c
        .prepare("SELECT action_id, command_index FROM custody_log WHERE event = 'PUBLISHING'")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The QUARANTINED rows: result → (package path, where it went, its SHA-256).
fn quarantined_rows(e: &Env) -> BTreeMap<(String, u32), (String, String, String)> {
    let c = e.reader();
    let mut st = c
        .prepare(
            "SELECT action_id, command_index, package_path, json_extract(detail, '$.moved_to'),
                    json_extract(detail, '$.sha256')
             FROM custody_log WHERE event = 'QUARANTINED'",
        )
        .unwrap();
    st.query_map([], |r| {
        Ok(((r.get(0)?, r.get(1)?), (r.get(2)?, r.get(3)?, r.get(4)?)))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// Every queued result archived once, with the simulator's bytes; nothing else in the store.
/// Returns the adopted results with their package paths.
fn final_state(e: &Env) -> BTreeMap<(String, u32), PathBuf> {
    assert_eq!(e.partials(), Vec::<PathBuf>::new());
    let expected: BTreeMap<(String, u32), String> =
        crate::common::archivable(&e.sim.sim, &e.tenant_id())
            .into_iter()
            .map(|x| ((x.action_id, x.index), x.sha256))
            .collect();
    let c = e.reader();
    let mut st = c
        .prepare("SELECT action_id, command_index, payload_sha256, package_path FROM evidence")
        .unwrap();
    let rows: Vec<((String, u32), String, String)> = st
        .query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), expected.len());
    let mut adopted = BTreeMap::new();
    for (key, sha, path) in &rows {
        assert_eq!(expected.get(key), Some(sha), "{key:?}");
        let (_, payload, _) = check_bag(&e.store().join(path));
        assert_eq!(&sha256_hex(&payload), sha);
        let archived: Vec<serde_json::Value> = e
            .custody(&key.0, key.1)
            .into_iter()
            .filter(|(ev, _)| ev == "ARCHIVED")
            .map(|(_, d)| d)
            .collect();
        assert_eq!(archived.len(), 1, "{key:?} archived once");
        if archived[0]["adopted"] == serde_json::json!(true) {
            adopted.insert(key.clone(), e.store().join(path));
        }
    }
    assert_eq!(
        files_under(e.store())
            .iter()
            .filter(|f| !f.starts_with(e.store().join("_checkpoints")))
            .filter(|f| !f.starts_with(e.store().join("_quarantine")))
            .count(),
        rows.len(),
        "nothing else in the store (beside verify's checkpoints and the quarantine)"
    );
    custody_chain::recheck(&e.reader());
    adopted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_names_the_anchors_it_supersedes_and_verify_accepts_only_those() {
    let e = env(
        SimConfig {
            seed: 11,
            actions: 6,
            ..SimConfig::default()
        },
        "[download]\nretry_base = \"20ms\"\nretry_max = \"100ms\"\n",
    )
    .await;
    e.discover().await;
    e.archive_max(2).await;
    let backup = e._dir.path().join("backups/before.db");
    let (code, _, err) = lrvault(&e, &["backup", "--to", &backup.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    // After the backup: the rest is archived and a verify run writes a checkpoint, both
    // pinning rows the backup does not have.
    e.archive().await;
    let (code, out, err) = lrvault(&e, &["verify"]);
    assert_eq!(code, 0, "{out}{err}");
    let checkpoint: (i64, String) = e
        .reader()
        .query_row(
            "SELECT seq, row_hash FROM anchors ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let archived_before = e.count("SELECT count(*) FROM evidence");

    let (code, out, err) = lrvault(&e, &["restore", "--from", &backup.display().to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("1 checkpoints written after the backup pin rows that now live on only in the replaced database"),
        "{out}"
    );
    let (detail, restored_seq): (String, i64) = e
        .reader()
        .query_row(
            "SELECT detail, seq FROM custody_log WHERE event = 'RESTORED'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let detail: serde_json::Value = serde_json::from_str(&detail).unwrap();
    assert_eq!(
        detail["superseded_checkpoints"][0]["seq"], checkpoint.0,
        "{detail}"
    );
    assert_eq!(
        detail["superseded_checkpoints"][0]["row_hash"],
        checkpoint.1
    );
    assert!(detail["replaced_head"]["seq"].as_i64().unwrap() >= checkpoint.0);
    // The packages written after the backup were not this database's (docs/design.md §7a rule 14):
    // quarantined, none adopted, and their results downloaded again by the next pass.
    let quarantined = e.count(&format!(
        "SELECT count(*) FROM custody_log WHERE event = 'QUARANTINED' AND seq > {restored_seq}"
    ));
    assert_eq!(quarantined, archived_before - 2);
    assert_eq!(
        e.count("SELECT count(*) FROM custody_log WHERE event = 'ARCHIVED' AND detail LIKE '%\"adopted\":true%'"),
        0
    );
    let (code, out, err) = lrvault(&e, &["archive"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(e.count("SELECT count(*) FROM evidence"), archived_before);
    let (code, out, err) = lrvault(&e, &["verify"]);
    assert_eq!(code, 0, "{out}{err}");

    // A RESTORED row covers only what it names: another checkpoint that pins a row this chain
    // does not have is still a rewritten chain.
    let forged = e
        ._dir
        .path()
        .join("evidence/_checkpoints/000000000002.json");
    let mut cp: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            e._dir
                .path()
                .join(format!("evidence/_checkpoints/{:012}.json", checkpoint.0)),
        )
        .unwrap(),
    )
    .unwrap();
    cp["seq"] = serde_json::json!(2);
    std::fs::write(&forged, serde_json::to_vec(&cp).unwrap()).unwrap();
    let (code, _, err) = lrvault(&e, &["verify"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("000000000002.json"), "{err}");
}

/// What is not a backup is refused with one line that says why, and the database (and its
/// directory) stay exactly as they were: nothing is set aside, nothing replaced.
#[tokio::test]
async fn a_restore_refuses_what_is_not_a_backup_and_leaves_the_database_alone() {
    let e = env(
        SimConfig {
            seed: 12,
            actions: 3,
            ..SimConfig::default()
        },
        "",
    )
    .await;
    e.discover().await;
    e.archive().await;
    let live = e.cfg.database.path.clone();
    let dir = live.parent().unwrap().to_path_buf();
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
            // The instance lock a restore holds while it checks the file (flock; kept).
            .filter(|name| !name.ends_with(".lock"))
            .collect();
        names.sort();
        names
    };
    let elsewhere = e._dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    // A copy of a live database with its WAL beside it: its newest commits may be in the WAL.
    let live_copy = elsewhere.join("copied.db");
    std::fs::copy(&live, &live_copy).unwrap();
    std::fs::write(elsewhere.join("copied.db-wal"), b"").unwrap();
    let garbage = elsewhere.join("garbage.db");
    std::fs::write(&garbage, b"this is not an SQLite database\n".repeat(200)).unwrap();
    let empty = elsewhere.join("empty.db");
    rusqlite::Connection::open(&empty)
        .unwrap()
        .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    let missing = elsewhere.join("missing.db");
    let before = (sha256_hex(&std::fs::read(&live).unwrap()), listing());

    let cases: [(&Path, String); 6] = [
        (
            &missing,
            format!("cannot read the backup {}", missing.display()),
        ),
        (&elsewhere, format!("{} is not a file", elsewhere.display())),
        (
            &live,
            format!(
                "{} is the database itself, not a backup of it",
                live.display()
            ),
        ),
        (
            &live_copy,
            format!(
                "{}-wal exists: {} is a live database, not a backup",
                live_copy.display(),
                live_copy.display()
            ),
        ),
        (&garbage, "not a database".to_string()),
        (
            &empty,
            "not an lrvault database (schema version 0)".to_string(),
        ),
    ];
    for (from, says) in cases {
        let (code, out, err) = lrvault(&e, &["restore", "--from", &from.display().to_string()]);
        assert_ne!(code, 0, "{from:?} was restored: {out}");
        assert!(err.contains(&says), "{from:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{from:?}: one line, got {err}"
        );
        assert!(!out.contains("restored"), "{from:?}: {out}");
        assert_eq!(
            (sha256_hex(&std::fs::read(&live).unwrap()), listing()),
            before,
            "{from:?} changed the database or its directory"
        );
    }
}
