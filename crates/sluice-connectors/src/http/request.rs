//! The `http` request processor (the response becomes the next message) and the `http` sink,
//! both on one pooled client per process.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    Body, BuildContext, BuildError, ErrorKind, Failure, HealthHandle, Message, Outputs,
    ProcessError, Processor, Sink,
};
use tokio::time::Instant;

use super::FullBody;
use crate::template::{Template, percent_encode};

/// Largest response body read; a larger one fails the step.
pub const MAX_RESPONSE_BODY: usize = 64 << 20;
/// How much of an error response's body is quoted in the error detail.
const ERROR_BODY_QUOTE: usize = 200;

/// The process-wide HTTP client: one connection pool shared by every `http` step and sink.
/// Kept in [`sluice_core::Resources`].
pub struct HttpClient {
    client: Client<HttpConnector, FullBody>,
}

impl Default for HttpClient {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        HttpClient { client }
    }
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient").finish_non_exhaustive()
    }
}

fn fields(spec: ComponentSpec) -> ComponentSpec {
    spec.field(
        FieldSpec::new("url", FieldType::String, "Target `http://` url; `{header}` placeholders are filled from message headers, percent-encoded.")
            .required(),
    )
    .field(FieldSpec::new("method", FieldType::String, "HTTP method.").default_value("POST"))
    .field(
        FieldSpec::new("headers", FieldType::Map(Box::new(FieldType::String)), "Request headers to set; values may use `{header}` placeholders.")
            .default_value(serde_json::json!({})),
    )
    .field(
        FieldSpec::new("timeout", FieldType::Duration, "Time allowed for the whole call: connecting, sending and reading the response.")
            .default_value("30s"),
    )
    .field(
        FieldSpec::new("forward_headers", FieldType::Bool, "Send the message's headers (except `http.*` and hop-by-hop ones) as request headers.")
            .default_value(false),
    )
}

/// The `http` request processor's spec.
pub fn processor_spec() -> ComponentSpec {
    const DESCRIPTION: &str = concat!(
        "Calls an HTTP endpoint with the message body and continues with the response: the next \
message has the response body, `http.status`, `content-type` and \
`http.response.header.<name>` for every response header (names lower case). Note that \
`http.status` stays on the message: an `http` source answering with it will use that status \
unless a later step changes it.\n\n**Delivery guarantee.** The call is made once per message; a \
failure is handed to the flow's error handling (retry there for at-least-once; the remote must \
then tolerate duplicates).\n\n",
        "**Limits.** Only `http://` urls: an `https://` url is refused when the flow loads; put a \
TLS-terminating proxy (or a sidecar) in front of HTTPS services for now. Responses larger than \
64 MiB fail the step. GET, HEAD and DELETE send no body. When `forward_headers` is on, hop-by-hop \
and framing headers (`host`, `content-length`, `transfer-encoding`, `connection`, ...) and \
`http.*` headers are never forwarded. Connections are pooled per process (idle ones close after \
90s).\n\n**Placeholders.** `{name}` in `url` is replaced by the message header `name`, \
percent-encoded (e.g. `{http.param.id}`); in `headers` values it is inserted as is. A missing \
header fails the message with `invalid_input` naming it.\n\n**Errors.** A non-2xx answer is \
`remote` (with the status and the first 200 bytes of the body), a connection that cannot be made \
or breaks is `unavailable`, no answer within `timeout` is `timeout`: all three are worth a retry \
policy."
    );
    fields(
        ComponentSpec::new(
            "http",
            ComponentKind::Processor,
            "Call an HTTP endpoint; its response becomes the next message",
        )
        .description(DESCRIPTION),
    )
    .example(
        "Enrich an order with the CRM record of its customer",
        "url: http://127.0.0.1:9000/crm/{http.param.id}\nmethod: GET\nheaders:\n  accept: application/json\ntimeout: 5s\n",
    )
}

