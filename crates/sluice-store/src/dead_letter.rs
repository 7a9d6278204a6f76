//! The dead-letter store: messages that exhausted their retries, and records quarantined because
//! their bytes no longer match their checksum.
//!
//! An entry keeps the original bytes and headers exactly as the engine handed them over (the
//! store does not know the engine's message type), plus what failed, where, and when. Ids grow
//! from 1. Replay is made idempotent by recording each replay id: the engine asks
//! [`DeadLetters::mark_replayed`] (or [`DeadLetters::replay_into`], which also appends to a
//! durable queue in the same commit) before delivering, and delivers only on
//! [`ReplayMark::First`].
//!
//! Stored value: a checksummed frame whose payload is
//! `u32 meta length | meta JSON | u32 headers length | headers | body`.

use std::sync::Arc;

use bytes::Bytes;
use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::codec::{self, DecodeError};
use crate::error::StoreError;
use crate::store::Inner;
use crate::tables::{CHANNELS, COUNTERS, DEAD_LETTERS, RECORDS, REPLAYS};
use crate::writer::Room;

const NEXT_ID: &str = "dead_letter_next_id";

/// A failed message to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeadLetter {
    /// The flow the message failed in.
    pub flow: String,
    /// The flow's version (a content hash or a revision), to tell replays into a changed flow.
    pub flow_version: String,
    /// The step that failed.
    pub step: String,
    /// The last error.
    pub error: String,
    /// How many times processing was attempted.
    pub attempts: u32,
    /// When the first attempt failed, ms since the Unix epoch.
    pub first_failure_ms: u64,
    /// When the last attempt failed, ms since the Unix epoch.
    pub last_failure_ms: u64,
    /// The message headers, encoded by the engine (JSON by convention).
    pub headers: Bytes,
    /// The original body bytes.
    pub body: Bytes,
}

/// A stored dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The entry's id.
    pub id: u64,
    /// What was stored.
    pub letter: NewDeadLetter,
    /// Replays done so far, oldest first.
    pub replays: Vec<Replay>,
}

/// One replay of a dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replay {
    /// The caller's id for the replay (the same id twice means the same replay).
    pub replay_id: String,
    /// When it was recorded, ms since the Unix epoch.
    pub at_ms: u64,
}

/// What [`DeadLetters::mark_replayed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayMark {
    /// First time this replay id is seen: deliver.
    First,
    /// This replay id was recorded before (for the dead letter with this id): do not deliver again.
    AlreadyReplayed {
        /// The dead letter the replay id belongs to.
        dead_letter: u64,
    },
    /// No dead letter with that id.
    NotFound,
}

/// Which dead letters [`DeadLetters::list`] returns. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this flow.
    pub flow: Option<String>,
    /// Only entries whose last failure is at or after this time (ms since the Unix epoch).
    pub since_ms: Option<u64>,
    /// Only entries whose error contains this text.
    pub error_contains: Option<String>,
    /// Only ids greater than this (paging: pass the last id of the previous page).
    pub after_id: Option<u64>,
    /// At most this many entries (0: no limit).
    pub limit: usize,
}

impl Filter {
    fn matches(&self, letter: &NewDeadLetter) -> bool {
        self.flow.as_ref().is_none_or(|flow| *flow == letter.flow)
            && self
                .since_ms
                .is_none_or(|since| letter.last_failure_ms >= since)
            && self
                .error_contains
                .as_ref()
                .is_none_or(|text| letter.error.contains(text.as_str()))
    }
}

/// One page of [`DeadLetters::list`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// The matching entries, by id.
    pub letters: Vec<DeadLetter>,
    /// Ids of entries that could not be decoded (shown so they can be deleted, never hidden).
    pub corrupt: Vec<u64>,
}

/// What [`DeadLetters::replay_into`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// Appended to the queue under this id.
    Appended(u64),
    /// The replay id was used before; nothing appended.
    AlreadyReplayed {
        /// The dead letter the replay id belongs to.
        dead_letter: u64,
    },
    /// No dead letter with that id.
    NotFound,
}

/// A handle to the dead-letter store; cheap to clone.
#[derive(Clone)]
pub struct DeadLetters {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters").finish_non_exhaustive()
    }
}

