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
