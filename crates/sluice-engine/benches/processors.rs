//! Per-message cost of the hot processors, next to a bare pass-through step measured the same
//! way, so results read as ratios to the engine's own overhead (one async call on a
//! current-thread runtime, one message built from a shared body).
//!
//! Run: `cargo bench -p sluice-engine --bench processors -- --warm-up-time 1 --measurement-time 3`

// A benchmark is not library code: a setup that cannot build should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use async_trait::async_trait;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Value, json};
use sluice_core::component::{JqProgram, StepBuilder};
use sluice_core::registry::Factory;
use sluice_core::spec::ComponentKind;
use sluice_core::{
    Body, BuildContext, BuildError, Dispatch, Failure, Message, Outputs, Processor, Registry,
    Resources,
};
use sluice_engine::expr::jq::{self, JqLimits};
use tokio::runtime::Runtime;

/// Builds steps from the engine's registry, as the loader does, without a flow around them.
struct Builder {
    registry: Registry,
    resources: Arc<Resources>,
}

/// Everything after the step: acknowledges what it is given (timer emissions; none here).
struct Done;

#[async_trait]
impl Dispatch for Done {
    async fn dispatch(&self, msg: Message) -> Result<Vec<Message>, Failure> {
        msg.ack();
        Ok(Vec::new())
    }
}

impl Builder {
    fn new() -> Self {
        let mut registry = Registry::new();
        sluice_engine::register_all(&mut registry);
        Builder {
            registry,
            resources: Arc::new(Resources::default()),
        }
    }

    fn step(&self, name: &str, config: &Value) -> Arc<dyn Processor> {
        let (_, factory) = self.registry.get(ComponentKind::Processor, name).unwrap();
        let Factory::Processor(factory) = factory else {
            panic!("{name} is not a processor");
        };
        let ctx = BuildContext {
            flow: "bench",
            id: name,
            steps: self,
            resources: &self.resources,
            downstream: Arc::new(Done),
        };
        factory(config, &ctx).unwrap_or_else(|e| panic!("{name}: {e}"))
    }
}

impl StepBuilder for Builder {
    fn build_steps(&self, _field: &str, steps: &Value) -> Result<Arc<dyn Processor>, BuildError> {
        let steps = steps
            .as_array()
            .unwrap()
            .iter()
            .map(|step| {
                let (name, config) = step.as_object().unwrap().iter().next().unwrap();
                self.step(name, config)
            })
            .collect();
        Ok(Arc::new(Sequence(steps)))
    }

    fn compile_jq(&self, field: &str, code: &str) -> Result<Arc<dyn JqProgram>, BuildError> {
        jq::compile(code, JqLimits::default()).map_err(|e| BuildError::field(field, e.message))
    }
}

struct Sequence(Vec<Arc<dyn Processor>>);

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

/// The baseline: a step that hands its message on.
struct PassThrough;

#[async_trait]
impl Processor for PassThrough {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        Ok(std::iter::once(msg).collect())
    }
}

/// Runs `step` on a message with `body` (shared, so building it costs the same everywhere).
fn run(rt: &Runtime, step: &Arc<dyn Processor>, body: &Body) -> Outputs {
    let msg = Message::new(body.clone()).with_header("x-tenant", "acme");
    rt.block_on(step.process(msg)).unwrap()
}

fn processors(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let builder = Builder::new();
    let order = Body::from_json(json!({"id": 7, "qty": 3, "price": 2.5, "status": "paid"}));

    let mut single = c.benchmark_group("per_message");
    single.throughput(Throughput::Elements(1));
    let pass: Arc<dyn Processor> = Arc::new(PassThrough);
    single.bench_function("pass_through", |b| {
        b.iter(|| black_box(run(&rt, &pass, &order)))
    });
    let transform = builder.step(
        "transform",
        &json!({"expression": "{id: .id, total: (.qty * .price)}"}),
    );
    single.bench_function("transform", |b| {
        b.iter(|| black_box(run(&rt, &transform, &order)))
    });
    let choice = builder.step(
        "choice",
        &json!({"when": [
            {"condition": ".status == \"refunded\"", "steps": [{"set_header": {"name": "route", "value": "refunds"}}]},
            {"condition": ".status == \"paid\"", "steps": [{"set_header": {"name": "route", "value": "billing"}}]}
        ], "otherwise": [{"set_header": {"name": "route", "value": "other"}}]}),
    );
    single.bench_function("choice_second_branch", |b| {
        b.iter(|| black_box(run(&rt, &choice, &order)))
    });
    single.finish();

    // Split and aggregate are measured per part: one iteration handles 100 (10) messages.
    let mut split = c.benchmark_group("split_100");
    split.throughput(Throughput::Elements(100));
    let items = Body::from_json(Value::Array(
        (0..100).map(|i| json!({"sku": i, "qty": 1})).collect(),
    ));
    let split_items = builder.step("split", &json!({}));
    split.bench_function("json_items", |b| {
        b.iter(|| black_box(run(&rt, &split_items, &items)))
    });
    let lines = Body::from_bytes(
        (0..100)
            .map(|i| format!("line {i} of the file\n"))
            .collect::<String>(),
    );
    let split_lines = builder.step("split", &json!({"by": "lines"}));
    split.bench_function("lines", |b| {
        b.iter(|| black_box(run(&rt, &split_lines, &lines)))
    });
    split.finish();

    let mut aggregate = c.benchmark_group("aggregate_groups_of_10");
    aggregate.throughput(Throughput::Elements(10));
    let reading = Body::from_json(json!({"sensor": "s1", "value": 3}));
    for (name, config) in [
        (
            "array_of_bodies",
            json!({"correlation": ".sensor", "size": 10}),
        ),
        (
            "jq_sum",
            json!({"correlation": ".sensor", "size": 10, "aggregation": "map(.value) | add"}),
        ),
    ] {
        let step = builder.step("aggregate", &config);
        aggregate.bench_function(name, |b| {
            b.iter(|| {
                for _ in 0..9 {
                    assert!(run(&rt, &step, &reading).is_empty());
                }
                black_box(run(&rt, &step, &reading))
            })
        });
    }
    aggregate.finish();
}

criterion_group!(benches, processors);
criterion_main!(benches);
