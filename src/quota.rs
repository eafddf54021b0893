//! The quota governor: one sliding-window limiter per (tenant, endpoint) over `per_minute`
//! and `per_hour`, kept in the `api_calls` ledger so the budget survives restarts and is
//! shared by every process on the same database.
//!
//! A call reserves its ledger row *before* it is sent (in one IMMEDIATE transaction with the
//! window count, so two processes cannot both take the last slot) and completes it with the
//! answer. A completed row occupies the window from its completion time, which is never
//! earlier than the moment the server counted it; an in-flight row counts until it completes
//! (or, if its process died, until it is older than a window plus `INFLIGHT_GRACE_MS`).

use std::time::Duration;

use rusqlite::{OptionalExtension, params};

use crate::config::QuotaConfig;
use crate::db::{Db, DbError, write_tx};

/// Longest an API request may be in flight (the API client's whole-request timeout is lower).
pub const INFLIGHT_GRACE_MS: i64 = 120_000;
/// Added to each window: ledger times are whole milliseconds of the wall clock, the server
/// counts with its own clock; the margin keeps a rounding from ever letting one call too many in.
const WINDOW_MARGIN_MS: i64 = 2;
/// Longest single sleep before re-reading the ledger (other processes may have freed slots).
const MAX_SLEEP: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Token,
    List,
    Get,
    Link,
    /// `getPackageUri`: an investigation package's link, under its own, much tighter quota.
    PackageUri,
}

/// MDE's documented `getPackageUri` limits (2/min and 120/h).
pub const PACKAGE_PER_MINUTE: u32 = 2;
pub const PACKAGE_PER_HOUR: u32 = 120;
/// `getPackageUri`'s documented limits leave no count margin (a call fewer would be a quarter
/// of the budget), so its windows are this fraction longer instead (docs/operations.md,
/// "Investigation packages").
const PACKAGE_TIME_MARGIN: f64 = 0.01;

impl Endpoint {
    pub const ALL: [Endpoint; 5] = [
        Endpoint::Token,
        Endpoint::List,
        Endpoint::Get,
        Endpoint::Link,
        Endpoint::PackageUri,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Token => "token",
            Endpoint::List => "machineactions.list",
            Endpoint::Get => "machineactions.get",
            Endpoint::Link => "liveresponse.link",
            Endpoint::PackageUri => "machineactions.packageuri",
        }
    }

    /// The limits this endpoint's bucket keeps: `[quota]` as configured, except
    /// `getPackageUri`, held to its documented 2/min and 120/h (or lower, if configured lower)
    /// over windows [`PACKAGE_TIME_MARGIN`] longer than configured.
    pub fn limits(self, configured: &QuotaConfig) -> QuotaConfig {
        match self {
            Endpoint::PackageUri => QuotaConfig {
                per_minute: configured.per_minute.min(PACKAGE_PER_MINUTE),
                per_hour: configured.per_hour.min(PACKAGE_PER_HOUR),
                minute_secs: configured.minute_secs * (1.0 + PACKAGE_TIME_MARGIN),
                hour_secs: configured.hour_secs * (1.0 + PACKAGE_TIME_MARGIN),
            },
            _ => configured.clone(),
        }
    }
}

/// A reserved slot; complete it with the HTTP status (0 when no answer came).
#[derive(Debug)]
pub struct Reservation {
    pub id: i64,
}

#[derive(Clone)]
pub struct Governor {
    db: Db,
    limits: QuotaConfig,
}

/// The quota ledger (kept in the database) could not be read or written: the call was not
/// made, since it could not be counted.
#[derive(Debug, thiserror::Error)]
#[error("quota ledger: {0}")]
pub struct LedgerError(#[from] pub DbError);

/// Calls counted in the current windows of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub last_minute: i64,
    pub last_hour: i64,
    pub throttled_last_hour: i64,
    /// The endpoint's own limits the counts are judged against ([`Endpoint::limits`]).
    pub per_minute: u32,
    pub per_hour: u32,
}

impl Governor {
    pub fn new(db: Db, limits: QuotaConfig) -> Governor {
        Governor { db, limits }
    }

    pub fn limits(&self) -> &QuotaConfig {
        &self.limits
    }

    /// Waits until the bucket has a free slot in both windows and no 429 pause, then
    /// reserves it.
    pub async fn acquire(
        &self,
        tenant: &str,
        endpoint: Endpoint,
    ) -> Result<Reservation, LedgerError> {
        until_free(|| {
            let (tenant, limits) = (tenant.to_string(), self.limits.clone());
            self.db.call(move |conn| {
                try_reserve(conn, &tenant, endpoint, &limits, crate::time::now_ms())
            })
        })
        .await
    }

