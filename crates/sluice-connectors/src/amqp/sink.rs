//! The `amqp` sink: publishes with publisher confirms on one channel shared by every delivery.
//!
//! **Architecture Invariant:** `deliver` returns `Ok` only after the broker confirmed the
//! message (`basic.ack` in confirm mode) and did not return it as unroutable (`mandatory`).
//! Concurrent deliveries publish on the same channel and wait for their own confirms, so
//! confirms are pipelined: throughput is not one round trip per message.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{Channel, Confirmation, Connection};
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, ErrorKind, HealthHandle, Message, ProcessError, Sink};
use tokio::time::Instant;

use super::connection::{ConnectionConfig, TlsConfig, describe};
use super::mapping::{PublishDefaults, properties_for};
use super::topology::{DeclareConfig, Topology};
use crate::reconnect::Backoff;
use crate::template::Template;

const DESCRIPTION: &str = "\
Publishes each message to the exchange `exchange` with the routing key `routing_key` on a \
RabbitMQ (AMQP 0.9.1) broker, in confirm mode. Both may use `{header}` placeholders filled from \
message headers (a missing header fails the message with `invalid_input`). The topology in \
`declare` is declared on every connection before publishing.

Properties come from headers, the reverse of the `amqp` source: `content-type` (else \
`content_type`), `amqp.content_encoding`, `amqp.correlation_id` (else the message's correlation \
id), `amqp.message_id` (else the message id), `amqp.reply_to`, `amqp.expiration` (milliseconds), \
`amqp.type`, `amqp.app_id`, `amqp.priority`, `amqp.timestamp` (else the message's creation \
time, in seconds). `delivery_mode` is 2 (persistent) unless `persistent: false`. With \
`forward_headers` every other header (not `amqp.*`, not `content-type`) becomes an AMQP header \
(a string).

**Delivery guarantee.** at-least-once: a message counts as delivered only once the broker \
confirmed it (publisher confirms: for a durable queue and a persistent message, written to \
disk). With `mandatory: true` (default) a message no queue is bound to receive comes back \
(`basic.return`) and fails with kind `remote` (status 312) instead of vanishing; a broker nack \
fails it with `remote`; no confirm within `confirm_timeout` is `timeout`; a broker that cannot be \
reached is `unavailable`. A message retried after a lost confirm may be published twice; \
consumers can deduplicate on `amqp.message_id`.

**Limits.** One connection and one channel per sink, opened on first use and reopened after a \
failure (attempts back off up to 1s; meanwhile deliveries fail fast with `unavailable` and the \
flow reports unhealthy). A channel error (for example publishing to an exchange that does not \
exist) closes the channel for the deliveries in flight on it too; they fail with `unavailable` \
and can be retried. Properties hold at most 255 bytes; a longer header value for one fails the \
message with `invalid_input`.";

