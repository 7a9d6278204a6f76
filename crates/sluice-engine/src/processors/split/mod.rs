//! `split`: breaks one message into parts that continue one by one (EIP Splitter).

mod parts;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    BuildContext, BuildError, Dispatch, Failure, Message, Outputs, ProcessError, Processor,
};

use self::parts::{Parts, TextFormat};
use super::common;
use crate::flow::DEAD_LETTERED;

/// The part's position in the split, from 0.
pub const INDEX_HEADER: &str = "sluice.split.index";
/// How many parts the split produced.
pub const SIZE_HEADER: &str = "sluice.split.size";
/// The id of the message that was split: the same on every part.
pub const CORRELATION_HEADER: &str = "sluice.split.correlation";
/// `true` on the last part only.
pub const LAST_HEADER: &str = "sluice.split.last";

const DEFAULT_PATH: &str = ".[]";
const DEFAULT_STREAM_ABOVE: usize = 1_000;
const DEFAULT_MAX_PARTS: usize = 1_000_000;
const MAX_PARALLEL: i64 = 1_024;

/// The step's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "split",
        ComponentKind::Processor,
        "Break a message into parts (JSON array items, lines, CSV records, XML elements)",
    )
    .description(
        "Breaks one message into parts; each part continues through the rest of the flow on its \
own (EIP Splitter). `by` chooses how:\n\n\
* `json` (default): the outputs of the jq `path` (default `.[]`: the items of an array, or the \
values of an object) become JSON parts. A `path` other than `.[]` runs under the jq limits (at \
most 10,000 outputs, 16 MiB); `.[]` has no such limit.\n\
* `lines`: every non-blank line is a part (text, `content-type: text/plain`), without its `\\n` \
or `\\r\\n`.\n\
* `csv`: the first row is the header; every further record becomes a JSON object of strings \
keyed by column name. Fields may be quoted with `\"` (a quote inside is doubled; quoted fields \
may hold the delimiter and line breaks). Blank lines are skipped.\n\
* `xml`: every outermost element whose local name is `element` (any namespace prefix) becomes a \
part holding that element's text exactly as written (`content-type: application/xml`). \
Namespace declarations of enclosing elements are not copied into the part.\n\n\
**Headers.** Each part keeps the source's headers and metadata, gets a new id, and carries \
`sluice.split.index` (from 0), `sluice.split.size` (number of parts), \
`sluice.split.correlation` (the source message's id) and, on the last part only, \
`sluice.split.last: true`; `aggregate` with `on_split_complete: true` uses them to put the parts \
back together.\n\n\
**Acknowledgement.** Every part holds a share of the source's acknowledgement: the source is \
acked only once every part has been committed by every target (or dropped on purpose), and \
nacked if any part fails terminally. A body with no parts (an empty array, a body of blank \
lines, a CSV header without records) emits nothing and acks the source at once.\n\n\
**Validation first.** The whole body is read and checked before the first part is emitted, so \
malformed input fails the step with `invalid_input` and nothing downstream sees a part of it. \
Errors name where: the CSV line and record, the XML line and byte, the jq `path`. A body that \
is not JSON (for `by: json`), or that splits into more than `max_parts` parts, is \
`invalid_input` too.\n\n\
**Small and large splits.** A split of at most `stream_above` parts returns its parts as the \
step's outputs: the flow runs them one after the other, in order, through the rest of the \
steps; a failing part fails the step (the remaining parts are not run), and a request-reply \
caller receives the results of every part. A larger split is **streamed**: parts are built one \
at a time and sent through everything after this step (the rest of the flow, then the targets), \
with at most `parallel` parts in flight, so memory holds the source body, a 16-byte index entry \
per part (or the values for `by: json`) and `parallel` parts, not every part at once. Each \
streamed part gets the flow's error handling (`on_error`, `dead_letter`) on its own; the first \
part that fails terminally (not dead-lettered) stops the split: no further part is sent, parts \
in flight finish, and the step fails with that part's error (so the source message meets the \
flow's error handling too, and a request-reply caller hears of the failure). A streamed split \
replies nothing (its parts' results went to the targets). The source body itself is held whole \
(sources hand over complete bodies): streaming bounds the parts, not the input. With `parallel` above 1, parts may reach the targets \
out of order. Streamed parts leave the enclosing step (a `try` or `choice` around `split` does \
not see them), so keep large splits at the top level of a flow.",
    )
    .field(
        FieldSpec::new(
            "by",
            FieldType::Enum(vec!["json", "lines", "csv", "xml"]),
            "How the body is broken into parts.",
        )
        .default_value("json"),
    )
    .field(
        FieldSpec::new(
            "path",
            FieldType::Jq,
            "With `by: json`: the jq expression whose outputs are the parts.",
        )
        .default_value(DEFAULT_PATH),
    )
    .field(
        FieldSpec::new(
            "delimiter",
            FieldType::String,
            "With `by: csv`: the field delimiter, one ASCII character (`,`, `;`, `\\t`, `|`).",
        )
        .default_value(","),
    )
    .field(FieldSpec::new(
        "element",
        FieldType::String,
        "With `by: xml` (required there): the local name of the elements that become parts.",
    ))
    .field(
        FieldSpec::new(
            "stream_above",
            FieldType::Integer { min: Some(0), max: None },
            "Splits with more parts than this are streamed through the rest of the flow instead of returned as outputs.",
        )
        .default_value(DEFAULT_STREAM_ABOVE),
    )
    .field(
        FieldSpec::new(
            "parallel",
            FieldType::Integer { min: Some(1), max: Some(MAX_PARALLEL) },
            "For a streamed split: how many parts may be in flight at once.",
        )
        .default_value(1),
    )
    .field(
        FieldSpec::new(
            "max_parts",
            FieldType::Integer { min: Some(1), max: None },
            "The most parts one message may split into; more is `invalid_input`.",
        )
        .default_value(DEFAULT_MAX_PARTS),
    )
    .example("Each item of an order", "path: '.items[]'\n")
    .example(
        "Stream each line of a log file, four lines in flight at a time",
        "by: lines\nstream_above: 0\nparallel: 4\n",
    )
    .example("Each record of a semicolon-separated file", "by: csv\ndelimiter: ';'\n")
    .example("Each <order> element of an XML document", "by: xml\nelement: order\n")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum By {
    #[default]
    Json,
    Lines,
    Csv,
    Xml,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    by: By,
    path: Option<String>,
    delimiter: Option<String>,
    element: Option<String>,
    #[serde(default = "default_stream_above")]
    stream_above: usize,
    #[serde(default = "one")]
    parallel: usize,
    #[serde(default = "default_max_parts")]
    max_parts: usize,
}

