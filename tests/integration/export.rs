//! Issue 8: `lrvault export` hands an examiner a kit they can check with standard tools. The
//! kit's own README is run literally; then the kit is tampered with and the same checks fail.

use crate::common::files_under;
use crate::doc_steps::{fenced, run_sh};
use crate::local_tsa::LocalTsa;
use crate::tamper::{archived, lrvault, make_writable};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_kit_checks_out_with_standard_tools_and_is_recorded_in_custody() {
    let tsa_dir = tempfile::tempdir().unwrap();
    let tsa = LocalTsa::start(tsa_dir.path()).await;
    let e = archived(33, 6, &tsa.anchor_toml()).await;
    // No verify yet: export writes the covering checkpoint itself (verify --chain-only).
    let (action, packages): (String, i64) = e
        .reader()
        .query_row(
            "SELECT action_id, count(*) FROM evidence GROUP BY action_id ORDER BY count(*) DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(packages >= 2);
    let kit = e._dir.path().join("kit");
    let kit_arg = kit.to_str().unwrap();
    let (out, _) = e.run_ok(&[
        "export",
        "--action",
        &action,
        "--out",
        kit_arg,
        "--recipient",
        "Dr. Examiner, Court 4",
    ]);
    assert!(
        out.contains(&format!("exported {packages} packages")),
        "{out}"
    );
    assert!(out.contains("with its RFC 3161 token"), "{out}");

    let files: Vec<String> = files_under(&kit)
        .iter()
        .map(|p| p.strip_prefix(&kit).unwrap().display().to_string())
        .collect();
    let zips = files.iter().filter(|f| f.ends_with(".zip")).count() as i64;
    assert_eq!(zips, packages, "{files:?}");
    for expected in [
        "README.md",
        "SHA256SUMS",
        "custody.db",
        "check_custody.py",
        "tsa-ca.pem",
    ] {
        assert!(
            files.contains(&expected.to_string()),
            "{expected} in {files:?}"
        );
    }
    assert_eq!(
        files
            .iter()
            .filter(|f| f.starts_with("checkpoints/") && f.ends_with(".tsr"))
            .count(),
        1
    );

    // The README's steps, literally.
    let readme = std::fs::read_to_string(kit.join("README.md")).unwrap();
    let steps = fenced(&readme, "sh");
    assert_eq!(steps.len(), 6, "{readme}");
    let root = tsa.ca_pem.display().to_string();
    let (code, out, err) = run_sh(&kit, &steps.join("\n"), &[("TSA_ROOT", &root)]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("Verification: OK"), "{out}");
    assert!(
        out.contains(&format!("{packages} packages match their ARCHIVED rows")),
        "{out}"
    );
    assert_eq!(out.matches("|1|1|").count() as i64, packages, "{out}");
    assert!(!out.contains("FAILED"), "{out}");

    // Recorded: one EXPORTED row per package, naming the kit and the recipient.
    let sums = crate::tamper::file_sha256(&kit.join("SHA256SUMS"));
    assert_eq!(
        e.count(&format!(
            "SELECT count(*) FROM custody_log WHERE event = 'EXPORTED' AND action_id = '{action}'
               AND json_extract(detail, '$.recipient') = 'Dr. Examiner, Court 4'
               AND json_extract(detail, '$.sha256sums') = '{sums}'
               AND json_extract(detail, '$.out') = '{kit_arg}'"
        )),
        packages
    );
    lrvault::verify::verify(&e.cfg, &e.ctx.db, None, None, false)
        .await
        .map(|r| assert!(r.ok(), "{r:?}"))
        .unwrap();

    // A kit is never written over; an empty selection exports nothing.
    let (code, _, err) = lrvault(
        &e.config_path,
        &["export", "--action", &action, "--out", kit_arg],
    );
    assert_eq!(code, 2, "{err}");
    assert_eq!(
        err.trim_end(),
        format!("lrvault: --out {kit_arg} already exists; an export creates a new directory")
    );
    let (code, _, err) = lrvault(
        &e.config_path,
        &[
            "export",
            "--evidence",
            "no-such-id",
            "--out",
            e._dir.path().join("none").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no archived evidence matches"), "{err}");

    // Tampering inside the kit: the same steps fail.
    make_writable(&kit);
    let db = rusqlite::Connection::open(kit.join("custody.db")).unwrap();
    db.execute(
        "UPDATE custody_log SET actor = 'someone' WHERE seq = (SELECT min(seq) FROM custody_log)",
        [],
    )
    .unwrap();
    drop(db);
    let (code, out, _) = run_sh(&kit, "python3 check_custody.py", &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("does not recompute"), "{out}");
    let (code, _, _) = run_sh(&kit, &steps[0], &[]);
    assert_ne!(code, 0, "sha256sum -c notices the changed custody.db");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_by_window_without_a_tsa_says_so_and_still_checks_out() {
    let e = archived(34, 5, "").await;
    let kit = e._dir.path().join("window-kit");
    let (out, _) = e.run_ok(&["export", "--since", "30d", "--out", kit.to_str().unwrap()]);
    let all = e.count("SELECT count(*) FROM evidence");
    assert!(out.contains(&format!("exported {all} packages")), "{out}");
    assert!(out.contains("no token yet"), "{out}");
    let readme = std::fs::read_to_string(kit.join("README.md")).unwrap();
    assert!(
        readme.contains("No RFC 3161 token was available"),
        "{readme}"
    );
    let (code, out, err) = run_sh(&kit, &fenced(&readme, "sh").join("\n"), &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains(&format!("{all} packages match their ARCHIVED rows")),
        "{out}"
    );
}

/// The selection an export settles on once it has counted its packages: a package whose
/// ARCHIVED row comes later (archived while the kit is written) is not in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_selection_leaves_out_packages_archived_after_it() {
    let e = archived(33, 6, "").await;
    let conn = e.reader();
    let seqs: Vec<i64> = conn
        .prepare("SELECT seq FROM custody_log WHERE event = 'ARCHIVED' ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(seqs.len() >= 3, "{seqs:?}");
    let count = |sel: &lrvault::export::Selection| -> i64 {
        conn.query_row(
            &format!(
                "SELECT count(*) FROM v_evidence e WHERE {}",
                lrvault::export::Selection::FILTER
            ),
            rusqlite::params_from_iter(sel.params()),
            |r| r.get(0),
        )
        .unwrap()
    };
    let open = lrvault::export::Selection::default();
    assert_eq!(count(&open), seqs.len() as i64);
    let settled = lrvault::export::Selection {
        archived_through: Some(seqs[1]),
        ..Default::default()
    };
    assert_eq!(count(&settled), 2, "the first two ARCHIVED rows only");
}
