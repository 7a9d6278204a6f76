//! Redelivery policy (EIP/Camel "redelivery"): retries a step or a target on retryable failures
//! with capped exponential backoff and jitter.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use sluice_core::duration::HumanDuration;
use sluice_core::{ErrorKind, Failure, Message, Outputs, ProcessError, Processor, Sink};

use super::headers;

/// The failures retried when `on` is not given: the remote side may recover.
pub const DEFAULT_RETRY_ON: [ErrorKind; 4] = [
    ErrorKind::Unavailable,
    ErrorKind::Timeout,
    ErrorKind::Remote,
    ErrorKind::Io,
];

/// A `retry:` block, validated against [`super::retry_fields`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub backoff: HumanDuration,
    /// Each further delay is the previous one times this.
    pub multiplier: f64,
    /// No delay is longer than this.
    pub max_backoff: HumanDuration,
    /// Fraction (0 to 1) of each delay that is randomly taken off, so many failing messages do
    /// not retry in lockstep.
    pub jitter: f64,
    /// Error kinds that are retried; others fail at once.
    #[serde(default)]
    pub on: Option<Vec<ErrorKind>>,
}

impl RetryPolicy {
    /// Whether a failure of `kind` is retried.
    pub fn retries(&self, kind: ErrorKind) -> bool {
        match &self.on {
            Some(kinds) => kinds.contains(&kind),
            None => DEFAULT_RETRY_ON.contains(&kind),
        }
    }

    /// The upper bound of the delay after failed attempt `attempt` (1-based), before jitter.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let base = self.backoff.0.as_secs_f64();
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = base * self.multiplier.powi(exponent);
        let cap = self.max_backoff.0;
        if secs.is_finite() && secs < cap.as_secs_f64() {
            Duration::from_secs_f64(secs.max(0.0))
        } else {
            cap
        }
    }

    /// The delay after failed attempt `attempt`: the ceiling minus a random share of `jitter`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let cut = self.jitter.clamp(0.0, 1.0) * fastrand::f64();
        ceiling.mul_f64(1.0 - cut)
    }
}

/// A step retried by a policy.
pub struct RetryStep {
    inner: Arc<dyn Processor>,
    policy: RetryPolicy,
}

impl RetryStep {
    /// Retries `inner` by `policy`.
    pub fn new(inner: Arc<dyn Processor>, policy: RetryPolicy) -> Self {
        RetryStep { inner, policy }
    }
}

#[async_trait]
impl Processor for RetryStep {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let mut msg = msg;
        let mut attempt = 1;
        loop {
            match self.inner.process(msg).await {
                Ok(outputs) => return Ok(outputs),
                Err(mut failure) => {
                    // The step hands its input back with the failure; that is what is retried.
                    headers::record_failure(&mut failure.message, &failure.error, attempt);
                    if attempt >= self.policy.max_attempts
                        || !self.policy.retries(failure.error.kind)
                    {
                        return Err(failure);
                    }
                    tokio::time::sleep(self.policy.delay(attempt)).await;
                    attempt += 1;
                    msg = failure.message;
                }
            }
        }
    }
}

/// A target retried by a policy.
pub struct RetrySink {
    inner: Arc<dyn Sink>,
    policy: RetryPolicy,
}

impl RetrySink {
    /// Retries `inner` by `policy`.
    pub fn new(inner: Arc<dyn Sink>, policy: RetryPolicy) -> Self {
        RetrySink { inner, policy }
    }
}