/// The `http` sink's spec.
pub fn sink_spec() -> ComponentSpec {
    const DESCRIPTION: &str = concat!(
        "Sends the message to an HTTP endpoint; a 2xx answer commits it.\n\n**Delivery \
guarantee.** at-least-once: the message is acknowledged only after a 2xx answer, so a \
redelivered message may reach the endpoint twice; make the endpoint idempotent (for example on \
the message id, which the flow can put in a header).\n\n",
        "**Limits.** Only `http://` urls: an `https://` url is refused when the flow loads; put a \
TLS-terminating proxy (or a sidecar) in front of HTTPS services for now. Responses larger than \
64 MiB fail the delivery. GET, HEAD and DELETE send no body. When `forward_headers` is on, \
hop-by-hop and framing headers and `http.*` headers are never forwarded. Connections are pooled \
per process.\n\n**Placeholders.** `{name}` in `url` is replaced by the message header `name`, \
percent-encoded; in `headers` values it is inserted as is. A missing header fails the message \
with `invalid_input` naming it.\n\n**Errors.** non-2xx is `remote`, no connection `unavailable`, \
no answer within `timeout` is `timeout`. While the remote system cannot be reached, the flow shows \
as `unhealthy` in the admin API's `/health`, naming the url; the next successful call clears it."
    );
    fields(
        ComponentSpec::new(
            "http",
            ComponentKind::Sink,
            "Send messages to an HTTP endpoint",
        )
        .description(DESCRIPTION),
    )
    .example(
        "Post every order to the warehouse",
        "url: http://127.0.0.1:9100/orders\nheaders:\n  x-source: sluice\nforward_headers: true\n",
    )
}

/// Configuration shared by the `http` processor and sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRequestConfig {
    /// Target url template.
    pub url: String,
    /// Method.
    #[serde(default = "default_method")]
    pub method: String,
    /// Extra headers (templates).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Budget for one call.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Forward message headers.
    #[serde(default)]
    pub forward_headers: bool,
}

fn default_method() -> String {
    "POST".into()
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

/// A configured HTTP call, shared by the processor and the sink.
#[derive(Debug)]
pub struct HttpCall {
    url: Template,
    method: Method,
    headers: Vec<(HeaderName, Template)>,
    timeout: Duration,
    forward_headers: bool,
    client: Arc<HttpClient>,
    step: String,
}

/// Headers that describe one hop or the framing of a body: never copied from a message.
const NOT_FORWARDED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-connection",
    "expect",
];

