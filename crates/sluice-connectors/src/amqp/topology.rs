//! Exchanges, queues and bindings a component declares on every (re)connection, so a flow can
//! own its topology and a broker that lost it (a non-durable queue after a restart) gets it back.

use std::collections::BTreeMap;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};
use serde::Deserialize;
use serde_json::Value;
use sluice_core::BuildError;
use sluice_core::spec::{FieldSpec, FieldType};

/// The `declare` field's spec.
pub fn spec_field() -> FieldSpec {
    let arguments = || {
        FieldSpec::new(
            "arguments",
            FieldType::Map(Box::new(FieldType::Any)),
            "Optional arguments (`x-...`), as numbers, strings or booleans.",
        )
        .default_value(serde_json::json!({}))
    };
    FieldSpec::new(
        "declare",
        FieldType::Object(vec![
            FieldSpec::new(
                "exchanges",
                FieldType::List(Box::new(FieldType::Object(vec![
                    FieldSpec::new("name", FieldType::String, "Exchange name.").required(),
                    FieldSpec::new(
                        "type",
                        FieldType::String,
                        "`direct`, `fanout`, `topic`, `headers` or a plugin's type.",
                    )
                    .default_value("direct"),
                    FieldSpec::new("durable", FieldType::Bool, "Survives a broker restart.")
                        .default_value(true),
                    FieldSpec::new(
                        "auto_delete",
                        FieldType::Bool,
                        "Deleted when its last binding is removed.",
                    )
                    .default_value(false),
                    arguments(),
                ]))),
                "Exchanges to declare.",
            )
            .default_value(serde_json::json!([])),
            FieldSpec::new(
                "queues",
                FieldType::List(Box::new(FieldType::Object(vec![
                    FieldSpec::new("name", FieldType::String, "Queue name.").required(),
                    FieldSpec::new("durable", FieldType::Bool, "Survives a broker restart.")
                        .default_value(true),
                    FieldSpec::new(
                        "exclusive",
                        FieldType::Bool,
                        "Used by this connection only and deleted when it closes.",
                    )
                    .default_value(false),
                    FieldSpec::new(
                        "auto_delete",
                        FieldType::Bool,
                        "Deleted when its last consumer goes away.",
                    )
                    .default_value(false),
                    arguments(),
                ]))),
                "Queues to declare, e.g. with `x-dead-letter-exchange`, `x-queue-type: quorum`.",
            )
            .default_value(serde_json::json!([])),
            FieldSpec::new(
                "bindings",
                FieldType::List(Box::new(FieldType::Object(vec![
                    FieldSpec::new("queue", FieldType::String, "Queue to bind.").required(),
                    FieldSpec::new("exchange", FieldType::String, "Exchange to bind it to.")
                        .required(),
                    FieldSpec::new(
                        "routing_key",
                        FieldType::String,
                        "Binding key (`*` and `#` wildcards on topic exchanges).",
                    )
                    .default_value(""),
                    arguments(),
                ]))),
                "Queue bindings to declare, after the exchanges and queues.",
            )
            .default_value(serde_json::json!([])),
        ]),
        "Topology declared (idempotently) on every connection before use: exchanges, then \
         queues, then bindings. A declaration that conflicts with an existing entity (other \
         arguments) fails the connection with the broker's reason.",
    )
}

/// The `declare` object.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclareConfig {
    /// Exchanges.
    #[serde(default)]
    pub exchanges: Vec<ExchangeConfig>,
    /// Queues.
    #[serde(default)]
    pub queues: Vec<QueueConfig>,
    /// Bindings.
    #[serde(default)]
    pub bindings: Vec<BindingConfig>,
}

/// One exchange.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeConfig {
    /// Name.
    pub name: String,
    /// Type.
    #[serde(default = "default_exchange_type", rename = "type")]
    pub kind: String,
    /// Durable.
    #[serde(default = "yes")]
    pub durable: bool,
    /// Auto-delete.
    #[serde(default)]
    pub auto_delete: bool,
    /// Arguments.
    #[serde(default)]
    pub arguments: BTreeMap<String, Value>,
}

