//! The built-in MDE + blob simulator: a faithful local stand-in, on one loopback port, for the
//! Entra token endpoint, List/Get MachineActions, GetLiveResponseResultDownloadLink (with the
//! documented quota) and the Azure blob host behind the SAS links. Data are synthetic and
//! deterministic from the seed; `--fault` switches make chosen requests misbehave. Used by
//! `lrvault simulate`, `lrvault demo` and the tests.

mod blob;
mod data;
mod fault;
mod odata;
mod package;
mod quota;
mod server;
#[cfg(test)]
mod tests;
mod tls;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use blob::{Payload, PayloadKind};
pub use fault::{FAULT_NAMES, Fault};
pub use server::{FEDERATED_ISSUER, openssl_certificate};
pub use tls::TlsIdentity;

use blob::Blob;
use data::{LinkKind, Rng, TenantData, mix};
use fault::FaultPlan;
use quota::Quota;

/// How many requests `requests()` keeps (oldest dropped first); counts stay exact regardless.
const LOG_CAPACITY: usize = 200_000;

/// One simulated tenant with its app registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimTenant {
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: String,
}

impl SimTenant {
    /// The i-th default tenant: deterministic GUIDs and secret `sim-secret-{i}`.
    pub fn default_for(i: usize) -> SimTenant {
        let mut rng = Rng::new(mix(0x0051_577E_4A17_u64 ^ i as u64));
        SimTenant {
            tenant_id: rng.guid(),
            client_id: rng.guid(),
            client_secret: format!("sim-secret-{i}"),
        }
    }
}

/// Everything the simulator is built from.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// Live-response actions per tenant (a few non-live-response actions are added).
    pub actions: usize,
    pub tenants: Vec<SimTenant>,
    /// Anchor for creation times.
    pub now: DateTime<Utc>,
    /// Creation times spread over `[now - spread, now - 1 min]`.
    pub spread: Duration,
    pub per_minute: u32,
    pub per_hour: u32,
    pub minute: Duration,
    pub hour: Duration,
    pub token_ttl: Duration,
    pub link_ttl: Duration,
    /// Size cap for generated GetFile originals.
    pub max_getfile_size: u64,
    /// One extra action (first tenant only) with one GetFile of exactly this original size.
    pub big_getfile: Option<u64>,
    /// Extra GetFile results (first tenant only) of a chosen kind and size, raw (not
    /// gzip-wrapped), queued ahead of every other result; for benchmarks.
    pub payloads: Vec<Payload>,
    /// Investigation package collections per tenant (succeeded `CollectInvestigationPackage`
    /// actions whose getPackageUri links to a generated package zip).
    pub packages: usize,
    /// Bytes of files in each generated package (the zip adds its headers).
    pub package_size: u64,
    /// getPackageUri's own quota (MDE: 2 per minute and 120 per hour), over the same
    /// `minute` and `hour` windows as the other endpoints.
    pub package_per_minute: u32,
    pub package_per_hour: u32,
    /// Content-MD5 / x-ms-blob-content-md5 are sent only for blobs up to this size.
    pub md5_limit: u64,
    pub faults: Vec<Fault>,
    /// How far the simulator's clock runs off the host's (its `Date` headers and SAS
    /// expiry times), to test clock skew.
    pub clock_offset: chrono::Duration,
    /// When not empty, the `requestorComment` of the i-th live-response action of each tenant
    /// is `comments[i % len]` (tests of cases named in comments); otherwise a generated one.
    pub comments: Vec<String>,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            seed: 42,
            actions: 20,
            tenants: vec![SimTenant::default_for(0)],
            now: Utc::now(),
            spread: Duration::from_secs(2 * 24 * 3600),
            per_minute: 100,
            per_hour: 1500,
            minute: Duration::from_secs(60),
            hour: Duration::from_secs(3600),
            token_ttl: Duration::from_secs(3599),
            link_ttl: Duration::from_secs(30 * 60),
            max_getfile_size: 2 * 1024 * 1024,
            big_getfile: None,
            payloads: Vec::new(),
            packages: 0,
            package_size: 32 << 20,
            package_per_minute: 2,
            package_per_hour: 120,
            md5_limit: 256 * 1024 * 1024,
            faults: Vec::new(),
            clock_offset: chrono::Duration::zero(),
            comments: Vec::new(),
        }
    }
}

