//! End-to-end tests: a plain reqwest client against `Simulator::start()`.

use std::io::Read;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Utc};
use jsonwebtoken::Algorithm::PS256;
use md5::Md5;
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::*;

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-27T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn cfg(actions: usize) -> SimConfig {
    SimConfig {
        seed: 7,
        actions,
        now: now(),
        max_getfile_size: 200 * 1024,
        ..SimConfig::default()
    }
}

fn with_faults(actions: usize, faults: &str) -> SimConfig {
    SimConfig {
        faults: faults.split(',').map(|f| f.parse().unwrap()).collect(),
        ..cfg(actions)
    }
}

fn client() -> reqwest::Client {
    // reqwest carries no crypto provider of its own (the workspace's one TLS stack is ring).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

struct Rig {
    h: SimHandle,
    c: reqwest::Client,
    token: String,
    tenant: SimTenant,
}

impl Rig {
    async fn new(cfg: SimConfig) -> Rig {
        let h = Simulator::new(cfg).start().await.unwrap();
        let c = client();
        let tenant = h.sim.tenants()[0].clone();
        let resp = token_request(&c, &h.base_url(), &tenant, &tenant.client_secret).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body: Value = resp.json().await.unwrap();
        let token = body["access_token"].as_str().unwrap().to_string();
        Rig {
            h,
            c,
            token,
            tenant,
        }
    }

    fn base(&self) -> String {
        self.h.base_url()
    }

    async fn api(&self, path_and_query: &str) -> reqwest::Response {
        self.c
            .get(format!("{}{path_and_query}", self.base()))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
    }

    async fn list(&self, query: &str) -> Vec<Value> {
        let resp = self.api(&format!("/api/machineactions{query}")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body["@odata.context"],
            format!("{}/api/$metadata#MachineActions", self.base())
        );
        body["value"].as_array().unwrap().clone()
    }

    async fn link(&self, action_id: &str, index: u32) -> reqwest::Response {
        self.api(&format!(
            "/api/machineactions/{action_id}/GetLiveResponseResultDownloadLink(index={index})"
        ))
        .await
    }

    async fn link_url(&self, action_id: &str, index: u32) -> String {
        let resp = self.link(action_id, index).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body["@odata.context"],
            format!("{}/api/$metadata#Edm.String", self.base())
        );
        body["value"].as_str().unwrap().to_string()
    }

    fn expected(&self) -> Vec<ExpectedResult> {
        self.h.sim.expected_results(&self.tenant.tenant_id)
    }

    /// Results with a blob behind them (including `gone` ones), in fault order.
    fn bearing(&self) -> Vec<ExpectedResult> {
        self.expected()
            .into_iter()
            .filter(|e| e.has_result || e.gone)
            .collect()
    }

    fn largest_result(&self, ty: &str) -> ExpectedResult {
        self.expected()
            .into_iter()
            .filter(|e| e.has_result && e.command_type == ty)
            .max_by_key(|e| e.size)
            .unwrap()
    }
}

