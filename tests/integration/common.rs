//! Fixtures: a simulator, a config written for it, the DB and job context, and independent
//! checks (BagIt manifests, custody hash chain) written without the crate's own code.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lrvault::config::{Config, Credentials};
use lrvault::db::Db;
use lrvault::jobs::{self, Context, archive, discover};
use lrvault_sim::{SimConfig, SimHandle, Simulator};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub struct Env {
    /// Kept so the directory lives as long as the test.
    pub _dir: tempfile::TempDir,
    pub sim: SimHandle,
    pub config_path: PathBuf,
    pub cfg: Arc<Config>,
    pub ctx: Arc<Context>,
    pub tenants: Vec<Arc<jobs::Tenant>>,
}

/// Starts a simulator and builds a context for a config written for it plus `extra` TOML.
pub async fn env(sim_cfg: SimConfig, extra: &str) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::new(sim_cfg).start().await.unwrap();
    let config_path =
        lrvault::commands::demo::write_sim_config(dir.path(), &sim.sim, &sim.base_url(), extra)
            .unwrap();
    env_from(dir, sim, config_path, None)
}

/// The environment of a config already written for `sim`; its context opens the store the
/// config names, or uses `store` (opened with a test's own credentials).
pub fn env_from(
    dir: tempfile::TempDir,
    sim: SimHandle,
    config_path: PathBuf,
    store: Option<Arc<lrvault::store::Store>>,
) -> Env {
    let cfg = Arc::new(Config::load(&config_path, Credentials::default()).unwrap());
    let db = Db::open_migrated(&cfg.database.path).unwrap();
    let cancel = CancellationToken::new();
    let ctx = Arc::new(match store {
        None => Context::new(cfg.clone(), db, cancel).unwrap(),
        Some(store) => Context::with_store(cfg.clone(), db, cancel, store).unwrap(),
    });
    let tenants = ctx
        .tenants(None)
        .unwrap()
        .into_iter()
        .map(Arc::new)
        .collect();
    Env {
        _dir: dir,
        sim,
        config_path,
        cfg,
        ctx,
        tenants,
    }
}

impl Env {
    pub async fn discover(&self) -> discover::Summary {
        let mut total = discover::Summary::default();
        for t in &self.tenants {
            total += discover::lookback_pass(&self.ctx, t).await.unwrap();
        }
        total
    }

    pub async fn archive(&self) -> archive::Summary {
        archive::archive(&self.ctx, &self.tenants, &archive::Scope::default(), None)
            .await
            .unwrap()
    }

    /// The real binary, with this environment's config.
    pub fn lrvault(&self) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_lrvault"));
        // The daemon refuses root (docs/operations.md §1.6); tests may run as root, the only
        // user of a CI container, which is what the override is for.
        c.arg("--config")
            .arg(&self.config_path)
            .env("LRVAULT_ALLOW_ROOT", "1")
            .env_remove("RUST_LOG");
        c
    }

    /// Runs the binary with `args` and asserts it exits 0; returns (stdout, stderr).
    pub fn run_ok(&self, args: &[&str]) -> (String, String) {
        let out = self.lrvault().args(args).output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "lrvault {args:?}\n{stdout}\n{stderr}"
        );
        (stdout, stderr)
    }

    pub fn tenant_id(&self) -> String {
        self.sim.sim.tenants()[0].tenant_id.clone()
    }

    pub fn store(&self) -> &Path {
        &self.cfg.store.root
    }

    /// A read-only connection, as an auditor would open it.
    pub fn reader(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(
            &self.cfg.database.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap()
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.reader().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    /// The one text value `sql` selects (empty for NULL).
    pub fn count_text(&self, sql: &str) -> String {
        self.reader()
            .query_row(sql, [], |r| r.get::<_, Option<String>>(0))
            .unwrap()
            .unwrap_or_default()
    }
}

/// The SHA-256 (hex) and size of what `store` serves under `key` (exactly `version` when
/// given), streamed.
pub async fn stored_hash(
    store: &lrvault::store::Store,
    key: &str,
    version: Option<&str>,
) -> (String, u64) {
    use futures_util::StreamExt;
    let mut stream = store.read(key, version).await.unwrap();
    let (mut hasher, mut size) = (Sha256::new(), 0u64);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        size += chunk.len() as u64;
        hasher.update(&chunk);
    }
    (hex::encode(hasher.finalize()), size)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Every file under a store's root but its checkpoints and tokens (`_checkpoints/`, which
/// every archive pass that archived something now adds to): the packages and strays.
pub fn packages_under(store: &Path) -> Vec<PathBuf> {
    let anchors = store.join("_checkpoints");
    files_under(store)
        .into_iter()
        .filter(|p| !p.starts_with(&anchors))
        .collect()
}

/// Every file under `root`, recursively.
pub fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Asserts that no file under the store and neither the database nor its WAL holds any of
/// `needles`, as raw bytes (secrets, bearer tokens, link credentials).
pub fn assert_nowhere_on_disk(e: &Env, needles: &[&str]) {
    let mut files = files_under(e.store());
    let db = e.cfg.database.path.clone();
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.clone().into_os_string();
        p.push(suffix);
        files.push(p.into());
    }
    for f in files.iter().filter(|f| f.exists()) {
        let bytes = std::fs::read(f).unwrap();
        for needle in needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{} contains {needle:?}",
                f.display()
            );
        }
    }
}

