//! Secrets, which never live in the config file: a tenant's client secret (a file or an
//! environment variable) and the object store's credentials (environment variables, or
//! systemd credentials of the same names). The credentials directory
//! (`$CREDENTIALS_DIRECTORY`, systemd `LoadCredential=`) is read once by `main` and handed in
//! as [`Credentials`]. A loaded secret is a [`Secret`]: wiped from memory when dropped, and
//! never shown by `Debug`.

use std::path::{Path, PathBuf};

pub use secrecy::ExposeSecret;
use secrecy::zeroize::Zeroizing;

/// A client secret: zeroized on drop, `Debug` prints `[REDACTED]`; read it with
/// [`ExposeSecret::expose_secret`] where it is sent, nowhere else.
pub type Secret = secrecy::SecretString;

/// Where secrets outside the config come from: the process environment and the systemd
/// credentials directory, when the service runs with `LoadCredential=`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    dir: Option<PathBuf>,
}

impl Credentials {
    /// `dir` is `$CREDENTIALS_DIRECTORY` as `main` found it; empty counts as unset.
    pub fn new(dir: Option<PathBuf>) -> Credentials {
        Credentials {
            dir: dir.filter(|d| !d.as_os_str().is_empty()),
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// An environment variable, or else the systemd credential of the same name
    /// (`LoadCredential=AWS_SECRET_ACCESS_KEY:/etc/lrvault/aws-secret` puts it in
    /// `$CREDENTIALS_DIRECTORY/AWS_SECRET_ACCESS_KEY`); trailing newlines removed, empty is
    /// unset.
    pub fn lookup(&self, name: &str) -> Option<String> {
        match std::env::var(name) {
            Ok(value) => clean(value),
            Err(_) => self.file(name),
        }
    }

    /// The credential file `name` in the credentials directory, trailing newlines removed;
    /// `None` without a directory, or when the file is absent or empty.
    pub fn file(&self, name: &str) -> Option<String> {
        clean(std::fs::read_to_string(self.dir.as_ref()?.join(name)).ok()?)
    }

    /// A relative `client_secret_file` names a systemd credential when the service runs with
    /// `LoadCredential=`, so one config serves the daemon and `systemd-run` one-shots alike;
    /// otherwise it is relative to the working directory (and a file not found there says
    /// so).
    pub fn resolve(&self, path: &Path) -> PathBuf {
        match &self.dir {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        }
    }
}

fn clean(value: String) -> Option<String> {
    let value = value.trim_end_matches(['\r', '\n']).to_string();
    (!value.is_empty()).then_some(value)
}

/// Where a tenant's client secret comes from: exactly one of `client_secret_file` (resolved
/// against the credentials directory) and `client_secret_env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File {
        /// As written in the config.
        configured: PathBuf,
        /// The file read: `configured`, or `configured` in the credentials directory.
        path: PathBuf,
    },
    Env(String),
}

impl SecretSource {
    /// The source the two keys name, or the one-line reason they name none.
    pub(super) fn new(
        file: Option<PathBuf>,
        env: Option<String>,
        credentials: &Credentials,
    ) -> Result<SecretSource, String> {
        match (file, env) {
            (Some(configured), None) => Ok(SecretSource::File {
                path: credentials.resolve(&configured),
                configured,
            }),
            (None, Some(var)) => Ok(SecretSource::Env(var)),
            (None, None) => Err("set client_secret_file or client_secret_env".into()),
            (Some(_), Some(_)) => {
                Err("set only one of client_secret_file and client_secret_env".into())
            }
        }
    }

    /// Where the secret comes from, for messages (never its value).
    pub fn describe(&self) -> String {
        match self {
            SecretSource::File { path, .. } => format!("client_secret_file {}", path.display()),
            SecretSource::Env(var) => format!("client_secret_env {var}"),
        }
    }

