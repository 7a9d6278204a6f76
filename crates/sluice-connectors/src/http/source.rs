//! The `http` source: an inbound HTTP endpoint on a listener shared by every flow on the address.

use std::sync::Arc;

use async_trait::async_trait;
use http::Method;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildContext, BuildError, ExchangePattern, Source, SourceContext, SourceError};

use super::listener::{HttpListeners, RouteConfig, check_path};
use sluice_core::bytesize::ByteSize;

const DESCRIPTION: &str = "\
Serves HTTP requests on `listen` and turns each into a message. Several flows may use the same \
`listen` address: they share one listener, each adding its `path` and `methods`; the same method \
and path twice on one address is an error when the flow starts.

**Message.** The body is the request body as bytes. Headers: every request header under its \
lower-case name (values that are not UTF-8 are left out; repeated headers are joined with `, `), \
plus `http.method`, `http.path`, `http.query` (the raw query string, when there is one) and \
`http.param.<name>` for each path parameter. An incoming `traceparent` and `x-correlation-id` \
become the message's trace context and correlation id.

**in_out** (request-reply): the flow's result is the response. No reply answers 204; one reply \
answers with its body, the status in its `http.status` header (default 200), every header named \
`http.header.<name>` as `<name>`, and its `content-type` header (else `application/json` when the \
body is JSON, else `application/octet-stream`); several replies answer a JSON array of their \
bodies. A failed flow answers an RFC 9457 `application/problem+json` document with `type`, \
`title`, `status`, `detail`, `step`, `kind` and `message_id`; the status follows the error kind: \
invalid_input 400, rejected 422, timeout 504, remote 502, unavailable 503 (with `Retry-After: 1`: \
a full disk under a durable channel, a circuit open), others 500. A flow that does not finish \
within `timeout` answers 504.

**in_only** (fire and forget): answers 202 with `{\"id\": \"<message id>\"}` as soon as the body is \
read, then runs the flow. Delivery is **at-most-once**: a crash after the 202 loses the message, \
and the client is not told about failures (they are logged). Use in_out when the caller must know, \
or `accept: on_commit`: the 202 then comes once the flow has finished and every target committed \
(with a durable channel target: once the message is on disk), and a failure answers the problem \
document as in_out does. Delivery is then **at-least-once**: without a 202 the caller retries.

**Delivery guarantee.** in_out is at-least-once from the caller's point of view: a 2xx answer means \
every target committed; on any other answer the caller should retry.

**Limits.** Bodies over `max_body` answer 413 (checked against `Content-Length` and while \
streaming). Unknown paths answer 404, a known path with another method 405 with an `Allow` \
header. HTTP/1.1 only, plain text: put a TLS-terminating proxy in front for HTTPS. The request \
head must arrive within 30s. On shutdown a flow stops taking requests, answers those in flight \
(and finishes accepted in_only work); the listener closes when its last flow has stopped.";

/// The `http` source's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        "http",
        ComponentKind::Source,
        "Receive HTTP requests; in_out answers with the flow's result",
    )
    .description(DESCRIPTION)
    .field(
        FieldSpec::new("listen", FieldType::String, "Address and port to listen on; flows with the same address share one listener.")
            .default_value("127.0.0.1:8080"),
    )
    .field(
        FieldSpec::new("path", FieldType::String, "Path to serve, with `{name}` parameters (e.g. `/orders/{id}`) and an optional final `{*rest}` catch-all.")
            .required(),
    )
    .field(
        FieldSpec::new("methods", FieldType::List(Box::new(FieldType::String)), "HTTP methods this flow accepts on `path`.")
            .default_value(serde_json::json!(["POST"])),
    )
    .field(
        FieldSpec::new("pattern", FieldType::Enum(vec!["in_out", "in_only"]), "`in_out` answers with the flow's result; `in_only` answers 202 at once and runs the flow afterwards (at-most-once).")
            .default_value("in_out"),
    )
    .field(
        FieldSpec::new("accept", FieldType::Enum(vec!["on_receipt", "on_commit"]), "For `in_only`: when to answer 202. `on_receipt` as soon as the body is read (at-most-once); `on_commit` once every target committed, e.g. a durable channel wrote the message to disk (at-least-once), failures answering a problem document.")
            .default_value("on_receipt"),
    )
    .field(
        FieldSpec::new("max_body", FieldType::ByteSize, "Largest request body accepted; larger requests get 413.")
            .default_value("1MiB"),
    )
    .field(
        FieldSpec::new("timeout", FieldType::Duration, "Time allowed for one request: reading its body and running the flow; past it the client gets 504.")
            .default_value("30s"),
    )
    .example(
        "Order lookup by id, answered by the flow",
        "listen: 127.0.0.1:8080\npath: /orders/{id}\nmethods: [GET]\n",
    )
    .example(
        "Webhook receiver that answers 202 once the message is committed",
        "path: /hooks/orders\npattern: in_only\naccept: on_commit\n",
    )
    .example(
        "Webhook receiver that answers 202 at once",
        "listen: 0.0.0.0:9000\npath: /hooks/github\npattern: in_only\nmax_body: 5MiB\ntimeout: 10s\n",
    )
}

