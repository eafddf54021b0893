//! Issue 24, metrics: the daemon serves OpenMetrics at `/metrics` on `[metrics] listen`; a
//! scrape during a pass and one after it are parsed by an independent parser (Python's
//! `prometheus_client` OpenMetrics parser; `.ci/run` installs it) and the counters equal the
//! database's own counts; no label carries a secret, a token or a query string.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use lrvault_sim::{Fault, SimConfig};

use crate::common::{Env, env, start_daemon, stop_daemon, wait_until};

/// (sample name, labels) → value, as Python's parser read the exposition.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Parses `text` with `prometheus_client.openmetrics.parser` in a python3 child.
fn parse(text: &str) -> Samples {
    let script = "import json, sys\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
        out = []\n\
        for family in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in family.samples:\n\
        \x20       out.append([s.name, s.labels, s.value])\n\
        print(json.dumps(out))\n";
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is required");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client (pip install prometheus_client; .ci/run does) refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<(String, BTreeMap<String, String>, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    samples
        .into_iter()
        .map(|(name, labels, value)| ((name, labels), value))
        .collect()
}

fn value(s: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    s.get(&(name.to_string(), labels)).copied()
}

async fn scrape(addr: &str) -> String {
    let answer = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    answer.text().await.unwrap()
}

