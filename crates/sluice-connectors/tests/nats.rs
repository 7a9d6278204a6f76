//! The NATS connectors (`nats`, `jetstream`, KV store) against a real nats-server with
//! JetStream on 127.0.0.1:4222.
#![cfg(feature = "nats")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::needless_pass_by_value,
    clippy::result_large_err
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;
use sluice_connectors::nats::kv::{KvOptions, NatsKv};
use sluice_core::state::{CacheStore, CachedValue, Claim, IdempotentRepository};
use sluice_core::{
    Body, ComponentHealth, ErrorKind, Failure, HealthHandle, Message, ProcessError, Resources,
};
use sluice_testkit::unique;

const ADDR: &str = "127.0.0.1:4222";

async fn up() -> bool {
    sluice_testkit::service("NATS", ADDR).await
}

fn resources() -> Arc<Resources> {
    Arc::new(Resources::default())
}

/// Waits until `cond` holds, for at most 10 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn failing(m: Message, why: &str) -> Result<Vec<Message>, Failure> {
    let detail = why.to_owned();
    m.nack(&detail);
    Err(Failure::new(
        Message::bytes(""),
        ProcessError::new(ErrorKind::Remote, detail),
    ))
}

#[tokio::test]
async fn core_publish_reaches_a_subscriber_with_headers_in_order() {
    if !up().await {
        return;
    }
    let res = resources();
    let subject = unique("it.core");
    let dispatch = TestDispatch::echo();
    let source = build_source("nats", json!({"subject": format!("{subject}.*")}), &res).unwrap();
    let (ctx, shutdown) = source_ctx(dispatch.clone(), &res, "core");
    let task = tokio::spawn(source.run(ctx));
    // The subscription is made asynchronously: publish until the first message arrives.
    let sink = build_sink(
        "nats",
        json!({"subject": format!("{subject}.{{kind}}")}),
        &res,
    )
    .unwrap();
    let probe = Message::bytes("probe").with_header("kind", "probe");
    for _ in 0..200 {
        sink.deliver(&probe).await.unwrap();
        if dispatch.count() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..5 {
        let msg = Message::json(json!({"n": i}))
            .with_header("kind", "order")
            .with_header("trace-id", format!("t{i}"));
        sink.deliver(&msg).await.unwrap();
    }
    let orders = || {
        dispatch
            .seen()
            .into_iter()
            .filter(|m| m.headers["nats.subject"].ends_with(".order"))
            .count()
    };
    eventually("5 orders", || orders() >= 5).await;
    let seen: Vec<Message> = dispatch
        .seen()
        .into_iter()
        .filter(|m| m.headers["nats.subject"].ends_with(".order"))
        .collect();
    assert_eq!(seen.len(), 5);
    for (i, m) in seen.iter().enumerate() {
        assert_eq!(m.body.json().unwrap(), &json!({"n": i}));
        assert_eq!(m.headers["trace-id"], format!("t{i}"));
        assert_eq!(m.headers["kind"], "order");
        assert_eq!(m.headers["nats.subject"], format!("{subject}.order"));
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn request_reply_through_a_nats_source_and_the_nats_processor() {
    if !up().await {
        return;
    }
    let res = resources();
    let subject = unique("it.rpc");
    let dispatch = TestDispatch::new(|m: Message| async move {
        let n = m.body.json().unwrap()["n"].as_i64().unwrap();
        if n < 0 {
            return failing(m, "negative");
        }
        let reply = Message::json(json!({"double": n * 2})).with_header("x-answer", "yes");
        m.ack();
        Ok(vec![reply])
    });
    let source = build_source(
        "nats",
        json!({"subject": subject, "queue_group": "rpc"}),
        &res,
    )
    .unwrap();
    let (ctx, shutdown) = source_ctx(dispatch.clone(), &res, "rpc");
    let task = tokio::spawn(source.run(ctx));
    let request =
        build_processor("nats", json!({"subject": subject, "timeout": "1s"}), &res).unwrap();
    let mut answer = None;
    for _ in 0..100 {
        match request
            .process(Message::json(json!({"n": 21})).with_header("keep", "me"))
            .await
        {
            Ok(mut out) => {
                answer = out.pop();
                break;
            }
            // No responder until the subscription is in place.
            Err(f) => assert_eq!(f.error.kind, ErrorKind::Unavailable, "{}", f.error),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = answer.expect("a reply");
    assert_eq!(answer.body.json().unwrap(), &json!({"double": 42}));
    assert_eq!(answer.headers["x-answer"], "yes");
    assert_eq!(answer.headers["keep"], "me");
    // The request's headers reached the responder.
    assert_eq!(dispatch.seen()[0].headers["keep"], "me");
    assert!(dispatch.seen()[0].headers.contains_key("nats.reply"));

    // A failed request is answered with the error instead of timing out.
    let failed = request
        .process(Message::json(json!({"n": -1})))
        .await
        .unwrap();
    assert_eq!(failed[0].headers["sluice.error.kind"], "remote");
    assert!(failed[0].body.to_text().contains("negative"));

    // Nobody on a subject: unavailable, quickly.
    let nobody = build_processor("nats", json!({"subject": unique("it.none")}), &res).unwrap();
    let err = nobody.process(Message::bytes("x")).await.err().unwrap();
    assert_eq!(err.error.kind, ErrorKind::Unavailable);
    assert!(err.error.detail.contains("no responder"), "{}", err.error);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// Publishes `n` messages through the `jetstream` sink, creating the stream.
async fn publish(res: &Arc<Resources>, stream: &str, subject: &str, n: usize) -> Vec<Message> {
    let sink = build_sink(
        "jetstream",
        json!({"subject": subject, "stream": stream, "subjects": [format!("{subject}")]}),
        res,
    )
    .unwrap();
    let mut sent = Vec::new();
    for i in 0..n {
        let msg = Message::json(json!({"n": i})).with_header("trace-id", format!("t{i}"));
        sink.deliver(&msg).await.unwrap();
        sent.push(msg);
    }
    sent
}

async fn js_context() -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(ADDR).await.unwrap())
}

#[tokio::test]
async fn jetstream_round_trip_keeps_order_headers_and_ids_and_acks_after_commit() {
    if !up().await {
        return;
    }
    let res = resources();
    let stream = unique("IT");
    let subject = unique("it.js");
    let sent = publish(&res, &stream, &subject, 5).await;
    // Message 2 fails on its first delivery: it must come back, flagged as redelivered.
    let dispatch = TestDispatch::new(|m: Message| async move {
        if m.body.json().unwrap()["n"] == 2 && m.headers["nats.delivered"] == "1" {
            return failing(m, "first try fails");
        }
        m.ack();
        Ok(vec![])
    });
    let source = build_source(
        "jetstream",
        json!({"stream": stream, "consumer": "c1", "nak_delay": "100ms", "prefetch": 1}),
        &res,
    )
    .unwrap();
    let (ctx, shutdown) = source_ctx(dispatch.clone(), &res, "js");
    let task = tokio::spawn(source.run(ctx));
    eventually("6 deliveries", || dispatch.count() >= 6).await;
    let seen = dispatch.seen();
    let first: Vec<i64> = seen
        .iter()
        .filter(|m| m.headers["nats.delivered"] == "1")
        .map(|m| m.body.json().unwrap()["n"].as_i64().unwrap())
        .collect();
    assert_eq!(first, [0, 1, 2, 3, 4]);
    let again: Vec<&Message> = seen
        .iter()
        .filter(|m| m.headers["nats.delivered"] == "2")
        .collect();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].body.json().unwrap()["n"], 2);
    for m in seen.iter().filter(|m| m.headers["nats.delivered"] == "1") {
        let n = m.body.json().unwrap()["n"].as_u64().unwrap() as usize;
        assert_eq!(
            m.id(),
            sent[n].id(),
            "the message id travels as Nats-Msg-Id"
        );
        assert_eq!(m.headers["trace-id"], format!("t{n}"));
        assert_eq!(m.headers["nats.stream"], stream);
        assert_eq!(m.headers["nats.sequence"], (n + 1).to_string());
    }
    // Everything was acknowledged: nothing pending on the consumer.
    let js = js_context().await;
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(&stream)
        .await
        .unwrap()
        .get_consumer("c1")
        .await
        .unwrap();
    let mut pending = u64::MAX;
    for _ in 0..100 {
        let info = consumer.info().await.unwrap();
        pending = (info.num_ack_pending as u64) + info.num_pending;
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pending, 0);
    shutdown.cancel();
    task.await.unwrap().unwrap();
    js.delete_stream(&stream).await.unwrap();
}

#[tokio::test]
async fn jetstream_terminates_a_message_after_max_deliver_and_keeps_going() {
    if !up().await {
        return;
    }
    let res = resources();
    let stream = unique("IT");
    let subject = unique("it.js");
    publish(&res, &stream, &subject, 2).await;
    let dispatch = TestDispatch::new(|m: Message| async move {
        if m.body.json().unwrap()["n"] == 0 {
            return failing(m, "poison");
        }
        m.ack();
        Ok(vec![])
    });
    let source = build_source(
        "jetstream",
        json!({"stream": stream, "consumer": "c1", "nak_delay": "50ms", "max_deliver": 3}),
        &res,
    )
    .unwrap();
    let (ctx, shutdown) = source_ctx(dispatch.clone(), &res, "js");
    let task = tokio::spawn(source.run(ctx));
    eventually("3 deliveries of the poison message", || {
        dispatch
            .seen()
            .iter()
            .filter(|m| m.body.json().unwrap()["n"] == 0)
            .count()
            >= 3
    })
    .await;
    // Terminated on the third: no fourth delivery even after the nak delays.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let poison: Vec<String> = dispatch
        .seen()
        .iter()
        .filter(|m| m.body.json().unwrap()["n"] == 0)
        .map(|m| m.headers["nats.delivered"].clone())
        .collect();
    assert_eq!(poison, ["1", "2", "3"]);
    // Only the last delivery is final, so only it may go to the flow's dead letter.
    let final_delivery: Vec<bool> = dispatch
        .seen()
        .iter()
        .filter(|m| m.body.json().unwrap()["n"] == 0)
        .map(|m| !m.meta.redelivers_on_nack)
        .collect();
    assert_eq!(final_delivery, [false, false, true]);
    assert!(
        dispatch
            .seen()
            .iter()
            .any(|m| m.body.json().unwrap()["n"] == 1)
    );
    let js = js_context().await;
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(&stream)
        .await
        .unwrap()
        .get_consumer("c1")
        .await
        .unwrap();
    assert_eq!(consumer.info().await.unwrap().num_ack_pending, 0);
    shutdown.cancel();
    task.await.unwrap().unwrap();
    js.delete_stream(&stream).await.unwrap();
}

#[tokio::test]
async fn jetstream_sink_deduplicates_a_message_published_twice() {
    if !up().await {
        return;
    }
    let res = resources();
    let stream = unique("IT");
    let subject = unique("it.js");
    let sink = build_sink(
        "jetstream",
        json!({"subject": subject, "stream": stream}),
        &res,
    )
    .unwrap();
    let msg = Message::json(json!({"once": true}));
    sink.deliver(&msg).await.unwrap();
    sink.deliver(&msg).await.unwrap();
    sink.deliver(&Message::json(json!({"other": true})))
        .await
        .unwrap();
    let js = js_context().await;
    let mut s = js.get_stream(&stream).await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, 2);
    js.delete_stream(&stream).await.unwrap();

    // A subject no stream captures is an error, not a silent loss.
    let nowhere = build_sink("jetstream", json!({"subject": unique("it.nowhere")}), &res).unwrap();
    let err = nowhere.deliver(&msg).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable);
    assert!(err.detail.contains("no stream"), "{err}");
}

