//! `parse`: turns a CSV, XML or form body into JSON.

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
        "parse",
        ComponentKind::Processor,
        "Parse a CSV, XML or form body into JSON",
    )
    .description(concat!(
        "Reads the body as text of the given `format` and replaces it with JSON, so the jq steps \
after it can work on it (a Message Translator for wire formats; `render` is the reverse). \
Headers, metadata and acknowledgement are kept; `content-type` becomes `application/json`.\n\n\
* `csv`: with `header: true` (default), the first row names the columns and the body becomes an \
array of objects, one per record; with `header: false`, an array of arrays. Every field is a \
string (CSV has no types: cast in jq with `tonumber`). Fields may be quoted (`\"a, b\"`, `\"\"` \
for a quote); lines end with LF or CRLF. Under a header, a record with a different number of \
fields is an error; without one, records may be ragged. An empty body is `[]`. A leading UTF-8 \
byte order mark (as spreadsheets write) is skipped, in every format. When two columns \
have the same name, the last one wins.\n\
* `xml`: see the convention below.\n\
* `form`: `application/x-www-form-urlencoded` (`a=1&b=x+y`) becomes a flat object of strings; a \
key given more than once becomes an array of its values, in order. Malformed escapes are kept as \
they are, as browsers do, so a form body never fails to parse.\n\n\
Bad input fails the step with `invalid_input` saying where: `record 3 (line 3): has 2 fields but \
the header has 3` for CSV (records are counted from 1, the header included), `line 2, column 9: \
...` for XML.\n\n",
        xml_convention!()
    ));
    for field in fields(false) {
        spec = spec.field(field);
    }
    spec.shorthand("format")
        .example("Parse a CSV upload with a header row", "format: csv\n")
        .example(
            "Parse semicolon-separated rows without a header",
            "format: csv\ndelimiter: ';'\nheader: false\n",
        )
        .example("Parse an XML document", "xml\n")
        .example("Parse a form post", "format: form\n")
}

/// Builds the step.
pub fn build(config: &Value, _ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    Ok(Arc::new(Parse {
        options: config.options(false)?,
    }))
}

struct Parse {
    options: Options,
}

#[async_trait]
impl Processor for Parse {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let parsed = self.options.parse(msg.body.as_bytes()).map(Body::from_json);
        self.options
            .replace_body(msg, "parse", parsed, "application/json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processors::testkit::{build_one, process, try_build};
    use serde_json::json;
    use sluice_core::{AckToken, ErrorKind, Outcome};

    #[tokio::test]
    async fn csv_becomes_json_and_the_message_is_kept() {
        let step = build_one("parse", json!("csv"));
        let (token, rx) = AckToken::channel();
        let msg = Message::bytes(&b"id,name\n1,Ada\n"[..])
            .with_header("content-type", "text/csv")
            .with_header("h", "v")
            .with_ack(token);
        let id = msg.id();
        let out = process(&step, msg).await.unwrap();
        assert_eq!(
            out[0].body.json().unwrap(),
            &json!([{"id": "1", "name": "Ada"}])
        );
        assert_eq!(out[0].headers["content-type"], "application/json");
        assert_eq!(out[0].headers["h"], "v");
        assert_eq!(out[0].id(), id);
        out.into_iter().for_each(Message::ack);
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
    }

    #[tokio::test]
    async fn each_format_parses() {
        let step = build_one(
            "parse",
            json!({"format": "csv", "delimiter": "\t", "header": false}),
        );
        let out = process(&step, Message::bytes(&b"a\tb\n"[..]))
            .await
            .unwrap();
        assert_eq!(out[0].body.json().unwrap(), &json!([["a", "b"]]));
        let step = build_one("parse", json!("xml"));
        let out = process(&step, Message::bytes(&b"<a x=\"1\"><b>2</b></a>"[..]))
            .await
            .unwrap();
        assert_eq!(
            out[0].body.json().unwrap(),
            &json!({"a": {"@x": "1", "b": "2"}})
        );
        let step = build_one("parse", json!("form"));
        let out = process(&step, Message::bytes(&b"a=1&a=2&b=%C3%A9"[..]))
            .await
            .unwrap();
        assert_eq!(
            out[0].body.json().unwrap(),
            &json!({"a": ["1", "2"], "b": "é"})
        );
    }

    #[tokio::test]
    async fn a_byte_order_mark_is_not_part_of_the_data() {
        let step = build_one("parse", json!("csv"));
        let out = process(&step, Message::bytes(&b"\xEF\xBB\xBFid\n1\n"[..]))
            .await
            .unwrap();
        assert_eq!(out[0].body.json().unwrap(), &json!([{"id": "1"}]));
        let step = build_one("parse", json!("xml"));
        let out = process(&step, Message::bytes(&b"\xEF\xBB\xBF<a>1</a>"[..]))
            .await
            .unwrap();
        assert_eq!(out[0].body.json().unwrap(), &json!({"a": "1"}));
    }

    #[tokio::test]
    async fn bad_input_is_invalid_input_saying_where() {
        let step = build_one("parse", json!("csv"));
        let f = process(&step, Message::bytes(&b"a,b\n1,2\n3,4,5\n"[..]))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::InvalidInput);
        assert!(
            f.error
                .detail
                .starts_with("cannot parse the body as CSV: record 3 (line 3): has 3 fields"),
            "{}",
            f.error.detail
        );
        assert_eq!(
            f.message.body.to_text(),
            "a,b\n1,2\n3,4,5\n",
            "message handed back"
        );
        let step = build_one("parse", json!("xml"));
        let f = process(&step, Message::bytes(&b"<a>\n<b></a>"[..]))
            .await
            .unwrap_err();
        assert!(
            f.error
                .detail
                .starts_with("cannot parse the body as XML: line 2"),
            "{}",
            f.error.detail
        );
        let f = process(&step, Message::bytes(&b"<a>\xff</a>"[..]))
            .await
            .unwrap_err();
        assert!(f.error.detail.contains("not UTF-8"), "{}", f.error.detail);
    }

    #[test]
    fn options_of_another_format_are_build_errors() {
        let e = try_build("parse", &json!({"format": "xml", "delimiter": ";"}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("delimiter"));
        let e = try_build("parse", &json!({"format": "xml", "root": "r"}))
            .err()
            .unwrap();
        assert!(e.message.contains("`render` only"), "{e}");
        let e = try_build("parse", &json!({"format": "csv", "delimiter": ";;"}))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("delimiter"));
    }
}
