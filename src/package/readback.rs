//! The writer's re-check reads the partial file back: one lane on the process's hashing
//! threads ([`Follower`], see [`super::pool`]) reads it front to back, right behind the writer
//! (the page cache is warm), about a MiB per message, and
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
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use flate2::{Decompress, FlushDecompress, Status};
use sha2::{Digest, Sha256};

use super::pool::{Lane, PackageThreads};

/// Bytes read (and inflated) at a time.
const READ_AT_ONCE: usize = 256 * 1024;

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

/// The read-back lane; see the module docs.
pub(crate) struct Follower {
    lane: Lane<Follow, u64>,
}

/// What the read-back lane works on.
struct Follow {
    file: File,
    /// Bytes `[0, pos)` are read back.
    pos: u64,
    crc: crc32fast::Hasher,
    sha: Option<Sha256>,
    payload: PayloadDecoder,
    buf: Vec<u8>,
    /// Set when the package is given up: the rest is not read.
    abandoned: Arc<AtomicBool>,
    failed: Option<io::Error>,
    /// Tests: told how far the file is read after each message.
    #[cfg(test)]
    caught_up: Option<std::sync::mpsc::Sender<u64>>,
}

impl Follower {
    /// Opens `partial` to read it from its start as [`written_to`](Self::written_to) says;
    /// `sha256` also hashes it.
    pub(crate) fn start(
        threads: &PackageThreads,
        partial: &Path,
        payload: PayloadAt,
        sha256: bool,
        abandoned: Arc<AtomicBool>,
    ) -> io::Result<Follower> {
        let follow = Follow::open(partial, payload, sha256, abandoned)?;
        Ok(Follower::on(threads, follow))
    }

    /// The lane that feeds `follow`.
    fn on(threads: &PackageThreads, follow: Follow) -> Follower {
        let lane = threads.lane(follow, |f: &mut Follow, end: u64| {
            if f.failed.is_none() && !f.abandoned.load(Ordering::Relaxed) {
                f.failed = f.read_to(end).err();
            }
            #[cfg(test)]
            if let Some(tx) = &f.caught_up {
                let _ = tx.send(f.pos);
            }
        });
        Follower { lane }
    }

    /// The file is written up to `end`: read it that far. The message holds no batch's slot:
    /// the bytes are in the page cache, not in our memory.
    pub(crate) fn written_to(&self, end: u64) {
        self.lane.push(end, None);
    }

    /// Waits for the lane to read what it was told is written: the whole file, once the last
    /// [`written_to`](Self::written_to) gave its size.
    pub(crate) fn finish(self) -> io::Result<ReadBack> {
        let follow = self
            .lane
            .finish(|f| f)
            .ok_or_else(|| io::Error::other("the read-back failed"))?;
        if let Some(e) = follow.failed {
            return Err(e);
        }
        if follow.abandoned.load(Ordering::Relaxed) {
            return Err(io::Error::other("the package was given up"));
        }
        Ok(ReadBack {
            file_size: follow.pos,
            file_crc32: follow.crc.finalize(),
            sha256: follow.sha.map(|s| hex::encode(s.finalize())),
            payload: follow.payload.finish()?,
        })
    }
}

impl Follow {
    fn open(
        partial: &Path,
        payload: PayloadAt,
        sha256: bool,
        abandoned: Arc<AtomicBool>,
    ) -> io::Result<Follow> {
        Ok(Follow {
            file: File::open(partial)?,
            pos: 0,
            crc: crc32fast::Hasher::new(),
            sha: sha256.then(Sha256::new),
            payload: PayloadDecoder {
                at: payload,
                inflate: Decompress::new(false),
                out: Vec::with_capacity(READ_AT_ONCE),
                crc: crc32fast::Hasher::new(),
                size: 0,
                end: None,
            },
            buf: vec![0u8; READ_AT_ONCE],
            abandoned,
            failed: None,
            #[cfg(test)]
            caught_up: None,
        })
    }

