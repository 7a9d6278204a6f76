//! The `mqtt` sink: publishes with QoS and retain; `deliver` returns `Ok` for QoS 1 only after
//! the broker's PUBACK and for QoS 2 after its PUBCOMP.
//!
//! rumqttc's client does not say which packet id a publish got, so the sink correlates: every
//! publish enters the client's request queue and a FIFO of waiters in the same order (under one
//! lock); the event loop reports `Outgoing::Publish(pkid)` in that order, which names the
//! waiter's packet id, and the broker's PUBACK/PUBCOMP for that id wakes it.
//!
//! **Architecture Invariant:** a connection error fails every waiting delivery and retires the
//! client with its event loop; a new one is made for the next delivery. Packets are therefore
//! never retransmitted on a resumed session, which keeps the FIFO and the event loop in step.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rumqttc::QoS;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, ErrorKind, HealthHandle, Message, ProcessError, Sink};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::client::{self, Client, Event, EventLoop, Properties, Protocol};
use super::{Broker, CONTENT_TYPE, check_client_id, qos};
use crate::reconnect::Backoff;
use crate::template::Template;

const DESCRIPTION: &str = "\
Publishes each message's body to the topic `topic` (`{header}` placeholders are filled from \
message headers, e.g. `devices/{device}/commands`; a missing header fails the message with \
`invalid_input`) on an MQTT 3.1.1 or MQTT 5 (`protocol: \"5\"`) broker, with QoS `qos` and the \
`retain` flag.

Headers (MQTT 5): every message header except `mqtt.*` and `content-type` is sent as a user \
property of the same name; the `content-type` header (else `content_type`) is sent as the \
content type. MQTT 3.1.1 has no properties: headers are not sent.

**Delivery guarantee.** QoS 1 and 2: at-least-once; a message counts as delivered only after the \
broker's PUBACK (QoS 1) or PUBCOMP (QoS 2). Concurrent deliveries are pipelined on one \
connection, up to `max_inflight` at once. When the connection fails, every delivery waiting for its acknowledgement fails with \
`unavailable` (it may or may not have reached the broker: a retry can publish it twice); no \
acknowledgement within `publish_timeout` is `timeout`. An MQTT 5 broker that refuses a message \
(a PUBACK or PUBREC reason code such as `NotAuthorized` or `QuotaExceeded`) fails it with \
`remote`. QoS 0: the message counts as delivered \
once it is written to the connection (at-most-once).

**Limits.** No TLS yet (`mqtt://` only). One connection per sink, made on first use and again after a failure \
(attempts back off up to 1s; meanwhile deliveries fail fast with `unavailable` and the flow \
reports unhealthy). A rendered topic must not be empty or contain the wildcards `+` or `#` \
(`invalid_input`). Payloads over 16 MiB are refused.";

/// The `mqtt` sink's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "mqtt",
        ComponentKind::Sink,
        "Publish messages to an MQTT topic, confirmed by the broker for QoS 1 and 2",
    )
    .description(DESCRIPTION)
    .field(super::url_field())
    .field(
        FieldSpec::new(
            "topic",
            FieldType::String,
            "Topic to publish to; `{header}` placeholders are filled from the message.",
        )
        .required(),
    )
    .field(super::qos_field("QoS to publish with: 0 at most once, 1 at least once, 2 exactly once on the wire."))
    .field(
        FieldSpec::new("retain", FieldType::Bool, "Ask the broker to keep the message as the topic's last value for future subscribers.")
            .default_value(false),
    )
    .field(FieldSpec::new(
        "client_id",
        FieldType::String,
        "Client id; default `sluice-<uuid>` (new for every connection). Set it only if the broker's ACL needs it; it must be unique among clients.",
    ))
    .field(client::protocol_field())
    .field(FieldSpec::new(
        "content_type",
        FieldType::String,
        "MQTT 5 only: content type for messages without a `content-type` header, e.g. `application/json`.",
    ))
    .field(super::keep_alive_field())
    .field(
        FieldSpec::new(
            "publish_timeout",
            FieldType::Duration,
            "Time allowed for the broker to acknowledge one message.",
        )
        .default_value("30s"),
    )
    .field(
        FieldSpec::new(
            "max_inflight",
            FieldType::Integer {
                min: Some(1),
                max: Some(65535),
            },
            "Most QoS 1/2 messages awaiting the broker's acknowledgement at once. Keep it at or \
             below the broker's receive limit (Mosquitto: `max_inflight_messages`, 20 by \
             default): Mosquitto 2.0 acknowledges QoS 2 messages beyond it but drops them.",
        )
        .default_value(20),
    )
    .example(
        "Commands to devices, topic by header",
        "url: mqtt://127.0.0.1:1883\ntopic: \"devices/{device}/commands\"\nqos: 1\n",
    )
    .example(
        "The latest status of each site, retained",
        "url: mqtt://sluice:s3cret@broker:1883\ntopic: \"sites/{site}/status\"\nretain: true\n",
    )
    .example(
        "MQTT 5: headers as user properties, JSON content type",
        "url: mqtt://127.0.0.1:1883\ntopic: \"orders/{region}\"\nprotocol: \"5\"\ncontent_type: application/json\n",
    )
}

