//! A [`BuildContext`] for unit tests that build one component alone: no nested steps, no jq,
//! nothing downstream.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::{
    BuildContext, BuildError, Dispatch, Failure, Message, Processor, Resources, StepBuilder,
};

struct NoSteps;

impl StepBuilder for NoSteps {
    fn build_steps(&self, field: &str, _: &Value) -> Result<Arc<dyn Processor>, BuildError> {
        Err(BuildError::field(
            field,
            "no nested steps in a component's unit test",
        ))
    }
    fn compile_jq(&self, field: &str, _: &str) -> Result<Arc<dyn JqProgram>, BuildError> {
        Err(BuildError::field(field, "no jq in a component's unit test"))
    }
}

/// Hands every message back as its own reply.
struct Echo;

#[async_trait]
impl Dispatch for Echo {
    async fn dispatch(&self, msg: Message) -> Result<Vec<Message>, Failure> {
        Ok(vec![msg])
    }
}

/// Runs `build` with a context for component `id` of flow `f`.
pub(crate) fn with_context<T>(id: &str, build: impl FnOnce(&BuildContext<'_>) -> T) -> T {
    let resources = Arc::new(Resources::default());
    let ctx = BuildContext {
        flow: "f",
        id,
        steps: &NoSteps,
        resources: &resources,
        downstream: Arc::new(Echo),
    };
    build(&ctx)
}
