//! Group commit: one thread owns every write transaction and packs the requests that arrive
//! within a bounded wait into one durable commit.
//!
//! A request is a closure run inside the shared transaction. Its result is held back until the
//! commit returns, so a caller never sees an id or an outcome that is not on disk. If any request
//! of a batch fails (a storage error), the whole transaction is rolled back and every request of
//! the batch fails: requests only ever fail for storage reasons, never for their input, so one
//! bad request cannot sink good ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, Durability, WriteTransaction};
use tokio::sync::oneshot;

use crate::error::StoreError;

/// How requests are packed into commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommit {
    /// How long the writer waits for more requests after the first one of a batch. Zero commits
    /// whatever is queued at once: lowest latency, fewer requests per fsync. The wait ends early
    /// once the batch holds as many requests as the previous commit did (so a lone producer
    /// never waits, and N steady producers commit as soon as all N are in).
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

/// Why a batch did not commit, as told to every request in it.
#[derive(Debug, Clone)]
struct CommitFailure {
    reason: String,
    disk_full: bool,
}

impl CommitFailure {
    fn new(error: &StoreError) -> Self {
        Self {
            reason: error.to_string(),
            disk_full: error.is_disk_full(),
        }
    }
}

impl From<CommitFailure> for StoreError {
    fn from(failure: CommitFailure) -> Self {
        if failure.disk_full {
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
    weight: usize,
    work: Work,
}

/// The handle to the writer thread. Dropping it lets the thread finish the queued requests and
/// waits for it, so the database file is closed when the store is gone.
pub(crate) struct Writer {
    sender: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    commits: Arc<AtomicU64>,
}

impl Writer {
    pub(crate) fn start(db: Arc<Database>, config: GroupCommit) -> Result<Self, StoreError> {
        let (sender, receiver) = mpsc::channel();
        let commits = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&commits);
        let thread = std::thread::Builder::new()
            .name("sluice-store-writer".into())
            .spawn(move || writer_loop(&db, &receiver, config, &counter))
            .map_err(StoreError::Thread)?;
        Ok(Self {
            sender: Some(sender),
            thread: Some(thread),
            commits,
        })
    }

    /// Commits made so far (batches, not requests).
    pub(crate) fn commits(&self) -> u64 {
        self.commits.load(Ordering::SeqCst)
    }

    /// Runs `work` in the next commit and returns its result once that commit is durable.
    pub(crate) async fn run<R, F>(&self, weight: usize, work: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<R, StoreError> + Send + 'static,
    {
        let (reply, result) = oneshot::channel::<Result<R, StoreError>>();
        let work: Work = Box::new(move |txn| match txn.map(work) {
            None => Ran {
                failure: None,
                completion: Box::new(move |commit| {
                    let error = match commit {
                        Err(failure) => failure.into(),
                        Ok(()) => StoreError::Abandoned("the transaction did not start".into()),
                    };
                    let _ = reply.send(Err(error));
                }),
            },
            Some(Ok(value)) => Ran {
                failure: None,
                completion: Box::new(move |commit| {
                    let _ = reply.send(commit.map(|()| value).map_err(StoreError::from));
                }),
            },
            Some(Err(error)) => Ran {
                failure: Some(CommitFailure::new(&error)),
                completion: Box::new(move |_| {
                    let _ = reply.send(Err(error));
                }),
            },
        });
        let sender = self.sender.as_ref().ok_or(StoreError::Closed)?;
        sender
            .send(Job { weight, work })
            .map_err(|_| StoreError::Closed)?;
        result.await.map_err(|_| StoreError::Closed)?
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

fn writer_loop(db: &Database, receiver: &Receiver<Job>, config: GroupCommit, commits: &AtomicU64) {
    // Waiting pays only while more requests can still come. Producers blocked on the previous
    // commit come back together, so once the batch is as large as the previous one, waiting
    // longer mostly delays everyone (PostgreSQL's `commit_siblings` idea, adapted): a lone
    // producer never waits, N steady producers commit as soon as all N are in, and a growing
    // load still grows the batch through what is already queued.
    let mut expected = usize::MAX;
    while let Ok(first) = receiver.recv() {
        let batch = collect_batch(first, receiver, config, expected);
        expected = batch.len();
        commit_batch(db, batch, commits);
    }
}

/// Takes what is queued, then, while the batch holds fewer than `expected` requests, waits up to
/// `max_wait` from the first request for more.
fn collect_batch(
    first: Job,
    receiver: &Receiver<Job>,
    config: GroupCommit,
    expected: usize,
) -> Vec<Job> {
    let deadline = Instant::now() + config.max_wait;
    let mut weight = first.weight;
    let mut batch = vec![first];
    while weight < config.max_batch {
        let next = match receiver.try_recv() {
            Ok(job) => job,
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {
                if batch.len() >= expected {
                    break;
                }
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    break;
                };
                if left.is_zero() {
                    break;
                }
                match receiver.recv_timeout(left) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        weight = weight.saturating_add(next.weight);
        batch.push(next);
    }
    batch
}

/// Runs and commits one batch, counting the commit before any caller hears of it.
fn commit_batch(db: &Database, batch: Vec<Job>, commits: &AtomicU64) {
    let mut txn = match begin(db) {
        Ok(txn) => txn,
        Err(error) => {
            let failure = CommitFailure::new(&error);
            for job in batch {
                ((job.work)(None).completion)(Err(failure.clone()));
            }
            return;
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
            let _ = txn.abort();
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
    for outcome in ran {
        (outcome.completion)(verdict.clone());
    }
}

fn begin(db: &Database) -> Result<WriteTransaction, StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    Ok(txn)
}
