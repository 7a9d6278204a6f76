//! The `amqp` source and sink against RabbitMQ on 127.0.0.1:5672, through the conformance suite.
//! Each endpoint is a durable queue; the sink publishes to it through the default exchange.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::conformance::{Connector, Msg};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

pub struct RabbitMq {
    _conn: Connection,
    channel: Channel,
}

impl RabbitMq {
    /// A client to RabbitMQ, or a stand-in that never connects when it is not running (the
    /// suite then skips, or fails under `SLUICE_IT=1`, before using it).
    pub async fn new() -> Option<RabbitMq> {
        let conn = Connection::connect(URL, ConnectionProperties::default())
            .await
            .ok()?;
        let channel = conn.create_channel().await.ok()?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .ok()?;
        Some(RabbitMq {
            _conn: conn,
            channel,
        })
    }
}

/// What the suite drives: the client when RabbitMQ runs.
pub struct Amqp(Option<RabbitMq>);

impl Amqp {
    fn client(&self) -> &RabbitMq {
        self.0
            .as_ref()
            .expect("RabbitMQ is running (checked by the suite first)")
    }
}

fn url(addr: SocketAddr) -> String {
    format!("amqp://guest:guest@{addr}/%2f")
}

#[async_trait::async_trait]
impl Connector for Amqp {
    fn service(&self) -> &'static str {
        "RabbitMQ"
    }
    fn address(&self) -> SocketAddr {
        "127.0.0.1:5672".parse().unwrap()
    }
    async fn create(&self, name: &str) {
        self.client()
            .channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    fn source(&self, name: &str, addr: SocketAddr) -> String {
        format!(
            "{{amqp: {{url: \"{}\", queue: {name}, prefetch: 50}}}}",
            url(addr)
        )
    }
    fn sink(&self, name: &str, addr: SocketAddr) -> String {
        format!("{{amqp: {{url: \"{}\", routing_key: {name}}}}}", url(addr))
    }
    async fn publish(&self, name: &str, msgs: &[Msg]) {
        let channel = &self.client().channel;
        for m in msgs {
            let mut headers = FieldTable::default();
            for (k, v) in &m.headers {
                headers.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
            }
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_headers(headers);
            // Confirms are awaited together below: publishing stays fast.
            drop(
                channel
                    .basic_publish(
                        "".into(),
                        name.into(),
                        BasicPublishOptions::default(),
                        m.body.to_string().as_bytes(),
                        properties,
                    )
                    .await
                    .unwrap(),
            );
        }
        let returned = channel.wait_for_confirms().await.unwrap();
        assert!(returned.is_empty());
    }
    async fn consume(&self, name: &str, n: usize, timeout: Duration) -> Vec<Msg> {
        let channel = &self.client().channel;
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            match channel
                .basic_get(name.into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                Some(got) => {
                    let d = got.delivery;
                    let mut headers = BTreeMap::new();
                    if let Some(table) = d.properties.headers() {
                        for (k, v) in table.inner() {
                            if let AMQPValue::LongString(s) = v {
                                headers.insert(k.to_string(), s.to_string());
                            }
                        }
                    }
                    out.push(Msg {
                        body: serde_json::from_slice(&d.data).unwrap_or_default(),
                        headers,
                    });
                }
                None if Instant::now() >= deadline => break,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        out
    }
}

crate::conformance_tests!(Amqp(RabbitMq::new().await));
