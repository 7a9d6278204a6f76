//! The PostgreSQL connectors against the real server on 127.0.0.1:5432 (database `test`):
//! the `sql` processor and sink, `postgres_poll`, `postgres_outbox` and `postgres_listen`.
#![cfg(feature = "postgres")]
// Test helpers outside #[test] fns may panic on a broken fixture: that is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::needless_pass_by_value
)]

mod common;
mod sql_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestDispatch, source_ctx};
use serde_json::{Value, json};
use sluice_core::{ComponentHealth, ErrorKind, Failure, Message, Resources};
use sluice_testkit::unique;
use sql_support::*;

const ADDR: &str = "127.0.0.1:5432";
const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

async fn up() -> bool {
    sluice_testkit::service("PostgreSQL", ADDR).await
}

async fn admin() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(
        "host=127.0.0.1 port=5432 user=postgres dbname=test",
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    client
}

#[tokio::test]
async fn sql_processor_binds_params_and_maps_types() {
    if !up().await {
        return;
    }
    let db = admin().await;
    let t = unique("sluice_sqlp");
    db.batch_execute(&format!(
        "CREATE TABLE {t} (id int PRIMARY KEY, tenant text, price numeric(10,2), ok bool,
          at timestamptz, day date, doc jsonb, raw bytea, big bigint, ratio float8, u uuid, tags text[], nothing text);
         INSERT INTO {t} VALUES (1, 'acme', 12.50, true, '2024-05-01T10:00:00Z', '2024-05-01',
          '{{\"k\": [1, 2]}}', '\\x0102ff', 9007199254740993, 0.25, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{{a,b}}', NULL),
          (2, 'other', 1, false, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);"
    ))
    .await
    .unwrap();
    let resources = Arc::new(Resources::default());
    let step = processor(
        json!({
            "url": URL,
            "query": format!("SELECT * FROM {t} WHERE id = $1 AND tenant = $2"),
            "params": [".id", "$headers.tenant"],
            "mode": "first",
            "into": "row"
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
        json!({"id": 1, "row": {
            "id": 1, "tenant": "acme", "price": 12.5, "ok": true, "at": "2024-05-01T10:00:00Z",
            "day": "2024-05-01", "doc": {"k": [1, 2]}, "raw": "AQL/", "big": 9007199254740993_i64,
            "ratio": 0.25, "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "tags": ["a", "b"], "nothing": null
        }})
    );
    // The tenant header does not match: no row, `first` gives null.
    let out = run_step(
        &step,
        Message::json(json!({"id": 1})).with_header("tenant", "other"),
    )
    .await
    .unwrap();
    assert_eq!(out["row"], Value::Null);

    // A hostile value is bound, never spliced: it matches nothing and drops nothing.
    let rows = processor(
        json!({"url": URL, "query": format!("SELECT id FROM {t} WHERE tenant = $1 ORDER BY id"), "params": ["."]}),
        &resources,
    );
    let out = run_step(
        &rows,
        Message::json(json!(format!("x'; DROP TABLE {t}; --"))),
    )
    .await
    .unwrap();
    assert_eq!(out, json!([]));

    // Count of affected rows; a timestamp parameter parsed from RFC 3339.
    let update = processor(
        json!({"url": URL, "query": format!("UPDATE {t} SET at = $1 WHERE id <= $2"), "params": [".at", ".upto"], "mode": "count"}),
        &resources,
    );
    let out = run_step(
        &update,
        Message::json(json!({"at": "2025-01-02T03:04:05+01:00", "upto": 2})),
    )
    .await
    .unwrap();
    assert_eq!(out, json!(2));
    let all = processor(
        json!({"url": URL, "query": format!("SELECT id, at FROM {t} ORDER BY id")}),
        &resources,
    );
    let out = run_step(&all, Message::json(json!(null))).await.unwrap();
    assert_eq!(
        out,
        json!([{"id": 1, "at": "2025-01-02T02:04:05Z"}, {"id": 2, "at": "2025-01-02T02:04:05Z"}])
    );

    // Wrong parameter count and a value of the wrong type are the message's fault.
    let err = run_step(
        &update,
        Message::json(json!({"at": "not a time", "upto": 1})),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidInput, "{err}");
    let mismatched = processor(
        json!({"url": URL, "query": format!("SELECT * FROM {t} WHERE id = $1"), "params": []}),
        &resources,
    );
    let err = run_step(&mismatched, Message::json(json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidInput);
    assert!(err.detail.contains("1 placeholders"), "{err}");
    db.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
}

#[tokio::test]
async fn statement_timeout_cuts_a_slow_query() {
    if !up().await {
        return;
    }
    let resources = Arc::new(Resources::default());
    let step = processor(
        json!({"url": URL, "query": "SELECT pg_sleep(5)", "statement_timeout": "200ms"}),
        &resources,
    );
    let started = std::time::Instant::now();
    let err = run_step(&step, Message::json(json!(null)))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Timeout, "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn sink_batches_concurrent_deliveries_into_few_transactions() {
    if !up().await {
        return;
    }
    let db = admin().await;
    let t = unique("sluice_sink");
    db.batch_execute(&format!(
        "CREATE TABLE {t} (id int PRIMARY KEY, name text NOT NULL, doc jsonb, at timestamptz)"
    ))
    .await
    .unwrap();
    let resources = Arc::new(Resources::default());
    let sink = sink(
        json!({"url": URL, "table": t, "columns": ["id", "name", "doc", "at"], "batch_size": 100, "batch_wait": "20ms"}),
        &resources,
    );
    let mut tasks = Vec::new();
    for i in 0..300 {
        let sink = Arc::clone(&sink);
        tasks.push(tokio::spawn(async move {
            let msg = Message::json(json!({
                "id": i, "name": format!("n\t{i}\\"), "doc": {"i": i}, "at": "2024-01-01T00:00:00Z", "extra": 1
            }));
            sink.deliver(&msg).await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let row = db
        .query_one(
            &format!("SELECT count(*), count(DISTINCT xmin::text) FROM {t}"),
            &[],
        )
        .await
        .unwrap();
    let (rows, transactions): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(rows, 300);
    assert!(
        transactions <= 10,
        "300 concurrent rows took {transactions} transactions"
    );
    let row = db
        .query_one(&format!("SELECT name, doc FROM {t} WHERE id = 7"), &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "n\t7\\");
    assert_eq!(row.get::<_, Value>(1), json!({"i": 7}));

    // A bad row (NULL in a NOT NULL column) fails alone; the rest of its batch commits.
    let mut tasks = Vec::new();
    for i in 1000..1010 {
        let sink = Arc::clone(&sink);
        tasks.push(tokio::spawn(async move {
            let name = if i == 1005 { Value::Null } else { json!("ok") };
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
    assert_eq!(failed, vec![1005]);
    let n: i64 = db
        .query_one(&format!("SELECT count(*) FROM {t} WHERE id >= 1000"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 9);
    db.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
}

#[tokio::test]
async fn sink_upserts_by_key_with_jq_columns() {
    if !up().await {
        return;
    }
    let db = admin().await;
    let t = unique("sluice_upsert");
    db.batch_execute(&format!(
        "CREATE TABLE {t} (id int PRIMARY KEY, name text, tenant text, cents bigint)"
    ))
    .await
    .unwrap();
    let resources = Arc::new(Resources::default());
    let sink = sink(
        json!({
            "url": URL, "table": t, "on_conflict": "upsert", "key": ["id"],
            "columns": {"id": ".id", "name": ".name", "tenant": "$headers.tenant", "cents": ".amount * 100 | floor"}
        }),
        &resources,
    );
    let deliver = |id: i64, name: &str, amount: f64| {
        let sink = Arc::clone(&sink);
        let msg = Message::json(json!({"id": id, "name": name, "amount": amount}))
            .with_header("tenant", "acme");
        async move { sink.deliver(&msg).await }
    };
    deliver(1, "first", 1.5).await.unwrap();
    // Same key twice in one batch, and an update of an existing row.
    let (a, b, c) = tokio::join!(
        deliver(1, "second", 2.0),
        deliver(1, "third", 3.0),
        deliver(2, "other", 0.1)
    );
    a.unwrap();
    b.unwrap();
    c.unwrap();
    let rows: Vec<(i32, String, String, i64)> = db
        .query(
            &format!("SELECT id, name, tenant, cents FROM {t} ORDER BY id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(rows[0].0, 1);
    assert!(rows[0].1 == "third" || rows[0].1 == "second", "{rows:?}");
    assert_eq!(rows[1], (2, "other".into(), "acme".into(), 10));
    assert_eq!(rows.len(), 2);

    // `ignore` keeps the existing row.
    let ignore = sink_named(
        json!({"url": URL, "table": t, "on_conflict": "ignore", "key": ["id"], "columns": ["id", "name"]}),
        &resources,
    );
    ignore
        .deliver(&Message::json(json!({"id": 2, "name": "changed"})))
        .await
        .unwrap();
    let name: String = db
        .query_one(&format!("SELECT name FROM {t} WHERE id = 2"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "other");
    db.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable_and_unhealthy_then_recovers() {
    if !up().await {
        return;
    }
    let proxy = sluice_testkit::proxy::TcpProxy::start(ADDR.parse().unwrap()).await;
    let url = format!("postgres://postgres@{}/test", proxy.addr());
    let db = admin().await;
    let t = unique("sluice_down");
    db.batch_execute(&format!("CREATE TABLE {t} (id int)"))
        .await
        .unwrap();
    let resources = Arc::new(Resources::default());
    let sink = sink(
        json!({"url": url, "table": t, "columns": ["id"], "connect_timeout": "1s"}),
        &resources,
    );
    proxy.down().await;
    let err = sink
        .deliver(&Message::json(json!({"id": 1})))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err}");
    assert!(err.detail.contains("PostgreSQL at postgres://"), "{err}");
    let problems = ComponentHealth::of(&resources).problems("test-flow");
    assert_eq!(problems.len(), 1, "{problems:?}");
    proxy.up().await;
    sink.deliver(&Message::json(json!({"id": 2})))
        .await
        .unwrap();
    assert!(
        ComponentHealth::of(&resources)
            .problems("test-flow")
            .is_empty()
    );
    db.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
}

/// Acks or nacks by the body's `id`; records the ids seen.
fn acking(nack: Arc<Mutex<Vec<i64>>>) -> Arc<TestDispatch> {
    TestDispatch::new(move |m: Message| {
        let nack = Arc::clone(&nack);
        async move {
            let id = m.body.json().unwrap()["id"].as_i64().unwrap_or(-1);
            let mut bad = nack.lock().unwrap();
            if let Some(at) = bad.iter().position(|n| *n == id) {
                bad.remove(at);
                drop(bad);
                m.nack("test says no");
                return Err(Failure::new(
                    Message::json(json!(null)),
                    sluice_core::ProcessError::new(ErrorKind::Remote, "no"),
                ));
            }
            drop(bad);
            m.ack();
            Ok(vec![])
        }
    })
}

fn sorted(mut v: Vec<i64>) -> Vec<i64> {
    v.sort_unstable();
    v
}

fn ids(dispatch: &TestDispatch) -> Vec<i64> {
    dispatch
        .seen()
        .iter()
        .map(|m| m.body.json().unwrap()["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn poll_source_resumes_after_the_acked_watermark() {
    if !up().await {
        return;
    }
    let db = admin().await;
    let t = unique("sluice_poll");
    db.batch_execute(&format!(
        "CREATE TABLE {t} (id int PRIMARY KEY, v text); INSERT INTO {t} SELECT g, 'v' || g FROM generate_series(1, 5) g"
    ))
    .await
    .unwrap();
    let store = MemoryCheckpoints::default();
    let config = json!({
        "url": URL, "query": format!("SELECT * FROM {t} WHERE id > $1 ORDER BY id LIMIT 3"),
        "watermark": "id", "initial": 0, "interval": "50ms", "checkpoint": t.clone()
    });
    // First run: row 4 is nacked once, so the watermark stops at 3 and 4 comes again.
    let resources = store.resources();
    let nack = Arc::new(Mutex::new(vec![4]));
    let dispatch = acking(Arc::clone(&nack));
    let source = build_source_named("postgres_poll", config.clone(), &resources);
    let (ctx, shutdown) = source_ctx(dispatch.clone(), &resources, "polls");
    let task = tokio::spawn(source.run(ctx));
    wait_until("rows 1..5, then 4 and 5 again", || {
        ids(&dispatch).len() >= 7
    })
    .await;
    wait_until("watermark 5", || store.value(&t) == Some(json!(5))).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    // The test dispatcher records in the tasks that run the messages, so only the multiset is
    // checked here; the conformance suite checks order through the real engine.
    assert_eq!(sorted(ids(&dispatch)), vec![1, 2, 3, 4, 4, 5, 5]);
    // A restart reads only the rows after the stored watermark.
    db.batch_execute(&format!("INSERT INTO {t} VALUES (6, 'v6'), (7, 'v7')"))
        .await
        .unwrap();
    let resources = store.resources();
    let dispatch = acking(Arc::default());
    let source = build_source_named("postgres_poll", config, &resources);
    let (ctx, shutdown) = source_ctx(dispatch.clone(), &resources, "polls");
    let task = tokio::spawn(source.run(ctx));
    wait_until("rows 6, 7", || ids(&dispatch).len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(sorted(ids(&dispatch)), vec![6, 7]);
    let six = dispatch
        .seen()
        .into_iter()
        .find(|m| m.body.json().unwrap()["id"] == json!(6))
        .unwrap();
    assert_eq!(
        six.headers.get("postgres.watermark").map(String::as_str),
        Some("6")
    );
    assert_eq!(six.body.json().unwrap()["v"], json!("v6"));
    db.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
}

async fn outbox_table(db: &tokio_postgres::Client, t: &str, n: i32) {
    db.batch_execute(&format!(
        "CREATE TABLE {t} (id bigserial PRIMARY KEY, payload jsonb NOT NULL, headers jsonb,
           created_at timestamptz NOT NULL DEFAULT now(), done_at timestamptz);
         INSERT INTO {t} (payload, headers)
           SELECT jsonb_build_object('id', g), jsonb_build_object('tenant', 'acme', 'n', g) FROM generate_series(1, {n}) g"
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn outbox_delivers_in_id_order_and_deletes_only_acked_rows() {
    if !up().await {
        return;
    }
    let db = admin().await;
    let t = unique("sluice_outbox");
    outbox_table(&db, &t, 6).await;
    let resources = Arc::new(Resources::default());
    let nack = Arc::new(Mutex::new(vec![3]));
    let dispatch = acking(Arc::clone(&nack));
    let source = build_source_named(
        "postgres_outbox",
        json!({"url": URL, "table": t, "batch_size": 4, "interval": "50ms"}),
        &resources,
    );
    let (ctx, shutdown) = source_ctx(dispatch.clone(), &resources, "outbox");
    let task = tokio::spawn(source.run(ctx));
    let db_count = || async {
        db.query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    for _ in 0..100 {
        if db_count().await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(db_count().await, 0);
    let seen = ids(&dispatch);
    // The nacked row stays and comes again with the next batch (order: see the poll test).
    assert_eq!(sorted(seen), vec![1, 2, 3, 3, 4, 5, 6]);
    let seen = dispatch.seen();
    let first = seen
        .iter()
        .find(|m| m.body.json().unwrap()["id"] == json!(1))
        .unwrap();
    assert_eq!(
        first.headers.get("tenant").map(String::as_str),
        Some("acme")
    );
    assert_eq!(first.headers.get("n").map(String::as_str), Some("1"));
    assert_eq!(
        first.headers.get("outbox.id").map(String::as_str),
        Some("1")
    );
    assert!(first.headers.contains_key("outbox.created_at"));
    db.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
}

#[tokio::test]
async fn two_outbox_readers_share_the_rows_without_duplicates() {
    if !up().await {
        return;
    }
    let db = admin().await;
    let t = unique("sluice_outbox2");
    outbox_table(&db, &t, 200).await;
    let resources = Arc::new(Resources::default());
    let dispatch = TestDispatch::new(|m: Message| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        m.ack();
        Ok(vec![])
    });
    let mut tasks = Vec::new();
    let mut stops = Vec::new();
    for _ in 0..2 {
        let source = build_source_named(
            "postgres_outbox",
            json!({"url": URL, "table": t, "batch_size": 10, "interval": "20ms", "on_ack": "mark"}),
            &resources,
        );
        let (ctx, shutdown) = source_ctx(dispatch.clone(), &resources, "outbox");
        tasks.push(tokio::spawn(source.run(ctx)));
        stops.push(shutdown);
    }
    wait_until("200 rows", || dispatch.count() >= 200).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stops.iter().for_each(|s| s.cancel());
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let mut seen = ids(&dispatch);
    seen.sort_unstable();
    assert_eq!(seen, (1..=200).collect::<Vec<_>>());
    let open: i64 = db
        .query_one(
            &format!("SELECT count(*) FROM {t} WHERE done_at IS NULL"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 0);
    db.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
}

#[tokio::test]
async fn listen_turns_notifications_into_messages() {
    if !up().await {
        return;
    }
    let db = admin().await;
    let channel = unique("sluice_chan");
    let resources = Arc::new(Resources::default());
    let dispatch = TestDispatch::echo();
    let source = build_source_named(
        "postgres_listen",
        json!({"url": URL, "channels": [channel.clone(), "sluice_other"]}),
        &resources,
    );
    let (ctx, shutdown) = source_ctx(dispatch.clone(), &resources, "listen");
    let task = tokio::spawn(source.run(ctx));
    // LISTEN is in place once the source reports healthy and has run its statement; retry the
    // first notification until it arrives.
    for i in 0..50 {
        db.execute(
            "SELECT pg_notify($1, $2)",
            &[&channel, &format!("hello {i}")],
        )
        .await
        .unwrap();
        if dispatch.count() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_until("a notification", || dispatch.count() > 0).await;
    let before = dispatch.count();
    db.execute("SELECT pg_notify($1, 'last')", &[&channel])
        .await
        .unwrap();
    let _ = before;
    wait_until("the last notification", || {
        dispatch.seen().iter().any(|m| m.body.to_text() == "last")
    })
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    // Messages are recorded by the tasks that run them, so not necessarily in arrival order.
    let seen = dispatch.seen();
    let last = seen.iter().find(|m| m.body.to_text() == "last").unwrap();
    assert_eq!(
        last.headers.get("postgres.channel").map(String::as_str),
        Some(channel.as_str())
    );
    assert!(last.headers.contains_key("postgres.pid"));
}

/// Throughput of the `sql` sink against a hand-written tokio-postgres loop writing the same rows
/// in COPY batches of the same size. Run with
/// `cargo test --release -p sluice-connectors --features postgres --test postgres -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_sink_against_hand_written_copy() {
    if !up().await {
        return;
    }
    const ROWS: usize = 50_000;
    const BATCH: usize = 500;
    let db = admin().await;
    let t = unique("sluice_bench");
    db.batch_execute(&format!(
        "CREATE UNLOGGED TABLE {t} (id bigint, name text, amount float8, doc jsonb)"
    ))
    .await
    .unwrap();
    let body = |i: usize| json!({"id": i, "name": format!("customer {i}"), "amount": i as f64 * 0.5, "doc": {"i": i, "tags": ["a", "b"]}});

    // Hand-written: one connection, COPY text batches, one transaction each.
    let mut hand = admin().await;
    let started = std::time::Instant::now();
    for chunk in (0..ROWS).collect::<Vec<_>>().chunks(BATCH) {
        let mut data = String::new();
        for &i in chunk {
            let b = body(i);
            data.push_str(&format!(
                "{}\t{}\t{}\t{}\n",
                b["id"],
                b["name"].as_str().unwrap(),
                b["amount"],
                b["doc"]
            ));
        }
        let tx = hand.transaction().await.unwrap();
        let sink = tx
            .copy_in::<_, bytes::Bytes>(&format!("COPY {t} (id, name, amount, doc) FROM STDIN"))
            .await
            .unwrap();
        futures_util::pin_mut!(sink);
        futures_util::SinkExt::send(&mut sink, bytes::Bytes::from(data))
            .await
            .unwrap();
        sink.finish().await.unwrap();
        tx.commit().await.unwrap();
    }
    let hand_rate = ROWS as f64 / started.elapsed().as_secs_f64();

    // The sink, fed by 1000 concurrent deliveries as a flow with that concurrency would.
    let resources = Arc::new(Resources::default());
    let sink = sink(
        json!({"url": URL, "table": t, "columns": ["id", "name", "amount", "doc"], "batch_size": BATCH}),
        &resources,
    );
    let messages: Vec<Message> = (0..ROWS).map(|i| Message::json(body(i))).collect();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let messages = Arc::new(messages);
    let started = std::time::Instant::now();
    let mut workers = Vec::new();
    for _ in 0..1000 {
        let (sink, next, messages) = (Arc::clone(&sink), Arc::clone(&next), Arc::clone(&messages));
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= ROWS {
                    break;
                }
                sink.deliver(&messages[i]).await.unwrap();
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let sink_rate = ROWS as f64 / started.elapsed().as_secs_f64();
    let n: i64 = db
        .query_one(&format!("SELECT count(*) FROM {t}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2 * ROWS as i64);
    println!(
        "hand-written COPY: {hand_rate:.0} rows/s; sql sink: {sink_rate:.0} rows/s; ratio {:.2}",
        sink_rate / hand_rate
    );
    db.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
}

#[tokio::test]
async fn sslmode_require_uses_rustls_and_verifies_the_certificate() {
    if !up().await {
        return;
    }
    let db = admin().await;
    let ssl: String = db.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    if ssl != "on" {
        eprintln!("SKIPPED: this PostgreSQL has ssl off");
        return;
    }
    // The server's certificate (Debian's self-signed snakeoil) is not signed by a public root:
    // the handshake must fail on verification, never fall back to plain text.
    let resources = Arc::new(Resources::default());
    let step = processor(
        json!({"url": format!("{URL}?sslmode=require"), "query": "SELECT 1 AS one"}),
        &resources,
    );
    let err = run_step(&step, Message::json(json!(null)))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err}");
    assert!(
        err.detail.to_lowercase().contains("certificate") || err.detail.contains("tls"),
        "{err}"
    );
}

#[tokio::test]
async fn listen_reconnects_after_the_connection_is_cut() {
    if !up().await {
        return;
    }
    let proxy = sluice_testkit::proxy::TcpProxy::start(ADDR.parse().unwrap()).await;
    let db = admin().await;
    let channel = unique("sluice_rechan");
    let resources = Arc::new(Resources::default());
    let dispatch = TestDispatch::echo();
    let source = build_source_named(
        "postgres_listen",
        json!({"url": format!("postgres://postgres@{}/test", proxy.addr()), "channels": [channel.clone()]}),
        &resources,
    );
    let (ctx, shutdown) = source_ctx(dispatch.clone(), &resources, "listen");
    let task = tokio::spawn(source.run(ctx));
    let notify_until_seen = |payload: &'static str| {
        let (db, channel, dispatch) = (&db, &channel, &dispatch);
        async move {
            for _ in 0..100 {
                db.execute("SELECT pg_notify($1, $2)", &[channel, &payload])
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                if dispatch.seen().iter().any(|m| m.body.to_text() == payload) {
                    return;
                }
            }
            panic!("`{payload}` never arrived");
        }
    };
    notify_until_seen("before").await;
    proxy.refuse().await;
    wait_until("unhealthy while cut off", || {
        !ComponentHealth::of(&resources)
            .problems("listen")
            .is_empty()
    })
    .await;
    proxy.up().await;
    notify_until_seen("after").await;
    wait_until("healthy again", || {
        ComponentHealth::of(&resources)
            .problems("listen")
            .is_empty()
    })
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn poll_source_waits_for_an_unreachable_database_without_stopping() {
    let store = MemoryCheckpoints::default();
    let resources = store.resources();
    let source = build_source_named(
        "postgres_poll",
        json!({"url": "postgres://postgres@127.0.0.1:1/test", "query": "SELECT 1 AS id WHERE $1::int IS NOT NULL",
               "watermark": "id", "initial": 0, "connect_timeout": "1s"}),
        &resources,
    );
    let dispatch = TestDispatch::echo();
    let (ctx, shutdown) = source_ctx(dispatch.clone(), &resources, "polls");
    let task = tokio::spawn(source.run(ctx));
    wait_until("unhealthy", || {
        ComponentHealth::of(&resources)
            .problems("polls")
            .iter()
            .any(|(_, reason)| reason.contains("127.0.0.1:1"))
    })
    .await;
    assert!(!task.is_finished(), "the source must keep retrying");
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(dispatch.count(), 0);
}
