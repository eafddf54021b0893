//! The chain walk: every custody row recomputed from seq 1 (docs/audit.md §5-§6), streamed so memory
//! stays flat however long the chain is. Reading runs on the caller's thread (SQLite, types,
//! links and gaps) and hashing on a second one, a batch of rows at a time: each row's hash
//! covers only its own stored fields, so the two halves never wait on each other's results.
//! A row whose columns do not have their types is a defect, never an error.

use std::ops::Range;
use std::sync::mpsc;

use super::{EventKind, Fields, GENESIS_HASH, Head, RowHasher};
use crate::db::DbError;

/// The columns the walk reads, in its order.
pub const CHAIN_COLUMNS: &str = "seq, at, tenant, action_id, command_index, event, actor, evidence_sha256, \
     package_path, detail, prev_hash, row_hash";

const BATCH: usize = 2048;

/// One thing wrong with one custody row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainDefect {
    pub seq: i64,
    pub problem: String,
}

/// What a walk saw.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainWalk {
    pub rows: i64,
    /// The last row (its stored hash), or seq 0 and the genesis hash.
    pub head: Head,
    /// CPU seconds of the reading thread and of the hashing thread: on an idle machine the
    /// walk takes as long as the busier of the two, whatever else shares the cores.
    pub reader_cpu_secs: f64,
    pub hasher_cpu_secs: f64,
    /// The newest `at` seen so far: a row earlier than it is a defect (docs/audit.md §5-§6).
    pub last_at: String,
}

/// CPU time the calling thread has used so far, in seconds.
fn thread_cpu_secs() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
        .unwrap_or(0.0)
}

/// The text columns, in the order [`Pending::text`] keeps them, with their index in
/// [`CHAIN_COLUMNS`].
const TEXT_COLUMNS: [(usize, &str); 8] = [
    (10, "prev_hash"),
    (1, "at"),
    (2, "tenant"),
    (3, "action_id"),
    (5, "event"),
    (6, "actor"),
    (9, "detail"),
    (11, "row_hash"),
];

/// A row whose columns have their types, waiting to be hashed: its text fields as ranges of
/// the batch's bytes (checked for UTF-8 on the hashing thread).
struct Pending {
    seq: i64,
    command_index: Option<i64>,
    /// In the order of [`TEXT_COLUMNS`].
    text: [Range<usize>; 8],
    evidence_sha256: Option<Range<usize>>,
    package_path: Option<Range<usize>>,
}

/// Rows read but not yet hashed, with what the reader already found wrong.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    rows: Vec<Pending>,
    defects: Vec<ChainDefect>,
    read: u64,
}

impl Batch {
    fn clear(&mut self) {
        self.bytes.clear();
        self.rows.clear();
        self.defects.clear();
        self.read = 0;
    }

    fn push(&mut self, b: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(b);
        start..self.bytes.len()
    }

    /// Recomputes every row's hash; a mismatch (or text that is not UTF-8) joins the batch's
    /// defects, in seq order.
    fn hash(&mut self, hasher: &mut RowHasher) {
        for row in &self.rows {
            let mut bad = None;
            let mut t = |r: &Range<usize>, name: &'static str| match std::str::from_utf8(
                &self.bytes[r.clone()],
            ) {
                Ok(s) => s,
                Err(_) => {
                    bad.get_or_insert(name);
                    ""
                }
            };
            let text: [&str; 8] = std::array::from_fn(|i| t(&row.text[i], TEXT_COLUMNS[i].1));
            let fields = Fields {
                prev_hash: text[0],
                seq: row.seq,
                at: text[1],
                tenant: text[2],
                action_id: text[3],
                command_index: row.command_index,
                event: text[4],
                actor: text[5],
                evidence_sha256: row
                    .evidence_sha256
                    .as_ref()
                    .map(|r| t(r, "evidence_sha256")),
                package_path: row.package_path.as_ref().map(|r| t(r, "package_path")),
                detail: text[6],
            };
            let problem = match bad {
                Some(name) => format!("{name} is not valid UTF-8"),
                None if hasher.hex(&fields).as_slice() != text[7].as_bytes() => {
                    "row_hash does not match the row's contents".into()
                }
                None => continue,
            };
            self.defects.push(ChainDefect {
                seq: row.seq,
                problem,
            });
        }
        // Reader defects of a row come first, then its hash (a stable sort keeps that).
        self.defects.sort_by_key(|d| d.seq);
    }
}

