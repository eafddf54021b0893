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

/// The legal hold status moto gives one version (`None`: it has never had one).
async fn legal_hold(s3: &aws_sdk_s3::Client, key: &str, version: &str) -> Option<String> {
    s3.get_object_legal_hold()
        .bucket("held")
        .key(key)
        .version_id(version)
        .send()
        .await
        .ok()
        .and_then(|h| {
            h.legal_hold()
                .and_then(|l| l.status())
                .map(|s| s.as_str().to_string())
        })
}

/// Every (key, version) of case INC-7 in the bucket: its packages and, for each, the first
/// checkpoint at or after its ARCHIVED row.
async fn case_objects(e: &Env, s3: &aws_sdk_s3::Client) -> Vec<(String, String)> {
    let mut keys = BTreeSet::new();
    {
        let c = e.reader();
        let anchors: Vec<(i64, String)> = c
            .prepare("SELECT seq, checkpoint_path FROM anchors ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let mut stmt = c
            .prepare(
                "SELECT v.package_path, c.seq FROM v_case_evidence v
                 JOIN custody_log c ON c.event = 'ARCHIVED' AND c.package_path = v.package_path
                 WHERE v.case_id = 'INC-7'",
            )
            .unwrap();
        let packages = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .unwrap()
            .map(Result::unwrap);
        for (path, archived) in packages {
            keys.insert(path);
            if let Some((_, cp)) = anchors.iter().find(|(seq, _)| *seq >= archived) {
                keys.insert(cp.clone());
            }
        }
    }
    let mut objects = Vec::new();
    for key in keys {
        let key = format!("lrvault/{key}");
        for (version, _) in crate::object_stores::versions(s3, "held", &key).await {
            objects.push((key.clone(), version));
        }
    }
    objects
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s3_a_held_case_survives_a_shortened_retention_new_packages_are_held_and_release_lifts_it()
 {
    use crate::object_stores::{create_bucket, moto, s3_client, s3_credentials};
    use crate::store_pipeline::{lrvault_s3, object_env, s3_keys};
    let moto = moto().await;
    let s3 = s3_client(&moto);
    // GOVERNANCE, so the test can shorten a retention (as a privileged user could).
    create_bucket(&s3, "held", Some(("GOVERNANCE", 1))).await;
    let sim = SimConfig {
        seed: 5,
        actions: 6,
        comments: vec!["Sentinel Incident INC-7: collect".into()],
        ..SimConfig::default()
    };
    let keys = s3_keys(&moto, "held", "require_worm = false\n");
    let e = object_env(sim, keys, "", s3_credentials).await;
    let run = |args: &[&str]| {
        let (code, out, err) = crate::cli::run(lrvault_s3(&e).args(args));
        assert_eq!(code, 0, "{args:?}: {out}\n{err}");
        out
    };
    run(&["discover"]);
    run(&["archive", "--max", "2"]);
    run(&["verify"]);
    let out = run(&["case", "hold", "INC-7"]);
    let held = case_objects(&e, &s3).await;
    assert_eq!(held.len(), 3, "two packages and their checkpoint: {held:?}");
    let seq = e.count("SELECT max(seq) FROM custody_log WHERE event = 'LEGAL_HOLD_SET'");
    assert_eq!(
        out,
        format!(
            "case INC-7: legal hold set on 3 versions of 3 objects in s3://held/lrvault/; recorded as LEGAL_HOLD_SET seq {seq}\n"
        )
    );
    for (key, version) in &held {
        assert_eq!(
            legal_hold(&s3, key, version).await.as_deref(),
            Some("ON"),
            "{key}"
        );
    }

    // Archived into the held case: held as it is published, and the ARCHIVED row says so.
    run(&["archive"]);
    let total = e.count("SELECT count(*) FROM evidence");
    assert!(total > 3, "{total}");
    assert_eq!(
        e.count("SELECT count(*) FROM custody_log WHERE event = 'ARCHIVED'
                 AND json_extract(detail, '$.legal_hold.cases[0]') = 'INC-7'
                 AND json_extract(detail, '$.legal_hold.versions[0]') = json_extract(detail, '$.version_id')"),
        total - 2
    );
    let all = case_objects(&e, &s3).await;
    assert_eq!(
        all.len() as i64,
        total + 2,
        "the packages and two checkpoints: {all:?}"
    );
    for (key, version) in &all {
        assert_eq!(
            legal_hold(&s3, key, version).await.as_deref(),
            Some("ON"),
            "{key}"
        );
    }

    // A shortened retention does not free a held version: the delete is refused.
    let (key, version) = &held[0];
    let soon = aws_sdk_s3::primitives::DateTime::from_secs(
        (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60) as i64,
    );
    let retention = aws_sdk_s3::types::ObjectLockRetention::builder()
        .mode(aws_sdk_s3::types::ObjectLockRetentionMode::Governance)
        .retain_until_date(soon)
        .build();
    s3.put_object_retention()
        .bucket("held")
        .key(key)
        .version_id(version)
        .retention(retention)
        .bypass_governance_retention(true)
        .send()
        .await
        .unwrap();
    let delete = |key: String, version: String| {
        let s3 = s3.clone();
        async move {
            s3.delete_object()
                .bucket("held")
                .key(key)
                .version_id(version)
                .bypass_governance_retention(true)
                .send()
                .await
        }
    };
    let refused = delete(key.clone(), version.clone()).await.unwrap_err();
    assert_eq!(
        refused.into_service_error().meta().code(),
        Some("AccessDenied"),
    );
    assert_eq!(case_objects(&e, &s3).await, all, "nothing was deleted");

    // Released: moto shows no hold on any of the case's versions, and the retention alone
    // (bypassable in GOVERNANCE) no longer stops the delete.
    let out = run(&["case", "release", "INC-7"]);
    let seq = e.count("SELECT max(seq) FROM custody_log WHERE event = 'LEGAL_HOLD_RELEASED'");
    assert_eq!(
        out,
        format!(
            "case INC-7: legal hold released on {n} versions of {n} objects in s3://held/lrvault/; recorded as LEGAL_HOLD_RELEASED seq {seq}\n",
            n = all.len()
        )
    );
    for (key, version) in &all {
        assert_eq!(
            legal_hold(&s3, key, version).await.as_deref(),
            Some("OFF"),
            "{key}"
        );
    }
    if let Err(e) = delete(key.clone(), version.clone()).await {
        panic!("{:?}", e.into_service_error());
    }
}
