//! The configuration's own tests: the example file, every section's checks and messages,
//! and the secret sources.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.toml"), Credentials::default())
}

/// A secret file as lrvault accepts it: 0600.
fn write_secret(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The tenant's client secret, read now.
fn load_secret(t: &TenantConfig) -> Result<Secret, ConfigError> {
    match &t.sign_in {
        SignIn::Secret(source) => source.load().map_err(|m| t.credential_error(m)),
        other => panic!("tenant '{}' signs in with {other}", t.name),
    }
}

const TENANT: &str = r#"
[[tenant]]
name = "contoso"
tenant_id = "t"
client_id = "c"
client_secret_env = "X"
"#;

#[test]
fn example_config_parses_with_documented_values() {
    let text = include_str!("../../config.example.toml");
    let cfg = parse(text).unwrap();
    assert_eq!(cfg.quota.per_minute, 95);
    assert_eq!(cfg.quota.per_hour, 1450);
    assert_eq!(cfg.discovery.lookback, Duration::from_secs(4 * 86400));
    assert_eq!(cfg.download.retry_max, Duration::from_secs(1800));
    assert_eq!(cfg.tenants[0].name, "contoso");
    assert_eq!(cfg.store.compression, Compression::Auto);
    assert_eq!(
        cfg.store,
        StoreConfig::fs("/var/lib/lrvault/evidence".into())
    );
    assert_eq!(cfg.schedule.discover.as_str(), "0 */5 * * * *");
    assert_eq!(cfg.schedule.verify.as_str(), "0 17 3 * * *");
    assert_eq!(
        cfg.tenants[0].sign_in,
        SignIn::Secret(SecretSource::File {
            configured: "contoso".into(),
            path: "contoso".into()
        })
    );
    assert_eq!(
        cfg.tenants[0].api_base.as_str(),
        "https://api.security.microsoft.com/"
    );
    assert_eq!(cfg.tenants[0].cloud, Cloud::Commercial);
    assert_eq!(
        cfg.tenants[0].download_hosts,
        vec![
            "*.blob.core.windows.net".to_string(),
            "*.securitycenter.windows.com".to_string()
        ]
    );
    assert_eq!(cfg.anchor.tsa_url(), None);
    assert_eq!(cfg.anchor.tsa_ca_file(), None);
    assert_eq!(cfg.events.webhook, None);
    assert_eq!(cfg.events.syslog, None);
    assert_eq!(
        cfg.events.kinds,
        crate::config::EVENT_KINDS.map(String::from)
    );
    assert_eq!(cfg.metrics.listen, None);
    assert_eq!(cfg.tenants[0].case_pattern.as_str(), DEFAULT_CASE_PATTERN);
}

#[test]
fn events_and_metrics_are_checked_one_line_each() {
    let with = |section: &str| parse(&format!("{section}\n{TENANT}"));
    let err = |section: &str| with(section).unwrap_err().to_string();
    let cfg = with(
        "[events]\nwebhook_url = \"https://siem.example.org/in?x=1\"\nwebhook_secret_file = \"hook\"\nsyslog = \"tcp://siem:601\"\nkinds = [\"ARCHIVED\", \"CHECKPOINT\", \"ARCHIVED\"]\n[metrics]\nlisten = \"127.0.0.1:9464\"",
    )
    .unwrap();
    let hook = cfg.events.webhook.as_ref().unwrap();
    assert_eq!(hook.url.as_str(), "https://siem.example.org/in?x=1");
    assert_eq!(hook.secret_path, std::path::PathBuf::from("hook"));
    assert_eq!(
        cfg.events.syslog,
        Some(SyslogTarget::Tcp("siem:601".into()))
    );
    assert_eq!(cfg.events.kinds, ["ARCHIVED", "CHECKPOINT"]);
    assert_eq!(cfg.events.sinks(), ["webhook", "syslog"]);
    assert_eq!(cfg.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(
        err("[events]\nwebhook_url = \"http://siem.example.org/in\"\nwebhook_secret_file = \"/k\""),
        "invalid config: events.webhook_url 'http://siem.example.org/in' must use https (http is allowed only for loopback hosts)"
    );
    assert_eq!(
        err("[events]\nwebhook_url = \"https://siem.example.org/in\""),
        "invalid config: events.webhook_url is set but webhook_secret_file is empty: every request is signed with its key"
    );
    assert_eq!(
        err("[events]\nsyslog = \"siem:514\""),
        "invalid config: events.syslog 'siem:514' is not a syslog address: write udp://host:port, tcp://host:port or unix:///absolute/socket"
    );
    assert_eq!(
        err("[events]\nkinds = [\"DOWNLOADED\"]"),
        "invalid config: events.kinds: 'DOWNLOADED' is not an event kind (one of ARCHIVED, FAILED, UNAVAILABLE, VERIFY_FAILED, CHECKPOINT, BREAKER_OPEN, BREAKER_CLOSED, CASE_TAGGED)"
    );
    assert_eq!(
        err("[metrics]\nlisten = \"0.0.0.0:9464\""),
        "invalid config: metrics.listen 0.0.0.0:9464 is not a loopback address: the metrics name tenants and queue sizes; set metrics.allow_remote = true to serve them beyond this host"
    );
    assert_eq!(
        err("[metrics]\nlisten = \"localhost\""),
        "invalid config: metrics.listen 'localhost' is not an address and port (e.g. \"127.0.0.1:9464\")"
    );
    let remote = with("[metrics]\nlisten = \"0.0.0.0:9464\"\nallow_remote = true").unwrap();
    assert_eq!(remote.metrics.listen, Some("0.0.0.0:9464".parse().unwrap()));
    let unix = with("[events]\nsyslog = \"unix:///dev/log\"").unwrap();
    assert_eq!(
        unix.events.syslog,
        Some(SyslogTarget::Unix("/dev/log".into()))
    );
}

#[test]
fn case_pattern_defaults_and_a_bad_one_is_one_line() {
    let cfg = parse(TENANT).unwrap();
    assert_eq!(cfg.tenants[0].case_pattern.as_str(), DEFAULT_CASE_PATTERN);
    let cfg = parse(&format!("{TENANT}case_pattern = 'T-(\\d+)'\n")).unwrap();
    assert_eq!(cfg.tenants[0].case_pattern.cases("t-1 T-22"), vec!["22"]);
    let e = parse(&format!("{TENANT}case_pattern = '(INC'\n")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid config: tenant 'contoso': case_pattern is not a valid regular expression: found open group without closing ')'"
    );
}

#[test]
fn anchor_keys_are_checked() {
    let with = |anchor: &str| parse(&format!("[anchor]\n{anchor}\n{TENANT}"));
    let cfg = with(
        "tsa_url = \"https://tsa.example.org/tsr\"\ntsa_ca_file = \"/etc/lrvault/tsa-ca.pem\"\ntsa_policy = \"1.2.3.4.1\"",
    )
    .unwrap();
    assert_eq!(cfg.anchor.tsa_url(), Some("https://tsa.example.org/tsr"));
    assert_eq!(
        cfg.anchor.tsa_ca_file(),
        Some(Path::new("/etc/lrvault/tsa-ca.pem"))
    );
    assert_eq!(cfg.anchor.tsa_policy(), Some("1.2.3.4.1"));
    let e = with("tsa_ca_file = \"tsa-ca.pem\"")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "invalid config: anchor.tsa_ca_file = \"tsa-ca.pem\" is a relative path; write it absolute: lrvault never resolves paths against the working directory"
    );
    let e = with("tsa_url = \"http://tsa.example.org/\"")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("anchor.tsa_url 'http://tsa.example.org/' must use https"),
        "{e}"
    );
    let e = with("tsa_policy = \"policy\"").unwrap_err().to_string();
    assert!(
        e.contains("anchor.tsa_policy 'policy' is not an object identifier"),
        "{e}"
    );
    let e = with("tsa_url = \"https://tsa.example.org/tsr\"")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "invalid config: anchor.tsa_url is set but tsa_ca_file is empty: a token counts only when it verifies against the TSA's own CA certificate; set tsa_ca_file to that PEM file (docs/operations.md)"
    );
}

