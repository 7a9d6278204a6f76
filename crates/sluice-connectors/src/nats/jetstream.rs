//! JetStream: the `jetstream` source (a durable pull consumer acknowledged after the flow
//! commits) and the `jetstream` sink (publish, `Ok` only on the stream's acknowledgement).
//!
//! **Architecture Invariant:** a JetStream message is acknowledged (`+ACK`, double-acked so the
//! server confirmed it) only on [`Outcome::Ack`]; a nack is a `-NAK` with a growing delay, or
//! `+TERM` on the consumer's last allowed delivery. A message the flow never settles (a crash) is
//! redelivered by the server after `ack_wait`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::{self, AckKind, stream};
use async_trait::async_trait;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    AckToken, BuildContext, BuildError, ErrorKind, HealthHandle, Message, Outcome, ProcessError,
    Sink, Source, SourceContext, SourceError,
};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::core::SubjectTemplate;
use super::{
    LazyClient, SUBJECT_HEADER, check_subject, check_url, connect, connection_fields, describe,
    headers_from_nats, headers_to_nats,
};
use crate::reconnect::{self, Backoff};

/// Header: the stream a message was read from.
pub const STREAM_HEADER: &str = "nats.stream";
/// Header: the message's sequence number in its stream.
pub const SEQUENCE_HEADER: &str = "nats.sequence";
/// Header: how many times the consumer delivered the message, this time included.
pub const DELIVERED_HEADER: &str = "nats.delivered";
/// The JetStream de-duplication header.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// How long one pull request waits on the server for messages.
const PULL_WAIT: Duration = Duration::from_secs(1);
/// How much longer the source waits for the server to end a pull request.
const PULL_GRACE: Duration = Duration::from_secs(1);

/// The longest a nacked message waits before its redelivery.
const MAX_NAK_DELAY: Duration = Duration::from_secs(300);

const SOURCE_DESCRIPTION: &str = "\
Reads a JetStream stream through a durable pull consumer named `consumer`. If `create` is on \
(the default), a missing stream is created with `subjects` and a missing consumer with \
`ack_wait`, `max_deliver` and `filter_subject` (an existing consumer keeps its own settings). \
Each message becomes one Sluice message: the payload is the body, NATS headers become message \
headers (first value of each), plus `nats.subject`, `nats.stream`, `nats.sequence` and \
`nats.delivered` (1 on first delivery). A `Nats-Msg-Id` that is a UUID becomes the message id, \
so a message published by the `jetstream` sink keeps its id across the hop.

**Delivery guarantee.** at-least-once: a message is acknowledged to the server only after every \
target committed it (double ack: the server confirmed the ack). When the flow fails it, the \
message is negatively acknowledged and redelivered after `nak_delay`, doubling with each \
delivery (at most 5 minutes). With a `dead_letter:` on the flow (for example \
`dead_letter_store`), failures before the last allowed delivery (`max_deliver`, as the consumer \
on the server has it) are nacked and redelivered, and the last one goes to the dead letter with \
its error headers; once the letter is written the message is acknowledged. Without one (or if \
writing the letter fails), the last delivery that fails too is terminated (`+TERM`) and the \
server stops redelivering it. A consumer with unlimited deliveries (`max_deliver: -1`, set on \
the server) redelivers a failing message for ever and never dead-letters it. A message whose processing outlasts \
`ack_wait` (or a crash) is redelivered by the server; make targets idempotent.

**Limits.** At most `prefetch` messages are unacknowledged at once: the source pulls only as \
many as the flow has room for (and a consumer Sluice creates has `max_ack_pending` = \
`prefetch`). Long steps do not extend `ack_wait` (no progress \
acks): keep it above the flow's longest processing time. Multi-valued headers keep their first \
value. Credentials: user and password in `url`, or `token`.";

