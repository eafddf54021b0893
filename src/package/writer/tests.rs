use super::*;
use crate::package::compression::{EntryLayout, EntryMethod};
use crate::package::{check_package, partials_of, remove_stale_partials, sha256_hex};
use md5::{Digest, Md5};
use std::fs::File;
use std::io::{Read, Write};
use zip::CompressionMethod;
use zip::write::SimpleFileOptions;

const BAG: &str = "a1b2c3-002";
const RETRIEVAL: &[u8] = br#"{"link_host":"blob.example","bytes":1}"#;
const ACTION: &[u8] = b"{\"id\":\"a1b2c3\",\"type\":\"LiveResponse\"}\n";

fn spec(root: &Path, base: &str, gz_suffix: bool, compression: Compression) -> PackageSpec {
    PackageSpec {
        store_root: root.to_path_buf(),
        rel_path: PathBuf::from("contoso/2026/11/27/a1b2c3/002-RunScript.zip"),
        bag_name: BAG.to_string(),
        payload_base_name: base.to_string(),
        gz_suffix_if_gzip: gz_suffix,
        machine_action_json: ACTION.to_vec(),
        bag_info: BagInfo {
            source_organization: "Contoso SOC".to_string(),
            external_identifier: "contoso/a1b2c3/2".to_string(),
            bagging_date: "2026-11-27".to_string(),
            contact_name: Some("analyst@contoso.com".to_string()),
            external_description: "RunScript result\r\nfrom device".to_string(),
        },
        compression,
        expected_size: None,
        compute_md5: true,
        threads: PackageThreads::with_threads(2, 1),
    }
}

fn final_path(root: &Path) -> PathBuf {
    root.join("contoso/2026/11/27/a1b2c3/002-RunScript.zip")
}

fn transcript_payload() -> Vec<u8> {
    let mut out = b"{\"script_name\":\"collect.ps1\",\"exit_code\":0,\"script_output\":\"".to_vec();
    for i in 0..400 {
        out.extend_from_slice(format!("line {i}\n\0raw\t").as_bytes());
    }
    out.extend_from_slice(b"\",\"script_errors\":\"\"}");
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn write_package(spec: PackageSpec, payload: &[u8], chunk: usize) -> (PayloadDigests, PackageInfo) {
    let mut writer = PackageWriter::create(spec).unwrap();
    for piece in payload.chunks(chunk.max(1)) {
        writer.write(Bytes::copy_from_slice(piece)).unwrap();
    }
    assert_eq!(writer.bytes_written(), payload.len() as u64);
    let digests = writer.end_payload().unwrap();
    assert_eq!(
        writer.end_payload().unwrap(),
        digests,
        "end_payload() must be idempotent"
    );
    let info = writer.finish(RETRIEVAL).unwrap();
    (digests, info)
}

struct Entry {
    name: String,
    method: CompressionMethod,
    bytes: Vec<u8>,
}

fn read_zip(path: &Path) -> Vec<Entry> {
    let mut archive = zip::ZipArchive::new(File::open(path).unwrap()).unwrap();
    (0..archive.len())
        .map(|i| {
            let mut entry = archive.by_index(i).unwrap();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            Entry {
                name: entry.name().unwrap().to_string(),
                method: entry.compression(),
                bytes,
            }
        })
        .collect()
}

fn entry<'a>(entries: &'a [Entry], name: &str) -> &'a Entry {
    entries
        .iter()
        .find(|e| e.name == format!("{BAG}/{name}"))
        .unwrap_or_else(|| panic!("no entry {name}"))
}

fn text(entries: &[Entry], name: &str) -> String {
    String::from_utf8(entry(entries, name).bytes.clone()).unwrap()
}

/// The zip method an entry in `layout` records.
fn zip_method(layout: EntryLayout) -> CompressionMethod {
    match layout.method() {
        EntryMethod::Stored => CompressionMethod::Stored,
        EntryMethod::Deflated => CompressionMethod::Deflated,
    }
}

fn md5_of(bytes: &[u8]) -> [u8; 16] {
    Md5::digest(bytes).into()
}

