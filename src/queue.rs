//! The queue of command results, and the one owner of a result's life. Every change of
//! `results.state` is a typed transition here. Each one but `claim` appends its custody row in
//! the same transaction, so the custody log never contradicts the table; a claim appends none
//! (the attempt's own rows, LINK_ISSUED, DOWNLOADED and PUBLISHING, follow in transactions of
//! their own, and a process that stops before it settles leaves recover's ATTEMPT_FAILED):
//!
//! - [`insert`] (discovery): a new result, `pending` (QUEUED) or `skipped` (SKIPPED);
//! - [`claim`]: `pending` and due → `downloading`, under a lease this process renews (no row);
//! - [`settle`]: `downloading` → `pending` to retry later, charged or not (ATTEMPT_FAILED),
//!   `unavailable` (UNAVAILABLE) or `failed` (FAILED);
//! - [`commit_archived`]: `downloading` → `archived` with its `evidence` row (ARCHIVED);
//! - [`recover`]: `downloading` → `pending` when the lease expired or its process is gone
//!   (ATTEMPT_FAILED, scope `process`, nothing charged);
//! - [`requeue`] (an operator, or a restore): `failed`/`unavailable` → `pending` (QUEUED).
//!
//! The states themselves are data: [`ResultState`] names the rows of `result_states`, and the
//! SQL, here and elsewhere, binds them as parameters instead of spelling them.
//!
//! The due queries share one scope filter ([`Scope`]). The state diagram is in
//! `docs/architecture.md`.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde_json::{Value, json};

use crate::custody::{self, Event, EventKind};
use crate::db::{Db, DbError, write_tx};

mod requeue;
pub use requeue::{Requeue, requeue};

/// How long a claim on a result lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(600);

/// Declares [`ResultState`] from one table: each state's variant, its name in
/// `results.state` (an identifier here, so the names are spelled once) and its meaning, as
/// migration 06 lists them in `result_states`.
macro_rules! result_states {
    ($($variant:ident = $name:ident: $meaning:literal,)*) => {
        /// The state of a result (docs/audit.md §2): a row of `result_states`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
        #[serde(rename_all = "lowercase")]
        pub enum ResultState {
            $($variant,)*
        }

        impl ResultState {
            pub const ALL: [ResultState; [$(stringify!($name)),*].len()] =
                [$(ResultState::$variant),*];

            /// The state's name, as `results.state` holds it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ResultState::$variant => stringify!($name),)*
                }
            }

            /// What the state means (`result_states.meaning`).
            pub fn meaning(self) -> &'static str {
                match self {
                    $(ResultState::$variant => $meaning,)*
                }
            }
        }
    };
}

result_states! {
    Pending = pending: "waiting for its next download attempt (new, or retrying after an error)",
    Downloading = downloading: "a process holds it under a lease and is fetching it",
    Archived = archived: "its package is in the evidence store, with its evidence row",
    Unavailable = unavailable: "the API says the result no longer exists",
    Skipped = skipped: "the command has no result to archive",
    Failed = failed: "it ran out of attempts or cannot be fetched",
}

impl ResultState {
    pub fn parse(s: &str) -> Option<ResultState> {
        ResultState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Still to be fetched (or being fetched).
    pub fn is_open(self) -> bool {
        matches!(self, ResultState::Pending | ResultState::Downloading)
    }
}

impl std::fmt::Display for ResultState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ToSql for ResultState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for ResultState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let s = value.as_str()?;
        ResultState::parse(s)
            .ok_or_else(|| FromSqlError::Other(format!("unknown result state '{s}'").into()))
    }
}

/// Number of results in each state.
pub type StateCounts = BTreeMap<ResultState, i64>;

/// One result: a command of a machine action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub tenant: String,
    pub action_id: String,
    pub index: u32,
}

/// Which results a pass works on.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// At most this many results (per pass, across tenants).
    pub max: Option<usize>,
    /// Only actions created in `[since, until)` (backfill windows).
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub machine_id: Option<String>,
}

/// The SQL condition selecting a tenant's results in a scope, over `results r JOIN actions
/// a`, with named parameters `:tenant`, `:since`, `:until`, `:machine`.
const SCOPE_FILTER: &str = "r.tenant = :tenant
    AND (:since IS NULL OR a.created_at >= :since) AND (:until IS NULL OR a.created_at < :until)
    AND (:machine IS NULL OR a.machine_id = :machine)";

