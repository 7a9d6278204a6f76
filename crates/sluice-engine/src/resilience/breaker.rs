//! Circuit breaker around a step or a target: after too many failures in a window of recent
//! calls it *opens* and fails fast (or runs fallback steps) for a while, then lets a few trial
//! calls through (*half-open*) and closes again when they succeed.
//!
//! Count-based sliding window: the last `window` calls, judged once `minimum_calls` are in it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::Deserialize;
use sluice_core::duration::HumanDuration;
use sluice_core::{ErrorKind, Failure, Message, Outputs, ProcessError, Processor, Sink};
use tokio::time::Instant;

use super::retry::DEFAULT_RETRY_ON;

/// Set on a message that ran through a `fallback` because the circuit was open or the call
/// failed.
pub const FALLBACK_HEADER: &str = "sluice.circuit.fallback";

/// A `circuit_breaker:` block, validated against [`super::breaker_fields`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Percentage of failed calls in the window that opens the circuit.
    pub failure_rate: u32,
    /// Number of recent calls judged.
    pub window: u32,
    /// No judgement before this many calls are in the window.
    pub minimum_calls: u32,
    /// How long the circuit stays open before trial calls.
    pub open_for: HumanDuration,
    /// Trial calls let through when half-open; all must succeed to close.
    pub half_open_calls: u32,
    /// Error kinds that count as failures; others show the remote side answered.
    #[serde(default)]
    pub on: Option<Vec<ErrorKind>>,
    /// Steps run instead when the circuit is open or a call fails (built by the engine).
    #[serde(default)]
    pub fallback: Option<serde_json::Value>,
}

impl BreakerConfig {
    fn counts(&self, kind: ErrorKind) -> bool {
        match &self.on {
            Some(kinds) => kinds.contains(&kind),
            None => DEFAULT_RETRY_ON.contains(&kind),
        }
    }
}

/// Where a breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls go through; failures are counted.
    Closed,
    /// Calls fail fast until the open period ends.
    Open,
    /// A few trial calls go through.
    HalfOpen,
}

enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, succeeded: u32 },
}

struct Inner {
    phase: Phase,
    /// Recent outcomes while closed; `true` is a failure.
    recent: VecDeque<bool>,
}

/// One breaker, shared by every message through its step.
pub struct CircuitBreaker {
    name: String,
    config: BreakerConfig,
    inner: Mutex<Inner>,
    counters: Counters,
}

/// Running totals for metrics; never reset.
#[derive(Default)]
struct Counters {
    successes: AtomicU64,
    failures: AtomicU64,
    rejected: AtomicU64,
    opened: AtomicU64,
}

/// A breaker's totals since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BreakerCounts {
    /// Calls that succeeded (or failed with an error kind the breaker does not count).
    pub successes: u64,
    /// Calls that failed with an error kind the breaker counts.
    pub failures: u64,
    /// Calls refused because the circuit was open (or half-open and busy).
    pub rejected: u64,
    /// Times the circuit opened.
    pub opened: u64,
}

/// A breaker's name, state and totals at one moment.
#[derive(Debug, Clone)]
pub struct BreakerSnapshot {
    /// `flow/step`.
    pub name: String,
    /// The state the next call would see.
    pub state: CircuitState,
    /// Totals since the process started.
    pub counts: BreakerCounts,
}

/// Admission to make one call; records a failure if dropped without an outcome (the call was
/// cancelled, so it proved nothing good).
struct Call<'a> {
    breaker: &'a CircuitBreaker,
    trial: bool,
    recorded: bool,
}

impl Call<'_> {
    fn record(mut self, failed: bool) {
        self.recorded = true;
        self.breaker.record(self.trial, failed);
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            self.breaker.record(self.trial, true);
        }
    }
}

impl CircuitBreaker {
    /// A closed breaker named `name` (`flow/step`, for logs and state listings).
    pub fn new(name: String, config: BreakerConfig) -> Self {
        CircuitBreaker {
            name,
            config,
            inner: Mutex::new(Inner {
                phase: Phase::Closed,
                recent: VecDeque::new(),
            }),
            counters: Counters::default(),
        }
    }