/// Configuration of the `mqtt` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSinkConfig {
    /// Broker url.
    pub url: String,
    /// Topic template.
    pub topic: String,
    /// QoS.
    #[serde(default = "super::default_qos")]
    pub qos: u8,
    /// Retain flag.
    #[serde(default)]
    pub retain: bool,
    /// Client id.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Protocol version.
    #[serde(default)]
    pub protocol: Protocol,
    /// MQTT 5 default content type.
    #[serde(default)]
    pub content_type: Option<String>,
    /// Keep alive.
    #[serde(default = "super::default_keep_alive")]
    pub keep_alive: HumanDuration,
    /// Acknowledgement budget.
    #[serde(default = "default_publish_timeout")]
    pub publish_timeout: HumanDuration,
    /// In-flight window.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
}

fn default_publish_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_max_inflight() -> u16 {
    20
}

/// Why a delivery failed after its publish was queued.
#[derive(Debug, Clone)]
enum Failed {
    /// The connection failed (the message may or may not have reached the broker).
    Connection(String),
    /// The broker refused the message (an MQTT 5 reason code).
    Refused(String),
}

type Waiter = oneshot::Sender<Result<(), Failed>>;

/// Deliveries waiting for the event loop, shared with its driver task.
#[derive(Default)]
struct Waiting {
    /// In request-queue order, not yet given a packet id.
    queued: VecDeque<Waiter>,
    /// By packet id, waiting for PUBACK/PUBCOMP (a queue in case a packet id is reused after an
    /// out-of-order acknowledgement).
    sent: HashMap<u16, VecDeque<Waiter>>,
}

impl Waiting {
    fn fail_all(&mut self, reason: &str) {
        for w in self.queued.drain(..) {
            let _ = w.send(Err(Failed::Connection(reason.to_owned())));
        }
        for (_, ws) in self.sent.drain() {
            for w in ws {
                let _ = w.send(Err(Failed::Connection(reason.to_owned())));
            }
        }
    }
}

/// What a session's driver task and its deliveries share.
#[derive(Default)]
struct Shared {
    waiting: Mutex<Waiting>,
    /// The event loop runs; cleared when its connection failed.
    alive: AtomicBool,
    /// The broker accepted the connection (CONNACK) at least once.
    connected: AtomicBool,
}

/// One client and its event loop (driven by its own task).
struct Session {
    client: Client,
    shared: Arc<Shared>,
    /// Keeps publishes and waiters in the same order.
    order: tokio::sync::Mutex<()>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// A built `mqtt` sink.
pub struct MqttSink {
    broker: Broker,
    client_id: Option<String>,
    protocol: Protocol,
    content_type: Option<String>,
    topic: Template,
    qos: QoS,
    retain: bool,
    keep_alive: Duration,
    publish_timeout: Duration,
    max_inflight: u16,
    health: HealthHandle,
    session: tokio::sync::Mutex<Reconnect>,
}

struct Reconnect {
    current: Option<Arc<Session>>,
    backoff: Backoff,
    not_before: Option<Instant>,
    last_error: Arc<Mutex<String>>,
}

impl std::fmt::Debug for MqttSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSink")
            .field("broker", &self.broker)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// Builds an `mqtt` sink; it connects on first use.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Sink>, BuildError> {
    let c: MqttSinkConfig = crate::config::parse(config)?;
    let broker = Broker::parse(&c.url)?;
    let topic = Template::parse(&c.topic).map_err(|e| BuildError::field("topic", e.to_string()))?;
    let sample: Result<String, ()> = topic.render(|_| Ok("x".to_owned()));
    if sample.as_deref().is_ok_and(|t| t.contains(['+', '#'])) {
        return Err(BuildError::field(
            "topic",
            "contains `+` or `#`; wildcards are for subscribing, publish to a concrete topic",
        ));
    }
    if c.topic.is_empty() {
        return Err(BuildError::field(
            "topic",
            "is empty; name the topic to publish to",
        ));
    }
    if let Some(id) = &c.client_id {
        check_client_id(id)?;
    }
    if c.publish_timeout.0.is_zero() {
        return Err(BuildError::field(
            "publish_timeout",
            "must be longer than 0s",
        ));
    }
    if c.keep_alive.0 < Duration::from_secs(1) {
        return Err(BuildError::field("keep_alive", "must be at least 1s"));
    }
    if c.content_type.is_some() && c.protocol != Protocol::V5 {
        return Err(BuildError::field(
            "content_type",
            "is an MQTT 5 property; add `protocol: \"5\"` or remove it",
        ));
    }
    if c.max_inflight == 0 {
        return Err(BuildError::field("max_inflight", "must be at least 1"));
    }
    Ok(Arc::new(MqttSink {
        broker,
        client_id: c.client_id,
        protocol: c.protocol,
        content_type: c.content_type,
        topic,
        qos: qos(c.qos)?,
        retain: c.retain,
        keep_alive: c.keep_alive.0,
        publish_timeout: c.publish_timeout.0,
        max_inflight: c.max_inflight,
        health: HealthHandle::for_component(ctx),
        session: tokio::sync::Mutex::new(Reconnect {
            current: None,
            backoff: Backoff::default(),
            not_before: None,
            last_error: Arc::new(Mutex::new(String::new())),
        }),
    }))
}

