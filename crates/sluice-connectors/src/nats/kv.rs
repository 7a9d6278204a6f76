//! A NATS KV bucket as the idempotent consumer's repository and the cache's store.
//!
//! KV buckets expire values only by the bucket's `max_age`, so each value carries its own expiry
//! (milliseconds since the epoch, first 8 bytes big-endian) and an expired value counts as
//! absent; `max_age` only bounds how long dead values take room. Claims are atomic through the
//! bucket's compare-and-set: `create` fails when the key exists, and an expired value is taken
//! over with `update` at the revision that was read.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use sluice_core::state::{CacheStore, CachedValue, Claim, IdempotentRepository};
use sluice_core::{ErrorKind, HealthHandle, ProcessError};

use crate::cached::{decode_cached, encode_cached};
use tokio::sync::OnceCell;

use std::sync::Arc;

use serde::Deserialize;
use sluice_core::duration::HumanDuration;
use sluice_core::registry::StoreBackend;
use sluice_core::{BuildContext, BuildError};

use super::{LazyClient, check_url, describe};

/// Where a [`NatsKv`] store keeps its values.
#[derive(Debug, Clone)]
pub struct KvOptions {
    /// Server address.
    pub url: String,
    /// Authentication token.
    pub token: Option<String>,
    /// Bucket name; created if missing.
    pub bucket: String,
    /// The bucket's `max_age` when it is created: the longest any value is kept.
    pub max_age: Duration,
}

/// An idempotency repository and cache store over one KV bucket.
pub struct NatsKv {
    options: KvOptions,
    client: LazyClient,
    store: OnceCell<kv::Store>,
}

impl NatsKv {
    /// A store on `options.bucket`, connecting on first use and reporting on `health`.
    pub fn new(options: KvOptions, health: HealthHandle) -> Self {
        NatsKv {
            client: LazyClient::new(
                options.url.clone(),
                options.token.clone(),
                format!("kv {}", options.bucket),
                health,
            ),
            options,
            store: OnceCell::new(),
        }
    }

    async fn bucket(&self) -> Result<&kv::Store, ProcessError> {
        self.store
            .get_or_try_init(|| async {
                let js = jetstream::new(self.client.get().await?);
                if let Ok(store) = js.get_key_value(&self.options.bucket).await {
                    return Ok(store);
                }
                // The bucket's stream is made here rather than with `create_key_value`, which
                // first reads the account's limits in a form older servers (2.9) do not send.
                js.get_or_create_stream(bucket_stream(&self.options))
                    .await
                    .map_err(|e| self.error("creating the bucket", e))?;
                js.get_key_value(&self.options.bucket)
                    .await
                    .map_err(|e| self.error("opening the bucket", e))
            })
            .await
    }

    fn error(&self, what: &str, e: impl std::fmt::Display) -> ProcessError {
        ProcessError::new(
            ErrorKind::Unavailable,
            format!(
                "KV bucket `{}` on {}: {what} failed: {e}",
                self.options.bucket,
                describe(&self.options.url)
            ),
        )
    }

    /// The live value under `key` and its revision, if any.
    async fn live(&self, key: &str) -> Result<(Option<Bytes>, Option<u64>), ProcessError> {
        let entry = self
            .bucket()
            .await?
            .entry(key)
            .await
            .map_err(|e| self.error("reading", e))?;
        Ok(match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let revision = Some(e.revision);
                if expired(&e.value) {
                    (None, revision)
                } else {
                    (Some(e.value), revision)
                }
            }
            Some(e) => (None, Some(e.revision)),
            None => (None, None),
        })
    }
}

/// The stream behind a KV bucket, as NATS KV lays it out (one value per key).
fn bucket_stream(options: &KvOptions) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: format!("KV_{}", options.bucket),
        subjects: vec![format!("$KV.{}.>", options.bucket)],
        max_messages_per_subject: 1,
        max_age: options.max_age,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    }
}

/// `backend: {nats_kv: {...}}` of an `idempotent_consumer` or a `cache`.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendConfig {
    #[serde(default = "default_url")]
    url: String,
    #[serde(default)]
    token: Option<String>,
    bucket: String,
    #[serde(default = "default_max_age")]
    max_age: HumanDuration,
}

fn default_url() -> String {
    super::DEFAULT_URL.to_owned()
}
fn default_max_age() -> HumanDuration {
    HumanDuration(Duration::from_secs(7 * 24 * 3600))
}

