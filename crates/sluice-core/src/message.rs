//! The message that flows through a route: id, headers, body, metadata, exchange pattern and the
//! acknowledgement shares that tie it back to its source.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;
use serde_json::Value;
use smallvec::SmallVec;
use uuid::Uuid;

use crate::ack::AckToken;

/// Whether the producer of a message waits for a reply (Camel's exchange pattern).
///
/// Request-reply is a property of the message, not a second API: an HTTP request arrives InOut and
/// the flow's result becomes the response; a timer tick is InOnly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExchangePattern {
    /// Fire and forget: the producer only needs the acknowledgement.
    #[default]
    InOnly,
    /// Request-reply: the producer waits for the flow's result.
    InOut,
}

/// Message headers: a string map ordered by name, so output and snapshots are deterministic.
pub type Headers = BTreeMap<String, String>;

/// What the runtime knows about a message besides its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// When the source created the message.
    pub created_at: SystemTime,
    /// Ties related messages together (the parts of a split, a request and its reply).
    pub correlation_id: Option<String>,
    /// W3C `traceparent` of the trace this message belongs to, when one was propagated.
    pub traceparent: Option<String>,
    /// Name of the flow whose source produced the message.
    pub origin: Option<Arc<str>>,
    /// The source delivers this message again if it is nacked (a broker redelivery with attempts
    /// left), so a failure is not final yet: the flow's `dead_letter:` leaves it to the last
    /// delivery and nacks instead. A source sets it on every delivery but the last; by default a
    /// failure is dead-lettered at once.
    pub redelivers_on_nack: bool,
}

impl Default for Metadata {
    fn default() -> Self {
        Metadata {
            created_at: SystemTime::now(),
            correlation_id: None,
            traceparent: None,
            origin: None,
            redelivers_on_nack: false,
        }
    }
}

/// A message body: raw bytes and/or a parsed JSON view, each computed on first use.
///
/// A flow that only routes never parses the body; a chain of JSON transforms never serializes it
/// until a sink needs bytes.
#[derive(Debug, Clone, Default)]
pub struct Body {
    bytes: OnceLock<Bytes>,
    json: OnceLock<Arc<Value>>,
}

/// The body is not valid JSON; carries the parser's description of where and why.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("body is not valid JSON: {0}")]
pub struct NotJson(pub String);

impl Body {
    /// A body of raw bytes.
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Self {
        let body = Body::default();
        let _ = body.bytes.set(bytes.into());
        body
    }

    /// A body holding a JSON value; its bytes are the compact serialization, made when needed.
    pub fn from_json(value: Value) -> Self {
        let body = Body::default();
        let _ = body.json.set(Arc::new(value));
        body
    }

    /// The body as bytes, serializing the JSON view if that is all there is.
    pub fn as_bytes(&self) -> &Bytes {
        self.bytes.get_or_init(|| match self.json.get() {
            // Serializing a `Value` cannot fail: its map keys are always strings.
            Some(json) => Bytes::from(serde_json::to_vec(json.as_ref()).unwrap_or_default()),
            None => Bytes::new(),
        })
    }

    /// The body parsed as JSON (parsed once, then cached).
    ///
    /// An empty body is `null`, so a bodiless request still reaches a jq step.
    pub fn json(&self) -> Result<&Value, NotJson> {
        if let Some(json) = self.json.get() {
            return Ok(json.as_ref());
        }
        let bytes = self.as_bytes();
        let parsed = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(bytes).map_err(|e| NotJson(e.to_string()))?
        };
        Ok(self.json.get_or_init(|| Arc::new(parsed)).as_ref())
    }

    /// The parsed JSON view, shared: cheap when the body was built from JSON.
    pub fn json_shared(&self) -> Result<Arc<Value>, NotJson> {
        self.json()?;
        self.json
            .get()
            .cloned()
            .ok_or_else(|| NotJson("unreachable".into()))
    }

    /// The JSON view, for a step that is about to replace the body. When the body also holds
    /// its bytes, the cached view is handed over rather than shared, so the step may consume it
    /// without copying it; the body keeps its bytes and parses them again if asked.
    pub fn take_json(&mut self) -> Result<Arc<Value>, NotJson> {
        self.json()?;
        if self.bytes.get().is_some()
            && let Some(json) = self.json.take()
        {
            return Ok(json);
        }
        self.json_shared()
    }

    /// The body as UTF-8 text, replacing invalid sequences.
    pub fn to_text(&self) -> String {
        String::from_utf8_lossy(self.as_bytes()).into_owned()
    }

    /// Length in bytes (serializes a JSON-only body).
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether the body has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PartialEq for Body {
    fn eq(&self, other: &Self) -> bool {
        match (self.json.get(), other.json.get()) {
            (Some(a), Some(b)) => a == b,
            _ => self.as_bytes() == other.as_bytes(),
        }
    }
}

