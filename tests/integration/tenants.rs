//! Issue 18: one transfer budget for the whole process. `download.concurrency` bounds the
//! transfers in flight across every tenant, `download.per_tenant` bounds one tenant, counted
//! on the simulator's side as blob bodies it was sending at the same time.

use lrvault_sim::{Fault, SimConfig, SimTenant};

use crate::common::{archivable, env};

/// `tenants` tenants with `actions` actions each, bodies slowed so transfers overlap.
fn many(seed: u64, tenants: usize, actions: usize) -> SimConfig {
    SimConfig {
        seed,
        actions,
        tenants: (0..tenants).map(SimTenant::default_for).collect(),
        // A few KiB per result at this rate keep each body open for a while.
        faults: vec![Fault::Slow(64 * 1024)],
        ..SimConfig::default()
    }
}

async fn pass(sim: SimConfig, download: &str) -> (usize, usize, usize) {
    let e = env(sim, download).await;
    e.discover().await;
    let summary = e.archive().await;
    let expected: usize = e
        .sim
        .sim
        .tenants()
        .iter()
        .map(|t| archivable(&e.sim.sim, &t.tenant_id).len())
        .sum();
    (
        summary.archived,
        expected,
        e.sim.sim.peak_concurrent_blob_reads(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_never_has_more_transfers_in_flight_than_its_budget() {
    let (archived, expected, peak) = pass(many(181, 5, 3), "[download]\nconcurrency = 3\n").await;
    assert_eq!(archived, expected);
    assert!(expected > 5, "{expected}");
    assert!(peak <= 3, "{peak} blob bodies at once, budget 3");
    assert!(peak >= 2, "transfers overlapped ({peak})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_tenant_caps_one_tenant_below_the_process_budget() {
    let (archived, expected, peak) = pass(
        many(182, 1, 4),
        "[download]\nconcurrency = 4\nper_tenant = 1\n",
    )
    .await;
    assert_eq!(archived, expected);
    assert!(expected > 2, "{expected}");
    assert_eq!(peak, 1, "one tenant, one transfer at a time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_stays_readable_with_many_tenants() {
    let e = env(
        SimConfig {
            seed: 183,
            actions: 1,
            tenants: (0..12).map(SimTenant::default_for).collect(),
            ..SimConfig::default()
        },
        "",
    )
    .await;
    e.discover().await;
    let pending = e.count("SELECT count(DISTINCT tenant) FROM results WHERE state = 'pending'");
    assert!(pending > 0);
    let (out, _) = e.run_ok(&["status"]);
    assert!(out.contains("\nClouds: commercial 12\n"), "{out}");
    assert!(
        out.contains("Queue by state (12 tenants; `status --tenant T` shows one):"),
        "{out}"
    );
    assert!(out.contains("Tenants that need attention"), "{out}");
    // One line per state, not one per tenant and state; no quota row per tenant.
    assert!(!out.contains("sim11   pending"), "{out}");
    assert!(
        out.contains("Quota: 0 of 60 tenant endpoints at 80 % or more"),
        "{out}"
    );
    let (one, _) = e.run_ok(&["status", "--tenant", "sim3"]);
    assert!(one.contains("Queue by state:\n"), "{one}");
    let tenants_shown: std::collections::BTreeSet<&str> = one
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.starts_with("sim") && w.len() <= 5)
        .collect();
    assert_eq!(tenants_shown, ["sim3"].into_iter().collect(), "{one}");
    let (csv, _) = e.run_ok(&["audit", "quota", "--tenant", "sim3", "--format", "csv"]);
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert!(!rows.is_empty(), "{csv}");
    assert!(rows.iter().all(|r| r.starts_with("sim3,")), "{csv}");
    // Issue 20: the last call as an RFC 3339 time, beside the ledger's epoch milliseconds.
    assert_eq!(
        csv.lines().next(),
        Some("tenant,endpoint,calls_last_hour,throttled_429,errors,last_call_at,last_call_ms")
    );
    for r in &rows {
        let f: Vec<&str> = r.split(',').collect();
        let ms: i64 = f[6].parse().unwrap();
        let at = chrono::DateTime::from_timestamp_millis(ms).unwrap();
        assert_eq!(f[5], at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(), "{r}");
    }
}
