//! `aggregate`: combines related messages into one (EIP Aggregator).

mod memory;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::state::{AggregationRepository, GroupEntry};
use sluice_core::{
    Body, BuildContext, BuildError, Dispatch, ErrorKind, Failure, Message, Outputs, ProcessError,
    Processor,
};
use tokio::sync::Mutex;
use tokio::time::Instant;

use self::memory::MemoryAggregationRepository;
use super::split::{CORRELATION_HEADER, INDEX_HEADER, LAST_HEADER, SIZE_HEADER};
use super::{common, message_key};

/// What completed the group: `size`, `timeout`, `interval`, `predicate`, `split` or
/// `max_group_size`.
pub const COMPLETED_BY_HEADER: &str = "sluice.aggregate.completed_by";
/// How many messages the aggregate combines.
pub const SIZE_OF_GROUP_HEADER: &str = "sluice.aggregate.size";
/// The group's correlation key.
pub const KEY_HEADER: &str = "sluice.aggregate.correlation";

const DEFAULT_CORRELATION: &str = "$headers[\"sluice.split.correlation\"]";
const DEFAULT_MAX_GROUPS: usize = 10_000;
const DEFAULT_MAX_GROUP_SIZE: usize = 10_000;

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "aggregate",
        ComponentKind::Processor,
        "Combine related messages into one once their group is complete",
    )
    .description(
        "Collects messages into groups by a correlation key and, when a group is complete, emits \
one message combining them (EIP Aggregator).\n\n\
**Groups.** `correlation` is a jq expression giving each message's key (a string, number or \
boolean; `.` is the body, `null` when it is not JSON; with `$headers` and `$meta`). It defaults \
to the `sluice.split.correlation` header, so `aggregate` right after `split` reassembles each \
split. A message without a key fails with `invalid_input`.\n\n\
**The aggregate.** When a group completes, `aggregation` (jq, default `.`) runs on the **array \
of the group's bodies in arrival order** (with `on_split_complete`, in `sluice.split.index` \
order); a body that is not JSON enters the array as a string of its text. The first output is \
the new body (no output is an `expression` error). `$headers` and `$meta` are those of the \
group's first message, whose headers the aggregate keeps (the `sluice.split.*` headers \
removed), with `content-type: application/json`, `sluice.aggregate.completed_by`, \
`sluice.aggregate.size` (messages combined) and `sluice.aggregate.correlation` (the key). The \
aggregate is a new message with a new id.\n\n\
**Completion.** Give at least one condition; the first that holds completes the group:\n\
* `size`: the group holds this many messages;\n\
* `predicate`: a jq condition on the aggregated value (the result of `aggregation`), checked \
after every message (this re-aggregates the group each time: keep such groups small);\n\
* `on_split_complete: true`: every part of a split has arrived (from `sluice.split.size`, or \
`sluice.split.last` on the part with the highest index);\n\
* `timeout`: no message joined the group for this long (inactivity since the last message);\n\
* `interval`: every group is completed at each tick of this fixed period, counted from the \
first message the step saw.\n\n\
A group completed by a message (size, predicate, split, `max_group_size`) is that message's \
output and continues through the rest of the flow like any message; a request-reply caller \
whose message completed the group receives the aggregate. A group completed by a timer \
(timeout, interval) is sent through everything after this step (the rest of the flow, then the \
targets), with the flow's error handling.\n\n\
**Acknowledgement.** A message that joins a group without completing it produces no output and \
is **not** acknowledged yet: the aggregate takes over the acknowledgement shares of every \
message in it, so each input is acked exactly once, when the aggregate has been committed by \
every target, and nacked if the aggregate fails terminally (a failing `aggregation`, a target \
that cannot deliver). Groups still open when the flow stops are nacked, so the source \
redelivers their messages; none is silently lost.\n\n\
**Limits.** At most `max_groups` groups are open at once; a message that would open another \
fails with `unavailable` (retry later, when groups have completed). A group holds at most \
`max_group_size` messages: with `on_max_group_size: complete` (default) the message that fills \
it completes it (`completed_by: max_group_size`); with `fail` a message that would exceed it \
fails with `rejected` and the group is unchanged.\n\n\
**State.** Group contents live in an aggregation repository (in memory, private to the step); \
acknowledgement shares always stay in memory.",
    )
    .field(
        FieldSpec::new(
            "correlation",
            FieldType::Jq,
            "A jq expression giving the key that groups messages.",
        )
        .default_value(DEFAULT_CORRELATION),
    )
    .field(
        FieldSpec::new(
            "aggregation",
            FieldType::Jq,
            "A jq expression run on the array of the group's bodies; its first output is the aggregate's body.",
        )
        .default_value("."),
    )
    .field(FieldSpec::new(
        "size",
        FieldType::Integer { min: Some(1), max: None },
        "Complete a group when it holds this many messages.",
    ))
    .field(FieldSpec::new(
        "timeout",
        FieldType::Duration,
        "Complete a group when no message joined it for this long.",
    ))
    .field(FieldSpec::new(
        "interval",
        FieldType::Duration,
        "Complete every open group at each tick of this period.",
    ))
    .field(FieldSpec::new(
        "predicate",
        FieldType::Jq,
        "Complete a group when this jq condition holds on the aggregated value.",
    ))
    .field(
        FieldSpec::new(
            "on_split_complete",
            FieldType::Bool,
            "Complete a group when every part of the split it collects has arrived (uses the `sluice.split.*` headers).",
        )
        .default_value(false),
    )
    .field(
        FieldSpec::new(
            "max_groups",
            FieldType::Integer { min: Some(1), max: None },
            "The most groups open at once; a message opening another fails with `unavailable`.",
        )
        .default_value(DEFAULT_MAX_GROUPS),
    )
    .field(
        FieldSpec::new(
            "max_group_size",
            FieldType::Integer { min: Some(1), max: None },
            "The most messages one group may hold.",
        )
        .default_value(DEFAULT_MAX_GROUP_SIZE),
    )
    .field(
        FieldSpec::new(
            "on_max_group_size",
            FieldType::Enum(vec!["complete", "fail"]),
            "`complete`: the message that fills a group completes it; `fail`: a message beyond it fails with `rejected`.",
        )
        .default_value("complete"),
    )
    .example(
        "Reassemble each split, summing the parts",
        "on_split_complete: true\naggregation: 'map(.amount) | add'\ntimeout: 30s\n",
    )
    .example(
        "Batch an order's lines ten at a time, or after 5s of quiet",
        "correlation: '.order_id'\nsize: 10\ntimeout: 5s\naggregation: '{order_id: .[0].order_id, lines: .}'\n",
    )
    .example(
        "Collect readings until the total passes 100, flushing every minute",
        "correlation: '$headers[\"x-sensor\"]'\npredicate: 'map(.value) | add > 100'\ninterval: 1m\n",
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OnFull {
    #[default]
    Complete,
    Fail,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    correlation: Option<String>,
    aggregation: Option<String>,
    size: Option<usize>,
    timeout: Option<HumanDuration>,
    interval: Option<HumanDuration>,
    predicate: Option<String>,
    #[serde(default)]
    on_split_complete: bool,
    #[serde(default = "default_max_groups")]
    max_groups: usize,
    #[serde(default = "default_max_group_size")]
    max_group_size: usize,
    #[serde(default)]
    on_max_group_size: OnFull,
}

// The defaults repeat the spec's, for configurations that did not go through validation (tests).
fn default_max_groups() -> usize {
    DEFAULT_MAX_GROUPS
}
fn default_max_group_size() -> usize {
    DEFAULT_MAX_GROUP_SIZE
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    let nonzero = |field: &str, d: Option<HumanDuration>| match d {
        Some(d) if d.0.is_zero() => Err(BuildError::field(field, "give a duration above zero")),
        other => Ok(other.map(|d| d.0)),
    };
    let timeout = nonzero("timeout", config.timeout)?;
    let interval = nonzero("interval", config.interval)?;
    if config.size.is_none()
        && timeout.is_none()
        && interval.is_none()
        && config.predicate.is_none()
        && !config.on_split_complete
    {
        return Err(BuildError::new(
            "give at least one completion condition: `size`, `timeout`, `interval`, `predicate` \
or `on_split_complete: true`",
        ));
    }
    let correlation = ctx.steps.compile_jq(
        "correlation",
        config.correlation.as_deref().unwrap_or(DEFAULT_CORRELATION),
    )?;
    let aggregation = match config.aggregation.as_deref().map(str::trim) {
        None | Some(".") => None,
        Some(code) => Some(ctx.steps.compile_jq("aggregation", code)?),
    };
    let predicate = match &config.predicate {
        Some(code) => Some(ctx.steps.compile_jq("predicate", code)?),
        None => None,
    };
    Ok(Arc::new(Aggregate {
        inner: Arc::new(Inner {
            correlation,
            aggregation,
            completion: Completion {
                size: config.size.filter(|&n| n > 0),
                timeout,
                interval,
                predicate,
                on_split_complete: config.on_split_complete,
            },
            max_groups: config.max_groups.max(1),
            max_group_size: config.max_group_size.max(1),
            on_full: config.on_max_group_size,
            repository: Arc::new(MemoryAggregationRepository::default()),
            open: Mutex::new(Open::default()),
            ticking: OnceLock::new(),
            downstream: Arc::clone(&ctx.downstream),
        }),
    }))
}

/// The conditions that complete a group.
struct Completion {
    size: Option<usize>,
    timeout: Option<Duration>,
    interval: Option<Duration>,
    predicate: Option<Arc<dyn JqProgram>>,
    on_split_complete: bool,
}

/// Why a group completed: the value of `sluice.aggregate.completed_by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CompletedBy {
    Size,
    Timeout,
    Interval,
    Predicate,
    Split,
    MaxGroupSize,
}

