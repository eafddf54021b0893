//! Putting anchors in place: a checkpoint file plus its `anchors` row, and the tokens that a
//! timestamp authority was not there to give earlier, each recorded by an `ANCHORED` custody
//! row (docs/evidence-format.md §9) and copied to the witness (rule 9). The file always comes first: a
//! crash before the row leaves a file that the next verify adopts (`reconcile`).

use std::time::Duration;

use rusqlite::params;
use serde_json::json;
use sha2::Digest;

use super::AnchorError;
use super::checkpoint::{self, Checkpoint, CheckpointFile};
use super::files;
use super::tsa::{self, TrustAnchors};
use crate::config::Config;
use crate::custody::{self, Event, EventKind};
use crate::db::{Db, DbError, write_tx};
use crate::store::Store;

/// Records a checkpoint in `anchors` (nothing happens when it is there already).
pub fn record_checkpoint(
    conn: &rusqlite::Connection,
    cp: &Checkpoint,
    checkpoint_path: &str,
) -> Result<(), DbError> {
    conn.execute(
        "INSERT OR IGNORE INTO anchors (seq, row_hash, checkpoint_path, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![cp.seq, cp.row_hash, checkpoint_path, crate::time::now_str()],
    )
    .map_err(DbError::sql("record checkpoint"))?;
    Ok(())
}

/// A token that verified, as recorded in `anchors` and its `ANCHORED` row.
#[derive(Debug, Clone)]
pub struct Stamp {
    pub tsa_url: String,
    pub gen_time: String,
    pub token_sha256: String,
}

impl Stamp {
    pub fn new(tsa_url: &str, info: &tsa::TokenInfo, token: &[u8]) -> Stamp {
        Stamp {
            tsa_url: tsa_url.to_string(),
            gen_time: info.gen_time.clone(),
            token_sha256: hex::encode(sha2::Sha256::digest(token)),
        }
    }
}

/// Records `stamp` as the token of `cp` in `anchors`, and, unless the chain has one already,
/// appends its `ANCHORED` row, in one write transaction.
pub fn record_token(
    conn: &mut rusqlite::Connection,
    cp: &Checkpoint,
    stamp: &Stamp,
    anchored_already: bool,
) -> Result<(), DbError> {
    let tx = write_tx(conn)?;
    tx.execute(
        "INSERT INTO anchors (seq, row_hash, checkpoint_path, tsa_url, tsr_path, gen_time, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (seq) DO UPDATE SET tsa_url = excluded.tsa_url, tsr_path = excluded.tsr_path,
                                         gen_time = excluded.gen_time
         WHERE anchors.tsr_path IS NULL",
        params![
            cp.seq,
            cp.row_hash,
            checkpoint::rel_path(&checkpoint::checkpoint_file_name(cp.seq)),
            stamp.tsa_url,
            checkpoint::rel_path(&checkpoint::token_file_name(cp.seq)),
            stamp.gen_time,
            crate::time::now_str()
        ],
    )
    .map_err(DbError::sql("record timestamp token"))?;
    if !anchored_already {
        let actor = custody::actor("*");
        custody::append(
            &tx,
            &Event::new("*", "*", None, EventKind::Anchored, &actor).detail(json!({
                "checkpoint_seq": cp.seq,
                "row_hash": cp.row_hash,
                "token_sha256": stamp.token_sha256,
                "gen_time": stamp.gen_time,
                "tsa": stamp.tsa_url,
            })),
        )?;
    }
    tx.commit().map_err(DbError::sql("record timestamp token"))
}

/// Why a token's genTime is too late for its checkpoint (more than `max` after its `at`),
/// or `None` when it is in time.
pub fn late_token(cp: &Checkpoint, gen_time: &str, max: Duration) -> Option<String> {
    let at = crate::time::parse_api(&cp.at)?;
    let generated = crate::time::parse_api(gen_time)?;
    let delay = (generated - at).to_std().ok()?;
    (delay > max).then(|| {
        format!(
            "its token's genTime {gen_time} is {} after the checkpoint's at {} (more than anchor.max_token_delay {}): stamped late",
            humantime::format_duration(Duration::from_secs(delay.as_secs())),
            cp.at,
            humantime::format_duration(max)
        )
    })
}

/// Writes `cp` as `_checkpoints/{seq}.json` in the store, records it, and copies it to the
/// witness; returns its path relative to `store.root` (its key). An identical checkpoint
/// already there (another run saw the same head) is kept and recorded; one that pins another
/// row is never replaced ([`AnchorError::Conflict`]).
pub async fn write_checkpoint(
    db: &Db,
    store: &Store,
    witness: Option<&Store>,
    cp: &Checkpoint,
) -> anyhow::Result<String> {
    let rel = checkpoint::rel_path(&checkpoint::checkpoint_file_name(cp.seq));
    let mut bytes = cp.to_bytes();
    if let Err(AnchorError::Exists(path)) = files::put_new(store, &rel, bytes.clone()).await {
        bytes = files::read(store, &rel).await?;
        let (seq, found) = match Checkpoint::parse(&bytes) {
            Ok(there) if there.seq == cp.seq && there.row_hash == cp.row_hash => (0, None),
            Ok(there) => (there.seq, Some(there.row_hash)),
            Err(reason) => (cp.seq, Some(reason)),
        };
        if let Some(found) = found {
            return Err(AnchorError::Conflict { path, seq, found }.into());
        }
    }
    let (seq, cp, rel_row) = (cp.seq, cp.clone(), rel.clone());
    db.call(move |c| record_checkpoint(c, &cp, &rel_row))
        .await?;
    // A checkpoint covering packages of a held case is held like them (docs/operations.md §17).
    if let Err(e) = crate::cases::hold::hold_checkpoint(db, store, seq, &rel).await {
        tracing::warn!(checkpoint = rel, error = %e, "could not put the legal hold of its cases on a checkpoint; `lrvault case hold` run again holds it");
    }
    files::to_witness(witness, &rel, &bytes).await;
    Ok(rel)
}

