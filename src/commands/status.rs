//! `lrvault status`: queue depth by state, quota use per tenant and endpoint, the last job
//! runs and the custody head, read through a read-only connection; and the evidence store
//! (where it is, its WORM retention as the store reports it, packages waiting in the spool);
//! and each tenant's cloud and sign-in method with the hosts in force; and each event sink's
//! backlog and last error.

use std::process::ExitCode;

use clap::{Args as ClapArgs, ValueEnum};
use serde_json::json;

use crate::config::{Cloud, Config, ConfigFile};
use crate::db::{Db, DbError};
use crate::queue::ResultState;
use crate::quota::{self, Endpoint};
use crate::render::{Format, Rows};

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[arg(long, value_enum, default_value_t = StatusFormat::Table)]
    pub format: StatusFormat,
    /// Only this tenant's queue, quota and job runs
    #[arg(long, value_name = "T")]
    pub tenant: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum StatusFormat {
    Table,
    Json,
}

/// Above this many tenants the table shows totals and the tenants that need attention, not a
/// row per tenant (JSON always has every row).
const SUMMARY_OVER: usize = 10;
/// Rows of the attention lists shown in the table.
const ATTENTION_ROWS: i64 = 20;

/// What `status` reads, for the tenants it covers.
struct Status {
    /// Each tenant's cloud, sign-in method and the hosts in force (its preset or the keys
    /// written).
    tenants: Rows,
    queue: Rows,
    failed: Rows,
    jobs: Rows,
    breakers: Rows,
    quota: Rows,
    /// Each event sink: backlog, oldest waiting, last delivery, last error.
    sinks: Rows,
}

pub async fn run(config: &ConfigFile, args: Args) -> anyhow::Result<ExitCode> {
    let cfg = config.load()?;
    let tenants: Vec<String> = cfg
        .select_tenants(args.tenant.as_deref())?
        .iter()
        .map(|t| t.name.clone())
        .collect();
    let conn = Db::open_for_reading(&cfg.database.path, &config.path)?;
    let status = read_status(&conn, &cfg, &tenants, args.tenant.as_deref())?;
    let (head_seq, head_hash) = crate::custody::head(&conn)?;
    let store = store_status(&cfg).await;
    if args.format == StatusFormat::Json {
        let out = json!({
            "database": cfg.database.path,
            "store": store,
            "tenants": status.tenants.to_json(),
            "queue": status.queue.to_json(),
            "attention": status.failed.to_json(),
            "quota": status.quota.to_json(),
            "jobs": status.jobs.to_json(),
            "breakers": status.breakers.to_json(),
            "event_sinks": status.sinks.to_json(),
            "custody_head": { "seq": head_seq, "row_hash": head_hash },
        });
        println!("{}", crate::render::json_text(&out));
        return Ok(ExitCode::SUCCESS);
    }
    println!("database: {}", cfg.database.path.display());
    println!("{}\n", store_lines(&store));
    if tenants.len() > SUMMARY_OVER {
        print_summary(&conn, &status, tenants.len())?;
    } else {
        print_tables(&status);
    }
    print_sinks(&status);
    println!("Custody head: seq {head_seq}, row_hash {head_hash}");
    Ok(ExitCode::SUCCESS)
}

/// The queue, the results that failed or wait to retry, the job runs, the open breakers and
/// the quota use of `tenants` (`only`: the one `--tenant` named).
fn read_status(
    conn: &rusqlite::Connection,
    cfg: &Config,
    tenants: &[String],
    only: Option<&str>,
) -> anyhow::Result<Status> {
    let q = |sql: &str| Rows::query(conn, sql, &[&only]).map_err(DbError::sql("status query"));
    let queue = q(
        "SELECT tenant, state, count(*) AS results FROM results WHERE ?1 IS NULL OR tenant = ?1
         GROUP BY tenant, state ORDER BY tenant, state",
    )?;
    let failed = Rows::query(
        conn,
        "SELECT tenant, action_id, command_index, state, attempts, next_attempt_at, last_error FROM results
         WHERE (state = ?2 OR (state = ?3 AND attempts > 0)) AND (?1 IS NULL OR tenant = ?1)
         ORDER BY updated_at DESC LIMIT 20",
        &[&only, &ResultState::Failed, &ResultState::Pending],
    )
    .map_err(DbError::sql("status query"))?;
    let jobs = q(
        "SELECT job, tenant, started_at, finished_at, ok, summary FROM job_runs
         WHERE ?1 IS NULL OR tenant = ?1 ORDER BY job, tenant",
    )?;
    // Open breakers (the database is at this build's schema: `tenant_health` exists).
    let breakers = q(
        "SELECT tenant, trouble, reason, since, next_probe_at, interval_ms FROM tenant_health
         WHERE ?1 IS NULL OR tenant = ?1 ORDER BY tenant",
    )?;
    let now = crate::time::now_ms();
    let tenant_rows = cfg
        .tenants
        .iter()
        .filter(|t| tenants.contains(&t.name))
        .map(|t| {
            vec![
                json!(t.name),
                json!(t.cloud.as_str()),
                json!(t.sign_in.method()),
                json!(t.login_base.as_str()),
                json!(t.api_base.as_str()),
                json!(t.download_hosts.join(" ")),
            ]
        })
        .collect();
    let tenants_in_force = Rows {
        columns: [
            "tenant",
            "cloud",
            "auth",
            "login_base",
            "api_base",
            "download_hosts",
        ]
        .map(String::from)
        .to_vec(),
        rows: tenant_rows,
    };
    let mut quota_rows = Vec::new();
    for t in tenants {
        for ep in Endpoint::ALL {
            let u = quota::usage(conn, t, ep, &cfg.quota, now)?;
            quota_rows.push(vec![
                json!(t),
                json!(ep.as_str()),
                json!(format!("{}/{}", u.last_minute, u.per_minute)),
                json!(format!("{}/{}", u.last_hour, u.per_hour)),
                json!(u.throttled_last_hour),
            ]);
        }
    }
    let quota = Rows {
        columns: [
            "tenant",
            "endpoint",
            "last_minute",
            "last_hour",
            "throttled_429_last_hour",
        ]
        .map(String::from)
        .to_vec(),
        rows: quota_rows,
    };
    Ok(Status {
        sinks: sink_rows(conn)?,
        tenants: tenants_in_force,
        queue,
        failed,
        jobs,
        breakers,
        quota,
    })
}

