//! The `require_worm` check: does the bucket or container itself refuse to let anyone
//! (lrvault's own credentials included) alter or delete a package before its retention ends?
//!
//! - S3: Object Lock enabled with a *default* retention in COMPLIANCE mode (GOVERNANCE can be
//!   bypassed with `s3:BypassGovernanceRetention`, so it does not count). `object_store` has
//!   no call for this: one `GetObjectLockConfiguration` request, signed by `object_store`'s
//!   own SigV4 signer with the credentials it resolved, and its XML read with `quick-xml`.
//! - Azure: the container has version-level immutability enabled and an immutability policy
//!   (`x-ms-immutable-storage-with-versioning-enabled`, `x-ms-has-immutability-policy` of Get
//!   Container Properties). The policy's period is only visible to the management plane,
//!   which lrvault is given no rights to.

use object_store::aws::AwsCredentialProvider;
use object_store::azure::{AzureCredential, AzureCredentialProvider};
use serde::Deserialize;

use super::StoreError;

/// What `status` shows about retention.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WormStatus {
    /// `COMPLIANCE` (S3) or `version-level immutability` (Azure).
    pub mode: String,
    /// `"365 days"`, `"7 years"`; `None` when the store does not say (Azure data plane).
    pub period: Option<String>,
}

impl std::fmt::Display for WormStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.period {
            Some(p) => write!(f, "{}, {p}", self.mode),
            None => write!(f, "{} (period set by the container's policy)", self.mode),
        }
    }
}

/// The Azure REST version that reports version-level immutability.
const AZURE_API_VERSION: &str = "2021-12-02";

