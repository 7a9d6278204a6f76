use std::time::Duration;

use bytes::Bytes;

use super::{clock, open};
use crate::{Filter, NewDeadLetter, ReplayMark, ReplayOutcome};

fn letter(flow: &str, error: &str, last_failure_ms: u64) -> NewDeadLetter {
    NewDeadLetter {
        flow: flow.into(),
        flow_version: "v1".into(),
        step: "http_call".into(),
        error: error.into(),
        attempts: 3,
        first_failure_ms: last_failure_ms.saturating_sub(100),
        last_failure_ms,
        headers: Bytes::from_static(br#"{"content-type":"application/json"}"#),
        body: Bytes::from_static(b"\x00binary\xffbody"),
    }
}

#[tokio::test]
async fn a_dead_letter_is_kept_exactly_and_survives_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = clock();
    let store = open(tmp.path(), &clock);
    let original = letter("orders", "connection refused \"quoted\"", 5000);
    let id = store.dead_letters().put(original.clone()).await.unwrap();
    assert_eq!(id, 1);
    drop(store);

    let store = open(tmp.path(), &clock);
    let found = store.dead_letters().get(id).unwrap().unwrap();
    assert_eq!(found.letter, original);
    assert!(found.replays.is_empty());
    assert_eq!(store.dead_letters().get(2).unwrap(), None);
}

#[tokio::test]
async fn list_filters_by_flow_time_and_error_and_pages() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), &clock());
    let dlq = store.dead_letters();
    dlq.put(letter("orders", "timeout after 5s", 1000))
        .await
        .unwrap();
    dlq.put(letter("billing", "timeout after 5s", 2000))
        .await
        .unwrap();
    dlq.put(letter("orders", "status 500", 3000)).await.unwrap();
    dlq.put(letter("orders", "timeout after 9s", 4000))
        .await
        .unwrap();

    let ids = |filter: Filter| -> Vec<u64> {
        let page = dlq.list(&filter).unwrap();
        assert!(page.corrupt.is_empty());
        page.letters.iter().map(|letter| letter.id).collect()
    };
    assert_eq!(ids(Filter::default()), [1, 2, 3, 4]);
    assert_eq!(
        ids(Filter {
            flow: Some("orders".into()),
            ..Filter::default()
        }),
        [1, 3, 4]
    );
    assert_eq!(
        ids(Filter {
            since_ms: Some(2000),
            ..Filter::default()
        }),
        [2, 3, 4]
    );
    assert_eq!(
        ids(Filter {
            flow: Some("orders".into()),
            error_contains: Some("timeout".into()),
            ..Filter::default()
        }),
        [1, 4]
    );
    assert_eq!(
        ids(Filter {
            limit: 2,
            ..Filter::default()
        }),
        [1, 2]
    );
    assert_eq!(
        ids(Filter {
            after_id: Some(2),
            limit: 1,
            ..Filter::default()
        }),
        [3]
    );
}

#[tokio::test]
async fn delete_removes_and_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), &clock());
    let dlq = store.dead_letters();
    let a = dlq.put(letter("f", "e", 10)).await.unwrap();
    let b = dlq.put(letter("f", "e", 10)).await.unwrap();
    assert_eq!(dlq.delete(vec![a, 99]).await.unwrap(), 1);
    assert_eq!(dlq.get(a).unwrap(), None);
    assert!(dlq.get(b).unwrap().is_some());
    let c = dlq.put(letter("f", "e", 10)).await.unwrap();
    assert!(c > b, "ids are never reused");
}

#[tokio::test]
async fn the_same_replay_id_marks_only_once() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = clock();
    let store = open(tmp.path(), &clock);
    let dlq = store.dead_letters();
    let id = dlq.put(letter("f", "e", 10)).await.unwrap();
    assert_eq!(
        dlq.mark_replayed(id, "r-1").await.unwrap(),
        ReplayMark::First
    );
    assert_eq!(
        dlq.mark_replayed(id, "r-1").await.unwrap(),
        ReplayMark::AlreadyReplayed { dead_letter: id }
    );
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        dlq.mark_replayed(id, "r-2").await.unwrap(),
        ReplayMark::First
    );
    assert_eq!(
        dlq.mark_replayed(42, "r-3").await.unwrap(),
        ReplayMark::NotFound
    );
    let replays = dlq.get(id).unwrap().unwrap().replays;
    let seen: Vec<_> = replays
        .iter()
        .map(|r| (r.replay_id.as_str(), r.at_ms))
        .collect();
    assert_eq!(seen, [("r-1", 1_000_000), ("r-2", 1_001_000)]);
}

#[tokio::test]
async fn replay_into_a_queue_appends_once_per_replay_id() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = clock();
    let store = open(tmp.path(), &clock);
    let dlq = store.dead_letters();
    let id = dlq.put(letter("f", "e", 10)).await.unwrap();
    let first = dlq
        .replay_into(id, "r-1", "retry", b"message")
        .await
        .unwrap();
    assert_eq!(first, ReplayOutcome::Appended(1));
    drop(dlq);
    drop(store);

    let store = open(tmp.path(), &clock);
    let dlq = store.dead_letters();
    let again = dlq
        .replay_into(id, "r-1", "retry", b"message")
        .await
        .unwrap();
    assert_eq!(again, ReplayOutcome::AlreadyReplayed { dead_letter: id });
    assert_eq!(
        dlq.replay_into(7, "r-9", "retry", b"m").await.unwrap(),
        ReplayOutcome::NotFound
    );
    let delivered = store
        .queue("retry")
        .lease(10, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].payload, "message");
}
