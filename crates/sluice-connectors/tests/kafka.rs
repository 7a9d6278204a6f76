//! The `kafka` source and sink against a real Kafka-protocol broker: tansu on 127.0.0.1:19092
//! (started by scripts/services.sh, memory storage).
#![cfg(feature = "kafka")]
// Test helpers outside #[test] fns may panic on a broken fixture: that is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::needless_pass_by_value
)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{Value, json};
use sluice_core::{
    ComponentHealth, ErrorKind, Failure, Message, ProcessError, Resources, SourceError,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const BROKER: &str = "127.0.0.1:19092";

async fn up() -> bool {
    sluice_testkit::service("tansu (Kafka)", BROKER).await
}

/// Creates `name` with `partitions` partitions through the admin API.
async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", BROKER)
        .create()
        .unwrap();
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(
            &[topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    for r in results {
        r.unwrap();
    }
}

async fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    for _ in 0..secs * 20 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn start(
    mut config: Value,
    dispatch: Arc<TestDispatch>,
    res: &Arc<Resources>,
) -> (JoinHandle<Result<(), SourceError>>, CancellationToken) {
    // tansu answers a group join only after about half the session timeout (45s by default).
    if config.get("properties").is_none() {
        config["properties"] = json!({"session.timeout.ms": "6000"});
    }
    let source = build_source("kafka", config, res).expect("builds");
    let (ctx, shutdown) = source_ctx(dispatch, res, "kafka-in");
    (tokio::spawn(source.run(ctx)), shutdown)
}

/// Produces `n` messages `{"seq": i}` through the sink, key `k<i % 3>`, header `seq`.
async fn produce(topic: &str, range: std::ops::Range<usize>) {
    produce_to(BROKER, topic, range).await;
}

async fn produce_to(brokers: &str, topic: &str, range: std::ops::Range<usize>) {
    let res = Arc::new(Resources::default());
    let sink = build_sink(
        "kafka",
        json!({"brokers": brokers, "topic": topic, "key": "{header.k}"}),
        &res,
    )
    .unwrap();
    for i in range {
        let msg = Message::json(json!({"seq": i}))
            .with_header("k", format!("k{}", i % 3))
            .with_header("seq", i.to_string())
            .with_header("kafka.offset", "must not be sent");
        sink.deliver(&msg).await.unwrap();
    }
}

fn seq(m: &Message) -> usize {
    m.headers["seq"].parse().unwrap()
}

/// The group's committed offsets on tansu, by partition.
fn committed(group: &str, topic: &str, partitions: i32) -> BTreeMap<i32, Option<i64>> {
    committed_on(BROKER, group, topic, partitions)
}

/// The group's committed offsets on `brokers`, by partition.
fn committed_on(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> BTreeMap<i32, Option<i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    got.elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            (e.partition(), offset)
        })
        .collect()
}

#[tokio::test]
async fn round_trip_keeps_content_headers_key_and_partition_order() {
    if !up().await {
        return;
    }
    let topic = sluice_testkit::unique("sluice_rt");
    create_topic(&topic, 3).await;
    produce(&topic, 0..30).await;

    let res = Arc::new(Resources::default());
    let dispatch = TestDispatch::echo();
    let group = sluice_testkit::unique("g");
    let (task, shutdown) = start(
        json!({"brokers": BROKER, "group_id": group, "topics": [topic], "commit_interval": "100ms"}),
        dispatch.clone(),
        &res,
    );
    wait_for("30 records", 30, || dispatch.count() >= 30).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();

    let seen = dispatch.seen();
    assert_eq!(seen.len(), 30, "each record exactly once");
    let mut per_key: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut per_partition: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for m in &seen {
        let n = seq(m);
        assert_eq!(m.body.json().unwrap(), &json!({"seq": n}));
        assert_eq!(m.headers["kafka.key"], format!("k{}", n % 3));
        assert_eq!(m.headers["k"], format!("k{}", n % 3), "record header kept");
        assert_eq!(m.headers["kafka.topic"], topic);
        assert_eq!(m.headers["kafka.delivery.count"], "1");
        assert_eq!(m.headers["kafka.timestamp_type"], "create_time");
        assert!(m.headers["kafka.timestamp"].parse::<i64>().unwrap() > 1_600_000_000_000);
        assert_ne!(m.headers["kafka.offset"], "must not be sent");
        per_key
            .entry(m.headers["kafka.key"].clone())
            .or_default()
            .push(n);
        per_partition
            .entry(m.headers["kafka.partition"].clone())
            .or_default()
            .push(m.headers["kafka.offset"].parse().unwrap());
    }
    // One key lives in one partition, and a partition is delivered in offset order.
    for (key, seqs) in &per_key {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, &sorted, "key {key} out of order");
        assert_eq!(seqs.len(), 10);
    }
    for (p, offsets) in &per_partition {
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "partition {p}: {offsets:?}"
        );
    }
    // Everything acknowledged was committed: one past each partition's last offset.
    let committed = committed(&group, &topic, 3);
    for (p, offsets) in &per_partition {
        let p: i32 = p.parse().unwrap();
        assert_eq!(
            committed[&p],
            Some(offsets.last().unwrap() + 1),
            "{committed:?}"
        );
    }
    assert!(
        ComponentHealth::of(&res).problems("kafka-in").is_empty(),
        "healthy once connected"
    );
}

