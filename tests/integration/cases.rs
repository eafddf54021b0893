//! Issue 23: evidence belongs to a case. The simulator's responders name cases in their
//! comments; discovery tags the actions (`case_pattern`), an operator tags and untags by hand,
//! and `case list`, `audit evidence --case` and `export --case` show exactly the case's
//! packages; a membership edited behind the chain's back fails `verify`. On moto with Object
//! Lock, `case hold` puts a legal hold on every version, a package archived into a held case is
//! held at once, and `case release` lifts it.

use std::collections::BTreeSet;

use lrvault_sim::SimConfig;
use serde_json::Value;

use crate::common::{Env, env, files_under};
use crate::tamper::lrvault;

/// Comments the simulator gives its live-response actions in turn.
const COMMENTS: [&str; 3] = [
    "Sentinel Incident inc-4711: triage collection",
    "Autoruns sweep",
    "INC-4711 and IR#12 memory follow-up",
];

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The evidence ids of the archived packages of actions whose comment is one of `comments`.
fn evidence_with_comment(e: &Env, comments: &[&str]) -> BTreeSet<String> {
    let c = e.reader();
    let mut stmt = c
        .prepare("SELECT evidence_id, requestor_comment FROM v_evidence")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .filter(|(_, comment)| comments.contains(&comment.as_str()))
        .map(|(id, _)| id)
        .collect()
}

