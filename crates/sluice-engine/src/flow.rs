//! A built flow: its steps as one pipeline and its targets; the entry point sources dispatch to.

use std::sync::{Arc, OnceLock, Weak};

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use sluice_core::component::JqProgram;
use sluice_core::{
    Admitted, Dispatch, ErrorKind, Failure, Message, Outputs, ProcessError, Processor, Sink,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::{Finish, FlowMetrics};
use crate::ordering::{KeyedOrder, Turn};
use crate::resilience::headers;

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
    steps: Arc<[Step]>,
}

impl Pipeline {
    /// A pipeline of `steps`.
    pub fn new(steps: Vec<Step>) -> Self {
        Pipeline {
            steps: steps.into(),
        }
    }

    /// A pipeline over steps already shared with the [`Downstream`]s of its steps.
    pub(crate) fn shared(steps: Arc<[Step]>) -> Self {
        Pipeline { steps }
    }

    /// The ids of the pipeline's steps, in order.
    pub fn step_ids(&self) -> Vec<&str> {
        self.steps.iter().map(|s| s.id.as_str()).collect()
    }

    /// Where the step `id` is in the pipeline.
    fn position(&self, id: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.id == id)
    }

    /// Runs `msg` through the steps from position `start` on.
    async fn process_from(&self, start: usize, msg: Message) -> Result<Outputs, Failure> {
        run_steps(self.steps.get(start..).unwrap_or_default(), msg).await
    }
}

/// Runs `msg` through `steps`.
async fn run_steps(steps: &[Step], msg: Message) -> Result<Outputs, Failure> {
    let mut current: Outputs = Outputs::new();
    current.push(msg);
    for step in steps {
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

#[async_trait]
impl Processor for Pipeline {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        run_steps(&self.steps, msg).await
    }
}

/// A pipeline's steps, filled in once they are all built: each step holds a [`Downstream`] into
/// the pipeline it belongs to before that pipeline exists. Weak, as the pipeline owns its steps:
/// a strong reference would make a cycle through every step that keeps its downstream (an
/// aggregator), and a stopped flow would never be dropped (nor its steps' state released: open
/// groups nacked, the durable store closed).
pub(crate) type StepsSlot = Arc<OnceLock<Weak<[Step]>>>;
/// The flow, filled in once built; weak so a flow and its steps do not keep each other alive.
pub(crate) type FlowSlot = Arc<OnceLock<Weak<Flow>>>;

/// Everything after one step: the rest of its pipeline, then (for a nested pipeline) whatever
/// follows the step that owns it, then the flow's targets. Handed to every step as
/// [`sluice_core::BuildContext::downstream`].
pub(crate) struct Downstream {
    steps: StepsSlot,
    next: usize,
    outer: Option<Arc<Downstream>>,
    flow: FlowSlot,
}

impl Downstream {
    /// Everything after step `next - 1` of the pipeline in `steps`.
    pub(crate) fn new(
        steps: StepsSlot,
        next: usize,
        outer: Option<Arc<Downstream>>,
        flow: FlowSlot,
    ) -> Self {
        Downstream {
            steps,
            next,
            outer,
            flow,
        }
    }

    /// Runs `msg` through the rest of this pipeline and every enclosing one; not the targets.
    fn run(&self, msg: Message) -> BoxFuture<'_, Result<Outputs, Failure>> {
        Box::pin(async move {
            let Some(steps) = self.steps.get().and_then(Weak::upgrade) else {
                return Err(not_running(msg));
            };
            let outputs = run_steps(steps.get(self.next..).unwrap_or_default(), msg).await?;
            let Some(outer) = &self.outer else {
                return Ok(outputs);
            };
            let mut all = Outputs::new();
            for out in outputs {
                all.extend(outer.run(out).await?);
            }
            Ok(all)
        })
    }
}

// The message goes back in the `Failure`, so the error is as large as the message.
#[allow(clippy::result_large_err)]
fn not_running(msg: Message) -> Failure {
    Failure::new(
        msg,
        ProcessError::new(ErrorKind::Internal, "the flow is not running"),
    )
}

#[async_trait]
impl Dispatch for Downstream {
    fn is_ready(&self) -> bool {
        self.steps.get().and_then(Weak::upgrade).is_some()
            && self.flow.get().and_then(Weak::upgrade).is_some()
    }

