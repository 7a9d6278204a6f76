//! The Redis connectors (`redis_stream`, `redis_list`, `redis_pubsub`, the `redis` processor and
//! the Redis store) against a real Redis on 127.0.0.1:6379.
#![cfg(feature = "redis")]
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
use redis::AsyncCommands;
use serde_json::json;
use sluice_connectors::redis::store::RedisStore;
use sluice_core::state::{CacheStore, CachedValue, Claim, IdempotentRepository};
use sluice_core::{
    Body, ComponentHealth, ErrorKind, Failure, HealthHandle, Message, ProcessError, Resources,
};
use sluice_testkit::unique;

const ADDR: &str = "127.0.0.1:6379";
const URL: &str = "redis://127.0.0.1:6379";

async fn up() -> bool {
    sluice_testkit::service("Redis", ADDR).await
}

fn resources() -> Arc<Resources> {
    Arc::new(Resources::default())
}

async fn conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

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
    m.nack(why);
    Err(Failure::new(
        Message::bytes(""),
        ProcessError::new(ErrorKind::Remote, why),
    ))
}

async fn pending(stream: &str, group: &str) -> u64 {
    let reply: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(&mut conn().await)
        .await
        .unwrap();
    match reply {
        redis::Value::Array(items) => match &items[0] {
            redis::Value::Int(n) => *n as u64,
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn stream_round_trip_with_headers_in_order_acked_after_commit() {
    if !up().await {
        return;
    }
    let res = resources();
    let stream = unique("it:stream");
    let sink = build_sink("redis_stream", json!({"stream": stream}), &res).unwrap();
    for i in 0..5 {
        let msg = Message::json(json!({"n": i})).with_header("trace-id", format!("t{i}"));
        sink.deliver(&msg).await.unwrap();
    }
    // Entry 3 fails once: it stays pending and comes back after claim_idle.
    let dispatch = TestDispatch::new(|m: Message| async move {
        let n = m.body.json().unwrap()["n"].as_i64().unwrap();
        if n == 3 && !m.headers.contains_key("seen-before") {
            return failing(m, "first try fails");
        }
        m.ack();
        Ok(vec![])
    });
    let source = build_source(
        "redis_stream",
        json!({"stream": stream, "group": "g", "start": "0", "claim_idle": "1s"}),
        &res,
    )
    .unwrap();
    let (ctx, shutdown) = source_ctx(dispatch.clone(), &res, "streams");
    let task = tokio::spawn(source.run(ctx));
    eventually("5 entries", || dispatch.count() >= 5).await;
    let seen = dispatch.seen();
    let order: Vec<i64> = seen
        .iter()
        .map(|m| m.body.json().unwrap()["n"].as_i64().unwrap())
        .collect();
    assert_eq!(order[..5], [0, 1, 2, 3, 4]);
    for (i, m) in seen.iter().take(5).enumerate() {
        assert_eq!(m.headers["trace-id"], format!("t{i}"));
        assert_eq!(m.headers["redis.stream"], stream);
        assert!(m.headers["redis.id"].contains('-'));
    }
    // The failed entry is claimed again once idle and delivered a second time.
    eventually("the failed entry's second delivery", || {
        dispatch.count() >= 6
    })
    .await;
    assert_eq!(dispatch.seen()[5].body.json().unwrap()["n"], 3);
    assert_eq!(
        dispatch.seen()[5].headers["redis.id"],
        seen[3].headers["redis.id"]
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
    // 3 failed twice (no `seen-before` header is ever added), so it is the only one pending.
    assert_eq!(pending(&stream, "g").await, 1);
    let _: () = conn().await.del(&stream).await.unwrap();
}

#[tokio::test]
async fn stream_entries_a_crashed_consumer_held_are_delivered_at_its_next_start() {
    if !up().await {
        return;
    }
    let res = resources();
    let stream = unique("it:stream");
    let mut c = conn().await;
    let _: () = c.xgroup_create_mkstream(&stream, "g", "$").await.unwrap();
    let _: String = c.xadd(&stream, "*", &[("body", "held")]).await.unwrap();
    // Consumer "worker" reads the entry and dies before acknowledging it.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("worker")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(pending(&stream, "g").await, 1);
    let dispatch = TestDispatch::echo();
    let source = build_source(
        "redis_stream",
        json!({"stream": stream, "group": "g", "consumer": "worker"}),
        &res,
    )
    .unwrap();
    let (ctx, shutdown) = source_ctx(dispatch.clone(), &res, "streams");
    let task = tokio::spawn(source.run(ctx));
    eventually("the held entry", || dispatch.count() == 1).await;
    assert_eq!(dispatch.seen()[0].body.to_text(), "held");
    for _ in 0..100 {
        if pending(&stream, "g").await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pending(&stream, "g").await, 0);
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let _: () = c.del(&stream).await.unwrap();
}

#[tokio::test]
async fn list_queue_is_fifo_reliable_and_recovers_its_processing_list() {
    if !up().await {
        return;
    }
    let res = resources();
    let list = unique("it:list");
    let processing = format!("{list}:processing");
    let mut c = conn().await;
    // Left by a crash of an earlier run: delivered first.
    let _: () = c.lpush(&processing, "from-the-crash").await.unwrap();
    let sink = build_sink("redis_list", json!({"list": list}), &res).unwrap();
    for i in 0..3 {
        sink.deliver(&Message::bytes(format!("job-{i}")))
            .await
            .unwrap();
    }
    let dispatch = TestDispatch::new(|m: Message| async move {
        if m.body.to_text() == "job-1" && !m.headers.contains_key("never") {
            // Fails every time it is seen the first time by this closure: see below.
            return failing(m, "job-1 fails");
        }
        m.ack();
        Ok(vec![])
    });
    let source = build_source("redis_list", json!({"list": list, "prefetch": 1}), &res).unwrap();
    let (ctx, shutdown) = source_ctx(dispatch.clone(), &res, "lists");
    let task = tokio::spawn(source.run(ctx));
    eventually("5 deliveries", || dispatch.count() >= 5).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let order: Vec<String> = dispatch.seen().iter().map(|m| m.body.to_text()).collect();
    assert_eq!(
        order[..5],
        ["from-the-crash", "job-0", "job-1", "job-2", "job-1"]
    );
    assert_eq!(dispatch.seen()[0].headers["redis.list"], list);
    // Acknowledged elements are gone; the failing one is back in the queue, none in processing.
    let processing_len: u64 = c.llen(&processing).await.unwrap();
    assert_eq!(processing_len, 0);
    let queued: Vec<String> = c.lrange(&list, 0, -1).await.unwrap();
    assert_eq!(queued, ["job-1"]);
    let _: () = c.del(&[&list, &processing]).await.unwrap();
}

#[tokio::test]
async fn pubsub_source_and_sink() {
    if !up().await {
        return;
    }
    let res = resources();
    let channel = unique("it:chan");
    let dispatch = TestDispatch::echo();
    let source = build_source(
        "redis_pubsub",
        json!({"channel": format!("{channel}:*"), "pattern": true}),
        &res,
    )
    .unwrap();
    let (ctx, shutdown) = source_ctx(dispatch.clone(), &res, "pubsub");
    let task = tokio::spawn(source.run(ctx));
    let strict = build_sink(
        "redis_pubsub",
        json!({"channel": format!("{channel}:a"), "require_subscriber": true}),
        &res,
    )
    .unwrap();
    for _ in 0..200 {
        if strict.deliver(&Message::bytes("hello")).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eventually("the message", || dispatch.count() == 1).await;
    assert_eq!(dispatch.seen()[0].body.to_text(), "hello");
    assert_eq!(
        dispatch.seen()[0].headers["redis.channel"],
        format!("{channel}:a")
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let nobody = build_sink(
        "redis_pubsub",
        json!({"channel": unique("it:none"), "require_subscriber": true}),
        &res,
    )
    .unwrap();
    assert_eq!(
        nobody.deliver(&Message::bytes("x")).await.unwrap_err().kind,
        ErrorKind::Unavailable
    );
    let lenient = build_sink("redis_pubsub", json!({"channel": unique("it:none")}), &res).unwrap();
    lenient.deliver(&Message::bytes("x")).await.unwrap();
}

#[tokio::test]
async fn redis_processor_gets_sets_and_counts() {
    if !up().await {
        return;
    }
    let res = resources();
    let prefix = unique("it:kv");
    let set = build_processor(
        "redis",
        json!({"command": "set", "key": format!("{prefix}:{{id}}"), "ttl": "1m"}),
        &res,
    )
    .unwrap();
    let get = build_processor(
        "redis",
        json!({"command": "get", "key": format!("{prefix}:{{id}}")}),
        &res,
    )
    .unwrap();
    let incr = build_processor(
        "redis",
        json!({"command": "incr", "key": format!("{prefix}:count"), "by": 2, "ttl": "1m"}),
        &res,
    )
    .unwrap();
    let out = set
        .process(Message::bytes("stored").with_header("id", "7"))
        .await
        .unwrap();
    assert_eq!(out[0].body.to_text(), "stored");
    let out = get
        .process(Message::bytes("query").with_header("id", "7"))
        .await
        .unwrap();
    assert_eq!(
        (
            out[0].body.to_text().as_str(),
            out[0].headers["redis.found"].as_str()
        ),
        ("stored", "true")
    );
    let out = get
        .process(Message::bytes("query").with_header("id", "8"))
        .await
        .unwrap();
    assert_eq!(
        (
            out[0].body.to_text().as_str(),
            out[0].headers["redis.found"].as_str()
        ),
        ("query", "false")
    );
    let err = get.process(Message::bytes("query")).await.err().unwrap();
    assert_eq!(err.error.kind, ErrorKind::InvalidInput);
    assert_eq!(
        err.message.body.to_text(),
        "query",
        "the message comes back with the failure"
    );
    incr.process(Message::bytes("")).await.unwrap();
    let out = incr.process(Message::bytes("")).await.unwrap();
    assert_eq!(out[0].headers["redis.value"], "4");
    let ttl: i64 = conn().await.pttl(format!("{prefix}:count")).await.unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
    let _: () = conn()
        .await
        .del(&[format!("{prefix}:7"), format!("{prefix}:count")])
        .await
        .unwrap();
}

#[tokio::test]
async fn redis_store_is_an_idempotency_repository_and_a_cache() {
    if !up().await {
        return;
    }
    let res = resources();
    let prefix = format!("{}:", unique("it:idem"));
    let store =
        Arc::new(RedisStore::new(URL, &prefix, HealthHandle::new(&res, "f", "store")).unwrap());
    let ttl = Duration::from_secs(30);
    assert_eq!(store.try_claim("k", ttl).await.unwrap(), Claim::Claimed);
    assert_eq!(store.try_claim("k", ttl).await.unwrap(), Claim::Duplicate);
    store.release("k").await.unwrap();
    assert!(!store.contains("k").await.unwrap());
    store.confirm("k", ttl).await.unwrap();
    assert!(store.contains("k").await.unwrap());
    assert_eq!(
        store
            .try_claim("short", Duration::from_millis(30))
            .await
            .unwrap(),
        Claim::Claimed
    );
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(store.try_claim("short", ttl).await.unwrap(), Claim::Claimed);
    let claims = futures_util::future::join_all((0..8).map(|_| {
        let s = Arc::clone(&store);
        async move { s.try_claim("race", ttl).await.unwrap() }
    }))
    .await;
    assert_eq!(claims.iter().filter(|c| **c == Claim::Claimed).count(), 1);
    let value = CachedValue {
        body: Body::from_bytes(&b"v"[..]),
        headers: [("h".to_owned(), "1".to_owned())].into(),
    };
    store.put("c", value.clone(), ttl).await.unwrap();
    assert_eq!(CacheStore::get(&*store, "c").await.unwrap(), Some(value));
    assert_eq!(CacheStore::get(&*store, "missing").await.unwrap(), None);
    let keys: Vec<String> = conn().await.keys(format!("{prefix}*")).await.unwrap();
    let _: () = conn().await.del(keys).await.unwrap();
}

#[tokio::test]
async fn an_unreachable_redis_is_unhealthy_not_fatal() {
    let res = resources();
    let source = build_source(
        "redis_stream",
        json!({"url": "redis://127.0.0.1:1", "stream": "s", "group": "g"}),
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
            .contains("Redis at redis://127.0.0.1:1"),
        "{:?}",
        board.problems("down")
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let sink = build_sink(
        "redis_list",
        json!({"url": "redis://127.0.0.1:1", "list": "q"}),
        &res,
    )
    .unwrap();
    assert_eq!(
        sink.deliver(&Message::bytes("x")).await.unwrap_err().kind,
        ErrorKind::Unavailable
    );
}

#[tokio::test]
async fn the_redis_store_backend_is_registered() {
    if !up().await {
        return;
    }
    let res = resources();
    let prefix = format!("{}:", unique("it:backend"));
    let backend = registry().get_store_backend("redis").expect("registered");
    let cache = (backend.cache)(&json!({"prefix": prefix}), &ctx(&res)).unwrap();
    let value = CachedValue {
        body: Body::from_bytes(&b"v"[..]),
        headers: Default::default(),
    };
    cache
        .put("k", value.clone(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(cache.get("k").await.unwrap(), Some(value));
    let e = (backend.repository)(&json!({"nope": 1}), &ctx(&res))
        .err()
        .unwrap();
    assert_eq!(e.field.as_deref(), Some("nope"));
    let _: () = conn().await.del(format!("{prefix}k")).await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// `throttle` with `backend: {redis: ...}`: one limit shared by several instances.

/// The engine's step builder with the connectors' store backends, as the runtime has them.
struct WithStores(sluice_core::Registry);

impl sluice_core::StepBuilder for WithStores {
    fn build_steps(
        &self,
        field: &str,
        _: &serde_json::Value,
    ) -> Result<Arc<dyn sluice_core::Processor>, sluice_core::BuildError> {
        Err(sluice_core::BuildError::field(field, "no steps here"))
    }
    fn compile_jq(
        &self,
        field: &str,
        code: &str,
    ) -> Result<Arc<dyn sluice_core::component::JqProgram>, sluice_core::BuildError> {
        sluice_engine::expr::jq::compile(code, sluice_engine::expr::jq::JqLimits::default())
            .map_err(|e| sluice_core::BuildError::field(field, e.to_string()))
    }
    fn store_backend(
        &self,
        name: &str,
    ) -> Result<Option<sluice_core::registry::StoreBackend>, Vec<&'static str>> {
        self.0
            .get_store_backend(name)
            .map(Some)
            .ok_or_else(|| self.0.store_backend_names())
    }
}

/// A `throttle` step as one instance of a flow would build it (its own resources, its own
/// connection to Redis).
fn throttle(
    config: serde_json::Value,
) -> Result<Arc<dyn sluice_core::Processor>, sluice_core::BuildError> {
    use sluice_core::registry::Factory;
    use sluice_core::spec::ComponentKind;
    let mut reg = registry();
    sluice_engine::register_all(&mut reg);
    let (spec, factory) = reg
        .get(ComponentKind::Processor, "throttle")
        .expect("registered");
    let Factory::Processor(f) = factory else {
        panic!("not a processor")
    };
    let config = with_defaults(spec, &config);
    let resources = resources();
    let steps = WithStores(reg.clone());
    let ctx = sluice_core::BuildContext {
        flow: "throttled",
        id: "steps[0]",
        steps: &steps,
        resources: &resources,
        downstream: Arc::new(NoDownstream),
    };
    f(&config, &ctx)
}

/// How many of `n` messages with key `k` pass `step` at once (reject mode), and the errors of
/// the others.
async fn passing(
    step: &Arc<dyn sluice_core::Processor>,
    k: &str,
    n: usize,
) -> (usize, Vec<ProcessError>) {
    let mut passed = 0;
    let mut refused = Vec::new();
    for i in 0..n {
        match step.process(Message::json(json!({"k": k, "i": i}))).await {
            Ok(out) => {
                passed += 1;
                for m in out {
                    m.ack();
                }
            }
            Err(f) => {
                f.message.ack();
                refused.push(f.error);
            }
        }
    }
    (passed, refused)
}

#[tokio::test]
async fn throttle_instances_sharing_a_redis_backend_share_one_limit() {
    if !up().await {
        return;
    }
    let prefix = format!("{}:", unique("it:throttle"));
    // A burst of 10 refilled one per 6 minutes: nothing refills while the test runs.
    let config = json!({"rate": 10, "per": "1h", "burst": 10, "key": ".k", "mode": "reject",
        "backend": {"redis": {"url": URL, "prefix": prefix}}});
    let a = throttle(config.clone()).unwrap();
    let b = throttle(config.clone()).unwrap();
    let (passed_a, _) = passing(&a, "acme", 6).await;
    assert_eq!(passed_a, 6);
    // The second instance gets what the first left of the limit, not a limit of its own.
    let (passed_b, refused) = passing(&b, "acme", 6).await;
    assert_eq!(passed_b, 4, "{refused:?}");
    assert_eq!(refused.len(), 2);
    assert!(refused.iter().all(|e| e.kind == ErrorKind::Rejected));
    assert!(
        refused[0].detail.contains("for key `acme`") && refused[0].detail.contains("retry after"),
        "{}",
        refused[0].detail
    );
    let (again_a, _) = passing(&a, "acme", 1).await;
    assert_eq!(again_a, 0);
    // Another key has its own full limit, whichever instance asks.
    let (other_a, _) = passing(&a, "globex", 5).await;
    let (other_b, _) = passing(&b, "globex", 6).await;
    assert_eq!((other_a, other_b), (5, 5));
    // Redis keeps one key per throttled key, expiring once its schedule has passed.
    let mut c = conn().await;
    let ttl: i64 = c.pttl(format!("{prefix}acme")).await.unwrap();
    assert!(ttl > 0 && ttl <= 3_600_000, "{ttl}");
    let _: () = c
        .del(&[format!("{prefix}acme"), format!("{prefix}globex")])
        .await
        .unwrap();
}

#[tokio::test]
async fn throttle_in_delay_mode_waits_for_the_slot_another_instance_left() {
    if !up().await {
        return;
    }
    let prefix = format!("{}:", unique("it:throttle"));
    let config = |max_wait: &str| {
        json!({"rate": 1, "per": "1h", "max_wait": max_wait,
            "backend": {"redis": {"url": URL, "prefix": prefix}}})
    };
    let a = throttle(config("1m")).unwrap();
    let b = throttle(config("1m")).unwrap();
    assert_eq!(passing(&a, "", 1).await.0, 1);
    // The next shared slot is an hour away: beyond b's max_wait, so b refuses with the hint.
    let (passed, refused) = passing(&b, "", 1).await;
    assert_eq!(passed, 0);
    assert_eq!(refused[0].kind, ErrorKind::Rejected);
    // About an hour, in milliseconds: the hint comes from the shared schedule.
    assert!(
        refused[0].detail.contains("retry after 35"),
        "{}",
        refused[0].detail
    );
    // Within max_wait the slot is reserved and waited for (the script's wait is honoured).
    let c = throttle(config("2h")).unwrap();
    let waiting = tokio::spawn(async move { passing(&c, "", 1).await.0 });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a message passed an hour early");
    waiting.abort();
    let _: () = conn().await.del(prefix.clone()).await.unwrap();
}

#[tokio::test]
async fn throttle_with_redis_down_fails_unavailable_instead_of_passing() {
    let step =
        throttle(json!({"rate": 5, "backend": {"redis": {"url": "redis://127.0.0.1:1"}}})).unwrap();
    let (passed, refused) = passing(&step, "", 2).await;
    assert_eq!(passed, 0);
    assert!(
        refused.iter().all(|e| e.kind == ErrorKind::Unavailable),
        "{refused:?}"
    );
    assert!(
        refused[0].detail.contains("127.0.0.1:1"),
        "{}",
        refused[0].detail
    );
}

#[tokio::test]
async fn throttle_reloads_its_script_after_redis_forgot_it() {
    if !up().await {
        return;
    }
    let prefix = format!("{}:", unique("it:throttle"));
    let step = throttle(json!({"rate": 2, "per": "1h", "burst": 2, "mode": "reject",
        "backend": {"redis": {"url": URL, "prefix": prefix}}}))
    .unwrap();
    assert_eq!(passing(&step, "", 1).await.0, 1);
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn().await)
        .await
        .unwrap();
    assert_eq!(passing(&step, "", 2).await.0, 1);
    let _: () = conn().await.del(prefix.clone()).await.unwrap();
}

#[test]
fn throttle_backends_are_checked_at_build() {
    let e = throttle(json!({"rate": 1, "backend": {"nats_kv": {}}}))
        .err()
        .unwrap();
    assert_eq!(e.field.as_deref(), Some("backend"));
    let e = throttle(json!({"rate": 2_000_000, "backend": {"redis": {}}}))
        .err()
        .unwrap();
    assert_eq!(e.field.as_deref(), Some("rate"));
    assert!(e.message.contains("1000000"), "{}", e.message);
    let e = throttle(json!({"rate": 1, "backend": {"redis": {"nope": 1}}}))
        .err()
        .unwrap();
    assert_eq!(e.field.as_deref(), Some("backend.redis.nope"));
}
