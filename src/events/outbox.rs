//! The outbox (docs/operations.md §16): which kinds each sink receives (`event_sinks`, the
//! daemon's `[events]` written at start), the events waiting for a sink in delivery order,
//! each built from the custody row it mirrors, and each sink's last delivery and error.
//! The rows themselves are written by triggers in the transaction of the custody row or the
//! breaker's state (migration 08), so no writer of those can forget them.

use rusqlite::{Connection, params};
use serde_json::{Value, json};

use crate::config::EventsConfig;
use crate::db::{Db, DbError, write_tx};

/// One event waiting for one sink.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// The outbox row (delivery order).
    pub id: i64,
    pub kind: String,
    /// The event's time (the custody row's `at`): the syslog timestamp.
    pub at: String,
    /// The event object (docs/operations.md §16).
    pub event: Value,
}

impl Pending {
    /// The event as sent: compact JSON.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&self.event).expect("a JSON value serialises")
    }
}

/// Writes the sinks `events` configures, each with its kinds, in place of the last ones, and
/// drops what waits for a sink no longer configured. Returns how many rows were dropped.
pub async fn configure(db: &Db, events: &EventsConfig) -> Result<usize, DbError> {
    let sinks = events.sinks();
    let kinds = events.kinds.clone();
    db.call(move |c| {
        let tx = write_tx(c)?;
        let op = DbError::sql("record the event sinks");
        tx.execute("DELETE FROM event_sinks", []).map_err(op)?;
        for sink in &sinks {
            for kind in &kinds {
                tx.execute(
                    "INSERT INTO event_sinks (sink, kind) VALUES (?1, ?2)",
                    params![sink, kind],
                )
                .map_err(DbError::sql("record the event sinks"))?;
            }
        }
        let dropped = tx
            .execute(
                "DELETE FROM event_outbox WHERE sink NOT IN (SELECT sink FROM event_sinks)",
                [],
            )
            .map_err(DbError::sql("drop events of removed sinks"))?;
        tx.commit()
            .map_err(DbError::sql("record the event sinks"))?;
        Ok(dropped)
    })
    .await
}

/// The next `limit` events waiting for `sink`, oldest first.
pub fn next(conn: &Connection, sink: &str, limit: i64) -> Result<Vec<Pending>, DbError> {
    let op = "read the event outbox";
    let mut stmt = conn
        .prepare_cached(
            "SELECT o.id, o.kind, o.at, o.tenant, o.custody_seq, o.detail,
                    c.action_id, c.command_index, c.evidence_sha256, c.package_path, c.detail,
                    (SELECT e.evidence_id FROM evidence e WHERE e.tenant = c.tenant
                       AND e.action_id = c.action_id AND e.command_index = c.command_index)
             FROM event_outbox o LEFT JOIN custody_log c ON c.seq = o.custody_seq
             WHERE o.sink = ?1 ORDER BY o.id LIMIT ?2",
        )
        .map_err(DbError::sql(op))?;
    let rows = stmt
        .query_map(params![sink, limit], |r| {
            let kind: String = r.get(1)?;
            let at: String = r.get(2)?;
            let seq: Option<i64> = r.get(4)?;
            let own: String = r.get(5)?;
            let row_detail: Option<String> = r.get(10)?;
            let detail = parse(row_detail.as_deref().unwrap_or(&own));
            let event = json!({
                "kind": kind,
                "at": at,
                "tenant": r.get::<_, String>(3)?,
                "seq": seq,
                "action_id": r.get::<_, Option<String>>(6)?,
                "command_index": r.get::<_, Option<i64>>(7)?,
                "evidence_id": r.get::<_, Option<String>>(11)?,
                "package_path": r.get::<_, Option<String>>(9)?,
                "sha256": r.get::<_, Option<String>>(8)?,
                "case": detail.get("case").filter(|c| c.is_string()).cloned(),
                "detail": event_detail(&kind, detail),
            });
            Ok(Pending {
                id: r.get(0)?,
                kind,
                at,
                event,
            })
        })
        .map_err(DbError::sql(op))?;
    rows.collect::<Result<_, _>>().map_err(DbError::sql(op))
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| json!({ "unparsed": text }))
}