/// What an archiver should end up with for one command (one per command, results or not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedResult {
    pub action_id: String,
    pub index: u32,
    pub command_type: String,
    pub command_status: String,
    pub action_status: String,
    /// Completed, not PutFile, and not removed by a `gone` fault.
    pub has_result: bool,
    pub gone: bool,
    /// Of the blob bytes as served (filled for `gone` results too); 0 and empty strings when
    /// the command has no blob (PutFile, not Completed).
    pub size: u64,
    pub sha256: String,
    pub md5_base64: String,
    /// GetFile: of the gunzipped original.
    pub original_size: Option<u64>,
    pub original_sha256: Option<String>,
    /// The raw `ScriptName` (RunScript) or `Path` (GetFile); None for PutFile.
    pub original_name: Option<String>,
}

/// One request the simulator answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    pub at: Instant,
    pub tenant_id: Option<String>,
    /// `token` | `list` | `get` | `link` | `packageuri` | `blob` | `package` (a safedownload
    /// of an investigation package) | `other`.
    pub endpoint: &'static str,
    pub status: u16,
    /// Whether the request carried an `Authorization` header.
    pub authorization: bool,
    /// The path only, never the query (SAS queries are credentials).
    pub path: String,
    pub range: Option<String>,
}

/// The simulator; cheap to clone (shared state inside).
#[derive(Debug, Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: SimConfig,
    plan: FaultPlan,
    tenants: Vec<TenantData>,
    /// Blobs by their 32-hex name.
    blobs: HashMap<String, Arc<Blob>>,
    sas_key: [u8; 32],
    counters: Counters,
    state: Mutex<State>,
    /// While set, the token, List, Get and link endpoints answer 503 (an outage).
    outage: AtomicBool,
}

/// Sequence numbers for the counted faults.
#[derive(Debug, Default)]
struct Counters {
    link: AtomicUsize,
    list: AtomicUsize,
    blob: AtomicUsize,
    bodies: AtomicUsize,
    md5_headers: AtomicUsize,
    links_issued: AtomicUsize,
    /// getPackageUri requests, for the package faults.
    package_uri: AtomicUsize,
    authenticated: AtomicUsize,
    /// Blob bodies being sent now, and the most there ever were at once.
    open_bodies: AtomicUsize,
    peak_open_bodies: AtomicUsize,
    /// The most bodies that were open when a link (result or package) was asked for.
    open_bodies_at_link: AtomicUsize,
}

#[derive(Debug)]
struct State {
    /// access token -> (tenant id, expiry)
    tokens: HashMap<String, (String, Instant)>,
    quota: Quota,
    log: VecDeque<LoggedRequest>,
    status_counts: HashMap<u16, usize>,
    blob_with_authorization: usize,
    /// Every access token ever issued, in order.
    issued: Vec<String>,
    /// Every investigation package link's `token=` value, in order.
    package_tokens: Vec<String>,
    /// Client secrets each tenant's app accepts now (tenant id -> secrets); starts with the
    /// configured one. Entra allows several at once, which is how a secret is rotated.
    secrets: HashMap<String, Vec<String>>,
    /// Certificates, federated tokens and managed identities (`server::signin`).
    signin: server::Registry,
}

impl Simulator {
    /// Generates the synthetic tenants (no payload bytes are held; GetFile bodies are generated
    /// when served).
    pub fn new(cfg: SimConfig) -> Simulator {
        let plan = FaultPlan::new(&cfg.faults);
        let mut cfg = cfg;
        if let Some(secs) = plan.link_ttl {
            cfg.link_ttl = Duration::from_secs(secs);
        }
        if let Some(secs) = plan.token_ttl {
            cfg.token_ttl = Duration::from_secs(secs);
        }
        let tenants: Vec<TenantData> = cfg
            .tenants
            .iter()
            .enumerate()
            .map(|(i, t)| data::generate_tenant(&cfg, &plan, i, t))
            .collect();
        let blobs = tenants
            .iter()
            .flat_map(|t| t.actions.iter())
            .flat_map(|a| a.commands.iter())
            .filter_map(|c| c.blob.clone())
            .map(|b| (b.name.clone(), b))
            .collect();
        let mut key_rng = Rng::new(mix(cfg.seed ^ 0x5A5));
        let mut sas_key = [0u8; 32];
        for chunk in sas_key.chunks_mut(8) {
            chunk.copy_from_slice(&key_rng.next_u64().to_le_bytes());
        }
        let mut quota = Quota::new(cfg.per_minute, cfg.per_hour, cfg.minute, cfg.hour);
        quota.set_limits("packageuri", cfg.package_per_minute, cfg.package_per_hour);
        let secrets = cfg
            .tenants
            .iter()
            .map(|t| (t.tenant_id.clone(), vec![t.client_secret.clone()]))
            .collect();
        Simulator {
            inner: Arc::new(Inner {
                cfg,
                plan,
                tenants,
                blobs,
                sas_key,
                counters: Counters::default(),
                outage: AtomicBool::new(false),
                state: Mutex::new(State {
                    tokens: HashMap::new(),
                    quota,
                    log: VecDeque::new(),
                    status_counts: HashMap::new(),
                    blob_with_authorization: 0,
                    issued: Vec::new(),
                    package_tokens: Vec::new(),
                    secrets,
                    signin: server::Registry::default(),
                }),
            }),
        }
    }

