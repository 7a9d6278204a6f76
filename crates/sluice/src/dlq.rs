//! `sluice dlq`: browse, delete and replay dead letters.
//!
//! With `--admin URL` (or `SLUICE_ADMIN`) every command goes through the admin API of a running
//! Sluice; replay needs it, since the flows run there. Without it, `list`, `show` and `delete`
//! open the store in `--data DIR` directly, which works only while no runtime holds that
//! directory (the store is locked by one process at a time).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sluice_engine::dead_letter_store::{letter_json, now_ms, parse_since};
use sluice_store::{DeadLetters, Filter, Store, StoreError, StoreOptions};

/// The environment variable naming the admin API when `--admin` is not given.
const ADMIN_ENV: &str = "SLUICE_ADMIN";
/// How long one admin API call may take (a replay runs the whole flow).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(60);

/// `sluice dlq` and its options.
#[derive(Args)]
pub struct DlqArgs {
    /// The admin API of a running Sluice (`sluice run --admin`), e.g. `http://127.0.0.1:9464`;
    /// else the `SLUICE_ADMIN` environment variable. Required for `replay`.
    #[arg(long, global = true, value_name = "URL")]
    admin: Option<String>,
    /// The data directory to open directly when no admin API is given.
    #[arg(long, global = true, value_name = "DIR", default_value = sluice_engine::durable::DEFAULT_DATA_DIR)]
    data: PathBuf,
    /// Print JSON instead of a table (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: DlqAction,
}

#[derive(Subcommand)]
enum DlqAction {
    /// List dead letters, oldest first.
    List {
        /// Only letters of this flow.
        #[arg(long)]
        flow: Option<String>,
        /// Only letters whose last failure is at or after this time: RFC 3339
        /// (`2026-12-01T10:00:00Z`) or a duration ago (`30m`, `2h`).
        #[arg(long)]
        since: Option<String>,
        /// Only letters whose error contains this text.
        #[arg(long)]
        error: Option<String>,
        /// At most this many letters.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only ids greater than this (the next page).
        #[arg(long)]
        after: Option<u64>,
    },
    /// Show one dead letter with its headers and body.
    Show {
        /// The letter's id.
        id: u64,
    },
    /// Delete dead letters.
    Delete {
        /// The letters' ids.
        #[arg(required = true)]
        ids: Vec<u64>,
    },
    /// Send dead letters again through a running flow (needs `--admin`): the ones named by id,
    /// or every one matching `--flow`/`--since`/`--error` (or `--all`). Each letter is replayed
    /// at most once per replay id (default: its own id), so repeating the command sends nothing
    /// twice.
    Replay {
        /// The letters' ids (or use the filters).
        #[arg(required_unless_present_any = ["flow", "since", "error", "all"], conflicts_with_all = ["flow", "since", "error", "all"])]
        ids: Vec<u64>,
        /// Replay every letter of this flow.
        #[arg(long)]
        flow: Option<String>,
        /// Replay every letter whose last failure is at or after this time (RFC 3339 or `2h`).
        #[arg(long)]
        since: Option<String>,
        /// Replay every letter whose error contains this text.
        #[arg(long)]
        error: Option<String>,
        /// Replay every letter in the store.
        #[arg(long)]
        all: bool,
        /// Where to send: `FLOW`, or `FLOW/STEP` to start at that top-level step (skipping the
        /// steps before it); default: the flow each letter failed in, from its first step.
        #[arg(long, value_name = "FLOW[/STEP]")]
        to: Option<String>,
        /// The replay id (one id only); pass a new one to send a letter again on purpose.
        #[arg(long)]
        replay_id: Option<String>,
    },
}

/// Prints a line to standard output; a closed pipe (`| head`) ends the command quietly instead
/// of panicking like `println!`.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout().lock(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

/// Where the commands go.
enum Backend {
    Admin(String),
    Store(DeadLetters),
}

/// Runs `sluice dlq`.
pub fn run(args: DlqArgs) -> anyhow::Result<ExitCode> {
    let admin = args
        .admin
        .clone()
        .or_else(|| std::env::var(ADMIN_ENV).ok().filter(|v| !v.is_empty()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let backend = match admin {
            Some(url) => Backend::Admin(base_url(&url)),
            None if matches!(args.action, DlqAction::Replay { .. }) => bail!(
                "replay sends letters through the running flows: pass --admin URL (the address of `sluice run --admin`) or set {ADMIN_ENV}"
            ),
            None => Backend::Store(open_store(&args.data)?),
        };
        execute(&backend, args.action, args.json).await
    })
}

fn base_url(url: &str) -> String {
    let url = url.trim_end_matches('/');
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    }
}

