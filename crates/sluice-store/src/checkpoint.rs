//! Checkpoints: small values a source keeps across restarts (a polling source's watermark), by
//! key. The bytes-only twin of `sluice_core::state::CheckpointStore`; the engine adapts it.

use std::sync::Arc;

use crate::error::StoreError;
use crate::store::Inner;
use crate::tables::CHECKPOINTS;
use crate::writer::Room;

/// The checkpoints of the store; cheap to clone.
#[derive(Clone)]
pub struct Checkpoints {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Checkpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoints").finish_non_exhaustive()
    }
}

impl Checkpoints {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self { inner }
    }

    /// The value under `key`, if one was put. A short blocking read.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let table = match txn.open_table(CHECKPOINTS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        Ok(table.get(key)?.map(|value| value.value().to_vec()))
    }

    /// Replaces the value under `key`; returns once it is committed to disk.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.inner
            .writer
            // A small fixed-size entry: it may use the reserve's room, like an ack.
            .run(Room::Drains, 1, move |txn| {
                txn.open_table(CHECKPOINTS)?
                    .insert(key.as_str(), value.as_slice())?;
                Ok(())
            })
            .await
    }
}
