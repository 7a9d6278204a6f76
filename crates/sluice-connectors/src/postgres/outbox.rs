//! The `postgres_outbox` source: the transactional outbox pattern. Applications insert a row in
//! the same transaction as their change; this source delivers the rows in id order and deletes
//! (or marks) each one only after its message is acknowledged.
//!
//! **Architecture Invariant:** a row is deleted or marked done only in the transaction that
//! locked it, after its message's `Outcome::Ack`; rows locked by one runtime are skipped by the
//! others (`FOR UPDATE SKIP LOCKED`), so several runtimes share one outbox without duplicates
//! while they are healthy.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    Body, BuildContext, BuildError, HealthHandle, Message, Outcome, ProcessError, Source,
    SourceContext, SourceError,
};
use tokio_postgres::Row;
use tokio_postgres::types::Type;

use super::db::{PgDatabase, error};
use super::poll::{admit, pause};
use crate::reconnect::Backoff;
use crate::sql::{Backend, Database};

/// Header with the row's id.
pub const ID_HEADER: &str = "outbox.id";
/// Header with the row's `created_at`, RFC 3339.
pub const CREATED_AT_HEADER: &str = "outbox.created_at";

const DESCRIPTION: &str = "\
Reads the outbox table `table` in `id` order, `batch_size` rows at a time, locking them with \
`SELECT ... FOR UPDATE SKIP LOCKED` in a transaction, and makes each row a message: the body is \
`payload` (`jsonb`/`json` as JSON, `text` as text, `bytea` as bytes), the headers are the \
`headers` object (`jsonb`, values turned into strings; may be NULL) plus `outbox.id` and \
`outbox.created_at` (RFC 3339). Once the batch's messages are settled, the acknowledged rows are \
deleted (`on_ack: delete`) or get `done_at = now()` (`on_ack: mark`; the source then reads only \
rows whose `done_at` is NULL), and the transaction commits. With no rows it waits `interval`.

Expected table (the names are fixed; other columns are ignored):

```sql
CREATE TABLE outbox (
  id         bigserial PRIMARY KEY,
  payload    jsonb NOT NULL,
  headers    jsonb,
  created_at timestamptz NOT NULL DEFAULT now(),
  done_at    timestamptz          -- only for on_ack: mark
);
```

**Delivery guarantee.** at-least-once: a row is removed only after its message is acknowledged, \
in the same transaction that locked it; a nacked row stays and is read again after `interval`, \
and rows locked by a runtime that crashed are unlocked by PostgreSQL and read again. Several \
runtimes may read one outbox: `SKIP LOCKED` gives each row to one of them at a time.

**Limits.** Order is by `id` within one batch and one runtime; with several runtimes, or after a \
nack, later rows may be delivered before earlier ones (use `ordered_by` in the flow for per-key \
order within a batch). `id` must be an integer column. The transaction stays open while the \
batch is processed: keep `batch_size` modest so locks are short. `on_ack: mark` needs an index on \
`(id) WHERE done_at IS NULL` to stay fast.";

