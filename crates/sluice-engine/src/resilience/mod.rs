//! Error handling that wraps any step or target: `retry:` (redelivery with backoff) and
//! `circuit_breaker:`, written next to `id:` in a step or target entry, plus the headers every
//! error handler writes.

pub mod breaker;
pub mod headers;
pub mod retry;

use std::sync::Arc;

use serde_json::Value as Json;
use sluice_core::spec::{FieldSpec, FieldType};
use sluice_core::{BuildError, ErrorKind, Processor, Resources, Sink};

use breaker::{BreakerConfig, BreakerSink, BreakerStep, CircuitBreaker, CircuitBreakers};
use retry::{RetryPolicy, RetrySink, RetryStep};

/// Entry key of a retry policy.
pub const RETRY_KEY: &str = "retry";
/// Entry key of a circuit breaker.
pub const BREAKER_KEY: &str = "circuit_breaker";

fn kinds_field(doc: &'static str) -> FieldSpec {
    FieldSpec::new(
        "on",
        FieldType::List(Box::new(FieldType::Enum(ErrorKind::names()))),
        doc,
    )
}

/// The fields of a `retry:` block.
pub fn retry_fields() -> Vec<FieldSpec> {
    vec![
        FieldSpec::new(
            "max_attempts",
            FieldType::Integer {
                min: Some(1),
                max: Some(1000),
            },
            "attempts in all, the first included",
        )
        .default_value(3),
        FieldSpec::new(
            "backoff",
            FieldType::Duration,
            "delay before the second attempt",
        )
        .default_value("100ms"),
        FieldSpec::new(
            "multiplier",
            FieldType::Float,
            "each further delay is the previous one times this (at least 1)",
        )
        .default_value(2.0),
        FieldSpec::new("max_backoff", FieldType::Duration, "cap on any one delay")
            .default_value("30s"),
        FieldSpec::new(
            "jitter",
            FieldType::Float,
            "fraction (0 to 1) of each delay randomly taken off, so failing messages do not retry in lockstep",
        )
        .default_value(0.2),
        kinds_field(
            "error kinds retried (default: unavailable, timeout, remote, io); others fail at once",
        ),
    ]
}

/// The fields of a `circuit_breaker:` block.
pub fn breaker_fields() -> Vec<FieldSpec> {
    vec![
        FieldSpec::new(
            "failure_rate",
            FieldType::Integer {
                min: Some(1),
                max: Some(100),
            },
            "percentage of failed calls among the last `window` calls that opens the circuit",
        )
        .default_value(50),
        FieldSpec::new(
            "window",
            FieldType::Integer {
                min: Some(1),
                max: Some(10_000),
            },
            "number of recent calls judged",
        )
        .default_value(20),
        FieldSpec::new(
            "minimum_calls",
            FieldType::Integer {
                min: Some(1),
                max: Some(10_000),
            },
            "no judgement before this many calls are in the window",
        )
        .default_value(10),
        FieldSpec::new(
            "open_for",
            FieldType::Duration,
            "how long the circuit stays open (failing fast) before trial calls",
        )
        .default_value("30s"),
        FieldSpec::new(
            "half_open_calls",
            FieldType::Integer {
                min: Some(1),
                max: Some(1000),
            },
            "trial calls let through after the open period; all must succeed to close",
        )
        .default_value(1),
        kinds_field(
            "error kinds counted as failures (default: unavailable, timeout, remote, io); others show the remote side answered",
        ),
        FieldSpec::new(
            "fallback",
            FieldType::Steps,
            "steps run instead while the circuit is open or when a counted failure happens (steps only, not targets)",
        ),
    ]
}

/// Reads a validated `retry:` block.
pub fn retry_policy(config: &Json) -> Result<RetryPolicy, BuildError> {
    let policy: RetryPolicy = serde_json::from_value(config.clone())
        .map_err(|e| BuildError::field(RETRY_KEY, format!("invalid retry policy: {e}")))?;
    if !(policy.multiplier >= 1.0 && policy.multiplier.is_finite()) {
        return Err(BuildError::field(
            format!("{RETRY_KEY}.multiplier"),
            "the multiplier must be a number of at least 1",
        ));
    }
    if !(0.0..=1.0).contains(&policy.jitter) {
        return Err(BuildError::field(
            format!("{RETRY_KEY}.jitter"),
            "jitter is a fraction between 0 and 1",
        ));
    }
    if policy.backoff > policy.max_backoff {
        return Err(BuildError::field(
            format!("{RETRY_KEY}.backoff"),
            "`backoff` is longer than `max_backoff`",
        ));
    }
    Ok(policy)
}

/// Reads a validated `circuit_breaker:` block.
pub fn breaker_config(config: &Json) -> Result<BreakerConfig, BuildError> {
    let config: BreakerConfig = serde_json::from_value(config.clone())
        .map_err(|e| BuildError::field(BREAKER_KEY, format!("invalid circuit breaker: {e}")))?;
    if config.minimum_calls > config.window {
        return Err(BuildError::field(
            format!("{BREAKER_KEY}.minimum_calls"),
            "`minimum_calls` is larger than `window`: the circuit could never open",
        ));
    }
    Ok(config)
}

/// A breaker named `name`, registered with the process's others.
pub fn new_breaker(
    name: String,
    config: BreakerConfig,
    resources: &Resources,
) -> Arc<CircuitBreaker> {
    let breaker = Arc::new(CircuitBreaker::new(name, config));
    resources
        .get_or_default::<CircuitBreakers>()
        .insert(Arc::clone(&breaker));
    breaker
}

/// A step's circuit breaker and the steps that answer while it is open.
pub struct GuardedBy {
    pub breaker: Arc<CircuitBreaker>,
    pub fallback: Option<Arc<dyn Processor>>,
}

/// Wraps a step: the breaker inside, the retry outside (each attempt is a call the breaker
/// judges; an open circuit's fast failure is `unavailable`, so a retry waits and tries again).
pub fn wrap_step(
    step: Arc<dyn Processor>,
    retry: Option<RetryPolicy>,
    breaker: Option<GuardedBy>,
) -> Arc<dyn Processor> {
    let step = match breaker {
        Some(GuardedBy { breaker, fallback }) => {
            Arc::new(BreakerStep::new(breaker, step, fallback))
        }
        None => step,
    };
    match retry {
        Some(policy) => Arc::new(RetryStep::new(step, policy)),
        None => step,
    }
}

/// Wraps a target like [`wrap_step`].
pub fn wrap_sink(
    sink: Arc<dyn Sink>,
    retry: Option<RetryPolicy>,
    breaker: Option<Arc<CircuitBreaker>>,
) -> Arc<dyn Sink> {
    let sink = match breaker {
        Some(breaker) => Arc::new(BreakerSink::new(breaker, sink)),
        None => sink,
    };
    match retry {
        Some(policy) => Arc::new(RetrySink::new(sink, policy)),
        None => sink,
    }
}
