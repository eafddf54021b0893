//! The configuration file (`lrvault.toml`): one serde definition with a default for every
//! key, validated into values the rest of the crate can trust. `config.example.toml`
//! documents every key and is parsed by a test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod anchor;
pub use anchor::{AnchorConfig, Witness};

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
    #[error("tenant '{tenant}': {message}")]
    Secret { tenant: String, message: String },
    #[error("unknown tenant '{0}' (configured: {1})")]
    UnknownTenant(String, String),
    #[error("{0}")]
    Access(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub quota: QuotaConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    #[serde(default)]
    pub download: DownloadConfig,
    #[serde(default)]
    pub anchor: AnchorConfig,
    #[serde(default, rename = "tenant")]
    pub tenants: Vec<TenantConfig>,
}

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

/// `[store]`: where evidence packages live (docs/evidence-format.md, §7b).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// The package directory of the `fs` backend.
    pub root: PathBuf,
    pub compression: Compression,
    /// `s3` / `azure`: local disk where packages are written and checked before upload.
    pub spool: PathBuf,
    /// S3 bucket or Azure container.
    pub bucket: String,
    /// Key prefix; keys are the §7 relative paths below it.
    pub prefix: String,
    /// S3-compatible endpoint or Azure blob service URL; empty: the provider's default.
    pub endpoint: String,
    /// S3 region (Azure ignores it).
    pub region: String,
    pub credentials: StoreCredentials,
    /// Refuse to start unless the bucket/container enforces retention. Unset: true for
    /// `s3` and `azure`, false for `fs` (see [`StoreConfig::worm_required`]).
    pub require_worm: Option<bool>,
    /// `s3` / `azure`: finished packages the spool may hold while they wait for the store;
    /// at this many, no new download starts until the store takes them.
    pub spool_max_waiting: usize,
    /// `s3` / `azure`: how long one store request is retried (connection errors, 5xx, 429)
    /// before the attempt gives up, hands its result back uncharged and the pass pauses.
    #[serde(with = "humantime_serde_compat")]
    pub retry_timeout: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Fs,
            root: PathBuf::from("/var/lib/lrvault/evidence"),
            compression: Compression::Auto,
            spool: PathBuf::from("/var/lib/lrvault/spool"),
            bucket: String::new(),
            prefix: String::new(),
            endpoint: String::new(),
            region: String::new(),
            credentials: StoreCredentials::Env,
            require_worm: None,
            spool_max_waiting: 16,
            retry_timeout: Duration::from_secs(180),
        }
    }
}

impl StoreConfig {
    /// Whether start-up must prove retention: on by default for object stores.
    pub fn worm_required(&self) -> bool {
        self.require_worm
            .unwrap_or(self.backend != StoreBackend::Fs)
    }

    /// The local directory packages are written in: `store.root` for `fs`, the spool for
    /// object stores.
    pub fn staging_dir(&self) -> &Path {
        match self.backend {
            StoreBackend::Fs => &self.root,
            StoreBackend::S3 | StoreBackend::Azure => &self.spool,
        }
    }

    /// The config key of [`staging_dir`](Self::staging_dir), for messages.
    pub fn staging_key(&self) -> &'static str {
        match self.backend {
            StoreBackend::Fs => "store.root",
            StoreBackend::S3 | StoreBackend::Azure => "store.spool",
        }
    }

    /// The checks of this section; its paths are checked with every other path key
    /// (`Config::path_keys`).
    fn validate(&self) -> Result<(), String> {
        if self.backend == StoreBackend::Fs {
            if self.require_worm == Some(true) {
                return Err("store.require_worm = true needs backend \"s3\" or \"azure\": a local directory cannot enforce retention".into());
            }
            return Ok(());
        }
        if self.spool_max_waiting == 0 {
            return Err("store.spool_max_waiting must be at least 1".into());
        }
        if self.retry_timeout.is_zero() {
            return Err("store.retry_timeout must be positive".into());
        }
        if self.spool.starts_with(&self.root) || self.root.starts_with(&self.spool) {
            return Err(format!(
                "store.spool '{}' and store.root '{}' must not contain each other",
                self.spool.display(),
                self.root.display()
            ));
        }
        check_bucket_name(self.backend, &self.bucket)?;
        if !self.prefix.is_empty()
            && self
                .prefix
                .trim_end_matches('/')
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == ".." || s.chars().any(char::is_control))
        {
            return Err(format!(
                "store.prefix '{}' must be path segments separated by '/' (e.g. \"lrvault/\"), without '.', '..', empty segments or a leading '/'",
                self.prefix
            ));
        }
        if !self.endpoint.is_empty() {
            check_base_url(&self.endpoint).map_err(|m| format!("store.endpoint {m}"))?;
        }
        if self.backend == StoreBackend::S3 && self.region.trim().is_empty() {
            return Err("store.region is required for backend \"s3\" (e.g. \"eu-west-1\")".into());
        }
        Ok(())
    }
}

