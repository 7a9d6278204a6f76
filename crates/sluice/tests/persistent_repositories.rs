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

/// Orders' lines aggregated three at a time (or after `timeout` of quiet) with the groups in
/// the store; every aggregate is appended to `out` as an envelope (with its headers).
fn batches(port: u16, out: &std::path::Path, timeout: &str) -> String {
    format!(
        r#"
flows:
  - name: lines
    from: {{http: {{listen: "127.0.0.1:{port}", path: /lines, pattern: in_only, accept: on_commit}}}}
    steps:
      - id: batch
        aggregate:
          correlation: .order
          size: 3
          timeout: {timeout}
          aggregation: 'map(.line)'
          backend: {{store: {{}}}}
    to:
      - file: {{path: "{}", content: envelope}}
"#,
        out.display()
    )
}

/// The aggregates written to `out` so far.
fn written(out: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// Waits until `out` holds `n` aggregates.
async fn written_at_least(out: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..1000 {
        let got = written(out);
        if got.len() >= n {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} aggregates written, not {n}", written(out).len());
}

/// The groups stored for the `batch` step, read once the runtime has let go of the store (the
/// deletion of a delivered group may still be committing right after a shutdown).
async fn stored_groups(data: &std::path::Path) -> Vec<sluice_store::StoredGroup> {
    for _ in 0..500 {
        if let Ok(store) = sluice_store::Store::open(data, sluice_store::StoreOptions::default()) {
            return store.aggregation_groups("lines/batch").groups().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the store in {} stays locked", data.display());
}

async fn send_line(port: u16, order: &str, line: u32) {
    let reply = request(
        "POST",
        &format!("http://127.0.0.1:{port}/lines"),
        json!({"order": order, "line": line}).to_string(),
    )
    .await;
    assert_eq!(
        reply.status,
        202,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
}

#[tokio::test]
async fn a_group_survives_a_restart_and_completes_once_by_size() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = dir.path().join("aggregates.jsonl");
    let port = free_port();
    let flow = write_flow(&dir, "lines.yaml", &batches(port, &out, "1h"));

    let runtime = start_with_data(std::slice::from_ref(&flow), Some(port), &data).await;
    // Each 202 comes once the line is in its stored group: the source is done with it.
    send_line(port, "a", 1).await;
    send_line(port, "a", 2).await;
    send_line(port, "b", 1).await;
    assert_eq!(runtime.shutdown(Duration::from_secs(5)).await, 0);
    assert!(written(&out).is_empty(), "no group was complete");
    let stored = stored_groups(&data).await;
    assert_eq!(
        stored
            .iter()
            .map(|g| (g.key.as_str(), g.size))
            .collect::<Vec<_>>(),
        [("a", 2), ("b", 1)]
    );

    let runtime = start_with_data(std::slice::from_ref(&flow), Some(port), &data).await;
    send_line(port, "a", 3).await;
    let got = written_at_least(&out, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0]["body"],
        json!([1, 2, 3]),
        "lines from before and after the restart"
    );
    assert_eq!(got[0]["headers"]["sluice.aggregate.completed_by"], "size");
    assert_eq!(got[0]["headers"]["sluice.aggregate.size"], "3");
    // The next group under the same key starts afresh.
    send_line(port, "a", 4).await;
    assert_eq!(runtime.shutdown(Duration::from_secs(5)).await, 0);

    let stored = stored_groups(&data).await;
    assert_eq!(
        stored
            .iter()
            .map(|g| (g.key.as_str(), g.size))
            .collect::<Vec<_>>(),
        [("b", 1), ("a", 1)],
        "the delivered group was deleted, the others wait"
    );
    // A third run reloads them without emitting the delivered group again.
    let runtime = start_with_data(std::slice::from_ref(&flow), Some(port), &data).await;
    send_line(port, "b", 2).await;
    send_line(port, "b", 3).await;
    let got = written_at_least(&out, 2).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[1]["body"], json!([1, 2, 3]));
    assert_eq!(got[1]["headers"]["sluice.aggregate.correlation"], "b");
    assert_eq!(runtime.shutdown(Duration::from_secs(5)).await, 0);
    assert_eq!(written(&out).len(), 2, "each group emitted once");
}

#[tokio::test]
async fn a_stored_group_completes_by_its_timeout_after_a_restart_without_new_messages() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = dir.path().join("aggregates.jsonl");
    let port = free_port();
    let flow = write_flow(&dir, "lines.yaml", &batches(port, &out, "300ms"));

    let runtime = start_with_data(std::slice::from_ref(&flow), Some(port), &data).await;
    send_line(port, "c", 1).await;
    // Stopped before the timeout: the group stays stored, nothing is emitted or nacked.
    assert_eq!(runtime.shutdown(Duration::from_secs(5)).await, 0);
    assert!(written(&out).is_empty());
    assert_eq!(stored_groups(&data).await.len(), 1);

    let runtime = start_with_data(std::slice::from_ref(&flow), Some(port), &data).await;
    let got = written_at_least(&out, 1).await;
    assert_eq!(got[0]["body"], json!([1]));
    assert_eq!(
        got[0]["headers"]["sluice.aggregate.completed_by"],
        "timeout"
    );
    assert_eq!(runtime.shutdown(Duration::from_secs(5)).await, 0);
    assert!(
        stored_groups(&data).await.is_empty(),
        "deleted once delivered"
    );
    assert_eq!(written(&out).len(), 1);
}

#[tokio::test]
async fn an_undelivered_aggregate_stays_stored_and_is_emitted_after_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    // The target fails: the aggregate is nacked and its group must stay.
    let blocked = dir.path().join("not-a-dir");
    std::fs::write(&blocked, "a file where a directory should be").unwrap();
    let failing = blocked.join("aggregates.jsonl");
    let flow = write_flow(&dir, "lines.yaml", &batches(port, &failing, "1h"));
    let runtime = start_with_data(std::slice::from_ref(&flow), Some(port), &data).await;
    send_line(port, "d", 1).await;
    send_line(port, "d", 2).await;
    let last = request(
        "POST",
        &format!("http://127.0.0.1:{port}/lines"),
        json!({"order": "d", "line": 3}).to_string(),
    )
    .await;
    assert!(
        last.status >= 500,
        "the aggregate's target failed: {}",
        last.status
    );
    assert_eq!(runtime.shutdown(Duration::from_secs(5)).await, 0);
    let stored = stored_groups(&data).await;
    assert_eq!(stored.len(), 1, "the undelivered group is kept");
    assert_eq!(stored[0].size, 3);

    let out = dir.path().join("aggregates.jsonl");
    let flow = write_flow(&dir, "lines.yaml", &batches(port, &out, "1h"));
    let runtime = start_with_data(std::slice::from_ref(&flow), Some(port), &data).await;
    let got = written_at_least(&out, 1).await;
    assert_eq!(got[0]["body"], json!([1, 2, 3]));
    assert_eq!(got[0]["headers"]["sluice.aggregate.completed_by"], "size");
    assert_eq!(runtime.shutdown(Duration::from_secs(5)).await, 0);
    assert!(stored_groups(&data).await.is_empty());
}
