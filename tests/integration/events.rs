//! Issue 24, events off the host: a real HTTP receiver in the test process takes the daemon's
//! webhook; every ARCHIVED event arrives exactly once after de-duplication by seq, in seq
//! order, with a valid signature, across a receiver that answers 500 for a while and a kill -9
//! of the daemon mid-pass; no event carries a secret, token or query. A sink that is down
//! does not change what a pass archives. rsyslog (a real daemon writing a file) receives RFC
//! 5424 lines with app-name `lrvault` and msgid = kind, over TCP from the daemon, over UDP and
//! over a unix socket.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use lrvault_sim::{Fault, SimConfig};
use serde_json::Value;
use sha2::Sha256;

use lrvault::config::SyslogTarget;

use crate::common::{Env, env, start_daemon, stop_daemon, wait_until};

/// The webhook's key as written to its file (the key is the bytes less the final newline).
const KEY: &str = "k3y-for-the-webhook-0123456789";

/// What the receiver saw: each accepted request's body and signature header, and how many
/// it refused.
#[derive(Default)]
struct Receiver {
    failing: AtomicBool,
    refused: AtomicUsize,
    accepted: Mutex<Vec<(Bytes, String)>>,
}

async fn hook(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if r.failing.load(Ordering::SeqCst) {
        r.refused.fetch_add(1, Ordering::SeqCst);
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let signature = headers
        .get("x-lrvault-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    r.accepted.lock().unwrap().push((body, signature));
    StatusCode::NO_CONTENT
}

/// A receiver on 127.0.0.1:0; its address.
async fn receiver(r: Arc<Receiver>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(r);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// `sha256=<hex>` of `body` under [`KEY`], computed here with the RustCrypto HMAC.
fn expected_signature(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Writes the key file (0600, one final newline) beside the config; its absolute path.
fn key_file(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("webhook-key");
    std::fs::write(&path, format!("{KEY}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// What the receiver check in docs/operations.md §16.1 (its Python block, run as written)
/// says of `body` and `header` under [`KEY`]: `True` or `False`.
fn guide_check(body: &[u8], header: &str) -> String {
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    let check = crate::doc_steps::fenced(&guide, "python")
        .into_iter()
        .find(|b| b.contains("def signed_by_lrvault"))
        .expect("docs/operations.md shows the signature check");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("body"), body).unwrap();
    let script = format!(
        "{check}\nimport sys\nprint(signed_by_lrvault(open(sys.argv[1], 'rb').read(), sys.argv[2], sys.argv[3].encode()))\n"
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(dir.path().join("body"))
        .arg(header)
        .arg(KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The daemon's config: a tick a second, short sink backoff, plus `events`.
fn config(events: &str) -> String {
    format!(
        "[schedule]\ndiscover = \"*/2 * * * * *\"\narchive = \"* * * * * *\"\nverify = \"0 0 3 * * *\"\n\
         [download]\nconcurrency = 1\nretry_base = \"200ms\"\nretry_max = \"1s\"\n\
         [quota]\nper_minute = 100000\nper_hour = 1000000\n{events}"
    )
}

/// The seqs of the ARCHIVED custody rows, in order, with each row's payload hash.
fn archived_rows(e: &Env) -> Vec<(i64, String)> {
    let c = e.reader();
    let mut st = c
        .prepare(
            "SELECT seq, evidence_sha256 FROM custody_log WHERE event = 'ARCHIVED' ORDER BY seq",
        )
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_gets_every_archived_event_once_in_order_signed_across_500s_and_kill_9() {
    let r = Arc::new(Receiver::default());
    r.failing.store(true, Ordering::SeqCst);
    let addr = receiver(r.clone()).await;
    let keys = tempfile::tempdir().unwrap();
    let key = key_file(keys.path());
    let events = format!(
        "[events]\nwebhook_url = \"http://{addr}/hook\"\nwebhook_secret_file = \"{}\"\n",
        key.display()
    );
    let sim = SimConfig {
        seed: 24,
        actions: 10,
        max_getfile_size: 20_000,
        faults: vec![Fault::Slow(4_000)],
        per_minute: 100_000,
        per_hour: 1_000_000,
        ..SimConfig::default()
    };
    let e = env(sim, &config(&events)).await;
    let expected = crate::common::archivable(&e.sim.sim, &e.tenant_id()).len();
    let (mut first, log) = start_daemon(&e);

    // The receiver refuses while results are archived: they wait in the outbox.
    let refusing = wait_until(Duration::from_secs(60), || {
        r.refused.load(Ordering::SeqCst) >= 2 && archived_rows(&e).len() >= 2
    })
    .await;
    assert!(refusing, "{}", std::fs::read_to_string(&log).unwrap());
    // It answers again; once it has taken an event, the daemon is killed mid-pass.
    r.failing.store(false, Ordering::SeqCst);
    let taking = wait_until(Duration::from_secs(30), || {
        !r.accepted.lock().unwrap().is_empty()
    })
    .await;
    assert!(taking, "{}", std::fs::read_to_string(&log).unwrap());
    first.kill().unwrap();
    first.wait().unwrap();
    let at_kill = archived_rows(&e).len();
    assert!(
        at_kill < expected,
        "the kill came after the pass: {at_kill} of {expected}"
    );

    // A second start sends what the first left, then the rest of the pass.
    let (second, _) = start_daemon(&e);
    let all = wait_until(Duration::from_secs(120), || {
        let want: Vec<i64> = archived_rows(&e).iter().map(|(s, _)| *s).collect();
        let got = r.accepted.lock().unwrap();
        want.len() == expected
            && want.iter().all(|s| {
                got.iter().any(|(b, _)| {
                    let v: Value = serde_json::from_slice(b).unwrap();
                    v["kind"] == "ARCHIVED" && v["seq"] == *s
                })
            })
    })
    .await;
    let (status, _) = e.run_ok(&["status", "--format", "json"]);
    let log = stop_daemon(second, &log);
    assert!(all, "{log}");

    let rows = archived_rows(&e);
    let accepted = r.accepted.lock().unwrap().clone();
    let secret = e.sim.sim.tenants()[0].client_secret.clone();
    let mut firsts: Vec<i64> = Vec::new();
    for (body, signature) in &accepted {
        assert_eq!(*signature, expected_signature(body));
        let text = std::str::from_utf8(body).unwrap();
        for leak in [KEY, secret.as_str(), "sig=", "token=", "Bearer"] {
            assert!(!text.contains(leak), "{leak} in {text}");
        }
        // No URL with a query (a SAS or `token=` query is a credential). A `?` elsewhere is
        // fine: the pattern's note quotes `case_pattern`, `(?i)...`.
        for url in text.split("http").skip(1) {
            let url = url.split('"').next().unwrap_or_default();
            assert!(!url.contains('?'), "a URL with a query in {text}");
        }
        let v: Value = serde_json::from_str(text).unwrap();
        let seq = v["seq"].as_i64().unwrap();
        if !firsts.contains(&seq) {
            firsts.push(seq);
        }
    }
    // First arrivals in seq order; after de-duplication every ARCHIVED row exactly once.
    let mut sorted = firsts.clone();
    sorted.sort();
    assert_eq!(firsts, sorted);
    let archived: Vec<Value> = firsts
        .iter()
        .map(|s| {
            let (body, _) = accepted
                .iter()
                .find(|(b, _)| serde_json::from_slice::<Value>(b).unwrap()["seq"] == *s)
                .unwrap();
            serde_json::from_slice(body).unwrap()
        })
        .filter(|v: &Value| v["kind"] == "ARCHIVED")
        .collect();
    assert_eq!(archived.len(), expected);
    let c = e.reader();
    for (v, (seq, sha)) in archived.iter().zip(&rows) {
        assert_eq!(v["seq"], *seq);
        assert_eq!(v["sha256"], *sha);
        assert_eq!(v["tenant"], "sim0");
        let evidence_id: String = c
            .query_row(
                "SELECT evidence_id FROM evidence WHERE payload_sha256 = ?1",
                [sha],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(v["evidence_id"], evidence_id);
    }
    assert_eq!(e.count("SELECT count(*) FROM event_outbox"), 0);
    let (body, header) = &accepted[0];
    assert_eq!(guide_check(body, header), "True");
    let mut tampered = body.to_vec();
    tampered[2] ^= 1;
    assert_eq!(guide_check(&tampered, header), "False");
    let status: Value = serde_json::from_str(&status).unwrap();
    let sink = &status["event_sinks"][0];
    assert_eq!(sink["sink"], "webhook");
    assert_eq!(sink["last_error"], "webhook answered HTTP 500");
    eprintln!(
        "webhook: {} requests refused, {} accepted for {} events ({} archived at the kill)",
        r.refused.load(Ordering::SeqCst),
        accepted.len(),
        firsts.len(),
        at_kill
    );
}

/// The same pass (same simulator seed) with a webhook nobody answers and with no sink:
/// the same results archived, failed and waiting; the down sink's events wait in the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_is_down_changes_nothing_a_pass_archives() {
    let sim = || SimConfig {
        seed: 25,
        actions: 12,
        ..SimConfig::default()
    };
    // A port that was just free and has no listener: every request is refused.
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key = key_file(keys.path());
    let events = format!(
        "[events]\nwebhook_url = \"http://{down}/hook\"\nwebhook_secret_file = \"{}\"\n",
        key.display()
    );
    let with_sink = env(sim(), &events).await;
    let without = env(sim(), "").await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    lrvault::events::start(&with_sink.cfg, &with_sink.ctx.db, &cancel, &tracker)
        .await
        .unwrap();
    let mut summaries = Vec::new();
    for e in [&with_sink, &without] {
        e.discover().await;
        let s = e.archive().await;
        summaries.push((s.archived, s.failed, s.unavailable, s.retry_later));
    }
    // The sink's task runs beside the passes, at its own pace: wait for its first refused
    // request to be recorded before stopping it (on a loaded machine the passes can end first).
    let tried = wait_until(Duration::from_secs(60), || {
        with_sink.count("SELECT count(*) FROM event_sink_state WHERE sink = 'webhook' AND last_error IS NOT NULL") > 0
    })
    .await;
    assert!(tried, "the webhook sink never recorded its refused request");
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    assert_eq!(summaries[0], summaries[1]);
    assert!(summaries[0].0 > 0);
    let states = "SELECT group_concat(state || ':' || n) FROM (SELECT state, count(*) n FROM results GROUP BY state ORDER BY state)";
    assert_eq!(with_sink.count_text(states), without.count_text(states));
    let archived = "SELECT count(*) FROM custody_log WHERE event = 'ARCHIVED'";
    assert_eq!(
        with_sink.count("SELECT count(*) FROM event_outbox WHERE kind = 'ARCHIVED'"),
        with_sink.count(archived)
    );
    assert_eq!(without.count("SELECT count(*) FROM event_outbox"), 0);
    let error =
        with_sink.count_text("SELECT last_error FROM event_sink_state WHERE sink = 'webhook'");
    assert!(error.starts_with("webhook request failed: "), "{error}");
    assert!(
        !error.contains(&down.to_string()),
        "no URL in the error: {error}"
    );
}

/// A real rsyslogd on loopback TCP and UDP ports, writing every message it parsed to a file
/// in RFC 5424 form (its own `RSYSLOG_SyslogProtocol23Format`, built from the fields it
/// parsed). Killed when dropped.
struct Rsyslog {
    child: std::process::Child,
    tcp: u16,
    udp: u16,
    /// A unix datagram socket like /dev/log, read with rsyslog's regular parsers.
    sock: std::path::PathBuf,
    out: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn rsyslog() -> Rsyslog {
    let dir = tempfile::tempdir().unwrap();
    // Ports that were just free.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = dir.path().join("messages.log");
    let sock = dir.path().join("log.sock");
    let conf = dir.path().join("rsyslog.conf");
    std::fs::write(
        &conf,
        format!(
            "global(workDirectory=\"{d}\")\nmodule(load=\"imtcp\")\nmodule(load=\"imudp\")\n\
             module(load=\"imuxsock\" SysSock.Use=\"off\")\n\
             input(type=\"imuxsock\" Socket=\"{s}\" UseSpecialParser=\"off\" ParseHostname=\"on\")\n\
             input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{tcp}\")\n\
             input(type=\"imudp\" address=\"127.0.0.1\" port=\"{udp}\")\n\
             action(type=\"omfile\" file=\"{o}\" template=\"RSYSLOG_SyslogProtocol23Format\")\n",
            d = dir.path().display(),
            s = sock.display(),
            o = out.display()
        ),
    )
    .unwrap();
    let child = std::process::Command::new("rsyslogd")
        .arg("-n")
        .arg("-f")
        .arg(&conf)
        .arg("-i")
        .arg(dir.path().join("rsyslogd.pid"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("rsyslogd is required for this test (.ci/run installs rsyslog)");
    let up = wait_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", tcp)).is_ok() && sock.exists()
    })
    .await;
    assert!(up, "rsyslogd did not open its TCP port");
    Rsyslog {
        child,
        tcp,
        udp,
        sock,
        out,
        _dir: dir,
    }
}

/// A line as RFC 5424: (facility, severity, app-name, msgid, the MSG as JSON).
fn parse_5424(line: &str) -> (u8, u8, String, String, Value) {
    let (pri, rest) = line
        .strip_prefix('<')
        .and_then(|l| l.split_once('>'))
        .unwrap_or_else(|| panic!("no PRI: {line}"));
    let pri: u8 = pri.parse().unwrap();
    let mut parts = rest.splitn(7, ' ');
    let mut next = || parts.next().unwrap_or_else(|| panic!("short line: {line}"));
    assert_eq!(next(), "1", "VERSION: {line}");
    let ts = next();
    assert!(
        chrono::DateTime::parse_from_rfc3339(ts).is_ok(),
        "TIMESTAMP {ts}"
    );
    let _host = next();
    let app = next().to_string();
    let procid = next();
    assert!(procid.parse::<u32>().is_ok(), "PROCID {procid}");
    let msgid = next().to_string();
    let rest = next();
    let msg = rest
        .strip_prefix("- ")
        .unwrap_or_else(|| panic!("SD: {line}"));
    (
        pri / 8,
        pri % 8,
        app,
        msgid,
        serde_json::from_str(msg.trim()).unwrap(),
    )
}

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsyslog_parses_the_events_as_rfc_5424_over_tcp_udp_and_a_unix_socket() {
    let rs = rsyslog().await;
    let events = format!("[events]\nsyslog = \"tcp://127.0.0.1:{}\"\n", rs.tcp);
    let sim = SimConfig {
        seed: 26,
        actions: 6,
        ..SimConfig::default()
    };
    let e = env(sim, &config(&events)).await;
    let expected = crate::common::archivable(&e.sim.sim, &e.tenant_id()).len();
    let (d, log) = start_daemon(&e);
    let arrived = wait_until(Duration::from_secs(60), || {
        let archived = archived_rows(&e).len();
        archived == expected
            && lines(&rs.out)
                .iter()
                .filter(|l| l.contains(" ARCHIVED "))
                .count()
                == archived
    })
    .await;
    let log = stop_daemon(d, &log);
    assert!(arrived, "{log}");
    let rows = archived_rows(&e);
    let got: Vec<_> = lines(&rs.out).iter().map(|l| parse_5424(l)).collect();
    let archived: Vec<_> = got.iter().filter(|g| g.3 == "ARCHIVED").collect();
    assert_eq!(archived.len(), rows.len());
    for ((facility, severity, app, msgid, msg), (seq, sha)) in archived.iter().zip(&rows) {
        assert_eq!((*facility, *severity), (16, 5), "local0.notice");
        assert_eq!(app, "lrvault");
        assert_eq!(msg["kind"], *msgid);
        assert_eq!(msg["seq"], *seq);
        assert_eq!(msg["sha256"], *sha);
    }

    // UDP and a unix socket: one datagram per event, the same format.
    let targets = [
        (
            "CHECKPOINT",
            SyslogTarget::Udp(format!("127.0.0.1:{}", rs.udp)),
        ),
        ("VERIFY_FAILED", SyslogTarget::Unix(rs.sock.clone())),
    ];
    for (kind, target) in targets {
        let mut sink = lrvault::events::syslog::SyslogSink::new(target);
        let body = format!(r#"{{"kind":"{kind}","seq":7}}"#);
        sink.send(kind, "2026-12-07T15:00:00.123Z", body.as_bytes())
            .await
            .unwrap();
        let mark = format!(" {kind} ");
        let arrived = wait_until(Duration::from_secs(20), || {
            lines(&rs.out).iter().any(|l| l.contains(&mark))
        })
        .await;
        assert!(arrived, "the {kind} message did not arrive");
        let line = lines(&rs.out)
            .into_iter()
            .find(|l| l.contains(&mark))
            .unwrap();
        let (facility, severity, app, msgid, msg) = parse_5424(&line);
        assert_eq!(
            (facility, app.as_str(), msgid.as_str()),
            (16, "lrvault", kind)
        );
        let expected_severity = if kind == "VERIFY_FAILED" { 3 } else { 5 };
        assert_eq!(severity, expected_severity);
        assert_eq!(msg, serde_json::json!({"kind": kind, "seq": 7}));
    }
}

/// A webhook key that cannot be read stops the daemon at start: one line, exit 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_key_that_cannot_be_read_stops_the_start_with_one_line() {
    let keys = tempfile::tempdir().unwrap();
    let missing = keys.path().join("absent");
    let events = format!(
        "[events]\nwebhook_url = \"https://siem.example.org/in\"\nwebhook_secret_file = \"{}\"\n",
        missing.display()
    );
    let e = env(SimConfig::default(), &events).await;
    let out = e.lrvault().arg("run").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!(
            "lrvault: cannot read events.webhook_secret_file {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
}
