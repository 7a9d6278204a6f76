//! `idempotent_consumer`: lets each message key through once (EIP Idempotent Receiver).

mod memory;
mod store;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::state::{Claim, IdempotentRepository};
use sluice_core::{
    AckToken, BuildContext, BuildError, ErrorKind, Failure, Message, Outcome, Outputs,
    ProcessError, Processor,
};

use super::named_store::{self, StoreRequest};
use super::ttl;
use super::{common, message_key};

pub(crate) use memory::MemoryRepository;

/// The header set on duplicates by `on_duplicate: mark`.
pub const DUPLICATE_HEADER: &str = "sluice.duplicate";

const DEFAULT_MAX_KEYS: u64 = 10_000;

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "idempotent_consumer",
        ComponentKind::Processor,
        "Let a message through only the first time its key is seen",
    )
    .description(
        "Computes a key for each message with jq (`.` is the body, with `$headers` and `$meta`; a \
body that is not JSON is `null`, so keys from headers work on any body) and lets through only \
messages whose key the repository does not hold (EIP Idempotent Receiver). A key that is missing, \
`null`, an array or an object fails the step with `invalid_input`; numbers and booleans are used \
as text.\n\n\
**When a key counts as seen.** With `eager: true` (the default) the key is claimed when the \
message enters, so a duplicate arriving while the first message is still in flight is already a \
duplicate. With `eager: false` the key is recorded only when the first message completes, so \
concurrent copies may all pass; use it when dropping a copy of a message that may still fail is \
worse than processing it twice.\n\n\
**Completion** is the message's acknowledgement: once everything downstream has committed it \
(every target, every part of a split) the key is confirmed and kept for `ttl`. If it is nacked \
instead (a failure, a target that could not deliver) the key is released before the source hears \
of it, so a redelivery is processed again. The source sees exactly the outcome it would have seen \
without this step.\n\n\
**Duplicates** are dropped and **acknowledged** by default (the source does not redeliver them); \
`on_duplicate: fail` fails them with `rejected` (the error handling or the source decides), and \
`mark` lets them continue with the header `sluice.duplicate: true`. With `eager: true` a \
duplicate dropped while the first message is in flight is not redelivered if that first message \
then fails; choose `fail` when that matters.\n\n\
**Repository.** Keys are kept in memory for `ttl` (claims of messages in flight expire too), at \
most `max_keys` of them: expired keys are purged first; when every key is live, the processed key \
closest to expiry is forgotten early; claims of messages in flight are never evicted, and when all \
`max_keys` keys are in flight a new message fails with `unavailable`. Steps that give the same \
`repository` name share one repository, in one flow or across flows. Memory is lost on restart.\n\n\
**Persistent repository.** With `backend: {store: {}}`, keys live in the runtime's own store \
(the data directory of `sluice run --data DIR`; in memory under `sluice validate`/`test`): a \
duplicate is still recognised after a restart. The repository is the one named by `repository` \
(steps giving the same name share it), else private to the step (named after the flow and the \
step's `id` or position: give an `id` or a `repository` so an edit of the flow keeps the keys). A \
confirmed key is kept for `ttl`, then forgotten; expired keys are removed from disk every minute. \
`max_keys` does not apply. A claim (`eager: true`) belongs to its message in flight and does not \
survive a restart: the source redelivers an interrupted message and it is processed, not dropped \
as a duplicate of itself. A store that cannot write (a full disk) fails the message with \
`unavailable`.\n\n\
**Remote repository.** With `backend`, keys live in Redis (`SET NX PX`, keys `prefix` + key) or \
a NATS KV bucket (atomic create/compare-and-set, each value carrying its expiry): they survive \
restarts and are shared by every instance using the same store, so of several instances that \
receive the same message one processes it. A store that cannot be reached fails the message with \
`unavailable`.",
    )
    .field(
        FieldSpec::new("key", FieldType::Jq, "The jq expression giving the message's key (a string, number or boolean).")
            .required(),
    )
    .field(
        FieldSpec::new("eager", FieldType::Bool, "Claim the key when the message enters (`true`) or record it only when the message completes (`false`).")
            .default_value(true),
    )
    .field(
        FieldSpec::new(
            "on_duplicate",
            FieldType::Enum(vec!["drop", "fail", "mark"]),
            "What happens to a duplicate: dropped and acknowledged, failed with `rejected`, or passed on with the header `sluice.duplicate: true`.",
        )
        .default_value("drop"),
    )
    .field(
        FieldSpec::new("ttl", FieldType::Duration, "How long a processed key is remembered (and how long a claim of a message in flight lasts).")
            .default_value("1h"),
    )
    .field(FieldSpec::new(
        "repository",
        FieldType::String,
        "Name of a repository shared with every other `idempotent_consumer` giving the same name; without it the step has its own.",
    ))
    .field(FieldSpec::new(
        "max_keys",
        FieldType::Integer { min: Some(1), max: None },
        "Most keys the repository holds (default 10000); fixed by the first step that names a shared repository.",
    ))
    .field(FieldSpec::new(
        "backend",
        FieldType::Any,
        "Where keys live instead of memory: `{store: {}}` (the runtime's own store, kept across restarts; `repository` names the key set), or a remote repository shared by every instance, `{redis: {url, prefix}}` or `{nats_kv: {url, bucket, max_age}}` (with those connectors built in; `repository` and `max_keys` do not apply, and flow tests use memory).",
    ))
    .shorthand("key")
    .example("Drop repeated orders by id", "key: .order_id\n")
    .example(
        "One repository for two flows, keyed by a header, failing duplicates",
        "key: '$headers[\"message-id\"]'\nrepository: inbound\non_duplicate: fail\nttl: 24h\nmax_keys: 100000\n",
    )
    .example(
        "Remember order ids for a day, across restarts",
        "key: .order_id\nrepository: orders\nttl: 24h\nbackend: {store: {}}\n",
    )
    .example(
        "Record keys only once processed",
        "key: .event.id\neager: false\non_duplicate: mark\n",
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OnDuplicate {
    #[default]
    Drop,
    Fail,
    Mark,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    key: String,
    #[serde(default = "yes")]
    eager: bool,
    #[serde(default)]
    on_duplicate: OnDuplicate,
    #[serde(default = "default_ttl")]
    ttl: HumanDuration,
    repository: Option<String>,
    max_keys: Option<u64>,
    backend: Option<Value>,
}

// The defaults below repeat the spec's, for configurations that did not go through the engine's
// validation (unit tests).
fn yes() -> bool {
    true
}

fn default_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    let key = ctx.steps.compile_jq("key", &config.key)?;
    let ttl = ttl::checked(config.ttl.0)?;
    let repository = if named_store::runtime_store(config.backend.as_ref())? {
        runtime_store_repository(&config, ctx)?
    } else {
        memory_or_remote_repository(&config, ctx)?
    };
    Ok(Arc::new(IdempotentConsumer {
        key,
        repository,
        ttl,
        eager: config.eager,
        on_duplicate: config.on_duplicate,
        confirming: Arc::default(),
    }))
}

