//! The writer's re-check of the payload entry, done while the package is still being written:
//! a thread of its own reads the entry's bytes back from the partial file (the page cache is
//! warm) right behind the zip writer, inflates them when they were deflated, and takes their
//! CRC-32 and size, and their MD5 when the server sent one to check against. The package's
//! final check then compares these with the CRC and size the zip recorded
//! ([`super::check::PayloadCheck::ReadBack`]) instead of reading the payload a second time.
//!
//! Reading back what is on disk, rather than hashing the buffers in memory, is what lets the
//! slowest hash (MD5) and the inflate of the re-check run on the second core while the
//! download streams, instead of after it.
//!
//! Once a stored payload's entry is closed, every byte up to its end is final (the zip writer
//! has filled in its header), so [`PrefixHash`] starts the package's SHA-256 there, beside the
//! read-back's last stretch, and the final check only hashes the tag files after it.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use flate2::read::DeflateDecoder;
use md5::{Digest, Md5};

use super::Sha256Counter;
use super::compression::EntryMethod;

const READ_BUFFER: usize = 1024 * 1024;

/// How far the partial file is written, shared by the writer (through
/// [`super::partial::PartialFile`]) and the read-back thread.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    state: Mutex<State>,
    moved: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Bytes `[0, written)` of the file are written (not in a buffer any more).
    written: u64,
    /// The read-back reads no further than this (a stored entry's end, set when known).
    limit: Option<u64>,
    /// Nothing more will be written that the read-back needs.
    closed: bool,
    /// The package is given up: the read-back stops.
    abandoned: bool,
}

impl Progress {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.moved.notify_all();
    }

    /// The file is written up to `end`.
    pub(crate) fn written_to(&self, end: u64) {
        self.update(|s| s.written = s.written.max(end));
    }

    /// The entry being read back ends at `end` (stored entries: their size is known then).
    pub(crate) fn limit(&self, end: u64) {
        self.update(|s| s.limit = Some(end));
    }

    /// Every byte of the entry is written.
    pub(crate) fn close(&self) {
        self.update(|s| s.closed = true);
    }

    pub(crate) fn abandon(&self) {
        self.update(|s| s.abandoned = true);
    }
}

/// Reads the partial file from `pos` on, waiting for the writer when it gets ahead of it.
struct TailReader {
    file: File,
    pos: u64,
    progress: Arc<Progress>,
}

impl Read for TailReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = {
            let mut state = self.progress.lock();
            loop {
                if state.abandoned {
                    return Err(io::Error::other("the package was given up"));
                }
                let end = state.written.min(state.limit.unwrap_or(u64::MAX));
                if self.pos < end {
                    break buf.len().min((end - self.pos) as usize);
                }
                if state.closed {
                    return Ok(0);
                }
                state = self
                    .progress
                    .moved
                    .wait(state)
                    .unwrap_or_else(|p| p.into_inner());
            }
        };
        let n = self.file.read_at(&mut buf[..n], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the partial file is shorter than what was written to it",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// What reading the payload entry back found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReadBack {
    /// Where the entry's data starts in the file.
    pub data_start: u64,
    /// The payload's size and CRC-32 (inflated, when it was deflated).
    pub size: u64,
    pub crc32: u32,
    pub md5: Option<[u8; 16]>,
}

/// The read-back thread of one payload entry.
pub(crate) struct Reader {
    handle: JoinHandle<io::Result<ReadBack>>,
}

impl Reader {
    /// Starts reading the entry whose data starts at `data_start` of `partial`.
    pub(crate) fn start(
        partial: &Path,
        data_start: u64,
        method: EntryMethod,
        md5: bool,
        progress: Arc<Progress>,
    ) -> io::Result<Reader> {
        let tail = TailReader {
            file: File::open(partial)?,
            pos: data_start,
            progress,
        };
        let handle = std::thread::Builder::new()
            .name("lrvault-readback".into())
            .spawn(move || {
                let (size, crc32, md5) = match method {
                    EntryMethod::Stored => digest(tail, md5)?,
                    EntryMethod::Deflated => digest(DeflateDecoder::new(tail), md5)?,
                };
                Ok(ReadBack {
                    data_start,
                    size,
                    crc32,
                    md5,
                })
            })?;
        Ok(Reader { handle })
    }

