//! Issue 16: a forged backup cannot be laundered by `restore`, a RESTORED row cannot be
//! planted to excuse a rewritten chain, and the schema (the append-only triggers, the audit
//! views) is part of what `verify` proves (docs/design.md §7a rules 11 and 13).

use crate::forgery::caught;
use crate::tamper::{Vault, archived_vault, lrvault, rehash_chain_from, without_triggers};

/// A backup taken now (after both checkpoints), then `forge`d; `restore` must refuse it with
/// one line containing `expect`, and leave the database as it was.
fn refused(vault: &Vault, name: &str, forge: impl FnOnce(&rusqlite::Connection), expect: &str) {
    let backup = vault.dir.path().join(format!("{name}.db"));
    let (code, _, err) = lrvault(
        &vault.config,
        &["backup", "--to", &backup.display().to_string()],
    );
    assert_eq!(code, 0, "{err}");
    {
        let (c, triggers) = without_triggers(&backup);
        forge(&c);
        // The forger puts the triggers back, so the copy looks whole.
        for sql in triggers {
            c.execute_batch(&sql).unwrap();
        }
    }
    let before = crate::tamper::file_sha256(&vault.db);
    let (code, out, err) = lrvault(
        &vault.config,
        &["restore", "--from", &backup.display().to_string()],
    );
    assert_eq!(
        code, 1,
        "{name}: the forged backup must be refused:\n{out}{err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{name}: one line:\n{err}");
    assert!(lines[0].contains(expect), "{name}: {expect:?} not in {err}");
    assert!(lines[0].contains(&backup.display().to_string()), "{err}");
    assert_eq!(
        crate::tamper::file_sha256(&vault.db),
        before,
        "{name}: database touched"
    );
    vault.verify_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_backup_is_refused_naming_what_contradicts_it() {
    let vault = archived_vault(171, 6, "").await;
    let first_checkpoint = vault.query_i64("SELECT min(seq) FROM anchors");
    let (_, path, archived_seq) = vault.package(0);
    // Payload replaced: the ARCHIVED row takes another hash, the chain is re-hashed.
    refused(
        &vault,
        "rehashed",
        |c| {
            c.execute(
                "UPDATE custody_log SET evidence_sha256 = ?2 WHERE seq = ?1",
                rusqlite::params![archived_seq, "ab".repeat(32)],
            )
            .unwrap();
            c.execute(
                "UPDATE evidence SET payload_sha256 = ?2 WHERE package_path = ?1",
                rusqlite::params![path, "ab".repeat(32)],
            )
            .unwrap();
            rehash_chain_from(c, archived_seq);
        },
        &format!(
            "contradicts the checkpoint _checkpoints/{first_checkpoint:012}.json (seq {first_checkpoint}"
        ),
    );
    refused(
        &vault,
        "broken",
        |c| {
            c.execute("UPDATE custody_log SET actor = 'x' WHERE seq = 4", [])
                .unwrap();
        },
        "its custody chain has a defect at seq 4: row_hash does not match",
    );
    refused(
        &vault,
        "no-triggers",
        |c| {
            c.execute_batch(
                "CREATE TRIGGER keep_quiet AFTER INSERT ON custody_log BEGIN SELECT 1; END;",
            )
            .unwrap();
        },
        "its trigger keep_quiet is not made by lrvault's migrations",
    );
    refused(
        &vault,
        "altered-view",
        |c| {
            c.execute_batch(
                "DROP VIEW v_evidence; CREATE VIEW v_evidence AS SELECT * FROM evidence WHERE tenant <> 'sim0';",
            )
            .unwrap();
        },
        "its view v_evidence is altered",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_schema_and_restored_rows_are_proven() {
    let vault = archived_vault(172, 4, "").await;
    caught(
        &vault,
        "triggers dropped, a foreign one added",
        |v| {
            without_triggers(&v.db)
                .0
                .execute_batch(
                    "CREATE TRIGGER hide AFTER INSERT ON custody_log WHEN NEW.event = 'VERIFY_FAILED'
                     BEGIN SELECT 1; END;",
                )
                .unwrap();
        },
        &[
            "schema object trigger custody_log_no_update: missing".to_string(),
            "schema object trigger evidence_no_update: missing".to_string(),
            "schema object trigger hide: not made by lrvault's migrations".to_string(),
        ],
    );
    // A RESTORED row planted after the head, excusing every checkpoint.
    caught(
        &vault,
        "planted RESTORED row",
        |v| {
            let c = v.forger();
            let (seq, row_hash): (i64, String) = c
                .query_row(
                    "SELECT seq, row_hash FROM custody_log WHERE seq = 3",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            let head = vault.query_i64("SELECT max(seq) FROM custody_log");
            let detail = serde_json::json!({
                "restored_head": { "seq": seq, "row_hash": row_hash },
                "superseded_checkpoints": [],
            });
            c.execute(
                "INSERT INTO custody_log (seq, at, tenant, action_id, event, actor, detail, prev_hash, row_hash)
                 SELECT ?1, at, '*', '*', 'RESTORED', actor, ?2, row_hash, '' FROM custody_log WHERE seq = ?1 - 1",
                rusqlite::params![head + 1, detail.to_string()],
            )
            .unwrap();
            rehash_chain_from(&c, head + 1);
        },
        &["a RESTORED row must directly follow the head it restored; it names seq 3".to_string()],
    );
}

/// The insider's whole laundering: a backup with an early row changed and the chain
/// re-hashed, and every local checkpoint rewritten to pin the forged chain. Returns the
/// forged backup's path; the vault's store now holds the rewritten checkpoints.
fn launder(vault: &Vault) -> std::path::PathBuf {
    let backup = vault.dir.path().join("laundered.db");
    let (code, _, err) = lrvault(
        &vault.config,
        &["backup", "--to", &backup.display().to_string()],
    );
    assert_eq!(code, 0, "{err}");
    let (c, triggers) = without_triggers(&backup);
    c.execute(
        "UPDATE custody_log SET detail = replace(detail, '\"status\"', '\"statuz\"') WHERE seq = 1",
        [],
    )
    .unwrap();
    rehash_chain_from(&c, 1);
    let checkpoints = vault.store.join("_checkpoints");
    crate::tamper::make_writable(&checkpoints);
    for file in crate::common::files_under(&checkpoints) {
        if file.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let mut cp: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        let seq = cp["seq"].as_i64().unwrap();
        let forged: String = c
            .query_row(
                "SELECT row_hash FROM custody_log WHERE seq = ?1",
                [seq],
                |r| r.get(0),
            )
            .unwrap();
        cp["row_hash"] = serde_json::json!(forged);
        std::fs::write(&file, serde_json::to_vec(&cp).unwrap()).unwrap();
    }
    for sql in triggers {
        c.execute_batch(&sql).unwrap();
    }
    backup
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_laundered_backup_is_refused_by_the_witness() {
    let outside = tempfile::tempdir().unwrap();
    let witness = outside.path().join("witness");
    let vault = archived_vault(
        173,
        6,
        &format!("[anchor]\nwitness = \"{}\"\n", witness.display()),
    )
    .await;
    let oldest = crate::anchors::anchored_seqs(&vault)
        .into_iter()
        .min()
        .unwrap();
    let backup = launder(&vault);
    let before = crate::tamper::file_sha256(&vault.db);
    let (code, out, err) = lrvault(
        &vault.config,
        &["restore", "--from", &backup.display().to_string()],
    );
    assert_eq!(code, 1, "the laundered backup must be refused:\n{out}{err}");
    assert!(
        err.contains(&format!(
            "its custody chain contradicts the checkpoint _checkpoints/{oldest:012}.json in the witness {}",
            witness.display()
        )),
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "{err}"
    );
    assert_eq!(
        crate::tamper::file_sha256(&vault.db),
        before,
        "database touched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_laundered_backup_is_caught_by_the_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let tsa = crate::local_tsa::LocalTsa::start(&dir.path().join("tsa")).await;
    let vault = archived_vault(174, 6, &tsa.anchor_toml()).await;
    let stamped = vault.query_i64("SELECT count(*) FROM anchors WHERE tsr_path IS NOT NULL");
    assert!(stamped >= 2, "{stamped}");
    let backup = launder(&vault);
    // Every local checkpoint agrees with the forged backup, so restore takes it; the tokens do
    // not: each checkpoint's bytes changed after the TSA stamped them.
    let (code, out, err) = lrvault(
        &vault.config,
        &["restore", "--from", &backup.display().to_string()],
    );
    assert_eq!(code, 0, "{out}{err}");
    let err = vault.verify_fails();
    let oldest = crate::anchors::anchored_seqs(&vault)
        .into_iter()
        .min()
        .unwrap();
    assert!(
        err.contains(&format!("checkpoint _checkpoints/{oldest:012}.")),
        "{err}"
    );
}
