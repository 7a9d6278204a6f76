//! `load_balance`: sends each message through one of several targets, picked by a strategy
//! (Camel's Load Balancer EIP).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    BuildContext, BuildError, ErrorKind, Failure, Message, Outputs, ProcessError, Processor,
};

use super::common;

/// Set on the messages a target produced: the target's position in `targets`, from 0.
pub const TARGET_HEADER: &str = "sluice.load_balance.target";

/// The error kinds after which `failover` tries the next target: the target may work again or
/// another may, unlike a message that is itself wrong.
const RETRYABLE: [ErrorKind; 4] = [
    ErrorKind::Unavailable,
    ErrorKind::Timeout,
    ErrorKind::Remote,
    ErrorKind::Io,
];

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "load_balance",
        ComponentKind::Processor,
        "Send each message through one of several targets, picked by a strategy",
    )
    .description(
        "Each message runs through the steps of **one** of `targets`; the outputs of those steps \
are the outputs of the step, with the header `sluice.load_balance.target` set to the target's \
position (from 0). The `strategy` picks the target:\n\n\
- `round_robin` (default): targets in turn, ignoring weights.\n\
- `weighted`: in turn in proportion to `weight`, spread evenly (smooth weighted round robin: \
weights 3 and 1 give 0, 0, 1, 0, then again).\n\
- `random`: at random, in proportion to `weight`.\n\
- `failover`: the first target; when it fails with a retryable kind (`unavailable`, `timeout`, \
`remote`, `io`) the next one gets a fresh copy of the original message, and so on through every \
target. Other kinds fail at once (the message itself is wrong); when every target failed the \
last failure is the step's, with a detail saying how many were tried.\n\
- `sticky`: by `key`, a jq expression on the JSON body (with `$headers`, `$meta`): the same key \
always goes to the same target while the targets are unchanged (a stable hash, spread in \
proportion to `weight`). A body that is not JSON fails with `invalid_input`; a key that fails, \
with `expression`.\n\n\
The message keeps its acknowledgement whichever target takes it; a failover hands it from one \
attempt to the next. A failure of the chosen target (other than failover's retries) is the \
failure of the step. Limits: 1 to 64 targets, weights from 1 to 1000. Counters are per step \
instance and start again when the flow restarts.",
    )
    .field(
        FieldSpec::new(
            "strategy",
            FieldType::Enum(vec!["round_robin", "weighted", "random", "failover", "sticky"]),
            "How the target is picked.",
        )
        .default_value("round_robin"),
    )
    .field(
        FieldSpec::new(
            "targets",
            FieldType::List(Box::new(FieldType::Object(vec![
                FieldSpec::new("steps", FieldType::Steps, "The steps of this target.").required(),
                FieldSpec::new(
                    "weight",
                    FieldType::Integer {
                        min: Some(1),
                        max: Some(1000),
                    },
                    "Share of the messages for `weighted`, `random` and `sticky`.",
                )
                .default_value(1),
            ]))),
            "The targets, 1 to 64.",
        )
        .required(),
    )
    .field(FieldSpec::new(
        "key",
        FieldType::Jq,
        "For `sticky` (and only there): jq giving the key that picks the target.",
    ))
    .example(
        "Three to one between two pricing engines",
        "strategy: weighted\ntargets:\n  - weight: 3\n    steps: [{set_header: {name: x-engine, value: new}}]\n  - weight: 1\n    steps: [{set_header: {name: x-engine, value: old}}]\n",
    )
    .example(
        "Keep each customer on one shard",
        "strategy: sticky\nkey: '.customer_id'\ntargets:\n  - steps: [{set_header: {name: x-shard, value: a}}]\n  - steps: [{set_header: {name: x-shard, value: b}}]\n",
    )
}

