//! PostgreSQL (tokio-postgres, pooled by deadpool-postgres): the database behind the `sql`
//! processor and sink, and three sources: `postgres_poll` (rows past a watermark kept in the
//! store), `postgres_outbox` (a transactional outbox table) and `postgres_listen` (LISTEN/NOTIFY).

pub mod db;
pub mod listen;
pub mod outbox;
pub mod poll;
pub mod pool;
pub mod types;
