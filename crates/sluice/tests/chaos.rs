//! Kill -9 chaos test of the at-least-once path: HTTP `in_only` with `accept: on_commit` into a
//! durable channel, read by a flow that appends every delivery to a file.
//!
//! The real `sluice` binary runs as a child process. Producers send numbered messages `{"n":i}`
//! over loopback HTTP; a number counts as acknowledged only when it got 202, and is otherwise
//! sent again (so a number may be recorded twice: allowed). A killer sends SIGKILL at moments
//! drawn from a seeded RNG and restarts the runtime on the same data directory, again and again.
//! At the end the runtime drains and a checker reads the recording: no acknowledged number may be
//! missing (lost), no number may appear that was never sent (unexpected); duplicates are counted.
//!
//! Replay or lengthen a run with environment variables:
//! `SLUICE_CHAOS_SEED` (printed as `chaos seed: N` at the start), `SLUICE_CHAOS_KILLS` (default
//! 10) and `SLUICE_CHAOS_MESSAGES` (default 1,000 per kill, at least 10,000), e.g.
//! `SLUICE_CHAOS_KILLS=200 cargo test -p sluice --test chaos -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::free_port;

/// Requests in flight at once.
const PRODUCERS: usize = 12;
/// Longest wait, once sending is over, for the recording to grow while numbers are missing.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a restarted runtime to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The run's parameters, from the environment or the CI defaults.
struct Settings {
    seed: u64,
    kills: usize,
    messages: usize,
}

impl Settings {
    fn from_env() -> Self {
        let number = |name: &str| {
            std::env::var(name).ok().map(|v| {
                v.trim()
                    .parse::<u64>()
                    .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}"))
            })
        };
        let kills = number("SLUICE_CHAOS_KILLS").map_or(10, |k| k as usize);
        Settings {
            seed: number("SLUICE_CHAOS_SEED").unwrap_or_else(|| fastrand::u64(..)),
            kills,
            // About as many messages as are sent between two kills here, so that a longer run
            // keeps killing a runtime under load rather than an idle one.
            messages: number("SLUICE_CHAOS_MESSAGES")
                .map_or(10_000.max(kills * 1_000), |m| m as usize),
        }
    }
}

/// The two flows: `ingest` answers 202 once a message is in the durable channel, `record`
/// appends each delivery to `out` and acknowledges it only after the write (and fsync).
fn flows(port: u16, out: &Path) -> String {
    format!(
        r#"
flows:
  - name: ingest
    from:
      http: {{listen: "127.0.0.1:{port}", path: /in, pattern: in_only, accept: on_commit}}
    to:
      - channel: {{name: work, durable: true}}
  - name: record
    from:
      # max_deliveries: a kill during a delivery counts as one; the dead letters are no recording.
      channel: {{name: work, durable: true, concurrency: 16, max_deliveries: 1000000, redelivery_delay: 10ms, poll_interval: 50ms}}
    to:
      - file: {{path: "{out}", fsync: true}}
"#,
        out = out.display()
    )
}

/// The runtime under test: the `sluice` binary, started and killed on one data directory.
struct Runtime {
    flow: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    child: Option<Child>,
    /// Longest time a start took until the runtime listened (recovery after a kill included).
    slowest_start: Duration,
}

impl Runtime {
    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("run")
            .arg(&self.flow)
            .arg("--data")
            .arg(&self.data)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start the sluice binary");
        self.child = Some(child);
    }

    /// SIGKILL, then reap the process so its port and store lock are free.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts the runtime and waits until it listens; a process that exits before (say, it found
    /// the port still taken) is started again.
    fn start(&mut self) {
        let began = Instant::now();
        let deadline = began + START_TIMEOUT;
        self.spawn();
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.slowest_start = self.slowest_start.max(began.elapsed());
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                eprintln!("chaos: runtime exited at start ({status}), starting it again");
                self.spawn();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.kill();
        panic!(
            "nothing listens on 127.0.0.1:{} after {START_TIMEOUT:?}; log:\n{}",
            self.port,
            self.log_tail()
        );
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the producers share: the next number to send, and the numbers acknowledged with 202.
struct Sent {
    next: AtomicUsize,
    acked: Vec<AtomicBool>,
    retries: AtomicU64,
}

/// Sends `{"n":n}` once; true when the runtime answered 202.
async fn send_once(client: &Client<HttpConnector, Full<Bytes>>, url: &str, n: usize) -> bool {
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!(r#"{{"n":{n}}}"#))))
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let resp = client.request(req).await.ok()?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await.ok()?;
        Some(status)
    })
    .await;
    matches!(answer, Ok(Some(202)))
}

/// Takes numbers until all are sent; each is sent until it is acknowledged.
async fn produce(sent: Arc<Sent>, url: String) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    loop {
        let n = sent.next.fetch_add(1, Ordering::Relaxed);
        if n >= sent.acked.len() {
            return;
        }
        while !send_once(&client, &url, n).await {
            sent.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sent.acked[n].store(true, Ordering::Relaxed);
    }
}

