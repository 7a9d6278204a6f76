//! Turns a validated [`Project`] into flows, sources and sinks (the "reifier" step in Camel's
//! terms): factories run here, and their errors get file:line:column too.

mod capture;
mod mock;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use sluice_core::registry::Factory;
use sluice_core::spec::ComponentKind;
use sluice_core::{
    BuildContext, BuildError, Processor, Registry, Resources, Sink, Source, StepBuilder,
};

pub use capture::{CaptureSink, Captured};
pub use mock::test_body as mock_body;

use crate::config::model::{ComponentUse, FlowDef, Project, TestMessage};
use crate::config::node::Node;
use crate::config::{Diagnostic, Diagnostics};
use crate::expr;
use crate::flow::{
    DEFAULT_CONCURRENCY, Downstream, Flow, FlowOptions, FlowSlot, Pipeline, Step, StepsSlot, Target,
};
use crate::resilience;

/// Everything built from a project, ready to run.
pub struct Topology {
    /// Flows by name.
    pub flows: BTreeMap<String, Arc<Flow>>,
    /// Each flow's source.
    pub sources: Vec<(Arc<str>, Box<dyn Source>)>,
    /// Shared by every component of this topology.
    pub resources: Arc<Resources>,
}

/// How to build a flow for a test run instead of production.
#[derive(Default)]
pub struct TestOverrides<'a> {
    /// Steps whose processing is replaced by a canned message.
    pub mocks: Option<&'a BTreeMap<String, TestMessage>>,
    /// Targets are replaced by capturing sinks, recorded here by target id.
    pub captures: Option<&'a Captured>,
}

/// Builds every flow and source of `project`.
pub fn build(
    project: &Project,
    registry: &Registry,
    resources: Arc<Resources>,
) -> Result<Topology, Diagnostics> {
    let mut flows = BTreeMap::new();
    let mut sources = Vec::new();
    let mut problems = Vec::new();
    for def in project.flows() {
        match build_flow(def, registry, &resources, &TestOverrides::default()) {
            Ok(flow) => {
                flows.insert(def.name.clone(), flow);
            }
            Err(mut d) => problems.append(&mut d),
        }
        match build_source(def, registry, &resources) {
            Ok(source) => sources.push((Arc::from(def.name.as_str()), source)),
            Err(d) => problems.push(d),
        }
    }
    let mut diagnostics = Diagnostics(problems);
    diagnostics.sort();
    if diagnostics.is_empty() {
        Ok(Topology {
            flows,
            sources,
            resources,
        })
    } else {
        Err(diagnostics)
    }
}

/// Builds the source of `def`.
pub fn build_source(
    def: &FlowDef,
    registry: &Registry,
    resources: &Arc<Resources>,
) -> Result<Box<dyn Source>, Diagnostic> {
    // Sources that keep a checkpoint (a polling source's watermark) find the store here.
    crate::durable::install_checkpoints(resources);
    let diags = Mutex::new(Vec::new());
    let ctx = Ctx {
        registry,
        def,
        owner: &def.from,
        resources,
        diags: &diags,
        mocks: None,
        // A source dispatches through its SourceContext; nothing comes after it.
        downstream: unconnected(),
        flow: FlowSlot::default(),
    };
    let Some((_, Factory::Source(factory))) =
        registry.get(ComponentKind::Source, &def.from.component)
    else {
        return Err(ctx.diagnostic(&BuildError::new("component is not registered as a source")));
    };
    factory(&def.from.config, &ctx.build_context()).map_err(|e| ctx.diagnostic(&e))
}