/// Walks the whole chain on `conn` (the caller's read transaction fixes the snapshot), calling
/// `on_defect` for every problem, in seq order, and `on_rows` after each batch of rows.
pub fn walk(
    conn: &rusqlite::Connection,
    mut on_defect: impl FnMut(ChainDefect),
    mut on_rows: impl FnMut(u64),
) -> Result<ChainWalk, DbError> {
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {CHAIN_COLUMNS} FROM custody_log ORDER BY seq"
        ))
        .map_err(DbError::sql("read custody log"))?;
    let mut rows = stmt.query([]).map_err(DbError::sql("read custody log"))?;
    let mut state = ChainWalk {
        rows: 0,
        head: Head {
            seq: 0,
            row_hash: GENESIS_HASH.to_string(),
        },
        reader_cpu_secs: 0.0,
        hasher_cpu_secs: 0.0,
        last_at: String::new(),
    };
    let reader_started = thread_cpu_secs();
    let hasher_cpu = std::thread::scope(|scope| {
        let (to_hasher, batches) = mpsc::sync_channel::<Batch>(2);
        // Unbounded, so the hasher never blocks; the reader drains it after every batch it
        // sends, which bounds it by the two batches in flight.
        let (to_reader, hashed) = mpsc::channel::<Batch>();
        let hashing = scope.spawn(move || {
            let started = thread_cpu_secs();
            let mut hasher = RowHasher::default();
            for mut batch in batches {
                batch.hash(&mut hasher);
                if to_reader.send(batch).is_err() {
                    break;
                }
            }
            thread_cpu_secs() - started
        });
        let mut spare: Vec<Batch> = Vec::new();
        let mut emit = |batch: Batch, spare: &mut Vec<Batch>| {
            on_rows(batch.read);
            let mut batch = batch;
            for defect in batch.defects.drain(..) {
                on_defect(defect);
            }
            spare.push(batch);
        };
        let mut batch = Batch::default();
        loop {
            let next = rows.next().map_err(DbError::sql("read custody row"))?;
            let done = next.is_none();
            if let Some(row) = next {
                state.read_row(row, &mut batch);
            }
            if batch.read as usize >= BATCH || (done && batch.read > 0) {
                let fresh = spare.pop().unwrap_or_default();
                if to_hasher
                    .send(std::mem::replace(&mut batch, fresh))
                    .is_err()
                {
                    break;
                }
                batch.clear();
                while let Ok(hashed) = hashed.try_recv() {
                    emit(hashed, &mut spare);
                }
            }
            if done {
                break;
            }
        }
        drop(to_hasher);
        for hashed in hashed {
            emit(hashed, &mut spare);
        }
        Ok::<f64, DbError>(hashing.join().unwrap_or(0.0))
    })?;
    state.reader_cpu_secs = thread_cpu_secs() - reader_started;
    state.hasher_cpu_secs = hasher_cpu;
    Ok(state)
}

