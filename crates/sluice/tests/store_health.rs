//! The durable store's health on the admin API, on a real, small filesystem that runs full:
//! `/health` reports the store degraded and `/metrics` shows the disk reserve in use while the
//! disk is full, and both recover by themselves once space returns.
//!
//! Needs permission to mount a tmpfs (root, as in this project's CI); without it the test says
//! so in one line and returns.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::time::Duration;

use sluice_testkit::disk::{SmallDisk, fill_up};
use support::{free_port, request, serve_admin, start_with_data, write_flow};

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

async fn health(admin: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let reply = request("GET", &format!("http://{admin}/health"), "").await;
    (reply.status, reply.json())
}

async fn reserve_gauge(admin: std::net::SocketAddr) -> Option<f64> {
    let reply = request("GET", &format!("http://{admin}/metrics"), "").await;
    sample(
        &String::from_utf8_lossy(&reply.body),
        "sluice_store_reserve_in_use ",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_show_the_disk_reserve_in_use_until_space_returns() {
    let disk = match SmallDisk::mount("16m") {
        Ok(disk) => disk,
        Err(why) => {
            println!("skipping the store health test: cannot mount a tmpfs ({why})");
            return;
        }
    };
    let data = disk.path().join("data");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let yaml = format!(
        r#"
flows:
  - name: intake
    from: {{http: {{listen: "127.0.0.1:{port}", path: /jobs, pattern: in_only, accept: on_commit}}}}
    to: [{{channel: {{name: jobs, durable: true}}}}]
  - name: worker
    from: {{channel: {{name: jobs, durable: true}}}}
    steps: [{{filter: 'false'}}]
"#
    );
    let flow = write_flow(&dir, "flows.yaml", &yaml);
    let runtime = start_with_data(&[flow], Some(port), &data).await;
    let admin = serve_admin(&runtime).await;
    let url = format!("http://127.0.0.1:{port}/jobs");

    let (status, body) = health(admin).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["store"]["state"], "ok", "{body}");
    assert_eq!(reserve_gauge(admin).await, Some(0.0));

    // Something else fills the disk; writes that need room fail, the store releases its reserve.
    let filler = disk.path().join("filler");
    fill_up(&filler);
    let big = "x".repeat(256 << 10);
    let mut refused = None;
    for _ in 0..200 {
        let reply = request("POST", &url, big.clone()).await;
        if reply.status == 503 {
            refused = Some(reply);
            break;
        }
        assert_eq!(
            reply.status,
            202,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
    }
    let refused = refused.expect("the full disk never refused a message");
    assert!(
        String::from_utf8_lossy(&refused.body).contains("disk is full"),
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    let (status, body) = health(admin).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["store"]["state"], "degraded", "{body}");
    assert!(
        body["store"]["error"]
            .as_str()
            .unwrap()
            .contains("free space"),
        "{body}"
    );
    assert_eq!(body["flows"]["intake"]["state"], "running", "{body}");
    assert_eq!(reserve_gauge(admin).await, Some(1.0));

    // Space returns: the store writes its reserve again by itself and health clears.
    std::fs::remove_file(&filler).unwrap();
    let mut cleared = false;
    for _ in 0..500 {
        if health(admin).await.0 == 200 {
            cleared = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cleared, "health stayed degraded after space returned");
    assert_eq!(health(admin).await.1["store"]["state"], "ok");
    assert_eq!(reserve_gauge(admin).await, Some(0.0));
    let reply = request("POST", &url, "after").await;
    assert_eq!(
        reply.status,
        202,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    runtime.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn without_a_store_health_and_metrics_say_nothing_about_it() {
    let dir = tempfile::tempdir().unwrap();
    // Port 0: nothing is sent to the flow, and a port picked with `free_port` could be taken
    // by the other test of this file before the flow binds it (the flow then fails: 503).
    let yaml = r#"
flows:
  - name: echo
    from: {http: {listen: "127.0.0.1:0", path: /e}}
"#;
    let flow = write_flow(&dir, "flows.yaml", yaml);
    let data = dir.path().join("data");
    let runtime = start_with_data(&[flow], None, &data).await;
    let admin = serve_admin(&runtime).await;
    // The source reports its state once its task runs; wait for it rather than race it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let (status, body) = health(admin).await;
        if status == 200 || std::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 200, "{body}");
    assert!(body.get("store").is_none(), "{body}");
    assert_eq!(reserve_gauge(admin).await, None);
    assert!(!data.exists(), "reporting health must not open the store");
    runtime.shutdown(Duration::from_secs(5)).await;
}
