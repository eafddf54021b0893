//! The simulated blob host: `GET` of a result's blob with its SAS checked against the
//! simulator's clock, `Range`, `Content-MD5`, the blob faults, and bodies streamed in chunks
//! (generated on the fly, never held whole), each counted while it is open.

use super::*;

pub(super) async fn blob(State(app): State<App>, headers: HeaderMap, uri: Uri) -> Response {
    let blob = uri
        .path()
        .strip_prefix(BLOB_PREFIX)
        .and_then(|rest| rest.split_once("/CustomPlaybookCommandOutput/"))
        .and_then(|(aid, name)| {
            app.sim
                .inner
                .blobs
                .get(name)
                .filter(|b| b.action_id == aid)
                .cloned()
        });
    let refusal = || sas_refusal(&app.sim.inner.sas_key, &uri, app.sim.now());
    let resp = serve_blob(&app, &headers, refusal, blob.clone()).await;
    match blob {
        Some(b) => tagged(resp, &b.tenant_id),
        None => resp,
    }
}

pub(super) fn parse_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
    // x-ms-range wins over Range when both are sent.
    let raw = headers
        .get("x-ms-range")
        .or_else(|| headers.get(header::RANGE))?
        .to_str()
        .ok()?;
    let (from, to) = raw.trim().strip_prefix("bytes=")?.split_once('-')?;
    let from = from.trim().parse().ok()?;
    let to = match to.trim() {
        "" => None,
        t => Some(t.parse().ok()?),
    };
    match to {
        Some(to) if to < from => None,
        _ => Some((from, to)),
    }
}

pub(super) const AUTH_FAILED: &str = "Server failed to authenticate the request. Make sure the value of Authorization header is formed correctly including the signature.";

/// A blob GET as Azure answers it: counted faults first, then the link's credential
/// (`refusal`: the SAS, or a package's token), the blob, If-Match, the range and the MD5
/// headers, then the body streamed from the generator.
pub(super) async fn serve_blob(
    app: &App,
    headers: &HeaderMap,
    refusal: impl FnOnce() -> Option<Response>,
    blob: Option<Arc<Blob>>,
) -> Response {
    let inner = &app.sim.inner;
    if let Some(fault) = injected_blob_fault(&inner.plan, next(&inner.counters.blob)) {
        return fault;
    }
    if let Some(refused) = refusal() {
        return refused;
    }
    let Some(blob) = blob else {
        return blob_error(
            StatusCode::NOT_FOUND,
            "BlobNotFound",
            "The specified blob does not exist.",
            None,
        );
    };
    if let Some(tag) = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok())
        && tag.trim() != "*"
        && tag.trim() != blob.etag
    {
        return blob_error(
            StatusCode::PRECONDITION_FAILED,
            "ConditionNotMet",
            "The condition specified using HTTP conditional header(s) is not met.",
            None,
        );
    }
    let range = parse_range(headers);
    let Some((start, end)) = byte_span(range, blob.len()) else {
        return range_not_satisfiable(blob.len());
    };
    let md5 = match md5_header(app, &blob).await {
        Ok(md5) => md5,
        Err(failed) => return failed,
    };
    let cut =
        (next(&inner.counters.bodies) < inner.plan.truncate).then(|| start + (end - start) / 2);
    let open = OpenBody::new(app.sim.inner.clone());
    let body = Body::from_stream(body_stream(
        blob.clone(),
        start,
        end,
        cut,
        inner.plan.slow,
        open,
    ));
    blob_response(&blob, body, range.is_some(), (start, end), md5)
}

/// The `redirect`, `blob-5xx` and `blob-403` faults, for the `k`-th blob request.
pub(super) fn injected_blob_fault(plan: &crate::fault::FaultPlan, k: usize) -> Option<Response> {
    if k < plan.redirect {
        return Some(
            (
                StatusCode::FOUND,
                [(header::LOCATION, "https://evil.example.net/x")],
            )
                .into_response(),
        );
    }
    if k < plan.redirect + plan.blob_5xx {
        return Some(blob_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServerBusy",
            "The server is busy.",
            None,
        ));
    }
    if k < plan.redirect + plan.blob_5xx + plan.blob_403 {
        return Some(blob_error(
            StatusCode::FORBIDDEN,
            "AuthenticationFailed",
            AUTH_FAILED,
            Some("Signature did not match (the `blob-403` fault)."),
        ));
    }
    None
}

/// The 403 for a SAS query that is not well formed, not signed for this path and expiry, or
/// expired at the simulator's clock `now`; `None` when it is good.
pub(super) fn sas_refusal(sas_key: &[u8; 32], uri: &Uri, now: DateTime<Utc>) -> Option<Response> {
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let auth_failed = |detail: &str| {
        blob_error(
            StatusCode::FORBIDDEN,
            "AuthenticationFailed",
            AUTH_FAILED,
            Some(detail),
        )
    };
    let (Some(se), Some(sig)) = (query.get("se"), query.get("sig")) else {
        return Some(auth_failed("Signature fields not well formed."));
    };
    let well_formed = query.get("sp").map(String::as_str) == Some("r")
        && query.get("sr").map(String::as_str) == Some("b")
        && query.get("sv").map(String::as_str) == Some(SAS_VERSION);
    if !well_formed || sign(sas_key, uri.path(), se) != *sig {
        return Some(auth_failed(&format!(
            "Signature did not match. String to sign used was r\n{se}\n{}\n{SAS_VERSION}\nb",
            uri.path()
        )));
    }

    match DateTime::parse_from_rfc3339(se) {
        Ok(expiry) if expiry.with_timezone(&Utc) >= now => None,
        _ => {
            let expiry = DateTime::parse_from_rfc3339(se)
                .map(|e| http_date(e.with_timezone(&Utc)))
                .unwrap_or_else(|_| se.clone());
            Some(auth_failed(&format!(
                "Signature not valid in the specified time frame: Start [] - Expiry [{expiry}] - Current [{}]",
                http_date(now)
            )))
        }
    }
}

