//! `/dlq`: the dead-letter store over HTTP (JSON).
//!
//! * `GET /dlq?flow=&since=&error=&limit=&after=`: a page of letters (no bodies), oldest first;
//!   `next_after` is the `after` of the next page when this one is full (the next may be
//!   empty), else `null`.
//! * `GET /dlq/{id}`: one letter with its headers and body (`body` as text when it is UTF-8,
//!   else `body_base64`).
//! * `DELETE /dlq/{id}`: removes it.
//! * `POST /dlq/{id}/replay` with an optional `{"to": FLOW, "replay_id": ID}`: dispatches the
//!   original message to a running flow (default: the one it failed in). `"to": "FLOW/STEP"`
//!   starts at that top-level step, skipping the steps before it (resume where it failed).
//! * `POST /dlq/replay` with `{"flow", "since", "error"}` (or `"all": true`) and an optional
//!   `"to"`: replays every matching letter, up to 1000 per request (`after`/`next_after` page),
//!   each under its own id as replay id; answers the ids `replayed`, `already_replayed` and
//!   `failed` (with the reason).
//!
//! Replay is recorded before the message is dispatched (`mark_replayed`), so the same replay id
//! (default: the letter's id) never delivers twice, even when two operators press the button at
//! once; the answer to a repeat is 409 `already_replayed`. The price: a replay that fails in the
//! flow still counts as done for its replay id; the letter stays in the store, and replaying it
//! again needs a new `replay_id` (the flow's own dead letter, if it has one, keeps the new
//! failure).

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use sluice_core::Dispatch;
use sluice_engine::dead_letter_store::{letter_json, now_ms, parse_since, replay_message};
use sluice_engine::durable::DurableStore;
use sluice_engine::flow::DEAD_LETTERED;
use sluice_store::{DeadLetters, Filter, ReplayMark};

use super::{AdminState, reply};

/// Letters per page unless `limit` says otherwise.
const DEFAULT_LIMIT: usize = 100;
/// The most letters one page holds.
const MAX_LIMIT: usize = 1000;
/// The most letters one bulk replay request sends.
const MAX_BULK: usize = 1000;
/// A replay request body is a small JSON object.
const MAX_REQUEST_BODY: usize = 64 * 1024;

/// An answer other than success: a status and a message saying what to do.
struct ApiError {
    status: StatusCode,
    message: String,
    extra: Value,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            extra: Value::Null,
        }
    }

    fn with(mut self, extra: Value) -> Self {
        self.extra = extra;
        self
    }
}

type Answer = Result<(StatusCode, Value), ApiError>;

pub(super) async fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let method = req.method().clone();
    let segments: Vec<&str> = path
        .trim_start_matches("/dlq")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let answer = match (&method, segments.as_slice()) {
        (&Method::GET, []) => list(state, query.as_deref()).await,
        (&Method::GET, [id]) => show(state, id).await,
        (&Method::DELETE, [id]) => delete(state, id).await,
        (&Method::POST, ["replay"]) => replay_many(state, req).await,
        (&Method::POST, [id, "replay"]) => replay(state, id, req).await,
        (_, []) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "/dlq only answers GET",
        )),
        (_, [_]) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} answers GET and DELETE; replay with POST {path}/replay"),
        )),
        (_, [_, "replay"]) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} only answers POST"),
        )),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no admin endpoint at {path}; try /dlq, /dlq/{{id}} or /dlq/{{id}}/replay"),
        )),
    };
    let (status, body) = answer.unwrap_or_else(|error| {
        let mut body = json!({"error": error.message});
        if let (Value::Object(body), Value::Object(extra)) = (&mut body, error.extra) {
            body.extend(extra);
        }
        (error.status, body)
    });
    reply(status, "application/json", body.to_string())
}