    /// Waits until one more call to the bucket could be made, without reserving it: the
    /// archive loop waits here before it takes one of the process's transfer slots, so a tenant
    /// at its quota never holds a slot another tenant could use.
    pub async fn ready(&self, tenant: &str, endpoint: Endpoint) -> Result<(), LedgerError> {
        until_free(|| {
            let (tenant, limits) = (tenant.to_string(), self.limits.clone());
            self.db.read(move |conn| {
                let now = crate::time::now_ms();
                Ok(
                    match wait_before_call(conn, &tenant, endpoint, &limits, now)? {
                        None => Ok(()),
                        Some(wait) => Err(wait),
                    },
                )
            })
        })
        .await
    }

    /// Records the answer. `pause` (from a 429's Retry-After) stops the bucket until then.
    pub async fn complete(
        &self,
        reservation: Reservation,
        http_status: u16,
        pause: Option<Duration>,
    ) -> Result<(), LedgerError> {
        Ok(self
            .db
            .call(move |conn| {
                let now = crate::time::now_ms();
                let pause_until = pause.map(|p| now + p.as_millis() as i64);
                conn.execute(
                    "UPDATE api_calls SET http_status = ?1, at_ms = MAX(at_ms, ?2), pause_until_ms = ?3 WHERE id = ?4",
                    params![http_status, now, pause_until, reservation.id],
                )
                .map_err(DbError::sql("complete quota reservation"))?;
                Ok(())
            })
            .await?)
    }

    /// Deletes ledger rows that no window can see any more.
    pub async fn prune(&self) -> Result<usize, DbError> {
        // getPackageUri's hour window is the longest.
        let hour_secs = Endpoint::PackageUri.limits(&self.limits).hour_secs;
        let keep_ms = (hour_secs * 1000.0) as i64 + INFLIGHT_GRACE_MS;
        self.db
            .call(move |conn| {
                let cutoff = crate::time::now_ms() - keep_ms;
                conn.execute(
                    "DELETE FROM api_calls WHERE at_ms < ?1 AND (pause_until_ms IS NULL OR pause_until_ms < ?1)",
                    [cutoff],
                )
                .map_err(DbError::sql("prune quota ledger"))
            })
            .await
    }
}

/// Current usage of one bucket and its limits (for `status` and the metrics).
pub fn usage(
    conn: &rusqlite::Connection,
    tenant: &str,
    endpoint: Endpoint,
    limits: &QuotaConfig,
    now_ms: i64,
) -> Result<Usage, DbError> {
    let limits = &endpoint.limits(limits);
    let minute_ms = (limits.minute_secs * 1000.0) as i64;
    let hour_ms = (limits.hour_secs * 1000.0) as i64;
    let q = |sql: &str, since: i64| -> Result<i64, DbError> {
        conn.query_row(sql, params![tenant, endpoint.as_str(), since], |r| r.get(0))
            .map_err(DbError::sql("read quota usage"))
    };
    Ok(Usage {
        last_minute: q(
            "SELECT count(*) FROM api_calls WHERE tenant = ?1 AND endpoint = ?2 AND at_ms > ?3",
            now_ms - minute_ms,
        )?,
        last_hour: q(
            "SELECT count(*) FROM api_calls WHERE tenant = ?1 AND endpoint = ?2 AND at_ms > ?3",
            now_ms - hour_ms,
        )?,
        throttled_last_hour: q(
            "SELECT count(*) FROM api_calls WHERE tenant = ?1 AND endpoint = ?2 AND at_ms > ?3 AND http_status = 429",
            now_ms - hour_ms,
        )?,
        per_minute: limits.per_minute,
        per_hour: limits.per_hour,
    })
}

/// Asks `attempt` until it succeeds, sleeping for as long as it says the bucket needs
/// (at most [`MAX_SLEEP`] at a time, so a changed ledger is seen soon).
async fn until_free<T, F, Fut>(mut attempt: F) -> Result<T, LedgerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Result<T, Duration>, DbError>>,
{
    loop {
        match attempt().await? {
            Ok(done) => return Ok(done),
            Err(wait) => tokio::time::sleep(wait.min(MAX_SLEEP)).await,
        }
    }
}

