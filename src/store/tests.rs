//! The fs backend, key rules, credential errors and the WORM judgements, without a server
//! (the object-store data paths are tested against moto and Azurite in tests/integration).

use std::os::unix::fs::PermissionsExt;

use bytes::Bytes;
use futures_util::TryStreamExt;

use super::worm::{ObjectLockConfiguration, azure_status, s3_status};
use super::*;
use crate::config::{Backend, ObjectStoreConfig, StoreConfig, StoreCredentials};

fn sha(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn fs_store(root: &Path) -> Store {
    Store::open_with(&StoreConfig::fs(root.to_path_buf()), &|_| None).unwrap()
}

#[tokio::test]
async fn fs_publish_locates_the_package_in_place_and_records_nothing_new() {
    let dir = tempfile::tempdir().unwrap();
    let store = fs_store(dir.path());
    assert_eq!(store.staging_root(), dir.path());
    let key = "contoso/2026/11/27/a/000-RunScript.zip";
    let path = store.staging_path(key).unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"package").unwrap();
    let expected = Expected {
        sha256: sha(b"package"),
        size: 7,
    };
    let stored = store.publish(key, &expected).await.unwrap();
    assert_eq!(stored.location, path.display().to_string());
    assert_eq!(
        (stored.version_id.as_deref(), stored.etag.as_deref()),
        (None, None)
    );
    assert!(
        stored.custody_detail().is_empty(),
        "fs rows stay as they were"
    );
    assert_eq!(
        store.find(key, &expected).await.unwrap(),
        Some(stored.clone())
    );
    // fs keeps no versions: the file verify reads is the one the key serves.
    assert_eq!(store.judge(key, None, None).await.unwrap(), Verdict::Intact);
    // release and the spool sweep leave the fs store alone.
    store.release(key).await.unwrap();
    assert!(path.exists());
    assert_eq!(
        store
            .sweep_spool(store.spool_files().await.unwrap(), |_| true)
            .await
            .unwrap(),
        SpoolSweep::default()
    );

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::write(&path, b"altered").unwrap();
    assert_eq!(
        hash_stream(store.read(key, None).await.unwrap())
            .await
            .unwrap(),
        (sha(b"altered"), 7)
    );
    let e = store.find(key, &expected).await.unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
    std::fs::remove_file(&path).unwrap();
    assert!(store.read(key, None).await.err().unwrap().is_not_found());
    assert_eq!(store.find(key, &expected).await.unwrap(), None);
    let e = store.publish(key, &expected).await.unwrap_err();
    assert!(e.to_string().starts_with("reading size of package"), "{e}");
}

#[tokio::test]
async fn fs_small_objects_follow_the_package_rules() {
    let dir = tempfile::tempdir().unwrap();
    let store = fs_store(dir.path());
    let key = "_checkpoints/000000000001.json";
    let stored = store
        .put_small(key, Bytes::from_static(b"{\"seq\":1}"))
        .await
        .unwrap();
    let path = dir.path().join(key);
    assert_eq!(stored.location, path.display().to_string());
    assert_eq!(std::fs::read(&path).unwrap(), b"{\"seq\":1}");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o440
    );
    // The same bytes again: the existing file; other bytes: refused, the file unchanged.
    assert_eq!(
        store
            .put_small(key, Bytes::from_static(b"{\"seq\":1}"))
            .await
            .unwrap(),
        stored
    );
    let e = store
        .put_small(key, Bytes::from_static(b"{\"seq\":2}"))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"{\"seq\":1}");
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["000000000001.json"],
        "no partial file is left behind"
    );
}