#[async_trait]
impl Sink for MqttSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        let topic = self.topic.render(|name| {
            msg.headers.get(name).cloned().ok_or_else(|| {
                ProcessError::invalid_input(format!(
                    "`topic` needs the header `{name}`, which the message does not have"
                ))
            })
        })?;
        if !rumqttc::valid_topic(&topic) || topic.is_empty() {
            return Err(ProcessError::invalid_input(format!(
                "the topic `{topic}` is empty or holds a wildcard (`+`, `#`); fix the header it is made from"
            )));
        }
        let properties = self.properties(msg);
        let session = self.session().await?;
        let (tx, rx) = oneshot::channel();
        {
            let _order = session.order.lock().await;
            lock(&session.shared.waiting).queued.push_back(tx);
            let sent = session
                .client
                .publish(
                    topic,
                    self.qos,
                    self.retain,
                    msg.body.as_bytes().clone(),
                    properties,
                )
                .await;
            if sent.is_err() {
                // Never entered the queue: take its waiter back (it is the last one, under the
                // order lock) so the FIFO stays in step.
                lock(&session.shared.waiting).queued.pop_back();
                return Err(self.unavailable("the connection was closed"));
            }
        }
        match tokio::time::timeout(self.publish_timeout, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(Failed::Connection(reason)))) => Err(self.unavailable(&reason)),
            Ok(Ok(Err(Failed::Refused(reason)))) => Err(ProcessError::new(
                ErrorKind::Remote,
                format!(
                    "{} refused the message: {reason}; check the broker's ACL and limits for this topic",
                    self.broker.what()
                ),
            )),
            Ok(Err(_)) => Err(self.unavailable("the connection was closed")),
            Err(_) => Err(ProcessError::new(
                ErrorKind::Timeout,
                format!(
                    "{} did not acknowledge the message within publish_timeout ({}); it may or may not have been published",
                    self.broker.what(),
                    HumanDuration(self.publish_timeout)
                ),
            )),
        }
    }
}

