//! OpenMetrics at `GET /metrics` on `[metrics] listen` (docs/operations.md §16). Every value is
//! read from the database at scrape time, so a restart resets nothing and every process on
//! the database would say the same; `prometheus-client` writes the exposition. Only that one
//! path is served, on that one address (loopback unless `allow_remote`).

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rusqlite::Connection;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::{Db, DbError};
use crate::queue::ResultState;
use crate::quota::{self, Endpoint};

/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;
type Seconds = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Why the metrics endpoint cannot start (one line, exit 2: the address is the operator's).
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on metrics.listen {addr}: {source}")]
pub struct ListenError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Binds `addr` now (so a taken port stops the start) and serves `/metrics` until `cancel`.
pub async fn serve(
    addr: SocketAddr,
    cfg: Arc<Config>,
    db: Db,
    cancel: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ListenError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError { addr, source })?;
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state((cfg, db));
    tracing::info!(%addr, "serving OpenMetrics at /metrics");
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    }))
}

async fn scrape(
    axum::extract::State((cfg, db)): axum::extract::State<(Arc<Config>, Db)>,
) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let read = db
        .read(move |c| render(c, &cfg, crate::time::now_ms()))
        .await;
    match read {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "metrics scrape failed");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response()
        }
    }
}

/// The exposition for the database behind `conn` at `now_ms`.
pub fn render(conn: &Connection, cfg: &Config, now_ms: i64) -> Result<String, DbError> {
    let mut registry = Registry::default();
    archived(conn, &mut registry)?;
    results(conn, &mut registry)?;
    api_calls(conn, cfg, &mut registry, now_ms)?;
    tenants(conn, cfg, &mut registry, now_ms)?;
    chain(conn, &mut registry, now_ms)?;
    let mut text = String::new();
    encode(&mut text, &registry).expect("writing to a String cannot fail");
    Ok(text)
}

fn tenant(t: &str) -> Labels {
    vec![("tenant", t.to_string())]
}

