//! Issue 8: every SQL query in docs/audit.md, extracted from the file itself, runs against an
//! archive built by the simulator (verified, partly re-verified, exported, backed up) and its
//! answer is checked against what the fixture is known to hold.

use std::collections::{BTreeMap, BTreeSet};

use lrvault_sim::{Fault, SimConfig};
use rusqlite::types::Value;

use crate::common::env;
use crate::doc_steps::fenced;

type Rows = Vec<BTreeMap<String, Value>>;

/// Runs `sql`, binding each named parameter it uses from `params`.
fn run(conn: &rusqlite::Connection, sql: &str, params: &BTreeMap<&str, Value>) -> Rows {
    let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{e}\n{sql}"));
    for (name, value) in params {
        if let Some(i) = stmt.parameter_index(name).unwrap() {
            stmt.raw_bind_parameter(i, value).unwrap();
        }
    }
    let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
    let mut rows = stmt.raw_query();
    let mut out = Vec::new();
    while let Some(r) = rows.next().unwrap() {
        out.push(
            names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), r.get::<_, Value>(i).unwrap()))
                .collect(),
        );
    }
    out
}

fn text(row: &BTreeMap<String, Value>, col: &str) -> String {
    match &row[col] {
        Value::Text(t) => t.clone(),
        Value::Integer(i) => i.to_string(),
        Value::Null => "NULL".into(),
        other => format!("{other:?}"),
    }
}