#[test]
fn token_delay_and_witness_are_parsed_and_checked() {
    let with = |anchor: &str| parse(&format!("[anchor]\n{anchor}\n{TENANT}"));
    let cfg = with("").unwrap();
    assert_eq!(cfg.anchor.max_token_delay, Duration::from_secs(86400));
    assert_eq!(cfg.anchor.witness(), None);
    let cfg = with("max_token_delay = \"90m\"\nwitness = \"/mnt/witness/lrvault\"").unwrap();
    assert_eq!(cfg.anchor.max_token_delay, Duration::from_secs(5400));
    assert_eq!(
        cfg.anchor.witness(),
        Some(&Witness::Dir("/mnt/witness/lrvault".into()))
    );
    let cfg = with("witness = \"s3://witness-bucket/vault1/\"").unwrap();
    assert_eq!(
        cfg.anchor.witness(),
        Some(&Witness::S3 {
            bucket: "witness-bucket".into(),
            prefix: "vault1".into()
        })
    );
    let cfg = with("witness = \"azure://acct/cont/a/b\"").unwrap();
    assert_eq!(
        cfg.anchor.witness(),
        Some(&Witness::Azure {
            account: "acct".into(),
            container: "cont".into(),
            prefix: "a/b".into()
        })
    );
    for (value, message) in [
        (
            "witness/dir",
            "invalid config: anchor.witness = \"witness/dir\" is a relative path; write it absolute: lrvault never resolves paths against the working directory",
        ),
        (
            "s3://",
            "invalid config: anchor.witness 's3://': write s3://bucket/prefix",
        ),
        (
            "azure://acct",
            "invalid config: anchor.witness 'azure://acct': write azure://account/container/prefix",
        ),
        (
            "ftp://host/x",
            "invalid config: anchor.witness 'ftp://host/x': only an absolute directory, s3://bucket/prefix or azure://account/container/prefix",
        ),
    ] {
        let e = with(&format!("witness = \"{value}\""))
            .unwrap_err()
            .to_string();
        assert_eq!(e, message);
    }
    let e = with("max_token_delay = \"0s\"").unwrap_err().to_string();
    assert_eq!(e, "invalid config: anchor.max_token_delay must be positive");
}