    async fn dispatch(&self, msg: Message) -> Result<Vec<Message>, Failure> {
        let Some(flow) = self.flow.get().and_then(Weak::upgrade) else {
            let mut failure = not_running(msg);
            let reason = failure.error.to_string();
            for token in failure.message.take_acks() {
                token.nack(reason.as_str());
            }
            return Err(failure);
        };
        flow.metrics.received();
        let processed = self.run(msg).await;
        flow.complete(processed, None).await
    }
}

/// A target of a flow.
pub struct Target {
    /// Its `id`, or `to[N]`.
    pub id: String,
    /// Where messages go.
    pub sink: Arc<dyn Sink>,
}

/// What a flow does besides running its steps and targets.
pub struct FlowOptions {
    /// Steps run on a failed message (with the `sluice.error.*` headers); when they succeed the
    /// failure is handled: their outputs are the reply and the source is acknowledged.
    pub on_error: Option<Pipeline>,
    /// Where a message that failed terminally goes (its original body with the error headers);
    /// once it is there the source is acknowledged.
    pub dead_letter: Option<Target>,
    /// Messages in the flow at once; admitting more waits (backpressure to the source).
    pub concurrency: usize,
    /// Messages with the same key are processed one at a time, in order.
    pub ordered_by: Option<Arc<dyn JqProgram>>,
}

impl Default for FlowOptions {
    fn default() -> Self {
        FlowOptions {
            on_error: None,
            dead_letter: None,
            concurrency: DEFAULT_CONCURRENCY,
            ordered_by: None,
        }
    }
}

/// Messages a flow processes at once unless its `concurrency` says otherwise.
pub const DEFAULT_CONCURRENCY: usize = 1024;

/// Set on a failed message once its dead letter is written: the source was acknowledged.
pub const DEAD_LETTERED: &str = "sluice.dead_letter";

/// A runnable flow.
pub struct Flow {
    name: Arc<str>,
    pipeline: Pipeline,
    targets: Vec<Target>,
    options: FlowOptions,
    limit: Arc<Semaphore>,
    order: Arc<KeyedOrder>,
    metrics: Arc<FlowMetrics>,
}

/// A message admitted into a flow: its concurrency permit and its place in its key's order.
struct Place {
    msg: Message,
    _permit: Option<OwnedSemaphorePermit>,
    turn: Option<Turn>,
}

impl Flow {
    /// A flow named `name` with default options.
    pub fn new(name: Arc<str>, pipeline: Pipeline, targets: Vec<Target>) -> Self {
        Flow::with_options(name, pipeline, targets, FlowOptions::default())
    }

    /// A flow named `name`.
    pub fn with_options(
        name: Arc<str>,
        pipeline: Pipeline,
        targets: Vec<Target>,
        options: FlowOptions,
    ) -> Self {
        let limit = Arc::new(Semaphore::new(options.concurrency.max(1)));
        Flow {
            name,
            pipeline,
            targets,
            options,
            limit,
            order: Arc::default(),
            metrics: Arc::default(),
        }
    }

    /// What happened to the messages this flow received.
    pub fn metrics(&self) -> &Arc<FlowMetrics> {
        &self.metrics
    }

    /// The flow's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Admits `msg`: waits for a concurrency permit, then takes its place in its key's order.
    // The message goes back in the `Failure` when its key cannot be computed.
    #[allow(clippy::result_large_err)]
    async fn admit_message(&self, msg: Message) -> Result<Place, Failure> {
        // Closed never: the semaphore lives as long as the flow.
        let permit = Arc::clone(&self.limit).acquire_owned().await.ok();
        let Some(key_program) = &self.options.ordered_by else {
            return Ok(Place {
                msg,
                _permit: permit,
                turn: None,
            });
        };
        let body = match msg.body.json_shared() {
            Ok(body) => body,
            Err(e) => {
                let error =
                    ProcessError::invalid_input(format!("`ordered_by` needs a JSON body: {e}"));
                return Err(Failure::new(msg, error.in_step("ordered_by")));
            }
        };
        let key = match key_program.run(body, &msg).await {
            Ok(values) => match values.into_iter().next() {
                Some(serde_json::Value::String(s)) => s,
                Some(other) => other.to_string(),
                None => String::new(),
            },
            Err(e) => return Err(Failure::new(msg, e.in_step("ordered_by"))),
        };
        Ok(Place {
            msg,
            _permit: permit,
            turn: Some(self.order.join(key)),
        })
    }

