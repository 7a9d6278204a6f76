//! Opening a store that holds a million queued 1 KiB records (the issue's "ready in about a
//! second"): after a clean close, and from a crash image (a copy of the database file taken
//! while the store was open, as a killed process leaves it, so redb must recover it). Opening
//! also releases the previous run's leases; 1 000 of the records are leased (one lease range) when
//! the images are taken, so that work is part of the figure. Beside it, opening an empty store: the ratio says
//! what the queued records cost.
//!
//! The records are written once per run (about a gigabyte, under Cargo's scratch directory;
//! `SLUICE_BENCH_DIR` overrides it); `SLUICE_BENCH_RECORDS` changes how many:
//! `cargo bench -p sluice-store --bench open`.

#![allow(clippy::unwrap_used, reason = "a benchmark stops on the first failure")]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use sluice_store::{DATABASE_FILE, Store, StoreOptions};

const RECORD: usize = 1024;
const APPEND_BATCH: usize = 4096;
const LEASED: usize = 1000;

fn bench_dir() -> PathBuf {
    // By default Cargo's scratch directory for benches, under the target directory on a real disk.
    std::env::var_os("SLUICE_BENCH_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from)
}

fn records() -> usize {
    std::env::var("SLUICE_BENCH_RECORDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000)
}

/// Fills a store in `dir` with `count` records, leases some, and copies the database file to
/// `crash` while the store is still open; then closes the store cleanly.
fn fill(dir: &Path, crash: &Path, count: usize) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = Store::open(dir, StoreOptions::default()).unwrap();
    let queue = store.queue("bench");
    let payload = Bytes::from(vec![0x5A; RECORD]);
    let started = Instant::now();
    runtime.block_on(async {
        let mut left = count;
        while left > 0 {
            let n = left.min(APPEND_BATCH);
            queue.append(vec![payload.clone(); n]).await.unwrap();
            left -= n;
        }
        queue
            .lease(LEASED, Duration::from_secs(3600))
            .await
            .unwrap();
    });
    eprintln!(
        "wrote {count} records of {RECORD} B in {:.1?}",
        started.elapsed()
    );
    std::fs::create_dir_all(crash).unwrap();
    std::fs::copy(dir.join(DATABASE_FILE), crash.join(DATABASE_FILE)).unwrap();
    drop(store);
}

fn open(c: &mut Criterion) {
    let count = records();
    let root = tempfile::tempdir_in(bench_dir()).unwrap();
    let (clean, crash, empty) = (
        root.path().join("clean"),
        root.path().join("crash"),
        root.path().join("empty"),
    );
    fill(&clean, &crash, count);
    drop(Store::open(&empty, StoreOptions::default()).unwrap());

    let mut group = c.benchmark_group("open");
    group.sample_size(10);
    // The lease of 1 000 records is one lease range, the only entry an open reads.
    for (name, dir, entries) in [("empty", &empty, 0), ("queued_clean_close", &clean, 1)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let store = Store::open(dir, StoreOptions::default()).unwrap();
                assert_eq!(store.open_report().entries_read, entries);
                store
            });
        });
    }
    // A crash image is recovered once: every later open finds a clean file. So each sample
    // opens a fresh copy, and only the open is timed.
    group.bench_function("queued_after_crash", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let copy = root.path().join("crash-copy");
                let _ = std::fs::remove_dir_all(&copy);
                std::fs::create_dir_all(&copy).unwrap();
                std::fs::copy(crash.join(DATABASE_FILE), copy.join(DATABASE_FILE)).unwrap();
                let started = Instant::now();
                let store = Store::open(&copy, StoreOptions::default()).unwrap();
                total += started.elapsed();
                assert_eq!(store.open_report().entries_read, 1);
            }
            total
        });
    });
    group.finish();
}

criterion_group!(benches, open);
criterion_main!(benches);
