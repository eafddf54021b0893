//! Taking a bearer token for one tenant, whichever way it signs in (`auth`,
//! docs/operations.md §1.10): the client-credentials POST with a client secret, with a client
//! assertion signed by the certificate's private key (a fresh one per request), or with the
//! federated token file as the assertion; or a GET to the managed-identity endpoint. Every
//! credential is read again at each request, so a rotated one needs no restart. Every request
//! goes through the quota governor under the `token` key, and every number in an answer is
//! checked and clamped: a hostile answer is a failed token request, never a panic.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::{MdeClient, MdeError, read_body, token_error};
use crate::config::{
    ClientCertificate, ExposeSecret, Secret, SignIn, TenantConfig, base64url, read_federated_token,
};
use crate::quota::Endpoint;

/// The longest lifetime a token answer is believed for; a larger `expires_in` is clamped.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A client assertion is valid this long (Entra accepts at most 10 minutes).
const ASSERTION_LIFETIME_SECS: i64 = 600;
/// The Azure instance metadata endpoint (fixed; `IDENTITY_ENDPOINT` replaces it on App
/// Service hosts, and in the tests).
const IMDS_TOKEN_URL: &str = "http://169.254.169.254/metadata/identity/oauth2/token";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A token and how long it may be used.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Issued {
    pub value: String,
    pub lifetime: Duration,
}

/// What a client-credentials POST proves the client with.
enum Proof {
    Secret(Secret),
    Assertion(Secret),
}

impl MdeClient {
    /// One token request by the tenant's method.
    pub(super) async fn request_token(&self) -> Result<Issued, MdeError> {
        let tenant = self.tenant.clone();
        let url = token_url(&tenant);
        if let SignIn::ManagedIdentity { client_id } = &tenant.sign_in {
            return self.managed_identity_token(client_id.as_deref()).await;
        }
        // Files are read, and the assertion signed, on a blocking thread. Its times are the
        // servers' (learned from their Date headers), so a host clock that is off by more
        // than Entra's leeway does not make every assertion "not yet valid" or "expired".
        let (audience, now) = (url.clone(), self.clock.now().timestamp());
        let proof = tokio::task::spawn_blocking(move || proof(&tenant, &audience, now))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", self.tenant.client_id.as_str()),
            ("scope", self.tenant.scope.as_str()),
        ];
        match &proof {
            Proof::Secret(s) => form.push(("client_secret", s.expose_secret())),
            Proof::Assertion(a) => {
                form.push(("client_assertion_type", ASSERTION_TYPE));
                form.push(("client_assertion", a.expose_secret()));
            }
        }
        let response = self
            .send_counted(Endpoint::Token, || self.http.post(&url).form(&form))
            .await?;
        self.token_answer(response).await
    }

    /// The managed-identity GET: `IDENTITY_ENDPOINT` with `IDENTITY_HEADER` when both are
    /// set (App Service, the tests), else the instance metadata endpoint.
    async fn managed_identity_token(&self, client_id: Option<&str>) -> Result<Issued, MdeError> {
        let resource = self
            .tenant
            .scope
            .strip_suffix("/.default")
            .unwrap_or(&self.tenant.scope);
        let variant = identity_endpoint();
        let (base, version) = match &variant {
            Some((endpoint, _)) => (endpoint.as_str(), "2019-08-01"),
            None => (IMDS_TOKEN_URL, "2018-02-01"),
        };
        let mut url = url::Url::parse(base).map_err(|e| MdeError::Decode {
            endpoint: "token",
            message: format!("IDENTITY_ENDPOINT is not a URL: {e}"),
        })?;
        url.query_pairs_mut()
            .append_pair("api-version", version)
            .append_pair("resource", resource);
        if let Some(id) = client_id {
            url.query_pairs_mut().append_pair("client_id", id);
        }
        let response = self
            .send_counted(Endpoint::Token, || {
                let request = self.http.get(url.clone());
                match &variant {
                    Some((_, header)) => {
                        request.header("X-IDENTITY-HEADER", header.expose_secret())
                    }
                    None => request.header("Metadata", "true"),
                }
            })
            .await?;
        self.token_answer(response).await
    }

    /// Reads a token answer: a refusal or an outage as [`token_error`] says, else the token
    /// and its lifetime ([`parse_issued`]).
    async fn token_answer(&self, response: reqwest::Response) -> Result<Issued, MdeError> {
        let status = response.status();
        let body = read_body(Endpoint::Token, response).await?;
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(token_error(status, &json, &self.tenant));
        }
        parse_issued(&json).map_err(|message| MdeError::Decode {
            endpoint: Endpoint::Token.as_str(),
            message,
        })
    }
}

