//! Issue 21, sign-in without a client secret: `auth = certificate | managed-identity |
//! workload-identity` through the real binary against the simulator, which checks each for
//! real (an assertion's signature against the certificate registered on the app, a
//! federated token it issued, its managed-identity endpoint). Each method discovers and
//! archives to the end; a rotated certificate or federated token file is picked up by a
//! running client; a refused credential of each kind is one line and spends no attempt; an
//! outage of the token endpoint stays an outage; hostile token answers neither panic nor
//! spend attempts; and no assertion, private key or token reaches a log line (debug, every
//! crate), the database or a package. Test certificates are made with `openssl req -x509`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use lrvault_sim::{Fault, SimConfig, Simulator};

use crate::common::{Env, archivable, env_from, files_under};

/// How the test tenant signs in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Method {
    Certificate,
    Workload,
    Managed,
}

/// A new key and self-signed certificate (openssl): the PEM lrvault reads (key, then
/// certificate; mode 0600) at `path`, and the certificate alone for the app registration.
fn make_certificate(dir: &Path, path: &Path) -> String {
    let (key, cert) = lrvault_sim::openssl_certificate(dir, "app").unwrap();
    write_private(path, &format!("{key}{cert}"));
    cert
}

/// The `x5t#S256` of the certificate in a PEM file (by registering it once more: the app
/// registration lists a certificate under its thumbprint).
fn thumbprint(e: &Env, file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    let cert = &text[text.find("-----BEGIN CERTIFICATE").unwrap()..];
    e.sim
        .sim
        .add_client_certificate(&e.tenant_id(), cert)
        .unwrap()
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A vault whose one tenant signs in with `method`; the client secret is deleted from the
/// app, so nothing but the method can work. Returns the environment and the credential
/// file (certificate or federated token), if the method has one.
async fn vault(method: Method, cfg: SimConfig) -> (Env, Option<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::new(cfg).start().await.unwrap();
    let base = sim.base_url();
    let path = lrvault::commands::demo::write_sim_config(dir.path(), &sim.sim, &base, "").unwrap();
    let t = sim.sim.tenants()[0].clone();
    sim.sim.remove_client_secret(&t.tenant_id, &t.client_secret);
    let file = dir.path().join(match method {
        Method::Certificate => "app.pem",
        _ => "azure-identity-token",
    });
    let keys = match method {
        Method::Certificate => {
            let cert = make_certificate(dir.path(), &file);
            sim.sim.add_client_certificate(&t.tenant_id, &cert).unwrap();
            format!("auth = \"certificate\"\nclient_certificate_file = {file:?}\n")
        }
        Method::Workload => {
            std::fs::write(&file, sim.sim.issue_federated_token(&t.tenant_id)).unwrap();
            format!("auth = \"workload-identity\"\nfederated_token_file = {file:?}\n")
        }
        Method::Managed => "auth = \"managed-identity\"\n".to_string(),
    };
    let text = std::fs::read_to_string(&path).unwrap();
    let secret_line = text
        .lines()
        .find(|l| l.starts_with("client_secret_file = "))
        .unwrap();
    std::fs::write(&path, text.replace(&format!("{secret_line}\n"), &keys)).unwrap();
    let has_file = method != Method::Managed;
    (env_from(dir, sim, path, None), has_file.then_some(file))
}

/// The binary with debug logs from every crate, and the managed-identity endpoint of the
/// simulator (`IDENTITY_ENDPOINT`, as on App Service and Arc hosts).
fn lrvault(e: &Env) -> Command {
    let mut c = e.lrvault();
    c.env("RUST_LOG", "debug")
        .env(
            "IDENTITY_ENDPOINT",
            format!("{}/msi/token", e.sim.base_url()),
        )
        .env("IDENTITY_HEADER", e.sim.sim.identity_header());
    c
}

/// Runs the binary; returns (exit code, stdout + stderr).
fn run(c: &mut Command, args: &[&str]) -> (i32, String, String) {
    let out = c.args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

fn small(seed: u64) -> SimConfig {
    SimConfig {
        seed,
        actions: 3,
        max_getfile_size: 4096,
        ..SimConfig::default()
    }
}

/// Token requests the simulator answered with `status`.
fn tokens(e: &Env, status: u16) -> usize {
    e.sim
        .sim
        .requests()
        .iter()
        .filter(|r| r.endpoint == "token" && r.status == status)
        .count()
}

/// Asserts that none of `needles` is in the logs, the database (and its WAL) or a package.
fn assert_nowhere(e: &Env, logs: &str, needles: &[String]) {
    let mut places: Vec<(String, Vec<u8>)> = vec![("logs".into(), logs.as_bytes().to_vec())];
    for suffix in ["", "-wal"] {
        let db = PathBuf::from(format!("{}{suffix}", e.cfg.database.path.display()));
        if let Ok(bytes) = std::fs::read(&db) {
            places.push((db.display().to_string(), bytes));
        }
    }
    for f in files_under(e.store()) {
        places.push((f.display().to_string(), std::fs::read(&f).unwrap()));
    }
    for needle in needles.iter().filter(|n| n.len() >= 16) {
        for (place, bytes) in &places {
            let found = bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
            assert!(!found, "a credential ({}…) is in {place}", &needle[..8]);
        }
    }
}

/// Discover and archive through the binary, to the end; returns the logs.
fn archive_to_the_end(e: &Env) -> String {
    let tid = e.tenant_id();
    let mut logs = String::new();
    for args in [["discover"], ["archive"]] {
        let (code, out, err) = run(&mut lrvault(e), &args);
        assert_eq!(code, 0, "lrvault {args:?}\n{out}\n{err}");
        logs += &(out + &err);
    }
    crate::common::assert_debug_from_every_crate(&logs);
    let want = archivable(&e.sim.sim, &tid).len() as i64;
    assert!(want > 0);
    assert_eq!(
        e.count("SELECT count(*) FROM results WHERE state = 'archived'"),
        want
    );
    logs
}

/// What must never be written anywhere: every access token, the federated tokens, the
/// private key's lines and the identity header.
fn credentials(e: &Env, file: Option<&Path>) -> Vec<String> {
    let mut secrets = e.sim.sim.issued_tokens();
    secrets.push(e.sim.sim.identity_header());
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).unwrap();
        let key_lines = text.lines().take_while(|l| !l.starts_with("-----END"));
        secrets.extend(
            key_lines
                .filter(|l| !l.starts_with("-----"))
                .map(str::to_string),
        );
        secrets.push(text.trim().to_string());
    }
    secrets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_sign_in_archives_to_the_end_and_a_rotated_certificate_needs_no_restart() {
    let (e, file) = vault(Method::Certificate, small(2101)).await;
    let file = file.unwrap();
    let logs = archive_to_the_end(&e);
    assert_nowhere(&e, &logs, &credentials(&e, Some(&file)));
    assert!(!logs.contains("eyJ"), "a JWT is in the logs");
    // A running client: a token from the first certificate, then the certificate is
    // rotated (the old one deleted from the app) and every issued token revoked.
    let tid = e.tenant_id();
    e.discover().await;
    let old = credentials(&e, Some(&file));
    let old_thumbprint = thumbprint(&e, &file);
    let fresh = e._dir.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    let cert = make_certificate(&fresh, &file);
    e.sim.sim.add_client_certificate(&tid, &cert).unwrap();
    e.sim.sim.remove_client_certificate(&tid, &old_thumbprint);
    e.sim.sim.revoke_tokens();
    let (issued, refused) = (tokens(&e, 200), tokens(&e, 401));
    e.discover().await;
    assert_eq!((tokens(&e, 200), tokens(&e, 401)), (issued + 1, refused));
    assert_nowhere(&e, "", &old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_identity_archives_to_the_end_and_a_rotated_token_file_needs_no_restart() {
    let (e, file) = vault(Method::Workload, small(2102)).await;
    let file = file.unwrap();
    let logs = archive_to_the_end(&e);
    assert_nowhere(&e, &logs, &credentials(&e, Some(&file)));
    let tid = e.tenant_id();
    e.discover().await;
    // The cluster rotates the projected token; the old one stops being accepted.
    let old = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, e.sim.sim.issue_federated_token(&tid)).unwrap();
    e.sim.sim.revoke_federated_token(&old);
    e.sim.sim.revoke_tokens();
    let (issued, refused) = (tokens(&e, 200), tokens(&e, 401));
    e.discover().await;
    assert_eq!((tokens(&e, 200), tokens(&e, 401)), (issued + 1, refused));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_identity_archives_to_the_end_system_or_user_assigned() {
    let (e, _) = vault(Method::Managed, small(2103)).await;
    let logs = archive_to_the_end(&e);
    assert_nowhere(&e, &logs, &credentials(&e, None));
    let msi: Vec<_> = e
        .sim
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path == "/msi/token")
        .collect();
    assert!(
        !msi.is_empty() && msi.iter().all(|r| r.status == 200),
        "{msi:?}"
    );
    // A user-assigned identity: the app's client id names it; an unknown one is refused.
    let client_id = e.sim.sim.tenants()[0].client_id.clone();
    let text = std::fs::read_to_string(&e.config_path).unwrap();
    let user = text.replace(
        "auth = \"managed-identity\"\n",
        &format!("auth = \"managed-identity\"\nmanaged_identity_client_id = \"{client_id}\"\n"),
    );
    std::fs::write(&e.config_path, &user).unwrap();
    let (code, out, err) = run(&mut lrvault(&e), &["-q", "check-credentials"]);
    assert_eq!((code, out.as_str()), (0, format!("tenant 'sim0': the credentials work (managed identity (user-assigned, managed_identity_client_id {client_id})): a token was issued and the API answered\n").as_str()), "{err}");
    std::fs::write(
        &e.config_path,
        user.replace(&client_id, "00000000-0000-0000-0000-00000000dead"),
    )
    .unwrap();
    let (code, _, err) = run(&mut lrvault(&e), &["-q", "check-credentials"]);
    assert_eq!(code, 1);
    assert_eq!(
        said(&err),
        vec![
            "lrvault: tenant 'sim0': refused: token request refused (HTTP 400): invalid_request; check tenant_id and the managed identity (user-assigned, managed_identity_client_id 00000000-0000-0000-0000-00000000dead): is it assigned to this host, and in this tenant?"
        ]
    );
}

/// Every result of a discovered queue still pending with no attempt spent.
fn assert_untouched(e: &Env, pending: i64) {
    assert_eq!(
        e.count("SELECT count(*) FROM results WHERE state = 'pending' AND attempts = 0"),
        pending
    );
    assert_eq!(
        e.count("SELECT count(*) FROM results WHERE attempts > 0"),
        0
    );
}

/// The `lrvault: ` lines of a run's stderr (the log lines are the rest).
fn said(err: &str) -> Vec<&str> {
    err.lines().filter(|l| l.starts_with("lrvault: ")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_credential_of_each_kind_is_one_line_and_spends_no_attempt() {
    for method in [Method::Certificate, Method::Workload, Method::Managed] {
        let (e, file) = vault(method, small(2104)).await;
        let (code, out, err) = run(&mut lrvault(&e), &["discover"]);
        assert_eq!(code, 0, "{out}{err}");
        let pending = e.count("SELECT count(*) FROM results WHERE state = 'pending'");
        assert!(pending > 0);
        let tid = e.tenant_id();
        let mut c = lrvault(&e);
        let expect = match method {
            Method::Certificate => {
                // The certificate is deleted from the app registration.
                let thumbprint = thumbprint(&e, file.as_ref().unwrap());
                e.sim.sim.remove_client_certificate(&tid, &thumbprint);
                format!(
                    "token request refused (HTTP 401): invalid_client (AADSTS 700027); check tenant_id, client_id and the certificate (client_certificate_file {}): is it uploaded to the app registration, and unexpired?",
                    file.as_ref().unwrap().display()
                )
            }
            Method::Workload => {
                e.sim.sim.revoke_federated_token(
                    std::fs::read_to_string(file.as_ref().unwrap())
                        .unwrap()
                        .trim(),
                );
                format!(
                    "token request refused (HTTP 401): invalid_client (AADSTS 700211); check tenant_id, client_id and the federated credential of the app (federated_token_file {}): do its issuer and subject match the token's?",
                    file.as_ref().unwrap().display()
                )
            }
            Method::Managed => {
                c.env("IDENTITY_HEADER", "not-the-header");
                "token request refused (HTTP 401): unauthorized_client; check tenant_id and the managed identity (system-assigned): is it assigned to this host, and in this tenant?".to_string()
            }
        };
        let (code, _, err) = run(&mut c, &["archive"]);
        assert_eq!(code, 1, "{method:?}: {err}");
        let lines = said(&err);
        assert_eq!(lines.len(), 1, "{method:?}: {lines:?}");
        assert!(
            lines[0].starts_with("lrvault: tenant 'sim0'")
                && lines[0].contains(&format!(": {expect} (breaker open since ")),
            "{method:?}: {}\nwant …{expect}",
            lines[0]
        );
        assert_untouched(&e, pending);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_switches_refuse_each_method_and_check_credentials_says_so() {
    let faults = [
        "assertion-refused=5",
        "federated-refused=5",
        "managed-identity-refused=5",
    ];
    for (method, fault) in [Method::Certificate, Method::Workload, Method::Managed]
        .into_iter()
        .zip(faults)
    {
        let cfg = SimConfig {
            faults: vec![fault.parse::<Fault>().unwrap()],
            ..small(2105)
        };
        let (e, _) = vault(method, cfg).await;
        let (code, out, err) = run(&mut lrvault(&e), &["-q", "check-credentials"]);
        assert_eq!((code, out.as_str()), (1, ""), "{fault}: {err}");
        let lines = said(&err);
        assert_eq!(lines.len(), 1, "{fault}: {err}");
        assert!(
            lines[0].starts_with("lrvault: tenant 'sim0': refused: token request refused (HTTP "),
            "{}",
            lines[0]
        );
        assert_eq!(e.api_calls("token"), 1, "{fault}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_outage_stays_an_outage_for_every_method() {
    for method in [Method::Certificate, Method::Workload, Method::Managed] {
        let (e, _) = vault(method, small(2106)).await;
        let (code, _, err) = run(&mut lrvault(&e), &["discover"]);
        assert_eq!(code, 0, "{err}");
        let pending = e.count("SELECT count(*) FROM results WHERE state = 'pending'");
        e.sim.sim.set_outage(true);
        let (code, _, err) = run(&mut lrvault(&e), &["-q", "check-credentials"]);
        assert_eq!(code, 1);
        assert_eq!(
            said(&err),
            vec![
                "lrvault: tenant 'sim0': could not be checked: token endpoint unavailable (HTTP 503): temporarily_unavailable; an outage at the identity provider, not a configuration problem"
            ],
            "{method:?}"
        );
        let (code, _, err) = run(&mut lrvault(&e), &["archive"]);
        assert_eq!(code, 1, "{err}");
        assert!(!err.contains("check tenant_id"), "{method:?}: {err}");
        assert_untouched(&e, pending);
        let breaker = e.count("SELECT count(*) FROM tenant_health WHERE trouble = 'outage'");
        assert_eq!(breaker, 1, "{method:?}");
    }
}

/// A token endpoint that asks the simulator for the token, then spoils the answer.
async fn hostile_login(sim_base: String, mode: Arc<Mutex<&'static str>>) -> String {
    use axum::response::IntoResponse;
    let app = axum::Router::new().route(
        "/{tenant}/oauth2/v2.0/token",
        axum::routing::post(
            move |axum::extract::Path(tenant): axum::extract::Path<String>,
                  body: axum::body::Bytes| {
                let (sim_base, mode) = (sim_base.clone(), mode.clone());
                async move {
                    let answer: serde_json::Value = reqwest::Client::new()
                        .post(format!("{sim_base}/{tenant}/oauth2/v2.0/token"))
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body(body)
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    let mut a = answer.as_object().unwrap().clone();
                    let mode = *mode.lock().unwrap();
                    match mode {
                        "huge" => {
                            a.insert("expires_in".into(), serde_json::json!(u64::MAX));
                        }
                        "huge-string" => {
                            a.insert("expires_in".into(), "18446744073709551615".into());
                        }
                        "negative" => {
                            a.insert("expires_in".into(), serde_json::json!(-3600));
                        }
                        "no-token" => {
                            a.remove("access_token");
                        }
                        "10mb" => {
                            return format!("{{\"access_token\":\"{}\"}}", "A".repeat(10 << 20))
                                .into_response();
                        }
                        _ => unreachable!(),
                    }
                    axum::Json(a).into_response()
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_token_answers_never_panic_nor_spend_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::new(small(2107)).start().await.unwrap();
    let base = sim.base_url();
    let path = lrvault::commands::demo::write_sim_config(dir.path(), &sim.sim, &base, "").unwrap();
    let mode = Arc::new(Mutex::new("huge"));
    let login = hostile_login(base.clone(), mode.clone()).await;
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace(
            &format!("login_base = \"{base}\""),
            &format!("login_base = \"{login}\""),
        ),
    )
    .unwrap();
    let e = env_from(dir, sim, path, None);
    let set = |m: &'static str| *mode.lock().unwrap() = m;
    // 2^64-1 seconds (it used to panic: "overflow when adding duration to instant").
    let (code, out, err) = run(&mut e.lrvault(), &["discover"]);
    assert_eq!(code, 0, "{out}{err}");
    let pending = e.count("SELECT count(*) FROM results WHERE state = 'pending'");
    for (m, why) in [
        ("no-token", "token: unexpected response: no access_token"),
        (
            "10mb",
            "token: the answer is larger than 4194304 bytes; refusing to read it",
        ),
    ] {
        set(m);
        let (code, _, err) = run(&mut e.lrvault(), &["archive"]);
        assert_eq!(code, 1, "{m}: {err}");
        assert!(!err.contains("panicked"), "{m}: {err}");
        assert_eq!(said(&err).len(), 1, "{m}: {err}");
        assert!(said(&err)[0].contains(why), "{m}: {err}");
        assert_untouched(&e, pending);
    }
    for m in ["negative", "huge-string", "huge"] {
        set(m);
        let (code, _, err) = run(&mut e.lrvault(), &["discover"]);
        assert_eq!(code, 0, "{m}: {err}");
    }
    set("negative");
    let (code, _, err) = run(&mut e.lrvault(), &["archive"]);
    assert_eq!(code, 0, "{err}");
    let want = archivable(&e.sim.sim, &e.tenant_id()).len() as i64;
    assert_eq!(
        e.count("SELECT count(*) FROM results WHERE state = 'archived'"),
        want
    );
}
