//! `lrvault verify`: re-hashes every package and its payload against the database, checks
//! the custody chain end to end, and records the outcome (`evidence.last_verified_at` /
//! `last_verify_ok`, one VERIFY_FAILED row per defect, one VERIFIED row per tenant and run).

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use rusqlite::params;
use serde_json::json;

use crate::config::Config;
use crate::custody::{self, Event, EventKind};
use crate::db::{Db, DbError, write_tx};

/// Outcome of one verify run.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub packages_checked: usize,
    pub package_defects: usize,
    pub chain_rows: i64,
    pub chain_defects: usize,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.package_defects == 0 && self.chain_defects == 0
    }
}

pub async fn run(
    cfg: &Config,
    db: &Db,
    tenant: Option<&str>,
    since: Option<DateTime<Utc>>,
    chain_only: bool,
) -> anyhow::Result<ExitCode> {
    let report = verify(cfg, db, tenant, since, chain_only).await?;
    println!(
        "verified {} packages ({} defects); custody chain: {} rows ({} defects)",
        report.packages_checked, report.package_defects, report.chain_rows, report.chain_defects
    );
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

struct EvidenceRow {
    evidence_id: String,
    tenant: String,
    action_id: String,
    index: u32,
    payload_sha256: String,
    payload_size: u64,
    package_path: String,
    package_sha256: String,
}

/// Runs the checks and writes their results.
pub async fn verify(
    cfg: &Config,
    db: &Db,
    tenant: Option<&str>,
    since: Option<DateTime<Utc>>,
    chain_only: bool,
) -> anyhow::Result<Report> {
    let tenants = cfg.select_tenants(tenant)?;
    let root = cfg.store.root.clone();
    let mut report = Report::default();
    for t in tenants.iter().copied() {
        let actor = custody::actor(&t.client_id);
        let name = t.name.clone();
        let since_s = since.map(crate::time::fmt);
        let rows: Vec<EvidenceRow> = if chain_only {
            vec![]
        } else {
            let name = name.clone();
            db.call(move |c| {
                let mut stmt = c
                    .prepare(
                        "SELECT evidence_id, tenant, action_id, command_index, payload_sha256, payload_size, package_path,
                                package_sha256 FROM evidence WHERE tenant = ?1 AND (?2 IS NULL OR archived_at >= ?2)
                         ORDER BY archived_at",
                    )
                    .map_err(DbError::sql("select evidence"))?;
                let rows = stmt
                    .query_map(params![name, since_s], |r| {
                        Ok(EvidenceRow {
                            evidence_id: r.get(0)?,
                            tenant: r.get(1)?,
                            action_id: r.get(2)?,
                            index: r.get(3)?,
                            payload_sha256: r.get(4)?,
                            payload_size: r.get::<_, i64>(5)? as u64,
                            package_path: r.get(6)?,
                            package_sha256: r.get(7)?,
                        })
                    })
                    .map_err(DbError::sql("select evidence"))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(DbError::sql("select evidence"))?;
                Ok(rows)
            })
            .await?
        };
        let mut checked = 0;
        for row in rows {
            let path = root.join(&row.package_path);
            let problems = tokio::task::spawn_blocking(move || {
                let mut problems = Vec::new();
                match crate::package::check_package(&path) {
                    Err(e) => problems.push(format!("cannot read package: {e}")),
                    Ok(check) => {
                        problems.extend(check.problems);
                        if check.package_sha256 != row.package_sha256 {
                            problems.push(format!(
                                "package SHA-256 is {}, recorded {}",
                                check.package_sha256, row.package_sha256
                            ));
                        }
                        if check.payload_sha256 != row.payload_sha256
                            || check.payload_size != row.payload_size
                        {
                            problems.push(format!(
                                "payload SHA-256/size is {}/{}, recorded {}/{}",
                                check.payload_sha256,
                                check.payload_size,
                                row.payload_sha256,
                                row.payload_size
                            ));
                        }
                    }
                }
                (row, problems)
            })
            .await?;
            let (row, problems) = problems;
            checked += 1;
            if !problems.is_empty() {
                report.package_defects += 1;
            }
            let actor = actor.clone();
            db.call(move |c| {
                let tx = write_tx(c)?;
                tx.execute(
                    "UPDATE evidence SET last_verified_at = ?2, last_verify_ok = ?3 WHERE evidence_id = ?1",
                    params![row.evidence_id, crate::time::now_str(), problems.is_empty()],
                )
                .map_err(DbError::sql("record verification"))?;
                if !problems.is_empty() {
                    custody::append(
                        &tx,
                        &Event {
                            evidence_sha256: Some(&row.payload_sha256),
                            package_path: Some(&row.package_path),
                            ..Event::new(&row.tenant, &row.action_id, Some(row.index), EventKind::VerifyFailed, &actor)
                                .detail(json!({ "evidence_id": row.evidence_id, "problems": problems }))
                        },
                    )?;
                }
                tx.commit().map_err(DbError::sql("commit verification"))
            })
            .await?;
        }
        report.packages_checked += checked;
    }
    // The chain is one for the whole database: checked once per run, one VERIFIED row.
    let (run_tenant, run_actor) = match tenants.as_slice() {
        [only] => (only.name.clone(), custody::actor(&only.client_id)),
        _ => ("*".to_string(), custody::actor("*")),
    };
    let scope = json!({
        "tenant": tenant,
        "since": since.map(crate::time::fmt),
        "chain_only": chain_only,
    });
    let checked = report.packages_checked;
    let package_defects = report.package_defects;
    let chain = db
        .call(move |c| {
            let tx = write_tx(c)?;
            let chain = custody::verify_chain(&tx)?;
            for (seq, problem) in &chain.defects {
                custody::append(
                    &tx,
                    &Event::new(&run_tenant, "*", None, EventKind::VerifyFailed, &run_actor)
                        .detail(json!({ "chain_seq": seq, "problem": problem })),
                )?;
            }
            custody::append(
                &tx,
                &Event::new(&run_tenant, "*", None, EventKind::Verified, &run_actor).detail(
                    json!({
                        "scope": scope,
                        "packages_checked": checked,
                        "package_defects": package_defects,
                        "chain_rows": chain.rows,
                        "chain_head": { "seq": chain.head_seq, "row_hash": chain.head_hash },
                        "chain_defects": chain.defects.len(),
                    }),
                ),
            )?;
            tx.commit().map_err(DbError::sql("commit verify run"))?;
            Ok(chain)
        })
        .await?;
    report.chain_rows = chain.rows;
    report.chain_defects = chain.defects.len();
    Ok(report)
}
