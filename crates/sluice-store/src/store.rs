//! Opening a store: the directory lock, the database, recovery, the writer thread.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, StorageBackend, WriteTransaction};

use crate::aggregation::AggregationGroups;
use crate::checkpoint::Checkpoints;
use crate::clock::{Clock, SystemClock};
use crate::dead_letter::DeadLetters;
use crate::error::StoreError;
use crate::idempotent::{self, IdempotentKeys};
use crate::lock::DirLock;
use crate::queue::{self, Queue};
use crate::reopen::{DbSlot, Opener};
use crate::reserve::{DEFAULT_RESERVE, RESERVE_FILE, Reserve};
use crate::tables;
use crate::writer::{GroupCommit, Storage, Writer};

/// The database file's name inside the data directory.
pub const DATABASE_FILE: &str = "store.redb";

/// How a store behaves.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// How writes are packed into durable commits.
    pub group_commit: GroupCommit,
    /// Where time comes from (visibility timeouts, expiries, timestamps).
    pub clock: Arc<dyn Clock>,
    /// Memory redb may use to cache pages, in bytes. A queue reads what it wrote moments ago,
    /// so a small cache serves it; redb's own default (1 GiB) would grow a process's memory by
    /// hundreds of megabytes under load for little gain.
    pub cache_size: usize,
    /// Bytes kept free on the data directory's disk for draining when it fills up (the
    /// `reserve` file; see the crate docs). 0 keeps none: then a full disk stops consumers too.
    /// Only stores opened on a directory have one.
    pub reserve: u64,
}

/// The default [`StoreOptions::cache_size`]: 32 MiB.
pub const DEFAULT_CACHE_SIZE: usize = 32 << 20;

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            group_commit: GroupCommit::default(),
            clock: Arc::new(SystemClock),
            cache_size: DEFAULT_CACHE_SIZE,
            reserve: DEFAULT_RESERVE,
        }
    }
}

/// What opening the store did. The counts make "open does not scan the queue" checkable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Entries read to recover: in-flight queue entries, lease ranges and idempotency claims
    /// only, never records or confirmed keys.
    pub entries_read: usize,
}

/// State shared by every handle of one open store. Field order matters: the writer is dropped
/// (and joined) before the database and the lock are released.
pub(crate) struct Inner {
    pub(crate) writer: Writer,
    /// The database for reads; the writer replaces it when it reopens the database.
    pub(crate) db: Arc<DbSlot>,
    pub(crate) clock: Arc<dyn Clock>,
    /// Each channel's combined writes, shared by every handle on the channel.
    pub(crate) channels: queue::ChannelRegistry,
    lock: Option<DirLock>,
}

