//! The `sftp` sink: one remote file per message, uploaded under a hidden temporary name and
//! renamed into place, so a reader never sees a partial file.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, ErrorKind, HealthHandle, Message, ProcessError, Sink};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{Connection, Session, join};
use crate::template::Template;

const DESCRIPTION: &str = "\
Uploads each message body as one file in the remote directory `path`, named by `name` with the \
placeholders `{id}` (message id), `{timestamp}` (RFC 3339 UTC with `:` replaced by `-`) and \
`{header.<name>}`. The body is written to `.<name>.tmp-<uuid>` in the same directory and renamed \
to its name once complete, so a reader (such as an `sftp` or `file` source, which skip hidden \
files) never sees a partial file. A file of the same name is replaced (removed just before the \
rename, since SFTP's rename does not overwrite).

The server's host key is checked against `host_key`; login by key (`private_key_file`) or \
`password`. The connection is opened on the first message, kept, and opened again after a \
failure; while the server cannot be reached the component reports unhealthy.

**Delivery guarantee.** at-least-once: a message is delivered once the server acknowledged the \
close of the uploaded file and the rename. A redelivered message rewrites its file (same name \
with `{id}`).

**Limits.** One upload at a time per sink (the messages of a flow are serialized on its SSH \
connection). A rendered `name` may not contain `/` or be `.`/`..` (the message fails with \
`invalid_input`). Replacing an existing file is not atomic (remove, then rename). Host \
certificates are not supported.";

/// The `sftp` sink's spec.
pub fn spec() -> ComponentSpec {
    let mut spec = ComponentSpec::new(
        "sftp",
        ComponentKind::Sink,
        "Upload one file per message to an SFTP server (temporary name, then rename)",
    )
    .description(DESCRIPTION)
    .field(
        FieldSpec::new(
            "path",
            FieldType::String,
            "Remote directory to write files in; it must exist.",
        )
        .required(),
    )
    .field(
        FieldSpec::new(
            "name",
            FieldType::String,
            "File name template: `{id}`, `{timestamp}`, `{header.<name>}`.",
        )
        .default_value("{id}"),
    );
    for field in super::connection_fields() {
        spec = spec.field(field);
    }
    spec.example(
        "Invoices to a partner's inbox, named by invoice number",
        "host: sftp.partner.example\nuser: acme\nprivate_key_file: /etc/sluice/partner_ed25519\nhost_key: \"SHA256:nThbg6kXUpJWGl7E1IGOCspRomTxdCARLviKw6E5SY8\"\npath: /inbox\nname: \"invoice-{header.invoice_no}.xml\"\n",
    )
}

/// The sink's own fields.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftpSinkConfig {
    /// Remote directory.
    pub path: String,
    /// Name template.
    #[serde(default = "default_name")]
    pub name: String,
}

fn default_name() -> String {
    "{id}".into()
}

/// A built `sftp` sink.
pub struct SftpSink {
    connection: Connection,
    dir: String,
    name: Template,
    health: HealthHandle,
    session: Mutex<Option<Session>>,
}

/// Builds an `sftp` sink.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Sink>, BuildError> {
    let (connection, c): (Connection, SftpSinkConfig) = super::parse_split(config)?;
    if c.path.trim().is_empty() {
        return Err(BuildError::field(
            "path",
            "is empty; name the remote directory",
        ));
    }
    let name = Template::parse(&c.name).map_err(|e| BuildError::field("name", e.to_string()))?;
    if let Some(bad) = name
        .placeholders()
        .find(|p| !matches!(*p, "id" | "timestamp") && !p.starts_with("header."))
    {
        return Err(BuildError::field(
            "name",
            format!(
                "unknown placeholder `{{{bad}}}`; use `{{id}}`, `{{timestamp}}` or `{{header.<name>}}`"
            ),
        ));
    }
    Ok(Arc::new(SftpSink {
        connection,
        dir: c.path,
        name,
        health: HealthHandle::for_component(ctx),
        session: Mutex::new(None),
    }))
}