/// The `amqp` sink's spec.
pub fn spec() -> ComponentSpec {
    let mut spec = ComponentSpec::new(
        "amqp",
        ComponentKind::Sink,
        "Publish messages to a RabbitMQ exchange with publisher confirms",
    )
    .description(DESCRIPTION);
    for field in super::connection_fields() {
        spec = spec.field(field);
    }
    spec.field(
        FieldSpec::new(
            "exchange",
            FieldType::String,
            "Exchange to publish to; `\"\"` is the default exchange (routing key = queue name). \
             `{header}` placeholders are filled from the message.",
        )
        .default_value(""),
    )
    .field(
        FieldSpec::new(
            "routing_key",
            FieldType::String,
            "Routing key; `{header}` placeholders are filled from the message, e.g. \
             `order.{region}`.",
        )
        .default_value(""),
    )
    .field(
        FieldSpec::new(
            "mandatory",
            FieldType::Bool,
            "Ask the broker to return a message no queue receives, which then fails; with \
             `false` such a message is confirmed and dropped by the broker.",
        )
        .default_value(true),
    )
    .field(
        FieldSpec::new(
            "persistent",
            FieldType::Bool,
            "Publish with `delivery_mode` 2, so durable queues keep the message across a broker \
             restart.",
        )
        .default_value(true),
    )
    .field(FieldSpec::new(
        "content_type",
        FieldType::String,
        "`content_type` property for messages without a `content-type` header.",
    ))
    .field(
        FieldSpec::new(
            "forward_headers",
            FieldType::Bool,
            "Copy message headers (except `amqp.*` and `content-type`) into AMQP headers.",
        )
        .default_value(true),
    )
    .field(
        FieldSpec::new(
            "confirm_timeout",
            FieldType::Duration,
            "Time allowed for the broker to confirm one message.",
        )
        .default_value("30s"),
    )
    .example(
        "Orders to a topic exchange, routed by region",
        "url: amqp://guest:guest@127.0.0.1:5672/%2f\nexchange: shop\nrouting_key: \"order.{region}\"\ncontent_type: application/json\ndeclare:\n  exchanges:\n    - {name: shop, type: topic}\n",
    )
    .example(
        "Straight into a queue through the default exchange",
        "url: amqp://guest:guest@127.0.0.1:5672/%2f\nrouting_key: invoices\ndeclare:\n  queues:\n    - {name: invoices, arguments: {x-queue-type: quorum}}\n",
    )
}

/// Configuration of the `amqp` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSinkConfig {
    /// Broker url.
    pub url: String,
    /// TLS files.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Connection setup budget.
    #[serde(default = "super::source::default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Topology to declare.
    #[serde(default)]
    pub declare: DeclareConfig,
    /// Exchange template.
    #[serde(default)]
    pub exchange: String,
    /// Routing key template.
    #[serde(default)]
    pub routing_key: String,
    /// `mandatory` flag.
    #[serde(default = "yes")]
    pub mandatory: bool,
    /// Persistent delivery mode.
    #[serde(default = "yes")]
    pub persistent: bool,
    /// Default content type.
    #[serde(default)]
    pub content_type: Option<String>,
    /// Headers to AMQP headers.
    #[serde(default = "yes")]
    pub forward_headers: bool,
    /// Confirm budget.
    #[serde(default = "default_confirm_timeout")]
    pub confirm_timeout: HumanDuration,
}

fn yes() -> bool {
    true
}
fn default_confirm_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

/// An open connection with a channel in confirm mode.
struct Link {
    /// Shared with the next link when only the channel had to be replaced.
    conn: Arc<Connection>,
    channel: Channel,
}

impl Link {
    fn usable(&self) -> bool {
        self.conn.status().connected() && self.channel.status().connected()
    }
}

/// Reconnection state, behind the async lock only one delivery at a time holds.
struct Reconnect {
    backoff: Backoff,
    /// No new attempt before this instant; deliveries fail fast until then.
    not_before: Option<Instant>,
    last_error: String,
}

/// A built `amqp` sink.
pub struct AmqpSink {
    conn: ConnectionConfig,
    topology: Topology,
    exchange: Template,
    routing_key: Template,
    mandatory: bool,
    defaults: PublishDefaults,
    confirm_timeout: Duration,
    health: HealthHandle,
    /// The link in use, read without waiting by every delivery.
    current: RwLock<Option<Arc<Link>>>,
    reconnect: tokio::sync::Mutex<Reconnect>,
}

impl std::fmt::Debug for AmqpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSink")
            .field("conn", &self.conn)
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .finish_non_exhaustive()
    }
}

fn template(field: &str, text: &str) -> Result<Template, BuildError> {
    Template::parse(text).map_err(|e| BuildError::field(field, e.to_string()))
}