/// The unit of work in Sluice.
///
/// Cloning a message clones its acknowledgement shares: each copy must be resolved (see
/// [`crate::ack`]). Use [`Message::ack`] for a message that is deliberately dropped (a filter).
#[derive(Debug, Clone)]
pub struct Message {
    id: Uuid,
    /// String headers, by name. HTTP header names are lower case.
    pub headers: Headers,
    /// The content.
    pub body: Body,
    /// Timestamps, correlation and trace context.
    pub meta: Metadata,
    /// InOnly or InOut.
    pub pattern: ExchangePattern,
    acks: SmallVec<[AckTokenSlot; 1]>,
}

/// An [`AckToken`] that clones as a new share, so `Message` can derive `Clone`.
#[derive(Debug)]
struct AckTokenSlot(AckToken);

impl Clone for AckTokenSlot {
    fn clone(&self) -> Self {
        AckTokenSlot(self.0.share())
    }
}

impl Message {
    /// A new InOnly message with a fresh UUID v7 id and no acknowledgement attached.
    pub fn new(body: Body) -> Self {
        Message {
            id: Uuid::now_v7(),
            headers: Headers::new(),
            body,
            meta: Metadata::default(),
            pattern: ExchangePattern::InOnly,
            acks: SmallVec::new(),
        }
    }

    /// A new message whose body is a JSON value.
    pub fn json(value: Value) -> Self {
        Message::new(Body::from_json(value))
    }

    /// A new message whose body is raw bytes.
    pub fn bytes(bytes: impl Into<Bytes>) -> Self {
        Message::new(Body::from_bytes(bytes))
    }

    /// A copy with the same id, headers, body and metadata but **no** acknowledgement shares:
    /// for a record kept aside (the original of a message, for its dead letter) or a
    /// fire-and-forget copy (a wire tap) that must not hold the source's acknowledgement.
    pub fn detached(&self) -> Message {
        Message {
            id: self.id,
            headers: self.headers.clone(),
            body: self.body.clone(),
            meta: self.meta.clone(),
            pattern: self.pattern,
            acks: SmallVec::new(),
        }
    }

