//! HTTP side of the simulator (axum): routes, the request log, token and bearer checks, quota,
//! fault injection, SAS links and streamed blob bodies with Range support.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD};
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::Stream;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::blob::Blob;
use super::data::LinkKind;
use super::odata;
use super::{LoggedRequest, Simulator};

mod blob_host;
mod package_host;
mod signin;
use blob_host::*;
pub(crate) use signin::Registry;
pub use signin::{FEDERATED_ISSUER, openssl_certificate};

const CHUNK: u64 = 64 * 1024;
const SAS_VERSION: &str = "2019-07-07";
const BLOB_PREFIX: &str = "/blob/investigation-actions-data/";
const LINK_FUNCTION: &str = "GetLiveResponseResultDownloadLink(";

#[derive(Clone)]
pub(crate) struct App {
    sim: Simulator,
    local: SocketAddr,
    /// `http` or `https`: how the simulator's own links (blob, package) are written.
    scheme: &'static str,
}

/// The tenant a response belongs to, for the request log.
#[derive(Clone)]
struct TenantTag(String);

pub(crate) fn router(sim: Simulator, local: SocketAddr, scheme: &'static str) -> Router {
    let app = App { sim, local, scheme };
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .route(
            "/metadata/identity/oauth2/token",
            get(signin::managed_identity),
        )
        .route("/msi/token", get(signin::managed_identity))
        .route("/api/machineactions", get(list))
        .route("/api/machineactions/{id}", get(get_action))
        .route("/api/machineactions/{id}/{op}", get(action_op))
        .route("/blob/{*rest}", get(blob))
        .route("/safedownload/{*rest}", get(package_host::safedownload))
        .fallback(fallback)
        .layer(middleware::from_fn_with_state(app.clone(), log_requests))
        .with_state(app)
}

fn classify(path: &str) -> &'static str {
    if path.starts_with("/blob/") {
        return "blob";
    }
    if path.starts_with("/safedownload/") {
        return "package";
    }
    if path.ends_with("/oauth2/v2.0/token")
        || path == "/metadata/identity/oauth2/token"
        || path == "/msi/token"
    {
        return "token";
    }
    let Some(rest) = path.strip_prefix("/api/machineactions") else {
        return "other";
    };
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        [] => "list",
        [_] => "get",
        [_, op] if op.starts_with(LINK_FUNCTION) => "link",
        [_, op] if package_host::is_package_uri(op) => "packageuri",
        _ => "other",
    }
}

async fn log_requests(State(app): State<App>, req: Request, next: Next) -> Response {
    let at = Instant::now();
    let path = req.uri().path().to_string();
    let authorization = req.headers().contains_key(header::AUTHORIZATION);
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let endpoint = classify(&path);
    if matches!(endpoint, "link" | "packageuri") {
        let c = &app.sim.inner.counters;
        let open = c.open_bodies.load(Ordering::SeqCst);
        c.open_bodies_at_link.fetch_max(open, Ordering::SeqCst);
    }
    // During an outage the API and the token endpoint answer 503; the blob host does not.
    let mut resp = if app.sim.in_outage() && endpoint == "token" {
        let message = "AADSTS90033: A transient error has occurred. Please try again.";
        aad_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            90033,
            message,
        )
    } else if app.sim.in_outage() && endpoint != "blob" {
        let message = "The service is temporarily unavailable.";
        mde_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            message,
        )
    } else {
        next.run(req).await
    };
    // Every answer carries the simulator's clock (which may run off the host's).
    if let Ok(date) = HeaderValue::from_str(&http_date(app.sim.now())) {
        resp.headers_mut().insert(header::DATE, date);
    }
    app.sim.inner.record(LoggedRequest {
        at,
        tenant_id: resp.extensions().get::<TenantTag>().map(|t| t.0.clone()),
        endpoint,
        status: resp.status().as_u16(),
        authorization,
        path,
        range,
    });
    resp
}

fn tagged(mut resp: Response, tenant: &str) -> Response {
    resp.extensions_mut().insert(TenantTag(tenant.to_string()));
    resp
}

