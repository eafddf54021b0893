//! Streams one command result into a BagIt zip at `<final>.<tag>.partial`, hashing as the
//! bytes pass, then re-checks the partial and moves it into place without ever overwriting a
//! package (docs/evidence-format.md; `docs/evidence-format.md` §7).
//!
//! A writer goes through [`Phase`]s, each holding what it needs:
//! `Sniffing` (the first bytes are held until `auto` has judged them) → `Payload` (the payload
//! entry is open) → [`end_payload`](PackageWriter::end_payload) → `Ended` (digests known, tag
//! files may follow) → [`seal`](PackageWriter::seal) → `Sealed` (complete, checked, read-only
//! under its partial name) → [`place`](PackageWriter::place) → `Placed`. Every other way out
//! (an error, [`abort`](PackageWriter::abort), a drop) removes the partial file.
//!
//! Memory stays flat: the payload goes into the zip entry in batches of about a MiB, its hashes
//! run in lanes on the process's hashing threads over the same buffers ([`super::hashers`],
//! [`super::pool`]), the package file is hashed from the bytes as they are written (every
//! layout but `stored` is written front to back), and one lane reads the file back right
//! behind the writer ([`super::readback`]). At most [`WINDOW_BATCHES`] batches are in flight.

mod seal;
#[cfg(test)]
mod tests;

use std::fs;
use std::io::{self, BufWriter};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

use super::compression::{
    CompressionChoice, MAGIC_LEN, SAMPLE_LEN, choose_by_head, choose_by_sample, head_of,
};
use super::hashers::{Batch, PackageHasher, PayloadHashers};
use super::names::{MAX_NAME_BYTES, sanitize_with_limit};
use super::partial::PartialFile;
use super::place::{
    check_rel_path, create_partial, first_missing_ancestor, move_into_place, partial_path_for,
    writer_tag,
};
use super::pool::{PackageThreads, Window};
use super::readback::{Follower, PayloadAt};
use super::tagfiles::{BAGIT_TXT, TagFiles, bag_info_txt};
use super::zipout::{PayloadEntry, ZipOut, dos_time};
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
const PACKAGE_MODE: u32 = 0o440;
/// Batches of one package in flight between the writer and its lanes.
pub(crate) const WINDOW_BATCHES: usize = 4;

type Zip = ZipOut<BufWriter<PartialFile>>;

/// The zip being written and what goes with it until the payload has ended.
struct Open {
    zip: Zip,
    hashers: PayloadHashers,
    tags: TagFiles,
}

/// Where a writer is; each phase holds its own data (see the module docs).
enum Phase {
    Sniffing {
        open: Open,
        /// Payload bytes held back until `auto` has judged them (at most the first batch).
        held: Vec<Bytes>,
        /// Known from the first batch on.
        gzip: Option<bool>,
        choice: Option<CompressionChoice>,
    },
    Payload {
        open: Open,
        gzip: bool,
        choice: CompressionChoice,
    },
    Ended {
        zip: Zip,
        tags: TagFiles,
        digests: PayloadDigests,
        entry: PayloadEntry,
    },
    Sealed,
    /// In place: nothing is removed on drop.
    Placed,
    /// A step failed (or is under way): the partial is removed on drop.
    Broken,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Sniffing { .. } | Phase::Payload { .. } => "streaming",
            Phase::Ended { .. } => "payload ended",
            Phase::Sealed => "sealed",
            Phase::Placed => "placed",
            Phase::Broken => "failed",
        }
    }
}

