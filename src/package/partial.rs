//! The partial file (`<final>.<tag>.partial`, named in `place.rs`) under the zip writer: it
//! discards writes once the package is abandoned, starts the disk's writeback of a large package while it is still streaming
//! (`sync_file_range`, no thread), so the final fsync has only the tail left, hands every byte
//! written to the package's hasher ([`super::hashers::PackageHasher`]) when the file is
//! written front to back (with the [`Ticket`] of the batch being written), and tells the
//! read-back lane ([`super::readback::Follower`]) how far the file is written.

use std::fs::File;
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::hashers::PackageHasher;
use super::pool::Ticket;
use super::readback::Follower;

/// Bytes written between early writebacks of a large package.
const WRITEBACK_EVERY: u64 = 64 << 20;
/// Bytes written between two messages to the read-back lane.
const FOLLOW_EVERY: u64 = 1 << 20;

/// The partial file under the zip writer. Once the package is abandoned (or a write to it
/// failed, which dooms it) further writes are discarded: the zip writer's last writes would
/// fail again on a full disk, for a file that is about to be removed anyway. The first error
/// still reaches the caller.
pub(crate) struct PartialFile {
    file: File,
    abandoned: Arc<AtomicBool>,
    /// Where the written bytes since the last early writeback start.
    unsynced_from: u64,
    writeback_every: u64,
    /// Early writebacks started.
    writebacks: u32,
    /// Where the next write goes (the `stored` layout seeks back once to fill in its header).
    pos: u64,
    /// The file's length.
    len: u64,
    /// Hashes what is written, in order (only when nothing is ever written twice).
    hasher: Option<PackageHasher>,
    /// Reads the file back behind the writer, told every [`FOLLOW_EVERY`] bytes.
    follower: Option<Follower>,
    told: u64,
    /// The batch being written.
    ticket: Option<Ticket>,
    /// Tests: the byte at this offset is changed in the file once written, as a bad disk would.
    #[cfg(test)]
    pub(crate) flip_at: Option<u64>,
}

/// A partial file once its last byte is written.
pub(crate) struct Parts {
    pub file: File,
    pub len: u64,
    pub hasher: Option<PackageHasher>,
    /// Told the file's length.
    pub follower: Option<Follower>,
}

impl PartialFile {
    pub(crate) fn new(
        file: File,
        abandoned: Arc<AtomicBool>,
        hasher: Option<PackageHasher>,
    ) -> Self {
        PartialFile {
            file,
            abandoned,
            unsynced_from: 0,
            writeback_every: WRITEBACK_EVERY,
            writebacks: 0,
            pos: 0,
            len: 0,
            hasher,
            follower: None,
            told: 0,
            ticket: None,
            #[cfg(test)]
            flip_at: None,
        }
    }

    /// Reads the file back behind the writer from now on.
    pub(crate) fn follow(&mut self, follower: Follower) {
        self.follower = Some(follower);
    }

    /// The batch whose bytes are written next (`None`: bytes of no batch).
    pub(crate) fn writing(&mut self, ticket: Option<Ticket>) {
        self.ticket = ticket;
    }

    /// Hands what was just written on: to the hasher, (tests) to the bad disk, to the count.
    fn passed(&mut self, written: &[u8]) -> io::Result<()> {
        if let Some(hasher) = self.hasher.as_mut() {
            hasher.update(written, self.ticket.as_ref());
        }
        #[cfg(test)]
        self.flip(written)?;
        self.wrote(written.len());
        Ok(())
    }

    /// Counts written bytes, tells the read-back lane, and starts the early writeback every
    /// [`WRITEBACK_EVERY`].
    fn wrote(&mut self, n: usize) {
        self.pos += n as u64;
        self.len = self.len.max(self.pos);
        if let Some(follower) = &self.follower
            && self.len - self.told >= FOLLOW_EVERY
        {
            follower.written_to(self.len);
            self.told = self.len;
        }
        if self.len - self.unsynced_from >= self.writeback_every {
            start_writeback(&self.file, self.unsynced_from, self.len);
            self.writebacks += 1;
            self.unsynced_from = self.len;
        }
    }

