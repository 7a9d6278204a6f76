//! Durable append throughput for 1 KiB records: the store's group commit with N concurrent
//! producers (each append one record, awaited before the next) against the limit, a raw redb
//! loop that commits batches of N records with the same durability (fsync) and quick-repair
//! setting. The ratio says what the writer thread, channel and framing cost.
//!
//! Runs on a real file under the target directory (a tmpfs would make fsync free):
//! `cargo bench -p sluice-store --bench queue`. `SLUICE_BENCH_DIR` overrides the location.

#![allow(clippy::unwrap_used, reason = "a benchmark stops on the first failure")]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use redb::{Database, Durability, TableDefinition};
use sluice_store::{GroupCommit, Store, StoreOptions};

const RECORD: usize = 1024;
/// Appends each producer makes per measured round.
const APPENDS_PER_PRODUCER: usize = 32;
const PRODUCERS: [usize; 3] = [1, 16, 128];

fn bench_dir() -> PathBuf {
    // By default Cargo's scratch directory for benches, under the target directory on a real disk.
    std::env::var_os("SLUICE_BENCH_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from)
}

fn group_commit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let mut group = c.benchmark_group("append_1KiB");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    for producers in PRODUCERS {
        let messages = producers * APPENDS_PER_PRODUCER;
        group.throughput(Throughput::Elements(messages as u64));

        for (name, max_wait) in [
            ("group_commit_wait_2ms", Duration::from_millis(2)),
            ("group_commit_no_wait", Duration::ZERO),
        ] {
            let tmp = tempfile::tempdir_in(bench_dir()).unwrap();
            let options = StoreOptions {
                group_commit: GroupCommit {
                    max_wait,
                    ..GroupCommit::default()
                },
                ..StoreOptions::default()
            };
            let store = Store::open(tmp.path(), options).unwrap();
            let payload = Bytes::from(vec![0x5A; RECORD]);
            let commits_before = store.commits();
            let mut appended = 0u64;
            let mut latencies = Vec::new();
            group.bench_with_input(
                BenchmarkId::new(name, producers),
                &producers,
                |b, &producers| {
                    b.iter_custom(|iters| {
                        let start = Instant::now();
                        for _ in 0..iters {
                            latencies
                                .extend(runtime.block_on(produce(&store, producers, &payload)));
                        }
                        appended += iters * messages as u64;
                        start.elapsed()
                    });
                },
            );
            let commits = store.commits() - commits_before;
            latencies.sort_unstable();
            let percentile = |p: usize| {
                latencies
                    .get(latencies.len() * p / 100)
                    .copied()
                    .unwrap_or_default()
            };
            eprintln!(
                "{name}/{producers}: {appended} records in {commits} commits, {:.1} records per commit, ack latency p50 {:?} p99 {:?}",
                appended as f64 / commits.max(1) as f64,
                percentile(50),
                percentile(99),
            );
        }

        let tmp = tempfile::tempdir_in(bench_dir()).unwrap();
        let db = Database::create(tmp.path().join("raw.redb")).unwrap();
        let table: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("raw");
        let record = vec![0x5A; RECORD];
        let mut seq = 0u64;
        group.bench_with_input(
            BenchmarkId::new("raw_redb_batch", producers),
            &producers,
            |b, &batch| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        for _ in 0..APPENDS_PER_PRODUCER {
                            let mut txn = db.begin_write().unwrap();
                            txn.set_durability(Durability::Immediate).unwrap();
                            txn.set_quick_repair(true);
                            {
                                let mut t = txn.open_table(table).unwrap();
                                for _ in 0..batch {
                                    seq += 1;
                                    t.insert(("bench", seq), record.as_slice()).unwrap();
                                }
                            }
                            txn.commit().unwrap();
                        }
                    }
                    start.elapsed()
                });
            },
        );
    }
    group.finish();
}

/// `producers` tasks, each appending one record at a time and awaiting its durability; returns
/// every append's latency.
async fn produce(store: &Store, producers: usize, payload: &Bytes) -> Vec<Duration> {
    let tasks: Vec<_> = (0..producers)
        .map(|_| {
            let queue = store.queue("bench");
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(APPENDS_PER_PRODUCER);
                for _ in 0..APPENDS_PER_PRODUCER {
                    let start = Instant::now();
                    queue.append(vec![payload.clone()]).await.unwrap();
                    latencies.push(start.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    latencies
}

criterion_group!(benches, group_commit);
criterion_main!(benches);
