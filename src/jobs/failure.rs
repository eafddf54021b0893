//! Why something did not work, and who pays for it (docs/operations.md §2, "failure scope"). Every
//! failure of discovery and of the archive path is classified here, once:
//!
//! - **result** scope: belongs to this one result (a bad body, an MD5 or length mismatch, a
//!   403 on its blob, a 404/400 on its link) and spends one of its attempts;
//! - **tenant** scope: the tenant's side is down or refuses us (token endpoint or API 5xx,
//!   timeouts, transport errors, 401 after a refresh, refused credentials): the tenant's pass
//!   stops, the result in hand goes back uncharged, and the tenant's breaker opens;
//! - **process** scope: this host (a full evidence store, the database, a shutdown) or the
//!   object store behind it (unreachable, 5xx after retries, refusing our credentials):
//!   nothing is charged; a store failure also pauses the archive passes
//!   (`Context::store_breaker`).
//!
//! Publishing a package into an object store adds two result-scope failures: the store
//! holds a different object under the package's key (`Conflict`: refused for good, the spool
//! copy is set aside), and a spool copy that changed after its check (`Changed`: retried).

use std::time::Duration;

use serde_json::json;

use crate::config::DownloadConfig;
use crate::fetch::FetchError;
use crate::mde::MdeError;
use crate::package::PackageError;
use crate::queue::Settlement;
use crate::store::StoreError;

/// How long after an investigation package action's last update a 404 from getPackageUri
/// still means "not ready yet" (design.md §4); after that the package is `unavailable`.
pub const PACKAGE_READY_WITHIN: chrono::TimeDelta = chrono::TimeDelta::hours(24);

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
    /// Not there yet (an investigation package still being collected): no attempt spent;
    /// retried after a quarter of the time since the action's last update (`waited`), within
    /// `retry_base` ..= `retry_max`, so a package that stays unready costs few calls of its
    /// 120/h budget.
    NotReady { reason: String, waited: Duration },
}

/// A failure that says the tenant's side is down or refuses us.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantFailure {
    pub kind: TenantTrouble,
    pub reason: String,
}

/// What is wrong on the tenant's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantTrouble {
    /// The API, the token endpoint or the blob host is down, overloaded or unreachable.
    Outage,
    /// Our credentials or permissions are refused: the operator's to fix.
    Refused,
}

impl TenantTrouble {
    pub fn as_str(self) -> &'static str {
        match self {
            TenantTrouble::Outage => "outage",
            TenantTrouble::Refused => "refused",
        }
    }
}

/// A failure of this host.
#[derive(Debug, Clone, PartialEq)]
pub enum ProcessFailure {
    /// The evidence store ran out of space.
    StoreFull { reason: String },
    /// The database could not record the attempt (busy, locked, read-only).
    Database { reason: String },
    /// The object store did not take or give a package (unreachable, 5xx after its retries,
    /// refusing our credentials): the package waits in the spool.
    Store { reason: String },
    /// The process is shutting down.
    Stopping,
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

    fn tenant(kind: TenantTrouble, reason: String) -> Failure {
        Failure::Tenant(TenantFailure { kind, reason })
    }

    /// The one-line reason, as stored in `results.last_error`.
    pub fn reason(&self) -> &str {
        match self {
            Failure::Result(
                ResultFailure::Unavailable { reason, .. }
                | ResultFailure::Refused { reason }
                | ResultFailure::Retry { reason }
                | ResultFailure::NotReady { reason, .. },
            )
            | Failure::Tenant(TenantFailure { reason, .. })
            | Failure::Process(
                ProcessFailure::StoreFull { reason }
                | ProcessFailure::Database { reason }
                | ProcessFailure::Store { reason },
            ) => reason,
            Failure::Process(ProcessFailure::Stopping) => "stopped before the download finished",
        }
    }

    /// An API error on a tenant-wide call (token, List, Get): it is never one result's fault.
    pub fn from_api(e: MdeError) -> Failure {
        match api_trouble(&e) {
            Some(kind) => Failure::tenant(kind, e.to_string()),
            None => Failure::Process(ProcessFailure::Database {
                reason: e.to_string(),
            }),
        }
    }

