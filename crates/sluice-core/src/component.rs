//! The three component traits and the contexts the engine hands them.
//!
//! Vocabulary follows Camel: a *source* (consumer) turns outside events into messages and hands them
//! to its flow through [`Dispatch`]; a *processor* is one step; a *sink* (producer) commits a message
//! to the outside world. Request-reply producers (an HTTP call whose response becomes the next
//! message) are processors.

use std::sync::Arc;

use async_trait::async_trait;
use smallvec::SmallVec;
use tokio_util::sync::CancellationToken;

use crate::error::{BuildError, Failure, ProcessError, SourceError};
use crate::message::Message;
use crate::resources::Resources;

/// What a step produced: usually one message, none for a filter, many for a split.
pub type Outputs = SmallVec<[Message; 1]>;

/// One step of a flow.
///
/// # Contract
/// * Every input message is accounted for: returned (possibly changed) among the outputs, returned
///   in a [`Failure`], or resolved with [`Message::ack`] (dropped on purpose) or moved into
///   outputs (split, aggregate).
/// * A processor never panics on bad input; it returns [`crate::ErrorKind::InvalidInput`].
#[async_trait]
pub trait Processor: Send + Sync + 'static {
    /// Processes one message.
    async fn process(&self, msg: Message) -> Result<Outputs, Failure>;
}

/// Commits messages to an external system.
///
/// The engine keeps the message and resolves its acknowledgement: `Ok` means the message is
/// committed (written, sent and confirmed); the source is acked once every sink on every path
/// has said so.
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// Delivers one message.
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError>;
}

/// Produces messages from the outside world for one flow.
#[async_trait]
pub trait Source: Send + 'static {
    /// Runs until `ctx.shutdown` is cancelled (then finishing in-flight work) or a fatal error.
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError>;
}

/// Hands a message to a flow and waits for the flow to finish with it.
///
/// `Ok` carries the flow's results (the reply of an InOut exchange) after every target has
/// committed; the messages' acknowledgement shares are already resolved. `Err` carries the
/// message that failed, after the flow's error handling, for the source to report (an HTTP error
/// response, a nack upstream).
#[async_trait]
pub trait Dispatch: Send + Sync + 'static {
    /// Runs the flow for `msg`.
    async fn dispatch(&self, msg: Message) -> Result<Vec<Message>, Failure>;

    /// Takes `msg`'s place in the flow's order now and returns the rest of the work, for a
    /// source that keeps several messages in flight: it calls `admit` in arrival order and
    /// spawns what it returns, so a flow with `ordered_by` keeps per-key order. Awaiting `admit`
    /// also applies the flow's concurrency limit (backpressure). By default nothing is taken.
    async fn admit(self: Arc<Self>, msg: Message) -> Admitted {
        Box::pin(async move { self.dispatch(msg).await })
    }

    /// Whether [`dispatch`](Self::dispatch) can run now. A step's
    /// [`BuildContext::downstream`] is ready once its flow is built; a step that emits messages
    /// on its own at start (groups reloaded from a store) waits for it. Ready by default.
    fn is_ready(&self) -> bool {
        true
    }
}

/// The work left after [`Dispatch::admit`]: resolves like [`Dispatch::dispatch`].
pub type Admitted =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Message>, Failure>> + Send>>;

/// What a running source gets from the engine.
#[derive(Clone)]
pub struct SourceContext {
    /// The flow this source feeds.
    pub flow: Arc<str>,
    /// Entry point of the flow.
    pub dispatcher: Arc<dyn Dispatch>,
    /// Cancelled when the runtime shuts down; stop taking new work, finish what is in flight.
    pub shutdown: CancellationToken,
    /// Process-wide shared resources (HTTP listeners shared by several flows, ...).
    pub resources: Arc<Resources>,
}

/// Builds nested steps; implemented by the engine and handed to composite processors such as
/// `choice` so they can build their branches without knowing the engine.
pub trait StepBuilder: Send + Sync {
    /// Builds the steps at `field` (a dotted path relative to the component being built, used for
    /// error locations) from their configuration.
    fn build_steps(
        &self,
        field: &str,
        steps: &serde_json::Value,
    ) -> Result<Arc<dyn Processor>, BuildError>;

    /// Compiles a jq expression found at `field`, so components share one compiler and one set of
    /// limits.
    fn compile_jq(&self, field: &str, code: &str) -> Result<Arc<dyn JqProgram>, BuildError>;

    /// The remote store backend `name` (`redis`, `nats_kv`, ...) for a step's `backend:`, as the
    /// runtime's registry has it; `Err` lists the names it has. `Ok(None)` means "use the
    /// in-memory store instead" (flow tests run without the services). By default none exists.
    fn store_backend(
        &self,
        name: &str,
    ) -> Result<Option<crate::registry::StoreBackend>, Vec<&'static str>> {
        let _ = name;
        Err(Vec::new())
    }
}

/// A compiled jq program with Sluice's limits applied (time, output size, no `env`/`input`/`halt`).
///
/// The program sees the body as `.`, and the message as `$headers` (object of strings) and `$meta`
/// (`id`, `correlation_id`, `origin`, `created_at` in RFC 3339, `pattern`).
#[async_trait]
pub trait JqProgram: Send + Sync + std::fmt::Debug {
    /// Runs the program; every output, in order.
    async fn run(
        &self,
        input: Arc<serde_json::Value>,
        msg: &Message,
    ) -> Result<Vec<serde_json::Value>, ProcessError>;

    /// Whether the program's first output is truthy (not `false` or `null`); no output is false.
    async fn test(
        &self,
        input: Arc<serde_json::Value>,
        msg: &Message,
    ) -> Result<bool, ProcessError> {
        Ok(self.run(input, msg).await?.first().is_some_and(|v| {
            !matches!(v, serde_json::Value::Null | serde_json::Value::Bool(false))
        }))
    }

    /// The source text, for diagnostics.
    fn source(&self) -> &str;
}

/// What a factory gets besides its configuration.
pub struct BuildContext<'a> {
    /// Name of the flow being built.
    pub flow: &'a str,
    /// Name of the component instance (the step's `id`, or its position).
    pub id: &'a str,
    /// Builds nested steps and compiles expressions.
    pub steps: &'a dyn StepBuilder,
    /// Process-wide shared resources.
    pub resources: &'a Arc<Resources>,
    /// Runs a message through everything after this step: the rest of its pipeline, then the
    /// rest of the enclosing pipelines, then the flow's targets; failures get the flow's error
    /// handling. For messages a step produces outside a `process` call (an aggregation completed
    /// by a timer, a resequencer releasing a held message). Sources and sinks have nothing after
    /// them: theirs fails every message (a source uses [`SourceContext::dispatcher`]).
    pub downstream: Arc<dyn Dispatch>,
}
