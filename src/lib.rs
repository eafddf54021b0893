//! lrvault: archives Microsoft Defender for Endpoint live-response results as hashed,
//! self-describing evidence packages with a hash-chained chain-of-custody log.
//!
//! The pipeline reads one way: `config` → `db` → `mde` (remote client) → `quota` → `fetch`
//! → `package` (BagIt zip) → `custody` → `jobs` (discover, archive) → `verify` → `daemon`;
//! plus `sim` (the simulator), `cli`, `status`, `audit` and `demo`.

pub mod anchor;
pub mod audit;
pub mod cells;
pub mod cli;
pub mod config;
pub mod custody;
pub mod daemon;
pub mod db;
pub mod demo;
pub mod error;
pub mod export;
pub mod fetch;
pub mod http;
pub mod jobs;
pub mod mde;
pub mod package;
pub mod progress;
pub mod quota;
pub mod render;
pub mod sim;
pub mod status;
pub mod time;
pub mod verify;
