//! The `mqtt` source and sink against the real Mosquitto on 127.0.0.1:1883. Every behaviour test
//! runs for both protocols (`v3_1_1::` and `v5::`, see the end of the file); the plain clients
//! around them speak 3.1.1 except in the MQTT 5 property tests, so the two versions also meet.
#![cfg(feature = "mqtt")]
// Test helpers outside #[test] fns may panic on a broken fixture: that is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::needless_pass_by_value
)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Publish, QoS};
use serde_json::{Value, json};
use sluice_core::{ComponentHealth, ErrorKind, Failure, Message, ProcessError, Resources};
use sluice_testkit::proxy::TcpProxy;
use sluice_testkit::{service, unique};
use tokio::sync::mpsc;

const ADDR: &str = "127.0.0.1:1883";
const URL: &str = "mqtt://127.0.0.1:1883";

/// A plain client: publishes with QoS 1 and waits for each PUBACK.
struct Publisher {
    client: AsyncClient,
    acks: mpsc::UnboundedReceiver<()>,
}

async fn publisher() -> Publisher {
    let options = MqttOptions::new(unique("pub"), "127.0.0.1", 1883);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let (tx, acks) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Incoming::PubAck(_)) = event {
                let _ = tx.send(());
            }
        }
    });
    Publisher { client, acks }
}

impl Publisher {
    async fn send(&mut self, topic: &str, body: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, body.to_vec())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.acks.recv())
            .await
            .expect("puback")
            .unwrap();
    }
}