/// Whether the flow's result is awaited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// Request-reply.
    InOut,
    /// Fire and forget.
    InOnly,
}

/// When an in_only request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accept {
    /// As soon as the body is read.
    #[default]
    OnReceipt,
    /// Once the flow finished and every target committed.
    OnCommit,
}

/// Configuration of the `http` source.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSourceConfig {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Route path.
    pub path: String,
    /// Accepted methods.
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    /// Exchange pattern.
    #[serde(default = "default_pattern")]
    pub pattern: Pattern,
    /// When an in_only request is answered.
    #[serde(default)]
    pub accept: Accept,
    /// Body limit.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// Per-request budget.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_methods() -> Vec<String> {
    vec!["POST".into()]
}
fn default_pattern() -> Pattern {
    Pattern::InOut
}
fn default_max_body() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30))
}

/// A built `http` source, ready to run.
#[derive(Debug)]
pub struct HttpSource {
    config: HttpSourceConfig,
    methods: Vec<Method>,
}

/// Builds an `http` source.
pub fn build(config: &Value, _ctx: &BuildContext<'_>) -> Result<Box<dyn Source>, BuildError> {
    let config: HttpSourceConfig = crate::config::parse(config)?;
    check_path(&config.path).map_err(|e| BuildError::field("path", e))?;
    if !has_port(&config.listen) {
        return Err(BuildError::field(
            "listen",
            format!(
                "`{}` is not an address with a port; write it as `host:port`, e.g. `127.0.0.1:8080`",
                config.listen
            ),
        ));
    }
    if config.methods.is_empty() {
        return Err(BuildError::field(
            "methods",
            "no methods listed; list at least one, e.g. `[POST]`",
        ));
    }
    let mut methods = Vec::new();
    for (i, m) in config.methods.iter().enumerate() {
        let method =
            Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes()).map_err(|_| {
                BuildError::field(
                    format!("methods[{i}]"),
                    format!("`{m}` is not an http method; use GET, POST, PUT, PATCH, DELETE, ..."),
                )
            })?;
        if !methods.contains(&method) {
            methods.push(method);
        }
    }
    if config.max_body.0 == 0 {
        return Err(BuildError::field("max_body", "must be larger than 0"));
    }
    if config.timeout.0.is_zero() {
        return Err(BuildError::field("timeout", "must be longer than 0s"));
    }
    Ok(Box::new(HttpSource { config, methods }))
}

fn has_port(listen: &str) -> bool {
    listen
        .trim()
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

#[async_trait]
impl Source for HttpSource {
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let HttpSource { config, methods } = *self;
        let listeners = ctx.resources.get_or_default::<HttpListeners>();
        let route = RouteConfig {
            flow: Arc::clone(&ctx.flow),
            path: config.path.clone(),
            methods,
            pattern: match config.pattern {
                Pattern::InOut => ExchangePattern::InOut,
                Pattern::InOnly => ExchangePattern::InOnly,
            },
            wait_for_commit: config.accept == Accept::OnCommit,
            max_body: config.max_body.as_usize(),
            timeout: config.timeout.0,
            dispatcher: Arc::clone(&ctx.dispatcher),
        };
        let registration = listeners
            .register(&config.listen, route)
            .map_err(|e| SourceError::Other(e.to_string()))?;
        tracing::info!(flow = %ctx.flow, listen = %registration.local_addr(), path = %config.path, "http source serving");
        ctx.shutdown.cancelled().await;
        registration.close().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_needs_a_port() {
        assert!(has_port("127.0.0.1:8080"));
        assert!(has_port("[::1]:0"));
        assert!(has_port("localhost:80"));
        assert!(!has_port("127.0.0.1"));
        assert!(!has_port(":80"));
    }
}
