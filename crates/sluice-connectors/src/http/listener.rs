//! Shared HTTP listeners: one hyper server per address, with a route table that every `http`
//! source on that address adds its routes to.
//!
//! **Lifecycle.** The first source on an address binds it; each source removes its routes when its
//! flow shuts down, after its in-flight requests have been answered; the last one stops the
//! server, which closes idle keep-alive connections and lets busy ones finish their response.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use sluice_core::{Body, Dispatch, ExchangePattern, Message};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::FullBody;
use super::problem::Problem;

/// How long a stopping server waits for open connections to finish their last response.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long a client may take to send the request head (slow-loris defence).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What one `http` source serves: a path, its methods and how to run the flow.
pub struct RouteConfig {
    /// The flow the route feeds.
    pub flow: Arc<str>,
    /// matchit path, e.g. `/orders/{id}`.
    pub path: String,
    /// Upper-case methods.
    pub methods: Vec<Method>,
    /// InOut waits for the flow; InOnly answers 202 at once.
    pub pattern: ExchangePattern,
    /// InOnly: answer 202 only once the flow finished and every target committed.
    pub wait_for_commit: bool,
    /// Largest accepted request body, in bytes.
    pub max_body: usize,
    /// Budget for one request: reading the body and running the flow.
    pub timeout: Duration,
    /// Entry point of the flow.
    pub dispatcher: Arc<dyn Dispatch>,
}

/// Why a route could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The address could not be resolved or bound.
    #[error(
        "cannot listen on `{listen}`: {source}; free the port or choose another `listen` address"
    )]
    Bind {
        /// The configured address.
        listen: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another flow already serves this method and path on this address.
    #[error(
        "{method} {path} on `{listen}` is already served by flow `{other}`; give one of the flows another path, method or listen address"
    )]
    Conflict {
        /// The method.
        method: String,
        /// The path.
        path: String,
        /// The address.
        listen: String,
        /// The flow that has it.
        other: Arc<str>,
    },
    /// The path clashes with another route's path in a way the router cannot tell apart.
    #[error(
        "path `{path}` on `{listen}` clashes with another flow's route: {reason}; use distinct paths"
    )]
    Path {
        /// The path.
        path: String,
        /// The address.
        listen: String,
        /// The router's explanation.
        reason: String,
    },
}

/// One registered route: its configuration and the requests it has in flight.
struct Route {
    config: RouteConfig,
    in_flight: TaskTracker,
}

type Methods = BTreeMap<String, Arc<Route>>;

/// The immutable route table a request is matched against.
#[derive(Default)]
struct Table {
    router: matchit::Router<Methods>,
}

#[derive(Default)]
struct State {
    routes: BTreeMap<String, Methods>,
    table: Arc<Table>,
}

