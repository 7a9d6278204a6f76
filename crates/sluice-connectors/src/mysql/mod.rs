//! MariaDB/MySQL (mysql_async): the database behind the `sql` processor and sink for
//! `mysql://` and `mariadb://` urls. One pool per url and settings, shared through
//! [`Resources`]; batches are one multi-row `INSERT` in one transaction.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use mysql_async::consts::ColumnType;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Params, Pool, PoolConstraints, PoolOpts, Row, TxOpts};
use serde_json::{Map, Number, Value};
use sluice_core::{BuildError, ErrorKind, ProcessError, Resources};

use crate::sql::{
    ConnectionOptions, Database, Mode, OnConflict, RowData, WritePlan, redact, timed_out,
    unavailable,
};

/// Most placeholders MySQL takes in one statement.
const MAX_PLACEHOLDERS: usize = 65_535;
/// The `binary` character set: such string columns hold bytes.
const BINARY_CHARSET: u16 = 63;

/// The pools of the process, by url and settings.
#[derive(Default)]
pub struct MysqlPools {
    pools: Mutex<HashMap<String, Arc<MysqlDatabase>>>,
}

/// The shared database for `url` and `options`.
pub fn database(
    resources: &Resources,
    url: &str,
    options: &ConnectionOptions,
) -> Result<Arc<dyn Database>, BuildError> {
    let key = format!(
        "{url}\u{0}{}\u{0}{:?}\u{0}{:?}",
        options.pool_size, options.statement_timeout.0, options.connect_timeout.0
    );
    let pools = resources.get_or_default::<MysqlPools>();
    let mut pools = match pools.pools.lock() {
        Ok(p) => p,
        // Inserting is the only change and cannot be left half done.
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(db) = pools.get(&key) {
        return Ok(Arc::clone(db) as Arc<dyn Database>);
    }
    let db = Arc::new(MysqlDatabase {
        pool: Pool::new(opts(url, options)?),
        what: format!("MariaDB/MySQL at {}", redact(url)),
        timeout: options.statement_timeout.0,
        connect_timeout: options.connect_timeout.0,
    });
    pools.insert(key, Arc::clone(&db));
    Ok(db as Arc<dyn Database>)
}

fn opts(url: &str, options: &ConnectionOptions) -> Result<Opts, BuildError> {
    // mysql_async knows only the `mysql` scheme; `mariadb://` is the same protocol.
    let url = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("mariadb") => format!("mysql://{rest}"),
        _ => url.to_owned(),
    };
    let parsed = Opts::from_url(&url).map_err(|e| {
        BuildError::field("url", format!("`{}` is not a MySQL url: {e}", redact(&url)))
    })?;
    let constraints = PoolConstraints::new(0, options.pool_size)
        .ok_or_else(|| BuildError::field("pool_size", "must be at least 1"))?;
    Ok(OptsBuilder::from_opts(parsed)
        .pool_opts(PoolOpts::default().with_constraints(constraints))
        .into())
}

/// A pooled MariaDB/MySQL database.
pub struct MysqlDatabase {
    pool: Pool,
    what: String,
    timeout: Duration,
    connect_timeout: Duration,
}

fn error(what: &str, e: &mysql_async::Error) -> ProcessError {
    match e {
        mysql_async::Error::Server(server) => {
            // 1062 duplicate key, 1048 NULL in NOT NULL, 1264/1265/1366/1292 bad values,
            // 1451/1452 foreign keys, 1406 too long, 4025 CHECK constraint: the row's fault.
            let kind = match server.code {
                1048 | 1062 | 1264 | 1265 | 1292 | 1366 | 1406 | 1451 | 1452 | 3819 | 4025 => {
                    ErrorKind::InvalidInput
                }
                1969 | 3024 => ErrorKind::Timeout,
                _ => ErrorKind::Remote,
            };
            ProcessError::new(
                kind,
                format!(
                    "{what} refused the statement: {} (error {}, SQLSTATE {})",
                    server.message, server.code, server.state
                ),
            )
        }
        other => unavailable(what, other),
    }
}

/// A JSON value as a MySQL parameter: objects and arrays as JSON text.
fn param(value: &Value) -> mysql_async::Value {
    match value {
        Value::Null => mysql_async::Value::NULL,
        Value::Bool(b) => mysql_async::Value::Int(i64::from(*b)),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => mysql_async::Value::Int(i),
            (None, Some(u)) => mysql_async::Value::UInt(u),
            _ => mysql_async::Value::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => mysql_async::Value::Bytes(s.as_bytes().to_vec()),
        other => mysql_async::Value::Bytes(other.to_string().into_bytes()),
    }
}

fn params(values: &[Value]) -> Params {
    if values.is_empty() {
        Params::Empty
    } else {
        Params::Positional(values.iter().map(param).collect())
    }
}