    /// The message id (UUID v7: sortable by creation time).
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Gives the message an existing id, builder style: for a message restored from storage (a
    /// durable channel), which keeps the id it had when it was written.
    #[must_use]
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Sets a header, builder style.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the exchange pattern, builder style.
    #[must_use]
    pub fn with_pattern(mut self, pattern: ExchangePattern) -> Self {
        self.pattern = pattern;
        self
    }

    /// Attaches an acknowledgement share, builder style.
    #[must_use]
    pub fn with_ack(mut self, token: AckToken) -> Self {
        self.acks.push(AckTokenSlot(token));
        self
    }

    /// A new message derived from this one: same headers, metadata and pattern, a new id and
    /// body, and this message's acknowledgement shares **moved** into it (split, transform to a new
    /// message). To derive several parts, use [`Message::split_into`].
    #[must_use]
    pub fn derive(mut self, body: Body) -> Self {
        let acks = std::mem::take(&mut self.acks);
        Message {
            id: Uuid::now_v7(),
            headers: std::mem::take(&mut self.headers),
            body,
            meta: self.meta.clone(),
            pattern: self.pattern,
            acks,
        }
    }

    /// Splits this message into parts with the given bodies; each part holds a share of this
    /// message's acknowledgement, so the source is acked only when every part is done. An empty
    /// split acknowledges the message at once (nothing is left to do).
    pub fn split_into(self, bodies: impl IntoIterator<Item = Body>) -> Vec<Message> {
        let parts: Vec<Message> = bodies
            .into_iter()
            .map(|body| Message {
                id: Uuid::now_v7(),
                headers: self.headers.clone(),
                body,
                meta: self.meta.clone(),
                pattern: self.pattern,
                acks: self.acks.clone(),
            })
            .collect();
        self.ack();
        parts
    }

    /// Moves the acknowledgement shares of `other` into this message (aggregation: the merged
    /// message is acked only when it is done, and then so is every part).
    pub fn absorb_acks(&mut self, other: Message) {
        let mut other = other;
        self.acks.extend(std::mem::take(&mut other.acks));
    }

    /// Resolves every acknowledgement share of this message as committed (or deliberately dropped).
    pub fn ack(mut self) {
        for slot in self.acks.drain(..) {
            slot.0.ack();
        }
    }

    /// Resolves every acknowledgement share of this message as failed.
    pub fn nack(mut self, reason: &str) {
        let reason: Arc<str> = Arc::from(reason);
        for slot in self.acks.drain(..) {
            slot.0.nack(Arc::clone(&reason));
        }
    }

    /// Removes the acknowledgement shares, leaving a message that acks nothing (for a reply that
    /// is handed to a caller after the flow has already resolved its shares).
    pub fn take_acks(&mut self) -> Vec<AckToken> {
        self.acks.drain(..).map(|slot| slot.0).collect()
    }

    /// How many acknowledgement shares this message holds.
    pub fn ack_count(&self) -> usize {
        self.acks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ack::Outcome;
    use serde_json::json;

    #[test]
    fn json_body_serializes_lazily_and_round_trips() {
        let body = Body::from_json(json!({"a": 1}));
        assert_eq!(body.as_bytes().as_ref(), br#"{"a":1}"#);
        assert_eq!(body.json().unwrap(), &json!({"a": 1}));
    }

    #[test]
    fn take_json_hands_over_the_view_only_when_the_bytes_stay() {
        let mut bytes = Body::from_bytes(&br#"{"a":1}"#[..]);
        let taken = bytes.take_json().unwrap();
        assert_eq!(Arc::strong_count(&taken), 1, "the body kept a share");
        assert_eq!(bytes.as_bytes().as_ref(), br#"{"a":1}"#);
        assert_eq!(bytes.json().unwrap(), &json!({"a": 1}));
        // A body that is only JSON must keep its view: it is all there is.
        let mut only_json = Body::from_json(json!([1]));
        let shared = only_json.take_json().unwrap();
        assert_eq!(Arc::strong_count(&shared), 2);
        assert_eq!(only_json.json().unwrap(), &json!([1]));
        assert!(Body::from_bytes(&b"{oops"[..]).take_json().is_err());
    }

    #[test]
    fn byte_body_parses_once_and_reports_bad_json() {
        assert_eq!(
            Body::from_bytes(&b"[1,2]"[..]).json().unwrap(),
            &json!([1, 2])
        );
        let err = Body::from_bytes(&b"{oops"[..]).json().unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
        assert_eq!(Body::from_bytes(&b"  \n"[..]).json().unwrap(), &Value::Null);
    }

    #[tokio::test]
    async fn a_detached_copy_holds_no_share() {
        let (token, rx) = crate::AckToken::channel();
        let msg = Message::json(json!({"a": 1}))
            .with_header("h", "v")
            .with_ack(token);
        let copy = msg.detached();
        assert_eq!((copy.id(), copy.ack_count()), (msg.id(), 0));
        assert_eq!(copy.headers["h"], "v");
        msg.ack();
        // The copy still exists: the source's outcome does not wait for it.
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
        drop(copy);
    }

    #[test]
    fn ids_are_v7_and_distinct() {
        let a = Message::json(json!(1));
        let b = Message::json(json!(1));
        assert_ne!(a.id(), b.id());
        assert_eq!(a.id().get_version_num(), 7);
    }

    #[tokio::test]
    async fn split_parts_ack_the_source_only_when_all_are_done() {
        let (token, mut rx) = AckToken::channel();
        let msg = Message::json(json!([1, 2])).with_ack(token);
        let mut parts = msg.split_into([Body::from_json(json!(1)), Body::from_json(json!(2))]);
        let second = parts.pop().unwrap();
        parts.pop().unwrap().ack();
        assert!(rx.try_recv().is_err(), "acked before the second part");
        second.ack();
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
    }

    #[tokio::test]
    async fn empty_split_acks_at_once() {
        let (token, rx) = AckToken::channel();
        let parts = Message::json(json!([])).with_ack(token).split_into([]);
        assert!(parts.is_empty());
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
    }

    #[tokio::test]
    async fn clone_is_a_second_share() {
        let (token, rx) = AckToken::channel();
        let msg = Message::json(json!(1)).with_ack(token);
        let copy = msg.clone();
        msg.ack();
        copy.nack("copy failed");
        assert_eq!(rx.await.unwrap(), Outcome::Nack("copy failed".into()));
    }

    #[tokio::test]
    async fn absorbed_parts_are_acked_with_the_aggregate() {
        let (t1, rx1) = AckToken::channel();
        let (t2, rx2) = AckToken::channel();
        let mut merged = Message::json(json!(1)).with_ack(t1);
        merged.absorb_acks(Message::json(json!(2)).with_ack(t2));
        assert_eq!(merged.ack_count(), 2);
        merged.ack();
        assert_eq!(rx1.await.unwrap(), Outcome::Ack);
        assert_eq!(rx2.await.unwrap(), Outcome::Ack);
    }
}