fn build(config: &serde_json::Value, ctx: &BuildContext<'_>) -> Result<NatsKv, BuildError> {
    let c: BackendConfig = crate::config::parse(config)?;
    check_url(&c.url)?;
    if c.bucket.is_empty()
        || !c
            .bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(BuildError::field(
            "bucket",
            "use letters, digits, `-` and `_`",
        ));
    }
    if c.max_age.0 < Duration::from_secs(1) {
        return Err(BuildError::field(
            "max_age",
            "must be at least 1s; it bounds how long any key is kept",
        ));
    }
    let options = KvOptions {
        url: c.url,
        token: c.token,
        bucket: c.bucket,
        max_age: c.max_age.0,
    };
    Ok(NatsKv::new(options, HealthHandle::for_component(ctx)))
}

/// The `nats_kv` store backend for `idempotent_consumer` and `cache` (not `throttle`: a GCRA
/// reservation is a read-modify-write that KV could only do with a compare-and-swap loop).
pub fn backend() -> StoreBackend {
    StoreBackend {
        repository: |config, ctx| Ok(Arc::new(build(config, ctx)?)),
        cache: |config, ctx| Ok(Arc::new(build(config, ctx)?)),
        rate_limit: None,
    }
}

/// Milliseconds since the epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn expiry(ttl: Duration) -> u64 {
    now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
}

/// A value: expiry, then `rest`.
fn encode(expires_ms: u64, rest: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(8 + rest.len());
    out.put_u64(expires_ms);
    out.put_slice(rest);
    out.freeze()
}

fn expired(value: &[u8]) -> bool {
    value
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .is_none_or(|b| u64::from_be_bytes(b) <= now_ms())
}

/// KV keys allow `[-/_=.a-zA-Z0-9]` with rules about `.`: every other byte, `.` and `=` included,
/// is written as `=XX` (hex), so distinct keys stay distinct and no dot rule can be broken.
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 1);
    // A prefix keeps the key from being empty.
    out.push('k');
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

#[async_trait]
impl IdempotentRepository for NatsKv {
    async fn try_claim(&self, key: &str, ttl: Duration) -> Result<Claim, ProcessError> {
        let key = encode_key(key);
        let value = encode(expiry(ttl), b"claimed");
        let bucket = self.bucket().await?;
        match bucket.create(&key, value.clone()).await {
            Ok(_) => return Ok(Claim::Claimed),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(self.error("claiming", e)),
        }
        match self.live(&key).await? {
            (Some(_), _) => Ok(Claim::Duplicate),
            (None, Some(revision)) => match bucket.update(&key, value, revision).await {
                Ok(_) => Ok(Claim::Claimed),
                // Someone else took the expired key over first.
                Err(_) => Ok(Claim::Duplicate),
            },
            (None, None) => match bucket.create(&key, value).await {
                Ok(_) => Ok(Claim::Claimed),
                Err(_) => Ok(Claim::Duplicate),
            },
        }
    }

    async fn confirm(&self, key: &str, ttl: Duration) -> Result<(), ProcessError> {
        self.bucket()
            .await?
            .put(encode_key(key), encode(expiry(ttl), b"done"))
            .await
            .map_err(|e| self.error("confirming", e))?;
        Ok(())
    }

    async fn release(&self, key: &str) -> Result<(), ProcessError> {
        self.bucket()
            .await?
            .purge(encode_key(key))
            .await
            .map_err(|e| self.error("releasing", e))
    }

    async fn contains(&self, key: &str) -> Result<bool, ProcessError> {
        Ok(self.live(&encode_key(key)).await?.0.is_some())
    }
}

#[async_trait]
impl CacheStore for NatsKv {
    async fn get(&self, key: &str) -> Result<Option<CachedValue>, ProcessError> {
        let Some(value) = self.live(&encode_key(key)).await?.0 else {
            return Ok(None);
        };
        Ok(decode_cached(&value[8..]))
    }

    async fn put(&self, key: &str, value: CachedValue, ttl: Duration) -> Result<(), ProcessError> {
        let bytes = encode(expiry(ttl), &encode_cached(&value));
        self.bucket()
            .await?
            .put(encode_key(key), bytes)
            .await
            .map_err(|e| self.error("writing", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_encoded_injectively_into_the_kv_alphabet() {
        assert_eq!(encode_key("order-1"), "korder-1");
        assert_eq!(encode_key("a b"), "ka=20b");
        assert_eq!(encode_key("a=20b"), "ka=3D20b");
        assert_eq!(encode_key(""), "k");
        assert_eq!(encode_key("a.b"), "ka=2Eb");
        assert_ne!(encode_key("a.b"), encode_key("a=2Eb"));
    }

    #[test]
    fn values_carry_their_expiry() {
        assert!(!expired(&encode(expiry(Duration::from_secs(60)), b"x")));
        assert!(expired(&encode(now_ms() - 1, b"x")));
        assert!(expired(b"short"));
    }
}
