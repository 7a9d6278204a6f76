//! `multicast`: runs a copy of each message through several branches and continues with one
//! message (EIP Recipient List with static recipients, Camel's multicast).

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{Body, BuildContext, BuildError, Failure, Message, Outputs, Processor};

use super::common;
use super::fanout::{self, Gather, Outcome, Plan};

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "multicast",
        ComponentKind::Processor,
        "Run a copy of each message through several branches, then continue with one message",
    )
    .description(
        "Each branch (a list of steps) receives its own copy of the message: same id, headers and \
body. With `parallel: true` (the default) the branches run concurrently; with `false` they run \
one after the other in the order written.\n\n\
**Output.** Once every branch has finished, one message continues: the original message (its id \
and headers) with, as body, the result of `aggregate`, a jq expression that sees `.` = the array \
of the branch replies in branch order and `$original` = the original body. A branch's reply is \
the body of its output message, `null` if it produced none (a filter dropped it), or the array \
of the bodies if it produced several. A body that is not JSON is given as a string. Without \
`aggregate` the original body continues unchanged: branches are for their side effects; write \
`aggregate: '.[-1]'` for the last reply (Camel's default) or `aggregate: '.'` for all of them. An \
`aggregate` that gives no value fails the step with `expression`.\n\n\
**Acknowledgement.** Every copy holds a share of the source's acknowledgement, and the shares of \
the branch outputs are merged into the continuing message: the source is acknowledged exactly \
once, when that message is done (delivered by every target), and so only after all the work the \
branches derived from it is done.\n\n\
**Failure.** A branch that fails fails the step with its error kind and a detail naming the branch \
(`branch 1: ...`); the failure carries the original message (for `catch`, `on_error`, the dead \
letter), which holds the shares of every branch, so the source is nacked unless the failure is \
handled. With `stop_on_failure: true` and `parallel: false`, the branches after the failed one \
are not run; in parallel every branch is already running, so all finish before the failure is \
reported (as in Camel). With `stop_on_failure: false` (the default) every branch runs and the \
first failure in branch order is reported.\n\n\
Limits: 1 to 64 branches.",
    )
    .field(
        FieldSpec::new(
            "branches",
            FieldType::List(Box::new(FieldType::Steps)),
            "The branches, each a list of steps; 1 to 64.",
        )
        .required(),
    )
    .field(
        FieldSpec::new(
            "parallel",
            FieldType::Bool,
            "Run the branches concurrently; `false` runs them in order.",
        )
        .default_value(true),
    )
    .field(
        FieldSpec::new(
            "stop_on_failure",
            FieldType::Bool,
            "In order (`parallel: false`): do not run the branches after a failed one.",
        )
        .default_value(false),
    )
    .field(FieldSpec::new(
        "aggregate",
        FieldType::String,
        "A jq expression over the array of branch replies (`.`) and `$original`, giving the \
continuing body; without it the original body continues. Checked when the flow is built.",
    ))
    .example(
        "Notify two systems, continue with the original",
        "branches:\n  - - set_header: {name: x-system, value: billing}\n    - log: 'billing {{ body.id }}'\n  - - log: 'shipping {{ body.id }}'\n",
    )
    .example(
        "Ask two pricing steps and keep the cheaper offer",
        "branches:\n  - - transform: '{price: (.qty * 10)}'\n  - - transform: '{price: (.qty * 9 + 5)}'\naggregate: 'min_by(.price) + {order: $original.id}'\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    branches: Vec<Value>,
    #[serde(default = "yes")]
    parallel: bool,
    #[serde(default)]
    stop_on_failure: bool,
    aggregate: Option<String>,
}

fn yes() -> bool {
    true
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    fanout::check_branch_count(config.branches.len())?;
    let branches = config
        .branches
        .iter()
        .enumerate()
        .map(|(i, steps)| ctx.steps.build_steps(&format!("branches[{i}]"), steps))
        .collect::<Result<Vec<_>, _>>()?;
    let aggregate = match &config.aggregate {
        Some(code) => Some(Gather::compile(ctx, "aggregate", code)?),
        None => None,
    };
    Ok(Arc::new(Multicast {
        branches,
        plan: Plan {
            parallel: config.parallel,
            stop_on_failure: config.stop_on_failure,
            timeout: None,
        },
        aggregate,
    }))
}

