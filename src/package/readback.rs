//! The writer's re-check reads the partial file back: one thread ([`Follower`]) reads it front
//! to back, right behind the writer (the page cache is warm), and
//!
//! - takes the CRC-32 of every byte, which the writer compares with the CRC-32 of the bytes it
//!   wrote (and hashed for the package SHA-256): the file holds exactly what was hashed;
//! - decodes the payload entry: a DEFLATED one (deflated or stored blocks) is inflated, its
//!   end found from the deflate stream itself; a STORED one is read for its recorded length.
//!   The size and CRC-32 of what comes out are compared with what the zip records for the
//!   entry, which the zip writer took from the bytes received;
//! - for the STORED layout only (its local header is filled in after the payload, so the file
//!   is not written front to back), takes the package SHA-256 itself, after the file is
//!   complete: the second pass that layout costs.
//!
//! CRC-32 is enough to prove the disk gave back what was written (it catches every burst of
//! up to 32 changed bits and any random change with odds of 1 in 2^32); `lrvault verify`
//! re-hashes every byte with SHA-256.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use flate2::{Decompress, FlushDecompress, Status};
use sha2::{Digest, Sha256};

use super::for_each_chunk;

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

    /// The whole file is written.
    pub(crate) fn end(&self) {
        self.update(|s| s.ended = true);
    }

    pub(crate) fn abandon(&self) {
        self.update(|s| s.abandoned = true);
    }
}

/// Reads the partial file from its start, waiting for the writer when it gets ahead of it.
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
                if state.written > self.pos {
                    break buf.len().min((state.written - self.pos) as usize);
                }
                if state.ended {
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

/// Where the payload entry's data is, and how to decode it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PayloadAt {
    /// A deflate stream (deflated or stored blocks) starting here; it ends by itself.
    Inflate { from: u64 },
    /// Stored bytes `[from, from + len)`.
    Stored { from: u64, len: u64 },
}

/// What reading the payload entry back found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PayloadRead {
    /// Where the entry's data starts and ends in the file.
    pub data_start: u64,
    pub data_end: u64,
    /// Size and CRC-32 of the payload (inflated when it was deflated).
    pub size: u64,
    pub crc32: u32,
}

/// What reading the whole file back found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReadBack {
    pub file_size: u64,
    pub file_crc32: u32,
    /// Lowercase hex, when asked for.
    pub sha256: Option<String>,
    pub payload: PayloadRead,
}

/// The read-back thread; see the module docs.
pub(crate) struct Follower {
    handle: JoinHandle<io::Result<ReadBack>>,
}

impl Follower {
    /// Starts reading `partial` from its start; `sha256` also hashes it.
    pub(crate) fn start(
        partial: &Path,
        payload: PayloadAt,
        sha256: bool,
        progress: Arc<Progress>,
    ) -> io::Result<Follower> {
        let tail = TailReader {
            file: File::open(partial)?,
            pos: 0,
            progress,
        };
        let handle = std::thread::Builder::new()
            .name("lrvault-readback".into())
            .spawn(move || follow(tail, payload, sha256))?;
        Ok(Follower { handle })
    }

    /// Waits for the thread to read the whole file (call after [`Progress::end`]).
    pub(crate) fn finish(self) -> io::Result<ReadBack> {
        self.handle
            .join()
            .map_err(|_| io::Error::other("the read-back thread failed"))?
    }
}

/// Decodes the payload entry from the file's bytes as they pass.
struct PayloadDecoder {
    at: PayloadAt,
    inflate: Decompress,
    out: Vec<u8>,
    crc: crc32fast::Hasher,
    size: u64,
    /// Where the entry's data ended, once it has.
    end: Option<u64>,
}

impl PayloadDecoder {
    /// Takes the file's `bytes` read at offset `at`.
    fn feed(&mut self, at: u64, bytes: &[u8]) -> io::Result<()> {
        if self.end.is_some() {
            return Ok(());
        }
        let to = at + bytes.len() as u64;
        match self.at {
            PayloadAt::Stored { from, len } => {
                let (lo, hi) = (from.clamp(at, to), (from + len).clamp(at, to));
                self.crc
                    .update(&bytes[(lo - at) as usize..(hi - at) as usize]);
                self.size += hi - lo;
                if to >= from + len {
                    self.end = Some(from + len);
                }
            }
            PayloadAt::Inflate { from } if to > from => {
                let mut input = &bytes[(from.max(at) - at) as usize..];
                loop {
                    let before = self.inflate.total_in();
                    self.out.clear();
                    let status = self
                        .inflate
                        .decompress_vec(input, &mut self.out, FlushDecompress::None)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    input = &input[(self.inflate.total_in() - before) as usize..];
                    self.crc.update(&self.out);
                    self.size += self.out.len() as u64;
                    if status == Status::StreamEnd {
                        self.end = Some(from + self.inflate.total_in());
                        return Ok(());
                    }
                    if input.is_empty() && self.out.len() < self.out.capacity() {
                        return Ok(());
                    }
                }
            }
            PayloadAt::Inflate { .. } => {}
        }
        Ok(())
    }

