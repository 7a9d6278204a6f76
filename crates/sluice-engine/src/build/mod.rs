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
use crate::config::{Diagnostic, Diagnostics};
use crate::expr;
use crate::flow::{Flow, Pipeline, Step, Target};

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
    let diags = Mutex::new(Vec::new());
    let ctx = Ctx {
        registry,
        def,
        owner: &def.from,
        resources,
        diags: &diags,
        mocks: None,
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
    let pipeline = build_steps(
        def,
        &def.steps,
        registry,
        resources,
        &diags,
        overrides.mocks,
    );
    let mut targets = Vec::new();
    for target in &def.to {
        let ctx = Ctx {
            registry,
            def,
            owner: target,
            resources,
            diags: &diags,
            mocks: overrides.mocks,
        };
        let sink: Result<Arc<dyn Sink>, BuildError> =
            match registry.get(ComponentKind::Sink, &target.component) {
                Some((_, Factory::Sink(factory))) => factory(&target.config, &ctx.build_context()),
                _ => Err(BuildError::new("component is not registered as a sink")),
            };
        match (sink, overrides.captures) {
            // Build the real sink even in tests, so its configuration errors still surface.
            (Ok(_), Some(captured)) => targets.push(Target {
                id: target.id.clone(),
                sink: Arc::new(CaptureSink::new(target.id.clone(), captured.clone())),
            }),
            (Ok(sink), None) => targets.push(Target {
                id: target.id.clone(),
                sink,
            }),
            (Err(e), _) => ctx.report(&e),
        }
    }
    let problems = diags.into_inner().unwrap_or_default();
    if problems.is_empty() {
        Ok(Arc::new(Flow::new(
            Arc::from(def.name.as_str()),
            pipeline,
            targets,
        )))
    } else {
        Err(problems)
    }
}

fn build_steps(
    def: &FlowDef,
    steps: &[ComponentUse],
    registry: &Registry,
    resources: &Arc<Resources>,
    diags: &Mutex<Vec<Diagnostic>>,
    mocks: Option<&BTreeMap<String, TestMessage>>,
) -> Pipeline {
    let mut built = Vec::new();
    for step in steps {
        let ctx = Ctx {
            registry,
            def,
            owner: step,
            resources,
            diags,
            mocks,
        };
        let processor: Result<Arc<dyn Processor>, BuildError> = match registry
            .get(ComponentKind::Processor, &step.component)
        {
            Some((_, Factory::Processor(factory))) => factory(&step.config, &ctx.build_context()),
            _ => Err(BuildError::new(
                "component is not registered as a processor",
            )),
        };
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
    Pipeline::new(built)
}

/// Build context of one component: reports its errors at the right place, builds its nested steps.
struct Ctx<'a> {
    registry: &'a Registry,
    def: &'a FlowDef,
    owner: &'a ComponentUse,
    resources: &'a Arc<Resources>,
    diags: &'a Mutex<Vec<Diagnostic>>,
    mocks: Option<&'a BTreeMap<String, TestMessage>>,
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

impl StepBuilder for Ctx<'_> {
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
        let uses = crate::config::load::nested_steps(
            self.registry,
            node,
            &path,
            &id_prefix,
            &self.def.file,
        )
        .map_err(|d| {
            if let Ok(mut diags) = self.diags.lock() {
                diags.extend(d);
            }
            BuildError::new(ALREADY_REPORTED)
        })?;
        let before = self.diags.lock().map_or(0, |d| d.len());
        let pipeline = build_steps(
            self.def,
            &uses,
            self.registry,
            self.resources,
            self.diags,
            self.mocks,
        );
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
