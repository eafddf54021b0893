//! Investigation packages (design.md §4): archived beside live-response results from the same
//! tenant, through the real binary, each quota respected as the simulator counts it (windows
//! shrunk), no link minted while no transfer slot is free, the package's SHA-256 the
//! simulator's; a package not ready yet, an expired package link, a link outside the
//! allowlist; and no `token=` query in a log line, the database or a package.

use std::io::Read;
use std::time::Duration;

use lrvault_sim::SimConfig;

use crate::common::{Env, archivable, assert_nowhere_on_disk, check_bag, env};
use crate::quota::{endpoint_times, max_in_window};

const MINUTE: Duration = Duration::from_millis(400);
const HOUR: Duration = Duration::from_secs(4);
/// Files in each generated package (the simulator's default is 32 MiB).
const PACKAGE_SIZE: u64 = 96 << 10;

fn sim(seed: u64, actions: usize, packages: usize, faults: &[&str]) -> SimConfig {
    SimConfig {
        seed,
        actions,
        packages,
        package_size: PACKAGE_SIZE,
        minute: MINUTE,
        hour: HOUR,
        max_getfile_size: 4096,
        // Every action updated within the last hour: a 404 still means "not ready".
        spread: Duration::from_secs(3600),
        faults: faults.iter().map(|f| f.parse().unwrap()).collect(),
        ..SimConfig::default()
    }
}

/// Windows shrunk like the simulator's, one transfer slot, fast retries.
fn toml() -> String {
    format!(
        "[quota]\nminute_secs = {}\nhour_secs = {}\n\n[download]\nconcurrency = 1\nretry_base = \"20ms\"\nretry_max = \"40ms\"\n",
        MINUTE.as_secs_f64(),
        HOUR.as_secs_f64()
    )
}

