//! Helpers shared by the integration tests: building components through the registry (as the
//! engine does), a recording `Dispatch`, and a raw HTTP/1.1 client.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::registry::Factory;
use sluice_core::spec::{ComponentKind, ComponentSpec};
use sluice_core::{
    BuildContext, BuildError, Dispatch, Failure, Message, Processor, Registry, Resources, Sink,
    Source, SourceContext, StepBuilder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub struct NoSteps;

impl StepBuilder for NoSteps {
    fn build_steps(&self, field: &str, _: &Value) -> Result<Arc<dyn Processor>, BuildError> {
        Err(BuildError::field(field, "no steps in connector tests"))
    }
    /// The engine's compiler, so components whose fields are jq build as in a flow.
    fn compile_jq(&self, field: &str, code: &str) -> Result<Arc<dyn JqProgram>, BuildError> {
        sluice_engine::expr::jq::compile(code, sluice_engine::expr::jq::JqLimits::default())
            .map_err(|e| BuildError::field(field, e.to_string()))
    }
}

/// Connector tests never emit downstream; a call is a test failure.
pub struct NoDownstream;

#[async_trait::async_trait]
impl Dispatch for NoDownstream {
    async fn dispatch(&self, msg: Message) -> Result<Vec<Message>, Failure> {
        panic!("unexpected downstream emission of {}", msg.id())
    }
}

pub fn registry() -> Registry {
    let mut r = Registry::new();
    sluice_connectors::register_all(&mut r);
    r
}

/// Fills spec defaults the way the engine does after validation.
pub fn with_defaults(spec: &ComponentSpec, config: &Value) -> Value {
    let mut map = config.as_object().cloned().unwrap_or_default();
    for field in &spec.fields {
        if let Some(default) = &field.default {
            map.entry(field.name.to_owned())
                .or_insert_with(|| default.clone());
        }
    }
    Value::Object(map)
}

pub fn ctx<'a>(resources: &'a Arc<Resources>) -> BuildContext<'a> {
    BuildContext {
        flow: "test-flow",
        id: "step-1",
        steps: &NoSteps,
        resources,
        downstream: Arc::new(NoDownstream),
    }
}

pub fn build_source(
    name: &str,
    config: Value,
    resources: &Arc<Resources>,
) -> Result<Box<dyn Source>, BuildError> {
    let reg = registry();
    let (spec, factory) = reg.get(ComponentKind::Source, name).expect("registered");
    let Factory::Source(f) = factory else {
        panic!("not a source")
    };
    f(&with_defaults(spec, &config), &ctx(resources))
}

pub fn build_sink(
    name: &str,
    config: Value,
    resources: &Arc<Resources>,
) -> Result<Arc<dyn Sink>, BuildError> {
    let reg = registry();
    let (spec, factory) = reg.get(ComponentKind::Sink, name).expect("registered");
    let Factory::Sink(f) = factory else {
        panic!("not a sink")
    };
    f(&with_defaults(spec, &config), &ctx(resources))
}

pub fn build_processor(
    name: &str,
    config: Value,
    resources: &Arc<Resources>,
) -> Result<Arc<dyn Processor>, BuildError> {
    let reg = registry();
    let (spec, factory) = reg.get(ComponentKind::Processor, name).expect("registered");
    let Factory::Processor(f) = factory else {
        panic!("not a processor")
    };
    f(&with_defaults(spec, &config), &ctx(resources))
}

type Handler = dyn Fn(Message) -> Pin<Box<dyn Future<Output = Result<Vec<Message>, Failure>> + Send>>
    + Send
    + Sync;

/// Records every message and answers with `handler`.
pub struct TestDispatch {
    pub seen: Mutex<Vec<Message>>,
    handler: Box<Handler>,
}

impl TestDispatch {
    pub fn new<F, Fut>(handler: F) -> Arc<Self>
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Message>, Failure>> + Send + 'static,
    {
        Arc::new(TestDispatch {
            seen: Mutex::new(Vec::new()),
            handler: Box::new(move |m| Box::pin(handler(m))),
        })
    }

    /// Acks every message and replies with it unchanged (an echo flow).
    pub fn echo() -> Arc<Self> {
        Self::new(|m: Message| async move {
            let mut reply = m.clone();
            // The copy's shares are extra shares of the same acknowledgement: resolve them.
            reply.take_acks().into_iter().for_each(|t| t.ack());
            m.ack();
            Ok(vec![reply])
        })
    }

    pub fn seen(&self) -> Vec<Message> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

#[async_trait::async_trait]
impl Dispatch for TestDispatch {
    async fn dispatch(&self, msg: Message) -> Result<Vec<Message>, Failure> {
        // Stored copies must not hold acknowledgement shares, or the source would wait forever.
        let mut copy = msg.clone();
        copy.take_acks().into_iter().for_each(|t| t.ack());
        self.seen.lock().unwrap().push(copy);
        (self.handler)(msg).await
    }
}

pub fn source_ctx(
    dispatcher: Arc<dyn Dispatch>,
    resources: &Arc<Resources>,
    flow: &str,
) -> (SourceContext, CancellationToken) {
    let shutdown = CancellationToken::new();
    (
        SourceContext {
            flow: Arc::from(flow),
            dispatcher,
            shutdown: shutdown.clone(),
            resources: Arc::clone(resources),
        },
        shutdown,
    )
}

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not json ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends raw bytes and reads the response until the server closes the connection or the
/// declared body has arrived.
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    read_response(&mut stream).await
}

pub async fn read_response(stream: &mut TcpStream) -> RawResponse {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(resp) = parse_response(&buf) {
            return resp;
        }
        let n = stream.read(&mut chunk).await.expect("read");
        if n == 0 {
            return parse_response(&buf).unwrap_or_else(|| {
                panic!("incomplete response: {}", String::from_utf8_lossy(&buf))
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn parse_response(buf: &[u8]) -> Option<RawResponse> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    let body = &buf[end + 4..];
    if body.len() < len {
        return None;
    }
    Some(RawResponse {
        status,
        headers,
        body: body[..len].to_vec(),
    })
}

/// A request with a body and `Connection: close`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        raw.push_str(&format!("{n}: {v}\r\n"));
    }
    raw.push_str("\r\n");
    let mut bytes = raw.into_bytes();
    bytes.extend_from_slice(body);
    raw_request(addr, &bytes).await
}

/// The build error, for results whose Ok type is not Debug.
pub fn build_err<T>(result: Result<T, BuildError>) -> BuildError {
    match result {
        Ok(_) => panic!("expected a build error"),
        Err(e) => e,
    }
}
