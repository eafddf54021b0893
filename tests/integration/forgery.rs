//! Issue 8: what an insider with write access to the database and the store would try, done
//! with plain SQL after dropping every trigger and with direct file edits. Each forgery makes
//! `verify` exit 3 with a message naming the package or seq; once it is rolled back, `verify`
//! exits 0 again.

use crate::tamper::{Vault, archived_vault, file_sha256, rebuild_package, rehash_chain_from};

/// Applies `forge`, expects verify to fail with every one of `expect` in its stderr, rolls
/// back and expects a clean verify.
pub fn caught(vault: &Vault, name: &str, forge: impl FnOnce(&Vault), expect: &[String]) {
    let snap = vault.snapshot();
    forge(vault);
    let err = vault.verify_fails();
    for needle in expect {
        assert!(
            err.contains(needle.as_str()),
            "{name}: {needle:?} not in:\n{err}"
        );
    }
    vault.restore(&snap);
    vault.verify_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forgery_is_caught_and_its_rollback_verifies() {
    let vault = archived_vault(81, 8, "").await;
    let (first_id, first_path, first_archived) = vault.package(0);
    let (late_id, late_path, _) = vault.package(6);
    let checkpoints: Vec<i64> = {
        let c = vault.reader();
        let mut stmt = c.prepare("SELECT seq FROM anchors ORDER BY seq").unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(checkpoints.len(), 2, "two verify runs, two checkpoints");
    let head = vault.query_i64("SELECT max(seq) FROM custody_log");

    // 1. A rebuilt package with an altered payload and valid BagIt manifests, and its
    // evidence row updated to match. The untouched ARCHIVED row still has the original hashes.
    let path = vault.store.join(&late_path);
    let original_sha = vault.query_str(&format!(
        "SELECT payload_sha256 FROM evidence WHERE evidence_id = '{late_id}'"
    ));
    caught(
        &vault,
        "rebuilt package",
        |v| {
            let new_sha = rebuild_package(&path, |bytes| bytes[0] ^= 0x20);
            let check = lrvault::package::check_package(&path).unwrap();
            assert!(
                check.problems.is_empty(),
                "the forged bag validates: {:?}",
                check.problems
            );
            v.forger()
                .execute(
                    "UPDATE evidence SET payload_sha256 = ?2, package_sha256 = ?3, package_size = ?4 WHERE evidence_id = ?1",
                    rusqlite::params![late_id, new_sha, file_sha256(&path), std::fs::metadata(&path).unwrap().len() as i64],
                )
                .unwrap();
        },
        &[
            format!("evidence {late_id} ({late_path})"),
            "the evidence row's payload_sha256 is".to_string(),
            format!("says {original_sha}"),
        ],
    );

    // 2. A package and its evidence row deleted.
    caught(
        &vault,
        "deleted package",
        |v| {
            std::fs::remove_file(v.store.join(&first_path)).unwrap();
            v.forger()
                .execute("DELETE FROM evidence WHERE evidence_id = ?1", [&first_id])
                .unwrap();
        },
        &[
            format!("custody seq {first_archived} (ARCHIVED {first_path}): no evidence row"),
            "state archived but no evidence row".to_string(),
        ],
    );

    // 3. An early custody row changed and the whole chain re-hashed after it: the chain
    // recomputes, but the checkpoints and the packages' custody_head no longer agree.
    caught(
        &vault,
        "rewritten chain",
        |v| {
            let c = v.forger();
            c.execute(
                "UPDATE custody_log SET detail = replace(detail, '\"status\"', '\"statuz\"') WHERE seq = 1",
                [],
            )
            .unwrap();
            rehash_chain_from(&c, 1);
        },
        &[
            format!(
                "checkpoint _checkpoints/{:012}.json: pins custody seq {}",
                checkpoints[0], checkpoints[0]
            ),
            "(rewritten chain)".to_string(),
            "the chain's row has".to_string(),
        ],
    );

    // 4. The newest custody rows deleted: a shorter chain that recomputes, behind a checkpoint.
    let cut_from = checkpoints[1] - 2;
    caught(
        &vault,
        "truncated chain",
        |v| {
            v.forger()
                .execute("DELETE FROM custody_log WHERE seq >= ?1", [cut_from])
                .unwrap();
        },
        &[
            format!(
                "checkpoint _checkpoints/{:012}.json: pins custody seq {}",
                checkpoints[1], checkpoints[1]
            ),
            format!("beyond the chain's head seq {}", cut_from - 1),
        ],
    );

    // 5. Variants.
    caught(
        &vault,
        "row edited without re-hashing",
        |v| {
            v.forger()
                .execute(
                    "UPDATE custody_log SET actor = 'someone else' WHERE seq = 3",
                    [],
                )
                .unwrap();
        },
        &["custody seq 3: row_hash does not match the row's contents".to_string()],
    );
    caught(
        &vault,
        "row deleted in the middle",
        |v| {
            v.forger()
                .execute("DELETE FROM custody_log WHERE seq = 5", [])
                .unwrap();
        },
        &["custody seq 6: sequence gap: expected seq 5".to_string()],
    );
    caught(
        &vault,
        "mistyped row",
        |v| {
            v.forger()
                .execute(
                    "UPDATE custody_log SET command_index = 'one' WHERE seq = 2",
                    [],
                )
                .unwrap();
        },
        &["custody seq 2: command_index holds Text, expected INTEGER".to_string()],
    );
    caught(
        &vault,
        "evidence row edited only",
        |v| {
            v.forger()
                .execute(
                    "UPDATE evidence SET payload_size = payload_size + 1 WHERE evidence_id = ?1",
                    [&first_id],
                )
                .unwrap();
        },
        &[format!(
            "evidence {first_id} ({first_path}): the evidence row's payload_size"
        )],
    );
    caught(
        &vault,
        "evidence row with a mistyped value",
        |v| {
            v.forger()
                .execute(
                    "UPDATE evidence SET package_sha256 = X'00' WHERE evidence_id = ?1",
                    [&first_id],
                )
                .unwrap();
        },
        &[format!(
            "evidence {first_id} ({first_path}): evidence row: package_sha256 holds Blob, expected TEXT"
        )],
    );
    let stray = format!("{}/evil.bin", first_path.rsplit_once('/').unwrap().0);
    caught(
        &vault,
        "file planted in the store",
        |v| std::fs::write(v.store.join(&stray), b"planted").unwrap(),
        &[format!(
            "store file {stray}: no evidence row names this file"
        )],
    );
    let newest = format!("_checkpoints/{:012}.json", checkpoints[1]);
    caught(
        &vault,
        "checkpoint deleted",
        |v| std::fs::remove_file(v.store.join(&newest)).unwrap(),
        &[format!(
            "checkpoint {newest}: recorded in the anchors table but missing"
        )],
    );
    caught(
        &vault,
        "checkpoint edited",
        |v| {
            let p = v.store.join(&newest);
            let text = std::fs::read_to_string(&p).unwrap();
            let seq = checkpoints[1].to_string();
            let forged = text.replacen(
                &format!("\"seq\": {seq}"),
                &format!("\"seq\": {}", head + 50),
                1,
            );
            crate::tamper::make_writable(&v.store.join("_checkpoints"));
            std::fs::write(&p, forged).unwrap();
        },
        &[format!(
            "checkpoint {newest}: its name says seq {}",
            checkpoints[1]
        )],
    );
    // Nothing of the forgeries is left: the chain grew only by the last runs' own rows.
    assert_eq!(
        vault.query_i64("SELECT count(*) FROM custody_log WHERE event = 'VERIFY_FAILED'"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_download_is_not_a_stray_file_but_an_orphan_partial_is() {
    let e = crate::common::env(
        lrvault_sim::SimConfig {
            seed: 5,
            actions: 6,
            ..Default::default()
        },
        "",
    )
    .await;
    e.discover().await;
    e.archive_max(2).await;
    let (tenant, action, index, created, ctype): (String, String, u32, String, String) = e
        .reader()
        .query_row(
            "SELECT r.tenant, r.action_id, r.command_index, a.created_at, r.command_type FROM results r
             JOIN actions a USING (tenant, action_id) WHERE r.state = 'pending' LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap();
    let rel = lrvault::package::package_rel_path(
        &tenant,
        lrvault::time::parse_api(&created).unwrap(),
        &action,
        index,
        &ctype,
    );
    let set_state = |state: &str| {
        rusqlite::Connection::open(&e.cfg.database.path)
            .unwrap()
            .execute(
                "UPDATE results SET state = ?4 WHERE tenant = ?1 AND action_id = ?2 AND command_index = ?3",
                rusqlite::params![tenant, action, index, state],
            )
            .unwrap();
    };
    // Another process is writing this result's package.
    set_state("downloading");
    // A writer's partial: `<package>.<writer tag>.partial`.
    let partial = e
        .store()
        .join(format!("{}.4242-0badcafe.partial", rel.display()));
    std::fs::create_dir_all(partial.parent().unwrap()).unwrap();
    std::fs::write(&partial, b"PK half a zip").unwrap();
    let (code, out, err) = crate::tamper::lrvault(&e.config_path, &["verify"]);
    assert_eq!(code, 0, "{out}\n{err}");
    // Between its rename and its database commit, the finished zip is not a stray either.
    std::fs::rename(&partial, e.store().join(&rel)).unwrap();
    let (code, out, err) = crate::tamper::lrvault(&e.config_path, &["verify"]);
    assert_eq!(code, 0, "{out}\n{err}");
    // Nobody is downloading it any more: both are defects.
    std::fs::write(&partial, b"PK half a zip").unwrap();
    set_state("pending");
    let (code, _, err) = crate::tamper::lrvault(&e.config_path, &["verify"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(&format!(
            "store file {}.4242-0badcafe.partial: partial file that no download in progress accounts for",
            rel.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "store file {}: no evidence row names this file",
            rel.display()
        )),
        "{err}"
    );
    assert_eq!(
        e.count("SELECT count(*) FROM custody_log WHERE event = 'VERIFY_FAILED' AND json_extract(detail, '$.check') = 'store'"),
        2
    );
}
