//! The sign-in methods besides the client secret, checked for real: a client assertion
//! signed with a certificate registered on the tenant's app (signature, `x5t#S256`, `aud`,
//! `iss`/`sub`, `exp`/`nbf`), a federated token the simulator itself issued (workload
//! identity), and a managed-identity endpoint in both its instance-metadata form
//! (`Metadata: true`) and its `IDENTITY_ENDPOINT` form (`X-IDENTITY-HEADER`). The
//! `assertion-refused`, `federated-refused` and `managed-identity-refused` faults refuse the
//! first N requests of each kind.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hmac::{Hmac, Mac};
use rsa::RsaPublicKey;
use rsa::pkcs8::DecodePublicKey;
use rsa::signature::Verifier;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use x509_cert::der::{Decode, Encode};

use super::{App, URL_SAFE_NO_PAD, base_url, mint_access_token, next, tagged};
use crate::Simulator;

/// The issuer and audience of the federated tokens the simulator issues, as a Kubernetes
/// cluster's OIDC issuer would.
pub const FEDERATED_ISSUER: &str = "https://oidc.lrvault-sim.invalid";
const FEDERATED_AUDIENCE: &str = "api://AzureADTokenExchange";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Clock skew allowed on `exp` / `nbf`, as Entra allows.
const LEEWAY_SECS: i64 = 300;

/// Certificates registered on the apps, federated tokens issued, and the counted faults.
#[derive(Default)]
pub(crate) struct Registry {
    /// tenant id -> (x5t#S256 thumbprint, public key) of each registered certificate.
    certificates: HashMap<String, Vec<(String, RsaPublicKey)>>,
    /// Federated tokens issued and not revoked, with their tenant id.
    federated: HashMap<String, String>,
    assertions: AtomicUsize,
    federated_seen: AtomicUsize,
    managed: AtomicUsize,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field(
                "certificates",
                &self.certificates.values().map(Vec::len).sum::<usize>(),
            )
            .field("federated", &self.federated.len())
            .finish()
    }
}

impl Simulator {
    /// Uploads a certificate (PEM) to the tenant's app registration; returns its `x5t#S256`
    /// thumbprint. Several may be registered at once, which is how one is rotated.
    pub fn add_client_certificate(
        &self,
        tenant_id: &str,
        cert_pem: &str,
    ) -> Result<String, String> {
        let block = pem::parse(cert_pem).map_err(|e| e.to_string())?;
        if block.tag() != "CERTIFICATE" {
            return Err(format!("a {} block is not a certificate", block.tag()));
        }
        let key = rsa_public_key(block.contents())?;
        let thumbprint = URL_SAFE_NO_PAD.encode(Sha256::digest(block.contents()));
        let mut st = self.inner.state();
        st.signin
            .certificates
            .entry(tenant_id.to_string())
            .or_default()
            .push((thumbprint.clone(), key));
        Ok(thumbprint)
    }

    /// Deletes a certificate (by thumbprint) from the tenant's app registration.
    pub fn remove_client_certificate(&self, tenant_id: &str, thumbprint: &str) {
        let mut st = self.inner.state();
        if let Some(list) = st.signin.certificates.get_mut(tenant_id) {
            list.retain(|(t, _)| t != thumbprint);
        }
    }

    /// Issues a federated token for the tenant's app (as a cluster's token projection would),
    /// valid an hour; only tokens issued here and not revoked are accepted as assertions.
    pub fn issue_federated_token(&self, tenant_id: &str) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = json!({
            "iss": FEDERATED_ISSUER,
            "sub": "system:serviceaccount:lrvault:lrvault",
            "aud": FEDERATED_AUDIENCE,
            "tid": tenant_id,
            "jti": uuid::Uuid::now_v7().to_string(),
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(json!({"alg": "HS256", "typ": "JWT"}).to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = Hmac::<Sha256>::new_from_slice(&self.inner.sas_key)
            .expect("HMAC takes a key of any length")
            .chain_update(input.as_bytes())
            .finalize()
            .into_bytes();
        let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature));
        let mut st = self.inner.state();
        st.signin
            .federated
            .insert(token.clone(), tenant_id.to_string());
        token
    }