    /// Reads the secret from its file or environment variable, refusing a file every user
    /// can read and contents an editor has mangled (see [`check_secret_text`]). The message
    /// names the source, never the value.
    pub fn load(&self) -> Result<Secret, String> {
        // The text as read is wiped too, not only the value taken from it.
        let raw = Zeroizing::new(match self {
            SecretSource::File { configured, path } => {
                read_secret_file("client_secret_file", configured, path)?
            }
            SecretSource::Env(var) => std::env::var(var).map_err(|_| {
                format!("environment variable {var} (client_secret_env) is not set or not UTF-8")
            })?,
        });
        let secret = check_secret_text(&raw).map_err(|m| format!("{} {m}", self.describe()))?;
        Ok(Secret::from(secret))
    }
}

/// Reads the secret file of another key than a tenant's (`events.webhook_secret_file`)
/// under the same rules: where a relative name was looked for, no file every user can read,
/// the value alone with at most one final newline. Messages name `key` and the path, never
/// the value.
pub fn load_secret_file(key: &str, configured: &Path, path: &Path) -> Result<Secret, String> {
    let raw = Zeroizing::new(read_secret_file(key, configured, path)?);
    let secret = check_secret_text(&raw).map_err(|m| format!("{key} {} {m}", path.display()))?;
    Ok(Secret::from(secret))
}

/// Reads a secret file (the file of config key `key`): not found under a relative name says
/// where it was looked for, and a file every user can read is refused (a group that is not
/// ours gets a warning).
pub(super) fn read_secret_file(
    key: &str,
    configured: &Path,
    path: &Path,
) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let mut m = format!("cannot read {key} {}: {e}", path.display());
        if configured.is_relative() && configured == path {
            let cwd = std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|_| "?".into());
            m += &format!(
                " (the relative name was looked up in the working directory {cwd} because $CREDENTIALS_DIRECTORY is not set: run under systemd with LoadCredential=, or write an absolute path)"
            );
        }
        m
    })?;
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot inspect {key} {}: {e}", path.display()))?;
    match crate::access::secret_exposure(&meta) {
        crate::access::SecretExposure::Private => {}
        crate::access::SecretExposure::World => {
            return Err(format!(
                "{key} {} is readable by every user ({}); chmod 0600 it (0640 with the service's group) and rotate the secret if others may have read it",
                path.display(),
                crate::access::describe(&meta)
            ));
        }
        crate::access::SecretExposure::Group(group) => tracing::warn!(
            path = %path.display(),
            "{key} is readable by group {group}, which this process is not in; only its owner and the service need it"
        ),
    }
    Ok(text)
}

/// The secret inside `raw`: at most one trailing newline is dropped. A byte order mark,
/// whitespace around the value (a `\r` from a Windows editor, a trailing space, a blank
/// line) or a second line would be sent to the identity provider as part of the secret and
/// refused there with a message that says nothing about the file, so it is refused here.
/// Messages never show the value.
pub fn check_secret_text(raw: &str) -> Result<&str, String> {
    if raw.starts_with('\u{feff}') {
        return Err(
            "starts with a byte order mark (U+FEFF); save it as plain UTF-8 without BOM".into(),
        );
    }
    let secret = raw.strip_suffix('\n').unwrap_or(raw);
    if secret.is_empty() {
        return Err("is empty".into());
    }
    if let Some(last) = secret.chars().last().filter(|c| c.is_whitespace()) {
        return Err(format!(
            "ends with {} after the secret; only one final newline is allowed (write it with printf '%s')",
            whitespace_name(last)
        ));
    }
    if let Some(first) = secret.chars().next().filter(|c| c.is_whitespace()) {
        return Err(format!(
            "starts with {}; the file must hold the secret value alone",
            whitespace_name(first)
        ));
    }
    if secret.contains(['\n', '\r']) {
        return Err("holds more than one line; it must hold the secret value alone".into());
    }
    Ok(secret)
}

fn whitespace_name(c: char) -> &'static str {
    match c {
        '\r' => "a carriage return (\\r, a Windows line ending)",
        '\n' => "a second newline",
        ' ' => "a space",
        '\t' => "a tab",
        _ => "a whitespace character",
    }
}
