//! The `postgres_poll` source: runs a query for the rows past a watermark, one message per row,
//! and keeps the watermark in the process's store.
//!
//! **Architecture Invariant:** the stored watermark only moves past a row once that row's
//! message, and every row before it, is acknowledged. A crash or a nack means the rows after the
//! last stored watermark are read again (at-least-once).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::state::{CheckpointStore, Checkpoints};
use sluice_core::{
    AckToken, Body, BuildContext, BuildError, HealthHandle, Message, Outcome, Source,
    SourceContext, SourceError,
};
use tokio::sync::oneshot;

use super::db::PgDatabase;
use crate::reconnect::Backoff;
use crate::sql::{Database, Mode};

/// Header holding the row's watermark value (as JSON text for non-strings).
pub const WATERMARK_HEADER: &str = "postgres.watermark";

const DESCRIPTION: &str = "\
Polls PostgreSQL with `query` every `interval`, binding the current watermark to `$1`, and makes \
every returned row a message (the body is the row as a JSON object, typed as in the `sql` \
processor; header `postgres.watermark`). The query must return rows ordered by the `watermark` \
column and should bound them: `SELECT * FROM orders WHERE updated_at > $1 ORDER BY updated_at \
LIMIT 500`. When the rows of one poll are all acknowledged the watermark becomes the last row's \
`watermark` value and is written to the process's durable store (`--data`), under `checkpoint` \
(default `postgres_poll/<flow>`), so a restart resumes there. The first run starts at `initial`. \
When a poll returned a full page the next one follows at once.

**Delivery guarantee.** at-least-once: the watermark moves only past rows whose messages, and \
all earlier ones, were acknowledged; after a nack the source waits `interval` and reads again \
from the last acknowledged row, and after a crash from the last stored watermark, so some rows \
may be delivered twice.

**Limits.** The watermark column must increase strictly with each row (a sequence, or a \
timestamp with a tiebreaker): rows that share the last watermark value of a page are skipped by \
`>`, and rows committed late with a smaller value are missed (use the outbox source when that \
matters). Deletions are not seen. One poll's rows are held in memory. The database down makes \
the flow unhealthy while the source retries (backoff up to 1s).";

/// The `postgres_poll` source's spec.
pub fn spec() -> ComponentSpec {
    let mut spec = ComponentSpec::new(
        "postgres_poll",
        ComponentKind::Source,
        "Poll a PostgreSQL query for new rows past a watermark kept across restarts",
    )
    .description(DESCRIPTION);
    for field in crate::sql::connection_fields() {
        spec = spec.field(field);
    }
    spec.field(
        FieldSpec::new(
            "query",
            FieldType::String,
            "SELECT with `$1` for the watermark, ordered by the watermark column, with a LIMIT.",
        )
        .required(),
    )
    .field(
        FieldSpec::new(
            "watermark",
            FieldType::String,
            "The column (in the query's result) whose last value is the next `$1`.",
        )
        .required(),
    )
    .field(
        FieldSpec::new(
            "initial",
            FieldType::Any,
            "The watermark before the first row: `0`, `\"1970-01-01T00:00:00Z\"`, ...",
        )
        .required(),
    )
    .field(
        FieldSpec::new("interval", FieldType::Duration, "Time between polls that found no new rows.")
            .default_value("1s"),
    )
    .field(FieldSpec::new(
        "checkpoint",
        FieldType::String,
        "Key of the watermark in the store; default `postgres_poll/<flow>`. Give two sources the same key only if they read the same rows.",
    ))
    .example(
        "New orders by id",
        "url: postgres://sluice@127.0.0.1:5432/shop\nquery: SELECT * FROM orders WHERE id > $1 ORDER BY id LIMIT 500\nwatermark: id\ninitial: 0\ninterval: 2s\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    query: String,
    watermark: String,
    initial: Value,
    #[serde(default = "default_interval")]
    interval: HumanDuration,
    #[serde(default)]
    checkpoint: Option<String>,
}

fn default_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}

struct PollSource {
    db: Arc<PgDatabase>,
    query: String,
    watermark: String,
    initial: Value,
    interval: Duration,
    checkpoint: String,
    checkpoints: Arc<Checkpoints>,
}

