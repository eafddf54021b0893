//! Result blobs as the simulated blob host serves them. RunScript transcripts are small and held
//! in memory; GetFile results are produced on demand by a seekable text generator wrapped in a
//! gzip stream of *stored* deflate blocks, so any byte of a GiB blob can be computed directly
//! and nothing is materialised. Benchmark payloads ([`Payload`]) are raw: incompressible
//! counter-based random bytes, or the same text unwrapped. Hashes need one sequential pass and
//! are cached.

use std::sync::{Arc, OnceLock};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use md5::{Digest, Md5};
use sha2::Sha256;

use super::data::mix;

/// Payload bytes of one stored deflate block (the format's maximum).
const BLOCK: u64 = 65_535;
/// Per-block header: BFINAL/BTYPE byte, LEN, NLEN.
const BLOCK_HEADER: u64 = 5;
/// gzip member header: magic, CM=deflate, no flags, mtime 0, no XFL, OS unknown.
const GZ_HEADER: [u8; 10] = [0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0x00, 0xff];
const GZ_TRAILER: u64 = 8;
/// The generated original file is made of fixed-width text lines, so it is seekable.
const LINE: u64 = 64;
const WORDS: [&str; 12] = [
    "svchost.exe",
    "lsass.exe",
    "explorer.exe",
    "powershell.exe",
    "rundll32.exe",
    "winlogon.exe",
    "services.exe",
    "msedge.exe",
    "OneDrive.exe",
    "taskhostw.exe",
    "conhost.exe",
    "cmd.exe",
];

/// What a blob holds.
#[derive(Debug)]
pub(crate) enum Content {
    /// A RunScript transcript, served as is.
    Transcript(Arc<[u8]>),
    /// A GetFile result: the generated original of `size` bytes, gzip-wrapped.
    GetFile { seed: u64, size: u64 },
    /// A benchmark payload, served as generated (no gzip wrapping).
    Raw { seed: u64, payload: Payload },
    /// An investigation package: a zip generated on the fly.
    Package(Box<super::package::Layout>),
}

/// What a benchmark payload is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// Incompressible random bytes, no MD5 header.
    Random,
    /// Incompressible random bytes, with Content-MD5 / x-ms-blob-content-md5 whatever the size.
    RandomMd5,
    /// Log-like text lines (deflate roughly halves them), no MD5 header.
    Text,
}

/// One extra GetFile result for benchmarks: `KIND:BYTES` on the command line, KIND one of
/// `random`, `random-md5`, `text`; BYTES a number with an optional K, M or G (binary) suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    pub kind: PayloadKind,
    pub size: u64,
}

impl std::str::FromStr for Payload {
    type Err = String;

    fn from_str(s: &str) -> Result<Payload, String> {
        let (kind, size) = s
            .split_once(':')
            .ok_or_else(|| format!("payload {s:?}: expected KIND:BYTES, e.g. random:2G"))?;
        let kind = match kind {
            "random" => PayloadKind::Random,
            "random-md5" => PayloadKind::RandomMd5,
            "text" => PayloadKind::Text,
            other => {
                return Err(format!(
                    "payload kind {other:?}: expected random, random-md5 or text"
                ));
            }
        };
        let (digits, shift) = match size.as_bytes().last() {
            Some(b'K' | b'k') => (&size[..size.len() - 1], 10),
            Some(b'M' | b'm') => (&size[..size.len() - 1], 20),
            Some(b'G' | b'g') => (&size[..size.len() - 1], 30),
            _ => (size, 0),
        };
        let size = digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(1 << shift))
            .ok_or_else(|| {
                format!("payload size {size:?}: expected bytes, e.g. 268435456 or 256M")
            })?;
        Ok(Payload { kind, size })
    }
}

impl Payload {
    /// The GetFile `Path` the action asks for.
    pub(crate) fn path(&self) -> String {
        let (stem, ext) = match self.kind {
            PayloadKind::Random => ("random", "bin"),
            PayloadKind::RandomMd5 => ("random-md5", "bin"),
            PayloadKind::Text => ("text", "log"),
        };
        format!(r"D:\Evidence\bench\{stem}-{}.{ext}", self.size)
    }
}

