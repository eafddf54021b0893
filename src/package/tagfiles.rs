//! The BagIt tag files of a package (RFC 8493; docs/evidence-format.md): `bagit.txt`, `bag-info.txt`,
//! the payload manifest and the tag manifest, which lists every other tag file's SHA-256.

use sha2::{Digest, Sha256};

use super::BagInfo;
use super::check::encode_manifest_path;

pub(crate) const BAGIT_TXT: &[u8] = b"BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n";

/// The tag files written so far, for the tag manifest.
#[derive(Debug, Default)]
pub(crate) struct TagFiles {
    /// (name inside the bag, sha256 hex).
    hashes: Vec<(String, String)>,
}

impl TagFiles {
    /// Notes a tag file as it is written.
    pub(crate) fn record(&mut self, name: &str, bytes: &[u8]) {
        self.hashes
            .push((name.to_string(), hex::encode(Sha256::digest(bytes))));
    }

    /// `tagmanifest-sha256.txt`: every tag file recorded so far, sorted by name.
    pub(crate) fn tag_manifest(&self) -> String {
        let mut lines = self.hashes.clone();
        lines.sort();
        lines
            .iter()
            .map(|(name, sha)| format!("{sha}  {}\n", encode_manifest_path(name)))
            .collect()
    }
}

/// `manifest-sha256.txt` of the one payload file.
pub(crate) fn manifest(payload_sha256: &str, payload_name: &str) -> String {
    format!(
        "{payload_sha256}  data/{}\n",
        encode_manifest_path(payload_name)
    )
}

/// `bag-info.txt`; every value on one line.
pub(crate) fn bag_info_txt(info: &BagInfo, payload_size: u64) -> String {
    let mut out = String::new();
    let mut field = |key: &str, value: &str| {
        out.push_str(key);
        out.push_str(": ");
        out.push_str(&value.replace(['\r', '\n'], " "));
        out.push('\n');
    };
    field("Source-Organization", &info.source_organization);
    field("External-Identifier", &info.external_identifier);
    field("Bagging-Date", &info.bagging_date);
    field("Payload-Oxum", &format!("{payload_size}.1"));
    if let Some(contact) = &info.contact_name {
        field("Contact-Name", contact);
    }
    field("External-Description", &info.external_description);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bag_info_keeps_each_value_on_one_line() {
        let info = BagInfo {
            source_organization: "Contoso SOC".to_string(),
            external_identifier: "contoso/a1b2c3/2".to_string(),
            bagging_date: "2026-11-27".to_string(),
            contact_name: None,
            external_description: "RunScript result\r\nfrom device".to_string(),
        };
        assert_eq!(
            bag_info_txt(&info, 42),
            "Source-Organization: Contoso SOC\nExternal-Identifier: contoso/a1b2c3/2\n\
             Bagging-Date: 2026-11-27\nPayload-Oxum: 42.1\n\
             External-Description: RunScript result  from device\n"
        );
    }

    #[test]
    fn manifests_encode_line_breaks_and_sort_the_tag_files() {
        assert_eq!(manifest("ab", "a\nb%"), "ab  data/a%0Ab%25\n");
        let mut tags = TagFiles::default();
        tags.record("retrieval.json", b"{}");
        tags.record("bagit.txt", BAGIT_TXT);
        let text = tags.tag_manifest();
        let names: Vec<&str> = text.lines().map(|l| &l[66..]).collect();
        assert_eq!(names, ["bagit.txt", "retrieval.json"]);
    }
}
