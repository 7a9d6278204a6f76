//! `try`: runs steps and handles their failures locally with `catch` clauses and a `finally`
//! block (Camel's doTry/doCatch/doFinally).

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, ErrorKind, Failure, Message, Outputs, Processor};

use super::common;
use crate::resilience::headers;

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "try",
        ComponentKind::Processor,
        "Run steps and handle their failures with catch clauses and a finally block",
    )
    .description(
        "Runs `steps`. If they fail, the failed message gets the `sluice.error.kind`, \
`sluice.error.message`, `sluice.error.step` and `sluice.error.flow` headers and goes to the \
**first** `catch` clause that matches: its `kinds` (any kind when absent) and its `condition` \
(jq on the body, `null` for a body that is not JSON, with `$headers` holding the error headers). \
The outputs of the matching clause's steps are the outputs of `try`: the failure is handled, and \
the message's acknowledgement goes on with them. With no matching clause the failure goes on to \
the flow's own error handling (`retry`, `on_error`, `dead_letter`).\n\n\
`finally` runs after either path: on the success path every output goes through it and its \
outputs are the outputs of `try`; on the failure path (no clause matched, or the clause failed) it \
runs on a copy of the failed message that holds no acknowledgement, its outputs are discarded and \
a failure in it is logged, so the original failure is what the flow sees.",
    )
    .field(FieldSpec::new("steps", FieldType::Steps, "The steps tried.").required())
    .field(FieldSpec::new(
        "catch",
        FieldType::List(Box::new(FieldType::Object(vec![
            FieldSpec::new(
                "kinds",
                FieldType::List(Box::new(FieldType::Enum(ErrorKind::names()))),
                "Error kinds this clause handles; any kind when absent.",
            ),
            FieldSpec::new(
                "condition",
                FieldType::Jq,
                "A jq condition on the failed message that must also hold.",
            ),
            FieldSpec::new("steps", FieldType::Steps, "The steps that handle the failure.")
                .required(),
        ]))),
        "Clauses tried in order on a failure.",
    ))
    .field(FieldSpec::new(
        "finally",
        FieldType::Steps,
        "Steps run after the tried steps, whether they failed or not.",
    ))
    .example(
        "Mark an order unpriced when its quantity is not a number",
        "steps:\n  - transform: '. + {total: ((.qty | tonumber) * .price)}'\ncatch:\n  - kinds: [expression]\n    steps:\n      - transform: '. + {total: null, priced: false}'\n",
    )
    .example(
        "Handle a missing customer, log every lookup",
        "steps:\n  - transform: 'if .customer == null then error(\"no customer\") else . end'\ncatch:\n  - condition: '$headers[\"sluice.error.message\"] | contains(\"no customer\")'\n    steps:\n      - transform: '. + {customer: \"unknown\"}'\nfinally:\n  - log: 'customer lookup done'\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    steps: Value,
    #[serde(default)]
    catch: Vec<CatchConfig>,
    finally: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatchConfig {
    kinds: Option<Vec<ErrorKind>>,
    condition: Option<String>,
    steps: Value,
}

struct Catch {
    kinds: Option<Vec<ErrorKind>>,
    condition: Option<Arc<dyn JqProgram>>,
    steps: Arc<dyn Processor>,
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    let steps = ctx.steps.build_steps("steps", &config.steps)?;
    let mut catches = Vec::with_capacity(config.catch.len());
    for (i, c) in config.catch.iter().enumerate() {
        let condition = match &c.condition {
            Some(code) => Some(
                ctx.steps
                    .compile_jq(&format!("catch[{i}].condition"), code)?,
            ),
            None => None,
        };
        catches.push(Catch {
            kinds: c.kinds.clone(),
            condition,
            steps: ctx
                .steps
                .build_steps(&format!("catch[{i}].steps"), &c.steps)?,
        });
    }
    let finally = match &config.finally {
        Some(steps) => Some(ctx.steps.build_steps("finally", steps)?),
        None => None,
    };
    if catches.is_empty() && finally.is_none() {
        return Err(BuildError::new(
            "a `try` needs a `catch` clause or a `finally` block",
        ));
    }
    Ok(Arc::new(Try {
        flow: ctx.flow.to_owned(),
        steps,
        catches,
        finally,
    }))
}

struct Try {
    flow: String,
    steps: Arc<dyn Processor>,
    catches: Vec<Catch>,
    finally: Option<Arc<dyn Processor>>,
}

impl Try {
    /// The first clause handling `failure`, or `None`; a condition that fails to evaluate is a
    /// failure of its own.
    async fn clause(&self, failure: &Failure) -> Result<Option<&Catch>, sluice_core::ProcessError> {
        for clause in &self.catches {
            if clause
                .kinds
                .as_ref()
                .is_some_and(|kinds| !kinds.contains(&failure.error.kind))
            {
                continue;
            }
            let Some(condition) = &clause.condition else {
                return Ok(Some(clause));
            };
            let body = failure
                .message
                .body
                .json_shared()
                .unwrap_or_else(|_| Arc::new(Value::Null));
            if condition.test(body, &failure.message).await? {
                return Ok(Some(clause));
            }
        }
        Ok(None)
    }

    /// `finally` on the failure path: on a copy without acknowledgement, outputs discarded.
    async fn finally_after_failure(&self, failed: &Message) {
        let Some(finally) = &self.finally else { return };
        if let Err(f) = finally.process(failed.detached()).await {
            tracing::warn!(flow = %self.flow, error = %f.error, "`finally` failed after a failure");
        }
    }
}

#[async_trait]
impl Processor for Try {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let outputs = match self.steps.process(msg).await {
            Ok(outputs) => outputs,
            Err(mut failure) => {
                headers::describe_error(&mut failure.message, &failure.error, &self.flow);
                let clause = match self.clause(&failure).await {
                    Ok(clause) => clause,
                    Err(e) => {
                        self.finally_after_failure(&failure.message).await;
                        return Err(Failure::new(failure.message, e.in_step("catch")));
                    }
                };
                let Some(clause) = clause else {
                    self.finally_after_failure(&failure.message).await;
                    return Err(failure);
                };
                match clause.steps.process(failure.message).await {
                    Ok(outputs) => outputs,
                    Err(second) => {
                        self.finally_after_failure(&second.message).await;
                        return Err(second);
                    }
                }
            }
        };
        let Some(finally) = &self.finally else {
            return Ok(outputs);
        };
        let mut all = Outputs::new();
        for out in outputs {
            all.extend(finally.process(out).await?);
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process, try_build};
    use serde_json::json;
    use sluice_core::{AckToken, Outcome};

    /// `{filter: ...}` on a non-JSON body fails with invalid_input; `transform: error(..)` fails
    /// with expression.
    fn failing_try(catch: Value, finally: Option<Value>) -> Arc<dyn Processor> {
        let mut config = json!({
            "steps": [{"transform": "if .fail then error(\"boom\") else . + {tried: true} end"}],
        });
        config["catch"] = catch;
        if let Some(f) = finally {
            config["finally"] = f;
        }
        build_one("try", config)
    }

    #[tokio::test]
    async fn success_skips_catch_and_runs_finally_on_every_output() {
        let step = failing_try(
            json!([{"steps": [{"transform": "{caught: true}"}]}]),
            Some(json!([{"set_header": {"name": "done", "value": "yes"}}])),
        );
        let out = process(&step, Message::json(json!({"fail": false})))
            .await
            .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].body.json().unwrap()["tried"], json!(true));
        assert_eq!(out[0].headers["done"], "yes");
    }

    #[tokio::test]
    async fn the_first_matching_clause_handles_and_keeps_the_ack() {
        let step = failing_try(
            json!([
                {"kinds": ["timeout"], "steps": [{"transform": "{by: \"timeout\"}"}]},
                {"kinds": ["expression"], "condition": "$headers[\"sluice.error.message\"] | contains(\"boom\")",
                 "steps": [{"transform": "{by: \"expression\"}"}]},
                {"steps": [{"transform": "{by: \"any\"}"}]}
            ]),
            None,
        );
        let (token, rx) = AckToken::channel();
        let out = process(&step, Message::json(json!({"fail": true})).with_ack(token))
            .await
            .unwrap();
        assert_eq!(out[0].body.json().unwrap(), &json!({"by": "expression"}));
        assert_eq!(out[0].headers["sluice.error.kind"], "expression");
        assert_eq!(
            out[0].ack_count(),
            1,
            "the handled message carries the ack on"
        );
        drop(out);
        assert!(
            matches!(rx.await.unwrap(), Outcome::Nack(_)),
            "dropped unresolved"
        );
    }

    #[tokio::test]
    async fn no_matching_clause_rethrows_after_finally_on_a_detached_copy() {
        let step = failing_try(
            json!([{"kinds": ["timeout"], "steps": [{"transform": "{}"}]}]),
            Some(json!([{"filter": "false"}])),
        );
        let (token, rx) = AckToken::channel();
        let failure = process(&step, Message::json(json!({"fail": true})).with_ack(token))
            .await
            .unwrap_err();
        assert_eq!(failure.error.kind, ErrorKind::Expression);
        // finally's filter acked its copy; the failed message still holds the only share.
        assert_eq!(failure.message.ack_count(), 1);
        failure.message.nack("test");
        assert!(matches!(rx.await.unwrap(), Outcome::Nack(_)));
    }

    #[tokio::test]
    async fn a_failing_clause_is_the_failure() {
        let step = failing_try(json!([{"steps": [{"filter": ".fail | .x"}]}]), None);
        let failure = process(&step, Message::json(json!({"fail": true})))
            .await
            .unwrap_err();
        // The failure of the clause's own step (indexing a string), not the original one.
        assert_eq!(failure.error.kind, ErrorKind::Expression);
        assert!(
            !failure.error.detail.contains("boom"),
            "{}",
            failure.error.detail
        );
    }

    #[test]
    fn needs_catch_or_finally() {
        let Err(e) = try_build("try", &json!({"steps": [{"log": "x"}]})) else {
            panic!("built without catch or finally");
        };
        assert!(e.message.contains("needs a `catch`"), "{}", e.message);
    }
}
