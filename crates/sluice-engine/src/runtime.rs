//! Runs a built topology: one task per source, a shared shutdown signal, health per flow.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_core::{ComponentHealth, Dispatch, Resources, SourceContext};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::background::Background;
use crate::build::Topology;
use crate::flow::Flow;

/// Whether a flow's source is running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Taking messages.
    Running,
    /// Running, but a component cannot reach its service and keeps retrying: `component: reason`
    /// for each, joined by `; `.
    Unhealthy(String),
    /// Its source stopped with this error; other flows keep running.
    Failed(String),
    /// Its source finished (a timer with a count, a shutdown).
    Stopped,
}

/// Every flow's health, shared with whoever reports it (the admin API).
#[derive(Clone)]
pub struct HealthBoard {
    sources: Arc<Mutex<BTreeMap<String, Health>>>,
    components: Arc<ComponentHealth>,
}

impl HealthBoard {
    /// A board with no flows, reading component problems from `resources`.
    pub fn new(resources: &Resources) -> Self {
        HealthBoard {
            sources: Arc::default(),
            components: ComponentHealth::of(resources),
        }
    }

    /// Each flow's health now, by flow name: a running flow whose components report problems is
    /// [`Health::Unhealthy`].
    pub fn snapshot(&self) -> BTreeMap<String, Health> {
        let mut flows = self.sources.lock().map(|h| h.clone()).unwrap_or_default();
        for (flow, health) in flows.iter_mut() {
            if *health != Health::Running {
                continue;
            }
            let problems = self.components.problems(flow);
            if !problems.is_empty() {
                let reasons: Vec<String> = problems
                    .into_iter()
                    .map(|(component, reason)| format!("{component}: {reason}"))
                    .collect();
                *health = Health::Unhealthy(reasons.join("; "));
            }
        }
        flows
    }

    fn set(&self, flow: &str, state: Health) {
        if let Ok(mut h) = self.sources.lock() {
            h.insert(flow.to_owned(), state);
        }
    }
}

/// A running set of flows.
pub struct Runtime {
    flows: BTreeMap<String, Arc<Flow>>,
    health: HealthBoard,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    resources: Arc<Resources>,
}

impl Runtime {
    /// Starts every source of `topology`. Must be called inside a tokio runtime.
    pub fn start(topology: Topology) -> Self {
        let shutdown = CancellationToken::new();
        let health = HealthBoard::new(&topology.resources);
        let mut tasks = JoinSet::new();
        for (flow_name, source) in topology.sources {
            let Some(flow) = topology.flows.get(flow_name.as_ref()) else {
                continue;
            };
            let ctx = SourceContext {
                flow: Arc::clone(&flow_name),
                dispatcher: Arc::clone(flow) as Arc<dyn Dispatch>,
                shutdown: shutdown.child_token(),
                resources: Arc::clone(&topology.resources),
            };
            health.set(&flow_name, Health::Running);
            let health = health.clone();
            tasks.spawn(async move {
                let outcome = source.run(ctx).await;
                match outcome {
                    Ok(()) => health.set(&flow_name, Health::Stopped),
                    Err(e) => {
                        tracing::error!(flow = %flow_name, error = %e, "source stopped; the other flows keep running");
                        health.set(&flow_name, Health::Failed(e.to_string()));
                    }
                }
            });
        }
        tracing::info!(flows = topology.flows.len(), "runtime started");
        Runtime {
            flows: topology.flows,
            health,
            shutdown,
            tasks,
            resources: topology.resources,
        }
    }

    /// The flow called `name`, to dispatch to directly.
    pub fn flow(&self, name: &str) -> Option<Arc<Flow>> {
        self.flows.get(name).cloned()
    }

    /// Every flow, by name.
    pub fn flows(&self) -> &BTreeMap<String, Arc<Flow>> {
        &self.flows
    }

    /// Health of every flow's source.
    pub fn health(&self) -> BTreeMap<String, Health> {
        self.health.snapshot()
    }

    /// A shared view of every flow's health that stays current.
    pub fn health_board(&self) -> HealthBoard {
        self.health.clone()
    }

    /// Resources shared by the components.
    pub fn resources(&self) -> &Arc<Resources> {
        &self.resources
    }

    /// A token cancelled when shutdown begins.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops taking new work, lets in-flight work finish for up to `grace`, then stops the rest.
    /// Returns how many sources had to be stopped forcibly.
    pub async fn shutdown(mut self, grace: Duration) -> usize {
        self.shutdown.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        let drained = tokio::time::timeout_at(deadline, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_ok() {
            // Fire-and-forget work (wire taps) may use what is left of the grace period; what is
            // still running after it is lost, as documented for those steps.
            let background = self.resources.get_or_default::<Background>();
            if tokio::time::timeout_at(deadline, background.idle())
                .await
                .is_err()
            {
                tracing::warn!(
                    tasks = background.running(),
                    "background work (wire taps) still running at shutdown; it is dropped"
                );
            }
            return 0;
        }
        let left = self.tasks.len();
        tracing::warn!(
            sources = left,
            grace_ms = grace.as_millis() as u64,
            "sources did not stop in time; stopping them"
        );
        self.tasks.shutdown().await;
        left
    }
}
