use std::time::Duration;

use bytes::Bytes;

use super::{clock, open, options, payloads};
use crate::{Delivery, GroupCommit, Store, StoreError, queue};

const MINUTE: Duration = Duration::from_secs(60);

fn ids(deliveries: &[Delivery]) -> Vec<u64> {
    deliveries.iter().map(|delivery| delivery.id).collect()
}

#[tokio::test]
async fn appended_records_are_leased_in_order_once_and_gone_after_ack() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), &clock());
    let queue = store.queue("orders");
    assert_eq!(queue.append(payloads(&["a", "b"])).await.unwrap(), [1, 2]);
    assert_eq!(queue.append(payloads(&["c"])).await.unwrap(), [3]);

    let first = queue.lease(2, MINUTE).await.unwrap();
    assert_eq!(ids(&first), [1, 2]);
    assert_eq!(first[0].payload, "a");
    assert_eq!(first[0].deliveries, 1);
    assert_eq!(first[0].redeliveries(), 0);
    let second = queue.lease(10, MINUTE).await.unwrap();
    assert_eq!(ids(&second), [3]);
    assert!(queue.lease(10, MINUTE).await.unwrap().is_empty());

    assert_eq!(queue.ack(vec![1, 2, 3]).await.unwrap(), 3);
    assert_eq!(
        queue.ack(vec![1, 99]).await.unwrap(),
        0,
        "acking twice is harmless"
    );
}

#[tokio::test]
async fn channels_are_independent() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), &clock());
    store.queue("a").append(payloads(&["a1"])).await.unwrap();
    store
        .queue("ab")
        .append(payloads(&["ab1", "ab2"]))
        .await
        .unwrap();
    let a = store.queue("a").lease(10, MINUTE).await.unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].payload, "a1");
    assert_eq!(store.queue("ab").lease(10, MINUTE).await.unwrap().len(), 2);
    assert!(store.queue("b").lease(10, MINUTE).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_expired_lease_is_redelivered_with_its_count() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = clock();
    let store = open(tmp.path(), &clock);
    let queue = store.queue("q");
    queue.append(payloads(&["x", "y"])).await.unwrap();
    assert_eq!(
        ids(&queue.lease(1, Duration::from_secs(30)).await.unwrap()),
        [1]
    );

    clock.advance(Duration::from_secs(29));
    assert_eq!(
        ids(&queue.lease(1, MINUTE).await.unwrap()),
        [2],
        "1 is still hidden"
    );
    clock.advance(Duration::from_secs(1));
    let again = queue.lease(5, MINUTE).await.unwrap();
    assert_eq!(ids(&again), [1]);
    assert_eq!(again[0].deliveries, 2);
    assert_eq!(again[0].payload, "x");
}

#[tokio::test]
async fn a_nacked_record_comes_back_after_its_delay() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = clock();
    let store = open(tmp.path(), &clock);
    let queue = store.queue("q");
    queue.append(payloads(&["x"])).await.unwrap();
    queue.lease(1, MINUTE).await.unwrap();
    assert!(queue.nack(1, Duration::from_secs(5)).await.unwrap());
    assert!(!queue.nack(7, Duration::ZERO).await.unwrap(), "unknown id");

    clock.advance(Duration::from_millis(4999));
    assert!(queue.lease(1, MINUTE).await.unwrap().is_empty());
    clock.advance(Duration::from_millis(1));
    let back = queue.lease(1, MINUTE).await.unwrap();
    assert_eq!((back[0].id, back[0].deliveries), (1, 2));
}

#[tokio::test]
async fn a_nack_without_delay_makes_the_record_visible_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), &clock());
    let queue = store.queue("q");
    queue.append(payloads(&["x", "y"])).await.unwrap();
    queue.lease(2, MINUTE).await.unwrap();
    queue.nack(2, Duration::ZERO).await.unwrap();
    assert_eq!(ids(&queue.lease(5, MINUTE).await.unwrap()), [2]);
}

