//! The in-memory [`CacheStore`]: least recently used entries go first.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use sluice_core::ProcessError;
use sluice_core::state::{CacheStore, CachedValue};
use tokio::time::Instant;

use crate::processors::ttl;

/// At most `max_entries` values; when full, the least recently used one (read or written) is
/// evicted, whether or not it has expired. Expired values are dropped when read.
pub(crate) struct MemoryCache {
    max_entries: usize,
    table: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<String, Slot>,
    /// Keys by last use, least recent first.
    by_use: BTreeMap<u64, String>,
    clock: u64,
}

struct Slot {
    value: CachedValue,
    expires_at: Instant,
    used: u64,
}

impl MemoryCache {
    pub(crate) fn new(max_entries: usize) -> Self {
        MemoryCache {
            max_entries: max_entries.max(1),
            table: Mutex::new(Lru::default()),
        }
    }

    fn table(&self) -> MutexGuard<'_, Lru> {
        match self.table.lock() {
            Ok(table) => table,
            // Every mutation keeps both maps consistent before anything that could panic.
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.table().entries.len()
    }
}

impl Lru {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn remove(&mut self, key: &str) {
        if let Some(slot) = self.entries.remove(key) {
            self.by_use.remove(&slot.used);
        }
    }
}

#[async_trait]
impl CacheStore for MemoryCache {
    async fn get(&self, key: &str) -> Result<Option<CachedValue>, ProcessError> {
        let now = Instant::now();
        let mut table = self.table();
        let tick = table.tick();
        let Some(slot) = table.entries.get_mut(key) else {
            return Ok(None);
        };
        if slot.expires_at <= now {
            table.remove(key);
            return Ok(None);
        }
        let previous = std::mem::replace(&mut slot.used, tick);
        let value = slot.value.clone();
        table.by_use.remove(&previous);
        table.by_use.insert(tick, key.to_owned());
        Ok(Some(value))
    }

    async fn put(&self, key: &str, value: CachedValue, ttl: Duration) -> Result<(), ProcessError> {
        let now = Instant::now();
        let expires_at = ttl::expires_at(now, ttl);
        let mut table = self.table();
        table.remove(key);
        while table.entries.len() >= self.max_entries {
            let Some((_, oldest)) = table.by_use.pop_first() else {
                break;
            };
            table.entries.remove(&oldest);
        }
        let used = table.tick();
        table.by_use.insert(used, key.to_owned());
        table.entries.insert(
            key.to_owned(),
            Slot {
                value,
                expires_at,
                used,
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_core::{Body, Headers};

    fn value(n: i64) -> CachedValue {
        CachedValue {
            body: Body::from_json(json!(n)),
            headers: Headers::new(),
        }
    }

    const TTL: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn evicts_the_least_recently_used() {
        let cache = MemoryCache::new(2);
        cache.put("a", value(1), TTL).await.unwrap();
        cache.put("b", value(2), TTL).await.unwrap();
        // Reading "a" makes "b" the least recently used.
        assert_eq!(cache.get("a").await.unwrap(), Some(value(1)));
        cache.put("c", value(3), TTL).await.unwrap();
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get("b").await.unwrap(), None);
        assert_eq!(cache.get("a").await.unwrap(), Some(value(1)));
        assert_eq!(cache.get("c").await.unwrap(), Some(value(3)));
        // Replacing a key does not evict another.
        cache.put("c", value(4), TTL).await.unwrap();
        assert_eq!(cache.get("a").await.unwrap(), Some(value(1)));
        assert_eq!(cache.get("c").await.unwrap(), Some(value(4)));
    }

    #[tokio::test(start_paused = true)]
    async fn values_expire() {
        let cache = MemoryCache::new(2);
        cache.put("a", value(1), TTL).await.unwrap();
        tokio::time::advance(TTL - Duration::from_millis(1)).await;
        assert!(cache.get("a").await.unwrap().is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(cache.get("a").await.unwrap().is_none());
        assert_eq!(cache.len(), 0);
    }
}
