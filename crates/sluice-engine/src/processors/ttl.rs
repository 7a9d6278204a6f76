//! Time to live of stored entries (cached results, idempotency keys, checked-in bodies): the
//! one rule for a configured `ttl` and the one way an in-memory store turns it into an expiry,
//! so every store treats the same `ttl` the same way.

use std::collections::BTreeMap;
use std::time::Duration;

use sluice_core::BuildError;
use tokio::time::Instant;

/// A TTL that outlasts the clock's range stands for "until the process stops".
const FOREVER: Duration = Duration::from_secs(100 * 365 * 86_400);

/// The configured `ttl`, refused when zero: an entry that expires as it is stored is never found.
pub(crate) fn checked(ttl: Duration) -> Result<Duration, BuildError> {
    if ttl.is_zero() {
        return Err(BuildError::field("ttl", "give a duration longer than zero"));
    }
    Ok(ttl)
}

/// When an entry stored at `now` for `ttl` expires; a TTL too large for the clock means "until
/// the process stops".
pub(crate) fn expires_at(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl).unwrap_or_else(|| now + FOREVER)
}

/// Where one entry stands in an [`ExpiryQueue`]; the store keeps it with the entry to take the
/// entry out of the queue again.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expiry {
    at: Instant,
    seq: u64,
}

impl Expiry {
    /// Whether the entry is still live at `now`.
    pub(crate) fn is_live(self, now: Instant) -> bool {
        self.at > now
    }
}

/// A store's keys by expiry (ties in insertion order), so that expired keys are found from the
/// front without scanning the store. The store keeps its entries and this queue in step.
#[derive(Default)]
pub(crate) struct ExpiryQueue {
    by_expiry: BTreeMap<(Instant, u64), String>,
    next_seq: u64,
}

impl ExpiryQueue {
    /// Queues `key`, stored at `now` for `ttl`.
    pub(crate) fn insert(&mut self, key: &str, now: Instant, ttl: Duration) -> Expiry {
        let expiry = Expiry {
            at: expires_at(now, ttl),
            seq: self.next_seq,
        };
        self.next_seq += 1;
        self.by_expiry
            .insert((expiry.at, expiry.seq), key.to_owned());
        expiry
    }

    /// Takes the entry at `expiry` out of the queue.
    pub(crate) fn remove(&mut self, expiry: Expiry) {
        self.by_expiry.remove(&(expiry.at, expiry.seq));
    }

    /// The key expiring first, taken out of the queue, if it has expired by `now`.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Option<String> {
        let entry = self.by_expiry.first_entry()?;
        if entry.key().0 > now {
            return None;
        }
        Some(entry.remove())
    }

    /// Every queued key, the one expiring first first.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &String> {
        self.by_expiry.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_refused_at_the_ttl_field() {
        let e = checked(Duration::ZERO).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("ttl"));
        assert_eq!(
            checked(Duration::from_secs(1)).unwrap(),
            Duration::from_secs(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_huge_ttl_does_not_overflow() {
        let now = Instant::now();
        assert_eq!(
            expires_at(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert_eq!(expires_at(now, Duration::MAX), now + FOREVER);
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_gives_expired_keys_soonest_first_and_ties_in_order() {
        let mut queue = ExpiryQueue::default();
        let now = Instant::now();
        queue.insert("late", now, Duration::from_secs(9));
        queue.insert("a", now, Duration::from_secs(1));
        let gone = queue.insert("b", now, Duration::from_secs(1));
        queue.insert("c", now, Duration::from_secs(1));
        queue.remove(gone);
        assert!(!gone.is_live(now + Duration::from_secs(1)));
        let keys: Vec<&String> = queue.keys().collect();
        assert_eq!(keys, ["a", "c", "late"]);
        assert_eq!(queue.pop_expired(now), None);
        let later = now + Duration::from_secs(1);
        assert_eq!(queue.pop_expired(later).as_deref(), Some("a"));
        assert_eq!(queue.pop_expired(later).as_deref(), Some("c"));
        assert_eq!(queue.pop_expired(later), None);
    }
}
