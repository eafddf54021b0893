//! Issue 8: checkpoints stamped by a real RFC 3161 timestamp authority (OpenSSL's, see
//! `local_tsa`). The tokens lrvault keeps pass `openssl ts -verify`; a checkpoint altered after
//! its token was issued is rejected; a TSA that is down delays its token, never archiving.

use std::path::Path;
use std::sync::atomic::Ordering;

use crate::common::{archivable, env};
use crate::local_tsa::{LocalTsa, make_ca, openssl};
use crate::tamper::{lrvault, make_writable};

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
        lrvault::sim::SimConfig {
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
    // Archiving never asks the TSA; verify asks once, keeps the checkpoint and exits 0.
    e.run_ok(&["discover"]);
    e.run_ok(&["archive"]);
    let expected = archivable(&e.sim.sim, &e.tenant_id()).len() as i64;
    assert_eq!(e.count("SELECT count(*) FROM evidence"), expected);
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
