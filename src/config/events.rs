//! `[events]` and `[metrics]` (docs/operations.md §16): where events go off the host (a signed
//! webhook, a syslog receiver) and which kinds, and the address of the OpenMetrics endpoint,
//! checked like the rest of the file: a webhook URL under the config's URL rule, a secret file
//! under the secret rule, a syslog address with its transport, a listen address that is
//! loopback unless the operator says otherwise.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use url::Url;

use super::{ConfigError, Credentials, check_base_url};

/// Every kind an event can have (docs/operations.md §16): custody kinds, `CHECKPOINT` (the
/// `ANCHORED` row) and the breaker's two.
pub const EVENT_KINDS: [&str; 8] = [
    "ARCHIVED",
    "FAILED",
    "UNAVAILABLE",
    "VERIFY_FAILED",
    "CHECKPOINT",
    "BREAKER_OPEN",
    "BREAKER_CLOSED",
    "CASE_TAGGED",
];

/// `[events]` as written. Empty strings mean "not set", as in the example file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawEvents {
    webhook_url: String,
    webhook_secret_file: PathBuf,
    syslog: String,
    kinds: Vec<String>,
}

impl Default for RawEvents {
    fn default() -> Self {
        RawEvents {
            webhook_url: String::new(),
            webhook_secret_file: PathBuf::new(),
            syslog: String::new(),
            kinds: EVENT_KINDS.map(String::from).to_vec(),
        }
    }
}

/// `[events]`, checked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventsConfig {
    pub webhook: Option<Webhook>,
    pub syslog: Option<SyslogTarget>,
    /// The kinds sent, each one of [`EVENT_KINDS`], without repeats.
    pub kinds: Vec<String>,
}

impl EventsConfig {
    /// The configured sinks by name (`webhook`, `syslog`), in that order.
    pub fn sinks(&self) -> Vec<&'static str> {
        let mut sinks = Vec::new();
        if self.webhook.is_some() {
            sinks.push("webhook");
        }
        if self.syslog.is_some() {
            sinks.push("syslog");
        }
        sinks
    }
}

/// The webhook: where to POST and the file holding the HMAC key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub url: Url,
    /// As written (for messages).
    pub secret_configured: PathBuf,
    /// The file read: `secret_configured`, or that name in `$CREDENTIALS_DIRECTORY`.
    pub secret_path: PathBuf,
}

/// Where syslog messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogTarget {
    Udp(String),
    /// RFC 6587 octet counting.
    Tcp(String),
    /// A datagram socket such as `/dev/log`.
    Unix(PathBuf),
}

impl SyslogTarget {
    /// `udp://host:514` | `tcp://host:601` | `unix:///dev/log`.
    pub fn parse(value: &str) -> Result<SyslogTarget, String> {
        let bad = || {
            format!(
                "'{value}' is not a syslog address: write udp://host:port, tcp://host:port or unix:///absolute/socket"
            )
        };
        let (scheme, rest) = value.split_once("://").ok_or_else(bad)?;
        let host_port = |rest: &str| match rest.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(rest.to_string())
            }
            _ => Err(bad()),
        };
        match scheme {
            "udp" => host_port(rest).map(SyslogTarget::Udp),
            "tcp" => host_port(rest).map(SyslogTarget::Tcp),
            "unix" if rest.starts_with('/') => Ok(SyslogTarget::Unix(PathBuf::from(rest))),
            _ => Err(bad()),
        }
    }
}

impl RawEvents {
    pub(super) fn check(self, credentials: &Credentials) -> Result<EventsConfig, ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(format!("events.{m}"));
        let webhook = match (self.webhook_url.as_str(), self.webhook_secret_file) {
            ("", f) if f.as_os_str().is_empty() => None,
            ("", _) => {
                return Err(invalid(
                    "webhook_secret_file is set but webhook_url is empty".into(),
                ));
            }
            (_, f) if f.as_os_str().is_empty() => {
                return Err(invalid(
                    "webhook_url is set but webhook_secret_file is empty: every request is signed with its key".into(),
                ));
            }
            (url, f) => Some(Webhook {
                url: check_base_url(url).map_err(|m| invalid(format!("webhook_url {m}")))?,
                secret_path: credentials.resolve(&f),
                secret_configured: f,
            }),
        };
        let syslog = match self.syslog.as_str() {
            "" => None,
            s => Some(SyslogTarget::parse(s).map_err(|m| invalid(format!("syslog {m}")))?),
        };
        let mut kinds: Vec<String> = Vec::new();
        for k in self.kinds {
            if !EVENT_KINDS.contains(&k.as_str()) {
                return Err(invalid(format!(
                    "kinds: '{k}' is not an event kind (one of {})",
                    EVENT_KINDS.join(", ")
                )));
            }
            if !kinds.contains(&k) {
                kinds.push(k);
            }
        }
        Ok(EventsConfig {
            webhook,
            syslog,
            kinds,
        })
    }
}

/// `[metrics]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawMetrics {
    listen: String,
    allow_remote: bool,
}

/// `[metrics]`, checked: the address of GET /metrics, if any.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetricsConfig {
    pub listen: Option<SocketAddr>,
}

impl RawMetrics {
    pub(super) fn check(self) -> Result<MetricsConfig, ConfigError> {
        if self.listen.is_empty() {
            return Ok(MetricsConfig { listen: None });
        }
        let addr: SocketAddr = self.listen.parse().map_err(|_| {
            ConfigError::Invalid(format!(
                "metrics.listen '{}' is not an address and port (e.g. \"127.0.0.1:9464\")",
                self.listen
            ))
        })?;
        if !addr.ip().is_loopback() && !self.allow_remote {
            return Err(ConfigError::Invalid(format!(
                "metrics.listen {addr} is not a loopback address: the metrics name tenants and queue sizes; set metrics.allow_remote = true to serve them beyond this host"
            )));
        }
        Ok(MetricsConfig { listen: Some(addr) })
    }
}