const MAX_TARGETS: usize = 64;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Strategy {
    #[default]
    RoundRobin,
    Weighted,
    Random,
    Failover,
    Sticky,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    strategy: Strategy,
    targets: Vec<TargetConfig>,
    key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetConfig {
    steps: Value,
    #[serde(default = "one_share")]
    weight: u32,
}

fn one_share() -> u32 {
    1
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    if config.targets.is_empty() || config.targets.len() > MAX_TARGETS {
        return Err(BuildError::field(
            "targets",
            format!("give 1 to {MAX_TARGETS} targets"),
        ));
    }
    let key = match (config.strategy, &config.key) {
        (Strategy::Sticky, Some(code)) => Some(ctx.steps.compile_jq("key", code)?),
        (Strategy::Sticky, None) => {
            return Err(BuildError::field(
                "key",
                "the `sticky` strategy needs a `key` (jq picking the target)",
            ));
        }
        (_, Some(_)) => {
            return Err(BuildError::field(
                "key",
                "`key` is only used by the `sticky` strategy",
            ));
        }
        (_, None) => None,
    };
    let mut targets = Vec::with_capacity(config.targets.len());
    let mut weights = Vec::with_capacity(config.targets.len());
    for (i, target) in config.targets.iter().enumerate() {
        targets.push(
            ctx.steps
                .build_steps(&format!("targets[{i}].steps"), &target.steps)?,
        );
        weights.push(u64::from(target.weight.max(1)));
    }
    Ok(Arc::new(LoadBalance {
        picker: Picker::new(config.strategy, weights),
        targets,
        key,
    }))
}

/// Picks target positions; the state of the turn-based strategies.
struct Picker {
    strategy: Strategy,
    weights: Vec<u64>,
    next: AtomicUsize,
    /// Smooth weighted round robin: each target's current credit.
    credit: Mutex<Vec<i64>>,
}

impl Picker {
    fn new(strategy: Strategy, weights: Vec<u64>) -> Self {
        let credit = Mutex::new(vec![0; weights.len()]);
        Picker {
            strategy,
            weights,
            next: AtomicUsize::new(0),
            credit,
        }
    }

    fn total(&self) -> u64 {
        self.weights.iter().sum()
    }

    /// The target whose weight bucket holds `point` (taken modulo the total weight).
    fn bucket(&self, point: u64) -> usize {
        let mut point = point % self.total().max(1);
        for (i, w) in self.weights.iter().enumerate() {
            if point < *w {
                return i;
            }
            point -= w;
        }
        0
    }

    /// Smooth weighted round robin (as in nginx): every target gains its weight, the richest is
    /// picked and pays the total; ties go to the first.
    fn weighted(&self) -> usize {
        let Ok(mut credit) = self.credit.lock() else {
            return 0;
        };
        let total = i64::try_from(self.total()).unwrap_or(i64::MAX);
        let mut best = 0;
        for (i, w) in self.weights.iter().enumerate() {
            credit[i] += i64::try_from(*w).unwrap_or(0);
            if credit[i] > credit[best] {
                best = i;
            }
        }
        credit[best] -= total;
        best
    }

    /// The target for a message whose sticky key is `key` (ignored by the other strategies).
    fn pick(&self, key: Option<&str>) -> usize {
        match self.strategy {
            Strategy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % self.weights.len(),
            Strategy::Weighted => self.weighted(),
            Strategy::Random => self.bucket(fastrand::u64(..)),
            Strategy::Failover => 0,
            Strategy::Sticky => self.bucket(fnv1a(key.unwrap_or_default().as_bytes())),
        }
    }
}

/// FNV-1a: a hash that is the same in every process and release, so a key keeps its target
/// across restarts.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

struct LoadBalance {
    picker: Picker,
    targets: Vec<Arc<dyn Processor>>,
    key: Option<Arc<dyn JqProgram>>,
}

impl LoadBalance {
    async fn key(&self, msg: &Message) -> Result<Option<String>, ProcessError> {
        let Some(program) = &self.key else {
            return Ok(None);
        };
        let body = msg
            .body
            .json_shared()
            .map_err(|e| ProcessError::invalid_input(e.to_string()))?;
        Ok(Some(
            match program.run(body, msg).await?.into_iter().next() {
                Some(Value::String(s)) => s,
                Some(other) => other.to_string(),
                None => String::new(),
            },
        ))
    }

    /// Runs `msg` through target `i` and marks what comes out.
    async fn through(&self, i: usize, msg: Message) -> Result<Outputs, Failure> {
        let mut outputs = self.targets[i].process(msg).await?;
        for out in &mut outputs {
            out.headers.insert(TARGET_HEADER.to_owned(), i.to_string());
        }
        Ok(outputs)
    }

    /// Tries every target in order while they fail with a retryable kind.
    async fn failover(&self, msg: Message) -> Result<Outputs, Failure> {
        let original = msg.detached();
        let mut attempt = msg;
        for i in 0..self.targets.len() {
            let mut failure = match self.through(i, attempt).await {
                Ok(outputs) => return Ok(outputs),
                Err(failure) => failure,
            };
            let last = i + 1 == self.targets.len();
            if last || !RETRYABLE.contains(&failure.error.kind) {
                if i > 0 {
                    failure.error.detail = format!(
                        "{} targets tried, the last failed: {}",
                        i + 1,
                        failure.error.detail
                    );
                }
                return Err(failure);
            }
            tracing::debug!(target_index = i, error = %failure.error, "load_balance failing over");
            // The next target gets the original again, holding the failed attempt's shares.
            attempt = original.detached();
            for token in failure.message.take_acks() {
                attempt = attempt.with_ack(token);
            }
        }
        // Unreachable: the loop returns on the last target.
        Err(Failure::new(
            original,
            ProcessError::new(ErrorKind::Internal, "no target to fail over to"),
        ))
    }
}

#[async_trait]
impl Processor for LoadBalance {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        if self.picker.strategy == Strategy::Failover {
            return self.failover(msg).await;
        }
        let key = match self.key(&msg).await {
            Ok(key) => key,
            Err(e) => return Err(Failure::new(msg, e)),
        };
        let i = self.picker.pick(key.as_deref());
        self.through(i, msg).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process, try_build};
    use serde_json::json;
    use sluice_core::{AckToken, Outcome};

    fn targets(weights: &[u32]) -> Value {
        Value::Array(
            weights
                .iter()
                .map(|w| json!({"weight": w, "steps": [{"log": "x"}]}))
                .collect(),
        )
    }

    async fn picks(step: &Arc<dyn Processor>, bodies: &[Value]) -> Vec<String> {
        let mut out = Vec::new();
        for body in bodies {
            let msgs = process(step, Message::json(body.clone())).await.unwrap();
            out.push(msgs[0].headers[TARGET_HEADER].clone());
        }
        out
    }

    #[tokio::test]
    async fn round_robin_takes_turns_ignoring_weights() {
        let step = build_one("load_balance", json!({"targets": targets(&[5, 1, 1])}));
        let got = picks(&step, &vec![json!(null); 7]).await;
        assert_eq!(got, ["0", "1", "2", "0", "1", "2", "0"]);
    }

    #[tokio::test]
    async fn weighted_spreads_turns_in_proportion() {
        let step = build_one(
            "load_balance",
            json!({"strategy": "weighted", "targets": targets(&[3, 1])}),
        );
        let got = picks(&step, &vec![json!(null); 8]).await;
        assert_eq!(got, ["0", "0", "1", "0", "0", "0", "1", "0"]);
        let step = build_one(
            "load_balance",
            json!({"strategy": "weighted", "targets": targets(&[5, 1, 1])}),
        );
        let got = picks(&step, &vec![json!(null); 7]).await;
        assert_eq!(got, ["0", "0", "1", "0", "2", "0", "0"]);
    }

    #[tokio::test]
    async fn random_only_picks_existing_targets_and_reaches_each() {
        let step = build_one(
            "load_balance",
            json!({"strategy": "random", "targets": targets(&[1, 1])}),
        );
        let got = picks(&step, &vec![json!(null); 200]).await;
        assert!(got.iter().all(|t| t == "0" || t == "1"));
        assert!(got.contains(&"0".to_owned()) && got.contains(&"1".to_owned()));
        // The bucket arithmetic: weights [1, 3] cover points 0 | 1 2 3.
        let picker = Picker::new(Strategy::Random, vec![1, 3]);
        let buckets: Vec<usize> = (0..5).map(|p| picker.bucket(p)).collect();
        assert_eq!(buckets, [0, 1, 1, 1, 0]);
    }

    #[tokio::test]
    async fn sticky_keeps_a_key_on_one_target() {
        let step = build_one(
            "load_balance",
            json!({"strategy": "sticky", "key": ".customer", "targets": targets(&[1, 1, 1])}),
        );
        let customers: Vec<Value> = (0..30)
            .map(|i| json!({"customer": format!("c{i}")}))
            .collect();
        let first = picks(&step, &customers).await;
        let again = picks(&step, &customers).await;
        assert_eq!(first, again);
        // Thirty keys over three targets use more than one of them.
        assert!(first.iter().any(|t| t != &first[0]));
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let failure = process(&step, Message::bytes(&b"not json"[..]))
            .await
            .unwrap_err();
        assert_eq!(failure.error.kind, ErrorKind::InvalidInput);
    }

    /// Fails with its kind; flow steps cannot fail with an arbitrary kind, so tests use this.
    struct Fails(ErrorKind);

    #[async_trait]
    impl Processor for Fails {
        async fn process(&self, mut msg: Message) -> Result<Outputs, Failure> {
            // What a half-done target leaves behind must not reach the next one.
            msg.headers.insert("dirty".into(), "yes".into());
            Err(Failure::new(msg, ProcessError::new(self.0, "target down")))
        }
    }

    fn with_targets(strategy: Strategy, targets: Vec<Arc<dyn Processor>>) -> LoadBalance {
        LoadBalance {
            picker: Picker::new(strategy, vec![1; targets.len()]),
            targets,
            key: None,
        }
    }

    #[tokio::test]
    async fn failover_moves_on_after_retryable_failures_with_the_original() {
        let step = with_targets(
            Strategy::Failover,
            vec![
                Arc::new(Fails(ErrorKind::Unavailable)),
                Arc::new(Fails(ErrorKind::Timeout)),
                build_one("transform", json!(". + {served: true}")),
            ],
        );
        let (token, rx) = AckToken::channel();
        let out = step
            .process(Message::json(json!({"n": 1})).with_ack(token))
            .await
            .unwrap();
        assert_eq!(
            out[0].body.json().unwrap(),
            &json!({"n": 1, "served": true})
        );
        assert_eq!(out[0].headers[TARGET_HEADER], "2");
        assert!(!out[0].headers.contains_key("dirty"));
        assert_eq!(out[0].ack_count(), 1);
        out.into_iter().for_each(Message::ack);
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
    }

    #[tokio::test]
    async fn failover_stops_at_a_non_retryable_kind_or_the_last_target() {
        let step = with_targets(
            Strategy::Failover,
            vec![
                Arc::new(Fails(ErrorKind::Io)),
                Arc::new(Fails(ErrorKind::InvalidInput)),
                build_one("transform", json!("1")),
            ],
        );
        let failure = step.process(Message::json(json!(1))).await.unwrap_err();
        assert_eq!(failure.error.kind, ErrorKind::InvalidInput);
        assert!(
            failure.error.detail.starts_with("2 targets tried"),
            "{}",
            failure.error.detail
        );

        let step = with_targets(
            Strategy::Failover,
            vec![
                Arc::new(Fails(ErrorKind::Remote)),
                Arc::new(Fails(ErrorKind::Io)),
            ],
        );
        let (token, rx) = AckToken::channel();
        let failure = step
            .process(Message::json(json!(1)).with_ack(token))
            .await
            .unwrap_err();
        assert_eq!(failure.error.kind, ErrorKind::Io);
        assert_eq!(
            failure.message.ack_count(),
            1,
            "the source's one share travels"
        );
        failure.message.nack("all down");
        assert_eq!(rx.await.unwrap(), Outcome::Nack("all down".into()));
    }

    #[test]
    fn key_goes_with_sticky_only() {
        let t = targets(&[1]);
        assert!(try_build("load_balance", &json!({"strategy": "sticky", "targets": t})).is_err());
        let e = try_build("load_balance", &json!({"key": ".a", "targets": t}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("key"));
        let e = try_build("load_balance", &json!({"targets": []}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("targets"));
    }
}
