//! Persistent idempotency keys with expiry, for the idempotent consumer (EIP Idempotent
//! Receiver).
//!
//! This is the bytes-and-strings twin of `sluice_core::state::IdempotentRepository`, with the
//! same contract; the engine wraps it in a small adapter (mapping [`StoreError`] to
//! `ErrorKind::Unavailable`) so this crate stays free of other Sluice crates. Keys live per
//! repository name. An expired key behaves as absent at once; its entry is removed by
//! [`IdempotentKeys::purge_expired`], which reads only expired entries through an expiry index.
//!
//! A **claim** belongs to a message in flight, and messages in flight die with the process: the
//! source redelivers them. So a claim does not outlive the run that made it: opening the store
//! releases every claim (through the claims index, not a scan of the keys), and only confirmed
//! keys are recognised after a restart. Otherwise a message whose run was interrupted would come
//! back as a duplicate of itself and be dropped.

use std::sync::Arc;
use std::time::Duration;

use redb::{ReadableTable, WriteTransaction};

use crate::clock::millis;
use crate::error::StoreError;
use crate::store::Inner;
use crate::tables::{IDEMPOTENT, IDEMPOTENT_CLAIMS, IDEMPOTENT_EXPIRY};
use crate::writer::Room;

const CLAIMED: u8 = 0;
const CONFIRMED: u8 = 1;

/// What [`IdempotentKeys::try_claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The key was free (never seen, released, or expired); it is now held by the caller.
    Claimed,
    /// The key is claimed or confirmed and has not expired.
    Duplicate,
}

/// One named repository of idempotency keys; cheap to clone.
#[derive(Clone)]
pub struct IdempotentKeys {
    inner: Arc<Inner>,
    name: Arc<str>,
}

impl std::fmt::Debug for IdempotentKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotentKeys")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl IdempotentKeys {
    pub(crate) fn new(inner: Arc<Inner>, name: &str) -> Self {
        Self {
            inner,
            name: name.into(),
        }
    }

    /// Claims `key` for `ttl` if it is free. Atomic: of concurrent claims, exactly one wins,
    /// because every claim runs in the single writer.
    pub async fn try_claim(&self, key: &str, ttl: Duration) -> Result<Claim, StoreError> {
        let (name, key) = (Arc::clone(&self.name), key.to_owned());
        let now = self.inner.clock.now_ms();
        let expires = now.saturating_add(millis(ttl));
        self.inner
            .writer
            .run(Room::Drains, 1, move |txn| {
                if live_state(txn, &name, &key, now)?.is_some() {
                    return Ok(Claim::Duplicate);
                }
                set(txn, &name, &key, CLAIMED, expires)?;
                Ok(Claim::Claimed)
            })
            .await
    }

    /// Records `key` as processed for `ttl` from now, claimed before or not.
    pub async fn confirm(&self, key: &str, ttl: Duration) -> Result<(), StoreError> {
        let (name, key) = (Arc::clone(&self.name), key.to_owned());
        let expires = self.inner.clock.now_ms().saturating_add(millis(ttl));
        self.inner
            .writer
            .run(Room::Drains, 1, move |txn| {
                set(txn, &name, &key, CONFIRMED, expires)
            })
            .await
    }

    /// Forgets `key`; unknown keys are ignored.
    pub async fn release(&self, key: &str) -> Result<(), StoreError> {
        let (name, key) = (Arc::clone(&self.name), key.to_owned());
        self.inner
            .writer
            .run(Room::Drains, 1, move |txn| {
                remove(txn, &name, &key).map(|_| ())
            })
            .await
    }

    /// Whether `key` is claimed or confirmed and not expired. A short blocking read.
    pub fn contains(&self, key: &str) -> Result<bool, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let table = match txn.open_table(IDEMPOTENT) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(error) => return Err(error.into()),
        };
        let now = self.inner.clock.now_ms();
        Ok(table
            .get((&*self.name, key))?
            .is_some_and(|entry| entry.value().1 > now))
    }

    /// How many keys this repository stores, expired ones not yet purged included. Reads every
    /// key of the repository: for tests and operators, not for the message path.
    pub fn stored(&self) -> Result<usize, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let table = match txn.open_table(IDEMPOTENT) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(error) => return Err(error.into()),
        };
        let mut count = 0;
        for entry in table.range((&*self.name, "")..)? {
            let (key, _) = entry?;
            if key.value().0 != &*self.name {
                break;
            }
            count += 1;
        }
        Ok(count)
    }

    /// Removes up to `limit` expired keys of every repository; returns how many.
    pub async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        let now = self.inner.clock.now_ms();
        self.inner
            .writer
            .run(Room::Drains, 1, move |txn| purge(txn, now, limit))
            .await
    }
}

fn live_state(
    txn: &WriteTransaction,
    name: &str,
    key: &str,
    now: u64,
) -> Result<Option<u8>, StoreError> {
    let table = txn.open_table(IDEMPOTENT)?;
    let state = table.get((name, key))?.map(|entry| entry.value());
    Ok(state.and_then(|(state, expires)| (expires > now).then_some(state)))
}

fn set(
    txn: &WriteTransaction,
    name: &str,
    key: &str,
    state: u8,
    expires: u64,
) -> Result<(), StoreError> {
    remove(txn, name, key)?;
    txn.open_table(IDEMPOTENT)?
        .insert((name, key), (state, expires))?;
    txn.open_table(IDEMPOTENT_EXPIRY)?
        .insert((expires, name, key), ())?;
    if state == CLAIMED {
        txn.open_table(IDEMPOTENT_CLAIMS)?.insert((name, key), ())?;
    }
    Ok(())
}

fn remove(txn: &WriteTransaction, name: &str, key: &str) -> Result<bool, StoreError> {
    let old = txn
        .open_table(IDEMPOTENT)?
        .remove((name, key))?
        .map(|entry| entry.value());
    if let Some((state, expires)) = old {
        txn.open_table(IDEMPOTENT_EXPIRY)?
            .remove((expires, name, key))?;
        if state == CLAIMED {
            txn.open_table(IDEMPOTENT_CLAIMS)?.remove((name, key))?;
        }
    }
    Ok(old.is_some())
}

/// Releases every claim (open only: their messages died with the previous run); returns how
/// many entries it read.
pub(crate) fn release_claims(txn: &WriteTransaction) -> Result<usize, StoreError> {
    let claims: Vec<(String, String)> = txn
        .open_table(IDEMPOTENT_CLAIMS)?
        .iter()?
        .map(|entry| {
            entry.map(|(key, _)| {
                let (name, key) = key.value();
                (name.to_owned(), key.to_owned())
            })
        })
        .collect::<Result<_, _>>()?;
    for (name, key) in &claims {
        remove(txn, name, key)?;
    }
    Ok(claims.len())
}

fn purge(txn: &WriteTransaction, now: u64, limit: usize) -> Result<usize, StoreError> {
    let expiry = txn.open_table(IDEMPOTENT_EXPIRY)?;
    let expired: Vec<(u64, String, String)> = expiry
        .range((0, "", "")..(now.saturating_add(1), "", ""))?
        .take(limit)
        .map(|entry| {
            entry.map(|(key, _)| {
                let (at, name, key) = key.value();
                (at, name.to_owned(), key.to_owned())
            })
        })
        .collect::<Result<_, _>>()?;
    drop(expiry);
    for (_, name, key) in &expired {
        remove(txn, name, key)?;
    }
    Ok(expired.len())
}
