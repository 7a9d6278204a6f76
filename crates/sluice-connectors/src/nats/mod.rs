//! NATS: core subscribe/publish/request (`nats`), JetStream durable consumers and acknowledged
//! publishing (`jetstream`), and a KV bucket as idempotency/cache store ([`kv`]).
//!
//! One client per component. The first connection is made with [`crate::reconnect::connect`]
//! (sources) or on first use (sinks and processors); after that async-nats reconnects by itself
//! and the client's events keep the component's health up to date.

pub mod core;
pub mod jetstream;
pub mod kv;

use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event, HeaderMap};
use sluice_core::spec::{ComponentSpec, FieldSpec, FieldType};
use sluice_core::{BuildError, ErrorKind, Headers, HealthHandle, Message, ProcessError};

use crate::reconnect::Backoff;

/// Default server address.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// Header with the subject a message was received on.
pub const SUBJECT_HEADER: &str = "nats.subject";
/// Header with the reply subject of a core NATS request.
pub const REPLY_HEADER: &str = "nats.reply";

/// How long a publish may wait for the server to confirm it received the message.
pub(crate) const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Adds the connection fields every NATS component has.
pub(crate) fn connection_fields(spec: ComponentSpec) -> ComponentSpec {
    spec.field(
        FieldSpec::new(
            "url",
            FieldType::String,
            "Server address (`nats://host:port`, several separated by commas); user and password may be given as `nats://user:pass@host:port`.",
        )
        .default_value(DEFAULT_URL),
    )
    .field(
        FieldSpec::new(
            "token",
            FieldType::String,
            "Authentication token, if the server wants one.",
        )
        .secret(),
    )
}

/// Checks the `url` field.
pub(crate) fn check_url(url: &str) -> Result<(), BuildError> {
    if url.trim().is_empty() {
        return Err(BuildError::field(
            "url",
            "is empty; give the server address, e.g. nats://127.0.0.1:4222",
        ));
    }
    for part in url.split(',') {
        let part = part.trim();
        if let Some((scheme, _)) = part.split_once("://")
            && !matches!(scheme, "nats" | "tls")
        {
            return Err(BuildError::field(
                "url",
                format!("`{part}`: unsupported scheme `{scheme}`; use nats:// (or tls://)"),
            ));
        }
    }
    Ok(())
}

/// Checks a subject: not empty, no spaces; wildcards only where `wildcards` allows.
pub(crate) fn check_subject(field: &str, subject: &str, wildcards: bool) -> Result<(), BuildError> {
    if subject.is_empty() || subject.contains(char::is_whitespace) {
        return Err(BuildError::field(
            field,
            "must be a non-empty NATS subject without spaces, e.g. orders.created",
        ));
    }
    if subject.split('.').any(str::is_empty) {
        return Err(BuildError::field(
            field,
            format!("`{subject}` has an empty token; subjects are dot-separated words"),
        ));
    }
    if !wildcards && subject.split('.').any(|t| t == "*" || t == ">") {
        return Err(BuildError::field(
            field,
            format!("`{subject}` has a wildcard; publishing needs a concrete subject"),
        ));
    }
    Ok(())
}

/// Connects to `url`, keeping `health` up to date with the client's connection events.
pub(crate) async fn connect(
    url: &str,
    token: Option<&str>,
    name: &str,
    health: &HealthHandle,
) -> Result<Client, async_nats::ConnectError> {
    let events = health.clone();
    let what = describe(url);
    let mut options = ConnectOptions::new()
        .name(name)
        .connection_timeout(CONNECT_TIMEOUT)
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |event| {
            let events = events.clone();
            let what = what.clone();
            async move {
                match event {
                    Event::Connected => events.healthy(),
                    Event::Disconnected => {
                        events.unhealthy(format!("lost the connection to {what}; reconnecting"));
                    }
                    other => tracing::debug!(service = %what, event = %other, "nats event"),
                }
            }
        });
    if let Some(token) = token {
        options = options.token(token.to_owned());
    }
    let addrs: Vec<&str> = url.split(',').map(str::trim).collect();
    options.connect(addrs).await
}

/// The wait before async-nats's reconnect attempt `attempts`: the shared policy of
/// [`crate::reconnect`] (100 ms doubling to 1 s, jittered) instead of the client's own, slower
/// one, so a restarted server is used again within about a second.
fn reconnect_delay(attempts: usize) -> Duration {
    let mut backoff = Backoff::default();
    for _ in 0..attempts.min(20) {
        backoff.next_delay();
    }
    backoff.next_delay()
}

