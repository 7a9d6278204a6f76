//! Redis as the idempotent consumer's repository and the cache's store: one key per entry under
//! a prefix, with Redis's own expiry (`PX`).
//!
//! A claim is `SET key claimed NX PX ttl`, atomic in Redis, so instances sharing the prefix
//! share the claims: of several instances that receive the same message, one processes it.

use std::time::Duration;

use async_trait::async_trait;
use sluice_core::state::{CacheStore, CachedValue, Claim, IdempotentRepository};
use sluice_core::{BuildError, HealthHandle, ProcessError};

use std::sync::Arc;

use serde::Deserialize;
use sluice_core::BuildContext;
use sluice_core::registry::StoreBackend;

use super::{LazyConnection, client, default_url};
use crate::cached::{decode_cached, encode_cached};

/// An idempotency repository and cache store on one Redis database.
pub struct RedisStore {
    prefix: String,
    conn: LazyConnection,
}

impl RedisStore {
    /// A store on `url` whose keys are `prefix` + the entry's key; connects on first use.
    pub fn new(url: &str, prefix: &str, health: HealthHandle) -> Result<Self, BuildError> {
        Ok(RedisStore {
            prefix: prefix.to_owned(),
            conn: LazyConnection::new(client(url)?, url.to_owned(), health),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        what: &str,
        cmd: &redis::Cmd,
    ) -> Result<T, ProcessError> {
        self.conn.query(what, cmd).await
    }
}

/// `backend: {redis: {...}}` of an `idempotent_consumer`, a `cache` or a `throttle`.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendConfig {
    #[serde(default = "default_url")]
    url: String,
    /// Put before every key; default `sluice:<flow>:<step>:`.
    #[serde(default)]
    prefix: Option<String>,
}

fn build(config: &serde_json::Value, ctx: &BuildContext<'_>) -> Result<RedisStore, BuildError> {
    let c: BackendConfig = crate::config::parse(config)?;
    let prefix = c
        .prefix
        .unwrap_or_else(|| format!("sluice:{}:{}:", ctx.flow, ctx.id));
    RedisStore::new(&c.url, &prefix, HealthHandle::for_component(ctx))
}

/// The `redis` store backend for `idempotent_consumer`, `cache` and `throttle`.
pub fn backend() -> StoreBackend {
    StoreBackend {
        repository: |config, ctx| Ok(Arc::new(build(config, ctx)?)),
        cache: |config, ctx| Ok(Arc::new(build(config, ctx)?)),
        rate_limit: Some(|config, ctx| {
            let store = build(config, ctx)?;
            Ok(Arc::new(super::rate_limit::RedisRateLimit::new(
                store.prefix,
                store.conn,
            )))
        }),
    }
}

/// Milliseconds for `PX`, at least 1 (Redis refuses 0).
fn px(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl IdempotentRepository for RedisStore {
    async fn try_claim(&self, key: &str, ttl: Duration) -> Result<Claim, ProcessError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key))
            .arg("claimed")
            .arg("NX")
            .arg("PX")
            .arg(px(ttl));
        let set: Option<String> = self.run("claiming a key", &cmd).await?;
        Ok(if set.is_some() {
            Claim::Claimed
        } else {
            Claim::Duplicate
        })
    }

    async fn confirm(&self, key: &str, ttl: Duration) -> Result<(), ProcessError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key)).arg("done").arg("PX").arg(px(ttl));
        self.run::<()>("confirming a key", &cmd).await
    }

    async fn release(&self, key: &str) -> Result<(), ProcessError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.key(key));
        self.run::<u64>("releasing a key", &cmd).await.map(drop)
    }

    async fn contains(&self, key: &str) -> Result<bool, ProcessError> {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(self.key(key));
        Ok(self.run::<u64>("looking up a key", &cmd).await? > 0)
    }
}

#[async_trait]
impl CacheStore for RedisStore {
    async fn get(&self, key: &str) -> Result<Option<CachedValue>, ProcessError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.key(key));
        let value: Option<Vec<u8>> = self.run("reading the cache", &cmd).await?;
        Ok(value.as_deref().and_then(decode_cached))
    }

    async fn put(&self, key: &str, value: CachedValue, ttl: Duration) -> Result<(), ProcessError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key))
            .arg(encode_cached(&value))
            .arg("PX")
            .arg(px(ttl));
        self.run::<()>("writing the cache", &cmd).await
    }
}