#[test]
fn defaults_fill_every_section() {
    let cfg = parse(TENANT).unwrap();
    assert_eq!(cfg.download.concurrency, 2);
    assert_eq!(cfg.schedule.archive.as_str(), "30 * * * * *");
    assert_eq!(
        cfg.tenants[0].download_hosts,
        vec![
            "*.blob.core.windows.net".to_string(),
            "*.securitycenter.windows.com".to_string()
        ]
    );
}

/// The four host values a tenant of `cloud` ends up with, as written in docs/operations.md's
/// table of clouds.
fn hosts(extra: &str) -> (Cloud, String, String, String, Vec<String>) {
    let cfg = parse(&format!("{TENANT}{extra}")).unwrap();
    let t = &cfg.tenants[0];
    (
        t.cloud,
        t.login_base.to_string(),
        t.api_base.to_string(),
        t.scope.clone(),
        t.download_hosts.clone(),
    )
}

#[test]
fn each_cloud_presets_exactly_its_four_values() {
    let commercial = (
        "https://login.microsoftonline.com/".to_string(),
        "https://api.security.microsoft.com/".to_string(),
        "https://api.securitycenter.microsoft.com/.default".to_string(),
        vec![
            "*.blob.core.windows.net".to_string(),
            "*.securitycenter.windows.com".to_string(),
        ],
    );
    let gcc = (
        "https://login.microsoftonline.com/".to_string(),
        "https://api-gcc.securitycenter.microsoft.us/".to_string(),
        "https://api-gcc.securitycenter.microsoft.us/.default".to_string(),
        vec![
            "*.blob.core.usgovcloudapi.net".to_string(),
            "*.securitycenter.windows.us".to_string(),
            "*.securitycenter.microsoft.us".to_string(),
        ],
    );
    let gov = (
        "https://login.microsoftonline.us/".to_string(),
        "https://api-gov.securitycenter.microsoft.us/".to_string(),
        "https://api-gov.securitycenter.microsoft.us/.default".to_string(),
        vec![
            "*.blob.core.usgovcloudapi.net".to_string(),
            "*.securitycenter.windows.us".to_string(),
            "*.securitycenter.microsoft.us".to_string(),
        ],
    );
    let cases = [
        ("", Cloud::Commercial, &commercial),
        ("cloud = \"commercial\"\n", Cloud::Commercial, &commercial),
        ("cloud = \"gcc\"\n", Cloud::Gcc, &gcc),
        ("cloud = \"gcc-high\"\n", Cloud::GccHigh, &gov),
        ("cloud = \"dod\"\n", Cloud::Dod, &gov),
    ];
    for (extra, cloud, (login, api, scope, blobs)) in cases {
        assert_eq!(
            hosts(extra),
            (
                cloud,
                login.clone(),
                api.clone(),
                scope.clone(),
                blobs.clone()
            ),
            "{extra:?}"
        );
    }
}

