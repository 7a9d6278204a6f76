//! Reconnecting to a broker or database: capped exponential backoff with jitter, health reports
//! and logs that do not flood.
//!
//! Every connector that holds a connection uses [`connect`] (or [`Backoff`] directly), so they all
//! behave alike when a service restarts: the first retry comes quickly, waits double up to a cap
//! of one second by default (a service that comes back is used again within about a second), and
//! jitter spreads many clients apart so a restarted broker is not hit by all of them at once.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use sluice_core::HealthHandle;
use tokio_util::sync::CancellationToken;

/// First wait after a failed attempt.
pub const DEFAULT_INITIAL: Duration = Duration::from_millis(100);
/// Longest wait between attempts.
pub const DEFAULT_MAX: Duration = Duration::from_secs(1);

/// Waits between connection attempts: doubling from `initial` up to `max`, each wait drawn
/// uniformly from its upper half ("equal jitter"), so it is never shorter than half the nominal
/// wait and never longer than `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(DEFAULT_INITIAL, DEFAULT_MAX)
    }
}

impl Backoff {
    /// A backoff from `initial` doubling up to `max` (`max` is raised to `initial` if smaller).
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            failures: 0,
        }
    }

    /// The longest wait between attempts.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// How many attempts failed since the last [`Backoff::reset`].
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let doublings = self.failures.min(20);
        self.failures = self.failures.saturating_add(1);
        let nominal = self.initial.saturating_mul(1u32 << doublings).min(self.max);
        let half = nominal / 2;
        let jitter_nanos = fastrand::u64(0..=half.as_nanos().min(u128::from(u64::MAX)) as u64);
        half + Duration::from_nanos(jitter_nanos)
    }

    /// A connection succeeded: the next failure starts again from `initial`.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Calls `attempt` until it succeeds, waiting by `backoff` between failures; `None` when
/// `shutdown` is cancelled first.
///
/// While it fails, the component is reported unhealthy on `health` with `what` (the service and
/// address, e.g. `RabbitMQ at amqp://127.0.0.1:5672`) and the error; a success clears it. The
/// first failure is logged as a warning, then every tenth, so a long outage does not flood the log.
pub async fn connect<T, E, F, Fut>(
    what: &str,
    health: &HealthHandle,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
    mut attempt: F,
) -> Option<T>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        let result = tokio::select! {
            biased;
            () = shutdown.cancelled() => return None,
            result = attempt() => result,
        };
        match result {
            Ok(value) => {
                if backoff.failures() > 0 {
                    tracing::info!(
                        service = what,
                        attempts = backoff.failures() + 1,
                        "connected again"
                    );
                }
                backoff.reset();
                health.healthy();
                return Some(value);
            }
            Err(e) => {
                let failures = backoff.failures();
                let delay = backoff.next_delay();
                let reason = format!(
                    "cannot reach {what}: {e}; retrying (backoff up to {})",
                    sluice_core::duration::HumanDuration(backoff.max())
                );
                if failures.is_multiple_of(10) {
                    tracing::warn!(service = what, error = %e, attempt = failures + 1, "connection failed; retrying");
                } else {
                    tracing::debug!(service = what, error = %e, attempt = failures + 1, "connection failed; retrying");
                }
                health.unhealthy(reason);
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::Resources;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn delays_double_within_jitter_and_stop_at_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let bounds = [
            (50, 100),
            (100, 200),
            (200, 400),
            (400, 800),
            (500, 1000),
            (500, 1000),
        ];
        for (low, high) in bounds {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(low) && d <= Duration::from_millis(high),
                "{d:?} not in {low}..={high} ms"
            );
        }
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_clients_apart() {
        let delays: std::collections::BTreeSet<Duration> = (0..20)
            .map(|_| {
                let mut b = Backoff::default();
                b.next_delay();
                b.next_delay()
            })
            .collect();
        assert!(delays.len() > 10, "20 clients drew only {delays:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn connect_reports_unhealthy_until_it_succeeds() {
        let resources = Resources::default();
        let health = HealthHandle::new(&resources, "f", "from");
        let calls = AtomicU32::new(0);
        let shutdown = CancellationToken::new();
        let mut backoff = Backoff::default();
        let seen_unhealthy = std::sync::Mutex::new(Vec::new());
        let value = connect(
            "Test at 127.0.0.1:1",
            &health,
            &shutdown,
            &mut backoff,
            || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                seen_unhealthy.lock().unwrap().push(health.is_healthy());
                async move {
                    if n < 3 {
                        Err("connection refused")
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(value, Some(3));
        assert!(health.is_healthy());
        // Before the first attempt nothing was reported; during the retries it was unhealthy.
        assert_eq!(
            *seen_unhealthy.lock().unwrap(),
            vec![true, false, false, false]
        );
        assert_eq!(backoff.failures(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn connect_gives_up_on_shutdown() {
        let resources = Resources::default();
        let health = HealthHandle::new(&resources, "f", "from");
        let shutdown = CancellationToken::new();
        let cancel = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            cancel.cancel();
        });
        let value: Option<()> = connect(
            "Test",
            &health,
            &shutdown,
            &mut Backoff::default(),
            || async { Err::<(), _>("refused") },
        )
        .await;
        assert_eq!(value, None);
        let problems = sluice_core::ComponentHealth::of(&resources).problems("f");
        assert!(
            problems[0].1.contains("cannot reach Test: refused"),
            "{problems:?}"
        );
    }
}
