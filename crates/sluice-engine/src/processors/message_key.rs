//! Keys computed from a message by jq, for the steps that remember messages by key (idempotent
//! consumer, throttle, cache).

use std::sync::Arc;

use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::{Message, ProcessError};

/// Runs the key expression of `field` on `msg` and turns its first output into a string.
///
/// Strings are used as they are; numbers and booleans as their JSON text. No output, `null`, an
/// array or an object is an `invalid_input` error naming the field. A body that is not JSON is
/// seen as `null`, so keys taken from `$headers` or `$meta` work on any body.
pub(crate) async fn evaluate(
    field: &str,
    program: &dyn JqProgram,
    msg: &Message,
) -> Result<String, ProcessError> {
    let (input, not_json) = match msg.body.json_shared() {
        Ok(body) => (body, None),
        Err(e) => (Arc::new(Value::Null), Some(e)),
    };
    let outputs = program.run(input, msg).await?;
    let problem = match outputs.into_iter().next() {
        Some(Value::String(s)) => return Ok(s),
        Some(Value::Number(n)) => return Ok(n.to_string()),
        Some(Value::Bool(b)) => return Ok(b.to_string()),
        None => "gave no output".to_owned(),
        Some(Value::Null) => "gave null".to_owned(),
        Some(other) => format!(
            "gave {}, not a string",
            if other.is_array() {
                "an array"
            } else {
                "an object"
            }
        ),
    };
    let hint = match not_json {
        Some(e) => format!(" (the body was read as null: {e})"),
        None => String::new(),
    };
    Err(ProcessError::invalid_input(format!(
        "`{field}` (`{}`) {problem}{hint}; every message needs a key",
        program.source()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expr::jq::{self, JqLimits};
    use serde_json::json;
    use sluice_core::ErrorKind;

    async fn key(code: &str, msg: &Message) -> Result<String, ProcessError> {
        let program = jq::compile(code, JqLimits::default()).unwrap();
        evaluate("key", program.as_ref(), msg).await
    }

    #[tokio::test]
    async fn scalars_become_strings() {
        let msg = Message::json(json!({"s": "a", "n": 7, "b": true}));
        assert_eq!(key(".s", &msg).await.unwrap(), "a");
        assert_eq!(key(".n", &msg).await.unwrap(), "7");
        assert_eq!(key(".b", &msg).await.unwrap(), "true");
    }

    #[tokio::test]
    async fn missing_or_structured_keys_are_invalid_input() {
        let msg = Message::json(json!({"o": {}, "a": []}));
        for (code, says) in [
            (".missing", "gave null"),
            (".o", "an object"),
            (".a", "an array"),
            ("empty", "no output"),
        ] {
            let e = key(code, &msg).await.unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidInput);
            assert!(e.detail.contains(says), "{code}: {e}");
            assert!(e.detail.contains("`key`"), "{e}");
        }
    }

    #[tokio::test]
    async fn headers_work_on_any_body() {
        let msg = Message::bytes(&b"<xml/>"[..]).with_header("id", "x1");
        assert_eq!(key("$headers.id", &msg).await.unwrap(), "x1");
        let e = key(".id", &msg).await.unwrap_err();
        assert!(e.detail.contains("not valid JSON"), "{e}");
    }
}