impl ChainWalk {
    /// Reads the next row: its column types, its seq and its link to the row before; queues it
    /// for hashing when every column has its type. (UTF-8 is checked by the hashing thread.)
    fn read_row(&mut self, row: &rusqlite::Row<'_>, batch: &mut Batch) {
        use rusqlite::types::ValueRef;
        let seq = match row.get_ref(0) {
            Ok(ValueRef::Integer(seq)) => seq,
            _ => self.head.seq + 1,
        };
        let mut problems = Vec::new();
        let mut typed = |i: usize, name: &str, nullable: bool| -> Option<Option<&[u8]>> {
            match row.get_ref(i) {
                Ok(ValueRef::Text(bytes)) => Some(Some(bytes)),
                Ok(ValueRef::Null) if nullable => Some(None),
                Ok(ValueRef::Null) => {
                    problems.push(format!("{name} is NULL"));
                    None
                }
                Ok(other) => {
                    problems.push(format!("{name} holds {}, expected TEXT", other.data_type()));
                    None
                }
                Err(e) => {
                    problems.push(format!("{name} cannot be read: {e}"));
                    None
                }
            }
        };
        let text = TEXT_COLUMNS.map(|(i, name)| typed(i, name, false).flatten());
        let evidence_sha256 = typed(7, "evidence_sha256", true);
        let package_path = typed(8, "package_path", true);
        let command_index = match row.get_ref(4) {
            Ok(ValueRef::Integer(n)) => Some(Some(n)),
            Ok(ValueRef::Null) => Some(None),
            Ok(other) => {
                problems.push(format!(
                    "command_index holds {}, expected INTEGER",
                    other.data_type()
                ));
                None
            }
            Err(e) => {
                problems.push(format!("command_index cannot be read: {e}"));
                None
            }
        };
        let expected_seq = self.head.seq + 1;
        if seq != expected_seq {
            problems.push(format!("sequence gap: expected seq {expected_seq}"));
        }
        if text[0].is_some_and(|p| p != self.head.row_hash.as_bytes()) {
            problems.push("prev_hash does not match the previous row's row_hash".into());
        }
        // RFC 3339 UTC with milliseconds sorts as text; a clock step back is absorbed when the
        // row is appended, so an earlier time can only have been written by hand.
        if let Some(at) = text[1] {
            if at < self.last_at.as_bytes() {
                problems.push(format!(
                    "at {} is earlier than the previous row's {}",
                    String::from_utf8_lossy(at),
                    self.last_at
                ));
            } else {
                self.last_at.clear();
                self.last_at.push_str(&String::from_utf8_lossy(at));
            }
        }
        if let Some(event) = text[4]
            && EventKind::ALL
                .iter()
                .all(|k| k.as_str().as_bytes() != event)
        {
            problems.push(format!(
                "unknown event {:?}",
                String::from_utf8_lossy(event)
            ));
        }
        batch.defects.extend(
            problems
                .into_iter()
                .map(|problem| ChainDefect { seq, problem }),
        );
        batch.read += 1;
        if let (true, Some(command_index), Some(evidence_sha256), Some(package_path)) = (
            text.iter().all(Option::is_some),
            command_index,
            evidence_sha256,
            package_path,
        ) {
            let pending = Pending {
                seq,
                command_index,
                text: std::array::from_fn(|i| batch.push(text[i].unwrap_or_default())),
                evidence_sha256: evidence_sha256.map(|b| batch.push(b)),
                package_path: package_path.map(|b| batch.push(b)),
            };
            batch.rows.push(pending);
        }
        self.rows += 1;
        self.head.seq = seq;
        self.head.row_hash.clear();
        let stored = text[7].and_then(|b| std::str::from_utf8(b).ok());
        self.head.row_hash.push_str(stored.unwrap_or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::custody::{Event, append};
    use crate::db::{Db, write_tx};

    fn chain(rows: u32) -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_migrated(&dir.path().join("l.db")).unwrap();
        db.call_sync(move |c| {
            let tx = write_tx(c)?;
            for i in 0..rows {
                append(
                    &tx,
                    &Event::new("t", &format!("a{i}"), Some(i % 4), EventKind::Queued, "me")
                        .detail(serde_json::json!({ "n": i, "text": "ünï \"q\"\n" })),
                )?;
            }
            tx.commit().map_err(DbError::sql("commit"))
        })
        .unwrap();
        (dir, db)
    }

    fn defects(db: &Db) -> (ChainWalk, Vec<ChainDefect>, u64) {
        db.call_sync(move |c| {
            let mut found = Vec::new();
            let mut counted = 0;
            let walk = walk(c, |d| found.push(d), |n| counted += n)?;
            Ok((walk, found, counted))
        })
        .unwrap()
    }

    #[test]
    fn a_long_chain_recomputes_across_batches() {
        let (_dir, db) = chain(5000);
        let (walk, found, counted) = defects(&db);
        assert_eq!(found, vec![]);
        assert_eq!((walk.rows, walk.head.seq, counted), (5000, 5000, 5000));
        let head = db.call_sync(move |c| crate::custody::head(c)).unwrap();
        assert_eq!(walk.head.row_hash, head.1);
    }

    #[test]
    fn defects_come_in_seq_order_with_types_links_and_hashes() {
        let (_dir, db) = chain(4500);
        db.call_sync(move |c| {
            c.execute_batch(
                "PRAGMA foreign_keys = OFF;
                 DROP TRIGGER custody_log_no_update; DROP TRIGGER custody_log_no_delete;
                 UPDATE custody_log SET actor = 'x' WHERE seq = 4100;
                 UPDATE custody_log SET command_index = 'two' WHERE seq = 2500;
                 DELETE FROM custody_log WHERE seq = 30;
                 UPDATE custody_log SET event = 'LOST' WHERE seq = 3;
                 UPDATE custody_log SET tenant = CAST(X'FF' AS TEXT) WHERE seq = 10;",
            )
            .map_err(DbError::sql("tamper"))
        })
        .unwrap();
        let (walk, found, _) = defects(&db);
        let found: Vec<(i64, &str)> = found.iter().map(|d| (d.seq, d.problem.as_str())).collect();
        assert_eq!(
            found,
            vec![
                (3, "unknown event \"LOST\""),
                (3, "row_hash does not match the row's contents"),
                (10, "tenant is not valid UTF-8"),
                (31, "sequence gap: expected seq 30"),
                (31, "prev_hash does not match the previous row's row_hash"),
                (2500, "command_index holds Text, expected INTEGER"),
                (4100, "row_hash does not match the row's contents"),
            ]
        );
        assert_eq!((walk.rows, walk.head.seq), (4499, 4500));
    }
}