#[test]
fn transcript_package_in_several_chunk_sizes() {
    let payload = transcript_payload();
    let payload_sha = sha256_hex(&payload);
    for chunk in [1, 2, 5, 6, 7, 4096, payload.len()] {
        let dir = tempfile::tempdir().unwrap();
        let (digests, info) = write_package(
            spec(
                dir.path(),
                "collect.ps1.transcript.json",
                false,
                Compression::Auto,
            ),
            &payload,
            chunk,
        );
        assert_eq!(
            digests,
            PayloadDigests {
                payload_name: "collect.ps1.transcript.json".to_string(),
                size: payload.len() as u64,
                sha256: payload_sha.clone(),
                md5: Some(md5_of(&payload)),
                encoding: PayloadEncoding::None,
                original_size: None,
                original_sha256: None,
                compression: choose_by_sample(&[Bytes::from(payload.clone())]),
            }
        );
        assert_eq!(digests.compression.entry, EntryLayout::Deflated);
        let path = final_path(dir.path());
        let file_bytes = fs::read(&path).unwrap();
        assert_eq!(
            info,
            PackageInfo {
                rel_path: PathBuf::from("contoso/2026/11/27/a1b2c3/002-RunScript.zip"),
                package_size: file_bytes.len() as u64,
                package_sha256: sha256_hex(&file_bytes),
            }
        );
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o440
        );
        assert!(partials_of(&path).is_empty());
        assert_eq!(
            fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "only the package is left in its directory"
        );

        let entries = read_zip(&path);
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "a1b2c3-002/bagit.txt",
                "a1b2c3-002/machine-action.json",
                "a1b2c3-002/data/collect.ps1.transcript.json",
                "a1b2c3-002/bag-info.txt",
                "a1b2c3-002/retrieval.json",
                "a1b2c3-002/manifest-sha256.txt",
                "a1b2c3-002/tagmanifest-sha256.txt",
            ]
        );
        let data = entry(&entries, "data/collect.ps1.transcript.json");
        assert_eq!(data.bytes, payload);
        assert_eq!(data.method, CompressionMethod::Deflated);
        assert_eq!(
            text(&entries, "bagit.txt"),
            "BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n"
        );
        assert_eq!(entry(&entries, "machine-action.json").bytes, ACTION);
        assert_eq!(entry(&entries, "retrieval.json").bytes, RETRIEVAL);
        assert_eq!(
            text(&entries, "bag-info.txt"),
            format!(
                "Source-Organization: Contoso SOC\n\
                 External-Identifier: contoso/a1b2c3/2\n\
                 Bagging-Date: 2026-11-27\n\
                 Payload-Oxum: {}.1\n\
                 Contact-Name: analyst@contoso.com\n\
                 External-Description: RunScript result  from device\n",
                payload.len()
            )
        );
        assert_eq!(
            text(&entries, "manifest-sha256.txt"),
            format!("{payload_sha}  data/collect.ps1.transcript.json\n")
        );
        let expected_tagmanifest: String = [
            "bag-info.txt",
            "bagit.txt",
            "machine-action.json",
            "manifest-sha256.txt",
            "retrieval.json",
        ]
        .iter()
        .map(|name| format!("{}  {name}\n", sha256_hex(&entry(&entries, name).bytes)))
        .collect();
        assert_eq!(
            text(&entries, "tagmanifest-sha256.txt"),
            expected_tagmanifest
        );

        let check = check_package(&path).unwrap();
        assert_eq!(check.problems, Vec::<String>::new());
        assert_eq!(check.bag_name, BAG);
        assert_eq!(check.payload_name, "collect.ps1.transcript.json");
        assert_eq!(check.payload_size, payload.len() as u64);
        assert_eq!(check.payload_sha256, payload_sha);
        assert_eq!(check.package_sha256, info.package_sha256);
    }
}

