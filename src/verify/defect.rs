//! What verify can find wrong, and how it is recorded: one VERIFY_FAILED custody row per
//! defect, `evidence.last_verified_at` / `last_verify_ok` per package, written in short batched
//! write transactions so the daemon's own writes never wait long.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::custody::{self, Event, EventKind};
use crate::db::{Db, DbError, write_tx};

/// One defect (docs/evidence-format.md §9); each names the evidence id, path or seq an examiner looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Defect {
    /// SQLite's own integrity check failed, or a table could not be read.
    Database { problem: String },
    /// A custody row that does not recompute (§7a item 1).
    Chain { seq: i64, problem: String },
    /// An evidence row, its ARCHIVED row and its package disagree (§7a items 2–4).
    Evidence {
        evidence_id: String,
        tenant: String,
        action_id: String,
        index: Option<i64>,
        package_path: String,
        payload_sha256: String,
        problems: Vec<String>,
    },
    /// An ARCHIVED custody row whose evidence row is gone (§7a item 2).
    Custody {
        seq: i64,
        tenant: String,
        action_id: String,
        index: Option<i64>,
        package_path: Option<String>,
        problem: String,
    },
    /// A result in state `archived` without its evidence row (§7a item 2).
    Result {
        tenant: String,
        action_id: String,
        index: i64,
        problem: String,
    },
    /// A checkpoint or token that disagrees with the chain or does not verify (§7a item 5).
    Checkpoint {
        file: String,
        seq: Option<i64>,
        problem: String,
    },
    /// A file in a tenant's part of the store that no evidence row names (§7a item 6).
    StoreFile { path: String, problem: String },
    /// An `actions` row that differs from its DISCOVERED custody row (§7a item 7).
    Action {
        tenant: String,
        action_id: String,
        problems: Vec<String>,
    },
    /// A table, view, index or trigger that is not what the migrations made (§7a item 13).
    Schema { object: String, problem: String },
    /// A case mark in `case_marks` that the chain's CASE_* rows do not make (docs/audit.md §8).
    Case { case: String, problem: String },
}

impl Defect {
    /// One line for the terminal and the log.
    pub fn message(&self) -> String {
        match self {
            Defect::Database { problem } => format!("database: {problem}"),
            Defect::Chain { seq, problem } => format!("custody seq {seq}: {problem}"),
            Defect::Evidence {
                evidence_id,
                package_path,
                problems,
                ..
            } => format!(
                "evidence {evidence_id} ({package_path}): {}",
                problems.join("; ")
            ),
            Defect::Custody {
                seq,
                package_path,
                problem,
                ..
            } => format!(
                "custody seq {seq} (ARCHIVED {}): {problem}",
                package_path.as_deref().unwrap_or("without a package path")
            ),
            Defect::Result {
                tenant,
                action_id,
                index,
                problem,
            } => format!("result {tenant}/{action_id}/{index}: {problem}"),
            Defect::Checkpoint { file, problem, .. } => format!("checkpoint {file}: {problem}"),
            Defect::StoreFile { path, problem } => format!("store file {path}: {problem}"),
            Defect::Action {
                tenant,
                action_id,
                problems,
            } => format!("action {tenant}/{action_id}: {}", problems.join("; ")),
            Defect::Schema { object, problem } => format!("schema object {object}: {problem}"),
            Defect::Case { case, problem } => format!("case {case}: {problem}"),
        }
    }

    /// True for the defects that say the chain itself may have been rewritten or cut.
    pub fn is_chain_level(&self) -> bool {
        matches!(
            self,
            Defect::Database { .. }
                | Defect::Chain { .. }
                | Defect::Checkpoint { .. }
                | Defect::Schema { .. }
        )
    }

    /// (tenant, action_id, command_index, evidence_sha256, package_path, detail) of its row.
    fn row(
        &self,
        run_tenant: &str,
    ) -> (
        String,
        String,
        Option<i64>,
        Option<String>,
        Option<String>,
        Value,
    ) {
        let whole = |detail: Value| {
            (
                run_tenant.to_string(),
                "*".to_string(),
                None,
                None,
                None,
                detail,
            )
        };
        match self {
            Defect::Database { problem } => {
                whole(json!({ "check": "database", "problem": problem }))
            }
            Defect::Chain { seq, problem } => {
                whole(json!({ "check": "chain", "chain_seq": seq, "problem": problem }))
            }
            Defect::Checkpoint { file, seq, problem } => whole(
                json!({ "check": "checkpoint", "file": file, "checkpoint_seq": seq, "problem": problem }),
            ),
            Defect::Evidence {
                evidence_id,
                tenant,
                action_id,
                index,
                package_path,
                payload_sha256,
                problems,
            } => (
                tenant.clone(),
                action_id.clone(),
                *index,
                Some(payload_sha256.clone()).filter(|s| !s.is_empty()),
                Some(package_path.clone()),
                json!({ "check": "package", "evidence_id": evidence_id, "problems": problems }),
            ),
            Defect::Custody {
                seq,
                tenant,
                action_id,
                index,
                package_path,
                problem,
            } => (
                tenant.clone(),
                action_id.clone(),
                *index,
                None,
                package_path.clone(),
                json!({ "check": "custody", "archived_seq": seq, "problem": problem }),
            ),
            Defect::Result {
                tenant,
                action_id,
                index,
                problem,
            } => (
                tenant.clone(),
                action_id.clone(),
                Some(*index),
                None,
                None,
                json!({ "check": "result", "problem": problem }),
            ),
            Defect::Action {
                tenant,
                action_id,
                problems,
            } => (
                tenant.clone(),
                action_id.clone(),
                None,
                None,
                None,
                json!({ "check": "action", "problems": problems }),
            ),
            Defect::Schema { object, problem } => {
                whole(json!({ "check": "schema", "object": object, "problem": problem }))
            }
            Defect::Case { case, problem } => {
                whole(json!({ "check": "case", "case": case, "problem": problem }))
            }
            Defect::StoreFile { path, problem } => {
                // The tenant whose directory holds the file.
                let tenant = path.split('/').next().unwrap_or(run_tenant);
                (
                    tenant.to_string(),
                    "*".to_string(),
                    None,
                    None,
                    Some(path.clone()),
                    json!({ "check": "store", "problem": problem }),
                )
            }
        }
    }
}

