//! Putting anchors in place: a checkpoint file plus its `anchors` row, and the tokens that a
//! timestamp authority was not there to give earlier. The file always comes first: a crash
//! before the row leaves a checkpoint that the next verify checks and records.

use rusqlite::params;

use super::AnchorError;
use super::checkpoint::{self, Checkpoint, CheckpointFile};
use super::files;
use super::tsa::{self, TrustAnchors};
use crate::config::Config;
use crate::db::{Db, DbError};
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

fn record_token(
    conn: &rusqlite::Connection,
    cp: &Checkpoint,
    tsa_url: &str,
    info: &tsa::TokenInfo,
) -> Result<(), DbError> {
    conn.execute(
        "INSERT INTO anchors (seq, row_hash, checkpoint_path, tsa_url, tsr_path, gen_time, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (seq) DO UPDATE SET tsa_url = excluded.tsa_url, tsr_path = excluded.tsr_path,
                                         gen_time = excluded.gen_time
         WHERE anchors.tsr_path IS NULL",
        params![
            cp.seq,
            cp.row_hash,
            checkpoint::rel_path(&checkpoint::checkpoint_file_name(cp.seq)),
            tsa_url,
            checkpoint::rel_path(&checkpoint::token_file_name(cp.seq)),
            info.gen_time,
            crate::time::now_str()
        ],
    )
    .map_err(DbError::sql("record timestamp token"))?;
    Ok(())
}

/// Writes `cp` as `_checkpoints/{seq}.json` (in the store, §7b) and records it; returns its
/// path relative to `store.root` (its key). An identical checkpoint already there (another
/// run saw the same head) is kept and recorded; one that pins another row is never replaced
/// ([`AnchorError::Conflict`]).
pub async fn write_checkpoint(
    cfg: &Config,
    db: &Db,
    store: &Store,
    cp: &Checkpoint,
) -> anyhow::Result<String> {
    let rel = checkpoint::rel_path(&checkpoint::checkpoint_file_name(cp.seq));
    match files::put_new(cfg, store, &rel, cp.to_bytes()).await {
        Err(AnchorError::Exists(path)) => {
            let there = Checkpoint::parse(&files::read(cfg, store, &rel).await?);
            match there {
                Ok(there) if there.seq == cp.seq && there.row_hash == cp.row_hash => {}
                Ok(there) => {
                    return Err(AnchorError::Conflict {
                        path,
                        seq: there.seq,
                        found: there.row_hash,
                    }
                    .into());
                }
                Err(reason) => {
                    return Err(AnchorError::Conflict {
                        path,
                        seq: cp.seq,
                        found: reason,
                    }
                    .into());
                }
            }
        }
        other => other?,
    }
    let (cp, rel_row) = (cp.clone(), rel.clone());
    db.call(move |c| record_checkpoint(c, &cp, &rel_row))
        .await?;
    Ok(rel)
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
/// `missing` (oldest first), keeping only tokens that verify against the checkpoint's bytes and
/// `tsa_ca_file`. The first failure ends the round: a TSA that is down costs one timeout, and
/// archiving never waits for it.
pub async fn fetch_missing_tokens(
    cfg: &Config,
    db: &Db,
    store: &Store,
    missing: &[(CheckpointFile, Checkpoint)],
) -> TokenRun {
    let mut run = TokenRun {
        pending: missing.len(),
        ..TokenRun::default()
    };
    let Some(url) = cfg.anchor.tsa_url() else {
        return run;
    };
    let trust = match cfg.anchor.tsa_ca_file().map(TrustAnchors::load).transpose() {
        Ok(trust) => trust,
        Err(e) => {
            run.error = Some(e.to_string());
            return run;
        }
    };
    for (file, cp) in missing {
        match fetch_one(cfg, db, store, url, trust.as_ref(), file, cp).await {
            Ok(()) => {
                run.fetched.push(cp.seq);
                run.pending -= 1;
            }
            Err(e) => {
                tracing::warn!(checkpoint = %file.json.display(), error = %e,
                    "no timestamp token this time; the next verify run asks again");
                run.error = Some(format!("{}: {e}", file.json.display()));
                break;
            }
        }
    }
    run
}

async fn fetch_one(
    cfg: &Config,
    db: &Db,
    store: &Store,
    url: &str,
    trust: Option<&TrustAnchors>,
    file: &CheckpointFile,
    cp: &Checkpoint,
) -> anyhow::Result<()> {
    let json = file.json.clone();
    let bytes = tokio::task::spawn_blocking(move || checkpoint::read_bytes(&json)).await??;
    let request = tsa::TokenRequest::new(&bytes, cfg.anchor.tsa_policy())?;
    let (tsr, info) = tsa::fetch_token(url, &request, &bytes, trust).await?;
    let rel = checkpoint::rel_path(&checkpoint::token_file_name(cp.seq));
    files::put_new(cfg, store, &rel, tsr).await?;
    let (cp, url) = (cp.clone(), url.to_string());
    tracing::info!(seq = cp.seq, gen_time = %info.gen_time, "timestamp token stored");
    db.call(move |c| record_token(c, &cp, &url, &info)).await?;
    Ok(())
}
