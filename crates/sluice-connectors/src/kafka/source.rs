//! The `kafka` source: a consumer group member that commits an offset only once the flow
//! committed every record before it.
//!
//! **Architecture Invariant:** an offset is stored for commit only when every record of its
//! partition below it was acknowledged ([`super::offsets`]); a nacked record is handed to the
//! flow again, never skipped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message as _, Timestamp};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    AckToken, Admitted, BuildContext, BuildError, Dispatch, HealthHandle, Message, Outcome, Source,
    SourceContext, SourceError,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::offsets::PartitionTrack;
use super::{
    DELIVERY_COUNT_HEADER, KEY_HEADER, OFFSET_HEADER, PARTITION_HEADER, TIMESTAMP_HEADER,
    TIMESTAMP_TYPE_HEADER, TOPIC_HEADER,
};
use crate::reconnect::{self, Backoff};

const DESCRIPTION: &str = "\
Consumes `topics` as a member of consumer group `group_id` (partitions are shared among the \
members and rebalanced as members come and go).

Each record becomes one message: the body is the record's value; the record's headers become \
message headers of the same names; `kafka.topic`, `kafka.partition`, `kafka.offset`, \
`kafka.key` (UTF-8, invalid sequences replaced; absent without a key), `kafka.timestamp` \
(milliseconds since the Unix epoch) with `kafka.timestamp_type` (`create_time` or \
`log_append_time`), and `kafka.delivery.count` (1, then 2, ... when handed out again) describe it.

**Ordering.** With `ordering: partition` (default) the records of one partition are processed \
one at a time, in offset order: the next starts once the previous is acknowledged; partitions \
run side by side. With `ordering: none` records are processed concurrently (up to \
`max_in_flight`; the flow's `ordered_by` still applies).

**Offsets.** Auto-commit of consumed positions is off. An offset is stored only once its record \
and every earlier record of its partition are acknowledged (every target committed, or the flow \
dead-lettered it), and stored offsets are committed every `commit_interval`, on a rebalance and \
at shutdown. A record the flow nacks (failed after the flow's retries, with no dead letter) is \
handed to the flow again after `redelivery_delay`, doubling up to `max_redelivery_delay`, until \
it is acknowledged; its partition's commits wait for it.

**Rebalance.** Members of one group share the partitions; a member that joins takes some over, \
one that leaves hands its own to the others. Records of revoked partitions that were fetched but \
not handed out are dropped (their new owner reads them from the last commit); records in flight \
finish, but their offsets are not stored any more. A partition assigned back to the same member \
starts once its earlier records there settled. While `max_in_flight` records are in flight, \
fetching pauses but the consumer is still polled, so the member keeps serving rebalances.

**Delivery guarantee.** at-least-once: a crash, a shutdown while records are in flight, or a \
rebalance makes the records after the last commit be delivered again (so up to \
`commit_interval` of acknowledged records may repeat); make targets idempotent, for example on \
`kafka.topic`/`kafka.partition`/`kafka.offset`.

**Limits.** Plaintext connections only (no TLS or SASL in this build); compressed topics must use \
lz4, snappy or none (no gzip or zstd). A partition whose record keeps failing stops advancing \
its commits (lag grows) until the record succeeds or is dead-lettered: give the flow a \
`dead_letter`. A rebalance (eager protocol) stops the group's fetching while it lasts.";

/// The `kafka` source's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "kafka",
        ComponentKind::Source,
        "Consume Kafka topics in a consumer group, committing offsets after the flow commits",
    )
    .description(DESCRIPTION)
    .field(super::brokers_field())
    .field(FieldSpec::new("group_id", FieldType::String, "Consumer group id; members of one group share the partitions.").required())
    .field(FieldSpec::new("topics", FieldType::List(Box::new(FieldType::String)), "Topics to consume.").required())
    .field(
        FieldSpec::new("start", FieldType::Enum(vec!["earliest", "latest"]), "Where a group without a committed offset starts: the oldest record, or only new ones.")
            .default_value("earliest"),
    )
    .field(
        FieldSpec::new("ordering", FieldType::Enum(vec!["partition", "none"]), "`partition`: one record of a partition at a time, in order; `none`: concurrent.")
            .default_value("partition"),
    )
    .field(
        FieldSpec::new("max_in_flight", FieldType::Integer { min: Some(1), max: Some(100_000) }, "Records handed to the flow and not yet acknowledged, across partitions.")
            .default_value(256),
    )
    .field(
        FieldSpec::new("commit_interval", FieldType::Duration, "How often stored offsets are committed to the group coordinator.")
            .default_value("1s"),
    )
    .field(
        FieldSpec::new("redelivery_delay", FieldType::Duration, "Wait before a nacked record is handed to the flow again; doubles each time.")
            .default_value("1s"),
    )
    .field(
        FieldSpec::new("max_redelivery_delay", FieldType::Duration, "Longest wait between two deliveries of a nacked record.")
            .default_value("1m"),
    )
    .field(super::properties_field())
    .example(
        "Orders from three topics, in partition order",
        "brokers: 127.0.0.1:9092\ngroup_id: order-sync\ntopics: [orders, refunds, returns]\n",
    )
    .example(
        "New events only, processed concurrently",
        "brokers: kafka-1:9092,kafka-2:9092\ngroup_id: audit\ntopics: [events]\nstart: latest\nordering: none\nmax_in_flight: 1000\nproperties:\n  client.id: sluice-audit\n",
    )
}

