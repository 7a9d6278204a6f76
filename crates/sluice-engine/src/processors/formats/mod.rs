//! Text formats and the two steps that convert between them and JSON: `parse` (format -> JSON)
//! and `render` (JSON -> format). One module per format holds its conversion and convention.

mod csv;
mod form;
pub(crate) mod parse;
pub(crate) mod render;
mod xml;

use serde::Deserialize;
use serde_json::Value;
use sluice_core::BuildError;
use sluice_core::spec::{FieldSpec, FieldType};
use sluice_core::{Body, Failure, Message, Outputs, ProcessError};

use crate::processors::common;

/// The formats both steps know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Format {
    Csv,
    Xml,
    Form,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Csv => "CSV",
            Format::Xml => "XML",
            Format::Form => "a form",
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Csv => csv::CONTENT_TYPE,
            Format::Xml => xml::CONTENT_TYPE,
            Format::Form => form::CONTENT_TYPE,
        }
    }

    /// The format a content type names, if it is one of ours (`text/csv; charset=utf-8` is CSV).
    pub(crate) fn from_content_type(content_type: &str) -> Option<Format> {
        match common::media_type(content_type).as_str() {
            "text/csv" | "application/csv" => Some(Format::Csv),
            "application/xml" | "text/xml" => Some(Format::Xml),
            s if s.ends_with("+xml") => Some(Format::Xml),
            "application/x-www-form-urlencoded" => Some(Format::Form),
            _ => None,
        }
    }
}

/// The configuration shared by `parse` and `render`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    format: Format,
    delimiter: Option<String>,
    header: Option<bool>,
    columns: Option<Vec<String>>,
    root: Option<String>,
}

/// The options of one format, checked at build time.
#[derive(Debug, Clone)]
pub(crate) enum Options {
    Csv(csv::Layout),
    Xml { root: Option<String> },
    Form,
}

impl Config {
    /// Checks that only the options of the chosen format are set; `rendering` allows the
    /// options that only `render` reads (`columns`, `root`).
    pub(crate) fn options(self, rendering: bool) -> Result<Options, BuildError> {
        let only = |field: &str, set: bool, format: &str| {
            if set {
                Err(BuildError::field(
                    field,
                    format!("`{field}` applies to `format: {format}` only"),
                ))
            } else {
                Ok(())
            }
        };
        let render_only = |field: &str, set: bool| {
            if set && !rendering {
                Err(BuildError::field(
                    field,
                    format!("`{field}` applies to `render` only"),
                ))
            } else {
                Ok(())
            }
        };
        render_only("columns", self.columns.is_some())?;
        render_only("root", self.root.is_some())?;
        if self.format != Format::Csv {
            only("delimiter", self.delimiter.is_some(), "csv")?;
            only("header", self.header.is_some(), "csv")?;
            only("columns", self.columns.is_some(), "csv")?;
        }
        if self.format != Format::Xml {
            only("root", self.root.is_some(), "xml")?;
        }
        Ok(match self.format {
            Format::Csv => Options::Csv(csv::Layout {
                delimiter: delimiter(self.delimiter.as_deref())?,
                header: self.header.unwrap_or(true),
                columns: self.columns,
            }),
            Format::Xml => Options::Xml { root: self.root },
            Format::Form => Options::Form,
        })
    }
}

fn delimiter(text: Option<&str>) -> Result<u8, BuildError> {
    match text {
        None => Ok(b','),
        Some(s) if s.len() == 1 && s.is_ascii() && s != "\"" && s != "\n" => Ok(s.as_bytes()[0]),
        Some(s) => Err(BuildError::field(
            "delimiter",
            format!(
                "`{}` is not one ASCII character (other than a quote or a newline); for a tab write \"\\t\" in double quotes",
                s.escape_debug()
            ),
        )),
    }
}

impl Options {
    fn format(&self) -> Format {
        match self {
            Options::Csv(_) => Format::Csv,
            Options::Xml { .. } => Format::Xml,
            Options::Form => Format::Form,
        }
    }

