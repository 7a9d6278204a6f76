//! Group commit: one thread owns every write transaction and packs the requests that arrive
//! within a bounded wait into one durable commit.
//!
//! A request is a closure run inside the shared transaction. Its result is held back until the
//! commit returns, so a caller never sees an id or an outcome that is not on disk. If any request
//! of a batch fails (a storage error), the whole transaction is rolled back and every request of
//! the batch fails: requests only ever fail for storage reasons, never for their input, so one
//! bad request cannot sink good ones.
//!
//! The writer also keeps the store usable through I/O errors and a full disk, by itself: after
//! a batch fails with an I/O error it reopens the database (see `reopen.rs`), and after one fails
//! because the disk is full it releases the disk reserve and refuses [`Room::Grows`] requests
//! until it can write the reserve again (see `reserve.rs`). Requests that arrive while the
//! database is closed fail at once with the reason; nothing is queued behind a broken disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, Durability, WriteTransaction};
use tokio::sync::oneshot;

use crate::error::StoreError;
use crate::reopen::{Backoff, DbSlot, Opener};
use crate::reserve::Reserve;

/// How requests are packed into commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommit {
    /// How long the writer waits for more requests after the first one of a batch. Zero commits
    /// whatever is queued at once: lowest latency, fewer requests per fsync. The wait ends early
    /// once the batch holds as many callers as the previous commit did (so a lone producer
    /// never waits, and N steady producers commit as soon as all N are in; callers whose
    /// appends or acks were combined into one request count one each).
    pub max_wait: Duration,
    /// Stop collecting once the batch holds this many records (an append of n records counts n,
    /// other requests 1).
    pub max_batch: usize,
}

impl Default for GroupCommit {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_millis(2),
            max_batch: 4096,
        }
    }
}

/// Whether a request may run while the disk reserve is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Room {
    /// Stores new payloads (appends, dead letters, replays): refused while the reserve is
    /// released, so the room it left stays for draining.
    Grows,
    /// Drains the store or writes small fixed-size entries (leases, acks, nacks, deletes,
    /// idempotency keys): runs on the reserve's room.
    Drains,
}

/// Why a batch did not commit, as told to every request in it.
#[derive(Debug, Clone)]
pub(crate) struct CommitFailure {
    reason: String,
    disk_full: bool,
    /// An I/O error: redb refuses every later operation until the database is reopened.
    io: bool,
    /// The writer is gone: the store was dropped or its thread stopped.
    closed: bool,
}

impl CommitFailure {
    fn new(error: &StoreError) -> Self {
        Self {
            reason: error.to_string(),
            disk_full: error.is_disk_full(),
            io: error.is_io(),
            closed: matches!(error, StoreError::Closed),
        }
    }

    /// What requests hear while the database is closed after this failure.
    fn reopening(&self) -> Self {
        Self {
            reason: format!(
                "the store is reopening its database after a failed write ({})",
                self.reason
            ),
            disk_full: self.disk_full,
            io: false,
            closed: false,
        }
    }

    /// What a request hears when the writer is gone.
    fn closed() -> Self {
        Self {
            reason: StoreError::Closed.to_string(),
            disk_full: false,
            io: false,
            closed: true,
        }
    }

    /// What a [`Room::Grows`] request hears while the reserve is released.
    fn reserve_in_use() -> Self {
        Self {
            reason: "the store keeps its last free space for consumers to drain it, and takes \
                     new messages again once the disk has room"
                .into(),
            disk_full: true,
            io: false,
            closed: false,
        }
    }
}

/// The same failure as `error`, for another request of the batch it sank (a disk-full error
/// stays one, so each caller can answer with backpressure).
pub(crate) fn retell(error: &StoreError) -> StoreError {
    CommitFailure::new(error).into()
}

impl From<CommitFailure> for StoreError {
    fn from(failure: CommitFailure) -> Self {
        if failure.closed {
            StoreError::Closed
        } else if failure.disk_full {
            StoreError::DiskFull(failure.reason)
        } else {
            StoreError::Abandoned(failure.reason)
        }
    }
}

/// Delivers a request's result once the fate of its commit is known.
type Completion = Box<dyn FnOnce(Result<(), CommitFailure>) + Send>;

