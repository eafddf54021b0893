//! `[[tenant]]`: one Defender tenant's app registration, checked: its name (used in paths
//! and rows), how it signs in (`auth`) and where its credential comes from, its cloud, and the URLs its bearer token
//! may reach (the cloud's preset, key by key unless written).

use std::path::PathBuf;

use serde::Deserialize;
use url::Url;

use super::case_pattern::CasePattern;
use super::cloud::Cloud;
use super::secret::Credentials;
use super::signin::{SignIn, SignInKeys};
use super::{ConfigError, check_base_url};

/// One `[[tenant]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenant {
    name: String,
    tenant_id: String,
    client_id: String,
    /// `secret` (the default) | `certificate` | `managed-identity` | `workload-identity`.
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    client_secret_file: Option<PathBuf>,
    #[serde(default)]
    client_secret_env: Option<String>,
    #[serde(default)]
    client_certificate_file: Option<PathBuf>,
    #[serde(default)]
    managed_identity_client_id: Option<String>,
    #[serde(default)]
    federated_token_file: Option<PathBuf>,
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
    /// Regex over `requestorComment` naming the action's cases (docs/operations.md §17).
    #[serde(default)]
    case_pattern: Option<String>,
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
    /// How it signs in, and where its credential comes from.
    pub sign_in: SignIn,
    /// Whose presets filled the host keys the tenant left out.
    pub cloud: Cloud,
    /// https, or http to a loopback host.
    pub api_base: Url,
    pub login_base: Url,
    /// Ends in `/.default` (client credentials).
    pub scope: String,
    /// At least one host pattern.
    pub download_hosts: Vec<String>,
    pub case_pattern: CasePattern,
    /// Machine-action types archived (a non-empty subset of [`COLLECTABLE`], in that order).
    pub collect: Vec<String>,
}

impl TenantConfig {
    /// Where the credential comes from, for messages (never its value).
    pub fn credential_source(&self) -> String {
        self.sign_in.to_string()
    }

    /// Reads the credential now, so an unreadable one stops a command at start; the token
    /// code reads it again at every refresh (a rotated one needs no restart).
    pub fn check_credential(&self) -> Result<(), ConfigError> {
        self.sign_in
            .check()
            .map_err(|message| self.credential_error(message))
    }

    /// A credential that could not be read, as the error naming this tenant.
    pub fn credential_error(&self, message: String) -> ConfigError {
        ConfigError::Secret {
            tenant: self.name.clone(),
            message,
        }
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
        let keys = SignInKeys {
            auth: self.auth.clone(),
            client_secret_file: self.client_secret_file.clone(),
            client_secret_env: self.client_secret_env.clone(),
            client_certificate_file: self.client_certificate_file.clone(),
            managed_identity_client_id: self.managed_identity_client_id.clone(),
            federated_token_file: self.federated_token_file.clone(),
        };
        let sign_in = SignIn::new(keys, credentials).map_err(bad)?;
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
        let case_pattern = match &self.case_pattern {
            Some(text) => CasePattern::new(text).map_err(bad)?,
            None => CasePattern::default(),
        };
        Ok(TenantConfig {
            name: self.name,
            tenant_id: self.tenant_id,
            client_id: self.client_id,
            sign_in,
            cloud,
            api_base,
            login_base,
            scope,
            download_hosts,
            case_pattern,
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