/// The dead letters of the running process's store, opening it if no flow did yet.
fn letters(state: &AdminState) -> Result<DeadLetters, ApiError> {
    state
        .resources
        .get_or_default::<DurableStore>()
        .store()
        .map(|store| store.dead_letters())
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the dead-letter store is not open: {e}"),
            )
        })
}

/// Runs a blocking store read off the async workers.
async fn blocking<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, sluice_store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(read).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(store_failed(&error)),
        Err(error) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the dead-letter store stopped: {error}"),
        )),
    }
}

fn store_failed(error: &sluice_store::StoreError) -> ApiError {
    let status = if error.is_disk_full() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    ApiError::new(status, format!("the dead-letter store failed: {error}"))
}

fn parse_id(text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("`{text}` is not a dead-letter id; ids are numbers, see GET /dlq"),
        )
    })
}

fn unknown(id: u64) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no dead letter with id {id}; see GET /dlq"),
    )
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

/// Reads the list filter from the query string.
fn filter(query: Option<&str>) -> Result<Filter, ApiError> {
    let mut filter = Filter {
        limit: DEFAULT_LIMIT,
        ..Filter::default()
    };
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if value.is_empty() {
            continue;
        }
        match key.as_ref() {
            "flow" => filter.flow = Some(value.into_owned()),
            "error" => filter.error_contains = Some(value.into_owned()),
            "since" => filter.since_ms = Some(parse_since(&value, now_ms()).map_err(bad_request)?),
            "after" => {
                filter.after_id = Some(value.parse().map_err(|_| {
                    bad_request(format!("`after` must be a dead-letter id, not `{value}`"))
                })?);
            }
            "limit" => {
                filter.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        bad_request(format!(
                            "`limit` must be a number from 1 to {MAX_LIMIT}, not `{value}`"
                        ))
                    })?;
            }
            other => {
                return Err(bad_request(format!(
                    "unknown parameter `{other}`; use flow, since, error, limit or after"
                )));
            }
        }
    }
    Ok(filter)
}

async fn list(state: &AdminState, query: Option<&str>) -> Answer {
    let filter = filter(query)?;
    let letters = letters(state)?;
    let limit = filter.limit;
    let page = blocking(move || letters.list(&filter)).await?;
    let next_after = (page.letters.len() >= limit)
        .then(|| page.letters.last().map(|l| l.id))
        .flatten();
    let shown: Vec<Value> = page.letters.iter().map(|l| letter_json(l, false)).collect();
    Ok((
        StatusCode::OK,
        json!({"letters": shown, "corrupt": page.corrupt, "next_after": next_after}),
    ))
}

async fn show(state: &AdminState, id: &str) -> Answer {
    let id = parse_id(id)?;
    let letters = letters(state)?;
    match blocking(move || letters.get(id)).await? {
        Some(letter) => Ok((StatusCode::OK, letter_json(&letter, true))),
        None => Err(unknown(id)),
    }
}

async fn delete(state: &AdminState, id: &str) -> Answer {
    let id = parse_id(id)?;
    let deleted = letters(state)?
        .delete(vec![id])
        .await
        .map_err(|e| store_failed(&e))?;
    if deleted == 0 {
        return Err(unknown(id));
    }
    tracing::info!(
        dead_letter_id = id,
        "dead letter deleted over the admin API"
    );
    Ok((StatusCode::OK, json!({"deleted": id})))
}

/// What a replay request may say.
#[derive(Default)]
struct ReplayRequest {
    /// `FLOW` or `FLOW/STEP`.
    to: Option<String>,
    replay_id: Option<String>,
    /// Bulk replay only: which letters.
    flow: Option<String>,
    since: Option<String>,
    error: Option<String>,
    after: Option<u64>,
    all: bool,
}