/// Checks a BagIt zip from scratch (RFC 8493): bagit.txt, both manifests, Payload-Oxum.
/// Returns (payload name, payload bytes, retrieval.json).
pub fn check_bag(path: &Path) -> (String, Vec<u8>, serde_json::Value) {
    use std::io::Read;
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut files = std::collections::BTreeMap::new();
    for i in 0..zip.len() {
        let mut e = zip.by_index(i).unwrap();
        let mut buf = Vec::new();
        e.read_to_end(&mut buf).unwrap();
        files.insert(e.name().unwrap().to_string(), buf);
    }
    let bag = files
        .keys()
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    assert!(
        files.keys().all(|k| k.starts_with(&format!("{bag}/"))),
        "{files:?}"
    );
    let get = |name: &str| {
        files
            .get(&format!("{bag}/{name}"))
            .unwrap_or_else(|| panic!("{name} missing in {}", path.display()))
    };
    assert_eq!(
        get("bagit.txt"),
        b"BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n"
    );
    let data: Vec<(&String, &Vec<u8>)> = files
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{bag}/data/")))
        .collect();
    assert_eq!(data.len(), 1, "exactly one payload file");
    let (data_name, payload) = data[0];
    let rel = data_name.strip_prefix(&format!("{bag}/")).unwrap();
    let manifest = String::from_utf8(get("manifest-sha256.txt").clone()).unwrap();
    assert_eq!(manifest, format!("{}  {}\n", sha256_hex(payload), rel));
    let tagmanifest = String::from_utf8(get("tagmanifest-sha256.txt").clone()).unwrap();
    let mut tag_lines = 0;
    for line in tagmanifest.lines() {
        let (hash, name) = line.split_once("  ").unwrap();
        assert_eq!(hash, sha256_hex(get(name)), "tag file {name}");
        tag_lines += 1;
    }
    let tag_files = files
        .keys()
        .filter(|k| !k.contains("/data/") && !k.ends_with("tagmanifest-sha256.txt"))
        .count();
    assert_eq!(tag_lines, tag_files, "tagmanifest covers every tag file");
    let info = String::from_utf8(get("bag-info.txt").clone()).unwrap();
    assert!(
        info.contains(&format!("Payload-Oxum: {}.1\n", payload.len())),
        "{info}"
    );
    let retrieval: serde_json::Value = serde_json::from_slice(get("retrieval.json")).unwrap();
    (
        rel.trim_start_matches("data/").to_string(),
        payload.to_vec(),
        retrieval,
    )
}

/// Starts `lrvault run` on `e`'s config, its stderr appended to `daemon.log` beside the
/// database (a restart adds to the same log); the child and the log's path.
pub fn start_daemon(e: &Env) -> (std::process::Child, PathBuf) {
    let log = e._dir.path().join("daemon.log");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let daemon = e
        .lrvault()
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    (daemon, log)
}

/// SIGTERM to the daemon; asserts the clean stop (exit 0) and returns its log.
pub fn stop_daemon(mut daemon: std::process::Child, log: &Path) -> String {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = daemon.wait().unwrap();
    let log = std::fs::read_to_string(log).unwrap();
    assert_eq!(status.code(), Some(0), "clean shutdown; log:\n{log}");
    log
}

/// Polls `f` every 50 ms until it is true or `limit` passes. Only for a condition that
/// something outside the test's control brings about and that offers no signal to wait on: a
/// child process (`lrvault run`, an emulator, a script) writing its database or opening a
/// port, or the simulator (its own server tasks, over HTTP) answering a request. `limit`
/// is a bound for a broken run, not a timing the test relies on.
pub async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

/// Results lrvault should archive: the simulator has a result and the action has finished
/// (running actions are picked up by a later pass).
pub fn archivable(
    sim: &lrvault_sim::Simulator,
    tenant_id: &str,
) -> Vec<lrvault_sim::ExpectedResult> {
    sim.expected_results(tenant_id)
        .into_iter()
        .filter(|x| {
            x.has_result
                && ["Succeeded", "Failed", "TimeOut", "Cancelled"]
                    .contains(&x.action_status.as_str())
        })
        .collect()
}