/// The rows of `sql`, each column as text (NULL: empty).
fn rows<const N: usize>(
    conn: &Connection,
    sql: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<Vec<[String; N]>, DbError> {
    use rusqlite::types::ValueRef;
    let op = "read a metric";
    let mut stmt = conn.prepare_cached(sql).map_err(DbError::sql(op))?;
    let read = stmt
        .query_map(params, |r| {
            let mut row: [String; N] = std::array::from_fn(|_| String::new());
            for (i, cell) in row.iter_mut().enumerate() {
                *cell = match r.get_ref(i)? {
                    ValueRef::Integer(n) => n.to_string(),
                    ValueRef::Real(x) => x.to_string(),
                    ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                    ValueRef::Null | ValueRef::Blob(_) => String::new(),
                };
            }
            Ok(row)
        })
        .map_err(DbError::sql(op))?;
    read.collect::<Result<_, _>>().map_err(DbError::sql(op))
}

fn number(text: &str) -> u64 {
    text.parse().unwrap_or(0)
}

/// Seconds from the stored time `at` to `now_ms` (0 for a time that does not parse).
fn age(at: &str, now_ms: i64) -> f64 {
    crate::time::parse_api(at).map_or(0.0, |at| {
        (now_ms - at.timestamp_millis()).max(0) as f64 / 1000.0
    })
}

/// `lrvault_archived_packages_total`, `lrvault_archived_bytes_total` (payload bytes).
fn archived(conn: &Connection, registry: &mut Registry) -> Result<(), DbError> {
    let packages = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let sql = "SELECT tenant, count(*), sum(payload_size) FROM evidence GROUP BY tenant";
    for [t, n, size] in rows::<3>(conn, sql, &[])? {
        packages.get_or_create(&tenant(&t)).inc_by(number(&n));
        bytes.get_or_create(&tenant(&t)).inc_by(number(&size));
    }
    registry.register(
        "lrvault_archived_packages",
        "Evidence packages archived",
        packages,
    );
    registry.register(
        "lrvault_archived_bytes",
        "Payload bytes archived in evidence packages",
        bytes,
    );
    Ok(())
}

/// `lrvault_results{tenant,state}`: every state of every tenant with results, 0 included.
fn results(conn: &Connection, registry: &mut Registry) -> Result<(), DbError> {
    let results = Family::<Labels, Gauge>::default();
    let counted = rows::<3>(
        conn,
        "SELECT tenant, state, count(*) FROM results GROUP BY tenant, state ORDER BY tenant",
        &[],
    )?;
    let mut tenants: Vec<&String> = counted.iter().map(|[t, _, _]| t).collect();
    tenants.dedup();
    for t in tenants {
        for state in ResultState::ALL {
            let n = counted
                .iter()
                .find(|[ct, s, _]| ct == t && s == state.as_str())
                .map_or(0, |[_, _, n]| number(n));
            let labels = vec![("tenant", t.clone()), ("state", state.as_str().into())];
            results.get_or_create(&labels).set(n as i64);
        }
    }
    registry.register("lrvault_results", "Results by state", results);
    Ok(())
}

/// `lrvault_api_calls_total{tenant,endpoint,status}` (answered calls; 0 is no answer) and
/// `lrvault_quota_headroom{tenant,endpoint,window}` (calls left in the window now).
fn api_calls(
    conn: &Connection,
    cfg: &Config,
    registry: &mut Registry,
    now_ms: i64,
) -> Result<(), DbError> {
    let calls = Family::<Labels, Counter>::default();
    let sql = "SELECT tenant, endpoint, status, calls FROM api_call_totals";
    for [t, endpoint, status, n] in rows::<4>(conn, sql, &[])? {
        let labels = vec![("tenant", t), ("endpoint", endpoint), ("status", status)];
        calls.get_or_create(&labels).inc_by(number(&n));
    }
    let headroom = Family::<Labels, Gauge>::default();
    for t in &cfg.tenants {
        for ep in Endpoint::ALL {
            let used = quota::usage(conn, &t.name, ep, &cfg.quota, now_ms)?;
            for (window, limit, used) in [
                ("minute", used.per_minute, used.last_minute),
                ("hour", used.per_hour, used.last_hour),
            ] {
                let labels = vec![
                    ("tenant", t.name.clone()),
                    ("endpoint", ep.as_str().to_string()),
                    ("window", window.to_string()),
                ];
                headroom
                    .get_or_create(&labels)
                    .set((i64::from(limit) - used).max(0));
            }
        }
    }
    registry.register(
        "lrvault_api_calls",
        "Answered API and token calls by HTTP status (0: no answer)",
        calls,
    );
    registry.register(
        "lrvault_quota_headroom",
        "Calls the quota still allows in the window",
        headroom,
    );
    Ok(())
}

/// Per configured tenant: `lrvault_breaker_open`, `lrvault_oldest_pending_seconds`,
/// `lrvault_last_success_timestamp_seconds{tenant,job}`.
fn tenants(
    conn: &Connection,
    cfg: &Config,
    registry: &mut Registry,
    now_ms: i64,
) -> Result<(), DbError> {
    let open = Family::<Labels, Gauge>::default();
    let oldest = Family::<Labels, Seconds>::default();
    let broken = rows::<1>(conn, "SELECT tenant FROM tenant_health", &[])?;
    let pending = rows::<2>(
        conn,
        "SELECT r.tenant, min(a.discovered_at)
         FROM results r JOIN actions a ON a.tenant = r.tenant AND a.action_id = r.action_id
         WHERE r.state = ?1 GROUP BY r.tenant",
        &[&ResultState::Pending],
    )?;
    for t in &cfg.tenants {
        let is_open = broken.iter().any(|[b]| *b == t.name);
        open.get_or_create(&tenant(&t.name)).set(i64::from(is_open));
        let since = pending.iter().find(|[p, _]| *p == t.name);
        let waited = since.map_or(0.0, |[_, at]| age(at, now_ms));
        oldest.get_or_create(&tenant(&t.name)).set(waited);
    }
    let success = Family::<Labels, Seconds>::default();
    let sql = "SELECT job, tenant, at FROM job_successes";
    for [job, t, at] in rows::<3>(conn, sql, &[])? {
        if let Some(at) = crate::time::parse_api(&at) {
            let labels = vec![("tenant", t), ("job", job)];
            let unix = at.timestamp_millis() as f64 / 1000.0;
            success.get_or_create(&labels).set(unix);
        }
    }
    registry.register(
        "lrvault_breaker_open",
        "1 while the tenant's breaker is open",
        open,
    );
    registry.register(
        "lrvault_oldest_pending_seconds",
        "Age of the oldest pending result since its discovery (0: none pending)",
        oldest,
    );
    registry.register(
        "lrvault_last_success_timestamp_seconds",
        "When each job last ended without error for the tenant (Unix time)",
        success,
    );
    Ok(())
}

/// `lrvault_verify_defects` (the VERIFY_FAILED rows of the last verify run),
/// `lrvault_checkpoint_age_seconds` (since the last checkpoint's row; absent before the
/// first) and `lrvault_event_backlog{sink}`.
fn chain(conn: &Connection, registry: &mut Registry, now_ms: i64) -> Result<(), DbError> {
    let defects: Gauge = Gauge::default();
    let last_run = rows::<1>(
        conn,
        "SELECT count(*) FROM custody_log WHERE event = 'VERIFY_FAILED'
           AND seq < coalesce((SELECT max(seq) FROM custody_log WHERE event = 'VERIFIED'), 0)
           AND seq > coalesce((SELECT seq FROM custody_log WHERE event = 'VERIFIED'
                               ORDER BY seq DESC LIMIT 1 OFFSET 1), 0)",
        &[],
    )?;
    defects.set(last_run.first().map_or(0, |[n]| number(n) as i64));
    registry.register(
        "lrvault_verify_defects",
        "Defects the last verify run found",
        defects,
    );
    let checkpoint = rows::<1>(
        conn,
        "SELECT c.at FROM anchors a JOIN custody_log c ON c.seq = a.seq ORDER BY a.seq DESC LIMIT 1",
        &[],
    )?;
    if let Some([at]) = checkpoint.first() {
        let checkpoint_age: Seconds = Gauge::default();
        checkpoint_age.set(age(at, now_ms));
        registry.register(
            "lrvault_checkpoint_age_seconds",
            "Time since the custody row of the last checkpoint",
            checkpoint_age,
        );
    }
    let backlog = Family::<Labels, Gauge>::default();
    for s in crate::events::outbox::sink_states(conn)? {
        backlog
            .get_or_create(&vec![("sink", s.sink)])
            .set(s.backlog);
    }
    registry.register(
        "lrvault_event_backlog",
        "Events waiting for the sink",
        backlog,
    );
    Ok(())
}
