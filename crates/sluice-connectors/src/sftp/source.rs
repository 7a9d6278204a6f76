//! The `sftp` source: polls a remote directory; each file is claimed by renaming it into a
//! processing directory on the server, downloaded, dispatched, and filed away after its outcome.
//!
//! **Architecture Invariant:** a remote file leaves `processing_dir` only after its message was
//! acknowledged (to `done_dir` or deleted) or nacked (to `error_dir`). A crash or a lost
//! connection leaves it there, and every (re)connection processes `processing_dir` first.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::bytesize::ByteSize;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    AckToken, BuildContext, BuildError, HealthHandle, Message, Outcome, Source, SourceContext,
    SourceError,
};

use super::{Connection, Session, join};
use crate::file::glob_match;
use crate::reconnect::{self, Backoff};

const DESCRIPTION: &str = "\
Polls the remote directory `path` every `poll_interval` for regular files whose name matches \
`pattern` (hidden files, whose names start with `.`, are ignored), one file at a time in name \
order. Each file is first **claimed** by renaming it into `processing_dir` on the server (so two \
sources never take the same file, and a crash leaves it there), then downloaded and dispatched \
as one message with headers `sftp.name`, `sftp.path` (where it was found) and `sftp.size`.

When the message is acknowledged (every target committed it) the file is moved to `done_dir` \
(`on_success: move`, default) or deleted (`delete`); when it fails it is moved to `error_dir`. \
A name already taken in the target directory gets a counter (`a.1.csv`).

The server's host key is checked against `host_key`; login by key (`private_key_file`) or \
`password`. An unreachable server is retried (capped backoff) and reported unhealthy.

**Delivery guarantee.** at-least-once: files left in `processing_dir` by a crash, a shutdown or \
a lost connection are processed again first at the next connection, so their message may be \
delivered twice; no file is lost, and a file filed away is never processed again.

**Limits.** Files larger than `max_size` are moved to `error_dir` unread. `processing_dir`, \
`done_dir` and `error_dir` must be on the same server filesystem as `path` (renames) and are \
created if missing. One `sftp` source per remote directory and processing directory.";

/// The `sftp` source's spec.
pub fn spec() -> ComponentSpec {
    let mut spec = ComponentSpec::new(
        "sftp",
        ComponentKind::Source,
        "Pick up files from an SFTP server, then move them to done or error",
    )
    .description(DESCRIPTION)
    .field(FieldSpec::new("path", FieldType::String, "Remote directory to poll.").required())
    .field(
        FieldSpec::new(
            "pattern",
            FieldType::String,
            "Glob on the file name (`*`, `?`).",
        )
        .default_value("*"),
    )
    .field(
        FieldSpec::new(
            "poll_interval",
            FieldType::Duration,
            "Time between listings.",
        )
        .default_value("5s"),
    )
    .field(
        FieldSpec::new(
            "on_success",
            FieldType::Enum(vec!["move", "delete"]),
            "What to do with a file once its message is committed.",
        )
        .default_value("move"),
    )
    .field(FieldSpec::new(
        "processing_dir",
        FieldType::String,
        "Where files are claimed while in flight; default `<path>/.processing`.",
    ))
    .field(FieldSpec::new(
        "done_dir",
        FieldType::String,
        "Where committed files go with `on_success: move`; default `<path>/.done`.",
    ))
    .field(FieldSpec::new(
        "error_dir",
        FieldType::String,
        "Where failed files go; default `<path>/.error`.",
    ))
    .field(
        FieldSpec::new("max_size", FieldType::ByteSize, "Largest file downloaded.")
            .default_value("64MiB"),
    );
    for field in super::connection_fields() {
        spec = spec.field(field);
    }
    spec.example(
        "A partner's CSV drops, deleted once delivered",
        "host: sftp.partner.example\nuser: acme\nprivate_key_file: /etc/sluice/partner_ed25519\nhost_key: \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFkqSAXyYCZLMdRC4lpJytWGXG31RpOInfWpBC0T8tat\"\npath: /outbox\npattern: \"*.csv\"\non_success: delete\n",
    )
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

/// The source's own fields.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftpSourceConfig {
    /// Remote directory.
    pub path: String,
    /// Glob.
    #[serde(default = "default_pattern")]
    pub pattern: String,
    /// Poll period.
    #[serde(default = "default_poll")]
    pub poll_interval: HumanDuration,
    /// Move or delete.
    #[serde(default = "default_on_success")]
    pub on_success: OnSuccess,
    /// Processing directory.
    #[serde(default)]
    pub processing_dir: Option<String>,
    /// Done directory.
    #[serde(default)]
    pub done_dir: Option<String>,
    /// Error directory.
    #[serde(default)]
    pub error_dir: Option<String>,
    /// Largest file.
    #[serde(default = "default_max_size")]
    pub max_size: ByteSize,
}

