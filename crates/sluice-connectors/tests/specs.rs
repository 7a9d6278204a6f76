//! Every spec is complete, every example builds, and the config structs' serde defaults agree
//! with the spec defaults.

// Test helpers outside #[test] fns may panic on a broken fixture: that is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::needless_pass_by_value
)]

mod common;

use std::sync::Arc;

use common::*;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sluice_core::Resources;
use sluice_core::registry::Factory;
use sluice_core::spec::ComponentKind;

#[test]
fn every_component_is_registered() {
    let reg = registry();
    let (mut sources, mut processors, mut sinks) = (
        vec!["file", "http", "timer"],
        vec!["http"],
        vec!["file", "http", "log", "stdout"],
    );
    #[cfg(feature = "amqp")]
    {
        sources.push("amqp");
        sinks.push("amqp");
    }
    #[cfg(feature = "mqtt")]
    {
        sources.push("mqtt");
        sinks.push("mqtt");
    }
    #[cfg(feature = "nats")]
    {
        sources.extend(["jetstream", "nats"]);
        processors.push("nats");
        sinks.extend(["jetstream", "nats"]);
    }
    #[cfg(feature = "redis")]
    {
        sources.extend(["redis_list", "redis_pubsub", "redis_stream"]);
        processors.push("redis");
        sinks.extend(["redis_list", "redis_pubsub", "redis_stream"]);
    }
    #[cfg(feature = "postgres")]
    sources.extend(["postgres_listen", "postgres_outbox", "postgres_poll"]);
    #[cfg(any(feature = "postgres", feature = "mysql"))]
    {
        processors.push("sql");
        sinks.push("sql");
    }
    #[cfg(feature = "kafka")]
    {
        sources.push("kafka");
        sinks.push("kafka");
    }
    #[cfg(feature = "sftp")]
    {
        sources.push("sftp");
        sinks.push("sftp");
    }
    for names in [&mut sources, &mut processors, &mut sinks] {
        names.sort_unstable();
    }
    assert_eq!(reg.names(ComponentKind::Source), sources);
    assert_eq!(reg.names(ComponentKind::Processor), processors);
    assert_eq!(reg.names(ComponentKind::Sink), sinks);
}

#[tokio::test]
async fn every_spec_is_documented_and_every_example_builds() {
    let reg = registry();
    let res = Arc::new(Resources::default());
    for spec in reg.specs() {
        let name = format!("{:?} {}", spec.kind, spec.name);
        assert!(!spec.summary.is_empty(), "{name}: summary");
        let d = spec.description.to_ascii_lowercase();
        assert!(
            d.contains("delivery guarantee")
                && (d.contains("at-least-once")
                    || d.contains("at-most-once")
                    || d.contains("none needed")),
            "{name}: description must state the delivery guarantee"
        );
        assert!(
            d.contains("limits") || d.contains("limit"),
            "{name}: description must name its limits"
        );
        for field in &spec.fields {
            assert!(!field.doc.is_empty(), "{name}.{}: doc", field.name);
            assert!(
                !(field.required && field.default.is_some()),
                "{name}.{}: required with default",
                field.name
            );
        }
        assert!(!spec.examples.is_empty(), "{name}: no example");
        let (_, factory) = reg.get(spec.kind, spec.name).unwrap();
        for example in &spec.examples {
            let value: Value = serde_saphyr::from_str(example.yaml)
                .unwrap_or_else(|e| panic!("{name}: example `{}` is not YAML: {e}", example.title));
            let config = with_defaults(spec, &value);
            let built = match factory {
                Factory::Source(f) => f(&config, &ctx(&res)).map(|_| ()),
                Factory::Processor(f) => f(&config, &ctx(&res)).map(|_| ()),
                Factory::Sink(f) => f(&config, &ctx(&res)).map(|_| ()),
            };
            if let Err(e) = built {
                panic!("{name}: example `{}` does not build: {e}", example.title);
            }
        }
    }
}

/// Deserializing only `required` must equal deserializing it with the spec's defaults filled in.
fn defaults_agree<T: DeserializeOwned + PartialEq + std::fmt::Debug>(
    kind: ComponentKind,
    name: &str,
    required: Value,
) {
    let reg = registry();
    let (spec, _) = reg.get(kind, name).unwrap();
    let bare: T = serde_json::from_value(required.clone()).unwrap();
    let filled: T = serde_json::from_value(with_defaults(spec, &required)).unwrap();
    assert_eq!(
        bare, filled,
        "{name}: serde defaults and spec defaults differ"
    );
}

