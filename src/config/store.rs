//! `[store]`: where evidence packages live (docs/evidence-format.md, §7b). The TOML keys of
//! every backend sit side by side in one table; they are checked into a [`StoreConfig`] whose
//! [`Backend`] carries only the keys of the backend chosen.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::{ConfigError, absolute, check_base_url};

/// `[store]` as written: every key of every backend, with its default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawStore {
    backend: StoreBackend,
    root: PathBuf,
    compression: Compression,
    spool: PathBuf,
    bucket: String,
    prefix: String,
    endpoint: String,
    region: String,
    credentials: StoreCredentials,
    require_worm: Option<bool>,
    spool_max_waiting: usize,
    #[serde(with = "humantime_serde")]
    retry_timeout: Duration,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            backend: StoreBackend::Fs,
            root: default_root(),
            compression: Compression::Auto,
            spool: default_spool(),
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

fn default_root() -> PathBuf {
    PathBuf::from("/var/lib/lrvault/evidence")
}

fn default_spool() -> PathBuf {
    PathBuf::from("/var/lib/lrvault/spool")
}

/// `[store]`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    /// `store.root`: the package directory of the `fs` backend (absolute). An object store's
    /// spool may neither contain it nor lie inside it.
    pub root: PathBuf,
    pub compression: Compression,
    pub backend: Backend,
}

/// The backend of `store.backend`, with the keys only it reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    /// A local directory (`store.root`), docs/evidence-format.md.
    Fs,
    /// Amazon S3 or an S3-compatible store, with Object Lock.
    S3 {
        object: ObjectStoreConfig,
        /// `store.region`: the bucket's region.
        region: String,
    },
    /// Azure Blob Storage, with a version-level immutability policy.
    Azure(ObjectStoreConfig),
}

/// The keys an object store (`s3` or `azure`) reads.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectStoreConfig {
    /// Local disk where packages are written and checked before upload (absolute).
    pub spool: PathBuf,
    /// S3 bucket or Azure container, a valid name for its backend.
    pub bucket: String,
    /// Key prefix (path segments, or empty: the bucket's root); keys are the §7 relative
    /// paths below it.
    pub prefix: String,
    /// S3-compatible endpoint or Azure blob service URL; `None`: the provider's default.
    pub endpoint: Option<Url>,
    pub credentials: StoreCredentials,
    /// Refuse to start unless the bucket/container enforces retention (default: true).
    pub require_worm: bool,
    /// Finished packages the spool may hold while they wait for the store; at this many, no
    /// new download starts until the store takes them (at least 1).
    pub spool_max_waiting: usize,
    /// How long one store request is retried (connection errors, 5xx, 429) before the
    /// attempt gives up, hands its result back uncharged and the pass pauses (positive).
    pub retry_timeout: Duration,
}

impl ObjectStoreConfig {
    /// `bucket` with the defaults of every other key (the default spool, the bucket's root,
    /// the provider's endpoint, credentials from the environment, WORM required).
    pub fn new(bucket: impl Into<String>) -> ObjectStoreConfig {
        let raw = RawStore::default();
        ObjectStoreConfig {
            spool: raw.spool,
            bucket: bucket.into(),
            prefix: raw.prefix,
            endpoint: None,
            credentials: raw.credentials,
            require_worm: true,
            spool_max_waiting: raw.spool_max_waiting,
            retry_timeout: raw.retry_timeout,
        }
    }
}

impl StoreConfig {
    /// An `fs` store at `root`, compressing as by default.
    pub fn fs(root: PathBuf) -> StoreConfig {
        StoreConfig {
            root,
            compression: Compression::default(),
            backend: Backend::Fs,
        }
    }

    /// An object store with the default `store.root` and compression.
    pub fn object(backend: Backend) -> StoreConfig {
        StoreConfig {
            backend,
            ..StoreConfig::fs(default_root())
        }
    }

    pub fn kind(&self) -> StoreBackend {
        match self.backend {
            Backend::Fs => StoreBackend::Fs,
            Backend::S3 { .. } => StoreBackend::S3,
            Backend::Azure(_) => StoreBackend::Azure,
        }
    }

