//! Re-reads an evidence package and checks it as a BagIt bag: every entry is streamed through
//! SHA-256 (never held whole in memory), then the manifests, tag manifest and Payload-Oxum are
//! compared with what was read. Used right after writing and by `lrvault verify`.
//!
//! The file is read once: the SHA-256 of the whole package is taken from the same reads that
//! feed the zip reader ([`WholeFileHash`]), on a thread of its own, so a multi-GB package costs
//! about one pass of SHA-256 on a two-core machine.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;

use sha2::Digest;
use zip::ZipArchive;

use super::readback::PayloadRead;
use super::{PackageError, READ_BUFFER, Sha256Counter, for_each_chunk};

/// Tag files whose text we parse; larger ones than this are reported, not read into memory.
const MAX_PARSED_TAG_FILE: usize = 1024 * 1024;
const PARSED_TAG_FILES: [&str; 4] = [
    "bagit.txt",
    "bag-info.txt",
    "manifest-sha256.txt",
    "tagmanifest-sha256.txt",
];
/// Whole-file bytes handed to the hashing thread at a time, and how many may wait.
const HASH_BATCH: usize = 1024 * 1024;
const QUEUED_HASH_BATCHES: usize = 4;

/// The outcome of [`check_package`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageCheck {
    pub package_size: u64,
    /// Lowercase hex SHA-256 of the whole zip file.
    pub package_sha256: String,
    pub bag_name: String,
    /// Name below `data/` (empty when there is no payload).
    pub payload_name: String,
    pub payload_size: u64,
    /// Lowercase hex of the payload as stored (empty when there is no payload).
    pub payload_sha256: String,
    /// Empty when the bag is valid: manifests and tag manifest match, Payload-Oxum matches,
    /// bagit.txt is present and there is exactly one payload file.
    pub problems: Vec<String>,
}

struct EntryDigest {
    sha256: String,
    size: u64,
}

/// What reading every entry of the zip found.
#[derive(Default)]
struct BagEntries {
    bag_name: Option<String>,
    /// Keyed by the path inside the bag ("bagit.txt", "data/x").
    digests: BTreeMap<String, EntryDigest>,
    /// The text of the tag files in [`PARSED_TAG_FILES`].
    texts: BTreeMap<String, Vec<u8>>,
    problems: Vec<String>,
}

/// How the payload entry's bytes are judged.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PayloadCheck<'a> {
    /// Hash them, and the whole file (verify, adoption: nothing is trusted).
    Hash,
    /// The writer's re-check of the package it just wrote: the file was read back
    /// ([`super::readback`]), so the payload entry's recorded place, CRC-32 and size are
    /// compared with what decoding it back found, the manifest with the SHA-256 taken as the
    /// payload streamed, and the package's size and SHA-256 are the writer's (checked against
    /// the read-back); neither the payload nor the whole file is read a second time here.
    ReadBack {
        streamed_sha256: &'a str,
        found: &'a PayloadRead,
        /// The whole file's size and SHA-256 (hex).
        package: (u64, &'a str),
    },
}

/// Checks the package at `path`. Errors only when the file cannot be read or is not a zip at
/// all; every defect inside a readable zip is reported in [`PackageCheck::problems`].
pub fn check_package(path: &Path) -> Result<PackageCheck, PackageError> {
    check_package_with(path, PayloadCheck::Hash)
}

/// [`check_package`], judging the payload as `payload` says.
pub(crate) fn check_package_with(
    path: &Path,
    payload: PayloadCheck<'_>,
) -> Result<PackageCheck, PackageError> {
    let io_err = |op: &'static str| {
        move |source: io::Error| PackageError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    let file = File::open(path).map_err(io_err("opening package"))?;
    match payload {
        PayloadCheck::Hash => {
            let whole = WholeFileHash::new(file).map_err(io_err("reading package"))?;
            let (entries, whole) = read_zip(path, whole, payload)?;
            let (size, sha256) = whole.finish().map_err(io_err("reading package"))?;
            Ok(judge(entries, size, sha256))
        }
        PayloadCheck::ReadBack {
            package: (size, sha256),
            ..
        } => {
            let (mut entries, file) = read_zip(path, file, payload)?;
            let on_disk = file.metadata().map_err(io_err("reading package"))?.len();
            if on_disk != size {
                entries.problems.push(format!(
                    "the file is {on_disk} bytes, but {size} were read back as it was written"
                ));
            }
            Ok(judge(entries, size, sha256.to_string()))
        }
    }
}

