//! Redis pub/sub: the `redis_pubsub` source (SUBSCRIBE/PSUBSCRIBE) and sink (PUBLISH). Pub/sub
//! keeps nothing: both ends are at-most-once.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use redis::{Client, RedisError};
use serde::Deserialize;
use serde_json::Value;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    AckToken, BuildContext, BuildError, ErrorKind, HealthHandle, Message, ProcessError, Sink,
    Source, SourceContext, SourceError,
};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{LazyConnection, check_key, client, default_url, describe, url_field};
use crate::reconnect::{self, Backoff};

/// Header: the channel a message was published on.
pub const CHANNEL_HEADER: &str = "redis.channel";

const SOURCE_DESCRIPTION: &str = "\
Subscribes to `channel` (with `pattern: true`, a glob pattern: PSUBSCRIBE) and turns every \
published message into a message whose body is the payload; header `redis.channel` (the \
channel it was published on).

**Delivery guarantee.** at-most-once: Redis pub/sub keeps nothing and has no acknowledgement; \
messages published while the source is disconnected or restarting are lost, and a failed \
message is not delivered again. Use `redis_stream` or `redis_list` when messages matter.

**Limits.** Payload only, no headers. At most `concurrency` messages are processed at once; \
beyond that Redis buffers for the subscriber up to its `client-output-buffer-limit pubsub` and \
then disconnects it (the source reconnects, losing what was buffered). No TLS.";

/// The `redis_pubsub` source's spec.
pub fn source_spec() -> ComponentSpec {
    url_field(
        ComponentSpec::new(
            "redis_pubsub",
            ComponentKind::Source,
            "Subscribe to a Redis pub/sub channel (at-most-once)",
        )
        .description(SOURCE_DESCRIPTION),
    )
    .field(
        FieldSpec::new(
            "channel",
            FieldType::String,
            "Channel name, or glob pattern with `pattern: true`.",
        )
        .required(),
    )
    .field(
        FieldSpec::new(
            "pattern",
            FieldType::Bool,
            "Treat `channel` as a glob pattern (PSUBSCRIBE).",
        )
        .default_value(false),
    )
    .field(
        FieldSpec::new(
            "concurrency",
            FieldType::Integer {
                min: Some(1),
                max: Some(65_536),
            },
            "Messages processed at once.",
        )
        .default_value(64),
    )
    .shorthand("channel")
    .example(
        "Cache invalidation events",
        "channel: \"invalidate.*\"\npattern: true\n",
    )
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceConfig {
    #[serde(default = "default_url")]
    url: String,
    channel: String,
    #[serde(default)]
    pattern: bool,
    #[serde(default = "default_concurrency")]
    concurrency: usize,
}

fn default_concurrency() -> usize {
    64
}

struct PubSubSource {
    c: SourceConfig,
    client: Client,
}

/// Builds the `redis_pubsub` source.
pub fn build_source(
    config: &Value,
    _ctx: &BuildContext<'_>,
) -> Result<Box<dyn Source>, BuildError> {
    let c: SourceConfig = crate::config::parse(config)?;
    let client = client(&c.url)?;
    check_key("channel", &c.channel)?;
    if c.concurrency == 0 {
        return Err(BuildError::field("concurrency", "must be at least 1"));
    }
    Ok(Box::new(PubSubSource { c, client }))
}

impl PubSubSource {
    async fn subscribe(&self) -> Result<redis::aio::PubSub, RedisError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        if self.c.pattern {
            pubsub.psubscribe(&self.c.channel).await?;
        } else {
            pubsub.subscribe(&self.c.channel).await?;
        }
        Ok(pubsub)
    }
}