/// How many of each kind a run found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Database, chain and checkpoint defects.
    pub chain: usize,
    /// Evidence, custody, result and store defects.
    pub package: usize,
    /// Set by a defect that may mean a rewritten chain: no checkpoint is written then, so a
    /// forged head is never anchored.
    pub chain_suspect: bool,
}

/// Collects a run's outcomes and writes them in batches.
pub struct Recorder {
    db: Db,
    run_tenant: String,
    run_actor: String,
    /// Each configured tenant's actor (app = its client id).
    actors: HashMap<String, String>,
    /// Print each defect to stderr (the command line) as well as logging it.
    echo: bool,
    defects: Vec<Defect>,
    outcomes: Vec<(String, bool)>,
    pub counts: Counts,
}

const BATCH: usize = 256;

impl Recorder {
    pub fn new(
        db: Db,
        run_tenant: String,
        run_actor: String,
        actors: HashMap<String, String>,
        echo: bool,
    ) -> Recorder {
        Recorder {
            db,
            run_tenant,
            run_actor,
            actors,
            echo,
            defects: Vec::new(),
            outcomes: Vec::new(),
            counts: Counts::default(),
        }
    }

    pub fn defect(&mut self, defect: Defect) -> Result<(), DbError> {
        let message = defect.message();
        if self.echo {
            eprintln!("lrvault: defect: {message}");
        } else {
            tracing::warn!(defect = %message, "verify found a defect");
        }
        if defect.is_chain_level() {
            self.counts.chain += 1;
            self.counts.chain_suspect = true;
        } else {
            self.counts.package += 1;
        }
        self.defects.push(defect);
        self.flush_if_full()
    }

    /// Marks the run as having seen a sign of a rewritten chain (no checkpoint is written).
    pub fn suspect_chain(&mut self) {
        self.counts.chain_suspect = true;
    }

    /// The outcome of one package, for `evidence.last_verified_at` / `last_verify_ok`.
    pub fn outcome(&mut self, evidence_id: String, ok: bool) -> Result<(), DbError> {
        self.outcomes.push((evidence_id, ok));
        self.flush_if_full()
    }

    fn flush_if_full(&mut self) -> Result<(), DbError> {
        if self.defects.len() + self.outcomes.len() >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes what is pending in one short write transaction (call on a blocking thread).
    pub fn flush(&mut self) -> Result<(), DbError> {
        if self.defects.is_empty() && self.outcomes.is_empty() {
            return Ok(());
        }
        let defects = std::mem::take(&mut self.defects);
        let outcomes = std::mem::take(&mut self.outcomes);
        let now = crate::time::now_str();
        // The rows to append, owned, for the writer thread.
        let events: Vec<custody::OwnedEvent> = defects
            .iter()
            .map(|defect| {
                let (tenant, action_id, index, sha, path, detail) = defect.row(&self.run_tenant);
                let actor = self.actors.get(&tenant).unwrap_or(&self.run_actor);
                Event {
                    evidence_sha256: sha.as_deref(),
                    package_path: path.as_deref(),
                    ..Event::new(
                        &tenant,
                        &action_id,
                        index.and_then(|i| u32::try_from(i).ok()),
                        EventKind::VerifyFailed,
                        actor,
                    )
                    .detail(detail)
                }
                .to_owned_event()
            })
            .collect();
        self.db.call_sync(move |c| {
            let tx = write_tx(c)?;
            {
                let mut update = tx
                    .prepare_cached(
                        "UPDATE evidence SET last_verified_at = ?2, last_verify_ok = ?3 WHERE evidence_id = ?1",
                    )
                    .map_err(DbError::sql("record verification"))?;
                for (evidence_id, ok) in &outcomes {
                    update
                        .execute(rusqlite::params![evidence_id, now, ok])
                        .map_err(DbError::sql("record verification"))?;
                }
            }
            for event in &events {
                custody::append(&tx, &event.as_event())?;
            }
            tx.commit().map_err(DbError::sql("commit verification"))
        })
    }

    /// Appends the run's VERIFIED row (after flushing) and returns it.
    pub async fn finish(mut self, detail: Value) -> Result<custody::Head, DbError> {
        let (tenant, actor) = (self.run_tenant.clone(), self.run_actor.clone());
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || self.flush())
            .await
            .map_err(|e| DbError::Join(e.to_string()))??;
        let event = Event::new(&tenant, "*", None, EventKind::Verified, &actor).detail(detail);
        custody::record(&db, event).await
    }
}