/// `{login_base}/{tenant_id}/oauth2/v2.0/token`: where the POST goes, and the assertion's `aud`.
fn token_url(tenant: &TenantConfig) -> String {
    format!(
        "{}/{}/oauth2/v2.0/token",
        tenant.login_base.as_str().trim_end_matches('/'),
        tenant.tenant_id
    )
}

/// `IDENTITY_ENDPOINT` and `IDENTITY_HEADER`, when both are set and not empty.
fn identity_endpoint() -> Option<(String, Secret)> {
    let endpoint = std::env::var("IDENTITY_ENDPOINT").ok()?;
    let header = std::env::var("IDENTITY_HEADER").ok()?;
    (!endpoint.is_empty() && !header.is_empty()).then(|| (endpoint, Secret::from(header)))
}

/// The proof for a client-credentials POST, read now: the secret, a fresh assertion signed
/// with the certificate, or the federated token. An unreadable credential is the tenant's
/// configuration error (the refused case: no result spends an attempt on it).
fn proof(tenant: &TenantConfig, audience: &str, now: i64) -> Result<Proof, MdeError> {
    let failed = |m: String| MdeError::Secret(tenant.credential_error(m));
    match &tenant.sign_in {
        SignIn::Secret(source) => source.load().map(Proof::Secret).map_err(failed),
        SignIn::Certificate(file) => {
            let cert = ClientCertificate::load(file).map_err(failed)?;
            client_assertion(&cert, &tenant.client_id, audience, now)
                .map(Proof::Assertion)
                .map_err(|e| {
                    failed(format!(
                        "client_certificate_file {}: cannot sign the client assertion: {e}",
                        file.path.display()
                    ))
                })
        }
        SignIn::WorkloadIdentity(file) => read_federated_token(file)
            .map(Proof::Assertion)
            .map_err(failed),
        SignIn::ManagedIdentity { .. } => unreachable!("managed identity takes no proof"),
    }
}

/// A client assertion (docs/operations.md §1.10): PS256 with the certificate's `x5t#S256`,
/// `aud` = the token endpoint, `iss` = `sub` = the client id, a unique `jti`, valid from
/// `now` for [`ASSERTION_LIFETIME_SECS`].
pub(super) fn client_assertion(
    cert: &ClientCertificate,
    client_id: &str,
    audience: &str,
    now: i64,
) -> Result<Secret, rsa::signature::Error> {
    use rsa::signature::{RandomizedSigner, SignatureEncoding};
    let header = json!({"alg": "PS256", "typ": "JWT", "x5t#S256": cert.x5t_s256});
    let claims = json!({
        "aud": audience,
        "iss": client_id,
        "sub": client_id,
        "jti": uuid::Uuid::now_v7().to_string(),
        "nbf": now,
        "iat": now,
        "exp": now + ASSERTION_LIFETIME_SECS,
    });
    // JWS compact form (RFC 7515 §7.1): base64url(header).base64url(claims).base64url(sig).
    let input = format!(
        "{}.{}",
        base64url(header.to_string()),
        base64url(claims.to_string())
    );
    let signature = cert
        .key
        .try_sign_with_rng(&mut rsa::rand_core::OsRng, input.as_bytes())?;
    Ok(Secret::from(format!(
        "{input}.{}",
        base64url(signature.to_bytes())
    )))
}