/// `results r JOIN actions a` restricted to a scope: prefix `{select}` with the columns.
const SCOPED_RESULTS: &str =
    "FROM results r JOIN actions a ON a.tenant = r.tenant AND a.action_id = r.action_id";

/// Pending and due (its backoff has passed) at `:now`.
const DUE: &str = "r.state = :pending AND (r.next_attempt_at IS NULL OR r.next_attempt_at <= :now)";

/// Owned values of a scope's SQL parameters (movable onto the DB thread).
struct ScopeParams {
    tenant: String,
    since: Option<String>,
    until: Option<String>,
    machine: Option<String>,
    now: String,
}

impl Scope {
    fn bind(&self, tenant: &str) -> ScopeParams {
        ScopeParams {
            tenant: tenant.to_string(),
            since: self.since.map(crate::time::fmt),
            until: self.until.map(crate::time::fmt),
            machine: self.machine_id.clone(),
            now: crate::time::now_str(),
        }
    }
}

impl ScopeParams {
    /// Runs `SELECT {columns} FROM … WHERE scope [AND {and}] {tail}` and maps each row.
    fn query<T>(
        &self,
        conn: &Connection,
        columns: &str,
        and: Option<&str>,
        tail: &str,
        limit: Option<i64>,
        map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, DbError> {
        let and = and.map(|c| format!(" AND {c}")).unwrap_or_default();
        let sql = format!(
            "SELECT {columns} {SCOPED_RESULTS} WHERE {SCOPE_FILTER}{and} {tail} LIMIT :limit"
        );
        let limit = limit.unwrap_or(-1);
        let mut stmt = conn
            .prepare_cached(&sql)
            .map_err(DbError::sql("query the result queue"))?;
        let named: [(&str, &dyn ToSql); 7] = [
            (":tenant", &self.tenant),
            (":since", &self.since),
            (":until", &self.until),
            (":machine", &self.machine),
            (":now", &self.now),
            (":limit", &limit),
            (":pending", &ResultState::Pending),
        ];
        // Only the parameters the statement uses may be bound.
        let used: Vec<(&str, &dyn ToSql)> =
            named.into_iter().filter(|(n, _)| sql.contains(n)).collect();
        stmt.query_map(used.as_slice(), map)
            .map_err(DbError::sql("query the result queue"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(DbError::sql("read the result queue"))
    }
}

/// Due results of one tenant in `scope`, oldest action first, commands in index order, each
/// with its command type (which link call, and so which quota, it needs).
pub async fn due(db: &Db, tenant: &str, scope: &Scope) -> Result<Vec<(Key, String)>, DbError> {
    let bound = scope.bind(tenant);
    let limit = scope.max.map(|m| m as i64);
    db.read(move |c| {
        bound.query(
            c,
            "r.tenant, r.action_id, r.command_index, coalesce(r.command_type, '')",
            Some(DUE),
            "ORDER BY a.created_at, r.action_id, r.command_index",
            limit,
            |r| {
                let key = Key {
                    tenant: r.get(0)?,
                    action_id: r.get(1)?,
                    index: r.get(2)?,
                };
                Ok((key, r.get(3)?))
            },
        )
    })
    .await
}

/// How many results of `tenants` in `scope` are due now (for progress totals).
pub async fn due_count(db: &Db, tenants: &[String], scope: &Scope) -> Result<usize, DbError> {
    let mut n = 0;
    for t in tenants {
        let bound = scope.bind(t);
        n += db
            .read(move |c| bound.query(c, "count(*)", Some(DUE), "", None, |r| r.get::<_, i64>(0)))
            .await?
            .first()
            .copied()
            .unwrap_or(0) as usize;
    }
    Ok(scope.max.map_or(n, |m| n.min(m)))
}

/// Results of `tenant` in `scope` by state.
pub async fn counts(db: &Db, tenant: &str, scope: &Scope) -> Result<StateCounts, DbError> {
    let bound = scope.bind(tenant);
    let rows = db
        .read(move |c| {
            bound.query(
                c,
                "r.state, count(*)",
                None,
                "GROUP BY r.state",
                None,
                |r| Ok((r.get::<_, ResultState>(0)?, r.get::<_, i64>(1)?)),
            )
        })
        .await?;
    Ok(rows.into_iter().collect())
}

/// Earliest `next_attempt_at` of a pending result of `tenant` in `scope` (backoff), if any.
pub async fn next_retry(
    db: &Db,
    tenant: &str,
    scope: &Scope,
) -> Result<Option<DateTime<Utc>>, DbError> {
    let bound = scope.bind(tenant);
    let rows = db
        .read(move |c| {
            bound.query(
                c,
                "min(r.next_attempt_at)",
                Some("r.state = :pending"),
                "",
                None,
                |r| r.get::<_, Option<String>>(0),
            )
        })
        .await?;
    Ok(rows
        .into_iter()
        .flatten()
        .next()
        .and_then(|t| crate::time::parse_api(&t)))
}

/// A command of a newly discovered action, to be queued or skipped.
pub struct NewResult<'a> {
    pub index: u32,
    pub command_type: Option<&'a str>,
    pub command_json: String,
    pub command_status: Option<&'a str>,
    /// Why there is nothing to fetch (`skipped`), or None (`pending`).
    pub skip_reason: Option<String>,
    /// The command's `errors`, recorded with a skip when not empty.
    pub errors: &'a Value,
}

/// Inserts a result with its QUEUED or SKIPPED custody row, inside the caller's transaction
/// (which also records the action). Returns the state it was given.
pub fn insert(
    tx: &Transaction<'_>,
    tenant: &str,
    action_id: &str,
    actor: &str,
    new: &NewResult<'_>,
) -> Result<ResultState, DbError> {
    let state = if new.skip_reason.is_some() {
        ResultState::Skipped
    } else {
        ResultState::Pending
    };
    tx.execute(
        "INSERT INTO results (tenant, action_id, command_index, command_type, command_json, command_status,
                              state, last_error, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            tenant,
            action_id,
            new.index,
            new.command_type,
            new.command_json,
            new.command_status,
            state,
            new.skip_reason,
            crate::time::now_str()
        ],
    )
    .map_err(DbError::sql("insert result"))?;
    let mut detail =
        json!({ "command_type": new.command_type, "command_status": new.command_status });
    let kind = match &new.skip_reason {
        Some(r) => {
            detail["reason"] = json!(r);
            if !new.errors.is_null() && new.errors.as_array().is_none_or(|a| !a.is_empty()) {
                detail["errors"] = new.errors.clone();
            }
            EventKind::Skipped
        }
        None => EventKind::Queued,
    };
    custody::append(
        tx,
        &Event::new(tenant, action_id, Some(new.index), kind, actor).detail(detail),
    )?;
    Ok(state)
}

/// A result this process holds (state `downloading`, lease ours).
#[derive(Debug, Clone)]
pub struct Claimed {
    pub key: Key,
    /// The action exactly as the API returned it.
    pub action_json: String,
    /// The action's creation time (package date).
    pub created: DateTime<Utc>,
    pub command_type: String,
    pub command_json: String,
    /// Attempts spent before this one.
    pub attempts: u32,
}

fn lease_until() -> String {
    crate::time::fmt(crate::time::now() + chrono::Duration::from_std(LEASE).unwrap_or_default())
}

/// `pending` → `downloading` for `owner`, only while the result is due: a result another
/// process has just put into backoff is not taken. None when it is not (or no longer) ours.
pub async fn claim(db: &Db, key: &Key, owner: &str) -> Result<Option<Claimed>, DbError> {
    let (k, owner) = (key.clone(), owner.to_string());
    db.call(move |c| {
        let tx = write_tx(c)?;
        let now = crate::time::now_str();
        let n = tx
            .execute(
                "UPDATE results SET state = ?7, lease_owner = ?4, lease_until = ?5, updated_at = ?6
                 WHERE tenant = ?1 AND action_id = ?2 AND command_index = ?3 AND state = ?8
                   AND (next_attempt_at IS NULL OR next_attempt_at <= ?6)",
                params![k.tenant, k.action_id, k.index, owner, lease_until(), now, ResultState::Downloading, ResultState::Pending],
            )
            .map_err(DbError::sql("claim result"))?;
        if n == 0 {
            return Ok(None);
        }
        let row = tx
            .query_row(
                "SELECT a.raw_json, a.created_at, coalesce(r.command_type, ''), r.command_json, r.attempts
                 FROM results r JOIN actions a ON a.tenant = r.tenant AND a.action_id = r.action_id
                 WHERE r.tenant = ?1 AND r.action_id = ?2 AND r.command_index = ?3",
                params![k.tenant, k.action_id, k.index],
                |r| {
                    Ok(Claimed {
                        key: k.clone(),
                        action_json: r.get(0)?,
                        created: crate::time::parse_api(&r.get::<_, String>(1)?).unwrap_or_else(crate::time::now),
                        command_type: r.get(2)?,
                        command_json: r.get(3)?,
                        attempts: r.get(4)?,
                    })
                },
            )
            .optional()
            .map_err(DbError::sql("load claimed result"))?;
        tx.commit().map_err(DbError::sql("commit claim"))?;
        Ok(row)
    })
    .await
}

/// Extends `owner`'s lease on a result it is working on.
async fn renew_lease(db: &Db, key: &Key, owner: &str) -> Result<(), DbError> {
    let (k, owner) = (key.clone(), owner.to_string());
    db.call(move |c| {
        c.execute(
            "UPDATE results SET lease_until = ?5 WHERE tenant = ?1 AND action_id = ?2 AND command_index = ?3
             AND lease_owner = ?4 AND state = ?6",
            params![k.tenant, k.action_id, k.index, owner, lease_until(), ResultState::Downloading],
        )
        .map(|_| ())
        .map_err(DbError::sql("renew lease"))
    })
    .await
}

/// Runs `work` while renewing `owner`'s lease on `key` every `every`, from the same task:
/// when the work ends (or panics), the renewal ends with it, so a lease never outlives its
/// attempt.
pub async fn hold_lease<T>(
    db: &Db,
    key: &Key,
    owner: &str,
    every: Duration,
    work: impl Future<Output = T>,
) -> T {
    let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = renew.tick() => {
                if let Err(e) = renew_lease(db, key, owner).await {
                    tracing::warn!(tenant = %key.tenant, action = %key.action_id, index = key.index, error = %e, "cannot renew the lease");
                }
            }
        }
    }
}

