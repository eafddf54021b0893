//! The work lrvault does, each usable from the CLI, the daemon and the tests: `discover`
//! (find finished actions and queue their commands) and `archive` (turn queued results into
//! evidence packages).

pub mod archive;
pub mod backfill;
pub mod discover;

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, TenantConfig};
use crate::db::Db;
use crate::fetch::Allowlist;
use crate::mde::MdeClient;
use crate::quota::Governor;

/// Everything a job needs, shared by all tenants of one process.
pub struct Context {
    pub cfg: Arc<Config>,
    pub db: Db,
    pub governor: Governor,
    pub blob: reqwest::Client,
    pub cancel: CancellationToken,
    /// Identifies this process in result leases: host, pid and a per-start token.
    pub owner: String,
}

/// One tenant's client and identity.
pub struct Tenant {
    pub cfg: Arc<TenantConfig>,
    pub client: MdeClient,
    pub actor: String,
    pub allow: Allowlist,
}

impl Context {
    pub fn new(cfg: Arc<Config>, db: Db, cancel: CancellationToken) -> anyhow::Result<Context> {
        let governor = Governor::new(db.clone(), cfg.quota.clone());
        let blob = crate::fetch::blob_client(cfg.download.read_timeout)?;
        Ok(Context {
            cfg,
            db,
            governor,
            blob,
            cancel,
            owner: process_owner(),
        })
    }

    /// Builds the clients of the selected tenants (reading their secrets).
    pub fn tenants(&self, name: Option<&str>) -> anyhow::Result<Vec<Tenant>> {
        let mut out = Vec::new();
        for t in self.cfg.select_tenants(name)? {
            let secret = t.load_secret()?;
            let cfg = Arc::new(t.clone());
            out.push(Tenant {
                client: MdeClient::new(cfg.clone(), secret, self.governor.clone())?,
                actor: crate::custody::actor(&t.client_id),
                allow: Allowlist::new(&t.download_hosts),
                cfg,
            });
        }
        Ok(out)
    }
}

/// `host:pid:start-ms`, unique per process start even when pids are reused.
fn process_owner() -> String {
    let host = crate::custody::hostname().unwrap_or_default();
    format!("{host}:{}:{}", std::process::id(), crate::time::now_ms())
}

/// True when a lease owner string names a process that is certainly gone: same host, and
/// either our own pid with another start token, or a pid that no longer exists.
pub fn owner_is_dead(owner: &str, me: &str) -> bool {
    let mut theirs = owner.rsplitn(3, ':');
    let (Some(t_start), Some(t_pid), Some(t_host)) = (theirs.next(), theirs.next(), theirs.next())
    else {
        return true;
    };
    let mut mine = me.rsplitn(3, ':');
    let (Some(m_start), Some(m_pid), Some(m_host)) = (mine.next(), mine.next(), mine.next()) else {
        return false;
    };
    if t_host != m_host {
        return false;
    }
    if t_pid == m_pid {
        return t_start != m_start;
    }
    match t_pid.parse::<i32>() {
        Ok(pid) => matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        ),
        Err(_) => true,
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

/// Counts of results by state, for summaries.
pub type StateCounts = BTreeMap<String, i64>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_owner_detection() {
        let me = format!("h:{}:200", std::process::id());
        assert!(owner_is_dead(&format!("h:{}:100", std::process::id()), &me));
        assert!(!owner_is_dead(&me, &me));
        assert!(!owner_is_dead("other-host:1:5", &me));
        assert!(owner_is_dead("h:999999999:5", &me));
        assert!(!owner_is_dead("h:1:5", &me), "pid 1 exists");
        assert!(owner_is_dead("garbage", &me));
    }
}
