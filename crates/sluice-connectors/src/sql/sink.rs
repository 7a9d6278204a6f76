//! The `sql` sink: gathers concurrent deliveries into batches and writes each batch in one
//! transaction (PostgreSQL `COPY`, MariaDB/MySQL one multi-row `INSERT`).
//!
//! **Architecture Invariant:** a delivery returns `Ok` only after the transaction holding its row
//! committed; a batch that fails fails every delivery in it, except that a batch refused for its
//! data (a constraint, a bad value) is written again row by row, so one bad message fails alone.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::component::JqProgram;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, ErrorKind, HealthHandle, Message, ProcessError, Sink};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::processor::{first_output, report};
use super::{Backend, Database, OnConflict, RowData, WritePlan};

const DESCRIPTION: &str = "\
Inserts one row per message into `table` of the database at `url`, in batches: deliveries that \
arrive together (from the flow's concurrent messages) are gathered until `batch_size` rows or \
`batch_wait` after the first, then written in **one transaction** (PostgreSQL: `COPY`, through a \
staging temporary table for `upsert`/`ignore`; MariaDB/MySQL: one multi-row `INSERT`). \
`columns` maps the body to the row: a list of names takes the body's fields of the same names \
(a missing field is NULL), a map gives a jq expression per column (`{total: \".amount * 100\"}`).

`on_conflict: upsert` updates the other columns of the row whose `key` columns match \
(PostgreSQL `ON CONFLICT (key) DO UPDATE`, MySQL `ON DUPLICATE KEY UPDATE`); rows of one batch \
with the same key are merged first, the last one winning. `ignore` keeps the existing row. \
`error` (the default) fails on a duplicate key.

