//! A finished package's tag files read back (`retrieval.json`, `bag-info.txt`,
//! `machine-action.json`): the one reader for adoption in the archive pass and for
//! `lrvault verify` (docs/evidence-format.md).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde_json::Value;

/// The most a tag file may hold before it is refused (they are a few KiB).
pub const MAX_TAG_FILE: u64 = 1 << 20;

/// The tag files of one bag in a package zip. Errors are one line saying what is wrong.
pub struct TagFiles {
    zip: zip::ZipArchive<File>,
    bag: String,
}

impl TagFiles {
    /// Opens the package at `path`, whose bag is named `bag`.
    pub fn open(path: &Path, bag: &str) -> Result<TagFiles, String> {
        let file = File::open(path).map_err(|e| format!("cannot open the package: {e}"))?;
        let zip = zip::ZipArchive::new(file).map_err(|e| format!("cannot read the zip: {e}"))?;
        Ok(TagFiles {
            zip,
            bag: bag.to_string(),
        })
    }

    /// The bytes of the tag file `name` (at most [`MAX_TAG_FILE`]).
    pub fn read(&mut self, name: &str) -> Result<Vec<u8>, String> {
        let entry = self
            .zip
            .by_name(&format!("{}/{name}", self.bag))
            .map_err(|_| format!("the package has no {name}"))?;
        let mut bytes = Vec::new();
        entry
            .take(MAX_TAG_FILE)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read {name}: {e}"))?;
        Ok(bytes)
    }

    /// `retrieval.json`, parsed.
    pub fn retrieval(&mut self) -> Result<Value, String> {
        serde_json::from_slice(&self.read("retrieval.json")?)
            .map_err(|e| format!("retrieval.json is not JSON: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_a_bags_tag_files_and_says_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.zip");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default();
        zip.start_file("bag/retrieval.json", opts).unwrap();
        zip.write_all(br#"{"sha256":"ab"}"#).unwrap();
        zip.start_file("bag/bag-info.txt", opts).unwrap();
        zip.write_all(b"not json").unwrap();
        zip.finish().unwrap();

        let mut tags = TagFiles::open(&path, "bag").unwrap();
        assert_eq!(tags.retrieval().unwrap()["sha256"], "ab");
        assert_eq!(tags.read("bag-info.txt").unwrap(), b"not json");
        assert_eq!(
            tags.read("machine-action.json").unwrap_err(),
            "the package has no machine-action.json"
        );
        let mut other = TagFiles::open(&path, "other").unwrap();
        assert_eq!(
            other.retrieval().unwrap_err(),
            "the package has no retrieval.json"
        );
        std::fs::write(&path, b"no zip").unwrap();
        assert!(
            TagFiles::open(&path, "bag")
                .err()
                .unwrap()
                .starts_with("cannot read the zip: "),
        );
    }
}
