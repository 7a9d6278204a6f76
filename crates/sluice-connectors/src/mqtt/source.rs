//! The `mqtt` source: subscribes with a persistent session and acknowledges (PUBACK/PUBREC) each
//! message only after the flow committed it.
//!
//! **Architecture Invariant:** a QoS 1/2 message is acknowledged to the broker only after its
//! [`Outcome::Ack`]; a failed one is never acknowledged, and the session is resumed (reconnect
//! with the same client id, clean session off) so the broker delivers it again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rumqttc::QoS;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    AckToken, Body, BuildContext, BuildError, HealthHandle, Message, Outcome, Source,
    SourceContext, SourceError,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::client::{self, Client, Event, Protocol, Received};
use super::{Broker, check_client_id, qos, qos_number};
use crate::reconnect::Backoff;

const DESCRIPTION: &str = "\
Subscribes to the topic filters in `topics` (wildcards `+` and `#` allowed) on an MQTT 3.1.1 or \
MQTT 5 (`protocol: \"5\"`) broker and turns each published message into a message whose body is \
the payload. Messages are handed to the flow in arrival order.

Headers: `mqtt.topic` (the concrete topic the message was published to, also for wildcard \
subscriptions), `mqtt.qos` (the delivery QoS: the lower of the publisher's and `qos`), \
`mqtt.retain` (`true` for a retained message sent on subscribing) and `mqtt.dup` (`true` when the \
broker delivers it again). With MQTT 5, every user property becomes a header of the same name \
(the first value of a repeated one; `mqtt.*` names are left to the source) and the content type \
becomes `content-type`.

The session is persistent by default (`clean_session: false`) under the stable `client_id`: \
the broker keeps the subscriptions and queues QoS 1 and 2 messages published while Sluice is \
down, and delivers them when it reconnects. With MQTT 5 the session lasts `session_expiry` after \
a disconnect (by default it never expires, as in 3.1.1).

**Delivery guarantee.** at-least-once for QoS 1 and 2: a message is acknowledged (PUBACK, or \
PUBREC for QoS 2) only after every target committed it. A message the flow fails is not \
acknowledged; after `redelivery_delay` the source resumes its session (reconnects with the same \
client id) and the broker delivers every unacknowledged message again with `mqtt.dup: true`, \
including other messages still in flight then: expect duplicates and make targets idempotent. \
QoS 0 messages are at-most-once: a message lost in a crash or a failed flow is gone.

**Limits.** No TLS yet (`mqtt://` only). \
Two processes must not share a `client_id` (the broker disconnects the older one). How many \
unacknowledged messages the broker sends at once is the broker's setting (Mosquitto: \
`max_inflight_messages`, 20 by default). With `clean_session: true` nothing is kept while \
disconnected. Payloads over 16 MiB are refused.";

/// The `mqtt` source's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "mqtt",
        ComponentKind::Source,
        "Subscribe to MQTT topics with a persistent session, acknowledging after commit",
    )
    .description(DESCRIPTION)
    .field(super::url_field())
    .field(
        FieldSpec::new(
            "topics",
            FieldType::OneOf(vec![
                FieldType::String,
                FieldType::List(Box::new(FieldType::String)),
            ]),
            "Topic filter or filters to subscribe to; `+` matches one level, `#` the rest.",
        )
        .required(),
    )
    .field(super::qos_field(
        "Highest QoS to receive at (0 at most once, 1 at least once, 2 exactly once on the wire).",
    ))
    .field(FieldSpec::new(
        "client_id",
        FieldType::String,
        "Client id naming the persistent session; default `sluice-<flow>`. Keep it stable across \
         restarts and unique among clients.",
    ))
    .field(
        FieldSpec::new(
            "clean_session",
            FieldType::Bool,
            "Start a fresh session on every connection (the broker keeps nothing while \
             disconnected).",
        )
        .default_value(false),
    )
    .field(FieldSpec::new(
        "session_expiry",
        FieldType::Duration,
        "MQTT 5 only: how long the broker keeps the persistent session (subscriptions and queued \
         messages) after a disconnect; default never expires. Whole seconds.",
    ))
    .field(client::protocol_field())
    .field(super::keep_alive_field())
    .field(
        FieldSpec::new(
            "redelivery_delay",
            FieldType::Duration,
            "Wait after a failed message before the session is resumed to have it delivered \
             again.",
        )
        .default_value("1s"),
    )
    .example(
        "Sensor readings from every site, at least once",
        "url: mqtt://127.0.0.1:1883\ntopics: [\"sites/+/temperature\", \"alerts/#\"]\nqos: 1\nclient_id: sluice-telemetry\n",
    )
    .example(
        "MQTT 5: user properties as headers, the session kept for a day",
        "url: mqtt://127.0.0.1:1883\ntopics: \"orders/#\"\nprotocol: \"5\"\nclient_id: sluice-orders\nsession_expiry: 1d\n",
    )
}

