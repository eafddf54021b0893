//! Small HTTP helpers shared by the API client (`mde`) and the blob downloader (`fetch`):
//! the one TLS set-up of the process, error text that never carries a URL (SAS signatures
//! live in query strings), header access, and the suffixes that put an error code after an
//! HTTP status.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Once};

use chrono::{DateTime, Utc};
use reqwest::header::HeaderMap;

/// Makes *ring* the process's rustls crypto provider, once. Every HTTPS client of lrvault
/// (reqwest's, object_store's) runs on rustls over ring: one TLS stack, no C crypto library
/// (docs/architecture.md, module `http`). reqwest is built without a provider of its own and
/// panics if a client is built before this ran, so [`client_builder`] and the object-store
/// set-up call it; calling it again does nothing.
pub fn install_tls() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Err only when another provider was installed first (by an embedding program): that
        // one is kept, as rustls allows a single process-wide default.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A reqwest client builder on the process's TLS stack ([`install_tls`]).
pub fn client_builder() -> reqwest::ClientBuilder {
    install_tls();
    reqwest::Client::builder()
}

/// ` CODE` after an HTTP status in error messages, or nothing when there is no code.
pub fn code_suffix(code: &str) -> String {
    if code.is_empty() {
        String::new()
    } else {
        format!(" {code}")
    }
}

/// Display text of a reqwest error with its URL removed and its source chain inlined.
pub fn redact_reqwest(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        let part = s.to_string();
        if !msg.contains(&part) {
            msg += ": ";
            msg += &part;
        }
        src = s.source();
    }
    msg
}

/// A header's value as text, when present and visible ASCII.
pub fn header_str(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Why a capped body could not be read.
#[derive(Debug)]
pub enum BodyError {
    TooLarge,
    Transport(reqwest::Error),
}

/// Reads a response body of at most `cap` bytes, chunk by chunk: a longer one is refused
/// without being buffered (API answers are small; a huge one is a fault).
pub async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<bytes::Bytes, BodyError> {
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > cap {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The remote side's clock as seen from here: the offset of the servers' `Date` headers from
/// our clock, learned on every response. Link expiry (`se`) is judged by it, so a host whose
/// clock is off by an hour still uses its links. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct RemoteClock {
    /// Server time minus local time, in ms (zero until a `Date` header was seen).
    offset_ms: Arc<AtomicI64>,
}

impl RemoteClock {
    /// Learns the offset from a response's `Date` header (whole seconds, so the estimate is
    /// good to about a second).
    pub fn observe(&self, headers: &HeaderMap) {
        let Some(date) = header_str(headers, "date") else {
            return;
        };
        let Ok(server) = DateTime::parse_from_rfc2822(&date) else {
            return;
        };
        let offset = server.with_timezone(&Utc) - Utc::now();
        self.offset_ms
            .store(offset.num_milliseconds(), Ordering::Relaxed);
    }

    /// The offset learned so far (zero before any response).
    pub fn offset(&self) -> chrono::Duration {
        chrono::Duration::milliseconds(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Now, on the servers' clock.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.offset()
    }
}
