//! The `sftp` source and sink against the real OpenSSH server of scripts/services.sh on
//! 127.0.0.1:2222 (user root, key login, known host key). The server runs on this machine, so
//! each test uses its own directory under /tmp and checks it on the local filesystem.
#![cfg(feature = "sftp")]
// Test helpers outside #[test] fns may panic on a broken fixture: that is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::needless_pass_by_value
)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use sluice_core::{ComponentHealth, ErrorKind, Failure, Message, ProcessError, Resources};

const ADDR: &str = "127.0.0.1:2222";

fn services_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("SLUICE_SERVICES_DIR").unwrap_or_else(|_| "/tmp/sluice-services".into()),
    )
    .join("sshd")
}

fn host_key() -> String {
    std::fs::read_to_string(services_dir().join("host_ed25519.pub"))
        .unwrap()
        .trim()
        .to_owned()
}

fn conn(dir: &Path) -> Value {
    json!({
        "host": "127.0.0.1",
        "port": 2222,
        "user": "root",
        "private_key_file": services_dir().join("client_ed25519"),
        "host_key": host_key(),
        "path": dir,
    })
}

fn unique_dir() -> PathBuf {
    let dir = PathBuf::from("/tmp").join(sluice_testkit::unique("sluice_sftp"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

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
    for _ in 0..400 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn sink_uploads_under_a_temporary_name_then_renames() {
    if !sluice_testkit::service("OpenSSH", ADDR).await {
        return;
    }
    let dir = unique_dir();
    let res = Arc::new(Resources::default());
    let mut config = conn(&dir);
    config["name"] = json!("order-{header.n}.json");
    let sink = build_sink("sftp", config, &res).unwrap();
    for n in 0..3 {
        let msg = Message::json(json!({"n": n})).with_header("n", n.to_string());
        sink.deliver(&msg).await.unwrap();
    }
    // Same name again: replaced.
    let msg = Message::json(json!({"n": "again"})).with_header("n", "0");
    sink.deliver(&msg).await.unwrap();
    assert_eq!(
        names(&dir),
        ["order-0.json", "order-1.json", "order-2.json"],
        "no temporary file left"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("order-0.json")).unwrap(),
        r#"{"n":"again"}"#
    );
    let err = sink
        .deliver(&Message::bytes("x").with_header("n", "../escape"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidInput);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn source_claims_downloads_and_files_away_after_the_outcome() {
    if !sluice_testkit::service("OpenSSH", ADDR).await {
        return;
    }
    let dir = unique_dir();
    // A leftover of a crashed run is processed first.
    std::fs::create_dir_all(dir.join(".processing")).unwrap();
    std::fs::write(dir.join(".processing/0-left.csv"), "left").unwrap();
    std::fs::write(dir.join("a.csv"), "alpha").unwrap();
    std::fs::write(dir.join("bad.csv"), "fails").unwrap();
    std::fs::write(dir.join("skip.txt"), "not matched").unwrap();
    let dispatch = TestDispatch::new(|m: Message| async move {
        if m.headers["sftp.name"] == "bad.csv" {
            return Err(Failure::new(
                m,
                ProcessError::new(ErrorKind::Rejected, "no"),
            ));
        }
        m.ack();
        Ok(vec![])
    });
    let res = Arc::new(Resources::default());
    let mut config = conn(&dir);
    config["pattern"] = json!("*.csv");
    config["poll_interval"] = json!("50ms");
    let source = build_source("sftp", config, &res).unwrap();
    let (ctx, shutdown) = source_ctx(dispatch.clone(), &res, "sftp-in");
    let task = tokio::spawn(source.run(ctx));
    wait_for("files filed away", || {
        names(&dir.join(".done")).len() == 2 && names(&dir.join(".error")).len() == 1
    })
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(names(&dir.join(".done")), ["0-left.csv", "a.csv"]);
    assert_eq!(names(&dir.join(".error")), ["bad.csv"]);
    assert!(names(&dir.join(".processing")).is_empty());
    assert_eq!(names(&dir), [".done", ".error", ".processing", "skip.txt"]);
    let seen = dispatch.seen();
    let got: Vec<(String, String)> = seen
        .iter()
        .map(|m| (m.headers["sftp.name"].clone(), m.body.to_text()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("0-left.csv".into(), "left".into()),
            ("a.csv".into(), "alpha".into()),
            ("bad.csv".into(), "fails".into()),
        ]
    );
    assert_eq!(seen[1].headers["sftp.size"], "5");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn an_unknown_host_key_is_refused() {
    if !sluice_testkit::service("OpenSSH", ADDR).await {
        return;
    }
    let dir = unique_dir();
    let res = Arc::new(Resources::default());
    let mut config = conn(&dir);
    // The client's own public key is not the server's host key.
    config["host_key"] = json!(
        std::fs::read_to_string(services_dir().join("client_ed25519.pub"))
            .unwrap()
            .trim()
    );
    let sink = build_sink("sftp", config, &res).unwrap();
    let err = sink.deliver(&Message::bytes("x")).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable);
    assert!(err.detail.contains("host key"), "{}", err.detail);
    assert!(names(&dir).is_empty(), "nothing uploaded");
    let problems = ComponentHealth::of(&res).problems("test-flow");
    assert!(!problems.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn an_unreachable_server_is_unhealthy_not_fatal() {
    let res = Arc::new(Resources::default());
    let config = json!({"host": "127.0.0.1", "port": 1, "user": "root", "password": "x",
                         "host_key": "SHA256:x", "path": "/tmp"});
    let source = build_source("sftp", config, &res).unwrap();
    let (ctx, shutdown) = source_ctx(TestDispatch::echo(), &res, "sftp-in");
    let task = tokio::spawn(source.run(ctx));
    let board = ComponentHealth::of(&res);
    wait_for("unhealthy", || !board.problems("sftp-in").is_empty()).await;
    assert!(board.problems("sftp-in")[0].1.contains("127.0.0.1:1"));
    assert!(!task.is_finished());
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