impl HttpCall {
    /// Checks the configuration and prepares the call.
    pub fn new(value: &Value, ctx: &BuildContext<'_>) -> Result<Self, BuildError> {
        let config: HttpRequestConfig = crate::config::parse(value)?;
        let url_text = config.url.trim();
        if url_text.len() >= 8 && url_text[..8].eq_ignore_ascii_case("https://") {
            return Err(BuildError::field(
                "url",
                "https urls are not supported yet (TLS is not built in); call the service over http through a TLS-terminating proxy or sidecar and use its `http://` url",
            ));
        }
        if !(url_text.len() >= 7 && url_text[..7].eq_ignore_ascii_case("http://")) {
            return Err(BuildError::field(
                "url",
                format!("`{url_text}` is not an http url; write it as `http://host:port/path`"),
            ));
        }
        let url = Template::parse(url_text).map_err(|e| BuildError::field("url", e.to_string()))?;
        // A sample rendering catches urls that can never be valid, whatever the headers hold.
        let sample: Result<String, ()> = url.render(|_| Ok("x".to_owned()));
        let sample = sample.unwrap_or_default();
        match sample.parse::<Uri>() {
            Ok(uri) if uri.host().is_some() => {}
            _ => {
                return Err(BuildError::field(
                    "url",
                    format!("`{url_text}` is not a valid url; write it as `http://host:port/path`"),
                ));
            }
        }
        let method = Method::from_bytes(config.method.trim().to_ascii_uppercase().as_bytes())
            .map_err(|_| {
                BuildError::field(
                    "method",
                    format!(
                        "`{}` is not an http method; use GET, POST, PUT, PATCH, DELETE, ...",
                        config.method
                    ),
                )
            })?;
        let mut headers = Vec::new();
        for (name, value) in &config.headers {
            let field = format!("headers.{name}");
            let header_name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                BuildError::field(
                    &field,
                    format!(
                        "`{name}` is not a valid http header name; use letters, digits and `-`"
                    ),
                )
            })?;
            let template =
                Template::parse(value).map_err(|e| BuildError::field(&field, e.to_string()))?;
            headers.push((header_name, template));
        }
        if config.timeout.0.is_zero() {
            return Err(BuildError::field("timeout", "must be longer than 0s"));
        }
        Ok(HttpCall {
            url,
            method,
            headers,
            timeout: config.timeout.0,
            forward_headers: config.forward_headers,
            client: ctx.resources.get_or_default::<HttpClient>(),
            step: ctx.id.to_owned(),
        })
    }

    fn request(&self, msg: &Message) -> Result<(Request<FullBody>, String), ProcessError> {
        let url = self.url.render(|name| {
            msg.headers.get(name).map(|v| percent_encode(v)).ok_or_else(|| {
                ProcessError::invalid_input(format!(
                    "url placeholder `{{{name}}}` needs the message header `{name}`, which is missing; set it before this step or change `url`"
                ))
            })
        })?;
        let uri: Uri = url.parse().map_err(|e| {
            ProcessError::invalid_input(format!(
                "the url `{url}` is not valid ({e}); check `url` and the headers it uses"
            ))
        })?;
        let mut headers = HeaderMap::new();
        if self.forward_headers {
            for (name, value) in &msg.headers {
                if name.starts_with("http.") || NOT_FORWARDED.contains(&name.as_str()) {
                    continue;
                }
                // Message headers that HTTP cannot carry (odd names, control characters) are
                // skipped: forwarding is best effort by design.
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    headers.insert(n, v);
                }
            }
        }
        for (name, template) in &self.headers {
            let value = template.render(|placeholder| {
                msg.headers.get(placeholder).cloned().ok_or_else(|| {
                    ProcessError::invalid_input(format!(
                        "header `{name}` needs the message header `{placeholder}`, which is missing; set it before this step or change `headers`"
                    ))
                })
            })?;
            let value = HeaderValue::from_str(&value).map_err(|_| {
                ProcessError::invalid_input(format!(
                    "header `{name}` would hold a value http cannot carry; remove control characters from it"
                ))
            })?;
            headers.insert(name.clone(), value);
        }
        let sends_body = !matches!(self.method, Method::GET | Method::HEAD | Method::DELETE);
        let body = if sends_body {
            if !headers.contains_key(header::CONTENT_TYPE) {
                let content_type = msg
                    .headers
                    .get("content-type")
                    .and_then(|ct| HeaderValue::from_str(ct).ok())
                    .unwrap_or_else(|| {
                        if !msg.body.is_empty() && msg.body.json().is_ok() {
                            HeaderValue::from_static("application/json")
                        } else {
                            HeaderValue::from_static("application/octet-stream")
                        }
                    });
                headers.insert(header::CONTENT_TYPE, content_type);
            }
            msg.body.as_bytes().clone()
        } else {
            Bytes::new()
        };
        let mut request = Request::new(FullBody::new(body));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        // Quoted in errors without its query, which may carry tokens.
        let shown = url.split('?').next().unwrap_or(&url).to_owned();
        Ok((request, shown))
    }

    /// Makes the call; `Ok` only for a 2xx answer.
    pub async fn call(
        &self,
        msg: &Message,
    ) -> Result<(StatusCode, HeaderMap, Bytes), ProcessError> {
        let (request, shown) = self.request(msg)?;
        let what = format!("{} {shown}", self.method);
        let deadline = Instant::now() + self.timeout;
        let timed_out = || {
            ProcessError::new(
                ErrorKind::Timeout,
                format!(
                    "{what} did not answer within {}; raise `timeout` or check the remote system",
                    HumanDuration(self.timeout)
                ),
            )
        };
        let response = match tokio::time::timeout_at(deadline, self.client.client.request(request))
            .await
        {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) => {
                let detail = if e.is_connect() {
                    format!(
                        "cannot connect for {what}: {}; check that the service is up and the url is right",
                        chain(&e)
                    )
                } else {
                    format!("{what} failed: {}", chain(&e))
                };
                return Err(ProcessError::new(ErrorKind::Unavailable, detail));
            }
            Ok(Ok(response)) => response,
        };
        let (parts, body) = response.into_parts();
        let body = match tokio::time::timeout_at(
            deadline,
            Limited::new(body, MAX_RESPONSE_BODY).collect(),
        )
        .await
        {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) => {
                let detail = if e
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    format!("{what} answered a body larger than 64 MiB; ask for less")
                } else {
                    format!("reading the answer of {what} failed: {e}")
                };
                return Err(ProcessError::new(ErrorKind::Unavailable, detail));
            }
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        if !parts.status.is_success() {
            let quote = &body[..body.len().min(ERROR_BODY_QUOTE)];
            let mut err = ProcessError::new(
                ErrorKind::Remote,
                format!(
                    "{what} answered {}: {}",
                    parts.status,
                    String::from_utf8_lossy(quote)
                ),
            );
            err.remote_status = Some(parts.status.as_u16());
            return Err(err);
        }
        Ok((parts.status, parts.headers, body))
    }
}

