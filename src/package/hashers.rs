//! The package's digests, each computed on a thread of its own so that hashing keeps up with
//! the network on a small machine: the payload's SHA-256 always, its MD5 when the server sent
//! one to check, and the SHA-256 of the gunzipped stream when the payload is gzip
//! ([`PayloadHashers`]); and the SHA-256 and CRC-32 of the package file itself, taken from the
//! bytes as they go to the file ([`PackageHasher`]). The writer hands every payload worker the
//! same [`Batch`] (about a MiB of the download's own buffers, shared, never copied); each
//! worker's queue holds at most [`QUEUED_BATCHES`], so memory stays flat and a slow hash slows
//! the download instead of piling up bytes.

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;

use bytes::Bytes;
use flate2::write::MultiGzDecoder;
use md5::Md5;
use sha2::{Digest, Sha256};

use super::Sha256Counter;

/// A run of payload chunks in order, shared by every worker.
pub(crate) type Batch = Arc<[Bytes]>;
/// Batches queued per worker before the writer waits for it.
const QUEUED_BATCHES: usize = 4;

/// What the workers computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hashes {
    /// Lowercase hex.
    pub sha256: String,
    /// Only when asked for.
    pub md5: Option<[u8; 16]>,
    /// Size and SHA-256 (hex) of the gunzipped stream, when it decoded fully.
    pub original: Option<(u64, String)>,
}

/// One hashing thread fed through a bounded queue.
struct Worker<T> {
    tx: SyncSender<Batch>,
    handle: JoinHandle<T>,
}

impl<T: Send + 'static> Worker<T> {
    fn spawn<S: Send + 'static>(
        name: &str,
        mut state: S,
        feed: fn(&mut S, &[u8]),
        finish: fn(S) -> T,
    ) -> io::Result<Self> {
        let (tx, rx) = sync_channel::<Batch>(QUEUED_BATCHES);
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                for batch in rx {
                    for chunk in batch.iter() {
                        feed(&mut state, chunk);
                    }
                }
                finish(state)
            })?;
        Ok(Worker { tx, handle })
    }

    /// Queues a batch; waits while the worker is [`QUEUED_BATCHES`] behind.
    fn send(&self, batch: &Batch) {
        // A worker that is gone has panicked; `finish` reports it.
        let _ = self.tx.send(batch.clone());
    }

    /// Waits for the worker to hash what it was sent; `None` if it panicked.
    fn finish(self) -> Option<T> {
        drop(self.tx);
        self.handle.join().ok()
    }
}

/// The payload's hashing threads; see the module docs.
pub(crate) struct PayloadHashers {
    sha256: Worker<String>,
    md5: Option<Worker<[u8; 16]>>,
    gunzip: Option<Worker<Option<(u64, String)>>>,
}

impl PayloadHashers {
    /// Starts the SHA-256 worker, and the MD5 one with `md5`.
    pub fn start(md5: bool) -> io::Result<Self> {
        let sha256 = Worker::spawn(
            "lrvault-sha256",
            Sha256::new(),
            |h, b| h.update(b),
            |h| hex::encode(h.finalize()),
        )?;
        let md5 = match md5 {
            true => Some(Worker::spawn(
                "lrvault-md5",
                Md5::new(),
                |h, b| h.update(b),
                |h| h.finalize().into(),
            )?),
            false => None,
        };
        Ok(PayloadHashers {
            sha256,
            md5,
            gunzip: None,
        })
    }

    /// Also hashes the gunzipped stream from now on; call before the first batch.
    pub fn start_gunzip(&mut self) -> io::Result<()> {
        self.gunzip = Some(Worker::spawn(
            "lrvault-gunzip",
            Some(MultiGzDecoder::new(Sha256Counter::default())),
            |decoder, b| {
                // Corrupt gzip only costs original_*; the payload is archived as delivered.
                if let Some(d) = decoder
                    && d.write_all(b).is_err()
                {
                    *decoder = None;
                }
            },
            |decoder| {
                let mut d = decoder?;
                d.try_finish().ok()?;
                let counter = std::mem::take(d.get_mut());
                Some((counter.len, hex::encode(counter.hasher.finalize())))
            },
        )?);
        Ok(())
    }

    /// Hands the next batch to every worker.
    pub fn feed(&self, batch: &Batch) {
        self.sha256.send(batch);
        if let Some(w) = &self.md5 {
            w.send(batch);
        }
        if let Some(w) = &self.gunzip {
            w.send(batch);
        }
    }