/// One `results` row as the fault tests look at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultRow {
    pub action_id: String,
    pub index: u32,
    pub command_type: String,
    pub state: String,
    pub attempts: u32,
    pub last_error: Option<String>,
}

impl Env {
    /// An archive pass over at most `max` results.
    pub async fn archive_max(&self, max: usize) -> archive::Summary {
        let scope = archive::Scope {
            max: Some(max),
            ..Default::default()
        };
        archive::archive(&self.ctx, &self.tenants, &scope, None)
            .await
            .unwrap()
    }

    /// Every result of a finished action, in the order the archive pass takes them.
    pub fn results(&self) -> Vec<ResultRow> {
        let conn = self.reader();
        let mut stmt = conn
            .prepare(
                "SELECT r.action_id, r.command_index, coalesce(r.command_type, ''), r.state, r.attempts, r.last_error
                 FROM results r JOIN actions a ON a.tenant = r.tenant AND a.action_id = r.action_id
                 ORDER BY a.created_at, r.action_id, r.command_index",
            )
            .unwrap();
        stmt.query_map([], |r| {
            Ok(ResultRow {
                action_id: r.get(0)?,
                index: r.get(1)?,
                command_type: r.get(2)?,
                state: r.get(3)?,
                attempts: r.get(4)?,
                last_error: r.get(5)?,
            })
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    /// Results that were queued for download (everything but `skipped`).
    pub fn queued(&self) -> Vec<ResultRow> {
        self.results()
            .into_iter()
            .filter(|r| r.state != "skipped")
            .collect()
    }

    /// Custody rows of one result: (event, detail as JSON), in order.
    pub fn custody(&self, action_id: &str, index: u32) -> Vec<(String, serde_json::Value)> {
        let conn = self.reader();
        let mut stmt = conn
            .prepare(
                "SELECT event, detail FROM custody_log WHERE action_id = ?1 AND command_index = ?2 ORDER BY seq",
            )
            .unwrap();
        stmt.query_map(rusqlite::params![action_id, index], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .unwrap()
        .map(|row| {
            let (event, detail) = row.unwrap();
            (event, serde_json::from_str(&detail).unwrap())
        })
        .collect()
    }

    /// Custody events of one result after DISCOVERED / QUEUED.
    pub fn events(&self, action_id: &str, index: u32) -> Vec<String> {
        self.custody(action_id, index)
            .into_iter()
            .map(|(e, _)| e)
            .filter(|e| e != "QUEUED" && e != "DISCOVERED")
            .collect()
    }

    /// Quota ledger rows of one endpoint.
    pub fn api_calls(&self, endpoint: &str) -> i64 {
        self.reader()
            .query_row(
                "SELECT count(*) FROM api_calls WHERE endpoint = ?1",
                [endpoint],
                |r| r.get(0),
            )
            .unwrap()
    }

    /// Requests the simulator answered for one endpoint (`blob`, `link`, `token`, ...).
    pub fn sim_requests(&self, endpoint: &str) -> Vec<lrvault_sim::LoggedRequest> {
        self.sim
            .sim
            .requests()
            .into_iter()
            .filter(|r| r.endpoint == endpoint)
            .collect()
    }

    /// `*.partial` files anywhere under the store.
    pub fn partials(&self) -> Vec<PathBuf> {
        files_under(self.store())
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "partial"))
            .collect()
    }

    /// Waits until every pending result is due again (tiny `retry_base` in the test config):
    /// sleeps until the latest `next_attempt_at` the queue recorded, on the clock the queue
    /// reads (the wall clock), then checks that nothing pending is still in backoff.
    pub async fn wait_due(&self) {
        let latest: Option<String> = self
            .reader()
            .query_row(
                "SELECT max(next_attempt_at) FROM results WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        if let Some(at) = latest.as_deref().and_then(lrvault::time::parse_api) {
            let left = (at - lrvault::time::now()).to_std().unwrap_or_default();
            // Stored times are whole milliseconds: one more and `now` is past every one.
            tokio::time::sleep(left + Duration::from_millis(1)).await;
        }
        assert_eq!(
            self.count(&format!(
                "SELECT count(*) FROM results WHERE state = 'pending' AND next_attempt_at > '{}'",
                lrvault::time::now_str()
            )),
            0
        );
    }
}

/// Asserts that `log` holds debug lines of lrvault and of a crate beneath it. A log searched
/// for secrets proves nothing unless `RUST_LOG=debug` reached every crate.
pub fn assert_debug_from_every_crate(log: &str) {
    let debug = |ours: bool| {
        log.lines()
            .any(|l| l.contains(" DEBUG ") && l.contains(" DEBUG lrvault") == ours)
    };
    assert!(
        debug(true) && debug(false),
        "no debug lines from both lrvault and its dependencies:\n{log}"
    );
}
