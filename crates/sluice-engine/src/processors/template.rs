//! `template`: renders a text body from a template.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{Body, BuildContext, BuildError, Failure, Message, Outputs, Processor};

use super::common;
use crate::expr::template::Template;

const DEFAULT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "template",
        ComponentKind::Processor,
        "Replace the body with text rendered from a template",
    )
    .description(
        "Renders a minijinja (Jinja2) template and makes the text the new body, setting the \
`content-type` header. The template sees `body` (the parsed JSON if the body is JSON, else its \
text), `text` (the body as text), `headers` and `meta` (`id`, `correlation_id`, `origin`, \
`created_at`, `pattern`).\n\n\
Undefined variables and attributes are errors, so typos surface; use `{% if x is defined %}` or \
the `default` filter for optional values. Output is not HTML-escaped. A render may spend 100000 \
units of fuel and produce at most 1 MiB; beyond that the step fails with `expression`.",
    )
    .field(
        FieldSpec::new(
            "template",
            FieldType::Template,
            "The template rendering the new body.",
        )
        .required(),
    )
    .field(
        FieldSpec::new(
            "content_type",
            FieldType::String,
            "Value of the `content-type` header of the result.",
        )
        .default_value(DEFAULT_CONTENT_TYPE),
    )
    .shorthand("template")
    .example("Greeting", "template: 'Hello {{ body.name }}!'\n")
    .example(
        "CSV line with a content type",
        "template: '{{ body.id }},{{ body.total }}'\ncontent_type: text/csv\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    template: String,
    #[serde(default = "default_content_type")]
    content_type: String,
}

fn default_content_type() -> String {
    DEFAULT_CONTENT_TYPE.to_owned()
}

/// Builds the step.
pub fn build(config: &Value, _ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    Ok(Arc::new(Render {
        template: common::template_at("template", &config.template)?,
        content_type: config.content_type,
    }))
}

struct Render {
    template: Template,
    content_type: String,
}

#[async_trait]
impl Processor for Render {
    async fn process(&self, mut msg: Message) -> Result<Outputs, Failure> {
        match self.template.render(&msg) {
            Ok(text) => {
                msg.body = Body::from_bytes(text);
                msg.headers
                    .insert("content-type".to_owned(), self.content_type.clone());
                Ok(common::one(msg))
            }
            Err(e) => Err(Failure::new(msg, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process, try_build};
    use serde_json::json;
    use sluice_core::ErrorKind;

    #[tokio::test]
    async fn renders_and_sets_content_type() {
        let step = build_one("template", json!("Hello {{ body.name }}"));
        let out = process(&step, Message::json(json!({"name": "Ada"})))
            .await
            .unwrap();
        assert_eq!(out[0].body.to_text(), "Hello Ada");
        assert_eq!(out[0].headers["content-type"], DEFAULT_CONTENT_TYPE);
        let step = build_one(
            "template",
            json!({"template": "{{ body.a }}", "content_type": "text/csv"}),
        );
        let out = process(&step, Message::json(json!({"a": 1})))
            .await
            .unwrap();
        assert_eq!(out[0].headers["content-type"], "text/csv");
        assert_eq!(out[0].body.to_text(), "1");
    }

    #[tokio::test]
    async fn undefined_is_an_expression_failure() {
        let step = build_one("template", json!("{{ body.missing }}"));
        let f = process(&step, Message::json(json!({}))).await.unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::Expression);
        assert_eq!(f.message.body.json().unwrap(), &json!({}));
    }

    #[test]
    fn syntax_errors_are_build_errors_on_the_field() {
        let e = try_build("template", &json!("{% if %}")).err().unwrap();
        assert_eq!(e.field.as_deref(), Some("template"));
        assert!(e.message.contains("line 1"), "{e}");
    }
}
