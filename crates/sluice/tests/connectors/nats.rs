//! The `jetstream` source and sink through the conformance suite, against nats-server with
//! JetStream on 127.0.0.1:4222. Each endpoint is a stream of the same name capturing the subject
//! of the same name; the suite's own client reads with a durable consumer of its own.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures_util::StreamExt;

use crate::conformance::{Connector, Msg};

pub struct JetStream;

const ADDR: &str = "127.0.0.1:4222";

async fn context() -> jetstream::Context {
    jetstream::new(async_nats::connect(ADDR).await.unwrap())
}

#[async_trait::async_trait]
impl Connector for JetStream {
    fn service(&self) -> &'static str {
        "NATS"
    }
    fn address(&self) -> SocketAddr {
        ADDR.parse().unwrap()
    }
    async fn create(&self, name: &str) {
        context()
            .await
            .get_or_create_stream(stream::Config {
                name: name.to_owned(),
                subjects: vec![name.to_owned()],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    fn source(&self, name: &str, addr: SocketAddr) -> String {
        // One message at a time keeps the stream's order through the flow.
        format!(
            "{{jetstream: {{url: \"nats://{addr}\", stream: {name}, consumer: sluice, prefetch: 1, ack_wait: 5s}}}}"
        )
    }
    fn sink(&self, name: &str, addr: SocketAddr) -> String {
        format!("{{jetstream: {{url: \"nats://{addr}\", subject: {name}}}}}")
    }
    async fn publish(&self, name: &str, msgs: &[Msg]) {
        let js = context().await;
        for m in msgs {
            let mut headers = async_nats::HeaderMap::new();
            for (k, v) in &m.headers {
                headers.insert(k.as_str(), v.as_str());
            }
            let body = serde_json::to_vec(&m.body).unwrap();
            js.publish_with_headers(name.to_owned(), headers, body.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }
    async fn consume(&self, name: &str, n: usize, timeout: Duration) -> Vec<Msg> {
        let js = context().await;
        let consumer = js
            .get_stream(name)
            .await
            .unwrap()
            .get_or_create_consumer(
                "conformance",
                pull::Config {
                    durable_name: Some("conformance".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut messages = consumer.messages().await.unwrap();
        while got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some(Ok(m))) = tokio::time::timeout(left, messages.next()).await else {
                break;
            };
            let headers = m
                .headers
                .iter()
                .flat_map(|h| h.iter())
                .filter_map(|(k, v)| Some((k.to_string(), v.first()?.to_string())))
                .collect();
            let body = serde_json::from_slice(&m.payload).unwrap_or(serde_json::Value::Null);
            m.double_ack().await.unwrap();
            got.push(Msg { body, headers });
        }
        got
    }
}

crate::conformance_tests!(JetStream);