/// Builds the steps and targets of `def` (not its source).
pub fn build_flow(
    def: &FlowDef,
    registry: &Registry,
    resources: &Arc<Resources>,
    overrides: &TestOverrides<'_>,
) -> Result<Arc<Flow>, Vec<Diagnostic>> {
    let diags = Mutex::new(Vec::new());
    let flow_slot = FlowSlot::default();
    resources
        .get_or_default::<crate::dead_letter_store::FlowVersions>()
        .set(&def.name, flow_version(def));
    let pipeline = build_steps(
        def,
        &def.steps,
        registry,
        resources,
        &diags,
        overrides.mocks,
        (None, &flow_slot),
    );
    let build_target = |target: &ComponentUse| -> Option<Target> {
        let ctx = Ctx {
            registry,
            def,
            owner: target,
            resources,
            diags: &diags,
            mocks: overrides.mocks,
            downstream: unconnected(),
            flow: Arc::clone(&flow_slot),
        };
        let sink: Result<Arc<dyn Sink>, BuildError> =
            match registry.get(ComponentKind::Sink, &target.component) {
                Some((_, Factory::Sink(factory))) => factory(&target.config, &ctx.build_context()),
                _ => Err(BuildError::new("component is not registered as a sink")),
            };
        let sink = sink.and_then(|s| ctx.with_sink_policies(s));
        match (sink, overrides.captures) {
            // Build the real sink even in tests, so its configuration errors still surface.
            (Ok(_), Some(captured)) => Some(Target {
                id: target.id.clone(),
                sink: Arc::new(CaptureSink::new(target.id.clone(), captured.clone())),
            }),
            (Ok(sink), None) => Some(Target {
                id: target.id.clone(),
                sink,
            }),
            (Err(e), _) => {
                ctx.report(&e);
                None
            }
        }
    };
    let targets: Vec<Target> = def.to.iter().filter_map(build_target).collect();
    let dead_letter = def.handling.dead_letter.as_ref().and_then(build_target);
    let on_error = (!def.handling.on_error.is_empty()).then(|| {
        build_steps(
            def,
            &def.handling.on_error,
            registry,
            resources,
            &diags,
            overrides.mocks,
            (None, &flow_slot),
        )
    });
    let ordered_by = def.handling.ordered_by.as_ref().and_then(|code| {
        match expr::jq::compile(code, expr::jq::JqLimits::default()) {
            Ok(program) => Some(program),
            Err(e) => {
                if let Ok(mut d) = diags.lock() {
                    d.push(Diagnostic {
                        file: Arc::clone(&def.file),
                        loc: def.loc,
                        path: format!("{}.ordered_by", def.name),
                        message: format!("invalid jq expression: {}", e.message),
                        help: None,
                    });
                }
                None
            }
        }
    });
    let options = FlowOptions {
        on_error,
        dead_letter,
        concurrency: def.handling.concurrency.unwrap_or(DEFAULT_CONCURRENCY),
        ordered_by,
    };
    let problems = diags.into_inner().unwrap_or_default();
    if problems.is_empty() {
        let flow = Arc::new(Flow::with_options(
            Arc::from(def.name.as_str()),
            pipeline,
            targets,
            options,
        ));
        // Steps emitting downstream reach the flow from now on.
        let _ = flow_slot.set(Arc::downgrade(&flow));
        resources
            .get_or_default::<crate::metrics::Metrics>()
            .register_flow(&def.name, Arc::clone(flow.metrics()));
        Ok(flow)
    } else {
        Err(problems)
    }
}

/// The flow's version: a content hash of its definition as loaded (defaults filled), recorded
/// with its dead letters. Flow files carry no revision of their own; the hash changes exactly
/// when the definition does.
fn flow_version(def: &FlowDef) -> String {
    let uses = std::iter::once(&def.from)
        .chain(&def.steps)
        .chain(&def.to)
        .chain(&def.handling.on_error)
        .chain(&def.handling.dead_letter);
    let mut parts: Vec<Vec<u8>> = vec![def.name.clone().into_bytes()];
    for component in uses {
        parts.push(
            format!(
                "{}#{}#{}",
                component.path, component.component, component.config
            )
            .into_bytes(),
        );
        parts.push(
            format!(
                "{:?}{:?}",
                component.policies.retry, component.policies.circuit_breaker
            )
            .into_bytes(),
        );
    }
    parts.push(
        format!(
            "{:?}{:?}",
            def.handling.concurrency, def.handling.ordered_by
        )
        .into_bytes(),
    );
    crate::dead_letter_store::content_hash(parts.iter().map(Vec::as_slice))
}

/// A downstream that belongs to no pipeline: for sources and sinks.
fn unconnected() -> Arc<Downstream> {
    Arc::new(Downstream::new(
        StepsSlot::default(),
        0,
        None,
        FlowSlot::default(),
    ))
}