async fn token_request(
    c: &reqwest::Client,
    base: &str,
    t: &SimTenant,
    secret: &str,
) -> reqwest::Response {
    c.post(format!("{base}/{}/oauth2/v2.0/token", t.tenant_id))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", t.client_id.as_str()),
            ("client_secret", secret),
            ("scope", "https://api.securitycenter.microsoft.com/.default"),
        ])
        .send()
        .await
        .unwrap()
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn md5_b64(b: &[u8]) -> String {
    BASE64.encode(Md5::digest(b))
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

fn gunzip(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[tokio::test]
async fn token_is_issued_and_bad_credentials_are_refused() {
    let rig = Rig::new(cfg(3)).await;
    let base = rig.base();
    let t = rig.tenant.clone();
    assert_eq!(t, SimTenant::default_for(0));
    assert_eq!(t.client_secret, "sim-secret-0");

    let ok: Value = token_request(&rig.c, &base, &t, "sim-secret-0")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ok["token_type"], "Bearer");
    assert_eq!(ok["expires_in"], 3599);
    assert_eq!(ok["ext_expires_in"], 3599);
    assert_ne!(ok["access_token"], rig.token.as_str());

    let bad = token_request(&rig.c, &base, &t, "wrong").await;
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    let bad: Value = bad.json().await.unwrap();
    assert_eq!(bad["error"], "invalid_client");
    assert_eq!(bad["error_codes"], serde_json::json!([7000215]));
    assert!(
        bad["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS7000215: ")
    );

    let other_client = SimTenant {
        client_id: SimTenant::default_for(1).client_id,
        ..t.clone()
    };
    let resp = token_request(&rig.c, &base, &other_client, "sim-secret-0").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");

    let unknown = token_request(&rig.c, &base, &SimTenant::default_for(5), "x").await;
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
    let unknown: Value = unknown.json().await.unwrap();
    assert_eq!(unknown["error"], "invalid_request");
    assert_eq!(unknown["error_codes"], serde_json::json!([90002]));

    let no_default = rig
        .c
        .post(format!("{base}/{}/oauth2/v2.0/token", t.tenant_id))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", t.client_id.as_str()),
            ("client_secret", "sim-secret-0"),
            ("scope", "https://api.securitycenter.microsoft.com"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(no_default.status(), StatusCode::BAD_REQUEST);
    let body: Value = no_default.json().await.unwrap();
    assert_eq!(body["error"], "invalid_scope");

    // The API needs a valid bearer token.
    let anon = rig
        .c
        .get(format!("{base}/api/machineactions"))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), StatusCode::UNAUTHORIZED);
    let body: Value = anon.json().await.unwrap();
    assert_eq!(body["error"]["code"], "Unauthorized");
    assert_eq!(body["error"]["target"].as_str().unwrap().len(), 36);
    let forged = rig
        .c
        .get(format!("{base}/api/machineactions"))
        .bearer_auth("forged")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
    let unknown_route = rig
        .c
        .get(format!("{base}/api/machines"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_route.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        rig.api("/api/machines").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(rig.h.sim.count_status(401), 5);
    assert_eq!(rig.h.sim.count_status(400), 2);
}

#[tokio::test]
async fn tokens_expire() {
    // The simulator keeps time by the wall clock. A token with no time to live is expired by
    // the first call, whatever the machine's load; one that lives an hour is honoured.
    let expired = Rig::new(SimConfig {
        token_ttl: Duration::ZERO,
        ..cfg(2)
    })
    .await;
    assert_eq!(expired.api("/api/machineactions").await.status(), 401);
    let live = Rig::new(SimConfig {
        token_ttl: Duration::from_secs(3600),
        ..cfg(2)
    })
    .await;
    assert_eq!(live.api("/api/machineactions").await.status(), 200);
}

#[tokio::test]
async fn list_filters_pages_and_rejects_bad_queries() {
    let rig = Rig::new(cfg(25)).await;
    let everything = rig.list("").await;
    // 25 live-response actions plus 2 + 25/10 others.
    assert_eq!(everything.len(), 29);
    assert!(everything.iter().any(|a| a["type"] == "Isolate"));

    let lr = rig.list("?$filter=type eq 'LiveResponse'").await;
    assert_eq!(lr.len(), 25);
    assert!(lr.iter().all(|a| a["type"] == "LiveResponse"));
    // Newest first.
    let created: Vec<DateTime<Utc>> = lr
        .iter()
        .map(|a| {
            DateTime::parse_from_rfc3339(a["creationDateTimeUtc"].as_str().unwrap())
                .unwrap()
                .with_timezone(&Utc)
        })
        .collect();
    assert!(created.windows(2).all(|w| w[0] >= w[1]));
    // Both update-time spellings occur in List, Get always uses lastUpdateDateTimeUtc.
    assert!(lr.iter().any(|a| a.get("lastUpdateTimeUtc").is_some()));
    assert!(lr.iter().any(|a| a.get("lastUpdateDateTimeUtc").is_some()));
    assert!(
        rig.h
            .sim
            .actions(&rig.tenant.tenant_id)
            .iter()
            .all(|a| a.get("lastUpdateDateTimeUtc").is_some())
    );
    // Both timestamp precisions occur.
    let stamps: Vec<&str> = lr
        .iter()
        .map(|a| a["creationDateTimeUtc"].as_str().unwrap())
        .collect();
    assert!(stamps.iter().any(|s| s.len() == 28));
    assert!(stamps.iter().any(|s| s.len() < 28));

    // Paging with $top/$skip reproduces the whole list.
    let mut paged = Vec::new();
    for skip in (0..30).step_by(10) {
        let page = rig
            .list(&format!(
                "?$filter=type+eq+%27LiveResponse%27&$top=10&$skip={skip}"
            ))
            .await;
        paged.extend(page);
    }
    assert_eq!(paged, lr);

    // Creation-time window.
    let cut = created[10];
    let since = rig
        .list(&format!(
            "?$filter=type eq 'LiveResponse' and creationDateTimeUtc ge {}",
            cut.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
        ))
        .await;
    assert_eq!(since.len(), created.iter().filter(|c| **c >= cut).count());
    assert_eq!(since[..], lr[..since.len()]);

    // The status pattern puts Failed at positions 2, 11, 18 and 22 of 25.
    let failed = rig.list("?$filter=status eq 'Failed'").await;
    assert_eq!(failed.len(), 4);
    assert!(failed.iter().all(|a| a["status"] == "Failed"));
    let machine = lr[0]["machineId"].as_str().unwrap();
    let by_machine = rig
        .list(&format!("?$filter=machineId eq '{machine}'"))
        .await;
    assert_eq!(by_machine, vec![lr[0].clone()]);

    for bad in [
        "?$stop=10",
        "?$filter=computerDnsName eq 'x'",
        "?$filter=creationDateTimeUtc ge '2026-01-01T00:00:00Z'",
        "?$top=10001",
    ] {
        let resp = rig.api(&format!("/api/machineactions{bad}")).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "");
        assert_eq!(body["error"]["details"], serde_json::json!([]));
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("The query specified in the URI is not valid. ")
        );
    }
}

