//! The `file` sink: appends messages to one file, or writes one file per message atomically.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, Message, ProcessError, Sink};
use tokio::io::AsyncWriteExt;

use super::appender::{Appender, io_error};
use crate::template::Template;

const DESCRIPTION: &str = "\
Writes message bodies to local files.

**append** (default): `path` is a file; each message's body followed by `separator` is appended \
whole, so messages never interleave. One writer thread owns the file and writes the records of \
concurrent deliveries together (up to 256 records or 1 MiB per write, one fsync per write with \
`fsync: true`); each delivery returns once the write holding its record returned. Parent \
directories are created.

**per_message**: `path` is a directory; each message becomes one file named by `name`, with the \
placeholders `{id}` (message id), `{timestamp}` (RFC 3339 UTC with `:` replaced by `-`) and \
`{header.<name>}`. The body is written to a hidden temporary file in the same directory \
(`.<name>.tmp-<uuid>`) and renamed into place, so a file under its final name is always \
complete (a `file` source watching that directory ignores the hidden temporary files). A file \
of the same name is replaced.

**Delivery guarantee.** at-least-once: a message is committed once its write returned (and, \
with `fsync: true`, reached the disk; without it, a power loss can lose recent writes that the \
source already saw acknowledged). A redelivered message is appended again; per_message files \
named by `{id}` are simply rewritten.

**Limits.** A rendered `name` may not contain `/`, `\\\\` or be `.`/`..` (the message fails with \
invalid_input), so headers cannot steer writes outside `path`. Write errors fail the message \
with kind `io`, naming the path.";

/// The `file` sink's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new("file", ComponentKind::Sink, "Append messages to a file, or write one file per message")
        .description(DESCRIPTION)
        .field(
            FieldSpec::new("path", FieldType::String, "The file to append to (`append`), or the directory to write files in (`per_message`).")
                .required(),
        )
        .field(
            FieldSpec::new("mode", FieldType::Enum(vec!["append", "per_message"]), "Append to one file, or one file per message.")
                .default_value("append"),
        )
        .field(FieldSpec::new("name", FieldType::String, "File name template for `per_message`: `{id}`, `{timestamp}`, `{header.<name>}`; default `{id}.json`."))
        .field(
            FieldSpec::new("fsync", FieldType::Bool, "Flush each write to disk before the message counts as delivered (slower, survives power loss).")
                .default_value(false),
        )
        .field(
            FieldSpec::new("content", FieldType::Enum(vec!["body", "envelope"]), "What is written: the body as it is, or an envelope `{\"id\", \"created_at\", \"headers\", \"body\"}` as one line of JSON (the body as JSON, or as a string when it is not JSON), which keeps the headers: use it for dead letters.")
                .default_value("body"),
        )
        .field(
            FieldSpec::new("separator", FieldType::String, "Written after each message in `append` mode.")
                .default_value("\n"),
        )
        .example("Append every event as a line of JSON", "path: /var/log/sluice/events.jsonl\nfsync: true\n")
        .example(
            "One file per order, named by its id header",
            "path: ./outbox\nmode: per_message\nname: \"order-{header.order_id}-{timestamp}.json\"\n",
        )
}

/// Append or per-message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One file, appended to.
    Append,
    /// One file per message.
    PerMessage,
}

/// Configuration of the `file` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// File or directory.
    pub path: PathBuf,
    /// Append or per-message.
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// Name template (per_message).
    #[serde(default)]
    pub name: Option<String>,
    /// fsync each write.
    #[serde(default)]
    pub fsync: bool,
    /// Separator after each message (append).
    #[serde(default = "default_separator")]
    pub separator: String,
    /// The body alone, or an envelope with the headers.
    #[serde(default)]
    pub content: Content,
}

/// What the sink writes of a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    /// The body bytes.
    #[default]
    Body,
    /// One JSON object with id, creation time, headers and body.
    Envelope,
}

fn rfc3339(t: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The bytes written for `msg`.
fn payload(content: Content, msg: &Message) -> bytes::Bytes {
    match content {
        Content::Body => msg.body.as_bytes().clone(),
        Content::Envelope => {
            let body = match msg.body.json() {
                Ok(value) => value.clone(),
                Err(_) => Value::String(msg.body.to_text()),
            };
            let envelope = serde_json::json!({
                "id": msg.id().to_string(),
                "created_at": rfc3339(msg.meta.created_at),
                "headers": msg.headers,
                "body": body,
            });
            bytes::Bytes::from(envelope.to_string())
        }
    }
}

fn default_mode() -> Mode {
    Mode::Append
}
fn default_separator() -> String {
    "\n".into()
}

/// A built `file` sink.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    fsync: bool,
    content: Content,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Append(Appender),
    PerMessage { name: Template },
}

