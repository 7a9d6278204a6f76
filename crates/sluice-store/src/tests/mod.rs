//! Behaviour of the store through its public API, on real files in a temporary directory.

mod aggregation;
mod checkpoints;
mod dead_letters;
mod idempotent;
mod model;
mod queue;
mod sim_disk;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::{GroupCommit, ManualClock, Store, StoreOptions};

/// A store on `dir` with a manual clock at t = 1 000 000 ms and no group-commit wait.
fn open(dir: &Path, clock: &Arc<ManualClock>) -> Store {
    Store::open(dir, options(clock)).unwrap()
}

fn options(clock: &Arc<ManualClock>) -> StoreOptions {
    StoreOptions {
        group_commit: GroupCommit {
            max_wait: Duration::ZERO,
            max_batch: 1024,
        },
        clock: Arc::clone(clock) as _,
        cache_size: crate::DEFAULT_CACHE_SIZE,
        // Small: every test store writes its reserve at open.
        reserve: 64 << 10,
    }
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(1_000_000))
}

fn payloads(texts: &[&str]) -> Vec<Bytes> {
    texts
        .iter()
        .map(|text| Bytes::from(text.to_string()))
        .collect()
}
