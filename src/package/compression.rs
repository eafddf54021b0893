//! How a payload is laid out inside its package (docs/evidence-format.md, `[store] compression`).
//! `auto` puts what is already compressed (recognised by its magic bytes) and what a fast
//! deflate of its first MiB cannot shrink by [`MIN_SAVING_PERCENT`] in stored blocks (deflate
//! level 0: the bytes unchanged), and deflates the rest at [`FAST_LEVEL`]; both are DEFLATED
//! entries followed by a data descriptor. `stored` keeps a plain STORED entry. The layout and
//! its reason go into `retrieval.json` (`entry`, `compression`).

use std::io::{self, Write};

use bytes::Bytes;
use flate2::write::DeflateEncoder;

use super::Compression;

/// Bytes of the payload held back to judge it (the only payload bytes ever buffered).
pub const SAMPLE_LEN: usize = 1 << 20;
/// Enough bytes to recognise every magic number in [`MAGICS`].
pub const MAGIC_LEN: usize = 8;
/// zlib level for payloads and tag files: fast, and within a few per cent of level 6 on text.
pub const FAST_LEVEL: u32 = 2;
/// A sample that deflate shrinks by less than this is stored.
pub const MIN_SAVING_PERCENT: u64 = 10;

/// Formats whose bytes deflate would only waste time on: (name, offset, magic).
const MAGICS: [(&str, usize, &[u8]); 16] = [
    ("gzip", 0, &[0x1f, 0x8b]),
    ("zip", 0, b"PK\x03\x04"),
    ("zip", 0, b"PK\x05\x06"),
    ("7z", 0, &[0x37, 0x7a, 0xbc, 0xaf, 0x27, 0x1c]),
    ("xz", 0, &[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]),
    ("zstd", 0, &[0x28, 0xb5, 0x2f, 0xfd]),
    ("bzip2", 0, b"BZh"),
    ("cab", 0, b"MSCF"),
    ("rar", 0, b"Rar!\x1a\x07"),
    ("lz4", 0, &[0x04, 0x22, 0x4d, 0x18]),
    ("lzip", 0, b"LZIP"),
    ("jpeg", 0, &[0xff, 0xd8, 0xff]),
    ("png", 0, &[0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a]),
    ("gif", 0, b"GIF8"),
    ("ogg", 0, b"OggS"),
    ("mp4", 4, b"ftyp"),
];

/// The zip compression method of the payload entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryMethod {
    Stored,
    Deflated,
}

/// How the payload entry is laid out; recorded in `retrieval.json` as `entry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryLayout {
    /// DEFLATED at [`FAST_LEVEL`], followed by a data descriptor.
    Deflated,
    /// DEFLATED in stored blocks (level 0: the bytes unchanged), followed by a data descriptor.
    StoredBlocks,
    /// STORED, its CRC-32 and sizes in its local header (filled in after the last byte).
    Stored,
}

impl EntryLayout {
    /// The zip method the entry records.
    pub fn method(self) -> EntryMethod {
        match self {
            EntryLayout::Stored => EntryMethod::Stored,
            EntryLayout::Deflated | EntryLayout::StoredBlocks => EntryMethod::Deflated,
        }
    }

    /// True when the entry is followed by a data descriptor, so the file is written front to
    /// back and its SHA-256 can be taken from the bytes as they are written.
    pub fn streams(self) -> bool {
        self != EntryLayout::Stored
    }
}

/// The payload's layout and why; recorded in `retrieval.json` as `compression` (the zip
/// `method` and the `reason`) and `entry`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CompressionChoice {
    pub method: EntryMethod,
    #[serde(skip)]
    pub entry: EntryLayout,
    pub reason: String,
}

impl CompressionChoice {
    fn new(entry: EntryLayout, reason: impl Into<String>) -> Self {
        CompressionChoice {
            method: entry.method(),
            entry,
            reason: reason.into(),
        }
    }
}

/// The format an already-compressed payload starts with, if any.
pub fn compressed_format(head: &[u8]) -> Option<&'static str> {
    MAGICS
        .iter()
        .find(|(_, at, magic)| head.get(*at..).is_some_and(|h| h.starts_with(magic)))
        .map(|(name, _, _)| *name)
}

/// The choice as far as the first [`MAGIC_LEN`] bytes (or the whole, shorter payload) tell:
/// `None` when `auto` still needs the sample.
pub fn choose_by_head(compression: Compression, head: &[u8]) -> Option<CompressionChoice> {
    match compression {
        Compression::Stored => Some(CompressionChoice::new(
            EntryLayout::Stored,
            "configured: stored",
        )),
        Compression::Deflate => Some(CompressionChoice::new(
            EntryLayout::Deflated,
            "configured: deflate",
        )),
        Compression::Auto => compressed_format(head).map(|format| {
            CompressionChoice::new(
                EntryLayout::StoredBlocks,
                format!("already compressed ({format})"),
            )
        }),
    }
}