#[tokio::test]
async fn leases_are_released_at_reopen_but_nack_delays_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = clock();
    let store = open(tmp.path(), &clock);
    let queue = store.queue("q");
    queue.append(payloads(&["1", "2", "3", "4"])).await.unwrap();
    queue.lease(3, MINUTE).await.unwrap();
    queue.ack(vec![2]).await.unwrap();
    queue.nack(3, Duration::from_secs(10)).await.unwrap();
    drop((queue, store));

    let store = open(tmp.path(), &clock);
    assert_eq!(
        store.open_report().entries_read,
        2,
        "the in-flight entries of 1 and 3"
    );
    let queue = store.queue("q");
    let after = queue.lease(10, MINUTE).await.unwrap();
    assert_eq!(
        ids(&after),
        [1, 4],
        "1 was leased (released), 3 still delayed, 4 fresh"
    );
    assert_eq!(after[0].deliveries, 2);
    assert_eq!(after[1].deliveries, 1);
    clock.advance(Duration::from_secs(10));
    assert_eq!(ids(&queue.lease(10, MINUTE).await.unwrap()), [3]);
}

#[tokio::test]
async fn open_reads_only_in_flight_entries_not_the_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = clock();
    let store = open(tmp.path(), &clock);
    let queue = store.queue("big");
    for _ in 0..10 {
        let batch = (0..500).map(|i| Bytes::from(vec![i as u8; 64])).collect();
        queue.append(batch).await.unwrap();
    }
    queue.lease(3, MINUTE).await.unwrap();
    drop((queue, store));

    let store = open(tmp.path(), &clock);
    assert_eq!(
        store.open_report().entries_read,
        1,
        "5000 records stored, one lease of 3 in flight: one lease range"
    );
    let queue = store.queue("big");
    let leased = queue.lease(5000, MINUTE).await.unwrap();
    assert_eq!(leased.len(), 5000);
    assert_eq!(ids(&leased[..4]), [1, 2, 3, 4]);
}

#[tokio::test]
async fn a_corrupt_record_is_quarantined_and_does_not_block_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), &clock());
    let queue = store.queue("q");
    queue.append(payloads(&["a", "b", "c"])).await.unwrap();
    let mut frame = crate::codec::encode(b"b").unwrap();
    frame[crate::codec::HEADER_LEN] ^= 0xFF;
    assert!(queue::corrupt(&queue, 2, frame.clone()).await.unwrap());

    let leased = queue.lease(3, MINUTE).await.unwrap();
    assert_eq!(ids(&leased), [1, 3]);
    let page = store
        .dead_letters()
        .list(&crate::Filter::default())
        .unwrap();
    assert_eq!(page.letters.len(), 1);
    let letter = &page.letters[0].letter;
    assert!(
        letter
            .error
            .contains("quarantined record 2 of channel q: record checksum mismatch"),
        "{}",
        letter.error
    );
    assert_eq!(letter.step, "durable channel q");
    assert_eq!(letter.body, frame, "the damaged bytes are kept as found");
    assert_eq!(
        queue.ack(vec![2]).await.unwrap(),
        0,
        "no longer in the queue"
    );
}

#[tokio::test]
async fn a_corrupt_redelivery_is_quarantined_too() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = clock();
    let store = open(tmp.path(), &clock);
    let queue = store.queue("q");
    queue.append(payloads(&["a"])).await.unwrap();
    queue.lease(1, MINUTE).await.unwrap();
    queue.nack(1, Duration::ZERO).await.unwrap();
    queue::corrupt(&queue, 1, vec![1, 2, 3]).await.unwrap();
    assert!(queue.lease(1, MINUTE).await.unwrap().is_empty());
    // The first lease's range, now empty, goes once it is due.
    clock.advance(2 * MINUTE);
    assert!(queue.lease(1, MINUTE).await.unwrap().is_empty());
    let page = store
        .dead_letters()
        .list(&crate::Filter::default())
        .unwrap();
    assert!(page.letters[0].letter.error.contains("truncated record"));
    assert_eq!(page.letters[0].letter.attempts, 1);
    drop((queue, store));
    let store = open(tmp.path(), &clock);
    assert_eq!(
        store.open_report().entries_read,
        0,
        "nothing left in flight"
    );
}

