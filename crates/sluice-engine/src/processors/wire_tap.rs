//! `wire_tap`: sends a copy of each message elsewhere, in the background, and lets the message
//! go on unchanged (EIP Wire Tap).

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, Failure, Message, Outputs, Processor, Sink};

use super::common;
use crate::background::Background;
use crate::channel;

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "wire_tap",
        ComponentKind::Processor,
        "Send a copy of each message to a channel or through steps, in the background",
    )
    .description(
        "Makes a copy of the message (same id, headers and body) and, without waiting, sends it \
to the in-memory `channel` read by another flow, or runs it through `steps` whose outputs are \
discarded. Give exactly one of the two. The message itself continues at once, unchanged.\n\n\
**Fire and forget (at most once).** The copy holds no share of the source's acknowledgement: the \
source does not wait for the tap, and a tap that fails, or is still running when the process \
stops, is not retried. A tap failure (no flow reads the channel, a step fails) is logged as a \
warning with the flow and step, and never fails the message. For a copy that must be delivered, \
use `multicast` or `recipient_list`, whose copies hold a share of the acknowledgement.\n\n\
Under `sluice test` the copies sent to a channel are captured under the target \
`channel:<name>`, and the test waits for taps to finish before checking expectations.",
    )
    .field(FieldSpec::new(
        "channel",
        FieldType::String,
        "The channel the copy is sent to (a flow must read it with `from: {channel: ...}`).",
    ))
    .field(FieldSpec::new(
        "steps",
        FieldType::Steps,
        "Steps the copy runs through instead; their outputs are discarded.",
    ))
    .shorthand("channel")
    .example("Copy every order to the audit flow", "audit\n")
    .example(
        "Log a redacted copy",
        "steps:\n  - transform: 'del(.card)'\n  - log: 'order seen: {{ text }}'\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    channel: Option<String>,
    steps: Option<Value>,
}

/// Where the copy goes.
enum Tap {
    Channel(Arc<dyn Sink>),
    Steps(Arc<dyn Processor>),
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    let tap = match (config.channel, &config.steps) {
        (Some(name), None) => Tap::Channel(channel::sender(ctx.resources, &name)),
        (None, Some(steps)) => Tap::Steps(ctx.steps.build_steps("steps", steps)?),
        (Some(_), Some(_)) => {
            return Err(BuildError::field(
                "steps",
                "give `channel` or `steps`, not both",
            ));
        }
        (None, None) => {
            return Err(BuildError::new(
                "give `channel` (a channel read by another flow) or `steps` (run on the copy)",
            ));
        }
    };
    Ok(Arc::new(WireTap {
        tap: Arc::new(tap),
        flow: ctx.flow.into(),
        step: ctx.id.into(),
        background: ctx.resources.get_or_default::<Background>(),
    }))
}

struct WireTap {
    tap: Arc<Tap>,
    flow: Arc<str>,
    step: Arc<str>,
    background: Arc<Background>,
}

impl Tap {
    /// Sends `copy`; what went wrong, if anything.
    async fn send(&self, copy: Message) -> Option<String> {
        match self {
            Tap::Channel(sink) => sink.deliver(&copy).await.err().map(|e| e.to_string()),
            // The copy holds no acknowledgement share: its outputs are simply dropped.
            Tap::Steps(steps) => steps.process(copy).await.err().map(|f| f.error.to_string()),
        }
    }
}

#[async_trait]
impl Processor for WireTap {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let copy = msg.detached();
        let (tap, flow, step) = (
            Arc::clone(&self.tap),
            Arc::clone(&self.flow),
            Arc::clone(&self.step),
        );
        self.background.spawn(async move {
            let id = copy.id();
            if let Some(error) = tap.send(copy).await {
                tracing::warn!(%flow, %step, message_id = %id, %error, "wire tap failed; the message went on");
            }
        });
        Ok(common::one(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Channels;
    use crate::processors::testkit::{
        Sequence, build_one, build_with_resources, process, try_build,
    };
    use serde_json::json;
    use sluice_core::{AckToken, Outcome, Resources};

    #[tokio::test]
    async fn the_copy_reaches_the_channel_without_the_sources_ack() {
        let resources = Arc::new(Resources::default());
        let channels = resources.get_or_default::<Channels>();
        channels.declare_reader("audit", 8);
        let mut rx = channels.take_receiver("audit").unwrap();
        let step = build_with_resources("wire_tap", json!("audit"), &resources);
        let (token, ack) = AckToken::channel();
        let msg = Message::json(json!({"id": 1})).with_ack(token);
        let id = msg.id();
        let out = process(&step, msg).await.unwrap();
        assert_eq!((out[0].id(), out[0].ack_count()), (id, 1));
        // The source is acked as soon as the main path is done, whatever the tap does.
        out.into_iter().for_each(Message::ack);
        assert_eq!(ack.await.unwrap(), Outcome::Ack);
        let copy = rx.recv().await.unwrap();
        assert_eq!((copy.id(), copy.ack_count()), (id, 0));
        assert_eq!(copy.body.json().unwrap(), &json!({"id": 1}));
    }

    #[tokio::test]
    async fn a_failing_tap_never_fails_the_message() {
        // No flow reads `nowhere`; the steps tap fails on a string body.
        for config in [json!("nowhere"), json!({"steps": [{"transform": ".a.b"}]})] {
            let resources = Arc::new(Resources::default());
            let step = build_with_resources("wire_tap", config, &resources);
            let (token, ack) = AckToken::channel();
            let out = process(&step, Message::json(json!({"a": "x"})).with_ack(token))
                .await
                .unwrap();
            assert_eq!(out[0].body.json().unwrap(), &json!({"a": "x"}));
            resources.get_or_default::<Background>().idle().await;
            out.into_iter().for_each(Message::ack);
            assert_eq!(ack.await.unwrap(), Outcome::Ack);
        }
    }

    /// Records the messages it sees.
    #[derive(Default)]
    struct Seen(std::sync::Mutex<Vec<Message>>);

    #[async_trait]
    impl Processor for Seen {
        async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
            self.0.lock().unwrap().push(msg.detached());
            Ok(common::one(msg))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn steps_run_in_the_background_on_the_copy() {
        let seen = Arc::new(Seen::default());
        let background = Arc::new(Background::default());
        let slow_then_seen = build_one(
            "try",
            json!({"steps": [{"delay": "1s"}], "finally": [{"log": "tapped"}]}),
        );
        let step = WireTap {
            tap: Arc::new(Tap::Steps(Arc::new(Sequence(vec![
                slow_then_seen,
                Arc::clone(&seen) as Arc<dyn Processor>,
            ])))),
            flow: "f".into(),
            step: "tap".into(),
            background: Arc::clone(&background),
        };
        let started = tokio::time::Instant::now();
        let out = step.process(Message::json(json!(1))).await.unwrap();
        assert_eq!(
            started.elapsed(),
            std::time::Duration::ZERO,
            "the main path waited"
        );
        assert_eq!(out.len(), 1);
        assert!(seen.0.lock().unwrap().is_empty());
        background.idle().await;
        assert_eq!(seen.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn needs_exactly_one_destination() {
        assert!(try_build("wire_tap", &json!({})).is_err());
        let e = try_build(
            "wire_tap",
            &json!({"channel": "a", "steps": [{"log": "x"}]}),
        )
        .err()
        .unwrap();
        assert!(e.message.contains("not both"), "{}", e.message);
    }
}
