//! Storage behind stateful steps: the idempotent consumer's repository, the cache's store, the
//! throttle's shared rate limits, the claim check's store and the aggregator's repository.
//!
//! The engine ships in-memory implementations; a persistent store or a remote one (Redis) can
//! implement the same traits. Keys are strings and lifetimes are durations so any key-value
//! system with expiry can back them. Errors are [`ProcessError`]s: use
//! [`ErrorKind::Unavailable`](crate::ErrorKind::Unavailable) when the backing system cannot be
//! reached or is full for now (the message may be retried), and
//! [`ErrorKind::Rejected`](crate::ErrorKind::Rejected) when the request can never succeed (a value
//! larger than the whole store).

use std::time::Duration;

use async_trait::async_trait;

use crate::error::ProcessError;
use crate::message::{Body, Headers};

/// What [`IdempotentRepository::try_claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The key was free (never seen, released, or expired); it is now held by the caller.
    Claimed,
    /// The key is held by a message in flight or was recorded as processed and has not expired.
    Duplicate,
}

/// Remembers which message keys were seen, for the idempotent consumer (EIP Idempotent Receiver).
///
/// # Contract
/// * [`try_claim`](Self::try_claim) is atomic: of several concurrent claims of one free key,
///   exactly one returns [`Claim::Claimed`]. The claim lasts `ttl` unless confirmed or released.
/// * [`confirm`](Self::confirm) records the key as processed for `ttl` from now, whether or not it
///   was claimed before (the on-completion mode records keys only here).
/// * [`release`](Self::release) forgets a key so a redelivery of the message is processed again;
///   releasing an unknown key does nothing.
/// * [`contains`](Self::contains) says whether the key is claimed or recorded and not expired.
/// * An expired key behaves as if it was never seen.
#[async_trait]
pub trait IdempotentRepository: Send + Sync + 'static {
    /// Claims `key` for `ttl` if it is free.
    async fn try_claim(&self, key: &str, ttl: Duration) -> Result<Claim, ProcessError>;

    /// Records `key` as processed for `ttl` from now.
    async fn confirm(&self, key: &str, ttl: Duration) -> Result<(), ProcessError>;

    /// Forgets `key`.
    async fn release(&self, key: &str) -> Result<(), ProcessError>;

    /// Whether `key` is claimed or recorded.
    async fn contains(&self, key: &str) -> Result<bool, ProcessError>;
}

/// A cached result: the body and the headers chosen to be kept with it.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedValue {
    /// The body to put on a message that hits the cache.
    pub body: Body,
    /// Headers to set on a message that hits the cache.
    pub headers: Headers,
}

/// A key-value store with expiry, for the `cache` step.
///
/// # Contract
/// * [`get`](Self::get) returns a value stored by [`put`](Self::put) under the same key whose
///   `ttl` has not elapsed, or `None`.
/// * `put` replaces any value under the key. A store may evict values before they expire to stay
///   within its bounds (a cache miss is always allowed).
#[async_trait]
pub trait CacheStore: Send + Sync + 'static {
    /// The value under `key`, if present and not expired.
    async fn get(&self, key: &str) -> Result<Option<CachedValue>, ProcessError>;

    /// Stores `value` under `key` for `ttl`.
    async fn put(&self, key: &str, value: CachedValue, ttl: Duration) -> Result<(), ProcessError>;
}

/// A rate as the generic cell rate algorithm (GCRA) keeps it, for the `throttle` step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Time between two messages at the steady rate (`per / rate`).
    pub interval: Duration,
    /// How far ahead of the steady schedule a message may go (`interval * (burst - 1)`).
    pub tolerance: Duration,
}

/// The answer to a [`RateLimitStore::reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// A slot is reserved: the message may go after `wait` (zero: at once).
    Granted {
        /// How long until the reserved slot.
        wait: Duration,
    },
    /// No slot within `max_wait`; nothing was reserved. A message could pass after `retry_after`.
    OverRate {
        /// How long until a slot would be free.
        retry_after: Duration,
    },
}

/// The state of the `throttle` step kept outside the process, so several instances share one limit.
///
/// # Contract
/// * [`reserve`](Self::reserve) is atomic per key: of concurrent reservations from any number of
///   instances, each gets its own slot, and together they never exceed `limit`.
/// * A key whose schedule has passed may be forgotten (it is in the same state as a key never
///   seen), so a store needs no bound on keys beyond expiry.
#[async_trait]
pub trait RateLimitStore: Send + Sync + 'static {
    /// Reserves the next slot for `key` if it comes within `max_wait` of now.
    async fn reserve(
        &self,
        key: &str,
        limit: RateLimit,
        max_wait: Duration,
    ) -> Result<Reservation, ProcessError>;
}

/// Keeps message bodies while a claim travels instead (EIP Claim Check).
///
/// # Contract
/// * [`check_in`](Self::check_in) keeps `body` under `claim` for `ttl`; it must not evict bodies
///   that have not expired to make room: a full store fails with
///   [`ErrorKind::Unavailable`](crate::ErrorKind::Unavailable), and a body that can never fit with
///   [`ErrorKind::Rejected`](crate::ErrorKind::Rejected).
/// * [`check_out`](Self::check_out) returns the body under `claim` if it has not expired, removing
///   it when `remove` is true; `None` if there is none.
#[async_trait]
pub trait ClaimCheckStore: Send + Sync + 'static {
    /// Keeps `body` under `claim` for `ttl`.
    async fn check_in(&self, claim: &str, body: Body, ttl: Duration) -> Result<(), ProcessError>;

    /// The body under `claim`, removed from the store when `remove` is true.
    async fn check_out(&self, claim: &str, remove: bool) -> Result<Option<Body>, ProcessError>;
}

