//! The Defender for Endpoint API client for one tenant: a bearer token (cached; taken by the
//! tenant's sign-in method, see [`signin`]), List / Get MachineActions and
//! GetLiveResponseResultDownloadLink and an investigation package's getPackageUri. Every request
//! passes through the quota governor first. The bearer token only ever goes to `api_base`;
//! result downloads use a separate client (see `fetch`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::Value;
use url::Url;

use crate::config::{INVESTIGATION_PACKAGE, TenantConfig};
use crate::http::{RemoteClock, code_suffix, redact_reqwest};
use crate::quota::{Endpoint, Governor, LedgerError, parse_retry_after};

/// Whole-request timeout for API calls (the quota ledger's in-flight grace is longer).
const API_TIMEOUT: Duration = Duration::from_secs(100);
/// A 429 is retried after its Retry-After this many times before the call gives up.
const MAX_THROTTLE_RETRIES: u32 = 10;

mod signin;

#[derive(Debug, thiserror::Error)]
pub enum MdeError {
    #[error("{endpoint}: HTTP {status}{}{}", code_suffix(.code), msg_part(.message))]
    Http {
        endpoint: &'static str,
        status: u16,
        code: String,
        message: String,
    },
    #[error("{endpoint}: {message}")]
    Transport {
        endpoint: &'static str,
        message: String,
        timeout: bool,
    },
    /// The identity provider refused our credentials: the operator's to fix.
    #[error("token request refused (HTTP {status}): {error}{}; check {credential}", codes_part(.codes))]
    TokenRefused {
        status: u16,
        error: String,
        codes: Vec<i64>,
        /// What to check, naming where the credential came from (never its value).
        credential: String,
    },
    /// The token endpoint is down or overloaded: an outage, not a configuration problem.
    #[error(
        "token endpoint unavailable (HTTP {status}): {error}; an outage at the identity provider, not a configuration problem"
    )]
    TokenUnavailable { status: u16, error: String },
    #[error("{endpoint}: unexpected response: {message}")]
    Decode {
        endpoint: &'static str,
        message: String,
    },
    #[error("{endpoint}: still throttled (429) after {MAX_THROTTLE_RETRIES} retries")]
    Throttled { endpoint: &'static str },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The credential (secret, certificate, federated token) could not be read, or no
    /// assertion could be signed with it, when a token was needed.
    #[error(transparent)]
    Secret(crate::config::ConfigError),
    #[error("{endpoint}: the answer is larger than {cap} bytes; refusing to read it")]
    TooLarge { endpoint: &'static str, cap: usize },
}

/// Largest answer read from an endpoint (they are small JSON documents; a List page of
/// 10,000 actions is a few tens of MB). Bodies are never buffered beyond this.
fn body_cap(endpoint: Endpoint) -> usize {
    match endpoint {
        Endpoint::List => 128 << 20,
        Endpoint::Token | Endpoint::Get | Endpoint::Link | Endpoint::PackageUri => 4 << 20,
    }
}

/// Reads an answer's body within [`body_cap`].
async fn read_body(
    endpoint: Endpoint,
    response: reqwest::Response,
) -> Result<bytes::Bytes, MdeError> {
    let cap = body_cap(endpoint);
    crate::http::read_capped(response, cap)
        .await
        .map_err(|e| match e {
            crate::http::BodyError::TooLarge => MdeError::TooLarge {
                endpoint: endpoint.as_str(),
                cap,
            },
            crate::http::BodyError::Transport(e) => transport(endpoint, e),
        })
}

/// A token request that did not succeed: an outage ([`signin::is_outage`]) or a refusal of
/// our credentials (400/401 with AAD error codes; 400/404 from a managed-identity endpoint).
fn token_error(status: StatusCode, json: &Value, tenant: &TenantConfig) -> MdeError {
    let error = json
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("unknown error")
        .to_string();
    let code = status.as_u16();
    if signin::is_outage(status, &error) {
        return MdeError::TokenUnavailable {
            status: code,
            error,
        };
    }
    MdeError::TokenRefused {
        status: code,
        error,
        codes: json
            .get("error_codes")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default(),
        credential: tenant.sign_in.check_hint(),
    }
}

fn msg_part(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}
fn codes_part(codes: &[i64]) -> String {
    if codes.is_empty() {
        String::new()
    } else {
        format!(
            " (AADSTS {})",
            codes
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

impl MdeError {
    pub fn http_status(&self) -> Option<u16> {
        match self {
            MdeError::Http { status, .. }
            | MdeError::TokenRefused { status, .. }
            | MdeError::TokenUnavailable { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn api_code(&self) -> Option<&str> {
        match self {
            MdeError::Http { code, .. } if !code.is_empty() => Some(code),
            _ => None,
        }
    }
}

/// A machine action as the API returned it: the exact JSON text (kept as evidence) and a
/// tolerant view of the fields lrvault uses (every field optional, unknown values kept).
#[derive(Debug, Clone)]
pub struct RawAction {
    pub raw: String,
    pub value: Value,
}

/// A List window being read page by page (`$top` / `$skip`, one quota call per page);
/// actions are deduplicated by id across pages (paging shifts when actions are added).
pub struct ListPager<'a> {
    client: &'a MdeClient,
    /// One filter per collected action type, read one after the other; the pager is done
    /// when none is left.
    filters: std::collections::VecDeque<String>,
    page_size: u32,
    skip: u64,
    /// Ids seen so far (ids only, for deduplication).
    seen: std::collections::HashSet<String>,
    /// Pages (List calls) read so far.
    pub pages: u64,
}

impl ListPager<'_> {
    /// The next page's actions, or None after the last page.
    pub async fn next_page(&mut self) -> Result<Option<Vec<RawAction>>, MdeError> {
        let Some(filter) = self.filters.front() else {
            return Ok(None);
        };
        let endpoint = Endpoint::List;
        let mut url = self.client.url("/api/machineactions")?;
        url.query_pairs_mut()
            .append_pair("$filter", filter)
            .append_pair("$top", &self.page_size.to_string())
            .append_pair("$skip", &self.skip.to_string());
        let body = self.client.api_get(endpoint, url).await?;
        let page = parse_list_page(&body).map_err(|message| MdeError::Decode {
            endpoint: endpoint.as_str(),
            message,
        })?;
        self.pages += 1;
        let n = page.entries;
        for e in page.unreadable {
            tracing::warn!(tenant = %self.client.tenant.name, error = %e, "skipping an unreadable machine action in a List page");
        }
        let actions = page
            .actions
            .into_iter()
            .filter(|a| a.id().is_some_and(|id| self.seen.insert(id.to_string())))
            .collect();
        self.skip += n;
        if n < u64::from(self.page_size) || n == 0 {
            // This type's window is read; the next type's starts at its first page.
            self.filters.pop_front();
            self.skip = 0;
        }
        Ok(Some(actions))
    }
}

/// One entry of `commands[]`.
#[derive(Debug, Clone)]
pub struct ActionCommand {
    pub index: u32,
    pub command_type: Option<String>,
    pub status: Option<String>,
    pub params: Vec<(String, String)>,
    pub errors: Value,
    pub raw: Value,
}

impl RawAction {
    pub fn parse(raw: String) -> Result<RawAction, String> {
        let value: Value = serde_json::from_str(&raw).map_err(|e| e.to_string())?;
        if !value.is_object() {
            return Err("a machine action is not a JSON object".into());
        }
        Ok(RawAction { raw, value })
    }

    fn str_field(&self, names: &[&str]) -> Option<&str> {
        names
            .iter()
            .find_map(|n| self.value.get(*n).and_then(Value::as_str))
    }

    pub fn id(&self) -> Option<&str> {
        self.str_field(&["id"])
    }
    pub fn action_type(&self) -> Option<&str> {
        self.str_field(&["type"])
    }
    pub fn status(&self) -> Option<&str> {
        self.str_field(&["status"])
    }
    pub fn machine_id(&self) -> Option<&str> {
        self.str_field(&["machineId"])
    }
    pub fn computer_dns_name(&self) -> Option<&str> {
        self.str_field(&["computerDnsName"])
    }
    pub fn requestor(&self) -> Option<&str> {
        self.str_field(&["requestor"])
    }
    pub fn requestor_comment(&self) -> Option<&str> {
        self.str_field(&["requestorComment"])
    }
    pub fn created(&self) -> Option<DateTime<Utc>> {
        self.str_field(&["creationDateTimeUtc"])
            .and_then(crate::time::parse_api)
    }
    pub fn last_update(&self) -> Option<DateTime<Utc>> {
        // The docs spell it both ways.
        self.str_field(&["lastUpdateDateTimeUtc", "lastUpdateTimeUtc"])
            .and_then(crate::time::parse_api)
    }

    /// The parameters of one command, from its stored `commands[]` entry.
    pub fn command_params(command_json: &str) -> Vec<(String, String)> {
        let Ok(command) = serde_json::from_str::<Value>(command_json) else {
            return Vec::new();
        };
        let wrapper = RawAction {
            raw: String::new(),
            value: serde_json::json!({ "commands": [command] }),
        };
        wrapper
            .commands()
            .into_iter()
            .next()
            .map(|c| c.params)
            .unwrap_or_default()
    }

    /// The commands, in index order, each under an index of its own. The API's `index` is
    /// the link call's index and is kept where it is usable. A command without a numeric
    /// index, or repeating an earlier command's (see
    /// [`index_discrepancy`](Self::index_discrepancy)), takes its position in the list if no
    /// other command claims it, else the next index past the list; so every command is still
    /// a result of its own, and the link call tells whether it has one.
    pub fn commands(&self) -> Vec<ActionCommand> {
        if self.action_type() == Some(INVESTIGATION_PACKAGE) {
            return vec![self.package_command()];
        }
        let Some(list) = self.value.get("commands").and_then(Value::as_array) else {
            return vec![];
        };
        let mut claimed = std::collections::HashSet::new();
        let declared: Vec<Option<u32>> = list
            .iter()
            .map(|c| declared_index(c).filter(|i| claimed.insert(*i)))
            .collect();
        let mut next_free = list.len() as u32;
        let mut out: Vec<ActionCommand> = list
            .iter()
            .zip(declared)
            .enumerate()
            .map(|(pos, (c, declared))| {
                let index = declared.unwrap_or_else(|| {
                    if claimed.insert(pos as u32) {
                        return pos as u32;
                    }
                    while !claimed.insert(next_free) {
                        next_free += 1;
                    }
                    next_free
                });
                ActionCommand::from_json(index, c)
            })
            .collect();
        out.sort_by_key(|c| c.index);
        out
    }

    /// The one result of an investigation package collection (design.md §4): index 0, type
    /// [`PACKAGE_COMMAND`], `Completed` when the action succeeded (else the action's status).
    fn package_command(&self) -> ActionCommand {
        let status = match self.status() {
            Some("Succeeded") => Some("Completed"),
            other => other,
        };
        let raw = serde_json::json!({
            "index": 0,
            "commandStatus": status,
            "errors": [],
            "command": { "type": PACKAGE_COMMAND, "params": [] },
        });
        ActionCommand::from_json(0, &raw)
    }

    /// Why the commands' indexes cannot be trusted, if they cannot: a command without a
    /// numeric `index`, or two commands with the same one.
    pub fn index_discrepancy(&self) -> Option<String> {
        let list = self.value.get("commands").and_then(Value::as_array)?;
        let mut seen = std::collections::HashSet::new();
        for (pos, c) in list.iter().enumerate() {
            match declared_index(c) {
                None => {
                    let raw = c
                        .get("index")
                        .map_or("missing".to_string(), Value::to_string);
                    return Some(format!(
                        "command at position {pos} has no usable index ({raw})"
                    ));
                }
                Some(i) if !seen.insert(i) => {
                    return Some(format!("two commands have index {i}"));
                }
                Some(_) => {}
            }
        }
        None
    }
}

/// The command type of an investigation package's result (its action has no `commands`).
pub const PACKAGE_COMMAND: &str = "InvestigationPackage";

/// A command's `index` when it is a whole number that fits.
fn declared_index(command: &Value) -> Option<u32> {
    command
        .get("index")
        .and_then(Value::as_u64)
        .and_then(|i| u32::try_from(i).ok())
}

impl ActionCommand {
    fn from_json(index: u32, c: &Value) -> ActionCommand {
        let spec = c.get("command");
        let params = spec
            .and_then(|s| s.get("params"))
            .and_then(Value::as_array)
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| {
                        let key = p.get("key")?.as_str()?.to_string();
                        let value = match p.get("value")? {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        Some((key, value))
                    })
                    .collect()
            })
            .unwrap_or_default();
        ActionCommand {
            index,
            command_type: spec
                .and_then(|s| s.get("type"))
                .and_then(Value::as_str)
                .map(str::to_string),
            status: c
                .get("commandStatus")
                .and_then(Value::as_str)
                .map(str::to_string),
            params,
            errors: c.get("errors").cloned().unwrap_or(Value::Null),
            raw: c.clone(),
        }
    }
}

struct CachedToken {
    value: String,
    refresh_at: Instant,
}

/// API client for one tenant.
pub struct MdeClient {
    tenant: Arc<TenantConfig>,
    http: reqwest::Client,
    governor: Governor,
    /// Learns the servers' clock from every answer (see [`RemoteClock`]).
    clock: RemoteClock,
    api_base: Url,
    token: tokio::sync::Mutex<Option<CachedToken>>,
}

/// The HTTP client for the API and token calls, one per process and shared by every tenant's
/// [`MdeClient`]: its TLS set-up and connection pool are paid once, not per tenant. It never
/// follows a redirect (the bearer token must not go anywhere but the API host).
pub fn api_http() -> Result<reqwest::Client, MdeError> {
    crate::http::client_builder()
        .user_agent(concat!("lrvault/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(30))
        .timeout(API_TIMEOUT)
        .build()
        .map_err(|e| MdeError::Transport {
            endpoint: "client",
            message: e.to_string(),
            timeout: false,
        })
}

impl MdeClient {
    /// One tenant's client over the process's shared `http` ([`api_http`]).
    pub fn new(
        tenant: Arc<TenantConfig>,
        governor: Governor,
        clock: RemoteClock,
        http: reqwest::Client,
    ) -> Result<MdeClient, MdeError> {
        let api_base = tenant.api_base.clone();
        Ok(MdeClient {
            tenant,
            http,
            governor,
            clock,
            api_base,
            token: tokio::sync::Mutex::new(None),
        })
    }

    pub fn tenant(&self) -> &TenantConfig {
        &self.tenant
    }

    /// A valid bearer token, from the cache unless `refresh`.
    async fn bearer(&self, refresh: bool) -> Result<String, MdeError> {
        let mut cached = self.token.lock().await;
        if !refresh && let Some(t) = cached.as_ref().filter(|t| Instant::now() < t.refresh_at) {
            return Ok(t.value.clone());
        }
        let issued = self.request_token().await?;
        // Refresh five minutes early (or at half-life for short-lived tokens); the lifetime
        // is clamped to a day, so the sum cannot overflow.
        let margin = (issued.lifetime / 2).min(Duration::from_secs(300));
        let refresh_at = Instant::now() + (issued.lifetime - margin);
        *cached = Some(CachedToken {
            value: issued.value.clone(),
            refresh_at,
        });
        Ok(issued.value)
    }

    /// Gets (or reuses) a token: fails fast on refused credentials.
    pub async fn check_auth(&self) -> Result<(), MdeError> {
        self.bearer(false).await.map(|_| ())
    }

    /// GET an API URL through the quota governor: refreshes the token once on 401 and waits
    /// out 429s (pausing the bucket for Retry-After).
    async fn api_get(&self, endpoint: Endpoint, url: Url) -> Result<bytes::Bytes, MdeError> {
        let mut refreshed = false;
        loop {
            let token = self.bearer(false).await?;
            let response = self
                .send_counted(endpoint, || self.http.get(url.clone()).bearer_auth(&token))
                .await?;
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                refreshed = true;
                *self.token.lock().await = None;
                continue;
            }
            let body = read_body(endpoint, response).await?;
            if status.is_success() {
                return Ok(body);
            }
            return Err(api_error(endpoint, status, &body));
        }
    }

    /// Sends one request through the quota governor: a slot is reserved first and completed
    /// with the answer; a 429 pauses the bucket for Retry-After and the request is sent again
    /// (a bounded number of times).
    async fn send_counted(
        &self,
        endpoint: Endpoint,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, MdeError> {
        let mut throttled = 0;
        loop {
            let reservation = self.governor.acquire(&self.tenant.name, endpoint).await?;
            let response = match build().send().await {
                Ok(r) => r,
                Err(e) => {
                    self.governor.complete(reservation, 0, None).await?;
                    return Err(transport(endpoint, e));
                }
            };
            self.clock.observe(response.headers());
            let status = response.status();
            if status != StatusCode::TOO_MANY_REQUESTS {
                self.governor
                    .complete(reservation, status.as_u16(), None)
                    .await?;
                return Ok(response);
            }
            let pause = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, Utc::now()))
                .unwrap_or(Duration::from_secs(5));
            self.governor
                .complete(reservation, 429, Some(pause))
                .await?;
            throttled += 1;
            tracing::warn!(tenant = %self.tenant.name, endpoint = endpoint.as_str(), pause_ms = pause.as_millis() as u64, "throttled (429); pausing this endpoint");
            if throttled > MAX_THROTTLE_RETRIES {
                return Err(MdeError::Throttled {
                    endpoint: endpoint.as_str(),
                });
            }
        }
    }

    fn url(&self, path_and_query: &str) -> Result<Url, MdeError> {
        Url::parse(&format!(
            "{}{}",
            self.api_base.as_str().trim_end_matches('/'),
            path_and_query
        ))
        .map_err(|e| MdeError::Decode {
            endpoint: "url",
            message: e.to_string(),
        })
    }

    /// The actions of the tenant's `collect` types created in `[since, until)`, to be read
    /// page by page with [`ListPager::next_page`] (memory holds one page, never the whole
    /// window); one type after the other, since List's documented `$filter` joins clauses
    /// with `and` only.
    pub fn list_window(
        &self,
        since: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
        machine_id: Option<&str>,
        page_size: u32,
    ) -> Result<ListPager<'_>, MdeError> {
        let mut filter = format!(
            "creationDateTimeUtc ge {}",
            since.format("%Y-%m-%dT%H:%M:%SZ")
        );
        if let Some(until) = until {
            filter += &format!(
                " and creationDateTimeUtc lt {}",
                until.format("%Y-%m-%dT%H:%M:%SZ")
            );
        }
        if let Some(m) = machine_id {
            // Machine ids are hex; anything else could inject OData.
            if !m.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(MdeError::Decode {
                    endpoint: "list",
                    message: format!("invalid machine id '{m}'"),
                });
            }
            filter += &format!(" and machineId eq '{m}'");
        }
        let filters = self
            .tenant
            .collect
            .iter()
            .map(|t| format!("type eq '{t}' and {filter}"))
            .collect();
        Ok(ListPager {
            client: self,
            filters,
            page_size,
            skip: 0,
            seen: std::collections::HashSet::new(),
            pages: 0,
        })
    }

    /// One machine action by id.
    pub async fn get_action(&self, id: &str) -> Result<RawAction, MdeError> {
        let endpoint = Endpoint::Get;
        let url = self.url(&format!("/api/machineactions/{}", encode_segment(id)))?;
        let body = self.api_get(endpoint, url).await?;
        let text = String::from_utf8(body.to_vec()).map_err(|e| MdeError::Decode {
            endpoint: endpoint.as_str(),
            message: e.to_string(),
        })?;
        RawAction::parse(text).map_err(|message| MdeError::Decode {
            endpoint: endpoint.as_str(),
            message,
        })
    }

    /// A fresh SAS download link for command `index` of action `id` (valid ~30 minutes).
    pub async fn result_link(&self, id: &str, index: u32) -> Result<String, MdeError> {
        let endpoint = Endpoint::Link;
        let url = self.url(&format!(
            "/api/machineactions/{}/GetLiveResponseResultDownloadLink(index={index})",
            encode_segment(id)
        ))?;
        link_value(endpoint, &self.api_get(endpoint, url).await?)
    }

    /// A fresh link to the investigation package of action `id` (valid "for a short time";
    /// 404 while the collection is unfinished).
    pub async fn package_link(&self, id: &str) -> Result<String, MdeError> {
        let endpoint = Endpoint::PackageUri;
        let url = self.url(&format!(
            "/api/machineactions/{}/getPackageUri",
            encode_segment(id)
        ))?;
        link_value(endpoint, &self.api_get(endpoint, url).await?)
    }
}

/// The link in a link call's answer `{"value": "..."}`; getPackageUri wraps it in literal
/// quotes, which are trimmed.
fn link_value(endpoint: Endpoint, body: &[u8]) -> Result<String, MdeError> {
    let json: Value = serde_json::from_slice(body).map_err(|e| MdeError::Decode {
        endpoint: endpoint.as_str(),
        message: e.to_string(),
    })?;
    json.get("value")
        .and_then(Value::as_str)
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| MdeError::Decode {
            endpoint: endpoint.as_str(),
            message: "no link in 'value'".into(),
        })
}

