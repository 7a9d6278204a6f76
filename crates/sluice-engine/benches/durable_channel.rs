//! Durable channel throughput, end to end, for 1 KiB bodies: producers deliver messages to the
//! durable `channel` sink (envelope + append, awaited: the producer's ack point), the durable
//! `channel` source leases them, hands each to a flow that acks it at once, and deletes the
//! record. Beside it, `Queue::append` alone with the same producers: the ratio says what the
//! engine adds to the store's write path (envelopes, leases, acks: three commits per record
//! instead of one, all group-committed). A round ends when the reading flow has seen every
//! message; the deletes of its last records may still be committing then (they run alongside the
//! next round, so over many rounds their cost is counted).
//!
//! On the shared 2-core development machine (1 December 2026; other builds running): end to end
//! about 14k messages/s, `Queue::append` alone about 23k/s, a ratio of about 0.6.
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
use sluice_core::{Dispatch, Failure, Message, Resources, SourceContext};
use sluice_engine::durable::DurableStore;
use sluice_engine::durable_channel::{self, ReaderOptions};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const BODY: usize = 1024;
const PRODUCERS: usize = 64;
/// Messages each producer sends per measured round.
const PER_PRODUCER: usize = 16;

fn bench_dir() -> PathBuf {
    std::env::var_os("SLUICE_BENCH_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("target"))
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
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let resources = Arc::new(Resources::default());
    resources
        .get_or_default::<DurableStore>()
        .set_dir(&dir.path().join("e2e"));
    let messages = PRODUCERS * PER_PRODUCER;
    let mut group = c.benchmark_group("durable_channel_1KiB");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(messages as u64));

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
    group.bench_function(BenchmarkId::new("sink_to_source_ack", PRODUCERS), |b| {
        b.iter_custom(|rounds| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..rounds {
                    flow.seen.store(0, Ordering::SeqCst);
                    flow.target.store(messages, Ordering::SeqCst);
                    let done = flow.done.notified();
                    let producers: Vec<_> = (0..PRODUCERS)
                        .map(|_| {
                            let sink = Arc::clone(&sink);
                            tokio::spawn(async move {
                                for _ in 0..PER_PRODUCER {
                                    sink.deliver(&Message::bytes(body())).await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for producer in producers {
                        producer.await.unwrap();
                    }
                    done.await;
                }
                start.elapsed()
            })
        });
    });
    shutdown.cancel();
    runtime.block_on(reader).unwrap().unwrap();

    let store = resources.get_or_default::<DurableStore>().store().unwrap();
    let queue = store.queue("append_only");
    group.bench_function(BenchmarkId::new("queue_append_only", PRODUCERS), |b| {
        b.iter_custom(|rounds| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..rounds {
                    let producers: Vec<_> = (0..PRODUCERS)
                        .map(|_| {
                            let queue = queue.clone();
                            tokio::spawn(async move {
                                for _ in 0..PER_PRODUCER {
                                    queue.append(vec![body()]).await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for producer in producers {
                        producer.await.unwrap();
                    }
                }
                start.elapsed()
            })
        });
    });
    group.finish();
}

criterion_group!(benches, durable_channel_end_to_end);
criterion_main!(benches);
