//! Issue 16: an insider with write access to the database file and the evidence store (not to
//! a TSA's key) edits what the audit and the export kit show, and what the chain's times say.
//! Every edit is done with plain SQL after dropping every trigger, or by editing files, and
//! `verify` must exit 3 naming the row or package (docs/design.md §7a rules 7 and 10); once it is
//! rolled back, `verify` exits 0.

use crate::forgery::caught;
use crate::tamper::{Vault, archived_vault, file_sha256, rehash_chain_from};

/// (tenant, action_id, evidence_id, package_path) of the `nth` package archived.
fn owner(vault: &Vault, nth: i64) -> (String, String, String, String) {
    let (id, path, _) = vault.package(nth);
    vault
        .reader()
        .query_row(
            "SELECT tenant, action_id FROM evidence WHERE evidence_id = ?1",
            [&id],
            |r| Ok((r.get(0)?, r.get(1)?, id.clone(), path.clone())),
        )
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_audit_and_export_show_is_proven_by_the_chain_and_the_package() {
    let vault = archived_vault(161, 8, "").await;
    let (tenant, action, id, path) = owner(&vault, 1);
    let who = format!("action {tenant}/{action}");
    let set_action = |column: &'static str, value: &'static str| {
        let action = action.clone();
        move |v: &Vault| {
            let n = v
                .forger()
                .execute(
                    &format!("UPDATE actions SET {column} = ?2 WHERE action_id = ?1"),
                    rusqlite::params![action, value],
                )
                .unwrap();
            assert_eq!(n, 1);
        }
    };
    for (column, value) in [
        ("computer_dns_name", "someone-elses-laptop.contoso.com"),
        ("requestor", "mallory@contoso.com"),
        ("requestor_comment", "routine check"),
        ("status", "Cancelled"),
        ("machine_id", "0000000000000000000000000000000000000000"),
        ("last_update_at", "2020-01-01T00:00:00.000Z"),
        ("discovered_at", "2020-01-01T00:00:00.000Z"),
    ] {
        caught(
            &vault,
            column,
            set_action(column, value),
            &[format!("{who}: the action's {column} is")],
        );
    }
    // Backdated: a date-range export would leave it out; the package path no longer fits.
    caught(
        &vault,
        "backdated action",
        set_action("created_at", "2024-01-01T00:00:00.000Z"),
        &[
            format!("{who}: the action's created_at is \"2024-01-01T00:00:00.000Z\""),
            format!("evidence {id} ({path}): the package path should be {tenant}/2024/01/01/"),
        ],
    );
    caught(
        &vault,
        "raw JSON",
        set_action("raw_json", "{\"id\":\"x\"}"),
        &[
            format!("{who}: the action's raw_json hashes to"),
            format!("evidence {id} ({path}): machine-action.json differs"),
        ],
    );
    // Moved to another tenant, with its results and evidence.
    caught(
        &vault,
        "moved to another tenant",
        |v| {
            v.forger()
                .execute_batch(&format!(
                    "PRAGMA foreign_keys = OFF;
                     UPDATE actions SET tenant = 'other' WHERE action_id = '{action}';
                     UPDATE results SET tenant = 'other' WHERE action_id = '{action}';
                     UPDATE evidence SET tenant = 'other' WHERE action_id = '{action}';"
                ))
                .unwrap();
        },
        &[
            format!("action other/{action}: no DISCOVERED custody row"),
            "no ARCHIVED custody row for this evidence".to_string(),
        ],
    );
    let set_evidence = |column: &'static str, value: &'static str| {
        let id = id.clone();
        move |v: &Vault| {
            v.forger()
                .execute(
                    &format!("UPDATE evidence SET {column} = ?2 WHERE evidence_id = ?1"),
                    rusqlite::params![id, value],
                )
                .unwrap();
        }
    };
    for (column, value) in [
        (
            "original_sha256",
            "0000000000000000000000000000000000000000000000000000000000000000",
        ),
        ("original_name", "C:\\innocent.txt"),
        ("original_size", "1"),
        ("archived_at", "2020-01-01T00:00:00.000Z"),
        ("package_size", "1"),
    ] {
        caught(
            &vault,
            column,
            set_evidence(column, value),
            &[format!(
                "evidence {id} ({path}): the evidence row's {column} is"
            )],
        );
    }
    // The result's command type changed: its package path no longer fits.
    caught(
        &vault,
        "command type",
        |v| {
            v.forger()
                .execute(
                    "UPDATE results SET command_type = 'PutFile' WHERE evidence_id = ?1",
                    [&id],
                )
                .unwrap();
        },
        &[format!(
            "evidence {id} ({path}): the package path should be"
        )],
    );
}

/// Result B's genuine package at result A's path, A's rows made to match it and the chain
/// re-hashed: the bag still says it is B's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_results_genuine_package_cannot_stand_in() {
    let vault = archived_vault(162, 8, "").await;
    let (tenant, a_action, a_id, a_path) = owner(&vault, 5);
    let (_, b_action, b_id, b_path) = owner(&vault, 6);
    let a_index = vault.query_i64(&format!(
        "SELECT command_index FROM evidence WHERE evidence_id = '{a_id}'"
    ));
    let b_index = vault.query_i64(&format!(
        "SELECT command_index FROM evidence WHERE evidence_id = '{b_id}'"
    ));
    caught(
        &vault,
        "swapped package",
        |v| {
            let (a_file, b_file) = (v.store.join(&a_path), v.store.join(&b_path));
            crate::tamper::make_writable(&v.store);
            std::fs::copy(&b_file, &a_file).unwrap();
            let c = v.forger();
            // A's evidence and ARCHIVED rows take B's hashes, sizes and names.
            c.execute_batch(&format!(
                "UPDATE evidence SET (payload_name, payload_size, payload_sha256, payload_md5, original_name,
                        original_size, original_sha256, package_size, package_sha256) =
                    (SELECT payload_name, payload_size, payload_sha256, payload_md5, original_name,
                            original_size, original_sha256, package_size, package_sha256
                     FROM evidence WHERE evidence_id = '{b_id}')
                 WHERE evidence_id = '{a_id}';"
            ))
            .unwrap();
            let seq: i64 = c
                .query_row(
                    "SELECT seq FROM custody_log WHERE event = 'ARCHIVED' AND package_path = ?1",
                    [&a_path],
                    |r| r.get(0),
                )
                .unwrap();
            c.execute(
                "UPDATE custody_log SET
                    evidence_sha256 = (SELECT payload_sha256 FROM evidence WHERE evidence_id = ?2),
                    detail = json_set(detail,
                        '$.package_sha256', (SELECT package_sha256 FROM evidence WHERE evidence_id = ?2),
                        '$.package_size', (SELECT package_size FROM evidence WHERE evidence_id = ?2),
                        '$.payload_size', (SELECT payload_size FROM evidence WHERE evidence_id = ?2),
                        '$.payload_name', (SELECT payload_name FROM evidence WHERE evidence_id = ?2),
                        '$.payload_md5', (SELECT payload_md5 FROM evidence WHERE evidence_id = ?2),
                        '$.original_name', (SELECT original_name FROM evidence WHERE evidence_id = ?2),
                        '$.original_size', (SELECT original_size FROM evidence WHERE evidence_id = ?2),
                        '$.original_sha256', (SELECT original_sha256 FROM evidence WHERE evidence_id = ?2))
                 WHERE seq = ?1",
                rusqlite::params![seq, b_id],
            )
            .unwrap();
            rehash_chain_from(&c, seq);
            assert_eq!(file_sha256(&a_file), file_sha256(&b_file));
        },
        &[
            format!(
                "evidence {a_id} ({a_path}): the bag is named {}-{b_index:03}, this evidence's is {}-{a_index:03}",
                lrvault::package::path_component(&b_action),
                lrvault::package::path_component(&a_action)
            ),
            format!(
                "bag-info.txt says External-Identifier {tenant}/{b_action}/{b_index}, this evidence is {tenant}/{a_action}/{a_index}"
            ),
        ],
    );
}

