//! `lrvault simulate`: the built-in MDE API + blob simulator on its own (see [`lrvault_sim`]),
//! printing the config sections a user needs to point lrvault at it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args as ClapArgs;

use lrvault_sim::{Fault, SimConfig, Simulator, TlsIdentity};

#[derive(Debug, ClapArgs)]
pub struct Args {
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
    pub payloads: Vec<lrvault_sim::Payload>,
    /// Investigation package collections per tenant (getPackageUri: 2/min and 120/h)
    #[arg(long, default_value_t = 0)]
    pub packages: usize,
    /// Bytes of files in each generated investigation package
    #[arg(long, default_value_t = 32 << 20)]
    pub package_size: u64,
    /// getPackageUri calls allowed per minute window (MDE: 2)
    #[arg(long, default_value_t = 2)]
    pub package_per_minute: u32,
    /// getPackageUri calls allowed per hour window (MDE: 120)
    #[arg(long, default_value_t = 120)]
    pub package_per_hour: u32,
    /// Fault switch, repeatable: link-5xx=N, list-5xx=N, blob-5xx=N, blob-403=N, 429=N,
    /// unauthorized=N, slow=BYTES_PER_SEC, truncate=N, bad-md5=N, expired-links=N,
    /// link-ttl=SECS, token-ttl=SECS, hostile-names, foreign-host=N, http-link=N, redirect=N,
    /// gone=N, assertion-refused=N, federated-refused=N, managed-identity-refused=N,
    /// package-404=N, package-5xx=N
    #[arg(long = "fault", value_name = "FAULT")]
    pub faults: Vec<Fault>,
    /// On exit, write every request the simulator answered to this file (JSON lines:
    /// t_ms since start, endpoint, tenant_id, status, authorization, range); for benchmarks
    #[arg(long, value_name = "PATH")]
    pub request_log: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM, leaf first; for 127.0.0.1 or localhost),
    /// e.g. to try lrvault through a forward proxy, which tunnels only HTTPS. lrvault trusts
    /// it when its CA is in the system store or in SSL_CERT_FILE
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM)
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Write a ready config for every simulated tenant into this directory (lrvault.toml, a
    /// database and an evidence store beside it, each secret in a 0600 file) instead of
    /// printing the sections; for benchmarks and trials with many tenants
    #[arg(long, value_name = "DIR")]
    pub write_config: Option<PathBuf>,
}

impl Args {
    fn sim_config(&self) -> SimConfig {
        SimConfig {
            seed: self.seed,
            actions: self.actions,
            tenants: (0..self.tenants.max(1))
                .map(lrvault_sim::SimTenant::default_for)
                .collect(),
            spread: self.spread,
            per_minute: self.per_minute,
            per_hour: self.per_hour,
            minute: Duration::from_secs_f64(self.minute_secs),
            hour: Duration::from_secs_f64(self.hour_secs),
            max_getfile_size: self.max_getfile_size,
            big_getfile: self.big_getfile,
            payloads: self.payloads.clone(),
            packages: self.packages,
            package_size: self.package_size,
            package_per_minute: self.package_per_minute,
            package_per_hour: self.package_per_hour,
            faults: self.faults.clone(),
            ..SimConfig::default()
        }
    }
}

/// `s` in single quotes for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The `--tls-cert`/`--tls-key` identity, when given; a file that cannot be read or used is
/// one line naming it.
fn tls_identity(args: &Args) -> Result<Option<TlsIdentity>, crate::error::UserError> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let read = |p: &PathBuf| {
        std::fs::read(p)
            .map_err(|e| crate::error::UserError::new(format!("cannot read {}: {e}", p.display())))
    };
    TlsIdentity::from_pem(&read(cert)?, &read(key)?)
        .map(Some)
        .map_err(|e| {
            crate::error::UserError::new(format!(
                "--tls-cert {} / --tls-key {}: {e}",
                cert.display(),
                key.display()
            ))
        })
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let tls = tls_identity(&args)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| {
            crate::error::UserError::new(format!("cannot listen on {}: {e}", args.listen))
        })?;
    let addr = listener.local_addr()?;
    let sim = Simulator::new(args.sim_config());
    let base = match tls {
        Some(_) => format!("https://{addr}"),
        None => format!("http://{addr}"),
    };
    println!("MDE simulator listening on {base}");
    if let Some(dir) = &args.write_config {
        let dir = std::path::absolute(dir)?;
        let path = super::demo::write_sim_config(&dir, &sim, &base, "")?;
        println!(
            "config for {} tenants: {}",
            sim.tenants().len(),
            path.display()
        );
    } else {
        print_config(&sim, &base)?;
    }
    println!("\nCtrl-C (or SIGTERM) stops it.");
    let t0 = std::time::Instant::now();
    sim.clone()
        .serve(listener, tls, async {
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

/// Prints, for each simulated tenant, how to store its secret and its config section.
fn print_config(sim: &Simulator, base: &str) -> anyhow::Result<()> {
    let cwd = std::env::current_dir()?;
    for (i, t) in sim.tenants().iter().enumerate() {
        // Absolute: a relative name would be looked up in $CREDENTIALS_DIRECTORY or
        // whatever directory lrvault later runs in.
        let secret_file = cwd.join(format!("sim-secret-{i}"));
        println!(
            "\n# tenant {i}: write the secret to a file only you can read:\n#   ( umask 077; printf '%s' {} > {} )\n# and add to your config:",
            shell_quote(&t.client_secret),
            shell_quote(&secret_file.to_string_lossy())
        );
        print!(
            "{}",
            super::demo::tenant_toml(
                &format!("sim{i}"),
                &t.tenant_id,
                &t.client_id,
                &secret_file,
                base,
                sim.config().packages > 0
            )
        );
    }
    Ok(())
}
