//! The chain-of-custody log: append-only rows, each hashing the previous row's hash, so any
//! edit, deletion or reordering is detectable with sqlite3 and ten lines of any language
//! (formula in docs/audit.md §5-§6 and docs/audit.md).

use rusqlite::{OptionalExtension, Transaction, params};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::db::DbError;

mod walk;

pub use walk::{CHAIN_COLUMNS, ChainDefect, ChainWalk, walk};

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
    /// A package handed over in an examiner's kit (`lrvault export`).
    Exported,
    /// An online copy of the database (`lrvault backup`).
    BackedUp,
    /// The database was put back from a backup (`lrvault restore`); the detail names the
    /// anchors written after the backup, whose rows live on in the replaced file only.
    Restored,
    /// An attempt that failed and will be retried: its scope and reason.
    AttemptFailed,
    /// A checkpoint received its RFC 3161 token (docs/evidence-format.md §9).
    Anchored,
    /// A package is about to be placed in the store: the intent crash recovery adopts by.
    Publishing,
    /// A file found at a result's path was set aside instead of adopted.
    Quarantined,
    CaseTagged,
    CaseUntagged,
    LegalHoldSet,
    LegalHoldReleased,
}

impl EventKind {
    /// Every event, in the order docs/audit.md §5-§6 lists them; each is a row of `custody_events`.
    pub const ALL: [EventKind; 21] = [
        EventKind::Discovered,
        EventKind::Queued,
        EventKind::LinkIssued,
        EventKind::Downloaded,
        EventKind::Archived,
        EventKind::Unavailable,
        EventKind::Skipped,
        EventKind::Failed,
        EventKind::Verified,
        EventKind::VerifyFailed,
        EventKind::Exported,
        EventKind::BackedUp,
        EventKind::Restored,
        EventKind::AttemptFailed,
        EventKind::Anchored,
        EventKind::Publishing,
        EventKind::Quarantined,
        EventKind::CaseTagged,
        EventKind::CaseUntagged,
        EventKind::LegalHoldSet,
        EventKind::LegalHoldReleased,
    ];

    /// The event named `name` as stored in `custody_log.event`.
    pub fn parse(name: &str) -> Option<EventKind> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

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
            EventKind::Restored => "RESTORED",
            EventKind::AttemptFailed => "ATTEMPT_FAILED",
            EventKind::Anchored => "ANCHORED",
            EventKind::Publishing => "PUBLISHING",
            EventKind::Quarantined => "QUARANTINED",
            EventKind::CaseTagged => "CASE_TAGGED",
            EventKind::CaseUntagged => "CASE_UNTAGGED",
            EventKind::LegalHoldSet => "LEGAL_HOLD_SET",
            EventKind::LegalHoldReleased => "LEGAL_HOLD_RELEASED",
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

/// The hashed fields of one custody row, borrowed (from a [`Row`] or straight from SQLite).
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    pub prev_hash: &'a str,
    pub seq: i64,
    pub at: &'a str,
    pub tenant: &'a str,
    pub action_id: &'a str,
    pub command_index: Option<i64>,
    pub event: &'a str,
    pub actor: &'a str,
    pub evidence_sha256: Option<&'a str>,
    pub package_path: Option<&'a str>,
    pub detail: &'a str,
}

impl<'a> From<&'a Row> for Fields<'a> {
    fn from(row: &'a Row) -> Self {
        Fields {
            prev_hash: &row.prev_hash,
            seq: row.seq,
            at: &row.at,
            tenant: &row.tenant,
            action_id: &row.action_id,
            command_index: row.command_index,
            event: &row.event,
            actor: &row.actor,
            evidence_sha256: row.evidence_sha256.as_deref(),
            package_path: row.package_path.as_deref(),
            detail: &row.detail,
        }
    }
}

/// Computes row hashes with one reused buffer (the chain walk hashes a million rows a second).
#[derive(Default)]
pub struct RowHasher {
    json: Vec<u8>,
}

