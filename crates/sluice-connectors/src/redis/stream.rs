//! Redis streams: the `redis_stream` source (a consumer group member: XREADGROUP, XACK after
//! commit, XAUTOCLAIM of stale entries) and the `redis_stream` sink (XADD).
//!
//! **Architecture Invariant:** an entry is XACKed only on [`Outcome::Ack`]. A failed entry stays
//! in the group's pending list and comes back through XAUTOCLAIM once idle for `claim_idle`;
//! entries this consumer held when it stopped are read again first at the next start.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, Client, RedisError, Value as RedisValue};
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    AckToken, BuildContext, BuildError, HealthHandle, Message, Outcome, ProcessError, Sink, Source,
    SourceContext, SourceError,
};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{LazyConnection, check_key, client, connect, default_url, describe, url_field};
use crate::reconnect::{self, Backoff};

/// Header: the stream an entry was read from.
pub const STREAM_HEADER: &str = "redis.stream";
/// Header: the entry's id.
pub const ID_HEADER: &str = "redis.id";

const SOURCE_DESCRIPTION: &str = "\
Reads stream `stream` as member `consumer` of consumer group `group` (created with MKSTREAM at \
`start` if missing). Each entry becomes one message: its field `body_field` is the body and \
every other field a header, plus `redis.stream` and `redis.id`. At start the entries this \
consumer already held (read but not acknowledged, e.g. before a crash) are read again first; \
then new entries (`>`). Every `claim_idle`/2 the source takes over entries that stayed pending \
longer than `claim_idle` in any consumer of the group (XAUTOCLAIM): those of a consumer that \
died, and its own failed ones.

**Delivery guarantee.** at-least-once: an entry is acknowledged (XACK) only after every target \
committed it. A failed entry stays pending and is delivered again after `claim_idle`; a crash \
leaves entries pending for the next start (same `consumer`) or for another member to claim. \
Make targets idempotent (for example on `redis.id`).