fn request_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Azure's timestamp style, 7 fractional digits (chrono has no `%.7f`).
fn now_7() -> String {
    let now = Utc::now();
    let secs = now.format("%Y-%m-%dT%H:%M:%S");
    format!("{secs}.{:07}Z", now.timestamp_subsec_nanos() / 100)
}

fn http_date(t: DateTime<Utc>) -> String {
    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

/// Takes the next sequence number of a counted fault.
fn next(counter: &AtomicUsize) -> usize {
    counter.fetch_add(1, Ordering::SeqCst)
}

/// MDE API error body.
fn mde_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"error": {"code": code, "message": message, "target": request_id()}});
    (status, axum::Json(body)).into_response()
}

/// The OData parser's own error shape.
fn odata_error(err: &odata::QueryError) -> Response {
    let body = json!({"error": {"code": "", "message": format!(
        "The query specified in the URI is not valid. {err}."), "details": []}});
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

fn too_many(retry_after: u64) -> Response {
    let mut resp = mde_error(
        StatusCode::TOO_MANY_REQUESTS,
        "TooManyRequests",
        "API calls quota exceeded! Maximum admitted 100 per Minute and 1500 per Hour.",
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    resp
}

fn unauthorized() -> Response {
    let mut resp = mde_error(
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        "Authorization has been denied for this request.",
    );
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// Entra ID (AAD) token endpoint error body.
fn aad_error(status: StatusCode, error: &str, code: u32, message: &str) -> Response {
    let trace = uuid::Uuid::now_v7();
    let correlation = uuid::Uuid::now_v7();
    let stamp = Utc::now().format("%Y-%m-%d %H:%M:%SZ");
    let body = json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {message}\r\nTrace ID: {trace}\r\nCorrelation ID: {correlation}\r\nTimestamp: {stamp}"),
        "error_codes": [code],
        "timestamp": stamp.to_string(),
        "trace_id": trace.to_string(),
        "correlation_id": correlation.to_string(),
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    (status, axum::Json(body)).into_response()
}

/// Azure Storage XML error body.
fn blob_error(status: StatusCode, code: &str, message: &str, detail: Option<&str>) -> Response {
    let rid = request_id();
    let detail = detail
        .map(|d| format!("<AuthenticationErrorDetail>{d}</AuthenticationErrorDetail>"))
        .unwrap_or_default();
    let body = format!(
        "\u{feff}<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>{code}</Code><Message>{message}\nRequestId:{rid}\nTime:{}</Message>{detail}</Error>",
        now_7()
    );
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/xml"),
    );
    insert(h, "x-ms-request-id", &rid);
    insert(h, "x-ms-version", SAS_VERSION);
    insert(h, "x-ms-error-code", code);
    resp
}

fn insert(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

/// When a link issued now expires: `link_ttl` from now, rounded up to the next whole second so
/// a link never lives shorter; already expired for the first `expired-links=N` links issued
/// (result and package links count together).
fn link_expiry(app: &App) -> DateTime<Utc> {
    let inner = &app.sim.inner;
    let now = app.sim.now();
    if next(&inner.counters.links_issued) < inner.plan.expired_links {
        now - chrono::Duration::minutes(10)
    } else {
        let ttl = inner.cfg.link_ttl + Duration::from_secs(1);
        now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX)
    }
}

/// `http(s)://host:port` as the client called it (Host header), else the bound address.
fn base_url(headers: &HeaderMap, app: &App) -> String {
    let scheme = app.scheme;
    match headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        Some(host) => format!("{scheme}://{host}"),
        None => format!("{scheme}://{}", app.local),
    }
}

/// Unknown routes: `/api/...` still needs a valid token first, like the real service.
async fn fallback(State(app): State<App>, headers: HeaderMap, uri: Uri) -> Response {
    if uri.path().starts_with("/api/") && app.authenticate(&headers).is_none() {
        return unauthorized();
    }
    not_found()
}

fn not_found() -> Response {
    mde_error(
        StatusCode::NOT_FOUND,
        "NotFound",
        "The requested resource was not found.",
    )
}

// ---------------------------------------------------------------------------------------------
// Token endpoint

async fn token(
    State(app): State<App>,
    Path(tenant_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let resp = issue_token(&app, &tenant_id, &headers, &body);
    tagged(resp, &tenant_id)
}

fn issue_token(app: &App, tenant_id: &str, headers: &HeaderMap, body: &[u8]) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    let Some(tenant) = app.sim.tenant(tenant_id).map(|t| t.tenant.clone()) else {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            &format!(
                "Tenant '{tenant_id}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
        );
    };
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return aad_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        );
    }
    match form.get("scope") {
        Some(scope) if scope.ends_with("/.default") => {}
        _ => {
            return aad_error(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                1002012,
                "The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier.",
            );
        }
    }
    // The secret may come in the form or as HTTP Basic.
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| BASE64.decode(b.trim()).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
        });
    let client_id = form
        .get("client_id")
        .cloned()
        .or_else(|| basic.as_ref().map(|b| b.0.clone()));
    let secret = form
        .get("client_secret")
        .cloned()
        .or_else(|| basic.as_ref().map(|b| b.1.clone()));
    if client_id.as_deref() != Some(tenant.client_id.as_str()) {
        return aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            700016,
            &format!(
                "Application with identifier '{}' was not found in the directory '{tenant_id}'.",
                client_id.unwrap_or_default()
            ),
        );
    }
    if form.contains_key("client_assertion_type") || form.contains_key("client_assertion") {
        if let Err((code, message)) =
            signin::check_assertion(app, tenant_id, &tenant.client_id, &form, headers)
        {
            return aad_error(StatusCode::UNAUTHORIZED, "invalid_client", code, &message);
        }
        return token_answer(app, tenant_id);
    }
    let Some(secret) = secret else {
        return aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        );
    };
    if !app.sim.accepts_secret(tenant_id, &secret) {
        return aad_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            &format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{}'.",
                tenant.client_id
            ),
        );
    }
    token_answer(app, tenant_id)
}