impl RowHasher {
    /// `row_hash` per docs/audit.md §5-§6 as lowercase hex: SHA-256 of the compact JSON array
    /// `[prev_hash, seq, at, tenant, action_id, command_index, event, actor, evidence_sha256, package_path, detail]`.
    pub fn hex(&mut self, f: &Fields<'_>) -> [u8; 64] {
        // serde_json's compact output equals Python's json.dumps(separators=(",", ":"),
        // ensure_ascii=False): same escapes, no spaces, non-ASCII kept as UTF-8. A tuple
        // serialises as a JSON array.
        self.json.clear();
        let fields = (
            f.prev_hash,
            f.seq,
            f.at,
            f.tenant,
            f.action_id,
            f.command_index,
            f.event,
            f.actor,
            f.evidence_sha256,
            f.package_path,
            f.detail,
        );
        serde_json::to_writer(&mut self.json, &fields).expect("serialising strings and integers");
        let mut out = [0u8; 64];
        hex::encode_to_slice(Sha256::digest(&self.json), &mut out).expect("64 hex digits");
        out
    }
}

/// `row_hash` per docs/audit.md §5-§6 (see [`RowHasher::hex`]).
pub fn row_hash(row: &Row) -> String {
    let hex = RowHasher::default().hex(&Fields::from(row));
    String::from_utf8_lossy(&hex).into_owned()
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

/// Whether `head` is a row of this chain (same seq, same hash).
pub fn has_row(conn: &rusqlite::Connection, head: &Head) -> Result<bool, DbError> {
    conn.query_row(
        "SELECT 1 FROM custody_log WHERE seq = ?1 AND row_hash = ?2",
        params![head.seq, head.row_hash],
        |_| Ok(()),
    )
    .optional()
    .map(|found| found.is_some())
    .map_err(DbError::sql("look up a custody row"))
}

/// The seq of the first RESTORED row: the database was put back from a backup there, and
/// anchors written after the backup may pin rows that live on in the replaced file only.
pub fn first_restore(conn: &rusqlite::Connection) -> Result<Option<i64>, DbError> {
    conn.query_row(
        "SELECT min(seq) FROM custody_log WHERE event = 'RESTORED'",
        [],
        |r| r.get(0),
    )
    .map_err(DbError::sql("look up RESTORED rows"))
}

/// Checkpoints that genuine RESTORED rows declared superseded: (seq, row_hash) of rows that
/// live on in a replaced database only. Only a checkpoint above the restored head counts,
/// and only from a RESTORED row that directly follows that head (docs/evidence-format.md §9); a
/// RESTORED row anywhere else is a defect ([`restore_defects`]) and supersedes nothing.
pub fn superseded_checkpoints(
    conn: &rusqlite::Connection,
) -> Result<std::collections::HashSet<(i64, String)>, DbError> {
    let mut stmt = conn
        .prepare(
            "SELECT json_extract(c.value, '$.seq'), json_extract(c.value, '$.row_hash')
             FROM custody_log l, json_each(l.detail, '$.superseded_checkpoints') c
             JOIN custody_log h ON h.seq = json_extract(l.detail, '$.restored_head.seq')
             WHERE l.event = 'RESTORED' AND json_valid(l.detail)
               AND h.seq = l.seq - 1 AND h.row_hash = json_extract(l.detail, '$.restored_head.row_hash')
               AND json_extract(c.value, '$.seq') > h.seq",
        )
        .map_err(DbError::sql("read RESTORED rows"))?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
        .map_err(DbError::sql("read RESTORED rows"))?;
    rows.collect::<Result<_, _>>()
        .map_err(DbError::sql("read RESTORED rows"))
}

/// RESTORED rows that are not what a restore writes: the row right after the head it
/// restored (same seq and hash), naming only checkpoints above that head. (seq, problem).
pub fn restore_defects(conn: &rusqlite::Connection) -> Result<Vec<(i64, String)>, DbError> {
    let mut stmt = conn
        .prepare(
            "SELECT l.seq, json_extract(l.detail, '$.restored_head.seq'),
                    json_extract(l.detail, '$.restored_head.row_hash'), h.row_hash,
                    (SELECT min(json_extract(c.value, '$.seq'))
                     FROM json_each(l.detail, '$.superseded_checkpoints') c)
             FROM custody_log l LEFT JOIN custody_log h ON h.seq = l.seq - 1
             WHERE l.event = 'RESTORED'",
        )
        .map_err(DbError::sql("read RESTORED rows"))?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Option<i64>>(1).ok().flatten(),
                r.get::<_, Option<String>>(2).ok().flatten(),
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<i64>>(4).ok().flatten(),
            ))
        })
        .map_err(DbError::sql("read RESTORED rows"))?;
    let mut defects = Vec::new();
    for row in rows {
        let (seq, head_seq, head_hash, before_hash, lowest) =
            row.map_err(DbError::sql("read RESTORED rows"))?;
        // A backup with an empty chain is restored at seq 0, before the genesis hash.
        let before_hash = before_hash.or_else(|| (seq == 1).then(|| GENESIS_HASH.to_string()));
        if head_seq != Some(seq - 1) || head_hash.is_none() || head_hash != before_hash {
            defects.push((
                seq,
                format!(
                    "a RESTORED row must directly follow the head it restored; it names seq {} ({}), the row before it is seq {} ({})",
                    head_seq.map_or("nothing".into(), |s| s.to_string()),
                    head_hash.as_deref().unwrap_or("no hash"),
                    seq - 1,
                    before_hash.as_deref().unwrap_or("none")
                ),
            ));
        } else if let Some(lowest) = lowest.filter(|&l| l < seq) {
            defects.push((
                seq,
                format!(
                    "a RESTORED row supersedes checkpoint seq {lowest}, at or below the head it restored (seq {})",
                    seq - 1
                ),
            ));
        }
    }
    Ok(defects)
}