#[test]
fn multi_member_gzip_is_stored_and_hashed_decompressed() {
    let part1 = b"first member: ".repeat(500);
    let part2 = b"second member".repeat(700);
    let mut payload = gzip(&part1);
    payload.extend_from_slice(&gzip(&part2));
    let original: Vec<u8> = [part1.as_slice(), part2.as_slice()].concat();
    for chunk in [1, 3, 1000, payload.len()] {
        let dir = tempfile::tempdir().unwrap();
        let (digests, _) = write_package(
            spec(dir.path(), "evil.exe", true, Compression::Auto),
            &payload,
            chunk,
        );
        assert_eq!(
            digests,
            PayloadDigests {
                payload_name: "evil.exe.gz".to_string(),
                size: payload.len() as u64,
                sha256: sha256_hex(&payload),
                md5: Some(md5_of(&payload)),
                encoding: PayloadEncoding::Gzip,
                original_size: Some(original.len() as u64),
                original_sha256: Some(sha256_hex(&original)),
                compression: CompressionChoice {
                    method: EntryMethod::Deflated,
                    entry: EntryLayout::StoredBlocks,
                    reason: "already compressed (gzip)".to_string(),
                },
            }
        );
        let entries = read_zip(&final_path(dir.path()));
        let data = entry(&entries, "data/evil.exe.gz");
        assert_eq!(data.method, CompressionMethod::Deflated);
        assert_eq!(data.bytes, payload);
        assert_eq!(
            text(&entries, "manifest-sha256.txt"),
            format!("{}  data/evil.exe.gz\n", sha256_hex(&payload))
        );
    }
}

#[test]
fn gzip_without_suffix_request_keeps_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let payload = gzip(b"hello");
    let (digests, _) = write_package(
        spec(dir.path(), "result.bin", false, Compression::Auto),
        &payload,
        4,
    );
    assert_eq!(digests.payload_name, "result.bin");
    assert_eq!(digests.encoding, PayloadEncoding::Gzip);
    assert_eq!(digests.original_size, Some(5));
    assert_eq!(digests.original_sha256, Some(sha256_hex(b"hello")));
}

#[test]
fn corrupt_gzip_only_loses_original_end_payload() {
    let good = gzip(&b"some file content ".repeat(100));
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    let mut bad_crc = good.clone();
    let crc_at = bad_crc.len() - 8;
    bad_crc[crc_at] ^= 0x01;
    let truncated = good[..good.len() - 3].to_vec();
    let mut trailing_garbage = good.clone();
    trailing_garbage.extend_from_slice(b"garbage");
    let magic_only = vec![0x1f, 0x8b];
    for (label, payload) in [
        ("flipped", flipped),
        ("bad crc", bad_crc),
        ("truncated", truncated),
        ("trailing garbage", trailing_garbage),
        ("magic only", magic_only),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (digests, _) = write_package(
            spec(dir.path(), "f.txt", true, Compression::Auto),
            &payload,
            7,
        );
        assert_eq!(digests.encoding, PayloadEncoding::Gzip, "{label}");
        assert_eq!(digests.payload_name, "f.txt.gz", "{label}");
        assert_eq!(digests.original_size, None, "{label}");
        assert_eq!(digests.original_sha256, None, "{label}");
        assert_eq!(digests.sha256, sha256_hex(&payload), "{label}");
        let entries = read_zip(&final_path(dir.path()));
        assert_eq!(entry(&entries, "data/f.txt.gz").bytes, payload, "{label}");
    }
}

#[test]
fn compression_choice() {
    let zip_magic = [b"PK\x03\x04".as_slice(), &[7u8; 100]].concat();
    let xz_magic = [[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00].as_slice(), &[1u8; 50]].concat();
    let text_payload = b"plain text ".repeat(50);
    for (compression, payload, expected) in [
        (
            Compression::Auto,
            zip_magic.clone(),
            EntryLayout::StoredBlocks,
        ),
        (Compression::Auto, xz_magic, EntryLayout::StoredBlocks),
        (
            Compression::Auto,
            text_payload.clone(),
            EntryLayout::Deflated,
        ),
        (Compression::Stored, text_payload, EntryLayout::Stored),
        (Compression::Deflate, zip_magic, EntryLayout::Deflated),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (digests, _) = write_package(spec(dir.path(), "p.bin", true, compression), &payload, 1);
        assert_eq!(digests.compression.entry, expected, "{compression:?}");
        let entries = read_zip(&final_path(dir.path()));
        let data = entry(&entries, "data/p.bin");
        assert_eq!(data.method, zip_method(expected), "{compression:?}");
        assert_eq!(data.bytes, payload);
        // Tag files are always deflated, whatever the payload's choice.
        let tag_method = entry(&entries, "bagit.txt").method;
        assert_eq!(tag_method, CompressionMethod::Deflated, "{compression:?}");
    }
}

