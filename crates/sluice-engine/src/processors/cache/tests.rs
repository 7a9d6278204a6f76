use super::*;
use crate::processors::testkit::{build_one, process, try_build};
use serde_json::json;
use sluice_core::{AckToken, ErrorKind, Outcome};

/// A cache keyed by `.k` whose steps answer `{k, v}` from the message (failing when `v` is
/// "bad", dropping the message when `v` is "drop").
fn cache(extra: Value) -> Arc<dyn Processor> {
    let mut config = json!({
        "key": ".k",
        "ttl": "10s",
        "steps": [
            {"filter": ".v != \"drop\""},
            {"transform": "if .v == \"bad\" then error(\"boom\") else {k, v} end"},
            {"set_header": {"name": "x-computed", "value": "yes"}}
        ]
    });
    if let (Some(config), Value::Object(extra)) = (config.as_object_mut(), extra) {
        config.extend(extra);
    }
    build_one("cache", config)
}

async fn run(step: &Arc<dyn Processor>, k: i64, v: &str) -> Message {
    let mut out = process(step, Message::json(json!({"k": k, "v": v})))
        .await
        .unwrap();
    assert_eq!(out.len(), 1);
    out.remove(0)
}

fn v(msg: &Message) -> String {
    msg.body.json().unwrap()["v"].as_str().unwrap().to_owned()
}

#[tokio::test(start_paused = true)]
async fn hits_reuse_the_result_until_it_expires() {
    let step = cache(json!({}));
    let first = run(&step, 1, "first").await;
    assert_eq!(
        (v(&first).as_str(), first.headers[CACHE_HEADER].as_str()),
        ("first", "miss")
    );
    let (token, rx) = AckToken::channel();
    let msg = Message::json(json!({"k": 1, "v": "second"}))
        .with_header("mine", "1")
        .with_ack(token);
    let hit = process(&step, msg).await.unwrap().remove(0);
    assert_eq!(v(&hit), "first");
    assert_eq!(hit.headers[CACHE_HEADER], "hit");
    assert_eq!(hit.headers["mine"], "1");
    assert!(
        !hit.headers.contains_key("x-computed"),
        "headers not listed are not cached"
    );
    hit.ack();
    assert_eq!(rx.await.unwrap(), Outcome::Ack);
    assert_eq!(v(&run(&step, 2, "other key").await), "other key");
    tokio::time::advance(Duration::from_millis(9_999)).await;
    assert_eq!(v(&run(&step, 1, "third").await), "first");
    tokio::time::advance(Duration::from_millis(1)).await;
    let recomputed = run(&step, 1, "fourth").await;
    assert_eq!(v(&recomputed), "fourth");
    assert_eq!(recomputed.headers[CACHE_HEADER], "miss");
}

#[tokio::test]
async fn listed_headers_are_restored_on_a_hit() {
    let step = cache(json!({"headers": ["x-computed", "absent"]}));
    run(&step, 1, "a").await;
    let hit = run(&step, 1, "b").await;
    assert_eq!(hit.headers["x-computed"], "yes");
    assert!(!hit.headers.contains_key("absent"));
}

#[tokio::test]
async fn a_failing_compute_is_not_cached() {
    let step = cache(json!({}));
    let f = process(&step, Message::json(json!({"k": 1, "v": "bad"})))
        .await
        .unwrap_err();
    assert_eq!(f.error.kind, ErrorKind::Expression);
    let next = run(&step, 1, "good").await;
    assert_eq!(
        (v(&next).as_str(), next.headers[CACHE_HEADER].as_str()),
        ("good", "miss")
    );
    assert_eq!(v(&run(&step, 1, "later").await), "good");
}

#[tokio::test]
async fn no_result_is_not_cached() {
    let step = cache(json!({}));
    let (token, rx) = AckToken::channel();
    let dropped = Message::json(json!({"k": 1, "v": "drop"})).with_ack(token);
    assert!(process(&step, dropped).await.unwrap().is_empty());
    assert_eq!(rx.await.unwrap(), Outcome::Ack);
    assert_eq!(
        run(&step, 1, "computed").await.headers[CACHE_HEADER],
        "miss"
    );
}

#[tokio::test]
async fn results_over_max_entry_size_are_not_cached() {
    let step = cache(json!({"max_entry_size": 10}));
    run(&step, 1, "a long value").await;
    assert_eq!(v(&run(&step, 1, "again").await), "again");
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_of_one_key_compute_once() {
    let step = build_one(
        "cache",
        json!({"key": ".k", "steps": [{"delay": "100ms"}, {"transform": "{v}"}]}),
    );
    let start = tokio::time::Instant::now();
    let (a, b, c) = tokio::join!(
        process(&step, Message::json(json!({"k": 1, "v": "a"}))),
        process(&step, Message::json(json!({"k": 1, "v": "b"}))),
        process(&step, Message::json(json!({"k": 2, "v": "c"}))),
    );
    let (a, b, c) = (
        a.unwrap().remove(0),
        b.unwrap().remove(0),
        c.unwrap().remove(0),
    );
    assert_eq!(
        (v(&a).as_str(), a.headers[CACHE_HEADER].as_str()),
        ("a", "miss")
    );
    assert_eq!(
        (v(&b).as_str(), b.headers[CACHE_HEADER].as_str()),
        ("a", "hit")
    );
    assert_eq!(
        (v(&c).as_str(), c.headers[CACHE_HEADER].as_str()),
        ("c", "miss")
    );
    // Both keys were computed in parallel, once each.
    assert_eq!(start.elapsed(), Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn a_waiter_computes_when_the_first_compute_fails() {
    let step = build_one(
        "cache",
        json!({"key": ".k", "steps": [
            {"delay": "100ms"},
            {"transform": "if .v == \"bad\" then error(\"boom\") else {v} end"}
        ]}),
    );
    let (a, b) = tokio::join!(
        process(&step, Message::json(json!({"k": 1, "v": "bad"}))),
        process(&step, Message::json(json!({"k": 1, "v": "good"}))),
    );
    assert!(a.is_err());
    let b = b.unwrap().remove(0);
    assert_eq!(
        (v(&b).as_str(), b.headers[CACHE_HEADER].as_str()),
        ("good", "miss")
    );
}

#[tokio::test]
async fn a_missing_key_is_invalid_input() {
    let step = cache(json!({}));
    let f = process(&step, Message::json(json!({"v": "x"})))
        .await
        .unwrap_err();
    assert_eq!(f.error.kind, ErrorKind::InvalidInput);
}

#[test]
fn zero_ttl_is_a_build_error() {
    let e = try_build("cache", &json!({"key": ".k", "ttl": "0s", "steps": []}))
        .err()
        .unwrap();
    assert_eq!(e.field.as_deref(), Some("ttl"));
}