/// Builds `steps` as one pipeline. `outer` is what follows the pipeline when it is nested (the
/// downstream of the step that owns it), `None` at the top of the flow.
fn build_steps(
    def: &FlowDef,
    steps: &[ComponentUse],
    registry: &Registry,
    resources: &Arc<Resources>,
    diags: &Mutex<Vec<Diagnostic>>,
    mocks: Option<&BTreeMap<String, TestMessage>>,
    (outer, flow): (Option<Arc<Downstream>>, &FlowSlot),
) -> Pipeline {
    let slot = StepsSlot::default();
    let mut built = Vec::new();
    for (index, step) in steps.iter().enumerate() {
        let ctx = Ctx {
            registry,
            def,
            owner: step,
            resources,
            diags,
            mocks,
            downstream: Arc::new(Downstream::new(
                Arc::clone(&slot),
                index + 1,
                outer.clone(),
                Arc::clone(flow),
            )),
            flow: Arc::clone(flow),
        };
        let processor: Result<Arc<dyn Processor>, BuildError> = match registry
            .get(ComponentKind::Processor, &step.component)
        {
            Some((_, Factory::Processor(factory))) => factory(&step.config, &ctx.build_context()),
            _ => Err(BuildError::new(
                "component is not registered as a processor",
            )),
        };
        let processor = processor.and_then(|p| ctx.with_step_policies(p));
        match processor {
            Ok(processor) => {
                let processor = match mocks.and_then(|m| m.get(&step.id)) {
                    Some(canned) => {
                        Arc::new(mock::MockStep::new(canned.clone())) as Arc<dyn Processor>
                    }
                    None => processor,
                };
                built.push(Step {
                    id: step.id.clone(),
                    processor,
                });
            }
            Err(e) => ctx.report(&e),
        }
    }
    let built: Arc<[Step]> = built.into();
    let _ = slot.set(Arc::downgrade(&built));
    Pipeline::shared(built)
}

/// Build context of one component: reports its errors at the right place, builds its nested steps.
struct Ctx<'a> {
    registry: &'a Registry,
    def: &'a FlowDef,
    owner: &'a ComponentUse,
    resources: &'a Arc<Resources>,
    diags: &'a Mutex<Vec<Diagnostic>>,
    mocks: Option<&'a BTreeMap<String, TestMessage>>,
    /// What follows this component.
    downstream: Arc<Downstream>,
    /// The flow being built, for the downstreams of nested steps.
    flow: FlowSlot,
}

/// Marks a [`BuildError`] whose diagnostics were already recorded with their exact location.
const ALREADY_REPORTED: &str = "nested steps are invalid (reported above)";

impl Ctx<'_> {
    fn build_context(&self) -> BuildContext<'_> {
        BuildContext {
            flow: &self.def.name,
            id: &self.owner.id,
            steps: self,
            resources: self.resources,
            downstream: Arc::clone(&self.downstream) as Arc<dyn sluice_core::Dispatch>,
        }
    }

    fn diagnostic(&self, e: &BuildError) -> Diagnostic {
        let (loc, path) = match &e.field {
            Some(field) => match self.owner.node.at_path(field) {
                Some(node) => (node.loc, format!("{}.{field}", self.owner.path)),
                None => (self.owner.loc, format!("{}.{field}", self.owner.path)),
            },
            None => (self.owner.loc, self.owner.path.clone()),
        };
        Diagnostic {
            file: Arc::clone(&self.def.file),
            loc,
            path,
            message: e.message.clone(),
            help: None,
        }
    }

    fn report(&self, e: &BuildError) {
        if e.message == ALREADY_REPORTED {
            return;
        }
        let d = self.diagnostic(e);
        if let Ok(mut diags) = self.diags.lock() {
            diags.push(d);
        }
    }
}

