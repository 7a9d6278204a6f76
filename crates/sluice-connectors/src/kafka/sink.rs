//! The `kafka` sink: an idempotent producer; a message counts as delivered once the broker's
//! delivery report says every in-sync replica has it (`acks=all`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, ErrorKind, HealthHandle, Message, ProcessError, Sink};
use tokio::sync::OnceCell;

use super::HEADER_PREFIX;
use crate::template::Template;

const DESCRIPTION: &str = "\
Produces each message as one record of `topic`: the body is the value; the key comes from \
`key` (a template: `{id}`, `{header.<name>}`) or `key_jq` (a jq expression on the JSON body; \
its first output, a string as is, anything else as JSON; no output means no key), or is absent. \
With `headers: all` (default) every message header becomes a record header, except the \
`kafka.*` ones a `kafka` source set (so a topic-to-topic flow does not copy the old record's \
offset). The partition is chosen by librdkafka from the key (murmur2, like the Java client) \
unless `partition` is set.

The producer is idempotent (`enable.idempotence=true`, `acks=all`): librdkafka's retries do not \
duplicate or reorder records within a partition. It connects on the first message and reconnects \
by itself; while the cluster is unreachable the component reports unhealthy.

**Delivery guarantee.** at-least-once: a message is delivered only once the broker's delivery \
report confirmed the record, written to every in-sync replica. A record not confirmed within \
`delivery_timeout` fails the message with kind `unavailable` (retry it with the flow's `retry`); \
the broker may still have it, so a retried message can appear twice in the topic.

**Limits.** Plaintext connections only (no TLS or SASL in this build); no gzip or zstd \
compression (`compression.type` lz4 or snappy work). Header values are strings. A record larger \
than the broker's limit fails with `invalid_input`.";

/// The `kafka` sink's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "kafka",
        ComponentKind::Sink,
        "Produce messages to a Kafka topic, idempotently, confirmed by the brokers",
    )
    .description(DESCRIPTION)
    .field(super::brokers_field())
    .field(FieldSpec::new("topic", FieldType::String, "Topic to produce to.").required())
    .field(FieldSpec::new("key", FieldType::String, "Record key template: `{id}` (message id) and `{header.<name>}` placeholders, e.g. `{header.order_id}`."))
    .field(FieldSpec::new("key_jq", FieldType::Jq, "Record key computed by jq from the JSON body (instead of `key`), e.g. `.customer.id`."))
    .field(FieldSpec::new("partition", FieldType::Integer { min: Some(0), max: Some(i64::from(i32::MAX)) }, "Fixed partition; by default chosen from the key."))
    .field(
        FieldSpec::new("headers", FieldType::Enum(vec!["all", "none"]), "Which message headers become record headers (`kafka.*` headers are never sent).")
            .default_value("all"),
    )
    .field(
        FieldSpec::new("delivery_timeout", FieldType::Duration, "How long a record may wait for the brokers' confirmation (librdkafka's `message.timeout.ms`).")
            .default_value("30s"),
    )
    .field(super::properties_field())
    .example(
        "Order events keyed by order id",
        "brokers: 127.0.0.1:9092\ntopic: orders\nkey: \"{header.order_id}\"\n",
    )
    .example(
        "Keyed by customer from the body, lz4-compressed",
        "brokers: kafka-1:9092,kafka-2:9092\ntopic: customer-events\nkey_jq: .customer.id\nproperties:\n  compression.type: lz4\n  linger.ms: \"5\"\n",
    )
}

/// Which headers are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderMode {
    /// Every header but `kafka.*`.
    All,
    /// None.
    None,
}

/// Configuration of the `kafka` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// Topic.
    pub topic: String,
    /// Key template.
    #[serde(default)]
    pub key: Option<String>,
    /// Key jq expression.
    #[serde(default)]
    pub key_jq: Option<String>,
    /// Fixed partition.
    #[serde(default)]
    pub partition: Option<i32>,
    /// Header mode.
    #[serde(default = "default_headers")]
    pub headers: HeaderMode,
    /// Confirmation timeout.
    #[serde(default = "default_timeout")]
    pub delivery_timeout: HumanDuration,
    /// Extra librdkafka properties.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_headers() -> HeaderMode {
    HeaderMode::All
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