fn float(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// A row as a JSON object, column name -> value.
fn row_to_json(row: &Row) -> Value {
    let mut object = Map::new();
    for (i, column) in row.columns_ref().iter().enumerate() {
        let value = row.as_ref(i).map_or(Value::Null, |v| {
            value_to_json(v, column.column_type(), column.character_set())
        });
        object.insert(column.name_str().into_owned(), value);
    }
    Value::Object(object)
}

fn value_to_json(value: &mysql_async::Value, ty: ColumnType, charset: u16) -> Value {
    use mysql_async::Value as V;
    match value {
        V::NULL => Value::Null,
        V::Int(i) => Value::from(*i),
        V::UInt(u) => Value::from(*u),
        V::Float(f) => float(f64::from(*f)),
        V::Double(f) => float(*f),
        V::Date(y, mo, d, h, mi, s, us) => Value::String(match ty {
            ColumnType::MYSQL_TYPE_DATE | ColumnType::MYSQL_TYPE_NEWDATE => {
                format!("{y:04}-{mo:02}-{d:02}")
            }
            _ if *us > 0 => format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}Z"),
            _ => format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z"),
        }),
        V::Time(negative, days, h, mi, s, us) => {
            let hours = u32::from(*h) + days * 24;
            let sign = if *negative { "-" } else { "" };
            Value::String(if *us > 0 {
                format!("{sign}{hours:02}:{mi:02}:{s:02}.{us:06}")
            } else {
                format!("{sign}{hours:02}:{mi:02}:{s:02}")
            })
        }
        V::Bytes(bytes) => match ty {
            ColumnType::MYSQL_TYPE_JSON => serde_json::from_slice(bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned())),
            ColumnType::MYSQL_TYPE_DECIMAL | ColumnType::MYSQL_TYPE_NEWDECIMAL => {
                let text = String::from_utf8_lossy(bytes);
                text.parse::<i64>().map_or_else(
                    |_| {
                        text.parse::<f64>()
                            .map_or_else(|_| Value::String(text.to_string()), float)
                    },
                    Value::from,
                )
            }
            ColumnType::MYSQL_TYPE_TINY_BLOB
            | ColumnType::MYSQL_TYPE_MEDIUM_BLOB
            | ColumnType::MYSQL_TYPE_LONG_BLOB
            | ColumnType::MYSQL_TYPE_BLOB
            | ColumnType::MYSQL_TYPE_STRING
            | ColumnType::MYSQL_TYPE_VAR_STRING
            | ColumnType::MYSQL_TYPE_VARCHAR
            | ColumnType::MYSQL_TYPE_BIT
            | ColumnType::MYSQL_TYPE_GEOMETRY
                if charset == BINARY_CHARSET =>
            {
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
            _ => Value::String(String::from_utf8_lossy(bytes).into_owned()),
        },
    }
}

/// The multi-row `INSERT` for `rows` rows of `plan`.
fn insert_statement(plan: &WritePlan, rows: usize) -> String {
    let one = format!("({})", vec!["?"; plan.columns.len()].join(", "));
    let verb = if plan.on_conflict == OnConflict::Ignore {
        "INSERT IGNORE"
    } else {
        "INSERT"
    };
    let mut sql = format!(
        "{verb} INTO {} ({}) VALUES {}",
        plan.table,
        plan.columns.join(", "),
        vec![one.as_str(); rows].join(", ")
    );
    if plan.on_conflict == OnConflict::Upsert {
        let updates: Vec<String> = plan
            .columns
            .iter()
            .enumerate()
            .filter(|(i, _)| !plan.key.contains(i))
            .map(|(_, c)| format!("{c} = VALUES({c})"))
            .collect();
        // With only key columns there is nothing to update: a no-op keeps the statement valid.
        let updates = if updates.is_empty() {
            let k = &plan.columns[plan.key[0]];
            format!("{k} = {k}")
        } else {
            updates.join(", ")
        };
        sql.push_str(&format!(" ON DUPLICATE KEY UPDATE {updates}"));
    }
    sql
}

impl MysqlDatabase {
    async fn conn(&self) -> Result<Conn, ProcessError> {
        match tokio::time::timeout(self.connect_timeout, self.pool.get_conn()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(error(&self.what, &e)),
            Err(_) => Err(unavailable(
                &self.what,
                "no connection within connect_timeout",
            )),
        }
    }