#[tokio::test]
async fn a_message_in_flight_at_shutdown_is_redelivered_to_the_next_run() {
    if !up().await {
        return;
    }
    let res = resources();
    let stream = unique("IT");
    let subject = unique("it.js");
    publish(&res, &stream, &subject, 1).await;
    let config = json!({"stream": stream, "consumer": "c1", "ack_wait": "1s"});
    // The first run's flow never finishes: its message is abandoned (like a crash).
    let stuck = TestDispatch::new(|m: Message| async move {
        std::mem::forget(m);
        std::future::pending::<()>().await;
        Ok(vec![])
    });
    let source = build_source("jetstream", config.clone(), &res).unwrap();
    let (ctx, _shutdown) = source_ctx(stuck.clone(), &res, "js");
    let task = tokio::spawn(source.run(ctx));
    eventually("the first delivery", || stuck.count() == 1).await;
    task.abort();
    let dispatch = TestDispatch::echo();
    let source = build_source("jetstream", config, &res).unwrap();
    let (ctx, shutdown) = source_ctx(dispatch.clone(), &res, "js");
    let task = tokio::spawn(source.run(ctx));
    eventually("the redelivery after ack_wait", || dispatch.count() >= 1).await;
    // At least the second delivery (the first run's pending pull may have taken one more).
    let delivered: i64 = dispatch.seen()[0].headers["nats.delivered"]
        .parse()
        .unwrap();
    assert!(delivered >= 2, "delivered {delivered}");
    shutdown.cancel();
    task.await.unwrap().unwrap();
    js_context().await.delete_stream(&stream).await.unwrap();
}

