//! The `timer` source: a message every `interval`, or on a `cron` schedule.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, Message, Source, SourceContext, SourceError};

const DESCRIPTION: &str = "\
Produces an InOnly message with `body` on a schedule: every `interval` (the first tick one \
interval after the flow starts), or at the times of a `cron` expression, evaluated in UTC (5 \
fields `min hour day month weekday`, or 6 with leading seconds). Set exactly one of the two.

Headers: `timer.tick` (1-based counter) and `timer.fired_at` (RFC 3339 UTC).

Ticks never overlap: each tick's flow run is awaited before the next is scheduled. A tick \
missed because the previous run was still going is skipped, not fired in a burst afterwards. \
After `count` ticks the source stops; on shutdown it finishes the running tick and stops.

**Delivery guarantee.** none needed upstream: a failed tick is logged and the schedule goes \
on; ticks that fall while the runtime is down are not made up.

**Limits.** Cron is evaluated in UTC only (no time zones yet); years are not accepted in cron \
expressions; one tick runs at a time per flow.";

/// The `timer` source's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "timer",
        ComponentKind::Source,
        "Produce a message on an interval or cron schedule",
    )
    .description(DESCRIPTION)
    .field(FieldSpec::new(
        "interval",
        FieldType::Duration,
        "Time between ticks; set this or `cron`.",
    ))
    .field(FieldSpec::new(
        "cron",
        FieldType::String,
        "Cron expression in UTC, 5 fields or 6 with seconds first; set this or `interval`.",
    ))
    .field(
        FieldSpec::new("body", FieldType::Any, "Body of every message, as JSON.")
            .default_value(serde_json::json!({})),
    )
    .field(FieldSpec::new(
        "count",
        FieldType::Integer {
            min: Some(1),
            max: None,
        },
        "Stop after this many ticks; unset means forever.",
    ))
    .example(
        "Poll every 30 seconds",
        "interval: 30s\nbody: {job: sync}\n",
    )
    .example("Weekdays at 06:00 UTC", "cron: \"0 6 * * 1-5\"\n")
    .example("Three ticks, a second apart", "interval: 1s\ncount: 3\n")
}

/// Configuration of the `timer` source.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimerConfig {
    /// Period.
    #[serde(default)]
    pub interval: Option<HumanDuration>,
    /// Cron schedule.
    #[serde(default)]
    pub cron: Option<String>,
    /// Body of each message.
    #[serde(default = "default_body")]
    pub body: Value,
    /// Maximum number of ticks.
    #[serde(default)]
    pub count: Option<u64>,
}

fn default_body() -> Value {
    serde_json::json!({})
}

enum Schedule {
    Every(Duration),
    Cron(Box<Cron>),
}

/// A built `timer` source.
pub struct TimerSource {
    schedule: Schedule,
    body: Arc<Value>,
    count: Option<u64>,
}

impl std::fmt::Debug for TimerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimerSource")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

/// Parses a 5- or 6-field cron expression (seconds first when 6).
pub fn parse_cron(text: &str) -> Result<Cron, String> {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(text)
        .map_err(|e| {
            format!("`{text}` is not a valid cron expression ({e}); write 5 fields `min hour day month weekday`, e.g. `0 6 * * 1-5`, or 6 with seconds first")
        })
}

/// Builds a `timer` source.
pub fn build(config: &Value, _ctx: &BuildContext<'_>) -> Result<Box<dyn Source>, BuildError> {
    let c: TimerConfig = crate::config::parse(config)?;
    let schedule = match (c.interval, c.cron) {
        (Some(_), Some(_)) => {
            return Err(BuildError::new(
                "both `interval` and `cron` are set; keep exactly one of them",
            ));
        }
        (None, None) => {
            return Err(BuildError::new(
                "neither `interval` nor `cron` is set; add one, e.g. `interval: 10s` or `cron: \"*/5 * * * *\"`",
            ));
        }
        (Some(interval), None) => {
            if interval.0.is_zero() {
                return Err(BuildError::field("interval", "must be longer than 0s"));
            }
            Schedule::Every(interval.0)
        }
        (None, Some(cron)) => Schedule::Cron(Box::new(
            parse_cron(&cron).map_err(|e| BuildError::field("cron", e))?,
        )),
    };
    if c.count == Some(0) {
        return Err(BuildError::field(
            "count",
            "must be at least 1; remove it to tick forever",
        ));
    }
    Ok(Box::new(TimerSource {
        schedule,
        body: Arc::new(c.body),
        count: c.count,
    }))
}

#[async_trait]
impl Source for TimerSource {
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let mut tick: u64 = 0;
        let start = tokio::time::Instant::now();
        loop {
            if self.count.is_some_and(|max| tick >= max) {
                return Ok(());
            }
            let wait = async {
                match &self.schedule {
                    Schedule::Every(period) => {
                        tokio::time::sleep_until(next_slot(start, *period)).await;
                        Ok(())
                    }
                    Schedule::Cron(cron) => {
                        let now = chrono::Utc::now();
                        let next = cron.find_next_occurrence(&now, false).map_err(|e| {
                            SourceError::Other(format!(
                                "the cron schedule has no next time ({e}); fix `cron`"
                            ))
                        })?;
                        let delay = (next - now).to_std().unwrap_or(Duration::ZERO);
                        tokio::time::sleep(delay).await;
                        Ok(())
                    }
                }
            };
            tokio::select! {
                () = ctx.shutdown.cancelled() => return Ok(()),
                waited = wait => waited?,
            }
            tick += 1;
            let mut msg = Message::new(sluice_core::Body::from_json((*self.body).clone()))
                .with_header("timer.tick", tick.to_string())
                .with_header(
                    "timer.fired_at",
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                );
            msg.meta.origin = Some(Arc::clone(&ctx.flow));
            if let Err(failure) = ctx.dispatcher.dispatch(msg).await {
                tracing::warn!(flow = %ctx.flow, tick, error = %failure.error, "timer tick failed in its flow");
                let reason = failure.error.to_string();
                failure.message.nack(&reason);
            }
        }
    }
}

/// The first slot `start + k * period` (k >= 1) after now: slots that passed while the previous
/// tick ran are skipped, so a slow flow never gets a burst of catch-up ticks.
fn next_slot(start: tokio::time::Instant, period: Duration) -> tokio::time::Instant {
    let elapsed = start.elapsed().as_nanos();
    let period_ns = period.as_nanos().max(1);
    let k = elapsed / period_ns + 1;
    let offset = u64::try_from(k.saturating_mul(period_ns)).unwrap_or(u64::MAX);
    start + Duration::from_nanos(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_accepts_five_and_six_fields() {
        assert!(parse_cron("*/5 * * * *").is_ok());
        assert!(parse_cron("30 */5 * * * *").is_ok());
        let err = parse_cron("61 * * * *").unwrap_err();
        assert!(err.contains("not a valid cron expression"), "{err}");
        assert!(parse_cron("* * *").is_err());
        assert!(
            parse_cron("0 0 1 1 * 2030").is_err(),
            "years are not accepted"
        );
    }

    #[test]
    fn next_occurrence_is_in_utc() {
        let cron = parse_cron("0 6 * * *").unwrap();
        let start = chrono::DateTime::parse_from_rfc3339("2025-01-01T07:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let next = cron.find_next_occurrence(&start, false).unwrap();
        assert_eq!(next.to_rfc3339(), "2025-01-02T06:00:00+00:00");
    }
}
