//! `aggregate`: combines related messages into one (EIP Aggregator).

mod durable;
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

use self::durable::StoredGroups;
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
**State.** By default group contents live in memory, private to the step, and \
acknowledgement shares stay in memory with them (as above).\n\n\
**Persistent groups.** With `backend: {store: {}}` groups live in the runtime's own store (the \
data directory of `sluice run --data DIR`; in memory under `sluice validate`/`test`), under the \
flow's name and the step's `id` (give the step an `id`, so an edit of the flow keeps its groups). \
Each message is **acknowledged once it is durably in its group**: the source may forget it. A \
completed group's aggregate then carries its own acknowledgement: the group is deleted from the \
store once every target committed the aggregate (or its failure was handled by `on_error` or \
`dead_letter`; a failed group's body is then the array of its messages' bodies). A stop leaves \
the open groups stored, and the next start reloads them: a timeout counts from the last message \
as stored (a group whose timeout passed while Sluice was down completes at once), a group that \
already meets its condition completes at once, and an aggregate that was not delivered before \
the stop is emitted again (at-least-once: a crash between delivery and the deletion commit may \
emit it twice; a message redelivered by its source after a crash between its commit and its \
acknowledgement joins its group twice). A full disk fails new messages with `unavailable`.",
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
    .field(FieldSpec::new(
        "backend",
        FieldType::Any,
        "Keep groups in the runtime's store instead of memory, across restarts: `{store: {}}`. Messages are then acknowledged once stored.",
    ))
    .example(
        "Reassemble each split, summing the parts",
        "on_split_complete: true\naggregation: 'map(.amount) | add'\ntimeout: 30s\n",
    )
    .example(
        "Batch an order's lines ten at a time, or after 5s of quiet",
        "correlation: '.order_id'\nsize: 10\ntimeout: 5s\naggregation: '{order_id: .[0].order_id, lines: .}'\n",
    )
    .example(
        "Batch an order's lines ten at a time, keeping open batches across restarts",
        "correlation: '.order_id'\nsize: 10\ntimeout: 1m\nbackend: {store: {}}\n",
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
    backend: Option<Value>,
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
    let repo = repository(config.backend.as_ref(), ctx)?;
    let stored = matches!(repo, Repo::Store(_));
    let inner = Arc::new(Inner {
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
        repo,
        open: Mutex::new(Open::default()),
        ticking: OnceLock::new(),
        reloaded: tokio::sync::OnceCell::new(),
        downstream: Arc::clone(&ctx.downstream),
    });
    if stored {
        spawn_reload(Arc::downgrade(&inner));
    }
    Ok(Arc::new(Aggregate { inner }))
}

/// Where the step keeps its groups: in memory, or in the runtime's store with
/// `backend: {store: {}}` (named after the flow and the step).
fn repository(backend: Option<&Value>, ctx: &BuildContext<'_>) -> Result<Repo, BuildError> {
    let Some(backend) = backend else {
        return Ok(Repo::Memory(Arc::new(
            MemoryAggregationRepository::default(),
        )));
    };
    if !super::named_store::runtime_store(Some(backend))? {
        return Err(BuildError::field(
            "backend",
            "`aggregate` keeps its groups in memory, or in the runtime's store with \
`backend: {store: {}}`",
        ));
    }
    let store = super::named_store::open_runtime_store(ctx)?;
    let name = format!("{}/{}", ctx.flow, ctx.id);
    Ok(Repo::Store(StoredGroups::new(
        store.aggregation_groups(&name),
    )))
}