// The defaults repeat the spec's, for configurations that did not go through validation (tests).
fn default_stream_above() -> usize {
    DEFAULT_STREAM_ABOVE
}
fn one() -> usize {
    1
}
fn default_max_parts() -> usize {
    DEFAULT_MAX_PARTS
}

/// Builds the step.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Processor>, BuildError> {
    let config: Config = common::config(config)?;
    // The loader fills in every default, so only a value other than the default is an error.
    let only_for = |field: &str, by: &str| {
        BuildError::field(
            field,
            format!("`{field}` applies only with `by: {by}`; remove it"),
        )
    };
    if config.by != By::Json
        && config
            .path
            .as_deref()
            .is_some_and(|p| p.trim() != DEFAULT_PATH)
    {
        return Err(only_for("path", "json"));
    }
    if config.by != By::Csv && config.delimiter.as_deref().is_some_and(|d| d != ",") {
        return Err(only_for("delimiter", "csv"));
    }
    if config.by != By::Xml && config.element.is_some() {
        return Err(only_for("element", "xml"));
    }
    let how = match config.by {
        By::Json => {
            let path = config.path.as_deref().unwrap_or(DEFAULT_PATH);
            if path.trim() == DEFAULT_PATH {
                How::Items
            } else {
                How::Path(ctx.steps.compile_jq("path", path)?)
            }
        }
        By::Lines => How::Text(TextFormat::Lines, "text/plain"),
        By::Csv => {
            let delimiter = match config.delimiter.as_deref().unwrap_or(",") {
                "\\t" => b'\t',
                d if d.len() == 1 && d.is_ascii() && !matches!(d, "\"" | "\n" | "\r") => {
                    d.as_bytes()[0]
                }
                _ => {
                    return Err(BuildError::field(
                        "delimiter",
                        "give one ASCII character other than a quote or a line break, such as `,` or `;`",
                    ));
                }
            };
            How::Text(TextFormat::Csv { delimiter }, "application/json")
        }
        By::Xml => match config.element {
            Some(element) if !element.is_empty() && !element.contains(['<', '>', ' ']) => {
                How::Text(TextFormat::Xml { element }, "application/xml")
            }
            Some(_) => {
                return Err(BuildError::field(
                    "element",
                    "give an element name without `<`, `>` or spaces, such as `order`",
                ));
            }
            None => {
                return Err(BuildError::field(
                    "element",
                    "`by: xml` needs `element`: the name of the elements to split on",
                ));
            }
        },
    };
    Ok(Arc::new(Split {
        how,
        stream_above: config.stream_above,
        parallel: config.parallel.clamp(1, MAX_PARALLEL as usize),
        max_parts: config.max_parts.max(1),
        downstream: Arc::clone(&ctx.downstream),
    }))
}

