//! Fixtures for the object-store tests: a real S3 implementation (moto's server, PyPI
//! `moto[server]`) and a real Azure Blob emulator (Azurite, npm `azurite`), each started on a
//! free loopback port for one test and killed when it ends. `.ci/run` installs both; on a
//! machine without them the first test that needs one installs it under `target/tmp` from
//! the package registries (pip, npm), so `cargo test` alone needs no set-up step. A server
//! that cannot start fails the test with the reason; nothing is skipped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use lrvault::config::{Backend, ObjectStoreConfig, StoreConfig, StoreCredentials};

/// Dummy credentials: moto checks none, but lrvault requires them with `credentials = "env"`.
pub const S3_KEY_ID: &str = "testing-key-id";
pub const S3_SECRET: &str = "testing-secret";
/// Azurite's well-known development account and key (public, documented by Microsoft).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A child process killed (and reaped) when the test ends, however it ends.
pub struct Server {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How to run an emulator: a program, the arguments before the test's own, and environment.
#[derive(Debug, Clone)]
struct Launcher {
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Launcher {
    fn plain(program: &str) -> Launcher {
        Launcher {
            program: program.to_string(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Runs an installer once; `Err` carries what it printed.
fn install(what: &str, mut cmd: Command, done: &Path) -> Result<(), String> {
    if done.exists() {
        return Ok(());
    }
    eprintln!(
        "installing {what} for the tests (once, under {})",
        done.parent().unwrap().display()
    );
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!(
            "{:?} failed ({}): {}{}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::write(done, b"").map_err(|e| e.to_string())
}

/// Where the tests install emulators they do not find (kept between runs).
fn tools_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("test-tools")
        .join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The versions `.ci/run` pins.
const MOTO_VERSION: &str = "5.2.1";
const AZURITE_VERSION: &str = "3.35.0";

/// `moto_server`, or moto installed with pip into `target/tmp` and run from there.
fn moto_launcher() -> Result<Launcher, String> {
    static MOTO: OnceLock<Result<Launcher, String>> = OnceLock::new();
    MOTO.get_or_init(|| {
        if on_path("moto_server") {
            return Ok(Launcher::plain("moto_server"));
        }
        let dir = tools_dir(&format!("moto-{MOTO_VERSION}"));
        let lib = dir.join("lib");
        let mut pip = Command::new("python3");
        pip.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&lib)
        .arg(format!("moto[server]=={MOTO_VERSION}"));
        install("moto", pip, &dir.join(".installed"))?;
        Ok(Launcher {
            program: "python3".into(),
            args: vec![
                "-c".into(),
                "import sys; from moto.server import main; sys.exit(main())".into(),
            ],
            env: vec![("PYTHONPATH".into(), lib.display().to_string())],
        })
    })
    .clone()
}

/// `azurite-blob`, or Azurite installed with npm into `target/tmp` and run from there.
fn azurite_launcher() -> Result<Launcher, String> {
    static AZURITE: OnceLock<Result<Launcher, String>> = OnceLock::new();
    AZURITE
        .get_or_init(|| {
            if on_path("azurite-blob") {
                return Ok(Launcher::plain("azurite-blob"));
            }
            let dir = tools_dir(&format!("azurite-{AZURITE_VERSION}"));
            let mut npm = Command::new("npm");
            npm.args([
                "install",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                "--prefix",
            ])
            .arg(&dir)
            .arg(format!("azurite@{AZURITE_VERSION}"));
            install("Azurite", npm, &dir.join(".installed"))?;
            let bin = dir.join("node_modules/.bin/azurite-blob");
            Ok(Launcher::plain(&bin.display().to_string()))
        })
        .clone()
}

/// Starts the emulator (the program from `$env_var`, else `launcher`) with `args` and waits
/// until it answers HTTP on `port`; panics with the reason and its log otherwise.
async fn start(
    what: &str,
    env_var: &str,
    launcher: fn() -> Result<Launcher, String>,
    install: &str,
    args: impl Fn(u16) -> Vec<String>,
) -> Server {
    let launcher = match std::env::var(env_var) {
        Ok(program) => Launcher::plain(&program),
        Err(_) => launcher().unwrap_or_else(|e| {
            panic!("{what} is not installed and could not be installed: {e} ({install}; .ci/run installs it; or set {env_var})")
        }),
    };
    let program = &launcher.program;
    for _attempt in 0..3 {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("server.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(program)
            .args(&launcher.args)
            .envs(launcher.env.iter().map(|(k, v)| (k, v)))
            .args(args(port))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{what} could not start: cannot run '{program}': {e} ({install}; .ci/run installs it; or set {env_var})")
            });
        let mut server = Server {
            child,
            port,
            _dir: dir,
        };
        let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let client = lrvault::http::client_builder().build().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                let log = read_log();
                if log.contains("Address already in use") || log.contains("EADDRINUSE") {
                    break; // another process took the port meanwhile: try a new one
                }
                panic!("{what} exited at start ({status}): {log}");
            }
            if client.get(server.url()).send().await.is_ok() {
                return server;
            }
            if Instant::now() > deadline {
                panic!(
                    "{what} did not answer on port {port} within 60 s: {}",
                    read_log()
                );
            }
            // The emulator is a child process that says nothing when it is ready: bounded
            // polling of its port is the only signal there is.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    panic!("{what} could not find a free port in 3 attempts");
}

/// moto's S3 server (`moto_server`, PyPI `moto[server]`).
pub async fn moto() -> Server {
    start(
        "moto (S3)",
        "LRVAULT_MOTO_SERVER",
        moto_launcher,
        "pip install 'moto[server]'",
        |port| {
            vec![
                "-H".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ]
        },
    )
    .await
}

/// Azurite's blob service (`azurite-blob`, npm `azurite`), in memory, without telemetry.
pub async fn azurite() -> Server {
    start(
        "Azurite (Azure Blob)",
        "LRVAULT_AZURITE_BLOB",
        azurite_launcher,
        "npm install -g azurite@3.35.0",
        |port| {
            [
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                &port.to_string(),
                "--inMemoryPersistence",
                "--disableTelemetry",
                "--skipApiVersionCheck",
                "--silent",
            ]
            .map(String::from)
            .to_vec()
        },
    )
    .await
}

/// An AWS SDK client for moto: the tests' independent view of the bucket.
pub fn s3_client(moto: &Server) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(moto.url())
        .force_path_style(true)
        .credentials_provider(Credentials::new(S3_KEY_ID, S3_SECRET, None, None, "test"))
        // The SDK's client on ring, like the binary's (no aws-lc in the tree).
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(Provider::Rustls(CryptoMode::Ring))
                .build_https(),
        )
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// Creates `bucket` on moto, with Object Lock and a default retention of `retention`
/// (`Some(("COMPLIANCE", 1))` = one day) when given.
pub async fn create_bucket(s3: &aws_sdk_s3::Client, bucket: &str, retention: Option<(&str, i32)>) {
    use aws_sdk_s3::types::{
        DefaultRetention, ObjectLockConfiguration, ObjectLockEnabled, ObjectLockRetentionMode,
        ObjectLockRule,
    };
    s3.create_bucket()
        .bucket(bucket)
        .object_lock_enabled_for_bucket(retention.is_some())
        .send()
        .await
        .unwrap();
    if let Some((mode, days)) = retention {
        let rule = ObjectLockRule::builder()
            .default_retention(
                DefaultRetention::builder()
                    .mode(ObjectLockRetentionMode::from(mode))
                    .days(days)
                    .build(),
            )
            .build();
        s3.put_object_lock_configuration()
            .bucket(bucket)
            .object_lock_configuration(
                ObjectLockConfiguration::builder()
                    .object_lock_enabled(ObjectLockEnabled::Enabled)
                    .rule(rule)
                    .build(),
            )
            .send()
            .await
            .unwrap();
    }
}

/// Every version of `key` (newest first), delete markers excluded: (version id, size).
pub async fn versions(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Vec<(String, i64)> {
    let out = s3
        .list_object_versions()
        .bucket(bucket)
        .prefix(key)
        .send()
        .await
        .unwrap();
    out.versions()
        .iter()
        .filter(|v| v.key() == Some(key))
        .map(|v| {
            (
                v.version_id().unwrap_or_default().to_string(),
                v.size().unwrap_or_default(),
            )
        })
        .collect()
}

/// The bytes of one version, through the SDK.
pub async fn get_version(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    version: &str,
) -> Vec<u8> {
    s3.get_object()
        .bucket(bucket)
        .key(key)
        .version_id(version)
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .to_vec()
}

pub fn s3_config(moto: &Server, bucket: &str, spool: PathBuf) -> StoreConfig {
    StoreConfig::object(Backend::S3 {
        object: ObjectStoreConfig {
            spool,
            prefix: "lrvault/".into(),
            endpoint: Some(moto.url().parse().unwrap()),
            credentials: StoreCredentials::Env,
            require_worm: true,
            ..ObjectStoreConfig::new(bucket)
        },
        region: "us-east-1".into(),
    })
}

pub fn s3_credentials(name: &str) -> Option<String> {
    match name {
        "AWS_ACCESS_KEY_ID" => Some(S3_KEY_ID.into()),
        "AWS_SECRET_ACCESS_KEY" => Some(S3_SECRET.into()),
        _ => None,
    }
}

pub fn azurite_credentials(name: &str) -> Option<String> {
    match name {
        "AZURE_STORAGE_ACCOUNT_NAME" => Some(AZURITE_ACCOUNT.into()),
        "AZURE_STORAGE_ACCOUNT_KEY" => Some(AZURITE_KEY.into()),
        _ => None,
    }
}

/// Creates a container on Azurite (object_store has no call for it), signed with the
/// development account's shared key.
pub async fn create_container(azurite: &Server, container: &str) {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let b64 = base64::engine::general_purpose::STANDARD;
    let date = chrono::Utc::now()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let version = "2021-12-02";
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{a}/{a}/{container}\nrestype:container",
        a = AZURITE_ACCOUNT
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&b64.decode(AZURITE_KEY).unwrap()).unwrap();
    mac.update(to_sign.as_bytes());
    let signature = b64.encode(mac.finalize().into_bytes());
    let response = lrvault::http::client_builder()
        .build()
        .unwrap()
        .put(format!(
            "{}/{AZURITE_ACCOUNT}/{container}?restype=container",
            azurite.url()
        ))
        .header("x-ms-date", date)
        .header("x-ms-version", version)
        .header("Content-Length", "0")
        .header(
            "Authorization",
            format!("SharedKey {AZURITE_ACCOUNT}:{signature}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        201,
        "{}",
        response.text().await.unwrap()
    );
}

/// `n` bytes that do not compress and differ per `seed`.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut out = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut out);
    out
}