/// Extracts a package with the real `unzip` tool (after `unzip -t`) and returns the payload.
fn unzip_payload(package: &Path, payload_name: &str) -> Vec<u8> {
    let out = tempfile::tempdir().unwrap();
    for args in [vec!["-tq"], vec!["-q", "-d", out.path().to_str().unwrap()]] {
        let status = std::process::Command::new("unzip")
            .args(&args)
            .arg(package)
            .status()
            .expect("the unzip tool (apt-get install unzip)");
        assert!(status.success(), "unzip {args:?} {}", package.display());
    }
    fs::read(out.path().join(BAG).join("data").join(payload_name)).unwrap()
}

/// Pseudo-random bytes that deflate cannot shrink.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rand::Rng::fill(&mut rand::rng(), bytes.as_mut_slice());
    bytes
}

fn zip_file_bytes() -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(io::Cursor::new(Vec::new()));
    zip.start_file("notes.txt", SimpleFileOptions::default())
        .unwrap();
    zip.write_all(&b"compressible notes ".repeat(10_000))
        .unwrap();
    zip.finish().unwrap().into_inner()
}

/// `auto` as docs/evidence-format.md has it, checked end to end: the method in the zip, the reason in
/// the digests, and the exact bytes and hashes back through the real `unzip`.
#[test]
fn auto_compression_round_trips_through_unzip() {
    let seven_z = [
        b"7z\xbc\xaf\x27\x1c\x00\x04".as_slice(),
        &random_bytes(70_000),
    ]
    .concat();
    let text = b"2026-11-27T12:00:00Z svchost.exe pid=812 opened \\Device\\HarddiskVolume3\n"
        .repeat(40_000);
    let cases: [(&str, Vec<u8>, EntryLayout, &str); 5] = [
        (
            "memory.raw",
            random_bytes(3 << 20),
            EntryLayout::StoredBlocks,
            "deflate level 2 saved 0.0 % of the first",
        ),
        (
            "logs.zip",
            zip_file_bytes(),
            EntryLayout::StoredBlocks,
            "already compressed (zip)",
        ),
        (
            "evil.gz",
            gzip(&text),
            EntryLayout::StoredBlocks,
            "already compressed (gzip)",
        ),
        (
            "archive.7z",
            seven_z,
            EntryLayout::StoredBlocks,
            "already compressed (7z)",
        ),
        (
            "events.log",
            text.clone(),
            EntryLayout::Deflated,
            "deflate level 2 saved 9",
        ),
    ];
    for (name, payload, layout, reason) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (digests, _) = write_package(
            spec(dir.path(), name, false, Compression::Auto),
            &payload,
            100_000,
        );
        assert!(
            digests.compression.reason.starts_with(reason),
            "{name}: {}",
            digests.compression.reason
        );
        assert_eq!(digests.compression.entry, layout, "{name}");
        let path = final_path(dir.path());
        let entries = read_zip(&path);
        assert_eq!(
            entry(&entries, &format!("data/{name}")).method,
            zip_method(layout),
            "{name}"
        );
        let package = fs::metadata(&path).unwrap().len();
        if layout == EntryLayout::Deflated {
            assert!(
                package < payload.len() as u64 / 5,
                "{name}: {package} bytes"
            );
        }
        let back = unzip_payload(&path, name);
        assert_eq!(back, payload, "{name}");
        assert_eq!(sha256_hex(&back), digests.sha256, "{name}");
        assert!(check_package(&path).unwrap().problems.is_empty(), "{name}");
    }
}

#[test]
fn configured_choices_round_trip_through_unzip() {
    let payload = b"plain text, compressible ".repeat(1000);
    for (compression, layout) in [
        (Compression::Stored, EntryLayout::Stored),
        (Compression::Deflate, EntryLayout::Deflated),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (digests, _) =
            write_package(spec(dir.path(), "t.txt", false, compression), &payload, 777);
        assert_eq!(digests.compression.entry, layout);
        let path = final_path(dir.path());
        assert_eq!(
            entry(&read_zip(&path), "data/t.txt").method,
            zip_method(layout)
        );
        assert_eq!(unzip_payload(&path, "t.txt"), payload);
    }
}