/// Reloads the stored groups once the flow is built (the downstream is ready then), from a task
/// on the current runtime; none without one (nothing runs then anyway).
fn spawn_reload(inner: Weak<Inner>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        loop {
            let Some(this) = inner.upgrade() else {
                // The flow was dropped before it ran (a failed build, `sluice validate`).
                return;
            };
            if this.downstream.is_ready() {
                this.reload_once().await;
                return;
            }
            drop(this);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
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
    /// Its id in the repository: the correlation key in memory, a UUID in the store.
    id: String,
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
    repo: Repo,
    /// The open groups. An async lock, held across repository calls, so a group's map entry and
    /// its repository entries change together.
    open: Mutex<Open>,
    /// Set once the interval task runs.
    ticking: OnceLock<()>,
    /// Set once the stored groups were reloaded (store only): by the task started at build, or
    /// by the first message if it comes first, so no message joins a group before the stored
    /// ones are open again.
    reloaded: tokio::sync::OnceCell<()>,
    downstream: Arc<dyn Dispatch>,
}

struct Aggregate {
    inner: Arc<Inner>,
}

/// The repository of a step's groups.
enum Repo {
    /// Contents only, keyed by correlation key; the messages' acknowledgements wait in the
    /// group's carrier.
    Memory(Arc<dyn AggregationRepository>),
    /// Whole messages, keyed by group id, acknowledged once stored.
    Store(StoredGroups),
}

fn entry_of(msg: &Message) -> GroupEntry {
    GroupEntry {
        body: msg.body.clone(),
        headers: msg.headers.clone(),
    }
}

impl Repo {
    /// Adds `msg` to group `id` (correlation `key`); the group's size afterwards.
    async fn append(&self, id: &str, key: &str, msg: &Message) -> Result<usize, ProcessError> {
        match self {
            Repo::Memory(repository) => repository.append(id, entry_of(msg)).await,
            Repo::Store(groups) => groups.append(id, key, msg).await,
        }
    }

    /// The entries of group `id`, oldest first.
    async fn entries(&self, id: &str) -> Result<Option<Vec<GroupEntry>>, ProcessError> {
        match self {
            Repo::Memory(repository) => repository.entries(id).await,
            Repo::Store(groups) => Ok(groups
                .messages(id)?
                .map(|messages| messages.iter().map(entry_of).collect())),
        }
    }

    /// The entries of a group that completed. In memory they are removed now; in the store they
    /// stay until the aggregate is settled (see [`Inner::seal`]).
    async fn take(&self, id: &str) -> Result<Option<Vec<GroupEntry>>, ProcessError> {
        match self {
            Repo::Memory(repository) => repository.remove(id).await,
            Repo::Store(_) => self.entries(id).await,
        }
    }
}

impl Inner {
    /// Adds `msg` to the group `key`; completes the group when a condition holds. `None`: the
    /// group is still open and holds the message's shares (in memory) or the message was
    /// acknowledged once stored (in the store); a failure to complete the group hands back every
    /// message's shares in the failure.
    // The message goes back in the `Failure`, so the error is as large as the message.
    #[allow(clippy::result_large_err)]
    async fn join(self: &Arc<Self>, key: String, msg: Message) -> Result<Option<Message>, Failure> {
        self.reload_once().await;
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
        let id = match (open.groups.get(&key), &self.repo) {
            (Some(group), _) => group.id.clone(),
            (None, Repo::Memory(_)) => key.clone(),
            (None, Repo::Store(_)) => StoredGroups::new_id(),
        };
        let size = match self.repo.append(&id, &key, &msg).await {
            Ok(size) => size,
            Err(e) => return Err(Failure::new(msg, e)),
        };
        let generation = open.next_generation;
        let group = open.groups.entry(key.clone()).or_insert_with(|| Group {
            carrier: carrier_of(&msg),
            count: 0,
            expected: None,
            last_seen: Instant::now(),
            generation,
            id,
        });
        let created = group.count == 0;
        group.count = size;
        group.last_seen = Instant::now();
        match self.repo {
            Repo::Memory(_) => group.carrier.absorb_acks(msg),
            // On disk now: the source may forget it.
            Repo::Store(_) => msg.ack(),
        }
        if let Some(n) = split_size {
            group.expected.get_or_insert(n);
        }
        let deadline = group.last_seen;
        if created {
            open.next_generation += 1;
            if let Some(timeout) = self.completion.timeout {
                self.watch_inactivity(key.clone(), generation, deadline + timeout, timeout);
            }
        }
        let group = &open.groups[&key];
        if let Some(by) = self.completed_by(group) {
            // Present: it was looked up above, under the same lock.
            let Some(group) = open.groups.remove(&key) else {
                return Ok(None);
            };
            let entries = self.repo.take(&group.id).await;
            drop(open);
            return self.finish(&key, group, entries, by).await.map(Some);
        }
        let Some(predicate) = &self.completion.predicate else {
            return Ok(None);
        };
        // The predicate looks at the aggregated value, so the group is aggregated now; a
        // failure here fails the whole group (its messages are in it already).
        let entries = self.repo.entries(&group.id).await;
        let verdict = match &entries {
            Ok(entries) => {
                let entries = entries.as_deref().unwrap_or_default();
                match self.aggregate_value(entries, &group.carrier).await {
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
            Err(e) => Err(e.clone()),
        };
        match verdict {
            Ok(None) => Ok(None),
            Ok(Some(value)) => {
                let Some(group) = open.groups.remove(&key) else {
                    return Ok(None);
                };
                let removed = self.repo.take(&group.id).await;
                drop(open);
                let group = self.seal(group);
                if let Err(e) = removed {
                    return Err(Failure::new(group.carrier, e));
                }
                let value = Arc::try_unwrap(value).unwrap_or_else(|v| (*v).clone());
                Ok(Some(label(group, &key, value, CompletedBy::Predicate)))
            }
            Err(e) => {
                let group = open.groups.remove(&key);
                if let Some(group) = &group {
                    let _ = self.repo.take(&group.id).await;
                }
                drop(open);
                match group {
                    Some(group) => Err(self.failed(group, entries.ok().flatten().as_deref(), e)),
                    None => Ok(None),
                }
            }
        }
    }

    /// Which condition, checked on the group's size, completes it now.
    fn completed_by(&self, group: &Group) -> Option<CompletedBy> {
        if group.expected.is_some_and(|n| group.count >= n) {
            Some(CompletedBy::Split)
        } else if self.completion.size.is_some_and(|n| group.count >= n) {
            Some(CompletedBy::Size)
        } else if group.count >= self.max_group_size && self.on_full == OnFull::Complete {
            Some(CompletedBy::MaxGroupSize)
        } else {
            None
        }
    }

    /// Prepares a group taken out of the open ones for its aggregate: in the store, the
    /// aggregate (or its failure) carries the acknowledgement that deletes the stored group.
    fn seal(&self, mut group: Group) -> Group {
        if let Repo::Store(groups) = &self.repo {
            group.carrier = group.carrier.with_ack(groups.settle_token(&group.id));
        }
        group
    }

    /// The failure of a group. In the store its inputs were acknowledged already, so the
    /// failure carries their bodies (as the array `aggregation` would have seen) for a dead
    /// letter to keep.
    fn failed(&self, group: Group, entries: Option<&[GroupEntry]>, error: ProcessError) -> Failure {
        let mut group = self.seal(group);
        if let (Repo::Store(_), Some(entries)) = (&self.repo, entries) {
            group.carrier.body = Body::from_json(Value::Array(bodies(entries)));
        }
        Failure::new(group.carrier, error)
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
            Err(e) => return Err(self.failed(group, None, e)),
        };
        match self.aggregate_value(&entries, &group.carrier).await {
            Ok(value) => Ok(label(self.seal(group), key, value, by)),
            Err(e) => Err(self.failed(group, Some(&entries), e)),
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
        let bodies = Value::Array(bodies(ordered));
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

    /// Completes the group `key` once it has been quiet for `timeout`, first checking at
    /// `deadline`.
    fn watch_inactivity(
        self: &Arc<Self>,
        key: String,
        generation: u64,
        deadline: Instant,
        timeout: Duration,
    ) {
        let inner = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut deadline = deadline;
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
                let entries = this.repo.take(&group.id).await;
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
                    let entries = this.repo.take(&group.id).await;
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

    /// Reloads the stored groups unless that was done (store only; at once in memory).
    async fn reload_once(self: &Arc<Self>) {
        if matches!(self.repo, Repo::Store(_)) {
            self.reloaded.get_or_init(|| self.reload()).await;
        }
    }

    /// Reopens the groups stored by a previous run: each is open again with its messages, its
    /// size and the time of its last message as stored, so a timeout counts from then, not from
    /// the restart. A group that already meets a condition (its aggregate was not delivered
    /// before the stop) completes at once; so does an older group whose key a newer stored group
    /// shares (it had completed by a timer).
    async fn reload(self: &Arc<Self>) {
        let Repo::Store(store) = &self.repo else {
            return;
        };
        let stored = match store.list() {
            Ok(stored) => stored,
            Err(error) => {
                tracing::error!(%error, "cannot reload the stored aggregation groups; they stay stored for the next start");
                return;
            }
        };
        let mut open = self.open.lock().await;
        let mut due = Vec::new();
        for stored in stored {
            let messages = match store.messages(&stored.id) {
                Ok(Some(messages)) if !messages.is_empty() => messages,
                Ok(_) => continue,
                Err(error) => {
                    tracing::error!(group = %stored.id, %error, "a stored aggregation group cannot be read; it is left in the store");
                    continue;
                }
            };
            if let Some(older) = open.groups.remove(&stored.key) {
                let by = if self.completion.timeout.is_some() {
                    CompletedBy::Timeout
                } else {
                    CompletedBy::Interval
                };
                due.push((stored.key.clone(), older, by));
            }
            let age = Duration::from_millis(now_ms().saturating_sub(stored.last_at_ms));
            let now = Instant::now();
            let group = Group {
                carrier: carrier_of(&messages[0]),
                count: messages.len(),
                expected: messages.iter().find_map(split_size),
                last_seen: now.checked_sub(age).unwrap_or(now),
                generation: open.next_generation,
                id: stored.id,
            };
            open.next_generation += 1;
            if let Some(by) = self.completed_by(&group) {
                due.push((stored.key, group, by));
                continue;
            }
            if let Some(predicate) = &self.completion.predicate {
                let entries: Vec<GroupEntry> = messages.iter().map(entry_of).collect();
                let holds = match self.aggregate_value(&entries, &group.carrier).await {
                    Ok(value) => predicate
                        .test(Arc::new(value), &group.carrier)
                        .await
                        .unwrap_or(false),
                    Err(_) => false,
                };
                if holds {
                    due.push((stored.key, group, CompletedBy::Predicate));
                    continue;
                }
            }
            if let Some(timeout) = self.completion.timeout {
                let deadline = group.last_seen + timeout;
                self.watch_inactivity(stored.key.clone(), group.generation, deadline, timeout);
            }
            open.groups.insert(stored.key, group);
        }
        let reopened = open.groups.len();
        drop(open);
        if reopened + due.len() > 0 {
            tracing::info!(
                reopened,
                completed = due.len(),
                "aggregation groups reloaded from the store"
            );
        }
        self.start_ticking();
        for (key, group, by) in due {
            let entries = self.repo.take(&group.id).await;
            let result = self.finish(&key, group, entries, by).await;
            self.emit(result).await;
        }
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

/// The aggregate to be of a group whose first message is `first`: its headers (without the
/// split's) and metadata, no body yet, no acknowledgement shares.
fn carrier_of(first: &Message) -> Message {
    let mut carrier = first.detached().derive(Body::default());
    for name in [INDEX_HEADER, SIZE_HEADER, LAST_HEADER, CORRELATION_HEADER] {
        carrier.headers.remove(name);
    }
    carrier
}

/// The bodies of `entries` as JSON values; a body that is not JSON becomes a string of its text.
fn bodies<'a>(entries: impl IntoIterator<Item = &'a GroupEntry>) -> Vec<Value> {
    entries
        .into_iter()
        .map(|e| match e.body.json() {
            Ok(value) => value.clone(),
            Err(_) => Value::String(e.body.to_text()),
        })
        .collect()
}

/// Now in milliseconds since the epoch, as the store stamps entries.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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
