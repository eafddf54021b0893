//! Fault switches for the simulator (`--fault NAME[=N]`): each one makes a deterministic part
//! of the traffic misbehave the way the real MDE API or blob host can, so the archiver's error
//! paths can be exercised on demand.

use std::fmt;
use std::str::FromStr;

/// One `--fault` switch. Counted faults (`=N`) hit the first N matching requests or commands;
/// without `=N` they default to 1. Request counts are global to the simulator (all tenants);
/// command counts (`gone`, `foreign-host`, `http-link`) apply to each tenant's result-bearing
/// commands in (creation time, index) order, and `gone` wins where they overlap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `link-5xx=N`: the first N link requests (after any `429` ones) answer 500.
    Link5xx(usize),
    /// `list-5xx=N`: the first N list requests answer 500.
    List5xx(usize),
    /// `blob-5xx=N`: the first N blob requests (after any `redirect` ones) answer 503 ServerBusy.
    Blob5xx(usize),
    /// `blob-403=N`: the first N blob requests (after any `redirect` and `blob-5xx` ones) answer
    /// 403 AuthenticationFailed, as for a link whose signature is refused.
    Blob403(usize),
    /// `429=N`: the first N link requests answer 429 with `Retry-After: 1`.
    TooManyRequests(usize),
    /// `unauthorized=N`: the first N API requests (List, Get, link) that carry a valid token
    /// revoke it and answer 401, as when a token is invalidated before its expiry.
    Unauthorized(usize),
    /// `slow=BYTES_PER_SEC`: blob bodies are throttled to this rate.
    Slow(u64),
    /// `truncate=N`: the first N blob bodies stop at half their Content-Length and the
    /// connection is closed.
    Truncate(usize),
    /// `bad-md5=N`: the first N blob responses that carry an MD5 header carry a wrong one.
    BadMd5(usize),
    /// `expired-links=N`: the first N issued links carry an `se` already in the past.
    ExpiredLinks(usize),
    /// `link-ttl=SECS`: overrides the link lifetime.
    LinkTtl(u64),
    /// `token-ttl=SECS`: overrides the token lifetime.
    TokenTtl(u64),
    /// `hostile-names`: GetFile paths become hostile file names.
    HostileNames,
    /// `foreign-host=N`: links of the first N result-bearing commands point to `https://evil.example.net`.
    ForeignHost(usize),
    /// `http-link=N`: links of the next N result-bearing commands point to `http://blob.example.net`.
    HttpLink(usize),
    /// `redirect=N`: the first N blob requests answer 302 to `https://evil.example.net/x`.
    Redirect(usize),
    /// `gone=N`: the first N result-bearing commands answer 404 ResourceNotFound on the link call.
    Gone(usize),
    /// `assertion-refused=N`: the first N certificate assertions are refused (401
    /// invalid_client, AADSTS700027), as for an expired or deleted certificate.
    AssertionRefused(usize),
    /// `federated-refused=N`: the first N federated assertions are refused (AADSTS700213).
    FederatedRefused(usize),
    /// `managed-identity-refused=N`: the first N managed-identity requests answer 400
    /// "Identity not found".
    ManagedIdentityRefused(usize),
    /// `package-404=N`: the first N getPackageUri requests answer 404, as while a package is
    /// still being collected ("not ready").
    Package404(usize),
    /// `package-5xx=N`: the next N getPackageUri requests answer 500.
    Package5xx(usize),
}

