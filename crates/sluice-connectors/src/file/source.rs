//! The `file` source: polls a directory and turns each matching file into messages.
//!
//! **Architecture Invariant:** a file is never deleted or moved out of `processing_dir` before
//! its acknowledgement says every target committed it. A crash leaves it in `processing_dir`,
//! and the next start processes it again (at-least-once).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    AckToken, Body, BuildContext, BuildError, Message, Outcome, Source, SourceContext, SourceError,
};

use super::glob_match;
use sluice_core::bytesize::ByteSize;

const DESCRIPTION: &str = "\
Polls the directory `path` every `poll_interval` for regular files whose name matches \
`pattern` (hidden files, whose names start with `.`, and subdirectories are ignored), one file \
at a time in name order.

Each file is first **claimed** by renaming it into `processing_dir` (atomic on one filesystem), \
then read: in `whole` mode it becomes one message; in `lines` mode one message per non-empty \
line (a trailing `\\r` is removed), all sharing one acknowledgement. Headers: `file.name`, \
`file.path` (where the file was found), `file.size`, and in lines mode `file.line` (1-based).

When every message of the file is acknowledged (every target committed it), the file is moved \
to `done_dir` (renamed with a counter if a file of that name exists) or deleted, per \
`on_success`. If any message fails, the file is moved to `error_dir` with \
`<name>.error.json` beside it giving the reason.

**Delivery guarantee.** at-least-once: files left in `processing_dir` by a crash or a shutdown \
are processed again first when the flow starts, so their messages may be delivered twice; make \
targets idempotent (for example on `file.name`).

**Limits.** Files larger than `max_size` are moved to `error_dir` unread. `processing_dir`, \
`done_dir` and `error_dir` must be on the same filesystem as `path` (renames are used). One \
`file` source per directory. Symbolic links are not followed.";

/// The `file` source's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "file",
        ComponentKind::Source,
        "Pick up files from a directory, then move them to done or error",
    )
    .description(DESCRIPTION)
    .field(FieldSpec::new("path", FieldType::String, "Directory to watch; it must exist.").required())
    .field(
        FieldSpec::new("pattern", FieldType::String, "Glob on the file name (`*` any characters, `?` one character).")
            .default_value("*"),
    )
    .field(
        FieldSpec::new("mode", FieldType::Enum(vec!["whole", "lines"]), "`whole`: one message per file; `lines`: one message per non-empty line.")
            .default_value("whole"),
    )
    .field(
        FieldSpec::new("poll_interval", FieldType::Duration, "Time between directory listings.")
            .default_value("1s"),
    )
    .field(
        FieldSpec::new("on_success", FieldType::Enum(vec!["move", "delete"]), "What to do with a file once all its messages are committed.")
            .default_value("move"),
    )
    .field(FieldSpec::new("done_dir", FieldType::String, "Where processed files go with `on_success: move`; default `<path>/.done`."))
    .field(FieldSpec::new("error_dir", FieldType::String, "Where failed files go, each with a `<name>.error.json`; default `<path>/.error`."))
    .field(FieldSpec::new("processing_dir", FieldType::String, "Where files are claimed while their messages are in flight; default `<path>/.processing`."))
    .field(
        FieldSpec::new("max_size", FieldType::ByteSize, "Largest file read; larger files go to `error_dir`.")
            .default_value("64MiB"),
    )
    .example("CSV orders, one message per line", "path: /var/spool/orders\npattern: \"*.csv\"\nmode: lines\n")
    .example(
        "JSON documents, deleted once delivered",
        "path: ./inbox\npattern: \"*.json\"\non_success: delete\npoll_interval: 500ms\nerror_dir: ./failed\n",
    )
}

/// One message per file or per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The whole file.
    Whole,
    /// One message per non-empty line.
    Lines,
}

/// What happens to a committed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnSuccess {
    /// Move to `done_dir`.
    Move,
    /// Delete.
    Delete,
}

