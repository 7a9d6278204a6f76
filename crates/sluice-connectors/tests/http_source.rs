//! The `http` source against real sockets on 127.0.0.1.

// Test helpers outside #[test] fns may panic on a broken fixture: that is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::needless_pass_by_value
)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use sluice_connectors::http::HttpListeners;
use sluice_core::{
    Body, ErrorKind, ExchangePattern, Failure, Message, ProcessError, Resources, SourceError,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), SourceError>>,
}

async fn start(
    config: Value,
    dispatch: Arc<TestDispatch>,
    resources: &Arc<Resources>,
    flow: &str,
) -> Running {
    let listen = config["listen"]
        .as_str()
        .unwrap_or("127.0.0.1:0")
        .to_owned();
    let mut config = config;
    config["listen"] = json!(listen);
    let source = build_source("http", config, resources).expect("builds");
    let (ctx, shutdown) = source_ctx(dispatch, resources, flow);
    let task = tokio::spawn(source.run(ctx));
    let listeners = resources.get_or_default::<HttpListeners>();
    for _ in 0..200 {
        if let Some(addr) = listeners.local_addr(&listen) {
            // The second flow on a shared address must also have added its route: give it a
            // moment after the address appears.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Running {
                addr,
                shutdown,
                task,
            };
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("listener never came up");
}

fn resources() -> Arc<Resources> {
    Arc::new(Resources::default())
}

#[tokio::test]
async fn in_out_reply_sets_status_headers_and_message_fields() {
    let res = resources();
    let dispatch = TestDispatch::new(|m: Message| async move {
        let reply = Message::bytes(format!("order {}", m.headers["http.param.id"]))
            .with_header("http.status", "201")
            .with_header("http.header.x-order", "7")
            .with_header("content-type", "text/plain");
        m.ack();
        Ok(vec![reply])
    });
    let run = start(
        json!({"path": "/orders/{id}", "methods": ["put"]}),
        dispatch.clone(),
        &res,
        "orders",
    )
    .await;
    let resp = request(
        run.addr,
        "PUT",
        "/orders/42?full=1",
        &[
            ("traceparent", "00-abc-def-01"),
            ("x-correlation-id", "corr-1"),
            ("x-custom", "yes"),
        ],
        b"{\"qty\":2}",
    )
    .await;
    assert_eq!(resp.status, 201);
    assert_eq!(resp.header("x-order"), Some("7"));
    assert_eq!(resp.header("content-type"), Some("text/plain"));
    assert_eq!(resp.body, b"order 42");

    let seen = dispatch.seen();
    assert_eq!(seen.len(), 1);
    let m = &seen[0];
    assert_eq!(m.pattern, ExchangePattern::InOut);
    assert_eq!(m.body.as_bytes().as_ref(), b"{\"qty\":2}");
    assert_eq!(m.headers["http.method"], "PUT");
    assert_eq!(m.headers["http.path"], "/orders/42");
    assert_eq!(m.headers["http.query"], "full=1");
    assert_eq!(m.headers["http.param.id"], "42");
    assert_eq!(m.headers["x-custom"], "yes");
    assert_eq!(m.meta.traceparent.as_deref(), Some("00-abc-def-01"));
    assert_eq!(m.meta.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(m.meta.origin.as_deref(), Some("orders"));
    run.shutdown.cancel();
    run.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn in_only_answers_202_and_the_message_arrives() {
    let res = resources();
    let dispatch = TestDispatch::new(|m: Message| async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        m.ack();
        Ok(vec![])
    });
    let run = start(
        json!({"path": "/hook", "pattern": "in_only"}),
        dispatch.clone(),
        &res,
        "hooks",
    )
    .await;
    let resp = request(run.addr, "POST", "/hook", &[], b"ping").await;
    assert_eq!(resp.status, 202);
    let id = resp.json()["id"].as_str().unwrap().to_owned();
    for _ in 0..100 {
        if dispatch.count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = dispatch.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].id().to_string(), id);
    assert_eq!(seen[0].pattern, ExchangePattern::InOnly);
    assert_eq!(seen[0].body.as_bytes().as_ref(), b"ping");
    run.shutdown.cancel();
    run.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn in_only_on_commit_answers_202_after_the_flow_and_failures_with_a_problem() {
    let res = resources();
    let committed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&committed);
    let dispatch = TestDispatch::new(move |m: Message| {
        let flag = Arc::clone(&flag);
        async move {
            if m.body.as_bytes().as_ref() == b"full" {
                let error = ProcessError::new(ErrorKind::Unavailable, "the disk is full");
                return Err(Failure::new(m, error));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            m.ack();
            Ok(vec![])
        }
    });
    let run = start(
        json!({"path": "/hook", "pattern": "in_only", "accept": "on_commit"}),
        dispatch.clone(),
        &res,
        "hooks",
    )
    .await;
    let resp = request(run.addr, "POST", "/hook", &[], b"ping").await;
    assert_eq!(resp.status, 202);
    assert!(
        committed.load(std::sync::atomic::Ordering::SeqCst),
        "202 before the flow committed"
    );
    assert_eq!(resp.json()["id"], dispatch.seen()[0].id().to_string());
    let full = request(run.addr, "POST", "/hook", &[], b"full").await;
    assert_eq!(full.status, 503);
    assert_eq!(full.header("retry-after"), Some("1"));
    assert_eq!(full.json()["detail"], "the disk is full");
    run.shutdown.cancel();
    run.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn unknown_path_is_404_and_wrong_method_is_405_with_allow() {
    let res = resources();
    let run = start(
        json!({"path": "/a", "methods": ["POST", "PUT"]}),
        TestDispatch::echo(),
        &res,
        "f",
    )
    .await;
    let resp = request(run.addr, "GET", "/nope", &[], b"").await;
    assert_eq!(resp.status, 404);
    assert_eq!(
        resp.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(resp.json()["status"], 404);
    let resp = request(run.addr, "DELETE", "/a", &[], b"").await;
    assert_eq!(resp.status, 405);
    assert_eq!(resp.header("allow"), Some("POST, PUT"));
    assert_eq!(resp.json()["status"], 405);
    run.shutdown.cancel();
    run.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn oversized_bodies_get_413_by_length_and_by_stream() {
    let res = resources();
    let dispatch = TestDispatch::echo();
    let run = start(
        json!({"path": "/up", "max_body": 16}),
        dispatch.clone(),
        &res,
        "f",
    )
    .await;

    // Declared too large: refused before the body is read.
    let resp = raw_request(
        run.addr,
        b"POST /up HTTP/1.1\r\nhost: t\r\nconnection: close\r\ncontent-length: 1000\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 413);
    assert_eq!(resp.json()["status"], 413);

    // Chunked, no length: refused once the stream passes the limit.
    let resp = raw_request(
        run.addr,
        b"POST /up HTTP/1.1\r\nhost: t\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\na\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 413);

    // Within the limit still works, on the same server.
    let resp = request(run.addr, "POST", "/up", &[], b"small").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"small");
    assert_eq!(
        dispatch.count(),
        1,
        "oversized requests must not reach the flow"
    );
    run.shutdown.cancel();
    run.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn flow_failures_become_problem_json_by_kind() {
    let cases = [
        (ErrorKind::InvalidInput, 400),
        (ErrorKind::Rejected, 422),
        (ErrorKind::Timeout, 504),
        (ErrorKind::Remote, 502),
        (ErrorKind::Unavailable, 503),
        (ErrorKind::Expression, 500),
        (ErrorKind::Io, 500),
        (ErrorKind::Internal, 500),
    ];
    let res = resources();
    let dispatch = TestDispatch::new(|m: Message| async move {
        let kind: ErrorKind =
            serde_json::from_value(json!(m.body.to_text())).expect("kind in body");
        Err(Failure::new(
            m,
            ProcessError::new(kind, "it broke").in_step("validate"),
        ))
    });
    let run = start(json!({"path": "/p"}), dispatch.clone(), &res, "f").await;
    for (kind, status) in cases {
        let resp = request(run.addr, "POST", "/p", &[], kind.as_str().as_bytes()).await;
        assert_eq!(resp.status, status, "{kind}");
        assert_eq!(
            resp.header("content-type"),
            Some("application/problem+json")
        );
        let p = resp.json();
        assert_eq!(p["status"], status);
        assert_eq!(p["kind"], kind.as_str());
        assert_eq!(p["step"], "validate");
        assert_eq!(p["detail"], "it broke");
        let retry_after = if status == 503 { Some("1") } else { None };
        assert_eq!(resp.header("retry-after"), retry_after, "{kind}");
        assert!(p["type"].as_str().unwrap().ends_with(kind.as_str()));
        assert!(p["title"].is_string());
        let last = dispatch.seen().pop().unwrap();
        assert_eq!(p["message_id"], last.id().to_string());
    }
    run.shutdown.cancel();
    run.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn two_flows_share_one_listener_and_conflicts_are_refused() {
    let res = resources();
    let a = TestDispatch::new(|m: Message| async move {
        m.ack();
        Ok(vec![Message::json(json!({"flow": "a"}))])
    });
    let b = TestDispatch::new(|m: Message| async move {
        m.ack();
        Ok(vec![Message::json(json!({"flow": "b"}))])
    });
    let run_a = start(json!({"path": "/a"}), a, &res, "flow-a").await;
    let run_b = start(json!({"path": "/b", "methods": ["GET"]}), b, &res, "flow-b").await;
    assert_eq!(run_a.addr, run_b.addr, "one listener for both");
    assert_eq!(
        request(run_a.addr, "POST", "/a", &[], b"").await.json(),
        json!({"flow": "a"})
    );
    let resp = request(run_a.addr, "GET", "/b", &[], b"").await;
    assert_eq!(resp.json(), json!({"flow": "b"}));
    assert_eq!(resp.header("content-type"), Some("application/json"));

    // Same method and path on the same address: the second flow fails to start, naming the first.
    let dup = build_source("http", json!({"listen": "127.0.0.1:0", "path": "/a"}), &res).unwrap();
    let (ctx, _s) = source_ctx(TestDispatch::echo(), &res, "flow-c");
    let err = dup.run(ctx).await.unwrap_err().to_string();
    assert!(err.contains("flow-a") && err.contains("/a"), "{err}");

    // Stopping one flow leaves the other served; stopping both closes the port.
    run_a.shutdown.cancel();
    run_a.task.await.unwrap().unwrap();
    assert_eq!(
        request(run_b.addr, "POST", "/a", &[], b"").await.status,
        404
    );
    assert_eq!(request(run_b.addr, "GET", "/b", &[], b"").await.status, 200);
    run_b.shutdown.cancel();
    run_b.task.await.unwrap().unwrap();
    assert!(
        TcpStream::connect(run_b.addr).await.is_err(),
        "port still open"
    );
}

#[tokio::test]
async fn shutdown_finishes_an_in_flight_request() {
    let res = resources();
    let dispatch = TestDispatch::new(|m: Message| async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        m.ack();
        Ok(vec![Message::bytes(&b"done"[..])])
    });
    let run = start(json!({"path": "/slow"}), dispatch, &res, "f").await;
    let addr = run.addr;
    let client = tokio::spawn(async move { request(addr, "POST", "/slow", &[], b"x").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    run.shutdown.cancel();
    let resp = client.await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"done");
    tokio::time::timeout(Duration::from_secs(5), run.task)
        .await
        .expect("source stops after the request")
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener still open"
    );
}

#[tokio::test]
async fn slow_flow_times_out_with_504() {
    let res = resources();
    let dispatch = TestDispatch::new(|m: Message| async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        m.ack();
        Ok(vec![])
    });
    let run = start(
        json!({"path": "/t", "timeout": "200ms"}),
        dispatch,
        &res,
        "f",
    )
    .await;
    let started = std::time::Instant::now();
    let resp = request(run.addr, "POST", "/t", &[], b"").await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(resp.status, 504);
    let p = resp.json();
    assert_eq!(p["kind"], "timeout");
    assert!(p["detail"].as_str().unwrap().contains("200ms"), "{p}");
    run.shutdown.cancel();
    run.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn zero_and_many_replies() {
    let res = resources();
    let dispatch = TestDispatch::new(|m: Message| async move {
        let n: usize = m.body.to_text().parse().unwrap();
        m.ack();
        Ok((0..n)
            .map(|i| {
                Message::new(if i == 0 {
                    Body::from_json(json!({"i": 0}))
                } else {
                    Body::from_bytes(format!("t{i}"))
                })
            })
            .collect())
    });
    let run = start(json!({"path": "/n"}), dispatch, &res, "f").await;
    assert_eq!(request(run.addr, "POST", "/n", &[], b"0").await.status, 204);
    let resp = request(run.addr, "POST", "/n", &[], b"2").await;
    assert_eq!(resp.json(), json!([{"i": 0}, "t1"]));
    run.shutdown.cancel();
    run.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn malformed_requests_do_not_kill_the_server() {
    let res = resources();
    let run = start(json!({"path": "/ok"}), TestDispatch::echo(), &res, "f").await;
    let mut s = TcpStream::connect(run.addr).await.unwrap();
    s.write_all(b"\x00\x01garbage\r\n\r\n").await.unwrap();
    let _ = read_to_close(&mut s).await;
    let resp = raw_request(
        run.addr,
        b"POST /ok HTTP/1.1\r\nhost: t\r\ncontent-length: abc\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 400);
    let resp = request(run.addr, "POST", "/ok", &[], b"still here").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"still here");
    run.shutdown.cancel();
    run.task.await.unwrap().unwrap();
}

async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    out
}

#[test]
fn bad_configs_are_build_errors() {
    let res = resources();
    let err = build_err(build_source("http", json!({"path": "orders"}), &res));
    assert_eq!(err.field.as_deref(), Some("path"));
    let err = build_err(build_source(
        "http",
        json!({"path": "/x", "listen": "localhost"}),
        &res,
    ));
    assert_eq!(err.field.as_deref(), Some("listen"));
    let err = build_err(build_source(
        "http",
        json!({"path": "/x", "methods": ["BAD METHOD"]}),
        &res,
    ));
    assert_eq!(err.field.as_deref(), Some("methods[0]"));
    let err = build_err(build_source(
        "http",
        json!({"path": "/x", "bogus": 1}),
        &res,
    ));
    assert_eq!(err.field.as_deref(), Some("bogus"));
}