**Limits.** No delivery count: an entry that always fails comes back every `claim_idle`; give \
the flow a `dead_letter:` to take it out. Entries are not deleted after XACK (trim with the \
sink's `max_len`). Field values must be UTF-8 to become headers (others are skipped). Each \
instance needs its own `consumer` name. No TLS.";

/// The `redis_stream` source's spec.
pub fn source_spec() -> ComponentSpec {
    url_field(
        ComponentSpec::new(
            "redis_stream",
            ComponentKind::Source,
            "Read a Redis stream in a consumer group, acknowledged after commit",
        )
        .description(SOURCE_DESCRIPTION),
    )
    .field(FieldSpec::new("stream", FieldType::String, "Stream key.").required())
    .field(
        FieldSpec::new(
            "group",
            FieldType::String,
            "Consumer group; created if missing.",
        )
        .required(),
    )
    .field(
        FieldSpec::new(
            "consumer",
            FieldType::String,
            "This instance's name in the group; keep it stable across restarts.",
        )
        .default_value("sluice"),
    )
    .field(
        FieldSpec::new(
            "start",
            FieldType::String,
            "Where a newly created group starts: `$` (new entries only) or `0` (the whole stream).",
        )
        .default_value("$"),
    )
    .field(
        FieldSpec::new(
            "body_field",
            FieldType::String,
            "The entry field holding the body.",
        )
        .default_value("body"),
    )
    .field(
        FieldSpec::new(
            "prefetch",
            FieldType::Integer {
                min: Some(1),
                max: Some(65_536),
            },
            "Most entries in flight at once.",
        )
        .default_value(64),
    )
    .field(
        FieldSpec::new(
            "claim_idle",
            FieldType::Duration,
            "How long an entry stays pending before it is claimed and delivered again.",
        )
        .default_value("1m"),
    )
    .example(
        "Orders, one group member per instance",
        "stream: orders\ngroup: billing\nconsumer: billing-1\n",
    )
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceConfig {
    #[serde(default = "default_url")]
    url: String,
    stream: String,
    group: String,
    #[serde(default = "default_consumer")]
    consumer: String,
    #[serde(default = "default_start")]
    start: String,
    #[serde(default = "default_body_field")]
    body_field: String,
    #[serde(default = "default_prefetch")]
    prefetch: usize,
    #[serde(default = "default_claim_idle")]
    claim_idle: HumanDuration,
}

fn default_consumer() -> String {
    "sluice".into()
}
fn default_start() -> String {
    "$".into()
}
pub(crate) fn default_body_field() -> String {
    "body".into()
}
fn default_prefetch() -> usize {
    64
}
fn default_claim_idle() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

/// How long one XREADGROUP blocks waiting for entries.
const BLOCK: Duration = Duration::from_millis(500);

struct StreamSource {
    c: SourceConfig,
    client: Client,
}

/// Builds the `redis_stream` source.
pub fn build_source(
    config: &Value,
    _ctx: &BuildContext<'_>,
) -> Result<Box<dyn Source>, BuildError> {
    let c: SourceConfig = crate::config::parse(config)?;
    let client = client(&c.url)?;
    check_key("stream", &c.stream)?;
    check_key("group", &c.group)?;
    check_key("consumer", &c.consumer)?;
    check_key("body_field", &c.body_field)?;
    if c.start != "$" && c.start != "0" && !c.start.contains('-') && c.start.parse::<u64>().is_err()
    {
        return Err(BuildError::field(
            "start",
            format!(
                "`{}` is not a stream id; use `$`, `0` or an entry id",
                c.start
            ),
        ));
    }
    if c.prefetch == 0 {
        return Err(BuildError::field("prefetch", "must be at least 1"));
    }
    if c.claim_idle.0 < Duration::from_secs(1) {
        return Err(BuildError::field(
            "claim_idle",
            "must be at least 1s, longer than the flow takes per message",
        ));
    }
    Ok(Box::new(StreamSource { c, client }))
}

/// One source's connections: a blocking one for reads, another for acknowledgements.
struct Connections {
    read: MultiplexedConnection,
    ack: MultiplexedConnection,
}

impl StreamSource {
    async fn open(&self) -> Result<Connections, RedisError> {
        let mut read = connect(&self.client, true).await?;
        let ack = connect(&self.client, false).await?;
        let created: Result<(), RedisError> = read
            .xgroup_create_mkstream(&self.c.stream, &self.c.group, &self.c.start)
            .await;
        if let Err(e) = created
            && e.code() != Some("BUSYGROUP")
        {
            return Err(e);
        }
        Ok(Connections { read, ack })
    }

    /// Entries to deliver: stale ones claimed from the group when due, else the next read.
    async fn next_batch(
        &self,
        conns: &mut Connections,
        count: usize,
        own_pending: &mut Option<String>,
        claim: &mut Claimer,
    ) -> Result<Vec<StreamId>, RedisError> {
        if claim.due() {
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&self.c.stream)
                .arg(&self.c.group)
                .arg(&self.c.consumer)
                .arg(u64::try_from(self.c.claim_idle.0.as_millis()).unwrap_or(u64::MAX))
                .arg(&claim.cursor)
                .arg("COUNT")
                .arg(count)
                .query_async(&mut conns.ack)
                .await?;
            claim.advance(reply.next_stream_id);
            if !reply.claimed.is_empty() {
                return Ok(reply.claimed);
            }
        }
        // This consumer's own pending entries after `own_pending` (a position in them, so entries
        // still in the flow are not read over and over), then new ones.
        let id = own_pending.clone().unwrap_or_else(|| ">".to_owned());
        let mut options = StreamReadOptions::default()
            .group(&self.c.group, &self.c.consumer)
            .count(count);
        if own_pending.is_none() {
            options = options.block(usize::try_from(BLOCK.as_millis()).unwrap_or(500));
        }
        let reply: Option<StreamReadReply> = conns
            .read
            .xread_options(&[&self.c.stream], &[id], &options)
            .await?;
        let entries: Vec<StreamId> = reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default();
        if own_pending.is_some() {
            *own_pending = match entries.last() {
                Some(last) if entries.len() >= count => Some(last.id.clone()),
                // The history of this consumer is exhausted: new entries from now on.
                _ => None,
            };
        }
        // Entries deleted while pending come back without fields: nothing to deliver, just ack.
        Ok(entries)
    }
}

/// When to look for stale entries, and where the scan of the pending list stands.
struct Claimer {
    every: Duration,
    next: tokio::time::Instant,
    cursor: String,
}

impl Claimer {
    fn due(&self) -> bool {
        tokio::time::Instant::now() >= self.next
    }

    fn advance(&mut self, cursor: String) {
        // A full scan ends at `0-0`; the next starts after a pause.
        if cursor == "0-0" {
            self.next = tokio::time::Instant::now() + self.every;
        }
        self.cursor = cursor;
    }
}

#[async_trait]
impl Source for StreamSource {
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let health = HealthHandle::for_source(&ctx);
        let what = describe(&self.c.url);
        let mut backoff = Backoff::default();
        let permits = Arc::new(Semaphore::new(self.c.prefetch));
        let mut in_flight = JoinSet::new();
        let every = (self.c.claim_idle.0 / 2).max(Duration::from_millis(500));
        let mut claim = Claimer {
            every,
            next: tokio::time::Instant::now() + every,
            cursor: "0-0".into(),
        };
        let unacked = Unacked::default();
        let busy: Busy = Arc::default();
        'connection: loop {
            let Some(mut conns) =
                reconnect::connect(&what, &health, &ctx.shutdown, &mut backoff, || self.open())
                    .await
            else {
                break;
            };
            let mut own_pending = Some("0".to_owned());
            tracing::info!(flow = %ctx.flow, stream = %self.c.stream, group = %self.c.group, service = %what, "reading");
            loop {
                while in_flight.try_join_next().is_some() {}
                retry_acks(&mut conns.ack, &self.c.stream, &self.c.group, &unacked).await;
                let first = tokio::select! {
                    () = ctx.shutdown.cancelled() => break 'connection,
                    p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => break 'connection },
                };
                let mut slots = vec![first];
                while let Ok(p) = Arc::clone(&permits).try_acquire_owned() {
                    slots.push(p);
                }
                let batch = tokio::select! {
                    () = ctx.shutdown.cancelled() => break 'connection,
                    b = self.next_batch(&mut conns, slots.len(), &mut own_pending, &mut claim) => b,
                };
                let entries = match batch {
                    Ok(entries) => entries,
                    Err(e) => {
                        tracing::warn!(flow = %ctx.flow, stream = %self.c.stream, error = %e, "reading the stream failed; reconnecting");
                        health.unhealthy(format!(
                            "reading stream `{}` on {what} failed: {e}",
                            self.c.stream
                        ));
                        drop(slots);
                        tokio::select! {
                            () = ctx.shutdown.cancelled() => break 'connection,
                            () = tokio::time::sleep(backoff.next_delay()) => {}
                        }
                        continue 'connection;
                    }
                };
                for (entry, slot) in entries.into_iter().zip(slots) {
                    // Re-read pending entries and claimed ones may still be in this flow: one
                    // delivery at a time per entry.
                    let fresh = busy
                        .lock()
                        .is_ok_and(|mut ids| ids.insert(entry.id.clone()));
                    if !fresh {
                        continue;
                    }
                    let ack_conn = conns.ack.clone();
                    let (stream, group, flow, unacked, busy) = (
                        self.c.stream.clone(),
                        self.c.group.clone(),
                        Arc::clone(&ctx.flow),
                        Arc::clone(&unacked),
                        Arc::clone(&busy),
                    );
                    if entry.map.is_empty() {
                        // Deleted while pending: there is nothing to deliver.
                        in_flight.spawn(async move {
                            xack(ack_conn, &stream, &group, &entry.id, &unacked).await;
                            release(&busy, &entry.id);
                            drop(slot);
                        });
                        continue;
                    }
                    let msg = to_message(&self.c.stream, &self.c.body_field, &entry);
                    let (token, outcome) = AckToken::channel();
                    let work = Arc::clone(&ctx.dispatcher).admit(msg.with_ack(token)).await;
                    in_flight.spawn(async move {
                        let _ = work.await;
                        let outcome = outcome.await.unwrap_or_else(|_| {
                            Outcome::Nack(sluice_core::ack::DROPPED_UNRESOLVED.into())
                        });
                        match outcome {
                            Outcome::Ack => {
                                xack(ack_conn, &stream, &group, &entry.id, &unacked).await;
                            }
                            Outcome::Nack(reason) => tracing::debug!(
                                flow = %flow,
                                id = %entry.id,
                                %reason,
                                "stream entry failed; it stays pending and is claimed again later"
                            ),
                        }
                        release(&busy, &entry.id);
                        drop(slot);
                    });
                }
            }
        }
        while in_flight.join_next().await.is_some() {}
        Ok(())
    }
}

