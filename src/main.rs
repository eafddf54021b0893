//! The `lrvault` binary: the process settings that must come before any thread starts, then
//! the library's [`lrvault::cli::main`]. Everything else lives in the library, so its code
//! is compiled once, there, and not again into this crate (docs/architecture.md).

use std::process::ExitCode;

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
    lrvault::cli::main()
}
