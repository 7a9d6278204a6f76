use std::time::Duration;

use super::{clock, open};
use crate::Claim;

const TTL: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_key_is_claimed_once_until_it_expires() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = clock();
    let store = open(tmp.path(), &clock);
    let keys = store.idempotent_keys("orders");
    assert_eq!(keys.try_claim("k", TTL).await.unwrap(), Claim::Claimed);
    assert_eq!(keys.try_claim("k", TTL).await.unwrap(), Claim::Duplicate);
    assert!(keys.contains("k").unwrap());
    clock.advance(TTL);
    assert!(!keys.contains("k").unwrap(), "expired keys are absent");
    assert_eq!(keys.try_claim("k", TTL).await.unwrap(), Claim::Claimed);
}

#[tokio::test]
async fn confirm_extends_release_forgets_and_repositories_are_separate() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = clock();
    let store = open(tmp.path(), &clock);
    let keys = store.idempotent_keys("a");
    keys.try_claim("k", Duration::from_secs(1)).await.unwrap();
    keys.confirm("k", TTL).await.unwrap();
    clock.advance(Duration::from_secs(30));
    assert!(
        keys.contains("k").unwrap(),
        "confirm replaced the short claim"
    );
    assert!(!store.idempotent_keys("b").contains("k").unwrap());
    keys.release("k").await.unwrap();
    keys.release("never-seen").await.unwrap();
    assert_eq!(keys.try_claim("k", TTL).await.unwrap(), Claim::Claimed);
}

#[tokio::test]
async fn keys_survive_reopen_and_purge_removes_only_expired_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = clock();
    let store = open(tmp.path(), &clock);
    let keys = store.idempotent_keys("r");
    keys.confirm("short", Duration::from_secs(1)).await.unwrap();
    keys.confirm("long", TTL).await.unwrap();
    drop((keys, store));

    let store = open(tmp.path(), &clock);
    let keys = store.idempotent_keys("r");
    assert!(keys.contains("short").unwrap() && keys.contains("long").unwrap());
    clock.advance(Duration::from_secs(1));
    assert_eq!(keys.purge_expired(100).await.unwrap(), 1);
    assert_eq!(keys.purge_expired(100).await.unwrap(), 0);
    assert!(keys.contains("long").unwrap());
    assert_eq!(keys.try_claim("short", TTL).await.unwrap(), Claim::Claimed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_concurrent_claims_exactly_one_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), &clock());
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let keys = store.idempotent_keys("r");
            tokio::spawn(async move { keys.try_claim("same", TTL).await })
        })
        .collect();
    let mut claimed = 0;
    for task in tasks {
        if task.await.unwrap().unwrap() == Claim::Claimed {
            claimed += 1;
        }
    }
    assert_eq!(claimed, 1);
}

#[tokio::test]
async fn a_claim_dies_with_the_run_that_made_it_and_a_confirmed_key_survives() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = clock();
    let store = open(tmp.path(), &clock);
    let keys = store.idempotent_keys("r");
    assert_eq!(
        keys.try_claim("in-flight", TTL).await.unwrap(),
        Claim::Claimed
    );
    assert_eq!(keys.try_claim("done", TTL).await.unwrap(), Claim::Claimed);
    keys.confirm("done", TTL).await.unwrap();
    assert_eq!(keys.stored().unwrap(), 2);
    drop((keys, store));

    let store = open(tmp.path(), &clock);
    assert_eq!(
        store.open_report().entries_read,
        1,
        "open reads the one claim, not the confirmed key"
    );
    let keys = store.idempotent_keys("r");
    assert_eq!(keys.stored().unwrap(), 1);
    assert_eq!(
        keys.try_claim("in-flight", TTL).await.unwrap(),
        Claim::Claimed,
        "its message is redelivered and must be processed"
    );
    assert_eq!(keys.try_claim("done", TTL).await.unwrap(), Claim::Duplicate);
    // A claim confirmed, then released, leaves nothing behind for the next open.
    keys.confirm("in-flight", TTL).await.unwrap();
    keys.release("in-flight").await.unwrap();
    drop((keys, store));
    let store = open(tmp.path(), &clock);
    assert_eq!(store.open_report().entries_read, 0);
    assert_eq!(store.idempotent_keys("r").stored().unwrap(), 1);
}

#[tokio::test]
async fn stored_counts_one_repository_and_purge_empties_it() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = clock();
    let store = open(tmp.path(), &clock);
    let (a, ab, b) = (
        store.idempotent_keys("a"),
        store.idempotent_keys("ab"),
        store.idempotent_keys("b"),
    );
    a.confirm("1", Duration::from_secs(1)).await.unwrap();
    a.try_claim("2", Duration::from_secs(1)).await.unwrap();
    ab.confirm("1", TTL).await.unwrap();
    b.confirm("1", TTL).await.unwrap();
    assert_eq!((a.stored().unwrap(), ab.stored().unwrap()), (2, 1));
    clock.advance(Duration::from_secs(1));
    assert_eq!(a.purge_expired(100).await.unwrap(), 2);
    assert_eq!(a.stored().unwrap(), 0);
    assert_eq!(b.stored().unwrap(), 1);
    drop((a, ab, b, store));
    let store = open(tmp.path(), &clock);
    assert_eq!(
        store.open_report().entries_read,
        0,
        "the purged claim left the claims index too"
    );
}
