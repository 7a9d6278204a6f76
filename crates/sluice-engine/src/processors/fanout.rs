//! Running copies of one message through several branches and gathering what they answer:
//! shared by `multicast` and `scatter_gather`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::{BuildContext, BuildError, Failure, Message, Outputs, ProcessError, Processor};

/// The most branches one fan-out step may have.
const MAX_BRANCHES: usize = 64;

/// Checks the size of a `branches:` list at build time; one limit for every fan-out step, since
/// each branch holds a copy of the message at once.
pub(crate) fn check_branch_count(count: usize) -> Result<(), BuildError> {
    if count == 0 || count > MAX_BRANCHES {
        return Err(BuildError::field(
            "branches",
            format!("give 1 to {MAX_BRANCHES} branches"),
        ));
    }
    Ok(())
}

/// What became of one branch.
pub(crate) enum Outcome {
    /// The branch finished with these messages.
    Replied(Outputs),
    /// The branch failed.
    Failed(Failure),
    /// The branch did not finish within its timeout; its copy was dropped with it.
    TimedOut,
    /// The branch was not started (an earlier one failed); its unused copy.
    Skipped(Message),
}

/// How branches run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// All at once on the calling task, or one after the other in order.
    pub parallel: bool,
    /// In order: leave the later branches unstarted once one fails.
    pub stop_on_failure: bool,
    /// Longest one branch may take.
    pub timeout: Option<Duration>,
}

/// Runs `copies[i]` through `branches[i]`; outcomes in branch order.
pub(crate) async fn run(
    branches: &[Arc<dyn Processor>],
    copies: Vec<Message>,
    plan: Plan,
) -> Vec<Outcome> {
    if plan.parallel {
        let runs = branches
            .iter()
            .zip(copies)
            .map(|(branch, copy)| one(branch, copy, plan.timeout));
        return futures_util::future::join_all(runs).await;
    }
    let mut outcomes = Vec::with_capacity(branches.len());
    let mut failed = false;
    for (branch, copy) in branches.iter().zip(copies) {
        if failed && plan.stop_on_failure {
            outcomes.push(Outcome::Skipped(copy));
            continue;
        }
        let outcome = one(branch, copy, plan.timeout).await;
        failed |= matches!(outcome, Outcome::Failed(_) | Outcome::TimedOut);
        outcomes.push(outcome);
    }
    outcomes
}

async fn one(branch: &Arc<dyn Processor>, copy: Message, timeout: Option<Duration>) -> Outcome {
    let result = match timeout {
        Some(limit) => match tokio::time::timeout(limit, branch.process(copy)).await {
            Ok(result) => result,
            Err(_) => return Outcome::TimedOut,
        },
        None => branch.process(copy).await,
    };
    match result {
        Ok(outputs) => Outcome::Replied(outputs),
        Err(failure) => Outcome::Failed(failure),
    }
}

/// A message's body as a JSON value for an aggregation: parsed JSON, else its text as a string.
pub(crate) fn body_value(msg: &Message) -> Value {
    match msg.body.json() {
        Ok(v) => v.clone(),
        Err(_) => Value::String(msg.body.to_text()),
    }
}

/// What one branch answered: `null` for no message, the body of one message, or the array of the
/// bodies of several.
pub(crate) fn reply_value(outputs: &Outputs) -> Value {
    match outputs.as_slice() {
        [] => Value::Null,
        [one] => body_value(one),
        many => Value::Array(many.iter().map(body_value).collect()),
    }
}

/// A jq program over the branches' replies: `.` is the array of replies, `$original` the body of
/// the message before the fan-out.
pub(crate) struct Gather {
    program: Arc<dyn JqProgram>,
}

impl Gather {
    /// Compiles `code` found at `field`.
    pub(crate) fn compile(
        ctx: &BuildContext<'_>,
        field: &str,
        code: &str,
    ) -> Result<Self, BuildError> {
        // `$original` is bound around the user's code; the field is a plain string in the spec
        // because the loader's jq check does not know the variable.
        let wrapped = format!(".[1] as $original | .[0] | ({code}\n)");
        let program = ctx.steps.compile_jq(field, &wrapped)?;
        Ok(Gather { program })
    }

    /// The first output over `replies`, for `msg` (its headers and metadata are visible too).
    pub(crate) async fn apply(
        &self,
        replies: Vec<Value>,
        msg: &Message,
    ) -> Result<Value, ProcessError> {
        let input = Value::Array(vec![Value::Array(replies), body_value(msg)]);
        self.program
            .run(Arc::new(input), msg)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| ProcessError::expression("the expression gave no value"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_reply_is_null_one_body_or_all_bodies() {
        let mut outputs = Outputs::new();
        assert_eq!(reply_value(&outputs), Value::Null);
        outputs.push(Message::json(json!({"a": 1})));
        assert_eq!(reply_value(&outputs), json!({"a": 1}));
        outputs.push(Message::bytes(&b"plain text"[..]));
        assert_eq!(reply_value(&outputs), json!([{"a": 1}, "plain text"]));
    }
}
