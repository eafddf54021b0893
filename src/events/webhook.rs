//! The webhook sink: one HTTPS POST per event (http only to loopback, the config's URL rule),
//! signed with `X-Lrvault-Signature: sha256=<hex HMAC-SHA256 of the body>`, the key read from
//! `events.webhook_secret_file` under the secret rules at every request (a rotated key needs
//! no restart). No redirects are followed; error text never carries the URL.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::{ExposeSecret, Secret, Webhook, load_secret_file};

/// The header a receiver checks (docs/operations.md §16).
pub const SIGNATURE_HEADER: &str = "X-Lrvault-Signature";
/// One request, connection included.
const TIMEOUT: Duration = Duration::from_secs(30);

/// `sha256=<lowercase hex HMAC-SHA256 of body under key>`.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The configured webhook and its HTTP client.
pub struct WebhookSink {
    cfg: Webhook,
    http: reqwest::Client,
}

impl WebhookSink {
    pub fn new(cfg: Webhook) -> Result<WebhookSink, reqwest::Error> {
        let http = crate::http::client_builder()
            .timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("lrvault/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(WebhookSink { cfg, http })
    }

    /// The HMAC key: the secret file's contents less one final newline (one line naming the
    /// file when it cannot be used).
    pub fn key(&self) -> Result<Secret, String> {
        load_secret_file(
            "events.webhook_secret_file",
            &self.cfg.secret_configured,
            &self.cfg.secret_path,
        )
    }

    /// POSTs one event; a 2xx answer is delivery, anything else is an error (one line).
    pub async fn send(&self, body: Vec<u8>) -> Result<(), String> {
        let key = self.key()?;
        let signature = signature(key.expose_secret().as_bytes(), &body);
        let answer = self
            .http
            .post(self.cfg.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await
            .map_err(|e| format!("webhook request failed: {}", crate::http::redact_reqwest(e)))?;
        let status = answer.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("webhook answered HTTP {}", status.as_u16()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_rfc_4231_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
