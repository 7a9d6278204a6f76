//! Behaviour tests of durable channels: real redb files in temporary directories, real runtimes
//! started and stopped (a restart is a new runtime on the same data directory), real HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sluice_core::spec::{ComponentKind, ComponentSpec, FieldSpec, FieldType};
use sluice_core::{
    BuildContext, BuildError, ErrorKind, Message, ProcessError, Registry, Resources, Sink,
};
use sluice_engine::durable::DurableStore;
use sluice_engine::runtime::Runtime;
use sluice_engine::{build, config};
use sluice_store::{Filter, Store, StoreOptions};
use support::{free_port, request, wait_for_port, write_flow};

// A `record` target for these tests: keeps every message it is given under its `key`, then
// succeeds, fails with `unavailable`, or never returns (`mode`).
fn recorded() -> &'static Mutex<HashMap<String, Vec<Message>>> {
    static RECORDED: OnceLock<Mutex<HashMap<String, Vec<Message>>>> = OnceLock::new();
    RECORDED.get_or_init(Mutex::default)
}

fn take(key: &str) -> Vec<Message> {
    recorded()
        .lock()
        .unwrap()
        .get(key)
        .cloned()
        .unwrap_or_default()
}

struct Record {
    key: String,
    mode: String,
}

#[async_trait]
impl Sink for Record {
    async fn deliver(&self, msg: &Message) -> Result<(), ProcessError> {
        recorded()
            .lock()
            .unwrap()
            .entry(self.key.clone())
            .or_default()
            .push(msg.detached());
        match self.mode.as_str() {
            "block" => std::future::pending().await,
            "fail" => Err(ProcessError::new(ErrorKind::Unavailable, "record fails")),
            _ => Ok(()),
        }
    }
}

fn record_spec() -> ComponentSpec {
    ComponentSpec::new("record", ComponentKind::Sink, "test recorder")
        .field(FieldSpec::new("key", FieldType::String, "where to record").required())
        .field(
            FieldSpec::new(
                "mode",
                FieldType::Enum(vec!["ok", "block", "fail"]),
                "what to do then",
            )
            .default_value("ok"),
        )
}

fn build_record(config: &Value, _: &BuildContext<'_>) -> Result<Arc<dyn Sink>, BuildError> {
    Ok(Arc::new(Record {
        key: config["key"].as_str().unwrap().to_owned(),
        mode: config["mode"].as_str().unwrap_or("ok").to_owned(),
    }))
}

fn registry() -> Registry {
    let mut registry = sluice::registry();
    registry.sink(record_spec(), build_record);
    registry
}

/// Starts `yaml` with its store in `data`, waiting for `port` to accept connections.
async fn start(dir: &tempfile::TempDir, data: &Path, yaml: &str, port: u16) -> Runtime {
    let path: PathBuf = write_flow(dir, "flows.yaml", yaml);
    let registry = registry();
    let project =
        config::load(&[path], &registry).unwrap_or_else(|d| panic!("flows do not load:\n{d}"));
    let resources = Arc::new(Resources::default());
    resources.get_or_default::<DurableStore>().set_dir(data);
    let topology = build::build(&project, &registry, resources)
        .unwrap_or_else(|d| panic!("flows do not build:\n{d}"));
    let runtime = Runtime::start(topology);
    wait_for_port(port).await;
    runtime
}