/// The client of one check: no redirects (a signed request goes where it was signed for).
pub(super) fn check_client() -> Result<reqwest::Client, String> {
    crate::http::client_builder()
        .timeout(std::time::Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(crate::http::redact_reqwest)
}

/// `GetObjectLockConfiguration`'s answer (only the elements the check reads).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct ObjectLockConfiguration {
    object_lock_enabled: Option<String>,
    rule: Option<LockRule>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LockRule {
    default_retention: Option<DefaultRetention>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DefaultRetention {
    mode: Option<String>,
    days: Option<i32>,
    years: Option<i32>,
}

impl ObjectLockConfiguration {
    /// Judges the configuration of `bucket` ([`s3_status`]).
    pub(super) fn status(&self, bucket: &str) -> Result<WormStatus, String> {
        let rule = self
            .rule
            .as_ref()
            .and_then(|r| r.default_retention.as_ref());
        s3_status(
            bucket,
            self.object_lock_enabled.as_deref(),
            rule.and_then(|r| r.mode.as_deref()),
            rule.and_then(|r| r.days),
            rule.and_then(|r| r.years),
        )
    }
}

/// `GET /{bucket}?object-lock` (path style, as `object_store` addresses the bucket), signed
/// with SigV4 by `object_store`'s own signer and the credentials it resolved (env or instance).
pub(super) async fn check_s3(
    credentials: AwsCredentialProvider,
    bucket: &str,
    region: &str,
    endpoint: Option<&str>,
) -> Result<WormStatus, StoreError> {
    let worm_error = |message: String| StoreError::Worm {
        target: format!("s3://{bucket}"),
        message,
    };
    let credential = credentials
        .get_credential()
        .await
        .map_err(|e| worm_error(format!("cannot get a credential: {e}")))?;
    let target = super::hold::S3Target {
        credential: &credential,
        bucket,
        region,
        endpoint,
    };
    let mut url = target.url("").map_err(worm_error)?;
    url.set_query(Some("object-lock"));
    let (status, body) = super::hold::signed(&target, reqwest::Method::GET, &url, Vec::new())
        .await
        .map_err(worm_error)?;
    if status != 200 {
        let code = super::hold::error_code(&body);
        return Err(s3_refusal(bucket, &code).unwrap_or_else(|| {
            worm_error(format!("HTTP {status}{}", crate::http::code_suffix(&code)))
        }));
    }
    let config: ObjectLockConfiguration = quick_xml::de::from_str(&body).map_err(|e| {
        worm_error(format!(
            "an Object Lock configuration S3 sent cannot be read: {e}"
        ))
    })?;
    config.status(bucket).map_err(StoreError::refused)
}

/// The S3 error codes that are the operator's to fix, each as its one-line refusal.
fn s3_refusal(bucket: &str, code: &str) -> Option<StoreError> {
    Some(match code {
        "ObjectLockConfigurationNotFoundError" => StoreError::refused(format!(
            "store.require_worm: bucket '{bucket}' has no Object Lock; create it with Object Lock and a default COMPLIANCE retention (docs/operations.md)"
        )),
        "NoSuchBucket" => StoreError::refused(format!("store.bucket '{bucket}' does not exist")),
        "AccessDenied" => StoreError::refused(format!(
            "store.require_worm: not allowed to read the Object Lock configuration of '{bucket}' (grant s3:GetBucketObjectLockConfiguration)"
        )),
        _ => return None,
    })
}

/// Judges an Object Lock configuration (pure, so every refusal is unit-tested).
pub(super) fn s3_status(
    bucket: &str,
    enabled: Option<&str>,
    mode: Option<&str>,
    days: Option<i32>,
    years: Option<i32>,
) -> Result<WormStatus, String> {
    if enabled != Some("Enabled") {
        return Err(format!(
            "store.require_worm: bucket '{bucket}' does not have Object Lock enabled (docs/operations.md)"
        ));
    }
    match mode {
        Some("COMPLIANCE") => {}
        None => {
            return Err(format!(
                "store.require_worm: bucket '{bucket}' has Object Lock but no default retention; set a default COMPLIANCE retention"
            ));
        }
        Some(other) => {
            return Err(format!(
                "store.require_worm: bucket '{bucket}' has a default {other} retention; only COMPLIANCE stops every user, root included"
            ));
        }
    }
    let period = match (days.filter(|d| *d > 0), years.filter(|y| *y > 0)) {
        (Some(d), _) => format!("{d} day{}", if d == 1 { "" } else { "s" }),
        (None, Some(y)) => format!("{y} year{}", if y == 1 { "" } else { "s" }),
        (None, None) => {
            return Err(format!(
                "store.require_worm: bucket '{bucket}' has a COMPLIANCE default retention without a period"
            ));
        }
    };
    Ok(WormStatus {
        mode: "COMPLIANCE".into(),
        period: Some(period),
    })
}

/// Get Container Properties, authorised with the credential `object_store` resolved.
pub(super) async fn check_azure(
    credentials: &AzureCredentialProvider,
    service: &url::Url,
    container: &str,
) -> Result<WormStatus, StoreError> {
    let target = format!("container '{container}'");
    let worm_error = |message: String| StoreError::Worm {
        target: target.clone(),
        message,
    };
    let credential = credentials
        .get_credential()
        .await
        .map_err(|e| worm_error(format!("cannot get a credential: {e}")))?;
    let mut url = service.clone();
    url.path_segments_mut()
        .map_err(|()| worm_error("the blob service URL cannot take a path".into()))?
        .pop_if_empty()
        .push(container);
    url.query_pairs_mut().append_pair("restype", "container");
    let mut request = check_client()
        .map_err(&worm_error)?
        .get(url.clone())
        .header("x-ms-version", AZURE_API_VERSION);
    request = match credential.as_ref() {
        AzureCredential::BearerToken(token) => request.bearer_auth(token),
        AzureCredential::SASToken(pairs) => request.query(pairs),
        // An account key is a super-user key: it can delete an unlocked immutability policy,
        // so it cannot be the identity of a WORM deployment.
        AzureCredential::AccessKey(_) => {
            return Err(StoreError::refused(
                "store.require_worm with an Azure account key: an account key can remove an unlocked immutability policy; use a service principal, a managed identity or a SAS without delete rights (docs/operations.md)",
            ));
        }
    };
    let response = request
        .send()
        .await
        .map_err(|e| worm_error(crate::http::redact_reqwest(e)))?;
    let header = |name: &str| crate::http::header_str(response.headers(), name);
    match response.status().as_u16() {
        200 => {}
        404 => {
            return Err(StoreError::refused(format!(
                "store.bucket: container '{container}' does not exist"
            )));
        }
        403 => {
            return Err(StoreError::refused(format!(
                "store.require_worm: not allowed to read the properties of container '{container}' ({})",
                header("x-ms-error-code").unwrap_or_default()
            )));
        }
        status => {
            return Err(worm_error(format!(
                "HTTP {status}{}",
                crate::http::code_suffix(&header("x-ms-error-code").unwrap_or_default())
            )));
        }
    }
    azure_status(
        container,
        header("x-ms-immutable-storage-with-versioning-enabled").as_deref(),
        header("x-ms-has-immutability-policy").as_deref(),
    )
    .map_err(StoreError::refused)
}

pub(super) fn azure_status(
    container: &str,
    versioning_worm: Option<&str>,
    has_policy: Option<&str>,
) -> Result<WormStatus, String> {
    let yes = |v: Option<&str>| v.is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if !yes(versioning_worm) {
        return Err(format!(
            "store.require_worm: container '{container}' does not have version-level immutability enabled (docs/operations.md)"
        ));
    }
    if !yes(has_policy) {
        return Err(format!(
            "store.require_worm: container '{container}' has version-level immutability but no immutability policy; add a time-based retention policy"
        ));
    }
    Ok(WormStatus {
        mode: "version-level immutability".into(),
        period: None,
    })
}
