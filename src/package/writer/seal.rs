//! The end of a package's writing: the last tag files and the zip's central directory, and the
//! re-check of the complete partial (`docs/evidence-format.md` §7) before it may be placed.

use std::fs::File;
use std::io;

use super::super::check::{PayloadCheck, check_package_with};
use super::super::hashers::PackageHasher;
use super::super::partial::PartialFile;
use super::super::readback::{Follower, PayloadAt, ReadBack};
use super::super::tagfiles::{TagFiles, manifest};
use super::super::zipout::PayloadEntry;
use super::super::{PackageError, PackageInfo, PayloadDigests};
use super::{PackageWriter, Zip, add_tag_file};

impl PackageWriter {
    /// Adds the last tag files and the central directory; hands back the file (flushed) and,
    /// when it was hashed as written, its hasher.
    pub(super) fn close_zip(
        &self,
        mut zip: Zip,
        mut tags: TagFiles,
        digests: &PayloadDigests,
        retrieval_json: &[u8],
    ) -> Result<(File, Option<PackageHasher>), PackageError> {
        let at = (self.bag_name.as_str(), self.partial_path.as_path());
        add_tag_file((&mut zip, &mut tags), at, "retrieval.json", retrieval_json)?;
        let payload_manifest = manifest(&digests.sha256, &digests.payload_name);
        let bytes = payload_manifest.as_bytes();
        add_tag_file((&mut zip, &mut tags), at, "manifest-sha256.txt", bytes)?;
        let tag_manifest = tags.tag_manifest();
        let bytes = tag_manifest.as_bytes();
        add_tag_file((&mut zip, &mut tags), at, "tagmanifest-sha256.txt", bytes)?;
        let parts = zip
            .finish()
            .and_then(|buffered| buffered.into_inner().map_err(|e| e.into_error()))
            .and_then(PartialFile::into_parts)
            .map_err(self.io_err("finishing"))?;
        self.progress.end();
        Ok(parts)
    }

    /// The re-check of the complete partial (see `docs/evidence-format.md` §7): what was read
    /// back must be what was written, the payload entry must decode to what was received, and
    /// the bag must be whole.
    pub(super) fn recheck(
        &self,
        digests: &PayloadDigests,
        entry: PayloadEntry,
        follower: Option<Follower>,
        hasher: Option<PackageHasher>,
    ) -> Result<PackageInfo, PackageError> {
        let read_back = |follower: io::Result<Follower>| {
            follower
                .and_then(Follower::finish)
                .map_err(|e| PackageError::Verify {
                    path: self.final_path.clone(),
                    reason: format!("reading the package back from the file: {e}"),
                })
        };
        let (found, package) = match (follower, hasher) {
            (Some(follower), Some(hasher)) => {
                let found: ReadBack = read_back(Ok(follower))?;
                let written = hasher.finish().ok_or_else(|| {
                    PackageError::Task("the package hashing thread failed".into())
                })?;
                if (found.file_size, found.file_crc32) != (written.size, written.crc32) {
                    return Err(self.verify_failed(format!(
                        "the file reads back as {} bytes with CRC-32 {:08x}, but {} bytes with CRC-32 {:08x} were written",
                        found.file_size, found.file_crc32, written.size, written.crc32
                    )));
                }
                (found, (written.size, written.sha256))
            }
            _ => {
                // `stored`: the local header was filled in after the payload, so the file is
                // hashed now, in one more pass.
                let at = PayloadAt::Stored {
                    from: entry.data_start,
                    len: entry.size,
                };
                let found = read_back(Follower::start(
                    &self.partial_path,
                    at,
                    true,
                    self.progress.clone(),
                ))?;
                let package = (found.file_size, found.sha256.clone().unwrap_or_default());
                (found, package)
            }
        };
        let check = check_package_with(
            &self.partial_path,
            PayloadCheck::ReadBack {
                streamed_sha256: &digests.sha256,
                found: &found.payload,
                package: (package.0, &package.1),
            },
        )?;
        let mut mismatches = check.problems.clone();
        if check.bag_name != self.bag_name {
            mismatches.push(format!(
                "bag name {:?}, expected {:?}",
                check.bag_name, self.bag_name
            ));
        }
        if (&check.payload_name, check.payload_size) != (&digests.payload_name, digests.size) {
            mismatches.push(format!(
                "payload {:?} ({} bytes) does not match what was streamed: {:?} ({} bytes)",
                check.payload_name, check.payload_size, digests.payload_name, digests.size
            ));
        }
        if !mismatches.is_empty() {
            return Err(self.verify_failed(mismatches.join("; ")));
        }
        Ok(PackageInfo {
            rel_path: self.rel_path.clone(),
            package_size: check.package_size,
            package_sha256: check.package_sha256,
        })
    }
}
