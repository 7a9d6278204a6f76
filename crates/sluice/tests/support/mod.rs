//! Shared helpers for behaviour tests: load flows from text, run them, talk HTTP to them.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sluice_core::Resources;
use sluice_engine::runtime::Runtime;
use sluice_engine::{build, config};

/// A free loopback port (bound then released; tests run the listener on it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `yaml` to a flow file in `dir` and returns its path.
pub fn write_flow(dir: &tempfile::TempDir, name: &str, yaml: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Loads, builds and starts the flows at `paths`, and waits until `port` accepts connections.
pub async fn start(paths: &[PathBuf], port: Option<u16>) -> Runtime {
    start_with_resources(paths, port, Arc::new(Resources::default())).await
}

/// Like [`start`], with the durable store in `data` (as `sluice run --data`).
pub async fn start_with_data(paths: &[PathBuf], port: Option<u16>, data: &Path) -> Runtime {
    let resources = Arc::new(Resources::default());
    resources
        .get_or_default::<sluice_engine::durable::DurableStore>()
        .set_dir(data);
    start_with_resources(paths, port, resources).await
}

async fn start_with_resources(
    paths: &[PathBuf],
    port: Option<u16>,
    resources: Arc<Resources>,
) -> Runtime {
    let registry = sluice::registry();
    let project =
        config::load(paths, &registry).unwrap_or_else(|d| panic!("flows do not load:\n{d}"));
    let topology = build::build(&project, &registry, resources)
        .unwrap_or_else(|d| panic!("flows do not build:\n{d}"));
    let runtime = Runtime::start(topology);
    if let Some(port) = port {
        wait_for_port(port).await;
    }
    runtime
}

/// Serves the admin API of `runtime` on a free loopback port; returns its address.
pub async fn serve_admin(runtime: &Runtime) -> std::net::SocketAddr {
    sluice::admin::serve(
        "127.0.0.1:0".parse().unwrap(),
        sluice::admin::AdminState::new(runtime),
        runtime.shutdown_token(),
    )
    .await
    .unwrap()
}

/// Waits (up to 2 s) until something accepts connections on loopback `port`.
pub async fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("nothing listens on 127.0.0.1:{port}");
}

/// A response, read whole.
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }
}

/// Sends one request with a real HTTP client.
pub async fn request(method: &str, url: &str, body: impl Into<Bytes>) -> Reply {
    request_as(method, url, "application/json", body).await
}

/// Sends one request with the given content type (curl -d sends a form type, say).
pub async fn request_as(
    method: &str,
    url: &str,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Reply {
    request_with_headers(method, url, &[("content-type", content_type)], body).await
}

/// Sends one request with these headers (JSON content type unless they set one).
pub async fn request_with_headers(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = hyper::Request::builder().method(method).uri(url);
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}