/// Where a group without committed offsets starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// The oldest record.
    Earliest,
    /// Records produced from now on.
    Latest,
}

/// Processing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordOrder {
    /// One record of a partition at a time.
    Partition,
    /// Concurrent.
    None,
}

/// Configuration of the `kafka` source.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// Consumer group.
    pub group_id: String,
    /// Topics.
    pub topics: Vec<String>,
    /// Initial position.
    #[serde(default = "default_start")]
    pub start: Start,
    /// Processing order.
    #[serde(default = "default_ordering")]
    pub ordering: RecordOrder,
    /// Records in flight.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Commit period.
    #[serde(default = "default_commit_interval")]
    pub commit_interval: HumanDuration,
    /// First redelivery wait.
    #[serde(default = "default_redelivery_delay")]
    pub redelivery_delay: HumanDuration,
    /// Longest redelivery wait.
    #[serde(default = "default_max_redelivery_delay")]
    pub max_redelivery_delay: HumanDuration,
    /// Extra librdkafka properties.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_start() -> Start {
    Start::Earliest
}
fn default_ordering() -> RecordOrder {
    RecordOrder::Partition
}
fn default_max_in_flight() -> usize {
    256
}
fn default_commit_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_redelivery_delay() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_max_redelivery_delay() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

/// Properties the source sets itself: its guarantee depends on them.
const RESERVED: &[&str] = &[
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "auto.commit.interval.ms",
];

/// A built `kafka` source.
pub struct KafkaSource {
    config: rdkafka::ClientConfig,
    brokers: String,
    topics: Vec<String>,
    ordering: RecordOrder,
    max_in_flight: usize,
    redelivery: (Duration, Duration),
}

/// Builds a `kafka` source.
pub fn build(config: &Value, _ctx: &BuildContext<'_>) -> Result<Box<dyn Source>, BuildError> {
    let c: KafkaSourceConfig = crate::config::parse(config)?;
    if c.group_id.trim().is_empty() {
        return Err(BuildError::field(
            "group_id",
            "is empty; name the consumer group",
        ));
    }
    if c.topics.is_empty() || c.topics.iter().any(|t| t.trim().is_empty()) {
        return Err(BuildError::field(
            "topics",
            "must list at least one topic, none of them empty",
        ));
    }
    if c.commit_interval.0 < Duration::from_millis(10) {
        return Err(BuildError::field(
            "commit_interval",
            "must be at least 10ms",
        ));
    }
    if c.max_in_flight == 0 {
        return Err(BuildError::field("max_in_flight", "must be at least 1"));
    }
    let mut config = super::client_config(&c.brokers, &c.properties, RESERVED)?;
    config
        .set("group.id", &c.group_id)
        // Offsets are stored by the source once a record is acknowledged, then committed by
        // librdkafka's timer (and on rebalance and close): never the mere consumed position.
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set(
            "auto.commit.interval.ms",
            c.commit_interval.0.as_millis().to_string(),
        )
        .set(
            "auto.offset.reset",
            match c.start {
                Start::Earliest => "earliest",
                Start::Latest => "latest",
            },
        );
    super::check_config(&config)?;
    Ok(Box::new(KafkaSource {
        config,
        brokers: c.brokers,
        topics: c.topics,
        ordering: c.ordering,
        max_in_flight: c.max_in_flight,
        redelivery: (
            c.redelivery_delay.0,
            c.max_redelivery_delay.0.max(c.redelivery_delay.0),
        ),
    }))
}

