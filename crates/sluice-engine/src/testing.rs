//! Runs the `tests:` blocks of flow files: the source is replaced by an injected message, targets
//! by capturing sinks, mocked steps by canned results. No network is used unless a step that is
//! not mocked uses it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sluice_core::{AckToken, Dispatch, ExchangePattern, Message, Outcome, Registry, Resources};

use crate::background::Background;
use crate::build::mock_body;
use crate::build::{Captured, TestOverrides, build_flow};
use crate::channel::{self, Channels};
use crate::config::model::{ERROR_TARGET, Expectation, Project, REPLY_TARGET, TestDef};
use crate::expr;
use crate::flow::DEAD_LETTERED;

/// How long one test may run before it fails.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a test waits for each input's acknowledgement once the flow has returned.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The result of one test.
#[derive(Debug, Clone)]
pub struct TestResult {
    /// The file that holds the test.
    pub file: String,
    /// The test's name.
    pub name: String,
    /// Why it failed; empty when it passed.
    pub failures: Vec<String>,
}

impl TestResult {
    /// Whether every expectation held.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

impl fmt::Display for TestResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.passed() {
            write!(f, "PASS {}: {}", self.file, self.name)
        } else {
            write!(f, "FAIL {}: {}", self.file, self.name)?;
            for reason in &self.failures {
                write!(f, "\n     - {reason}")?;
            }
            Ok(())
        }
    }
}

/// Runs every test of `project`, in file order.
pub async fn run_all(project: &Project, registry: &Registry) -> Vec<TestResult> {
    let mut results = Vec::new();
    for test in project.tests() {
        results.push(run_one(project, registry, test).await);
    }
    results
}

/// The closing line: `N passed, N failed`.
pub fn summary(results: &[TestResult]) -> String {
    let passed = results.iter().filter(|r| r.passed()).count();
    format!("{passed} passed, {} failed", results.len() - passed)
}

async fn run_one(project: &Project, registry: &Registry, test: &TestDef) -> TestResult {
    let mut result = TestResult {
        file: test.file.as_deref().unwrap_or("").to_owned(),
        name: test.name.clone(),
        failures: Vec::new(),
    };
    let Some(def) = project.flows().find(|f| f.name == test.flow) else {
        result
            .failures
            .push(format!("no flow named `{}`", test.flow));
        return result;
    };
    let captured = Captured::default();
    let resources = Arc::new(Resources::default());
    // A test never touches the data directory: durable components get a store in memory.
    resources
        .get_or_default::<crate::durable::DurableStore>()
        .use_memory();
    // Channels the project reads exist; what a step sends to one is captured as `channel:<name>`.
    let channels = resources.get_or_default::<Channels>();
    for reader in project
        .flows()
        .filter(|f| f.from.component == channel::NAME)
    {
        channels.declare_reader(&channel::channel_name(&reader.from.config), 1);
    }
    channels.capture_into(captured.clone());
    let overrides = TestOverrides {
        mocks: Some(&test.mocks),
        captures: Some(&captured),
    };
    let flow = match build_flow(def, registry, &resources, &overrides) {
        Ok(flow) => flow,
        Err(problems) => {
            result
                .failures
                .extend(problems.iter().map(ToString::to_string));
            return result;
        }
    };
    let mut acks = Vec::new();
    let mut replies = Vec::new();
    let mut error = None;
    let mut dead_lettered = false;
    for input in test.messages() {
        let (token, ack) = AckToken::channel();
        acks.push(ack);
        let mut msg = Message::new(mock_body(&input.body))
            .with_pattern(input.pattern.unwrap_or(ExchangePattern::InOut))
            .with_ack(token);
        msg.headers.extend(input.headers.clone());
        msg.meta.origin = Some(Arc::from(def.name.as_str()));
        match tokio::time::timeout(TEST_TIMEOUT, flow.dispatch(msg)).await {
            Ok(Ok(mut out)) => replies.append(&mut out),
            Ok(Err(failure)) => {
                // A dead-lettered message is acknowledged on purpose: it is safe in the store.
                dead_lettered |= failure.message.headers.contains_key(DEAD_LETTERED);
                error.get_or_insert(failure.error);
            }
            Err(_) => {
                result.failures.push(format!(
                    "the flow did not finish within {}s",
                    TEST_TIMEOUT.as_secs()
                ));
                return result;
            }
        }
    }
    // The sources' acknowledgements: acked on success, nacked on failure; never left hanging.
    // Waiting for them first also lets held messages (an aggregation completed by its timeout)
    // reach the targets before the expectations look.
    for (i, ack) in acks.into_iter().enumerate() {
        let which = if test.inputs.len() > 1 {
            format!("input {i}")
        } else {
            "the source".to_owned()
        };
        match tokio::time::timeout(ACK_TIMEOUT, ack).await {
            Ok(Ok(Outcome::Ack)) if error.is_some() && !dead_lettered && test.inputs.len() <= 1 => {
                result
                    .failures
                    .push("the source was acked although the flow failed".into())
            }
            Ok(Ok(Outcome::Nack(reason))) if error.is_none() => result.failures.push(format!(
                "{which} was nacked although the flow succeeded: {reason}"
            )),
            Ok(Ok(_)) => {}
            _ => result.failures.push(format!(
                "{which}: the acknowledgement never resolved within {}s",
                ACK_TIMEOUT.as_secs()
            )),
        }
    }
    // Work the flow started without waiting for it (a wire tap) finishes before the checks.
    let background = resources.get_or_default::<Background>();
    if tokio::time::timeout(ACK_TIMEOUT, background.idle())
        .await
        .is_err()
    {
        result.failures.push(format!(
            "background work (a wire tap) did not finish within {}s",
            ACK_TIMEOUT.as_secs()
        ));
    }
    let expects_error = test.expect.iter().any(|e| e.target == ERROR_TARGET);
    if let (Some(error), false) = (&error, expects_error) {
        result
            .failures
            .push(format!("the flow failed: {error} (kind `{}`)", error.kind));
    }
    // Each target's messages are taken once, so several expectations can look at one target
    // (the first and the last message of a resequenced stream, say).
    let mut by_target: std::collections::HashMap<&str, Vec<Message>> =
        std::collections::HashMap::new();
    for (i, expectation) in test.expect.iter().enumerate() {
        let label = format!("expect[{i}] ({})", expectation.target);
        if expectation.target == ERROR_TARGET {
            check_error(expectation, error.as_ref(), &label, &mut result.failures);
            continue;
        }
        let messages = if expectation.target == REPLY_TARGET {
            &replies
        } else {
            by_target
                .entry(expectation.target.as_str())
                .or_insert_with(|| captured.take(&expectation.target))
        };
        check_messages(expectation, messages, &label, &mut result.failures).await;
    }
    result
}