/// How an attempt that did not archive ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// Terminal: the API has no result (custody UNAVAILABLE with `detail`).
    Unavailable { reason: String, detail: Value },
    /// Terminal: `failed` (custody FAILED with the reason and the attempts spent).
    Failed { reason: String },
    /// Back to `pending`, due again after `backoff`; `charge` spends one attempt. Custody
    /// ATTEMPT_FAILED with `scope` (who pays: `result`, `tenant` or `process`) and the reason.
    Retry {
        reason: String,
        backoff: Duration,
        charge: bool,
        scope: &'static str,
    },
}

/// Records the end of `claimed`'s attempt, provided `owner` still holds its lease. `Ok(false)`
/// (nothing written) when another process recovered the result meanwhile.
pub async fn settle(
    db: &Db,
    claimed: &Claimed,
    owner: &str,
    actor: &str,
    settlement: Settlement,
) -> Result<bool, DbError> {
    let (k, owner, actor) = (claimed.key.clone(), owner.to_string(), actor.to_string());
    let attempts = claimed.attempts + 1;
    db.call(move |c| {
        let tx = write_tx(c)?;
        let now = crate::time::now();
        let (state, reason, charge, next, event) = match settlement {
            Settlement::Unavailable { reason, detail } => {
                (ResultState::Unavailable, reason, true, None, Some((EventKind::Unavailable, detail)))
            }
            Settlement::Failed { reason } => {
                let detail = json!({ "reason": reason, "attempts": attempts });
                (ResultState::Failed, reason, true, None, Some((EventKind::Failed, detail)))
            }
            Settlement::Retry { reason, backoff, charge, scope } => {
                let at = crate::time::fmt(now + chrono::Duration::from_std(backoff).unwrap_or_default());
                let detail = attempt_failed(scope, &reason, attempts - u32::from(!charge), &at);
                (ResultState::Pending, reason, charge, Some(at), Some((EventKind::AttemptFailed, detail)))
            }
        };
        let n = tx
            .execute(
                "UPDATE results SET state = ?4, attempts = attempts + ?5, last_error = ?6, next_attempt_at = ?7,
                        lease_owner = NULL, lease_until = NULL, updated_at = ?8
                 WHERE tenant = ?1 AND action_id = ?2 AND command_index = ?3
                   AND state = ?10 AND lease_owner = ?9",
                params![k.tenant, k.action_id, k.index, state, i64::from(charge), reason, next, crate::time::fmt(now), owner, ResultState::Downloading],
            )
            .map_err(DbError::sql("settle result"))?;
        if n == 0 {
            return Ok(false);
        }
        if let Some((kind, detail)) = event {
            custody::append(&tx, &Event::new(&k.tenant, &k.action_id, Some(k.index), kind, &actor).detail(detail))?;
        }
        tx.commit().map_err(DbError::sql("commit result state"))?;
        Ok(true)
    })
    .await
}

