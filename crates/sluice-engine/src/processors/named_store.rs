//! Stores shared by name between steps (`repository: orders`, `store: big-bodies`): two steps that
//! name the same store, in one flow or in different flows of the process, use one instance.
//!
//! The instances live in [`Resources`], keyed by the store's trait, so each kind of store has its
//! own namespace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sluice_core::{BuildError, Resources};

/// The named stores of one kind (`S` is the store's trait object type), each with the capacity it
/// was created with.
pub(crate) struct NamedStores<S: ?Sized> {
    stores: Mutex<HashMap<String, (Arc<S>, u64)>>,
}

impl<S: ?Sized> Default for NamedStores<S> {
    fn default() -> Self {
        NamedStores {
            stores: Mutex::new(HashMap::new()),
        }
    }
}

/// Which store a step asked for, and the capacity it gave.
pub(crate) struct StoreRequest<'a> {
    /// The store's name, or `None` for a store private to the step.
    pub name: Option<&'a str>,
    /// The configuration field naming the store (for errors).
    pub name_field: &'a str,
    /// The capacity the step gave, if it gave one.
    pub capacity: Option<u64>,
    /// The configuration field of the capacity (for errors).
    pub capacity_field: &'a str,
    /// The capacity used when no step gave one.
    pub default_capacity: u64,
}