/// Properties the sink sets itself: its guarantee depends on them.
const RESERVED: &[&str] = &[
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "message.timeout.ms",
    "delivery.timeout.ms",
];

/// Where the record key comes from.
enum Key {
    None,
    Template(Template),
    Jq(Arc<dyn JqProgram>),
}

/// Reports cluster-wide errors as the component's health.
struct SinkClient {
    health: HealthHandle,
    trouble: Arc<AtomicBool>,
    brokers: String,
}

impl ClientContext for SinkClient {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        super::log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if super::is_unavailable(&error) {
            self.trouble.store(true, Ordering::SeqCst);
            self.health.unhealthy(format!(
                "cannot reach Kafka at {}: {reason}; retrying",
                self.brokers
            ));
        }
        tracing::warn!(%error, reason, "kafka producer error");
    }
}

/// A built `kafka` sink.
pub struct KafkaSink {
    config: rdkafka::ClientConfig,
    brokers: String,
    topic: String,
    key: Key,
    partition: Option<i32>,
    headers: HeaderMode,
    timeout: Duration,
    health: HealthHandle,
    trouble: Arc<AtomicBool>,
    producer: OnceCell<FutureProducer<SinkClient>>,
}

/// Builds a `kafka` sink.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Sink>, BuildError> {
    let c: KafkaSinkConfig = crate::config::parse(config)?;
    if c.topic.trim().is_empty() {
        return Err(BuildError::field("topic", "is empty; name the topic"));
    }
    let key = match (&c.key, &c.key_jq) {
        (Some(_), Some(_)) => {
            return Err(BuildError::field(
                "key_jq",
                "cannot be combined with `key`; keep one of them",
            ));
        }
        (Some(text), None) => Key::Template(parse_key(text)?),
        (None, Some(code)) => Key::Jq(ctx.steps.compile_jq("key_jq", code)?),
        (None, None) => Key::None,
    };
    let timeout = c.delivery_timeout.0;
    if timeout < Duration::from_millis(100) {
        return Err(BuildError::field(
            "delivery_timeout",
            "must be at least 100ms",
        ));
    }
    let mut config = super::client_config(&c.brokers, &c.properties, RESERVED)?;
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", timeout.as_millis().to_string());
    super::check_config(&config)?;
    Ok(Arc::new(KafkaSink {
        config,
        brokers: c.brokers,
        topic: c.topic,
        key,
        partition: c.partition,
        headers: c.headers,
        timeout,
        health: HealthHandle::for_component(ctx),
        trouble: Arc::new(AtomicBool::new(false)),
        producer: OnceCell::new(),
    }))
}

/// Parses the key template, accepting `{id}` and `{header.<name>}` only.
fn parse_key(text: &str) -> Result<Template, BuildError> {
    let template = Template::parse(text).map_err(|e| BuildError::field("key", e.to_string()))?;
    if let Some(bad) = template
        .placeholders()
        .find(|p| *p != "id" && !p.starts_with("header."))
    {
        return Err(BuildError::field(
            "key",
            format!("unknown placeholder `{{{bad}}}`; use `{{id}}` or `{{header.<name>}}`"),
        ));
    }
    Ok(template)
}

/// Renders the key template for `msg`.
fn render_key(template: &Template, msg: &Message) -> Result<String, ProcessError> {
    template.render(|name| {
        if name == "id" {
            return Ok(msg.id().to_string());
        }
        let header = name.strip_prefix("header.").unwrap_or(name);
        msg.headers.get(header).cloned().ok_or_else(|| {
            ProcessError::invalid_input(format!(
                "the record key needs header `{header}`, which the message does not have"
            ))
        })
    })
}