/// Kills and restarts the runtime `kills` times, at moments drawn from `rng`. One kill in four
/// comes within 30 ms of the runtime listening again, while it is still taking up what the
/// previous run left (a crash during recovery).
fn kill_repeatedly(runtime: &mut Runtime, kills: usize, rng: &mut fastrand::Rng) {
    for _ in 0..kills {
        if rng.u8(..4) == 0 {
            std::thread::sleep(Duration::from_millis(rng.u64(0..30)));
        } else {
            std::thread::sleep(Duration::from_millis(rng.u64(50..600)));
        }
        runtime.kill();
        runtime.start();
    }
}

/// What the recording holds: how often each number was recorded, and how many lines hold
/// something other than whole records (a write torn by a kill; the delivery it belonged to was
/// not acknowledged and comes again).
#[derive(Default)]
struct Recording {
    counts: HashMap<usize, usize>,
    torn: usize,
}

fn read_recording(out: &Path) -> Recording {
    let mut text = String::new();
    if let Ok(mut file) = File::open(out) {
        file.read_to_string(&mut text).unwrap();
    }
    let mut recording = Recording::default();
    for line in text.lines() {
        // A torn write is followed by the next record on the same line: find whole records.
        let mut rest = line;
        let mut garbage = false;
        while let Some(start) = rest.find(r#"{"n":"#) {
            garbage |= start > 0;
            let after = &rest[start + 5..];
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            if digits > 0 && after[digits..].starts_with('}') {
                let n = after[..digits].parse().unwrap();
                *recording.counts.entry(n).or_default() += 1;
                rest = &after[digits + 1..];
            } else {
                garbage = true;
                rest = after;
            }
        }
        recording.torn += usize::from(garbage || !rest.is_empty());
    }
    recording
}

/// Acknowledged numbers missing from `recording`.
fn lost(sent: &Sent, recording: &Recording) -> Vec<usize> {
    (0..sent.acked.len())
        .filter(|&n| sent.acked[n].load(Ordering::Relaxed) && !recording.counts.contains_key(&n))
        .collect()
}

#[test]
fn no_acknowledged_message_is_lost_when_the_runtime_is_killed_again_and_again() {
    let settings = Settings::from_env();
    println!("chaos seed: {}", settings.seed);
    let mut rng = fastrand::Rng::with_seed(settings.seed);
    let started = Instant::now();

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let port = free_port();
    let flow = dir.path().join("chaos.yaml");
    std::fs::write(&flow, flows(port, &out)).unwrap();
    let mut runtime = Runtime {
        flow,
        data: dir.path().join("data"),
        log: dir.path().join("sluice.log"),
        port,
        child: None,
        slowest_start: Duration::ZERO,
    };
    runtime.start();

    let sent = Arc::new(Sent {
        next: AtomicUsize::new(0),
        acked: (0..settings.messages)
            .map(|_| AtomicBool::new(false))
            .collect(),
        retries: AtomicU64::new(0),
    });
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/in");
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|_| tokio.spawn(produce(sent.clone(), url.clone())))
        .collect();

    kill_repeatedly(&mut runtime, settings.kills, &mut rng);
    let killing = started.elapsed();
    tokio.block_on(async {
        for producer in producers {
            producer.await.unwrap();
        }
    });
    let sending = started.elapsed();

    // Drain: the last runtime delivers what is left in the channel; give up only when the
    // recording stops growing for DRAIN_TIMEOUT.
    let mut deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut recording = read_recording(&out);
    let mut missing = lost(&sent, &recording).len();
    while missing > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        recording = read_recording(&out);
        let now_missing = lost(&sent, &recording).len();
        if now_missing < missing {
            deadline = Instant::now() + DRAIN_TIMEOUT;
        }
        missing = now_missing;
    }
    runtime.kill();
    let recording = read_recording(&out);

    let lost = lost(&sent, &recording);
    let acknowledged = sent
        .acked
        .iter()
        .filter(|a| a.load(Ordering::Relaxed))
        .count();
    let duplicated: usize = recording.counts.values().map(|c| c - 1).sum();
    let unexpected: Vec<usize> = recording
        .counts
        .keys()
        .copied()
        .filter(|&n| n >= settings.messages)
        .collect();
    println!(
        "chaos: kills={} messages={} acknowledged={acknowledged} lost={} duplicated={duplicated} \
         unexpected={} torn={} retries={} slowest_start={}ms killing={:.1}s sending={:.1}s \
         elapsed={:.1}s seed={}",
        settings.kills,
        settings.messages,
        lost.len(),
        unexpected.len(),
        recording.torn,
        sent.retries.load(Ordering::Relaxed),
        runtime.slowest_start.as_millis(),
        killing.as_secs_f64(),
        sending.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        settings.seed,
    );
    let replay = format!("replay with SLUICE_CHAOS_SEED={}", settings.seed);
    assert_eq!(
        acknowledged, settings.messages,
        "every number is sent until acknowledged; {replay}"
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged messages were never recorded, first {:?}; {replay}\nlog:\n{}",
        lost.len(),
        &lost[..lost.len().min(20)],
        runtime.log_tail()
    );
    assert!(
        unexpected.is_empty(),
        "recorded numbers that were never sent: {unexpected:?}; {replay}"
    );
}
