use super::*;
use crate::processors::testkit::{Collected, TestSteps, build_one, process, try_build};
use sluice_core::{AckToken, ErrorKind, Outcome, Resources};

/// Builds a `claim_check` as the engine would for `flow`, with the process's `resources`.
fn step_in(resources: &Arc<Resources>, flow: &str, config: &Value) -> Arc<dyn Processor> {
    let steps = TestSteps::new();
    let ctx = BuildContext {
        flow,
        id: "claim_check",
        steps: &steps,
        resources,
        downstream: Arc::new(Collected::default()),
    };
    match build(config, &ctx) {
        Ok(step) => step,
        Err(e) => panic!("{e}"),
    }
}

async fn one_out(step: &Arc<dyn Processor>, msg: Message) -> Message {
    let mut out = process(step, msg).await.unwrap();
    assert_eq!(out.len(), 1);
    out.remove(0)
}

#[tokio::test]
async fn round_trip_across_flows_through_a_named_store() {
    let resources = Arc::new(Resources::default());
    let check_in = step_in(
        &resources,
        "intake",
        &json!({"mode": "check_in", "store": "docs"}),
    );
    let check_out = step_in(
        &resources,
        "archive",
        &json!({"mode": "check_out", "store": "docs"}),
    );
    let (token, rx) = AckToken::channel();
    let original = Message::bytes(&b"<order id=\"7\"/>"[..])
        .with_header("h", "kept")
        .with_ack(token);
    let claimed = one_out(&check_in, original).await;
    let claim = claimed.body.json().unwrap()["claim"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(claimed.body.json().unwrap(), &json!({"claim": claim}));
    let restored = one_out(&check_out, claimed).await;
    assert_eq!(restored.body.to_text(), "<order id=\"7\"/>");
    assert_eq!(restored.headers["h"], "kept");
    // The acknowledgement travelled with the message.
    restored.ack();
    assert_eq!(rx.await.unwrap(), Outcome::Ack);

    // Another store name is another store.
    let elsewhere = step_in(
        &resources,
        "other",
        &json!({"mode": "check_out", "store": "elsewhere"}),
    );
    let claimed = one_out(&check_in, Message::json(json!({"big": true}))).await;
    let f = process(&elsewhere, claimed).await.unwrap_err();
    assert_eq!(f.error.kind, ErrorKind::InvalidInput);
    assert!(f.error.detail.contains("store `elsewhere`"), "{}", f.error);
}

#[tokio::test]
async fn the_claim_can_travel_in_a_header() {
    let step = build_one(
        "choice",
        json!({"when": [{"condition": "$headers[\"sluice.claim\"] == null",
                         "steps": [{"claim_check": {"mode": "check_in", "claim": "header"}}]}],
               "otherwise": [{"claim_check": {"mode": "check_out", "claim": "header"}}]}),
    );
    let claimed = one_out(&step, Message::json(json!({"a": 1}))).await;
    assert!(claimed.body.is_empty());
    assert!(claimed.headers.contains_key(CLAIM_HEADER));
    let restored = one_out(&step, claimed).await;
    assert_eq!(restored.body.json().unwrap(), &json!({"a": 1}));
    assert!(!restored.headers.contains_key(CLAIM_HEADER));
}

#[tokio::test]
async fn remove_decides_whether_a_claim_can_be_checked_out_twice() {
    let resources = Arc::new(Resources::default());
    let check_in = step_in(&resources, "a", &json!({"mode": "check_in"}));
    let keep = step_in(
        &resources,
        "b",
        &json!({"mode": "check_out", "remove": false}),
    );
    let take = step_in(&resources, "c", &json!({"mode": "check_out"}));
    let claimed = one_out(&check_in, Message::json(json!(42))).await;
    for _ in 0..2 {
        let restored = one_out(&keep, claimed.clone()).await;
        assert_eq!(restored.body.json().unwrap(), &json!(42));
    }
    one_out(&take, claimed.clone()).await;
    let f = process(&take, claimed).await.unwrap_err();
    assert_eq!(f.error.kind, ErrorKind::InvalidInput);
}

#[tokio::test]
async fn missing_claims_are_invalid_input_naming_the_claim() {
    let step = build_one("claim_check", json!("check_out"));
    let f = process(&step, Message::json(json!({"claim": "nope-123"})))
        .await
        .unwrap_err();
    assert_eq!(f.error.kind, ErrorKind::InvalidInput);
    assert!(f.error.detail.contains("claim `nope-123`"), "{}", f.error);
    assert_eq!(
        f.message.body.json().unwrap(),
        &json!({"claim": "nope-123"})
    );
    for body in [json!({"id": 1}), json!({"claim": 5}), json!("claim")] {
        let f = process(&step, Message::json(body)).await.unwrap_err();
        assert_eq!(f.error.kind, ErrorKind::InvalidInput);
        assert!(f.error.detail.contains("no claim"), "{}", f.error);
    }
    let step = build_one(
        "claim_check",
        json!({"mode": "check_out", "claim": "header"}),
    );
    let f = process(&step, Message::json(json!(1))).await.unwrap_err();
    assert!(f.error.detail.contains("sluice.claim"), "{}", f.error);
}

#[tokio::test(start_paused = true)]
async fn claims_expire_after_their_ttl() {
    let resources = Arc::new(Resources::default());
    let check_in = step_in(&resources, "a", &json!({"mode": "check_in", "ttl": "5s"}));
    let check_out = step_in(
        &resources,
        "b",
        &json!({"mode": "check_out", "remove": false}),
    );
    let claimed = one_out(&check_in, Message::json(json!(1))).await;
    tokio::time::advance(Duration::from_millis(4_999)).await;
    one_out(&check_out, claimed.clone()).await;
    tokio::time::advance(Duration::from_millis(1)).await;
    let f = process(&check_out, claimed).await.unwrap_err();
    assert!(f.error.detail.contains("expired"), "{}", f.error);
}

#[tokio::test]
async fn a_full_store_hands_the_message_back() {
    let step = build_one("claim_check", json!({"mode": "check_in", "max_bytes": 10}));
    let big = Message::bytes(vec![b'x'; 11]);
    let f = process(&step, big).await.unwrap_err();
    assert_eq!(f.error.kind, ErrorKind::Rejected);
    assert_eq!(f.message.body.len(), 11);
    one_out(&step, Message::bytes(vec![b'x'; 6])).await;
    let f = process(&step, Message::bytes(vec![b'x'; 6]))
        .await
        .unwrap_err();
    assert_eq!(f.error.kind, ErrorKind::Unavailable);
    assert!(f.error.detail.contains("max_bytes"), "{}", f.error);
}

#[test]
fn a_store_keeps_the_size_it_was_created_with() {
    let step = json!({"when": [{"condition": "true", "steps": [
        {"claim_check": {"mode": "check_in", "max_bytes": "1KiB"}},
        {"claim_check": {"mode": "check_out", "max_bytes": "2KiB"}}
    ]}]});
    let e = try_build("choice", &step).err().unwrap();
    assert_eq!(e.field.as_deref(), Some("max_bytes"));
}
