//! Issue 18: one transfer budget for the whole process. `download.concurrency` bounds the
//! transfers in flight across every tenant, `download.per_tenant` bounds one tenant, counted
//! on the simulator's side as blob bodies it was sending at the same time.

use lrvault::sim::{Fault, SimConfig, SimTenant};

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