#[tokio::test]
async fn get_returns_the_entity_or_404() {
    let rig = Rig::new(cfg(5)).await;
    let actions = rig.h.sim.actions(&rig.tenant.tenant_id);
    let a = &actions[2];
    let id = a["id"].as_str().unwrap();
    let resp = rig.api(&format!("/api/machineactions/{id}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["@odata.context"],
        format!("{}/api/$metadata#MachineActions/$entity", rig.base())
    );
    body.as_object_mut().unwrap().remove("@odata.context");
    assert_eq!(&body, a);

    let resp = rig
        .api("/api/machineactions/00000000-0000-4000-8000-000000000000")
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "ResourceNotFound");
}

#[tokio::test]
async fn every_expected_result_downloads_with_matching_hashes() {
    let rig = Rig::new(cfg(16)).await;
    let expected = rig.expected();
    let mut downloaded = 0;
    let (mut strict_json, mut raw_nul, mut empty_files) = (0, 0, 0);
    for e in &expected {
        if !e.has_result {
            let resp = rig.link(&e.action_id, e.index).await;
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{e:?}");
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["code"], "BadRequest");
            continue;
        }
        let url = rig.link_url(&e.action_id, e.index).await;
        let prefix = format!(
            "{}/blob/investigation-actions-data/{}/CustomPlaybookCommandOutput/",
            rig.base(),
            e.action_id
        );
        assert!(url.starts_with(&prefix), "{url}");
        assert!(url.contains("&sp=r&sv=2019-07-07&sr=b&sig="));
        let resp = rig.c.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "content-length"), Some(e.size.to_string()));
        assert_eq!(header(&resp, "content-md5"), Some(e.md5_base64.clone()));
        assert_eq!(header(&resp, "accept-ranges").as_deref(), Some("bytes"));
        assert_eq!(
            header(&resp, "x-ms-blob-type").as_deref(),
            Some("BlockBlob")
        );
        assert_eq!(header(&resp, "x-ms-version").as_deref(), Some("2019-07-07"));
        assert!(header(&resp, "etag").unwrap().starts_with("\"0x8D"));
        assert!(header(&resp, "last-modified").unwrap().ends_with(" GMT"));
        assert!(header(&resp, "date").is_some());
        assert!(header(&resp, "x-ms-request-id").is_some());
        let content_type = header(&resp, "content-type").unwrap();
        let body = resp.bytes().await.unwrap();
        assert_eq!(body.len() as u64, e.size);
        assert_eq!(sha(&body), e.sha256);
        assert_eq!(md5_b64(&body), e.md5_base64);
        match e.command_type.as_str() {
            "GetFile" => {
                assert_eq!(content_type, "application/octet-stream");
                assert_eq!(&body[..2], &[0x1f, 0x8b]);
                let original = gunzip(&body);
                assert_eq!(Some(original.len() as u64), e.original_size);
                assert_eq!(Some(sha(&original)), e.original_sha256);
                if original.is_empty() {
                    empty_files += 1;
                }
            }
            _ => {
                assert_eq!(content_type, "application/json");
                assert_eq!(e.original_size, None);
                if serde_json::from_slice::<Value>(&body).is_ok() {
                    strict_json += 1;
                }
                if body.contains(&0) && body.windows(6).any(|w| w == b"\\u0000") {
                    raw_nul += 1;
                }
            }
        }
        downloaded += 1;
    }
    assert_eq!(downloaded, expected.iter().filter(|e| e.has_result).count());
    assert!(downloaded >= 10, "only {downloaded} results");
    assert!(strict_json >= 1 && raw_nul >= 1 && empty_files >= 1);
    // Commands past the last index do not exist.
    let last = expected.last().unwrap();
    let resp = rig.link(&last.action_id, 9).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // The blob host never saw an Authorization header, and the log never holds a query.
    assert_eq!(rig.h.sim.blob_requests_with_authorization(), 0);
    let log = rig.h.sim.requests();
    assert!(log.iter().all(|r| !r.path.contains('?')));
    assert_eq!(
        log.iter().filter(|r| r.endpoint == "blob").count(),
        downloaded
    );
    assert!(
        log.iter()
            .filter(|r| r.endpoint != "token")
            .all(|r| r.tenant_id.as_deref() == Some(rig.tenant.tenant_id.as_str()))
    );
    assert!(log.iter().all(|r| r.endpoint != "blob" || !r.authorization));
}

