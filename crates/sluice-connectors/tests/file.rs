//! The `file` source and sink on real temporary directories.

// Test helpers outside #[test] fns may panic on a broken fixture: that is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::needless_pass_by_value
)]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use sluice_core::{ErrorKind, Failure, Message, ProcessError, Resources, SourceError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..300 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn run(
    config: Value,
    dispatch: Arc<TestDispatch>,
) -> (JoinHandle<Result<(), SourceError>>, CancellationToken) {
    let res = Arc::new(Resources::default());
    let mut config = config;
    config["poll_interval"] = json!("20ms");
    let source = build_source("file", config, &res).expect("builds");
    let (ctx, shutdown) = source_ctx(dispatch, &res, "files");
    (tokio::spawn(source.run(ctx)), shutdown)
}

#[tokio::test]
async fn whole_files_are_claimed_dispatched_and_moved_to_done() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("a.json"), r#"{"n":1}"#).unwrap();
    std::fs::write(d.join("skip.txt"), "no").unwrap();
    std::fs::write(d.join(".hidden.json"), "no").unwrap();
    std::fs::create_dir(d.join("sub.json")).unwrap();
    let dispatch = TestDispatch::echo();
    let (task, shutdown) = run(json!({"path": d, "pattern": "*.json"}), dispatch.clone());
    wait_for("a.json in done", || names(&d.join(".done")) == ["a.json"]).await;
    // A second file with the same name gets a unique name in done.
    std::fs::write(d.join("a.json"), r#"{"n":2}"#).unwrap();
    wait_for("a.1.json in done", || names(&d.join(".done")).len() == 2).await;
    assert_eq!(names(&d.join(".done")), ["a.1.json", "a.json"]);
    assert_eq!(
        std::fs::read_to_string(d.join(".done/a.1.json")).unwrap(),
        r#"{"n":2}"#
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();

    let seen = dispatch.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].headers["file.name"], "a.json");
    assert_eq!(seen[0].headers["file.size"], "7");
    assert_eq!(
        seen[0].headers["file.path"],
        d.join("a.json").display().to_string()
    );
    assert_eq!(seen[0].body.json().unwrap(), &json!({"n": 1}));
    assert_eq!(
        names(d),
        [
            ".done",
            ".error",
            ".hidden.json",
            ".processing",
            "skip.txt",
            "sub.json"
        ]
    );
    assert!(names(&d.join(".processing")).is_empty());
}

