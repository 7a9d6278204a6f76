//! Redis: streams with consumer groups (`redis_stream`), reliable list queues (`redis_list`),
//! pub/sub (`redis_pubsub`), and a key-value store for idempotency and caching ([`store`]).
//!
//! Connections are multiplexed connections made with [`crate::reconnect::connect`] (sources) or
//! on first use (sinks); a connection that fails is dropped and made again on the next use.
//! Blocking commands (`XREADGROUP BLOCK`, `BLMOVE`) run on a connection of their own without a
//! response timeout, so they never hold up acknowledgements.

pub mod command;
pub mod list;
pub mod pubsub;
pub mod rate_limit;
pub mod store;
pub mod stream;

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError};
use sluice_core::spec::{ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildError, ErrorKind, HealthHandle, ProcessError};

/// Default server address.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// How long one command may take on a non-blocking connection.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Adds the `url` field.
pub(crate) fn url_field(spec: ComponentSpec) -> ComponentSpec {
    spec.field(
        FieldSpec::new(
            "url",
            FieldType::String,
            "Server address: `redis://[user:password@]host:port[/db]`.",
        )
        .default_value(DEFAULT_URL),
    )
}

pub(crate) fn default_url() -> String {
    DEFAULT_URL.to_owned()
}

/// Parses `url` (no connection is made).
pub(crate) fn client(url: &str) -> Result<Client, BuildError> {
    if !(url.starts_with("redis://")
        || url.starts_with("redis+unix://")
        || url.starts_with("unix://"))
    {
        return Err(BuildError::field(
            "url",
            format!(
                "`{}`: use redis://host:port (TLS `rediss://` is not supported)",
                describe(url)
            ),
        ));
    }
    Client::open(url)
        .map_err(|e| BuildError::field("url", format!("{e}; expected redis://host:port[/db]")))
}

/// Checks a key name field.
pub(crate) fn check_key(field: &str, key: &str) -> Result<(), BuildError> {
    if key.is_empty() {
        return Err(BuildError::field(field, "must not be empty"));
    }
    Ok(())
}

/// `Redis at <url>` without the password, for logs and health reports.
pub(crate) fn describe(url: &str) -> String {
    let shown = match url.split_once('@') {
        Some((head, host)) => format!(
            "{}://{host}",
            head.split_once("://").map_or("redis", |(s, _)| s)
        ),
        None => url.to_owned(),
    };
    format!("Redis at {shown}")
}

/// A multiplexed connection; `blocking` ones have no response timeout.
pub(crate) async fn connect(
    client: &Client,
    blocking: bool,
) -> Result<MultiplexedConnection, RedisError> {
    let timeout = if blocking {
        None
    } else {
        Some(RESPONSE_TIMEOUT)
    };
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(timeout);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// Whether the connection is worth dropping after `e` (a broken or timed-out connection, not an
/// error answer from the server).
pub(crate) fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error()
}

/// A command failure as a [`ProcessError`]: the connection's troubles are `unavailable` (worth
/// a retry), an error answer is `remote`.
pub(crate) fn error(url: &str, what: &str, e: &RedisError) -> ProcessError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if is_connection_error(e) {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Remote
    };
    ProcessError::new(kind, format!("{what} on {} failed: {e}", describe(url)))
}

/// A connection for sinks and processors, made on first use and made again after it failed.
pub(crate) struct LazyConnection {
    client: Client,
    url: String,
    health: HealthHandle,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl LazyConnection {
    pub(crate) fn new(client: Client, url: String, health: HealthHandle) -> Self {
        LazyConnection {
            client,
            url,
            health,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// Runs `cmd`; see [`LazyConnection::run`].
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        what: &str,
        cmd: &redis::Cmd,
    ) -> Result<T, ProcessError> {
        self.run(
            what,
            |mut conn| async move { cmd.query_async(&mut conn).await },
        )
        .await
    }

    /// Runs `pipe`; see [`LazyConnection::run`].
    pub(crate) async fn query_pipe<T: redis::FromRedisValue>(
        &self,
        what: &str,
        pipe: &redis::Pipeline,
    ) -> Result<T, ProcessError> {
        self.run(
            what,
            |mut conn| async move { pipe.query_async(&mut conn).await },
        )
        .await
    }

    /// Runs `op` on the connection. When a connection made earlier turns out broken (the
    /// server restarted since), it is made again and `op` runs once more right away: one
    /// redelivery fewer, and the same at-least-once (a command whose answer was lost may run
    /// twice, as a redelivered message would).
    async fn run<T, F, Fut>(&self, what: &str, op: F) -> Result<T, ProcessError>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let (conn, fresh) = self.get().await?;
        match op(conn).await {
            Ok(value) => Ok(value),
            Err(e) if !fresh && is_connection_error(&e) => {
                *self.conn.lock().await = None;
                let (conn, _) = self.get().await?;
                match op(conn).await {
                    Ok(value) => Ok(value),
                    Err(e) => Err(self.failed(what, &e).await),
                }
            }
            Err(e) => Err(self.failed(what, &e).await),
        }
    }

    /// The connection, connecting first if needed; `true` when it was just made.
    async fn get(&self) -> Result<(MultiplexedConnection, bool), ProcessError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok((conn.clone(), false));
        }
        match connect(&self.client, false).await {
            Ok(conn) => {
                self.health.healthy();
                *slot = Some(conn.clone());
                Ok((conn, true))
            }
            Err(e) => {
                let detail = format!("cannot reach {}: {e}", describe(&self.url));
                self.health.unhealthy(&detail);
                Err(ProcessError::new(ErrorKind::Unavailable, detail))
            }
        }
    }

    /// After a command failed: a broken connection is dropped so the next use connects again,
    /// and the failure becomes a [`ProcessError`].
    async fn failed(&self, what: &str, e: &RedisError) -> ProcessError {
        if is_connection_error(e) {
            *self.conn.lock().await = None;
            self.health
                .unhealthy(format!("{} failed: {e}", describe(&self.url)));
        }
        error(&self.url, what, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_passwords_hidden() {
        assert!(client("redis://127.0.0.1:6379/2").is_ok());
        let e = client("rediss://x:6380")
            .err()
            .map(|e| e.message)
            .unwrap_or_default();
        assert!(e.contains("not supported"), "{e}");
        assert!(client("http://x").is_err());
        assert_eq!(describe("redis://u:secret@h:1/0"), "Redis at redis://h:1/0");
    }
}