fn open_store(dir: &Path) -> anyhow::Result<DeadLetters> {
    if !dir.join(sluice_store::DATABASE_FILE).exists() {
        bail!(
            "no store in {} (no {}); pass --data DIR, or --admin URL to ask a running Sluice",
            dir.display(),
            sluice_store::DATABASE_FILE
        );
    }
    match Store::open(dir, StoreOptions::default()) {
        Ok(store) => Ok(store.dead_letters()),
        Err(error @ StoreError::Locked { .. }) => Err(anyhow!(
            "{error}; to reach its dead letters while it runs, pass --admin URL (its `sluice run --admin` address) or set {ADMIN_ENV}"
        )),
        Err(error) => {
            Err(anyhow!(error).context(format!("cannot open the store in {}", dir.display())))
        }
    }
}

async fn execute(backend: &Backend, action: DlqAction, as_json: bool) -> anyhow::Result<ExitCode> {
    match action {
        DlqAction::List {
            flow,
            since,
            error,
            limit,
            after,
        } => {
            let page = list(backend, flow, since, error, limit, after).await?;
            if as_json {
                out!("{page}");
            } else {
                print_table(&page);
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqAction::Show { id } => {
            let letter = show(backend, id).await?;
            if as_json {
                out!("{letter}");
            } else {
                out!("{}", serde_json::to_string_pretty(&letter)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqAction::Delete { ids } => {
            let mut failed = false;
            for id in ids {
                match delete(backend, id).await {
                    Ok(()) => report(as_json, &json!({"id": id, "status": "deleted"}), || {
                        format!("deleted {id}")
                    }),
                    Err(error) => {
                        failed = true;
                        eprintln!("error: {id}: {error:#}");
                    }
                }
            }
            Ok(exit(failed))
        }
        DlqAction::Replay {
            ids,
            flow,
            since,
            error,
            all,
            to,
            replay_id,
        } => {
            let Backend::Admin(base) = backend else {
                bail!("replay needs --admin URL");
            };
            if ids.is_empty() {
                if replay_id.is_some() {
                    bail!("--replay-id names one replay: pass one id with it, not filters");
                }
                let request =
                    json!({"flow": flow, "since": since, "error": error, "all": all, "to": to});
                return replay_matching(base, request, as_json).await;
            }
            if replay_id.is_some() && ids.len() > 1 {
                bail!("--replay-id names one replay: pass one id with it");
            }
            let mut failed = false;
            for id in ids {
                let mut body = json!({});
                if let Some(to) = &to {
                    body["to"] = json!(to);
                }
                if let Some(replay_id) = &replay_id {
                    body["replay_id"] = json!(replay_id);
                }
                let url = format!("{base}/dlq/{id}/replay");
                let (status, answer) = call("POST", &url, body.to_string()).await?;
                let outcome = answer["status"].as_str().unwrap_or_default().to_owned();
                match (status, outcome.as_str()) {
                    (200, _) => report(as_json, &answer, || {
                        format!(
                            "replayed {id} into {}",
                            answer["flow"].as_str().unwrap_or("")
                        )
                    }),
                    (409, "already_replayed") => report(as_json, &answer, || {
                        format!("{id} was already replayed; nothing sent again")
                    }),
                    _ => {
                        failed = true;
                        eprintln!("error: {id}: {}", error_text(&answer));
                    }
                }
            }
            Ok(exit(failed))
        }
    }
}

/// Replays every letter matching `request` through `POST /dlq/replay`, page after page.
async fn replay_matching(
    base: &str,
    mut request: Value,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let url = format!("{base}/dlq/replay");
    let (mut replayed, mut already, mut failed) = (0usize, 0usize, 0usize);
    loop {
        let answer = expect_ok(call("POST", &url, request.to_string()).await?)?;
        let count = |key: &str| answer[key].as_array().map_or(0, Vec::len);
        replayed += count("replayed");
        already += count("already_replayed");
        failed += count("failed");
        for failure in answer["failed"].as_array().into_iter().flatten() {
            eprintln!(
                "error: {}: {}",
                failure["id"],
                failure["error"].as_str().unwrap_or("")
            );
        }
        report(as_json, &answer, || {
            format!(
                "replayed {} letters; {} were already replayed",
                count("replayed"),
                count("already_replayed")
            )
        });
        match answer["next_after"].as_u64() {
            Some(after) => request["after"] = json!(after),
            None => break,
        }
    }
    if !as_json {
        out!("total: {replayed} replayed, {already} already replayed, {failed} failed");
    }
    Ok(exit(failed > 0))
}

fn exit(failed: bool) -> ExitCode {
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn report(as_json: bool, value: &Value, text: impl FnOnce() -> String) {
    if as_json {
        out!("{value}");
    } else {
        out!("{}", text());
    }
}

async fn list(
    backend: &Backend,
    flow: Option<String>,
    since: Option<String>,
    error: Option<String>,
    limit: usize,
    after: Option<u64>,
) -> anyhow::Result<Value> {
    match backend {
        Backend::Admin(base) => {
            let mut query = form_urlencoded::Serializer::new(String::new());
            query.append_pair("limit", &limit.to_string());
            for (key, value) in [("flow", flow), ("since", since), ("error", error)] {
                if let Some(value) = value {
                    query.append_pair(key, &value);
                }
            }
            if let Some(after) = after {
                query.append_pair("after", &after.to_string());
            }
            expect_ok(
                call(
                    "GET",
                    &format!("{base}/dlq?{}", query.finish()),
                    String::new(),
                )
                .await?,
            )
        }
        Backend::Store(letters) => {
            let filter = Filter {
                flow,
                since_ms: since
                    .map(|s| parse_since(&s, now_ms()))
                    .transpose()
                    .map_err(|e| anyhow!(e))?,
                error_contains: error,
                after_id: after,
                limit,
            };
            let letters = letters.clone();
            let page = tokio::task::spawn_blocking(move || letters.list(&filter)).await??;
            let next_after = (limit > 0 && page.letters.len() >= limit)
                .then(|| page.letters.last().map(|l| l.id))
                .flatten();
            let shown: Vec<Value> = page.letters.iter().map(|l| letter_json(l, false)).collect();
            Ok(json!({"letters": shown, "corrupt": page.corrupt, "next_after": next_after}))
        }
    }
}

async fn show(backend: &Backend, id: u64) -> anyhow::Result<Value> {
    match backend {
        Backend::Admin(base) => {
            expect_ok(call("GET", &format!("{base}/dlq/{id}"), String::new()).await?)
        }
        Backend::Store(letters) => {
            let letters = letters.clone();
            match tokio::task::spawn_blocking(move || letters.get(id)).await?? {
                Some(letter) => Ok(letter_json(&letter, true)),
                None => bail!("no dead letter with id {id}; see `sluice dlq list`"),
            }
        }
    }
}

async fn delete(backend: &Backend, id: u64) -> anyhow::Result<()> {
    match backend {
        Backend::Admin(base) => {
            expect_ok(call("DELETE", &format!("{base}/dlq/{id}"), String::new()).await?)?;
            Ok(())
        }
        Backend::Store(letters) => {
            if letters.delete(vec![id]).await? == 0 {
                bail!("no dead letter with id {id}; see `sluice dlq list`");
            }
            Ok(())
        }
    }
}

fn expect_ok((status, answer): (u16, Value)) -> anyhow::Result<Value> {
    if (200..300).contains(&status) {
        Ok(answer)
    } else {
        bail!("{}", error_text(&answer))
    }
}

fn error_text(answer: &Value) -> String {
    answer["error"]
        .as_str()
        .map_or_else(|| answer.to_string(), str::to_owned)
}

/// One admin API call; answers the status and the JSON body.
async fn call(method: &str, url: &str, body: String) -> anyhow::Result<(u16, Value)> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .with_context(|| format!("`{url}` is not a valid admin API address"))?;
    let response = tokio::time::timeout(ADMIN_TIMEOUT, client.request(request))
        .await
        .map_err(|_| anyhow!("the admin API at {url} did not answer within {ADMIN_TIMEOUT:?}"))?
        .with_context(|| {
            format!("cannot reach the admin API at {url}; is `sluice run --admin` running there?")
        })?;
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading the answer of {url} failed"))?
        .to_bytes();
    let answer = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{url} answered {status} with something else than JSON: {}",
            String::from_utf8_lossy(&bytes)
        )
    })?;
    Ok((status, answer))
}

/// Prints a page of letters as a table, one line each.
fn print_table(page: &Value) {
    let letters = page["letters"].as_array().cloned().unwrap_or_default();
    out!(
        "{:>6}  {:<28}  {:<16}  {:>8}  {:<24}  ERROR",
        "ID",
        "FLOW",
        "STEP",
        "ATTEMPTS",
        "LAST FAILURE"
    );
    for letter in &letters {
        let text = |key: &str| letter[key].as_str().unwrap_or_default().to_owned();
        out!(
            "{:>6}  {:<28}  {:<16}  {:>8}  {:<24}  {}",
            letter["id"].to_string(),
            cut(&text("flow"), 28),
            cut(&text("step"), 16),
            letter["attempts"].to_string(),
            text("last_failure"),
            cut(&text("error"), 80),
        );
    }
    if let Some(corrupt) = page["corrupt"].as_array().filter(|c| !c.is_empty()) {
        out!(
            "corrupt entries (cannot be decoded; delete them): {}",
            Value::Array(corrupt.clone())
        );
    }
    if let Some(next) = page["next_after"].as_u64() {
        out!("more: pass --after {next} for the next page");
    } else if letters.is_empty() {
        out!("(no dead letters)");
    }
}

/// `text` cut to `max` characters, marked with `…` when cut.
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(max.saturating_sub(1)).collect();
    short.push('…');
    short
}
