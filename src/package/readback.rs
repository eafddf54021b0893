//! The writer's re-check of a deflated payload entry, done while the package is still being
//! written: a thread of its own reads the entry's compressed bytes back from the partial file
//! (the page cache is warm) right behind the zip writer, inflates them, and takes their CRC-32
//! and size. The package's final check then compares these with the CRC and size the zip
//! recorded ([`super::check::PayloadCheck::ReadBack`]) instead of inflating the payload again.
//!
//! Deflate keeps one core busy while the download streams; the inflate of the re-check runs on
//! the other core meanwhile, instead of after it. Stored payloads are not read back: their
//! re-check shares the one read of the package that its SHA-256 needs anyway.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use flate2::read::DeflateDecoder;

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

    /// Every byte of the entry is written (the deflate stream ends by itself; what follows
    /// it in the file is never read as payload).
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
                if self.pos < state.written {
                    break buf.len().min((state.written - self.pos) as usize);
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
    /// The payload's size and CRC-32, inflated.
    pub size: u64,
    pub crc32: u32,
}

/// The read-back thread of one payload entry.
pub(crate) struct Reader {
    handle: JoinHandle<io::Result<ReadBack>>,
}

impl Reader {
    /// Starts reading the deflated entry whose data starts at `data_start` of `partial`.
    pub(crate) fn start(
        partial: &Path,
        data_start: u64,
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
                let (size, crc32) = crc_of(DeflateDecoder::new(tail))?;
                Ok(ReadBack {
                    data_start,
                    size,
                    crc32,
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

/// Size and CRC-32 of everything `reader` yields.
fn crc_of(mut reader: impl Read) -> io::Result<(u64, u32)> {
    let mut buf = vec![0u8; READ_BUFFER];
    let mut crc = crc32fast::Hasher::new();
    let mut size = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        crc.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, crc.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn deflate(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn inflates_behind_the_writer_and_never_reads_past_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.partial");
        let text = b"a line of a log file\n".repeat(20_000);
        let deflated = deflate(&text);
        let mut file = File::create(&path).unwrap();
        let progress = Arc::new(Progress::default());
        file.write_all(b"HEADER").unwrap();
        progress.written_to(6);
        let reader = Reader::start(&path, 6, progress.clone()).unwrap();
        let mut at = 6u64;
        for chunk in deflated.chunks(501) {
            file.write_all(chunk).unwrap();
            at += chunk.len() as u64;
            progress.written_to(at);
        }
        // What follows the entry is never read as payload.
        file.write_all(b"NEXT ENTRY").unwrap();
        progress.written_to(at + 10);
        progress.close();
        assert_eq!(
            reader.finish().unwrap(),
            ReadBack {
                data_start: 6,
                size: text.len() as u64,
                crc32: crc32fast::hash(&text),
            }
        );
    }

    #[test]
    fn a_cut_stream_reads_back_short_and_a_writer_that_gives_up_stops_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.partial");
        let text = b"evidence ".repeat(50_000);
        let deflated = deflate(&text);
        std::fs::write(&path, &deflated[..deflated.len() / 2]).unwrap();
        let progress = Arc::new(Progress::default());
        let reader = Reader::start(&path, 0, progress.clone()).unwrap();
        progress.written_to((deflated.len() / 2) as u64);
        progress.close();
        // Whether the inflater calls it an error or an early end, what was read back is not
        // the payload, and the final check compares it with what the zip recorded.
        if let Ok(found) = reader.finish() {
            assert!(found.size < text.len() as u64, "{found:?}");
        }

        let progress = Arc::new(Progress::default());
        let reader = Reader::start(&path, 0, progress.clone()).unwrap();
        progress.abandon();
        assert!(reader.finish().is_err());
    }
}
