//! AMQP 0.9.1 (RabbitMQ) on lapin: the `amqp` source (manual acks after the flow commits,
//! prefetch, requeue or dead-letter on failure) and the `amqp` sink (publisher confirms and
//! `mandatory`, so an unroutable message is an error, never a silent loss).
//!
//! Shared here: the connection settings (`url`, `tls`, `connect_timeout`), the topology a
//! component declares before use (`declare`), and the mapping between AMQP properties/headers and
//! message headers.

pub mod sink;
pub mod source;

mod connection;
mod mapping;
mod settle;
mod topology;

pub use connection::{ConnectionConfig, TlsConfig};
pub use mapping::{HEADER_PREFIX, headers_from_delivery, properties_for};
pub use topology::{BindingConfig, DeclareConfig, ExchangeConfig, QueueConfig};

use sluice_core::spec::{FieldSpec, FieldType};

/// The connection fields shared by the source and the sink.
fn connection_fields() -> Vec<FieldSpec> {
    vec![
        FieldSpec::new(
            "url",
            FieldType::String,
            "Broker address `amqp://user:password@host:5672/vhost` (`%2f` is the default vhost \
             `/`); `amqps://` connects with TLS (rustls). Query parameters such as `heartbeat=30` \
             are passed to the client.",
        )
        .required()
        .secret(),
        FieldSpec::new(
            "tls",
            FieldType::Object(vec![
                FieldSpec::new(
                    "ca_file",
                    FieldType::String,
                    "PEM file of the certificate authorities to trust instead of the system's.",
                ),
                FieldSpec::new(
                    "cert_file",
                    FieldType::String,
                    "PEM client certificate (with `key_file`) for mutual TLS.",
                ),
                FieldSpec::new(
                    "key_file",
                    FieldType::String,
                    "PEM PKCS#8 private key of `cert_file`.",
                ),
            ]),
            "TLS settings for an `amqps://` url; files are read when the flow is built.",
        ),
        FieldSpec::new(
            "connect_timeout",
            FieldType::Duration,
            "Time allowed to open the connection and channel and declare the topology.",
        )
        .default_value("10s"),
        topology::spec_field(),
    ]
}
