//! Small HTTP helpers shared by the API client (`mde`) and the blob downloader (`fetch`):
//! error text that never carries a URL (SAS signatures live in query strings), header
//! access, and the suffixes that put an error code after an HTTP status.

use reqwest::header::HeaderMap;

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
