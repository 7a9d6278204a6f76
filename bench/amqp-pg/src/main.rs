//! The AMQP -> transform -> PostgreSQL workload, by hand: the limit Sluice's flow is compared
//! with (bench/amqp_pg.py runs both side by side).
//!
//!   sluice-bench-amqp-pg publish QUEUE COUNT     loads QUEUE with COUNT orders of about 1 KiB
//!   sluice-bench-amqp-pg limit QUEUE TABLE COUNT drains QUEUE into TABLE, exits after COUNT rows
//!
//! `limit` does the same work as bench/flows/amqp-pg.yaml: prefetch 1000, parse each order,
//! compute `customer` upper-cased and `total`, insert up to 500 rows per transaction as one
//! multi-row INSERT, and ack (multiple) only after the commit. One batch in flight at a time.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio_postgres::types::ToSql;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const PG: &str = "host=127.0.0.1 user=postgres dbname=test";
const BATCH: usize = 500;
const PREFETCH: u16 = 1000;
const LINGER: Duration = Duration::from_millis(5);

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("publish") => publish(&args[2], args[3].parse()?).await,
        Some("limit") => limit(&args[2], &args[3], args[4].parse()?).await,
        _ => Err("usage: publish QUEUE COUNT | limit QUEUE TABLE COUNT".into()),
    }
}

/// An order of about 1 KiB.
pub fn order(n: usize) -> Value {
    json!({
        "id": n,
        "customer": format!("customer-{}", n % 997),
        "items": (0..8).map(|i| json!({"sku": format!("SKU-{:05}", (n + i) % 10_000), "qty": 1 + i % 3, "price": 2.5 + i as f64})).collect::<Vec<_>>(),
        "note": "x".repeat(520),
    })
}

async fn publish(queue: &str, count: usize) -> Result<(), Error> {
    let conn = Connection::connect(AMQP, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .queue_declare(queue.into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
        .await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    for chunk in (0..count).collect::<Vec<_>>().chunks(1000) {
        for &n in chunk {
            let body = serde_json::to_vec(&order(n))?;
            channel
                .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), &body, props.clone())
                .await?;
        }
        channel.wait_for_confirms().await?;
    }
    Ok(())
}

/// What the flow's transform computes.
fn transform(body: &[u8]) -> Result<(i64, String, f64, Value), Error> {
    let order: Value = serde_json::from_slice(body)?;
    let id = order["id"].as_i64().ok_or("no id")?;
    let customer = order["customer"].as_str().ok_or("no customer")?.to_uppercase();
    let total = order["items"]
        .as_array()
        .ok_or("no items")?
        .iter()
        .map(|i| i["qty"].as_f64().unwrap_or(0.0) * i["price"].as_f64().unwrap_or(0.0))
        .sum();
    Ok((id, customer, total, order))
}

async fn limit(queue: &str, table: &str, count: usize) -> Result<(), Error> {
    let (client, connection) = tokio_postgres::connect(PG, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let conn = Connection::connect(AMQP, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(queue.into(), "limit".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let began = Instant::now();
    let mut inserted = 0;
    let mut client = client;
    while inserted < count {
        let mut batch = Vec::with_capacity(BATCH);
        let first = consumer.next().await.ok_or("consumer ended")??;
        batch.push(first);
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(d)) => batch.push(d?),
                _ => break,
            }
        }
        let rows: Vec<(i64, String, f64, Value)> =
            batch.iter().map(|d| transform(&d.data)).collect::<Result<_, _>>()?;
        let mut sql = format!("INSERT INTO {table} (id, customer, total, payload) VALUES ");
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(rows.len() * 4);
        for (i, (id, customer, total, payload)) in rows.iter().enumerate() {
            if i > 0 {
                sql.push(',');
            }
            let b = i * 4;
            sql.push_str(&format!("(${},${},${},${})", b + 1, b + 2, b + 3, b + 4));
            params.extend([id as &(dyn ToSql + Sync), customer, total, payload]);
        }
        let tx = client.transaction().await?;
        tx.execute(sql.as_str(), &params).await?;
        tx.commit().await?;
        if let Some(last) = batch.last() {
            channel
                .basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
        }
        inserted += batch.len();
    }
    let secs = began.elapsed().as_secs_f64();
    println!("{{\"rows\": {inserted}, \"seconds\": {secs:.3}, \"rate\": {:.0}}}", inserted as f64 / secs);
    Ok(())
}