/// S3: 3–63 of `[a-z0-9.-]`; Azure containers: 3–63 of `[a-z0-9-]`; both start and end
/// with a letter or digit.
fn check_bucket_name(backend: StoreBackend, name: &str) -> Result<(), String> {
    let (what, dot_ok) = match backend {
        StoreBackend::Azure => ("container", false),
        _ => ("bucket", true),
    };
    if name.is_empty() {
        return Err(format!(
            "store.bucket is required for backend \"{backend}\" (the {what} name)"
        ));
    }
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dot_ok && c == '.');
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !(3..=63).contains(&name.len())
        || !name.chars().all(ok_char)
        || !edge_ok(name.chars().next())
        || !edge_ok(name.chars().last())
    {
        return Err(format!(
            "store.bucket '{name}' is not a valid {backend} {what} name (3-63 lowercase letters, digits{}, '-')",
            if dot_ok { ", '.'" } else { "" }
        ));
    }
    Ok(())
}

/// `store.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// A local directory (`store.root`), docs/evidence-format.md.
    #[default]
    Fs,
    /// Amazon S3 or an S3-compatible store, with Object Lock.
    S3,
    /// Azure Blob Storage, with a version-level immutability policy.
    Azure,
}

impl std::fmt::Display for StoreBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreBackend::Fs => "fs",
            StoreBackend::S3 => "s3",
            StoreBackend::Azure => "azure",
        })
    }
}

/// `store.credentials`: where the object store's credentials come from. Never the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreCredentials {
    /// `AWS_*` / `AZURE_STORAGE_*` variables, or systemd credentials of the same names.
    #[default]
    Env,
    /// The platform's identity: EC2/ECS/EKS roles, Azure managed or workload identity.
    Instance,
}

/// How payload entries are compressed inside the zip (config key `store.compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Store payloads that are already compressed (gzip, zip, 7z, xz, zstd, bzip2), deflate the rest.
    #[default]
    Auto,
    Deflate,
    Stored,
}

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    pub discover: String,
    pub archive: String,
    pub verify: String,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            discover: "0 */5 * * * *".into(),
            archive: "30 * * * * *".into(),
            verify: "0 17 3 * * *".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    #[serde(with = "humantime_serde_compat")]
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadConfig {
    /// Transfers in flight for the whole process, shared by the tenants in turn.
    pub concurrency: usize,
    /// At most this many of them for one tenant; 0: no cap beyond `concurrency`.
    pub per_tenant: usize,
    #[serde(with = "humantime_serde_compat")]
    pub read_timeout: Duration,
    pub max_link_reissues: u32,
    pub max_attempts: u32,
    #[serde(with = "humantime_serde_compat")]
    pub retry_base: Duration,
    #[serde(with = "humantime_serde_compat")]
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    pub tenant_id: String,
    pub client_id: String,
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// Only here to refuse it with a clear message: secrets never live in the TOML.
    #[serde(default)]
    client_secret: Option<toml::Value>,
    #[serde(default = "default_api_base")]
    pub api_base: String,
    #[serde(default = "default_login_base")]
    pub login_base: String,
    #[serde(default = "default_scope")]
    pub scope: String,
    #[serde(default = "default_download_hosts")]
    pub download_hosts: Vec<String>,
}

