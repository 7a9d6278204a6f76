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
