//! The `timer` source under tokio's paused clock.

// Test helpers outside #[test] fns may panic on a broken fixture: that is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::needless_pass_by_value
)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::json;
use sluice_core::{ExchangePattern, Message, Resources};
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn interval_with_count_ticks_and_stops() {
    let res = Arc::new(Resources::default());
    let source = build_source(
        "timer",
        json!({"interval": "1s", "count": 3, "body": {"job": "sync"}}),
        &res,
    )
    .unwrap();
    let dispatch = TestDispatch::echo();
    let (ctx, _shutdown) = source_ctx(dispatch.clone(), &res, "cron-flow");
    let start = Instant::now();
    source.run(ctx).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    let seen = dispatch.seen();
    let ticks: Vec<&str> = seen
        .iter()
        .map(|m| m.headers["timer.tick"].as_str())
        .collect();
    assert_eq!(ticks, ["1", "2", "3"]);
    for m in &seen {
        assert_eq!(m.pattern, ExchangePattern::InOnly);
        assert_eq!(m.body.json().unwrap(), &json!({"job": "sync"}));
        assert!(chrono::DateTime::parse_from_rfc3339(&m.headers["timer.fired_at"]).is_ok());
        assert_eq!(m.meta.origin.as_deref(), Some("cron-flow"));
    }
}

#[tokio::test(start_paused = true)]
async fn slow_ticks_do_not_overlap_and_missed_ticks_are_skipped() {
    let res = Arc::new(Resources::default());
    let source = build_source("timer", json!({"interval": "1s", "count": 3}), &res).unwrap();
    let starts: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let record = Arc::clone(&starts);
    let begin = Instant::now();
    let dispatch = TestDispatch::new(move |m: Message| {
        record.lock().unwrap().push(Instant::now());
        async move {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            m.ack();
            Ok(vec![])
        }
    });
    let (ctx, _shutdown) = source_ctx(dispatch, &res, "f");
    source.run(ctx).await.unwrap();
    let offsets: Vec<u128> = starts
        .lock()
        .unwrap()
        .iter()
        .map(|t| (*t - begin).as_millis())
        .collect();
    // Runs end at 3.5s and 6.5s; the next ticks are the next whole seconds, not a burst.
    assert_eq!(offsets, [1000, 4000, 7000]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_the_timer() {
    let res = Arc::new(Resources::default());
    let source = build_source("timer", json!({"interval": "1h"}), &res).unwrap();
    let dispatch = TestDispatch::echo();
    let (ctx, shutdown) = source_ctx(dispatch.clone(), &res, "f");
    let task = tokio::spawn(source.run(ctx));
    tokio::time::sleep(Duration::from_secs(3 * 3600 + 1)).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(dispatch.count(), 3);
}

#[test]
fn schedule_errors_are_build_errors() {
    let res = Arc::new(Resources::default());
    let err = build_err(build_source("timer", json!({"cron": "61 * * * *"}), &res));
    assert_eq!(err.field.as_deref(), Some("cron"));
    assert!(err.message.contains("61 * * * *"), "{}", err.message);
    let err = build_err(build_source(
        "timer",
        json!({"interval": "1s", "cron": "* * * * *"}),
        &res,
    ));
    assert!(err.message.contains("exactly one"), "{}", err.message);
    let err = build_err(build_source("timer", json!({}), &res));
    assert!(err.message.contains("neither"), "{}", err.message);
    assert!(build_source("timer", json!({"cron": "*/10 * * * * *"}), &res).is_ok());
}