/// Hashes of a blob, computed in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Digests {
    pub sha256: String,
    pub md5: [u8; 16],
    pub original_size: Option<u64>,
    pub original_sha256: Option<String>,
}

impl Digests {
    pub fn md5_base64(&self) -> String {
        BASE64.encode(self.md5)
    }
}

/// One result blob.
#[derive(Debug)]
pub(crate) struct Blob {
    pub tenant_id: String,
    pub action_id: String,
    /// The 32-hex last path segment.
    pub name: String,
    pub content: Content,
    pub etag: String,
    pub last_modified: DateTime<Utc>,
    crc: OnceLock<u32>,
    /// An investigation package's entry CRCs (one pass, on first read).
    package_crcs: OnceLock<Vec<u32>>,
    digests: OnceLock<Digests>,
}

impl Blob {
    pub fn new(
        tenant_id: String,
        action_id: String,
        name: String,
        content: Content,
        last_modified: DateTime<Utc>,
    ) -> Blob {
        let etag = format!("\"0x8D{:013X}\"", mix(fold(&name)) >> 12);
        Blob {
            tenant_id,
            action_id,
            name,
            content,
            etag,
            last_modified,
            crc: OnceLock::new(),
            package_crcs: OnceLock::new(),
            digests: OnceLock::new(),
        }
    }

    /// Length of the served bytes.
    pub fn len(&self) -> u64 {
        match &self.content {
            Content::Transcript(bytes) => bytes.len() as u64,
            Content::GetFile { size, .. } => gz_len(*size),
            Content::Raw { payload, .. } => payload.size,
            Content::Package(layout) => layout.len(),
        }
    }

