//! The in-memory [`ClaimCheckStore`]: bodies with expiry, bounded in total bytes.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use sluice_core::state::ClaimCheckStore;
use sluice_core::{Body, ErrorKind, ProcessError};
use tokio::time::Instant;

use crate::processors::ttl::{Expiry, ExpiryQueue};

/// Bodies kept for their time to live, at most `max_bytes` of them in total. A full store refuses
/// new bodies (`unavailable`) rather than dropping bodies whose claims are still travelling; a
/// body larger than the whole store is `rejected`.
pub(crate) struct MemoryClaimStore {
    max_bytes: usize,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    bodies: HashMap<String, Kept>,
    expiries: ExpiryQueue,
    used_bytes: usize,
}

struct Kept {
    body: Body,
    size: usize,
    expiry: Expiry,
}

impl Table {
    fn remove(&mut self, claim: &str) -> Option<Kept> {
        let kept = self.bodies.remove(claim)?;
        self.expiries.remove(kept.expiry);
        self.used_bytes -= kept.size;
        Some(kept)
    }

    fn purge_expired(&mut self, now: Instant) {
        while let Some(claim) = self.expiries.pop_expired(now) {
            if let Some(kept) = self.bodies.remove(&claim) {
                self.used_bytes -= kept.size;
            }
        }
    }
}

impl MemoryClaimStore {
    pub(crate) fn new(max_bytes: usize) -> Self {
        MemoryClaimStore {
            max_bytes,
            table: Mutex::new(Table::default()),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        match self.table.lock() {
            Ok(table) => table,
            // Every mutation keeps the maps and the byte count consistent before it can panic.
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    #[cfg(test)]
    pub(crate) fn used_bytes(&self) -> usize {
        self.table().used_bytes
    }
}

#[async_trait]
impl ClaimCheckStore for MemoryClaimStore {
    async fn check_in(&self, claim: &str, body: Body, ttl: Duration) -> Result<(), ProcessError> {
        let size = body.len();
        if size > self.max_bytes {
            return Err(ProcessError::new(
                ErrorKind::Rejected,
                format!(
                    "a body of {size} bytes is larger than the whole claim check store \
(max_bytes {})",
                    self.max_bytes
                ),
            ));
        }
        let now = Instant::now();
        let mut table = self.table();
        table.remove(claim);
        table.purge_expired(now);
        if table.used_bytes + size > self.max_bytes {
            return Err(ProcessError::new(
                ErrorKind::Unavailable,
                format!(
                    "claim check store full: {} of {} bytes hold bodies not yet checked out; \
a body of {size} bytes does not fit (check bodies out, shorten `ttl` or raise `max_bytes`)",
                    table.used_bytes, self.max_bytes
                ),
            ));
        }
        let expiry = table.expiries.insert(claim, now, ttl);
        table.used_bytes += size;
        table
            .bodies
            .insert(claim.to_owned(), Kept { body, size, expiry });
        Ok(())
    }

    async fn check_out(&self, claim: &str, remove: bool) -> Result<Option<Body>, ProcessError> {
        let now = Instant::now();
        let mut table = self.table();
        let live = table.bodies.get(claim).map(|kept| kept.expiry.is_live(now));
        Ok(match live {
            None => None,
            Some(false) => {
                table.remove(claim);
                None
            }
            Some(true) if remove => table.remove(claim).map(|kept| kept.body),
            Some(true) => table.bodies.get(claim).map(|kept| kept.body.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn body(n: usize) -> Body {
        Body::from_bytes(vec![b'x'; n])
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_in_bytes_and_freed_by_check_out_and_expiry() {
        let store = MemoryClaimStore::new(10);
        store.check_in("a", body(6), TTL).await.unwrap();
        let e = store.check_in("b", body(5), TTL).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert!(e.detail.contains("6 of 10 bytes"), "{e}");
        let e = store.check_in("c", body(11), TTL).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Rejected);
        // Reading without removing keeps it; removing frees its bytes.
        assert!(store.check_out("a", false).await.unwrap().is_some());
        assert_eq!(store.used_bytes(), 6);
        assert_eq!(store.check_out("a", true).await.unwrap(), Some(body(6)));
        assert_eq!(store.used_bytes(), 0);
        assert!(store.check_out("a", true).await.unwrap().is_none());
        store
            .check_in("d", body(10), Duration::from_secs(1))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(store.check_out("d", false).await.unwrap().is_none());
        store.check_in("e", body(10), TTL).await.unwrap();
    }
}
