//! `choice`: routes each message to the first branch whose condition holds (EIP Content-Based
//! Router; Camel's choice/when/otherwise).

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, Failure, Message, Outputs, Processor};

use super::common;

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "choice",
        ComponentKind::Processor,
        "Route each message through the first branch whose condition holds",
    )
    .description(
        "Evaluates the `when` conditions (jq on the JSON body, with `$headers` and `$meta`) in \
order and runs the message through the steps of the **first** branch whose condition is truthy; \
the outputs of those steps are the outputs of `choice`. If no condition holds, the message runs \
through `otherwise`; with no `otherwise` it passes through unchanged, as in Camel (add \
`otherwise: [{filter: 'false'}]` to drop unmatched messages instead).\n\n\
A body that is not valid JSON fails the step with `invalid_input` (conditions need JSON). A \
failure inside a branch is the failure of the `choice` step.",
    )
    .field(
        FieldSpec::new(
            "when",
            FieldType::List(Box::new(FieldType::Object(vec![
                FieldSpec::new("condition", FieldType::Jq, "The jq condition selecting this branch.")
                    .required(),
                FieldSpec::new("steps", FieldType::Steps, "The steps run when the condition holds.")
                    .required(),
            ]))),
            "The branches, tried in order.",
        )
        .required(),
    )
    .field(FieldSpec::new(
        "otherwise",
        FieldType::Steps,
        "The steps run when no condition holds; without it, unmatched messages pass through.",
    ))
    .example(
        "Route by order size",
        "when:\n  - condition: '.total > 1000'\n    steps:\n      - set_header: {name: x-review, value: manual}\n  - condition: '.total > 100'\n    steps:\n      - set_header: {name: x-review, value: quick}\notherwise:\n  - log: 'small order {{ body.id }}'\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    when: Vec<WhenConfig>,
    otherwise: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WhenConfig {
    condition: String,
    steps: Value,
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    if config.when.is_empty() {
        return Err(BuildError::field("when", "give at least one branch"));
    }
    let mut branches = Vec::with_capacity(config.when.len());
    for (i, when) in config.when.iter().enumerate() {
        let condition = ctx
            .steps
            .compile_jq(&format!("when[{i}].condition"), &when.condition)?;
        let steps = ctx
            .steps
            .build_steps(&format!("when[{i}].steps"), &when.steps)?;
        branches.push((condition, steps));
    }
    let otherwise = match &config.otherwise {
        Some(steps) => Some(ctx.steps.build_steps("otherwise", steps)?),
        None => None,
    };
    Ok(Arc::new(Choice {
        branches,
        otherwise,
    }))
}

struct Choice {
    branches: Vec<(Arc<dyn JqProgram>, Arc<dyn Processor>)>,
    otherwise: Option<Arc<dyn Processor>>,
}

#[async_trait]
impl Processor for Choice {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let (msg, body) = common::json_body(msg)?;
        for (condition, steps) in &self.branches {
            match condition.test(Arc::clone(&body), &msg).await {
                Ok(true) => return steps.process(msg).await,
                Ok(false) => {}
                Err(e) => return Err(Failure::new(msg, e)),
            }
        }
        match &self.otherwise {
            Some(steps) => steps.process(msg).await,
            None => Ok(common::one(msg)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process, try_build};
    use serde_json::json;
    use sluice_core::{AckToken, ErrorKind, Outcome};

    fn router(otherwise: bool) -> Arc<dyn Processor> {
        let mut config = json!({"when": [
            {"condition": ".n > 10", "steps": [{"set_header": {"name": "route", "value": "big"}}]},
            {"condition": ".n > 5", "steps": [{"set_header": {"name": "route", "value": "medium"}}]},
            {"condition": ".n > 0", "steps": [
                {"set_header": {"name": "route", "value": "small"}},
                {"transform": ".n * 100"}
            ]}
        ]});
        if otherwise {
            config["otherwise"] = json!([{"set_header": {"name": "route", "value": "none"}}]);
        }
        build_one("choice", config)
    }

    async fn route(step: &Arc<dyn Processor>, n: i64) -> (Option<String>, Value) {
        let out = process(step, Message::json(json!({"n": n}))).await.unwrap();
        assert_eq!(out.len(), 1);
        (
            out[0].headers.get("route").cloned(),
            out[0].body.json().unwrap().clone(),
        )
    }

    #[tokio::test]
    async fn first_matching_branch_wins() {
        let step = router(true);
        assert_eq!(route(&step, 20).await.0.as_deref(), Some("big"));
        assert_eq!(route(&step, 7).await.0.as_deref(), Some("medium"));
        assert_eq!(route(&step, 1).await, (Some("small".into()), json!(100)));
        assert_eq!(route(&step, -1).await.0.as_deref(), Some("none"));
    }

    #[tokio::test]
    async fn no_match_without_otherwise_passes_through() {
        let step = router(false);
        let (token, rx) = AckToken::channel();
        let msg = Message::json(json!({"n": -1})).with_ack(token);
        let id = msg.id();
        let out = process(&step, msg).await.unwrap();
        assert_eq!(out[0].id(), id);
        assert!(out[0].headers.is_empty());
        out.into_iter().for_each(Message::ack);
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
    }

    #[tokio::test]
    async fn branches_may_drop_the_message() {
        let step = build_one(
            "choice",
            json!({"when": [{"condition": ".drop", "steps": [{"filter": "false"}]}]}),
        );
        let (token, rx) = AckToken::channel();
        let out = process(&step, Message::json(json!({"drop": true})).with_ack(token)).await;
        assert!(out.unwrap().is_empty());
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
    }

    #[tokio::test]
    async fn errors_hand_the_message_back() {
        let step = router(false);
        let f = process(&step, Message::bytes(&b"x"[..])).await.unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::InvalidInput);
        let f = process(&step, Message::json(json!({"n": "text"}))).await;
        // "text" > 10 is true in jq ordering: strings sort after numbers.
        assert!(f.is_ok());
        let f = process(&step, Message::json(json!([1]))).await.unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::Expression);
        assert_eq!(f.message.body.json().unwrap(), &json!([1]));
    }

    #[test]
    fn build_errors_name_the_branch() {
        let e = try_build(
            "choice",
            &json!({"when": [
                {"condition": ".ok", "steps": []},
                {"condition": ".a |", "steps": []}
            ]}),
        )
        .err()
        .unwrap();
        assert_eq!(e.field.as_deref(), Some("when[1].condition"));
        let e = try_build("choice", &json!({"when": []})).err().unwrap();
        assert_eq!(e.field.as_deref(), Some("when"));
    }
}