/// A plain subscriber to `filter`; returns once the broker confirmed the subscription.
async fn subscriber(filter: &str) -> mpsc::UnboundedReceiver<Publish> {
    let options = MqttOptions::new(unique("sub"), "127.0.0.1", 1883);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    // QoS 1 on the way out: this test client is about the sink, and rumqttc stalls on
    // incoming QoS 2 bursts from Mosquitto.
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (subscribed, ready) = tokio::sync::oneshot::channel();
    let mut subscribed = Some(subscribed);
    tokio::spawn(async move {
        let _client = client;
        while let Ok(event) = eventloop.poll().await {
            match event {
                Event::Incoming(Incoming::SubAck(_)) => {
                    if let Some(s) = subscribed.take() {
                        let _ = s.send(());
                    }
                }
                Event::Incoming(Incoming::Publish(p)) => {
                    let _ = tx.send(p);
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), ready)
        .await
        .expect("suback")
        .unwrap();
    rx
}

async fn receive(rx: &mut mpsc::UnboundedReceiver<Publish>, n: usize) -> Vec<Publish> {
    let mut out = Vec::new();
    while out.len() < n {
        let p = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} messages arrived", out.len()))
            .unwrap();
        out.push(p);
    }
    out
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

fn acking() -> Arc<TestDispatch> {
    TestDispatch::new(|m: Message| async move {
        m.ack();
        Ok(vec![])
    })
}

fn start_source(
    config: Value,
    dispatch: Arc<TestDispatch>,
    resources: &Arc<Resources>,
    flow: &str,
) -> (
    tokio::task::JoinHandle<Result<(), sluice_core::SourceError>>,
    tokio_util::sync::CancellationToken,
) {
    let source = build_source("mqtt", config, resources).unwrap();
    let (ctx, shutdown) = source_ctx(dispatch, resources, flow);
    (tokio::spawn(source.run(ctx)), shutdown)
}

/// Waits until a source subscribed to `topic` receives a probe message (the subscription is in
/// place), then forgets the probes.
async fn wait_subscribed(publisher: &mut Publisher, topic: &str, dispatch: &TestDispatch) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while dispatch.count() == 0 {
        assert!(Instant::now() < deadline, "the source never subscribed");
        publisher.send(topic, b"probe").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    dispatch.seen.lock().unwrap().clear();
}

async fn source_maps_wildcard_topics_to_headers_in_order(protocol: &str) {
    if !service("Mosquitto", ADDR).await {
        return;
    }
    let base = unique("sluice_mqtt_src");
    let resources = Arc::new(Resources::default());
    let dispatch = acking();
    let (task, shutdown) = start_source(
        json!({"protocol": protocol, "url": URL, "topics": [format!("{base}/+/temp"), format!("{base}/probe")], "clean_session": true}),
        Arc::clone(&dispatch),
        &resources,
        "mqtt-in",
    );
    let mut p = publisher().await;
    wait_subscribed(&mut p, &format!("{base}/probe"), &dispatch).await;
    for i in 0..20 {
        p.send(
            &format!("{base}/s{}/temp", i % 3),
            format!("{{\"n\":{i}}}").as_bytes(),
        )
        .await;
    }
    wait_until("20 messages", Duration::from_secs(10), || {
        dispatch.count() == 20
    })
    .await;
    for (i, m) in dispatch.seen().iter().enumerate() {
        assert_eq!(m.body.json().unwrap(), &json!({"n": i}));
        assert_eq!(m.headers["mqtt.topic"], format!("{base}/s{}/temp", i % 3));
        assert_eq!(m.headers["mqtt.qos"], "1");
        assert_eq!(m.headers["mqtt.retain"], "false");
        assert_eq!(m.headers["mqtt.dup"], "false");
        assert_eq!(m.meta.origin.as_deref(), Some("mqtt-in"));
    }
    assert!(problems(&resources, "mqtt-in").is_empty());
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stops")
        .unwrap()
        .unwrap();
}

async fn source_persistent_session_gets_what_was_published_while_it_was_down(protocol: &str) {
    if !service("Mosquitto", ADDR).await {
        return;
    }
    let topic = unique("sluice_mqtt_persist");
    let client_id = unique("sluice-it");
    let config = json!({"protocol": protocol, "url": URL, "topics": topic, "client_id": client_id, "qos": 1});
    let resources = Arc::new(Resources::default());
    let first = acking();
    let (task, shutdown) = start_source(
        config.clone(),
        Arc::clone(&first),
        &resources,
        "mqtt-persist",
    );
    let mut p = publisher().await;
    wait_subscribed(&mut p, &topic, &first).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();

    // The runtime is down: the broker queues these for the session.
    for i in 0..5 {
        p.send(&topic, format!("{i}").as_bytes()).await;
    }
    let second = acking();
    let (task, shutdown) = start_source(config, Arc::clone(&second), &resources, "mqtt-persist");
    wait_until("the queued messages", Duration::from_secs(10), || {
        second.count() >= 5
    })
    .await;
    let bodies: Vec<String> = second.seen().iter().map(|m| m.body.to_text()).collect();
    assert_eq!(bodies, ["0", "1", "2", "3", "4"]);
    shutdown.cancel();
    task.await.unwrap().unwrap();

    // They were acknowledged: a third session gets nothing more.
    let third = acking();
    let (task, shutdown) = start_source(
        json!({"protocol": protocol, "url": URL, "topics": topic, "client_id": client_id, "clean_session": true}),
        Arc::clone(&third),
        &resources,
        "mqtt-persist",
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(third.count(), 0);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

async fn source_failed_message_is_delivered_again(protocol: &str) {
    if !service("Mosquitto", ADDR).await {
        return;
    }
    let topic = unique("sluice_mqtt_redeliver");
    let resources = Arc::new(Resources::default());
    let dispatch = TestDispatch::new(|m: Message| async move {
        if m.body.to_text() == "fragile" && m.headers["mqtt.dup"] == "false" {
            let error = ProcessError::new(ErrorKind::Unavailable, "target down");
            return Err(Failure::new(m, error));
        }
        m.ack();
        Ok(vec![])
    });
    let (task, shutdown) = start_source(
        json!({"protocol": protocol, "url": URL, "topics": topic, "client_id": unique("sluice-it"), "redelivery_delay": "50ms"}),
        Arc::clone(&dispatch),
        &resources,
        "mqtt-redeliver",
    );
    let mut p = publisher().await;
    wait_subscribed(&mut p, &topic, &dispatch).await;
    p.send(&topic, b"fragile").await;
    wait_until("the redelivery", Duration::from_secs(10), || {
        dispatch
            .seen()
            .iter()
            .any(|m| m.body.to_text() == "fragile" && m.headers["mqtt.dup"] == "true")
    })
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

async fn source_reconnects_after_the_broker_goes_away(protocol: &str) {
    if !service("Mosquitto", ADDR).await {
        return;
    }
    let topic = unique("sluice_mqtt_reconnect");
    let proxy = TcpProxy::start(ADDR.parse().unwrap()).await;
    let resources = Arc::new(Resources::default());
    let dispatch = acking();
    let (task, shutdown) = start_source(
        json!({"protocol": protocol, "url": format!("mqtt://{}", proxy.addr()), "topics": topic, "client_id": unique("sluice-it")}),
        Arc::clone(&dispatch),
        &resources,
        "mqtt-reconnect",
    );
    let mut p = publisher().await;
    wait_subscribed(&mut p, &topic, &dispatch).await;
    proxy.down().await;
    wait_until("an unhealthy report", Duration::from_secs(10), || {
        !problems(&resources, "mqtt-reconnect").is_empty()
    })
    .await;
    assert!(
        problems(&resources, "mqtt-reconnect")[0]
            .1
            .contains("MQTT broker at mqtt://127.0.0.1:")
    );
    // Published while the source is cut off: kept by its persistent session.
    p.send(&topic, b"during").await;
    proxy.up().await;
    let reopened = Instant::now();
    wait_until(
        "the message sent during the outage",
        Duration::from_secs(10),
        || dispatch.seen().iter().any(|m| m.body.to_text() == "during"),
    )
    .await;
    assert!(
        reopened.elapsed() < Duration::from_secs(3),
        "{:?}",
        reopened.elapsed()
    );
    assert!(problems(&resources, "mqtt-reconnect").is_empty());
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

async fn source_with_an_unreachable_broker_stays_up_unhealthy(protocol: &str) {
    let resources = Arc::new(Resources::default());
    let (task, shutdown) = start_source(
        json!({"protocol": protocol, "url": "mqtt://127.0.0.1:1", "topics": "x"}),
        acking(),
        &resources,
        "mqtt-down",
    );
    wait_until("an unhealthy report", Duration::from_secs(5), || {
        !problems(&resources, "mqtt-down").is_empty()
    })
    .await;
    let reason = problems(&resources, "mqtt-down")[0].1.clone();
    assert!(
        reason.contains("cannot reach MQTT broker at mqtt://127.0.0.1:1"),
        "{reason}"
    );
    assert!(!task.is_finished());
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("stops promptly")
        .unwrap()
        .unwrap();
}

async fn sink_publishes_with_acknowledgements_topic_from_header_and_retain(protocol: &str) {
    if !service("Mosquitto", ADDR).await {
        return;
    }
    let base = unique("sluice_mqtt_sink");
    let mut rx = subscriber(&format!("{base}/#")).await;
    let resources = Arc::new(Resources::default());
    for qos in [0, 1, 2] {
        let sink = build_sink(
            "mqtt",
            json!({"protocol": protocol, "url": URL, "topic": format!("{base}/{{device}}/cmd"), "qos": qos}),
            &resources,
        )
        .unwrap();
        let messages: Vec<Message> = (0..30)
            .map(|i| {
                Message::json(json!({"qos": qos, "n": i}))
                    .with_header("device", format!("d{}", i % 2))
            })
            .collect();
        let results =
            futures_util::future::join_all(messages.iter().map(|m| sink.deliver(m))).await;
        assert!(results.iter().all(Result::is_ok), "qos {qos}: {results:?}");
        let got = receive(&mut rx, 30).await;
        let mut ns: Vec<i64> = got
            .iter()
            .map(|p| {
                let v: Value = serde_json::from_slice(&p.payload).unwrap();
                assert_eq!(v["qos"], qos);
                let n = v["n"].as_i64().unwrap();
                assert_eq!(p.topic, format!("{base}/d{}/cmd", n % 2));
                n
            })
            .collect();
        ns.sort_unstable();
        assert_eq!(ns, (0..30).collect::<Vec<_>>());
    }
    let missing = build_sink(
        "mqtt",
        json!({"protocol": protocol, "url": URL, "topic": "{nope}"}),
        &resources,
    )
    .unwrap();
    let err = missing.deliver(&Message::json(json!(1))).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidInput);

    // Retained: a subscriber arriving later still gets the last value.
    let retained = build_sink(
        "mqtt",
        json!({"protocol": protocol, "url": URL, "topic": format!("{base}/status"), "retain": true}),
        &resources,
    )
    .unwrap();
    retained.deliver(&Message::bytes("up")).await.unwrap();
    let mut late = subscriber(&format!("{base}/status")).await;
    let got = receive(&mut late, 1).await;
    assert_eq!(&got[0].payload[..], b"up");
    assert!(got[0].retain);
    // Clear the retained message so the broker does not keep test data.
    retained.deliver(&Message::bytes("")).await.unwrap();
    assert!(problems(&resources, "test-flow").is_empty());
}

async fn sink_fails_while_the_broker_is_away_and_recovers(protocol: &str) {
    if !service("Mosquitto", ADDR).await {
        return;
    }
    let topic = unique("sluice_mqtt_sink_re");
    let mut rx = subscriber(&topic).await;
    let proxy = TcpProxy::start(ADDR.parse().unwrap()).await;
    let resources = Arc::new(Resources::default());
    let sink = build_sink(
        "mqtt",
        json!({"protocol": protocol, "url": format!("mqtt://{}", proxy.addr()), "topic": topic}),
        &resources,
    )
    .unwrap();
    sink.deliver(&Message::bytes("1")).await.unwrap();
    proxy.down().await;
    let err = sink.deliver(&Message::bytes("2")).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err:?}");
    assert!(err.detail.contains("MQTT broker at"), "{}", err.detail);
    assert!(!problems(&resources, "test-flow").is_empty());
    proxy.up().await;
    let reopened = Instant::now();
    loop {
        match sink.deliver(&Message::bytes("2")).await {
            Ok(()) => break,
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::Unavailable, "{e:?}");
                assert!(reopened.elapsed() < Duration::from_secs(3), "{e:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(problems(&resources, "test-flow").is_empty());
    let got = receive(&mut rx, 2).await;
    assert_eq!(&got[1].payload[..], b"2");
}

async fn sink_throughput_qos1(protocol: &str) {
    if !service("Mosquitto", ADDR).await {
        return;
    }
    let topic = unique("sluice_mqtt_tput");
    let mut rx = subscriber(&topic).await;
    let resources = Arc::new(Resources::default());
    let sink = build_sink(
        "mqtt",
        json!({"protocol": protocol, "url": URL, "topic": topic}),
        &resources,
    )
    .unwrap();
    sink.deliver(&Message::bytes("warm-up")).await.unwrap();
    assert_eq!(receive(&mut rx, 1).await.len(), 1);
    // Rounds of 500 with the subscriber drained between them: Mosquitto drops messages queued
    // for a slow subscriber beyond `max_queued_messages` (1000 by default), which on a busy
    // machine would fail the test for the broker's policy, not the sink's.
    let (rounds, per_round, workers) = (8usize, 500usize, 64usize);
    let mut sending = Duration::ZERO;
    for round in 0..rounds {
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..workers {
            let sink = Arc::clone(&sink);
            tasks.spawn(async move {
                for i in (worker..per_round).step_by(workers) {
                    let body = format!("{round}-{i}");
                    sink.deliver(&Message::bytes(body)).await.unwrap();
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        sending += started.elapsed();
        // Every acknowledged message of the round reached the subscriber, once.
        let got = receive(&mut rx, per_round).await;
        let distinct: std::collections::HashSet<_> =
            got.iter().map(|p| p.payload.clone()).collect();
        assert_eq!(
            distinct.len(),
            per_round,
            "round {round}: duplicates among {got:?}"
        );
        assert!(
            got.iter()
                .all(|p| p.payload.starts_with(format!("{round}-").as_bytes()))
        );
    }
    let total = rounds * per_round;
    eprintln!(
        "mqtt sink: {total} QoS 1 messages, {workers} concurrent: {sending:?} sending ({:.0} msg/s)",
        total as f64 / sending.as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// MQTT 5 only: properties and session expiry, with MQTT 5 clients on the other side.

use rumqttc::v5::mqttbytes::v5::{Publish as Publish5, PublishProperties};

/// An MQTT 5 client that publishes with QoS 1 and properties, waiting for each PUBACK.
async fn publish5(topic: &str, body: &[u8], properties: PublishProperties) {
    let options = rumqttc::v5::MqttOptions::new(unique("pub5"), "127.0.0.1", 1883);
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 10);
    client
        .publish_with_properties(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            body.to_vec(),
            properties,
        )
        .await
        .unwrap();
    let acked = async {
        loop {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_)) =
                eventloop.poll().await.unwrap()
            {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), acked)
        .await
        .expect("puback");
}

/// An MQTT 5 subscriber to `filter`; returns once the broker confirmed the subscription.
async fn subscriber5(filter: &str) -> mpsc::UnboundedReceiver<Publish5> {
    let options = rumqttc::v5::MqttOptions::new(unique("sub5"), "127.0.0.1", 1883);
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 10);
    client
        .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (subscribed, ready) = tokio::sync::oneshot::channel();
    let mut subscribed = Some(subscribed);
    tokio::spawn(async move {
        let _client = client;
        while let Ok(event) = eventloop.poll().await {
            use rumqttc::v5::mqttbytes::v5::Packet;
            match event {
                rumqttc::v5::Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(s) = subscribed.take() {
                        let _ = s.send(());
                    }
                }
                rumqttc::v5::Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send(p);
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), ready)
        .await
        .expect("suback")
        .unwrap();
    rx
}

#[tokio::test]
async fn v5_source_maps_user_properties_and_content_type_to_headers() {
    if !service("Mosquitto", ADDR).await {
        return;
    }
    let base = unique("sluice_mqtt5_props");
    let resources = Arc::new(Resources::default());
    let dispatch = acking();
    let (task, shutdown) = start_source(
        json!({"protocol": "5", "url": URL, "topics": format!("{base}/#"), "clean_session": true, "qos": 2}),
        Arc::clone(&dispatch),
        &resources,
        "mqtt5-in",
    );
    let mut p = publisher().await;
    wait_subscribed(&mut p, &format!("{base}/probe"), &dispatch).await;
    let properties = PublishProperties {
        user_properties: vec![
            ("tenant".into(), "acme".into()),
            ("tenant".into(), "second value".into()),
            ("mqtt.topic".into(), "forged".into()),
            ("x-seq".into(), "7".into()),
        ],
        content_type: Some("application/json".into()),
        ..PublishProperties::default()
    };
    publish5(&format!("{base}/eu/orders"), br#"{"n":7}"#, properties).await;
    wait_until("the message", Duration::from_secs(10), || {
        dispatch.count() == 1
    })
    .await;
    let m = &dispatch.seen()[0];
    assert_eq!(m.body.json().unwrap(), &json!({"n": 7}));
    assert_eq!(m.headers["tenant"], "acme");
    assert_eq!(m.headers["x-seq"], "7");
    assert_eq!(m.headers["content-type"], "application/json");
    assert_eq!(m.headers["mqtt.topic"], format!("{base}/eu/orders"));
    assert_eq!(m.headers["mqtt.qos"], "1");
    assert_eq!(m.headers["mqtt.retain"], "false");
    // A 3.1.1 publisher's message has no properties: only the mqtt.* headers.
    p.send(&format!("{base}/plain"), b"1").await;
    wait_until("the plain message", Duration::from_secs(10), || {
        dispatch.count() == 2
    })
    .await;
    let plain = &dispatch.seen()[1];
    assert!(
        plain.headers.keys().all(|k| k.starts_with("mqtt.")),
        "{:?}",
        plain.headers
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn v5_sink_sends_headers_as_user_properties_and_the_content_type() {
    if !service("Mosquitto", ADDR).await {
        return;
    }
    let base = unique("sluice_mqtt5_sink");
    let mut rx = subscriber5(&format!("{base}/#")).await;
    let resources = Arc::new(Resources::default());
    for qos in [0, 1, 2] {
        let sink = build_sink(
            "mqtt",
            json!({"protocol": "5", "url": URL, "topic": format!("{base}/{{region}}"), "qos": qos, "content_type": "application/json"}),
            &resources,
        )
        .unwrap();
        let tagged = Message::json(json!({"qos": qos}))
            .with_header("region", "eu")
            .with_header("tenant", "acme")
            .with_header("mqtt.topic", "where it came from");
        sink.deliver(&tagged).await.unwrap();
        let text = Message::bytes("plain text")
            .with_header("region", "us")
            .with_header("content-type", "text/plain");
        sink.deliver(&text).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            (rx.recv().await.unwrap(), rx.recv().await.unwrap())
        })
        .await
        .expect("both messages");
        let (first, second) = if got.0.topic.ends_with(b"/eu") {
            got
        } else {
            (got.1, got.0)
        };
        let props = first.properties.unwrap();
        let mut user = props.user_properties.clone();
        user.sort();
        assert_eq!(
            user,
            vec![
                ("region".to_owned(), "eu".to_owned()),
                ("tenant".to_owned(), "acme".to_owned())
            ],
            "qos {qos}"
        );
        assert_eq!(props.content_type.as_deref(), Some("application/json"));
        let props = second.properties.unwrap();
        assert_eq!(props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(
            props.user_properties,
            vec![("region".to_owned(), "us".to_owned())]
        );
        assert_eq!(&second.payload[..], b"plain text");
    }
    assert!(problems(&resources, "test-flow").is_empty());
}

#[tokio::test]
async fn v5_session_expiry_ends_the_session() {
    if !service("Mosquitto", ADDR).await {
        return;
    }
    let topic = unique("sluice_mqtt5_expiry");
    let client_id = unique("sluice-it");
    let config = json!({"protocol": "5", "url": URL, "topics": topic, "client_id": client_id, "session_expiry": "1s"});
    let resources = Arc::new(Resources::default());
    let first = acking();
    let (task, shutdown) =
        start_source(config.clone(), Arc::clone(&first), &resources, "mqtt5-exp");
    let mut p = publisher().await;
    wait_subscribed(&mut p, &topic, &first).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    // Past the expiry (Mosquitto checks expiries about once a second): the session is gone, so
    // this message is kept for nobody.
    tokio::time::sleep(Duration::from_secs(3)).await;
    p.send(&topic, b"while expired").await;
    let second = acking();
    let (task, shutdown) = start_source(config, Arc::clone(&second), &resources, "mqtt5-exp");
    // A new session subscribes again; a probe that arrives shows it is in place, and anything
    // the broker had kept would have been delivered before it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !second.seen().iter().any(|m| m.body.to_text() == "probe") {
        assert!(Instant::now() < deadline, "the source never subscribed");
        p.send(&topic, b"probe").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        second
            .seen()
            .iter()
            .all(|m| m.body.to_text() != "while expired"),
        "an expired session kept a message"
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[test]
fn mqtt5_settings_with_3_1_1_name_the_field() {
    let resources = Arc::new(Resources::default());
    let err = build_err(build_source(
        "mqtt",
        json!({"url": URL, "topics": "a", "session_expiry": "1h"}),
        &resources,
    ));
    assert_eq!(err.field.as_deref(), Some("session_expiry"));
    assert!(err.message.contains("protocol: \"5\""), "{}", err.message);
    let err = build_err(build_source(
        "mqtt",
        json!({"protocol": "5", "url": URL, "topics": "a", "session_expiry": "1h", "clean_session": true}),
        &resources,
    ));
    assert_eq!(err.field.as_deref(), Some("session_expiry"));
    let err = build_err(build_sink(
        "mqtt",
        json!({"url": URL, "topic": "a", "content_type": "text/plain"}),
        &resources,
    ));
    assert_eq!(err.field.as_deref(), Some("content_type"));
    assert!(
        build_source(
            "mqtt",
            json!({"protocol": "5", "url": URL, "topics": "a", "session_expiry": "1d"}),
            &resources
        )
        .is_ok()
    );
}

/// Runs each behaviour test above once per protocol version, on the runtime its attribute names
/// (the source tests keep the current-thread runtime: the recording dispatch notes a message when
/// its task runs, which on one thread is the admission order).
macro_rules! for_both_protocols {
    ($(#[$runtime:meta] $name:ident),* $(,)?) => {
        mod v3_1_1 {
            $(
                #[$runtime]
                async fn $name() {
                    super::$name("3.1.1").await;
                }
            )*
        }
        mod v5 {
            $(
                #[$runtime]
                async fn $name() {
                    super::$name("5").await;
                }
            )*
        }
    };
}

for_both_protocols!(
    #[tokio::test]
    source_maps_wildcard_topics_to_headers_in_order,
    #[tokio::test]
    source_persistent_session_gets_what_was_published_while_it_was_down,
    #[tokio::test]
    source_failed_message_is_delivered_again,
    #[tokio::test]
    source_reconnects_after_the_broker_goes_away,
    #[tokio::test]
    source_with_an_unreachable_broker_stays_up_unhealthy,
    #[tokio::test]
    sink_publishes_with_acknowledgements_topic_from_header_and_retain,
    #[tokio::test]
    sink_fails_while_the_broker_is_away_and_recovers,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    sink_throughput_qos1,
);