#[tokio::test]
async fn delete_on_success() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("x.csv"), "1").unwrap();
    let dispatch = TestDispatch::echo();
    let (task, shutdown) = run(json!({"path": d, "on_success": "delete"}), dispatch.clone());
    wait_for("dispatch", || dispatch.count() == 1).await;
    wait_for("deleted", || {
        !d.join("x.csv").exists() && names(&d.join(".processing")).is_empty()
    })
    .await;
    assert!(!d.join(".done").exists(), "no done dir with delete");
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn failed_files_go_to_the_error_dir_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let errors = d.join("failed");
    std::fs::write(d.join("bad.json"), "{").unwrap();
    let dispatch = TestDispatch::new(|m: Message| async move {
        Err(Failure::new(
            m,
            ProcessError::invalid_input("body is not valid JSON"),
        ))
    });
    let (task, shutdown) = run(json!({"path": d, "error_dir": errors}), dispatch);
    wait_for("error report", || {
        names(&errors) == ["bad.json", "bad.json.error.json"]
    })
    .await;
    let report: Value =
        serde_json::from_slice(&std::fs::read(errors.join("bad.json.error.json")).unwrap())
            .unwrap();
    assert!(
        report["reason"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{report}"
    );
    assert_eq!(report["file"], "bad.json");
    assert!(names(&d.join(".done")).is_empty());
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn files_left_in_processing_by_a_crash_are_processed_first() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join(".processing")).unwrap();
    std::fs::write(d.join(".processing/z-left.txt"), "left").unwrap();
    std::fs::write(d.join("a-new.txt"), "new").unwrap();
    let dispatch = TestDispatch::echo();
    let (task, shutdown) = run(json!({"path": d}), dispatch.clone());
    wait_for("both done", || names(&d.join(".done")).len() == 2).await;
    let order: Vec<String> = dispatch.seen().iter().map(|m| m.body.to_text()).collect();
    assert_eq!(
        order,
        ["left", "new"],
        "leftovers come before new files despite name order"
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn lines_share_one_ack_and_the_file_waits_for_all_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("orders.csv"), "a,1\r\n\nb,2\nc,3\n").unwrap();
    // Holds the messages (like an aggregator) instead of finishing them.
    let held: Arc<Mutex<Vec<Message>>> = Arc::default();
    let hold = Arc::clone(&held);
    let dispatch = TestDispatch::new(move |m: Message| {
        hold.lock().unwrap().push(m);
        async { Ok(vec![]) }
    });
    let (task, shutdown) = run(json!({"path": d, "mode": "lines"}), dispatch.clone());
    wait_for("three lines", || held.lock().unwrap().len() == 3).await;
    let lines: Vec<(String, String)> = dispatch
        .seen()
        .iter()
        .map(|m| (m.headers["file.line"].clone(), m.body.to_text()))
        .collect();
    assert_eq!(
        lines,
        [
            ("1".into(), "a,1".into()),
            ("3".into(), "b,2".into()),
            ("4".into(), "c,3".into())
        ]
    );
    let mut msgs = std::mem::take(&mut *held.lock().unwrap());
    msgs.pop().unwrap().ack();
    msgs.pop().unwrap().ack();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        names(&d.join(".processing")),
        ["orders.csv"],
        "moved before the last line was acked"
    );
    assert!(names(&d.join(".done")).is_empty());
    msgs.pop().unwrap().ack();
    wait_for("done", || names(&d.join(".done")) == ["orders.csv"]).await;

    // One failed line sends the whole file to the error directory.
    std::fs::write(d.join("more.csv"), "x\ny\n").unwrap();
    wait_for("two more lines", || held.lock().unwrap().len() == 2).await;
    let mut msgs = std::mem::take(&mut *held.lock().unwrap());
    msgs.pop().unwrap().nack("warehouse refused y");
    msgs.pop().unwrap().ack();
    wait_for("error", || names(&d.join(".error")).len() == 2).await;
    let report = std::fs::read_to_string(d.join(".error/more.csv.error.json")).unwrap();
    assert!(report.contains("warehouse refused y"), "{report}");
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn oversized_files_go_to_error_unread() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("big.bin"), vec![b'x'; 100]).unwrap();
    let dispatch = TestDispatch::echo();
    let (task, shutdown) = run(json!({"path": d, "max_size": 10}), dispatch.clone());
    wait_for("error", || names(&d.join(".error")).len() == 2).await;
    let report = std::fs::read_to_string(d.join(".error/big.bin.error.json")).unwrap();
    assert!(report.contains("max_size"), "{report}");
    assert_eq!(dispatch.count(), 0);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn missing_directory_stops_the_source_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (task, _shutdown) = run(
        json!({"path": dir.path().join("nope")}),
        TestDispatch::echo(),
    );
    let err = task.await.unwrap().unwrap_err().to_string();
    assert!(
        err.contains("nope") && err.contains("create the directory"),
        "{err}"
    );
}

#[tokio::test]
async fn append_sink_writes_body_and_separator_creating_parents() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("logs/deep/out.jsonl");
    let res = Arc::new(Resources::default());
    for fsync in [false, true] {
        let sink = build_sink("file", json!({"path": path, "fsync": fsync}), &res).unwrap();
        sink.deliver(&Message::bytes(&b"{\"a\":1}"[..]))
            .await
            .unwrap();
        sink.deliver(&Message::bytes(&b"two"[..])).await.unwrap();
    }
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "{\"a\":1}\ntwo\n{\"a\":1}\ntwo\n"
    );
    let sink = build_sink(
        "file",
        json!({"path": dir.path().join("s.txt"), "separator": "|"}),
        &res,
    )
    .unwrap();
    sink.deliver(&Message::bytes(&b"x"[..])).await.unwrap();
    sink.deliver(&Message::bytes(&b"y"[..])).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("s.txt")).unwrap(),
        "x|y|"
    );
}

