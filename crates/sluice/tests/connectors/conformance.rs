//! The conformance suite: the promises every broker and database connector keeps, checked
//! against the real service on loopback with the real `sluice` binary.
//!
//! A connector's test module implements [`Connector`] (how to point a source and a sink at an
//! endpoint, and how another application would publish to and consume from it with the
//! service's own client) and expands [`conformance_tests!`], which generates one test per
//! promise:
//!
//! * `round_trip`: a flow from the connector's source to its sink carries N messages with their
//!   content, headers (where the service has them) and order (where it keeps one).
//! * `restart_loses_nothing`: the runtime is killed with SIGKILL in the middle of a stream and
//!   started again; every message the service handed over is recorded (source side) and every
//!   message the runtime acknowledged over HTTP reached the service (sink side). Duplicates are
//!   allowed (at-least-once), losses are not.
//! * `reconnects`: through a [`TcpProxy`], the service "restarts": while it refuses connections
//!   the flow is reported unhealthy and the connector backs off (no reconnect storm); once the
//!   port reopens, messages published meanwhile flow again within a few seconds.
//! * `unreachable_at_startup`: with the service's port closed, the connector's flows report
//!   unhealthy in `/health`, naming the address, while another flow of the same runtime serves
//!   requests.
//!
//! Each test first calls [`sluice_testkit::service`]: without the service it skips with a line,
//! or fails under `SLUICE_IT=1`.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_testkit::proxy::TcpProxy;

use crate::support;

/// One message as the outside world sees it: a JSON body and string headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Msg {
    /// The body, always a JSON document in these tests.
    pub body: Value,
    /// Headers (empty when the service has none).
    pub headers: BTreeMap<String, String>,
}

impl Msg {
    /// Message number `n` of a test: `{"n": n, "text": ...}` with header `x-seq: n`.
    pub fn numbered(n: usize) -> Msg {
        Msg {
            body: json!({"n": n, "text": format!("message {n}: grüße, \"quoted\"")}),
            headers: BTreeMap::from([("x-seq".to_owned(), n.to_string())]),
        }
    }

    /// The message's number, if its body is one of [`Msg::numbered`]'s.
    pub fn n(&self) -> Option<usize> {
        self.body.get("n")?.as_u64().map(|n| n as usize)
    }
}

/// What a connector supports, so the suite checks only what the service promises.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// The connector has a source (`from:`).
    pub source: bool,
    /// The connector has a sink (`to:`).
    pub sink: bool,
    /// Headers travel from the service into the message and from the message out to the service.
    pub headers: bool,
    /// One endpoint keeps the order of its messages.
    pub ordered: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            source: true,
            sink: true,
            headers: true,
            ordered: true,
        }
    }
}

/// How the suite drives one connector. `name` is an endpoint (queue, topic, subject, table,
/// directory...) unique to the test; `addr` is where the connector must connect: the real service
/// or a proxy in front of it.
#[async_trait::async_trait]
pub trait Connector: Send + Sync {
    /// The service's name in messages, e.g. `"RabbitMQ"`.
    fn service(&self) -> &'static str;
    /// Where the real service listens.
    fn address(&self) -> SocketAddr;
    /// What this connector supports.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    /// Creates the endpoint `name`, empty, with the service's own client.
    async fn create(&self, name: &str);
    /// The `from:` component consuming `name` through `addr`, as a YAML flow mapping, e.g.
    /// `{amqp: {url: "amqp://127.0.0.1:5672", queue: q1}}`. It must keep redelivering what was
    /// not acknowledged (durable queues, persistent sessions, consumer groups).
    fn source(&self, name: &str, addr: SocketAddr) -> String;
    /// One `to:` entry publishing to `name` through `addr`, as a YAML flow mapping.
    fn sink(&self, name: &str, addr: SocketAddr) -> String;
    /// Publishes `msgs` to `name` in order with the service's own client, as another
    /// application would, and returns once the service has them.
    async fn publish(&self, name: &str, msgs: &[Msg]);
    /// Takes up to `n` messages from `name` with the service's own client, waiting at most
    /// `timeout` for them; returns what arrived, in arrival order.
    async fn consume(&self, name: &str, n: usize, timeout: Duration) -> Vec<Msg>;
    /// Prepares a source endpoint for a runtime that is about to subscribe to it (for services
    /// that only keep messages for known subscribers, such as an MQTT persistent session, the
    /// connector registers the session here). By default nothing.
    async fn prepare_source(&self, _name: &str, _addr: SocketAddr) {}
}

