//! The archive path end to end: discover → queue → link → streamed download → BagIt zip →
//! evidence row → custody, against the simulator's own hashes.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;

use lrvault_sim::SimConfig;

use crate::common::{check_bag, env, packages_under, sha256_hex};
use crate::custody_chain;

fn sim(actions: usize, seed: u64) -> SimConfig {
    SimConfig {
        seed,
        actions,
        ..SimConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_completed_command_is_archived_once_with_the_simulators_hashes() {
    let e = env(sim(25, 11), "").await;
    let expected = e.sim.sim.expected_results(&e.tenant_id());
    let archivable = crate::common::archivable(&e.sim.sim, &e.tenant_id());
    let with_result: Vec<_> = archivable.iter().collect();
    assert!(
        with_result.len() >= 20,
        "the seed yields a meaningful sample: {}",
        with_result.len()
    );
    assert!(
        expected
            .iter()
            .any(|x| x.command_type == "GetFile" && x.has_result)
    );
    assert!(expected.iter().any(|x| x.command_status == "Failed"));

    let d = e.discover().await;
    let finished: std::collections::HashSet<&str> = expected
        .iter()
        .filter(|x| {
            ["Succeeded", "Failed", "TimeOut", "Cancelled"].contains(&x.action_status.as_str())
        })
        .map(|x| x.action_id.as_str())
        .collect();
    assert_eq!(d.new_actions, finished.len());
    let a = e.archive().await;
    assert_eq!(a.archived, with_result.len(), "{a:?}");
    assert_eq!((a.failed, a.unavailable, a.retry_later), (0, 0, 0));

    let conn = e.reader();
    // Results of finished actions: archived exactly when the simulator has a result.
    let mut states: HashMap<(String, u32), String> = HashMap::new();
    let mut stmt = conn
        .prepare("SELECT action_id, command_index, state FROM results")
        .unwrap();
    for row in stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
    {
        let (a, i, s): (String, u32, String) = row.unwrap();
        states.insert((a, i), s);
    }
    for x in &expected {
        let state = states.get(&(x.action_id.clone(), x.index));
        if !finished.contains(x.action_id.as_str()) {
            assert_eq!(state, None, "unfinished actions are not queued");
        } else if x.has_result {
            assert_eq!(state.map(String::as_str), Some("archived"), "{x:?}");
        } else {
            assert_eq!(state.map(String::as_str), Some("skipped"), "{x:?}");
            let skipped: i64 = conn
                .query_row(
                    "SELECT count(*) FROM custody_log WHERE action_id = ?1 AND command_index = ?2 AND event = 'SKIPPED'",
                    rusqlite::params![x.action_id, x.index],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(skipped, 1);
        }
    }

    // Each evidence row carries the simulator's own hashes, and its package verifies.
    for x in &with_result {
        let (sha, size, orig_sha, orig_name, path, pkg_sha): (String, i64, Option<String>, Option<String>, String, String) = conn
            .query_row(
                "SELECT payload_sha256, payload_size, original_sha256, original_name, package_path, package_sha256
                 FROM v_evidence WHERE action_id = ?1 AND command_index = ?2",
                rusqlite::params![x.action_id, x.index],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .unwrap();
        assert_eq!(sha, x.sha256, "{x:?}");
        assert_eq!(size as u64, x.size);
        assert_eq!(orig_sha, x.original_sha256);
        assert_eq!(orig_name, x.original_name);
        let full = e.store().join(&path);
        assert_eq!(
            std::fs::metadata(&full).unwrap().permissions().mode() & 0o777,
            0o440
        );
        assert_eq!(sha256_hex(&std::fs::read(&full).unwrap()), pkg_sha);
        let (payload_name, payload, retrieval) = check_bag(&full);
        assert_eq!(sha256_hex(&payload), x.sha256);
        assert_eq!(retrieval["sha256"], x.sha256.as_str());
        assert_eq!(retrieval["md5_check"], "match");
        assert!(
            !retrieval.to_string().contains("sig="),
            "no SAS query in retrieval.json"
        );
        if x.command_type == "GetFile" {
            assert!(payload_name.ends_with(".gz"), "{payload_name}");
            assert_eq!(retrieval["encoding"], "gzip");
            assert_eq!(
                retrieval["original_sha256"],
                x.original_sha256.clone().unwrap().as_str()
            );
        } else {
            assert_eq!(
                payload_name,
                format!("{}.transcript.json", x.original_name.clone().unwrap())
            );
            assert_eq!(
                retrieval["transcript"]["script_name"],
                x.original_name.clone().unwrap().as_str()
            );
        }
        // Path layout: tenant/YYYY/MM/DD/action/NNN-Type.zip
        assert!(
            path.starts_with("sim0/")
                && path.ends_with(&format!(
                    "/{}/{:03}-{}.zip",
                    x.action_id, x.index, x.command_type
                )),
            "{path}"
        );
    }
    let evidence_rows = e.count("SELECT count(*) FROM evidence");
    assert_eq!(evidence_rows as usize, with_result.len());
    assert_eq!(
        e.count("SELECT count(DISTINCT action_id || '/' || command_index) FROM evidence"),
        evidence_rows
    );
    for kind in ["ARCHIVED", "DOWNLOADED"] {
        assert_eq!(
            e.count(&format!(
                "SELECT count(*) FROM custody_log WHERE event = '{kind}'"
            )),
            evidence_rows,
            "{kind}"
        );
        // Both rows carry the payload's SHA-256, equal to the evidence row's.
        assert_eq!(
            e.count(&format!(
                "SELECT count(*) FROM custody_log c JOIN evidence v ON v.action_id = c.action_id
                 AND v.command_index = c.command_index AND v.payload_sha256 = c.evidence_sha256
                 WHERE c.event = '{kind}'"
            )),
            evidence_rows,
            "{kind} rows carry evidence_sha256"
        );
    }
    // Only a payload that needs it is written as zip64 (none here: all are small).
    for p in &store_files_before_second_pass(e.store()) {
        assert!(!data_entry_is_zip64(p), "{} uses zip64", p.display());
    }
    let store_files = packages_under(e.store());
    assert_eq!(
        store_files.len() as i64,
        evidence_rows,
        "only packages in the store: {store_files:?}"
    );
    assert!(
        store_files
            .iter()
            .all(|p| p.extension().is_some_and(|x| x == "zip"))
    );

    // The custody chain recomputes with an independent implementation.
    let rows = custody_chain::recheck(&conn);

    // A second pass archives nothing new and adds no rows.
    let d2 = e.discover().await;
    assert_eq!((d2.new_actions, d2.known), (0, finished.len()));
    let a2 = e.archive().await;
    assert_eq!(a2.archived, 0);
    assert_eq!(e.count("SELECT count(*) FROM evidence"), evidence_rows);
    assert_eq!(e.count("SELECT count(*) FROM custody_log"), rows);
    assert_eq!(packages_under(e.store()).len(), store_files.len());

    // The simulator never throttled, and no blob request carried an Authorization header.
    assert_eq!(e.sim.sim.count_status(429), 0);
    assert_eq!(e.sim.sim.blob_requests_with_authorization(), 0);
    let blob_requests = e
        .sim
        .sim
        .requests()
        .iter()
        .filter(|r| r.endpoint == "blob")
        .count();
    assert_eq!(blob_requests, with_result.len(), "one download per result");
}

fn store_files_before_second_pass(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    packages_under(root)
}

/// True when the payload's local file header carries a zip64 extra field (tag 0x0001).
fn data_entry_is_zip64(path: &std::path::Path) -> bool {
    let bytes = std::fs::read(path).unwrap();
    let mut i = 0;
    while i + 30 <= bytes.len() {
        if bytes[i..i + 4] == *b"PK\x03\x04" {
            let name_len = u16::from_le_bytes([bytes[i + 26], bytes[i + 27]]) as usize;
            let extra_len = u16::from_le_bytes([bytes[i + 28], bytes[i + 29]]) as usize;
            let name = String::from_utf8_lossy(&bytes[i + 30..i + 30 + name_len]);
            if name.contains("/data/") {
                let mut extra = &bytes[i + 30 + name_len..i + 30 + name_len + extra_len];
                while extra.len() >= 4 {
                    let tag = u16::from_le_bytes([extra[0], extra[1]]);
                    let len = u16::from_le_bytes([extra[2], extra[3]]) as usize;
                    if tag == 1 {
                        return true;
                    }
                    extra = &extra[(4 + len).min(extra.len())..];
                }
                return false;
            }
        }
        i += 1;
    }
    panic!("no payload entry in {}", path.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custody_log_refuses_update_and_delete() {
    let e = env(sim(3, 2), "").await;
    e.discover().await;
    let before = e.count("SELECT count(*) FROM custody_log");
    assert!(before > 0);
    let rw = rusqlite::Connection::open(&e.cfg.database.path).unwrap();
    let err = rw
        .execute("UPDATE custody_log SET detail = '{}' WHERE seq = 1", [])
        .unwrap_err();
    assert!(
        err.to_string().contains("custody_log is append-only"),
        "{err}"
    );
    let err = rw
        .execute("DELETE FROM custody_log WHERE seq = 1", [])
        .unwrap_err();
    assert!(
        err.to_string().contains("custody_log is append-only"),
        "{err}"
    );
    assert_eq!(e.count("SELECT count(*) FROM custody_log"), before);
    custody_chain::recheck(&e.reader());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_are_readable_while_an_archive_pass_runs() {
    // A separate read-only connection queries the views from inside the pass, each time a
    // result has been committed: the reads happen while the pass runs, by construction.
    let mut cfg = sim(6, 5);
    cfg.faults = vec!["slow=400000".parse().unwrap()];
    let e = env(cfg, "").await;
    e.discover().await;
    let total = crate::common::archivable(&e.sim.sim, &e.tenant_id()).len() as i64;
    let reader = std::sync::Mutex::new(e.reader());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen_in_pass = seen.clone();
    let on_result: lrvault::jobs::archive::OnResult = std::sync::Arc::new(move |_, outcome| {
        assert_eq!(outcome, lrvault::jobs::archive::Outcome::Archived);
        let reader = reader.lock().unwrap();
        let count = |sql: &str| reader.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
        let evidence = count("SELECT count(*) FROM v_evidence");
        let custody = count("SELECT count(*) FROM v_custody");
        let mut seen = seen_in_pass.lock().unwrap();
        seen.push((evidence, custody));
        // Every result committed so far (this one included) is visible to the reader.
        assert!(evidence >= seen.len() as i64, "{seen:?}");
    });
    let summary =
        lrvault::jobs::archive::archive(&e.ctx, &e.tenants, &Default::default(), Some(on_result))
            .await
            .unwrap();
    assert_eq!(summary.archived as i64, total);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len() as i64, total, "one read per archived result");
    assert!(seen[0].0 >= 1 && seen[0].1 > seen[0].0, "{seen:?}");
    // sqlite3 is what an examiner opens the database with (.ci/run installs it).
    let out = std::process::Command::new("sqlite3")
        .arg(&e.cfg.database.path)
        .arg("select count(*) from v_evidence")
        .output()
        .expect("sqlite3 is needed by this test (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        total.to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_stop_the_pass_without_spending_attempts() {
    let e = env(sim(5, 12), "").await;
    let queued = e.discover().await.queued as i64;
    assert!(queued > 0);
    // The secret is rotated on the app but not in lrvault's secret file.
    std::fs::write(e._dir.path().join("sim-secret-0"), "stale-secret\n").unwrap();
    let out = e.lrvault().arg("archive").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "tenant 'sim0': token request refused (HTTP 401): invalid_client (AADSTS 7000215)"
        ),
        "{err}"
    );
    assert!(!err.contains("stale-secret"));
    assert_eq!(
        e.count("SELECT count(*) FROM results WHERE state = 'pending' AND attempts = 0"),
        queued
    );
    assert_eq!(
        e.count("SELECT count(*) FROM custody_log WHERE event IN ('FAILED', 'LINK_ISSUED')"),
        0
    );
}

/// Runs `lrvault -v archive` on a fresh simulator and returns (peak RSS in KiB, archived).
async fn archive_peak_rss(cfg: SimConfig) -> (u64, i64) {
    let e = env(cfg, "").await;
    e.discover().await;
    let out = e.lrvault().args(["-v", "archive"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let peak = err
        .lines()
        .find_map(|l| l.split("peak_rss_kib=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no peak_rss_kib in {err}"));
    (peak, e.count("SELECT count(*) FROM evidence"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_whatever_the_payload_size() {
    const BIG: u64 = 96 << 20;
    let small = SimConfig {
        seed: 13,
        actions: 2,
        max_getfile_size: 4096,
        ..SimConfig::default()
    };
    let big = SimConfig {
        big_getfile: Some(BIG),
        ..small.clone()
    };
    let (small_peak, small_n) = archive_peak_rss(small).await;
    let (big_peak, big_n) = archive_peak_rss(big).await;
    assert_eq!(big_n, small_n + 1, "the big GetFile was archived too");
    eprintln!(
        "peak RSS: {small_peak} KiB (small payloads), {big_peak} KiB (with a {} MiB payload)",
        BIG >> 20
    );
    // A 96 MiB payload costs no more than a few MiB of extra memory: it is streamed.
    assert!(
        big_peak < small_peak + 16 * 1024,
        "peak RSS {big_peak} KiB with a {} MiB payload vs {small_peak} KiB without",
        BIG >> 20
    );
}
