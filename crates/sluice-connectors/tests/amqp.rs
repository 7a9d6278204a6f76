//! The `amqp` source and sink against the real RabbitMQ on 127.0.0.1:5672.
#![cfg(feature = "amqp")]
// Test helpers outside #[test] fns may panic on a broken fixture: that is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::needless_pass_by_value
)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use sluice_core::{ComponentHealth, ErrorKind, Failure, Message, ProcessError, Resources};
use sluice_testkit::proxy::TcpProxy;
use sluice_testkit::{service, unique};

const ADDR: &str = "127.0.0.1:5672";
const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn url_via(addr: SocketAddr) -> String {
    format!("amqp://guest:guest@{addr}/%2f")
}

/// A plain client for setting up and checking queues from the outside.
async fn client() -> (Connection, Channel) {
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, channel)
}

async fn declare_queue(channel: &Channel, name: &str, arguments: FieldTable) {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .unwrap();
}

async fn publish(channel: &Channel, queue: &str, body: &[u8], properties: BasicProperties) {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
}

/// Takes every ready message of `queue` (acknowledging it).
async fn drain(channel: &Channel, queue: &str) -> Vec<lapin::message::Delivery> {
    let mut out = Vec::new();
    while let Some(got) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        out.push(got.delivery);
    }
    out
}

/// Polls `queue` until it holds `n` messages, or panics after `within`.
async fn wait_for_messages(
    channel: &Channel,
    queue: &str,
    n: usize,
    within: Duration,
) -> Vec<lapin::message::Delivery> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        got.extend(drain(channel, queue).await);
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages arrived in {queue}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    got
}

async fn delete_queue(channel: &Channel, name: &str) {
    let _ = channel
        .queue_delete(name.into(), QueueDeleteOptions::default())
        .await;
}

async fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn problems(resources: &Resources, flow: &str) -> Vec<(String, String)> {
    ComponentHealth::of(resources).problems(flow)
}

/// Acks every message: a flow whose targets all committed.
fn acking() -> Arc<TestDispatch> {
    TestDispatch::new(|m: Message| async move {
        m.ack();
        Ok(vec![])
    })
}

/// Starts the `amqp` source with `config`; returns the running task and its shutdown token.
fn start_source(
    config: Value,
    dispatch: Arc<TestDispatch>,
    resources: &Arc<Resources>,
    flow: &str,
) -> (
    tokio::task::JoinHandle<Result<(), sluice_core::SourceError>>,
    tokio_util::sync::CancellationToken,
) {
    let source = build_source("amqp", config, resources).unwrap();
    let (ctx, shutdown) = source_ctx(dispatch, resources, flow);
    (tokio::spawn(source.run(ctx)), shutdown)
}

#[tokio::test]
async fn source_delivers_in_order_with_properties_and_headers_then_acks() {
    if !service("RabbitMQ", ADDR).await {
        return;
    }
    let queue = unique("sluice_amqp_src");
    let (_conn, channel) = client().await;
    declare_queue(&channel, &queue, FieldTable::default()).await;
    for i in 0..20 {
        let mut headers = FieldTable::default();
        headers.insert("tenant".into(), AMQPValue::LongString("acme".into()));
        headers.insert("seq".into(), AMQPValue::LongInt(i));
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(format!("c-{i}").into())
            .with_message_id(format!("m-{i}").into())
            .with_delivery_mode(2)
            .with_headers(headers);
        publish(&channel, &queue, format!("{{\"n\":{i}}}").as_bytes(), props).await;
    }
    let resources = Arc::new(Resources::default());
    let dispatch = acking();
    let (task, shutdown) = start_source(
        json!({"url": URL, "queue": queue, "prefetch": 5, "declare": {"queues": [{"name": queue}]}}),
        Arc::clone(&dispatch),
        &resources,
        "amqp-in",
    );
    wait_until("20 messages", Duration::from_secs(10), || {
        dispatch.count() == 20
    })
    .await;
    let seen = dispatch.seen();
    for (i, msg) in seen.iter().enumerate() {
        assert_eq!(msg.body.json().unwrap(), &json!({"n": i}));
        let h = &msg.headers;
        assert_eq!(h["tenant"], "acme");
        assert_eq!(h["seq"], i.to_string());
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["amqp.correlation_id"], format!("c-{i}"));
        assert_eq!(h["amqp.message_id"], format!("m-{i}"));
        assert_eq!(h["amqp.delivery_mode"], "2");
        assert_eq!(h["amqp.routing_key"], queue);
        assert_eq!(h["amqp.exchange"], "");
        assert_eq!(h["amqp.queue"], queue);
        assert_eq!(h["amqp.redelivered"], "false");
        assert_eq!(
            msg.meta.correlation_id.as_deref(),
            Some(format!("c-{i}").as_str())
        );
        assert_eq!(msg.meta.origin.as_deref(), Some("amqp-in"));
    }
    assert!(problems(&resources, "amqp-in").is_empty());
    shutdown.cancel();
    task.await.unwrap().unwrap();
    // Everything was acknowledged: nothing comes back after the consumer is gone.
    assert!(drain(&channel, &queue).await.is_empty());
    delete_queue(&channel, &queue).await;
}