/// Configuration of the `file` source.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// Watched directory.
    pub path: PathBuf,
    /// Glob on names.
    #[serde(default = "default_pattern")]
    pub pattern: String,
    /// Whole or lines.
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// Poll period.
    #[serde(default = "default_poll")]
    pub poll_interval: HumanDuration,
    /// Move or delete.
    #[serde(default = "default_on_success")]
    pub on_success: OnSuccess,
    /// Done directory.
    #[serde(default)]
    pub done_dir: Option<PathBuf>,
    /// Error directory.
    #[serde(default)]
    pub error_dir: Option<PathBuf>,
    /// Processing directory.
    #[serde(default)]
    pub processing_dir: Option<PathBuf>,
    /// Largest file read.
    #[serde(default = "default_max_size")]
    pub max_size: ByteSize,
}

fn default_pattern() -> String {
    "*".into()
}
fn default_mode() -> Mode {
    Mode::Whole
}
fn default_poll() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(1))
}
fn default_on_success() -> OnSuccess {
    OnSuccess::Move
}
fn default_max_size() -> ByteSize {
    ByteSize(64 << 20)
}

/// A built `file` source.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    pattern: String,
    mode: Mode,
    poll: std::time::Duration,
    on_success: OnSuccess,
    done_dir: PathBuf,
    error_dir: PathBuf,
    processing_dir: PathBuf,
    max_size: u64,
}

/// Builds a `file` source.
pub fn build(config: &Value, _ctx: &BuildContext<'_>) -> Result<Box<dyn Source>, BuildError> {
    let c: FileSourceConfig = crate::config::parse(config)?;
    if c.path.as_os_str().is_empty() {
        return Err(BuildError::field(
            "path",
            "is empty; name the directory to watch",
        ));
    }
    if c.poll_interval.0.is_zero() {
        return Err(BuildError::field("poll_interval", "must be longer than 0s"));
    }
    if c.pattern.contains('/') {
        return Err(BuildError::field(
            "pattern",
            "matches file names only and may not contain `/`; point `path` at the directory instead",
        ));
    }
    Ok(Box::new(FileSource {
        done_dir: c.done_dir.unwrap_or_else(|| c.path.join(".done")),
        error_dir: c.error_dir.unwrap_or_else(|| c.path.join(".error")),
        processing_dir: c
            .processing_dir
            .unwrap_or_else(|| c.path.join(".processing")),
        dir: c.path,
        pattern: c.pattern,
        mode: c.mode,
        poll: c.poll_interval.0,
        on_success: c.on_success,
        max_size: c.max_size.0,
    }))
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> SourceError {
    move |source| SourceError::Io { context, source }
}

/// A claimed file, in `processing_dir`.
struct Claimed {
    /// Its name, as found.
    name: String,
    /// Where it was found.
    original: PathBuf,
    /// Where it is now.
    path: PathBuf,
}

#[async_trait]
impl Source for FileSource {
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        match tokio::fs::metadata(&self.dir).await {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(SourceError::Other(format!(
                    "`{}` is not a directory; point `path` at a directory",
                    self.dir.display()
                )));
            }
            Err(e) => {
                return Err(io_err(format!(
                    "watching `{}` (create the directory or fix `path`)",
                    self.dir.display()
                ))(e));
            }
        }
        for dir in [&self.processing_dir, &self.error_dir] {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(io_err(format!("creating `{}`", dir.display())))?;
        }
        if self.on_success == OnSuccess::Move {
            tokio::fs::create_dir_all(&self.done_dir)
                .await
                .map_err(io_err(format!("creating `{}`", self.done_dir.display())))?;
        }

        // Files a crash left behind come first: their messages may not have been committed.
        let leftovers = self.list(&self.processing_dir, false).await?;
        if !leftovers.is_empty() {
            tracing::info!(flow = %ctx.flow, count = leftovers.len(), dir = %self.processing_dir.display(), "reprocessing files left by an earlier run");
        }
        for name in leftovers {
            if ctx.shutdown.is_cancelled() {
                return Ok(());
            }
            let claimed = Claimed {
                original: self.dir.join(&name),
                path: self.processing_dir.join(&name),
                name,
            };
            self.process(&ctx, claimed).await;
        }

        loop {
            if ctx.shutdown.is_cancelled() {
                return Ok(());
            }
            match self.list(&self.dir, true).await {
                Ok(names) => {
                    for name in names {
                        if ctx.shutdown.is_cancelled() {
                            return Ok(());
                        }
                        if let Some(claimed) = self.claim(&ctx, name).await {
                            self.process(&ctx, claimed).await;
                        }
                    }
                }
                // A transient listing failure (the directory was briefly unavailable) is retried
                // at the next poll rather than stopping the flow.
                Err(error) => {
                    tracing::warn!(flow = %ctx.flow, %error, "listing the watched directory failed; retrying at the next poll");
                }
            }
            tokio::select! {
                () = ctx.shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(self.poll) => {}
            }
        }
    }
}

