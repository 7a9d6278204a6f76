//! What the SQL connectors share: the `sql` processor and the batching `sql` sink serve both
//! PostgreSQL (`postgres://`) and MariaDB/MySQL (`mysql://`, `mariadb://`), picked by the url's
//! scheme; each database implements [`Database`].

pub mod processor;
pub mod sink;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{FieldSpec, FieldType};
use sluice_core::{BuildError, ErrorKind, ProcessError, Resources};

/// Which database a url names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `postgres://` or `postgresql://`.
    Postgres,
    /// `mysql://` or `mariadb://`.
    Mysql,
}

impl Backend {
    /// The backend of `url`, from its scheme.
    pub fn of(url: &str) -> Option<Backend> {
        let scheme = url.split_once("://")?.0.to_ascii_lowercase();
        match scheme.as_str() {
            "postgres" | "postgresql" => Some(Backend::Postgres),
            "mysql" | "mariadb" => Some(Backend::Mysql),
            _ => None,
        }
    }

    /// Quotes a validated identifier for this database.
    fn quote_part(self, part: &str) -> String {
        match self {
            Backend::Postgres => format!("\"{part}\""),
            Backend::Mysql => format!("`{part}`"),
        }
    }

    /// `name` or `schema.name`, each part quoted; `None` unless every part is a plain
    /// identifier (letters, digits, `_`, not starting with a digit), so nothing in a flow file
    /// can change the statement's shape.
    pub fn quote_ident(self, name: &str) -> Option<String> {
        let parts: Vec<&str> = name.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| is_plain_ident(p)) {
            return None;
        }
        Some(
            parts
                .iter()
                .map(|p| self.quote_part(p))
                .collect::<Vec<_>>()
                .join("."),
        )
    }
}

fn is_plain_ident(part: &str) -> bool {
    let mut chars = part.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && part.len() <= 63
}

/// The url without user info or query (for messages and health reports: never a password).
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<invalid url>".to_owned();
    };
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let rest = rest.split('?').next().unwrap_or(rest);
    format!("{scheme}://{rest}")
}

/// What a query's result becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every row, as an array of objects.
    Rows,
    /// The first row as an object, or `null` when there is none.
    First,
    /// The number of rows returned or affected.
    Count,
}

/// Which rows a batch writes when a key already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnConflict {
    /// Plain insert: a duplicate key fails the batch (then each row alone, see the sink).
    Error,
    /// Update the non-key columns of the existing row (`key` names the key columns).
    Upsert,
    /// Keep the existing row and drop the new one.
    Ignore,
}

/// One batch write: `rows` into `table`'s `columns`, with the conflict rule.
#[derive(Debug, Clone)]
pub struct WritePlan {
    /// The table, quoted for its database.
    pub table: String,
    /// The columns, quoted, in row order.
    pub columns: Vec<String>,
    /// What a duplicate key does.
    pub on_conflict: OnConflict,
    /// Indexes into `columns` of the key columns (for upsert).
    pub key: Vec<usize>,
}

/// One row ready for a batch, in the form its database writes fastest.
#[derive(Debug, Clone, PartialEq)]
pub enum RowData {
    /// The column values (MariaDB/MySQL binds them).
    Values(Vec<Value>),
    /// The row as one line of PostgreSQL `COPY` text, built by the delivering task so the batch
    /// writer only concatenates.
    CopyText(Vec<u8>),
}

/// A database the SQL components talk to (one pool per url and settings, shared by the process).
#[async_trait]
pub trait Database: Send + Sync + 'static {
    /// Runs `sql` with `params` bound in order; the result per `mode`.
    async fn query(&self, sql: &str, params: &[Value], mode: Mode) -> Result<Value, ProcessError>;

    /// Prepares one row (one value per column of a [`WritePlan`]) for [`Database::write`].
    fn encode(&self, row: &[&Value]) -> RowData {
        RowData::Values(row.iter().map(|v| (*v).clone()).collect())
    }

    /// Writes `rows` (made by [`Database::encode`]) in one transaction; `Ok` once committed. A
    /// row that the database refuses (a constraint, a bad value) fails with
    /// [`ErrorKind::InvalidInput`].
    async fn write(&self, plan: &WritePlan, rows: &[&RowData]) -> Result<(), ProcessError>;

    /// The database, for messages (`postgres://127.0.0.1:5432/test`).
    fn describe(&self) -> &str;
}

