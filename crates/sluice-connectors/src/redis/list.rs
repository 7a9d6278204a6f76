//! Redis lists as reliable queues: the `redis_list` source (BLMOVE into a processing list, LREM
//! after commit) and the `redis_list` sink (LPUSH/RPUSH).
//!
//! **Architecture Invariant:** an element leaves the processing list only after its message is
//! acknowledged (LREM) or, on a nack, in the same MULTI that puts it back on the queue; a crash
//! leaves it in the processing list, which is moved back to the head of the queue at the next
//! start, before anything else is read.

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{Client, RedisError};
use serde::Deserialize;
use serde_json::Value;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    AckToken, BuildContext, BuildError, HealthHandle, Message, Outcome, ProcessError, Sink, Source,
    SourceContext, SourceError,
};
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{LazyConnection, check_key, client, connect, default_url, describe, url_field};
use crate::reconnect::{self, Backoff};

/// Header: the list an element was taken from.
pub const LIST_HEADER: &str = "redis.list";

/// How long one BLMOVE blocks waiting for an element (seconds, as Redis takes it).
const BLOCK_SECONDS: f64 = 0.5;

const SOURCE_DESCRIPTION: &str = "\
Takes elements from the list `list` as a queue (producers LPUSH, the source takes from the \
right: first in, first out), moving each atomically into `processing_list` (BLMOVE) before its \
message enters the flow. Each element is one message whose body is the element; header \
`redis.list`.

When the message is acknowledged the element is removed from the processing list (LREM); when \
it fails it is moved back to the far end of the queue in one transaction (it is delivered \
again after the elements queued before it). At start, elements a crash left in the processing \
list are moved back to the head of the queue, so they are delivered first.

**Delivery guarantee.** at-least-once: an element is removed only after every target committed \
its message; elements of a crash are delivered again. Make targets idempotent.

**Limits.** Each running source needs its own `processing_list` (the default \
`<list>:processing` allows one instance per list; give each instance another name to run \
several): at start the whole processing list is given back, including elements another \
instance still works on. Elements carry no headers and no delivery count: a message that \
always fails cycles through the queue; give the flow a `dead_letter:`. With `prefetch` above 1 \
messages are processed concurrently and may finish out of order. No TLS.";

