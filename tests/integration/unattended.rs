//! Issue 9: unattended for months. The real daemon (`lrvault run`) rides out an API outage
//! (503s, then a host that refuses connections) longer than all of `max_attempts`' backoffs
//! added up: every result is archived once afterwards, none is `failed`, no attempt is spent
//! on the outage, and the API hears at most one probe per breaker interval while it lasts.
//! A simulator whose clock runs an hour off ours still archives without re-issuing links.

use std::process::Child;
use std::time::{Duration, Instant};

use lrvault_sim::{Fault, SimConfig};

use crate::common::{Env, archivable, env, start_daemon, stop_daemon, wait_until};
use crate::custody_chain;

/// Short schedules and backoffs so an outage of a few seconds outlasts every backoff.
const UNATTENDED: &str = "[schedule]\ndiscover = \"*/2 * * * * *\"\narchive = \"* * * * * *\"\nverify = \"0 0 3 * * *\"\n\
[download]\nconcurrency = 2\nmax_attempts = 3\nretry_base = \"200ms\"\nretry_max = \"800ms\"\n";
const BASE: Duration = Duration::from_millis(200);
const MAX: Duration = Duration::from_millis(800);
/// Longer than the backoffs of max_attempts added up (200 + 400 + 800 ms): the least an
/// outage lasts.
const OUTAGE: Duration = Duration::from_secs(5);

/// A simulator whose GetFile bodies trickle, so the daemon is mid-queue when the outage hits.
async fn slow_env(seed: u64) -> Env {
    let cfg = SimConfig {
        seed,
        actions: 12,
        max_getfile_size: 48 * 1024,
        faults: vec!["slow=200000".parse::<Fault>().unwrap()],
        ..SimConfig::default()
    };
    env(cfg, UNATTENDED).await
}

fn archived(e: &Env) -> i64 {
    rusqlite::Connection::open_with_flags(
        &e.cfg.database.path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .and_then(|c| c.query_row("SELECT count(*) FROM evidence", [], |r| r.get(0)))
    .unwrap_or(0)
}

/// API calls lrvault made (its own quota ledger counts every request, answered or not)
/// between `from` and `to` (ms since the epoch).
fn api_calls_between(e: &Env, from: i64, to: i64) -> i64 {
    e.reader()
        .query_row(
            "SELECT count(*) FROM api_calls WHERE at_ms >= ?1 AND at_ms <= ?2",
            [from, to],
            |r| r.get(0),
        )
        .unwrap()
}

/// The most probes a breaker may let through in `span`: one per interval, the intervals
/// doubling from BASE to MAX, plus the one at the start.
fn probe_budget(span: Duration) -> i64 {
    let (mut t, mut interval, mut n) = (Duration::ZERO, BASE, 1);
    while t + interval <= span {
        t += interval;
        interval = (interval * 2).min(MAX);
        n += 1;
    }
    n
}

/// The end state after an outage: every archivable result archived exactly once, none
/// failed, no attempt spent on the outage, the breaker closed, the chain intact.
fn assert_outage_cost_nothing(e: &Env, expected: i64, log: &str) {
    assert_eq!(archived(e), expected, "log:\n{log}");
    assert_eq!(
        e.count("SELECT count(*) FROM custody_log WHERE event = 'ARCHIVED'"),
        expected
    );
    assert_eq!(
        e.count(
            "SELECT count(*) FROM (SELECT action_id, command_index FROM custody_log WHERE event = 'ARCHIVED'
             GROUP BY action_id, command_index HAVING count(*) > 1)"
        ),
        0,
        "archived once each"
    );
    assert_eq!(
        e.count("SELECT count(*) FROM results WHERE state = 'failed'"),
        0
    );
    // Each archived result spent exactly the one attempt that archived it.
    assert_eq!(
        e.count("SELECT count(*) FROM results WHERE state = 'archived' AND attempts <> 1"),
        0,
        "log:\n{log}"
    );
    assert_eq!(
        e.count("SELECT count(*) FROM tenant_health"),
        0,
        "breaker closed"
    );
    assert!(
        log.contains("the tenant's API answers again; breaker closed"),
        "{log}"
    );
    assert!(
        !log.contains("check tenant_id"),
        "an outage is not a bad secret:\n{log}"
    );
    custody_chain::recheck(&e.reader());
}