/// One bound address and its routes.
struct Server {
    listen: String,
    local_addr: SocketAddr,
    state: Mutex<State>,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Every shared HTTP listener of the process, by configured `listen` address. Kept in
/// [`sluice_core::Resources`].
#[derive(Default)]
pub struct HttpListeners {
    servers: Mutex<HashMap<String, Arc<Server>>>,
}

impl std::fmt::Debug for HttpListeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpListeners")
            .field("addresses", &lock(&self.servers).keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Locks a mutex, recovering the value if a thread panicked while holding it: every update
/// below replaces whole values, so a poisoned map is still consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl HttpListeners {
    /// The address the listener configured as `listen` is bound to (useful with port 0).
    pub fn local_addr(&self, listen: &str) -> Option<SocketAddr> {
        lock(&self.servers).get(listen.trim()).map(|s| s.local_addr)
    }

    /// Adds `route` to the listener on `listen`, binding it first if no flow uses it yet.
    ///
    /// Must be called within a tokio runtime (the server task is spawned on it).
    pub fn register(
        self: &Arc<Self>,
        listen: &str,
        route: RouteConfig,
    ) -> Result<Registration, ListenError> {
        let listen = listen.trim().to_owned();
        let mut servers = lock(&self.servers);
        let server = match servers.get(&listen) {
            Some(server) => Arc::clone(server),
            None => {
                let server = bind(&listen)?;
                servers.insert(listen.clone(), Arc::clone(&server));
                server
            }
        };
        let route = Arc::new(Route {
            config: route,
            in_flight: TaskTracker::new(),
        });
        let added = server.add(&route);
        if added.is_err() && lock(&server.state).routes.is_empty() {
            // The failed route was going to be the first on a fresh listener: do not keep it bound.
            servers.remove(&listen);
            server.stop.cancel();
        }
        added?;
        Ok(Registration {
            listeners: Arc::clone(self),
            server,
            route,
            removed: false,
        })
    }

    /// Removes `route`; if it was the last on its server, unregisters the server and hands back
    /// its task for the caller to await.
    fn remove(&self, server: &Arc<Server>, route: &Arc<Route>) -> Option<JoinHandle<()>> {
        let mut servers = lock(&self.servers);
        let empty = server.remove(route);
        if !empty {
            return None;
        }
        if servers
            .get(&server.listen)
            .is_some_and(|s| Arc::ptr_eq(s, server))
        {
            servers.remove(&server.listen);
        }
        server.stop.cancel();
        lock(&server.task).take()
    }
}

/// Binds `listen` and starts its server task.
fn bind(listen: &str) -> Result<Arc<Server>, ListenError> {
    let err = |source| ListenError::Bind {
        listen: listen.to_owned(),
        source,
    };
    let addr = listen
        .to_socket_addrs()
        .map_err(err)?
        .next()
        .ok_or_else(|| {
            err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the host resolves to no address",
            ))
        })?;
    let std_listener = std::net::TcpListener::bind(addr).map_err(err)?;
    std_listener.set_nonblocking(true).map_err(err)?;
    let local_addr = std_listener.local_addr().map_err(err)?;
    let listener = TcpListener::from_std(std_listener).map_err(err)?;
    let server = Arc::new(Server {
        listen: listen.to_owned(),
        local_addr,
        state: Mutex::new(State::default()),
        stop: CancellationToken::new(),
        task: Mutex::new(None),
    });
    let task = tokio::spawn(serve(Arc::clone(&server), listener));
    *lock(&server.task) = Some(task);
    tracing::info!(listen, %local_addr, "http listener started");
    Ok(server)
}

/// A route's hold on its listener. Call [`Registration::close`] when the flow shuts down; dropping
/// it instead removes the route at once without waiting for in-flight requests.
pub struct Registration {
    listeners: Arc<HttpListeners>,
    server: Arc<Server>,
    route: Arc<Route>,
    removed: bool,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("listen", &self.server.listen)
            .field("path", &self.route.config.path)
            .finish()
    }
}

impl Registration {
    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr
    }

    /// Stops routing new requests to this flow, waits for its in-flight requests (and in_only
    /// dispatches) to finish, and stops the listener if no other flow uses it.
    pub async fn close(mut self) {
        self.removed = true;
        // New requests for this route get 404 from here on; requests already routed hold a
        // tracker token and are awaited below.
        let task = self.listeners.remove(&self.server, &self.route);
        self.route.in_flight.close();
        self.route.in_flight.wait().await;
        if let Some(task) = task {
            // The server task never panics; a join error only means the runtime is going away.
            let _ = task.await;
            tracing::info!(listen = %self.server.listen, "http listener stopped");
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if !self.removed {
            // Not closed (the source task was aborted): free the route and maybe the port now.
            let _ = self.listeners.remove(&self.server, &self.route);
        }
    }
}

impl Server {
    /// Adds every method of `route`, or none if any conflicts.
    fn add(&self, route: &Arc<Route>) -> Result<(), ListenError> {
        let mut state = lock(&self.state);
        let path = &route.config.path;
        let mut routes = state.routes.clone();
        let methods = routes.entry(path.clone()).or_default();
        for method in &route.config.methods {
            if let Some(other) = methods.get(method.as_str()) {
                return Err(ListenError::Conflict {
                    method: method.to_string(),
                    path: path.clone(),
                    listen: self.listen.clone(),
                    other: Arc::clone(&other.config.flow),
                });
            }
            methods.insert(method.to_string(), Arc::clone(route));
        }
        let table = build_table(&routes).map_err(|reason| ListenError::Path {
            path: path.clone(),
            listen: self.listen.clone(),
            reason,
        })?;
        state.routes = routes;
        state.table = Arc::new(table);
        Ok(())
    }

