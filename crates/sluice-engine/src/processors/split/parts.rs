//! Finding the parts of a body: one pass that validates the whole body and records where each part
//! is (a byte range, or a JSON value), then an iterator that builds the parts' bodies one by one.
//!
//! Validating first means a malformed body fails the step before any part is emitted, and the
//! number of parts (`sluice.split.size`) is known for every format. The index costs 16 bytes a
//! part for text formats; the bodies of text parts are zero-copy slices of the source body.

use std::ops::Range;

use bytes::Bytes;
use serde_json::{Map, Value};
use sluice_core::{Body, ProcessError};

/// How text parts are found, for the formats that work on bytes.
#[derive(Debug, Clone)]
pub(crate) enum TextFormat {
    /// One part per non-blank line.
    Lines,
    /// A header row, then one JSON object per record.
    Csv { delimiter: u8 },
    /// One part per (outermost) element with this local name.
    Xml { element: String },
}

/// The parts of one body, built on demand.
pub(crate) enum Parts {
    /// Values already computed (JSON splits).
    Values(std::vec::IntoIter<Value>),
    /// Byte ranges of the body.
    Spans {
        bytes: Bytes,
        spans: std::vec::IntoIter<Range<usize>>,
        /// The CSV header, when each span is a CSV record to turn into an object.
        csv: Option<(Vec<String>, u8)>,
    },
}

impl Parts {
    /// How many parts are left.
    pub(crate) fn len(&self) -> usize {
        match self {
            Parts::Values(values) => values.len(),
            Parts::Spans { spans, .. } => spans.len(),
        }
    }
}

impl Iterator for Parts {
    type Item = Body;

    fn next(&mut self) -> Option<Body> {
        match self {
            Parts::Values(values) => values.next().map(Body::from_json),
            Parts::Spans { bytes, spans, csv } => {
                let span = spans.next()?;
                Some(match csv {
                    None => Body::from_bytes(bytes.slice(span)),
                    Some((header, delimiter)) => {
                        // The span was parsed once already; it parses the same way again.
                        let text = std::str::from_utf8(&bytes[span]).unwrap_or_default();
                        let mut cursor = CsvCursor::new(text, *delimiter);
                        let fields = cursor.record().ok().flatten().unwrap_or_default();
                        Body::from_json(csv_object(header, fields))
                    }
                })
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.len();
        (n, Some(n))
    }
}

impl ExactSizeIterator for Parts {}

/// The error for a body with more than `max_parts` parts.
pub(crate) fn too_many(max_parts: usize) -> ProcessError {
    ProcessError::invalid_input(format!(
        "the body splits into more than {max_parts} parts; raise `max_parts` or split it upstream"
    ))
}

/// Indexes the parts of `bytes` in `format`.
pub(crate) fn index(
    bytes: Bytes,
    format: &TextFormat,
    max_parts: usize,
) -> Result<Parts, ProcessError> {
    let (spans, csv) = match format {
        TextFormat::Lines => (line_spans(&bytes, max_parts)?, None),
        TextFormat::Csv { delimiter } => {
            let (header, spans) = csv_spans(&bytes, *delimiter, max_parts)?;
            (spans, Some((header, *delimiter)))
        }
        TextFormat::Xml { element } => (xml_spans(&bytes, element, max_parts)?, None),
    };
    Ok(Parts::Spans {
        bytes,
        spans: spans.into_iter(),
        csv,
    })
}

/// The values of a JSON split, checked against `max_parts`.
pub(crate) fn values(values: Vec<Value>, max_parts: usize) -> Result<Parts, ProcessError> {
    if values.len() > max_parts {
        return Err(too_many(max_parts));
    }
    Ok(Parts::Values(values.into_iter()))
}

fn push_span(
    spans: &mut Vec<Range<usize>>,
    span: Range<usize>,
    max_parts: usize,
) -> Result<(), ProcessError> {
    if spans.len() == max_parts {
        return Err(too_many(max_parts));
    }
    spans.push(span);
    Ok(())
}

/// Non-blank lines, without their `\n` or `\r\n`.
fn line_spans(bytes: &[u8], max_parts: usize) -> Result<Vec<Range<usize>>, ProcessError> {
    let mut spans = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        let end = bytes[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |i| start + i);
        let mut line_end = end;
        if line_end > start && bytes[line_end - 1] == b'\r' {
            line_end -= 1;
        }
        if !bytes[start..line_end].iter().all(u8::is_ascii_whitespace) {
            push_span(&mut spans, start..line_end, max_parts)?;
        }
        start = end + 1;
    }
    Ok(spans)
}

/// Reads CSV records (RFC 4180: fields may be quoted with `"`, a quote inside is doubled, quoted
/// fields may hold delimiters and line breaks) from a string, tracking line numbers for errors.
struct CsvCursor<'a> {
    text: &'a str,
    pos: usize,
    line: usize,
    delimiter: u8,
}

