//! Wiring of the Sluice binary: which components exist. Kept as a library so behaviour tests
//! build exactly the registry the binary runs with; and the admin HTTP API (`admin`).

pub mod admin;

use sluice_core::Registry;

/// Every component Sluice ships, in one explicit registry.
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    sluice_engine::register_all(&mut registry);
    sluice_connectors::register_all(&mut registry);
    registry
}
