//! Persistent aggregation groups, for the aggregator (EIP Aggregator with a persistent
//! repository).
//!
//! A repository (by name) holds open groups; each group has an id chosen by the caller (unique
//! for the group's life: a later group under the same correlation key gets another id, so a
//! completed group can stay stored until its aggregate is delivered while the next one fills),
//! its correlation key, the times of its first and last entries as stored, and its entries in
//! arrival order. Entries are opaque bytes in a checksummed frame ([`crate::codec`]).
//!
//! An [`append`](AggregationGroups::append) returns once the entry is on disk, so the caller
//! may acknowledge the message it came from; [`remove`](AggregationGroups::remove) deletes a
//! group and its entries in one commit. Reading a repository's groups for a reload reads the
//! group index only, never the entries ([`AggregationGroups::groups`]).

use std::sync::Arc;

use bytes::Bytes;
use redb::{ReadableTable, WriteTransaction};

use crate::codec;
use crate::error::StoreError;
use crate::store::Inner;
use crate::tables::{AGGREGATION_ENTRIES, AGGREGATION_GROUPS};
use crate::writer::Room;

/// One stored group, as [`AggregationGroups::groups`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredGroup {
    /// The group's id.
    pub id: String,
    /// The correlation key its entries share.
    pub key: String,
    /// When its first entry was stored (ms since the epoch, the store's clock).
    pub first_at_ms: u64,
    /// When its last entry was stored.
    pub last_at_ms: u64,
    /// How many entries it holds.
    pub size: u64,
}

/// One named repository of aggregation groups; cheap to clone.
#[derive(Clone)]
pub struct AggregationGroups {
    inner: Arc<Inner>,
    name: Arc<str>,
}

impl std::fmt::Debug for AggregationGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregationGroups")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl AggregationGroups {
    pub(crate) fn new(inner: Arc<Inner>, name: &str) -> Self {
        Self {
            inner,
            name: name.into(),
        }
    }

    /// Appends `entry` to group `id` (created with correlation `key` if new) and returns the
    /// group as stored afterwards, once it is on disk. It stores a new payload, so it is refused
    /// with [`StoreError::DiskFull`] while the disk reserve is in use.
    pub async fn append(
        &self,
        id: &str,
        key: &str,
        entry: &[u8],
    ) -> Result<StoredGroup, StoreError> {
        let frame = codec::encode(entry)?;
        let (name, id, key) = (Arc::clone(&self.name), id.to_owned(), key.to_owned());
        let now = self.inner.clock.now_ms();
        self.inner
            .writer
            .run(Room::Grows, 1, move |txn| {
                append(txn, &name, &id, &key, &frame, now)
            })
            .await
    }

    /// The entries of group `id` in arrival order; `None` for a group not stored. An entry whose
    /// frame fails its checksum fails the read with [`StoreError::Corrupt`].
    pub fn entries(&self, id: &str) -> Result<Option<Vec<Bytes>>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let groups = match txn.open_table(AGGREGATION_GROUPS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        if groups.get((&*self.name, id))?.is_none() {
            return Ok(None);
        }
        let entries = txn.open_table(AGGREGATION_ENTRIES)?;
        let mut out = Vec::new();
        for entry in entries.range((&*self.name, id, 0)..=(&*self.name, id, u64::MAX))? {
            let (_, frame) = entry?;
            let payload = codec::decode(frame.value()).map_err(|source| StoreError::Corrupt {
                table: "aggregation_entries",
                source,
            })?;
            out.push(Bytes::copy_from_slice(payload));
        }
        Ok(Some(out))
    }

    /// Deletes group `id` and its entries; whether it was stored. Runs on the disk reserve's
    /// room, as it frees space.
    pub async fn remove(&self, id: &str) -> Result<bool, StoreError> {
        let (name, id) = (Arc::clone(&self.name), id.to_owned());
        self.inner
            .writer
            .run(Room::Drains, 1, move |txn| remove(txn, &name, &id))
            .await
    }

    /// Every group of this repository, by id; reads the group index, not the entries.
    pub fn groups(&self) -> Result<Vec<StoredGroup>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let table = match txn.open_table(AGGREGATION_GROUPS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(error) => return Err(error.into()),
        };
        let mut out = Vec::new();
        for entry in table.range((&*self.name, "")..)? {
            let (ids, group) = entry?;
            let (name, id) = ids.value();
            if name != &*self.name {
                break;
            }
            let (key, first_at_ms, last_at_ms, size) = group.value();
            out.push(StoredGroup {
                id: id.to_owned(),
                key: key.to_owned(),
                first_at_ms,
                last_at_ms,
                size,
            });
        }
        Ok(out)
    }
}

fn append(
    txn: &WriteTransaction,
    name: &str,
    id: &str,
    key: &str,
    frame: &[u8],
    now: u64,
) -> Result<StoredGroup, StoreError> {
    let mut groups = txn.open_table(AGGREGATION_GROUPS)?;
    let stored = groups.get((name, id))?.map(|group| {
        let (key, first, _, size) = group.value();
        (key.to_owned(), first, size)
    });
    let (key, first_at_ms, index) = stored.unwrap_or_else(|| (key.to_owned(), now, 0));
    let size = index.saturating_add(1);
    groups.insert((name, id), (key.as_str(), first_at_ms, now, size))?;
    txn.open_table(AGGREGATION_ENTRIES)?
        .insert((name, id, index), frame)?;
    Ok(StoredGroup {
        id: id.to_owned(),
        key,
        first_at_ms,
        last_at_ms: now,
        size,
    })
}

fn remove(txn: &WriteTransaction, name: &str, id: &str) -> Result<bool, StoreError> {
    let removed = txn
        .open_table(AGGREGATION_GROUPS)?
        .remove((name, id))?
        .is_some();
    if removed {
        txn.open_table(AGGREGATION_ENTRIES)?
            .retain_in((name, id, 0)..=(name, id, u64::MAX), |_, _| false)?;
    }
    Ok(removed)
}
