//! `lrvault verify`: checks the database against the anchors outside it (docs/evidence-format.md §9) and
//! records the outcome. The custody chain is the reference; nothing is trusted because the
//! database says so.
//!
//! A run, in order:
//! 0. `anchor::reconcile`: checkpoint and token files that a crash left without their rows
//!    are adopted when genuine, so verify, audit and export see the same anchors.
//! 1. `snapshot`: in one read transaction on a read-only connection (the daemon keeps
//!    writing meanwhile), SQLite's own integrity check, the schema against the migrations,
//!    the chain recomputed from seq 1 (streamed, memory flat; times never backwards, RESTORED
//!    rows where only a restore puts them), the ARCHIVED rows and archived results without
//!    evidence, and `metadata`: every action against its DISCOVERED row, every package path
//!    against its action and result.
//! 2. `packages`: every evidence row against its ARCHIVED row, its package's bytes, BagIt
//!    manifests, `retrieval.json`, the bag's identity, and the `custody_head` it pins.
//! 3. `store`: files under a tenant's directory that no evidence row names; `adopted`: each
//!    adopted package follows this database's DOWNLOADED and PUBLISHING rows (rule 14).
//! 4. `anchors`: every checkpoint against the chain, every token against its checkpoint,
//!    `tsa_ca_file`, `tsa_policy` and `max_token_delay`, the files the chain names (ANCHORED,
//!    VERIFIED rows), and (`witness`) the witness's copies; then this run's checkpoint and the
//!    tokens still missing.
//!
//! With an object store (docs/operations.md §14) the packages are read back from the store by the exact
//! version their ARCHIVED rows name, the store's keys are listed for step 3, and the
//! checkpoints are read from (and written to) the store.
//!
//! Each defect is one VERIFY_FAILED row; the run ends with one VERIFIED row. `--chain-only`
//! does steps 1 (without the evidence checks) and 4.

mod adopted;
mod anchors;
mod defect;
mod metadata;
mod packages;
mod snapshot;
mod store;
mod witness;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::config::Config;
use crate::custody;
use crate::db::{Db, DbError};
use crate::store::{Blocking, Store};

pub use defect::{Counts, Defect};

/// What a run covers.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Only this tenant's packages and store directory (the chain and anchors are global).
    pub tenant: Option<String>,
    /// Only packages archived since then.
    pub since: Option<DateTime<Utc>>,
    /// Chain, database integrity and anchors only; no packages, store or evidence checks.
    pub chain_only: bool,
    /// SQLite `integrity_check` instead of `quick_check`.
    pub full: bool,
    /// Progress bars on a terminal and each defect on stderr (the command line).
    pub interactive: bool,
    /// Read back only this many packages, picked at random (`--sample N`); every evidence
    /// row is still compared with its ARCHIVED row, and the chain is checked whole.
    pub sample: Option<usize>,
}

/// Outcome of one verify run.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    pub packages_checked: usize,
    /// Evidence, custody, result and store-file defects.
    pub package_defects: usize,
    pub chain_rows: i64,
    /// Database, chain and checkpoint defects.
    pub chain_defects: usize,
    /// The chain head this run verified.
    pub chain_head: custody::Head,
    /// Seconds the chain walk took, and the CPU seconds of its reading and hashing threads.
    pub chain_secs: f64,
    pub chain_cpu_secs: (f64, f64),
    /// Evidence rows in the database when the chain was read.
    pub evidence_rows: i64,
    /// Packages archived before `custody_head` existed (not a defect).
    pub legacy_packages: usize,
    /// This run's checkpoint, relative to `store.root`, when one was written.
    pub checkpoint: Option<String>,
    pub tokens_fetched: usize,
    pub tokens_pending: usize,
    /// Set when a defect could not be recorded because the database cannot take a write.
    pub unrecorded: Option<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.package_defects == 0 && self.chain_defects == 0 && self.unrecorded.is_none()
    }

    /// The chain walk's speed.
    pub fn chain_rows_per_sec(&self) -> f64 {
        self.chain_rows as f64 / self.chain_secs.max(1e-9)
    }

    /// The walk's speed on two idle cores: rows over the CPU time of its busier thread
    /// (unlike [`chain_rows_per_sec`](Self::chain_rows_per_sec), not slowed by other work).
    pub fn chain_rows_per_cpu_sec(&self) -> f64 {
        let (reader, hasher) = self.chain_cpu_secs;
        self.chain_rows as f64 / reader.max(hasher).max(1e-9)
    }

    /// One line for the terminal and the log.
    pub fn summary(&self) -> String {
        let checkpoint = match &self.checkpoint {
            Some(path) => format!("checkpoint {path}"),
            None => "no checkpoint written".to_string(),
        };
        format!(
            "verified {} packages ({} defects); custody chain: {} rows ({} defects), head seq {}, \
             recomputed in {:.2}s ({:.0} rows/s; CPU {:.2}s reading + {:.2}s hashing: {:.0} rows/s \
             on idle cores); {checkpoint}; tokens: {} fetched, {} pending",
            self.packages_checked,
            self.package_defects,
            self.chain_rows,
            self.chain_defects,
            self.chain_head.seq,
            self.chain_secs,
            self.chain_rows_per_sec(),
            self.chain_cpu_secs.0,
            self.chain_cpu_secs.1,
            self.chain_rows_per_cpu_sec(),
            self.tokens_fetched,
            self.tokens_pending
        )
    }
}

