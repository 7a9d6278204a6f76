//! Acknowledgement across fan-out: a source message is acked exactly once, only when every piece
//! of work derived from it is done (multicast branches, recipient flows, filtered parts), and
//! nacked when any of it fails terminally. Whole flows, built from YAML and run by the runtime.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sluice_core::{AckToken, Dispatch, ErrorKind, Message, Outcome, Registry, Resources};
use sluice_engine::runtime::Runtime;
use tokio::sync::mpsc;

const FLOWS: &str = r#"
flows:
  - name: fan
    from: { channel: fan-in }
    steps:
      - filter: '.drop | not'
      - multicast:
          branches:
            - - filter: '.keep'
            - - recipient_list: { expression: '.notify' }
            - - transform: 'if .fail then error("branch failed") else {priced: true} end'
          aggregate: '{kept: .[0], priced: .[2].priced}'

  - name: audit
    from: { channel: audit }
    steps:
      - delay: 1s
      - transform: 'if .audit_fails then error("audit rejected it") else . end'
"#;

/// The runtime of [`FLOWS`].
async fn start() -> Runtime {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flows.yaml");
    std::fs::write(&path, FLOWS).unwrap();
    let mut registry = Registry::new();
    sluice_engine::register_all(&mut registry);
    let project = sluice_engine::config::load(&[path], &registry).unwrap();
    let topology =
        sluice_engine::build::build(&project, &registry, Arc::new(Resources::default())).unwrap();
    Runtime::start(topology)
}

/// A token that reports every outcome it delivers, to check it is delivered once.
fn counted() -> (AckToken, mpsc::UnboundedReceiver<Outcome>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (AckToken::with_callback(move |o| tx.send(o).unwrap()), rx)
}

async fn outcome_once(rx: &mut mpsc::UnboundedReceiver<Outcome>) -> Outcome {
    let outcome = rx.recv().await.unwrap();
    // The tracker is gone once it reported: no second outcome can come.
    assert!(rx.recv().await.is_none(), "a second outcome");
    outcome
}

async fn send(
    runtime: &Runtime,
    body: serde_json::Value,
) -> (
    Result<Vec<Message>, sluice_core::Failure>,
    mpsc::UnboundedReceiver<Outcome>,
) {
    let (token, rx) = counted();
    let result = runtime
        .flow("fan")
        .unwrap()
        .dispatch(Message::json(body).with_ack(token))
        .await;
    (result, rx)
}

#[tokio::test(start_paused = true)]
async fn acked_once_after_the_recipient_flow_is_done() {
    let runtime = start().await;
    let started = tokio::time::Instant::now();
    let (result, mut rx) = send(&runtime, json!({"keep": false, "notify": ["audit"]})).await;
    let replies = result.unwrap();
    assert_eq!(
        replies[0].body.json().unwrap(),
        &json!({"kept": null, "priced": true})
    );
    // The fan flow is done; the audit flow still holds its copy for a second.
    assert!(
        rx.try_recv().is_err(),
        "acked before the audit flow finished"
    );
    assert_eq!(outcome_once(&mut rx).await, Outcome::Ack);
    assert!(started.elapsed() >= Duration::from_secs(1));
    runtime.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn nacked_when_the_recipient_flow_fails() {
    let runtime = start().await;
    let (result, mut rx) = send(
        &runtime,
        json!({"keep": true, "notify": "audit", "audit_fails": true}),
    )
    .await;
    // The fan flow itself succeeded: the failure is downstream, in another flow.
    assert_eq!(result.unwrap().len(), 1);
    match outcome_once(&mut rx).await {
        Outcome::Nack(reason) => assert!(reason.contains("audit rejected it"), "{reason}"),
        Outcome::Ack => panic!("acked although the audit flow failed"),
    }
    runtime.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn nacked_once_when_a_branch_fails() {
    let runtime = start().await;
    let (result, mut rx) = send(
        &runtime,
        json!({"keep": true, "notify": null, "fail": true}),
    )
    .await;
    let failure = result.unwrap_err();
    assert_eq!(failure.error.kind, ErrorKind::Expression);
    assert!(
        failure.error.detail.contains("branch 2"),
        "{}",
        failure.error
    );
    match outcome_once(&mut rx).await {
        Outcome::Nack(reason) => assert!(reason.contains("branch failed"), "{reason}"),
        Outcome::Ack => panic!("acked although a branch failed"),
    }
    runtime.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn a_filtered_message_is_acked_once() {
    let runtime = start().await;
    let (result, mut rx) = send(&runtime, json!({"drop": true, "notify": ["audit"]})).await;
    assert!(result.unwrap().is_empty());
    assert_eq!(outcome_once(&mut rx).await, Outcome::Ack);
    runtime.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn a_channel_nobody_reads_fails_at_once_naming_it() {
    let runtime = start().await;
    let (result, mut rx) = send(&runtime, json!({"keep": true, "notify": ["audti"]})).await;
    let failure = result.unwrap_err();
    assert_eq!(failure.error.kind, ErrorKind::Unavailable);
    assert!(
        failure.error.detail.contains("`audti`"),
        "{}",
        failure.error
    );
    assert!(matches!(outcome_once(&mut rx).await, Outcome::Nack(_)));
    runtime.shutdown(Duration::from_secs(5)).await;
}

/// Regression (issue 4): a step that keeps its downstream (an aggregator) used to hold its own
/// pipeline through it, so a stopped flow was never dropped and the messages of its open groups
/// were never nacked (nor the durable store closed). Now they are nacked once the runtime is gone.
#[tokio::test]
async fn the_open_groups_of_a_stopped_flow_are_nacked_when_it_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flows.yaml");
    std::fs::write(
        &path,
        r#"
flows:
  - name: batch
    from: { channel: batch-in }
    steps:
      - aggregate: { correlation: '.k', size: 2 }
  # Only so that something may write to `batch-in` (a recipient list names channels at run time).
  - name: feed
    from: { channel: feed-in }
    steps:
      - recipient_list: { expression: '["batch-in"]' }
"#,
    )
    .unwrap();
    let mut registry = Registry::new();
    sluice_engine::register_all(&mut registry);
    let project = sluice_engine::config::load(&[path], &registry).unwrap();
    let topology =
        sluice_engine::build::build(&project, &registry, Arc::new(Resources::default())).unwrap();
    let runtime = Runtime::start(topology);
    let (token, mut rx) = counted();
    let flow = runtime.flow("batch").unwrap();
    let held = flow
        .dispatch(Message::json(json!({"k": "a"})).with_ack(token))
        .await
        .unwrap();
    assert!(held.is_empty(), "the group is not complete");
    assert!(rx.try_recv().is_err(), "resolved while its group is open");
    drop(flow);
    runtime.shutdown(Duration::from_secs(1)).await;
    let outcome = tokio::time::timeout(Duration::from_secs(5), outcome_once(&mut rx))
        .await
        .expect("the open group's message was never resolved: the flow leaked");
    assert!(matches!(outcome, Outcome::Nack(_)), "{outcome:?}");
}
