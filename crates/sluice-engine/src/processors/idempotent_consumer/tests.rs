use std::sync::Mutex;

use super::*;
use crate::processors::testkit::{build_one, process, try_build};
use serde_json::json;
use tokio::sync::oneshot;

/// A source acknowledgement that records every outcome it is told.
fn recorded() -> (AckToken, Arc<Mutex<Vec<Outcome>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let token = AckToken::with_callback(move |o| sink.lock().unwrap().push(o));
    (token, seen)
}

fn order(id: i64) -> (Message, oneshot::Receiver<Outcome>) {
    let (token, rx) = AckToken::channel();
    (Message::json(json!({"id": id})).with_ack(token), rx)
}

/// Runs one message; `Some(output)` if it passed, `None` if it was dropped.
async fn pass(step: &Arc<dyn Processor>, msg: Message) -> Option<Message> {
    let mut out = process(step, msg).await.unwrap();
    assert!(out.len() <= 1);
    out.pop()
}

#[tokio::test]
async fn eager_duplicates_in_flight_are_dropped_and_acked_once() {
    let step = build_one("idempotent_consumer", json!(".id"));
    let (first, first_rx) = order(1);
    let first = pass(&step, first).await.expect("first passes");
    // The first copy is still in flight: the second is already a duplicate.
    let (token, seen) = recorded();
    let dup = Message::json(json!({"id": 1})).with_ack(token);
    assert!(pass(&step, dup).await.is_none());
    assert_eq!(*seen.lock().unwrap(), vec![Outcome::Ack]);
    // Another key is independent.
    let (other, _rx) = order(2);
    assert!(pass(&step, other).await.is_some());
    first.ack();
    assert_eq!(first_rx.await.unwrap(), Outcome::Ack);
    let (again, again_rx) = order(1);
    assert!(pass(&step, again).await.is_none());
    assert_eq!(again_rx.await.unwrap(), Outcome::Ack);
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "the duplicate was told twice"
    );
}

/// The key is recorded by a task spawned from the acknowledgement; a copy arriving before that
/// task runs (a client retrying the moment it got its reply) is still a duplicate.
#[tokio::test(flavor = "current_thread")]
async fn on_completion_a_copy_right_after_the_ack_is_a_duplicate() {
    let step = build_one("idempotent_consumer", json!({"key": ".id", "eager": false}));
    let (first, _first_rx) = order(7);
    pass(&step, first).await.expect("first passes").ack();
    // No yield since the ack: on this single-threaded runtime the recording task has not run.
    let (copy, copy_rx) = order(7);
    assert!(
        pass(&step, copy).await.is_none(),
        "a duplicate, not a second pass"
    );
    assert_eq!(copy_rx.await.unwrap(), Outcome::Ack);
}

#[tokio::test]
async fn on_completion_lets_copies_in_flight_through_then_records_the_key() {
    let step = build_one("idempotent_consumer", json!({"key": ".id", "eager": false}));
    let (first, first_rx) = order(1);
    let first = pass(&step, first).await.expect("first passes");
    let (second, second_rx) = order(1);
    let second = pass(&step, second).await.expect("not recorded yet: passes");
    first.ack();
    assert_eq!(first_rx.await.unwrap(), Outcome::Ack);
    let (third, third_rx) = order(1);
    assert!(pass(&step, third).await.is_none(), "recorded on completion");
    assert_eq!(third_rx.await.unwrap(), Outcome::Ack);
    // A failing copy in this mode releases nothing: the key recorded by the first stays.
    second.nack("target down");
    assert_eq!(
        second_rx.await.unwrap(),
        Outcome::Nack("target down".into())
    );
    let (fourth, _rx) = order(1);
    assert!(pass(&step, fourth).await.is_none());
}

#[tokio::test]
async fn a_nack_releases_the_key_so_the_redelivery_passes() {
    for eager in [true, false] {
        let step = build_one("idempotent_consumer", json!({"key": ".id", "eager": eager}));
        let (first, rx) = order(7);
        let first = pass(&step, first).await.unwrap();
        first.nack("sink refused");
        // The source sees the very outcome the flow gave, reason included.
        assert_eq!(rx.await.unwrap(), Outcome::Nack("sink refused".into()));
        let (redelivered, rx) = order(7);
        let redelivered = pass(&step, redelivered).await;
        assert!(redelivered.is_some(), "eager={eager}: redelivery dropped");
        redelivered.unwrap().ack();
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
    }
}

#[tokio::test]
async fn a_message_dropped_unresolved_releases_the_key() {
    let step = build_one("idempotent_consumer", json!(".id"));
    let (first, rx) = order(1);
    drop(pass(&step, first).await.unwrap());
    assert!(matches!(rx.await.unwrap(), Outcome::Nack(_)));
    let (again, _rx) = order(1);
    assert!(pass(&step, again).await.is_some());
}

