//! XML <-> JSON, by one fixed convention (documented in the `parse` and `render` specs):
//!
//! * the document `<order>...</order>` is the object `{"order": ...}`;
//! * an element with neither attributes nor child elements is its text, a string (`""` when
//!   empty);
//! * otherwise it is an object: attributes as `"@name"`, child elements by name, and any text as
//!   `"#text"` (whitespace around text is trimmed; whitespace-only text is dropped);
//! * a child element that appears more than once becomes an array, in document order;
//! * all values are strings; comments, processing instructions and the DOCTYPE are skipped;
//!   names keep their namespace prefix (`soap:Body`), and `xmlns` declarations are attributes.

use quick_xml::Reader;
use quick_xml::Writer;
use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};
use serde_json::{Map, Value};

use crate::processors::common;

/// The content type of an XML body.
pub(crate) const CONTENT_TYPE: &str = "application/xml";

/// How deep elements may nest, so a hostile document cannot exhaust the stack of a consumer.
pub(crate) const MAX_DEPTH: usize = 128;

/// An element being read.
struct Frame {
    name: String,
    object: Map<String, Value>,
    has_children: bool,
    text: String,
}

impl Frame {
    fn open(start: &BytesStart<'_>, at: &dyn Fn() -> String) -> Result<Frame, String> {
        let name = String::from_utf8_lossy(start.name().as_ref()).into_owned();
        let mut object = Map::new();
        for attribute in start.attributes() {
            let attribute = attribute.map_err(|e| format!("{}: bad attribute: {e}", at()))?;
            let key = String::from_utf8_lossy(attribute.key.as_ref()).into_owned();
            let value = attribute
                .unescape_value()
                .map_err(|e| format!("{}: bad attribute `{key}`: {e}", at()))?;
            object.insert(format!("@{key}"), Value::String(value.into_owned()));
        }
        Ok(Frame {
            name,
            object,
            has_children: false,
            text: String::new(),
        })
    }

    /// The element's JSON value.
    fn close(self) -> Value {
        let text = self.text.trim();
        if self.object.is_empty() {
            return Value::String(text.to_owned());
        }
        let mut object = self.object;
        if !text.is_empty() {
            object.insert("#text".to_owned(), Value::String(text.to_owned()));
        }
        Value::Object(object)
    }

    fn add_child(&mut self, name: String, value: Value) {
        self.has_children = true;
        match self.object.get_mut(&name) {
            None => {
                self.object.insert(name, value);
            }
            Some(Value::Array(items)) => items.push(value),
            Some(first) => {
                let first = first.take();
                self.object.insert(name, Value::Array(vec![first, value]));
            }
        }
    }
}

/// Line and column (both from 1) of a byte offset in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let column = before.iter().rev().take_while(|b| **b != b'\n').count() + 1;
    (line, column)
}

/// Parses an XML document into `{root_name: value}`.
pub(crate) fn parse(text: &str) -> Result<Value, String> {
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<(String, Value)> = None;
    loop {
        let event = reader.read_event();
        let offset = usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX);
        let at = || {
            let (line, column) = line_column(text, offset);
            format!("line {line}, column {column}")
        };
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                let offset = usize::try_from(reader.error_position()).unwrap_or(usize::MAX);
                let (line, column) = line_column(text, offset);
                return Err(format!("line {line}, column {column}: {e}"));
            }
        };
        match event {
            Event::Start(start) => {
                if root.is_some() {
                    return Err(format!("{}: a document has one root element", at()));
                }
                if stack.len() == MAX_DEPTH {
                    return Err(format!(
                        "{}: elements nest deeper than {MAX_DEPTH} levels",
                        at()
                    ));
                }
                stack.push(Frame::open(&start, &at)?);
            }
            Event::Empty(start) => {
                let frame = Frame::open(&start, &at)?;
                close(frame, &mut stack, &mut root, &at)?;
            }
            Event::End(_) => {
                // quick-xml has checked that the end tag matches the open element.
                if let Some(frame) = stack.pop() {
                    close(frame, &mut stack, &mut root, &at)?;
                }
            }
            Event::Text(t) => {
                let decoded = t.decode().map_err(|e| format!("{}: {e}", at()))?;
                push_text(&mut stack, &decoded, &at)?;
            }
            Event::CData(c) => {
                let decoded = c.decode().map_err(|e| format!("{}: {e}", at()))?;
                push_text(&mut stack, &decoded, &at)?;
            }
            Event::GeneralRef(r) => {
                let resolved = resolve_reference(&r).map_err(|e| format!("{}: {e}", at()))?;
                push_text(&mut stack, &resolved, &at)?;
            }
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
    if let Some(open) = stack.last() {
        let (line, column) = line_column(text, text.len());
        return Err(format!(
            "line {line}, column {column}: the document ends before element `{}` is closed",
            open.name
        ));
    }
    match root {
        Some((name, value)) => Ok(Value::Object(Map::from_iter([(name, value)]))),
        None => Err("the document has no root element".to_owned()),
    }
}

