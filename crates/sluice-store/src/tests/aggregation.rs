use std::time::Duration;

use super::{clock, open};
use crate::StoredGroup;

#[tokio::test]
async fn a_group_keeps_its_entries_in_order_and_its_times_across_a_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = clock();
    let store = open(tmp.path(), &clock);
    let groups = store.aggregation_groups("orders");
    let first = groups.append("g1", "order-7", b"one").await.unwrap();
    assert_eq!(
        first,
        StoredGroup {
            id: "g1".into(),
            key: "order-7".into(),
            first_at_ms: 1_000_000,
            last_at_ms: 1_000_000,
            size: 1
        }
    );
    clock.advance(Duration::from_secs(5));
    let second = groups
        .append("g1", "ignored once the group exists", b"two")
        .await
        .unwrap();
    assert_eq!((second.key.as_str(), second.size), ("order-7", 2));
    assert_eq!(
        (second.first_at_ms, second.last_at_ms),
        (1_000_000, 1_005_000)
    );
    groups.append("g2", "order-8", b"other").await.unwrap();
    drop((groups, store));

    let store = open(tmp.path(), &clock);
    assert_eq!(store.open_report().entries_read, 0, "open reads no group");
    let groups = store.aggregation_groups("orders");
    let listed = groups.groups().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0], second);
    assert_eq!(listed[1].key, "order-8");
    let entries = groups.entries("g1").unwrap().unwrap();
    assert_eq!(entries, [&b"one"[..], &b"two"[..]]);
    assert!(groups.entries("never").unwrap().is_none());
}

#[tokio::test]
async fn remove_deletes_one_group_and_repositories_are_separate() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = clock();
    let store = open(tmp.path(), &clock);
    let (a, ab) = (
        store.aggregation_groups("a"),
        store.aggregation_groups("ab"),
    );
    for n in 0..3u8 {
        a.append("g", "k", &[n]).await.unwrap();
        a.append("h", "k", &[n]).await.unwrap();
    }
    ab.append("g", "k", b"x").await.unwrap();
    assert!(a.remove("g").await.unwrap());
    assert!(!a.remove("g").await.unwrap(), "removed once");
    assert!(a.entries("g").unwrap().is_none());
    assert_eq!(a.entries("h").unwrap().unwrap().len(), 3);
    assert_eq!(ab.entries("g").unwrap().unwrap(), [&b"x"[..]]);
    assert_eq!(
        a.groups()
            .unwrap()
            .iter()
            .map(|g| g.id.as_str())
            .collect::<Vec<_>>(),
        ["h"]
    );
    assert_eq!(ab.groups().unwrap().len(), 1);
    // A group started again under a removed id starts from scratch.
    let again = a.append("g", "k2", b"new").await.unwrap();
    assert_eq!((again.size, again.key.as_str()), (1, "k2"));
    assert_eq!(a.entries("g").unwrap().unwrap(), [&b"new"[..]]);
}