fn default_pattern() -> String {
    "*".into()
}
fn default_poll() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_on_success() -> OnSuccess {
    OnSuccess::Move
}
fn default_max_size() -> ByteSize {
    ByteSize(64 << 20)
}

/// A built `sftp` source.
pub struct SftpSource {
    connection: Connection,
    dir: String,
    pattern: String,
    poll: Duration,
    on_success: OnSuccess,
    processing_dir: String,
    done_dir: String,
    error_dir: String,
    max_size: u64,
}

/// Builds an `sftp` source.
pub fn build(config: &Value, _ctx: &BuildContext<'_>) -> Result<Box<dyn Source>, BuildError> {
    let (connection, c): (Connection, SftpSourceConfig) = super::parse_split(config)?;
    if c.path.trim().is_empty() {
        return Err(BuildError::field(
            "path",
            "is empty; name the remote directory",
        ));
    }
    if c.pattern.contains('/') {
        return Err(BuildError::field(
            "pattern",
            "matches file names only and may not contain `/`; point `path` at the directory instead",
        ));
    }
    if c.poll_interval.0.is_zero() {
        return Err(BuildError::field("poll_interval", "must be longer than 0s"));
    }
    Ok(Box::new(SftpSource {
        processing_dir: c
            .processing_dir
            .unwrap_or_else(|| join(&c.path, ".processing")),
        done_dir: c.done_dir.unwrap_or_else(|| join(&c.path, ".done")),
        error_dir: c.error_dir.unwrap_or_else(|| join(&c.path, ".error")),
        connection,
        dir: c.path,
        pattern: c.pattern,
        poll: c.poll_interval.0,
        on_success: c.on_success,
        max_size: c.max_size.0,
    }))
}

/// Why a pass over the directories stopped.
enum Stop {
    /// Shutdown was requested.
    Shutdown,
    /// The session failed; reconnect.
    Broken(String),
}

#[async_trait]
impl Source for SftpSource {
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let health = HealthHandle::for_source(&ctx);
        let what = format!("SFTP server {}", self.connection.address());
        let mut backoff = Backoff::default();
        loop {
            let Some(session) =
                reconnect::connect(&what, &health, &ctx.shutdown, &mut backoff, || {
                    self.connection.open()
                })
                .await
            else {
                return Ok(());
            };
            match self.serve(&ctx, &session).await {
                Stop::Shutdown => return Ok(()),
                Stop::Broken(reason) => {
                    tracing::warn!(flow = %ctx.flow, server = %what, %reason, "SFTP session failed; reconnecting (claimed files are processed again)");
                    health.unhealthy(format!("{what}: {reason}; reconnecting"));
                }
            }
        }
    }
}

impl SftpSource {
    /// Processes leftovers in `processing_dir`, then polls until shutdown or a session failure.
    async fn serve(&self, ctx: &SourceContext, session: &Session) -> Stop {
        for dir in [&self.processing_dir, &self.error_dir, &self.done_dir] {
            // Already there is the usual case; a real problem shows at the first rename.
            let _ = session.sftp.create_dir(dir.clone()).await;
        }
        let leftovers = match self.list(session, &self.processing_dir, false).await {
            Ok(names) => names,
            Err(e) => return Stop::Broken(e),
        };
        for (name, size) in leftovers {
            if ctx.shutdown.is_cancelled() {
                return Stop::Shutdown;
            }
            let path = join(&self.processing_dir, &name);
            if let Err(stop) = self.process(ctx, session, &name, &path, size).await {
                return stop;
            }
        }
        loop {
            if ctx.shutdown.is_cancelled() {
                return Stop::Shutdown;
            }
            let names = match self.list(session, &self.dir, true).await {
                Ok(names) => names,
                Err(e) => return Stop::Broken(e),
            };
            for (name, size) in names {
                if ctx.shutdown.is_cancelled() {
                    return Stop::Shutdown;
                }
                let claimed = join(&self.processing_dir, &name);
                if let Err(e) = session
                    .sftp
                    .rename(join(&self.dir, &name), claimed.clone())
                    .await
                {
                    // Taken by another reader, or a leftover of that name is still in flight.
                    tracing::warn!(flow = %ctx.flow, file = %name, error = %e, "could not claim remote file; it stays where it is");
                    continue;
                }
                if let Err(stop) = self.process(ctx, session, &name, &claimed, size).await {
                    return stop;
                }
            }
            tokio::select! {
                () = ctx.shutdown.cancelled() => return Stop::Shutdown,
                () = tokio::time::sleep(self.poll) => {}
            }
        }
    }