/// The binary with `args` and RUST_LOG=debug: (exit code, stdout + stderr).
fn run_debug(e: &Env, args: &[&str]) -> (i32, String) {
    let out = e
        .lrvault()
        .env("RUST_LOG", "debug")
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// (action id, state, attempts, last_error) of every investigation package result.
fn packages(e: &Env) -> Vec<(String, String, u32, Option<String>)> {
    e.results()
        .into_iter()
        .filter(|r| r.command_type == "InvestigationPackage")
        .map(|r| (r.action_id, r.state, r.attempts, r.last_error))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_and_live_response_results_archive_together_within_each_quota() {
    let e = env(sim(41, 6, 5, &[]), &toml()).await;
    let tenant_id = e.tenant_id();
    let expected = archivable(&e.sim.sim, &tenant_id);
    let expected_packages: Vec<_> = expected
        .iter()
        .filter(|x| x.command_type == "InvestigationPackage")
        .collect();
    assert_eq!(expected_packages.len(), 5);
    assert!(
        expected.len() > 10,
        "live-response results too: {}",
        expected.len()
    );

    let (code, mut log) = run_debug(&e, &["discover"]);
    assert_eq!(code, 0, "{log}");
    let (code, archive_log) = run_debug(&e, &["archive"]);
    assert_eq!(code, 0, "{archive_log}");
    log += &archive_log;
    crate::common::assert_debug_from_every_crate(&log);

    // Everything archived, the packages among them, each SHA-256 the simulator's.
    assert_eq!(
        e.count("SELECT count(*) FROM evidence") as usize,
        expected.len()
    );
    let port = e.sim.addr.port();
    for x in &expected_packages {
        let (name, path, sha): (String, String, String) = e
            .reader()
            .query_row(
                "SELECT payload_name, package_path, payload_sha256 FROM evidence WHERE action_id = ?1",
                [&x.action_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(name, format!("{}-investigation-package.zip", x.action_id));
        assert!(
            path.ends_with(&format!("/{}/000-InvestigationPackage.zip", x.action_id)),
            "{path}"
        );
        assert_eq!(sha, x.sha256);
        let (payload_name, payload, retrieval) = check_bag(&e.store().join(&path));
        assert_eq!(payload_name, name);
        assert_eq!(crate::common::sha256_hex(&payload), x.sha256);
        assert_eq!(retrieval["link_host"], format!("localhost:{port}"));
        assert_eq!(
            retrieval["link_path"],
            "/safedownload/WDATP_Investigation_Package.zip"
        );
        assert_eq!(retrieval["md5_check"], "absent");
        assert_eq!(retrieval["entry"], "stored-blocks");
        assert_eq!(
            retrieval["compression"]["reason"],
            "already compressed (zip)"
        );
        // The payload is the package as delivered: a zip of the collected files.
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(payload)).unwrap();
        let mut autoruns = String::new();
        zip.by_name("Autoruns/Autoruns_HKLM_Run.txt")
            .unwrap()
            .read_to_string(&mut autoruns)
            .unwrap();
        assert!(!autoruns.is_empty());
        assert_eq!(zip.len(), 22);
    }

    // Each bucket inside its windows as the simulator counted it, and never a 429.
    let sim = &e.sim.sim;
    let package_calls = endpoint_times(sim, "packageuri");
    assert_eq!(package_calls.len(), 5, "one getPackageUri call per package");
    assert_eq!(max_in_window(&package_calls, MINUTE), 2);
    assert!(max_in_window(&endpoint_times(sim, "link"), MINUTE) <= 95);
    assert_eq!(sim.count_status(429), 0);
    assert_eq!(endpoint_times(sim, "package").len(), 5);
    // One slot: no link (result or package) was asked for while a body was being sent.
    assert_eq!(sim.open_bodies_at_link(), 0);
    assert_eq!(sim.blob_requests_with_authorization(), 0);
    assert_eq!(
        e.api_calls("machineactions.packageuri"),
        5,
        "every call is in the ledger under its own key"
    );

    // No token= query (nor any token issued) in a log line, the database or a package.
    let tokens = sim.package_tokens();
    assert_eq!(tokens.len(), 5);
    let mut needles: Vec<&str> = tokens.iter().map(String::as_str).collect();
    needles.push("token=");
    for needle in &needles {
        assert!(!log.contains(needle), "the log holds {needle:?}:\n{log}");
    }
    assert_nowhere_on_disk(&e, &needles);

    // Everything else treats them as results: verify passes, the audit lists them.
    let (verify, _) = e.run_ok(&["verify"]);
    assert!(
        verify.contains(&format!("verified {} packages (0 defects)", expected.len())),
        "{verify}"
    );
    assert!(verify.contains(" rows (0 defects)"), "{verify}");
    let (audit, _) = e.run_ok(&["audit", "evidence", "--format", "json"]);
    let audit: serde_json::Value = serde_json::from_str(&audit).unwrap();
    let listed = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["command_type"] == "InvestigationPackage")
        .count();
    assert_eq!(listed, 5);
    // An export of one package's action: the kit holds the package as archived.
    let action = &expected_packages[0].action_id;
    let kit = e._dir.path().join("kit");
    e.run_ok(&["export", "--action", action, "--out", kit.to_str().unwrap()]);
    let package_sha: String = e
        .reader()
        .query_row(
            "SELECT package_sha256 FROM evidence WHERE action_id = ?1",
            [action],
            |r| r.get(0),
        )
        .unwrap();
    let in_kit: Vec<_> = crate::common::files_under(&kit)
        .into_iter()
        .filter(|p| p.ends_with("000-InvestigationPackage.zip"))
        .collect();
    assert_eq!(in_kit.len(), 1, "{in_kit:?}");
    assert_eq!(
        crate::common::sha256_hex(&std::fs::read(&in_kit[0]).unwrap()),
        package_sha
    );
    assert_eq!(
        e.events(action, 0).last().map(String::as_str),
        Some("EXPORTED")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_package_download_is_resumed_with_range() {
    let e = env(sim(47, 0, 1, &["truncate=1"]), &toml()).await;
    e.discover().await;
    let s = e.archive().await;
    assert_eq!(s.archived, 1, "{s:?}");
    let x = archivable(&e.sim.sim, &e.tenant_id()).remove(0);
    let path: String = e
        .reader()
        .query_row("SELECT package_path FROM evidence", [], |r| r.get(0))
        .unwrap();
    let (_, payload, retrieval) = check_bag(&e.store().join(path));
    assert_eq!(crate::common::sha256_hex(&payload), x.sha256);
    assert_eq!(retrieval["ranges"], serde_json::json!([x.size / 2]));
    let ranges: Vec<Option<String>> = e
        .sim_requests("package")
        .into_iter()
        .map(|r| r.range)
        .collect();
    assert_eq!(ranges, [None, Some(format!("bytes={}-", x.size / 2))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_not_ready_is_retried_without_an_attempt_then_archived() {
    let e = env(sim(42, 0, 1, &["package-404=2"]), &toml()).await;
    e.discover().await;
    let id = packages(&e)[0].0.clone();
    for pass in 0..2 {
        let s = e.archive().await;
        assert_eq!((s.archived, s.retry_later), (0, 0), "pass {pass}: {s:?}");
        let (_, state, attempts, error) = packages(&e).remove(0);
        assert_eq!((state.as_str(), attempts), ("pending", 0));
        assert_eq!(
            error.as_deref(),
            Some(
                "investigation package not ready yet (machineactions.packageuri: HTTP 404 ResourceNotFound: Investigation package of machine action {id} was not found)"
                    .replace("{id}", &id)
                    .as_str()
            )
        );
        e.wait_due().await;
    }
    let s = e.archive().await;
    assert_eq!(s.archived, 1, "{s:?}");
    assert_eq!(packages(&e)[0].1, "archived");
    let statuses: Vec<u16> = e
        .sim_requests("packageuri")
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [404, 404, 200]);
    let scopes: Vec<String> = e
        .custody(&id, 0)
        .into_iter()
        .filter(|(event, _)| event == "ATTEMPT_FAILED")
        .map(|(_, d)| d["scope"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(scopes, ["result", "result"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_still_missing_a_day_after_its_action_is_unavailable() {
    let mut cfg = sim(43, 0, 1, &["package-404=1"]);
    cfg.now = chrono::Utc::now() - chrono::Duration::days(2);
    let e = env(cfg, &toml()).await;
    e.discover().await;
    let s = e.archive().await;
    assert_eq!(s.unavailable, 1, "{s:?}");
    let (id, state, attempts, _) = packages(&e).remove(0);
    // The one attempt that found it missing, as for any unavailable result.
    assert_eq!((state.as_str(), attempts), ("unavailable", 1));
    assert_eq!(e.events(&id, 0), ["UNAVAILABLE"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_package_link_is_reissued() {
    let e = env(sim(44, 0, 1, &["expired-links=1"]), &toml()).await;
    e.discover().await;
    let s = e.archive().await;
    assert_eq!(s.archived, 1, "{s:?}");
    // One attempt: the expired link was re-issued within it.
    let (id, _, attempts, _) = packages(&e).remove(0);
    assert_eq!(attempts, 1);
    let downloads: Vec<u16> = e.sim_requests("package").iter().map(|r| r.status).collect();
    assert_eq!(downloads, [403, 200]);
    assert_eq!(e.sim_requests("packageuri").len(), 2);
    assert_eq!(
        e.events(&id, 0),
        [
            "LINK_ISSUED",
            "LINK_ISSUED",
            "DOWNLOADED",
            "PUBLISHING",
            "ARCHIVED"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_link_outside_the_allowlist_is_refused() {
    let e = env(sim(45, 0, 1, &[]), &toml()).await;
    // The simulator links packages to `localhost`; this tenant allows 127.0.0.1 only.
    let text = std::fs::read_to_string(&e.config_path).unwrap();
    assert!(
        text.contains("download_hosts = [\"127.0.0.1\", \"localhost\"]"),
        "{text}"
    );
    std::fs::write(&e.config_path, text.replace(", \"localhost\"", "")).unwrap();
    e.run_ok(&["discover"]);
    let (out, err) = e.run_ok(&["archive"]);
    let (id, state, _, error) = packages(&e).remove(0);
    assert_eq!(state, "failed", "{out}{err}");
    assert_eq!(
        error.as_deref(),
        Some("download link refused: host localhost is not in download_hosts")
    );
    assert!(
        e.sim_requests("package").is_empty(),
        "no connection was made"
    );
    assert_eq!(e.events(&id, 0), ["LINK_ISSUED", "FAILED"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_says_up_front_how_long_the_package_quota_takes() {
    let e = env(sim(46, 4, 5, &[]), "").await;
    let (text, _) = e.run_ok(&["backfill", "--since", "30d", "--dry-run"]);
    let first = text.lines().next().unwrap();
    // Two calls a minute over a 1 % longer window: 0 s, 0 s, 60.6 s, 60.6 s, 121.2 s.
    assert_eq!(
        first,
        "sim0: 5 investigation packages to fetch: their links are limited to 2/min and 120/h, so they alone take at least 2m 01s"
    );
    let links = archivable(&e.sim.sim, &e.tenant_id()).len() - 5;
    assert!(
        text.contains(&format!("calls needed: {links} result links and 5 package links (+ 2 List calls made for this count)")),
        "{text}"
    );
    assert_eq!(
        e.count("SELECT count(*) FROM results"),
        0,
        "a dry run queues nothing"
    );

    // enqueue takes a package's action like any other; a type `collect` leaves out is refused.
    let actions = e.sim.sim.actions(&e.tenant_id());
    let id_of = |kind: &str| {
        actions
            .iter()
            .find(|a| a["type"] == kind)
            .map(|a| a["id"].as_str().unwrap().to_string())
            .unwrap()
    };
    let package = id_of("CollectInvestigationPackage");
    let (out, _) = e.run_ok(&["enqueue", &package]);
    assert_eq!(out, format!("{package}: 1 results queued, 0 skipped\n"));
    let isolate = id_of("Isolate");
    let refused = e.lrvault().args(["enqueue", &isolate]).output().unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr),
        format!(
            "lrvault: action {isolate} has type Isolate; tenant 'sim0' collects LiveResponse, CollectInvestigationPackage\n"
        )
    );
}