#[tokio::test]
async fn an_unreachable_server_is_unhealthy_not_fatal() {
    let res = resources();
    let source = build_source(
        "jetstream",
        json!({"url": "nats://127.0.0.1:1", "stream": "S", "consumer": "c"}),
        &res,
    )
    .unwrap();
    let (ctx, shutdown) = source_ctx(TestDispatch::echo(), &res, "down");
    let task = tokio::spawn(source.run(ctx));
    let board = ComponentHealth::of(&res);
    eventually("an unhealthy report", || !board.problems("down").is_empty()).await;
    assert!(
        board.problems("down")[0]
            .1
            .contains("NATS at nats://127.0.0.1:1"),
        "{:?}",
        board.problems("down")
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();

    let sink = build_sink(
        "nats",
        json!({"url": "nats://127.0.0.1:1", "subject": "x"}),
        &res,
    )
    .unwrap();
    let err = sink.deliver(&Message::bytes("x")).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable);
    assert!(!board.problems("test-flow").is_empty());
}

#[tokio::test]
async fn kv_bucket_is_an_idempotency_repository_and_a_cache() {
    if !up().await {
        return;
    }
    let res = resources();
    let bucket = unique("it_kv");
    let kv = NatsKv::new(
        KvOptions {
            url: format!("nats://{ADDR}"),
            token: None,
            bucket: bucket.clone(),
            max_age: Duration::from_secs(60),
        },
        HealthHandle::new(&res, "kv", "store"),
    );
    let ttl = Duration::from_secs(30);
    assert_eq!(kv.try_claim("order 1", ttl).await.unwrap(), Claim::Claimed);
    assert_eq!(
        kv.try_claim("order 1", ttl).await.unwrap(),
        Claim::Duplicate
    );
    assert!(kv.contains("order 1").await.unwrap());
    kv.release("order 1").await.unwrap();
    assert!(!kv.contains("order 1").await.unwrap());
    assert_eq!(kv.try_claim("order 1", ttl).await.unwrap(), Claim::Claimed);
    kv.confirm("order 1", ttl).await.unwrap();
    assert_eq!(
        kv.try_claim("order 1", ttl).await.unwrap(),
        Claim::Duplicate
    );
    // An expired claim is free again.
    assert_eq!(
        kv.try_claim("short", Duration::from_millis(50))
            .await
            .unwrap(),
        Claim::Claimed
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!kv.contains("short").await.unwrap());
    assert_eq!(kv.try_claim("short", ttl).await.unwrap(), Claim::Claimed);
    // Concurrent claims of one key: exactly one wins.
    let kv = Arc::new(kv);
    let claims = futures_util::future::join_all((0..8).map(|_| {
        let kv = Arc::clone(&kv);
        async move { kv.try_claim("race", ttl).await.unwrap() }
    }))
    .await;
    assert_eq!(claims.iter().filter(|c| **c == Claim::Claimed).count(), 1);

    let mut headers = sluice_core::Headers::new();
    headers.insert("content-type".into(), "application/json".into());
    let value = CachedValue {
        body: Body::from_bytes(&b"{\"price\":3}"[..]),
        headers,
    };
    assert_eq!(CacheStore::get(&*kv, "sku-1").await.unwrap(), None);
    kv.put("sku-1", value.clone(), ttl).await.unwrap();
    assert_eq!(
        CacheStore::get(&*kv, "sku-1").await.unwrap(),
        Some(value.clone())
    );
    kv.put("gone", value, Duration::from_millis(20))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(CacheStore::get(&*kv, "gone").await.unwrap(), None);
    js_context().await.delete_key_value(&bucket).await.unwrap();
}