/// The detail of an ATTEMPT_FAILED row (docs/audit.md §5-§6): who pays, why (a URL's query, where a
/// SAS signature would be, never goes in), the attempts spent so far, when it is due again.
fn attempt_failed(scope: &str, reason: &str, attempts: u32, next_attempt_at: &str) -> Value {
    json!({
        "scope": scope,
        "reason": without_queries(reason),
        "attempts": attempts,
        "next_attempt_at": next_attempt_at,
    })
}

/// `reason` with the query of every URL in it cut off.
fn without_queries(reason: &str) -> String {
    reason
        .split(' ')
        .map(|word| match (word.contains("://"), word.find('?')) {
            (true, Some(q)) => format!("{}?[query removed]", &word[..q]),
            _ => word.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What an archived result's `evidence` row holds (docs/audit.md §2).
#[derive(Debug, Clone)]
pub struct EvidenceRecord {
    pub payload_name: String,
    pub payload_size: u64,
    pub payload_sha256: String,
    pub payload_md5: Option<String>,
    pub original_name: Option<String>,
    pub original_size: Option<u64>,
    pub original_sha256: Option<String>,
    /// Relative to the store root.
    pub package_path: String,
    pub package_size: u64,
    pub package_sha256: String,
    /// Set when the package was found in place after a crash and re-verified.
    pub adopted: bool,
    /// More keys for the ARCHIVED row's detail (where the store keeps the package, a
    /// superseded custody head).
    pub extra: serde_json::Map<String, Value>,
}

/// `downloading` → `archived`: the evidence row, the result and the ARCHIVED custody row in
/// one transaction. `Ok(false)` (nothing written) when `owner` no longer holds the lease.
pub async fn commit_archived(
    db: &Db,
    key: &Key,
    owner: &str,
    actor: &str,
    rec: EvidenceRecord,
) -> Result<bool, DbError> {
    let (k, owner, actor) = (key.clone(), owner.to_string(), actor.to_string());
    db.call(move |c| {
        let tx = write_tx(c)?;
        let held: Option<i64> = tx
            .query_row(
                "SELECT 1 FROM results WHERE tenant = ?1 AND action_id = ?2 AND command_index = ?3
                   AND state = ?5 AND lease_owner = ?4",
                params![k.tenant, k.action_id, k.index, owner, ResultState::Downloading],
                |r| r.get(0),
            )
            .optional()
            .map_err(DbError::sql("check result lease"))?;
        if held.is_none() {
            return Ok(false);
        }
        let evidence_id = uuid::Uuid::now_v7().to_string();
        // Every column of the evidence row is in its ARCHIVED row, and archived_at is that
        // row's time, so verify proves what the audit shows (docs/evidence-format.md §9).
        let mut detail = json!({
            "evidence_id": evidence_id,
            "package_sha256": rec.package_sha256,
            "package_size": rec.package_size,
            "payload_size": rec.payload_size,
            "payload_name": rec.payload_name,
            "payload_md5": rec.payload_md5,
            "original_name": rec.original_name,
            "original_size": rec.original_size,
            "original_sha256": rec.original_sha256,
        });
        if rec.adopted {
            detail["adopted"] = json!(true);
        }
        if let Value::Object(d) = &mut detail {
            d.extend(rec.extra);
        }
        let (_, now) = custody::append_at(
            &tx,
            &Event {
                evidence_sha256: Some(&rec.payload_sha256),
                package_path: Some(&rec.package_path),
                ..Event::new(&k.tenant, &k.action_id, Some(k.index), EventKind::Archived, &actor).detail(detail)
            },
        )?;
        tx.execute(
            "INSERT INTO evidence (evidence_id, tenant, action_id, command_index, payload_name, payload_size,
                 payload_sha256, payload_md5, original_name, original_size, original_sha256, package_path,
                 package_size, package_sha256, archived_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                evidence_id,
                k.tenant,
                k.action_id,
                k.index,
                rec.payload_name,
                rec.payload_size as i64,
                rec.payload_sha256,
                rec.payload_md5,
                rec.original_name,
                rec.original_size.map(|s| s as i64),
                rec.original_sha256,
                rec.package_path,
                rec.package_size as i64,
                rec.package_sha256,
                now
            ],
        )
        .map_err(DbError::sql("insert evidence"))?;
        tx.execute(
            "UPDATE results SET state = ?6, evidence_id = ?4, attempts = attempts + 1, last_error = NULL,
                    next_attempt_at = NULL, lease_owner = NULL, lease_until = NULL, updated_at = ?5
             WHERE tenant = ?1 AND action_id = ?2 AND command_index = ?3",
            params![k.tenant, k.action_id, k.index, evidence_id, now, ResultState::Archived],
        )
        .map_err(DbError::sql("mark result archived"))?;
        tx.commit().map_err(DbError::sql("commit archived result"))?;
        Ok(true)
    })
    .await
}

/// A `downloading` result as recovery sees it.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub key: Key,
    pub created: Option<DateTime<Utc>>,
    pub command_type: String,
}

/// What [`recover`] found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Returned to `pending` (their process is gone or their lease expired).
    pub returned: Vec<InFlight>,
    /// Still held by a live process.
    pub live: Vec<InFlight>,
}