#[tokio::test]
async fn envelope_content_keeps_id_headers_and_body() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dead.jsonl");
    let res = Arc::new(Resources::default());
    let sink = build_sink("file", json!({"path": path, "content": "envelope"}), &res).unwrap();
    let json_msg = Message::json(json!({"a": 1})).with_header("sluice.error.kind", "timeout");
    let text_msg = Message::bytes(&b"not json"[..]);
    sink.deliver(&json_msg).await.unwrap();
    sink.deliver(&text_msg).await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["id"], json!(json_msg.id().to_string()));
    assert_eq!(lines[0]["headers"]["sluice.error.kind"], json!("timeout"));
    assert_eq!(lines[0]["body"], json!({"a": 1}));
    assert!(lines[0]["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(lines[1]["body"], json!("not json"));
}

#[tokio::test]
async fn concurrent_appends_never_interleave() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.txt");
    let res = Arc::new(Resources::default());
    let sink = build_sink("file", json!({"path": path}), &res).unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let sink = Arc::clone(&sink);
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let line = format!("{i}-").repeat(500);
            sink.deliver(&Message::bytes(line.clone())).await.unwrap();
            // Records of concurrent deliveries are written together, but none returns before
            // the write holding its record returned.
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.lines().any(|l| l == line),
                "record {i} missing on return"
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 200);
    for line in lines {
        let first = line.split('-').next().unwrap();
        assert_eq!(line, format!("{first}-").repeat(500));
    }
}

#[tokio::test]
async fn per_message_files_are_complete_and_leave_no_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let res = Arc::new(Resources::default());
    for fsync in [false, true] {
        let sink = build_sink(
            "file",
            json!({"path": out, "mode": "per_message", "fsync": fsync}),
            &res,
        )
        .unwrap();
        let msg = Message::bytes(&b"{\"order\":1}"[..]);
        sink.deliver(&msg).await.unwrap();
        assert_eq!(
            std::fs::read(out.join(format!("{}.json", msg.id()))).unwrap(),
            b"{\"order\":1}"
        );
    }
    let sink = build_sink(
        "file",
        json!({"path": out, "mode": "per_message", "name": "order-{header.order_id}-{timestamp}.txt"}),
        &res,
    )
    .unwrap();
    sink.deliver(&Message::bytes(&b"x"[..]).with_header("order_id", "77"))
        .await
        .unwrap();
    let all = names(&out);
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(
        all.iter().all(|n| !n.starts_with('.')),
        "temp files left: {all:?}"
    );
    let named = all
        .iter()
        .find(|n| n.starts_with("order-77-"))
        .expect("named file");
    assert!(named.ends_with("Z.txt") && !named.contains(':'), "{named}");

    let err = sink.deliver(&Message::bytes(&b"x"[..])).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidInput);
    let err = sink
        .deliver(&Message::bytes(&b"x"[..]).with_header("order_id", "../escape"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidInput);
    assert_eq!(names(&out).len(), 3);
}

#[tokio::test]
async fn write_failures_are_io_errors_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("plain-file");
    std::fs::write(&blocker, "x").unwrap();
    let res = Arc::new(Resources::default());
    let sink = build_sink("file", json!({"path": blocker.join("sub/out.txt")}), &res).unwrap();
    let err = sink.deliver(&Message::bytes(&b"x"[..])).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Io);
    assert!(err.detail.contains("plain-file"), "{}", err.detail);
    // Once the obstacle is gone the same sink writes again: the failed open is not kept.
    std::fs::remove_file(&blocker).unwrap();
    sink.deliver(&Message::bytes(&b"after"[..])).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(blocker.join("sub/out.txt")).unwrap(),
        "after\n"
    );
    std::fs::remove_dir_all(&blocker).unwrap();
    std::fs::write(&blocker, "x").unwrap();
    let sink = build_sink(
        "file",
        json!({"path": blocker, "mode": "per_message"}),
        &res,
    )
    .unwrap();
    let err = sink.deliver(&Message::bytes(&b"x"[..])).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Io);
    assert!(err.detail.contains("plain-file"), "{}", err.detail);
}

#[test]
fn file_build_errors() {
    let res = Arc::new(Resources::default());
    let err = build_err(build_sink(
        "file",
        json!({"path": "x", "name": "{id}"}),
        &res,
    ));
    assert_eq!(err.field.as_deref(), Some("name"));
    let err = build_err(build_sink(
        "file",
        json!({"path": "x", "mode": "per_message", "name": "{nope}"}),
        &res,
    ));
    assert_eq!(err.field.as_deref(), Some("name"));
    let err = build_err(build_source(
        "file",
        json!({"path": "x", "pattern": "a/*"}),
        &res,
    ));
    assert_eq!(err.field.as_deref(), Some("pattern"));
}
