//! The zip container of a package, written front to back (PKWARE APPNOTE 6.3).
//!
//! Tag files are small and in memory: each is deflated whole and written with its CRC-32 and
//! sizes in its local header. The payload entry streams in one of three layouts
//! ([`EntryLayout`]): deflated or in stored blocks (deflate level 0: the bytes unchanged in
//! blocks of at most 65,535 bytes, 5 bytes of framing each), both DEFLATED entries followed by
//! a data descriptor, so nothing already written is ever changed and the package can be hashed
//! as it goes to the file; or plain STORED, whose local header is filled in after the last
//! byte (the only seek). A reader finds a DEFLATED entry's end from the deflate stream's final
//! block, never by scanning the payload for a signature.
//!
//! zip64: the payload entry carries a zip64 extra field in its local header (and an 8-byte
//! data descriptor) when it was asked to be large; the central directory and its end records
//! use zip64 wherever a value does not fit 32 bits.

use std::io::{self, Seek, SeekFrom, Write};

use flate2::{Compress, FlushCompress, Status};

use super::compression::{EntryLayout, FAST_LEVEL};

const LOCAL_HEADER: u32 = 0x0403_4b50;
const CENTRAL_HEADER: u32 = 0x0201_4b50;
const DATA_DESCRIPTOR: u32 = 0x0807_4b50;
const ZIP64_END: u32 = 0x0606_4b50;
const ZIP64_LOCATOR: u32 = 0x0706_4b50;
const END: u32 = 0x0605_4b50;
const ZIP64_EXTRA: u16 = 0x0001;
/// Unix, APPNOTE 4.5.
const VERSION_MADE_BY: u16 = (3 << 8) | 45;
const FLAG_DESCRIPTOR: u16 = 1 << 3;
const FLAG_UTF8: u16 = 1 << 11;
const METHOD_STORED: u16 = 0;
const METHOD_DEFLATED: u16 = 8;
/// 32-bit fields at or above this go into the zip64 extra field.
const MAX32: u64 = 0xFFFF_FFFF;
/// Largest stored deflate block.
const STORED_BLOCK: usize = 65_535;
/// Deflate output gathered before it is written.
const OUT_BUFFER: usize = 256 * 1024;

/// What the central directory records about one entry.
#[derive(Debug, Clone)]
struct Central {
    name: Vec<u8>,
    flags: u16,
    method: u16,
    crc32: u32,
    compressed: u64,
    size: u64,
    offset: u64,
    zip64_local: bool,
}

/// Where a finished payload entry is and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PayloadEntry {
    pub data_start: u64,
    pub data_end: u64,
    pub size: u64,
    pub crc32: u32,
}

/// The payload entry being written.
struct Open {
    layout: EntryLayout,
    central: Central,
    data_start: u64,
    crc: crc32fast::Hasher,
    deflate: Option<Compress>,
    /// Bytes waiting for a full stored block.
    block: Vec<u8>,
}

/// A zip file written front to back; see the module docs.
pub(crate) struct ZipOut<W: Write + Seek> {
    out: W,
    pos: u64,
    dos_time: (u16, u16),
    entries: Vec<Central>,
    open: Option<Open>,
    buf: Vec<u8>,
}

impl<W: Write + Seek> ZipOut<W> {
    pub(crate) fn new(out: W, dos_time: (u16, u16)) -> Self {
        ZipOut {
            out,
            pos: 0,
            dos_time,
            entries: Vec::new(),
            open: None,
            buf: Vec::new(),
        }
    }

