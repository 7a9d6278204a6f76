//! A store on a real, small filesystem that runs full: appends fail with a clear disk-full error,
//! consumers can still drain the queue (the store's reserve), and the same store takes appends
//! again by itself once space returns, with nothing acknowledged lost.
//!
//! Needs permission to mount a tmpfs (root, as in this project's CI); without it the test says
//! so in one line and returns.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_store::{Queue, RESERVE_FILE, Store, StoreOptions};
use sluice_testkit::disk::{SmallDisk, fill_up};

const RESERVE: u64 = 1 << 20;

fn options() -> StoreOptions {
    StoreOptions {
        reserve: RESERVE,
        ..StoreOptions::default()
    }
}

/// A 1 KiB payload that names its record.
fn payload(n: usize) -> Bytes {
    let mut bytes = format!("{n:08}").into_bytes();
    bytes.resize(1024, b'x');
    Bytes::from(bytes)
}

fn number(payload: &Bytes) -> usize {
    std::str::from_utf8(&payload[..8]).unwrap().parse().unwrap()
}

/// Leases and acks everything visible; returns the record numbers.
async fn drain(queue: &Queue) -> Vec<usize> {
    let mut found = Vec::new();
    loop {
        let batch = queue.lease(100, Duration::from_secs(600)).await.unwrap();
        if batch.is_empty() {
            return found;
        }
        found.extend(batch.iter().map(|d| number(&d.payload)));
        let ids = batch.iter().map(|d| d.id).collect();
        assert_eq!(queue.ack(ids).await.unwrap(), batch.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_appends_lets_consumers_drain_and_recovers_by_itself() {
    let disk = match SmallDisk::mount("6m") {
        Ok(disk) => disk,
        Err(why) => {
            println!("skipping the disk-full test: cannot mount a tmpfs ({why})");
            return;
        }
    };
    let data: PathBuf = disk.path().join("data");
    let store = Store::open(&data, options()).unwrap();
    assert_eq!(
        std::fs::metadata(data.join(RESERVE_FILE)).unwrap().len(),
        RESERVE
    );
    let queue = store.queue("orders");
    assert!(!store.reserve_in_use());

    let mut acknowledged = BTreeSet::new();
    let mut next = 0;
    let error = loop {
        let batch: Vec<usize> = (next..next + 16).collect();
        next += 16;
        match queue
            .append(batch.iter().map(|&n| payload(n)).collect())
            .await
        {
            Ok(ids) => {
                assert_eq!(ids.len(), batch.len());
                acknowledged.extend(batch);
            }
            Err(e) => break e,
        }
        assert!(
            acknowledged.len() < 100_000,
            "6 MiB never filled up: the store is not writing to the tmpfs"
        );
    };
    assert!(error.is_disk_full(), "not reported as disk full: {error}");
    assert!(
        error
            .to_string()
            .starts_with("the disk is full, nothing was stored"),
        "{error}"
    );
    assert!(
        !acknowledged.is_empty(),
        "nothing fit before the disk was full"
    );

    // The disk stays full: producers are refused, consumers drain on the reserve's room.
    let refused = queue.append(vec![payload(next)]).await.unwrap_err();
    assert!(refused.is_disk_full(), "{refused}");
    let first = queue.lease(100, Duration::from_secs(600)).await.unwrap();
    assert!(!first.is_empty(), "nothing to lease on a full disk");
    // Not the reserve file's absence: the writer's attempts to write it again (each removed
    // when the disk is still full) make it appear for moments.
    assert!(store.reserve_in_use(), "the reserve was not released");
    let refused = queue.append(vec![payload(next)]).await.unwrap_err();
    assert!(refused.is_disk_full(), "{refused}");
    let mut found: Vec<usize> = first.iter().map(|d| number(&d.payload)).collect();
    let ids = first.iter().map(|d| d.id).collect();
    assert_eq!(queue.ack(ids).await.unwrap(), first.len());
    found.extend(drain(&queue).await);
    let found_set: BTreeSet<usize> = found.iter().copied().collect();
    assert_eq!(found.len(), found_set.len(), "a record was delivered twice");
    assert_eq!(
        found_set, acknowledged,
        "acknowledged records lost (or refused ones stored) on a full disk"
    );

    // Space comes back: the same store handle takes appends again, with no reopen by us.
    disk.grow("32m");
    let after = next + 1;
    append_until_stored(&queue, after).await;
    assert_eq!(
        std::fs::metadata(data.join(RESERVE_FILE)).unwrap().len(),
        RESERVE,
        "appends resumed without the reserve back"
    );
    assert!(
        !store.reserve_in_use(),
        "the store says the reserve is still in use"
    );
    let more: Vec<usize> = (after + 1..after + 1000).collect();
    queue
        .append(more.iter().map(|&n| payload(n)).collect())
        .await
        .unwrap();

    // Everything acknowledged since is there after a restart, and nothing else.
    drop(queue);
    drop(store);
    let store = Store::open(&data, options()).unwrap();
    let found: BTreeSet<usize> = drain(&store.queue("orders")).await.into_iter().collect();
    let expected: BTreeSet<usize> = std::iter::once(after).chain(more).collect();
    assert_eq!(found, expected);
}

/// Appends `n` until the store takes it; fails after 20 s.
async fn append_until_stored(queue: &Queue, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = queue.append(vec![payload(n)]).await {
        assert!(e.is_disk_full(), "{e}");
        assert!(Instant::now() < deadline, "appends never resumed: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_opened_on_a_full_disk_lets_consumers_drain_and_recovers_by_itself() {
    let disk = match SmallDisk::mount("6m") {
        Ok(disk) => disk,
        Err(why) => {
            println!("skipping the disk-full test: cannot mount a tmpfs ({why})");
            return;
        }
    };
    let data: PathBuf = disk.path().join("data");
    let store = Store::open(&data, options()).unwrap();
    let queue = store.queue("orders");
    queue.append((0..100).map(payload).collect()).await.unwrap();
    drop(queue);
    drop(store);
    // Something else fills the disk while the process is down.
    let filler = disk.path().join("filler");
    fill_up(&filler);

    let store = Store::open(&data, options()).unwrap();
    let queue = store.queue("orders");
    let refused = queue.append(vec![payload(100)]).await.unwrap_err();
    assert!(refused.is_disk_full(), "{refused}");
    // Released at open, or by the refused append's commit: either way before the refusal.
    assert!(
        store.reserve_in_use(),
        "refused for a full disk, with the reserve not in use"
    );
    let found: BTreeSet<usize> = drain(&queue).await.into_iter().collect();
    assert_eq!(found, (0..100).collect(), "consumers could not drain");

    std::fs::remove_file(&filler).unwrap();
    append_until_stored(&queue, 101).await;
    assert!(!store.reserve_in_use());
    let found = drain(&queue).await;
    assert_eq!(found, [101], "a refused append was stored");
}
