//! Error plumbing at the edge: which failures the user caused (exit code 2) and how an error
//! chain becomes the one line printed to stderr.

/// A problem the user can fix (bad flag, bad date, unknown tenant, DB locked by another
/// daemon). Printed as one line; exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UserError(pub String);

impl UserError {
    pub fn new(msg: impl Into<String>) -> Self {
        UserError(msg.into())
    }
}

/// Exit code for a failed command: 2 for user-caused errors, 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    let user = err
        .chain()
        .any(|e| e.is::<UserError>() || e.is::<crate::config::ConfigError>());
    if user { 2 } else { 1 }
}

/// The whole error chain on one line, without repeating a message a source already carries.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let msg = cause.to_string().replace('\n', " ");
        if parts.last().is_some_and(|last| last.contains(&msg)) {
            continue;
        }
        parts.push(msg);
    }
    parts.join(": ")
}