/// Returns crashed downloads to `pending` (attempts unchanged): a `downloading` row whose
/// lease expired, or whose owner [`owner_is_dead`] as seen from `me`.
pub async fn recover(db: &Db, me: &str) -> Result<Recovered, DbError> {
    let me = me.to_string();
    db.call(move |c| {
        let tx = write_tx(c)?;
        let rows: Vec<(InFlight, Option<String>, Option<String>)> = {
            let mut stmt = tx
                .prepare(
                    "SELECT r.tenant, r.action_id, r.command_index, r.lease_owner, r.lease_until, a.created_at,
                            coalesce(r.command_type, '')
                     FROM results r JOIN actions a ON a.tenant = r.tenant AND a.action_id = r.action_id
                     WHERE r.state = ?1",
                )
                .map_err(DbError::sql("select downloading results"))?;
            stmt.query_map([ResultState::Downloading], |r| {
                let key = Key { tenant: r.get(0)?, action_id: r.get(1)?, index: r.get(2)? };
                let created = crate::time::parse_api(&r.get::<_, String>(5)?);
                Ok((InFlight { key, created, command_type: r.get(6)? }, r.get(3)?, r.get(4)?))
            })
            .map_err(DbError::sql("select downloading results"))?
            .collect::<Result<_, _>>()
            .map_err(DbError::sql("select downloading results"))?
        };
        let now = crate::time::now_str();
        let mut out = Recovered::default();
        for (flight, owner, until) in rows {
            let expired = until.as_deref().is_none_or(|u| u < now.as_str());
            let dead = owner.as_deref().is_none_or(|o| owner_is_dead(o, &me));
            if !(expired || dead) {
                out.live.push(flight);
                continue;
            }
            let k = &flight.key;
            let n = tx
                .execute(
                    "UPDATE results SET state = ?6, lease_owner = NULL, lease_until = NULL, updated_at = ?4,
                            last_error = ?5
                     WHERE tenant = ?1 AND action_id = ?2 AND command_index = ?3 AND state = ?7",
                    params![k.tenant, k.action_id, k.index, now, INTERRUPTED, ResultState::Pending, ResultState::Downloading],
                )
                .map_err(DbError::sql("recover result"))?;
            if n > 0 {
                record_interrupted(&tx, k, &now)?;
            }
            out.returned.push(flight);
        }
        tx.commit().map_err(DbError::sql("commit recovery"))?;
        Ok(out)
    })
    .await
}

