//! The SQLite database: opening it (WAL, foreign keys, busy timeout), the embedded
//! migrations, and the one connection of this process that writes. Only the holder of the
//! instance lock ([`InstanceLock`]: `run`, `migrate`, `restore`) creates or migrates the
//! database ([`migrate`]); every other opening ([`Db::open`], [`Db::open_for_reading`])
//! refuses a database at another schema version than this build's, so a newer command never
//! changes the schema under an older daemon (docs/operations.md §11). The writing connection lives on
//! its own thread: every write is a closure sent to it through [`Db::call`], so writes are
//! serialised without a lock anyone could hold too long. Reads that may take a while go to
//! read-only connections ([`Db::read`]) and never hold the writer. Other processes (a daemon
//! beside a backfill, an auditor's sqlite3) share the file through SQLite's own locking.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use include_dir::{Dir, include_dir};
use rusqlite::{Connection, OpenFlags};
use rusqlite_migration::Migrations;

static MIGRATIONS_DIR: Dir = include_dir!("$CARGO_MANIFEST_DIR/migrations");

/// How long a writer waits for another process's transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create the database directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot migrate database {path}: {message}")]
    Migrate { path: PathBuf, message: String },
    /// The database does not exist yet: only `run` and `migrate` create it (exit code 2).
    #[error("{hint}")]
    NotCreated {
        path: PathBuf,
        #[source]
        hint: crate::error::UserError,
    },
    /// The database is at another schema version than this build's: only `run` and `migrate`
    /// change it, and only under the instance lock (exit code 2).
    #[error("{0}")]
    Schema(#[source] crate::error::UserError),
    /// Another process holds the instance lock (exit code 2).
    #[error("{0}")]
    Locked(#[source] crate::error::UserError),
    #[error("database error during {op}: {source}")]
    Sql {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database task failed: {0}")]
    Join(String),
    /// This process may not write the database (owner, mode, user named); exit code 2.
    #[error("{0}")]
    Access(#[source] crate::error::UserError),
    #[error("cannot copy database {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

impl DbError {
    pub fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> DbError {
        move |source| DbError::Sql { op, source }
    }
}

/// A unit of work for the writer thread.
type WriterJob = Box<dyn FnOnce(&mut Connection) + Send>;

/// The process's database: the writer thread's mailbox and a small pool of read-only
/// connections. Cheap to clone; the writer thread ends when the last clone is dropped.
#[derive(Clone)]
pub struct Db {
    path: PathBuf,
    writer: mpsc::Sender<WriterJob>,
    readers: Arc<Mutex<Vec<Connection>>>,
    /// At most [`READER_POOL`] reads at once: the blocking threads and connections reads take
    /// stay bounded however many tenants ask at the same moment.
    reading: Arc<tokio::sync::Semaphore>,
}

/// Read-only connections kept for reuse.
const READER_POOL: usize = 4;

fn migrations() -> Migrations<'static> {
    // The directory is embedded at build time; a malformed one is a build bug, caught by tests.
    Migrations::from_directory(&MIGRATIONS_DIR)
        .expect("embedded migrations directory is well-formed")
}

/// Number of migrations this build knows.
pub fn schema_version_known() -> usize {
    MIGRATIONS_DIR.dirs().count()
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

/// WAL lets auditors read while the daemon writes; FULL makes every commit durable.
fn set_journal(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))?;
    conn.pragma_update(None, "synchronous", "FULL")
}

/// The schema version of `conn` (SQLite's `user_version`: how many migrations it has had).
fn schema_version(conn: &Connection, path: &Path) -> Result<usize, DbError> {
    conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))
        .map(|v| v.max(0) as usize)
        .map_err(|source| DbError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// The refusal of a database at schema `found` when this build knows `known`: an older one is
/// migrated by the service's start or `lrvault migrate`, a newer one needs a newer lrvault.
fn schema_mismatch(path: &Path, found: usize, known: usize) -> DbError {
    let what = if found < known {
        "restart the service, which migrates it when it starts, or run `lrvault migrate` while it is stopped"
    } else {
        "upgrade lrvault (a newer one migrated it)"
    };
    DbError::Schema(crate::error::UserError::new(format!(
        "database {} is at schema {found}, this lrvault knows {known}: {what}",
        path.display()
    )))
}

/// Refuses a database at any other schema version than this build's.
fn check_version(conn: &Connection, path: &Path) -> Result<(), DbError> {
    let (found, known) = (schema_version(conn, path)?, schema_version_known());
    if found == known {
        Ok(())
    } else {
        Err(schema_mismatch(path, found, known))
    }
}

fn not_created(path: &Path, config: Option<&Path>) -> DbError {
    DbError::NotCreated {
        path: path.to_path_buf(),
        hint: crate::error::UserError::new(first_start_hint(path, config)),
    }
}

impl DbError {
    /// The same error, its first-start hint naming the config file the command was given.
    pub fn for_config(self, config: &Path) -> DbError {
        match self {
            DbError::NotCreated { path, .. } => not_created(&path, Some(config)),
            e => e,
        }
    }
}

/// `<db>.lock`, held exclusively by the one process that may change the database's schema:
/// the daemon for its lifetime, `migrate` and `restore` while they work. Released on drop.
pub struct InstanceLock {
    _file: std::fs::File,
    db: PathBuf,
    pub path: PathBuf,
}

impl InstanceLock {
    /// Takes the lock of the database at `db` (creating its directory, after the access
    /// checks); a second holder gets one line naming the lock (exit code 2).
    pub fn take(db: &Path) -> Result<InstanceLock, DbError> {
        use std::io::{Read, Seek, Write};
        check_writable(db)?;
        if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| DbError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut path = db.as_os_str().to_owned();
        path.push(".lock");
        let path = PathBuf::from(path);
        let refused = |m: String| DbError::Locked(crate::error::UserError::new(m));
        let mut file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| refused(format!("cannot open lock file {}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => {
                // The holder's pid, for the refusal a second process prints (best effort).
                let _ = file
                    .set_len(0)
                    .and_then(|()| file.rewind())
                    .and_then(|()| writeln!(file, "{}", std::process::id()));
                Ok(InstanceLock {
                    _file: file,
                    db: db.to_path_buf(),
                    path,
                })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = match file
                    .read_to_string(&mut text)
                    .map(|_| text.trim().parse::<u32>())
                {
                    Ok(Ok(pid)) => format!("pid {pid} holds lock {}", path.display()),
                    _ => format!("lock {} is held", path.display()),
                };
                Err(refused(format!(
                    "another lrvault daemon is already running on {} ({holder})",
                    db.display(),
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                Err(refused(format!("cannot lock {}: {e}", path.display())))
            }
        }
    }
}

/// The schema versions of a database before and after [`migrate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    pub from: usize,
    pub to: usize,
}

/// Creates the database the lock guards if it does not exist, and applies the pending
/// migrations (docs/operations.md §11). Only the lock's holder changes the schema, so no
/// running daemon ever sees it change under it. A newer database is refused.
pub fn migrate(lock: &InstanceLock) -> Result<Migrated, DbError> {
    let path = lock.db.as_path();
    let open_err = |source| DbError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut conn = Connection::open(path).map_err(open_err)?;
    configure(&conn).map_err(open_err)?;
    let (from, known) = (schema_version(&conn, path)?, schema_version_known());
    if from > known {
        return Err(schema_mismatch(path, from, known));
    }
    set_journal(&conn).map_err(open_err)?;
    migrations()
        .to_latest(&mut conn)
        .map_err(|e| DbError::Migrate {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok(Migrated { from, to: known })
}

impl Db {
    /// Opens the database's writer at the schema version this build knows. It never creates
    /// or migrates the database (only [`migrate`] does, under the instance lock): a database
    /// that does not exist yet, or one at another version, is refused in one line saying what
    /// to run (docs/operations.md §11), before anything is written.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        check_writable(path)?;
        if path.symlink_metadata().is_err() {
            return Err(not_created(path, None));
        }
        let open_err = |source| DbError::Open {
            path: path.to_path_buf(),
            source,
        };
        // Without CREATE: a file removed meanwhile is an error, never a new empty database.
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        configure(&conn).map_err(open_err)?;
        check_version(&conn, path)?;
        set_journal(&conn).map_err(open_err)?;
        let (writer, jobs) = mpsc::channel::<WriterJob>();
        std::thread::Builder::new()
            .name("lrvault-db-writer".into())
            .spawn(move || {
                while let Ok(job) = jobs.recv() {
                    // A panicking job must not take the writer down with it; its caller sees
                    // the panic as a dropped reply.
                    let _ =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut conn)));
                }
            })
            .map_err(|source| DbError::Open {
                path: path.to_path_buf(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(source)),
            })?;
        Ok(Db {
            path: path.to_path_buf(),
            writer,
            readers: Arc::new(Mutex::new(Vec::new())),
            reading: Arc::new(tokio::sync::Semaphore::new(READER_POOL)),
        })
    }

    /// Creates or migrates the database under the instance lock (taken for the migration
    /// only), then opens it: for a process that owns its database (the demo, tests). A
    /// running daemon holds the lock, so this never changes the schema under it.
    pub fn open_migrated(path: &Path) -> Result<Db, DbError> {
        migrate(&InstanceLock::take(path)?)?;
        Db::open(path)
    }

    /// A read-only connection (status, audit): never blocks the writer, never migrates, and
    /// does not look at the schema version (a backup being checked, a damaged file).
    pub fn open_readonly(path: &Path) -> Result<Connection, DbError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| DbError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        configure(&conn).map_err(|source| DbError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(conn)
    }

    /// A read-only connection for the reporting commands (`config` is the file they were
    /// given, for the hint), at the schema version this build knows. A database that does
    /// not exist yet is not created here: the message says how to create it as the service
    /// user (exit code 2).
    pub fn open_for_reading(path: &Path, config: &Path) -> Result<Connection, DbError> {
        if !path.exists() {
            return Err(not_created(path, Some(config)));
        }
        let conn = Self::open_readonly(path)?;
        check_version(&conn, path)?;
        Ok(conn)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the writer thread, with the writing connection, and waits for its answer.
    pub async fn call<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, DbError> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.send(Box::new(move |c| {
            let _ = reply.send(f(c));
        }))?;
        answer.await.map_err(|_| writer_gone())?
    }

    /// Runs `f` on the writer thread and blocks until it is done (for callers already on a
    /// blocking thread, and tests; never from the writer thread itself).
    pub fn call_sync<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, DbError> + Send + 'static,
    {
        let (reply, answer) = mpsc::sync_channel(1);
        self.send(Box::new(move |c| {
            let _ = reply.send(f(c));
        }))?;
        answer.recv().map_err(|_| writer_gone())?
    }

    fn send(&self, job: WriterJob) -> Result<(), DbError> {
        self.writer.send(job).map_err(|_| writer_gone())
    }

    /// Runs `f` on a read-only connection on a blocking thread: long reads (reports, plans,
    /// verification) never hold the writer. It sees what was committed when it starts.
    pub async fn read<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    {
        let (path, readers) = (self.path.clone(), self.readers.clone());
        let _turn = self.reading.acquire().await.map_err(|_| writer_gone())?;
        tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match pooled {
                Some(c) => c,
                None => Db::open_readonly(&path)?,
            };
            let out = f(&conn);
            let mut pool = readers.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < READER_POOL {
                pool.push(conn);
            }
            out
        })
        .await
        .map_err(|e| DbError::Join(e.to_string()))?
    }
}