/// Opens `file` as a zip and reads its entries; hands the file back.
fn read_zip<R: Read + Seek>(
    path: &Path,
    file: R,
    payload: PayloadCheck<'_>,
) -> Result<(BagEntries, R), PackageError> {
    let mut archive =
        ZipArchive::new(BufReader::with_capacity(READ_BUFFER, file)).map_err(|source| {
            PackageError::Zip {
                path: path.to_path_buf(),
                op: "reading",
                source,
            }
        })?;
    let entries = read_entries(&mut archive, payload);
    Ok((entries, archive.into_inner().into_inner()))
}

/// Reads every entry to its end (so its CRC is checked) and hashes it, keeping the text of the
/// tag files we parse; the payload as `payload` says.
fn read_entries<R: Read + Seek>(
    archive: &mut ZipArchive<R>,
    payload: PayloadCheck<'_>,
) -> BagEntries {
    let mut found = BagEntries::default();
    for index in 0..archive.len() {
        let mut entry = match archive.by_index(index) {
            Ok(entry) => entry,
            Err(e) => {
                found
                    .problems
                    .push(format!("entry #{index}: cannot be read: {e}"));
                continue;
            }
        };
        let name = match entry.name() {
            Ok(name) => name.to_string(),
            Err(e) => {
                found
                    .problems
                    .push(format!("entry #{index}: unreadable name: {e}"));
                continue;
            }
        };
        let safe = entry.enclosed_name().is_some();
        let Some(rest) = found.place(&name, safe) else {
            continue;
        };
        if entry.is_dir() || rest.is_empty() {
            continue;
        }
        let keep_text = PARSED_TAG_FILES.contains(&rest.as_str());
        let payload_entry = rest.starts_with("data/");
        if let PayloadCheck::ReadBack {
            streamed_sha256,
            found: read_back,
            ..
        } = payload
            && payload_entry
        {
            let start = entry.data_start();
            let recorded = (
                start,
                start.map(|s| s + entry.compressed_size()),
                entry.size(),
                entry.crc32(),
            );
            let read = (
                Some(read_back.data_start),
                Some(read_back.data_end),
                read_back.size,
                read_back.crc32,
            );
            if recorded != read {
                found.problems.push(format!(
                    "entry {name:?}: the zip records (data start, data end, size, CRC-32) {recorded:?} but reading it back found {read:?}"
                ));
            }
            let sink = TeeSink {
                counter: Sha256Counter {
                    len: entry.size(),
                    ..Default::default()
                },
                text: Vec::new(),
                keep_text: false,
            };
            found.add(&name, rest, sink, Some(streamed_sha256));
            continue;
        }
        let mut sink = TeeSink {
            counter: Sha256Counter::default(),
            text: Vec::new(),
            keep_text,
        };
        if let Err(e) = for_each_chunk(&mut entry, |bytes| sink.write_all(bytes)) {
            found.problems.push(format!("entry {name:?}: {e}"));
            continue;
        }
        found.add(&name, rest, sink, None);
    }
    found
}

impl BagEntries {
    /// The path of `name` inside the bag, or `None` (with a problem noted) when the entry is
    /// unsafe or outside the one bag directory.
    fn place(&mut self, name: &str, enclosed: bool) -> Option<String> {
        if !enclosed
            || name.contains('\\')
            || name.split('/').any(|part| part == ".." || part == ".")
        {
            self.problems.push(format!("entry {name:?}: unsafe path"));
            return None;
        }
        let Some((top, rest)) = name.split_once('/') else {
            self.problems
                .push(format!("entry {name:?}: outside the bag directory"));
            return None;
        };
        match &self.bag_name {
            None => self.bag_name = Some(top.to_string()),
            Some(bag) if bag != top => {
                self.problems
                    .push(format!("entry {name:?}: outside the bag directory {bag:?}"));
                return None;
            }
            Some(_) => {}
        }
        Some(rest.to_string())
    }