/// Why recovery returned a result to the queue.
const INTERRUPTED: &str = "interrupted download (process stopped); retrying";

/// The ATTEMPT_FAILED row of a download a stopped process left (scope `process`, nothing
/// charged, due at once), by the application the result's own rows name.
fn record_interrupted(tx: &rusqlite::Transaction<'_>, k: &Key, now: &str) -> Result<(), DbError> {
    let (attempts, actor): (u32, Option<String>) = tx
        .query_row(
            "SELECT r.attempts, (SELECT c.actor FROM custody_log c
                 WHERE c.tenant = r.tenant AND c.action_id = r.action_id AND c.command_index = r.command_index
                 ORDER BY c.seq DESC LIMIT 1)
             FROM results r WHERE r.tenant = ?1 AND r.action_id = ?2 AND r.command_index = ?3",
            params![k.tenant, k.action_id, k.index],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(DbError::sql("read recovered result"))?;
    let app = actor
        .as_deref()
        .and_then(|a| a.split(' ').find_map(|w| w.strip_prefix("app=")))
        .unwrap_or("*");
    let actor = custody::actor(app);
    let detail = attempt_failed("process", INTERRUPTED, attempts, now);
    let event = Event::new(
        &k.tenant,
        &k.action_id,
        Some(k.index),
        EventKind::AttemptFailed,
        &actor,
    );
    custody::append(tx, &event.detail(detail))?;
    Ok(())
}

