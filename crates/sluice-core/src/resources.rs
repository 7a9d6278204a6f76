//! Process-wide shared resources, keyed by type.
//!
//! Several flows may share one thing (one HTTP listener per address, one connection pool per
//! database); the component that owns the concept keeps it here under its own type, so the engine
//! stays ignorant of it.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A type-keyed map of shared values.
#[derive(Default)]
pub struct Resources {
    map: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl Resources {
    /// The value of type `T`, created with `Default` on first use.
    pub fn get_or_default<T: Any + Send + Sync + Default>(&self) -> Arc<T> {
        let mut map = match self.map.lock() {
            Ok(map) => map,
            // A panic while holding this lock cannot leave the map half-updated: insert is atomic.
            Err(poisoned) => poisoned.into_inner(),
        };
        let entry = map
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Arc::new(T::default()) as Arc<dyn Any + Send + Sync>);
        match Arc::clone(entry).downcast::<T>() {
            Ok(value) => value,
            // Keys are the TypeId of the stored value, so the downcast always matches.
            Err(_) => Arc::new(T::default()),
        }
    }
}

impl std::fmt::Debug for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resources").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn same_type_same_value() {
        let r = Resources::default();
        r.get_or_default::<AtomicUsize>()
            .fetch_add(3, Ordering::SeqCst);
        assert_eq!(r.get_or_default::<AtomicUsize>().load(Ordering::SeqCst), 3);
    }
}
