//! Issue 12, the object store wired in (docs/design.md §7b): the real pipeline archives the
//! simulator's results into moto's S3 (a bucket with Object Lock and a default COMPLIANCE
//! retention) and into Azurite; `verify` reads every package back by the version custody
//! names and fails after someone uploads a new version over a key; a store that is down
//! pauses the passes without charging anything, the spool stays bounded, and what waits in
//! it (an upload a crash cut off before its commit included) is published once, never twice;
//! `require_worm` refuses a bucket that does not lock, through the binary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lrvault::config::{Config, Credentials};
use lrvault::jobs::{Context, archive};
use lrvault::store::{Expected, Store};
use lrvault_sim::{SimConfig, Simulator};
use tokio_util::sync::CancellationToken;

use crate::common::{Env, archivable, files_under, sha256_hex, stored_hash};
use crate::object_stores::{
    AZURITE_ACCOUNT, S3_KEY_ID, S3_SECRET, Server, azurite, azurite_credentials, create_bucket,
    create_container, get_version, moto, s3_client, s3_credentials, versions,
};

const LOCK: Option<(&str, i32)> = Some(("COMPLIANCE", 1));

fn toml_str(p: &Path) -> String {
    serde_json::to_string(&p.to_string_lossy()).unwrap()
}

/// A simulator environment whose `[store]` section gets `store_keys` (the backend, bucket,
/// ...), with its context on a store opened with `credentials` (the tests' own lookup; the
/// binary reads the same values from its environment).
pub(crate) async fn object_env(
    sim_cfg: SimConfig,
    store_keys: impl Fn(&Path) -> String,
    extra: &str,
    credentials: fn(&str) -> Option<String>,
) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::new(sim_cfg).start().await.unwrap();
    let config_path =
        lrvault::commands::demo::write_sim_config(dir.path(), &sim.sim, &sim.base_url(), extra)
            .unwrap();
    let text = std::fs::read_to_string(&config_path).unwrap();
    let keys = store_keys(dir.path());
    std::fs::write(
        &config_path,
        text.replacen("[store]\n", &format!("[store]\n{keys}"), 1),
    )
    .unwrap();
    let cfg = Config::load(&config_path, Credentials::default()).unwrap();
    let store = Arc::new(Store::open_with(&cfg.store, &credentials).unwrap());
    crate::common::env_from(dir, sim, config_path, Some(store))
}

/// moto with `bucket` (locked with [`LOCK`] when `locked`), and a simulator environment that
/// archives into it (`more_keys` for `[store]`, `extra` TOML sections).
async fn s3_env(
    bucket: &str,
    locked: bool,
    sim: SimConfig,
    more_keys: &str,
    extra: &str,
) -> (Server, aws_sdk_s3::Client, Env) {
    let moto = moto().await;
    let s3 = s3_client(&moto);
    create_bucket(&s3, bucket, if locked { LOCK } else { None }).await;
    let keys = s3_keys(&moto, bucket, more_keys);
    let e = object_env(sim, keys, extra, s3_credentials).await;
    (moto, s3, e)
}

/// `[store]` keys of an S3 store on moto, the spool beside the database.
pub(crate) fn s3_keys(moto: &Server, bucket: &str, more: &str) -> impl Fn(&Path) -> String {
    let (url, bucket, more) = (moto.url(), bucket.to_string(), more.to_string());
    move |dir: &Path| {
        format!(
            "backend = \"s3\"\nspool = {}\nbucket = \"{bucket}\"\nprefix = \"lrvault/\"\nendpoint = \"{url}\"\nregion = \"us-east-1\"\n{more}",
            toml_str(&dir.join("spool"))
        )
    }
}

/// The binary with the S3 credentials in its environment (as systemd would pass them).
pub(crate) fn lrvault_s3(e: &Env) -> std::process::Command {
    let mut c = e.lrvault();
    c.env("AWS_ACCESS_KEY_ID", S3_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET);
    c
}

fn run(c: &mut std::process::Command) -> (i32, String, String) {
    crate::cli::run(c)
}

fn spool(e: &Env) -> PathBuf {
    e.cfg.store.staging_dir().to_path_buf()
}