struct Multicast {
    branches: Vec<Arc<dyn Processor>>,
    plan: Plan,
    aggregate: Option<Gather>,
}

#[async_trait]
impl Processor for Multicast {
    async fn process(&self, mut msg: Message) -> Result<Outputs, Failure> {
        // Each copy is a new share of the source's acknowledgement.
        let copies = self.branches.iter().map(|_| msg.clone()).collect();
        let outcomes = fanout::run(&self.branches, copies, self.plan).await;
        let mut replies = Vec::with_capacity(outcomes.len());
        let mut first_error = None;
        for (i, outcome) in outcomes.into_iter().enumerate() {
            match outcome {
                Outcome::Replied(outputs) => {
                    replies.push(fanout::reply_value(&outputs));
                    outputs.into_iter().for_each(|out| msg.absorb_acks(out));
                }
                Outcome::Failed(failure) => {
                    if first_error.is_none() {
                        let mut error = failure.error;
                        error.detail = format!("branch {i}: {}", error.detail);
                        first_error = Some(error);
                    }
                    msg.absorb_acks(failure.message);
                }
                Outcome::Skipped(copy) => msg.absorb_acks(copy),
                // No timeout is set for a multicast.
                Outcome::TimedOut => {}
            }
        }
        if let Some(error) = first_error {
            return Err(Failure::new(msg, error));
        }
        let Some(aggregate) = &self.aggregate else {
            return Ok(common::one(msg));
        };
        match aggregate.apply(replies, &msg).await {
            Ok(body) => {
                msg.body = Body::from_json(body);
                Ok(common::one(msg))
            }
            Err(e) => Err(Failure::new(msg, e.in_step("aggregate"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process, try_build};
    use serde_json::json;
    use sluice_core::{AckToken, ErrorKind, Outcome as AckOutcome};

    fn body(m: &Message) -> Value {
        m.body.json().unwrap().clone()
    }

    #[tokio::test]
    async fn without_aggregate_the_original_continues() {
        let step = build_one(
            "multicast",
            json!({"branches": [[{"transform": "{a: 1}"}], [{"transform": "{b: 2}"}]]}),
        );
        let msg = Message::json(json!({"id": 7})).with_header("h", "v");
        let id = msg.id();
        let out = process(&step, msg).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].id(), body(&out[0])), (id, json!({"id": 7})));
        assert_eq!(out[0].headers["h"], "v");
    }

    #[tokio::test(start_paused = true)]
    async fn aggregate_sees_replies_in_branch_order_and_the_original() {
        for parallel in [true, false] {
            let step = build_one(
                "multicast",
                json!({
                    "parallel": parallel,
                    "branches": [
                        [{"delay": "20ms"}, {"transform": ".n * 2"}],
                        [{"transform": ".n + 1"}],
                        [{"filter": "false"}]
                    ],
                    "aggregate": "{replies: ., original: $original}"
                }),
            );
            let out = process(&step, Message::json(json!({"n": 5})))
                .await
                .unwrap();
            assert_eq!(
                body(&out[0]),
                json!({"replies": [10, 6, null], "original": {"n": 5}}),
                "parallel: {parallel}"
            );
        }
    }

    #[tokio::test]
    async fn the_source_is_acked_once_after_the_output_and_every_branch() {
        let step = build_one(
            "multicast",
            json!({"branches": [[{"transform": "1"}], [{"filter": "false"}], [{"transform": "3"}]],
                   "aggregate": "add"}),
        );
        let (token, mut rx) = AckToken::channel();
        let out = process(&step, Message::json(json!({})).with_ack(token))
            .await
            .unwrap();
        assert_eq!(body(&out[0]), json!(4));
        // The original's share and the two replying branches' shares; the filter acked its own.
        assert_eq!(out[0].ack_count(), 3);
        assert!(rx.try_recv().is_err(), "acked before the output was done");
        out.into_iter().for_each(Message::ack);
        assert_eq!(rx.await.unwrap(), AckOutcome::Ack);
    }

    #[tokio::test]
    async fn a_failed_branch_fails_the_step_with_every_share() {
        let step = build_one(
            "multicast",
            json!({"branches": [[{"transform": "1"}], [{"transform": ".x.y"}], [{"transform": "3"}]]}),
        );
        let (token, rx) = AckToken::channel();
        let failure = process(&step, Message::json(json!({"x": "text"})).with_ack(token))
            .await
            .unwrap_err();
        assert_eq!(failure.error.kind, ErrorKind::Expression);
        assert!(
            failure.error.detail.starts_with("branch 1: "),
            "{}",
            failure.error.detail
        );
        // The failure carries the original body and the shares of all three copies.
        assert_eq!(body(&failure.message), json!({"x": "text"}));
        assert_eq!(failure.message.ack_count(), 4);
        failure.message.nack("branch failed");
        assert_eq!(rx.await.unwrap(), AckOutcome::Nack("branch failed".into()));
    }

    /// Counts the messages it sees and passes them on.
    #[derive(Default)]
    struct Counter(std::sync::atomic::AtomicUsize);

    #[async_trait]
    impl Processor for Counter {
        async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(common::one(msg))
        }
    }