/// A row of the chain that pins every row up to it: `{"seq": N, "row_hash": "…"}` in a
/// package's `retrieval.json` (docs/evidence-format.md §9).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Head {
    pub seq: i64,
    pub row_hash: String,
}

/// Appends `ev` as one custody row in its own write transaction, on the database's writer
/// thread, and returns it (the chain's new head). A row that must commit together with other
/// changes is appended with [`append`] inside the caller's transaction instead.
pub async fn record(db: &crate::db::Db, ev: Event<'_>) -> Result<Head, DbError> {
    let owned = ev.to_owned_event();
    db.call(move |c| {
        let tx = crate::db::write_tx(c)?;
        let head = append(&tx, &owned.as_event())?;
        tx.commit().map_err(DbError::sql("commit custody row"))?;
        Ok(head)
    })
    .await
}

/// Appends `ev` inside the caller's write transaction (which serialises appends, so `seq`
/// has no gaps). Returns the new row, now the chain's head.
pub fn append(tx: &Transaction<'_>, ev: &Event<'_>) -> Result<Head, DbError> {
    append_at(tx, ev).map(|(head, _)| head)
}

/// [`append`], also returning the row's `at`: rows that record the same moment (an action's
/// `discovered_at`, a package's `archived_at`) take it from here, so verify can prove them.
pub fn append_at(tx: &Transaction<'_>, ev: &Event<'_>) -> Result<(Head, String), DbError> {
    let (last_seq, prev_hash, last_at): (i64, String, String) = tx
        .query_row(
            "SELECT seq, row_hash, at FROM custody_log ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .map_err(DbError::sql("read custody head"))?
        .unwrap_or((0, GENESIS_HASH.to_string(), String::new()));
    // Never earlier than the row before (docs/audit.md §5-§6): a clock stepped back cannot reorder the
    // log, so a row earlier than its predecessor can only be a forgery.
    let now = crate::time::now_str();
    let at = if now < last_at { last_at } else { now };
    let detail = match &ev.detail {
        Value::Null => "{}".to_string(),
        v => v.to_string(),
    };
    let mut row = Row {
        seq: last_seq + 1,
        at,
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
    Ok((
        Head {
            seq: row.seq,
            row_hash: row.row_hash,
        },
        row.at,
    ))
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