/// True when opening failed because the file is not a sound SQLite database.
pub fn is_damaged(e: &DbError) -> bool {
    let code = |err: &rusqlite::Error| {
        matches!(
            err.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
        )
    };
    match e {
        DbError::Open { source, .. } | DbError::Sql { source, .. } => code(source),
        DbError::Migrate { message, .. } => {
            message.contains("malformed") || message.contains("not a database")
        }
        _ => false,
    }
}

/// Verifies every tenant's packages, the chain and the anchors (the daemon's nightly job).
pub async fn verify(
    cfg: &Config,
    db: &Db,
    tenant: Option<&str>,
    since: Option<DateTime<Utc>>,
    chain_only: bool,
) -> anyhow::Result<Report> {
    let scope = Scope {
        tenant: tenant.map(str::to_string),
        since,
        chain_only,
        ..Scope::default()
    };
    verify_scope(cfg, db, &scope).await
}

/// One verify run over `scope`, with the store `cfg.store` names; see the module docs.
pub async fn verify_scope(cfg: &Config, db: &Db, scope: &Scope) -> anyhow::Result<Report> {
    let store = Arc::new(Store::open(&cfg.store, &cfg.credentials)?);
    verify_with_store(cfg, db, store, scope).await
}

/// One verify run over `scope` against `store` (the daemon's, or a test's).
pub async fn verify_with_store(
    cfg: &Config,
    db: &Db,
    store: Arc<Store>,
    scope: &Scope,
) -> anyhow::Result<Report> {
    let tenants = cfg.select_tenants(scope.tenant.as_deref())?;
    let trust = cfg
        .anchor
        .tsa_ca_file()
        .map(crate::anchor::TrustAnchors::load)
        .transpose()
        .map_err(|e| crate::error::UserError::new(e.to_string()))?;
    let (run_tenant, run_actor) = match tenants.as_slice() {
        [only] => (only.name.clone(), custody::actor(&only.client_id)),
        _ => ("*".to_string(), custody::actor("*")),
    };
    let actors: HashMap<String, String> = cfg
        .tenants
        .iter()
        .map(|t| (t.name.clone(), custody::actor(&t.client_id)))
        .collect();
    let mut rec =
        defect::Recorder::new(db.clone(), run_tenant, run_actor, actors, scope.interactive);
    let witness = crate::anchor::open_witness(cfg)?.map(Arc::new);
    let anchors = crate::anchor::local_root(&store, &cfg.store.root).await?;
    let adopted = crate::anchor::reconcile(cfg, db, anchors.path()).await?;
    let checks = Checks {
        db_path: cfg.database.path.clone(),
        root: cfg.store.root.clone(),
        anchors: anchors.path().to_path_buf(),
        store: Blocking::new(store.clone()),
        scope: scope.clone(),
        trust,
        policy: cfg.anchor.tsa_policy().map(str::to_string),
        max_token_delay: cfg.anchor.max_token_delay,
        witness: witness.clone().map(Blocking::new),
    };
    let (rec, mut report, missing_tokens) =
        tokio::task::spawn_blocking(move || checks.run(&mut rec).map(|(r, m)| (rec, r, m)))
            .await??;
    if report.unrecorded.is_some() {
        return Ok(report);
    }
    let witness = witness.as_deref();
    if !rec.counts.chain_suspect && report.chain_rows > 0 {
        report.checkpoint = Some(anchors::write_checkpoint(db, &store, witness, &report).await?);
    }
    let mut missing = missing_tokens;
    let mut checkpoint_sha256 = None;
    if let Some(path) = &report.checkpoint {
        if store.is_object() {
            // The token is asked for the bytes the store holds.
            let local = anchors.path().join(path);
            if !tokio::fs::try_exists(&local).await? {
                store.download_to(path, None, &local).await?;
            }
        }
        let written = anchors::checkpoint_file(anchors.path(), path)?;
        let bytes = crate::anchor::read_bytes(&written.0.json)?;
        checkpoint_sha256 = Some(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)));
        // The same head as a checkpoint already waiting (an archive pass's): asked once.
        if !missing.iter().any(|(f, _)| f.seq == written.0.seq) {
            missing.push(written);
        }
    }
    let tokens = crate::anchor::fetch_missing_tokens(cfg, db, &store, witness, &missing).await;
    report.tokens_fetched = tokens.fetched.len();
    report.tokens_pending = tokens.pending;
    report.chain_defects = rec.counts.chain;
    report.package_defects = rec.counts.package;
    let detail = json!({
        "scope": {
            "tenant": scope.tenant,
            "since": scope.since.map(crate::time::fmt),
            "chain_only": scope.chain_only,
            "full": scope.full,
        },
        "packages_checked": report.packages_checked,
        "package_defects": report.package_defects,
        "chain_rows": report.chain_rows,
        "chain_head": report.chain_head,
        "chain_defects": report.chain_defects,
        "legacy_packages": report.legacy_packages,
        "checkpoint": report.checkpoint,
        "checkpoint_sha256": checkpoint_sha256,
        "adopted_checkpoints": adopted.checkpoints,
        "adopted_tokens": adopted.tokens,
        "tokens_fetched": tokens.fetched,
        "tokens_pending": tokens.pending,
        "token_error": tokens.error,
    });
    let mut detail = detail;
    if let Some(n) = scope.sample {
        detail["scope"]["sample"] = json!(n);
    }
    if let Err(e) = rec.finish(detail).await {
        report.unrecorded = Some(e.to_string());
    }
    Ok(report)
}

