//! `cloudevents`: reads and writes CloudEvents 1.0, in structured (JSON envelope) or binary
//! (`ce-*` headers) content mode.
//!
//! Inside a flow an event is always a message whose body is the event's `data` and whose headers
//! carry its attributes as `ce-<name>`: the binary mode, which is also what the HTTP source makes
//! of a binary-mode request. `direction: in` gets there from either mode; `direction: out` leaves
//! for either.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value};
use sluice_core::component::JqProgram;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    Body, BuildContext, BuildError, Failure, Message, Outputs, ProcessError, Processor,
};

use super::common;
use crate::base64;

/// The content type of a structured-mode event.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// The prefix of attribute headers.
const PREFIX: &str = "ce-";

/// The attributes every event has.
const REQUIRED: [&str; 4] = ["id", "source", "specversion", "type"];

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "cloudevents",
        ComponentKind::Processor,
        "Read or write CloudEvents 1.0 in structured or binary mode",
    )
    .description(
        "Converts between CloudEvents 1.0 and Sluice messages. Inside a flow an event is a message \
whose **body is the event's `data`** and whose **headers carry its attributes** as `ce-<name>` \
(`ce-id`, `ce-source`, `ce-specversion`, `ce-type`, `ce-subject`, `ce-time`, `ce-dataschema` and \
extensions such as `ce-traceparent`); `datacontenttype` is the `content-type` header. This is \
the CloudEvents *binary content mode*.\n\n\
**`direction: in`** accepts an event and produces that message:\n\
* `mode: structured`: the body is a JSON envelope (`application/cloudevents+json`; the content \
type is not checked). Its `data` becomes the body (JSON; a string `data` with a non-JSON \
`datacontenttype` becomes a text body), or `data_base64` is decoded into a byte body; no data is an \
empty body. Every other attribute becomes a `ce-` header (non-string extension values as JSON \
text), and `datacontenttype` the `content-type` header (default `application/json`).\n\
* `mode: binary`: the attributes are already `ce-` headers; the message passes unchanged once it \
is checked.\n\n\
Either way the required attributes are checked: `id`, `source` and `type` must be present and \
non-empty, and `specversion` must be `1.0`. A violation fails the step with `invalid_input` \
naming the attribute, e.g. \"CloudEvent attribute `type` is missing\".\n\n\
**`direction: out`** produces an event from the message. Its attributes are, in order of \
precedence: the step's options (`source`, `type`, `subject`: a literal string, or `{jq: expr}` \
evaluated on the body with `$headers` and `$meta`), the message's `ce-` headers (so an event read \
with `direction: in` goes out unchanged), then defaults: `id` is the message id, `specversion` is \
`1.0`. A missing `source` or `type` fails with `invalid_input`.\n\
* `mode: binary`: the attributes are set as `ce-` headers; the body and `content-type` are kept.\n\
* `mode: structured`: the body becomes the JSON envelope, with `content-type: \
application/cloudevents+json`; the `ce-` headers move into the envelope. A JSON body (or no \
`content-type` and a JSON body) is `data`; a UTF-8 text body is a string `data`; anything else \
is `data_base64`. The original `content-type` becomes `datacontenttype`.\n\n\
Attribute values are not otherwise validated (`time` is carried as written). Batched mode \
(`application/cloudevents-batch+json`) is not supported: split the batch first.",
    )
    .field(
        FieldSpec::new(
            "direction",
            FieldType::Enum(vec!["in", "out"]),
            "`in`: accept an event into the flow; `out`: produce an event from the message.",
        )
        .required(),
    )
    .field(
        FieldSpec::new(
            "mode",
            FieldType::Enum(vec!["structured", "binary"]),
            "The CloudEvents content mode: a JSON envelope (`structured`) or `ce-` headers (`binary`).",
        )
        .default_value("structured"),
    )
    .field(FieldSpec::new(
        "source",
        attribute_type(),
        "`out` only: the event's `source`, a literal string or `{jq: expr}`; default: the `ce-source` header.",
    ))
    .field(FieldSpec::new(
        "type",
        attribute_type(),
        "`out` only: the event's `type`, a literal string or `{jq: expr}`; default: the `ce-type` header.",
    ))
    .field(FieldSpec::new(
        "subject",
        attribute_type(),
        "`out` only: the event's `subject`, a literal string or `{jq: expr}`; default: the `ce-subject` header, if any.",
    ))
    .example(
        "Accept structured events",
        "direction: in\nmode: structured\n",
    )
    .example(
        "Emit order events in binary mode",
        "direction: out\nmode: binary\nsource: /sluice/orders\ntype: {jq: '\"com.example.order.\" + .status'}\nsubject: {jq: '.id | tostring'}\n",
    )
}

