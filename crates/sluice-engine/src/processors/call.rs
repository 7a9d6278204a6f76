//! `call`: sends the message to the flow reading a channel and continues with that flow's reply
//! (EIP Request-Reply over an in-process channel; Camel's `direct:` endpoint). How a process API
//! calls a system API flow in the same process, and what `enrich` uses to ask another flow.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    BuildContext, BuildError, ErrorKind, Failure, Message, Outputs, ProcessError, Processor,
};

use super::common;
use crate::channel::{CAPTURE_PREFIX, Channels};

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "call",
        ComponentKind::Processor,
        "Send the message to the flow reading a channel and continue with its reply",
    )
    .description(
        "Runs a copy of the message through the flow that reads channel `channel` (`from: \
{channel: NAME}`) and waits until that flow has finished with it, its targets included; the \
flow's results (what an HTTP caller would get as the reply) become this step's outputs \
(EIP Request-Reply; Camel's `direct:`). The called flow runs with its own `concurrency`, \
`ordered_by` and error handling; the channel's queue is bypassed, so `call` waits for a \
concurrency slot of that flow rather than for room in the queue.\n\n\
**Replies.** One result replaces the message (its body and headers are the called flow's); \
several results (the called flow splits) continue as several messages; no result (the called \
flow filtered the message out) lets the original continue unchanged.\n\n\
**Acknowledgement.** The copy sent holds no share of the source's acknowledgement: the called \
flow's targets committing does not acknowledge this flow's source. The outputs carry the \
original's shares, so the source is acknowledged when this flow finishes.\n\n\
**Errors.** No flow reads the channel, or it is not running (starting up, shut down): \
`unavailable`. No reply within `timeout`: `timeout` (the called flow is not interrupted; it \
finishes on its own). The called flow failed (after its own error handling): the same error \
kind, with the detail naming the channel; if that flow dead-letters, the message is \
dead-lettered there and fails here too, so give error handling to one of the two flows. A flow \
that calls its own channel waits on itself until `timeout`.\n\n\
Under `sluice test` the called flow is not running: the request is recorded under the target \
`channel:NAME` and the message continues unchanged; give the step an `id` and a `mocks:` entry \
for a canned reply.",
    )
    .field(
        FieldSpec::new(
            "channel",
            FieldType::String,
            "The channel whose reading flow answers.",
        )
        .required(),
    )
    .field(
        FieldSpec::new(
            "timeout",
            FieldType::Duration,
            "How long to wait for the called flow to finish.",
        )
        .default_value("30s"),
    )
    .shorthand("channel")
    .example("Ask the customer system API flow", "customer-lookup\n")
    .example(
        "Call with a shorter timeout",
        "channel: price-quote\ntimeout: 2s\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    channel: String,
    #[serde(default = "thirty_seconds")]
    timeout: HumanDuration,
}

// Repeats the spec's default for configurations that did not go through validation (unit tests).
fn thirty_seconds() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    if config.timeout.0.is_zero() {
        return Err(BuildError::field(
            "timeout",
            "give a duration longer than zero",
        ));
    }
    Ok(Arc::new(Call {
        channel: config.channel,
        timeout: config.timeout.0,
        channels: ctx.resources.get_or_default::<Channels>(),
    }))
}

struct Call {
    channel: String,
    timeout: Duration,
    channels: Arc<Channels>,
}

impl Call {
    fn unavailable(&self, why: &str) -> ProcessError {
        ProcessError::new(
            ErrorKind::Unavailable,
            format!("cannot call channel `{}`: {why}", self.channel),
        )
    }
}

#[async_trait]
impl Processor for Call {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        if !self.channels.has_reader(&self.channel) {
            let why = format!(
                "no flow reads it; add a flow with `from: {{channel: {}}}`",
                self.channel
            );
            return Err(Failure::new(msg, self.unavailable(&why)));
        }
        if let Some(captured) = self.channels.captured() {
            captured.push(&format!("{CAPTURE_PREFIX}{}", self.channel), msg.detached());
            return Ok(common::one(msg));
        }
        let Some(flow) = self.channels.serving(&self.channel) else {
            let error = self.unavailable("the flow reading it is not running");
            return Err(Failure::new(msg, error));
        };
        let replies = match tokio::time::timeout(self.timeout, flow.dispatch(msg.detached())).await
        {
            Ok(Ok(replies)) => replies,
            Ok(Err(failure)) => {
                let error = ProcessError::new(
                    failure.error.kind,
                    format!(
                        "the flow reading channel `{}` failed: {}",
                        self.channel, failure.error
                    ),
                );
                return Err(Failure::new(msg, error));
            }
            Err(_elapsed) => {
                let error = ProcessError::new(
                    ErrorKind::Timeout,
                    format!(
                        "the flow reading channel `{}` did not finish within {}",
                        self.channel,
                        HumanDuration(self.timeout)
                    ),
                );
                return Err(Failure::new(msg, error));
            }
        };
        Ok(carry_acks(msg, replies))
    }
}

