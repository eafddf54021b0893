//! `[anchor]`: RFC 3161 trusted time for the custody checkpoints and their witness
//! (docs/evidence-format.md §9), checked like the rest of the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, check_base_url, humantime_serde_compat};

/// `[anchor]`: RFC 3161 trusted time for custody checkpoints, and their witness (docs/evidence-format.md §9).
/// Empty strings mean "not set", as in the example file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnchorConfig {
    /// The timestamp authority's URL; empty: checkpoints are written without tokens.
    pub tsa_url: String,
    /// PEM file of the certificates the TSA's signing chain must verify against (absolute);
    /// required with `tsa_url`: a token counts only when it verifies against it.
    pub tsa_ca_file: String,
    /// Policy OID to request (dotted form); when set, a token under another policy is a defect.
    pub tsa_policy: String,
    /// A token whose genTime is later than this after its checkpoint's `at` is a defect
    /// (§7a rule 8).
    #[serde(with = "humantime_serde_compat")]
    pub max_token_delay: Duration,
    /// A second, create-only home for every checkpoint and token (§7a rule 9): an absolute
    /// directory, `s3://bucket/prefix` or `azure://account/container/prefix`; empty: none.
    pub witness: String,
}

impl Default for AnchorConfig {
    fn default() -> Self {
        AnchorConfig {
            tsa_url: String::new(),
            tsa_ca_file: String::new(),
            tsa_policy: String::new(),
            max_token_delay: Duration::from_secs(24 * 3600),
            witness: String::new(),
        }
    }
}

impl AnchorConfig {
    pub fn tsa_url(&self) -> Option<&str> {
        Some(self.tsa_url.as_str()).filter(|u| !u.is_empty())
    }

    pub fn tsa_ca_file(&self) -> Option<&Path> {
        Some(Path::new(&self.tsa_ca_file)).filter(|p| !p.as_os_str().is_empty())
    }

    pub fn tsa_policy(&self) -> Option<&str> {
        Some(self.tsa_policy.as_str()).filter(|p| !p.is_empty())
    }

    /// The witness, parsed (validation has refused anything else).
    pub fn witness(&self) -> Option<Witness> {
        Witness::parse(&self.witness).ok().flatten()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(format!("anchor.{m}")));
        if let Some(url) = self.tsa_url()
            && let Err(m) = check_base_url(url)
        {
            return invalid(format!("tsa_url {m}"));
        }
        if self.tsa_url().is_some() && self.tsa_ca_file().is_none() {
            return invalid(
                "tsa_url is set but tsa_ca_file is empty: a token counts only when it verifies against the TSA's own CA certificate; set tsa_ca_file to that PEM file (docs/operations.md)".into(),
            );
        }
        if let Some(policy) = self.tsa_policy()
            && der::oid::ObjectIdentifier::new(policy).is_err()
        {
            return invalid(format!(
                "tsa_policy '{policy}' is not an object identifier (e.g. \"1.3.6.1.4.1.4146.2.3\")"
            ));
        }
        if self.max_token_delay.is_zero() {
            return invalid("max_token_delay must be positive".into());
        }
        Witness::parse(&self.witness)
            .map_err(|m| ConfigError::Invalid(format!("anchor.witness {m}")))?;
        Ok(())
    }
}

/// Where the witness keeps its copies of the checkpoints and tokens (`[anchor] witness`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Witness {
    /// An absolute directory (another filesystem, owned by another user).
    Dir(PathBuf),
    /// `s3://bucket/prefix`
    S3 { bucket: String, prefix: String },
    /// `azure://account/container/prefix`
    Azure {
        account: String,
        container: String,
        prefix: String,
    },
}

impl Witness {
    /// `Ok(None)` for an empty value; an error (one line) for a relative directory or a
    /// URL without its bucket, account or container.
    pub fn parse(value: &str) -> Result<Option<Witness>, String> {
        if value.is_empty() {
            return Ok(None);
        }
        let parts = |rest: &str, n: usize| -> Option<Vec<String>> {
            let mut split = rest.splitn(n + 1, '/').map(str::to_string);
            let mut named: Vec<String> = (&mut split).take(n).collect();
            if named.len() < n || named.iter().any(String::is_empty) {
                return None;
            }
            named.push(
                split
                    .next()
                    .unwrap_or_default()
                    .trim_matches('/')
                    .to_string(),
            );
            Some(named)
        };
        if let Some(rest) = value.strip_prefix("s3://") {
            let p = parts(rest, 1).ok_or_else(|| format!("'{value}': write s3://bucket/prefix"))?;
            return Ok(Some(Witness::S3 {
                bucket: p[0].clone(),
                prefix: p[1].clone(),
            }));
        }
        if let Some(rest) = value.strip_prefix("azure://") {
            let p = parts(rest, 2)
                .ok_or_else(|| format!("'{value}': write azure://account/container/prefix"))?;
            return Ok(Some(Witness::Azure {
                account: p[0].clone(),
                container: p[1].clone(),
                prefix: p[2].clone(),
            }));
        }
        if value.contains("://") {
            return Err(format!(
                "'{value}': only an absolute directory, s3://bucket/prefix or azure://account/container/prefix"
            ));
        }
        let dir = PathBuf::from(value);
        if !dir.is_absolute() {
            return Err(format!(
                "= \"{value}\" is a relative path; write it absolute: lrvault never resolves paths against the working directory"
            ));
        }
        Ok(Some(Witness::Dir(dir)))
    }
}
