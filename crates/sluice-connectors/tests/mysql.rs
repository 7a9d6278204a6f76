//! The `sql` processor and sink against the real MariaDB on 127.0.0.1:3306 (database `test`).
#![cfg(feature = "mysql")]
// Test helpers outside #[test] fns may panic on a broken fixture: that is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::needless_pass_by_value
)]

mod common;
mod sql_support;

use std::sync::Arc;

use serde_json::{Value, json};
use sluice_core::{ErrorKind, Message, Resources};
use sluice_testkit::unique;
use sql_support::*;

const ADDR: &str = "127.0.0.1:3306";
const URL: &str = "mysql://root@127.0.0.1:3306/test";

async fn up() -> bool {
    sluice_testkit::service("MariaDB", ADDR).await
}

/// Runs statements through the processor itself (setup and checks).
async fn exec(resources: &Arc<Resources>, sql: &str) -> Value {
    let step = processor(json!({"url": URL, "query": sql}), resources);
    run_step(&step, Message::json(json!(null))).await.unwrap()
}

#[tokio::test]
async fn sql_processor_binds_params_and_maps_types() {
    if !up().await {
        return;
    }
    let resources = Arc::new(Resources::default());
    let t = unique("sluice_myp");
    exec(
        &resources,
        &format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, tenant varchar(20), price decimal(10,2), at datetime(3),
             day date, raw varbinary(8), doc longtext, ratio double)"
        ),
    )
    .await;
    exec(
        &resources,
        &format!(
            "INSERT INTO {t} VALUES (1, 'acme', 12.50, '2024-05-01 10:00:00.250', '2024-05-01', x'0102ff', '{{\"k\":1}}', 0.25),
             (2, 'other', 1, NULL, NULL, NULL, NULL, NULL)"
        ),
    )
    .await;
    let step = processor(
        json!({
            "url": URL, "query": format!("SELECT * FROM {t} WHERE id = ? AND tenant = ?"),
            "params": [".id", "$headers.tenant"], "mode": "first"
        }),
        &resources,
    );
    let out = run_step(
        &step,
        Message::json(json!({"id": 1})).with_header("tenant", "acme"),
    )
    .await
    .unwrap();
    assert_eq!(
        out,
        json!({"id": 1, "tenant": "acme", "price": 12.5, "at": "2024-05-01T10:00:00.250000Z",
               "day": "2024-05-01", "raw": "AQL/", "doc": "{\"k\":1}", "ratio": 0.25})
    );
    // Bound, not spliced.
    let rows = processor(
        json!({"url": URL, "query": format!("SELECT id FROM {t} WHERE tenant = ?"), "params": ["."]}),
        &resources,
    );
    let out = run_step(&rows, Message::json(json!("x' OR '1'='1")))
        .await
        .unwrap();
    assert_eq!(out, json!([]));
    let update = processor(
        json!({"url": URL, "query": format!("UPDATE {t} SET tenant = ? WHERE id <= ?"), "params": [".t", ".upto"], "mode": "count", "into": "n"}),
        &resources,
    );
    let out = run_step(&update, Message::json(json!({"t": "z", "upto": 2})))
        .await
        .unwrap();
    assert_eq!(out, json!({"t": "z", "upto": 2, "n": 2}));
    exec(&resources, &format!("DROP TABLE {t}")).await;
}

