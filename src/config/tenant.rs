//! `[[tenant]]`: one Defender tenant's app registration, checked: its name (used in paths
//! and rows), where its client secret comes from, and the URLs its bearer token may reach.

use std::path::PathBuf;

use serde::Deserialize;
use url::Url;

use super::secret::{Credentials, Secret, SecretSource};
use super::{ConfigError, check_base_url};

/// One `[[tenant]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenant {
    name: String,
    tenant_id: String,
    client_id: String,
    #[serde(default)]
    client_secret_file: Option<PathBuf>,
    #[serde(default)]
    client_secret_env: Option<String>,
    /// Only here to refuse it with a clear message: secrets never live in the TOML.
    #[serde(default)]
    client_secret: Option<toml::Value>,
    #[serde(default = "default_api_base")]
    api_base: String,
    #[serde(default = "default_login_base")]
    login_base: String,
    #[serde(default = "default_scope")]
    scope: String,
    #[serde(default = "default_download_hosts")]
    download_hosts: Vec<String>,
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

/// One `[[tenant]]`, checked.
#[derive(Debug, Clone)]
pub struct TenantConfig {
    /// `[a-z0-9-]+`, unique among the tenants.
    pub name: String,
    pub tenant_id: String,
    pub client_id: String,
    pub secret: SecretSource,
    /// https, or http to a loopback host.
    pub api_base: Url,
    pub login_base: Url,
    /// Ends in `/.default` (client credentials).
    pub scope: String,
    /// At least one host pattern.
    pub download_hosts: Vec<String>,
}

impl TenantConfig {
    /// Where the secret comes from, for messages (never its value).
    pub fn secret_source(&self) -> String {
        self.secret.describe()
    }

    /// Reads the client secret now (a rotated secret is picked up without a restart).
    pub fn load_secret(&self) -> Result<Secret, ConfigError> {
        self.secret.load().map_err(|message| ConfigError::Secret {
            tenant: self.name.clone(),
            message,
        })
    }
}

impl RawTenant {
    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// Checks one tenant; `name` has been checked by the caller (it names the tenant in
    /// every other message).
    pub(super) fn check(self, credentials: &Credentials) -> Result<TenantConfig, ConfigError> {
        let bad = |m: String| ConfigError::Invalid(format!("tenant '{}': {m}", self.name));
        if self.client_secret.is_some() {
            return Err(bad(
                "client_secret must not be written in the config file; use client_secret_file or client_secret_env"
                    .into(),
            ));
        }
        let secret = SecretSource::new(
            self.client_secret_file.clone(),
            self.client_secret_env.clone(),
            credentials,
        )
        .map_err(bad)?;
        if self.tenant_id.trim().is_empty() || self.client_id.trim().is_empty() {
            return Err(bad("tenant_id and client_id are required".into()));
        }
        let url =
            |key: &str, value: &str| check_base_url(value).map_err(|m| bad(format!("{key} {m}")));
        let api_base = url("api_base", &self.api_base)?;
        let login_base = url("login_base", &self.login_base)?;
        if self.download_hosts.is_empty() {
            return Err(bad(
                "download_hosts must list at least one host pattern".into()
            ));
        }
        if !self.scope.ends_with("/.default") {
            return Err(bad(format!(
                "scope '{}' must end in /.default for client credentials",
                self.scope
            )));
        }
        Ok(TenantConfig {
            name: self.name,
            tenant_id: self.tenant_id,
            client_id: self.client_id,
            secret,
            api_base,
            login_base,
            scope: self.scope,
            download_hosts: self.download_hosts,
        })
    }
}
