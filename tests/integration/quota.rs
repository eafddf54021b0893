//! The quota governor against the simulator's own log: no sliding window ever holds more
//! calls than its limit — across a restart, and with a daemon and a backfill sharing one DB —
//! and a 429 pauses only its own bucket for Retry-After. Windows are shrunk (1.5 s "hours").

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lrvault::config::{Config, Credentials};
use lrvault::db::Db;
use lrvault::jobs::{Context, archive};
use lrvault_sim::SimConfig;
use tokio_util::sync::CancellationToken;

use crate::common::{env, wait_until};
use crate::custody_chain;

const PER_MINUTE: u32 = 6;
const PER_HOUR: u32 = 20;
const MINUTE: Duration = Duration::from_millis(300);
const HOUR: Duration = Duration::from_millis(1500);

/// Simulator and lrvault agree on the same (shrunk) limits: zero slack.
fn sim(actions: usize, seed: u64) -> SimConfig {
    SimConfig {
        seed,
        actions,
        per_minute: PER_MINUTE,
        per_hour: PER_HOUR,
        minute: MINUTE,
        hour: HOUR,
        max_getfile_size: 2048,
        ..SimConfig::default()
    }
}

fn quota_toml() -> String {
    format!(
        "[quota]\nper_minute = {PER_MINUTE}\nper_hour = {PER_HOUR}\nminute_secs = {}\nhour_secs = {}\n",
        MINUTE.as_secs_f64(),
        HOUR.as_secs_f64()
    )
}

