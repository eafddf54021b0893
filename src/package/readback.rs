//! The writer's re-check, done by threads that read the partial file back (the page cache is
//! warm) while the package is still being written, instead of in one more pass after it.
//!
//! - [`Reader`] reads the payload entry back right behind the zip writer, from its first byte
//!   on: a deflated one is inflated. It takes the payload's size and CRC-32, and its MD5 when
//!   the server sent one to check. MD5 is the slowest hash and only checks the transfer, so it
//!   runs here, at its own pace, instead of holding back the download.
//! - [`Follower`] starts once the payload entry is complete (its header filled in): it hashes
//!   the file from the start while the payload's MD5 is finished, the custody row written and
//!   the tag files added, then reads what those added once the file is complete. That is the
//!   package SHA-256 the custody log records. On the way it takes a stored payload's CRC-32,
//!   unless a [`Reader`] read that payload already (for its MD5).
//!
//! The package's final check compares these with what the zip recorded
//! ([`super::check::PayloadCheck::ReadBack`]), so it reads no more than the zip's directory
//! and tag files.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use flate2::read::DeflateDecoder;
use md5::Md5;
use sha2::{Digest, Sha256};

use super::for_each_chunk;

/// How far the partial file is written, shared by the writer (through
/// [`super::partial::PartialFile`]) and the read-back threads.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    state: Mutex<State>,
    moved: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Bytes `[0, written)` of the file are written (not in a buffer any more).
    written: u64,
    /// The payload entry is complete: its read-back stops here (a deflate stream ends by
    /// itself before it).
    payload_end: Option<u64>,
    /// Every byte of the file is written.
    ended: bool,
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

    /// The payload entry is complete and ends at `end` of the file at the latest.
    pub(crate) fn payload_ends(&self, end: u64) {
        self.update(|s| s.payload_end = Some(end));
    }

    /// The whole file is written.
    pub(crate) fn end(&self) {
        self.update(|s| s.ended = true);
    }

    pub(crate) fn abandon(&self) {
        self.update(|s| s.abandoned = true);
    }
}

/// Reads the partial file from `pos` on, waiting for the writer when it gets ahead of it.
struct TailReader {
    file: File,
    pos: u64,
    /// Only the payload entry, up to its end.
    payload_only: bool,
    /// Bytes before this are final (the payload's end, once its header is filled in); later
    /// ones are read only once the whole file is written, as the zip writer goes back to fill
    /// in each tag file's header.
    settled: u64,
    progress: Arc<Progress>,
}

impl TailReader {
    /// How many bytes from `pos` may be read now; `None` at the end.
    fn readable(&self, state: &State) -> Option<u64> {
        let limit = if self.payload_only {
            state
                .payload_end
                .map_or(state.written, |end| end.min(state.written))
        } else if state.ended {
            state.written
        } else {
            self.settled.min(state.written)
        };
        let done = (state.ended && self.pos >= state.written)
            || (self.payload_only && state.payload_end.is_some_and(|end| self.pos >= end));
        (!done).then(|| limit.saturating_sub(self.pos))
    }
}

impl Read for TailReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = {
            let mut state = self.progress.lock();
            loop {
                if state.abandoned {
                    return Err(io::Error::other("the package was given up"));
                }
                match self.readable(&state) {
                    None => return Ok(0),
                    Some(0) => {}
                    Some(n) => break buf.len().min(n as usize),
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
    /// Where the entry's data ends in the file.
    pub data_end: u64,
    /// The payload's size and CRC-32 (inflated when it was deflated).
    pub size: u64,
    pub crc32: u32,
    /// Only when asked for.
    pub md5: Option<[u8; 16]>,
}

/// The read-back thread of one payload entry.
pub(crate) struct Reader {
    handle: JoinHandle<io::Result<ReadBack>>,
}

impl Reader {
    /// Starts reading the entry whose data starts at `data_start` of `partial`; `deflated`
    /// inflates it, `md5` also takes its MD5.
    pub(crate) fn start(
        partial: &Path,
        data_start: u64,
        deflated: bool,
        md5: bool,
        progress: Arc<Progress>,
    ) -> io::Result<Reader> {
        let tail = TailReader {
            file: File::open(partial)?,
            pos: data_start,
            payload_only: true,
            settled: 0,
            progress,
        };
        let handle = std::thread::Builder::new()
            .name("lrvault-readback".into())
            .spawn(move || {
                let mut found = if deflated {
                    let mut inflate = DeflateDecoder::new(tail);
                    let mut found = digest_of(&mut inflate, md5)?;
                    found.data_end = data_start + inflate.total_in();
                    found
                } else {
                    let mut found = digest_of(tail, md5)?;
                    found.data_end = data_start + found.size;
                    found
                };
                found.data_start = data_start;
                Ok(found)
            })?;
        Ok(Reader { handle })
    }

    /// Waits for the thread to read the whole entry (call after [`Progress::payload_ends`];
    /// a deflate stream ends by itself, what follows it is never read as payload).
    pub(crate) fn finish(self) -> io::Result<ReadBack> {
        self.handle
            .join()
            .map_err(|_| io::Error::other("the read-back thread failed"))?
    }
}

/// Size, CRC-32 and (with `md5`) MD5 of everything `reader` yields.
fn digest_of(reader: impl Read, md5: bool) -> io::Result<ReadBack> {
    let mut crc = crc32fast::Hasher::new();
    let mut md5 = md5.then(Md5::new);
    let size = for_each_chunk(reader, |bytes| {
        crc.update(bytes);
        if let Some(m) = md5.as_mut() {
            m.update(bytes);
        }
        Ok(())
    })?;
    Ok(ReadBack {
        data_start: 0,
        data_end: 0,
        size,
        crc32: crc.finalize(),
        md5: md5.map(|m| m.finalize().into()),
    })
}

/// What reading the whole file back found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Followed {
    pub package_size: u64,
    /// Lowercase hex.
    pub package_sha256: String,
    /// A stored payload's bytes `[data_start, payload end)`, read back.
    pub stored: Option<ReadBack>,
}

/// The thread that reads the whole partial file back; see the module docs.
pub(crate) struct Follower {
    handle: JoinHandle<io::Result<Followed>>,
}

impl Follower {
    /// Starts reading `partial` from its start. `payload_end` is where the complete payload
    /// entry's data ends (bytes before it are final); `stored_from` is where it starts when
    /// its CRC-32 is to be taken here.
    pub(crate) fn start(
        partial: &Path,
        payload_end: u64,
        stored_from: Option<u64>,
        progress: Arc<Progress>,
    ) -> io::Result<Follower> {
        let mut tail = TailReader {
            file: File::open(partial)?,
            pos: 0,
            payload_only: false,
            settled: payload_end,
            progress,
        };
        let stored = stored_from.map(|start| (start, payload_end));
        let handle = std::thread::Builder::new()
            .name("lrvault-follow".into())
            .spawn(move || follow(&mut tail, stored))?;
        Ok(Follower { handle })
    }