    /// An API error of one result's link call.
    pub fn from_link(e: MdeError) -> Failure {
        match &e {
            MdeError::Http {
                status: 400 | 404,
                code,
                ..
            } => Failure::Result(ResultFailure::Unavailable {
                http_status: e.http_status(),
                code: (!code.is_empty()).then(|| code.clone()),
                reason: e.to_string(),
            }),
            // Another 4xx, or an answer without a link, is about this call.
            MdeError::Http { status, .. }
                if *status < 500 && !matches!(status, 401 | 403 | 408 | 429) =>
            {
                Failure::retry(e.to_string())
            }
            MdeError::Decode { .. } | MdeError::TooLarge { .. } => Failure::retry(e.to_string()),
            _ => Failure::from_api(e),
        }
    }

    /// An API error of an investigation package's getPackageUri call. A 404 means the
    /// package is not ready yet: retried without spending an attempt until
    /// [`PACKAGE_READY_WITHIN`] after the action's last update (`last_update`, else its
    /// creation), `unavailable` after that; other errors as for any link call. An action with
    /// neither time gets no grace: its wait could never be judged, so it would never end.
    pub fn from_package_link(
        e: MdeError,
        last_update: Option<chrono::DateTime<chrono::Utc>>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Failure {
        let waited = last_update.map_or(PACKAGE_READY_WITHIN, |t| now - t);
        match &e {
            MdeError::Http { status: 404, .. } if waited < PACKAGE_READY_WITHIN => {
                Failure::Result(ResultFailure::NotReady {
                    reason: format!("investigation package not ready yet ({e})"),
                    waited: waited.to_std().unwrap_or_default(),
                })
            }
            _ => Failure::from_link(e),
        }
    }

    /// A failure of the blob host that is not a refused or expired link (those are re-issued).
    pub fn from_blob(e: FetchError) -> Failure {
        match e {
            // No connection at all: the blob host is down for every result of the tenant.
            FetchError::Unreachable { .. } => Failure::tenant(TenantTrouble::Outage, e.to_string()),
            FetchError::Redirect { status, location } => Failure::refused(format!(
                "blob host redirected (HTTP {status}) to {location}"
            )),
            _ => Failure::retry(e.to_string()),
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

    /// A failure of the evidence store while publishing or reading a package back.
    pub fn from_store(e: &StoreError) -> Failure {
        let text = error_text(e);
        match e {
            StoreError::Conflict { .. } | StoreError::InvalidKey { .. } => Failure::refused(text),
            StoreError::Changed { .. } => Failure::retry(text),
            StoreError::Io { source, .. } if crate::package::io_error_is_disk_full(source) => {
                Failure::Process(ProcessFailure::StoreFull {
                    reason: format!("the spool is full: {text}"),
                })
            }
            StoreError::Io { .. } => Failure::retry(text),
            StoreError::Refused(_)
            | StoreError::Object { .. }
            | StoreError::Worm { .. }
            | StoreError::Hold { .. } => Failure::Process(ProcessFailure::Store {
                reason: format!("evidence store: {text}"),
            }),
        }
    }

    /// The database could not record a step of the attempt.
    pub fn database(e: impl std::fmt::Display) -> Failure {
        Failure::Process(ProcessFailure::Database {
            reason: e.to_string(),
        })
    }

    /// Who pays, as the ATTEMPT_FAILED row says it: `result`, `tenant` or `process`.
    pub fn scope(&self) -> &'static str {
        match self {
            Failure::Result(_) => "result",
            Failure::Tenant(_) => "tenant",
            Failure::Process(_) => "process",
        }
    }

    /// How the queue records this failure for a result that had spent `attempts` before.
    pub fn settlement(&self, attempts: u32, cfg: &DownloadConfig) -> Settlement {
        let reason = self.reason().to_string();
        let scope = self.scope();
        let uncharged = |backoff| Settlement::Retry {
            reason: reason.clone(),
            backoff,
            charge: false,
            scope,
        };
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
            Failure::Result(ResultFailure::NotReady { waited, .. }) => Settlement::Retry {
                backoff: (*waited / 4).clamp(cfg.retry_base, cfg.retry_max.max(cfg.retry_base)),
                reason,
                charge: false,
                scope,
            },
            Failure::Result(ResultFailure::Retry { .. }) => Settlement::Retry {
                backoff: backoff(attempts + 1, cfg.retry_base, cfg.retry_max),
                reason,
                charge: true,
                scope,
            },
            // Not the result's fault: back to the queue as it was; the breaker paces retries.
            Failure::Tenant(_) | Failure::Process(ProcessFailure::Stopping) => {
                uncharged(Duration::ZERO)
            }
            // This host's trouble: wait at the base delay, spend nothing.
            Failure::Process(_) => uncharged(cfg.retry_base),
        }
    }
}

/// The tenant-side trouble an API error shows, or None when it is our own database's.
fn api_trouble(e: &MdeError) -> Option<TenantTrouble> {
    Some(match e {
        MdeError::TokenRefused { .. } | MdeError::Secret(_) => TenantTrouble::Refused,
        // 401 after a refresh, 403: the app's permissions are refused.
        MdeError::Http {
            status: 401 | 403, ..
        } => TenantTrouble::Refused,
        MdeError::Ledger(_) => return None,
        _ => TenantTrouble::Outage,
    })
}

/// The error with its sources on one line (the OS error is what tells "disk full" apart).
fn package_error_text(e: &PackageError) -> String {
    error_text(e)
}

/// An error and its sources on one line, each source once.
fn error_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
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