    /// Waits for every worker; `None` if one of them panicked.
    pub fn finish(self) -> Option<Hashes> {
        let sha256 = self.sha256.finish()?;
        let md5 = match self.md5 {
            Some(w) => Some(w.finish()?),
            None => None,
        };
        let original = match self.gunzip {
            Some(w) => w.finish()?,
            None => None,
        };
        Some(Hashes {
            sha256,
            md5,
            original,
        })
    }
}

/// Size, SHA-256 (hex) and CRC-32 of the bytes written to a package file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Written {
    pub size: u64,
    pub sha256: String,
    pub crc32: u32,
}

/// Hashes the bytes written to the package file, in the order they are written, on a thread
/// of its own; they are copied into batches of [`PACKAGE_BATCH`] bytes on the way.
pub(crate) struct PackageHasher {
    staged: Vec<u8>,
    worker: Worker<Written>,
}

/// Bytes of the package file handed to its hasher at a time.
const PACKAGE_BATCH: usize = 1 << 20;

impl PackageHasher {
    pub fn start() -> io::Result<Self> {
        let worker = Worker::spawn(
            "lrvault-package",
            (Sha256::new(), crc32fast::Hasher::new(), 0u64),
            |(sha, crc, size), b| {
                sha.update(b);
                crc.update(b);
                *size += b.len() as u64;
            },
            |(sha, crc, size)| Written {
                size,
                sha256: hex::encode(sha.finalize()),
                crc32: crc.finalize(),
            },
        )?;
        Ok(PackageHasher {
            staged: Vec::with_capacity(PACKAGE_BATCH),
            worker,
        })
    }

    /// The next bytes written to the file.
    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let take = (PACKAGE_BATCH - self.staged.len()).min(bytes.len());
            self.staged.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.staged.len() == PACKAGE_BATCH {
                self.send();
            }
        }
    }

    fn send(&mut self) {
        let full = std::mem::replace(&mut self.staged, Vec::with_capacity(PACKAGE_BATCH));
        self.worker.send(&Arc::from(vec![Bytes::from(full)]));
    }

    /// Waits for the hash of everything written; `None` if the thread panicked.
    pub fn finish(mut self) -> Option<Written> {
        if !self.staged.is_empty() {
            self.send();
        }
        self.worker.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::sha256_hex;

    fn batches(bytes: &[u8], size: usize) -> Vec<Batch> {
        bytes
            .chunks(size)
            .map(|c| Arc::from(vec![Bytes::copy_from_slice(c)]))
            .collect()
    }

    #[test]
    fn every_worker_sees_every_byte_in_order() {
        let original = b"line of a log file\n".repeat(5000);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&original).unwrap();
        let payload = gz.finish().unwrap();
        let mut hashers = PayloadHashers::start(true).unwrap();
        hashers.start_gunzip().unwrap();
        for batch in batches(&payload, 97) {
            hashers.feed(&batch);
        }
        assert_eq!(
            hashers.finish().unwrap(),
            Hashes {
                sha256: sha256_hex(&payload),
                md5: Some(Md5::digest(&payload).into()),
                original: Some((original.len() as u64, sha256_hex(&original))),
            }
        );
    }

    #[test]
    fn corrupt_gzip_loses_only_the_original() {
        let payload = b"\x1f\x8b\x08\x00 not really gzip".to_vec();
        let mut hashers = PayloadHashers::start(false).unwrap();
        hashers.start_gunzip().unwrap();
        for batch in batches(&payload, 5) {
            hashers.feed(&batch);
        }
        assert_eq!(
            hashers.finish().unwrap(),
            Hashes {
                sha256: sha256_hex(&payload),
                md5: None,
                original: None,
            }
        );
    }

    #[test]
    fn the_package_hasher_sees_every_written_byte_in_order() {
        let bytes: Vec<u8> = (0..3 * PACKAGE_BATCH + 77)
            .map(|i| (i % 253) as u8)
            .collect();
        let mut hasher = PackageHasher::start().unwrap();
        for piece in bytes.chunks(300_001) {
            hasher.update(piece);
        }
        assert_eq!(
            hasher.finish().unwrap(),
            Written {
                size: bytes.len() as u64,
                sha256: sha256_hex(&bytes),
                crc32: crc32fast::hash(&bytes),
            }
        );
    }
}