/// Runs a request inside the batch's transaction (`None`: the transaction could not start).
type Work = Box<dyn FnOnce(Option<&WriteTransaction>) -> Ran + Send>;

/// What a request left after running: how to complete it, and whether it failed.
struct Ran {
    completion: Completion,
    failure: Option<CommitFailure>,
}

struct Job {
    room: Room,
    load: Load,
    work: Work,
}

/// What the writer receives: a request, or word that a combined request it holds has grown.
enum Message {
    Job(Job),
    Grown,
}

/// How much a request carries: callers waiting on it and records it writes. A combined request
/// (see `combine.rs`) grows while it waits, so the writer reads its load again when told.
#[derive(Debug, Clone)]
pub(crate) enum Load {
    Fixed { callers: usize, records: usize },
    Growing(Arc<GrowingLoad>),
}

/// The load of a combined request, grown by the callers that join it.
#[derive(Debug, Default)]
pub(crate) struct GrowingLoad {
    callers: AtomicUsize,
    records: AtomicUsize,
}

impl GrowingLoad {
    pub(crate) fn add(&self, records: usize) {
        // SeqCst, like the writer's `waiting` flag: see `Writer::grown`.
        self.callers.fetch_add(1, Ordering::SeqCst);
        self.records.fetch_add(records, Ordering::SeqCst);
    }

    fn read(&self) -> (usize, usize) {
        (
            self.callers.load(Ordering::SeqCst),
            self.records.load(Ordering::SeqCst),
        )
    }
}

impl Job {
    /// Fails the request without running it.
    fn refuse(self, failure: &CommitFailure) {
        ((self.work)(None).completion)(Err(failure.clone()));
    }
}

/// What the writer writes to: the open database, how to open it again, the disk reserve.
pub(crate) struct Storage {
    pub(crate) db: Arc<Database>,
    /// Where readers find the database; the writer swaps it on reopen.
    pub(crate) slot: Arc<DbSlot>,
    pub(crate) opener: Opener,
    /// The disk reserve (`None`: a store without a data directory), and whether it is on disk.
    pub(crate) reserve: Option<(Reserve, bool)>,
}

/// The handle to the writer thread. Dropping it lets the thread finish the queued requests and
/// waits for it, so the database file is closed when the store is gone.
pub(crate) struct Writer {
    sender: Option<Sender<Message>>,
    thread: Option<JoinHandle<()>>,
    commits: Arc<AtomicU64>,
    /// Whether the writer waits for more callers to join the batch it collects.
    waiting: Arc<AtomicBool>,
    /// Requests submitted, for tests.
    #[cfg(test)]
    requests: AtomicU64,
    /// Whether the disk reserve is released (mirrors the writer thread's state, for health).
    reserve_released: Arc<AtomicBool>,
}