/// A new bearer token for the tenant, as the token endpoint answers it.
fn token_answer(app: &App, tenant_id: &str) -> Response {
    let (access_token, ttl) = mint_access_token(app, tenant_id);
    axum::Json(json!({
        "token_type": "Bearer",
        "expires_in": ttl.as_secs(),
        "ext_expires_in": ttl.as_secs(),
        "access_token": access_token,
    }))
    .into_response()
}

/// Issues a bearer token for the tenant's API, valid `token_ttl`.
fn mint_access_token(app: &App, tenant_id: &str) -> (String, Duration) {
    let mut raw = [0u8; 48];
    rand::fill(&mut raw[..]);
    let access_token = URL_SAFE_NO_PAD.encode(raw);
    let ttl = app.sim.inner.cfg.token_ttl;
    let now = Instant::now();
    let mut st = app.sim.inner.state();
    st.tokens.retain(|_, (_, exp)| *exp > now);
    st.tokens
        .insert(access_token.clone(), (tenant_id.to_string(), now + ttl));
    st.issued.push(access_token.clone());
    (access_token, ttl)
}

// ---------------------------------------------------------------------------------------------
// MDE API

impl App {
    /// The tenant of a valid, unexpired bearer token.
    fn authenticate(&self, headers: &HeaderMap) -> Option<String> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let token = value
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case("bearer "))
            .map(|_| value[7..].trim())?;
        let inner = &self.sim.inner;
        let mut st = inner.state();
        let tenant = st
            .tokens
            .get(token)
            .filter(|(_, exp)| *exp > Instant::now())
            .map(|(tenant, _)| tenant.clone())?;
        // `unauthorized=N`: the token is revoked under the client's feet.
        if next(&inner.counters.authenticated) < inner.plan.unauthorized {
            st.tokens.remove(token);
            return None;
        }
        Some(tenant)
    }

    /// Admits a request to the tenant's bucket or returns the seconds to wait.
    fn admit(&self, tenant: &str, endpoint: &'static str) -> Result<(), u64> {
        self.sim
            .inner
            .state()
            .quota
            .admit(tenant, endpoint, Instant::now())
    }

    fn action(&self, tenant: &str, id: &str) -> Option<&super::data::Action> {
        self.sim
            .tenant(tenant)
            .and_then(|t| t.actions.iter().find(|a| a.id.eq_ignore_ascii_case(id)))
    }
}