#[tokio::test]
async fn range_resume_produces_the_same_hash() {
    let rig = Rig::new(SimConfig {
        big_getfile: Some(300_000),
        ..cfg(4)
    })
    .await;
    let e = rig.largest_result("GetFile");
    assert_eq!(e.original_size, Some(300_000));
    let url = rig.link_url(&e.action_id, e.index).await;

    let first = rig
        .c
        .get(&url)
        .header("Range", "bytes=0-65599")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&first, "content-range"),
        Some(format!("bytes 0-65599/{}", e.size))
    );
    assert_eq!(header(&first, "content-md5"), None);
    assert_eq!(
        header(&first, "x-ms-blob-content-md5"),
        Some(e.md5_base64.clone())
    );
    let etag = header(&first, "etag").unwrap();
    let mut bytes = first.bytes().await.unwrap().to_vec();
    assert_eq!(bytes.len(), 65_600);

    let rest = rig
        .c
        .get(&url)
        .header("Range", "bytes=65600-")
        .header("If-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(rest.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&rest, "content-length"),
        Some((e.size - 65_600).to_string())
    );
    bytes.extend_from_slice(&rest.bytes().await.unwrap());
    assert_eq!(sha(&bytes), e.sha256);

    let past = rig
        .c
        .get(&url)
        .header("Range", format!("bytes={}-", e.size))
        .send()
        .await
        .unwrap();
    assert_eq!(past.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert!(
        past.text()
            .await
            .unwrap()
            .contains("<Code>InvalidRange</Code>")
    );

    let changed = rig
        .c
        .get(&url)
        .header("Range", "bytes=10-")
        .header("If-Match", "\"0x8D000\"")
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), StatusCode::PRECONDITION_FAILED);
    assert!(
        changed
            .text()
            .await
            .unwrap()
            .contains("<Code>ConditionNotMet</Code>")
    );
}

#[tokio::test]
async fn expired_or_tampered_links_are_403() {
    let rig = Rig::new(with_faults(6, "expired-links=1")).await;
    let e = rig.largest_result("RunScript");
    let expired = rig.link_url(&e.action_id, e.index).await;
    let resp = rig.c.get(&expired).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        header(&resp, "content-type").as_deref(),
        Some("application/xml")
    );
    let xml = resp.text().await.unwrap();
    assert!(xml.contains("<Code>AuthenticationFailed</Code>"));
    assert!(xml.contains("<Message>Server failed to authenticate the request."));
    assert!(xml.contains("\nRequestId:"));
    assert!(xml.contains(
        "<AuthenticationErrorDetail>Signature not valid in the specified time frame: Start [] - Expiry ["
    ));

    let fresh = rig.link_url(&e.action_id, e.index).await;
    let tampered = fresh.replace("&sp=r", "&sp=rw");
    let resp = rig.c.get(&tampered).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let other_blob = fresh.replace(&e.action_id, "00000000-0000-4000-8000-000000000000");
    let resp = rig.c.get(&other_blob).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = rig.c.get(&fresh).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(sha(&resp.bytes().await.unwrap()), e.sha256);
}

#[tokio::test]
async fn link_quota_answers_429_with_retry_after() {
    // A window of a minute that no slow machine outlasts between the first call and the
    // refusal; when a slot frees is the quota's own test (sim/quota.rs, with injected times).
    let rig = Rig::new(SimConfig {
        per_minute: 5,
        minute: Duration::from_secs(60),
        ..cfg(4)
    })
    .await;
    let e = rig.largest_result("RunScript");
    let first = Instant::now();
    for _ in 0..5 {
        assert_eq!(rig.link(&e.action_id, e.index).await.status(), 200);
    }
    let refused = rig.link(&e.action_id, e.index).await;
    let since_first = first.elapsed().as_secs();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    // The first call leaves the window 60 s after it was admitted, rounded up to a second.
    let retry_after: u64 = header(&refused, "retry-after").unwrap().parse().unwrap();
    assert!(
        (60 - since_first.min(59)..=60).contains(&retry_after),
        "Retry-After {retry_after}, {since_first} s after the first call"
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "TooManyRequests");
    // Other endpoints have their own bucket.
    assert_eq!(rig.api("/api/machineactions").await.status(), 200);
    assert_eq!(rig.h.sim.count_status(429), 1);
}