    /// Waits for the thread to read the whole file (call after [`Progress::end`]).
    pub(crate) fn finish(self) -> io::Result<Followed> {
        self.handle
            .join()
            .map_err(|_| io::Error::other("the read-back thread failed"))?
    }
}

/// Hashes everything `tail` yields, and CRCs the bytes of `stored` (start, end) on the way.
fn follow(tail: &mut TailReader, stored: Option<(u64, u64)>) -> io::Result<Followed> {
    let mut sha = Sha256::new();
    let mut crc = crc32fast::Hasher::new();
    let mut at = 0u64;
    for_each_chunk(tail, |bytes| {
        sha.update(bytes);
        let to = at + bytes.len() as u64;
        if let Some((start, end)) = stored {
            let (from, until) = (start.clamp(at, to), end.clamp(at, to));
            crc.update(&bytes[(from - at) as usize..(until - at) as usize]);
        }
        at = to;
        Ok(())
    })?;
    Ok(Followed {
        package_size: at,
        package_sha256: hex::encode(sha.finalize()),
        stored: stored.map(|(start, end)| ReadBack {
            data_start: start,
            data_end: end.min(at),
            size: end.min(at).saturating_sub(start),
            crc32: crc.finalize(),
            md5: None,
        }),
    })
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
        let reader = Reader::start(&path, 6, true, true, progress.clone()).unwrap();
        let mut at = 6u64;
        for chunk in deflated.chunks(501) {
            file.write_all(chunk).unwrap();
            at += chunk.len() as u64;
            progress.written_to(at);
        }
        // What follows the entry is never read as payload.
        file.write_all(b"NEXT ENTRY").unwrap();
        progress.written_to(at + 10);
        progress.payload_ends(at);
        assert_eq!(
            reader.finish().unwrap(),
            ReadBack {
                data_start: 6,
                data_end: at,
                size: text.len() as u64,
                crc32: crc32fast::hash(&text),
                md5: Some(Md5::digest(&text).into()),
            }
        );
    }

    #[test]
    fn a_cut_stream_reads_back_short_and_a_writer_that_gives_up_stops_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.partial");
        let text = b"evidence ".repeat(50_000);
        let deflated = deflate(&text);
        let half = (deflated.len() / 2) as u64;
        std::fs::write(&path, &deflated[..half as usize]).unwrap();
        let progress = Arc::new(Progress::default());
        let reader = Reader::start(&path, 0, true, false, progress.clone()).unwrap();
        progress.written_to(half);
        progress.payload_ends(half);
        // Whether the inflater calls it an error or an early end, what was read back is not
        // the payload, and the final check compares it with what the zip recorded.
        if let Ok(found) = reader.finish() {
            assert!(found.size < text.len() as u64, "{found:?}");
        }

        let progress = Arc::new(Progress::default());
        let reader = Reader::start(&path, 0, true, false, progress.clone()).unwrap();
        progress.abandon();
        assert!(reader.finish().is_err());
    }

    #[test]
    fn the_follower_hashes_the_whole_file_but_waits_for_the_end_past_the_payload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.partial");
        let payload = b"stored payload bytes".repeat(10_000);
        let mut file = File::create(&path).unwrap();
        let progress = Arc::new(Progress::default());
        file.write_all(b"HEAD").unwrap();
        file.write_all(&payload).unwrap();
        let payload_end = 4 + payload.len() as u64;
        // A tag file's header, not final yet: the zip writer will fill it in.
        file.write_all(b"TAG?").unwrap();
        progress.written_to(payload_end + 4);
        progress.payload_ends(payload_end);
        let follower = Follower::start(&path, payload_end, Some(4), progress.clone()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        file.write_all_at(b"TAG!", payload_end).unwrap();
        progress.end();
        let followed = follower.finish().unwrap();
        let whole = std::fs::read(&path).unwrap();
        assert!(whole.ends_with(b"TAG!"));
        assert_eq!(followed.package_size, whole.len() as u64);
        assert_eq!(followed.package_sha256, hex::encode(Sha256::digest(&whole)));
        assert_eq!(
            followed.stored,
            Some(ReadBack {
                data_start: 4,
                data_end: payload_end,
                size: payload.len() as u64,
                crc32: crc32fast::hash(&payload),
                md5: None,
            })
        );
    }
}
