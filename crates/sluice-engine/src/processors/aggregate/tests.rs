use std::time::Duration;

use super::*;
use crate::processors::testkit::{build_one, build_with_downstream, process, try_build};
use serde_json::json;
use sluice_core::{AckToken, Outcome};
use tokio::sync::oneshot;

/// A message with body `body` and key header `k`, and the receiver of its outcome.
fn keyed(key: &str, body: Value) -> (Message, oneshot::Receiver<Outcome>) {
    let (token, rx) = AckToken::channel();
    (
        Message::json(body).with_header("k", key).with_ack(token),
        rx,
    )
}

fn unresolved(rx: &mut oneshot::Receiver<Outcome>) -> bool {
    matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty))
}

#[tokio::test]
async fn size_completes_the_group_and_its_inputs_are_acked_with_the_aggregate() {
    let step = build_one("aggregate", json!({"correlation": "$headers.k", "size": 3}));
    let mut receivers = Vec::new();
    for n in 1..=2 {
        let (msg, rx) = keyed("a", json!(n));
        assert!(process(&step, msg).await.unwrap().is_empty());
        receivers.push(rx);
    }
    // Another key has its own group.
    let (other, mut other_rx) = keyed("b", json!(99));
    assert!(process(&step, other).await.unwrap().is_empty());
    for rx in &mut receivers {
        assert!(unresolved(rx), "an input was resolved before the aggregate");
    }
    let (last, rx) = keyed("a", json!(3));
    receivers.push(rx);
    let out = process(&step, last).await.unwrap();
    assert_eq!(out.len(), 1);
    let aggregate = out.into_iter().next().unwrap();
    assert_eq!(aggregate.body.json().unwrap(), &json!([1, 2, 3]));
    assert_eq!(aggregate.headers[COMPLETED_BY_HEADER], "size");
    assert_eq!(aggregate.headers[SIZE_OF_GROUP_HEADER], "3");
    assert_eq!(aggregate.headers[KEY_HEADER], "a");
    assert_eq!(aggregate.headers["k"], "a");
    assert_eq!(aggregate.ack_count(), 3);
    for rx in &mut receivers {
        assert!(unresolved(rx), "acked before the aggregate was committed");
    }
    aggregate.ack();
    for rx in receivers {
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
    }
    assert!(unresolved(&mut other_rx));
}

#[tokio::test]
async fn a_failed_aggregate_nacks_every_input() {
    let step = build_one("aggregate", json!({"correlation": "$headers.k", "size": 2}));
    let (a, rx_a) = keyed("x", json!(1));
    let (b, rx_b) = keyed("x", json!(2));
    process(&step, a).await.unwrap();
    let aggregate = process(&step, b).await.unwrap().pop().unwrap();
    aggregate.nack("target down");
    assert_eq!(rx_a.await.unwrap(), Outcome::Nack("target down".into()));
    assert_eq!(rx_b.await.unwrap(), Outcome::Nack("target down".into()));
}

#[tokio::test]
async fn a_failing_aggregation_hands_back_the_group_to_be_nacked() {
    let step = build_one(
        "aggregate",
        json!({"correlation": "$headers.k", "size": 2, "aggregation": "map(.n) | add | error"}),
    );
    let (a, rx_a) = keyed("x", json!({"n": 1}));
    let (b, rx_b) = keyed("x", json!({"n": 2}));
    process(&step, a).await.unwrap();
    let failure = process(&step, b).await.unwrap_err();
    assert_eq!(failure.error.kind, ErrorKind::Expression);
    assert_eq!(
        failure.message.ack_count(),
        2,
        "the failure holds every input"
    );
    failure.message.nack("aggregation failed");
    assert!(matches!(rx_a.await.unwrap(), Outcome::Nack(_)));
    assert!(matches!(rx_b.await.unwrap(), Outcome::Nack(_)));
}

