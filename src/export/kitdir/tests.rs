//! The kit's directory as an attacker who can write beside it (or, being the same user, into
//! it) would meet it: nothing is followed, nothing is written over, nothing is left behind.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use super::*;
use sha2::{Digest, Sha256};

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_kit_appears_at_out_only_when_complete_with_exact_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("kit");
    let mut kit = KitDir::create(&out, "e1").unwrap();
    assert_eq!(entries(tmp.path()), [".kit.partial-e1"]);
    assert_eq!(mode_of(&kit.path()), 0o700);
    let sha = kit
        .write(
            "packages/t/2026/01/02/a/001-GetFile.zip",
            b"zip",
            PACKAGE_MODE,
        )
        .unwrap();
    assert_eq!(sha, hex::encode(Sha256::digest(b"zip")));
    kit.write("README.md", b"readme", FILE_MODE).unwrap();
    assert!(!out.exists());
    kit.publish().unwrap();
    kit.keep();
    assert_eq!(entries(tmp.path()), ["kit"]);
    assert_eq!(mode_of(&out), 0o700);
    for dir in ["packages", "packages/t", "packages/t/2026/01/02/a"] {
        assert_eq!(mode_of(&out.join(dir)), 0o700, "{dir}");
    }
    let zip = out.join("packages/t/2026/01/02/a/001-GetFile.zip");
    assert_eq!(mode_of(&zip), 0o440);
    assert_eq!(std::fs::read(&zip).unwrap(), b"zip");
    assert_eq!(mode_of(&out.join("README.md")), 0o600);
}

#[test]
fn an_existing_out_of_any_kind_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::create_dir(tmp.path().join("empty")).unwrap();
    std::fs::write(tmp.path().join("file"), b"x").unwrap();
    symlink(&target, tmp.path().join("link")).unwrap();
    symlink(tmp.path().join("nowhere"), tmp.path().join("dangling")).unwrap();
    for name in ["empty", "file", "link", "dangling"] {
        let out = tmp.path().join(name);
        match KitDir::create(&out, "e2") {
            Err(KitError::Exists(p)) => assert_eq!(p, out),
            other => panic!("{name}: {:?}", other.map(|k| k.path())),
        }
    }
    assert_eq!(
        entries(tmp.path()),
        ["dangling", "empty", "file", "link", "target"]
    );
    assert!(entries(&target).is_empty());
    assert!(!tmp.path().join("nowhere").exists());
}

#[test]
fn a_symlink_planted_in_the_kit_is_never_followed_and_the_kit_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let victim = tmp.path().join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    let victim_dir = tmp.path().join("victim-dir");
    std::fs::create_dir(&victim_dir).unwrap();
    let out = tmp.path().join("kit");
    let mut kit = KitDir::create(&out, "e3").unwrap();
    let staging = kit.path();
    kit.write("packages/a/001-x.zip", b"one", PACKAGE_MODE)
        .unwrap();

    // A file planted where the README goes, and a directory where the checkpoints go.
    symlink(&victim, staging.join("README.md")).unwrap();
    symlink(&victim_dir, staging.join("checkpoints")).unwrap();
    let err = kit.write("README.md", b"evil", FILE_MODE).unwrap_err();
    assert!(
        matches!(&err, KitError::Planted(p) if *p == staging.join("README.md")),
        "{err}"
    );
    let err = kit
        .write("checkpoints/000000000001.json", b"{}", FILE_MODE)
        .unwrap_err();
    assert!(
        matches!(&err, KitError::Planted(p) if *p == staging.join("checkpoints")),
        "{err}"
    );

    // A directory the kit made, swapped for a symlink: the kit keeps writing into its own.
    let moved = tmp.path().join("moved-away");
    std::fs::rename(staging.join("packages/a"), &moved).unwrap();
    symlink(&victim_dir, staging.join("packages/a")).unwrap();
    kit.write("packages/a/002-y.zip", b"two", PACKAGE_MODE)
        .unwrap();
    assert_eq!(std::fs::read(moved.join("002-y.zip")).unwrap(), b"two");

    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(entries(&victim_dir).is_empty());
    // Dropped unfinished: what it made and what was planted where it wrote are removed.
    drop(kit);
    std::fs::remove_file(staging.join("packages/a")).unwrap(); // the swap it never saw
    assert!(!staging.join("README.md").exists());
    assert_eq!(entries(&staging.join("packages")), Vec::<String>::new());
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

#[test]
fn an_unfinished_kit_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("kit");
    let mut kit = KitDir::create(&out, "e4").unwrap();
    kit.write("packages/t/2026/01/02/a/001-x.zip", b"z", PACKAGE_MODE)
        .unwrap();
    kit.write("custody.db", b"db", FILE_MODE).unwrap();
    drop(kit);
    assert!(entries(tmp.path()).is_empty());

    // Published, then given up (its custody rows could not be recorded): removed too.
    let mut kit = KitDir::create(&out, "e5").unwrap();
    kit.write("README.md", b"r", FILE_MODE).unwrap();
    kit.publish().unwrap();
    assert_eq!(entries(tmp.path()), ["kit"]);
    drop(kit);
    assert!(entries(tmp.path()).is_empty());
}

#[test]
fn paths_from_the_database_are_store_keys_of_safe_characters() {
    for bad in [
        "../../x",
        "/etc/passwd",
        "a//b",
        "a/./b",
        "a/..",
        "",
        "a b/c",
        "t/$(id)/x.zip",
        "t/x\n```sh",
        "a\\b",
        "...",
    ] {
        assert!(
            matches!(check_rel(bad), Err(KitError::BadPath { .. })),
            "{bad:?}"
        );
    }
    check_rel("contoso/2026/11/28/fa75f06a-d170/003-GetFile.zip").unwrap();
    check_rel("019a2b3c-0d1e-7f00-8000-000000000001").unwrap();
}

#[test]
fn a_store_file_is_opened_without_following_symlinks_nor_blocking_on_a_fifo() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    std::fs::create_dir_all(root.join("t/2026")).unwrap();
    std::fs::write(root.join("t/2026/p.zip"), b"pkg").unwrap();
    std::fs::write(tmp.path().join("secret"), b"secret").unwrap();
    symlink(tmp.path().join("secret"), root.join("t/2026/link.zip")).unwrap();
    symlink(root.join("t/2026"), root.join("t/2027")).unwrap();
    nix::unistd::mkfifo(&root.join("t/2026/fifo.zip"), Mode::S_IRWXU).unwrap();

    let mut got = Vec::new();
    open_beneath(&root, "t/2026/p.zip")
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert_eq!(got, b"pkg");
    for (rel, why) in [
        ("t/2026/link.zip", "Too many levels of symbolic links"),
        ("t/2027/p.zip", "Not a directory"),
        ("t/2026/fifo.zip", "not a regular file"),
        ("t/../secret", "'.' or '..'"),
    ] {
        let err = open_beneath(&root, rel).unwrap_err().to_string();
        assert!(err.contains(why), "{rel}: {err}");
    }
}
