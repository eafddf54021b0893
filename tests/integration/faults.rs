//! Issue 4: every remote fault the simulator can produce ends in the exact state the design
//! asks for: re-issued links (and how many), retries with backoff and attempt counts,
//! `unavailable` / `failed` with the custody reason, integrity failures never archived,
//! hostile names sanitised, foreign links refused before any connection, and no secret in
//! the logs, the DB or the packages. Downloads run one at a time (`concurrency = 1`) so the
//! simulator's counted faults hit a known result.

use std::process::Stdio;

use lrvault_sim::{ExpectedResult, Fault, SimConfig};
use serde_json::json;

use crate::common::{Env, ResultRow, check_bag, env, sha256_hex};
use crate::custody_chain;

/// Tiny backoff so a retried result is due again within milliseconds.
const FAST: &str = "[download]\nconcurrency = 1\nretry_base = \"20ms\"\nretry_max = \"100ms\"\n";

fn sim(actions: usize, seed: u64, faults: &[&str]) -> SimConfig {
    SimConfig {
        seed,
        actions,
        faults: faults.iter().map(|f| f.parse::<Fault>().unwrap()).collect(),
        ..SimConfig::default()
    }
}

async fn faulty(actions: usize, seed: u64, faults: &[&str], extra: &str) -> Env {
    let e = env(sim(actions, seed, faults), extra).await;
    e.discover().await;
    assert!(!e.queued().is_empty(), "the seed queues results");
    e
}

fn expected(e: &Env, r: &ResultRow) -> ExpectedResult {
    e.sim
        .sim
        .expected_results(&e.tenant_id())
        .into_iter()
        .find(|x| x.action_id == r.action_id && x.index == r.index)
        .unwrap()
}