#[tokio::test(start_paused = true)]
async fn timeout_completes_a_quiet_group_through_downstream() {
    let (step, downstream) = build_with_downstream(
        "aggregate",
        json!({"correlation": "$headers.k", "timeout": "5s"}),
    );
    let (first, mut rx1) = keyed("a", json!(1));
    assert!(process(&step, first).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (second, mut rx2) = keyed("a", json!(2));
    assert!(process(&step, second).await.unwrap().is_empty());
    // 8s after the first message but only 4s after the last: still open.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(downstream.take().is_empty(), "completed while still active");
    tokio::time::sleep(Duration::from_millis(1001)).await;
    let emitted = downstream.take();
    assert_eq!(emitted.len(), 1);
    assert_eq!(emitted[0].body.json().unwrap(), &json!([1, 2]));
    assert_eq!(emitted[0].headers[COMPLETED_BY_HEADER], "timeout");
    assert!(unresolved(&mut rx1) && unresolved(&mut rx2));
    emitted.into_iter().for_each(Message::ack);
    assert_eq!(rx1.await.unwrap(), Outcome::Ack);
    assert_eq!(rx2.await.unwrap(), Outcome::Ack);
}

#[tokio::test(start_paused = true)]
async fn timeout_completes_a_group_of_one_and_a_new_group_starts_after() {
    let (step, downstream) = build_with_downstream(
        "aggregate",
        json!({"correlation": "$headers.k", "timeout": "1s", "aggregation": "length"}),
    );
    let (msg, rx) = keyed("solo", json!("x"));
    process(&step, msg).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1001)).await;
    let emitted = downstream.take();
    assert_eq!(emitted.len(), 1);
    assert_eq!(emitted[0].body.json().unwrap(), &json!(1));
    emitted.into_iter().for_each(Message::ack);
    assert_eq!(rx.await.unwrap(), Outcome::Ack);
    // The same key again opens a fresh group with its own timer.
    let (msg, _rx) = keyed("solo", json!("y"));
    process(&step, msg).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1001)).await;
    assert_eq!(downstream.take().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn interval_completes_every_open_group_at_each_tick() {
    let (step, downstream) = build_with_downstream(
        "aggregate",
        json!({"correlation": "$headers.k", "interval": "1s"}),
    );
    for (k, n) in [("a", 1), ("b", 2), ("a", 3)] {
        let (msg, _rx) = keyed(k, json!(n));
        process(&step, msg).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1001)).await;
    let mut emitted = downstream.take();
    emitted.sort_by_key(|m| m.headers[KEY_HEADER].clone());
    let bodies: Vec<Value> = emitted
        .iter()
        .map(|m| m.body.json().unwrap().clone())
        .collect();
    assert_eq!(bodies, [json!([1, 3]), json!([2])]);
    assert!(
        emitted
            .iter()
            .all(|m| m.headers[COMPLETED_BY_HEADER] == "interval")
    );
    // Nothing open, nothing emitted at the next tick.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(downstream.take().is_empty());
}

#[tokio::test]
async fn predicate_completes_on_the_aggregated_value() {
    let step = build_one(
        "aggregate",
        json!({
            "correlation": ".sensor",
            "aggregation": "{sensor: .[0].sensor, total: (map(.v) | add)}",
            "predicate": ".total >= 10"
        }),
    );
    for v in [3, 4] {
        let out = process(&step, Message::json(json!({"sensor": "s1", "v": v})))
            .await
            .unwrap();
        assert!(out.is_empty());
    }
    let out = process(&step, Message::json(json!({"sensor": "s1", "v": 5})))
        .await
        .unwrap();
    assert_eq!(
        out[0].body.json().unwrap(),
        &json!({"sensor": "s1", "total": 12})
    );
    assert_eq!(out[0].headers[COMPLETED_BY_HEADER], "predicate");
}

#[tokio::test]
async fn split_parts_are_reassembled_in_index_order_and_ack_the_source() {
    let split = build_one("split", json!({}));
    let aggregate = build_one(
        "aggregate",
        json!({"on_split_complete": true, "aggregation": "map(. * 10)"}),
    );
    let (token, rx) = AckToken::channel();
    let source = Message::json(json!([1, 2, 3]))
        .with_header("h", "kept")
        .with_ack(token);
    let mut parts = process(&split, source).await.unwrap();
    parts.reverse();
    let mut outputs = Vec::new();
    for part in parts {
        outputs.extend(process(&aggregate, part).await.unwrap());
    }
    assert_eq!(outputs.len(), 1, "one aggregate, after the last part");
    let whole = outputs.pop().unwrap();
    assert_eq!(whole.body.json().unwrap(), &json!([10, 20, 30]));
    assert_eq!(whole.headers[COMPLETED_BY_HEADER], "split");
    assert_eq!(whole.headers["h"], "kept");
    assert!(!whole.headers.contains_key(INDEX_HEADER));
    assert!(!whole.headers.contains_key(LAST_HEADER));
    whole.ack();
    assert_eq!(rx.await.unwrap(), Outcome::Ack);
}

