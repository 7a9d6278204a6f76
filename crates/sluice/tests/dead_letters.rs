//! The dead-letter store end to end: a failing flow writes letters to a real store in a temporary
//! directory; the admin API (real HTTP) and the `sluice dlq` command (the built binary) list,
//! show, delete and replay them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use support::{free_port, request, serve_admin, start_with_data, write_flow};

const FLOWS: &str = r#"
flows:
  - name: orders
    from:
      http: { listen: 127.0.0.1:PORT, path: /orders }
    steps:
      - id: check
        transform: 'if .fail then error("order rejected") else . end'
        retry: { max_attempts: 2, backoff: 1ms, on: [expression] }
    to:
      - file: { path: OUT, content: envelope }
    dead_letter: { dead_letter_store: {} }
  - name: orders-fixed
    from:
      http: { listen: 127.0.0.1:PORT, path: /orders-fixed }
    steps:
      - id: accept
        transform: 'del(.fail)'
    to:
      - file: { path: OUT, content: envelope }
"#;

/// The envelopes the flows delivered, in order.
fn delivered(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// Runs the built `sluice` binary; answers (success, stdout, stderr).
fn sluice(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env_remove("SLUICE_ADMIN")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn sluice_async(args: Vec<String>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        sluice(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn failed_messages_are_stored_browsed_and_replayed_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = dir.path().join("delivered.jsonl");
    let port = free_port();
    let flows = write_flow(
        &dir,
        "flows.yaml",
        &FLOWS
            .replace("PORT", &port.to_string())
            .replace("OUT", &out.display().to_string()),
    );
    let runtime = start_with_data(&[flows], Some(port), &data).await;
    let admin = serve_admin(&runtime).await;
    let api = format!("http://{admin}");
    let orders = format!("http://127.0.0.1:{port}/orders");

    for body in [
        r#"{"order": 1, "fail": true}"#,
        r#"{"order": 2, "fail": true}"#,
        r#"{"order": 3}"#,
    ] {
        request("POST", &orders, body).await;
    }
    assert_eq!(delivered(&out).len(), 1, "only order 3 went through");

    // Listing: both failures, with what failed and where.
    let page = request("GET", &format!("{api}/dlq"), "").await;
    assert_eq!(page.status, 200);
    let page = page.json();
    let letters = page["letters"].as_array().unwrap();
    assert_eq!(letters.len(), 2, "{page}");
    let first = &letters[0];
    assert_eq!(first["id"], 1);
    assert_eq!(first["flow"], "orders");
    assert_eq!(first["step"], "check");
    assert_eq!(first["attempts"], 2, "two attempts by the retry policy");
    assert_eq!(first["error_kind"], "expression");
    assert!(
        first["error"].as_str().unwrap().contains("order rejected"),
        "{first}"
    );
    assert_eq!(first["flow_version"].as_str().unwrap().len(), 16);
    assert_eq!(first["content_type"], "application/json");
    assert!(first.get("body").is_none(), "lists carry no bodies");

    // Filters and paging.
    let count = |query: &'static str| {
        let url = format!("{api}/dlq?{query}");
        async move {
            let reply = request("GET", &url, "").await;
            assert_eq!(reply.status, 200, "{query}");
            reply.json()["letters"].as_array().unwrap().len()
        }
    };
    assert_eq!(count("flow=orders").await, 2);
    assert_eq!(count("flow=orders-fixed").await, 0);
    assert_eq!(count("error=rejected").await, 2);
    assert_eq!(count("error=timeout").await, 0);
    assert_eq!(count("since=1h").await, 2);
    assert_eq!(count("since=2099-01-01T00:00:00Z").await, 0);
    let paged = request("GET", &format!("{api}/dlq?limit=1"), "")
        .await
        .json();
    assert_eq!(paged["letters"][0]["id"], 1);
    assert_eq!(paged["next_after"], 1);
    let next = request("GET", &format!("{api}/dlq?limit=1&after=1"), "")
        .await
        .json();
    assert_eq!(next["letters"][0]["id"], 2);
    let bad = request("GET", &format!("{api}/dlq?since=yesterday"), "").await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].as_str().unwrap().contains("RFC 3339"));

    // One letter in full: the original body, untouched.
    let shown = request("GET", &format!("{api}/dlq/1"), "").await;
    assert_eq!(shown.status, 200);
    let shown = shown.json();
    assert_eq!(shown["body"], r#"{"order": 1, "fail": true}"#);
    assert_eq!(shown["headers"]["sluice.error.step"], "check");
    assert_eq!(
        request("GET", &format!("{api}/dlq/99"), "").await.status,
        404
    );

    // Replay into a flow that does not exist: 404 naming the flows there are.
    let nowhere = request("POST", &format!("{api}/dlq/1/replay"), r#"{"to": "nope"}"#).await;
    assert_eq!(nowhere.status, 404);
    assert_eq!(nowhere.json()["flows"], json!(["orders", "orders-fixed"]));

    // Replay after the fix: delivered once, with the original body and no failure headers.
    let replayed = request(
        "POST",
        &format!("{api}/dlq/1/replay"),
        r#"{"to": "orders-fixed"}"#,
    )
    .await;
    assert_eq!(replayed.status, 200, "{}", replayed.json());
    assert_eq!(replayed.json()["status"], "replayed");
    let after_replay = delivered(&out);
    assert_eq!(after_replay.len(), 2);
    let envelope = &after_replay[1];
    assert_eq!(envelope["body"], json!({"order": 1}));
    assert_eq!(envelope["headers"]["sluice.replayed_from"], "1");
    assert!(
        !envelope["headers"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("sluice.error.") || k.starts_with("sluice.retry.")),
        "{envelope}"
    );

    // The same replay again (a retried click, a second operator): nothing is sent twice.
    let again = request(
        "POST",
        &format!("{api}/dlq/1/replay"),
        r#"{"to": "orders-fixed"}"#,
    )
    .await;
    assert_eq!(again.status, 409);
    assert_eq!(again.json()["status"], "already_replayed");
    let (ok, stdout, stderr) = sluice_async(vec![
        "dlq".into(),
        "replay".into(),
        "1".into(),
        "--to".into(),
        "orders-fixed".into(),
        "--admin".into(),
        api.clone(),
    ])
    .await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("already replayed"), "{stdout}");
    assert_eq!(delivered(&out).len(), 2, "still delivered once");
    let shown = request("GET", &format!("{api}/dlq/1"), "").await.json();
    assert_eq!(shown["replays"][0]["replay_id"], "1");

    // Replaying into the still-broken flow fails there and is dead-lettered again.
    let (ok, _, stderr) = sluice_async(vec![
        "dlq".into(),
        "replay".into(),
        "2".into(),
        format!("--admin={api}"),
    ])
    .await;
    assert!(!ok);
    assert!(
        stderr.contains("the replay failed in flow `orders`"),
        "{stderr}"
    );
    let letters = request("GET", &format!("{api}/dlq"), "").await.json();
    let third = &letters["letters"][2];
    assert_eq!(third["id"], 3, "{letters}");
    let third = request("GET", &format!("{api}/dlq/3"), "").await.json();
    assert_eq!(third["headers"]["sluice.replayed_from"], "2");

    // The CLI over the admin API lists too.
    let (ok, stdout, stderr) = sluice_async(vec![
        "dlq".into(),
        "list".into(),
        "--flow".into(),
        "orders".into(),
        "--json".into(),
        "--admin".into(),
        api.clone(),
    ])
    .await;
    assert!(ok, "{stderr}");
    let listed: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed["letters"].as_array().unwrap().len(), 3);

    // Delete.
    let deleted = request("DELETE", &format!("{api}/dlq/2"), "").await;
    assert_eq!(deleted.status, 200);
    assert_eq!(
        request("GET", &format!("{api}/dlq/2"), "").await.status,
        404
    );
    assert_eq!(
        request("DELETE", &format!("{api}/dlq/2"), "").await.status,
        404
    );
    assert_eq!(
        request("PUT", &format!("{api}/dlq/1"), "").await.status,
        405
    );

    // While the runtime holds the store, opening it directly points to --admin.
    let (ok, _, stderr) = sluice_async(vec![
        "dlq".into(),
        "list".into(),
        "--data".into(),
        data.display().to_string(),
    ])
    .await;
    assert!(!ok);
    assert!(stderr.contains("--admin"), "{stderr}");

    runtime.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_cli_lists_shows_and_deletes_in_a_store_directory() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store =
            sluice_store::Store::open(dir.path(), sluice_store::StoreOptions::default()).unwrap();
        let letters = store.dead_letters();
        for (flow, body) in [
            ("billing", &b"\xff\x00 not text"[..]),
            ("shipping", b"{\"a\":1}"),
        ] {
            letters
                .put(sluice_store::NewDeadLetter {
                    flow: flow.into(),
                    flow_version: "0123456789abcdef".into(),
                    step: "send".into(),
                    error: "remote: the carrier answered 503".into(),
                    attempts: 3,
                    first_failure_ms: 1_700_000_000_000,
                    last_failure_ms: 1_700_000_001_000,
                    headers: serde_json::to_vec(&json!({"content-type": "application/json"}))
                        .unwrap()
                        .into(),
                    body: bytes::Bytes::copy_from_slice(body),
                })
                .await
                .unwrap();
        }
    }
    let data = dir.path().display().to_string();

    let (ok, table, stderr) = sluice(&["dlq", "list", "--data", &data]);
    assert!(ok, "{stderr}");
    assert!(table.starts_with("    ID  FLOW"), "{table}");
    assert!(
        table.contains("\n     1  billing "),
        "ids right-aligned: {table}"
    );
    assert!(
        table.contains("billing") && table.contains("shipping"),
        "{table}"
    );
    assert!(table.contains("2023-11-14T22:13:21.000Z"), "{table}");

    let (ok, json_out, _) = sluice(&[
        "dlq", "list", "--data", &data, "--flow", "shipping", "--json",
    ]);
    assert!(ok);
    let page: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(page["letters"].as_array().unwrap().len(), 1);
    assert_eq!(page["letters"][0]["id"], 2);

    let (ok, shown, _) = sluice(&["dlq", "show", "1", "--data", &data, "--json"]);
    assert!(ok);
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(
        shown["body_base64"], "/wAgbm90IHRleHQ=",
        "binary bodies as base64"
    );
    assert_eq!(shown["attempts"], 3);

    let (ok, _, stderr) = sluice(&["dlq", "delete", "1", "7", "--data", &data]);
    assert!(!ok, "7 does not exist");
    assert!(stderr.contains("no dead letter with id 7"), "{stderr}");
    let (ok, _, stderr) = sluice(&["dlq", "show", "1", "--data", &data]);
    assert!(!ok, "1 was deleted");
    assert!(stderr.contains("no dead letter with id 1"), "{stderr}");
    let (_, json_out, _) = sluice(&["dlq", "list", "--data", &data, "--json"]);
    let page: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(page["letters"].as_array().unwrap().len(), 1);

    let (ok, _, stderr) = sluice(&["dlq", "replay", "2", "--data", &data]);
    assert!(!ok);
    assert!(stderr.contains("--admin"), "{stderr}");
}

