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
use tokio_cron_scheduler::{Job as CronJob, JobScheduler};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
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

/// Takes `<db>.lock` exclusively and writes this process's pid into it; a second daemon on
/// the same DB gets a clear error naming the pid that holds it.
pub fn lock_instance(db_path: &std::path::Path) -> anyhow::Result<InstanceLock> {
    use std::io::{Read, Seek, Write};
    let mut path = db_path.as_os_str().to_owned();
    path.push(".lock");
    let path = PathBuf::from(path);
    let mut file = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| UserError::new(format!("cannot open lock file {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {
            // The holder's pid, for the refusal a second daemon prints (best effort).
            let _ = file
                .set_len(0)
                .and_then(|()| file.rewind())
                .and_then(|()| writeln!(file, "{}", std::process::id()));
            Ok(InstanceLock { _file: file, path })
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let holder = match file
                .read_to_string(&mut text)
                .map(|_| text.trim().parse::<u32>())
            {
                Ok(Ok(pid)) => format!("pid {pid} holds lock {}", path.display()),
                _ => format!("lock {} is held", path.display()),
            };
            Err(UserError::new(format!(
                "another lrvault daemon is already running on {} ({holder})",
                db_path.display(),
            ))
            .into())
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(UserError::new(format!("cannot lock {}: {e}", path.display())).into())
        }
    }
}

/// Folds the WAL into the database file and truncates it (`PRAGMA wal_checkpoint(TRUNCATE)`),
/// so a clean stop leaves every commit in `lrvault.db` itself: a `-wal` deleted or lost while
/// the service is stopped then loses nothing. Best effort: a reader of another process may
/// keep the WAL busy; that is logged, and SQLite checkpoints again later.
pub async fn checkpoint_wal(db: &Db) {
    log_checkpoint(db.call(|c| truncate_wal(c)).await);
}

/// The checkpoint itself: (busy, frames not yet checkpointed); busy 0 means done.
pub fn truncate_wal(c: &rusqlite::Connection) -> Result<(i64, i64), crate::db::DbError> {
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)? - r.get::<_, i64>(2)?,
        ))
    })
    .map_err(crate::db::DbError::sql("checkpoint the WAL"))
}

/// One line for a checkpoint that did not finish; nothing for one that did.
pub fn log_checkpoint(done: Result<(i64, i64), crate::db::DbError>) {
    match done {
        Ok((0, _)) => tracing::debug!("WAL checkpointed and truncated"),
        Ok((_, left)) => tracing::debug!(
            frames_left = left,
            "WAL not truncated: another process is using the database (it checkpoints later)"
        ),
        Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
    }
}

fn notify(states: &[NotifyState<'_>]) {
    // No-op without NOTIFY_SOCKET (not under systemd).
    let _ = sd_notify::notify(states);
}

pub async fn run(cfg: Arc<Config>) -> anyhow::Result<ExitCode> {
    // Every schedule is parsed before anything starts: a bad one is one line, not a
    // scheduler torn down mid-start (which logs its own errors).
    check_schedules(&cfg.schedule)?;
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

    let mut sched = JobScheduler::new().await?;
    for (kind, cron) in schedules(&cfg.schedule) {
        let d = daemon.clone();
        let job = CronJob::new_async(cron, move |_, _| {
            let d = d.clone();
            Box::pin(async move { d.spawn(kind) })
        })
        .map_err(|e| cron_error(kind, cron, e))?;
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
    checkpoint_wal(&ctx.db).await;
    tracing::info!("lrvault daemon stopped");
    Ok(ExitCode::SUCCESS)
}

/// The three `[schedule]` expressions, each with its job.
fn schedules(s: &crate::config::ScheduleConfig) -> [(JobKind, &str); 3] {
    [
        (JobKind::Discover, s.discover.as_str()),
        (JobKind::Archive, s.archive.as_str()),
        (JobKind::Verify, s.verify.as_str()),
    ]
}

fn cron_error(kind: JobKind, cron: &str, e: impl std::fmt::Display) -> UserError {
    UserError::new(format!(
        "invalid cron expression for schedule.{} '{cron}': {e} (6 fields, seconds first)",
        kind.name()
    ))
}

/// The fields of a schedule: exactly six, seconds first (croner would also take a seventh,
/// a year, and says so; lrvault's scheduler does not).
const CRON_FIELDS: &str = "sec min hour day-of-month month day-of-week";

/// Parses every schedule with the parser and settings tokio-cron-scheduler uses (seconds
/// required, day-of-month and day-of-week both), without starting anything; its own error
/// only says `ParseSchedule`, croner's says what is wrong.
pub fn check_schedules(s: &crate::config::ScheduleConfig) -> Result<(), UserError> {
    let parser = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build();
    for (kind, cron) in schedules(s) {
        let n = cron.split_whitespace().count();
        if n != 6 {
            return Err(UserError::new(format!(
                "invalid cron expression for schedule.{} '{cron}': it has {n} fields; lrvault takes exactly 6, seconds first ({CRON_FIELDS}), in UTC",
                kind.name()
            )));
        }
        parser.parse(cron).map_err(|e| cron_error(kind, cron, e))?;
    }
    Ok(())
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
