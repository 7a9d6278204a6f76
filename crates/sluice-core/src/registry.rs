//! The explicit registry of components. `register_all` functions in the engine and connector
//! crates fill it; tests build their own.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use crate::component::{BuildContext, Processor, Sink, Source};
use crate::error::BuildError;
use crate::spec::{ComponentKind, ComponentSpec};

/// Builds a source from its (validated) configuration.
pub type SourceFactory = fn(&Value, &BuildContext<'_>) -> Result<Box<dyn Source>, BuildError>;
/// Builds a processor from its (validated) configuration.
pub type ProcessorFactory = fn(&Value, &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError>;
/// Builds a sink from its (validated) configuration.
pub type SinkFactory = fn(&Value, &BuildContext<'_>) -> Result<Arc<dyn Sink>, BuildError>;

/// Builds an idempotent consumer's repository from the configuration under
/// `backend: {<name>: ...}` (a remote store a connector provides).
pub type RepositoryFactory = fn(
    &Value,
    &BuildContext<'_>,
) -> Result<Arc<dyn crate::state::IdempotentRepository>, BuildError>;
/// Builds a cache's store from the configuration under `backend: {<name>: ...}`.
pub type CacheStoreFactory =
    fn(&Value, &BuildContext<'_>) -> Result<Arc<dyn crate::state::CacheStore>, BuildError>;

/// Builds a throttle's shared rate limit store from the configuration under
/// `backend: {<name>: ...}`.
pub type RateLimitStoreFactory =
    fn(&Value, &BuildContext<'_>) -> Result<Arc<dyn crate::state::RateLimitStore>, BuildError>;

/// A remote store a connector provides for the stateful steps (`idempotent_consumer`, `cache`,
/// `throttle`).
#[derive(Clone, Copy)]
pub struct StoreBackend {
    /// Builds an idempotency repository.
    pub repository: RepositoryFactory,
    /// Builds a cache store.
    pub cache: CacheStoreFactory,
    /// Builds a rate limit store, when the backend can keep one atomically.
    pub rate_limit: Option<RateLimitStoreFactory>,
}

/// A registered component: its spec and how to build it.
#[derive(Clone)]
pub enum Factory {
    /// A source.
    Source(SourceFactory),
    /// A processor.
    Processor(ProcessorFactory),
    /// A sink.
    Sink(SinkFactory),
}

/// Every component a runtime can build, by kind and name.
#[derive(Default, Clone)]
pub struct Registry {
    entries: BTreeMap<(ComponentKind, &'static str), (ComponentSpec, Factory)>,
    stores: BTreeMap<&'static str, StoreBackend>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Registers a source. A later registration of the same name replaces the earlier one.
    pub fn source(&mut self, spec: ComponentSpec, factory: SourceFactory) -> &mut Self {
        self.insert(ComponentKind::Source, spec, Factory::Source(factory))
    }

    /// Registers a processor.
    pub fn processor(&mut self, spec: ComponentSpec, factory: ProcessorFactory) -> &mut Self {
        self.insert(ComponentKind::Processor, spec, Factory::Processor(factory))
    }

    /// Registers a sink.
    pub fn sink(&mut self, spec: ComponentSpec, factory: SinkFactory) -> &mut Self {
        self.insert(ComponentKind::Sink, spec, Factory::Sink(factory))
    }

    fn insert(
        &mut self,
        kind: ComponentKind,
        mut spec: ComponentSpec,
        factory: Factory,
    ) -> &mut Self {
        spec.kind = kind;
        self.entries.insert((kind, spec.name), (spec, factory));
        self
    }

    /// The component of `kind` called `name`.
    pub fn get(&self, kind: ComponentKind, name: &str) -> Option<(&ComponentSpec, &Factory)> {
        self.entries
            .iter()
            .find(|((k, n), _)| *k == kind && *n == name)
            .map(|(_, (spec, factory))| (spec, factory))
    }

    /// The names of every component of `kind`, sorted.
    pub fn names(&self, kind: ComponentKind) -> Vec<&'static str> {
        self.entries
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, n)| *n)
            .collect()
    }

    /// Registers a store backend, selected by steps with `backend: {<name>: ...}`.
    pub fn store_backend(&mut self, name: &'static str, backend: StoreBackend) -> &mut Self {
        self.stores.insert(name, backend);
        self
    }

    /// The store backend called `name`.
    pub fn get_store_backend(&self, name: &str) -> Option<StoreBackend> {
        self.stores.get(name).copied()
    }

    /// The names of every store backend, sorted.
    pub fn store_backend_names(&self) -> Vec<&'static str> {
        self.stores.keys().copied().collect()
    }

    /// Every spec, sorted by kind then name.
    pub fn specs(&self) -> impl Iterator<Item = &ComponentSpec> {
        self.entries.values().map(|(spec, _)| spec)
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.entries.keys()).finish()
    }
}
