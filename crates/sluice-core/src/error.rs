//! Errors at the plugin boundary.

use std::fmt;

use crate::message::Message;

/// What kind of failure a step met; error handlers match on it and the HTTP source maps it to a
/// status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The message does not fit what the step needs (malformed JSON, wrong shape). Not retryable.
    InvalidInput,
    /// An expression (jq, template) failed or exceeded its limits while evaluating.
    Expression,
    /// The step did not finish within its timeout.
    Timeout,
    /// A remote system answered with an error (for HTTP: a non-2xx status).
    Remote,
    /// The remote system or resource could not be reached. Usually retryable.
    Unavailable,
    /// Reading or writing a local resource failed.
    Io,
    /// The flow rejected the message on purpose (a `fail` step, a validation rule).
    Rejected,
    /// A defect in Sluice or a component; please report it.
    Internal,
}

impl ErrorKind {
    /// Every kind, in documentation order.
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::InvalidInput,
        ErrorKind::Expression,
        ErrorKind::Timeout,
        ErrorKind::Remote,
        ErrorKind::Unavailable,
        ErrorKind::Io,
        ErrorKind::Rejected,
        ErrorKind::Internal,
    ];

    /// The snake_case names of every kind, for configuration enums.
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|k| k.as_str()).collect()
    }

    /// The snake_case name used in flow files and problem bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::Expression => "expression",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Remote => "remote",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Io => "io",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A step failed to process a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{detail}", step.as_deref().map(|s| format!("step `{s}`: ")).unwrap_or_default())]
pub struct ProcessError {
    /// The class of failure.
    pub kind: ErrorKind,
    /// The step that failed, filled in by the engine if the component did not.
    pub step: Option<String>,
    /// What went wrong, in lower case, without a trailing period.
    pub detail: String,
    /// For [`ErrorKind::Remote`]: the status the remote system answered, when it has one.
    pub remote_status: Option<u16>,
}

impl ProcessError {
    /// A new error of `kind`.
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        ProcessError {
            kind,
            step: None,
            detail: detail.into(),
            remote_status: None,
        }
    }

    /// Names the failing step unless one is already named.
    #[must_use]
    pub fn in_step(mut self, step: &str) -> Self {
        if self.step.is_none() {
            self.step = Some(step.to_owned());
        }
        self
    }

    /// Shorthand for [`ErrorKind::InvalidInput`].
    pub fn invalid_input(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, detail)
    }

    /// Shorthand for [`ErrorKind::Expression`].
    pub fn expression(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::Expression, detail)
    }
}

/// A message that could not be processed, handed back with its error so nothing is lost: error
/// handlers and the dead-letter path receive the message itself (as tokio's `TrySendError`
/// hands back the value it could not send).
#[derive(Debug)]
pub struct Failure {
    /// The message as it was when the step failed, with its acknowledgement shares.
    pub message: Message,
    /// Why.
    pub error: ProcessError,
}

impl Failure {
    /// Pairs a message with the error that stopped it.
    pub fn new(message: Message, error: ProcessError) -> Self {
        Failure { message, error }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "message {}: {}", self.message.id(), self.error)
    }
}

/// A component could not be built from its configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", field.as_deref().map(|f| format!("field `{f}`: ")).unwrap_or_default())]
pub struct BuildError {
    /// The configuration field at fault, if one is; the engine turns it into file:line:column.
    pub field: Option<String>,
    /// What is wrong and what to do, in lower case.
    pub message: String,
}

impl BuildError {
    /// An error about the component as a whole.
    pub fn new(message: impl Into<String>) -> Self {
        BuildError {
            field: None,
            message: message.into(),
        }
    }

    /// An error about one field (a dotted path for nested fields, e.g. `tls.ca_file`).
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        BuildError {
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

/// A source stopped with an error (it could not bind, its directory vanished, ...).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// An I/O failure, with what the source was doing.
    #[error("{context}: {source}")]
    Io {
        /// What the source was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Any other failure.
    #[error("{0}")]
    Other(String),
}
