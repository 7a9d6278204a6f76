//! The validated definition of flows and their tests: what the builder turns into a topology.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value as Json;
use sluice_core::spec::ComponentKind;

use super::node::{Loc, Node};

/// Every flow file loaded together (a runtime, a `validate` or a `test` run).
#[derive(Debug, Default)]
pub struct Project {
    /// The files, in load order.
    pub files: Vec<FlowFile>,
}

impl Project {
    /// Every flow of every file.
    pub fn flows(&self) -> impl Iterator<Item = &FlowDef> {
        self.files.iter().flat_map(|f| f.flows.iter())
    }

    /// Every test of every file.
    pub fn tests(&self) -> impl Iterator<Item = &TestDef> {
        self.files.iter().flat_map(|f| f.tests.iter())
    }
}

/// One file: its flows and its tests.
#[derive(Debug)]
pub struct FlowFile {
    /// The path as given.
    pub path: Arc<str>,
    /// Its flows.
    pub flows: Vec<FlowDef>,
    /// Its `tests:` block.
    pub tests: Vec<TestDef>,
}

/// One flow: a source, steps, targets.
#[derive(Debug)]
pub struct FlowDef {
    /// Unique across the project.
    pub name: String,
    /// The file it is in.
    pub file: Arc<str>,
    /// Where it starts.
    pub loc: Loc,
    /// `from:`.
    pub from: ComponentUse,
    /// `steps:`.
    pub steps: Vec<ComponentUse>,
    /// `to:`.
    pub to: Vec<ComponentUse>,
    /// Error handling, concurrency and ordering.
    pub handling: FlowHandling,
}

/// A flow's error handling and admission settings.
#[derive(Debug, Clone, Default)]
pub struct FlowHandling {
    /// `on_error:` steps, run on a failed message.
    pub on_error: Vec<ComponentUse>,
    /// `dead_letter:` target for messages that failed terminally.
    pub dead_letter: Option<ComponentUse>,
    /// `concurrency:` messages in the flow at once.
    pub concurrency: Option<usize>,
    /// `ordered_by:` jq key for per-key ordering.
    pub ordered_by: Option<String>,
}

/// One use of a component in a flow, validated.
#[derive(Debug, Clone)]
pub struct ComponentUse {
    /// Source, processor or sink.
    pub kind: ComponentKind,
    /// The component's name (`http`, `transform`).
    pub component: String,
    /// The instance's id: given with `id:`, else its path (`steps[1]`, `to[0]`).
    pub id: String,
    /// Its configuration with defaults filled (the factory's input).
    pub config: Json,
    /// The configuration as written, for locating build errors in nested fields.
    pub node: Node,
    /// The field path (`flows[0].steps[1].transform`).
    pub path: String,
    /// Where the component's key is.
    pub loc: Loc,
    /// `retry:` and `circuit_breaker:` written next to the component.
    pub policies: Policies,
}

/// The error-handling policies of one step or target, validated (defaults filled).
#[derive(Debug, Clone, Default)]
pub struct Policies {
    /// `retry:`.
    pub retry: Option<Json>,
    /// `circuit_breaker:`.
    pub circuit_breaker: Option<Json>,
    /// The `circuit_breaker:` node as written, for its `fallback` steps.
    pub node: Option<Node>,
    /// The field path of `circuit_breaker:`.
    pub path: String,
}

/// A flow test from a `tests:` block.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestDef {
    /// What it checks, one line.
    pub name: String,
    /// The flow it runs.
    pub flow: String,
    /// The message injected in place of the flow's source.
    #[serde(default)]
    pub input: TestMessage,
    /// Several messages injected one after the other, instead of `input`.
    #[serde(default)]
    pub inputs: Vec<TestMessage>,
    /// Step ids whose processing is replaced by a canned result (a remote call, say).
    #[serde(default)]
    pub mocks: BTreeMap<String, TestMessage>,
    /// What must be observed.
    #[serde(default)]
    pub expect: Vec<Expectation>,
    /// Set by the loader: the file and location of the test.
    #[serde(skip)]
    pub file: Option<Arc<str>>,
    /// Set by the loader.
    #[serde(skip)]
    pub loc: Loc,
}

impl TestDef {
    /// The messages to inject, in order: `inputs`, or the single `input`.
    pub fn messages(&self) -> Vec<&TestMessage> {
        if self.inputs.is_empty() {
            vec![&self.input]
        } else {
            self.inputs.iter().collect()
        }
    }
}

/// A message written in a test.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestMessage {
    /// The body: JSON, or a string for a text body.
    #[serde(default)]
    pub body: Json,
    /// Headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Exchange pattern of the injected message.
    #[serde(default)]
    pub pattern: Option<sluice_core::ExchangePattern>,
}

/// One expectation of a test.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    /// A target id of the flow, or `reply` for the flow's result.
    pub target: String,
    /// How many messages must arrive there.
    #[serde(default)]
    pub count: Option<usize>,
    /// Which message the checks below look at (default 0, the first).
    #[serde(default)]
    pub index: usize,
    /// The exact body (JSON; a string matches a text body).
    #[serde(default)]
    pub body: Option<Json>,
    /// Headers that must be present with these values.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A jq predicate on the body that must hold.
    #[serde(default)]
    pub condition: Option<String>,
    /// The flow must fail: with this error kind (and, if given, a detail containing `contains`).
    #[serde(default)]
    pub error: Option<ErrorExpectation>,
}

/// An expected failure.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorExpectation {
    /// The error kind (`invalid_input`, `expression`, ...).
    #[serde(default)]
    pub kind: Option<sluice_core::ErrorKind>,
    /// Text the error's description must contain.
    #[serde(default)]
    pub contains: Option<String>,
}

/// The special target name for the flow's result in test expectations.
pub const REPLY_TARGET: &str = "reply";
/// The special target name for the flow's failure in test expectations.
pub const ERROR_TARGET: &str = "error";