/// Folds the WAL into the database file and truncates it (`PRAGMA wal_checkpoint(TRUNCATE)`),
/// so every commit lives in `lrvault.db` itself and a `-wal` lost while nothing runs loses
/// nothing: at the daemon's clean stop and after a one-shot command that wrote. Best effort,
/// never waiting: another process's reader may keep the WAL busy, and SQLite checkpoints
/// again later; that, or a failure, is logged.
pub fn fold_wal(c: &Connection) {
    let done = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)? - r.get::<_, i64>(2)?,
        ))
    });
    match done {
        Ok((0, _)) => tracing::debug!("WAL checkpointed and truncated"),
        Ok((_, left)) => tracing::debug!(
            frames_left = left,
            "WAL not truncated: another process is using the database (it checkpoints later)"
        ),
        Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
    }
}

/// What to do before the first start: start the service, or run `migrate` as the service
/// user. Never a writing command as root: the files it would create (the database, its
/// `-wal`, the state directory) would belong to root and lock the service out.
pub fn first_start_hint(db: &Path, config: Option<&Path>) -> String {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/usr/bin/lrvault".into());
    let migrate = match config {
        Some(config) => format!("{exe} --config {} migrate", config.display()),
        None => format!("{exe} migrate"),
    };
    format!(
        "database {} does not exist yet: start the service (systemctl start lrvault), which creates it as the service user, or run migrate as that user: systemd-run --wait --pty --collect -p User=lrvault -p Group=lrvault -p StateDirectory=lrvault -p UMask=0027 {migrate} (or: sudo -u lrvault {migrate}); not as root, whose files would lock the service out",
        db.display()
    )
}