#[tokio::test]
async fn fault_5xx_and_429_bursts() {
    let rig = Rig::new(with_faults(4, "429=1,link-5xx=2,list-5xx=1,blob-5xx=1")).await;
    let e = rig.largest_result("RunScript");
    let r = rig.link(&e.action_id, e.index).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "retry-after").as_deref(), Some("1"));
    for _ in 0..2 {
        let r = rig.link(&e.action_id, e.index).await;
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "InternalServerError");
    }
    let url = rig.link_url(&e.action_id, e.index).await;

    assert_eq!(rig.api("/api/machineactions").await.status(), 500);
    assert_eq!(rig.api("/api/machineactions").await.status(), 200);

    let busy = rig.c.get(&url).send().await.unwrap();
    assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        busy.text()
            .await
            .unwrap()
            .contains("<Code>ServerBusy</Code>")
    );
    let ok = rig.c.get(&url).send().await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(sha(&ok.bytes().await.unwrap()), e.sha256);
}

#[tokio::test]
async fn fault_truncate_bad_md5_and_redirect() {
    let rig = Rig::new(with_faults(6, "redirect=1,truncate=1,bad-md5=1")).await;
    let e = rig.largest_result("GetFile");
    let url = rig.link_url(&e.action_id, e.index).await;

    let moved = rig.c.get(&url).send().await.unwrap();
    assert_eq!(moved.status(), StatusCode::FOUND);
    assert_eq!(
        header(&moved, "location").as_deref(),
        Some("https://evil.example.net/x")
    );

    let mut cut = rig.c.get(&url).send().await.unwrap();
    assert_eq!(cut.status(), StatusCode::OK);
    assert_eq!(header(&cut, "content-length"), Some(e.size.to_string()));
    assert_ne!(header(&cut, "content-md5"), Some(e.md5_base64.clone()));
    let mut got = 0u64;
    let ended = loop {
        match cut.chunk().await {
            Ok(Some(c)) => got += c.len() as u64,
            Ok(None) => break "clean end",
            Err(_) => break "error",
        }
    };
    assert_eq!(ended, "error");
    assert_eq!(got, e.size / 2);

    let ok = rig.c.get(&url).send().await.unwrap();
    assert_eq!(header(&ok, "content-md5"), Some(e.md5_base64.clone()));
    assert_eq!(sha(&ok.bytes().await.unwrap()), e.sha256);
}

#[tokio::test]
async fn fault_slow_throttles_bodies() {
    let rig = Rig::new(with_faults(6, "slow=100000")).await;
    let e = rig.largest_result("GetFile");
    let url = rig.link_url(&e.action_id, e.index).await;
    let started = Instant::now();
    let resp = rig
        .c
        .get(&url)
        .header("Range", "bytes=0-29999")
        .send()
        .await
        .unwrap();
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.len(), 30_000);
    // 30 000 bytes at 100 000 B/s take at least 0.3 s.
    assert!(started.elapsed() >= Duration::from_millis(290));
}

#[tokio::test]
async fn fault_ttls_override_config() {
    let rig = Rig::new(with_faults(4, "link-ttl=120,token-ttl=60")).await;
    let resp = token_request(&rig.c, &rig.base(), &rig.tenant, "sim-secret-0").await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["expires_in"], 60);
    assert_eq!(rig.h.sim.config().link_ttl, Duration::from_secs(120));

    let e = rig.largest_result("RunScript");
    let url = rig.link_url(&e.action_id, e.index).await;
    let parsed = url::Url::parse(&url).unwrap();
    let se = parsed
        .query_pairs()
        .find(|(k, _)| k == "se")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    let se = DateTime::parse_from_rfc3339(&se)
        .unwrap()
        .with_timezone(&Utc);
    let left = (se - Utc::now()).num_seconds();
    assert!((119..=122).contains(&left), "{left}");
    assert!(url.contains("se=") && url.contains("%3A"));
}

