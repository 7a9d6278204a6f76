//! `dead_letter_store`: the sink that keeps a flow's dead letters in the process's durable store,
//! and the pieces the admin API and the CLI share to show and replay them.
//!
//! A flow writes here with `dead_letter: {dead_letter_store: {}}`. The flow hands the sink the
//! original message plus the `sluice.error.*`/`sluice.retry.*` headers (`flow.rs`); the sink
//! turns those headers into the store's fields and returns only after the commit is on disk, so
//! the source is acknowledged only once the letter cannot be lost. A store error fails the
//! delivery and the flow nacks the message instead.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::base64::encode as encode_base64;
use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Value, json};
use sluice_core::spec::{ComponentKind, ComponentSpec};
use sluice_core::{BuildContext, BuildError, ErrorKind, Message, ProcessError, Sink};
use sluice_store::{DeadLetter, DeadLetters, NewDeadLetter, StoreError};

use crate::durable::DurableStore;
use crate::flow::DEAD_LETTERED;
use crate::resilience::headers;

/// The component's name.
pub const NAME: &str = "dead_letter_store";

/// Set on a replayed message: the id of the dead letter it came from.
pub const REPLAYED_FROM: &str = "sluice.replayed_from";

/// The sink's spec.
pub fn spec() -> ComponentSpec {
    ComponentSpec::new(
        NAME,
        ComponentKind::Sink,
        "Keep failed messages in the durable dead-letter store, to browse and replay later",
    )
    .description(
        "Meant for a flow's `dead_letter:`. Stores the original message (body bytes and headers, \
the content type among them) with what failed: the error kind and text, the step, the flow's \
name and version, the attempts (`sluice.retry.attempts`) and the first and last failure times \
(`sluice.retry.first_failure`/`last_failure`, else now).\n\nThe flow version is a content hash \
of the flow's definition as loaded (16 hex digits), so a letter tells whether the flow changed \
since it failed.\n\n**Delivery guarantee.** at-least-once: the write is committed to disk \
(fsync, group commit) before the sink returns, and the flow acknowledges the source only after \
that. If the store cannot write (disk full, I/O error) the delivery fails (`unavailable` for a \
full disk, else `io`) and the flow nacks the message, so the source keeps or redelivers it.\n\n\
The store lives in the data directory (`sluice run --data DIR`, default `./data`), opened and \
locked on first use; `sluice validate` and `sluice test` use a store in memory. Browse, delete \
and replay letters with `sluice dlq` or the admin API (`/dlq`).",
    )
    .example("Keep dead letters", "{}\n")
}

/// Builds the sink; opens the process's store (a locked data directory fails the build).
pub fn build(_config: &Value, ctx: &BuildContext<'_>) -> Result<Arc<dyn Sink>, BuildError> {
    let store = ctx.resources.get_or_default::<DurableStore>().store()?;
    let flow_version = ctx
        .resources
        .get_or_default::<FlowVersions>()
        .get(ctx.flow)
        .unwrap_or_default();
    Ok(Arc::new(DeadLetterSink {
        letters: store.dead_letters(),
        flow: ctx.flow.to_owned(),
        flow_version,
    }))
}

/// The content hash of every flow's definition, by flow name; filled by the builder.
#[derive(Default)]
pub struct FlowVersions(Mutex<HashMap<String, String>>);

impl FlowVersions {
    /// Records the version of flow `name`.
    pub fn set(&self, name: &str, version: String) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(name.to_owned(), version);
        }
    }

    /// The version of flow `name`, if it was built.
    pub fn get(&self, name: &str) -> Option<String> {
        self.0.lock().ok().and_then(|map| map.get(name).cloned())
    }
}

/// A stable 64-bit FNV-1a hash of `parts`, as 16 hex digits: a flow version that is the same on
/// every machine and every build (std's hasher is not stable across releases).
pub fn content_hash<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.iter().chain(&[0xff]) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

struct DeadLetterSink {
    letters: DeadLetters,
    flow: String,
    flow_version: String,
}

