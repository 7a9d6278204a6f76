//! Which offset of a partition may be committed: the highest one below which every message was
//! acknowledged. Pure bookkeeping, no Kafka types, so it is unit-tested alone.
//!
//! **Architecture Invariant:** the committable offset never passes a message that is in flight
//! or was nacked: a message acknowledged out of order waits for every earlier one.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::oneshot;

/// One assigned partition: its in-flight offsets and the turn of its next message.
#[derive(Debug)]
pub struct PartitionTrack {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
    /// Set when the partition is revoked: its late acknowledgements no longer store offsets (the
    /// partition may belong to another consumer already, which starts from the last commit).
    revoked: AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Offsets handed to the flow and not yet settled; `true` once acknowledged.
    pending: BTreeMap<i64, bool>,
    /// The next offset to consume as far as commits go: one past the last contiguous ack.
    committable: Option<i64>,
    /// Resolved when the partition's latest message is settled (per-partition ordering).
    tail: Option<oneshot::Receiver<()>>,
}

impl PartitionTrack {
    /// A freshly assigned partition.
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        PartitionTrack {
            topic: topic.into(),
            partition,
            revoked: AtomicBool::new(false),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(guard) => guard,
            // Every update is a few map operations that cannot panic halfway.
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The same partition assigned again to this member: its first message waits for `turn`,
    /// the settlement of the last message handed out under the previous assignment, so a
    /// member never processes two messages of one partition side by side across a rebalance.
    pub fn after(
        topic: impl Into<String>,
        partition: i32,
        turn: Option<oneshot::Receiver<()>>,
    ) -> Self {
        let track = PartitionTrack::new(topic, partition);
        track.lock().tail = turn;
        track
    }

    /// The partition was revoked: nothing more is stored for it. Returns the turn of the
    /// message after its last one, for [`PartitionTrack::after`] should it come back.
    pub fn revoke(&self) -> Option<oneshot::Receiver<()>> {
        self.revoked.store(true, Ordering::SeqCst);
        self.lock().tail.take()
    }

    /// Whether [`PartitionTrack::revoke`] was called.
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }

    /// Records that `offset` was handed to the flow, and returns the turn to wait for before
    /// processing it (the previous message's settlement) plus the sender that gives the next
    /// message its turn once this one is settled.
    pub fn begin(&self, offset: i64) -> (Option<oneshot::Receiver<()>>, oneshot::Sender<()>) {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        inner.pending.insert(offset, false);
        let previous = inner.tail.replace(rx);
        (previous, tx)
    }

    /// Records that `offset` was acknowledged; returns the new committable offset (one past the
    /// highest offset below which everything is acknowledged) when it moved forward and the
    /// partition is still assigned.
    pub fn ack(&self, offset: i64) -> Option<i64> {
        let mut inner = self.lock();
        if let Some(done) = inner.pending.get_mut(&offset) {
            *done = true;
        }
        let mut advanced = None;
        while let Some(entry) = inner.pending.first_entry() {
            if !*entry.get() {
                break;
            }
            let (acked, _) = entry.remove_entry();
            advanced = Some(acked + 1);
        }
        if let Some(next) = advanced {
            inner.committable = Some(next);
        }
        advanced.filter(|_| !self.is_revoked())
    }

    /// The committable offset, if anything was acknowledged since the assignment.
    pub fn committable(&self) -> Option<i64> {
        self.lock().committable
    }

    /// Offsets in flight (handed out, not yet acknowledged).
    pub fn in_flight(&self) -> usize {
        self.lock().pending.values().filter(|done| !**done).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_the_contiguous_acknowledged_prefix() {
        let t = PartitionTrack::new("t", 0);
        for offset in 10..15 {
            let _ = t.begin(offset);
        }
        // Out of order: 11 and 12 done, 10 still in flight: nothing may be committed.
        assert_eq!(t.ack(11), None);
        assert_eq!(t.ack(12), None);
        assert_eq!(t.committable(), None);
        // 10 done: everything up to 12 is, commit 13 (the next offset to read).
        assert_eq!(t.ack(10), Some(13));
        assert_eq!(t.in_flight(), 2);
        assert_eq!(t.ack(14), None);
        assert_eq!(t.ack(13), Some(15));
        assert_eq!(t.committable(), Some(15));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn a_revoked_partition_stores_nothing() {
        let t = PartitionTrack::new("t", 1);
        let _ = t.begin(0);
        let _ = t.revoke();
        assert_eq!(t.ack(0), None);
    }

    #[tokio::test]
    async fn a_partition_assigned_again_waits_for_the_previous_assignment() {
        let old = PartitionTrack::new("t", 0);
        let (_, old_done) = old.begin(7);
        let again = PartitionTrack::after("t", 0, old.revoke());
        // Delivered again from the last commit while offset 7 of the old assignment still runs.
        let (turn, _) = again.begin(5);
        let mut turn = turn.expect("waits for the old assignment");
        assert!(turn.try_recv().is_err(), "turn given too early");
        old_done.send(()).unwrap();
        assert!(turn.await.is_ok());
        // Nothing was in flight: no wait.
        let idle = PartitionTrack::new("t", 1);
        let fresh = PartitionTrack::after("t", 1, idle.revoke());
        assert!(fresh.begin(0).0.is_none());
    }

    #[tokio::test]
    async fn each_message_waits_for_the_previous_one_of_its_partition() {
        let t = PartitionTrack::new("t", 0);
        let (first_turn, first_done) = t.begin(0);
        assert!(first_turn.is_none());
        let (second_turn, _second_done) = t.begin(1);
        let mut second_turn = second_turn.unwrap();
        assert!(second_turn.try_recv().is_err(), "turn given too early");
        first_done.send(()).unwrap();
        assert!(second_turn.await.is_ok());
    }
}
