//! Builds the `object_store` client of an `s3` or `azure` store from `[store]` and the
//! credentials looked up for it (the environment, or systemd credentials of the same names:
//! `config::Credentials`). Secrets are read here and handed to the client; they are never
//! stored in the config, printed, or logged.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, Checksum};
use object_store::azure::MicrosoftAzureBuilder;
use object_store::{ClientOptions, RetryConfig};

use super::StoreError;
use super::object::{Client, ObjectBackend};
use crate::config::{Backend, ObjectStoreConfig, StoreBackend, StoreConfig, StoreCredentials};

/// Variables that select a platform identity for `credentials = "instance"` (web identity,
/// ECS task roles, EKS pod identity, the metadata endpoint). None of them is a secret.
const AWS_INSTANCE_VARS: [&str; 7] = [
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_METADATA_ENDPOINT",
];

pub(super) fn build(
    cfg: &StoreConfig,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<ObjectBackend, StoreError> {
    let (object, region) = match &cfg.backend {
        Backend::S3 { object, region } => (object, region.as_str()),
        Backend::Azure(object) => (object, ""),
        Backend::Fs => {
            return Err(StoreError::refused(
                "store.backend = \"fs\" uses no object store",
            ));
        }
    };
    let endpoint = object
        .endpoint
        .as_ref()
        .map(|e| e.as_str().trim_end_matches('/').to_string());
    // Plain http passed config validation only for loopback hosts (emulators, tests).
    let allow_http = object
        .endpoint
        .as_ref()
        .is_some_and(|e| e.scheme() == "http");
    // object_store builds its reqwest clients on the process's TLS stack.
    crate::http::install_tls();
    let options = ClientOptions::new()
        .with_allow_http(allow_http)
        .with_connect_timeout(Duration::from_secs(10))
        // Per request: a part is at most a few MiB, a stalled one is retried.
        .with_timeout(Duration::from_secs(300));
    let client = match cfg.kind() {
        StoreBackend::Azure => azure_client(object, endpoint.as_deref(), options, lookup)?,
        _ => s3_client(object, region, endpoint.as_deref(), options, lookup)?,
    };
    Ok(ObjectBackend::new(
        client,
        object.bucket.clone(),
        object.prefix.trim_matches('/').to_string(),
        region.to_string(),
        endpoint,
    ))
}

fn s3_client(
    cfg: &ObjectStoreConfig,
    region: &str,
    endpoint: Option<&str>,
    options: ClientOptions,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Client, StoreError> {
    // Every PUT and part carries x-amz-checksum-sha256 (checked by S3). Buckets with a
    // default retention also want the SDKs' algorithm header on uploads (moto insists on
    // it); it is signed like every x-amz-* header and ignored elsewhere.
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        "x-amz-sdk-checksum-algorithm",
        reqwest::header::HeaderValue::from_static("SHA256"),
    );
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(&cfg.bucket)
        .with_region(region)
        .with_checksum_algorithm(Checksum::SHA256)
        .with_client_options(options.with_default_headers(headers))
        .with_retry(retry_config(cfg));
    if let Some(e) = endpoint {
        b = b.with_endpoint(e);
    }
    b = match cfg.credentials {
        StoreCredentials::Env => {
            let need = |name: &str| {
                lookup(name).ok_or_else(|| {
                    StoreError::refused(format!(
                        "store.credentials = \"env\": {name} is not set (an environment variable or a systemd credential of that name; see docs/operations.md)"
                    ))
                })
            };
            let mut b = b
                .with_access_key_id(need("AWS_ACCESS_KEY_ID")?)
                .with_secret_access_key(need("AWS_SECRET_ACCESS_KEY")?);
            if let Some(token) = lookup("AWS_SESSION_TOKEN") {
                b = b.with_token(token);
            }
            b
        }
        StoreCredentials::Instance => AWS_INSTANCE_VARS.iter().fold(b, |b, name| {
            match (
                lookup(name),
                name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>(),
            ) {
                (Some(value), Ok(key)) => b.with_config(key, value),
                _ => b,
            }
        }),
    };
    let s3 = b
        .build()
        .map_err(|e| setup_error(StoreBackend::S3, cfg, e))?;
    Ok(Client::S3(Arc::new(s3)))
}

fn azure_client(
    cfg: &ObjectStoreConfig,
    endpoint: Option<&str>,
    options: ClientOptions,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Client, StoreError> {
    let account = lookup("AZURE_STORAGE_ACCOUNT_NAME").ok_or_else(|| {
        StoreError::refused(
            "store.backend = \"azure\": AZURE_STORAGE_ACCOUNT_NAME is not set (the storage account's name)",
        )
    })?;
    let service = endpoint
        .map(str::to_string)
        .unwrap_or_else(|| format!("https://{account}.blob.core.windows.net"));
    let mut b = MicrosoftAzureBuilder::new()
        .with_account(&account)
        .with_container_name(&cfg.bucket)
        .with_endpoint(service.clone())
        .with_allow_http(endpoint.is_some_and(|e| e.starts_with("http://")))
        .with_client_options(options)
        .with_retry(retry_config(cfg));
    b = match cfg.credentials {
        StoreCredentials::Env => azure_env_credentials(b, lookup)?,
        StoreCredentials::Instance => {
            let b = b.with_credential_type("managed_identity");
            match lookup("AZURE_CLIENT_ID") {
                Some(id) => b.with_client_id(id),
                None => b,
            }
        }
    };
    let azure = b
        .build()
        .map_err(|e| setup_error(StoreBackend::Azure, cfg, e))?;
    let service = url::Url::parse(&service).map_err(|e| {
        StoreError::refused(format!("store.endpoint '{service}' is not a URL: {e}"))
    })?;
    Ok(Client::Azure {
        store: Arc::new(azure),
        account,
        service,
    })
}

/// A store that stays down past `retry_timeout` fails the request; the archive pass then
/// pauses instead of every attempt waiting out its own retries.
fn retry_config(cfg: &ObjectStoreConfig) -> RetryConfig {
    RetryConfig {
        retry_timeout: cfg.retry_timeout,
        ..RetryConfig::default()
    }
}

/// `AZURE_STORAGE_ACCOUNT_KEY`, else a SAS (`AZURE_STORAGE_SAS_KEY`), else a service
/// principal (`AZURE_CLIENT_ID` + `AZURE_CLIENT_SECRET` + `AZURE_TENANT_ID`), else workload
/// identity (`AZURE_FEDERATED_TOKEN_FILE` + `AZURE_CLIENT_ID` + `AZURE_TENANT_ID`).
fn azure_env_credentials(
    b: MicrosoftAzureBuilder,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<MicrosoftAzureBuilder, StoreError> {
    let principal = (lookup("AZURE_CLIENT_ID"), lookup("AZURE_TENANT_ID"));
    if let Some(key) = lookup("AZURE_STORAGE_ACCOUNT_KEY") {
        return Ok(b.with_access_key(key));
    }
    if let Some(sas) = lookup("AZURE_STORAGE_SAS_KEY") {
        let pairs: Vec<(String, String)> =
            url::form_urlencoded::parse(sas.trim_start_matches('?').as_bytes())
                .into_owned()
                .collect();
        return Ok(b.with_sas_authorization(pairs));
    }
    match (
        principal,
        lookup("AZURE_CLIENT_SECRET"),
        lookup("AZURE_FEDERATED_TOKEN_FILE"),
    ) {
        ((Some(id), Some(tenant)), Some(secret), _) => {
            Ok(b.with_client_secret_authorization(id, secret, tenant))
        }
        ((Some(id), Some(tenant)), None, Some(file)) => Ok(b
            .with_credential_type("workload_identity")
            .with_client_id(id)
            .with_tenant_id(tenant)
            .with_federated_token_file(file)),
        _ => Err(StoreError::refused(
            "store.credentials = \"env\": set AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_KEY, or AZURE_CLIENT_ID + AZURE_TENANT_ID with AZURE_CLIENT_SECRET or AZURE_FEDERATED_TOKEN_FILE (environment variables or systemd credentials; see docs/operations.md)",
        )),
    }
}

/// The builders refuse only bad settings; their messages carry no secret.
fn setup_error(kind: StoreBackend, cfg: &ObjectStoreConfig, e: object_store::Error) -> StoreError {
    StoreError::refused(format!(
        "store.backend = \"{kind}\": cannot set up the client for '{}': {e}",
        cfg.bucket
    ))
}