#[tokio::test]
async fn nacked_record_is_redelivered_and_holds_back_the_commit() {
    if !up().await {
        return;
    }
    let topic = sluice_testkit::unique("sluice_nack");
    create_topic(&topic, 1).await;
    produce(&topic, 0..6).await;

    // Record 3 fails twice, then succeeds: later records wait for it (partition order).
    let failures = Arc::new(AtomicUsize::new(0));
    let fails = Arc::clone(&failures);
    let dispatch = TestDispatch::new(move |m: Message| {
        let fails = Arc::clone(&fails);
        async move {
            if seq(&m) == 3 && fails.fetch_add(1, Ordering::SeqCst) < 2 {
                return Err(Failure::new(
                    m,
                    ProcessError::new(ErrorKind::Unavailable, "target down"),
                ));
            }
            m.ack();
            Ok(vec![])
        }
    });
    let res = Arc::new(Resources::default());
    let group = sluice_testkit::unique("g");
    let (task, shutdown) = start(
        json!({"brokers": BROKER, "group_id": group, "topics": [topic],
               "commit_interval": "100ms", "redelivery_delay": "50ms"}),
        dispatch.clone(),
        &res,
    );
    wait_for("all records acked", 30, || dispatch.count() >= 8).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let order: Vec<(usize, String)> = dispatch
        .seen()
        .iter()
        .map(|m| (seq(m), m.headers["kafka.delivery.count"].clone()))
        .collect();
    assert_eq!(
        order,
        vec![
            (0, "1".into()),
            (1, "1".into()),
            (2, "1".into()),
            (3, "1".into()),
            (3, "2".into()),
            (3, "3".into()),
            (4, "1".into()),
            (5, "1".into()),
        ]
    );
    assert_eq!(committed(&group, &topic, 1)[&0], Some(6));
}

#[tokio::test]
async fn unacknowledged_records_are_delivered_again_after_a_restart() {
    if !up().await {
        return;
    }
    let topic = sluice_testkit::unique("sluice_restart");
    create_topic(&topic, 1).await;
    produce(&topic, 0..5).await;
    let group = sluice_testkit::unique("g");
    let config = json!({"brokers": BROKER, "group_id": group, "topics": [topic],
                        "commit_interval": "100ms", "ordering": "none"});

    // First run: records 0..2 are acknowledged, record 2 never settles (its flow hangs), 3 and 4
    // are acknowledged after it. The commit must stop at 2.
    let parked: Arc<Mutex<Vec<Message>>> = Arc::default();
    let park = Arc::clone(&parked);
    let dispatch = TestDispatch::new(move |m: Message| {
        let park = Arc::clone(&park);
        async move {
            if seq(&m) == 2 {
                park.lock().unwrap().push(m);
            } else {
                m.ack();
            }
            Ok(vec![])
        }
    });
    let res = Arc::new(Resources::default());
    let (task, shutdown) = start(config.clone(), dispatch.clone(), &res);
    wait_for("5 records", 30, || dispatch.count() >= 5).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        committed(&group, &topic, 1)[&0],
        Some(2),
        "not past record 2"
    );
    // Shutting down while record 2 is in flight: the runtime gives up on it.
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    parked
        .lock()
        .unwrap()
        .drain(..)
        .for_each(|m| m.nack("abandoned at shutdown"));
    task.await.unwrap().unwrap();
    assert_eq!(committed(&group, &topic, 1)[&0], Some(2));

    // Second run: delivery resumes at record 2; 0 and 1 are not delivered again.
    let again = TestDispatch::echo();
    let (task, shutdown) = start(config, again.clone(), &res);
    wait_for("3 records", 30, || again.count() >= 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let seqs: Vec<usize> = again.seen().iter().map(seq).collect();
    assert_eq!(seqs, vec![2, 3, 4]);
    assert_eq!(committed(&group, &topic, 1)[&0], Some(5));
}

