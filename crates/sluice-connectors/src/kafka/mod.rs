//! Kafka: the `kafka` source (a consumer group member committing offsets only after the flow
//! committed, partition order kept) and the `kafka` sink (an idempotent producer answering only
//! after the broker's delivery report).
//!
//! Both use librdkafka through `rdkafka`, built from its bundled sources without zlib, TLS or
//! SASL so that nothing beyond a C compiler and make is needed.

pub mod offsets;
pub mod sink;
pub mod source;

use std::collections::BTreeMap;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use sluice_core::spec::{FieldSpec, FieldType};
use sluice_core::{BuildError, ErrorKind};

/// Header: the record's topic.
pub const TOPIC_HEADER: &str = "kafka.topic";
/// Header: the record's partition.
pub const PARTITION_HEADER: &str = "kafka.partition";
/// Header: the record's offset.
pub const OFFSET_HEADER: &str = "kafka.offset";
/// Header: the record's key (UTF-8, invalid sequences replaced).
pub const KEY_HEADER: &str = "kafka.key";
/// Header: the record's timestamp, milliseconds since the Unix epoch.
pub const TIMESTAMP_HEADER: &str = "kafka.timestamp";
/// Header: `create_time` or `log_append_time`.
pub const TIMESTAMP_TYPE_HEADER: &str = "kafka.timestamp_type";
/// Header: how many times the record was handed to the flow (1 the first time).
pub const DELIVERY_COUNT_HEADER: &str = "kafka.delivery.count";
/// Prefix of the headers a source sets from the record's metadata; the sink never sends them.
pub const HEADER_PREFIX: &str = "kafka.";

/// The `brokers` field, shared by source and sink.
fn brokers_field() -> FieldSpec {
    FieldSpec::new(
        "brokers",
        FieldType::String,
        "Bootstrap servers, `host:port` separated by commas.",
    )
    .required()
}

/// The `properties` field, shared by source and sink.
fn properties_field() -> FieldSpec {
    FieldSpec::new(
        "properties",
        FieldType::Map(Box::new(FieldType::String)),
        "Extra librdkafka configuration properties (e.g. `client.id`, `fetch.max.bytes`); the \
         ones this connector's guarantee relies on cannot be overridden.",
    )
}

/// A `ClientConfig` with `brokers` and the user's `properties`, refusing `reserved` keys.
fn client_config(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    reserved: &[&str],
) -> Result<ClientConfig, BuildError> {
    if brokers.trim().is_empty() {
        return Err(BuildError::field(
            "brokers",
            "is empty; list the bootstrap servers, e.g. `127.0.0.1:9092`",
        ));
    }
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    // Sluice's reconnect policy (capped at one second, so a broker that comes back is used
    // again within about a second); librdkafka's own default cap is ten seconds.
    config.set("reconnect.backoff.ms", "100");
    config.set("reconnect.backoff.max.ms", "1000");
    for (key, value) in properties {
        if reserved.contains(&key.as_str()) || key == "bootstrap.servers" {
            return Err(BuildError::field(
                format!("properties.{key}"),
                "is set by the connector (its delivery guarantee depends on it); remove it",
            ));
        }
        config.set(key, value);
    }
    Ok(config)
}

/// Checks the configuration with librdkafka itself (unknown properties, bad values) without
/// starting a client.
fn check_config(config: &ClientConfig) -> Result<(), BuildError> {
    config
        .create_native_config()
        .map(drop)
        .map_err(|e| BuildError::field("properties", format!("{e}; fix or remove the property")))
}

/// Routes librdkafka's own log lines to `tracing` (they would otherwise go to the `log` crate,
/// which nothing here collects).
fn log(level: rdkafka::config::RDKafkaLogLevel, facility: &str, line: &str) {
    use rdkafka::config::RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error => {
            tracing::error!(facility, "librdkafka: {line}");
        }
        L::Warning => tracing::warn!(facility, "librdkafka: {line}"),
        L::Notice | L::Info => tracing::info!(facility, "librdkafka: {line}"),
        L::Debug => tracing::debug!(facility, "librdkafka: {line}"),
    }
}

/// Whether a Kafka error means the cluster cannot be reached now (worth retrying).
fn is_unavailable(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    match error.rdkafka_error_code() {
        Some(code) => matches!(
            code,
            C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::MessageTimedOut
                | C::OperationTimedOut
                | C::RequestTimedOut
                | C::NetworkException
                | C::Resolve
                | C::LeaderNotAvailable
                | C::NotLeaderForPartition
                | C::NotEnoughReplicas
                | C::NotEnoughReplicasAfterAppend
                | C::NotCoordinator
                | C::CoordinatorNotAvailable
                | C::CoordinatorLoadInProgress
                | C::QueueFull
        ),
        None => false,
    }
}

/// The [`ErrorKind`] of a failed produce.
fn error_kind(error: &KafkaError) -> ErrorKind {
    use RDKafkaErrorCode as C;
    if is_unavailable(error) {
        return ErrorKind::Unavailable;
    }
    match error.rdkafka_error_code() {
        Some(C::MessageSizeTooLarge | C::InvalidMessage | C::InvalidMessageSize) => {
            ErrorKind::InvalidInput
        }
        _ => ErrorKind::Remote,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_and_unknown_properties_are_refused() {
        let mut props = BTreeMap::new();
        props.insert("enable.auto.commit".to_owned(), "false".to_owned());
        let err = client_config("h:9092", &props, &["enable.auto.commit"]).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("properties.enable.auto.commit"));

        let mut props = BTreeMap::new();
        props.insert("no.such.property".to_owned(), "1".to_owned());
        let config = client_config("h:9092", &props, &[]).unwrap();
        let err = check_config(&config).unwrap_err();
        assert!(err.message.contains("no.such.property"), "{err}");

        let err = client_config(" ", &BTreeMap::new(), &[]).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("brokers"));
    }

    #[test]
    fn transport_failures_are_unavailable() {
        let down = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert_eq!(error_kind(&down), ErrorKind::Unavailable);
        let big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(error_kind(&big), ErrorKind::InvalidInput);
        let denied = KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed);
        assert_eq!(error_kind(&denied), ErrorKind::Remote);
    }
}
