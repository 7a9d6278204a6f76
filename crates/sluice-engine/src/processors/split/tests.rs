use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::*;
use crate::processors::testkit::{build_one, build_with_downstream, process, try_build};
use serde_json::json;
use sluice_core::{AckToken, ErrorKind, Outcome};

fn bodies(out: &[Message]) -> Vec<Value> {
    out.iter().map(|m| m.body.json().unwrap().clone()).collect()
}

#[tokio::test]
async fn array_items_become_labelled_parts_sharing_the_source_ack() {
    let step = build_one("split", json!({}));
    let (token, mut rx) = AckToken::channel();
    let source = Message::json(json!([{"a": 1}, {"a": 2}, {"a": 3}]))
        .with_header("h", "v")
        .with_ack(token);
    let id = source.id().to_string();
    let out = process(&step, source).await.unwrap();
    assert_eq!(
        bodies(&out),
        [json!({"a": 1}), json!({"a": 2}), json!({"a": 3})]
    );
    for (i, part) in out.iter().enumerate() {
        assert_eq!(part.headers[INDEX_HEADER], i.to_string());
        assert_eq!(part.headers[SIZE_HEADER], "3");
        assert_eq!(part.headers[CORRELATION_HEADER], id);
        assert_eq!(part.headers["h"], "v");
        assert_eq!(part.headers.contains_key(LAST_HEADER), i == 2);
        assert_eq!(part.ack_count(), 1);
    }
    let mut out = out.into_iter();
    out.next().unwrap().ack();
    out.next().unwrap().ack();
    assert!(
        rx.try_recv().is_err(),
        "acked before the last part was done"
    );
    out.next().unwrap().ack();
    assert_eq!(rx.await.unwrap(), Outcome::Ack);
}

#[tokio::test]
async fn one_failed_part_nacks_the_source() {
    let step = build_one("split", json!({}));
    let (token, rx) = AckToken::channel();
    let out = process(&step, Message::json(json!([1, 2])).with_ack(token))
        .await
        .unwrap();
    let mut out = out.into_iter();
    out.next().unwrap().ack();
    out.next().unwrap().nack("sink down");
    assert_eq!(rx.await.unwrap(), Outcome::Nack("sink down".into()));
}

#[tokio::test]
async fn an_empty_split_acks_the_source_and_emits_nothing() {
    for (config, body) in [
        (json!({}), Message::json(json!([]))),
        (json!({"by": "lines"}), Message::bytes(&b"\n \n"[..])),
        (json!({"by": "csv"}), Message::bytes(&b"a,b\n"[..])),
        (
            json!({"by": "xml", "element": "x"}),
            Message::bytes(&b"<root/>"[..]),
        ),
    ] {
        let (step, downstream) = build_with_downstream("split", config);
        let (token, rx) = AckToken::channel();
        let out = process(&step, body.with_ack(token)).await.unwrap();
        assert!(out.is_empty());
        assert!(downstream.take().is_empty());
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
    }
}

#[tokio::test]
async fn objects_split_into_values_and_paths_select_items() {
    let step = build_one("split", json!({}));
    let out = process(&step, Message::json(json!({"x": 1, "y": 2})))
        .await
        .unwrap();
    assert_eq!(bodies(&out), [json!(1), json!(2)]);
    let step = build_one("split", json!({"path": ".orders[] | select(.open)"}));
    let body = json!({"orders": [{"id": 1, "open": true}, {"id": 2}, {"id": 3, "open": true}]});
    let out = process(&step, Message::json(body)).await.unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[1].body.json().unwrap()["id"], 3);
    assert_eq!(out[1].headers[SIZE_HEADER], "2");
    assert_eq!(out[0].headers["content-type"], "application/json");
}