    fn http(status: u16) -> MdeError {
        MdeError::Http {
            endpoint: "liveresponse.link",
            status,
            code: String::new(),
            message: String::new(),
        }
    }

    #[test]
    fn classification_follows_the_design() {
        let scope = |f: Failure| match f {
            Failure::Result(_) => "result",
            Failure::Tenant(_) => "tenant",
            Failure::Process(_) => "process",
        };
        // The link call: 404/400 and other 4xx belong to the result; 5xx, 401, 403 and the
        // transport to the tenant.
        for (status, want) in [(404, "result"), (400, "result"), (409, "result")] {
            assert_eq!(scope(Failure::from_link(http(status))), want, "{status}");
        }
        for status in [500, 503, 401, 403, 408, 429] {
            assert_eq!(
                scope(Failure::from_link(http(status))),
                "tenant",
                "{status}"
            );
        }
        let down = MdeError::Transport {
            endpoint: "token",
            message: "connection refused".into(),
            timeout: false,
        };
        assert_eq!(scope(Failure::from_link(down)), "tenant");
        let outage = MdeError::TokenUnavailable {
            status: 503,
            error: "temporarily_unavailable".into(),
        };
        let text = outage.to_string();
        assert!(!text.contains("secret"), "{text}");
        assert_eq!(
            Failure::from_api(outage),
            Failure::Tenant(TenantFailure {
                kind: TenantTrouble::Outage,
                reason: text
            })
        );
        let refused = MdeError::TokenRefused {
            status: 401,
            error: "invalid_client".into(),
            codes: vec![7000215],
            credential: "tenant_id, client_id and the client secret (client_secret_file /s)".into(),
        };
        assert!(matches!(
            Failure::from_api(refused),
            Failure::Tenant(TenantFailure {
                kind: TenantTrouble::Refused,
                ..
            })
        ));
        // The blob host: no connection at all is the tenant's outage; anything else the result's.
        let unreachable = FetchError::Unreachable {
            message: "connection refused".into(),
        };
        assert_eq!(scope(Failure::from_blob(unreachable)), "tenant");
        let busy = FetchError::Http {
            status: 503,
            code: "ServerBusy".into(),
        };
        assert_eq!(scope(Failure::from_blob(busy)), "result");
    }

