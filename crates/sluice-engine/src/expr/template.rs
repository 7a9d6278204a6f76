//! Text templates (minijinja) with fuel and output limits.
//!
//! A template sees `body` (the parsed JSON if the body is JSON, else its text), `text` (the body
//! as text), `headers` (an object of strings) and `meta` (as jq's `$meta`). Undefined variables
//! and attributes are errors ([`UndefinedBehavior::Strict`]), so a typo such as `{{ bdoy.id }}`
//! fails the step instead of rendering an empty string. Output is not HTML-escaped, and a single
//! trailing newline is removed (minijinja's default). Each render may spend [`FUEL`] units of
//! work and produce at most [`MAX_OUTPUT_BYTES`].

use std::io;

use minijinja::value::{Serde, Value as TValue};
use minijinja::{AutoEscape, Environment, ErrorKind as TErrorKind, UndefinedBehavior, context};
use sluice_core::{Message, ProcessError};

use crate::expr::MetaView;

/// Work one render may do (minijinja fuel: roughly one unit per instruction).
pub const FUEL: u64 = 100_000;

/// Largest rendered output.
pub const MAX_OUTPUT_BYTES: usize = 1024 * 1024;

const NAME: &str = "template";

/// A template that does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TemplateError {
    /// The 1-based line of the error in the source, when known.
    pub line: Option<usize>,
    /// What is wrong and what to do.
    pub message: String,
}

/// A compiled template: its own environment, built once.
#[derive(Debug)]
pub struct Template {
    env: Environment<'static>,
}

/// Compiles `source`.
pub fn compile(source: &str) -> Result<Template, TemplateError> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.add_template_owned(NAME, source.to_owned())
        .map_err(|e| TemplateError {
            line: e.line(),
            message: format!(
                "{} on line {}: {}; check the `{{{{ }}}}` and `{{% %}}` tags",
                e.kind(),
                e.line().unwrap_or(1),
                e.detail().unwrap_or("the template does not parse")
            ),
        })?;
    Ok(Template { env })
}

impl Template {
    /// Renders the template for `msg`.
    pub fn render(&self, msg: &Message) -> Result<String, ProcessError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| ProcessError::expression(format!("template is missing: {e}")))?;
        let text = msg.body.to_text();
        let body = match msg.body.json() {
            Ok(json) => TValue::from(Serde(json)),
            Err(_) => TValue::from(text.clone()),
        };
        let ctx = context! {
            body => body,
            text => text,
            headers => TValue::from(Serde(&msg.headers)),
            meta => TValue::from(Serde(MetaView::of(msg).to_json())),
        };
        let mut out = Capped {
            buf: Vec::new(),
            overflowed: false,
        };
        let rendered = template.render_captured_to(ctx, &mut out);
        if out.overflowed {
            return Err(ProcessError::expression(format!(
                "template output exceeds {MAX_OUTPUT_BYTES} bytes; render less"
            )));
        }
        rendered.map_err(|e| render_error(&e))?;
        String::from_utf8(out.buf)
            .map_err(|_| ProcessError::expression("template rendered invalid UTF-8"))
    }
}

fn render_error(e: &minijinja::Error) -> ProcessError {
    let line = e
        .line()
        .map(|l| format!(" on line {l}"))
        .unwrap_or_default();
    let detail = e.detail().map(|d| format!(": {d}")).unwrap_or_default();
    ProcessError::expression(match e.kind() {
        TErrorKind::OutOfFuel => {
            format!("template exceeded its limit of {FUEL} operations{line}; loop over less data")
        }
        TErrorKind::UndefinedError => format!(
            "template uses an undefined value{line}{detail}; the variables are `body`, `text`, `headers` and `meta`"
        ),
        kind => format!("template failed{line}: {kind}{detail}"),
    })
}

/// A writer that refuses to grow past [`MAX_OUTPUT_BYTES`].
struct Capped {
    buf: Vec<u8>,
    overflowed: bool,
}

impl io::Write for Capped {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > MAX_OUTPUT_BYTES {
            self.overflowed = true;
            return Err(io::Error::other("template output too large"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_core::ErrorKind;

    fn render(source: &str, msg: &Message) -> Result<String, ProcessError> {
        compile(source).unwrap().render(msg)
    }

    #[test]
    fn renders_body_text_headers_and_meta() {
        let msg = Message::json(json!({"name": "ada", "n": [1, 2]})).with_header("x-id", "7");
        assert_eq!(
            render(
                "hi {{ body.name }} #{{ headers['x-id'] }} {{ body.n | length }}",
                &msg
            )
            .unwrap(),
            "hi ada #7 2"
        );
        assert_eq!(
            render("{{ text }}", &msg).unwrap(),
            r#"{"n":[1,2],"name":"ada"}"#
        );
        assert_eq!(render("{{ meta.pattern }}", &msg).unwrap(), "in_only");
        assert_eq!(render("{{ meta.id }}", &msg).unwrap(), msg.id().to_string());
    }

    #[test]
    fn non_json_body_is_text() {
        let msg = Message::bytes(&b"plain words"[..]);
        assert_eq!(
            render("{{ body }}|{{ text }}", &msg).unwrap(),
            "plain words|plain words"
        );
    }

    #[test]
    fn no_html_escaping() {
        let msg = Message::json(json!({"s": "<a&b>"}));
        assert_eq!(render("{{ body.s }}", &msg).unwrap(), "<a&b>");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = compile("line one\n{{ body.name").unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("on line 2"), "{}", e.message);
        assert!(!e.message.ends_with('.'));
    }

    #[test]
    fn undefined_values_are_errors() {
        let msg = Message::json(json!({"name": "ada"}));
        let e = render("{{ bdoy.name }}", &msg).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Expression);
        assert!(e.detail.contains("undefined"), "{}", e.detail);
        assert!(render("{{ body.nmae }}", &msg).is_err());
    }

    #[test]
    fn fuel_and_output_are_limited() {
        let msg = Message::json(json!(null));
        let e = render(
            "{% for i in range(100000) %}{% for j in range(100) %}x{% endfor %}{% endfor %}",
            &msg,
        )
        .unwrap_err();
        assert!(
            e.detail.contains("limit of 100000 operations"),
            "{}",
            e.detail
        );
        let big = Message::json(json!("y".repeat(MAX_OUTPUT_BYTES)));
        let e = render("{{ body }}{{ body }}", &big).unwrap_err();
        assert!(e.detail.contains("exceeds"), "{}", e.detail);
    }
}
