//! The package writer fed through a bounded channel, so the task that receives the download
//! never waits on hashing, compression or the disk. The chunks are the HTTP client's own
//! buffers, passed on without a copy. An async task waits (without a thread) for a chunk and
//! for a free slot in the package's window of batches in flight, then runs a *section* on a
//! blocking thread under one of the process's writer permits ([`PackageThreads::section`]):
//! the writer takes that chunk and whatever else the channel already holds, while the window
//! has room, up to [`SECTION_BYTES`]. The writer's hashing runs in lanes on the process's
//! hashing threads. So no thread is held while a transfer waits on the network or on its
//! hashes, and memory stays flat: at most [`CHANNEL_CHUNKS`] chunks wait here, and a few
//! batches in the package's lanes, within the process's budget (see [`super::pool`]).
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

use super::pool::Window;
use super::{
    PackageError, PackageInfo, PackageSpec, PackageThreads, PackageWriter, PayloadDigests,
};

/// Chunks buffered between the download and the writer. Few: a chunk may hold on to a much
/// larger buffer of the HTTP client, and a transfer waiting for a permit keeps them all.
const CHANNEL_CHUNKS: usize = 4;
/// Most bytes handed to the writer in one section (one permit held).
const SECTION_BYTES: usize = 8 << 20;
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

/// The writer's side of the channel, moved into each section and back.
struct Feeding {
    writer: PackageWriter,
    rx: mpsc::Receiver<Bytes>,
    head: Option<Vec<u8>>,
    /// The download has ended (its sender is gone).
    ended: bool,
}

impl Feeding {
    fn write(&mut self, chunk: Bytes) -> Result<(), PackageError> {
        if let Some(h) = self.head.as_mut() {
            if h.len() + chunk.len() <= TRANSCRIPT_PARSE_LIMIT {
                h.extend_from_slice(&chunk);
            } else {
                self.head = None;
            }
        }
        self.writer.write(chunk)
    }

    /// A section: writes `first`, then whatever the channel already holds while the window
    /// has room for a batch, up to [`SECTION_BYTES`]; never waits for the network or the
    /// hashes (see the module docs).
    fn write_ready(mut self, first: Bytes, window: &Window) -> Result<Self, PackageError> {
        let mut written = first.len();
        self.write(first)?;
        while written < SECTION_BYTES && window.has_room() {
            match self.rx.try_recv() {
                Ok(chunk) => {
                    written += chunk.len();
                    self.write(chunk)?;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.ended = true;
                    break;
                }
            }
        }
        Ok(self)
    }
}

/// Hands the download's chunks to `writer` a section at a time (see the module docs), then
/// ends the payload. On an error the writer is dropped, which removes the partial, and the
/// channel closes, which stops the download.
async fn feed(
    writer: PackageWriter,
    rx: mpsc::Receiver<Bytes>,
    capture_head: bool,
    threads: PackageThreads,
) -> Result<Written, PackageError> {
    let window = writer.window();
    let mut f = Feeding {
        writer,
        rx,
        head: capture_head.then(Vec::new),
        ended: false,
    };
    while !f.ended {
        let Some(first) = f.rx.recv().await else {
            break;
        };
        // A chunk fills at most one batch: wait for room here, holding no thread.
        window.ready(false).await;
        let w = window.clone();
        f = threads
            .section(move || f.write_ready(first, &w))
            .await
            .map_err(task_error)??;
    }
    // Ending the payload waits for every batch: wait here, not holding a permit.
    window.ready(true).await;
    let Feeding {
        mut writer, head, ..
    } = f;
    let (writer, digests) = threads
        .section(move || writer.end_payload().map(|d| (writer, d)))
        .await
        .map_err(task_error)??;
    Ok(Written {
        writer,
        digests,
        head,
    })
}

fn task_error(e: tokio::task::JoinError) -> PackageError {
    PackageError::Task(e.to_string())
}