#[tokio::test]
async fn fs_lists_keys_without_partials_and_streams_copies_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = fs_store(dir.path());
    for (rel, body) in [
        ("contoso/2026/01/02/a/000-GetFile.zip", &b"one"[..]),
        ("contoso/2026/01/02/a/001-RunScript.zip", b"two!"),
        (
            "contoso/2026/01/02/a/002-RunScript.zip.partial",
            b"in progress",
        ),
        ("fabrikam/2026/01/02/b/000-GetFile.zip", b"three"),
    ] {
        let p = dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    let mut listed: Vec<Listed> = store.list("contoso/").try_collect().await.unwrap();
    listed.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(
        listed,
        vec![
            Listed {
                key: "contoso/2026/01/02/a/000-GetFile.zip".into(),
                size: 3
            },
            Listed {
                key: "contoso/2026/01/02/a/001-RunScript.zip".into(),
                size: 4
            },
        ]
    );
    assert_eq!(
        store.list("").try_collect::<Vec<_>>().await.unwrap().len(),
        3
    );
    assert!(
        store
            .list("nobody/")
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .is_empty()
    );

    let out = dir.path().join("export/copy.zip");
    let got = store
        .download_to("fabrikam/2026/01/02/b/000-GetFile.zip", None, &out)
        .await
        .unwrap();
    assert_eq!(got, (sha(b"three"), 5));
    assert_eq!(std::fs::read(&out).unwrap(), b"three");
    let e = store
        .download_to("fabrikam/2026/01/02/b/000-GetFile.zip", None, &out)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("never over an existing file"), "{e}");
    let e = store.read("contoso/x.zip", Some("v1")).await.err().unwrap();
    assert!(e.to_string().contains("keeps no versions"), "{e}");
}

#[tokio::test]
async fn keys_must_be_relative_paths() {
    let dir = tempfile::tempdir().unwrap();
    let store = fs_store(dir.path());
    for bad in [
        "",
        "/abs/x.zip",
        "a/../b.zip",
        "a//b.zip",
        "./a.zip",
        "a/b\\c.zip",
        "a/\n.zip",
    ] {
        let e = store.staging_path(bad).unwrap_err();
        assert!(matches!(e, StoreError::InvalidKey { .. }), "{bad:?}: {e}");
    }
}

fn object_cfg(backend: StoreBackend) -> StoreConfig {
    let object = ObjectStoreConfig {
        spool: "/var/spool/lrvault-test".into(),
        prefix: "lrvault/".into(),
        ..ObjectStoreConfig::new("evidence")
    };
    StoreConfig::object(match backend {
        StoreBackend::Azure => Backend::Azure(object),
        _ => Backend::S3 {
            object,
            region: "eu-west-1".into(),
        },
    })
}

#[test]
fn missing_credentials_are_refused_with_the_variable_to_set() {
    let e = Store::open_with(&object_cfg(StoreBackend::S3), &|_| None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "store.credentials = \"env\": AWS_ACCESS_KEY_ID is not set (an environment variable or a systemd credential of that name; see docs/operations.md)"
    );
    let only_id = |n: &str| (n == "AWS_ACCESS_KEY_ID").then(|| "AKIA".to_string());
    let e = Store::open_with(&object_cfg(StoreBackend::S3), &only_id).unwrap_err();
    assert!(
        e.to_string().contains("AWS_SECRET_ACCESS_KEY is not set"),
        "{e}"
    );
    let e = Store::open_with(&object_cfg(StoreBackend::Azure), &|_| None).unwrap_err();
    assert!(
        e.to_string()
            .contains("AZURE_STORAGE_ACCOUNT_NAME is not set"),
        "{e}"
    );
    let account = |n: &str| (n == "AZURE_STORAGE_ACCOUNT_NAME").then(|| "acct".to_string());
    let e = Store::open_with(&object_cfg(StoreBackend::Azure), &account).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("store.credentials = \"env\": set AZURE_STORAGE_ACCOUNT_KEY"),
        "{e}"
    );
    let err = anyhow::Error::new(e);
    assert_eq!(crate::error::exit_code(&err), 2);

    // Instance credentials need no variable; secrets never reach Debug output.
    let mut cfg = object_cfg(StoreBackend::S3);
    cfg.object_store_mut().unwrap().credentials = StoreCredentials::Instance;
    let store = Store::open_with(&cfg, &|_| None).unwrap();
    assert_eq!(store.describe(), "s3://evidence/lrvault/");
    assert_eq!(
        store.location("t/2026/01/01/a/000-GetFile.zip").unwrap(),
        "s3://evidence/lrvault/t/2026/01/01/a/000-GetFile.zip"
    );
    let secret = |n: &str| match n {
        "AWS_ACCESS_KEY_ID" => Some("AKIAEXAMPLE".to_string()),
        "AWS_SECRET_ACCESS_KEY" => Some("very-secret-value".to_string()),
        _ => None,
    };
    let store = Store::open_with(&object_cfg(StoreBackend::S3), &secret).unwrap();
    assert_eq!(store.staging_root(), Path::new("/var/spool/lrvault-test"));
    assert!(!format!("{store:?}").contains("very-secret-value"));
}

