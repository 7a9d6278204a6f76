//! The `mqtt` source and sink against Mosquitto on 127.0.0.1:1883, through the conformance suite.
//! Each endpoint is a topic. MQTT keeps messages only for known sessions, so the runtime's source
//! session is registered before it starts (`prepare_source`) and so is the test's consumer of
//! each endpoint (`create`); both use QoS 1 and persistent sessions. The suite runs once per
//! protocol: `mqtt::` with MQTT 3.1.1 (no headers) and `mqtt::v5::` with MQTT 5, whose test
//! clients speak MQTT 5 too, so headers travel as user properties.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use tokio::sync::{Mutex, mpsc};

use crate::conformance::{Capabilities, Connector, Msg};

pub struct Mqtt {
    /// `"3.1.1"` or `"5"`, for the runtime's components and the test's clients.
    protocol: &'static str,
    /// The test's consumer of each endpoint, connected on first use, and the bodies it has
    /// already handed out.
    consumers: Mutex<HashMap<String, Consumer>>,
}

/// What arrives for an endpoint, and the bodies already handed out.
type Consumer = (mpsc::UnboundedReceiver<Msg>, HashSet<String>);

fn source_client_id(name: &str) -> String {
    format!("sluice-conf-{name}")
}

fn consumer_client_id(name: &str) -> String {
    format!("conf-consumer-{name}")
}

/// A connected test client of either protocol, kept alive by its event loop task.
enum Client {
    V311(AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    async fn disconnect(&self) {
        match self {
            Client::V311(c) => c.disconnect().await.unwrap(),
            Client::V5(c) => c.disconnect().await.unwrap(),
        }
    }
}

/// Connects `client_id` with a persistent session to `addr`, subscribes it to `topic` and
/// returns the client and a receiver of what arrives (after the subscription is confirmed).
async fn session(
    protocol: &str,
    client_id: &str,
    addr: SocketAddr,
    topic: &str,
) -> (Client, mpsc::UnboundedReceiver<Msg>) {
    if protocol == "5" {
        let (c, rx) = session5(client_id, addr, topic).await;
        return (Client::V5(c), rx);
    }
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_clean_session(false);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            match event {
                Event::Incoming(Incoming::SubAck(_)) => {
                    if let Some(r) = ready_tx.take() {
                        let _ = r.send(());
                    }
                }
                Event::Incoming(Incoming::Publish(p)) => {
                    let _ = tx.send(Msg {
                        body: serde_json::from_slice(&p.payload).unwrap_or_default(),
                        headers: Default::default(),
                    });
                }
                Event::Outgoing(rumqttc::Outgoing::Disconnect) => break,
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), ready)
        .await
        .expect("suback")
        .unwrap();
    (Client::V311(client), rx)
}

/// [`session`] with MQTT 5: the session never expires, user properties become headers.
async fn session5(
    client_id: &str,
    addr: SocketAddr,
    topic: &str,
) -> (rumqttc::v5::AsyncClient, mpsc::UnboundedReceiver<Msg>) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    let mut options = rumqttc::v5::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options
        .set_clean_start(false)
        .set_session_expiry_interval(Some(u32::MAX))
        .set_max_packet_size(Some(1 << 20));
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 100);
    client
        .subscribe(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            match event {
                rumqttc::v5::Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(r) = ready_tx.take() {
                        let _ = r.send(());
                    }
                }
                rumqttc::v5::Event::Incoming(Packet::Publish(p)) => {
                    let headers = p
                        .properties
                        .map(|props| props.user_properties.into_iter().collect())
                        .unwrap_or_default();
                    let _ = tx.send(Msg {
                        body: serde_json::from_slice(&p.payload).unwrap_or_default(),
                        headers,
                    });
                }
                rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Disconnect) => break,
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), ready)
        .await
        .expect("suback")
        .unwrap();
    (client, rx)
}

