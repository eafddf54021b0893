//! The chain-of-custody log: append-only rows, each hashing the previous row's hash, so any
//! edit, deletion or reordering is detectable with sqlite3 and ten lines of any language
//! (formula in DESIGN.md §6 and docs/audit.md).

use rusqlite::{OptionalExtension, Transaction, params};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::db::DbError;

pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Discovered,
    Queued,
    LinkIssued,
    Downloaded,
    Archived,
    Unavailable,
    Skipped,
    Failed,
    Verified,
    VerifyFailed,
    /// An examiner's handover kit was made (`lrvault export`).
    Exported,
    /// An online copy of the database was made (`lrvault backup`).
    BackedUp,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Discovered => "DISCOVERED",
            EventKind::Queued => "QUEUED",
            EventKind::LinkIssued => "LINK_ISSUED",
            EventKind::Downloaded => "DOWNLOADED",
            EventKind::Archived => "ARCHIVED",
            EventKind::Unavailable => "UNAVAILABLE",
            EventKind::Skipped => "SKIPPED",
            EventKind::Failed => "FAILED",
            EventKind::Verified => "VERIFIED",
            EventKind::VerifyFailed => "VERIFY_FAILED",
            EventKind::Exported => "EXPORTED",
            EventKind::BackedUp => "BACKED_UP",
        }
    }
}

/// This machine's host name, as recorded in custody actors, packages and leases.
pub fn hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
}

/// `lrvault/<version> app=<client_id> host=<hostname> uid=<uid>`: who did it.
pub fn actor(client_id: &str) -> String {
    let host = hostname().unwrap_or_else(|| "unknown".into());
    format!(
        "lrvault/{} app={} host={} uid={}",
        env!("CARGO_PKG_VERSION"),
        client_id,
        host,
        nix::unistd::getuid()
    )
}

/// One custody event to append.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    pub tenant: &'a str,
    pub action_id: &'a str,
    pub command_index: Option<u32>,
    pub kind: EventKind,
    pub actor: &'a str,
    pub evidence_sha256: Option<&'a str>,
    pub package_path: Option<&'a str>,
    /// A JSON object (or Null for `{}`).
    pub detail: Value,
}

impl<'a> Event<'a> {
    pub fn new(
        tenant: &'a str,
        action_id: &'a str,
        command_index: Option<u32>,
        kind: EventKind,
        actor: &'a str,
    ) -> Self {
        Event {
            tenant,
            action_id,
            command_index,
            kind,
            actor,
            evidence_sha256: None,
            package_path: None,
            detail: Value::Null,
        }
    }

    pub fn detail(mut self, detail: Value) -> Self {
        self.detail = detail;
        self
    }
}

/// An [`Event`] that owns its fields, to move onto the database thread.
#[derive(Debug, Clone)]
pub struct OwnedEvent {
    tenant: String,
    action_id: String,
    command_index: Option<u32>,
    kind: EventKind,
    actor: String,
    evidence_sha256: Option<String>,
    package_path: Option<String>,
    detail: Value,
}

impl Event<'_> {
    pub fn to_owned_event(&self) -> OwnedEvent {
        OwnedEvent {
            tenant: self.tenant.to_string(),
            action_id: self.action_id.to_string(),
            command_index: self.command_index,
            kind: self.kind,
            actor: self.actor.to_string(),
            evidence_sha256: self.evidence_sha256.map(str::to_string),
            package_path: self.package_path.map(str::to_string),
            detail: self.detail.clone(),
        }
    }
}

impl OwnedEvent {
    pub fn as_event(&self) -> Event<'_> {
        Event {
            tenant: &self.tenant,
            action_id: &self.action_id,
            command_index: self.command_index,
            kind: self.kind,
            actor: &self.actor,
            evidence_sha256: self.evidence_sha256.as_deref(),
            package_path: self.package_path.as_deref(),
            detail: self.detail.clone(),
        }
    }
}

/// The stored fields of one custody row, as hashed.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub seq: i64,
    pub at: String,
    pub tenant: String,
    pub action_id: String,
    pub command_index: Option<i64>,
    pub event: String,
    pub actor: String,
    pub evidence_sha256: Option<String>,
    pub package_path: Option<String>,
    pub detail: String,
    pub prev_hash: String,
    pub row_hash: String,
}

/// `row_hash` per DESIGN §6: SHA-256 of the compact JSON array
/// `[prev_hash, seq, at, tenant, action_id, command_index, event, actor, evidence_sha256, package_path, detail]`.
pub fn row_hash(row: &Row) -> String {
    // serde_json's compact output equals Python's json.dumps(separators=(",", ":"),
    // ensure_ascii=False): same escapes, no spaces, non-ASCII kept as UTF-8.
    let arr = serde_json::json!([
        row.prev_hash,
        row.seq,
        row.at,
        row.tenant,
        row.action_id,
        row.command_index,
        row.event,
        row.actor,
        row.evidence_sha256,
        row.package_path,
        row.detail,
    ]);
    hex::encode(Sha256::digest(arr.to_string().as_bytes()))
}

