//! `lrvault status`: queue depth by state, quota use per tenant and endpoint, the last job
//! runs and the custody head, read through a read-only connection; and the evidence store
//! (where it is, its WORM retention as the store reports it, packages waiting in the spool).

use std::path::Path;
use std::process::ExitCode;

use clap::{Args as ClapArgs, ValueEnum};
use serde_json::json;

use crate::config::Config;
use crate::db::{Db, DbError};
use crate::quota::{self, Endpoint};
use crate::render::{Format, Rows};

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[arg(long, value_enum, default_value_t = StatusFormat::Table)]
    pub format: StatusFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum StatusFormat {
    Table,
    Json,
}

pub async fn run(config: &Path, args: Args) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(config)?;
    let as_json = args.format == StatusFormat::Json;
    let conn = Db::open_for_reading(&cfg.database.path, config)?;
    let q = |sql: &str| Rows::query(&conn, sql, &[]).map_err(DbError::sql("status query"));
    let queue = q(
        "SELECT tenant, state, count(*) AS results FROM results GROUP BY tenant, state ORDER BY tenant, state",
    )?;
    let failed = q(
        "SELECT tenant, action_id, command_index, state, attempts, next_attempt_at, last_error FROM results
         WHERE state = 'failed' OR (state = 'pending' AND attempts > 0) ORDER BY updated_at DESC LIMIT 20",
    )?;
    let jobs = q(
        "SELECT job, tenant, started_at, finished_at, ok, summary FROM job_runs ORDER BY job, tenant",
    )?;
    // Open breakers (a database not yet migrated to v2 has none to show).
    let breakers = q(
        "SELECT tenant, trouble, reason, since, next_probe_at, interval_ms FROM tenant_health
         ORDER BY tenant",
    )
    .or_else(|_| q("SELECT NULL AS tenant WHERE 0"))?;
    let now = crate::time::now_ms();
    let mut quota_rows = Vec::new();
    for t in &cfg.tenants {
        for ep in Endpoint::ALL {
            let u = quota::usage(&conn, &t.name, ep, &cfg.quota, now)?;
            quota_rows.push(vec![
                json!(t.name),
                json!(ep.as_str()),
                json!(format!("{}/{}", u.last_minute, cfg.quota.per_minute)),
                json!(format!("{}/{}", u.last_hour, cfg.quota.per_hour)),
                json!(u.throttled_last_hour),
            ]);
        }
    }
    let quota_table = Rows {
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
    let (head_seq, head_hash) = crate::custody::head(&conn)?;
    let store = store_status(&cfg).await;
    if as_json {
        let out = json!({
            "database": cfg.database.path,
            "store": store,
            "queue": queue.to_json(),
            "attention": failed.to_json(),
            "quota": quota_table.to_json(),
            "jobs": jobs.to_json(),
            "breakers": breakers.to_json(),
            "custody_head": { "seq": head_seq, "row_hash": head_hash },
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("database: {}", cfg.database.path.display());
        println!("{}\n", store_lines(&store));
        if !breakers.rows.is_empty() {
            println!(
                "Open breakers (the tenant's API is down or refuses us; one probe per interval):\n{}",
                breakers.render(Format::Table)
            );
        }
        println!("Queue by state:\n{}", queue.render(Format::Table));
        if !failed.rows.is_empty() {
            println!(
                "Failed or retrying results:\n{}",
                failed.render(Format::Table)
            );
        }
        println!(
            "Quota use (limits per tenant and endpoint):\n{}",
            quota_table.render(Format::Table)
        );
        println!("Last job runs:\n{}", jobs.render(Format::Table));
        println!("Custody head: seq {head_seq}, row_hash {head_hash}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The store as `status` shows it: backend, location, WORM (asked of the store itself, so
/// this is the one network call of `status`), and the spool of an object store.
async fn store_status(cfg: &Config) -> serde_json::Value {
    let backend = cfg.store.backend.to_string();
    let store = match crate::store::Store::open(&cfg.store) {
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
            "max_waiting": cfg.store.spool_max_waiting,
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