/// A remote repository when `backend` names one, else one in memory (shared by name).
fn memory_or_remote_repository(
    config: &Config,
    ctx: &BuildContext<'_>,
) -> Result<Arc<dyn IdempotentRepository>, BuildError> {
    let remote =
        named_store::remote::<dyn IdempotentRepository>(ctx, config.backend.as_ref(), |b| {
            Some(b.repository)
        })?;
    Ok(match remote {
        Some(remote) => remote,
        None => named_store::resolve::<dyn IdempotentRepository>(
            ctx.resources,
            &StoreRequest {
                name: config.repository.as_deref(),
                name_field: "repository",
                capacity: config.max_keys,
                capacity_field: "max_keys",
                default_capacity: DEFAULT_MAX_KEYS,
            },
            |max_keys| Arc::new(MemoryRepository::new(max_keys)),
        )?,
    })
}

/// The repository in the runtime's store: named by `repository`, else private to the step.
fn runtime_store_repository(
    config: &Config,
    ctx: &BuildContext<'_>,
) -> Result<Arc<dyn IdempotentRepository>, BuildError> {
    if config.max_keys.is_some() {
        return Err(BuildError::field(
            "max_keys",
            "`max_keys` bounds a repository in memory; the store keeps each key until its `ttl` \
ends: remove `max_keys`, or `backend` to keep keys in memory",
        ));
    }
    let name = match config.repository.as_deref() {
        Some("") => return Err(BuildError::field("repository", "give a non-empty name")),
        Some(name) => name.to_owned(),
        None => format!("{}/{}", ctx.flow, ctx.id),
    };
    let store = named_store::open_runtime_store(ctx)?;
    // The repository also needs the process's store handle: it starts the purge of expired keys.
    let durable = ctx
        .resources
        .get_or_default::<crate::durable::DurableStore>();
    Ok(Arc::new(store::StoreRepository::new(
        durable,
        store.idempotent_keys(&name),
    )))
}