fn try_reserve(
    conn: &mut rusqlite::Connection,
    tenant: &str,
    endpoint: Endpoint,
    limits: &QuotaConfig,
    now: i64,
) -> Result<Result<Reservation, Duration>, DbError> {
    let tx = write_tx(conn)?;
    if let Some(wait) = wait_before_call(&tx, tenant, endpoint, limits, now)? {
        return Ok(Err(wait));
    }
    tx.execute(
        "INSERT INTO api_calls (tenant, endpoint, at_ms) VALUES (?1, ?2, ?3)",
        params![tenant, endpoint.as_str(), now],
    )
    .map_err(DbError::sql("reserve quota slot"))?;
    let id = tx.last_insert_rowid();
    tx.commit()
        .map_err(DbError::sql("commit quota reservation"))?;
    Ok(Ok(Reservation { id }))
}

/// How long one more call to the bucket must wait (a 429 pause, or a full window), or `None`
/// when it could be made now.
fn wait_before_call(
    conn: &rusqlite::Connection,
    tenant: &str,
    endpoint: Endpoint,
    limits: &QuotaConfig,
    now: i64,
) -> Result<Option<Duration>, DbError> {
    let ep = endpoint.as_str();
    let limits = &endpoint.limits(limits);
    let pause: Option<i64> = conn
        .query_row(
            "SELECT MAX(pause_until_ms) FROM api_calls WHERE tenant = ?1 AND endpoint = ?2 AND pause_until_ms > ?3",
            params![tenant, ep, now],
            |r| r.get(0),
        )
        .map_err(DbError::sql("read quota pause"))?;
    if let Some(until) = pause {
        return Ok(Some(Duration::from_millis((until - now).max(1) as u64)));
    }
    let mut wait_ms: i64 = 0;
    for (window_secs, limit) in [
        (limits.minute_secs, limits.per_minute),
        (limits.hour_secs, limits.per_hour),
    ] {
        let window_ms = (window_secs * 1000.0).ceil() as i64 + WINDOW_MARGIN_MS;
        // A row leaves the window at `expiry`; in-flight rows stay until they complete.
        let expiry_sql = "at_ms + ?3 + CASE WHEN http_status IS NULL THEN ?4 ELSE 0 END";
        let count: i64 = conn
            .query_row(
                &format!(
                    "SELECT count(*) FROM api_calls WHERE tenant = ?1 AND endpoint = ?2 AND at_ms > ?5 - ?3 - ?4
                     AND {expiry_sql} > ?5"
                ),
                params![tenant, ep, window_ms, INFLIGHT_GRACE_MS, now],
                |r| r.get(0),
            )
            .map_err(DbError::sql("count quota window"))?;
        if count >= i64::from(limit) {
            // The slot frees when the (count - limit + 1)-th earliest expiry passes.
            let free_at: Option<i64> = conn
                .query_row(
                    &format!(
                        "SELECT {expiry_sql} AS expiry FROM api_calls WHERE tenant = ?1 AND endpoint = ?2
                         AND at_ms > ?5 - ?3 - ?4 AND {expiry_sql} > ?5 ORDER BY expiry LIMIT 1 OFFSET ?6"
                    ),
                    params![tenant, ep, window_ms, INFLIGHT_GRACE_MS, now, count - i64::from(limit)],
                    |r| r.get(0),
                )
                .optional()
                .map_err(DbError::sql("read quota window"))?;
            wait_ms = wait_ms.max(free_at.map_or(1, |t| t - now + 1));
        }
    }
    Ok((wait_ms > 0).then(|| Duration::from_millis(wait_ms as u64)))
}

/// When `n` more calls to `endpoint`'s bucket can be done at the earliest, given the calls
/// already in the ledger (`past_ms`, any order) and the `configured` limits (the endpoint's
/// own are derived from them, as for [`usage`]): each call is placed greedily at the first
/// moment both windows have room, exactly as the governor would admit it.
pub fn eta(
    past_ms: &[i64],
    n: u64,
    endpoint: Endpoint,
    configured: &QuotaConfig,
    now_ms: i64,
) -> Duration {
    use std::collections::VecDeque;
    let limits = &endpoint.limits(configured);
    let minute = (limits.minute_secs * 1000.0).ceil() as i64;
    let hour = (limits.hour_secs * 1000.0).ceil() as i64;
    let (per_min, per_hour) = (limits.per_minute as usize, limits.per_hour as usize);
    let mut past: Vec<i64> = past_ms
        .iter()
        .copied()
        .filter(|t| *t > now_ms - hour)
        .collect();
    past.sort_unstable();
    let mut in_hour: VecDeque<i64> = past.iter().copied().collect();
    let mut in_minute: VecDeque<i64> = past
        .iter()
        .copied()
        .filter(|t| *t > now_ms - minute)
        .collect();
    let mut t = now_ms;
    for _ in 0..n {
        loop {
            while in_hour.front().is_some_and(|&x| x + hour <= t) {
                in_hour.pop_front();
            }
            while in_minute.front().is_some_and(|&x| x + minute <= t) {
                in_minute.pop_front();
            }
            let mut next = t;
            if in_minute.len() >= per_min {
                next = next.max(in_minute[in_minute.len() - per_min] + minute);
            }
            if in_hour.len() >= per_hour {
                next = next.max(in_hour[in_hour.len() - per_hour] + hour);
            }
            if next == t {
                break;
            }
            t = next;
        }
        in_hour.push_back(t);
        in_minute.push_back(t);
    }
    Duration::from_millis((t - now_ms).max(0) as u64)
}

