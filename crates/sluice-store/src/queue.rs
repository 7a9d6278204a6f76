//! Durable queues, one per channel name: append with group commit, lease, ack, nack.
//!
//! A record is stored once, under `(channel, seq)`, framed with a checksum. Sequence numbers
//! start at 1 and only grow. Each channel keeps a **fresh cursor**: records at or after it were
//! never leased, so a lease reads them by a range starting there. A lease of fresh records
//! writes one **lease range** (`first..end` with the time it becomes visible again), not an entry
//! per record, so an ack only deletes the record. A record delivered again, or nacked, gets an
//! in-flight entry of its own (with its delivery count) and an entry in the visibility index
//! keyed by the time it becomes visible again; the range skips it from then on. A lease takes
//! what became visible again first (from both, in visibility order), then fresh records. No
//! operation, and no open, scans the whole queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use redb::{ReadableTable, WriteTransaction};

use crate::codec;
use crate::combine::Combiner;
use crate::dead_letter::{self, Quarantined};
use crate::error::StoreError;
use crate::store::Inner;
use crate::tables::{CHANNELS, DELAYED, IN_FLIGHT, LEASE_RANGES, LEASED, RECORDS, VISIBLE_AT};
use crate::writer::Room;

/// A record handed to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The record's id in its channel, for [`Queue::ack`] and [`Queue::nack`].
    pub id: u64,
    /// The bytes given to [`Queue::append`].
    pub payload: Bytes,
    /// How many times the record was handed out, this time included (1 on first delivery).
    pub deliveries: u32,
}

impl Delivery {
    /// How many times the record was handed out before (0 on first delivery).
    pub fn redeliveries(&self) -> u32 {
        self.deliveries.saturating_sub(1)
    }
}

/// A handle to one channel's queue; cheap to clone.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
    channel: Arc<str>,
    writes: Arc<ChannelWrites>,
}

/// The appends and acks of one channel, combined across callers (see `combine.rs`).
pub(crate) struct ChannelWrites {
    appends: Combiner<Vec<u8>, u64>,
    acks: Combiner<u64, bool>,
}

impl ChannelWrites {
    fn new(channel: &Arc<str>) -> Self {
        let appending = Arc::clone(channel);
        let acking = Arc::clone(channel);
        Self {
            appends: Combiner::new(Room::Grows, move |txn, frames: &[Vec<u8>]| {
                append(txn, &appending, frames)
            }),
            acks: Combiner::new(Room::Drains, move |txn, ids: &[u64]| ack(txn, &acking, ids)),
        }
    }
}

/// Every channel's [`ChannelWrites`], created on first use and kept while the store is open
/// (one small entry per channel name).
#[derive(Default)]
pub(crate) struct ChannelRegistry(Mutex<HashMap<Arc<str>, Arc<ChannelWrites>>>);

