//! The `redis_stream` source and sink through the conformance suite, against Redis on
//! 127.0.0.1:6379. Each endpoint is a stream; the suite reads it with XREAD, keeping its place.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, Value};

use crate::conformance::{Connector, Msg};

#[derive(Default)]
pub struct RedisStreams {
    /// The last id the suite read from each stream.
    cursors: Mutex<HashMap<String, String>>,
}

const ADDR: &str = "127.0.0.1:6379";

async fn conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://{ADDR}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[async_trait::async_trait]
impl Connector for RedisStreams {
    fn service(&self) -> &'static str {
        "Redis"
    }
    fn address(&self) -> SocketAddr {
        ADDR.parse().unwrap()
    }
    async fn create(&self, _name: &str) {}
    fn source(&self, name: &str, addr: SocketAddr) -> String {
        // `start: "0"`: the group sees what was published before the flow started; one entry
        // at a time keeps the stream's order through the flow.
        format!(
            "{{redis_stream: {{url: \"redis://{addr}\", stream: {name}, group: sluice, start: \"0\", prefetch: 1, claim_idle: 5s}}}}"
        )
    }
    fn sink(&self, name: &str, addr: SocketAddr) -> String {
        format!("{{redis_stream: {{url: \"redis://{addr}\", stream: {name}}}}}")
    }
    async fn publish(&self, name: &str, msgs: &[Msg]) {
        let mut c = conn().await;
        for m in msgs {
            let mut fields = vec![("body".to_owned(), serde_json::to_string(&m.body).unwrap())];
            fields.extend(m.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
            let _: String = c.xadd(name, "*", &fields).await.unwrap();
        }
    }
    async fn consume(&self, name: &str, n: usize, timeout: Duration) -> Vec<Msg> {
        let mut c = conn().await;
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut cursor = self
            .cursors
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .unwrap_or_else(|| "0".into());
        while got.len() < n && Instant::now() < deadline {
            let options = StreamReadOptions::default().count(n - got.len()).block(100);
            let reply: Option<StreamReadReply> = c
                .xread_options(&[name], &[&cursor], &options)
                .await
                .unwrap();
            for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                cursor = entry.id.clone();
                let mut body = serde_json::Value::Null;
                let mut headers = std::collections::BTreeMap::new();
                for (field, value) in entry.map {
                    let Value::BulkString(bytes) = value else {
                        continue;
                    };
                    if field == "body" {
                        body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                    } else {
                        headers.insert(field, String::from_utf8_lossy(&bytes).into_owned());
                    }
                }
                got.push(Msg { body, headers });
            }
        }
        self.cursors.lock().unwrap().insert(name.to_owned(), cursor);
        got
    }
}

crate::conformance_tests!(RedisStreams::default());

/// Two runtimes (as two instances would) with `idempotent_consumer` on one Redis store: a
/// message sent to both is processed once.
#[tokio::test]
async fn two_runtimes_share_an_idempotency_store_in_redis() {
    if !sluice_testkit::service("Redis", ADDR).await {
        return;
    }
    let prefix = format!("{}:", sluice_testkit::unique("conf:idem"));
    let dir = tempfile::tempdir().unwrap();
    let mut runtimes = Vec::new();
    let mut ports = Vec::new();
    for instance in 0..2 {
        let port = crate::support::free_port();
        let yaml = format!(
            "flows:\n  - name: once{instance}\n    from: {{http: {{listen: \"127.0.0.1:{port}\", path: /in}}}}\n    steps:\n      - idempotent_consumer:\n          key: .id\n          on_duplicate: fail\n          backend: {{redis: {{url: \"redis://{ADDR}\", prefix: \"{prefix}\"}}}}\n    to:\n      - log: {{level: info}}\n"
        );
        let path = crate::support::write_flow(&dir, &format!("once{instance}.yaml"), &yaml);
        runtimes.push(crate::support::start(&[path], Some(port)).await);
        ports.push(port);
    }
    let url = |port: u16| format!("http://127.0.0.1:{port}/in");
    let first = crate::support::request("POST", &url(ports[0]), r#"{"id":"order-1"}"#).await;
    assert!(first.status < 300, "first: {}", first.status);
    let again = crate::support::request("POST", &url(ports[1]), r#"{"id":"order-1"}"#).await;
    assert!(
        again.status >= 400,
        "the other instance let the duplicate through: {}",
        again.status
    );
    let other = crate::support::request("POST", &url(ports[1]), r#"{"id":"order-2"}"#).await;
    assert!(other.status < 300, "a new key: {}", other.status);
    let stored: Vec<String> = conn().await.keys(format!("{prefix}*")).await.unwrap();
    assert_eq!(stored.len(), 2, "{stored:?}");
    let _: () = conn().await.del(stored).await.unwrap();
    for runtime in runtimes {
        runtime.shutdown(Duration::from_secs(5)).await;
    }
}