**Delivery guarantee.** at-least-once: a message is acknowledged only after the transaction \
holding its row committed. A failed batch fails every message in it (the flow's error handling \
retries them); a batch refused for its data (a constraint violation, a value of the wrong type) \
is written again one row per transaction, so only the bad messages fail, as `invalid_input`. A \
redelivered message inserts its row again unless the table has a key: use `upsert` or `ignore` \
with a key for exactly-once rows.

**Limits.** Values are sent as text and parsed by the database into the column's type: JSON \
objects and arrays become JSON text (for `json`/`jsonb` columns), booleans `t`/`f` (PostgreSQL) or \
1/0 (MySQL); PostgreSQL arrays and `bytea` need their text forms (`{1,2}`, `\\\\x0102`). Up to \
`parallel_batches` batches are written at once, so rows of different batches may commit out of \
order. The database down is `unavailable` (retryable) and the sink reports unhealthy until a \
batch commits again.";

/// The `sql` sink's spec.
pub fn spec() -> ComponentSpec {
    let mut spec = ComponentSpec::new(
        "sql",
        ComponentKind::Sink,
        "Insert or upsert rows into PostgreSQL or MariaDB/MySQL in batched transactions",
    )
    .description(DESCRIPTION);
    for field in super::connection_fields() {
        spec = spec.field(field);
    }
    spec.field(
        FieldSpec::new("table", FieldType::String, "Table to write, `name` or `schema.name` (letters, digits and `_`).")
            .required(),
    )
    .field(
        FieldSpec::new(
            "columns",
            FieldType::OneOf(vec![
                FieldType::List(Box::new(FieldType::String)),
                FieldType::Map(Box::new(FieldType::Jq)),
            ]),
            "The row: a list of column names taken from the body's fields of the same names, or a map of column name to jq expression.",
        )
        .required(),
    )
    .field(
        FieldSpec::new("on_conflict", FieldType::Enum(vec!["error", "upsert", "ignore"]), "What a row whose key exists does: fail, update the existing row, or be dropped.")
            .default_value("error"),
    )
    .field(FieldSpec::new(
        "key",
        FieldType::List(Box::new(FieldType::String)),
        "Key columns (a primary key or unique index) for `upsert` and `ignore`; among `columns`.",
    ))
    .field(
        FieldSpec::new("batch_size", FieldType::Integer { min: Some(1), max: Some(100_000) }, "Most rows in one transaction.")
            .default_value(500),
    )
    .field(
        FieldSpec::new("batch_wait", FieldType::Duration, "Longest a row waits for others to join its batch.")
            .default_value("5ms"),
    )
    .field(
        FieldSpec::new("parallel_batches", FieldType::Integer { min: Some(1), max: Some(64) }, "Batches written at once (each takes a pooled connection); 1 keeps commit order.")
            .default_value(2),
    )
    .example(
        "Upsert customers by id (PostgreSQL)",
        "url: postgres://sluice@127.0.0.1:5432/shop\ntable: customers\ncolumns: [id, name, email]\non_conflict: upsert\nkey: [id]\n",
    )
    .example(
        "Append order events with computed columns (MariaDB)",
        "url: mysql://sluice@127.0.0.1:3306/shop\ntable: order_events\ncolumns:\n  order_id: .id\n  amount_cents: .amount * 100 | floor\n  tenant: $headers.tenant\n  doc: .\nbatch_size: 1000\n",
    )
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ColumnsConfig {
    Names(Vec<String>),
    Map(BTreeMap<String, String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    table: String,
    columns: ColumnsConfig,
    #[serde(default = "default_on_conflict")]
    on_conflict: OnConflict,
    #[serde(default)]
    key: Vec<String>,
    #[serde(default = "default_batch_size")]
    batch_size: usize,
    #[serde(default = "default_batch_wait")]
    batch_wait: HumanDuration,
    #[serde(default = "default_parallel")]
    parallel_batches: usize,
}

fn default_on_conflict() -> OnConflict {
    OnConflict::Error
}
fn default_batch_size() -> usize {
    500
}
fn default_batch_wait() -> HumanDuration {
    HumanDuration(Duration::from_millis(5))
}
fn default_parallel() -> usize {
    2
}

/// How a row is taken from a message.
enum Columns {
    /// The body's fields of these names.
    Fields(Vec<String>),
    /// One jq expression per column.
    Jq(Vec<Arc<dyn JqProgram>>),
}

impl Columns {
    /// The row of `msg`, encoded by `db`, and its key (JSON text of the key columns) when
    /// `key` names some.
    async fn row(
        &self,
        msg: &Message,
        db: &dyn Database,
        key: &[usize],
    ) -> Result<(RowData, Option<String>), ProcessError> {
        let encode = |values: &[&Value]| {
            let key = (!key.is_empty()).then(|| {
                serde_json::to_string(&key.iter().map(|&i| values[i]).collect::<Vec<_>>())
                    .unwrap_or_default()
            });
            (db.encode(values), key)
        };
        match self {
            Columns::Fields(names) => {
                let body = msg
                    .body
                    .json()
                    .map_err(|e| ProcessError::invalid_input(e.to_string()))?;
                let Value::Object(map) = body else {
                    return Err(ProcessError::invalid_input(
                        "the body must be a JSON object whose fields are the columns",
                    ));
                };
                let values: Vec<&Value> = names
                    .iter()
                    .map(|n| map.get(n).unwrap_or(&Value::Null))
                    .collect();
                Ok(encode(&values))
            }
            Columns::Jq(programs) => {
                let body = msg
                    .body
                    .json_shared()
                    .map_err(|e| ProcessError::invalid_input(e.to_string()))?;
                let mut row = Vec::with_capacity(programs.len());
                for program in programs {
                    row.push(first_output(program.as_ref(), &body, msg).await?);
                }
                let values: Vec<&Value> = row.iter().collect();
                Ok(encode(&values))
            }
        }
    }
}

/// One row waiting for its batch to commit.
struct Pending {
    row: RowData,
    /// The key columns' values as JSON text (upsert and ignore only).
    key: Option<String>,
    done: oneshot::Sender<Result<(), ProcessError>>,
}

/// What the batch writer needs.
struct Writer {
    db: Arc<dyn Database>,
    plan: WritePlan,
    batch_size: usize,
    batch_wait: Duration,
    parallel: usize,
    timeout: Duration,
    health: HealthHandle,
}

struct SqlSink {
    columns: Columns,
    writer: Arc<Writer>,
    /// The batch writer's queue, started on first delivery (build may run outside a runtime).
    queue: OnceLock<mpsc::Sender<Pending>>,
}

/// Builds the `sql` sink.
pub fn build(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Sink>, BuildError> {
    let (url, options, rest) = super::take_connection(config)?;
    let c: Config = crate::config::parse(&rest)?;
    let backend =
        Backend::of(&url).ok_or_else(|| BuildError::field("url", "is not a database url"))?;
    let table = backend.quote_ident(&c.table).ok_or_else(|| {
        BuildError::field(
            "table",
            "must be `name` or `schema.name` made of letters, digits and `_`",
        )
    })?;
    let (names, columns) = match c.columns {
        ColumnsConfig::Names(names) => (names.clone(), Columns::Fields(names)),
        ColumnsConfig::Map(map) => {
            let mut names = Vec::new();
            let mut programs = Vec::new();
            for (name, code) in map {
                programs.push(ctx.steps.compile_jq(&format!("columns.{name}"), &code)?);
                names.push(name);
            }
            (names, Columns::Jq(programs))
        }
    };
    if names.is_empty() {
        return Err(BuildError::field("columns", "name at least one column"));
    }
    let mut quoted = Vec::with_capacity(names.len());
    for name in &names {
        quoted.push(
            backend
                .quote_ident(name)
                .filter(|_| !name.contains('.'))
                .ok_or_else(|| {
                    BuildError::field(
                        "columns",
                        format!("`{name}` is not a plain column name (letters, digits and `_`)"),
                    )
                })?,
        );
    }
    if names
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        != names.len()
    {
        return Err(BuildError::field("columns", "names a column twice"));
    }
    let mut key = Vec::new();
    for k in &c.key {
        let index = names.iter().position(|n| n == k).ok_or_else(|| {
            BuildError::field("key", format!("`{k}` is not among `columns`; add it there"))
        })?;
        key.push(index);
    }
    if c.on_conflict == OnConflict::Upsert && key.is_empty() {
        return Err(BuildError::field(
            "key",
            "`on_conflict: upsert` needs the key columns (a primary key or unique index)",
        ));
    }
    if c.on_conflict == OnConflict::Error && !key.is_empty() {
        return Err(BuildError::field(
            "key",
            "is only used with `on_conflict: upsert` or `ignore`; remove it or set `on_conflict`",
        ));
    }
    if c.batch_size == 0 {
        return Err(BuildError::field("batch_size", "must be at least 1"));
    }
    if c.parallel_batches == 0 {
        return Err(BuildError::field("parallel_batches", "must be at least 1"));
    }
    let db = super::open(ctx.resources, &url, &options)?;
    Ok(Arc::new(SqlSink {
        columns,
        writer: Arc::new(Writer {
            db,
            plan: WritePlan {
                table,
                columns: quoted,
                on_conflict: c.on_conflict,
                key,
            },
            batch_size: c.batch_size,
            batch_wait: c.batch_wait.0,
            parallel: c.parallel_batches,
            timeout: options.statement_timeout.0,
            health: HealthHandle::for_component(ctx),
        }),
        queue: OnceLock::new(),
    }))
}

#[async_trait]
impl Sink for SqlSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        let (row, key) = self
            .columns
            .row(msg, self.writer.db.as_ref(), &self.writer.plan.key)
            .await?;
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(self.writer.batch_size * (self.writer.parallel + 1));
            tokio::spawn(Arc::clone(&self.writer).run(rx));
            tx
        });
        let (done, committed) = oneshot::channel();
        queue
            .send(Pending { row, key, done })
            .await
            .map_err(|_| ProcessError::new(ErrorKind::Internal, "the sql batch writer stopped"))?;
        committed.await.map_err(|_| {
            ProcessError::new(ErrorKind::Internal, "the sql batch writer dropped the row")
        })?
    }
}