#[async_trait]
impl Sink for RetrySink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        let mut attempt = 1;
        loop {
            match self.inner.deliver(msg).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < self.policy.max_attempts && self.policy.retries(e.kind) => {
                    tokio::time::sleep(self.policy.delay(attempt)).await;
                    attempt += 1;
                }
                // A target cannot change the message it is handed, so the count goes in the text.
                Err(mut e) => {
                    if attempt > 1 {
                        e.detail = format!("{} (after {attempt} attempts)", e.detail);
                    }
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::time::Instant;

    fn policy(max_attempts: u32, on: Option<Vec<ErrorKind>>) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            backoff: HumanDuration(Duration::from_millis(100)),
            multiplier: 2.0,
            max_backoff: HumanDuration(Duration::from_millis(300)),
            jitter: 0.0,
            on,
        }
    }

    /// Fails with `kind` until `succeed_at` (1-based), recording when each attempt started.
    struct Flaky {
        calls: AtomicU32,
        succeed_at: u32,
        kind: ErrorKind,
        started: std::sync::Mutex<Vec<Instant>>,
    }

    impl Flaky {
        fn new(succeed_at: u32, kind: ErrorKind) -> Arc<Self> {
            Arc::new(Flaky {
                calls: AtomicU32::new(0),
                succeed_at,
                kind,
                started: std::sync::Mutex::default(),
            })
        }
    }

    #[async_trait]
    impl Processor for Flaky {
        async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
            self.started.lock().unwrap().push(Instant::now());
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if n >= self.succeed_at {
                Ok(std::iter::once(msg).collect())
            } else {
                Err(Failure::new(msg, ProcessError::new(self.kind, "down")))
            }
        }
    }

    #[async_trait]
    impl Sink for Flaky {
        async fn deliver(&self, _msg: &Message) -> Result<(), ProcessError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if n >= self.succeed_at {
                Ok(())
            } else {
                Err(ProcessError::new(self.kind, "down"))
            }
        }
    }

    #[test]
    fn delays_grow_by_the_multiplier_up_to_the_cap() {
        let p = policy(10, None);
        let ms: Vec<u128> = (1..=4).map(|a| p.ceiling(a).as_millis()).collect();
        assert_eq!(ms, [100, 200, 300, 300]);
        let jittered = RetryPolicy { jitter: 0.5, ..p };
        for _ in 0..100 {
            let d = jittered.delay(2).as_millis();
            assert!((100..=200).contains(&d), "{d}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_exactly_until_success_with_the_backoff_between() {
        let flaky = Flaky::new(3, ErrorKind::Unavailable);
        let step = RetryStep::new(flaky.clone(), policy(5, None));
        let start = Instant::now();
        let out = step
            .process(Message::json(serde_json::json!(1)))
            .await
            .unwrap();
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 3);
        let offsets: Vec<u128> = flaky
            .started
            .lock()
            .unwrap()
            .iter()
            .map(|t| (*t - start).as_millis())
            .collect();
        assert_eq!(offsets, [0, 100, 300]);
        assert_eq!(out[0].headers[headers::ATTEMPTS], "2");
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_attempts_and_records_them() {
        let flaky = Flaky::new(u32::MAX, ErrorKind::Timeout);
        let step = RetryStep::new(flaky.clone(), policy(4, None));
        let failure = step
            .process(Message::json(serde_json::json!(1)))
            .await
            .unwrap_err();
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 4);
        assert_eq!(failure.error.kind, ErrorKind::Timeout);
        let h = &failure.message.headers;
        assert_eq!(h[headers::ATTEMPTS], "4");
        assert_eq!(h[headers::LAST_ERROR], "down");
        assert!(h[headers::FIRST_FAILURE] <= h[headers::LAST_FAILURE]);
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_retry_other_kinds() {
        let flaky = Flaky::new(u32::MAX, ErrorKind::InvalidInput);
        let step = RetryStep::new(flaky.clone(), policy(4, None));
        step.process(Message::json(serde_json::json!(1)))
            .await
            .unwrap_err();
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 1);

        let flaky = Flaky::new(u32::MAX, ErrorKind::InvalidInput);
        let step = RetryStep::new(
            flaky.clone(),
            policy(2, Some(vec![ErrorKind::InvalidInput])),
        );
        step.process(Message::json(serde_json::json!(1)))
            .await
            .unwrap_err();
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_targets_and_names_the_attempts() {
        let flaky = Flaky::new(2, ErrorKind::Io);
        let sink = RetrySink::new(flaky.clone(), policy(3, None));
        sink.deliver(&Message::json(serde_json::json!(1)))
            .await
            .unwrap();
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 2);

        let flaky = Flaky::new(u32::MAX, ErrorKind::Io);
        let sink = RetrySink::new(flaky.clone(), policy(3, None));
        let e = sink
            .deliver(&Message::json(serde_json::json!(1)))
            .await
            .unwrap_err();
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 3);
        assert!(e.detail.ends_with("(after 3 attempts)"), "{}", e.detail);
    }
}
