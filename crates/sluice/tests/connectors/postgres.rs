//! PostgreSQL through the suite: the `postgres_outbox` source (an outbox table, rows deleted
//! after ack) and the batching `sql` sink (rows `payload`, `headers` into a table of the same
//! shape), checked with tokio-postgres as the other application.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::conformance::{Connector, Msg};

pub struct Postgres;

const ADDRESS: &str = "127.0.0.1:5432";

async fn client() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(
        "host=127.0.0.1 port=5432 user=postgres dbname=test",
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    client
}

#[async_trait::async_trait]
impl Connector for Postgres {
    fn service(&self) -> &'static str {
        "PostgreSQL"
    }
    fn address(&self) -> SocketAddr {
        ADDRESS.parse().unwrap()
    }
    async fn create(&self, name: &str) {
        client()
            .await
            .batch_execute(&format!(
                "CREATE TABLE {name} (id bigserial PRIMARY KEY, payload jsonb NOT NULL, headers jsonb,
                   created_at timestamptz NOT NULL DEFAULT now(), done_at timestamptz)"
            ))
            .await
            .unwrap();
    }
    fn source(&self, name: &str, addr: SocketAddr) -> String {
        format!(
            "{{postgres_outbox: {{url: \"postgres://postgres@{addr}/test\", table: {name}, batch_size: 50, interval: 100ms, connect_timeout: 2s}}}}"
        )
    }
    fn sink(&self, name: &str, addr: SocketAddr) -> String {
        format!(
            "{{sql: {{url: \"postgres://postgres@{addr}/test\", table: {name}, columns: {{payload: \".\", headers: \"$headers\"}}, parallel_batches: 1, connect_timeout: 2s}}}}"
        )
    }
    async fn publish(&self, name: &str, msgs: &[Msg]) {
        let db = client().await;
        for m in msgs {
            let headers = serde_json::to_value(&m.headers).unwrap();
            db.execute(
                &format!("INSERT INTO {name} (payload, headers) VALUES ($1, $2)"),
                &[&m.body, &headers],
            )
            .await
            .unwrap();
        }
    }
    async fn consume(&self, name: &str, n: usize, timeout: Duration) -> Vec<Msg> {
        let db = client().await;
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let rows = db
                .query(
                    &format!(
                        "DELETE FROM {name} WHERE id IN (SELECT id FROM {name} ORDER BY id LIMIT $1) RETURNING id, payload, headers"
                    ),
                    &[&((n - got.len()) as i64)],
                )
                .await
                .unwrap();
            let mut rows: Vec<(i64, Msg)> = rows
                .iter()
                .map(|r| {
                    let headers: Option<Value> = r.get(2);
                    let headers: BTreeMap<String, String> = headers
                        .and_then(|h| serde_json::from_value(h).ok())
                        .unwrap_or_default();
                    (
                        r.get(0),
                        Msg {
                            body: r.get(1),
                            headers,
                        },
                    )
                })
                .collect();
            rows.sort_by_key(|(id, _)| *id);
            got.extend(rows.into_iter().map(|(_, m)| m));
            if got.len() >= n || Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

crate::conformance_tests!(Postgres);