fn lock(waiting: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    match waiting.lock() {
        Ok(g) => g,
        // Every update is a single push or pop: a panic cannot leave it torn.
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl MqttSink {
    /// The MQTT 5 properties of `msg`: its headers (not `mqtt.*`, which describe where a received
    /// message came from) as user properties and its content type.
    fn properties(&self, msg: &Message) -> Properties {
        if self.protocol != Protocol::V5 {
            return Properties::default();
        }
        Properties {
            user_properties: msg
                .headers
                .iter()
                .filter(|(name, _)| !name.starts_with("mqtt.") && *name != CONTENT_TYPE)
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
            content_type: msg
                .headers
                .get(CONTENT_TYPE)
                .or(self.content_type.as_ref())
                .cloned(),
        }
    }

    fn unavailable(&self, reason: &str) -> ProcessError {
        ProcessError::new(
            ErrorKind::Unavailable,
            format!("cannot publish to {}: {reason}", self.broker.what()),
        )
    }

    /// The live session, or a new one (unless the last attempt failed within its backoff).
    async fn session(&self) -> Result<Arc<Session>, ProcessError> {
        let mut state = self.session.lock().await;
        let current = state
            .current
            .as_ref()
            .map(|s| (Arc::clone(s), s.shared.alive.load(Ordering::SeqCst)));
        if let Some((session, alive)) = current {
            if alive {
                return Ok(session);
            }
            // It died. One that had connected is replaced at once (a broker that restarted is
            // used again without delay); one that never connected was a failed attempt, and the
            // next waits out the backoff.
            if session.shared.connected.load(Ordering::SeqCst) {
                state.backoff.reset();
                state.not_before = None;
            } else {
                let delay = state.backoff.next_delay();
                state.not_before = Some(Instant::now() + delay);
            }
            state.current = None;
        }
        if let Some(at) = state.not_before
            && Instant::now() < at
        {
            let reason = lock_text(&state.last_error);
            return Err(self.unavailable(&reason));
        }
        let client_id = self
            .client_id
            .clone()
            .unwrap_or_else(|| format!("sluice-{}", uuid::Uuid::now_v7().simple()));
        let (client, eventloop) = client::connect(
            &self.broker,
            self.protocol,
            &client::Session {
                client_id,
                keep_alive: self.keep_alive,
                clean_start: true,
                session_expiry: 0,
                manual_acks: false,
                inflight: Some(self.max_inflight),
            },
            256,
        );
        let shared = Arc::new(Shared {
            alive: AtomicBool::new(true),
            ..Shared::default()
        });
        let driver = tokio::spawn(drive(
            eventloop,
            Arc::clone(&shared),
            self.qos,
            self.health.clone(),
            self.broker.what(),
            Arc::clone(&state.last_error),
        ));
        let session = Arc::new(Session {
            client,
            shared,
            order: tokio::sync::Mutex::new(()),
            driver,
        });
        state.current = Some(Arc::clone(&session));
        Ok(session)
    }
}

fn lock_text(text: &Mutex<String>) -> String {
    match text.lock() {
        Ok(t) => t.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

/// Runs a session's event loop until its connection fails; then fails every waiting delivery.
async fn drive(
    mut eventloop: EventLoop,
    shared: Arc<Shared>,
    qos: QoS,
    health: HealthHandle,
    what: String,
    last_error: Arc<Mutex<String>>,
) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Connected { .. }) => {
                shared.connected.store(true, Ordering::SeqCst);
                health.healthy();
            }
            Ok(Event::PublishSent(pkid)) => {
                let mut w = lock(&shared.waiting);
                if let Some(waiter) = w.queued.pop_front() {
                    if qos == QoS::AtMostOnce {
                        let _ = waiter.send(Ok(()));
                    } else {
                        w.sent.entry(pkid).or_default().push_back(waiter);
                    }
                }
            }
            Ok(Event::PubAck(pkid, result)) if qos == QoS::AtLeastOnce => {
                resolve(&shared.waiting, pkid, result);
            }
            // A refused QoS 2 publish ends at its PUBREC: no PUBCOMP follows.
            Ok(Event::PubRec(pkid, result @ Err(_)) | Event::PubComp(pkid, result))
                if qos == QoS::ExactlyOnce =>
            {
                resolve(&shared.waiting, pkid, result);
            }
            Ok(_) => {}
            Err(error) => {
                let reason = error.to_string();
                shared.alive.store(false, Ordering::SeqCst);
                lock(&shared.waiting).fail_all(&reason);
                health.unhealthy(format!(
                    "cannot reach {what}: {reason}; retrying on the next delivery (backoff up to 1s)"
                ));
                tracing::warn!(broker = %what, error = %reason, "mqtt sink connection failed");
                if let Ok(mut e) = last_error.lock() {
                    *e = reason;
                }
                return;
            }
        }
    }
}

fn resolve(waiting: &Mutex<Waiting>, pkid: u16, result: Result<(), String>) {
    let mut w = lock(waiting);
    if let Some(queue) = w.sent.get_mut(&pkid) {
        if let Some(waiter) = queue.pop_front() {
            let _ = waiter.send(result.map_err(Failed::Refused));
        }
        if queue.is_empty() {
            w.sent.remove(&pkid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_defaults_and_validation() {
        let c: MqttSinkConfig =
            crate::config::parse(&json!({"url": "mqtt://h", "topic": "a/{x}"})).unwrap();
        assert_eq!((c.qos, c.retain, c.max_inflight), (1, false, 20));
        assert!(Template::parse("a/{x}").is_ok());
    }
}