/// The `redis_list` source's spec.
pub fn source_spec() -> ComponentSpec {
    url_field(
        ComponentSpec::new(
            "redis_list",
            ComponentKind::Source,
            "Take messages from a Redis list used as a reliable queue",
        )
        .description(SOURCE_DESCRIPTION),
    )
    .field(FieldSpec::new("list", FieldType::String, "The queue's key.").required())
    .field(FieldSpec::new(
        "processing_list",
        FieldType::String,
        "Where elements wait while their messages are in flight; default `<list>:processing`.",
    ))
    .field(
        FieldSpec::new(
            "prefetch",
            FieldType::Integer {
                min: Some(1),
                max: Some(65_536),
            },
            "Most elements in flight at once.",
        )
        .default_value(16),
    )
    .shorthand("list")
    .example("A job queue", "list: jobs\n")
    .example(
        "Two instances on one queue",
        "list: jobs\nprocessing_list: jobs:processing:worker-1\nprefetch: 4\n",
    )
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceConfig {
    #[serde(default = "default_url")]
    url: String,
    list: String,
    #[serde(default)]
    processing_list: Option<String>,
    #[serde(default = "default_prefetch")]
    prefetch: usize,
}

fn default_prefetch() -> usize {
    16
}

struct ListSource {
    url: String,
    list: String,
    processing: String,
    prefetch: usize,
    client: Client,
}

/// Builds the `redis_list` source.
pub fn build_source(
    config: &Value,
    _ctx: &BuildContext<'_>,
) -> Result<Box<dyn Source>, BuildError> {
    let c: SourceConfig = crate::config::parse(config)?;
    let client = client(&c.url)?;
    check_key("list", &c.list)?;
    let processing = c
        .processing_list
        .unwrap_or_else(|| format!("{}:processing", c.list));
    check_key("processing_list", &processing)?;
    if processing == c.list {
        return Err(BuildError::field(
            "processing_list",
            "must differ from `list`",
        ));
    }
    if c.prefetch == 0 {
        return Err(BuildError::field("prefetch", "must be at least 1"));
    }
    Ok(Box::new(ListSource {
        url: c.url,
        list: c.list,
        processing,
        prefetch: c.prefetch,
        client,
    }))
}

impl ListSource {
    /// Connects; the first time, gives back what an earlier run left in the processing list
    /// (after a reconnect the elements there are this run's, still in its flow).
    async fn open(
        &self,
        recover: bool,
    ) -> Result<(MultiplexedConnection, MultiplexedConnection), RedisError> {
        let read = connect(&self.client, true).await?;
        let mut settle = connect(&self.client, false).await?;
        if !recover {
            return Ok((read, settle));
        }
        let mut recovered = 0usize;
        // Newest first from the processing list's left, each to the queue's right end (its
        // head): the oldest ends up first in line again.
        loop {
            let moved: Option<Vec<u8>> = redis::cmd("LMOVE")
                .arg(&self.processing)
                .arg(&self.list)
                .arg("LEFT")
                .arg("RIGHT")
                .query_async(&mut settle)
                .await?;
            if moved.is_none() {
                break;
            }
            recovered += 1;
        }
        if recovered > 0 {
            tracing::info!(list = %self.list, recovered, "gave back elements left in the processing list by an earlier run");
        }
        Ok((read, settle))
    }
}

#[async_trait]
impl Source for ListSource {
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let health = HealthHandle::for_source(&ctx);
        let what = describe(&self.url);
        let mut backoff = Backoff::default();
        let permits = Arc::new(Semaphore::new(self.prefetch));
        let mut in_flight = JoinSet::new();
        let unsettled = Unsettled::default();
        let mut first = true;
        'connection: loop {
            let Some((mut read, mut settle)) =
                reconnect::connect(&what, &health, &ctx.shutdown, &mut backoff, || {
                    self.open(first)
                })
                .await
            else {
                break;
            };
            first = false;
            tracing::info!(flow = %ctx.flow, list = %self.list, service = %what, "consuming");
            loop {
                while in_flight.try_join_next().is_some() {}
                retry_settlements(&mut settle, &self.list, &self.processing, &unsettled).await;
                let permit = tokio::select! {
                    () = ctx.shutdown.cancelled() => break 'connection,
                    p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => break 'connection },
                };
                // Not raced against shutdown: an element BLMOVE took must reach the flow (or
                // stay in the processing list for the next start), and the wait is short.
                let taken: Result<Option<Vec<u8>>, RedisError> = redis::cmd("BLMOVE")
                    .arg(&self.list)
                    .arg(&self.processing)
                    .arg("RIGHT")
                    .arg("LEFT")
                    .arg(BLOCK_SECONDS)
                    .query_async(&mut read)
                    .await;
                let element = match taken {
                    Ok(Some(element)) => element,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(flow = %ctx.flow, list = %self.list, error = %e, "reading the list failed; reconnecting");
                        health.unhealthy(format!(
                            "reading list `{}` on {what} failed: {e}",
                            self.list
                        ));
                        drop(permit);
                        tokio::select! {
                            () = ctx.shutdown.cancelled() => break 'connection,
                            () = tokio::time::sleep(backoff.next_delay()) => {}
                        }
                        continue 'connection;
                    }
                };
                let msg = Message::bytes(Bytes::from(element.clone()))
                    .with_header(LIST_HEADER, self.list.clone());
                let (token, outcome) = AckToken::channel();
                let work = Arc::clone(&ctx.dispatcher).admit(msg.with_ack(token)).await;
                let (conn, list, processing, unsettled) = (
                    settle.clone(),
                    self.list.clone(),
                    self.processing.clone(),
                    Arc::clone(&unsettled),
                );
                in_flight.spawn(async move {
                    let _ = work.await;
                    let outcome = outcome.await.unwrap_or_else(|_| {
                        Outcome::Nack(sluice_core::ack::DROPPED_UNRESOLVED.into())
                    });
                    let settlement = (element, outcome.is_ack());
                    if settle_element(conn, &list, &processing, &settlement)
                        .await
                        .is_err()
                        && let Ok(mut pending) = unsettled.lock()
                    {
                        pending.push(settlement);
                    }
                    drop(permit);
                });
            }
        }
        while in_flight.join_next().await.is_some() {}
        Ok(())
    }
}

