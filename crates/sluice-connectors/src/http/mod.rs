//! HTTP: the `http` source (an inbound endpoint; several flows share one listener per address),
//! the `http` request processor and the `http` sink (an outbound client shared by the process).
//!
//! Only the source maps flow errors to HTTP statuses, as RFC 9457 problem documents.

pub mod listener;
pub mod problem;
pub mod request;
pub mod source;

pub use listener::HttpListeners;
pub use request::HttpClient;

/// Response bodies of a route are always fully buffered; this is the body type both sides use.
pub(crate) type FullBody = http_body_util::Full<bytes::Bytes>;
