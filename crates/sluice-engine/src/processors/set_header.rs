//! `set_header`: sets message headers from literals, templates or a jq expression.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, Failure, Message, Outputs, ProcessError, Processor};

use super::common;
use crate::expr::template::Template;

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "set_header",
        ComponentKind::Processor,
        "Set one or more message headers",
    )
    .description(
        "Sets the header `name` to `value` or to the result of `expression`, and/or every header \
in `headers`. Existing headers of the same name are replaced; the body is untouched.\n\n\
* `value` is a literal string, rendered as a template if it contains `{{` (see `template`).\n\
* `expression` is jq on the JSON body (with `$headers`, `$meta`): it must produce exactly one \
output; a string is used as is, any other JSON value is serialized (`42`, `true`, `{\"a\":1}`). \
A body that is not valid JSON fails the step with `invalid_input`.\n\
* `headers` sets several headers at once; each value follows the rules of `value`.\n\n\
Give `name` with exactly one of `value` or `expression`, or `headers`, or both.",
    )
    .field(FieldSpec::new(
        "name",
        FieldType::String,
        "Name of the header to set.",
    ))
    .field(FieldSpec::new(
        "value",
        FieldType::Template,
        "Literal value; a template if it contains `{{`.",
    ))
    .field(FieldSpec::new(
        "expression",
        FieldType::Jq,
        "jq expression on the body computing the value.",
    ))
    .field(FieldSpec::new(
        "headers",
        FieldType::Map(Box::new(FieldType::Template)),
        "Several headers at once, by name; values follow the rules of `value`.",
    ))
    .example("Literal", "name: x-source\nvalue: billing\n")
    .example("From the body", "name: x-order-id\nexpression: .order.id\n")
    .example(
        "Several, one templated",
        "headers:\n  x-source: billing\n  x-trace: 'order-{{ body.id }}'\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    name: Option<String>,
    value: Option<String>,
    expression: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// How one header's value is computed.
enum Source {
    Literal(String),
    Template(Box<Template>),
    Jq(Arc<dyn JqProgram>),
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    let mut sets = Vec::new();
    match (config.name, config.value, config.expression) {
        (Some(name), Some(value), None) => sets.push((name, text_source("value", value)?)),
        (Some(name), None, Some(code)) => {
            sets.push((name, Source::Jq(ctx.steps.compile_jq("expression", &code)?)));
        }
        (Some(_), Some(_), Some(_)) => {
            return Err(BuildError::field(
                "expression",
                "give either `value` or `expression`, not both",
            ));
        }
        (Some(_), None, None) => {
            return Err(BuildError::field(
                "name",
                "give the header's `value` or an `expression` computing it",
            ));
        }
        (None, value, expression) if value.is_some() || expression.is_some() => {
            let field = if value.is_some() {
                "value"
            } else {
                "expression"
            };
            return Err(BuildError::field(field, "give the header's `name` too"));
        }
        (None, _, _) if config.headers.is_empty() => {
            return Err(BuildError::new(
                "nothing to set: give `name` with `value` or `expression`, or `headers`",
            ));
        }
        (None, _, _) => {}
    }
    for (name, value) in config.headers {
        let source = text_source(&format!("headers.{name}"), value)?;
        sets.push((name, source));
    }
    Ok(Arc::new(SetHeader { sets }))
}

fn text_source(field: &str, value: String) -> Result<Source, BuildError> {
    if value.contains("{{") {
        Ok(Source::Template(Box::new(common::template_at(
            field, &value,
        )?)))
    } else {
        Ok(Source::Literal(value))
    }
}

struct SetHeader {
    sets: Vec<(String, Source)>,
}

impl SetHeader {
    async fn value(
        &self,
        name: &str,
        source: &Source,
        msg: &Message,
    ) -> Result<String, ProcessError> {
        match source {
            Source::Literal(v) => Ok(v.clone()),
            Source::Template(t) => t.render(msg),
            Source::Jq(program) => {
                let body = msg
                    .body
                    .json_shared()
                    .map_err(|e| ProcessError::invalid_input(e.to_string()))?;
                let mut outputs = program.run(body, msg).await?;
                if outputs.len() != 1 {
                    return Err(ProcessError::expression(format!(
                        "expression for header `{name}` produced {} outputs; it must produce exactly one",
                        outputs.len()
                    )));
                }
                Ok(match outputs.pop().unwrap_or_default() {
                    Value::String(s) => s,
                    other => other.to_string(),
                })
            }
        }
    }
}

#[async_trait]
impl Processor for SetHeader {
    async fn process(&self, mut msg: Message) -> Result<Outputs, Failure> {
        // Compute every value first, so a failure leaves the message's headers untouched.
        let mut values = Vec::with_capacity(self.sets.len());
        for (name, source) in &self.sets {
            match self.value(name, source, &msg).await {
                Ok(v) => values.push(v),
                Err(e) => return Err(Failure::new(msg, e)),
            }
        }
        for ((name, _), value) in self.sets.iter().zip(values) {
            msg.headers.insert(name.clone(), value);
        }
        Ok(common::one(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process, try_build};
    use serde_json::json;
    use sluice_core::ErrorKind;

    async fn headers_after(config: Value, msg: Message) -> BTreeMap<String, String> {
        let out = process(&build_one("set_header", config), msg)
            .await
            .unwrap();
        out.into_iter().next().unwrap().headers
    }

    #[tokio::test]
    async fn literal_template_and_expression() {
        let msg = || {
            Message::json(json!({"id": 7, "name": "ada", "tags": ["a"]})).with_header("old", "x")
        };
        let h = headers_after(json!({"name": "x-src", "value": "billing"}), msg()).await;
        assert_eq!(h["x-src"], "billing");
        assert_eq!(h["old"], "x");
        let h = headers_after(
            json!({"name": "x-t", "value": "order-{{ body.id }}"}),
            msg(),
        )
        .await;
        assert_eq!(h["x-t"], "order-7");
        let h = headers_after(json!({"name": "x-n", "expression": ".name"}), msg()).await;
        assert_eq!(h["x-n"], "ada");
        let h = headers_after(json!({"name": "x-id", "expression": ".id"}), msg()).await;
        assert_eq!(h["x-id"], "7");
        let h = headers_after(json!({"name": "x-tags", "expression": ".tags"}), msg()).await;
        assert_eq!(h["x-tags"], r#"["a"]"#);
        let h = headers_after(json!({"name": "old", "value": "new"}), msg()).await;
        assert_eq!(h["old"], "new");
    }

    #[tokio::test]
    async fn several_headers_at_once() {
        let config = json!({"headers": {"a": "1", "b": "{{ body.n }}"}, "name": "c", "value": "3"});
        let h = headers_after(config, Message::json(json!({"n": 2}))).await;
        assert_eq!(
            (h["a"].as_str(), h["b"].as_str(), h["c"].as_str()),
            ("1", "2", "3")
        );
    }

    #[tokio::test]
    async fn failures_keep_the_message_untouched() {
        let step = build_one("set_header", json!({"name": "x", "expression": ".[]"}));
        let f = process(&step, Message::json(json!([1, 2])))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::Expression);
        assert!(!f.message.headers.contains_key("x"));
        let f = process(&step, Message::bytes(&b"{"[..])).await.unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::InvalidInput);
    }

    #[test]
    fn config_must_say_one_thing() {
        for (config, field) in [
            (json!({"name": "x"}), Some("name")),
            (
                json!({"name": "x", "value": "v", "expression": "."}),
                Some("expression"),
            ),
            (json!({"value": "v"}), Some("value")),
            (json!({}), None),
            (json!({"name": "x", "value": "{{ oops"}), Some("value")),
        ] {
            let e = try_build("set_header", &config).err().unwrap();
            assert_eq!(e.field.as_deref(), field, "{config}: {e}");
        }
    }
}
