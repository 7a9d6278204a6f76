//! `log`: writes a rendered line to the log and passes the message on (Camel's `log`).

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, Failure, Message, Outputs, Processor};

use super::common;
use crate::expr::template::Template;

const DEFAULT_MESSAGE: &str = "{{ text }}";

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "log",
        ComponentKind::Processor,
        "Log a line rendered from the message and pass the message on",
    )
    .description(
        "Renders `message` (a template, see `template`) and emits it as a `tracing` event at \
`level` with the field `message_id`, under the target `sluice::log`. The message continues \
unchanged. A template that fails to render (an undefined variable) fails the step with \
`expression`, so typos surface rather than logging nothing.",
    )
    .field(
        FieldSpec::new("message", FieldType::Template, "The text to log, as a template.")
            .default_value(DEFAULT_MESSAGE),
    )
    .field(
        FieldSpec::new(
            "level",
            FieldType::Enum(vec!["trace", "debug", "info", "warn", "error"]),
            "Severity of the event.",
        )
        .default_value("info"),
    )
    .shorthand("message")
    .example("Log the body", "message: 'received {{ text }}'\n")
    .example(
        "Warn with a header",
        "message: 'order {{ body.id }} from {{ headers[\"x-tenant\"] }} needs review'\nlevel: warn\n",
    )
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Level {
    Trace,
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_message")]
    message: String,
    #[serde(default)]
    level: Level,
}

fn default_message() -> String {
    DEFAULT_MESSAGE.to_owned()
}

/// Builds the step.
pub fn build(config: &Value, _ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    Ok(Arc::new(Log {
        message: common::template_at("message", &config.message)?,
        level: config.level,
    }))
}

struct Log {
    message: Template,
    level: Level,
}

#[async_trait]
impl Processor for Log {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let text = match self.message.render(&msg) {
            Ok(text) => text,
            Err(e) => return Err(Failure::new(msg, e)),
        };
        let id = msg.id();
        // tracing needs the level at compile time, hence one call per level.
        match self.level {
            Level::Trace => tracing::trace!(target: "sluice::log", message_id = %id, "{text}"),
            Level::Debug => tracing::debug!(target: "sluice::log", message_id = %id, "{text}"),
            Level::Info => tracing::info!(target: "sluice::log", message_id = %id, "{text}"),
            Level::Warn => tracing::warn!(target: "sluice::log", message_id = %id, "{text}"),
            Level::Error => tracing::error!(target: "sluice::log", message_id = %id, "{text}"),
        }
        Ok(common::one(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process, try_build};
    use serde_json::json;
    use sluice_core::ErrorKind;

    #[tokio::test]
    async fn passes_the_message_on() {
        for config in [
            json!({}),
            json!("got {{ body.a }}"),
            json!({"message": "x", "level": "error"}),
        ] {
            let step = build_one("log", config);
            let msg = Message::json(json!({"a": 1}));
            let id = msg.id();
            let out = process(&step, msg).await.unwrap();
            assert_eq!(out[0].id(), id);
            assert_eq!(out[0].body.json().unwrap(), &json!({"a": 1}));
        }
    }

    #[tokio::test]
    async fn render_errors_fail_the_step() {
        let step = build_one("log", json!("{{ nope }}"));
        let f = process(&step, Message::json(json!(1))).await.unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::Expression);
    }

    #[test]
    fn unknown_level_is_a_build_error() {
        assert!(try_build("log", &json!({"level": "loud"})).is_err());
    }
}
