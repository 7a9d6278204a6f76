//! Behaviour tests: whole flows through the real HTTP listener on loopback, with a real client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::time::Duration;

use serde_json::json;
use support::{free_port, request, request_as, start, write_flow};

fn quickstart_on(port: u16) -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/quickstart.yaml"
    ))
    .unwrap();
    text.replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
}

#[tokio::test]
async fn quickstart_prices_an_order() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let flow = write_flow(&dir, "quickstart.yaml", &quickstart_on(port));
    let runtime = start(&[flow], Some(port)).await;
    let url = format!("http://127.0.0.1:{port}/orders");

    // As `curl -d` sends it: a form content type, which the JSON reply must not echo.
    let ok = request_as(
        "POST",
        &url,
        "application/x-www-form-urlencoded",
        r#"{"name":"ada","items":[{"qty":2,"price":3.5}]}"#,
    )
    .await;
    assert_eq!(ok.status, 201, "{}", String::from_utf8_lossy(&ok.body));
    assert_eq!(ok.json()["total"], json!(7.0));
    assert_eq!(ok.json()["name"], json!("ADA"));
    assert_eq!(ok.header("content-type"), "application/json");

    let empty = request("POST", &url, r#"{"name":"bob","items":[]}"#).await;
    assert_eq!(empty.status, 422);
    assert_eq!(
        empty.json()["error"],
        json!("an order needs at least one item")
    );

    runtime.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn bad_input_gets_a_problem_body_and_the_runtime_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let flow = write_flow(&dir, "quickstart.yaml", &quickstart_on(port));
    let runtime = start(&[flow], Some(port)).await;
    let url = format!("http://127.0.0.1:{port}/orders");

    let bad = request("POST", &url, "{not json").await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.header("content-type")
            .starts_with("application/problem+json"),
        "{:?}",
        bad.headers
    );
    let problem = bad.json();
    assert_eq!(problem["status"], json!(400));
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{problem}"
    );
    assert_eq!(problem["step"], json!("check"), "{problem}");

    let missing = request("POST", &format!("http://127.0.0.1:{port}/nope"), "{}").await;
    assert_eq!(missing.status, 404);

    let huge = request("POST", &url, vec![b' '; 2 * 1024 * 1024]).await;
    assert_eq!(huge.status, 413);

    // The failures above did not take the flow down.
    let ok = request(
        "POST",
        &url,
        r#"{"name":"x","items":[{"qty":1,"price":1}]}"#,
    )
    .await;
    assert_eq!(ok.status, 201);

    runtime.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn in_only_request_crosses_a_channel_into_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let out = dir.path().join("out.jsonl");
    let yaml = format!(
        r#"
flows:
  - name: intake
    from: {{ http: {{ listen: "127.0.0.1:{port}", path: /events, pattern: in_only }} }}
    steps:
      - transform: '. + {{seen: true}}'
    to:
      - channel: events
  - name: archive
    from: {{ channel: events }}
    to:
      - file: {{ path: "{out}" }}
  - name: status
    from: {{ http: {{ listen: "127.0.0.1:{port}", path: /status, methods: [GET] }} }}
    steps:
      - transform: '{{ok: true}}'
"#,
        out = out.display()
    );
    let flow = write_flow(&dir, "flows.yaml", &yaml);
    let runtime = start(&[flow], Some(port)).await;

    for i in 0..3 {
        let accepted = request(
            "POST",
            &format!("http://127.0.0.1:{port}/events"),
            format!(r#"{{"n":{i}}}"#),
        )
        .await;
        assert_eq!(accepted.status, 202);
        assert!(accepted.json()["id"].is_string());
    }
    // Two flows share the listener.
    let status = request("GET", &format!("http://127.0.0.1:{port}/status"), "").await;
    assert_eq!(status.json(), json!({"ok": true}));

    let mut lines = Vec::new();
    for _ in 0..200 {
        lines = std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        if lines.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut seen: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    seen.sort_by_key(|v| v["n"].as_i64());
    assert_eq!(
        seen,
        vec![
            json!({"n":0,"seen":true}),
            json!({"n":1,"seen":true}),
            json!({"n":2,"seen":true})
        ]
    );

    runtime.shutdown(Duration::from_secs(5)).await;
}

/// `call` over real channels: an HTTP flow calls a process flow, which enriches from a system
/// flow; each answers the one before it, and a failure deep down reaches the HTTP caller.
#[tokio::test]
async fn flows_answer_each_other_through_call() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/eip/request_reply.yaml"
    ))
    .unwrap()
    .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
    let flows = write_flow(&dir, "request_reply.yaml", &text);
    let runtime = start(&[flows], Some(port)).await;
    let url = format!("http://127.0.0.1:{port}/eip/request-reply");

    let ok = request("POST", &url, r#"{"order":"o-1","customer":"c-7","qty":3}"#).await;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    assert_eq!(
        ok.json(),
        json!({"order": "o-1", "total": 27.0, "customer": "Ada"})
    );

    let unknown = request("POST", &url, r#"{"order":"o-2","customer":"c-0","qty":1}"#).await;
    assert!(unknown.status >= 400, "status {}", unknown.status);
    let body = String::from_utf8_lossy(&unknown.body);
    assert!(
        body.contains("unknown customer c-0") && body.contains("rr-customers"),
        "{body}"
    );
    runtime.shutdown(Duration::from_secs(5)).await;
}
