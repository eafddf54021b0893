//! `lrvault run`: the daemon. Takes the single-instance lock, schedules the discover,
//! archive and verify jobs (cron, UTC), tells systemd how it is doing (READY, STATUS,
//! WATCHDOG, STOPPING) and on SIGTERM/SIGINT stops scheduling, lets running downloads end
//! and waits for them (bounded).

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Schedule, ScheduleConfig};
use crate::db::Db;
use crate::error::UserError;
use crate::jobs::{self, Context, archive, discover};

/// How long shutdown waits for running jobs before giving up on them.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(90);

/// Holds the daemon's lock file open (and locked) for its lifetime.
pub struct InstanceLock {
    _file: File,
    pub path: PathBuf,
}

/// Takes `<db>.lock` exclusively; a second daemon on the same DB gets a clear error.
pub fn lock_instance(db_path: &std::path::Path) -> anyhow::Result<InstanceLock> {
    let mut path = db_path.as_os_str().to_owned();
    path.push(".lock");
    let path = PathBuf::from(path);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| UserError::new(format!("cannot open lock file {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(InstanceLock { _file: file, path }),
        Err(std::fs::TryLockError::WouldBlock) => Err(UserError::new(format!(
            "another lrvault daemon is already running on {} (lock {} is held)",
            db_path.display(),
            path.display()
        ))
        .into()),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(UserError::new(format!("cannot lock {}: {e}", path.display())).into())
        }
    }
}

fn notify(states: &[NotifyState<'_>]) {
    // No-op without NOTIFY_SOCKET (not under systemd).
    let _ = sd_notify::notify(states);
}

pub async fn run(cfg: Arc<Config>) -> anyhow::Result<ExitCode> {
    cfg.check_writable()?;
    let db = Db::open(&cfg.database.path)?;
    let _lock = lock_instance(&cfg.database.path)?;
    let cancel = CancellationToken::new();
    let ctx = Arc::new(Context::new(cfg.clone(), db, cancel.clone())?);
    ctx.check_worm().await?;
    let tenants: Arc<Vec<Arc<jobs::Tenant>>> =
        Arc::new(ctx.tenants(None)?.into_iter().map(Arc::new).collect());
    let tracker = TaskTracker::new();
    let daemon = Arc::new(Daemon {
        ctx: ctx.clone(),
        tenants,
        busy: Default::default(),
        tracker: tracker.clone(),
        store_line: Mutex::new(None),
    });

    for (kind, schedule) in schedules(&cfg.schedule) {
        tokio::spawn(daemon.clone().tick(kind, schedule.clone()));
    }
    // Work at once rather than waiting for the first tick.
    daemon.spawn(JobKind::Discover);

    if let Some(every) = watchdog_interval() {
        let c = cancel.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            while !c.is_cancelled() {
                tick.tick().await;
                notify(&[NotifyState::Watchdog]);
            }
        });
    }
    notify(&[
        NotifyState::Ready,
        NotifyState::Status("archiving live-response results"),
    ]);
    tracing::info!(db = %cfg.database.path.display(), tenants = daemon.tenants.len(), "lrvault daemon started");

    wait_for_signal().await;
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: waiting for running downloads"),
    ]);
    tracing::info!("stopping: no new work; waiting for running jobs");
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_WAIT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "jobs still running after {}s; their results return to pending on the next start",
            SHUTDOWN_WAIT.as_secs()
        );
    }
    tracing::info!("lrvault daemon stopped");
    Ok(ExitCode::SUCCESS)
}

/// The three `[schedule]` expressions (parsed with the config), each with its job.
fn schedules(s: &ScheduleConfig) -> [(JobKind, &Schedule); 3] {
    [
        (JobKind::Discover, &s.discover),
        (JobKind::Archive, &s.archive),
        (JobKind::Verify, &s.verify),
    ]
}

/// How long to wait at `now` for the tick after `last` (the previous one, or the start):
/// never a tick at or before `last`, so a wall clock that lags the timer cannot start a job
/// twice, and ticks missed while busy are skipped. `None` when the schedule never fires
/// again.
fn next_tick(
    schedule: &Schedule,
    last: chrono::DateTime<chrono::Utc>,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<(chrono::DateTime<chrono::Utc>, Duration)> {
    let next = schedule.next_after(last.max(now))?;
    Some((next, (next - now).to_std().unwrap_or_default()))
}

fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(100)))
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The daemon's scheduled jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    Discover,
    Archive,
    Verify,
}

impl JobKind {
    fn name(self) -> &'static str {
        match self {
            JobKind::Discover => "discover",
            JobKind::Archive => "archive",
            JobKind::Verify => "verify",
        }
    }
}

struct Daemon {
    ctx: Arc<Context>,
    tenants: Arc<Vec<Arc<jobs::Tenant>>>,
    /// One guard per job (indexed by `JobKind as usize`): a run that is still going makes
    /// the next tick a no-op (runs of one job would otherwise overlap).
    busy: [Arc<Mutex<()>>; 3],
    tracker: TaskTracker,
    /// Why the last archive pass started no new download (the store), to log changes only.
    store_line: Mutex<Option<String>>,
}

impl Daemon {
    /// Starts `kind` at every tick of `schedule` (UTC) until shutdown.
    async fn tick(self: Arc<Self>, kind: JobKind, schedule: Schedule) {
        let mut last = chrono::Utc::now();
        while let Some((next, wait)) = next_tick(&schedule, last, chrono::Utc::now()) {
            tokio::select! {
                _ = tokio::time::sleep(wait) => self.spawn(kind),
                _ = self.ctx.cancel.cancelled() => return,
            }
            last = next;
        }
    }

