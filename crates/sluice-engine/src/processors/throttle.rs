//! `throttle`: lets messages through at a bounded rate, overall or per key (EIP Throttler).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::state::{RateLimit, RateLimitStore, Reservation};
use sluice_core::{
    BuildContext, BuildError, ErrorKind, Failure, Message, Outputs, ProcessError, Processor,
};
use tokio::time::Instant;

use super::{common, message_key, named_store};

/// The header set on a message the throttle rejects: milliseconds until it would be let through.
pub const RETRY_AFTER_HEADER: &str = "sluice.retry_after_ms";

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "throttle",
        ComponentKind::Processor,
        "Let at most `rate` messages through `per` period, overall or per key",
    )
    .description(
        "Limits how fast messages pass (EIP Throttler), with the generic cell rate algorithm \
(GCRA): messages are spaced `per / rate` apart, and up to `burst` messages may pass back to back \
after a quiet spell. This is a token bucket of `burst` tokens refilled at `rate` per `per`, kept \
as one timestamp per key. With the default `burst: 1` messages start at least `per / rate` \
apart.\n\n\
**Modes.** `delay` (the default) holds a message until its slot comes: the flow slows down and \
the source feels the backpressure. Slots are reserved in arrival order, so messages leave in the \
order they came. A message that would wait longer than `max_wait` fails with `rejected` instead of \
queueing without bound. `reject` never waits: a message over the rate fails at once with \
`rejected`; the error says when to retry (\"retry after 250ms\") and the message carries the \
header `sluice.retry_after_ms`.\n\n\
**Per key.** With `key` (jq giving a string, number or boolean, as in `idempotent_consumer`; a \
missing key is `invalid_input`) each key has its own rate. At most `max_keys` keys are tracked; a \
key whose slot has passed carries no state and is forgotten first; when `max_keys` keys are all \
active, a message with a new key fails with `rejected` (a new key is never let through \
unthrottled).\n\n\
The limit applies to this step in this process; several replicas each apply it, unless they \
share it through `backend`. A message cancelled while waiting (a timeout around the step, \
shutdown) gives up its slot to no one.\n\n\
**Shared limit.** With `backend: {redis: {url, prefix}}` the schedules live in Redis (one key per \
throttled key, `prefix` + key, default prefix `sluice:<flow>:<step>:`, expiring once its \
schedule has passed) and a Lua script reserves each slot atomically on Redis's clock, so every \
instance using the same prefix shares one limit. `max_keys` does not apply (Redis forgets idle \
keys by expiry), the rate is kept to the microsecond (at most 1000000 per second), and when \
Redis cannot be reached the message fails with `unavailable` (retryable) rather than passing \
unthrottled. Flow tests use the in-memory state.",
    )
    .field(
        FieldSpec::new("rate", FieldType::Integer { min: Some(1), max: None }, "How many messages may pass per `per`.")
            .required(),
    )
    .field(
        FieldSpec::new("per", FieldType::Duration, "The period the rate is counted over.")
            .default_value("1s"),
    )
    .field(
        FieldSpec::new("burst", FieldType::Integer { min: Some(1), max: None }, "How many messages may pass back to back after a quiet spell.")
            .default_value(1),
    )
    .field(FieldSpec::new(
        "key",
        FieldType::Jq,
        "A jq expression giving a key; each key gets its own rate. Without it, one rate for all messages.",
    ))
    .field(
        FieldSpec::new(
            "mode",
            FieldType::Enum(vec!["delay", "reject"]),
            "`delay`: wait for a slot (backpressure); `reject`: fail at once with `rejected` and a retry-after hint.",
        )
        .default_value("delay"),
    )
    .field(
        FieldSpec::new("max_wait", FieldType::Duration, "In `delay` mode, the longest a message may wait; beyond it, it fails with `rejected`.")
            .default_value("1m"),
    )
    .field(
        FieldSpec::new("max_keys", FieldType::Integer { min: Some(1), max: None }, "Most keys tracked at once with `key`.")
            .default_value(10_000),
    )
    .field(FieldSpec::new(
        "backend",
        FieldType::Any,
        "Keep the limit in a store shared by every instance instead of this process: `{redis: {url, prefix}}` (with the redis connector built in).",
    ))
    .example("Ten calls per second, smoothly", "rate: 10\nper: 1s\n")
    .example(
        "Per customer: 100 per minute in bursts of 20, rejecting the excess",
        "rate: 100\nper: 1m\nburst: 20\nkey: '$headers[\"x-customer\"]'\nmode: reject\n",
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    #[default]
    Delay,
    Reject,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    rate: u64,
    #[serde(default = "one_second")]
    per: HumanDuration,
    #[serde(default = "one")]
    burst: u64,
    key: Option<String>,
    #[serde(default)]
    mode: Mode,
    #[serde(default = "one_minute")]
    max_wait: HumanDuration,
    #[serde(default = "ten_thousand")]
    max_keys: usize,
    backend: Option<Value>,
}