    /// Removes `route`; true when no route is left.
    fn remove(&self, route: &Arc<Route>) -> bool {
        let mut state = lock(&self.state);
        let path = &route.config.path;
        if let Some(methods) = state.routes.get_mut(path) {
            methods.retain(|_, r| !Arc::ptr_eq(r, route));
            if methods.is_empty() {
                state.routes.remove(path);
            }
        }
        // Removing routes cannot introduce a conflict, so rebuilding succeeds; keep the old
        // table in the impossible case it does not.
        if let Ok(table) = build_table(&state.routes) {
            state.table = Arc::new(table);
        }
        state.routes.is_empty()
    }

    fn table(&self) -> Arc<Table> {
        Arc::clone(&lock(&self.state).table)
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<FullBody> {
        let table = self.table();
        let path = req.uri().path().to_owned();
        let Ok(matched) = table.router.at(&path) else {
            return Problem::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no flow serves `{path}` on this address; check the url"),
            )
            .into_response();
        };
        let Some(route) = matched.value.get(req.method().as_str()) else {
            let allow = matched
                .value
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            let mut response = Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!(
                    "`{path}` does not accept {}; use one of: {allow}",
                    req.method()
                ),
            )
            .into_response();
            if let Ok(value) = HeaderValue::from_str(&allow) {
                response.headers_mut().insert(header::ALLOW, value);
            }
            return response;
        };
        let route = Arc::clone(route);
        let params: Vec<(String, String)> = matched
            .params
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        drop(table);
        // Held until the response is ready, so closing the route waits for this request.
        let _in_flight = route.in_flight.token();
        route.serve(req, params).await
    }
}

fn build_table(routes: &BTreeMap<String, Methods>) -> Result<Table, String> {
    let mut router = matchit::Router::new();
    for (path, methods) in routes {
        router
            .insert(path.clone(), methods.clone())
            .map_err(|e| e.to_string())?;
    }
    Ok(Table { router })
}

/// Checks that `path` is a valid route on its own (used when the flow is built).
pub fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!(
            "`{path}` does not start with `/`; write an absolute path such as `/orders/{{id}}`"
        ));
    }
    matchit::Router::new()
        .insert(path, ())
        .map_err(|e| format!("`{path}` is not a valid route ({e}); see the matchit syntax, e.g. `/orders/{{id}}` or `/files/{{*rest}}`"))
}

async fn serve(server: Arc<Server>, listener: TcpListener) {
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            biased;
            () = server.stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let srv = Arc::clone(&server);
                    let service = service_fn(move |req| {
                        let srv = Arc::clone(&srv);
                        async move { Ok::<_, Infallible>(srv.handle(req).await) }
                    });
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .keep_alive(true)
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service);
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        // Malformed requests and dropped clients end only their own connection.
                        if let Err(error) = conn.await {
                            tracing::debug!(%peer, %error, "http connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(listen = %server.listen, %error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(listen = %server.listen, "http connections still open after the shutdown grace period; closing them");
    }
}