    /// The ids of the flow's top-level steps, in order: where [`Flow::dispatch_from`] may start.
    pub fn step_ids(&self) -> Vec<&str> {
        self.pipeline.step_ids()
    }

    /// Runs `msg` through the flow starting at its top-level step `step` (the steps before it
    /// are skipped), then the targets and the error handling, like
    /// [`Dispatch::dispatch`]. For a dead letter replayed where it failed, so the work its
    /// earlier steps did (calls with side effects) is not done twice. `Err(msg)` hands the
    /// message back untouched when the flow has no such step; see [`Flow::step_ids`].
    #[allow(clippy::result_large_err)]
    pub async fn dispatch_from(
        &self,
        step: &str,
        msg: Message,
    ) -> Result<Result<Vec<Message>, Failure>, Message> {
        let Some(start) = self.pipeline.position(step) else {
            return Err(msg);
        };
        let place = self.admit_message(msg).await;
        Ok(self.run_from(place, start).await)
    }

    /// Runs an admitted message through the steps and targets, then the error handling.
    async fn run(&self, place: Result<Place, Failure>) -> Result<Vec<Message>, Failure> {
        self.run_from(place, 0).await
    }

    /// [`Flow::run`] from the step at position `start`.
    async fn run_from(
        &self,
        place: Result<Place, Failure>,
        start: usize,
    ) -> Result<Vec<Message>, Failure> {
        self.metrics.received();
        let mut place = match place {
            Ok(place) => place,
            Err(failure) => return self.handle(failure, None).await,
        };
        if let Some(turn) = &mut place.turn {
            turn.ready().await;
        }
        // The original is kept aside only when a dead letter will need it.
        let original = self
            .options
            .dead_letter
            .as_ref()
            .map(|_| place.msg.detached());
        let processed = self.pipeline.process_from(start, place.msg).await;
        self.complete(processed, original).await
    }

    /// Takes what the steps made of a message to the targets, then to the error handling if
    /// anything failed on the way.
    async fn complete(
        &self,
        processed: Result<Outputs, Failure>,
        original: Option<Message>,
    ) -> Result<Vec<Message>, Failure> {
        let delivered = match processed {
            Ok(outputs) => self.deliver(outputs).await,
            Err(failure) => Err(failure),
        };
        match delivered {
            Ok(replies) => {
                self.metrics.finished(Finish::Completed);
                Ok(replies)
            }
            Err(failure) => self.handle(failure, original).await,
        }
    }

    /// The flow's error handling: `on_error`, then the dead letter, else a nack.
    async fn handle(
        &self,
        mut failure: Failure,
        original: Option<Message>,
    ) -> Result<Vec<Message>, Failure> {
        tracing::warn!(
            flow = %self.name,
            message_id = %failure.message.id(),
            step = failure.error.step.as_deref().unwrap_or(""),
            kind = %failure.error.kind,
            error = %failure.error.detail,
            "message failed"
        );
        headers::describe_error(&mut failure.message, &failure.error, &self.name);
        if let Some(on_error) = &self.options.on_error {
            match on_error.process(failure.message).await {
                Ok(outputs) => {
                    let mut replies = Vec::with_capacity(outputs.len());
                    for mut out in outputs {
                        for token in out.take_acks() {
                            token.ack();
                        }
                        replies.push(out);
                    }
                    self.metrics.finished(Finish::Handled);
                    return Ok(replies);
                }
                Err(second) => {
                    tracing::error!(
                        flow = %self.name,
                        message_id = %second.message.id(),
                        error = %second.error,
                        "the flow's on_error steps failed too"
                    );
                    // Keep reporting the first error: it is what went wrong.
                    failure.message = second.message;
                }
            }
        }
        // A source that will deliver the message again gets a nack: the dead letter is for its
        // last delivery.
        let redelivered = original
            .as_ref()
            .unwrap_or(&failure.message)
            .meta
            .redelivers_on_nack;
        if let Some(dead_letter) = self.options.dead_letter.as_ref().filter(|_| !redelivered) {
            let mut letter = original.unwrap_or_else(|| failure.message.detached());
            for (name, value) in &failure.message.headers {
                if name.starts_with("sluice.error.") || name.starts_with("sluice.retry.") {
                    letter.headers.insert(name.clone(), value.clone());
                }
            }
            match dead_letter.sink.deliver(&letter).await {
                Ok(()) => {
                    tracing::warn!(
                        flow = %self.name,
                        message_id = %letter.id(),
                        dead_letter = %dead_letter.id,
                        "message dead-lettered"
                    );
                    failure
                        .message
                        .headers
                        .insert(DEAD_LETTERED.to_owned(), dead_letter.id.clone());
                    for token in failure.message.take_acks() {
                        token.ack();
                    }
                    self.metrics.finished(Finish::DeadLettered);
                    return Err(failure);
                }
                Err(e) => tracing::error!(
                    flow = %self.name,
                    message_id = %letter.id(),
                    error = %e,
                    "writing the dead letter failed; the message is nacked"
                ),
            }
        }
        let reason = failure.error.to_string();
        for token in failure.message.take_acks() {
            token.nack(reason.as_str());
        }
        self.metrics.finished(Finish::Failed);
        Err(failure)
    }

