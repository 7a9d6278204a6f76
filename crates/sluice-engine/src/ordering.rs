//! Per-key ordering for a flow's `ordered_by`: messages with the same key are processed one at a
//! time in the order they were admitted; different keys run in parallel.
//!
//! Each key keeps only the signal of its latest admitted message. A new message takes that
//! signal (it waits for it) and leaves its own; finishing (or failing, or being cancelled) drops
//! the sender and wakes the next. A key's entry is removed when its latest message finishes, so
//! memory follows the keys in flight, not every key ever seen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// The queues of one flow.
#[derive(Default)]
pub struct KeyedOrder {
    tails: Mutex<HashMap<String, (u64, oneshot::Receiver<()>)>>,
    next_seq: std::sync::atomic::AtomicU64,
}

/// A message's place in its key's queue; dropping it lets the next one go.
pub struct Turn {
    order: Arc<KeyedOrder>,
    key: String,
    seq: u64,
    wait: Option<oneshot::Receiver<()>>,
    _done: oneshot::Sender<()>,
}

impl KeyedOrder {
    /// Takes the next place for `key`; synchronous, so the caller's order is the order.
    pub fn join(self: &Arc<Self>, key: String) -> Turn {
        let seq = self
            .next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (done, signal) = oneshot::channel();
        let wait = match self.tails.lock() {
            Ok(mut tails) => tails.insert(key.clone(), (seq, signal)).map(|(_, rx)| rx),
            // A poisoned map cannot order; run unordered rather than stall.
            Err(_) => None,
        };
        Turn {
            order: Arc::clone(self),
            key,
            seq,
            wait,
            _done: done,
        }
    }

    /// Keys with a message in flight.
    pub fn keys_in_flight(&self) -> usize {
        self.tails.lock().map_or(0, |t| t.len())
    }
}

impl Turn {
    /// Waits until every earlier message of the key has finished.
    pub async fn ready(&mut self) {
        if let Some(wait) = self.wait.take() {
            // An error only means the earlier message is gone: our turn either way.
            let _ = wait.await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Ok(mut tails) = self.order.tails.lock()
            && tails
                .get(&self.key)
                .is_some_and(|(seq, _)| *seq == self.seq)
        {
            tails.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn same_key_runs_in_admission_order_other_keys_in_parallel() {
        let order = Arc::new(KeyedOrder::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // a1 is slow; a2 must wait for it, b1 must not.
        for (key, name, ms) in [("a", "a1", 50), ("a", "a2", 0), ("b", "b1", 0)] {
            let mut turn = order.join(key.into());
            let log = Arc::clone(&log);
            tasks.push(tokio::spawn(async move {
                turn.ready().await;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                log.lock().unwrap().push(name);
                drop(turn);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*log.lock().unwrap(), ["b1", "a1", "a2"]);
        assert_eq!(order.keys_in_flight(), 0, "finished keys are forgotten");
    }

    #[tokio::test]
    async fn a_cancelled_message_does_not_block_its_key() {
        let order = Arc::new(KeyedOrder::default());
        let first = order.join("k".into());
        let mut second = order.join("k".into());
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), second.ready())
            .await
            .unwrap();
    }
}
