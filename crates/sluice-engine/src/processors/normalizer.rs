//! `normalizer`: maps messages of several formats onto one canonical model (EIP Normalizer).

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, Failure, Message, Outputs, ProcessError, Processor};

use super::common;
use super::formats::{Format, Options};

/// The header naming the rule that normalized a message.
pub const RULE_HEADER: &str = "sluice.normalizer.rule";

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "normalizer",
        ComponentKind::Processor,
        "Map messages of different formats onto one canonical model",
    )
    .description(
        "Routes each message to the first rule whose `condition` holds and replaces the body with \
that rule's `transform` (EIP Normalizer: a router plus one translator per format). Conditions \
and transforms are jq on the JSON body, with `$headers` and `$meta`; the transform must produce \
exactly one value (else `expression`). The message keeps its id, headers and acknowledgement; \
`content-type` becomes `application/json` and the header `sluice.normalizer.rule` names the rule \
that matched (its `name`, or its position from 0).\n\n\
**Formats.** With `detect_format: true` (default), a body whose `content-type` is CSV \
(`text/csv`), XML (`application/xml`, `text/xml`, `*+xml`) or a form \
(`application/x-www-form-urlencoded`) is first parsed into JSON as `parse` does with its default \
options (CSV with a header row; the XML convention of `parse`), so rules see JSON whatever \
arrived; `$headers[\"content-type\"]` still tells the formats apart. Other bodies must be JSON. \
A body that does not parse fails with `invalid_input`.\n\n\
**No match.** `otherwise: fail` (default) fails the step with `invalid_input` (the message is \
in none of the known formats); `otherwise: pass` lets the message through unchanged (as it \
arrived, not parsed).",
    )
    .field(
        FieldSpec::new(
            "when",
            FieldType::List(Box::new(FieldType::Object(vec![
                FieldSpec::new("condition", FieldType::Jq, "jq: whether this rule applies.")
                    .required(),
                FieldSpec::new(
                    "transform",
                    FieldType::Jq,
                    "jq: the canonical body, computed from this format.",
                )
                .required(),
                FieldSpec::new(
                    "name",
                    FieldType::String,
                    "A name for the rule, recorded in `sluice.normalizer.rule`; default: its position.",
                ),
            ]))),
            "The rules, tried in order.",
        )
        .required(),
    )
    .field(
        FieldSpec::new(
            "otherwise",
            FieldType::Enum(vec!["fail", "pass"]),
            "When no rule matches: fail with `invalid_input`, or pass the message on unchanged.",
        )
        .default_value("fail"),
    )
    .field(
        FieldSpec::new(
            "detect_format",
            FieldType::Bool,
            "Parse CSV, XML and form bodies (by `content-type`) into JSON before the rules run.",
        )
        .default_value(true),
    )
    .example(
        "Three order formats, one model",
        "when:\n  - name: v2\n    condition: 'has(\"orderId\")'\n    transform: '{id: .orderId, total: .amount}'\n  - name: legacy-xml\n    condition: 'has(\"order\")'\n    transform: '{id: .order[\"@id\"], total: (.order.total | tonumber)}'\n  - name: form\n    condition: '$headers[\"content-type\"] == \"application/x-www-form-urlencoded\"'\n    transform: '{id: .id, total: (.total | tonumber)}'\notherwise: fail\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    when: Vec<RuleConfig>,
    #[serde(default)]
    otherwise: Otherwise,
    detect_format: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    condition: String,
    transform: String,
    name: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Otherwise {
    #[default]
    Fail,
    Pass,
}

struct Rule {
    name: String,
    condition: Arc<dyn JqProgram>,
    transform: Arc<dyn JqProgram>,
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    if config.when.is_empty() {
        return Err(BuildError::field("when", "give at least one rule"));
    }
    let mut rules = Vec::with_capacity(config.when.len());
    for (i, rule) in config.when.into_iter().enumerate() {
        rules.push(Rule {
            name: rule.name.unwrap_or_else(|| i.to_string()),
            condition: ctx
                .steps
                .compile_jq(&format!("when[{i}].condition"), &rule.condition)?,
            transform: ctx
                .steps
                .compile_jq(&format!("when[{i}].transform"), &rule.transform)?,
        });
    }
    Ok(Arc::new(Normalizer {
        rules,
        otherwise: config.otherwise,
        detect_format: config.detect_format.unwrap_or(true),
    }))
}

struct Normalizer {
    rules: Vec<Rule>,
    otherwise: Otherwise,
    detect_format: bool,
}

impl Normalizer {
    /// The body as JSON, parsed from its declared format when that is one `parse` knows.
    fn json(&self, msg: &Message) -> Result<Arc<Value>, ProcessError> {
        let format = self
            .detect_format
            .then(|| msg.headers.get("content-type"))
            .flatten()
            .and_then(|ct| Format::from_content_type(ct));
        match format {
            Some(format) => Options::default_for(format)
                .parse(msg.body.as_bytes())
                .map(Arc::new)
                .map_err(|e| {
                    ProcessError::invalid_input(format!(
                        "the body does not parse as its content type says: {e}"
                    ))
                }),
            None => msg
                .body
                .json_shared()
                .map_err(|e| ProcessError::invalid_input(e.to_string())),
        }
    }

    /// The canonical body and the rule's name, or `None` when no rule matches.
    async fn normalize(&self, msg: &Message) -> Result<Option<(Value, &str)>, ProcessError> {
        let body = self.json(msg)?;
        for rule in &self.rules {
            if !rule.condition.test(Arc::clone(&body), msg).await? {
                continue;
            }
            let mut outputs = rule.transform.run(Arc::clone(&body), msg).await?;
            if outputs.len() != 1 {
                return Err(ProcessError::expression(format!(
                    "the transform of rule `{}` produced {} outputs but needs exactly one",
                    rule.name,
                    outputs.len()
                )));
            }
            return Ok(outputs.pop().map(|value| (value, rule.name.as_str())));
        }
        Ok(None)
    }
}

#[async_trait]
impl Processor for Normalizer {
    async fn process(&self, mut msg: Message) -> Result<Outputs, Failure> {
        match self.normalize(&msg).await {
            Ok(Some((value, rule))) => {
                msg.headers.insert(RULE_HEADER.to_owned(), rule.to_owned());
                common::set_json_body(&mut msg, value);
                Ok(common::one(msg))
            }
            Ok(None) if self.otherwise == Otherwise::Pass => Ok(common::one(msg)),
            Ok(None) => {
                let e = ProcessError::invalid_input(format!(
                    "the message matches none of the {} known formats; add a rule, or `otherwise: pass`",
                    self.rules.len()
                ));
                Err(Failure::new(msg, e))
            }
            Err(e) => Err(Failure::new(msg, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process, try_build};
    use serde_json::json;
    use sluice_core::{AckToken, ErrorKind, Outcome};

    fn normalizer(otherwise: &str) -> Arc<dyn Processor> {
        build_one(
            "normalizer",
            json!({"otherwise": otherwise, "when": [
                {"name": "v2", "condition": "type == \"object\" and has(\"orderId\")",
                 "transform": "{id: .orderId, total: .amount}"},
                {"name": "xml", "condition": "type == \"object\" and has(\"order\")",
                 "transform": "{id: .order[\"@id\"], total: (.order.total | tonumber)}"},
                {"condition": "$headers[\"content-type\"] == \"text/csv\"",
                 "transform": ".[0] | {id: .id, total: (.total | tonumber)}"},
                {"condition": "type == \"object\" and has(\"id\")",
                 "transform": "{id: .id, total: (.total | tonumber)}"}
            ]}),
        )
    }

    async fn canonical(msg: Message) -> (Value, String) {
        let out = process(&normalizer("fail"), msg).await.unwrap();
        (
            out[0].body.json().unwrap().clone(),
            out[0].headers[RULE_HEADER].clone(),
        )
    }

    #[tokio::test]
    async fn every_format_lands_on_the_canonical_model() {
        let expected = json!({"id": "7", "total": 5});
        let json_msg = Message::json(json!({"orderId": "7", "amount": 5}));
        assert_eq!(canonical(json_msg).await, (expected.clone(), "v2".into()));
        let xml = Message::bytes(&b"<order id=\"7\"><total>5</total></order>"[..])
            .with_header("content-type", "application/xml; charset=utf-8");
        assert_eq!(canonical(xml).await, (expected.clone(), "xml".into()));
        let csv = Message::bytes(&b"id,total\n7,5\n"[..]).with_header("content-type", "text/csv");
        assert_eq!(canonical(csv).await, (expected.clone(), "2".into()));
        let form = Message::bytes(&b"id=7&total=5"[..])
            .with_header("content-type", "application/x-www-form-urlencoded");
        let (token, rx) = AckToken::channel();
        let out = process(&normalizer("fail"), form.with_ack(token))
            .await
            .unwrap();
        assert_eq!(out[0].body.json().unwrap(), &expected);
        assert_eq!(out[0].headers["content-type"], "application/json");
        out.into_iter().for_each(Message::ack);
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
    }

    #[tokio::test]
    async fn unmatched_messages_fail_or_pass_unchanged() {
        let f = process(&normalizer("fail"), Message::json(json!([1])))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::InvalidInput);
        assert!(f.error.detail.contains("none of the 4 known formats"));
        let csv = Message::bytes(&b"a\n1\n"[..]).with_header("content-type", "text/x-other");
        let f = process(&normalizer("fail"), csv).await.unwrap_err();
        assert!(
            f.error.detail.contains("not valid JSON"),
            "{}",
            f.error.detail
        );
        let xml = Message::bytes(&b"<other/>"[..]).with_header("content-type", "text/xml");
        let out = process(&normalizer("pass"), xml).await.unwrap();
        assert_eq!(out[0].body.to_text(), "<other/>");
        assert_eq!(out[0].headers["content-type"], "text/xml");
        assert!(!out[0].headers.contains_key(RULE_HEADER));
    }

    #[tokio::test]
    async fn bad_bodies_and_transforms_fail() {
        let xml = Message::bytes(&b"<a>"[..]).with_header("content-type", "application/xml");
        let f = process(&normalizer("pass"), xml).await.unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::InvalidInput);
        assert!(
            f.error.detail.contains("as its content type says"),
            "{}",
            f.error.detail
        );
        let step = build_one(
            "normalizer",
            json!({"detect_format": false, "when": [{"condition": "true", "transform": ".[]"}]}),
        );
        let f = process(&step, Message::json(json!([1, 2])))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::Expression);
        let text = Message::bytes(&b"a=1"[..])
            .with_header("content-type", "application/x-www-form-urlencoded");
        assert!(process(&step, text).await.is_err(), "detection is off");
        let e = try_build(
            "normalizer",
            &json!({"when": [{"condition": "true", "transform": ". |"}]}),
        )
        .err()
        .unwrap();
        assert_eq!(e.field.as_deref(), Some("when[0].transform"));
    }
}