impl CompletedBy {
    fn as_str(self) -> &'static str {
        match self {
            CompletedBy::Size => "size",
            CompletedBy::Timeout => "timeout",
            CompletedBy::Interval => "interval",
            CompletedBy::Predicate => "predicate",
            CompletedBy::Split => "split",
            CompletedBy::MaxGroupSize => "max_group_size",
        }
    }
}

/// An open group: what the step keeps in memory besides the repository's entries.
struct Group {
    /// The aggregate to be: the first message's headers and metadata, and the acknowledgement
    /// shares of every message in the group.
    carrier: Message,
    /// Messages in the group.
    count: usize,
    /// With `on_split_complete`: how many parts the split has, once known.
    expected: Option<usize>,
    /// When the last message joined.
    last_seen: Instant,
    /// Tells this group from a later group under the same key, for its timeout task.
    generation: u64,
}

#[derive(Default)]
struct Open {
    groups: HashMap<String, Group>,
    next_generation: u64,
}

struct Inner {
    correlation: Arc<dyn JqProgram>,
    /// `None` for `.`: the array of bodies is the aggregate.
    aggregation: Option<Arc<dyn JqProgram>>,
    completion: Completion,
    max_groups: usize,
    max_group_size: usize,
    on_full: OnFull,
    repository: Arc<dyn AggregationRepository>,
    /// The open groups. An async lock, held across repository calls, so a group's map entry and
    /// its repository entries change together.
    open: Mutex<Open>,
    /// Set once the interval task runs.
    ticking: OnceLock<()>,
    downstream: Arc<dyn Dispatch>,
}