/// Most requests inside any window of length `w` (the simulator's rule: `t_j - t_i < w`).
pub fn max_in_window(times: &[Instant], w: Duration) -> usize {
    let mut best = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end].duration_since(times[start]) >= w {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

pub fn endpoint_times(sim: &lrvault_sim::Simulator, endpoint: &str) -> Vec<Instant> {
    let mut t: Vec<Instant> = sim
        .requests()
        .iter()
        .filter(|r| r.endpoint == endpoint)
        .map(|r| r.at)
        .collect();
    t.sort();
    t
}

fn assert_windows_respected(sim: &lrvault_sim::Simulator) {
    for ep in ["link", "list", "get"] {
        let times = endpoint_times(sim, ep);
        assert!(
            max_in_window(&times, MINUTE) <= PER_MINUTE as usize,
            "{ep}: minute window exceeded"
        );
        assert!(
            max_in_window(&times, HOUR) <= PER_HOUR as usize,
            "{ep}: hour window exceeded"
        );
    }
    assert_eq!(sim.count_status(429), 0, "the simulator never throttled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stays_inside_both_windows_across_a_restart() {
    let e = env(sim(30, 21), &quota_toml()).await;
    let expected = crate::common::archivable(&e.sim.sim, &e.tenant_id()).len();
    assert!(
        expected > 2 * PER_HOUR as usize,
        "a backlog of several hour windows: {expected}"
    );
    e.discover().await;

    // First process: exactly one hour's budget, then it stops.
    let first = archive::archive(
        &e.ctx,
        &e.tenants,
        &archive::Scope {
            max: Some(PER_HOUR as usize),
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    assert_eq!(first.archived, PER_HOUR as usize);
    drop(e.ctx.clone());

    // "Restart": a new context on the same database; the budget is still spent.
    let cfg = Arc::new(Config::load(&e.config_path, Credentials::default()).unwrap());
    let ctx = Arc::new(
        Context::new(
            cfg.clone(),
            Db::open(&cfg.database.path).unwrap(),
            CancellationToken::new(),
        )
        .unwrap(),
    );
    let tenants: Vec<_> = ctx
        .tenants(None)
        .unwrap()
        .into_iter()
        .map(Arc::new)
        .collect();
    let rest = archive::archive(&ctx, &tenants, &archive::Scope::default(), None)
        .await
        .unwrap();
    assert_eq!(
        first.archived + rest.archived,
        expected,
        "{first:?} {rest:?}"
    );

    let links = endpoint_times(&e.sim.sim, "link");
    let issued = e.count("SELECT count(*) FROM custody_log WHERE event = 'LINK_ISSUED'");
    let eps: Vec<_> = e
        .sim
        .sim
        .requests()
        .iter()
        .map(|r| (r.endpoint, r.status))
        .collect();
    assert_eq!(
        links.len(),
        expected,
        "one link call per result; issued {issued}; {eps:?}"
    );
    // The first call after the restart waited for the first call of the hour to leave it.
    let n = PER_HOUR as usize;
    assert!(
        links[n].duration_since(links[0]) >= HOUR,
        "call {} came {:?} after the first",
        n + 1,
        links[n].duration_since(links[0])
    );
    assert_windows_respected(&e.sim.sim);
    custody_chain::recheck(&e.reader());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pauses_only_its_bucket_for_retry_after() {
    let mut cfg = sim(6, 4);
    cfg.per_minute = 100;
    cfg.per_hour = 1000;
    cfg.faults = vec!["429=1".parse().unwrap()];
    // One download at a time, so no other link call is already in flight when the 429 lands.
    let e = env(cfg, "[download]\nconcurrency = 1\n").await;
    e.discover().await;
    let ctx = e.ctx.clone();
    let tenants = e.tenants.clone();
    let pass = tokio::spawn(async move {
        archive::archive(&ctx, &tenants, &archive::Scope::default(), None)
            .await
            .unwrap()
    });
    let throttled = || {
        e.sim
            .sim
            .requests()
            .iter()
            .find(|r| r.endpoint == "link" && r.status == 429)
            .map(|r| r.at)
    };
    assert!(wait_until(Duration::from_secs(10), || throttled().is_some()).await);
    let t429 = throttled().unwrap();
    // Another bucket (List) is not paused: a discovery pass goes through at once.
    e.discover().await;
    let list_after = e
        .sim
        .sim
        .requests()
        .iter()
        .filter(|r| r.endpoint == "list" && r.at > t429)
        .map(|r| r.at)
        .min()
        .unwrap();
    assert!(
        list_after.duration_since(t429) < Duration::from_secs(1),
        "list waited {:?}",
        list_after.duration_since(t429)
    );
    let summary = pass.await.unwrap();
    assert_eq!(summary.failed + summary.retry_later, 0);
    // The next link call came no earlier than Retry-After (1 s).
    let next_link = e
        .sim
        .sim
        .requests()
        .iter()
        .filter(|r| r.endpoint == "link" && r.at > t429)
        .map(|r| r.at)
        .min()
        .unwrap();
    assert!(
        next_link.duration_since(t429) >= Duration::from_secs(1),
        "link resumed after {:?}",
        next_link.duration_since(t429)
    );
    // The 429 is in the ledger with its pause.
    let (status, pause): (i64, i64) = e
        .reader()
        .query_row(
            "SELECT http_status, pause_until_ms - at_ms FROM api_calls WHERE http_status = 429",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(status, 429);
    assert!((990..=1100).contains(&pause), "paused {pause} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_and_backfill_share_one_budget() {
    let extra = format!(
        "{}[schedule]\ndiscover = \"* * * * * *\"\narchive = \"* * * * * *\"\nverify = \"0 0 3 * * *\"\n",
        quota_toml()
    );
    let e = env(sim(24, 8), &extra).await;
    let expected = crate::common::archivable(&e.sim.sim, &e.tenant_id()).len() as i64;
    let mut daemon = e
        .lrvault()
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let backfill = e
        .lrvault()
        .args(["backfill", "--since", "3d"])
        .output()
        .unwrap();
    let done = wait_until(Duration::from_secs(60), || {
        e.count("SELECT count(*) FROM evidence") == expected
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = daemon.wait().unwrap();
    assert!(
        done,
        "archived {} of {expected}",
        e.count("SELECT count(*) FROM evidence")
    );
    assert_eq!(
        backfill.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&backfill.stderr)
    );
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        e.count("SELECT count(*) FROM custody_log WHERE event = 'ARCHIVED'"),
        expected,
        "each result archived once"
    );
    assert_eq!(endpoint_times(&e.sim.sim, "link").len() as i64, expected);
    assert_windows_respected(&e.sim.sim);
    custody_chain::recheck(&e.reader());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_dry_run_counts_and_changes_nothing_then_backfill_drains() {
    let e = env(
        SimConfig {
            seed: 9,
            actions: 20,
            spread: Duration::from_secs(20 * 86400),
            ..SimConfig::default()
        },
        "",
    )
    .await;
    let expected = e.sim.sim.expected_results(&e.tenant_id());
    let to_fetch = crate::common::archivable(&e.sim.sim, &e.tenant_id()).len();
    assert!(expected.len() > to_fetch);
    let (text, _) = e.run_ok(&["backfill", "--since", "30d", "--dry-run"]);
    assert!(
        text.contains("(+ 2 List calls made for this count)"),
        "{text}"
    );
    assert!(
        text.contains(&format!("{to_fetch} results to fetch")),
        "{text}"
    );
    assert!(
        text.contains(&format!("calls needed: {to_fetch} result links")),
        "{text}"
    );
    assert!(
        text.contains("ETA 0s"),
        "{to_fetch} links fit in the first minute: {text}"
    );
    for table in ["actions", "results", "evidence", "custody_log"] {
        assert_eq!(
            e.count(&format!("SELECT count(*) FROM {table}")),
            0,
            "{table} untouched by --dry-run"
        );
    }
    assert!(
        e.count("SELECT count(*) FROM api_calls WHERE endpoint = 'machineactions.list'") >= 1,
        "its List calls are in the ledger"
    );

    e.run_ok(&["backfill", "--since", "30d"]);
    assert_eq!(e.count("SELECT count(*) FROM evidence") as usize, to_fetch);
    assert_eq!(
        e.count("SELECT count(*) FROM actions WHERE source = 'backfill'"),
        e.count("SELECT count(*) FROM actions")
    );
    let (text, _) = e.run_ok(&["backfill", "--since", "30d", "--dry-run"]);
    assert!(
        text.contains(&format!("0 results to fetch, {to_fetch} already done")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_uses_its_own_budget_at_the_same_time() {
    let mut cfg = sim(14, 31);
    cfg.tenants = (0..2).map(lrvault_sim::SimTenant::default_for).collect();
    let e = env(cfg, &quota_toml()).await;
    e.discover().await;
    let summary = e.archive().await;
    let ids: Vec<String> = e
        .sim
        .sim
        .tenants()
        .iter()
        .map(|t| t.tenant_id.clone())
        .collect();
    let expected: usize = ids
        .iter()
        .map(|id| crate::common::archivable(&e.sim.sim, id).len())
        .sum();
    assert_eq!(summary.archived, expected);
    let links_of = |id: &str| {
        let mut t: Vec<Instant> = e
            .sim
            .sim
            .requests()
            .iter()
            .filter(|r| r.endpoint == "link" && r.tenant_id.as_deref() == Some(id))
            .map(|r| r.at)
            .collect();
        t.sort();
        t
    };
    let (a, b) = (links_of(&ids[0]), links_of(&ids[1]));
    assert!(
        a.len() > PER_HOUR as usize && b.len() > PER_HOUR as usize,
        "{} {}",
        a.len(),
        b.len()
    );
    for t in [&a, &b] {
        assert!(max_in_window(t, HOUR) <= PER_HOUR as usize);
        assert!(max_in_window(t, MINUTE) <= PER_MINUTE as usize);
    }
    // Neither tenant waited for the other: each made its first call before the other had
    // spent one hour's budget (a tenant queued behind the other would have made none before
    // the other's whole backlog, more than an hour's budget, was done). Counted in calls, not
    // in time, so a loaded machine cannot fail it.
    let before = |t: &[Instant], first: Instant| t.iter().filter(|x| **x < first).count();
    assert!(
        before(&a, b[0]) <= PER_HOUR as usize,
        "{:?}",
        before(&a, b[0])
    );
    assert!(
        before(&b, a[0]) <= PER_HOUR as usize,
        "{:?}",
        before(&b, a[0])
    );
    assert_eq!(e.sim.sim.count_status(429), 0);
    // One verify run over both tenants: one VERIFIED row, every package checked.
    let report = lrvault::verify::verify(&e.cfg, &e.ctx.db, None, None, false)
        .await
        .unwrap();
    assert_eq!(report.packages_checked, expected);
    assert!(report.ok());
    assert_eq!(
        e.count("SELECT count(*) FROM custody_log WHERE event = 'VERIFIED'"),
        1
    );
    assert_eq!(
        e.count("SELECT count(*) FROM evidence WHERE last_verify_ok = 1"),
        expected as i64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_a_backfill_cleanly_and_a_rerun_resumes() {
    let mut cfg = SimConfig {
        seed: 17,
        actions: 30,
        max_getfile_size: 64 << 10,
        ..SimConfig::default()
    };
    cfg.faults = vec!["slow=300000".parse().unwrap()];
    let e = env(cfg, "").await;
    let expected = crate::common::archivable(&e.sim.sim, &e.tenant_id()).len() as i64;
    let child = e
        .lrvault()
        .args(["backfill", "--since", "3d"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || e
            .count("SELECT count(*) FROM evidence")
            >= 3)
        .await
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stopped with results left: {err}"
    );
    assert!(
        err.contains("run the same backfill again to resume"),
        "{err}"
    );
    let after_stop = e.count("SELECT count(*) FROM evidence");
    assert!(
        after_stop < expected,
        "stopped early: {after_stop} of {expected}"
    );
    // Downloads in flight finished or went back to the queue; nothing is left half-done.
    assert_eq!(
        e.count("SELECT count(*) FROM results WHERE state = 'downloading'"),
        0
    );
    assert!(
        crate::common::files_under(e.store())
            .iter()
            .all(|p| !p.to_string_lossy().ends_with(".partial"))
    );

    e.run_ok(&["backfill", "--since", "3d"]);
    assert_eq!(e.count("SELECT count(*) FROM evidence"), expected);
    assert_eq!(
        e.count("SELECT count(*) FROM custody_log WHERE event = 'ARCHIVED'"),
        expected
    );
    custody_chain::recheck(&e.reader());
}