/// Ids whose XACK failed (the connection broke): acknowledged again on the next connection, so
/// an entry already committed is not delivered a second time when the source re-reads its
/// pending entries.
type Unacked = Arc<std::sync::Mutex<Vec<String>>>;

async fn xack(
    mut conn: MultiplexedConnection,
    stream: &str,
    group: &str,
    id: &str,
    unacked: &Unacked,
) {
    let result: Result<u64, RedisError> = conn.xack(stream, group, &[id]).await;
    if let Err(e) = result {
        tracing::debug!(stream, id, error = %e, "cannot acknowledge the stream entry now; trying again after reconnecting");
        if let Ok(mut ids) = unacked.lock() {
            ids.push(id.to_owned());
        }
    }
}

/// Ids of the entries in the flow now.
type Busy = Arc<std::sync::Mutex<std::collections::HashSet<String>>>;

fn release(busy: &Busy, id: &str) {
    if let Ok(mut ids) = busy.lock() {
        ids.remove(id);
    }
}

/// Acknowledges the ids an earlier XACK could not; those that fail again stay for the next try.
async fn retry_acks(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
    unacked: &Unacked,
) {
    let ids: Vec<String> = match unacked.lock() {
        Ok(mut ids) => std::mem::take(&mut *ids),
        Err(_) => return,
    };
    if ids.is_empty() {
        return;
    }
    let result: Result<u64, RedisError> = conn.xack(stream, group, &ids).await;
    if let Err(e) = result {
        // Still pending: claimed or re-read later, so at-least-once holds either way.
        tracing::warn!(stream, count = ids.len(), error = %e, "cannot acknowledge stream entries; they may be delivered again");
        if let Ok(mut pending) = unacked.lock() {
            pending.extend(ids);
        }
    }
}

