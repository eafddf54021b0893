//! Investigation packages as the `safedownload` host serves them: a zip with the folders and
//! files a real package holds (autoruns, installed programs, network connections, prefetch,
//! processes, scheduled tasks, the security event log, services, SMB sessions, system
//! information, temp directories, users and groups, the Defender support logs and the
//! collection summary), in STORED entries. Every byte is computed from the seed and its
//! offset, so a package of hundreds of MB is streamed (and range-read) without being
//! materialised; the entries' CRC-32s need one pass and are cached by the caller.

use super::blob::{fill_original, fill_random};
use super::data::mix;

/// The files of a package: path inside the zip, share of the size (per mille), binary or text.
const FILES: [(&str, u64, bool); 22] = [
    ("Autoruns/Autoruns_HKLM_Run.txt", 8, false),
    ("Autoruns/Autoruns_Services.txt", 8, false),
    ("Installed programs/InstalledPrograms.csv", 12, false),
    ("Network connections/ActiveNetConnections.txt", 10, false),
    ("Network connections/Arp.txt", 2, false),
    ("Network connections/DnsCache.txt", 6, false),
    ("Network connections/IpConfig.txt", 2, false),
    ("Prefetch files/PrefetchFilesList.txt", 6, false),
    ("Prefetch files/Prefetch.zip", 90, true),
    ("Processes/Processes.csv", 14, false),
    ("Scheduled tasks/ScheduledTasksList.csv", 10, false),
    ("Security event log/SecurityEventLog.evtx", 520, true),
    ("Services/Services.csv", 10, false),
    (
        "Windows Server Message Block (SMB) sessions/SMBInboundSessions.txt",
        2,
        false,
    ),
    (
        "Windows Server Message Block (SMB) sessions/SMBOutboundSessions.txt",
        2,
        false,
    ),
    ("System Information/SystemInformation.txt", 6, false),
    ("Temp Directories/TempDirectoriesList.txt", 20, false),
    ("Users and Groups/Groups.txt", 4, false),
    ("Users and Groups/Users.txt", 4, false),
    ("WD support logs/MPSupportFiles.cab", 240, true),
    ("WD support logs/MPLog.txt", 20, false),
    ("CollectionSummaryReport.xls", 4, true),
];
/// DOS time and date of every entry (08:14:02 on 2025-03-10).
const DOS_TIME: u16 = (8 << 11) | (14 << 5) | 1;
const DOS_DATE: u16 = ((2025 - 1980) << 9) | (3 << 5) | 10;
const LOCAL_HEADER: u64 = 30;
const CENTRAL_HEADER: u64 = 46;
const END_RECORD: u64 = 22;
/// Largest package: sizes and offsets must fit the classic (non-zip64) fields.
const MAX_SIZE: u64 = 3 << 30;

/// One file of the package.
#[derive(Debug)]
struct Entry {
    name: &'static str,
    seed: u64,
    binary: bool,
    len: u64,
    /// Offset of its local header.
    at: u64,
}

impl Entry {
    fn data_at(&self) -> u64 {
        self.at + LOCAL_HEADER + self.name.len() as u64
    }

    fn fill(&self, off: u64, len: u64, out: &mut Vec<u8>) {
        if self.binary {
            fill_random(self.seed, off, len, out);
        } else {
            fill_original(self.seed, off, len, out);
        }
    }
}

/// Where everything sits in one package zip.
#[derive(Debug)]
pub(crate) struct Layout {
    entries: Vec<Entry>,
    /// Offset of the central directory.
    central_at: u64,
    len: u64,
}