// The defaults repeat the spec's, for configurations that did not go through validation (tests).
fn one_second() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn one_minute() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn one() -> u64 {
    1
}
fn ten_thousand() -> usize {
    10_000
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    if config.rate == 0 {
        return Err(BuildError::field("rate", "give a rate of at least 1"));
    }
    let interval = u32::try_from(config.rate)
        .ok()
        .and_then(|rate| config.per.0.checked_div(rate))
        .filter(|interval| !interval.is_zero())
        .ok_or_else(|| {
            BuildError::field(
                "rate",
                "the rate is too high for the period: messages would be less than 1ns apart",
            )
        })?;
    let burst = u32::try_from(config.burst.saturating_sub(1))
        .map_err(|_| BuildError::field("burst", "give a smaller burst"))?;
    let key = match &config.key {
        Some(code) => Some(ctx.steps.compile_jq("key", code)?),
        None => None,
    };
    let shared =
        named_store::remote::<dyn RateLimitStore>(ctx, config.backend.as_ref(), |b| b.rate_limit)?;
    if shared.is_some() && interval < Duration::from_micros(1) {
        return Err(BuildError::field(
            "rate",
            "a shared limit is kept to the microsecond: give at most 1000000 messages per second, or drop `backend`",
        ));
    }
    Ok(Arc::new(Throttle {
        gcra: Gcra {
            interval,
            tolerance: interval.saturating_mul(burst),
        },
        shared,
        max_wait: match config.mode {
            Mode::Delay => config.max_wait.0,
            Mode::Reject => Duration::ZERO,
        },
        describe: format!("{} per {}", config.rate, config.per),
        key,
        max_keys: config.max_keys.max(1),
        state: Mutex::new(State::default()),
    }))
}

/// The arithmetic of the generic cell rate algorithm.
#[derive(Debug, Clone, Copy)]
struct Gcra {
    /// Time between two messages at the steady rate (`per / rate`).
    interval: Duration,
    /// How far ahead of the steady schedule a message may be (`interval * (burst - 1)`).
    tolerance: Duration,
}

impl Gcra {
    /// Reserves the next slot after `tat` (the theoretical arrival time of the next message) if it
    /// comes within `max_wait` of `now`; returns when the message may go, or how long until a
    /// message could be let through.
    fn reserve(
        self,
        tat: &mut Option<Instant>,
        now: Instant,
        max_wait: Duration,
    ) -> Result<Instant, Duration> {
        let scheduled = tat.map_or(now, |tat| tat.max(now));
        let go_at = scheduled
            .checked_sub(self.tolerance)
            .map_or(now, |at| at.max(now));
        let wait = go_at - now;
        if wait > max_wait {
            return Err(wait);
        }
        *tat = Some(scheduled + self.interval);
        Ok(go_at)
    }
}

#[derive(Default)]
struct State {
    /// The next theoretical arrival time without a key.
    all: Option<Instant>,
    /// The same per key.
    keys: HashMap<String, Instant>,
}

struct Throttle {
    gcra: Gcra,
    /// The store keeping the schedules when they are shared (`backend`); else `state`.
    shared: Option<Arc<dyn RateLimitStore>>,
    max_wait: Duration,
    describe: String,
    key: Option<Arc<dyn JqProgram>>,
    max_keys: usize,
    // One lock, held only for the arithmetic of one reservation (never across an await).
    state: Mutex<State>,
}

