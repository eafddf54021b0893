//! Result downloads from the blob host: the link allowlist (checked before any connection),
//! a client that sends no Authorization header and follows no redirect, and a streaming
//! GET that resumes with `Range` from the bytes already received.

use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap};
use serde::Serialize;
use tokio::sync::mpsc;
use url::Url;

use crate::config::is_loopback_host;
use crate::http::{RemoteClock, code_suffix, header_str};

/// Why a link was refused before any connection was made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("download link refused: {0}")]
pub struct Refused(pub String);

/// Host patterns a download link may point at: exact names, or `*.suffix` for any subdomain.
#[derive(Debug, Clone)]
pub struct Allowlist(Vec<String>);

impl Allowlist {
    pub fn new(patterns: &[String]) -> Allowlist {
        Allowlist(
            patterns
                .iter()
                .map(|p| p.trim().to_ascii_lowercase())
                .collect(),
        )
    }

    /// Parses and checks a link: https (or http to loopback), no credentials in the URL, host
    /// on the allowlist.
    pub fn check(&self, link: &str) -> Result<Url, Refused> {
        let url = Url::parse(link).map_err(|e| Refused(format!("not a URL ({e})")))?;
        let host = url.host_str().unwrap_or("").to_ascii_lowercase();
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        match url.scheme() {
            "https" => {}
            "http" if is_loopback_host(&url) => {}
            s => {
                return Err(Refused(format!(
                    "scheme {s} to host {host} (https required)"
                )));
            }
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refused(format!(
                "credentials embedded in the link to host {host}"
            )));
        }
        if host.is_empty() || !self.allows(&host) {
            return Err(Refused(format!("host {host} is not in download_hosts")));
        }
        Ok(url)
    }

    fn allows(&self, host: &str) -> bool {
        self.0.iter().any(|p| match p.strip_prefix("*.") {
            Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
            None => host == p,
        })
    }
}

/// Host and path of a link: what may be stored and logged (never the SAS query).
pub fn link_host_path(url: &Url) -> (String, String) {
    let host = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or("")),
        None => url.host_str().unwrap_or("").to_string(),
    };
    (host, url.path().to_string())
}