/// Connection settings every SQL component has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionOptions {
    /// Most connections the pool opens.
    pub pool_size: usize,
    /// Longest one statement may run.
    pub statement_timeout: HumanDuration,
    /// Longest wait to connect.
    pub connect_timeout: HumanDuration,
    /// PEM file of CA certificates trusted for TLS (PostgreSQL).
    pub ca_file: Option<String>,
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions {
            pool_size: 8,
            statement_timeout: HumanDuration(Duration::from_secs(30)),
            connect_timeout: HumanDuration(Duration::from_secs(5)),
            ca_file: None,
        }
    }
}

/// The connection fields, for the specs.
pub fn connection_fields() -> Vec<FieldSpec> {
    vec![
        FieldSpec::new(
            "url",
            FieldType::String,
            "Database url: `postgres://user:password@host:5432/db` (TLS per `sslmode=disable|prefer|require` \
in the url; default `disable`) or `mysql://user:password@host:3306/db` (`mariadb://` works too).",
        )
        .required(),
        FieldSpec::new(
            "pool_size",
            FieldType::Integer {
                min: Some(1),
                max: Some(1000),
            },
            "Most connections open to this database; components with the same url and settings share one pool.",
        )
        .default_value(8),
        FieldSpec::new(
            "statement_timeout",
            FieldType::Duration,
            "Longest one statement (or one batch's transaction) may run; PostgreSQL also enforces it on the server (`statement_timeout`). A statement cut off fails with `timeout`.",
        )
        .default_value("30s"),
        FieldSpec::new(
            "connect_timeout",
            FieldType::Duration,
            "Longest wait for a new connection.",
        )
        .default_value("5s"),
        FieldSpec::new(
            "ca_file",
            FieldType::String,
            "PostgreSQL with `sslmode=prefer|require`: PEM file of the CA certificates to trust instead of the public web roots.",
        ),
    ]
}

/// Splits the connection fields off a component's configuration.
pub fn take_connection(config: &Value) -> Result<(String, ConnectionOptions, Value), BuildError> {
    let mut rest = config.as_object().cloned().unwrap_or_default();
    let url = match rest.remove("url") {
        Some(Value::String(url)) => url,
        _ => return Err(BuildError::field("url", "is required: the database url")),
    };
    let mut options = serde_json::Map::new();
    for name in [
        "pool_size",
        "statement_timeout",
        "connect_timeout",
        "ca_file",
    ] {
        if let Some(value) = rest.remove(name) {
            options.insert(name.to_owned(), value);
        }
    }
    let defaults = ConnectionOptions::default();
    let options = ConnectionOptions {
        pool_size: match options.get("pool_size") {
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|n| *n >= 1)
                .ok_or_else(|| {
                    BuildError::field("pool_size", "must be a whole number of at least 1")
                })?,
            None => defaults.pool_size,
        },
        statement_timeout: duration_field(
            &options,
            "statement_timeout",
            defaults.statement_timeout,
        )?,
        connect_timeout: duration_field(&options, "connect_timeout", defaults.connect_timeout)?,
        ca_file: options
            .get("ca_file")
            .and_then(Value::as_str)
            .map(str::to_owned),
    };
    if Backend::of(&url).is_none() {
        return Err(BuildError::field(
            "url",
            format!(
                "`{}` is not a database url; start it with `postgres://` or `mysql://`",
                redact(&url)
            ),
        ));
    }
    Ok((url, options, Value::Object(rest)))
}