    pub(crate) fn inner_mut(&mut self) -> &mut W {
        &mut self.out
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Adds a small file, deflated, its CRC-32 and sizes in its local header.
    pub(crate) fn add_file(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let mut encoder = flate2::write::DeflateEncoder::new(
            Vec::with_capacity(bytes.len() / 2 + 64),
            flate2::Compression::new(FAST_LEVEL),
        );
        encoder.write_all(bytes)?;
        let deflated = encoder.finish()?;
        let central = Central {
            name: name.as_bytes().to_vec(),
            flags: utf8_flag(name),
            method: METHOD_DEFLATED,
            crc32: crc32fast::hash(bytes),
            compressed: deflated.len() as u64,
            size: bytes.len() as u64,
            offset: self.pos,
            zip64_local: false,
        };
        self.local_header(&central)?;
        self.put(&deflated)?;
        self.entries.push(central);
        Ok(())
    }

    /// Starts the payload entry; returns where its data starts. `large` gives it a zip64
    /// extra field (needed when it may reach 4 GiB).
    pub(crate) fn start_payload(
        &mut self,
        name: &str,
        layout: EntryLayout,
        large: bool,
    ) -> io::Result<u64> {
        let descriptor = layout.streams();
        let central = Central {
            name: name.as_bytes().to_vec(),
            flags: utf8_flag(name) | if descriptor { FLAG_DESCRIPTOR } else { 0 },
            method: if descriptor {
                METHOD_DEFLATED
            } else {
                METHOD_STORED
            },
            crc32: 0,
            compressed: 0,
            size: 0,
            offset: self.pos,
            zip64_local: large,
        };
        self.local_header(&central)?;
        let deflate = (layout == EntryLayout::Deflated)
            .then(|| Compress::new(flate2::Compression::new(FAST_LEVEL), false));
        self.open = Some(Open {
            layout,
            central,
            data_start: self.pos,
            crc: crc32fast::Hasher::new(),
            deflate,
            block: Vec::new(),
        });
        Ok(self.pos)
    }

    /// Appends payload bytes to the open entry.
    pub(crate) fn write_payload(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut open = self.open.take().ok_or_else(no_entry)?;
        open.crc.update(bytes);
        open.central.size += bytes.len() as u64;
        let r = match open.layout {
            EntryLayout::Stored => self.put(bytes),
            EntryLayout::StoredBlocks => self.stored_blocks(&mut open.block, bytes, false),
            EntryLayout::Deflated => self.deflate(&mut open, bytes, FlushCompress::None),
        };
        self.open = Some(open);
        r
    }

    /// Frames `bytes` (after what `block` holds) as stored deflate blocks; with `last`, ends
    /// the stream with a final block (empty when nothing is left).
    fn stored_blocks(
        &mut self,
        block: &mut Vec<u8>,
        mut bytes: &[u8],
        last: bool,
    ) -> io::Result<()> {
        loop {
            let take = (STORED_BLOCK - block.len()).min(bytes.len());
            let (now, rest) = bytes.split_at(take);
            bytes = rest;
            let full = block.len() + now.len() == STORED_BLOCK;
            if !full && !last {
                block.extend_from_slice(now);
                return Ok(());
            }
            let len = (block.len() + now.len()) as u16;
            let final_block = last && bytes.is_empty();
            let mut head = [0u8; 5];
            head[0] = u8::from(final_block);
            head[1..3].copy_from_slice(&len.to_le_bytes());
            head[3..5].copy_from_slice(&(!len).to_le_bytes());
            self.put(&head)?;
            let held = std::mem::take(block);
            self.put(&held)?;
            self.put(now)?;
            *block = held;
            block.clear();
            if final_block {
                return Ok(());
            }
        }
    }

    /// Runs `input` through the entry's deflate stream.
    fn deflate(
        &mut self,
        open: &mut Open,
        mut input: &[u8],
        flush: FlushCompress,
    ) -> io::Result<()> {
        let z = open.deflate.as_mut().ok_or_else(no_entry)?;
        let mut out = std::mem::take(&mut self.buf);
        out.reserve(OUT_BUFFER);
        loop {
            let before = z.total_in();
            out.clear();
            let status = z
                .compress_vec(input, &mut out, flush)
                .map_err(io::Error::other)?;
            input = &input[(z.total_in() - before) as usize..];
            if !out.is_empty() {
                self.put(&out)?;
            }
            let finished = match flush {
                FlushCompress::Finish => status == Status::StreamEnd,
                _ => input.is_empty() && out.len() < out.capacity(),
            };
            if finished {
                self.buf = out;
                return Ok(());
            }
        }
    }

    /// Ends the payload entry: the deflate stream's end and the data descriptor, or (stored)
    /// the local header filled in.
    pub(crate) fn end_payload(&mut self) -> io::Result<PayloadEntry> {
        let mut open = self.open.take().ok_or_else(no_entry)?;
        match open.layout {
            EntryLayout::Deflated => self.deflate(&mut open, &[], FlushCompress::Finish)?,
            EntryLayout::StoredBlocks => self.stored_blocks(&mut open.block, &[], true)?,
            EntryLayout::Stored => {}
        }
        let mut central = open.central;
        central.crc32 = open.crc.finalize();
        central.compressed = self.pos - open.data_start;
        if open.layout.streams() {
            let mut d = Vec::with_capacity(24);
            d.extend_from_slice(&DATA_DESCRIPTOR.to_le_bytes());
            d.extend_from_slice(&central.crc32.to_le_bytes());
            if central.zip64_local {
                d.extend_from_slice(&central.compressed.to_le_bytes());
                d.extend_from_slice(&central.size.to_le_bytes());
            } else {
                let (c, s) = (u32_or_err(central.compressed)?, u32_or_err(central.size)?);
                d.extend_from_slice(&c.to_le_bytes());
                d.extend_from_slice(&s.to_le_bytes());
            }
            self.put(&d)?;
        } else {
            let end = self.pos;
            let header = local_header_bytes(&central, self.dos_time)?;
            self.out.seek(SeekFrom::Start(central.offset))?;
            self.out.write_all(&header)?;
            self.out.seek(SeekFrom::Start(end))?;
        }
        let entry = PayloadEntry {
            data_start: open.data_start,
            data_end: open.data_start + central.compressed,
            size: central.size,
            crc32: central.crc32,
        };
        self.entries.push(central);
        Ok(entry)
    }

    fn local_header(&mut self, c: &Central) -> io::Result<()> {
        let header = local_header_bytes(c, self.dos_time)?;
        self.put(&header)
    }

    /// Writes the central directory and its end records; hands the writer back.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        if self.open.is_some() {
            return Err(io::Error::other("the payload entry is still open"));
        }
        let start = self.pos;
        let entries = std::mem::take(&mut self.entries);
        for c in &entries {
            let header = self.central_header(c);
            self.put(&header)?;
        }
        let size = self.pos - start;
        let count = entries.len() as u64;
        let zip64 = start >= MAX32 || size >= MAX32 || count >= 0xFFFF;
        let mut end = Vec::with_capacity(98);
        if zip64 {
            let at = self.pos;
            end.extend_from_slice(&ZIP64_END.to_le_bytes());
            end.extend_from_slice(&44u64.to_le_bytes());
            end.extend_from_slice(&VERSION_MADE_BY.to_le_bytes());
            end.extend_from_slice(&45u16.to_le_bytes());
            end.extend_from_slice(&[0u8; 8]);
            end.extend_from_slice(&count.to_le_bytes());
            end.extend_from_slice(&count.to_le_bytes());
            end.extend_from_slice(&size.to_le_bytes());
            end.extend_from_slice(&start.to_le_bytes());
            end.extend_from_slice(&ZIP64_LOCATOR.to_le_bytes());
            end.extend_from_slice(&0u32.to_le_bytes());
            end.extend_from_slice(&at.to_le_bytes());
            end.extend_from_slice(&1u32.to_le_bytes());
        }
        let count16 = count.min(0xFFFF) as u16;
        end.extend_from_slice(&END.to_le_bytes());
        end.extend_from_slice(&[0u8; 4]);
        end.extend_from_slice(&count16.to_le_bytes());
        end.extend_from_slice(&count16.to_le_bytes());
        end.extend_from_slice(&(size.min(MAX32) as u32).to_le_bytes());
        end.extend_from_slice(&(start.min(MAX32) as u32).to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        self.put(&end)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn central_header(&self, c: &Central) -> Vec<u8> {
        let mut extra = Vec::new();
        for value in [c.size, c.compressed, c.offset] {
            if value >= MAX32 {
                extra.extend_from_slice(&value.to_le_bytes());
            }
        }
        let zip64 = !extra.is_empty() || c.zip64_local;
        let mut h = Vec::with_capacity(46 + c.name.len() + extra.len() + 4);
        h.extend_from_slice(&CENTRAL_HEADER.to_le_bytes());
        h.extend_from_slice(&VERSION_MADE_BY.to_le_bytes());
        h.extend_from_slice(&version_needed(zip64).to_le_bytes());
        h.extend_from_slice(&c.flags.to_le_bytes());
        h.extend_from_slice(&c.method.to_le_bytes());
        h.extend_from_slice(&self.dos_time.0.to_le_bytes());
        h.extend_from_slice(&self.dos_time.1.to_le_bytes());
        h.extend_from_slice(&c.crc32.to_le_bytes());
        for value in [c.compressed, c.size] {
            h.extend_from_slice(&(value.min(MAX32) as u32).to_le_bytes());
        }
        h.extend_from_slice(&(c.name.len() as u16).to_le_bytes());
        let extra_len = if extra.is_empty() { 0 } else { extra.len() + 4 };
        h.extend_from_slice(&(extra_len as u16).to_le_bytes());
        h.extend_from_slice(&[0u8; 6]); // comment length, disk, internal attributes
        h.extend_from_slice(&((0o100_644u32) << 16).to_le_bytes());
        h.extend_from_slice(&(c.offset.min(MAX32) as u32).to_le_bytes());
        h.extend_from_slice(&c.name);
        if !extra.is_empty() {
            h.extend_from_slice(&ZIP64_EXTRA.to_le_bytes());
            h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            h.extend_from_slice(&extra);
        }
        h
    }
}

/// A local file header. With a zip64 extra field its sizes are there (zero while a data
/// descriptor follows); otherwise in the header (zero while a data descriptor follows).
fn local_header_bytes(c: &Central, dos_time: (u16, u16)) -> io::Result<Vec<u8>> {
    let mut h = Vec::with_capacity(30 + c.name.len() + 20);
    h.extend_from_slice(&LOCAL_HEADER.to_le_bytes());
    h.extend_from_slice(&version_needed(c.zip64_local).to_le_bytes());
    h.extend_from_slice(&c.flags.to_le_bytes());
    h.extend_from_slice(&c.method.to_le_bytes());
    h.extend_from_slice(&dos_time.0.to_le_bytes());
    h.extend_from_slice(&dos_time.1.to_le_bytes());
    h.extend_from_slice(&c.crc32.to_le_bytes());
    if c.zip64_local {
        h.extend_from_slice(&u32::MAX.to_le_bytes());
        h.extend_from_slice(&u32::MAX.to_le_bytes());
    } else {
        h.extend_from_slice(&u32_or_err(c.compressed)?.to_le_bytes());
        h.extend_from_slice(&u32_or_err(c.size)?.to_le_bytes());
    }
    h.extend_from_slice(&(c.name.len() as u16).to_le_bytes());
    h.extend_from_slice(&(if c.zip64_local { 20u16 } else { 0 }).to_le_bytes());
    h.extend_from_slice(&c.name);
    if c.zip64_local {
        h.extend_from_slice(&ZIP64_EXTRA.to_le_bytes());
        h.extend_from_slice(&16u16.to_le_bytes());
        h.extend_from_slice(&c.size.to_le_bytes());
        h.extend_from_slice(&c.compressed.to_le_bytes());
    }
    Ok(h)
}

fn version_needed(zip64: bool) -> u16 {
    if zip64 { 45 } else { 20 }
}

fn utf8_flag(name: &str) -> u16 {
    if name.is_ascii() { 0 } else { FLAG_UTF8 }
}

fn u32_or_err(value: u64) -> io::Result<u32> {
    u32::try_from(value).map_err(|_| {
        io::Error::other("an entry reached 4 GiB without zip64 (its expected size was smaller)")
    })
}

fn no_entry() -> io::Error {
    io::Error::other("no payload entry is open")
}

/// The MS-DOS (time, date) of `now`, in UTC; 1980-01-01 before 1980.
pub(crate) fn dos_time(now: chrono::DateTime<chrono::Utc>) -> (u16, u16) {
    use chrono::{Datelike, Timelike};
    if now.year() < 1980 || now.year() > 2107 {
        return (0, (1 << 5) | 1);
    }
    let time = (now.hour() << 11) | (now.minute() << 5) | (now.second() / 2);
    let date = ((now.year() as u32 - 1980) << 9) | (now.month() << 5) | now.day();
    (time as u16, date as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Read};

    fn zip_with(layout: EntryLayout, large: bool, payload: &[u8]) -> (Vec<u8>, PayloadEntry) {
        let mut z = ZipOut::new(Cursor::new(Vec::new()), (0, 33));
        z.add_file("b/bagit.txt", b"BagIt-Version: 1.0\n").unwrap();
        z.start_payload("b/data/p.bin", layout, large).unwrap();
        for piece in payload.chunks(70_001) {
            z.write_payload(piece).unwrap();
        }
        let entry = z.end_payload().unwrap();
        z.add_file("b/bag-info.txt", b"Payload-Oxum: 1.1\n")
            .unwrap();
        (z.finish().unwrap().into_inner(), entry)
    }

    #[test]
    fn every_layout_reads_back_with_the_zip_crate() {
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for layout in [
            EntryLayout::Deflated,
            EntryLayout::StoredBlocks,
            EntryLayout::Stored,
        ] {
            for large in [false, true] {
                let (bytes, entry) = zip_with(layout, large, &payload);
                let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
                let mut e = archive.by_name("b/data/p.bin").unwrap();
                assert_eq!(e.data_start(), Some(entry.data_start), "{layout:?}");
                assert_eq!(e.compressed_size(), entry.data_end - entry.data_start);
                assert_eq!(e.crc32(), crc32fast::hash(&payload));
                let mut back = Vec::new();
                e.read_to_end(&mut back).unwrap();
                assert_eq!(back, payload, "{layout:?} large={large}");
            }
        }
    }

    #[test]
    fn stored_blocks_cost_five_bytes_each() {
        let payload = vec![7u8; 3 * STORED_BLOCK + 10];
        let (_, entry) = zip_with(EntryLayout::StoredBlocks, false, &payload);
        // Three full blocks, the rest in the final one.
        assert_eq!(
            entry.data_end - entry.data_start,
            payload.len() as u64 + 4 * 5
        );
        let (_, empty) = zip_with(EntryLayout::StoredBlocks, false, b"");
        assert_eq!(empty.data_end - empty.data_start, 5);
    }
}
