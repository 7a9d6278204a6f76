//! The in-memory [`IdempotentRepository`]: keys with expiry, bounded in number.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use sluice_core::state::{Claim, IdempotentRepository};
use sluice_core::{ErrorKind, ProcessError};
use tokio::time::Instant;

use crate::processors::ttl::{Expiry, ExpiryQueue};

/// Keys held in memory for their time to live, at most `max_keys` of them.
///
/// Expired keys are purged first (oldest expiry first). When every slot holds a live key, the
/// *processed* key closest to expiry is forgotten early to make room; claims of messages still in
/// flight are never evicted, and when all `max_keys` keys are in flight a new claim fails with
/// `unavailable`.
pub(crate) struct MemoryRepository {
    max_keys: usize,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    keys: HashMap<String, Entry>,
    /// Every key, so the expired ones are found from the front.
    expiries: ExpiryQueue,
}

struct Entry {
    expiry: Expiry,
    processed: bool,
}

impl MemoryRepository {
    pub(crate) fn new(max_keys: usize) -> Self {
        MemoryRepository {
            max_keys: max_keys.max(1),
            table: Mutex::new(Table::default()),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        match self.table.lock() {
            Ok(table) => table,
            // Every mutation keeps `keys` and `expiries` consistent before it can panic.
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// How many keys are held (expired ones not yet purged included).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.table().keys.len()
    }
}

impl Table {
    fn live(&self, key: &str, now: Instant) -> Option<&Entry> {
        self.keys.get(key).filter(|e| e.expiry.is_live(now))
    }

    fn remove(&mut self, key: &str) {
        if let Some(old) = self.keys.remove(key) {
            self.expiries.remove(old.expiry);
        }
    }

    fn purge_expired(&mut self, now: Instant) {
        while let Some(key) = self.expiries.pop_expired(now) {
            self.keys.remove(&key);
        }
    }

    /// Makes room for one more key, or says why it cannot.
    fn make_room(&mut self, max_keys: usize, now: Instant) -> Result<(), ProcessError> {
        self.purge_expired(now);
        if self.keys.len() < max_keys {
            return Ok(());
        }
        let victim = self
            .expiries
            .keys()
            .find(|key| self.keys.get(*key).is_some_and(|e| e.processed))
            .cloned();
        match victim {
            Some(key) => {
                tracing::debug!(key, "idempotent repository full: forgetting the oldest key");
                self.remove(&key);
                Ok(())
            }
            None => Err(ProcessError::new(
                ErrorKind::Unavailable,
                format!(
                    "idempotent repository full: all {max_keys} keys belong to messages in flight \
(raise `max_keys` or lower the flow's concurrency)"
                ),
            )),
        }
    }

    fn insert(&mut self, key: &str, ttl: Duration, processed: bool, now: Instant) {
        self.remove(key);
        let expiry = self.expiries.insert(key, now, ttl);
        self.keys
            .insert(key.to_owned(), Entry { expiry, processed });
    }
}

#[async_trait]
impl IdempotentRepository for MemoryRepository {
    async fn try_claim(&self, key: &str, ttl: Duration) -> Result<Claim, ProcessError> {
        let now = Instant::now();
        let mut table = self.table();
        if table.live(key, now).is_some() {
            return Ok(Claim::Duplicate);
        }
        table.remove(key);
        table.make_room(self.max_keys, now)?;
        table.insert(key, ttl, false, now);
        Ok(Claim::Claimed)
    }

    async fn confirm(&self, key: &str, ttl: Duration) -> Result<(), ProcessError> {
        let now = Instant::now();
        let mut table = self.table();
        table.remove(key);
        table.make_room(self.max_keys, now)?;
        table.insert(key, ttl, true, now);
        Ok(())
    }

    async fn release(&self, key: &str) -> Result<(), ProcessError> {
        self.table().remove(key);
        Ok(())
    }

    async fn contains(&self, key: &str) -> Result<bool, ProcessError> {
        Ok(self.table().live(key, Instant::now()).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn claims_are_exclusive_until_released_or_expired() {
        let repo = MemoryRepository::new(10);
        assert_eq!(repo.try_claim("a", TTL).await.unwrap(), Claim::Claimed);
        assert_eq!(repo.try_claim("a", TTL).await.unwrap(), Claim::Duplicate);
        repo.release("a").await.unwrap();
        assert!(!repo.contains("a").await.unwrap());
        assert_eq!(repo.try_claim("a", TTL).await.unwrap(), Claim::Claimed);
        tokio::time::advance(TTL - Duration::from_millis(1)).await;
        assert_eq!(repo.try_claim("a", TTL).await.unwrap(), Claim::Duplicate);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(repo.try_claim("a", TTL).await.unwrap(), Claim::Claimed);
    }

    #[tokio::test(start_paused = true)]
    async fn confirm_restarts_the_ttl_and_records_unclaimed_keys() {
        let repo = MemoryRepository::new(10);
        repo.try_claim("a", TTL).await.unwrap();
        tokio::time::advance(TTL / 2).await;
        repo.confirm("a", TTL).await.unwrap();
        tokio::time::advance(TTL - Duration::from_secs(1)).await;
        assert!(repo.contains("a").await.unwrap());
        repo.confirm("b", TTL).await.unwrap();
        assert!(repo.contains("b").await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn full_repository_purges_expired_then_the_oldest_processed_key() {
        let repo = MemoryRepository::new(2);
        repo.confirm("old", Duration::from_secs(1)).await.unwrap();
        repo.confirm("young", TTL).await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        // "old" has expired: it makes the room, "young" stays.
        repo.confirm("c", TTL).await.unwrap();
        assert!(repo.contains("young").await.unwrap());
        assert_eq!(repo.len(), 2);
        // Nothing expired: the processed key closest to expiry ("young") goes.
        repo.confirm("d", TTL).await.unwrap();
        assert!(!repo.contains("young").await.unwrap());
        assert!(repo.contains("c").await.unwrap() && repo.contains("d").await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn claims_in_flight_are_never_evicted() {
        let repo = MemoryRepository::new(2);
        repo.try_claim("a", TTL).await.unwrap();
        repo.try_claim("b", TTL).await.unwrap();
        let e = repo.try_claim("c", TTL).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert!(e.detail.contains("max_keys"), "{e}");
        assert_eq!(repo.try_claim("a", TTL).await.unwrap(), Claim::Duplicate);
        repo.confirm("a", TTL).await.unwrap();
        assert_eq!(repo.try_claim("c", TTL).await.unwrap(), Claim::Claimed);
        assert!(!repo.contains("a").await.unwrap());
    }
}