/// Generates the suite's tests for a connector built by `$make`, in the calling module.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn round_trip() {
            let c = $make;
            if $crate::conformance::ready(&c).await {
                $crate::conformance::round_trip(&c).await;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn restart_loses_nothing() {
            let c = $make;
            if $crate::conformance::ready(&c).await {
                $crate::conformance::restart_loses_nothing(&c).await;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn reconnects() {
            let c = $make;
            if $crate::conformance::ready(&c).await {
                $crate::conformance::reconnects(&c).await;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn unreachable_at_startup() {
            let c = $make;
            if $crate::conformance::ready(&c).await {
                $crate::conformance::unreachable_at_startup(&c).await;
            }
        }
    };
}

/// Whether the connector's service answers (skips or fails per `SLUICE_IT`).
pub async fn ready(c: &dyn Connector) -> bool {
    sluice_testkit::service(c.service(), &c.address().to_string()).await
}

/// How many messages each test sends.
const MESSAGES: usize = 200;
/// How long the suite waits for messages that must arrive.
const PATIENCE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// round_trip

/// Source to sink: content, headers and order survive, nothing is left behind.
pub async fn round_trip(c: &dyn Connector) {
    let caps = c.capabilities();
    let (input, output) = (
        sluice_testkit::unique("conf_in"),
        sluice_testkit::unique("conf_out"),
    );
    c.create(&input).await;
    c.create(&output).await;
    let addr = c.address();
    let sent: Vec<Msg> = (0..MESSAGES).map(Msg::numbered).collect();
    match (caps.source, caps.sink) {
        (true, true) => {
            c.prepare_source(&input, addr).await;
            let runtime = Sluice::start(&flow(
                "round_trip",
                &c.source(&input, addr),
                &c.sink(&output, addr),
            ));
            c.publish(&input, &sent).await;
            let got = c.consume(&output, MESSAGES, PATIENCE).await;
            check_same(c, &sent, &got, &runtime);
            drop(runtime);
        }
        (true, false) => {
            let recording = Recording::new();
            c.prepare_source(&input, addr).await;
            let runtime = Sluice::start(&flow(
                "round_trip",
                &c.source(&input, addr),
                &recording.sink(),
            ));
            c.publish(&input, &sent).await;
            let got = recording.wait_for(MESSAGES, PATIENCE, &runtime);
            check_same(c, &sent, &got, &runtime);
        }
        (false, true) => {
            let port = support::free_port();
            let runtime = Sluice::start(&flow(
                "round_trip",
                &http_source(port),
                &c.sink(&output, addr),
            ));
            for m in &sent {
                let reply = post(port, m).await;
                assert!(
                    reply.status < 300,
                    "HTTP {}: {}",
                    reply.status,
                    runtime.log_tail()
                );
            }
            let got = c.consume(&output, MESSAGES, PATIENCE).await;
            check_same(c, &sent, &got, &runtime);
        }
        (false, false) => panic!("a connector has a source or a sink"),
    }
}

fn check_same(c: &dyn Connector, sent: &[Msg], got: &[Msg], runtime: &Sluice) {
    let caps = c.capabilities();
    assert_eq!(
        got.len(),
        sent.len(),
        "{}: {} of {} messages arrived; log:\n{}",
        c.service(),
        got.len(),
        sent.len(),
        runtime.log_tail()
    );
    let mut by_n: BTreeMap<usize, &Msg> = BTreeMap::new();
    for m in got {
        let n = m
            .n()
            .unwrap_or_else(|| panic!("{}: unexpected message {m:?}", c.service()));
        assert!(by_n.insert(n, m).is_none(), "message {n} arrived twice");
    }
    for m in sent {
        let n = m.n().unwrap_or_default();
        let got = by_n[&n];
        assert_eq!(
            got.body,
            m.body,
            "{}: body of message {n} changed",
            c.service()
        );
        if caps.headers {
            assert_eq!(
                got.headers.get("x-seq"),
                m.headers.get("x-seq"),
                "{}: header x-seq of message {n} lost; headers were {:?}",
                c.service(),
                got.headers
            );
        }
    }
    if caps.ordered {
        let order: Vec<usize> = got.iter().filter_map(Msg::n).collect();
        let sorted: Vec<usize> = (0..sent.len()).collect();
        assert_eq!(order, sorted, "{}: order changed", c.service());
    }
}

// ---------------------------------------------------------------------------------------------
// restart_loses_nothing

/// SIGKILL in the middle of a stream, then a restart on the same data directory: nothing
/// acknowledged is lost on either side.
pub async fn restart_loses_nothing(c: &dyn Connector) {
    let caps = c.capabilities();
    let addr = c.address();
    if caps.source {
        let input = sluice_testkit::unique("conf_kill_in");
        c.create(&input).await;
        c.prepare_source(&input, addr).await;
        let recording = Recording::new();
        let yaml = flow("kill_source", &c.source(&input, addr), &recording.sink());
        let sent: Vec<Msg> = (0..MESSAGES).map(Msg::numbered).collect();
        c.publish(&input, &sent).await;
        let mut runtime = Sluice::start(&yaml);
        recording.wait_for(MESSAGES / 4, PATIENCE, &runtime);
        runtime.kill();
        let mut runtime = runtime.restart();
        let got = recording.wait_for_all(MESSAGES, PATIENCE);
        assert_eq!(
            got.len(),
            MESSAGES,
            "{}: lost messages {:?} across a kill; log:\n{}",
            c.service(),
            missing(MESSAGES, &got),
            runtime.log_tail()
        );
        runtime.kill();
    }
    if caps.sink {
        let output = sluice_testkit::unique("conf_kill_out");
        c.create(&output).await;
        let port = support::free_port();
        let yaml = flow("kill_sink", &http_source(port), &c.sink(&output, addr));
        let mut runtime = Sluice::start(&yaml);
        runtime.wait_for_port(port);
        let mut acknowledged = BTreeSet::new();
        for n in 0..MESSAGES {
            if n == MESSAGES / 2 {
                runtime.kill();
                runtime = runtime.restart();
                runtime.wait_for_port(port);
            }
            // A request cut by the kill is simply not acknowledged; the sender would retry it.
            if let Some(status) = try_post(port, &Msg::numbered(n)).await
                && status < 300
            {
                acknowledged.insert(n);
            }
        }
        assert!(
            acknowledged.len() >= MESSAGES - 1,
            "only {} of {MESSAGES} requests were acknowledged; log:\n{}",
            acknowledged.len(),
            runtime.log_tail()
        );
        let got: BTreeSet<usize> = c
            .consume(&output, MESSAGES + 10, Duration::from_secs(5))
            .await
            .iter()
            .filter_map(Msg::n)
            .collect();
        let lost: Vec<&usize> = acknowledged.difference(&got).collect();
        assert!(
            lost.is_empty(),
            "{}: acknowledged messages {lost:?} never reached the service",
            c.service()
        );
    }
}

fn missing(total: usize, got: &BTreeSet<usize>) -> Vec<usize> {
    (0..total).filter(|n| !got.contains(n)).take(20).collect()
}

// ---------------------------------------------------------------------------------------------
// reconnects

/// Most connection attempts a connector may make while its service refuses for [`OUTAGE`]:
/// with the shared backoff (100 ms doubling to 1 s) a source and a sink make about 8 each.
const MAX_ATTEMPTS_IN_OUTAGE: usize = 40;
const OUTAGE: Duration = Duration::from_secs(4);
/// The issue asks for about a second after the port reopens; this leaves room for a loaded CI.
const RESUME_WITHIN: Duration = Duration::from_secs(5);

/// The service refuses connections for a while, then comes back: unhealthy meanwhile, a gentle
/// backoff, and messages flow again soon after.
pub async fn reconnects(c: &dyn Connector) {
    let caps = c.capabilities();
    let proxy = TcpProxy::start(c.address()).await;
    let (input, output) = (
        sluice_testkit::unique("conf_re_in"),
        sluice_testkit::unique("conf_re_out"),
    );
    c.create(&input).await;
    c.create(&output).await;
    let recording = Recording::new();
    let port = support::free_port();
    let (from, to) = match (caps.source, caps.sink) {
        (true, true) => (
            c.source(&input, proxy.addr()),
            c.sink(&output, proxy.addr()),
        ),
        (true, false) => (c.source(&input, proxy.addr()), recording.sink()),
        (false, _) => (http_source(port), c.sink(&output, proxy.addr())),
    };
    if caps.source {
        c.prepare_source(&input, proxy.addr()).await;
    }
    let runtime = Sluice::start(&flow("reconnect", &from, &to));
    if !caps.source {
        runtime.wait_for_port(port);
    }

    // Flowing before the outage.
    let first: Vec<Msg> = (0..10).map(Msg::numbered).collect();
    deliver(c, &runtime, &input, port, &first).await;
    let got = receive(c, &output, &recording, &runtime, 10).await;
    assert_eq!(
        got.len(),
        10,
        "before the outage; log:\n{}",
        runtime.log_tail()
    );

    // The outage: connections are cut, and every new one is closed at once.
    proxy.refuse().await;
    let began = Instant::now();
    let mut saw_unhealthy = None;
    if !caps.source {
        // A sink notices on its next delivery; the request fails rather than being acknowledged.
        let reply = try_post(port, &Msg::numbered(999)).await;
        assert!(
            reply.is_none_or(|s| s >= 500),
            "a delivery during the outage was acknowledged: {reply:?}"
        );
    }
    while began.elapsed() < OUTAGE {
        let health = runtime.health().await;
        if health["flows"]["reconnect"]["state"] == "unhealthy" {
            saw_unhealthy = Some(health);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let health = saw_unhealthy.unwrap_or_else(|| {
        panic!(
            "{}: the flow never showed unhealthy during the outage; log:\n{}",
            c.service(),
            runtime.log_tail()
        )
    });
    let error = health["flows"]["reconnect"]["error"].as_str().unwrap_or("");
    assert!(
        error.contains(&proxy.addr().port().to_string()),
        "the health error should name the address {}: {error}",
        proxy.addr()
    );
    let attempts = proxy.refused();
    assert!(
        (1..=MAX_ATTEMPTS_IN_OUTAGE).contains(&attempts),
        "{}: {attempts} connection attempts in {OUTAGE:?} (a storm, or none at all)",
        c.service()
    );

    // Published while the connector is cut off (straight to the service), or sent once it is back.
    let second: Vec<Msg> = (10..20).map(Msg::numbered).collect();
    if caps.source {
        c.publish(&input, &second).await;
    }
    proxy.up().await;
    let reopened = Instant::now();
    if !caps.source {
        deliver(c, &runtime, &input, port, &second).await;
    }
    // At-least-once: what was in flight at the cut may come again; only missing ones count.
    let numbers = receive_all(c, &output, &recording, 10..20).await;
    let resumed = reopened.elapsed();
    assert!(
        (10..20).all(|n| numbers.contains(&n)),
        "{}: after the port reopened, got {numbers:?}; log:\n{}",
        c.service(),
        runtime.log_tail()
    );
    assert!(
        resumed <= RESUME_WITHIN,
        "{}: took {resumed:?} to resume after the port reopened",
        c.service()
    );
    eprintln!(
        "{}: {attempts} attempts during a {OUTAGE:?} outage; resumed {resumed:?} after the port reopened",
        c.service()
    );
    // Healthy again soon after: a pooled connection that died in the outage may report once more
    // before the connector settles on a working one.
    let settle = Instant::now() + Duration::from_secs(5);
    loop {
        let health = runtime.health().await;
        if health["flows"]["reconnect"]["state"] == "running" {
            break;
        }
        assert!(
            Instant::now() < settle,
            "{}: still unhealthy after it resumed: {health}",
            c.service()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Puts `msgs` where the flow reads them: the service (source connectors) or HTTP (sink only).
async fn deliver(c: &dyn Connector, runtime: &Sluice, input: &str, port: u16, msgs: &[Msg]) {
    if c.capabilities().source {
        c.publish(input, msgs).await;
        return;
    }
    for m in msgs {
        let mut tries = 0;
        loop {
            match try_post(port, m).await {
                Some(s) if s < 300 => break,
                other if tries > 50 => {
                    panic!(
                        "message {m:?} not accepted: {other:?}; log:\n{}",
                        runtime.log_tail()
                    )
                }
                _ => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Receives from where the flow writes until every number in `want` arrived (duplicates and
/// stragglers allowed) or [`PATIENCE`] ran out; returns every number seen.
async fn receive_all(
    c: &dyn Connector,
    output: &str,
    recording: &Recording,
    want: std::ops::Range<usize>,
) -> BTreeSet<usize> {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = BTreeSet::new();
    while !want.clone().all(|n| seen.contains(&n)) && Instant::now() < deadline {
        if c.capabilities().sink {
            // The whole remaining time each call: some clients take seconds to join (Kafka).
            let missing = want.clone().filter(|n| !seen.contains(n)).count();
            let left = deadline.saturating_duration_since(Instant::now());
            let got = c.consume(output, missing, left).await;
            seen.extend(got.iter().filter_map(Msg::n));
        } else {
            seen.extend(recording.read().iter().filter_map(Msg::n));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    seen
}

/// Takes `n` messages from where the flow writes them: the service (sinks) or the recording.
async fn receive(
    c: &dyn Connector,
    output: &str,
    recording: &Recording,
    runtime: &Sluice,
    n: usize,
) -> Vec<Msg> {
    if c.capabilities().sink {
        c.consume(output, n, PATIENCE).await
    } else {
        recording.take(n, PATIENCE, runtime)
    }
}

// ---------------------------------------------------------------------------------------------
// unreachable_at_startup

/// The service's port is closed when the runtime starts: its flows are unhealthy and say where
/// they tried; another flow serves requests all along.
pub async fn unreachable_at_startup(c: &dyn Connector) {
    let caps = c.capabilities();
    let closed = closed_address();
    let name = sluice_testkit::unique("conf_down");
    let (health_port, sink_port) = (support::free_port(), support::free_port());
    let mut flows = vec![flow_entry(
        "healthy",
        &http_source(health_port),
        "{log: {level: info}}",
    )];
    if caps.source {
        flows.push(flow_entry(
            "down_source",
            &c.source(&name, closed),
            "{log: {level: info}}",
        ));
    }
    if caps.sink {
        flows.push(flow_entry(
            "down_sink",
            &http_source(sink_port),
            &c.sink(&name, closed),
        ));
    }
    let runtime = Sluice::start(&format!("flows:\n{}", flows.concat()));
    runtime.wait_for_port(health_port);
    if caps.sink {
        runtime.wait_for_port(sink_port);
        let reply = try_post(sink_port, &Msg::numbered(1)).await;
        assert!(
            reply.is_none_or(|s| s >= 500),
            "{}: a message for an unreachable service was acknowledged ({reply:?})",
            c.service()
        );
    }
    let expected: Vec<&str> = [
        caps.source.then_some("down_source"),
        caps.sink.then_some("down_sink"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        let health = runtime.health().await;
        if expected
            .iter()
            .all(|f| health["flows"][*f]["state"] == "unhealthy")
        {
            break health;
        }
        assert!(
            Instant::now() < deadline,
            "{}: flows {expected:?} should be unhealthy: {health}; log:\n{}",
            c.service(),
            runtime.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for f in &expected {
        let error = health["flows"][*f]["error"].as_str().unwrap_or("");
        assert!(
            error.contains(&closed.port().to_string()),
            "{}: the error of {f} should name {closed}: {error}",
            c.service()
        );
    }
    assert_eq!(health["flows"]["healthy"]["state"], "running", "{health}");
    let reply = post(health_port, &Msg::numbered(7)).await;
    assert_eq!(reply.status, 200, "the other flow must keep serving");
    assert_eq!(reply.json()["n"], 7);
}

/// A loopback address nothing listens on.
fn closed_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Flows, the runtime process and the recording

fn flow(name: &str, from: &str, to: &str) -> String {
    format!("flows:\n{}", flow_entry(name, from, to))
}

fn flow_entry(name: &str, from: &str, to: &str) -> String {
    // One message at a time keeps the order an ordered endpoint gives.
    format!("  - name: {name}\n    concurrency: 1\n    from: {from}\n    to:\n      - {to}\n")
}

/// An HTTP request-reply source on `port` at `/in`: the reply comes after the targets commit.
fn http_source(port: u16) -> String {
    format!("{{http: {{listen: \"127.0.0.1:{port}\", path: /in}}}}")
}

/// POSTs `m` (its body, and its headers as request headers) and reads the reply.
async fn post(port: u16, m: &Msg) -> support::Reply {
    let headers: Vec<(&str, &str)> = m
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    support::request_with_headers(
        "POST",
        &format!("http://127.0.0.1:{port}/in"),
        &headers,
        m.body.to_string(),
    )
    .await
}

/// The status of one POST, or `None` if the connection failed (a killed runtime).
async fn try_post(port: u16, m: &Msg) -> Option<u16> {
    let url = format!("http://127.0.0.1:{port}/in");
    let body = m.body.to_string();
    let seq = m.headers.get("x-seq").cloned().unwrap_or_default();
    tokio::time::timeout(Duration::from_secs(10), async move {
        let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let req = hyper::Request::post(url)
            .header("content-type", "application/json")
            .header("x-seq", seq)
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .ok()?;
        client.request(req).await.ok().map(|r| r.status().as_u16())
    })
    .await
    .ok()
    .flatten()
}

/// The `sluice` binary running flows from a file, with its admin API and a data directory.
pub struct Sluice {
    dir: tempfile::TempDir,
    flows: PathBuf,
    admin: SocketAddr,
    child: Option<Child>,
}

impl Sluice {
    /// Starts the binary on `yaml` and waits until its admin API answers.
    pub fn start(yaml: &str) -> Sluice {
        let dir = tempfile::tempdir().unwrap();
        let flows = dir.path().join("flows.yaml");
        std::fs::write(&flows, yaml).unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", support::free_port())
            .parse()
            .unwrap();
        let mut s = Sluice {
            dir,
            flows,
            admin,
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("sluice.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("run")
            .arg(&self.flows)
            .arg("--data")
            .arg(self.dir.path().join("data"))
            .arg("--admin")
            .arg(self.admin.to_string())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start the sluice binary");
        self.child = Some(child);
        self.wait_for_port(self.admin.port());
    }

    /// SIGKILL, and reap the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same flows and data directory (after [`Sluice::kill`]).
    pub fn restart(mut self) -> Sluice {
        self.kill();
        self.spawn();
        self
    }

    /// Waits until loopback `port` accepts connections (the process exiting is a failure).
    pub fn wait_for_port(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "nothing listens on 127.0.0.1:{port}; log:\n{}",
            self.log_tail()
        );
    }

    /// `GET /health` of the admin API.
    pub async fn health(&self) -> Value {
        support::request("GET", &format!("http://{}/health", self.admin), "")
            .await
            .json()
    }

    /// The last lines of the runtime's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("sluice.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The runtime's data directory (its durable store).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `file` sink that appends every body, fsync'd, to a file the test reads back: the
/// acknowledgement of a message recorded here means it is on disk.
pub struct Recording {
    dir: tempfile::TempDir,
    taken: std::sync::Mutex<usize>,
}

impl Recording {
    pub fn new() -> Recording {
        Recording {
            dir: tempfile::tempdir().unwrap(),
            taken: std::sync::Mutex::new(0),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("recording.jsonl")
    }

    /// The `to:` entry that records.
    pub fn sink(&self) -> String {
        format!(
            "{{file: {{path: \"{}\", fsync: true}}}}",
            self.path().display()
        )
    }

    /// Every message recorded so far, in order.
    pub fn read(&self) -> Vec<Msg> {
        read_lines(&self.path())
    }

    /// Waits until at least `n` messages are recorded; returns all of them.
    pub fn wait_for(&self, n: usize, patience: Duration, runtime: &Sluice) -> Vec<Msg> {
        let deadline = Instant::now() + patience;
        loop {
            let got = self.read();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} messages recorded; log:\n{}",
                got.len(),
                runtime.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the numbers `0..n` are all recorded (duplicates allowed); returns the set.
    pub fn wait_for_all(&self, n: usize, patience: Duration) -> BTreeSet<usize> {
        let deadline = Instant::now() + patience;
        loop {
            let got: BTreeSet<usize> = self.read().iter().filter_map(Msg::n).collect();
            if (0..n).all(|i| got.contains(&i)) || Instant::now() >= deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The next `n` messages recorded after those already taken.
    pub fn take(&self, n: usize, patience: Duration, runtime: &Sluice) -> Vec<Msg> {
        let mut taken = self.taken.lock().unwrap();
        let all = self.wait_for(*taken + n, patience, runtime);
        let next = all[*taken..*taken + n].to_vec();
        *taken += n;
        next
    }
}

/// The messages of a recording, in order. A kill can tear an append and the next record then
/// continues the same line, so records are found by where they start, not by lines.
fn read_lines(path: &Path) -> Vec<Msg> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(offset) = text[at..].find(r#"{"n":"#) {
        let start = at + offset;
        let mut stream = serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
        if let Some(Ok(body)) = stream.next() {
            found.push(Msg {
                body,
                headers: BTreeMap::new(),
            });
            at = start + stream.byte_offset();
        } else {
            at = start + 1;
        }
    }
    found
}
