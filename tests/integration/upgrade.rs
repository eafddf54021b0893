//! Issue 8 (schema v2) and issue 10 (integrity): a database made by the version-1 schema, with
//! rows and a package from before `custody_head` existed, upgrades in place and still verifies;
//! a damaged database page makes verify exit 3. Issue 19: a newer command under an older
//! daemon refuses the older database and changes nothing; only `migrate` (or `run`), under the
//! instance lock, upgrades it.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use crate::tamper::{archived, lrvault, rebuild_package_with, rehash_chain_from};

const V1_SCHEMA: &str = include_str!("../../migrations/01-initial/up.sql");

/// Migrations 01 to 05, as the previous lrvault (schema 5) embedded them.
const V5_MIGRATIONS: [&str; 5] = [
    V1_SCHEMA,
    include_str!("../../migrations/02-tenant-health/up.sql"),
    include_str!("../../migrations/03-custody-events/up.sql"),
    include_str!("../../migrations/04-anchors/up.sql"),
    include_str!("../../migrations/05-custody-kinds/up.sql"),
];

/// Rows of every table, copied from the current schema into a fresh version-5 database (its
/// `schema_upgrades` marks at 0, as a database created at version 5 has them).
fn downgrade_to_5(current: &Path, v5: &Path) {
    let c = rusqlite::Connection::open(v5).unwrap();
    for sql in V5_MIGRATIONS {
        c.execute_batch(sql).unwrap();
    }
    c.pragma_update(None, "user_version", 5).unwrap();
    c.execute("ATTACH DATABASE ?1 AS cur", [current.to_str().unwrap()])
        .unwrap();
    for table in [
        "actions",
        "results",
        "evidence",
        "api_calls",
        "job_runs",
        "tenant_health",
        "anchors",
        "custody_log",
    ] {
        c.execute_batch(&format!("INSERT INTO {table} SELECT * FROM cur.{table}"))
            .unwrap();
    }
}