fn check_error(
    e: &Expectation,
    error: Option<&sluice_core::ProcessError>,
    label: &str,
    failures: &mut Vec<String>,
) {
    let Some(error) = error else {
        failures.push(format!("{label}: expected the flow to fail, it succeeded"));
        return;
    };
    if let Some(want) = e.error.as_ref() {
        if let Some(kind) = want.kind
            && kind != error.kind
        {
            failures.push(format!(
                "{label}: expected error kind `{kind}`, got `{}` ({error})",
                error.kind
            ));
        }
        if let Some(text) = &want.contains
            && !error.to_string().contains(text.as_str())
        {
            failures.push(format!(
                "{label}: expected the error to contain `{text}`, got `{error}`"
            ));
        }
    }
}

/// JSON equality where numbers compare by value: `8` equals `8.0`, as in JSON itself (jq
/// arithmetic yields floats; a test author writes integers).
pub fn json_eq(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value::{Array, Number, Object};
    match (a, b) {
        (Number(x), Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        (Array(x), Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y)),
        (Object(x), Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

async fn check_messages(
    e: &Expectation,
    messages: &[Message],
    label: &str,
    failures: &mut Vec<String>,
) {
    if let Some(count) = e.count
        && messages.len() != count
    {
        failures.push(format!(
            "{label}: expected {count} message(s), got {}",
            messages.len()
        ));
    }
    let wants_content = e.body.is_some() || !e.headers.is_empty() || e.condition.is_some();
    if !wants_content {
        if e.count.is_none() && messages.is_empty() {
            failures.push(format!("{label}: expected at least one message, got none"));
        }
        return;
    }
    let Some(msg) = messages.get(e.index) else {
        failures.push(format!(
            "{label}: expected a message at index {}, got {} message(s)",
            e.index,
            messages.len()
        ));
        return;
    };
    if let Some(want) = &e.body {
        let matches = match want {
            serde_json::Value::String(text) => {
                msg.body.to_text() == *text || msg.body.json().is_ok_and(|b| json_eq(b, want))
            }
            _ => msg.body.json().is_ok_and(|b| json_eq(b, want)),
        };
        if !matches {
            failures.push(format!(
                "{label}: body differs\n       expected: {}\n       actual:   {}",
                want,
                msg.body.to_text()
            ));
        }
    }
    for (name, value) in &e.headers {
        match msg.headers.get(name) {
            Some(actual) if actual == value => {}
            Some(actual) => failures.push(format!(
                "{label}: header `{name}` is `{actual}`, expected `{value}`"
            )),
            None => failures.push(format!(
                "{label}: header `{name}` is missing (expected `{value}`)"
            )),
        }
    }
    if let Some(condition) = &e.condition {
        let verdict = match (
            expr::jq::compile(condition, expr::jq::JqLimits::default()),
            msg.body.json_shared(),
        ) {
            (Ok(program), Ok(body)) => program.test(body, msg).await.map_err(|e| e.to_string()),
            (Err(e), _) => Err(format!("invalid condition: {}", e.message)),
            (_, Err(e)) => Err(e.to_string()),
        };
        match verdict {
            Ok(true) => {}
            Ok(false) => failures.push(format!(
                "{label}: condition `{condition}` is false for body {}",
                msg.body.to_text()
            )),
            Err(reason) => {
                failures.push(format!("{label}: condition `{condition}` failed: {reason}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::json_eq;
    use serde_json::json;

    #[test]
    fn numbers_compare_by_value() {
        assert!(json_eq(&json!({"a": [8.0]}), &json!({"a": [8]})));
        assert!(!json_eq(&json!({"a": 8.5}), &json!({"a": 8})));
        assert!(!json_eq(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
        assert!(!json_eq(&json!("8"), &json!(8)));
    }
}