/// Configuration of the `mqtt` source.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    /// Broker url.
    pub url: String,
    /// Topic filters.
    pub topics: Topics,
    /// Highest QoS.
    #[serde(default = "super::default_qos")]
    pub qos: u8,
    /// Client id.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Clean session.
    #[serde(default)]
    pub clean_session: bool,
    /// MQTT 5 session expiry.
    #[serde(default)]
    pub session_expiry: Option<HumanDuration>,
    /// Protocol version.
    #[serde(default)]
    pub protocol: Protocol,
    /// Keep alive.
    #[serde(default = "super::default_keep_alive")]
    pub keep_alive: HumanDuration,
    /// Wait before resuming the session after a failure.
    #[serde(default = "default_redelivery_delay")]
    pub redelivery_delay: HumanDuration,
}

/// One filter or several.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Topics {
    /// One filter.
    One(String),
    /// Several.
    Many(Vec<String>),
}

fn default_redelivery_delay() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}

/// A built `mqtt` source.
#[derive(Debug)]
pub struct MqttSource {
    broker: Broker,
    client_id: String,
    filters: Vec<String>,
    qos: QoS,
    clean_session: bool,
    session_expiry: u32,
    protocol: Protocol,
    keep_alive: Duration,
    redelivery_delay: Duration,
}

/// Builds an `mqtt` source.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Box<dyn Source>, BuildError> {
    let c: MqttSourceConfig = crate::config::parse(config)?;
    let broker = Broker::parse(&c.url)?;
    let filters = match c.topics {
        Topics::One(t) => vec![t],
        Topics::Many(ts) => ts,
    };
    if filters.is_empty() {
        return Err(BuildError::field(
            "topics",
            "is empty; name at least one topic filter",
        ));
    }
    for f in &filters {
        if f.is_empty() || !rumqttc::valid_filter(f) {
            return Err(BuildError::field(
                "topics",
                format!(
                    "`{f}` is not a valid topic filter: `#` may only end it and `+` must fill a whole level, e.g. `sites/+/temperature` or `alerts/#`"
                ),
            ));
        }
    }
    let client_id = c
        .client_id
        .unwrap_or_else(|| format!("sluice-{}", ctx.flow));
    check_client_id(&client_id)?;
    if c.keep_alive.0 < Duration::from_secs(1) {
        return Err(BuildError::field("keep_alive", "must be at least 1s"));
    }
    let session_expiry = session_expiry(c.session_expiry, c.protocol, c.clean_session)?;
    Ok(Box::new(MqttSource {
        broker,
        client_id,
        filters,
        qos: qos(c.qos)?,
        clean_session: c.clean_session,
        session_expiry,
        protocol: c.protocol,
        keep_alive: c.keep_alive.0,
        redelivery_delay: c.redelivery_delay.0,
    }))
}

/// The MQTT 5 session expiry interval in seconds: `u32::MAX` (never) by default, 0 for a clean
/// session.
fn session_expiry(
    configured: Option<HumanDuration>,
    protocol: Protocol,
    clean_session: bool,
) -> Result<u32, BuildError> {
    let Some(HumanDuration(expiry)) = configured else {
        return Ok(if clean_session { 0 } else { u32::MAX });
    };
    if protocol != Protocol::V5 {
        return Err(BuildError::field(
            "session_expiry",
            "is an MQTT 5 setting; add `protocol: \"5\"` or remove it (an MQTT 3.1.1 persistent session never expires)",
        ));
    }
    if clean_session {
        return Err(BuildError::field(
            "session_expiry",
            "has no effect with `clean_session: true`, which keeps nothing after a disconnect; remove one of them",
        ));
    }
    if expiry < Duration::from_secs(1) {
        return Err(BuildError::field(
            "session_expiry",
            "must be at least 1s; for a session that ends with the connection use `clean_session: true`",
        ));
    }
    // u32::MAX seconds means "never" on the wire; anything longer is the same in practice.
    Ok(u32::try_from(expiry.as_secs())
        .unwrap_or(u32::MAX - 1)
        .min(u32::MAX - 1))
}

/// State shared by the poll loop and the tasks settling messages.
struct Shared {
    client: Client,
    /// A session resume was asked for (a failed message) and not done yet.
    resume_requested: AtomicBool,
}