    /// Waits for the thread to read the whole entry (call after [`Progress::close`]).
    pub(crate) fn finish(self) -> io::Result<ReadBack> {
        self.handle
            .join()
            .map_err(|_| io::Error::other("the read-back thread failed"))?
    }
}

/// The SHA-256 of the first bytes of a file, taken on a thread of its own.
pub(crate) struct PrefixHash {
    handle: JoinHandle<io::Result<Sha256Counter>>,
}

impl PrefixHash {
    /// Starts hashing bytes `[0, end)` of `path` (they must not change any more).
    pub(crate) fn start(path: &Path, end: u64) -> io::Result<PrefixHash> {
        let mut reader = io::Read::take(File::open(path)?, end);
        let handle = std::thread::Builder::new()
            .name("lrvault-prefix".into())
            .spawn(move || {
                let mut counter = Sha256Counter::default();
                io::copy(&mut reader, &mut counter)?;
                if counter.len != end {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the file ends at {} bytes, before {end}", counter.len),
                    ));
                }
                Ok(counter)
            })?;
        Ok(PrefixHash { handle })
    }

    pub(crate) fn finish(self) -> io::Result<Sha256Counter> {
        self.handle
            .join()
            .map_err(|_| io::Error::other("the prefix hashing thread failed"))?
    }
}

/// Size, CRC-32 and (when `md5`) MD5 of everything `reader` yields.
fn digest(mut reader: impl Read, md5: bool) -> io::Result<(u64, u32, Option<[u8; 16]>)> {
    let mut buf = vec![0u8; READ_BUFFER];
    let mut crc = crc32fast::Hasher::new();
    let mut md5 = md5.then(Md5::new);
    let mut size = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        crc.update(&buf[..n]);
        if let Some(h) = md5.as_mut() {
            h.update(&buf[..n]);
        }
        size += n as u64;
    }
    Ok((size, crc.finalize(), md5.map(|h| h.finalize().into())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_behind_the_writer_and_stops_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.partial");
        let mut file = File::create(&path).unwrap();
        let progress = Arc::new(Progress::default());
        file.write_all(b"HEADER").unwrap();
        progress.written_to(6);
        let reader = Reader::start(&path, 6, EntryMethod::Stored, true, progress.clone()).unwrap();
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let mut at = 6u64;
        for chunk in payload.chunks(7_001) {
            file.write_all(chunk).unwrap();
            at += chunk.len() as u64;
            progress.written_to(at);
        }
        progress.limit(at);
        // What follows the entry is never read as payload.
        file.write_all(b"NEXT ENTRY").unwrap();
        progress.written_to(at + 10);
        progress.close();
        let found = reader.finish().unwrap();
        assert_eq!(
            found,
            ReadBack {
                data_start: 6,
                size: payload.len() as u64,
                crc32: crc32fast::hash(&payload),
                md5: Some(Md5::digest(&payload).into()),
            }
        );
    }

    #[test]
    fn the_prefix_hash_covers_exactly_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let counter = PrefixHash::start(&path, 2_000_001)
            .unwrap()
            .finish()
            .unwrap();
        assert_eq!(counter.len, 2_000_001);
        assert_eq!(
            hex::encode(sha2::Digest::finalize(counter.hasher)),
            crate::package::sha256_hex(&bytes[..2_000_001])
        );
        let short = PrefixHash::start(&path, 3_000_001).unwrap().finish();
        assert!(short.is_err(), "a file shorter than the prefix is an error");
    }

    #[test]
    fn inflates_a_deflated_entry_and_stops_when_given_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.partial");
        let text = b"a line of a log file\n".repeat(10_000);
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&text).unwrap();
        let mut deflated = enc.finish().unwrap();
        let end = deflated.len() as u64;
        deflated.extend_from_slice(b"trailing entries");
        std::fs::write(&path, &deflated).unwrap();
        let progress = Arc::new(Progress::default());
        let reader =
            Reader::start(&path, 0, EntryMethod::Deflated, false, progress.clone()).unwrap();
        progress.written_to(end);
        progress.close();
        let found = reader.finish().unwrap();
        assert_eq!(
            (found.size, found.crc32, found.md5),
            (text.len() as u64, crc32fast::hash(&text), None)
        );

        // A writer that gives up never leaves the thread waiting.
        let progress = Arc::new(Progress::default());
        let reader = Reader::start(&path, 0, EntryMethod::Stored, false, progress.clone()).unwrap();
        progress.abandon();
        assert!(reader.finish().is_err());
    }
}