    /// Stops accepting a federated token (as when the cluster rotated it and it expired).
    pub fn revoke_federated_token(&self, token: &str) {
        self.inner.state().signin.federated.remove(token);
    }

    /// The `IDENTITY_HEADER` value its `IDENTITY_ENDPOINT` (`{base}/msi/token`) expects.
    pub fn identity_header(&self) -> String {
        format!("sim-identity-{:016x}", self.inner.cfg.seed)
    }

    /// Revokes every bearer token issued so far (the next API call answers 401, and the
    /// client signs in again with the credential it holds now).
    pub fn revoke_tokens(&self) {
        self.inner.state().tokens.clear();
    }
}

/// Checks a client assertion (certificate or federated) for the tenant's app: `Ok` when
/// it is accepted, else the AADSTS code and message of the refusal (401 invalid_client).
pub(super) fn check_assertion(
    app: &App,
    tenant_id: &str,
    client_id: &str,
    form: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<(), (u32, String)> {
    let refuse = |code: u32, message: &str| Err((code, message.to_string()));
    if form.get("client_assertion_type").map(String::as_str) != Some(ASSERTION_TYPE) {
        return refuse(700025, "Client assertion type is not supported.");
    }
    let Some(assertion) = form.get("client_assertion") else {
        return refuse(
            700027,
            "The request body must contain the parameter 'client_assertion'.",
        );
    };
    let Some(jws) = Jws::parse(assertion) else {
        return refuse(50027, "JWT token is invalid or malformed.");
    };
    let inner = &app.sim.inner;
    let Some(thumbprint) = jws.header["x5t#S256"].as_str() else {
        // No certificate thumbprint: a federated credential.
        if next(&inner.state().signin.federated_seen) < inner.plan.federated_refused {
            return refuse(
                700213,
                "No matching federated identity record found for presented assertion subject 'system:serviceaccount:lrvault:lrvault'.",
            );
        }
        return check_federated(app, tenant_id, &jws).or_else(|m| refuse(700211, &m));
    };
    if next(&inner.state().signin.assertions) < inner.plan.assertion_refused {
        return refuse(
            700027,
            "Client assertion failed signature validation. [Reason - The key used is expired.]",
        );
    }
    let alg = jws.header["alg"].as_str().unwrap_or_default();
    if !matches!(alg, "PS256" | "RS256") {
        return refuse(
            5002738,
            &format!("Invalid JWT token. '{alg}' is not a supported signature algorithm."),
        );
    }
    let key = {
        let st = inner.state();
        st.signin
            .certificates
            .get(tenant_id)
            .and_then(|list| list.iter().find(|(t, _)| t == thumbprint))
            .map(|(_, k)| k.clone())
    };
    let Some(key) = key else {
        return refuse(
            700027,
            &format!(
                "Client assertion failed signature validation. [Reason - The key was not found., Thumbprint of key used by client: '{thumbprint}']"
            ),
        );
    };
    if !jws.rsa_verifies(alg, key) {
        return refuse(700027, "Client assertion failed signature validation.");
    }
    // The token endpoint as the client called it, http or https.
    let audience = format!("{}/{tenant_id}/oauth2/v2.0/token", base_url(headers, app));
    match jws.check_claims(&audience, client_id, Some(client_id)) {
        Err(e @ Claim::Missing(_)) => refuse(
            700027,
            &format!("Client assertion failed signature validation: {e}."),
        ),
        Err(Claim::Time) => refuse(
            700024,
            "Client assertion is not within its valid time range.",
        ),
        Err(Claim::Audience) => refuse(
            700212,
            &format!("The client assertion's audience is not '{audience}'."),
        ),
        Err(Claim::Issuer) => refuse(
            700021,
            "Client assertion application identifier doesn't match 'client_id' parameter.",
        ),
        Ok(lifetime) if lifetime > 600 + LEEWAY_SECS => refuse(
            700024,
            "Client assertion is not within its valid time range: it is valid for more than 10 minutes.",
        ),
        Ok(_) => Ok(()),
    }
}

/// A federated assertion is accepted when the simulator issued it for this tenant, has not
/// revoked it, and it has not expired. (Being byte for byte a token it issued, its signature,
/// issuer and audience are the simulator's own.)
fn check_federated(app: &App, tenant_id: &str, jws: &Jws) -> Result<(), String> {
    let issued_for = app
        .sim
        .inner
        .state()
        .signin
        .federated
        .get(jws.token)
        .cloned();
    if issued_for.as_deref() != Some(tenant_id) {
        return Err(format!(
            "No matching federated identity record found for presented assertion issuer; trust only tokens issued by '{FEDERATED_ISSUER}'."
        ));
    }
    jws.check_claims(FEDERATED_AUDIENCE, FEDERATED_ISSUER, None)
        .map(drop)
        .map_err(|e| format!("The federated assertion is invalid: {e}."))
}

/// The RSA public key of a DER certificate.
fn rsa_public_key(der: &[u8]) -> Result<RsaPublicKey, String> {
    let cert = x509_cert::Certificate::from_der(der).map_err(|e| e.to_string())?;
    let spki = cert.tbs_certificate.subject_public_key_info.to_der();
    spki.map_err(|e| e.to_string())
        .and_then(|spki| RsaPublicKey::from_public_key_der(&spki).map_err(|e| e.to_string()))
        .map_err(|e| format!("the certificate's key is not an RSA key ({e})"))
}

/// A JWT in JWS compact form (RFC 7515 §7.1), split and decoded: `header.claims.signature`,
/// each base64url, the first two JSON objects.
struct Jws<'a> {
    token: &'a str,
    header: Value,
    claims: Value,
    /// `header.claims` as sent: what the signature covers.
    signing_input: &'a str,
    signature: Vec<u8>,
}