/// `[start, end)` of a blob of `len` bytes for the requested range; `None` when the range
/// starts at or past the end.
pub(super) fn byte_span(range: Option<(u64, Option<u64>)>, len: u64) -> Option<(u64, u64)> {
    match range {
        None => Some((0, len)),
        Some((from, _)) if from >= len => None,
        Some((from, to)) => Some((from, to.map_or(len, |t| (t + 1).min(len)))),
    }
}

pub(super) fn range_not_satisfiable(len: u64) -> Response {
    let mut resp = blob_error(
        StatusCode::RANGE_NOT_SATISFIABLE,
        "InvalidRange",
        "The range specified is invalid for the current size of the resource.",
        None,
    );
    insert(
        resp.headers_mut(),
        "content-range",
        &format!("bytes */{len}"),
    );
    resp
}

/// The blob's MD5 in base64 when it sends one (spoiled by the `bad-md5` fault); the first
/// request pays for the hashing pass, on a blocking thread.
pub(super) async fn md5_header(app: &App, blob: &Arc<Blob>) -> Result<Option<String>, Response> {
    let inner = &app.sim.inner;
    if !blob.sends_md5(inner.cfg.md5_limit) {
        return Ok(None);
    }
    if !blob.digests_ready() {
        let b = blob.clone();
        if tokio::task::spawn_blocking(move || b.digests().md5)
            .await
            .is_err()
        {
            return Err(blob_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "Server encountered an internal error.",
                None,
            ));
        }
    }
    let mut md5 = blob.digests().md5;
    if next(&inner.counters.md5_headers) < inner.plan.bad_md5 {
        md5[0] ^= 0xff;
    }
    Ok(Some(BASE64.encode(md5)))
}

/// 200 (or 206 for a range) with Azure's headers around `body`.
pub(super) fn blob_response(
    blob: &Blob,
    body: Body,
    ranged: bool,
    (start, end): (u64, u64),
    md5: Option<String>,
) -> Response {
    let status = if ranged {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    insert(h, "content-length", &(end - start).to_string());
    insert(h, "content-type", blob.content_type());
    match (&md5, ranged) {
        (Some(m), false) => insert(h, "content-md5", m),
        (Some(m), true) => insert(h, "x-ms-blob-content-md5", m),
        (None, _) => {}
    }
    if ranged {
        insert(
            h,
            "content-range",
            &format!("bytes {start}-{}/{}", end.saturating_sub(1), blob.len()),
        );
    }
    insert(h, "etag", &blob.etag);
    insert(h, "last-modified", &http_date(blob.last_modified));
    insert(h, "accept-ranges", "bytes");
    insert(h, "x-ms-request-id", &request_id());
    insert(h, "x-ms-version", SAS_VERSION);
    insert(h, "x-ms-blob-type", "BlockBlob");
    insert(h, "x-ms-creation-time", &http_date(blob.last_modified));
    insert(h, "x-ms-server-encrypted", "true");
    resp
}

/// Streams `[start, end)` in 64 KiB chunks generated on the fly; with `cut` the stream fails
/// at that offset (the connection is then closed short of Content-Length); with `slow` the
/// chunks are paced to that many bytes per second.
/// Counts one blob body as open for as long as its stream lives.
pub(super) struct OpenBody(Arc<crate::Inner>);

impl OpenBody {
    fn new(inner: Arc<crate::Inner>) -> OpenBody {
        let now = inner.counters.open_bodies.fetch_add(1, Ordering::SeqCst) + 1;
        inner
            .counters
            .peak_open_bodies
            .fetch_max(now, Ordering::SeqCst);
        OpenBody(inner)
    }
}

impl Drop for OpenBody {
    fn drop(&mut self) {
        self.0.counters.open_bodies.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(super) fn body_stream(
    blob: Arc<Blob>,
    start: u64,
    end: u64,
    cut: Option<u64>,
    slow: Option<u64>,
    open: OpenBody,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let stop = cut.unwrap_or(end);
    // Owned by the stream: the body counts as open until hyper drops it.
    futures_util::stream::unfold(Some(start), move |pos| {
        let _ = &open;
        let blob = blob.clone();
        async move {
            let pos = pos?;
            if pos >= stop {
                if stop == end {
                    return None;
                }
                // Let hyper flush what was sent before the connection is torn down, so the
                // client really sees half the body (and not just a failed request).
                tokio::time::sleep(Duration::from_millis(20)).await;
                let err = io::Error::other("body cut short by the `truncate` fault");
                return Some((Err(err), None));
            }
            let mut n = (stop - pos).min(CHUNK);
            if let Some(bps) = slow {
                n = n.min((bps / 10).max(1));
                tokio::time::sleep(Duration::from_secs_f64(n as f64 / bps as f64)).await;
            }
            // The gzip trailer needs the CRC of the whole original: a blocking pass.
            let bytes = if blob.needs_crc(pos + n) {
                let b = blob.clone();
                match tokio::task::spawn_blocking(move || b.read(pos, n)).await {
                    Ok(bytes) => bytes,
                    Err(e) => return Some((Err(io::Error::other(e)), None)),
                }
            } else {
                blob.read(pos, n)
            };
            Some((Ok(bytes), Some(pos + n)))
        }
    })
}
