//! A timestamp authority nobody here wrote: OpenSSL's `openssl ts -reply` behind a small
//! loopback HTTP handler, with its own throwaway CA made by `openssl` (an EC P-384 root and an
//! RSA-2048 TSA certificate with `extendedKeyUsage = critical,timeStamping`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

pub struct LocalTsa {
    pub url: String,
    /// The root certificate (what `tsa_ca_file` and `openssl ts -verify -CAfile` get).
    pub ca_pem: PathBuf,
    /// When set, the handler answers 503 as a TSA under maintenance would.
    pub down: Arc<AtomicBool>,
    /// Tokens issued.
    pub issued: Arc<AtomicUsize>,
    _server: tokio::task::JoinHandle<()>,
}

/// Runs `openssl` with `args` in `dir` and asserts it succeeds.
pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes a root CA named `name` in `dir` (`{name}.crt`, `{name}.key`).
pub fn make_ca(dir: &Path, name: &str) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-days",
            "3650",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    dir.join(format!("{name}.crt"))
}

impl LocalTsa {
    /// The `[anchor]` section of a config that uses this TSA.
    pub fn anchor_toml(&self) -> String {
        format!(
            "[anchor]\ntsa_url = \"{}\"\ntsa_ca_file = \"{}\"\n",
            self.url,
            self.ca_pem.display()
        )
    }

    pub async fn start(dir: &Path) -> LocalTsa {
        std::fs::create_dir_all(dir).unwrap();
        let ca_pem = make_ca(dir, "test-tsa-root");
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "tsa.key",
                "-out",
                "tsa.csr",
                "-subj",
                "/CN=Test TSA",
            ],
        );
        std::fs::write(
            dir.join("tsa-ext.cnf"),
            "basicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n\
             extendedKeyUsage = critical,timeStamping\nsubjectKeyIdentifier = hash\n\
             authorityKeyIdentifier = keyid\n",
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "tsa.csr",
                "-CA",
                "test-tsa-root.crt",
                "-CAkey",
                "test-tsa-root.key",
                "-CAcreateserial",
                "-out",
                "tsa.crt",
                "-days",
                "365",
                "-extfile",
                "tsa-ext.cnf",
            ],
        );
        std::fs::write(dir.join("tsaserial"), "01\n").unwrap();
        std::fs::write(
            dir.join("tsa.cnf"),
            format!(
                "[ tsa ]\ndefault_tsa = tsa_config1\n\n[ tsa_config1 ]\ndir = {}\n\
                 serial = $dir/tsaserial\ncrypto_device = builtin\nsigner_cert = $dir/tsa.crt\n\
                 signer_key = $dir/tsa.key\nsigner_digest = sha256\ndefault_policy = 1.2.3.4.1\n\
                 other_policies = 1.2.3.4.5\ndigests = sha256, sha384, sha512\naccuracy = secs:1\n\
                 clock_precision_digits = 0\nordering = no\ntsa_name = yes\n\
                 ess_cert_id_chain = no\ness_cert_id_alg = sha256\n",
                dir.display()
            ),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/tsr", listener.local_addr().unwrap());
        let down = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicUsize::new(0));
        let state = (dir.to_path_buf(), down.clone(), issued.clone());
        let app = axum::Router::new()
            .route("/tsr", axum::routing::post(reply))
            .with_state(Arc::new(tokio::sync::Mutex::new(state)));
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        LocalTsa {
            url,
            ca_pem,
            down,
            issued,
            _server: server,
        }
    }
}

type TsaState = Arc<tokio::sync::Mutex<(PathBuf, Arc<AtomicBool>, Arc<AtomicUsize>)>>;

/// One request at a time: `openssl ts -reply` on the posted TimeStampReq.
async fn reply(
    axum::extract::State(state): axum::extract::State<TsaState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let guard = state.lock().await;
    let (dir, down, issued) = (&guard.0, &guard.1, &guard.2);
    if down.load(Ordering::SeqCst) {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    assert_eq!(
        headers.get("content-type").unwrap(),
        "application/timestamp-query"
    );
    std::fs::write(dir.join("q.tsq"), &body).unwrap();
    openssl(
        dir,
        &[
            "ts",
            "-reply",
            "-config",
            "tsa.cnf",
            "-queryfile",
            "q.tsq",
            "-out",
            "r.tsr",
        ],
    );
    issued.fetch_add(1, Ordering::SeqCst);
    let tsr = std::fs::read(dir.join("r.tsr")).unwrap();
    ([("content-type", "application/timestamp-reply")], tsr).into_response()
}
