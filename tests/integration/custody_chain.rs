//! An independent implementation of the custody hash (docs/design.md §6): its own JSON encoder,
//! not serde_json, so a bug in the crate's encoding cannot hide.

use sha2::{Digest, Sha256};

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn opt_str(s: &Option<String>) -> String {
    s.as_deref().map_or("null".into(), json_str)
}

/// Recomputes every row hash and link; returns the number of rows.
pub fn recheck(conn: &rusqlite::Connection) -> i64 {
    let mut stmt = conn
        .prepare(
            "SELECT seq, at, tenant, action_id, command_index, event, actor, evidence_sha256, package_path, detail,
                    prev_hash, row_hash FROM custody_log ORDER BY seq",
        )
        .unwrap();
    let mut rows = stmt.query([]).unwrap();
    let mut prev = "0".repeat(64);
    let mut expected_seq = 1;
    while let Some(r) = rows.next().unwrap() {
        let seq: i64 = r.get(0).unwrap();
        assert_eq!(seq, expected_seq, "seq has no gaps");
        let prev_hash: String = r.get(10).unwrap();
        assert_eq!(prev_hash, prev, "row {seq} links to the previous row");
        let index: Option<i64> = r.get(4).unwrap();
        let detail: String = r.get(9).unwrap();
        assert!(detail.starts_with('{'), "detail is a JSON object");
        let text = format!(
            "[{},{},{},{},{},{},{},{},{},{},{}]",
            json_str(&prev_hash),
            seq,
            json_str(&r.get::<_, String>(1).unwrap()),
            json_str(&r.get::<_, String>(2).unwrap()),
            json_str(&r.get::<_, String>(3).unwrap()),
            index.map_or("null".into(), |i| i.to_string()),
            json_str(&r.get::<_, String>(5).unwrap()),
            json_str(&r.get::<_, String>(6).unwrap()),
            opt_str(&r.get(7).unwrap()),
            opt_str(&r.get(8).unwrap()),
            json_str(&detail),
        );
        let row_hash: String = r.get(11).unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(text.as_bytes())),
            row_hash,
            "row {seq} hash"
        );
        prev = row_hash;
        expected_seq += 1;
    }
    expected_seq - 1
}
