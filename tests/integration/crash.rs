//! Issue 4, crash safety: the real binary is killed with SIGKILL at random moments of an
//! archive pass (during downloads, while a package is zipped, around the rename and the DB
//! commit) many times over; after every kill the DB-level invariants hold, every next pass
//! recovers, and the end state has no partial file, one verified package per evidence row
//! and per archived result, one ARCHIVED row per result and an unbroken custody chain. A
//! second test builds the narrowest window by hand: a package in place, its result still
//! `downloading` under a dead process, no evidence row. It must be adopted, not fetched again.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use lrvault_sim::{Fault, SimConfig};
use rand::{Rng, SeedableRng};

use crate::common::{Env, check_bag, env, files_under, sha256_hex, wait_until};
use crate::custody_chain;

/// Every kill wastes a link call, so the quota is opened wide (here and in the simulator)
/// to keep the test about crashes, not pacing.
const CONFIG: &str = "[download]\nconcurrency = 2\nretry_base = \"10ms\"\nretry_max = \"50ms\"\n\
                      [quota]\nper_minute = 100000\nper_hour = 1000000\n";

fn archive_cmd(e: &Env, log: &std::fs::File) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_lrvault"));
    cmd.arg("--config")
        .arg(&e.config_path)
        .arg("archive")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.try_clone().unwrap())
        .kill_on_drop(true);
    cmd
}

/// (package path, payload sha256, package sha256) of every evidence row.
fn evidence(e: &Env) -> Vec<(String, String, String)> {
    let c = e.reader();
    let mut st = c
        .prepare("SELECT package_path, payload_sha256, package_sha256 FROM evidence")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn packages(e: &Env) -> Vec<PathBuf> {
    files_under(e.store())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "zip"))
        .collect()
}

/// What must hold right after any kill: every evidence row points at a package that is in
/// place with its recorded hash, no result is archived twice, custody rechecks. Returns how
/// many packages are in place without an evidence row yet (to be adopted by the next pass).
fn after_kill(e: &Env) -> usize {
    custody_chain::recheck(&e.reader());
    let rows = evidence(e);
    let mut recorded = HashSet::new();
    for (path, _, pkg_sha) in &rows {
        let full = e.store().join(path);
        assert_eq!(
            sha256_hex(&std::fs::read(&full).unwrap()),
            *pkg_sha,
            "{path}"
        );
        assert!(recorded.insert(full), "{path} recorded twice");
    }
    assert_eq!(
        e.count("SELECT count(*) FROM custody_log WHERE event = 'ARCHIVED'"),
        rows.len() as i64
    );
    assert_eq!(
        e.count("SELECT count(*) FROM results WHERE state = 'archived'"),
        rows.len() as i64
    );
    assert_eq!(
        e.count("SELECT count(*) FROM (SELECT action_id, command_index FROM custody_log WHERE event = 'ARCHIVED' GROUP BY 1, 2 HAVING count(*) > 1)"),
        0
    );
    packages(e)
        .into_iter()
        .filter(|p| !recorded.contains(p))
        .count()
}