/// Renders the file name for `msg`, refusing names that would leave the directory.
fn render_name(template: &Template, msg: &Message) -> Result<String, ProcessError> {
    let name = template.render(|p| match p {
        "id" => Ok(msg.id().to_string()),
        "timestamp" => Ok(chrono::Utc::now()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            .replace(':', "-")),
        other => {
            let header = other.strip_prefix("header.").unwrap_or(other);
            msg.headers.get(header).cloned().ok_or_else(|| {
                ProcessError::invalid_input(format!(
                    "the file name needs header `{header}`, which the message does not have"
                ))
            })
        }
    })?;
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\']) {
        return Err(ProcessError::invalid_input(format!(
            "file name `{name}` is empty, `.`/`..`, or contains a path separator"
        )));
    }
    Ok(name)
}

impl SftpSink {
    async fn upload(&self, session: &Session, name: &str, body: &[u8]) -> Result<(), String> {
        let target = join(&self.dir, name);
        let temp = join(&self.dir, &format!(".{name}.tmp-{}", uuid::Uuid::now_v7()));
        let mut file = session
            .sftp
            .create(temp.clone())
            .await
            .map_err(|e| format!("cannot create `{temp}`: {e}"))?;
        file.write_all(body)
            .await
            .map_err(|e| format!("cannot write `{temp}`: {e}"))?;
        file.shutdown()
            .await
            .map_err(|e| format!("cannot close `{temp}`: {e}"))?;
        drop(file);
        if session
            .sftp
            .rename(temp.clone(), target.clone())
            .await
            .is_err()
        {
            // SFTP (v3) does not overwrite on rename: remove the old file, then try again.
            let _ = session.sftp.remove_file(target.clone()).await;
            if let Err(e) = session.sftp.rename(temp.clone(), target.clone()).await {
                let _ = session.sftp.remove_file(temp).await;
                return Err(format!("cannot rename the upload to `{target}`: {e}"));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Sink for SftpSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        let name = render_name(&self.name, msg)?;
        let mut slot = self.session.lock().await;
        // A session kept from earlier may have died with the server (a restart, a cut
        // connection) without us noticing: its failure earns one more try on a fresh session.
        let mut reused = slot.is_some();
        loop {
            if slot.is_none() {
                match self.connection.open().await {
                    Ok(session) => {
                        self.health.healthy();
                        *slot = Some(session);
                    }
                    Err(e) => {
                        let detail = format!(
                            "cannot reach SFTP server {}: {e}",
                            self.connection.address()
                        );
                        self.health
                            .unhealthy(format!("{detail}; retrying on the next message"));
                        return Err(ProcessError::new(ErrorKind::Unavailable, detail));
                    }
                }
            }
            let Some(session) = slot.as_ref() else {
                return Err(ProcessError::new(ErrorKind::Internal, "no SFTP session"));
            };
            match self.upload(session, &name, msg.body.as_bytes()).await {
                Ok(()) => return Ok(()),
                Err(detail) => {
                    // The session may be broken: open a fresh one next time.
                    *slot = None;
                    if reused {
                        reused = false;
                        continue;
                    }
                    return Err(ProcessError::new(
                        ErrorKind::Unavailable,
                        format!("SFTP server {}: {detail}", self.connection.address()),
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_in_the_directory() {
        let t = Template::parse("{header.n}.txt").unwrap();
        let ok = Message::bytes("x").with_header("n", "a");
        assert_eq!(render_name(&t, &ok).unwrap(), "a.txt");
        let bad = Message::bytes("x").with_header("n", "../a");
        assert_eq!(
            render_name(&t, &bad).unwrap_err().kind,
            ErrorKind::InvalidInput
        );
        let missing = Message::bytes("x");
        assert_eq!(
            render_name(&t, &missing).unwrap_err().kind,
            ErrorKind::InvalidInput
        );
    }
}
