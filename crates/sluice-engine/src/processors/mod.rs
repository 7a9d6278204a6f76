//! Built-in processors (steps), one file each, named after the Enterprise Integration Patterns
//! they implement where one applies.

mod aggregate;
mod cache;
mod call;
mod choice;
mod claim_check;
mod cloudevents;
mod common;
mod content_filter;
mod delay;
mod dynamic_router;
mod enrich;
mod fanout;
mod filter;
mod formats;
mod idempotent_consumer;
mod load_balance;
mod log;
mod message_key;
mod multicast;
mod named_store;
mod normalizer;
mod recipient_list;
mod remove_header;
mod resequence;
mod routes;
mod routing_slip;
mod scatter_gather;
mod set_header;
mod split;
mod template;
mod throttle;
mod transform;
mod try_catch;
mod ttl;
mod validate;
mod wire_tap;

#[cfg(test)]
pub(crate) mod testkit;

use sluice_core::Registry;

/// Registers every built-in processor.
pub fn register_all(registry: &mut Registry) {
    registry
        .processor(transform::spec(), transform::build)
        .processor(call::spec(), call::build)
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
        .processor(wire_tap::spec(), wire_tap::build)
        .processor(recipient_list::spec(), recipient_list::build)
        .processor(multicast::spec(), multicast::build)
        .processor(scatter_gather::spec(), scatter_gather::build)
        .processor(routing_slip::spec(), routing_slip::build)
        .processor(dynamic_router::spec(), dynamic_router::build)
        .processor(load_balance::spec(), load_balance::build)
        .processor(validate::spec(), validate::build)
        .processor(formats::parse::spec(), formats::parse::build)
        .processor(formats::render::spec(), formats::render::build)
        .processor(cloudevents::spec(), cloudevents::build)
        .processor(enrich::spec(), enrich::build)
        .processor(content_filter::spec(), content_filter::build)
        .processor(normalizer::spec(), normalizer::build)
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
                "call",
                "choice",
                "claim_check",
                "cloudevents",
                "content_filter",
                "delay",
                "dynamic_router",
                "enrich",
                "filter",
                "idempotent_consumer",
                "load_balance",
                "log",
                "multicast",
                "normalizer",
                "parse",
                "recipient_list",
                "remove_header",
                "render",
                "resequence",
                "routing_slip",
                "scatter_gather",
                "set_header",
                "split",
                "template",
                "throttle",
                "transform",
                "try",
                "validate",
                "wire_tap"
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
