//! The in-memory [`AggregationRepository`].

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use sluice_core::ProcessError;
use sluice_core::state::{AggregationRepository, GroupEntry};

/// Groups held in a map, each a list of entries in arrival order. Its bounds (number of groups,
/// entries per group) are enforced by the `aggregate` step, which knows what to do at a bound.
#[derive(Default)]
pub(crate) struct MemoryAggregationRepository {
    groups: Mutex<HashMap<String, Vec<GroupEntry>>>,
}

impl MemoryAggregationRepository {
    fn groups(&self) -> MutexGuard<'_, HashMap<String, Vec<GroupEntry>>> {
        match self.groups.lock() {
            Ok(groups) => groups,
            // Every mutation is a single map operation: a panic cannot leave it half done.
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[async_trait]
impl AggregationRepository for MemoryAggregationRepository {
    async fn append(&self, key: &str, entry: GroupEntry) -> Result<usize, ProcessError> {
        let mut groups = self.groups();
        let group = groups.entry(key.to_owned()).or_default();
        group.push(entry);
        Ok(group.len())
    }

    async fn entries(&self, key: &str) -> Result<Option<Vec<GroupEntry>>, ProcessError> {
        Ok(self.groups().get(key).cloned())
    }

    async fn remove(&self, key: &str) -> Result<Option<Vec<GroupEntry>>, ProcessError> {
        Ok(self.groups().remove(key))
    }

    async fn group_count(&self) -> Result<usize, ProcessError> {
        Ok(self.groups().len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_core::{Body, Headers};

    fn entry(n: i64) -> GroupEntry {
        GroupEntry {
            body: Body::from_json(json!(n)),
            headers: Headers::new(),
        }
    }

    #[tokio::test]
    async fn groups_keep_arrival_order_and_are_removed_once() {
        let repo = MemoryAggregationRepository::default();
        assert_eq!(repo.append("a", entry(1)).await.unwrap(), 1);
        assert_eq!(repo.append("b", entry(9)).await.unwrap(), 1);
        assert_eq!(repo.append("a", entry(2)).await.unwrap(), 2);
        assert_eq!(repo.group_count().await.unwrap(), 2);
        let a = repo.entries("a").await.unwrap().unwrap();
        assert_eq!(a, [entry(1), entry(2)]);
        assert_eq!(repo.remove("a").await.unwrap().unwrap().len(), 2);
        assert!(repo.remove("a").await.unwrap().is_none());
        assert!(repo.entries("a").await.unwrap().is_none());
        assert_eq!(repo.group_count().await.unwrap(), 1);
    }
}