/// Why a JWT's claims were refused.
enum Claim {
    Missing(&'static str),
    /// Expired, or not valid yet (beyond [`LEEWAY_SECS`]).
    Time,
    Audience,
    /// `iss` or `sub`.
    Issuer,
}

impl std::fmt::Display for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Claim::Missing(name) => write!(f, "it has no '{name}' claim"),
            Claim::Time => f.write_str("it has expired or is not valid yet"),
            Claim::Audience => f.write_str("its audience is not the one expected"),
            Claim::Issuer => f.write_str("its issuer or subject is not the one expected"),
        }
    }
}

impl<'a> Jws<'a> {
    fn parse(token: &'a str) -> Option<Jws<'a>> {
        let (signing_input, signature) = token.rsplit_once('.')?;
        let (header, claims) = signing_input.split_once('.')?;
        let object = |part: &str| {
            let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
            serde_json::from_slice::<Value>(&bytes)
                .ok()
                .filter(Value::is_object)
        };
        Some(Jws {
            token,
            header: object(header)?,
            claims: object(claims)?,
            signing_input,
            signature: URL_SAFE_NO_PAD.decode(signature).ok()?,
        })
    }

    /// Whether the signature is `alg` (RS256 or PS256) by `key` over the signing input.
    fn rsa_verifies(&self, alg: &str, key: RsaPublicKey) -> bool {
        let input = self.signing_input.as_bytes();
        match alg {
            "RS256" => {
                rsa::pkcs1v15::Signature::try_from(self.signature.as_slice()).is_ok_and(|s| {
                    rsa::pkcs1v15::VerifyingKey::<Sha256>::new(key)
                        .verify(input, &s)
                        .is_ok()
                })
            }
            "PS256" => rsa::pss::Signature::try_from(self.signature.as_slice()).is_ok_and(|s| {
                rsa::pss::VerifyingKey::<Sha256>::new(key)
                    .verify(input, &s)
                    .is_ok()
            }),
            _ => false,
        }
    }

    /// Checks `exp` and `nbf` against now (with [`LEEWAY_SECS`]), `aud` (a string or a list
    /// holding `audience`), `iss`, and `sub` when given; returns the lifetime `exp - nbf`.
    fn check_claims(
        &self,
        audience: &str,
        issuer: &str,
        subject: Option<&str>,
    ) -> Result<i64, Claim> {
        let number = |name: &'static str| self.claims[name].as_i64().ok_or(Claim::Missing(name));
        let (exp, nbf) = (number("exp")?, number("nbf")?);
        let now = chrono::Utc::now().timestamp();
        if exp < now - LEEWAY_SECS || nbf > now + LEEWAY_SECS {
            return Err(Claim::Time);
        }
        let text = |name: &'static str| self.claims[name].as_str().ok_or(Claim::Missing(name));
        if text("iss")? != issuer || subject.is_some_and(|s| self.claims["sub"] != s) {
            return Err(Claim::Issuer);
        }
        let aud = &self.claims["aud"];
        let listed = |v: &Value| {
            v.as_array()
                .is_some_and(|a| a.iter().any(|x| x == audience))
        };
        if aud.is_null() {
            return Err(Claim::Missing("aud"));
        }
        if aud != audience && !listed(aud) {
            return Err(Claim::Audience);
        }
        Ok(exp - nbf)
    }
}

/// `GET /metadata/identity/oauth2/token` (instance metadata: `Metadata: true`) and
/// `GET /msi/token` (`IDENTITY_ENDPOINT`: `X-IDENTITY-HEADER`). The system-assigned
/// identity belongs to the first tenant; a user-assigned one is named by `client_id` and
/// is the tenant whose app has that client id.
pub(super) async fn managed_identity(
    State(app): State<App>,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let bad = |status: StatusCode, error: &str, description: &str| {
        (
            status,
            axum::Json(json!({"error": error, "error_description": description})),
        )
            .into_response()
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if uri.path() == "/msi/token" {
        if header("x-identity-header") != Some(app.sim.identity_header().as_str()) {
            return bad(
                StatusCode::UNAUTHORIZED,
                "unauthorized_client",
                "The X-IDENTITY-HEADER is missing or wrong.",
            );
        }
    } else if header("metadata") != Some("true") {
        return bad(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required metadata header not specified",
        );
    }
    let resource = query.get("resource").filter(|r| !r.is_empty());
    let Some(resource) = resource.cloned() else {
        return bad(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required query variable 'resource' is missing",
        );
    };
    let tenants = app.sim.tenants();
    let tenant = match query.get("client_id") {
        None => tenants.first(),
        Some(id) => tenants.iter().find(|t| &t.client_id == id),
    };
    let refused =
        next(&app.sim.inner.state().signin.managed) < app.sim.inner.plan.managed_identity_refused;
    let Some(tenant) = tenant.filter(|_| !refused) else {
        return bad(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Identity not found",
        );
    };
    let (token, ttl) = mint_access_token(&app, &tenant.tenant_id);
    let expires_on = chrono::Utc::now().timestamp() + ttl.as_secs() as i64;
    let body = json!({
        "access_token": token,
        "client_id": tenant.client_id,
        "expires_in": ttl.as_secs().to_string(),
        "expires_on": expires_on.to_string(),
        "ext_expires_in": ttl.as_secs().to_string(),
        "not_before": (expires_on - ttl.as_secs() as i64).to_string(),
        "resource": resource,
        "token_type": "Bearer",
    });
    tagged(axum::Json(body).into_response(), &tenant.tenant_id)
}

/// A new RSA key (PKCS#8 PEM) and its self-signed certificate (PEM), made in `dir` by
/// `openssl req -x509` as `{name}.key` and `{name}.cer`: test certificates for the tests of
/// the simulator and of lrvault. Fails when openssl is missing (`.ci/run` installs it).
pub fn openssl_certificate(dir: &std::path::Path, name: &str) -> Result<(String, String), String> {
    let (key, cert) = (format!("{name}.key"), format!("{name}.cer"));
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=lrvault-test", "-keyout", &key, "-out", &cert])
        .current_dir(dir)
        .output()
        .map_err(|e| format!("cannot run openssl (.ci/run installs it): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl req: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).map_err(|e| format!("{f}: {e}"));
    Ok((read(&key)?, read(&cert)?))
}
