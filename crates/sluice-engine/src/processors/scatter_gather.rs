//! `scatter_gather`: sends a request to several branches at once, waits for their replies within
//! a timeout and merges them into one message (EIP Scatter-Gather).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    Body, BuildContext, BuildError, ErrorKind, Failure, Message, Outputs, ProcessError, Processor,
};

use super::common;
use super::fanout::{self, Gather, Outcome, Plan};
use super::routes::valid_name;

/// Set on the merged message, with `partial: ignore`, to the comma-separated names of the branches
/// that failed or timed out.
pub const FAILED_HEADER: &str = "sluice.scatter_gather.failed";

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "scatter_gather",
        ComponentKind::Processor,
        "Send a request to several branches at once and merge their replies",
    )
    .description(
        "Every branch receives a copy of the message and all run concurrently; each must finish \
within `timeout`. The replies (the body of a branch's output message, `null` if it produced \
none, an array if several; a body that is not JSON is given as a string) are merged by `merge`, \
a jq expression that sees `.` = the array of replies in branch order and `$original` = the \
request body. Its first value becomes the body of the one message that continues (the original \
message's id and headers). Without `merge` the body is the array of replies.\n\n\
**Partial results.** With `partial: fail` (the default) a branch that fails or times out fails \
the step: with the branch's error kind (`timeout` for a timeout) and a detail naming the branch. \
With `partial: ignore` the step goes on with what came back: `.` holds the replies of the \
branches that succeeded, in branch order, and the header `sluice.scatter_gather.failed` lists \
the names of the others, comma-separated (it is removed when every branch replied).\n\n\
**Acknowledgement.** Branches are request-reply calls: their copies hold no share of the \
source's acknowledgement (a timed-out call is abandoned, and must not nack the source). The \
continuing message carries the source's acknowledgement; a branch's side effects are not part of \
it. A timed-out branch is cancelled where it waits.\n\n\
A `merge` that fails, or gives no value, fails the step with `expression`. Limits: 1 to 64 \
branches; `timeout` up to 1h.",
    )
    .field(
        FieldSpec::new(
            "branches",
            FieldType::List(Box::new(FieldType::Object(vec![
                FieldSpec::new(
                    "name",
                    FieldType::String,
                    "The branch's name, for errors and the failed header: letters, digits, `_` and `-`.",
                )
                .required(),
                FieldSpec::new("steps", FieldType::Steps, "The steps making the request.").required(),
            ]))),
            "The branches, 1 to 64, with unique names.",
        )
        .required(),
    )
    .field(
        FieldSpec::new(
            "timeout",
            FieldType::Duration,
            "Longest one branch may take; up to 1h.",
        )
        .default_value("30s"),
    )
    .field(FieldSpec::new(
        "merge",
        FieldType::String,
        "A jq expression over the array of replies (`.`) and `$original`, giving the merged body; without it the body is the array. Checked when the flow is built.",
    ))
    .field(
        FieldSpec::new(
            "partial",
            FieldType::Enum(vec!["fail", "ignore"]),
            "What a failed or timed-out branch does: fail the step, or be left out of the merge.",
        )
        .default_value("fail"),
    )
    .example(
        "Best quote from three suppliers within two seconds",
        "branches:\n  - name: acme\n    steps: [{transform: '{supplier: \"acme\", price: (.qty * 10)}'}]\n  - name: globex\n    steps: [{transform: '{supplier: \"globex\", price: (.qty * 9)}'}]\n  - name: initech\n    steps: [{delay: 5s}, {transform: '{supplier: \"initech\", price: 1}'}]\ntimeout: 2s\npartial: ignore\nmerge: 'min_by(.price) + {request: $original}'\n",
    )
}