/// The record headers for `msg`.
fn record_headers(mode: HeaderMode, msg: &Message) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(msg.headers.len());
    if mode == HeaderMode::All {
        for (name, value) in &msg.headers {
            if name.starts_with(HEADER_PREFIX) {
                continue;
            }
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
    }
    headers
}

impl KafkaSink {
    async fn producer(&self) -> Result<&FutureProducer<SinkClient>, ProcessError> {
        self.producer
            .get_or_try_init(|| async {
                let client = SinkClient {
                    health: self.health.clone(),
                    trouble: Arc::clone(&self.trouble),
                    brokers: self.brokers.clone(),
                };
                self.config.create_with_context(client).map_err(|e| {
                    ProcessError::new(
                        ErrorKind::Internal,
                        format!("cannot create the kafka producer: {e}"),
                    )
                })
            })
            .await
    }

    async fn key(&self, msg: &Message) -> Result<Option<String>, ProcessError> {
        match &self.key {
            Key::None => Ok(None),
            Key::Template(template) => render_key(template, msg).map(Some),
            Key::Jq(program) => {
                let body = msg.body.json_shared().map_err(|e| {
                    ProcessError::invalid_input(format!("`key_jq` needs a JSON body: {e}"))
                })?;
                Ok(program
                    .run(body, msg)
                    .await?
                    .into_iter()
                    .next()
                    .and_then(|v| match v {
                        Value::Null => None,
                        Value::String(s) => Some(s),
                        other => Some(other.to_string()),
                    }))
            }
        }
    }
}

#[async_trait]
impl Sink for KafkaSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        let key = self.key(msg).await?;
        let producer = self.producer().await?;
        let body = msg.body.as_bytes();
        let mut record = FutureRecord::to(&self.topic)
            .payload(body.as_ref())
            .headers(record_headers(self.headers, msg));
        if let Some(key) = &key {
            record = record.key(key.as_bytes());
        }
        if let Some(partition) = self.partition {
            record = record.partition(partition);
        }
        match producer.send(record, self.timeout).await {
            Ok(_) => {
                if self.trouble.swap(false, Ordering::SeqCst) {
                    self.health.healthy();
                }
                Ok(())
            }
            Err((error, _)) => {
                let kind = super::error_kind(&error);
                if kind == ErrorKind::Unavailable {
                    self.trouble.store(true, Ordering::SeqCst);
                    self.health.unhealthy(format!(
                        "cannot reach Kafka at {}: {error}; retrying",
                        self.brokers
                    ));
                }
                Err(ProcessError::new(
                    kind,
                    format!(
                        "Kafka at {} did not confirm the record for topic `{}`: {error}",
                        self.brokers, self.topic
                    ),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_template_uses_id_and_headers() {
        let t = parse_key("{header.region}-{header.order_id}").unwrap();
        let msg = Message::bytes("x")
            .with_header("region", "eu")
            .with_header("order_id", "42");
        assert_eq!(render_key(&t, &msg).unwrap(), "eu-42");
        let err = render_key(&t, &Message::bytes("x")).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidInput);
        assert!(err.detail.contains("region"), "{}", err.detail);
        let err = parse_key("{body}").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("key"));
        let id = Message::bytes("x");
        assert_eq!(
            render_key(&parse_key("{id}").unwrap(), &id).unwrap(),
            id.id().to_string()
        );
    }

    #[test]
    fn kafka_headers_are_never_sent() {
        use rdkafka::message::Headers;
        let msg = Message::bytes("x")
            .with_header("trace", "abc")
            .with_header("kafka.offset", "7");
        let all = record_headers(HeaderMode::All, &msg);
        let names: Vec<&str> = all.iter().map(|h| h.key).collect();
        assert_eq!(names, vec!["trace"]);
        assert_eq!(record_headers(HeaderMode::None, &msg).count(), 0);
    }

    #[test]
    fn reserved_properties_are_refused() {
        let mut props = BTreeMap::new();
        props.insert("acks".to_owned(), "1".to_owned());
        let err = super::super::client_config("h:9092", &props, RESERVED).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("properties.acks"));
    }
}
