//! The `amqp` source: consumes a queue with manual acknowledgements.
//!
//! **Architecture Invariant:** a delivery is acknowledged to the broker only after its
//! [`Outcome::Ack`] (every target committed it); a nack requeues or rejects it per `on_failure`;
//! a delivery whose outcome never came (crash, lost connection) is redelivered by the broker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, Consumer};
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    AckToken, Body, BuildContext, BuildError, HealthHandle, Message, Outcome, Source,
    SourceContext, SourceError,
};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::connection::{ConnectionConfig, TlsConfig, describe};
use super::mapping::headers_from_delivery;
use super::settle::{Settle, Verdict};
use super::topology::{DeclareConfig, Topology, short};
use crate::reconnect::{self, Backoff};

const DESCRIPTION: &str = "\
Consumes the queue `queue` of a RabbitMQ (AMQP 0.9.1) broker with manual acknowledgements. Up \
to `prefetch` deliveries are in flight at once (`basic.qos`); they are handed to the flow in \
arrival order (a flow with `ordered_by` keeps per-key order) and each is acknowledged on its own \
once the flow is done with it. The topology in `declare` (exchanges, queues, bindings) is \
declared on every connection before consuming.

Headers: every AMQP header under its own name (numbers and booleans as text, tables and arrays \
as JSON); `content-type` from the `content_type` property; `amqp.content_encoding`, \
`amqp.correlation_id` (also the message's correlation id), `amqp.message_id`, `amqp.reply_to`, \
`amqp.expiration`, `amqp.type`, `amqp.app_id`, `amqp.user_id`, `amqp.delivery_mode`, \
`amqp.priority`, `amqp.timestamp` (seconds) when the property is set; and always \
`amqp.exchange`, `amqp.routing_key`, `amqp.redelivered` (`true` when the broker delivered it \
before) and `amqp.queue`.

**Delivery guarantee.** at-least-once: a message is acknowledged (`basic.ack`) only after every \
target committed it. When the flow fails it (after its own retries and error handling), \
`on_failure: requeue` gives it back to the queue (`basic.nack` with requeue, after \
`requeue_delay`, so a message that keeps failing does not spin) and `on_failure: reject` \
rejects it without requeue, so the broker moves it to the queue's dead-letter exchange \
(`x-dead-letter-exchange`). Messages in flight when the connection drops or the process dies are \
redelivered by the broker (`amqp.redelivered: true`); make targets idempotent, for example on \
`amqp.message_id`.

**Limits.** One channel and one consumer per source. An unreachable broker (or a missing \
queue) does not stop the flow: the source retries with capped backoff (up to 1s) and the flow \
reports unhealthy meanwhile. With `on_failure: reject` and no dead-letter exchange on the queue, \
the broker discards failed messages (declaring the queue here without one is refused). Header \
values that are not UTF-8 are converted lossily.";

/// The `amqp` source's spec.
pub fn spec() -> ComponentSpec {
    let mut spec = ComponentSpec::new(
        "amqp",
        ComponentKind::Source,
        "Consume a RabbitMQ queue, acknowledging each message after the flow commits it",
    )
    .description(DESCRIPTION);
    for field in super::connection_fields() {
        spec = spec.field(field);
    }
    spec.field(FieldSpec::new("queue", FieldType::String, "Queue to consume.").required())
        .field(
            FieldSpec::new(
                "prefetch",
                FieldType::Integer {
                    min: Some(1),
                    max: Some(65535),
                },
                "Most unacknowledged messages in flight at once (`basic.qos`); the flow's \
                 `concurrency` limits further.",
            )
            .default_value(100),
        )
        .field(
            FieldSpec::new(
                "on_failure",
                FieldType::Enum(vec!["requeue", "reject"]),
                "What a failed message becomes: `requeue` puts it back in the queue; `reject` \
                 dead-letters it through the queue's `x-dead-letter-exchange`.",
            )
            .default_value("requeue"),
        )
        .field(
            FieldSpec::new(
                "requeue_delay",
                FieldType::Duration,
                "Wait before a failed message is requeued (`on_failure: requeue`).",
            )
            .default_value("1s"),
        )
        .field(FieldSpec::new(
            "consumer_tag",
            FieldType::String,
            "Consumer tag shown by the broker; default `sluice-<uuid>`.",
        ))
        .example(
            "Orders from a durable queue bound to a topic exchange, failures dead-lettered",
            "url: amqp://guest:guest@127.0.0.1:5672/%2f\nqueue: orders\nprefetch: 50\non_failure: reject\ndeclare:\n  exchanges:\n    - {name: shop, type: topic}\n    - {name: shop.dlx, type: fanout}\n  queues:\n    - name: orders\n      arguments: {x-dead-letter-exchange: shop.dlx, x-queue-type: quorum}\n    - {name: orders.failed}\n  bindings:\n    - {queue: orders, exchange: shop, routing_key: \"order.*\"}\n    - {queue: orders.failed, exchange: shop.dlx}\n",
        )
        .example(
            "An existing queue over TLS, trusting the system's certificate authorities",
            "url: amqps://sluice:s3cret@mq.internal:5671/prod\nqueue: invoices\nprefetch: 200\n",
        )
}

/// What a failed message becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// `basic.nack` with requeue.
    Requeue,
    /// `basic.reject` without requeue: dead-lettered by the broker.
    Reject,
}