/// One queue.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Name.
    pub name: String,
    /// Durable.
    #[serde(default = "yes")]
    pub durable: bool,
    /// Exclusive.
    #[serde(default)]
    pub exclusive: bool,
    /// Auto-delete.
    #[serde(default)]
    pub auto_delete: bool,
    /// Arguments.
    #[serde(default)]
    pub arguments: BTreeMap<String, Value>,
}

/// One binding.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingConfig {
    /// Queue.
    pub queue: String,
    /// Exchange.
    pub exchange: String,
    /// Binding key.
    #[serde(default)]
    pub routing_key: String,
    /// Arguments.
    #[serde(default)]
    pub arguments: BTreeMap<String, Value>,
}

fn default_exchange_type() -> String {
    "direct".into()
}
fn yes() -> bool {
    true
}

/// A name as an AMQP short string (at most 255 bytes), or a build error on `field`.
pub fn short(field: &str, text: &str) -> Result<ShortString, BuildError> {
    ShortString::try_new(text).map_err(|_| {
        BuildError::field(
            field,
            format!(
                "is {} bytes long; AMQP names are at most 255 bytes",
                text.len()
            ),
        )
    })
}

/// A JSON value as an AMQP field value: integers as signed 64-bit, strings as long strings.
pub fn amqp_value(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => AMQPValue::LongString(LongString::from(n.to_string())),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(items) => {
            let mut array = FieldArray::default();
            for item in items {
                array.push(amqp_value(item));
            }
            AMQPValue::FieldArray(array)
        }
        Value::Object(map) => AMQPValue::FieldTable(table_of(map.iter())),
    }
}

fn table_of<'a>(entries: impl Iterator<Item = (&'a String, &'a Value)>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        // Longer keys cannot be sent; build-time validation refuses them before this point.
        if let Ok(key) = ShortString::try_new(key.as_str()) {
            table.insert(key, amqp_value(value));
        }
    }
    table
}

/// A checked, ready-to-send topology.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    exchanges: Vec<(
        ShortString,
        ExchangeKind,
        ExchangeDeclareOptions,
        FieldTable,
    )>,
    queues: Vec<(ShortString, QueueDeclareOptions, FieldTable)>,
    bindings: Vec<(ShortString, ShortString, ShortString, FieldTable)>,
}

fn check_arguments(field: &str, arguments: &BTreeMap<String, Value>) -> Result<(), BuildError> {
    for key in arguments.keys() {
        short(&format!("{field}.arguments"), key)?;
    }
    Ok(())
}

impl Topology {
    /// Checks `config` (name lengths, known exchange types) and prepares the declarations.
    pub fn new(config: &DeclareConfig) -> Result<Self, BuildError> {
        let mut topology = Topology::default();
        for (i, e) in config.exchanges.iter().enumerate() {
            let field = format!("declare.exchanges.{i}");
            if e.name.is_empty() || e.name.starts_with("amq.") {
                return Err(BuildError::field(
                    format!("{field}.name"),
                    "cannot declare the default exchange or an `amq.` exchange; they already exist, so just use them",
                ));
            }
            let kind = match e.kind.as_str() {
                "direct" => ExchangeKind::Direct,
                "fanout" => ExchangeKind::Fanout,
                "topic" => ExchangeKind::Topic,
                "headers" => ExchangeKind::Headers,
                "" => {
                    return Err(BuildError::field(
                        format!("{field}.type"),
                        "is empty; use direct, fanout, topic, headers or a plugin's type",
                    ));
                }
                other => ExchangeKind::Custom(other.to_owned()),
            };
            check_arguments(&field, &e.arguments)?;
            topology.exchanges.push((
                short(&format!("{field}.name"), &e.name)?,
                kind,
                ExchangeDeclareOptions {
                    durable: e.durable,
                    auto_delete: e.auto_delete,
                    ..ExchangeDeclareOptions::default()
                },
                table_of(e.arguments.iter()),
            ));
        }
        for (i, q) in config.queues.iter().enumerate() {
            let field = format!("declare.queues.{i}");
            if q.name.is_empty() {
                return Err(BuildError::field(
                    format!("{field}.name"),
                    "is empty; name the queue (server-named queues cannot be shared with a flow)",
                ));
            }
            check_arguments(&field, &q.arguments)?;
            topology.queues.push((
                short(&format!("{field}.name"), &q.name)?,
                QueueDeclareOptions {
                    durable: q.durable,
                    exclusive: q.exclusive,
                    auto_delete: q.auto_delete,
                    ..QueueDeclareOptions::default()
                },
                table_of(q.arguments.iter()),
            ));
        }
        for (i, b) in config.bindings.iter().enumerate() {
            let field = format!("declare.bindings.{i}");
            check_arguments(&field, &b.arguments)?;
            topology.bindings.push((
                short(&format!("{field}.queue"), &b.queue)?,
                short(&format!("{field}.exchange"), &b.exchange)?,
                short(&format!("{field}.routing_key"), &b.routing_key)?,
                table_of(b.arguments.iter()),
            ));
        }
        Ok(topology)
    }

