//! Every broker and database connector against its real service on loopback, through the
//! shared conformance suite (`conformance.rs`) plus each connector's own behaviour tests.
//!
//! One module per connector; each implements [`conformance::Connector`] and expands
//! `conformance_tests!`. Tests skip with a line when their service is not running, and fail
//! instead under `SLUICE_IT=1` (`scripts/services.sh` starts the services).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

mod conformance;
mod e2e;

mod amqp;
mod http;
mod kafka;
mod mqtt;
mod nats;
mod postgres;
mod redis;
mod sftp;