/// One page of a List answer, read tolerantly.
#[derive(Debug)]
struct ListPage {
    /// Entries in `value` (readable or not), for paging.
    entries: u64,
    actions: Vec<RawAction>,
    /// Why each unreadable entry was skipped.
    unreadable: Vec<String>,
}

/// Parses a List page: unknown top-level fields are ignored, a missing or `null` `value` is an
/// empty page, and an entry that is not a JSON object is skipped (not the whole page). Only a
/// body that is not JSON, or a `value` that is not an array, is an error.
fn parse_list_page(body: &[u8]) -> Result<ListPage, String> {
    #[derive(serde::Deserialize)]
    struct Page<'a> {
        #[serde(borrow, default)]
        value: Option<Vec<&'a serde_json::value::RawValue>>,
    }
    let page: Page<'_> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let value = page.value.unwrap_or_default();
    let mut out = ListPage {
        entries: value.len() as u64,
        actions: Vec::new(),
        unreadable: Vec::new(),
    };
    for raw in value {
        match RawAction::parse(raw.get().to_string()) {
            Ok(a) => out.actions.push(a),
            Err(e) => out.unreadable.push(e),
        }
    }
    Ok(out)
}

fn encode_segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// A transport error without its URL (download URLs carry a SAS signature).
pub fn transport(endpoint: Endpoint, e: reqwest::Error) -> MdeError {
    MdeError::Transport {
        endpoint: endpoint.as_str(),
        timeout: e.is_timeout(),
        message: redact_reqwest(e),
    }
}

