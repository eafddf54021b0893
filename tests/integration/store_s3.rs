//! The S3 backend against moto's server: a bucket with Object Lock and a default COMPLIANCE
//! retention, real evidence packages from the pipeline published into it, the locked versions
//! surviving deletes and overwrites, crash recovery without a second version, and
//! `require_worm` refusing buckets that do not lock.

use bytes::Bytes;
use futures_util::TryStreamExt;
use lrvault::store::{Expected, SpoolSweep, Store, StoreError, Verdict, WormStatus};

use crate::common::{env, sha256_hex, stored_hash};
use crate::object_stores::{
    create_bucket, get_version, moto, noise, s3_client, s3_config, s3_credentials, versions,
};

const LOCK: Option<(&str, i32)> = Some(("COMPLIANCE", 1));

fn spooled(store: &Store, key: &str, bytes: &[u8]) -> Expected {
    let path = store.staging_path(key).unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    Expected {
        sha256: sha256_hex(bytes),
        size: bytes.len() as u64,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipelines_packages_go_up_with_matching_sha256_and_the_spool_empties() {
    // The archive path builds and checks real packages in a directory; here that directory
    // is the spool of an S3 store, as the archive path will use it.
    let big = 20 * 1024 * 1024; // above the single-PUT limit: one package goes multipart
    let sim = lrvault_sim::SimConfig {
        seed: 5,
        actions: 4,
        big_getfile: Some(big),
        ..Default::default()
    };
    let e = env(sim, "").await;
    e.discover().await;
    let archived = e.archive().await.archived;
    assert!(archived >= 4, "{archived}");

    let moto = moto().await;
    let s3 = s3_client(&moto);
    create_bucket(&s3, "evidence", LOCK).await;
    let store = Store::open_with(
        &s3_config(&moto, "evidence", e.store().to_path_buf()),
        &s3_credentials,
    )
    .unwrap();
    assert_eq!(
        store.check_worm().await.unwrap(),
        WormStatus {
            mode: "COMPLIANCE".into(),
            period: Some("1 day".into())
        }
    );

    let rows: Vec<(String, String, u64)> = {
        let conn = e.reader();
        let mut stmt = conn
            .prepare("SELECT package_path, package_sha256, package_size FROM evidence ORDER BY package_path")
            .unwrap();
        stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    };
    assert_eq!(rows.len(), archived);
    assert!(
        rows.iter().any(|r| r.2 > big),
        "one package is large enough for multipart"
    );
    for (key, sha256, size) in &rows {
        let expected = Expected {
            sha256: sha256.clone(),
            size: *size,
        };
        assert_eq!(
            store.find(key, &expected).await.unwrap(),
            None,
            "nothing there before"
        );
        let stored = store.publish(key, &expected).await.unwrap();
        assert_eq!(stored.location, format!("s3://evidence/lrvault/{key}"));
        assert_eq!(stored.size, *size);
        let version = stored
            .version_id
            .clone()
            .expect("Object Lock buckets are versioned");
        assert!(stored.etag.is_some());
        let detail = stored.custody_detail();
        assert_eq!(detail["store"], stored.location.as_str());
        assert_eq!(detail["version_id"], version.as_str());
        // The object's SHA-256, read back by lrvault and independently through the SDK,
        // is the evidence row's.
        assert_eq!(
            stored_hash(&store, key, Some(version.as_str())).await,
            (sha256.clone(), *size)
        );
        let object_key = format!("lrvault/{key}");
        assert_eq!(
            sha256_hex(&get_version(&s3, "evidence", &object_key, &version).await),
            *sha256
        );
        assert_eq!(versions(&s3, "evidence", &object_key).await.len(), 1);
        // A single PUT carries its SHA-256, which S3 checked and kept.
        if *size <= lrvault::store::SINGLE_PUT_MAX {
            let head = s3
                .head_object()
                .bucket("evidence")
                .key(&object_key)
                .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
                .send()
                .await
                .unwrap();
            use base64::Engine;
            let b64 =
                base64::engine::general_purpose::STANDARD.encode(hex::decode(sha256).unwrap());
            assert_eq!(head.checksum_sha256(), Some(b64.as_str()));
            assert_eq!(
                head.object_lock_mode().map(|m| m.as_str()),
                Some("COMPLIANCE"),
                "the default retention applies"
            );
        }
        assert_eq!(
            store
                .judge(key, stored.version_id.as_deref(), stored.etag.as_deref())
                .await
                .unwrap(),
            Verdict::Intact
        );
        store.release(key).await.unwrap();
    }
    // Every package is published and released: nothing is left in the spool.
    let left: Vec<_> = crate::common::files_under(e.store())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "zip"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let listed: Vec<String> = store
        .list("")
        .map_ok(|l| l.key)
        .try_collect()
        .await
        .unwrap();
    let mut keys: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    keys.sort();
    let mut listed_sorted = listed.clone();
    listed_sorted.sort();
    assert_eq!(listed_sorted, keys);
}

/// moto, a client, and a store over a new bucket with Object Lock and a default COMPLIANCE
/// retention (its spool in the temporary directory).
async fn locked_bucket(
    bucket: &str,
) -> (
    crate::object_stores::Server,
    aws_sdk_s3::Client,
    tempfile::TempDir,
    Store,
) {
    let moto = moto().await;
    let s3 = s3_client(&moto);
    create_bucket(&s3, bucket, LOCK).await;
    let spool = tempfile::tempdir().unwrap();
    let store = Store::open_with(
        &s3_config(&moto, bucket, spool.path().into()),
        &s3_credentials,
    )
    .unwrap();
    (moto, s3, spool, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_version_survives_deletes_and_overwrites_and_verify_sees_them() {
    let (_moto, s3, _spool, store) = locked_bucket("locked").await;
    let key = "contoso/2026/11/27/act-1/000-GetFile.zip";
    let object_key = format!("lrvault/{key}");
    let original = noise(300_000, 1);
    let expected = spooled(&store, key, &original);
    let stored = store.publish(key, &expected).await.unwrap();
    let version = stored.version_id.clone().unwrap();
    assert_eq!(
        store
            .judge(key, stored.version_id.as_deref(), stored.etag.as_deref())
            .await
            .unwrap(),
        Verdict::Intact
    );

    // Someone uploads a new version over the package key.
    let forged = noise(300_000, 2);
    let put = s3
        .put_object()
        .bucket("locked")
        .key(&object_key)
        .body(forged.clone().into())
        .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Sha256)
        .send()
        .await
        .unwrap();
    let forged_version = put.version_id().unwrap().to_string();
    assert_ne!(forged_version, version);
    match store
        .judge(key, stored.version_id.as_deref(), stored.etag.as_deref())
        .await
        .unwrap()
    {
        Verdict::Superseded { current: Some(c) } => {
            assert_eq!(c.version_id.as_deref(), Some(forged_version.as_str()));
            assert_eq!(c.size, 300_000);
        }
        other => panic!("expected Superseded, got {other:?}"),
    }
    // Reading the version custody names still yields the original bytes.
    assert_eq!(
        stored_hash(&store, key, Some(version.as_str())).await,
        (expected.sha256.clone(), 300_000)
    );
    // Publishing the package again is refused: the key now holds other bytes.
    let again = store.publish(key, &expected).await.unwrap_err();
    assert!(matches!(again, StoreError::Conflict { .. }), "{again}");

    // A plain delete only adds a delete marker; deleting the locked version is refused.
    s3.delete_object()
        .bucket("locked")
        .key(&object_key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        store
            .judge(key, stored.version_id.as_deref(), stored.etag.as_deref())
            .await
            .unwrap(),
        Verdict::Superseded { current: None }
    );
    let refused = s3
        .delete_object()
        .bucket("locked")
        .key(&object_key)
        .version_id(&version)
        .send()
        .await
        .unwrap_err();
    use aws_sdk_s3::error::ProvideErrorMetadata;
    assert_eq!(refused.code(), Some("AccessDenied"), "{refused:?}");
    assert_eq!(
        sha256_hex(&get_version(&s3, "locked", &object_key, &version).await),
        expected.sha256
    );
    let kept: Vec<String> = versions(&s3, "locked", &object_key)
        .await
        .into_iter()
        .map(|v| v.0)
        .collect();
    assert!(kept.contains(&version), "{kept:?}");
    assert_eq!(
        kept.len(),
        2,
        "the original and the forged version, nothing more: {kept:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_upload_and_commit_is_recovered_without_a_second_version() {
    let moto = moto().await;
    let s3 = s3_client(&moto);
    create_bucket(&s3, "crashes", LOCK).await;
    let spool = tempfile::tempdir().unwrap();
    let cfg = s3_config(&moto, "crashes", spool.path().into());
    let small_key = "contoso/2026/11/27/act-2/000-RunScript.zip";
    let large_key = "contoso/2026/11/27/act-2/001-GetFile.zip";
    let small_bytes = noise(70_000, 3);
    let large_bytes = noise(lrvault::store::SINGLE_PUT_MAX as usize + 3 * 1024 * 1024, 4);

    let first = {
        // Process 1 uploads both packages and dies before committing their custody rows.
        let store = Store::open_with(&cfg, &s3_credentials).unwrap();
        let small = store
            .publish(small_key, &spooled(&store, small_key, &small_bytes))
            .await
            .unwrap();
        let large = store
            .publish(large_key, &spooled(&store, large_key, &large_bytes))
            .await
            .unwrap();
        (small, large)
    };

    // Process 2 finds the spool copies and publishes them again: HEAD + hash find the
    // objects, nothing is uploaded a second time.
    let store = Store::open_with(&cfg, &s3_credentials).unwrap();
    let sweep = store
        .sweep_spool(store.spool_files().await.unwrap(), |_| false)
        .await
        .unwrap();
    assert_eq!(
        sweep.waiting,
        vec![small_key.to_string(), large_key.to_string()]
    );
    assert_eq!(
        sweep.waiting_bytes,
        (small_bytes.len() + large_bytes.len()) as u64
    );
    for (key, bytes, before) in [
        (small_key, &small_bytes, &first.0),
        (large_key, &large_bytes, &first.1),
    ] {
        let expected = Expected {
            sha256: sha256_hex(bytes),
            size: bytes.len() as u64,
        };
        let again = store.publish(key, &expected).await.unwrap();
        assert_eq!(&again, before, "the same version is adopted");
        let all = versions(&s3, "crashes", &format!("lrvault/{key}")).await;
        assert_eq!(all.len(), 1, "{key}: {all:?}");
    }

    // Process 2 commits the small package's row, then dies before releasing its spool copy;
    // process 3's start-up sweep removes it and leaves the uncommitted one for publication.
    let third = Store::open_with(&cfg, &s3_credentials).unwrap();
    let sweep = third
        .sweep_spool(third.spool_files().await.unwrap(), |key| key == small_key)
        .await
        .unwrap();
    assert_eq!(
        sweep,
        SpoolSweep {
            removed: vec![small_key.to_string()],
            waiting: vec![large_key.to_string()],
            waiting_bytes: large_bytes.len() as u64,
        }
    );
    store.release(large_key).await.unwrap();
    assert!(crate::common::files_under(spool.path()).is_empty());
    assert_eq!(
        std::fs::read_dir(spool.path()).unwrap().count(),
        0,
        "empty directories go too"
    );

    // A spool copy that changed after its check is never uploaded.
    let key = "contoso/2026/11/27/act-3/000-RunScript.zip";
    let expected = spooled(&store, key, b"checked bytes");
    std::fs::write(store.staging_path(key).unwrap(), b"altered bytes").unwrap();
    let e = store.publish(key, &expected).await.unwrap_err();
    assert!(matches!(e, StoreError::Changed { .. }), "{e}");
    assert!(
        versions(&s3, "crashes", &format!("lrvault/{key}"))
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_worm_refuses_buckets_that_do_not_lock() {
    let moto = moto().await;
    let s3 = s3_client(&moto);
    create_bucket(&s3, "plain", None).await;
    create_bucket(&s3, "governed", Some(("GOVERNANCE", 30))).await;
    let spool = tempfile::tempdir().unwrap();
    let check = |bucket: &'static str| {
        let cfg = s3_config(&moto, bucket, spool.path().into());
        async move {
            Store::open_with(&cfg, &s3_credentials)
                .unwrap()
                .check_worm()
                .await
        }
    };
    let e = check("plain").await.unwrap_err();
    assert!(matches!(e, StoreError::Refused(_)));
    assert_eq!(
        e.to_string(),
        "store.require_worm: bucket 'plain' has no Object Lock; create it with Object Lock and a default COMPLIANCE retention (docs/operations.md)"
    );
    let e = check("governed").await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "store.require_worm: bucket 'governed' has a default GOVERNANCE retention; only COMPLIANCE stops every user, root included"
    );
    let e = check("missing-bucket").await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "store.bucket 'missing-bucket' does not exist"
    );
    // The refusal is a user error: exit code 2, one line.
    let err = anyhow::Error::new(check("plain").await.unwrap_err());
    assert_eq!(lrvault::error::exit_code(&err), 2);
    assert!(!lrvault::error::one_line(&err).contains('\n'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_written_create_only_and_listed() {
    let (_moto, s3, spool, store) = locked_bucket("anchors").await;
    let key = "_checkpoints/000000000042.json";
    let body = Bytes::from_static(br#"{"seq":42,"row_hash":"ab"}"#);
    let first = store.put_small(key, body.clone()).await.unwrap();
    assert_eq!(
        first.location,
        "s3://anchors/lrvault/_checkpoints/000000000042.json"
    );
    // Writing the same bytes again (a retry after a crash) returns the same version.
    assert_eq!(store.put_small(key, body.clone()).await.unwrap(), first);
    let e = store
        .put_small(key, Bytes::from_static(b"{}"))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
    assert_eq!(
        versions(&s3, "anchors", &format!("lrvault/{key}"))
            .await
            .len(),
        1
    );
    let tsr = store
        .put_small(
            "_checkpoints/000000000042.tsr",
            Bytes::from_static(b"token"),
        )
        .await
        .unwrap();
    assert!(tsr.version_id.is_some());

    let listed: Vec<(String, u64)> = store
        .list("_checkpoints/")
        .map_ok(|l| (l.key, l.size))
        .try_collect()
        .await
        .unwrap();
    let mut listed = listed;
    listed.sort();
    assert_eq!(
        listed,
        vec![
            (
                "_checkpoints/000000000042.json".to_string(),
                body.len() as u64
            ),
            ("_checkpoints/000000000042.tsr".to_string(), 5),
        ]
    );
    let out = spool.path().join("export/000000000042.json");
    let (sha, size) = store
        .download_to(key, first.version_id.as_deref(), &out)
        .await
        .unwrap();
    assert_eq!((sha, size), (sha256_hex(&body), body.len() as u64));
    assert_eq!(std::fs::read(&out).unwrap(), body);
}
