//! lrvault: archives Microsoft Defender for Endpoint live-response results as hashed,
//! self-describing evidence packages with a hash-chained chain-of-custody log.
//!
//! The pipeline reads one way: `access` (who may write where), `config` → `db` → `http`,
//! `mde` (remote client), `quota` → `fetch` → `package` (BagIt zip) → `store` (where
//! packages live: fs, S3, Azure) → `custody`, `anchor`, `cases` → `queue` (a result's life) → `jobs`
//! (discover, archive, backfill) → `verify`, `export`, `events` (off the host), `metrics` →
//! `daemon`; then the command layer:
//! `commands` (one module per command, with `render` and `progress`) and `cli`. The simulator is its
//! own crate (`lrvault-sim`, under `crates/`), used by `demo` and `simulate` behind the default
//! `simulator` feature and by the tests.
//! Arrows point one way: nothing below the command layer imports `commands` or `cli`.

pub mod access;
pub mod anchor;
pub mod cases;
pub mod cells;
pub mod cli;
pub mod commands;
pub mod config;
pub mod custody;
pub mod daemon;
pub mod db;
pub mod error;
pub mod events;
pub mod export;
pub mod fetch;
pub mod http;
pub mod jobs;
pub mod mde;
pub mod metrics;
pub mod package;
pub mod progress;
pub mod queue;
pub mod quota;
pub mod render;
pub mod store;
pub mod time;
pub mod verify;