/// Builds an `amqp` sink; it connects on first use.
pub fn build(
    config: &Value,
    ctx: &BuildContext<'_>,
) -> Result<std::sync::Arc<dyn Sink>, BuildError> {
    let c: AmqpSinkConfig = crate::config::parse(config)?;
    let conn = ConnectionConfig::new(
        &c.url,
        c.tls.as_ref(),
        c.connect_timeout,
        format!("sluice flow {} sink {}", ctx.flow, ctx.id),
    )?;
    let exchange = template("exchange", &c.exchange)?;
    let routing_key = template("routing_key", &c.routing_key)?;
    if c.exchange.is_empty() && c.routing_key.is_empty() {
        return Err(BuildError::field(
            "routing_key",
            "is empty while `exchange` is the default exchange, so no queue could receive the message; set `routing_key` to the queue name or name an exchange",
        ));
    }
    for (field, t) in [("exchange", &exchange), ("routing_key", &routing_key)] {
        // A literal too long for AMQP can never be published.
        let sample: Result<String, ()> = t.render(|_| Ok(String::new()));
        if sample.is_ok_and(|s| s.len() > 255) {
            return Err(BuildError::field(
                field,
                "is longer than 255 bytes; AMQP names and routing keys are at most 255 bytes",
            ));
        }
    }
    if c.confirm_timeout.0.is_zero() {
        return Err(BuildError::field(
            "confirm_timeout",
            "must be longer than 0s",
        ));
    }
    if c.content_type.as_ref().is_some_and(|t| t.len() > 255) {
        return Err(BuildError::field(
            "content_type",
            "is longer than 255 bytes",
        ));
    }
    Ok(Arc::new(AmqpSink {
        topology: Topology::new(&c.declare)?,
        conn,
        exchange,
        routing_key,
        mandatory: c.mandatory,
        defaults: PublishDefaults {
            persistent: c.persistent,
            content_type: c.content_type,
            forward_headers: c.forward_headers,
        },
        confirm_timeout: c.confirm_timeout.0,
        health: HealthHandle::for_component(ctx),
        current: RwLock::new(None),
        reconnect: tokio::sync::Mutex::new(Reconnect {
            backoff: Backoff::default(),
            not_before: None,
            last_error: String::new(),
        }),
    }))
}

/// Fills `template` from `msg`'s headers as an AMQP short string.
fn render(template: &Template, field: &str, msg: &Message) -> Result<ShortString, ProcessError> {
    let text = template.render(|name| {
        msg.headers.get(name).cloned().ok_or_else(|| {
            ProcessError::invalid_input(format!(
                "`{field}` needs the header `{name}`, which the message does not have"
            ))
        })
    })?;
    ShortString::try_new(text)
        .map_err(|e| ProcessError::invalid_input(format!("`{field}` rendered too long: {e}")))
}

#[async_trait]
impl Sink for AmqpSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        let exchange = render(&self.exchange, "exchange", msg)?;
        let routing_key = render(&self.routing_key, "routing_key", msg)?;
        let properties = properties_for(msg, &self.defaults)?;
        let link = self.link().await?;
        let options = BasicPublishOptions {
            mandatory: self.mandatory,
            immediate: false,
        };
        let publish = async {
            link.channel
                .basic_publish(
                    exchange.clone(),
                    routing_key.clone(),
                    options,
                    msg.body.as_bytes(),
                    properties,
                )
                .await?
                .await
        };
        let confirmation = match tokio::time::timeout(self.confirm_timeout, publish).await {
            Ok(Ok(confirmation)) => confirmation,
            Ok(Err(error)) => return Err(self.failed(&error, exchange.as_str())),
            Err(_) => {
                return Err(ProcessError::new(
                    ErrorKind::Timeout,
                    format!(
                        "{} did not confirm the message within confirm_timeout ({}); it may or may not have been published",
                        self.conn.what(),
                        HumanDuration(self.confirm_timeout)
                    ),
                ));
            }
        };
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => {
                let mut error = ProcessError::new(
                    ErrorKind::Remote,
                    format!(
                        "{} returned the message as unroutable ({} {}): no queue is bound to exchange `{}` for routing key `{}`; declare a binding (or set `mandatory: false` to let the broker drop such messages)",
                        self.conn.what(),
                        returned.reply_code,
                        returned.reply_text,
                        display_exchange(exchange.as_str()),
                        routing_key
                    ),
                );
                error.remote_status = Some(returned.reply_code);
                Err(error)
            }
            Confirmation::Nack(_) => Err(ProcessError::new(
                ErrorKind::Remote,
                format!(
                    "{} refused the message (publisher nack: it could not be stored, e.g. a full queue with `x-overflow: reject-publish`)",
                    self.conn.what()
                ),
            )),
            Confirmation::NotRequested => Err(ProcessError::new(
                ErrorKind::Internal,
                "the channel is not in confirm mode; please report this",
            )),
        }
    }
}