const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    branches: Vec<BranchConfig>,
    #[serde(default = "thirty_seconds")]
    timeout: HumanDuration,
    merge: Option<String>,
    #[serde(default)]
    partial: Partial,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BranchConfig {
    name: String,
    steps: Value,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Partial {
    #[default]
    Fail,
    Ignore,
}

fn thirty_seconds() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    fanout::check_branch_count(config.branches.len())?;
    if config.timeout.0.is_zero() || config.timeout.0 > MAX_TIMEOUT {
        return Err(BuildError::field(
            "timeout",
            "give a timeout above 0 and up to 1h",
        ));
    }
    let mut names: Vec<String> = Vec::with_capacity(config.branches.len());
    let mut branches = Vec::with_capacity(config.branches.len());
    for (i, branch) in config.branches.iter().enumerate() {
        let field = format!("branches[{i}].name");
        if !valid_name(&branch.name) {
            return Err(BuildError::field(
                field,
                "a branch name may only use letters, digits, `_` and `-`",
            ));
        }
        if names.contains(&branch.name) {
            return Err(BuildError::field(
                field,
                format!("branch name `{}` is used twice", branch.name),
            ));
        }
        names.push(branch.name.clone());
        branches.push(
            ctx.steps
                .build_steps(&format!("branches[{i}].steps"), &branch.steps)?,
        );
    }
    let merge = match &config.merge {
        Some(code) => Some(Gather::compile(ctx, "merge", code)?),
        None => None,
    };
    Ok(Arc::new(ScatterGather {
        names,
        branches,
        timeout: config.timeout.0,
        merge,
        partial: config.partial,
    }))
}

struct ScatterGather {
    names: Vec<String>,
    branches: Vec<Arc<dyn Processor>>,
    timeout: Duration,
    merge: Option<Gather>,
    partial: Partial,
}

