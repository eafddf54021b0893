//! `lrvault simulate` and `lrvault demo`: the built-in simulator on its own, and the whole
//! pipeline (discover → archive → verify) against it on loopback, with a generated config.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::Db;
use crate::jobs::{self, Context, archive, discover};
use crate::render::Format;
use crate::sim::{Fault, SimConfig, Simulator};

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Address to listen on, e.g. 127.0.0.1:8080
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Live-response actions per tenant
    #[arg(long, default_value_t = 40)]
    pub actions: usize,
    /// Seed of the synthetic data (same seed, same data)
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Simulated tenants
    #[arg(long, default_value_t = 1)]
    pub tenants: usize,
    /// Creation times are spread over this long before now (e.g. 2d, 30d)
    #[arg(long, default_value = "2d", value_parser = humantime::parse_duration)]
    pub spread: Duration,
    /// Calls allowed per minute window and endpoint (MDE: 100)
    #[arg(long, default_value_t = 100)]
    pub per_minute: u32,
    /// Calls allowed per hour window and endpoint (MDE: 1500)
    #[arg(long, default_value_t = 1500)]
    pub per_hour: u32,
    /// Length of the "minute" window in seconds (shrink for tests and benchmarks)
    #[arg(long, default_value_t = 60.0)]
    pub minute_secs: f64,
    /// Length of the "hour" window in seconds
    #[arg(long, default_value_t = 3600.0)]
    pub hour_secs: f64,
    /// Largest generated GetFile file, in bytes
    #[arg(long, default_value_t = 2 << 20)]
    pub max_getfile_size: u64,
    /// Add one GetFile result of exactly this many bytes (GiB sizes are generated on the fly)
    #[arg(long, value_name = "BYTES")]
    pub big_getfile: Option<u64>,
    /// Add one raw GetFile result, queued first, for benchmarks (repeatable): random:BYTES
    /// (incompressible), random-md5:BYTES (with Content-MD5), text:BYTES; K, M, G suffixes
    #[arg(long = "payload", value_name = "KIND:BYTES")]
    pub payloads: Vec<crate::sim::Payload>,
    /// Fault switch, repeatable: link-5xx=N, list-5xx=N, blob-5xx=N, 429=N, slow=BYTES_PER_SEC,
    /// truncate=N, bad-md5=N, expired-links=N, link-ttl=SECS, token-ttl=SECS, hostile-names,
    /// foreign-host=N, http-link=N, redirect=N, gone=N
    #[arg(long = "fault", value_name = "FAULT")]
    pub faults: Vec<Fault>,
    /// On exit, write every request the simulator answered to this file (JSON lines:
    /// t_ms since start, endpoint, tenant_id, status, authorization, range); for benchmarks
    #[arg(long, value_name = "PATH")]
    pub request_log: Option<PathBuf>,
}

impl SimulateArgs {
    fn sim_config(&self) -> SimConfig {
        SimConfig {
            seed: self.seed,
            actions: self.actions,
            tenants: (0..self.tenants.max(1))
                .map(crate::sim::SimTenant::default_for)
                .collect(),
            spread: self.spread,
            per_minute: self.per_minute,
            per_hour: self.per_hour,
            minute: Duration::from_secs_f64(self.minute_secs),
            hour: Duration::from_secs_f64(self.hour_secs),
            max_getfile_size: self.max_getfile_size,
            big_getfile: self.big_getfile,
            payloads: self.payloads.clone(),
            faults: self.faults.clone(),
            ..SimConfig::default()
        }
    }
}

