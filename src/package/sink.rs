//! The package writer on its own blocking thread, fed through a bounded channel, so the task
//! that receives the download never waits on hashing, compression or the disk. The chunks are
//! the HTTP client's own buffers, passed on without a copy; the writer gathers them into
//! batches of about a MiB that its hashing threads share. Memory stays flat: at most
//! [`CHANNEL_CHUNKS`] chunks wait here, and a few batches per hashing thread there.
//!
//! Life of a sink: [`PackageSink::create`] → the download sends chunks to
//! [`PackageSink::sender`] → [`PackageSink::close`] hands back a [`StreamedPackage`] with the
//! digests → [`StreamedPackage::finish`] writes the tag files and moves the package into
//! place (or [`StreamedPackage::seal`], then [`SealedPackage::place`], with a step between). Every other way out ([`PackageSink::abort`], [`StreamedPackage::abort`], an error,
//! a drop) removes the partial file.

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{PackageError, PackageInfo, PackageSpec, PackageWriter, PayloadDigests};

/// Chunks buffered between the download and the writer.
const CHANNEL_CHUNKS: usize = 16;
/// Transcripts larger than this are archived but not parsed.
const TRANSCRIPT_PARSE_LIMIT: usize = 4 << 20;

/// What the writer thread hands back when the body has ended.
struct Written {
    writer: PackageWriter,
    digests: PayloadDigests,
    head: Option<Vec<u8>>,
}

/// A package being written by a blocking thread; see the module docs.
pub struct PackageSink {
    tx: mpsc::Sender<Bytes>,
    handle: JoinHandle<Result<Written, PackageError>>,
}

impl PackageSink {
    /// Opens the partial package and starts its writer thread. With `capture_head`, the
    /// first bytes of a small payload (RunScript transcripts) are kept for best-effort parsing.
    pub async fn create(spec: PackageSpec, capture_head: bool) -> Result<Self, PackageError> {
        let writer = tokio::task::spawn_blocking(move || PackageWriter::create(spec))
            .await
            .map_err(task_error)??;
        let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
        let handle = tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            let mut head = capture_head.then(Vec::new);
            while let Some(chunk) = rx.blocking_recv() {
                if let Some(h) = head.as_mut() {
                    if h.len() + chunk.len() <= TRANSCRIPT_PARSE_LIMIT {
                        h.extend_from_slice(&chunk);
                    } else {
                        head = None;
                    }
                }
                writer.write(chunk)?;
            }
            // Waits for the hashing threads to catch up with the last byte.
            let digests = writer.end_payload()?;
            Ok(Written {
                writer,
                digests,
                head,
            })
        });
        Ok(PackageSink { tx, handle })
    }

    /// Where the download sends the payload's bytes, in order. A send fails only when the
    /// writer stopped; [`close`](Self::close) then returns its error.
    pub fn sender(&self) -> &mpsc::Sender<Bytes> {
        &self.tx
    }

    /// Ends the payload and waits for the writer. On error the partial is already removed.
    pub async fn close(self) -> Result<StreamedPackage, PackageError> {
        drop(self.tx);
        let Written {
            writer,
            digests,
            head,
        } = self.handle.await.map_err(task_error)??;
        Ok(StreamedPackage {
            writer,
            digests,
            head,
        })
    }

    /// Gives up on the package: the writer stops and the partial is removed.
    pub async fn abort(self) {
        if let Ok(streamed) = self.close().await {
            streamed.abort().await;
        }
    }
}

/// A package whose payload is complete and hashed, not yet finished or in place.
pub struct StreamedPackage {
    writer: PackageWriter,
    pub digests: PayloadDigests,
    /// The first bytes of a small payload, when asked for.
    pub head: Option<Vec<u8>>,
}

impl StreamedPackage {
    /// Writes the tag files (with `retrieval_json`), re-checks the package and moves it into
    /// place without overwriting.
    pub async fn finish(self, retrieval_json: Vec<u8>) -> Result<PackageInfo, PackageError> {
        let writer = self.writer;
        tokio::task::spawn_blocking(move || writer.finish(&retrieval_json))
            .await
            .map_err(task_error)?
    }

    /// Writes the tag files and re-checks the package, short of moving it into place: what
    /// is placed later is known (and can be recorded) first.
    pub async fn seal(self, retrieval_json: Vec<u8>) -> Result<SealedPackage, PackageError> {
        let mut writer = self.writer;
        tokio::task::spawn_blocking(move || {
            let info = writer.seal(&retrieval_json)?;
            Ok(SealedPackage { writer, info })
        })
        .await
        .map_err(task_error)?
    }

    /// Gives up on the package and removes the partial.
    pub async fn abort(self) {
        let writer = self.writer;
        let _ = tokio::task::spawn_blocking(move || writer.abort()).await;
    }
}

/// A finished, checked, read-only package under its partial name; dropping it removes it.
pub struct SealedPackage {
    writer: PackageWriter,
    pub info: PackageInfo,
}

impl SealedPackage {
    /// Moves the package into place without overwriting.
    pub async fn place(self) -> Result<PackageInfo, PackageError> {
        let (writer, info) = (self.writer, self.info);
        tokio::task::spawn_blocking(move || writer.place())
            .await
            .map_err(task_error)??;
        Ok(info)
    }
}

fn task_error(e: tokio::task::JoinError) -> PackageError {
    PackageError::Task(e.to_string())
}
