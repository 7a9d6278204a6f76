use super::*;
use crate::processors::testkit::{build_one, process, try_build};
use serde_json::json;
use sluice_core::{AckToken, ErrorKind, Outcome};

fn envelope() -> Value {
    json!({
        "specversion": "1.0",
        "id": "evt-1",
        "source": "/shop",
        "type": "com.example.order.paid",
        "subject": "order-7",
        "time": "2026-01-02T03:04:05Z",
        "priority": 3,
        "datacontenttype": "application/json",
        "data": {"order": 7}
    })
}

async fn run(config: Value, msg: Message) -> Result<Message, Failure> {
    let step = build_one("cloudevents", config);
    process(&step, msg).await.map(|mut out| out.remove(0))
}

#[tokio::test]
async fn structured_in_makes_data_the_body_and_attributes_headers() {
    let (token, rx) = AckToken::channel();
    let msg = Message::json(envelope())
        .with_header("content-type", STRUCTURED_CONTENT_TYPE)
        .with_header("x-other", "kept")
        .with_ack(token);
    let id = msg.id();
    let out = run(json!({"direction": "in"}), msg).await.unwrap();
    assert_eq!(out.id(), id);
    assert_eq!(out.body.json().unwrap(), &json!({"order": 7}));
    assert_eq!(out.headers["ce-id"], "evt-1");
    assert_eq!(out.headers["ce-source"], "/shop");
    assert_eq!(out.headers["ce-type"], "com.example.order.paid");
    assert_eq!(out.headers["ce-specversion"], "1.0");
    assert_eq!(out.headers["ce-subject"], "order-7");
    assert_eq!(out.headers["ce-priority"], "3");
    assert_eq!(out.headers["content-type"], "application/json");
    assert_eq!(out.headers["x-other"], "kept");
    assert!(!out.headers.contains_key("ce-data"));
    out.ack();
    assert_eq!(rx.await.unwrap(), Outcome::Ack);
}

#[tokio::test]
async fn structured_in_reads_text_and_base64_data() {
    let mut event = envelope();
    event["datacontenttype"] = json!("text/plain");
    event["data"] = json!("hello");
    let out = run(json!({"direction": "in"}), Message::json(event.clone()))
        .await
        .unwrap();
    assert_eq!(out.body.to_text(), "hello");
    assert_eq!(out.headers["content-type"], "text/plain");
    let mut event = envelope();
    event.as_object_mut().unwrap().remove("data");
    event["data_base64"] = json!("AAH/");
    event["datacontenttype"] = json!("application/octet-stream");
    let out = run(json!({"direction": "in"}), Message::json(event.clone()))
        .await
        .unwrap();
    assert_eq!(out.body.as_bytes().as_ref(), &[0u8, 1, 255]);
    event["data_base64"] = json!("*");
    let f = run(json!({"direction": "in"}), Message::json(event))
        .await
        .unwrap_err();
    assert!(
        f.error.detail.contains("not valid base64"),
        "{}",
        f.error.detail
    );
}

#[tokio::test]
async fn required_attributes_are_checked_with_clear_errors() {
    for (attribute, value, expected) in [
        ("id", Value::Null, "CloudEvent attribute `id` is missing"),
        (
            "source",
            json!(""),
            "CloudEvent attribute `source` is missing",
        ),
        (
            "type",
            Value::Null,
            "CloudEvent attribute `type` is missing",
        ),
        (
            "specversion",
            json!("0.3"),
            "`specversion` is `0.3`, but only `1.0`",
        ),
    ] {
        let mut event = envelope();
        event[attribute] = value;
        let f = run(json!({"direction": "in"}), Message::json(event.clone()))
            .await
            .unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::InvalidInput);
        assert!(f.error.detail.contains(expected), "{}", f.error.detail);
        assert_eq!(
            f.message.body.json().unwrap(),
            &event,
            "message handed back"
        );
    }
    let f = run(json!({"direction": "in"}), Message::bytes(&b"[1]"[..]))
        .await
        .unwrap_err();
    assert!(f.error.detail.contains("JSON object"));
}