fn column(rows: &Rows, col: &str) -> BTreeSet<String> {
    rows.iter().map(|r| text(r, col)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_in_the_audit_guide_answers_correctly() {
    let e = env(
        SimConfig {
            seed: 44,
            actions: 10,
            faults: vec![Fault::Gone(1), Fault::ForeignHost(2)],
            ..SimConfig::default()
        },
        "",
    )
    .await;
    e.discover().await;
    e.archive_max(5).await;
    let ids = |sql: &str| -> BTreeSet<String> {
        column(&run(&e.reader(), sql, &BTreeMap::new()), "evidence_id")
    };
    let round1 = ids("SELECT evidence_id FROM evidence");
    let first = lrvault::verify::verify(&e.cfg, &e.ctx.db, None, None, false)
        .await
        .unwrap();
    assert!(first.ok(), "{first:?}");
    // One package damaged on disk: the second run finds it.
    let (broken, broken_path): (String, String) = e
        .reader()
        .query_row(
            "SELECT evidence_id, package_path FROM evidence ORDER BY evidence_id LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    crate::tamper::make_writable(e.store().join(&broken_path).parent().unwrap());
    let mut zip = std::fs::OpenOptions::new()
        .append(true)
        .open(e.store().join(&broken_path))
        .unwrap();
    std::io::Write::write_all(&mut zip, b"appended later").unwrap();
    e.archive_max(4).await;
    let second = lrvault::verify::verify(&e.cfg, &e.ctx.db, None, None, false)
        .await
        .unwrap();
    assert_eq!(second.package_defects, 1, "{second:?}");
    e.archive().await;
    let all: BTreeSet<String> = e
        .reader()
        .prepare("SELECT evidence_id FROM evidence")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let verified_twice = {
        let c = e.reader();
        let mut stmt = c
            .prepare("SELECT evidence_id FROM evidence WHERE last_verified_at IS NOT NULL")
            .unwrap();
        stmt.query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .collect::<Result<BTreeSet<_>, _>>()
            .unwrap()
    };
    let never: BTreeSet<String> = all.difference(&verified_twice).cloned().collect();
    assert!(!never.is_empty() && !round1.is_empty());
    let exported = round1.iter().find(|id| **id != broken).unwrap().clone();
    let kit = e._dir.path().join("kit");
    e.run_ok(&[
        "export",
        "--evidence",
        &exported,
        "--out",
        kit.to_str().unwrap(),
        "--recipient",
        "Examiner A",
    ]);
    e.ctx
        .db
        .call(|c| {
            let tx = lrvault::db::write_tx(c)?;
            lrvault::custody::append(
                &tx,
                &lrvault::custody::Event::new(
                    "sim0",
                    "*",
                    None,
                    lrvault::custody::EventKind::BackedUp,
                    "me",
                )
                .detail(serde_json::json!({"sha256": "ab".repeat(32), "to": "/backup/l.db"})),
            )?;
            tx.commit().map_err(lrvault::db::DbError::sql("commit"))
        })
        .await
        .unwrap();

    // The simulator's comments name cases ("IR-1234 triage collection", "Collect event logs
    // for case 1234"): the largest case gets a recorded hold (fs: not enforced).
    let mut cases: BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    for (action, evidence, comment) in e
        .reader()
        .prepare("SELECT a.action_id, e.evidence_id, a.requestor_comment FROM actions a LEFT JOIN evidence e USING (tenant, action_id)")
        .unwrap()
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, String>(2)?)))
        .unwrap()
        .map(Result::unwrap)
    {
        let case = match (comment.strip_prefix("IR-"), comment.strip_prefix("Collect event logs for case ")) {
            (Some(rest), _) => format!("IR-{}", rest.split(' ').next().unwrap()),
            (_, Some(n)) => format!("CASE {n}"),
            _ => continue,
        };
        let entry = cases.entry(case).or_default();
        entry.0.insert(action);
        entry.1.extend(evidence);
    }
    let (case, (case_actions, case_packages)) = cases
        .iter()
        .max_by_key(|(c, (_, p))| (p.len(), std::cmp::Reverse((*c).clone())))
        .map(|(c, v)| (c.clone(), v.clone()))
        .unwrap();
    assert!(!case_packages.is_empty(), "{cases:?}");
    e.run_ok(&["case", "hold", &case]);

    // The facts the answers are checked against, read plainly.
    let conn = e.reader();
    let (machine, requestor, dns): (String, String, String) = conn
        .query_row(
            "SELECT a.machine_id, a.requestor, a.computer_dns_name FROM evidence e JOIN actions a USING (tenant, action_id)
             GROUP BY a.machine_id ORDER BY count(*) DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let since = "2000-01-01T00:00:00.000Z".to_string();
    let until = "2100-01-01T00:00:00.000Z".to_string();
    let by_machine: BTreeSet<String> = run(
        &conn,
        "SELECT e.evidence_id FROM evidence e JOIN actions a USING (tenant, action_id) WHERE a.machine_id = :m",
        &BTreeMap::from([(":m", Value::Text(machine.clone()))]),
    )
    .iter()
    .map(|r| text(r, "evidence_id"))
    .collect();
    let params: BTreeMap<&str, Value> = BTreeMap::from([
        (":machine", Value::Text(dns.clone())),
        (":since", Value::Text(since)),
        (":until", Value::Text(until)),
        (":requestor", Value::Text(requestor.clone())),
        (":days", Value::Integer(30)),
        (":evidence_id", Value::Text(exported.clone())),
        (":case", Value::Text(case.clone())),
    ]);

    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/audit.md")).unwrap();
    let queries = fenced(&doc, "sql");
    assert_eq!(queries.len(), 23, "the guide's questions");
    let answers: Vec<Rows> = queries.iter().map(|q| run(&conn, q, &params)).collect();
    let q = |n: usize| &answers[n - 1];

    assert_eq!(column(q(1), "evidence_id"), by_machine, "Q1 device");
    let results_of_requestor: i64 = conn
        .query_row(
            "SELECT count(*) FROM results r JOIN actions a USING (tenant, action_id) WHERE a.requestor = ?1",
            [&requestor],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(q(2).len() as i64, results_of_requestor, "Q2 requestor");
    let mut q3: BTreeSet<String> = never.clone();
    q3.insert(broken.clone());
    assert_eq!(
        column(q(3), "evidence_id"),
        q3,
        "Q3 never verified or failing"
    );
    assert_eq!(column(q(4), "evidence_id"), never, "Q4 not verified lately");
    let ended: BTreeMap<String, (String, String)> = q(5)
        .iter()
        .map(|r| (text(r, "state"), (text(r, "event"), text(r, "error_code"))))
        .collect();
    assert_eq!(
        ended["unavailable"],
        ("UNAVAILABLE".into(), "ResourceNotFound".into()),
        "Q5"
    );
    assert_eq!(ended["failed"].0, "FAILED", "Q5");
    assert!(
        q(5).iter()
            .any(|r| text(r, "reason").contains("evil.example.net")),
        "Q5 {:?}",
        q(5)
    );
    let expected_skipped = e
        .sim
        .sim
        .expected_results(&e.tenant_id())
        .into_iter()
        .filter(|x| {
            !x.has_result
                && !x.gone
                && ["Succeeded", "Failed", "TimeOut", "Cancelled"]
                    .contains(&x.action_status.as_str())
        })
        .count();
    assert_eq!(q(6).len(), expected_skipped, "Q6 skipped");
    assert!(
        q(6).iter().all(|r| text(r, "reason") != "NULL"),
        "Q6 reasons"
    );
    assert!(q(7).is_empty(), "Q7: nothing left waiting");
    assert_eq!(column(q(8), "evidence_id"), all, "Q8 every package");
    for r in q(8) {
        let (done, archived) = (text(r, "completed_at"), text(r, "archived_at"));
        let secs = (lrvault::time::parse_api(&archived).unwrap()
            - lrvault::time::parse_api(&done).unwrap())
        .num_milliseconds() as f64
            / 1000.0;
        let Value::Real(answer) = r["seconds_to_archive"] else {
            panic!("Q8 {r:?}")
        };
        // julianday() is a float: allow the rounding of a half second to go either way.
        assert!((answer - secs).abs() <= 0.5 + 1e-3, "Q8 {r:?} vs {secs}");
    }
    let per_day: i64 = q(9)
        .iter()
        .map(|r| text(r, "packages").parse::<i64>().unwrap())
        .sum();
    assert_eq!(per_day, all.len() as i64, "Q9");
    // The exported package's action joined a case at discovery when its comment names one.
    let in_case = cases
        .values()
        .any(|(_, packages)| packages.contains(&exported));
    let events: Vec<String> = q(10)
        .iter()
        .map(|r| text(r, "event"))
        .filter(|ev| !(in_case && ev == "CASE_TAGGED"))
        .collect();
    assert_eq!(
        q(10)
            .iter()
            .filter(|r| text(r, "event") == "CASE_TAGGED")
            .count(),
        usize::from(in_case),
        "Q10 {exported}"
    );
    assert_eq!(
        events,
        [
            "DISCOVERED",
            "QUEUED",
            "LINK_ISSUED",
            "DOWNLOADED",
            "PUBLISHING",
            "ARCHIVED",
            "EXPORTED"
        ],
        "Q10"
    );
    assert_eq!(
        q(11).len(),
        3,
        "Q11: the checkpoints of the three archive passes (each verify run pinned the same head as the pass before it) cover a package of the first pass"
    );
    assert_eq!(q(12).len(), 1, "Q12");
    assert_eq!(text(&q(12)[0], "recipient"), "Examiner A");
    assert_eq!(text(&q(12)[0], "packages"), "1");
    assert_eq!(text(&q(12)[0], "written_to"), kit.display().to_string());
    assert_eq!(
        column(q(13), "evidence_id"),
        BTreeSet::from([exported.clone()]),
        "Q13"
    );
    let runs: Vec<(String, String)> = q(14)
        .iter()
        .map(|r| (text(r, "packages"), text(r, "package_defects")))
        .collect();
    assert_eq!(runs.len(), 2, "Q14 {runs:?}");
    assert_eq!(runs[0].1, "1", "the newest run found the damaged package");
    assert_eq!(runs[1].1, "0");
    assert_eq!(q(15).len(), 1, "Q15");
    assert_eq!(text(&q(15)[0], "evidence_id"), broken);
    assert_eq!(text(&q(15)[0], "check_kind"), "package");
    assert!(
        text(&q(15)[0], "problem").contains("the package's SHA-256 is"),
        "{:?}",
        q(15)
    );
    let devices: i64 = q(16)
        .iter()
        .map(|r| text(r, "packages").parse::<i64>().unwrap())
        .sum();
    assert_eq!(devices, all.len() as i64, "Q16");
    assert_eq!(
        q(16)
            .iter()
            .find(|r| text(r, "machine_id") == machine)
            .map(|r| text(r, "packages")),
        Some(by_machine.len().to_string())
    );
    assert_eq!(q(17).len(), 1, "Q17");
    assert_eq!(text(&q(17)[0], "sha256"), "ab".repeat(32));
    assert_eq!(q(18).len(), 3, "Q18: no TSA configured, no token");
    assert_eq!(q(19).len(), 0, "Q19: never restored");
    assert_eq!(column(q(20), "evidence_id"), case_packages, "Q20 {case}");
    assert_eq!(
        column(q(21), "case_id"),
        cases.keys().cloned().collect::<BTreeSet<_>>(),
        "Q21"
    );
    let row = q(21).iter().find(|r| text(r, "case_id") == case).unwrap();
    assert_eq!(
        (text(row, "packages"), text(row, "legal_hold")),
        (case_packages.len().to_string(), "1".to_string()),
        "Q21 {case}"
    );
    assert_eq!(column(q(22), "action_id"), case_actions, "Q22 {case}");
    assert!(
        q(22)
            .iter()
            .all(|r| text(r, "event") == "CASE_TAGGED" && text(r, "tagged_by") == "pattern")
    );
    assert_eq!(q(23).len(), 1, "Q23");
    assert_eq!(
        (
            text(&q(23)[0], "event"),
            text(&q(23)[0], "case_id"),
            text(&q(23)[0], "enforced")
        ),
        ("LEGAL_HOLD_SET".to_string(), case.clone(), "0".to_string()),
        "Q23"
    );
}