impl FileSource {
    /// Regular, non-hidden files in `dir` (matching the pattern if `filter`), sorted by name.
    async fn list(&self, dir: &Path, filter: bool) -> Result<Vec<String>, SourceError> {
        let mut entries = tokio::fs::read_dir(dir)
            .await
            .map_err(io_err(format!("listing `{}`", dir.display())))?;
        let mut names = Vec::new();
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(io_err(format!("listing `{}`", dir.display())))?
        {
            let Ok(name) = entry.file_name().into_string() else {
                tracing::warn!(dir = %dir.display(), "skipping a file whose name is not UTF-8");
                continue;
            };
            if name.starts_with('.') || (filter && !glob_match(&self.pattern, &name)) {
                continue;
            }
            match entry.file_type().await {
                Ok(t) if t.is_file() => names.push(name),
                _ => {}
            }
        }
        names.sort();
        Ok(names)
    }

    /// Renames the file into `processing_dir`; `None` if another process took it first.
    async fn claim(&self, ctx: &SourceContext, name: String) -> Option<Claimed> {
        let original = self.dir.join(&name);
        let path = unique_path(&self.processing_dir, &name).await;
        match tokio::fs::rename(&original, &path).await {
            Ok(()) => Some(Claimed {
                name,
                original,
                path,
            }),
            Err(error) => {
                tracing::warn!(flow = %ctx.flow, file = %original.display(), %error, "could not claim file; it stays where it is");
                None
            }
        }
    }

    /// Dispatches a claimed file's messages, waits for their outcome and files it away.
    async fn process(&self, ctx: &SourceContext, file: Claimed) {
        let outcome = match self.read(&file).await {
            Ok(bytes) => self.dispatch(ctx, &file, bytes).await,
            Err(reason) => Some(Outcome::Nack(reason.into())),
        };
        let Some(outcome) = outcome else {
            // Shutting down while the outcome is pending: the file stays claimed and is
            // processed again at the next start.
            return;
        };
        let result = match outcome {
            Outcome::Ack => match self.on_success {
                OnSuccess::Move => self.move_to(&file, &self.done_dir).await.map(|_| ()),
                OnSuccess::Delete => tokio::fs::remove_file(&file.path).await,
            },
            Outcome::Nack(reason) => {
                tracing::warn!(flow = %ctx.flow, file = %file.original.display(), reason = %reason, "file failed; moving it to the error directory");
                self.fail(&file, &reason).await
            }
        };
        if let Err(error) = result {
            tracing::error!(flow = %ctx.flow, file = %file.path.display(), %error, "could not file away a processed file; it stays in the processing directory and is processed again at the next start");
        }
    }

    async fn read(&self, file: &Claimed) -> Result<Bytes, String> {
        let meta = tokio::fs::metadata(&file.path)
            .await
            .map_err(|e| format!("cannot read `{}`: {e}", file.path.display()))?;
        if meta.len() > self.max_size {
            return Err(format!(
                "file is {} bytes, larger than `max_size` ({}); raise `max_size` or split the file",
                meta.len(),
                ByteSize(self.max_size)
            ));
        }
        let bytes = tokio::fs::read(&file.path)
            .await
            .map_err(|e| format!("cannot read `{}`: {e}", file.path.display()))?;
        // The file may have grown between the size check and the read.
        if bytes.len() as u64 > self.max_size {
            return Err(format!(
                "file is larger than `max_size` ({}); raise `max_size` or split the file",
                ByteSize(self.max_size)
            ));
        }
        Ok(Bytes::from(bytes))
    }

