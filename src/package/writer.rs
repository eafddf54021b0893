//! Streams one command result into a BagIt zip at `<final>.partial`, hashing as the bytes pass,
//! then verifies the partial and moves it into place without ever overwriting a package.
//!
//! Memory stays flat: the payload goes into the zip entry in batches of about a MiB (the first
//! batch is held back only until `auto` compression has judged it), the hashes run on their own
//! threads over the same buffers ([`super::hashers`]), and the gunzipped stream of a gzip
//! payload is only hashed, never stored. The re-check reads the file back while it is written
//! ([`super::readback`]): the payload entry right behind the writer (inflated when deflated;
//! its MD5 when the server sent one), and the whole file, for the package hash, from the
//! moment the payload entry is complete. What is left at the end reads only the zip's
//! directory and tag files.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

use super::check::{PayloadCheck, check_package_with, encode_manifest_path};
use super::compression::{
    CompressionChoice, EntryMethod, FAST_LEVEL, MAGIC_LEN, SAMPLE_LEN, choose_by_head,
    choose_by_sample,
};
use super::hashers::{Batch, PayloadHashers};
use super::names::{MAX_NAME_BYTES, sanitize_with_limit};
use super::partial::PartialFile;
use super::readback::{self, Progress};
use super::{
    BagInfo, Compression, PackageError, PackageInfo, PackageSpec, PayloadDigests, PayloadEncoding,
};

/// Payload bytes gathered before they go to the hashers and the zip entry together.
const BATCH_LEN: usize = SAMPLE_LEN;
/// Payloads expected at or above this size get a zip64 entry. Kept below 4 GiB so deflate's
/// worst-case expansion of incompressible data cannot cross the 32-bit limit unnoticed.
const ZIP64_FROM: u64 = 0xF000_0000;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const WRITE_BUFFER: usize = 256 * 1024;
const BAGIT_TXT: &[u8] = b"BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n";
/// Unix mode recorded for entries inside the zip (what an analyst gets when extracting).
const ENTRY_MODE: u32 = 0o644;
const PACKAGE_MODE: u32 = 0o440;

type Zip = ZipWriter<BufWriter<PartialFile>>;

/// Writes one evidence package; see the module docs. Dropping it without
/// [`finish`](Self::finish) removes the partial file.
pub struct PackageWriter {
    bag_name: String,
    payload_base_name: String,
    gz_suffix_if_gzip: bool,
    bag_info: BagInfo,
    compression: Compression,
    large_file: bool,
    rel_path: PathBuf,
    /// Outermost directory `create` made; its ancestors up to it need an fsync in `finish`.
    created_from: Option<PathBuf>,
    final_path: PathBuf,
    partial_path: PathBuf,
    zip: Option<Zip>,
    /// Set before an abandoned zip writer is dropped, so its final writes go nowhere.
    abandoned: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// How far the file is written, for the read-back.
    progress: std::sync::Arc<Progress>,
    /// Reads the payload entry back as it is written (when deflated, or for its MD5).
    reader: Option<readback::Reader>,
    /// What the reader found, once the payload entry is complete.
    read_back: Option<readback::ReadBack>,
    /// Reads the whole file back from the moment the payload entry is complete.
    follower: Option<readback::Follower>,
    /// Where the payload's data starts in the file, and whether it is stored.
    payload_at: Option<(u64, bool)>,
    compute_md5: bool,
    mtime: zip::DateTime,
    /// (name inside the bag, sha256 hex) of tag files already written.
    tag_hashes: Vec<(String, String)>,
    /// Payload chunks not handed on yet (fewer than `BATCH_LEN` bytes).
    batch: Vec<Bytes>,
    batch_len: usize,
    /// Payload bytes held back until `auto` has judged its sample (at most the first batch).
    held: Vec<Bytes>,
    /// Known from the first batch on.
    gzip: Option<bool>,
    choice: Option<CompressionChoice>,
    entry_started: bool,
    size: u64,
    /// `None` once the digests are taken.
    hashers: Option<PayloadHashers>,
    digests: Option<PayloadDigests>,
    /// Set once the partial no longer needs removing on drop.
    done: bool,
}