#[tokio::test]
async fn every_share_of_a_split_must_complete_before_the_key_is_confirmed() {
    let step = build_one("idempotent_consumer", json!(".id"));
    let (first, rx) = order(1);
    let first = pass(&step, first).await.unwrap();
    let copy = first.clone();
    first.ack();
    copy.nack("one branch failed");
    assert_eq!(rx.await.unwrap(), Outcome::Nack("one branch failed".into()));
    let (again, _rx) = order(1);
    assert!(pass(&step, again).await.is_some());
}

#[tokio::test(start_paused = true)]
async fn keys_expire_after_their_ttl() {
    let step = build_one("idempotent_consumer", json!({"key": ".id", "ttl": "10s"}));
    let (first, rx) = order(1);
    pass(&step, first).await.unwrap().ack();
    rx.await.unwrap();
    tokio::time::advance(Duration::from_millis(9_999)).await;
    let (early, _rx) = order(1);
    assert!(pass(&step, early).await.is_none());
    tokio::time::advance(Duration::from_millis(1)).await;
    let (late, _rx) = order(1);
    assert!(pass(&step, late).await.is_some());
}

#[tokio::test]
async fn duplicates_can_fail_or_be_marked() {
    let step = build_one(
        "idempotent_consumer",
        json!({"key": ".id", "on_duplicate": "fail"}),
    );
    let _first = pass(&step, order(1).0).await.unwrap();
    let f = process(&step, Message::json(json!({"id": 1})))
        .await
        .unwrap_err();
    assert_eq!(f.error.kind, ErrorKind::Rejected);
    assert!(f.error.detail.contains("key `1`"), "{}", f.error);
    assert_eq!(f.message.body.json().unwrap(), &json!({"id": 1}));

    let step = build_one(
        "idempotent_consumer",
        json!({"key": ".id", "on_duplicate": "mark"}),
    );
    let first = pass(&step, order(1).0).await.unwrap();
    assert!(!first.headers.contains_key(DUPLICATE_HEADER));
    let dup = pass(&step, order(1).0)
        .await
        .expect("marked duplicates pass");
    assert_eq!(dup.headers[DUPLICATE_HEADER], "true");
}

#[tokio::test]
async fn a_missing_key_is_invalid_input() {
    let step = build_one("idempotent_consumer", json!(".id"));
    let f = process(&step, Message::json(json!({"other": 1})))
        .await
        .unwrap_err();
    assert_eq!(f.error.kind, ErrorKind::InvalidInput);
    assert!(f.error.detail.contains("gave null"), "{}", f.error);
    assert_eq!(f.message.body.json().unwrap(), &json!({"other": 1}));
}

#[tokio::test]
async fn steps_naming_one_repository_share_it() {
    // Both branches are built by one builder, so they see the same resources.
    let shared = |name: &str| json!({"idempotent_consumer": {"key": ".id", "repository": name}});
    let step = build_one(
        "choice",
        json!({"when": [{"condition": ".left", "steps": [shared("r")]}],
               "otherwise": [shared("r")]}),
    );
    let _first = pass(&step, Message::json(json!({"id": 1, "left": true}))).await;
    let right = pass(&step, Message::json(json!({"id": 1, "left": false}))).await;
    assert!(
        right.is_none(),
        "the other branch's repository did not see the key"
    );

    let private = json!({"idempotent_consumer": {"key": ".id"}});
    let step = build_one(
        "choice",
        json!({"when": [{"condition": ".left", "steps": [private.clone()]}],
               "otherwise": [private]}),
    );
    let _first = pass(&step, Message::json(json!({"id": 1, "left": true}))).await;
    assert!(
        pass(&step, Message::json(json!({"id": 1, "left": false})))
            .await
            .is_some()
    );
}

#[test]
fn zero_ttl_is_a_build_error() {
    let e = try_build("idempotent_consumer", &json!({"key": ".id", "ttl": "0s"}))
        .err()
        .unwrap();
    assert_eq!(e.field.as_deref(), Some("ttl"));
}

#[test]
fn a_backend_must_name_one_store_this_build_has() {
    let unknown = try_build(
        "idempotent_consumer",
        &json!({"key": ".id", "backend": {"redis": {}}}),
    )
    .err()
    .unwrap();
    assert_eq!(unknown.field.as_deref(), Some("backend"));
    assert!(
        unknown.message.contains("unknown store `redis`"),
        "{unknown}"
    );
    let two = try_build(
        "idempotent_consumer",
        &json!({"key": ".id", "backend": {"redis": {}, "nats_kv": {}}}),
    )
    .err()
    .unwrap();
    assert!(two.message.contains("exactly one store"), "{two}");
}