/// 202 with the message id.
fn accepted(id: &str) -> Response<FullBody> {
    let body = serde_json::json!({ "id": id }).to_string();
    let mut response = Response::new(FullBody::new(Bytes::from(body)));
    *response.status_mut() = StatusCode::ACCEPTED;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// 504: the flow did not finish within the route's `timeout`.
fn timed_out(timeout: Duration, id: String) -> Response<FullBody> {
    let mut problem = Problem::new(
        StatusCode::GATEWAY_TIMEOUT,
        "timeout",
        format!(
            "the flow did not answer within {}; raise `timeout` or make the flow faster",
            sluice_core::duration::HumanDuration(timeout)
        ),
    );
    problem.kind = Some("timeout".into());
    problem.message_id = Some(id);
    problem.into_response()
}

impl Route {
    async fn serve(
        self: &Arc<Self>,
        req: Request<Incoming>,
        params: Vec<(String, String)>,
    ) -> Response<FullBody> {
        let cfg = &self.config;
        let deadline = Instant::now() + cfg.timeout;
        let (parts, body) = req.into_parts();
        let too_large = || {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "the request body is larger than {} bytes; send less or raise `max_body`",
                    cfg.max_body
                ),
            )
            .into_response()
        };
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > cfg.max_body as u64) {
            return too_large();
        }
        let bytes =
            match tokio::time::timeout_at(deadline, Limited::new(body, cfg.max_body).collect())
                .await
            {
                Ok(Ok(collected)) => collected.to_bytes(),
                Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(),
                Ok(Err(e)) => {
                    return Problem::new(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        format!("could not read the request body: {e}"),
                    )
                    .into_response();
                }
                Err(_) => {
                    return Problem::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "the request body did not arrive in time; send it faster or raise `timeout`",
                )
                .into_response();
                }
            };
        let msg = self.message(&parts, params, bytes);
        let id = msg.id().to_string();
        match cfg.pattern {
            ExchangePattern::InOnly if cfg.wait_for_commit => {
                match tokio::time::timeout_at(deadline, cfg.dispatcher.dispatch(msg)).await {
                    Ok(Ok(_)) => accepted(&id),
                    Ok(Err(failure)) => {
                        tracing::debug!(flow = %cfg.flow, message_id = %id, error = %failure.error, "in_only request failed in its flow");
                        let problem = Problem::from_error(&failure.error, &id);
                        let reason = failure.error.to_string();
                        failure.message.nack(&reason);
                        problem.into_response()
                    }
                    Err(_) => timed_out(cfg.timeout, id),
                }
            }
            ExchangePattern::InOnly => {
                let dispatcher = Arc::clone(&cfg.dispatcher);
                let flow = Arc::clone(&cfg.flow);
                // Tracked, so a shutting-down flow finishes accepted work before it stops.
                self.in_flight.spawn(async move {
                    if let Err(failure) = dispatcher.dispatch(msg).await {
                        tracing::warn!(
                            flow = %flow,
                            message_id = %failure.message.id(),
                            error = %failure.error,
                            "in_only request failed in its flow after the client got 202"
                        );
                        let reason = failure.error.to_string();
                        failure.message.nack(&reason);
                    }
                });
                accepted(&id)
            }
            ExchangePattern::InOut => {
                match tokio::time::timeout_at(deadline, cfg.dispatcher.dispatch(msg)).await {
                    Ok(Ok(replies)) => reply_response(replies, &id),
                    Ok(Err(failure)) => {
                        tracing::debug!(flow = %cfg.flow, message_id = %id, error = %failure.error, "http request failed in its flow");
                        let problem = Problem::from_error(&failure.error, &id);
                        let reason = failure.error.to_string();
                        failure.message.nack(&reason);
                        problem.into_response()
                    }
                    Err(_) => timed_out(cfg.timeout, id),
                }
            }
        }
    }

    fn message(
        &self,
        parts: &http::request::Parts,
        params: Vec<(String, String)>,
        bytes: Bytes,
    ) -> Message {
        let mut msg = Message::new(Body::from_bytes(bytes)).with_pattern(self.config.pattern);
        for (name, value) in &parts.headers {
            // Headers that are not UTF-8 cannot be message headers; they are left out.
            let Ok(value) = std::str::from_utf8(value.as_bytes()) else {
                continue;
            };
            msg.headers
                .entry(name.as_str().to_owned())
                .and_modify(|joined| {
                    // Repeated headers are joined as RFC 9110 allows for list-valued fields.
                    joined.push_str(", ");
                    joined.push_str(value);
                })
                .or_insert_with(|| value.to_owned());
        }
        msg.headers
            .insert("http.method".into(), parts.method.to_string());
        msg.headers
            .insert("http.path".into(), parts.uri.path().to_owned());
        if let Some(query) = parts.uri.query() {
            msg.headers.insert("http.query".into(), query.to_owned());
        }
        for (name, value) in params {
            msg.headers.insert(format!("http.param.{name}"), value);
        }
        msg.meta.origin = Some(Arc::clone(&self.config.flow));
        msg.meta.traceparent = msg.headers.get("traceparent").cloned();
        msg.meta.correlation_id = msg.headers.get("x-correlation-id").cloned();
        msg
    }
}