impl DeadLetters {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self { inner }
    }

    /// Stores a dead letter durably and returns its id.
    pub async fn put(&self, letter: NewDeadLetter) -> Result<u64, StoreError> {
        let frame = encode(&letter, &[])?;
        self.inner
            .writer
            .run(Room::Grows, 1, move |txn| insert(txn, &frame))
            .await
    }

    /// The entry with this id. Blocking read: call from a blocking context in async code.
    pub fn get(&self, id: u64) -> Result<Option<DeadLetter>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let table = match txn.open_table(DEAD_LETTERS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let Some(frame) = table.get(id)? else {
            return Ok(None);
        };
        decode(id, frame.value())
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                table: "dead_letters",
                source,
            })
    }

    /// The entries matching `filter`, by id. Reads entries one by one from `after_id`: the
    /// dead-letter store is for people, not a hot path. Blocking read.
    pub fn list(&self, filter: &Filter) -> Result<Page, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let table = match txn.open_table(DEAD_LETTERS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Page::default()),
            Err(error) => return Err(error.into()),
        };
        let start = filter.after_id.map_or(0, |after| after.saturating_add(1));
        let mut page = Page::default();
        for entry in table.range(start..)? {
            let (id, frame) = entry?;
            match decode(id.value(), frame.value()) {
                Ok(letter) if filter.matches(&letter.letter) => page.letters.push(letter),
                Ok(_) => {}
                Err(_) => page.corrupt.push(id.value()),
            }
            if filter.limit > 0 && page.letters.len() >= filter.limit {
                break;
            }
        }
        Ok(page)
    }

    /// Deletes entries; returns how many existed.
    pub async fn delete(&self, ids: Vec<u64>) -> Result<usize, StoreError> {
        self.inner
            .writer
            .run(Room::Drains, ids.len().max(1), move |txn| {
                let mut table = txn.open_table(DEAD_LETTERS)?;
                let mut deleted = 0;
                for id in ids {
                    if table.remove(id)?.is_some() {
                        deleted += 1;
                    }
                }
                Ok(deleted)
            })
            .await
    }

    /// Records that dead letter `id` is being replayed under `replay_id`. Deliver only on
    /// [`ReplayMark::First`]: the same replay id again returns
    /// [`ReplayMark::AlreadyReplayed`], so a retried replay command never delivers twice.
    pub async fn mark_replayed(&self, id: u64, replay_id: &str) -> Result<ReplayMark, StoreError> {
        let replay_id = replay_id.to_owned();
        let now = self.inner.clock.now_ms();
        self.inner
            .writer
            .run(Room::Drains, 1, move |txn| mark(txn, id, &replay_id, now))
            .await
    }

    /// Replays dead letter `id` into the durable queue `channel`: records the replay and appends
    /// `payload` (the engine's encoding of the stored message) in one commit, so a crash never
    /// leaves one without the other, and the same `replay_id` never appends twice.
    pub async fn replay_into(
        &self,
        id: u64,
        replay_id: &str,
        channel: &str,
        payload: &[u8],
    ) -> Result<ReplayOutcome, StoreError> {
        let replay_id = replay_id.to_owned();
        let channel = channel.to_owned();
        let frame = codec::encode(payload)?;
        let now = self.inner.clock.now_ms();
        self.inner
            .writer
            .run(Room::Grows, 1, move |txn| {
                match mark(txn, id, &replay_id, now)? {
                    ReplayMark::First => {
                        let mut channels = txn.open_table(CHANNELS)?;
                        let (next, cursor) = channels
                            .get(channel.as_str())?
                            .map_or((1, 1), |state| state.value());
                        txn.open_table(RECORDS)?
                            .insert((channel.as_str(), next), frame.as_slice())?;
                        channels.insert(channel.as_str(), (next + 1, cursor))?;
                        Ok(ReplayOutcome::Appended(next))
                    }
                    ReplayMark::AlreadyReplayed { dead_letter } => {
                        Ok(ReplayOutcome::AlreadyReplayed { dead_letter })
                    }
                    ReplayMark::NotFound => Ok(ReplayOutcome::NotFound),
                }
            })
            .await
    }
}

fn insert(txn: &WriteTransaction, frame: &[u8]) -> Result<u64, StoreError> {
    let mut counters = txn.open_table(COUNTERS)?;
    let id = counters.get(NEXT_ID)?.map_or(1, |next| next.value());
    counters.insert(NEXT_ID, id + 1)?;
    txn.open_table(DEAD_LETTERS)?.insert(id, frame)?;
    Ok(id)
}