impl Writer {
    /// Gathers rows into batches until every sender is gone.
    async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<Pending>) {
        let slots = Arc::new(Semaphore::new(self.parallel));
        while let Some(first) = rx.recv().await {
            let deadline = Instant::now() + self.batch_wait;
            // Waiting for a free slot first lets the batch fill with what arrives meanwhile.
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                break;
            };
            let mut batch = Vec::with_capacity(self.batch_size);
            batch.push(first);
            while batch.len() < self.batch_size {
                let room = self.batch_size - batch.len();
                // Whatever is queued now joins at once; then wait for more until the deadline.
                if rx.is_empty() {
                    match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)).await {
                        Ok(n) if n > 0 => {}
                        _ => break,
                    }
                } else {
                    rx.recv_many(&mut batch, room).await;
                }
            }
            let writer = Arc::clone(&self);
            tokio::spawn(async move {
                writer.flush(batch).await;
                drop(slot);
            });
        }
    }

    async fn flush(&self, batch: Vec<Pending>) {
        let rows = self.merge_keys(&batch);
        let result = self.write(&rows).await;
        match result {
            Err(e) if e.kind == ErrorKind::InvalidInput && batch.len() > 1 => {
                tracing::debug!(table = %self.plan.table, rows = batch.len(), error = %e, "batch refused for its data; writing its rows one by one");
                for pending in batch {
                    let result = self.write(&[&pending.row]).await;
                    let _ = pending.done.send(result);
                }
            }
            result => {
                for pending in batch {
                    let _ = pending.done.send(result.clone());
                }
            }
        }
    }

    async fn write(&self, rows: &[&RowData]) -> Result<(), ProcessError> {
        let result = match tokio::time::timeout(
            self.timeout + Duration::from_secs(1),
            self.db.write(&self.plan, rows),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(super::timed_out(self.db.describe(), self.timeout)),
        };
        report(&self.health, self.db.describe(), &result);
        result
    }

    /// The batch's rows; for upsert and ignore one row per key (upsert: the last wins;
    /// ignore: the first), as one statement may not touch a row twice.
    fn merge_keys<'a>(&self, batch: &'a [Pending]) -> Vec<&'a RowData> {
        if self.plan.on_conflict == OnConflict::Error || self.plan.key.is_empty() {
            return batch.iter().map(|p| &p.row).collect();
        }
        let mut position: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
        let mut rows: Vec<&RowData> = Vec::with_capacity(batch.len());
        for pending in batch {
            let key = pending.key.as_deref().unwrap_or("");
            match position.get(key) {
                Some(&at) if self.plan.on_conflict == OnConflict::Upsert => rows[at] = &pending.row,
                Some(_) => {}
                None => {
                    position.insert(key, rows.len());
                    rows.push(&pending.row);
                }
            }
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Nothing;

    #[async_trait]
    impl Database for Nothing {
        async fn query(
            &self,
            _: &str,
            _: &[Value],
            _: super::super::Mode,
        ) -> Result<Value, ProcessError> {
            Ok(Value::Null)
        }
        async fn write(&self, _: &WritePlan, _: &[&RowData]) -> Result<(), ProcessError> {
            Ok(())
        }
        fn describe(&self) -> &str {
            "nothing"
        }
    }

    fn writer(on_conflict: OnConflict, key: Vec<usize>) -> Writer {
        let resources = sluice_core::Resources::default();
        Writer {
            db: Arc::new(Nothing),
            plan: WritePlan {
                table: "t".into(),
                columns: vec!["a".into(), "b".into()],
                on_conflict,
                key,
            },
            batch_size: 10,
            batch_wait: Duration::ZERO,
            parallel: 1,
            timeout: Duration::from_secs(1),
            health: HealthHandle::new(&resources, "f", "s"),
        }
    }

    fn pending(a: i64, b: &str) -> Pending {
        let (done, _) = oneshot::channel();
        Pending {
            row: RowData::Values(vec![json!(a), json!(b)]),
            key: Some(json!([a]).to_string()),
            done,
        }
    }

    fn row(a: i64, b: &str) -> RowData {
        RowData::Values(vec![json!(a), json!(b)])
    }

    #[test]
    fn upsert_merges_rows_of_one_key_last_wins_and_ignore_keeps_the_first() {
        let batch = vec![pending(1, "x"), pending(2, "y"), pending(1, "z")];
        let rows = writer(OnConflict::Upsert, vec![0]).merge_keys(&batch);
        assert_eq!(rows, vec![&row(1, "z"), &row(2, "y")]);
        let rows = writer(OnConflict::Ignore, vec![0]).merge_keys(&batch);
        assert_eq!(rows, vec![&row(1, "x"), &row(2, "y")]);
        assert_eq!(
            writer(OnConflict::Error, vec![]).merge_keys(&batch).len(),
            3
        );
    }
}
