//! `recipient_list`: sends each message to a list of channels, fixed or computed from the message
//! (EIP Recipient List).

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    BuildContext, BuildError, ErrorKind, Failure, Message, Outputs, ProcessError, Processor,
    Resources,
};

use super::common;
use super::routes::names_from;
use crate::channel;

/// Set on the message that continues: the channels it was delivered to, comma-separated.
pub const DELIVERED_HEADER: &str = "sluice.recipient_list.delivered";

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "recipient_list",
        ComponentKind::Processor,
        "Send each message to a list of channels, fixed or computed from the message",
    )
    .description(
        "Delivers a copy of the message to each in-memory channel of the list (each read by a \
flow with `from: {channel: ...}`): the fixed `recipients`, or the names computed by `expression`, \
a jq expression on the JSON body (with `$headers` and `$meta`) whose first value is a channel \
name, a comma-separated string of names, an array of names, or `null` for none. Give exactly one \
of the two. A name listed twice is delivered once. Delivery waits while a channel is full \
(backpressure).\n\n\
**The message continues** after the deliveries, unchanged but for the header \
`sluice.recipient_list.delivered` (the channels delivered to, comma-separated, in list order), so \
the flow can go on (reply to a caller, for example); add `filter: 'false'` after the step to end \
it there.\n\n\
**Acknowledgement.** Each copy holds a share of the source's acknowledgement, and so does the \
continuing message: the source is acknowledged only when every recipient flow has finished with \
its copy and the rest of this flow is done, and nacked if any of them fails.\n\n\
**Errors.** A channel that no flow reads fails the step with `unavailable` naming the channel; \
with `ignore_invalid: true` it is skipped with a warning instead. An expression that fails is an \
`expression` failure; one that gives anything but names an `invalid_input` failure. With \
`parallel: false` (the default) copies are delivered in list order and the first failure stops \
the rest; with `parallel: true` all are delivered concurrently and the first failure in list \
order is reported. Copies already delivered when a later one fails stay delivered: on \
redelivery of the source they are sent again (at-least-once).\n\n\
When the flow loads, every channel in `recipients` must be read by a flow. Channels computed by \
`expression` are only known at run time, so while a project has such a step, a flow reading a \
channel that no flow names as a destination is not reported as unfed.",
    )
    .field(FieldSpec::new(
        "recipients",
        FieldType::List(Box::new(FieldType::String)),
        "The channels every message is sent to.",
    ))
    .field(FieldSpec::new(
        "expression",
        FieldType::Jq,
        "jq computing the channels from the message: a name, comma-separated names, an array of names, or null.",
    ))
    .field(
        FieldSpec::new(
            "parallel",
            FieldType::Bool,
            "Deliver to every channel concurrently instead of in list order.",
        )
        .default_value(false),
    )
    .field(
        FieldSpec::new(
            "ignore_invalid",
            FieldType::Bool,
            "Skip, with a warning, channels that no flow reads instead of failing.",
        )
        .default_value(false),
    )
    .example(
        "Every order to billing and shipping",
        "recipients: [billing, shipping]\n",
    )
    .example(
        "Recipients chosen by a header, unknown ones skipped",
        "expression: '$headers[\"x-notify\"]'\nignore_invalid: true\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    recipients: Option<Vec<String>>,
    expression: Option<String>,
    #[serde(default)]
    parallel: bool,
    #[serde(default)]
    ignore_invalid: bool,
}

enum Recipients {
    Fixed(Vec<String>),
    Computed(Arc<dyn JqProgram>),
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    let recipients = match (config.recipients, &config.expression) {
        (Some(list), None) if list.is_empty() => {
            return Err(BuildError::field("recipients", "give at least one channel"));
        }
        (Some(list), None) => Recipients::Fixed(dedup(list)),
        (None, Some(code)) => Recipients::Computed(ctx.steps.compile_jq("expression", code)?),
        (Some(_), Some(_)) => {
            return Err(BuildError::field(
                "expression",
                "give `recipients` or `expression`, not both",
            ));
        }
        (None, None) => {
            return Err(BuildError::new(
                "give `recipients` (fixed channels) or `expression` (channels computed by jq)",
            ));
        }
    };
    Ok(Arc::new(RecipientList {
        recipients,
        parallel: config.parallel,
        ignore_invalid: config.ignore_invalid,
        resources: Arc::clone(ctx.resources),
        flow: ctx.flow.to_owned(),
    }))
}

