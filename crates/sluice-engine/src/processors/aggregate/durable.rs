//! The aggregator's groups in the runtime's own store (`backend: {store: {}}`): each message is
//! acknowledged once it is durably in its group, and groups are reloaded after a restart.
//!
//! Each group is stored under an id of its own (a UUID v7, so ids sort by age), not under its
//! correlation key: a completed group stays stored until its aggregate is settled (acked by
//! every target, or its failure handled), while the next group under the same key fills up.

use sluice_core::{AckToken, ErrorKind, Message, Outcome, ProcessError};
use sluice_store::{AggregationGroups, StoreError, StoredGroup};

use crate::envelope;

/// One step's groups in the store.
pub(super) struct StoredGroups {
    groups: AggregationGroups,
}

fn unavailable(error: &StoreError) -> ProcessError {
    ProcessError::new(
        ErrorKind::Unavailable,
        format!("the durable store cannot keep the aggregation group: {error}"),
    )
}

impl StoredGroups {
    pub(super) fn new(groups: AggregationGroups) -> Self {
        StoredGroups { groups }
    }

    /// A new group id, unique and ordered by creation.
    pub(super) fn new_id() -> String {
        uuid::Uuid::now_v7().to_string()
    }

    /// Stores `msg` at the end of group `id` (correlation `key`); returns the group's size once
    /// the entry is on disk.
    pub(super) async fn append(
        &self,
        id: &str,
        key: &str,
        msg: &Message,
    ) -> Result<usize, ProcessError> {
        let stored = self
            .groups
            .append(id, key, &envelope::encode(msg))
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(usize::try_from(stored.size).unwrap_or(usize::MAX))
    }

    /// The messages of group `id`, oldest first.
    pub(super) fn messages(&self, id: &str) -> Result<Option<Vec<Message>>, ProcessError> {
        let Some(entries) = self.groups.entries(id).map_err(|e| unavailable(&e))? else {
            return Ok(None);
        };
        entries
            .iter()
            .map(|bytes| {
                envelope::decode(bytes).map_err(|e| {
                    ProcessError::new(
                        ErrorKind::Internal,
                        format!("a stored entry of aggregation group {id} cannot be read: {e}"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Every stored group of the step, oldest first.
    pub(super) fn list(&self) -> Result<Vec<StoredGroup>, ProcessError> {
        self.groups.groups().map_err(|e| unavailable(&e))
    }

    /// The acknowledgement put on a completed group's aggregate (or failure): once it is acked,
    /// the group is deleted; a nack keeps it stored, and it completes again after the next
    /// start (at-least-once: its inputs were acknowledged long ago).
    pub(super) fn settle_token(&self, id: &str) -> AckToken {
        let (groups, id) = (self.groups.clone(), id.to_owned());
        let runtime = tokio::runtime::Handle::try_current().ok();
        AckToken::with_callback(move |outcome| match outcome {
            Outcome::Ack => {
                let remove = async move {
                    if let Err(error) = groups.remove(&id).await {
                        tracing::warn!(group = %id, %error, "a delivered aggregation group could not be deleted; it is emitted again after the next start");
                    }
                };
                match runtime {
                    Some(runtime) => {
                        runtime.spawn(remove);
                    }
                    None => tracing::warn!(
                        "no runtime to delete a delivered aggregation group on; it is emitted again after the next start"
                    ),
                }
            }
            Outcome::Nack(reason) => tracing::warn!(
                group = %id,
                reason = %reason,
                "an aggregate was not delivered; its group stays stored and completes again after the next start"
            ),
        })
    }
}
