//! The headers error handling writes, so handlers, dead letters and replays can tell what
//! happened. Names are stable: users match on them.

use sluice_core::{Message, ProcessError};

/// Attempts made by a `retry` policy so far (the first included).
pub const ATTEMPTS: &str = "sluice.retry.attempts";
/// The text of the last failed attempt.
pub const LAST_ERROR: &str = "sluice.retry.last_error";
/// When the first attempt failed (RFC 3339, UTC).
pub const FIRST_FAILURE: &str = "sluice.retry.first_failure";
/// When the last attempt failed (RFC 3339, UTC).
pub const LAST_FAILURE: &str = "sluice.retry.last_failure";

/// The kind of the error being handled (`invalid_input`, `timeout`, ...).
pub const ERROR_KIND: &str = "sluice.error.kind";
/// Its description.
pub const ERROR_MESSAGE: &str = "sluice.error.message";
/// The step or target that failed.
pub const ERROR_STEP: &str = "sluice.error.step";
/// The flow it failed in.
pub const ERROR_FLOW: &str = "sluice.error.flow";
/// For a remote error: the status the remote side answered.
pub const ERROR_STATUS: &str = "sluice.error.remote_status";

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Records failed attempt `attempt` of a retried step on its message.
pub fn record_failure(msg: &mut Message, error: &ProcessError, attempt: u32) {
    let now = now();
    msg.headers
        .entry(FIRST_FAILURE.to_owned())
        .or_insert_with(|| now.clone());
    msg.headers.insert(LAST_FAILURE.to_owned(), now);
    msg.headers.insert(ATTEMPTS.to_owned(), attempt.to_string());
    msg.headers
        .insert(LAST_ERROR.to_owned(), error.detail.clone());
}

/// Describes the error being handled on the message handed to a handler (`catch`, `on_error`,
/// dead letter).
pub fn describe_error(msg: &mut Message, error: &ProcessError, flow: &str) {
    let h = &mut msg.headers;
    h.insert(ERROR_KIND.to_owned(), error.kind.as_str().to_owned());
    h.insert(ERROR_MESSAGE.to_owned(), error.to_string());
    h.insert(
        ERROR_STEP.to_owned(),
        error.step.clone().unwrap_or_default(),
    );
    h.insert(ERROR_FLOW.to_owned(), flow.to_owned());
    if let Some(status) = error.remote_status {
        h.insert(ERROR_STATUS.to_owned(), status.to_string());
    }
    let now = now();
    h.entry(FIRST_FAILURE.to_owned())
        .or_insert_with(|| now.clone());
    h.entry(LAST_FAILURE.to_owned()).or_insert(now);
    h.entry(ATTEMPTS.to_owned())
        .or_insert_with(|| "1".to_owned());
}
