//! Publishes one spooled file to the configured store exactly as the archive path publishes
//! a package (`Store::publish`), and prints where it went. `bench/store_rss.sh` runs it under
//! `/usr/bin/time -v` to measure the peak memory of a large multipart upload.
//!
//! Usage: store_upload CONFIG KEY SHA256   (the file is `{store.spool}/{KEY}`)

use std::path::Path;

use lrvault::config::{Config, Credentials};
use lrvault::store::{Expected, Store};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, key, sha256] = args.as_slice() else {
        anyhow::bail!("usage: store_upload CONFIG KEY SHA256");
    };
    // A main of its own: it reads the credentials directory as lrvault's main does.
    let credentials = Credentials::new(std::env::var_os("CREDENTIALS_DIRECTORY").map(Into::into));
    let cfg = Config::load(Path::new(config), credentials)?;
    let store = Store::open(&cfg.store, &cfg.credentials)?;
    let size = std::fs::metadata(store.staging_path(key)?)?.len();
    let expected = Expected {
        sha256: sha256.clone(),
        size,
    };
    let stored = store.publish(key, &expected).await?;
    println!(
        "{} version_id={} etag={} bytes={}",
        stored.location,
        stored.version_id.as_deref().unwrap_or("-"),
        stored.etag.as_deref().unwrap_or("-"),
        stored.size
    );
    Ok(())
}
