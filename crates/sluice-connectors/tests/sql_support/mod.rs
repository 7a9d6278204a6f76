//! Helpers of the SQL connector tests: components built through the registry with a real jq
//! compiler, and an in-memory checkpoint store.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::registry::Factory;
use sluice_core::spec::ComponentKind;
use sluice_core::state::{CheckpointStore, Checkpoints};
use sluice_core::{
    BuildContext, BuildError, Message, ProcessError, Processor, Resources, Sink, Source,
    StepBuilder,
};

use crate::common::{NoDownstream, registry, with_defaults};

/// Compiles jq with the engine's compiler, as a real flow does.
pub struct JqSteps;

impl StepBuilder for JqSteps {
    fn build_steps(&self, field: &str, _: &Value) -> Result<Arc<dyn Processor>, BuildError> {
        Err(BuildError::field(field, "no steps in connector tests"))
    }
    fn compile_jq(&self, field: &str, code: &str) -> Result<Arc<dyn JqProgram>, BuildError> {
        sluice_engine::expr::jq::compile(code, sluice_engine::expr::jq::JqLimits::default())
            .map_err(|e| BuildError::field(field, e.to_string()))
    }
}

fn ctx(resources: &Arc<Resources>) -> BuildContext<'_> {
    BuildContext {
        flow: "test-flow",
        id: "step-1",
        steps: &JqSteps,
        resources,
        downstream: Arc::new(NoDownstream),
    }
}

fn factory(kind: ComponentKind, name: &str) -> (Value, Factory) {
    let reg = registry();
    let (spec, factory) = reg.get(kind, name).expect("registered");
    let defaults = with_defaults(spec, &serde_json::json!({}));
    (defaults, factory.clone())
}

fn merged(defaults: Value, config: Value) -> Value {
    let mut map = defaults.as_object().cloned().unwrap();
    map.extend(config.as_object().cloned().unwrap());
    Value::Object(map)
}

pub fn try_processor(
    config: Value,
    resources: &Arc<Resources>,
) -> Result<Arc<dyn Processor>, BuildError> {
    let (defaults, f) = factory(ComponentKind::Processor, "sql");
    let Factory::Processor(f) = f else { panic!() };
    f(&merged(defaults, config), &ctx(resources))
}

pub fn processor(config: Value, resources: &Arc<Resources>) -> Arc<dyn Processor> {
    try_processor(config, resources).unwrap()
}

pub fn try_sink(config: Value, resources: &Arc<Resources>) -> Result<Arc<dyn Sink>, BuildError> {
    let (defaults, f) = factory(ComponentKind::Sink, "sql");
    let Factory::Sink(f) = f else { panic!() };
    f(&merged(defaults, config), &ctx(resources))
}

pub fn sink(config: Value, resources: &Arc<Resources>) -> Arc<dyn Sink> {
    try_sink(config, resources).unwrap()
}

pub fn sink_named(config: Value, resources: &Arc<Resources>) -> Arc<dyn Sink> {
    sink(config, resources)
}

pub fn build_source_named(
    name: &str,
    config: Value,
    resources: &Arc<Resources>,
) -> Box<dyn Source> {
    let (defaults, f) = factory(ComponentKind::Source, name);
    let Factory::Source(f) = f else { panic!() };
    match f(&merged(defaults, config), &ctx(resources)) {
        Ok(source) => source,
        Err(e) => panic!("{name} does not build: {e}"),
    }
}

/// Runs a processor on `msg`; the output body, or the error.
pub async fn run_step(step: &Arc<dyn Processor>, msg: Message) -> Result<Value, ProcessError> {
    match step.process(msg).await {
        Ok(mut out) => {
            assert_eq!(out.len(), 1);
            let msg = out.remove(0);
            let body = msg.body.json().unwrap().clone();
            msg.ack();
            Ok(body)
        }
        Err(failure) => {
            failure.message.ack();
            Err(failure.error)
        }
    }
}

pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A checkpoint store in memory that outlives the `Resources` of one "run".
#[derive(Default, Clone)]
pub struct MemoryCheckpoints(Arc<Mutex<HashMap<String, Vec<u8>>>>);

#[async_trait::async_trait]
impl CheckpointStore for MemoryCheckpoints {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ProcessError> {
        Ok(self.0.lock().unwrap().get(key).cloned())
    }
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), ProcessError> {
        self.0.lock().unwrap().insert(key.to_owned(), value);
        Ok(())
    }
}

impl MemoryCheckpoints {
    /// Fresh resources (a new "process") whose checkpoints are this store.
    pub fn resources(&self) -> Arc<Resources> {
        let resources = Arc::new(Resources::default());
        let store = self.clone();
        resources
            .get_or_default::<Checkpoints>()
            .install(Box::new(move || {
                Ok(Arc::new(store.clone()) as Arc<dyn CheckpointStore>)
            }));
        resources
    }

    /// The JSON value stored under `key`.
    pub fn value(&self, key: &str) -> Option<Value> {
        self.0
            .lock()
            .unwrap()
            .get(key)
            .map(|b| serde_json::from_slice(b).unwrap())
    }
}
