//! In-memory channels that link flows: `to: [{channel: orders}]` in one flow, `from: {channel:
//! orders}` in another (EIP Point-to-Point Channel).
//!
//! The message crossing a channel keeps its acknowledgement shares, so the first flow's source is
//! acknowledged only when the second flow has finished with the message. A channel is bounded: a
//! full channel makes the writing flow wait (backpressure), it never drops. Messages still queued
//! at shutdown are nacked to their sources. With `durable: true` on both ends the channel keeps
//! its messages in the process's store instead ([`crate::durable_channel`]).
//!
//! A channel is known to have a reader once a flow with `from: {channel: name}` has been built;
//! a message sent to a channel no flow reads fails at once with `unavailable` naming the channel,
//! instead of waiting in a queue nobody drains. Under `sluice test` ([`Channels::capture_into`])
//! messages sent to a channel are recorded under the target name `channel:<name>`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    BuildContext, BuildError, Dispatch, ErrorKind, Message, ProcessError, Registry, Sink, Source,
    SourceContext, SourceError,
};
use tokio::sync::{Semaphore, mpsc};

use crate::build::Captured;
use crate::durable_channel;

/// The component name, as a source and as a sink.
pub const NAME: &str = "channel";
const DEFAULT_CAPACITY: usize = 1024;