/// Every switch name, as accepted by `FromStr` and printed by `Display`.
pub const FAULT_NAMES: &str = "link-5xx=N, list-5xx=N, blob-5xx=N, blob-403=N, 429=N, \
     unauthorized=N, slow=BYTES_PER_SEC, truncate=N, bad-md5=N, expired-links=N, link-ttl=SECS, token-ttl=SECS, hostile-names, \
     foreign-host=N, http-link=N, redirect=N, gone=N, assertion-refused=N, federated-refused=N, \
     managed-identity-refused=N, package-404=N, package-5xx=N";

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Fault, String> {
        let (name, value) = match s.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (s.trim(), None),
        };
        let number = |default: Option<u64>| -> Result<u64, String> {
            match value {
                Some(v) => v.parse::<u64>().map_err(|_| {
                    format!("fault `{name}`: `{v}` is not a non-negative whole number")
                }),
                None => default.ok_or_else(|| format!("fault `{name}` needs a value: `{name}=N`")),
            }
        };
        let count = || number(Some(1)).map(|n| n as usize);
        let fault = match name {
            "link-5xx" => Fault::Link5xx(count()?),
            "list-5xx" => Fault::List5xx(count()?),
            "blob-5xx" => Fault::Blob5xx(count()?),
            "blob-403" => Fault::Blob403(count()?),
            "429" => Fault::TooManyRequests(count()?),
            "unauthorized" => Fault::Unauthorized(count()?),
            "slow" => match number(None)? {
                0 => return Err("fault `slow` needs a rate above 0 bytes per second".into()),
                n => Fault::Slow(n),
            },
            "truncate" => Fault::Truncate(count()?),
            "bad-md5" => Fault::BadMd5(count()?),
            "expired-links" => Fault::ExpiredLinks(count()?),
            "link-ttl" => Fault::LinkTtl(number(None)?),
            "token-ttl" => Fault::TokenTtl(number(None)?),
            "hostile-names" => match value {
                None => Fault::HostileNames,
                Some(_) => return Err("fault `hostile-names` takes no value".into()),
            },
            "foreign-host" => Fault::ForeignHost(count()?),
            "http-link" => Fault::HttpLink(count()?),
            "redirect" => Fault::Redirect(count()?),
            "gone" => Fault::Gone(count()?),
            "assertion-refused" => Fault::AssertionRefused(count()?),
            "federated-refused" => Fault::FederatedRefused(count()?),
            "managed-identity-refused" => Fault::ManagedIdentityRefused(count()?),
            "package-404" => Fault::Package404(count()?),
            "package-5xx" => Fault::Package5xx(count()?),
            other => {
                return Err(format!(
                    "unknown fault `{other}`; valid switches: {FAULT_NAMES}"
                ));
            }
        };
        Ok(fault)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Link5xx(n) => write!(f, "link-5xx={n}"),
            Fault::List5xx(n) => write!(f, "list-5xx={n}"),
            Fault::Blob5xx(n) => write!(f, "blob-5xx={n}"),
            Fault::Blob403(n) => write!(f, "blob-403={n}"),
            Fault::TooManyRequests(n) => write!(f, "429={n}"),
            Fault::Unauthorized(n) => write!(f, "unauthorized={n}"),
            Fault::Slow(n) => write!(f, "slow={n}"),
            Fault::Truncate(n) => write!(f, "truncate={n}"),
            Fault::BadMd5(n) => write!(f, "bad-md5={n}"),
            Fault::ExpiredLinks(n) => write!(f, "expired-links={n}"),
            Fault::LinkTtl(n) => write!(f, "link-ttl={n}"),
            Fault::TokenTtl(n) => write!(f, "token-ttl={n}"),
            Fault::HostileNames => write!(f, "hostile-names"),
            Fault::ForeignHost(n) => write!(f, "foreign-host={n}"),
            Fault::HttpLink(n) => write!(f, "http-link={n}"),
            Fault::Redirect(n) => write!(f, "redirect={n}"),
            Fault::Gone(n) => write!(f, "gone={n}"),
            Fault::AssertionRefused(n) => write!(f, "assertion-refused={n}"),
            Fault::FederatedRefused(n) => write!(f, "federated-refused={n}"),
            Fault::ManagedIdentityRefused(n) => write!(f, "managed-identity-refused={n}"),
            Fault::Package404(n) => write!(f, "package-404={n}"),
            Fault::Package5xx(n) => write!(f, "package-5xx={n}"),
        }
    }
}

