//! `lrvault run`: the daemon (see [`crate::daemon`]), never as root unless
//! `LRVAULT_ALLOW_ROOT=1` says so (docs/operations.md §1.6).

use std::process::ExitCode;
use std::sync::Arc;

use crate::config::ConfigFile;
use crate::error::UserError;

pub async fn run(config: &ConfigFile) -> anyhow::Result<ExitCode> {
    let allow_root = std::env::var_os("LRVAULT_ALLOW_ROOT").is_some_and(|v| v == "1");
    crate::access::check_daemon_user(nix::unistd::Uid::effective().as_raw(), allow_root)
        .map_err(UserError::new)?;
    let cfg = Arc::new(config.load()?);
    crate::daemon::run(cfg).await
}