    /// The object store's keys; `None` for `fs`.
    pub fn object_store(&self) -> Option<&ObjectStoreConfig> {
        match &self.backend {
            Backend::Fs => None,
            Backend::S3 { object, .. } | Backend::Azure(object) => Some(object),
        }
    }

    pub fn object_store_mut(&mut self) -> Option<&mut ObjectStoreConfig> {
        match &mut self.backend {
            Backend::Fs => None,
            Backend::S3 { object, .. } | Backend::Azure(object) => Some(object),
        }
    }

    /// Whether start-up must prove retention: on by default for object stores, never for
    /// `fs`.
    pub fn worm_required(&self) -> bool {
        self.object_store().is_some_and(|o| o.require_worm)
    }

    /// The local directory packages are written in, and its key for messages: `store.root`
    /// for `fs`, the spool for object stores. The one place that says so.
    pub fn staging(&self) -> (&'static str, &Path) {
        match self.object_store() {
            None => ("store.root", &self.root),
            Some(o) => ("store.spool", &o.spool),
        }
    }

    /// The directory of [`staging`](Self::staging).
    pub fn staging_dir(&self) -> &Path {
        self.staging().1
    }
}

impl RawStore {
    /// Checks every key the chosen backend reads (and both paths, whatever the backend) into
    /// a [`StoreConfig`]; each refusal is one line naming the key.
    pub(super) fn check(self) -> Result<StoreConfig, ConfigError> {
        let root = absolute("store.root", self.root)?;
        let spool = absolute("store.spool", self.spool)?;
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.backend == StoreBackend::Fs {
            if self.require_worm == Some(true) {
                return invalid("store.require_worm = true needs backend \"s3\" or \"azure\": a local directory cannot enforce retention".into());
            }
            return Ok(StoreConfig {
                root,
                compression: self.compression,
                backend: Backend::Fs,
            });
        }
        if self.spool_max_waiting == 0 {
            return invalid("store.spool_max_waiting must be at least 1".into());
        }
        if self.retry_timeout.is_zero() {
            return invalid("store.retry_timeout must be positive".into());
        }
        if spool.starts_with(&root) || root.starts_with(&spool) {
            return invalid(format!(
                "store.spool '{}' and store.root '{}' must not contain each other",
                spool.display(),
                root.display()
            ));
        }
        check_bucket_name(self.backend, &self.bucket).map_err(ConfigError::Invalid)?;
        check_prefix(&self.prefix).map_err(ConfigError::Invalid)?;
        let endpoint = match self.endpoint.as_str() {
            "" => None,
            e => Some(
                check_base_url(e)
                    .map_err(|m| ConfigError::Invalid(format!("store.endpoint {m}")))?,
            ),
        };
        if self.backend == StoreBackend::S3 && self.region.trim().is_empty() {
            return invalid(
                "store.region is required for backend \"s3\" (e.g. \"eu-west-1\")".into(),
            );
        }
        let object = ObjectStoreConfig {
            spool,
            bucket: self.bucket,
            prefix: self.prefix,
            endpoint,
            credentials: self.credentials,
            require_worm: self.require_worm.unwrap_or(true),
            spool_max_waiting: self.spool_max_waiting,
            retry_timeout: self.retry_timeout,
        };
        let backend = if self.backend == StoreBackend::S3 {
            Backend::S3 {
                object,
                region: self.region,
            }
        } else {
            Backend::Azure(object)
        };
        Ok(StoreConfig {
            root,
            compression: self.compression,
            backend,
        })
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

/// Path segments separated by `/`, or empty.
fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.is_empty()
        && prefix
            .trim_end_matches('/')
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == ".." || s.chars().any(char::is_control))
    {
        return Err(format!(
            "store.prefix '{prefix}' must be path segments separated by '/' (e.g. \"lrvault/\"), without '.', '..', empty segments or a leading '/'"
        ));
    }
    Ok(())
}

/// `store.backend`: the kind of store, as messages and custody rows name it.
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