/// The event's `detail`: a CHECKPOINT's is `{seq, row_hash, token_sha256}` of the
/// checkpoint; every other kind's is its row's detail with no URL query (a SAS signature or a
/// `token=` lives there).
fn event_detail(kind: &str, detail: Value) -> Value {
    if kind == "CHECKPOINT" {
        return json!({
            "seq": detail.get("checkpoint_seq"),
            "row_hash": detail.get("row_hash"),
            "token_sha256": detail.get("token_sha256"),
        });
    }
    without_queries(detail)
}

/// Every string that holds a URL loses its query and fragment.
fn without_queries(v: Value) -> Value {
    match v {
        Value::String(s) if s.contains("://") => Value::String(
            s.split_whitespace()
                .map(|w| match w.find(['?', '#']) {
                    Some(i) if w.contains("://") => &w[..i],
                    _ => w,
                })
                .collect::<Vec<_>>()
                .join(" "),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(without_queries).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| (k, without_queries(v)))
                .collect(),
        ),
        other => other,
    }
}

/// `sink` took event `id`: it leaves the outbox, and the sink's state says when.
pub async fn delivered(db: &Db, sink: &'static str, id: i64) -> Result<(), DbError> {
    db.call(move |c| {
        let tx = write_tx(c)?;
        tx.execute("DELETE FROM event_outbox WHERE id = ?1", [id])
            .map_err(DbError::sql("remove a delivered event"))?;
        tx.execute(
            "INSERT INTO event_sink_state (sink, delivered_at) VALUES (?1, ?2)
             ON CONFLICT (sink) DO UPDATE SET delivered_at = excluded.delivered_at",
            params![sink, crate::time::now_str()],
        )
        .map_err(DbError::sql("record a delivery"))?;
        tx.commit().map_err(DbError::sql("record a delivery"))
    })
    .await
}

/// `sink` refused or could not be reached: its last error, for `status`.
pub async fn failed(db: &Db, sink: &'static str, error: String) -> Result<(), DbError> {
    db.call(move |c| {
        c.execute(
            "INSERT INTO event_sink_state (sink, last_error, last_error_at, failures) VALUES (?1, ?2, ?3, 1)
             ON CONFLICT (sink) DO UPDATE SET last_error = excluded.last_error,
               last_error_at = excluded.last_error_at, failures = failures + 1",
            params![sink, error, crate::time::now_str()],
        )
        .map(|_| ())
        .map_err(DbError::sql("record a delivery error"))
    })
    .await
}

/// A sink as `status` and the metrics show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SinkState {
    pub sink: String,
    /// Events waiting.
    pub backlog: i64,
    /// The `at` of the next event to send.
    pub oldest_waiting: Option<String>,
    pub delivered_at: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
}

