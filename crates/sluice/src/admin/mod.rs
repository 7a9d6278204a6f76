//! The admin HTTP API: what operators and monitoring ask a running Sluice.
//!
//! * `GET /metrics`: every counter in the Prometheus text format (flows, circuit breakers).
//! * `GET /health`: each flow's health as JSON, and the durable store's once it is open; 200
//!   when no flow has failed or is unhealthy (a component that cannot reach its service) and the
//!   store is not degraded (its disk reserve in use: the disk is full), 503 otherwise, so a
//!   load balancer or an orchestrator's probe can use it as is.
//! * `/dlq`: the dead-letter store (`dlq.rs`): list, show, delete and replay letters.
//!
//! It listens on its own address (`sluice run --admin ADDR`), apart from the flows' listeners,
//! so it can stay on loopback while flows face the network. It has no authentication: whoever
//! reaches the address can delete and replay dead letters, hence off by default and meant for
//! loopback or a protected network (docs/operations.md).

mod dlq;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use sluice_core::Resources;
use sluice_engine::durable::DurableStore;
use sluice_engine::flow::Flow;
use sluice_engine::metrics;
use sluice_engine::runtime::{Health, HealthBoard, Runtime};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A slow client may not hold a connection open without sending its request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin API reports on.
#[derive(Clone)]
pub struct AdminState {
    /// The runtime's shared resources, where the counters live.
    pub resources: Arc<Resources>,
    /// Every flow's health.
    pub health: HealthBoard,
    /// The running flows by name: where dead letters are replayed.
    pub flows: Arc<FlowDirectory>,
}

/// The running flows by name.
pub type FlowDirectory = BTreeMap<String, Arc<Flow>>;

impl AdminState {
    /// What the admin API needs of a running `runtime`.
    pub fn new(runtime: &Runtime) -> Self {
        let flows = runtime
            .flows()
            .iter()
            .map(|(name, flow)| (name.clone(), Arc::clone(flow)))
            .collect();
        AdminState {
            resources: Arc::clone(runtime.resources()),
            health: runtime.health_board(),
            flows: Arc::new(flows),
        }
    }
}

/// The admin API could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for the admin API: {source}; pick another address with --admin")]
pub struct AdminError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds `addr` and serves the admin API until `stop` is cancelled. Returns the bound address
/// (useful with port 0) once the listener is up.
pub async fn serve(
    addr: SocketAddr,
    state: AdminState,
    stop: CancellationToken,
) -> Result<SocketAddr, AdminError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| AdminError { addr, source })?;
    tracing::info!(listen = %local, "admin API listening: /metrics, /health, /dlq");
    tokio::spawn(accept_loop(listener, Arc::new(state), stop));
    Ok(local)
}

async fn accept_loop(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "admin API: accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = Arc::clone(&state);
        let service = service_fn(move |req| {
            let state = Arc::clone(&state);
            async move { Ok::<_, Infallible>(route(&state, req).await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                result = conn => if let Err(error) = result {
                    tracing::debug!(%peer, %error, "admin connection ended with an error");
                },
            }
        });
    }
}

async fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path == "/dlq" || path.starts_with("/dlq/") {
        return dlq::route(state, req).await;
    }
    let known = matches!(path, "/metrics" | "/health");
    if known && req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "application/json",
            json!({"error": format!("{path} only answers GET")}).to_string(),
        );
    }
    match path {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics::render(&state.resources),
        ),
        "/health" => health(&state.health, &state.resources),
        _ => reply(
            StatusCode::NOT_FOUND,
            "application/json",
            json!({"error": format!("no admin endpoint at {path}; try /metrics, /health or /dlq")})
                .to_string(),
        ),
    }
}

fn health(board: &HealthBoard, resources: &Resources) -> Response<Full<Bytes>> {
    let flows = board.snapshot();
    let store = resources
        .get_or_default::<DurableStore>()
        .reserve_in_use()
        .map(|in_use| {
            if in_use {
                json!({
                    "state": "degraded",
                    "error": "the disk of the data directory is full: new messages are refused \
(503, nack) while consumers drain on the disk reserve; free space on that disk, and the store \
takes messages again by itself",
                })
            } else {
                json!({"state": "ok"})
            }
        });
    let store_degraded = store.as_ref().is_some_and(|s| s["state"] == "degraded");
    let failed = store_degraded
        || flows
            .values()
            .any(|h| matches!(h, Health::Failed(_) | Health::Unhealthy(_)));
    let report: serde_json::Map<String, serde_json::Value> = flows
        .into_iter()
        .map(|(name, h)| {
            let entry = match h {
                Health::Running => json!({"state": "running"}),
                Health::Stopped => json!({"state": "stopped"}),
                Health::Failed(error) => json!({"state": "failed", "error": error}),
                Health::Unhealthy(error) => json!({"state": "unhealthy", "error": error}),
            };
            (name, entry)
        })
        .collect();
    let (status, summary) = if failed {
        (StatusCode::SERVICE_UNAVAILABLE, "degraded")
    } else {
        (StatusCode::OK, "ok")
    };
    let mut body = json!({"status": summary, "flows": report});
    if let Some(store) = store {
        body["store"] = store;
    }
    reply(status, "application/json", body.to_string())
}

pub(crate) fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert("content-type", value);
    }
    response
}