/// Produces `{"seq": i}` with header `seq` for each `i` in `range` to partition `i % partitions`
/// (through the sink's fixed `partition`), so that every partition gets records: keys alone
/// may hash several keys to one partition and leave another empty.
async fn produce_spread(
    brokers: &str,
    topic: &str,
    partitions: i32,
    range: std::ops::Range<usize>,
) {
    let res = Arc::new(Resources::default());
    let sinks: Vec<_> = (0..partitions)
        .map(|p| {
            build_sink(
                "kafka",
                json!({"brokers": brokers, "topic": topic, "partition": p}),
                &res,
            )
            .unwrap()
        })
        .collect();
    for i in range {
        let msg = Message::json(json!({"seq": i})).with_header("seq", i.to_string());
        sinks[i % sinks.len()].deliver(&msg).await.unwrap();
    }
}

/// The partition of record `seq` written by [`produce_spread`].
fn partition_of(seq: usize, partitions: i32) -> i32 {
    i32::try_from(seq).unwrap() % partitions
}

/// Checks one member's deliveries of each partition: offsets go up one by one, except where the
/// member starts the partition again from its last commit after a rebalance (a step back, never
/// a jump forward or a swap).
fn assert_partition_order(member: &str, seen: &[Message]) {
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for m in seen {
        let p = m.headers["kafka.partition"].clone();
        let offset: i64 = m.headers["kafka.offset"].parse().unwrap();
        if let Some(&prev) = last.get(&p) {
            assert!(
                offset == prev + 1 || offset <= prev,
                "member {member}, partition {p}: offset {offset} after {prev}"
            );
        }
        last.insert(p, offset);
    }
}

/// The distinct seqs `members` saw.
fn distinct(members: &[&Arc<TestDispatch>]) -> std::collections::BTreeSet<usize> {
    members
        .iter()
        .flat_map(|d| d.seen().iter().map(seq).collect::<Vec<_>>())
        .collect()
}

/// The partitions of the records with seq in `range` that `member` saw.
fn partitions_seen(member: &TestDispatch, range: std::ops::Range<usize>) -> Vec<i32> {
    let mut ps: Vec<i32> = member
        .seen()
        .iter()
        .filter(|m| range.contains(&seq(m)))
        .map(|m| m.headers["kafka.partition"].parse().unwrap())
        .collect();
    ps.sort_unstable();
    ps.dedup();
    ps
}

/// One past the last offset of each partition after `produced` records spread by
/// [`produce_spread`] (the mock cluster's partitions start at offset 0).
fn expected_commits(produced: usize, partitions: i32) -> BTreeMap<i32, Option<i64>> {
    (0..partitions)
        .map(|p| {
            let n = (0..produced)
                .filter(|&i| partition_of(i, partitions) == p)
                .count();
            (p, Some(i64::try_from(n).unwrap()))
        })
        .collect()
}