/// Configuration of the `amqp` source.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSourceConfig {
    /// Broker url.
    pub url: String,
    /// TLS files.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Connection setup budget.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Topology to declare.
    #[serde(default)]
    pub declare: DeclareConfig,
    /// Queue consumed.
    pub queue: String,
    /// `basic.qos` prefetch count.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Requeue or reject.
    #[serde(default = "default_on_failure")]
    pub on_failure: OnFailure,
    /// Wait before requeueing.
    #[serde(default = "default_requeue_delay")]
    pub requeue_delay: HumanDuration,
    /// Consumer tag.
    #[serde(default)]
    pub consumer_tag: Option<String>,
}

pub(super) fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_prefetch() -> u16 {
    100
}
fn default_on_failure() -> OnFailure {
    OnFailure::Requeue
}
fn default_requeue_delay() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}

/// A built `amqp` source.
#[derive(Debug)]
pub struct AmqpSource {
    conn: ConnectionConfig,
    topology: Topology,
    queue: ShortString,
    prefetch: u16,
    on_failure: OnFailure,
    requeue_delay: Duration,
    consumer_tag: ShortString,
}

/// Builds an `amqp` source.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Box<dyn Source>, BuildError> {
    let c: AmqpSourceConfig = crate::config::parse(config)?;
    let conn = ConnectionConfig::new(
        &c.url,
        c.tls.as_ref(),
        c.connect_timeout,
        format!("sluice flow {}", ctx.flow),
    )?;
    if c.queue.is_empty() {
        return Err(BuildError::field(
            "queue",
            "is empty; name the queue to consume",
        ));
    }
    let queue = short("queue", &c.queue)?;
    if c.prefetch == 0 {
        return Err(BuildError::field(
            "prefetch",
            "must be at least 1 (0 would mean unlimited)",
        ));
    }
    if c.on_failure == OnFailure::Reject {
        let declared = c.declare.queues.iter().find(|q| q.name == c.queue);
        if declared.is_some_and(|q| !q.arguments.contains_key("x-dead-letter-exchange")) {
            return Err(BuildError::field(
                "on_failure",
                format!(
                    "is `reject` but the queue `{}` declared here has no `x-dead-letter-exchange`, so the broker would discard failed messages; add the argument or use `on_failure: requeue`",
                    c.queue
                ),
            ));
        }
    }
    let consumer_tag = match &c.consumer_tag {
        Some(tag) if tag.is_empty() => {
            return Err(BuildError::field(
                "consumer_tag",
                "is empty; remove it to get a generated tag",
            ));
        }
        Some(tag) => short("consumer_tag", tag)?,
        None => ShortString::from(format!("sluice-{}", uuid::Uuid::now_v7())),
    };
    Ok(Box::new(AmqpSource {
        topology: Topology::new(&c.declare)?,
        conn,
        queue,
        prefetch: c.prefetch,
        on_failure: c.on_failure,
        requeue_delay: c.requeue_delay.0,
        consumer_tag,
    }))
}

/// An open connection with a consuming channel.
struct Session {
    conn: Connection,
    channel: Channel,
    consumer: Consumer,
    /// Where this channel's deliveries report; dropped at shutdown so the settling task ends.
    settle: Option<Settle>,
    /// Sends the channel's acks, nacks and rejects (see `settle.rs`).
    settler: JoinHandle<()>,
}

/// Why consuming stopped.
enum Ended {
    /// The runtime is shutting down.
    Shutdown,
    /// The connection, channel or consumer was lost; reconnect.
    Lost(String),
}