/// The `jetstream` source's spec.
pub fn source_spec() -> ComponentSpec {
    connection_fields(
        ComponentSpec::new(
            "jetstream",
            ComponentKind::Source,
            "Consume a NATS JetStream stream with a durable pull consumer, acknowledged after commit",
        )
        .description(SOURCE_DESCRIPTION),
    )
    .field(FieldSpec::new("stream", FieldType::String, "Stream to read.").required())
    .field(FieldSpec::new("consumer", FieldType::String, "Durable consumer name; instances sharing it share the work.").required())
    .field(FieldSpec::new("subjects", FieldType::List(Box::new(FieldType::String)), "Subjects of the stream, used only when creating it.").default_value(serde_json::json!([])))
    .field(FieldSpec::new("filter_subject", FieldType::String, "Only messages on this subject (wildcards allowed), when creating the consumer."))
    .field(FieldSpec::new("create", FieldType::Bool, "Create the stream and the consumer if missing.").default_value(true))
    .field(FieldSpec::new("ack_wait", FieldType::Duration, "How long the server waits for an acknowledgement before redelivering.").default_value("30s"))
    .field(FieldSpec::new("max_deliver", FieldType::Integer { min: Some(1), max: None }, "Deliveries of one message; a failure on the last terminates it.").default_value(5))
    .field(FieldSpec::new("nak_delay", FieldType::Duration, "Wait before the second delivery of a failed message; doubles with each further one.").default_value("1s"))
    .field(FieldSpec::new("prefetch", FieldType::Integer { min: Some(1), max: Some(65_536) }, "Most messages in flight (pulled and not yet acknowledged).").default_value(64))
    .example(
        "Orders with a durable consumer, dead letters kept by the flow",
        "stream: ORDERS\nsubjects: [orders.>]\nconsumer: sluice-orders\nmax_deliver: 5\nack_wait: 1m\n",
    )
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceConfig {
    #[serde(default = "default_url")]
    url: String,
    #[serde(default)]
    token: Option<String>,
    stream: String,
    consumer: String,
    #[serde(default)]
    subjects: Vec<String>,
    #[serde(default)]
    filter_subject: Option<String>,
    #[serde(default = "yes")]
    create: bool,
    #[serde(default = "default_ack_wait")]
    ack_wait: HumanDuration,
    #[serde(default = "default_max_deliver")]
    max_deliver: i64,
    #[serde(default = "default_nak_delay")]
    nak_delay: HumanDuration,
    #[serde(default = "default_prefetch")]
    prefetch: usize,
}

fn default_url() -> String {
    super::DEFAULT_URL.to_owned()
}
fn yes() -> bool {
    true
}
fn default_ack_wait() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_max_deliver() -> i64 {
    5
}
fn default_nak_delay() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_prefetch() -> usize {
    64
}

/// Stream and consumer names: no spaces, dots, wildcards or path separators.
fn check_name(field: &str, name: &str) -> Result<(), BuildError> {
    if name.is_empty()
        || name.contains(|c: char| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err(BuildError::field(
            field,
            format!("`{name}` is not a valid JetStream name; use letters, digits, `-` and `_`"),
        ));
    }
    Ok(())
}

struct JetStreamSource {
    c: SourceConfig,
    /// Deliveries of one message as the consumer on the server has them (an existing consumer
    /// keeps its own setting); below 1 for no limit.
    max_deliver: std::sync::atomic::AtomicI64,
}

/// Builds the `jetstream` source.
pub fn build_source(
    config: &Value,
    _ctx: &BuildContext<'_>,
) -> Result<Box<dyn Source>, BuildError> {
    let c: SourceConfig = crate::config::parse(config)?;
    check_url(&c.url)?;
    check_name("stream", &c.stream)?;
    check_name("consumer", &c.consumer)?;
    for (i, subject) in c.subjects.iter().enumerate() {
        check_subject(&format!("subjects[{i}]"), subject, true)?;
    }
    if let Some(filter) = &c.filter_subject {
        check_subject("filter_subject", filter, true)?;
    }
    if c.max_deliver < 1 {
        return Err(BuildError::field("max_deliver", "must be at least 1"));
    }
    if c.ack_wait.0 < Duration::from_secs(1) {
        return Err(BuildError::field(
            "ack_wait",
            "must be at least 1s; it bounds how long the flow may take per message",
        ));
    }
    if c.prefetch == 0 {
        return Err(BuildError::field("prefetch", "must be at least 1"));
    }
    Ok(Box::new(JetStreamSource {
        max_deliver: std::sync::atomic::AtomicI64::new(c.max_deliver),
        c,
    }))
}

impl JetStreamSource {
    /// Connects and finds (or creates) the stream and the durable consumer.
    async fn open(
        &self,
        flow: &str,
        health: &HealthHandle,
    ) -> Result<
        (
            async_nats::Client,
            jetstream::consumer::Consumer<pull::Config>,
        ),
        String,
    > {
        let c = &self.c;
        let client = connect(&c.url, c.token.as_deref(), flow, health)
            .await
            .map_err(|e| e.to_string())?;
        let js = jetstream::new(client.clone());
        let stream = if c.create && !c.subjects.is_empty() {
            js.get_or_create_stream(stream::Config {
                name: c.stream.clone(),
                subjects: c.subjects.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("stream `{}`: {e}", c.stream))?
        } else {
            js.get_stream(&c.stream).await.map_err(|e| {
                format!(
                    "stream `{}`: {e}; create it or give `subjects` to have it created",
                    c.stream
                )
            })?
        };
        let config = pull::Config {
            durable_name: Some(c.consumer.clone()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: c.ack_wait.0,
            max_deliver: c.max_deliver,
            // Not tied to `prefetch`: the pull stream asks for the next batch while the last
            // message is still being acknowledged, and a consumer at its max_ack_pending leaves
            // that request waiting until it expires (a stall seen with prefetch 1).
            max_ack_pending: i64::try_from(c.prefetch.saturating_mul(4).max(1000))
                .unwrap_or(i64::MAX),
            filter_subject: c.filter_subject.clone().unwrap_or_default(),
            ..Default::default()
        };
        let consumer = if c.create {
            stream
                .get_or_create_consumer(&c.consumer, config)
                .await
                .map_err(|e| e.to_string())
        } else {
            stream
                .get_consumer(&c.consumer)
                .await
                .map_err(|e| e.to_string())
        }
        .map_err(|e| format!("consumer `{}` on stream `{}`: {e}", c.consumer, c.stream))?;
        Ok((client, consumer))
    }
}

/// How a settled message is answered to the server.
#[derive(Debug, Clone, PartialEq)]
enum Settlement {
    Ack,
    Nak(Duration),
    Term,
}

/// The answer for `outcome` on delivery `delivered` of at most `max_deliver`.
fn settlement(
    outcome: &Outcome,
    delivered: i64,
    max_deliver: i64,
    nak_delay: Duration,
) -> Settlement {
    match outcome {
        Outcome::Ack => Settlement::Ack,
        Outcome::Nack(_) if max_deliver > 0 && delivered >= max_deliver => Settlement::Term,
        Outcome::Nack(_) => {
            let doublings = u32::try_from(delivered.saturating_sub(1).clamp(0, 16)).unwrap_or(16);
            Settlement::Nak(nak_delay.saturating_mul(1 << doublings).min(MAX_NAK_DELAY))
        }
    }
}

#[async_trait]
impl Source for JetStreamSource {
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let health = HealthHandle::for_source(&ctx);
        let what = describe(&self.c.url);
        let mut backoff = Backoff::default();
        let permits = Arc::new(Semaphore::new(self.c.prefetch));
        let mut in_flight = JoinSet::new();
        'connection: loop {
            let opened = reconnect::connect(&what, &health, &ctx.shutdown, &mut backoff, || {
                self.open(&ctx.flow, &health)
            })
            .await;
            let Some((_client, consumer)) = opened else {
                break;
            };
            self.max_deliver.store(
                consumer.cached_info().config.max_deliver,
                std::sync::atomic::Ordering::Relaxed,
            );
            tracing::info!(flow = %ctx.flow, stream = %self.c.stream, consumer = %self.c.consumer, service = %what, "consuming");
            loop {
                while in_flight.try_join_next().is_some() {}
                let first = tokio::select! {
                    () = ctx.shutdown.cancelled() => break 'connection,
                    p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => break 'connection },
                };
                let mut slots = vec![first];
                while let Ok(p) = Arc::clone(&permits).try_acquire_owned() {
                    slots.push(p);
                }
                // One pull request per round for exactly the free slots: nothing is pulled that
                // the flow cannot take now, and no request outlives its round (the client's
                // long-running pull stream could lose count of its requests and stall).
                let batch = consumer
                    .batch()
                    .max_messages(slots.len())
                    .expires(PULL_WAIT)
                    .messages()
                    .await;
                let mut batch = match batch {
                    Ok(batch) => batch,
                    Err(e) => {
                        health.unhealthy(format!(
                            "pulling from consumer `{}` on {what} failed: {e}",
                            self.c.consumer
                        ));
                        drop(slots);
                        tokio::select! {
                            () = ctx.shutdown.cancelled() => break 'connection,
                            () = tokio::time::sleep(backoff.next_delay()) => {}
                        }
                        continue 'connection;
                    }
                };
                // A request lost to a reconnect is never answered: the round ends anyway.
                let deadline = tokio::time::Instant::now() + PULL_WAIT + PULL_GRACE;
                loop {
                    let next = tokio::select! {
                        () = ctx.shutdown.cancelled() => break 'connection,
                        () = tokio::time::sleep_until(deadline) => None,
                        m = batch.next() => m,
                    };
                    let incoming = match next {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => {
                            tracing::debug!(flow = %ctx.flow, consumer = %self.c.consumer, error = %e, "pull request ended with an error");
                            break;
                        }
                        None => break,
                    };
                    let Some(permit) = slots.pop() else {
                        // The server sends at most what was asked; anything more is redelivered.
                        break;
                    };
                    backoff.reset();
                    self.admit(incoming, permit, &ctx, &mut in_flight).await;
                }
            }
        }
        while in_flight.join_next().await.is_some() {}
        Ok(())
    }
}

impl JetStreamSource {
    /// Hands one message to the flow and settles it with the server once the flow is done.
    async fn admit(
        &self,
        incoming: jetstream::Message,
        permit: tokio::sync::OwnedSemaphorePermit,
        ctx: &SourceContext,
        in_flight: &mut JoinSet<()>,
    ) {
        let (mut msg, delivered) = to_message(&incoming);
        let max_deliver = self.max_deliver.load(std::sync::atomic::Ordering::Relaxed);
        // Attempts left (or no limit): a failure is nacked and comes again, so the flow's dead
        // letter waits for the last delivery.
        msg.meta.redelivers_on_nack = max_deliver < 1 || delivered < max_deliver;
        let (token, outcome) = AckToken::channel();
        let work = Arc::clone(&ctx.dispatcher).admit(msg.with_ack(token)).await;
        let (nak_delay, flow) = (self.c.nak_delay.0, Arc::clone(&ctx.flow));
        in_flight.spawn(async move {
            let _ = work.await;
            let outcome = outcome
                .await
                .unwrap_or_else(|_| Outcome::Nack(sluice_core::ack::DROPPED_UNRESOLVED.into()));
            let answer = settlement(&outcome, delivered, max_deliver, nak_delay);

            let result = match &answer {
                Settlement::Ack => incoming.double_ack().await,
                Settlement::Nak(delay) => incoming.ack_with(AckKind::Nak(Some(*delay))).await,
                Settlement::Term => {
                    tracing::warn!(flow = %flow, delivered, max_deliver, reason = ?outcome, "JetStream message failed on its last delivery; terminated");
                    incoming.ack_with(AckKind::Term).await
                }
            };
            if let Err(e) = result {
                // The server redelivers after ack_wait: at-least-once still holds.
                tracing::warn!(flow = %flow, error = %e, ?answer, "cannot settle the JetStream message; the server will redeliver it");
            }
            drop(permit);
        });
    }
}

/// The Sluice message for a JetStream message, and its delivery count.
fn to_message(incoming: &jetstream::Message) -> (Message, i64) {
    let mut msg = Message::bytes(incoming.payload.clone());
    headers_from_nats(incoming.headers.as_ref(), &mut msg.headers);
    if let Some(id) = msg
        .headers
        .get(MSG_ID_HEADER)
        .and_then(|v| uuid::Uuid::parse_str(v).ok())
    {
        msg = msg.with_id(id);
    }
    msg.headers
        .insert(SUBJECT_HEADER.to_owned(), incoming.subject.to_string());
    let delivered = match incoming.info() {
        Ok(info) => {
            msg.headers
                .insert(STREAM_HEADER.to_owned(), info.stream.to_owned());
            msg.headers
                .insert(SEQUENCE_HEADER.to_owned(), info.stream_sequence.to_string());
            info.delivered
        }
        Err(_) => 1,
    };
    msg.headers
        .insert(DELIVERED_HEADER.to_owned(), delivered.to_string());
    (msg, delivered)
}

const SINK_DESCRIPTION: &str = "\
Publishes each message to `subject` and waits for the stream's acknowledgement. The body is the \
payload, message headers become NATS headers (except `nats.*`), and `Nats-Msg-Id` is set to the \
message id, so the stream drops a copy published again within its duplicate window (2 minutes by \
default). With `stream` and `create` on, a missing stream is created with `subjects` (default: \
the subject) before the first publish.

**Delivery guarantee.** at-least-once: `deliver` returns only once the stream has stored the \
message; a redelivered message published again is dropped by the stream as a duplicate within \
its duplicate window (the acknowledgement says so and the delivery still counts as committed).

**Limits.** A subject that no stream captures fails with `unavailable` (never a silent loss). \
No acknowledgement within `timeout` fails with `timeout`. Payload size as the server's \
`max_payload`.";

/// The `jetstream` sink's spec.
pub fn sink_spec() -> ComponentSpec {
    connection_fields(
        ComponentSpec::new(
            "jetstream",
            ComponentKind::Sink,
            "Publish to a JetStream stream, committed on the stream's acknowledgement",
        )
        .description(SINK_DESCRIPTION),
    )
    .field(
        FieldSpec::new(
            "subject",
            FieldType::String,
            "Subject to publish to; `{header}` placeholders are filled from message headers.",
        )
        .required(),
    )
    .field(FieldSpec::new(
        "stream",
        FieldType::String,
        "Stream to create if missing (with `create`).",
    ))
    .field(
        FieldSpec::new(
            "subjects",
            FieldType::List(Box::new(FieldType::String)),
            "Subjects of the stream when creating it; default the subject.",
        )
        .default_value(serde_json::json!([])),
    )
    .field(
        FieldSpec::new(
            "create",
            FieldType::Bool,
            "Create `stream` if it is missing.",
        )
        .default_value(true),
    )
    .field(
        FieldSpec::new(
            "timeout",
            FieldType::Duration,
            "How long to wait for the stream's acknowledgement.",
        )
        .default_value("5s"),
    )
    .example(
        "Store every order in the ORDERS stream",
        "subject: orders.created\nstream: ORDERS\nsubjects: [orders.>]\n",
    )
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkConfig {
    #[serde(default = "default_url")]
    url: String,
    #[serde(default)]
    token: Option<String>,
    subject: String,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    subjects: Vec<String>,
    #[serde(default = "yes")]
    create: bool,
    #[serde(default = "default_timeout")]
    timeout: HumanDuration,
}

fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

struct JetStreamSink {
    url: String,
    subject: SubjectTemplate,
    /// The stream to create before the first publish, if any; cleared once it exists.
    ensure: tokio::sync::Mutex<Option<stream::Config>>,
    timeout: Duration,
    client: LazyClient,
}

/// Builds the `jetstream` sink.
pub fn build_sink(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Sink>, BuildError> {
    let c: SinkConfig = crate::config::parse(config)?;
    check_url(&c.url)?;
    let subject = SubjectTemplate::parse("subject", &c.subject)?;
    for (i, s) in c.subjects.iter().enumerate() {
        check_subject(&format!("subjects[{i}]"), s, true)?;
    }
    if let Some(stream) = &c.stream {
        check_name("stream", stream)?;
    }
    if c.timeout.0.is_zero() {
        return Err(BuildError::field("timeout", "must be longer than 0s"));
    }
    let ensure = match (&c.stream, c.create) {
        (Some(name), true) => {
            let subjects = if c.subjects.is_empty() {
                vec![c.subject.clone()]
            } else {
                c.subjects.clone()
            };
            if subjects.iter().any(|s| s.contains('{')) {
                return Err(BuildError::field(
                    "subjects",
                    "give the stream's subjects explicitly when `subject` has placeholders",
                ));
            }
            Some(stream::Config {
                name: name.clone(),
                subjects,
                ..Default::default()
            })
        }
        _ => None,
    };
    Ok(Arc::new(JetStreamSink {
        client: LazyClient::new(
            c.url.clone(),
            c.token,
            format!("{}/{}", ctx.flow, ctx.id),
            HealthHandle::for_component(ctx),
        ),
        url: c.url,
        subject,
        ensure: tokio::sync::Mutex::new(ensure),
        timeout: c.timeout.0,
    }))
}

#[async_trait]
impl Sink for JetStreamSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        let subject = self.subject.render(msg)?;
        let client = self.client.get().await?;
        let mut js = jetstream::new(client);
        js.set_timeout(self.timeout);
        {
            let mut ensure = self.ensure.lock().await;
            if let Some(config) = ensure.as_ref() {
                js.get_or_create_stream(config.clone()).await.map_err(|e| {
                    ProcessError::new(
                        ErrorKind::Unavailable,
                        format!(
                            "cannot create stream `{}` on {}: {e}",
                            config.name,
                            describe(&self.url)
                        ),
                    )
                })?;
                *ensure = None;
            }
        }
        let mut headers = headers_to_nats(msg);
        headers.insert(MSG_ID_HEADER, msg.id().to_string().as_str());
        let ack = js
            .publish_with_headers(subject.clone(), headers, msg.body.as_bytes().clone())
            .await
            .map_err(|e| publish_error(&self.url, &subject, &e))?;
        ack.await
            .map_err(|e| publish_error(&self.url, &subject, &e))?;
        Ok(())
    }
}

fn publish_error(url: &str, subject: &str, e: &jetstream::context::PublishError) -> ProcessError {
    use jetstream::context::PublishErrorKind as K;
    match e.kind() {
        K::TimedOut => ProcessError::new(
            ErrorKind::Timeout,
            format!("no acknowledgement for `{subject}` from {}", describe(url)),
        ),
        K::StreamNotFound => ProcessError::new(
            ErrorKind::Unavailable,
            format!(
                "no stream captures subject `{subject}` on {}; create one (or set `stream` and `subjects`)",
                describe(url)
            ),
        ),
        _ => ProcessError::new(
            ErrorKind::Unavailable,
            format!("publishing to `{subject}` on {} failed: {e}", describe(url)),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_nak_with_growing_delay_then_terminate() {
        let d = Duration::from_secs(1);
        assert_eq!(settlement(&Outcome::Ack, 5, 5, d), Settlement::Ack);
        let nack = Outcome::Nack("x".into());
        assert_eq!(
            settlement(&nack, 1, 3, d),
            Settlement::Nak(Duration::from_secs(1))
        );
        assert_eq!(
            settlement(&nack, 2, 3, d),
            Settlement::Nak(Duration::from_secs(2))
        );
        assert_eq!(settlement(&nack, 3, 3, d), Settlement::Term);
        assert_eq!(
            settlement(&nack, 30, 100, d),
            Settlement::Nak(MAX_NAK_DELAY)
        );
        // A consumer without a delivery limit (set on the server) never terminates.
        assert_eq!(settlement(&nack, 50, -1, d), Settlement::Nak(MAX_NAK_DELAY));
    }

    #[test]
    fn serde_defaults_match_spec_defaults() {
        use crate::config::assert_defaults_agree;
        let source = serde_json::json!({"stream": "S", "consumer": "c"});
        assert_defaults_agree::<SourceConfig>(&source_spec(), source);
        assert_defaults_agree::<SinkConfig>(&sink_spec(), serde_json::json!({"subject": "a"}));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("stream", "ORDERS_1").is_ok());
        assert!(check_name("stream", "a.b").is_err());
        assert!(check_name("consumer", "").is_err());
    }
}