    /// Serves on `listener`, over HTTPS when `tls` is given, until `shutdown` resolves (then
    /// finishes in-flight requests).
    pub async fn serve(
        self,
        listener: TcpListener,
        tls: Option<TlsIdentity>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let local = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let router = server::router(self, local, scheme);
        match tls {
            None => {
                axum::serve(listener, router)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
            Some(identity) => {
                axum::serve(tls::TlsListener::new(listener, &identity)?, router)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
        }
    }

    /// Binds `127.0.0.1:0` and serves plain HTTP in a background task.
    pub async fn start(self) -> std::io::Result<SimHandle> {
        self.start_with(None).await
    }

    /// Binds `127.0.0.1:0` and serves, over HTTPS when `tls` is given, in a background task.
    pub async fn start_with(self, tls: Option<TlsIdentity>) -> std::io::Result<SimHandle> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let mut handle = SimHandle {
            addr,
            sim: self,
            tls,
            shutdown: None,
            task: None,
        };
        handle.serve_on(listener);
        Ok(handle)
    }

    /// Starts (true) or ends an outage of the API and the token endpoint: they answer 503
    /// while it lasts; the blob host keeps serving.
    pub fn set_outage(&self, on: bool) {
        self.inner.outage.store(on, Ordering::SeqCst);
    }

    fn in_outage(&self) -> bool {
        self.inner.outage.load(Ordering::SeqCst)
    }

    /// Adds a client secret to a tenant's app registration (the old ones stay valid).
    pub fn add_client_secret(&self, tenant_id: &str, secret: &str) {
        let mut st = self.inner.state();
        st.secrets
            .entry(tenant_id.to_string())
            .or_default()
            .push(secret.to_string());
    }

    /// Deletes a client secret from a tenant's app registration.
    pub fn remove_client_secret(&self, tenant_id: &str, secret: &str) {
        let mut st = self.inner.state();
        if let Some(list) = st.secrets.get_mut(tenant_id) {
            list.retain(|s| s != secret);
        }
    }

    fn accepts_secret(&self, tenant_id: &str, secret: &str) -> bool {
        let st = self.inner.state();
        st.secrets
            .get(tenant_id)
            .is_some_and(|list| list.iter().any(|s| s == secret))
    }

    /// The simulator's clock: the host's, plus `clock_offset`.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.inner.cfg.clock_offset
    }

    /// The effective configuration (with `link-ttl` / `token-ttl` faults applied).
    pub fn config(&self) -> &SimConfig {
        &self.inner.cfg
    }

    pub fn tenants(&self) -> &[SimTenant] {
        &self.inner.cfg.tenants
    }

    fn tenant(&self, tenant_id: &str) -> Option<&TenantData> {
        self.inner
            .tenants
            .iter()
            .find(|t| t.tenant.tenant_id == tenant_id)
    }

    /// One entry per command of every action, actions by creation time (oldest first), then
    /// command index. Hashes are computed by streaming the generator once and cached, so the
    /// first call for a GiB blob takes a while.
    pub fn expected_results(&self, tenant_id: &str) -> Vec<ExpectedResult> {
        let Some(t) = self.tenant(tenant_id) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for a in &t.actions {
            for c in &a.commands {
                let gone = c.link == LinkKind::Gone;
                let digests = c.blob.as_ref().map(|b| (b.len(), b.digests()));
                out.push(ExpectedResult {
                    action_id: a.id.clone(),
                    index: c.index,
                    command_type: c.command_type.to_string(),
                    command_status: c.status.to_string(),
                    action_status: a.status.to_string(),
                    has_result: c.blob.is_some() && !gone,
                    gone,
                    size: digests.map_or(0, |(len, _)| len),
                    sha256: digests.map_or_else(String::new, |(_, d)| d.sha256.clone()),
                    md5_base64: digests.map_or_else(String::new, |(_, d)| d.md5_base64()),
                    original_size: digests.and_then(|(_, d)| d.original_size),
                    original_sha256: digests.and_then(|(_, d)| d.original_sha256.clone()),
                    original_name: c.original_name.clone(),
                });
            }
        }
        out
    }