/// Before opening `path` for writing: the one write check of the database
/// ([`crate::access::check_database_writable`]), which commands also make at start-up.
fn check_writable(path: &Path) -> Result<(), DbError> {
    crate::access::check_database_writable(path)
        .map_err(|m| DbError::Access(crate::error::UserError::new(m)))
}

/// SQLite's own consistency check: `quick_check` (linear, no index cross-check) or, with
/// `full`, `integrity_check`. Returns the problems it reports (at most 100); empty means ok.
pub fn integrity_problems(conn: &Connection, full: bool) -> Result<Vec<String>, DbError> {
    let pragma = if full {
        "PRAGMA integrity_check(100)"
    } else {
        "PRAGMA quick_check(100)"
    };
    let mut stmt = conn
        .prepare(pragma)
        .map_err(DbError::sql("integrity check"))?;
    let rows = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(DbError::sql("integrity check"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(DbError::sql("integrity check"))?;
    Ok(if rows == ["ok"] { Vec::new() } else { rows })
}

/// Copies the database at `from` into the new, empty file `to` with SQLite's online backup
/// API, from one read snapshot. In WAL mode a reader blocks no writer, so the daemon goes on
/// writing while this runs; copying in one step (rather than a few pages at a time) keeps
/// the copy from restarting every time the daemon commits. Memory stays flat: pages go
/// through SQLite's page cache to the file.
pub fn online_copy(from: &Path, to: &Path) -> Result<(), DbError> {
    let copy_err = |source| DbError::Copy {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    };
    let src = Db::open_readonly(from)?;
    let mut dest = Connection::open(to).map_err(copy_err)?;
    {
        let backup = rusqlite::backup::Backup::new(&src, &mut dest).map_err(copy_err)?;
        // BUSY or LOCKED only while another connection recovers the WAL: brief, bounded.
        let mut retries = 0;
        loop {
            match backup.step(-1).map_err(copy_err)? {
                rusqlite::backup::StepResult::Done => break,
                _ if retries < 300 => {
                    retries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => {
                    return Err(copy_err(rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                        Some("the source stayed locked for 30 s".into()),
                    )));
                }
            }
        }
    }
    // The copy is a WAL database like its source; leave it as one self-contained file.
    dest.pragma_update_and_check(None, "wal_checkpoint", "TRUNCATE", |_| Ok(()))
        .map_err(copy_err)?;
    dest.close().map_err(|(_, e)| copy_err(e))
}

/// One schema object (table, view, index or trigger) as `sqlite_master` holds it.
type SchemaObject = (String, String, Option<String>);

/// The schema objects of `conn` by name: (type, name, sql), SQLite's internal ones left out.
fn schema_objects(conn: &Connection) -> rusqlite::Result<Vec<SchemaObject>> {
    let mut stmt = conn.prepare(
        "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    rows.collect()
}

/// Where `conn`'s schema differs from what the migrations make for its version (docs/evidence-format.md §9
/// rule 13): each missing, altered or foreign table, view, index or trigger, as
/// ("{type} {name}", problem). A dropped append-only trigger or a stranger's trigger shows
/// here, whoever wrote it.
pub fn schema_differences(conn: &Connection) -> Result<Vec<(String, String)>, DbError> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(DbError::sql("read the schema version"))?;
    let known = schema_version_known() as i64;
    if !(1..=known).contains(&version) {
        return Ok(vec![(
            "schema".to_string(),
            format!("version {version} is not one this lrvault made (1 to {known})"),
        )]);
    }
    let mut reference =
        Connection::open_in_memory().map_err(DbError::sql("open a reference schema"))?;
    migrations()
        .to_version(&mut reference, version as usize)
        .map_err(|e| DbError::Migrate {
            path: PathBuf::from(":memory:"),
            message: e.to_string(),
        })?;
    let expected = schema_objects(&reference).map_err(DbError::sql("read the reference schema"))?;
    let found = schema_objects(conn).map_err(DbError::sql("read the schema"))?;
    let mut differences = Vec::new();
    for (kind, name, sql) in &expected {
        match found.iter().find(|(_, n, _)| n == name) {
            None => differences.push((format!("{kind} {name}"), "missing".to_string())),
            Some((k, _, s)) if k != kind || s != sql => differences.push((
                format!("{kind} {name}"),
                format!(
                    "altered: it is now {k} {}",
                    s.as_deref().unwrap_or("(no SQL)")
                ),
            )),
            Some(_) => {}
        }
    }
    for (kind, name, sql) in &found {
        if !expected.iter().any(|(_, n, _)| n == name) {
            differences.push((
                format!("{kind} {name}"),
                format!(
                    "not made by lrvault's migrations: {}",
                    sql.as_deref().unwrap_or("(no SQL)")
                ),
            ));
        }
    }
    Ok(differences)
}

fn writer_gone() -> DbError {
    DbError::Join("the database writer thread stopped (a write panicked)".into())
}

/// Starts a write transaction that takes the write lock at once, so concurrent processes
/// serialise instead of failing half-way with SQLITE_BUSY.
pub fn write_tx(conn: &mut Connection) -> Result<rusqlite::Transaction<'_>, DbError> {
    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(DbError::sql("begin write transaction"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::params;

    #[test]
    fn migrations_are_valid() {
        migrations().validate().unwrap();
    }

    #[test]
    fn a_version_1_database_with_a_chain_upgrades_in_place() {
        use crate::custody::{self, Event, EventKind};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            migrations().to_version(&mut conn, 1).unwrap();
            let tx = conn.transaction().unwrap();
            for kind in [
                EventKind::Discovered,
                EventKind::Queued,
                EventKind::Verified,
            ] {
                custody::append(&tx, &Event::new("t", "a", Some(0), kind, "me")).unwrap();
            }
            tx.commit().unwrap();
        }
        let db = Db::open_migrated(&path).unwrap();
        db.call_sync(|c| {
            let mut defects = Vec::new();
            let walk = custody::walk(c, |d| defects.push(d), |_| {}).unwrap();
            assert_eq!((walk.rows, defects.len()), (3, 0));
            let tx = c.transaction().unwrap();
            custody::append(&tx, &Event::new("t", "*", None, EventKind::BackedUp, "me")).unwrap();
            custody::append(&tx, &Event::new("t", "a", None, EventKind::Exported, "me")).unwrap();
            tx.commit().unwrap();
            let mut defects = Vec::new();
            let walk = custody::walk(c, |d| defects.push(d), |_| {}).unwrap();
            assert_eq!((walk.rows, defects), (5, vec![]));
            let e = c
                .execute("UPDATE custody_log SET actor = 'x'", [])
                .unwrap_err();
            assert!(e.to_string().contains("append-only"), "{e}");
            let e = c.execute("DELETE FROM custody_log", []).unwrap_err();
            assert!(e.to_string().contains("append-only"), "{e}");
            let n: i64 = c
                .query_row("SELECT count(*) FROM v_custody", [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 5);
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn a_version_4_chain_with_every_kind_upgrades_to_kinds_as_data() {
        use crate::custody::{self, Event, EventKind};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v4.db");
        let v4_kinds = &EventKind::ALL[..13];
        {
            let mut conn = Connection::open(&path).unwrap();
            migrations().to_version(&mut conn, 4).unwrap();
            let tx = conn.transaction().unwrap();
            for &kind in v4_kinds {
                custody::append(&tx, &Event::new("t", "a", Some(0), kind, "me")).unwrap();
            }
            tx.commit().unwrap();
        }
        let db = Db::open_migrated(&path).unwrap();
        db.call_sync(|c| {
            // The lookup table names exactly the kinds this build writes.
            let mut names: Vec<String> = {
                let mut stmt = c.prepare("SELECT name FROM custody_events").unwrap();
                stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
            };
            let mut known: Vec<String> =
                EventKind::ALL.iter().map(|k| k.as_str().to_string()).collect();
            names.sort();
            known.sort();
            assert_eq!(names, known);
            // Every old row came through as it was, and the new kinds append.
            let tx = c.transaction().unwrap();
            for &kind in &EventKind::ALL[13..] {
                custody::append(&tx, &Event::new("t", "a", None, kind, "me")).unwrap();
            }
            tx.commit().unwrap();
            let mut defects = Vec::new();
            let walk = custody::walk(c, |d| defects.push(d), |_| {}).unwrap();
            assert_eq!((walk.rows, defects), (EventKind::ALL.len() as i64, vec![]));
            // A kind the table does not list is refused by the foreign key.
            let e = c
                .execute(
                    "INSERT INTO custody_log (at, tenant, action_id, event, actor, detail, prev_hash, row_hash)
                     VALUES ('t', 'x', 'a', 'LOST', 'me', '{}', 'p', 'h')",
                    [],
                )
                .unwrap_err();
            assert!(e.to_string().contains("FOREIGN KEY"), "{e}");
            let e = c.execute("DELETE FROM custody_events", []).unwrap_err();
            assert!(e.to_string().contains("append-only"), "{e}");
            Ok(())
        })
        .unwrap();
    }

    /// The schema as `sqlite_master` holds it, and the version: what must not change under a
    /// command that refuses a database.
    fn schema_of(path: &Path) -> (i64, Vec<SchemaObject>) {
        let c = Connection::open(path).unwrap();
        let v = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        (v, schema_objects(&c).unwrap())
    }

    #[test]
    fn only_migrate_changes_the_schema_and_open_refuses_any_other_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v5.db");
        let missing = Db::open(&path).err().unwrap();
        assert!(matches!(missing, DbError::NotCreated { .. }), "{missing}");
        assert!(!path.exists(), "open never creates the database");
        migrations()
            .to_version(&mut Connection::open(&path).unwrap(), 5)
            .unwrap();
        let known = schema_version_known();
        let before = schema_of(&path);
        let e = Db::open(&path).err().unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "database {} is at schema 5, this lrvault knows {known}: restart the service, which migrates it when it starts, or run `lrvault migrate` while it is stopped",
                path.display()
            )
        );
        let e = Db::open_for_reading(&path, Path::new("c.toml"))
            .err()
            .unwrap();
        assert!(matches!(e, DbError::Schema(_)), "{e}");
        assert_eq!(
            schema_of(&path),
            before,
            "nothing changed under the refusal"
        );
        // The holder of the instance lock migrates; nobody else can take it meanwhile.
        let lock = InstanceLock::take(&path).unwrap();
        let e = InstanceLock::take(&path).err().unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "another lrvault daemon is already running on {} (pid {} holds lock {}.lock)",
                path.display(),
                std::process::id(),
                path.display()
            )
        );
        assert_eq!(migrate(&lock).unwrap(), Migrated { from: 5, to: known });
        assert_eq!(
            migrate(&lock).unwrap(),
            Migrated {
                from: known,
                to: known
            }
        );
        drop(lock);
        Db::open(&path).unwrap();
        // A newer database: upgrade lrvault; migrate refuses it too.
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", known as i64 + 1)
            .unwrap();
        let newer = format!(
            "database {} is at schema {}, this lrvault knows {known}: upgrade lrvault (a newer one migrated it)",
            path.display(),
            known + 1
        );
        assert_eq!(Db::open(&path).err().unwrap().to_string(), newer);
        let lock = InstanceLock::take(&path).unwrap();
        assert_eq!(migrate(&lock).err().unwrap().to_string(), newer);
    }

    /// Every row of `results`, as text, in key order.
    fn result_rows(c: &Connection) -> Vec<Vec<String>> {
        let mut stmt = c
            .prepare("SELECT * FROM results ORDER BY tenant, action_id, command_index")
            .unwrap();
        let n = stmt.column_count();
        stmt.query_map([], |r| {
            (0..n)
                .map(|i| {
                    r.get::<_, rusqlite::types::Value>(i)
                        .map(|v| format!("{v:?}"))
                })
                .collect()
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }

    #[test]
    fn a_version_5_database_with_results_in_every_state_upgrades_to_states_as_data() {
        use crate::custody::{self, Event, EventKind};
        use crate::queue::ResultState;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v5.db");
        let before = {
            let mut conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "foreign_keys", "ON").unwrap();
            migrations().to_version(&mut conn, 5).unwrap();
            let tx = conn.transaction().unwrap();
            tx.execute(
                "INSERT INTO actions (tenant, action_id, created_at, raw_json, discovered_at, source)
                 VALUES ('t', 'a', '2026-12-01T00:00:00.000Z', '{}', '2026-12-01T00:00:00.000Z', 'discover')",
                [],
            )
            .unwrap();
            for (i, state) in ResultState::ALL.iter().enumerate() {
                tx.execute(
                    "INSERT INTO results (tenant, action_id, command_index, command_type, command_json, state,
                                          attempts, last_error, updated_at, lease_owner)
                     VALUES ('t', 'a', ?1, 'GetFile', '{}', ?2, ?1, 'why', '2026-12-01T00:00:01.000Z', 'h:1:2')",
                    params![i as i64, state],
                )
                .unwrap();
                custody::append(
                    &tx,
                    &Event::new("t", "a", Some(i as u32), EventKind::Queued, "me"),
                )
                .unwrap();
            }
            tx.execute(
                "INSERT INTO evidence (evidence_id, tenant, action_id, command_index, payload_name, payload_size,
                     payload_sha256, package_path, package_size, package_sha256, archived_at)
                 VALUES ('e', 't', 'a', 2, 'p', 1, 's', 'pp', 1, 'ps', '2026-12-01T00:00:02.000Z')",
                [],
            )
            .unwrap();
            tx.commit().unwrap();
            result_rows(&conn)
        };
        let db = Db::open_migrated(&path).unwrap();
        db.call_sync(move |c| {
            assert_eq!(result_rows(c), before, "every row copied exactly");
            let mut stmt = c.prepare("SELECT name, meaning FROM result_states ORDER BY name").unwrap();
            let table: Vec<(String, String)> =
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
            let mut known: Vec<(String, String)> = ResultState::ALL
                .iter()
                .map(|s| (s.as_str().to_string(), s.meaning().to_string()))
                .collect();
            known.sort();
            assert_eq!(table, known, "the table lists exactly the states this build writes");
            assert_eq!(schema_differences(c).unwrap(), vec![]);
            let n: i64 = c.query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| r.get(0)).unwrap();
            assert_eq!(n, 0);
            let mut defects = Vec::new();
            let walk = custody::walk(c, |d| defects.push(d), |_| {}).unwrap();
            assert_eq!((walk.rows, defects), (ResultState::ALL.len() as i64, vec![]));
            let (evidence, mark): (i64, i64) = c
                .query_row(
                    "SELECT (SELECT count(*) FROM v_evidence), custody_seq FROM schema_upgrades WHERE version = 6",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert_eq!((evidence, mark), (1, ResultState::ALL.len() as i64));
            // A state the table does not list is refused by the foreign key.
            let e = c.execute("UPDATE results SET state = 'lost' WHERE command_index = 0", []).unwrap_err();
            assert!(e.to_string().contains("FOREIGN KEY"), "{e}");
            let e = c.execute("DELETE FROM result_states WHERE name = 'failed'", []).unwrap_err();
            assert!(e.to_string().contains("append-only"), "{e}");
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn open_creates_schema_and_refuses_custody_edits() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_migrated(&dir.path().join("sub/lrvault.db")).unwrap();
        db.call_sync(|c| {
            let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
            assert_eq!(mode, "wal");
            c.execute(
                "INSERT INTO custody_log (at, tenant, action_id, event, actor, detail, prev_hash, row_hash)
                 VALUES ('t', 'x', 'a', 'QUEUED', 'me', '{}', 'p', 'h')",
                [],
            )
            .unwrap();
            let e = c.execute("UPDATE custody_log SET event = 'FAILED'", []).unwrap_err();
            assert!(e.to_string().contains("append-only"), "{e}");
            let e = c.execute("DELETE FROM custody_log", []).unwrap_err();
            assert!(e.to_string().contains("append-only"), "{e}");
            for view in ["v_evidence", "v_custody"] {
                c.query_row(&format!("SELECT count(*) FROM {view}"), [], |r| r.get::<_, i64>(0)).unwrap();
            }
            Ok(())
        })
        .unwrap();
        // Reopening is a no-op migration.
        drop(db);
        Db::open_migrated(&dir.path().join("sub/lrvault.db")).unwrap();
    }
}