async fn list(State(app): State<App>, headers: HeaderMap, RawQuery(query): RawQuery) -> Response {
    let Some(tenant) = app.authenticate(&headers) else {
        return unauthorized();
    };
    let resp = list_actions(&app, &tenant, &headers, query.as_deref());
    tagged(resp, &tenant)
}

fn list_actions(app: &App, tenant: &str, headers: &HeaderMap, query: Option<&str>) -> Response {
    if let Err(wait) = app.admit(tenant, "list") {
        return too_many(wait);
    }
    if next(&app.sim.inner.counters.list) < app.sim.inner.plan.list_5xx {
        return mde_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError", "");
    }
    let q = match odata::parse_query(query) {
        Ok(q) => q,
        Err(e) => return odata_error(&e),
    };
    let value: Vec<Value> = app
        .sim
        .tenant(tenant)
        .map(|t| {
            t.actions
                .iter()
                .rev()
                .filter(|a| q.filter.iter().all(|c| c.matches(a)))
                .skip(q.skip)
                .take(q.top)
                .map(|a| a.list_entity.clone())
                .collect()
        })
        .unwrap_or_default();
    let base = base_url(headers, app);
    axum::Json(json!({
        "@odata.context": format!("{base}/api/$metadata#MachineActions"),
        "value": value,
    }))
    .into_response()
}

async fn get_action(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let Some(tenant) = app.authenticate(&headers) else {
        return unauthorized();
    };
    let resp = match app.admit(&tenant, "get") {
        Err(wait) => too_many(wait),
        Ok(()) => match app.action(&tenant, &id) {
            None => mde_error(
                StatusCode::NOT_FOUND,
                "ResourceNotFound",
                &format!("MachineAction {id} was not found"),
            ),
            Some(a) => {
                let mut entity = a.entity.clone();
                let base = base_url(&headers, &app);
                entity["@odata.context"] =
                    json!(format!("{base}/api/$metadata#MachineActions/$entity"));
                axum::Json(entity).into_response()
            }
        },
    };
    tagged(resp, &tenant)
}

async fn action_op(
    State(app): State<App>,
    headers: HeaderMap,
    Path((id, op)): Path<(String, String)>,
) -> Response {
    let Some(tenant) = app.authenticate(&headers) else {
        return unauthorized();
    };
    if package_host::is_package_uri(&op) {
        return tagged(
            package_host::package_uri(&app, &tenant, &headers, &id),
            &tenant,
        );
    }
    let Some(arg) = op.strip_prefix(LINK_FUNCTION) else {
        return tagged(not_found(), &tenant);
    };
    let resp = download_link(&app, &tenant, &headers, &id, arg);
    tagged(resp, &tenant)
}

