//! `lrvault run`: the daemon (see [`crate::daemon`]).

use std::process::ExitCode;
use std::sync::Arc;

use crate::config::ConfigFile;

pub async fn run(config: &ConfigFile) -> anyhow::Result<ExitCode> {
    let cfg = Arc::new(config.load()?);
    crate::daemon::run(cfg).await
}
