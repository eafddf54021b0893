//! An archive built against the simulator and then handled the way an insider with write
//! access to the database and the store would: triggers dropped with plain SQL, packages
//! rebuilt by hand, the chain re-hashed. Everything runs through the real binary or short-lived
//! connections, so a snapshot of the files can be restored exactly (the rollback).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use lrvault_sim::SimConfig;
use sha2::{Digest, Sha256};

use crate::common::{env, files_under, sha256_hex};

/// A finished archive on disk; no connection of this process stays open on it.
pub struct Vault {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub db: PathBuf,
    pub store: PathBuf,
    /// Keeps the simulator alive for as long as the vault.
    _sim: lrvault_sim::SimHandle,
}

/// A simulator of `actions` actions, and a context for a config written for it plus `extra`.
pub async fn sim_env(seed: u64, actions: usize, extra: &str) -> crate::common::Env {
    env(
        SimConfig {
            seed,
            actions,
            ..SimConfig::default()
        },
        extra,
    )
    .await
}

/// [`sim_env`] with everything discovered and archived.
pub async fn archived(seed: u64, actions: usize, extra: &str) -> crate::common::Env {
    let e = sim_env(seed, actions, extra).await;
    e.discover().await;
    e.archive().await;
    e
}

/// Discovers and archives `actions` actions in two passes with a verify after each, so the
/// store holds two checkpoints and packages on both sides of the first one.
pub async fn archived_vault(seed: u64, actions: usize, extra: &str) -> Vault {
    let e = sim_env(seed, actions, extra).await;
    e.discover().await;
    e.archive_max(4).await;
    let first = lrvault::verify::verify(&e.cfg, &e.ctx.db, None, None, false)
        .await
        .unwrap();
    assert!(first.ok(), "{first:?}");
    e.archive().await;
    let second = lrvault::verify::verify(&e.cfg, &e.ctx.db, None, None, false)
        .await
        .unwrap();
    assert!(second.ok(), "{second:?}");
    assert!(second.packages_checked > 4);
    Vault::from_env(e)
}

impl Vault {
    /// The vault of an environment, its database connections closed.
    pub fn from_env(e: crate::common::Env) -> Vault {
        let crate::common::Env {
            _dir,
            sim,
            config_path,
            cfg,
            ctx,
            tenants,
        } = e;
        drop(tenants);
        drop(ctx);
        Vault {
            dir: _dir,
            config: config_path,
            db: cfg.database.path.clone(),
            store: cfg.store.root.clone(),
            _sim: sim,
        }
    }
}

