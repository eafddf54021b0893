//! Investigation packages: `getPackageUri` (its own 2/min and 120/h quota, 404 while "not
//! ready", the link wrapped in literal quotes) and the `safedownload` host behind its links,
//! served on the other loopback name (`localhost` when the API was called as `127.0.0.1`, and
//! the reverse), so a client's host allowlist is exercised. The link's `token=` query carries
//! the package's name and expiry, signed with the simulator's key.

use super::*;

/// The path every package link has, as in MDE's example.
const SAFEDOWNLOAD: &str = "/safedownload/WDATP_Investigation_Package.zip";

/// The `getPackageUri` function name (the docs write both spellings).
pub(super) fn is_package_uri(op: &str) -> bool {
    op.eq_ignore_ascii_case("getPackageUri")
}

/// `GET /api/machineactions/{id}/getPackageUri` for an authenticated `tenant`.
pub(super) fn package_uri(app: &App, tenant: &str, headers: &HeaderMap, id: &str) -> Response {
    let inner = &app.sim.inner;
    if let Err(wait) = app.admit(tenant, "packageuri") {
        return too_many(wait);
    }
    let k = next(&inner.counters.package_uri);
    let Some(action) = app.action(tenant, id) else {
        return mde_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            &format!("MachineAction {id} was not found"),
        );
    };
    let not_ready = || {
        mde_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            &format!("Investigation package of machine action {id} was not found"),
        )
    };
    if k < inner.plan.package_404 {
        return not_ready();
    }
    if k < inner.plan.package_404 + inner.plan.package_5xx {
        return mde_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError", "");
    }
    let Some(cmd) = action
        .commands
        .iter()
        .find(|c| c.command_type == "InvestigationPackage")
    else {
        return mde_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("Machine action {id} is not an investigation package collection"),
        );
    };
    let Some(blob) = cmd.blob.as_ref() else {
        return not_ready();
    };
    let host = match cmd.link {
        LinkKind::Gone => return not_ready(),
        LinkKind::ForeignHost => "https://evil.example.net".to_string(),
        LinkKind::HttpLink => "http://blob.example.net".to_string(),
        LinkKind::Blob => other_loopback(&base_url(headers, app)),
    };
    let expiry = link_expiry(app);
    let token = package_token(&inner.sas_key, &blob.name, expiry.timestamp());
    inner.state().package_tokens.push(token.clone());
    let base = base_url(headers, app);
    axum::Json(json!({
        "@odata.context": format!("{base}/api/$metadata#Edm.String"),
        "value": format!("\"{host}{SAFEDOWNLOAD}?token={token}\""),
    }))
    .into_response()
}

/// `http(s)://127.0.0.1:P` -> `http(s)://localhost:P` and the reverse; another name is kept.
fn other_loopback(base: &str) -> String {
    let Some((scheme, rest)) = base.split_once("://") else {
        return base.to_string();
    };
    if let Some(port) = rest.strip_prefix("127.0.0.1") {
        format!("{scheme}://localhost{port}")
    } else if let Some(port) = rest.strip_prefix("localhost") {
        format!("{scheme}://127.0.0.1{port}")
    } else {
        base.to_string()
    }
}

/// `{name}.{expiry}.{signature}`: which package, until when (Unix seconds), signed.
fn package_token(key: &[u8; 32], name: &str, expiry: i64) -> String {
    format!("{name}.{expiry}.{}", package_signature(key, name, expiry))
}

fn package_signature(key: &[u8; 32], name: &str, expiry: i64) -> String {
    let mut h = Sha256::new();
    h.update(key);
    h.update(format!("package\n{name}\n{expiry}").as_bytes());
    h.update(key);
    URL_SAFE_NO_PAD.encode(h.finalize())
}

/// `GET /safedownload/...?token=`: the package the token names, if the token is good and
/// unexpired at the simulator's clock.
pub(super) async fn safedownload(State(app): State<App>, headers: HeaderMap, uri: Uri) -> Response {
    let token: Option<String> = url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned());
    let parsed = token.as_deref().and_then(|t| {
        let mut parts = t.splitn(3, '.');
        let name = parts.next()?.to_string();
        let expiry: i64 = parts.next()?.parse().ok()?;
        Some((name, expiry, parts.next()?.to_string()))
    });
    let inner = &app.sim.inner;
    let blob = parsed
        .as_ref()
        .and_then(|(name, _, _)| inner.blobs.get(name).cloned());
    let now = app.sim.now();
    let refusal = || {
        let Some((name, expiry, sig)) = &parsed else {
            return Some(package_refused(
                "The download token is missing or malformed.",
            ));
        };
        if package_signature(&inner.sas_key, name, *expiry) != *sig {
            return Some(package_refused("The download token is not valid."));
        }
        (*expiry < now.timestamp()).then(|| package_refused("The download token has expired."))
    };
    let blob = blob.filter(|_| uri.path() == SAFEDOWNLOAD);
    let resp = serve_blob(&app, &headers, refusal, blob.clone()).await;
    match blob {
        Some(b) => tagged(resp, &b.tenant_id),
        None => resp,
    }
}

fn package_refused(message: &str) -> Response {
    blob_error(StatusCode::FORBIDDEN, "AuthenticationFailed", message, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_go_to_the_other_loopback_name() {
        assert_eq!(
            other_loopback("http://127.0.0.1:8080"),
            "http://localhost:8080"
        );
        assert_eq!(
            other_loopback("http://localhost:8080"),
            "http://127.0.0.1:8080"
        );
        assert_eq!(other_loopback("http://[::1]:8080"), "http://[::1]:8080");
    }

    #[test]
    fn tokens_are_signed_over_name_and_expiry() {
        let key = [9u8; 32];
        let t = package_token(&key, "abc", 100);
        assert!(t.starts_with("abc.100."));
        assert_ne!(t, package_token(&key, "abc", 101));
        assert_ne!(t, package_token(&key, "abd", 100));
    }
}
