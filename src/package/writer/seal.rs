//! The end of a package's writing: the last tag files and the zip's central directory, and the
//! re-check of the complete partial (`docs/evidence-format.md` §7) before it may be placed.

use super::super::check::{PayloadCheck, check_package_with};
use super::super::hashers::PackageHasher;
use super::super::partial::{PartialFile, Parts};
use super::super::readback::{Follower, PayloadAt};
use super::super::tagfiles::{TagFiles, manifest};
use super::super::zipout::PayloadEntry;
use super::super::{PackageError, PackageInfo, PayloadDigests};
use super::{PackageWriter, Zip, add_tag_file};

impl PackageWriter {
    /// Adds the last tag files and the central directory; hands back the file (flushed), its
    /// hasher when it was hashed as written, and its read-back lane when it was followed.
    pub(super) fn close_zip(
        &self,
        mut zip: Zip,
        mut tags: TagFiles,
        digests: &PayloadDigests,
        retrieval_json: &[u8],
    ) -> Result<Parts, PackageError> {
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
            .map(PartialFile::into_parts)
            .map_err(self.io_err("finishing"))?;
        Ok(parts)
    }

    /// `stored`: the local header was filled in after the payload, so the complete file is
    /// read back (and hashed) now, in one more pass on the hashing threads.
    pub(super) fn read_back_stored(
        &self,
        entry: &PayloadEntry,
        len: u64,
    ) -> Result<Follower, PackageError> {
        let at = PayloadAt::Stored {
            from: entry.data_start,
            len: entry.size,
        };
        let partial = &self.partial_path;
        let follower = Follower::start(&self.threads, partial, at, true, self.abandoned.clone())
            .map_err(self.io_err("opening for the read-back"))?;
        // A message per MiB, so the lane shares the threads in turns like every other.
        let mut told = 0;
        while told < len {
            told = (told + super::super::READ_BUFFER as u64).min(len);
            follower.written_to(told);
        }
        Ok(follower)
    }

    /// The re-check of the complete partial (see `docs/evidence-format.md` §7): what was read
    /// back must be what was written, the payload entry must decode to what was received, and
    /// the bag must be whole.
    pub(super) fn recheck(
        &self,
        digests: &PayloadDigests,
        follower: Follower,
        hasher: Option<PackageHasher>,
    ) -> Result<PackageInfo, PackageError> {
        let found = follower.finish().map_err(|e| PackageError::Verify {
            path: self.final_path.clone(),
            reason: format!("reading the package back from the file: {e}"),
        })?;
        let package = match hasher {
            Some(hasher) => {
                let written = hasher
                    .finish()
                    .ok_or_else(|| PackageError::Task("the package hashing lane failed".into()))?;
                if (found.file_size, found.file_crc32) != (written.size, written.crc32) {
                    return Err(self.verify_failed(format!(
                        "the file reads back as {} bytes with CRC-32 {:08x}, but {} bytes with CRC-32 {:08x} were written",
                        found.file_size, found.file_crc32, written.size, written.crc32
                    )));
                }
                (written.size, written.sha256)
            }
            // `stored`: hashed by the read-back.
            None => (found.file_size, found.sha256.clone().unwrap_or_default()),
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
