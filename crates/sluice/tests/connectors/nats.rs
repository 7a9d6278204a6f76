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

/// Issue 5: a JetStream message that keeps failing is redelivered up to `max_deliver` and its
/// last delivery reaches the flow's `dead_letter:` with its error (not just `+TERM`); earlier
/// failures are nacked, not dead-lettered; once the letter is written the message is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_5_jetstream_last_delivery_goes_to_the_dead_letter() {
    if !crate::conformance::ready(&JetStream).await {
        return;
    }
    let name = sluice_testkit::unique("js_dlq");
    JetStream.create(&name).await;
    let letters = tempfile::tempdir().unwrap();
    let letters_path = letters.path().join("letters.jsonl");
    let good = crate::conformance::Recording::new();
    let yaml = format!(
        "flows:\n  - name: poisoned\n    from: {{jetstream: {{url: \"nats://{ADDR}\", stream: {name}, consumer: sluice, max_deliver: 3, nak_delay: 50ms, ack_wait: 5s}}}}\n    steps:\n      - transform: 'if .poison then error(\"poison pill\") else . end'\n    to:\n      - {}\n    dead_letter: {{file: {{path: \"{}\", content: envelope, fsync: true}}}}\n",
        good.sink(),
        letters_path.display()
    );
    let runtime = crate::conformance::Sluice::start(&yaml);
    let js = context().await;
    js.publish(
        name.clone(),
        br#"{"poison": true, "n": 1000}"#.to_vec().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    js.publish(name.clone(), br#"{"n": 0}"#.to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let read_letters = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&letters_path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while read_letters().is_empty() {
        assert!(
            Instant::now() < deadline,
            "no dead letter; log:\n{}",
            runtime.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The good message passed; the poisoned one was tried three times, and only the third
    // delivery became a letter, carrying the error.
    assert_eq!(
        good.wait_for(1, Duration::from_secs(10), &runtime)[0].n(),
        Some(0)
    );
    let letter = &read_letters()[0];
    assert_eq!(letter["body"]["poison"], true);
    let headers = &letter["headers"];
    assert_eq!(headers["nats.delivered"], "3", "{letter}");
    assert_eq!(headers["sluice.error.kind"], "expression", "{letter}");
    assert!(
        headers["sluice.error.message"]
            .as_str()
            .is_some_and(|m| m.contains("poison pill")),
        "{letter}"
    );
    // The letter is written, so the message is acknowledged: nothing pending, nothing more
    // delivered.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut consumer: jetstream::consumer::Consumer<pull::Config> = js
            .get_stream(&name)
            .await
            .unwrap()
            .get_consumer("sluice")
            .await
            .unwrap();
        let info = consumer.info().await.unwrap();
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still pending: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(read_letters().len(), 1, "a letter per delivery");
}