/// One message kept in an aggregation group: what the aggregation needs of it.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupEntry {
    /// The message's body.
    pub body: Body,
    /// The message's headers.
    pub headers: Headers,
}

/// Keeps the groups of the `aggregate` step (EIP Aggregator) between their messages.
///
/// A group is an ordered list of [`GroupEntry`]s under a correlation key. The repository holds
/// content only: the acknowledgement shares of the messages stay with the step in memory (an
/// acknowledgement cannot outlive the process), so after a restart a persistent repository may
/// hold entries whose messages the source redelivers; such a repository should store entries with
/// an id it can deduplicate on (the engine's in-memory repository does not need to).
///
/// # Contract
/// * [`append`](Self::append) adds `entry` at the end of the group `key`, creating the group if
///   needed, and returns the group's size afterwards. A repository that is full fails with
///   [`ErrorKind::Unavailable`](crate::ErrorKind::Unavailable).
/// * [`entries`](Self::entries) returns the group's entries in the order they were appended, or
///   `None` for a group that does not exist.
/// * [`remove`](Self::remove) removes the group and returns its entries; a completed group is
///   removed exactly once.
/// * [`group_count`](Self::group_count) is the number of groups held.
#[async_trait]
pub trait AggregationRepository: Send + Sync + 'static {
    /// Appends `entry` to the group `key`; the group's size afterwards.
    async fn append(&self, key: &str, entry: GroupEntry) -> Result<usize, ProcessError>;

    /// The entries of the group `key`, oldest first.
    async fn entries(&self, key: &str) -> Result<Option<Vec<GroupEntry>>, ProcessError>;

    /// Removes the group `key`, returning its entries.
    async fn remove(&self, key: &str) -> Result<Option<Vec<GroupEntry>>, ProcessError>;

    /// How many groups are held.
    async fn group_count(&self) -> Result<usize, ProcessError>;
}

/// Small durable values a source keeps across restarts (a polling source's watermark), by key.
///
/// # Contract
/// * [`get`](Self::get) returns the bytes last [`put`](Self::put) under `key`, also after the
///   process restarted, or `None` if nothing was ever put.
/// * `put` returns only once the value is durable.
#[async_trait]
pub trait CheckpointStore: Send + Sync + 'static {
    /// The value under `key`.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ProcessError>;

    /// Durably replaces the value under `key`.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), ProcessError>;
}

/// Opens the process's checkpoint store on first use (so a project without checkpoints never
/// opens the durable store).
pub type CheckpointOpener =
    Box<dyn Fn() -> Result<std::sync::Arc<dyn CheckpointStore>, String> + Send + Sync>;

/// Where components find the process's [`CheckpointStore`]; lives in
/// [`Resources`](crate::Resources). The engine installs the opener before building sources, so
/// connectors depend only on this crate.
#[derive(Default)]
pub struct Checkpoints {
    opener: std::sync::OnceLock<CheckpointOpener>,
}

impl Checkpoints {
    /// Installs how to open the store; the first installation wins.
    pub fn install(&self, opener: CheckpointOpener) {
        let _ = self.opener.set(opener);
    }

    /// Whether a store was installed.
    pub fn is_installed(&self) -> bool {
        self.opener.get().is_some()
    }

    /// The store, opened if needed; an error says why it cannot be.
    pub fn store(&self) -> Result<std::sync::Arc<dyn CheckpointStore>, String> {
        match self.opener.get() {
            Some(open) => open(),
            None => Err("this runtime has no checkpoint store".to_owned()),
        }
    }
}

impl std::fmt::Debug for Checkpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoints")
            .field("installed", &self.is_installed())
            .finish()
    }
}

#[cfg(test)]
mod checkpoint_tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Memory(Mutex<HashMap<String, Vec<u8>>>);

    #[async_trait]
    impl CheckpointStore for Memory {
        async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ProcessError> {
            Ok(self.0.lock().unwrap().get(key).cloned())
        }
        async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), ProcessError> {
            self.0.lock().unwrap().insert(key.to_owned(), value);
            Ok(())
        }
    }

    #[tokio::test]
    async fn not_installed_is_a_clear_error_then_the_first_opener_wins() {
        let checkpoints = Checkpoints::default();
        assert!(checkpoints.store().is_err());
        let memory: Arc<Memory> = Arc::default();
        let shared = Arc::clone(&memory);
        checkpoints.install(Box::new(move || {
            Ok(Arc::clone(&shared) as Arc<dyn CheckpointStore>)
        }));
        checkpoints.install(Box::new(|| Err("second".into())));
        let store = checkpoints.store().unwrap();
        store.put("k", b"v".to_vec()).await.unwrap();
        assert_eq!(memory.get("k").await.unwrap(), Some(b"v".to_vec()));
    }
}