impl Writer {
    pub(crate) fn start(storage: Storage, config: GroupCommit) -> Result<Self, StoreError> {
        let (sender, receiver) = mpsc::channel();
        let commits = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&commits);
        let waiting = Arc::new(AtomicBool::new(false));
        let waiting_flag = Arc::clone(&waiting);
        let health = Health::new(storage);
        let reserve_released = Arc::clone(&health.released_flag);
        let thread = std::thread::Builder::new()
            .name("sluice-store-writer".into())
            .spawn(move || {
                let inbox = Inbox {
                    receiver,
                    waiting: waiting_flag,
                };
                writer_loop(health, &inbox, config, &counter);
            })
            .map_err(StoreError::Thread)?;
        Ok(Self {
            sender: Some(sender),
            thread: Some(thread),
            commits,
            waiting,
            #[cfg(test)]
            requests: AtomicU64::new(0),
            reserve_released,
        })
    }

    /// Whether the disk reserve is released now: the disk filled up, requests that store new
    /// payloads are refused, and draining runs on the reserve's room.
    pub(crate) fn reserve_released(&self) -> bool {
        self.reserve_released.load(Ordering::SeqCst)
    }

    /// Requests submitted so far.
    #[cfg(test)]
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Commits made so far (batches, not requests).
    pub(crate) fn commits(&self) -> u64 {
        self.commits.load(Ordering::SeqCst)
    }

    /// Runs `work` in the next commit and returns its result once that commit is durable.
    pub(crate) async fn run<R, F>(
        &self,
        room: Room,
        weight: usize,
        work: F,
    ) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<R, StoreError> + Send + 'static,
    {
        let (reply, result) = oneshot::channel::<Result<R, StoreError>>();
        let load = Load::Fixed {
            callers: 1,
            records: weight,
        };
        self.submit(room, load, work, move |outcome| {
            let _ = reply.send(outcome);
        });
        result.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `work` in the next commit and hands its result to `done` once that commit is
    /// durable, on the writer thread (so `done` must be quick). `done` is called exactly once:
    /// with the error instead when `work` fails, the commit fails, the request is refused
    /// without running `work`, or the writer is gone (then at once, on the caller's thread).
    pub(crate) fn submit<R, F, D>(&self, room: Room, load: Load, work: F, done: D)
    where
        R: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<R, StoreError> + Send + 'static,
        D: FnOnce(Result<R, StoreError>) + Send + 'static,
    {
        let work: Work = Box::new(move |txn| match txn.map(work) {
            None => Ran {
                failure: None,
                completion: Box::new(move |commit| {
                    let error = match commit {
                        Err(failure) => failure.into(),
                        Ok(()) => StoreError::Abandoned("the transaction did not start".into()),
                    };
                    done(Err(error));
                }),
            },
            Some(Ok(value)) => Ran {
                failure: None,
                completion: Box::new(move |commit| {
                    done(commit.map(|()| value).map_err(StoreError::from));
                }),
            },
            Some(Err(error)) => Ran {
                failure: Some(CommitFailure::new(&error)),
                completion: Box::new(move |_| done(Err(error))),
            },
        });
        #[cfg(test)]
        self.requests.fetch_add(1, Ordering::SeqCst);
        let Some(sender) = self.sender.as_ref() else {
            ((work)(None).completion)(Err(CommitFailure::closed()));
            return;
        };
        if let Err(mpsc::SendError(Message::Job(job))) =
            sender.send(Message::Job(Job { room, load, work }))
        {
            job.refuse(&CommitFailure::closed());
        }
    }

    /// Tells the writer that a combined request it may be holding grew, so a batch waiting for
    /// more callers can close as soon as they are in. Only while the writer waits: a message
    /// per caller would wake it for every one. The writer raises `waiting` before it reads the
    /// batch's load and the caller grows the load before it reads `waiting` (both SeqCst), so
    /// either the writer sees the caller or the caller sees the writer waiting.
    pub(crate) fn grown(&self) {
        if self.waiting.load(Ordering::SeqCst)
            && let Some(sender) = &self.sender
        {
            let _ = sender.send(Message::Grown);
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.sender.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer's view of its storage: whether the database is open, whether the reserve is on
/// disk, and when to try to bring either back.
struct Health {
    /// The open database; `None` between a failed write and a successful reopen.
    db: Option<Arc<Database>>,
    slot: Arc<DbSlot>,
    opener: Opener,
    /// What requests hear while `db` is `None`.
    closed: Option<CommitFailure>,
    reopen_at: Instant,
    reopen_backoff: Backoff,
    reserve: Option<Reserve>,
    /// Whether the reserve is released (then [`Room::Grows`] requests are refused).
    released: bool,
    /// `released`, readable from other threads (see [`Writer::reserve_released`]).
    released_flag: Arc<AtomicBool>,
    refill_at: Instant,
    refill_backoff: Backoff,
}

impl Health {
    fn new(storage: Storage) -> Self {
        let (reserve, held) = match storage.reserve {
            Some((reserve, held)) => (Some(reserve), held),
            None => (None, true),
        };
        let now = Instant::now();
        Self {
            db: Some(storage.db),
            slot: storage.slot,
            opener: storage.opener,
            closed: None,
            reopen_at: now,
            reopen_backoff: Backoff::new(),
            reserve,
            released: !held,
            released_flag: Arc::new(AtomicBool::new(!held)),
            refill_at: now,
            refill_backoff: Backoff::new(),
        }
    }

    /// When the writer should wake without a request, to retry a reopen or a refill.
    fn wake_at(&self) -> Option<Instant> {
        match self.closed {
            Some(_) => Some(self.reopen_at),
            // A refill waits for the reopen (see `heal`), so its time counts only once open.
            None => self.released.then_some(self.refill_at),
        }
    }

    /// Reopens the database and writes the reserve again, each once its wait has passed.
    fn heal(&mut self) {
        let now = Instant::now();
        if self.closed.is_some() && now >= self.reopen_at {
            match self.opener.open() {
                Ok(db) => {
                    let db = Arc::new(db);
                    self.slot.open(Arc::clone(&db));
                    self.db = Some(db);
                    self.closed = None;
                    self.reopen_backoff = Backoff::new();
                }
                Err(_) => self.reopen_at = now + self.reopen_backoff.next(),
            }
        }
        // Only with the database open: the reserve takes room a reopen might need.
        if self.released && self.closed.is_none() && now >= self.refill_at {
            let filled = self.reserve.as_ref().is_some_and(|r| r.refill().is_ok());
            if filled {
                self.released = false;
                self.released_flag.store(false, Ordering::SeqCst);
                self.refill_backoff = Backoff::new();
            } else {
                self.refill_at = now + self.refill_backoff.next();
            }
        }
    }

    /// Reacts to a failed batch: an I/O error closes the database (reopened by [`heal`]), a
    /// full disk also releases the reserve.
    ///
    /// [`heal`]: Self::heal
    fn failed(&mut self, failure: &CommitFailure) {
        if !failure.io {
            return;
        }
        let closed = failure.reopening();
        self.slot.close(closed.clone());
        // The last handle but readers' goes here; redb closes the file when they finish.
        self.db = None;
        self.closed = Some(closed);
        if failure.disk_full
            && !self.released
            && let Some(reserve) = &self.reserve
        {
            // Before the reopen: opening may itself need to write.
            reserve.release();
            self.released = true;
            self.released_flag.store(true, Ordering::SeqCst);
            self.refill_backoff = Backoff::new();
            self.refill_at = Instant::now() + self.refill_backoff.next();
        }
        self.reopen_at = Instant::now();
        self.heal();
    }

    /// Commits a batch, or fails it at once while the database is closed; requests that need
    /// room are refused while the reserve is released.
    fn commit(&mut self, batch: Vec<Job>, commits: &AtomicU64) {
        let Some(db) = self.db.clone() else {
            let failure = self.closed.clone().unwrap_or_else(|| {
                CommitFailure::new(&StoreError::Abandoned("the database is closed".into()))
            });
            for job in batch {
                job.refuse(&failure);
            }
            return;
        };
        let batch = if self.released {
            let (grows, drains): (Vec<Job>, Vec<Job>) =
                batch.into_iter().partition(|job| job.room == Room::Grows);
            let refused = CommitFailure::reserve_in_use();
            for job in grows {
                job.refuse(&refused);
            }
            drains
        } else {
            batch
        };
        if batch.is_empty() {
            return;
        }
        let (verdict, completions) = commit_batch(&db, batch, commits);
        if let Err(failure) = &verdict {
            drop(db);
            // Before any caller hears of the failure: one refused for a full disk then finds
            // the reserve reported in use.
            self.failed(failure);
        }
        for completion in completions {
            completion(verdict.clone());
        }
    }
}

/// What the writer thread reads requests from.
struct Inbox {
    receiver: Receiver<Message>,
    /// Raised while the writer waits for callers to join its batch (see [`Writer::grown`]).
    waiting: Arc<AtomicBool>,
}

fn writer_loop(mut health: Health, inbox: &Inbox, config: GroupCommit, commits: &AtomicU64) {
    let receiver = &inbox.receiver;
    // Waiting pays only while more requests can still come. Producers blocked on the previous
    // commit come back together, so once the batch has as many callers as the previous one,
    // waiting longer mostly delays everyone (PostgreSQL's `commit_siblings` idea, adapted): a
    // lone producer never waits, N steady producers commit as soon as all N are in, and a
    // growing load still grows the batch through what is already queued.
    let mut expected = usize::MAX;
    loop {
        let first = match health.wake_at() {
            None => match receiver.recv() {
                Ok(message) => Some(message),
                Err(_) => return,
            },
            Some(at) => match receiver.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(message) => Some(message),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            },
        };
        health.heal();
        let Some(Message::Job(first)) = first else {
            continue;
        };
        let (batch, callers) = collect_batch(first, inbox, config, expected);
        expected = callers;
        health.commit(batch, commits);
    }
}

/// The load of a batch being collected: fixed loads summed as they come, growing ones read
/// again on each look.
#[derive(Default)]
struct BatchLoad {
    callers: usize,
    records: usize,
    growing: Vec<Arc<GrowingLoad>>,
}

impl BatchLoad {
    fn add(&mut self, load: &Load) {
        match load {
            Load::Fixed { callers, records } => {
                self.callers = self.callers.saturating_add(*callers);
                self.records = self.records.saturating_add(*records);
            }
            Load::Growing(load) => self.growing.push(Arc::clone(load)),
        }
    }

    /// Callers and records now.
    fn read(&self) -> (usize, usize) {
        self.growing
            .iter()
            .fold((self.callers, self.records), |(callers, records), load| {
                let (more_callers, more_records) = load.read();
                (
                    callers.saturating_add(more_callers),
                    records.saturating_add(more_records),
                )
            })
    }
}

/// Takes what is queued, then, while the batch holds fewer than `expected` callers, waits up to
/// `max_wait` from the first request for more. Returns the batch and how many callers it held.
fn collect_batch(
    first: Job,
    inbox: &Inbox,
    config: GroupCommit,
    expected: usize,
) -> (Vec<Job>, usize) {
    let receiver = &inbox.receiver;
    let deadline = Instant::now() + config.max_wait;
    let mut load = BatchLoad::default();
    load.add(&first.load);
    let mut batch = vec![first];
    loop {
        let (callers, records) = load.read();
        if records >= config.max_batch {
            return (batch, callers);
        }
        let message = match receiver.try_recv() {
            Ok(message) => message,
            Err(TryRecvError::Disconnected) => return (batch, callers),
            Err(TryRecvError::Empty) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if callers >= expected || left.is_zero() {
                    return (batch, callers);
                }
                // Raised before the load is read again: a caller joining after that read sees
                // it and sends word.
                inbox.waiting.store(true, Ordering::SeqCst);
                let (callers, _) = load.read();
                if callers >= expected {
                    inbox.waiting.store(false, Ordering::SeqCst);
                    return (batch, callers);
                }
                let received = receiver.recv_timeout(left);
                inbox.waiting.store(false, Ordering::SeqCst);
                match received {
                    Ok(message) => message,
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                        return (batch, load.read().0);
                    }
                }
            }
        };
        if let Message::Job(job) = message {
            load.add(&job.load);
            batch.push(job);
        }
    }
}