    /// Records an entry read to its end; `streamed` is its SHA-256 when it was not hashed.
    fn add(&mut self, name: &str, rest: String, sink: TeeSink, streamed: Option<&str>) {
        if sink.keep_text {
            if sink.text.len() > MAX_PARSED_TAG_FILE {
                self.problems
                    .push(format!("{rest}: larger than {MAX_PARSED_TAG_FILE} bytes"));
            } else {
                self.texts.insert(rest.clone(), sink.text);
            }
        }
        let digest = EntryDigest {
            sha256: match streamed {
                Some(sha) => sha.to_string(),
                None => hex::encode(sink.counter.hasher.finalize()),
            },
            size: sink.counter.len,
        };
        if self.digests.insert(rest, digest).is_some() {
            self.problems
                .push(format!("entry {name:?}: appears more than once"));
        }
    }
}

/// Compares what was read with the bag's own manifests, tag manifest and Payload-Oxum.
fn judge(found: BagEntries, package_size: u64, package_sha256: String) -> PackageCheck {
    let BagEntries {
        bag_name,
        digests: entries,
        texts,
        mut problems,
    } = found;
    if entries.is_empty() {
        problems.push("no files in the archive".to_string());
    }
    check_bagit_txt(texts.get("bagit.txt"), &mut problems);

    let data: Vec<(&String, &EntryDigest)> = entries
        .iter()
        .filter(|(name, _)| name.starts_with("data/"))
        .collect();
    if data.len() != 1 {
        problems.push(format!(
            "{} payload files under data/, expected exactly one",
            data.len()
        ));
    }
    let (payload_name, payload_size, payload_sha256) = match data.first() {
        Some((name, digest)) => (
            name.trim_start_matches("data/").to_string(),
            digest.size,
            digest.sha256.clone(),
        ),
        None => (String::new(), 0, String::new()),
    };

    let payload_names: BTreeSet<&str> = data.iter().map(|(name, _)| name.as_str()).collect();
    check_manifest(
        "manifest-sha256.txt",
        texts.get("manifest-sha256.txt"),
        &entries,
        &payload_names,
        true,
        &mut problems,
    );
    let tag_names: BTreeSet<&str> = entries
        .keys()
        .map(String::as_str)
        .filter(|name| !name.starts_with("data/") && !name.starts_with("tagmanifest-"))
        .collect();
    check_manifest(
        "tagmanifest-sha256.txt",
        texts.get("tagmanifest-sha256.txt"),
        &entries,
        &tag_names,
        false,
        &mut problems,
    );

    let data_octets: u64 = data.iter().map(|(_, digest)| digest.size).sum();
    check_oxum(
        texts.get("bag-info.txt"),
        data_octets,
        data.len(),
        &mut problems,
    );

    PackageCheck {
        package_size,
        package_sha256,
        bag_name: bag_name.unwrap_or_default(),
        payload_name,
        payload_size,
        payload_sha256,
        problems,
    }
}

/// A file reader that also takes the SHA-256 of the whole file from the reads the zip reader
/// makes anyway: bytes read in order from the start are hashed the first time they pass;
/// [`finish`](Self::finish) reads whatever was never reached (normally just the central
/// directory, already in the page cache). The hashing runs on its own thread.
struct WholeFileHash {
    file: File,
    pos: u64,
    /// Bytes `[0, hashed)` are on their way to the hasher.
    hashed: u64,
    staged: Vec<u8>,
    tx: SyncSender<Vec<u8>>,
    hasher: JoinHandle<Sha256Counter>,
}