#[test]
fn short_and_empty_payloads() {
    for payload in [&b""[..], b"x", b"\x1f", b"abcde"] {
        let dir = tempfile::tempdir().unwrap();
        let (digests, _) = write_package(
            spec(dir.path(), "result.bin", true, Compression::Auto),
            payload,
            1,
        );
        assert_eq!(digests.payload_name, "result.bin");
        assert_eq!(digests.size, payload.len() as u64);
        assert_eq!(digests.encoding, PayloadEncoding::None);
        let path = final_path(dir.path());
        let entries = read_zip(&path);
        assert_eq!(entry(&entries, "data/result.bin").bytes, payload);
        assert!(
            text(&entries, "bag-info.txt")
                .contains(&format!("Payload-Oxum: {}.1\n", payload.len()))
        );
        assert!(check_package(&path).unwrap().problems.is_empty());
    }
}

#[test]
fn unknown_and_known_sizes_give_readable_zips() {
    // Memory-flatness is by construction (no payload buffer beyond MAGIC_LEN bytes);
    // here we prove both entry layouts (zip64 for unknown size, plain for small) read back.
    let payload = b"0123456789".repeat(10_000);
    for expected_size in [None, Some(payload.len() as u64)] {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path(), "big.bin", true, Compression::Auto);
        s.expected_size = expected_size;
        let (digests, _) = write_package(s, &payload, 8192);
        let path = final_path(dir.path());
        let entries = read_zip(&path);
        assert_eq!(entry(&entries, "data/big.bin").bytes, payload);
        let check = check_package(&path).unwrap();
        assert!(check.problems.is_empty(), "{:?}", check.problems);
        assert_eq!(check.payload_sha256, digests.sha256);
    }
}

#[test]
fn long_name_with_gz_suffix_stays_within_200_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!("{}.log", "n".repeat(196));
    let (digests, _) = write_package(
        spec(dir.path(), &base, true, Compression::Auto),
        &gzip(b"x"),
        3,
    );
    assert_eq!(digests.payload_name, format!("{}.log.gz", "n".repeat(193)));
    assert_eq!(digests.payload_name.len(), 200);
}

/// Peak RSS of this process in KiB (Linux), to show streaming keeps memory flat.
fn peak_rss_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Slow in debug builds, and peak RSS is per process, so run it alone:
/// `cargo test --lib package::writer::tests::memory_stays_flat -- --ignored`.
#[test]
#[ignore]
fn memory_stays_flat() {
    const MIB: usize = 1024 * 1024;
    const TOTAL_MIB: usize = 96;
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(dir.path(), "big.bin", true, Compression::Stored);
    s.expected_size = None;
    let mut writer = PackageWriter::create(s).unwrap();
    let chunk: Bytes = (0..MIB).map(|i| (i % 251) as u8).collect();
    let before = peak_rss_kib();
    for _ in 0..TOTAL_MIB {
        writer.write(chunk.clone()).unwrap();
    }
    let digests = writer.end_payload().unwrap();
    let info = writer.finish(RETRIEVAL).unwrap();
    let grown_kib = peak_rss_kib() - before;
    assert_eq!(digests.size, (TOTAL_MIB * MIB) as u64);
    assert!(info.package_size > digests.size);
    assert!(grown_kib < 16 * 1024, "peak RSS grew by {grown_kib} KiB");
}

#[test]
fn writer_can_move_to_a_blocking_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<PackageWriter>();
}

#[test]
fn non_ascii_payload_name_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let (digests, _) = write_package(
        spec(dir.path(), "résumé 履歴書.pdf", true, Compression::Auto),
        b"%PDF-1.7 fake",
        4,
    );
    assert_eq!(digests.payload_name, "résumé 履歴書.pdf");
    let path = final_path(dir.path());
    let check = check_package(&path).unwrap();
    assert_eq!(check.problems, Vec::<String>::new());
    assert_eq!(check.payload_name, "résumé 履歴書.pdf");
}