type PartitionKey = (String, i32);

/// The partitions this member owns now, updated by the rebalance callbacks.
#[derive(Default)]
struct Assignment {
    inner: Mutex<Owned>,
}

#[derive(Default)]
struct Owned {
    partitions: HashMap<PartitionKey, Arc<PartitionTrack>>,
    /// Revoked partitions' turns (settled once their last record handed out is): a partition
    /// assigned back starts after them.
    retired: HashMap<PartitionKey, oneshot::Receiver<()>>,
}

impl Assignment {
    fn lock(&self) -> std::sync::MutexGuard<'_, Owned> {
        match self.inner.lock() {
            Ok(guard) => guard,
            // Single inserts and removes: a panic cannot leave the maps torn.
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn get(&self, topic: &str, partition: i32) -> Option<Arc<PartitionTrack>> {
        self.lock()
            .partitions
            .get(&(topic.to_owned(), partition))
            .cloned()
    }

    /// Stops tracking the partitions of `tpl`; their late acknowledgements store nothing.
    fn revoke(&self, tpl: &TopicPartitionList) {
        let mut owned = self.lock();
        for elem in tpl.elements() {
            let key = (elem.topic().to_owned(), elem.partition());
            if let Some(track) = owned.partitions.remove(&key)
                && let Some(turn) = track.revoke()
            {
                owned.retired.insert(key, turn);
            }
        }
    }

    /// Tracks the partitions of `tpl`, each after its previous assignment's last record.
    fn assign(&self, tpl: &TopicPartitionList) {
        let mut owned = self.lock();
        for elem in tpl.elements() {
            let key = (elem.topic().to_owned(), elem.partition());
            if owned.partitions.contains_key(&key) {
                continue;
            }
            let turn = owned.retired.remove(&key);
            let track = PartitionTrack::after(elem.topic(), elem.partition(), turn);
            owned.partitions.insert(key, Arc::new(track));
        }
    }

    /// Offsets to commit at shutdown, per owned partition.
    fn committable(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for track in self.lock().partitions.values() {
            if let Some(next) = track.committable() {
                let _ =
                    tpl.add_partition_offset(&track.topic, track.partition, Offset::Offset(next));
            }
        }
        tpl
    }
}

/// librdkafka's callbacks: rebalances and cluster errors.
struct SourceClient {
    assignment: Arc<Assignment>,
    health: HealthHandle,
    trouble: Arc<AtomicBool>,
    brokers: String,
    flow: Arc<str>,
    /// Set while fetching is paused because `max_in_flight` records are in flight.
    fetch_paused: Arc<AtomicBool>,
}

impl ClientContext for SourceClient {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        super::log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if super::is_unavailable(&error) {
            self.trouble.store(true, Ordering::SeqCst);
            self.health.unhealthy(format!(
                "cannot reach Kafka at {}: {reason}; retrying",
                self.brokers
            ));
        }
        tracing::warn!(flow = %self.flow, %error, reason, "kafka consumer error");
    }
}

impl ConsumerContext for SourceClient {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                self.assignment.revoke(tpl);
                tracing::info!(flow = %self.flow, partitions = tpl.count(), "kafka partitions revoked");
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(error) => {
                tracing::warn!(flow = %self.flow, %error, "kafka rebalance failed");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.assignment.assign(tpl);
            // Assigned while `max_in_flight` records are in flight: fetch nothing until a slot
            // frees (the main loop resumes every assigned partition then).
            if self.fetch_paused.load(Ordering::SeqCst)
                && let Err(error) = consumer.pause(tpl)
            {
                tracing::warn!(flow = %self.flow, %error, "cannot pause newly assigned kafka partitions");
            }
            tracing::info!(flow = %self.flow, partitions = tpl.count(), "kafka partitions assigned");
        }
    }
}

type Consumer_ = StreamConsumer<SourceClient>;

#[async_trait]
impl Source for KafkaSource {
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let health = HealthHandle::for_source(&ctx);
        let assignment = Arc::new(Assignment::default());
        let trouble = Arc::new(AtomicBool::new(false));
        let fetch_paused = Arc::new(AtomicBool::new(false));
        let client = SourceClient {
            fetch_paused: Arc::clone(&fetch_paused),
            assignment: Arc::clone(&assignment),
            health: health.clone(),
            trouble: Arc::clone(&trouble),
            brokers: self.brokers.clone(),
            flow: Arc::clone(&ctx.flow),
        };
        let consumer: Arc<Consumer_> =
            Arc::new(self.config.create_with_context(client).map_err(|e| {
                SourceError::Other(format!("cannot create the kafka consumer: {e}"))
            })?);

