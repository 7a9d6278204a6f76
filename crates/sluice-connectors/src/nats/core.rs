//! Core NATS: the `nats` source (subscribe, optionally in a queue group; answers requests), the
//! `nats` sink (publish) and the `nats` processor (request-reply: the reply becomes the message).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::duration::HumanDuration;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    AckToken, BuildContext, BuildError, ErrorKind, ExchangePattern, Failure, HealthHandle, Message,
    Outputs, ProcessError, Processor, Sink, Source, SourceContext, SourceError,
};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{
    LazyClient, REPLY_HEADER, SUBJECT_HEADER, check_subject, check_url, connect, connection_fields,
    describe, headers_from_nats, headers_to_nats, unavailable,
};
use crate::reconnect::{self, Backoff};

const SOURCE_DESCRIPTION: &str = "\
Subscribes to `subject` (wildcards `*` and `>` allowed) on a NATS server; with `queue_group`, \
the servers hand each message to one member of the group only, so several Sluice instances share \
the work. Each message becomes one Sluice message: the payload is the body, NATS headers become \
message headers (first value of each), plus `nats.subject` and, for requests, `nats.reply`.

A message with a reply subject (a NATS request) runs as request-reply: the flow's reply (the \
message reaching the end of the flow) is published to the reply subject with its headers; a \
failed message is answered with the error text as body and the `sluice.error.kind` header, so \
the requester does not wait for its timeout.

**Delivery guarantee.** at-most-once: core NATS has no acknowledgement or redelivery; a message \
that fails, or that arrives while Sluice is down or reconnecting, is lost. Use the `jetstream` \
source when messages must not be lost.

**Limits.** At most `concurrency` messages are processed at once; beyond that the client's \
buffer fills and the server drops messages for this slow consumer (logged). Multi-valued NATS \
headers keep their first value. Credentials: user and password in `url`, or `token`; no TLS \
client certificates.";

