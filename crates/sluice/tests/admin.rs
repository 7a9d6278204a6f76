//! The admin API over real HTTP: metrics that move with the traffic, health per flow.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::sync::Arc;

use support::{free_port, request, serve_admin, start, write_flow};

const FLOWS: &str = r#"
flows:
  - name: remote-call
    from:
      http: { listen: 127.0.0.1:PORT, path: /call }
    steps:
      - id: remote
        transform: 'if .down then error("remote is down") else {answer: .n} end'
        circuit_breaker:
          window: 2
          minimum_calls: 2
          failure_rate: 100
          open_for: 1h
          on: [expression]
    to:
      - log: {}
"#;

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn metrics_follow_flows_and_show_an_open_circuit() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let flows = write_flow(
        &dir,
        "flows.yaml",
        &FLOWS.replace("PORT", &port.to_string()),
    );
    let runtime = start(&[flows], Some(port)).await;
    let admin = serve_admin(&runtime).await;
    let metrics_url = format!("http://{admin}/metrics");
    let call = format!("http://127.0.0.1:{port}/call");

    let before = request("GET", &metrics_url, "").await;
    assert_eq!(before.status, 200);
    assert!(
        before
            .header("content-type")
            .starts_with("text/plain; version=0.0.4")
    );
    let closed = "sluice_circuit_breaker_state{breaker=\"remote-call/remote\",state=\"closed\"}";
    assert_eq!(
        sample(&String::from_utf8_lossy(&before.body), closed),
        Some(1.0)
    );

    assert_eq!(request("POST", &call, r#"{"n": 1}"#).await.status, 200);
    for _ in 0..2 {
        assert_ne!(
            request("POST", &call, r#"{"down": true}"#).await.status,
            200
        );
    }
    // Open now: this call is refused without reaching the step.
    assert_ne!(request("POST", &call, r#"{"n": 2}"#).await.status, 200);

    let after = String::from_utf8_lossy(&request("GET", &metrics_url, "").await.body).into_owned();
    let open = "sluice_circuit_breaker_state{breaker=\"remote-call/remote\",state=\"open\"}";
    assert_eq!(sample(&after, open), Some(1.0), "{after}");
    assert_eq!(sample(&after, closed), Some(0.0));
    let calls = |outcome: &str| {
        sample(
            &after,
            &format!(
                "sluice_circuit_breaker_calls_total{{breaker=\"remote-call/remote\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(calls("success"), Some(1.0));
    assert_eq!(calls("failure"), Some(2.0));
    assert_eq!(calls("rejected"), Some(1.0));
    let flow = |outcome: &str| {
        sample(
            &after,
            &format!("sluice_flow_messages_total{{flow=\"remote-call\",outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(flow("received"), Some(4.0));
    assert_eq!(flow("completed"), Some(1.0));
    assert_eq!(flow("failed"), Some(3.0));
    assert_eq!(
        sample(&after, "sluice_flow_in_flight{flow=\"remote-call\"}"),
        Some(0.0)
    );

    let health = request("GET", &format!("http://{admin}/health"), "").await;
    assert_eq!(health.status, 200);
    assert_eq!(
        health.json(),
        serde_json::json!({"status": "ok", "flows": {"remote-call": {"state": "running"}}})
    );
    let missing = request("GET", &format!("http://{admin}/nope"), "").await;
    assert_eq!(missing.status, 404);
    assert!(missing.json()["error"].as_str().unwrap().contains("/dlq"));
    assert_eq!(request("POST", &metrics_url, "").await.status, 405);
    runtime.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_flow_whose_source_failed_makes_health_503() {
    let dir = tempfile::tempdir().unwrap();
    // The port is taken by another program, so the flow's HTTP source cannot start.
    let port = free_port();
    let taken = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let flows = write_flow(
        &dir,
        "flows.yaml",
        &format!(
            "flows:\n  - name: blocked\n    from:\n      http: {{ listen: 127.0.0.1:{port}, path: /x }}\n    to:\n      - log: {{}}\n"
        ),
    );
    let runtime = start(&[flows], None).await;
    let admin = serve_admin(&runtime).await;
    let mut health = request("GET", &format!("http://{admin}/health"), "").await;
    for _ in 0..100 {
        if health.status == 503 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        health = request("GET", &format!("http://{admin}/health"), "").await;
    }
    assert_eq!(health.status, 503);
    let body = health.json();
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["flows"]["blocked"]["state"], "failed");
    assert!(
        !body["flows"]["blocked"]["error"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    drop(taken);
    runtime.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_taken_admin_address_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let state = sluice::admin::AdminState {
        resources: Arc::default(),
        health: sluice_engine::runtime::HealthBoard::new(&sluice_core::Resources::default()),
        flows: Arc::default(),
    };
    let error = sluice::admin::serve(addr, state, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(&addr.to_string()) && error.contains("--admin"),
        "{error}"
    );
}
