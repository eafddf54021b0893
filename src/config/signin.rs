//! `auth`: how a tenant signs in to Entra ID (docs/operations.md §1.10): a client secret, a
//! certificate, the host's managed identity, or a federated (workload identity) token; and
//! where each method's credential is read from. Every credential file is read again at each
//! token refresh, so a rotated one takes effect without a restart. A certificate's PEM is
//! read like a secret (a relative name is in `$CREDENTIALS_DIRECTORY`, a file every user can
//! read is refused); a federated token file is not checked for its mode, because Kubernetes
//! projects it readable by every user of the pod.

use std::fmt;
use std::path::PathBuf;

use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;
use secrecy::zeroize::Zeroizing;
use sha2::{Digest, Sha256};

use super::secret::{Credentials, Secret, SecretSource, read_secret_file};

/// The sign-in keys of one `[[tenant]]`, as written.
#[derive(Debug, Default)]
pub(super) struct SignInKeys {
    pub auth: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    pub client_secret_env: Option<String>,
    pub client_certificate_file: Option<PathBuf>,
    pub managed_identity_client_id: Option<String>,
    pub federated_token_file: Option<PathBuf>,
}

/// A credential file: as written in the config, and the file read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialFile {
    pub configured: PathBuf,
    /// `configured`, or `configured` in the credentials directory when it is relative.
    pub path: PathBuf,
}

impl CredentialFile {
    pub fn new(configured: PathBuf, credentials: &Credentials) -> CredentialFile {
        CredentialFile {
            path: credentials.resolve(&configured),
            configured,
        }
    }
}

/// How a tenant signs in (`auth`), with where its credential comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignIn {
    /// `auth = "secret"`: `client_secret_file` or `client_secret_env`.
    Secret(SecretSource),
    /// `auth = "certificate"`: `client_certificate_file`, a PEM private key and certificate.
    Certificate(CredentialFile),
    /// `auth = "managed-identity"`: system-assigned, or the user-assigned identity with this
    /// client id (`managed_identity_client_id`).
    ManagedIdentity { client_id: Option<String> },
    /// `auth = "workload-identity"`: `federated_token_file` (default
    /// `$AZURE_FEDERATED_TOKEN_FILE`).
    WorkloadIdentity(CredentialFile),
}

impl SignIn {
    /// The method the keys name, or the one-line reason they name none.
    pub(super) fn new(keys: SignInKeys, credentials: &Credentials) -> Result<SignIn, String> {
        let auth = keys.auth.as_deref().unwrap_or("secret");
        const METHODS: [&str; 4] = [
            "secret",
            "certificate",
            "managed-identity",
            "workload-identity",
        ];
        if !METHODS.contains(&auth) {
            return Err(format!(
                "unknown auth '{auth}' (secret | certificate | managed-identity | workload-identity)"
            ));
        }
        // Each method's own keys: a key of another method is refused, not ignored.
        let own_keys = [
            (
                "client_secret_file/client_secret_env",
                keys.client_secret_file.is_some() || keys.client_secret_env.is_some(),
            ),
            (
                "client_certificate_file",
                keys.client_certificate_file.is_some(),
            ),
            (
                "managed_identity_client_id",
                keys.managed_identity_client_id.is_some(),
            ),
            ("federated_token_file", keys.federated_token_file.is_some()),
        ];
        for (method, (key, set)) in METHODS.into_iter().zip(own_keys) {
            if set && method != auth {
                return Err(format!("{key} is for auth = \"{method}\", not \"{auth}\""));
            }
        }
        let file = |path: PathBuf| CredentialFile::new(path, credentials);
        Ok(match auth {
            "secret" => SignIn::Secret(SecretSource::new(
                keys.client_secret_file,
                keys.client_secret_env,
                credentials,
            )?),
            "certificate" => SignIn::Certificate(file(
                keys.client_certificate_file
                    .ok_or("auth = \"certificate\" needs client_certificate_file")?,
            )),
            "managed-identity" => SignIn::ManagedIdentity {
                client_id: keys
                    .managed_identity_client_id
                    .filter(|id| !id.trim().is_empty()),
            },
            "workload-identity" => {
                let from_env = || {
                    std::env::var_os("AZURE_FEDERATED_TOKEN_FILE")
                        .filter(|v| !v.is_empty())
                        .map(PathBuf::from)
                };
                SignIn::WorkloadIdentity(file(keys.federated_token_file.or_else(from_env).ok_or(
                    "auth = \"workload-identity\" needs federated_token_file, or AZURE_FEDERATED_TOKEN_FILE in the environment",
                )?))
            }
            _ => unreachable!("checked against METHODS above"),
        })
    }