/// The MDE error body `{"error":{"code","message","target"}}`, parsed leniently.
fn api_error(endpoint: Endpoint, status: StatusCode, body: &[u8]) -> MdeError {
    let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let err = json.get("error");
    let field = |k: &str| {
        err.and_then(|e| e.get(k))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let mut message = field("message");
    message.truncate(300);
    MdeError::Http {
        endpoint: endpoint.as_str(),
        status: status.as_u16(),
        code: field("code"),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_pages_with_odd_fields_still_parse() {
        let page = parse_list_page(
            br#"{"@odata.context":"x","@odata.nextLink":7,"surprise":[1,2],
                 "value":[{"id":"a","type":"LiveResponse","newField":{"x":null}},
                          {"id":"b"},
                          "not an object",
                          {"type":"LiveResponse","status":null,"commands":"not a list"}]}"#,
        )
        .unwrap();
        assert_eq!(page.entries, 4);
        let ids: Vec<Option<&str>> = page.actions.iter().map(RawAction::id).collect();
        assert_eq!(ids, vec![Some("a"), Some("b"), None]);
        assert_eq!(
            page.unreadable,
            vec!["a machine action is not a JSON object"]
        );
        // Missing fields read as None, never as a failure.
        let b = &page.actions[1];
        assert_eq!(
            (b.status(), b.machine_id(), b.requestor(), b.created()),
            (None, None, None, None)
        );
        assert!(b.commands().is_empty());
        assert!(page.actions[2].commands().is_empty());
        assert_eq!(page.actions[2].status(), None);

        for empty in [&br#"{}"#[..], br#"{"value":null}"#, br#"{"value":[]}"#] {
            let p = parse_list_page(empty).unwrap();
            assert_eq!((p.entries, p.actions.len()), (0, 0));
        }
        assert!(parse_list_page(br#"{"value":{"id":"a"}}"#).is_err());
        assert!(parse_list_page(b"<html>oops</html>").is_err());
    }

    #[test]
    fn get_answers_with_odd_fields_still_parse() {
        let a = RawAction::parse(
            r#"{"@odata.context":"x","id":"c","type":7,"status":"SomethingNew","creationDateTimeUtc":"not a date",
                "commands":[{"index":"0","command":{"type":"GetFile","params":[{"key":"Path","value":5},{"value":"no key"}]}},
                            {"index":1,"commandStatus":"Completed","command":null}]}"#
                .into(),
        )
        .unwrap();
        assert_eq!(a.id(), Some("c"));
        assert_eq!(a.action_type(), None, "a number is not a type name");
        assert_eq!(a.status(), Some("SomethingNew"));
        assert_eq!(a.created(), None);
        let cmds = a.commands();
        assert_eq!(cmds.len(), 2);
        assert_eq!(
            (cmds[0].index, cmds[0].command_type.as_deref()),
            (0, Some("GetFile"))
        );
        assert_eq!(cmds[0].params, vec![("Path".to_string(), "5".to_string())]);
        assert_eq!(cmds[0].status, None);
        assert_eq!((cmds[1].index, cmds[1].command_type.as_deref()), (1, None));
        assert_eq!(cmds[1].status.as_deref(), Some("Completed"));
    }

    #[test]
    fn inconsistent_command_indexes_still_give_every_command_its_own_result() {
        let a = RawAction::parse(
            r#"{"id":"d","commands":[
                {"index":0,"command":{"type":"RunScript"}},
                {"index":0,"command":{"type":"GetFile"}},
                {"index":"2","command":{"type":"PutFile"}},
                {"command":{"type":"GetFile"}},
                {"index":1,"command":{"type":"RunScript"}}]}"#
                .into(),
        )
        .unwrap();
        assert_eq!(
            a.index_discrepancy().as_deref(),
            Some("two commands have index 0")
        );
        let got: Vec<(u32, String)> = a
            .commands()
            .into_iter()
            .map(|c| (c.index, c.command_type.unwrap_or_default()))
            .collect();
        let want = |i: u32, t: &str| (i, t.to_string());
        // Declared 0 and 1 kept; the repeated 0 takes no free position (1 is claimed) -> 5;
        // "2" (a string) takes its position 2; the missing one its position 3.
        assert_eq!(
            got,
            vec![
                want(0, "RunScript"),
                want(1, "RunScript"),
                want(2, "PutFile"),
                want(3, "GetFile"),
                want(5, "GetFile")
            ]
        );
        let ok = RawAction::parse(r#"{"commands":[{"index":1},{"index":0}]}"#.into()).unwrap();
        assert_eq!(ok.index_discrepancy(), None);
    }

    #[test]
    fn tolerant_action_view() {
        let a = RawAction::parse(
            r#"{"id":"x","type":"LiveResponse","status":"Failed","lastUpdateTimeUtc":"2025-03-10T08:19:41.07Z",
               "creationDateTimeUtc":"2025-03-10T08:14:03.5512346Z","futureField":{"a":1},
               "commands":[{"index":1,"commandStatus":"Failed","errors":["nope"],"command":{"type":"GetFile","params":[{"key":"Path","value":"C:\\x.txt"}]}},
                           {"index":0,"commandStatus":"Completed","command":{"type":"RunScript","params":[{"key":"ScriptName","value":"a.ps1"}]}},
                           {"commandStatus":"Weird","command":{"type":"NewType"}}]}"#
                .into(),
        )
        .unwrap();
        assert_eq!(
            crate::time::fmt(a.last_update().unwrap()),
            "2025-03-10T08:19:41.070Z"
        );
        assert_eq!(
            crate::time::fmt(a.created().unwrap()),
            "2025-03-10T08:14:03.551Z"
        );
        let cmds = a.commands();
        assert_eq!(
            cmds.iter().map(|c| c.index).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(
            cmds[1].params,
            vec![("Path".to_string(), "C:\\x.txt".to_string())]
        );
        assert_eq!(cmds[2].command_type.as_deref(), Some("NewType"));
        assert_eq!(cmds[2].status.as_deref(), Some("Weird"));
        assert!(RawAction::parse("[1]".into()).is_err());
    }

    #[test]
    fn an_investigation_package_is_one_result_and_its_quoted_link_is_trimmed() {
        let a = RawAction::parse(
            r#"{"id":"e","type":"CollectInvestigationPackage","status":"Succeeded","commands":[]}"#
                .into(),
        )
        .unwrap();
        let cmds = a.commands();
        assert_eq!(cmds.len(), 1);
        assert_eq!(
            (
                cmds[0].index,
                cmds[0].command_type.as_deref(),
                cmds[0].status.as_deref()
            ),
            (0, Some(PACKAGE_COMMAND), Some("Completed"))
        );
        let failed = RawAction::parse(
            r#"{"id":"f","type":"CollectInvestigationPackage","status":"Failed"}"#.into(),
        )
        .unwrap();
        assert_eq!(failed.commands()[0].status.as_deref(), Some("Failed"));
        let body = br#"{"@odata.context":"x","value":"\"https://userrequests-us.securitycenter.windows.com:443/safedownload/WDATP_Investigation_Package.zip?token=abc\""}"#;
        assert_eq!(
            link_value(Endpoint::PackageUri, body).unwrap(),
            "https://userrequests-us.securitycenter.windows.com:443/safedownload/WDATP_Investigation_Package.zip?token=abc"
        );
        assert!(link_value(Endpoint::PackageUri, br#"{"value":"\"\""}"#).is_err());
    }
}
