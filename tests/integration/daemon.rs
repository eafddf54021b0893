//! The daemon binary: `lrvault run` archives on its schedule, the DB stays readable by a
//! separate reader meanwhile, a second daemon is refused (naming the pid that holds the lock),
//! and SIGTERM stops it cleanly, with the WAL folded into the database (issue 20).

use std::process::Stdio;
use std::time::Duration;

use lrvault_sim::SimConfig;

use crate::common::{env, wait_until};
use crate::custody_chain;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_archives_on_schedule_and_stops_on_sigterm() {
    let schedule = "[schedule]\ndiscover = \"*/2 * * * * *\"\narchive = \"* * * * * *\"\nverify = \"0 0 3 * * *\"\n";
    let e = env(
        SimConfig {
            seed: 3,
            actions: 8,
            ..SimConfig::default()
        },
        schedule,
    )
    .await;
    let expected = crate::common::archivable(&e.sim.sim, &e.tenant_id()).len() as i64;
    let mut daemon = e
        .lrvault()
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let db_path = e.cfg.database.path.clone();
    let archived = || {
        rusqlite::Connection::open_with_flags(&db_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| {
                c.query_row("SELECT count(*) FROM v_evidence", [], |r| {
                    r.get::<_, i64>(0)
                })
            })
            .unwrap_or(0)
    };
    let done = wait_until(Duration::from_secs(60), || archived() == expected).await;

    // A second daemon on the same DB is refused at once.
    let second = e.lrvault().arg("run").output().unwrap();
    assert_eq!(second.status.code(), Some(2));
    let err = String::from_utf8_lossy(&second.stderr);
    let db_shown = db_path.display();
    assert_eq!(
        err.trim_end(),
        format!(
            "lrvault: another lrvault daemon is already running on {db_shown} (pid {} holds lock {db_shown}.lock)",
            daemon.id()
        )
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = daemon.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(daemon.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(
        done,
        "daemon archived {} of {expected}; log:\n{log}",
        archived()
    );
    assert_eq!(status.code(), Some(0), "clean shutdown; log:\n{log}");
    assert!(log.contains("lrvault daemon stopped"), "{log}");
    // Issue 21: the start-up log names each tenant's cloud, sign-in method and the hosts in force.
    let base = e.sim.base_url();
    let hosts = format!(
        "tenant's cloud and hosts in force tenant=sim0 cloud=commercial auth=secret login_base={base}/ api_base={base}/ download_hosts=127.0.0.1"
    );
    assert!(log.contains(&hosts), "{log}");
    // A clean stop leaves every commit in the database file: the WAL is empty or gone.
    let [wal, _] = lrvault::access::sqlite_sidecars(&db_path);
    assert_eq!(
        std::fs::metadata(&wal).map_or(0, |m| m.len()),
        0,
        "{}",
        wal.display()
    );
    assert!(!log.contains("sig="), "no SAS signature in logs");
    custody_chain::recheck(&e.reader());
    assert_eq!(e.sim.sim.count_status(429), 0);
}

/// Issue 20: a one-shot command that wrote folds the WAL into the database when it ends, as
/// the daemon's clean stop does: the `-wal` is empty or gone, and the file alone holds it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_that_wrote_leaves_an_empty_wal() {
    let e = env(
        SimConfig {
            seed: 4,
            actions: 3,
            ..SimConfig::default()
        },
        "",
    )
    .await;
    let db_path = e.cfg.database.path.clone();
    let [wal, _] = lrvault::access::sqlite_sidecars(&db_path);
    let wal_len = || std::fs::metadata(&wal).map_or(0, |m| m.len());
    for args in [&["discover"][..], &["archive"], &["verify"]] {
        e.run_ok(args);
        assert_eq!(wal_len(), 0, "after lrvault {args:?}");
    }
    let in_file = |sql: &str| -> i64 {
        // The database file alone, as a copy without its WAL would be read.
        let copy = e.store().parent().unwrap().join("copy.db");
        std::fs::copy(&db_path, &copy).unwrap();
        let n = rusqlite::Connection::open(&copy)
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap();
        std::fs::remove_file(&copy).unwrap();
        n
    };
    let verified = "SELECT count(*) FROM custody_log WHERE event = 'VERIFIED'";
    assert_eq!(in_file(verified), 1, "verify's row is in the file itself");
    assert_eq!(in_file(verified), e.count(verified));
}