fn close(
    frame: Frame,
    stack: &mut [Frame],
    root: &mut Option<(String, Value)>,
    at: &dyn Fn() -> String,
) -> Result<(), String> {
    let name = frame.name.clone();
    let value = frame.close();
    match stack.last_mut() {
        Some(parent) => parent.add_child(name, value),
        None if root.is_some() => {
            return Err(format!("{}: a document has one root element", at()));
        }
        None => *root = Some((name, value)),
    }
    Ok(())
}

fn push_text(stack: &mut [Frame], text: &str, at: &dyn Fn() -> String) -> Result<(), String> {
    match stack.last_mut() {
        Some(frame) => frame.text.push_str(text),
        None if text.trim().is_empty() => {}
        None => return Err(format!("{}: text outside the root element", at())),
    }
    Ok(())
}

/// The text of `&name;`: the five predefined entities and character references. Other entities
/// would need the DTD, which is not read.
fn resolve_reference(reference: &quick_xml::events::BytesRef<'_>) -> Result<String, String> {
    if let Some(c) = reference.resolve_char_ref().map_err(|e| e.to_string())? {
        return Ok(c.to_string());
    }
    let name = reference.decode().map_err(|e| e.to_string())?;
    match name.as_ref() {
        "amp" => Ok("&".to_owned()),
        "lt" => Ok("<".to_owned()),
        "gt" => Ok(">".to_owned()),
        "quot" => Ok("\"".to_owned()),
        "apos" => Ok("'".to_owned()),
        other => Err(format!(
            "unknown entity `&{other};`: only the predefined entities and character references are supported"
        )),
    }
}

/// Renders `value` as an XML document; `root` names the root element, else the value must be an
/// object with one member, which is the root.
pub(crate) fn render(value: &Value, root: Option<&str>) -> Result<String, String> {
    let mut writer = Writer::new(Vec::new());
    let io = |e: std::io::Error| e.to_string();
    writer
        .write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))
        .map_err(io)?;
    match (root, value) {
        (Some(root), Value::Array(items)) => {
            check_name(root)?;
            writer
                .write_event(Event::Start(BytesStart::new(root)))
                .map_err(io)?;
            for item in items {
                element(&mut writer, "item", item, 1)?;
            }
            writer
                .write_event(Event::End(BytesEnd::new(root)))
                .map_err(io)?;
        }
        (Some(root), value) => element(&mut writer, root, value, 0)?,
        (None, Value::Object(object)) if object.len() == 1 => {
            for (name, value) in object {
                if value.is_array() {
                    return Err(format!(
                        "the root `{name}` is an array, but a document has one root element; \
                         set `root` to wrap the items"
                    ));
                }
                element(&mut writer, name, value, 0)?;
            }
        }
        (None, other) => {
            return Err(format!(
                "without `root`, the body must be an object with exactly one member (the root \
                 element), but it is {}; set `root` to name the root element",
                describe_root(other)
            ));
        }
    }
    String::from_utf8(writer.into_inner()).map_err(|e| e.to_string())
}

fn describe_root(value: &Value) -> String {
    match value {
        Value::Object(o) => format!("an object with {} members", o.len()),
        other => common::value_kind(other).to_owned(),
    }
}

type XmlWriter = Writer<Vec<u8>>;

fn element(writer: &mut XmlWriter, name: &str, value: &Value, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("the body nests deeper than {MAX_DEPTH} levels"));
    }
    check_name(name)?;
    let io = |e: std::io::Error| e.to_string();
    match value {
        Value::Array(items) => {
            for item in items {
                element(writer, name, item, depth + 1)?;
            }
        }
        Value::Null => {
            writer
                .write_event(Event::Empty(BytesStart::new(name)))
                .map_err(io)?;
        }
        Value::Object(object) => {
            let mut start = BytesStart::new(name);
            let mut text = None;
            let mut children = Vec::new();
            for (key, member) in object {
                if let Some(attribute) = key.strip_prefix('@') {
                    check_name(attribute)?;
                    let value = scalar_text(member).ok_or_else(|| {
                        format!("attribute `{key}` of `{name}` must be a string, number or boolean")
                    })?;
                    start.push_attribute((attribute, value.as_str()));
                } else if key == "#text" {
                    text = Some(scalar_text(member).ok_or_else(|| {
                        format!("`#text` of `{name}` must be a string, number or boolean")
                    })?);
                } else {
                    children.push((key, member));
                }
            }
            if text.is_none() && children.is_empty() {
                writer.write_event(Event::Empty(start)).map_err(io)?;
                return Ok(());
            }
            writer.write_event(Event::Start(start)).map_err(io)?;
            if let Some(text) = text {
                writer
                    .write_event(Event::Text(BytesText::new(&text)))
                    .map_err(io)?;
            }
            for (key, member) in children {
                element(writer, key, member, depth + 1)?;
            }
            writer
                .write_event(Event::End(BytesEnd::new(name)))
                .map_err(io)?;
        }
        scalar => {
            let text = scalar_text(scalar).unwrap_or_default();
            writer
                .write_event(Event::Start(BytesStart::new(name)))
                .map_err(io)?;
            writer
                .write_event(Event::Text(BytesText::new(&text)))
                .map_err(io)?;
            writer
                .write_event(Event::End(BytesEnd::new(name)))
                .map_err(io)?;
        }
    }
    Ok(())
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(_) | Value::Bool(_) => Some(value.to_string()),
        Value::Null => Some(String::new()),
        Value::Array(_) | Value::Object(_) => None,
    }
}

