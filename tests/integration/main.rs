//! One integration-test binary: every test boots the real pipeline (or the real binary)
//! against the built-in simulator on 127.0.0.1:0 and checks exact outcomes.

mod backup_restore;
mod cli;
mod common;
mod crash;
mod custody_chain;
mod daemon;
mod faults;
mod operations_doc;
mod pipeline;
mod quota;
mod start_checks;
mod unattended;
