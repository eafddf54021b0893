//! S3 Object Lock legal holds (docs/operations.md §17): `case hold` puts one on every version
//! of a case's objects, `case release` lifts it, and a package archived into a held case gets
//! one as it is published. `object_store` has no call for either request, so, like the WORM
//! check, each is signed by `object_store`'s own SigV4 signer with the credentials it resolved:
//! `ListObjectVersions` for one key (its XML read with `quick-xml`) and `PutObjectLegalHold`
//! for each version. The retention period of an object is untouched by a hold.

use md5::Digest as _;
use object_store::aws::{AwsAuthorizer, AwsCredential};
use serde::Deserialize;

use super::StoreError;

/// The largest answer read (a version listing of one key, or an error document).
const MAX_ANSWER: usize = 1024 * 1024;

/// The S3 bucket a hold is put in, and how to reach and sign for it.
pub(super) struct S3Target<'a> {
    pub credential: &'a AwsCredential,
    pub bucket: &'a str,
    pub region: &'a str,
    pub endpoint: Option<&'a str>,
}

impl S3Target<'_> {
    /// `{endpoint}/{bucket}/{key}` (path style, as `object_store` addresses the bucket).
    pub(super) fn url(&self, key: &str) -> Result<url::Url, String> {
        let base = match self.endpoint {
            Some(e) => e.to_string(),
            None => format!("https://s3.{}.amazonaws.com", self.region),
        };
        let mut url =
            url::Url::parse(&base).map_err(|e| format!("store.endpoint {base:?}: {e}"))?;
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|()| format!("store.endpoint {base:?} cannot take a path"))?;
            path.pop_if_empty().push(self.bucket);
            if !key.is_empty() {
                path.extend(key.split('/'));
            }
        }
        Ok(url)
    }
}

/// `ListObjectVersions`'s answer (only what the hold reads).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct VersionListing {
    #[serde(default)]
    version: Vec<VersionEntry>,
    is_truncated: Option<bool>,
    next_key_marker: Option<String>,
    next_version_id_marker: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct VersionEntry {
    key: String,
    version_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct S3ErrorBody {
    code: Option<String>,
}

/// Puts (`on`) or lifts the legal hold on every version of `full_key`; the version ids, oldest
/// listing order as S3 gives it (newest first).
pub(super) async fn set_legal_hold(
    target: &S3Target<'_>,
    full_key: &str,
    on: bool,
) -> Result<Vec<String>, StoreError> {
    let hold_error = |message: String| StoreError::Hold {
        location: format!("s3://{}/{full_key}", target.bucket),
        message,
    };
    let versions = versions_of(target, full_key).await.map_err(hold_error)?;
    let status = if on { "ON" } else { "OFF" };
    let body = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><LegalHold xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Status>{status}</Status></LegalHold>"#
    );
    for version in &versions {
        let mut url = target.url(full_key).map_err(hold_error)?;
        url.set_query(Some("legal-hold"));
        url.query_pairs_mut().append_pair("versionId", version);
        let (code, answer) = signed(
            target,
            reqwest::Method::PUT,
            &url,
            body.clone().into_bytes(),
        )
        .await
        .map_err(hold_error)?;
        if code != 200 {
            return Err(hold_error(format!(
                "PutObjectLegalHold {status} of version {version}: HTTP {code}{}",
                crate::http::code_suffix(&error_code(&answer))
            )));
        }
    }
    Ok(versions)
}

/// Every version id S3 keeps under exactly `full_key` (delete markers aside), page by page.
async fn versions_of(target: &S3Target<'_>, full_key: &str) -> Result<Vec<String>, String> {
    let mut versions = Vec::new();
    let mut markers: Option<(String, String)> = None;
    loop {
        let mut url = target.url("")?;
        url.set_query(Some("versions"));
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("prefix", full_key);
            if let Some((key, version)) = &markers {
                q.append_pair("key-marker", key);
                q.append_pair("version-id-marker", version);
            }
        }
        let (code, answer) = signed(target, reqwest::Method::GET, &url, Vec::new()).await?;
        if code != 200 {
            return Err(format!(
                "ListObjectVersions: HTTP {code}{}",
                crate::http::code_suffix(&error_code(&answer))
            ));
        }
        let page: VersionListing = quick_xml::de::from_str(&answer)
            .map_err(|e| format!("a version listing S3 sent cannot be read: {e}"))?;
        versions.extend(
            page.version
                .into_iter()
                .filter(|v| v.key == full_key)
                .map(|v| v.version_id),
        );
        match (
            page.is_truncated,
            page.next_key_marker,
            page.next_version_id_marker,
        ) {
            (Some(true), Some(key), Some(version)) => markers = Some((key, version)),
            _ => return Ok(versions),
        }
    }
}

pub(super) fn error_code(answer: &str) -> String {
    quick_xml::de::from_str::<S3ErrorBody>(answer)
        .unwrap_or_default()
        .code
        .unwrap_or_default()
}

/// One request to S3, signed with SigV4 by `object_store`'s signer (the body's SHA-256 and,
/// as `PutObjectLegalHold` requires, its Content-MD5); its status and (capped) answer.
pub(super) async fn signed(
    target: &S3Target<'_>,
    method: reqwest::Method,
    url: &url::Url,
    body: Vec<u8>,
) -> Result<(u16, String), String> {
    let mut request =
        object_store::client::HttpRequest::new(bytes::Bytes::from(body.clone()).into());
    *request.method_mut() = method.as_str().parse().map_err(|e| format!("{e}"))?;
    *request.uri_mut() = url
        .as_str()
        .parse()
        .map_err(|e| format!("{url} is not a request URI: {e}"))?;
    if !body.is_empty() {
        use base64::Engine as _;
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(&body));
        let value = md5.parse().map_err(|e| format!("Content-MD5: {e}"))?;
        request.headers_mut().insert("content-md5", value);
    }
    AwsAuthorizer::new(target.credential, "s3", target.region)
        .try_authorize(&mut request, None)
        .map_err(|e| format!("cannot sign the request: {e}"))?;
    let response = super::worm::check_client()?
        .request(method, url.clone())
        .headers(request.headers().clone())
        .body(body)
        .send()
        .await
        .map_err(crate::http::redact_reqwest)?;
    let status = response.status().as_u16();
    let answer = crate::http::read_capped(response, MAX_ANSWER)
        .await
        .map_err(|e| match e {
            crate::http::BodyError::TooLarge => {
                format!("HTTP {status}: an answer of more than {MAX_ANSWER} bytes")
            }
            crate::http::BodyError::Transport(e) => crate::http::redact_reqwest(e),
        })?;
    Ok((status, String::from_utf8_lossy(&answer).into_owned()))
}