/// `host:pid:start-ms`: names this process in leases, unique per start even when pids are
/// reused.
pub fn process_owner() -> String {
    let host = crate::custody::hostname().unwrap_or_default();
    format!("{host}:{}:{}", std::process::id(), crate::time::now_ms())
}

/// True when a lease owner string names a process that is certainly gone: same host, and
/// either our own pid with another start token, or a pid that no longer exists.
pub fn owner_is_dead(owner: &str, me: &str) -> bool {
    let mut theirs = owner.rsplitn(3, ':');
    let (Some(t_start), Some(t_pid), Some(t_host)) = (theirs.next(), theirs.next(), theirs.next())
    else {
        return true;
    };
    let mut mine = me.rsplitn(3, ':');
    let (Some(m_start), Some(m_pid), Some(m_host)) = (mine.next(), mine.next(), mine.next()) else {
        return false;
    };
    if t_host != m_host {
        return false;
    }
    if t_pid == m_pid {
        return t_start != m_start;
    }
    match t_pid.parse::<i32>() {
        Ok(pid) => matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        ),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_owner_detection() {
        let me = format!("h:{}:200", std::process::id());
        assert!(owner_is_dead(&format!("h:{}:100", std::process::id()), &me));
        assert!(!owner_is_dead(&me, &me));
        assert!(!owner_is_dead("other-host:1:5", &me));
        assert!(owner_is_dead("h:999999999:5", &me));
        assert!(!owner_is_dead("h:1:5", &me), "pid 1 exists");
        assert!(owner_is_dead("garbage", &me));
    }

    /// A database with one action and one pending result; returns its key.
    fn one_result() -> (tempfile::TempDir, Db, Key) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_migrated(&dir.path().join("q.db")).unwrap();
        db.call_sync(|c| {
            c.execute_batch(
                "INSERT INTO actions (tenant, action_id, created_at, raw_json, discovered_at, source)
                 VALUES ('t', 'a', '2026-12-01T00:00:00.000Z', '{}', '2026-12-01T00:00:00.000Z', 'discover');
                 INSERT INTO results (tenant, action_id, command_index, command_json, state, updated_at)
                 VALUES ('t', 'a', 0, '{}', 'pending', '2026-12-01T00:00:00.000Z');",
            )
            .unwrap();
            Ok(())
        })
        .unwrap();
        let key = Key {
            tenant: "t".into(),
            action_id: "a".into(),
            index: 0,
        };
        (dir, db, key)
    }

    fn lease_until(db: &Db) -> Option<String> {
        db.call_sync(|c| {
            Ok(
                c.query_row("SELECT lease_until FROM results", [], |r| r.get(0))
                    .unwrap(),
            )
        })
        .unwrap()
    }

    #[tokio::test]
    async fn a_claim_never_takes_a_result_another_process_put_into_backoff() {
        let (_dir, db, key) = one_result();
        // Process A and process B both saw the result due; A claims it first and fails.
        let a = claim(&db, &key, "host-a:1:1").await.unwrap().unwrap();
        assert!(
            claim(&db, &key, "host-b:2:2").await.unwrap().is_none(),
            "held by A"
        );
        let retry = Settlement::Retry {
            reason: "blob host answered HTTP 503".into(),
            backoff: Duration::from_secs(3600),
            charge: true,
            scope: "result",
        };
        assert!(settle(&db, &a, "host-a:1:1", "actor", retry).await.unwrap());
        // B's claim comes just after: the result is pending again, but not due for an hour.
        assert!(claim(&db, &key, "host-b:2:2").await.unwrap().is_none());
        let due = due(&db, "t", &Scope::default()).await.unwrap();
        assert!(due.is_empty(), "{due:?}");
    }

    /// The (event, detail) of every custody row.
    fn custody_rows(db: &Db) -> Vec<(String, Value)> {
        db.call_sync(|c| {
            let mut stmt = c
                .prepare("SELECT event, detail FROM custody_log ORDER BY seq")
                .unwrap();
            let rows = stmt
                .query_map([], |r| {
                    let detail: String = r.get(1)?;
                    Ok((r.get(0)?, serde_json::from_str(&detail).unwrap()))
                })
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            Ok(rows)
        })
        .unwrap()
    }

    #[tokio::test]
    async fn every_retried_attempt_leaves_one_attempt_failed_row_without_a_query() {
        let (_dir, db, key) = one_result();
        let claimed = claim(&db, &key, "me:1:1").await.unwrap().unwrap();
        let retry = Settlement::Retry {
            reason:
                "blob host refused https://blob.example/x.bin?sv=1&sig=SECRET after 2 re-issues"
                    .into(),
            backoff: Duration::ZERO,
            charge: true,
            scope: "result",
        };
        assert!(
            settle(&db, &claimed, "me:1:1", "actor", retry)
                .await
                .unwrap()
        );
        let claimed = claim(&db, &key, "me:1:1").await.unwrap().unwrap();
        let deferred = Settlement::Retry {
            reason: "API answered HTTP 503".into(),
            backoff: Duration::ZERO,
            charge: false,
            scope: "tenant",
        };
        assert!(
            settle(&db, &claimed, "me:1:1", "actor", deferred)
                .await
                .unwrap()
        );
        let rows = custody_rows(&db);
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert!(rows.iter().all(|(e, _)| e == "ATTEMPT_FAILED"));
        let (first, second) = (&rows[0].1, &rows[1].1);
        assert_eq!(first["scope"], "result");
        assert_eq!(
            first["reason"],
            "blob host refused https://blob.example/x.bin?[query removed] after 2 re-issues"
        );
        assert_eq!(first["attempts"], 1);
        assert!(first["next_attempt_at"].is_string());
        assert_eq!(second["scope"], "tenant");
        assert_eq!(second["attempts"], 1, "an uncharged retry spends nothing");
    }

    #[tokio::test]
    async fn a_download_a_stopped_process_left_leaves_an_attempt_failed_row() {
        let (_dir, db, key) = one_result();
        claim(&db, &key, "h:999999999:5").await.unwrap().unwrap();
        let found = recover(&db, &format!("h:{}:1", std::process::id()))
            .await
            .unwrap();
        assert_eq!(found.returned.len(), 1);
        let rows = custody_rows(&db);
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].0, "ATTEMPT_FAILED");
        assert_eq!(rows[0].1["scope"], "process");
        assert_eq!(rows[0].1["reason"], INTERRUPTED);
        assert_eq!(rows[0].1["attempts"], 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_attempt_leaves_no_lease_renewing() {
        let (_dir, db, key) = one_result();
        claim(&db, &key, "me:1:1").await.unwrap().unwrap();
        db.call_sync(|c| {
            c.execute("UPDATE results SET lease_until = 'renewed-never'", [])
                .unwrap();
            Ok(())
        })
        .unwrap();
        let never = Some("renewed-never".to_string());
        let every = Duration::from_secs(60);
        let (db2, key2, db3) = (db.clone(), key.clone(), db.clone());
        let attempt = tokio::spawn(async move {
            hold_lease(&db2, &key2, "me:1:1", every, async move {
                // The attempt runs (on the paused clock) until a renewal has landed.
                for _ in 0..3 {
                    tokio::time::sleep(every).await;
                    if lease_until(&db3) != Some("renewed-never".to_string()) {
                        break;
                    }
                }
                panic!("the attempt panics");
            })
            .await
        });
        assert!(attempt.await.unwrap_err().is_panic());
        let renewed = lease_until(&db);
        assert_ne!(renewed, never, "renewed while the attempt ran");
        // Three more intervals: a renewal that outlived the attempt would have run by now
        // (the sleep lets any task the clock woke send its write before the read below).
        tokio::time::advance(every * 3).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(lease_until(&db), renewed, "no renewal after the panic");
    }

    #[test]
    fn states_map_to_and_from_sql() {
        let conn = Connection::open_in_memory().unwrap();
        for st in ResultState::ALL {
            let back: ResultState = conn.query_row("SELECT ?1", [st], |r| r.get(0)).unwrap();
            assert_eq!(back, st);
            assert_eq!(ResultState::parse(st.as_str()), Some(st));
        }
        let e = conn
            .query_row("SELECT 'deferred'", [], |r| r.get::<_, ResultState>(0))
            .unwrap_err();
        assert!(
            e.to_string().contains("unknown result state 'deferred'"),
            "{e}"
        );
    }
}