#[test]
fn write_after_end_payload_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer =
        PackageWriter::create(spec(dir.path(), "r.bin", false, Compression::Auto)).unwrap();
    writer.write(Bytes::from_static(b"abcdefgh")).unwrap();
    let _ = writer.end_payload();
    assert!(matches!(
        writer.write(Bytes::from_static(b"more")),
        Err(PackageError::AlreadyFinalized { .. })
    ));
}

#[test]
fn create_refuses_an_existing_package() {
    let dir = tempfile::tempdir().unwrap();
    write_package(
        spec(dir.path(), "r.bin", false, Compression::Auto),
        b"first",
        2,
    );
    let path = final_path(dir.path());
    let before = fs::read(&path).unwrap();
    match PackageWriter::create(spec(dir.path(), "r.bin", false, Compression::Auto)) {
        Err(PackageError::Exists(p)) => assert_eq!(p, path),
        other => panic!("expected Exists, got {:?}", other.map(|_| ())),
    }
    assert_eq!(fs::read(&path).unwrap(), before);
}

#[test]
fn finish_refuses_to_overwrite_a_package_that_appeared_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer =
        PackageWriter::create(spec(dir.path(), "r.bin", false, Compression::Auto)).unwrap();
    writer.write(Bytes::from_static(b"second copy")).unwrap();
    let path = final_path(dir.path());
    fs::write(&path, b"the existing package").unwrap();
    match writer.finish(RETRIEVAL) {
        Err(PackageError::Exists(p)) => assert_eq!(p, path),
        other => panic!("expected Exists, got {other:?}"),
    }
    assert_eq!(fs::read(&path).unwrap(), b"the existing package");
    assert!(partials_of(&path).is_empty());
}

#[test]
fn two_writers_of_one_package_never_share_a_partial() {
    let dir = tempfile::tempdir().unwrap();
    let path = final_path(dir.path());
    let s = || spec(dir.path(), "r.bin", false, Compression::Auto);
    // Another process's writer is still going (its lease expired; this one took over).
    let mut other = PackageWriter::create(s()).unwrap();
    other.write(Bytes::from_static(b"theirs, half")).unwrap();
    let mut mine = PackageWriter::create(s()).unwrap();
    assert_ne!(other.partial_path(), mine.partial_path());
    assert_eq!(partials_of(&path).len(), 2);
    mine.write(Bytes::from_static(b"mine")).unwrap();
    mine.end_payload().unwrap();
    mine.finish(b"{}").unwrap();
    // The first to finish is in place; the other can only fail, and its bytes never
    // reach the package.
    other.write(Bytes::from_static(b" and the rest")).unwrap();
    other.end_payload().unwrap();
    assert!(matches!(other.finish(b"{}"), Err(PackageError::Exists(_))));
    let check = check_package(&path).unwrap();
    assert_eq!(check.payload_sha256, sha256_hex(b"mine"));
    assert!(
        partials_of(&path).is_empty(),
        "the loser removed its own partial"
    );
}

#[test]
fn abort_and_drop_remove_the_partial() {
    let dir = tempfile::tempdir().unwrap();
    let path = final_path(dir.path());
    let mut writer =
        PackageWriter::create(spec(dir.path(), "r.bin", false, Compression::Auto)).unwrap();
    let partial = writer.partial_path().to_path_buf();
    writer
        .write(Bytes::from_static(b"some bytes here"))
        .unwrap();
    assert!(partial.exists());
    writer.abort();
    assert!(!partial.exists());
    assert!(!path.exists());

    let mut writer =
        PackageWriter::create(spec(dir.path(), "r.bin", false, Compression::Auto)).unwrap();
    writer
        .write(Bytes::from_static(b"some bytes here"))
        .unwrap();
    drop(writer);
    assert!(!partial.exists());
    assert!(!path.exists());
}

#[test]
fn rel_path_must_stay_inside_the_store() {
    let dir = tempfile::tempdir().unwrap();
    for rel in ["../escape.zip", "/abs.zip", "a/../b.zip", ""] {
        let mut s = spec(dir.path(), "r.bin", false, Compression::Auto);
        s.rel_path = PathBuf::from(rel);
        assert!(
            matches!(
                PackageWriter::create(s),
                Err(PackageError::InvalidPath { .. })
            ),
            "{rel:?}"
        );
    }
}