fn mark(
    txn: &WriteTransaction,
    id: u64,
    replay_id: &str,
    now: u64,
) -> Result<ReplayMark, StoreError> {
    let mut replays = txn.open_table(REPLAYS)?;
    if let Some(dead_letter) = replays.get(replay_id)?.map(|id| id.value()) {
        return Ok(ReplayMark::AlreadyReplayed { dead_letter });
    }
    let mut table = txn.open_table(DEAD_LETTERS)?;
    let Some(frame) = table.get(id)?.map(|frame| frame.value().to_vec()) else {
        return Ok(ReplayMark::NotFound);
    };
    let mut letter = decode(id, &frame).map_err(|source| StoreError::Corrupt {
        table: "dead_letters",
        source,
    })?;
    letter.replays.push(Replay {
        replay_id: replay_id.to_owned(),
        at_ms: now,
    });
    table.insert(id, encode(&letter.letter, &letter.replays)?.as_slice())?;
    replays.insert(replay_id, id)?;
    Ok(ReplayMark::First)
}

/// A queue record whose frame failed to decode, on its way to the dead letters.
#[derive(Debug)]
pub(crate) struct Quarantined {
    letter: NewDeadLetter,
}

impl Quarantined {
    pub(crate) fn new(
        channel: &str,
        seq: u64,
        raw: Vec<u8>,
        error: &DecodeError,
        deliveries: u32,
        now: u64,
    ) -> Self {
        Self {
            letter: NewDeadLetter {
                flow: String::new(),
                flow_version: String::new(),
                step: format!("durable channel {channel}"),
                error: format!("quarantined record {seq} of channel {channel}: {error}"),
                attempts: deliveries,
                first_failure_ms: now,
                last_failure_ms: now,
                headers: Bytes::new(),
                body: Bytes::from(raw),
            },
        }
    }
}

/// Stores quarantined records as dead letters, in the caller's transaction.
pub(crate) fn quarantine_all(
    txn: &WriteTransaction,
    records: Vec<Quarantined>,
) -> Result<(), StoreError> {
    for record in records {
        insert(txn, &encode(&record.letter, &[])?)?;
    }
    Ok(())
}

#[derive(Serialize, Deserialize)]
struct Meta {
    flow: String,
    flow_version: String,
    step: String,
    error: String,
    attempts: u32,
    first_failure_ms: u64,
    last_failure_ms: u64,
    #[serde(default)]
    replays: Vec<Replay>,
}

fn encode(letter: &NewDeadLetter, replays: &[Replay]) -> Result<Vec<u8>, StoreError> {
    let meta = Meta {
        flow: letter.flow.clone(),
        flow_version: letter.flow_version.clone(),
        step: letter.step.clone(),
        error: letter.error.clone(),
        attempts: letter.attempts,
        first_failure_ms: letter.first_failure_ms,
        last_failure_ms: letter.last_failure_ms,
        replays: replays.to_vec(),
    };
    // Serializing plain strings and numbers to JSON cannot fail.
    let meta = serde_json::to_vec(&meta).unwrap_or_default();
    let mut payload = Vec::with_capacity(8 + meta.len() + letter.headers.len() + letter.body.len());
    for part in [&meta[..], &letter.headers[..]] {
        let len = u32::try_from(part.len()).map_err(|_| codec::PayloadTooLarge(part.len()))?;
        payload.extend_from_slice(&len.to_le_bytes());
        payload.extend_from_slice(part);
    }
    payload.extend_from_slice(&letter.body);
    Ok(codec::encode(&payload)?)
}

fn decode(id: u64, frame: &[u8]) -> Result<DeadLetter, DecodeError> {
    let payload = codec::decode(frame)?;
    let (meta, rest) = split_part(payload)?;
    let (headers, body) = split_part(rest)?;
    let meta: Meta =
        serde_json::from_slice(meta).map_err(|error| DecodeError::Malformed(error.to_string()))?;
    Ok(DeadLetter {
        id,
        letter: NewDeadLetter {
            flow: meta.flow,
            flow_version: meta.flow_version,
            step: meta.step,
            error: meta.error,
            attempts: meta.attempts,
            first_failure_ms: meta.first_failure_ms,
            last_failure_ms: meta.last_failure_ms,
            headers: Bytes::copy_from_slice(headers),
            body: Bytes::copy_from_slice(body),
        },
        replays: meta.replays,
    })
}

fn split_part(bytes: &[u8]) -> Result<(&[u8], &[u8]), DecodeError> {
    let truncated = || DecodeError::Truncated {
        needed: 4,
        available: bytes.len(),
    };
    let (len, rest) = bytes.split_first_chunk::<4>().ok_or_else(truncated)?;
    let len = u32::from_le_bytes(*len) as usize;
    if rest.len() < len {
        return Err(DecodeError::Truncated {
            needed: 4 + len,
            available: bytes.len(),
        });
    }
    Ok(rest.split_at(len))
}