/// Turns a flow's replies into the HTTP response.
fn reply_response(mut replies: Vec<Message>, id: &str) -> Response<FullBody> {
    match replies.len() {
        0 => {
            let mut response = Response::new(FullBody::new(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        1 => {
            let reply = replies.remove(0);
            single_reply(&reply).unwrap_or_else(|detail| {
                let mut problem =
                    Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "bad_reply", detail);
                problem.kind = Some("internal".into());
                problem.message_id = Some(id.to_owned());
                problem.into_response()
            })
        }
        _ => {
            let items: Vec<serde_json::Value> = replies
                .iter()
                .map(|m| {
                    m.body
                        .json()
                        .cloned()
                        .unwrap_or_else(|_| serde_json::Value::String(m.body.to_text()))
                })
                .collect();
            let body = serde_json::Value::Array(items).to_string();
            let mut response = Response::new(FullBody::new(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
    }
}

fn single_reply(reply: &Message) -> Result<Response<FullBody>, String> {
    let status = match reply.headers.get("http.status") {
        None => StatusCode::OK,
        Some(text) => text
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|n| (100..=599).contains(n))
            .and_then(|n| StatusCode::from_u16(n).ok())
            .ok_or_else(|| {
                format!("the reply's `http.status` header is `{text}`, not a status from 100 to 599; set it to a number such as 200")
            })?,
    };
    let bytes = reply.body.as_bytes().clone();
    let mut response = Response::new(FullBody::new(bytes));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for (name, value) in &reply.headers {
        let Some(name) = name.strip_prefix("http.header.") else {
            continue;
        };
        let header_name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("reply header `http.header.{name}`: `{name}` is not a valid http header name; rename it"))?;
        let header_value = HeaderValue::from_str(value).map_err(|_| {
            format!("reply header `http.header.{name}` has a value that is not valid in http; remove control characters")
        })?;
        headers.append(header_name, header_value);
    }
    if let Some(ct) = reply.headers.get("content-type") {
        let value = HeaderValue::from_str(ct).map_err(|_| {
            "the reply's `content-type` header is not a valid http header value; fix it".to_owned()
        })?;
        headers.insert(header::CONTENT_TYPE, value);
    } else if !headers.contains_key(header::CONTENT_TYPE) {
        let guessed = if !reply.body.is_empty() && reply.body.json().is_ok() {
            "application/json"
        } else {
            "application/octet-stream"
        };
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(guessed));
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_of(response: Response<FullBody>) -> Bytes {
        response.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn reply_status_headers_and_content_type() {
        let reply = Message::bytes(&b"<ok/>"[..])
            .with_header("http.status", "201")
            .with_header("http.header.x-order", "42")
            .with_header("content-type", "application/xml")
            .with_header("other", "not sent");
        let response = reply_response(vec![reply], "id");
        assert_eq!(response.status(), 201);
        assert_eq!(response.headers()["x-order"], "42");
        assert_eq!(response.headers()["content-type"], "application/xml");
        assert!(response.headers().get("other").is_none());
        assert_eq!(body_of(response).await.as_ref(), b"<ok/>");
    }

    #[tokio::test]
    async fn content_type_is_guessed_from_the_body() {
        let json = reply_response(vec![Message::bytes(&b"{\"a\":1}"[..])], "id");
        assert_eq!(json.headers()["content-type"], "application/json");
        let raw = reply_response(vec![Message::bytes(&b"hello"[..])], "id");
        assert_eq!(raw.headers()["content-type"], "application/octet-stream");
    }

    #[tokio::test]
    async fn many_replies_become_a_json_array_and_none_is_204() {
        let replies = vec![
            Message::bytes(&b"{\"a\":1}"[..]),
            Message::bytes(&b"text"[..]),
        ];
        let response = reply_response(replies, "id");
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = serde_json::from_slice(&body_of(response).await).unwrap();
        assert_eq!(body, serde_json::json!([{"a": 1}, "text"]));
        assert_eq!(reply_response(vec![], "id").status(), 204);
    }

    #[tokio::test]
    async fn bad_status_header_is_a_500_problem() {
        for bad in ["abc", "99", "600"] {
            let response = reply_response(
                vec![Message::bytes(&b""[..]).with_header("http.status", bad)],
                "m1",
            );
            assert_eq!(response.status(), 500, "{bad}");
            assert_eq!(
                response.headers()["content-type"],
                "application/problem+json"
            );
            let body: serde_json::Value = serde_json::from_slice(&body_of(response).await).unwrap();
            assert_eq!(body["message_id"], "m1");
            assert!(body["detail"].as_str().unwrap().contains(bad));
        }
    }

    #[test]
    fn paths_are_checked() {
        assert!(check_path("/orders/{id}").is_ok());
        assert!(check_path("orders").is_err());
        assert!(check_path("/a/{").is_err());
    }
}