impl Layout {
    /// A package of about `size` bytes of files (at least one byte each), from `seed`.
    pub fn new(seed: u64, size: u64) -> Layout {
        let size = size.min(MAX_SIZE);
        let mut at = 0;
        let entries = FILES
            .iter()
            .enumerate()
            .map(|(i, &(name, share, binary))| {
                let len = (size * share / 1000).max(1);
                let e = Entry {
                    name,
                    seed: mix(seed ^ (i as u64 + 1)),
                    binary,
                    len,
                    at,
                };
                at = e.data_at() + len;
                e
            })
            .collect::<Vec<_>>();
        let central: u64 = entries
            .iter()
            .map(|e| CENTRAL_HEADER + e.name.len() as u64)
            .sum();
        Layout {
            entries,
            central_at: at,
            len: at + central + END_RECORD,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// The CRC-32 of every file, in order (one pass over the contents).
    pub fn crcs(&self) -> Vec<u32> {
        let mut buf = Vec::with_capacity(1 << 20);
        self.entries
            .iter()
            .map(|e| {
                let mut crc = crc32fast::Hasher::new();
                let mut off = 0;
                while off < e.len {
                    let n = (e.len - off).min(1 << 20);
                    buf.clear();
                    e.fill(off, n, &mut buf);
                    crc.update(&buf);
                    off += n;
                }
                crc.finalize()
            })
            .collect()
    }

    /// Appends the bytes `[off, end)` of the zip to `out`, given the files' `crcs`.
    pub fn read(&self, crcs: &[u32], mut off: u64, end: u64, out: &mut Vec<u8>) {
        let end = end.min(self.len);
        while off < end {
            if off >= self.central_at {
                let tail = self.central(crcs);
                let from = (off - self.central_at) as usize;
                out.extend_from_slice(&tail[from..(end - self.central_at) as usize]);
                return;
            }
            // The last entry whose local header starts at or before `off`.
            let i = self.entries.partition_point(|e| e.at <= off) - 1;
            let e = &self.entries[i];
            let data_at = e.data_at();
            if off < data_at {
                let header = local_header(e, crcs[i]);
                let stop = end.min(data_at);
                out.extend_from_slice(&header[(off - e.at) as usize..(stop - e.at) as usize]);
                off = stop;
            } else {
                let stop = end.min(data_at + e.len);
                e.fill(off - data_at, stop - off, out);
                off = stop;
            }
        }
    }

    /// The central directory and the end record.
    fn central(&self, crcs: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for (e, crc) in self.entries.iter().zip(crcs) {
            out.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            out.extend_from_slice(&20u16.to_le_bytes()); // made by
            out.extend_from_slice(&common(e, *crc));
            out.extend_from_slice(&[0; 6]); // comment length, disk, internal attributes
            out.extend_from_slice(&0u32.to_le_bytes()); // external attributes
            out.extend_from_slice(&(e.at as u32).to_le_bytes());
            out.extend_from_slice(e.name.as_bytes());
        }
        let n = self.entries.len() as u16;
        let size = out.len() as u32;
        out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        out.extend_from_slice(&[0; 4]); // this disk, the central directory's disk
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&(self.central_at as u32).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }
}

/// The fields local and central headers share, from "version needed" to "extra length".
fn common(e: &Entry, crc: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(26);
    out.extend_from_slice(&20u16.to_le_bytes()); // version needed
    out.extend_from_slice(&0u16.to_le_bytes()); // flags
    out.extend_from_slice(&0u16.to_le_bytes()); // STORED
    out.extend_from_slice(&DOS_TIME.to_le_bytes());
    out.extend_from_slice(&DOS_DATE.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&(e.len as u32).to_le_bytes());
    out.extend_from_slice(&(e.len as u32).to_le_bytes());
    out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes()); // extra length
    out
}

fn local_header(e: &Entry, crc: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(LOCAL_HEADER as usize + e.name.len());
    out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
    out.extend_from_slice(&common(e, crc));
    out.extend_from_slice(e.name.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn whole(layout: &Layout) -> Vec<u8> {
        let crcs = layout.crcs();
        let mut out = Vec::new();
        layout.read(&crcs, 0, layout.len(), &mut out);
        out
    }

    #[test]
    fn a_package_is_a_zip_any_reader_opens_with_every_file_intact() {
        let layout = Layout::new(7, 200_000);
        let bytes = whole(&layout);
        assert_eq!(bytes.len() as u64, layout.len());
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        assert_eq!(zip.len(), FILES.len());
        let mut total = 0;
        for (i, (name, _, _)) in FILES.iter().enumerate() {
            let mut f = zip.by_index(i).unwrap();
            assert_eq!(f.name().unwrap(), *name);
            let mut data = Vec::new();
            f.read_to_end(&mut data).unwrap(); // checks the CRC
            total += data.len();
        }
        assert!((199_000..=200_100).contains(&total), "{total}");
    }

    #[test]
    fn any_range_reads_the_same_bytes_and_the_seed_decides_them() {
        let layout = Layout::new(3, 50_000);
        let all = whole(&layout);
        let crcs = layout.crcs();
        for (from, to) in [(0, 1), (10, 100), (29, 31_000), (40_000, layout.len())] {
            let mut part = Vec::new();
            layout.read(&crcs, from, to, &mut part);
            assert_eq!(part, all[from as usize..to as usize]);
        }
        assert_eq!(all, whole(&Layout::new(3, 50_000)));
        assert_ne!(all, whole(&Layout::new(4, 50_000)));
    }
}
