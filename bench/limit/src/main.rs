//! The hand-written limit for bench/ W1 and W2: parse the order, add `processed`, uppercase the
//! customer's name, sum the line items, reply (W2: append the result as a JSON line first).
//!
//! Usage: sluice-bench-limit PORT [JSONL_PATH]

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

type Out = Option<Arc<Mutex<tokio::fs::File>>>;

fn transform(mut order: Value) -> Option<Value> {
    let total: f64 = order
        .get("items")?
        .as_array()?
        .iter()
        .map(|i| i["qty"].as_f64().unwrap_or(0.0) * i["price"].as_f64().unwrap_or(0.0))
        .sum();
    let obj = order.as_object_mut()?;
    obj.insert("processed".into(), Value::Bool(true));
    obj.insert("total".into(), total.into());
    let customer = obj.get_mut("customer")?.as_object_mut()?;
    let name = customer.get("name")?.as_str()?.to_uppercase();
    customer.insert("name".into(), Value::String(name));
    Some(order)
}

async fn handle(req: Request<Incoming>, out: Out) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let Ok(body) = req.into_body().collect().await else {
        return reply(StatusCode::BAD_REQUEST, Bytes::from_static(b"bad body"));
    };
    let Some(result) = serde_json::from_slice(&body.to_bytes()).ok().and_then(transform) else {
        return reply(StatusCode::BAD_REQUEST, Bytes::from_static(b"bad order"));
    };
    let mut text = serde_json::to_vec(&result).unwrap_or_default();
    if path == "/w2" {
        let Some(file) = &out else {
            return reply(StatusCode::NOT_FOUND, Bytes::from_static(b"no file"));
        };
        text.push(b'\n');
        if file.lock().await.write_all(&text).await.is_err() {
            return reply(StatusCode::INTERNAL_SERVER_ERROR, Bytes::from_static(b"write"));
        }
        text.pop();
    }
    reply(StatusCode::OK, Bytes::from(text))
}

fn reply(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    r
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(18081);
    let out: Out = match args.next() {
        Some(path) => Some(Arc::new(Mutex::new(
            tokio::fs::OpenOptions::new().create(true).append(true).open(path).await?,
        ))),
        None => None,
    };
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let out = out.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let out = out.clone();
                async move { Ok::<_, Infallible>(handle(req, out).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