#[tokio::test]
async fn source_requeues_a_failed_message_and_it_comes_back_redelivered() {
    if !service("RabbitMQ", ADDR).await {
        return;
    }
    let queue = unique("sluice_amqp_requeue");
    let (_conn, channel) = client().await;
    declare_queue(&channel, &queue, FieldTable::default()).await;
    publish(&channel, &queue, b"fragile", BasicProperties::default()).await;
    let resources = Arc::new(Resources::default());
    let dispatch = TestDispatch::new(|m: Message| async move {
        if m.headers["amqp.redelivered"] == "false" {
            let error = ProcessError::new(ErrorKind::Unavailable, "target down");
            return Err(Failure::new(m, error));
        }
        m.ack();
        Ok(vec![])
    });
    let (task, shutdown) = start_source(
        json!({"url": URL, "queue": queue, "requeue_delay": "10ms"}),
        Arc::clone(&dispatch),
        &resources,
        "amqp-requeue",
    );
    wait_until("the redelivery", Duration::from_secs(10), || {
        dispatch.count() == 2
    })
    .await;
    let seen = dispatch.seen();
    assert_eq!(seen[0].body.to_text(), "fragile");
    assert_eq!(seen[1].body.to_text(), "fragile");
    assert_eq!(seen[1].headers["amqp.redelivered"], "true");
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert!(
        drain(&channel, &queue).await.is_empty(),
        "the redelivered copy was acked"
    );
    delete_queue(&channel, &queue).await;
}

