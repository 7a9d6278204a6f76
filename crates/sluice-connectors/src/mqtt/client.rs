//! One client API over rumqttc's MQTT 3.1.1 client and its MQTT 5 client (both in the same
//! crate), so the source and the sink are written once. The event loop's events are reduced to
//! what the connectors act on; MQTT 5 properties travel as user properties and a content type.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{
    Filter, PubAckReason, PubCompReason, PubRecReason, PublishProperties,
};
use rumqttc::{Outgoing, QoS, SubscribeFilter};
use sluice_core::spec::{FieldSpec, FieldType};

use super::{Broker, MAX_PACKET};

/// The protocol version spoken to the broker (`protocol` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
pub enum Protocol {
    /// MQTT 3.1.1.
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.
    #[serde(rename = "5")]
    V5,
}

/// The `protocol` field, shared by the source and the sink.
pub(crate) fn protocol_field() -> FieldSpec {
    FieldSpec::new(
        "protocol",
        FieldType::Enum(vec!["3.1.1", "5"]),
        "MQTT version spoken to the broker. `5` adds user properties (message headers), the \
         content type and session expiry.",
    )
    .default_value("3.1.1")
}

/// How a connection is opened.
#[derive(Debug, Clone)]
pub struct Session {
    /// Client id.
    pub client_id: String,
    /// Ping interval.
    pub keep_alive: Duration,
    /// Start without the broker's stored session (3.1.1 clean session, 5 clean start).
    pub clean_start: bool,
    /// MQTT 5: how long the broker keeps the session after a disconnect, in seconds
    /// (`u32::MAX` never expires). Ignored by 3.1.1, where a persistent session never expires.
    pub session_expiry: u32,
    /// Acknowledge received messages only when told to.
    pub manual_acks: bool,
    /// Most outgoing QoS 1/2 publishes awaiting their acknowledgement.
    pub inflight: Option<u16>,
}

/// A handle to send requests to the event loop (cheap to clone).
#[derive(Clone)]
pub enum Client {
    /// MQTT 3.1.1.
    V311(rumqttc::AsyncClient),
    /// MQTT 5.
    V5(rumqttc::v5::AsyncClient),
}

/// The event loop that owns the connection; poll it to make progress.
pub enum EventLoop {
    /// MQTT 3.1.1.
    V311(Box<rumqttc::EventLoop>),
    /// MQTT 5.
    V5(Box<rumqttc::v5::EventLoop>),
}

/// A message received from the broker.
#[derive(Debug, Clone)]
pub struct Received {
    /// The concrete topic.
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
    /// The delivery QoS.
    pub qos: QoS,
    /// Sent because it was retained.
    pub retain: bool,
    /// A repeated delivery.
    pub dup: bool,
    /// MQTT 5 user properties, in packet order.
    pub user_properties: Vec<(String, String)>,
    /// MQTT 5 content type.
    pub content_type: Option<String>,
    /// The packet, to acknowledge it.
    packet: Packet,
}

#[derive(Debug, Clone)]
enum Packet {
    V311(rumqttc::Publish),
    V5(rumqttc::v5::mqttbytes::v5::Publish),
}

/// MQTT 5 properties of a message to publish (ignored by 3.1.1).
#[derive(Debug, Clone, Default)]
pub struct Properties {
    /// User properties.
    pub user_properties: Vec<(String, String)>,
    /// Content type.
    pub content_type: Option<String>,
}

/// What the event loop reports, reduced to what the connectors act on.
#[derive(Debug)]
pub enum Event {
    /// The broker accepted the connection.
    Connected {
        /// The broker resumed a stored session.
        session_present: bool,
    },
    /// The broker answered a subscription; `refused` names the reasons of refused filters.
    Subscribed {
        /// Why filters were refused (empty when all were granted).
        refused: Vec<String>,
    },
    /// A message arrived (boxed: an MQTT 5 packet is large beside the other events).
    Message(Box<Received>),
    /// A publish was written with this packet id (in the order publishes were queued).
    PublishSent(u16),
    /// The broker acknowledged a QoS 1 publish (PUBACK) or refused it (MQTT 5 reason code).
    PubAck(u16, Result<(), String>),
    /// The broker received a QoS 2 publish (PUBREC), or refused it (MQTT 5 reason code; no
    /// PUBCOMP follows a refusal).
    PubRec(u16, Result<(), String>),
    /// The broker completed a QoS 2 publish (PUBCOMP).
    PubComp(u16, Result<(), String>),
    /// DISCONNECT went out.
    DisconnectSent,
    /// Anything else (pings, acknowledgements going out).
    Other,
}

