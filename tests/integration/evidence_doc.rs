//! Issue 8: the examiner's steps in docs/evidence-format.md ("Checking a package's anchors by
//! hand") are run literally, extracted from the file, against an archive whose checkpoint was
//! stamped by OpenSSL's timestamp authority.

use crate::doc_steps::{fenced, run_sh};
use crate::local_tsa::LocalTsa;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examiner_steps_of_the_evidence_format_guide_work_as_written() {
    let tsa_dir = tempfile::tempdir().unwrap();
    let tsa = LocalTsa::start(tsa_dir.path()).await;
    let e = crate::tamper::archived(71, 4, &tsa.anchor_toml()).await;
    let (out, _) = e.run_ok(&["verify"]);
    assert!(out.contains("tokens: 1 fetched"), "{out}");
    let eid: String = e
        .reader()
        .query_row(
            "SELECT evidence_id FROM evidence ORDER BY archived_at LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();

    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/evidence-format.md"
    ))
    .unwrap();
    let section = doc
        .split("### Checking a package's anchors by hand")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let steps = fenced(section, "sh");
    assert_eq!(steps.len(), 6, "{section}");
    let (store, db, ca) = (
        e.store().display().to_string(),
        e.cfg.database.path.display().to_string(),
        tsa.ca_pem.display().to_string(),
    );
    let (code, out, err) = run_sh(
        e._dir.path(),
        &steps.join("\n"),
        &[
            ("STORE", &store),
            ("DB", &db),
            ("EID", &eid),
            ("TSA_CA", &ca),
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    for expected in [
        "zip SHA-256 matches ARCHIVED seq",
        "is in the chain",
        "pins the chain's row",
        "recompute and link",
        "Verification: OK",
        "Policy OID: ",
        "Time stamp: ",
    ] {
        assert!(out.contains(expected), "{expected:?} in:\n{out}");
    }
}