/// The message for a stream entry.
fn to_message(stream: &str, body_field: &str, entry: &StreamId) -> Message {
    let mut body = bytes::Bytes::new();
    let mut headers = HashMap::new();
    for (field, value) in &entry.map {
        let RedisValue::BulkString(bytes) = value else {
            continue;
        };
        if field == body_field {
            body = bytes::Bytes::copy_from_slice(bytes);
        } else if let Ok(text) = std::str::from_utf8(bytes) {
            headers.insert(field.clone(), text.to_owned());
        }
    }
    let mut msg = Message::bytes(body);
    msg.headers.extend(headers);
    msg.headers
        .insert(STREAM_HEADER.to_owned(), stream.to_owned());
    msg.headers.insert(ID_HEADER.to_owned(), entry.id.clone());
    msg
}

const SINK_DESCRIPTION: &str = "\
Appends each message to stream `stream` (XADD with an id chosen by Redis): the body goes to \
field `body_field` and every header to a field of its name (except `redis.*`, which describe \
where a received entry came from). With `max_len` the stream is trimmed to about that many \
entries (`MAXLEN ~`).

**Delivery guarantee.** at-least-once: `deliver` returns once Redis answered the XADD; a message \
delivered again is appended again (streams do not de-duplicate). Durability is Redis's: with \
the default persistence an entry acknowledged just before a Redis crash can be lost; use \
`appendfsync always` where that matters.

