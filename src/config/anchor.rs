//! `[anchor]`: RFC 3161 trusted time for the custody checkpoints and their witness
//! (docs/evidence-format.md §9), checked like the rest of the file into a URL, an absolute
//! path, an object identifier and a parsed [`Witness`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::{ConfigError, absolute, check_base_url};

/// `[anchor]` as written. Empty strings mean "not set", as in the example file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAnchor {
    tsa_url: String,
    tsa_ca_file: PathBuf,
    tsa_policy: String,
    #[serde(with = "humantime_serde")]
    max_token_delay: Duration,
    witness: String,
}

impl Default for RawAnchor {
    fn default() -> Self {
        RawAnchor {
            tsa_url: String::new(),
            tsa_ca_file: PathBuf::new(),
            tsa_policy: String::new(),
            max_token_delay: Duration::from_secs(24 * 3600),
            witness: String::new(),
        }
    }
}

/// `[anchor]`, checked: RFC 3161 trusted time for custody checkpoints, and their witness
/// (docs/evidence-format.md §9).
#[derive(Debug, Clone, PartialEq)]
pub struct AnchorConfig {
    /// The timestamp authority's URL; `None`: checkpoints are written without tokens.
    tsa_url: Option<Url>,
    /// PEM file of the certificates the TSA's signing chain must verify against (absolute);
    /// always set with `tsa_url`: a token counts only when it verifies against it.
    tsa_ca_file: Option<PathBuf>,
    /// Policy OID to request (dotted form); when set, a token under another policy is a defect.
    tsa_policy: Option<String>,
    /// A token whose genTime is later than this after its checkpoint's `at` is a defect
    /// (§7a rule 8); positive.
    pub max_token_delay: Duration,
    /// A second, create-only home for every checkpoint and token (§7a rule 9).
    witness: Option<Witness>,
}

impl AnchorConfig {
    pub fn tsa_url(&self) -> Option<&str> {
        self.tsa_url.as_ref().map(Url::as_str)
    }

    pub fn tsa_ca_file(&self) -> Option<&Path> {
        self.tsa_ca_file.as_deref()
    }

    pub fn tsa_policy(&self) -> Option<&str> {
        self.tsa_policy.as_deref()
    }

    pub fn witness(&self) -> Option<&Witness> {
        self.witness.as_ref()
    }
}

impl RawAnchor {
    pub(super) fn check(self) -> Result<AnchorConfig, ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(format!("anchor.{m}"));
        let tsa_ca_file = match self.tsa_ca_file.as_os_str().is_empty() {
            true => None,
            false => Some(absolute("anchor.tsa_ca_file", self.tsa_ca_file)?),
        };
        let tsa_url = match self.tsa_url.as_str() {
            "" => None,
            url => Some(check_base_url(url).map_err(|m| invalid(format!("tsa_url {m}")))?),
        };
        if tsa_url.is_some() && tsa_ca_file.is_none() {
            return Err(invalid(
                "tsa_url is set but tsa_ca_file is empty: a token counts only when it verifies against the TSA's own CA certificate; set tsa_ca_file to that PEM file (docs/operations.md)".into(),
            ));
        }
        let tsa_policy = Some(self.tsa_policy).filter(|p| !p.is_empty());
        if let Some(policy) = &tsa_policy
            && der::oid::ObjectIdentifier::new(policy).is_err()
        {
            return Err(invalid(format!(
                "tsa_policy '{policy}' is not an object identifier (e.g. \"1.3.6.1.4.1.4146.2.3\")"
            )));
        }
        if self.max_token_delay.is_zero() {
            return Err(invalid("max_token_delay must be positive".into()));
        }
        let witness = Witness::parse(&self.witness).map_err(|m| invalid(format!("witness {m}")))?;
        Ok(AnchorConfig {
            tsa_url,
            tsa_ca_file,
            tsa_policy,
            max_token_delay: self.max_token_delay,
            witness,
        })
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
