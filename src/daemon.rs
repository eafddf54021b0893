//! `lrvault run`: the daemon. Takes the single-instance lock, schedules the discover,
//! archive and verify jobs (cron, UTC), starts the event sinks' delivery and the metrics
//! endpoint when configured, tells systemd how it is doing (READY, STATUS,
//! WATCHDOG, STOPPING) and on SIGTERM/SIGINT stops scheduling, lets running downloads end
//! and waits for them (bounded).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::Mutex;
use tokio_cron_scheduler::{Job as CronJob, JobScheduler};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Schedule, ScheduleConfig};
use crate::db::{Db, InstanceLock};
use crate::jobs::{self, Context, archive, discover};

/// How long shutdown waits for running jobs before giving up on them.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(90);

fn notify(states: &[NotifyState<'_>]) {
    // No-op without NOTIFY_SOCKET (not under systemd).
    let _ = sd_notify::notify(states);
}

pub async fn run(cfg: Arc<Config>) -> anyhow::Result<ExitCode> {
    cfg.check_writable()?;
    // The lock first: only its holder changes the schema (docs/operations.md §11).
    let lock = InstanceLock::take(&cfg.database.path)?;
    crate::db::migrate(&lock)?;
    let db = Db::open(&cfg.database.path)?;
    let cancel = CancellationToken::new();
    let ctx = Arc::new(Context::new(cfg.clone(), db, cancel.clone())?);
    ctx.check_worm().await?;
    let tenants: Arc<Vec<Arc<jobs::Tenant>>> =
        Arc::new(ctx.tenants(None)?.into_iter().map(Arc::new).collect());
    let tracker = TaskTracker::new();
    // Events and metrics (docs/operations.md §16): a sink's key or the metrics address that
    // cannot be used stops the start (exit 2) before any work.
    crate::events::start(&cfg, &ctx.db, &cancel, &tracker).await?;
    if let Some(addr) = cfg.metrics.listen {
        let served = crate::metrics::serve(addr, cfg.clone(), ctx.db.clone(), cancel.clone());
        served
            .await
            .map_err(|e| crate::error::UserError::new(e.to_string()))?;
    }
    let daemon = Arc::new(Daemon {
        ctx: ctx.clone(),
        tenants,
        busy: Default::default(),
        tracker: tracker.clone(),
        store_line: Mutex::new(None),
    });

    let mut sched = JobScheduler::new().await?;
    for (kind, schedule) in schedules(&cfg.schedule) {
        let d = daemon.clone();
        // The config parsed the expression with the scheduler's own settings; the scheduler
        // takes text only, so it gets the text that parse accepted.
        let job = CronJob::new_async(schedule.as_str(), move |_, _| {
            let d = d.clone();
            Box::pin(async move { d.spawn(kind) })
        })?;
        sched.add(job).await?;
    }
    sched.start().await?;
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
    for t in &cfg.tenants {
        tracing::info!(
            tenant = %t.name,
            cloud = %t.cloud,
            auth = %t.sign_in.method(),
            login_base = %t.login_base,
            api_base = %t.api_base,
            download_hosts = %t.download_hosts.join(" "),
            "tenant's cloud and hosts in force"
        );
    }

    wait_for_signal().await;
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: waiting for running downloads"),
    ]);
    tracing::info!("stopping: no new work; waiting for running jobs");
    cancel.cancel();
    sched.shutdown().await.ok();
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
    drop(sched);
    // A clean stop leaves every commit in the database file itself (docs/operations.md §2).
    let folded = ctx.db.call(|c| {
        crate::db::fold_wal(c);
        Ok(())
    });
    if let Err(e) = folded.await {
        tracing::warn!(error = %e, "WAL checkpoint failed");
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
    /// the next tick a no-op (runs of one tokio-cron-scheduler job would otherwise overlap).
    busy: [Arc<Mutex<()>>; 3],
    tracker: TaskTracker,
    /// Why the last archive pass started no new download (the store), to log changes only.
    store_line: Mutex<Option<String>>,
}

impl Daemon {
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