        // An unreachable cluster at startup is retried (the flow shows unhealthy), not fatal.
        let what = format!("Kafka at {}", self.brokers);
        let reachable = reconnect::connect(
            &what,
            &health,
            &ctx.shutdown,
            &mut Backoff::default(),
            || metadata(Arc::clone(&consumer)),
        )
        .await;
        if reachable.is_none() {
            return Ok(());
        }
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| SourceError::Other(format!("cannot subscribe to {topics:?}: {e}")))?;

        let monitor = tokio::spawn(watch_health(
            Arc::clone(&consumer),
            health.clone(),
            Arc::clone(&trouble),
            ctx.shutdown.clone(),
        ));
        let permits = Arc::new(Semaphore::new(self.max_in_flight));
        let mut in_flight = JoinSet::new();
        let retry = Redelivery {
            initial: self.redelivery.0,
            max: self.redelivery.1,
            shutdown: ctx.shutdown.clone(),
        };
        // Records received while every slot was taken (fetched before the pause took effect).
        let mut held: VecDeque<Received> = VecDeque::new();
        let gate = FetchGate {
            consumer: Arc::clone(&consumer),
            paused: fetch_paused,
            flow: Arc::clone(&ctx.flow),
        };
        loop {
            while in_flight.try_join_next().is_some() {}
            let permit = match Arc::clone(&permits).try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    // Every slot is taken. Fetching pauses, but the consumer is still polled:
                    // polling serves the group's rebalances (a joining member waits for this
                    // one to give partitions up) and keeps `max.poll.interval.ms` satisfied.
                    gate.pause();
                    tokio::select! {
                        () = ctx.shutdown.cancelled() => break,
                        permit = Arc::clone(&permits).acquire_owned() => match permit {
                            Ok(permit) => permit,
                            Err(_) => break,
                        },
                        received = consumer.recv() => {
                            held.extend(accept(received, &assignment, &ctx.flow));
                            continue;
                        }
                    }
                }
            };
            gate.resume();
            let next = match held.pop_front() {
                Some(next) => next,
                None => {
                    let received = tokio::select! {
                        () = ctx.shutdown.cancelled() => break,
                        received = consumer.recv() => received,
                    };
                    match accept(received, &assignment, &ctx.flow) {
                        Some(next) => next,
                        None => continue,
                    }
                }
            };
            // Revoked while held: the partition's owner reads it again from the last commit.
            if next.track.is_revoked() {
                continue;
            }
            let Received { msg, track, offset } = next;
            let (turn, done) = track.begin(offset);
            let work = Work {
                consumer: Arc::clone(&consumer),
                track,
                offset,
                done,
                _permit: permit,
            };
            match self.ordering {
                RecordOrder::Partition => {
                    let dispatcher = Arc::clone(&ctx.dispatcher);
                    let retry = retry.clone();
                    in_flight.spawn(async move {
                        if let Some(turn) = turn {
                            // An Err means the previous task ended without settling: its turn is over too.
                            let _ = turn.await;
                        }
                        let acked = retry.settle(&dispatcher, msg, None).await;
                        work.finish(acked);
                    });
                }
                RecordOrder::None => {
                    // Admitted here, in arrival order, so the flow's `ordered_by` keeps per-key order.
                    let (token, outcome) = AckToken::channel();
                    let first = Arc::clone(&ctx.dispatcher)
                        .admit(msg.detached().with_ack(token))
                        .await;
                    let dispatcher = Arc::clone(&ctx.dispatcher);
                    let retry = retry.clone();
                    in_flight.spawn(async move {
                        let acked = retry.settle(&dispatcher, msg, Some((first, outcome))).await;
                        work.finish(acked);
                    });
                }
            }
        }
        // Records in flight finish and store their offsets; the runtime's grace bounds the wait.
        while in_flight.join_next().await.is_some() {}
        monitor.abort();
        let tpl = assignment.committable();
        if tpl.count() > 0 {
            let committer = Arc::clone(&consumer);
            let result =
                tokio::task::spawn_blocking(move || committer.commit(&tpl, CommitMode::Sync)).await;
            if let Ok(Err(error)) = result {
                tracing::warn!(flow = %ctx.flow, %error, "final kafka offset commit failed; records after the previous commit will be delivered again");
            }
        }
        // Dropping the consumer leaves the group (close) on a blocking thread: it waits for the
        // coordinator.
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
        Ok(())
    }
}