    fn finish(self) -> io::Result<PayloadRead> {
        let (data_start, kind) = match self.at {
            PayloadAt::Stored { from, .. } => (from, "stored"),
            PayloadAt::Inflate { from } => (from, "deflate"),
        };
        let data_end = self.end.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the payload's {kind} data ends past the end of the file"),
            )
        })?;
        Ok(PayloadRead {
            data_start,
            data_end,
            size: self.size,
            crc32: self.crc.finalize(),
        })
    }
}

fn follow(tail: TailReader, at: PayloadAt, sha256: bool) -> io::Result<ReadBack> {
    let mut crc = crc32fast::Hasher::new();
    let mut sha = sha256.then(Sha256::new);
    let mut payload = PayloadDecoder {
        at,
        inflate: Decompress::new(false),
        out: Vec::with_capacity(super::READ_BUFFER),
        crc: crc32fast::Hasher::new(),
        size: 0,
        end: None,
    };
    let mut pos = 0u64;
    let file_size = for_each_chunk(tail, |bytes| {
        crc.update(bytes);
        if let Some(sha) = sha.as_mut() {
            sha.update(bytes);
        }
        payload.feed(pos, bytes)?;
        pos += bytes.len() as u64;
        Ok(())
    })?;
    Ok(ReadBack {
        file_size,
        file_crc32: crc.finalize(),
        sha256: sha.map(|s| hex::encode(s.finalize())),
        payload: payload.finish()?,
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
    fn inflates_behind_the_writer_and_stops_at_the_stream_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.partial");
        let text = b"a line of a log file\n".repeat(20_000);
        let deflated = deflate(&text);
        let mut file = File::create(&path).unwrap();
        let progress = Arc::new(Progress::default());
        file.write_all(b"HEADER").unwrap();
        progress.written_to(6);
        let follower = Follower::start(
            &path,
            PayloadAt::Inflate { from: 6 },
            false,
            progress.clone(),
        )
        .unwrap();
        let mut at = 6u64;
        for chunk in deflated.chunks(501) {
            file.write_all(chunk).unwrap();
            at += chunk.len() as u64;
            progress.written_to(at);
        }
        // What follows the entry is never read as payload.
        file.write_all(b"PK\x07\x08NEXT ENTRY").unwrap();
        progress.written_to(at + 14);
        progress.end();
        let whole = std::fs::read(&path).unwrap();
        assert_eq!(
            follower.finish().unwrap(),
            ReadBack {
                file_size: whole.len() as u64,
                file_crc32: crc32fast::hash(&whole),
                sha256: None,
                payload: PayloadRead {
                    data_start: 6,
                    data_end: at,
                    size: text.len() as u64,
                    crc32: crc32fast::hash(&text),
                },
            }
        );
    }

    #[test]
    fn a_cut_stream_is_an_error_and_a_writer_that_gives_up_stops_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.partial");
        let deflated = deflate(&b"evidence ".repeat(50_000));
        let half = deflated.len() / 2;
        std::fs::write(&path, &deflated[..half]).unwrap();
        let progress = Arc::new(Progress::default());
        let follower = Follower::start(
            &path,
            PayloadAt::Inflate { from: 0 },
            false,
            progress.clone(),
        )
        .unwrap();
        progress.written_to(half as u64);
        progress.end();
        let err = follower.finish().unwrap_err();
        assert_eq!(
            err.to_string(),
            "the payload's deflate data ends past the end of the file"
        );

        let progress = Arc::new(Progress::default());
        let follower = Follower::start(
            &path,
            PayloadAt::Inflate { from: 0 },
            false,
            progress.clone(),
        )
        .unwrap();
        progress.abandon();
        assert!(follower.finish().is_err());
    }

    #[test]
    fn a_stored_payload_and_the_whole_file_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.partial");
        let payload = b"stored payload bytes".repeat(10_000);
        let mut whole = b"HEAD".to_vec();
        whole.extend_from_slice(&payload);
        whole.extend_from_slice(b"TAIL");
        std::fs::write(&path, &whole).unwrap();
        let progress = Arc::new(Progress::default());
        progress.written_to(whole.len() as u64);
        progress.end();
        let at = PayloadAt::Stored {
            from: 4,
            len: payload.len() as u64,
        };
        let found = Follower::start(&path, at, true, progress)
            .unwrap()
            .finish()
            .unwrap();
        assert_eq!(found.sha256, Some(hex::encode(Sha256::digest(&whole))));
        assert_eq!(
            found.payload,
            PayloadRead {
                data_start: 4,
                data_end: 4 + payload.len() as u64,
                size: payload.len() as u64,
                crc32: crc32fast::hash(&payload),
            }
        );
    }
}