impl PackageWriter {
    /// Creates the destination directory and opens a partial file of its own beside `<final>`.
    /// Fails with [`PackageError::Exists`] when the package is already there.
    pub fn create(spec: PackageSpec) -> Result<Self, PackageError> {
        check_rel_path(&spec.rel_path)?;
        let final_path = spec.store_root.join(&spec.rel_path);
        let parent = final_path
            .parent()
            .ok_or_else(|| PackageError::InvalidPath {
                path: spec.rel_path.clone(),
                reason: "no parent directory",
            })?
            .to_path_buf();
        // Remember the first directory we create so finish() can make its entry durable too.
        let created_from = first_missing_ancestor(&parent, &spec.store_root);
        fs::create_dir_all(&parent).map_err(|source| PackageError::Io {
            path: parent.clone(),
            op: "creating directory",
            source,
        })?;
        if fs::symlink_metadata(&final_path).is_ok() {
            return Err(PackageError::Exists(final_path));
        }
        // A name of its own: two writers of one result (another process took it over after
        // its lease expired) never share a partial file. Stale partials are swept by the
        // archive pass's recovery, never by a writer.
        let partial_path = partial_path_for(&final_path, &writer_tag());
        let open = || {
            File::options()
                .write(true)
                .create_new(true)
                .open(&partial_path)
        };
        // The spool's sweep removes directories it empties: one may go between the two calls.
        let file = match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(&parent).and_then(|()| open())
            }
            r => r,
        }
        .map_err(|source| PackageError::Io {
            path: partial_path.clone(),
            op: "creating partial package",
            source,
        })?;
        let abandoned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let progress = std::sync::Arc::new(Progress::default());
        let file = PartialFile::new(file, abandoned.clone(), progress.clone());
        let zip = ZipWriter::new(BufWriter::with_capacity(WRITE_BUFFER, file));
        let hashers = PayloadHashers::start()
            .map_err(|e| PackageError::Task(format!("cannot start the hashing threads: {e}")))?;
        let mut writer = PackageWriter {
            bag_name: spec.bag_name,
            payload_base_name: spec.payload_base_name,
            gz_suffix_if_gzip: spec.gz_suffix_if_gzip,
            bag_info: spec.bag_info,
            compression: spec.compression,
            large_file: spec.expected_size.is_none_or(|size| size >= ZIP64_FROM),
            rel_path: spec.rel_path,
            created_from,
            final_path,
            partial_path,
            zip: Some(zip),
            abandoned,
            progress,
            reader: None,
            read_back: None,
            follower: None,
            payload_at: None,
            compute_md5: spec.compute_md5,
            mtime: zip_now(),
            tag_hashes: Vec::new(),
            batch: Vec::new(),
            batch_len: 0,
            held: Vec::new(),
            gzip: None,
            choice: None,
            entry_started: false,
            size: 0,
            hashers: Some(hashers),
            digests: None,
            done: false,
        };
        // Tag files known up front go first, so bagit.txt leads the archive.
        writer.add_tag_file("bagit.txt", BAGIT_TXT)?;
        writer.add_tag_file("machine-action.json", &spec.machine_action_json)?;
        Ok(writer)
    }

    /// Appends payload bytes as delivered; chunks may be any size, even one byte. The buffer
    /// is shared with the hashing threads, never copied.
    pub fn write(&mut self, chunk: Bytes) -> Result<(), PackageError> {
        if self.digests.is_some() {
            return Err(PackageError::AlreadyFinalized {
                path: self.partial_path.clone(),
            });
        }
        if chunk.is_empty() {
            return Ok(());
        }
        self.size += chunk.len() as u64;
        self.batch_len += chunk.len();
        self.batch.push(chunk);
        if self.batch_len >= BATCH_LEN {
            self.flush_batch()?;
        }
        Ok(())
    }

    /// Payload bytes received so far.
    pub fn bytes_written(&self) -> u64 {
        self.size
    }

    /// The payload's digests; call after the last [`write`](Self::write). Later writes fail.
    pub fn digests(&mut self) -> Result<PayloadDigests, PackageError> {
        if let Some(digests) = &self.digests {
            return Ok(digests.clone());
        }
        self.flush_batch()?;
        let gzip = self.gzip.unwrap_or(false);
        let choice = match self.choice.take() {
            Some(choice) => choice,
            None => choose_by_sample(&self.held),
        };
        self.choice = Some(choice.clone());
        if !self.entry_started {
            self.start_payload_entry()?;
        }
        let hashes = self
            .hashers
            .take()
            .and_then(PayloadHashers::finish)
            .ok_or_else(|| PackageError::Task("a hashing thread failed".to_string()))?;
        self.complete_payload_entry()?;
        let (original_size, original_sha256) = hashes.original.unzip();
        let digests = PayloadDigests {
            payload_name: self.payload_name(gzip),
            size: self.size,
            sha256: hashes.sha256,
            md5: self.read_back.as_ref().and_then(|found| found.md5),
            encoding: if gzip {
                PayloadEncoding::Gzip
            } else {
                PayloadEncoding::None
            },
            original_size,
            original_sha256,
            compression: choice,
        };
        self.digests = Some(digests.clone());
        Ok(digests)
    }

    /// Writes the tag files (with `retrieval_json` verbatim), closes and fsyncs the zip,
    /// re-checks it, makes it read-only and moves it into place without overwriting.
    pub fn finish(mut self, retrieval_json: &[u8]) -> Result<PackageInfo, PackageError> {
        let info = self.seal(retrieval_json)?;
        self.place()?;
        Ok(info)
    }

    /// [`finish`](Self::finish) up to the move: the package is complete, checked and
    /// read-only under its partial name, and its SHA-256 is known (for a publishing intent
    /// recorded before [`place`](Self::place)). Dropping the writer still removes it.
    pub fn seal(&mut self, retrieval_json: &[u8]) -> Result<PackageInfo, PackageError> {
        let digests = self.digests()?;
        self.add_tag_file("retrieval.json", retrieval_json)?;
        let manifest = format!(
            "{}  data/{}\n",
            digests.sha256,
            encode_manifest_path(&digests.payload_name)
        );
        self.add_tag_file("manifest-sha256.txt", manifest.as_bytes())?;
        let mut tag_lines = self.tag_hashes.clone();
        tag_lines.sort();
        let tagmanifest: String = tag_lines
            .iter()
            .map(|(name, sha)| format!("{sha}  {}\n", encode_manifest_path(name)))
            .collect();
        self.add_tag_file("tagmanifest-sha256.txt", tagmanifest.as_bytes())?;

        let zip = self
            .zip
            .take()
            .ok_or_else(|| finished_error(&self.partial_path))?;
        let buffered = zip.finish().map_err(|source| PackageError::Zip {
            path: self.partial_path.clone(),
            op: "finishing",
            source,
        })?;
        let file = buffered
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(PartialFile::into_file)
            .map_err(|source| PackageError::Io {
                path: self.partial_path.clone(),
                op: "flushing",
                source,
            })?;
        self.progress.end();
        let followed = self
            .follower
            .take()
            .ok_or_else(|| finished_error(&self.partial_path))?
            .finish()
            .map_err(|e| self.read_back_failed("the package", e))?;
        // The payload's CRC-32 comes from its own reader, or from the whole file's read-back.
        let Some(found) = followed.stored.as_ref().or(self.read_back.as_ref()) else {
            return Err(finished_error(&self.partial_path));
        };
        // The fsync waits on the disk while the re-check reads the page cache: both at once.
        let partial = &self.partial_path;
        let payload_check = PayloadCheck::ReadBack {
            streamed_sha256: digests.sha256.as_str(),
            found,
            package: (followed.package_size, followed.package_sha256.as_str()),
        };
        let (synced, check) = std::thread::scope(|scope| {
            let syncing = scope.spawn(move || file.sync_all());
            let check = check_package_with(partial, payload_check);
            let synced = syncing
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the fsync thread failed")));
            (synced, check)
        });
        synced.map_err(|source| PackageError::Io {
            path: self.partial_path.clone(),
            op: "fsyncing",
            source,
        })?;
        let check = check?;
        let mut mismatches = check.problems.clone();
        if check.bag_name != self.bag_name {
            mismatches.push(format!(
                "bag name {:?}, expected {:?}",
                check.bag_name, self.bag_name
            ));
        }
        if check.payload_name != digests.payload_name
            || check.payload_size != digests.size
            || check.payload_sha256 != digests.sha256
        {
            mismatches.push(format!(
                "payload {:?} ({} bytes, sha256 {}) does not match what was streamed: {:?} ({} bytes, sha256 {})",
                check.payload_name,
                check.payload_size,
                check.payload_sha256,
                digests.payload_name,
                digests.size,
                digests.sha256
            ));
        }
        if !mismatches.is_empty() {
            // Drop removes the partial.
            return Err(PackageError::Verify {
                path: self.final_path.clone(),
                reason: mismatches.join("; "),
            });
        }

        fs::set_permissions(&self.partial_path, fs::Permissions::from_mode(PACKAGE_MODE)).map_err(
            |source| PackageError::Io {
                path: self.partial_path.clone(),
                op: "making read-only",
                source,
            },
        )?;
        Ok(PackageInfo {
            rel_path: self.rel_path.clone(),
            package_size: check.package_size,
            package_sha256: check.package_sha256,
        })
    }

    /// Moves a [`seal`](Self::seal)ed package into place without overwriting.
    pub fn place(mut self) -> Result<(), PackageError> {
        self.move_into_place()?;
        self.done = true;
        Ok(())
    }

    /// The partial file this writer writes.
    pub fn partial_path(&self) -> &Path {
        &self.partial_path
    }

    /// Gives up on this package and removes the partial file.
    pub fn abort(mut self) {
        self.discard();
    }

    fn discard(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        // The read-back thread stops at once (and closes its file).
        self.progress.abandon();
        // Dropping the zip writer finalises the archive; those writes are discarded (the
        // file is doomed, and on a full disk they would fail), and the fd is closed.
        self.abandoned
            .store(true, std::sync::atomic::Ordering::Relaxed);
        drop(self.zip.take());
        match fs::remove_file(&self.partial_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                path = %self.partial_path.display(),
                error = %e,
                "could not remove partial package"
            ),
        }
    }

    /// Hands the gathered chunks to the hashers and the zip entry. The first batch also tells
    /// whether the payload is gzip and, when its magic bytes suffice, how to compress it.
    fn flush_batch(&mut self) -> Result<(), PackageError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch: Batch = std::mem::take(&mut self.batch).into();
        self.batch_len = 0;
        let hashers = self
            .hashers
            .as_mut()
            .ok_or_else(|| finished_error(&self.partial_path))?;
        if self.gzip.is_none() {
            let head = head_of(&batch, MAGIC_LEN);
            let gzip = head.starts_with(&GZIP_MAGIC);
            if gzip {
                hashers.start_gunzip().map_err(|e| {
                    PackageError::Task(format!("cannot start the gunzip thread: {e}"))
                })?;
            }
            self.gzip = Some(gzip);
            self.choice = choose_by_head(self.compression, &head);
        }
        hashers.feed(&batch);
        if self.entry_started {
            return self.write_entry(&batch);
        }
        self.held.extend(batch.iter().cloned());
        if self.choice.is_none() && self.held.iter().map(Bytes::len).sum::<usize>() >= SAMPLE_LEN {
            self.choice = Some(choose_by_sample(&self.held));
        }
        if self.choice.is_some() {
            self.start_payload_entry()?;
        }
        Ok(())
    }

    fn write_entry(&mut self, chunks: &[Bytes]) -> Result<(), PackageError> {
        let path = &self.partial_path;
        let zip = self.zip.as_mut().ok_or_else(|| finished_error(path))?;
        for chunk in chunks {
            zip.write_all(chunk).map_err(|source| PackageError::Io {
                path: path.clone(),
                op: "writing payload to",
                source,
            })?;
        }
        Ok(())
    }

    fn payload_name(&self, gzip: bool) -> String {
        if gzip && self.gz_suffix_if_gzip {
            let base = if self.payload_base_name.len() + 3 > MAX_NAME_BYTES {
                sanitize_with_limit(&self.payload_base_name, MAX_NAME_BYTES - 3)
            } else {
                self.payload_base_name.clone()
            };
            format!("{base}.gz")
        } else {
            self.payload_base_name.clone()
        }
    }

    /// Opens the payload entry and writes the held-back bytes into it.
    fn start_payload_entry(&mut self) -> Result<(), PackageError> {
        let method = self
            .choice
            .as_ref()
            .map_or(EntryMethod::Stored, |c| c.method);
        let name = format!(
            "{}/data/{}",
            self.bag_name,
            self.payload_name(self.gzip.unwrap_or(false))
        );
        let options = entry_options(method.zip_method(), self.mtime).large_file(self.large_file);
        let path = &self.partial_path;
        let zip = self.zip.as_mut().ok_or_else(|| finished_error(path))?;
        zip.start_file(name, options)
            .map_err(|source| PackageError::Zip {
                path: path.clone(),
                op: "starting payload entry in",
                source,
            })?;
        // The data starts where the header ends: in the file, or still in the buffer.
        let data_start = zip
            .get_ref()
            .map(|w| w.get_ref().position() + w.buffer().len() as u64)
            .ok_or_else(|| finished_error(path))?;
        let deflated = method == EntryMethod::Deflated;
        if deflated || self.compute_md5 {
            let reader = readback::Reader::start(
                path,
                data_start,
                deflated,
                self.compute_md5,
                self.progress.clone(),
            )
            .map_err(|e| PackageError::Task(format!("cannot start the read-back thread: {e}")))?;
            self.reader = Some(reader);
        }
        self.payload_at = Some((data_start, !deflated));
        self.entry_started = true;
        let held = std::mem::take(&mut self.held);
        self.write_entry(&held)
    }

    /// Ends the payload entry by starting the next one, `bag-info.txt` (the zip writer goes
    /// back to fill in the payload's header; a BufWriter writes its buffer out before any
    /// seek), then starts reading the whole file back and waits for the payload's read-back.
    fn complete_payload_entry(&mut self) -> Result<(), PackageError> {
        let (data_start, stored) = self
            .payload_at
            .ok_or_else(|| finished_error(&self.partial_path))?;
        // A stored payload's read-back must stop at its last byte before anything after it
        // reaches the file. A deflate stream ends by itself, before what is in the file once
        // the next entry is started; inflating keeps pace with deflate, so that read-back is
        // done then, and says where the entry ends.
        let stored_end = data_start + self.size;
        if stored {
            self.progress.payload_ends(stored_end);
        }
        let bag_info = self.bag_info_txt(self.size);
        let in_file = self.add_tag_file("bag-info.txt", bag_info.as_bytes())?;
        let payload_end = if stored {
            stored_end
        } else {
            self.progress.payload_ends(in_file);
            self.join_reader()?;
            self.read_back
                .as_ref()
                .map_or(in_file, |found| found.data_end)
        };
        // A stored payload's CRC-32 comes from the whole file's read-back, unless its MD5's
        // reader (finished alongside the package hash) takes it already.
        let crc_from = (stored && self.reader.is_none()).then_some(data_start);
        let follower = readback::Follower::start(
            &self.partial_path,
            payload_end,
            crc_from,
            self.progress.clone(),
        )
        .map_err(|e| PackageError::Task(format!("cannot start the read-back thread: {e}")))?;
        self.follower = Some(follower);
        self.join_reader()
    }

    fn join_reader(&mut self) -> Result<(), PackageError> {
        if let Some(reader) = self.reader.take() {
            let found = reader
                .finish()
                .map_err(|e| self.read_back_failed("the payload", e))?;
            self.read_back = Some(found);
        }
        Ok(())
    }

    fn read_back_failed(&self, what: &str, e: io::Error) -> PackageError {
        PackageError::Verify {
            path: self.final_path.clone(),
            reason: format!("reading {what} back from the file: {e}"),
        }
    }

    /// Tag files are always deflated (DESIGN.md §7). Returns how much of the file is written
    /// once the entry is started (everything before it, at least).
    fn add_tag_file(&mut self, name: &str, bytes: &[u8]) -> Result<u64, PackageError> {
        let options = entry_options(CompressionMethod::Deflated, self.mtime);
        let path = &self.partial_path;
        let zip = self.zip.as_mut().ok_or_else(|| finished_error(path))?;
        zip.start_file(format!("{}/{name}", self.bag_name), options)
            .map_err(|source| PackageError::Zip {
                path: path.clone(),
                op: "starting tag file in",
                source,
            })?;
        // Finishing the previous entry wrote everything before this one out to the file.
        let in_file = zip
            .get_ref()
            .map(|w| w.get_ref().position())
            .ok_or_else(|| finished_error(path))?;
        zip.write_all(bytes).map_err(|source| PackageError::Io {
            path: path.clone(),
            op: "writing tag file to",
            source,
        })?;
        self.tag_hashes
            .push((name.to_string(), hex::encode(Sha256::digest(bytes))));
        Ok(in_file)
    }

    fn bag_info_txt(&self, payload_size: u64) -> String {
        let info = &self.bag_info;
        let mut out = String::new();
        let mut field = |key: &str, value: &str| {
            out.push_str(key);
            out.push_str(": ");
            out.push_str(&one_line(value));
            out.push('\n');
        };
        field("Source-Organization", &info.source_organization);
        field("External-Identifier", &info.external_identifier);
        field("Bagging-Date", &info.bagging_date);
        field("Payload-Oxum", &format!("{payload_size}.1"));
        if let Some(contact) = &info.contact_name {
            field("Contact-Name", contact);
        }
        field("External-Description", &info.external_description);
        out
    }

    /// Links the partial to the final name (fails if it exists), drops the partial name and
    /// fsyncs the directory so the new entry survives a crash.
    fn move_into_place(&mut self) -> Result<(), PackageError> {
        match fs::hard_link(&self.partial_path, &self.final_path) {
            Ok(()) => {
                if let Err(e) = fs::remove_file(&self.partial_path) {
                    // The package is in place; a leftover name is swept by remove_stale_partials.
                    tracing::warn!(path = %self.partial_path.display(), error = %e,
                        "package linked into place but partial name not removed");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(PackageError::Exists(self.final_path.clone()));
            }
            Err(link_err) => rename_noreplace(&self.partial_path, &self.final_path, link_err)?,
        }
        let dir = self.final_path.parent().unwrap_or(Path::new("."));
        sync_dir(dir)?;
        // New directories are only durable once their own entries are synced in their parents.
        if let Some(outermost) = &self.created_from {
            let stop = outermost.parent();
            for ancestor in dir.ancestors().skip(1) {
                sync_dir(ancestor)?;
                if Some(ancestor) == stop {
                    break;
                }
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for PackageWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackageWriter")
            .field("partial_path", &self.partial_path)
            .field("bytes_written", &self.size)
            .field("finalized", &self.digests.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for PackageWriter {
    fn drop(&mut self) {
        self.discard();
    }
}

/// Fallback for filesystems without hard links.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn rename_noreplace(from: &Path, to: &Path, _link_err: io::Error) -> Result<(), PackageError> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EEXIST) => Err(PackageError::Exists(to.to_path_buf())),
        Err(errno) => Err(PackageError::Io {
            path: to.to_path_buf(),
            op: "moving package into place at",
            source: io::Error::from(errno),
        }),
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn rename_noreplace(_from: &Path, to: &Path, link_err: io::Error) -> Result<(), PackageError> {
    Err(PackageError::Io {
        path: to.to_path_buf(),
        op: "linking package into place at",
        source: link_err,
    })
}

fn sync_dir(dir: &Path) -> Result<(), PackageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| PackageError::Io {
            path: dir.to_path_buf(),
            op: "fsyncing directory",
            source,
        })
}

/// The outermost directory between `store_root` (inclusive) and `dir` that does not exist yet.
fn first_missing_ancestor(dir: &Path, store_root: &Path) -> Option<PathBuf> {
    let mut missing = None;
    for ancestor in dir.ancestors() {
        if ancestor.exists() {
            break;
        }
        missing = Some(ancestor.to_path_buf());
        if ancestor == store_root {
            break;
        }
    }
    missing
}

fn finished_error(path: &Path) -> PackageError {
    PackageError::Io {
        path: path.to_path_buf(),
        op: "writing to already closed",
        source: io::Error::other("zip writer already finished"),
    }
}

/// `rel_path` must stay inside the store: relative, no `..`, `.` or root components.
fn check_rel_path(rel_path: &Path) -> Result<(), PackageError> {
    let bad = rel_path.as_os_str().is_empty()
        || rel_path
            .components()
            .any(|c| !matches!(c, Component::Normal(_)));
    if bad {
        return Err(PackageError::InvalidPath {
            path: rel_path.to_path_buf(),
            reason: "must be relative to the store root, without '.' or '..' components",
        });
    }
    Ok(())
}

/// `<final>.<tag>.partial`: where one writer writes a package before moving it into place.
pub fn partial_path_for(final_path: &Path, tag: &str) -> PathBuf {
    let mut name = final_path.as_os_str().to_os_string();
    name.push(format!(".{tag}.partial"));
    PathBuf::from(name)
}

/// The package a partial file was being written for (`<final>.<tag>.partial` → `<final>`).
pub fn partial_target(partial: &Path) -> Option<PathBuf> {
    let name = partial.file_name()?.to_str()?;
    let (target, _tag) = name.strip_suffix(".partial")?.rsplit_once('.')?;
    Some(partial.with_file_name(target))
}

/// True when the process that wrote `partial` (its tag's pid) is no longer alive on this host:
/// its partial can go however recent it is. False when the name has no tag or the process (or
/// a process reusing its pid) is alive.
pub fn partial_writer_gone(partial: &Path) -> bool {
    let Some(name) = partial.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let Some((_, tag)) = name
        .strip_suffix(".partial")
        .and_then(|n| n.rsplit_once('.'))
    else {
        return false;
    };
    match tag
        .split_once('-')
        .and_then(|(pid, _)| pid.parse::<i32>().ok())
    {
        Some(pid) if pid as u32 != std::process::id() => matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        ),
        _ => false,
    }
}

/// Every writer's partial file of the package at `final_path`.
pub fn partials_of(final_path: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (final_path.parent(), final_path.file_name()) else {
        return Vec::new();
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| partial_target(p).is_some_and(|t| t.file_name() == Some(name)))
        .collect();
    out.sort();
    out
}

/// Unique per writer: this process and a random part.
fn writer_tag() -> String {
    format!("{}-{:08x}", std::process::id(), rand::random::<u32>())
}

/// Zip entry options: the method (deflate at the fast level), the time and the Unix mode.
fn entry_options(method: CompressionMethod, mtime: zip::DateTime) -> SimpleFileOptions {
    let level = (method == CompressionMethod::Deflated).then_some(i64::from(FAST_LEVEL));
    SimpleFileOptions::default()
        .compression_method(method)
        .compression_level(level)
        .last_modified_time(mtime)
        .unix_permissions(ENTRY_MODE)
}

/// The first `n` bytes of a batch (fewer when it is shorter).
fn head_of(batch: &[Bytes], n: usize) -> Vec<u8> {
    let mut head = Vec::with_capacity(n);
    for chunk in batch {
        let take = (n - head.len()).min(chunk.len());
        head.extend_from_slice(&chunk[..take]);
        if head.len() == n {
            break;
        }
    }
    head
}

/// Bag-info values must stay on one line.
fn one_line(value: &str) -> String {
    value.replace(['\r', '\n'], " ")
}

fn zip_now() -> zip::DateTime {
    use chrono::{Datelike, Timelike};
    let now = chrono::Utc::now();
    u16::try_from(now.year())
        .ok()
        .and_then(|year| {
            zip::DateTime::from_date_and_time(
                year,
                now.month() as u8,
                now.day() as u8,
                now.hour() as u8,
                now.minute() as u8,
                now.second() as u8,
            )
            .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::PackageCheck;
    use crate::package::check::{PayloadCheck, check_package_with};
    use crate::package::{EntryMethod, check_package, remove_stale_partials, sha256_hex};
    use md5::Md5;
    use std::io::Read;

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
        }
    }

    fn final_path(root: &Path) -> PathBuf {
        root.join("contoso/2026/11/27/a1b2c3/002-RunScript.zip")
    }

    fn transcript_payload() -> Vec<u8> {
        let mut out =
            b"{\"script_name\":\"collect.ps1\",\"exit_code\":0,\"script_output\":\"".to_vec();
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

    fn write_package(
        spec: PackageSpec,
        payload: &[u8],
        chunk: usize,
    ) -> (PayloadDigests, PackageInfo) {
        let mut writer = PackageWriter::create(spec).unwrap();
        for piece in payload.chunks(chunk.max(1)) {
            writer.write(Bytes::copy_from_slice(piece)).unwrap();
        }
        assert_eq!(writer.bytes_written(), payload.len() as u64);
        let digests = writer.digests().unwrap();
        assert_eq!(
            writer.digests().unwrap(),
            digests,
            "digests() must be idempotent"
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
            assert_eq!(digests.compression.method, EntryMethod::Deflated);
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
                        method: EntryMethod::Stored,
                        reason: "already compressed (gzip)".to_string(),
                    },
                }
            );
            let entries = read_zip(&final_path(dir.path()));
            let data = entry(&entries, "data/evil.exe.gz");
            assert_eq!(data.method, CompressionMethod::Stored);
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
    fn corrupt_gzip_only_loses_original_digests() {
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
                CompressionMethod::Stored,
            ),
            (Compression::Auto, xz_magic, CompressionMethod::Stored),
            (
                Compression::Auto,
                text_payload.clone(),
                CompressionMethod::Deflated,
            ),
            (Compression::Stored, text_payload, CompressionMethod::Stored),
            (Compression::Deflate, zip_magic, CompressionMethod::Deflated),
        ] {
            let dir = tempfile::tempdir().unwrap();
            write_package(spec(dir.path(), "p.bin", true, compression), &payload, 1);
            let entries = read_zip(&final_path(dir.path()));
            let data = entry(&entries, "data/p.bin");
            assert_eq!(data.method, expected, "{compression:?}");
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

    /// `auto` as DESIGN.md §7 has it, checked end to end: the method in the zip, the reason in
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
        let cases: [(&str, Vec<u8>, CompressionMethod, &str); 5] = [
            (
                "memory.raw",
                random_bytes(3 << 20),
                CompressionMethod::Stored,
                "deflate level 2 saved 0.0 % of the first",
            ),
            (
                "logs.zip",
                zip_file_bytes(),
                CompressionMethod::Stored,
                "already compressed (zip)",
            ),
            (
                "evil.gz",
                gzip(&text),
                CompressionMethod::Stored,
                "already compressed (gzip)",
            ),
            (
                "archive.7z",
                seven_z,
                CompressionMethod::Stored,
                "already compressed (7z)",
            ),
            (
                "events.log",
                text.clone(),
                CompressionMethod::Deflated,
                "deflate level 2 saved 9",
            ),
        ];
        for (name, payload, method, reason) in cases {
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
            assert_eq!(digests.compression.method.zip_method(), method, "{name}");
            let path = final_path(dir.path());
            let entries = read_zip(&path);
            assert_eq!(
                entry(&entries, &format!("data/{name}")).method,
                method,
                "{name}"
            );
            let package = fs::metadata(&path).unwrap().len();
            if method == CompressionMethod::Deflated {
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
        for (compression, method) in [
            (Compression::Stored, CompressionMethod::Stored),
            (Compression::Deflate, CompressionMethod::Deflated),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (digests, _) =
                write_package(spec(dir.path(), "t.txt", false, compression), &payload, 777);
            assert_eq!(digests.compression.method.zip_method(), method);
            let path = final_path(dir.path());
            assert_eq!(entry(&read_zip(&path), "data/t.txt").method, method);
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
        let digests = writer.digests().unwrap();
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
    fn first_missing_ancestor_stops_at_the_store_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        assert_eq!(
            first_missing_ancestor(&root.join("t/2026"), &root),
            Some(root.clone())
        );
        fs::create_dir_all(root.join("t")).unwrap();
        assert_eq!(
            first_missing_ancestor(&root.join("t/2026/11"), &root),
            Some(root.join("t/2026"))
        );
        assert_eq!(first_missing_ancestor(&root.join("t"), &root), None);
    }

    #[test]
    fn write_after_digests_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer =
            PackageWriter::create(spec(dir.path(), "r.bin", false, Compression::Auto)).unwrap();
        writer.write(Bytes::from_static(b"abcdefgh")).unwrap();
        let _ = writer.digests();
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

    /// What the writer's threads find reading `file` back as it is written: where the payload
    /// `name` starts, what reading it back found, and the whole file's read-back.
    fn read_back(
        file: &Path,
        name: &str,
        deflated: bool,
    ) -> (u64, io::Result<readback::ReadBack>, readback::Followed) {
        let mut zip = zip::ZipArchive::new(File::open(file).unwrap()).unwrap();
        let entry = zip.by_name(&format!("{BAG}/data/{name}")).unwrap();
        let (start, end) = (
            entry.data_start().unwrap(),
            entry.data_start().unwrap() + entry.compressed_size(),
        );
        drop(entry);
        let progress = std::sync::Arc::new(Progress::default());
        let reader =
            deflated.then(|| readback::Reader::start(file, start, true, false, progress.clone()));
        progress.written_to(fs::metadata(file).unwrap().len());
        progress.payload_ends(end);
        let stored_from = (!deflated).then_some(start);
        let follower = readback::Follower::start(file, end, stored_from, progress.clone()).unwrap();
        progress.end();
        let followed = follower.finish().unwrap();
        let payload = match reader {
            Some(reader) => reader.unwrap().finish(),
            None => Ok(followed.stored.clone().unwrap()),
        };
        (start, payload, followed)
    }

    /// The writer's re-check of `file` with what reading it back found.
    fn recheck(
        file: &Path,
        streamed_sha256: &str,
        found: &readback::ReadBack,
        followed: &readback::Followed,
    ) -> PackageCheck {
        check_package_with(
            file,
            PayloadCheck::ReadBack {
                streamed_sha256,
                found,
                package: (followed.package_size, &followed.package_sha256),
            },
        )
        .unwrap()
    }

    #[test]
    fn a_stored_payload_byte_changed_on_disk_is_caught_by_its_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let payload: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let (digests, info) = write_package(
            spec(dir.path(), "r.bin", false, Compression::Stored),
            &payload,
            4096,
        );
        let path = final_path(dir.path());
        let (_, intact, followed) = read_back(&path, "r.bin", false);
        let intact = intact.unwrap();
        assert_eq!(intact.size, payload.len() as u64);
        assert_eq!(intact.crc32, crc32fast::hash(&payload));
        // The read-back's package hash is the file's, and the one the writer recorded.
        assert_eq!(
            followed.package_sha256,
            sha256_hex(&fs::read(&path).unwrap())
        );
        assert_eq!(followed.package_sha256, info.package_sha256);
        let check = recheck(&path, &digests.sha256, &intact, &followed);
        assert!(check.problems.is_empty(), "{:?}", check.problems);
        assert_eq!(check.package_sha256, info.package_sha256);

        // A byte in the middle of the stored payload, as a bad disk would change it.
        let mut bytes = fs::read(&path).unwrap();
        let at = bytes
            .windows(64)
            .position(|w| w == &payload[100_000..100_064])
            .unwrap();
        bytes[at] ^= 0x01;
        let copy = dir.path().join("copy.zip");
        fs::write(&copy, &bytes).unwrap();
        let (_, changed, followed) = read_back(&copy, "r.bin", false);
        let problems = recheck(&copy, &digests.sha256, &changed.unwrap(), &followed).problems;
        assert!(
            problems.iter().any(|p| p.contains("reading it back found")),
            "{problems:?}"
        );
        // The full check agrees.
        assert_eq!(check_package(&path).unwrap().payload_sha256, digests.sha256);
        assert!(!check_package(&copy).unwrap().problems.is_empty());
    }

    #[test]
    fn a_deflated_payload_changed_on_disk_is_caught_by_its_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let payload = b"2026-11-27T10:00:00Z svchost.exe started\n".repeat(20_000);
        let (digests, _) = write_package(
            spec(dir.path(), "log.txt", false, Compression::Deflate),
            &payload,
            4096,
        );
        let path = final_path(dir.path());
        let (start, intact, followed) = read_back(&path, "log.txt", true);
        let intact = intact.unwrap();
        assert_eq!(intact.size, payload.len() as u64);
        let check = recheck(&path, &digests.sha256, &intact, &followed);
        assert!(check.problems.is_empty(), "{:?}", check.problems);

        // A bit flipped inside the deflate stream, as a bad disk would: the inflate fails or
        // gives other bytes, and the zip's own CRC-32 no longer matches what was read back.
        let mut bytes = fs::read(&path).unwrap();
        bytes[start as usize + 500] ^= 0x10;
        let copy = dir.path().join("copy.zip");
        fs::write(&copy, &bytes).unwrap();
        let (_, changed, followed) = read_back(&copy, "log.txt", true);
        match changed {
            Err(e) => assert!(!e.to_string().is_empty()),
            Ok(changed) => {
                let problems = recheck(&copy, &digests.sha256, &changed, &followed).problems;
                assert!(
                    problems.iter().any(|p| p.contains("reading it back found")),
                    "{problems:?}"
                );
            }
        }
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
        mine.digests().unwrap();
        mine.finish(b"{}").unwrap();
        // The first to finish is in place; the other can only fail, and its bytes never
        // reach the package.
        other.write(Bytes::from_static(b" and the rest")).unwrap();
        other.digests().unwrap();
        assert!(matches!(other.finish(b"{}"), Err(PackageError::Exists(_))));
        let check = check_package(&path).unwrap();
        assert_eq!(check.payload_sha256, sha256_hex(b"mine"));
        assert!(
            partials_of(&path).is_empty(),
            "the loser removed its own partial"
        );
    }

    #[test]
    fn a_partial_names_the_package_it_was_for() {
        let p = partial_path_for(Path::new("/s/t/000-GetFile.zip"), "12-abcd");
        assert_eq!(p, Path::new("/s/t/000-GetFile.zip.12-abcd.partial"));
        assert_eq!(
            partial_target(&p).unwrap(),
            Path::new("/s/t/000-GetFile.zip")
        );
        assert_eq!(partial_target(Path::new("/s/x.zip")), None);
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

    #[test]
    fn a_partial_whose_writer_is_gone_is_known_by_its_tag() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let at = |tag: &str| partial_path_for(Path::new("/s/t/000-GetFile.zip"), tag);
        assert!(partial_writer_gone(&at(&format!("{dead}-0badcafe"))));
        assert!(!partial_writer_gone(&at(&format!(
            "{}-0badcafe",
            std::process::id()
        ))));
        assert!(!partial_writer_gone(&at("1-0badcafe")), "pid 1 is alive");
        assert!(!partial_writer_gone(Path::new(
            "/s/t/000-GetFile.zip.partial"
        )));
    }
}