#[tokio::test]
async fn a_second_open_of_the_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = clock();
    let store = open(tmp.path(), &clock);
    assert_eq!(store.dir(), Some(tmp.path()));
    let err = Store::open(tmp.path(), options(&clock)).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("is in use by another Sluice process"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_one_commit() {
    let tmp = tempfile::tempdir().unwrap();
    // The batch closes only when all 20 requests are in: one commit, whatever the timing. One
    // channel each, so the writer sees 20 requests (appends to one channel are combined).
    let options = crate::StoreOptions {
        group_commit: GroupCommit {
            max_wait: Duration::from_secs(3600),
            max_batch: 20,
        },
        ..options(&clock())
    };
    let store = Store::open(tmp.path(), options).unwrap();
    let commits_before = store.commits();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let queue = store.queue(&format!("q{i}"));
            tokio::spawn(async move { queue.append(vec![Bytes::from(vec![i; 8])]).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), vec![1]);
    }
    assert_eq!(store.commits() - commits_before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_to_one_channel_made_while_the_writer_is_busy_are_one_request() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), &clock());
    let writer_busy = store.hold_writer();
    let requests_before = store.requests();
    let tasks: Vec<_> = (0..20u8)
        .map(|i| {
            let queue = store.queue("q");
            tokio::spawn(async move {
                let payloads = vec![Bytes::from(vec![i; 4]), Bytes::from(vec![i; 5])];
                (i, queue.append(payloads).await)
            })
        })
        .collect();
    let queue = store.queue("q");
    while queue::appends_waiting(&queue) < 20 {
        tokio::task::yield_now().await;
    }
    drop(writer_busy);
    let mut all = Vec::new();
    for task in tasks {
        let (i, ids) = task.await.unwrap();
        let ids = ids.unwrap();
        // Each caller gets its own records' ids, consecutive and in its order.
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[1], ids[0] + 1);
        all.push((i, ids));
    }
    // One request for all 20 appends.
    assert_eq!(store.requests() - requests_before, 1);
    let mut ids: Vec<u64> = all.iter().flat_map(|(_, ids)| ids.clone()).collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=40).collect::<Vec<_>>());
    // The ids a caller got are those of its own payloads.
    let leased = queue.lease(40, MINUTE).await.unwrap();
    for (i, ids) in all {
        for (id, len) in ids.into_iter().zip([4, 5]) {
            let delivery = leased.iter().find(|d| d.id == id).unwrap();
            assert_eq!(delivery.payload, Bytes::from(vec![i; len]), "record {id}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_acks_tell_each_caller_what_it_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), &clock());
    let queue = store.queue("q");
    queue.append(payloads(&["a", "b", "c"])).await.unwrap();
    let writer_busy = store.hold_writer();
    let first = tokio::spawn({
        let queue = queue.clone();
        async move { queue.ack(vec![1, 9]).await }
    });
    let second = tokio::spawn({
        let queue = queue.clone();
        async move { queue.ack(vec![2, 3]).await }
    });
    while queue::acks_waiting(&queue) < 2 {
        tokio::task::yield_now().await;
    }
    drop(writer_busy);
    let (first, second) = (
        first.await.unwrap().unwrap(),
        second.await.unwrap().unwrap(),
    );
    // Whatever order they joined in, each hears its own: 9 never existed.
    assert_eq!((first, second), (1, 2));
    assert!(queue::stored_ids(&queue).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_appends_refused_for_a_full_disk_all_hear_it() {
    let disk = super::sim_disk::SimDisk::default();
    let store = Store::open_with_backend(disk.clone(), options(&clock())).unwrap();
    let writer_busy = store.hold_writer();
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let queue = store.queue("q");
            tokio::spawn(async move { queue.append(payloads(&["x"])).await })
        })
        .collect();
    let queue = store.queue("q");
    while queue::appends_waiting(&queue) < 5 {
        tokio::task::yield_now().await;
    }
    disk.fill_up();
    drop(writer_busy);
    for task in tasks {
        let err = task.await.unwrap().unwrap_err();
        assert!(err.is_disk_full(), "{err}");
    }
    disk.free_space();
    // Once the store has reopened, a new append gets the first id: the refused ones stored nothing.
    assert_eq!(append_until_stored(&queue, "after").await, vec![1]);
}

#[tokio::test]
async fn a_full_disk_fails_the_append_as_disk_full_and_the_same_store_resumes_once_space_returns() {
    let disk = super::sim_disk::SimDisk::default();
    let clock = clock();
    let store = Store::open_with_backend(disk.clone(), options(&clock)).unwrap();
    let queue = store.queue("q");
    queue.append(payloads(&["a"])).await.unwrap();
    disk.fill_up();
    let err = queue.append(payloads(&["b"])).await.unwrap_err();
    assert!(err.is_disk_full(), "{err}");
    assert!(matches!(err, StoreError::DiskFull(_)), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("the disk is full, nothing was stored"),
        "{err}"
    );
    // Still full: the store is reopening its database (which needs a write), and says why.
    let err = queue.append(payloads(&["b"])).await.unwrap_err();
    assert!(matches!(err, StoreError::DiskFull(_)), "{err:?}");

    // Space returns; the same store, never reopened by the caller, takes appends again.
    disk.free_space();
    let ids = append_until_stored(&queue, "c").await;
    assert_eq!(ids, [2], "a refused append stored something");
    let leased = queue.lease(10, MINUTE).await.unwrap();
    let got: Vec<_> = leased.iter().map(|d| d.payload.clone()).collect();
    assert_eq!(got, ["a", "c"]);
    queue.ack(vec![1, 2]).await.unwrap();
    assert!(queue::stored_ids(&queue).unwrap().is_empty());

    // And after a restart nothing acknowledged is lost, nothing refused shows up.
    queue.append(payloads(&["d"])).await.unwrap();
    drop((queue, store));
    let store = Store::open_with_backend(disk, options(&clock)).unwrap();
    let leased = store.queue("q").lease(10, MINUTE).await.unwrap();
    let got: Vec<_> = leased.iter().map(|d| d.payload.clone()).collect();
    assert_eq!(got, ["d"]);
}

/// Appends `text` until the store takes it (the writer retries its reopen with a backoff of at
/// most a second); fails after 20 s.
async fn append_until_stored(queue: &crate::Queue, text: &str) -> Vec<u64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match queue.append(payloads(&[text])).await {
            Ok(ids) => return ids,
            Err(error) => {
                assert!(error.is_disk_full(), "{error}");
                assert!(
                    std::time::Instant::now() < deadline,
                    "the store never took appends again: {error}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commit_wait_ends_once_the_batch_is_as_large_as_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let options = crate::StoreOptions {
        group_commit: GroupCommit {
            max_wait: Duration::from_secs(3600),
            max_batch: 100,
        },
        ..options(&clock())
    };
    let store = Store::open(tmp.path(), options).unwrap();
    // Two channels: appends to one channel would be combined into one request.
    let (queue, other) = (store.queue("q"), store.queue("other"));
    let fifty = || (0..50).map(|i| Bytes::from(vec![i; 4])).collect::<Vec<_>>();
    // Two appends of 50 records fill the first batch (max_batch): one commit of 2 requests.
    let (a, b) = tokio::join!(queue.append(fifty()), other.append(fifty()));
    assert_eq!(a.unwrap().len() + b.unwrap().len(), 100);
    assert_eq!(store.commits(), 1);
    // Two single-record appends: far from max_batch, but as many requests as the previous
    // commit, so the writer commits once both are in instead of waiting out max_wait. The
    // timeout only turns a hang into a failure.
    let both = async {
        tokio::join!(
            queue.append(payloads(&["x"])),
            other.append(payloads(&["y"]))
        )
    };
    let (x, y) = tokio::time::timeout(Duration::from_secs(120), both)
        .await
        .expect("the batch committed without waiting for max_wait");
    x.unwrap();
    y.unwrap();
    assert_eq!(store.commits(), 2);
}
