//! How the remote cache stores (NATS KV, Redis) keep a [`CachedValue`] as bytes.

use bytes::Bytes;
use sluice_core::state::CachedValue;
use sluice_core::{Body, Headers};

/// A cached value: headers as JSON, a newline, then the body bytes.
pub fn encode_cached(value: &CachedValue) -> Vec<u8> {
    let mut out = serde_json::to_vec(&value.headers).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    out.extend_from_slice(value.body.as_bytes());
    out
}

/// The inverse of [`encode_cached`]; a value that cannot be read is a cache miss.
pub fn decode_cached(bytes: &[u8]) -> Option<CachedValue> {
    let split = bytes.iter().position(|b| *b == b'\n')?;
    let headers: Headers = serde_json::from_slice(&bytes[..split]).ok()?;
    Some(CachedValue {
        headers,
        body: Body::from_bytes(Bytes::copy_from_slice(&bytes[split + 1..])),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_values_round_trip() {
        let mut headers = Headers::new();
        headers.insert("content-type".into(), "application/json".into());
        let value = CachedValue {
            headers,
            body: Body::from_bytes(&b"{\"a\":\n1}"[..]),
        };
        assert_eq!(decode_cached(&encode_cached(&value)), Some(value));
        assert_eq!(decode_cached(b"no newline"), None);
    }
}