    #[tokio::test]
    async fn stop_on_failure_in_order_leaves_the_later_branches_unrun() {
        for (stop, runs) in [(true, 0), (false, 1)] {
            let counter = Arc::new(Counter::default());
            let step = Multicast {
                branches: vec![
                    build_one("transform", json!("error(\"first\")")),
                    Arc::clone(&counter) as Arc<dyn Processor>,
                ],
                plan: Plan {
                    parallel: false,
                    stop_on_failure: stop,
                    timeout: None,
                },
                aggregate: None,
            };
            let (token, rx) = AckToken::channel();
            let failure = step
                .process(Message::json(json!(1)).with_ack(token))
                .await
                .unwrap_err();
            assert!(
                failure.error.detail.starts_with("branch 0: "),
                "{}",
                failure.error.detail
            );
            assert_eq!(counter.0.load(std::sync::atomic::Ordering::SeqCst), runs);
            // The unrun copy's share went into the failure, so the outcome is the handler's.
            assert_eq!(failure.message.ack_count(), 3);
            failure.message.ack();
            assert_eq!(rx.await.unwrap(), AckOutcome::Ack, "dead-lettered: acked");
        }
    }

    #[tokio::test]
    async fn an_aggregate_may_define_functions_and_read_headers() {
        let step = build_one(
            "multicast",
            json!({"branches": [[{"transform": "1"}], [{"transform": "2"}]],
                   "aggregate": "def total: add; {total: total, tenant: $headers.tenant, was: $original}"}),
        );
        let out = process(
            &step,
            Message::json(json!("x")).with_header("tenant", "acme"),
        )
        .await
        .unwrap();
        assert_eq!(
            body(&out[0]),
            json!({"total": 3, "tenant": "acme", "was": "x"})
        );
    }

    #[tokio::test]
    async fn an_aggregate_without_value_is_an_expression_failure() {
        let step = build_one(
            "multicast",
            json!({"branches": [[{"transform": "1"}]], "aggregate": "empty"}),
        );
        let failure = process(&step, Message::json(json!(1))).await.unwrap_err();
        assert_eq!(failure.error.kind, ErrorKind::Expression);
    }

    #[test]
    fn build_errors() {
        let e = try_build("multicast", &json!({"branches": []}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("branches"));
        let e = try_build(
            "multicast",
            &json!({"branches": [[{"log": "x"}]], "aggregate": ".["}),
        )
        .err()
        .unwrap();
        assert_eq!(e.field.as_deref(), Some("aggregate"));
    }
}