struct Aggregate {
    inner: Arc<Inner>,
}

impl Inner {
    /// Adds `msg` to the group `key`; completes the group when a condition holds. `None`: the
    /// group is still open and holds the message's shares; a failure to complete the group hands
    /// back every message's shares in the failure.
    // The message goes back in the `Failure`, so the error is as large as the message.
    #[allow(clippy::result_large_err)]
    async fn join(self: &Arc<Self>, key: String, msg: Message) -> Result<Option<Message>, Failure> {
        let split_size = if self.completion.on_split_complete {
            split_size(&msg)
        } else {
            None
        };
        let mut open = self.open.lock().await;
        let count = open.groups.get(&key).map_or(0, |g| g.count);
        if count == 0 && open.groups.len() >= self.max_groups {
            let error = ProcessError::new(
                ErrorKind::Unavailable,
                format!(
                    "all {} aggregation groups are open; retry once some complete, or raise \
`max_groups`",
                    self.max_groups
                ),
            );
            return Err(Failure::new(msg, error));
        }
        if count >= self.max_group_size {
            // Only reachable with `on_max_group_size: fail`: `complete` closes a full group.
            let error = ProcessError::new(
                ErrorKind::Rejected,
                format!(
                    "group `{key}` already holds {} messages (`max_group_size`)",
                    self.max_group_size
                ),
            );
            return Err(Failure::new(msg, error));
        }
        let entry = GroupEntry {
            body: msg.body.clone(),
            headers: msg.headers.clone(),
        };
        let size = match self.repository.append(&key, entry).await {
            Ok(size) => size,
            Err(e) => return Err(Failure::new(msg, e)),
        };
        let generation = open.next_generation;
        let group = open.groups.entry(key.clone()).or_insert_with(|| {
            let mut carrier = msg.detached().derive(Body::default());
            for name in [INDEX_HEADER, SIZE_HEADER, LAST_HEADER, CORRELATION_HEADER] {
                carrier.headers.remove(name);
            }
            Group {
                carrier,
                count: 0,
                expected: None,
                last_seen: Instant::now(),
                generation,
            }
        });
        let created = group.count == 0;
        group.count = size;
        group.last_seen = Instant::now();
        group.carrier.absorb_acks(msg);
        if let Some(n) = split_size {
            group.expected.get_or_insert(n);
        }
        if created {
            open.next_generation += 1;
            if let Some(timeout) = self.completion.timeout {
                self.watch_inactivity(key.clone(), generation, timeout);
            }
        }
        let group = &open.groups[&key];
        let completed_by = if group.expected.is_some_and(|n| group.count >= n) {
            Some(CompletedBy::Split)
        } else if self.completion.size.is_some_and(|n| group.count >= n) {
            Some(CompletedBy::Size)
        } else if group.count >= self.max_group_size && self.on_full == OnFull::Complete {
            Some(CompletedBy::MaxGroupSize)
        } else {
            None
        };
        if let Some(by) = completed_by {
            let entries = self.repository.remove(&key).await;
            // Present: it was looked up above, under the same lock.
            let Some(group) = open.groups.remove(&key) else {
                return Ok(None);
            };
            drop(open);
            return self.finish(&key, group, entries, by).await.map(Some);
        }
        let Some(predicate) = &self.completion.predicate else {
            return Ok(None);
        };
        // The predicate looks at the aggregated value, so the group is aggregated now; a
        // failure here fails the whole group (its messages are in it already).
        let verdict = match self.repository.entries(&key).await {
            Ok(entries) => {
                let entries = entries.unwrap_or_default();
                match self.aggregate_value(&entries, &group.carrier).await {
                    Ok(value) => {
                        let value = Arc::new(value);
                        predicate
                            .test(Arc::clone(&value), &group.carrier)
                            .await
                            .map(|holds| holds.then_some(value))
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        match verdict {
            Ok(None) => Ok(None),
            Ok(Some(value)) => {
                let group = open.groups.remove(&key);
                let removed = self.repository.remove(&key).await;
                drop(open);
                let Some(group) = group else {
                    return Ok(None);
                };
                if let Err(e) = removed {
                    return Err(Failure::new(group.carrier, e));
                }
                let value = Arc::try_unwrap(value).unwrap_or_else(|v| (*v).clone());
                Ok(Some(label(group, &key, value, CompletedBy::Predicate)))
            }
            Err(e) => {
                let group = open.groups.remove(&key);
                let _ = self.repository.remove(&key).await;
                drop(open);
                match group {
                    Some(group) => Err(Failure::new(group.carrier, e)),
                    None => Ok(None),
                }
            }
        }
    }

    /// Turns a removed group into its aggregate, or the failure that nacks its messages.
    async fn finish(
        &self,
        key: &str,
        group: Group,
        entries: Result<Option<Vec<GroupEntry>>, ProcessError>,
        by: CompletedBy,
    ) -> Result<Message, Failure> {
        let entries = match entries {
            Ok(entries) => entries.unwrap_or_default(),
            Err(e) => return Err(Failure::new(group.carrier, e)),
        };
        match self.aggregate_value(&entries, &group.carrier).await {
            Ok(value) => Ok(label(group, key, value, by)),
            Err(e) => Err(Failure::new(group.carrier, e)),
        }
    }

    /// Runs `aggregation` on the bodies of `entries`.
    async fn aggregate_value(
        &self,
        entries: &[GroupEntry],
        first: &Message,
    ) -> Result<Value, ProcessError> {
        let mut ordered: Vec<&GroupEntry> = entries.iter().collect();
        if self.completion.on_split_complete {
            // Stable: entries without an index keep their arrival order, after the others.
            ordered.sort_by_key(|e| {
                e.headers
                    .get(INDEX_HEADER)
                    .and_then(|i| i.parse::<u64>().ok())
                    .unwrap_or(u64::MAX)
            });
        }
        let bodies: Vec<Value> = ordered
            .into_iter()
            .map(|e| match e.body.json() {
                Ok(value) => value.clone(),
                Err(_) => Value::String(e.body.to_text()),
            })
            .collect();
        let bodies = Value::Array(bodies);
        let Some(program) = &self.aggregation else {
            return Ok(bodies);
        };
        program
            .run(Arc::new(bodies), first)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                ProcessError::expression(format!(
                    "`aggregation` (`{}`) gave no output; it must give the aggregate's body",
                    program.source()
                ))
            })
    }

    /// Completes the group `key` once it has been quiet for `timeout`.
    fn watch_inactivity(self: &Arc<Self>, key: String, generation: u64, timeout: Duration) {
        let inner = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut deadline = Instant::now() + timeout;
            loop {
                tokio::time::sleep_until(deadline).await;
                let Some(this) = Weak::upgrade(&inner) else {
                    return;
                };
                let mut open = this.open.lock().await;
                let Some(group) = open.groups.get(&key).filter(|g| g.generation == generation)
                else {
                    // Completed otherwise, maybe replaced by a newer group with its own watch.
                    return;
                };
                let quiet_until = group.last_seen + timeout;
                if quiet_until > Instant::now() {
                    deadline = quiet_until;
                    continue;
                }
                let Some(group) = open.groups.remove(&key) else {
                    return;
                };
                let entries = this.repository.remove(&key).await;
                drop(open);
                let result = this
                    .finish(&key, group, entries, CompletedBy::Timeout)
                    .await;
                this.emit(result).await;
                return;
            }
        });
    }

