//! The package half of rule 7 (docs/audit.md §4, check 8): a package read back says whose
//! result it holds. Its bag name, `External-Identifier`, `Contact-Name`, `machine-action.json`
//! and the original file's name, size and hash in `retrieval.json` must be this evidence row's
//! and its action's, so a genuine package of another result cannot stand in for this one.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use super::EvidenceRow;
use crate::db::DbError;

/// The tag files that say whose the package is.
pub(super) struct Tags {
    pub(super) retrieval: Value,
    bag_info: String,
    machine_action: Vec<u8>,
}

pub(super) fn read_tags(path: &Path, bag: &str) -> Result<Tags, String> {
    let mut files = crate::package::TagFiles::open(path, bag)?;
    let retrieval = files.retrieval()?;
    let bag_info = String::from_utf8(files.read("bag-info.txt")?)
        .map_err(|_| "bag-info.txt is not UTF-8".to_string())?;
    Ok(Tags {
        retrieval,
        bag_info,
        machine_action: files.read("machine-action.json")?,
    })
}

/// The action's raw JSON and requestor, for the package's own copies of them.
pub(super) fn action_of(
    conn: &Connection,
    row: &EvidenceRow,
) -> Result<Option<(String, Option<String>)>, DbError> {
    conn.prepare_cached(
        "SELECT raw_json, requestor FROM actions WHERE tenant = ?1 AND action_id = ?2",
    )
    .map_err(DbError::sql("read the package's action"))?
    .query_row(params![row.tenant, row.action_id], |r| {
        Ok((crate::cells::shown(r, 0), r.get(1).ok().flatten()))
    })
    .optional()
    .map_err(DbError::sql("read the package's action"))
}

/// The bag says whose result it holds (docs/evidence-format.md): its name, `External-Identifier` and
/// `Contact-Name`, `machine-action.json` and the original file's name, size and hash in
/// `retrieval.json` must be this evidence row's and its action's, so a genuine package of
/// another result cannot stand in for this one.
pub(super) fn check_identity(row: &mut EvidenceRow, bag_name: &str, tags: &Tags) {
    let index = row.index.unwrap_or(-1);
    let bag = format!(
        "{}-{index:03}",
        crate::package::path_component(&row.action_id)
    );
    if bag_name != bag {
        row.problems.push(format!(
            "the bag is named {bag_name}, this evidence's is {bag}"
        ));
    }
    let field = |name: &str| {
        tags.bag_info
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            .map(str::to_string)
    };
    let identifier = format!("{}/{}/{index}", row.tenant, row.action_id);
    if field("External-Identifier").as_deref() != Some(identifier.as_str()) {
        row.problems.push(format!(
            "bag-info.txt says External-Identifier {}, this evidence is {identifier}",
            field("External-Identifier").unwrap_or_else(|| "nothing".into())
        ));
    }
    if let Some((raw_json, requestor)) = &row.action {
        if tags.machine_action != raw_json.as_bytes() {
            row.problems.push(
                "machine-action.json differs from the action's raw_json in the database".into(),
            );
        }
        if let Some(requestor) = requestor
            && field("Contact-Name").as_deref() != Some(requestor.as_str())
        {
            row.problems.push(format!(
                "bag-info.txt says Contact-Name {}, the action's requestor is {requestor}",
                field("Contact-Name").unwrap_or_else(|| "nothing".into())
            ));
        }
    } else {
        row.problems.push(format!(
            "no action {} of tenant {}",
            row.action_id, row.tenant
        ));
    }
    for name in ["original_name", "original_size", "original_sha256"] {
        let ours = row
            .more
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(&Value::Null, |(_, v)| v);
        let packaged = &tags.retrieval[name];
        if packaged != ours {
            row.problems.push(format!(
                "retrieval.json says {name} {packaged}, the evidence row says {ours}"
            ));
        }
    }
}
