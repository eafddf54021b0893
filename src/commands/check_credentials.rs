//! `lrvault check-credentials`: takes a token the way a tenant signs in (`auth`: secret,
//! certificate, managed identity, workload identity), or with the secret `--secret-file` or
//! the certificate `--certificate-file` names (a new one written beside the old, before a
//! rotation swaps them: docs/operations.md §1.7), and makes one cheap API call (a List page
//! of one action). It changes no action, result or custody row; both calls go through the
//! quota governor and are in the ledger. Exit 0 the credentials work, 1 refused (or the
//! check could not be made), 2 a configuration problem (unreadable credential, unknown
//! tenant).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args as ClapArgs;

use crate::config::{ConfigFile, CredentialFile, SecretSource, SignIn, TenantConfig};
use crate::db::Db;
use crate::error::UserError;
use crate::mde::{MdeClient, MdeError};
use crate::quota::Governor;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Check this tenant only (default: every configured tenant)
    #[arg(long, value_name = "T")]
    pub tenant: Option<String>,
    /// Sign in with the secret in this file instead of the configured one (one tenant only;
    /// a relative name is looked up like client_secret_file: in $CREDENTIALS_DIRECTORY)
    #[arg(long, value_name = "F", conflicts_with = "certificate_file")]
    pub secret_file: Option<PathBuf>,
    /// Sign in with the certificate (PEM private key and certificate) in this file instead
    /// (one tenant only; a relative name is looked up like client_certificate_file)
    #[arg(long, value_name = "F")]
    pub certificate_file: Option<PathBuf>,
}

/// How one tenant's check ended.
enum Verdict {
    Works,
    Refused(String),
    Unknown(String),
}

pub async fn run(config: &ConfigFile, args: Args) -> anyhow::Result<ExitCode> {
    let cfg = config.load()?;
    let mut tenants: Vec<TenantConfig> = cfg
        .select_tenants(args.tenant.as_deref())?
        .into_iter()
        .cloned()
        .collect();
    let credentials = &config.credentials;
    let given = match (&args.secret_file, &args.certificate_file) {
        (Some(file), _) => Some((
            "--secret-file",
            SignIn::Secret(SecretSource::File {
                path: credentials.resolve(file),
                configured: file.clone(),
            }),
        )),
        (None, Some(file)) => Some((
            "--certificate-file",
            SignIn::Certificate(CredentialFile::new(file.clone(), credentials)),
        )),
        (None, None) => None,
    };
    if let Some((flag, sign_in)) = given {
        let [tenant] = tenants.as_mut_slice() else {
            return Err(UserError::new(format!(
                "{flag} needs --tenant when several tenants are configured"
            ))
            .into());
        };
        tenant.sign_in = sign_in;
    }
    // Every credential is read before any call: an unreadable one is a configuration error.
    for t in &tenants {
        t.check_credential()?;
    }
    cfg.check_writable()?;
    let db = Db::open(&cfg.database.path)?;
    let governor = Governor::new(db.clone(), cfg.quota.clone());
    let http = crate::mde::api_http()?;
    let mut all_work = true;
    for t in tenants {
        let (name, source) = (t.name.clone(), t.credential_source());
        let client = MdeClient::new(
            Arc::new(t),
            governor.clone(),
            crate::http::RemoteClock::default(),
            http.clone(),
        )?;
        match check(&client).await? {
            Verdict::Works => println!(
                "tenant '{name}': the credentials work ({source}): a token was issued and the API answered"
            ),
            Verdict::Refused(why) => {
                all_work = false;
                eprintln!("lrvault: tenant '{name}': refused: {why}");
            }
            Verdict::Unknown(why) => {
                all_work = false;
                eprintln!("lrvault: tenant '{name}': could not be checked: {why}");
            }
        }
    }
    Ok(super::exit_code(all_work))
}

/// A token, then one List page of at most one action created from now on (an empty answer
/// costs the API nothing). A refusal by the identity provider or the API (401, 403) is
/// `Refused`; an outage is `Unknown`; an unreadable credential or a ledger failure is the
/// error.
async fn check(client: &MdeClient) -> anyhow::Result<Verdict> {
    let answer = match client.check_auth().await {
        Ok(()) => {
            let mut page = client.list_window(crate::time::now(), None, None, 1)?;
            page.next_page().await.map(|_| ())
        }
        Err(e) => Err(e),
    };
    Ok(match answer {
        Ok(()) => Verdict::Works,
        Err(MdeError::Secret(e)) => return Err(e.into()),
        Err(e @ MdeError::Ledger(_)) => return Err(e.into()),
        Err(e @ MdeError::TokenRefused { .. }) => Verdict::Refused(e.to_string()),
        Err(e) if matches!(e.http_status(), Some(401 | 403)) => Verdict::Refused(format!(
            "{e}; the token was issued but the API refuses this app: grant it Machine.Read.All with admin consent (docs/operations.md §1.2)"
        )),
        Err(e) => Verdict::Unknown(e.to_string()),
    })
}