    fn spawn(self: &Arc<Self>, kind: JobKind) {
        if self.ctx.cancel.is_cancelled() {
            return;
        }
        let Ok(lock) = self.busy[kind as usize].clone().try_lock_owned() else {
            tracing::debug!(
                job = kind.name(),
                "previous run still going; skipping this tick"
            );
            return;
        };
        let me = self.clone();
        self.tracker.spawn(async move {
            let _lock = lock;
            match kind {
                JobKind::Discover => {
                    me.discover().await;
                    // Newly queued results should not wait for the archive tick.
                    me.spawn(JobKind::Archive);
                }
                JobKind::Archive => me.archive().await,
                JobKind::Verify => me.verify().await,
            }
        });
    }

    async fn discover(&self) {
        let results = tokio::select! {
            r = discover::lookback_all(&self.ctx, &self.tenants) => r,
            _ = self.ctx.cancel.cancelled() => return,
        };
        for (tenant, result) in self.tenants.iter().zip(results) {
            match result {
                Ok(s) => tracing::info!(tenant = %tenant.cfg.name, "discovery: {s}"),
                // An open breaker logs its own changes; no line per tick while it waits.
                Err(e) if tenant.breaker.open().is_some() => {
                    tracing::debug!(tenant = %tenant.cfg.name, error = %crate::error::one_line(&e), "discovery skipped")
                }
                Err(e) => {
                    tracing::error!(tenant = %tenant.cfg.name, error = %crate::error::one_line(&e), "discovery failed")
                }
            }
        }
    }

    async fn archive(&self) {
        let started = crate::time::now_str();
        match archive::archive(&self.ctx, &self.tenants, &archive::Scope::default(), None).await {
            Ok(s) => {
                for e in &s.tenant_errors {
                    tracing::error!(error = %e, "archive pass failed for a tenant");
                }
                // The store breaker logs its own changes; a full spool is said once per change.
                let mut last = self.store_line.lock().await;
                if s.store != *last {
                    if let Some(line) = &s.store {
                        tracing::warn!(reason = %line, "archive pass started no new download");
                    }
                    *last = s.store.clone();
                }
                drop(last);
                if s.archived + s.failed + s.unavailable + s.retry_later > 0 {
                    tracing::info!("archive pass: {s}");
                }
                notify(&[NotifyState::Status(&self.status_line(&s))]);
                for (name, ok) in &s.tenants {
                    let line = s.to_string();
                    jobs::record_job_run(&self.ctx.db, "archive", name, started.clone(), *ok, line)
                        .await;
                }
            }
            Err(e) => tracing::error!(error = %crate::error::one_line(&e), "archive pass failed"),
        }
    }

    /// What systemd shows (`STATUS=`): the last pass, and every open breaker.
    fn status_line(&self, last: &archive::Summary) -> String {
        let mut line = format!("last archive pass: {last}");
        for t in self.tenants.iter() {
            if let Some(o) = t.breaker.open() {
                line += &format!(
                    "; tenant {} breaker open ({}), next probe at {}",
                    t.cfg.name,
                    o.kind.as_str(),
                    o.next_probe_at
                );
            }
        }
        line
    }

    async fn verify(&self) {
        let started = crate::time::now_str();
        let scope = crate::verify::Scope::default();
        let verified = crate::verify::verify_with_store(
            &self.ctx.cfg,
            &self.ctx.db,
            self.ctx.store.clone(),
            &scope,
        );
        match verified.await {
            Ok(r) => {
                let line = format!(
                    "{} packages checked, {} defects, chain {} rows, {} defects",
                    r.packages_checked, r.package_defects, r.chain_rows, r.chain_defects
                );
                if r.ok() {
                    tracing::info!("verify: {line}");
                } else {
                    tracing::error!("verify found defects: {line}");
                }
                for t in self.tenants.iter() {
                    jobs::record_job_run(
                        &self.ctx.db,
                        "verify",
                        &t.cfg.name,
                        started.clone(),
                        r.ok(),
                        line.clone(),
                    )
                    .await;
                }
            }
            Err(e) => tracing::error!(error = %crate::error::one_line(&e), "verify failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> chrono::DateTime<chrono::Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn a_tick_waits_for_the_next_match_and_never_repeats_one() {
        let every_30 = Schedule::parse("schedule.archive", "30 * * * * *".into()).unwrap();
        let start = at("2026-01-01T12:00:10Z");
        assert_eq!(
            next_tick(&every_30, start, start),
            Some((at("2026-01-01T12:00:30Z"), Duration::from_secs(20)))
        );
        // The timer woke a little before the wall clock reached the tick: not the same
        // tick again, the next one.
        let fired = at("2026-01-01T12:00:30Z");
        let (next, wait) = next_tick(&every_30, fired, at("2026-01-01T12:00:29.9Z")).unwrap();
        assert_eq!(next, at("2026-01-01T12:01:30Z"));
        assert_eq!(wait, Duration::from_millis(60_100));
        // A job that ran past several ticks: the missed ones are skipped.
        assert_eq!(
            next_tick(&every_30, fired, at("2026-01-01T12:03:40Z")),
            Some((at("2026-01-01T12:04:30Z"), Duration::from_secs(50)))
        );
    }
}