    #[test]
    fn store_failures_are_the_processs_but_a_conflict_or_a_changed_copy_the_results() {
        use std::path::PathBuf;
        let conflict = StoreError::Conflict {
            location: "s3://b/k".into(),
            reason: "SHA-256 ab".into(),
        };
        assert_eq!(
            Failure::from_store(&conflict),
            Failure::refused(
                "s3://b/k already holds a different object (SHA-256 ab); refusing to publish over it"
            )
        );
        let changed = StoreError::Changed {
            path: PathBuf::from("/spool/k"),
            reason: "3 bytes".into(),
        };
        assert!(matches!(
            Failure::from_store(&changed),
            Failure::Result(ResultFailure::Retry { .. })
        ));
        let down = StoreError::Object {
            op: "uploading",
            location: "s3://b/k".into(),
            source: object_store::Error::Generic {
                store: "S3",
                source: "connection refused".into(),
            },
        };
        let f = Failure::from_store(&down);
        assert!(
            matches!(&f, Failure::Process(ProcessFailure::Store { reason }) if reason.starts_with("evidence store: uploading s3://b/k: ")),
            "{f:?}"
        );
        let refused = StoreError::Refused(crate::error::UserError::new("no credentials"));
        assert!(matches!(
            Failure::from_store(&refused),
            Failure::Process(ProcessFailure::Store { .. })
        ));
        let full = StoreError::Io {
            path: PathBuf::from("/spool/_tmp"),
            op: "writing",
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        };
        assert!(matches!(
            Failure::from_store(&full),
            Failure::Process(ProcessFailure::StoreFull { .. })
        ));
        // None of the process ones is charged.
        let cfg = DownloadConfig::default();
        for f in [Failure::from_store(&down), Failure::from_store(&full)] {
            assert!(matches!(
                f.settlement(0, &cfg),
                Settlement::Retry { charge: false, .. }
            ));
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
        assert!(!charged(&Failure::tenant(
            TenantTrouble::Outage,
            "x".into()
        )));
        assert!(!charged(&Failure::Process(ProcessFailure::StoreFull {
            reason: "x".into()
        })));
        assert!(!charged(&Failure::Process(ProcessFailure::Stopping)));
        assert!(!charged(&Failure::database("locked")));
        // Each retry names who pays, for its ATTEMPT_FAILED row.
        let scope = |f: &Failure| match f.settlement(0, &cfg) {
            Settlement::Retry { scope, .. } => scope,
            other => panic!("{other:?}"),
        };
        assert_eq!(scope(&Failure::retry("x")), "result");
        assert_eq!(
            scope(&Failure::tenant(TenantTrouble::Outage, "x".into())),
            "tenant"
        );
        assert_eq!(
            scope(&Failure::Process(ProcessFailure::Stopping)),
            "process"
        );
        // The last attempt of a retryable failure ends in `failed`.
        assert_eq!(
            Failure::retry("x").settlement(cfg.max_attempts - 1, &cfg),
            Settlement::Failed { reason: "x".into() }
        );
    }

    #[test]
    fn a_package_not_ready_is_retried_uncharged_for_a_day_then_unavailable() {
        let cfg = crate::config::DownloadConfig::default();
        let now = chrono::Utc::now();
        let not_found = || MdeError::Http {
            endpoint: "machineactions.packageuri",
            status: 404,
            code: "ResourceNotFound".into(),
            message: String::new(),
        };
        let fresh =
            Failure::from_package_link(not_found(), Some(now - chrono::TimeDelta::hours(2)), now);
        let Settlement::Retry {
            charge,
            backoff,
            scope,
            ..
        } = fresh.settlement(3, &cfg)
        else {
            panic!("{fresh:?}");
        };
        assert_eq!((charge, scope), (false, "result"));
        // A quarter of the two hours, capped at retry_max (30 min).
        assert_eq!(backoff, cfg.retry_max.min(Duration::from_secs(1800)));
        let just_done = Failure::from_package_link(not_found(), Some(now), now);
        let Settlement::Retry { backoff, .. } = just_done.settlement(0, &cfg) else {
            panic!("{just_done:?}");
        };
        assert_eq!(backoff, cfg.retry_base);
        let old =
            Failure::from_package_link(not_found(), Some(now - chrono::TimeDelta::hours(25)), now);
        assert!(
            matches!(old.settlement(0, &cfg), Settlement::Unavailable { .. }),
            "{old:?}"
        );
        // No time to judge the wait by: no grace, or the 404s would be retried for ever.
        let timeless = Failure::from_package_link(not_found(), None, now);
        assert!(
            matches!(timeless.settlement(0, &cfg), Settlement::Unavailable { .. }),
            "{timeless:?}"
        );
        // Other errors are those of any link call.
        let busy = MdeError::Http {
            endpoint: "machineactions.packageuri",
            status: 503,
            code: String::new(),
            message: String::new(),
        };
        assert_eq!(
            Failure::from_package_link(busy, Some(now), now).scope(),
            "tenant"
        );
    }
}