/// The error and its causes, `: `-separated (hyper's own message is terse).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The `http` request processor.
#[derive(Debug)]
pub struct HttpProcessor {
    call: HttpCall,
}

/// Builds the `http` request processor.
pub fn build_processor(
    config: &Value,
    ctx: &BuildContext<'_>,
) -> Result<Arc<dyn Processor>, BuildError> {
    Ok(Arc::new(HttpProcessor {
        call: HttpCall::new(config, ctx)?,
    }))
}

#[async_trait]
impl Processor for HttpProcessor {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        match self.call.call(&msg).await {
            Ok((status, headers, body)) => {
                let mut next = msg.derive(Body::from_bytes(body));
                // Headers of an earlier call's response would be misleading now.
                next.headers
                    .retain(|name, _| !name.starts_with("http.response.header."));
                next.headers.remove("content-type");
                next.headers
                    .insert("http.status".into(), status.as_u16().to_string());
                for (name, value) in &headers {
                    let Ok(value) = std::str::from_utf8(value.as_bytes()) else {
                        continue;
                    };
                    next.headers
                        .entry(format!("http.response.header.{}", name.as_str()))
                        .and_modify(|joined| {
                            joined.push_str(", ");
                            joined.push_str(value);
                        })
                        .or_insert_with(|| value.to_owned());
                }
                if let Some(ct) = headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                {
                    next.headers.insert("content-type".into(), ct.to_owned());
                }
                let mut out = Outputs::new();
                out.push(next);
                Ok(out)
            }
            Err(e) => Err(Failure::new(msg, e.in_step(&self.call.step))),
        }
    }
}

/// The `http` sink.
#[derive(Debug)]
pub struct HttpSink {
    call: HttpCall,
    /// Unhealthy while the remote system cannot be reached, so `/health` shows it.
    health: HealthHandle,
}

/// Builds the `http` sink.
pub fn build_sink(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Sink>, BuildError> {
    Ok(Arc::new(HttpSink {
        call: HttpCall::new(config, ctx)?,
        health: HealthHandle::for_component(ctx),
    }))
}

#[async_trait]
impl Sink for HttpSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        match self.call.call(msg).await {
            Ok(_) => {
                self.health.healthy();
                Ok(())
            }
            Err(e) => {
                // Only an unreachable system makes the flow unhealthy; an error answer is the
                // remote system speaking, and a timeout may be one slow request.
                if e.kind == ErrorKind::Unavailable {
                    self.health.unhealthy(&e.detail);
                } else {
                    self.health.healthy();
                }
                Err(e.in_step(&self.call.step))
            }
        }
    }
}
