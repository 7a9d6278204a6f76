//! Durable channel throughput and producer ack latency, end to end, for 1 KiB bodies: producers
//! deliver messages to the durable `channel` sink (envelope + append, awaited: the producer's
//! ack point, whose latency is recorded), the durable `channel` source leases them, hands each to
//! a flow that acks it at once, and deletes the record. Beside it, the limit: a raw redb loop
//! whose every durable commit inserts as many 1 KiB records as there are producers and deletes
//! those of the commit before. A round ends when the reading flow has seen every message; the
//! deletes of its last records may still be committing then (they run alongside the next round,
//! so over many rounds their cost is counted). After each end-to-end run the bench prints the
//! messages per commit and the producers' ack latency percentiles.
//!
//! Runs on a real file under the target directory (a tmpfs would make fsync free):
//! `cargo bench -p sluice-engine --bench durable_channel`. `SLUICE_BENCH_DIR` overrides it.

#![allow(clippy::unwrap_used, reason = "a benchmark stops on the first failure")]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use redb::{Database, Durability, TableDefinition};
use sluice_core::{Dispatch, Failure, Message, Resources, SourceContext};
use sluice_engine::durable::DurableStore;
use sluice_engine::durable_channel::{self, ReaderOptions};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const BODY: usize = 1024;
const PRODUCERS: [usize; 2] = [64, 256];
/// Messages each producer sends per measured round.
const PER_PRODUCER: usize = 16;

fn bench_dir() -> PathBuf {
    // By default Cargo's scratch directory for benches, under the target directory on a real disk.
    std::env::var_os("SLUICE_BENCH_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from)
}

/// The reading flow: acks every message and counts it.
struct Counting {
    seen: AtomicUsize,
    target: AtomicUsize,
    done: Notify,
}

#[async_trait]
impl Dispatch for Counting {
    async fn dispatch(&self, msg: Message) -> Result<Vec<Message>, Failure> {
        msg.ack();
        if self.seen.fetch_add(1, Ordering::SeqCst) + 1 == self.target.load(Ordering::SeqCst) {
            self.done.notify_one();
        }
        Ok(Vec::new())
    }
}

fn body() -> Bytes {
    Bytes::from(vec![b'x'; BODY])
}

fn durable_channel_end_to_end(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("durable_channel_1KiB");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(8));
    for producers in PRODUCERS {
        let messages = producers * PER_PRODUCER;
        group.throughput(Throughput::Elements(messages as u64));
        end_to_end(&mut group, &runtime, producers);
        raw_redb_append_and_delete(&mut group, producers);
    }
    group.finish();
}

/// Producers deliver to the durable channel sink (each awaiting its append, the producer's ack
/// point) while the channel's source leases the records and a flow acks them.
fn end_to_end(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    runtime: &tokio::runtime::Runtime,
    producers: usize,
) {
    let messages = producers * PER_PRODUCER;
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let resources = Arc::new(Resources::default());
    resources
        .get_or_default::<DurableStore>()
        .set_dir(&dir.path().join("e2e"));
    let sink = durable_channel::sink(&resources, "bench").unwrap();
    let flow = Arc::new(Counting {
        seen: AtomicUsize::new(0),
        target: AtomicUsize::new(usize::MAX),
        done: Notify::new(),
    });
    let shutdown = CancellationToken::new();
    let source = durable_channel::source(
        &resources,
        "bench",
        ReaderOptions {
            concurrency: 256,
            visibility_timeout: Duration::from_secs(60),
            max_deliveries: 10,
            redelivery_delay: Duration::from_secs(1),
            poll_interval: Duration::from_millis(100),
        },
    )
    .unwrap();
    let ctx = SourceContext {
        flow: "reader".into(),
        dispatcher: Arc::clone(&flow) as Arc<dyn Dispatch>,
        shutdown: shutdown.clone(),
        resources: Arc::clone(&resources),
    };
    let reader = runtime.spawn(async move { source.run(ctx).await });
    let store = resources.get_or_default::<DurableStore>().store().unwrap();
    let commits_before = store.commits();
    let mut latencies = Vec::new();
    let mut sent = 0u64;
    group.bench_function(BenchmarkId::new("sink_to_source_ack", producers), |b| {
        b.iter_custom(|rounds| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..rounds {
                    flow.seen.store(0, Ordering::SeqCst);
                    flow.target.store(messages, Ordering::SeqCst);
                    let done = flow.done.notified();
                    let tasks: Vec<_> = (0..producers)
                        .map(|_| {
                            let sink = Arc::clone(&sink);
                            tokio::spawn(async move {
                                let mut latencies = Vec::with_capacity(PER_PRODUCER);
                                for _ in 0..PER_PRODUCER {
                                    let sent = Instant::now();
                                    sink.deliver(&Message::bytes(body())).await.unwrap();
                                    latencies.push(sent.elapsed());
                                }
                                latencies
                            })
                        })
                        .collect();
                    for task in tasks {
                        latencies.extend(task.await.unwrap());
                    }
                    done.await;
                }
                sent += rounds * messages as u64;
                start.elapsed()
            })
        });
    });
    shutdown.cancel();
    runtime.block_on(reader).unwrap().unwrap();
    let commits = store.commits() - commits_before;
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    eprintln!(
        "sink_to_source_ack/{producers}: {sent} messages, {:.1} per commit; producer ack latency p50 {:?} p99 {:?} p99.9 {:?}",
        sent as f64 / commits.max(1) as f64,
        percentile(0.50),
        percentile(0.99),
        percentile(0.999),
    );
}

/// The engine's limit: a raw redb loop whose every durable commit (same durability and
/// quick-repair setting as the store) inserts `batch` 1 KiB records and deletes the `batch`
/// records of the commit before, the least work a channel moving `batch` messages per commit
/// can do.
fn raw_redb_append_and_delete(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    batch: usize,
) {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let db = Database::create(dir.path().join("raw.redb")).unwrap();
    let table: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("raw");
    let record = vec![b'x'; BODY];
    let mut next = 0u64;
    group.bench_function(BenchmarkId::new("raw_redb_append_and_delete", batch), |b| {
        b.iter_custom(|rounds| {
            let start = Instant::now();
            for _ in 0..rounds * PER_PRODUCER as u64 {
                let mut txn = db.begin_write().unwrap();
                txn.set_durability(Durability::Immediate).unwrap();
                txn.set_quick_repair(true);
                {
                    let mut records = txn.open_table(table).unwrap();
                    for seq in next.saturating_sub(batch as u64)..next {
                        records.remove(("bench", seq)).unwrap();
                    }
                    for _ in 0..batch {
                        records.insert(("bench", next), record.as_slice()).unwrap();
                        next += 1;
                    }
                }
                txn.commit().unwrap();
            }
            start.elapsed()
        });
    });
}

criterion_group!(benches, durable_channel_end_to_end);
criterion_main!(benches);
