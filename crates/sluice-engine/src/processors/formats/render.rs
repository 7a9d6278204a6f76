//! `render`: turns a JSON body into CSV, XML or a form.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use sluice_core::spec::{ComponentKind, ComponentSpec};
use sluice_core::{Body, BuildContext, BuildError, Failure, Message, Outputs, Processor};

use super::{Config, Options, fields, xml_convention};
use crate::processors::common;

/// The step's spec.
pub fn spec() -> ComponentSpec {
    let mut spec = ComponentSpec::new(
        "render",
        ComponentKind::Processor,
        "Render a JSON body as CSV, XML or a form",
    )
    .description(concat!(
        "Replaces the JSON body with its text in the given `format` and sets `content-type` to \
`text/csv`, `application/xml` or `application/x-www-form-urlencoded` (the reverse of `parse`). \
Headers, metadata and acknowledgement are kept.\n\n\
* `csv`: the body is an array of rows (or one object, a single row). Object rows are written \
under a header row of `columns` (default: every key of every row, **sorted by name**, since JSON \
objects are ordered by key in Sluice); a missing key is an empty field. Array rows are written as \
they are. Strings are written as they are, `null` as an empty field, numbers, booleans and \
nested values as JSON. Fields holding the delimiter, a quote or a newline are quoted. \
`header: false` leaves out the header row.\n\
* `xml`: the convention below, in reverse; a document starts with \
`<?xml version=\"1.0\" encoding=\"UTF-8\"?>` and has no indentation. Without `root` the body must \
be an object with one member, the root element; with `root: name` the body is the root's \
content, and an array body becomes one `<item>` element per element. `null` is an empty element \
(`<note/>`), numbers and booleans are text, and an array repeats its element. Names that are \
not valid XML names (`a b`, `1x`) are refused.\n\
* `form`: the body is a flat object; strings, numbers and booleans become one pair each, an array \
one pair per element (`tag=a&tag=b`), `null` an empty value. Nested objects are refused.\n\n\
A body that is not JSON, or does not fit the format, fails with `invalid_input` naming the \
member at fault.\n\n",
        xml_convention!()
    ));
    for field in fields(true) {
        spec = spec.field(field);
    }
    spec.shorthand("format")
        .example(
            "Render rows as CSV with chosen columns",
            "format: csv\ncolumns: [id, name, total]\n",
        )
        .example(
            "Render an order as XML under a root element",
            "format: xml\nroot: order\n",
        )
        .example("Render a form for a legacy endpoint", "form\n")
}

/// Builds the step.
pub fn build(config: &Value, _ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    let options = config.options(true)?;
    if let Options::Xml { root: Some(root) } = &options {
        super::xml::render(&Value::Null, Some(root)).map_err(|e| BuildError::field("root", e))?;
    }
    Ok(Arc::new(Render { options }))
}

struct Render {
    options: Options,
}

#[async_trait]
impl Processor for Render {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let (msg, body) = common::json_body(msg)?;
        let rendered = self.options.render(&body).map(Body::from_bytes);
        let content_type = self.options.format().content_type();
        self.options
            .replace_body(msg, "render", rendered, content_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process, try_build};
    use serde_json::json;
    use sluice_core::ErrorKind;

    async fn render(config: Value, body: Value) -> Message {
        let step = build_one("render", config);
        let mut out = process(&step, Message::json(body)).await.unwrap();
        out.remove(0)
    }

    #[tokio::test]
    async fn renders_each_format_with_its_content_type() {
        let msg = render(
            json!({"format": "csv", "columns": ["id", "name"]}),
            json!([{"id": 1, "name": "Ada"}]),
        )
        .await;
        assert_eq!(msg.body.to_text(), "id,name\n1,Ada\n");
        assert_eq!(msg.headers["content-type"], "text/csv");
        let msg = render(json!({"format": "xml", "root": "o"}), json!({"id": 1})).await;
        assert!(
            msg.body.to_text().ends_with("<o><id>1</id></o>"),
            "{}",
            msg.body.to_text()
        );
        assert_eq!(msg.headers["content-type"], "application/xml");
        let msg = render(json!("form"), json!({"a": "x y"})).await;
        assert_eq!(msg.body.to_text(), "a=x+y");
        assert_eq!(
            msg.headers["content-type"],
            "application/x-www-form-urlencoded"
        );
    }

    async fn run(format: &str, step: &str, msg: Message) -> Message {
        let step = build_one(step, json!(format));
        process(&step, msg).await.unwrap().remove(0)
    }

    #[tokio::test]
    async fn parse_and_render_round_trip() {
        for (format, text) in [("csv", "a,b\n1,\"x, y\"\n"), ("form", "a=1&a=2&b=%26")] {
            let parsed = run(format, "parse", Message::bytes(text.as_bytes().to_vec())).await;
            let back = run(format, "render", parsed).await;
            assert_eq!(back.body.to_text(), text, "{format}");
        }
        let xml = "<r k=\"v\"><a>1</a><a>2</a><b/><c>x &amp; y</c></r>";
        let parsed = run("xml", "parse", Message::bytes(xml.as_bytes().to_vec())).await;
        let first = parsed.body.json().unwrap().clone();
        let back = run("xml", "render", parsed).await;
        let again = run("xml", "parse", back).await;
        assert_eq!(again.body.json().unwrap(), &first);
    }

    #[tokio::test]
    async fn bodies_that_do_not_fit_are_invalid_input() {
        let step = build_one("render", json!("form"));
        let f = process(&step, Message::json(json!({"a": {"b": 1}})))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::InvalidInput);
        assert!(
            f.error
                .detail
                .starts_with("cannot render the body as a form: `a` is an object"),
            "{}",
            f.error.detail
        );
        let f = process(&step, Message::bytes(&b"nope"[..]))
            .await
            .unwrap_err();
        assert!(f.error.detail.contains("not valid JSON"));
        let e = try_build("render", &json!({"format": "xml", "root": "a b"}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("root"));
        let e = try_build("render", &json!({"format": "form", "columns": ["a"]}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("columns"));
    }
}