**Limits.** No TLS. Entries larger than Redis's `proto-max-bulk-len` (512 MB) fail.";

/// The `redis_stream` sink's spec.
pub fn sink_spec() -> ComponentSpec {
    url_field(
        ComponentSpec::new(
            "redis_stream",
            ComponentKind::Sink,
            "Append messages to a Redis stream (XADD)",
        )
        .description(SINK_DESCRIPTION),
    )
    .field(FieldSpec::new("stream", FieldType::String, "Stream key.").required())
    .field(
        FieldSpec::new(
            "body_field",
            FieldType::String,
            "The entry field for the body.",
        )
        .default_value("body"),
    )
    .field(FieldSpec::new(
        "max_len",
        FieldType::Integer {
            min: Some(1),
            max: None,
        },
        "Trim the stream to about this many entries.",
    ))
    .shorthand("stream")
    .example(
        "Append orders, keeping about a million",
        "stream: orders\nmax_len: 1000000\n",
    )
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkConfig {
    #[serde(default = "default_url")]
    url: String,
    stream: String,
    #[serde(default = "default_body_field")]
    body_field: String,
    #[serde(default)]
    max_len: Option<u64>,
}

struct StreamSink {
    stream: String,
    body_field: String,
    max_len: Option<u64>,
    conn: LazyConnection,
}

/// Builds the `redis_stream` sink.
pub fn build_sink(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Sink>, BuildError> {
    let c: SinkConfig = crate::config::parse(config)?;
    let client = client(&c.url)?;
    check_key("stream", &c.stream)?;
    check_key("body_field", &c.body_field)?;
    if c.max_len == Some(0) {
        return Err(BuildError::field("max_len", "must be at least 1"));
    }
    Ok(Arc::new(StreamSink {
        conn: LazyConnection::new(client, c.url, HealthHandle::for_component(ctx)),
        stream: c.stream,
        body_field: c.body_field,
        max_len: c.max_len,
    }))
}

#[async_trait]
impl Sink for StreamSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.stream);
        if let Some(max) = self.max_len {
            cmd.arg("MAXLEN").arg("~").arg(max);
        }
        cmd.arg("*")
            .arg(&self.body_field)
            .arg(msg.body.as_bytes().as_ref());
        for (name, value) in &msg.headers {
            if !name.starts_with("redis.") && name != &self.body_field {
                cmd.arg(name).arg(value);
            }
        }
        let what = format!("XADD to `{}`", self.stream);
        self.conn.query::<String>(&what, &cmd).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_defaults_match_spec_defaults() {
        use crate::config::assert_defaults_agree;
        let source = serde_json::json!({"stream": "s", "group": "g"});
        assert_defaults_agree::<SourceConfig>(&source_spec(), source);
        assert_defaults_agree::<SinkConfig>(&sink_spec(), serde_json::json!({"stream": "s"}));
    }

    #[test]
    fn entries_map_to_body_and_headers() {
        let mut map = HashMap::new();
        map.insert(
            "body".to_owned(),
            RedisValue::BulkString(b"{\"a\":1}".to_vec()),
        );
        map.insert("trace".to_owned(), RedisValue::BulkString(b"t1".to_vec()));
        map.insert("bin".to_owned(), RedisValue::BulkString(vec![0xff]));
        let entry = StreamId {
            id: "1-0".into(),
            map,
            ..Default::default()
        };
        let msg = to_message("orders", "body", &entry);
        assert_eq!(msg.body.as_bytes().as_ref(), b"{\"a\":1}");
        assert_eq!(msg.headers["trace"], "t1");
        assert_eq!(msg.headers[ID_HEADER], "1-0");
        assert_eq!(msg.headers[STREAM_HEADER], "orders");
        assert!(!msg.headers.contains_key("bin"));
    }
}