#[tokio::test]
async fn the_fs_store_cannot_prove_retention() {
    let dir = tempfile::tempdir().unwrap();
    let e = fs_store(dir.path()).check_worm().await.unwrap_err();
    assert!(matches!(e, StoreError::Refused(_)));
    assert!(e.to_string().contains("cannot enforce retention"), "{e}");
}

#[test]
fn s3_object_lock_is_judged_by_mode_and_period() {
    let ok = s3_status("b", Some("Enabled"), Some("COMPLIANCE"), Some(2555), None).unwrap();
    assert_eq!(ok.to_string(), "COMPLIANCE, 2555 days");
    let ok = s3_status("b", Some("Enabled"), Some("COMPLIANCE"), Some(0), Some(7)).unwrap();
    assert_eq!(ok.period.as_deref(), Some("7 years"));
    for (enabled, mode, days, want) in [
        (None, None, None, "does not have Object Lock enabled"),
        (Some("Enabled"), None, None, "no default retention"),
        (
            Some("Enabled"),
            Some("GOVERNANCE"),
            Some(30),
            "default GOVERNANCE retention",
        ),
        (
            Some("Enabled"),
            Some("COMPLIANCE"),
            None,
            "without a period",
        ),
    ] {
        let e = s3_status("b", enabled, mode, days, None).unwrap_err();
        assert!(e.starts_with("store.require_worm: bucket 'b' "), "{e}");
        assert!(e.contains(want), "{e}");
    }
}

#[test]
fn s3_object_lock_answers_are_read_from_s3s_xml() {
    let read = |xml: &str| quick_xml::de::from_str::<ObjectLockConfiguration>(xml).unwrap();
    // As S3 sends it (namespace, declaration), with a period in years.
    let locked = read(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<ObjectLockConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><ObjectLockEnabled>Enabled</ObjectLockEnabled><Rule><DefaultRetention><Mode>COMPLIANCE</Mode><Years>7</Years></DefaultRetention></Rule></ObjectLockConfiguration>"#,
    );
    assert_eq!(
        locked.status("b").unwrap().to_string(),
        "COMPLIANCE, 7 years"
    );
    let governed = read(
        "<ObjectLockConfiguration><ObjectLockEnabled>Enabled</ObjectLockEnabled><Rule><DefaultRetention><Mode>GOVERNANCE</Mode><Days>30</Days></DefaultRetention></Rule></ObjectLockConfiguration>",
    );
    assert_eq!(
        governed.status("b").unwrap_err(),
        "store.require_worm: bucket 'b' has a default GOVERNANCE retention; only COMPLIANCE stops every user, root included"
    );
    let no_rule = read(
        "<ObjectLockConfiguration><ObjectLockEnabled>Enabled</ObjectLockEnabled></ObjectLockConfiguration>",
    );
    assert_eq!(
        no_rule.status("b").unwrap_err(),
        "store.require_worm: bucket 'b' has Object Lock but no default retention; set a default COMPLIANCE retention"
    );
}

#[test]
fn azure_immutability_needs_version_level_worm_and_a_policy() {
    let ok = azure_status("c", Some("true"), Some("True")).unwrap();
    assert_eq!(
        ok.to_string(),
        "version-level immutability (period set by the container's policy)"
    );
    assert!(azure_status("c", Some("false"), Some("true")).is_err());
    assert!(azure_status("c", Some("true"), Some("false")).is_err());
    assert!(azure_status("c", None, None).is_err());
}

#[test]
fn large_packages_get_parts_that_fit_s3s_part_limit() {
    const MIB: u64 = 1024 * 1024;
    assert_eq!(part_size(2048 * MIB), PART_SIZE);
    assert_eq!(part_size(70_000 * MIB), PART_SIZE, "8,750 parts of 8 MiB");
    // 1 TiB: 9,000 parts at most, whole MiB each.
    let tib = 1024 * 1024 * MIB;
    let part = part_size(tib) as u64;
    assert_eq!(part % MIB, 0);
    assert!(tib.div_ceil(part) <= 9_000);
    assert!(SINGLE_PUT_MAX >= PART_SIZE as u64);
}