/// The `nats` source's spec.
pub fn source_spec() -> ComponentSpec {
    connection_fields(
        ComponentSpec::new(
            "nats",
            ComponentKind::Source,
            "Subscribe to a NATS subject (core NATS, at-most-once); answer requests",
        )
        .description(SOURCE_DESCRIPTION),
    )
    .field(
        FieldSpec::new(
            "subject",
            FieldType::String,
            "Subject to subscribe to; `*` matches one token, `>` the rest.",
        )
        .required(),
    )
    .field(FieldSpec::new(
        "queue_group",
        FieldType::String,
        "Queue group: each message goes to one subscriber of the group.",
    ))
    .field(
        FieldSpec::new(
            "concurrency",
            FieldType::Integer {
                min: Some(1),
                max: Some(65_536),
            },
            "Messages processed at once.",
        )
        .default_value(64),
    )
    .shorthand("subject")
    .example("Every order event", "subject: orders.>\n")
    .example(
        "A request-reply service shared by instances",
        "url: nats://127.0.0.1:4222\nsubject: prices.quote\nqueue_group: pricing\n",
    )
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceConfig {
    #[serde(default = "default_url")]
    url: String,
    #[serde(default)]
    token: Option<String>,
    subject: String,
    #[serde(default)]
    queue_group: Option<String>,
    #[serde(default = "default_concurrency")]
    concurrency: usize,
}

fn default_url() -> String {
    super::DEFAULT_URL.to_owned()
}
fn default_concurrency() -> usize {
    64
}

struct NatsSource {
    config: SourceConfig,
}

/// Builds the `nats` source.
pub fn build_source(
    config: &Value,
    _ctx: &BuildContext<'_>,
) -> Result<Box<dyn Source>, BuildError> {
    let config: SourceConfig = crate::config::parse(config)?;
    check_url(&config.url)?;
    check_subject("subject", &config.subject, true)?;
    if config
        .queue_group
        .as_deref()
        .is_some_and(|g| g.is_empty() || g.contains(char::is_whitespace))
    {
        return Err(BuildError::field(
            "queue_group",
            "must be a non-empty name without spaces",
        ));
    }
    if config.concurrency == 0 {
        return Err(BuildError::field("concurrency", "must be at least 1"));
    }
    Ok(Box::new(NatsSource { config }))
}

#[async_trait]
impl Source for NatsSource {
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let c = &self.config;
        let health = HealthHandle::for_source(&ctx);
        let what = describe(&c.url);
        let mut backoff = Backoff::default();
        // async-nats resubscribes after a reconnect by itself; only the first connection and
        // subscription are retried here.
        let subscribed =
            reconnect::connect(&what, &health, &ctx.shutdown, &mut backoff, || async {
                let client = connect(&c.url, c.token.as_deref(), &ctx.flow, &health)
                    .await
                    .map_err(|e| e.to_string())?;
                let subscriber = match &c.queue_group {
                    Some(group) => {
                        client
                            .queue_subscribe(c.subject.clone(), group.clone())
                            .await
                    }
                    None => client.subscribe(c.subject.clone()).await,
                }
                .map_err(|e| e.to_string())?;
                Ok::<_, String>((client, subscriber))
            })
            .await;
        let Some((client, mut subscriber)) = subscribed else {
            return Ok(());
        };
        tracing::info!(flow = %ctx.flow, subject = %c.subject, service = %what, "subscribed");
        let permits = Arc::new(Semaphore::new(c.concurrency));
        let mut in_flight = JoinSet::new();
        loop {
            while in_flight.try_join_next().is_some() {}
            let permit = tokio::select! {
                () = ctx.shutdown.cancelled() => break,
                p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let incoming = tokio::select! {
                () = ctx.shutdown.cancelled() => break,
                m = subscriber.next() => m,
            };
            let Some(incoming) = incoming else {
                tracing::warn!(flow = %ctx.flow, subject = %c.subject, "the NATS subscription ended");
                break;
            };
            let mut msg = Message::bytes(incoming.payload.clone());
            headers_from_nats(incoming.headers.as_ref(), &mut msg.headers);
            msg.headers
                .insert(SUBJECT_HEADER.to_owned(), incoming.subject.to_string());
            let reply_to = incoming.reply.as_ref().map(ToString::to_string);
            if let Some(reply) = &reply_to {
                msg.headers.insert(REPLY_HEADER.to_owned(), reply.clone());
                msg.pattern = ExchangePattern::InOut;
            }
            // Core NATS cannot redeliver: the outcome is only logged.
            let flow = Arc::clone(&ctx.flow);
            let token = AckToken::with_callback(move |outcome| {
                if let sluice_core::Outcome::Nack(reason) = outcome {
                    tracing::debug!(flow = %flow, %reason, "core NATS message failed; it is not redelivered");
                }
            });
            let work = Arc::clone(&ctx.dispatcher).admit(msg.with_ack(token)).await;
            let client = client.clone();
            in_flight.spawn(async move {
                let result = work.await;
                drop(permit);
                if let Some(reply) = reply_to {
                    answer(&client, reply, result).await;
                }
            });
        }
        let _ = subscriber.unsubscribe().await;
        while in_flight.join_next().await.is_some() {}
        let _ = client.flush().await;
        Ok(())
    }
}

/// Publishes the flow's answer to a request's reply subject.
async fn answer(client: &async_nats::Client, reply: String, result: Result<Vec<Message>, Failure>) {
    let (payload, headers) = match result {
        Ok(replies) => match replies.into_iter().next() {
            Some(m) => (m.body.as_bytes().clone(), headers_to_nats(&m)),
            None => (bytes::Bytes::new(), async_nats::HeaderMap::new()),
        },
        Err(failure) => {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("sluice.error.kind", failure.error.kind.as_str());
            (bytes::Bytes::from(failure.error.to_string()), headers)
        }
    };
    if let Err(e) = client.publish_with_headers(reply, headers, payload).await {
        tracing::warn!(error = %e, "cannot answer a NATS request");
    }
}

const SINK_DESCRIPTION: &str = "\
Publishes each message to `subject` on a NATS server: the body is the payload and the message \
headers become NATS headers (except `nats.*`, which describe where a received message came \
from). `{header}` placeholders in `subject` are filled from message headers.

**Delivery guarantee.** at-most-once towards subscribers: `deliver` returns after the server \
has received the message (a flush: the server answered a ping sent after it), but core NATS \
keeps nothing: subscribers that are not connected never see it. Publish to a JetStream stream \
(the `jetstream` sink) for at-least-once.

**Limits.** Payloads up to the server's `max_payload` (1 MiB by default); a larger one fails \
with `invalid_input`. Credentials: user and password in `url`, or `token`; no TLS client \
certificates.";

/// The `nats` sink's spec.
pub fn sink_spec() -> ComponentSpec {
    connection_fields(
        ComponentSpec::new(
            "nats",
            ComponentKind::Sink,
            "Publish messages to a NATS subject (core NATS)",
        )
        .description(SINK_DESCRIPTION),
    )
    .field(
        FieldSpec::new(
            "subject",
            FieldType::String,
            "Subject to publish to; `{header}` placeholders are filled from message headers.",
        )
        .required(),
    )
    .shorthand("subject")
    .example("Publish every order", "subject: orders.created\n")
    .example(
        "Subject from a header",
        "subject: \"events.{event-type}\"\nurl: nats://127.0.0.1:4222\n",
    )
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkConfig {
    #[serde(default = "default_url")]
    url: String,
    #[serde(default)]
    token: Option<String>,
    subject: String,
}

/// A subject with `{header}` placeholders.
pub(crate) struct SubjectTemplate(crate::template::Template);

impl SubjectTemplate {
    pub(crate) fn parse(field: &str, text: &str) -> Result<Self, BuildError> {
        let template = crate::template::Template::parse(text)
            .map_err(|e| BuildError::field(field, e.to_string()))?;
        let sample: Result<String, ()> = template.render(|_| Ok("x".to_owned()));
        check_subject(field, &sample.unwrap_or_default(), false)?;
        Ok(SubjectTemplate(template))
    }

    pub(crate) fn render(&self, msg: &Message) -> Result<String, ProcessError> {
        let subject = self.0.render(|name| {
            msg.headers.get(name).cloned().ok_or_else(|| {
                ProcessError::invalid_input(format!(
                    "the subject needs header `{name}`, which the message lacks"
                ))
            })
        })?;
        if subject.is_empty()
            || subject.contains(char::is_whitespace)
            || subject
                .split('.')
                .any(|t| t.is_empty() || t == "*" || t == ">")
        {
            return Err(ProcessError::invalid_input(format!(
                "`{subject}` is not a valid subject to publish to"
            )));
        }
        Ok(subject)
    }
}

struct NatsSink {
    url: String,
    subject: SubjectTemplate,
    client: LazyClient,
}

/// Builds the `nats` sink.
pub fn build_sink(config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Sink>, BuildError> {
    let c: SinkConfig = crate::config::parse(config)?;
    check_url(&c.url)?;
    let subject = SubjectTemplate::parse("subject", &c.subject)?;
    Ok(Arc::new(NatsSink {
        client: LazyClient::new(
            c.url.clone(),
            c.token,
            format!("{}/{}", ctx.flow, ctx.id),
            HealthHandle::for_component(ctx),
        ),
        url: c.url,
        subject,
    }))
}

#[async_trait]
impl Sink for NatsSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        let subject = self.subject.render(msg)?;
        let client = self.client.get().await?;
        check_size(&client, msg)?;
        client
            .publish_with_headers(subject, headers_to_nats(msg), msg.body.as_bytes().clone())
            .await
            .map_err(|e| unavailable(&self.url, "publishing", e))?;
        // While disconnected the client holds the message and the flush waits: bounded here.
        match tokio::time::timeout(super::FLUSH_TIMEOUT, client.flush()).await {
            Ok(flushed) => flushed.map_err(|e| unavailable(&self.url, "flushing", e)),
            Err(_) => Err(unavailable(
                &self.url,
                "publishing",
                "the server did not confirm within 5s (disconnected?)",
            )),
        }
    }
}

/// Refuses a body larger than the server accepts, before the server closes the connection for it.
fn check_size(client: &async_nats::Client, msg: &Message) -> Result<(), ProcessError> {
    let max = client.server_info().max_payload;
    if max > 0 && msg.body.len() > max {
        return Err(ProcessError::invalid_input(format!(
            "the body is {} bytes, more than the server's max_payload of {max}",
            msg.body.len()
        )));
    }
    Ok(())
}

const PROCESSOR_DESCRIPTION: &str = "\
Sends the message as a NATS request to `subject` and continues with the reply: the reply's \
payload becomes the body and its headers become message headers (the original headers are kept \
unless the reply sets the same name).

**Delivery guarantee.** The request is sent once per message; a failure goes to the flow's error \
handling (add a retry policy for at-least-once; the responder must then tolerate duplicates).

**Limits.** No reply within `timeout` fails with `timeout`; no responder on the subject fails \
with `unavailable` (both are worth a retry). A reply carrying a `Nats-Service-Error` header \
fails with `remote`. Payload size as for the `nats` sink.";

/// The `nats` processor's spec.
pub fn processor_spec() -> ComponentSpec {
    connection_fields(
        ComponentSpec::new(
            "nats",
            ComponentKind::Processor,
            "Send a NATS request; the reply becomes the message",
        )
        .description(PROCESSOR_DESCRIPTION),
    )
    .field(
        FieldSpec::new(
            "subject",
            FieldType::String,
            "Subject of the request; `{header}` placeholders are filled from message headers.",
        )
        .required(),
    )
    .field(
        FieldSpec::new(
            "timeout",
            FieldType::Duration,
            "How long to wait for the reply.",
        )
        .default_value("5s"),
    )
    .shorthand("subject")
    .example(
        "Ask the pricing service",
        "subject: prices.quote\ntimeout: 2s\n",
    )
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProcessorConfig {
    #[serde(default = "default_url")]
    url: String,
    #[serde(default)]
    token: Option<String>,
    subject: String,
    #[serde(default = "default_timeout")]
    timeout: HumanDuration,
}

fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

struct NatsRequest {
    url: String,
    subject: SubjectTemplate,
    timeout: Duration,
    client: LazyClient,
}

/// Builds the `nats` processor.
pub fn build_processor(
    config: &Value,
    ctx: &BuildContext<'_>,
) -> Result<Arc<dyn Processor>, BuildError> {
    let c: ProcessorConfig = crate::config::parse(config)?;
    check_url(&c.url)?;
    let subject = SubjectTemplate::parse("subject", &c.subject)?;
    if c.timeout.0.is_zero() {
        return Err(BuildError::field("timeout", "must be longer than 0s"));
    }
    Ok(Arc::new(NatsRequest {
        client: LazyClient::new(
            c.url.clone(),
            c.token,
            format!("{}/{}", ctx.flow, ctx.id),
            HealthHandle::for_component(ctx),
        ),
        url: c.url,
        subject,
        timeout: c.timeout.0,
    }))
}

#[async_trait]
impl Processor for NatsRequest {
    async fn process(&self, msg: Message) -> Result<Outputs, Failure> {
        match self.request(&msg).await {
            Ok(reply) => {
                let mut out = msg.derive(sluice_core::Body::from_bytes(reply.payload.clone()));
                headers_from_nats(reply.headers.as_ref(), &mut out.headers);
                if let Some(error) = reply
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Service-Error"))
                {
                    let error = ProcessError::new(
                        ErrorKind::Remote,
                        format!(
                            "the responder on `{}` answered with an error: {error}",
                            reply.subject
                        ),
                    );
                    return Err(Failure::new(out, error));
                }
                Ok(std::iter::once(out).collect())
            }
            Err(e) => Err(Failure::new(msg, e)),
        }
    }
}

impl NatsRequest {
    async fn request(&self, msg: &Message) -> Result<async_nats::Message, ProcessError> {
        let subject = self.subject.render(msg)?;
        let client = self.client.get().await?;
        check_size(&client, msg)?;
        let request = async_nats::Request::new()
            .payload(msg.body.as_bytes().clone())
            .headers(headers_to_nats(msg))
            .timeout(Some(self.timeout));
        client
            .send_request(subject.clone(), request)
            .await
            .map_err(|e| {
                use async_nats::RequestErrorKind as K;
                match e.kind() {
                    K::TimedOut => ProcessError::new(
                        ErrorKind::Timeout,
                        format!("no reply on `{subject}` within {:?}", self.timeout),
                    ),
                    K::NoResponders => ProcessError::new(
                        ErrorKind::Unavailable,
                        format!("no responder on `{subject}` ({})", describe(&self.url)),
                    ),
                    K::Other => unavailable(&self.url, "the request", e),
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::assert_defaults_agree;
    use serde_json::json;

    #[test]
    fn serde_defaults_match_spec_defaults() {
        assert_defaults_agree::<SourceConfig>(&source_spec(), json!({"subject": "a.>"}));
        assert_defaults_agree::<SinkConfig>(&sink_spec(), json!({"subject": "a"}));
        assert_defaults_agree::<ProcessorConfig>(&processor_spec(), json!({"subject": "a"}));
    }

    #[test]
    fn subject_templates_need_their_headers_and_concrete_subjects() {
        let t = SubjectTemplate::parse("subject", "orders.{kind}").unwrap();
        let msg = Message::bytes("x").with_header("kind", "new");
        assert_eq!(t.render(&msg).unwrap(), "orders.new");
        let e = t.render(&Message::bytes("x")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        let wild = Message::bytes("x").with_header("kind", "*");
        assert!(t.render(&wild).is_err());
        assert!(SubjectTemplate::parse("subject", "orders.>").is_err());
    }
}