    /// Parses text of this format into JSON; the error says where and why.
    pub(crate) fn parse(&self, bytes: &[u8]) -> Result<Value, String> {
        // Spreadsheets and Windows tools start UTF-8 files with a byte order mark; it is not
        // part of the first column's name.
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        match self {
            Options::Csv(layout) => csv::parse(bytes, layout),
            Options::Xml { .. } => {
                let text = std::str::from_utf8(bytes)
                    .map_err(|e| format!("the body is not UTF-8: {e}"))?;
                xml::parse(text)
            }
            Options::Form => Ok(form::parse(bytes)),
        }
    }

    /// Renders JSON as text of this format.
    pub(crate) fn render(&self, value: &Value) -> Result<String, String> {
        match self {
            Options::Csv(layout) => csv::render(value, layout),
            Options::Xml { root } => xml::render(value, root.as_deref()),
            Options::Form => form::render(value),
        }
    }

    /// Puts a conversion's result in place of the body, labelled with `content_type`, or
    /// hands the message back with an `invalid_input` error naming the format. `parse` and
    /// `render` share it so both keep everything but the body and fail in the same words.
    // The message is moved in and out so the error path can return it inside the `Failure`.
    #[allow(clippy::result_large_err)]
    fn replace_body(
        &self,
        mut msg: Message,
        verb: &str,
        converted: Result<Body, String>,
        content_type: &str,
    ) -> Result<Outputs, Failure> {
        match converted {
            Ok(body) => {
                msg.body = body;
                msg.headers
                    .insert("content-type".to_owned(), content_type.to_owned());
                Ok(common::one(msg))
            }
            Err(e) => {
                let detail = format!("cannot {verb} the body as {}: {e}", self.format().name());
                Err(Failure::new(msg, ProcessError::invalid_input(detail)))
            }
        }
    }

    /// The options for reading `format` with every option at its default.
    pub(crate) fn default_for(format: Format) -> Options {
        match format {
            Format::Csv => Options::Csv(csv::Layout {
                delimiter: b',',
                header: true,
                columns: None,
            }),
            Format::Xml => Options::Xml { root: None },
            Format::Form => Options::Form,
        }
    }
}

/// The fields both specs share; `rendering` adds `columns` and `root`. The CSV options state
/// their defaults in prose, not as spec defaults: the loader would fill them in for every
/// format, and they are refused for the others.
fn fields(rendering: bool) -> Vec<FieldSpec> {
    let mut fields = vec![
        FieldSpec::new(
            "format",
            FieldType::Enum(vec!["csv", "xml", "form"]),
            "The text format: `csv`, `xml` or `form` (application/x-www-form-urlencoded).",
        )
        .required(),
        FieldSpec::new(
            "delimiter",
            FieldType::String,
            "CSV only: the field separator, one ASCII character (`\"\\t\"` for tab); default `,`.",
        ),
        FieldSpec::new(
            "header",
            FieldType::Bool,
            "CSV only: whether the first row names the columns (records are objects) or not (records are arrays); default `true`.",
        ),
    ];
    if rendering {
        fields.push(FieldSpec::new(
            "columns",
            FieldType::List(Box::new(FieldType::String)),
            "CSV only: the columns written for object rows, in order; default: every key of every row, sorted.",
        ));
        fields.push(FieldSpec::new(
            "root",
            FieldType::String,
            "XML only: the root element's name; the body is its content. Without it the body must be `{root_name: content}`.",
        ));
    }
    fields
}

/// The XML convention, shared by both specs' descriptions.
macro_rules! xml_convention {
    () => {
        "**XML convention.** The document `<order>..</order>` is the JSON \
object `{\"order\": ...}` (one member, named after the root element). An element with neither \
attributes nor child elements is its text, as a string (`\"\"` when empty). Any other element is \
an object: attributes as `\"@name\"`, child elements under their names, and its text as \
`\"#text\"`. A child element that occurs more than once becomes an array in document order; one \
that occurs once is **not** an array (normalize with \
`(.item | if type == \"array\" then . else [.] end)`). All values are strings; whitespace around \
text is trimmed and whitespace-only text dropped; comments, processing instructions and the \
DOCTYPE are skipped; names keep their namespace prefix (`soap:Body`), and namespace declarations \
are ordinary attributes (`@xmlns:soap`). Entities other than the five predefined ones and \
character references are refused, and so is nesting deeper than 128 elements."
    };
}
pub(crate) use xml_convention;