#[tokio::test]
async fn bad_json_input_is_invalid_input_naming_the_path() {
    let step = build_one("split", json!({}));
    let f = process(&step, Message::json(json!(5))).await.unwrap_err();
    assert_eq!(f.error.kind, ErrorKind::InvalidInput);
    assert!(f.error.detail.contains("`.[]`"), "{}", f.error.detail);
    assert_eq!(
        f.message.body.json().unwrap(),
        &json!(5),
        "message handed back"
    );
    let f = process(&step, Message::bytes(&b"[1,"[..]))
        .await
        .unwrap_err();
    assert!(f.error.detail.contains("needs a JSON body"), "{}", f.error);
    let step = build_one("split", json!({"path": ".items[]"}));
    let f = process(&step, Message::json(json!({"items": 3})))
        .await
        .unwrap_err();
    assert_eq!(f.error.kind, ErrorKind::InvalidInput);
    assert!(
        f.error.detail.contains("`path` (`.items[]`)"),
        "{}",
        f.error
    );
}

#[tokio::test]
async fn text_formats_split_with_their_content_types() {
    let step = build_one("split", json!({"by": "lines"}));
    let out = process(&step, Message::bytes(&b"one\r\ntwo\n"[..]))
        .await
        .unwrap();
    let texts: Vec<String> = out.iter().map(|m| m.body.to_text()).collect();
    assert_eq!(texts, ["one", "two"]);
    assert_eq!(out[0].headers["content-type"], "text/plain");

    let step = build_one("split", json!({"by": "csv", "delimiter": "\\t"}));
    let out = process(&step, Message::bytes(&b"id\tname\n7\tada\n"[..]))
        .await
        .unwrap();
    assert_eq!(bodies(&out), [json!({"id": "7", "name": "ada"})]);

    let step = build_one("split", json!({"by": "xml", "element": "order"}));
    let out = process(
        &step,
        Message::bytes(&b"<orders><order id=\"1\"/><order id=\"2\">x</order></orders>"[..]),
    )
    .await
    .unwrap();
    let texts: Vec<String> = out.iter().map(|m| m.body.to_text()).collect();
    assert_eq!(texts, ["<order id=\"1\"/>", "<order id=\"2\">x</order>"]);
    assert_eq!(out[1].headers["content-type"], "application/xml");
    assert_eq!(out[1].headers[LAST_HEADER], "true");
}

#[tokio::test]
async fn malformed_text_fails_before_any_part_is_emitted() {
    let (step, downstream) =
        build_with_downstream("split", json!({"by": "csv", "stream_above": 0}));
    let (token, rx) = AckToken::channel();
    let f = process(
        &step,
        Message::bytes(&b"a,b\n1,2\n3,4\n5\n"[..]).with_ack(token),
    )
    .await
    .unwrap_err();
    assert_eq!(f.error.kind, ErrorKind::InvalidInput);
    assert!(f.error.detail.contains("record 3 (line 4)"), "{}", f.error);
    assert!(downstream.take().is_empty(), "a part escaped");
    f.message.nack("failed");
    assert!(matches!(rx.await.unwrap(), Outcome::Nack(_)));
}