/// (exit code, stdout, stderr) of the real binary.
pub fn lrvault(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lrvault"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        // The tests run as root where the service would not; `run` refuses root without it.
        .env("LRVAULT_ALLOW_ROOT", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Vault {
    pub fn verify(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = vec!["verify"];
        all.extend_from_slice(args);
        lrvault(&self.config, &all)
    }

    /// Asserts verify exits 0.
    pub fn verify_ok(&self) {
        let (code, out, err) = self.verify(&[]);
        assert_eq!(code, 0, "verify should pass:\n{out}\n{err}");
    }

    /// Asserts verify exits 3; returns its stderr.
    pub fn verify_fails(&self) -> String {
        let (code, out, err) = self.verify(&[]);
        assert_eq!(code, 3, "verify should find a defect:\n{out}\n{err}");
        err
    }

    /// A read-write connection with every trigger dropped, as an insider would have it.
    pub fn forger(&self) -> rusqlite::Connection {
        let (c, triggers) = without_triggers(&self.db);
        assert!(triggers.len() >= 8, "{triggers:?}");
        c
    }

    /// Runs `edit` with every trigger dropped, then puts the triggers back as they were: a
    /// state a crash could have left (a row never written), not a tampered schema.
    pub fn as_a_crash_left_it(&self, edit: impl FnOnce(&rusqlite::Connection)) {
        with_triggers_put_back(&self.db, edit);
    }

    pub fn reader(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(&self.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap()
    }

    pub fn query_i64(&self, sql: &str) -> i64 {
        self.reader().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    pub fn query_str(&self, sql: &str) -> String {
        self.reader().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    /// Copies the database and the store aside (no connection may write meanwhile).
    pub fn snapshot(&self) -> PathBuf {
        let snap = self.dir.path().join("snapshot");
        let _ = std::fs::remove_dir_all(&snap);
        // A connection of our own while the files are copied: the environment's writer
        // thread may still be closing its connection, and the last connection to close folds
        // the -wal into the database and removes it, which must not happen between copying
        // the one and the other.
        // (It takes its hold on the WAL index at its first read.)
        let held = self.reader();
        let _: i64 = held
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .unwrap();
        copy_tree(self.db.parent().unwrap(), &self.db, &snap.join("db"));
        copy_tree(&self.store, &self.store, &snap.join("store"));
        drop(held);
        snap
    }

    /// Puts the database and the store back exactly as in `snap`.
    pub fn restore(&self, snap: &Path) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.db.display()));
        }
        make_writable(&self.store);
        std::fs::remove_dir_all(&self.store).unwrap();
        copy_tree(
            &snap.join("db"),
            &snap.join("db"),
            self.db.parent().unwrap(),
        );
        copy_tree(&snap.join("store"), &snap.join("store"), &self.store);
    }

    /// One archived package: (evidence_id, package_path, ARCHIVED seq).
    pub fn package(&self, nth: i64) -> (String, String, i64) {
        self.reader()
            .query_row(
                "SELECT e.evidence_id, e.package_path, c.seq FROM evidence e
                 JOIN custody_log c ON c.event = 'ARCHIVED' AND c.package_path = e.package_path
                 ORDER BY e.archived_at LIMIT 1 OFFSET ?1",
                [nth],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap()
    }
}

/// Every trigger of the database at `db` dropped, as an insider would: the connection (foreign
/// keys off) and the triggers' SQL, to put them back with.
pub fn without_triggers(db: &Path) -> (rusqlite::Connection, Vec<String>) {
    let c = rusqlite::Connection::open(db).unwrap();
    let triggers: Vec<(String, String)> = c
        .prepare("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (name, _) in &triggers {
        c.execute_batch(&format!("DROP TRIGGER {name}")).unwrap();
    }
    c.execute_batch("PRAGMA foreign_keys = OFF").unwrap();
    (c, triggers.into_iter().map(|(_, sql)| sql).collect())
}

/// Runs `edit` on `db` with every trigger dropped, then puts them back exactly as they were
/// (so only the rows changed, never the schema).
pub fn with_triggers_put_back(db: &Path, edit: impl FnOnce(&rusqlite::Connection)) {
    let (c, triggers) = without_triggers(db);
    assert!(!triggers.is_empty());
    edit(&c);
    for sql in triggers {
        c.execute_batch(&sql).unwrap();
    }
}

/// Copies the database files (`db` and its -wal/-shm) or a whole tree from `from` to `to`.
fn copy_tree(from: &Path, what: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    if what.is_file() {
        for suffix in ["", "-wal", "-shm"] {
            let src = PathBuf::from(format!("{}{suffix}", what.display()));
            if src.exists() {
                std::fs::copy(&src, to.join(src.file_name().unwrap())).unwrap();
            }
        }
        return;
    }
    for file in files_under(from) {
        let dest = to.join(file.strip_prefix(from).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&file, &dest).unwrap();
    }
}

pub fn make_writable(root: &Path) {
    for file in files_under(root) {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    }
}

/// Rebuilds the package at `path` with `change` applied to its payload and every manifest,
/// Payload-Oxum and retrieval.json's sha256/bytes made to match: a bag that validates.
/// Returns the new payload's SHA-256.
pub fn rebuild_package(path: &Path, change: impl Fn(&mut Vec<u8>)) -> String {
    rebuild_package_with(path, change, |_| {})
}

/// [`rebuild_package`], with `edit` applied to retrieval.json as well.
pub fn rebuild_package_with(
    path: &Path,
    change: impl Fn(&mut Vec<u8>),
    edit: impl Fn(&mut serde_json::Value),
) -> String {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..zip.len() {
        let mut e = zip.by_index(i).unwrap();
        let mut buf = Vec::new();
        e.read_to_end(&mut buf).unwrap();
        files.push((e.name().unwrap().to_string(), buf));
    }
    let bag = files[0].0.split('/').next().unwrap().to_string();
    let data_index = files
        .iter()
        .position(|(n, _)| n.contains("/data/"))
        .unwrap();
    change(&mut files[data_index].1);
    let payload = files[data_index].1.clone();
    let data_name = files[data_index].0[bag.len() + 1..].to_string();
    let payload_sha = sha256_hex(&payload);
    let set = |files: &mut Vec<(String, Vec<u8>)>, name: &str, bytes: Vec<u8>| {
        let full = format!("{bag}/{name}");
        files.iter_mut().find(|(n, _)| *n == full).unwrap().1 = bytes;
    };
    set(
        &mut files,
        "manifest-sha256.txt",
        format!("{payload_sha}  {data_name}\n").into_bytes(),
    );
    let get = |files: &Vec<(String, Vec<u8>)>, name: &str| {
        files
            .iter()
            .find(|(n, _)| *n == format!("{bag}/{name}"))
            .unwrap()
            .1
            .clone()
    };
    let info = String::from_utf8(get(&files, "bag-info.txt")).unwrap();
    let info: String = info
        .lines()
        .map(|l| {
            if l.starts_with("Payload-Oxum:") {
                format!("Payload-Oxum: {}.1\n", payload.len())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    set(&mut files, "bag-info.txt", info.into_bytes());
    let mut retrieval: serde_json::Value =
        serde_json::from_slice(&get(&files, "retrieval.json")).unwrap();
    retrieval["sha256"] = payload_sha.clone().into();
    retrieval["bytes"] = payload.len().into();
    edit(&mut retrieval);
    set(
        &mut files,
        "retrieval.json",
        serde_json::to_vec_pretty(&retrieval).unwrap(),
    );
    let mut tags: Vec<(String, String)> = files
        .iter()
        .filter(|(n, _)| !n.contains("/data/") && !n.ends_with("tagmanifest-sha256.txt"))
        .map(|(n, b)| (n[bag.len() + 1..].to_string(), sha256_hex(b)))
        .collect();
    tags.sort();
    let tagmanifest: String = tags.iter().map(|(n, h)| format!("{h}  {n}\n")).collect();
    set(
        &mut files,
        "tagmanifest-sha256.txt",
        tagmanifest.into_bytes(),
    );
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mut out = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    for (name, bytes) in &files {
        out.start_file(name.as_str(), zip::write::SimpleFileOptions::default())
            .unwrap();
        out.write_all(bytes).unwrap();
    }
    out.finish().unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o440)).unwrap();
    payload_sha
}

pub fn file_sha256(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// Re-hashes the chain from `from_seq` on, as a forger who changed an earlier row would.
pub fn rehash_chain_from(c: &rusqlite::Connection, from_seq: i64) {
    let rows: Vec<lrvault::custody::Row> = c
        .prepare(
            "SELECT seq, at, tenant, action_id, command_index, event, actor, evidence_sha256,
                    package_path, detail, prev_hash, row_hash FROM custody_log WHERE seq >= ?1 ORDER BY seq",
        )
        .unwrap()
        .query_map([from_seq], |r| {
            Ok(lrvault::custody::Row {
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
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut prev: String = c
        .query_row(
            "SELECT coalesce((SELECT row_hash FROM custody_log WHERE seq = ?1 - 1), ?2)",
            rusqlite::params![from_seq, lrvault::custody::GENESIS_HASH],
            |r| r.get(0),
        )
        .unwrap();
    for mut row in rows {
        row.prev_hash = prev.clone();
        row.row_hash = lrvault::custody::row_hash(&row);
        c.execute(
            "UPDATE custody_log SET prev_hash = ?2, row_hash = ?3 WHERE seq = ?1",
            rusqlite::params![row.seq, row.prev_hash, row.row_hash],
        )
        .unwrap();
        prev = row.row_hash;
    }
}