#[tokio::test]
async fn sink_batches_upserts_and_isolates_a_bad_row() {
    if !up().await {
        return;
    }
    let resources = Arc::new(Resources::default());
    let t = unique("sluice_mys");
    exec(
        &resources,
        &format!("CREATE TABLE {t} (id int PRIMARY KEY, name varchar(50) NOT NULL, doc longtext)"),
    )
    .await;
    let sink = sink(
        json!({"url": URL, "table": t, "columns": ["id", "name", "doc"], "on_conflict": "upsert", "key": ["id"], "batch_wait": "20ms"}),
        &resources,
    );
    let mut tasks = Vec::new();
    for i in 0..200 {
        let sink = Arc::clone(&sink);
        tasks.push(tokio::spawn(async move {
            sink.deliver(&Message::json(
                json!({"id": i % 150, "name": format!("n{i}"), "doc": {"i": i}}),
            ))
            .await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let count = exec(&resources, &format!("SELECT count(*) AS n FROM {t}")).await;
    assert_eq!(count, json!([{"n": 150}]));
    let row = exec(
        &resources,
        &format!("SELECT name, doc FROM {t} WHERE id = 3"),
    )
    .await;
    assert_eq!(row, json!([{"name": "n153", "doc": "{\"i\":153}"}]));

    // NULL into NOT NULL fails that message only.
    let plain = sink_named(
        json!({"url": URL, "table": t, "columns": ["id", "name"], "batch_wait": "20ms"}),
        &resources,
    );
    let mut tasks = Vec::new();
    for i in 1000..1006 {
        let sink = Arc::clone(&plain);
        tasks.push(tokio::spawn(async move {
            let name = if i == 1003 { Value::Null } else { json!("ok") };
            sink.deliver(&Message::json(json!({"id": i, "name": name})))
                .await
        }));
    }
    let mut failed = Vec::new();
    for (i, task) in (1000..).zip(tasks) {
        if let Err(e) = task.await.unwrap() {
            assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
            failed.push(i);
        }
    }
    assert_eq!(failed, vec![1003]);
    let count = exec(
        &resources,
        &format!("SELECT count(*) AS n FROM {t} WHERE id >= 1000"),
    )
    .await;
    assert_eq!(count, json!([{"n": 5}]));
    exec(&resources, &format!("DROP TABLE {t}")).await;
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    let resources = Arc::new(Resources::default());
    let sink = sink(
        json!({"url": "mysql://root@127.0.0.1:1/test", "table": "t", "columns": ["id"], "connect_timeout": "1s"}),
        &resources,
    );
    let err = sink
        .deliver(&Message::json(json!({"id": 1})))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err}");
    assert!(
        err.detail
            .contains("MariaDB/MySQL at mysql://127.0.0.1:1/test"),
        "{err}"
    );
}

#[tokio::test]
async fn the_sink_reconnects_after_the_server_comes_back() {
    if !up().await {
        return;
    }
    let proxy = sluice_testkit::proxy::TcpProxy::start(ADDR.parse().unwrap()).await;
    let resources = Arc::new(Resources::default());
    let t = unique("sluice_myre");
    exec(
        &resources,
        &format!("CREATE TABLE {t} (id int PRIMARY KEY)"),
    )
    .await;
    let sink = sink(
        json!({"url": format!("mysql://root@{}/test", proxy.addr()), "table": t, "columns": ["id"], "connect_timeout": "1s"}),
        &resources,
    );
    sink.deliver(&Message::json(json!({"id": 1})))
        .await
        .unwrap();
    proxy.refuse().await;
    let err = sink
        .deliver(&Message::json(json!({"id": 2})))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err}");
    assert!(
        !sluice_core::ComponentHealth::of(&resources)
            .problems("test-flow")
            .is_empty()
    );
    proxy.up().await;
    // The flow's retry policy would send it again: the first attempt after the outage succeeds
    // or fails as unavailable, never silently.
    let mut ok = false;
    for _ in 0..3 {
        match sink.deliver(&Message::json(json!({"id": 2}))).await {
            Ok(()) => {
                ok = true;
                break;
            }
            Err(e) => {
                eprintln!("attempt after the outage failed: {e}");
                assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
            }
        }
    }
    assert!(ok, "the sink did not recover");
    let count = exec(&resources, &format!("SELECT count(*) AS n FROM {t}")).await;
    assert_eq!(count, json!([{"n": 2}]));
    exec(&resources, &format!("DROP TABLE {t}")).await;
}