impl WholeFileHash {
    fn new(file: File) -> io::Result<Self> {
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUED_HASH_BATCHES);
        let hasher = std::thread::Builder::new()
            .name("lrvault-check".into())
            .spawn(move || {
                let mut counter = Sha256Counter::default();
                for batch in rx {
                    let _ = counter.write_all(&batch);
                }
                counter
            })?;
        Ok(WholeFileHash {
            file,
            pos: 0,
            hashed: 0,
            staged: Vec::with_capacity(HASH_BATCH),
            tx,
            hasher,
        })
    }

    /// Hashes the part of `bytes` (read at `at`) that extends the hashed prefix.
    fn extend(&mut self, at: u64, bytes: &[u8]) {
        let end = at + bytes.len() as u64;
        if at > self.hashed || end <= self.hashed {
            return;
        }
        let mut new = &bytes[(self.hashed - at) as usize..];
        self.hashed = end;
        while !new.is_empty() {
            let room = HASH_BATCH - self.staged.len();
            let (now, later) = new.split_at(room.min(new.len()));
            self.staged.extend_from_slice(now);
            new = later;
            if self.staged.len() == HASH_BATCH {
                let full = std::mem::replace(&mut self.staged, Vec::with_capacity(HASH_BATCH));
                // A hasher that is gone has panicked; finish() reports it.
                let _ = self.tx.send(full);
            }
        }
    }

    /// Reads what was never reached, then returns the file's size and SHA-256 (hex).
    fn finish(mut self) -> io::Result<(u64, String)> {
        let mut buf = vec![0u8; READ_BUFFER];
        loop {
            let at = self.hashed;
            let n = self.file.read_at(&mut buf, at)?;
            if n == 0 {
                break;
            }
            self.extend(at, &buf[..n]);
        }
        let _ = self.tx.send(std::mem::take(&mut self.staged));
        drop(self.tx);
        let counter = self
            .hasher
            .join()
            .map_err(|_| io::Error::other("the hashing thread failed"))?;
        Ok((counter.len, hex::encode(counter.hasher.finalize())))
    }
}

