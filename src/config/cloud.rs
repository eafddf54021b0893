//! `cloud`: which Microsoft cloud a tenant lives in, and the four host values each one
//! implies (`login_base`, `api_base`, `scope`, `download_hosts`), so an operator of a US
//! government tenant names the cloud instead of knowing the hosts by heart
//! (docs/operations.md, "Government clouds"). A key written in the tenant overrides its preset.

use std::fmt;

/// A Microsoft cloud with its own sign-in, API and blob hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cloud {
    /// The worldwide cloud.
    #[default]
    Commercial,
    /// US Government Community Cloud: commercial sign-in, a government API host.
    Gcc,
    /// US Government Community Cloud High.
    GccHigh,
    /// US Department of Defense.
    Dod,
}

/// The values a cloud gives the keys a tenant leaves out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preset {
    pub login_base: &'static str,
    pub api_base: &'static str,
    pub scope: &'static str,
    pub download_hosts: &'static [&'static str],
}

/// Result blobs, and the investigation packages' `safedownload` host (reference: MDE's
/// `getPackageUri`, e.g. `userrequests-us.securitycenter.windows.com`).
const COMMERCIAL_BLOBS: &[&str] = &["*.blob.core.windows.net", "*.securitycenter.windows.com"];
/// Microsoft documents no government package host; the government clouds' Defender domains
/// (`securitycenter.microsoft.us` serves their API, `securitycenter.windows.us` mirrors the
/// commercial package host) are allowed, and an operator can narrow `download_hosts`.
const GOVERNMENT_BLOBS: &[&str] = &[
    "*.blob.core.usgovcloudapi.net",
    "*.securitycenter.windows.us",
    "*.securitycenter.microsoft.us",
];

impl Cloud {
    pub const ALL: [Cloud; 4] = [Cloud::Commercial, Cloud::Gcc, Cloud::GccHigh, Cloud::Dod];

    /// The name written in the config file and shown by `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Cloud::Commercial => "commercial",
            Cloud::Gcc => "gcc",
            Cloud::GccHigh => "gcc-high",
            Cloud::Dod => "dod",
        }
    }

    /// The cloud named `text`; an unknown name is refused with the allowed ones.
    pub fn parse(text: &str) -> Result<Cloud, String> {
        Cloud::ALL
            .into_iter()
            .find(|c| c.as_str() == text)
            .ok_or_else(|| {
                let allowed: Vec<&str> = Cloud::ALL.iter().map(|c| c.as_str()).collect();
                format!("cloud '{text}' is not one of {}", allowed.join(", "))
            })
    }

    /// The hosts Microsoft documents for this cloud.
    pub fn preset(self) -> Preset {
        match self {
            Cloud::Commercial => Preset {
                login_base: "https://login.microsoftonline.com",
                api_base: "https://api.security.microsoft.com",
                scope: "https://api.securitycenter.microsoft.com/.default",
                download_hosts: COMMERCIAL_BLOBS,
            },
            Cloud::Gcc => Preset {
                login_base: "https://login.microsoftonline.com",
                api_base: "https://api-gcc.securitycenter.microsoft.us",
                scope: "https://api-gcc.securitycenter.microsoft.us/.default",
                download_hosts: GOVERNMENT_BLOBS,
            },
            Cloud::GccHigh | Cloud::Dod => Preset {
                login_base: "https://login.microsoftonline.us",
                api_base: "https://api-gov.securitycenter.microsoft.us",
                scope: "https://api-gov.securitycenter.microsoft.us/.default",
                download_hosts: GOVERNMENT_BLOBS,
            },
        }
    }
}

impl fmt::Display for Cloud {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
