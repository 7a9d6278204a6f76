//! The `http` request processor and sink against a local test server.

// Test helpers outside #[test] fns may panic on a broken fixture: that is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::needless_pass_by_value
)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::json;
use sluice_core::{AckToken, ErrorKind, Message, Outcome, Resources};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A raw HTTP/1.1 server answering every request with `status` and `body`, recording the
/// requests it saw (head and body as text).
struct TestServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

async fn serve(status: u16, body: &'static str, delay: Duration) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = s.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
                record
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf).into_owned());
                tokio::time::sleep(delay).await;
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\nx-backend: b1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    TestServer { addr, seen }
}

#[tokio::test]
async fn success_becomes_the_next_message_with_status_and_headers() {
    let server = serve(201, r#"{"crm":"ok"}"#, Duration::ZERO).await;
    let res = Arc::new(Resources::default());
    let url = format!("http://{}/crm/{{http.param.id}}?x=1", server.addr);
    let p = build_processor(
        "http",
        json!({"url": url, "headers": {"x-trace": "t-{trace}"}, "forward_headers": true}),
        &res,
    )
    .unwrap();
    let (token, outcome) = AckToken::channel();
    let msg = Message::bytes(&b"{\"a\":1}"[..])
        .with_header("http.param.id", "a b/c")
        .with_header("trace", "77")
        .with_header("x-keep", "yes")
        .with_header("content-length", "999")
        .with_header("http.response.header.old", "stale")
        .with_ack(token);
    let original_id = msg.id();
    let mut out = p.process(msg).await.unwrap();
    assert_eq!(out.len(), 1);
    let next = out.pop().unwrap();
    assert_ne!(next.id(), original_id);
    assert_eq!(next.body.as_bytes().as_ref(), br#"{"crm":"ok"}"#);
    assert_eq!(next.headers["http.status"], "201");
    assert_eq!(next.headers["http.response.header.x-backend"], "b1");
    assert_eq!(next.headers["content-type"], "application/json");
    assert!(!next.headers.contains_key("http.response.header.old"));
    assert_eq!(
        next.ack_count(),
        1,
        "the ack share moves to the response message"
    );
    next.ack();
    assert_eq!(outcome.await.unwrap(), Outcome::Ack);

    let seen = server.seen.lock().unwrap().clone();
    let req = &seen[0];
    assert!(req.starts_with("POST /crm/a%20b%2Fc?x=1 HTTP/1.1"), "{req}");
    let lower = req.to_ascii_lowercase();
    assert!(lower.contains("x-trace: t-77"), "{req}");
    assert!(lower.contains("x-keep: yes"), "{req}");
    assert!(lower.contains("content-type: application/json"), "{req}");
    assert!(
        lower.contains("content-length: 7"),
        "forwarded content-length must not win: {req}"
    );
    assert!(!lower.contains("http.param.id"), "{req}");
    assert!(req.ends_with(r#"{"a":1}"#), "{req}");
}

#[tokio::test]
async fn get_sends_no_body_and_headers_are_not_forwarded_by_default() {
    let server = serve(200, "{}", Duration::ZERO).await;
    let res = Arc::new(Resources::default());
    let p = build_processor(
        "http",
        json!({"url": format!("http://{}/x", server.addr), "method": "get"}),
        &res,
    )
    .unwrap();
    p.process(Message::bytes(&b"ignored"[..]).with_header("x-secret", "s"))
        .await
        .unwrap();
    let req = server.seen.lock().unwrap()[0].clone();
    assert!(req.starts_with("GET /x HTTP/1.1"), "{req}");
    assert!(
        !req.contains("ignored") && !req.to_ascii_lowercase().contains("x-secret"),
        "{req}"
    );
}

#[tokio::test]
async fn server_error_is_remote_with_status_and_body_excerpt() {
    let server = serve(500, r#"{"error":"db down"}"#, Duration::ZERO).await;
    let res = Arc::new(Resources::default());
    let p = build_processor(
        "http",
        json!({"url": format!("http://{}/x", server.addr)}),
        &res,
    )
    .unwrap();
    let msg = Message::bytes(&b"x"[..]);
    let id = msg.id();
    let failure = p.process(msg).await.unwrap_err();
    assert_eq!(
        failure.message.id(),
        id,
        "the failing message is handed back"
    );
    assert_eq!(failure.error.kind, ErrorKind::Remote);
    assert_eq!(failure.error.remote_status, Some(500));
    assert_eq!(failure.error.step.as_deref(), Some("step-1"));
    assert!(
        failure.error.detail.contains("500"),
        "{}",
        failure.error.detail
    );
    assert!(
        failure.error.detail.contains("db down"),
        "{}",
        failure.error.detail
    );
}

#[tokio::test]
async fn connection_refused_is_unavailable() {
    // Bind then drop, so nothing listens on the port.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let res = Arc::new(Resources::default());
    let p = build_processor("http", json!({"url": format!("http://{addr}/x")}), &res).unwrap();
    let failure = p.process(Message::bytes(&b"x"[..])).await.unwrap_err();
    assert_eq!(
        failure.error.kind,
        ErrorKind::Unavailable,
        "{}",
        failure.error
    );
    let sink = build_sink("http", json!({"url": format!("http://{addr}/x")}), &res).unwrap();
    let err = sink.deliver(&Message::bytes(&b"x"[..])).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable);
}

#[tokio::test]
async fn slow_server_is_a_timeout() {
    let server = serve(200, "{}", Duration::from_secs(5)).await;
    let res = Arc::new(Resources::default());
    let p = build_processor(
        "http",
        json!({"url": format!("http://{}/x", server.addr), "timeout": "150ms"}),
        &res,
    )
    .unwrap();
    let failure = p.process(Message::bytes(&b"x"[..])).await.unwrap_err();
    assert_eq!(failure.error.kind, ErrorKind::Timeout);
    assert!(
        failure.error.detail.contains("150ms"),
        "{}",
        failure.error.detail
    );
}

#[tokio::test]
async fn missing_placeholder_header_is_invalid_input_naming_it() {
    let res = Arc::new(Resources::default());
    let p = build_processor(
        "http",
        json!({"url": "http://127.0.0.1:9/crm/{customer_id}"}),
        &res,
    )
    .unwrap();
    let failure = p.process(Message::bytes(&b"x"[..])).await.unwrap_err();
    assert_eq!(failure.error.kind, ErrorKind::InvalidInput);
    assert!(
        failure.error.detail.contains("customer_id"),
        "{}",
        failure.error.detail
    );
}

#[tokio::test]
async fn sink_commits_on_2xx_only() {
    let ok = serve(204, "", Duration::ZERO).await;
    let res = Arc::new(Resources::default());
    let sink = build_sink(
        "http",
        json!({"url": format!("http://{}/in", ok.addr), "method": "PUT"}),
        &res,
    )
    .unwrap();
    sink.deliver(&Message::bytes(&b"payload"[..]))
        .await
        .unwrap();
    assert!(ok.seen.lock().unwrap()[0].starts_with("PUT /in"));
    let bad = serve(409, "conflict", Duration::ZERO).await;
    let sink = build_sink(
        "http",
        json!({"url": format!("http://{}/in", bad.addr)}),
        &res,
    )
    .unwrap();
    let err = sink
        .deliver(&Message::bytes(&b"payload"[..]))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Remote);
    assert_eq!(err.remote_status, Some(409));
}

#[test]
fn https_and_bad_urls_are_build_errors() {
    let res = Arc::new(Resources::default());
    let err = build_err(build_processor(
        "http",
        json!({"url": "https://api.example.com/x"}),
        &res,
    ));
    assert_eq!(err.field.as_deref(), Some("url"));
    assert!(
        err.message.contains("TLS") && err.message.contains("proxy"),
        "{}",
        err.message
    );
    let err = build_err(build_sink(
        "http",
        json!({"url": "HTTPS://api.example.com/x"}),
        &res,
    ));
    assert_eq!(err.field.as_deref(), Some("url"));
    let err = build_err(build_sink("http", json!({"url": "ftp://x/y"}), &res));
    assert_eq!(err.field.as_deref(), Some("url"));
    let err = build_err(build_sink("http", json!({"url": "http://x/{open"}), &res));
    assert_eq!(err.field.as_deref(), Some("url"));
    let err = build_err(build_sink(
        "http",
        json!({"url": "http://x/", "method": "NO PE"}),
        &res,
    ));
    assert_eq!(err.field.as_deref(), Some("method"));
    let err = build_err(build_sink(
        "http",
        json!({"url": "http://x/", "headers": {"bad name": "v"}}),
        &res,
    ));
    assert_eq!(err.field.as_deref(), Some("headers.bad name"));
}
