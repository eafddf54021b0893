//! The per-tenant circuit breaker (docs/operations.md §2). A tenant-scope failure opens it: the tenant's
//! passes stop at once and, while it is open, one probe is let through per interval (doubling
//! from `retry_base` to `retry_max`) until the API answers again. Other tenants go on.
//!
//! The breaker lives in the process ([`super::Tenant`]); its state is also written to the
//! `tenant_health` table so `lrvault status` (another process) can show it. Its intervals run
//! on tokio's clock ([`Instant`]), the one the passes sleep on, so tests drive it with
//! `tokio::time::pause` and `advance`.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use rusqlite::params;

use super::Tenant;
use super::failure::{TenantFailure, TenantTrouble};
use crate::db::{Db, DbError};

/// Whether a pass may call the tenant's API now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Closed: go ahead.
    Go,
    /// Open, and a probe is due: make one call; report how it went.
    Probe,
    /// Open: no call before this long (or another task is probing).
    Wait { left: Duration, reason: String },
}

/// What a [`Breaker::trip`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trip {
    Opened,
    ProbeFailed,
    /// A call that was in flight when the breaker opened failed too.
    AlreadyOpen,
}

/// An open breaker, for `status` and messages.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Open {
    pub kind: TenantTrouble,
    pub reason: String,
    pub since: String,
    pub next_probe_at: String,
    pub interval_ms: u64,
}

#[derive(Debug)]
struct Tripped {
    open: Open,
    interval: Duration,
    next_probe: Instant,
    probing: bool,
}

impl Tripped {
    /// The open breaker as messages and `status` show it: the next probe as an RFC 3339 time
    /// (never empty), its interval in milliseconds.
    fn shown(&self) -> Open {
        let left = self.next_probe.saturating_duration_since(Instant::now());
        Open {
            interval_ms: self.interval.as_millis() as u64,
            next_probe_at: crate::time::fmt(
                crate::time::now() + chrono::Duration::from_std(left).unwrap_or_default(),
            ),
            ..self.open.clone()
        }
    }
}

/// One tenant's breaker; see the module docs.
#[derive(Debug)]
pub struct Breaker {
    base: Duration,
    max: Duration,
    state: Mutex<Option<Tripped>>,
}

impl Breaker {
    pub fn new(base: Duration, max: Duration) -> Breaker {
        Breaker {
            base: base.max(Duration::from_millis(1)),
            max: max.max(base),
            state: Mutex::new(None),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Option<Tripped>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// May a pass call the API now? At most one caller gets [`Admission::Probe`] per interval.
    pub fn admit(&self) -> Admission {
        let mut state = self.state();
        let Some(t) = state.as_mut() else {
            return Admission::Go;
        };
        let now = Instant::now();
        if t.probing || now < t.next_probe {
            return Admission::Wait {
                left: t.next_probe.saturating_duration_since(now),
                reason: t.open.reason.clone(),
            };
        }
        t.probing = true;
        Admission::Probe
    }

    /// A tenant-scope failure: opens the breaker, or (after a failed probe) doubles its
    /// interval. Failures of calls already in flight when it opened change nothing.
    pub fn trip(&self, failure: &TenantFailure) -> (Open, Trip) {
        let mut state = self.state();
        let now = Instant::now();
        let trip = match state.as_ref() {
            None => Trip::Opened,
            Some(t) if t.probing => Trip::ProbeFailed,
            Some(_) => Trip::AlreadyOpen,
        };
        let t = match state.take() {
            Some(mut t) if t.probing => {
                t.interval = (t.interval * 2).min(self.max);
                t.next_probe = now + t.interval;
                t.probing = false;
                t.open.reason = failure.reason.clone();
                t.open.kind = failure.kind;
                t
            }
            Some(t) => t,
            None => Tripped {
                open: Open {
                    kind: failure.kind,
                    reason: failure.reason.clone(),
                    since: crate::time::now_str(),
                    next_probe_at: String::new(),
                    interval_ms: 0,
                },
                interval: self.base,
                next_probe: now + self.base,
                probing: false,
            },
        };
        let open = t.shown();
        *state = Some(t);
        (open, trip)
    }

    /// The API answered: closes the breaker. True when it was open.
    pub fn close(&self) -> bool {
        self.state().take().is_some()
    }

    /// A probe that ended without telling (e.g. nothing was due): let the next one through.
    pub fn release_probe(&self) {
        if let Some(t) = self.state().as_mut() {
            t.probing = false;
        }
    }

    /// How long until the next probe may go, while the breaker is open.
    pub fn until_probe(&self) -> Option<Duration> {
        self.state()
            .as_ref()
            .map(|t| t.next_probe.saturating_duration_since(Instant::now()))
    }

    /// The open breaker, if it is, with its interval and the time of its next probe.
    pub fn open(&self) -> Option<Open> {
        self.state().as_ref().map(Tripped::shown)
    }
}

/// The probe a pass took ([`Admission::Probe`]): however the pass ends (a process-scope
/// failure, an error, nothing due), the next pass may probe again. A trip or a close has
/// already settled it; releasing after them changes nothing.
pub struct ProbeTaken<'a>(pub Option<&'a Breaker>);

impl Drop for ProbeTaken<'_> {
    fn drop(&mut self) {
        if let Some(breaker) = self.0 {
            breaker.release_probe();
        }
    }
}