#[async_trait]
impl Source for MqttSource {
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let health = HealthHandle::for_source(&ctx);
        let what = self.broker.what();
        let (client, mut eventloop) = client::connect(
            &self.broker,
            self.protocol,
            &client::Session {
                client_id: self.client_id.clone(),
                keep_alive: self.keep_alive,
                clean_start: self.clean_session,
                session_expiry: self.session_expiry,
                manual_acks: true,
                inflight: None,
            },
            256,
        );
        let shared = Arc::new(Shared {
            client,
            resume_requested: AtomicBool::new(false),
        });
        // Publishes go to a dispatcher task in arrival order, so the poll loop never waits for
        // the flow (it must keep answering pings). The broker bounds how many QoS 1/2 messages
        // are unacknowledged, which bounds this queue.
        let (tx, rx) = mpsc::unbounded_channel::<Received>();
        let dispatcher = tokio::spawn(dispatch_loop(
            rx,
            ctx.clone(),
            Arc::clone(&shared),
            self.redelivery_delay,
        ));
        let mut backoff = Backoff::default();
        let mut phase = Phase::Running { tx, dispatcher };
        loop {
            let step = match &mut phase {
                Phase::Running { .. } => tokio::select! {
                    biased;
                    // Shutting down: stop taking messages (those not taken are not acknowledged
                    // and come again in the next session) and let those in flight finish; this
                    // loop keeps polling so their acknowledgements go out.
                    () = ctx.shutdown.cancelled() => Step::Drain,
                    event = eventloop.poll() => Step::Event(event),
                },
                Phase::Draining(dispatcher) => tokio::select! {
                    biased;
                    _ = dispatcher => Step::Close,
                    event = eventloop.poll() => Step::Event(event),
                },
                Phase::Closing(deadline) => tokio::select! {
                    () = tokio::time::sleep_until(*deadline) => Step::Stop,
                    event = eventloop.poll() => Step::Event(event),
                },
            };
            let event = match step {
                Step::Event(event) => event,
                Step::Drain => {
                    phase = phase.drain();
                    continue;
                }
                Step::Close => {
                    let _ = shared.client.try_disconnect();
                    phase = Phase::Closing(tokio::time::Instant::now() + Duration::from_secs(2));
                    continue;
                }
                Step::Stop => break,
            };
            match event {
                Ok(Event::Connected { session_present }) => {
                    if backoff.failures() > 0 {
                        tracing::info!(flow = %ctx.flow, broker = %what, "connected again");
                    }
                    backoff.reset();
                    health.healthy();
                    tracing::debug!(flow = %ctx.flow, broker = %what, session_present, "connected");
                    // Subscribing again on a resumed session is harmless and picks up changed
                    // filters. Not awaited here: this loop drains the request queue.
                    let client = shared.client.clone();
                    let filters = self.filters.clone();
                    let qos = self.qos;
                    tokio::spawn(async move {
                        let _ = client.subscribe(&filters, qos).await;
                    });
                }
                Ok(Event::Subscribed { refused }) => {
                    if !refused.is_empty() {
                        health.unhealthy(format!(
                            "{what} refused the subscription to {:?} ({}; check the broker's ACL); retrying on reconnect",
                            self.filters,
                            refused.join(", ")
                        ));
                        tracing::warn!(flow = %ctx.flow, broker = %what, filters = ?self.filters, ?refused, "subscription refused");
                    }
                }
                Ok(Event::Message(received)) => {
                    if let Phase::Running { tx, .. } = &phase {
                        let _ = tx.send(*received);
                    }
                }
                Ok(Event::DisconnectSent) if matches!(phase, Phase::Closing(_)) => {
                    break;
                }
                Ok(_) => {}
                Err(error) => {
                    match phase {
                        Phase::Running { .. } => {}
                        // The broker is gone while draining: the acknowledgements cannot be
                        // sent anyway, and their messages come again in the next session.
                        Phase::Draining(dispatcher) => {
                            dispatcher.abort();
                            break;
                        }
                        Phase::Closing(_) => break,
                    }
                    // A resume asked for by a failed message reconnects at once, but only once:
                    // if that attempt fails too, the usual backoff applies.
                    let delay = if shared.resume_requested.swap(false, Ordering::SeqCst) {
                        tracing::debug!(flow = %ctx.flow, broker = %what, "resuming the session so failed messages are delivered again");
                        Duration::from_millis(10)
                    } else {
                        let failures = backoff.failures();
                        let delay = backoff.next_delay();
                        if failures % 10 == 0 {
                            tracing::warn!(flow = %ctx.flow, broker = %what, %error, "connection failed; retrying");
                        }
                        health.unhealthy(format!(
                            "cannot reach {what}: {error}; retrying (backoff up to 1s)"
                        ));
                        delay
                    };
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = ctx.shutdown.cancelled() => {
                            // Unreachable at shutdown: nothing in flight can be acknowledged.
                            if let Phase::Running { dispatcher, .. } = phase {
                                dispatcher.abort();
                            }
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// What the poll loop does next.
enum Step {
    Event(Result<Event, client::ConnectionError>),
    Drain,
    Close,
    Stop,
}

/// Where the source is in its life.
enum Phase {
    /// Taking messages.
    Running {
        tx: mpsc::UnboundedSender<Received>,
        dispatcher: tokio::task::JoinHandle<()>,
    },
    /// Shutting down: waiting for the messages in flight to be settled.
    Draining(tokio::task::JoinHandle<()>),
    /// DISCONNECT sent; waiting for it to go out, until the instant.
    Closing(tokio::time::Instant),
}

impl Phase {
    fn drain(self) -> Phase {
        match self {
            // Dropping the sender ends the dispatcher once it has admitted what it holds.
            Phase::Running { dispatcher, .. } => Phase::Draining(dispatcher),
            other => other,
        }
    }
}

/// Admits publishes to the flow in arrival order and settles them when their outcome comes.
async fn dispatch_loop(
    mut rx: mpsc::UnboundedReceiver<Received>,
    ctx: SourceContext,
    shared: Arc<Shared>,
    redelivery_delay: Duration,
) {
    let mut in_flight = JoinSet::new();
    while let Some(publish) = rx.recv().await {
        while in_flight.try_join_next().is_some() {}
        let mut msg = message_of(&publish);
        msg.meta.origin = Some(Arc::clone(&ctx.flow));
        let (token, outcome) = AckToken::channel();
        let work = Arc::clone(&ctx.dispatcher).admit(msg.with_ack(token)).await;
        let shared = Arc::clone(&shared);
        let flow = Arc::clone(&ctx.flow);
        in_flight.spawn(async move {
            let _ = work.await;
            let outcome = outcome
                .await
                .unwrap_or_else(|_| Outcome::Nack(sluice_core::ack::DROPPED_UNRESOLVED.into()));
            settle(&shared, &publish, outcome, &flow, redelivery_delay).await;
        });
    }
    while in_flight.join_next().await.is_some() {}
}

/// The message for a received publish; see the description for the headers.
fn message_of(publish: &Received) -> Message {
    let mut msg = Message::new(Body::from_bytes(publish.payload.clone()));
    for (name, value) in &publish.user_properties {
        if !name.starts_with("mqtt.") && !msg.headers.contains_key(name) {
            msg.headers.insert(name.clone(), value.clone());
        }
    }
    if let Some(content_type) = &publish.content_type {
        msg.headers
            .insert(super::CONTENT_TYPE.to_owned(), content_type.clone());
    }
    msg.with_header("mqtt.topic", publish.topic.clone())
        .with_header("mqtt.qos", qos_number(publish.qos).to_string())
        .with_header("mqtt.retain", publish.retain.to_string())
        .with_header("mqtt.dup", publish.dup.to_string())
}

async fn settle(
    shared: &Shared,
    publish: &Received,
    outcome: Outcome,
    flow: &str,
    redelivery_delay: Duration,
) {
    match outcome {
        Outcome::Ack => {
            if shared.client.ack(publish).await.is_err() {
                tracing::debug!(flow, topic = %publish.topic, "cannot acknowledge (the connection is closed); the broker will deliver the message again");
            }
        }
        Outcome::Nack(reason) if publish.qos == QoS::AtMostOnce => {
            tracing::warn!(flow, topic = %publish.topic, %reason, "a QoS 0 message failed; it cannot be delivered again");
        }
        Outcome::Nack(reason) => {
            tracing::debug!(flow, topic = %publish.topic, %reason, "message failed; resuming the session to have it delivered again");
            tokio::time::sleep(redelivery_delay).await;
            // One resume serves every failure waiting for it.
            if !shared.resume_requested.swap(true, Ordering::SeqCst) {
                let _ = shared.client.disconnect().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_accepts_one_topic_or_many() {
        let c: MqttSourceConfig =
            crate::config::parse(&json!({"url": "mqtt://h", "topics": "a/#"})).unwrap();
        assert_eq!(c.topics, Topics::One("a/#".into()));
        assert_eq!(c.qos, 1);
        assert!(!c.clean_session);
        let c: MqttSourceConfig =
            crate::config::parse(&json!({"url": "mqtt://h", "topics": ["a/+", "b"]})).unwrap();
        assert_eq!(c.topics, Topics::Many(vec!["a/+".into(), "b".into()]));
    }
}