fn display_exchange(name: &str) -> &str {
    if name.is_empty() { "(default)" } else { name }
}

impl AmqpSink {
    /// The link to publish on: the current one, or a new one.
    async fn link(&self) -> Result<Arc<Link>, ProcessError> {
        if let Some(link) = self.current_link() {
            return Ok(link);
        }
        let mut state = self.reconnect.lock().await;
        // Another delivery may have reconnected while this one waited for the lock.
        if let Some(link) = self.current_link() {
            return Ok(link);
        }
        if let Some(at) = state.not_before
            && Instant::now() < at
        {
            return Err(self.unavailable(&state.last_error));
        }
        let previous = self.take_link();
        match self.open(previous.as_deref()).await {
            Ok(link) => {
                let link = Arc::new(link);
                if let Ok(mut current) = self.current.write() {
                    *current = Some(Arc::clone(&link));
                }
                if state.backoff.failures() > 0 {
                    tracing::info!(broker = %self.conn.what(), "amqp sink connected again");
                }
                state.backoff.reset();
                state.not_before = None;
                self.health.healthy();
                Ok(link)
            }
            Err(reason) => {
                let delay = state.backoff.next_delay();
                state.not_before = Some(Instant::now() + delay);
                if state.backoff.failures() % 10 == 1 {
                    tracing::warn!(broker = %self.conn.what(), error = %reason, "amqp sink cannot connect; retrying on the next deliveries");
                }
                self.health.unhealthy(format!(
                    "cannot reach {}: {reason}; retrying (backoff up to 1s)",
                    self.conn.what()
                ));
                state.last_error = reason;
                Err(self.unavailable(&state.last_error))
            }
        }
    }

    fn current_link(&self) -> Option<Arc<Link>> {
        let current = self.current.read().ok()?;
        current.as_ref().filter(|l| l.usable()).cloned()
    }

    fn take_link(&self) -> Option<Arc<Link>> {
        self.current.write().ok().and_then(|mut c| c.take())
    }

    /// Opens a channel in confirm mode, on the previous connection if it is still up (a channel
    /// error leaves the connection usable), and declares the topology.
    async fn open(&self, previous: Option<&Link>) -> Result<Link, String> {
        let reuse = previous.filter(|l| l.conn.status().connected());
        let conn = match reuse {
            Some(link) => Arc::clone(&link.conn),
            None => {
                if let Some(old) = previous {
                    let _ = old.conn.close(320, "reconnecting".into()).await;
                }
                Arc::new(self.conn.connect().await?)
            }
        };
        let setup = async {
            let channel = conn.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            self.topology.declare(&channel).await?;
            Ok::<_, lapin::Error>(channel)
        };
        match tokio::time::timeout(self.conn.timeout(), setup).await {
            Ok(Ok(channel)) => Ok(Link { conn, channel }),
            Ok(Err(e)) => {
                let _ = conn.close(200, "setup failed".into()).await;
                Err(describe(&e))
            }
            Err(_) => {
                let _ = conn.close(200, "setup timed out".into()).await;
                Err(format!(
                    "opening a channel and declaring took longer than connect_timeout ({})",
                    HumanDuration(self.conn.timeout())
                ))
            }
        }
    }

