//! The configuration file (`lrvault.toml`), turned into checked types in one step, the way
//! ripgrep turns low-level arguments into high-level ones: serde reads the TOML into raw
//! structs private to this module (a default for every key, unknown keys refused), and
//! [`Config::parse`] checks them into the [`Config`] the rest of the crate sees: the store as
//! an enum over its backends, URLs as [`url::Url`], paths absolute, schedules parsed, secret
//! sources resolved. `config.example.toml` documents every key and is parsed by a test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod anchor;
mod case_pattern;
mod cloud;
mod events;
mod schedule;
mod secret;
mod signin;
mod store;
mod tenant;

pub use anchor::{AnchorConfig, Witness};
pub use case_pattern::{CasePattern, DEFAULT_CASE_PATTERN, MAX_CASE_ID, case_id};
pub use cloud::{Cloud, Preset};
pub use events::{EVENT_KINDS, EventsConfig, MetricsConfig, SyslogTarget, Webhook};
pub use schedule::{Schedule, ScheduleConfig};
pub use secret::{
    Credentials, ExposeSecret, Secret, SecretSource, check_secret_text, load_secret_file,
};
pub(crate) use signin::base64url;
pub use signin::{ClientCertificate, CredentialFile, SignIn, read_federated_token};
pub use store::{
    Backend, Compression, ObjectStoreConfig, StoreBackend, StoreConfig, StoreCredentials,
};
pub use tenant::{COLLECTABLE, INVESTIGATION_PACKAGE, LIVE_RESPONSE, TenantConfig};

/// Every mistake in the configuration, each naming the thing to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source} (set --config or LRVAULT_CONFIG)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("invalid cron expression for {key} '{text}': {message}")]
    Schedule {
        key: &'static str,
        text: String,
        message: String,
    },
    #[error("tenant '{tenant}': {message}")]
    Secret { tenant: String, message: String },
    #[error("unknown tenant '{0}' (configured: {1})")]
    UnknownTenant(String, String),
    #[error("{0}")]
    Access(String),
}

/// The file as written: the raw form of every section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    database: DatabaseConfig,
    #[serde(default)]
    store: store::RawStore,
    #[serde(default)]
    quota: QuotaConfig,
    #[serde(default)]
    schedule: schedule::RawSchedule,
    #[serde(default)]
    discovery: DiscoveryConfig,
    #[serde(default)]
    download: DownloadConfig,
    #[serde(default)]
    anchor: anchor::RawAnchor,
    #[serde(default)]
    events: events::RawEvents,
    #[serde(default)]
    metrics: events::RawMetrics,
    #[serde(default, rename = "tenant")]
    tenants: Vec<tenant::RawTenant>,
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseConfig,
    pub store: StoreConfig,
    pub quota: QuotaConfig,
    pub schedule: ScheduleConfig,
    pub discovery: DiscoveryConfig,
    pub download: DownloadConfig,
    pub anchor: AnchorConfig,
    /// Where events go off the host, and which (docs/operations.md §16).
    pub events: EventsConfig,
    /// The OpenMetrics endpoint's address, if any.
    pub metrics: MetricsConfig,
    /// At least one, with distinct names.
    pub tenants: Vec<TenantConfig>,
    /// Where the object store's credentials and relative secret files are looked up.
    pub credentials: Credentials,
}

/// The configuration file a command loads, with the credentials directory `main` read at
/// start-up.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub credentials: Credentials,
}

impl ConfigFile {
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(&self.path, self.credentials.clone())
    }
}

/// `[database]`; its TOML form is its checked form (with `path` absolute).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub path: PathBuf,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            path: PathBuf::from("/var/lib/lrvault/lrvault.db"),
        }
    }
}

/// `[quota]`; its TOML form is its checked form (counts at least 1, windows positive).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    pub per_minute: u32,
    pub per_hour: u32,
    pub minute_secs: f64,
    pub hour_secs: f64,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            per_minute: 95,
            per_hour: 1450,
            minute_secs: 60.0,
            hour_secs: 3600.0,
        }
    }
}

impl QuotaConfig {
    pub fn minute(&self) -> Duration {
        Duration::from_secs_f64(self.minute_secs)
    }
    pub fn hour(&self) -> Duration {
        Duration::from_secs_f64(self.hour_secs)
    }
}

/// `[discovery]`; its TOML form is its checked form.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    #[serde(with = "humantime_serde")]
    pub lookback: Duration,
    pub statuses: Vec<String>,
    /// `$top` of each List page (the API allows up to 10,000; one page = one quota call).
    pub page_size: u32,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            lookback: Duration::from_secs(4 * 86400),
            statuses: ["Succeeded", "Failed", "TimeOut", "Cancelled"]
                .map(String::from)
                .to_vec(),
            page_size: 10_000,
        }
    }
}

/// `[download]`; its TOML form is its checked form.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadConfig {
    /// Transfers in flight for the whole process, shared by the tenants in turn.
    pub concurrency: usize,
    /// At most this many of them for one tenant; 0: no cap beyond `concurrency`.
    pub per_tenant: usize,
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    pub max_link_reissues: u32,
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            concurrency: 2,
            per_tenant: 0,
            read_timeout: Duration::from_secs(60),
            max_link_reissues: 3,
            max_attempts: 8,
            retry_base: Duration::from_secs(30),
            retry_max: Duration::from_secs(30 * 60),
        }
    }
}

