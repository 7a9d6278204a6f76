use super::{clock, open};

#[tokio::test]
async fn a_checkpoint_survives_reopening_and_keys_are_separate() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = clock();
    {
        let store = open(tmp.path(), &clock);
        let checkpoints = store.checkpoints();
        assert_eq!(checkpoints.get("poll/orders").unwrap(), None);
        checkpoints
            .put("poll/orders", b"41".to_vec())
            .await
            .unwrap();
        checkpoints
            .put("poll/orders", b"42".to_vec())
            .await
            .unwrap();
        checkpoints.put("poll/other", b"x".to_vec()).await.unwrap();
    }
    let store = open(tmp.path(), &clock);
    let checkpoints = store.checkpoints();
    assert_eq!(
        checkpoints.get("poll/orders").unwrap(),
        Some(b"42".to_vec())
    );
    assert_eq!(checkpoints.get("poll/other").unwrap(), Some(b"x".to_vec()));
}