/// The schema version and every schema object as `sqlite_master` holds it: what a refused
/// command must leave as it was.
fn schema(db: &Path) -> (i64, Vec<(String, String, Option<String>)>) {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let version = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    let objects = c
        .prepare("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    (version, objects)
}

/// Every result's state, in key order.
fn states(db: &Path) -> Vec<(String, String, i64, String)> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.prepare("SELECT tenant, action_id, command_index, state FROM results ORDER BY 1, 2, 3")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_command_under_an_older_daemon_changes_nothing_and_migrate_upgrades_after_it() {
    let e = archived(62, 4, "").await;
    let (dir, config, db) = (
        e._dir.path().to_path_buf(),
        e.config_path.clone(),
        e.cfg.database.path.clone(),
    );
    let crate::common::Env {
        _dir, ctx, tenants, ..
    } = e;
    drop((ctx, tenants));
    let v5 = dir.join("v5.db");
    downgrade_to_5(&db, &v5);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    std::fs::rename(&v5, &db).unwrap();
    let (before, rows) = (schema(&db), states(&db));
    assert_eq!(before.0, 5);
    assert!(rows.iter().any(|r| r.3 == "archived"), "{rows:?}");

    // The older daemon: it holds the instance lock and its connection, as `run` does.
    let daemon_lock = lrvault::db::InstanceLock::take(&db).unwrap();
    let daemon_conn = rusqlite::Connection::open(&db).unwrap();
    daemon_conn
        .pragma_update(None, "foreign_keys", "ON")
        .unwrap();
    let known = lrvault::db::schema_version_known();
    let refused = format!(
        "lrvault: database {} is at schema 5, this lrvault knows {known}: restart the service, which migrates it when it starts, or run `lrvault migrate` while it is stopped\n",
        db.display()
    );
    let backup = dir.join("b.db");
    let backup = backup.to_str().unwrap();
    for cmd in [
        &["status"][..],
        &["audit", "evidence"],
        &["verify"],
        &["archive"],
        &["discover"],
        &["backup", "--to", backup],
    ] {
        let (code, out, err) = lrvault(&config, cmd);
        assert_eq!(
            (code, err.as_str(), out.as_str()),
            (2, refused.as_str(), ""),
            "{cmd:?}"
        );
        assert_eq!(schema(&db), before, "{cmd:?} changed the schema");
    }
    let held = format!(
        "another lrvault daemon is already running on {} (pid {} holds lock {}.lock)",
        db.display(),
        std::process::id(),
        db.display()
    );
    let (code, _, err) = lrvault(&config, &["migrate"]);
    assert_eq!(
        (code, err),
        (
            2,
            format!(
                "lrvault: cannot migrate while the daemon runs; restart it, which migrates when it starts, or stop it first (systemctl stop lrvault): {held}\n"
            )
        )
    );
    let (code, _, err) = lrvault(&config, &["run"]);
    assert_eq!((code, err), (2, format!("lrvault: {held}\n")));
    assert_eq!(schema(&db), before, "migrate and run wait for the lock");
    assert_eq!(states(&db), rows);
    let n: i64 = daemon_conn
        .query_row("SELECT count(*) FROM results", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n as usize, rows.len(), "the older daemon reads on");

    // The older daemon stops; migrate upgrades in place, and the archive verifies.
    drop((daemon_conn, daemon_lock));
    let (code, out, err) = lrvault(&config, &["migrate"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!(
            "database {} is at schema version {known} (was 5)\n",
            db.display()
        )
    );
    assert_eq!(schema(&db).0, known as i64);
    assert_eq!(states(&db), rows, "every result kept its state");
    let (code, out, err) = lrvault(&config, &["verify"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("(0 defects)"), "{out}");
    let (code, out, _) = lrvault(&config, &["migrate"]);
    assert_eq!(
        (code, out),
        (
            0,
            format!("database {} is at schema version {known}\n", db.display())
        )
    );
}

/// Rows of every table, copied from the current schema into a fresh version-1 database.
fn downgrade(current: &std::path::Path, v1: &std::path::Path) {
    let c = rusqlite::Connection::open(v1).unwrap();
    c.execute_batch(V1_SCHEMA).unwrap();
    c.pragma_update(None, "user_version", 1).unwrap();
    c.execute("ATTACH DATABASE ?1 AS cur", [current.to_str().unwrap()])
        .unwrap();
    c.execute_batch(
        "INSERT INTO actions SELECT * FROM cur.actions;
         INSERT INTO results SELECT * FROM cur.results;
         INSERT INTO evidence SELECT * FROM cur.evidence;
         INSERT INTO api_calls SELECT * FROM cur.api_calls;
         INSERT INTO job_runs SELECT * FROM cur.job_runs;
         INSERT INTO custody_log (seq, at, tenant, action_id, command_index, event, actor, evidence_sha256,
                                  package_path, detail, prev_hash, row_hash)
         SELECT seq, at, tenant, action_id, command_index, event, actor, evidence_sha256,
                package_path, detail, prev_hash, row_hash FROM cur.custody_log ORDER BY seq;",
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_database_with_rows_upgrades_in_place_and_still_verifies() {
    let e = archived(61, 5, "").await;
    let (dir, config, db, store) = (
        e._dir.path().to_path_buf(),
        e.config_path.clone(),
        e.cfg.database.path.clone(),
        e.cfg.store.root.clone(),
    );
    let crate::common::Env {
        _dir, ctx, tenants, ..
    } = e;
    drop((ctx, tenants));

    // The archive as a version-1 lrvault wrote it: its packages pinned no custody row (each
    // rebuilt without custody_head, its ARCHIVED row and evidence row as they would have
    // been), its chain held none of the later kinds (PUBLISHING, ...), and was hashed as it
    // was (no anchors existed to pin it).
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch("PRAGMA foreign_keys = OFF").unwrap();
    for t in [
        "custody_log_no_update",
        "custody_log_no_delete",
        "evidence_no_update",
    ] {
        c.execute_batch(&format!("DROP TRIGGER {t}")).unwrap();
    }
    let packages: Vec<(String, String, i64)> = c
        .prepare(
            "SELECT e.evidence_id, e.package_path, c.seq FROM evidence e JOIN custody_log c
             ON c.event = 'ARCHIVED' AND c.package_path = e.package_path ORDER BY c.seq",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (id, rel, seq) in &packages {
        let path = store.join(rel);
        strip_custody_head(&path);
        let (sha, size) = (
            crate::tamper::file_sha256(&path),
            std::fs::metadata(&path).unwrap().len() as i64,
        );
        c.execute(
            "UPDATE evidence SET package_sha256 = ?2, package_size = ?3 WHERE evidence_id = ?1",
            rusqlite::params![id, sha, size],
        )
        .unwrap();
        c.execute(
            // As version 1 wrote it: no package_size or original_* in the detail.
            "UPDATE custody_log SET detail = json_set(json_remove(detail, '$.package_size', '$.payload_md5',
                 '$.original_name', '$.original_size', '$.original_sha256'), '$.package_sha256', ?2) WHERE seq = ?1",
            rusqlite::params![seq, sha],
        )
        .unwrap();
    }
    let id = packages.last().unwrap().0.clone();
    c.execute_batch(
        "DELETE FROM custody_log WHERE event NOT IN ('DISCOVERED', 'QUEUED', 'LINK_ISSUED', 'DOWNLOADED',
             'ARCHIVED', 'UNAVAILABLE', 'SKIPPED', 'FAILED', 'VERIFIED', 'VERIFY_FAILED');
         CREATE TEMP TABLE renumbered AS
             SELECT seq AS old, row_number() OVER (ORDER BY seq) AS new FROM custody_log;
         UPDATE custody_log SET seq = -(SELECT new FROM renumbered WHERE old = custody_log.seq);
         UPDATE custody_log SET seq = -seq;",
    )
    .unwrap();
    rehash_chain_from(&c, 1);
    let hashes_before: Vec<String> = c
        .prepare("SELECT row_hash FROM custody_log ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    drop(c);

    let v1 = dir.join("v1.db");
    downgrade(&db, &v1);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    std::fs::rename(&v1, &db).unwrap();
    let _ = std::fs::remove_dir_all(store.join("_checkpoints"));

    let (code, out, err) = lrvault(&config, &["migrate"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = lrvault(&config, &["verify"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("(0 defects)"), "{out}");
    let c = rusqlite::Connection::open(&db).unwrap();
    let version: i64 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, lrvault::db::schema_version_known() as i64);
    let hashes_after: Vec<String> = c
        .prepare("SELECT row_hash FROM custody_log WHERE seq <= ?1 ORDER BY seq")
        .unwrap()
        .query_map([hashes_before.len() as i64], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(hashes_after, hashes_before, "every row kept as it was");
    let mark: i64 = c
        .query_row(
            "SELECT custody_seq FROM schema_upgrades WHERE version = 4",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(mark, hashes_before.len() as i64);
    let legacy: i64 = c
        .query_row(
            "SELECT json_extract(detail, '$.legacy_packages') FROM custody_log WHERE event = 'VERIFIED'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(legacy, packages.len() as i64);
    // The new rules hold on the upgraded file.
    let e = c
        .execute(
            "UPDATE evidence SET payload_sha256 = 'x' WHERE evidence_id = ?1",
            [&id],
        )
        .unwrap_err();
    assert!(e.to_string().contains("evidence rows are immutable"), "{e}");
    let e = c.execute("DELETE FROM evidence", []).unwrap_err();
    assert!(e.to_string().contains("evidence rows are immutable"), "{e}");
    c.execute(
        "UPDATE evidence SET last_verify_ok = 0 WHERE evidence_id = ?1",
        [&id],
    )
    .unwrap();
    let e = c
        .execute("UPDATE custody_log SET actor = 'x'", [])
        .unwrap_err();
    assert!(e.to_string().contains("append-only"), "{e}");
    let e = c.execute("DELETE FROM anchors", []).unwrap_err();
    assert!(e.to_string().contains("anchors are append-only"), "{e}");
    for view in ["v_evidence", "v_custody"] {
        let n: i64 = c
            .query_row(&format!("SELECT count(*) FROM {view}"), [], |r| r.get(0))
            .unwrap();
        assert!(n > 0, "{view}");
    }
    let tx = c.unchecked_transaction().unwrap();
    lrvault::custody::append(
        &tx,
        &lrvault::custody::Event::new(
            "sim0",
            "*",
            None,
            lrvault::custody::EventKind::BackedUp,
            "me",
        ),
    )
    .unwrap();
    tx.commit().unwrap();
    drop(c);
    let (code, out, err) = lrvault(&config, &["verify", "--chain-only"]);
    assert_eq!(code, 0, "{out}\n{err}");
}

/// Rewrites the package's retrieval.json without `custody_head` (payload and bag kept valid).
fn strip_custody_head(path: &std::path::Path) {
    rebuild_package_with(
        path,
        |_| {},
        |retrieval| {
            retrieval.as_object_mut().unwrap().remove("custody_head");
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_database_page_makes_verify_exit_3() {
    let e = archived(62, 4, "").await;
    let (config, db) = (e.config_path.clone(), e.cfg.database.path.clone());
    let root_page: i64 = e
        .reader()
        .query_row(
            "SELECT rootpage FROM sqlite_master WHERE name = 'actions'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let crate::common::Env {
        _dir, ctx, tenants, ..
    } = e;
    drop((ctx, tenants));
    // Everything in the main file: no WAL left to repair the page from.
    let page_size: u64 = {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        c.query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))
            .unwrap() as u64
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&db)
        .unwrap();
    file.seek(SeekFrom::Start((root_page as u64 - 1) * page_size))
        .unwrap();
    file.write_all(&vec![0xAA; page_size as usize]).unwrap();
    drop(file);
    let (code, _, err) = lrvault(&config, &["verify"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("lrvault: defect: database: SQLite quick_check"),
        "{err}"
    );
    let c = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let recorded: i64 = c
        .query_row(
            "SELECT count(*) FROM custody_log WHERE event = 'VERIFY_FAILED' AND json_extract(detail, '$.check') = 'database'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        recorded, 1,
        "the damage is recorded while the log can still take a row"
    );
    drop(c);
    // A file that is no database at all: one line, exit 3. The VERIFY_FAILED row may
    // have left page 1 in the WAL, where it would mask the damaged header; fold it in.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    let mut file = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    file.write_all(&[0x55; 100]).unwrap();
    drop(file);
    let (code, out, err) = lrvault(&config, &["verify"]);
    assert_eq!(code, 3, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("lrvault: defect: database "), "{err}");
}