    fn unavailable(&self, reason: &str) -> ProcessError {
        ProcessError::new(
            ErrorKind::Unavailable,
            format!("cannot reach {}: {reason}", self.conn.what()),
        )
    }

    /// The error for a publish that failed. The link needs no bookkeeping: once its channel or
    /// connection is closed it is no longer `usable`, and the next delivery opens a new channel
    /// (on the same connection when only the channel died).
    fn failed(&self, error: &lapin::Error, exchange: &str) -> ProcessError {
        match error.kind() {
            lapin::ErrorKind::ProtocolError(e)
                if !matches!(e.kind(), lapin::protocol::AMQPErrorKind::Hard(_)) =>
            {
                ProcessError::new(
                    ErrorKind::Remote,
                    format!(
                        "{} closed the channel publishing to exchange `{}`: {e}",
                        self.conn.what(),
                        display_exchange(exchange)
                    ),
                )
            }
            _ => self.unavailable(&describe(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[allow(clippy::needless_pass_by_value)] // test helper: callers pass json!() inline
    fn try_build(config: Value) -> Result<Arc<dyn Sink>, BuildError> {
        crate::test_context::with_context("to", |ctx| build(&config, ctx))
    }

    fn err(config: Value) -> BuildError {
        match try_build(config) {
            Ok(_) => panic!("expected a build error"),
            Err(e) => e,
        }
    }

    #[test]
    fn validation_names_the_field() {
        let url = "amqp://127.0.0.1";
        assert_eq!(
            err(json!({"url": url})).field.as_deref(),
            Some("routing_key")
        );
        assert_eq!(
            err(json!({"url": url, "routing_key": "a{b"}))
                .field
                .as_deref(),
            Some("routing_key")
        );
        assert_eq!(
            err(json!({"url": url, "exchange": "x".repeat(300)}))
                .field
                .as_deref(),
            Some("exchange")
        );
        assert_eq!(
            err(json!({"url": url, "routing_key": "q", "confirm_timeout": "0s"}))
                .field
                .as_deref(),
            Some("confirm_timeout")
        );
        assert!(try_build(json!({"url": url, "routing_key": "q"})).is_ok());
        assert!(try_build(json!({"url": url, "exchange": "{ex}"})).is_ok());
    }

    #[test]
    fn routing_keys_render_from_headers() {
        let t = Template::parse("order.{region}").unwrap();
        let msg = Message::json(json!(1)).with_header("region", "eu");
        assert_eq!(
            render(&t, "routing_key", &msg).unwrap().as_str(),
            "order.eu"
        );
        let err = render(&t, "routing_key", &Message::json(json!(1))).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidInput);
        assert!(err.detail.contains("`region`"), "{}", err.detail);
        let long = Message::json(json!(1)).with_header("region", "x".repeat(300));
        assert_eq!(
            render(&t, "routing_key", &long).unwrap_err().kind,
            ErrorKind::InvalidInput
        );
    }

    #[tokio::test]
    async fn an_unreachable_broker_is_unavailable_and_fails_fast_meanwhile() {
        let sink = try_build(json!({"url": "amqp://127.0.0.1:1/%2f", "routing_key": "q"})).unwrap();
        let msg = Message::json(json!(1));
        let err = sink.deliver(&msg).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unavailable);
        assert!(
            err.detail.contains("RabbitMQ at amqp://127.0.0.1:1/%2f"),
            "{}",
            err.detail
        );
        // Within the backoff the next delivery does not try again.
        let started = std::time::Instant::now();
        let again = sink.deliver(&msg).await.unwrap_err();
        assert_eq!(again.kind, ErrorKind::Unavailable);
        assert!(started.elapsed() < Duration::from_millis(40));
    }
}