    /// `None` when shutdown came before the outcome.
    async fn dispatch(&self, ctx: &SourceContext, file: &Claimed, bytes: Bytes) -> Option<Outcome> {
        let (token, outcome) = AckToken::channel();
        let size = bytes.len().to_string();
        let base = |body: Body| {
            let mut msg = Message::new(body)
                .with_header("file.name", file.name.clone())
                .with_header("file.path", file.original.display().to_string())
                .with_header("file.size", size.clone());
            msg.meta.origin = Some(Arc::clone(&ctx.flow));
            msg
        };
        let messages: Vec<Message> = match self.mode {
            Mode::Whole => vec![base(Body::from_bytes(bytes)).with_ack(token.share())],
            Mode::Lines => bytes
                .split(|&b| b == b'\n')
                .enumerate()
                .filter_map(|(i, line)| {
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    (!line.is_empty()).then(|| {
                        base(Body::from_bytes(bytes.slice_ref(line)))
                            .with_header("file.line", (i + 1).to_string())
                            .with_ack(token.share())
                    })
                })
                .collect(),
        };
        // The source's own share: every message holds one, so the outcome waits for all of
        // them (and an empty file is acked at once).
        token.ack();
        for msg in messages {
            if let Err(failure) = ctx.dispatcher.dispatch(msg).await {
                let reason = failure.error.to_string();
                failure.message.nack(&reason);
            }
        }
        tokio::select! {
            biased;
            outcome = outcome => Some(outcome.unwrap_or_else(|_| Outcome::Nack("the acknowledgement was lost".into()))),
            () = ctx.shutdown.cancelled() => None,
        }
    }

    async fn move_to(&self, file: &Claimed, dir: &Path) -> std::io::Result<PathBuf> {
        let target = unique_path(dir, &file.name).await;
        tokio::fs::rename(&file.path, &target).await?;
        Ok(target)
    }

    async fn fail(&self, file: &Claimed, reason: &str) -> std::io::Result<()> {
        let target = self.move_to(file, &self.error_dir).await?;
        let target_name = target
            .file_name()
            .map_or_else(|| file.name.clone(), |n| n.to_string_lossy().into_owned());
        let report = serde_json::json!({
            "file": file.name,
            "path": file.original.display().to_string(),
            "reason": reason,
            "failed_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        });
        let text = serde_json::to_vec_pretty(&report).unwrap_or_default();
        tokio::fs::write(
            self.error_dir.join(format!("{target_name}.error.json")),
            text,
        )
        .await
    }
}

/// `dir/name`, or `dir/<stem>.<n><.ext>` with the first free `n` if that exists.
async fn unique_path(dir: &Path, name: &str) -> PathBuf {
    let candidate = dir.join(name);
    if !tokio::fs::try_exists(&candidate).await.unwrap_or(false) {
        return candidate;
    }
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    let mut n = 1u64;
    loop {
        let candidate = dir.join(format!("{stem}.{n}{ext}"));
        if !tokio::fs::try_exists(&candidate).await.unwrap_or(false) {
            return candidate;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unique_path_counts_before_the_extension() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            unique_path(dir.path(), "a.csv").await,
            dir.path().join("a.csv")
        );
        std::fs::write(dir.path().join("a.csv"), "x").unwrap();
        assert_eq!(
            unique_path(dir.path(), "a.csv").await,
            dir.path().join("a.1.csv")
        );
        std::fs::write(dir.path().join("a.1.csv"), "x").unwrap();
        assert_eq!(
            unique_path(dir.path(), "a.csv").await,
            dir.path().join("a.2.csv")
        );
        std::fs::write(dir.path().join("noext"), "x").unwrap();
        assert_eq!(
            unique_path(dir.path(), "noext").await,
            dir.path().join("noext.1")
        );
    }
}
