//! `lrvault audit`: the canned compliance queries, over the stable views of docs/audit.md §2
//! (`v_evidence`, `v_custody`, and `v_case_evidence` of §8) and the quota ledger. Read-only.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::ConfigFile;
use crate::db::{Db, DbError};
use crate::render::{Format, Rows};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Archived evidence: who collected what, from which device, when, its SHA-256 and where it is
    Evidence {
        #[arg(long)]
        tenant: Option<String>,
        /// Machine id or computer DNS name
        #[arg(long)]
        machine: Option<String>,
        #[arg(long)]
        requestor: Option<String>,
        /// Only the packages of this case (docs/audit.md §8)
        #[arg(long, value_name = "CASE")]
        case: Option<String>,
        /// Actions created at or after DATE (YYYY-MM-DD, RFC 3339, or an age like 30d)
        #[arg(long, value_name = "DATE")]
        since: Option<String>,
        /// Actions created before DATE
        #[arg(long, value_name = "DATE")]
        until: Option<String>,
        #[command(flatten)]
        format: FormatArg,
    },
    /// The custody trail of one action or one evidence package
    Custody {
        #[command(flatten)]
        which: CustodyTarget,
        #[command(flatten)]
        format: FormatArg,
    },
    /// API calls per tenant and endpoint in the quota ledger (last hour), with 429s
    Quota {
        /// Only this tenant (a host serving many tenants has a row per tenant and endpoint)
        #[arg(long, value_name = "T")]
        tenant: Option<String>,
        #[command(flatten)]
        format: FormatArg,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct CustodyTarget {
    /// Machine action id
    #[arg(long, value_name = "ID")]
    action: Option<String>,
    /// Evidence id
    #[arg(long, value_name = "ID")]
    evidence: Option<String>,
}

#[derive(Debug, Args)]
pub struct FormatArg {
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

pub async fn run(config: &ConfigFile, cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    let cfg = config.load()?;
    let conn = Db::open_for_reading(&cfg.database.path, &config.path)?;
    let (rows, format) = match cmd {
        AuditCommand::Evidence {
            tenant,
            machine,
            requestor,
            case,
            since,
            until,
            format,
        } => {
            let case = case
                .map(|c| {
                    crate::config::case_id(&c).ok_or_else(|| {
                        crate::error::UserError::new(format!("--case {c:?} is not a case id"))
                    })
                })
                .transpose()?;
            let now = crate::time::now();
            let since = since
                .map(|s| crate::time::parse_user_date(&s, now))
                .transpose()?
                .map(crate::time::fmt);
            let until = until
                .map(|s| crate::time::parse_user_date(&s, now))
                .transpose()?
                .map(crate::time::fmt);
            (
                evidence(&conn, tenant, machine, requestor, case, since, until)?,
                format.format,
            )
        }
        AuditCommand::Custody { which, format } => {
            let rows = if let Some(action) = which.action {
                Rows::query(&conn, "SELECT * FROM v_custody WHERE action_id = ?1 ORDER BY seq", &[&action])
            } else {
                let id = which.evidence.unwrap_or_default();
                Rows::query(
                    &conn,
                    "SELECT c.* FROM v_custody c JOIN evidence e ON e.tenant = c.tenant AND e.action_id = c.action_id
                     AND (c.command_index = e.command_index OR c.command_index IS NULL)
                     WHERE e.evidence_id = ?1 ORDER BY c.seq",
                    &[&id],
                )
            }
            .map_err(DbError::sql("audit custody"))?;
            (rows, format.format)
        }
        AuditCommand::Quota { tenant, format } => {
            // An unknown tenant is one clear line (exit 2), not an empty table.
            cfg.select_tenants(tenant.as_deref())?;
            let since = crate::time::now_ms() - (cfg.quota.hour_secs * 1000.0) as i64;
            let rows = Rows::query(
                &conn,
                "SELECT tenant, endpoint, count(*) AS calls_last_hour,
                        sum(CASE WHEN http_status = 429 THEN 1 ELSE 0 END) AS throttled_429,
                        sum(CASE WHEN http_status >= 500 OR http_status = 0 THEN 1 ELSE 0 END) AS errors,
                        strftime('%Y-%m-%dT%H:%M:%fZ', max(at_ms) / 1000.0, 'unixepoch') AS last_call_at,
                        max(at_ms) AS last_call_ms
                 FROM api_calls WHERE at_ms > ?1 AND (?2 IS NULL OR tenant = ?2)
                 GROUP BY tenant, endpoint ORDER BY tenant, endpoint",
                &[&since, &tenant],
            )
            .map_err(DbError::sql("audit quota"))?;
            (rows, format.format)
        }
    };
    print!("{}", rows.render(format));
    Ok(ExitCode::SUCCESS)
}

/// Rows of `v_evidence` matching the filters, oldest action first. Only the filters given
/// become SQL conditions, so SQLite can use the indexes on machine, name, requestor and
/// creation time (a `?n IS NULL OR ...` condition would force a scan of every action).
pub fn evidence(
    conn: &rusqlite::Connection,
    tenant: Option<String>,
    machine: Option<String>,
    requestor: Option<String>,
    case: Option<String>,
    since: Option<String>,
    until: Option<String>,
) -> Result<Rows, DbError> {
    let mut conditions = vec!["1"];
    let mut params: Vec<&dyn rusqlite::ToSql> = Vec::new();
    let filters: [(&str, &Option<String>, usize); 6] = [
        ("tenant = ?", &tenant, 1),
        ("(machine_id = ? OR computer_dns_name = ?)", &machine, 2),
        ("requestor = ?", &requestor, 1),
        (
            "evidence_id IN (SELECT evidence_id FROM v_case_evidence WHERE case_id = ?)",
            &case,
            1,
        ),
        ("action_created_at >= ?", &since, 1),
        ("action_created_at < ?", &until, 1),
    ];
    for (condition, value, uses) in filters {
        if let Some(value) = value {
            conditions.push(condition);
            params.extend(std::iter::repeat_n(value as &dyn rusqlite::ToSql, uses));
        }
    }
    Rows::query(
        conn,
        &format!(
            "SELECT * FROM v_evidence WHERE {} ORDER BY action_created_at, action_id, command_index",
            conditions.join(" AND ")
        ),
        &params,
    )
    .map_err(DbError::sql("audit evidence"))
}
