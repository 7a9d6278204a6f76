//! `delay`: holds each message for a while before it continues (EIP Delayer).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, Failure, Message, Outputs, ProcessError, Processor};

use super::common;

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "delay",
        ComponentKind::Processor,
        "Hold each message for a fixed time or until a time computed from it",
    )
    .description(
        "Holds each message, then lets it continue unchanged (EIP Delayer). Give exactly one of \
`duration` (the same delay for every message) or `until`, a jq expression (`.` is the body, `null` \
when it is not JSON; with `$headers` and `$meta`) whose first output is either a **number of \
milliseconds** to wait or an **RFC 3339 time** (`2026-05-01T12:00:00Z`) to wait for. A time in the \
past, or zero or fewer milliseconds, does not wait. Any other output (`null`, no output, text that \
is not a time) fails the step with `invalid_input`.\n\n\
No delay may exceed `max` (default 1h): a `duration` above it is refused when the flow loads, and a \
computed delay above it fails the message with `invalid_input` naming both. Messages wait \
concurrently, each in its own call; waiting holds the message in memory (and its place in the \
flow's concurrency), so long delays belong in a durable scheduler. Cancelling a waiting message \
(shutdown, a timeout around the step) stops its wait at once; the message is then nacked and \
redelivered by the source.",
    )
    .field(FieldSpec::new(
        "duration",
        FieldType::Duration,
        "A fixed delay for every message.",
    ))
    .field(FieldSpec::new(
        "until",
        FieldType::Jq,
        "A jq expression giving the delay in milliseconds (a number) or the time to wait for (an RFC 3339 string).",
    ))
    .field(
        FieldSpec::new("max", FieldType::Duration, "The longest delay allowed.")
            .default_value("1h"),
    )
    .shorthand("duration")
    .example("Wait half a second", "duration: 500ms\n")
    .example(
        "Wait as long as the message asks, up to a minute",
        "until: '.retry_in_ms'\nmax: 1m\n",
    )
    .example("Release at a scheduled time", "until: '.send_at'\nmax: 1d\n")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    duration: Option<HumanDuration>,
    until: Option<String>,
    #[serde(default = "one_hour")]
    max: HumanDuration,
}

// Repeats the spec's default for configurations that did not go through validation (tests).
fn one_hour() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    let max = config.max.0;
    let how_long = match (config.duration, &config.until) {
        (Some(duration), None) if duration.0 > max => {
            return Err(BuildError::field(
                "duration",
                format!(
                    "{duration} is longer than `max` ({}); raise `max`",
                    config.max
                ),
            ));
        }
        (Some(duration), None) => HowLong::Fixed(duration.0),
        (None, Some(code)) => HowLong::Until(ctx.steps.compile_jq("until", code)?),
        (Some(_), Some(_)) => {
            return Err(BuildError::field(
                "until",
                "give `duration` or `until`, not both",
            ));
        }
        (None, None) => {
            return Err(BuildError::new(
                "give `duration` (a fixed delay) or `until` (a delay computed by jq)",
            ));
        }
    };
    Ok(Arc::new(Delay { how_long, max }))
}

enum HowLong {
    Fixed(Duration),
    Until(Arc<dyn JqProgram>),
}

struct Delay {
    how_long: HowLong,
    max: Duration,
}

impl Delay {
    async fn delay_for(&self, msg: &Message) -> Result<Duration, ProcessError> {
        let program = match &self.how_long {
            HowLong::Fixed(duration) => return Ok(*duration),
            HowLong::Until(program) => program,
        };
        let input = msg
            .body
            .json_shared()
            .unwrap_or_else(|_| Arc::new(Value::Null));
        let output = program.run(input, msg).await?.into_iter().next();
        let delay = match &output {
            Some(Value::Number(n)) => n
                .as_u64()
                .map_or_else(|| millis(n.as_f64().unwrap_or(0.0)), Duration::from_millis),
            Some(Value::String(text)) => until(text)?,
            _ => {
                return Err(ProcessError::invalid_input(format!(
                    "`until` (`{}`) gave {}; it must give milliseconds (a number) or an RFC 3339 \
time (a string)",
                    program.source(),
                    output.map_or_else(|| "no output".to_owned(), |v| v.to_string())
                )));
            }
        };
        if delay > self.max {
            return Err(ProcessError::invalid_input(format!(
                "a delay of {} is longer than `max` ({})",
                HumanDuration(round_to_millis(delay)),
                HumanDuration(self.max)
            )));
        }
        Ok(delay)
    }
}

/// A number of milliseconds as a delay; negative means none, absurdly large saturates.
fn millis(ms: f64) -> Duration {
    if ms <= 0.0 || ms.is_nan() {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::MAX)
}