    pub fn content_type(&self) -> &'static str {
        match self.content {
            Content::Transcript(_) => "application/json",
            Content::GetFile { .. } | Content::Raw { .. } | Content::Package(_) => {
                "application/octet-stream"
            }
        }
    }

    /// Whether the responses carry the blob's MD5: benchmark payloads say so themselves,
    /// others up to `limit` bytes.
    pub fn sends_md5(&self, limit: u64) -> bool {
        match &self.content {
            Content::Raw { payload, .. } => payload.kind == PayloadKind::RandomMd5,
            // The safedownload host sends no MD5.
            Content::Package(_) => false,
            _ => self.len() <= limit,
        }
    }

    /// Whether reading `[start, end)` needs the gzip trailer's CRC, which costs a full pass.
    pub fn needs_crc(&self, end: u64) -> bool {
        if let Content::Package(_) = self.content {
            return self.package_crcs.get().is_none();
        }
        matches!(self.content, Content::GetFile { .. })
            && self.crc.get().is_none()
            && end > self.len() - GZ_TRAILER
    }

    /// CRC-32 of the original file (GetFile only; 0 for transcripts).
    pub fn crc32(&self) -> u32 {
        *self.crc.get_or_init(|| match self.content {
            Content::Transcript(_) | Content::Raw { .. } | Content::Package(_) => 0,
            Content::GetFile { seed, size } => {
                let mut crc = crc32fast::Hasher::new();
                let mut buf = Vec::with_capacity(1 << 20);
                let mut off = 0;
                while off < size {
                    let n = (size - off).min(1 << 20);
                    buf.clear();
                    fill_original(seed, off, n, &mut buf);
                    crc.update(&buf);
                    off += n;
                }
                crc.finalize()
            }
        })
    }

    /// Whether the digests are cached (so a handler can avoid blocking on them).
    pub fn digests_ready(&self) -> bool {
        self.digests.get().is_some()
    }

    /// SHA-256 and MD5 of the served bytes, plus size and SHA-256 of the original for GetFile.
    pub fn digests(&self) -> &Digests {
        self.digests.get_or_init(|| match &self.content {
            Content::Transcript(bytes) => Digests {
                sha256: hex::encode(Sha256::digest(bytes)),
                md5: Md5::digest(bytes).into(),
                original_size: None,
                original_sha256: None,
            },
            Content::GetFile { seed, size } => self.getfile_digests(*seed, *size),
            Content::Raw { .. } | Content::Package(_) => self.raw_digests(),
        })
    }

    fn raw_digests(&self) -> Digests {
        let mut sha = Sha256::new();
        let mut md5 = Md5::new();
        let mut off = 0;
        while off < self.len() {
            let chunk = self.read(off, 1 << 20);
            sha.update(&chunk);
            md5.update(&chunk);
            off += chunk.len() as u64;
        }
        Digests {
            sha256: hex::encode(sha.finalize()),
            md5: md5.finalize().into(),
            original_size: None,
            original_sha256: None,
        }
    }

    fn getfile_digests(&self, seed: u64, size: u64) -> Digests {
        let mut served_sha = Sha256::new();
        let mut served_md5 = Md5::new();
        let mut original_sha = Sha256::new();
        let mut crc = crc32fast::Hasher::new();
        served_sha.update(GZ_HEADER);
        served_md5.update(GZ_HEADER);
        let mut buf = Vec::with_capacity(BLOCK as usize);
        for k in 0..gz_blocks(size) {
            let header = block_header(size, k);
            served_sha.update(header);
            served_md5.update(header);
            buf.clear();
            fill_original(seed, k * BLOCK, block_len(size, k), &mut buf);
            served_sha.update(&buf);
            served_md5.update(&buf);
            original_sha.update(&buf);
            crc.update(&buf);
        }
        let crc = crc.finalize();
        let _ = self.crc.set(crc);
        let trailer = trailer(crc, size);
        served_sha.update(trailer);
        served_md5.update(trailer);
        Digests {
            sha256: hex::encode(served_sha.finalize()),
            md5: served_md5.finalize().into(),
            original_size: Some(size),
            original_sha256: Some(hex::encode(original_sha.finalize())),
        }
    }

    /// The served bytes `[off, off + len)`, clamped to the blob. Computes the CRC first if the
    /// range reaches the trailer (call from a blocking context when `needs_crc` says so).
    pub fn read(&self, off: u64, len: u64) -> Bytes {
        let end = (off + len).min(self.len());
        if off >= end {
            return Bytes::new();
        }
        match &self.content {
            Content::Transcript(bytes) => {
                Bytes::copy_from_slice(&bytes[off as usize..end as usize])
            }
            Content::GetFile { seed, size } => {
                let mut out = Vec::with_capacity((end - off) as usize);
                self.read_gzip(*seed, *size, off, end, &mut out);
                Bytes::from(out)
            }
            Content::Raw { seed, payload } => {
                let mut out = Vec::with_capacity((end - off) as usize);
                match payload.kind {
                    PayloadKind::Random | PayloadKind::RandomMd5 => {
                        fill_random(*seed, off, end - off, &mut out)
                    }
                    PayloadKind::Text => fill_original(*seed, off, end - off, &mut out),
                }
                Bytes::from(out)
            }
            Content::Package(layout) => {
                let crcs = self.package_crcs.get_or_init(|| layout.crcs());
                let mut out = Vec::with_capacity((end - off) as usize);
                layout.read(crcs, off, end, &mut out);
                Bytes::from(out)
            }
        }
    }

    fn read_gzip(&self, seed: u64, size: u64, mut off: u64, end: u64, out: &mut Vec<u8>) {
        let header_len = GZ_HEADER.len() as u64;
        let trailer_start = gz_len(size) - GZ_TRAILER;
        while off < end {
            if off < header_len {
                let stop = end.min(header_len);
                out.extend_from_slice(&GZ_HEADER[off as usize..stop as usize]);
                off = stop;
            } else if off >= trailer_start {
                let trailer = trailer(self.crc32(), size);
                let from = (off - trailer_start) as usize;
                let to = (end - trailer_start) as usize;
                out.extend_from_slice(&trailer[from..to]);
                off = end;
            } else {
                let rel = off - header_len;
                let k = rel / (BLOCK + BLOCK_HEADER);
                let within = rel % (BLOCK + BLOCK_HEADER);
                let block_start = off - within;
                if within < BLOCK_HEADER {
                    let stop = end.min(block_start + BLOCK_HEADER);
                    let header = block_header(size, k);
                    out.extend_from_slice(&header[within as usize..(stop - block_start) as usize]);
                    off = stop;
                } else {
                    let data_off = within - BLOCK_HEADER;
                    let stop = end.min(block_start + BLOCK_HEADER + block_len(size, k));
                    fill_original(seed, k * BLOCK + data_off, stop - off, out);
                    off = stop;
                }
            }
        }
    }
}