/// The signed expiry (`se`) of a SAS link, when it has one that parses (RFC 3339, or a bare
/// `YYYY-MM-DD`, which Azure reads as UTC midnight).
pub fn link_expiry(url: &Url) -> Option<DateTime<Utc>> {
    let se = url
        .query_pairs()
        .find(|(k, _)| k == "se")
        .map(|(_, v)| v.into_owned())?;
    if let Ok(t) = DateTime::parse_from_rfc3339(&se) {
        return Some(t.with_timezone(&Utc));
    }
    chrono::NaiveDate::parse_from_str(&se, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// The blob client: no default headers (so no Authorization), no redirects, a per-read timeout.
pub fn blob_client(read_timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    crate::http::client_builder()
        .user_agent(concat!("lrvault/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(read_timeout)
        .build()
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// 403 from the blob host: the link expired or its signature is refused; mint a new one.
    #[error("blob host refused the link (HTTP 403{})", code_suffix(.code))]
    LinkRejected { code: String },
    /// The link's own `se` (signed expiry) is already past: refused without connecting.
    #[error("download link expired at {expiry} before it was used")]
    LinkExpired { expiry: String },
    #[error("blob host answered HTTP {status}{}", code_suffix(.code))]
    Http { status: u16, code: String },
    #[error("blob host redirected (HTTP {status}) to {location}; redirects are not followed")]
    Redirect { status: u16, location: String },
    /// No connection could be made to the blob host at all.
    #[error("blob host unreachable: {message}")]
    Unreachable { message: String },
    /// The connection broke mid-body; resumable from the bytes received.
    #[error("transfer interrupted after {received} bytes: {message}")]
    Interrupted {
        received: u64,
        message: String,
        timeout: bool,
    },
    #[error("integrity check failed: {0}")]
    Integrity(String),
    /// The package writer stopped (its own error says why).
    #[error("package writer stopped")]
    Sink,
}

/// Response headers kept in `retrieval.json`.
pub const RECORDED_HEADERS: [&str; 8] = [
    "content-length",
    "content-type",
    "content-md5",
    "x-ms-blob-content-md5",
    "etag",
    "last-modified",
    "x-ms-request-id",
    "date",
];

/// What one result's transfer has done so far, across resumes and re-issued links.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Transfer {
    /// Bytes received and handed to the writer.
    pub received: u64,
    /// Total blob size, from Content-Length (200) or Content-Range (206).
    pub total: Option<u64>,
    pub etag: Option<String>,
    /// Base64 MD5 the server claims for the whole blob, if any.
    pub server_md5: Option<String>,
    /// Status of the first answered request (200, or 206 when resumed).
    pub http_status: u16,
    /// Headers of the first answered request.
    pub headers: serde_json::Map<String, serde_json::Value>,
    /// Offsets from which the transfer was resumed with Range.
    pub ranges: Vec<u64>,
}

impl Transfer {
    /// The `md5_check` verdict (`match` or `absent`) when the server's length and MD5 (if it
    /// sent one) agree with what was received. `md5` is `None` when it was not computed: it is
    /// only asked for when the first answer carried a claim.
    pub fn check_complete(&self, md5: Option<&[u8; 16]>) -> Result<&'static str, FetchError> {
        if let Some(total) = self.total
            && total != self.received
        {
            return Err(FetchError::Integrity(format!(
                "received {} bytes, server announced {total}",
                self.received
            )));
        }
        match (&self.server_md5, md5) {
            (None, _) => Ok("absent"),
            (Some(_), None) => Err(FetchError::Integrity(
                "an MD5 claim arrived only on a resumed request; the MD5 was not computed".into(),
            )),
            (Some(b64), Some(md5)) => {
                let claimed = base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .unwrap_or_default();
                if claimed.as_slice() == md5.as_slice() {
                    Ok("match")
                } else {
                    Err(FetchError::Integrity(format!(
                        "MD5 mismatch: server sent {b64}, received bytes hash to {}",
                        base64::engine::general_purpose::STANDARD.encode(md5)
                    )))
                }
            }
        }
    }
}

impl Transfer {
    /// A resumed answer's `Content-Range: bytes START-END/TOTAL` must start where we stopped,
    /// for a blob of the same size.
    fn check_resumed(&mut self, headers: &HeaderMap) -> Result<(), FetchError> {
        let range = header_str(headers, "content-range").unwrap_or_default();
        let parsed = range
            .strip_prefix("bytes ")
            .and_then(|r| r.split_once('/'))
            .and_then(|(span, total)| {
                Some((
                    span.split_once('-')?.0.parse::<u64>().ok()?,
                    total.parse::<u64>().ok(),
                ))
            });
        match parsed {
            Some((start, total)) if start == self.received => {
                if let (Some(t), Some(known)) = (total, self.total)
                    && t != known
                {
                    return Err(FetchError::Integrity(format!(
                        "blob size changed from {known} to {t}"
                    )));
                }
                self.total = self.total.or(total);
                self.ranges.push(self.received);
                Ok(())
            }
            _ => Err(FetchError::Integrity(format!(
                "unexpected Content-Range '{range}'"
            ))),
        }
    }

    /// The first answered request's status and the headers kept in `retrieval.json`.
    fn record_first(&mut self, status: StatusCode, headers: &HeaderMap) {
        self.http_status = status.as_u16();
        for name in RECORDED_HEADERS {
            if let Some(v) = header_str(headers, name) {
                self.headers
                    .insert(name.to_string(), serde_json::Value::String(v));
            }
        }
    }

    /// Collects the server's MD5 claims; every claim must agree (a wrong one must not be
    /// replaced by a later right one). Content-MD5 covers the whole blob only on a full read;
    /// x-ms-blob-content-md5 always does.
    fn add_md5_claims(&mut self, headers: &HeaderMap, resuming: bool) -> Result<(), FetchError> {
        let mut claims: Vec<String> = header_str(headers, "x-ms-blob-content-md5")
            .into_iter()
            .collect();
        if !resuming {
            claims.extend(header_str(headers, "content-md5"));
        }
        for claim in claims {
            match &self.server_md5 {
                None => self.server_md5 = Some(claim),
                Some(first) if first.trim() != claim.trim() => {
                    return Err(FetchError::Integrity(format!(
                        "the server's MD5 claims disagree ({first} vs {claim})"
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// A blob response whose status and headers were accepted; its body is not read yet.
pub struct Opened {
    response: reqwest::Response,
    body_len: Option<u64>,
}

/// Requests the blob from `transfer.received` on (a Range request when resuming) and checks
/// status and headers, recording them in `transfer` (size, ETag, MD5 claims, resume offset).
pub async fn open(
    client: &reqwest::Client,
    clock: &RemoteClock,
    url: &Url,
    transfer: &mut Transfer,
) -> Result<Opened, FetchError> {
    // A link already past its signed expiry would only earn a 403: mint a new one instead of
    // connecting with it.
    if let Some(expiry) = link_expiry(url)
        && expiry <= clock.now()
    {
        return Err(FetchError::LinkExpired {
            expiry: crate::time::fmt(expiry),
        });
    }
    let mut request = client.get(url.clone());
    let resuming = transfer.received > 0;
    if resuming {
        request = request.header(header::RANGE, format!("bytes={}-", transfer.received));
        if let Some(etag) = &transfer.etag {
            request = request.header(header::IF_MATCH, etag);
        }
    }
    let response = request
        .send()
        .await
        .map_err(|e| interrupted(transfer.received, e))?;
    let status = response.status();
    let headers = response.headers().clone();
    clock.observe(&headers);
    if status.is_redirection() {
        let location = header_str(&headers, "location")
            .and_then(|l| Url::parse(&l).ok())
            .map(|u| u.host_str().unwrap_or("").to_string())
            .unwrap_or_else(|| "an unknown location".into());
        return Err(FetchError::Redirect {
            status: status.as_u16(),
            location: format!("host {location}"),
        });
    }
    let code = header_str(&headers, "x-ms-error-code").unwrap_or_default();
    if status == StatusCode::FORBIDDEN {
        return Err(FetchError::LinkRejected { code });
    }
    let expected_status = if resuming {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    if status != expected_status {
        return Err(FetchError::Http {
            status: status.as_u16(),
            code,
        });
    }
    let body_len = header_str(&headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    if resuming {
        transfer.check_resumed(&headers)?;
    } else {
        transfer.total = body_len;
        transfer.etag = header_str(&headers, "etag");
    }
    if transfer.http_status == 0 {
        transfer.record_first(status, &headers);
    }
    transfer.add_md5_claims(&headers, resuming)?;
    Ok(Opened { response, body_len })
}

/// Blob bytes this process has received, all transfers together (progress lines show them).
pub static RECEIVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Streams an opened body into `sink`. Returns when the body ended cleanly; integrity
/// (length, MD5) is checked by the caller once the writer has the digests.
pub async fn stream(
    opened: Opened,
    transfer: &mut Transfer,
    sink: &mpsc::Sender<bytes::Bytes>,
) -> Result<(), FetchError> {
    let Opened { response, body_len } = opened;
    let start = transfer.received;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| interrupted(transfer.received, e))?;
        let n = chunk.len() as u64;
        // Never hand the writer a byte beyond the announced size (a chunked or lying body).
        if let Some(total) = transfer.total
            && transfer.received + n > total
        {
            return Err(FetchError::Integrity(format!(
                "body runs past the announced {total} bytes"
            )));
        }
        sink.send(chunk).await.map_err(|_| FetchError::Sink)?;
        transfer.received += n;
        RECEIVED.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
    if let Some(len) = body_len {
        let got = transfer.received - start;
        if got != len {
            return Err(FetchError::Integrity(format!(
                "body had {got} bytes, Content-Length said {len}"
            )));
        }
    }
    Ok(())
}

fn interrupted(received: u64, e: reqwest::Error) -> FetchError {
    if e.is_connect() {
        return FetchError::Unreachable {
            message: crate::http::redact_reqwest(e),
        };
    }
    FetchError::Interrupted {
        received,
        timeout: e.is_timeout(),
        message: crate::http::redact_reqwest(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole transfer as the archive job does it: open, then stream.
    async fn fetch(
        client: &reqwest::Client,
        url: &Url,
        transfer: &mut Transfer,
        sink: &mpsc::Sender<bytes::Bytes>,
    ) -> Result<(), FetchError> {
        let opened = open(client, &RemoteClock::default(), url, transfer).await?;
        stream(opened, transfer, sink).await
    }

    #[test]
    fn allowlist_rules() {
        let a = Allowlist::new(&["*.blob.core.windows.net".into(), "127.0.0.1".into()]);
        assert!(
            a.check("https://acct.blob.core.windows.net/c/x?sig=1")
                .is_ok()
        );
        assert!(a.check("https://ACCT.Blob.Core.Windows.Net/c/x").is_ok());
        assert!(a.check("http://127.0.0.1:8080/blob/x?sig=1").is_ok());
        let refused = |l: &str| a.check(l).unwrap_err().0;
        assert_eq!(
            refused("https://blob.core.windows.net/x"),
            "host blob.core.windows.net is not in download_hosts"
        );
        assert_eq!(
            refused("https://evil.example.net/x?sig=1"),
            "host evil.example.net is not in download_hosts"
        );
        assert_eq!(
            refused("https://acct.blob.core.windows.net.evil.net/x"),
            "host acct.blob.core.windows.net.evil.net is not in download_hosts"
        );
        assert_eq!(
            refused("http://acct.blob.core.windows.net/x"),
            "scheme http to host acct.blob.core.windows.net (https required)"
        );
        assert_eq!(
            refused("https://u:p@acct.blob.core.windows.net/x"),
            "credentials embedded in the link to host acct.blob.core.windows.net"
        );
        assert!(refused("file:///etc/passwd").contains("scheme file"));
    }

    #[test]
    fn link_expiry_reads_se_only() {
        let at = |l: &str| link_expiry(&Url::parse(l).unwrap()).map(crate::time::fmt);
        assert_eq!(
            at("https://a.blob.core.windows.net/c?sv=1&se=2026-11-27T13%3A05%3A00Z&sig=x"),
            Some("2026-11-27T13:05:00.000Z".into())
        );
        assert_eq!(
            at("https://a.blob.core.windows.net/c?se=2026-11-27&sig=x"),
            Some("2026-11-27T00:00:00.000Z".into())
        );
        assert_eq!(at("https://a.blob.core.windows.net/c?se=soon&sig=x"), None);
        assert_eq!(at("https://a.blob.core.windows.net/c?sig=x"), None);
    }

    #[tokio::test]
    async fn an_expired_link_is_refused_without_connecting() {
        // Port 9 on loopback: nothing listens, so a connection attempt would be Interrupted.
        let url = Url::parse("http://127.0.0.1:9/c?se=2001-01-01T00%3A00%3A00Z&sig=x").unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let mut t = Transfer::default();
        let client = blob_client(Duration::from_secs(1)).unwrap();
        match fetch(&client, &url, &mut t, &tx).await {
            Err(FetchError::LinkExpired { expiry }) => {
                assert_eq!(expiry, "2001-01-01T00:00:00.000Z")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(t.received, 0);
    }

    /// Serves one raw HTTP response on loopback and returns its URL.
    async fn one_response(raw: &'static [u8]) -> Url {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf).await;
            sock.write_all(raw).await.unwrap();
            let _ = sock.shutdown().await;
        });
        Url::parse(&format!("http://{addr}/blob/x")).unwrap()
    }

    #[tokio::test]
    async fn a_body_longer_than_announced_is_refused_before_the_writer_sees_it() {
        // A resumed transfer of a 10-byte blob from byte 5: the chunked body brings 8 bytes.
        let url = one_response(
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 5-9/10\r\n\
              Transfer-Encoding: chunked\r\n\r\n8\r\nABCDEFGH\r\n0\r\n\r\n",
        )
        .await;
        let (tx, mut rx) = mpsc::channel(4);
        let mut t = Transfer {
            received: 5,
            total: Some(10),
            ..Default::default()
        };
        let client = blob_client(Duration::from_secs(5)).unwrap();
        match fetch(&client, &url, &mut t, &tx).await {
            Err(FetchError::Integrity(m)) => {
                assert_eq!(m, "body runs past the announced 10 bytes")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((t.received, t.ranges.clone()), (5, vec![5]));
        assert!(rx.try_recv().is_err(), "no byte reached the writer");
    }

    #[tokio::test]
    async fn a_body_shorter_than_content_length_is_interrupted() {
        let url = one_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nABCD").await;
        let (tx, mut rx) = mpsc::channel(4);
        let mut t = Transfer::default();
        let client = blob_client(Duration::from_secs(5)).unwrap();
        match fetch(&client, &url, &mut t, &tx).await {
            Err(FetchError::Interrupted { received, .. }) => assert_eq!(received, 4),
            other => panic!("{other:?}"),
        }
        assert_eq!(t.total, Some(10));
        assert_eq!(rx.try_recv().unwrap(), bytes::Bytes::from_static(b"ABCD"));
        assert!(t.check_complete(None).is_err());
    }

    #[test]
    fn host_path_drops_the_query() {
        let u = Url::parse("https://a.blob.core.windows.net/c/d/e?se=2021&sig=abc%3D").unwrap();
        assert_eq!(
            link_host_path(&u),
            ("a.blob.core.windows.net".into(), "/c/d/e".into())
        );
    }

    #[test]
    fn completeness_checks() {
        let md5 = [7u8; 16];
        let mut t = Transfer {
            received: 10,
            total: Some(10),
            ..Default::default()
        };
        assert_eq!(t.check_complete(Some(&md5)).unwrap(), "absent");
        assert_eq!(t.check_complete(None).unwrap(), "absent");
        t.server_md5 = Some(base64::engine::general_purpose::STANDARD.encode(md5));
        assert_eq!(t.check_complete(Some(&md5)).unwrap(), "match");
        // A claim the MD5 was not computed for (it came only with a resumed answer).
        assert!(
            t.check_complete(None)
                .unwrap_err()
                .to_string()
                .contains("only on a resumed request")
        );
        t.server_md5 = Some(base64::engine::general_purpose::STANDARD.encode([1u8; 16]));
        assert!(
            t.check_complete(Some(&md5))
                .unwrap_err()
                .to_string()
                .contains("MD5 mismatch")
        );
        t.server_md5 = None;
        t.total = Some(11);
        assert!(
            t.check_complete(Some(&md5))
                .unwrap_err()
                .to_string()
                .contains("received 10 bytes, server announced 11")
        );
    }
}
