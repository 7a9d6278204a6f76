//! The envelope: a [`Message`] as bytes, for the durable store (a durable channel's records).
//!
//! What is kept is what the reading flow needs to carry on as if the message had crossed an
//! in-memory channel: id, headers, body bytes, creation time, correlation id, trace context and
//! origin flow. Not kept: acknowledgement shares (the record itself stands for them) and the
//! exchange pattern (a durable channel is one way, so a restored message is InOnly).
//!
//! Layout, version 1: `u8 version | u32 meta length (big endian) | meta JSON | body bytes`.
//! The store frames and checksums each record, so the envelope does not repeat a checksum;
//! the version byte lets a later layout be read beside this one.

use std::time::{Duration, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use sluice_core::message::Headers;
use sluice_core::{Body, Message};
use uuid::Uuid;

/// The layout written by [`encode`].
pub const VERSION: u8 = 1;

const PREFIX: usize = 1 + 4;

/// Why bytes could not be read back as a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// No bytes at all.
    #[error("empty envelope")]
    Empty,
    /// A layout this build does not know (written by a newer Sluice, or not an envelope).
    #[error("unsupported envelope version {0}; this build reads version {VERSION}")]
    UnsupportedVersion(u8),
    /// Fewer bytes than the layout announces.
    #[error("truncated envelope: {needed} bytes announced, {available} present")]
    Truncated {
        /// Bytes the prefix announces.
        needed: usize,
        /// Bytes there are.
        available: usize,
    },
    /// The metadata part is not what version 1 writes.
    #[error("malformed envelope metadata: {0}")]
    Meta(String),
}

#[derive(Serialize, Deserialize)]
struct Meta {
    id: String,
    #[serde(default, skip_serializing_if = "Headers::is_empty")]
    headers: Headers,
    created_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
}

/// The message as envelope bytes.
pub fn encode(msg: &Message) -> Bytes {
    let created_at_ms = msg
        .meta
        .created_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let meta = Meta {
        id: msg.id().to_string(),
        headers: msg.headers.clone(),
        created_at_ms,
        correlation_id: msg.meta.correlation_id.clone(),
        traceparent: msg.meta.traceparent.clone(),
        origin: msg.meta.origin.as_deref().map(str::to_owned),
    };
    // A struct of strings and numbers always serializes.
    let meta = serde_json::to_vec(&meta).unwrap_or_default();
    let body = msg.body.as_bytes();
    let mut out = BytesMut::with_capacity(PREFIX + meta.len() + body.len());
    out.put_u8(VERSION);
    out.put_u32(u32::try_from(meta.len()).unwrap_or(u32::MAX));
    out.put_slice(&meta);
    out.put_slice(body);
    out.freeze()
}

/// The message stored in `bytes`, without acknowledgement shares.
pub fn decode(bytes: &Bytes) -> Result<Message, EnvelopeError> {
    let (&version, rest) = bytes.split_first().ok_or(EnvelopeError::Empty)?;
    if version != VERSION {
        return Err(EnvelopeError::UnsupportedVersion(version));
    }
    let truncated = |needed: usize| EnvelopeError::Truncated {
        needed,
        available: bytes.len(),
    };
    let len_bytes: [u8; 4] = rest
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| truncated(PREFIX))?;
    let meta_len = usize::try_from(u32::from_be_bytes(len_bytes)).unwrap_or(usize::MAX);
    let body_start = PREFIX.saturating_add(meta_len);
    let meta_bytes = bytes
        .get(PREFIX..body_start)
        .ok_or_else(|| truncated(body_start))?;
    let meta: Meta =
        serde_json::from_slice(meta_bytes).map_err(|e| EnvelopeError::Meta(e.to_string()))?;
    let id = Uuid::parse_str(&meta.id)
        .map_err(|e| EnvelopeError::Meta(format!("message id `{}`: {e}", meta.id)))?;
    let mut msg = Message::new(Body::from_bytes(bytes.slice(body_start..))).with_id(id);
    msg.headers = meta.headers;
    msg.meta.created_at = UNIX_EPOCH + Duration::from_millis(meta.created_at_ms);
    msg.meta.correlation_id = meta.correlation_id;
    msg.meta.traceparent = meta.traceparent;
    msg.meta.origin = meta.origin.map(Into::into);
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_core::ExchangePattern;

    #[test]
    fn a_message_survives_the_round_trip() {
        let mut msg = Message::json(json!({"order": 7}))
            .with_header("tenant", "acme")
            .with_pattern(ExchangePattern::InOut);
        msg.meta.correlation_id = Some("c-1".into());
        msg.meta.traceparent = Some("00-abc-def-01".into());
        msg.meta.origin = Some("intake".into());
        let back = decode(&encode(&msg)).unwrap();
        assert_eq!(back.id(), msg.id());
        assert_eq!(back.headers, msg.headers);
        assert_eq!(back.body.json().unwrap(), &json!({"order": 7}));
        assert_eq!(back.meta.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(back.meta.traceparent.as_deref(), Some("00-abc-def-01"));
        assert_eq!(back.meta.origin.as_deref(), Some("intake"));
        // Millisecond precision is what is kept.
        let diff = msg
            .meta
            .created_at
            .duration_since(back.meta.created_at)
            .unwrap();
        assert!(diff < Duration::from_millis(1), "{diff:?}");
        assert_eq!(
            back.pattern,
            ExchangePattern::InOnly,
            "a durable channel is one way"
        );
        assert_eq!(back.ack_count(), 0);
    }

    #[test]
    fn binary_and_empty_bodies_are_kept_byte_for_byte() {
        for body in [Bytes::new(), Bytes::from_static(&[0, 159, 255, 1])] {
            let back = decode(&encode(&Message::bytes(body.clone()))).unwrap();
            assert_eq!(back.body.as_bytes(), &body);
        }
    }

    #[test]
    fn damaged_envelopes_are_typed_errors() {
        let good = encode(&Message::json(json!(1)));
        assert_eq!(decode(&Bytes::new()).unwrap_err(), EnvelopeError::Empty);
        let mut newer = good.to_vec();
        newer[0] = 9;
        assert_eq!(
            decode(&Bytes::from(newer)).unwrap_err(),
            EnvelopeError::UnsupportedVersion(9)
        );
        assert!(matches!(
            decode(&good.slice(..3)).unwrap_err(),
            EnvelopeError::Truncated { needed: 5, .. }
        ));
        assert!(matches!(
            decode(&good.slice(..8)).unwrap_err(),
            EnvelopeError::Truncated { .. }
        ));
        let mut garbled = good.to_vec();
        garbled[5] = b'x';
        assert!(matches!(
            decode(&Bytes::from(garbled)).unwrap_err(),
            EnvelopeError::Meta(_)
        ));
    }
}