/// Writes one evidence package; see the module docs.
pub struct PackageWriter {
    bag_name: String,
    payload_base_name: String,
    gz_suffix_if_gzip: bool,
    bag_info: BagInfo,
    compression: Compression,
    large_file: bool,
    compute_md5: bool,
    rel_path: PathBuf,
    /// Outermost directory `create` made; its ancestors up to it need an fsync in `place`.
    created_from: Option<PathBuf>,
    final_path: PathBuf,
    partial_path: PathBuf,
    /// Set before an abandoned zip writer is dropped, so its final writes go nowhere.
    abandoned: Arc<AtomicBool>,
    /// The process's hashing threads, and this package's batches in flight.
    threads: PackageThreads,
    window: Window,
    /// Payload chunks not handed on yet (fewer than `BATCH_LEN` bytes).
    batch: Vec<Bytes>,
    batch_len: usize,
    size: u64,
    phase: Phase,
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
        // Remember the first directory we create so place() can make its entry durable too.
        let created_from = first_missing_ancestor(&parent, &spec.store_root);
        // A name of its own: two writers of one result (another process took it over after
        // its lease expired) never share a partial file. Stale partials are swept by the
        // archive pass's recovery, never by a writer.
        let partial_path = partial_path_for(&final_path, &writer_tag());
        let file = create_partial(&parent, &final_path, &partial_path)?;
        let abandoned = Arc::new(AtomicBool::new(false));
        let threads = spec.threads;
        // Every layout but `stored` is written front to back: hash it as it is written.
        let hasher =
            (spec.compression != Compression::Stored).then(|| PackageHasher::start(&threads));
        let file = PartialFile::new(file, abandoned.clone(), hasher);
        let zip = ZipOut::new(
            BufWriter::with_capacity(WRITE_BUFFER, file),
            dos_time(chrono::Utc::now()),
        );
        let hashers = PayloadHashers::start(&threads, spec.compute_md5);
        let open = Open {
            zip,
            hashers,
            tags: TagFiles::default(),
        };
        let mut writer = PackageWriter {
            bag_name: spec.bag_name,
            payload_base_name: spec.payload_base_name,
            gz_suffix_if_gzip: spec.gz_suffix_if_gzip,
            bag_info: spec.bag_info,
            compression: spec.compression,
            large_file: spec.expected_size.is_none_or(|size| size >= ZIP64_FROM),
            compute_md5: spec.compute_md5,
            rel_path: spec.rel_path,
            created_from,
            final_path,
            partial_path,
            abandoned,
            window: threads.window(WINDOW_BATCHES),
            threads,
            batch: Vec::new(),
            batch_len: 0,
            size: 0,
            phase: Phase::Sniffing {
                open,
                held: Vec::new(),
                gzip: None,
                choice: None,
            },
        };
        // Tag files known up front go first, so bagit.txt leads the archive.
        let Phase::Sniffing { open, .. } = &mut writer.phase else {
            unreachable!("a new writer is sniffing");
        };
        let to = (&mut open.zip, &mut open.tags);
        let at = (writer.bag_name.as_str(), writer.partial_path.as_path());
        add_tag_file(to, at, "bagit.txt", BAGIT_TXT)?;
        let to = (&mut open.zip, &mut open.tags);
        add_tag_file(to, at, "machine-action.json", &spec.machine_action_json)?;
        Ok(writer)
    }

    /// Appends payload bytes as delivered; chunks may be any size, even one byte. The buffer
    /// is shared with the hashing threads, never copied.
    pub fn write(&mut self, chunk: Bytes) -> Result<(), PackageError> {
        if !matches!(self.phase, Phase::Sniffing { .. } | Phase::Payload { .. }) {
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

    /// Ends the payload after its last [`write`](Self::write): closes its entry, waits for its
    /// hashes and adds `bag-info.txt`. Returns the payload's digests; later writes fail.
    /// Calling it again returns the same digests.
    pub fn end_payload(&mut self) -> Result<PayloadDigests, PackageError> {
        if let Phase::Ended { digests, .. } = &self.phase {
            return Ok(digests.clone());
        }
        self.flush_batch()?;
        if let Phase::Sniffing { held, .. } = &self.phase {
            let choice = choose_by_sample(held);
            self.start_payload_entry(choice)?;
        }
        let Phase::Payload {
            mut open,
            gzip,
            choice,
        } = std::mem::replace(&mut self.phase, Phase::Broken)
        else {
            return Err(self.out_of_order("end the payload"));
        };
        let entry = open
            .zip
            .end_payload()
            .map_err(self.io_err("ending payload entry in"))?;
        let hashes = open
            .hashers
            .finish()
            .ok_or_else(|| PackageError::Task("a hashing thread failed".to_string()))?;
        let (original_size, original_sha256) = hashes.original.unzip();
        let digests = PayloadDigests {
            payload_name: self.payload_name(gzip),
            size: self.size,
            sha256: hashes.sha256,
            md5: hashes.md5.filter(|_| self.compute_md5),
            encoding: if gzip {
                PayloadEncoding::Gzip
            } else {
                PayloadEncoding::None
            },
            original_size,
            original_sha256,
            compression: choice,
        };
        let bag_info = bag_info_txt(&self.bag_info, self.size);
        let at = (self.bag_name.as_str(), self.partial_path.as_path());
        add_tag_file(
            (&mut open.zip, &mut open.tags),
            at,
            "bag-info.txt",
            bag_info.as_bytes(),
        )?;
        self.phase = Phase::Ended {
            zip: open.zip,
            tags: open.tags,
            digests: digests.clone(),
            entry,
        };
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
        self.end_payload()?;
        let Phase::Ended {
            zip,
            tags,
            digests,
            entry,
        } = std::mem::replace(&mut self.phase, Phase::Broken)
        else {
            return Err(self.out_of_order("seal"));
        };
        let parts = self.close_zip(zip, tags, &digests, retrieval_json)?;
        let follower = match parts.follower {
            Some(follower) => follower,
            None => self.read_back_stored(&entry, parts.len)?,
        };
        // The fsync waits on the disk while the read-back lane reads the page cache.
        parts.file.sync_all().map_err(self.io_err("fsyncing"))?;
        drop(parts.file);
        let info = self.recheck(&digests, follower, parts.hasher)?;
        fs::set_permissions(&self.partial_path, fs::Permissions::from_mode(PACKAGE_MODE))
            .map_err(self.io_err("making read-only"))?;
        self.phase = Phase::Sealed;
        Ok(info)
    }

    /// Moves a [`seal`](Self::seal)ed package into place without overwriting.
    pub fn place(mut self) -> Result<(), PackageError> {
        if !matches!(self.phase, Phase::Sealed) {
            return Err(self.out_of_order("place"));
        }
        move_into_place(
            &self.partial_path,
            &self.final_path,
            self.created_from.as_deref(),
        )?;
        self.phase = Phase::Placed;
        Ok(())
    }

    /// This package's batches in flight: a caller that must not wait for the hashing (a
    /// writer permit held) waits for a free slot first.
    pub(crate) fn window(&self) -> Window {
        self.window.clone()
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
        if matches!(self.phase, Phase::Placed) {
            return;
        }
        // The zip's last writes are discarded (the file is doomed), the read-back lane reads no
        // further, and the fds are closed.
        self.abandoned.store(true, Ordering::Relaxed);
        self.phase = Phase::Placed;
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
        let ticket = self.window.take();
        let judged = match &mut self.phase {
            Phase::Payload { open, .. } => {
                open.hashers.feed(&batch, &ticket);
                // What the zip writer's buffer passes on later is bounded by the buffer.
                open.zip.inner_mut().get_mut().writing(Some(ticket));
                let written = write_payload(&mut open.zip, &self.partial_path, &batch);
                open.zip.inner_mut().get_mut().writing(None);
                return written;
            }
            Phase::Sniffing {
                open,
                held,
                gzip,
                choice,
            } => {
                if gzip.is_none() {
                    let head = head_of(&batch, MAGIC_LEN);
                    if head.starts_with(&GZIP_MAGIC) {
                        open.hashers.start_gunzip();
                    }
                    *gzip = Some(head.starts_with(&GZIP_MAGIC));
                    *choice = choose_by_head(self.compression, &head);
                }
                open.hashers.feed(&batch, &ticket);
                held.extend(batch.iter().cloned());
                if choice.is_none() && held.iter().map(Bytes::len).sum::<usize>() >= SAMPLE_LEN {
                    *choice = Some(choose_by_sample(held));
                }
                choice.take()
            }
            _ => {
                return Err(PackageError::AlreadyFinalized {
                    path: self.partial_path.clone(),
                });
            }
        };
        match judged {
            Some(choice) => self.start_payload_entry(choice),
            None => Ok(()),
        }
    }

    /// Opens the payload entry, starts reading the file back behind it (every layout but
    /// `stored`) and writes the held-back bytes into it.
    fn start_payload_entry(&mut self, choice: CompressionChoice) -> Result<(), PackageError> {
        let Phase::Sniffing {
            mut open,
            held,
            gzip,
            ..
        } = std::mem::replace(&mut self.phase, Phase::Broken)
        else {
            return Err(self.out_of_order("start the payload"));
        };
        let gzip = gzip.unwrap_or(false);
        // Only a configured `stored` gives the STORED layout; the package hasher exists iff not.
        let layout = choice.entry;
        let name = format!("{}/data/{}", self.bag_name, self.payload_name(gzip));
        let data_start = open
            .zip
            .start_payload(&name, layout, self.large_file)
            .map_err(self.io_err("starting payload entry in"))?;
        if layout.streams() {
            let at = PayloadAt::Inflate { from: data_start };
            let partial = &self.partial_path;
            let follower =
                Follower::start(&self.threads, partial, at, false, self.abandoned.clone())
                    .map_err(self.io_err("opening for the read-back"))?;
            open.zip.inner_mut().get_mut().follow(follower);
        }
        write_payload(&mut open.zip, &self.partial_path, &held)?;
        self.phase = Phase::Payload { open, gzip, choice };
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

    fn io_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> PackageError + use<> {
        let path = self.partial_path.clone();
        move |source| PackageError::Io { path, op, source }
    }

    fn verify_failed(&self, reason: String) -> PackageError {
        PackageError::Verify {
            path: self.final_path.clone(),
            reason,
        }
    }

    fn out_of_order(&self, what: &str) -> PackageError {
        PackageError::Io {
            path: self.partial_path.clone(),
            op: "writing to already closed",
            source: io::Error::other(format!(
                "cannot {what}: the package is {}",
                self.phase.name()
            )),
        }
    }
}

#[cfg(test)]
impl PackageWriter {
    /// Tests: the file's byte at `at` is changed on disk once written, as a bad disk would;
    /// call before the first write.
    pub(crate) fn change_on_disk_at(&mut self, at: u64) {
        if let Phase::Sniffing { open, .. } = &mut self.phase {
            open.zip.inner_mut().get_mut().flip_at = Some(at);
        }
    }
}

impl std::fmt::Debug for PackageWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackageWriter")
            .field("partial_path", &self.partial_path)
            .field("bytes_written", &self.size)
            .field("phase", &self.phase.name())
            .finish_non_exhaustive()
    }
}

impl Drop for PackageWriter {
    fn drop(&mut self) {
        self.discard();
    }
}

/// Tag files are always deflated (docs/evidence-format.md), and noted for the tag manifest.
pub(super) fn add_tag_file(
    (zip, tags): (&mut Zip, &mut TagFiles),
    (bag_name, partial): (&str, &Path),
    name: &str,
    bytes: &[u8],
) -> Result<(), PackageError> {
    zip.add_file(&format!("{bag_name}/{name}"), bytes)
        .map_err(|source| PackageError::Io {
            path: partial.to_path_buf(),
            op: "writing tag file to",
            source,
        })?;
    tags.record(name, bytes);
    Ok(())
}

fn write_payload(zip: &mut Zip, partial: &Path, chunks: &[Bytes]) -> Result<(), PackageError> {
    for chunk in chunks {
        zip.write_payload(chunk)
            .map_err(|source| PackageError::Io {
                path: partial.to_path_buf(),
                op: "writing payload to",
                source,
            })?;
    }
    Ok(())
}
