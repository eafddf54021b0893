//! The package's digests, each computed in a lane of its own on the process's hashing threads
//! ([`super::pool`]) so that hashing keeps up with the network on a small machine: the
//! payload's SHA-256 always, its MD5 when the server sent one to check, and the SHA-256 of the
//! gunzipped stream when the payload is gzip ([`PayloadHashers`]); and the SHA-256 and CRC-32
//! of the package file itself, taken from the bytes as they go to the file ([`PackageHasher`]).
//! The writer hands every payload lane the same [`Batch`] (about a MiB of the download's own
//! buffers, shared, never copied), with its batch's [`Ticket`], so memory stays flat and a slow
//! hash slows the download instead of piling up bytes.

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use flate2::write::MultiGzDecoder;
use md5::Md5;
use sha2::{Digest, Sha256};

use super::Sha256Counter;
use super::pool::{Lane, PackageThreads, Ticket};

/// A run of payload chunks in order, shared by every lane.
pub(crate) type Batch = Arc<[Bytes]>;

/// What the lanes computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hashes {
    /// Lowercase hex.
    pub sha256: String,
    /// Only when asked for.
    pub md5: Option<[u8; 16]>,
    /// Size and SHA-256 (hex) of the gunzipped stream, when it decoded fully.
    pub original: Option<(u64, String)>,
}

type Gunzip = Option<MultiGzDecoder<Sha256Counter>>;

/// The payload's hashing lanes; see the module docs.
pub(crate) struct PayloadHashers {
    threads: PackageThreads,
    sha256: Lane<Sha256, Batch>,
    md5: Option<Lane<Md5, Batch>>,
    gunzip: Option<Lane<Gunzip, Batch>>,
}

impl PayloadHashers {
    /// Opens the SHA-256 lane, and the MD5 one with `md5`.
    pub fn start(threads: &PackageThreads, md5: bool) -> Self {
        PayloadHashers {
            threads: threads.clone(),
            sha256: threads.lane(Sha256::new(), |h, b: Batch| {
                b.iter().for_each(|c| h.update(c))
            }),
            md5: md5.then(|| {
                threads.lane(Md5::new(), |h, b: Batch| b.iter().for_each(|c| h.update(c)))
            }),
            gunzip: None,
        }
    }

    /// Also hashes the gunzipped stream from now on; call before the first batch.
    pub fn start_gunzip(&mut self) {
        let decoder = Some(MultiGzDecoder::new(Sha256Counter::default()));
        self.gunzip = Some(
            self.threads
                .lane(decoder, |decoder: &mut Gunzip, batch: Batch| {
                    for chunk in batch.iter() {
                        // Corrupt gzip only costs original_*; the payload is archived as delivered.
                        if let Some(d) = decoder
                            && d.write_all(chunk).is_err()
                        {
                            *decoder = None;
                        }
                    }
                }),
        );
    }

    /// Hands the next batch to every lane; each holds `ticket` until it has hashed it.
    pub fn feed(&self, batch: &Batch, ticket: &Ticket) {
        self.sha256.push(batch.clone(), Some(ticket.clone()));
        if let Some(lane) = &self.md5 {
            lane.push(batch.clone(), Some(ticket.clone()));
        }
        if let Some(lane) = &self.gunzip {
            lane.push(batch.clone(), Some(ticket.clone()));
        }
    }

    /// Waits for every lane; `None` if one of them panicked.
    pub fn finish(self) -> Option<Hashes> {
        let sha256 = self.sha256.finish(|h| hex::encode(h.finalize()))?;
        let md5 = match self.md5 {
            Some(lane) => Some(lane.finish(|h| h.finalize().into())?),
            None => None,
        };
        let original = match self.gunzip {
            Some(lane) => lane.finish(|decoder| {
                let mut d = decoder?;
                d.try_finish().ok()?;
                let counter = std::mem::take(d.get_mut());
                Some((counter.len, hex::encode(counter.hasher.finalize())))
            })?,
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

type PackageState = (Sha256, crc32fast::Hasher, u64);

/// Hashes the bytes written to the package file, in the order they are written, in a lane of
/// its own; they are copied into batches of [`PACKAGE_BATCH`] bytes on the way.
pub(crate) struct PackageHasher {
    staged: Vec<u8>,
    lane: Lane<PackageState, Vec<u8>>,
}

/// Bytes of the package file handed to its hasher at a time.
const PACKAGE_BATCH: usize = 1 << 20;

impl PackageHasher {
    pub fn start(threads: &PackageThreads) -> Self {
        let lane = threads.lane(
            (Sha256::new(), crc32fast::Hasher::new(), 0u64),
            |(sha, crc, size): &mut PackageState, b: Vec<u8>| {
                sha.update(&b);
                crc.update(&b);
                *size += b.len() as u64;
            },
        );
        PackageHasher {
            staged: Vec::with_capacity(PACKAGE_BATCH),
            lane,
        }
    }

    /// The next bytes written to the file; the batches they fill hold `ticket`.
    pub fn update(&mut self, mut bytes: &[u8], ticket: Option<&Ticket>) {
        while !bytes.is_empty() {
            let take = (PACKAGE_BATCH - self.staged.len()).min(bytes.len());
            self.staged.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.staged.len() == PACKAGE_BATCH {
                self.send(ticket);
            }
        }
    }

    fn send(&mut self, ticket: Option<&Ticket>) {
        let full = std::mem::replace(&mut self.staged, Vec::with_capacity(PACKAGE_BATCH));
        self.lane.push(full, ticket.cloned());
    }

    /// Waits for the hash of everything written; `None` if the lane panicked.
    pub fn finish(mut self) -> Option<Written> {
        if !self.staged.is_empty() {
            self.send(None);
        }
        self.lane.finish(|(sha, crc, size)| Written {
            size,
            sha256: hex::encode(sha.finalize()),
            crc32: crc.finalize(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::pool::Window;
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
        let threads = PackageThreads::with_threads(2, 1);
        let window = Window::new(2);
        let mut hashers = PayloadHashers::start(&threads, true);
        hashers.start_gunzip();
        for batch in batches(&payload, 97) {
            hashers.feed(&batch, &window.take());
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
        let threads = PackageThreads::with_threads(2, 1);
        let window = Window::new(2);
        let mut hashers = PayloadHashers::start(&threads, false);
        hashers.start_gunzip();
        for batch in batches(&payload, 5) {
            hashers.feed(&batch, &window.take());
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
        let mut hasher = PackageHasher::start(&PackageThreads::with_threads(1, 1));
        for piece in bytes.chunks(300_001) {
            hasher.update(piece, None);
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