/// The end state after the last pass.
fn final_state(e: &Env) {
    assert_eq!(e.partials(), Vec::<PathBuf>::new());
    assert_eq!(
        e.count("SELECT count(*) FROM results WHERE state <> 'archived' AND state <> 'skipped'"),
        0,
        "{:?}",
        e.results()
    );
    let expected: HashMap<(String, u32), String> = e
        .sim
        .sim
        .expected_results(&e.tenant_id())
        .into_iter()
        .filter(|x| x.has_result)
        .map(|x| ((x.action_id, x.index), x.sha256))
        .collect();
    let rows = evidence(e);
    let in_store = packages(e);
    assert_eq!(in_store.len(), rows.len(), "one package per evidence row");
    assert_eq!(
        crate::common::packages_under(e.store()).len(),
        rows.len(),
        "nothing else in the store"
    );
    for (path, sha, pkg_sha) in &rows {
        let full = e.store().join(path);
        assert_eq!(sha256_hex(&std::fs::read(&full).unwrap()), *pkg_sha);
        let (_, payload, _) = check_bag(&full);
        assert_eq!(sha256_hex(&payload), *sha);
    }
    let c = e.reader();
    let mut st = c
        .prepare("SELECT action_id, command_index, payload_sha256 FROM evidence")
        .unwrap();
    let got: HashMap<(String, u32), String> = st
        .query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let queued: HashSet<(String, u32)> = e
        .queued()
        .into_iter()
        .map(|r| (r.action_id, r.index))
        .collect();
    for key in &queued {
        assert_eq!(got.get(key), expected.get(key), "{key:?}");
    }
    assert_eq!(got.len(), queued.len());
    for (a, i) in &queued {
        let archived = e
            .events(a, *i)
            .iter()
            .filter(|ev| *ev == "ARCHIVED")
            .count();
        assert_eq!(archived, 1, "{a}/{i}");
    }
    custody_chain::recheck(&e.reader());
    assert_eq!(e.sim.sim.blob_requests_with_authorization(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_and_duplicates_nothing() {
    let sim = SimConfig {
        seed: 41,
        actions: 60,
        max_getfile_size: 20_000,
        faults: vec![Fault::Slow(5_000)],
        per_minute: 100_000,
        per_hour: 1_000_000,
        ..SimConfig::default()
    };
    let e = env(sim, CONFIG).await;
    e.discover().await;
    let queued = e.queued().len();
    assert!(queued >= 10, "{queued}");
    let sizes: Vec<u64> = e
        .sim
        .sim
        .expected_results(&e.tenant_id())
        .iter()
        .filter(|x| x.has_result)
        .map(|x| x.size)
        .collect();
    eprintln!(
        "crash test: {} blobs, {} bytes, largest {}",
        sizes.len(),
        sizes.iter().sum::<u64>(),
        sizes.iter().max().unwrap()
    );
    let log_path = e.config_path.with_file_name("archive-runs.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let started = Instant::now();
    let (mut runs, mut with_partial, mut adoptable, mut finished) = (0, 0, 0, 0);
    let partial_seen = || !e.partials().is_empty();
    while runs < 50 {
        runs += 1;
        let mut child = archive_cmd(&e, &log).spawn().unwrap();
        let delay = match rng.random_range(0..10) {
            // Wait for a download to be under way, then kill it a little later.
            0..5 => {
                wait_until(Duration::from_secs(2), partial_seen).await;
                rng.random_range(0..300)
            }
            // Any moment, including start-up and recovery.
            5..9 => rng.random_range(0..500),
            // Long enough for the larger results to finish now and then.
            _ => rng.random_range(500..1500),
        };
        // The kill comes at a random moment on purpose (not a wait for anything): what is
        // checked after it holds whatever the moment was.
        tokio::time::sleep(Duration::from_millis(delay)).await;
        if !e.partials().is_empty() {
            with_partial += 1;
        }
        match child.try_wait().unwrap() {
            Some(_) => finished += 1,
            None => {
                child.start_kill().unwrap();
            }
        }
        child.wait().await.unwrap();
        adoptable += after_kill(&e);
        if e.count("SELECT count(*) FROM results WHERE state = 'pending'") == 0
            && e.count("SELECT count(*) FROM results WHERE state = 'downloading'") == 0
        {
            break;
        }
    }
    let loop_time = started.elapsed();
    // Drain: passes without kills until nothing is left.
    let mut drains = 0;
    loop {
        drains += 1;
        assert!(drains <= 5, "the queue drains");
        let status = archive_cmd(&e, &log).status().await.unwrap();
        if status.success() {
            break;
        }
        e.wait_due().await;
    }
    eprintln!(
        "crash test: {runs} killed/finished runs in {loop_time:?} ({finished} finished before the kill, \
         {with_partial} killed with a partial on disk, {adoptable} packages awaiting adoption after a kill), \
         {drains} drain passes, {queued} results, total {:?}",
        started.elapsed()
    );
    final_state(&e);
    let adopted = e.count("SELECT count(*) FROM custody_log WHERE event = 'ARCHIVED' AND detail LIKE '%\"adopted\":true%'");
    eprintln!("crash test: {adopted} packages adopted");
    let log_text = std::fs::read_to_string(&log_path).unwrap();
    assert!(!log_text.contains("sig="), "no SAS signature in the logs");
    assert!(!log_text.contains("panicked"), "{log_text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_renamed_before_the_commit_is_adopted_not_fetched_again() {
    // The package is written by this pipeline, moved into place, and then its commit is
    // lost: the lease is taken away while the body trickles in, so the attempt ends without
    // an evidence row (as a crash between the rename and the commit leaves it). It pins a row
    // of this chain, as a real package does.
    let cfg = SimConfig {
        seed: 42,
        actions: 3,
        faults: vec!["slow=800".parse::<Fault>().unwrap()],
        ..SimConfig::default()
    };
    let e = env(cfg, "[download]\nconcurrency = 1\n").await;
    e.discover().await;
    let first = e.queued()[0].clone();
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    let dead_owner = format!("{host}:999999999:1");
    let (lost, ()) = tokio::join!(e.archive_max(1), async {
        let downloading = || {
            e.count(&format!(
                "SELECT count(*) FROM custody_log WHERE event = 'LINK_ISSUED' AND action_id = '{}'",
                first.action_id
            )) == 1
        };
        assert!(wait_until(Duration::from_secs(10), downloading).await);
        // As a crash leaves it: claimed by a process that no longer exists.
        rusqlite::Connection::open(&e.cfg.database.path)
            .unwrap()
            .execute(
                "UPDATE results SET lease_owner = ?1, lease_until = '2999-01-01T00:00:00.000Z'
                 WHERE action_id = ?2 AND command_index = ?3",
                rusqlite::params![dead_owner, first.action_id, first.index],
            )
            .unwrap();
    });
    assert_eq!((lost.claimed_elsewhere, lost.archived), (1, 0), "{lost:?}");
    let packages = packages(&e);
    assert_eq!(packages.len(), 1, "the package is in place, without a row");
    assert_eq!(e.count("SELECT count(*) FROM evidence"), 0);
    // A crashed writer's partial of the same package is swept with it.
    let mut partial = packages[0].clone().into_os_string();
    partial.push(".4242-0badcafe.partial");
    std::fs::copy(&packages[0], &partial).unwrap();

    let s = e.archive_max(1).await;
    assert_eq!((s.recovered, s.archived), (1, 1), "{s:?}");
    assert!(!std::path::Path::new(&partial).exists());
    let row = e.queued()[0].clone();
    assert_eq!(
        (row.action_id.as_str(), row.state.as_str(), row.attempts),
        (first.action_id.as_str(), "archived", 1)
    );
    // The intent was committed before the package was placed, and recovery recorded the
    // interrupted attempt (issue 16): adopted because this database was writing it.
    assert_eq!(
        e.events(&row.action_id, row.index),
        [
            "LINK_ISSUED",
            "DOWNLOADED",
            "PUBLISHING",
            "ATTEMPT_FAILED",
            "ARCHIVED"
        ]
    );
    let rows = e.custody(&row.action_id, row.index);
    let publishing = &rows.iter().find(|(ev, _)| ev == "PUBLISHING").unwrap().1;
    let interrupted = &rows
        .iter()
        .find(|(ev, _)| ev == "ATTEMPT_FAILED")
        .unwrap()
        .1;
    assert_eq!(interrupted["scope"], "process");
    assert_eq!(
        interrupted["reason"],
        "interrupted download (process stopped); retrying"
    );
    let (_, detail) = e.custody(&row.action_id, row.index).pop().unwrap();
    assert_eq!(detail["adopted"], true);
    assert_eq!(publishing["package_sha256"], detail["package_sha256"]);
    let x = e
        .sim
        .sim
        .expected_results(&e.tenant_id())
        .into_iter()
        .find(|x| x.action_id == row.action_id && x.index == row.index)
        .unwrap();
    let (path, sha, pkg_sha) = evidence(&e).pop().unwrap();
    assert_eq!(e.store().join(&path), packages[0]);
    assert_eq!(sha, x.sha256);
    assert_eq!(detail["package_sha256"], pkg_sha.as_str());
    // The adopted row keeps the MD5 the original download checked (from retrieval.json).
    let md5: Option<String> = e
        .reader()
        .query_row("SELECT payload_md5 FROM evidence", [], |r| r.get(0))
        .unwrap();
    let want =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &x.md5_base64).unwrap();
    assert_eq!(md5, Some(hex::encode(want)));
    // Adopted without another link or download.
    assert_eq!(e.api_calls("liveresponse.link"), 1);
    assert_eq!(e.sim_requests("blob").len(), 1);
    custody_chain::recheck(&e.reader());
    let (code, out, err) = crate::tamper::lrvault(&e.config_path, &["verify"]);
    assert_eq!(code, 0, "{out}\n{err}");
}