    /// Totals since the process started.
    pub fn counts(&self) -> BreakerCounts {
        let c = &self.counters;
        BreakerCounts {
            successes: c.successes.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            opened: c.opened.load(Ordering::Relaxed),
        }
    }

    /// The current state, as the next call would see it.
    pub fn state(&self) -> CircuitState {
        let Ok(inner) = self.inner.lock() else {
            return CircuitState::Open;
        };
        match inner.phase {
            Phase::Closed => CircuitState::Closed,
            Phase::Open { until } if Instant::now() >= until => CircuitState::HalfOpen,
            Phase::Open { .. } => CircuitState::Open,
            Phase::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// Admits a call, or says how long the circuit stays open.
    fn admit(&self) -> Result<Call<'_>, std::time::Duration> {
        let admitted = self.try_admit();
        if admitted.is_err() {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }

    fn try_admit(&self) -> Result<Call<'_>, std::time::Duration> {
        let Ok(mut inner) = self.inner.lock() else {
            return Err(self.config.open_for.0);
        };
        let now = Instant::now();
        let trial = match inner.phase {
            Phase::Closed => false,
            Phase::Open { until } if now < until => return Err(until - now),
            Phase::Open { .. } => {
                tracing::info!(breaker = %self.name, "circuit half-open: letting trial calls through");
                inner.phase = Phase::HalfOpen {
                    in_flight: 1,
                    succeeded: 0,
                };
                true
            }
            Phase::HalfOpen {
                ref mut in_flight, ..
            } => {
                if *in_flight >= self.config.half_open_calls {
                    return Err(std::time::Duration::ZERO);
                }
                *in_flight += 1;
                true
            }
        };
        Ok(Call {
            breaker: self,
            trial,
            recorded: false,
        })
    }

    fn record(&self, trial: bool, failed: bool) {
        let outcome = if failed {
            &self.counters.failures
        } else {
            &self.counters.successes
        };
        outcome.fetch_add(1, Ordering::Relaxed);
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let open_until = Instant::now() + self.config.open_for.0;
        match (&mut inner.phase, trial) {
            (Phase::HalfOpen { .. }, true) if failed => {
                tracing::warn!(breaker = %self.name, "circuit re-opened: a trial call failed");
                inner.phase = Phase::Open { until: open_until };
                self.counters.opened.fetch_add(1, Ordering::Relaxed);
            }
            (Phase::HalfOpen { succeeded, .. }, true) => {
                *succeeded += 1;
                if *succeeded >= self.config.half_open_calls {
                    tracing::info!(breaker = %self.name, "circuit closed: trial calls succeeded");
                    inner.phase = Phase::Closed;
                    inner.recent.clear();
                }
            }
            (Phase::Closed, false) => {
                inner.recent.push_back(failed);
                let window = usize::try_from(self.config.window).unwrap_or(usize::MAX);
                while inner.recent.len() > window {
                    inner.recent.pop_front();
                }
                let calls = inner.recent.len();
                let failures = inner.recent.iter().filter(|f| **f).count();
                let minimum = usize::try_from(self.config.minimum_calls).unwrap_or(usize::MAX);
                let rate = usize::try_from(self.config.failure_rate).unwrap_or(100);
                if calls >= minimum && failures * 100 >= rate * calls {
                    tracing::warn!(
                        breaker = %self.name,
                        failures,
                        calls,
                        open_for = ?self.config.open_for.0,
                        "circuit opened"
                    );
                    inner.phase = Phase::Open { until: open_until };
                    inner.recent.clear();
                    self.counters.opened.fetch_add(1, Ordering::Relaxed);
                }
            }
            // An outcome from before the state changed says nothing about the new state.
            _ => {}
        }
    }

    fn open_error(&self, retry_in: std::time::Duration) -> ProcessError {
        ProcessError::new(
            ErrorKind::Unavailable,
            format!(
                "circuit breaker `{}` is open; calls resume in {} ms",
                self.name,
                retry_in.as_millis()
            ),
        )
    }
}

/// Every breaker of the process by name, so their states can be listed (metrics, management).
#[derive(Default)]
pub struct CircuitBreakers(Mutex<BTreeMap<String, Arc<CircuitBreaker>>>);

impl CircuitBreakers {
    /// Registers a breaker.
    pub fn insert(&self, breaker: Arc<CircuitBreaker>) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(breaker.name.clone(), breaker);
        }
    }

    /// Each breaker's name, state and totals, by name.
    pub fn snapshots(&self) -> Vec<BreakerSnapshot> {
        self.0
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(name, b)| BreakerSnapshot {
                        name: name.clone(),
                        state: b.state(),
                        counts: b.counts(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A step behind a breaker.
pub struct BreakerStep {
    breaker: Arc<CircuitBreaker>,
    inner: Arc<dyn Processor>,
    fallback: Option<Arc<dyn Processor>>,
}

impl BreakerStep {
    /// `inner` behind `breaker`, with optional fallback steps.
    pub fn new(
        breaker: Arc<CircuitBreaker>,
        inner: Arc<dyn Processor>,
        fallback: Option<Arc<dyn Processor>>,
    ) -> Self {
        BreakerStep {
            breaker,
            inner,
            fallback,
        }
    }

    async fn fall_back(&self, mut msg: Message, error: ProcessError) -> Result<Outputs, Failure> {
        match &self.fallback {
            Some(fallback) => {
                msg.headers
                    .insert(FALLBACK_HEADER.to_owned(), error.to_string());
                fallback.process(msg).await
            }
            None => Err(Failure::new(msg, error)),
        }
    }
}

#[async_trait]
impl Processor for BreakerStep {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let call = match self.breaker.admit() {
            Ok(call) => call,
            Err(retry_in) => {
                let error = self.breaker.open_error(retry_in);
                return self.fall_back(msg, error).await;
            }
        };
        match self.inner.process(msg).await {
            Ok(outputs) => {
                call.record(false);
                Ok(outputs)
            }
            Err(failure) => {
                let counted = self.breaker.config.counts(failure.error.kind);
                call.record(counted);
                if counted {
                    self.fall_back(failure.message, failure.error).await
                } else {
                    Err(failure)
                }
            }
        }
    }
}

/// A target behind a breaker (no fallback: a target has no outputs to replace).
pub struct BreakerSink {
    breaker: Arc<CircuitBreaker>,
    inner: Arc<dyn Sink>,
}

impl BreakerSink {
    /// `inner` behind `breaker`.
    pub fn new(breaker: Arc<CircuitBreaker>, inner: Arc<dyn Sink>) -> Self {
        BreakerSink { breaker, inner }
    }
}

#[async_trait]
impl Sink for BreakerSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        let call = self
            .breaker
            .admit()
            .map_err(|retry_in| self.breaker.open_error(retry_in))?;
        let result = self.inner.deliver(msg).await;
        call.record(matches!(&result, Err(e) if self.breaker.config.counts(e.kind)));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::time::Duration;

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_rate: 50,
            window: 4,
            minimum_calls: 4,
            open_for: HumanDuration(Duration::from_secs(10)),
            half_open_calls: 2,
            on: None,
            fallback: None,
        }
    }

    /// Fails with `unavailable` while `down` is set; counts calls.
    #[derive(Default)]
    struct Remote {
        down: AtomicBool,
        calls: AtomicU32,
    }

    #[async_trait]
    impl Processor for Remote {
        async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                Err(Failure::new(
                    msg,
                    ProcessError::new(ErrorKind::Unavailable, "down"),
                ))
            } else {
                Ok(std::iter::once(msg).collect())
            }
        }
    }

    fn setup(
        fallback: Option<Arc<dyn Processor>>,
    ) -> (Arc<Remote>, Arc<CircuitBreaker>, BreakerStep) {
        let remote = Arc::new(Remote::default());
        let breaker = Arc::new(CircuitBreaker::new("f/call".into(), config()));
        let step = BreakerStep::new(Arc::clone(&breaker), remote.clone(), fallback);
        (remote, breaker, step)
    }

    async fn call(step: &BreakerStep) -> Result<Outputs, Failure> {
        step.process(Message::json(serde_json::json!({}))).await
    }

    #[tokio::test(start_paused = true)]
    async fn opens_at_the_failure_rate_fails_fast_then_half_opens_and_closes() {
        let (remote, breaker, step) = setup(None);
        // 2 of 4 calls fail: 50 %, the window is full: open.
        for down in [false, true, false, true] {
            remote.down.store(down, Ordering::SeqCst);
            let _ = call(&step).await;
        }
        assert_eq!(breaker.state(), CircuitState::Open);
        remote.down.store(false, Ordering::SeqCst);
        let f = call(&step).await.unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::Unavailable);
        assert!(f.error.detail.contains("is open"), "{}", f.error.detail);
        assert_eq!(remote.calls.load(Ordering::SeqCst), 4, "open: no call made");

        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(breaker.state(), CircuitState::HalfOpen);
        call(&step).await.unwrap();
        assert_eq!(
            breaker.state(),
            CircuitState::HalfOpen,
            "needs 2 trial successes"
        );
        call(&step).await.unwrap();
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert_eq!(remote.calls.load(Ordering::SeqCst), 6);
        assert_eq!(
            breaker.counts(),
            BreakerCounts {
                successes: 4,
                failures: 2,
                rejected: 1,
                opened: 1
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stays_closed_below_the_rate_and_before_minimum_calls() {
        let (remote, breaker, step) = setup(None);
        remote.down.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            let _ = call(&step).await;
        }
        assert_eq!(breaker.state(), CircuitState::Closed, "3 calls < minimum 4");

        let (remote, breaker, step) = setup(None);
        for down in [false, false, false, true] {
            remote.down.store(down, Ordering::SeqCst);
            let _ = call(&step).await;
        }
        assert_eq!(breaker.state(), CircuitState::Closed, "25 % < 50 %");
        // The window slides to the last 4 calls: [ok, ok, failed, failed] is 50 %.
        remote.down.store(true, Ordering::SeqCst);
        let _ = call(&step).await;
        assert_eq!(breaker.state(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_trial_reopens() {
        let (remote, breaker, step) = setup(None);
        remote.down.store(true, Ordering::SeqCst);
        for _ in 0..4 {
            let _ = call(&step).await;
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        call(&step).await.unwrap_err();
        assert_eq!(breaker.state(), CircuitState::Open);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(
            breaker.state(),
            CircuitState::Open,
            "a new full open period"
        );
        assert_eq!(breaker.counts().opened, 2, "opened, then re-opened");
    }

    #[tokio::test(start_paused = true)]
    async fn kinds_that_do_not_count_leave_it_closed() {
        struct Bad;
        #[async_trait]
        impl Processor for Bad {
            async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
                Err(Failure::new(msg, ProcessError::invalid_input("bad")))
            }
        }
        let breaker = Arc::new(CircuitBreaker::new("f/s".into(), config()));
        let step = BreakerStep::new(Arc::clone(&breaker), Arc::new(Bad), None);
        for _ in 0..8 {
            let _ = call(&step).await;
        }
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_fallback_answers_while_open_and_on_counted_failures() {
        struct Fallback;
        #[async_trait]
        impl Processor for Fallback {
            async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
                Ok(std::iter::once(
                    msg.derive(sluice_core::Body::from_json(serde_json::json!("cached"))),
                )
                .collect())
            }
        }
        let (remote, _breaker, step) = setup(Some(Arc::new(Fallback)));
        remote.down.store(true, Ordering::SeqCst);
        for _ in 0..6 {
            let out = call(&step).await.unwrap();
            assert_eq!(out[0].body.json().unwrap(), &serde_json::json!("cached"));
            assert!(out[0].headers.contains_key(FALLBACK_HEADER));
        }
        assert_eq!(remote.calls.load(Ordering::SeqCst), 4, "open after 4");
    }
}
