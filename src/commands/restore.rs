//! `lrvault restore --from FILE`: puts a copy made by `lrvault backup` back in place of the
//! database, with the daemon stopped. The copy is staged beside the database and
//! integrity-checked before anything is touched; the database it replaces is set aside
//! *with its own `-wal`* (so that WAL can never be applied to the restored file, and nothing
//! is destroyed); the staged copy is renamed into place; then the recovery a start runs:
//! interrupted downloads back to the queue, stray partial files removed, the results whose
//! packages the store holds but the backup does not hold as archived back to the queue, and
//! packages already in the store (written after the backup) adopted, each archived once.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args as ClapArgs;
use tokio_util::sync::CancellationToken;

use super::backup::{check_copy, copy_hashed, file_err, with_suffix};
use crate::access::sqlite_sidecars;
use crate::config::{Config, ConfigFile};
use crate::custody::Head;
use crate::db::Db;
use crate::error::UserError;
use crate::jobs::{self, Context};

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// A copy of the database made by `lrvault backup` (or sqlite3's `.backup`)
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
}

/// The backup, copied beside the database and checked.
struct Staged {
    path: PathBuf,
    bytes: u64,
    sha256: String,
    schema_version: i64,
    head: Head,
    chain_rows: i64,
}

pub async fn run(config: &ConfigFile, args: Args) -> anyhow::Result<ExitCode> {
    let cfg = Arc::new(config.load()?);
    cfg.check_writable()?;
    let live = cfg.database.path.clone();
    let from = std::path::absolute(&args.from).map_err(file_err("resolve", &args.from))?;
    check_source(&from, &live)?;
    if let Some(dir) = live.parent() {
        std::fs::create_dir_all(dir).map_err(file_err("create directory", dir))?;
    }
    // Held until the end: no daemon starts on a half-restored database.
    let lock = super::take_lock(
        &live,
        "cannot restore while the daemon runs; stop it first (systemctl stop lrvault)",
    )?;
    let checkpoints = list_checkpoints(&cfg).await?;
    let staged = {
        let (from, live, checkpoints) = (from.clone(), live.clone(), checkpoints.clone());
        tokio::task::spawn_blocking(move || stage(&from, &live, &checkpoints)).await??
    };
    let recorded = recorded_backup_row(&live, &staged.sha256);
    let aside = {
        let (staged, live) = (staged.path.clone(), live.clone());
        tokio::task::spawn_blocking(move || install(&staged, &live)).await??
    };
    println!(
        "restored {} from {} ({} bytes, sha256 {}{}; integrity_check ok; schema version {}; custody chain {} rows without a defect, head seq {} row_hash {}; it agrees with every checkpoint at or below its head)",
        live.display(),
        from.display(),
        staged.bytes,
        staged.sha256,
        recorded
            .map(|r| format!(", recorded as {r}"))
            .unwrap_or_default(),
        staged.schema_version,
        staged.chain_rows,
        staged.head.seq,
        staged.head.row_hash,
    );
    if let Some((aside, wal)) = &aside {
        println!(
            "the database it replaced is kept as {}{}; remove it when you no longer need it",
            aside.display(),
            if *wal { " with its -wal" } else { "" }
        );
    }
    // A backup from an older schema is brought to this build's, under the lock.
    crate::db::migrate(&lock)?;
    let db = Db::open(&live)?;
    let superseded = record_restore(&db, &from, &staged, aside.as_ref(), checkpoints).await?;
    if superseded > 0 {
        println!(
            "{superseded} checkpoints written after the backup pin rows that now live on only in the replaced database; the RESTORED custody row names them"
        );
    }
    let ctx = Context::new(cfg, db, CancellationToken::new())?;
    let returned = jobs::archive::recover(&ctx).await?;
    // The daemon is stopped: a partial file no live lease covers is a dead writer's.
    let removed = jobs::archive::sweep_partials(&ctx).await?;
    let requeued = jobs::archive::requeue_found(&ctx).await?;
    if requeued > 0 {
        println!(
            "{requeued} results the backup holds as failed, unavailable or skipped have a package in the store (archived after the backup): re-queued, so their packages are adopted or quarantined like every other package written after the backup"
        );
    }
    let in_place = jobs::archive::adopt_in_place(&ctx, None).await?;
    println!(
        "recovery: {returned} interrupted downloads returned to the queue, {removed} partial files removed, {} packages already in the store adopted, {} refused",
        in_place.adopted,
        in_place.refused.len()
    );
    for reason in &in_place.refused {
        println!("refused (the result is now failed): {reason}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Every checkpoint in the store as (seq, row_hash, file relative to the anchors' root): what
/// a backup must agree with at or below its head, and what a restore may supersede above it.
async fn list_checkpoints(cfg: &Config) -> anyhow::Result<Vec<(i64, String, String)>> {
    // The checkpoints wherever they are: `store.root`, or a mirror of an object store's.
    let store = crate::store::Store::open(&cfg.store, &cfg.credentials)?;
    let anchors = crate::anchor::local_root(&store, &cfg.store.root).await?;
    let listing = crate::anchor::list(anchors.path())?;
    let mut pinned = Vec::new();
    for file in &listing.checkpoints {
        let rel = file.json.strip_prefix(anchors.path()).unwrap_or(&file.json);
        let checkpoint = crate::anchor::read_bytes(&file.json)
            .map_err(|e| e.to_string())
            .and_then(|b| crate::anchor::Checkpoint::parse(&b))
            .map_err(|e| {
                anyhow::anyhow!(
                    "the checkpoint {} cannot be read ({e}); a restore is checked against every checkpoint, so nothing was restored",
                    rel.display()
                )
            })?;
        pinned.push((
            checkpoint.seq,
            checkpoint.row_hash,
            rel.display().to_string(),
        ));
    }
    // The witness's copies too (docs/evidence-format.md §9): a host whose local checkpoints were
    // rewritten to fit a forged backup still cannot rewrite these.
    if let Some(witness) = crate::anchor::open_witness(cfg)? {
        use futures_util::StreamExt;
        let mut keys = Vec::new();
        let mut listing = witness.list(&format!("{}/", crate::anchor::CHECKPOINT_DIR));
        while let Some(item) = listing.next().await {
            keys.push(item?.key);
        }
        drop(listing);
        for key in keys.into_iter().filter(|k| k.ends_with(".json")) {
            let where_ = format!("{} in the witness {}", key, witness.describe());
            let checkpoint = witness
                .read_small(&key, crate::anchor::MAX_ANCHOR_BYTES)
                .await?
                .ok_or_else(|| anyhow::anyhow!("{where_} vanished while it was read"))
                .and_then(|b| {
                    crate::anchor::Checkpoint::parse(&b)
                        .map_err(|e| anyhow::anyhow!("{where_} cannot be read ({e})"))
                })?;
            // The same checkpoint in both homes is checked (and superseded) once.
            if !pinned
                .iter()
                .any(|(seq, hash, _)| *seq == checkpoint.seq && *hash == checkpoint.row_hash)
            {
                pinned.push((checkpoint.seq, checkpoint.row_hash, where_));
            }
        }
    }
    Ok(pinned)
}

/// Appends the RESTORED row: the backup, the head it restored, the database it replaced, and
/// the checkpoints written after the backup whose rows live on in that database only (an
/// examiner checks them against the replaced file). Returns how many it names.
async fn record_restore(
    db: &Db,
    from: &Path,
    staged: &Staged,
    aside: Option<&(PathBuf, bool)>,
    pinned: Vec<(i64, String, String)>,
) -> anyhow::Result<usize> {
    // The replaced database's own head, read through its WAL; the `-shm` that reading makes
    // is removed again (it is only an index of the WAL), so the pair stays as it was.
    let replaced_head = aside.and_then(|(path, _)| {
        let shm = with_suffix(path, "-shm");
        let had_shm = shm.exists();
        let head = Db::open_readonly(path)
            .ok()
            .and_then(|conn| crate::custody::head(&conn).ok());
        if !had_shm {
            let _ = std::fs::remove_file(&shm);
        }
        head
    });
    let detail_base = serde_json::json!({
        "from": from.display().to_string(),
        "backup_sha256": staged.sha256,
        "restored_head": staged.head,
        "replaced": aside.map(|(p, _)| p.display().to_string()),
        "replaced_head": replaced_head.map(|(seq, row_hash)| Head { seq, row_hash }),
    });
    let actor = crate::custody::actor("*");
    Ok(db
        .call(move |c| {
            let tx = crate::db::write_tx(c)?;
            // Checkpoints whose row is not (or no longer) in the restored chain.
            let mut superseded = Vec::new();
            for (seq, row_hash, file) in pinned {
                let head = Head { seq, row_hash };
                if !crate::custody::has_row(&tx, &head)? {
                    superseded.push(serde_json::json!({ "seq": head.seq, "row_hash": head.row_hash, "file": file }));
                }
            }
            let n = superseded.len();
            let mut detail = detail_base;
            detail["superseded_checkpoints"] = serde_json::Value::Array(superseded);
            let event = crate::custody::Event::new(
                "*",
                "*",
                None,
                crate::custody::EventKind::Restored,
                &actor,
            )
            .detail(detail);
            crate::custody::append(&tx, &event)?;
            tx.commit()
                .map_err(crate::db::DbError::sql("commit the RESTORED row"))?;
            Ok(n)
        })
        .await?)
}

/// The backup must be a file of its own: not the database itself, and not a live database
/// with a WAL beside it (its newest commits would be in that WAL, not in the file).
fn check_source(from: &Path, live: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(from)
        .map_err(|e| UserError::new(format!("cannot read the backup {}: {e}", from.display())))?;
    if !meta.is_file() {
        return Err(UserError::new(format!("{} is not a file", from.display())).into());
    }
    let same = std::fs::metadata(live).is_ok_and(|l| {
        use std::os::unix::fs::MetadataExt;
        l.dev() == meta.dev() && l.ino() == meta.ino()
    });
    if same {
        return Err(UserError::new(format!(
            "{} is the database itself, not a backup of it",
            from.display()
        ))
        .into());
    }
    if let Some(wal) = sqlite_sidecars(from)
        .into_iter()
        .find(|p| p.symlink_metadata().is_ok())
    {
        return Err(UserError::new(format!(
            "{} exists: {} is a live database, not a backup (its latest commits may be only in that file); make backups with lrvault backup",
            wal.display(),
            from.display()
        ))
        .into());
    }
    Ok(())
}

/// When the database being replaced is readable and recorded a backup with this SHA-256,
/// says which custody row did (e.g. `BACKED_UP seq 812 at …`). Best effort: a damaged
/// database answers nothing.
fn recorded_backup_row(live: &Path, sha256: &str) -> Option<String> {
    let conn = Db::open_readonly(live).ok()?;
    conn.query_row(
        "SELECT seq, at FROM custody_log WHERE event = 'BACKED_UP'
           AND json_extract(detail, '$.sha256') = ?1 ORDER BY seq DESC LIMIT 1",
        [sha256],
        |r| {
            Ok(format!(
                "BACKED_UP seq {} at {}",
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?
            ))
        },
    )
    .ok()
}

/// Copies the backup beside the database as `<db>.restoring`, with the database's mode
/// (0600 when there is none), and checks it: SQLite's full integrity check, a known schema,
/// the custody chain.
fn stage(
    from: &Path,
    live: &Path,
    checkpoints: &[(i64, String, String)],
) -> anyhow::Result<Staged> {
    let path = with_suffix(live, ".restoring");
    // Left by an interrupted restore; this process holds the lock, so no one else uses it.
    for p in [path.clone()].into_iter().chain(sqlite_sidecars(&path)) {
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(file_err("remove", &p)(e).into());
            }
            _ => {}
        }
    }
    // Never more open than 0660, never less than the owner's read and write.
    let mode = std::fs::metadata(live).map_or(0o600, |m| m.permissions().mode() & 0o660 | 0o600);
    let (bytes, sha256) = copy_hashed(from, &path, mode)?;
    let checked = check_copy(&path)
        .and_then(|(version, head)| {
            let known = crate::db::schema_version_known() as i64;
            if version > known {
                anyhow::bail!(
                    "its schema version {version} is newer than this lrvault knows ({known}); restore it with the lrvault that made it"
                );
            }
            let conn = Db::open_readonly(&path)?;
            check_backup(&conn, &head, checkpoints)?;
            let chain = crate::custody::walk(&conn, |_| {}, |_| {})?;
            Ok((version, head, chain.rows))
        })
        .with_context(|| format!("the backup {} was not restored", from.display()));
    let (schema_version, head, chain_rows) = match checked {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
    };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .map_err(file_err("set the mode of", &path))?;
    Ok(Staged {
        path,
        bytes,
        sha256,
        schema_version,
        head,
        chain_rows,
    })
}

/// A backup is restored only when nothing in it could launder a forgery (docs/evidence-format.md §9 rules
/// 11 and 13): its schema is what the migrations made for its version, its chain recomputes
/// from seq 1, and every checkpoint at or below its head pins a row of its chain. The first
/// thing wrong is the error, in one line naming the object, row or checkpoint.
fn check_backup(
    conn: &rusqlite::Connection,
    head: &Head,
    checkpoints: &[(i64, String, String)],
) -> anyhow::Result<()> {
    if let Some((object, problem)) = crate::db::schema_differences(conn)?.into_iter().next() {
        anyhow::bail!("its {object} is {problem}");
    }
    let mut first = None;
    crate::custody::walk(
        conn,
        |d| {
            first.get_or_insert(d);
        },
        |_| {},
    )?;
    if let Some(d) = first {
        anyhow::bail!(
            "its custody chain has a defect at seq {}: {}",
            d.seq,
            d.problem
        );
    }
    for (seq, row_hash, file) in checkpoints.iter().filter(|(seq, ..)| *seq <= head.seq) {
        let pinned = Head {
            seq: *seq,
            row_hash: row_hash.clone(),
        };
        if !crate::custody::has_row(conn, &pinned)? {
            anyhow::bail!(
                "its custody chain contradicts the checkpoint {file} (seq {seq}, at or below the backup's head seq {}): the backup was altered after that checkpoint was written",
                head.seq
            );
        }
    }
    Ok(())
}

/// Moves the current database aside together with its `-wal` (as `<db>.replaced-<time>` and
/// `<db>.replaced-<time>-wal`, a pair SQLite itself would open correctly), drops its `-shm`
/// (an index of that WAL), and renames the staged copy into place. Returns the aside path
/// and whether a WAL went with it.
fn install(staged: &Path, live: &Path) -> anyhow::Result<Option<(PathBuf, bool)>> {
    let stamp = crate::time::now().format("%Y%m%dT%H%M%S%.3fZ").to_string();
    let aside = with_suffix(live, &format!(".replaced-{stamp}"));
    let [wal, shm] = sqlite_sidecars(live);
    let mut moved = [false; 2];
    for (i, (from, to)) in [
        (live.to_path_buf(), aside.clone()),
        (wal, with_suffix(&aside, "-wal")),
    ]
    .into_iter()
    .enumerate()
    {
        match std::fs::rename(&from, &to) {
            Ok(()) => moved[i] = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_err("move aside", &from)(e).into()),
        }
    }
    match std::fs::remove_file(&shm) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(file_err("remove", &shm)(e).into());
        }
        _ => {}
    }
    std::fs::rename(staged, live).map_err(file_err("rename the restored copy to", live))?;
    if let Some(dir) = live.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(file_err("fsync directory", dir))?;
    }
    Ok((moved[0] || moved[1]).then_some((aside, moved[1])))
}