    /// Delivers each of `outputs` to every target, then resolves its shares. A target's failure
    /// comes back unhandled.
    async fn deliver(&self, outputs: Outputs) -> Result<Vec<Message>, Failure> {
        let mut replies = Vec::with_capacity(outputs.len());
        for mut out in outputs {
            for target in &self.targets {
                if let Err(error) = target.sink.deliver(&out).await {
                    return Err(Failure::new(out, error.in_step(&target.id)));
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

#[async_trait]
impl Dispatch for Flow {
    async fn dispatch(&self, msg: Message) -> Result<Vec<Message>, Failure> {
        let place = self.admit_message(msg).await;
        self.run(place).await
    }

    async fn admit(self: Arc<Self>, msg: Message) -> Admitted {
        let place = self.admit_message(msg).await;
        Box::pin(async move { self.run(place).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{CaptureSink, Captured};
    use crate::processors::testkit::build_one;
    use serde_json::json;
    use sluice_core::{AckToken, Outcome};

    fn step(id: &str, expression: &str) -> Step {
        Step {
            id: id.to_owned(),
            processor: build_one("transform", json!(expression)),
        }
    }

    fn slot(steps: Vec<Step>) -> (StepsSlot, Arc<[Step]>) {
        let steps: Arc<[Step]> = steps.into();
        let slot = StepsSlot::default();
        assert!(slot.set(Arc::downgrade(&steps)).is_ok());
        (slot, steps)
    }

    /// A flow `[a: n+1, b: n*10] -> out`, its slots, and what reaches `out`.
    fn flow() -> (Arc<Flow>, StepsSlot, FlowSlot, Captured) {
        let (steps, shared) = slot(vec![step("a", ".n += 1"), step("b", ".n *= 10")]);
        let captured = Captured::default();
        let flow = Arc::new(Flow::new(
            Arc::from("f"),
            Pipeline::shared(shared),
            vec![Target {
                id: "out".into(),
                sink: Arc::new(CaptureSink::new("out".into(), captured.clone())),
            }],
        ));
        let flow_slot = FlowSlot::default();
        assert!(flow_slot.set(Arc::downgrade(&flow)).is_ok());
        (flow, steps, flow_slot, captured)
    }

    #[tokio::test]
    async fn dispatch_from_skips_the_steps_before_the_named_one() {
        let (flow, _steps, _flow_slot, captured) = flow();
        assert_eq!(flow.step_ids(), vec!["a", "b"]);
        let (token, rx) = AckToken::channel();
        let replies = flow
            .dispatch_from("b", Message::json(json!({"n": 1})).with_ack(token))
            .await
            .unwrap()
            .unwrap();
        // Only `b` ran: 1 * 10, not (1 + 1) * 10.
        assert_eq!(replies[0].body.json().unwrap(), &json!({"n": 10}));
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
        assert_eq!(captured.take("out").len(), 1);

        let whole = flow.dispatch(Message::json(json!({"n": 1}))).await.unwrap();
        assert_eq!(whole[0].body.json().unwrap(), &json!({"n": 20}));

        let back = flow
            .dispatch_from("nope", Message::json(json!({"n": 5})))
            .await
            .unwrap_err();
        assert_eq!(back.body.json().unwrap(), &json!({"n": 5}));
    }

    #[tokio::test]
    async fn downstream_runs_the_rest_of_the_pipeline_then_the_targets() {
        let (_flow, steps, flow_slot, captured) = flow();
        let after_a = Downstream::new(steps, 1, None, flow_slot);
        let (token, rx) = AckToken::channel();
        let replies = after_a
            .dispatch(Message::json(json!({"n": 1})).with_ack(token))
            .await
            .unwrap();
        assert_eq!(replies[0].body.json().unwrap(), &json!({"n": 10}));
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
        assert_eq!(captured.take("out").len(), 1);
    }

    #[tokio::test]
    async fn a_nested_downstream_continues_in_the_enclosing_pipeline() {
        let (_flow, steps, flow_slot, captured) = flow();
        let after_a = Arc::new(Downstream::new(steps, 1, None, Arc::clone(&flow_slot)));
        // A pipeline nested in step `a`: [c: n+100, d: n+1000]; emitting after `c`.
        // The nested steps are owned by the step that nests them; here, by the test.
        let (inner, _nested) = slot(vec![step("c", ".n += 100"), step("d", ".n += 1000")]);
        let after_c = Downstream::new(inner, 1, Some(after_a), flow_slot);
        let replies = after_c
            .dispatch(Message::json(json!({"n": 0})))
            .await
            .unwrap();
        // d then b: (0 + 1000) * 10.
        assert_eq!(replies[0].body.json().unwrap(), &json!({"n": 10000}));
        assert_eq!(captured.take("out").len(), 1);
    }

    #[tokio::test]
    async fn failures_downstream_get_the_flows_handling_and_a_stopped_flow_nacks() {
        let (flow, steps, flow_slot, _) = flow();
        let after_a = Downstream::new(steps, 1, None, flow_slot);
        let (token, rx) = AckToken::channel();
        let failure = after_a
            .dispatch(Message::bytes(&b"not json"[..]).with_ack(token))
            .await
            .unwrap_err();
        assert_eq!(failure.error.step.as_deref(), Some("b"));
        assert!(matches!(rx.await.unwrap(), Outcome::Nack(_)));

        drop(flow);
        let (token, rx) = AckToken::channel();
        let failure = after_a
            .dispatch(Message::json(json!({"n": 1})).with_ack(token))
            .await
            .unwrap_err();
        assert_eq!(failure.error.kind, ErrorKind::Internal);
        assert!(matches!(rx.await.unwrap(), Outcome::Nack(_)));
    }

    /// Sleeps `.ms`, then records `.name`; tracks how many run at once.
    #[derive(Default)]
    struct Recorder {
        log: std::sync::Mutex<Vec<String>>,
        running: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl Processor for Recorder {
        async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
            use std::sync::atomic::Ordering::SeqCst;
            let now = self.running.fetch_add(1, SeqCst) + 1;
            self.most.fetch_max(now, SeqCst);
            let body = msg.body.json().unwrap().clone();
            let ms = body["ms"].as_u64().unwrap_or(0);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            self.log
                .lock()
                .unwrap()
                .push(body["name"].as_str().unwrap_or("").to_owned());
            self.running.fetch_sub(1, SeqCst);
            Ok(std::iter::once(msg).collect())
        }
    }

    fn recorded_flow(options: FlowOptions) -> (Arc<Flow>, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let flow = Flow::with_options(
            Arc::from("f"),
            Pipeline::new(vec![Step {
                id: "record".into(),
                processor: recorder.clone(),
            }]),
            Vec::new(),
            options,
        );
        (Arc::new(flow), recorder)
    }

    #[tokio::test(start_paused = true)]
    async fn ordered_by_keeps_each_keys_admission_order_and_runs_keys_in_parallel() {
        let key = crate::expr::jq::compile(".k", crate::expr::jq::JqLimits::default()).unwrap();
        let (flow, recorder) = recorded_flow(FlowOptions {
            ordered_by: Some(key),
            ..FlowOptions::default()
        });
        let mut running = Vec::new();
        for (k, name, ms) in [
            ("a", "a1", 50),
            ("a", "a2", 0),
            ("b", "b1", 10),
            ("a", "a3", 0),
        ] {
            let msg = Message::json(json!({"k": k, "name": name, "ms": ms}));
            running.push(tokio::spawn(Arc::clone(&flow).admit(msg).await));
        }
        for r in running {
            r.await.unwrap().unwrap();
        }
        assert_eq!(*recorder.log.lock().unwrap(), ["b1", "a1", "a2", "a3"]);
        assert_eq!(flow.order.keys_in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_bounds_the_messages_in_flight() {
        let (flow, recorder) = recorded_flow(FlowOptions {
            concurrency: 2,
            ..FlowOptions::default()
        });
        let all = (0..6).map(|i| {
            let flow = Arc::clone(&flow);
            async move {
                flow.dispatch(Message::json(json!({"name": i.to_string(), "ms": 10})))
                    .await
            }
        });
        for r in futures_util::future::join_all(all).await {
            r.unwrap();
        }
        assert_eq!(recorder.log.lock().unwrap().len(), 6);
        assert_eq!(recorder.most.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// Always fails with `io`.
    struct Broken;

    #[async_trait]
    impl Sink for Broken {
        async fn deliver(&self, _msg: &Message) -> Result<(), ProcessError> {
            Err(ProcessError::new(ErrorKind::Io, "disk gone"))
        }
    }

    #[tokio::test]
    async fn a_dead_letter_that_cannot_be_written_nacks() {
        let (_first, steps, _, _) = flow();
        let flow = Flow::with_options(
            Arc::from("f"),
            Pipeline::shared(steps.get().unwrap().upgrade().unwrap()),
            Vec::new(),
            FlowOptions {
                dead_letter: Some(Target {
                    id: "dead".into(),
                    sink: Arc::new(Broken),
                }),
                ..FlowOptions::default()
            },
        );
        let (token, rx) = AckToken::channel();
        let failure = flow
            .dispatch(Message::bytes(&b"not json"[..]).with_ack(token))
            .await
            .unwrap_err();
        assert!(!failure.message.headers.contains_key(DEAD_LETTERED));
        assert!(matches!(rx.await.unwrap(), Outcome::Nack(_)));
    }

    #[tokio::test]
    async fn a_dead_letter_keeps_the_original_body_and_acks() {
        let (_first, steps, _, _) = flow();
        let captured = Captured::default();
        let flow = Flow::with_options(
            Arc::from("f"),
            // `a` (n + 1) fails on a string `n`.
            Pipeline::shared(steps.get().unwrap().upgrade().unwrap()),
            Vec::new(),
            FlowOptions {
                dead_letter: Some(Target {
                    id: "dead".into(),
                    sink: Arc::new(CaptureSink::new("dead".into(), captured.clone())),
                }),
                ..FlowOptions::default()
            },
        );
        let (token, rx) = AckToken::channel();
        let failure = flow
            .dispatch(Message::json(json!({"n": "x"})).with_ack(token))
            .await
            .unwrap_err();
        assert_eq!(failure.message.headers[DEAD_LETTERED], "dead");
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
        let letters = captured.take("dead");
        assert_eq!(letters[0].body.json().unwrap(), &json!({"n": "x"}));
        assert_eq!(letters[0].headers[headers::ERROR_STEP], "a");
        assert_eq!(letters[0].headers[headers::ERROR_FLOW], "f");
    }

    #[tokio::test]
    async fn a_message_its_source_delivers_again_is_nacked_until_its_last_delivery() {
        // `_first` holds the steps: the slot only refers to them weakly.
        let (_first, steps, _, _) = flow();
        let captured = Captured::default();
        let flow = Flow::with_options(
            Arc::from("f"),
            Pipeline::shared(steps.get().unwrap().upgrade().unwrap()),
            Vec::new(),
            FlowOptions {
                dead_letter: Some(Target {
                    id: "dead".into(),
                    sink: Arc::new(CaptureSink::new("dead".into(), captured.clone())),
                }),
                ..FlowOptions::default()
            },
        );
        // Attempts left: the failure goes back to the source, no letter is written.
        let mut msg = Message::json(json!({"n": "x"}));
        msg.meta.redelivers_on_nack = true;
        let (token, rx) = AckToken::channel();
        let failure = flow.dispatch(msg.with_ack(token)).await.unwrap_err();
        assert!(!failure.message.headers.contains_key(DEAD_LETTERED));
        assert!(matches!(rx.await.unwrap(), Outcome::Nack(_)));
        assert!(captured.take("dead").is_empty());
        // The last delivery: dead-lettered with its error, and acknowledged.
        let (token, rx) = AckToken::channel();
        let failure = flow
            .dispatch(Message::json(json!({"n": "x"})).with_ack(token))
            .await
            .unwrap_err();
        assert_eq!(failure.message.headers[DEAD_LETTERED], "dead");
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
        assert_eq!(captured.take("dead")[0].headers[headers::ERROR_STEP], "a");
    }
}