/// `auto` on a sample (the first [`SAMPLE_LEN`] bytes, or the whole payload if shorter):
/// deflate it at [`FAST_LEVEL`]; stored blocks unless that saves at least [`MIN_SAVING_PERCENT`].
pub fn choose_by_sample(sample: &[Bytes]) -> CompressionChoice {
    let len: usize = sample.iter().map(Bytes::len).sum();
    if len == 0 {
        return CompressionChoice::new(EntryLayout::StoredBlocks, "empty payload");
    }
    let deflated = deflated_len(sample);
    // Per mille, so the reason can show one decimal.
    let saved = (len as i64 - deflated as i64) * 1000 / len as i64;
    let entry = if saved >= MIN_SAVING_PERCENT as i64 * 10 {
        EntryLayout::Deflated
    } else {
        EntryLayout::StoredBlocks
    };
    let sign = if saved < 0 { "-" } else { "" };
    let reason = format!(
        "deflate level {FAST_LEVEL} saved {sign}{}.{} % of the first {len} bytes (threshold {MIN_SAVING_PERCENT} %)",
        saved.abs() / 10,
        saved.abs() % 10,
    );
    CompressionChoice::new(entry, reason)
}

/// The first `n` bytes of a batch (fewer when it is shorter).
pub(crate) fn head_of(batch: &[Bytes], n: usize) -> Vec<u8> {
    let mut head = Vec::with_capacity(n);
    for chunk in batch {
        let take = (n - head.len()).min(chunk.len());
        head.extend_from_slice(&chunk[..take]);
        if head.len() == n {
            break;
        }
    }
    head
}

fn deflated_len(sample: &[Bytes]) -> u64 {
    let mut encoder = DeflateEncoder::new(ByteCount(0), flate2::Compression::new(FAST_LEVEL));
    for chunk in sample {
        // Writing into a counter cannot fail.
        let _ = encoder.write_all(chunk);
    }
    encoder.finish().map(|count| count.0).unwrap_or(u64::MAX)
}

/// A `Write` that only counts.
struct ByteCount(u64);

impl Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_numbers_name_their_format() {
        assert_eq!(compressed_format(&[0x1f, 0x8b, 8, 0]), Some("gzip"));
        assert_eq!(compressed_format(b"PK\x03\x04rest"), Some("zip"));
        assert_eq!(compressed_format(b"7z\xbc\xaf\x27\x1c\0\x04"), Some("7z"));
        assert_eq!(compressed_format(b"\0\0\0\x20ftypisom"), Some("mp4"));
        assert_eq!(compressed_format(b"\xff\xd8\xff\xe0"), Some("jpeg"));
        assert_eq!(compressed_format(b"plain text"), None);
        assert_eq!(compressed_format(b"\x1f"), None);
        assert_eq!(compressed_format(b""), None);
    }

    #[test]
    fn configured_choices_need_no_sample() {
        assert_eq!(
            choose_by_head(Compression::Deflate, b"\x1f\x8b\x08"),
            Some(CompressionChoice::new(
                EntryLayout::Deflated,
                "configured: deflate"
            ))
        );
        assert_eq!(
            choose_by_head(Compression::Stored, b"text"),
            Some(CompressionChoice::new(
                EntryLayout::Stored,
                "configured: stored"
            ))
        );
        assert_eq!(
            choose_by_head(Compression::Auto, b"BZh91AY&"),
            Some(CompressionChoice::new(
                EntryLayout::StoredBlocks,
                "already compressed (bzip2)"
            ))
        );
        assert_eq!(
            choose_by_head(Compression::Auto, b"MZ\x90\0\x03\0\0\0"),
            None
        );
    }

    #[test]
    fn the_sample_decides_the_rest() {
        let text = Bytes::from(b"2026-11-27 12:00:00 svchost.exe started\n".repeat(1000));
        let choice = choose_by_sample(&[text.slice(..20_000), text.slice(20_000..)]);
        assert_eq!(choice.entry, EntryLayout::Deflated);
        assert_eq!(choice.method, EntryMethod::Deflated);
        assert!(
            choice
                .reason
                .ends_with("% of the first 40000 bytes (threshold 10 %)"),
            "{}",
            choice.reason
        );
        let mut random = vec![0u8; 100_000];
        rand::Rng::fill(&mut rand::rng(), random.as_mut_slice());
        let choice = choose_by_sample(&[Bytes::from(random)]);
        assert_eq!(choice.entry, EntryLayout::StoredBlocks);
        assert_eq!(choice.method, EntryMethod::Deflated);
        assert!(
            choice.reason.starts_with("deflate level 2 saved ")
                && choice
                    .reason
                    .ends_with(" % of the first 100000 bytes (threshold 10 %)"),
            "{}",
            choice.reason
        );
        assert_eq!(
            choose_by_sample(&[]),
            CompressionChoice::new(EntryLayout::StoredBlocks, "empty payload")
        );
    }
}