/// Pins the chain's current head with a checkpoint (`"by": "archive"`, no chain walk), asks
/// the TSA for its token and copies both to the witness: the end of an archive pass that
/// archived something (docs/evidence-format.md §9). Returns the checkpoint's key and the token round.
pub async fn checkpoint_head(
    cfg: &Config,
    db: &Db,
    store: &Store,
    witness: Option<&Store>,
) -> anyhow::Result<(String, TokenRun)> {
    let (seq, row_hash) = db.read(custody::head).await?;
    let evidence = db
        .read(|c| {
            c.query_row("SELECT count(*) FROM evidence", [], |r| r.get::<_, i64>(0))
                .map_err(DbError::sql("count evidence"))
        })
        .await?;
    let cp = Checkpoint {
        seq,
        row_hash,
        at: crate::time::now_str(),
        rows: 0,
        evidence,
        host: custody::hostname(),
        lrvault_version: env!("CARGO_PKG_VERSION").to_string(),
        by: Some(checkpoint::BY_ARCHIVE.into()),
    };
    let rel = write_checkpoint(db, store, witness, &cp).await?;
    let file = CheckpointFile {
        seq,
        json: rel.clone().into(),
        tsr: None,
    };
    let run = fetch_missing_tokens(cfg, db, store, witness, &[(file, cp)]).await;
    Ok((rel, run))
}

/// What one round of token fetching did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TokenRun {
    /// Seqs of the checkpoints that got a token now.
    pub fetched: Vec<i64>,
    /// Checkpoints still without a token.
    pub pending: usize,
    /// Why the round stopped early (TSA down, token refused); the next run tries again.
    pub error: Option<String>,
}

/// Asks the timestamp authority (`[anchor] tsa_url`) for a token for every checkpoint in
/// `missing` (oldest first), keeping only tokens that verify against the checkpoint's bytes,
/// `tsa_ca_file` and `tsa_policy`. The first failure ends the round: a TSA that is down costs
/// one timeout, and archiving never waits for it.
pub async fn fetch_missing_tokens(
    cfg: &Config,
    db: &Db,
    store: &Store,
    witness: Option<&Store>,
    missing: &[(CheckpointFile, Checkpoint)],
) -> TokenRun {
    let mut run = TokenRun {
        pending: missing.len(),
        ..TokenRun::default()
    };
    let (Some(url), Some(ca)) = (cfg.anchor.tsa_url(), cfg.anchor.tsa_ca_file()) else {
        return run;
    };
    let trust = match TrustAnchors::load(ca) {
        Ok(trust) => trust,
        Err(e) => {
            run.error = Some(e.to_string());
            return run;
        }
    };
    for (_, cp) in missing {
        let rel = checkpoint::rel_path(&checkpoint::checkpoint_file_name(cp.seq));
        match fetch_one(cfg, db, store, witness, url, &trust, &rel, cp).await {
            Ok(()) => {
                run.fetched.push(cp.seq);
                run.pending -= 1;
            }
            Err(e) => {
                tracing::warn!(checkpoint = %rel, error = %e,
                    "no timestamp token this time; the next run asks again");
                run.error = Some(format!("{rel}: {e}"));
                break;
            }
        }
    }
    run
}

#[allow(clippy::too_many_arguments)]
async fn fetch_one(
    cfg: &Config,
    db: &Db,
    store: &Store,
    witness: Option<&Store>,
    url: &str,
    trust: &TrustAnchors,
    rel: &str,
    cp: &Checkpoint,
) -> anyhow::Result<()> {
    let bytes = files::read(store, rel).await?;
    let policy = cfg.anchor.tsa_policy();
    let request = tsa::TokenRequest::new(&bytes, policy)?;
    let (tsr, info) = tsa::fetch_token(url, &request, &bytes, trust, policy).await?;
    let tsr_rel = checkpoint::rel_path(&checkpoint::token_file_name(cp.seq));
    files::put_new(store, &tsr_rel, tsr.clone()).await?;
    let (cp, stamp) = (cp.clone(), Stamp::new(url, &info, &tsr));
    tracing::info!(seq = cp.seq, gen_time = %info.gen_time, "timestamp token stored");
    db.call(move |c| record_token(c, &cp, &stamp, false))
        .await?;
    files::to_witness(witness, &tsr_rel, &tsr).await;
    Ok(())
}