fn default_api_base() -> String {
    "https://api.security.microsoft.com".into()
}
fn default_login_base() -> String {
    "https://login.microsoftonline.com".into()
}
fn default_scope() -> String {
    "https://api.securitycenter.microsoft.com/.default".into()
}
fn default_download_hosts() -> Vec<String> {
    vec!["*.blob.core.windows.net".into()]
}

/// A client secret. Its Debug output never shows the value.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl TenantConfig {
    /// Where the secret comes from, for messages (never its value).
    pub fn secret_source(&self) -> String {
        match (&self.client_secret_file, &self.client_secret_env) {
            (Some(path), _) => format!("client_secret_file {}", resolve_credential(path).display()),
            (None, Some(var)) => format!("client_secret_env {var}"),
            (None, None) => "no client secret configured".into(),
        }
    }

    /// Reads the client secret from its file or environment variable, refusing a file every
    /// user can read and contents an editor has mangled (see [`check_secret_text`]).
    pub fn load_secret(&self) -> Result<Secret, ConfigError> {
        let err = |message: String| ConfigError::Secret {
            tenant: self.name.clone(),
            message,
        };
        let (raw, source) = match (&self.client_secret_file, &self.client_secret_env) {
            (Some(path), None) => {
                let resolved = resolve_credential(path);
                let source = format!("client_secret_file {}", resolved.display());
                (read_secret_file(path, &resolved).map_err(err)?, source)
            }
            (None, Some(var)) => (
                std::env::var(var).map_err(|_| {
                    err(format!(
                        "environment variable {var} (client_secret_env) is not set or not UTF-8"
                    ))
                })?,
                format!("client_secret_env {var}"),
            ),
            _ => {
                return Err(err(
                    "set exactly one of client_secret_file or client_secret_env".into(),
                ));
            }
        };
        let secret = check_secret_text(&raw).map_err(|m| err(format!("{source} {m}")))?;
        Ok(Secret(secret.to_string()))
    }
}

/// Reads a secret file: not found under a relative name says where it was looked for, and
/// a file every user can read is refused (a group that is not ours gets a warning).
fn read_secret_file(configured: &Path, path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let mut m = format!("cannot read client_secret_file {}: {e}", path.display());
        if configured.is_relative() && std::env::var_os("CREDENTIALS_DIRECTORY").is_none() {
            let cwd = std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|_| "?".into());
            m += &format!(
                " (the relative name was looked up in the working directory {cwd} because $CREDENTIALS_DIRECTORY is not set: run under systemd with LoadCredential=, or write an absolute path)"
            );
        }
        m
    })?;
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot inspect client_secret_file {}: {e}", path.display()))?;
    match crate::access::secret_exposure(&meta) {
        crate::access::SecretExposure::Private => {}
        crate::access::SecretExposure::World => {
            return Err(format!(
                "client_secret_file {} is readable by every user ({}); chmod 0600 it (0640 with the service's group) and rotate the secret if others may have read it",
                path.display(),
                crate::access::describe(&meta)
            ));
        }
        crate::access::SecretExposure::Group(group) => tracing::warn!(
            path = %path.display(),
            "client_secret_file is readable by group {group}, which this process is not in; only its owner and the service need it"
        ),
    }
    Ok(text)
}

/// The secret inside `raw`: at most one trailing newline is dropped. A byte order mark,
/// whitespace around the value (a `\r` from a Windows editor, a trailing space, a blank
/// line) or a second line would be sent to the identity provider as part of the secret and
/// refused there with a message that says nothing about the file, so it is refused here.
/// Messages never show the value.
pub fn check_secret_text(raw: &str) -> Result<&str, String> {
    if raw.starts_with('\u{feff}') {
        return Err(
            "starts with a byte order mark (U+FEFF); save it as plain UTF-8 without BOM".into(),
        );
    }
    let secret = raw.strip_suffix('\n').unwrap_or(raw);
    if secret.is_empty() {
        return Err("is empty".into());
    }
    if let Some(last) = secret.chars().last().filter(|c| c.is_whitespace()) {
        return Err(format!(
            "ends with {} after the secret; only one final newline is allowed (write it with printf '%s')",
            whitespace_name(last)
        ));
    }
    if let Some(first) = secret.chars().next().filter(|c| c.is_whitespace()) {
        return Err(format!(
            "starts with {}; the file must hold the secret value alone",
            whitespace_name(first)
        ));
    }
    if secret.contains(['\n', '\r']) {
        return Err("holds more than one line; it must hold the secret value alone".into());
    }
    Ok(secret)
}