/// Finished packages in the spool (not its `_tmp` / `_quarantine`), as keys.
fn spooled(e: &Env) -> Vec<String> {
    let root = spool(e);
    files_under(&root)
        .into_iter()
        .map(|p| {
            p.strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|k| !k.starts_with('_'))
        .collect()
}

/// One evidence row with the ARCHIVED row's detail.
#[derive(Debug, Clone)]
struct Archived {
    evidence_id: String,
    action_id: String,
    index: u32,
    path: String,
    payload_sha256: String,
    package_sha256: String,
    package_size: u64,
    detail: serde_json::Value,
}

fn archived(e: &Env) -> Vec<Archived> {
    let conn = e.reader();
    let mut stmt = conn
        .prepare(
            "SELECT e.evidence_id, e.action_id, e.command_index, e.package_path, e.payload_sha256,
                    e.package_sha256, e.package_size, c.detail
             FROM evidence e JOIN custody_log c ON c.event = 'ARCHIVED' AND c.package_path = e.package_path
             ORDER BY e.package_path",
        )
        .unwrap();
    stmt.query_map([], |r| {
        Ok(Archived {
            evidence_id: r.get(0)?,
            action_id: r.get(1)?,
            index: r.get(2)?,
            path: r.get(3)?,
            payload_sha256: r.get(4)?,
            package_sha256: r.get(5)?,
            package_size: r.get::<_, i64>(6)? as u64,
            detail: serde_json::from_str(&r.get::<_, String>(7)?).unwrap(),
        })
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

fn state_counts(e: &Env) -> HashMap<String, i64> {
    let conn = e.reader();
    let mut stmt = conn
        .prepare("SELECT state, count(*) FROM results GROUP BY state")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_archives_into_a_locked_bucket_and_verify_reads_each_version_back() {
    let sim = SimConfig {
        seed: 7,
        actions: 12,
        ..SimConfig::default()
    };
    let (_moto, s3, e) = s3_env("evidence", true, sim, "", "").await;
    let expected: HashMap<(String, u32), String> = archivable(&e.sim.sim, &e.tenant_id())
        .into_iter()
        .map(|x| ((x.action_id, x.index), x.sha256))
        .collect();
    assert!(expected.len() >= 8, "{}", expected.len());

    // The binary, as the daemon's jobs would run: discover, archive (with the WORM check),
    // logging at debug for every crate: the store's secret appears in no line.
    for cmd in ["discover", "archive"] {
        let (code, out, err) = run(lrvault_s3(&e).env("RUST_LOG", "debug").arg(cmd));
        assert_eq!(code, 0, "{cmd}: {out}\n{err}");
        crate::common::assert_debug_from_every_crate(&err);
        assert!(
            err.contains("package uploaded") || cmd == "discover",
            "{err}"
        );
        assert!(
            !out.contains(S3_SECRET) && !err.contains(S3_SECRET),
            "{cmd} logged the store's secret"
        );
    }
    let db = std::fs::read(&e.cfg.database.path).unwrap();
    assert!(
        !db.windows(S3_SECRET.len())
            .any(|w| w == S3_SECRET.as_bytes()),
        "the database holds the store's secret"
    );
    let rows = archived(&e);
    assert_eq!(rows.len(), expected.len());
    assert_eq!(state_counts(&e)["archived"], expected.len() as i64);
    for row in &rows {
        assert_eq!(
            expected[&(row.action_id.clone(), row.index)],
            row.payload_sha256
        );
        // The ARCHIVED row names where the package is and which version.
        let key = format!("lrvault/{}", row.path);
        assert_eq!(row.detail["store"], format!("s3://evidence/{key}"));
        assert_eq!(row.detail["package_sha256"], row.package_sha256.as_str());
        let version = row.detail["version_id"].as_str().expect("a version id");
        assert!(row.detail["etag"].as_str().is_some(), "{}", row.detail);
        // Exactly one version, whose bytes are the package custody records.
        assert_eq!(
            versions(&s3, "evidence", &key).await,
            vec![(version.to_string(), row.package_size as i64)]
        );
        let bytes = get_version(&s3, "evidence", &key, version).await;
        assert_eq!(sha256_hex(&bytes), row.package_sha256);
        if row.package_size <= lrvault::store::SINGLE_PUT_MAX {
            let head = s3
                .head_object()
                .bucket("evidence")
                .key(&key)
                .send()
                .await
                .unwrap();
            assert_eq!(
                head.object_lock_mode().map(|m| m.as_str()),
                Some("COMPLIANCE")
            );
        }
    }
    // Nothing is left on local disk: the spool is empty and store.root unused.
    assert_eq!(spooled(&e), Vec::<String>::new());
    assert!(files_under(e.store()).is_empty());

    let (code, out, err) = run(lrvault_s3(&e).arg("status"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("store: s3://evidence/lrvault/ (s3)"), "{out}");
    assert!(out.contains("WORM: COMPLIANCE, 1 day (required)"), "{out}");
    assert!(out.contains("0 packages waiting for the store"), "{out}");

    // verify reads every package back; its checkpoint goes to the bucket, not to disk.
    let (code, out, err) = run(lrvault_s3(&e).arg("verify"));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.starts_with(&format!("verified {} packages (0 defects)", rows.len())),
        "{out}"
    );
    let head_seq: i64 = e.count("SELECT max(seq) FROM anchors");
    let checkpoint = format!("lrvault/_checkpoints/{head_seq:012}.json");
    assert_eq!(versions(&s3, "evidence", &checkpoint).await.len(), 1);
    assert!(files_under(e.store()).is_empty());
    let (code, out, _) = run(lrvault_s3(&e).args(["verify", "--sample", "3"]));
    assert_eq!(code, 0);
    assert!(out.starts_with("verified 3 packages (0 defects)"), "{out}");

    // export copies the package and the checkpoint out of the bucket.
    let kit = e._dir.path().join("kit");
    let first = &rows[0];
    let (code, out, err) = run(lrvault_s3(&e)
        .args(["export", "--evidence", &first.evidence_id, "--out"])
        .arg(&kit));
    assert_eq!(code, 0, "{out}\n{err}");
    let copied = std::fs::read(kit.join("packages").join(&first.path)).unwrap();
    assert_eq!(sha256_hex(&copied), first.package_sha256);
    assert_eq!(
        std::fs::read_dir(kit.join("checkpoints")).unwrap().count(),
        1
    );

    // Someone uploads a new version over one package key, and puts a delete marker on
    // another: the locked versions are intact, but verify reports both (exit 3).
    let (forged, hidden) = (&rows[1], &rows[2]);
    s3.put_object()
        .bucket("evidence")
        .key(format!("lrvault/{}", forged.path))
        .body(b"not the package".to_vec().into())
        .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Sha256)
        .send()
        .await
        .unwrap();
    s3.delete_object()
        .bucket("evidence")
        .key(format!("lrvault/{}", hidden.path))
        .send()
        .await
        .unwrap();
    let (code, out, err) = run(lrvault_s3(&e).arg("verify"));
    assert_eq!(code, 3, "{out}\n{err}");
    assert!(out.contains("(2 defects)"), "{out}");
    let failed: Vec<String> = {
        let conn = e.reader();
        let mut stmt = conn
            .prepare("SELECT detail FROM custody_log WHERE event = 'VERIFY_FAILED' ORDER BY seq")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(failed.len(), 2, "{failed:?}");
    let about = |row: &Archived| {
        failed
            .iter()
            .find(|d| d.contains(&row.evidence_id))
            .unwrap_or_else(|| panic!("no defect names {}: {failed:?}", row.evidence_id))
            .clone()
    };
    assert!(
        about(forged).contains("now serves another object"),
        "{}",
        about(forged)
    );
    assert!(
        about(hidden).contains("now serves nothing (a delete marker)"),
        "{}",
        about(hidden)
    );
    // The locked original is still there, and still what custody names.
    let version = forged.detail["version_id"].as_str().unwrap();
    let key = format!("lrvault/{}", forged.path);
    assert_eq!(
        sha256_hex(&get_version(&s3, "evidence", &key, version).await),
        forged.package_sha256
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_worm_refuses_a_bucket_without_object_lock_through_the_binary() {
    let sim = SimConfig {
        seed: 3,
        actions: 2,
        ..SimConfig::default()
    };
    let (_moto, s3, e) = s3_env("plain", false, sim, "", "").await;
    let want = "lrvault: store.require_worm: bucket 'plain' has no Object Lock; create it with Object Lock and a default COMPLIANCE retention (docs/operations.md)";
    for args in [&["archive"][..], &["backfill", "--since", "1d"], &["run"]] {
        let line = crate::cli::one_line_error(lrvault_s3(&e).args(args));
        assert_eq!(line, want, "{args:?}");
    }
    // Nothing was written: no result queued, no object uploaded.
    assert_eq!(e.count("SELECT count(*) FROM results"), 0);
    let listed = s3.list_objects_v2().bucket("plain").send().await.unwrap();
    assert_eq!(listed.key_count(), Some(0));
    // status says what the store is and that it does not lock.
    let (code, out, _) = run(lrvault_s3(&e).arg("status"));
    assert_eq!(code, 0);
    assert!(
        out.contains("WORM: unknown (store.require_worm: bucket 'plain' has no Object Lock"),
        "{out}"
    );
}

/// A context on `e`'s database whose store config is changed by `change` (another
/// endpoint or bucket), with its own store breaker.
fn context_with(
    e: &Env,
    change: impl FnOnce(&mut lrvault::config::ObjectStoreConfig),
) -> (Arc<Context>, Vec<Arc<lrvault::jobs::Tenant>>) {
    let mut cfg = (*e.cfg).clone();
    change(cfg.store.object_store_mut().unwrap());
    let store = Arc::new(Store::open_with(&cfg.store, &s3_credentials).unwrap());
    let ctx = Context::with_store(
        Arc::new(cfg),
        e.ctx.db.clone(),
        CancellationToken::new(),
        store,
    )
    .unwrap();
    let tenants = ctx
        .tenants(None)
        .unwrap()
        .into_iter()
        .map(Arc::new)
        .collect();
    (Arc::new(ctx), tenants)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_fails_pauses_the_pass_the_spool_stays_bounded_and_nothing_goes_up_twice() {
    let sim = SimConfig {
        seed: 21,
        actions: 10,
        ..SimConfig::default()
    };
    // The config on disk names moto's "vault"; the first contexts get a store that is down,
    // then one whose bucket does not exist (HEAD finds nothing, every upload is refused).
    let extra = "[download]\nconcurrency = 2\nretry_base = \"1h\"\nretry_max = \"2h\"\n";
    let (_moto, s3, up) = s3_env("vault", true, sim, "spool_max_waiting = 2\n", extra).await;
    up.discover().await;
    let due = || {
        up.count("SELECT count(*) FROM results WHERE state = 'pending' AND next_attempt_at IS NULL")
            as usize
    };
    let queued = due();
    assert!(queued >= 6, "{queued}");
    let expected = archivable(&up.sim.sim, &up.tenant_id()).len();
    let scope = archive::Scope::default();
    let uncharged = |n: usize| {
        let deferred: Vec<_> = up
            .queued()
            .into_iter()
            .filter(|r| r.last_error.is_some())
            .collect();
        assert_eq!(deferred.len(), n, "{deferred:?}");
        assert!(
            up.queued().iter().all(|r| r.attempts == 0),
            "nothing is charged: {:?}",
            up.queued()
        );
        assert!(
            deferred.iter().all(|r| r.state == "pending"
                && r.last_error
                    .as_deref()
                    .unwrap()
                    .starts_with("evidence store: ")),
            "{deferred:?}"
        );
    };

    // 1. The store is unreachable: the two results in hand find out before downloading
    // anything (their first step asks the store whether a crash left them published), go
    // back uncharged, and the pass starts nothing more.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let (down, tenants) = context_with(&up, |s| {
        s.endpoint = Some(dead_url.parse().unwrap());
        s.retry_timeout = std::time::Duration::from_secs(1);
    });
    let pass = archive::archive(&down, &tenants, &scope, None)
        .await
        .unwrap();
    assert_eq!(
        (pass.archived, pass.deferred, pass.retry_later),
        (0, 2, 0),
        "{pass:?}"
    );
    assert_eq!(pass.not_started, queued - 2);
    let line = pass.store.clone().unwrap();
    assert!(
        line.starts_with("evidence store s3://vault/lrvault/: evidence store: "),
        "{line}"
    );
    assert!(line.contains("paused since"), "{line}");
    uncharged(2);
    assert_eq!(up.sim_requests("link").len(), 0);
    assert_eq!(spooled(&up), Vec::<String>::new());
    // At once again: the store breaker is open; nothing starts.
    let pass = archive::archive(&down, &tenants, &scope, None)
        .await
        .unwrap();
    assert_eq!(
        (pass.deferred, pass.not_started),
        (0, queued - 2),
        "{pass:?}"
    );
    assert!(pass.store.is_some());

    // 2. The store answers, but refuses every upload (its bucket is gone): two packages are
    // downloaded, checked, and wait in the spool; their results go back uncharged.
    let (refusing, tenants) = context_with(&up, |s| s.bucket = "vault-missing".into());
    let pass = archive::archive(&refusing, &tenants, &scope, None)
        .await
        .unwrap();
    assert_eq!((pass.archived, pass.deferred), (0, 2), "{pass:?}");
    assert_eq!(pass.not_started, queued - 4);
    uncharged(4);
    assert_eq!(up.sim_requests("link").len(), 2);
    let waiting = spooled(&up);
    assert_eq!(waiting.len(), 2, "{waiting:?}");
    assert_eq!(up.count("SELECT count(*) FROM evidence"), 0);

    // 3. The store is back, but the two packages wait for their backoff: the spool holds
    // store.spool_max_waiting packages, so no new download starts.
    let pass = up.archive().await;
    assert_eq!(
        (pass.archived, pass.not_started),
        (0, queued - 4),
        "{pass:?}"
    );
    let line = pass.store.unwrap();
    assert!(line.contains("holds 2 packages"), "{line}");
    assert!(line.contains("store.spool_max_waiting = 2"), "{line}");
    assert_eq!(up.sim_requests("link").len(), 2);

    // 4. A process uploads the first waiting package and dies before its commit.
    let (first, second) = (&waiting[0], &waiting[1]);
    let bytes = std::fs::read(spool(&up).join(first)).unwrap();
    let expected_first = Expected {
        sha256: sha256_hex(&bytes),
        size: bytes.len() as u64,
    };
    let cut_off = up.ctx.store.publish(first, &expected_first).await.unwrap();
    let cut_off_version = cut_off.version_id.clone().unwrap();
    // The backoffs pass.
    rusqlite::Connection::open(&up.cfg.database.path)
        .unwrap()
        .execute(
            "UPDATE results SET next_attempt_at = NULL WHERE state = 'pending'",
            [],
        )
        .unwrap();

    // 5. The binary's next pass publishes what waits (the uploaded one found by HEAD and
    // hash, not uploaded again), then downloads the rest.
    let (code, out, err) = run(lrvault_s3(&up).arg("archive"));
    assert_eq!(code, 0, "{out}\n{err}");
    let rows = archived(&up);
    assert_eq!(rows.len(), expected);
    assert_eq!(spooled(&up), Vec::<String>::new());
    for row in &rows {
        let key = format!("lrvault/{}", row.path);
        let all = versions(&s3, "vault", &key).await;
        assert_eq!(all.len(), 1, "{key}: {all:?}");
        assert_eq!(row.detail["version_id"], all[0].0.as_str());
        let adopted = row.path == *first || row.path == *second;
        assert_eq!(row.detail["adopted"] == true, adopted, "{}", row.detail);
    }
    let first_row = rows.iter().find(|r| r.path == *first).unwrap();
    assert_eq!(first_row.detail["version_id"], cut_off_version.as_str());
    assert_eq!(first_row.package_sha256, expected_first.sha256);
    // Each result's link was minted once: nothing was downloaded twice, nothing charged
    // but the one attempt that archived it.
    assert_eq!(up.sim_requests("link").len(), rows.len());
    let done: Vec<_> = up
        .queued()
        .into_iter()
        .filter(|r| r.state == "archived")
        .collect();
    assert_eq!(done.len(), expected);
    assert!(done.iter().all(|r| r.attempts == 1), "{done:?}");
    let (code, out, err) = run(lrvault_s3(&up).arg("verify"));
    assert_eq!(code, 0, "{out}\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_takes_the_pipelines_packages_on_azurite_and_verify_reads_them_back() {
    let azurite = azurite().await;
    create_container(&azurite, "evidence").await;
    let endpoint = format!("{}/{AZURITE_ACCOUNT}", azurite.url());
    let keys = move |dir: &Path| {
        format!(
            "backend = \"azure\"\nspool = {}\nbucket = \"evidence\"\nprefix = \"lrvault/\"\nendpoint = \"{endpoint}\"\nrequire_worm = false\n",
            toml_str(&dir.join("spool"))
        )
    };
    let sim = SimConfig {
        seed: 9,
        actions: 5,
        big_getfile: Some(20 * 1024 * 1024),
        ..SimConfig::default()
    };
    let e = object_env(sim, keys, "", azurite_credentials).await;
    let expected = archivable(&e.sim.sim, &e.tenant_id()).len();
    e.discover().await;
    let pass = e.archive().await;
    assert_eq!(pass.archived, expected, "{pass:?}");
    let rows = archived(&e);
    assert!(
        rows.iter()
            .any(|r| r.package_size > lrvault::store::SINGLE_PUT_MAX)
    );
    for row in &rows {
        assert_eq!(
            row.detail["store"],
            format!("azure://{AZURITE_ACCOUNT}/evidence/lrvault/{}", row.path)
        );
        assert!(row.detail["etag"].as_str().is_some());
        assert!(
            row.detail.get("version_id").is_none(),
            "Azurite keeps no versions"
        );
        assert_eq!(
            stored_hash(&e.ctx.store, &row.path, None).await,
            (row.package_sha256.clone(), row.package_size)
        );
    }
    assert_eq!(spooled(&e), Vec::<String>::new());

    let scope = lrvault::verify::Scope::default();
    let report = lrvault::verify::verify_with_store(&e.cfg, &e.ctx.db, e.ctx.store.clone(), &scope)
        .await
        .unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.packages_checked, rows.len());
    let checkpoint = report.checkpoint.unwrap();
    assert!(e.ctx.store.current(&checkpoint).await.unwrap().is_some());

    // A blob overwritten in the container (Azurite enforces no immutability) is a defect.
    overwrite_azure(&e, &rows[0].path, b"other bytes").await;
    let report = lrvault::verify::verify_with_store(&e.cfg, &e.ctx.db, e.ctx.store.clone(), &scope)
        .await
        .unwrap();
    assert!(!report.ok());
    assert_eq!(report.package_defects, 1, "{report:?}");
}

/// Replaces a blob through object_store directly, as anyone with the account key could.
async fn overwrite_azure(e: &Env, key: &str, bytes: &'static [u8]) {
    use object_store::{ObjectStoreExt, PutPayload};
    let store = object_store::azure::MicrosoftAzureBuilder::new()
        .with_account(AZURITE_ACCOUNT)
        .with_access_key(crate::object_stores::AZURITE_KEY)
        .with_container_name("evidence")
        .with_endpoint(
            e.cfg
                .store
                .object_store()
                .unwrap()
                .endpoint
                .as_ref()
                .unwrap()
                .as_str()
                .trim_end_matches('/')
                .to_string(),
        )
        .with_allow_http(true)
        .build()
        .unwrap();
    store
        .put(
            &object_store::path::Path::from(format!("lrvault/{key}")),
            PutPayload::from_static(bytes),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restore_the_packages_in_the_bucket_are_quarantined_in_place_and_fetched_again() {
    let sim = SimConfig {
        seed: 5,
        actions: 6,
        ..SimConfig::default()
    };
    let (_moto, s3, e) = s3_env("evidence", true, sim, "", "").await;
    let backup = e._dir.path().join("before.db");
    for args in [
        &["discover"][..],
        &["backup", "--to", backup.to_str().unwrap()],
        &["archive"],
    ] {
        let (code, out, err) = run(lrvault_s3(&e).args(args));
        assert_eq!(code, 0, "{args:?}: {out}\n{err}");
    }
    let before = archived(&e);
    let expected = archivable(&e.sim.sim, &e.tenant_id()).len();
    assert_eq!(before.len(), expected);
    let links = e.sim_requests("link").len();

    // The database goes back to before the pass: the packages are in the bucket, their
    // results pending again, nothing in the spool.
    let (code, out, err) =
        run(lrvault_s3(&e).args(["restore", "--from", backup.to_str().unwrap()]));
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(e.count("SELECT count(*) FROM evidence"), 0);
    let (code, out, err) = run(lrvault_s3(&e).arg("archive"));
    assert_eq!(code, 0, "{out}\n{err}");

    // The restored database was not writing those objects (docs/design.md §7a rule 14): each is
    // recorded QUARANTINED in place, under its lock, and never adopted; its result is fetched
    // again and goes up as a second version over it.
    assert_eq!(e.sim_requests("link").len(), links + expected);
    let after = archived(&e);
    assert_eq!(after.len(), expected);
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(old.path, new.path);
        assert_eq!(new.detail.get("adopted"), None, "{}", new.detail);
        let key = format!("lrvault/{}", new.path);
        let all = versions(&s3, "evidence", &key).await;
        assert_eq!(all.len(), 2, "{all:?}");
        let old_version = old.detail["version_id"].as_str().unwrap();
        assert!(all.iter().any(|(v, _)| v == old_version));
        assert_ne!(new.detail["version_id"], old.detail["version_id"]);
        let q = e
            .custody(&new.action_id, new.index)
            .into_iter()
            .find(|(ev, _)| ev == "QUARANTINED")
            .unwrap()
            .1;
        assert_eq!(q["version_id"], old_version);
        assert_eq!(q["sha256"], old.package_sha256.as_str());
    }
    assert_eq!(spooled(&e), Vec::<String>::new());
    let (code, out, err) = run(lrvault_s3(&e).arg("verify"));
    assert_eq!(code, 0, "{out}\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_binary_at_random_moments_never_makes_a_second_version() {
    use rand::{Rng, SeedableRng};
    // One package large enough for a multipart upload, so kills land in uploads too.
    let sim = SimConfig {
        seed: 17,
        actions: 8,
        big_getfile: Some(24 * 1024 * 1024),
        ..SimConfig::default()
    };
    let extra = "[download]\nconcurrency = 2\nretry_base = \"10ms\"\nretry_max = \"50ms\"\n";
    let (_moto, s3, e) = s3_env("evidence", true, sim, "", extra).await;
    let (code, _, err) = run(lrvault_s3(&e).arg("discover"));
    assert_eq!(code, 0, "{err}");
    let expected = archivable(&e.sim.sim, &e.tenant_id()).len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    for _ in 0..8 {
        let mut child = lrvault_s3(&e)
            .arg("archive")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // A kill at a random moment on purpose (not a wait for anything): the checks below
        // hold whatever the moment was.
        tokio::time::sleep(std::time::Duration::from_millis(rng.random_range(50..900))).await;
        let _ = child.kill();
        let _ = child.wait();
        // Whatever the moment: every object in the bucket has one version, and every
        // committed row names it.
        for row in archived(&e) {
            let all = versions(&s3, "evidence", &format!("lrvault/{}", row.path)).await;
            assert_eq!(all.len(), 1, "{}: {all:?}", row.path);
            assert_eq!(row.detail["version_id"], all[0].0.as_str());
        }
    }
    let (code, out, err) = run(lrvault_s3(&e).arg("archive"));
    assert_eq!(code, 0, "{out}\n{err}");
    let rows = archived(&e);
    assert_eq!(rows.len(), expected);
    let listed = s3
        .list_object_versions()
        .bucket("evidence")
        .prefix("lrvault/")
        .send()
        .await
        .unwrap();
    let package_versions = listed
        .versions()
        .iter()
        .filter(|v| !v.key().unwrap_or_default().contains("/_checkpoints/"))
        .count();
    assert_eq!(package_versions, expected, "one version per package");
    assert!(listed.delete_markers().is_empty());
    assert_eq!(spooled(&e), Vec::<String>::new());
    let (code, out, err) = run(lrvault_s3(&e).arg("verify"));
    assert_eq!(code, 0, "{out}\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_and_their_tokens_go_to_the_bucket_and_verify_checks_them_there() {
    use crate::local_tsa::{LocalTsa, openssl};
    let tsa_dir = tempfile::tempdir().unwrap();
    let tsa = LocalTsa::start(tsa_dir.path()).await;
    let sim = SimConfig {
        seed: 4,
        actions: 3,
        ..SimConfig::default()
    };
    let (_moto, s3, e) = s3_env("evidence", true, sim, "", &tsa.anchor_toml()).await;
    for (args, want) in [
        (&["discover"][..], ""),
        (&["archive"], ""),
        (&["verify"], "tokens: 1 fetched, 0 pending"),
        (&["verify"], "tokens: 1 fetched, 0 pending"),
    ] {
        let (code, out, err) = run(lrvault_s3(&e).args(args));
        assert_eq!(code, 0, "{args:?}: {out}\n{err}");
        assert!(out.contains(want), "{out}");
    }
    // Both checkpoints and both tokens are in the bucket (none on local disk), and each
    // token verifies with OpenSSL against the checkpoint's bytes as the bucket holds them.
    let seqs: Vec<i64> = {
        let conn = e.reader();
        let mut stmt = conn
            .prepare("SELECT seq FROM anchors WHERE tsr_path IS NOT NULL ORDER BY seq")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    // The archive pass's checkpoint and each verify run's, each with its token.
    assert_eq!(seqs.len(), 3);
    assert!(files_under(e.store()).is_empty());
    for seq in &seqs {
        for ext in ["json", "tsr"] {
            let key = format!("lrvault/_checkpoints/{seq:012}.{ext}");
            let all = versions(&s3, "evidence", &key).await;
            assert_eq!(all.len(), 1, "{key}");
            let bytes = get_version(&s3, "evidence", &key, &all[0].0).await;
            std::fs::write(tsa_dir.path().join(format!("{seq}.{ext}")), bytes).unwrap();
        }
        let ok = openssl(
            tsa_dir.path(),
            &[
                "ts",
                "-verify",
                "-data",
                &format!("{seq}.json"),
                "-in",
                &format!("{seq}.tsr"),
                "-CAfile",
                tsa.ca_pem.to_str().unwrap(),
            ],
        );
        assert!(ok.contains("Verification: OK"), "{ok}");
    }

    // Someone uploads a new version over the first checkpoint: verify reads what the key
    // serves, and its token no longer verifies against it.
    s3.put_object()
        .bucket("evidence")
        .key(format!("lrvault/_checkpoints/{:012}.json", seqs[0]))
        .body(b"{}".to_vec().into())
        .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Sha256)
        .send()
        .await
        .unwrap();
    let (code, out, err) = run(lrvault_s3(&e).arg("verify"));
    assert_eq!(code, 3, "{out}\n{err}");
    assert!(
        err.contains(&format!("_checkpoints/{:012}.json", seqs[0])),
        "{err}"
    );
}

/// The package key (relative to the prefix) of each pending result, in the order the
/// archive pass takes them.
pub(crate) fn pending_keys(e: &Env) -> Vec<(String, u32, String)> {
    let conn = e.reader();
    let mut stmt = conn
        .prepare(
            "SELECT r.action_id, r.command_index, a.created_at, r.command_type
             FROM results r JOIN actions a ON a.tenant = r.tenant AND a.action_id = r.action_id
             WHERE r.state = 'pending' ORDER BY a.created_at, r.action_id, r.command_index",
        )
        .unwrap();
    stmt.query_map([], |r| {
        let (action, index, created, ctype): (String, u32, String, String) =
            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
        let created = lrvault::time::parse_api(&created).unwrap();
        let tenant = e.tenants[0].cfg.name.clone();
        let rel = lrvault::package::package_rel_path(&tenant, created, &action, index, &ctype);
        Ok((action, index, rel.to_string_lossy().into_owned()))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_holds_another_object_is_quarantined_in_place_and_the_package_goes_beside_it() {
    let sim = SimConfig {
        seed: 8,
        actions: 4,
        ..SimConfig::default()
    };
    let extra = "[download]\nconcurrency = 1\nretry_base = \"1h\"\nretry_max = \"2h\"\n";
    let (_moto, s3, e) = s3_env("evidence", true, sim, "", extra).await;
    e.discover().await;
    let keys = pending_keys(&e);
    assert!(keys.len() >= 3, "{keys:?}");
    // B: downloaded while the store refused it, so its package waits in the spool.
    let (refusing, tenants) = context_with(&e, |s| s.bucket = "evidence-missing".into());
    let pass = archive::archive(&refusing, &tenants, &archive::Scope::default(), None)
        .await
        .unwrap();
    assert_eq!(pass.deferred, 1, "{pass:?}");
    let (b, a) = (&keys[0], &keys[1]);
    assert_eq!(spooled(&e), vec![b.2.clone()]);
    // Someone else's objects under B's key and under A's.
    for (_, _, rel) in [a, b] {
        s3.put_object()
            .bucket("evidence")
            .key(format!("lrvault/{rel}"))
            .body(b"someone else's object".to_vec().into())
            .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Sha256)
            .send()
            .await
            .unwrap();
    }
    rusqlite::Connection::open(&e.cfg.database.path)
        .unwrap()
        .execute(
            "UPDATE results SET next_attempt_at = NULL WHERE state = 'pending'",
            [],
        )
        .unwrap();
    let (code, out, err) = run(lrvault_s3(&e).arg("archive"));
    assert_eq!(code, 0, "{out}\n{err}");

    // Neither foreign object is adopted or replaced: each is recorded QUARANTINED where it
    // is (it cannot be moved from a locked bucket), and the result's own package goes up as
    // a new version beside it, conditional on the key still serving exactly that object.
    // B's spool copy was this database's and is published over it; A is downloaded.
    for (action, index, rel) in [a, b] {
        let key = format!("lrvault/{rel}");
        let all = versions(&s3, "evidence", &key).await;
        assert_eq!(all.len(), 2, "{key}: {all:?}");
        let rows = e.custody(action, *index);
        let q = &rows.iter().find(|(ev, _)| ev == "QUARANTINED").unwrap().1;
        assert_eq!(q["left_in_place"], format!("s3://evidence/{key}"));
        assert_eq!(q["sha256"], sha256_hex(b"someone else's object").as_str());
        let kept = std::path::PathBuf::from(q["kept_copy"].as_str().unwrap());
        assert_eq!(std::fs::read(&kept).unwrap(), b"someone else's object");
        let row = archived(&e).into_iter().find(|r| r.path == *rel).unwrap();
        assert_ne!(row.detail["version_id"], q["version_id"]);
        assert!(all.iter().any(|(v, _)| q["version_id"] == v.as_str()));
    }
    let rb = e.custody(&b.0, b.1);
    assert!(
        rb.iter().find(|(ev, _)| ev == "QUARANTINED").unwrap().1["reason"]
            .as_str()
            .unwrap()
            .starts_with("the store holds another object under s3://evidence/lrvault/"),
        "{rb:?}"
    );
    let ra = e.custody(&a.0, a.1);
    let why = ra.iter().find(|(ev, _)| ev == "QUARANTINED").unwrap().1["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        why.starts_with(&format!(
            "the store already holds s3://evidence/lrvault/{} (version ",
            a.2
        )) && why.contains("cannot be read"),
        "{why}"
    );
    let links = e.sim_requests("link");
    let linked = |k: &(String, u32, String)| {
        links
            .iter()
            .filter(|r| r.path.contains(&k.0) && r.path.contains(&format!("index={})", k.1)))
            .count()
    };
    assert_eq!((linked(b), linked(a)), (1, 1));
    assert_eq!(
        archived(&e).len(),
        archivable(&e.sim.sim, &e.tenant_id()).len()
    );
    assert_eq!(spooled(&e), Vec::<String>::new());
    let (code, out, err) = run(lrvault_s3(&e).arg("verify"));
    assert_eq!(code, 0, "{out}\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bag_planted_under_a_pending_key_is_quarantined_in_place_and_the_package_goes_over_it() {
    // Issue 16, docs/design.md §7a rule 14, on a locked bucket: the planted object cannot be moved,
    // so it is recorded (QUARANTINED, with its version) and never adopted; the result is
    // downloaded and its package goes up as a new version, conditional on the key still
    // serving exactly the planted object, which stays locked beside it.
    let sim = SimConfig {
        seed: 9,
        actions: 4,
        ..SimConfig::default()
    };
    let extra = "[download]\nconcurrency = 1\n";
    let (_moto, s3, e) = s3_env("evidence", true, sim, "", extra).await;
    e.discover().await;
    let keys = pending_keys(&e);
    assert!(keys.len() >= 2, "{keys:?}");
    let first = e.archive_max(1).await;
    assert_eq!(first.archived, 1, "{first:?}");
    let (a, b) = (&keys[0], &keys[1]);
    // Result A's genuine package, put under B's key by anyone with PutObject on the prefix.
    let a_key = format!("lrvault/{}", a.2);
    let a_version = versions(&s3, "evidence", &a_key).await[0].0.clone();
    let bag = get_version(&s3, "evidence", &a_key, &a_version).await;
    let b_key = format!("lrvault/{}", b.2);
    s3.put_object()
        .bucket("evidence")
        .key(&b_key)
        .body(bag.clone().into())
        .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Sha256)
        .send()
        .await
        .unwrap();
    let planted_version = versions(&s3, "evidence", &b_key).await[0].0.clone();

    let (code, out, err) = run(lrvault_s3(&e).arg("archive"));
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        e.events(&b.0, b.1),
        [
            "QUARANTINED",
            "LINK_ISSUED",
            "DOWNLOADED",
            "PUBLISHING",
            "ARCHIVED"
        ]
    );
    let rows = e.custody(&b.0, b.1);
    let q = &rows.iter().find(|(ev, _)| ev == "QUARANTINED").unwrap().1;
    assert_eq!(q["left_in_place"], format!("s3://evidence/{b_key}"));
    assert_eq!(q["version_id"], planted_version.as_str());
    assert_eq!(q["sha256"], sha256_hex(&bag).as_str());
    assert_eq!(
        q["reason"],
        format!(
            "the store already holds s3://evidence/{b_key} (version {planted_version}) but this database has no DOWNLOADED row of this result with its payload (SHA-256 {})",
            archived(&e)
                .into_iter()
                .find(|r| r.path == a.2)
                .unwrap()
                .payload_sha256
        )
    );
    let kept = std::path::PathBuf::from(q["kept_copy"].as_str().unwrap());
    assert!(kept.starts_with(spool(&e).join("_quarantine")), "{kept:?}");
    assert_eq!(std::fs::read(&kept).unwrap(), bag);
    // B's own package is the new version the ARCHIVED row names; the planted one is kept.
    let row = archived(&e).into_iter().find(|r| r.path == b.2).unwrap();
    assert_eq!(row.detail.get("adopted"), None, "{}", row.detail);
    let all = versions(&s3, "evidence", &b_key).await;
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all.iter().any(|(v, _)| *v == planted_version));
    let ours = row.detail["version_id"].as_str().unwrap();
    assert_ne!(ours, planted_version);
    let stored = get_version(&s3, "evidence", &b_key, ours).await;
    assert_eq!(sha256_hex(&stored), row.package_sha256);
    assert_eq!(spooled(&e), Vec::<String>::new());
    let (code, out, err) = run(lrvault_s3(&e).arg("verify"));
    assert_eq!(code, 0, "{out}\n{err}");
}
