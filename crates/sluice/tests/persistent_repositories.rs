//! Stateful steps on the runtime's own store (`backend: {store: {}}`): real runtimes on a real
//! data directory, stopped and started again (a restart is a new runtime on the same directory).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::time::Duration;

use serde_json::json;
use support::{free_port, request, start_with_data, write_flow};

/// An order API that takes each order id once for `ttl`, keeping the ids in the store.
fn orders(port: u16, ttl: &str) -> String {
    format!(
        r#"
flows:
  - name: orders
    from: {{http: {{listen: "127.0.0.1:{port}", path: /orders}}}}
    steps:
      - id: once
        idempotent_consumer:
          key: .id
          on_duplicate: fail
          ttl: {ttl}
          repository: orders
          backend: {{store: {{}}}}
      - transform: '{{accepted: .id}}'
"#
    )
}

#[tokio::test]
async fn a_duplicate_is_recognised_after_a_restart_until_its_ttl_ends() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let flow = write_flow(&dir, "orders.yaml", &orders(port, "2s"));
    let url = format!("http://127.0.0.1:{port}/orders");

    let runtime = start_with_data(std::slice::from_ref(&flow), Some(port), &data).await;
    let first = request("POST", &url, r#"{"id":"o-1"}"#).await;
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    assert_eq!(first.json(), json!({"accepted": "o-1"}));
    let again = request("POST", &url, r#"{"id":"o-1"}"#).await;
    assert_eq!(
        again.status,
        422,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    assert_eq!(runtime.shutdown(Duration::from_secs(5)).await, 0);

    let runtime = start_with_data(std::slice::from_ref(&flow), Some(port), &data).await;
    let after_restart = request("POST", &url, r#"{"id":"o-1"}"#).await;
    assert_eq!(
        after_restart.status,
        422,
        "the key recorded before the restart is still there: {}",
        String::from_utf8_lossy(&after_restart.body)
    );
    assert!(
        String::from_utf8_lossy(&after_restart.body).contains("`o-1` was already seen"),
        "{}",
        String::from_utf8_lossy(&after_restart.body)
    );
    let other = request("POST", &url, r#"{"id":"o-2"}"#).await;
    assert_eq!(other.status, 200);

    // Past the key's time to live it is a new message again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = request("POST", &url, r#"{"id":"o-1"}"#).await;
    assert_eq!(
        expired.status,
        200,
        "{}",
        String::from_utf8_lossy(&expired.body)
    );
    assert_eq!(runtime.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test]
async fn a_failed_message_releases_its_key_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let yaml = format!(
        r#"
flows:
  - name: picky
    from: {{http: {{listen: "127.0.0.1:{port}", path: /p}}}}
    steps:
      - idempotent_consumer: {{key: .id, on_duplicate: fail, backend: {{store: {{}}}}}}
      - transform: 'if .ok then {{ok: .id}} else error("not ok") end'
"#
    );
    let flow = write_flow(&dir, "picky.yaml", &yaml);
    let url = format!("http://127.0.0.1:{port}/p");
    let runtime = start_with_data(std::slice::from_ref(&flow), Some(port), &data).await;
    let bad = request("POST", &url, r#"{"id":1,"ok":false}"#).await;
    assert!(bad.status >= 400, "{}", String::from_utf8_lossy(&bad.body));
    let retry = request("POST", &url, r#"{"id":1,"ok":true}"#).await;
    assert_eq!(
        retry.status,
        200,
        "{}",
        String::from_utf8_lossy(&retry.body)
    );
    assert_eq!(runtime.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test]
async fn max_keys_with_the_store_is_a_build_error_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = r#"
flows:
  - name: f
    from: {http: {listen: "127.0.0.1:1", path: /x}}
    steps:
      - idempotent_consumer: {key: .id, max_keys: 5, backend: {store: {}}}
"#;
    let flow = write_flow(&dir, "f.yaml", yaml);
    let registry = sluice::registry();
    let project = sluice_engine::config::load(&[flow], &registry).unwrap();
    let resources = std::sync::Arc::new(sluice_core::Resources::default());
    resources
        .get_or_default::<sluice_engine::durable::DurableStore>()
        .use_memory();
    let errors = sluice_engine::build::build(&project, &registry, resources)
        .err()
        .expect("max_keys with the store must not build")
        .to_string();
    assert!(errors.contains("max_keys"), "{errors}");
    assert!(errors.contains("remove `max_keys`"), "{errors}");
}
