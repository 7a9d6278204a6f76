//! The `postgres_listen` source: `LISTEN` on channels; each `NOTIFY` becomes a message.
//!
//! PostgreSQL keeps no notification for a session that is not connected, so this source is
//! at-most-once by nature: it says so in its spec.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    Body, BuildContext, BuildError, HealthHandle, Message, Source, SourceContext, SourceError,
};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Notification};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::poll::admit;
use crate::reconnect::{Backoff, connect};
use crate::sql::{Backend, redact};

/// Header with the channel the notification came on.
pub const CHANNEL_HEADER: &str = "postgres.channel";
/// Header with the process id of the notifying backend.
pub const PID_HEADER: &str = "postgres.pid";

const DESCRIPTION: &str = "\
Opens a dedicated connection (not from the pool), runs `LISTEN` on each of `channels`, and makes \
every notification a message: the body is the `NOTIFY` payload (text, up to 8000 bytes by \
PostgreSQL's default), headers `postgres.channel` and `postgres.pid`. The connection is opened \
again after it breaks (backoff up to 1s; the flow is unhealthy meanwhile).

**Delivery guarantee.** at-most-once: PostgreSQL does not keep notifications for a listener \
that is not connected, so those sent while the runtime is down or reconnecting are lost, and a \
notification is not redelivered when its message fails. Use it to wake things up or for \
best-effort events; use `postgres_outbox` when every event matters.

**Limits.** Channel names are plain identifiers (letters, digits, `_`). Messages are processed \
as fast as the flow admits them; notifications wait in PostgreSQL's queue (8 GB by default) \
while the flow is busy.";

/// The `postgres_listen` source's spec.
pub fn spec() -> ComponentSpec {
    let mut spec = ComponentSpec::new(
        "postgres_listen",
        ComponentKind::Source,
        "Receive PostgreSQL NOTIFY events (at-most-once)",
    )
    .description(DESCRIPTION);
    for field in crate::sql::connection_fields() {
        if field.name != "pool_size" {
            spec = spec.field(field);
        }
    }
    spec.field(
        FieldSpec::new(
            "channels",
            FieldType::List(Box::new(FieldType::String)),
            "Channels to LISTEN on.",
        )
        .required(),
    )
    .example(
        "Cache invalidations",
        "url: postgres://sluice@127.0.0.1:5432/shop\nchannels: [price_changed, stock_changed]\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    channels: Vec<String>,
}

struct ListenSource {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    what: String,
    listen: String,
}

/// Builds the `postgres_listen` source.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Box<dyn Source>, BuildError> {
    let _ = ctx;
    let (url, options, rest) = crate::sql::take_connection(config)?;
    let c: Config = crate::config::parse(&rest)?;
    if c.channels.is_empty() {
        return Err(BuildError::field("channels", "name at least one channel"));
    }
    let mut listen = String::new();
    for name in &c.channels {
        let quoted = Backend::Postgres
            .quote_ident(name)
            .filter(|_| !name.contains('.'))
            .ok_or_else(|| {
                BuildError::field(
                    "channels",
                    format!("`{name}` is not a plain channel name (letters, digits and `_`)"),
                )
            })?;
        listen.push_str(&format!("LISTEN {quoted};"));
    }
    let (config, tls) = super::pool::connection(&url, &options)?;
    Ok(Box::new(ListenSource {
        config,
        tls,
        what: format!("PostgreSQL at {}", redact(&url)),
        listen,
    }))
}

type Notifications = mpsc::Receiver<Result<Notification, tokio_postgres::Error>>;

impl ListenSource {
    /// Connects, listens, and returns the notifications (an error ends the stream).
    async fn open(&self) -> Result<(tokio_postgres::Client, Notifications), tokio_postgres::Error> {
        let (client, mut connection) = self.config.connect(self.tls.clone()).await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            // Polling the messages also drives the connection; the task ends with it.
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                let item = match message {
                    Ok(AsyncMessage::Notification(n)) => Ok(n),
                    Ok(_) => continue,
                    Err(e) => Err(e),
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    break;
                }
            }
        });
        client.batch_execute(&self.listen).await?;
        Ok((client, rx))
    }
}

#[async_trait]
impl Source for ListenSource {
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let health = HealthHandle::for_source(&ctx);
        let mut backoff = Backoff::default();
        loop {
            let Some((client, mut notifications)) =
                connect(&self.what, &health, &ctx.shutdown, &mut backoff, || {
                    self.open()
                })
                .await
            else {
                return Ok(());
            };
            loop {
                let next = tokio::select! {
                    () = ctx.shutdown.cancelled() => return Ok(()),
                    next = notifications.recv() => next,
                };
                match next {
                    Some(Ok(n)) => {
                        let msg = Message::new(Body::from_bytes(n.payload().to_owned()))
                            .with_header(CHANNEL_HEADER, n.channel())
                            .with_header(PID_HEADER, n.process_id().to_string());
                        // At-most-once: the outcome is not needed.
                        drop(admit(&ctx, msg).await);
                    }
                    Some(Err(e)) => {
                        health.unhealthy(format!("lost {}: {e}; reconnecting", self.what));
                        tracing::warn!(flow = %ctx.flow, error = %e, "LISTEN connection lost; notifications sent until it is back are lost");
                        break;
                    }
                    None => {
                        health.unhealthy(format!("lost {}; reconnecting", self.what));
                        break;
                    }
                }
            }
            drop(client);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
