//! `filter`: drops messages for which a jq predicate is false (EIP Message Filter).

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
        "filter",
        ComponentKind::Processor,
        "Keep only the messages for which a jq condition holds",
    )
    .description(
        "Evaluates a jq condition on the JSON body (`.`, with `$headers` and `$meta`). If its first \
output is truthy (anything but `false` and `null`), the message continues unchanged; if it is \
`false`, `null`, or there is no output, the message is dropped and **acknowledged**: dropping is \
a deliberate outcome, so the source does not redeliver it (EIP Message Filter).\n\n\
A body that is not valid JSON fails the step with `invalid_input`; a condition that fails at run \
time fails it with `expression`.",
    )
    .field(
        FieldSpec::new("condition", FieldType::Jq, "The jq condition a message must satisfy to continue.")
            .required(),
    )
    .shorthand("condition")
    .example("Keep paid orders", "condition: '.status == \"paid\"'\n")
    .example(
        "Keep messages of one tenant",
        "condition: '$headers[\"x-tenant\"] == \"acme\"'\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    condition: String,
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    let condition = ctx.steps.compile_jq("condition", &config.condition)?;
    Ok(Arc::new(Filter { condition }))
}

struct Filter {
    condition: Arc<dyn JqProgram>,
}

#[async_trait]
impl Processor for Filter {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let (msg, body) = common::json_body(msg)?;
        match self.condition.test(body, &msg).await {
            Ok(true) => Ok(common::one(msg)),
            Ok(false) => {
                msg.ack();
                Ok(Outputs::new())
            }
            Err(e) => Err(Failure::new(msg, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process};
    use serde_json::json;
    use sluice_core::{AckToken, ErrorKind, Outcome};

    #[tokio::test]
    async fn passes_matching_messages_unchanged() {
        let step = build_one("filter", json!(".ok"));
        let msg = Message::json(json!({"ok": true})).with_header("h", "1");
        let id = msg.id();
        let out = process(&step, msg).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].id(), id);
        assert_eq!(out[0].headers["h"], "1");
    }

    #[tokio::test]
    async fn drops_and_acks_the_others() {
        let step = build_one("filter", json!({"condition": ".ok"}));
        for body in [json!({"ok": false}), json!({"ok": null}), json!({})] {
            let (token, rx) = AckToken::channel();
            let out = process(&step, Message::json(body).with_ack(token))
                .await
                .unwrap();
            assert!(out.is_empty());
            assert_eq!(rx.await.unwrap(), Outcome::Ack);
        }
        let step = build_one("filter", json!("empty"));
        let (token, rx) = AckToken::channel();
        assert!(
            process(&step, Message::json(json!(1)).with_ack(token))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
    }

    #[tokio::test]
    async fn invalid_json_is_invalid_input() {
        let step = build_one("filter", json!(".ok"));
        let f = process(&step, Message::bytes(&b"nope"[..]))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::InvalidInput);
        assert_eq!(f.message.body.to_text(), "nope");
    }

    #[tokio::test]
    async fn reads_headers() {
        let step = build_one("filter", json!("$headers.tenant == \"a\""));
        let out = process(&step, Message::json(json!(null)).with_header("tenant", "a")).await;
        assert_eq!(out.unwrap().len(), 1);
    }
}