/// A tenant-scope failure of `tenant`: opens (or keeps open) its breaker, says so once in the
/// log and records it for `status`.
pub async fn trouble(db: &Db, tenant: &Tenant, failure: &TenantFailure) {
    let (open, trip) = tenant.breaker.trip(failure);
    let name = &tenant.cfg.name;
    match trip {
        Trip::Opened => {
            tracing::error!(tenant = %name, trouble = open.kind.as_str(), reason = %open.reason, next_probe_at = %open.next_probe_at,
            "tenant's API unavailable or refusing; its passes stop and one probe is made per interval")
        }
        Trip::ProbeFailed => {
            tracing::warn!(tenant = %name, reason = %open.reason, next_probe_at = %open.next_probe_at,
            "probe failed; the breaker stays open")
        }
        Trip::AlreadyOpen => {
            tracing::debug!(tenant = %name, reason = %open.reason, "a call in flight failed too")
        }
    }
    record(db, name, Some(open)).await;
}

/// The tenant's API answered: closes its breaker if it was open (true then).
pub async fn answered(db: &Db, tenant: &Tenant) -> bool {
    let closed = tenant.breaker.close();
    if closed {
        tracing::info!(tenant = %tenant.cfg.name, "the tenant's API answers again; breaker closed");
        record(db, &tenant.cfg.name, None).await;
    }
    closed
}

/// Called after [`answered`] once per discover page (not per result): clears a row another
/// process left open (a one-shot `archive` whose breaker opened, or this service before a
/// restart), so `status` does not show a breaker nobody holds.
pub async fn clear_left_open(db: &Db, tenant: &Tenant) {
    let name = tenant.cfg.name.clone();
    let key = name.clone();
    let left_open = db
        .read(move |c| {
            c.prepare_cached("SELECT 1 FROM tenant_health WHERE tenant = ?1")
                .and_then(|mut s| s.exists([&key]))
                .map_err(DbError::sql("read tenant health"))
        })
        .await;
    // An archive task of this process may have opened the breaker meanwhile: its row stays.
    if let Ok(true) = left_open
        && tenant.breaker.open().is_none()
    {
        tracing::info!(tenant = %name, "the tenant's API answers; cleared the open breaker another process recorded");
        record(db, &name, None).await;
    }
}

/// The line a pass reports for a tenant whose breaker is open.
pub fn open_line(tenant: &Tenant) -> Option<String> {
    let o = tenant.breaker.open()?;
    Some(format!(
        "tenant '{}': {} (breaker open since {}; next probe at {})",
        tenant.cfg.name, o.reason, o.since, o.next_probe_at
    ))
}

