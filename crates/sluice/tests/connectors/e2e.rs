//! `examples/connectors/orders-e2e.yaml` against the real RabbitMQ, PostgreSQL and NATS: orders
//! posted over HTTP end up as rows, each announced on NATS. The example is run as written, with
//! its port, exchange, queue, table and subject renamed so runs never share them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::conformance::Sluice;
use crate::support;

const ORDERS: usize = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_flow_from_http_through_rabbitmq_into_postgres_and_out_on_nats() {
    for (service, addr) in [
        ("RabbitMQ", "127.0.0.1:5672"),
        ("PostgreSQL", "127.0.0.1:5432"),
        ("NATS", "127.0.0.1:4222"),
    ] {
        if !sluice_testkit::service(service, addr).await {
            return;
        }
    }
    let tag = sluice_testkit::unique("e2e");
    let port = support::free_port();
    let (table, queue, exchange, subject) = (
        format!("orders_{tag}"),
        format!("orders.store.{tag}"),
        format!("shop_{tag}"),
        format!("events.{tag}.order_stored"),
    );
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/connectors/orders-e2e.yaml"
    ))
    .unwrap();
    let yaml = example
        .replace("127.0.0.1:8082", &format!("127.0.0.1:{port}"))
        .replace("shop_orders", &table)
        .replace("shop.orders.store", &queue)
        .replace("shop.events.order_stored", &subject)
        .replace("name: shop,", &format!("name: {exchange},"))
        .replace("exchange: shop\n", &format!("exchange: {exchange}\n"))
        .replace("exchange: shop,", &format!("exchange: {exchange},"));
    assert_eq!(
        yaml.matches(&exchange).count(),
        5,
        "the example's exchange moved:\n{yaml}"
    );

    let (pg, connection) = tokio_postgres::connect(
        "host=127.0.0.1 user=postgres dbname=test",
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    pg.batch_execute(&format!(
        "create table {table} (id bigint primary key, customer text not null, \
         total double precision not null, payload jsonb not null)"
    ))
    .await
    .unwrap();
    let nats = async_nats::connect("127.0.0.1:4222").await.unwrap();
    let mut events = nats.subscribe(subject.clone()).await.unwrap();
    nats.flush().await.unwrap();

    let runtime = Sluice::start(&yaml);
    runtime.wait_for_port(port);
    for id in 0..ORDERS {
        let order = json!({
            "id": id,
            "customer": format!("customer {id}"),
            "items": [{"sku": "A-1", "qty": id % 3 + 1, "price": 2.5}, {"sku": "B-2", "qty": 1, "price": 1}]
        });
        let reply = post(port, &order.to_string()).await;
        assert_eq!(
            reply.status,
            202,
            "{}; log:\n{}",
            String::from_utf8_lossy(&reply.body),
            runtime.log_tail()
        );
    }
    // Refused at the door: never published, never stored.
    let bad = post(port, r#"{"id": 999, "customer": "x", "items": []}"#).await;
    assert_eq!(bad.status, 400, "{}", String::from_utf8_lossy(&bad.body));

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut announced: BTreeMap<i64, Value> = BTreeMap::new();
    while announced.len() < ORDERS {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(event)) = tokio::time::timeout(left, events.next()).await else {
            panic!(
                "{} of {ORDERS} events on NATS; log:\n{}",
                announced.len(),
                runtime.log_tail()
            );
        };
        let body: Value = serde_json::from_slice(&event.payload).unwrap();
        announced.insert(body["id"].as_i64().unwrap(), body);
    }
    let rows = pg
        .query(
            &format!("select id, customer, total, payload from {table} order by id"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), ORDERS, "rows in {table}");
    for (n, row) in rows.iter().enumerate() {
        let id: i64 = row.get(0);
        let customer: String = row.get(1);
        let total: f64 = row.get(2);
        let payload: Value = row.get(3);
        assert_eq!(id, n as i64);
        assert_eq!(customer, format!("CUSTOMER {n}"));
        assert_eq!(total, ((n % 3 + 1) as f64) * 2.5 + 1.0);
        assert_eq!(payload["customer"], format!("customer {n}"));
        // The event is what was stored.
        assert_eq!(announced[&id]["total"], json!(total), "event of order {id}");
        assert_eq!(announced[&id]["customer"], json!(customer));
    }
    assert!(!announced.contains_key(&999));
    drop(runtime);
    pg.batch_execute(&format!("drop table {table}"))
        .await
        .unwrap();
}

async fn post(port: u16, body: &str) -> support::Reply {
    support::request(
        "POST",
        &format!("http://127.0.0.1:{port}/orders"),
        body.to_owned(),
    )
    .await
}