/// (tenant, endpoint, status) → answered calls, from the quota ledger itself.
fn ledger(e: &Env) -> BTreeMap<(String, String, String), f64> {
    let c = e.reader();
    let mut st = c
        .prepare(
            "SELECT tenant, endpoint, http_status, count(*) FROM api_calls
             WHERE http_status IS NOT NULL GROUP BY tenant, endpoint, http_status",
        )
        .unwrap();
    st.query_map([], |r| {
        Ok((
            (r.get(0)?, r.get(1)?, r.get::<_, i64>(2)?.to_string()),
            r.get::<_, i64>(3)? as f64,
        ))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_during_and_after_a_pass_matches_the_database() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    // Discovery once at start; archive every second; nothing else calls the API afterwards.
    let extra = format!(
        "[schedule]\ndiscover = \"0 0 3 * * *\"\narchive = \"* * * * * *\"\nverify = \"0 0 3 * * *\"\n\
         [download]\nconcurrency = 1\n[metrics]\nlisten = \"{addr}\"\n"
    );
    let sim = SimConfig {
        seed: 27,
        actions: 10,
        max_getfile_size: 20_000,
        faults: vec![Fault::Slow(4_000)],
        ..SimConfig::default()
    };
    let e = env(sim, &extra).await;
    let expected = crate::common::archivable(&e.sim.sim, &e.tenant_id()).len() as i64;
    let (daemon, log) = start_daemon(&e);
    let evidence = "SELECT count(*) FROM evidence";
    let started = wait_until(Duration::from_secs(60), || e.count(evidence) >= 1).await;
    assert!(started, "{}", std::fs::read_to_string(&log).unwrap());

    // During the pass: the count scraped lies between the counts read before and after.
    let before = e.count(evidence) as f64;
    let during = parse(&scrape(&addr).await);
    let after = e.count(evidence) as f64;
    let packages = value(
        &during,
        "lrvault_archived_packages_total",
        &[("tenant", "sim0")],
    );
    let packages = packages.unwrap();
    assert!(
        before <= packages && packages <= after,
        "{before} {packages} {after}"
    );
    assert!(packages < expected as f64, "the scrape came after the pass");

    let done = wait_until(Duration::from_secs(120), || {
        e.count(evidence) == expected
            && e.count("SELECT count(*) FROM job_runs WHERE job = 'archive' AND ok = 1") == 1
            && e.count("SELECT count(*) FROM results WHERE state IN ('pending', 'downloading')")
                == 0
    })
    .await;
    assert!(done, "{}", std::fs::read_to_string(&log).unwrap());
    // The archive job ticks every second and records each run: its last success is read
    // before and after the scrape.
    let last_ok = || {
        let at = e.count_text("SELECT finished_at FROM job_runs WHERE job = 'archive'");
        chrono::DateTime::parse_from_rfc3339(&at)
            .unwrap()
            .timestamp_millis() as f64
            / 1000.0
    };
    let ok_before = last_ok();
    let text = scrape(&addr).await;
    let ok_after = last_ok();
    let s = parse(&text);
    stop_daemon(daemon, &log);

    let t = [("tenant", "sim0")];
    assert_eq!(
        value(&s, "lrvault_archived_packages_total", &t),
        Some(expected as f64)
    );
    let bytes = e.count("SELECT sum(payload_size) FROM evidence") as f64;
    assert_eq!(value(&s, "lrvault_archived_bytes_total", &t), Some(bytes));
    for state in [
        "pending",
        "downloading",
        "archived",
        "unavailable",
        "skipped",
        "failed",
    ] {
        let n = e.count(&format!(
            "SELECT count(*) FROM results WHERE state = '{state}'"
        ));
        let labels = [("tenant", "sim0"), ("state", state)];
        assert_eq!(
            value(&s, "lrvault_results", &labels),
            Some(n as f64),
            "{state}"
        );
    }
    let calls: BTreeMap<_, _> = s
        .iter()
        .filter(|((name, _), _)| name == "lrvault_api_calls_total")
        .map(|((_, l), v)| {
            (
                (
                    l["tenant"].clone(),
                    l["endpoint"].clone(),
                    l["status"].clone(),
                ),
                *v,
            )
        })
        .collect();
    assert_eq!(calls, ledger(&e));
    assert!(!calls.is_empty());
    assert_eq!(value(&s, "lrvault_breaker_open", &t), Some(0.0));
    assert_eq!(value(&s, "lrvault_oldest_pending_seconds", &t), Some(0.0));
    assert_eq!(value(&s, "lrvault_verify_defects", &[]), Some(0.0));
    let success = value(
        &s,
        "lrvault_last_success_timestamp_seconds",
        &[("tenant", "sim0"), ("job", "archive")],
    )
    .unwrap();
    assert!(
        ok_before <= success && success <= ok_after,
        "{ok_before} {success} {ok_after}"
    );
    // Each endpoint against its own hourly limit: getPackageUri's is 120 (operations §2.1).
    let configured = e.cfg.quota.per_hour as f64;
    for (ep, per_hour) in [
        ("token", configured),
        ("machineactions.list", configured),
        ("machineactions.get", configured),
        ("liveresponse.link", configured),
        ("machineactions.packageuri", configured.min(120.0)),
    ] {
        let labels = [("tenant", "sim0"), ("endpoint", ep), ("window", "hour")];
        let used: f64 = calls
            .iter()
            .filter(|((_, endpoint, _), _)| endpoint == ep)
            .map(|(_, v)| v)
            .sum();
        assert_eq!(
            value(&s, "lrvault_quota_headroom", &labels),
            Some(per_hour - used),
            "{ep}"
        );
    }
    // No label value carries a secret, a token or a query string.
    let secret = e.sim.sim.tenants()[0].client_secret.clone();
    for (_, labels) in s.keys() {
        for v in labels.values() {
            assert!(
                !v.contains('?') && !v.contains("token=") && !v.contains(&secret),
                "{v}"
            );
        }
    }
    assert!(!text.contains(&secret));
    let mut names: Vec<&str> = s.keys().map(|(n, _)| n.as_str()).collect();
    names.dedup();
    eprintln!("metrics: {} samples, {} names", s.len(), names.len());
}

/// A metrics address another process holds stops the daemon at start: one line, exit 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_stops_the_start_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let e = env(
        SimConfig::default(),
        &format!("[metrics]\nlisten = \"{addr}\"\n"),
    )
    .await;
    let out = e.lrvault().arg("run").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!(
            "lrvault: cannot serve metrics on metrics.listen {addr}: Address already in use (os error 98)"
        )
    );
    drop(taken);
}