    async fn run_query(
        &self,
        sql: &str,
        values: &[Value],
        mode: Mode,
    ) -> Result<Value, ProcessError> {
        let mut conn = self.conn().await?;
        let fail = |e: mysql_async::Error| error(&self.what, &e);
        match mode {
            Mode::Count => {
                let rows: Vec<Row> = conn.exec(sql, params(values)).await.map_err(fail)?;
                // A SELECT counts its rows; a write the rows it affected.
                let n = if rows.is_empty() {
                    conn.affected_rows()
                } else {
                    rows.len() as u64
                };
                Ok(Value::from(n))
            }
            Mode::Rows => {
                let rows: Vec<Row> = conn.exec(sql, params(values)).await.map_err(fail)?;
                Ok(Value::Array(rows.iter().map(row_to_json).collect()))
            }
            Mode::First => {
                let rows: Vec<Row> = conn.exec(sql, params(values)).await.map_err(fail)?;
                Ok(rows.first().map_or(Value::Null, row_to_json))
            }
        }
    }

    async fn run_write(&self, plan: &WritePlan, rows: &[&RowData]) -> Result<(), ProcessError> {
        let fail = |e: mysql_async::Error| error(&self.what, &e);
        let mut conn = self.conn().await?;
        let mut tx = conn
            .start_transaction(TxOpts::default())
            .await
            .map_err(fail)?;
        let per_statement = (MAX_PLACEHOLDERS / plan.columns.len().max(1)).max(1);
        for chunk in rows.chunks(per_statement) {
            let mut values: Vec<mysql_async::Value> =
                Vec::with_capacity(chunk.len() * plan.columns.len());
            for row in chunk {
                match row {
                    RowData::Values(row) => values.extend(row.iter().map(param)),
                    RowData::CopyText(_) => {
                        return Err(ProcessError::new(
                            ErrorKind::Internal,
                            "a PostgreSQL row reached the MySQL writer",
                        ));
                    }
                }
            }
            tx.exec_drop(
                insert_statement(plan, chunk.len()),
                Params::Positional(values),
            )
            .await
            .map_err(fail)?;
        }
        tx.commit().await.map_err(fail)
    }
}

#[async_trait]
impl Database for MysqlDatabase {
    async fn query(&self, sql: &str, params: &[Value], mode: Mode) -> Result<Value, ProcessError> {
        tokio::time::timeout(self.timeout, self.run_query(sql, params, mode))
            .await
            .unwrap_or_else(|_| Err(timed_out(&self.what, self.timeout)))
    }

    async fn write(&self, plan: &WritePlan, rows: &[&RowData]) -> Result<(), ProcessError> {
        self.run_write(plan, rows).await
    }

    fn describe(&self) -> &str {
        &self.what
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(on_conflict: OnConflict, key: Vec<usize>) -> WritePlan {
        WritePlan {
            table: "`t`".into(),
            columns: vec!["`id`".into(), "`name`".into()],
            on_conflict,
            key,
        }
    }

    #[test]
    fn insert_statements_per_conflict_rule() {
        assert_eq!(
            insert_statement(&plan(OnConflict::Error, vec![]), 2),
            "INSERT INTO `t` (`id`, `name`) VALUES (?, ?), (?, ?)"
        );
        assert_eq!(
            insert_statement(&plan(OnConflict::Upsert, vec![0]), 1),
            "INSERT INTO `t` (`id`, `name`) VALUES (?, ?) ON DUPLICATE KEY UPDATE `name` = VALUES(`name`)"
        );
        assert_eq!(
            insert_statement(&plan(OnConflict::Ignore, vec![0]), 1),
            "INSERT IGNORE INTO `t` (`id`, `name`) VALUES (?, ?)"
        );
    }

    #[test]
    fn values_map_to_json() {
        use mysql_async::Value as V;
        assert_eq!(
            value_to_json(&V::Int(-3), ColumnType::MYSQL_TYPE_LONG, 63),
            json!(-3)
        );
        assert_eq!(
            value_to_json(
                &V::Bytes(b"12.50".to_vec()),
                ColumnType::MYSQL_TYPE_NEWDECIMAL,
                63
            ),
            json!(12.5)
        );
        assert_eq!(
            value_to_json(
                &V::Bytes(vec![1, 2]),
                ColumnType::MYSQL_TYPE_BLOB,
                BINARY_CHARSET
            ),
            json!("AQI=")
        );
        assert_eq!(
            value_to_json(
                &V::Bytes(b"hi".to_vec()),
                ColumnType::MYSQL_TYPE_VAR_STRING,
                45
            ),
            json!("hi")
        );
        assert_eq!(
            value_to_json(
                &V::Date(2024, 5, 1, 10, 0, 7, 0),
                ColumnType::MYSQL_TYPE_DATETIME,
                63
            ),
            json!("2024-05-01T10:00:07Z")
        );
        assert_eq!(
            value_to_json(
                &V::Date(2024, 5, 1, 0, 0, 0, 0),
                ColumnType::MYSQL_TYPE_DATE,
                63
            ),
            json!("2024-05-01")
        );
        assert!(matches!(param(&json!({"a": 1})), V::Bytes(b) if b == br#"{"a":1}"#));
        assert!(matches!(param(&json!(true)), V::Int(1)));
    }
}