/// Records a tenant's breaker in `tenant_health` (None: closed) for `status`.
pub async fn record(db: &Db, tenant: &str, open: Option<Open>) {
    let tenant = tenant.to_string();
    let res = db
        .call(move |c| {
            match open {
                None => c.execute("DELETE FROM tenant_health WHERE tenant = ?1", [&tenant]),
                Some(o) => c.execute(
                    "INSERT INTO tenant_health (tenant, trouble, reason, since, next_probe_at, interval_ms, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (tenant) DO UPDATE SET trouble = excluded.trouble, reason = excluded.reason,
                       next_probe_at = excluded.next_probe_at, interval_ms = excluded.interval_ms,
                       updated_at = excluded.updated_at",
                    params![tenant, o.kind.as_str(), o.reason, o.since, o.next_probe_at, o.interval_ms as i64, crate::time::now_str()],
                ),
            }
            .map(|_| ())
            .map_err(DbError::sql("record tenant health"))
        })
        .await;
    if let Err(e) = res {
        tracing::warn!(error = %e, "could not record the tenant's breaker");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outage() -> TenantFailure {
        TenantFailure {
            kind: TenantTrouble::Outage,
            reason: "token endpoint unavailable (HTTP 503)".into(),
        }
    }

    /// Moves the paused tokio clock on by `ms` milliseconds.
    async fn advance(ms: u64) {
        tokio::time::advance(Duration::from_millis(ms)).await;
    }

    #[test]
    fn an_open_breaker_shows_when_it_probes_next() {
        let b = Breaker::new(Duration::from_secs(30), Duration::from_secs(60));
        let before = crate::time::now();
        let (tripped, _) = b.trip(&outage());
        let open = b.open().unwrap();
        assert_eq!(
            (open.interval_ms, open.kind),
            (30_000, TenantTrouble::Outage)
        );
        let at = chrono::DateTime::parse_from_rfc3339(&open.next_probe_at).unwrap();
        let ahead = (at.to_utc() - before).num_seconds();
        assert!((29..=31).contains(&ahead), "{}", open.next_probe_at);
        assert!(!tripped.next_probe_at.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_per_interval_doubling_to_the_cap() {
        let b = Breaker::new(Duration::from_millis(40), Duration::from_millis(100));
        assert_eq!(b.admit(), Admission::Go);
        let (open, trip) = b.trip(&outage());
        assert_eq!((open.interval_ms, trip), (40, Trip::Opened));
        assert_eq!(
            b.admit(),
            Admission::Wait {
                left: Duration::from_millis(40),
                reason: "token endpoint unavailable (HTTP 503)".into()
            }
        );
        advance(39).await;
        assert_eq!(b.until_probe(), Some(Duration::from_millis(1)));
        assert!(matches!(b.admit(), Admission::Wait { .. }), "1 ms early");
        // A second failure of a call already in flight changes nothing.
        let (again, trip) = b.trip(&outage());
        assert_eq!((again.interval_ms, trip), (40, Trip::AlreadyOpen));
        assert_eq!(
            b.until_probe(),
            Some(Duration::from_millis(1)),
            "not pushed back"
        );
        advance(1).await;
        assert_eq!(b.admit(), Admission::Probe);
        // Only one caller probes.
        assert!(matches!(b.admit(), Admission::Wait { .. }));
        assert_eq!(b.trip(&outage()).0.interval_ms, 80);
        advance(79).await;
        assert!(matches!(b.admit(), Admission::Wait { .. }), "1 ms early");
        advance(1).await;
        assert_eq!(b.admit(), Admission::Probe);
        assert_eq!(b.trip(&outage()).0.interval_ms, 100, "capped at retry_max");
        advance(99).await;
        assert!(matches!(b.admit(), Admission::Wait { .. }), "1 ms early");
        advance(1).await;
        assert_eq!(b.admit(), Admission::Probe);
        assert!(b.close());
        assert_eq!(b.admit(), Admission::Go);
        assert!(b.open().is_none());
        assert_eq!(b.until_probe(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_ends_without_a_verdict_lets_the_next_one_through() {
        let b = Breaker::new(Duration::from_millis(1), Duration::from_millis(1));
        b.trip(&outage());
        advance(1).await;
        assert_eq!(b.admit(), Admission::Probe);
        {
            // The pass ends on a process-scope failure or an error: no trip, no close.
            let _probe = ProbeTaken(Some(&b));
            assert!(matches!(b.admit(), Admission::Wait { .. }), "one prober");
        }
        assert_eq!(b.admit(), Admission::Probe, "released when the pass ended");
        // After a verdict, releasing changes nothing: a closed breaker stays closed.
        let probe = ProbeTaken(Some(&b));
        assert!(b.close());
        drop(probe);
        assert_eq!(b.admit(), Admission::Go);
    }
}