#[tokio::test]
async fn jetstream_keeps_pace_one_message_at_a_time() {
    if !up().await {
        return;
    }
    let res = resources();
    let stream = unique("IT");
    let subject = unique("it.js");
    publish(&res, &stream, &subject, 0).await;
    let dispatch = TestDispatch::echo();
    let source = build_source(
        "jetstream",
        json!({"stream": stream, "consumer": "c1", "prefetch": 1}),
        &res,
    )
    .unwrap();
    let (ctx, shutdown) = source_ctx(dispatch.clone(), &res, "js");
    let started = std::time::Instant::now();
    let task = tokio::spawn(source.run(ctx));
    // Published while the consumer waits, as another application would.
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish(&res, &stream, &subject, 200).await;
    eventually("200 deliveries", || dispatch.count() >= 200).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "200 messages took {took:?}");
    let order: Vec<u64> = dispatch
        .seen()
        .iter()
        .map(|m| m.body.json().unwrap()["n"].as_u64().unwrap())
        .collect();
    assert_eq!(order, (0..200).collect::<Vec<u64>>());
    shutdown.cancel();
    task.await.unwrap().unwrap();
    js_context().await.delete_stream(&stream).await.unwrap();
}

#[tokio::test]
async fn the_nats_kv_store_backend_is_registered() {
    if !up().await {
        return;
    }
    let res = resources();
    let bucket = unique("it_kv_backend");
    let backend = registry().get_store_backend("nats_kv").expect("registered");
    let repository = (backend.repository)(&json!({"bucket": bucket}), &ctx(&res)).unwrap();
    assert_eq!(
        repository
            .try_claim("k", Duration::from_secs(5))
            .await
            .unwrap(),
        Claim::Claimed
    );
    assert_eq!(
        repository
            .try_claim("k", Duration::from_secs(5))
            .await
            .unwrap(),
        Claim::Duplicate
    );
    let e = (backend.cache)(&json!({"bucket": "a.b"}), &ctx(&res))
        .err()
        .unwrap();
    assert_eq!(e.field.as_deref(), Some("bucket"));
    js_context().await.delete_key_value(&bucket).await.unwrap();
}