/// Every sink that is configured, has events waiting or has a recorded state.
pub fn sink_states(conn: &Connection) -> Result<Vec<SinkState>, DbError> {
    let op = "read the event sinks";
    let mut stmt = conn
        .prepare_cached(
            "SELECT s.sink,
                    (SELECT count(*) FROM event_outbox o WHERE o.sink = s.sink),
                    (SELECT o.at FROM event_outbox o WHERE o.sink = s.sink ORDER BY o.id LIMIT 1),
                    st.delivered_at, st.last_error, st.last_error_at
             FROM (SELECT sink FROM event_sinks UNION SELECT sink FROM event_outbox
                   UNION SELECT sink FROM event_sink_state) s
             LEFT JOIN event_sink_state st ON st.sink = s.sink
             ORDER BY s.sink",
        )
        .map_err(DbError::sql(op))?;
    let rows = stmt
        .query_map([], |r| {
            Ok(SinkState {
                sink: r.get(0)?,
                backlog: r.get(1)?,
                oldest_waiting: r.get(2)?,
                delivered_at: r.get(3)?,
                last_error: r.get(4)?,
                last_error_at: r.get(5)?,
            })
        })
        .map_err(DbError::sql(op))?;
    rows.collect::<Result<_, _>>().map_err(DbError::sql(op))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SyslogTarget;
    use crate::custody::{self, Event, EventKind};
    use crate::jobs::breaker::{self, Open};
    use crate::jobs::failure::TenantTrouble;

    fn events(kinds: &[&str]) -> EventsConfig {
        EventsConfig {
            webhook: None,
            syslog: Some(SyslogTarget::Udp("127.0.0.1:514".into())),
            kinds: kinds.iter().map(|k| k.to_string()).collect(),
        }
    }

    async fn append(db: &Db, kind: EventKind, detail: Value) -> i64 {
        let head = custody::record(
            db,
            Event {
                evidence_sha256: Some("ab"),
                package_path: Some("t/p.zip"),
                ..Event::new("t", "a1", Some(0), kind, "me").detail(detail)
            },
        );
        head.await.unwrap().seq
    }

    #[tokio::test]
    async fn the_custody_row_and_the_breaker_write_the_outbox_only_for_configured_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_migrated(&dir.path().join("e.db")).unwrap();
        // No sink configured: nothing is written.
        append(&db, EventKind::Archived, json!({})).await;
        let read = |db: &Db| {
            let db = db.clone();
            async move { db.read(|c| next(c, "syslog", 100)).await }
        };
        assert_eq!(read(&db).await.unwrap(), vec![]);

        assert_eq!(
            configure(
                &db,
                &events(&["ARCHIVED", "CHECKPOINT", "BREAKER_OPEN", "BREAKER_CLOSED"])
            )
            .await
            .unwrap(),
            0
        );
        let archived = append(
            &db,
            EventKind::Archived,
            json!({"note": "see https://h/x?sig=SECRET&token=T"}),
        )
        .await;
        append(&db, EventKind::Discovered, json!({})).await;
        let anchored = append(
            &db,
            EventKind::Anchored,
            json!({"checkpoint_seq": 2, "row_hash": "rh", "token_sha256": "th", "tsa": "https://tsa/?token=T"}),
        )
        .await;
        let open = Open {
            kind: TenantTrouble::Outage,
            reason: "token endpoint unavailable (HTTP 503)".into(),
            since: "2026-12-07T15:00:00.000Z".into(),
            next_probe_at: "2026-12-07T15:00:30.000Z".into(),
            interval_ms: 30_000,
        };
        breaker::record(&db, "t", Some(open.clone())).await;
        // Still open (an upsert): no second BREAKER_OPEN.
        breaker::record(&db, "t", Some(open)).await;
        breaker::record(&db, "t", None).await;

        let got = read(&db).await.unwrap();
        let kinds: Vec<&str> = got.iter().map(|p| p.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["ARCHIVED", "CHECKPOINT", "BREAKER_OPEN", "BREAKER_CLOSED"]
        );
        assert_eq!(
            got[0].event,
            json!({"kind": "ARCHIVED", "at": got[0].at, "tenant": "t", "seq": archived,
                   "action_id": "a1", "command_index": 0, "evidence_id": null,
                   "package_path": "t/p.zip", "sha256": "ab", "case": null,
                   "detail": {"note": "see https://h/x"}})
        );
        assert_eq!(got[1].event["seq"], json!(anchored));
        assert_eq!(
            got[1].event["detail"],
            json!({"seq": 2, "row_hash": "rh", "token_sha256": "th"})
        );
        assert_eq!(got[2].event["seq"], Value::Null);
        assert_eq!(
            got[2].event["detail"],
            json!({"scope": "tenant", "reason": "token endpoint unavailable (HTTP 503)",
                   "next_probe_at": "2026-12-07T15:00:30.000Z"})
        );
        assert_eq!(got[3].event["detail"]["next_probe_at"], Value::Null);

        // Delivered events leave; the state says when; errors are kept for status.
        delivered(&db, "syslog", got[0].id).await.unwrap();
        failed(&db, "syslog", "syslog: udp 127.0.0.1:514: refused".into())
            .await
            .unwrap();
        let states = db.read(sink_states).await.unwrap();
        assert_eq!(states.len(), 1);
        assert_eq!(states[0].backlog, 3);
        assert_eq!(
            states[0].oldest_waiting.as_deref(),
            Some(got[1].at.as_str())
        );
        assert!(states[0].delivered_at.is_some());
        assert_eq!(
            states[0].last_error.as_deref(),
            Some("syslog: udp 127.0.0.1:514: refused")
        );

        // A sink no longer configured loses what waited for it.
        assert_eq!(configure(&db, &EventsConfig::default()).await.unwrap(), 3);
        append(&db, EventKind::Archived, json!({})).await;
        assert_eq!(read(&db).await.unwrap(), vec![]);
    }
}