/// Keeps the outage on (the daemon is a child process; its breaker row is polled) until it
/// has lasted [`OUTAGE`] and the daemon has met it: its tenant's breaker is open and has
/// doubled its interval to the cap, so probes failed through the whole backoff ladder.
/// On a loaded machine that takes longer than `OUTAGE`; the outage then lasts longer.
async fn ride_out(e: &Env, start: Instant) {
    let at_cap = || {
        e.reader()
            .query_row(
                "SELECT count(*) FROM tenant_health WHERE interval_ms = ?1",
                [MAX.as_millis() as i64],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
            == 1
    };
    assert!(
        wait_until(Duration::from_secs(120), || start.elapsed() >= OUTAGE
            && at_cap())
        .await,
        "the daemon's breaker never reached its cap during the outage"
    );
}

/// A running daemon that has archived some of the queue, but not all of it.
struct Midway {
    daemon: Child,
    log: std::path::PathBuf,
    expected: i64,
}

async fn start_midway(e: &Env) -> Midway {
    let expected = archivable(&e.sim.sim, &e.tenant_id()).len() as i64;
    let (daemon, log) = start_daemon(e);
    assert!(wait_until(Duration::from_secs(30), || archived(e) >= 2).await);
    assert!(archived(e) < expected, "the outage must meet work left");
    Midway {
        daemon,
        log,
        expected,
    }
}

/// After an outage that lasted `lasted` and met `requests` API calls: everything gets
/// archived, and the calls stayed within one probe per breaker interval. Returns the log.
async fn finish_after_outage(e: &Env, m: Midway, requests: i64, lasted: Duration) -> String {
    assert!(
        wait_until(Duration::from_secs(60), || archived(e) == m.expected).await,
        "archived {} of {}",
        archived(e),
        m.expected
    );
    let log = stop_daemon(m.daemon, &m.log);
    assert!(requests >= 1, "the outage was met:\n{log}");
    // Calls in flight when it began (one per download slot, plus a List) may fail once
    // each; after that the breaker lets one probe through per interval.
    let budget = probe_budget(lasted) + 3;
    assert!(
        requests <= budget,
        "{requests} requests during a {OUTAGE:?} outage (budget {budget}):\n{log}"
    );
    assert_outage_cost_nothing(e, m.expected, &log);
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_outage_costs_no_evidence_no_attempts_and_one_probe_per_interval() {
    let e = slow_env(91).await;
    let midway = start_midway(&e).await;
    e.sim.sim.set_outage(true);
    let (t0, start) = (lrvault::time::now_ms(), Instant::now());
    ride_out(&e, start).await;
    e.sim.sim.set_outage(false);
    let (t1, lasted) = (lrvault::time::now_ms(), start.elapsed());
    // Requests the API answered with 503 while it was down.
    let requests = e
        .sim
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.endpoint != "blob" && r.status == 503)
        .count() as i64;
    // lrvault's own ledger saw them too (it counts every request, whatever the answer).
    assert!(api_calls_between(&e, t0, t1) >= requests);
    let log = finish_after_outage(&e, midway, requests, lasted).await;
    assert!(
        log.contains("token endpoint unavailable (HTTP 503)")
            || log.contains("HTTP 503 ServiceUnavailable"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_refuses_connections_costs_no_evidence_and_one_probe_per_interval() {
    let mut e = slow_env(92).await;
    let midway = start_midway(&e).await;
    e.sim.go_down().await;
    let (t0, start) = (lrvault::time::now_ms(), Instant::now());
    ride_out(&e, start).await;
    let (t1, lasted) = (lrvault::time::now_ms(), start.elapsed());
    e.sim.come_up().await.unwrap();
    // Refused connections never reach the simulator: count them in lrvault's own ledger,
    // where a request without an answer is recorded with status 0.
    let refused = e
        .reader()
        .query_row(
            "SELECT count(*) FROM api_calls WHERE http_status = 0 AND at_ms BETWEEN ?1 AND ?2",
            [t0, t1],
            |r| r.get::<_, i64>(0),
        )
        .unwrap();
    finish_after_outage(&e, midway, refused, lasted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_clock_an_hour_off_still_archives_without_reissuing_links() {
    for offset in [-3600, 3600] {
        let cfg = SimConfig {
            seed: 93,
            actions: 5,
            clock_offset: chrono::Duration::seconds(offset),
            ..SimConfig::default()
        };
        let e = env(
            cfg,
            "[download]\nretry_base = \"20ms\"\nretry_max = \"100ms\"\n",
        )
        .await;
        e.discover().await;
        let queued = e.queued().len();
        let s = e.archive().await;
        assert_eq!(s.archived, queued, "clock offset {offset}s: {s:?}");
        // One link per result: none judged expired on our clock, none refused by theirs.
        assert_eq!(e.api_calls("liveresponse.link"), queued as i64);
        assert_eq!(e.sim.sim.count_status(403), 0);
        assert_eq!(
            e.count("SELECT count(*) FROM custody_log WHERE event = 'LINK_ISSUED'"),
            queued as i64
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_archivers_on_one_database_archive_each_result_once() {
    use lrvault::jobs::{Context, archive};
    let e = env(
        SimConfig {
            seed: 94,
            actions: 10,
            ..SimConfig::default()
        },
        "[download]\nconcurrency = 3\n",
    )
    .await;
    e.discover().await;
    let expected = e.queued().len();
    // A second process on the same database and store: its own connection and lease owner.
    let db = lrvault::db::Db::open(&e.cfg.database.path).unwrap();
    let other = std::sync::Arc::new(
        Context::new(
            e.cfg.clone(),
            db,
            tokio_util::sync::CancellationToken::new(),
        )
        .unwrap(),
    );
    assert_ne!(other.owner, e.ctx.owner);
    let other_tenants: Vec<_> = other
        .tenants(None)
        .unwrap()
        .into_iter()
        .map(std::sync::Arc::new)
        .collect();
    let scope = archive::Scope::default();
    let (a, b) = tokio::join!(
        archive::archive(&e.ctx, &e.tenants, &scope, None),
        archive::archive(&other, &other_tenants, &scope, None),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.archived + b.archived, expected, "{a:?} {b:?}");
    assert_eq!(e.count("SELECT count(*) FROM evidence"), expected as i64);
    assert_eq!(
        e.count("SELECT count(*) FROM custody_log WHERE event = 'ARCHIVED'"),
        expected as i64
    );
    assert_eq!(e.api_calls("liveresponse.link"), expected as i64);
    assert_eq!(e.partials(), Vec::<std::path::PathBuf>::new());
    custody_chain::recheck(&e.reader());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_refused_mid_pass_stops_the_pass_without_charging_anything() {
    // Tokens live 2 s and bodies trickle, so the token is refreshed in the middle of the pass,
    // after the secret was rotated on the app but not in lrvault's file.
    let cfg = SimConfig {
        seed: 95,
        actions: 8,
        max_getfile_size: 2048,
        faults: ["token-ttl=2", "slow=4000"]
            .iter()
            .map(|f| f.parse::<Fault>().unwrap())
            .collect(),
        ..SimConfig::default()
    };
    let e = env(cfg, "[download]\nconcurrency = 1\n").await;
    e.discover().await;
    let queued = e.queued().len();
    let secret = e._dir.path().join("sim-secret-0");
    let (pass, ()) = tokio::join!(e.archive(), async {
        // Once the pass has its token, rotate the secret under it. (The simulator answers on
        // its own task; its request log is polled.)
        let issued = || {
            e.sim
                .sim
                .requests()
                .iter()
                .any(|r| r.endpoint == "token" && r.status == 200)
        };
        assert!(wait_until(Duration::from_secs(30), issued).await);
        std::fs::write(&secret, "rotated-on-the-app-only\n").unwrap();
    });
    assert!(pass.archived < queued, "the pass stopped early: {pass:?}");
    assert_eq!(pass.breakers.len(), 1, "{pass:?}");
    let line = &pass.breakers[0];
    assert!(
        line.contains("token request refused (HTTP 401): invalid_client (AADSTS 7000215)")
            && line.contains("client_secret_file"),
        "{line}"
    );
    // Nothing was charged, nothing failed, and nothing was claimed and handed back one by one.
    assert_eq!(
        e.count("SELECT count(*) FROM results WHERE state = 'failed'"),
        0
    );
    assert_eq!(
        e.count("SELECT count(*) FROM results WHERE state = 'pending' AND attempts > 0"),
        0
    );
    assert!(pass.deferred <= 1, "{pass:?}");
    assert_eq!(
        e.count("SELECT count(*) FROM tenant_health WHERE trouble = 'refused'"),
        1
    );
}
