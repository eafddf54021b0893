//! Issue 21, outbound proxies: the real binary, run with `HTTP_PROXY` (or `http_proxy`)
//! pointing at a forward proxy on loopback, sends its token, API and blob requests through it
//! and archives what it archives without one; `NO_PROXY` bypasses it; the bearer token goes
//! only to the API host; and `download_hosts` is judged on the link's host, never the
//! proxy's. For plain-http targets the proxy is written here: it reads each absolute-form
//! request (`GET http://127.0.0.1:PORT/path HTTP/1.1`), records it, and forwards it to its
//! target. For https, the simulator serves TLS and a real proxy, tinyproxy, tunnels each
//! connection with `CONNECT` (the last test).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use lrvault_sim::SimConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{Env, env};
use crate::local_tsa::{make_ca, openssl};

/// One request the proxy carried.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Carried {
    /// `host:port` of the absolute-form target.
    target: String,
    method: String,
    /// The path, without the query (a SAS query is a credential).
    path: String,
    /// Whether it carried an `Authorization` header.
    authorization: bool,
}

impl Carried {
    /// `token` | `api` | `blob`, the way the simulator routes it.
    fn kind(&self) -> &'static str {
        if self.path.ends_with("/oauth2/v2.0/token") {
            "token"
        } else if self.path.starts_with("/api/") {
            "api"
        } else if self.path.starts_with("/blob/") {
            "blob"
        } else {
            "other"
        }
    }
}

/// A forward proxy for plain-http targets, one request per connection (it answers every
/// request with `Connection: close`, so a client never pipelines a second one).
struct Proxy {
    addr: SocketAddr,
    carried: Arc<Mutex<Vec<Carried>>>,
}

impl Proxy {
    /// Listens on `ip`:0 (127.0.0.2 keeps the proxy's host apart from the simulator's).
    async fn start(ip: &str) -> Proxy {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let carried = Arc::new(Mutex::new(Vec::new()));
        let log = carried.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(forward(client, log.clone()));
            }
        });
        Proxy { addr, carried }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn carried(&self) -> Vec<Carried> {
        self.carried.lock().unwrap().clone()
    }

    /// How many requests of each kind it carried: (token, api, blob, other).
    fn counts(&self) -> (usize, usize, usize, usize) {
        let c = self.carried();
        let n = |k: &str| c.iter().filter(|r| r.kind() == k).count();
        (n("token"), n("api"), n("blob"), n("other"))
    }
}

/// Reads one request head, records it, and relays the request and its answer to and from
/// the target; a request that is not absolute-form http is answered 400.
async fn forward(mut client: TcpStream, log: Arc<Mutex<Vec<Carried>>>) {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
    let Some((method, rest)) = request_line
        .first()
        .zip(request_line.get(1).and_then(|t| t.strip_prefix("http://")))
    else {
        let _ = client
            .write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await;
        return;
    };
    let (target, path_and_query) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path_and_query = if path_and_query.is_empty() {
        "/"
    } else {
        path_and_query
    };
    let mut upstream_head = format!("{method} {path_and_query} HTTP/1.1\r\n");
    let mut authorization = false;
    for line in lines.filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
        authorization |= name == "authorization";
        if name != "connection" && name != "proxy-connection" && name != "keep-alive" {
            upstream_head += line;
            upstream_head += "\r\n";
        }
    }
    upstream_head += "Connection: close\r\n\r\n";
    log.lock().unwrap().push(Carried {
        target: target.to_string(),
        method: method.to_string(),
        path: path_and_query.split('?').next().unwrap_or("").to_string(),
        authorization,
    });
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        let _ = client
            .write_all(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await;
        return;
    };
    if upstream.write_all(upstream_head.as_bytes()).await.is_err()
        || upstream.write_all(&buf[head_end..]).await.is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// The proxy variables a test sets, removed from the child first so the machine's own
