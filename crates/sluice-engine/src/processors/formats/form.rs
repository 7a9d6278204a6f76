//! `application/x-www-form-urlencoded` <-> a flat JSON object.
//!
//! Parsing: each `key=value` pair becomes a string member; a key given more than once becomes an
//! array of its values, in order. Rendering is the reverse: strings, numbers and booleans become
//! one pair, arrays one pair per element, `null` an empty value; nested objects cannot be
//! expressed in a form and are refused.

use serde_json::{Map, Value};

use crate::processors::common;

/// The content type of a form body.
pub(crate) const CONTENT_TYPE: &str = "application/x-www-form-urlencoded";

/// Parses a form body into an object.
pub(crate) fn parse(bytes: &[u8]) -> Value {
    let mut object = Map::new();
    for (key, value) in form_urlencoded::parse(bytes) {
        let value = Value::String(value.into_owned());
        match object.get_mut(key.as_ref()) {
            None => {
                object.insert(key.into_owned(), value);
            }
            Some(Value::Array(values)) => values.push(value),
            Some(first) => {
                let first = first.take();
                object.insert(key.into_owned(), Value::Array(vec![first, value]));
            }
        }
    }
    Value::Object(object)
}

/// Renders a flat object as a form body.
pub(crate) fn render(value: &Value) -> Result<String, String> {
    let Value::Object(object) = value else {
        return Err(format!(
            "a form is rendered from a JSON object, but the body is {}",
            common::value_kind(value)
        ));
    };
    let mut form = form_urlencoded::Serializer::new(String::new());
    for (key, value) in object {
        match value {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    form.append_pair(key, &scalar(item, &format!("{key}[{i}]"))?);
                }
            }
            other => {
                form.append_pair(key, &scalar(other, key)?);
            }
        }
    }
    Ok(form.finish())
}

fn scalar(value: &Value, at: &str) -> Result<String, String> {
    match value {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Bool(_) | Value::Number(_) => Ok(value.to_string()),
        Value::Array(_) | Value::Object(_) => Err(format!(
            "`{at}` is {}: a form holds only strings, numbers, booleans and lists of them; \
             flatten the body with `transform` first",
            common::value_kind(value)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pairs_become_members_and_repeated_keys_arrays() {
        assert_eq!(
            parse(b"name=Ada+Lovelace&tag=a&tag=b&tag=c&empty=&sym=%26%3D"),
            json!({"name": "Ada Lovelace", "tag": ["a", "b", "c"], "empty": "", "sym": "&="})
        );
        assert_eq!(parse(b""), json!({}));
    }

    #[test]
    fn renders_scalars_and_lists_and_refuses_nesting() {
        let body = json!({"q": "a b&c", "n": 3, "ok": true, "none": null, "tag": ["x", 1]});
        let text = render(&body).unwrap();
        // Members come out sorted by name: JSON objects are ordered by key in Sluice.
        assert_eq!(text, "n=3&none=&ok=true&q=a+b%26c&tag=x&tag=1");
        assert_eq!(
            parse(text.as_bytes()),
            json!({"q": "a b&c", "n": "3", "ok": "true", "none": "", "tag": ["x", "1"]})
        );
        let e = render(&json!({"a": {"b": 1}})).unwrap_err();
        assert!(e.contains("`a` is an object"), "{e}");
        let e = render(&json!({"a": [[1]]})).unwrap_err();
        assert!(e.contains("`a[0]` is an array"), "{e}");
        assert!(render(&json!([1])).unwrap_err().contains("an array"));
    }
}
