//! `cache`: get-or-compute by key: a hit replaces the message with the cached result and skips the
//! nested steps; a miss runs them and keeps their result.

mod memory;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::bytesize::ByteSize;
use sluice_core::component::JqProgram;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::state::{CacheStore, CachedValue};
use sluice_core::{BuildContext, BuildError, Failure, Headers, Message, Outputs, Processor};
use tokio::sync::watch;

use super::named_store::{self, StoreRequest};
use super::ttl;
use super::{common, message_key};

pub(crate) use memory::MemoryCache;

/// The header telling whether a message's result came from the cache (`hit`) or not (`miss`).
pub const CACHE_HEADER: &str = "sluice.cache";

const DEFAULT_MAX_ENTRIES: u64 = 1_000;

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "cache",
        ComponentKind::Processor,
        "Reuse the result of nested steps for messages with the same key",
    )
    .description(
        "Computes a key with jq (as in `idempotent_consumer`: a string, number or boolean; a \
missing key fails with `invalid_input`) and looks it up. On a **hit** the cached body replaces the \
message's body, the cached `headers` are set on it, and the nested `steps` are skipped. On a \
**miss** the message runs through `steps`; when they give exactly one message, its body (and the \
listed `headers`) is kept for `ttl` and the message continues. Either way the message gets the \
header `sluice.cache: hit` or `miss`, and keeps its acknowledgement.\n\n\
A failure in `steps` is the failure of `cache` and **nothing is cached**. Steps giving no message \
or several are passed on as they are and not cached; neither is a result larger than \
`max_entry_size`.\n\n\
**Concurrent misses** of one key in one step are computed once: the first message runs `steps`, \
the others wait for it and then read its result (if it failed, the next one computes).\n\n\
**Store.** In memory, at most `max_entries` results; when full, the **least recently used** \
result is evicted (expired results go when read or when they are least recently used). Steps giving \
the same `store` name share one store across flows. If the store cannot be read or written the \
message is computed as on a miss and a warning is logged: the cache never fails a message itself.\n\n\
**Remote store.** With `backend`, results live in Redis (`SET PX`) or a NATS KV bucket (each \
value carrying its expiry), shared by every instance and kept across restarts; the same rule \
holds: a store that cannot be reached makes a miss, never a failure.",
    )
    .field(FieldSpec::new("key", FieldType::Jq, "The jq expression giving the cache key.").required())
    .field(FieldSpec::new("steps", FieldType::Steps, "The steps computing the result on a miss.").required())
    .field(
        FieldSpec::new("ttl", FieldType::Duration, "How long a result is reused.")
            .default_value("5m"),
    )
    .field(
        FieldSpec::new(
            "headers",
            FieldType::List(Box::new(FieldType::String)),
            "Headers of the result kept with it and restored on a hit (the body always is).",
        )
        .default_value(Value::Array(Vec::new())),
    )
    .field(FieldSpec::new(
        "store",
        FieldType::String,
        "Name of a store shared with every other `cache` step giving the same name; without it the step has its own.",
    ))
    .field(FieldSpec::new(
        "max_entries",
        FieldType::Integer { min: Some(1), max: None },
        "Most results the store holds (default 1000); fixed by the first step that names a shared store.",
    ))
    .field(
        FieldSpec::new("max_entry_size", FieldType::ByteSize, "Results with a larger body are not cached.")
            .default_value("1MiB"),
    )
    .field(FieldSpec::new(
        "backend",
        FieldType::Any,
        "A remote store shared by every instance instead of memory: `{redis: {url, prefix}}` or `{nats_kv: {url, bucket, max_age}}` (with those connectors built in). `store` and `max_entries` do not apply; flow tests use memory.",
    ))
    .example(
        "Cache a price lookup for a minute",
        "key: .sku\nttl: 1m\nsteps:\n  - transform: '{sku: .sku, price: 10}'\n",
    )
    .example(
        "Shared store, keeping a header",
        "key: '$headers[\"x-customer\"]'\nstore: customers\nmax_entries: 10000\nheaders: [content-type]\nsteps:\n  - transform: '{customer: $headers[\"x-customer\"]}'\n  - set_header: {name: content-type, value: application/json}\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    key: String,
    steps: Value,
    #[serde(default = "five_minutes")]
    ttl: HumanDuration,
    #[serde(default)]
    headers: Vec<String>,
    store: Option<String>,
    max_entries: Option<u64>,
    #[serde(default = "one_mebibyte")]
    max_entry_size: ByteSize,
    backend: Option<Value>,
}

