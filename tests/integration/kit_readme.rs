//! Issue 16: the examiner's kit is checkable on its own. The archive is stamped by the
//! timestamp authority that docs/evidence-format.md tells a reader how to run (OpenSSL's, made
//! and served by the document's own commands and script); a kit is exported from it; then,
//! literally from the Markdown, with the TSA's root taken from outside the kit: the kit's
//! README, the section 9 steps by hand on the kit, and docs/audit.md section 5's chain script
//! on the kit's segment. Kits exported from databases whose evidence or action rows were
//! edited fail their own check, naming the evidence; an exported path that leaves the kit
//! stops the export, naming the evidence, and leaves nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::{Env, files_under, wait_until};
use crate::doc_steps::{fenced, run_sh};
use crate::tamper::lrvault;

fn doc(name: &str) -> String {
    std::fs::read_to_string(format!("{}/docs/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The text of `doc` from `heading` to the next heading of the same or a higher level.
fn section(doc: &str, heading: &str) -> String {
    let level = heading.split(' ').next().unwrap();
    let body = doc.split(heading).nth(1).unwrap();
    let mut end = body.len();
    for marker in ["\n## ", "\n### "]
        .iter()
        .filter(|m| m.len() <= level.len() + 2)
    {
        end = end.min(body.find(*marker).unwrap_or(body.len()));
    }
    body[..end].to_string()
}

/// docs/evidence-format.md's test TSA: made by its commands in `dir`, served by its script.
struct DocTsa {
    dir: tempfile::TempDir,
    port: u16,
    child: std::process::Child,
}

impl DocTsa {
    async fn start() -> DocTsa {
        let text = section(
            &doc("evidence-format.md"),
            "### A timestamp authority of your own, for testing",
        );
        let dir = tempfile::tempdir().unwrap();
        let steps = fenced(&text, "sh");
        assert_eq!(steps.len(), 2, "{text}");
        let (code, out, err) = run_sh(dir.path(), &steps.join("\n"), &[]);
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("Verification: OK"), "{out}");
        assert!(out.contains("Time stamp: "), "{out}");
        std::fs::write(dir.path().join("tsa.py"), &fenced(&text, "python")[0]).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("python3")
            .args(["tsa.py", &port.to_string()])
            .current_dir(dir.path())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let up = wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await;
        assert!(up, "the document's TSA script did not start listening");
        DocTsa { dir, port, child }
    }

    /// The root certificate, outside any kit.
    fn root(&self) -> PathBuf {
        self.dir.path().join("root.pem")
    }

    fn anchor_toml(&self) -> String {
        format!(
            "[anchor]\ntsa_url = \"http://127.0.0.1:{}/\"\ntsa_ca_file = \"{}\"\n",
            self.port,
            self.root().display()
        )
    }
}

impl Drop for DocTsa {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Runs `sql` on the live database as an insider would: every trigger dropped first, and put
/// back exactly as it was afterwards (so a rollback leaves the schema as the migrations made it).
fn forge(db: &Path, sql: &str) {
    crate::tamper::with_triggers_put_back(db, |c| c.execute_batch(sql).unwrap());
}

/// Exports `--evidence eid` into a new directory `name`; returns its path.
fn export_one(e: &Env, eid: &str, name: &str) -> PathBuf {
    let kit = e._dir.path().join(name);
    e.run_ok(&["export", "--evidence", eid, "--out", kit.to_str().unwrap()]);
    kit
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_readme_and_the_documented_steps_check_a_kit_with_standard_tools_only() {
    let tsa = DocTsa::start().await;
    let e = crate::tamper::archived(33, 6, &tsa.anchor_toml()).await;
    let (eid, path, packages): (String, String, i64) = e
        .reader()
        .query_row(
            "SELECT evidence_id, package_path, (SELECT count(*) FROM evidence) FROM evidence
             WHERE original_sha256 IS NOT NULL ORDER BY package_path LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let kit = e._dir.path().join("kit");
    let (out, _) = e.run_ok(&["export", "--since", "30d", "--out", kit.to_str().unwrap()]);
    assert!(
        out.contains(&format!("exported {packages} packages")),
        "{out}"
    );
    assert!(out.contains("with its RFC 3161 token"), "{out}");

    // Made private: directories 0700, packages 0440, every other file 0600.
    assert_eq!(mode(&kit), 0o700);
    for file in files_under(&kit) {
        let want = if file.extension().is_some_and(|x| x == "zip") {
            0o440
        } else {
            0o600
        };
        assert_eq!(mode(&file), want, "{}", file.display());
        let mut dir = file.parent().unwrap();
        while dir != kit {
            assert_eq!(mode(dir), 0o700, "{}", dir.display());
            dir = dir.parent().unwrap();
        }
    }
    let beside: Vec<String> = std::fs::read_dir(e._dir.path())
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(beside.is_empty(), "{beside:?}");

    // The README, literally, with the TSA's root from outside the kit.
    let root = tsa.root().display().to_string();
    let readme = std::fs::read_to_string(kit.join("README.md")).unwrap();
    let steps = fenced(&readme, "sh");
    assert_eq!(steps.len(), 6, "{readme}");
    let (code, out, err) = run_sh(&kit, &steps.join("\n"), &[("TSA_ROOT", &root)]);
    assert_eq!(code, 0, "{out}\n{err}");
    for expected in [
        "Verification: OK",
        "genTime: ",
        "the checkpoint's at 20",
        &format!("{packages} packages match their ARCHIVED rows, their DISCOVERED rows"),
        "custody_head seq ",
        "the decompressed payload matches original_sha256 and original_size",
        &format!("evidence {eid}: packages/{path}"),
    ] {
        assert!(out.contains(expected), "{expected:?} in:\n{out}");
    }
    assert!(
        !out.contains("FAILED") && !out.contains("RESTORED"),
        "{out}"
    );
    assert_eq!(out.matches("|1|1|").count() as i64, packages, "{out}");
    // A genTime before the checkpoint and the packages it covers is refused.
    let (code, out, _) = run_sh(
        &kit,
        "python3 check_custody.py --gen-time 'Jan  1 00:00:00 2020 GMT'",
        &[],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "the token's genTime Jan  1 00:00:00 2020 GMT is earlier than the checkpoint's at"
        ),
        "{out}"
    );
    assert_eq!(
        out.matches("the token's genTime Jan  1 00:00:00 2020 GMT is earlier than ARCHIVED seq")
            .count() as i64,
        packages,
        "{out}"
    );
    // Without a root of one's own, the token step stops and says why.
    let (code, _, err) = run_sh(&kit, &steps[1], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("set TSA_ROOT to the TSA root certificate you obtained yourself"),
        "{err}"
    );

    // docs/evidence-format.md section 9 by hand, on the kit.
    let by_hand = section(
        &doc("evidence-format.md"),
        "### Checking a package's anchors by hand",
    );
    let env = [
        ("DB", "custody.db"),
        ("STORE", "packages"),
        ("ANCHORS", "."),
        ("EID", eid.as_str()),
        ("TSA_CA", root.as_str()),
    ];
    let (code, out, err) = run_sh(&kit, &fenced(&by_hand, "sh").join("\n"), &env);
    assert_eq!(code, 0, "{out}\n{err}");
    for expected in [
        "zip SHA-256 matches ARCHIVED seq",
        "is in the chain",
        "pins the chain's row",
        "recompute and link",
        "Verification: OK",
    ] {
        assert!(out.contains(expected), "{expected:?} in:\n{out}");
    }

    // docs/audit.md section 5's script: on the kit's segment, and on the whole chain.
    let script = e._dir.path().join("check_chain.py");
    let chain_doc = section(
        &doc("audit.md"),
        "## 5. Re-checking the custody chain yourself",
    );
    std::fs::write(&script, &fenced(&chain_doc, "python")[0]).unwrap();
    let last_discovered: String = e
        .reader()
        .query_row(
            "SELECT e.evidence_id FROM evidence e JOIN custody_log c
             ON c.event = 'DISCOVERED' AND c.action_id = e.action_id ORDER BY c.seq DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let segment = export_one(&e, &last_discovered, "kit-segment");
    let first: i64 = rusqlite::Connection::open(segment.join("custody.db"))
        .unwrap()
        .query_row("SELECT min(seq) FROM custody_log", [], |r| r.get(0))
        .unwrap();
    assert!(first > 1, "the kit holds a segment");
    let before: String = e
        .reader()
        .query_row(
            "SELECT row_hash FROM custody_log WHERE seq = ?1",
            [first - 1],
            |r| r.get(0),
        )
        .unwrap();
    let chain = |args: &[&str]| {
        let out = std::process::Command::new("python3")
            .arg(&script)
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap(), text)
    };
    let db = segment.join("custody.db");
    let (code, text) = chain(&[db.to_str().unwrap(), &before]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.starts_with(&format!("custody segment OK: seq {first}..")),
        "{text}"
    );
    assert!(text.contains("(as given)"), "{text}");
    let (code, text) = chain(&[db.to_str().unwrap(), &"0".repeat(64)]);
    assert_eq!(
        (code, text.trim()),
        (1, &*format!("custody chain broken at seq {first}"))
    );
    let (code, text) = chain(&[e.cfg.database.path.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with("custody chain OK: "), "{text}");

    // An evidence row and an action row edited in the database: the kits exported from it
    // fail their own check, naming the evidence; rolled back, a new kit checks out.
    let genuine: String = e
        .reader()
        .query_row(
            "SELECT original_sha256 FROM evidence WHERE evidence_id = ?1",
            [&eid],
            |r| r.get(0),
        )
        .unwrap();
    let forged = "0".repeat(64);
    let db = e.cfg.database.path.clone();
    forge(
        &db,
        &format!("UPDATE evidence SET original_sha256 = '{forged}' WHERE evidence_id = '{eid}'"),
    );
    let bad = export_one(&e, &eid, "kit-forged-original");
    let (code, out, _) = run_readme(&bad, &root);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "evidence {eid} ({path}): original_sha256 is '{forged}', retrieval.json says '{genuine}'"
        )),
        "{out}"
    );
    forge(
        &db,
        &format!("UPDATE evidence SET original_sha256 = '{genuine}' WHERE evidence_id = '{eid}'"),
    );

    let (action, requestor): (String, String) = e
        .reader()
        .query_row(
            "SELECT action_id, requestor FROM v_evidence WHERE evidence_id = ?1",
            [&eid],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let set_requestor =
        |who: &str| format!("UPDATE actions SET requestor = '{who}' WHERE action_id = '{action}'");
    forge(&db, &set_requestor("mallory@example.com"));
    let bad = export_one(&e, &eid, "kit-forged-requestor");
    let (code, out, _) = run_sh(&bad, "python3 check_custody.py", &[]);
    assert_eq!(code, 1, "{out}");
    let discovered: i64 = e.count(&format!(
        "SELECT seq FROM custody_log WHERE event = 'DISCOVERED' AND action_id = '{action}'"
    ));
    for expected in [
        format!(
            "evidence {eid} ({path}): requestor is 'mallory@example.com', DISCOVERED seq {discovered} says '{requestor}'"
        ),
        format!(
            "evidence {eid} ({path}): requestor is 'mallory@example.com', bag-info.txt says '{requestor}'"
        ),
        format!(
            "evidence {eid} ({path}): requestor is 'mallory@example.com', machine-action.json says '{requestor}'"
        ),
    ] {
        assert!(out.contains(&expected), "{expected:?} in:\n{out}");
    }
    forge(&db, &set_requestor(&requestor));

    let good = export_one(&e, &eid, "kit-rolled-back");
    let (code, out, err) = run_readme(&good, &root);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("1 packages match their ARCHIVED rows"),
        "{out}"
    );
    e.run_ok(&["verify"]);
}

/// Every command of `kit`'s README, in one bash session, with `TSA_ROOT` = `root`.
fn run_readme(kit: &Path, root: &str) -> (i32, String, String) {
    let readme = std::fs::read_to_string(kit.join("README.md")).unwrap();
    run_sh(
        kit,
        &fenced(&readme, "sh").join("\n"),
        &[("TSA_ROOT", root)],
    )
}

/// A package path in the database that would leave the kit (`../../x`), and one that runs
/// through a symlink in the store: the export stops, naming the evidence, writes nothing
/// anywhere and leaves no directory; `--out` that exists in any form is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_leaves_the_kit_stops_the_export_and_leaves_nothing() {
    let e = crate::tamper::archived(35, 3, "").await;
    e.run_ok(&["verify"]);
    let dir = e._dir.path().to_path_buf();
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let (eid, path, archived_seq): (String, String, i64) = e
        .reader()
        .query_row(
            "SELECT e.evidence_id, e.package_path, c.seq FROM evidence e JOIN custody_log c
             ON c.event = 'ARCHIVED' AND c.package_path = e.package_path ORDER BY e.package_path LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let db = e.cfg.database.path.clone();
    let set_path = |to: &str, from: &str| {
        format!(
            "UPDATE evidence SET package_path = '{to}' WHERE evidence_id = '{eid}';
             UPDATE custody_log SET package_path = '{to}' WHERE seq = {archived_seq} AND package_path = '{from}';"
        )
    };
    let before = listing();
    forge(&db, &set_path("../../x", &path));
    let out = dir.join("kit");
    let (code, _, err) = lrvault(
        &e.config_path,
        &["export", "--evidence", &eid, "--out", out.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "lrvault: evidence {eid}: '../../x' is not a valid path in a kit or store: invalid store key '../../x': \
             must be a relative path without empty, '.' or '..' segments; nothing exported — run `lrvault verify`"
        )
    );
    assert_eq!(listing(), before, "nothing left beside --out");
    // `packages/../../x` from the kit's directory beside --out would have been `dir/x`.
    assert!(!dir.join("x").exists());
    let (code, _, err) = lrvault(&e.config_path, &["verify"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&format!("seq {archived_seq}")), "{err}");
    forge(&db, &set_path(&path, "../../x"));
    e.run_ok(&["verify"]);

    // A symlink in the store on the package's path: never followed.
    let year = e
        .store()
        .join(path.split('/').take(2).collect::<Vec<_>>().join("/"));
    let moved = e.store().join("moved-year");
    std::fs::rename(&year, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &year).unwrap();
    let (code, _, err) = lrvault(
        &e.config_path,
        &["export", "--evidence", &eid, "--out", out.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "lrvault: evidence {eid}: opening {}",
            e.store().join(&path).display()
        )),
        "{err}"
    );
    assert!(err.contains("Not a directory"), "{err}");
    assert_eq!(listing(), before);
    std::fs::remove_file(&year).unwrap();
    std::fs::rename(&moved, &year).unwrap();

    // --out that exists, as an empty directory or a symlink to one: refused, untouched.
    let target = dir.join("target");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::symlink(&target, dir.join("link")).unwrap();
    for name in ["target", "link"] {
        let out = dir.join(name);
        let (code, _, err) = lrvault(
            &e.config_path,
            &["export", "--evidence", &eid, "--out", out.to_str().unwrap()],
        );
        assert_eq!(code, 2, "{err}");
        assert_eq!(
            err.trim_end(),
            format!(
                "lrvault: --out {} already exists; an export creates a new directory",
                out.display()
            )
        );
    }
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
    let kit = export_one(&e, &eid, "kit");
    let (code, out, _) = run_sh(&kit, "python3 check_custody.py", &[]);
    assert_eq!(code, 0, "{out}");
}