/// A session shorter than this counts as a flap: the next reconnect waits first.
const STABLE_SESSION: Duration = Duration::from_secs(5);

#[async_trait]
impl Source for AmqpSource {
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let this = Arc::new(*self);
        let health = HealthHandle::for_source(&ctx);
        let what = this.conn.what();
        let mut backoff = Backoff::default();
        // Separate from `backoff`, which a successful connection resets: a broker that accepts
        // and then drops us at once must still be retried with growing waits.
        let mut flaps = Backoff::default();
        let mut in_flight = JoinSet::new();
        loop {
            let session =
                reconnect::connect(&what, &health, &ctx.shutdown, &mut backoff, || this.open())
                    .await;
            let Some(mut session) = session else { break };
            tracing::info!(flow = %ctx.flow, broker = %what, queue = this.queue.as_str(), "consuming");
            let started = Instant::now();
            match this.consume(&mut session, &ctx, &mut in_flight).await {
                Ended::Shutdown => {
                    // Stop deliveries, let the messages in flight finish and be acknowledged on
                    // this channel, then close; the broker requeues whatever is left unacked.
                    let _ = session
                        .channel
                        .basic_cancel(this.consumer_tag.clone(), BasicCancelOptions::default())
                        .await;
                    while in_flight.join_next().await.is_some() {}
                    // Every verdict is in; let the settling task send the last frames.
                    session.settle = None;
                    let _ = (&mut session.settler).await;
                    let _ = session.channel.close(200, "shutdown".into()).await;
                    let _ = session.conn.close(200, "shutdown".into()).await;
                    break;
                }
                Ended::Lost(reason) => {
                    tracing::warn!(flow = %ctx.flow, broker = %what, %reason, "lost the broker; its unacknowledged messages will be redelivered; reconnecting");
                    health.unhealthy(format!("lost {what}: {reason}; reconnecting"));
                    let _ = session.conn.close(320, "reconnecting".into()).await;
                    if started.elapsed() < STABLE_SESSION {
                        let delay = flaps.next_delay();
                        tokio::select! {
                            () = ctx.shutdown.cancelled() => break,
                            () = tokio::time::sleep(delay) => {}
                        }
                    } else {
                        flaps.reset();
                    }
                }
            }
        }
        // Messages of a lost channel may still be in flight: let them finish (their acks go
        // nowhere; the broker redelivers them) so the flow is drained before returning.
        while in_flight.join_next().await.is_some() {}
        Ok(())
    }
}

impl AmqpSource {
    /// Connects, declares the topology, sets the prefetch and starts consuming.
    async fn open(&self) -> Result<Session, String> {
        let conn = self.conn.connect().await?;
        let setup = async {
            let channel = conn.create_channel().await?;
            self.topology.declare(&channel).await?;
            channel
                .basic_qos(self.prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    self.queue.clone(),
                    self.consumer_tag.clone(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((channel, consumer))
        };
        let result = tokio::time::timeout(self.conn.timeout(), setup).await;
        match result {
            Ok(Ok((channel, consumer))) => {
                let (settle, settler) =
                    Settle::start(channel.clone(), self.prefetch, self.queue.to_string());
                Ok(Session {
                    conn,
                    channel,
                    consumer,
                    settle: Some(settle),
                    settler,
                })
            }
            Ok(Err(e)) => {
                let _ = conn.close(200, "setup failed".into()).await;
                Err(describe(&e))
            }
            Err(_) => {
                let _ = conn.close(200, "setup timed out".into()).await;
                Err(format!(
                    "declaring and consuming `{}` took longer than connect_timeout ({})",
                    self.queue,
                    HumanDuration(self.conn.timeout())
                ))
            }
        }
    }

    /// Hands deliveries to the flow until shutdown or until the session is lost.
    async fn consume(
        self: &Arc<Self>,
        session: &mut Session,
        ctx: &SourceContext,
        in_flight: &mut JoinSet<()>,
    ) -> Ended {
        loop {
            while in_flight.try_join_next().is_some() {}
            let next = tokio::select! {
                biased;
                () = ctx.shutdown.cancelled() => return Ended::Shutdown,
                next = session.consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    let Some(settle) = session.settle.clone() else {
                        return Ended::Shutdown;
                    };
                    self.admit(delivery, &settle, ctx, in_flight).await;
                }
                Some(Err(e)) => return Ended::Lost(describe(&e)),
                None => {
                    return Ended::Lost(
                        "the broker cancelled the consumer (was the queue deleted?)".into(),
                    );
                }
            }
        }
    }

    /// Takes the delivery's place in the flow now and settles it with the broker later.
    async fn admit(
        self: &Arc<Self>,
        delivery: Delivery,
        settle: &Settle,
        ctx: &SourceContext,
        in_flight: &mut JoinSet<()>,
    ) {
        let headers = headers_from_delivery(&delivery, self.queue.as_str());
        let correlation_id = delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str().to_owned());
        let Delivery {
            data, delivery_tag, ..
        } = delivery;
        settle.delivered(delivery_tag);
        let mut msg = Message::new(Body::from_bytes(data));
        msg.headers = headers;
        msg.meta.origin = Some(Arc::clone(&ctx.flow));
        msg.meta.correlation_id = correlation_id;
        let (token, outcome) = AckToken::channel();
        let work = Arc::clone(&ctx.dispatcher).admit(msg.with_ack(token)).await;
        let this = Arc::clone(self);
        let flow = Arc::clone(&ctx.flow);
        let shutdown = ctx.shutdown.clone();
        let settle = settle.clone();
        in_flight.spawn(async move {
            // The flow resolves the message's shares, on success and on failure alike.
            let _ = work.await;
            let outcome = outcome
                .await
                .unwrap_or_else(|_| Outcome::Nack(sluice_core::ack::DROPPED_UNRESOLVED.into()));
            let verdict = this.verdict(outcome, &flow, &shutdown).await;
            settle.settled(delivery_tag, verdict);
        });
    }

