//! AMQP properties and headers <-> message headers.
//!
//! Consumed: every AMQP header becomes a message header of the same name (typed values as text,
//! tables and arrays as JSON); properties become `amqp.<property>` headers, except `content_type`
//! which becomes `content-type` (the name HTTP components use); delivery facts become
//! `amqp.exchange`, `amqp.routing_key`, `amqp.redelivered`, `amqp.queue`.
//!
//! Published: the same names in reverse, so a message read from one queue and published to
//! another keeps its properties and headers; `amqp.*` headers never become AMQP headers.

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::Value;
use sluice_core::{Headers, Message, ProcessError};

/// Prefix of the headers that carry AMQP properties and delivery facts.
pub const HEADER_PREFIX: &str = "amqp.";

/// The message header that carries the `content_type` property.
pub const CONTENT_TYPE: &str = "content-type";

/// A typed AMQP value as header text.
fn text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        AMQPValue::Void => String::new(),
        other => match json(other) {
            Value::String(s) => s,
            v => v.to_string(),
        },
    }
}

/// A typed AMQP value as JSON (for tables and arrays inside headers).
fn json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Timestamp(n) => (*n).into(),
        AMQPValue::Float(f) => (*f).into(),
        AMQPValue::Double(f) => (*f).into(),
        AMQPValue::DecimalValue(d) => {
            let scaled = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            scaled.into()
        }
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) | AMQPValue::ByteArray(_) => {
            Value::String(text(value))
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(json).collect()),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), json(v)))
                .collect(),
        ),
        AMQPValue::Void => Value::Null,
    }
}

/// The message headers of a delivery from `queue`. See the [module documentation](self).
pub fn headers_from_delivery(delivery: &Delivery, queue: &str) -> Headers {
    let mut headers = Headers::new();
    let p = &delivery.properties;
    if let Some(table) = p.headers() {
        for (name, value) in table.inner() {
            headers.insert(name.as_str().to_owned(), text(value));
        }
    }
    let mut put = |name: &str, value: String| {
        headers.insert(name.to_owned(), value);
    };
    put("amqp.exchange", delivery.exchange.as_str().to_owned());
    put("amqp.routing_key", delivery.routing_key.as_str().to_owned());
    put("amqp.redelivered", delivery.redelivered.to_string());
    put("amqp.queue", queue.to_owned());
    let strings: [(&str, &Option<ShortString>); 8] = [
        (CONTENT_TYPE, p.content_type()),
        ("amqp.content_encoding", p.content_encoding()),
        ("amqp.correlation_id", p.correlation_id()),
        ("amqp.message_id", p.message_id()),
        ("amqp.reply_to", p.reply_to()),
        ("amqp.expiration", p.expiration()),
        ("amqp.type", p.kind()),
        ("amqp.app_id", p.app_id()),
    ];
    for (name, value) in strings {
        if let Some(v) = value {
            put(name, v.as_str().to_owned());
        }
    }
    if let Some(v) = p.user_id() {
        put("amqp.user_id", v.as_str().to_owned());
    }
    if let Some(v) = p.delivery_mode() {
        put("amqp.delivery_mode", v.to_string());
    }
    if let Some(v) = p.priority() {
        put("amqp.priority", v.to_string());
    }
    if let Some(v) = p.timestamp() {
        put("amqp.timestamp", v.to_string());
    }
    headers
}

/// How the sink fills properties that the message does not set.
#[derive(Debug, Clone)]
pub struct PublishDefaults {
    /// `delivery_mode` 2 (persistent) or 1.
    pub persistent: bool,
    /// Used when the message has no `content-type` header.
    pub content_type: Option<String>,
    /// Copy the message's other headers into AMQP headers.
    pub forward_headers: bool,
}

fn short(header: &str, value: &str) -> Result<ShortString, ProcessError> {
    ShortString::try_new(value).map_err(|_| {
        ProcessError::invalid_input(format!(
            "header `{header}` is {} bytes long; AMQP properties hold at most 255 bytes",
            value.len()
        ))
    })
}