/// The last row's (seq, row_hash), or (0, genesis).
pub fn head(conn: &rusqlite::Connection) -> Result<(i64, String), DbError> {
    Ok(conn
        .query_row(
            "SELECT seq, row_hash FROM custody_log ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(DbError::sql("read custody head"))?
        .unwrap_or((0, GENESIS_HASH.to_string())))
}

/// A row of the chain that pins every row up to it: `{"seq": N, "row_hash": "…"}` in a
/// package's `retrieval.json` (DESIGN §7a).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Head {
    pub seq: i64,
    pub row_hash: String,
}

/// Appends `ev` inside the caller's write transaction (which serialises appends, so `seq`
/// has no gaps). Returns the new row, now the chain's head.
pub fn append(tx: &Transaction<'_>, ev: &Event<'_>) -> Result<Head, DbError> {
    let (last_seq, prev_hash) = head(tx)?;
    let detail = match &ev.detail {
        Value::Null => "{}".to_string(),
        v => v.to_string(),
    };
    let mut row = Row {
        seq: last_seq + 1,
        at: crate::time::now_str(),
        tenant: ev.tenant.to_string(),
        action_id: ev.action_id.to_string(),
        command_index: ev.command_index.map(i64::from),
        event: ev.kind.as_str().to_string(),
        actor: ev.actor.to_string(),
        evidence_sha256: ev.evidence_sha256.map(str::to_string),
        package_path: ev.package_path.map(str::to_string),
        detail,
        prev_hash,
        row_hash: String::new(),
    };
    row.row_hash = row_hash(&row);
    tx.execute(
        "INSERT INTO custody_log (seq, at, tenant, action_id, command_index, event, actor,
                                  evidence_sha256, package_path, detail, prev_hash, row_hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            row.seq,
            row.at,
            row.tenant,
            row.action_id,
            row.command_index,
            row.event,
            row.actor,
            row.evidence_sha256,
            row.package_path,
            row.detail,
            row.prev_hash,
            row.row_hash
        ],
    )
    .map_err(DbError::sql("append custody row"))?;
    Ok(Head {
        seq: row.seq,
        row_hash: row.row_hash,
    })
}

/// Result of re-checking the whole chain.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainReport {
    pub rows: i64,
    pub head_seq: i64,
    pub head_hash: String,
    /// (seq, what is wrong)
    pub defects: Vec<(i64, String)>,
}

/// Walks the chain from the first row, recomputing every hash and link.
pub fn verify_chain(conn: &rusqlite::Connection) -> Result<ChainReport, DbError> {
    let mut stmt = conn
        .prepare(
            "SELECT seq, at, tenant, action_id, command_index, event, actor, evidence_sha256,
                    package_path, detail, prev_hash, row_hash FROM custody_log ORDER BY seq",
        )
        .map_err(DbError::sql("read custody log"))?;
    let rows = stmt
        .query_map([], |r| {
            Ok(Row {
                seq: r.get(0)?,
                at: r.get(1)?,
                tenant: r.get(2)?,
                action_id: r.get(3)?,
                command_index: r.get(4)?,
                event: r.get(5)?,
                actor: r.get(6)?,
                evidence_sha256: r.get(7)?,
                package_path: r.get(8)?,
                detail: r.get(9)?,
                prev_hash: r.get(10)?,
                row_hash: r.get(11)?,
            })
        })
        .map_err(DbError::sql("read custody log"))?;
    let mut report = ChainReport {
        rows: 0,
        head_seq: 0,
        head_hash: GENESIS_HASH.into(),
        defects: vec![],
    };
    for row in rows {
        let row = row.map_err(DbError::sql("read custody row"))?;
        let expected_seq = report.head_seq + 1;
        if row.seq != expected_seq {
            report.defects.push((
                row.seq,
                format!("sequence gap: expected seq {expected_seq}"),
            ));
        }
        if row.prev_hash != report.head_hash {
            report.defects.push((
                row.seq,
                "prev_hash does not match the previous row's row_hash".into(),
            ));
        }
        if row_hash(&row) != row.row_hash {
            report
                .defects
                .push((row.seq, "row_hash does not match the row's contents".into()));
        }
        report.rows += 1;
        report.head_seq = row.seq;
        report.head_hash = row.row_hash;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_matches_python_json_dumps() {
        // Reference computed with Python:
        // hashlib.sha256(json.dumps(arr, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()
        let row = Row {
            seq: 1,
            at: "2026-11-27T13:05:00.123Z".into(),
            tenant: "contoso".into(),
            action_id: "a1".into(),
            command_index: None,
            event: "DISCOVERED".into(),
            actor: "lrvault/0.1.0 app=c host=h uid=0".into(),
            evidence_sha256: None,
            package_path: None,
            detail: r#"{"name":"Ünïcode \"q\"\n"}"#.into(),
            prev_hash: GENESIS_HASH.into(),
            row_hash: String::new(),
        };
        // The exact text json.dumps prints, and the digest Python computed from it.
        let expected_json = r#"["0000000000000000000000000000000000000000000000000000000000000000",1,"2026-11-27T13:05:00.123Z","contoso","a1",null,"DISCOVERED","lrvault/0.1.0 app=c host=h uid=0",null,null,"{\"name\":\"Ünïcode \\\"q\\\"\\n\"}"]"#;
        assert_eq!(
            hex::encode(Sha256::digest(expected_json.as_bytes())),
            row_hash(&row)
        );
        assert_eq!(
            row_hash(&row),
            "b8f98bcb1a35d9a9c9d7cb5dd5b19606c32cfd50aaaf74460e13fd517428501e"
        );
    }
}