#[async_trait]
impl Processor for ScatterGather {
    async fn process(&self, mut msg: Message) -> Result<Outputs, Failure> {
        let copies = self.branches.iter().map(|_| msg.detached()).collect();
        let plan = Plan {
            parallel: true,
            stop_on_failure: false,
            timeout: Some(self.timeout),
        };
        let outcomes = fanout::run(&self.branches, copies, plan).await;
        let mut replies = Vec::with_capacity(outcomes.len());
        let mut failed = Vec::new();
        let mut first_error = None;
        for (name, outcome) in self.names.iter().zip(outcomes) {
            let error = match outcome {
                Outcome::Replied(outputs) => {
                    replies.push(fanout::reply_value(&outputs));
                    continue;
                }
                Outcome::Failed(failure) => {
                    let mut error = failure.error;
                    error.detail = format!("branch `{name}` failed: {}", error.detail);
                    error
                }
                Outcome::TimedOut => ProcessError::new(
                    ErrorKind::Timeout,
                    format!(
                        "branch `{name}` did not reply within {}",
                        HumanDuration(self.timeout)
                    ),
                ),
                // Branches all run at once: none is skipped.
                Outcome::Skipped(_) => continue,
            };
            failed.push(name.as_str());
            first_error.get_or_insert(error);
        }
        if let (Some(error), Partial::Fail) = (first_error, self.partial) {
            return Err(Failure::new(msg, error));
        }
        if failed.is_empty() {
            msg.headers.remove(FAILED_HEADER);
        } else {
            msg.headers
                .insert(FAILED_HEADER.to_owned(), failed.join(","));
        }
        let body = match &self.merge {
            Some(merge) => match merge.apply(replies, &msg).await {
                Ok(body) => body,
                Err(e) => return Err(Failure::new(msg, e.in_step("merge"))),
            },
            None => Value::Array(replies),
        };
        msg.body = Body::from_json(body);
        Ok(common::one(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process, try_build};
    use serde_json::json;
    use sluice_core::{AckToken, Outcome as AckOutcome};

    /// Three suppliers: `fast` answers at once, `slow` after `.slow_ms`, `broken` fails when
    /// `.break` is set.
    #[allow(clippy::needless_pass_by_value)]
    fn suppliers(extra: Value) -> Arc<dyn Processor> {
        let mut config = json!({
            "branches": [
                {"name": "fast", "steps": [{"transform": "{s: \"fast\", price: 10}"}]},
                {"name": "slow", "steps": [{"delay": {"until": ".slow_ms"}},
                                           {"transform": "{s: \"slow\", price: 5}"}]},
                {"name": "broken", "steps": [{"transform": "if .break then error(\"down\") else {s: \"broken\", price: 7} end"}]}
            ],
            "timeout": "1s"
        });
        config
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        build_one("scatter_gather", config)
    }

    #[tokio::test(start_paused = true)]
    async fn gathers_every_reply_in_branch_order() {
        let step = suppliers(json!({}));
        let started = tokio::time::Instant::now();
        let out = process(
            &step,
            Message::json(json!({"slow_ms": 500, "break": false})),
        )
        .await
        .unwrap();
        assert_eq!(
            out[0].body.json().unwrap(),
            &json!([{"s": "fast", "price": 10}, {"s": "slow", "price": 5}, {"s": "broken", "price": 7}])
        );
        assert!(!out[0].headers.contains_key(FAILED_HEADER));
        // Concurrent: the slowest branch sets the pace.
        assert_eq!(started.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_fails_the_step_by_default() {
        let step = suppliers(json!({}));
        let (token, rx) = AckToken::channel();
        let started = tokio::time::Instant::now();
        let failure = process(
            &step,
            Message::json(json!({"slow_ms": 5000, "break": false})).with_ack(token),
        )
        .await
        .unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert_eq!(failure.error.kind, ErrorKind::Timeout);
        assert!(
            failure.error.detail.contains("`slow`"),
            "{}",
            failure.error.detail
        );
        // The source's only share is in the failure: the abandoned branch held none.
        assert_eq!(failure.message.ack_count(), 1);
        failure.message.ack();
        assert_eq!(rx.await.unwrap(), AckOutcome::Ack);
    }

    #[tokio::test(start_paused = true)]
    async fn partial_ignore_merges_what_came_back_and_names_the_rest() {
        let step = suppliers(json!({
            "partial": "ignore",
            "merge": "{best: (min_by(.price) | .s), replies: length, qty: $original.qty}"
        }));
        let (token, rx) = AckToken::channel();
        let msg = Message::json(json!({"slow_ms": 5000, "break": true, "qty": 3}))
            .with_header(FAILED_HEADER, "stale")
            .with_ack(token);
        let out = process(&step, msg).await.unwrap();
        assert_eq!(
            out[0].body.json().unwrap(),
            &json!({"best": "fast", "replies": 1, "qty": 3})
        );
        assert_eq!(out[0].headers[FAILED_HEADER], "slow,broken");
        out.into_iter().for_each(Message::ack);
        assert_eq!(rx.await.unwrap(), AckOutcome::Ack);
        // Every branch back: the header goes.
        let msg = Message::json(json!({"slow_ms": 0, "break": false, "qty": 1}))
            .with_header(FAILED_HEADER, "stale");
        let out = process(&step, msg).await.unwrap();
        assert!(!out[0].headers.contains_key(FAILED_HEADER));
    }

    #[tokio::test]
    async fn a_failed_branch_is_named_and_keeps_its_kind() {
        let step = suppliers(json!({}));
        let failure = process(&step, Message::json(json!({"slow_ms": 0, "break": true})))
            .await
            .unwrap_err();
        assert_eq!(failure.error.kind, ErrorKind::Expression);
        assert!(
            failure.error.detail.starts_with("branch `broken` failed: "),
            "{}",
            failure.error.detail
        );
    }

    #[test]
    fn names_must_be_unique_words() {
        let branch = |name: &str| json!({"name": name, "steps": [{"log": "x"}]});
        let e = try_build(
            "scatter_gather",
            &json!({"branches": [branch("a"), branch("a")]}),
        )
        .err()
        .unwrap();
        assert_eq!(e.field.as_deref(), Some("branches[1].name"));
        let e = try_build("scatter_gather", &json!({"branches": [branch("a,b")]}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("branches[0].name"));
    }
}
