//! `enrich`: fetches a resource with nested steps and merges it into the body (EIP Content
//! Enricher; Camel's enrich).

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, Failure, Message, Outputs, ProcessError, Processor};

use super::common;

/// The merge used when none is given.
const DEFAULT_MERGE: &str = ". + {enrichment: $result}";

/// The header a message carries the enrichment's error in, with `on_failure: keep`.
pub const ERROR_HEADER: &str = "sluice.enrich.error";

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "enrich",
        ComponentKind::Processor,
        "Fetch a resource with nested steps and merge it into the body",
    )
    .description(
        "Runs the nested `steps` (typically an `http` request, a `call` to another flow, a cache lookup or a `transform`) on \
a **copy** of the message to obtain a resource, then merges that resource into the original body \
with the jq expression `merge` (EIP Content Enricher). In `merge`, `.` is the original body, \
`$result` is the resource's body (JSON, or a string when it is not JSON), and `$headers`/`$meta` \
are the original message's. The default merge is `. + {enrichment: $result}`.\n\n\
The **original message** continues: same id, headers and acknowledgement, with the merged body \
(and `content-type: application/json`). Nothing the nested steps do to the copy's headers \
reaches it; read what you need from `$result`. The copy holds no acknowledgement share: the \
nested steps cannot ack or nack the source.\n\n\
* When the steps produce several messages, `$result` is the array of their bodies.\n\
* When they produce none (a `filter` dropped the copy): `on_missing: fail` (default) fails with \
`invalid_input`; `keep` passes the message on unchanged; `null` merges with `$result = null`.\n\
* When they fail: `on_failure: fail` (default) fails the step with the nested error's kind and \
detail (prefixed `enrichment failed:`), so retry and error handlers see e.g. `unavailable`; \
`keep` passes the message on unchanged with the header `sluice.enrich.error` holding the error.\n\n\
The merge must produce exactly one value; otherwise the step fails with `expression`. A body that \
is not JSON fails with `invalid_input` before the steps run.",
    )
    .field(
        FieldSpec::new(
            "steps",
            FieldType::Steps,
            "The steps that obtain the resource, run on a copy of the message.",
        )
        .required(),
    )
    .field(
        // A string rather than `FieldType::Jq`: the loader checks jq fields on their own, where
        // `$result` is not bound; `build` compiles it with the binding and reports errors there.
        FieldSpec::new(
            "merge",
            FieldType::String,
            "jq merging the resource into the body: `.` is the body, `$result` the resource (compiled at load time).",
        )
        .default_value(DEFAULT_MERGE),
    )
    .field(
        FieldSpec::new(
            "on_missing",
            FieldType::Enum(vec!["fail", "keep", "null"]),
            "When the steps produce no message: fail, keep the body as it is, or merge `null`.",
        )
        .default_value("fail"),
    )
    .field(
        FieldSpec::new(
            "on_failure",
            FieldType::Enum(vec!["fail", "keep"]),
            "When the steps fail: fail the step, or keep the body and record the error in `sluice.enrich.error`.",
        )
        .default_value("fail"),
    )
    .example(
        "Add the customer record to an order",
        "steps:\n  - transform: '{name: \"Ada\", tier: \"gold\", id: .customer_id}'\nmerge: '. + {customer: $result}'\n",
    )
    .example(
        "Best-effort price lookup",
        "steps:\n  - transform: '{price: 10}'\nmerge: '.price = $result.price'\non_failure: keep\non_missing: keep\n",
    )
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum OnMissing {
    #[default]
    Fail,
    Keep,
    Null,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum OnFailure {
    #[default]
    Fail,
    Keep,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    steps: Value,
    merge: Option<String>,
    #[serde(default)]
    on_missing: OnMissing,
    #[serde(default)]
    on_failure: OnFailure,
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    let steps = ctx.steps.build_steps("steps", &config.steps)?;
    let merge = config.merge.as_deref().unwrap_or(DEFAULT_MERGE);
    // jq programs see `$headers` and `$meta` only; rather than widen that contract for one step,
    // the merge runs on `[body, result]` and binds `$result` itself, then restores `.`.
    let wrapped = format!(".[1] as $result | .[0] | ({merge}\n)");
    let merge = ctx.steps.compile_jq("merge", &wrapped)?;
    Ok(Arc::new(Enrich {
        steps,
        merge,
        on_missing: config.on_missing,
        on_failure: config.on_failure,
    }))
}

struct Enrich {
    steps: Arc<dyn Processor>,
    merge: Arc<dyn JqProgram>,
    on_missing: OnMissing,
    on_failure: OnFailure,
}

/// A resource body as JSON, or its text.
fn resource(msg: &Message) -> Value {
    msg.body
        .json()
        .cloned()
        .unwrap_or_else(|_| Value::String(msg.body.to_text()))
}

impl Enrich {
    /// Runs the steps on a copy; `Ok(None)` when they produced nothing.
    async fn fetch(&self, msg: &Message) -> Result<Option<Value>, ProcessError> {
        let outputs = self
            .steps
            .process(msg.detached())
            .await
            .map_err(|failure| {
                let error = failure.error;
                // The copy holds no share; resolving it is only for form.
                failure.message.ack();
                ProcessError {
                    detail: format!("enrichment failed: {}", error),
                    step: None,
                    ..error
                }
            })?;
        let mut bodies: Vec<Value> = outputs
            .into_iter()
            .map(|out| {
                let body = resource(&out);
                out.ack();
                body
            })
            .collect();
        Ok(match bodies.len() {
            0 => None,
            1 => bodies.pop(),
            _ => Some(Value::Array(bodies)),
        })
    }
}

#[async_trait]
impl Processor for Enrich {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let (mut msg, body) = common::json_body(msg)?;
        let result = match self.fetch(&msg).await {
            Ok(Some(result)) => result,
            Ok(None) => match self.on_missing {
                OnMissing::Fail => {
                    let e = ProcessError::invalid_input(
                        "the enrichment steps produced no message; set `on_missing: keep` or `null` to carry on without it",
                    );
                    return Err(Failure::new(msg, e));
                }
                OnMissing::Keep => return Ok(common::one(msg)),
                OnMissing::Null => Value::Null,
            },
            Err(e) => match self.on_failure {
                OnFailure::Fail => return Err(Failure::new(msg, e)),
                OnFailure::Keep => {
                    msg.headers.insert(ERROR_HEADER.to_owned(), e.to_string());
                    return Ok(common::one(msg));
                }
            },
        };
        let input = Arc::new(Value::Array(vec![body.as_ref().clone(), result]));
        let mut merged = match self.merge.run(input, &msg).await {
            Ok(merged) => merged,
            Err(e) => return Err(Failure::new(msg, e)),
        };
        if merged.len() != 1 {
            let e = ProcessError::expression(format!(
                "the merge produced {} outputs but needs exactly one",
                merged.len()
            ));
            return Err(Failure::new(msg, e));
        }
        common::set_json_body(&mut msg, merged.pop().unwrap_or_default());
        Ok(common::one(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process, try_build};
    use serde_json::json;
    use sluice_core::{AckToken, ErrorKind, Outcome};

    #[tokio::test]
    async fn merges_the_resource_into_the_original_message() {
        let step = build_one(
            "enrich",
            json!({
                "steps": [
                    {"set_header": {"name": "from-steps", "value": "x"}},
                    {"transform": "{name: \"Ada\", id: .customer}"}
                ],
                "merge": ". + {customer: $result, tenant: $headers.tenant}"
            }),
        );
        let (token, rx) = AckToken::channel();
        let msg = Message::json(json!({"order": 1, "customer": 7}))
            .with_header("tenant", "acme")
            .with_ack(token);
        let id = msg.id();
        let out = process(&step, msg).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].id(), id);
        assert_eq!(
            out[0].body.json().unwrap(),
            &json!({"order": 1, "customer": {"name": "Ada", "id": 7}, "tenant": "acme"})
        );
        assert!(!out[0].headers.contains_key("from-steps"));
        assert_eq!(out[0].ack_count(), 1);
        out.into_iter().for_each(Message::ack);
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
    }

    #[tokio::test]
    async fn the_default_merge_adds_an_enrichment_member() {
        let step = build_one("enrich", json!({"steps": [{"transform": ".a * 2"}]}));
        let out = process(&step, Message::json(json!({"a": 2})))
            .await
            .unwrap();
        assert_eq!(
            out[0].body.json().unwrap(),
            &json!({"a": 2, "enrichment": 4})
        );
    }

    #[tokio::test]
    async fn several_results_are_an_array_and_text_is_a_string() {
        let step = build_one(
            "enrich",
            json!({"steps": [{"transform": {"expression": ".[]", "outputs": "array"}}, {"template": "{{ body | length }} items"}],
                   "merge": "{n: $result}"}),
        );
        let out = process(&step, Message::json(json!([1, 2]))).await.unwrap();
        assert_eq!(out[0].body.json().unwrap(), &json!({"n": "2 items"}));
    }

    #[tokio::test]
    async fn missing_results_fail_keep_or_merge_null() {
        let drop = json!([{"filter": "false"}]);
        let step = build_one("enrich", json!({"steps": drop}));
        let (token, rx) = AckToken::channel();
        let f = process(&step, Message::json(json!({"a": 1})).with_ack(token))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::InvalidInput);
        assert!(f.error.detail.contains("produced no message"));
        assert_eq!(f.message.ack_count(), 1, "the failure carries the share");
        f.message.nack("x");
        assert!(matches!(rx.await.unwrap(), Outcome::Nack(_)));
        let step = build_one("enrich", json!({"steps": drop, "on_missing": "keep"}));
        let out = process(&step, Message::json(json!({"a": 1})))
            .await
            .unwrap();
        assert_eq!(out[0].body.json().unwrap(), &json!({"a": 1}));
        let step = build_one(
            "enrich",
            json!({"steps": drop, "on_missing": "null", "merge": ".b = $result"}),
        );
        let out = process(&step, Message::json(json!({"a": 1})))
            .await
            .unwrap();
        assert_eq!(out[0].body.json().unwrap(), &json!({"a": 1, "b": null}));
    }

    #[tokio::test]
    async fn failures_fail_with_their_kind_or_are_recorded() {
        let failing = json!([{"transform": ".x.y"}]);
        let step = build_one("enrich", json!({"steps": failing}));
        let f = process(&step, Message::json(json!({"x": "s"})))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::Expression);
        assert!(
            f.error.detail.starts_with("enrichment failed: "),
            "{}",
            f.error.detail
        );
        assert_eq!(f.message.body.json().unwrap(), &json!({"x": "s"}));
        let step = build_one("enrich", json!({"steps": failing, "on_failure": "keep"}));
        let out = process(&step, Message::json(json!({"x": "s"})))
            .await
            .unwrap();
        assert_eq!(out[0].body.json().unwrap(), &json!({"x": "s"}));
        assert!(out[0].headers[ERROR_HEADER].contains("enrichment failed"));
    }

    #[tokio::test]
    async fn merge_errors_and_definitions() {
        let step = build_one(
            "enrich",
            json!({"steps": [{"transform": "1"}], "merge": "def twice: . * 2; {r: ($result | twice)}"}),
        );
        let out = process(&step, Message::json(json!({}))).await.unwrap();
        assert_eq!(out[0].body.json().unwrap(), &json!({"r": 2}));
        let step = build_one(
            "enrich",
            json!({"steps": [{"transform": "1"}], "merge": "empty"}),
        );
        let f = process(&step, Message::json(json!({}))).await.unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::Expression);
        let e = try_build("enrich", &json!({"steps": [], "merge": ". +"}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("merge"));
        let e = try_build("enrich", &json!({"steps": [{"nope": {}}]}))
            .err()
            .unwrap();
        assert!(e.message.contains("nope"), "{e}");
    }
}