impl<'a> CsvCursor<'a> {
    fn new(text: &'a str, delimiter: u8) -> Self {
        CsvCursor {
            text,
            pos: 0,
            line: 1,
            delimiter,
        }
    }

    /// Skips blank lines; whether a record follows.
    fn skip_blank_lines(&mut self) -> bool {
        let bytes = self.text.as_bytes();
        while self.pos < bytes.len() && matches!(bytes[self.pos], b'\n' | b'\r') {
            if bytes[self.pos] == b'\n' {
                self.line += 1;
            }
            self.pos += 1;
        }
        self.pos < bytes.len()
    }

    /// The next record's fields, or `None` at the end; errors name the line.
    fn record(&mut self) -> Result<Option<Vec<String>>, String> {
        if !self.skip_blank_lines() {
            return Ok(None);
        }
        let bytes = self.text.as_bytes();
        let mut fields = Vec::new();
        loop {
            let mut field = String::new();
            if bytes.get(self.pos) == Some(&b'"') {
                let opened_on = self.line;
                self.pos += 1;
                loop {
                    let Some(close) = bytes[self.pos..].iter().position(|&b| b == b'"') else {
                        return Err(format!(
                            "line {opened_on}: a quoted field is never closed; close it with `\"`"
                        ));
                    };
                    let chunk = &self.text[self.pos..self.pos + close];
                    self.line += chunk.matches('\n').count();
                    field.push_str(chunk);
                    self.pos += close + 1;
                    if bytes.get(self.pos) == Some(&b'"') {
                        field.push('"');
                        self.pos += 1;
                    } else {
                        break;
                    }
                }
                if let Some(&b) = bytes.get(self.pos)
                    && b != self.delimiter
                    && b != b'\n'
                    && b != b'\r'
                {
                    return Err(format!(
                        "line {}: unexpected `{}` after a closing quote; double a quote inside a \
quoted field (`\"\"`)",
                        self.line,
                        char::from(b)
                    ));
                }
            } else {
                let end = bytes[self.pos..]
                    .iter()
                    .position(|&b| b == self.delimiter || b == b'\n' || b == b'\r')
                    .map_or(bytes.len(), |i| self.pos + i);
                field.push_str(&self.text[self.pos..end]);
                self.pos = end;
            }
            fields.push(field);
            match bytes.get(self.pos) {
                None => break,
                Some(&b) if b == self.delimiter => self.pos += 1,
                Some(b'\r') => {
                    self.pos += 1;
                    if bytes.get(self.pos) == Some(&b'\n') {
                        self.pos += 1;
                    }
                    self.line += 1;
                    break;
                }
                Some(_) => {
                    self.pos += 1;
                    self.line += 1;
                    break;
                }
            }
        }
        Ok(Some(fields))
    }
}

/// The header and the byte ranges of the records, every record checked.
fn csv_spans(
    bytes: &[u8],
    delimiter: u8,
    max_parts: usize,
) -> Result<(Vec<String>, Vec<Range<usize>>), ProcessError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        ProcessError::invalid_input(format!("csv line {line}: the body is not valid UTF-8"))
    })?;
    let invalid = |detail: String| ProcessError::invalid_input(format!("csv {detail}"));
    let mut cursor = CsvCursor::new(text, delimiter);
    let Some(header) = cursor.record().map_err(invalid)? else {
        return Ok((Vec::new(), Vec::new()));
    };
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = header.iter().find(|name| !seen.insert(name.as_str())) {
        return Err(invalid(format!(
            "line 1: the header names column `{dup}` twice; give every column a distinct name"
        )));
    }
    let mut spans = Vec::new();
    loop {
        cursor.skip_blank_lines();
        let (start, line) = (cursor.pos, cursor.line);
        let Some(fields) = cursor.record().map_err(invalid)? else {
            break;
        };
        if fields.len() != header.len() {
            return Err(invalid(format!(
                "record {} (line {line}) has {} fields but the header has {}",
                spans.len() + 1,
                fields.len(),
                header.len()
            )));
        }
        push_span(&mut spans, start..cursor.pos, max_parts)?;
    }
    Ok((header, spans))
}

fn csv_object(header: &[String], fields: Vec<String>) -> Value {
    let object: Map<String, Value> = header
        .iter()
        .cloned()
        .zip(fields.into_iter().map(Value::String))
        .collect();
    Value::Object(object)
}

