//! The crash windows of the anchors, closed at the start of every verify run: a checkpoint
//! file is written before its `anchors` row, and a token before its row and its `ANCHORED`
//! custody row, so a crash in between leaves a file nobody recorded. Such a file is adopted
//! when it is genuine: a checkpoint that pins a row of the chain with that row's hash, a
//! token that verifies against its checkpoint, `tsa_ca_file` and `tsa_policy` and was issued
//! within `max_token_delay`. Anything else is left for verify to report.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::Connection;

use super::checkpoint::{self, Checkpoint, CheckpointFile};
use super::record::{self, Stamp};
use super::tsa::{self, TrustAnchors};
use crate::config::Config;
use crate::custody::{self, Head};
use crate::db::{Db, DbError};

/// What a reconciliation recorded: seqs of the checkpoints and of the tokens adopted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    pub checkpoints: Vec<i64>,
    pub tokens: Vec<i64>,
}

/// Seq → whether `anchors` records a token for it.
fn recorded(conn: &Connection) -> Result<HashMap<i64, bool>, DbError> {
    let mut stmt = conn
        .prepare("SELECT seq, tsr_path IS NOT NULL FROM anchors")
        .map_err(DbError::sql("read anchors"))?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(DbError::sql("read anchors"))?;
    rows.collect::<Result<_, _>>()
        .map_err(DbError::sql("read anchors"))
}

/// Checkpoint seq → the token SHA-256 its `ANCHORED` row names (the chain's record,
/// docs/evidence-format.md §9).
pub fn anchored(conn: &Connection) -> Result<HashMap<i64, (i64, String)>, DbError> {
    let mut stmt = conn
        .prepare(
            "SELECT json_extract(detail, '$.checkpoint_seq'), seq, json_extract(detail, '$.token_sha256')
             FROM custody_log WHERE event = 'ANCHORED' AND json_valid(detail)",
        )
        .map_err(DbError::sql("read ANCHORED rows"))?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, Option<i64>>(0)?.unwrap_or(-1),
                (r.get(1)?, crate::cells::shown(r, 2)),
            ))
        })
        .map_err(DbError::sql("read ANCHORED rows"))?;
    rows.collect::<Result<_, _>>()
        .map_err(DbError::sql("read ANCHORED rows"))
}

/// Adopts the checkpoints and tokens under `root/_checkpoints/` that a crash left without
/// their rows (see the module docs).
pub async fn reconcile(cfg: &Config, db: &Db, root: &Path) -> anyhow::Result<Reconciled> {
    let listing = checkpoint::list(root)?;
    let trust = cfg
        .anchor
        .tsa_ca_file()
        .map(TrustAnchors::load)
        .transpose()?;
    let (mut recorded, anchored) = db.read(|c| Ok((recorded(c)?, anchored(c)?))).await?;
    let mut done = Reconciled::default();
    for file in &listing.checkpoints {
        let Ok(bytes) = checkpoint::read_bytes(&file.json) else {
            continue;
        };
        let Ok(cp) = Checkpoint::parse(&bytes) else {
            continue;
        };
        if cp.seq != file.seq {
            continue;
        }
        if !recorded.contains_key(&cp.seq) && adopt_checkpoint(db, &cp).await? {
            recorded.insert(cp.seq, false);
            done.checkpoints.push(cp.seq);
        }
        if recorded.get(&cp.seq) == Some(&false)
            && let Some(trust) = &trust
            && adopt_token(cfg, db, trust, file, &cp, &bytes, anchored.get(&cp.seq)).await?
        {
            done.tokens.push(cp.seq);
        }
    }
    if !done.checkpoints.is_empty() || !done.tokens.is_empty() {
        tracing::info!(checkpoints = ?done.checkpoints, tokens = ?done.tokens,
            "adopted anchor files that a crash had left without their rows");
    }
    Ok(done)
}

/// Records `cp` when it pins a row of the chain with that row's hash.
async fn adopt_checkpoint(db: &Db, cp: &Checkpoint) -> anyhow::Result<bool> {
    let head = Head {
        seq: cp.seq,
        row_hash: cp.row_hash.clone(),
    };
    if !db.read(move |c| custody::has_row(c, &head)).await? {
        return Ok(false);
    }
    let (cp, rel) = (
        cp.clone(),
        checkpoint::rel_path(&checkpoint::checkpoint_file_name(cp.seq)),
    );
    db.call(move |c| record::record_checkpoint(c, &cp, &rel))
        .await?;
    Ok(true)
}

/// Records the token beside `cp` when it verifies, came in time, and is the one the chain's
/// `ANCHORED` row names (or no row names one yet: then its row is appended now).
async fn adopt_token(
    cfg: &Config,
    db: &Db,
    trust: &TrustAnchors,
    file: &CheckpointFile,
    cp: &Checkpoint,
    bytes: &[u8],
    anchored: Option<&(i64, String)>,
) -> anyhow::Result<bool> {
    let Some(tsr) = &file.tsr else {
        return Ok(false);
    };
    let Ok(token) = checkpoint::read_bytes(tsr) else {
        return Ok(false);
    };
    let Ok(info) = tsa::verify_token_policy(&token, bytes, Some(trust), cfg.anchor.tsa_policy())
    else {
        return Ok(false);
    };
    if record::late_token(cp, &info.gen_time, cfg.anchor.max_token_delay).is_some() {
        return Ok(false);
    }
    let url = cfg.anchor.tsa_url().unwrap_or(&info.signer);
    let stamp = Stamp::new(url, &info, &token);
    if anchored.is_some_and(|(_, sha)| *sha != stamp.token_sha256) {
        return Ok(false);
    }
    let (cp, already) = (cp.clone(), anchored.is_some());
    db.call(move |c| record::record_token(c, &cp, &stamp, already))
        .await?;
    Ok(true)
}