/// The time left until an RFC 3339 time on the system clock; none if it has passed.
fn until(text: &str) -> Result<Duration, ProcessError> {
    let at = chrono::DateTime::parse_from_rfc3339(text).map_err(|e| {
        ProcessError::invalid_input(format!(
            "`until` gave `{text}`, which is not an RFC 3339 time ({e}); e.g. `2026-05-01T12:00:00Z`"
        ))
    })?;
    Ok((at.to_utc() - chrono::Utc::now())
        .to_std()
        .unwrap_or(Duration::ZERO))
}

fn round_to_millis(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[async_trait]
impl Processor for Delay {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        match self.delay_for(&msg).await {
            Ok(delay) => {
                tokio::time::sleep(delay).await;
                Ok(common::one(msg))
            }
            Err(e) => Err(Failure::new(msg, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process, try_build};
    use serde_json::json;
    use sluice_core::ErrorKind;
    use tokio::time::Instant;

    async fn elapsed_ms(step: &Arc<dyn Processor>, msg: Message) -> Result<u128, Failure> {
        let start = Instant::now();
        process(step, msg).await?;
        Ok(start.elapsed().as_millis())
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_delay() {
        let step = build_one("delay", json!("250ms"));
        let msg = Message::json(json!({"a": 1})).with_header("h", "v");
        let start = Instant::now();
        let out = process(&step, msg).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(250));
        assert_eq!(out[0].body.json().unwrap(), &json!({"a": 1}));
        assert_eq!(out[0].headers["h"], "v");
    }

    #[tokio::test(start_paused = true)]
    async fn computed_delay_in_milliseconds() {
        let step = build_one("delay", json!({"until": ".wait"}));
        let ms = |v: Value| Message::json(json!({"wait": v}));
        assert_eq!(elapsed_ms(&step, ms(json!(1500))).await.unwrap(), 1500);
        assert_eq!(elapsed_ms(&step, ms(json!(-5))).await.unwrap(), 0);
        assert_eq!(
            elapsed_ms(&step, ms(json!(2.5))).await.unwrap(),
            3,
            "timers round up"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn computed_time_in_rfc3339() {
        let step = build_one("delay", json!({"until": ".at"}));
        let past = Message::json(json!({"at": "2001-01-01T00:00:00Z"}));
        assert_eq!(elapsed_ms(&step, past).await.unwrap(), 0);
        let f = elapsed_ms(&step, Message::json(json!({"at": "tomorrow"})))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::InvalidInput);
        assert!(f.error.detail.contains("RFC 3339"), "{}", f.error);
    }

    #[tokio::test(start_paused = true)]
    async fn delays_beyond_the_cap_fail_clearly() {
        let step = build_one("delay", json!({"until": ".wait", "max": "1s"}));
        assert_eq!(
            elapsed_ms(&step, Message::json(json!({"wait": 1000})))
                .await
                .unwrap(),
            1000
        );
        let f = elapsed_ms(&step, Message::json(json!({"wait": 1001})))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::InvalidInput);
        assert_eq!(
            f.error.detail,
            "a delay of 1001ms is longer than `max` (1s)"
        );
        assert_eq!(f.message.body.json().unwrap(), &json!({"wait": 1001}));
        let far = Message::json(json!({"wait": "2999-01-01T00:00:00Z"}));
        assert!(elapsed_ms(&step, far).await.is_err());
        let f = elapsed_ms(&step, Message::json(json!({})))
            .await
            .unwrap_err();
        assert!(f.error.detail.contains("gave null"), "{}", f.error);
    }

    #[tokio::test(start_paused = true)]
    async fn messages_wait_concurrently_and_cancelling_stops_the_wait() {
        let step = build_one("delay", json!("1s"));
        let start = Instant::now();
        let (a, b) = tokio::join!(
            process(&step, Message::json(json!(1))),
            process(&step, Message::json(json!(2)))
        );
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        let (token, rx) = sluice_core::AckToken::channel();
        let cancelled = tokio::time::timeout(
            Duration::from_millis(10),
            process(&step, Message::json(json!(3)).with_ack(token)),
        )
        .await;
        assert!(cancelled.is_err());
        assert!(matches!(rx.await.unwrap(), sluice_core::Outcome::Nack(_)));
    }

    #[test]
    fn configuration_errors() {
        let e = try_build("delay", &json!({"duration": "2h"}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("duration"));
        assert!(e.message.contains("longer than `max` (3600s)"), "{e}");
        assert!(try_build("delay", &json!({"duration": "2h", "max": "3h"})).is_ok());
        let e = try_build("delay", &json!({"duration": "1s", "until": ".a"}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("until"));
        assert!(try_build("delay", &json!({})).is_err());
    }
}