/// The `postgres_outbox` source's spec.
pub fn spec() -> ComponentSpec {
    let mut spec = ComponentSpec::new(
        "postgres_outbox",
        ComponentKind::Source,
        "Deliver a PostgreSQL transactional outbox table in id order, removing rows after ack",
    )
    .description(DESCRIPTION);
    for field in crate::sql::connection_fields() {
        spec = spec.field(field);
    }
    spec.field(
        FieldSpec::new("table", FieldType::String, "The outbox table, `name` or `schema.name`.")
            .default_value("outbox"),
    )
    .field(
        FieldSpec::new("batch_size", FieldType::Integer { min: Some(1), max: Some(10_000) }, "Rows locked and delivered per transaction.")
            .default_value(100),
    )
    .field(
        FieldSpec::new("interval", FieldType::Duration, "Wait when the outbox is empty, and after a nack.")
            .default_value("1s"),
    )
    .field(
        FieldSpec::new("on_ack", FieldType::Enum(vec!["delete", "mark"]), "Delete acknowledged rows, or set their `done_at`.")
            .default_value("delete"),
    )
    .example(
        "Publish the order service's outbox",
        "url: postgres://sluice@127.0.0.1:5432/shop\ntable: outbox\nbatch_size: 200\ninterval: 500ms\n",
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OnAck {
    Delete,
    Mark,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_table")]
    table: String,
    #[serde(default = "default_batch")]
    batch_size: i64,
    #[serde(default = "default_interval")]
    interval: HumanDuration,
    #[serde(default = "default_on_ack")]
    on_ack: OnAck,
}

fn default_table() -> String {
    "outbox".into()
}
fn default_batch() -> i64 {
    100
}
fn default_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_on_ack() -> OnAck {
    OnAck::Delete
}

struct OutboxSource {
    db: Arc<PgDatabase>,
    select: String,
    settle: String,
    batch_size: i64,
    interval: Duration,
}

/// Builds the `postgres_outbox` source.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Box<dyn Source>, BuildError> {
    let (url, options, rest) = crate::sql::take_connection(config)?;
    let c: Config = crate::config::parse(&rest)?;
    let table = Backend::Postgres.quote_ident(&c.table).ok_or_else(|| {
        BuildError::field(
            "table",
            "must be `name` or `schema.name` made of letters, digits and `_`",
        )
    })?;
    if c.batch_size < 1 {
        return Err(BuildError::field("batch_size", "must be at least 1"));
    }
    if c.interval.0.is_zero() {
        return Err(BuildError::field("interval", "must be longer than 0s"));
    }
    let (pending, settle) = match c.on_ack {
        OnAck::Delete => ("", format!("DELETE FROM {table} WHERE id IN ")),
        OnAck::Mark => (
            " WHERE done_at IS NULL",
            format!("UPDATE {table} SET done_at = now() WHERE id IN "),
        ),
    };
    Ok(Box::new(OutboxSource {
        db: super::pool::shared(ctx.resources, &url, &options)?,
        select: format!(
            "SELECT id, payload, headers, created_at FROM {table}{pending} ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
        ),
        settle,
        batch_size: c.batch_size,
        interval: c.interval.0,
    }))
}

/// A row made into a message; its id.
fn message_of(row: &Row) -> Result<(i64, Message), String> {
    let id: i64 = match row.columns()[0].type_() {
        &Type::INT2 => i64::from(row.try_get::<_, i16>(0).map_err(|e| e.to_string())?),
        &Type::INT4 => i64::from(row.try_get::<_, i32>(0).map_err(|e| e.to_string())?),
        &Type::INT8 => row.try_get::<_, i64>(0).map_err(|e| e.to_string())?,
        other => {
            return Err(format!(
                "`id` is of type {other}; it must be an integer column"
            ));
        }
    };
    let body = match row.columns()[1].type_() {
        &Type::JSON | &Type::JSONB => row
            .try_get::<_, Option<Value>>(1)
            .map(|v| Body::from_json(v.unwrap_or(Value::Null))),
        &Type::BYTEA => row
            .try_get::<_, Option<Vec<u8>>>(1)
            .map(|v| Body::from_bytes(v.unwrap_or_default())),
        _ => row
            .try_get::<_, Option<String>>(1)
            .map(|v| Body::from_bytes(v.unwrap_or_default())),
    }
    .map_err(|e| format!("cannot read `payload`: {e}"))?;
    let mut msg = Message::new(body).with_header(ID_HEADER, id.to_string());
    let headers: Option<Value> = row
        .try_get(2)
        .map_err(|e| format!("cannot read `headers` (it must be json or jsonb): {e}"))?;
    if let Some(Value::Object(map)) = headers {
        for (name, value) in map {
            let value = match value {
                Value::String(s) => s,
                other => other.to_string(),
            };
            msg.headers.insert(name, value);
        }
    }
    if let Ok(Some(at)) = row.try_get::<_, Option<chrono::DateTime<chrono::Utc>>>(3) {
        msg.headers.insert(
            CREATED_AT_HEADER.to_owned(),
            at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        );
    }
    Ok((id, msg))
}

impl OutboxSource {
    /// One batch: lock, deliver, settle, commit. `Ok(n)` with the rows read and whether any
    /// failed.
    async fn batch(&self, ctx: &SourceContext) -> Result<(usize, bool), ProcessError> {
        let what = self.db.describe().to_owned();
        let fail = |e: tokio_postgres::Error| error(&what, &e);
        let client = self.db.client().await?;
        // The transaction is driven by hand so that settling and committing take one round trip:
        // the shorter the time between the flow's commit and ours, the fewer rows a connection
        // lost in between makes the source deliver twice.
        client.batch_execute("BEGIN").await.map_err(fail)?;
        let result = self.locked_batch(&client, ctx).await;
        if result.is_err() {
            // Leaves the pooled connection clean; a broken one is dropped by the pool.
            let _ = client.batch_execute("ROLLBACK").await;
        }
        result
    }

    async fn locked_batch(
        &self,
        client: &deadpool_postgres::Object,
        ctx: &SourceContext,
    ) -> Result<(usize, bool), ProcessError> {
        let what = self.db.describe().to_owned();
        let fail = |e: tokio_postgres::Error| error(&what, &e);
        let select = client.prepare_cached(&self.select).await.map_err(fail)?;
        let rows = client
            .query(&select, &[&self.batch_size])
            .await
            .map_err(fail)?;
        let mut pending = Vec::with_capacity(rows.len());
        for row in &rows {
            let (id, msg) = message_of(row).map_err(ProcessError::invalid_input)?;
            pending.push((id, admit(ctx, msg).await));
        }
        let mut done = Vec::with_capacity(pending.len());
        let mut failed = false;
        for (id, outcome) in pending {
            if matches!(outcome.await, Ok(Outcome::Ack)) {
                done.push(id.to_string());
            } else {
                failed = true;
            }
        }
        // The ids are integers read from the table, so formatting them into SQL is safe.
        let finish = if done.is_empty() {
            "COMMIT".to_owned()
        } else {
            format!("{}({}); COMMIT", self.settle, done.join(","))
        };
        client.batch_execute(&finish).await.map_err(fail)?;
        Ok((rows.len(), failed))
    }
}

#[async_trait]
impl Source for OutboxSource {
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let health = HealthHandle::for_source(&ctx);
        let mut backoff = Backoff::default();
        while !ctx.shutdown.is_cancelled() {
            let wait = match self.batch(&ctx).await {
                Ok((read, failed)) => {
                    health.healthy();
                    backoff.reset();
                    if read == 0 || failed {
                        Some(self.interval)
                    } else {
                        None
                    }
                }
                Err(e) => {
                    health.unhealthy(format!("{}; retrying (backoff up to 1s)", e.detail));
                    if backoff.failures().is_multiple_of(10) {
                        tracing::warn!(flow = %ctx.flow, error = %e, "postgres_outbox batch failed; its rows stay in the outbox");
                    }
                    Some(backoff.next_delay())
                }
            };
            if let Some(wait) = wait
                && !pause(&ctx, wait).await
            {
                break;
            }
        }
        Ok(())
    }
}