impl Config {
    /// Loads and checks the file at `path`; relative secret files and the object store's
    /// credentials are looked up in `credentials`.
    pub fn load(path: &Path, credentials: Credentials) -> Result<Config, ConfigError> {
        crate::access::check_config_file(path).map_err(ConfigError::Access)?;
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path, credentials)
    }

    /// Parses and checks `text` (read from `path`, for messages).
    pub fn parse(text: &str, path: &Path, credentials: Credentials) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string() + &toml_location(text, e.span()),
        })?;
        raw.check(credentials)
    }

    /// Checks, before a command writes, that this process may write the database (its
    /// directory and files) and the evidence store's staging directory (or create them),
    /// and is not root writing into a tree the service user owns. One line naming the path,
    /// its owner and mode, and this user; the database's check is the one `Db::open` makes.
    pub fn check_writable(&self) -> Result<(), ConfigError> {
        crate::access::check_database_writable(&self.database.path).map_err(ConfigError::Access)?;
        let (key, dir) = self.store.staging();
        crate::access::check_not_root_over(key, dir).map_err(ConfigError::Access)?;
        crate::access::check_dir_writable(key, dir).map_err(ConfigError::Access)
    }

    /// The tenants a command acts on: all, or the one named by `--tenant`.
    pub fn select_tenants(&self, name: Option<&str>) -> Result<Vec<&TenantConfig>, ConfigError> {
        match name {
            None => Ok(self.tenants.iter().collect()),
            Some(n) => self
                .tenants
                .iter()
                .find(|t| t.name == n)
                .map(|t| vec![t])
                .ok_or_else(|| {
                    ConfigError::UnknownTenant(
                        n.into(),
                        self.tenants
                            .iter()
                            .map(|t| t.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    )
                }),
        }
    }
}

impl RawConfig {
    /// Every section checked into its type; the first mistake is the error.
    fn check(self, credentials: Credentials) -> Result<Config, ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.into()));
        let database = DatabaseConfig {
            path: absolute("database.path", self.database.path)?,
        };
        let store = self.store.check()?;
        let q = &self.quota;
        if q.per_minute == 0 || q.per_hour == 0 {
            return invalid("quota.per_minute and quota.per_hour must be at least 1");
        }
        if !(q.minute_secs > 0.0
            && q.hour_secs > 0.0
            && q.minute_secs.is_finite()
            && q.hour_secs.is_finite())
        {
            return invalid("quota.minute_secs and quota.hour_secs must be positive");
        }
        let d = &self.download;
        if d.concurrency == 0 || d.concurrency > 64 {
            return invalid("download.concurrency must be between 1 and 64");
        }
        if d.max_attempts == 0 {
            return invalid("download.max_attempts must be at least 1");
        }
        if d.read_timeout.is_zero() {
            return invalid("download.read_timeout must be positive");
        }
        if self.discovery.page_size == 0 || self.discovery.page_size > 10_000 {
            return invalid("discovery.page_size must be between 1 and 10000");
        }
        let anchor = self.anchor.check()?;
        let schedule = self.schedule.check()?;
        let events = self.events.check(&credentials)?;
        let metrics = self.metrics.check()?;
        let tenants = check_tenants(self.tenants, &credentials)?;
        Ok(Config {
            database,
            store,
            quota: self.quota,
            schedule,
            discovery: self.discovery,
            download: self.download,
            anchor,
            events,
            metrics,
            tenants,
            credentials,
        })
    }
}

/// At least one tenant, each named `[a-z0-9-]+` once, each checked.
fn check_tenants(
    raw: Vec<tenant::RawTenant>,
    credentials: &Credentials,
) -> Result<Vec<TenantConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::Invalid("no [[tenant]] is configured".into()));
    }
    let mut seen = std::collections::HashSet::new();
    let mut tenants = Vec::with_capacity(raw.len());
    for t in raw {
        let name = t.name();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(ConfigError::Invalid(format!(
                "tenant name '{name}' must match [a-z0-9-]+ (it is used in paths and rows)"
            )));
        }
        if !seen.insert(name.to_string()) {
            return Err(ConfigError::Invalid(format!(
                "tenant name '{name}' is configured twice"
            )));
        }
        tenants.push(t.check(credentials)?);
    }
    Ok(tenants)
}

/// `path` when it is absolute; a relative one is refused, naming `key`: lrvault never
/// resolves a path against the working directory.
fn absolute(key: &str, path: PathBuf) -> Result<PathBuf, ConfigError> {
    if path.is_absolute() {
        return Ok(path);
    }
    Err(ConfigError::Invalid(format!(
        "{key} = {:?} is a relative path; write it absolute: lrvault never resolves paths against the working directory",
        path.display().to_string()
    )))
}

/// `https` everywhere; plain `http` only to loopback hosts (the simulator and tests).
fn check_base_url(value: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(value).map_err(|e| format!("'{value}' is not a URL: {e}"))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback_host(&url) => Ok(url),
        _ => Err(format!(
            "'{value}' must use https (http is allowed only for loopback hosts)"
        )),
    }
}

/// True for 127.0.0.0/8, ::1 and localhost.
pub fn is_loopback_host(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

fn toml_location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    span.map(|s| {
        format!(
            " (line {})",
            text[..s.start.min(text.len())].lines().count().max(1)
        )
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests;
