//! The Azure backend: its data path against Azurite (which has no versioning and enforces no
//! immutability), and its WORM check against a mocked Get Container Properties answer,
//! because no emulator implements immutability policies.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::TryStreamExt;
use lrvault::config::{Backend, ObjectStoreConfig, StoreConfig, StoreCredentials};
use lrvault::store::{Expected, Store, StoreError, Verdict, WormStatus};
use object_store::{ObjectStoreExt, PutPayload};

use crate::common::{sha256_hex, stored_hash};
use crate::object_stores::{
    AZURITE_ACCOUNT, AZURITE_KEY, azurite, azurite_credentials, create_container, noise,
};

fn azure_config(endpoint: String, container: &str, spool: std::path::PathBuf) -> StoreConfig {
    StoreConfig::object(Backend::Azure(ObjectStoreConfig {
        spool,
        prefix: "lrvault".into(),
        endpoint: Some(endpoint.parse().unwrap()),
        credentials: StoreCredentials::Env,
        require_worm: false,
        ..ObjectStoreConfig::new(container)
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_publishes_reads_back_recovers_and_detects_overwrites_on_azurite() {
    let azurite = azurite().await;
    create_container(&azurite, "evidence").await;
    let spool = tempfile::tempdir().unwrap();
    let endpoint = format!("{}/{AZURITE_ACCOUNT}", azurite.url());
    let cfg = azure_config(endpoint.clone(), "evidence", spool.path().into());
    let store = Store::open_with(&cfg, &azurite_credentials).unwrap();

    let small = (
        "contoso/2026/11/27/act-9/000-RunScript.zip",
        noise(50_000, 7),
    );
    let large = (
        "contoso/2026/11/27/act-9/001-GetFile.zip",
        noise(
            lrvault::store::SINGLE_PUT_MAX as usize + 5 * 1024 * 1024 + 17,
            8,
        ),
    );
    let mut published = Vec::new();
    for (key, bytes) in [&small, &large] {
        let path = store.staging_path(key).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        let expected = Expected {
            sha256: sha256_hex(bytes),
            size: bytes.len() as u64,
        };
        let stored = store.publish(key, &expected).await.unwrap();
        assert_eq!(
            stored.location,
            format!("azure://{AZURITE_ACCOUNT}/evidence/lrvault/{key}")
        );
        assert_eq!(stored.size, bytes.len() as u64);
        assert!(stored.etag.is_some());
        assert_eq!(stored.version_id, None, "Azurite keeps no versions");
        assert_eq!(
            stored_hash(&store, key, None).await,
            (expected.sha256.clone(), expected.size)
        );
        // A crash before the commit: publishing again adopts the same blob.
        let again = Store::open_with(&cfg, &azurite_credentials)
            .unwrap()
            .publish(key, &expected)
            .await
            .unwrap();
        assert_eq!(again, stored);
        assert_eq!(
            store
                .judge(key, stored.version_id.as_deref(), stored.etag.as_deref())
                .await
                .unwrap(),
            Verdict::Intact
        );
        store.release(key).await.unwrap();
        published.push((key.to_string(), stored, expected));
    }
    assert_eq!(
        std::fs::read_dir(spool.path()).unwrap().count(),
        0,
        "the spool is empty"
    );

    // Checkpoints: create-only, idempotent for the same bytes.
    let cp = "_checkpoints/000000000007.json";
    let first = store
        .put_small(cp, Bytes::from_static(b"{\"seq\":7}"))
        .await
        .unwrap();
    assert_eq!(
        store
            .put_small(cp, Bytes::from_static(b"{\"seq\":7}"))
            .await
            .unwrap(),
        first
    );
    let e = store
        .put_small(cp, Bytes::from_static(b"{\"seq\":8}"))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e}");

    let mut listed: Vec<String> = store
        .list("")
        .map_ok(|l| l.key)
        .try_collect()
        .await
        .unwrap();
    listed.sort();
    assert_eq!(
        listed,
        vec![cp.to_string(), small.0.to_string(), large.0.to_string()]
    );

    // Someone with the account key overwrites a package: without versions, verify sees the
    // new bytes under the key.
    let raw = object_store::azure::MicrosoftAzureBuilder::new()
        .with_account(AZURITE_ACCOUNT)
        .with_access_key(AZURITE_KEY)
        .with_container_name("evidence")
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .build()
        .unwrap();
    let forged = noise(50_000, 9);
    raw.put(
        &format!("lrvault/{}", small.0).into(),
        PutPayload::from(forged.clone()),
    )
    .await
    .unwrap();
    let (key, stored, _) = &published[0];
    assert_eq!(
        stored_hash(&store, key, None).await,
        (sha256_hex(&forged), 50_000)
    );
    match store
        .judge(key, None, stored.etag.as_deref())
        .await
        .unwrap()
    {
        Verdict::Superseded { current: Some(c) } => {
            assert_ne!(c.etag, stored.etag);
            assert_eq!(c.size, 50_000);
        }
        other => panic!("expected Superseded, got {other:?}"),
    }
    // Its WORM check refuses the account key lrvault was given here.
    let e = store.check_worm().await.unwrap_err();
    assert!(
        e.to_string()
            .starts_with("store.require_worm with an Azure account key"),
        "{e}"
    );
}

/// What the mock saw: the request's path and query.
type Seen = Arc<Mutex<Vec<String>>>;

/// A Get Container Properties endpoint answering with the given immutability headers.
async fn mock_container(
    versioning: Option<&'static str>,
    policy: Option<&'static str>,
) -> (String, Seen) {
    use axum::extract::{OriginalUri, State};
    use axum::http::HeaderMap;
    let seen: Seen = Arc::default();
    let app =
        axum::Router::new()
            .fallback(
                move |State(seen): State<Seen>,
                      OriginalUri(uri): OriginalUri,
                      headers: HeaderMap| async move {
                    seen.lock().unwrap().push(format!(
                        "{} x-ms-version={}",
                        uri,
                        headers
                            .get("x-ms-version")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                    ));
                    let mut out = axum::http::HeaderMap::new();
                    if let Some(v) = versioning {
                        out.insert(
                            "x-ms-immutable-storage-with-versioning-enabled",
                            v.parse().unwrap(),
                        );
                    }
                    if let Some(p) = policy {
                        out.insert("x-ms-has-immutability-policy", p.parse().unwrap());
                    }
                    (axum::http::StatusCode::OK, out)
                },
            )
            .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/wormacct", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_worm_check_reads_the_containers_immutability() {
    let sas = |name: &str| match name {
        "AZURE_STORAGE_ACCOUNT_NAME" => Some("wormacct".to_string()),
        "AZURE_STORAGE_SAS_KEY" => Some("?sv=2022-11-02&sr=c&sp=rl&sig=c2lnbmF0dXJl".to_string()),
        _ => None,
    };
    let spool = tempfile::tempdir().unwrap();
    let check = |versioning, policy| {
        let spool = spool.path().to_path_buf();
        async move {
            let (url, seen) = mock_container(versioning, policy).await;
            let store = Store::open_with(&azure_config(url, "evidence", spool), &sas).unwrap();
            (store.check_worm().await, seen.lock().unwrap().clone())
        }
    };

    let (ok, seen) = check(Some("true"), Some("true")).await;
    assert_eq!(
        ok.unwrap(),
        WormStatus {
            mode: "version-level immutability".into(),
            period: None
        }
    );
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].starts_with("/wormacct/evidence?restype=container&"),
        "{seen:?}"
    );
    assert!(
        seen[0].contains("sig=c2lnbmF0dXJl"),
        "the SAS authorises the call: {seen:?}"
    );
    assert!(seen[0].ends_with("x-ms-version=2021-12-02"), "{seen:?}");

    let (e, _) = check(Some("false"), Some("true")).await;
    assert_eq!(
        e.unwrap_err().to_string(),
        "store.require_worm: container 'evidence' does not have version-level immutability enabled (docs/operations.md)"
    );
    let (e, _) = check(Some("true"), None).await;
    assert_eq!(
        e.unwrap_err().to_string(),
        "store.require_worm: container 'evidence' has version-level immutability but no immutability policy; add a time-based retention policy"
    );
    let (e, _) = check(None, None).await;
    assert!(matches!(e.unwrap_err(), StoreError::Refused(_)));
}