    /// Regular, non-hidden files of `dir` (matching the pattern if `filter`), by name.
    async fn list(
        &self,
        session: &Session,
        dir: &str,
        filter: bool,
    ) -> Result<Vec<(String, u64)>, String> {
        let entries = session
            .sftp
            .read_dir(dir.to_owned())
            .await
            .map_err(|e| format!("cannot list `{dir}`: {e}"))?;
        let mut names: Vec<(String, u64)> = entries
            .filter(|e| e.file_type().is_file())
            .map(|e| (e.file_name(), e.metadata().len()))
            .filter(|(n, _)| !n.starts_with('.') && (!filter || glob_match(&self.pattern, n)))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Downloads, dispatches and files away one claimed file. `Err` stops the pass.
    async fn process(
        &self,
        ctx: &SourceContext,
        session: &Session,
        name: &str,
        path: &str,
        size: u64,
    ) -> Result<(), Stop> {
        let outcome = if size > self.max_size {
            Outcome::Nack(
                format!(
                    "file is {size} bytes, larger than `max_size` ({}); raise `max_size` or split the file",
                    ByteSize(self.max_size)
                )
                .into(),
            )
        } else {
            let bytes = session
                .sftp
                .read(path.to_owned())
                .await
                .map_err(|e| Stop::Broken(format!("cannot download `{path}`: {e}")))?;
            let (token, outcome) = AckToken::channel();
            let mut msg = Message::bytes(Bytes::from(bytes))
                .with_header("sftp.name", name)
                .with_header("sftp.path", join(&self.dir, name))
                .with_header("sftp.size", size.to_string())
                .with_ack(token);
            msg.meta.origin = Some(Arc::clone(&ctx.flow));
            if let Err(failure) = ctx.dispatcher.dispatch(msg).await {
                let reason = failure.error.to_string();
                failure.message.nack(&reason);
            }
            tokio::select! {
                biased;
                outcome = outcome => outcome.unwrap_or_else(|_| Outcome::Nack(sluice_core::ack::DROPPED_UNRESOLVED.into())),
                // The file stays claimed and is processed again at the next start.
                () = ctx.shutdown.cancelled() => return Err(Stop::Shutdown),
            }
        };
        let result = match outcome {
            Outcome::Ack => match self.on_success {
                OnSuccess::Move => self.move_to(session, path, &self.done_dir, name).await,
                OnSuccess::Delete => session
                    .sftp
                    .remove_file(path.to_owned())
                    .await
                    .map_err(|e| format!("cannot delete `{path}`: {e}")),
            },
            Outcome::Nack(reason) => {
                tracing::warn!(flow = %ctx.flow, file = %name, %reason, "remote file failed; moving it to the error directory");
                self.move_to(session, path, &self.error_dir, name).await
            }
        };
        result.map_err(Stop::Broken)
    }

    /// Renames `path` into `dir` as `name`, or `<stem>.<n><ext>` with the first free `n`.
    async fn move_to(
        &self,
        session: &Session,
        path: &str,
        dir: &str,
        name: &str,
    ) -> Result<(), String> {
        let (stem, ext) = match name.rfind('.') {
            Some(i) if i > 0 => (&name[..i], &name[i..]),
            _ => (name, ""),
        };
        for n in 0..1000u32 {
            let candidate = if n == 0 {
                join(dir, name)
            } else {
                join(dir, &format!("{stem}.{n}{ext}"))
            };
            if session
                .sftp
                .try_exists(candidate.clone())
                .await
                .map_err(|e| format!("cannot check `{candidate}`: {e}"))?
            {
                continue;
            }
            return session
                .sftp
                .rename(path.to_owned(), candidate.clone())
                .await
                .map_err(|e| format!("cannot move `{path}` to `{candidate}`: {e}"));
        }
        Err(format!("no free name for `{name}` in `{dir}`"))
    }
}