/// Ledger times of one bucket within the last hour window (for ETAs).
pub fn recent_calls(
    conn: &rusqlite::Connection,
    tenant: &str,
    endpoint: Endpoint,
    limits: &QuotaConfig,
    now_ms: i64,
) -> Result<Vec<i64>, DbError> {
    let limits = &endpoint.limits(limits);
    let hour_ms = (limits.hour_secs * 1000.0).ceil() as i64;
    let mut stmt = conn
        .prepare("SELECT at_ms FROM api_calls WHERE tenant = ?1 AND endpoint = ?2 AND at_ms > ?3")
        .map_err(DbError::sql("read quota ledger"))?;
    let rows = stmt
        .query_map(params![tenant, endpoint.as_str(), now_ms - hour_ms], |r| {
            r.get(0)
        })
        .map_err(DbError::sql("read quota ledger"))?;
    rows.collect::<Result<Vec<i64>, _>>()
        .map_err(DbError::sql("read quota ledger"))
}

/// Parses `Retry-After`: delta seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let delta = at.with_timezone(&chrono::Utc) - now;
    Some(
        delta
            .to_std()
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(86_400)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_migrated(&dir.path().join("q.db")).unwrap();
        (dir, db)
    }

    fn limits(per_minute: u32, per_hour: u32) -> QuotaConfig {
        QuotaConfig {
            per_minute,
            per_hour,
            minute_secs: 60.0,
            hour_secs: 3600.0,
        }
    }

    fn reserve(db: &Db, l: &QuotaConfig, now: i64) -> Result<Reservation, Duration> {
        reserve_in(db, "t", Endpoint::Link, l, now)
    }

    fn reserve_in(
        db: &Db,
        tenant: &'static str,
        ep: Endpoint,
        l: &QuotaConfig,
        now: i64,
    ) -> Result<Reservation, Duration> {
        let l = l.clone();
        db.call_sync(move |c| try_reserve(c, tenant, ep, &l, now))
            .unwrap()
    }

    fn complete(db: &Db, r: Reservation, at: i64) {
        db.call_sync(move |c| {
            c.execute(
                "UPDATE api_calls SET http_status = 200, at_ms = ?1 WHERE id = ?2",
                params![at, r.id],
            )
            .unwrap();
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn minute_window_blocks_until_the_oldest_call_ages_out() {
        let (_d, db) = db();
        let l = limits(3, 100);
        for i in 0..3 {
            let r = reserve(&db, &l, 1_000_000 + i * 10).unwrap();
            complete(&db, r, 1_000_000 + i * 10);
        }
        let wait = reserve(&db, &l, 1_000_100).unwrap_err();
        // Oldest completed at 1_000_000 → frees at 1_060_000 + margin (+1 ms).
        assert_eq!(
            wait,
            Duration::from_millis(60_000 + WINDOW_MARGIN_MS as u64 - 100 + 1)
        );
        assert!(reserve(&db, &l, 1_060_000).is_err());
        assert!(reserve(&db, &l, 1_060_000 + WINDOW_MARGIN_MS).is_ok());
        // Another endpoint and another tenant have their own buckets.
        assert!(reserve_in(&db, "t", Endpoint::List, &l, 1_000_100).is_ok());
        assert!(reserve_in(&db, "u", Endpoint::Link, &l, 1_000_100).is_ok());
    }

    #[test]
    fn hour_window_and_inflight_rows_count() {
        let (_d, db) = db();
        let l = limits(100, 2);
        let _inflight = reserve(&db, &l, 0).unwrap();
        let r = reserve(&db, &l, 10).unwrap();
        complete(&db, r, 20);
        let wait = reserve(&db, &l, 30).unwrap_err();
        // The completed row expires at 20 + 3600 s, the in-flight one later.
        assert_eq!(
            wait,
            Duration::from_millis(3_600_000 + WINDOW_MARGIN_MS as u64 + 20 - 30 + 1)
        );
    }

    #[test]
    fn pause_blocks_only_its_bucket() {
        let (_d, db) = db();
        let l = limits(100, 100);
        let r = reserve(&db, &l, 0).unwrap();
        db.call_sync(move |c| {
            c.execute(
                "UPDATE api_calls SET http_status = 429, pause_until_ms = 5000 WHERE id = ?1",
                [r.id],
            )
            .unwrap();
            Ok(())
        })
        .unwrap();
        assert_eq!(
            reserve(&db, &l, 1000).unwrap_err(),
            Duration::from_millis(4000)
        );
        assert!(reserve_in(&db, "t", Endpoint::Get, &l, 1000).is_ok());
        assert!(reserve(&db, &l, 5000).is_ok());
    }

    #[test]
    fn eta_follows_both_windows() {
        let l = QuotaConfig {
            per_minute: 95,
            per_hour: 1450,
            minute_secs: 60.0,
            hour_secs: 3600.0,
        };
        // 95 calls fit now... the 96th waits a minute.
        assert_eq!(eta(&[], 95, Endpoint::Link, &l, 0), Duration::ZERO);
        assert_eq!(eta(&[], 96, Endpoint::Link, &l, 0), Duration::from_secs(60));
        // 1450 calls: 15 full minutes of 95, then 25 more in minute 16 → the last at 15 min.
        assert_eq!(
            eta(&[], 1450, Endpoint::Link, &l, 0),
            Duration::from_secs(15 * 60)
        );
        // The 1451st waits for the first call to leave the hour.
        assert_eq!(
            eta(&[], 1451, Endpoint::Link, &l, 0),
            Duration::from_secs(3600)
        );
        // 10,000 results ≈ 6.9 hours at the limit.
        let t = eta(&[], 10_000, Endpoint::Link, &l, 0).as_secs_f64() / 3600.0;
        assert!((6.0..7.0).contains(&t), "{t}");
        // Calls already in the ledger count.
        let past: Vec<i64> = (0..1450).map(|i| -3_000_000 + i).collect();
        assert_eq!(
            eta(&past, 1, Endpoint::Link, &l, 0),
            Duration::from_millis(600_000)
        );
    }

    #[tokio::test]
    async fn prune_keeps_only_what_a_window_can_see() {
        let (_d, db) = db();
        let l = limits(100, 100);
        let now = crate::time::now_ms();
        let gov = Governor::new(db.clone(), l);
        for at in [
            // Older than the longest window (getPackageUri's hour, 1 % longer) and the grace.
            now - 3_636_000 - INFLIGHT_GRACE_MS - 10,
            now - 3_000_000,
            now - 10,
        ] {
            db.call_sync(move |c| {
                c.execute("INSERT INTO api_calls (tenant, endpoint, at_ms, http_status) VALUES ('t', 'x', ?1, 200)", [at])
                    .unwrap();
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(gov.prune().await.unwrap(), 1);
        let left: i64 = db
            .call_sync(move |c| {
                Ok(
                    c.query_row("SELECT count(*) FROM api_calls", [], |r| r.get(0))
                        .unwrap(),
                )
            })
            .unwrap();
        assert_eq!(left, 2);
    }

    #[test]
    fn retry_after_forms() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-27T10:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Fri, 27 Nov 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn package_uri_keeps_its_documented_limits_over_slightly_longer_windows() {
        let (_d, db) = db();
        let configured = limits(95, 1450);
        let pkg = Endpoint::PackageUri.limits(&configured);
        assert_eq!((pkg.per_minute, pkg.per_hour), (2, 120));
        assert_eq!((pkg.minute_secs, pkg.hour_secs), (60.6, 3636.0));
        let link = Endpoint::Link.limits(&configured);
        assert_eq!(
            (link.per_minute, link.per_hour, link.minute_secs),
            (95, 1450, 60.0)
        );
        // Two calls, then the third waits until the first is 60.6 s (+ 2 ms) old.
        for at in [1_000_000, 1_000_500] {
            let r = reserve_in(&db, "t", Endpoint::PackageUri, &configured, at).unwrap();
            complete(&db, r, at);
        }
        let wait = reserve_in(&db, "t", Endpoint::PackageUri, &configured, 1_001_000).unwrap_err();
        assert_eq!(wait, Duration::from_millis(60_600 + 2 - 1_000 + 1));
        // Its bucket is its own: the link bucket is untouched.
        assert!(reserve_in(&db, "t", Endpoint::Link, &configured, 1_001_000).is_ok());
        // The ETA of 121 package links: 120 in the first hour window, the 121st an hour later.
        let eta_121 = eta(&[], 121, Endpoint::PackageUri, &configured, 0);
        assert!(eta_121 >= Duration::from_secs(3636), "{eta_121:?}");
    }
}