// The defaults repeat the spec's, for configurations that did not go through validation (tests).
fn five_minutes() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn one_mebibyte() -> ByteSize {
    ByteSize(1 << 20)
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    let key = ctx.steps.compile_jq("key", &config.key)?;
    let steps = ctx.steps.build_steps("steps", &config.steps)?;
    let ttl = ttl::checked(config.ttl.0)?;
    let remote =
        named_store::remote::<dyn CacheStore>(ctx, config.backend.as_ref(), |b| Some(b.cache))?;
    let store = match remote {
        Some(remote) => remote,
        None => named_store::resolve::<dyn CacheStore>(
            ctx.resources,
            &StoreRequest {
                name: config.store.as_deref(),
                name_field: "store",
                capacity: config.max_entries,
                capacity_field: "max_entries",
                default_capacity: DEFAULT_MAX_ENTRIES,
            },
            |max| Arc::new(MemoryCache::new(max)),
        )?,
    };
    Ok(Arc::new(Cache {
        key,
        steps,
        ttl,
        headers: config.headers,
        max_entry_size: config.max_entry_size.as_usize(),
        store,
        computing: Mutex::new(HashMap::new()),
    }))
}

struct Cache {
    key: Arc<dyn JqProgram>,
    steps: Arc<dyn Processor>,
    ttl: Duration,
    headers: Vec<String>,
    max_entry_size: usize,
    store: Arc<dyn CacheStore>,
    /// Keys being computed now; waiters are woken when the computing message drops the sender.
    computing: Mutex<HashMap<String, watch::Receiver<()>>>,
}

/// Marks a key as being computed; dropping it (success, failure or cancellation) wakes the
/// messages waiting for that key.
struct Computing<'a> {
    computing: &'a Mutex<HashMap<String, watch::Receiver<()>>>,
    key: &'a str,
    _done: watch::Sender<()>,
}

impl Drop for Computing<'_> {
    fn drop(&mut self) {
        if let Ok(mut computing) = self.computing.lock() {
            computing.remove(self.key);
        }
    }
}

/// Whether this message computes its key or waits for another one that does.
enum Turn<'a> {
    Compute(Computing<'a>),
    Wait(watch::Receiver<()>),
}

impl Cache {
    fn turn<'a>(&'a self, key: &'a str) -> Turn<'a> {
        let mut computing = match self.computing.lock() {
            Ok(computing) => computing,
            // Inserts and removes cannot be left half done.
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(waiting) = computing.get(key) {
            return Turn::Wait(waiting.clone());
        }
        let (done, waiting) = watch::channel(());
        computing.insert(key.to_owned(), waiting);
        Turn::Compute(Computing {
            computing: &self.computing,
            key,
            _done: done,
        })
    }

    async fn lookup(&self, key: &str) -> Option<CachedValue> {
        match self.store.get(key).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(key, error = %e, "cache store read failed; computing");
                None
            }
        }
    }

    async fn keep(&self, key: &str, result: &Message) {
        if result.body.len() > self.max_entry_size {
            tracing::debug!(key, "result larger than max_entry_size: not cached");
            return;
        }
        let headers: Headers = self
            .headers
            .iter()
            .filter_map(|name| Some((name.clone(), result.headers.get(name)?.clone())))
            .collect();
        let value = CachedValue {
            body: result.body.clone(),
            headers,
        };
        if let Err(e) = self.store.put(key, value, self.ttl).await {
            tracing::warn!(key, error = %e, "cache store write failed");
        }
    }
}

#[async_trait]
impl Processor for Cache {
    async fn process(&self, mut msg: Message) -> Result<Outputs, Failure> {
        let key = match message_key::evaluate("key", self.key.as_ref(), &msg).await {
            Ok(key) => key,
            Err(e) => return Err(Failure::new(msg, e)),
        };
        loop {
            if let Some(hit) = self.lookup(&key).await {
                msg.body = hit.body;
                msg.headers.extend(hit.headers);
                msg.headers
                    .insert(CACHE_HEADER.to_owned(), "hit".to_owned());
                return Ok(common::one(msg));
            }
            match self.turn(&key) {
                Turn::Wait(mut other) => {
                    // Resolves (with an error) when the computing message is done either way.
                    let _ = other.changed().await;
                }
                Turn::Compute(_computing) => {
                    let mut outputs = self.steps.process(msg).await?;
                    if let [result] = outputs.as_mut_slice() {
                        self.keep(&key, result).await;
                    }
                    for output in &mut outputs {
                        output
                            .headers
                            .insert(CACHE_HEADER.to_owned(), "miss".to_owned());
                    }
                    return Ok(outputs);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
