//! Sluice's sources and sinks, one folder per external system, each behind its Cargo feature.
//!
//! Every component exposes `spec()` (the single source of truth for its configuration) and a
//! factory; [`register_all`] lists them explicitly, so a runtime holds exactly the connectors it
//! was built with.

use sluice_core::Registry;

pub mod config;
pub mod reconnect;
#[cfg(any(
    feature = "http",
    feature = "file",
    feature = "kafka",
    feature = "sftp"
))]
pub mod template;

#[cfg(feature = "file")]
pub mod file;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "log")]
pub mod log;
#[cfg(feature = "sftp")]
pub mod sftp;
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
    #[cfg(feature = "log")]
    {
        registry.sink(log::log_spec(), log::build_log);
        registry.sink(log::stdout_spec(), log::build_stdout);
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