/// Waits until `key` recorded `n` messages.
async fn recorded_at_least(key: &str, n: usize) -> Vec<Message> {
    for _ in 0..1000 {
        let got = take(key);
        if got.len() >= n {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("`{key}` recorded {} messages, not {n}", take(key).len());
}

/// A producer (HTTP in_only answering after the commit) and a consumer of durable channel
/// `jobs`, whose `record` target runs in `mode`.
fn flows(port: u16, key: &str, mode: &str, consumer: &str) -> String {
    format!(
        r#"
flows:
  - name: intake
    from:
      http: {{listen: "127.0.0.1:{port}", path: /jobs, pattern: in_only, accept: on_commit}}
    to:
      - channel: {{name: jobs, durable: true}}
  - name: worker
    from:
      channel: {{name: jobs, durable: true, redelivery_delay: 10ms, poll_interval: 50ms{consumer}}}
    to:
      - record: {{key: {key}, mode: {mode}}}
"#
    )
}

/// The records still in channel `jobs` of the store in `data` (opened after the runtime stopped).
async fn left_in_channel(data: &Path) -> usize {
    let store = Store::open(data, StoreOptions::default()).unwrap();
    store
        .queue("jobs")
        .lease(1000, Duration::from_secs(60))
        .await
        .unwrap()
        .len()
}

#[tokio::test]
async fn a_message_crosses_the_channel_and_its_record_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let runtime = start(&dir, &data, &flows(port, "crosses", "ok", ""), port).await;
    let reply = request(
        "POST",
        &format!("http://127.0.0.1:{port}/jobs"),
        r#"{"n":1}"#,
    )
    .await;
    assert_eq!(
        reply.status,
        202,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let got = recorded_at_least("crosses", 1).await;
    assert_eq!(got[0].body.json().unwrap()["n"], 1);
    assert_eq!(
        got[0].id().to_string(),
        reply.json()["id"],
        "the id survives"
    );
    assert_eq!(got[0].headers["sluice.delivery.count"], "1");
    assert_eq!(got[0].headers["sluice.redelivered"], "false");
    assert_eq!(got[0].headers["http.path"], "/jobs", "headers survive");
    assert_eq!(got[0].meta.origin.as_deref(), Some("intake"));
    // The ack is committed after the target returned; a graceful stop waits for it.
    assert_eq!(runtime.shutdown(Duration::from_secs(5)).await, 0);
    assert_eq!(left_in_channel(&data).await, 0, "the acked record is gone");
}

#[tokio::test]
async fn an_unfinished_message_is_redelivered_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let runtime = start(&dir, &data, &flows(port, "restart-1", "block", ""), port).await;
    let reply = request(
        "POST",
        &format!("http://127.0.0.1:{port}/jobs"),
        r#"{"n":2}"#,
    )
    .await;
    assert_eq!(reply.status, 202);
    let first = recorded_at_least("restart-1", 1).await;
    assert_eq!(first[0].headers["sluice.redelivered"], "false");
    // The worker never finishes: the runtime gives up on it.
    assert_eq!(runtime.shutdown(Duration::from_millis(200)).await, 1);

    let port = free_port();
    let runtime = start(&dir, &data, &flows(port, "restart-2", "ok", ""), port).await;
    let again = recorded_at_least("restart-2", 1).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id(), first[0].id());
    assert_eq!(again[0].body.json().unwrap()["n"], 2);
    assert_eq!(again[0].headers["sluice.redelivered"], "true");
    assert_eq!(again[0].headers["sluice.delivery.count"], "2");
    assert_eq!(runtime.shutdown(Duration::from_secs(5)).await, 0);
    assert_eq!(left_in_channel(&data).await, 0);
}

#[tokio::test]
async fn the_producer_gets_202_only_once_the_message_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let runtime = start(&dir, &data, &flows(port, "on-disk", "block", ""), port).await;
    let reply = request("POST", &format!("http://127.0.0.1:{port}/jobs"), "on disk").await;
    assert_eq!(reply.status, 202);
    // Stopped at once, whatever the worker was doing: the record is there.
    runtime.shutdown(Duration::from_millis(50)).await;
    let store = Store::open(&data, StoreOptions::default()).unwrap();
    let records = store
        .queue("jobs")
        .lease(10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(records.len(), 1);
    let msg = sluice_engine::envelope::decode(&records[0].payload).unwrap();
    assert_eq!(msg.body.as_bytes().as_ref(), b"on disk");
    assert_eq!(msg.id().to_string(), reply.json()["id"]);
}

#[tokio::test]
async fn concurrency_one_keeps_the_order_of_the_channel() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let runtime = start(&dir, &data, &flows(port, "order", "ok", ""), port).await;
    let url = format!("http://127.0.0.1:{port}/jobs");
    for n in 0..30 {
        assert_eq!(request("POST", &url, n.to_string()).await.status, 202);
    }
    let got = recorded_at_least("order", 30).await;
    let order: Vec<i64> = got
        .iter()
        .map(|m| m.body.json().unwrap().as_i64().unwrap())
        .collect();
    assert_eq!(order, (0..30).collect::<Vec<_>>());
    runtime.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_record_that_cannot_be_read_is_dead_lettered_and_the_next_one_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let store = Store::open(&data, StoreOptions::default()).unwrap();
        let good = sluice_engine::envelope::encode(&Message::bytes("good"));
        store
            .queue("jobs")
            .append(vec![bytes::Bytes::from_static(&[9, 9, 9]), good])
            .await
            .unwrap();
    }
    let port = free_port();
    let runtime = start(&dir, &data, &flows(port, "undecodable", "ok", ""), port).await;
    let got = recorded_at_least("undecodable", 1).await;
    assert_eq!(got[0].body.as_bytes().as_ref(), b"good");
    runtime.shutdown(Duration::from_secs(5)).await;

    let store = Store::open(&data, StoreOptions::default()).unwrap();
    let letters = store
        .dead_letters()
        .list(&Filter::default())
        .unwrap()
        .letters;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0].letter;
    assert!(
        letter.error.contains("unsupported envelope version 9"),
        "{}",
        letter.error
    );
    assert_eq!(letter.body.as_ref(), &[9, 9, 9], "the raw record is kept");
    assert_eq!(letter.flow, "worker");
    drop(store);
    assert_eq!(left_in_channel(&data).await, 0);
}