/// An open store; handles ([`Queue`], [`DeadLetters`], [`IdempotentKeys`]) keep it open, and
/// the database closes when the last one is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    report: OpenReport,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir`, locked against other processes. Leases
    /// held when the store was last closed become visible again. On a full disk it still opens
    /// if its reserve is on disk (whose room then serves the recovery commit), so consumers can
    /// drain, with producers refused until there is room.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let lock = DirLock::acquire(dir)?;
        let opener = Opener::file(dir.join(DATABASE_FILE), options.cache_size);
        let reserve = if options.reserve > 0 {
            let reserve = Reserve::new(dir.join(RESERVE_FILE), options.reserve);
            let held = match reserve.fill() {
                Ok(()) => true,
                // A disk too full for the reserve opens with it released, as after a full disk.
                Err(error) if crate::error::is_full(&error) => false,
                Err(source) => {
                    return Err(StoreError::Directory {
                        dir: dir.to_path_buf(),
                        source,
                    });
                }
            };
            Some((reserve, held))
        } else {
            None
        };
        let (db, report, reserve) = match open_and_recover(&opener) {
            Ok((db, report)) => (db, report, reserve),
            Err(error) if error.is_disk_full() => match reserve {
                // Recovery is a write: give it the reserve's room and open released.
                Some((reserve, true)) => {
                    reserve.release();
                    let (db, report) = open_and_recover(&opener)?;
                    (db, report, Some((reserve, false)))
                }
                _ => return Err(error),
            },
            Err(error) => return Err(error),
        };
        Self::start(db, report, opener, reserve, Some(lock), options)
    }

    /// Opens a store on any redb storage backend, without a directory lock: for tests (a
    /// simulated disk) and embedding. The caller guarantees exclusive use. The store keeps the
    /// backend to reopen the database on it after an I/O error, and never calls its `close`.
    pub fn open_with_backend(
        backend: impl StorageBackend,
        options: StoreOptions,
    ) -> Result<Self, StoreError> {
        let opener = Opener::backend(backend, options.cache_size);
        let (db, report) = open_and_recover(&opener)?;
        Self::start(db, report, opener, None, None, options)
    }

    /// A store in memory that vanishes with the process: for checking flows (`sluice validate`,
    /// `sluice test`) without touching the data directory.
    pub fn open_in_memory(options: StoreOptions) -> Result<Self, StoreError> {
        Self::open_with_backend(redb::backends::InMemoryBackend::new(), options)
    }

    fn start(
        db: Database,
        report: OpenReport,
        opener: Opener,
        reserve: Option<(Reserve, bool)>,
        lock: Option<DirLock>,
        options: StoreOptions,
    ) -> Result<Self, StoreError> {
        let db = Arc::new(db);
        let slot = Arc::new(DbSlot::new(Arc::clone(&db)));
        let storage = Storage {
            db,
            slot: Arc::clone(&slot),
            opener,
            reserve,
        };
        let writer = Writer::start(storage, options.group_commit)?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer,
                db: slot,
                clock: options.clock,
                channels: queue::ChannelRegistry::default(),
                lock,
            }),
            report,
        })
    }

    /// Durable commits made by the writer since open (each may hold many requests).
    pub fn commits(&self) -> u64 {
        self.inner.writer.commits()
    }

    /// Test hook: requests submitted to the writer since open.
    #[cfg(test)]
    pub(crate) fn requests(&self) -> u64 {
        self.inner.writer.requests()
    }

    /// Test hook: keeps the writer busy (inside a request) until the returned sender is dropped.
    #[cfg(test)]
    pub(crate) fn hold_writer(&self) -> std::sync::mpsc::Sender<()> {
        let (release, held) = std::sync::mpsc::channel::<()>();
        self.inner.writer.submit(
            crate::writer::Room::Drains,
            crate::writer::Load::Fixed {
                callers: 1,
                records: 1,
            },
            move |_| {
                // Returns once the sender is dropped.
                let _ = held.recv();
                Ok(())
            },
            |_: Result<(), StoreError>| {},
        );
        release
    }

    /// Whether the disk reserve is in use: the disk filled up, so requests that store new
    /// payloads fail with [`StoreError::DiskFull`] while consumers drain on the reserve's room,
    /// until the writer can write the reserve again. Always `false` for a store without a
    /// reserve (in memory, another backend, `reserve: 0`).
    pub fn reserve_in_use(&self) -> bool {
        self.inner.writer.reserve_released()
    }

    /// The locked data directory; `None` for a store on another backend.
    pub fn dir(&self) -> Option<&Path> {
        self.inner.lock.as_ref().map(DirLock::dir)
    }

    /// What opening did.
    pub fn open_report(&self) -> OpenReport {
        self.report
    }

    /// The durable queue of `channel` (created on first append).
    pub fn queue(&self, channel: &str) -> Queue {
        Queue::new(Arc::clone(&self.inner), channel)
    }

    /// The dead-letter store.
    pub fn dead_letters(&self) -> DeadLetters {
        DeadLetters::new(Arc::clone(&self.inner))
    }

    /// The checkpoints (small values kept across restarts, by key).
    pub fn checkpoints(&self) -> Checkpoints {
        Checkpoints::new(Arc::clone(&self.inner))
    }

    /// Removes up to `limit` expired idempotency keys of every repository; returns how many.
    pub async fn purge_expired_keys(&self, limit: usize) -> Result<usize, StoreError> {
        self.idempotent_keys("").purge_expired(limit).await
    }

    /// The aggregation groups of repository `name`.
    pub fn aggregation_groups(&self, name: &str) -> AggregationGroups {
        AggregationGroups::new(Arc::clone(&self.inner), name)
    }

    /// The idempotency keys of repository `name`.
    pub fn idempotent_keys(&self, name: &str) -> IdempotentKeys {
        IdempotentKeys::new(Arc::clone(&self.inner), name)
    }
}

/// Opens the database and recovers it (see [`recover`]).
fn open_and_recover(opener: &Opener) -> Result<(Database, OpenReport), StoreError> {
    let db = opener.open()?;
    let report = recover(&db)?;
    Ok((db, report))
}

/// Creates missing tables and releases the leases and idempotency claims of the previous run,
/// in one commit. Run at open only: a reopen after an I/O error keeps the leases and claims,
/// whose consumers are still alive.
fn recover(db: &Database) -> Result<OpenReport, StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_quick_repair(true);
    create_tables(&txn)?;
    let entries_read = queue::release_leases(&txn)? + idempotent::release_claims(&txn)?;
    txn.commit()?;
    Ok(OpenReport { entries_read })
}

fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(tables::RECORDS)?;
    txn.open_table(tables::CHANNELS)?;
    txn.open_table(tables::IN_FLIGHT)?;
    txn.open_table(tables::VISIBLE_AT)?;
    txn.open_table(tables::LEASE_RANGES)?;
    txn.open_table(tables::DEAD_LETTERS)?;
    txn.open_table(tables::REPLAYS)?;
    txn.open_table(tables::COUNTERS)?;
    txn.open_table(tables::IDEMPOTENT)?;
    txn.open_table(tables::IDEMPOTENT_EXPIRY)?;
    txn.open_table(tables::IDEMPOTENT_CLAIMS)?;
    txn.open_table(tables::CHECKPOINTS)?;
    txn.open_table(tables::AGGREGATION_GROUPS)?;
    txn.open_table(tables::AGGREGATION_ENTRIES)?;
    Ok(())
}