/// Waits until the group committed `expected` (the auto-commit timer runs every 100ms here).
async fn wait_for_commits(
    brokers: &str,
    group: &str,
    topic: &str,
    expected: &BTreeMap<i32, Option<i64>>,
) {
    for _ in 0..60 {
        if &committed_on(brokers, group, topic, 3) == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!(
        "commits never reached {expected:?}: {:?}",
        committed_on(brokers, group, topic, 3)
    );
}

// On librdkafka's mock cluster: tansu hands a joining member partitions only after about half
// its session timeout and rejects short ones. Records are spread over every partition by the
// test itself: the earlier version relied on keys `k0..k2` reaching all three partitions, but
// murmur2 put none of them in partition 2, which is the one the newcomer got, so it never saw a
// record although the rebalance had worked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_member_takes_over_partitions_without_losing_records() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let topic = sluice_testkit::unique("sluice_rebalance");
    cluster.create_topic(&topic, 3, 1).unwrap();
    produce_spread(&brokers, &topic, 3, 0..30).await;
    let group = sluice_testkit::unique("g");
    let config = json!({"brokers": brokers, "group_id": group, "topics": [topic],
                        "commit_interval": "100ms"});
    let res = Arc::new(Resources::default());
    let a = TestDispatch::echo();
    let (task_a, stop_a) = start(config.clone(), a.clone(), &res);
    wait_for("first member reads", 30, || a.count() >= 30).await;
    assert_eq!(
        partitions_seen(&a, 0..30),
        vec![0, 1, 2],
        "the only member owns all"
    );

    let b = TestDispatch::echo();
    let (task_b, stop_b) = start(config, b.clone(), &res);
    // One record per partition at a time until the rebalance gave the second member some.
    let mut produced = 30;
    for _ in 0..60 {
        if b.count() > 0 {
            break;
        }
        produce_spread(&brokers, &topic, 3, produced..produced + 3).await;
        produced += 3;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(b.count() > 0, "the second member got no partition");
    // The group is settled: records produced now go to their partition's one owner.
    let settled = produced;
    produce_spread(&brokers, &topic, 3, produced..produced + 30).await;
    produced += 30;
    wait_for("every record", 60, || distinct(&[&a, &b]).len() == produced).await;
    let (of_a, of_b) = (
        partitions_seen(&a, settled..produced),
        partitions_seen(&b, settled..produced),
    );
    assert!(
        !of_a.is_empty() && !of_b.is_empty(),
        "shared: a {of_a:?}, b {of_b:?}"
    );
    assert!(
        of_a.iter().all(|p| !of_b.contains(p)),
        "one owner per partition: a {of_a:?}, b {of_b:?}"
    );
    assert_eq!(of_a.len() + of_b.len(), 3, "a {of_a:?}, b {of_b:?}");
    assert_eq!(distinct(&[&a, &b]), (0..produced).collect(), "nothing lost");
    assert_partition_order("a", &a.seen());
    assert_partition_order("b", &b.seen());

    let expected = expected_commits(produced, 3);
    wait_for_commits(&brokers, &group, &topic, &expected).await;
    stop_a.cancel();
    stop_b.cancel();
    task_a.await.unwrap().unwrap();
    task_b.await.unwrap().unwrap();
    assert_eq!(
        committed_on(&brokers, &group, &topic, 3),
        expected,
        "commits cover every record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_member_hands_its_partitions_to_the_other_without_losing_records() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let topic = sluice_testkit::unique("sluice_leave");
    cluster.create_topic(&topic, 3, 1).unwrap();
    let group = sluice_testkit::unique("g");
    let config = json!({"brokers": brokers, "group_id": group, "topics": [topic],
                        "commit_interval": "100ms"});
    let res = Arc::new(Resources::default());
    let a = TestDispatch::echo();
    let (task_a, stop_a) = start(config.clone(), a.clone(), &res);
    let b = TestDispatch::echo();
    let (task_b, stop_b) = start(config, b.clone(), &res);
    // Both members read until each one owns partitions.
    let mut produced = 0;
    for _ in 0..60 {
        if a.count() > 0 && b.count() > 0 {
            break;
        }
        produce_spread(&brokers, &topic, 3, produced..produced + 3).await;
        produced += 3;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        a.count() > 0 && b.count() > 0,
        "a {} b {}",
        a.count(),
        b.count()
    );
    wait_for("every record so far", 30, || {
        distinct(&[&a, &b]).len() == produced
    })
    .await;
    let of_b = partitions_seen(&b, 0..produced);

    // b leaves; a takes its partitions over from b's last commit.
    stop_b.cancel();
    task_b.await.unwrap().unwrap();
    let left = produced;
    produce_spread(&brokers, &topic, 3, produced..produced + 30).await;
    produced += 30;
    wait_for("every record after the leave", 60, || {
        distinct(&[&a, &b]).len() == produced
    })
    .await;
    assert_eq!(
        partitions_seen(&a, left..produced),
        vec![0, 1, 2],
        "a owns all (b had {of_b:?})"
    );
    assert!(
        b.seen().iter().all(|m| seq(m) < left),
        "b got records after it left"
    );
    assert_eq!(distinct(&[&a, &b]), (0..produced).collect(), "nothing lost");
    assert_partition_order("a", &a.seen());
    assert_partition_order("b", &b.seen());

    let expected = expected_commits(produced, 3);
    wait_for_commits(&brokers, &group, &topic, &expected).await;
    stop_a.cancel();
    task_a.await.unwrap().unwrap();
    assert_eq!(
        committed_on(&brokers, &group, &topic, 3),
        expected,
        "commits cover every record"
    );
}

// A member whose `max_in_flight` slots are all taken pauses fetching but keeps polling, so it
// serves the rebalance (gives partitions up, takes its new ones paused) and fetches again from
// where it stopped once a slot frees. The mock coordinator elects a leader on a timer (session
// timeout less a second) whether or not every member rejoined, so this test shows that nothing
// is lost or reordered through pause, rebalance and resume; it cannot show the wait a member
// that stopped polling imposed on Kafka itself (up to `max.poll.interval.ms`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_every_slot_taken_still_gives_partitions_up() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let topic = sluice_testkit::unique("sluice_full");
    cluster.create_topic(&topic, 3, 1).unwrap();
    produce_spread(&brokers, &topic, 3, 0..30).await;
    let group = sluice_testkit::unique("g");
    let config = json!({"brokers": brokers, "group_id": group, "topics": [topic],
                        "commit_interval": "100ms", "max_in_flight": 1});
    let res = Arc::new(Resources::default());
    // a's flow holds every record until released: its one slot stays taken.
    let (release, released) = tokio::sync::watch::channel(false);
    let a = TestDispatch::new(move |m: Message| {
        let mut released = released.clone();
        async move {
            let _ = released.wait_for(|r| *r).await;
            m.ack();
            Ok(vec![])
        }
    });
    let (task_a, stop_a) = start(config.clone(), a.clone(), &res);
    wait_for("a's slot taken", 30, || a.count() >= 1).await;

    let b = TestDispatch::echo();
    let (task_b, stop_b) = start(config, b.clone(), &res);
    let mut produced = 30;
    for _ in 0..40 {
        if b.count() > 0 {
            break;
        }
        produce_spread(&brokers, &topic, 3, produced..produced + 3).await;
        produced += 3;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        b.count() > 0,
        "the second member got no partition while the first one's slots were taken"
    );
    release.send(true).unwrap();
    let settled = produced;
    produce_spread(&brokers, &topic, 3, produced..produced + 30).await;
    produced += 30;
    wait_for("every record", 60, || distinct(&[&a, &b]).len() == produced).await;
    let (of_a, of_b) = (
        partitions_seen(&a, settled..produced),
        partitions_seen(&b, settled..produced),
    );
    assert!(
        !of_a.is_empty() && !of_b.is_empty() && of_a.iter().all(|p| !of_b.contains(p)),
        "a stayed in the group and shares: a {of_a:?}, b {of_b:?}"
    );
    assert_eq!(distinct(&[&a, &b]), (0..produced).collect(), "nothing lost");
    assert_partition_order("a", &a.seen());
    assert_partition_order("b", &b.seen());
    let expected = expected_commits(produced, 3);
    wait_for_commits(&brokers, &group, &topic, &expected).await;
    stop_a.cancel();
    stop_b.cancel();
    task_a.await.unwrap().unwrap();
    task_b.await.unwrap().unwrap();
    assert_eq!(
        committed_on(&brokers, &group, &topic, 3),
        expected,
        "commits cover every record"
    );
}

#[tokio::test]
async fn unreachable_cluster_is_unhealthy_not_fatal() {
    // Nothing listens on port 1: the source keeps retrying and reports why.
    let res = Arc::new(Resources::default());
    let (task, shutdown) = start(
        json!({"brokers": "127.0.0.1:1", "group_id": "g", "topics": ["t"]}),
        TestDispatch::echo(),
        &res,
    );
    let board = ComponentHealth::of(&res);
    wait_for("unhealthy", 20, || !board.problems("kafka-in").is_empty()).await;
    let problems = board.problems("kafka-in");
    assert!(
        problems[0].1.contains("Kafka at 127.0.0.1:1"),
        "{problems:?}"
    );
    assert!(!task.is_finished(), "the source must keep retrying");
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn sink_reports_an_unreachable_cluster_as_unavailable() {
    let res = Arc::new(Resources::default());
    let sink = build_sink(
        "kafka",
        json!({"brokers": "127.0.0.1:1", "topic": "t", "delivery_timeout": "500ms"}),
        &res,
    )
    .unwrap();
    let err = sink.deliver(&Message::bytes("x")).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err}");
    assert!(err.detail.contains("127.0.0.1:1"), "{}", err.detail);
    let problems = ComponentHealth::of(&res).problems("test-flow");
    assert!(!problems.is_empty(), "sink reported unhealthy");
}

#[tokio::test]
async fn build_rejects_bad_configuration() {
    let res = Arc::new(Resources::default());
    let err = build_err(build_sink(
        "kafka",
        json!({"brokers": BROKER, "topic": "t", "properties": {"acks": "1"}}),
        &res,
    ));
    assert_eq!(err.field.as_deref(), Some("properties.acks"));
    let err = build_err(build_sink(
        "kafka",
        json!({"brokers": BROKER, "topic": "t", "key": "{body}"}),
        &res,
    ));
    assert_eq!(err.field.as_deref(), Some("key"));
    let err = build_err(build_source(
        "kafka",
        json!({"brokers": BROKER, "group_id": "g", "topics": []}),
        &res,
    ));
    assert_eq!(err.field.as_deref(), Some("topics"));
    let err = build_err(build_source(
        "kafka",
        json!({"brokers": BROKER, "group_id": "g", "topics": ["t"], "properties": {"fetch.bogus": "1"}}),
        &res,
    ));
    assert_eq!(err.field.as_deref(), Some("properties"));
}