    /// The `auth` value (`status` and the start-up log show it).
    pub fn method(&self) -> &'static str {
        match self {
            SignIn::Secret(_) => "secret",
            SignIn::Certificate(_) => "certificate",
            SignIn::ManagedIdentity { .. } => "managed-identity",
            SignIn::WorkloadIdentity(_) => "workload-identity",
        }
    }

    /// What to check when the identity provider refuses it (never a credential's value).
    pub fn check_hint(&self) -> String {
        match self {
            SignIn::Secret(s) => format!(
                "tenant_id, client_id and the client secret ({})",
                s.describe()
            ),
            SignIn::Certificate(f) => format!(
                "tenant_id, client_id and the certificate (client_certificate_file {}): is it uploaded to the app registration, and unexpired?",
                f.path.display()
            ),
            SignIn::ManagedIdentity { .. } => format!(
                "tenant_id and the {self}: is it assigned to this host, and in this tenant?"
            ),
            SignIn::WorkloadIdentity(f) => format!(
                "tenant_id, client_id and the federated credential of the app (federated_token_file {}): do its issuer and subject match the token's?",
                f.path.display()
            ),
        }
    }

    /// Reads the credential now, so an unreadable one stops a command at start (exit 2);
    /// the token code reads it again at every refresh.
    pub fn check(&self) -> Result<(), String> {
        match self {
            SignIn::Secret(s) => s.load().map(drop),
            SignIn::Certificate(f) => ClientCertificate::load(f).map(drop),
            SignIn::ManagedIdentity { .. } => Ok(()),
            SignIn::WorkloadIdentity(f) => read_federated_token(f).map(drop),
        }
    }
}

/// Where the credential comes from, for messages (never its value).
impl fmt::Display for SignIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignIn::Secret(s) => f.write_str(&s.describe()),
            SignIn::Certificate(c) => write!(f, "client_certificate_file {}", c.path.display()),
            SignIn::ManagedIdentity { client_id: None } => {
                f.write_str("managed identity (system-assigned)")
            }
            SignIn::ManagedIdentity {
                client_id: Some(id),
            } => write!(
                f,
                "managed identity (user-assigned, managed_identity_client_id {id})"
            ),
            SignIn::WorkloadIdentity(c) => write!(f, "federated_token_file {}", c.path.display()),
        }
    }
}

/// A certificate credential as read from its PEM: the private key as a PS256 signer (wiped on
/// drop) and the certificate's SHA-256 thumbprint (the assertion's `x5t#S256` header, base64url).
pub struct ClientCertificate {
    pub key: rsa::pss::BlindedSigningKey<Sha256>,
    pub x5t_s256: String,
}

impl ClientCertificate {
    /// Reads and parses the PEM file: one private key (PKCS#8 `PRIVATE KEY` or PKCS#1
    /// `RSA PRIVATE KEY`, unencrypted) and the certificate (the first `CERTIFICATE` block).
    pub fn load(file: &CredentialFile) -> Result<ClientCertificate, String> {
        const KEY: &str = "client_certificate_file";
        let text = Zeroizing::new(read_secret_file(KEY, &file.configured, &file.path)?);
        let bad = |m: &str| format!("{KEY} {} {m}", file.path.display());
        let blocks = pem::parse_many(text.as_bytes())
            .map_err(|e| bad(&format!("is not a PEM file: {e}")))?;
        let cert = blocks
            .iter()
            .find(|b| b.tag() == "CERTIFICATE")
            .ok_or_else(|| {
                bad("holds no CERTIFICATE block; put the certificate after the private key")
            })?;
        if blocks.iter().any(|b| b.tag() == "ENCRYPTED PRIVATE KEY") {
            return Err(bad(
                "holds an encrypted private key; store it unencrypted (openssl pkey -in F -out F.pem) and protect the file instead",
            ));
        }
        let key = blocks
            .iter()
            .find(|b| matches!(b.tag(), "PRIVATE KEY" | "RSA PRIVATE KEY"))
            .ok_or_else(|| bad("holds no PRIVATE KEY block"))?;
        let key = if key.tag() == "RSA PRIVATE KEY" {
            rsa::RsaPrivateKey::from_pkcs1_der(key.contents()).map_err(|e| e.to_string())
        } else {
            rsa::RsaPrivateKey::from_pkcs8_der(key.contents()).map_err(|e| e.to_string())
        }
        .map_err(|e| bad(&format!("holds a private key that is not an RSA key ({e})")))?;
        Ok(ClientCertificate {
            key: rsa::pss::BlindedSigningKey::new(key),
            x5t_s256: base64url(Sha256::digest(cert.contents())),
        })
    }
}

/// Reads a federated token file: the token alone (trailing whitespace dropped); empty is
/// refused. The message names the file, never the token.
pub fn read_federated_token(file: &CredentialFile) -> Result<Secret, String> {
    let text = Zeroizing::new(std::fs::read_to_string(&file.path).map_err(|e| {
        format!(
            "cannot read federated_token_file {}: {e}",
            file.path.display()
        )
    })?);
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "federated_token_file {} is empty",
            file.path.display()
        ));
    }
    Ok(Secret::from(token.to_string()))
}

/// base64url without padding (RFC 7515 §2), as JWTs and their `x5t#S256` use it.
pub(crate) fn base64url(bytes: impl AsRef<[u8]>) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