async fn replay_request(req: Request<Incoming>, bulk: bool) -> Result<ReplayRequest, ApiError> {
    let body = Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
        .map_err(|e| bad_request(format!("cannot read the request body: {e}")))?
        .to_bytes();
    let mut request = ReplayRequest::default();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(request);
    }
    let fields_help = if bulk {
        "`flow`, `since`, `error`, `all`, `after`, `to`"
    } else {
        "`to` and `replay_id`"
    };
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        bad_request(format!(
            "the body must be a JSON object with optional {fields_help}: {e}"
        ))
    })?;
    let Value::Object(fields) = value else {
        return Err(bad_request(format!(
            "the body must be a JSON object with optional {fields_help}"
        )));
    };
    for (key, value) in fields {
        match (key.as_str(), value) {
            (_, Value::Null) => {}
            ("all", Value::Bool(all)) if bulk => request.all = all,
            ("after", Value::Number(n)) if bulk => {
                request.after = Some(n.as_u64().ok_or_else(|| {
                    bad_request(format!("`after` must be a dead-letter id, not {n}"))
                })?);
            }
            (key, Value::String(text)) if !text.is_empty() => match key {
                "to" => request.to = Some(text),
                "replay_id" if !bulk => request.replay_id = Some(text),
                "flow" if bulk => request.flow = Some(text),
                "since" if bulk => request.since = Some(text),
                "error" if bulk => request.error = Some(text),
                _ => {
                    return Err(bad_request(format!(
                        "unknown field `{key}`; use {fields_help}"
                    )));
                }
            },
            (key, other) => {
                return Err(bad_request(format!(
                    "`{key}` is not a field here or has the wrong type ({other}); use {fields_help}"
                )));
            }
        }
    }
    Ok(request)
}

/// Where a replay goes: `FLOW` (from its first step) or `FLOW/STEP` (from that top-level
/// step on, skipping the ones before it).
struct Destination<'a> {
    flow: &'a std::sync::Arc<sluice_engine::flow::Flow>,
    flow_name: String,
    step: Option<String>,
}

fn destination<'a>(
    state: &'a AdminState,
    to: Option<&str>,
    failed_in: &str,
) -> Result<Destination<'a>, ApiError> {
    let (flow_name, step) = match to {
        Some(to) => match to.split_once('/') {
            Some((flow, step)) => (flow.to_owned(), Some(step.to_owned())),
            None => (to.to_owned(), None),
        },
        None => (failed_in.to_owned(), None),
    };
    let Some(flow) = state.flows.get(&flow_name) else {
        let known: Vec<&String> = state.flows.keys().collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no running flow named `{flow_name}`; pick one with \"to\": {}",
                serde_json::to_string(&known).unwrap_or_default()
            ),
        )
        .with(json!({"flows": known})));
    };
    if let Some(step) = &step {
        let steps = flow.step_ids();
        if !steps.contains(&step.as_str()) {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "flow `{flow_name}` has no top-level step `{step}`; its steps are {}",
                    serde_json::to_string(&steps).unwrap_or_default()
                ),
            )
            .with(json!({"steps": steps})));
        }
    }
    Ok(Destination {
        flow,
        flow_name,
        step,
    })
}

async fn replay(state: &AdminState, id: &str, req: Request<Incoming>) -> Answer {
    let id = parse_id(id)?;
    let request = replay_request(req, false).await?;
    let letters = letters(state)?;
    let reader = letters.clone();
    let Some(letter) = blocking(move || reader.get(id)).await? else {
        return Err(unknown(id));
    };
    let replay_id = request.replay_id.unwrap_or_else(|| id.to_string());
    replay_one(state, &letters, &letter, request.to.as_deref(), replay_id).await
}