/// The replies, each holding a share of the original's acknowledgement; the original itself
/// when there is no reply.
fn carry_acks(original: Message, replies: Vec<Message>) -> Outputs {
    let Some(last) = replies.len().checked_sub(1) else {
        return common::one(original);
    };
    let mut original = Some(original);
    let mut outputs = Outputs::with_capacity(replies.len());
    for (i, mut reply) in replies.into_iter().enumerate() {
        let shares = if i == last {
            original.take()
        } else {
            // A clone holds a new share of each of the original's acknowledgements.
            original.clone()
        };
        if let Some(shares) = shares {
            reply.absorb_acks(shares);
        }
        outputs.push(reply);
    }
    outputs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::build_with_resources;
    use serde_json::json;
    use sluice_core::{AckToken, Dispatch, Outcome, Resources};

    /// Stands for a called flow: answers with `replies` copies of the body plus `{answered}`,
    /// or fails, or never answers.
    enum Answer {
        Replies(usize),
        Fail(ErrorKind),
        Never,
    }

    #[async_trait]
    impl Dispatch for Answer {
        async fn dispatch(&self, msg: Message) -> Result<Vec<Message>, Failure> {
            assert_eq!(
                msg.ack_count(),
                0,
                "the request holds no share of the source"
            );
            match self {
                Answer::Replies(n) => Ok((0..*n)
                    .map(|i| {
                        let body = msg.body.json().cloned().unwrap_or_default();
                        Message::json(json!({"request": body, "answered": i}))
                            .with_header("from", "called")
                    })
                    .collect()),
                Answer::Fail(kind) => Err(Failure::new(msg, ProcessError::new(*kind, "boom"))),
                Answer::Never => std::future::pending().await,
            }
        }
    }

    fn call_with(answer: Option<Answer>) -> Arc<dyn Processor> {
        let resources = Arc::new(Resources::default());
        let channels = resources.get_or_default::<Channels>();
        channels.declare_reader("quotes", 8);
        if let Some(answer) = answer {
            channels.set_serving("quotes", Some(Arc::new(answer)));
        }
        let config = json!({"channel": "quotes", "timeout": "1s"});
        build_with_resources("call", config, &resources)
    }

    fn sourced(body: Value) -> (Message, tokio::sync::oneshot::Receiver<Outcome>) {
        let (token, rx) = AckToken::channel();
        (Message::json(body).with_ack(token), rx)
    }

    #[tokio::test]
    async fn the_reply_replaces_the_message_and_carries_the_sources_ack() {
        let step = call_with(Some(Answer::Replies(1)));
        let (msg, mut ack) = sourced(json!({"sku": 7}));
        let mut out = step.process(msg).await.unwrap();
        assert_eq!(out.len(), 1);
        let reply = out.pop().unwrap();
        assert_eq!(
            reply.body.json().unwrap(),
            &json!({"request": {"sku": 7}, "answered": 0})
        );
        assert_eq!(reply.headers["from"], "called");
        assert!(
            ack.try_recv().is_err(),
            "not acked before this flow is done"
        );
        reply.ack();
        assert_eq!(ack.await.unwrap(), Outcome::Ack);
    }

    #[tokio::test]
    async fn several_replies_share_the_ack_and_none_passes_the_original() {
        let step = call_with(Some(Answer::Replies(3)));
        let (msg, mut ack) = sourced(json!(1));
        let out = step.process(msg).await.unwrap();
        assert_eq!(out.len(), 3);
        let mut out = out.into_iter();
        out.next().unwrap().ack();
        out.next().unwrap().ack();
        assert!(ack.try_recv().is_err(), "one reply still in flight");
        out.next().unwrap().ack();
        assert_eq!(ack.await.unwrap(), Outcome::Ack);

        let step = call_with(Some(Answer::Replies(0)));
        let (msg, _ack) = sourced(json!({"keep": true}));
        let id = msg.id();
        let out = step.process(msg).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].id(), id);
        assert_eq!(out[0].body.json().unwrap(), &json!({"keep": true}));
    }

    #[tokio::test]
    async fn a_failed_call_keeps_the_kind_and_names_the_channel() {
        let step = call_with(Some(Answer::Fail(ErrorKind::Rejected)));
        let (msg, _ack) = sourced(json!({"n": 1}));
        let failure = step.process(msg).await.unwrap_err();
        assert_eq!(failure.error.kind, ErrorKind::Rejected);
        assert!(
            failure.error.detail.contains("`quotes`"),
            "{}",
            failure.error.detail
        );
        assert_eq!(failure.message.body.json().unwrap(), &json!({"n": 1}));
        assert_eq!(
            failure.message.ack_count(),
            1,
            "the original keeps its share"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_reply_within_the_timeout_is_a_timeout() {
        let step = call_with(Some(Answer::Never));
        let (msg, _ack) = sourced(json!(1));
        let failure = step.process(msg).await.unwrap_err();
        assert_eq!(failure.error.kind, ErrorKind::Timeout);
        assert!(
            failure.error.detail.contains("1s"),
            "{}",
            failure.error.detail
        );
    }

    #[tokio::test]
    async fn a_channel_without_a_running_reader_is_unavailable() {
        let step = call_with(None);
        let failure = step.process(Message::json(json!(1))).await.unwrap_err();
        assert_eq!(failure.error.kind, ErrorKind::Unavailable);
        assert!(
            failure.error.detail.contains("not running"),
            "{}",
            failure.error.detail
        );

        let step = crate::processors::testkit::build_one("call", json!("nobody"));
        let failure = step.process(Message::json(json!(1))).await.unwrap_err();
        assert_eq!(failure.error.kind, ErrorKind::Unavailable);
        assert!(
            failure.error.detail.contains("from: {channel: nobody}"),
            "{}",
            failure.error.detail
        );
    }
}