/// The event sinks (docs/operations.md §16) as `status` shows them.
fn sink_rows(conn: &rusqlite::Connection) -> anyhow::Result<Rows> {
    let rows = crate::events::outbox::sink_states(conn)?
        .into_iter()
        .map(|s| {
            vec![
                json!(s.sink),
                json!(s.backlog),
                json!(s.oldest_waiting),
                json!(s.delivered_at),
                json!(s.last_error),
                json!(s.last_error_at),
            ]
        })
        .collect();
    Ok(Rows {
        columns: [
            "sink",
            "backlog",
            "oldest_waiting",
            "last_delivered_at",
            "last_error",
            "last_error_at",
        ]
        .map(String::from)
        .to_vec(),
        rows,
    })
}

/// The event sinks, when there are any (both layouts).
fn print_sinks(s: &Status) {
    if !s.sinks.rows.is_empty() {
        println!("Event sinks:\n{}", s.sinks.render(Format::Table));
    }
}

/// A row per tenant (a few tenants, or `--tenant`).
fn print_tables(s: &Status) {
    println!("Tenants:\n{}", s.tenants.render(Format::Table));
    if !s.breakers.rows.is_empty() {
        println!(
            "Open breakers (the tenant's API is down or refuses us; one probe per interval):\n{}",
            s.breakers.render(Format::Table)
        );
    }
    println!("Queue by state:\n{}", s.queue.render(Format::Table));
    if !s.failed.rows.is_empty() {
        println!(
            "Failed or retrying results:\n{}",
            s.failed.render(Format::Table)
        );
    }
    println!(
        "Quota use (limits per tenant and endpoint):\n{}",
        s.quota.render(Format::Table)
    );
    println!("Last job runs:\n{}", s.jobs.render(Format::Table));
}

/// Many tenants: totals, then only what needs a look (`--tenant T` shows one in full).
fn print_summary(conn: &rusqlite::Connection, s: &Status, tenants: usize) -> anyhow::Result<()> {
    let q = |sql: &str, params: &[&dyn rusqlite::ToSql]| {
        Rows::query(conn, sql, params).map_err(DbError::sql("status query"))
    };
    let totals = q(
        "SELECT state, sum(n) AS results, count(*) AS tenants FROM
           (SELECT tenant, state, count(*) AS n FROM results GROUP BY tenant, state)
         GROUP BY state ORDER BY state",
        &[],
    )?;
    println!("Clouds: {}\n", cloud_counts(&s.tenants));
    println!(
        "Queue by state ({tenants} tenants; `status --tenant T` shows one):\n{}",
        totals.render(Format::Table)
    );
    let attention = q(
        "SELECT r.tenant,
                sum(r.state = ?2) AS pending,
                sum(r.state = ?3) AS failed,
                sum(r.state = ?2 AND r.attempts > 0) AS retrying,
                min(CASE WHEN r.state = ?2 THEN a.discovered_at END) AS oldest_pending_since,
                h.trouble AS breaker
         FROM results r JOIN actions a ON a.tenant = r.tenant AND a.action_id = r.action_id
         LEFT JOIN tenant_health h ON h.tenant = r.tenant
         GROUP BY r.tenant
         HAVING failed > 0 OR retrying > 0 OR breaker IS NOT NULL OR pending > 0
         ORDER BY breaker IS NULL, failed DESC, retrying DESC, oldest_pending_since
         LIMIT ?1",
        &[&ATTENTION_ROWS, &ResultState::Pending, &ResultState::Failed],
    )?;
    if attention.rows.is_empty() {
        println!("No tenant needs attention: nothing failed, waits, or is cut off.\n");
    } else {
        println!(
            "Tenants that need attention (open breaker, failed, retrying, oldest waiting first; at most {ATTENTION_ROWS}):\n{}",
            attention.render(Format::Table)
        );
    }
    let busy: Vec<Vec<serde_json::Value>> = s
        .quota
        .rows
        .iter()
        .filter(|r| {
            // "used/limit", each endpoint against its own limit (getPackageUri: 120).
            let hour = r[3].as_str().and_then(|v| {
                let (used, limit) = v.split_once('/')?;
                Some((used.parse::<f64>().ok()?, limit.parse::<f64>().ok()?))
            });
            hour.is_some_and(|(used, limit)| used >= 0.8 * limit) || r[4].as_i64().unwrap_or(0) > 0
        })
        .cloned()
        .collect();
    println!(
        "Quota: {} of {} tenant endpoints at 80 % or more of their hourly limit or throttled in the last hour{}",
        busy.len(),
        s.quota.rows.len(),
        if busy.is_empty() { "." } else { ":" }
    );
    if !busy.is_empty() {
        let rows = Rows {
            columns: s.quota.columns.clone(),
            rows: busy,
        };
        println!("{}", rows.render(Format::Table));
    }
    let jobs = q(
        "SELECT job, count(*) AS tenants, sum(ok = 1) AS ok, sum(ok = 0) AS failed,
                sum(finished_at IS NULL) AS running, max(finished_at) AS last_finished
         FROM job_runs GROUP BY job ORDER BY job",
        &[],
    )?;
    println!("\nLast job runs, per job:\n{}", jobs.render(Format::Table));
    Ok(())
}