/// A failed connection, as text (rumqttc's two error types have nothing else in common).
#[derive(Debug, Clone)]
pub struct ConnectionError(pub String);

impl std::fmt::Display for ConnectionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A request that could not be queued: the event loop is gone.
#[derive(Debug, Clone, Copy)]
pub struct Closed;

/// A client and its event loop for `broker`.
pub fn connect(
    broker: &Broker,
    protocol: Protocol,
    session: &Session,
    capacity: usize,
) -> (Client, EventLoop) {
    let keep_alive = session.keep_alive.max(Duration::from_secs(1));
    match protocol {
        Protocol::V311 => {
            let mut o =
                rumqttc::MqttOptions::new(&session.client_id, broker.host.clone(), broker.port);
            o.set_keep_alive(keep_alive)
                .set_max_packet_size(MAX_PACKET, MAX_PACKET)
                .set_clean_session(session.clean_start)
                .set_manual_acks(session.manual_acks);
            if let Some(n) = session.inflight {
                o.set_inflight(n);
            }
            if let Some((user, password)) = &broker.credentials {
                o.set_credentials(user.clone(), password.clone());
            }
            let (client, eventloop) = rumqttc::AsyncClient::new(o, capacity);
            (Client::V311(client), EventLoop::V311(Box::new(eventloop)))
        }
        Protocol::V5 => {
            let mut o =
                rumqttc::v5::MqttOptions::new(&session.client_id, broker.host.clone(), broker.port);
            o.set_keep_alive(keep_alive)
                .set_max_packet_size(u32::try_from(MAX_PACKET).ok())
                .set_clean_start(session.clean_start)
                .set_session_expiry_interval(
                    (session.session_expiry > 0).then_some(session.session_expiry),
                )
                .set_manual_acks(session.manual_acks);
            if let Some(n) = session.inflight {
                o.set_outgoing_inflight_upper_limit(n);
            }
            if let Some((user, password)) = &broker.credentials {
                o.set_credentials(user.clone(), password.clone());
            }
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(o, capacity);
            (Client::V5(client), EventLoop::V5(Box::new(eventloop)))
        }
    }
}

fn v5_qos(qos: QoS) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