fn case_members(e: &Env, case: &str) -> BTreeSet<String> {
    let c = e.reader();
    let mut stmt = c
        .prepare("SELECT evidence_id FROM v_case_evidence WHERE case_id = ?1")
        .unwrap();
    stmt.query_map([case], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// The evidence ids `audit evidence --case CASE` prints.
fn audited(e: &Env, case: &str) -> BTreeSet<String> {
    let (out, _) = e.run_ok(&["audit", "evidence", "--case", case, "--format", "json"]);
    json_of(&out)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["evidence_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cases_from_comments_and_by_hand_scope_audit_export_and_verify() {
    let sim = SimConfig {
        seed: 23,
        actions: 9,
        comments: COMMENTS.iter().map(|c| c.to_string()).collect(),
        ..SimConfig::default()
    };
    let e = env(sim, "").await;
    e.discover().await;
    e.archive().await;

    // Discovery tagged every action whose comment names a case, once per case.
    let inc = evidence_with_comment(&e, &[COMMENTS[0], COMMENTS[2]]);
    let ir = evidence_with_comment(&e, &[COMMENTS[2]]);
    assert!(inc.len() > ir.len() && !ir.is_empty(), "{inc:?} {ir:?}");
    assert_eq!(case_members(&e, "INC-4711"), inc);
    assert_eq!(case_members(&e, "IR#12"), ir);
    let tagged_actions = e.count(
        "SELECT count(*) FROM actions WHERE requestor_comment IN
           ('Sentinel Incident inc-4711: triage collection', 'INC-4711 and IR#12 memory follow-up')",
    ) + e.count("SELECT count(*) FROM actions WHERE requestor_comment = 'INC-4711 and IR#12 memory follow-up'");
    assert_eq!(
        e.count("SELECT count(*) FROM custody_log WHERE event = 'CASE_TAGGED' AND json_extract(detail, '$.by') = 'pattern'"),
        tagged_actions
    );
    assert_eq!(
        e.count(
            "SELECT count(*) FROM custody_log c JOIN custody_log d ON d.seq = c.seq - 1
                 WHERE c.event = 'CASE_TAGGED' AND d.event NOT IN ('DISCOVERED', 'CASE_TAGGED')"
        ),
        0,
        "each pattern tag follows its action's DISCOVERED row, in its transaction"
    );

    let (out, _) = e.run_ok(&["case", "list", "--format", "json"]);
    let list = json_of(&out);
    let cases: Vec<(&str, i64)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["case_id"].as_str().unwrap(),
                c["packages"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        cases,
        vec![("INC-4711", inc.len() as i64), ("IR#12", ir.len() as i64)]
    );
    assert_eq!(audited(&e, "inc-4711"), inc, "the case id is upper-cased");

    // By hand: a package of an untagged action joins IR#12; an action leaves INC-4711.
    let extra = evidence_with_comment(&e, &[COMMENTS[1]])
        .into_iter()
        .next()
        .unwrap();
    let (out, _) = e.run_ok(&[
        "case",
        "tag",
        "IR#12",
        "--evidence",
        &extra,
        "--note",
        "same host",
    ]);
    let seq = e.count("SELECT max(seq) FROM custody_log");
    assert_eq!(
        out,
        format!("case IR#12: 1 tagged (package {extra} (seq {seq}))\n")
    );
    let row: (String, String, String) = e
        .reader()
        .query_row(
            "SELECT json_extract(detail, '$.case'), json_extract(detail, '$.note'), json_extract(detail, '$.by')
             FROM custody_log WHERE seq = ?1 AND event = 'CASE_TAGGED'",
            [seq],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        row,
        (
            "IR#12".into(),
            "same host".into(),
            lrvault::access::process_user()
        )
    );
    let mut ir_now = ir.clone();
    ir_now.insert(extra.clone());
    assert_eq!(case_members(&e, "IR#12"), ir_now);
    assert_eq!(audited(&e, "IR#12"), ir_now);

    let leaving: String = e
        .reader()
        .query_row(
            "SELECT action_id FROM actions WHERE requestor_comment = ?1 ORDER BY action_id LIMIT 1",
            [COMMENTS[0]],
            |r| r.get(0),
        )
        .unwrap();
    let left: BTreeSet<String> = e
        .reader()
        .prepare("SELECT evidence_id FROM evidence WHERE action_id = ?1")
        .unwrap()
        .query_map([&leaving], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    e.run_ok(&["case", "untag", "INC-4711", "--action", &leaving]);
    let inc_now: BTreeSet<String> = inc.difference(&left).cloned().collect();
    assert_eq!(case_members(&e, "INC-4711"), inc_now);
    assert_eq!(audited(&e, "INC-4711"), inc_now);

    // Unknown ids: exit 1, one line, nothing written.
    let rows = e.count("SELECT count(*) FROM custody_log");
    let (code, out, err) = lrvault(
        &e.config_path,
        &[
            "case",
            "tag",
            "INC-4711",
            "--evidence",
            &extra,
            "--action",
            "no-such-action",
        ],
    );
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert_eq!(
        err,
        "lrvault: case INC-4711: unknown action no-such-action; nothing written\n"
    );
    assert_eq!(e.count("SELECT count(*) FROM custody_log"), rows);

    // The kit of a case holds exactly its packages and names the case.
    e.run_ok(&["verify"]);
    let kit = e._dir.path().join("kit");
    let (out, _) = e.run_ok(&[
        "export",
        "--case",
        "inc-4711",
        "--out",
        kit.to_str().unwrap(),
    ]);
    assert!(
        out.starts_with(&format!("exported {} packages", inc_now.len())),
        "{out}"
    );
    let paths: BTreeSet<String> = e
        .reader()
        .prepare("SELECT package_path FROM v_case_evidence WHERE case_id = 'INC-4711'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let zips: BTreeSet<String> = files_under(&kit.join("packages"))
        .iter()
        .map(|p| {
            p.strip_prefix(kit.join("packages"))
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(zips, paths);
    let readme = std::fs::read_to_string(kit.join("README.md")).unwrap();
    assert!(readme.contains("Selection: `--case inc-4711`."), "{readme}");
    assert!(
        readme.contains("This kit was made for case `INC-4711`"),
        "{readme}"
    );

    // On fs a hold is recorded, and `case show` says the store does not enforce it.
    let (out, _) = e.run_ok(&["case", "hold", "INC-4711"]);
    let seq = e.count("SELECT max(seq) FROM custody_log");
    let objects = e.count(&format!(
        "SELECT json_array_length(detail, '$.objects') FROM custody_log WHERE seq = {seq} AND event = 'LEGAL_HOLD_SET'"
    ));
    assert_eq!(
        objects as usize,
        inc_now.len() + 1,
        "its packages and their checkpoint"
    );
    assert_eq!(
        out,
        format!(
            "case INC-4711: legal hold recorded for {objects} objects, recorded as LEGAL_HOLD_SET seq {seq}; NOT enforced: the store {} has no legal hold\n",
            e.store().display()
        )
    );
    let (out, _) = e.run_ok(&["case", "show", "INC-4711"]);
    assert!(
        out.contains(&format!(
            "\nlegal hold: recorded, NOT enforced: the store {} has no legal hold; only the custody log records it\n",
            e.store().display()
        )),
        "{out}"
    );
    let (out, _) = e.run_ok(&["case", "show", "INC-4711", "--format", "json"]);
    let show = json_of(&out);
    assert_eq!(show["case"]["packages"], inc_now.len() as i64);
    assert_eq!(show["case"]["legal_hold"], 1);
    assert_eq!(show["legal_hold"]["enforced_by_store"], false);
    assert_eq!(show["packages"].as_array().unwrap().len(), inc_now.len());
    e.run_ok(&["verify"]);

    // A membership edited behind the chain's back: verify exits 3 naming the case and row.
    let untag_seq = e.count("SELECT max(seq) FROM custody_log WHERE event = 'CASE_UNTAGGED'");
    let tenant = e.cfg.tenants[0].name.clone();
    let db = rusqlite::Connection::open(&e.cfg.database.path).unwrap();
    db.execute(
        "UPDATE case_marks SET tagged = 1 WHERE seq = ?1",
        [untag_seq],
    )
    .unwrap();
    drop(db);
    assert_eq!(
        case_members(&e, "INC-4711"),
        inc,
        "the forged table puts the action back"
    );
    let (code, out, err) = lrvault(&e.config_path, &["verify"]);
    assert_eq!(code, 3, "{out}\n{err}");
    assert!(
        err.contains(&format!(
            "lrvault: defect: case INC-4711: action {leaving} (tenant {tenant}) tagged at seq {untag_seq}: in case_marks but not in the chain\n"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "lrvault: defect: case INC-4711: action {leaving} (tenant {tenant}) untagged at seq {untag_seq}: in the chain but not in case_marks\n"
        )),
        "{err}"
    );
}
