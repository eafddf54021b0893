//! Issue 8: checkpoints stamped by a real RFC 3161 timestamp authority (OpenSSL's, see
//! `local_tsa`). The tokens lrvault keeps pass `openssl ts -verify`; a checkpoint altered after
//! its token was issued is rejected; a TSA that is down delays its token, never archiving.

use std::path::Path;
use std::sync::atomic::Ordering;

use crate::common::{archivable, env};
use crate::local_tsa::{LocalTsa, make_ca, openssl};
use crate::tamper::{Vault, archived_vault, lrvault, make_writable};

fn checkpoint_files(store: &Path, ext: &str) -> Vec<std::path::PathBuf> {
    crate::common::files_under(&store.join("_checkpoints"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_pass_openssl_altered_checkpoints_fail_and_a_down_tsa_only_delays_its_token() {
    let tsa_dir = tempfile::tempdir().unwrap();
    let tsa = LocalTsa::start(tsa_dir.path()).await;
    // First a TSA nobody answers for: a port that was free a moment ago.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down_url = format!("http://127.0.0.1:{closed}/tsr");
    let e = env(
        lrvault_sim::SimConfig {
            seed: 12,
            actions: 6,
            ..Default::default()
        },
        &format!(
            "[anchor]\ntsa_url = \"{down_url}\"\ntsa_ca_file = \"{}\"\ntsa_policy = \"1.2.3.4.5\"\n",
            tsa.ca_pem.display()
        ),
    )
    .await;
    // The archive pass ends with a checkpoint of the head it wrote; the TSA being down costs
    // it its token only. Verify asks once for both, keeps the checkpoints and exits 0.
    e.run_ok(&["discover"]);
    e.run_ok(&["archive"]);
    let expected = archivable(&e.sim.sim, &e.tenant_id()).len() as i64;
    assert_eq!(e.count("SELECT count(*) FROM evidence"), expected);
    assert_eq!(
        e.count("SELECT count(*) FROM anchors WHERE seq = (SELECT max(seq) FROM custody_log)"),
        1,
        "the archive pass pinned the chain's head"
    );
    // Nothing was appended since: verify's checkpoint is the archive pass's, asked for once.
    let (out, _) = e.run_ok(&["verify"]);
    assert!(out.contains("tokens: 0 fetched, 1 pending"), "{out}");
    assert_eq!(checkpoint_files(e.store(), "json").len(), 1);
    assert!(checkpoint_files(e.store(), "tsr").is_empty());
    assert_eq!(tsa.issued.load(Ordering::SeqCst), 0);

    // The TSA is back: the next run stamps the old checkpoint and its own.
    let config = std::fs::read_to_string(&e.config_path).unwrap();
    std::fs::write(&e.config_path, config.replace(&down_url, &tsa.url)).unwrap();
    let (out, _) = e.run_ok(&["verify"]);
    assert!(out.contains("tokens: 2 fetched, 0 pending"), "{out}");
    let tokens = checkpoint_files(e.store(), "tsr");
    assert_eq!(tokens.len(), 2);
    for tsr in &tokens {
        let json = tsr.with_extension("json");
        let ok = openssl(
            tsa_dir.path(),
            &[
                "ts",
                "-verify",
                "-data",
                json.to_str().unwrap(),
                "-in",
                tsr.to_str().unwrap(),
                "-CAfile",
                tsa.ca_pem.to_str().unwrap(),
            ],
        );
        assert!(ok.contains("Verification: OK"), "{ok}");
        let text = openssl(
            tsa_dir.path(),
            &["ts", "-reply", "-in", tsr.to_str().unwrap(), "-text"],
        );
        assert!(
            text.contains("Policy OID: 1.2.3.4.5"),
            "the configured policy was asked for: {text}"
        );
    }
    let stamped = e.count(&format!(
        "SELECT count(*) FROM anchors WHERE tsa_url = '{}' AND tsr_path LIKE '_checkpoints/%.tsr' AND gen_time LIKE '20__-__-__T__:__:__.000Z'",
        tsa.url
    ));
    assert_eq!(stamped, 2);
    // Each token is recorded for good by an ANCHORED row naming its bytes.
    for tsr in &tokens {
        let seq: i64 = tsr.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        let named = e.count(&format!(
            "SELECT count(*) FROM custody_log WHERE event = 'ANCHORED'
               AND json_extract(detail, '$.checkpoint_seq') = {seq}
               AND json_extract(detail, '$.token_sha256') = '{}'
               AND json_extract(detail, '$.tsa') = '{}'",
            crate::common::sha256_hex(&std::fs::read(tsr).unwrap()),
            tsa.url
        ));
        assert_eq!(named, 1, "{}", tsr.display());
    }

    // A token checked against another CA fails on its chain.
    let other_ca = make_ca(tsa_dir.path(), "someone-else");
    let json = std::fs::read(tokens[0].with_extension("json")).unwrap();
    let tsr = std::fs::read(&tokens[0]).unwrap();
    let ours = lrvault::anchor::TrustAnchors::load(&tsa.ca_pem).unwrap();
    let info = lrvault::anchor::verify_token(&tsr, &json, Some(&ours)).unwrap();
    assert_eq!(info.signer, "CN=Test TSA");
    assert_eq!(info.policy, "1.2.3.4.5");
    assert!(info.chain_checked);
    let theirs = lrvault::anchor::TrustAnchors::load(&other_ca).unwrap();
    assert!(matches!(
        lrvault::anchor::verify_token(&tsr, &json, Some(&theirs)),
        Err(lrvault::anchor::TsaError::Chain(_))
    ));

    // A checkpoint altered after its token was issued: still the right seq and hash, but the
    // token no longer covers its bytes.
    let first = tokens[0].with_extension("json");
    let name = first.file_name().unwrap().to_str().unwrap().to_string();
    make_writable(&e.store().join("_checkpoints"));
    let original = std::fs::read_to_string(&first).unwrap();
    let host_line = original.lines().find(|l| l.contains("\"host\"")).unwrap();
    std::fs::write(
        &first,
        original.replace(host_line, "  \"host\": \"elsewhere\","),
    )
    .unwrap();
    let (code, _, err) = lrvault(&e.config_path, &["verify"]);
    assert_eq!(code, 3, "{err}");
    let stem = name.trim_end_matches(".json");
    assert!(
        err.contains(&format!(
            "checkpoint _checkpoints/{name}: its token _checkpoints/{stem}.tsr does not verify: message imprint does not match the checkpoint"
        )),
        "{err}"
    );
    std::fs::write(&first, &original).unwrap();
    e.run_ok(&["verify"]);

    // Down again (503 this time): one more checkpoint waits for its token, nothing fails.
    tsa.down.store(true, Ordering::SeqCst);
    let (out, _) = e.run_ok(&["verify"]);
    assert!(out.contains("tokens: 0 fetched, 1 pending"), "{out}");
    tsa.down.store(false, Ordering::SeqCst);
    let (out, _) = e.run_ok(&["verify"]);
    assert!(out.contains("tokens: 2 fetched, 0 pending"), "{out}");
    assert_eq!(
        checkpoint_files(e.store(), "json").len(),
        checkpoint_files(e.store(), "tsr").len()
    );
}

/// A token for the file `data` from the OpenSSL TSA whose files are in `tsa_dir`, made
/// directly with `openssl ts` (as a forger with access to that TSA would).
pub fn stamp(tsa_dir: &Path, data: &Path) -> Vec<u8> {
    let data = data.to_str().unwrap();
    openssl(
        tsa_dir,
        &[
            "ts", "-query", "-data", data, "-sha256", "-cert", "-out", "own.tsq",
        ],
    );
    openssl(
        tsa_dir,
        &[
            "ts",
            "-reply",
            "-config",
            "tsa.cnf",
            "-queryfile",
            "own.tsq",
            "-out",
            "own.tsr",
        ],
    );
    std::fs::read(tsa_dir.join("own.tsr")).unwrap()
}

/// Seqs of the checkpoints the `anchors` table records, oldest first.
pub fn anchored_seqs(vault: &Vault) -> Vec<i64> {
    let c = vault.reader();
    let mut stmt = c.prepare("SELECT seq FROM anchors ORDER BY seq").unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn cp_path(vault: &Vault, seq: i64, ext: &str) -> std::path::PathBuf {
    vault.store.join(format!("_checkpoints/{seq:012}.{ext}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_permanent_deleted_or_late_ones_are_caught_never_restamped() {
    let tsa_dir = tempfile::tempdir().unwrap();
    let tsa = LocalTsa::start(tsa_dir.path()).await;
    let vault = archived_vault(161, 8, &tsa.anchor_toml()).await;
    let seqs = anchored_seqs(&vault);
    // Two archive passes and two verify runs, each with its checkpoint and token.
    assert_eq!(seqs.len(), 4, "{seqs:?}");
    assert_eq!(
        vault.query_i64("SELECT count(*) FROM anchors WHERE tsr_path IS NULL"),
        0
    );
    assert_eq!(
        vault.query_i64("SELECT count(*) FROM custody_log WHERE event = 'ANCHORED'"),
        4
    );
    vault.verify_ok();
    let seqs = anchored_seqs(&vault);
    let issued = tsa.issued.load(Ordering::SeqCst);

    // 1. Every token deleted and the token columns nulled: the chain's ANCHORED rows still
    // name them, and nothing is stamped again.
    let expect: Vec<String> = seqs
        .iter()
        .map(|seq| {
            format!("checkpoint _checkpoints/{seq:012}.json: custody seq ")
                + &format!("(ANCHORED) names its token {seq:012}.tsr")
        })
        .collect();
    let snap = vault.snapshot();
    make_writable(&vault.store.join("_checkpoints"));
    for seq in &seqs {
        std::fs::remove_file(cp_path(&vault, *seq, "tsr")).unwrap();
    }
    vault
        .forger()
        .execute(
            "UPDATE anchors SET tsa_url = NULL, tsr_path = NULL, gen_time = NULL",
            [],
        )
        .unwrap();
    let err = vault.verify_fails();
    for (seq, needle) in seqs.iter().zip(&expect) {
        let (head, tail) = needle.split_once("custody seq ").unwrap();
        assert!(err.contains(head), "{seq}: {err}");
        assert!(err.contains(tail), "{seq}: {err}");
    }
    assert_eq!(
        tsa.issued.load(Ordering::SeqCst),
        issued,
        "never re-stamped"
    );
    assert!(checkpoint_files(&vault.store, "tsr").is_empty());
    vault.restore(&snap);
    vault.verify_ok();

    // 2. An older checkpoint deleted with its token and its anchors row: the VERIFIED row of
    // the run that wrote it, and its ANCHORED row, still name it.
    let (verified_seq, older): (i64, String) = vault
        .reader()
        .query_row(
            "SELECT seq, json_extract(detail, '$.checkpoint') FROM custody_log
             WHERE event = 'VERIFIED' ORDER BY seq LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let older_seq: i64 = older[13..25].parse().unwrap();
    crate::forgery::caught(
        &vault,
        "deleted older checkpoint",
        |v| {
            make_writable(&v.store.join("_checkpoints"));
            std::fs::remove_file(v.store.join(&older)).unwrap();
            std::fs::remove_file(cp_path(v, older_seq, "tsr")).unwrap();
            v.forger()
                .execute("DELETE FROM anchors WHERE seq = ?1", [older_seq])
                .unwrap();
        },
        &[
            format!(
                "checkpoint {older}: custody seq {verified_seq} (VERIFIED) names this checkpoint; the store does not have it (deleted?)"
            ),
            format!("checkpoint {older}: custody seq "),
            "(ANCHORED) names this checkpoint and its token; the store has neither (deleted?)"
                .to_string(),
        ],
    );

    // 3. A checkpoint made up afterwards for an old row, dated two days back, and stamped
    // now: its token's genTime is far beyond max_token_delay after its `at`.
    let planted_seq = 3;
    let row_hash = vault.query_str(&format!(
        "SELECT row_hash FROM custody_log WHERE seq = {planted_seq}"
    ));
    let at = lrvault::time::fmt(lrvault::time::now() - chrono::Duration::days(2));
    let planted = lrvault::anchor::Checkpoint {
        seq: planted_seq,
        row_hash,
        at: at.clone(),
        rows: planted_seq,
        evidence: 0,
        host: Some("vault1".into()),
        lrvault_version: "0.1.0".into(),
        by: Some("verify".into()),
    };
    crate::forgery::caught(
        &vault,
        "late token",
        |v| {
            let json = cp_path(v, planted_seq, "json");
            std::fs::write(&json, planted.to_bytes()).unwrap();
            let token = stamp(tsa_dir.path(), &json);
            std::fs::write(cp_path(v, planted_seq, "tsr"), token).unwrap();
        },
        &[
            format!("checkpoint _checkpoints/{planted_seq:012}.json: its token's genTime "),
            format!(
                "after the checkpoint's at {at} (more than anchor.max_token_delay 1day): stamped late"
            ),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_an_untrusted_tsa_never_counts_and_tsa_url_needs_its_ca() {
    let tsa_dir = tempfile::tempdir().unwrap();
    let tsa = LocalTsa::start(tsa_dir.path()).await;
    let vault = archived_vault(162, 6, &tsa.anchor_toml()).await;
    // Another TSA with its own CA: its tokens verify with the certificates they carry, and
    // would pass if the signer were taken from the token.
    let other_dir = tempfile::tempdir().unwrap();
    let _other = LocalTsa::start(other_dir.path()).await;
    let newest = *anchored_seqs(&vault).last().unwrap();
    let json = cp_path(&vault, newest, "json");
    let foreign = stamp(other_dir.path(), &json);
    let ok = openssl(
        other_dir.path(),
        &[
            "ts",
            "-verify",
            "-data",
            json.to_str().unwrap(),
            "-in",
            "own.tsr",
            "-CAfile",
            "test-tsa-root.crt",
        ],
    );
    assert!(ok.contains("Verification: OK"), "{ok}");
    crate::forgery::caught(
        &vault,
        "foreign token",
        |v| {
            make_writable(&v.store.join("_checkpoints"));
            std::fs::write(cp_path(v, newest, "tsr"), &foreign).unwrap();
        },
        &[format!(
            "checkpoint _checkpoints/{newest:012}.json: its token _checkpoints/{newest:012}.tsr does not verify: signer's certificate does not chain to tsa_ca_file"
        )],
    );
    // The same token with no tsa_ca_file to check it against never counts either.
    assert!(matches!(
        lrvault::anchor::verify_token(&foreign, &std::fs::read(&json).unwrap(), None),
        Err(lrvault::anchor::TsaError::Untrusted)
    ));

    // A TSA without its CA is refused at start, in one line.
    refused_at_start(
        &vault,
        &format!("tsa_ca_file = \"{}\"\n", tsa.ca_pem.display()),
        "",
        "invalid config: anchor.tsa_url is set but tsa_ca_file is empty: a token counts only when it verifies against the TSA's own CA certificate; set tsa_ca_file to that PEM file (docs/operations.md)",
    );
}

/// With `from` replaced by `to` in the vault's config, verify stops with exit 2 and the one
/// line `message`; with the config put back, it passes.
pub fn refused_at_start(vault: &Vault, from: &str, to: &str, message: &str) {
    let config = std::fs::read_to_string(&vault.config).unwrap();
    assert!(config.contains(from), "{from} not in {config}");
    std::fs::write(&vault.config, config.replace(from, to)).unwrap();
    let (code, out, err) = vault.verify(&[]);
    assert_eq!(code, 2, "{out}{err}");
    assert_eq!(err.trim_end(), format!("lrvault: {message}"));
    std::fs::write(&vault.config, config).unwrap();
    vault.verify_ok();
}

/// The checkpoints still waiting for a token, as docs/audit.md Q18 lists them.
fn audit_q18(vault: &Vault) -> Vec<i64> {
    let c = vault.reader();
    let mut stmt = c
        .prepare("SELECT seq, checkpoint_path, created_at FROM anchors WHERE tsr_path IS NULL ORDER BY seq")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_a_crash_left_without_their_rows_are_adopted_and_audit_agrees() {
    let tsa_dir = tempfile::tempdir().unwrap();
    let tsa = LocalTsa::start(tsa_dir.path()).await;
    let vault = archived_vault(163, 6, &tsa.anchor_toml()).await;
    tsa.down.store(true, Ordering::SeqCst);
    vault.verify_ok();
    let waiting = *anchored_seqs(&vault).last().unwrap();
    assert_eq!(audit_q18(&vault), vec![waiting]);
    // A crash after the checkpoint file, before its anchors row; and a token that reached
    // the store (genuine, from the same TSA) before its row and its ANCHORED row.
    vault.as_a_crash_left_it(|c| {
        c.execute("DELETE FROM anchors WHERE seq = ?1", [waiting])
            .unwrap();
    });
    let token = stamp(tsa_dir.path(), &cp_path(&vault, waiting, "json"));
    std::fs::write(cp_path(&vault, waiting, "tsr"), &token).unwrap();
    assert_eq!(audit_q18(&vault), Vec::<i64>::new());

    vault.verify_ok();
    let (tsr_path, gen_time): (String, String) = vault
        .reader()
        .query_row(
            "SELECT tsr_path, gen_time FROM anchors WHERE seq = ?1",
            [waiting],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(tsr_path, format!("_checkpoints/{waiting:012}.tsr"));
    let anchored = vault.query_str(&format!(
        "SELECT json_extract(detail, '$.gen_time') || ' ' || json_extract(detail, '$.token_sha256')
         FROM custody_log WHERE event = 'ANCHORED' AND json_extract(detail, '$.checkpoint_seq') = {waiting}"
    ));
    assert_eq!(
        anchored,
        format!("{gen_time} {}", crate::common::sha256_hex(&token))
    );
    let adopted = vault.query_str(
        "SELECT json_extract(detail, '$.adopted_checkpoints') || json_extract(detail, '$.adopted_tokens')
         FROM custody_log WHERE event = 'VERIFIED' ORDER BY seq DESC LIMIT 1",
    );
    assert_eq!(adopted, format!("[{waiting}][{waiting}]"));
    // Audit's list of checkpoints waiting for a token is exactly the checkpoints without a
    // token file: this run's own, the TSA being down.
    let without_token: Vec<i64> = checkpoint_files(&vault.store, "json")
        .iter()
        .filter(|j| !j.with_extension("tsr").exists())
        .map(|j| j.file_stem().unwrap().to_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(audit_q18(&vault), without_token);
    assert_eq!(without_token.len(), 1);
    tsa.down.store(false, Ordering::SeqCst);
    vault.verify_ok();
    assert_eq!(audit_q18(&vault), Vec::<i64>::new());
}

/// Inserts a made-up custody row at `seq` (the rows from there on move up one) and
/// re-hashes the chain from it, as a forger adding an event after the fact would.
fn plant_row(c: &rusqlite::Connection, seq: i64) {
    c.execute_batch(&format!(
        "PRAGMA foreign_keys = OFF;
         UPDATE custody_log SET seq = -(seq + 1) WHERE seq >= {seq};
         UPDATE custody_log SET seq = -seq WHERE seq < 0;
         INSERT INTO custody_log (seq, at, tenant, action_id, command_index, event, actor,
                                  evidence_sha256, package_path, detail, prev_hash, row_hash)
           SELECT {seq}, at, tenant, action_id, command_index, 'SKIPPED', actor, NULL, NULL,
                  '{{\"reason\":\"planted\"}}', '', '' FROM custody_log WHERE seq = {seq} + 1;"
    ))
    .unwrap();
    crate::tamper::rehash_chain_from(c, seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_pass_ends_with_a_checkpoint_of_its_head_that_catches_a_planted_row() {
    let vault = archived_vault(164, 8, "").await;
    // The first pass archived 4 results and pinned the head it left, before any verify.
    let first_verified =
        vault.query_i64("SELECT min(seq) FROM custody_log WHERE event = 'VERIFIED'");
    let pass_head = vault.query_i64(&format!(
        "SELECT max(seq) FROM custody_log WHERE seq < {first_verified}"
    ));
    assert_eq!(
        vault.query_i64(&format!(
            "SELECT count(*) FROM custody_log WHERE event = 'ARCHIVED' AND seq <= {pass_head}"
        )),
        4
    );
    let cp: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cp_path(&vault, pass_head, "json")).unwrap())
            .unwrap();
    assert_eq!(cp["by"], "archive");
    assert_eq!(cp["rows"], 0);
    assert_eq!(cp["evidence"], 4);
    assert_eq!(
        cp["row_hash"].as_str().unwrap(),
        vault.query_str(&format!(
            "SELECT row_hash FROM custody_log WHERE seq = {pass_head}"
        ))
    );
    // The last pass's checkpoint is the head the last verify also pinned (nothing between).
    let head_before_verify = vault.query_i64(
        "SELECT max(seq) FROM custody_log WHERE seq < (SELECT max(seq) FROM custody_log WHERE event = 'VERIFIED')",
    );
    assert!(cp_path(&vault, head_before_verify, "json").exists());

    // A row planted among that pass's rows, the chain re-hashed after it.
    crate::forgery::caught(
        &vault,
        "planted row",
        |v| plant_row(&v.forger(), pass_head - 1),
        &[
            format!(
                "checkpoint _checkpoints/{pass_head:012}.json: pins custody seq {pass_head} with row_hash"
            ),
            "(rewritten chain)".to_string(),
        ],
    );
}