#[tokio::test]
async fn binary_in_checks_the_headers_only() {
    let msg = Message::bytes(&b"raw"[..])
        .with_header("ce-id", "1")
        .with_header("ce-source", "/s")
        .with_header("ce-specversion", "1.0")
        .with_header("ce-type", "t");
    let out = run(json!({"direction": "in", "mode": "binary"}), msg)
        .await
        .unwrap();
    assert_eq!(out.body.to_text(), "raw");
    let msg = Message::bytes(&b"raw"[..]).with_header("ce-id", "1");
    let f = run(json!({"direction": "in", "mode": "binary"}), msg)
        .await
        .unwrap_err();
    assert!(
        f.error.detail.contains("`source` is missing"),
        "{}",
        f.error.detail
    );
}

#[tokio::test]
async fn binary_out_sets_headers_from_options_and_defaults() {
    let config = json!({
        "direction": "out", "mode": "binary",
        "source": "/sluice", "type": {"jq": "\"order.\" + .status"}, "subject": {"jq": ".id"}
    });
    let msg = Message::json(json!({"id": 7, "status": "paid"}));
    let id = msg.id();
    let out = run(config.clone(), msg).await.unwrap();
    assert_eq!(out.headers["ce-id"], id.to_string());
    assert_eq!(out.headers["ce-source"], "/sluice");
    assert_eq!(out.headers["ce-type"], "order.paid");
    assert_eq!(out.headers["ce-subject"], "7");
    assert_eq!(out.headers["ce-specversion"], "1.0");
    assert_eq!(
        out.body.json().unwrap(),
        &json!({"id": 7, "status": "paid"})
    );
    let f = run(config, Message::json(json!({"id": 1, "status": 5})))
        .await
        .unwrap_err();
    assert_eq!(f.error.kind, ErrorKind::Expression);
    let f = run(
        json!({"direction": "out", "type": "t"}),
        Message::json(json!(1)),
    )
    .await
    .unwrap_err();
    assert!(
        f.error.detail.contains("`source` is missing"),
        "{}",
        f.error.detail
    );
}

#[tokio::test]
async fn structured_out_wraps_json_text_and_bytes() {
    let config = json!({"direction": "out", "source": "/s", "type": "t"});
    let out = run(config.clone(), Message::json(json!({"a": 1})))
        .await
        .unwrap();
    assert_eq!(out.headers["content-type"], STRUCTURED_CONTENT_TYPE);
    let body = out.body.json().unwrap();
    assert_eq!(body["data"], json!({"a": 1}));
    assert_eq!(body["datacontenttype"], "application/json");
    assert_eq!(body["id"], out.id().to_string());
    let text = Message::bytes(&b"hi"[..]).with_header("content-type", "text/plain");
    let out = run(config.clone(), text).await.unwrap();
    assert_eq!(out.body.json().unwrap()["data"], "hi");
    assert_eq!(out.body.json().unwrap()["datacontenttype"], "text/plain");
    let binary =
        Message::bytes(vec![0u8, 1, 255]).with_header("content-type", "application/octet-stream");
    let out = run(config, binary).await.unwrap();
    assert_eq!(out.body.json().unwrap()["data_base64"], "AAH/");
    assert!(out.body.json().unwrap().get("data").is_none());
}

#[tokio::test]
async fn events_round_trip_through_both_modes() {
    for mode in ["structured", "binary"] {
        // structured in -> out in `mode` -> in from `mode` -> structured out: the same event.
        let inside = run(json!({"direction": "in"}), Message::json(envelope()))
            .await
            .unwrap();
        let wire = run(json!({"direction": "out", "mode": mode}), inside)
            .await
            .unwrap();
        let back = run(json!({"direction": "in", "mode": mode}), wire)
            .await
            .unwrap();
        assert_eq!(back.body.json().unwrap(), &json!({"order": 7}), "{mode}");
        assert_eq!(back.headers["ce-id"], "evt-1", "{mode}");
        let out = run(json!({"direction": "out"}), back).await.unwrap();
        assert_eq!(
            out.body.json().unwrap(),
            &envelope_with_string_extension(),
            "{mode}"
        );
    }
}

/// Extensions travel as headers, so a number comes back as its text.
fn envelope_with_string_extension() -> Value {
    let mut event = envelope();
    event["priority"] = json!("3");
    event
}

#[test]
fn out_options_are_refused_for_in() {
    let e = try_build("cloudevents", &json!({"direction": "in", "source": "/s"}))
        .err()
        .unwrap();
    assert_eq!(e.field.as_deref(), Some("source"));
    let e = try_build(
        "cloudevents",
        &json!({"direction": "out", "type": {"jq": ".a |"}}),
    )
    .err()
    .unwrap();
    assert_eq!(e.field.as_deref(), Some("type.jq"));
}
