//! Test-only step builder: builds `[{name: config}, ...]` from a registry filled by
//! `register_all` and runs the steps in sequence. The engine's real builder is exercised by
//! flow-level tests.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::{Map, Value};
use sluice_core::component::{JqProgram, StepBuilder};
use sluice_core::registry::Factory;
use sluice_core::spec::ComponentKind;
use sluice_core::{
    BuildContext, BuildError, Dispatch, Failure, Message, Outputs, Processor, Registry, Resources,
};

use crate::expr::jq::{self, JqLimits};

pub(crate) struct TestSteps {
    registry: Registry,
    resources: Arc<Resources>,
    downstream: Arc<Collected>,
}

/// Stands for everything after the step under test: records what the step emits downstream,
/// acknowledgement shares included, so a test can inspect and resolve them.
#[derive(Default)]
pub(crate) struct Collected(Mutex<Vec<Message>>);

// Used by the tests of steps that emit downstream.
#[allow(dead_code)]
impl Collected {
    /// The messages emitted so far, oldest first; the record is emptied.
    pub(crate) fn take(&self) -> Vec<Message> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

#[async_trait]
impl Dispatch for Collected {
    async fn dispatch(&self, msg: Message) -> Result<Vec<Message>, Failure> {
        if let Ok(mut v) = self.0.lock() {
            v.push(msg);
        }
        Ok(Vec::new())
    }
}

impl TestSteps {
    pub(crate) fn new() -> Self {
        let resources = Arc::new(Resources::default());
        // Steps with `backend: {store: {}}` get a store in memory, never a `./data` directory
        // in the crate.
        resources
            .get_or_default::<crate::durable::DurableStore>()
            .use_memory();
        Self::with_resources(resources)
    }

    fn with_resources(resources: Arc<Resources>) -> Self {
        let mut registry = Registry::new();
        super::register_all(&mut registry);
        TestSteps {
            registry,
            resources,
            downstream: Arc::default(),
        }
    }

    fn build_step(&self, name: &str, config: &Value) -> Result<Arc<dyn Processor>, BuildError> {
        let (spec, factory) = self
            .registry
            .get(ComponentKind::Processor, name)
            .ok_or_else(|| BuildError::new(format!("unknown processor `{name}`")))?;
        let config = match (config, spec.shorthand) {
            (Value::Object(_), _) => config.clone(),
            (scalar, Some(field)) => {
                Value::Object(Map::from_iter([(field.to_owned(), scalar.clone())]))
            }
            (_, None) => return Err(BuildError::new(format!("`{name}` needs an object"))),
        };
        let Factory::Processor(factory) = factory else {
            return Err(BuildError::new("not a processor"));
        };
        let ctx = BuildContext {
            flow: "test",
            id: name,
            steps: self,
            resources: &self.resources,
            downstream: Arc::clone(&self.downstream) as Arc<dyn Dispatch>,
        };
        factory(&config, &ctx)
    }
}

impl StepBuilder for TestSteps {
    fn build_steps(&self, field: &str, steps: &Value) -> Result<Arc<dyn Processor>, BuildError> {
        let list = steps
            .as_array()
            .ok_or_else(|| BuildError::field(field, "expected a list of steps"))?;
        let mut built = Vec::new();
        for step in list {
            let (name, config) = step
                .as_object()
                .and_then(|o| o.iter().next())
                .ok_or_else(|| BuildError::field(field, "expected `{name: config}`"))?;
            built.push(self.build_step(name, config)?);
        }
        Ok(Arc::new(Sequence(built)))
    }

    fn compile_jq(&self, field: &str, code: &str) -> Result<Arc<dyn JqProgram>, BuildError> {
        jq::compile(code, JqLimits::default()).map_err(|e| BuildError::field(field, e.message))
    }
}

/// Runs processors one after the other, each on every output of the one before; also for
/// tests that chain hand-made steps.
pub(crate) struct Sequence(pub(crate) Vec<Arc<dyn Processor>>);

#[async_trait]
impl Processor for Sequence {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let mut current: Outputs = std::iter::once(msg).collect();
        for step in &self.0 {
            let mut next = Outputs::new();
            for m in current {
                next.extend(step.process(m).await?);
            }
            current = next;
        }
        Ok(current)
    }
}

/// Builds one step, or the error.
pub(crate) fn try_build(name: &str, config: &Value) -> Result<Arc<dyn Processor>, BuildError> {
    TestSteps::new().build_step(name, config)
}

/// Builds one step.
// By value so tests can write `build_one("x", json!(...))` without a borrow.
#[allow(clippy::needless_pass_by_value)]
pub(crate) fn build_one(name: &str, config: Value) -> Arc<dyn Processor> {
    match try_build(name, &config) {
        Ok(step) => step,
        Err(e) => panic!("building `{name}` failed: {e}"),
    }
}

/// Builds one step whose downstream emissions are recorded.
#[allow(dead_code)]
#[allow(clippy::needless_pass_by_value)]
pub(crate) fn build_with_downstream(
    name: &str,
    config: Value,
) -> (Arc<dyn Processor>, Arc<Collected>) {
    let steps = TestSteps::new();
    match steps.build_step(name, &config) {
        Ok(step) => (step, Arc::clone(&steps.downstream)),
        Err(e) => panic!("building `{name}` failed: {e}"),
    }
}

/// Builds one step sharing `resources` (channels, background work) with the test.
#[allow(dead_code)]
#[allow(clippy::needless_pass_by_value)]
pub(crate) fn build_with_resources(
    name: &str,
    config: Value,
    resources: &Arc<Resources>,
) -> Arc<dyn Processor> {
    match TestSteps::with_resources(Arc::clone(resources)).build_step(name, &config) {
        Ok(step) => step,
        Err(e) => panic!("building `{name}` failed: {e}"),
    }
}

/// Runs a step on one message.
pub(crate) async fn process(
    step: &Arc<dyn Processor>,
    msg: Message,
) -> Result<Vec<Message>, Failure> {
    step.process(msg).await.map(|out| out.into_iter().collect())
}

/// Splits a JSON array body into one message per element, each holding a share of the
/// original's acknowledgement: a stand-in for a splitter in the tests of routers.
pub(crate) struct SplitArray;

#[async_trait]
impl Processor for SplitArray {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let items = match msg.body.json() {
            Ok(Value::Array(items)) => items.clone(),
            _ => {
                let error = sluice_core::ProcessError::invalid_input("not an array");
                return Err(Failure::new(msg, error));
            }
        };
        Ok(msg
            .split_into(items.into_iter().map(sluice_core::Body::from_json))
            .into_iter()
            .collect())
    }
}
