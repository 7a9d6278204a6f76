//! [`Database`] for PostgreSQL: prepared, cached statements on pooled connections; batches
//! written with `COPY` in one transaction.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Object, Pool, PoolError};
use futures_util::SinkExt;
use serde_json::Value;
use sluice_core::{ErrorKind, ProcessError};
use tokio_postgres::types::ToSql;

use super::types::{Param, copy_row, row_to_json};
use crate::sql::{Database, Mode, OnConflict, RowData, WritePlan, timed_out, unavailable};

/// A pooled PostgreSQL database.
pub struct PgDatabase {
    pool: Pool,
    what: String,
    timeout: Duration,
}

/// What a tokio-postgres error means for the message.
pub fn error(what: &str, e: &tokio_postgres::Error) -> ProcessError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let kind = match code {
            "57014" => ErrorKind::Timeout,
            c if c.starts_with("22") || c.starts_with("23") => ErrorKind::InvalidInput,
            c if c.starts_with("08") || c.starts_with("53") || c.starts_with("57P") => {
                ErrorKind::Unavailable
            }
            _ => ErrorKind::Remote,
        };
        return ProcessError::new(
            kind,
            format!(
                "{what} refused the statement: {} (SQLSTATE {code})",
                db.message()
            ),
        );
    }
    let text = e.to_string();
    if text.starts_with("error serializing parameter") {
        let cause = std::error::Error::source(e).map_or(String::new(), |s| format!(": {s}"));
        return ProcessError::invalid_input(format!("{text}{cause}"));
    }
    unavailable(what, with_causes(e))
}

/// The error and its causes (`error performing TLS handshake: invalid peer certificate: ...`).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

impl PgDatabase {
    pub(crate) fn new(pool: Pool, what: String, timeout: Duration) -> Self {
        PgDatabase {
            pool,
            what,
            timeout,
        }
    }

    /// The statement timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A pooled connection.
    pub async fn client(&self) -> Result<Object, ProcessError> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => error(&self.what, &e),
            PoolError::Timeout(_) => unavailable(&self.what, "no connection became free in time"),
            other => unavailable(&self.what, other),
        })
    }

    async fn run_query(
        &self,
        sql: &str,
        params: &[Value],
        mode: Mode,
    ) -> Result<Value, ProcessError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(|e| error(&self.what, &e))?;
        if statement.params().len() != params.len() {
            return Err(ProcessError::invalid_input(format!(
                "the query has {} placeholders but `params` gives {} values",
                statement.params().len(),
                params.len()
            )));
        }
        let bound: Vec<Param<'_>> = params.iter().map(Param).collect();
        let refs: Vec<&(dyn ToSql + Sync)> = bound.iter().map(|p| p as _).collect();
        match mode {
            Mode::Count => {
                let n = client
                    .execute(&statement, &refs)
                    .await
                    .map_err(|e| error(&self.what, &e))?;
                Ok(Value::from(n))
            }
            Mode::Rows | Mode::First => {
                let rows = client
                    .query(&statement, &refs)
                    .await
                    .map_err(|e| error(&self.what, &e))?;
                if mode == Mode::First {
                    return rows.first().map_or(Ok(Value::Null), row_to_json);
                }
                rows.iter()
                    .map(row_to_json)
                    .collect::<Result<Vec<_>, _>>()
                    .map(Value::Array)
            }
        }
    }

    async fn run_write(&self, plan: &WritePlan, rows: &[&RowData]) -> Result<(), ProcessError> {
        let fail = |e: tokio_postgres::Error| error(&self.what, &e);
        let mut client = self.client().await?;
        let columns = plan.columns.join(", ");
        let tx = client.transaction().await.map_err(fail)?;
        let staged = plan.on_conflict != OnConflict::Error;
        // Upserts go through a temporary staging table (COPY cannot upsert), one per connection,
        // emptied by every commit.
        let stage = format!(
            "\"sluice_stage_{:016x}\"",
            fnv1a(format!("{}({columns})", plan.table).as_bytes())
        );
        if staged {
            tx.batch_execute(&format!(
                "CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS \
                 SELECT {columns} FROM {} WITH NO DATA",
                plan.table
            ))
            .await
            .map_err(fail)?;
        }
        let mut data = Vec::with_capacity(
            rows.iter()
                .map(|r| match r {
                    RowData::CopyText(line) => line.len(),
                    RowData::Values(_) => 64,
                })
                .sum(),
        );
        for row in rows {
            match row {
                RowData::CopyText(line) => data.extend_from_slice(line),
                RowData::Values(values) => {
                    copy_row(&values.iter().collect::<Vec<_>>(), &mut data);
                }
            }
        }
        let target = if staged { &stage } else { &plan.table };
        let sink = tx
            .copy_in::<_, Bytes>(&format!("COPY {target} ({columns}) FROM STDIN"))
            .await
            .map_err(fail)?;
        futures_util::pin_mut!(sink);
        sink.send(Bytes::from(data)).await.map_err(fail)?;
        sink.finish().await.map_err(fail)?;
        if staged {
            let keys: Vec<&str> = plan.key.iter().map(|&i| plan.columns[i].as_str()).collect();
            let updates: Vec<String> = plan
                .columns
                .iter()
                .enumerate()
                .filter(|(i, _)| !plan.key.contains(i))
                .map(|(_, c)| format!("{c} = EXCLUDED.{c}"))
                .collect();
            let action = if plan.on_conflict == OnConflict::Ignore || updates.is_empty() {
                "DO NOTHING".to_owned()
            } else {
                format!("DO UPDATE SET {}", updates.join(", "))
            };
            let target = if keys.is_empty() {
                String::new()
            } else {
                format!("({})", keys.join(", "))
            };
            tx.execute(
                &format!(
                    "INSERT INTO {} ({columns}) SELECT {columns} FROM {stage} ON CONFLICT {target} {action}",
                    plan.table
                ),
                &[],
            )
            .await
            .map_err(fail)?;
        }
        tx.commit().await.map_err(fail)
    }
}

/// FNV-1a, for a stable staging table name per target.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[async_trait]
impl Database for PgDatabase {
    async fn query(&self, sql: &str, params: &[Value], mode: Mode) -> Result<Value, ProcessError> {
        // The server cancels at `statement_timeout`; this bounds a connection that hangs.
        tokio::time::timeout(
            self.timeout + Duration::from_secs(1),
            self.run_query(sql, params, mode),
        )
        .await
        .unwrap_or_else(|_| Err(timed_out(&self.what, self.timeout)))
    }

    fn encode(&self, row: &[&Value]) -> RowData {
        let mut line = Vec::with_capacity(16 * row.len());
        copy_row(row, &mut line);
        RowData::CopyText(line)
    }

    async fn write(&self, plan: &WritePlan, rows: &[&RowData]) -> Result<(), ProcessError> {
        self.run_write(plan, rows).await
    }

    fn describe(&self) -> &str {
        &self.what
    }
}