#[tokio::test]
async fn the_last_part_tells_the_size_when_the_size_header_is_missing() {
    let aggregate = build_one("aggregate", json!({"on_split_complete": true}));
    let part = |i: usize, last: bool| {
        let mut m = Message::json(json!(i))
            .with_header(CORRELATION_HEADER, "s")
            .with_header(INDEX_HEADER, i.to_string());
        if last {
            m = m.with_header(LAST_HEADER, "true");
        }
        m
    };
    assert!(process(&aggregate, part(2, true)).await.unwrap().is_empty());
    assert!(
        process(&aggregate, part(0, false))
            .await
            .unwrap()
            .is_empty()
    );
    let out = process(&aggregate, part(1, false)).await.unwrap();
    assert_eq!(out[0].body.json().unwrap(), &json!([0, 1, 2]));
}

#[tokio::test]
async fn limits_reject_or_complete() {
    let step = build_one(
        "aggregate",
        json!({"correlation": "$headers.k", "size": 10, "max_groups": 1}),
    );
    let (a, _rx) = keyed("a", json!(1));
    process(&step, a).await.unwrap();
    let (b, _rx) = keyed("b", json!(1));
    let f = process(&step, b).await.unwrap_err();
    assert_eq!(f.error.kind, ErrorKind::Unavailable);
    assert!(f.error.detail.contains("max_groups"), "{}", f.error);
    assert_eq!(f.message.headers["k"], "b", "the message is handed back");

    let step = build_one(
        "aggregate",
        json!({"correlation": "$headers.k", "size": 10, "max_group_size": 2}),
    );
    for n in 1..=2 {
        let (m, _rx) = keyed("a", json!(n));
        let out = process(&step, m).await.unwrap();
        if n == 2 {
            assert_eq!(out[0].headers[COMPLETED_BY_HEADER], "max_group_size");
        }
    }

    let step = build_one(
        "aggregate",
        json!({"correlation": "$headers.k", "size": 10, "max_group_size": 2,
               "on_max_group_size": "fail"}),
    );
    for n in 1..=2 {
        let (m, _rx) = keyed("a", json!(n));
        assert!(process(&step, m).await.unwrap().is_empty());
    }
    let (m, _rx) = keyed("a", json!(3));
    let f = process(&step, m).await.unwrap_err();
    assert_eq!(f.error.kind, ErrorKind::Rejected);
    assert_eq!(f.message.ack_count(), 1, "only the extra message fails");
}

#[tokio::test]
async fn a_message_without_a_key_is_invalid_input() {
    let step = build_one("aggregate", json!({"size": 2}));
    let f = process(&step, Message::json(json!(1))).await.unwrap_err();
    assert_eq!(f.error.kind, ErrorKind::InvalidInput);
    assert!(f.error.detail.contains("correlation"), "{}", f.error);
}

#[tokio::test]
async fn bodies_that_are_not_json_enter_as_text() {
    let step = build_one("aggregate", json!({"correlation": "\"all\"", "size": 2}));
    process(&step, Message::bytes(&b"<a/>"[..])).await.unwrap();
    let out = process(&step, Message::json(json!({"b": 1})))
        .await
        .unwrap();
    assert_eq!(out[0].body.json().unwrap(), &json!(["<a/>", {"b": 1}]));
}

#[test]
fn a_completion_condition_is_required() {
    let e = try_build("aggregate", &json!({"correlation": ".k"}))
        .err()
        .unwrap();
    assert!(e.message.contains("completion condition"), "{e}");
    let e = try_build("aggregate", &json!({"timeout": "0s"}))
        .err()
        .unwrap();
    assert_eq!(e.field.as_deref(), Some("timeout"));
}