fn duration_field(
    options: &serde_json::Map<String, Value>,
    name: &str,
    default: HumanDuration,
) -> Result<HumanDuration, BuildError> {
    match options.get(name) {
        None => Ok(default),
        Some(value) => {
            let d = HumanDuration::deserialize(value)
                .map_err(|e| BuildError::field(name, e.to_string()))?;
            if d.0.is_zero() {
                return Err(BuildError::field(name, "must be longer than 0s"));
            }
            Ok(d)
        }
    }
}

/// The shared database for `url` with `options`, created on first use (connections are opened
/// lazily, so a database that is down does not fail the build).
pub fn open(
    resources: &Resources,
    url: &str,
    options: &ConnectionOptions,
) -> Result<Arc<dyn Database>, BuildError> {
    match Backend::of(url) {
        #[cfg(feature = "postgres")]
        Some(Backend::Postgres) => crate::postgres::pool::database(resources, url, options),
        #[cfg(feature = "mysql")]
        Some(Backend::Mysql) => crate::mysql::database(resources, url, options),
        // Reached only when one of the two features is off.
        #[allow(unreachable_patterns)]
        Some(other) => {
            let _ = (resources, options);
            Err(BuildError::field(
                "url",
                format!("this build of Sluice has no {other:?} support (Cargo feature off)"),
            ))
        }
        None => Err(BuildError::field(
            "url",
            "is not a database url; start it with `postgres://` or `mysql://`",
        )),
    }
}

/// A failure to reach the database.
pub fn unavailable(what: &str, error: impl std::fmt::Display) -> ProcessError {
    ProcessError::new(
        ErrorKind::Unavailable,
        format!("cannot reach {what}: {error}"),
    )
}

/// A statement that did not finish in time.
pub fn timed_out(what: &str, limit: Duration) -> ProcessError {
    ProcessError::new(
        ErrorKind::Timeout,
        format!("{what} did not answer within the statement timeout of {limit:?}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_by_scheme() {
        assert_eq!(Backend::of("postgres://h/db"), Some(Backend::Postgres));
        assert_eq!(Backend::of("postgresql://h/db"), Some(Backend::Postgres));
        assert_eq!(Backend::of("MySQL://h/db"), Some(Backend::Mysql));
        assert_eq!(Backend::of("mariadb://h/db"), Some(Backend::Mysql));
        assert_eq!(Backend::of("http://h"), None);
        assert_eq!(Backend::of("nothing"), None);
    }

    #[test]
    fn identifiers_are_quoted_or_refused() {
        let pg = Backend::Postgres;
        assert_eq!(pg.quote_ident("orders").as_deref(), Some("\"orders\""));
        assert_eq!(
            pg.quote_ident("sales.orders").as_deref(),
            Some("\"sales\".\"orders\"")
        );
        assert_eq!(Backend::Mysql.quote_ident("t_1").as_deref(), Some("`t_1`"));
        for bad in ["", "a.b.c", "1a", "a;drop", "a\"b", "a b", "a-b", "a."] {
            assert_eq!(pg.quote_ident(bad), None, "{bad}");
        }
    }

    #[test]
    fn redact_hides_credentials_and_options() {
        assert_eq!(
            redact("postgres://u:secret@db:5432/x?sslmode=require"),
            "postgres://db:5432/x"
        );
        assert_eq!(redact("mysql://h/db"), "mysql://h/db");
    }

    #[test]
    fn connection_fields_are_split_and_checked() {
        let (url, options, rest) = take_connection(&serde_json::json!({
            "url": "postgres://h/db", "pool_size": 3, "statement_timeout": "2s", "query": "select 1"
        }))
        .unwrap();
        assert_eq!(url, "postgres://h/db");
        assert_eq!(options.pool_size, 3);
        assert_eq!(options.statement_timeout.0, Duration::from_secs(2));
        assert_eq!(rest, serde_json::json!({"query": "select 1"}));
        let err = take_connection(&serde_json::json!({"url": "redis://h"})).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("url"));
        let err = take_connection(&serde_json::json!({"url": "postgres://h", "pool_size": 0}))
            .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("pool_size"));
        let err =
            take_connection(&serde_json::json!({"url": "postgres://h", "statement_timeout": "0s"}))
                .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("statement_timeout"));
    }
}