    /// Declares everything on `channel`, in order; the first refusal stops it.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        for (name, kind, options, arguments) in &self.exchanges {
            channel
                .exchange_declare(name.clone(), kind.clone(), *options, arguments.clone())
                .await?;
        }
        for (name, options, arguments) in &self.queues {
            channel
                .queue_declare(name.clone(), *options, arguments.clone())
                .await?;
        }
        for (queue, exchange, key, arguments) in &self.bindings {
            channel
                .queue_bind(
                    queue.clone(),
                    exchange.clone(),
                    key.clone(),
                    QueueBindOptions::default(),
                    arguments.clone(),
                )
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[allow(clippy::needless_pass_by_value)] // test helper: callers pass json!() inline
    fn declare(value: Value) -> DeclareConfig {
        crate::config::parse(&value).unwrap()
    }

    #[test]
    fn defaults_are_durable_and_direct() {
        let d = declare(json!({"exchanges": [{"name": "orders"}], "queues": [{"name": "q"}]}));
        assert_eq!(d.exchanges[0].kind, "direct");
        assert!(d.exchanges[0].durable && d.queues[0].durable);
        let t = Topology::new(&d).unwrap();
        assert!(t.exchanges[0].2.durable);
        assert_eq!(t.exchanges[0].1, ExchangeKind::Direct);
    }

    #[test]
    fn bad_names_point_at_the_field() {
        let err =
            Topology::new(&declare(json!({"exchanges": [{"name": "amq.topic"}]}))).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("declare.exchanges.0.name"));
        let long = "x".repeat(256);
        let err = Topology::new(&declare(
            json!({"queues": [{"name": "ok"}, {"name": long}]}),
        ))
        .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("declare.queues.1.name"));
        let err = crate::config::parse::<DeclareConfig>(&json!({"bindings": [{"queue": "q"}]}))
            .unwrap_err();
        assert!(err.message.contains("exchange"), "{}", err.message);
    }

    #[test]
    fn arguments_become_typed_amqp_values() {
        assert_eq!(amqp_value(&json!(60000)), AMQPValue::LongLongInt(60000));
        assert_eq!(amqp_value(&json!(true)), AMQPValue::Boolean(true));
        assert_eq!(amqp_value(&json!(1.5)), AMQPValue::Double(1.5));
        assert_eq!(
            amqp_value(&json!("dlx")),
            AMQPValue::LongString("dlx".into())
        );
        let AMQPValue::FieldArray(a) = amqp_value(&json!([1, "a"])) else {
            panic!()
        };
        assert_eq!(a.as_slice().len(), 2);
        let t = table_of(
            json!({"x-queue-type": "quorum"})
                .as_object()
                .unwrap()
                .iter(),
        );
        assert!(t.contains_key("x-queue-type"));
    }
}
