//! `[[tenant]]`: one Defender tenant's app registration, checked: its name (used in paths
//! and rows), where its client secret comes from, its cloud, and the URLs its bearer token
//! may reach (the cloud's preset, key by key unless written).

use std::path::PathBuf;

use serde::Deserialize;
use url::Url;

use super::cloud::Cloud;
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
    /// `commercial` (the default) | `gcc` | `gcc-high` | `dod`: presets for the four keys below.
    #[serde(default)]
    cloud: Option<String>,
    #[serde(default)]
    api_base: Option<String>,
    #[serde(default)]
    login_base: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    download_hosts: Option<Vec<String>>,
    /// Which machine-action types are archived; default: every one in [`COLLECTABLE`].
    #[serde(default)]
    collect: Option<Vec<String>>,
}

/// The machine-action type of a live-response session.
pub const LIVE_RESPONSE: &str = "LiveResponse";
/// The machine-action type of an investigation package collection.
pub const INVESTIGATION_PACKAGE: &str = "CollectInvestigationPackage";
/// The machine-action types `collect` may name.
pub const COLLECTABLE: [&str; 2] = [LIVE_RESPONSE, INVESTIGATION_PACKAGE];

/// One `[[tenant]]`, checked.
#[derive(Debug, Clone)]
pub struct TenantConfig {
    /// `[a-z0-9-]+`, unique among the tenants.
    pub name: String,
    pub tenant_id: String,
    pub client_id: String,
    pub secret: SecretSource,
    /// Whose presets filled the host keys the tenant left out.
    pub cloud: Cloud,
    /// https, or http to a loopback host.
    pub api_base: Url,
    pub login_base: Url,
    /// Ends in `/.default` (client credentials).
    pub scope: String,
    /// At least one host pattern.
    pub download_hosts: Vec<String>,
    /// Machine-action types archived (a non-empty subset of [`COLLECTABLE`], in that order).
    pub collect: Vec<String>,
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
        let cloud = match &self.cloud {
            None => Cloud::default(),
            Some(text) => Cloud::parse(text).map_err(bad)?,
        };
        let preset = cloud.preset();
        let or_preset = |key: Option<String>, value: &str| key.unwrap_or_else(|| value.into());
        let url =
            |key: &str, value: &str| check_base_url(value).map_err(|m| bad(format!("{key} {m}")));
        let api_base = url("api_base", &or_preset(self.api_base, preset.api_base))?;
        let login_base = url("login_base", &or_preset(self.login_base, preset.login_base))?;
        let scope = or_preset(self.scope, preset.scope);
        let download_hosts = self.download_hosts.unwrap_or_else(|| {
            preset
                .download_hosts
                .iter()
                .map(|h| h.to_string())
                .collect()
        });
        if download_hosts.is_empty() {
            return Err(bad(
                "download_hosts must list at least one host pattern".into()
            ));
        }
        let collect = check_collect(self.collect).map_err(bad)?;
        if !scope.ends_with("/.default") {
            return Err(bad(format!(
                "scope '{scope}' must end in /.default for client credentials"
            )));
        }
        Ok(TenantConfig {
            name: self.name,
            tenant_id: self.tenant_id,
            client_id: self.client_id,
            secret,
            cloud,
            api_base,
            login_base,
            scope,
            download_hosts,
            collect,
        })
    }
}

/// `collect` checked: known types only, at least one; the order is [`COLLECTABLE`]'s.
fn check_collect(written: Option<Vec<String>>) -> Result<Vec<String>, String> {
    let Some(written) = written else {
        return Ok(COLLECTABLE.map(String::from).to_vec());
    };
    if let Some(unknown) = written.iter().find(|t| !COLLECTABLE.contains(&t.as_str())) {
        return Err(format!(
            "collect names '{unknown}'; allowed: {}",
            COLLECTABLE.join(", ")
        ));
    }
    let collect: Vec<String> = COLLECTABLE
        .iter()
        .filter(|t| written.iter().any(|w| w == *t))
        .map(|t| t.to_string())
        .collect();
    if collect.is_empty() {
        return Err(format!(
            "collect must name at least one of {}",
            COLLECTABLE.join(", ")
        ));
    }
    Ok(collect)
}