/// Publishes `msgs` to `topic` with MQTT 5, headers as user properties, and waits for every
/// PUBACK.
async fn publish5(topic: &str, msgs: &[Msg]) {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    let options =
        rumqttc::v5::MqttOptions::new(sluice_testkit::unique("conf-pub5"), "127.0.0.1", 1883);
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 100);
    let (acked, mut acks) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let rumqttc::v5::Event::Incoming(Packet::PubAck(_)) = event {
                let _ = acked.send(());
            }
        }
    });
    for m in msgs {
        let properties = PublishProperties {
            user_properties: m.headers.clone().into_iter().collect(),
            ..PublishProperties::default()
        };
        client
            .publish_with_properties(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                Bytes::from(m.body.to_string()),
                properties,
            )
            .await
            .unwrap();
    }
    for _ in msgs {
        tokio::time::timeout(Duration::from_secs(10), acks.recv())
            .await
            .expect("puback")
            .unwrap();
    }
    driver.abort();
}

#[async_trait::async_trait]
impl Connector for Mqtt {
    fn service(&self) -> &'static str {
        "Mosquitto"
    }
    fn address(&self) -> SocketAddr {
        "127.0.0.1:1883".parse().unwrap()
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            headers: self.protocol == "5",
            ..Capabilities::default()
        }
    }
    async fn create(&self, name: &str) {
        // Register the consumer's session now, so what the runtime publishes is kept for it.
        let (client, _rx) = session(
            self.protocol,
            &consumer_client_id(name),
            self.address(),
            name,
        )
        .await;
        client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    async fn prepare_source(&self, name: &str, addr: SocketAddr) {
        let (client, _rx) = session(self.protocol, &source_client_id(name), addr, name).await;
        client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fn source(&self, name: &str, addr: SocketAddr) -> String {
        format!(
            "{{mqtt: {{url: \"mqtt://{addr}\", protocol: \"{}\", topics: {name}, qos: 1, client_id: {}}}}}",
            self.protocol,
            source_client_id(name)
        )
    }
    fn sink(&self, name: &str, addr: SocketAddr) -> String {
        format!(
            "{{mqtt: {{url: \"mqtt://{addr}\", protocol: \"{}\", topic: {name}, qos: 1}}}}",
            self.protocol
        )
    }
    async fn publish(&self, name: &str, msgs: &[Msg]) {
        if self.protocol == "5" {
            return publish5(name, msgs).await;
        }
        let options = MqttOptions::new(sluice_testkit::unique("conf-pub"), "127.0.0.1", 1883);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let (acked, mut acks) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let Event::Incoming(Incoming::PubAck(_)) = event {
                    let _ = acked.send(());
                }
            }
        });
        for m in msgs {
            client
                .publish(
                    name,
                    QoS::AtLeastOnce,
                    false,
                    m.body.to_string().into_bytes(),
                )
                .await
                .unwrap();
        }
        for _ in msgs {
            tokio::time::timeout(Duration::from_secs(10), acks.recv())
                .await
                .expect("puback")
                .unwrap();
        }
        driver.abort();
    }
    async fn consume(&self, name: &str, n: usize, timeout: Duration) -> Vec<Msg> {
        let mut consumers = self.consumers.lock().await;
        if !consumers.contains_key(name) {
            let (client, rx) = session(
                self.protocol,
                &consumer_client_id(name),
                self.address(),
                name,
            )
            .await;
            // The client lives as long as its event loop task, which owns a clone.
            std::mem::forget(client);
            consumers.insert(name.to_owned(), (rx, HashSet::new()));
        }
        let (rx, seen) = consumers.get_mut(name).unwrap();
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                // At-least-once lets a message arrive twice: after a cut connection the broker
                // delivers again what the source had not yet acknowledged (its PUBACK may have
                // been lost with the connection). A consumer deduplicates, as real ones do; a
                // lost message is still missing here.
                Ok(Some(m)) => {
                    if seen.insert(m.body.to_string()) {
                        out.push(m);
                    }
                }
                _ => break,
            }
        }
        out
    }
}

crate::conformance_tests!(Mqtt {
    protocol: "3.1.1",
    consumers: Mutex::new(HashMap::new())
});

/// The same suite with MQTT 5 on both sides.
mod v5 {
    use super::*;

    crate::conformance_tests!(Mqtt {
        protocol: "5",
        consumers: Mutex::new(HashMap::new())
    });
}
