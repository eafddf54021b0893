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
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{App, URL_SAFE_NO_PAD, base_url, mint_access_token, next, tagged};
use crate::Simulator;

/// The issuer and audience of the federated tokens the simulator issues, as a Kubernetes
/// cluster's OIDC issuer would.
pub const FEDERATED_ISSUER: &str = "https://oidc.lrvault-sim.invalid";
const FEDERATED_AUDIENCE: &str = "api://AzureADTokenExchange";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Clock skew allowed on `exp` / `nbf`, as Entra allows.
const LEEWAY_SECS: u64 = 300;

/// Certificates registered on the apps, federated tokens issued, and the counted faults.
#[derive(Default)]
pub(crate) struct Registry {
    /// tenant id -> (x5t#S256 thumbprint, public key) of each registered certificate.
    certificates: HashMap<String, Vec<(String, DecodingKey)>>,
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
        let key = DecodingKey::from_rsa_pem(cert_pem.as_bytes()).map_err(|e| e.to_string())?;
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
        let key = jsonwebtoken::EncodingKey::from_secret(&self.inner.sas_key);
        let token = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key)
            .expect("HS256 signing cannot fail");
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
    let Ok(head) = jsonwebtoken::decode_header(assertion) else {
        return refuse(50027, "JWT token is invalid or malformed.");
    };
    let inner = &app.sim.inner;
    let Some(thumbprint) = head.x5t_s256.clone() else {
        // No certificate thumbprint: a federated credential.
        if next(&inner.state().signin.federated_seen) < inner.plan.federated_refused {
            return refuse(
                700213,
                "No matching federated identity record found for presented assertion subject 'system:serviceaccount:lrvault:lrvault'.",
            );
        }
        return check_federated(app, tenant_id, assertion).or_else(|m| refuse(700211, &m));
    };
    if next(&inner.state().signin.assertions) < inner.plan.assertion_refused {
        return refuse(
            700027,
            "Client assertion failed signature validation. [Reason - The key used is expired.]",
        );
    }
    if !matches!(head.alg, Algorithm::PS256 | Algorithm::RS256) {
        return refuse(
            5002738,
            &format!(
                "Invalid JWT token. '{:?}' is not a supported signature algorithm.",
                head.alg
            ),
        );
    }
    let key = {
        let st = inner.state();
        st.signin
            .certificates
            .get(tenant_id)
            .and_then(|list| list.iter().find(|(t, _)| *t == thumbprint))
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
    // The token endpoint as the client called it, http or https.
    let audience = format!("{}/{tenant_id}/oauth2/v2.0/token", base_url(headers, app));
    let mut rules = Validation::new(head.alg);
    rules.leeway = LEEWAY_SECS;
    rules.validate_nbf = true;
    rules.set_audience(&[audience.as_str()]);
    rules.set_issuer(&[client_id]);
    rules.sub = Some(client_id.to_string());
    rules.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
    match jsonwebtoken::decode::<Value>(assertion, &key, &rules) {
        Ok(data) => {
            let lifetime =
                data.claims["exp"].as_i64().unwrap_or(0) - data.claims["nbf"].as_i64().unwrap_or(0);
            if lifetime > 600 + LEEWAY_SECS as i64 {
                return refuse(
                    700024,
                    "Client assertion is not within its valid time range: it is valid for more than 10 minutes.",
                );
            }
            Ok(())
        }
        Err(e) => {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature | K::ImmatureSignature => refuse(
                    700024,
                    "Client assertion is not within its valid time range.",
                ),
                K::InvalidAudience => refuse(
                    700212,
                    &format!("The client assertion's audience is not '{audience}'."),
                ),
                K::InvalidIssuer | K::InvalidSubject => refuse(
                    700021,
                    "Client assertion application identifier doesn't match 'client_id' parameter.",
                ),
                _ => refuse(700027, "Client assertion failed signature validation."),
            }
        }
    }
}

/// A federated assertion is accepted when the simulator issued it for this tenant, has not
/// revoked it, and it verifies (signature, issuer, audience, time).
fn check_federated(app: &App, tenant_id: &str, assertion: &str) -> Result<(), String> {
    let issued_for = app
        .sim
        .inner
        .state()
        .signin
        .federated
        .get(assertion)
        .cloned();
    if issued_for.as_deref() != Some(tenant_id) {
        return Err(format!(
            "No matching federated identity record found for presented assertion issuer; trust only tokens issued by '{FEDERATED_ISSUER}'."
        ));
    }
    let mut rules = Validation::new(Algorithm::HS256);
    rules.set_audience(&[FEDERATED_AUDIENCE]);
    rules.set_issuer(&[FEDERATED_ISSUER]);
    let key = DecodingKey::from_secret(&app.sim.inner.sas_key);
    jsonwebtoken::decode::<Value>(assertion, &key, &rules)
        .map(drop)
        .map_err(|e| format!("The federated assertion is invalid: {e}."))
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