    fn read_to(&mut self, end: u64) -> io::Result<()> {
        while self.pos < end {
            let want = READ_AT_ONCE.min((end - self.pos) as usize);
            let n = match self.file.read_at(&mut self.buf[..want], self.pos) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the partial file is shorter than what was written to it",
                    ));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let bytes = &self.buf[..n];
            self.crc.update(bytes);
            if let Some(sha) = self.sha.as_mut() {
                sha.update(bytes);
            }
            self.payload.feed(self.pos, bytes)?;
            self.pos += n as u64;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn deflate(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn start(path: &Path, at: PayloadAt, sha256: bool) -> (Follower, Arc<AtomicBool>) {
        let threads = PackageThreads::with_threads(1, 1);
        let abandoned = Arc::new(AtomicBool::new(false));
        let follower = Follower::start(&threads, path, at, sha256, abandoned.clone()).unwrap();
        (follower, abandoned)
    }

    #[test]
    fn inflates_behind_the_writer_and_stops_at_the_stream_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.partial");
        let text = b"a line of a log file\n".repeat(20_000);
        let deflated = deflate(&text);
        let mut file = File::create(&path).unwrap();
        file.write_all(b"HEADER").unwrap();
        let threads = PackageThreads::with_threads(1, 1);
        let abandoned = Arc::new(AtomicBool::new(false));
        let mut follow =
            Follow::open(&path, PayloadAt::Inflate { from: 6 }, false, abandoned).unwrap();
        let (tx, read_to) = std::sync::mpsc::channel();
        follow.caught_up = Some(tx);
        let follower = Follower::on(&threads, follow);
        // After each write the lane catches up with the writer before the next bytes exist:
        // it reads behind the writer and waits for it, never past what is written.
        follower.written_to(6);
        assert_eq!(read_to.recv().unwrap(), 6);
        let mut at = 6u64;
        let mut messages = 1;
        for chunk in deflated.chunks(501) {
            file.write_all(chunk).unwrap();
            at += chunk.len() as u64;
            follower.written_to(at);
            assert_eq!(read_to.recv().unwrap(), at);
            messages += 1;
        }
        assert_eq!(
            messages,
            1 + deflated.len().div_ceil(501),
            "one catch-up per write"
        );
        // What follows the entry is never read as payload.
        file.write_all(b"PK\x07\x08NEXT ENTRY").unwrap();
        follower.written_to(at + 14);
        assert_eq!(read_to.recv().unwrap(), at + 14);
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
        let (follower, _) = start(&path, PayloadAt::Inflate { from: 0 }, false);
        follower.written_to(half as u64);
        let err = follower.finish().unwrap_err();
        assert_eq!(
            err.to_string(),
            "the payload's deflate data ends past the end of the file"
        );

        // Told of more bytes than the file holds.
        let (follower, _) = start(&path, PayloadAt::Inflate { from: 0 }, false);
        follower.written_to(half as u64 + 1);
        let err = follower.finish().unwrap_err();
        assert_eq!(
            err.to_string(),
            "the partial file is shorter than what was written to it"
        );

        let (follower, abandoned) = start(&path, PayloadAt::Inflate { from: 0 }, false);
        abandoned.store(true, Ordering::Relaxed);
        follower.written_to(half as u64);
        let err = follower.finish().unwrap_err();
        assert_eq!(err.to_string(), "the package was given up");
    }

    #[test]
    fn a_stored_payload_and_the_whole_file_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.partial");
        let payload = b"stored payload bytes".repeat(100_000);
        let mut whole = b"HEAD".to_vec();
        whole.extend_from_slice(&payload);
        whole.extend_from_slice(b"TAIL");
        std::fs::write(&path, &whole).unwrap();
        let at = PayloadAt::Stored {
            from: 4,
            len: payload.len() as u64,
        };
        let (follower, _) = start(&path, at, true);
        follower.written_to(whole.len() as u64);
        let found = follower.finish().unwrap();
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