/// Why a message may not pass.
enum Refusal {
    /// Over the rate; could pass after this long.
    OverRate(Duration),
    /// Too many keys are active.
    TooManyKeys,
}

impl Throttle {
    fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(state) => state,
            // Each update is a single assignment: a panic cannot leave it half done.
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn reserve(&self, key: Option<&str>, now: Instant) -> Result<Instant, Refusal> {
        let mut state = self.state();
        let Some(key) = key else {
            return self
                .gcra
                .reserve(&mut state.all, now, self.max_wait)
                .map_err(Refusal::OverRate);
        };
        let mut tat = state.keys.get(key).copied();
        if tat.is_none() && state.keys.len() >= self.max_keys {
            // A key whose next slot has passed is in the same state as a key never seen.
            state.keys.retain(|_, tat| *tat > now);
            if state.keys.len() >= self.max_keys {
                return Err(Refusal::TooManyKeys);
            }
        }
        let go_at = self
            .gcra
            .reserve(&mut tat, now, self.max_wait)
            .map_err(Refusal::OverRate)?;
        if let Some(tat) = tat {
            state.keys.insert(key.to_owned(), tat);
        }
        Ok(go_at)
    }

    /// [`Processor::process`] with the schedules in a shared store.
    async fn pass_shared(
        &self,
        shared: &dyn RateLimitStore,
        msg: Message,
        key: Option<&str>,
    ) -> Result<Outputs, Failure> {
        let limit = RateLimit {
            interval: self.gcra.interval,
            tolerance: self.gcra.tolerance,
        };
        // Without `key` every message shares one schedule, under the prefix alone.
        match shared
            .reserve(key.unwrap_or(""), limit, self.max_wait)
            .await
        {
            Ok(Reservation::Granted { wait }) => {
                tokio::time::sleep(wait).await;
                Ok(common::one(msg))
            }
            Ok(Reservation::OverRate { retry_after }) => {
                Err(self.refuse(msg, key, &Refusal::OverRate(retry_after)))
            }
            // A limit that cannot be checked is not waived: the message fails, retryably.
            Err(e) => Err(Failure::new(msg, e)),
        }
    }

    fn refuse(&self, msg: Message, key: Option<&str>, refusal: &Refusal) -> Failure {
        let for_key = key.map(|k| format!(" for key `{k}`")).unwrap_or_default();
        match refusal {
            Refusal::OverRate(wait) => {
                // Round up so a client retrying after the hint is let through.
                let millis = wait.as_nanos().div_ceil(1_000_000);
                let hint = HumanDuration(Duration::from_millis(
                    u64::try_from(millis).unwrap_or(u64::MAX),
                ));
                Failure::new(
                    msg.with_header(RETRY_AFTER_HEADER, millis.to_string()),
                    ProcessError::new(
                        ErrorKind::Rejected,
                        format!(
                            "rate limit of {} exceeded{for_key}; retry after {hint}",
                            self.describe
                        ),
                    ),
                )
            }
            Refusal::TooManyKeys => Failure::new(
                msg,
                ProcessError::new(
                    ErrorKind::Rejected,
                    format!(
                        "cannot throttle a new key{for_key}: all {} tracked keys are active \
(raise `max_keys`)",
                        self.max_keys
                    ),
                ),
            ),
        }
    }
}

