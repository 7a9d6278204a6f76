//! Built-in processors (steps), one file each, named after the Enterprise Integration Patterns
//! they implement where one applies.

mod aggregate;
mod cache;
mod choice;
mod claim_check;
mod common;
mod delay;
mod filter;
mod idempotent_consumer;
mod log;
mod message_key;
mod named_store;
mod remove_header;
mod resequence;
mod set_header;
mod split;
mod template;
mod throttle;
mod transform;
mod try_catch;

#[cfg(test)]
pub(crate) mod testkit;

use sluice_core::Registry;

/// Registers every built-in processor.
pub fn register_all(registry: &mut Registry) {
    registry
        .processor(transform::spec(), transform::build)
        .processor(template::spec(), template::build)
        .processor(set_header::spec(), set_header::build)
        .processor(remove_header::spec(), remove_header::build)
        .processor(filter::spec(), filter::build)
        .processor(choice::spec(), choice::build)
        .processor(log::spec(), log::build)
        .processor(try_catch::spec(), try_catch::build)
        .processor(idempotent_consumer::spec(), idempotent_consumer::build)
        .processor(throttle::spec(), throttle::build)
        .processor(delay::spec(), delay::build)
        .processor(cache::spec(), cache::build)
        .processor(claim_check::spec(), claim_check::build)
        .processor(split::spec(), split::build)
        .processor(aggregate::spec(), aggregate::build)
        .processor(resequence::spec(), resequence::build);
}

#[cfg(test)]
mod tests {
    use sluice_core::Registry;
    use sluice_core::spec::ComponentKind;

    /// Every example in every spec builds (the engine's loader also validates it against the spec).
    #[test]
    fn every_example_builds() {
        let mut registry = Registry::new();
        super::register_all(&mut registry);
        let names = registry.names(ComponentKind::Processor);
        assert_eq!(
            names,
            [
                "aggregate",
                "cache",
                "choice",
                "claim_check",
                "delay",
                "filter",
                "idempotent_consumer",
                "log",
                "remove_header",
                "resequence",
                "set_header",
                "split",
                "template",
                "throttle",
                "transform",
                "try"
            ]
        );
        for spec in registry.specs() {
            assert!(!spec.examples.is_empty(), "{} has no example", spec.name);
            assert!(
                !spec.description.is_empty(),
                "{} has no description",
                spec.name
            );
            for example in &spec.examples {
                let config: serde_json::Value = serde_saphyr::from_str(example.yaml)
                    .unwrap_or_else(|e| panic!("{}: {}: {e}", spec.name, example.title));
                if let Err(e) = super::testkit::try_build(spec.name, &config) {
                    panic!("{}: {}: {e}", spec.name, example.title);
                }
            }
        }
    }
}
