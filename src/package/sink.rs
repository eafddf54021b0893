//! The package writer fed through a bounded channel, so the task that receives the download
//! never waits on hashing, compression or the disk. The chunks are the HTTP client's own
//! buffers, passed on without a copy; an async task gathers them into batches of about a MiB,
//! waits (without a thread) until the package has a free slot in its window of batches in
//! flight, and hands each batch to the writer on a blocking thread under one of the process's
//! writer permits ([`PackageThreads::section`]); the writer's hashing runs in lanes on the
//! process's hashing threads. So no thread is held while a transfer waits on the network or on
//! its hashes, and memory stays flat: at most [`CHANNEL_CHUNKS`] chunks wait here, and
//! [`WINDOW_BATCHES`] batches in the package's lanes.
//!
//! Life of a sink: [`PackageSink::create`] → the download sends chunks to
//! [`PackageSink::sender`] → [`PackageSink::close`] hands back a [`StreamedPackage`] with the
//! digests → [`StreamedPackage::finish`] writes the tag files and moves the package into
//! place (or [`StreamedPackage::seal`], then [`SealedPackage::place`], with a step between).
//! Every other way out ([`PackageSink::abort`], [`StreamedPackage::abort`], an error, a drop)
//! removes the partial file.

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::writer::WINDOW_BATCHES;
use super::{
    PackageError, PackageInfo, PackageSpec, PackageThreads, PackageWriter, PayloadDigests,
};

/// Chunks buffered between the download and the writer.
const CHANNEL_CHUNKS: usize = 16;
/// Bytes handed to the writer at a time.
const SECTION_BYTES: usize = 1 << 20;
/// Transcripts larger than this are archived but not parsed.
const TRANSCRIPT_PARSE_LIMIT: usize = 4 << 20;

/// What the writer hands back when the body has ended.
struct Written {
    writer: PackageWriter,
    digests: PayloadDigests,
    head: Option<Vec<u8>>,
}

/// A package being written; see the module docs.
pub struct PackageSink {
    tx: mpsc::Sender<Bytes>,
    handle: JoinHandle<Result<Written, PackageError>>,
    threads: PackageThreads,
}

impl PackageSink {
    /// Opens the partial package and starts feeding its writer. With `capture_head`, the
    /// first bytes of a small payload (RunScript transcripts) are kept for best-effort parsing.
    pub async fn create(spec: PackageSpec, capture_head: bool) -> Result<Self, PackageError> {
        let threads = spec.threads.clone();
        let writer = threads
            .section(move || PackageWriter::create(spec))
            .await
            .map_err(task_error)??;
        let (tx, rx) = mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
        let handle = tokio::spawn(feed(writer, rx, capture_head, threads.clone()));
        Ok(PackageSink {
            tx,
            handle,
            threads,
        })
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
            threads: self.threads,
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
    threads: PackageThreads,
    pub digests: PayloadDigests,
    /// The first bytes of a small payload, when asked for.
    pub head: Option<Vec<u8>>,
}

impl StreamedPackage {
    /// Writes the tag files (with `retrieval_json`), re-checks the package and moves it into
    /// place without overwriting.
    pub async fn finish(self, retrieval_json: Vec<u8>) -> Result<PackageInfo, PackageError> {
        let writer = self.writer;
        self.threads
            .section(move || writer.finish(&retrieval_json))
            .await
            .map_err(task_error)?
    }

    /// Writes the tag files and re-checks the package, short of moving it into place: what
    /// is placed later is known (and can be recorded) first.
    pub async fn seal(self, retrieval_json: Vec<u8>) -> Result<SealedPackage, PackageError> {
        let mut writer = self.writer;
        let threads = self.threads.clone();
        self.threads
            .section(move || {
                let info = writer.seal(&retrieval_json)?;
                Ok(SealedPackage {
                    writer,
                    info,
                    threads,
                })
            })
            .await
            .map_err(task_error)?
    }

    /// Gives up on the package and removes the partial.
    pub async fn abort(self) {
        let writer = self.writer;
        let _ = self.threads.section(move || writer.abort()).await;
    }
}

/// A finished, checked, read-only package under its partial name; dropping it removes it.
pub struct SealedPackage {
    writer: PackageWriter,
    pub info: PackageInfo,
    threads: PackageThreads,
}

impl SealedPackage {
    /// Moves the package into place without overwriting.
    pub async fn place(self) -> Result<PackageInfo, PackageError> {
        let (writer, info) = (self.writer, self.info);
        self.threads
            .section(move || writer.place())
            .await
            .map_err(task_error)??;
        Ok(info)
    }
}

/// Hands the download's chunks to `writer` a section at a time (see the module docs), then
/// ends the payload. On an error the writer is dropped, which removes the partial, and the
/// channel closes, which stops the download.
async fn feed(
    mut writer: PackageWriter,
    mut rx: mpsc::Receiver<Bytes>,
    capture_head: bool,
    threads: PackageThreads,
) -> Result<Written, PackageError> {
    let mut head = capture_head.then(Vec::new);
    let window = writer.window();
    loop {
        let (mut chunks, mut len, mut ended) = (Vec::new(), 0, false);
        while len < SECTION_BYTES {
            let Some(chunk) = rx.recv().await else {
                ended = true;
                break;
            };
            if let Some(h) = head.as_mut() {
                if h.len() + chunk.len() <= TRANSCRIPT_PARSE_LIMIT {
                    h.extend_from_slice(&chunk);
                } else {
                    head = None;
                }
            }
            len += chunk.len();
            chunks.push(chunk);
        }
        // A section writes at most two batches, and ending the payload waits for them all:
        // wait here, holding no thread, rather than there, holding a permit.
        let in_flight = if ended { 0 } else { WINDOW_BATCHES - 2 };
        window.at_most(in_flight).await;
        let (back, digests) = threads
            .section(move || -> Result<_, PackageError> {
                for chunk in chunks {
                    writer.write(chunk)?;
                }
                let digests = ended.then(|| writer.end_payload()).transpose()?;
                Ok((writer, digests))
            })
            .await
            .map_err(task_error)??;
        writer = back;
        if let Some(digests) = digests {
            return Ok(Written {
                writer,
                digests,
                head,
            });
        }
    }
}

fn task_error(e: tokio::task::JoinError) -> PackageError {
    PackageError::Task(e.to_string())
}
