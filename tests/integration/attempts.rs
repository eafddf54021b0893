//! Issue 16, docs/design.md §6: every attempt that fails and will be retried leaves one
//! ATTEMPT_FAILED custody row with its scope, reason, attempts and next due time. Before,
//! a download interrupted for good left only its LINK_ISSUED row. (The tenant scope is in
//! `faults.rs`, the process scope of a crashed download in `crash.rs`.)

use lrvault_sim::{Fault, SimConfig};

use crate::common::env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_interrupted_past_its_resumes_leaves_an_attempt_failed_row() {
    // The first body and its three resumes are cut: the attempt fails (the result's own
    // failure, charged), the next one archives.
    let sim = SimConfig {
        seed: 27,
        actions: 3,
        faults: vec!["truncate=4".parse::<Fault>().unwrap()],
        ..SimConfig::default()
    };
    let fast = "[download]\nconcurrency = 1\nretry_base = \"20ms\"\nretry_max = \"100ms\"\n";
    let e = env(sim, fast).await;
    e.discover().await;
    let queued = e.queued();
    let s = e.archive().await;
    assert_eq!((s.retry_later, s.archived), (1, queued.len() - 1), "{s:?}");
    let first = e.queued()[0].clone();
    assert_eq!(
        e.events(&first.action_id, first.index),
        ["LINK_ISSUED", "ATTEMPT_FAILED"]
    );
    let (_, detail) = e.custody(&first.action_id, first.index).pop().unwrap();
    assert_eq!(detail["scope"], "result");
    assert_eq!(detail["attempts"], 1);
    let reason = detail["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("transfer interrupted after "),
        "{reason}"
    );
    assert_eq!(Some(reason), first.last_error.as_deref());
    assert!(!reason.contains("sig="), "{reason}");
    let due: String = e
        .reader()
        .query_row(
            "SELECT next_attempt_at FROM results WHERE action_id = ?1 AND command_index = ?2",
            rusqlite::params![first.action_id, first.index],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(detail["next_attempt_at"], due.as_str());
    e.wait_due().await;
    assert_eq!(e.archive().await.archived, 1);
    assert_eq!(
        e.events(&first.action_id, first.index),
        [
            "LINK_ISSUED",
            "ATTEMPT_FAILED",
            "LINK_ISSUED",
            "DOWNLOADED",
            "PUBLISHING",
            "ARCHIVED"
        ]
    );
    let (code, out, err) = crate::tamper::lrvault(&e.config_path, &["verify"]);
    assert_eq!(code, 0, "{out}\n{err}");
}