    /// What to tell the broker about a finished delivery; a requeue waits `requeue_delay`
    /// first (not at shutdown: the channel closes and the broker requeues it anyway).
    async fn verdict(&self, outcome: Outcome, flow: &str, shutdown: &CancellationToken) -> Verdict {
        match outcome {
            Outcome::Ack => Verdict::Ack,
            Outcome::Nack(reason) => match self.on_failure {
                OnFailure::Requeue => {
                    tracing::debug!(flow, queue = self.queue.as_str(), %reason, "message failed; requeueing it");
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = tokio::time::sleep(self.requeue_delay) => {}
                    }
                    Verdict::Requeue
                }
                OnFailure::Reject => {
                    tracing::warn!(flow, queue = self.queue.as_str(), %reason, "message failed; rejecting it to the dead-letter exchange");
                    Verdict::Reject
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[allow(clippy::needless_pass_by_value)] // test helper: callers pass json!() inline
    fn try_build(config: Value) -> Result<Box<dyn Source>, BuildError> {
        crate::test_context::with_context("from", |ctx| build(&config, ctx))
    }

    fn err(config: Value) -> BuildError {
        match try_build(config) {
            Ok(_) => panic!("expected a build error"),
            Err(e) => e,
        }
    }

    #[test]
    fn minimal_config_builds_with_defaults() {
        let c: AmqpSourceConfig =
            crate::config::parse(&json!({"url": "amqp://127.0.0.1", "queue": "q"})).unwrap();
        assert_eq!(c.prefetch, 100);
        assert_eq!(c.on_failure, OnFailure::Requeue);
        assert!(try_build(json!({"url": "amqp://127.0.0.1", "queue": "q"})).is_ok());
    }

    #[test]
    fn validation_names_the_field() {
        let base = |extra: Value| {
            let mut v = json!({"url": "amqp://127.0.0.1", "queue": "q"});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        assert_eq!(
            err(base(json!({"queue": ""}))).field.as_deref(),
            Some("queue")
        );
        assert_eq!(
            err(base(json!({"prefetch": 0}))).field.as_deref(),
            Some("prefetch")
        );
        assert_eq!(
            err(base(json!({"url": "nope"}))).field.as_deref(),
            Some("url")
        );
        assert_eq!(
            err(base(json!({"colour": 1}))).field.as_deref(),
            Some("colour")
        );
        assert_eq!(
            err(base(json!({"consumer_tag": ""}))).field.as_deref(),
            Some("consumer_tag")
        );
        let e = err(base(
            json!({"on_failure": "reject", "declare": {"queues": [{"name": "q"}]}}),
        ));
        assert_eq!(e.field.as_deref(), Some("on_failure"));
        assert!(
            e.message.contains("x-dead-letter-exchange"),
            "{}",
            e.message
        );
        assert!(
            try_build(base(json!({"on_failure": "reject", "declare": {"queues": [
                {"name": "q", "arguments": {"x-dead-letter-exchange": "dlx"}}
            ]}})))
            .is_ok()
        );
    }
}