#[test]
fn remove_stale_partials_removes_nested_partials_only() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for (path, bytes) in [
        ("t/2026/11/27/a/001-GetFile.zip.partial", "x"),
        ("t/2026/11/28/b/c/deep.partial", "x"),
        ("top.partial", "x"),
        ("t/2026/11/27/a/000-RunScript.zip", "keep"),
        ("t/partial.txt", "keep"),
        ("t/zip.partial.bak", "keep"),
        ("t/2026/11/27/a/partial", "keep"),
    ] {
        let full = root.join(path);
        fs::create_dir_all(full.parent().unwrap()).unwrap();
        fs::write(full, bytes).unwrap();
    }
    fs::create_dir_all(root.join("t/dir.partial")).unwrap();
    let removed = remove_stale_partials(root).unwrap();
    assert_eq!(
        removed,
        vec![
            root.join("t/2026/11/27/a/001-GetFile.zip.partial"),
            root.join("t/2026/11/28/b/c/deep.partial"),
            root.join("top.partial"),
        ]
    );
    for kept in [
        "t/2026/11/27/a/000-RunScript.zip",
        "t/partial.txt",
        "t/zip.partial.bak",
        "t/2026/11/27/a/partial",
        "t/dir.partial",
    ] {
        assert!(root.join(kept).exists(), "{kept} must be kept");
    }
    assert_eq!(remove_stale_partials(root).unwrap(), Vec::<PathBuf>::new());
    assert_eq!(
        remove_stale_partials(&root.join("missing")).unwrap(),
        Vec::<PathBuf>::new()
    );
}

/// Random bytes with every zip signature in the middle, a fake data descriptor among them
/// (signature, CRC-32 and sizes of a 16-byte "entry"), as a payload an attacker could send.
fn payload_with_fake_zip_records() -> Vec<u8> {
    let mut payload = random_bytes(150_000);
    let mut fake = b"PK\x03\x04\x14\x00\x08\x00\x08\x00".to_vec();
    fake.extend_from_slice(b"PK\x07\x08");
    fake.extend_from_slice(&crc32fast::hash(b"sixteen bytes!!!").to_le_bytes());
    fake.extend_from_slice(&16u32.to_le_bytes());
    fake.extend_from_slice(&16u32.to_le_bytes());
    fake.extend_from_slice(b"PK\x01\x02PK\x05\x06PK\x06\x06PK\x06\x07");
    payload.splice(70_000..70_000, fake.iter().copied());
    payload.extend_from_slice(&fake);
    payload
}