/// Replays `letter` once for `replay_id`.
async fn replay_one(
    state: &AdminState,
    letters: &DeadLetters,
    letter: &sluice_store::DeadLetter,
    to: Option<&str>,
    replay_id: String,
) -> Answer {
    let id = letter.id;
    // Checked before the replay id is spent, so a typo costs nothing.
    let dest = destination(state, to, &letter.letter.flow)?;
    let flow_name = &dest.flow_name;
    let summary = json!({"id": id, "flow": flow_name, "step": dest.step, "replay_id": replay_id});
    match letters
        .mark_replayed(id, &replay_id)
        .await
        .map_err(|e| store_failed(&e))?
    {
        ReplayMark::First => {}
        ReplayMark::AlreadyReplayed { dead_letter } => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "replay id `{replay_id}` was used before (for dead letter {dead_letter}); nothing was sent again. To send it once more, pass a new \"replay_id\""
                ),
            )
            .with(json!({"status": "already_replayed", "id": id, "replay_id": replay_id, "dead_letter": dead_letter})));
        }
        ReplayMark::NotFound => return Err(unknown(id)),
    }
    tracing::info!(dead_letter_id = id, flow = %flow_name, step = ?dest.step, replay_id = %replay_id, "replaying a dead letter");
    let message = replay_message(letter);
    let outcome = match &dest.step {
        None => dest.flow.dispatch(message).await,
        Some(step) => match dest.flow.dispatch_from(step, message).await {
            Ok(outcome) => outcome,
            // Checked by `destination`; a flow's steps do not change while it runs.
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("flow `{flow_name}` has no top-level step `{step}`"),
                ));
            }
        },
    };
    match outcome {
        Ok(_) => {
            let mut body = summary;
            if let Value::Object(map) = &mut body {
                map.insert("status".into(), "replayed".into());
            }
            Ok((StatusCode::OK, body))
        }
        Err(failure) => {
            let dead_lettered = failure.message.headers.contains_key(DEAD_LETTERED);
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "the replay failed in flow `{flow_name}`: {}; dead letter {id} is kept, replay it again with a new \"replay_id\"",
                    failure.error
                ),
            )
            .with(json!({
                "status": "failed",
                "id": id,
                "flow": flow_name,
                "replay_id": replay_id,
                "dead_lettered_again": dead_lettered,
            })))
        }
    }
}

/// `POST /dlq/replay`: every letter matching the filter, oldest first, each under its own id
/// as replay id (so running the same bulk replay again sends nothing twice). At most
/// [`MAX_BULK`] letters per request; `next_after` continues when there are more.
async fn replay_many(state: &AdminState, req: Request<Incoming>) -> Answer {
    let request = replay_request(req, true).await?;
    if !request.all && request.flow.is_none() && request.since.is_none() && request.error.is_none()
    {
        return Err(bad_request(
            "say which letters to replay: `flow`, `since` or `error`, or `\"all\": true` for every letter",
        ));
    }
    let filter = Filter {
        flow: request.flow.clone(),
        since_ms: match &request.since {
            Some(since) => Some(parse_since(since, now_ms()).map_err(bad_request)?),
            None => None,
        },
        error_contains: request.error.clone(),
        after_id: request.after,
        limit: MAX_BULK,
    };
    let letters = letters(state)?;
    let reader = letters.clone();
    let page = blocking(move || reader.list(&filter)).await?;
    let next_after = (page.letters.len() >= MAX_BULK)
        .then(|| page.letters.last().map(|l| l.id))
        .flatten();
    let (mut replayed, mut already, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    for letter in &page.letters {
        let replay_id = letter.id.to_string();
        match replay_one(state, &letters, letter, request.to.as_deref(), replay_id).await {
            Ok(_) => replayed.push(letter.id),
            Err(e) if e.status == StatusCode::CONFLICT => already.push(letter.id),
            Err(e) => failed.push(json!({"id": letter.id, "error": e.message})),
        }
    }
    tracing::info!(
        replayed = replayed.len(),
        already_replayed = already.len(),
        failed = failed.len(),
        "bulk replay of dead letters"
    );
    Ok((
        StatusCode::OK,
        json!({
            "replayed": replayed,
            "already_replayed": already,
            "failed": failed,
            "next_after": next_after,
        }),
    ))
}