#[async_trait]
impl Source for PubSubSource {
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let health = HealthHandle::for_source(&ctx);
        let what = describe(&self.c.url);
        let mut backoff = Backoff::default();
        let permits = Arc::new(Semaphore::new(self.c.concurrency));
        let mut in_flight = JoinSet::new();
        'connection: loop {
            let Some(pubsub) =
                reconnect::connect(&what, &health, &ctx.shutdown, &mut backoff, || {
                    self.subscribe()
                })
                .await
            else {
                break;
            };
            let mut messages = pubsub.into_on_message();
            loop {
                while in_flight.try_join_next().is_some() {}
                let permit = tokio::select! {
                    () = ctx.shutdown.cancelled() => break 'connection,
                    p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => break 'connection },
                };
                let next = tokio::select! {
                    () = ctx.shutdown.cancelled() => break 'connection,
                    m = messages.next() => m,
                };
                let Some(published) = next else {
                    tracing::warn!(flow = %ctx.flow, channel = %self.c.channel, "the subscription ended; subscribing again");
                    health.unhealthy(format!(
                        "lost the subscription to `{}` on {what}",
                        self.c.channel
                    ));
                    continue 'connection;
                };
                let msg = Message::bytes(Bytes::copy_from_slice(published.get_payload_bytes()))
                    .with_header(CHANNEL_HEADER, published.get_channel_name());
                // Nothing to tell Redis either way.
                let work = Arc::clone(&ctx.dispatcher)
                    .admit(msg.with_ack(AckToken::with_callback(|_| {})))
                    .await;
                in_flight.spawn(async move {
                    let _ = work.await;
                    drop(permit);
                });
            }
        }
        while in_flight.join_next().await.is_some() {}
        Ok(())
    }
}

const SINK_DESCRIPTION: &str = "\
Publishes each message's body on `channel` (PUBLISH).

**Delivery guarantee.** at-most-once: Redis hands the message to the subscribers connected at \
that moment and keeps nothing. With `require_subscriber: true` a message that reached no \
subscriber fails with `unavailable` instead of being counted as delivered.

**Limits.** Payload only, no headers. No TLS.";

/// The `redis_pubsub` sink's spec.
pub fn sink_spec() -> ComponentSpec {
    url_field(
        ComponentSpec::new(
            "redis_pubsub",
            ComponentKind::Sink,
            "Publish messages on a Redis pub/sub channel",
        )
        .description(SINK_DESCRIPTION),
    )
    .field(FieldSpec::new("channel", FieldType::String, "Channel name.").required())
    .field(
        FieldSpec::new(
            "require_subscriber",
            FieldType::Bool,
            "Fail a message that no subscriber received.",
        )
        .default_value(false),
    )
    .shorthand("channel")
    .example("Announce changes", "channel: prices.changed\n")
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkConfig {
    #[serde(default = "default_url")]
    url: String,
    channel: String,
    #[serde(default)]
    require_subscriber: bool,
}

struct PubSubSink {
    channel: String,
    require_subscriber: bool,
    conn: LazyConnection,
}

/// Builds the `redis_pubsub` sink.
pub fn build_sink(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Sink>, BuildError> {
    let c: SinkConfig = crate::config::parse(config)?;
    let client = client(&c.url)?;
    check_key("channel", &c.channel)?;
    Ok(Arc::new(PubSubSink {
        conn: LazyConnection::new(client, c.url, HealthHandle::for_component(ctx)),
        channel: c.channel,
        require_subscriber: c.require_subscriber,
    }))
}

#[async_trait]
impl Sink for PubSubSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&self.channel).arg(msg.body.as_bytes().as_ref());
        let what = format!("PUBLISH to `{}`", self.channel);
        match self.conn.query::<u64>(&what, &cmd).await? {
            0 if self.require_subscriber => Err(ProcessError::new(
                ErrorKind::Unavailable,
                format!(
                    "no subscriber on channel `{}` received the message",
                    self.channel
                ),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::assert_defaults_agree;
    use serde_json::json;

    #[test]
    fn serde_defaults_match_spec_defaults() {
        assert_defaults_agree::<SourceConfig>(&source_spec(), json!({"channel": "c"}));
        assert_defaults_agree::<SinkConfig>(&sink_spec(), json!({"channel": "c"}));
    }
}