/// The channel name in a validated `channel` configuration.
pub fn channel_name(config: &Value) -> String {
    config
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// Whether a validated `channel` configuration asks for a durable channel.
pub fn is_durable(config: &Value) -> bool {
    config
        .get("durable")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// The channels a step sends to, as far as its configuration says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StepSends {
    /// Channels named in the configuration.
    pub names: Vec<String>,
    /// Whether the step (or one nested in it) computes channel names at run time.
    pub dynamic: bool,
}

/// The channels step `component` (and any step nested in its `config`) sends to: a `wire_tap`'s
/// or a `call`'s `channel`, a `recipient_list`'s `recipients`; a `recipient_list` with an `expression` is
/// dynamic. Used by the loader to check that every channel has both ends.
pub fn sent_to_by_step(component: &str, config: &Value) -> StepSends {
    let mut sends = StepSends::default();
    collect_sends(component, config, &mut sends);
    sends
}

fn collect_sends(component: &str, config: &Value, sends: &mut StepSends) {
    let names = |v: Option<&Value>| -> Vec<String> {
        match v {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        }
    };
    match (component, config) {
        ("wire_tap", Value::String(_)) => sends.names.extend(names(Some(config))),
        ("wire_tap", Value::Object(o)) => sends.names.extend(names(o.get("channel"))),
        ("call", Value::String(_)) => sends.names.extend(names(Some(config))),
        ("call", Value::Object(o)) => sends.names.extend(names(o.get("channel"))),
        ("recipient_list", Value::Array(_)) => sends.names.extend(names(Some(config))),
        ("recipient_list", Value::Object(o)) => {
            sends.names.extend(names(o.get("recipients")));
            sends.dynamic |= o.get("expression").is_some_and(|e| !e.is_null());
        }
        _ => {}
    }
    // Nested steps are `{name: config}` objects anywhere below.
    match config {
        Value::Object(o) => {
            for (key, value) in o {
                collect_sends(key, value, sends);
            }
        }
        Value::Array(items) => {
            for item in items {
                collect_sends("", item, sends);
            }
        }
        _ => {}
    }
}

/// Registers the channel source and sink.
pub fn register(registry: &mut Registry) {
    registry.source(source_spec(), build_source);
    registry.sink(sink_spec(), build_sink);
}

fn name_field() -> FieldSpec {
    FieldSpec::new(
        "name",
        FieldType::String,
        "the channel's name; one flow writes to it, one flow reads from it",
    )
    .required()
}

fn durable_field(doc: &'static str) -> FieldSpec {
    FieldSpec::new("durable", FieldType::Bool, doc).default_value(false)
}

fn source_spec() -> ComponentSpec {
    ComponentSpec::new(NAME, ComponentKind::Source, "Receive messages that another flow sends to a named channel, in memory or durable")
        .description(
            "Point-to-point channel between two flows in one process. Messages are processed in \
             order when `concurrency` is 1.\n\n\
             **In memory** (the default). Delivery: at-least-once for the upstream source: a message \
             is acknowledged upstream only after this flow has finished with it. A message in a \
             channel when the process dies is redelivered by the upstream source if that source can \
             (a broker), and lost if it cannot (an HTTP InOnly request).\n\n\
             **Durable** (`durable: true`, on both ends). The writing flow's source is acknowledged \
             once the message is on disk; this flow reads it from there, and its record is deleted \
             only when this flow acknowledges it (every target committed, or the failure was handled \
             by `on_error` or `dead_letter`). Delivery: at-least-once, across restarts and crashes; \
             effectively-once when the flow starts with an `idempotent_consumer` keyed on the message. \
             Every message carries `sluice.delivery.count` (1 on first delivery) and \
             `sluice.redelivered` (`true` or `false`). A message that fails is delivered again after \
             `redelivery_delay`, doubled for each further delivery (at most 5 minutes), so under \
             failures a later message can overtake it. A message whose delivery number \
             `max_deliveries` fails as well, or that reaches a delivery beyond it (the process died \
             while handling it each time), is moved to the dead letters (`sluice dlq`) with the \
             error and removed from the channel. A record that cannot be read back (damaged, or \
             written by a newer Sluice) is moved there too, and the next records go on. A message \
             still being handled after `visibility_timeout` is handed out again, so set it above \
             the flow's longest processing time. At shutdown the messages in flight may finish \
             within the grace period; the others are delivered again after the next start. \
             `capacity` does not apply: the disk holds the messages.",
        )
        .field(name_field())
        .field(durable_field("keep the channel's messages on disk, in the store of the data directory (`sluice run --data`); the writing flow's `channel` target must say the same"))
        .field(FieldSpec::new("capacity", FieldType::Integer { min: Some(1), max: Some(1_000_000) }, "in memory: messages the channel holds before writers wait").default_value(DEFAULT_CAPACITY as i64))
        .field(FieldSpec::new("concurrency", FieldType::Integer { min: Some(1), max: Some(10_000) }, "messages this flow processes at once; 1 keeps channel order").default_value(1))
        .field(FieldSpec::new("visibility_timeout", FieldType::Duration, "durable: how long a message being handled stays hidden before it is handed out again").default_value("30s"))
        .field(FieldSpec::new("max_deliveries", FieldType::Integer { min: Some(1), max: Some(1_000_000) }, "durable: deliveries of a failing message before it is moved to the dead letters").default_value(10))
        .field(FieldSpec::new("redelivery_delay", FieldType::Duration, "durable: wait before a failed message is delivered again; doubles with each further delivery, at most 5 minutes").default_value("1s"))
        .field(FieldSpec::new("poll_interval", FieldType::Duration, "durable: longest wait between two looks at an empty channel (a write in this process wakes the reader at once)").default_value("1s"))
        .shorthand("name")
        .example("Read the `orders` channel", "orders")
        .example("Process up to 8 messages at once", "name: orders\nconcurrency: 8")
        .example(
            "Read a durable channel, giving up on a message after 5 deliveries",
            "name: orders\ndurable: true\nmax_deliveries: 5\nvisibility_timeout: 1m",
        )
}

fn sink_spec() -> ComponentSpec {
    ComponentSpec::new(NAME, ComponentKind::Sink, "Send messages to the flow that reads a named channel, in memory or durable")
        .description(
            "In memory: hands the message, with its acknowledgement, to the flow reading the \
             channel. Waits while the channel is full (backpressure). Fails with `unavailable` when \
             the reading flow has stopped.\n\n\
             Durable (`durable: true`, like the reading flow's source): writes the message to disk \
             and returns once the write is committed (fsync; concurrent writes share one commit), so \
             this flow's source is acknowledged only after the message is on disk (an HTTP InOnly \
             request is answered 202 only then). Delivery: at-least-once. A write that fails is \
             `unavailable`, a full disk saying so (an HTTP source answers 503 with `Retry-After`); \
             a message larger than a record allows is `invalid_input`.",
        )
        .field(name_field())
        .field(durable_field("write to disk, in the store of the data directory (`sluice run --data`), and return once committed; the reading flow's `channel` source must say the same"))
        .shorthand("name")
        .example("Send to the `orders` channel", "orders")
        .example("Send to a durable channel", "name: orders\ndurable: true")
}

type Queue = (mpsc::Sender<Message>, Option<mpsc::Receiver<Message>>);

/// The prefix of the test target under which messages sent to a channel are captured.
pub const CAPTURE_PREFIX: &str = "channel:";

/// Every channel of the process, created on first use by either end.
#[derive(Default)]
pub struct Channels {
    queues: Mutex<HashMap<String, Queue>>,
    capacities: Mutex<HashMap<String, usize>>,
    readers: Mutex<HashSet<String>>,
    /// The flow behind each channel whose source is running, for `call` (request-reply).
    serving: Mutex<HashMap<String, Arc<dyn Dispatch>>>,
    /// Writers of the durable channels that have a reader, for sends by name at run time.
    durable: Mutex<HashMap<String, Arc<dyn Sink>>>,
    capture: OnceLock<Captured>,
}

impl Channels {
    /// Declares that a flow reads channel `name`, with the channel's capacity (the reading side's
    /// setting wins); done when that flow's source is built, before any message flows.
    pub fn declare_reader(&self, name: &str, capacity: usize) {
        if let Ok(mut caps) = self.capacities.lock() {
            caps.insert(name.to_owned(), capacity);
        }
        if let Ok(mut readers) = self.readers.lock() {
            readers.insert(name.to_owned());
        }
    }

    /// Declares that a flow reads durable channel `name`; `writer` appends to it, for steps that
    /// send to the channel by name (a wire tap, a recipient list).
    pub fn declare_durable_reader(&self, name: &str, writer: Arc<dyn Sink>) {
        if let Ok(mut durable) = self.durable.lock() {
            durable.insert(name.to_owned(), writer);
        }
        if let Ok(mut readers) = self.readers.lock() {
            readers.insert(name.to_owned());
        }
    }

    fn durable_writer(&self, name: &str) -> Option<Arc<dyn Sink>> {
        self.durable.lock().ok()?.get(name).cloned()
    }

    /// Whether a flow reading channel `name` has been built.
    pub fn has_reader(&self, name: &str) -> bool {
        self.readers.lock().is_ok_and(|r| r.contains(name))
    }

    /// The running flow that reads channel `name`, to call directly and wait for its reply.
    pub fn serving(&self, name: &str) -> Option<Arc<dyn Dispatch>> {
        self.serving.lock().ok()?.get(name).cloned()
    }

    pub(crate) fn set_serving(&self, name: &str, flow: Option<Arc<dyn Dispatch>>) {
        if let Ok(mut serving) = self.serving.lock() {
            match flow {
                Some(flow) => serving.insert(name.to_owned(), flow),
                None => serving.remove(name),
            };
        }
    }

    /// Under `sluice test`: where messages sent to channels are recorded.
    pub(crate) fn captured(&self) -> Option<&Captured> {
        self.capture.get()
    }

    /// For flow tests: messages sent to any channel are recorded in `captured` under
    /// `channel:<name>` (and their share resolved) instead of being queued.
    pub fn capture_into(&self, captured: Captured) {
        let _ = self.capture.set(captured);
    }

    fn with_queue<T>(&self, name: &str, f: impl FnOnce(&mut Queue) -> T) -> Option<T> {
        let capacity = self
            .capacities
            .lock()
            .ok()?
            .get(name)
            .copied()
            .unwrap_or(DEFAULT_CAPACITY);
        let mut queues = self.queues.lock().ok()?;
        let queue = queues.entry(name.to_owned()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(capacity);
            (tx, Some(rx))
        });
        Some(f(queue))
    }

    fn sender(&self, name: &str) -> Option<mpsc::Sender<Message>> {
        self.with_queue(name, |q| q.0.clone())
    }

    pub(crate) fn take_receiver(&self, name: &str) -> Option<mpsc::Receiver<Message>> {
        self.with_queue(name, |q| q.1.take()).flatten()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceConfig {
    name: String,
    #[serde(default)]
    durable: bool,
    #[serde(default = "default_capacity")]
    capacity: usize,
    #[serde(default = "one")]
    concurrency: usize,
    #[serde(default = "thirty_seconds")]
    visibility_timeout: HumanDuration,
    #[serde(default = "ten")]
    max_deliveries: u32,
    #[serde(default = "one_second")]
    redelivery_delay: HumanDuration,
    #[serde(default = "one_second")]
    poll_interval: HumanDuration,
}

// The defaults repeat the spec's, for configurations that did not go through validation (tests).
fn default_capacity() -> usize {
    DEFAULT_CAPACITY
}
fn one() -> usize {
    1
}
fn ten() -> u32 {
    10
}
fn one_second() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn thirty_seconds() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkConfig {
    name: String,
    #[serde(default)]
    durable: bool,
}

fn build_source(config: &Value, ctx: &BuildContext<'_>) -> Result<Box<dyn Source>, BuildError> {
    let config: SourceConfig =
        serde_json::from_value(config.clone()).map_err(|e| BuildError::new(e.to_string()))?;
    let channels = ctx.resources.get_or_default::<Channels>();
    if config.durable {
        let options = durable_channel::ReaderOptions {
            concurrency: config.concurrency,
            visibility_timeout: config.visibility_timeout.0,
            max_deliveries: config.max_deliveries,
            redelivery_delay: config.redelivery_delay.0,
            poll_interval: config.poll_interval.0,
        };
        let source = durable_channel::source(ctx.resources, &config.name, options)?;
        // Steps that pick channels at run time (a recipient list) reach it through the registry.
        let writer = durable_channel::sink(ctx.resources, &config.name)?;
        channels.declare_durable_reader(&config.name, writer);
        return Ok(source);
    }
    channels.declare_reader(&config.name, config.capacity);
    Ok(Box::new(ChannelSource {
        name: config.name,
        concurrency: config.concurrency,
    }))
}

fn build_sink(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Sink>, BuildError> {
    let config: SinkConfig =
        serde_json::from_value(config.clone()).map_err(|e| BuildError::new(e.to_string()))?;
    if config.durable {
        return durable_channel::sink(ctx.resources, &config.name);
    }
    Ok(Arc::new(ChannelSink {
        name: config.name,
        channels: ctx.resources.get_or_default::<Channels>(),
    }))
}

/// A sink into channel `name`, for steps that pick channels at run time (a recipient list, a wire
/// tap). Like the `channel` target: waits while the channel is full, fails at once with
/// `unavailable` naming the channel when no flow reads it, and carries the message's
/// acknowledgement to the reading flow.
pub fn sender(resources: &sluice_core::Resources, name: &str) -> Arc<dyn Sink> {
    Arc::new(ChannelSink {
        name: name.to_owned(),
        channels: resources.get_or_default::<Channels>(),
    })
}

struct ChannelSink {
    name: String,
    channels: Arc<Channels>,
}

#[async_trait]
impl Sink for ChannelSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        if !self.channels.has_reader(&self.name) {
            return Err(ProcessError::new(
                ErrorKind::Unavailable,
                format!(
                    "no flow reads channel `{}`; add a flow with `from: {{channel: {}}}`",
                    self.name, self.name
                ),
            ));
        }
        if let Some(captured) = self.channels.capture.get() {
            let mut copy = msg.clone();
            // A record, not a delivery: the copy's share is resolved now, as a captured target's.
            for token in copy.take_acks() {
                token.ack();
            }
            captured.push(&format!("{CAPTURE_PREFIX}{}", self.name), copy);
            return Ok(());
        }
        if let Some(writer) = self.channels.durable_writer(&self.name) {
            return writer.deliver(msg).await;
        }
        let unavailable = || {
            ProcessError::new(
                ErrorKind::Unavailable,
                format!("channel `{}` has no running reader", self.name),
            )
        };
        let sender = self.channels.sender(&self.name).ok_or_else(unavailable)?;
        // The copy carries a new share of the acknowledgement: this sink's own share is resolved
        // by the engine when we return, the copy's when the reading flow is done with it.
        sender.send(msg.clone()).await.map_err(|_| unavailable())
    }
}

struct ChannelSource {
    name: String,
    concurrency: usize,
}

#[async_trait]
impl Source for ChannelSource {
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let channels = ctx.resources.get_or_default::<Channels>();
        let mut rx = channels.take_receiver(&self.name).ok_or_else(|| {
            SourceError::Other(format!("channel `{}` already has a reader", self.name))
        })?;
        channels.set_serving(&self.name, Some(Arc::clone(&ctx.dispatcher)));
        let permits = Arc::new(Semaphore::new(self.concurrency));
        loop {
            let permit = tokio::select! {
                () = ctx.shutdown.cancelled() => break,
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let msg = tokio::select! {
                () = ctx.shutdown.cancelled() => break,
                msg = rx.recv() => match msg {
                    Some(m) => m,
                    None => break,
                },
            };
            // Admitted here, in channel order, so a flow's `ordered_by` keeps it per key.
            let work = Arc::clone(&ctx.dispatcher).admit(msg).await;
            tokio::spawn(async move {
                // The flow resolves the message's shares, on success and on failure alike.
                let _ = work.await;
                drop(permit);
            });
        }
        channels.set_serving(&self.name, None);
        // Wait for in-flight messages; what is still queued is dropped and so nacked upstream.
        let _ = permits
            .acquire_many(u32::try_from(self.concurrency).unwrap_or(u32::MAX))
            .await;
        rx.close();
        while let Ok(msg) = rx.try_recv() {
            msg.nack("runtime shut down before the message was processed");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_core::{AckToken, Outcome, Resources};

    #[tokio::test]
    async fn sending_to_a_channel_nobody_reads_fails_at_once() {
        let resources = Resources::default();
        let (token, ack) = AckToken::channel();
        let msg = Message::json(json!(1)).with_ack(token);
        let error = sender(&resources, "audit").deliver(&msg).await.unwrap_err();
        assert_eq!(error.kind, ErrorKind::Unavailable);
        assert!(error.detail.contains("`audit`"), "{}", error.detail);
        // Nothing was queued: the only share is the message's own.
        msg.ack();
        assert_eq!(ack.await.unwrap(), Outcome::Ack);
    }

    #[tokio::test]
    async fn a_declared_reader_receives_the_copy_with_a_share() {
        let resources = Resources::default();
        let channels = resources.get_or_default::<Channels>();
        channels.declare_reader("audit", 4);
        let mut rx = channels.take_receiver("audit").unwrap();
        let (token, mut ack) = AckToken::channel();
        let msg = Message::json(json!(1)).with_ack(token);
        sender(&resources, "audit").deliver(&msg).await.unwrap();
        msg.ack();
        assert!(ack.try_recv().is_err(), "acked before the reader was done");
        rx.recv().await.unwrap().ack();
        assert_eq!(ack.await.unwrap(), Outcome::Ack);
    }

    #[tokio::test]
    async fn under_test_sends_are_captured_by_channel_name() {
        let resources = Resources::default();
        let channels = resources.get_or_default::<Channels>();
        channels.declare_reader("audit", 1);
        let captured = Captured::default();
        channels.capture_into(captured.clone());
        let (token, ack) = AckToken::channel();
        let msg = Message::json(json!({"a": 1})).with_ack(token);
        sender(&resources, "audit").deliver(&msg).await.unwrap();
        msg.ack();
        assert_eq!(ack.await.unwrap(), Outcome::Ack);
        let got = captured.take("channel:audit");
        assert_eq!(got[0].body.json().unwrap(), &json!({"a": 1}));
    }

    #[tokio::test]
    async fn a_send_by_name_to_a_durable_channel_is_stored() {
        let resources = Resources::default();
        resources
            .get_or_default::<crate::durable::DurableStore>()
            .use_memory();
        let channels = resources.get_or_default::<Channels>();
        let writer = durable_channel::sink(&resources, "audit").unwrap();
        channels.declare_durable_reader("audit", writer);
        let (token, ack) = AckToken::channel();
        let msg = Message::json(json!({"a": 1})).with_ack(token);
        let id = msg.id();
        sender(&resources, "audit").deliver(&msg).await.unwrap();
        msg.ack();
        // The record now stands for the message: the sender's share is resolved at once.
        assert_eq!(ack.await.unwrap(), Outcome::Ack);
        let store = resources
            .get_or_default::<crate::durable::DurableStore>()
            .store()
            .unwrap();
        let records = store
            .queue("audit")
            .lease(10, std::time::Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(records.len(), 1);
        let stored = crate::envelope::decode(&records[0].payload).unwrap();
        assert_eq!(stored.id(), id);
        assert_eq!(stored.body.json().unwrap(), &json!({"a": 1}));
    }

    #[test]
    fn channels_named_by_steps_are_found_nested_too() {
        let sends = sent_to_by_step(
            "choice",
            &json!({"when": [{"condition": ".a", "steps": [
                {"wire_tap": "audit"},
                {"recipient_list": {"recipients": ["billing", "shipping"]}},
                {"multicast": {"branches": [[{"wire_tap": {"channel": "trace"}}]]}}
            ]}]}),
        );
        assert_eq!(sends.names, ["audit", "billing", "shipping", "trace"]);
        assert!(!sends.dynamic);
        let sends = sent_to_by_step("recipient_list", &json!({"expression": ".to"}));
        assert!(sends.dynamic && sends.names.is_empty());
        assert_eq!(
            sent_to_by_step("wire_tap", &json!({"steps": [{"log": "x"}]})).names,
            Vec::<String>::new()
        );
    }
}
