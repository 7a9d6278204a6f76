//! Component health: how a connector says "I cannot reach my service" without stopping its flow.
//!
//! A source or sink that talks to a broker or a database keeps retrying when the service is down;
//! meanwhile its flow must show as unhealthy (the admin API's `/health`, the console) while every
//! other flow keeps running. Components report through a [`HealthHandle`]; the engine reads the
//! [`ComponentHealth`] board kept in the topology's [`Resources`] and folds it into each flow's
//! health.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::component::{BuildContext, SourceContext};
use crate::resources::Resources;

/// Which component of which flow: `(flow, component id)`.
type ComponentKey = (Arc<str>, Arc<str>);

/// The problems components have reported, by flow and component. Lives in [`Resources`].
#[derive(Default)]
pub struct ComponentHealth {
    problems: Mutex<BTreeMap<ComponentKey, String>>,
}

impl ComponentHealth {
    /// The board shared by every component built with `resources`.
    pub fn of(resources: &Resources) -> Arc<Self> {
        resources.get_or_default::<ComponentHealth>()
    }

    /// Every current problem of `flow`, as `(component id, reason)`, in component order.
    pub fn problems(&self, flow: &str) -> Vec<(String, String)> {
        self.lock()
            .iter()
            .filter(|((f, _), _)| f.as_ref() == flow)
            .map(|((_, c), reason)| (c.to_string(), reason.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ComponentKey, String>> {
        match self.problems.lock() {
            Ok(guard) => guard,
            // Inserts and removes are single operations: a panic cannot leave the map torn.
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl fmt::Debug for ComponentHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ComponentHealth")
            .field("problems", &*self.lock())
            .finish()
    }
}

/// One component's voice on the [`ComponentHealth`] board. Cheap to clone; make one per component
/// and clone it, since the clones share what was last reported.
#[derive(Clone)]
pub struct HealthHandle {
    board: Arc<ComponentHealth>,
    key: ComponentKey,
    /// Whether this component has a problem on the board: `healthy` is called on every
    /// successful delivery, and only takes the board's lock when there is something to clear.
    reported: Arc<AtomicBool>,
}

impl HealthHandle {
    /// The handle of component `component` of `flow`.
    pub fn new(resources: &Resources, flow: &str, component: &str) -> Self {
        HealthHandle {
            board: ComponentHealth::of(resources),
            key: (Arc::from(flow), Arc::from(component)),
            reported: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The handle of the component being built (a sink or processor keeps it for later).
    pub fn for_component(ctx: &BuildContext<'_>) -> Self {
        Self::new(ctx.resources, ctx.flow, ctx.id)
    }

    /// The handle of a running source (its component id is `from`).
    pub fn for_source(ctx: &SourceContext) -> Self {
        Self::new(&ctx.resources, &ctx.flow, "from")
    }

    /// The component works (again): its problem, if any, is cleared.
    pub fn healthy(&self) {
        if self.reported.load(Ordering::Acquire) {
            // Under the lock, so a concurrent `unhealthy` is either wholly before or after.
            let mut board = self.board.lock();
            if self.reported.swap(false, Ordering::AcqRel) {
                board.remove(&self.key);
            }
        }
    }

    /// The component cannot do its job now, for `reason` (say what it is retrying, and how).
    pub fn unhealthy(&self, reason: impl fmt::Display) {
        let mut board = self.board.lock();
        board.insert(self.key.clone(), reason.to_string());
        self.reported.store(true, Ordering::Release);
    }

    /// Whether this component has no problem on the board.
    pub fn is_healthy(&self) -> bool {
        !self.reported.load(Ordering::Acquire)
    }
}

impl fmt::Debug for HealthHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthHandle")
            .field("flow", &self.key.0)
            .field("component", &self.key.1)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_per_flow_and_cleared_by_healthy() {
        let resources = Resources::default();
        let a = HealthHandle::new(&resources, "orders", "from");
        let b = HealthHandle::new(&resources, "orders", "publish");
        let other = HealthHandle::new(&resources, "billing", "from");
        a.unhealthy("cannot reach amqp://127.0.0.1:5672: connection refused");
        b.unhealthy("broker closed the channel");
        other.unhealthy("down");
        let board = ComponentHealth::of(&resources);
        assert_eq!(
            board.problems("orders"),
            vec![
                (
                    "from".to_owned(),
                    "cannot reach amqp://127.0.0.1:5672: connection refused".to_owned()
                ),
                ("publish".to_owned(), "broker closed the channel".to_owned()),
            ]
        );
        a.healthy();
        assert!(a.is_healthy());
        assert!(!b.is_healthy());
        assert_eq!(board.problems("orders").len(), 1);
        assert_eq!(board.problems("billing").len(), 1);
        assert!(board.problems("nowhere").is_empty());
    }
}