/// The store a step asked for: private to it, or the named one shared through `resources`,
/// created on first use. `create` gets the capacity as a `usize`, as in-memory stores count
/// it; one beyond the address space is unbounded in effect, so it saturates.
///
/// The first step that names a store fixes its capacity; a later step giving a different capacity
/// is a build error, so two steps never disagree silently about a shared bound.
pub(crate) fn resolve<S: ?Sized + Send + Sync + 'static>(
    resources: &Resources,
    request: &StoreRequest<'_>,
    create: impl FnOnce(usize) -> Arc<S>,
) -> Result<Arc<S>, BuildError> {
    let capacity = request.capacity.unwrap_or(request.default_capacity);
    let create = |capacity: u64| create(usize::try_from(capacity).unwrap_or(usize::MAX));
    let Some(name) = request.name else {
        return Ok(create(capacity));
    };
    if name.is_empty() {
        return Err(BuildError::field(
            request.name_field,
            "give a non-empty name",
        ));
    }
    let named = resources.get_or_default::<NamedStores<S>>();
    let mut stores = match named.stores.lock() {
        Ok(stores) => stores,
        // Inserting is the only mutation and it cannot be left half done.
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some((store, existing)) = stores.get(name) {
        if request.capacity.is_some_and(|asked| asked != *existing) {
            return Err(BuildError::field(
                request.capacity_field,
                format!(
                    "`{name}` was already created with {} = {existing} by another step; give the \
same value everywhere, or leave it out here",
                    request.capacity_field
                ),
            ));
        }
        return Ok(Arc::clone(store));
    }
    let store = create(capacity);
    stores.insert(name.to_owned(), (Arc::clone(&store), capacity));
    Ok(store)
}

/// The name of the runtime's own store in `backend:` (the one `sluice run --data DIR` opens).
pub(crate) const RUNTIME_STORE: &str = "store";

/// Whether `backend` asks for the runtime's own store, `backend: {store: {}}`: the step then
/// keeps its state in the process's durable store (see `durable.rs`), which survives restarts
/// but is not shared with other instances. It takes no options yet; the empty object leaves room
/// for some without changing the shape.
pub(crate) fn runtime_store(backend: Option<&serde_json::Value>) -> Result<bool, BuildError> {
    let Some(map) = backend.and_then(serde_json::Value::as_object) else {
        return Ok(false);
    };
    let Some(config) = map.get(RUNTIME_STORE) else {
        return Ok(false);
    };
    if map.len() != 1 {
        return Err(BuildError::field(
            "backend",
            "give exactly one store, e.g. `backend: {store: {}}`",
        ));
    }
    match config.as_object() {
        Some(options) if options.is_empty() => Ok(true),
        _ if config.is_null() => Ok(true),
        _ => Err(BuildError::field(
            format!("backend.{RUNTIME_STORE}"),
            "the runtime's store takes no options: write `backend: {store: {}}`",
        )),
    }
}

/// The runtime's own store, for a step configured with `backend: {store: {}}`; a store that
/// cannot be opened is a build error on that field.
pub(crate) fn open_runtime_store(
    ctx: &sluice_core::BuildContext<'_>,
) -> Result<sluice_store::Store, BuildError> {
    ctx.resources
        .get_or_default::<crate::durable::DurableStore>()
        .store()
        .map_err(|e| BuildError::field(format!("backend.{RUNTIME_STORE}"), e.message))
}

/// The remote store a step asked for with `backend: {<name>: {...}}`, built by the connector
/// that registered `<name>`; `None` when the in-memory store is used instead (no `backend`, or a
/// flow test). `pick` chooses the factory of the store's kind; a backend without one is a build
/// error.
pub(crate) fn remote<S: ?Sized>(
    ctx: &sluice_core::BuildContext<'_>,
    backend: Option<&serde_json::Value>,
    pick: impl FnOnce(
        sluice_core::registry::StoreBackend,
    ) -> Option<
        fn(&serde_json::Value, &sluice_core::BuildContext<'_>) -> Result<Arc<S>, BuildError>,
    >,
) -> Result<Option<Arc<S>>, BuildError> {
    let Some(backend) = backend else {
        return Ok(None);
    };
    let entry = backend
        .as_object()
        .filter(|map| map.len() == 1)
        .and_then(|map| map.iter().next());
    let Some((name, config)) = entry else {
        return Err(BuildError::field(
            "backend",
            "give exactly one store, e.g. `backend: {redis: {url: \"redis://127.0.0.1:6379\"}}`",
        ));
    };
    match ctx.steps.store_backend(name) {
        Ok(Some(found)) => {
            let Some(factory) = pick(found) else {
                return Err(BuildError::field(
                    "backend",
                    format!("the `{name}` store cannot back this step; choose another backend"),
                ));
            };
            factory(config, ctx).map(Some).map_err(|e| {
                BuildError::field(
                    format!(
                        "backend.{name}{}",
                        e.field.map(|f| format!(".{f}")).unwrap_or_default()
                    ),
                    e.message,
                )
            })
        }
        Ok(None) => Ok(None),
        Err(known) if known.is_empty() => Err(BuildError::field(
            "backend",
            format!("unknown store `{name}`: this build has no store backends"),
        )),
        Err(known) => Err(BuildError::field(
            "backend",
            format!("unknown store `{name}`; use one of: {}", known.join(", ")),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    trait Thing: Send + Sync {
        fn capacity(&self) -> usize;
    }
    struct Fixed(usize);
    impl Thing for Fixed {
        fn capacity(&self) -> usize {
            self.0
        }
    }

    fn request(name: Option<&str>, capacity: Option<u64>) -> StoreRequest<'_> {
        StoreRequest {
            name,
            name_field: "store",
            capacity,
            capacity_field: "max",
            default_capacity: 10,
        }
    }

    fn make(capacity: usize) -> Arc<dyn Thing> {
        Arc::new(Fixed(capacity))
    }

    #[test]
    fn same_name_same_store_first_capacity_wins() {
        let resources = Resources::default();
        let a = resolve(&resources, &request(Some("a"), Some(5)), make).unwrap();
        let b = resolve(&resources, &request(Some("a"), None), make).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(b.capacity(), 5);
        let other = resolve(&resources, &request(Some("b"), None), make).unwrap();
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!(other.capacity(), 10);
    }

    #[test]
    fn unnamed_stores_are_private() {
        let resources = Resources::default();
        let a = resolve(&resources, &request(None, None), make).unwrap();
        let b = resolve(&resources, &request(None, None), make).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn the_runtime_store_is_recognised_and_takes_no_options() {
        use serde_json::json;
        assert!(!runtime_store(None).unwrap());
        assert!(!runtime_store(Some(&json!({"redis": {}}))).unwrap());
        assert!(runtime_store(Some(&json!({"store": {}}))).unwrap());
        assert!(runtime_store(Some(&json!({"store": null}))).unwrap());
        let e = runtime_store(Some(&json!({"store": {"path": "x"}}))).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("backend.store"));
        let e = runtime_store(Some(&json!({"store": {}, "redis": {}}))).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("backend"));
    }

    #[test]
    fn conflicting_capacities_are_a_build_error() {
        let resources = Resources::default();
        resolve(&resources, &request(Some("a"), Some(5)), make).unwrap();
        let e = resolve(&resources, &request(Some("a"), Some(6)), make)
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("max"));
        assert!(e.message.contains("already created with max = 5"), "{e}");
        let e = resolve(&resources, &request(Some(""), None), make)
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("store"));
    }
}
