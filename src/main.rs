//! The `lrvault` binary: parse the command line, set up logging, run, map the outcome to
//! an exit code. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use lrvault::cli::{Cli, LogFormat};
use lrvault::config::Credentials;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // `lrvault status | head` should end quietly like any Unix tool, not panic on EPIPE.
    // SAFETY: resetting a signal disposition to its default before any thread starts.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    // One malloc arena. The runtime, writer and hashing threads hand buffers to each other;
    // with glibc's arena per thread, memory freed in one arena is not reused by the others, so
    // peak memory grew with a transfer's length (numbers: bench/package.sh, README).
    // SAFETY: a malloc tuning call before any thread starts.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    // No core dump and no ptrace by other processes of this user: the memory holds client
    // secrets, bearer tokens and SAS links (the unit also sets LimitCORE=0).
    // SAFETY: prctl(PR_SET_DUMPABLE) only changes this process's attribute.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    let cli = Cli::parse();
    init_tracing(&cli);
    // systemd's LoadCredential= directory, read here once and passed down: nothing below
    // reads or changes the process environment for it.
    let credentials = Credentials::new(std::env::var_os("CREDENTIALS_DIRECTORY").map(Into::into));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lrvault: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(lrvault::cli::run(cli, credentials)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("lrvault: {}", lrvault::error::one_line(&err));
            ExitCode::from(lrvault::error::exit_code(&err))
        }
    }
}

fn init_tracing(cli: &Cli) {
    let level = match (cli.verbose, cli.quiet) {
        (0, 0) => "info",
        (1, _) => "debug",
        (v, _) if v >= 2 => "trace",
        (_, 1) => "warn",
        _ => "error",
    };
    // RUST_LOG wins when set; otherwise -v/-q decide.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("lrvault={level},warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