#[tokio::test]
async fn fault_foreign_http_and_gone_links() {
    let rig = Rig::new(with_faults(8, "gone=1,foreign-host=2,http-link=1")).await;
    let b = rig.bearing();
    assert!(b.len() >= 4);
    assert!(b[0].gone && !b[0].has_result);
    assert!(b[1..].iter().all(|e| !e.gone && e.has_result));

    let resp = rig.link(&b[0].action_id, b[0].index).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "ResourceNotFound");

    let foreign = rig.link_url(&b[1].action_id, b[1].index).await;
    assert!(foreign.starts_with(&format!(
        "https://evil.example.net/investigation-actions-data/{}/CustomPlaybookCommandOutput/",
        b[1].action_id
    )));
    let http = rig.link_url(&b[2].action_id, b[2].index).await;
    assert!(http.starts_with("http://blob.example.net/investigation-actions-data/"));
    let normal = rig.link_url(&b[3].action_id, b[3].index).await;
    assert!(normal.starts_with(&format!("{}/blob/", rig.base())));
}

#[tokio::test]
async fn fault_hostile_names() {
    let rig = Rig::new(with_faults(40, "hostile-names")).await;
    let names: Vec<String> = rig
        .expected()
        .into_iter()
        .filter(|e| e.command_type == "GetFile")
        .map(|e| e.original_name.unwrap())
        .collect();
    assert!(names.len() >= 9, "{}", names.len());
    for want in [
        r"..\..\Windows\System32\config\SAM",
        r"C:\temp\CON",
        "aux.txt",
        "/etc/passwd",
        r"C:\temp\..",
    ] {
        assert!(names.iter().any(|n| n == want), "{want}");
    }
    assert!(names.iter().any(|n| n.chars().any(char::is_control)));
    assert!(names.iter().any(|n| n.len() == r"C:\temp\".len() + 300));
    assert!(names.iter().any(|n| n.contains('\u{FFFD}')));
    // The Path parameter served by the API carries the same raw name.
    let served = serde_json::to_string(&rig.h.sim.actions(&rig.tenant.tenant_id)).unwrap();
    assert!(served.contains(r#""value":"/etc/passwd""#));
}

#[tokio::test]
async fn big_getfile_streams_without_md5_above_the_limit() {
    let size = 3 * 1024 * 1024 + 5;
    let rig = Rig::new(SimConfig {
        big_getfile: Some(size),
        md5_limit: 1024 * 1024,
        ..cfg(2)
    })
    .await;
    let e = rig
        .expected()
        .into_iter()
        .find(|e| e.original_size == Some(size))
        .unwrap();
    assert_eq!(
        e.original_name.as_deref(),
        Some(r"D:\Evidence\memory\host-full.raw")
    );
    let url = rig.link_url(&e.action_id, e.index).await;
    let resp = rig.c.get(&url).send().await.unwrap();
    assert_eq!(header(&resp, "content-md5"), None);
    assert_eq!(header(&resp, "content-length"), Some(e.size.to_string()));
    let body = resp.bytes().await.unwrap();
    assert_eq!(sha(&body), e.sha256);
    let original = gunzip(&body);
    assert_eq!(original.len() as u64, size);
    assert_eq!(Some(sha(&original)), e.original_sha256);
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let rig = Rig::new(cfg(1)).await;
    let base = rig.base();
    let c = rig.c.clone();
    rig.h.shutdown().await.unwrap();
    assert!(
        c.get(format!("{base}/api/machineactions"))
            .send()
            .await
            .is_err()
    );
}

#[tokio::test]
async fn fault_blob_403_and_unauthorized() {
    let rig = Rig::new(with_faults(4, "blob-5xx=1,blob-403=2,unauthorized=1")).await;
    // The first authenticated API request revokes the rig's token: 401, and it stays revoked.
    assert_eq!(
        rig.api("/api/machineactions").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        rig.api("/api/machineactions").await.status(),
        StatusCode::UNAUTHORIZED
    );
    let fresh = token_request(&rig.c, &rig.base(), &rig.tenant, &rig.tenant.client_secret).await;
    let fresh: Value = fresh.json().await.unwrap();
    let fresh = fresh["access_token"].as_str().unwrap().to_string();
    assert_eq!(
        rig.h.sim.issued_tokens(),
        vec![rig.token.clone(), fresh.clone()]
    );
    let e = rig.largest_result("RunScript");
    let link = rig
        .c
        .get(format!(
            "{}/api/machineactions/{}/GetLiveResponseResultDownloadLink(index={})",
            rig.base(),
            e.action_id,
            e.index
        ))
        .bearer_auth(&fresh)
        .send()
        .await
        .unwrap();
    assert_eq!(link.status(), StatusCode::OK);
    let body: Value = link.json().await.unwrap();
    let url = body["value"].as_str().unwrap().to_string();
    // blob-5xx comes first, then the 403s, then the blob.
    assert_eq!(rig.c.get(&url).send().await.unwrap().status(), 503);
    for _ in 0..2 {
        let r = rig.c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            header(&r, "x-ms-error-code").as_deref(),
            Some("AuthenticationFailed")
        );
    }
    let ok = rig.c.get(&url).send().await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(sha(&ok.bytes().await.unwrap()), e.sha256);
}

async fn assertion_request(
    c: &reqwest::Client,
    base: &str,
    t: &SimTenant,
    assertion: &str,
) -> (u16, Value) {
    let resp = c
        .post(format!("{base}/{}/oauth2/v2.0/token", t.tenant_id))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", t.client_id.as_str()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
            ("scope", "https://api.securitycenter.microsoft.com/.default"),
        ])
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// A JWT made by jsonwebtoken, an implementation the simulator's checks do not share: `alg`
/// with `key`, under the certificate `thumbprint` when given.
fn jwt(
    alg: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
    thumbprint: Option<&str>,
    claims: &Value,
) -> String {
    let mut header = jsonwebtoken::Header::new(alg);
    header.x5t_s256 = thumbprint.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// An RSA private key (PEM) as jsonwebtoken signs with it.
fn rsa_key(pem: &str) -> jsonwebtoken::EncodingKey {
    jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap()
}

/// Over HTTPS the assertion's audience is the https token endpoint the client called (an
/// `http://` audience for the same host is someone else's).
#[tokio::test]
async fn an_assertion_over_https_is_judged_against_the_https_endpoint() {
    let dir = TempDir::new();
    let (key, cert) = openssl_certificate(dir.path(), "app").unwrap();
    let (tls_key, tls_cert) = openssl_certificate(dir.path(), "tls").unwrap();
    let tls = TlsIdentity::from_pem(tls_cert.as_bytes(), tls_key.as_bytes()).unwrap();
    let h = Simulator::new(cfg(1)).start_with(Some(tls)).await.unwrap();
    let base = h.base_url();
    assert!(base.starts_with("https://127.0.0.1:"), "{base}");
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The server's self-signed certificate is not what this test is about.
    let c = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let t = h.sim.tenants()[0].clone();
    let x5t = h.sim.add_client_certificate(&t.tenant_id, &cert).unwrap();
    let now = Utc::now().timestamp();
    for (scheme, status) in [("https", 200), ("http", 401)] {
        let aud = format!("{scheme}://{}/{}/oauth2/v2.0/token", h.addr, t.tenant_id);
        let claims = serde_json::json!({"aud": aud, "iss": t.client_id, "sub": t.client_id,
            "jti": scheme, "nbf": now, "iat": now, "exp": now + 600});
        let assertion = jwt(PS256, &rsa_key(&key), Some(&x5t), &claims);
        let (got, body) = assertion_request(&c, &base, &t, &assertion).await;
        assert_eq!(got, status, "aud {aud}: {body}");
    }
}

#[tokio::test]
async fn client_assertions_are_verified_for_real() {
    let dir = TempDir::new();
    let (key, cert) = openssl_certificate(dir.path(), "app").unwrap();
    let (other_key, _) = openssl_certificate(dir.path(), "other").unwrap();
    let (key, other_key) = (rsa_key(&key), rsa_key(&other_key));
    let h = Simulator::new(cfg(1)).start().await.unwrap();
    let (c, t, base) = (client(), h.sim.tenants()[0].clone(), h.base_url());
    let ask = |assertion: String| {
        let (c, t, base) = (&c, &t, &base);
        async move { assertion_request(c, base, t, &assertion).await }
    };
    let x5t = h.sim.add_client_certificate(&t.tenant_id, &cert).unwrap();
    let aud = format!("{base}/{}/oauth2/v2.0/token", t.tenant_id);
    let now = Utc::now().timestamp();
    let claims = |aud: &str, iss: &str, nbf: i64, exp: i64| serde_json::json!({"aud": aud, "iss": iss, "sub": iss, "jti": "j", "nbf": nbf, "iat": nbf, "exp": exp});
    let good = claims(&aud, &t.client_id, now, now + 600);
    let signed = |claims: &Value| jwt(PS256, &key, Some(&x5t), claims);
    let (status, body) = ask(signed(&good)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["access_token"].as_str().is_some_and(|a| !a.is_empty()));
    let rs256 = jwt(jsonwebtoken::Algorithm::RS256, &key, Some(&x5t), &good);
    assert_eq!(ask(rs256).await.0, 200);
    let refused = |code: u64| {
        move |(status, body): (u16, Value)| {
            assert_eq!(
                (
                    status,
                    body["error"].as_str(),
                    body["error_codes"][0].as_u64()
                ),
                (401, Some("invalid_client"), Some(code)),
                "{body}"
            );
        }
    };
    // Signed with another key under the registered thumbprint: a forgery.
    refused(700027)(ask(jwt(PS256, &other_key, Some(&x5t), &good)).await);
    // An unknown thumbprint.
    refused(700027)(ask(jwt(PS256, &key, Some("AAAA"), &good)).await);
    // Wrong audience, expired, not yet valid, too long, another client.
    let other_aud = "https://login.microsoftonline.com/x/oauth2/v2.0/token";
    let other_aud = claims(other_aud, &t.client_id, now, now + 600);
    refused(700212)(ask(signed(&other_aud)).await);
    let expired = claims(&aud, &t.client_id, now - 4000, now - 3400);
    refused(700024)(ask(signed(&expired)).await);
    let early = claims(&aud, &t.client_id, now + 3600, now + 4000);
    refused(700024)(ask(signed(&early)).await);
    let long = claims(&aud, &t.client_id, now, now + 86400);
    refused(700024)(ask(signed(&long)).await);
    let stranger = claims(&aud, "someone-else", now, now + 600);
    refused(700021)(ask(signed(&stranger)).await);
    // Algorithm confusion: HS256 keyed with the certificate itself, under its thumbprint.
    let with_cert = jsonwebtoken::EncodingKey::from_secret(cert.as_bytes());
    let confused = jwt(
        jsonwebtoken::Algorithm::HS256,
        &with_cert,
        Some(&x5t),
        &good,
    );
    refused(5002738)(ask(confused).await);
    // Not three base64url parts; a signature with one character changed.
    for malformed in ["a.b", "not a jwt", "e30.e30.!!"] {
        refused(50027)(ask(malformed.to_string()).await);
    }
    let mut bent = signed(&good).into_bytes();
    let at = bent.len() - 10;
    bent[at] = if bent[at] == b'A' { b'B' } else { b'A' };
    refused(700027)(ask(String::from_utf8(bent).unwrap()).await);
    // No subject.
    let mut no_sub = good.clone();
    no_sub.as_object_mut().unwrap().remove("sub");
    refused(700021)(ask(signed(&no_sub)).await);
    // A deleted certificate no longer signs in.
    h.sim.remove_client_certificate(&t.tenant_id, &x5t);
    refused(700027)(ask(signed(&good)).await);
    // Federated: only a token the simulator issued, until it is revoked.
    let federated = h.sim.issue_federated_token(&t.tenant_id);
    assert_eq!(ask(federated.clone()).await.0, 200);
    let made_up = claims(
        "api://AzureADTokenExchange",
        FEDERATED_ISSUER,
        now,
        now + 600,
    );
    refused(700211)(ask(jwt(PS256, &key, None, &made_up)).await);
    h.sim.revoke_federated_token(&federated);
    refused(700211)(ask(federated).await);
}

#[tokio::test]
async fn the_managed_identity_endpoint_answers_in_both_forms() {
    let h = Simulator::new(SimConfig {
        tenants: vec![SimTenant::default_for(0), SimTenant::default_for(1)],
        ..cfg(1)
    })
    .start()
    .await
    .unwrap();
    let c = client();
    let get = |path: &str, header: (&'static str, String)| {
        c.get(format!("{}{path}", h.base_url()))
            .header(header.0, header.1)
            .send()
    };
    let resource = "resource=https%3A%2F%2Fapi.securitycenter.microsoft.com";
    let imds = format!("/metadata/identity/oauth2/token?api-version=2018-02-01&{resource}");
    let ok: Value = get(&imds, ("Metadata", "true".into()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ok["expires_in"], "3599");
    assert_eq!(
        ok["client_id"].as_str(),
        Some(h.sim.tenants()[0].client_id.as_str())
    );
    let token = ok["access_token"].as_str().unwrap();
    let list = c
        .get(format!("{}/api/machineactions", h.base_url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), StatusCode::OK);
    assert_eq!(
        get(&imds, ("X-Other", "1".into())).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    // User-assigned: the second tenant's app.
    let second = &h.sim.tenants()[1].client_id;
    let user = format!("/msi/token?api-version=2019-08-01&{resource}&client_id={second}");
    let ok: Value = get(&user, ("X-IDENTITY-HEADER", h.sim.identity_header()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ok["client_id"].as_str(), Some(second.as_str()));
    assert_eq!(
        get(&user, ("X-IDENTITY-HEADER", "wrong".into()))
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let unknown = format!("/msi/token?api-version=2019-08-01&{resource}&client_id=nobody");
    let refused = get(&unknown, ("X-IDENTITY-HEADER", h.sim.identity_header()))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        refused.json::<Value>().await.unwrap()["error_description"],
        "Identity not found"
    );
}

/// A temporary directory removed on drop (the simulator crate has no tempfile dependency).
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!("lrvault-sim-test-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
