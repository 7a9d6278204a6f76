//! Reopening the database after an I/O error, inside the running store.
//!
//! After any I/O error (a full disk included) redb refuses every later operation with "previous
//! I/O error" until the `Database` is dropped and opened again; opening runs redb's crash
//! recovery, which rolls back to the last durable commit. The writer thread owns that: it
//! closes the [`DbSlot`], drops its `Database`, and opens a new one with [`Opener`], retrying
//! with a capped [`Backoff`] while opening fails (a disk still full, a reader still holding the
//! old file). Readers take the database from the slot for each read, so they pick up the new one.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use redb::{Database, ReadTransaction, ReadableDatabase, StorageBackend};

use crate::error::StoreError;
use crate::writer::CommitFailure;

/// The database readers use, or why there is none while the writer reopens it.
pub(crate) struct DbSlot(RwLock<Result<Arc<Database>, CommitFailure>>);

impl DbSlot {
    pub(crate) fn new(db: Arc<Database>) -> Self {
        Self(RwLock::new(Ok(db)))
    }

    /// Starts a read on the current database.
    pub(crate) fn begin_read(&self) -> Result<ReadTransaction, StoreError> {
        // The lock is held only to clone the handle: a read never blocks a reopen.
        let db = match &*self.0.read().unwrap_or_else(PoisonError::into_inner) {
            Ok(db) => Arc::clone(db),
            Err(why) => return Err(why.clone().into()),
        };
        Ok(db.begin_read()?)
    }

    /// Hands readers the newly opened database.
    pub(crate) fn open(&self, db: Arc<Database>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Ok(db);
    }

    /// Takes the database away from readers (it closes once the last reader lets go); reads fail
    /// with `why` until [`open`](Self::open).
    pub(crate) fn close(&self, why: CommitFailure) {
        let old = std::mem::replace(
            &mut *self.0.write().unwrap_or_else(PoisonError::into_inner),
            Err(why),
        );
        // Dropped outside the lock: closing a database writes and syncs its header.
        drop(old);
    }
}

/// Opens the store's database, as many times as needed.
pub(crate) struct Opener(Box<dyn Fn() -> Result<Database, StoreError> + Send + Sync>);

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener").finish_non_exhaustive()
    }
}

impl Opener {
    /// Opens (creating if needed) the database file at `path`.
    pub(crate) fn file(path: PathBuf, cache_size: usize) -> Self {
        Self(Box::new(move || {
            Ok(Database::builder()
                .set_cache_size(cache_size)
                .create(&path)?)
        }))
    }

    /// Opens the database on `backend`, which outlives each `Database` built on it.
    pub(crate) fn backend(backend: impl StorageBackend, cache_size: usize) -> Self {
        let backend = Arc::new(backend);
        Self(Box::new(move || {
            Ok(Database::builder()
                .set_cache_size(cache_size)
                .create_with_backend(Shared(Arc::clone(&backend)))?)
        }))
    }

    pub(crate) fn open(&self) -> Result<Database, StoreError> {
        (self.0)()
    }
}

/// A backend shared by the successive databases of one store. It does not pass `close` on: redb
/// closes the backend when a `Database` drops, and the store opens the same backend again.
#[derive(Debug)]
struct Shared<B>(Arc<B>);

impl<B: StorageBackend> StorageBackend for Shared<B> {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write(offset, data)
    }
}

/// Waits that start short and double up to a cap.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    /// The first wait.
    const FIRST: Duration = Duration::from_millis(20);
    /// The longest wait: how late at most the store notices that space came back.
    const CAP: Duration = Duration::from_secs(1);

    pub(crate) fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// The wait before the next attempt.
    pub(crate) fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        wait
    }
}