#[tokio::test(start_paused = true)]
async fn every_input_is_acked_exactly_once_after_the_downstream_commit() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (step, downstream) = build_with_downstream(
        "aggregate",
        json!({"correlation": "$headers.k", "size": 2, "timeout": "1s"}),
    );
    let acks: Arc<Vec<AtomicUsize>> = Arc::new((0..3).map(|_| AtomicUsize::new(0)).collect());
    let counted = |i: usize, key: &str| {
        let acks = Arc::clone(&acks);
        let token = AckToken::with_callback(move |outcome| {
            assert_eq!(outcome, Outcome::Ack);
            acks[i].fetch_add(1, Ordering::SeqCst);
        });
        Message::json(json!(i))
            .with_header("k", key)
            .with_ack(token)
    };
    // Two complete by size (an output), the third by its timeout (downstream).
    process(&step, counted(0, "a")).await.unwrap();
    process(&step, counted(2, "b")).await.unwrap();
    let by_size = process(&step, counted(1, "a")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1001)).await;
    let by_timer = downstream.take();
    assert_eq!((by_size.len(), by_timer.len()), (1, 1));
    let seen = || {
        acks.iter()
            .map(|a| a.load(Ordering::SeqCst))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        seen(),
        [0, 0, 0],
        "nothing is acked before the aggregates commit"
    );
    by_size.into_iter().for_each(Message::ack);
    assert_eq!(seen(), [1, 1, 0]);
    by_timer.into_iter().for_each(Message::ack);
    assert_eq!(seen(), [1, 1, 1]);
}

/// Resources whose durable store is in memory: steps built on them share it, as the steps of two
/// runs share the data directory.
fn stored_resources() -> Arc<sluice_core::Resources> {
    let resources = Arc::new(sluice_core::Resources::default());
    resources
        .get_or_default::<crate::durable::DurableStore>()
        .use_memory();
    resources
}

fn stored_groups(resources: &sluice_core::Resources) -> Vec<sluice_store::StoredGroup> {
    resources
        .get_or_default::<crate::durable::DurableStore>()
        .store()
        .unwrap()
        .aggregation_groups("test/aggregate")
        .groups()
        .unwrap()
}

#[tokio::test]
async fn stored_groups_ack_inputs_once_stored_and_are_reloaded_before_the_next_message() {
    use crate::processors::testkit::build_with_resources;
    let resources = stored_resources();
    let config = json!({"correlation": "$headers.k", "size": 3, "backend": {"store": {}}});
    let first_run = build_with_resources("aggregate", config.clone(), &resources);
    for n in 1..=2 {
        let (msg, rx) = keyed("a", json!(n));
        assert!(process(&first_run, msg).await.unwrap().is_empty());
        assert_eq!(rx.await.unwrap(), Outcome::Ack, "acked once stored");
    }
    drop(first_run);
    assert_eq!(stored_groups(&resources)[0].size, 2);

    // The next run's first message joins the stored group: the reload comes before it.
    let second_run = build_with_resources("aggregate", config, &resources);
    let (last, rx) = keyed("a", json!(3));
    let out = process(&second_run, last).await.unwrap();
    assert_eq!(rx.await.unwrap(), Outcome::Ack);
    assert_eq!(out.len(), 1);
    let aggregate = out.into_iter().next().unwrap();
    assert_eq!(aggregate.body.json().unwrap(), &json!([1, 2, 3]));
    assert_eq!(aggregate.headers[COMPLETED_BY_HEADER], "size");
    assert_eq!(aggregate.headers["k"], "a", "the first message's headers");
    assert_eq!(stored_groups(&resources).len(), 1, "kept until delivered");
    aggregate.ack();
    for _ in 0..200 {
        if stored_groups(&resources).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the delivered group was not deleted");
}

#[tokio::test]
async fn a_stored_group_that_fails_to_aggregate_carries_its_bodies_and_stays_on_a_nack() {
    use crate::processors::testkit::build_with_resources;
    let resources = stored_resources();
    let config = json!({
        "correlation": "$headers.k",
        "size": 2,
        "aggregation": "error(\"no\")",
        "backend": {"store": {}}
    });
    let step = build_with_resources("aggregate", config, &resources);
    let (one, _) = keyed("a", json!(1));
    assert!(process(&step, one).await.unwrap().is_empty());
    let (two, _) = keyed("a", json!("two"));
    let failure = process(&step, two).await.unwrap_err();
    assert_eq!(failure.message.body.json().unwrap(), &json!([1, "two"]));
    failure.message.nack("nobody took it");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(stored_groups(&resources).len(), 1, "a nacked group stays");
}

#[test]
fn a_backend_other_than_the_store_is_a_build_error() {
    let e = try_build("aggregate", &json!({"size": 2, "backend": {"redis": {}}}))
        .err()
        .unwrap();
    assert_eq!(e.field.as_deref(), Some("backend"));
    assert!(e.message.contains("backend: {store: {}}"), "{e}");
}