/// A row planted after the newest checkpoint, hashed into the chain, with a time a day
/// before its predecessor's (docs/design.md §6: times never go backwards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_earlier_than_its_predecessor_is_a_forgery() {
    let vault = archived_vault(163, 4, "").await;
    caught(
        &vault,
        "time going backwards",
        |v| {
            let c = v.forger();
            let (seq, at, prev): (i64, String, String) = c
                .query_row(
                    "SELECT seq, at, row_hash FROM custody_log ORDER BY seq DESC LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .unwrap();
            let earlier = lrvault::time::fmt(
                lrvault::time::parse_api(&at).unwrap() - chrono::Duration::days(1),
            );
            let mut row = lrvault::custody::Row {
                seq: seq + 1,
                at: earlier.clone(),
                tenant: "sim0".into(),
                action_id: "*".into(),
                command_index: None,
                event: "VERIFIED".into(),
                actor: "lrvault/0.1.0 app=x host=y uid=0".into(),
                evidence_sha256: None,
                package_path: None,
                detail: "{}".into(),
                prev_hash: prev,
                row_hash: String::new(),
            };
            row.row_hash = lrvault::custody::row_hash(&row);
            c.execute(
                "INSERT INTO custody_log (seq, at, tenant, action_id, command_index, event, actor,
                     evidence_sha256, package_path, detail, prev_hash, row_hash)
                 VALUES (?1, ?2, ?3, ?4, NULL, ?5, ?6, NULL, NULL, ?7, ?8, ?9)",
                rusqlite::params![
                    row.seq,
                    row.at,
                    row.tenant,
                    row.action_id,
                    row.event,
                    row.actor,
                    row.detail,
                    row.prev_hash,
                    row.row_hash
                ],
            )
            .unwrap();
            let planted = seq + 1;
            assert!(earlier < at, "{earlier} {at} {planted}");
        },
        &["is earlier than the previous row's".to_string()],
    );
}