    /// Starts the interval task on first use (a runtime is there then; at build time it may not be).
    fn start_ticking(self: &Arc<Self>) {
        let Some(period) = self.completion.interval else {
            return;
        };
        if self.ticking.set(()).is_err() {
            return;
        }
        let inner = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
            loop {
                ticks.tick().await;
                let Some(this) = Weak::upgrade(&inner) else {
                    return;
                };
                let mut open = this.open.lock().await;
                let groups = std::mem::take(&mut open.groups);
                let mut completed = Vec::with_capacity(groups.len());
                for (key, group) in groups {
                    let entries = this.repository.remove(&key).await;
                    completed.push((key, group, entries));
                }
                drop(open);
                let emits = completed.into_iter().map(|(key, group, entries)| {
                    let this = Arc::clone(&this);
                    async move {
                        let result = this
                            .finish(&key, group, entries, CompletedBy::Interval)
                            .await;
                        this.emit(result).await;
                    }
                });
                futures_util::future::join_all(emits).await;
            }
        });
    }

    /// Sends an aggregate completed by a timer through the rest of the flow.
    async fn emit(&self, result: Result<Message, Failure>) {
        match result {
            Ok(aggregate) => {
                // The flow's error handling has dealt with a failure already (and so with the
                // acknowledgement of every message in the group).
                let _ = self.downstream.dispatch(aggregate).await;
            }
            Err(failure) => {
                tracing::warn!(
                    error = %failure.error,
                    "aggregation of a group completed by a timer failed; its messages are nacked"
                );
                failure.message.nack(&failure.error.to_string());
            }
        }
    }
}