/// How parts are found.
enum How {
    /// The items of a JSON array (or values of an object): `.[]` without jq.
    Items,
    /// The outputs of a jq expression.
    Path(Arc<dyn JqProgram>),
    /// A text format, and the content type of its parts.
    Text(TextFormat, &'static str),
}

struct Split {
    how: How,
    stream_above: usize,
    parallel: usize,
    max_parts: usize,
    downstream: Arc<dyn Dispatch>,
}

/// What every part of one split is labelled with.
struct Labels {
    correlation: String,
    size: String,
    last: usize,
    content_type: &'static str,
}

impl Labels {
    fn apply(&self, mut part: Message, index: usize) -> Message {
        let headers = &mut part.headers;
        headers.insert(INDEX_HEADER.to_owned(), index.to_string());
        headers.insert(SIZE_HEADER.to_owned(), self.size.clone());
        headers.insert(CORRELATION_HEADER.to_owned(), self.correlation.clone());
        if index == self.last {
            headers.insert(LAST_HEADER.to_owned(), "true".to_owned());
        } else {
            headers.remove(LAST_HEADER);
        }
        headers.insert("content-type".to_owned(), self.content_type.to_owned());
        part.meta
            .correlation_id
            .get_or_insert_with(|| self.correlation.clone());
        part
    }
}

impl Split {
    async fn parts(&self, msg: &Message) -> Result<Parts, ProcessError> {
        let not_json = |e: sluice_core::message::NotJson| {
            ProcessError::invalid_input(format!("`by: json` needs a JSON body: {e}"))
        };
        match &self.how {
            How::Items => {
                let body = msg.body.json().map_err(not_json)?;
                let items = match body {
                    Value::Array(items) => items.clone(),
                    Value::Object(map) => map.values().cloned().collect(),
                    other => {
                        return Err(ProcessError::invalid_input(format!(
                            "`path` `.[]` needs an array or an object, the body is {}; set `path` \
to where the items are, such as `.items[]`",
                            common::value_kind(other)
                        )));
                    }
                };
                parts::values(items, self.max_parts)
            }
            How::Path(program) => {
                let body = msg.body.json_shared().map_err(not_json)?;
                let values = program.run(body, msg).await.map_err(|e| {
                    ProcessError::invalid_input(format!(
                        "`path` (`{}`) does not fit this body: {}",
                        program.source(),
                        e.detail
                    ))
                })?;
                parts::values(values, self.max_parts)
            }
            How::Text(format, _) => {
                parts::index(msg.body.as_bytes().clone(), format, self.max_parts)
            }
        }
    }

    fn content_type(&self) -> &'static str {
        match &self.how {
            How::Text(_, content_type) => content_type,
            How::Items | How::Path(_) => "application/json",
        }
    }

    /// Sends the parts through the rest of the flow, at most `parallel` at once. `source` keeps
    /// its own share until every part has been sent, so the source cannot be acked while parts
    /// are still to come.
    async fn stream(
        &self,
        source: Message,
        parts: Parts,
        labels: &Labels,
    ) -> Result<Outputs, Failure> {
        let size = parts.len();
        let mut in_flight = FuturesUnordered::new();
        let mut failed: Option<ProcessError> = None;
        for (index, body) in parts.enumerate() {
            while in_flight.len() >= self.parallel {
                if let Some((i, result)) = in_flight.next().await
                    && failed.is_none()
                {
                    failed = part_failure(i, size, result);
                }
            }
            // Stop sending once a part failed: the source will be redelivered anyway.
            if failed.is_some() {
                break;
            }
            let part = labels.apply(source.clone().derive(body), index);
            let downstream = Arc::clone(&self.downstream);
            in_flight.push(async move { (index, downstream.dispatch(part).await) });
        }
        while let Some((i, result)) = in_flight.next().await {
            if failed.is_none() {
                failed = part_failure(i, size, result);
            }
        }
        match failed {
            None => {
                source.ack();
                Ok(Outputs::new())
            }
            Some(error) => Err(Failure::new(source, error)),
        }
    }
}

/// The error a streamed part's terminal failure gives the split; `None` if the part succeeded or
/// its failure was handled (dead-lettered: the part is safe, the source may be acked).
fn part_failure(
    index: usize,
    size: usize,
    result: Result<Vec<Message>, Failure>,
) -> Option<ProcessError> {
    let failure = result.err()?;
    if failure.message.headers.contains_key(DEAD_LETTERED) {
        return None;
    }
    Some(ProcessError::new(
        failure.error.kind,
        format!("part {index} of {size} failed: {}", failure.error),
    ))
}

#[async_trait]
impl Processor for Split {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        let parts = match self.parts(&msg).await {
            Ok(parts) => parts,
            Err(e) => return Err(Failure::new(msg, e)),
        };
        let size = parts.len();
        if size == 0 {
            msg.ack();
            return Ok(Outputs::new());
        }
        let labels = Labels {
            correlation: msg.id().to_string(),
            size: size.to_string(),
            last: size - 1,
            content_type: self.content_type(),
        };
        if size > self.stream_above {
            return self.stream(msg, parts, &labels).await;
        }
        Ok(msg
            .split_into(parts)
            .into_iter()
            .enumerate()
            .map(|(index, part)| labels.apply(part, index))
            .collect())
    }
}
