//! The [`IdempotentRepository`] on the runtime's own store (`backend: {store: {}}`): keys in
//! sluice-store's idempotency table, so a duplicate is still recognised after a restart.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sluice_core::state::{Claim, IdempotentRepository};
use sluice_core::{ErrorKind, ProcessError};
use sluice_store::{IdempotentKeys, StoreError};

use crate::durable::DurableStore;

/// One named repository of keys in the process's store.
pub(crate) struct StoreRepository {
    keys: IdempotentKeys,
    /// Starts the purge of expired keys on first use (see [`DurableStore::keep_keys_purged`]).
    durable: Arc<DurableStore>,
}

impl StoreRepository {
    pub(crate) fn new(durable: Arc<DurableStore>, keys: IdempotentKeys) -> Self {
        StoreRepository { keys, durable }
    }
}

/// Every store failure is `unavailable`: a full disk or a reopening database is temporary, and
/// the message is worth retrying.
fn unavailable(error: &StoreError) -> ProcessError {
    ProcessError::new(
        ErrorKind::Unavailable,
        format!("the durable store cannot keep the idempotency key: {error}"),
    )
}

#[async_trait]
impl IdempotentRepository for StoreRepository {
    async fn try_claim(&self, key: &str, ttl: Duration) -> Result<Claim, ProcessError> {
        self.durable.keep_keys_purged();
        match self.keys.try_claim(key, ttl).await {
            Ok(sluice_store::Claim::Claimed) => Ok(Claim::Claimed),
            Ok(sluice_store::Claim::Duplicate) => Ok(Claim::Duplicate),
            Err(e) => Err(unavailable(&e)),
        }
    }

    async fn confirm(&self, key: &str, ttl: Duration) -> Result<(), ProcessError> {
        self.durable.keep_keys_purged();
        self.keys
            .confirm(key, ttl)
            .await
            .map_err(|e| unavailable(&e))
    }

    async fn release(&self, key: &str) -> Result<(), ProcessError> {
        self.keys.release(key).await.map_err(|e| unavailable(&e))
    }

    async fn contains(&self, key: &str) -> Result<bool, ProcessError> {
        self.keys.contains(key).map_err(|e| unavailable(&e))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use sluice_core::Resources;

    fn repository(resources: &Resources, dir: &std::path::Path, name: &str) -> StoreRepository {
        let durable = resources.get_or_default::<DurableStore>();
        durable.set_dir(dir);
        let keys = durable.store().unwrap().idempotent_keys(name);
        StoreRepository::new(durable, keys)
    }

    #[tokio::test]
    async fn keys_outlive_the_store_that_recorded_them_and_claims_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = Duration::from_secs(60);
        {
            let resources = Resources::default();
            let repo = repository(&resources, dir.path(), "orders");
            assert_eq!(repo.try_claim("a", ttl).await.unwrap(), Claim::Claimed);
            repo.confirm("a", ttl).await.unwrap();
            assert_eq!(repo.try_claim("b", ttl).await.unwrap(), Claim::Claimed);
            assert!(repo.contains("b").await.unwrap());
        }
        let resources = Resources::default();
        let repo = repository(&resources, dir.path(), "orders");
        assert_eq!(repo.try_claim("a", ttl).await.unwrap(), Claim::Duplicate);
        assert!(
            !repo.contains("b").await.unwrap(),
            "the claim of an interrupted message is gone"
        );
        repo.release("a").await.unwrap();
        assert_eq!(repo.try_claim("a", ttl).await.unwrap(), Claim::Claimed);
        let other = StoreRepository::new(
            resources.get_or_default::<DurableStore>(),
            resources
                .get_or_default::<DurableStore>()
                .store()
                .unwrap()
                .idempotent_keys("other"),
        );
        assert_eq!(other.try_claim("a", ttl).await.unwrap(), Claim::Claimed);
    }

    #[tokio::test]
    async fn the_purger_removes_expired_keys_and_stops_with_its_store() {
        let dir = tempfile::tempdir().unwrap();
        let resources = Resources::default();
        let repo = repository(&resources, dir.path(), "orders");
        repo.confirm("short", Duration::from_millis(1))
            .await
            .unwrap();
        repo.confirm("long", Duration::from_secs(60)).await.unwrap();
        assert_eq!(repo.keys.stored().unwrap(), 2);
        let durable = resources.get_or_default::<DurableStore>();
        crate::durable::spawn_purger(Arc::downgrade(&durable), Duration::from_millis(5));
        let mut stored = 2;
        for _ in 0..400 {
            stored = repo.keys.stored().unwrap();
            if stored == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(stored, 1, "the expired key was purged");
        assert!(repo.contains("long").await.unwrap());
        // Once the owner is gone, the purger lets the store close: the directory unlocks.
        drop((repo, durable, resources));
        let mut reopened = None;
        for _ in 0..400 {
            match sluice_store::Store::open(dir.path(), sluice_store::StoreOptions::default()) {
                Ok(store) => {
                    reopened = Some(store);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        assert!(reopened.is_some(), "the purger kept the store open");
    }
}