/// A stable 64-bit fold of a string, for deterministic derived values.
pub(crate) fn fold(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn gz_blocks(size: u64) -> u64 {
    size.div_ceil(BLOCK).max(1)
}

/// Length of the gzip wrapping of an original of `size` bytes.
pub(crate) fn gz_len(size: u64) -> u64 {
    GZ_HEADER.len() as u64 + BLOCK_HEADER * gz_blocks(size) + size + GZ_TRAILER
}

fn block_len(size: u64, k: u64) -> u64 {
    (size - k * BLOCK).min(BLOCK)
}

fn block_header(size: u64, k: u64) -> [u8; 5] {
    let last = k + 1 == gz_blocks(size);
    let len = block_len(size, k) as u16;
    let [lo, hi] = len.to_le_bytes();
    let [nlo, nhi] = (!len).to_le_bytes();
    [u8::from(last), lo, hi, nlo, nhi]
}

fn trailer(crc: u32, size: u64) -> [u8; 8] {
    let mut t = [0u8; 8];
    t[..4].copy_from_slice(&crc.to_le_bytes());
    // ISIZE is the length modulo 2^32, as RFC 1952 says.
    t[4..].copy_from_slice(&(size as u32).to_le_bytes());
    t
}

/// One 64-byte line of the generated file: `NNNNNNNNNN,<32 hex>,<word padded>\n`.
fn line(seed: u64, n: u64) -> [u8; LINE as usize] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut l = [b' '; LINE as usize];
    let mut num = n % 10_000_000_000;
    for i in (0..10).rev() {
        l[i] = b'0' + (num % 10) as u8;
        num /= 10;
    }
    l[10] = b',';
    let h1 = mix(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let h2 = mix(h1 ^ seed);
    for (i, h) in [h1, h2].into_iter().enumerate() {
        for j in 0..16 {
            l[11 + i * 16 + j] = HEX[((h >> (60 - 4 * j)) & 0xf) as usize];
        }
    }
    l[43] = b',';
    let word = WORDS[(h1 % WORDS.len() as u64) as usize].as_bytes();
    l[44..44 + word.len()].copy_from_slice(word);
    l[63] = b'\n';
    l
}

/// Appends bytes `[off, off + len)` of an endless random stream to `out`: word `i` is a
/// strong 64-bit mix of `seed` and `i`, so any range is computed directly, at memory speed.
pub(crate) fn fill_random(seed: u64, off: u64, len: u64, out: &mut Vec<u8>) {
    let word = |i: u64| mix(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes();
    let end = off + len;
    let mut pos = off;
    // A ragged start, whole words, a ragged end.
    while pos < end && (!pos.is_multiple_of(8) || end - pos < 8) {
        out.push(word(pos / 8)[(pos % 8) as usize]);
        pos += 1;
    }
    while end - pos >= 8 {
        out.extend_from_slice(&word(pos / 8));
        pos += 8;
    }
    while pos < end {
        out.push(word(pos / 8)[(pos % 8) as usize]);
        pos += 1;
    }
}

/// Appends the original file's bytes `[off, off + len)` to `out`.
pub(crate) fn fill_original(seed: u64, off: u64, len: u64, out: &mut Vec<u8>) {
    let end = off + len;
    let mut pos = off;
    while pos < end {
        let n = pos / LINE;
        let l = line(seed, n);
        let from = (pos % LINE) as usize;
        let to = (end - n * LINE).min(LINE) as usize;
        out.extend_from_slice(&l[from..to]);
        pos = n * LINE + to as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn getfile(size: u64) -> Blob {
        Blob::new(
            "t".into(),
            "a".into(),
            "0123456789abcdef0123456789abcdef".into(),
            Content::GetFile { seed: 7, size },
            DateTime::<Utc>::UNIX_EPOCH,
        )
    }

    fn all(blob: &Blob) -> Vec<u8> {
        blob.read(0, blob.len()).to_vec()
    }

    #[test]
    fn generated_lines_are_fixed_width_text() {
        let mut out = Vec::new();
        fill_original(7, 0, 128, &mut out);
        assert_eq!(out.len(), 128);
        assert_eq!(&out[..11], b"0000000000,");
        assert_eq!(&out[64..75], b"0000000001,");
        assert_eq!(out[63], b'\n');
        assert_eq!(out[127], b'\n');
        // A read from the middle equals the same slice of a read from the start.
        let mut mid = Vec::new();
        fill_original(7, 50, 30, &mut mid);
        assert_eq!(mid, out[50..80]);
    }

    #[test]
    fn empty_original_is_a_minimal_gzip() {
        let blob = getfile(0);
        assert_eq!(blob.len(), 23);
        assert_eq!(
            all(&blob),
            [
                0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff, 1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0
            ]
        );
    }

    #[test]
    fn gzip_wrapping_inflates_to_the_original_and_hashes_agree() {
        for size in [1, 64, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17] {
            let blob = getfile(size);
            let served = all(&blob);
            assert_eq!(served.len() as u64, gz_len(size));
            let mut original = Vec::new();
            flate2::read::GzDecoder::new(&served[..])
                .read_to_end(&mut original)
                .unwrap();
            let mut expected = Vec::new();
            fill_original(7, 0, size, &mut expected);
            assert_eq!(original, expected, "size {size}");
            let d = blob.digests();
            assert_eq!(d.sha256, hex::encode(Sha256::digest(&served)));
            assert_eq!(d.md5, <[u8; 16]>::from(Md5::digest(&served)));
            assert_eq!(d.original_size, Some(size));
            assert_eq!(
                d.original_sha256.as_deref(),
                Some(hex::encode(Sha256::digest(&original)).as_str())
            );
        }
    }

    #[test]
    fn any_range_equals_the_slice_of_the_whole() {
        let blob = getfile(2 * BLOCK + 100);
        let whole = all(&blob);
        let len = whole.len() as u64;
        for (off, n) in [
            (0, 3),
            (9, 4),
            (10, 7),
            (65_540, 20),
            (len - 9, 9),
            (len - 3, 100),
        ] {
            let end = (off + n).min(len);
            assert_eq!(
                blob.read(off, n).to_vec(),
                whole[off as usize..end as usize],
                "{off}+{n}"
            );
        }
    }

    #[test]
    fn transcript_is_served_verbatim() {
        let bytes: Arc<[u8]> = Arc::from(&b"{\"a\":\"x\ny\0\"}"[..]);
        let blob = Blob::new(
            "t".into(),
            "a".into(),
            "n".into(),
            Content::Transcript(bytes.clone()),
            DateTime::<Utc>::UNIX_EPOCH,
        );
        assert_eq!(blob.len(), 12);
        assert_eq!(blob.read(3, 4).as_ref(), b"\":\"x");
        assert_eq!(blob.digests().sha256, hex::encode(Sha256::digest(&bytes)));
        assert_eq!(blob.digests().original_sha256, None);
        assert_eq!(blob.content_type(), "application/json");
    }
}