/// `commercial 9, gcc 3`: how many tenants are in each cloud (the order of [`Cloud::ALL`]).
fn cloud_counts(tenants: &Rows) -> String {
    Cloud::ALL
        .iter()
        .map(|c| {
            let n = tenants.rows.iter().filter(|r| r[1] == c.as_str()).count();
            (c, n)
        })
        .filter(|(_, n)| *n > 0)
        .map(|(c, n)| format!("{c} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The store as `status` shows it: backend, location, WORM (asked of the store itself, so
/// this is the one network call of `status`), and the spool of an object store.
async fn store_status(cfg: &Config) -> serde_json::Value {
    let backend = cfg.store.kind().to_string();
    let store = match crate::store::Store::open(&cfg.store, &cfg.credentials) {
        Ok(store) => store,
        Err(e) => return json!({ "backend": backend, "error": e.to_string() }),
    };
    let worm = if store.is_object() {
        let asked = tokio::time::timeout(std::time::Duration::from_secs(30), store.check_worm());
        match asked.await {
            Ok(Ok(w)) => json!({ "mode": w.mode, "period": w.period }),
            Ok(Err(e)) => json!({ "error": e.to_string() }),
            Err(_) => json!({ "error": "the store did not answer within 30 s" }),
        }
    } else {
        json!({ "mode": null, "period": null })
    };
    let spool = match store.spool_files().await {
        Ok(files) if store.is_object() => json!({
            "path": store.staging_root(),
            "waiting": files.len(),
            "bytes": files.iter().map(|f| f.size).sum::<u64>(),
            "max_waiting": cfg.store.object_store().map(|o| o.spool_max_waiting),
        }),
        Ok(_) => serde_json::Value::Null,
        Err(e) => json!({ "path": store.staging_root(), "error": e.to_string() }),
    };
    json!({
        "backend": backend,
        "location": store.describe(),
        "require_worm": cfg.store.worm_required(),
        "worm": worm,
        "spool": spool,
    })
}

fn store_lines(s: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    if let Some(e) = s["error"].as_str() {
        return format!("store: {} (cannot be opened: {e})", text(&s["backend"]));
    }
    let required = if s["require_worm"].as_bool() == Some(true) {
        "required"
    } else {
        "not required"
    };
    let worm = match (&s["worm"]["mode"], &s["worm"]["error"]) {
        (_, serde_json::Value::String(e)) => format!("unknown ({e}) ({required})"),
        (serde_json::Value::String(mode), _) => match s["worm"]["period"].as_str() {
            Some(p) => format!("{mode}, {p} ({required})"),
            None => format!("{mode}, period set by the container's policy ({required})"),
        },
        _ => "none (a local directory enforces no retention)".into(),
    };
    let mut lines = format!(
        "store: {} ({})\nWORM: {worm}",
        text(&s["location"]),
        text(&s["backend"])
    );
    let spool = &s["spool"];
    if let Some(e) = spool["error"].as_str() {
        lines += &format!("\nspool: {} cannot be read: {e}", text(&spool["path"]));
    } else if !spool.is_null() {
        lines += &format!(
            "\nspool: {}: {} packages waiting for the store ({} bytes; at {} no new download starts)",
            text(&spool["path"]),
            spool["waiting"],
            spool["bytes"],
            spool["max_waiting"]
        );
    }
    lines
}
