//! Helpers shared by the built-in processors.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;
use sluice_core::{Body, BuildError, Failure, Message, Outputs, ProcessError};

use crate::expr::template::{self, Template};

/// Reads a processor's configuration (already validated against its spec by the engine).
pub(crate) fn config<T: DeserializeOwned>(config: &Value) -> Result<T, BuildError> {
    T::deserialize(config).map_err(|e| BuildError::new(format!("invalid configuration: {e}")))
}

/// Compiles the template at `field`.
pub(crate) fn template_at(field: &str, source: &str) -> Result<Template, BuildError> {
    template::compile(source)
        .map_err(|e| BuildError::field(field, format!("invalid template: {e}")))
}

/// The body as JSON, or the message handed back with an invalid-input error.
// The message is moved in and out so the error path can return it inside the `Failure`.
#[allow(clippy::result_large_err)]
pub(crate) fn json_body(msg: Message) -> Result<(Message, Arc<Value>), Failure> {
    match msg.body.json_shared() {
        Ok(body) => Ok((msg, body)),
        Err(e) => Err(Failure::new(
            msg,
            ProcessError::invalid_input(e.to_string()),
        )),
    }
}

/// Replaces the body with `value` and labels it `application/json`. Every step that turns the
/// body into JSON uses it, because whatever the body was before, its content type must not
/// outlive it: a reply or a forwarded request would claim a form post, say, while carrying JSON.
pub(crate) fn set_json_body(msg: &mut Message, value: Value) {
    msg.body = Body::from_json(value);
    msg.headers
        .insert("content-type".to_owned(), "application/json".to_owned());
}

/// One message out.
pub(crate) fn one(msg: Message) -> Outputs {
    std::iter::once(msg).collect()
}

/// "an object", "a string", ...: what a JSON value is, for error messages. Shared so every
/// step names a wrong shape in the same words.
pub(crate) fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A content type's media type, lowercased and without parameters
/// (`Text/CSV; charset=utf-8` is `text/csv`). Steps that dispatch on the content type
/// compare this, so that parameters and letter case never change their choice.
pub(crate) fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}
