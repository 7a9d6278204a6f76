//! The Sluice engine: flow files in, running topology out.
//!
//! `config` reads and validates flow files against component specs; `build` turns a validated
//! definition into flows (`flow`), sources and sinks; `runtime` runs them; `testing` runs the
//! `tests:` blocks of flow files; `docs` renders the reference docs and JSON Schema from specs.
//! `expr` holds the expression languages (jq, templates), `processors` the built-in steps and
//! `channel` the in-memory channels that link flows, `background` the work steps start and do not
//! wait for; `durable` the process's store and `dead_letter_store` the sink keeping dead letters in it; `metrics` counts what flows and circuit breakers do and renders it for Prometheus.

pub mod background;
mod base64;
pub mod build;
pub mod channel;
pub mod config;
pub mod dead_letter_store;
pub mod docs;
pub mod durable;
pub mod durable_channel;
pub mod envelope;
pub mod expr;
pub mod flow;
pub mod metrics;
pub mod ordering;
pub mod processors;
pub mod resilience;
pub mod runtime;
pub mod testing;

/// Registers everything the engine itself provides: processors and channels.
pub fn register_all(registry: &mut sluice_core::Registry) {
    processors::register_all(registry);
    channel::register(registry);
    registry.sink(dead_letter_store::spec(), dead_letter_store::build);
}
