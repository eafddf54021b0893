//! One integration-test binary: every test boots the real pipeline (or the real binary)
//! against the built-in simulator on 127.0.0.1:0 and checks exact outcomes; the store tests
//! also start moto's S3 server and Azurite on loopback ports.

mod anchors;
mod attempts;
mod audit_doc;
mod auth_methods;
mod backup_restore;
mod cases;
mod cli;
mod clouds;
mod common;
mod crash;
mod custody_chain;
mod daemon;
mod doc_steps;
mod events;
mod evidence_doc;
mod export;
mod faults;
mod forgery;
mod insider;
mod investigation;
mod kit_readme;
mod laundering;
mod layouts;
mod local_tsa;
mod metrics;
mod object_stores;
mod operations_doc;
mod package_deb;
mod pipeline;
mod planted;
mod proxies;
mod quota;
mod start_checks;
mod store_azure;
mod store_pipeline;
mod store_s3;
mod tamper;
mod tenants;
mod unattended;
mod upgrade;
mod witness;