pub async fn simulate(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| {
            crate::error::UserError::new(format!("cannot listen on {}: {e}", args.listen))
        })?;
    let addr = listener.local_addr()?;
    let sim = Simulator::new(args.sim_config());
    let base = format!("http://{addr}");
    println!("MDE simulator listening on {base}");
    for (i, t) in sim.tenants().iter().enumerate() {
        println!(
            "\n# tenant {i}: put the secret in a file (e.g. echo '{}' > sim-secret-{i}) and add to your config:",
            t.client_secret
        );
        print!(
            "{}",
            tenant_toml(
                &format!("sim{i}"),
                &t.tenant_id,
                &t.client_id,
                Path::new(&format!("sim-secret-{i}")),
                &base
            )
        );
    }
    println!("\nCtrl-C (or SIGTERM) stops it.");
    let t0 = std::time::Instant::now();
    sim.clone()
        .serve(listener, async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        })
        .await?;
    if let Some(path) = args.request_log {
        let mut out = String::new();
        for r in sim.requests() {
            out += &serde_json::json!({
                "t_ms": r.at.saturating_duration_since(t0).as_secs_f64() * 1000.0,
                "endpoint": r.endpoint,
                "tenant_id": r.tenant_id,
                "status": r.status,
                "authorization": r.authorization,
                "range": r.range,
            })
            .to_string();
            out.push('\n');
        }
        std::fs::write(&path, out)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn tenant_toml(
    name: &str,
    tenant_id: &str,
    client_id: &str,
    secret_file: &Path,
    base: &str,
) -> String {
    let host = base
        .trim_start_matches("http://")
        .rsplit_once(':')
        .map_or("127.0.0.1", |(h, _)| h)
        .to_string();
    format!(
        "[[tenant]]\nname = \"{name}\"\ntenant_id = \"{tenant_id}\"\nclient_id = \"{client_id}\"\nclient_secret_file = {}\napi_base = \"{base}\"\nlogin_base = \"{base}\"\ndownload_hosts = [\"{host}\"]\n",
        toml_string(&secret_file.to_string_lossy())
    )
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// Writes a config for the simulator at `base` under `dir` (secret files beside it), with
/// `extra` TOML sections appended; returns its path.
pub fn write_sim_config(
    dir: &Path,
    sim: &Simulator,
    base: &str,
    extra: &str,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut text = format!(
        "# Generated by lrvault for the built-in simulator at {base}\n[database]\npath = {}\n\n[store]\nroot = {}\n\n",
        toml_string(&dir.join("lrvault.db").to_string_lossy()),
        toml_string(&dir.join("evidence").to_string_lossy()),
    );
    for (i, t) in sim.tenants().iter().enumerate() {
        let secret = dir.join(format!("sim-secret-{i}"));
        std::fs::write(&secret, &t.client_secret)?;
        text += &tenant_toml(
            &format!("sim{i}"),
            &t.tenant_id,
            &t.client_id,
            &secret,
            base,
        );
        text += "\n";
    }
    text += extra;
    let path = dir.join("lrvault.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

pub async fn demo(dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let dir = match dir {
        Some(d) => d,
        None => tempfile_dir()?,
    };
    let sim_cfg = SimConfig {
        seed: 7,
        actions: 12,
        ..SimConfig::default()
    };
    let handle = Simulator::new(sim_cfg).start().await?;
    let base = handle.base_url();
    let config_path = write_sim_config(
        &dir,
        &handle.sim,
        &base,
        "[download]\nretry_base = \"1s\"\nretry_max = \"5s\"\n",
    )?;
    println!("simulator: {base}\nconfig:    {}", config_path.display());

    let cfg = Arc::new(Config::load(&config_path)?);
    let db = Db::open(&cfg.database.path)?;
    let ctx = Arc::new(Context::new(
        cfg.clone(),
        db.clone(),
        CancellationToken::new(),
    )?);
    let tenants: Vec<Arc<jobs::Tenant>> = ctx.tenants(None)?.into_iter().map(Arc::new).collect();
    for t in &tenants {
        let s = discover::lookback_pass(&ctx, t).await?;
        println!("discover:  {s}");
    }
    let scope = archive::Scope::default();
    let due = archive::due_count(&ctx, &tenants, &scope).await? as u64;
    let progress = Arc::new(crate::progress::Progress::new("archiving", due));
    let p = progress.clone();
    let summary =
        archive::archive(&ctx, &tenants, &scope, Some(Arc::new(move |_, _| p.inc()))).await?;
    progress.finish();
    println!("archive:   {summary}");
    let report = crate::verify::verify(&cfg, &db, None, None, false).await?;
    println!(
        "verify:    {} packages re-hashed, {} defects; custody chain {} rows, {} defects",
        report.packages_checked, report.package_defects, report.chain_rows, report.chain_defects
    );
    let conn = Db::open_readonly(&cfg.database.path)?;
    let rows = crate::render::Rows::query(
        &conn,
        "SELECT tenant, action_id, command_index AS idx, command_type, computer_dns_name, payload_name, payload_size,
                substr(payload_sha256, 1, 16) || '…' AS payload_sha256, package_path
         FROM v_evidence ORDER BY action_created_at, action_id, command_index",
        &[],
    )?;
    println!(
        "\nArchived evidence (v_evidence):\n{}",
        rows.render(Format::Table)
    );
    println!("Database:  {}", cfg.database.path.display());
    println!("Evidence:  {}", cfg.store.root.display());
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "lrvault".into());
    println!(
        "Try:       sqlite3 {} 'select * from v_custody limit 5'\n           {exe} --config {} status\n           {exe} --config {} audit evidence --format csv",
        cfg.database.path.display(),
        config_path.display(),
        config_path.display()
    );
    println!("Done in {:.1}s.", started.elapsed().as_secs_f64());
    handle.shutdown().await?;
    Ok(if report.ok() && summary.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// A new directory under the system temp dir that outlives the demo (to inspect afterwards).
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("lrvault-demo-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