fn from_v5_qos(qos: rumqttc::v5::mqttbytes::QoS) -> QoS {
    match qos {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::v5::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

impl Client {
    /// Queues a SUBSCRIBE for `filters` at `qos`.
    pub async fn subscribe(&self, filters: &[String], qos: QoS) -> Result<(), Closed> {
        match self {
            Client::V311(c) => c
                .subscribe_many(filters.iter().map(|f| SubscribeFilter::new(f.clone(), qos)))
                .await
                .map_err(|_| Closed),
            Client::V5(c) => c
                .subscribe_many(filters.iter().map(|f| Filter::new(f.clone(), v5_qos(qos))))
                .await
                .map_err(|_| Closed),
        }
    }

    /// Queues a publish; with MQTT 5 it carries `properties`.
    pub async fn publish(
        &self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Bytes,
        properties: Properties,
    ) -> Result<(), Closed> {
        match self {
            Client::V311(c) => c
                .publish_bytes(topic, qos, retain, payload)
                .await
                .map_err(|_| Closed),
            Client::V5(c) => {
                let properties = PublishProperties {
                    user_properties: properties.user_properties,
                    content_type: properties.content_type,
                    ..PublishProperties::default()
                };
                c.publish_bytes_with_properties(topic, v5_qos(qos), retain, payload, properties)
                    .await
                    .map_err(|_| Closed)
            }
        }
    }

    /// Queues the acknowledgement of a received message (PUBACK, or PUBREC for QoS 2).
    pub async fn ack(&self, received: &Received) -> Result<(), Closed> {
        match (self, &received.packet) {
            (Client::V311(c), Packet::V311(p)) => c.ack(p).await.map_err(|_| Closed),
            (Client::V5(c), Packet::V5(p)) => c.ack(p).await.map_err(|_| Closed),
            // A message is acknowledged by the client that received it.
            _ => Err(Closed),
        }
    }

    /// Queues a DISCONNECT.
    pub async fn disconnect(&self) -> Result<(), Closed> {
        match self {
            Client::V311(c) => c.disconnect().await.map_err(|_| Closed),
            Client::V5(c) => c.disconnect().await.map_err(|_| Closed),
        }
    }

    /// Queues a DISCONNECT unless the request queue is full.
    pub fn try_disconnect(&self) -> Result<(), Closed> {
        match self {
            Client::V311(c) => c.try_disconnect().map_err(|_| Closed),
            Client::V5(c) => c.try_disconnect().map_err(|_| Closed),
        }
    }
}

impl EventLoop {
    /// The next event; after an error the next poll connects again.
    pub async fn poll(&mut self) -> Result<Event, ConnectionError> {
        match self {
            EventLoop::V311(e) => e
                .poll()
                .await
                .map(v311_event)
                .map_err(|e| ConnectionError(e.to_string())),
            EventLoop::V5(e) => e
                .poll()
                .await
                .map(v5_event)
                .map_err(|e| ConnectionError(e.to_string())),
        }
    }
}

fn v311_event(event: rumqttc::Event) -> Event {
    use rumqttc::{Event as E, Incoming as I, SubscribeReasonCode};
    match event {
        E::Incoming(I::ConnAck(ack)) => Event::Connected {
            session_present: ack.session_present,
        },
        E::Incoming(I::SubAck(ack)) => Event::Subscribed {
            refused: ack
                .return_codes
                .iter()
                .filter(|c| matches!(c, SubscribeReasonCode::Failure))
                .map(|_| "refused".to_owned())
                .collect(),
        },
        E::Incoming(I::Publish(p)) => Event::Message(Box::new(Received {
            topic: p.topic.clone(),
            payload: p.payload.clone(),
            qos: p.qos,
            retain: p.retain,
            dup: p.dup,
            user_properties: Vec::new(),
            content_type: None,
            packet: Packet::V311(p),
        })),
        E::Incoming(I::PubAck(ack)) => Event::PubAck(ack.pkid, Ok(())),
        E::Incoming(I::PubRec(rec)) => Event::PubRec(rec.pkid, Ok(())),
        E::Incoming(I::PubComp(comp)) => Event::PubComp(comp.pkid, Ok(())),
        E::Outgoing(Outgoing::Publish(pkid)) => Event::PublishSent(pkid),
        E::Outgoing(Outgoing::Disconnect) => Event::DisconnectSent,
        E::Incoming(_) | E::Outgoing(_) => Event::Other,
    }
}

fn v5_event(event: rumqttc::v5::Event) -> Event {
    use rumqttc::v5::Event as E;
    use rumqttc::v5::mqttbytes::v5::{Packet as P, SubscribeReasonCode};
    match event {
        E::Incoming(P::ConnAck(ack)) => Event::Connected {
            session_present: ack.session_present,
        },
        E::Incoming(P::SubAck(ack)) => Event::Subscribed {
            refused: ack
                .return_codes
                .iter()
                .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                .map(|c| format!("{c:?}"))
                .collect(),
        },
        E::Incoming(P::Publish(p)) => {
            let (user_properties, content_type) = p
                .properties
                .as_ref()
                .map(|props| (props.user_properties.clone(), props.content_type.clone()))
                .unwrap_or_default();
            Event::Message(Box::new(Received {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload.clone(),
                qos: from_v5_qos(p.qos),
                retain: p.retain,
                dup: p.dup,
                user_properties,
                content_type,
                packet: Packet::V5(p),
            }))
        }
        E::Incoming(P::PubAck(ack)) => Event::PubAck(
            ack.pkid,
            match ack.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
                other => Err(format!("{other:?}")),
            },
        ),
        E::Incoming(P::PubRec(rec)) => Event::PubRec(
            rec.pkid,
            match rec.reason {
                PubRecReason::Success | PubRecReason::NoMatchingSubscribers => Ok(()),
                other => Err(format!("{other:?}")),
            },
        ),
        E::Incoming(P::PubComp(comp)) => Event::PubComp(
            comp.pkid,
            match comp.reason {
                PubCompReason::Success => Ok(()),
                other => Err(format!("{other:?}")),
            },
        ),
        E::Outgoing(Outgoing::Publish(pkid)) => Event::PublishSent(pkid),
        E::Outgoing(Outgoing::Disconnect) => Event::DisconnectSent,
        E::Incoming(_) | E::Outgoing(_) => Event::Other,
    }
}