/// A record taken from the consumer, not yet handed to the flow.
struct Received {
    msg: Message,
    track: Arc<PartitionTrack>,
    offset: i64,
}

/// The record of a poll, if it belongs to a partition this member owns.
fn accept(
    received: Result<BorrowedMessage<'_>, KafkaError>,
    assignment: &Assignment,
    flow: &Arc<str>,
) -> Option<Received> {
    let record = match received {
        Ok(record) => record,
        Err(error) => {
            tracing::warn!(%flow, %error, "kafka consume error");
            return None;
        }
    };
    // Fetched before a revoke: the partition's new owner reads it from the last commit.
    let Some(track) = assignment.get(record.topic(), record.partition()) else {
        tracing::debug!(%flow, topic = record.topic(), partition = record.partition(), "dropping a record of a partition no longer owned");
        return None;
    };
    Some(Received {
        msg: to_message(&record, flow),
        track,
        offset: record.offset(),
    })
}

/// Pauses fetching of every assigned partition while `max_in_flight` records are in flight,
/// and resumes it once a slot frees. librdkafka drops what it fetched for a paused partition
/// and fetches again from the last record handed out, so nothing is skipped.
struct FetchGate {
    consumer: Arc<Consumer_>,
    paused: Arc<AtomicBool>,
    flow: Arc<str>,
}

impl FetchGate {
    fn pause(&self) {
        if self.paused.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Err(error) = self
            .consumer
            .assignment()
            .and_then(|tpl| self.consumer.pause(&tpl))
        {
            tracing::warn!(flow = %self.flow, %error, "cannot pause kafka fetching");
        }
    }

    fn resume(&self) {
        if !self.paused.swap(false, Ordering::SeqCst) {
            return;
        }
        if let Err(error) = self
            .consumer
            .assignment()
            .and_then(|tpl| self.consumer.resume(&tpl))
        {
            tracing::warn!(flow = %self.flow, %error, "cannot resume kafka fetching");
        }
    }
}

/// One record's bookkeeping, settled when its task ends.
struct Work {
    consumer: Arc<Consumer_>,
    track: Arc<PartitionTrack>,
    offset: i64,
    done: oneshot::Sender<()>,
    _permit: OwnedSemaphorePermit,
}

impl Work {
    /// Stores the new committable offset when `acked` moved it, then gives the partition's next
    /// record its turn.
    fn finish(self, acked: bool) {
        if acked && let Some(next) = self.track.ack(self.offset) {
            let mut tpl = TopicPartitionList::new();
            let stored = tpl
                .add_partition_offset(
                    &self.track.topic,
                    self.track.partition,
                    Offset::Offset(next),
                )
                .and_then(|()| self.consumer.store_offsets(&tpl));
            if let Err(error) = stored {
                // Revoked meanwhile: its new owner starts from the last commit.
                tracing::debug!(topic = %self.track.topic, partition = self.track.partition, %error, "cannot store the kafka offset");
            }
        }
        let _ = self.done.send(());
    }
}

/// Hands a record to the flow until it is acknowledged.
#[derive(Clone)]
struct Redelivery {
    initial: Duration,
    max: Duration,
    shutdown: CancellationToken,
}