impl Read for WholeFileHash {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        let at = self.pos;
        self.extend(at, &buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for WholeFileHash {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.file.metadata()?.len().checked_add_signed(d),
        };
        self.pos = target
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

/// Walks the store and removes every `*.partial` file left by a crash; returns what it removed.
/// Symlinks are neither followed nor removed.
pub fn remove_stale_partials(store_root: &Path) -> Result<Vec<PathBuf>, PackageError> {
    remove_stale_partials_except(store_root, |_, _| false)
}

/// Like [`remove_stale_partials`], but leaves every partial for which `keep(path, metadata)`
/// is true (e.g. one another live process is still writing).
pub fn remove_stale_partials_except(
    store_root: &Path,
    keep: impl Fn(&Path, &fs::Metadata) -> bool,
) -> Result<Vec<PathBuf>, PackageError> {
    let mut removed = Vec::new();
    let mut pending = vec![store_root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let read_dir = match fs::read_dir(&dir) {
            Ok(read_dir) => read_dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir == store_root => break,
            Err(source) => {
                return Err(PackageError::Io {
                    path: dir,
                    op: "listing directory",
                    source,
                });
            }
        };
        for entry in read_dir {
            let entry = entry.map_err(|source| PackageError::Io {
                path: dir.clone(),
                op: "listing directory",
                source,
            })?;
            let path = entry.path();
            let file_type = entry.file_type().map_err(|source| PackageError::Io {
                path: path.clone(),
                op: "reading file type of",
                source,
            })?;
            if file_type.is_dir() {
                pending.push(path);
            } else if file_type.is_file() && path.extension().is_some_and(|ext| ext == "partial") {
                let meta = entry.metadata().map_err(|source| PackageError::Io {
                    path: path.clone(),
                    op: "reading metadata of",
                    source,
                })?;
                if keep(&path, &meta) {
                    continue;
                }
                match fs::remove_file(&path) {
                    // Another process finished or aborted it meanwhile.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    other => other,
                }
                .map_err(|source| PackageError::Io {
                    path: path.clone(),
                    op: "removing stale partial package",
                    source,
                })?;
                tracing::info!(path = %path.display(), "removed stale partial package");
                removed.push(path);
            }
        }
    }
    removed.sort();
    Ok(removed)
}

/// RFC 8493 §2.1.3: CR, LF and `%` in manifest paths are percent-encoded.
pub(crate) fn encode_manifest_path(path: &str) -> String {
    path.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

fn decode_manifest_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(pos) = rest.find('%') {
        out.push_str(&rest[..pos]);
        let code = rest.get(pos + 1..pos + 3).unwrap_or("");
        let decoded = match code.to_ascii_uppercase().as_str() {
            "25" => Some('%'),
            "0D" => Some('\r'),
            "0A" => Some('\n'),
            _ => None,
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[pos + 3..];
            }
            None => {
                out.push('%');
                rest = &rest[pos + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn check_bagit_txt(text: Option<&Vec<u8>>, problems: &mut Vec<String>) {
    match text {
        None => problems.push("bagit.txt is missing".to_string()),
        Some(bytes) => {
            let text = String::from_utf8_lossy(bytes);
            if !text.lines().any(|line| line.starts_with("BagIt-Version: ")) {
                problems.push("bagit.txt has no BagIt-Version line".to_string());
            }
        }
    }
}

/// Checks that every line of `manifest` matches the entry it names, that it names nothing
/// outside its scope, and that every file in `must_cover` is listed.
fn check_manifest(
    manifest: &str,
    text: Option<&Vec<u8>>,
    entries: &BTreeMap<String, EntryDigest>,
    must_cover: &BTreeSet<&str>,
    payload_manifest: bool,
    problems: &mut Vec<String>,
) {
    let Some(bytes) = text else {
        problems.push(format!("{manifest} is missing"));
        return;
    };
    let text = String::from_utf8_lossy(bytes);
    let mut listed = BTreeSet::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((hash, file)) = line.split_once([' ', '\t']) else {
            problems.push(format!("{manifest} line {}: malformed", number + 1));
            continue;
        };
        let file = decode_manifest_path(file.trim_start_matches([' ', '\t']));
        if file.starts_with("data/") != payload_manifest {
            problems.push(format!(
                "{manifest}: lists {file:?}, which it must not cover"
            ));
            continue;
        }
        match entries.get(&file) {
            None => problems.push(format!(
                "{manifest}: lists {file:?}, which is not in the bag"
            )),
            Some(digest) if !digest.sha256.eq_ignore_ascii_case(hash) => {
                problems.push(format!(
                    "{manifest}: {file:?} has sha256 {}, manifest says {hash}",
                    digest.sha256
                ));
            }
            Some(_) => {}
        }
        listed.insert(file);
    }
    for name in must_cover {
        if !listed.contains(*name) {
            problems.push(format!("{manifest}: does not list {name:?}"));
        }
    }
}

fn check_oxum(bag_info: Option<&Vec<u8>>, octets: u64, streams: usize, problems: &mut Vec<String>) {
    let Some(bytes) = bag_info else {
        problems.push("bag-info.txt is missing".to_string());
        return;
    };
    let text = String::from_utf8_lossy(bytes);
    let oxum = text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case("Payload-Oxum")
            .then(|| value.trim().to_string())
    });
    let Some(oxum) = oxum else {
        problems.push("bag-info.txt has no Payload-Oxum".to_string());
        return;
    };
    let expected = format!("{octets}.{streams}");
    if oxum != expected {
        problems.push(format!("Payload-Oxum is {oxum}, the payload is {expected}"));
    }
}

/// Hashes (or only counts) everything and keeps the text of the few tag files we parse
/// (bounded).
struct TeeSink {
    counter: Sha256Counter,
    text: Vec<u8>,
    keep_text: bool,
}

impl Write for TeeSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.counter.write_all(buf)?;
        if self.keep_text && self.text.len() <= MAX_PARSED_TAG_FILE {
            let room = MAX_PARSED_TAG_FILE + 1 - self.text.len();
            self.text.extend_from_slice(&buf[..buf.len().min(room)]);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::sha256_hex;
    use zip::write::SimpleFileOptions;

    const BAGIT: &[u8] = b"BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n";
    const PAYLOAD: &[u8] = b"original evidence bytes";

    fn hand_zip(dir: &Path, entries: &[(&str, Vec<u8>)]) -> PathBuf {
        let path = dir.join("hand.zip");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        for (name, bytes) in entries {
            zip.start_file(*name, SimpleFileOptions::default()).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
        path
    }

    /// A valid bag whose payload is `payload` but whose manifest describes `manifest_payload`.
    fn bag(payload: &[u8], manifest_payload: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
        let bag_info = format!(
            "Source-Organization: X\nPayload-Oxum: {}.1\n",
            manifest_payload.len()
        )
        .into_bytes();
        let manifest = format!("{}  data/x.bin\n", sha256_hex(manifest_payload)).into_bytes();
        let tagmanifest = format!(
            "{}  bagit.txt\n{}  bag-info.txt\n{}  manifest-sha256.txt\n",
            sha256_hex(BAGIT),
            sha256_hex(&bag_info),
            sha256_hex(&manifest)
        )
        .into_bytes();
        vec![
            ("B/bagit.txt", BAGIT.to_vec()),
            ("B/data/x.bin", payload.to_vec()),
            ("B/bag-info.txt", bag_info),
            ("B/manifest-sha256.txt", manifest),
            ("B/tagmanifest-sha256.txt", tagmanifest),
        ]
    }

    #[test]
    fn hand_made_valid_bag_passes() {
        let dir = tempfile::tempdir().unwrap();
        let path = hand_zip(dir.path(), &bag(PAYLOAD, PAYLOAD));
        let check = check_package(&path).unwrap();
        let file = fs::read(&path).unwrap();
        assert_eq!(
            check,
            PackageCheck {
                package_size: file.len() as u64,
                package_sha256: sha256_hex(&file),
                bag_name: "B".to_string(),
                payload_name: "x.bin".to_string(),
                payload_size: PAYLOAD.len() as u64,
                payload_sha256: sha256_hex(PAYLOAD),
                problems: vec![],
            }
        );
    }

    #[test]
    fn tampered_payload_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let tampered = b"tampered evidence bytes";
        assert_eq!(tampered.len(), PAYLOAD.len());
        let path = hand_zip(dir.path(), &bag(tampered, PAYLOAD));
        let check = check_package(&path).unwrap();
        assert_eq!(check.payload_sha256, sha256_hex(tampered));
        assert_eq!(
            check.problems,
            vec![format!(
                "manifest-sha256.txt: \"data/x.bin\" has sha256 {}, manifest says {}",
                sha256_hex(tampered),
                sha256_hex(PAYLOAD)
            )]
        );
    }

    #[test]
    fn structural_defects_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let mut entries = bag(PAYLOAD, PAYLOAD);
        entries.retain(|(name, _)| *name != "B/bagit.txt");
        entries.push(("B/data/second.bin", b"extra".to_vec()));
        entries.push(("B/notes.txt", b"unlisted tag file".to_vec()));
        entries.push(("Other/evil.txt", b"outside".to_vec()));
        let path = hand_zip(dir.path(), &entries);
        let check = check_package(&path).unwrap();
        assert_eq!(
            check.problems,
            vec![
                "entry \"Other/evil.txt\": outside the bag directory \"B\"".to_string(),
                "bagit.txt is missing".to_string(),
                "2 payload files under data/, expected exactly one".to_string(),
                "manifest-sha256.txt: does not list \"data/second.bin\"".to_string(),
                "tagmanifest-sha256.txt: lists \"bagit.txt\", which is not in the bag".to_string(),
                "tagmanifest-sha256.txt: does not list \"notes.txt\"".to_string(),
                format!("Payload-Oxum is {}.1, the payload is 28.2", PAYLOAD.len()),
            ]
        );
    }

    #[test]
    fn oxum_and_tag_file_tampering_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let mut entries = bag(PAYLOAD, PAYLOAD);
        for (name, bytes) in entries.iter_mut() {
            if *name == "B/bag-info.txt" {
                *bytes = b"Source-Organization: X\nPayload-Oxum: 1.1\n".to_vec();
            }
        }
        let path = hand_zip(dir.path(), &entries);
        let check = check_package(&path).unwrap();
        let bag_info_sha = sha256_hex(b"Source-Organization: X\nPayload-Oxum: 1.1\n");
        let listed = sha256_hex(
            format!(
                "Source-Organization: X\nPayload-Oxum: {}.1\n",
                PAYLOAD.len()
            )
            .as_bytes(),
        );
        assert_eq!(
            check.problems,
            vec![
                format!(
                    "tagmanifest-sha256.txt: \"bag-info.txt\" has sha256 {bag_info_sha}, manifest says {listed}"
                ),
                format!("Payload-Oxum is 1.1, the payload is {}.1", PAYLOAD.len()),
            ]
        );
    }

    #[test]
    fn corrupted_bytes_on_disk_are_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let payload = b"Z".repeat(4096);
        let entries = bag(&payload, &payload);
        let path = dir.path().join("stored.zip");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        for (name, bytes) in &entries {
            let options =
                SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
            zip.start_file(*name, options).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
        let mut file = fs::read(&path).unwrap();
        let at = file.windows(16).position(|w| w == [b'Z'; 16]).unwrap() + 100;
        file[at] = b'Y';
        fs::write(&path, &file).unwrap();
        let check = check_package(&path).unwrap();
        assert_eq!(check.problems.len(), 4, "{:?}", check.problems);
        assert!(check.problems[0].starts_with("entry \"B/data/x.bin\": "));
        assert_eq!(
            &check.problems[1..],
            [
                "0 payload files under data/, expected exactly one".to_string(),
                "manifest-sha256.txt: lists \"data/x.bin\", which is not in the bag".to_string(),
                "Payload-Oxum is 4096.1, the payload is 0.0".to_string(),
            ]
        );
    }

    #[test]
    fn unreadable_inputs_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.zip");
        assert!(matches!(
            check_package(&missing),
            Err(PackageError::Io {
                op: "opening package",
                ..
            })
        ));
        let not_zip = dir.path().join("not.zip");
        fs::write(&not_zip, b"definitely not a zip").unwrap();
        assert!(matches!(
            check_package(&not_zip),
            Err(PackageError::Zip { op: "reading", .. })
        ));
    }

