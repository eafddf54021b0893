//! Why an attempt did not archive, and who pays for it (DESIGN §4, "failure scope"). Every
//! failure of the archive path is classified here, once:
//!
//! - **result** scope: belongs to this one result (a bad body, an MD5 or length mismatch, a
//!   403 on its blob, a 404/400 on its link) and spends one of its attempts;
//! - **tenant** scope: the tenant's side is down or refuses us (token endpoint or API 5xx,
//!   timeouts, transport errors; refused credentials): the tenant's pass stops, the result
//!   goes back uncharged;
//! - **process** scope: this host (a full evidence store, the database, a shutdown): the pass
//!   pauses, nothing is charged.

use std::time::Duration;

use serde_json::json;

use crate::config::DownloadConfig;
use crate::mde::MdeError;
use crate::package::PackageError;
use crate::queue::Settlement;

/// Why an attempt did not archive.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    Result(ResultFailure),
    Tenant(TenantFailure),
    Process(ProcessFailure),
}

/// A failure that belongs to one result.
#[derive(Debug, Clone, PartialEq)]
pub enum ResultFailure {
    /// The API has no result (404/400 on the link call): terminal `unavailable`.
    Unavailable {
        reason: String,
        http_status: Option<u16>,
        code: Option<String>,
    },
    /// Refused for good (a link outside the allowlist, a redirect): `failed` at once.
    Refused { reason: String },
    /// May work later: backoff, then `failed` after `max_attempts`.
    Retry { reason: String },
}

/// A failure that says the tenant's side is down or refuses us.
#[derive(Debug, Clone, PartialEq)]
pub enum TenantFailure {
    /// The token request was refused: the operator's to fix.
    Credentials { reason: String },
}

/// A failure of this host.
#[derive(Debug, Clone, PartialEq)]
pub enum ProcessFailure {
    /// The evidence store ran out of space.
    StoreFull { reason: String },
}

impl Failure {
    /// A result-scope failure that may work on a later attempt.
    pub fn retry(reason: impl Into<String>) -> Failure {
        Failure::Result(ResultFailure::Retry {
            reason: reason.into(),
        })
    }

    /// A result refused for good.
    pub fn refused(reason: impl Into<String>) -> Failure {
        Failure::Result(ResultFailure::Refused {
            reason: reason.into(),
        })
    }

    /// The one-line reason, as stored in `results.last_error`.
    pub fn reason(&self) -> &str {
        match self {
            Failure::Result(
                ResultFailure::Unavailable { reason, .. }
                | ResultFailure::Refused { reason }
                | ResultFailure::Retry { reason },
            )
            | Failure::Tenant(TenantFailure::Credentials { reason })
            | Failure::Process(ProcessFailure::StoreFull { reason }) => reason,
        }
    }

    /// An API error of the link call.
    pub fn from_link(e: MdeError) -> Failure {
        if matches!(e, MdeError::Token { .. }) && !e.is_retryable() {
            Failure::Tenant(TenantFailure::Credentials {
                reason: e.to_string(),
            })
        } else if e.is_no_result() {
            Failure::Result(ResultFailure::Unavailable {
                reason: e.to_string(),
                http_status: e.http_status(),
                code: e.api_code().map(str::to_string),
            })
        } else {
            Failure::retry(e.to_string())
        }
    }

    /// A package that could not be written, finished or checked; a full store is told apart.
    pub fn from_package(e: &PackageError) -> Failure {
        let text = package_error_text(e);
        if e.is_disk_full() {
            Failure::Process(ProcessFailure::StoreFull {
                reason: format!("evidence store is full: {text}"),
            })
        } else {
            Failure::retry(text)
        }
    }

    /// How the queue records this failure for a result that had spent `attempts` before.
    pub fn settlement(&self, attempts: u32, cfg: &DownloadConfig) -> Settlement {
        let reason = self.reason().to_string();
        match self {
            Failure::Result(ResultFailure::Unavailable {
                http_status, code, ..
            }) => Settlement::Unavailable {
                detail: json!({ "reason": reason, "http_status": http_status, "error_code": code }),
                reason,
            },
            Failure::Result(ResultFailure::Refused { .. }) => Settlement::Failed { reason },
            Failure::Result(ResultFailure::Retry { .. }) if attempts + 1 >= cfg.max_attempts => {
                Settlement::Failed { reason }
            }
            Failure::Result(ResultFailure::Retry { .. }) => Settlement::Retry {
                reason,
                backoff: backoff(attempts + 1, cfg.retry_base, cfg.retry_max),
                charge: true,
            },
            // Not the result's fault: back to the queue as it was.
            Failure::Tenant(_) => Settlement::Retry {
                reason,
                backoff: Duration::ZERO,
                charge: false,
            },
            // Waits at the base delay without spending the result's attempts.
            Failure::Process(ProcessFailure::StoreFull { .. }) => Settlement::Retry {
                reason,
                backoff: cfg.retry_base,
                charge: false,
            },
        }
    }
}

/// The error with its sources on one line (the OS error is what tells "disk full" apart).
fn package_error_text(e: &PackageError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        source = s.source();
    }
    text
}

/// `base · 2^(attempt-1)`, capped at `max`, with jitter in [50%, 100%].
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    use rand::Rng;
    let exp = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max);
    let factor: f64 = rand::rng().random_range(0.5..=1.0);
    exp.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let (b, m) = (Duration::from_secs(30), Duration::from_secs(1800));
        for _ in 0..50 {
            let d1 = backoff(1, b, m);
            assert!(d1 >= Duration::from_secs(15) && d1 <= Duration::from_secs(30));
            let d3 = backoff(3, b, m);
            assert!(d3 >= Duration::from_secs(60) && d3 <= Duration::from_secs(120));
            let d30 = backoff(30, b, m);
            assert!(d30 >= Duration::from_secs(900) && d30 <= m);
        }
    }

    #[test]
    fn only_result_failures_are_charged() {
        let cfg = DownloadConfig::default();
        let charged = |f: &Failure| match f.settlement(0, &cfg) {
            Settlement::Retry { charge, .. } => charge,
            _ => true,
        };
        assert!(charged(&Failure::retry("x")));
        assert!(charged(&Failure::refused("x")));
        assert!(!charged(&Failure::Tenant(TenantFailure::Credentials {
            reason: "x".into()
        })));
        assert!(!charged(&Failure::Process(ProcessFailure::StoreFull {
            reason: "x".into()
        })));
        // The last attempt of a retryable failure ends in `failed`.
        assert_eq!(
            Failure::retry("x").settlement(cfg.max_attempts - 1, &cfg),
            Settlement::Failed { reason: "x".into() }
        );
    }
}