#[async_trait]
impl Sink for DeadLetterSink {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        let letter = self.letter(msg);
        let id = self
            .letters
            .put(letter)
            .await
            .map_err(|e| store_error(&e))?;
        tracing::info!(flow = %self.flow, message_id = %msg.id(), dead_letter_id = id, "dead letter stored");
        Ok(())
    }
}

impl DeadLetterSink {
    fn letter(&self, msg: &Message) -> NewDeadLetter {
        let h = &msg.headers;
        let text = |name: &str| h.get(name).cloned().unwrap_or_default();
        let now = now_ms();
        let time = |name: &str| h.get(name).and_then(|t| parse_rfc3339_ms(t)).unwrap_or(now);
        let kind = text(headers::ERROR_KIND);
        let message = text(headers::ERROR_MESSAGE);
        let error = match (kind.is_empty(), message.is_empty()) {
            (true, _) => message,
            (false, true) => kind,
            (false, false) => format!("{kind}: {message}"),
        };
        let flow = h
            .get(headers::ERROR_FLOW)
            .filter(|f| !f.is_empty())
            .cloned()
            .unwrap_or_else(|| self.flow.clone());
        NewDeadLetter {
            flow,
            flow_version: self.flow_version.clone(),
            step: text(headers::ERROR_STEP),
            error,
            attempts: h
                .get(headers::ATTEMPTS)
                .and_then(|a| a.parse().ok())
                .unwrap_or(1),
            first_failure_ms: time(headers::FIRST_FAILURE),
            last_failure_ms: time(headers::LAST_FAILURE),
            // A map of strings always serializes.
            headers: Bytes::from(serde_json::to_vec(h).unwrap_or_default()),
            body: msg.body.as_bytes().clone(),
        }
    }
}

