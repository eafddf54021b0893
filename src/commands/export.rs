//! `lrvault export`: an examiner's handover kit (see [`crate::export`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::ConfigFile;

use crate::error::UserError;
use crate::export::{Request, Selection};

/// `lrvault export` flags.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("selection").required(true).args(["evidence", "action", "case", "since"])))]
pub struct Args {
    /// One package, by evidence id
    #[arg(long, value_name = "ID")]
    pub evidence: Option<String>,
    /// Every package of one machine action
    #[arg(long, value_name = "ID")]
    pub action: Option<String>,
    /// Every package of one case (docs/operations.md §17)
    #[arg(long, value_name = "CASE")]
    pub case: Option<String>,
    /// Packages of the actions created since DATE (YYYY-MM-DD, RFC 3339, or an age like 30d)
    #[arg(long, value_name = "DATE")]
    pub since: Option<String>,
    /// ... and before DATE (exclusive)
    #[arg(long, value_name = "DATE", requires = "since")]
    pub until: Option<String>,
    /// Only this tenant's packages
    #[arg(long, value_name = "T")]
    pub tenant: Option<String>,
    /// Where to write the kit: a new directory (lrvault creates it, mode 0700)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Who receives the kit (recorded in the EXPORTED custody rows)
    #[arg(long, value_name = "NAME")]
    pub recipient: Option<String>,
}

impl Args {
    /// The selection the flags describe, with dates parsed.
    fn selection(&self) -> Result<Selection, UserError> {
        let now = crate::time::now();
        let date = |d: &Option<String>| {
            d.as_deref()
                .map(|d| crate::time::parse_user_date(d, now).map(crate::time::fmt))
                .transpose()
        };
        Ok(Selection {
            evidence: self.evidence.clone(),
            action: self.action.clone(),
            since: date(&self.since)?,
            until: date(&self.until)?,
            tenant: self.tenant.clone(),
            archived_through: None,
            case: self
                .case
                .as_deref()
                .map(|c| {
                    crate::config::case_id(c)
                        .ok_or_else(|| UserError::new(format!("--case {c:?} is not a case id")))
                })
                .transpose()?,
        })
    }

    /// The selection as the user gave it, for the kit and the EXPORTED rows.
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (flag, value) in [
            ("--evidence", &self.evidence),
            ("--action", &self.action),
            ("--case", &self.case),
            ("--since", &self.since),
            ("--until", &self.until),
            ("--tenant", &self.tenant),
        ] {
            if let Some(v) = value {
                parts.push(format!("{flag} {v}"));
            }
        }
        parts.join(" ")
    }
}

pub async fn run(config: &ConfigFile, args: Args) -> anyhow::Result<ExitCode> {
    let cfg = config.load()?;
    cfg.select_tenants(args.tenant.as_deref())?;
    let request = Request {
        selection: args.selection()?,
        out: std::path::absolute(&args.out)?,
        recipient: args.recipient.clone(),
        description: args.describe(),
    };
    check_out_dir(&request.out)?;
    let db = super::open_db(&cfg, config)?;
    let Some(done) = crate::export::export(&cfg, &db, &request).await? else {
        eprintln!("lrvault: no archived evidence matches the selection; nothing exported");
        return Ok(ExitCode::from(1));
    };
    let c = &done.coverage;
    println!(
        "exported {} packages to {}: custody rows {}..{} up to checkpoint {} ({}); SHA256SUMS {}",
        c.packages,
        request.out.display(),
        c.first_seq,
        c.checkpoint.seq,
        c.checkpoint_path,
        if c.token_path.is_some() {
            "with its RFC 3161 token"
        } else {
            "no token yet"
        },
        done.sums_sha256
    );
    Ok(ExitCode::SUCCESS)
}

/// The kit goes into a new directory that export creates itself; nothing already there is
/// used, whatever it is (an empty directory, a file, a symlink). Checked again when the
/// finished kit is moved into place.
fn check_out_dir(out: &Path) -> Result<(), UserError> {
    match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(UserError::new(format!("--out {}: {e}", out.display()))),
        Ok(_) => Err(UserError::new(
            crate::export::KitError::Exists(out.to_path_buf()).to_string(),
        )),
    }
}