/// The faults folded into one plan (a later switch of the same kind wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FaultPlan {
    pub link_5xx: usize,
    pub list_5xx: usize,
    pub blob_5xx: usize,
    pub blob_403: usize,
    pub too_many: usize,
    pub unauthorized: usize,
    pub slow: Option<u64>,
    pub truncate: usize,
    pub bad_md5: usize,
    pub expired_links: usize,
    pub link_ttl: Option<u64>,
    pub token_ttl: Option<u64>,
    pub hostile_names: bool,
    pub foreign_host: usize,
    pub http_link: usize,
    pub redirect: usize,
    pub gone: usize,
    pub assertion_refused: usize,
    pub federated_refused: usize,
    pub managed_identity_refused: usize,
    pub package_404: usize,
    pub package_5xx: usize,
}

impl FaultPlan {
    pub fn new(faults: &[Fault]) -> FaultPlan {
        let mut plan = FaultPlan::default();
        for fault in faults {
            match *fault {
                Fault::Link5xx(n) => plan.link_5xx = n,
                Fault::List5xx(n) => plan.list_5xx = n,
                Fault::Blob5xx(n) => plan.blob_5xx = n,
                Fault::Blob403(n) => plan.blob_403 = n,
                Fault::TooManyRequests(n) => plan.too_many = n,
                Fault::Unauthorized(n) => plan.unauthorized = n,
                Fault::Slow(n) => plan.slow = Some(n),
                Fault::Truncate(n) => plan.truncate = n,
                Fault::BadMd5(n) => plan.bad_md5 = n,
                Fault::ExpiredLinks(n) => plan.expired_links = n,
                Fault::LinkTtl(n) => plan.link_ttl = Some(n),
                Fault::TokenTtl(n) => plan.token_ttl = Some(n),
                Fault::HostileNames => plan.hostile_names = true,
                Fault::ForeignHost(n) => plan.foreign_host = n,
                Fault::HttpLink(n) => plan.http_link = n,
                Fault::Redirect(n) => plan.redirect = n,
                Fault::Gone(n) => plan.gone = n,
                Fault::AssertionRefused(n) => plan.assertion_refused = n,
                Fault::FederatedRefused(n) => plan.federated_refused = n,
                Fault::ManagedIdentityRefused(n) => plan.managed_identity_refused = n,
                Fault::Package404(n) => plan.package_404 = n,
                Fault::Package5xx(n) => plan.package_5xx = n,
            }
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_switch_round_trips_through_display() {
        let all = [
            "link-5xx=3",
            "list-5xx=1",
            "blob-5xx=2",
            "blob-403=3",
            "429=4",
            "unauthorized=1",
            "slow=1024",
            "truncate=1",
            "bad-md5=2",
            "expired-links=1",
            "link-ttl=5",
            "token-ttl=7",
            "hostile-names",
            "foreign-host=1",
            "http-link=2",
            "redirect=1",
            "gone=3",
            "assertion-refused=1",
            "federated-refused=2",
            "managed-identity-refused=3",
            "package-404=2",
            "package-5xx=1",
        ];
        for s in all {
            let fault: Fault = s.parse().unwrap();
            assert_eq!(fault.to_string(), s);
        }
    }

    #[test]
    fn counted_fault_defaults_to_one_and_bad_input_names_the_switches() {
        assert_eq!("gone".parse::<Fault>().unwrap(), Fault::Gone(1));
        assert_eq!("429".parse::<Fault>().unwrap(), Fault::TooManyRequests(1));
        let err = "explode=1".parse::<Fault>().unwrap_err();
        assert_eq!(
            err,
            format!("unknown fault `explode`; valid switches: {FAULT_NAMES}")
        );
        assert_eq!(
            "slow".parse::<Fault>().unwrap_err(),
            "fault `slow` needs a value: `slow=N`"
        );
        assert_eq!(
            "gone=x".parse::<Fault>().unwrap_err(),
            "fault `gone`: `x` is not a non-negative whole number"
        );
        assert_eq!(
            "hostile-names=2".parse::<Fault>().unwrap_err(),
            "fault `hostile-names` takes no value"
        );
    }

    #[test]
    fn plan_keeps_the_last_switch_of_a_kind() {
        let plan = FaultPlan::new(&[Fault::Gone(1), Fault::Gone(4), Fault::Slow(10)]);
        assert_eq!(plan.gone, 4);
        assert_eq!(plan.slow, Some(10));
        assert_eq!(plan.link_5xx, 0);
    }
}
