//! The `http` sink against a real HTTP server (hyper, in the test process) that records what it
//! receives: the suite's sink-side promises for outgoing webhooks.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::conformance::{Capabilities, Connector, Msg};

/// A recording HTTP server: each path is an endpoint.
pub struct HttpTarget {
    addr: SocketAddr,
    received: Arc<Mutex<BTreeMap<String, Vec<Msg>>>>,
}

impl HttpTarget {
    pub async fn start() -> HttpTarget {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received: Arc<Mutex<BTreeMap<String, Vec<Msg>>>> = Arc::default();
        let store = Arc::clone(&received);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let store = Arc::clone(&store);
                        async move {
                            let path = req.uri().path().trim_start_matches('/').to_owned();
                            let headers = req
                                .headers()
                                .iter()
                                .filter_map(|(k, v)| {
                                    Some((k.to_string(), v.to_str().ok()?.to_owned()))
                                })
                                .collect();
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            let body = body.unwrap_or_default();
                            let value =
                                serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                            store.lock().unwrap().entry(path).or_default().push(Msg {
                                body: value,
                                headers,
                            });
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"ok"),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        HttpTarget { addr, received }
    }
}

#[async_trait::async_trait]
impl Connector for HttpTarget {
    fn service(&self) -> &'static str {
        "an HTTP server"
    }
    fn address(&self) -> SocketAddr {
        self.addr
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            source: false,
            ..Capabilities::default()
        }
    }
    async fn create(&self, _name: &str) {}
    fn source(&self, _name: &str, _addr: SocketAddr) -> String {
        unreachable!("the http sink has no source side here")
    }
    fn sink(&self, name: &str, addr: SocketAddr) -> String {
        format!("{{http: {{url: \"http://{addr}/{name}\", forward_headers: true, timeout: 5s}}}}")
    }
    async fn publish(&self, _name: &str, _msgs: &[Msg]) {
        unreachable!("the http sink has no source side here")
    }
    async fn consume(&self, name: &str, n: usize, timeout: Duration) -> Vec<Msg> {
        let deadline = Instant::now() + timeout;
        loop {
            let have = self.received.lock().unwrap().get(name).map_or(0, Vec::len);
            if have >= n || Instant::now() >= deadline {
                let mut all = self.received.lock().unwrap();
                let list = all.entry(name.to_owned()).or_default();
                let take = list.len().min(n);
                return list.drain(..take).collect();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

crate::conformance_tests!(HttpTarget::start().await);