/// The byte ranges of the outermost elements named `element` (local name, any prefix).
fn xml_spans(
    bytes: &[u8],
    element: &str,
    max_parts: usize,
) -> Result<Vec<Range<usize>>, ProcessError> {
    use quick_xml::events::Event;

    let mut reader = quick_xml::Reader::from_reader(bytes);
    let xml_error = |reader: &quick_xml::Reader<&[u8]>, e: quick_xml::Error| {
        let at = usize::try_from(reader.error_position()).unwrap_or(usize::MAX);
        let line = 1 + bytes[..at.min(bytes.len())]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        ProcessError::invalid_input(format!("xml line {line} (byte {at}): {e}"))
    };
    let position = |reader: &quick_xml::Reader<&[u8]>| {
        usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX)
    };
    let mut spans = Vec::new();
    loop {
        let start = position(&reader);
        let event = match reader.read_event() {
            Ok(event) => event,
            Err(e) => return Err(xml_error(&reader, e)),
        };
        match event {
            Event::Eof => break,
            Event::Empty(e) if e.local_name().into_inner() == element.as_bytes() => {
                push_span(&mut spans, start..position(&reader), max_parts)?;
            }
            Event::Start(e) if e.local_name().into_inner() == element.as_bytes() => {
                let end = e.to_end().into_owned();
                if let Err(e) = reader.read_to_end(end.name()) {
                    return Err(xml_error(&reader, e));
                }
                push_span(&mut spans, start..position(&reader), max_parts)?;
            }
            _ => {}
        }
    }
    Ok(spans)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn texts(bytes: &'static [u8], format: &TextFormat) -> Vec<String> {
        index(Bytes::from_static(bytes), format, 100)
            .unwrap()
            .map(|b| b.to_text())
            .collect()
    }

    #[test]
    fn lines_skip_blank_ones_and_strip_line_ends() {
        let lines = texts(b"a\r\n\n  \nb\nc", &TextFormat::Lines);
        assert_eq!(lines, ["a", "b", "c"]);
        assert!(texts(b"\n\n", &TextFormat::Lines).is_empty());
    }

    #[test]
    fn csv_records_become_objects() {
        let format = TextFormat::Csv { delimiter: b';' };
        let parts: Vec<Value> = index(
            Bytes::from_static(b"id;note\r\n1;\"a;b\"\n\n2;\"say \"\"hi\"\"\nthere\"\n3;\n"),
            &format,
            10,
        )
        .unwrap()
        .map(|b| b.json().unwrap().clone())
        .collect();
        assert_eq!(
            parts,
            [
                json!({"id": "1", "note": "a;b"}),
                json!({"id": "2", "note": "say \"hi\"\nthere"}),
                json!({"id": "3", "note": ""}),
            ]
        );
    }

    #[test]
    fn csv_errors_name_the_record_and_line() {
        let format = TextFormat::Csv { delimiter: b',' };
        let e = index(Bytes::from_static(b"a,b\n1,2\n\n3\n"), &format, 10)
            .err()
            .unwrap();
        assert!(
            e.detail.contains("record 2 (line 4) has 1 fields"),
            "{}",
            e.detail
        );
        let e = index(Bytes::from_static(b"a\n\"open\n"), &format, 10)
            .err()
            .unwrap();
        assert!(e.detail.contains("line 2: a quoted field"), "{}", e.detail);
        let e = index(Bytes::from_static(b"a,a\n"), &format, 10)
            .err()
            .unwrap();
        assert!(e.detail.contains("column `a` twice"), "{}", e.detail);
    }

    #[test]
    fn xml_takes_outermost_matching_elements_verbatim() {
        let format = TextFormat::Xml {
            element: "item".into(),
        };
        let parts = texts(
            b"<o:list xmlns:o=\"u\"><o:item id=\"1\"><item/></o:item>\n<other/><item id=\"2\"/></o:list>",
            &format,
        );
        assert_eq!(
            parts,
            ["<o:item id=\"1\"><item/></o:item>", "<item id=\"2\"/>"]
        );
    }

    #[test]
    fn malformed_xml_names_the_line() {
        let format = TextFormat::Xml {
            element: "item".into(),
        };
        let e = index(Bytes::from_static(b"<list>\n<item></list>"), &format, 10)
            .err()
            .unwrap();
        assert!(e.detail.starts_with("xml line 2"), "{}", e.detail);
    }

    #[test]
    fn max_parts_is_enforced_while_indexing() {
        let e = index(Bytes::from_static(b"1\n2\n3\n"), &TextFormat::Lines, 2)
            .err()
            .unwrap();
        assert!(e.detail.contains("more than 2 parts"), "{}", e.detail);
        assert!(values(vec![json!(1); 3], 2).is_err());
    }
}
