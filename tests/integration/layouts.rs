//! The payload entry's three layouts (`docs/evidence-format.md` §6), end to end: each is
//! recorded in `retrieval.json` as `entry`, and a byte changed on disk inside a payload of
//! each layout makes `lrvault verify` exit 3 naming the package; put back, verify exits 0.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use lrvault_sim::{SimConfig, Simulator};

use crate::common::{Env, env_from, packages_under};

/// An archived simulator run with `[store] compression = compression`.
async fn archived_with(seed: u64, compression: &str) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::new(SimConfig {
        seed,
        actions: 6,
        ..SimConfig::default()
    })
    .start()
    .await
    .unwrap();
    let config =
        lrvault::commands::demo::write_sim_config(dir.path(), &sim.sim, &sim.base_url(), "")
            .unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen(
        "[store]\n",
        &format!("[store]\ncompression = \"{compression}\"\n"),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let e = env_from(dir, sim, config, None);
    e.discover().await;
    e.archive().await;
    e
}

/// `retrieval.json`'s `entry`, and where the payload's data is in the file.
fn entry_of(package: &Path) -> (String, u64, u64) {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(package).unwrap()).unwrap();
    let name = (0..zip.len())
        .map(|i| zip.by_index(i).unwrap().name().unwrap().to_string())
        .find(|n| n.ends_with("/retrieval.json"))
        .unwrap();
    let mut text = String::new();
    zip.by_name(&name)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let retrieval: serde_json::Value = serde_json::from_str(&text).unwrap();
    let data = (0..zip.len())
        .find(|&i| zip.by_index(i).unwrap().name().unwrap().contains("/data/"))
        .unwrap();
    let payload = zip.by_index(data).unwrap();
    (
        retrieval["entry"].as_str().unwrap().to_string(),
        payload.data_start().unwrap(),
        payload.compressed_size(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_changed_in_each_layout_makes_verify_exit_3() {
    let mut seen = Vec::new();
    for (seed, compression) in [(171, "auto"), (172, "deflate"), (173, "stored")] {
        let e = archived_with(seed, compression).await;
        let (code, out, err) = crate::tamper::lrvault(&e.config_path, &["verify"]);
        assert_eq!(code, 0, "{compression}: {out}\n{err}");
        for package in packages_under(e.store()) {
            let (entry, start, len) = entry_of(&package);
            if seen.contains(&entry) || len < 64 {
                continue;
            }
            seen.push(entry.clone());
            let original = std::fs::read(&package).unwrap();
            let mut changed = original.clone();
            changed[(start + len / 2) as usize] ^= 0x20;
            let writable = std::fs::Permissions::from_mode(0o640);
            std::fs::set_permissions(&package, writable).unwrap();
            std::fs::write(&package, &changed).unwrap();
            let (code, _, err) = crate::tamper::lrvault(&e.config_path, &["verify"]);
            assert_eq!(code, 3, "{entry}: {err}");
            let rel = package.strip_prefix(e.store()).unwrap();
            assert!(
                err.contains(&rel.display().to_string()),
                "{entry}: the message names {}: {err}",
                rel.display()
            );
            std::fs::write(&package, &original).unwrap();
            let (code, out, err) = crate::tamper::lrvault(&e.config_path, &["verify"]);
            assert_eq!(code, 0, "{entry} put back: {out}\n{err}");
        }
    }
    seen.sort();
    assert_eq!(seen, ["deflated", "stored", "stored-blocks"]);
}