/// The checks that read the database and the store (steps 1–4 of the module docs, but for
/// writing the new checkpoint); run on one blocking thread.
struct Checks {
    db_path: PathBuf,
    /// `store.root` (the `fs` store's packages).
    root: PathBuf,
    /// Where `_checkpoints/` is read: `store.root`, or a mirror of an object store's.
    anchors: PathBuf,
    store: Blocking,
    scope: Scope,
    trust: Option<crate::anchor::TrustAnchors>,
    policy: Option<String>,
    max_token_delay: std::time::Duration,
    witness: Option<Blocking>,
}

impl Checks {
    /// Returns the report so far and the checkpoints that verified but still lack a token.
    fn run(self, rec: &mut defect::Recorder) -> anyhow::Result<(Report, Vec<anchors::Unstamped>)> {
        let mut conn = Db::open_readonly(&self.db_path)?;
        let mut report = Report::default();
        let snap = snapshot::check(&mut conn, &self.scope, rec)?;
        report.chain_rows = snap.rows;
        report.chain_head = snap.head.clone();
        report.chain_secs = snap.chain_secs;
        report.chain_cpu_secs = snap.chain_cpu_secs;
        if !snap.readable {
            if let Err(e) = rec.flush() {
                report.unrecorded = Some(e.to_string());
            }
            report.chain_defects = rec.counts.chain;
            return Ok((report, Vec::new()));
        }
        if !self.scope.chain_only {
            let at = packages::Packages {
                root: &self.root,
                store: &self.store,
            };
            let stats = packages::check(&conn, &at, &self.scope, &snap, rec)?;
            report.packages_checked = stats.checked;
            report.legacy_packages = stats.legacy;
            store::check(&conn, &self.root, &self.store, &self.scope, rec)?;
            adopted::check(&conn, &self.scope, rec)?;
        }
        let inputs = anchors::Inputs {
            root: &self.anchors,
            trust: self.trust.as_ref(),
            policy: self.policy.as_deref(),
            max_token_delay: self.max_token_delay,
            witness: self.witness.as_ref(),
        };
        let missing = anchors::check(&conn, &snap, &inputs, rec)?;
        rec.flush()?;
        report.evidence_rows = snap.evidence;
        Ok((report, missing))
    }
}
