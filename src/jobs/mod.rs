//! The work lrvault does, each usable from the CLI, the daemon and the tests: `discover`
//! (find finished actions and queue their commands), `archive` (turn queued results into
//! evidence packages) and `backfill` (a past window, to the end); `failure` decides who pays
//! for what went wrong. [`Context`] is what they share within one process.

pub mod archive;
pub mod backfill;
pub mod breaker;
pub mod discover;
pub mod failure;
pub mod transfers;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, TenantConfig};
use crate::db::Db;
use crate::fetch::Allowlist;
use crate::http::RemoteClock;
use crate::mde::MdeClient;
use crate::quota::Governor;
use crate::store::Store;

/// Everything a job needs, shared by all tenants of one process.
pub struct Context {
    pub cfg: Arc<Config>,
    pub db: Db,
    pub governor: Governor,
    pub blob: reqwest::Client,
    /// The API and token calls' HTTP client, shared by every tenant.
    pub api: reqwest::Client,
    /// The servers' clock, learned from every answer (link expiry is judged by it).
    pub clock: RemoteClock,
    pub cancel: CancellationToken,
    /// Identifies this process in result leases: host, pid and a per-start token.
    pub owner: String,
    /// Set once this process has swept the store for orphaned partial files.
    pub partials_swept: AtomicBool,
    /// Where packages and checkpoints go (docs/evidence-format.md, §7b); one per process.
    pub store: Arc<Store>,
    /// Opens when the object store fails (unreachable, refusing): archive passes start no
    /// result while it is open, and one probe per interval tests the store again.
    pub store_breaker: breaker::Breaker,
    /// `download.concurrency` transfers for the whole process, handed to tenants in turn.
    pub transfers: transfers::Transfers,
    /// The threads that write and hash packages, sized from `download.concurrency`.
    pub package_threads: crate::package::PackageThreads,
}

/// One tenant's client, identity and breaker.
pub struct Tenant {
    pub cfg: Arc<TenantConfig>,
    pub client: MdeClient,
    pub actor: String,
    pub allow: Allowlist,
    /// Opens on a tenant-scope failure; paces the probes while the tenant's side is down.
    pub breaker: breaker::Breaker,
}

impl Context {
    /// A context with the store `cfg.store` names (no network I/O yet).
    pub fn new(cfg: Arc<Config>, db: Db, cancel: CancellationToken) -> anyhow::Result<Context> {
        let store = Arc::new(Store::open(&cfg.store, &cfg.credentials)?);
        Context::with_store(cfg, db, cancel, store)
    }

    /// A context with a store opened by the caller (tests give it their own credentials).
    pub fn with_store(
        cfg: Arc<Config>,
        db: Db,
        cancel: CancellationToken,
        store: Arc<Store>,
    ) -> anyhow::Result<Context> {
        let governor = Governor::new(db.clone(), cfg.quota.clone());
        let blob = crate::fetch::blob_client(cfg.download.read_timeout)?;
        let api = crate::mde::api_http()?;
        let store_breaker = breaker::Breaker::new(cfg.download.retry_base, cfg.download.retry_max);
        let transfers =
            transfers::Transfers::new(cfg.download.concurrency, cfg.download.per_tenant);
        let package_threads =
            crate::package::PackageThreads::for_transfers(cfg.download.concurrency);
        Ok(Context {
            cfg,
            db,
            governor,
            blob,
            api,
            clock: RemoteClock::default(),
            cancel,
            owner: crate::queue::process_owner(),
            partials_swept: AtomicBool::new(false),
            store,
            store_breaker,
            transfers,
            package_threads,
        })
    }

    /// With `require_worm` (docs/operations.md §14): proves the store enforces retention, or refuses
    /// with one line (exit 2). Writing commands and the daemon call it before any work.
    pub async fn check_worm(&self) -> anyhow::Result<Option<crate::store::WormStatus>> {
        if !self.cfg.store.worm_required() {
            return Ok(None);
        }
        let status = self.store.check_worm().await?;
        tracing::info!(store = %self.store.describe(), worm = %status, "the store enforces retention");
        Ok(Some(status))
    }

    /// Builds the clients of the selected tenants (reading their credentials).
    pub fn tenants(&self, name: Option<&str>) -> anyhow::Result<Vec<Tenant>> {
        let mut out = Vec::new();
        for t in self.cfg.select_tenants(name)? {
            // Read now so a missing or unreadable credential stops the command at once (exit 2);
            // the client reads it again at every token refresh (rotation needs no restart).
            t.check_credential()?;
            let cfg = Arc::new(t.clone());
            out.push(Tenant {
                client: MdeClient::new(
                    cfg.clone(),
                    self.governor.clone(),
                    self.clock.clone(),
                    self.api.clone(),
                )?,
                actor: crate::custody::actor(&t.client_id),
                allow: Allowlist::new(&t.download_hosts),
                breaker: breaker::Breaker::new(
                    self.cfg.download.retry_base,
                    self.cfg.download.retry_max,
                ),
                cfg,
            });
        }
        Ok(out)
    }
}

/// Records the start / end of a job run for `status`.
pub async fn record_job_run(
    db: &Db,
    job: &'static str,
    tenant: &str,
    started_at: String,
    ok: bool,
    summary: String,
) {
    let tenant = tenant.to_string();
    let res = db
        .call(move |c| {
            c.execute(
                "INSERT INTO job_runs (job, tenant, started_at, finished_at, ok, summary) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (job, tenant) DO UPDATE SET started_at = excluded.started_at,
                   finished_at = excluded.finished_at, ok = excluded.ok, summary = excluded.summary",
                rusqlite::params![job, tenant, started_at, crate::time::now_str(), ok, summary],
            )
            .map_err(crate::db::DbError::sql("record job run"))?;
            Ok(())
        })
        .await;
    if let Err(e) = res {
        tracing::warn!(job, error = %e, "could not record the job run");
    }
}