/// Runs and commits one batch, counting the commit; returns the verdict and the completions to
/// deliver it to, which the caller runs once it has reacted to a failure.
fn commit_batch(
    db: &Database,
    batch: Vec<Job>,
    commits: &AtomicU64,
) -> (Result<(), CommitFailure>, Vec<Completion>) {
    let mut txn = match begin(db) {
        Ok(txn) => txn,
        Err(error) => {
            let failure = CommitFailure::new(&error);
            let completions = batch
                .into_iter()
                .map(|job| (job.work)(None).completion)
                .collect();
            return (Err(failure), completions);
        }
    };
    let mut ran = Vec::with_capacity(batch.len());
    let mut failure = None;
    for job in batch {
        let outcome = (job.work)(Some(&txn));
        if failure.is_none() {
            failure.clone_from(&outcome.failure);
        }
        ran.push(outcome);
    }
    let verdict = match failure {
        Some(reason) => {
            // Dropped, not `abort()`ed: after an I/O error inside the transaction (a full disk
            // met by an insert) redb marks the database for recovery, and an explicit abort then
            // trips an assertion that kills the writer thread, while the drop skips the rollback
            // (the reopen that follows recovers the file).
            drop(txn);
            Err(reason)
        }
        None => {
            txn.set_quick_repair(true);
            txn.commit()
                .map_err(|error| CommitFailure::new(&StoreError::from(error)))
        }
    };
    if verdict.is_ok() {
        commits.fetch_add(1, Ordering::SeqCst);
    }
    (
        verdict,
        ran.into_iter().map(|outcome| outcome.completion).collect(),
    )
}

fn begin(db: &Database) -> Result<WriteTransaction, StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    Ok(txn)
}
