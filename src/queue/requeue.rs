//! Putting results back in the queue by hand ([`requeue`], `lrvault requeue`) or after a
//! restore: `failed` / `unavailable` (and, for a restore, `skipped`) → `pending`, with a QUEUED
//! custody row in the same transaction.

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, Transaction, params};
use serde_json::{Value, json};

use super::{Key, ResultState};
use crate::custody::{self, Event, EventKind};
use crate::db::{Db, DbError, write_tx};

/// Which results [`requeue`] puts back to `pending`.
#[derive(Debug, Clone)]
pub enum Requeue {
    /// The `failed` or `unavailable` results of one action (or its command `index`).
    Action {
        action_id: String,
        index: Option<u32>,
    },
    /// Every `failed` result, last changed at or after `since`.
    Failed { since: Option<DateTime<Utc>> },
    /// These results when `failed`, `unavailable` or `skipped` (a restore found their
    /// packages in the store: the replaced database archived them after the backup).
    Keys(Vec<Key>),
}

/// Puts the results `select` names, of the tenants in `actors` (name, custody actor), back
/// to `pending`: attempts reset, due at once, `last_error` the reason; one QUEUED custody row
/// each with `detail` plus the state it left and the attempts it had. One transaction;
/// returns the keys re-queued (none: nothing written).
pub async fn requeue(
    db: &Db,
    actors: Vec<(String, String)>,
    select: Requeue,
    detail: Value,
) -> Result<Vec<Key>, DbError> {
    db.call(move |c| {
        let tx = write_tx(c)?;
        let mut found: Vec<(Key, ResultState, i64, String)> = Vec::new();
        for (tenant, actor) in &actors {
            for (k, state, attempts) in requeue_candidates(&tx, tenant, &select)? {
                found.push((k, state, attempts, actor.clone()));
            }
        }
        let reason = detail.get("reason").and_then(Value::as_str).unwrap_or("re-queued").to_string();
        let now = crate::time::now_str();
        for (k, state, attempts, actor) in &found {
            tx.execute(
                "UPDATE results SET state = ?7, attempts = 0, next_attempt_at = NULL, last_error = ?4,
                        lease_owner = NULL, lease_until = NULL, updated_at = ?5
                 WHERE tenant = ?1 AND action_id = ?2 AND command_index = ?3 AND state = ?6",
                params![k.tenant, k.action_id, k.index, reason, now, state, ResultState::Pending],
            )
            .map_err(DbError::sql("re-queue result"))?;
            let mut d = detail.clone();
            d["from_state"] = json!(state);
            d["attempts"] = json!(attempts);
            custody::append(&tx, &Event::new(&k.tenant, &k.action_id, Some(k.index), EventKind::Queued, actor).detail(d))?;
        }
        tx.commit().map_err(DbError::sql("commit the re-queue"))?;
        Ok(found.into_iter().map(|(k, ..)| k).collect())
    })
    .await
}

/// The results of `tenant` that `select` names, with their state and attempts.
fn requeue_candidates(
    tx: &Transaction<'_>,
    tenant: &str,
    select: &Requeue,
) -> Result<Vec<(Key, ResultState, i64)>, DbError> {
    const COLUMNS: &str =
        "SELECT tenant, action_id, command_index, state, attempts FROM results WHERE tenant = ?1";
    let map = |r: &rusqlite::Row<'_>| {
        Ok((
            Key {
                tenant: r.get(0)?,
                action_id: r.get(1)?,
                index: r.get(2)?,
            },
            r.get::<_, ResultState>(3)?,
            r.get::<_, i64>(4)?,
        ))
    };
    let read = DbError::sql("select results to re-queue");
    let mut out = Vec::new();
    match select {
        Requeue::Action { action_id, index } => {
            let sql = format!(
                "{COLUMNS} AND action_id = ?2 AND (?3 IS NULL OR command_index = ?3)
                 AND state IN (?4, ?5) ORDER BY command_index"
            );
            let mut st = tx.prepare(&sql).map_err(read)?;
            let (failed, unavailable) = (ResultState::Failed, ResultState::Unavailable);
            let rows = st
                .query_map(params![tenant, action_id, index, failed, unavailable], map)
                .map_err(DbError::sql("select results to re-queue"))?;
            for r in rows {
                out.push(r.map_err(DbError::sql("read a result to re-queue"))?);
            }
        }
        Requeue::Failed { since } => {
            let sql = format!(
                "{COLUMNS} AND state = ?3 AND (?2 IS NULL OR updated_at >= ?2)
                 ORDER BY updated_at, action_id, command_index"
            );
            let mut st = tx.prepare(&sql).map_err(read)?;
            let since = since.map(crate::time::fmt);
            let rows = st
                .query_map(params![tenant, since, ResultState::Failed], map)
                .map_err(DbError::sql("select results to re-queue"))?;
            for r in rows {
                out.push(r.map_err(DbError::sql("read a result to re-queue"))?);
            }
        }
        Requeue::Keys(keys) => {
            let sql = format!(
                "{COLUMNS} AND action_id = ?2 AND command_index = ?3
                 AND state IN (?4, ?5, ?6)"
            );
            let mut st = tx.prepare(&sql).map_err(read)?;
            let terminal = [
                ResultState::Failed,
                ResultState::Unavailable,
                ResultState::Skipped,
            ];
            for k in keys.iter().filter(|k| k.tenant == tenant) {
                let [a, b, c] = terminal;
                if let Some(r) = st
                    .query_row(params![tenant, k.action_id, k.index, a, b, c], map)
                    .optional()
                    .map_err(DbError::sql("select a result to re-queue"))?
                {
                    out.push(r);
                }
            }
        }
    }
    Ok(out)
}