#[test]
fn object_custody_detail_names_store_version_and_etag() {
    let stored = Stored {
        backend: StoreBackend::S3,
        location: "s3://b/k".into(),
        version_id: Some("v1".into()),
        etag: Some("\"e\"".into()),
        size: 3,
    };
    assert_eq!(
        serde_json::Value::Object(stored.custody_detail()).to_string(),
        r#"{"etag":"\"e\"","store":"s3://b/k","version_id":"v1"}"#
    );
}

#[tokio::test]
async fn the_spool_lists_waiting_packages_sets_refused_ones_aside_and_forgets_old_copies() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig::object(Backend::S3 {
        object: ObjectStoreConfig {
            spool: dir.path().to_path_buf(),
            endpoint: Some("http://127.0.0.1:9".parse().unwrap()),
            ..ObjectStoreConfig::new("evidence")
        },
        region: "us-east-1".into(),
    });
    let store = Store::open_with(&cfg, &|name| Some(format!("test-{name}"))).unwrap();
    assert!(store.is_object());
    let waiting = "contoso/2026/11/27/a/000-GetFile.zip";
    for (rel, body) in [
        (waiting, &b"package"[..]),
        (
            "contoso/2026/11/27/a/001-RunScript.zip.1-ab.partial",
            b"in progress",
        ),
        ("_tmp/copy-x.tmp", b"a read-back copy"),
        ("_quarantine/contoso/x.zip.20261127T000000.000Z", b"refused"),
    ] {
        let path = dir.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    }
    let files = store.spool_files().await.unwrap();
    assert_eq!(
        files,
        vec![Listed {
            key: waiting.into(),
            size: 7
        }]
    );
    // The sweep sees the same: neither the spool's own directories nor partials.
    let sweep = store
        .sweep_spool(store.spool_files().await.unwrap(), |_| false)
        .await
        .unwrap();
    assert_eq!(sweep.waiting, vec![waiting.to_string()]);

    let aside = store.quarantine(waiting).await.unwrap();
    assert!(aside.starts_with(dir.path().join("_quarantine/contoso/2026/11/27/a")));
    assert_eq!(std::fs::read(&aside).unwrap(), b"package");
    assert!(
        !dir.path()
            .join("contoso/2026/11/27/a/000-GetFile.zip")
            .exists()
    );
    assert!(store.spool_files().await.unwrap().is_empty());

    // Copies younger than the age stay; older ones (a crash's) go.
    let hour = std::time::Duration::from_secs(3600);
    assert_eq!(store.clean_temp(hour).await.unwrap(), 0);
    std::fs::File::options()
        .write(true)
        .open(dir.path().join("_tmp/copy-x.tmp"))
        .unwrap()
        .set_modified(std::time::SystemTime::now() - 2 * hour)
        .unwrap();
    assert_eq!(store.clean_temp(hour).await.unwrap(), 1);
    assert!(!dir.path().join("_tmp/copy-x.tmp").exists());
}

#[tokio::test]
async fn fs_local_copies_are_the_files_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let store = fs_store(dir.path());
    let key = "contoso/2026/11/27/a/000-RunScript.zip";
    let copy = store.local_copy(key, None).await.unwrap();
    assert_eq!(copy.path(), dir.path().join(key));
    assert!(matches!(copy, LocalCopy::InPlace(_)));
    assert!(store.local_copy(key, Some("v1")).await.is_err());
    assert!(store.quarantine(key).await.is_err(), "nothing to move");
    assert_eq!(store.spool_files().await.unwrap(), vec![]);
    assert_eq!(store.current(key).await.unwrap(), None);
    // A file found at a package's path that is not this database's goes aside, out of the
    // tenant's directories.
    let path = dir.path().join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"planted").unwrap();
    let aside = store.quarantine(key).await.unwrap();
    assert!(aside.starts_with(dir.path().join("_quarantine/contoso/2026/11/27/a")));
    assert_eq!(std::fs::read(&aside).unwrap(), b"planted");
    assert!(!path.exists());
    assert!(
        !dir.path().join("contoso").exists(),
        "emptied directories go"
    );
}