#[tokio::test]
async fn a_message_failing_max_deliveries_times_goes_to_the_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let runtime = start(
        &dir,
        &data,
        &flows(port, "poison", "fail", ", max_deliveries: 3"),
        port,
    )
    .await;
    let reply = request("POST", &format!("http://127.0.0.1:{port}/jobs"), "poison").await;
    assert_eq!(reply.status, 202);
    let got = recorded_at_least("poison", 3).await;
    let counts: Vec<&str> = got
        .iter()
        .map(|m| m.headers["sluice.delivery.count"].as_str())
        .collect();
    assert_eq!(counts, ["1", "2", "3"]);
    // Wait for the dead letter to be written, then check nothing more is delivered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        take("poison").len(),
        3,
        "not delivered after max_deliveries"
    );
    runtime.shutdown(Duration::from_secs(5)).await;

    let store = Store::open(&data, StoreOptions::default()).unwrap();
    let letters = store
        .dead_letters()
        .list(&Filter::default())
        .unwrap()
        .letters;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0].letter;
    assert_eq!(letter.body.as_ref(), b"poison");
    assert_eq!(letter.attempts, 3);
    assert!(letter.error.contains("record fails"), "{}", letter.error);
    drop(store);
    assert_eq!(left_in_channel(&data).await, 0);
}

#[test]
fn both_ends_of_a_channel_must_agree_on_durability() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_flow(
        &dir,
        "mismatch.yaml",
        r"
flows:
  - name: intake
    from:
      http: {path: /in}
    to:
      - channel: {name: jobs, durable: true}
  - name: worker
    from:
      channel: jobs
    to:
      - log: {}
",
    );
    let problems = config::load(&[path], &registry()).unwrap_err().to_string();
    assert!(
        problems
            .contains("channel `jobs` is durable here but in memory where flow `worker` reads it"),
        "{problems}"
    );
    assert!(problems.contains("mismatch.yaml:7"), "{problems}");
    assert!(problems.contains("durable: false"), "{problems}");
}

/// A tmpfs mounted on a fresh directory, unmounted when dropped (also when the test fails).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(SmallDisk { dir })
    }

    /// Gives the filesystem more room, as an operator freeing space would.
    fn grow(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "remount failed");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_answers_503_with_retry_after_and_takes_messages_again_once_space_returns() {
    let disk = match SmallDisk::mount("12m") {
        Ok(disk) => disk,
        Err(why) => {
            println!("skipping the disk-full test: cannot mount a tmpfs ({why})");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let data = disk.dir.path().join("data");
    let port = free_port();
    // The worker holds its first message forever, so the channel only grows.
    let runtime = start(&dir, &data, &flows(port, "disk-full", "block", ""), port).await;
    let url = format!("http://127.0.0.1:{port}/jobs");
    let body = "x".repeat(32 << 10);
    let mut accepted = 0;
    let full = loop {
        let reply = request("POST", &url, body.clone()).await;
        if reply.status != 202 {
            break reply;
        }
        accepted += 1;
        assert!(accepted < 10_000, "12 MiB never filled up");
    };
    assert!(accepted > 0, "nothing fit before the disk was full");
    let text = String::from_utf8_lossy(&full.body).into_owned();
    assert_eq!(full.status, 503, "{text}");
    assert!(!full.header("retry-after").is_empty(), "no Retry-After");
    assert!(text.contains("disk is full"), "{text}");

    // Still full: still refused, the same way.
    let again = request("POST", &url, body.clone()).await;
    assert_eq!(again.status, 503);

    // Space returns; the same running process takes messages again, by itself.
    disk.grow("64m");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let reply = request("POST", &url, body.clone()).await;
        if reply.status == 202 {
            break;
        }
        assert_eq!(
            reply.status,
            503,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        assert!(
            std::time::Instant::now() < deadline,
            "never took messages again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    runtime.shutdown(Duration::from_millis(50)).await;
    // Every message answered 202 is in the channel (the one the worker held included).
    assert_eq!(left_in_channel(&data).await, accepted + 1);
}