    /// The action entities in Get form (`lastUpdateDateTimeUtc`, no `@odata.context`), oldest
    /// first, including the non-live-response ones.
    pub fn actions(&self, tenant_id: &str) -> Vec<serde_json::Value> {
        self.tenant(tenant_id)
            .map(|t| t.actions.iter().map(|a| a.entity.clone()).collect())
            .unwrap_or_default()
    }

    /// The most blob bodies this simulator was ever sending at the same time (from the first
    /// byte's request until the body ended or the client went away): the clients' concurrent
    /// transfers, counted on the server's side.
    pub fn peak_concurrent_blob_reads(&self) -> usize {
        self.inner.counters.peak_open_bodies.load(Ordering::SeqCst)
    }

    /// The most blob or package bodies that were being sent when a link call (result or
    /// package) arrived: a client that mints links only for a free transfer slot keeps this
    /// below its number of slots.
    pub fn open_bodies_at_link(&self) -> usize {
        self.inner
            .counters
            .open_bodies_at_link
            .load(Ordering::SeqCst)
    }

    /// Every investigation package link's `token=` value issued so far, so tests can prove
    /// that none leaked into logs, the DB or packages.
    pub fn package_tokens(&self) -> Vec<String> {
        self.inner.state().package_tokens.clone()
    }

    /// The most recent requests (up to 200 000), oldest first.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.inner.state().log.iter().cloned().collect()
    }

    /// How many responses had this status (exact, not limited by the log capacity).
    pub fn count_status(&self, status: u16) -> usize {
        self.inner
            .state()
            .status_counts
            .get(&status)
            .copied()
            .unwrap_or(0)
    }

    /// Blob requests that carried an `Authorization` header (a correct client sends none).
    pub fn blob_requests_with_authorization(&self) -> usize {
        self.inner.state().blob_with_authorization
    }

    /// Every access token issued so far (still valid or not), so tests can prove that none of
    /// them leaked into logs, the DB or packages.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.inner.state().issued.clone()
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters for a simulator, so keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, req: LoggedRequest) {
        let mut st = self.state();
        *st.status_counts.entry(req.status).or_default() += 1;
        if matches!(req.endpoint, "blob" | "package") && req.authorization {
            st.blob_with_authorization += 1;
        }
        if st.log.len() >= LOG_CAPACITY {
            st.log.pop_front();
        }
        st.log.push_back(req);
    }
}

/// A simulator serving on a loopback port; shuts down on `shutdown()` or when dropped.
#[derive(Debug)]
pub struct SimHandle {
    pub addr: SocketAddr,
    pub sim: Simulator,
    tls: Option<TlsIdentity>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl SimHandle {
    fn serve_on(&mut self, listener: TcpListener) {
        let (tx, rx) = oneshot::channel::<()>();
        self.shutdown = Some(tx);
        let tls = self.tls.clone();
        self.task = Some(tokio::spawn(self.sim.clone().serve(
            listener,
            tls,
            async move {
                let _ = rx.await;
            },
        )));
    }

    /// The whole host goes down: the port is closed (new connections are refused) and idle
    /// connections are closed; requests already running finish.
    pub async fn go_down(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            // The listener is dropped at once; only in-flight requests are waited for.
            tokio::spawn(task);
        }
    }

    /// Comes back up on the same port.
    pub async fn come_up(&mut self) -> std::io::Result<()> {
        let listener = TcpListener::bind(self.addr).await?;
        self.serve_on(listener);
        Ok(())
    }

    /// `http://127.0.0.1:PORT` (`https://` when serving TLS), usable as both `login_base`
    /// and `api_base`.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Stops accepting, waits up to 5 s for in-flight requests, then aborts the rest.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(Duration::from_secs(5), &mut task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) if join.is_cancelled() => Ok(()),
            Ok(Err(join)) => Err(std::io::Error::other(join)),
            Err(_) => {
                task.abort();
                Ok(())
            }
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
