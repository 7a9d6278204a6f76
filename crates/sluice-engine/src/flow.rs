//! A built flow: its steps as one pipeline and its targets; the entry point sources dispatch to.

use std::sync::Arc;

use async_trait::async_trait;
use sluice_core::{Dispatch, Failure, Message, Outputs, Processor, Sink};

/// One step with the id it is reported under.
pub struct Step {
    /// The step's `id`, or its position (`steps[1]`).
    pub id: String,
    /// What it does.
    pub processor: Arc<dyn Processor>,
}

/// Steps run in order; each output of a step goes through the next step (a split's parts each
/// go through the rest of the pipeline).
pub struct Pipeline {
    steps: Vec<Step>,
}

impl Pipeline {
    /// A pipeline of `steps`.
    pub fn new(steps: Vec<Step>) -> Self {
        Pipeline { steps }
    }
}

#[async_trait]
impl Processor for Pipeline {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let mut current: Outputs = Outputs::new();
        current.push(msg);
        for step in &self.steps {
            let mut next = Outputs::new();
            for msg in current {
                match step.processor.process(msg).await {
                    Ok(outputs) => next.extend(outputs),
                    Err(mut failure) => {
                        failure.error = failure.error.in_step(&step.id);
                        // Parts not yet processed are dropped with the failure: their
                        // acknowledgement shares nack the source.
                        return Err(failure);
                    }
                }
            }
            if next.is_empty() {
                return Ok(next);
            }
            current = next;
        }
        Ok(current)
    }
}

/// A target of a flow.
pub struct Target {
    /// Its `id`, or `to[N]`.
    pub id: String,
    /// Where messages go.
    pub sink: Arc<dyn Sink>,
}

/// A runnable flow.
pub struct Flow {
    name: Arc<str>,
    pipeline: Pipeline,
    targets: Vec<Target>,
}

impl Flow {
    /// A flow named `name`.
    pub fn new(name: Arc<str>, pipeline: Pipeline, targets: Vec<Target>) -> Self {
        Flow {
            name,
            pipeline,
            targets,
        }
    }

    /// The flow's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Logs the failure and nacks the message's shares with its reason.
    fn fail(&self, mut failure: Failure) -> Failure {
        tracing::warn!(
            flow = %self.name,
            message_id = %failure.message.id(),
            step = failure.error.step.as_deref().unwrap_or(""),
            kind = %failure.error.kind,
            error = %failure.error.detail,
            "message failed"
        );
        let reason = failure.error.to_string();
        for token in failure.message.take_acks() {
            token.nack(reason.as_str());
        }
        failure
    }
}

#[async_trait]
impl Dispatch for Flow {
    async fn dispatch(&self, msg: Message) -> Result<Vec<Message>, Failure> {
        let outputs = match self.pipeline.process(msg).await {
            Ok(outputs) => outputs,
            Err(failure) => return Err(self.fail(failure)),
        };
        let mut replies = Vec::with_capacity(outputs.len());
        for mut out in outputs {
            for target in &self.targets {
                if let Err(error) = target.sink.deliver(&out).await {
                    return Err(self.fail(Failure::new(out, error.in_step(&target.id))));
                }
            }
            // Every target committed this message: resolve its shares, hand it back as a reply.
            for token in out.take_acks() {
                token.ack();
            }
            replies.push(out);
        }
        Ok(replies)
    }
}