/// Builds the `postgres_poll` source.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Box<dyn Source>, BuildError> {
    let (url, options, rest) = crate::sql::take_connection(config)?;
    let c: Config = crate::config::parse(&rest)?;
    if !c.query.contains("$1") {
        return Err(BuildError::field(
            "query",
            "must use `$1` for the watermark, e.g. `WHERE id > $1 ORDER BY id LIMIT 500`",
        ));
    }
    if c.watermark.is_empty() {
        return Err(BuildError::field("watermark", "name the watermark column"));
    }
    if c.interval.0.is_zero() {
        return Err(BuildError::field("interval", "must be longer than 0s"));
    }
    if c.checkpoint.as_deref().is_some_and(str::is_empty) {
        return Err(BuildError::field(
            "checkpoint",
            "is empty; give a key or leave it out",
        ));
    }
    let checkpoints = ctx.resources.get_or_default::<Checkpoints>();
    Ok(Box::new(PollSource {
        db: super::pool::shared(ctx.resources, &url, &options)?,
        query: c.query,
        watermark: c.watermark,
        initial: c.initial,
        interval: c.interval.0,
        checkpoint: c
            .checkpoint
            .unwrap_or_else(|| format!("postgres_poll/{}", ctx.flow)),
        checkpoints,
    }))
}

/// Sleeps `d` unless shutdown comes first; `false` on shutdown.
pub(crate) async fn pause(ctx: &SourceContext, d: Duration) -> bool {
    tokio::select! {
        () = ctx.shutdown.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

/// Admits `msg` with an acknowledgement whose outcome the returned receiver yields.
pub(crate) async fn admit(ctx: &SourceContext, msg: Message) -> oneshot::Receiver<Outcome> {
    let (token, outcome) = AckToken::channel();
    let work = Arc::clone(&ctx.dispatcher).admit(msg.with_ack(token)).await;
    tokio::spawn(async move {
        // The flow resolves the message's acknowledgement either way.
        let _ = work.await;
    });
    outcome
}

impl PollSource {
    async fn load(&self, store: &dyn CheckpointStore) -> Result<Value, SourceError> {
        match store.get(&self.checkpoint).await {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).map_err(|e| {
                SourceError::Other(format!(
                    "the stored watermark `{}` is not JSON: {e}",
                    self.checkpoint
                ))
            }),
            Ok(None) => Ok(self.initial.clone()),
            Err(e) => Err(SourceError::Other(format!(
                "cannot read the watermark `{}`: {e}",
                self.checkpoint
            ))),
        }
    }
}

#[async_trait]
impl Source for PollSource {
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let health = HealthHandle::for_source(&ctx);
        let store = self
            .checkpoints
            .store()
            .map_err(|e| SourceError::Other(format!("cannot keep the watermark: {e}")))?;
        let mut watermark = self.load(store.as_ref()).await?;
        let mut backoff = Backoff::default();
        while !ctx.shutdown.is_cancelled() {
            let rows = match self
                .db
                .query(&self.query, std::slice::from_ref(&watermark), Mode::Rows)
                .await
            {
                Ok(Value::Array(rows)) => {
                    health.healthy();
                    backoff.reset();
                    rows
                }
                Ok(_) => Vec::new(),
                Err(e) => {
                    health.unhealthy(format!("{}; retrying (backoff up to 1s)", e.detail));
                    if backoff.failures().is_multiple_of(10) {
                        tracing::warn!(flow = %ctx.flow, error = %e, "postgres_poll query failed; retrying");
                    }
                    if !pause(&ctx, backoff.next_delay()).await {
                        break;
                    }
                    continue;
                }
            };
            if rows.is_empty() {
                if !pause(&ctx, self.interval).await {
                    break;
                }
                continue;
            }
            let mut pending = Vec::with_capacity(rows.len());
            for row in rows {
                let Some(mark) = row.get(&self.watermark).cloned() else {
                    return Err(SourceError::Other(format!(
                        "the query's rows have no column `{}`; select it or fix `watermark`",
                        self.watermark
                    )));
                };
                let header = match &mark {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let msg = Message::new(Body::from_json(row)).with_header(WATERMARK_HEADER, header);
                pending.push((mark, admit(&ctx, msg).await));
            }
            // The watermark moves past the acknowledged prefix only.
            let mut advanced = None;
            let mut failed = false;
            for (mark, outcome) in pending {
                let acked = matches!(outcome.await, Ok(Outcome::Ack));
                if acked && !failed {
                    advanced = Some(mark);
                } else {
                    failed = true;
                }
            }
            if let Some(mark) = advanced {
                let bytes = serde_json::to_vec(&mark).unwrap_or_default();
                if let Err(e) = store.put(&self.checkpoint, bytes).await {
                    // Not stored: the rows come again after a restart (at-least-once holds).
                    tracing::warn!(flow = %ctx.flow, error = %e, "cannot store the watermark");
                }
                watermark = mark;
            }
            if failed && !pause(&ctx, self.interval).await {
                break;
            }
        }
        Ok(())
    }
}