#[tokio::test]
async fn more_than_max_parts_is_invalid_input() {
    let step = build_one("split", json!({"max_parts": 2}));
    let f = process(&step, Message::json(json!([1, 2, 3])))
        .await
        .unwrap_err();
    assert_eq!(f.error.kind, ErrorKind::InvalidInput);
    assert!(f.error.detail.contains("max_parts"), "{}", f.error);
    let step = build_one("split", json!({"by": "lines", "max_parts": 2}));
    assert!(
        process(&step, Message::bytes(&b"a\nb\nc"[..]))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn large_splits_stream_through_downstream_and_ack_when_all_parts_commit() {
    let (step, downstream) =
        build_with_downstream("split", json!({"by": "lines", "stream_above": 2}));
    let (token, mut rx) = AckToken::channel();
    let out = process(&step, Message::bytes(&b"a\nb\nc\n"[..]).with_ack(token))
        .await
        .unwrap();
    assert!(out.is_empty(), "streamed parts are not outputs");
    let parts = downstream.take();
    let texts: Vec<String> = parts.iter().map(|m| m.body.to_text()).collect();
    assert_eq!(texts, ["a", "b", "c"]);
    assert_eq!(parts[2].headers[LAST_HEADER], "true");
    assert_eq!(parts[2].headers[SIZE_HEADER], "3");
    let mut parts = parts.into_iter();
    parts.next().unwrap().ack();
    parts.next().unwrap().ack();
    assert!(
        rx.try_recv().is_err(),
        "acked before the last streamed part"
    );
    parts.next().unwrap().ack();
    assert_eq!(rx.await.unwrap(), Outcome::Ack);
}

/// A downstream that takes `ms` per part, fails the part whose body is `fail_on`, and records how
/// many parts it held at once and which it saw.
#[derive(Default)]
struct SlowDownstream {
    fail_on: Option<Value>,
    running: AtomicUsize,
    most: AtomicUsize,
    seen: Mutex<Vec<Value>>,
}

#[async_trait]
impl Dispatch for SlowDownstream {
    async fn dispatch(&self, msg: Message) -> Result<Vec<Message>, Failure> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(10)).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        let body = msg.body.json().unwrap().clone();
        self.seen.lock().unwrap().push(body.clone());
        if Some(&body) == self.fail_on.as_ref() {
            // As the flow's error handling does: nack the part, hand it back.
            let failure = Failure::new(
                msg.detached(),
                ProcessError::new(ErrorKind::Io, "disk gone"),
            );
            msg.nack("disk gone");
            return Err(failure);
        }
        msg.ack();
        Ok(Vec::new())
    }
}

fn streaming(parallel: usize, downstream: Arc<SlowDownstream>) -> Split {
    Split {
        how: How::Items,
        stream_above: 0,
        parallel,
        max_parts: 100,
        downstream,
    }
}

#[tokio::test(start_paused = true)]
async fn parallel_bounds_the_parts_in_flight() {
    for parallel in [1, 3] {
        let downstream = Arc::new(SlowDownstream::default());
        let step = streaming(parallel, Arc::clone(&downstream));
        let (token, rx) = AckToken::channel();
        let source = Message::json(json!((0..10).collect::<Vec<_>>())).with_ack(token);
        assert!(step.process(source).await.unwrap().is_empty());
        assert_eq!(rx.await.unwrap(), Outcome::Ack);
        assert_eq!(downstream.seen.lock().unwrap().len(), 10);
        assert_eq!(downstream.most.load(Ordering::SeqCst), parallel);
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_streamed_part_stops_the_split_and_fails_the_step() {
    let downstream = Arc::new(SlowDownstream {
        fail_on: Some(json!(2)),
        ..SlowDownstream::default()
    });
    let step = streaming(1, Arc::clone(&downstream));
    let (token, rx) = AckToken::channel();
    let failure = step
        .process(Message::json(json!([0, 1, 2, 3, 4])).with_ack(token))
        .await
        .unwrap_err();
    assert_eq!(failure.error.kind, ErrorKind::Io);
    assert!(
        failure.error.detail.contains("part 2 of 5 failed"),
        "{}",
        failure.error
    );
    assert_eq!(
        *downstream.seen.lock().unwrap(),
        [json!(0), json!(1), json!(2)]
    );
    failure.message.ack();
    assert_eq!(rx.await.unwrap(), Outcome::Nack("disk gone".into()));
}

#[test]
fn options_of_another_format_are_build_errors() {
    for (config, field) in [
        (json!({"by": "lines", "path": ".a[]"}), "path"),
        (json!({"delimiter": ";"}), "delimiter"),
        (json!({"by": "xml"}), "element"),
        (json!({"by": "csv", "delimiter": ";;"}), "delimiter"),
        (json!({"path": ".a |"}), "path"),
    ] {
        let e = try_build("split", &config).err().unwrap();
        assert_eq!(e.field.as_deref(), Some(field), "{config}: {e}");
    }
}