/// settings (or a CGI `REQUEST_METHOD`, which makes the client ignore `HTTP_PROXY`) never
/// decide the outcome; `set` is then applied.
async fn lrvault_with(e: &Env, args: &[&str], set: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = e.lrvault();
    cmd.args(args);
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "REQUEST_METHOD",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in set {
        cmd.env(k, v);
    }
    let out = tokio::process::Command::from(cmd).output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// discover then archive through the binary, each asserted to exit 0.
async fn pass(e: &Env, set: &[(&str, &str)]) {
    for cmd in ["discover", "archive"] {
        let (code, out, err) = lrvault_with(e, &[cmd], set).await;
        assert_eq!(code, 0, "lrvault {cmd}\n{out}\n{err}");
    }
}

/// What a pass archived: (action, index, state, payload SHA-256) of every result.
fn outcome(e: &Env) -> Vec<(String, i64, String, Option<String>)> {
    let conn = e.reader();
    let mut stmt = conn
        .prepare(
            "SELECT r.action_id, r.command_index, r.state, v.payload_sha256 FROM results r
             LEFT JOIN evidence v ON v.action_id = r.action_id AND v.command_index = r.command_index
             ORDER BY r.action_id, r.command_index",
        )
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

const SEED: u64 = 2101;

fn sim() -> SimConfig {
    SimConfig {
        seed: SEED,
        actions: 4,
        ..SimConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_carries_every_request_and_the_pass_archives_the_same() {
    let direct = env(sim(), "").await;
    pass(&direct, &[]).await;
    let expected = outcome(&direct);
    assert!(
        expected.iter().filter(|r| r.2 == "archived").count() >= 2,
        "{expected:?}"
    );

    let proxy = Proxy::start("127.0.0.2").await;
    let e = env(sim(), "").await;
    // The upper-case name for discover, the lower-case one for archive: both are honoured.
    let (code, out, err) = lrvault_with(&e, &["discover"], &[("HTTP_PROXY", &proxy.url())]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = lrvault_with(&e, &["archive"], &[("http_proxy", &proxy.url())]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(outcome(&e), expected);

    // Every request the simulator answered came through the proxy, addressed to the
    // simulator (never bypassed because it is on loopback).
    let served = |kind: &[&str]| {
        let log = e.sim.sim.requests();
        log.iter().filter(|r| kind.contains(&r.endpoint)).count()
    };
    let (token, api, blob, other) = proxy.counts();
    assert_eq!(token, served(&["token"]));
    assert_eq!(api, served(&["list", "get", "link"]));
    assert_eq!(blob, served(&["blob"]));
    assert_eq!(other, 0, "{:?}", proxy.carried());
    assert!(token >= 2 && api >= 2 && blob >= 2, "{:?}", proxy.counts());
    let sim_host = e.sim.base_url().trim_start_matches("http://").to_string();
    let carried = proxy.carried();
    assert!(carried.iter().all(|r| r.target == sim_host), "{carried:?}");
    // The bearer token went to the API only: never to the blob host, never to the token
    // endpoint (which gets the client secret in its form body).
    for r in &carried {
        assert_eq!(r.authorization, r.kind() == "api", "{r:?}");
    }
    assert!(
        carried
            .iter()
            .all(|r| (r.method == "POST") == (r.kind() == "token"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_bypasses_the_proxy() {
    let proxy = Proxy::start("127.0.0.2").await;
    let e = env(sim(), "").await;
    let url = proxy.url();
    pass(&e, &[("HTTP_PROXY", &url), ("NO_PROXY", "127.0.0.1")]).await;
    assert!(outcome(&e).iter().any(|r| r.2 == "archived"));
    assert!(e.sim_requests("blob").len() >= 2);
    assert_eq!(proxy.carried(), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_hosts_judge_the_links_host_never_the_proxys() {
    let proxy = Proxy::start("127.0.0.2").await;
    let e = env(sim(), "").await;
    // The proxy's host allowed, the simulator's (where the links point) not: every link is
    // refused although the request would go to an allowed host. (The first test shows the
    // converse: links to the allowed 127.0.0.1 pass through a proxy on 127.0.0.2.)
    let text = std::fs::read_to_string(&e.config_path).unwrap();
    let allowed = text.replace(
        "download_hosts = [\"127.0.0.1\"]",
        "download_hosts = [\"127.0.0.2\"]",
    );
    assert_ne!(allowed, text);
    std::fs::write(&e.config_path, allowed).unwrap();
    let url = proxy.url();
    let set = [("HTTP_PROXY", url.as_str())];
    let (code, out, err) = lrvault_with(&e, &["discover"], &set).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = lrvault_with(&e, &["archive"], &set).await;
    let queued = e.queued();
    assert!(queued.len() >= 2, "{queued:?}");
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        out.trim_end(),
        format!(
            "0 archived, 0 unavailable, {} failed, 0 to retry later",
            queued.len()
        )
    );
    for r in &queued {
        assert_eq!(r.state, "failed");
        assert_eq!(
            r.last_error.as_deref(),
            Some("download link refused: host 127.0.0.1 is not in download_hosts"),
            "{r:?}"
        );
    }
    // The links were asked for through the proxy; no blob request left lrvault.
    let (token, api, blob, other) = proxy.counts();
    assert_eq!(blob + other, 0, "{:?}", proxy.carried());
    assert!(token >= 1 && api >= queued.len(), "{:?}", proxy.counts());
    assert_eq!(e.sim_requests("blob").len(), 0);
}

/// A test CA and a server certificate it signed for 127.0.0.1 and localhost, made by
/// `openssl` in a directory of their own: the simulator serves HTTPS with the leaf, and
/// lrvault trusts the CA through `SSL_CERT_FILE` (read by rustls' platform verifier), the
/// way an operator adds a TLS-inspecting proxy's CA.
struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    fn new() -> TestPki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        make_ca(d, "ca");
        std::fs::write(
            d.join("leaf.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "leaf.key",
                "-out",
                "leaf.csr",
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "leaf.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "leaf.ext",
                "-out",
                "leaf.pem",
            ],
        );
        TestPki { dir }
    }

    fn ca(&self) -> String {
        self.dir
            .path()
            .join("ca.crt")
            .to_string_lossy()
            .into_owned()
    }

    fn identity(&self) -> lrvault_sim::TlsIdentity {
        let read = |f: &str| std::fs::read(self.dir.path().join(f)).unwrap();
        lrvault_sim::TlsIdentity::from_pem(&read("leaf.pem"), &read("leaf.key")).unwrap()
    }
}

/// A simulator serving HTTPS with `pki`'s certificate, and a config written for it.
async fn https_env(pki: &TestPki) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let sim = lrvault_sim::Simulator::new(sim())
        .start_with(Some(pki.identity()))
        .await
        .unwrap();
    assert!(sim.base_url().starts_with("https://127.0.0.1:"));
    let config_path =
        lrvault::commands::demo::write_sim_config(dir.path(), &sim.sim, &sim.base_url(), "")
            .unwrap();
    crate::common::env_from(dir, sim, config_path, None)
}

/// A real forward proxy, tinyproxy, on 127.0.0.2, logging every request it takes
/// (`LogLevel Connect`) to a file. Killed when dropped.
struct Tinyproxy {
    child: std::process::Child,
    port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tinyproxy {
    async fn start() -> Tinyproxy {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("tinyproxy.log");
        let conf = dir.path().join("tinyproxy.conf");
        // tinyproxy needs a port number in its config: one that was just free. Should another
        // process take it first, tinyproxy exits and the next try takes another.
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.2:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            std::fs::write(
                &conf,
                format!(
                    "Port {port}\nListen 127.0.0.2\nTimeout 60\nMaxClients 64\nAllow 127.0.0.0/8\n\
                     LogLevel Connect\nLogFile \"{}\"\nPidFile \"{}\"\n",
                    log.display(),
                    dir.path().join("tinyproxy.pid").display()
                ),
            )
            .unwrap();
            let mut child = std::process::Command::new("tinyproxy")
                .arg("-d")
                .arg("-c")
                .arg(&conf)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("tinyproxy is required for this test (.ci/run installs it)");
            let mut exited = false;
            let up = crate::common::wait_until(std::time::Duration::from_secs(20), || {
                exited = matches!(child.try_wait(), Ok(Some(_)));
                exited || std::net::TcpStream::connect(("127.0.0.2", port)).is_ok()
            })
            .await;
            if up && !exited {
                return Tinyproxy {
                    child,
                    port,
                    log,
                    _dir: dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "tinyproxy did not start; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn url(&self) -> String {
        format!("http://127.0.0.2:{}", self.port)
    }

    /// Every request line it logged (`CONNECT 127.0.0.1:PORT HTTP/1.1`, ...), in order.
    fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once("]: Request (file descriptor "))
            .filter_map(|(_, rest)| rest.split_once("): "))
            .map(|(_, request)| request.to_string())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_proxy_tunnels_every_https_connection_and_no_proxy_bypasses_it() {
    let pki = TestPki::new();
    let trust = [("SSL_CERT_FILE", pki.ca())];
    let trust: Vec<(&str, &str)> = trust.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // Over HTTPS without a proxy: the outcome every run below must match.
    let direct = https_env(&pki).await;
    pass(&direct, &trust).await;
    let expected = outcome(&direct);
    assert!(
        expected.iter().filter(|r| r.2 == "archived").count() >= 2,
        "{expected:?}\n{:?}",
        direct.queued()
    );

    // The certificate is checked for real: without the CA, lrvault never reaches the API.
    let untrusted = https_env(&pki).await;
    let (code, out, err) = lrvault_with(&untrusted, &["discover"], &[]).await;
    assert_ne!(code, 0, "{out}\n{err}");
    assert!(err.contains("certificate"), "{err}");
    assert_eq!(untrusted.sim_requests("token").len(), 0);

    let proxy = Tinyproxy::start().await;
    let e = https_env(&pki).await;
    let sim_host = e.sim.base_url().trim_start_matches("https://").to_string();
    let proxy_url = proxy.url();
    // The upper-case name for discover, the lower-case one for archive: both are honoured.
    for (cmd, var) in [("discover", "HTTPS_PROXY"), ("archive", "https_proxy")] {
        let set = [trust.clone(), vec![(var, proxy_url.as_str())]].concat();
        let (code, out, err) = lrvault_with(&e, &[cmd], &set).await;
        assert_eq!(code, 0, "lrvault {cmd}\n{out}\n{err}");
    }
    assert_eq!(outcome(&e), expected);
    // Token, API and blob requests all reached the simulator, and every connection lrvault
    // opened was a CONNECT tunnel through the proxy to it: the proxy saw no request in clear.
    assert!(e.sim_requests("token").len() >= 2);
    assert!(e.sim_requests("blob").len() >= 2);
    let requests = proxy.requests();
    assert!(requests.len() >= 2, "{requests:?}");
    for r in &requests {
        assert_eq!(r, &format!("CONNECT {sim_host} HTTP/1.1"), "{requests:?}");
    }

    // NO_PROXY names the simulator's host: the same pass, and the proxy sees nothing new.
    let bypass = https_env(&pki).await;
    let set = [
        trust.clone(),
        vec![
            ("HTTPS_PROXY", proxy_url.as_str()),
            ("NO_PROXY", "127.0.0.1"),
        ],
    ]
    .concat();
    pass(&bypass, &set).await;
    assert_eq!(outcome(&bypass), expected);
    assert!(bypass.sim_requests("blob").len() >= 2);
    assert_eq!(proxy.requests(), requests);
}