/// Keys whose message completed and whose confirmation is on its way to the repository. The
/// acknowledgement callback is synchronous and the repository is not, so without this a
/// duplicate arriving right after the first message's reply could slip in before the key is
/// recorded (`eager: false`).
type Confirming = Arc<std::sync::Mutex<std::collections::HashSet<String>>>;

struct IdempotentConsumer {
    key: Arc<dyn JqProgram>,
    repository: Arc<dyn IdempotentRepository>,
    ttl: Duration,
    eager: bool,
    on_duplicate: OnDuplicate,
    confirming: Confirming,
}

#[async_trait]
impl Processor for IdempotentConsumer {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let key = match message_key::evaluate("key", self.key.as_ref(), &msg).await {
            Ok(key) => key,
            Err(e) => return Err(Failure::new(msg, e)),
        };
        let first = if self.eager {
            self.repository
                .try_claim(&key, self.ttl)
                .await
                .map(|claim| claim == Claim::Claimed)
        } else if self.is_confirming(&key) {
            Ok(false)
        } else {
            self.repository.contains(&key).await.map(|seen| !seen)
        };
        match first {
            Ok(true) => Ok(common::one(self.settle_on_completion(msg, key))),
            Ok(false) => self.duplicate(msg, &key),
            Err(e) => Err(Failure::new(msg, e)),
        }
    }
}

impl IdempotentConsumer {
    fn is_confirming(&self, key: &str) -> bool {
        self.confirming.lock().is_ok_and(|keys| keys.contains(key))
    }

    // The message is moved into the error so it is never lost.
    #[allow(clippy::result_large_err)]
    fn duplicate(&self, msg: Message, key: &str) -> Result<Outputs, Failure> {
        tracing::debug!(key, "duplicate message");
        match self.on_duplicate {
            OnDuplicate::Drop => {
                msg.ack();
                Ok(Outputs::new())
            }
            OnDuplicate::Fail => Err(Failure::new(
                msg,
                ProcessError::new(
                    ErrorKind::Rejected,
                    format!("duplicate message: key `{key}` was already seen"),
                ),
            )),
            OnDuplicate::Mark => Ok(common::one(msg.with_header(DUPLICATE_HEADER, "true"))),
        }
    }

    /// Puts a new acknowledgement between the message and its source: when it resolves, the key
    /// is confirmed (ack) or released (nack), and only then is the source told the same outcome.
    fn settle_on_completion(&self, mut msg: Message, key: String) -> Message {
        let upstream = msg.take_acks();
        let repository = Arc::clone(&self.repository);
        let ttl = self.ttl;
        let eager = self.eager;
        let confirming = Arc::clone(&self.confirming);
        // The outcome may be decided on any thread (a sink's task, a dropped message), so the
        // repository update runs on the runtime that processes the message.
        let runtime = tokio::runtime::Handle::try_current().ok();
        let token = AckToken::with_callback(move |outcome| {
            let acked = outcome.is_ack();
            if acked && let Ok(mut keys) = confirming.lock() {
                keys.insert(key.clone());
            }
            let settle = async move {
                let result = match (&outcome, eager) {
                    (Outcome::Ack, _) => repository.confirm(&key, ttl).await,
                    (Outcome::Nack(_), true) => repository.release(&key).await,
                    // On completion: nothing was recorded, nothing to undo.
                    (Outcome::Nack(_), false) => Ok(()),
                };
                if let Err(e) = result {
                    tracing::warn!(key, error = %e, "idempotent repository update failed");
                }
                if acked && let Ok(mut keys) = confirming.lock() {
                    keys.remove(&key);
                }
                resolve(upstream, &outcome);
            };
            match runtime {
                Some(runtime) => {
                    runtime.spawn(settle);
                }
                None => tracing::error!("no runtime to settle an idempotent key on; source nacked"),
            }
        });
        msg.with_ack(token)
    }
}

/// Hands `outcome` to the source's shares.
fn resolve(upstream: Vec<AckToken>, outcome: &Outcome) {
    for token in upstream {
        match outcome {
            Outcome::Ack => token.ack(),
            Outcome::Nack(reason) => token.nack(Arc::clone(reason)),
        }
    }
}

#[cfg(test)]
mod tests;
