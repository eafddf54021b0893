//! One integration-test binary: every test boots the real pipeline (or the real binary)
//! against the built-in simulator on 127.0.0.1:0 and checks exact outcomes.

mod anchors;
mod audit_doc;
mod cli;
mod common;
mod crash;
mod custody_chain;
mod daemon;
mod doc_steps;
mod evidence_doc;
mod export;
mod faults;
mod forgery;
mod local_tsa;
mod pipeline;
mod quota;
mod tamper;
mod upgrade;