/// The token in a successful answer and how long it may be used: `access_token` must be a
/// visible-ASCII string (it becomes a header); `expires_in` (a number, or a string as v1 and
/// the managed-identity endpoints send it) is clamped to `[0, 24 h]`, 3599 when absent or
/// unreadable. A lifetime of 0 means "use once, then ask again".
pub(super) fn parse_issued(json: &Value) -> Result<Issued, String> {
    let value = json
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or("no access_token")?;
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the access_token holds characters a header cannot carry".into());
    }
    let seconds: f64 = match json.get("expires_in") {
        Some(Value::Number(n)) => n.as_f64().unwrap_or(3599.0),
        Some(Value::String(s)) => s.trim().parse().unwrap_or(3599.0),
        _ => 3599.0,
    };
    let max = MAX_TOKEN_LIFETIME.as_secs_f64();
    let clamped = if seconds.is_nan() {
        0.0
    } else {
        seconds.clamp(0.0, max)
    };
    Ok(Issued {
        value: value.to_string(),
        lifetime: Duration::from_secs(clamped as u64),
    })
}

/// Is this token answer an outage rather than a refusal? 5xx, 408, 410 (the instance
/// metadata endpoint while it updates), 429, or AAD's `temporarily_unavailable`.
pub(super) fn is_outage(status: StatusCode, error: &str) -> bool {
    let code = status.as_u16();
    code >= 500 || matches!(code, 408 | 410 | 429) || error == "temporarily_unavailable"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CredentialFile, Credentials};
    use std::path::Path;
    use std::process::Command;

    /// Runs openssl (installed by .ci/run; its absence fails the test) in `dir`.
    fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl must be installed (.ci/run installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Writes `key` + `cert.cer` as the credential file `app.pem` (0600) and loads it.
    fn load_certificate(d: &std::path::Path, key: &[u8]) -> Result<ClientCertificate, String> {
        use std::os::unix::fs::PermissionsExt;
        let cert_pem = std::fs::read(d.join("cert.cer")).unwrap();
        let file = d.join("app.pem");
        std::fs::write(&file, [key, &cert_pem].concat()).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        ClientCertificate::load(&CredentialFile::new(file, &Credentials::default()))
    }

    #[test]
    fn the_client_assertion_verifies_with_openssl_against_the_certificate() {
        use base64::Engine;
        use sha2::{Digest, Sha256};
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (pkcs8, _) = lrvault_sim::openssl_certificate(d, "cert").unwrap();
        // The same key as PKCS#8 ("PRIVATE KEY") and as PKCS#1 ("RSA PRIVATE KEY").
        let pkcs1 = openssl(d, &["rsa", "-in", "cert.key", "-traditional"]);
        assert!(pkcs1.starts_with(b"-----BEGIN RSA PRIVATE KEY-----"));
        let der = openssl(d, &["x509", "-in", "cert.cer", "-outform", "DER"]);
        std::fs::write(
            d.join("pub.pem"),
            openssl(d, &["x509", "-in", "cert.cer", "-pubkey", "-noout"]),
        )
        .unwrap();
        let aud = "https://login.microsoftonline.com/t-1/oauth2/v2.0/token";
        for key in [pkcs8.as_bytes(), &pkcs1] {
            let cert = load_certificate(d, key).unwrap();
            let jwt = client_assertion(&cert, "c-1", aud, 1_700_000_000).unwrap();
            let parts: Vec<&str> = jwt.expose_secret().split('.').collect();
            assert_eq!(parts.len(), 3);
            let part =
                |i: usize| serde_json::from_slice::<Value>(&b64.decode(parts[i]).unwrap()).unwrap();
            assert_eq!(
                part(0),
                json!({"alg": "PS256", "typ": "JWT", "x5t#S256": b64.encode(Sha256::digest(&der))})
            );
            let claims = part(1);
            let jti = claims["jti"].as_str().unwrap().to_string();
            assert_eq!(jti.len(), 36);
            assert_eq!(
                claims,
                json!({"aud": aud, "iss": "c-1", "sub": "c-1", "jti": jti,
                       "nbf": 1_700_000_000, "iat": 1_700_000_000, "exp": 1_700_000_600})
            );
            // The signature, checked by openssl against the certificate's public key.
            std::fs::write(d.join("input"), format!("{}.{}", parts[0], parts[1])).unwrap();
            std::fs::write(d.join("sig"), b64.decode(parts[2]).unwrap()).unwrap();
            let verified = openssl(
                d,
                &[
                    "dgst",
                    "-sha256",
                    "-sigopt",
                    "rsa_padding_mode:pss",
                    "-sigopt",
                    "rsa_pss_saltlen:auto",
                    "-verify",
                    "pub.pem",
                    "-signature",
                    "sig",
                    "input",
                ],
            );
            assert_eq!(String::from_utf8_lossy(&verified), "Verified OK\n");
            // A fresh assertion per request: a new jti each time.
            let again = client_assertion(&cert, "c-1", aud, 1_700_000_000).unwrap();
            assert_ne!(again.expose_secret(), jwt.expose_secret());
        }
    }

    #[test]
    fn a_private_key_that_is_not_rsa_is_refused_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        lrvault_sim::openssl_certificate(d, "cert").unwrap();
        let ec = openssl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ],
        );
        let err = load_certificate(d, &ec).err().unwrap();
        let file = d.join("app.pem");
        assert!(
            err.starts_with(&format!(
                "client_certificate_file {} holds a private key that is not an RSA key (",
                file.display()
            )),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn token_answers_are_clamped_and_checked_never_trusted() {
        let lifetime = |v: Value| {
            parse_issued(&json!({"access_token": "t", "expires_in": v}))
                .unwrap()
                .lifetime
        };
        assert_eq!(lifetime(json!(3599)), Duration::from_secs(3599));
        assert_eq!(lifetime(json!("3599")), Duration::from_secs(3599));
        assert_eq!(lifetime(json!(18446744073709551615u64)), MAX_TOKEN_LIFETIME);
        assert_eq!(lifetime(json!("18446744073709551615")), MAX_TOKEN_LIFETIME);
        assert_eq!(lifetime(json!(1e300)), MAX_TOKEN_LIFETIME);
        assert_eq!(lifetime(json!(-5)), Duration::ZERO);
        assert_eq!(lifetime(json!("-9223372036854775808")), Duration::ZERO);
        assert_eq!(lifetime(json!(12.7)), Duration::from_secs(12));
        assert_eq!(lifetime(json!("soon")), Duration::from_secs(3599));
        assert_eq!(lifetime(json!(null)), Duration::from_secs(3599));
        assert_eq!(lifetime(json!({"a": 1})), Duration::from_secs(3599));
        for bad in [
            json!({}),
            json!({"access_token": ""}),
            json!({"access_token": 7}),
            json!(null),
            json!([1]),
        ] {
            assert_eq!(parse_issued(&bad).unwrap_err(), "no access_token", "{bad}");
        }
        assert_eq!(
            parse_issued(&json!({"access_token": "a\r\nX-Evil: 1"})).unwrap_err(),
            "the access_token holds characters a header cannot carry"
        );
    }

    #[test]
    fn token_outages_are_told_from_refusals() {
        for code in [500, 502, 503, 504, 408, 410, 429] {
            assert!(
                is_outage(StatusCode::from_u16(code).unwrap(), "x"),
                "{code}"
            );
        }
        for code in [400, 401, 403, 404] {
            assert!(
                !is_outage(StatusCode::from_u16(code).unwrap(), "invalid_client"),
                "{code}"
            );
        }
        assert!(is_outage(
            StatusCode::BAD_REQUEST,
            "temporarily_unavailable"
        ));
    }
}
