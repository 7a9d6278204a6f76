//! The `log` sink (a tracing event per message) and the `stdout` sink (one line per message).

use std::io::Write as _;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, ErrorKind, Message, ProcessError, Sink};

/// Bodies longer than this are cut in log events.
pub const LOG_BODY_LIMIT: usize = 4096;

/// The `log` sink's spec.
pub fn log_spec() -> ComponentSpec {
    ComponentSpec::new(
        "log",
        ComponentKind::Sink,
        "Log each message as a structured event",
    )
    .description(
        "Emits one `tracing` event per message at `level`, with the fields `flow`, \
`message_id`, `body` (as text, cut at 4 KiB with `…` appended) and, with `headers: true`, \
`headers` (a JSON object). Where the event goes follows the runtime's log settings.\n\n\
**Delivery guarantee.** at-most-once for the log line (logging never fails a message; a dropped \
log line is not retried). Meant for debugging and audit trails that tolerate gaps.\n\n\
**Limits.** Header values may hold secrets (authorization); `headers` is off by default for \
that reason.",
    )
    .field(
        FieldSpec::new(
            "level",
            FieldType::Enum(vec!["trace", "debug", "info", "warn", "error"]),
            "Level of the event.",
        )
        .default_value("info"),
    )
    .field(
        FieldSpec::new("headers", FieldType::Bool, "Include the message headers.")
            .default_value(false),
    )
    .example("Log bodies at info", "level: info\n")
    .example("Debug with headers", "level: debug\nheaders: true\n")
}

/// The `stdout` sink's spec.
pub fn stdout_spec() -> ComponentSpec {
    ComponentSpec::new(
        "stdout",
        ComponentKind::Sink,
        "Write each message to standard output",
    )
    .description(
        "Writes each message as one line on standard output: the body followed by a newline \
(`format: body`), or a JSON object with `id`, `headers` and `body` (the body as JSON when it \
parses, else as a string) (`format: json`). Standard output is locked per message, so lines \
from concurrent flows never interleave.\n\n**Delivery guarantee.** at-least-once: the message \
is committed once the line is written and flushed; a write error (closed pipe) fails the \
message with kind `io`.\n\n**Limits.** A body containing newlines spans several lines in \
`body` format; use `json` for one line per message.",
    )
    .field(
        FieldSpec::new(
            "format",
            FieldType::Enum(vec!["body", "json"]),
            "`body`: the raw body; `json`: one JSON object per line.",
        )
        .default_value("body"),
    )
    .example("Print bodies", "format: body\n")
    .example("Print messages as JSON lines", "format: json\n")
}

/// Log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// trace
    Trace,
    /// debug
    Debug,
    /// info
    Info,
    /// warn
    Warn,
    /// error
    Error,
}

/// Configuration of the `log` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Level.
    #[serde(default = "default_level")]
    pub level: Level,
    /// Include headers.
    #[serde(default)]
    pub headers: bool,
}

fn default_level() -> Level {
    Level::Info
}

/// Output format of `stdout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// The raw body.
    Body,
    /// A JSON object per line.
    Json,
}

/// Configuration of the `stdout` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutConfig {
    /// Format.
    #[serde(default = "default_format")]
    pub format: Format,
}

fn default_format() -> Format {
    Format::Body
}

/// The `log` sink.
#[derive(Debug)]
pub struct LogSink {
    level: Level,
    headers: bool,
    flow: String,
}

/// Builds the `log` sink.
pub fn build_log(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Sink>, BuildError> {
    let c: LogConfig = crate::config::parse(config)?;
    Ok(Arc::new(LogSink {
        level: c.level,
        headers: c.headers,
        flow: ctx.flow.to_owned(),
    }))
}

/// The body as text, cut at `limit` bytes on a character boundary.
pub fn capped_text(msg: &Message, limit: usize) -> String {
    let mut text = msg.body.to_text();
    if text.len() > limit {
        let mut cut = limit;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

#[async_trait]
impl Sink for LogSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        let body = capped_text(msg, LOG_BODY_LIMIT);
        let id = msg.id().to_string();
        let headers = if self.headers {
            serde_json::to_string(&msg.headers).unwrap_or_default()
        } else {
            String::new()
        };
        let flow = self.flow.as_str();
        // tracing needs the level at compile time, hence one call per level.
        macro_rules! emit {
            ($level:ident) => {
                if self.headers {
                    tracing::$level!(target: "sluice::log", flow, message_id = %id, body = %body, headers = %headers, "message")
                } else {
                    tracing::$level!(target: "sluice::log", flow, message_id = %id, body = %body, "message")
                }
            };
        }
        match self.level {
            Level::Trace => emit!(trace),
            Level::Debug => emit!(debug),
            Level::Info => emit!(info),
            Level::Warn => emit!(warn),
            Level::Error => emit!(error),
        }
        Ok(())
    }
}

/// The `stdout` sink.
#[derive(Debug)]
pub struct StdoutSink {
    format: Format,
}

/// Builds the `stdout` sink.
pub fn build_stdout(config: &Value, _ctx: &BuildContext<'_>) -> Result<Arc<dyn Sink>, BuildError> {
    let c: StdoutConfig = crate::config::parse(config)?;
    Ok(Arc::new(StdoutSink { format: c.format }))
}

/// The bytes `stdout` writes for `msg`, newline included.
pub fn stdout_line(format: Format, msg: &Message) -> Vec<u8> {
    let mut line = match format {
        Format::Body => msg.body.as_bytes().to_vec(),
        Format::Json => {
            let body = msg
                .body
                .json()
                .cloned()
                .unwrap_or_else(|_| Value::String(msg.body.to_text()));
            let record = serde_json::json!({
                "id": msg.id().to_string(),
                "headers": msg.headers,
                "body": body,
            });
            serde_json::to_vec(&record).unwrap_or_default()
        }
    };
    line.push(b'\n');
    line
}

#[async_trait]
impl Sink for StdoutSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        let line = stdout_line(self.format, msg);
        // One locked write per message keeps lines whole when flows print concurrently.
        let mut out = std::io::stdout().lock();
        out.write_all(&line)
            .and_then(|()| out.flush())
            .map_err(|e| ProcessError::new(ErrorKind::Io, format!("writing to stdout failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdout_lines() {
        let msg = Message::bytes(&b"{\"a\":1}"[..]).with_header("k", "v");
        assert_eq!(stdout_line(Format::Body, &msg), b"{\"a\":1}\n");
        let line = stdout_line(Format::Json, &msg);
        assert_eq!(line.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["body"], serde_json::json!({"a": 1}));
        assert_eq!(v["headers"]["k"], "v");
        assert_eq!(v["id"], msg.id().to_string());
        let text = stdout_line(Format::Json, &Message::bytes(&b"plain"[..]));
        let v: Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(v["body"], "plain");
    }

    #[test]
    fn log_body_is_capped_on_a_char_boundary() {
        let msg = Message::bytes("é".repeat(3000).into_bytes());
        let text = capped_text(&msg, LOG_BODY_LIMIT);
        assert!(text.len() <= LOG_BODY_LIMIT + '…'.len_utf8());
        assert!(text.ends_with('…'));
        assert_eq!(
            capped_text(&Message::bytes(&b"short"[..]), LOG_BODY_LIMIT),
            "short"
        );
    }
}
