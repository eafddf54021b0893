//! `lrvault run`: the daemon (see [`crate::daemon`]).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use crate::config::Config;

pub async fn run(config: &Path) -> anyhow::Result<ExitCode> {
    let cfg = Arc::new(Config::load(config)?);
    crate::daemon::run(cfg).await
}
