//! Sluice's sources and sinks, one folder per external system, each behind its Cargo feature.
//!
//! Every component exposes `spec()` (the single source of truth for its configuration) and a
//! factory; [`register_all`] lists them explicitly, so a runtime holds exactly the connectors it
//! was built with.

use sluice_core::Registry;

#[cfg(any(feature = "nats", feature = "redis"))]
pub mod cached;
pub mod config;
pub mod reconnect;
#[cfg(any(
    feature = "http",
    feature = "file",
    feature = "amqp",
    feature = "mqtt",
    feature = "nats",
    feature = "redis",
    feature = "kafka",
    feature = "sftp"
))]
pub mod template;
#[cfg(test)]
mod test_context;

#[cfg(feature = "amqp")]
pub mod amqp;
#[cfg(feature = "file")]
pub mod file;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "log")]
pub mod log;
#[cfg(feature = "mqtt")]
pub mod mqtt;
#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sftp")]
pub mod sftp;
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub mod sql;
#[cfg(feature = "timer")]
pub mod timer;

/// Registers every connector this crate was built with.
pub fn register_all(registry: &mut Registry) {
    #[cfg(feature = "http")]
    {
        registry.source(http::source::spec(), http::source::build);
        registry.processor(
            http::request::processor_spec(),
            http::request::build_processor,
        );
        registry.sink(http::request::sink_spec(), http::request::build_sink);
    }
    #[cfg(feature = "file")]
    {
        registry.source(file::source::spec(), file::source::build);
        registry.sink(file::sink::spec(), file::sink::build);
    }
    #[cfg(feature = "timer")]
    registry.source(timer::spec(), timer::build);
    #[cfg(feature = "amqp")]
    {
        registry.source(amqp::source::spec(), amqp::source::build);
        registry.sink(amqp::sink::spec(), amqp::sink::build);
    }
    #[cfg(feature = "mqtt")]
    {
        registry.source(mqtt::source::spec(), mqtt::source::build);
        registry.sink(mqtt::sink::spec(), mqtt::sink::build);
    }
    #[cfg(feature = "log")]
    {
        registry.sink(log::log_spec(), log::build_log);
        registry.sink(log::stdout_spec(), log::build_stdout);
    }
    #[cfg(any(feature = "postgres", feature = "mysql"))]
    {
        registry.processor(sql::processor::spec(), sql::processor::build);
        registry.sink(sql::sink::spec(), sql::sink::build);
    }
    #[cfg(feature = "postgres")]
    {
        registry.source(postgres::poll::spec(), postgres::poll::build);
        registry.source(postgres::outbox::spec(), postgres::outbox::build);
        registry.source(postgres::listen::spec(), postgres::listen::build);
    }
    #[cfg(feature = "nats")]
    {
        registry.source(nats::core::source_spec(), nats::core::build_source);
        registry.sink(nats::core::sink_spec(), nats::core::build_sink);
        registry.processor(nats::core::processor_spec(), nats::core::build_processor);
        registry.source(
            nats::jetstream::source_spec(),
            nats::jetstream::build_source,
        );
        registry.sink(nats::jetstream::sink_spec(), nats::jetstream::build_sink);
        registry.store_backend("nats_kv", nats::kv::backend());
    }
    #[cfg(feature = "redis")]
    {
        registry.source(redis::stream::source_spec(), redis::stream::build_source);
        registry.sink(redis::stream::sink_spec(), redis::stream::build_sink);
        registry.source(redis::list::source_spec(), redis::list::build_source);
        registry.sink(redis::list::sink_spec(), redis::list::build_sink);
        registry.source(redis::pubsub::source_spec(), redis::pubsub::build_source);
        registry.sink(redis::pubsub::sink_spec(), redis::pubsub::build_sink);
        registry.processor(redis::command::spec(), redis::command::build);
        registry.store_backend("redis", redis::store::backend());
    }
    #[cfg(feature = "kafka")]
    {
        registry.source(kafka::source::spec(), kafka::source::build);
        registry.sink(kafka::sink::spec(), kafka::sink::build);
    }
    #[cfg(feature = "sftp")]
    {
        registry.source(sftp::source::spec(), sftp::source::build);
        registry.sink(sftp::sink::spec(), sftp::sink::build);
    }
    // Keeps the parameter used when every connector feature is off.
    let _ = registry;
}
