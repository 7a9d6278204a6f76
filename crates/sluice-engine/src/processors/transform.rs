//! `transform`: replaces the body with the result of a jq expression (EIP Message Translator).

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, Failure, Message, Outputs, ProcessError, Processor};

use super::common;

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "transform",
        ComponentKind::Processor,
        "Replace the JSON body with the result of a jq expression",
    )
    .description(
        "Runs a jq expression on the JSON body (`.`, with `$headers` and `$meta`) and makes its \
result the new body (EIP Message Translator). Headers, metadata and acknowledgement are kept, \
except `content-type`, which becomes `application/json`.\n\n\
* `outputs: one` (default): the expression must produce exactly one value; none or several is an \
`expression` error (use `filter` to drop messages, `outputs: array` to collect several values).\n\
* `outputs: array`: every output is collected into one array (none gives `[]`).\n\n\
A body that is not valid JSON fails the step with `invalid_input`; an empty body is `null`.",
    )
    .field(
        FieldSpec::new("expression", FieldType::Jq, "The jq expression computing the new body.")
            .required(),
    )
    .field(
        FieldSpec::new(
            "outputs",
            FieldType::Enum(vec!["one", "array"]),
            "`one`: exactly one output becomes the body; `array`: all outputs, collected into an array.",
        )
        .default_value("one"),
    )
    .shorthand("expression")
    .example(
        "Reshape an order",
        "expression: '{id: .order_id, total: (.items | map(.price * .qty) | add)}'\n",
    )
    .example(
        "Collect the names of all active users",
        "expression: '.users[] | select(.active) | .name'\noutputs: array\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    expression: String,
    #[serde(default)]
    outputs: OutputMode,
}

#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum OutputMode {
    #[default]
    One,
    Array,
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    let program = ctx.steps.compile_jq("expression", &config.expression)?;
    Ok(Arc::new(Transform {
        program,
        mode: config.outputs,
    }))
}

struct Transform {
    program: Arc<dyn JqProgram>,
    mode: OutputMode,
}

#[async_trait]
impl Processor for Transform {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let mut msg = msg;
        // Taken, not shared: the program may then build its result from the body itself.
        let body = match msg.body.take_json() {
            Ok(body) => body,
            Err(e) => {
                return Err(Failure::new(
                    msg,
                    ProcessError::invalid_input(e.to_string()),
                ));
            }
        };
        let mut results = match self.program.run(body, &msg).await {
            Ok(results) => results,
            Err(e) => return Err(Failure::new(msg, e)),
        };
        let value = match self.mode {
            OutputMode::Array => Value::Array(results),
            OutputMode::One if results.len() == 1 => results.pop().unwrap_or_default(),
            OutputMode::One => {
                let e = ProcessError::expression(format!(
                    "expression produced {} outputs but `transform` needs exactly one; \
                     use `filter` to drop messages or `outputs: array` to collect outputs",
                    results.len()
                ));
                return Err(Failure::new(msg, e));
            }
        };
        common::set_json_body(&mut msg, value);
        Ok(common::one(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process};
    use serde_json::json;
    use sluice_core::{AckToken, ErrorKind, Outcome};

    #[tokio::test]
    async fn replaces_the_body_and_keeps_the_rest() {
        let step = build_one("transform", json!({"expression": "{n: (.a + 1)}"}));
        let (token, rx) = AckToken::channel();
        let msg = Message::json(json!({"a": 1}))
            .with_header("h", "v")
            .with_header("content-type", "application/x-www-form-urlencoded")
            .with_ack(token);
        let id = msg.id();
        let out = process(&step, msg).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].body.json().unwrap(), &json!({"n": 2}));
        assert_eq!(out[0].headers["h"], "v");
        assert_eq!(out[0].headers["content-type"], "application/json");
        assert_eq!(out[0].id(), id);
        out.into_iter().for_each(Message::ack);
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
    }

    #[tokio::test]
    async fn zero_or_many_outputs_are_errors_in_one_mode() {
        let step = build_one("transform", json!("empty"));
        let f = process(&step, Message::json(json!(1))).await.unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::Expression);
        assert!(
            f.error.detail.contains("produced 0 outputs"),
            "{}",
            f.error.detail
        );
        assert!(f.error.detail.contains("outputs: array"));
        let step = build_one("transform", json!(".[]"));
        let f = process(&step, Message::json(json!([1, 2])))
            .await
            .unwrap_err();
        assert!(f.error.detail.contains("produced 2 outputs"));
        assert_eq!(
            f.message.body.json().unwrap(),
            &json!([1, 2]),
            "message handed back"
        );
    }

    #[tokio::test]
    async fn array_mode_collects() {
        let step = build_one(
            "transform",
            json!({"expression": ".[] | . * 10", "outputs": "array"}),
        );
        let out = process(&step, Message::json(json!([1, 2]))).await.unwrap();
        assert_eq!(out[0].body.json().unwrap(), &json!([10, 20]));
        let out = process(&step, Message::json(json!([]))).await.unwrap();
        assert_eq!(out[0].body.json().unwrap(), &json!([]));
    }

    #[tokio::test]
    async fn malformed_json_is_invalid_input_and_keeps_the_message() {
        let step = build_one("transform", json!("."));
        let f = process(&step, Message::bytes(&b"{not json"[..]))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::InvalidInput);
        assert!(f.error.detail.contains("not valid JSON"));
        assert_eq!(f.message.body.to_text(), "{not json");
    }

    #[tokio::test]
    async fn runtime_errors_are_expression_failures() {
        let step = build_one("transform", json!(".a.b"));
        let f = process(&step, Message::json(json!({"a": "s"})))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::Expression);
    }

    #[test]
    fn bad_config_is_a_build_error() {
        let e = crate::processors::testkit::try_build(
            "transform",
            &json!({"expression": ".", "bogus": 1}),
        )
        .err()
        .unwrap();
        assert!(e.message.contains("bogus"), "{e}");
        let e = crate::processors::testkit::try_build("transform", &json!({"expression": ".a |"}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("expression"));
    }
}