    #[test]
    fn whole_file_hash_covers_every_byte_once_whatever_the_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..3 * HASH_BATCH + 12_345)
            .map(|i| (i % 253) as u8)
            .collect();
        fs::write(&path, &bytes).unwrap();
        // Jump to the end first (as the zip reader does), re-read, skip ahead, and stop short.
        let mut whole = WholeFileHash::new(File::open(&path).unwrap()).unwrap();
        let mut buf = vec![0u8; 70_000];
        for (at, len) in [
            (bytes.len() as u64 - 100, 100),
            (0, 70_000),
            (10, 5),
            (50_000, 70_000),
        ] {
            whole.seek(SeekFrom::Start(at)).unwrap();
            whole.read_exact(&mut buf[..len]).unwrap();
            assert_eq!(buf[..len], bytes[at as usize..at as usize + len]);
        }
        whole.seek(SeekFrom::Start(2 * HASH_BATCH as u64)).unwrap();
        whole.read_exact(&mut buf).unwrap();
        assert_eq!(
            whole.finish().unwrap(),
            (bytes.len() as u64, sha256_hex(&bytes))
        );
    }

    #[test]
    fn manifest_path_encoding_round_trips() {
        for raw in ["plain.txt", "100%.txt", "a\nb\rc", "%0A literal", "%", "%2"] {
            assert_eq!(decode_manifest_path(&encode_manifest_path(raw)), raw);
        }
        assert_eq!(encode_manifest_path("100%\n"), "100%25%0A");
        assert_eq!(decode_manifest_path("a%0ab%25"), "a\nb%");
    }
}