/// Elements whose settlement failed (the connection broke), with whether they were acknowledged:
/// settled again on the next connection, so they are neither left in the processing list nor
/// given back at the next start.
type Unsettled = Arc<std::sync::Mutex<Vec<(Vec<u8>, bool)>>>;

/// Removes the element from the processing list (`acked`), or moves it back to the queue's far
/// end in one transaction.
async fn settle_element(
    mut conn: MultiplexedConnection,
    list: &str,
    processing: &str,
    (element, acked): &(Vec<u8>, bool),
) -> Result<(), RedisError> {
    if *acked {
        redis::cmd("LREM")
            .arg(processing)
            .arg(-1)
            .arg(element)
            .query_async(&mut conn)
            .await
    } else {
        redis::pipe()
            .atomic()
            .cmd("LREM")
            .arg(processing)
            .arg(-1)
            .arg(element)
            .ignore()
            .cmd("LPUSH")
            .arg(list)
            .arg(element)
            .ignore()
            .query_async(&mut conn)
            .await
    }
}

async fn retry_settlements(
    conn: &mut MultiplexedConnection,
    list: &str,
    processing: &str,
    unsettled: &Unsettled,
) {
    let pending = match unsettled.lock() {
        Ok(mut pending) => std::mem::take(&mut *pending),
        Err(_) => return,
    };
    for (i, settlement) in pending.iter().enumerate() {
        if let Err(e) = settle_element(conn.clone(), list, processing, settlement).await {
            // Still in the processing list: tried again later, or given back at the next start.
            tracing::warn!(list, error = %e, "cannot settle list elements; trying again later");
            if let Ok(mut left) = unsettled.lock() {
                left.extend(pending.into_iter().skip(i));
            }
            return;
        }
    }
}

const SINK_DESCRIPTION: &str = "\
Pushes each message's body onto list `list`: LPUSH by default (the queue end the `redis_list` \
source reads last), RPUSH with `end: head` (delivered next).

**Delivery guarantee.** at-least-once: `deliver` returns once Redis answered; a message \
delivered again is pushed again. Durability is Redis's persistence setting.

**Limits.** Only the body is stored: headers are dropped (use `redis_stream` to keep them). \
No TLS.";

/// The `redis_list` sink's spec.
pub fn sink_spec() -> ComponentSpec {
    url_field(
        ComponentSpec::new(
            "redis_list",
            ComponentKind::Sink,
            "Push messages onto a Redis list (a queue)",
        )
        .description(SINK_DESCRIPTION),
    )
    .field(FieldSpec::new("list", FieldType::String, "The list's key.").required())
    .field(
        FieldSpec::new(
            "end",
            FieldType::Enum(vec!["tail", "head"]),
            "`tail`: LPUSH, queued last; `head`: RPUSH, delivered next.",
        )
        .default_value("tail"),
    )
    .shorthand("list")
    .example("Queue jobs", "list: jobs\n")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum End {
    Tail,
    Head,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkConfig {
    #[serde(default = "default_url")]
    url: String,
    list: String,
    #[serde(default = "default_end")]
    end: End,
}

fn default_end() -> End {
    End::Tail
}

struct ListSink {
    list: String,
    command: &'static str,
    conn: LazyConnection,
}

/// Builds the `redis_list` sink.
pub fn build_sink(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Sink>, BuildError> {
    let c: SinkConfig = crate::config::parse(config)?;
    let client = client(&c.url)?;
    check_key("list", &c.list)?;
    Ok(Arc::new(ListSink {
        conn: LazyConnection::new(client, c.url, HealthHandle::for_component(ctx)),
        list: c.list,
        command: match c.end {
            End::Tail => "LPUSH",
            End::Head => "RPUSH",
        },
    }))
}

#[async_trait]
impl Sink for ListSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        let mut cmd = redis::cmd(self.command);
        cmd.arg(&self.list).arg(msg.body.as_bytes().as_ref());
        let what = format!("{} to `{}`", self.command, self.list);
        self.conn.query::<u64>(&what, &cmd).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::assert_defaults_agree;
    use serde_json::json;

    #[test]
    fn serde_defaults_match_spec_defaults() {
        assert_defaults_agree::<SourceConfig>(&source_spec(), json!({"list": "q"}));
        assert_defaults_agree::<SinkConfig>(&sink_spec(), json!({"list": "q"}));
    }
}