/// `charge` fails every message that went through `count`: only a replay that starts at
/// `charge` (skipping `count`) gets through `billing`.
const STEPPED: &str = r#"
flows:
  - name: billing
    from:
      http: { listen: 127.0.0.1:PORT, path: /bill }
    steps:
      - id: count
        transform: '.counted = true'
      - id: charge
        transform: 'if .counted then error("payment service down") else . end'
    to:
      - file: { path: OUT }
    dead_letter: { dead_letter_store: {} }
  - name: audit
    from:
      http: { listen: 127.0.0.1:PORT, path: /audit }
    steps:
      - id: stamp
        transform: '.audited = true'
    to:
      - file: { path: OUT }
    dead_letter: { dead_letter_store: {} }
"#;

#[tokio::test]
async fn letters_are_replayed_by_filter_and_from_a_step() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = dir.path().join("delivered.jsonl");
    let port = free_port();
    let flows = write_flow(
        &dir,
        "flows.yaml",
        &STEPPED
            .replace("PORT", &port.to_string())
            .replace("OUT", &out.display().to_string()),
    );
    let runtime = start_with_data(&[flows], Some(port), &data).await;
    let admin = serve_admin(&runtime).await;
    let api = format!("http://{admin}");
    for amount in [500, 700, 900] {
        request(
            "POST",
            &format!("http://127.0.0.1:{port}/bill"),
            format!(r#"{{"amount": {amount}}}"#),
        )
        .await;
    }
    assert!(delivered(&out).is_empty());
    let listed = request("GET", &format!("{api}/dlq"), "").await.json();
    assert_eq!(listed["letters"].as_array().unwrap().len(), 3);

    // A step that does not exist: 404 naming the steps, and the replay id is not spent.
    let typo = request(
        "POST",
        &format!("{api}/dlq/1/replay"),
        r#"{"to": "billing/chrge"}"#,
    )
    .await;
    assert_eq!(typo.status, 404);
    assert_eq!(typo.json()["steps"], json!(["count", "charge"]));

    // The whole flow again: `count` runs, `charge` fails, a new letter (4) keeps the failure.
    let again = request("POST", &format!("{api}/dlq/1/replay"), "").await;
    assert_eq!(again.status, 422, "{}", again.json());
    assert_eq!(again.json()["dead_lettered_again"], true);

    // From `charge`: the stored original body, `count` skipped, so it goes through.
    let resumed = request(
        "POST",
        &format!("{api}/dlq/2/replay"),
        r#"{"to": "billing/charge"}"#,
    )
    .await;
    assert_eq!(resumed.status, 200, "{}", resumed.json());
    assert_eq!(resumed.json()["step"], "charge");
    assert_eq!(delivered(&out), vec![json!({"amount": 700})]);

    // Bulk: a filter is required.
    let unfiltered = request("POST", &format!("{api}/dlq/replay"), "{}").await;
    assert_eq!(unfiltered.status, 400);
    assert!(unfiltered.json()["error"].as_str().unwrap().contains("all"));

    // Bulk by flow into `audit`: letters 1 and 2 were replayed before (their ids are their
    // replay ids); 3, and 4 (written by the failed replay of 1), go now.
    let bulk = request(
        "POST",
        &format!("{api}/dlq/replay"),
        r#"{"flow": "billing", "to": "audit"}"#,
    )
    .await;
    assert_eq!(bulk.status, 200, "{}", bulk.json());
    let bulk = bulk.json();
    assert_eq!(bulk["replayed"], json!([3, 4]), "{bulk}");
    assert_eq!(bulk["already_replayed"], json!([1, 2]), "{bulk}");
    assert_eq!(bulk["failed"], json!([]));
    let got = delivered(&out);
    assert_eq!(
        got[1..],
        [
            json!({"amount": 900, "audited": true}),
            json!({"amount": 500, "audited": true})
        ]
    );

    // The same bulk replay again through the CLI: nothing is sent twice.
    let (ok, stdout, stderr) = sluice_async(vec![
        "dlq".into(),
        "replay".into(),
        "--flow".into(),
        "billing".into(),
        "--to".into(),
        "audit".into(),
        "--admin".into(),
        api.clone(),
    ])
    .await;
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("total: 0 replayed, 4 already replayed, 0 failed"),
        "{stdout}"
    );
    assert_eq!(delivered(&out).len(), 3);

    // Ids and filters do not mix.
    let (ok, _, stderr) = sluice_async(vec![
        "dlq".into(),
        "replay".into(),
        "1".into(),
        "--flow".into(),
        "billing".into(),
        "--admin".into(),
        api.clone(),
    ])
    .await;
    assert!(!ok);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    runtime.shutdown(std::time::Duration::from_secs(5)).await;
}