/// Whether `name` can be an XML element or attribute name (the ASCII subset of the rule, plus
/// any non-ASCII letter).
fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | ':' | '-' | '.')) {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid XML name; rename the member with `transform` first"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn follows_the_convention() {
        let doc = r#"<?xml version="1.0"?>
<!-- an order -->
<order id="7" xmlns:x="urn:x">
  <customer>Ada &amp; Co &#x41;</customer>
  <item sku="A">2</item>
  <item sku="B"><![CDATA[<3>]]></item>
  <note/>
  <x:extra>  padded  </x:extra>
</order>"#;
        assert_eq!(
            parse(doc).unwrap(),
            json!({"order": {
                "@id": "7",
                "@xmlns:x": "urn:x",
                "customer": "Ada & Co A",
                "item": [{"@sku": "A", "#text": "2"}, {"@sku": "B", "#text": "<3>"}],
                "note": "",
                "x:extra": "padded"
            }})
        );
    }

    #[test]
    fn mixed_content_keeps_its_text() {
        assert_eq!(
            parse("<p>Hello <b>you</b></p>").unwrap(),
            json!({"p": {"#text": "Hello", "b": "you"}})
        );
    }

    #[test]
    fn malformed_documents_name_line_and_column() {
        let e = parse("<a>\n  <b></c>\n</a>").unwrap_err();
        assert!(e.starts_with("line 2, column"), "{e}");
        let e = parse("<a>\n<b>").unwrap_err();
        assert_eq!(
            e,
            "line 2, column 4: the document ends before element `b` is closed"
        );
        let e = parse("<a/><b/>").unwrap_err();
        assert!(e.contains("one root element"), "{e}");
        assert!(parse("  ").unwrap_err().contains("no root element"));
        let e = parse("<a>&nbsp;</a>").unwrap_err();
        assert!(e.contains("unknown entity `&nbsp;`"), "{e}");
        let deep = "<a>".repeat(MAX_DEPTH + 1);
        assert!(parse(&deep).unwrap_err().contains("nest deeper"));
    }

    #[test]
    fn renders_the_convention_back() {
        let body = json!({"order": {
            "@id": 7,
            "customer": "Ada & Co",
            "item": [{"@sku": "A", "#text": 2}, {"@sku": "B"}],
            "note": null,
            "paid": true
        }});
        let xml = render(&body, None).unwrap();
        assert_eq!(
            xml,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><order id=\"7\"><customer>Ada &amp; Co</customer>\
<item sku=\"A\">2</item><item sku=\"B\"/><note/><paid>true</paid></order>"
        );
        assert_eq!(
            parse(&xml).unwrap(),
            json!({"order": {
                "@id": "7",
                "customer": "Ada & Co",
                "item": [{"@sku": "A", "#text": "2"}, {"@sku": "B"}],
                "note": "",
                "paid": "true"
            }})
        );
    }

    #[test]
    fn root_names_the_document_element() {
        assert_eq!(
            render(&json!({"a": 1}), Some("r")).unwrap(),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><r><a>1</a></r>"
        );
        assert_eq!(
            render(&json!([1, {"b": 2}]), Some("list")).unwrap(),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><list><item>1</item><item><b>2</b></item></list>"
        );
        let e = render(&json!({"a": 1, "b": 2}), None).unwrap_err();
        assert!(e.contains("an object with 2 members"), "{e}");
        let e = render(&json!({"bad name": 1}), None).unwrap_err();
        assert!(e.contains("`bad name` is not a valid XML name"), "{e}");
        let e = render(&json!({"a": {"@x": [1]}}), None).unwrap_err();
        assert!(e.contains("attribute `@x`"), "{e}");
    }
}