#[test]
fn a_written_key_overrides_its_cloud_preset_and_only_that_key() {
    let (cloud, login, api, scope, blobs) = hosts(
        "cloud = \"gcc-high\"\napi_base = \"https://api.example.us\"\ndownload_hosts = [\"*.blob.example.us\"]\n",
    );
    assert_eq!(cloud, Cloud::GccHigh);
    assert_eq!(api, "https://api.example.us/");
    assert_eq!(blobs, vec!["*.blob.example.us".to_string()]);
    assert_eq!(login, "https://login.microsoftonline.us/");
    assert_eq!(
        scope,
        "https://api-gov.securitycenter.microsoft.us/.default"
    );
    let (_, login, _, scope, _) = hosts(
        "cloud = \"dod\"\nlogin_base = \"http://127.0.0.1:9\"\nscope = \"api://x/.default\"\n",
    );
    assert_eq!(login, "http://127.0.0.1:9/");
    assert_eq!(scope, "api://x/.default");
}

#[test]
fn an_unknown_cloud_is_one_line_naming_the_allowed_ones() {
    let e = parse(&format!("{TENANT}cloud = \"gov\"\n")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid config: tenant 'contoso': cloud 'gov' is not one of commercial, gcc, gcc-high, dod"
    );
    let e = parse(&format!("{TENANT}cloud = \"GCC\"\n")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid config: tenant 'contoso': cloud 'GCC' is not one of commercial, gcc, gcc-high, dod"
    );
}