/// The properties to publish `msg` with. See the [module documentation](self).
///
/// `message_id` defaults to the message id and `timestamp` to its creation time (seconds), so a
/// consumer can deduplicate and order without extra configuration; `correlation_id` defaults to
/// the message's correlation id. `user_id` is never copied (the broker checks it against the
/// connection's user) and `delivery_mode` always follows `persistent`.
pub fn properties_for(
    msg: &Message,
    defaults: &PublishDefaults,
) -> Result<BasicProperties, ProcessError> {
    let h = &msg.headers;
    let get = |name: &str| h.get(name).map(String::as_str);
    let mut p =
        BasicProperties::default().with_delivery_mode(if defaults.persistent { 2 } else { 1 });
    if let Some(ct) = get(CONTENT_TYPE).or(defaults.content_type.as_deref()) {
        p = p.with_content_type(short(CONTENT_TYPE, ct)?);
    }
    if let Some(v) = get("amqp.content_encoding") {
        p = p.with_content_encoding(short("amqp.content_encoding", v)?);
    }
    if let Some(v) = get("amqp.correlation_id").or(msg.meta.correlation_id.as_deref()) {
        p = p.with_correlation_id(short("amqp.correlation_id", v)?);
    }
    p = match get("amqp.message_id") {
        Some(v) => p.with_message_id(short("amqp.message_id", v)?),
        None => p.with_message_id(msg.id().to_string().into()),
    };
    if let Some(v) = get("amqp.reply_to") {
        p = p.with_reply_to(short("amqp.reply_to", v)?);
    }
    if let Some(v) = get("amqp.expiration") {
        if v.parse::<u64>().is_err() {
            return Err(ProcessError::invalid_input(format!(
                "header `amqp.expiration` is `{v}`; it must be a time to live in milliseconds, e.g. `60000`"
            )));
        }
        p = p.with_expiration(short("amqp.expiration", v)?);
    }
    if let Some(v) = get("amqp.type") {
        p = p.with_type(short("amqp.type", v)?);
    }
    if let Some(v) = get("amqp.app_id") {
        p = p.with_app_id(short("amqp.app_id", v)?);
    }
    if let Some(v) = get("amqp.priority") {
        let priority = v.parse::<u8>().map_err(|_| {
            ProcessError::invalid_input(format!(
                "header `amqp.priority` is `{v}`; it must be a number from 0 to 255"
            ))
        })?;
        p = p.with_priority(priority);
    }
    let timestamp = get("amqp.timestamp")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| {
            msg.meta
                .created_at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    p = p.with_timestamp(timestamp);
    if defaults.forward_headers {
        let mut table = FieldTable::default();
        for (name, value) in h {
            if name.starts_with(HEADER_PREFIX) || name == CONTENT_TYPE {
                continue;
            }
            let key = ShortString::try_new(name.as_str()).map_err(|_| {
                ProcessError::invalid_input(format!(
                    "header name `{}...` is {} bytes long; AMQP header names hold at most 255 bytes",
                    &name[..name.floor_char_boundary(32)],
                    name.len()
                ))
            })?;
            table.insert(key, AMQPValue::LongString(LongString::from(value.as_str())));
        }
        p = p.with_headers(table);
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{DecimalValue, FieldArray};

    fn delivery(properties: BasicProperties) -> Delivery {
        Delivery::mock(
            7,
            "orders".into(),
            "eu.created".into(),
            true,
            b"{}".to_vec(),
        )
        .with_properties(properties)
    }

    trait WithProps {
        fn with_properties(self, p: BasicProperties) -> Self;
    }
    impl WithProps for Delivery {
        fn with_properties(mut self, p: BasicProperties) -> Self {
            self.properties = p;
            self
        }
    }

    #[test]
    fn delivery_properties_and_headers_become_message_headers() {
        let mut table = FieldTable::default();
        table.insert("tenant".into(), AMQPValue::LongString("acme".into()));
        table.insert("attempt".into(), AMQPValue::LongInt(3));
        table.insert("flag".into(), AMQPValue::Boolean(true));
        table.insert(
            "price".into(),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 1250,
            }),
        );
        table.insert(
            "tags".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongString("a".into()),
                AMQPValue::ShortShortInt(-1),
            ])),
        );
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id("c-1".into())
            .with_message_id("m-1".into())
            .with_reply_to("replies".into())
            .with_delivery_mode(2)
            .with_priority(5)
            .with_timestamp(1_700_000_000)
            .with_type("order.created".into())
            .with_app_id("shop".into())
            .with_headers(table);
        let h = headers_from_delivery(&delivery(props), "q1");
        let expected = [
            ("amqp.app_id", "shop"),
            ("amqp.correlation_id", "c-1"),
            ("amqp.delivery_mode", "2"),
            ("amqp.exchange", "orders"),
            ("amqp.message_id", "m-1"),
            ("amqp.priority", "5"),
            ("amqp.queue", "q1"),
            ("amqp.redelivered", "true"),
            ("amqp.reply_to", "replies"),
            ("amqp.routing_key", "eu.created"),
            ("amqp.timestamp", "1700000000"),
            ("amqp.type", "order.created"),
            ("attempt", "3"),
            ("content-type", "application/json"),
            ("flag", "true"),
            ("price", "12.5"),
            ("tags", r#"["a",-1]"#),
            ("tenant", "acme"),
        ];
        let got: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(got, expected);
    }

    fn defaults() -> PublishDefaults {
        PublishDefaults {
            persistent: true,
            content_type: Some("application/json".into()),
            forward_headers: true,
        }
    }

    #[test]
    fn published_properties_come_from_headers_with_useful_defaults() {
        let msg = Message::json(serde_json::json!({"a": 1}))
            .with_header("tenant", "acme")
            .with_header("amqp.routing_key", "not forwarded")
            .with_header("amqp.correlation_id", "c-9")
            .with_header("amqp.priority", "4")
            .with_header("amqp.delivery_mode", "1")
            .with_header("amqp.user_id", "mallory");
        let p = properties_for(&msg, &defaults()).unwrap();
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(
            p.content_type().as_ref().map(ShortString::as_str),
            Some("application/json")
        );
        assert_eq!(
            p.message_id().as_ref().map(ShortString::as_str),
            Some(msg.id().to_string().as_str())
        );
        assert_eq!(
            p.correlation_id().as_ref().map(ShortString::as_str),
            Some("c-9")
        );
        assert_eq!(p.priority(), &Some(4));
        assert_eq!(p.user_id(), &None);
        assert!(p.timestamp().unwrap() > 1_700_000_000);
        let table = p.headers().as_ref().unwrap();
        assert_eq!(table.inner().len(), 1);
        assert_eq!(
            table.inner().get("tenant"),
            Some(&AMQPValue::LongString("acme".into()))
        );
    }

    #[test]
    fn bad_property_headers_are_invalid_input() {
        let msg = Message::json(serde_json::json!(1)).with_header("amqp.priority", "high");
        let err = properties_for(&msg, &defaults()).unwrap_err();
        assert_eq!(err.kind, sluice_core::ErrorKind::InvalidInput);
        assert!(err.detail.contains("amqp.priority"), "{}", err.detail);
        let msg = Message::json(serde_json::json!(1)).with_header("amqp.reply_to", "r".repeat(300));
        assert!(properties_for(&msg, &defaults()).is_err());
        let msg = Message::json(serde_json::json!(1)).with_header("amqp.expiration", "1m");
        assert!(properties_for(&msg, &defaults()).is_err());
    }

    #[test]
    fn headers_are_not_forwarded_when_turned_off() {
        let msg = Message::json(serde_json::json!(1)).with_header("tenant", "acme");
        let mut d = defaults();
        d.forward_headers = false;
        d.persistent = false;
        let p = properties_for(&msg, &d).unwrap();
        assert_eq!(p.headers(), &None);
        assert_eq!(p.delivery_mode(), &Some(1));
    }
}