/// `NATS at <url>` without credentials, for logs and health reports.
pub(crate) fn describe(url: &str) -> String {
    let shown: Vec<String> = url
        .split(',')
        .map(|u| match u.trim().split_once('@') {
            Some((head, host)) => {
                let scheme = head.split_once("://").map_or("", |(s, _)| s);
                if scheme.is_empty() {
                    host.to_owned()
                } else {
                    format!("{scheme}://{host}")
                }
            }
            None => u.trim().to_owned(),
        })
        .collect();
    format!("NATS at {}", shown.join(","))
}

/// A lazily connected client for sinks and processors: build is synchronous, so the connection
/// is made on first use; a failed attempt is `unavailable` and the next use tries again.
pub(crate) struct LazyClient {
    url: String,
    token: Option<String>,
    name: String,
    health: HealthHandle,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl LazyClient {
    pub(crate) fn new(
        url: String,
        token: Option<String>,
        name: String,
        health: HealthHandle,
    ) -> Self {
        LazyClient {
            url,
            token,
            name,
            health,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// The client, connecting first if needed.
    pub(crate) async fn get(&self) -> Result<Client, ProcessError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        match connect(&self.url, self.token.as_deref(), &self.name, &self.health).await {
            Ok(client) => {
                self.health.healthy();
                *slot = Some(client.clone());
                Ok(client)
            }
            Err(e) => {
                let detail = format!("cannot reach {}: {e}", describe(&self.url));
                self.health.unhealthy(&detail);
                Err(ProcessError::new(ErrorKind::Unavailable, detail))
            }
        }
    }
}

/// NATS headers to message headers: each name keeps its first value.
pub(crate) fn headers_from_nats(headers: Option<&HeaderMap>, into: &mut Headers) {
    let Some(headers) = headers else { return };
    for (name, values) in headers.iter() {
        if let Some(value) = values.first() {
            into.insert(name.to_string(), value.as_str().to_owned());
        }
    }
}

/// Message headers to NATS headers, leaving out the `nats.*` ones this connector sets on
/// received messages (they describe the hop, not the message).
pub(crate) fn headers_to_nats(msg: &Message) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in &msg.headers {
        if name.starts_with("nats.") || !valid_header_name(name) {
            continue;
        }
        headers.insert(name.as_str(), value.as_str());
    }
    headers
}

/// NATS header names are HTTP-like tokens: printable ASCII without `:` or spaces.
fn valid_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// A publish/request failure as a [`ProcessError`], `unavailable` unless said otherwise.
pub(crate) fn unavailable(url: &str, what: &str, e: impl std::fmt::Display) -> ProcessError {
    ProcessError::new(
        ErrorKind::Unavailable,
        format!("{what} on {} failed: {e}", describe(url)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_subjects_are_checked() {
        assert!(check_url("nats://127.0.0.1:4222").is_ok());
        assert!(check_url("nats://a:4222,nats://b:4222").is_ok());
        assert_eq!(check_url("").unwrap_err().field.as_deref(), Some("url"));
        assert!(
            check_url("http://x")
                .unwrap_err()
                .message
                .contains("scheme")
        );
        assert!(check_subject("subject", "orders.>", true).is_ok());
        assert!(check_subject("subject", "orders.>", false).is_err());
        assert!(check_subject("subject", "orders..x", true).is_err());
        assert!(check_subject("subject", "a b", true).is_err());
    }

    #[test]
    fn reconnects_follow_the_shared_capped_backoff() {
        assert!(reconnect_delay(0) <= Duration::from_millis(100));
        for attempts in [5, 50, usize::MAX] {
            let d = reconnect_delay(attempts);
            assert!(
                d >= Duration::from_millis(500) && d <= Duration::from_secs(1),
                "{d:?}"
            );
        }
    }

    #[test]
    fn credentials_are_not_shown() {
        assert_eq!(
            describe("nats://user:secret@127.0.0.1:4222"),
            "NATS at nats://127.0.0.1:4222"
        );
    }

    #[test]
    fn headers_map_both_ways_without_hop_headers() {
        let msg = Message::json(serde_json::json!(1))
            .with_header("trace-id", "t1")
            .with_header("nats.subject", "x")
            .with_header("bad name", "v");
        let nats = headers_to_nats(&msg);
        assert_eq!(nats.get("trace-id").map(|v| v.as_str()), Some("t1"));
        assert!(nats.get("nats.subject").is_none());
        let mut back = Headers::new();
        headers_from_nats(Some(&nats), &mut back);
        assert_eq!(back.len(), 1);
        assert_eq!(back["trace-id"], "t1");
    }
}