impl Ctx<'_> {
    /// The breaker of this component, if it has one.
    fn breaker(&self) -> Result<Option<Arc<resilience::breaker::CircuitBreaker>>, BuildError> {
        let Some(config) = &self.owner.policies.circuit_breaker else {
            return Ok(None);
        };
        let config = resilience::breaker_config(config).map_err(policy_error)?;
        let name = format!("{}/{}", self.def.name, self.owner.id);
        Ok(Some(resilience::new_breaker(name, config, self.resources)))
    }

    fn retry(&self) -> Result<Option<resilience::retry::RetryPolicy>, BuildError> {
        self.owner
            .policies
            .retry
            .as_ref()
            .map(resilience::retry_policy)
            .transpose()
            .map_err(policy_error)
    }

    /// Wraps a built step in its `retry:` and `circuit_breaker:` (with its fallback steps).
    fn with_step_policies(
        &self,
        step: Arc<dyn Processor>,
    ) -> Result<Arc<dyn Processor>, BuildError> {
        let retry = self.retry()?;
        let breaker = match self.breaker()? {
            Some(breaker) => Some(resilience::GuardedBy {
                breaker,
                fallback: self.fallback()?,
            }),
            None => None,
        };
        Ok(resilience::wrap_step(step, retry, breaker))
    }

    /// Wraps a built target in its `retry:` and `circuit_breaker:`.
    fn with_sink_policies(&self, sink: Arc<dyn Sink>) -> Result<Arc<dyn Sink>, BuildError> {
        Ok(resilience::wrap_sink(sink, self.retry()?, self.breaker()?))
    }

    /// The breaker's `fallback` steps; what they output continues after this step.
    fn fallback(&self) -> Result<Option<Arc<dyn Processor>>, BuildError> {
        let policies = &self.owner.policies;
        let Some(node) = policies.node.as_ref().and_then(|n| n.get("fallback")) else {
            return Ok(None);
        };
        let path = format!("{}.fallback", policies.path);
        let id_prefix = format!("{}.fallback", self.owner.id);
        let pipeline = self.nested_pipeline(node, &path, &id_prefix)?;
        Ok(Some(Arc::new(pipeline)))
    }

    /// Validates the step list at `node` and builds it to continue into this component's
    /// downstream. Shared by nested `steps:` fields and breaker fallbacks so both report
    /// their problems at the nested location and chain the same way.
    fn nested_pipeline(
        &self,
        node: &Node,
        path: &str,
        id_prefix: &str,
    ) -> Result<Pipeline, BuildError> {
        let uses =
            crate::config::load::nested_steps(self.registry, node, path, id_prefix, &self.def.file)
                .map_err(|d| {
                    if let Ok(mut diags) = self.diags.lock() {
                        diags.extend(d);
                    }
                    BuildError::new(ALREADY_REPORTED)
                })?;
        Ok(build_steps(
            self.def,
            &uses,
            self.registry,
            self.resources,
            self.diags,
            self.mocks,
            (Some(Arc::clone(&self.downstream)), &self.flow),
        ))
    }
}

/// A policy's error is located at the component: its field is not inside the component's own
/// configuration, so it is named in the message instead.
fn policy_error(e: BuildError) -> BuildError {
    match e.field {
        Some(field) => BuildError::new(format!("`{field}`: {}", e.message)),
        None => e,
    }
}

impl StepBuilder for Ctx<'_> {
    fn store_backend(
        &self,
        name: &str,
    ) -> Result<Option<sluice_core::registry::StoreBackend>, Vec<&'static str>> {
        match self.registry.get_store_backend(name) {
            // Flow tests replace remote stores with in-memory ones, as they replace targets.
            Some(_) if self.mocks.is_some() => Ok(None),
            Some(backend) => Ok(Some(backend)),
            None => Err(self.registry.store_backend_names()),
        }
    }

    fn build_steps(
        &self,
        field: &str,
        _steps: &serde_json::Value,
    ) -> Result<Arc<dyn Processor>, BuildError> {
        let node = self
            .owner
            .node
            .at_path(field)
            .ok_or_else(|| BuildError::field(field, "no steps at this field"))?;
        let path = format!("{}.{field}", self.owner.path);
        let id_prefix = format!("{}.{field}", self.owner.id);
        // Validation problems come back as an error; build problems are only recorded, so
        // they are detected by the count of diagnostics growing.
        let before = self.diags.lock().map_or(0, |d| d.len());
        let pipeline = self.nested_pipeline(node, &path, &id_prefix)?;
        let after = self.diags.lock().map_or(0, |d| d.len());
        if after > before {
            return Err(BuildError::new(ALREADY_REPORTED));
        }
        Ok(Arc::new(pipeline))
    }

    fn compile_jq(
        &self,
        field: &str,
        code: &str,
    ) -> Result<Arc<dyn sluice_core::component::JqProgram>, BuildError> {
        expr::jq::compile(code, expr::jq::JqLimits::default())
            .map_err(|e| BuildError::field(field, format!("invalid jq expression: {}", e.message)))
    }
}
