//! Issue 16, docs/evidence-format.md §9: crash recovery adopts only what this database itself was
//! writing. A valid bag planted at a pending result's path is quarantined (a QUARANTINED
//! row, the file moved under `_quarantine/`), never adopted, and the result is downloaded as
//! usual; an ARCHIVED row forged to say `adopted: true` without this database's DOWNLOADED
//! and PUBLISHING rows makes `verify` exit 3 naming it. (The object-store case is in
//! `store_pipeline.rs`, beside its moto fixtures.)

use lrvault_sim::SimConfig;

use crate::common::{check_bag, env};
use crate::store_pipeline::pending_keys;
use crate::tamper::{self, Vault, file_sha256, rehash_chain_from};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_results_genuine_bag_planted_at_a_pending_path_is_quarantined_and_the_result_downloaded()
 {
    let sim = SimConfig {
        seed: 31,
        actions: 4,
        ..SimConfig::default()
    };
    let e = env(sim, "[download]\nconcurrency = 1\n").await;
    e.discover().await;
    let keys = pending_keys(&e);
    assert!(keys.len() >= 2, "{keys:?}");
    let first = e.archive_max(1).await;
    assert_eq!(first.archived, 1, "{first:?}");
    let (a, b) = (&keys[0], &keys[1]);
    // Result A's genuine package, planted at B's path after discovery: a valid bag that pins
    // a real row of this chain.
    let (from, to) = (e.store().join(&a.2), e.store().join(&b.2));
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(&from, &to).unwrap();
    let planted = file_sha256(&to);
    let a_payload: String = e
        .reader()
        .query_row(
            "SELECT payload_sha256 FROM evidence WHERE package_path = ?1",
            [&a.2],
            |r| r.get(0),
        )
        .unwrap();

    let pass = e.archive().await;
    assert_eq!(
        (pass.archived, pass.failed),
        (keys.len() - 1, 0),
        "{pass:?}"
    );
    // Quarantined, with where it went, its hash and why; then downloaded as usual.
    assert_eq!(
        e.events(&b.0, b.1),
        [
            "QUARANTINED",
            "LINK_ISSUED",
            "DOWNLOADED",
            "PUBLISHING",
            "ARCHIVED"
        ]
    );
    let rows = e.custody(&b.0, b.1);
    let (_, q) = rows.iter().find(|(ev, _)| ev == "QUARANTINED").unwrap();
    assert_eq!(q["sha256"], planted.as_str());
    assert_eq!(
        q["reason"],
        format!(
            "a package is already at {} but this database has no DOWNLOADED row of this result with its payload (SHA-256 {a_payload})",
            b.2
        )
    );
    let moved_to = q["moved_to"].as_str().unwrap();
    assert!(
        moved_to.starts_with(&format!("_quarantine/{}.", b.2)),
        "{moved_to}"
    );
    assert_eq!(file_sha256(&e.store().join(moved_to)), planted);
    let (_, archived) = rows.last().unwrap();
    assert_eq!(archived.get("adopted"), None, "{archived}");
    // What is at B's path now is B's own package, with the simulator's bytes.
    let x = e
        .sim
        .sim
        .expected_results(&e.tenant_id())
        .into_iter()
        .find(|x| x.action_id == b.0 && x.index == b.1)
        .unwrap();
    let (_, payload, retrieval) = check_bag(&to);
    assert_eq!(crate::common::sha256_hex(&payload), x.sha256);
    assert_ne!(retrieval["custody_head"], serde_json::Value::Null);
    assert_ne!(file_sha256(&to), planted);
    let (code, out, err) = tamper::lrvault(&e.config_path, &["verify"]);
    assert_eq!(code, 0, "{out}\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archived_row_forged_as_adopted_without_its_publishing_intent_fails_verify() {
    let e = tamper::archived(33, 3, "[download]\nconcurrency = 1\n").await;
    let v = Vault::from_env(e);
    let snap = v.snapshot();
    // The newest result: its PUBLISHING row names another path, and its ARCHIVED row says
    // the package was adopted. Nothing after them is pinned by a package or a checkpoint.
    let (archived_seq, publishing_seq, path, evidence_id) = v
        .reader()
        .query_row(
            "SELECT a.seq, p.seq, a.package_path, json_extract(a.detail, '$.evidence_id')
             FROM custody_log a JOIN custody_log p ON p.event = 'PUBLISHING' AND p.package_path = a.package_path
             WHERE a.event = 'ARCHIVED' ORDER BY a.seq DESC LIMIT 1",
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            },
        )
        .unwrap();
    let c = v.forger();
    c.execute(
        "UPDATE custody_log SET package_path = package_path || '.elsewhere' WHERE seq = ?1",
        [publishing_seq],
    )
    .unwrap();
    c.execute(
        "UPDATE custody_log SET detail = json_set(detail, '$.adopted', json('true')) WHERE seq = ?1",
        [archived_seq],
    )
    .unwrap();
    rehash_chain_from(&c, publishing_seq);
    drop(c);
    let err = v.verify_fails();
    assert!(
        err.contains(&format!(
            "custody seq {archived_seq} (ARCHIVED {path}): evidence {evidence_id} was adopted without an earlier publishing intent (PUBLISHING) for its path and package SHA-256 (docs/evidence-format.md §9)"
        )),
        "{err}"
    );
    v.restore(&snap);
    v.verify_ok();
}