/// A relative `client_secret_file` names a systemd credential when the service runs with
/// `LoadCredential=` (`$CREDENTIALS_DIRECTORY` is set), so one config serves the daemon and
/// `systemd-run` one-shots alike; otherwise it is relative to the working directory (and a
/// file not found there says so).
fn resolve_credential(path: &Path) -> PathBuf {
    match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(dir) if path.is_relative() => Path::new(&dir).join(path),
        _ => path.to_path_buf(),
    }
}

fn whitespace_name(c: char) -> &'static str {
    match c {
        '\r' => "a carriage return (\\r, a Windows line ending)",
        '\n' => "a second newline",
        ' ' => "a space",
        '\t' => "a tab",
        _ => "a whitespace character",
    }
}

impl Config {
    /// Loads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        crate::access::check_config_file(path).map_err(ConfigError::Access)?;
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string() + &toml_location(text, e.span()),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every path key, with its name for messages. A new path key gets one line here, and
    /// with it the absolute-path check. An empty value means "not set" and is skipped.
    fn path_keys(&self) -> Vec<(&'static str, &Path)> {
        vec![
            ("database.path", self.database.path.as_path()),
            ("store.root", self.store.root.as_path()),
            ("store.spool", self.store.spool.as_path()),
            ("anchor.tsa_ca_file", Path::new(&self.anchor.tsa_ca_file)),
        ]
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        for (key, path) in self.path_keys() {
            if !path.as_os_str().is_empty() && !path.is_absolute() {
                return invalid(format!(
                    "{key} = {:?} is a relative path; write it absolute: lrvault never resolves paths against the working directory",
                    path.display().to_string()
                ));
            }
        }
        let q = &self.quota;
        if q.per_minute == 0 || q.per_hour == 0 {
            return invalid("quota.per_minute and quota.per_hour must be at least 1".into());
        }
        if !(q.minute_secs > 0.0
            && q.hour_secs > 0.0
            && q.minute_secs.is_finite()
            && q.hour_secs.is_finite())
        {
            return invalid("quota.minute_secs and quota.hour_secs must be positive".into());
        }
        self.store.validate().map_err(ConfigError::Invalid)?;
        let d = &self.download;
        if d.concurrency == 0 || d.concurrency > 64 {
            return invalid("download.concurrency must be between 1 and 64".into());
        }
        if d.max_attempts == 0 {
            return invalid("download.max_attempts must be at least 1".into());
        }
        if d.read_timeout.is_zero() {
            return invalid("download.read_timeout must be positive".into());
        }
        if self.discovery.page_size == 0 || self.discovery.page_size > 10_000 {
            return invalid("discovery.page_size must be between 1 and 10000".into());
        }
        self.anchor.validate()?;
        if self.tenants.is_empty() {
            return invalid("no [[tenant]] is configured".into());
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.tenants {
            let bad = |m: String| Err(ConfigError::Invalid(format!("tenant '{}': {m}", t.name)));
            if t.name.is_empty()
                || !t
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return invalid(format!(
                    "tenant name '{}' must match [a-z0-9-]+ (it is used in paths and rows)",
                    t.name
                ));
            }
            if !seen.insert(t.name.as_str()) {
                return invalid(format!("tenant name '{}' is configured twice", t.name));
            }
            if t.client_secret.is_some() {
                return bad(
                    "client_secret must not be written in the config file; use client_secret_file or client_secret_env"
                        .into(),
                );
            }
            match (&t.client_secret_file, &t.client_secret_env) {
                (Some(_), None) | (None, Some(_)) => {}
                (None, None) => return bad("set client_secret_file or client_secret_env".into()),
                (Some(_), Some(_)) => {
                    return bad("set only one of client_secret_file and client_secret_env".into());
                }
            }
            if t.tenant_id.trim().is_empty() || t.client_id.trim().is_empty() {
                return bad("tenant_id and client_id are required".into());
            }
            for (key, value) in [("api_base", &t.api_base), ("login_base", &t.login_base)] {
                if let Err(m) = check_base_url(value) {
                    return bad(format!("{key} {m}"));
                }
            }
            if t.download_hosts.is_empty() {
                return bad("download_hosts must list at least one host pattern".into());
            }
            if !t.scope.ends_with("/.default") {
                return bad(format!(
                    "scope '{}' must end in /.default for client credentials",
                    t.scope
                ));
            }
        }
        Ok(())
    }