fn attribute_type() -> FieldType {
    FieldType::OneOf(vec![
        FieldType::String,
        FieldType::Object(vec![
            FieldSpec::new("jq", FieldType::Jq, "A jq expression giving the value.").required(),
        ]),
    ])
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Direction {
    In,
    Out,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Mode {
    #[default]
    Structured,
    Binary,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum AttributeConfig {
    Literal(String),
    Jq { jq: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    direction: Direction,
    #[serde(default)]
    mode: Mode,
    source: Option<AttributeConfig>,
    #[serde(rename = "type")]
    kind: Option<AttributeConfig>,
    subject: Option<AttributeConfig>,
}

/// An attribute value the step computes for `out`.
enum Attribute {
    Literal(String),
    Jq(Arc<dyn JqProgram>),
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    let mut attributes = Vec::new();
    for (name, attribute) in [
        ("source", config.source),
        ("type", config.kind),
        ("subject", config.subject),
    ] {
        let Some(attribute) = attribute else { continue };
        if config.direction == Direction::In {
            return Err(BuildError::field(
                name,
                format!(
                    "`{name}` is set by the incoming event; it applies to `direction: out` only"
                ),
            ));
        }
        let attribute = match attribute {
            AttributeConfig::Literal(text) if text.is_empty() => {
                return Err(BuildError::field(name, "an attribute must not be empty"));
            }
            AttributeConfig::Literal(text) => Attribute::Literal(text),
            AttributeConfig::Jq { jq } => {
                Attribute::Jq(ctx.steps.compile_jq(&format!("{name}.jq"), &jq)?)
            }
        };
        attributes.push((name, attribute));
    }
    Ok(match config.direction {
        Direction::In => Arc::new(Incoming { mode: config.mode }),
        Direction::Out => Arc::new(Outgoing {
            mode: config.mode,
            attributes,
        }),
    })
}

/// Checks the required attributes among `ce-` headers.
fn check_required(headers: &sluice_core::Headers) -> Result<(), ProcessError> {
    for name in REQUIRED {
        match headers.get(&format!("{PREFIX}{name}")).map(String::as_str) {
            None | Some("") => {
                return Err(ProcessError::invalid_input(format!(
                    "CloudEvent attribute `{name}` is missing; every event needs `id`, `source`, \
                     `specversion` and `type`"
                )));
            }
            Some(version) if name == "specversion" && version != "1.0" => {
                return Err(ProcessError::invalid_input(format!(
                    "CloudEvent attribute `specversion` is `{version}`, but only `1.0` is supported"
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

struct Incoming {
    mode: Mode,
}

impl Incoming {
    /// The message's new headers and body, from a structured envelope.
    fn unwrap_envelope(msg: &mut Message) -> Result<(), ProcessError> {
        let envelope = msg.body.json().map_err(|e| {
            ProcessError::invalid_input(format!("a structured CloudEvent is a JSON object: {e}"))
        })?;
        let Value::Object(envelope) = envelope else {
            return Err(ProcessError::invalid_input(
                "a structured CloudEvent is a JSON object, but the body is not an object",
            ));
        };
        let mut envelope = envelope.clone();
        let data = envelope.remove("data");
        let data_base64 = envelope.remove("data_base64");
        let content_type = match envelope.remove("datacontenttype") {
            Some(Value::String(s)) => s,
            Some(other) => {
                return Err(ProcessError::invalid_input(format!(
                    "CloudEvent attribute `datacontenttype` must be a string, not {other}"
                )));
            }
            None => "application/json".to_owned(),
        };
        let mut headers = msg.headers.clone();
        headers.retain(|name, _| !name.starts_with(PREFIX));
        for (name, value) in envelope {
            let text = match value {
                Value::String(s) => s,
                Value::Null => continue,
                other => other.to_string(),
            };
            headers.insert(format!("{PREFIX}{name}"), text);
        }
        check_required(&headers)?;
        let body = match (data, data_base64) {
            (Some(_), Some(_)) => {
                return Err(ProcessError::invalid_input(
                    "a CloudEvent has `data` or `data_base64`, not both",
                ));
            }
            (None, Some(Value::String(coded))) => {
                Body::from_bytes(base64::decode(&coded).map_err(|e| {
                    ProcessError::invalid_input(format!(
                        "CloudEvent `data_base64` is not valid base64: {e}"
                    ))
                })?)
            }
            (None, Some(_)) => {
                return Err(ProcessError::invalid_input(
                    "CloudEvent `data_base64` must be a string",
                ));
            }
            (Some(Value::String(text)), None) if !is_json(&content_type) => Body::from_bytes(text),
            (Some(data), None) => Body::from_json(data),
            (None, None) => Body::from_bytes(bytes::Bytes::new()),
        };
        headers.insert("content-type".to_owned(), content_type);
        msg.headers = headers;
        msg.body = body;
        Ok(())
    }
}

/// Whether a content type carries JSON (`application/json`, `text/json`, `application/x+json`).
fn is_json(content_type: &str) -> bool {
    let essence = common::media_type(content_type);
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

#[async_trait]
impl Processor for Incoming {
    async fn process(&self, mut msg: Message) -> Result<Outputs, Failure> {
        let checked = match self.mode {
            Mode::Structured => Self::unwrap_envelope(&mut msg),
            Mode::Binary => check_required(&msg.headers),
        };
        match checked {
            Ok(()) => Ok(common::one(msg)),
            Err(e) => Err(Failure::new(msg, e)),
        }
    }
}

struct Outgoing {
    mode: Mode,
    attributes: Vec<(&'static str, Attribute)>,
}

impl Outgoing {
    /// The event's attributes: options, then `ce-` headers, then defaults.
    async fn attributes(&self, msg: &Message) -> Result<Map<String, Value>, ProcessError> {
        let mut attributes: Map<String, Value> = msg
            .headers
            .iter()
            .filter_map(|(name, value)| {
                let attribute = name.strip_prefix(PREFIX)?;
                (!attribute.is_empty())
                    .then(|| (attribute.to_owned(), Value::String(value.clone())))
            })
            .collect();
        attributes.remove("datacontenttype");
        for (name, attribute) in &self.attributes {
            let value = match attribute {
                Attribute::Literal(text) => text.clone(),
                Attribute::Jq(program) => {
                    let body = msg.body.json_shared().map_err(|e| {
                        ProcessError::invalid_input(format!(
                            "the `{name}` expression needs a JSON body: {e}"
                        ))
                    })?;
                    let mut outputs = program.run(body, msg).await?;
                    match (outputs.len(), outputs.pop()) {
                        (1, Some(Value::String(s))) if !s.is_empty() => s,
                        (1, Some(v @ (Value::Number(_) | Value::Bool(_)))) => v.to_string(),
                        (n, _) => {
                            return Err(ProcessError::expression(format!(
                                "the `{name}` expression must produce one non-empty string, but produced {n} outputs or another value"
                            )));
                        }
                    }
                }
            };
            attributes.insert((*name).to_owned(), Value::String(value));
        }
        attributes
            .entry("id")
            .or_insert_with(|| Value::String(msg.id().to_string()));
        attributes.insert("specversion".to_owned(), Value::String("1.0".to_owned()));
        for name in ["source", "type"] {
            if !attributes.contains_key(name) {
                return Err(ProcessError::invalid_input(format!(
                    "CloudEvent attribute `{name}` is missing: set the step's `{name}` option or a `ce-{name}` header"
                )));
            }
        }
        Ok(attributes)
    }
}

#[async_trait]
impl Processor for Outgoing {
    async fn process(&self, mut msg: Message) -> Result<Outputs, Failure> {
        let attributes = match self.attributes(&msg).await {
            Ok(attributes) => attributes,
            Err(e) => return Err(Failure::new(msg, e)),
        };
        match self.mode {
            Mode::Binary => {
                for (name, value) in attributes {
                    let text = match value {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    msg.headers.insert(format!("{PREFIX}{name}"), text);
                }
            }
            Mode::Structured => {
                let mut envelope = attributes;
                let content_type = msg.headers.remove("content-type");
                let json = msg.body.json().ok().cloned();
                match (json, content_type) {
                    (Some(data), ct) if ct.as_deref().is_none_or(is_json) => {
                        if !msg.body.is_empty() {
                            envelope.insert("data".to_owned(), data);
                        }
                        envelope.insert(
                            "datacontenttype".to_owned(),
                            Value::String(ct.unwrap_or_else(|| "application/json".to_owned())),
                        );
                    }
                    (_, ct) => {
                        let bytes = msg.body.as_bytes();
                        match std::str::from_utf8(bytes) {
                            Ok(text) => {
                                envelope.insert("data".to_owned(), Value::String(text.to_owned()))
                            }
                            Err(_) => envelope.insert(
                                "data_base64".to_owned(),
                                Value::String(base64::encode(bytes)),
                            ),
                        };
                        if let Some(ct) = ct {
                            envelope.insert("datacontenttype".to_owned(), Value::String(ct));
                        }
                    }
                }
                msg.headers.retain(|name, _| !name.starts_with(PREFIX));
                msg.headers.insert(
                    "content-type".to_owned(),
                    STRUCTURED_CONTENT_TYPE.to_owned(),
                );
                msg.body = Body::from_json(Value::Object(envelope));
            }
        }
        Ok(common::one(msg))
    }
}

#[cfg(test)]
mod tests;