#[test]
fn refuses_inline_secret_bad_names_and_plain_http() {
    let e = parse(&format!("{TENANT}client_secret = \"hunter2\"\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("client_secret must not be written"), "{e}");
    assert!(!e.contains("hunter2"));
    let e = parse(&TENANT.replace("contoso", "Contoso_1"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("must match [a-z0-9-]+"), "{e}");
    let e = parse(&format!("{TENANT}api_base = \"http://api.example.com\"\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("must use https"), "{e}");
    parse(&format!("{TENANT}api_base = \"http://127.0.0.1:8080\"\n")).unwrap();
    let e = parse(&format!("{TENANT}[store]\nbogus = 1\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `bogus`"), "{e}");
    let e = parse("[download]\nread_timeout = \"soon\"\n")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "invalid config file test.toml: invalid value: string \"soon\", expected a duration (line 2)"
    );
}

#[test]
fn the_store_defaults_to_fs_and_object_stores_require_worm() {
    let cfg = parse(TENANT).unwrap();
    assert_eq!(cfg.store.kind(), StoreBackend::Fs);
    assert_eq!(cfg.store.object_store(), None);
    assert!(!cfg.store.worm_required());
    assert_eq!(
        cfg.store.staging(),
        ("store.root", Path::new("/var/lib/lrvault/evidence"))
    );
    let s3 = format!(
        "{TENANT}[store]\nbackend = \"s3\"\nbucket = \"evidence\"\nregion = \"eu-west-1\"\nprefix = \"lrvault/\"\n"
    );
    let cfg = parse(&s3).unwrap();
    let object = ObjectStoreConfig {
        prefix: "lrvault/".into(),
        ..ObjectStoreConfig::new("evidence")
    };
    assert_eq!(
        cfg.store.backend,
        Backend::S3 {
            object: object.clone(),
            region: "eu-west-1".into()
        }
    );
    assert_eq!(object.spool, Path::new("/var/lib/lrvault/spool"));
    assert_eq!(object.spool_max_waiting, 16);
    assert_eq!(object.retry_timeout, Duration::from_secs(180));
    assert_eq!(object.endpoint, None);
    assert_eq!(object.credentials, StoreCredentials::Env);
    assert_eq!(
        cfg.store.staging(),
        ("store.spool", Path::new("/var/lib/lrvault/spool"))
    );
    assert_eq!(cfg.store.staging_dir(), Path::new("/var/lib/lrvault/spool"));
    assert!(cfg.store.worm_required(), "on by default for object stores");
    let cfg = parse(&format!(
        "{s3}retry_timeout = \"20s\"\nspool_max_waiting = 4\n"
    ))
    .unwrap();
    let o = cfg.store.object_store().unwrap();
    assert_eq!(
        (o.retry_timeout, o.spool_max_waiting),
        (Duration::from_secs(20), 4)
    );
    let cfg = parse(&format!("{s3}require_worm = false\n")).unwrap();
    assert!(!cfg.store.worm_required());
    let cfg = parse(&format!(
        "{s3}credentials = \"instance\"\nendpoint = \"http://127.0.0.1:9000\"\n"
    ))
    .unwrap();
    let o = cfg.store.object_store().unwrap();
    assert_eq!(o.credentials, StoreCredentials::Instance);
    assert_eq!(
        o.endpoint.as_ref().map(url::Url::as_str),
        Some("http://127.0.0.1:9000/")
    );
    // An Azure store carries no region; an fs store none of the object store's keys.
    let cfg = parse(&format!(
        "{TENANT}[store]\nbackend = \"azure\"\nbucket = \"evidence\"\nregion = \"ignored\"\n"
    ))
    .unwrap();
    assert_eq!(
        cfg.store.backend,
        Backend::Azure(ObjectStoreConfig::new("evidence"))
    );
    let cfg = parse(&format!("{TENANT}[store]\nbucket = \"unused\"\n")).unwrap();
    assert_eq!(
        cfg.store,
        StoreConfig::fs("/var/lib/lrvault/evidence".into())
    );
}

#[test]
fn store_mistakes_are_one_line_each() {
    let store = |extra: &str| {
        parse(&format!("{TENANT}[store]\n{extra}\n"))
            .unwrap_err()
            .to_string()
    };
    let s3 = "backend = \"s3\"\nbucket = \"evidence\"\nregion = \"eu-west-1\"";
    for (extra, want) in [
        (
            "root = \"evidence\"",
            "invalid config: store.root = \"evidence\" is a relative path; write it absolute",
        ),
        (
            "require_worm = true",
            "invalid config: store.require_worm = true needs backend \"s3\" or \"azure\": a local directory cannot enforce retention",
        ),
        (
            &format!("{s3}\nspool = \"spool\""),
            "invalid config: store.spool = \"spool\" is a relative path; write it absolute",
        ),
        (
            &format!("{s3}\nspool = \"/var/lib/lrvault/evidence/spool\""),
            "invalid config: store.spool '/var/lib/lrvault/evidence/spool' and store.root '/var/lib/lrvault/evidence' must not contain each other",
        ),
        (
            "backend = \"s3\"\nregion = \"eu-west-1\"",
            "invalid config: store.bucket is required for backend \"s3\" (the bucket name)",
        ),
        (
            "backend = \"azure\"\nbucket = \"Evidence.2026\"",
            "invalid config: store.bucket 'Evidence.2026' is not a valid azure container name (3-63 lowercase letters, digits, '-')",
        ),
        (
            "backend = \"s3\"\nbucket = \"evidence\"",
            "invalid config: store.region is required for backend \"s3\" (e.g. \"eu-west-1\")",
        ),
        (
            &format!("{s3}\nprefix = \"/lrvault\""),
            "invalid config: store.prefix '/lrvault' must be path segments separated by '/' (e.g. \"lrvault/\"), without '.', '..', empty segments or a leading '/'",
        ),
        (&format!("{s3}\nprefix = \"a/../b\""), "without '.', '..'"),
        (
            &format!("{s3}\nendpoint = \"http://s3.example.com\""),
            "invalid config: store.endpoint 'http://s3.example.com' must use https (http is allowed only for loopback hosts)",
        ),
        (
            "backend = \"gcs\"",
            "unknown variant `gcs`, expected one of `fs`, `s3`, `azure`",
        ),
        (
            "credentials = \"inline\"",
            "unknown variant `inline`, expected `env` or `instance`",
        ),
        (
            &format!("{s3}\nspool_max_waiting = 0"),
            "invalid config: store.spool_max_waiting must be at least 1",
        ),
        (
            &format!("{s3}\nretry_timeout = \"0s\""),
            "invalid config: store.retry_timeout must be positive",
        ),
        (
            "secret_access_key = \"x\"",
            "unknown field `secret_access_key`",
        ),
    ] {
        let e = store(extra);
        assert!(e.contains(want), "{extra}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
}

#[test]
fn secret_errors_name_the_source_and_never_the_value() {
    let cfg = parse(&TENANT.replace(
        "client_secret_env = \"X\"",
        "client_secret_file = \"/nonexistent/s\"",
    ))
    .unwrap();
    let e = load_secret(&cfg.tenants[0]).unwrap_err().to_string();
    assert!(
        e.starts_with("tenant 'contoso': cannot read client_secret_file /nonexistent/s"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    write_secret(&p, "s3cr3t\n");
    let cfg = parse(&TENANT.replace(
        "client_secret_env = \"X\"",
        &format!("client_secret_file = {:?}", p),
    ))
    .unwrap();
    let s = load_secret(&cfg.tenants[0]).unwrap();
    assert_eq!(s.expose_secret(), "s3cr3t");
    assert_eq!(format!("{s:?}"), "SecretBox<str>([REDACTED])");
}

#[test]
fn relative_secret_files_resolve_in_the_credentials_directory() {
    let dir = tempfile::tempdir().unwrap();
    write_secret(&dir.path().join("contoso"), "from-systemd\n");
    let text = TENANT.replace(
        "client_secret_env = \"X\"",
        "client_secret_file = \"contoso\"",
    );
    let credentials = Credentials::new(Some(dir.path().to_path_buf()));
    let cfg = Config::parse(&text, Path::new("test.toml"), credentials.clone()).unwrap();
    assert_eq!(cfg.credentials, credentials);
    assert_eq!(
        cfg.tenants[0].credential_source(),
        format!(
            "client_secret_file {}",
            dir.path().join("contoso").display()
        )
    );
    let secret = load_secret(&cfg.tenants[0]).unwrap();
    assert_eq!(secret.expose_secret(), "from-systemd");
    // An absolute name stays where it is; without the directory a relative one is looked
    // up in the working directory, and the message says why.
    let absolute = Credentials::new(Some(dir.path().to_path_buf()));
    let source = SecretSource::new(Some("/etc/x".into()), None, &absolute).unwrap();
    assert_eq!(source.describe(), "client_secret_file /etc/x");
    let cfg = parse(&text).unwrap();
    let e = load_secret(&cfg.tenants[0]).unwrap_err().to_string();
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(
        e,
        format!(
            "tenant 'contoso': cannot read client_secret_file contoso: No such file or directory (os error 2) (the relative name was looked up in the working directory {} because $CREDENTIALS_DIRECTORY is not set: run under systemd with LoadCredential=, or write an absolute path)",
            cwd.display()
        )
    );
}

#[test]
fn store_credentials_are_files_named_after_the_variables() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("AWS_SECRET_ACCESS_KEY"), "from-systemd\n").unwrap();
    std::fs::write(dir.path().join("AWS_SESSION_TOKEN"), "\n").unwrap();
    let credentials = Credentials::new(Some(dir.path().to_path_buf()));
    assert_eq!(
        credentials.file("AWS_SECRET_ACCESS_KEY").as_deref(),
        Some("from-systemd")
    );
    assert_eq!(
        credentials.file("AWS_SESSION_TOKEN"),
        None,
        "an empty credential is no credential"
    );
    assert_eq!(credentials.file("AWS_ACCESS_KEY_ID"), None);
    assert_eq!(Credentials::default().file("AWS_SECRET_ACCESS_KEY"), None);
    assert_eq!(
        Credentials::new(Some(PathBuf::new())),
        Credentials::default()
    );
}

#[test]
fn schedules_are_parsed_once_and_name_their_key() {
    let cfg = parse(&format!(
        "{TENANT}[schedule]\narchive = \"30 * * * * *\"\nverify = \"0 17 3 * * *\"\n"
    ))
    .unwrap();
    assert_eq!(cfg.schedule.archive.as_str(), "30 * * * * *");
    assert_eq!(cfg.schedule.verify.as_str(), "0 17 3 * * *");
    // What the config accepted, the scheduler accepts.
    for s in [
        &cfg.schedule.discover,
        &cfg.schedule.archive,
        &cfg.schedule.verify,
    ] {
        tokio_cron_scheduler::Job::new_async(s.as_str(), |_, _| Box::pin(async {})).unwrap();
    }
    let e = parse(&format!("{TENANT}[schedule]\ndiscover = \"*/5 * * * *\"\n"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "invalid cron expression for schedule.discover '*/5 * * * *': it has 5 fields; lrvault takes exactly 6, seconds first (sec min hour day-of-month month day-of-week), in UTC"
    );
}

#[test]
fn relative_paths_are_refused_and_absolute_ones_kept() {
    for (section, key) in [
        ("database", "path"),
        ("store", "root"),
        ("store", "spool"),
        ("anchor", "tsa_ca_file"),
    ] {
        let e = parse(&format!("{TENANT}[{section}]\n{key} = \"rel/x\"\n"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "invalid config: {section}.{key} = \"rel/x\" is a relative path; write it absolute: lrvault never resolves paths against the working directory"
            )
        );
    }
    let cfg = parse(&format!("{TENANT}[store]\nroot = \"/srv/ev\"\n")).unwrap();
    assert_eq!(cfg.store.root, Path::new("/srv/ev"));
}

#[test]
fn secret_text_allows_one_final_newline_and_nothing_else_around_the_value() {
    assert_eq!(check_secret_text("abc"), Ok("abc"));
    assert_eq!(check_secret_text("abc\n"), Ok("abc"));
    assert_eq!(check_secret_text("a b~c.d_e-f"), Ok("a b~c.d_e-f"));
    for bad in [
        "\u{feff}abc",
        "abc\r\n",
        "abc\n\n",
        "abc ",
        " abc",
        "\tabc",
        "id\nabc",
        "",
        "\n",
    ] {
        let e = check_secret_text(bad).unwrap_err();
        assert!(!e.contains("abc"), "{e}");
    }
}

#[test]
fn unknown_tenant_lists_the_configured_ones() {
    let cfg = parse(TENANT).unwrap();
    let e = cfg
        .select_tenants(Some("fabrikam"))
        .unwrap_err()
        .to_string();
    assert_eq!(e, "unknown tenant 'fabrikam' (configured: contoso)");
}

#[test]
fn auth_picks_the_sign_in_method_and_refuses_keys_of_another() {
    let with = |keys: &str| {
        let text = TENANT.replace("client_secret_env = \"X\"\n", keys);
        Config::parse(
            &text,
            Path::new("test.toml"),
            Credentials::new(Some("/run/credentials/lrvault.service".into())),
        )
    };
    let cfg = with("auth = \"certificate\"\nclient_certificate_file = \"contoso.pem\"\n").unwrap();
    let t = &cfg.tenants[0];
    assert_eq!(
        t.sign_in,
        SignIn::Certificate(CredentialFile {
            configured: "contoso.pem".into(),
            path: "/run/credentials/lrvault.service/contoso.pem".into(),
        })
    );
    assert_eq!(
        t.credential_source(),
        "client_certificate_file /run/credentials/lrvault.service/contoso.pem"
    );
    assert_eq!(t.sign_in.method(), "certificate");
    let mi = with("auth = \"managed-identity\"\n").unwrap();
    assert_eq!(
        mi.tenants[0].credential_source(),
        "managed identity (system-assigned)"
    );
    let user = with("auth = \"managed-identity\"\nmanaged_identity_client_id = \"u-1\"\n").unwrap();
    assert_eq!(
        user.tenants[0].credential_source(),
        "managed identity (user-assigned, managed_identity_client_id u-1)"
    );
    let wi = with("auth = \"workload-identity\"\nfederated_token_file = \"/var/run/secrets/azure/tokens/azure-identity-token\"\n").unwrap();
    assert_eq!(
        wi.tenants[0].credential_source(),
        "federated_token_file /var/run/secrets/azure/tokens/azure-identity-token"
    );
    let err = |keys: &str| with(keys).unwrap_err().to_string();
    assert_eq!(
        err("auth = \"certificate\"\n"),
        "invalid config: tenant 'contoso': auth = \"certificate\" needs client_certificate_file"
    );
    assert_eq!(
        err(
            "auth = \"certificate\"\nclient_certificate_file = \"c.pem\"\nclient_secret_env = \"X\"\n"
        ),
        "invalid config: tenant 'contoso': client_secret_file/client_secret_env is for auth = \"secret\", not \"certificate\""
    );
    assert_eq!(
        err("client_secret_env = \"X\"\nfederated_token_file = \"/t\"\n"),
        "invalid config: tenant 'contoso': federated_token_file is for auth = \"workload-identity\", not \"secret\""
    );
    assert_eq!(
        err("auth = \"password\"\n"),
        "invalid config: tenant 'contoso': unknown auth 'password' (secret | certificate | managed-identity | workload-identity)"
    );
    // An unknown method is named as such, even beside another method's key.
    assert_eq!(
        err("auth = \"password\"\nclient_secret_env = \"X\"\n"),
        "invalid config: tenant 'contoso': unknown auth 'password' (secret | certificate | managed-identity | workload-identity)"
    );
}

#[test]
fn a_certificate_file_is_read_like_a_secret() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("app.pem");
    let text = TENANT.replace(
        "client_secret_env = \"X\"\n",
        &format!("auth = \"certificate\"\nclient_certificate_file = {pem:?}\n"),
    );
    let cfg = parse(&text).unwrap();
    let check = || cfg.tenants[0].check_credential().unwrap_err().to_string();
    assert!(
        check().starts_with(&format!(
            "tenant 'contoso': cannot read client_certificate_file {}: No such file",
            pem.display()
        )),
        "{}",
        check()
    );
    std::fs::write(
        &pem,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::set_permissions(&pem, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(
        check().starts_with(&format!(
            "tenant 'contoso': client_certificate_file {} is readable by every user",
            pem.display()
        )),
        "{}",
        check()
    );
    std::fs::set_permissions(&pem, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        check(),
        format!(
            "tenant 'contoso': client_certificate_file {} holds no PRIVATE KEY block",
            pem.display()
        )
    );
}

#[test]
fn collect_defaults_to_both_types_and_refuses_unknown_or_empty_lists() {
    let collect =
        |extra: &str| parse(&format!("{TENANT}{extra}")).map(|c| c.tenants[0].collect.clone());
    let both = vec![
        "LiveResponse".to_string(),
        "CollectInvestigationPackage".to_string(),
    ];
    assert_eq!(collect("").unwrap(), both);
    // Written in any order, kept in the documented one; a repeat counts once.
    assert_eq!(
        collect(
            "collect = [\"CollectInvestigationPackage\", \"LiveResponse\", \"LiveResponse\"]\n"
        )
        .unwrap(),
        both
    );
    assert_eq!(
        collect("collect = [\"CollectInvestigationPackage\"]\n").unwrap(),
        vec!["CollectInvestigationPackage".to_string()]
    );
    assert_eq!(
        collect("collect = [\"Isolate\"]\n")
            .unwrap_err()
            .to_string(),
        "invalid config: tenant 'contoso': collect names 'Isolate'; allowed: LiveResponse, CollectInvestigationPackage"
    );
    assert_eq!(
        collect("collect = []\n").unwrap_err().to_string(),
        "invalid config: tenant 'contoso': collect must name at least one of LiveResponse, CollectInvestigationPackage"
    );
}