    /// Checks, before a command writes, that this process may write the database's directory
    /// and the evidence store (or create them), and is not root writing into a tree the
    /// service user owns. One line naming the path, its owner and mode, and this user.
    pub fn check_writable(&self) -> Result<(), ConfigError> {
        let dirs = [
            (
                "the database directory",
                self.database.path.parent().unwrap_or(Path::new("/")),
            ),
            (self.store.staging_key(), self.store.staging_dir()),
        ];
        for (what, dir) in dirs {
            crate::access::check_not_root_over(what, dir).map_err(ConfigError::Access)?;
            crate::access::check_dir_writable(what, dir).map_err(ConfigError::Access)?;
        }
        Ok(())
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

/// `https` everywhere; plain `http` only to loopback hosts (the simulator and tests).
fn check_base_url(value: &str) -> Result<(), String> {
    let url = url::Url::parse(value).map_err(|e| format!("'{value}' is not a URL: {e}"))?;
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_host(&url) => Ok(()),
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

/// Durations written as "60s", "4d", "30m" (humantime).
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration '{s}': {e} (e.g. \"60s\", \"4d\")"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    /// A secret file as lrvault accepts it: 0600.
    fn write_secret(path: &Path, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    const TENANT: &str = r#"
[[tenant]]
name = "contoso"
tenant_id = "t"
client_id = "c"
client_secret_env = "X"
"#;

    #[test]
    fn example_config_parses_with_documented_values() {
        let text = include_str!("../config.example.toml");
        let cfg = parse(text).unwrap();
        assert_eq!(cfg.quota.per_minute, 95);
        assert_eq!(cfg.quota.per_hour, 1450);
        assert_eq!(cfg.discovery.lookback, Duration::from_secs(4 * 86400));
        assert_eq!(cfg.download.retry_max, Duration::from_secs(1800));
        assert_eq!(cfg.tenants[0].name, "contoso");
        assert_eq!(cfg.store.compression, Compression::Auto);
        assert_eq!(cfg.store.backend, StoreBackend::Fs);
        assert_eq!(cfg.store.spool, PathBuf::from("/var/lib/lrvault/spool"));
        assert_eq!(cfg.store.require_worm, None);
        assert_eq!(cfg.anchor.tsa_url(), None);
        assert_eq!(cfg.anchor.tsa_ca_file(), None);
    }

    #[test]
    fn anchor_keys_are_checked() {
        let with = |anchor: &str| parse(&format!("[anchor]\n{anchor}\n{TENANT}"));
        let cfg = with(
            "tsa_url = \"https://tsa.example.org/tsr\"\ntsa_ca_file = \"/etc/lrvault/tsa-ca.pem\"\ntsa_policy = \"1.2.3.4.1\"",
        )
        .unwrap();
        assert_eq!(cfg.anchor.tsa_url(), Some("https://tsa.example.org/tsr"));
        assert_eq!(
            cfg.anchor.tsa_ca_file(),
            Some(Path::new("/etc/lrvault/tsa-ca.pem"))
        );
        assert_eq!(cfg.anchor.tsa_policy(), Some("1.2.3.4.1"));
        let e = with("tsa_ca_file = \"tsa-ca.pem\"")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid config: anchor.tsa_ca_file = \"tsa-ca.pem\" is a relative path; write it absolute: lrvault never resolves paths against the working directory"
        );
        let e = with("tsa_url = \"http://tsa.example.org/\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("anchor.tsa_url 'http://tsa.example.org/' must use https"),
            "{e}"
        );
        let e = with("tsa_policy = \"policy\"").unwrap_err().to_string();
        assert!(
            e.contains("anchor.tsa_policy 'policy' is not an object identifier"),
            "{e}"
        );
        let e = with("tsa_url = \"https://tsa.example.org/tsr\"")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid config: anchor.tsa_url is set but tsa_ca_file is empty: a token counts only when it verifies against the TSA's own CA certificate; set tsa_ca_file to that PEM file (docs/operations.md)"
        );
    }

    #[test]
    fn token_delay_and_witness_are_parsed_and_checked() {
        let with = |anchor: &str| parse(&format!("[anchor]\n{anchor}\n{TENANT}"));
        let cfg = with("").unwrap();
        assert_eq!(cfg.anchor.max_token_delay, Duration::from_secs(86400));
        assert_eq!(cfg.anchor.witness(), None);
        let cfg = with("max_token_delay = \"90m\"\nwitness = \"/mnt/witness/lrvault\"").unwrap();
        assert_eq!(cfg.anchor.max_token_delay, Duration::from_secs(5400));
        assert_eq!(
            cfg.anchor.witness(),
            Some(Witness::Dir("/mnt/witness/lrvault".into()))
        );
        let cfg = with("witness = \"s3://witness-bucket/vault1/\"").unwrap();
        assert_eq!(
            cfg.anchor.witness(),
            Some(Witness::S3 {
                bucket: "witness-bucket".into(),
                prefix: "vault1".into()
            })
        );
        let cfg = with("witness = \"azure://acct/cont/a/b\"").unwrap();
        assert_eq!(
            cfg.anchor.witness(),
            Some(Witness::Azure {
                account: "acct".into(),
                container: "cont".into(),
                prefix: "a/b".into()
            })
        );
        for (value, message) in [
            (
                "witness/dir",
                "invalid config: anchor.witness = \"witness/dir\" is a relative path; write it absolute: lrvault never resolves paths against the working directory",
            ),
            (
                "s3://",
                "invalid config: anchor.witness 's3://': write s3://bucket/prefix",
            ),
            (
                "azure://acct",
                "invalid config: anchor.witness 'azure://acct': write azure://account/container/prefix",
            ),
            (
                "ftp://host/x",
                "invalid config: anchor.witness 'ftp://host/x': only an absolute directory, s3://bucket/prefix or azure://account/container/prefix",
            ),
        ] {
            let e = with(&format!("witness = \"{value}\""))
                .unwrap_err()
                .to_string();
            assert_eq!(e, message);
        }
        let e = with("max_token_delay = \"0s\"").unwrap_err().to_string();
        assert_eq!(e, "invalid config: anchor.max_token_delay must be positive");
    }

    #[test]
    fn defaults_fill_every_section() {
        let cfg = parse(TENANT).unwrap();
        assert_eq!(cfg.download.concurrency, 2);
        assert_eq!(cfg.schedule.archive, "30 * * * * *");
        assert_eq!(
            cfg.tenants[0].download_hosts,
            vec!["*.blob.core.windows.net".to_string()]
        );
    }

    #[test]
    fn refuses_inline_secret_bad_names_and_plain_http() {
        let e = parse(&format!("{TENANT}client_secret = \"hunter2\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("client_secret must not be written"), "{e}");
        assert!(!e.contains("hunter2"));
        let e = parse(&TENANT.replace("contoso", "Contoso_1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("must match [a-z0-9-]+"), "{e}");
        let e = parse(&format!("{TENANT}api_base = \"http://api.example.com\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("must use https"), "{e}");
        parse(&format!("{TENANT}api_base = \"http://127.0.0.1:8080\"\n")).unwrap();
        let e = parse(&format!("{TENANT}[store]\nbogus = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `bogus`"), "{e}");
        let e = parse("[download]\nread_timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid duration 'soon'"), "{e}");
    }

    #[test]
    fn the_store_defaults_to_fs_and_object_stores_require_worm() {
        let cfg = parse(TENANT).unwrap();
        assert_eq!(cfg.store.backend, StoreBackend::Fs);
        assert!(!cfg.store.worm_required());
        let s3 = format!(
            "{TENANT}[store]\nbackend = \"s3\"\nbucket = \"evidence\"\nregion = \"eu-west-1\"\nprefix = \"lrvault/\"\n"
        );
        let cfg = parse(&s3).unwrap();
        assert_eq!(cfg.store.backend, StoreBackend::S3);
        assert_eq!(cfg.store.spool, PathBuf::from("/var/lib/lrvault/spool"));
        assert_eq!(cfg.store.spool_max_waiting, 16);
        assert_eq!(cfg.store.retry_timeout, Duration::from_secs(180));
        assert_eq!(cfg.store.staging_dir(), Path::new("/var/lib/lrvault/spool"));
        assert_eq!(cfg.store.staging_key(), "store.spool");
        let cfg = parse(&format!(
            "{s3}retry_timeout = \"20s\"\nspool_max_waiting = 4\n"
        ))
        .unwrap();
        assert_eq!(
            (cfg.store.retry_timeout, cfg.store.spool_max_waiting),
            (Duration::from_secs(20), 4)
        );
        assert_eq!(cfg.store.credentials, StoreCredentials::Env);
        assert!(cfg.store.worm_required(), "on by default for object stores");
        let cfg = parse(&format!("{s3}require_worm = false\n")).unwrap();
        assert!(!cfg.store.worm_required());
        let cfg = parse(&format!(
            "{s3}credentials = \"instance\"\nendpoint = \"http://127.0.0.1:9000\"\n"
        ))
        .unwrap();
        assert_eq!(cfg.store.credentials, StoreCredentials::Instance);
    }

    #[test]
    fn store_mistakes_are_one_line_each() {
        let store = |extra: &str| {
            parse(&format!("{TENANT}[store]\n{extra}\n"))
                .unwrap_err()
                .to_string()
        };
        let s3 = "backend = \"s3\"\nbucket = \"evidence\"\nregion = \"eu-west-1\"";
        for (extra, want) in [
            (
                "root = \"evidence\"",
                "invalid config: store.root = \"evidence\" is a relative path; write it absolute",
            ),
            (
                "require_worm = true",
                "invalid config: store.require_worm = true needs backend \"s3\" or \"azure\": a local directory cannot enforce retention",
            ),
            (
                &format!("{s3}\nspool = \"spool\""),
                "invalid config: store.spool = \"spool\" is a relative path; write it absolute",
            ),
            (
                &format!("{s3}\nspool = \"/var/lib/lrvault/evidence/spool\""),
                "invalid config: store.spool '/var/lib/lrvault/evidence/spool' and store.root '/var/lib/lrvault/evidence' must not contain each other",
            ),
            (
                "backend = \"s3\"\nregion = \"eu-west-1\"",
                "invalid config: store.bucket is required for backend \"s3\" (the bucket name)",
            ),
            (
                "backend = \"azure\"\nbucket = \"Evidence.2026\"",
                "invalid config: store.bucket 'Evidence.2026' is not a valid azure container name (3-63 lowercase letters, digits, '-')",
            ),
            (
                "backend = \"s3\"\nbucket = \"evidence\"",
                "invalid config: store.region is required for backend \"s3\" (e.g. \"eu-west-1\")",
            ),
            (
                &format!("{s3}\nprefix = \"/lrvault\""),
                "invalid config: store.prefix '/lrvault' must be path segments separated by '/' (e.g. \"lrvault/\"), without '.', '..', empty segments or a leading '/'",
            ),
            (&format!("{s3}\nprefix = \"a/../b\""), "without '.', '..'"),
            (
                &format!("{s3}\nendpoint = \"http://s3.example.com\""),
                "invalid config: store.endpoint 'http://s3.example.com' must use https (http is allowed only for loopback hosts)",
            ),
            (
                "backend = \"gcs\"",
                "unknown variant `gcs`, expected one of `fs`, `s3`, `azure`",
            ),
            (
                "credentials = \"inline\"",
                "unknown variant `inline`, expected `env` or `instance`",
            ),
            (
                &format!("{s3}\nspool_max_waiting = 0"),
                "invalid config: store.spool_max_waiting must be at least 1",
            ),
            (
                &format!("{s3}\nretry_timeout = \"0s\""),
                "invalid config: store.retry_timeout must be positive",
            ),
            (
                "secret_access_key = \"x\"",
                "unknown field `secret_access_key`",
            ),
        ] {
            let e = store(extra);
            assert!(e.contains(want), "{extra}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn secret_errors_name_the_source_and_never_the_value() {
        let cfg = parse(&TENANT.replace(
            "client_secret_env = \"X\"",
            "client_secret_file = \"/nonexistent/s\"",
        ))
        .unwrap();
        let e = cfg.tenants[0].load_secret().unwrap_err().to_string();
        assert!(
            e.starts_with("tenant 'contoso': cannot read client_secret_file /nonexistent/s"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        write_secret(&p, "s3cr3t\n");
        let cfg = parse(&TENANT.replace(
            "client_secret_env = \"X\"",
            &format!("client_secret_file = {:?}", p),
        ))
        .unwrap();
        let s = cfg.tenants[0].load_secret().unwrap();
        assert_eq!(s.expose(), "s3cr3t");
        assert_eq!(format!("{s:?}"), "Secret(***)");
    }

    #[test]
    fn relative_secret_files_resolve_in_the_credentials_directory() {
        // Only this test sets CREDENTIALS_DIRECTORY (tests share the environment).
        let dir = tempfile::tempdir().unwrap();
        write_secret(&dir.path().join("contoso"), "from-systemd\n");
        let cfg = parse(&TENANT.replace(
            "client_secret_env = \"X\"",
            "client_secret_file = \"contoso\"",
        ))
        .unwrap();
        // SAFETY: no other test reads or writes this variable.
        unsafe { std::env::set_var("CREDENTIALS_DIRECTORY", dir.path()) };
        let secret = cfg.tenants[0].load_secret();
        unsafe { std::env::remove_var("CREDENTIALS_DIRECTORY") };
        assert_eq!(secret.unwrap().expose(), "from-systemd");
    }

    #[test]
    fn relative_paths_are_refused_and_absolute_ones_kept() {
        for (section, key) in [
            ("database", "path"),
            ("store", "root"),
            ("store", "spool"),
            ("anchor", "tsa_ca_file"),
        ] {
            let e = parse(&format!("{TENANT}[{section}]\n{key} = \"rel/x\"\n"))
                .unwrap_err()
                .to_string();
            assert_eq!(
                e,
                format!(
                    "invalid config: {section}.{key} = \"rel/x\" is a relative path; write it absolute: lrvault never resolves paths against the working directory"
                )
            );
        }
        let cfg = parse(&format!("{TENANT}[store]\nroot = \"/srv/ev\"\n")).unwrap();
        assert_eq!(cfg.store.root, Path::new("/srv/ev"));
    }

    #[test]
    fn secret_text_allows_one_final_newline_and_nothing_else_around_the_value() {
        assert_eq!(check_secret_text("abc"), Ok("abc"));
        assert_eq!(check_secret_text("abc\n"), Ok("abc"));
        assert_eq!(check_secret_text("a b~c.d_e-f"), Ok("a b~c.d_e-f"));
        for bad in [
            "\u{feff}abc",
            "abc\r\n",
            "abc\n\n",
            "abc ",
            " abc",
            "\tabc",
            "id\nabc",
            "",
            "\n",
        ] {
            let e = check_secret_text(bad).unwrap_err();
            assert!(!e.contains("abc"), "{e}");
        }
    }

    #[test]
    fn unknown_tenant_lists_the_configured_ones() {
        let cfg = parse(TENANT).unwrap();
        let e = cfg
            .select_tenants(Some("fabrikam"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "unknown tenant 'fabrikam' (configured: contoso)");
    }
}