fn download_link(app: &App, tenant: &str, headers: &HeaderMap, id: &str, arg: &str) -> Response {
    let inner = &app.sim.inner;
    let plan = &inner.plan;
    let k = next(&inner.counters.link);
    if k < plan.too_many {
        return too_many(1);
    }
    if let Err(wait) = app.admit(tenant, "link") {
        return too_many(wait);
    }
    if k < plan.too_many + plan.link_5xx {
        return mde_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError", "");
    }
    let index = arg
        .strip_suffix(')')
        .and_then(|a| a.trim().strip_prefix("index="))
        .and_then(|n| n.trim().parse::<usize>().ok());
    let Some(index) = index else {
        return mde_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("Invalid function argument '{arg}': expected index=<integer>)"),
        );
    };
    let Some(action) = app.action(tenant, id) else {
        return mde_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            &format!("MachineAction {id} was not found"),
        );
    };
    let Some(cmd) = action.commands.get(index) else {
        return mde_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            &format!("Command index {index} was not found in machine action {id}"),
        );
    };
    let Some(blob) = cmd.blob.as_ref() else {
        return mde_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!(
                "Command {index} ({}) of machine action {id} has no result: status {}",
                cmd.command_type, cmd.status
            ),
        );
    };
    let host = match cmd.link {
        LinkKind::Gone => {
            return mde_error(
                StatusCode::NOT_FOUND,
                "ResourceNotFound",
                &format!("Live response result {index} of machine action {id} was not found"),
            );
        }
        LinkKind::ForeignHost => "https://evil.example.net".to_string(),
        LinkKind::HttpLink => "http://blob.example.net".to_string(),
        LinkKind::Blob => format!("{}/blob", base_url(headers, app)),
    };
    let se = link_expiry(app).to_rfc3339_opts(SecondsFormat::Secs, true);
    let path = blob_path(&blob.action_id, &blob.name);
    let sig = sign(&inner.sas_key, &path, &se);
    let url = format!(
        "{host}{}?se={}&sp=r&sv={SAS_VERSION}&sr=b&sig={}",
        &path["/blob".len()..],
        enc(&se),
        enc(&sig)
    );
    let base = base_url(headers, app);
    axum::Json(json!({
        "@odata.context": format!("{base}/api/$metadata#Edm.String"),
        "value": url,
    }))
    .into_response()
}

fn blob_path(action_id: &str, name: &str) -> String {
    format!("{BLOB_PREFIX}{action_id}/CustomPlaybookCommandOutput/{name}")
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// HMAC-like signature over the blob path and expiry with the simulator's secret key.
fn sign(key: &[u8; 32], path: &str, se: &str) -> String {
    let mut h = Sha256::new();
    h.update(key);
    h.update(format!("r\n{se}\n{path}\n{SAS_VERSION}\nb").as_bytes());
    h.update(key);
    BASE64.encode(h.finalize())
}

// ---------------------------------------------------------------------------------------------
// Blob host

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_paths() {
        assert_eq!(classify("/t/oauth2/v2.0/token"), "token");
        assert_eq!(classify("/api/machineactions"), "list");
        assert_eq!(classify("/api/machineactions/abc"), "get");
        assert_eq!(
            classify("/api/machineactions/abc/GetLiveResponseResultDownloadLink(index=0)"),
            "link"
        );
        assert_eq!(classify("/api/machineactions/abc/cancel"), "other");
        assert_eq!(
            classify("/api/machineactions/abc/getPackageUri"),
            "packageuri"
        );
        assert_eq!(
            classify("/safedownload/WDATP_Investigation_Package.zip"),
            "package"
        );
        assert_eq!(classify("/blob/investigation-actions-data/a/b"), "blob");
        assert_eq!(classify("/nope"), "other");
    }

    #[test]
    fn storage_time_has_seven_digits() {
        let t = now_7();
        assert_eq!(t.len(), 28);
        assert!(DateTime::parse_from_rfc3339(&t).is_ok());
    }

    #[test]
    fn parses_ranges() {
        let mut h = HeaderMap::new();
        assert_eq!(parse_range(&h), None);
        h.insert(header::RANGE, HeaderValue::from_static("bytes=10-"));
        assert_eq!(parse_range(&h), Some((10, None)));
        h.insert(header::RANGE, HeaderValue::from_static("bytes=10-19"));
        assert_eq!(parse_range(&h), Some((10, Some(19))));
        h.insert("x-ms-range", HeaderValue::from_static("bytes=5-6"));
        assert_eq!(parse_range(&h), Some((5, Some(6))));
        h.remove("x-ms-range");
        h.insert(header::RANGE, HeaderValue::from_static("bytes=9-3"));
        assert_eq!(parse_range(&h), None);
    }

    #[test]
    fn signature_depends_on_path_and_expiry() {
        let key = [7u8; 32];
        let a = sign(&key, "/blob/x", "2026-01-01T00:00:00Z");
        assert_eq!(a, sign(&key, "/blob/x", "2026-01-01T00:00:00Z"));
        assert_ne!(a, sign(&key, "/blob/y", "2026-01-01T00:00:00Z"));
        assert_ne!(a, sign(&key, "/blob/x", "2026-01-01T00:00:01Z"));
    }
}