#[test]
fn serde_defaults_match_spec_defaults() {
    use sluice_connectors::{file, http, log, timer};
    defaults_agree::<http::source::HttpSourceConfig>(
        ComponentKind::Source,
        "http",
        json!({"path": "/x"}),
    );
    defaults_agree::<http::request::HttpRequestConfig>(
        ComponentKind::Processor,
        "http",
        json!({"url": "http://h/"}),
    );
    defaults_agree::<http::request::HttpRequestConfig>(
        ComponentKind::Sink,
        "http",
        json!({"url": "http://h/"}),
    );
    defaults_agree::<file::source::FileSourceConfig>(
        ComponentKind::Source,
        "file",
        json!({"path": "/d"}),
    );
    defaults_agree::<file::sink::FileSinkConfig>(
        ComponentKind::Sink,
        "file",
        json!({"path": "/d"}),
    );
    defaults_agree::<timer::TimerConfig>(ComponentKind::Source, "timer", json!({"interval": "1s"}));
    defaults_agree::<log::LogConfig>(ComponentKind::Sink, "log", json!({}));
    defaults_agree::<log::StdoutConfig>(ComponentKind::Sink, "stdout", json!({}));
    #[cfg(feature = "amqp")]
    {
        use sluice_connectors::amqp;
        defaults_agree::<amqp::source::AmqpSourceConfig>(
            ComponentKind::Source,
            "amqp",
            json!({"url": "amqp://h", "queue": "q"}),
        );
        defaults_agree::<amqp::sink::AmqpSinkConfig>(
            ComponentKind::Sink,
            "amqp",
            json!({"url": "amqp://h", "routing_key": "q"}),
        );
    }
    #[cfg(feature = "mqtt")]
    {
        use sluice_connectors::mqtt;
        defaults_agree::<mqtt::source::MqttSourceConfig>(
            ComponentKind::Source,
            "mqtt",
            json!({"url": "mqtt://h", "topics": "t"}),
        );
        defaults_agree::<mqtt::sink::MqttSinkConfig>(
            ComponentKind::Sink,
            "mqtt",
            json!({"url": "mqtt://h", "topic": "t"}),
        );
    }
}

#[test]
fn spec_fields_match_the_config_structs() {
    // A field in the spec that the struct does not know would be refused at build time.
    let reg = registry();
    let res = Arc::new(Resources::default());
    let samples = [
        (ComponentKind::Source, "http", json!({"path": "/x"})),
        (
            ComponentKind::Processor,
            "http",
            json!({"url": "http://h/"}),
        ),
        (ComponentKind::Sink, "http", json!({"url": "http://h/"})),
        (ComponentKind::Source, "file", json!({"path": "/d"})),
        (ComponentKind::Sink, "file", json!({"path": "/d"})),
        (ComponentKind::Source, "timer", json!({"interval": "1s"})),
        (ComponentKind::Sink, "log", json!({})),
        (ComponentKind::Sink, "stdout", json!({})),
    ];
    #[allow(unused_mut)]
    let mut samples = samples.to_vec();
    #[cfg(feature = "amqp")]
    samples.extend([
        (
            ComponentKind::Source,
            "amqp",
            json!({"url": "amqp://h", "queue": "q"}),
        ),
        (
            ComponentKind::Sink,
            "amqp",
            json!({"url": "amqp://h", "routing_key": "q"}),
        ),
    ]);
    #[cfg(feature = "mqtt")]
    samples.extend([
        (
            ComponentKind::Source,
            "mqtt",
            json!({"url": "mqtt://h", "topics": "t"}),
        ),
        (
            ComponentKind::Sink,
            "mqtt",
            json!({"url": "mqtt://h", "topic": "t"}),
        ),
    ]);
    #[cfg(feature = "nats")]
    samples.extend([
        (ComponentKind::Source, "nats", json!({"subject": "a"})),
        (ComponentKind::Processor, "nats", json!({"subject": "a"})),
        (ComponentKind::Sink, "nats", json!({"subject": "a"})),
        (
            ComponentKind::Source,
            "jetstream",
            json!({"stream": "S", "consumer": "c"}),
        ),
        (ComponentKind::Sink, "jetstream", json!({"subject": "a"})),
    ]);
    #[cfg(feature = "redis")]
    samples.extend([
        (
            ComponentKind::Source,
            "redis_stream",
            json!({"stream": "s", "group": "g"}),
        ),
        (ComponentKind::Sink, "redis_stream", json!({"stream": "s"})),
        (ComponentKind::Source, "redis_list", json!({"list": "q"})),
        (ComponentKind::Sink, "redis_list", json!({"list": "q"})),
        (
            ComponentKind::Source,
            "redis_pubsub",
            json!({"channel": "c"}),
        ),
        (ComponentKind::Sink, "redis_pubsub", json!({"channel": "c"})),
        (
            ComponentKind::Processor,
            "redis",
            json!({"command": "get", "key": "k"}),
        ),
    ]);
    for (kind, name, required) in samples {
        let (spec, factory) = reg.get(kind, name).unwrap();
        let mut config = with_defaults(spec, &required);
        config["not_a_field"] = json!(1);
        let err = match factory {
            Factory::Source(f) => f(&config, &ctx(&res)).map(|_| ()),
            Factory::Processor(f) => f(&config, &ctx(&res)).map(|_| ()),
            Factory::Sink(f) => f(&config, &ctx(&res)).map(|_| ()),
        }
        .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("not_a_field"), "{name}");
    }
}