/// The number of parts of the split `msg` is part of, when it tells: `sluice.split.size`, or the
/// index of the last part plus one.
fn split_size(msg: &Message) -> Option<usize> {
    let header = |name: &str| msg.headers.get(name).and_then(|v| v.parse::<usize>().ok());
    let size = header(SIZE_HEADER);
    let last = msg.headers.get(LAST_HEADER).is_some_and(|v| v == "true");
    let from_last = if last {
        header(INDEX_HEADER).map(|i| i + 1)
    } else {
        None
    };
    size.or(from_last)
}

/// The aggregate: the group's carrier with `value` as body and the aggregation headers.
fn label(group: Group, key: &str, value: Value, by: CompletedBy) -> Message {
    let mut msg = group.carrier;
    msg.body = Body::from_json(value);
    let headers = &mut msg.headers;
    headers.insert(COMPLETED_BY_HEADER.to_owned(), by.as_str().to_owned());
    headers.insert(SIZE_OF_GROUP_HEADER.to_owned(), group.count.to_string());
    headers.insert(KEY_HEADER.to_owned(), key.to_owned());
    headers.insert("content-type".to_owned(), "application/json".to_owned());
    msg
}

#[async_trait]
impl Processor for Aggregate {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        self.inner.start_ticking();
        let key = match message_key::evaluate("correlation", self.inner.correlation.as_ref(), &msg)
            .await
        {
            Ok(key) => key,
            Err(e) => return Err(Failure::new(msg, e)),
        };
        Ok(self.inner.join(key, msg).await?.into_iter().collect())
    }
}
