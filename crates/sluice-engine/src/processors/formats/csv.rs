//! CSV <-> JSON arrays.
//!
//! With a header row, each record becomes an object keyed by the header's names; without one,
//! an array of fields. Every field is a string: CSV has no types, and guessing them would turn
//! `007` into `7`. Rendering accepts an array of objects (a header row is written from `columns`,
//! or from every key found, sorted), an array of arrays (written as they are), or one object.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use crate::processors::common;

/// The content type of a CSV body.
pub(crate) const CONTENT_TYPE: &str = "text/csv";

/// How the CSV is laid out.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// The field separator, one ASCII byte.
    pub delimiter: u8,
    /// Whether the first record names the columns.
    pub header: bool,
    /// For rendering objects: the columns, in order (default: every key, sorted).
    pub columns: Option<Vec<String>>,
}

/// Parses CSV text into an array of objects (with a header) or of arrays.
pub(crate) fn parse(bytes: &[u8], layout: &Layout) -> Result<Value, String> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(layout.delimiter)
        .has_headers(layout.header)
        .flexible(!layout.header)
        .from_reader(bytes);
    let names: Option<Vec<String>> = if layout.header {
        let header = reader.headers().map_err(|e| describe(&e))?;
        Some(header.iter().map(str::to_owned).collect())
    } else {
        None
    };
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| describe(&e))?;
        let row = match &names {
            Some(names) => Value::Object(
                names
                    .iter()
                    .zip(record.iter())
                    .map(|(name, field)| (name.clone(), Value::String(field.to_owned())))
                    .collect::<Map<_, _>>(),
            ),
            None => Value::Array(
                record
                    .iter()
                    .map(|field| Value::String(field.to_owned()))
                    .collect(),
            ),
        };
        rows.push(row);
    }
    Ok(Value::Array(rows))
}

/// Says where the CSV is wrong: record number (1-based, the header being record 1 when there is
/// one), line and what is wrong.
fn describe(e: &csv::Error) -> String {
    let at = e
        .position()
        .map(|p| format!("record {} (line {}): ", p.record() + 1, p.line()))
        .unwrap_or_default();
    match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!(
            "{at}has {len} fields but the header has {expected_len}; \
             quote fields that contain the delimiter, or use `header: false` for ragged rows"
        ),
        csv::ErrorKind::Utf8 { err, .. } => {
            format!("{at}field {} is not valid UTF-8", err.field() + 1)
        }
        _ => format!("{at}{e}"),
    }
}

/// Renders a JSON array (or one object) as CSV text.
pub(crate) fn render(value: &Value, layout: &Layout) -> Result<String, String> {
    let rows: &[Value] = match value {
        Value::Array(rows) => rows,
        Value::Object(_) => std::slice::from_ref(value),
        other => {
            return Err(format!(
                "CSV is rendered from an array of objects or arrays, but the body is {}",
                common::value_kind(other)
            ));
        }
    };
    let mut writer = csv::WriterBuilder::new()
        .delimiter(layout.delimiter)
        .flexible(true)
        .from_writer(Vec::new());
    let columns = columns(rows, layout);
    if layout.header && !columns.is_empty() {
        writer.write_record(&columns).map_err(|e| e.to_string())?;
    }
    for (i, row) in rows.iter().enumerate() {
        let fields: Vec<String> = match row {
            Value::Object(object) => columns
                .iter()
                .map(|c| object.get(c).map_or_else(String::new, field))
                .collect(),
            Value::Array(items) => items.iter().map(field).collect(),
            other => {
                return Err(format!(
                    "row {i} is {}: each row must be an object or an array",
                    common::value_kind(other)
                ));
            }
        };
        writer.write_record(&fields).map_err(|e| e.to_string())?;
    }
    let bytes = writer.into_inner().map_err(|e| e.to_string())?;
    String::from_utf8(bytes).map_err(|e| e.to_string())
}

/// The header of a rendering: the configured columns, or every key of every object row, sorted.
fn columns(rows: &[Value], layout: &Layout) -> Vec<String> {
    if let Some(columns) = &layout.columns {
        return columns.clone();
    }
    let keys: BTreeSet<&String> = rows
        .iter()
        .filter_map(Value::as_object)
        .flat_map(Map::keys)
        .collect();
    keys.into_iter().cloned().collect()
}

/// One field's text: strings as they are, `null` empty, other values as JSON.
fn field(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn layout(header: bool) -> Layout {
        Layout {
            delimiter: b',',
            header,
            columns: None,
        }
    }

    #[test]
    fn header_rows_become_objects_of_strings() {
        let text = b"sku,qty,note\nA-1,007,\"a, quoted\"\"note\"\"\"\nB-2,3,\n";
        assert_eq!(
            parse(text, &layout(true)).unwrap(),
            json!([
                {"sku": "A-1", "qty": "007", "note": "a, quoted\"note\""},
                {"sku": "B-2", "qty": "3", "note": ""}
            ])
        );
        assert_eq!(parse(b"", &layout(true)).unwrap(), json!([]));
        assert_eq!(parse(b"a,b\n", &layout(true)).unwrap(), json!([]));
    }

    #[test]
    fn without_a_header_rows_are_arrays_and_may_be_ragged() {
        let semi = Layout {
            delimiter: b';',
            ..layout(false)
        };
        assert_eq!(
            parse(b"1;2;3\r\n4;5\n", &semi).unwrap(),
            json!([["1", "2", "3"], ["4", "5"]])
        );
    }

    #[test]
    fn ragged_rows_under_a_header_name_the_record_and_line() {
        let e = parse(b"a,b\n1,2\n3\n", &layout(true)).unwrap_err();
        assert!(
            e.starts_with("record 3 (line 3): has 1 fields but the header has 2"),
            "{e}"
        );
        let e = parse(b"a\n\xff\n", &layout(true)).unwrap_err();
        assert!(
            e.contains("record 2 (line 2)") && e.contains("UTF-8"),
            "{e}"
        );
    }

    #[test]
    fn renders_objects_with_a_header_and_round_trips() {
        let rows = json!([
            {"sku": "A-1", "qty": 2, "note": "a, b"},
            {"sku": "B-2", "ok": true, "note": null, "tags": [1]}
        ]);
        let text = render(&rows, &layout(true)).unwrap();
        assert_eq!(
            text,
            "note,ok,qty,sku,tags\n\"a, b\",,2,A-1,\n,true,,B-2,[1]\n"
        );
        let back = parse(text.as_bytes(), &layout(true)).unwrap();
        assert_eq!(back[0]["note"], "a, b");
        assert_eq!(back[1]["tags"], "[1]");
    }

    #[test]
    fn renders_chosen_columns_arrays_and_single_objects() {
        let chosen = Layout {
            columns: Some(vec!["qty".into(), "sku".into()]),
            delimiter: b'\t',
            header: true,
        };
        assert_eq!(
            render(&json!({"sku": "A", "qty": 1, "extra": 0}), &chosen).unwrap(),
            "qty\tsku\n1\tA\n"
        );
        assert_eq!(
            render(&json!([["a", 1], ["b"]]), &layout(false)).unwrap(),
            "a,1\nb\n"
        );
        assert!(
            render(&json!("x"), &layout(true))
                .unwrap_err()
                .contains("a string")
        );
        assert!(
            render(&json!([1]), &layout(true))
                .unwrap_err()
                .contains("row 0 is a number")
        );
    }
}
