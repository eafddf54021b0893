//! Issue 16, §7a rule 9: with `[anchor] witness`, every checkpoint and token is also written
//! create-only to a second home; verify compares the two and checks the chain against the
//! witness's newest checkpoint, so rewriting the chain together with every local anchor is
//! still caught. A directory witness, and an S3 one on moto with Object Lock.

use std::path::Path;

use crate::common::files_under;
use crate::forgery::caught;
use crate::tamper::{archived_vault, make_writable, rehash_chain_from, sim_env};

/// Every file under `_checkpoints/` of `store`, as (key, bytes).
fn local_anchors(store: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = files_under(&store.join("_checkpoints"))
        .into_iter()
        .map(|p| {
            (
                p.strip_prefix(store).unwrap().to_str().unwrap().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_witness_directory_catches_a_chain_rewritten_with_every_local_anchor() {
    let outside = tempfile::tempdir().unwrap();
    let witness = outside.path().join("witness");
    let vault = archived_vault(
        171,
        8,
        &format!("[anchor]\nwitness = \"{}\"\n", witness.display()),
    )
    .await;
    let local = local_anchors(&vault.store);
    assert!(local.len() >= 2, "{local:?}");
    assert_eq!(
        local_anchors(&witness),
        local,
        "the witness holds every anchor file"
    );
    vault.verify_ok();

    // A file the witness lacks (an outage between the two writes) is copied to it.
    let newest_key = local_anchors(&vault.store).last().unwrap().0.clone();
    make_writable(&witness);
    std::fs::remove_file(witness.join(&newest_key)).unwrap();
    vault.verify_ok();
    assert_eq!(local_anchors(&witness), local_anchors(&vault.store));

    // The chain rewritten from seq 1, and every local checkpoint and anchors row rewritten to
    // match it: only the witness still has the truth.
    let seqs = crate::anchors::anchored_seqs(&vault);
    let newest = *seqs.last().unwrap();
    let witness_cp = witness.join(format!("_checkpoints/{newest:012}.json"));
    caught(
        &vault,
        "chain and every local anchor rewritten",
        |v| {
            let c = v.forger();
            c.execute(
                "UPDATE custody_log SET detail = replace(detail, '\"status\"', '\"statuz\"') WHERE seq = 1",
                [],
            )
            .unwrap();
            rehash_chain_from(&c, 1);
            make_writable(&v.store.join("_checkpoints"));
            std::fs::remove_dir_all(v.store.join("_checkpoints")).unwrap();
            std::fs::create_dir(v.store.join("_checkpoints")).unwrap();
            c.execute("DELETE FROM anchors", []).unwrap();
            for seq in &seqs {
                let row_hash: String = c
                    .query_row(
                        "SELECT row_hash FROM custody_log WHERE seq = ?1",
                        [seq],
                        |r| r.get(0),
                    )
                    .unwrap();
                let cp = lrvault::anchor::Checkpoint {
                    seq: *seq,
                    row_hash: row_hash.clone(),
                    at: lrvault::time::now_str(),
                    rows: *seq,
                    evidence: 0,
                    host: Some("vault1".into()),
                    lrvault_version: "0.1.0".into(),
                    by: Some("verify".into()),
                };
                let rel = format!("_checkpoints/{seq:012}.json");
                std::fs::write(v.store.join(&rel), cp.to_bytes()).unwrap();
                lrvault::anchor::record_checkpoint(&c, &cp, &rel).unwrap();
            }
        },
        &[
            format!(
                "checkpoint {}: the witness's newest checkpoint pins custody seq {newest} with row_hash",
                witness_cp.display()
            ),
            "(rewritten chain)".to_string(),
            format!(
                "checkpoint {}: the store's _checkpoints/{newest:012}.json (SHA-256",
                witness_cp.display()
            ),
            "differs from the witness's copy".to_string(),
        ],
    );
    assert_eq!(local_anchors(&witness), local_anchors(&vault.store));

    // A checkpoint deleted from the store together with its anchors row: the witness has it.
    let first = seqs[0];
    caught(
        &vault,
        "checkpoint deleted with its row",
        |v| {
            make_writable(&v.store.join("_checkpoints"));
            std::fs::remove_file(v.store.join(format!("_checkpoints/{first:012}.json"))).unwrap();
            v.forger()
                .execute("DELETE FROM anchors WHERE seq = ?1", [first])
                .unwrap();
        },
        &[format!(
            "checkpoint {}: the witness holds it (SHA-256",
            witness
                .join(format!("_checkpoints/{first:012}.json"))
                .display()
        )],
    );

    // A relative witness directory is refused at start, in one line.
    crate::anchors::refused_at_start(
        &vault,
        &format!("witness = \"{}\"", witness.display()),
        "witness = \"witness\"",
        "invalid config: anchor.witness = \"witness\" is a relative path; write it absolute: lrvault never resolves paths against the working directory",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_witness_with_object_lock_gets_every_anchor_and_is_compared() {
    use crate::object_stores::{S3_KEY_ID, S3_SECRET, create_bucket, moto, s3_client, versions};
    let moto = moto().await;
    let s3 = s3_client(&moto);
    create_bucket(&s3, "witness", Some(("COMPLIANCE", 1))).await;
    let e = sim_env(172, 5, "[anchor]\nwitness = \"s3://witness/vault1\"\n").await;
    // The witness's own account: WITNESS_* before the store's variables.
    let run = |args: &[&str]| {
        let out = e
            .lrvault()
            .env("WITNESS_ENDPOINT", moto.url())
            .env("WITNESS_AWS_ACCESS_KEY_ID", S3_KEY_ID)
            .env("WITNESS_AWS_SECRET_ACCESS_KEY", S3_SECRET)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for args in [["discover"], ["archive"], ["verify"]] {
        let (code, out, err) = run(&args);
        assert_eq!(code, 0, "{args:?}\n{out}\n{err}");
    }
    let local = local_anchors(e.store());
    assert!(!local.is_empty());
    for (key, bytes) in &local {
        let found = versions(&s3, "witness", &format!("vault1/{key}")).await;
        assert_eq!(found.len(), 1, "{key}: one locked version");
        let held = crate::object_stores::get_version(
            &s3,
            "witness",
            &format!("vault1/{key}"),
            &found[0].0,
        )
        .await;
        assert_eq!(&held, bytes, "{key}");
    }

    // A local checkpoint rewritten: the witness's copy differs.
    let (key, original) = local.first().unwrap().clone();
    let path = e.store().join(&key);
    make_writable(&e.store().join("_checkpoints"));
    let text = String::from_utf8(original.clone()).unwrap();
    std::fs::write(&path, text.replace("\"host\"", "\"host\" ")).unwrap();
    let (code, out, err) = run(&["verify"]);
    assert_eq!(code, 3, "{out}\n{err}");
    assert!(
        err.contains(&format!(
            "checkpoint s3://witness/vault1/{key}: the store's {key} (SHA-256"
        )) && err.contains("differs from the witness's copy"),
        "{err}"
    );
    std::fs::write(&path, &original).unwrap();
    let (code, out, err) = run(&["verify"]);
    assert_eq!(code, 0, "{out}\n{err}");
}