impl Redelivery {
    /// `true` once acknowledged; `false` when shutdown came first (the record is not settled and
    /// is delivered again after the restart).
    async fn settle(
        &self,
        dispatcher: &Arc<dyn Dispatch>,
        msg: Message,
        first: Option<(Admitted, oneshot::Receiver<Outcome>)>,
    ) -> bool {
        let mut pending = first;
        let mut deliveries: u32 = 1;
        let mut delay = self.initial;
        loop {
            let (work, outcome) = match pending.take() {
                Some(admitted) => admitted,
                None => {
                    let (token, outcome) = AckToken::channel();
                    let attempt = msg
                        .detached()
                        .with_header(DELIVERY_COUNT_HEADER, deliveries.to_string())
                        .with_ack(token);
                    (Arc::clone(dispatcher).admit(attempt).await, outcome)
                }
            };
            // The flow resolves the message's shares on success and failure alike; a failure
            // handed back still holding them is a nack.
            if let Err(failure) = work.await {
                let reason = failure.error.to_string();
                failure.message.nack(&reason);
            }
            let outcome = outcome
                .await
                .unwrap_or_else(|_| Outcome::Nack(sluice_core::ack::DROPPED_UNRESOLVED.into()));
            let Outcome::Nack(reason) = outcome else {
                return true;
            };
            tracing::warn!(
                message_id = %msg.id(),
                topic = msg.headers.get(TOPIC_HEADER).map_or("", String::as_str),
                partition = msg.headers.get(PARTITION_HEADER).map_or("", String::as_str),
                offset = msg.headers.get(OFFSET_HEADER).map_or("", String::as_str),
                deliveries,
                %reason,
                "kafka record nacked; delivering it again (its partition's offsets wait)"
            );
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return false,
                () = tokio::time::sleep(delay) => {}
            }
            delay = delay.saturating_mul(2).min(self.max);
            deliveries = deliveries.saturating_add(1);
        }
    }
}

/// Fetches cluster metadata on a blocking thread: proof the cluster answers.
async fn metadata(consumer: Arc<Consumer_>) -> Result<(), String> {
    tokio::task::spawn_blocking(move || {
        consumer
            .fetch_metadata(None, Duration::from_secs(2))
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// After librdkafka reported the cluster unreachable, checks every second until it answers again
/// and clears the health problem.
async fn watch_health(
    consumer: Arc<Consumer_>,
    health: HealthHandle,
    trouble: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if trouble.load(Ordering::SeqCst) && metadata(Arc::clone(&consumer)).await.is_ok() {
            trouble.store(false, Ordering::SeqCst);
            health.healthy();
        }
    }
}

/// The message for one record, without acknowledgement.
fn to_message(record: &BorrowedMessage<'_>, flow: &Arc<str>) -> Message {
    let mut msg = Message::bytes(bytes::Bytes::copy_from_slice(
        record.payload().unwrap_or_default(),
    ));
    if let Some(headers) = record.headers() {
        for header in headers.iter() {
            let value = header
                .value
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            msg.headers.insert(header.key.to_owned(), value);
        }
    }
    // Set last so a record header cannot pass itself off as the record's metadata.
    msg.headers
        .insert(TOPIC_HEADER.to_owned(), record.topic().to_owned());
    msg.headers
        .insert(PARTITION_HEADER.to_owned(), record.partition().to_string());
    msg.headers
        .insert(OFFSET_HEADER.to_owned(), record.offset().to_string());
    msg.headers
        .insert(DELIVERY_COUNT_HEADER.to_owned(), "1".to_owned());
    match record.key() {
        Some(key) => {
            msg.headers.insert(
                KEY_HEADER.to_owned(),
                String::from_utf8_lossy(key).into_owned(),
            );
        }
        None => {
            msg.headers.remove(KEY_HEADER);
        }
    }
    let (millis, kind) = match record.timestamp() {
        Timestamp::CreateTime(ms) => (Some(ms), "create_time"),
        Timestamp::LogAppendTime(ms) => (Some(ms), "log_append_time"),
        Timestamp::NotAvailable => (None, ""),
    };
    if let Some(ms) = millis {
        msg.headers
            .insert(TIMESTAMP_HEADER.to_owned(), ms.to_string());
        msg.headers
            .insert(TIMESTAMP_TYPE_HEADER.to_owned(), kind.to_owned());
    }
    msg.meta.origin = Some(Arc::clone(flow));
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: &Value) -> Result<KafkaSourceConfig, BuildError> {
        crate::config::parse(v)
    }

    #[test]
    fn defaults_and_unknown_fields() {
        let c = parse(&json!({"brokers": "h:9092", "group_id": "g", "topics": ["t"]})).unwrap();
        assert_eq!(c.start, Start::Earliest);
        assert_eq!(c.ordering, RecordOrder::Partition);
        assert_eq!(c.max_in_flight, 256);
        let err = parse(&json!({"brokers": "h", "group_id": "g", "topics": ["t"], "topic": "x"}))
            .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("topic"));
    }

    #[test]
    fn spec_has_guarantee_and_limits() {
        let s = spec();
        assert_eq!(s.name, "kafka");
        let d = s.description;
        assert!(d.contains("**Delivery guarantee.**") && d.contains("**Limits.**"));
    }
}
