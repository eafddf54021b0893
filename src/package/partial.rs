//! The `<final>.partial` file under the zip writer: it discards writes once the package is
//! abandoned, gets a large package onto the disk while it is still streaming
//! ([`Writeback`]), so the final fsync has only the tail left, hands every byte written to the
//! package's hasher ([`super::hashers::PackageHasher`]) when the file is written front to back,
//! and tells the read-back thread ([`super::readback`]) how far the file is written.

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::hashers::PackageHasher;
use super::readback::Progress;

/// Bytes written between early syncs of a large package.
const WRITEBACK_EVERY: u64 = 64 << 20;

/// The partial file under the zip writer. Once the package is abandoned (or a write to it
/// failed, which dooms it) further writes are discarded: the zip crate finalises an archive
/// when its writer is dropped, and on a full disk that would fail again (and print to stderr)
/// for a file that is about to be removed anyway. The first error still reaches the caller.
pub(crate) struct PartialFile {
    file: File,
    abandoned: Arc<AtomicBool>,
    /// Started once the package grows past [`WRITEBACK_EVERY`].
    writeback: Option<Writeback>,
    unsynced: u64,
    writeback_every: u64,
    /// Where the next write goes (the zip writer seeks back once per entry to fill in its
    /// header).
    pos: u64,
    progress: Arc<Progress>,
    /// Hashes what is written, in order (only when nothing is ever written twice).
    hasher: Option<PackageHasher>,
    /// Tests: the byte at this offset is changed in the file once written, as a bad disk would.
    #[cfg(test)]
    pub(crate) flip_at: Option<u64>,
}

impl PartialFile {
    pub(crate) fn new(
        file: File,
        abandoned: Arc<AtomicBool>,
        progress: Arc<Progress>,
        hasher: Option<PackageHasher>,
    ) -> Self {
        PartialFile {
            file,
            abandoned,
            writeback: None,
            unsynced: 0,
            writeback_every: WRITEBACK_EVERY,
            pos: 0,
            progress,
            hasher,
            #[cfg(test)]
            flip_at: None,
        }
    }

    /// Where the next write goes.
    #[cfg(test)]
    fn position(&self) -> u64 {
        self.pos
    }

    /// Counts written bytes and nudges the early writeback every [`WRITEBACK_EVERY`].
    fn wrote(&mut self, n: usize) -> io::Result<()> {
        self.pos += n as u64;
        self.progress.written_to(self.pos);
        self.unsynced += n as u64;
        if self.unsynced < self.writeback_every {
            return Ok(());
        }
        self.unsynced = 0;
        let writeback = match &mut self.writeback {
            Some(w) => w,
            None => self.writeback.insert(Writeback::start(&self.file)?),
        };
        writeback.nudge();
        Ok(())
    }

    /// The file and its hasher, once every early sync has ended; fails if one of them failed.
    pub(crate) fn into_parts(self) -> io::Result<(File, Option<PackageHasher>)> {
        if let Some(writeback) = self.writeback {
            writeback.finish()?;
        }
        Ok((self.file, self.hasher))
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

impl Write for PartialFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.is_abandoned() {
            return Ok(buf.len());
        }
        let r = self.file.write(buf).and_then(|n| {
            if let Some(hasher) = self.hasher.as_mut() {
                hasher.update(&buf[..n]);
            }
            #[cfg(test)]
            self.flip(&buf[..n])?;
            self.wrote(n).map(|()| n)
        });
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
        if self.hasher.is_some() {
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

/// Gets a large package onto the disk while it is still streaming: every [`WRITEBACK_EVERY`]
/// bytes a helper thread runs `fdatasync`, so disk and network work at the same time and the
/// final fsync only has the tail left. The helper shares the file description, so an error it
/// sees would not reach the final fsync: it is kept and fails the package instead.
struct Writeback {
    nudge: SyncSender<()>,
    failed: Arc<Mutex<Option<io::Error>>>,
    handle: JoinHandle<()>,
}

impl Writeback {
    fn start(file: &File) -> io::Result<Writeback> {
        let file = file.try_clone()?;
        let failed = Arc::new(Mutex::new(None));
        let (nudge, nudged) = sync_channel::<()>(1);
        let slot = failed.clone();
        let handle = std::thread::Builder::new()
            .name("lrvault-writeback".into())
            .spawn(move || {
                for () in nudged {
                    if let Err(e) = file.sync_data() {
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        return;
                    }
                }
            })?;
        Ok(Writeback {
            nudge,
            failed,
            handle,
        })
    }

    /// Asks for a sync; one already asked for and not started yet covers this one too.
    fn nudge(&self) {
        let _ = self.nudge.try_send(());
    }

    fn finish(self) -> io::Result<()> {
        drop(self.nudge);
        self.handle
            .join()
            .map_err(|_| io::Error::other("the writeback thread failed"))?;
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner()).take();
        failed.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_syncs_run_and_the_file_comes_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.partial");
        let abandoned = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        let mut partial = PartialFile::new(
            File::create(&path).unwrap(),
            abandoned.clone(),
            progress.clone(),
            Some(PackageHasher::start().unwrap()),
        );
        partial.writeback_every = 4096;
        let chunk: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        for _ in 0..10 {
            partial.write_all(&chunk).unwrap();
        }
        assert!(partial.writeback.is_some(), "the helper started");
        assert_eq!(partial.position(), 30_000, "every byte written is counted");
        let (file, hasher) = partial.into_parts().unwrap();
        drop(file);
        assert_eq!(std::fs::read(&path).unwrap(), chunk.repeat(10));
        let written = hasher.unwrap().finish().unwrap();
        assert_eq!(
            written.sha256,
            crate::package::sha256_hex(&chunk.repeat(10))
        );

        // Once abandoned, writes go nowhere (and succeed).
        let mut partial = PartialFile::new(
            File::create(&path).unwrap(),
            abandoned.clone(),
            progress,
            None,
        );
        abandoned.store(true, Ordering::Relaxed);
        partial.write_all(b"ignored").unwrap();
        drop(partial);
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }
}