/// The names in first-seen order, each once.
fn dedup(names: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

struct RecipientList {
    recipients: Recipients,
    parallel: bool,
    ignore_invalid: bool,
    resources: Arc<Resources>,
    flow: String,
}

impl RecipientList {
    async fn names(&self, msg: &Message) -> Result<Vec<String>, ProcessError> {
        match &self.recipients {
            Recipients::Fixed(names) => Ok(names.clone()),
            Recipients::Computed(program) => {
                let body = msg
                    .body
                    .json_shared()
                    .map_err(|e| ProcessError::invalid_input(e.to_string()))?;
                let values = program.run(body, msg).await?;
                Ok(dedup(names_from(values, "expression")?))
            }
        }
    }

    /// Delivers a copy (with a new acknowledgement share) to `name`; `Ok(false)` when skipped.
    async fn deliver(&self, name: &str, msg: &Message) -> Result<bool, ProcessError> {
        match channel::sender(&self.resources, name).deliver(msg).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind == ErrorKind::Unavailable && self.ignore_invalid => {
                tracing::warn!(flow = %self.flow, channel = name, error = %e, "recipient skipped");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl Processor for RecipientList {
    async fn process(&self, mut msg: Message) -> Result<Outputs, Failure> {
        let names = match self.names(&msg).await {
            Ok(names) => names,
            Err(e) => return Err(Failure::new(msg, e)),
        };
        let results: Vec<Result<bool, ProcessError>> = if self.parallel {
            futures_util::future::join_all(names.iter().map(|n| self.deliver(n, &msg))).await
        } else {
            let mut results = Vec::with_capacity(names.len());
            for name in &names {
                let result = self.deliver(name, &msg).await;
                let failed = result.is_err();
                results.push(result);
                if failed {
                    break;
                }
            }
            results
        };
        let mut delivered = Vec::with_capacity(names.len());
        for (name, result) in names.iter().zip(results) {
            match result {
                Ok(true) => delivered.push(name.as_str()),
                Ok(false) => {}
                Err(e) => return Err(Failure::new(msg, e)),
            }
        }
        msg.headers
            .insert(DELIVERED_HEADER.to_owned(), delivered.join(","));
        Ok(common::one(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Channels;
    use crate::processors::testkit::{build_with_resources, process, try_build};
    use serde_json::json;
    use sluice_core::{AckToken, Outcome};
    use tokio::sync::mpsc::Receiver;

    /// Resources where flows read `names`, and the receiving ends.
    fn channels(names: &[&str]) -> (Arc<Resources>, Vec<Receiver<Message>>) {
        let resources = Arc::new(Resources::default());
        let channels = resources.get_or_default::<Channels>();
        let receivers = names
            .iter()
            .map(|name| {
                channels.declare_reader(name, 8);
                channels.take_receiver(name).unwrap()
            })
            .collect();
        (resources, receivers)
    }

    #[tokio::test]
    async fn every_recipient_gets_a_copy_holding_a_share() {
        for parallel in [false, true] {
            let (resources, mut rx) = channels(&["a", "b"]);
            let step = build_with_resources(
                "recipient_list",
                json!({"recipients": ["a", "b", "a"], "parallel": parallel}),
                &resources,
            );
            let (token, mut ack) = AckToken::channel();
            let out = process(&step, Message::json(json!({"n": 1})).with_ack(token))
                .await
                .unwrap();
            assert_eq!(out[0].headers[DELIVERED_HEADER], "a,b");
            let a = rx[0].recv().await.unwrap();
            let b = rx[1].recv().await.unwrap();
            assert!(
                rx[0].try_recv().is_err(),
                "`a` listed twice, delivered once"
            );
            assert_eq!(b.body.json().unwrap(), &json!({"n": 1}));
            // The main message and both copies must be done before the source is acked.
            out.into_iter().for_each(Message::ack);
            a.ack();
            assert!(
                ack.try_recv().is_err(),
                "acked before recipient `b` was done"
            );
            b.ack();
            assert_eq!(ack.await.unwrap(), Outcome::Ack);
        }
    }

    #[tokio::test]
    async fn a_recipient_that_fails_nacks_the_source() {
        let (resources, mut rx) = channels(&["a"]);
        let step = build_with_resources("recipient_list", json!({"recipients": ["a"]}), &resources);
        let (token, ack) = AckToken::channel();
        let out = process(&step, Message::json(json!(1)).with_ack(token))
            .await
            .unwrap();
        out.into_iter().for_each(Message::ack);
        rx[0].recv().await.unwrap().nack("recipient flow failed");
        assert_eq!(
            ack.await.unwrap(),
            Outcome::Nack("recipient flow failed".into())
        );
    }

    #[tokio::test]
    async fn computed_recipients_and_unknown_channels() {
        let (resources, mut rx) = channels(&["eu", "us"]);
        let step = build_with_resources(
            "recipient_list",
            json!({"expression": ".regions"}),
            &resources,
        );
        let out = process(&step, Message::json(json!({"regions": "us, eu"})))
            .await
            .unwrap();
        assert_eq!(out[0].headers[DELIVERED_HEADER], "us,eu");
        assert!(rx[1].recv().await.is_some() && rx[0].recv().await.is_some());
        let out = process(&step, Message::json(json!({"regions": null})))
            .await
            .unwrap();
        assert_eq!(out[0].headers[DELIVERED_HEADER], "");

        let failure = process(&step, Message::json(json!({"regions": ["eu", "asia"]})))
            .await
            .unwrap_err();
        assert_eq!(failure.error.kind, ErrorKind::Unavailable);
        assert!(
            failure.error.detail.contains("`asia`"),
            "{}",
            failure.error.detail
        );
        let failure = process(&step, Message::json(json!({"regions": 3})))
            .await
            .unwrap_err();
        assert_eq!(failure.error.kind, ErrorKind::InvalidInput);

        let lenient = build_with_resources(
            "recipient_list",
            json!({"expression": ".regions", "ignore_invalid": true}),
            &resources,
        );
        let out = process(&lenient, Message::json(json!({"regions": ["asia", "eu"]})))
            .await
            .unwrap();
        assert_eq!(out[0].headers[DELIVERED_HEADER], "eu");
    }

    #[test]
    fn needs_exactly_one_source_of_names() {
        assert!(try_build("recipient_list", &json!({})).is_err());
        let e = try_build("recipient_list", &json!({"recipients": []}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("recipients"));
        let e = try_build(
            "recipient_list",
            &json!({"recipients": ["a"], "expression": ".x"}),
        )
        .err()
        .unwrap();
        assert_eq!(e.field.as_deref(), Some("expression"));
    }
}