impl ChannelRegistry {
    fn get(&self, channel: &str) -> (Arc<str>, Arc<ChannelWrites>) {
        let mut channels = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((name, writes)) = channels.get_key_value(channel) {
            return (Arc::clone(name), Arc::clone(writes));
        }
        let name: Arc<str> = channel.into();
        let writes = Arc::new(ChannelWrites::new(&name));
        channels.insert(Arc::clone(&name), Arc::clone(&writes));
        (name, writes)
    }
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl Queue {
    pub(crate) fn new(inner: Arc<Inner>, channel: &str) -> Self {
        let (channel, writes) = inner.channels.get(channel);
        Self {
            inner,
            channel,
            writes,
        }
    }

    /// The channel name.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Stores `payloads` and returns their ids, in order, once they are durable. Appends of
    /// concurrent callers share one commit (see [`GroupCommit`](crate::GroupCommit)), and
    /// those to one channel one write to it.
    pub async fn append(&self, payloads: Vec<Bytes>) -> Result<Vec<u64>, StoreError> {
        // Framing happens on the caller's task, so the writer thread only writes.
        let frames = payloads
            .iter()
            .map(|payload| codec::encode(payload))
            .collect::<Result<Vec<_>, _>>()?;
        self.writes.appends.run(&self.inner.writer, frames).await
    }

    /// Hands out up to `max` visible records and hides them for `visibility_timeout`. Records
    /// whose lease expired or whose nack delay passed come first (by the time they became
    /// visible, then id), then records never delivered, in id order. A record that fails its
    /// checksum is moved to the dead letters and skipped.
    pub async fn lease(
        &self,
        max: usize,
        visibility_timeout: Duration,
    ) -> Result<Vec<Delivery>, StoreError> {
        let channel = Arc::clone(&self.channel);
        let now = self.inner.clock.now_ms();
        let until = now.saturating_add(crate::clock::millis(visibility_timeout));
        self.inner
            .writer
            .run(Room::Drains, 1, move |txn| {
                lease(txn, &channel, max, now, until)
            })
            .await
    }

    /// Removes acknowledged records; returns how many were stored. Unknown ids are ignored, so
    /// acking twice is harmless. Acks of concurrent callers to one channel are combined like
    /// appends.
    pub async fn ack(&self, ids: Vec<u64>) -> Result<usize, StoreError> {
        let removed = self.writes.acks.run(&self.inner.writer, ids).await?;
        Ok(removed.into_iter().filter(|&removed| removed).count())
    }

    /// Gives a leased record back, visible again after `delay` (also across a restart). Returns
    /// false when the record is not in flight (acked, unknown, or never leased).
    pub async fn nack(&self, id: u64, delay: Duration) -> Result<bool, StoreError> {
        let channel = Arc::clone(&self.channel);
        let visible_at = self
            .inner
            .clock
            .now_ms()
            .saturating_add(crate::clock::millis(delay));
        self.inner
            .writer
            .run(Room::Drains, 1, move |txn| {
                nack(txn, &channel, id, visible_at)
            })
            .await
    }
}

fn append(
    txn: &WriteTransaction,
    channel: &str,
    frames: &[Vec<u8>],
) -> Result<Vec<u64>, StoreError> {
    let mut channels = txn.open_table(CHANNELS)?;
    let (mut next, cursor) = channels.get(channel)?.map_or((1, 1), |state| state.value());
    let mut records = txn.open_table(RECORDS)?;
    let mut ids = Vec::with_capacity(frames.len());
    for frame in frames {
        records.insert((channel, next), frame.as_slice())?;
        ids.push(next);
        next += 1;
    }
    channels.insert(channel, (next, cursor))?;
    Ok(ids)
}

fn lease(
    txn: &WriteTransaction,
    channel: &str,
    max: usize,
    now: u64,
    until: u64,
) -> Result<Vec<Delivery>, StoreError> {
    let mut out = Vec::with_capacity(max.min(1024));
    let mut records = txn.open_table(RECORDS)?;
    let mut in_flight = txn.open_table(IN_FLIGHT)?;
    let mut visible_at = txn.open_table(VISIBLE_AT)?;
    let mut ranges = txn.open_table(LEASE_RANGES)?;
    let mut quarantined = Vec::new();

    // Redeliveries: records visible again, from in-flight entries and from lease ranges, in the
    // order they became visible (then id), at most `max` of them.
    let tracked: Vec<(u64, u64)> = visible_at
        .range((channel, 0, 0)..=(channel, now, u64::MAX))?
        .take(max)
        .map(|entry| entry.map(|(key, _)| (key.value().1, key.value().2)))
        .collect::<Result<_, _>>()?;
    let ranged = due_in_ranges(&records, &in_flight, &mut ranges, channel, now, max)?;
    let mut due: Vec<(u64, u64, Option<u64>)> = tracked
        .into_iter()
        .map(|(at, seq)| (at, seq, None))
        .chain(ranged)
        .collect();
    due.sort_unstable();
    due.truncate(max);
    // What each range gave: its key and the last record taken from it.
    let mut taken_from: Vec<((u64, u64), u64)> = Vec::new();
    for (at, seq, range) in due {
        let deliveries = match range {
            // Delivered once, with the range's lease.
            Some(first) => {
                match taken_from.iter_mut().find(|(key, _)| *key == (at, first)) {
                    Some((_, last)) => *last = (*last).max(seq),
                    None => taken_from.push(((at, first), seq)),
                }
                1
            }
            None => {
                visible_at.remove((channel, at, seq))?;
                in_flight
                    .remove((channel, seq))?
                    .map_or(0, |state| state.value().1)
            }
        };
        let Some(read) = records
            .get((channel, seq))?
            .map(|frame| read_frame(frame.value()))
        else {
            continue;
        };
        match read {
            Ok(payload) => {
                let deliveries = deliveries.saturating_add(1);
                in_flight.insert((channel, seq), (until, deliveries, LEASED))?;
                visible_at.insert((channel, until, seq), ())?;
                out.push(Delivery {
                    id: seq,
                    payload,
                    deliveries,
                });
            }
            Err((frame, error)) => {
                records.remove((channel, seq))?;
                quarantined.push(Quarantined::new(
                    channel, seq, frame, &error, deliveries, now,
                ));
            }
        }
    }
    // A range keeps the records after the last one taken (there may be none).
    for ((at, first), last) in taken_from {
        let end = ranges.remove((channel, at, first))?.map(|end| end.value());
        if let Some(end) = end
            && last + 1 < end
        {
            ranges.insert((channel, at, last + 1), end)?;
        }
    }

    // Fresh records, from the cursor on: one lease range for all of them.
    let mut channels = txn.open_table(CHANNELS)?;
    let Some((next, mut cursor)) = channels.get(channel)?.map(|state| state.value()) else {
        drop((records, in_flight, visible_at, ranges, channels));
        dead_letter::quarantine_all(txn, quarantined)?;
        return Ok(out);
    };
    let first_fresh = cursor;
    while out.len() < max && cursor < next {
        let wanted = max - out.len();
        let fresh: Vec<(u64, ReadFrame)> = records
            .range((channel, cursor)..(channel, next))?
            .take(wanted)
            .map(|entry| entry.map(|(key, frame)| (key.value().1, read_frame(frame.value()))))
            .collect::<Result<_, _>>()?;
        let Some(&(last, _)) = fresh.last() else {
            cursor = next;
            break;
        };
        cursor = last + 1;
        for (seq, read) in fresh {
            match read {
                Ok(payload) => out.push(Delivery {
                    id: seq,
                    payload,
                    deliveries: 1,
                }),
                Err((frame, error)) => {
                    records.remove((channel, seq))?;
                    quarantined.push(Quarantined::new(channel, seq, frame, &error, 0, now));
                }
            }
        }
    }
    if cursor > first_fresh {
        ranges.insert((channel, until, first_fresh), cursor)?;
    }
    channels.insert(channel, (next, cursor))?;
    drop((records, in_flight, visible_at, ranges, channels));
    dead_letter::quarantine_all(txn, quarantined)?;
    Ok(out)
}

/// A stored frame's payload, copied once out of the page; or the frame as found and why it is
/// corrupt.
type ReadFrame = Result<Bytes, (Vec<u8>, codec::DecodeError)>;

fn read_frame(frame: &[u8]) -> ReadFrame {
    codec::decode(frame)
        .map(Bytes::copy_from_slice)
        .map_err(|error| (frame.to_vec(), error))
}

/// The records of lease ranges visible again by `now` that have no in-flight entry of their
/// own, as `(visible_at, seq, Some(range's first seq))`, at most `max`. A due range with no such
/// record left (all acked or tracked alone) is deleted on the way.
fn due_in_ranges(
    records: &redb::Table<(&str, u64), &[u8]>,
    in_flight: &redb::Table<(&str, u64), (u64, u32, u8)>,
    ranges: &mut redb::Table<(&str, u64, u64), u64>,
    channel: &str,
    now: u64,
    max: usize,
) -> Result<Vec<(u64, u64, Option<u64>)>, StoreError> {
    let mut found = Vec::new();
    let mut empty = Vec::new();
    for entry in ranges.range((channel, 0, 0)..=(channel, now, u64::MAX))? {
        if found.len() >= max {
            break;
        }
        let (key, end) = entry?;
        let (_, at, first) = key.value();
        let before = found.len();
        let mut complete = true;
        for record in records.range((channel, first)..(channel, end.value()))? {
            let seq = record?.0.value().1;
            if in_flight.get((channel, seq))?.is_none() {
                if found.len() >= max {
                    complete = false;
                    break;
                }
                found.push((at, seq, Some(first)));
            }
        }
        if complete && found.len() == before {
            empty.push((at, first));
        }
    }
    for (at, first) in empty {
        ranges.remove((channel, at, first))?;
    }
    Ok(found)
}

/// Deletes each record and its lease; says for each id whether a record was stored under it
/// (false for an id acked twice in one call).
fn ack(txn: &WriteTransaction, channel: &str, ids: &[u64]) -> Result<Vec<bool>, StoreError> {
    let mut records = txn.open_table(RECORDS)?;
    let mut in_flight = txn.open_table(IN_FLIGHT)?;
    let mut visible_at = txn.open_table(VISIBLE_AT)?;
    let mut removed = Vec::with_capacity(ids.len());
    for &seq in ids {
        removed.push(records.remove((channel, seq))?.is_some());
        if let Some(state) = in_flight.remove((channel, seq))? {
            visible_at.remove((channel, state.value().0, seq))?;
        }
    }
    Ok(removed)
}

fn nack(txn: &WriteTransaction, channel: &str, seq: u64, until: u64) -> Result<bool, StoreError> {
    let mut in_flight = txn.open_table(IN_FLIGHT)?;
    let mut visible_at = txn.open_table(VISIBLE_AT)?;
    let deliveries = match in_flight.get((channel, seq))?.map(|state| state.value()) {
        Some((at, deliveries, _)) => {
            visible_at.remove((channel, at, seq))?;
            deliveries
        }
        // Stored and before the cursor: leased once, in a lease range, which skips it from now
        // on because of the entry made here.
        None if leased_once(txn, channel, seq)? => 1,
        None => return Ok(false),
    };
    in_flight.insert((channel, seq), (until, deliveries, DELAYED))?;
    visible_at.insert((channel, until, seq), ())?;
    Ok(true)
}

/// Whether record `seq` is stored and was leased (it lies before the fresh cursor).
fn leased_once(txn: &WriteTransaction, channel: &str, seq: u64) -> Result<bool, StoreError> {
    let cursor = txn
        .open_table(CHANNELS)?
        .get(channel)?
        .map_or(1, |state| state.value().1);
    Ok(seq < cursor && txn.open_table(RECORDS)?.get((channel, seq))?.is_some())
}

/// Makes every lease of every channel visible at once: run at open, because the consumers that
/// held them are gone. Reads only the in-flight entries and lease ranges, never the records.
pub(crate) fn release_leases(txn: &WriteTransaction) -> Result<usize, StoreError> {
    let mut in_flight = txn.open_table(IN_FLIGHT)?;
    let mut visible_at = txn.open_table(VISIBLE_AT)?;
    let mut read = 0;
    let mut leased = Vec::new();
    for entry in in_flight.iter()? {
        let (key, state) = entry?;
        read += 1;
        let (channel, seq) = key.value();
        let (at, deliveries, kind) = state.value();
        if kind == LEASED {
            leased.push((channel.to_owned(), seq, at, deliveries));
        }
    }
    for (channel, seq, at, deliveries) in leased {
        visible_at.remove((channel.as_str(), at, seq))?;
        // Visible since the epoch: first in line, in id order.
        in_flight.insert((channel.as_str(), seq), (0, deliveries, DELAYED))?;
        visible_at.insert((channel.as_str(), 0, seq), ())?;
    }
    let mut ranges = txn.open_table(LEASE_RANGES)?;
    let mut leased_ranges = Vec::new();
    for entry in ranges.iter()? {
        let (key, end) = entry?;
        read += 1;
        let (channel, at, first) = key.value();
        if at > 0 {
            leased_ranges.push((channel.to_owned(), at, first, end.value()));
        }
    }
    for (channel, at, first, end) in leased_ranges {
        ranges.remove((channel.as_str(), at, first))?;
        ranges.insert((channel.as_str(), 0, first), end)?;
    }
    Ok(read)
}

/// Test hook: overwrites a stored record's bytes, as a failing disk would.
#[cfg(test)]
pub(crate) async fn corrupt(queue: &Queue, seq: u64, bytes: Vec<u8>) -> Result<bool, StoreError> {
    let channel = Arc::clone(&queue.channel);
    queue
        .inner
        .writer
        .run(Room::Drains, 1, move |txn| {
            let mut records = txn.open_table(RECORDS)?;
            let found = records.get((&*channel, seq))?.is_some();
            if found {
                records.insert((&*channel, seq), bytes.as_slice())?;
            }
            Ok(found)
        })
        .await
}

/// Test hook: callers waiting for their appends to be taken by a request.
#[cfg(test)]
pub(crate) fn appends_waiting(queue: &Queue) -> usize {
    queue.writes.appends.waiting()
}

/// Test hook: callers waiting for their acks to be taken by a request.
#[cfg(test)]
pub(crate) fn acks_waiting(queue: &Queue) -> usize {
    queue.writes.acks.waiting()
}

/// Test hook: the ids stored for the queue's channel, read directly.
#[cfg(test)]
pub(crate) fn stored_ids(queue: &Queue) -> Result<Vec<u64>, StoreError> {
    let txn = queue.inner.db.begin_read()?;
    let records = txn.open_table(RECORDS)?;
    let channel = &*queue.channel;
    records
        .range((channel, 0)..=(channel, u64::MAX))?
        .map(|entry| Ok(entry?.0.value().1))
        .collect()
}