#[async_trait]
impl Processor for Throttle {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let key = match &self.key {
            Some(program) => match message_key::evaluate("key", program.as_ref(), &msg).await {
                Ok(key) => Some(key),
                Err(e) => return Err(Failure::new(msg, e)),
            },
            None => None,
        };
        if let Some(shared) = &self.shared {
            return self.pass_shared(shared.as_ref(), msg, key.as_deref()).await;
        }
        match self.reserve(key.as_deref(), Instant::now()) {
            Ok(go_at) => {
                tokio::time::sleep_until(go_at).await;
                Ok(common::one(msg))
            }
            Err(refusal) => Err(self.refuse(msg, key.as_deref(), &refusal)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process, try_build};
    use serde_json::json;

    /// Sends `bodies` at once, each on its own task, and returns when each came out, in
    /// milliseconds after the start, in the order they were sent.
    async fn departures(step: &Arc<dyn Processor>, bodies: Vec<Value>) -> Vec<u128> {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for body in bodies {
            let step = Arc::clone(step);
            tasks.push(tokio::spawn(async move {
                process(&step, Message::json(body)).await.unwrap();
                start.elapsed().as_millis()
            }));
            // Let the task reserve its slot before the next one is spawned.
            tokio::task::yield_now().await;
        }
        let mut times = Vec::new();
        for task in tasks {
            times.push(task.await.unwrap());
        }
        times
    }

    #[tokio::test(start_paused = true)]
    async fn spaces_messages_exactly() {
        let step = build_one("throttle", json!({"rate": 2, "per": "1s"}));
        let times = departures(&step, vec![json!(0); 5]).await;
        assert_eq!(times, [0, 500, 1000, 1500, 2000]);
        // After a quiet spell the schedule restarts from now, not from the past.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(departures(&step, vec![json!(0); 2]).await, [0, 500]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_back_to_back_then_the_rate_holds() {
        let step = build_one("throttle", json!({"rate": 4, "per": "1s", "burst": 2}));
        let times = departures(&step, vec![json!(0); 5]).await;
        assert_eq!(times, [0, 0, 250, 500, 750]);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_throttled_independently() {
        let step = build_one("throttle", json!({"rate": 1, "per": "1s", "key": ".k"}));
        let bodies = ["a", "b", "a", "b", "c"].map(|k| json!({"k": k})).to_vec();
        assert_eq!(departures(&step, bodies).await, [0, 0, 1000, 1000, 0]);
        let f = process(&step, Message::json(json!({}))).await.unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::InvalidInput);
    }

    #[tokio::test(start_paused = true)]
    async fn reject_mode_fails_with_a_retry_hint() {
        let step = build_one(
            "throttle",
            json!({"rate": 2, "per": "1s", "mode": "reject"}),
        );
        assert!(process(&step, Message::json(json!(1))).await.is_ok());
        tokio::time::advance(Duration::from_millis(100)).await;
        let f = process(&step, Message::json(json!(2))).await.unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::Rejected);
        assert!(
            f.error.detail.contains("2 per 1s") && f.error.detail.contains("retry after 400ms"),
            "{}",
            f.error
        );
        assert_eq!(f.message.headers[RETRY_AFTER_HEADER], "400");
        assert_eq!(f.message.body.json().unwrap(), &json!(2));
        // A rejected message takes no slot: after the hint, the next one passes.
        tokio::time::advance(Duration::from_millis(400)).await;
        assert!(process(&step, Message::json(json!(3))).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn delay_mode_rejects_beyond_max_wait() {
        let step = build_one(
            "throttle",
            json!({"rate": 1, "per": "1s", "max_wait": "1500ms"}),
        );
        let times = departures(&step, vec![json!(0); 2]).await;
        assert_eq!(times, [0, 1000]);
        // The next slot is at 2000ms; from 1000ms that is within 1500ms; the one after is not.
        let step2 = Arc::clone(&step);
        let waiting = tokio::spawn(async move { process(&step2, Message::json(json!(0))).await });
        tokio::task::yield_now().await;
        let f = process(&step, Message::json(json!(0))).await.unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::Rejected);
        assert!(f.error.detail.contains("retry after 2s"), "{}", f.error);
        assert!(waiting.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keys_are_forgotten_and_active_ones_bound_the_table() {
        let step = build_one(
            "throttle",
            json!({"rate": 1, "per": "1s", "key": ".k", "max_keys": 2, "mode": "reject"}),
        );
        for k in ["a", "b"] {
            assert!(process(&step, Message::json(json!({"k": k}))).await.is_ok());
        }
        let f = process(&step, Message::json(json!({"k": "c"})))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::Rejected);
        assert!(f.error.detail.contains("max_keys"), "{}", f.error);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            process(&step, Message::json(json!({"k": "c"})))
                .await
                .is_ok()
        );
    }

    #[test]
    fn impossible_rates_are_build_errors() {
        let e = try_build("throttle", &json!({"rate": 2_000_000_000u64, "per": "1ms"}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("rate"));
    }
}
