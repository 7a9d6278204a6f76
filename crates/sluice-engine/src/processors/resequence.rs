//! `resequence`: puts messages back in the order of a sequence number (EIP Resequencer).

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    BuildContext, BuildError, Dispatch, ErrorKind, Failure, Message, Outputs, ProcessError,
    Processor,
};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::common;

const DEFAULT_BATCH_SIZE: usize = 100;
const DEFAULT_CAPACITY: usize = 1_000;

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "resequence",
        ComponentKind::Processor,
        "Put messages back in order by a sequence number",
    )
    .description(
        "Holds messages and releases them ordered by `sequence`, a jq expression giving an \
integer (a number, or a string of digits such as a header; `.` is the body, `null` when it is \
not JSON; with `$headers` and `$meta`). Anything else fails the message with `invalid_input` \
(EIP Resequencer).\n\n\
**`mode: batch`** (default) collects messages until `batch_size` are held or `timeout` has \
passed since the first message of the batch, then releases the whole batch sorted by sequence \
number. Batches are independent: a message arriving after its batch was released starts the \
next one.\n\n\
**`mode: stream`** releases each message as soon as it is the next expected one: the first \
expected number is `start`, or without it the first message's number. A message that fills a \
gap releases itself and every held successor. A gap is waited for at most `timeout` (from the \
moment it held a message back); then the missing numbers are skipped and the held messages \
released from the lowest on. At most `capacity` messages are held: with `on_full: release` \
(default) a message that does not fit makes the step skip ahead the same way; with `fail` it \
fails with `rejected`.\n\n\
**Late messages and duplicates.** In stream mode a number below the next expected one (its turn \
has passed: it was released or skipped), and in both modes a number already held, is a late \
message: with `on_late: drop` (default) it is dropped and acknowledged, with `fail` it fails \
with `rejected`.\n\n\
**Delivery.** Released messages are sent through everything after this step (the rest of the \
flow, then the targets) one at a time, in order, each with the flow's error handling: a \
message's own `process` call returns nothing, so a request-reply caller gets no reply from a \
flow with a resequencer. Held messages keep their acknowledgement: each is acked when its own \
delivery commits. Messages still held when the flow stops are nacked and redelivered. Order is \
kept within this step in this process.",
    )
    .field(
        FieldSpec::new("sequence", FieldType::Jq, "A jq expression giving the message's sequence number (an integer).")
            .required(),
    )
    .field(
        FieldSpec::new("mode", FieldType::Enum(vec!["batch", "stream"]), "`batch`: release sorted batches; `stream`: release each message as soon as its turn comes.")
            .default_value("batch"),
    )
    .field(
        FieldSpec::new("batch_size", FieldType::Integer { min: Some(1), max: None }, "With `mode: batch`: release a batch once it holds this many messages.")
            .default_value(DEFAULT_BATCH_SIZE),
    )
    .field(
        FieldSpec::new("timeout", FieldType::Duration, "Batch: the longest a batch is collected; stream: the longest a gap is waited for.")
            .default_value("1s"),
    )
    .field(FieldSpec::new(
        "start",
        FieldType::Integer { min: None, max: None },
        "With `mode: stream`: the first sequence number expected; without it, the first message's number.",
    ))
    .field(
        FieldSpec::new("capacity", FieldType::Integer { min: Some(1), max: None }, "With `mode: stream`: the most messages held at once.")
            .default_value(DEFAULT_CAPACITY),
    )
    .field(
        FieldSpec::new("on_full", FieldType::Enum(vec!["release", "fail"]), "With `mode: stream`, when `capacity` messages are held: `release` skips ahead, `fail` rejects the new message.")
            .default_value("release"),
    )
    .field(
        FieldSpec::new("on_late", FieldType::Enum(vec!["drop", "fail"]), "For a late or duplicate message: `drop` acknowledges it, `fail` rejects it.")
            .default_value("drop"),
    )
    .example("Sort batches of up to 50 by a header", "sequence: '$headers.seq'\nbatch_size: 50\ntimeout: 2s\n")
    .example(
        "Deliver events in order, waiting at most 500ms for a missing one",
        "sequence: '.seq'\nmode: stream\nstart: 1\ntimeout: 500ms\n",
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    #[default]
    Batch,
    Stream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OnFull {
    #[default]
    Release,
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OnLate {
    #[default]
    Drop,
    Fail,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    sequence: String,
    #[serde(default)]
    mode: Mode,
    batch_size: Option<usize>,
    #[serde(default = "one_second")]
    timeout: HumanDuration,
    start: Option<i64>,
    capacity: Option<usize>,
    on_full: Option<OnFull>,
    #[serde(default)]
    on_late: OnLate,
}

// Repeats the spec's default for configurations that did not go through validation (tests).
fn one_second() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    let only_for = |field: &str, mode: &str| {
        BuildError::field(
            field,
            format!("`{field}` applies only with `mode: {mode}`; remove it"),
        )
    };
    // The loader fills in every default, so only a value other than the default is an error.
    let set = |value: Option<usize>, default: usize| value.is_some_and(|v| v != default);
    match config.mode {
        Mode::Batch if config.start.is_some() => return Err(only_for("start", "stream")),
        Mode::Batch if set(config.capacity, DEFAULT_CAPACITY) => {
            return Err(only_for("capacity", "stream"));
        }
        Mode::Batch if config.on_full.is_some_and(|f| f != OnFull::default()) => {
            return Err(only_for("on_full", "stream"));
        }
        Mode::Stream if set(config.batch_size, DEFAULT_BATCH_SIZE) => {
            return Err(only_for("batch_size", "batch"));
        }
        _ => {}
    }
    if config.timeout.0.is_zero() {
        return Err(BuildError::field("timeout", "give a duration above zero"));
    }
    let sequence = ctx.steps.compile_jq("sequence", &config.sequence)?;
    Ok(Arc::new(Resequence {
        inner: Arc::new(Inner {
            sequence,
            mode: config.mode,
            batch_size: config.batch_size.unwrap_or(DEFAULT_BATCH_SIZE).max(1),
            timeout: config.timeout.0,
            capacity: config.capacity.unwrap_or(DEFAULT_CAPACITY).max(1),
            on_full: config.on_full.unwrap_or_default(),
            on_late: config.on_late,
            state: Mutex::new(State {
                next: config.start,
                ..State::default()
            }),
            gate: Arc::new(Mutex::new(())),
            downstream: Arc::clone(&ctx.downstream),
        }),
    }))
}

#[derive(Default)]
struct State {
    /// Held messages by sequence number.
    held: BTreeMap<i64, Message>,
    /// Stream: the next number to release (`None` until the first message without `start`).
    next: Option<i64>,
    /// Since when the current batch (batch) or gap (stream) waits; `None` when nothing is held.
    waiting_since: Option<Instant>,
    /// Whether the timer task runs.
    timer: bool,
}

struct Inner {
    sequence: Arc<dyn JqProgram>,
    mode: Mode,
    batch_size: usize,
    timeout: Duration,
    capacity: usize,
    on_full: OnFull,
    on_late: OnLate,
    state: Mutex<State>,
    /// Taken, in order, by whoever sends released messages on, so releases never overtake
    /// each other.
    gate: Arc<Mutex<()>>,
    downstream: Arc<dyn Dispatch>,
}

struct Resequence {
    inner: Arc<Inner>,
}

/// What happens to an arriving message.
enum Verdict {
    /// Held, or released with others: send these on, in order.
    Release(Vec<Message>),
    /// A late message or a duplicate.
    Late(Message, String),
    /// No room.
    Full(Message),
}

impl Inner {
    async fn sequence_of(&self, msg: &Message) -> Result<i64, ProcessError> {
        let input = msg
            .body
            .json_shared()
            .unwrap_or_else(|_| Arc::new(Value::Null));
        let output = self.sequence.run(input, msg).await?.into_iter().next();
        let number = match &output {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
            _ => None,
        };
        number.ok_or_else(|| {
            ProcessError::invalid_input(format!(
                "`sequence` (`{}`) gave {}; it must give an integer",
                self.sequence.source(),
                output.map_or_else(|| "no output".to_owned(), |v| v.to_string())
            ))
        })
    }

    /// Decides what `msg`, numbered `seq`, does; updates the state.
    fn arrive(&self, state: &mut State, seq: i64, msg: Message, now: Instant) -> Verdict {
        if state.held.contains_key(&seq) {
            return Verdict::Late(msg, format!("sequence number {seq} is already held"));
        }
        match self.mode {
            Mode::Batch => {
                state.held.insert(seq, msg);
                state.waiting_since.get_or_insert(now);
                if state.held.len() >= self.batch_size {
                    state.waiting_since = None;
                    return Verdict::Release(
                        std::mem::take(&mut state.held).into_values().collect(),
                    );
                }
                Verdict::Release(Vec::new())
            }
            Mode::Stream => {
                let next = *state.next.get_or_insert(seq);
                if seq < next {
                    return Verdict::Late(
                        msg,
                        format!("sequence number {seq} is late: {next} is expected next"),
                    );
                }
                let mut released = Vec::new();
                if seq != next && state.held.len() >= self.capacity {
                    if self.on_full == OnFull::Fail {
                        return Verdict::Full(msg);
                    }
                    // Skip ahead to the lowest held message to make room.
                    released = skip_ahead(state);
                }
                state.held.insert(seq, msg);
                released.extend(release_run(state));
                state.waiting_since = if state.held.is_empty() {
                    None
                } else if released.is_empty() {
                    state.waiting_since.or(Some(now))
                } else {
                    // A new gap starts now.
                    Some(now)
                };
                Verdict::Release(released)
            }
        }
    }

    /// Sends released messages on, in order, after any release before them.
    async fn send(&self, gate: tokio::sync::OwnedMutexGuard<()>, released: Vec<Message>) {
        for msg in released {
            // The flow's error handling dealt with a failure (and with the message's ack).
            let _ = self.downstream.dispatch(msg).await;
        }
        drop(gate);
    }

    /// Starts the timer task unless it runs: it releases what waited `timeout`.
    fn start_timer(self: &Arc<Self>, state: &mut State) {
        if state.timer || state.waiting_since.is_none() {
            return;
        }
        state.timer = true;
        let inner = Arc::downgrade(self);
        tokio::spawn(async move { run_timer(inner).await });
    }
}

/// Releases the message due next and every consecutive one after it.
fn release_run(state: &mut State) -> Vec<Message> {
    let mut released = Vec::new();
    while let Some(next) = state.next {
        let Some(msg) = state.held.remove(&next) else {
            break;
        };
        released.push(msg);
        state.next = next.checked_add(1);
    }
    released
}

/// Skips the gap before the lowest held message and releases from there.
fn skip_ahead(state: &mut State) -> Vec<Message> {
    if let Some((&lowest, _)) = state.held.first_key_value() {
        state.next = Some(lowest);
    }
    release_run(state)
}

async fn run_timer(inner: Weak<Inner>) {
    loop {
        let Some(this) = inner.upgrade() else {
            return;
        };
        let mut state = this.state.lock().await;
        let Some(since) = state.waiting_since else {
            state.timer = false;
            return;
        };
        let due = since + this.timeout;
        if due > Instant::now() {
            drop(state);
            drop(this);
            tokio::time::sleep_until(due).await;
            continue;
        }
        let released = match this.mode {
            Mode::Batch => std::mem::take(&mut state.held).into_values().collect(),
            Mode::Stream => skip_ahead(&mut state),
        };
        state.waiting_since = (!state.held.is_empty()).then(Instant::now);
        let gate = Arc::clone(&this.gate).lock_owned().await;
        drop(state);
        this.send(gate, released).await;
    }
}

#[async_trait]
impl Processor for Resequence {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let inner = &self.inner;
        let seq = match inner.sequence_of(&msg).await {
            Ok(seq) => seq,
            Err(e) => return Err(Failure::new(msg, e)),
        };
        let mut state = inner.state.lock().await;
        match inner.arrive(&mut state, seq, msg, Instant::now()) {
            Verdict::Release(released) => {
                inner.start_timer(&mut state);
                if released.is_empty() {
                    return Ok(Outputs::new());
                }
                // Taking the gate before letting go of the state keeps releases in order.
                let gate = Arc::clone(&inner.gate).lock_owned().await;
                drop(state);
                inner.send(gate, released).await;
                Ok(Outputs::new())
            }
            Verdict::Late(msg, why) => match inner.on_late {
                OnLate::Drop => {
                    tracing::debug!(reason = %why, "resequence dropped a late message");
                    msg.ack();
                    Ok(Outputs::new())
                }
                OnLate::Fail => Err(Failure::new(
                    msg,
                    ProcessError::new(ErrorKind::Rejected, why),
                )),
            },
            Verdict::Full(msg) => {
                let error = ProcessError::new(
                    ErrorKind::Rejected,
                    format!(
                        "{} messages are held waiting for sequence number {}; raise `capacity`",
                        inner.capacity,
                        state.next.unwrap_or_default()
                    ),
                );
                Err(Failure::new(msg, error))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{Collected, build_with_downstream, process, try_build};
    use serde_json::json;
    use sluice_core::{AckToken, Outcome};

    fn resequencer(config: Value) -> (Arc<dyn Processor>, Arc<Collected>) {
        build_with_downstream("resequence", config)
    }

    async fn send(step: &Arc<dyn Processor>, seqs: &[i64]) {
        for &seq in seqs {
            let out = process(step, Message::json(json!({"seq": seq})))
                .await
                .unwrap();
            assert!(out.is_empty(), "released messages go downstream");
        }
    }

    fn seqs(collected: &Collected) -> Vec<i64> {
        collected
            .take()
            .into_iter()
            .map(|m| {
                let seq = m.body.json().unwrap()["seq"].as_i64().unwrap();
                m.ack();
                seq
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn batch_releases_sorted_when_full_or_timed_out() {
        let (step, out) =
            resequencer(json!({"sequence": ".seq", "batch_size": 3, "timeout": "1s"}));
        send(&step, &[3, 1]).await;
        assert!(seqs(&out).is_empty());
        send(&step, &[2]).await;
        assert_eq!(seqs(&out), [1, 2, 3]);
        send(&step, &[9, 7]).await;
        tokio::time::sleep(Duration::from_millis(999)).await;
        assert!(seqs(&out).is_empty());
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(seqs(&out), [7, 9]);
    }

    #[tokio::test(start_paused = true)]
    async fn stream_releases_as_soon_as_the_next_arrives() {
        let (step, out) = resequencer(json!({"sequence": ".seq", "mode": "stream", "start": 1}));
        send(&step, &[2, 3]).await;
        assert!(seqs(&out).is_empty());
        send(&step, &[1]).await;
        assert_eq!(seqs(&out), [1, 2, 3]);
        send(&step, &[4]).await;
        assert_eq!(seqs(&out), [4]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_gap_is_waited_for_at_most_the_timeout_then_skipped() {
        let (step, out) = resequencer(json!({"sequence": ".seq", "mode": "stream", "start": 1,
                                       "timeout": "500ms"}));
        send(&step, &[1, 3, 4, 6]).await;
        assert_eq!(seqs(&out), [1]);
        tokio::time::sleep(Duration::from_millis(499)).await;
        assert!(seqs(&out).is_empty(), "released before the timeout");
        tokio::time::sleep(Duration::from_millis(2)).await;
        // 2 is skipped; 5 is a new gap with its own timeout.
        assert_eq!(seqs(&out), [3, 4]);
        tokio::time::sleep(Duration::from_millis(501)).await;
        assert_eq!(seqs(&out), [6]);
        // 2 and 5 come too late now.
        let (token, rx) = AckToken::channel();
        let late = Message::json(json!({"seq": 2})).with_ack(token);
        assert!(process(&step, late).await.unwrap().is_empty());
        assert_eq!(
            rx.await.unwrap(),
            Outcome::Ack,
            "a dropped late message is acked"
        );
        send(&step, &[7]).await;
        assert_eq!(seqs(&out), [7]);
    }

    #[tokio::test(start_paused = true)]
    async fn duplicates_and_late_messages_are_dropped_or_rejected() {
        let (step, out) =
            resequencer(json!({"sequence": ".seq", "mode": "stream", "on_late": "fail"}));
        send(&step, &[10, 12]).await;
        assert_eq!(seqs(&out), [10]);
        let f = process(&step, Message::json(json!({"seq": 12})))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::Rejected);
        assert!(f.error.detail.contains("already held"), "{}", f.error);
        let f = process(&step, Message::json(json!({"seq": 9})))
            .await
            .unwrap_err();
        assert!(
            f.error.detail.contains("late: 11 is expected"),
            "{}",
            f.error
        );

        let (step, out) = resequencer(json!({"sequence": ".seq", "batch_size": 2}));
        send(&step, &[5, 5, 4]).await;
        assert_eq!(seqs(&out), [4, 5], "the duplicate 5 was dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_skips_ahead_or_rejects() {
        let (step, out) = resequencer(json!({"sequence": ".seq", "mode": "stream", "start": 1,
                                       "capacity": 2}));
        send(&step, &[3, 5]).await;
        assert!(seqs(&out).is_empty());
        send(&step, &[6]).await;
        // Full: skip to 3, release it; 4 is still missing, so 5 and 6 wait.
        assert_eq!(seqs(&out), [3]);

        let (step, out) = resequencer(json!({"sequence": ".seq", "mode": "stream", "start": 1,
                                       "capacity": 1, "on_full": "fail"}));
        send(&step, &[3]).await;
        let f = process(&step, Message::json(json!({"seq": 4})))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::Rejected);
        assert!(f.error.detail.contains("capacity"), "{}", f.error);
        // The expected one still gets in and releases the held one.
        send(&step, &[1, 2]).await;
        assert_eq!(seqs(&out), [1, 2, 3]);
    }

    #[tokio::test]
    async fn sequence_numbers_must_be_integers() {
        let (step, _) = resequencer(json!({"sequence": "$headers.seq"}));
        let ok = Message::json(json!(null)).with_header("seq", "7");
        assert!(process(&step, ok).await.is_ok());
        let f = process(&step, Message::json(json!(null)).with_header("seq", "x"))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::InvalidInput);
        assert!(f.error.detail.contains("integer"), "{}", f.error);
    }

    #[test]
    fn options_of_the_other_mode_are_build_errors() {
        let e = try_build("resequence", &json!({"sequence": ".s", "start": 1}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("start"));
        let e = try_build(
            "resequence",
            &json!({"sequence": ".s", "mode": "stream", "batch_size": 2}),
        )
        .err()
        .unwrap();
        assert_eq!(e.field.as_deref(), Some("batch_size"));
    }
}
