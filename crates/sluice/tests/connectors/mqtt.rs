//! The `mqtt` source and sink against Mosquitto on 127.0.0.1:1883, through the conformance suite.
//! Each endpoint is a topic. MQTT keeps messages only for known sessions, so the runtime's source
//! session is registered before it starts (`prepare_source`) and so is the test's consumer of
//! each endpoint (`create`); both use QoS 1 and persistent sessions. MQTT 3.1.1 has no headers.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use tokio::sync::{Mutex, mpsc};

use crate::conformance::{Capabilities, Connector, Msg};

pub struct Mqtt {
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

/// Connects `client_id` with a persistent session to `addr`, subscribes it to `topic` and
/// returns the client and a receiver of what arrives (after the subscription is confirmed).
async fn session(
    client_id: &str,
    addr: SocketAddr,
    topic: &str,
) -> (AsyncClient, mpsc::UnboundedReceiver<Msg>) {
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
    (client, rx)
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
            headers: false,
            ..Capabilities::default()
        }
    }
    async fn create(&self, name: &str) {
        // Register the consumer's session now, so what the runtime publishes is kept for it.
        let (client, _rx) = session(&consumer_client_id(name), self.address(), name).await;
        client.disconnect().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    async fn prepare_source(&self, name: &str, addr: SocketAddr) {
        let (client, _rx) = session(&source_client_id(name), addr, name).await;
        client.disconnect().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fn source(&self, name: &str, addr: SocketAddr) -> String {
        format!(
            "{{mqtt: {{url: \"mqtt://{addr}\", topics: {name}, qos: 1, client_id: {}}}}}",
            source_client_id(name)
        )
    }
    fn sink(&self, name: &str, addr: SocketAddr) -> String {
        format!("{{mqtt: {{url: \"mqtt://{addr}\", topic: {name}, qos: 1}}}}")
    }
    async fn publish(&self, name: &str, msgs: &[Msg]) {
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
            let (client, rx) = session(&consumer_client_id(name), self.address(), name).await;
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
    consumers: Mutex::new(HashMap::new())
});