    /// The file, its hasher and its read-back lane (told the file's length).
    pub(crate) fn into_parts(self) -> Parts {
        if let Some(follower) = &self.follower {
            follower.written_to(self.len);
        }
        Parts {
            file: self.file,
            len: self.len,
            hasher: self.hasher,
            follower: self.follower,
        }
    }

    #[cfg(test)]
    fn flip(&mut self, written: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let end = self.pos + written.len() as u64;
        if let Some(at) = self.flip_at.filter(|at| (self.pos..end).contains(at)) {
            let byte = written[(at - self.pos) as usize] ^ 0x20;
            self.file.write_all_at(&[byte], at)?;
        }
        Ok(())
    }

    fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Relaxed)
    }

    fn doom<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if r.is_err() {
            self.abandoned.store(true, Ordering::Relaxed);
        }
        r
    }
}

/// Asks the kernel to start writing `[from, to)` of `file` to the disk, without waiting: the
/// final fsync then has only the tail left, and reports any error of this writeback too.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, from: u64, to: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open descriptor; it reads and writes no memory of ours.
    let r = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            from as libc::off64_t,
            (to - from) as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if r != 0 {
        // Only an optimisation: the final fsync writes (and checks) everything.
        tracing::debug!(error = %io::Error::last_os_error(), "early writeback not started");
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _from: u64, _to: u64) {}

impl Write for PartialFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.is_abandoned() {
            return Ok(buf.len());
        }
        let r = self
            .file
            .write(buf)
            .and_then(|n| self.passed(&buf[..n]).map(|()| n));
        self.doom(r)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.is_abandoned() {
            return Ok(());
        }
        let r = self.file.flush();
        self.doom(r)
    }
}

impl io::Seek for PartialFile {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        if self.hasher.is_some() || self.follower.is_some() {
            return self.doom(Err(io::Error::other(
                "a package hashed as it is written cannot seek",
            )));
        }
        let r = self.file.seek(pos);
        if let Ok(at) = r {
            self.pos = at;
        }
        self.doom(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::pool::PackageThreads;
    use crate::package::readback::PayloadAt;

    #[test]
    fn early_writebacks_start_and_the_file_comes_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.partial");
        let abandoned = Arc::new(AtomicBool::new(false));
        let threads = PackageThreads::with_threads(2, 1);
        let mut partial = PartialFile::new(
            File::create(&path).unwrap(),
            abandoned.clone(),
            Some(PackageHasher::start(&threads)),
        );
        partial.writeback_every = 4096;
        let at = PayloadAt::Stored { from: 0, len: 0 };
        let follower = Follower::start(&threads, &path, at, false, abandoned.clone());
        partial.follow(follower.unwrap());
        let chunk: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        for _ in 0..10 {
            partial.write_all(&chunk).unwrap();
        }
        assert_eq!(
            partial.writebacks, 10,
            "one per 4096 bytes, at most one per write"
        );
        assert_eq!(partial.pos, 3_000_000, "every byte written is counted");
        let parts = partial.into_parts();
        assert_eq!(parts.len, 3_000_000);
        assert_eq!(std::fs::read(&path).unwrap(), chunk.repeat(10));
        let written = parts.hasher.unwrap().finish().unwrap();
        let whole = chunk.repeat(10);
        assert_eq!(written.sha256, crate::package::sha256_hex(&whole));
        let read = parts.follower.unwrap().finish().unwrap();
        assert_eq!(
            (read.file_size, read.file_crc32),
            (whole.len() as u64, crc32fast::hash(&whole))
        );

        // Once abandoned, writes go nowhere (and succeed).
        let mut partial = PartialFile::new(File::create(&path).unwrap(), abandoned.clone(), None);
        abandoned.store(true, Ordering::Relaxed);
        partial.write_all(b"ignored").unwrap();
        drop(partial);
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }
}