#[tokio::test]
async fn source_rejects_failed_messages_to_the_dead_letter_exchange() {
    if !service("RabbitMQ", ADDR).await {
        return;
    }
    let queue = unique("sluice_amqp_rej");
    let dlx = format!("{queue}.dlx");
    let failed = format!("{queue}.failed");
    let resources = Arc::new(Resources::default());
    let dispatch = TestDispatch::new(|m: Message| async move {
        let error = ProcessError::new(ErrorKind::InvalidInput, "bad order");
        Err(Failure::new(m, error))
    });
    let (task, shutdown) = start_source(
        json!({
            "url": URL, "queue": queue, "on_failure": "reject",
            "declare": {
                "exchanges": [{"name": dlx, "type": "fanout", "durable": false, "auto_delete": true}],
                "queues": [
                    {"name": queue, "arguments": {"x-dead-letter-exchange": dlx}},
                    {"name": failed}
                ],
                "bindings": [{"queue": failed, "exchange": dlx}]
            }
        }),
        Arc::clone(&dispatch),
        &resources,
        "amqp-reject",
    );
    // The source declares the topology; publish once it is consuming.
    wait_until("the consumer", Duration::from_secs(10), || {
        problems(&resources, "amqp-reject").is_empty()
    })
    .await;
    let (conn, _) = client().await;
    let mut declared = false;
    for _ in 0..100 {
        // A passive declare of a missing queue closes its channel: a new one per attempt.
        let probe = conn.create_channel().await.unwrap();
        if probe
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok()
        {
            declared = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(declared, "the source did not declare {queue}");
    let (_conn, channel) = client().await;
    publish(&channel, &queue, b"poison", BasicProperties::default()).await;
    let dead = wait_for_messages(&channel, &failed, 1, Duration::from_secs(10)).await;
    assert_eq!(dead[0].data, b"poison");
    assert_eq!(dispatch.count(), 1, "a rejected message is not redelivered");
    shutdown.cancel();
    task.await.unwrap().unwrap();
    for q in [&queue, &failed] {
        delete_queue(&channel, q).await;
    }
    let _ = channel
        .exchange_delete(dlx.as_str().into(), Default::default())
        .await;
}

#[test]
fn source_crash_loses_nothing_that_was_not_acknowledged() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    if !rt.block_on(service("RabbitMQ", ADDR)) {
        return;
    }
    let queue = unique("sluice_amqp_crash");
    let (conn, channel) = rt.block_on(client());
    rt.block_on(async {
        declare_queue(&channel, &queue, FieldTable::default()).await;
        for i in 0..10 {
            publish(
                &channel,
                &queue,
                format!("{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await;
        }
    });

    // First run, in a runtime of its own that is then dropped with everything in it (a crash):
    // messages 0..5 are committed, the rest are still in the flow.
    let crashed = tokio::runtime::Runtime::new().unwrap();
    let resources = Arc::new(Resources::default());
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = Arc::clone(&held);
    let first = TestDispatch::new(move |m: Message| {
        let keep = Arc::clone(&keep);
        async move {
            if m.body.to_text().parse::<u32>().unwrap() < 5 {
                m.ack();
            } else {
                // Never resolved: the flow is still working on it when the process dies.
                keep.lock().unwrap().push(m);
            }
            Ok(vec![])
        }
    });
    let config = json!({"url": URL, "queue": queue, "prefetch": 20});
    {
        let _guard = crashed.enter();
        let (task, _shutdown) =
            start_source(config.clone(), Arc::clone(&first), &resources, "amqp-crash");
        crashed.block_on(wait_until("10 messages", Duration::from_secs(10), || {
            first.count() == 10
        }));
        // The acks of 0..5 are sent asynchronously; give them a moment to leave.
        crashed.block_on(tokio::time::sleep(Duration::from_millis(300)));
        drop(task);
    }
    std::mem::forget(std::mem::take(&mut *held.lock().unwrap()));
    crashed.shutdown_background();

    // Second run: exactly the five unacknowledged messages come back, marked redelivered.
    rt.block_on(async {
        let resources = Arc::new(Resources::default());
        let second = acking();
        let (task, shutdown) = start_source(config, Arc::clone(&second), &resources, "amqp-crash");
        wait_until("5 redeliveries", Duration::from_secs(15), || {
            second.count() >= 5
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let seen = second.seen();
        let mut bodies: Vec<String> = seen.iter().map(|m| m.body.to_text()).collect();
        // Requeued messages go back near, not always exactly at, their old positions.
        bodies.sort();
        assert_eq!(bodies, ["5", "6", "7", "8", "9"]);
        assert!(seen.iter().all(|m| m.headers["amqp.redelivered"] == "true"));
        shutdown.cancel();
        task.await.unwrap().unwrap();
        delete_queue(&channel, &queue).await;
        drop(conn);
    });
}

#[tokio::test]
async fn source_reconnects_after_the_broker_goes_away() {
    if !service("RabbitMQ", ADDR).await {
        return;
    }
    let queue = unique("sluice_amqp_reconnect");
    let (_conn, channel) = client().await;
    declare_queue(&channel, &queue, FieldTable::default()).await;
    let proxy = TcpProxy::start(ADDR.parse().unwrap()).await;
    let resources = Arc::new(Resources::default());
    let dispatch = acking();
    let (task, shutdown) = start_source(
        json!({"url": url_via(proxy.addr()), "queue": queue}),
        Arc::clone(&dispatch),
        &resources,
        "amqp-reconnect",
    );
    publish(&channel, &queue, b"before", BasicProperties::default()).await;
    wait_until("the first message", Duration::from_secs(10), || {
        dispatch.count() == 1
    })
    .await;

    proxy.down().await;
    wait_until("an unhealthy report", Duration::from_secs(10), || {
        !problems(&resources, "amqp-reconnect").is_empty()
    })
    .await;
    let reason = problems(&resources, "amqp-reconnect")[0].1.clone();
    assert!(reason.contains("RabbitMQ at amqp://127.0.0.1:"), "{reason}");
    publish(&channel, &queue, b"during", BasicProperties::default()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dispatch.count(), 1);

    proxy.up().await;
    let reopened = Instant::now();
    wait_until(
        "the message sent during the outage",
        Duration::from_secs(10),
        || dispatch.count() == 2,
    )
    .await;
    assert!(
        reopened.elapsed() < Duration::from_secs(3),
        "resumed {:?} after the port reopened",
        reopened.elapsed()
    );
    assert_eq!(dispatch.seen()[1].body.to_text(), "during");
    assert!(problems(&resources, "amqp-reconnect").is_empty());
    shutdown.cancel();
    task.await.unwrap().unwrap();
    delete_queue(&channel, &queue).await;
}

#[tokio::test]
async fn source_with_an_unreachable_broker_stays_up_unhealthy_and_stops_on_shutdown() {
    let resources = Arc::new(Resources::default());
    let (task, shutdown) = start_source(
        json!({"url": "amqp://guest:guest@127.0.0.1:1/%2f", "queue": "nowhere"}),
        acking(),
        &resources,
        "amqp-down",
    );
    wait_until("an unhealthy report", Duration::from_secs(5), || {
        !problems(&resources, "amqp-down").is_empty()
    })
    .await;
    let reason = problems(&resources, "amqp-down")[0].1.clone();
    assert!(
        reason.contains("cannot reach RabbitMQ at amqp://127.0.0.1:1/%2f"),
        "{reason}"
    );
    assert!(!task.is_finished(), "the source must keep retrying");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("stops promptly")
        .unwrap()
        .unwrap();
}

fn build_amqp_sink(config: Value, resources: &Arc<Resources>) -> Arc<dyn sluice_core::Sink> {
    build_sink("amqp", config, resources).unwrap()
}

#[tokio::test]
async fn sink_publishes_concurrently_with_confirms_properties_and_headers() {
    if !service("RabbitMQ", ADDR).await {
        return;
    }
    let queue = unique("sluice_amqp_sink");
    let resources = Arc::new(Resources::default());
    let sink = build_amqp_sink(
        json!({
            "url": URL, "routing_key": "{target}", "content_type": "application/json",
            "declare": {"queues": [{"name": queue}]}
        }),
        &resources,
    );
    let messages: Vec<Message> = (0..50)
        .map(|i| {
            Message::json(json!({"n": i}))
                .with_header("target", queue.clone())
                .with_header("tenant", "acme")
                .with_header("amqp.routing_key", "ignored")
        })
        .collect();
    let results = futures_util::future::join_all(messages.iter().map(|m| sink.deliver(m))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let (_conn, channel) = client().await;
    let got = wait_for_messages(&channel, &queue, 50, Duration::from_secs(5)).await;
    let mut ns: Vec<i64> = got
        .iter()
        .map(|d| {
            serde_json::from_slice::<Value>(&d.data).unwrap()["n"]
                .as_i64()
                .unwrap()
        })
        .collect();
    ns.sort_unstable();
    assert_eq!(ns, (0..50).collect::<Vec<_>>());
    let p = &got[0].properties;
    assert_eq!(p.delivery_mode(), &Some(2));
    assert_eq!(
        p.content_type().as_ref().map(ShortString::as_str),
        Some("application/json")
    );
    let ids: std::collections::BTreeSet<String> =
        messages.iter().map(|m| m.id().to_string()).collect();
    assert!(ids.contains(p.message_id().as_ref().unwrap().as_str()));
    let headers = p.headers().as_ref().unwrap().inner();
    assert_eq!(
        headers.get("tenant"),
        Some(&AMQPValue::LongString("acme".into()))
    );
    assert!(!headers.contains_key("amqp.routing_key"));
    assert!(problems(&resources, "test-flow").is_empty());
    delete_queue(&channel, &queue).await;
}

#[tokio::test]
async fn sink_fails_an_unroutable_message_instead_of_losing_it() {
    if !service("RabbitMQ", ADDR).await {
        return;
    }
    let exchange = unique("sluice_amqp_nowhere");
    let resources = Arc::new(Resources::default());
    let sink = build_amqp_sink(
        json!({
            "url": URL, "exchange": exchange, "routing_key": "no.binding",
            "declare": {"exchanges": [{"name": exchange, "durable": false, "auto_delete": true}]}
        }),
        &resources,
    );
    let err = sink.deliver(&Message::json(json!(1))).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Remote);
    assert_eq!(err.remote_status, Some(312));
    assert!(err.detail.contains("unroutable"), "{}", err.detail);
    assert!(err.detail.contains("no.binding"), "{}", err.detail);

    // Without `mandatory` the broker confirms and drops it: allowed only when asked for.
    let lax = build_amqp_sink(
        json!({"url": URL, "exchange": exchange, "routing_key": "no.binding", "mandatory": false,
               "declare": {"exchanges": [{"name": exchange, "durable": false, "auto_delete": true}]}}),
        &resources,
    );
    lax.deliver(&Message::json(json!(1))).await.unwrap();
}

#[tokio::test]
async fn sink_reports_a_missing_exchange_and_keeps_publishing_afterwards() {
    if !service("RabbitMQ", ADDR).await {
        return;
    }
    let queue = unique("sluice_amqp_chan");
    let resources = Arc::new(Resources::default());
    let sink = build_amqp_sink(
        json!({"url": URL, "exchange": "{ex}", "routing_key": queue,
               "declare": {"queues": [{"name": queue}]}}),
        &resources,
    );
    let missing = Message::json(json!("lost?")).with_header("ex", unique("sluice_no_such_ex"));
    let err = sink.deliver(&missing).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Remote, "{err:?}");
    assert!(err.detail.contains("NOT_FOUND"), "{}", err.detail);
    // The channel the broker closed is replaced on the next delivery.
    let good = Message::json(json!("ok")).with_header("ex", "");
    sink.deliver(&good).await.unwrap();
    let (_conn, channel) = client().await;
    let got = wait_for_messages(&channel, &queue, 1, Duration::from_secs(5)).await;
    assert_eq!(got[0].data, br#""ok""#);
    delete_queue(&channel, &queue).await;
}

#[tokio::test]
async fn sink_reconnects_after_an_outage_and_reports_health() {
    if !service("RabbitMQ", ADDR).await {
        return;
    }
    let queue = unique("sluice_amqp_sink_re");
    let proxy = TcpProxy::start(ADDR.parse().unwrap()).await;
    let resources = Arc::new(Resources::default());
    let sink = build_amqp_sink(
        json!({"url": url_via(proxy.addr()), "routing_key": queue,
               "declare": {"queues": [{"name": queue}]}}),
        &resources,
    );
    sink.deliver(&Message::json(json!(1))).await.unwrap();
    proxy.down().await;
    let err = sink.deliver(&Message::json(json!(2))).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err:?}");
    assert!(err.detail.contains("RabbitMQ at"), "{}", err.detail);
    // A second failure reaches the reconnect path, which reports the component unhealthy.
    let _ = sink.deliver(&Message::json(json!(2))).await;
    assert!(!problems(&resources, "test-flow").is_empty());
    proxy.up().await;
    let reopened = Instant::now();
    loop {
        match sink.deliver(&Message::json(json!(2))).await {
            Ok(()) => break,
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::Unavailable, "{e:?}");
                assert!(reopened.elapsed() < Duration::from_secs(3), "{e:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(problems(&resources, "test-flow").is_empty());
    let (_conn, channel) = client().await;
    let got = wait_for_messages(&channel, &queue, 2, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 2);
    delete_queue(&channel, &queue).await;
}

#[tokio::test]
async fn source_to_sink_keeps_headers_and_properties() {
    if !service("RabbitMQ", ADDR).await {
        return;
    }
    let inbound = unique("sluice_amqp_in");
    let outbound = unique("sluice_amqp_out");
    let (_conn, channel) = client().await;
    declare_queue(&channel, &inbound, FieldTable::default()).await;
    declare_queue(&channel, &outbound, FieldTable::default()).await;
    let mut headers = FieldTable::default();
    headers.insert("tenant".into(), AMQPValue::LongString("acme".into()));
    let props = BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_message_id("m-1".into())
        .with_correlation_id("c-1".into())
        .with_priority(3)
        .with_headers(headers);
    publish(&channel, &inbound, b"hello", props).await;

    let resources = Arc::new(Resources::default());
    let sink = build_amqp_sink(json!({"url": URL, "routing_key": outbound}), &resources);
    let dispatch = TestDispatch::new(move |m: Message| {
        let sink = Arc::clone(&sink);
        async move {
            match sink.deliver(&m).await {
                Ok(()) => {
                    m.ack();
                    Ok(vec![])
                }
                Err(e) => Err(Failure::new(m, e)),
            }
        }
    });
    let (task, shutdown) = start_source(
        json!({"url": URL, "queue": inbound}),
        Arc::clone(&dispatch),
        &resources,
        "amqp-bridge",
    );
    let got = wait_for_messages(&channel, &outbound, 1, Duration::from_secs(10)).await;
    let d = &got[0];
    assert_eq!(d.data, b"hello");
    let p = &d.properties;
    let s = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
    assert_eq!(s(p.content_type()).as_deref(), Some("text/plain"));
    assert_eq!(s(p.message_id()).as_deref(), Some("m-1"));
    assert_eq!(s(p.correlation_id()).as_deref(), Some("c-1"));
    assert_eq!(p.priority(), &Some(3));
    let h = p.headers().as_ref().unwrap().inner();
    assert_eq!(h.get("tenant"), Some(&AMQPValue::LongString("acme".into())));
    assert!(h.keys().all(|k| !k.as_str().starts_with("amqp.")), "{h:?}");
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert!(drain(&channel, &inbound).await.is_empty());
    delete_queue(&channel, &inbound).await;
    delete_queue(&channel, &outbound).await;
}

/// Not a benchmark, a guard: confirms must be pipelined across concurrent deliveries, so a few
/// thousand persistent messages take well under a second per thousand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_throughput_with_pipelined_confirms() {
    if !service("RabbitMQ", ADDR).await {
        return;
    }
    let queue = unique("sluice_amqp_tput");
    let resources = Arc::new(Resources::default());
    let sink = build_amqp_sink(
        json!({"url": URL, "routing_key": queue, "declare": {"queues": [{"name": queue}]}}),
        &resources,
    );
    sink.deliver(&Message::json(json!("warm-up")))
        .await
        .unwrap();
    let total = 4000usize;
    let concurrency = 64usize;
    let body = json!({"order": "x".repeat(200)});
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let sink = Arc::clone(&sink);
        let body = body.clone();
        tasks.spawn(async move {
            for _ in (worker..total).step_by(concurrency) {
                sink.deliver(&Message::json(body.clone())).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let elapsed = started.elapsed();
    let rate = total as f64 / elapsed.as_secs_f64();
    eprintln!(
        "amqp sink: {total} persistent messages with confirms, {concurrency} concurrent: {elapsed:?} ({rate:.0} msg/s)"
    );
    assert!(elapsed < Duration::from_secs(20), "too slow: {elapsed:?}");
    let (_conn, channel) = client().await;
    let declared = channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(declared.message_count() as usize, total + 1);
    delete_queue(&channel, &queue).await;
}

/// The source's throughput end to end: publish, consume, ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_throughput_with_prefetch() {
    if !service("RabbitMQ", ADDR).await {
        return;
    }
    let queue = unique("sluice_amqp_src_tput");
    let (_conn, channel) = client().await;
    declare_queue(&channel, &queue, FieldTable::default()).await;
    let total = 4000usize;
    for _ in 0..total {
        // Unconfirmed one by one: the final wait covers them all.
        drop(
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    b"{\"order\":1}",
                    BasicProperties::default(),
                )
                .await
                .unwrap(),
        );
    }
    channel.wait_for_confirms().await.unwrap();
    let resources = Arc::new(Resources::default());
    let dispatch = acking();
    let started = Instant::now();
    let (task, shutdown) = start_source(
        json!({"url": URL, "queue": queue, "prefetch": 200}),
        Arc::clone(&dispatch),
        &resources,
        "amqp-tput",
    );
    wait_until("every message", Duration::from_secs(30), || {
        dispatch.count() == total
    })
    .await;
    let elapsed = started.elapsed();
    eprintln!(
        "amqp source: {total} messages consumed and acked: {elapsed:?} ({:.0} msg/s)",
        total as f64 / elapsed.as_secs_f64()
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert!(drain(&channel, &queue).await.is_empty());
    delete_queue(&channel, &queue).await;
}
