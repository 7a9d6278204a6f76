//! Helpers shared by the built-in processors.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;
use sluice_core::{BuildError, Failure, Message, Outputs, ProcessError};

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

/// One message out.
pub(crate) fn one(msg: Message) -> Outputs {
    std::iter::once(msg).collect()
}