fn store_error(error: &StoreError) -> ProcessError {
    let kind = if error.is_disk_full() {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Io
    };
    ProcessError::new(kind, format!("writing the dead letter failed: {error}"))
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn parse_rfc3339_ms(text: &str) -> Option<u64> {
    let time = chrono::DateTime::parse_from_rfc3339(text).ok()?;
    u64::try_from(time.timestamp_millis()).ok()
}

fn rfc3339(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// Parses a `since` bound: an RFC 3339 time (`2026-12-01T10:00:00Z`) or a duration ago (`1h`,
/// `30m`); returns ms since the Unix epoch.
pub fn parse_since(text: &str, now_ms: u64) -> Result<u64, String> {
    if let Some(ms) = parse_rfc3339_ms(text) {
        return Ok(ms);
    }
    match sluice_core::duration::parse(text) {
        Ok(ago) => Ok(now_ms.saturating_sub(u64::try_from(ago.as_millis()).unwrap_or(u64::MAX))),
        Err(_) => Err(format!(
            "`since` must be an RFC 3339 time (2026-12-01T10:00:00Z) or a duration ago (30m, 2h), not `{text}`"
        )),
    }
}

/// The headers a letter was stored with (empty for a quarantined record, which has none).
pub fn stored_headers(letter: &DeadLetter) -> BTreeMap<String, String> {
    serde_json::from_slice(&letter.letter.headers).unwrap_or_default()
}

/// A letter as JSON for people and scripts. With `with_body`, the body as `body` (text) when it
/// is UTF-8, else as `body_base64`, and every header.
pub fn letter_json(letter: &DeadLetter, with_body: bool) -> Value {
    let stored = stored_headers(letter);
    let l = &letter.letter;
    let mut value = json!({
        "id": letter.id,
        "flow": l.flow,
        "flow_version": l.flow_version,
        "step": l.step,
        "error_kind": stored.get(headers::ERROR_KIND).cloned().unwrap_or_default(),
        "error": l.error,
        "attempts": l.attempts,
        "first_failure": rfc3339(l.first_failure_ms),
        "last_failure": rfc3339(l.last_failure_ms),
        "content_type": stored.get("content-type").cloned(),
        "body_bytes": l.body.len(),
        "replays": letter.replays.iter().map(|r| json!({
            "replay_id": r.replay_id,
            "at": rfc3339(r.at_ms),
        })).collect::<Vec<_>>(),
    });
    if with_body && let Value::Object(map) = &mut value {
        match std::str::from_utf8(&l.body) {
            Ok(text) => map.insert("body".into(), Value::String(text.to_owned())),
            Err(_) => map.insert("body_base64".into(), Value::String(encode_base64(&l.body))),
        };
        map.insert("headers".into(), json!(stored));
    }
    value
}

/// The message to replay from `letter`: its original body and headers, without the failure
/// headers, marked with [`REPLAYED_FROM`].
pub fn replay_message(letter: &DeadLetter) -> Message {
    let mut msg = Message::bytes(letter.letter.body.clone());
    msg.headers = stored_headers(letter)
        .into_iter()
        .filter(|(name, _)| {
            !(name.starts_with("sluice.error.")
                || name.starts_with("sluice.retry.")
                || name == DEAD_LETTERED
                || name == REPLAYED_FROM)
        })
        .collect();
    msg.headers
        .insert(REPLAYED_FROM.to_owned(), letter.id.to_string());
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_store::{Store, StoreOptions};

    fn sink(store: &Store) -> DeadLetterSink {
        DeadLetterSink {
            letters: store.dead_letters(),
            flow: "orders".into(),
            flow_version: "abc".into(),
        }
    }

    #[tokio::test]
    async fn stores_the_original_message_with_the_failure_fields() {
        let store = Store::open_in_memory(StoreOptions::default()).unwrap();
        let msg = Message::bytes(&b"{\"fail\": true}"[..])
            .with_header("content-type", "application/json")
            .with_header(headers::ERROR_KIND, "expression")
            .with_header(headers::ERROR_MESSAGE, "step `check`: boom")
            .with_header(headers::ERROR_STEP, "check")
            .with_header(headers::ERROR_FLOW, "orders")
            .with_header(headers::ATTEMPTS, "3")
            .with_header(headers::FIRST_FAILURE, "2026-12-01T10:00:00.000Z")
            .with_header(headers::LAST_FAILURE, "2026-12-01T10:00:02.500Z");
        sink(&store).deliver(&msg).await.unwrap();
        let page = store.dead_letters().list(&Default::default()).unwrap();
        let stored = &page.letters[0];
        assert_eq!(&stored.letter.body[..], b"{\"fail\": true}");
        assert_eq!(stored.letter.error, "expression: step `check`: boom");
        assert_eq!(stored.letter.step, "check");
        assert_eq!(stored.letter.flow_version, "abc");
        assert_eq!(stored.letter.attempts, 3);
        assert_eq!(
            stored.letter.last_failure_ms - stored.letter.first_failure_ms,
            2500
        );
        let shown = letter_json(stored, true);
        assert_eq!(shown["content_type"], "application/json");
        assert_eq!(shown["error_kind"], "expression");
        assert_eq!(shown["first_failure"], "2026-12-01T10:00:00.000Z");
        assert_eq!(shown["body"], "{\"fail\": true}");

        let replay = replay_message(stored);
        assert_eq!(replay.headers.get(REPLAYED_FROM).unwrap(), "1");
        assert_eq!(
            replay.headers.get("content-type").unwrap(),
            "application/json"
        );
        assert!(
            !replay
                .headers
                .keys()
                .any(|k| k.starts_with("sluice.error.") || k.starts_with("sluice.retry."))
        );
    }

    #[tokio::test]
    async fn without_failure_headers_uses_now_and_one_attempt() {
        let store = Store::open_in_memory(StoreOptions::default()).unwrap();
        let before = now_ms();
        sink(&store)
            .deliver(&Message::bytes(&[0xff, 0x00, 0x01][..]))
            .await
            .unwrap();
        let stored = store.dead_letters().get(1).unwrap().unwrap();
        assert_eq!(stored.letter.attempts, 1);
        assert_eq!(
            stored.letter.flow, "orders",
            "the sink's flow when no header names one"
        );
        assert!(stored.letter.first_failure_ms >= before);
        let shown = letter_json(&stored, true);
        assert_eq!(shown["body_base64"], "/wAB");
        assert!(shown.get("body").is_none());
    }

    /// A disk in memory that starts refusing writes when told to (a full disk).
    #[derive(Debug)]
    struct FillingDisk {
        inner: redb::backends::InMemoryBackend,
        full: Arc<std::sync::atomic::AtomicBool>,
    }

    impl FillingDisk {
        fn check(&self) -> std::io::Result<()> {
            if self.full.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "disk full",
                ));
            }
            Ok(())
        }
    }

    impl redb::StorageBackend for FillingDisk {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.check()?;
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.inner.write(offset, data)
        }
    }

    struct Fails;

    #[async_trait]
    impl sluice_core::Processor for Fails {
        async fn process(
            &self,
            msg: Message,
        ) -> Result<sluice_core::Outputs, sluice_core::Failure> {
            Err(sluice_core::Failure::new(
                msg,
                ProcessError::invalid_input("bad order"),
            ))
        }
    }

    #[tokio::test]
    async fn a_store_that_cannot_write_fails_the_delivery_and_the_flow_nacks() {
        use sluice_core::Dispatch;
        let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let disk = FillingDisk {
            inner: redb::backends::InMemoryBackend::new(),
            full: Arc::clone(&full),
        };
        let store = Store::open_with_backend(disk, StoreOptions::default()).unwrap();
        let flow = crate::flow::Flow::with_options(
            "orders".into(),
            crate::flow::Pipeline::new(vec![crate::flow::Step {
                id: "check".into(),
                processor: Arc::new(Fails),
            }]),
            Vec::new(),
            crate::flow::FlowOptions {
                dead_letter: Some(crate::flow::Target {
                    id: "stored".into(),
                    sink: Arc::new(sink(&store)),
                }),
                ..Default::default()
            },
        );

        let (token, outcome) = sluice_core::AckToken::channel();
        let failure = flow
            .dispatch(Message::bytes(&b"{}"[..]).with_ack(token))
            .await
            .unwrap_err();
        assert!(failure.message.headers.contains_key(DEAD_LETTERED));
        assert!(
            outcome.await.unwrap().is_ack(),
            "stored: the source may forget it"
        );

        full.store(true, std::sync::atomic::Ordering::SeqCst);
        let (token, outcome) = sluice_core::AckToken::channel();
        let failure = flow
            .dispatch(Message::bytes(&b"{}"[..]).with_ack(token))
            .await
            .unwrap_err();
        assert!(!failure.message.headers.contains_key(DEAD_LETTERED));
        assert_eq!(
            failure.error.kind,
            ErrorKind::InvalidInput,
            "the first error is reported"
        );
        assert!(
            !outcome.await.unwrap().is_ack(),
            "not stored: the source must keep it"
        );

        let error = sink(&store)
            .deliver(&Message::bytes(&b"{}"[..]))
            .await
            .unwrap_err();
        assert!(
            error.detail.contains("writing the dead letter failed"),
            "{error}"
        );
        assert!(
            matches!(error.kind, ErrorKind::Unavailable | ErrorKind::Io),
            "{error:?}"
        );
    }

    #[test]
    fn since_takes_a_time_or_a_duration_ago() {
        assert_eq!(parse_since("2s", 10_000), Ok(8_000));
        assert_eq!(parse_since("1970-01-01T00:00:01Z", 0), Ok(1_000));
        assert!(
            parse_since("yesterday", 0)
                .unwrap_err()
                .contains("RFC 3339")
        );
    }

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(encode_base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn content_hash_is_stable_and_separates_parts() {
        assert_eq!(content_hash([&b"a"[..]]), content_hash([&b"a"[..]]));
        assert_ne!(
            content_hash([&b"ab"[..], b"c"]),
            content_hash([&b"a"[..], b"bc"])
        );
    }
}