/// The package of an archived result checks from scratch and carries the simulator's hashes;
/// returns its retrieval.json.
fn archived_package(e: &Env, r: &ResultRow) -> serde_json::Value {
    let (path, sha): (String, String) = e
        .reader()
        .query_row(
            "SELECT package_path, payload_sha256 FROM evidence WHERE action_id = ?1 AND command_index = ?2",
            rusqlite::params![r.action_id, r.index],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    let x = expected(e, r);
    assert_eq!(sha, x.sha256);
    let (_, payload, retrieval) = check_bag(&e.store().join(path));
    assert_eq!(sha256_hex(&payload), x.sha256);
    assert_eq!(payload.len() as u64, x.size);
    retrieval
}

/// The end state every test shares: evidence rows and packages match one to one, no partial
/// files, nothing left downloading, the custody chain rechecks, blob requests carried no
/// Authorization header.
fn invariants(e: &Env) {
    assert_eq!(e.partials(), Vec::<std::path::PathBuf>::new());
    assert_eq!(
        e.count("SELECT count(*) FROM results WHERE state = 'downloading'"),
        0
    );
    let packages = crate::common::packages_under(e.store()).len() as i64;
    assert_eq!(e.count("SELECT count(*) FROM evidence"), packages);
    assert_eq!(
        e.count("SELECT count(*) FROM results WHERE state = 'archived'"),
        packages
    );
    assert_eq!(
        e.count("SELECT count(*) FROM custody_log WHERE event = 'ARCHIVED'"),
        packages
    );
    custody_chain::recheck(&e.reader());
    assert_eq!(e.sim.sim.blob_requests_with_authorization(), 0);
}

fn link_issues(e: &Env, r: &ResultRow) -> Vec<i64> {
    e.custody(&r.action_id, r.index)
        .into_iter()
        .filter(|(ev, _)| ev == "LINK_ISSUED")
        .map(|(_, d)| d["issue"].as_i64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_links_are_reissued_without_touching_the_blob_host() {
    let e = faulty(4, 21, &["expired-links=2"], FAST).await;
    let queued = e.queued();
    let s = e.archive().await;
    assert_eq!(s.archived, queued.len(), "{s:?}");
    let first = &e.queued()[0];
    assert_eq!((first.state.as_str(), first.attempts), ("archived", 1));
    // Links 1 and 2 were already past `se`: re-issued, each one a quota call.
    assert_eq!(link_issues(&e, first), vec![1, 2, 3]);
    for r in &queued[1..] {
        assert_eq!(link_issues(&e, r), vec![1]);
    }
    assert_eq!(e.api_calls("liveresponse.link"), queued.len() as i64 + 2);
    // Only valid links reached the blob host, once per result; no 403 was ever earned.
    assert_eq!(e.sim_requests("blob").len(), queued.len());
    assert_eq!(e.sim.sim.count_status(403), 0);
    let retrieval = archived_package(&e, first);
    assert_eq!(retrieval["link_issues"], 3);
    invariants(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_reissues_the_link_then_backs_off_past_max_link_reissues() {
    // Two refused links: re-issued twice, archived.
    let e = faulty(3, 22, &["blob-403=2"], FAST).await;
    let queued = e.queued();
    assert_eq!(e.archive().await.archived, queued.len());
    let first = &e.queued()[0];
    assert_eq!(link_issues(&e, first), vec![1, 2, 3]);
    assert_eq!(e.sim.sim.count_status(403), 2);
    assert_eq!(e.sim_requests("blob").len(), queued.len() + 2);
    assert_eq!(e.api_calls("liveresponse.link"), queued.len() as i64 + 2);
    assert_eq!(archived_package(&e, first)["link_issues"], 3);
    invariants(&e);

    // More 403s than max_link_reissues: the attempt ends, charged, and backs off (docs/design.md §4:
    // running out of re-issues is a retryable result failure, not a terminal one).
    let extra = format!("{FAST}max_link_reissues = 2\n");
    let e = faulty(3, 22, &["blob-403=50"], &extra).await;
    let s = e.archive_max(1).await;
    assert_eq!((s.retry_later, s.failed, s.archived), (1, 0, 0), "{s:?}");
    let first = &e.queued()[0];
    assert_eq!((first.state.as_str(), first.attempts), ("pending", 1));
    let reason = "download link refused (403 AuthenticationFailed) after 2 re-issues";
    assert_eq!(first.last_error.as_deref(), Some(reason));
    assert_eq!(link_issues(&e, first), vec![1, 2, 3]);
    assert_eq!(
        e.events(&first.action_id, first.index),
        [
            "LINK_ISSUED",
            "LINK_ISSUED",
            "LINK_ISSUED",
            "ATTEMPT_FAILED"
        ]
    );
    let (_, retried) = e.custody(&first.action_id, first.index).pop().unwrap();
    assert_eq!(
        (&retried["scope"], &retried["reason"], &retried["attempts"]),
        (&json!("result"), &json!(reason), &json!(1))
    );
    assert_eq!(e.api_calls("liveresponse.link"), 3);
    invariants(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_5xx_opens_the_breaker_uncharged_and_blob_5xx_backs_off() {
    let e = faulty(4, 23, &["link-5xx=2", "blob-5xx=1"], FAST).await;
    let queued = e.queued();
    assert!(queued.len() >= 3);
    // The first link call meets a 500: the tenant's side is down. The result goes back
    // uncharged and the pass stops at once (nothing else is tried).
    let s = e.archive().await;
    assert_eq!(
        (s.deferred, s.archived, s.not_started),
        (1, 0, queued.len() - 1),
        "{s:?}"
    );
    assert_eq!(s.breakers.len(), 1, "{s:?}");
    assert!(
        s.breakers[0].starts_with(
            "tenant 'sim0': liveresponse.link: HTTP 500 InternalServerError (breaker open since "
        ),
        "{s:?}"
    );
    let first = &e.queued()[0];
    assert_eq!((first.state.as_str(), first.attempts), ("pending", 0));
    assert_eq!(
        first.last_error.as_deref(),
        Some("liveresponse.link: HTTP 500 InternalServerError")
    );
    assert_eq!(
        e.count("SELECT count(*) FROM tenant_health WHERE trouble = 'outage'"),
        1
    );
    // Passes go on (the breaker lets one probe through per interval) until all is archived:
    // the second 500 fails a probe, the blob 503 is the result's own and is charged.
    // Between passes the test waits exactly as long as the breaker and the backoffs say.
    let mut passes = 0;
    while e.count("SELECT count(*) FROM results WHERE state = 'archived'") < queued.len() as i64 {
        passes += 1;
        assert!(passes < 10, "not archived after {passes} passes");
        if let Some(left) = e.tenants[0].breaker.until_probe() {
            tokio::time::sleep(left).await;
        }
        e.wait_due().await;
        e.archive().await;
    }
    assert_eq!(e.sim.sim.count_status(500), 2);
    assert_eq!(e.sim.sim.count_status(503), 1);
    let rows = e.queued();
    assert_eq!((rows[0].state.as_str(), rows[0].attempts), ("archived", 2));
    for r in &rows[1..] {
        assert_eq!((r.state.as_str(), r.attempts), ("archived", 1), "{r:?}");
    }
    // The 500s issued no link; the 503 met the first link, the second one was downloaded.
    assert_eq!(
        e.events(&rows[0].action_id, rows[0].index),
        vec![
            "ATTEMPT_FAILED",
            "ATTEMPT_FAILED",
            "LINK_ISSUED",
            "ATTEMPT_FAILED",
            "LINK_ISSUED",
            "DOWNLOADED",
            "PUBLISHING",
            "ARCHIVED"
        ]
    );
    // Who paid for each retried attempt: the tenant's side twice (nothing charged), then the
    // result itself.
    let retried: Vec<(serde_json::Value, serde_json::Value)> = e
        .custody(&rows[0].action_id, rows[0].index)
        .into_iter()
        .filter(|(ev, _)| ev == "ATTEMPT_FAILED")
        .map(|(_, d)| (d["scope"].clone(), d["attempts"].clone()))
        .collect();
    assert_eq!(
        retried,
        [
            (json!("tenant"), json!(0)),
            (json!("tenant"), json!(0)),
            (json!("result"), json!(1))
        ]
    );
    assert_eq!(archived_package(&e, &rows[0])["attempts"], 2);
    assert_eq!(
        e.count("SELECT count(*) FROM tenant_health"),
        0,
        "breaker closed"
    );
    invariants(&e);
}

/// A one-shot `archive` whose breaker opened exits and leaves its row; the next process the
/// API answers clears it, so `status` shows no breaker that nobody holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_row_another_process_left_is_cleared_when_the_api_answers() {
    let e = faulty(2, 23, &[], FAST).await;
    rusqlite::Connection::open(&e.cfg.database.path)
        .unwrap()
        .execute(
            "INSERT INTO tenant_health VALUES ('sim0', 'outage', 'liveresponse.link: HTTP 503', \
             '2026-12-01T10:00:00.000Z', '2026-12-01T10:00:02.000Z', 2000, '2026-12-01T10:00:00.000Z')",
            [],
        )
        .unwrap();
    let (status, _) = e.run_ok(&["status"]);
    assert!(status.contains("Open breakers"), "{status}");
    e.discover().await;
    assert_eq!(e.count("SELECT count(*) FROM tenant_health"), 0);
    let (status, _) = e.run_ok(&["status"]);
    assert!(!status.contains("Open breakers"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attempts_ends_in_failed_and_status_shows_it() {
    let extra = format!("{FAST}max_attempts = 3\n");
    // A failure of the result itself (the blob host answers 503 for it), every attempt.
    let e = faulty(2, 24, &["blob-5xx=1000"], &extra).await;
    for attempt in 1..=3u32 {
        let s = e.archive_max(1).await;
        let first = &e.queued()[0];
        assert_eq!(first.attempts, attempt);
        if attempt < 3 {
            assert_eq!((s.retry_later, first.state.as_str()), (1, "pending"));
            e.wait_due().await;
        } else {
            assert_eq!((s.failed, first.state.as_str()), (1, "failed"));
        }
    }
    let first = &e.queued()[0];
    let reason = "blob host answered HTTP 503 ServerBusy";
    assert_eq!(
        e.events(&first.action_id, first.index),
        [
            "LINK_ISSUED",
            "ATTEMPT_FAILED",
            "LINK_ISSUED",
            "ATTEMPT_FAILED",
            "LINK_ISSUED",
            "FAILED"
        ]
    );
    let (_, detail) = e.custody(&first.action_id, first.index).pop().unwrap();
    assert_eq!(detail, json!({ "reason": reason, "attempts": 3 }));
    // A failed result is never picked again.
    assert_eq!(e.archive_max(1).await.failed, 0);
    assert_eq!(e.queued()[0].attempts, 3);

    let out = e
        .lrvault()
        .args(["status", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let attention = status["attention"].to_string();
    assert!(attention.contains(&first.action_id), "{status}");
    assert!(
        attention.contains("failed") && attention.contains(reason),
        "{status}"
    );
    assert!(
        status["queue"].to_string().contains("failed"),
        "{}",
        status["queue"]
    );
    invariants(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_on_the_link_is_unavailable_with_the_api_code() {
    let e = faulty(3, 25, &["gone=1"], FAST).await;
    let queued = e.queued();
    let s = e.archive().await;
    assert_eq!((s.unavailable, s.archived), (1, queued.len() - 1), "{s:?}");
    let first = &e.queued()[0];
    assert!(expected(&e, first).gone);
    assert_eq!((first.state.as_str(), first.attempts), ("unavailable", 1));
    assert_eq!(e.events(&first.action_id, first.index), ["UNAVAILABLE"]);
    let (_, detail) = e.custody(&first.action_id, first.index).pop().unwrap();
    assert_eq!(detail["error_code"], "ResourceNotFound");
    assert_eq!(detail["http_status"], 404);
    assert!(
        detail["reason"]
            .as_str()
            .unwrap()
            .starts_with("liveresponse.link: HTTP 404 ResourceNotFound"),
        "{detail}"
    );
    invariants(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refreshed_once() {
    let e = env(sim(3, 26, &["unauthorized=1"]), FAST).await;
    e.discover().await;
    let queued = e.queued();
    assert_eq!(e.archive().await.archived, queued.len());
    // The first API call met the 401; the client fetched one new token and carried on.
    assert_eq!(e.sim.sim.count_status(401), 1);
    assert_eq!(e.sim_requests("token").len(), 2);
    assert_eq!(e.sim.sim.issued_tokens().len(), 2);
    assert_eq!(e.api_calls("token"), 2);
    assert_eq!(
        e.count("SELECT count(*) FROM api_calls WHERE http_status = 401"),
        1
    );
    invariants(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_body_is_resumed_with_range() {
    let e = faulty(3, 27, &["truncate=1"], FAST).await;
    let queued = e.queued();
    assert_eq!(e.archive().await.archived, queued.len());
    let first = &e.queued()[0];
    assert_eq!(first.attempts, 1);
    let x = expected(&e, first);
    let retrieval = archived_package(&e, first);
    let ranges = retrieval["ranges"].as_array().unwrap().clone();
    assert_eq!(ranges.len(), 1, "{retrieval}");
    let from = ranges[0].as_u64().unwrap();
    assert!(from > 0 && from <= x.size / 2, "{from} of {}", x.size);
    assert_eq!(retrieval["sha256"], x.sha256.as_str());
    assert_eq!(retrieval["md5_check"], "match");
    assert_eq!(retrieval["link_issues"], 1);
    let blob = e.sim_requests("blob");
    assert_eq!(blob.len(), queued.len() + 1);
    assert_eq!(blob[0].range, None);
    assert_eq!(
        blob[1].range.as_deref(),
        Some(format!("bytes={from}-").as_str())
    );
    assert_eq!(blob[1].status, 206);
    invariants(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_md5_is_never_archived_and_is_retried() {
    let e = faulty(3, 28, &["bad-md5=1"], FAST).await;
    let queued = e.queued();
    let s = e.archive().await;
    assert_eq!((s.retry_later, s.archived), (1, queued.len() - 1), "{s:?}");
    let first = &e.queued()[0];
    assert_eq!((first.state.as_str(), first.attempts), ("pending", 1));
    assert!(
        first
            .last_error
            .as_deref()
            .unwrap()
            .starts_with("integrity check failed: MD5 mismatch"),
        "{first:?}"
    );
    // No package, no evidence row, no DOWNLOADED row for the rejected bytes.
    assert_eq!(
        e.events(&first.action_id, first.index),
        ["LINK_ISSUED", "ATTEMPT_FAILED"]
    );
    invariants(&e);
    e.wait_due().await;
    assert_eq!(e.archive().await.archived, 1);
    let first = &e.queued()[0];
    assert_eq!((first.state.as_str(), first.attempts), ("archived", 2));
    let retrieval = archived_package(&e, first);
    assert_eq!(retrieval["md5_check"], "match");
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
    invariants(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_are_sanitised_inside_the_bag() {
    let e = faulty(30, 29, &["hostile-names"], "").await;
    let queued = e.queued();
    assert_eq!(e.archive().await.archived, queued.len());
    let getfiles: Vec<&ResultRow> = queued
        .iter()
        .filter(|r| r.command_type == "GetFile")
        .collect();
    assert!(getfiles.len() >= 5, "{}", getfiles.len());
    let mut changed = 0;
    for r in getfiles {
        let x = expected(&e, r);
        let raw = x.original_name.clone().unwrap();
        let path: String = e
            .reader()
            .query_row(
                "SELECT package_path FROM evidence WHERE action_id = ?1 AND command_index = ?2",
                rusqlite::params![r.action_id, r.index],
                |row| row.get(0),
            )
            .unwrap();
        let (name, payload, retrieval) = check_bag(&e.store().join(path));
        assert_eq!(sha256_hex(&payload), x.sha256);
        assert_eq!(retrieval["original_name"], raw.as_str());
        let base = name.strip_suffix(".gz").unwrap();
        let sanitised = lrvault::package::sanitize_file_name(last_component(&raw));
        if sanitised.len() + 3 <= 200 {
            assert_eq!(base, sanitised, "{raw:?}");
        } else {
            // Shortened further so the name with its `.gz` still fits 200 bytes.
            assert_eq!(name.len(), 200, "{name}");
            assert!(base.ends_with(".log"), "{name}");
        }
        assert!(name.len() <= 200, "{name}");
        assert!(
            !name.contains(['/', '\\', ':']) && !name.chars().any(char::is_control),
            "{name:?}"
        );
        assert!(base != "." && base != ".." && !base.is_empty(), "{name:?}");
        if base != last_component(&raw) {
            changed += 1;
        }
    }
    assert!(changed >= 3, "the fault produced hostile names: {changed}");
    invariants(&e);
}

/// The base name of a Windows or POSIX path, as the archiver takes it.
fn last_component(raw: &str) -> &str {
    raw.rsplit(['/', '\\'])
        .find(|p| !p.trim().is_empty())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_http_and_redirected_links_are_refused_at_once() {
    let e = faulty(
        4,
        30,
        &["foreign-host=1", "http-link=1", "redirect=1"],
        FAST,
    )
    .await;
    let queued = e.queued();
    assert!(queued.len() >= 4);
    let s = e.archive().await;
    assert_eq!((s.failed, s.archived), (3, queued.len() - 3), "{s:?}");
    let rows = e.queued();
    let reasons = [
        "download link refused: host evil.example.net is not in download_hosts",
        "download link refused: scheme http to host blob.example.net (https required)",
        "blob host redirected (HTTP 302) to host evil.example.net",
    ];
    for (r, reason) in rows.iter().zip(reasons) {
        assert_eq!((r.state.as_str(), r.attempts), ("failed", 1), "{r:?}");
        assert_eq!(r.last_error.as_deref(), Some(reason));
        assert_eq!(e.events(&r.action_id, r.index), ["LINK_ISSUED", "FAILED"]);
        let (_, detail) = e.custody(&r.action_id, r.index).pop().unwrap();
        assert_eq!(detail, json!({ "reason": reason, "attempts": 1 }));
    }
    // The refused links were recorded by host and path only.
    let (_, issued) = e
        .custody(&rows[0].action_id, rows[0].index)
        .into_iter()
        .find(|(ev, _)| ev == "LINK_ISSUED")
        .unwrap();
    assert_eq!(issued["link_host"], "evil.example.net");
    assert!(!issued.to_string().contains("sig"), "{issued}");
    // Only the redirecting blob request and the good ones reached the blob host; nothing
    // for the refused links, and the redirect was not followed.
    let blob = e.sim_requests("blob");
    assert_eq!(blob.len(), queued.len() - 2);
    assert_eq!(blob[0].status, 302);
    assert!(blob.iter().all(|b| b.path.starts_with("/blob/")));
    // Failed results are not retried.
    e.wait_due().await;
    let again = e.archive().await;
    assert_eq!((again.archived, again.failed), (0, 0));
    invariants(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_db_or_packages() {
    let faults = [
        "unauthorized=1",
        "link-5xx=1",
        "blob-5xx=1",
        "blob-403=1",
        "expired-links=1",
        "truncate=1",
        "bad-md5=1",
        "redirect=1",
        "foreign-host=1",
        "gone=1",
    ];
    let e = env(sim(6, 31, &faults), FAST).await;
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lrvault"))
            .arg("-vv")
            .arg("--config")
            .arg(&e.config_path)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
    };
    let mut log = run(&["discover"]);
    for _ in 0..4 {
        log += &run(&["archive"]);
        e.wait_due().await;
    }
    log += &run(&["status"]);
    log += &run(&["audit", "evidence", "--format", "json"]);
    let archived = e.count("SELECT count(*) FROM evidence");
    assert!(archived >= 3, "{archived}\n{log}");
    assert!(log.contains("minting a new download link"), "{log}");
    assert!(log.contains("resuming with Range"), "{log}");

    let secret = e.sim.sim.tenants()[0].client_secret.clone();
    let tokens = e.sim.sim.issued_tokens();
    assert!(tokens.len() >= 2, "the 401 forced a second token");
    let mut forbidden: Vec<String> = vec![secret, "Bearer".into(), "sig=".into(), "se=".into()];
    forbidden.extend(tokens);
    for f in &forbidden {
        assert!(!log.contains(f.as_str()), "log contains {f:?}:\n{log}");
    }
    // The DB (with its WAL) and every package, as raw bytes; "se=" and "Bearer" are short
    // words that may occur in evidence payloads by chance.
    let long: Vec<&str> = forbidden
        .iter()
        .map(String::as_str)
        .filter(|f| *f != "se=" && *f != "Bearer")
        .collect();
    crate::common::assert_nowhere_on_disk(&e, &long);
    assert_eq!(e.sim.sim.blob_requests_with_authorization(), 0);
    invariants(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_keeps_the_result_pending_and_the_rest_going() {
    // The store is a 200 KiB tmpfs in a private mount namespace (the host stays clean); one
    // GetFile is twice that size, the others are small.
    let cfg = SimConfig {
        seed: 32,
        actions: 3,
        max_getfile_size: 4_000,
        big_getfile: Some(400_000),
        ..SimConfig::default()
    };
    let e = env(cfg, FAST).await;
    e.discover().await;
    let big = e
        .sim
        .sim
        .expected_results(&e.tenant_id())
        .into_iter()
        .find(|x| x.original_size == Some(400_000))
        .unwrap();
    assert!(big.size > 400_000);
    let queued = e.queued();
    std::fs::create_dir_all(e.store()).unwrap();
    let script = "mount -t tmpfs -o size=200k tmpfs \"$1\" || exit 99; \"$2\" --config \"$3\" archive; rc=$?; \
                  echo; echo STORE:; find \"$1\" -type f | sort; exit $rc";
    let out = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", script, "sh"])
        .arg(e.store())
        .arg(env!("CARGO_BIN_EXE_lrvault"))
        .arg(&e.config_path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_ne!(
        out.status.code(),
        Some(99),
        "cannot mount a tmpfs: {stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "results left to retry\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("{} archived", queued.len() - 1)),
        "{stdout}"
    );

    // One clear error line naming the full store, for the big result only.
    let full: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("evidence store is full"))
        .collect();
    assert_eq!(full.len(), 1, "{stderr}");
    assert!(!stderr.contains("ZipWriter"), "{stderr}");
    assert!(
        full[0].contains("ERROR") && full[0].contains(&big.action_id),
        "{}",
        full[0]
    );
    assert!(full[0].contains("No space left on device"), "{}", full[0]);

    let rows = e.queued();
    let row = rows
        .iter()
        .find(|r| r.action_id == big.action_id && r.index == big.index)
        .unwrap();
    // A full store is not the result's fault: it waits, its attempts untouched.
    assert_eq!((row.state.as_str(), row.attempts), ("pending", 0));
    assert!(
        row.last_error
            .as_deref()
            .unwrap()
            .starts_with("evidence store is full: "),
        "{row:?}"
    );
    assert!(
        row.last_error
            .as_deref()
            .unwrap()
            .ends_with("No space left on device (os error 28)"),
        "{row:?}"
    );
    // The disk fills while the payload streams, or (the last buffer) while the package is
    // finished after a verified download: DOWNLOADED then, but never ARCHIVED.
    let events = e.events(&row.action_id, row.index);
    assert!(
        events == ["LINK_ISSUED", "ATTEMPT_FAILED"]
            || events == ["LINK_ISSUED", "DOWNLOADED", "ATTEMPT_FAILED"],
        "{events:?}"
    );
    assert_eq!(
        e.count(&format!(
            "SELECT count(*) FROM evidence WHERE action_id = '{}'",
            big.action_id
        )),
        0
    );
    // The other results went on and were archived in the small store; no partial was left.
    for r in rows.iter().filter(|r| r.action_id != big.action_id) {
        assert_eq!(r.state, "archived", "{r:?}");
    }
    let store_listing = stdout.split("STORE:").nth(1).unwrap();
    assert!(!store_listing.contains(".partial"), "{store_listing}");
    assert_eq!(
        store_listing
            .lines()
            .filter(|l| l.ends_with(".zip"))
            .count(),
        queued.len() - 1,
        "{store_listing}"
    );
    assert!(!store_listing.contains(&big.action_id), "{store_listing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_transfer_times_out_and_is_retried_later() {
    // 10 bytes per second, one byte every 100 ms: each read waits longer than read_timeout.
    let e = faulty(2, 23, &["slow=10"], "[download]\nconcurrency = 1\nread_timeout = \"40ms\"\nretry_base = \"50ms\"\nretry_max = \"100ms\"\n").await;
    let queued = e.queued();
    let s = e.archive().await;
    assert_eq!((s.archived, s.retry_later), (0, queued.len()), "{s:?}");
    for r in e.queued() {
        assert_eq!((r.state.as_str(), r.attempts), ("pending", 1), "{r:?}");
        let err = r.last_error.clone().unwrap_or_default();
        assert!(
            err.contains("timed out") || err.contains("timeout"),
            "{err}"
        );
        assert!(!err.contains("sig="), "{err}");
    }
    assert_eq!(
        e.count(
            "SELECT count(*) FROM custody_log WHERE event IN ('DOWNLOADED', 'ARCHIVED', 'FAILED')"
        ),
        0
    );
    invariants(&e);
}
