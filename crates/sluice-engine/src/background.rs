//! Work a step starts and does not wait for (a wire tap's copy), counted so the flow test runner
//! can wait until it has finished before checking what reached the targets.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// The background tasks of one runtime, kept in its [`sluice_core::Resources`].
#[derive(Default)]
pub struct Background {
    running: AtomicUsize,
    idle: Notify,
}

/// Decrements the count when the task ends, even if it panicked or was cancelled.
struct Running(Arc<Background>);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Background {
    /// Spawns `work` on the current tokio runtime and counts it until it ends.
    pub fn spawn(self: &Arc<Self>, work: impl Future<Output = ()> + Send + 'static) {
        self.running.fetch_add(1, Ordering::AcqRel);
        let guard = Running(Arc::clone(self));
        tokio::spawn(async move {
            let _guard = guard;
            work.await;
        });
    }

    /// Tasks still running.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// Resolves once no task is running.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so a task ending in between still wakes us.
            notified.as_mut().enable();
            if self.running() == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_every_task() {
        let background = Arc::new(Background::default());
        background.idle().await;
        let done = Arc::new(AtomicUsize::new(0));
        for ms in [10, 30] {
            let done = Arc::clone(&done);
            background.spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert_eq!(background.running(), 2);
        background.idle().await;
        assert_eq!(done.load(Ordering::SeqCst), 2);
        assert_eq!(background.running(), 0);
    }
}