/// Builds a `file` sink.
pub fn build(config: &Value, _ctx: &BuildContext<'_>) -> Result<Arc<dyn Sink>, BuildError> {
    let c: FileSinkConfig = crate::config::parse(config)?;
    if c.path.as_os_str().is_empty() {
        return Err(BuildError::field(
            "path",
            "is empty; name a file or directory",
        ));
    }
    let kind = match c.mode {
        Mode::Append => {
            if c.name.is_some() {
                return Err(BuildError::field(
                    "name",
                    "only applies to `mode: per_message`; remove it or switch the mode",
                ));
            }
            Kind::Append(Appender::new(
                c.path.clone(),
                c.separator.into_bytes(),
                c.fsync,
            ))
        }
        Mode::PerMessage => {
            let text = c.name.unwrap_or_else(|| "{id}.json".to_owned());
            let name =
                Template::parse(&text).map_err(|e| BuildError::field("name", e.to_string()))?;
            for placeholder in name.placeholders() {
                if !(placeholder == "id"
                    || placeholder == "timestamp"
                    || placeholder
                        .strip_prefix("header.")
                        .is_some_and(|h| !h.is_empty()))
                {
                    return Err(BuildError::field(
                        "name",
                        format!(
                            "unknown placeholder `{{{placeholder}}}`; use `{{id}}`, `{{timestamp}}` or `{{header.<name>}}`"
                        ),
                    ));
                }
            }
            Kind::PerMessage { name }
        }
    };
    Ok(Arc::new(FileSink {
        path: c.path,
        fsync: c.fsync,
        content: c.content,
        kind,
    }))
}

#[async_trait]
impl Sink for FileSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        match &self.kind {
            Kind::Append(appender) => appender.append(payload(self.content, msg)).await,
            Kind::PerMessage { name } => self.write_one(msg, name).await,
        }
    }
}

impl FileSink {
    async fn write_one(&self, msg: &Message, name: &Template) -> Result<(), ProcessError> {
        let file_name = render_name(name, msg)?;
        let dir = &self.path;
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| io_error(dir, "creating directory", &e))?;
        let final_path = dir.join(&file_name);
        let temp_path = dir.join(format!(
            ".{file_name}.tmp-{}",
            uuid::Uuid::now_v7().simple()
        ));
        let body = payload(self.content, msg);
        let fsync = self.fsync;
        let result = async {
            let mut file = tokio::fs::File::create(&temp_path).await?;
            file.write_all(&body).await?;
            file.flush().await?;
            if fsync {
                file.sync_all().await?;
            }
            drop(file);
            tokio::fs::rename(&temp_path, &final_path).await?;
            if fsync {
                // The rename itself is durable only once the directory entry is on disk.
                let dir = tokio::fs::File::open(dir).await?;
                dir.sync_all().await?;
            }
            Ok::<_, std::io::Error>(())
        }
        .await;
        if let Err(e) = result {
            // Never leave the partial temporary file behind; it may not exist, which is fine.
            let _ = tokio::fs::remove_file(&temp_path).await;
            return Err(io_error(&final_path, "writing", &e));
        }
        Ok(())
    }
}

/// Renders the per-message file name, refusing names that would leave the directory.
pub fn render_name(name: &Template, msg: &Message) -> Result<String, ProcessError> {
    let rendered = name.render(|placeholder| match placeholder {
        "id" => Ok(msg.id().to_string()),
        "timestamp" => Ok(chrono::Utc::now()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            .replace(':', "-")),
        other => {
            let header = other.strip_prefix("header.").unwrap_or(other);
            msg.headers.get(header).cloned().ok_or_else(|| {
                ProcessError::invalid_input(format!(
                    "file name placeholder `{{{other}}}` needs the message header `{header}`, which is missing; set it before this sink or change `name`"
                ))
            })
        }
    })?;
    if rendered.is_empty()
        || rendered == "."
        || rendered == ".."
        || rendered.contains(['/', '\\', '\0'])
    {
        return Err(ProcessError::invalid_input(format!(
            "the file name `{rendered}` is not a plain file name; headers used in `name` may not contain `/` or `\\` or be `.`/`..`"
        )));
    }
    Ok(rendered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::ErrorKind;

    #[test]
    fn names_render_and_refuse_traversal() {
        let t = Template::parse("{header.kind}-{id}.json").unwrap();
        let msg = Message::bytes(&b"x"[..]).with_header("kind", "order");
        assert_eq!(
            render_name(&t, &msg).unwrap(),
            format!("order-{}.json", msg.id())
        );
        let evil = Message::bytes(&b"x"[..]).with_header("kind", "../../etc/passwd");
        assert_eq!(
            render_name(&t, &evil).unwrap_err().kind,
            ErrorKind::InvalidInput
        );
        let missing = Message::bytes(&b"x"[..]);
        let err = render_name(&t, &missing).unwrap_err();
        assert!(err.detail.contains("`kind`"), "{}", err.detail);
        let ts = render_name(&Template::parse("{timestamp}").unwrap(), &missing).unwrap();
        assert!(!ts.contains(':') && ts.ends_with('Z'), "{ts}");
    }
}
