//! Combining: the appends (or acks) of one channel that callers make while the writer is busy
//! run as one request of the next commit. One request looks up the channel's state and opens its
//! tables once for all of them, where one request per caller would do that per caller: with a
//! hundred producers on one channel, most of a commit's work.
//!
//! The first caller to find nothing pending submits a request to the writer; callers arriving
//! before the writer runs it add their items to it. When the writer runs the request it takes
//! everything pending (later callers then submit the next request), runs the operation once over
//! all items in arrival order, and after the commit hands each caller the results of its own
//! items, or the commit's error. Combined callers share their commit's fate, as callers of one
//! group commit always do.

use std::sync::{Arc, Mutex, MutexGuard};

use redb::WriteTransaction;
use tokio::sync::oneshot;

use crate::error::StoreError;
use crate::writer::{self, GrowingLoad, Load, Room, Writer};

/// The operation run over the combined items: one result per item, in order.
pub(crate) type Operation<T, R> =
    dyn Fn(&WriteTransaction, &[T]) -> Result<Vec<R>, StoreError> + Send + Sync;

/// Combines one kind of request on one channel.
pub(crate) struct Combiner<T, R> {
    room: Room,
    operation: Arc<Operation<T, R>>,
    pending: Arc<Mutex<Pending<T, R>>>,
}

type Reply<R> = oneshot::Sender<Result<Vec<R>, StoreError>>;

/// Each waiting caller: how many of the items are its (they are contiguous), and its reply.
type Waiters<R> = Vec<(usize, Reply<R>)>;

struct Pending<T, R> {
    items: Vec<T>,
    waiters: Waiters<R>,
    /// The load of the request that will take `items` (`None`: no request submitted).
    submitted: Option<Arc<GrowingLoad>>,
}

impl<T, R> Default for Pending<T, R> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            waiters: Vec::new(),
            submitted: None,
        }
    }
}

impl<T, R> Pending<T, R> {
    fn take(&mut self) -> (Vec<T>, Waiters<R>) {
        self.submitted = None;
        (
            std::mem::take(&mut self.items),
            std::mem::take(&mut self.waiters),
        )
    }
}

fn lock<T, R>(pending: &Mutex<Pending<T, R>>) -> MutexGuard<'_, Pending<T, R>> {
    // Nothing panics while holding the lock; a poisoned one still holds consistent state.
    pending
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<T: Send + 'static, R: Send + 'static> Combiner<T, R> {
    pub(crate) fn new(
        room: Room,
        operation: impl Fn(&WriteTransaction, &[T]) -> Result<Vec<R>, StoreError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self {
            room,
            operation: Arc::new(operation),
            pending: Arc::default(),
        }
    }

    /// Runs the operation over `items` in a commit, combined with other callers' items, and
    /// returns their results once that commit is durable.
    pub(crate) async fn run(&self, writer: &Writer, items: Vec<T>) -> Result<Vec<R>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let records = items.len().max(1);
        let submit = {
            let mut pending = lock(&self.pending);
            pending.waiters.push((items.len(), reply));
            pending.items.extend(items);
            match &pending.submitted {
                Some(load) => {
                    load.add(records);
                    None
                }
                None => {
                    let load = Arc::new(GrowingLoad::default());
                    load.add(records);
                    pending.submitted = Some(Arc::clone(&load));
                    Some(load)
                }
            }
        };
        match submit {
            Some(load) => self.submit(writer, load),
            None => writer.grown(),
        }
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Callers whose items no request has taken yet.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        lock(&self.pending).waiters.len()
    }

    fn submit(&self, writer: &Writer, load: Arc<GrowingLoad>) {
        // The waiters the request took, for `done` (empty if the writer never ran it).
        let taken: Arc<Mutex<Waiters<R>>> = Arc::default();
        let pending = Arc::clone(&self.pending);
        let operation = Arc::clone(&self.operation);
        let taken_by_work = Arc::clone(&taken);
        let work = move |txn: &WriteTransaction| {
            let (items, waiters) = lock(&pending).take();
            *taken_by_work
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = waiters;
            let results = operation(txn, &items)?;
            if results.len() != items.len() {
                return Err(StoreError::Abandoned(format!(
                    "a combined request returned {} results for {} items",
                    results.len(),
                    items.len()
                )));
            }
            Ok(results)
        };
        let pending = Arc::clone(&self.pending);
        let done = move |outcome: Result<Vec<R>, StoreError>| {
            let mut waiters = std::mem::take(
                &mut *taken
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            if waiters.is_empty() {
                // Refused before it ran: the pending callers share the refusal.
                waiters = lock(&pending).take().1;
            }
            answer(waiters, outcome);
        };
        writer.submit(self.room, Load::Growing(load), work, done);
    }
}

/// Hands each waiter its slice of the results, or the error.
fn answer<R>(waiters: Waiters<R>, outcome: Result<Vec<R>, StoreError>) {
    match outcome {
        Ok(results) => {
            let mut results = results.into_iter();
            for (count, reply) in waiters {
                let _ = reply.send(Ok(results.by_ref().take(count).collect()));
            }
        }
        Err(error) => {
            for (_, reply) in waiters {
                let _ = reply.send(Err(writer::retell(&error)));
            }
        }
    }
}