/// The payload of `package` as `unzip -p`, Python's `zipfile` and `bsdtar -xO` reading the
/// file from a pipe (a streaming reader: it never sees the central directory) return it.
fn payload_as_tools_read_it(package: &Path, name: &str) -> [(&'static str, Vec<u8>); 3] {
    let member = format!("{BAG}/data/{name}");
    let run = |cmd: &mut std::process::Command, what: &str| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let unzip = run(
        std::process::Command::new("unzip")
            .arg("-p")
            .arg(package)
            .arg(&member),
        "unzip (apt-get install unzip)",
    );
    let python = run(
        std::process::Command::new("python3").args([
            "-c",
            "import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))",
            package.to_str().unwrap(),
            &member,
        ]),
        "python3",
    );
    let bsdtar = run(
        std::process::Command::new("sh").args([
            "-c",
            "cat \"$1\" | bsdtar -xOf - \"$2\"",
            "sh",
            package.to_str().unwrap(),
            &member,
        ]),
        "bsdtar (apt-get install libarchive-tools)",
    );
    [
        ("unzip", unzip),
        ("python3 zipfile", python),
        ("bsdtar from a pipe", bsdtar),
    ]
}

#[test]
fn every_layout_opens_in_unzip_python_and_a_streaming_reader_even_with_fake_zip_records() {
    let fake = payload_with_fake_zip_records();
    let text = b"2026-11-27T10:00:00Z svchost.exe started PK\x07\x08\n".repeat(5_000);
    for (compression, payload, layout, large) in [
        (Compression::Auto, &fake, EntryLayout::StoredBlocks, false),
        (Compression::Deflate, &fake, EntryLayout::Deflated, false),
        (Compression::Auto, &text, EntryLayout::Deflated, true),
        (Compression::Stored, &fake, EntryLayout::Stored, false),
        (Compression::Stored, &text, EntryLayout::Stored, true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path(), "p.bin", false, compression);
        // Unknown size: a zip64 entry (8-byte data descriptor) for `large`.
        s.expected_size = (!large).then_some(payload.len() as u64);
        let (digests, _) = write_package(s, payload, 4096);
        assert_eq!(digests.compression.entry, layout, "{compression:?}");
        let path = final_path(dir.path());
        for (tool, back) in payload_as_tools_read_it(&path, "p.bin") {
            assert!(
                back == *payload,
                "{tool} read back {} bytes in {layout:?}",
                back.len()
            );
        }
        assert_eq!(check_package(&path).unwrap().problems, Vec::<String>::new());
    }
}

#[test]
fn stored_blocks_keep_the_bytes_with_five_bytes_of_framing_per_block() {
    let dir = tempfile::tempdir().unwrap();
    let payload = random_bytes(1 << 20);
    write_package(
        spec(dir.path(), "r.bin", false, Compression::Auto),
        &payload,
        65_536,
    );
    let mut zip = zip::ZipArchive::new(File::open(final_path(dir.path())).unwrap()).unwrap();
    let entry = zip.by_name(&format!("{BAG}/data/r.bin")).unwrap();
    assert_eq!(entry.compression(), CompressionMethod::Deflated);
    // 16 full blocks of 65,535 bytes, then the rest in the final one.
    assert_eq!(entry.compressed_size(), payload.len() as u64 + 17 * 5);
}

#[test]
fn packages_of_the_previous_release_still_verify() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/package/testdata");
    let text = b"2026-11-27T10:00:00Z svchost.exe started\n".repeat(200);
    let random: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for (file, payload) in [
        ("previous-deflated.zip", text),
        ("previous-stored.zip", random),
    ] {
        let path = dir.join(file);
        let check = check_package(&path).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(
            check,
            crate::package::PackageCheck {
                package_size: bytes.len() as u64,
                package_sha256: sha256_hex(&bytes),
                bag_name: "a1b2c3-002".to_string(),
                payload_name: "log.txt".to_string(),
                payload_size: payload.len() as u64,
                payload_sha256: sha256_hex(&payload),
                problems: vec![],
            },
            "{file}"
        );
    }
}

#[test]
fn a_byte_changed_on_disk_in_each_layout_is_caught_before_the_package_is_placed() {
    let payload = random_bytes(200_000);
    let text = b"2026-11-27T10:00:00Z svchost.exe started\n".repeat(5_000);
    for (compression, payload, at, layout, found) in [
        // In the payload's data.
        (
            Compression::Auto,
            &payload,
            100_000,
            EntryLayout::StoredBlocks,
            "were written",
        ),
        (
            Compression::Deflate,
            &text,
            1_000,
            EntryLayout::Deflated,
            "were written",
        ),
        (
            Compression::Stored,
            &payload,
            100_000,
            EntryLayout::Stored,
            "reading it back found",
        ),
        // In a tag file's local header, before the payload.
        (
            Compression::Auto,
            &text,
            40,
            EntryLayout::Deflated,
            "were written",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut writer =
            PackageWriter::create(spec(dir.path(), "r.bin", false, compression)).unwrap();
        writer.change_on_disk_at(at);
        let partial = writer.partial_path().to_path_buf();
        for piece in payload.chunks(4096) {
            writer.write(Bytes::copy_from_slice(piece)).unwrap();
        }
        assert_eq!(writer.end_payload().unwrap().compression.entry, layout);
        let err = writer.seal(RETRIEVAL).unwrap_err();
        let message = err.to_string();
        let package = final_path(dir.path());
        assert!(
            message.starts_with(&format!(
                "package {} failed verification: ",
                package.display()
            )),
            "{layout:?} at {at}: {message}"
        );
        assert!(message.contains(found), "{layout:?} at {at}: {message}");
        drop(writer);
        assert!(
            !partial.exists() && !package.exists(),
            "{layout:?}: nothing is left"
        );
    }
}
