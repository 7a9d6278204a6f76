//! The process's durable store (`sluice-store`), opened on first use.
//!
//! Only flows that need durability (a durable channel, the dead-letter store, idempotency keys
//! or aggregation groups with `backend: {store: {}}`) open it, so a project without them never creates the data directory or
//! takes its lock. The directory is set once before building (`sluice run --data DIR`, default
//! `./data`); every component of the process then shares the one open [`Store`].

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sluice_core::state::{CheckpointStore, Checkpoints};
use sluice_core::{BuildError, ErrorKind, ProcessError, Resources};
use sluice_store::{Store, StoreOptions};

/// The data directory used when none is configured.
pub const DEFAULT_DATA_DIR: &str = "./data";

/// How often expired idempotency keys are removed from the store.
pub const PURGE_EVERY: Duration = Duration::from_secs(60);

/// Expired keys removed per commit, so one purge never holds the writer for long.
const PURGE_BATCH: usize = 1000;

/// The store of this process, in [`sluice_core::Resources`].
pub struct DurableStore {
    dir: Mutex<PathBuf>,
    in_memory: std::sync::atomic::AtomicBool,
    opened: OnceLock<Result<Store, String>>,
    /// Set once the task purging expired idempotency keys runs.
    purging: OnceLock<()>,
}

impl Default for DurableStore {
    fn default() -> Self {
        DurableStore {
            dir: Mutex::new(PathBuf::from(DEFAULT_DATA_DIR)),
            in_memory: std::sync::atomic::AtomicBool::new(false),
            opened: OnceLock::new(),
            purging: OnceLock::new(),
        }
    }
}

impl DurableStore {
    /// Sets the data directory; has no effect once the store is open.
    pub fn set_dir(&self, dir: &Path) {
        if let Ok(mut current) = self.dir.lock() {
            *current = dir.to_path_buf();
        }
    }

    /// Keeps the store in memory instead of the data directory: for `sluice validate` and
    /// `sluice test`, which build flows without running them for real. Before first use only.
    pub fn use_memory(&self) {
        self.in_memory
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The data directory.
    pub fn dir(&self) -> PathBuf {
        self.dir
            .lock()
            .map_or_else(|_| PathBuf::from(DEFAULT_DATA_DIR), |d| d.clone())
    }

    /// The open store, opening it on first use. A failure (the directory is locked by another
    /// process, not writable) is remembered: every component asking gets the same error.
    pub fn store(&self) -> Result<Store, BuildError> {
        self.opened
            .get_or_init(|| {
                if self.in_memory.load(std::sync::atomic::Ordering::Relaxed) {
                    return Store::open_in_memory(StoreOptions::default())
                        .map_err(|e| format!("cannot open an in-memory store: {e}"));
                }
                let dir = self.dir();
                Store::open(&dir, StoreOptions::default()).map_err(|e| {
                    format!(
                        "cannot open the durable store in {}: {e}; choose another directory with --data",
                        dir.display()
                    )
                })
            })
            .clone()
            .map_err(BuildError::new)
    }

    /// The store if something already opened it.
    pub fn if_open(&self) -> Option<Store> {
        self.opened.get().and_then(|r| r.as_ref().ok().cloned())
    }

    /// Whether the open store's disk reserve is in use (the disk filled up: producers are
    /// refused while consumers drain); `None` when no store is open in this process.
    pub fn reserve_in_use(&self) -> Option<bool> {
        self.if_open().map(|store| store.reserve_in_use())
    }

    /// Starts, once per process and on the current tokio runtime, the task that removes expired
    /// idempotency keys every [`PURGE_EVERY`]. An expired key already counts as absent; the
    /// purge only gives its room back. Called by the steps that keep keys in the store, on their
    /// first use (a runtime is there then; at build time there may be none).
    pub(crate) fn keep_keys_purged(self: &Arc<Self>) {
        if self.purging.set(()).is_ok() {
            spawn_purger(Arc::downgrade(self), PURGE_EVERY);
        }
    }
}

/// Purges expired idempotency keys every `period` while the store's owner lives. It holds the
/// owner weakly, between ticks too, so a stopped runtime's store closes (and unlocks its
/// directory) without waiting for this task.
pub(crate) fn spawn_purger(owner: std::sync::Weak<DurableStore>, period: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(store) = owner.upgrade().and_then(|owner| owner.if_open()) else {
                if owner.strong_count() == 0 {
                    return;
                }
                continue;
            };
            loop {
                match store.purge_expired_keys(PURGE_BATCH).await {
                    Ok(n) if n == PURGE_BATCH => {}
                    Ok(_) => break,
                    Err(error) => {
                        tracing::warn!(%error, "purging expired idempotency keys failed; retrying at the next tick");
                        break;
                    }
                }
            }
        }
    });
}

/// Installs the process's [`Checkpoints`] in `resources`: backed by this store, opened on first
/// use (so a project whose sources keep no checkpoint never opens it).
pub fn install_checkpoints(resources: &Resources) {
    let checkpoints = resources.get_or_default::<Checkpoints>();
    if checkpoints.is_installed() {
        return;
    }
    let durable = resources.get_or_default::<DurableStore>();
    checkpoints.install(Box::new(move || {
        let store = durable.store().map_err(|e| e.message)?;
        Ok(Arc::new(StoreCheckpoints(store.checkpoints())) as Arc<dyn CheckpointStore>)
    }));
}

/// [`CheckpointStore`] over the store's `checkpoints` table.
struct StoreCheckpoints(sluice_store::Checkpoints);

fn unavailable(error: &sluice_store::StoreError) -> ProcessError {
    ProcessError::new(
        ErrorKind::Unavailable,
        format!("the durable store cannot keep the checkpoint: {error}"),
    )
}

#[async_trait]
impl CheckpointStore for StoreCheckpoints {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ProcessError> {
        self.0.get(key).map_err(|e| unavailable(&e))
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), ProcessError> {
        self.0.put(key, value).await.map_err(|e| unavailable(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn checkpoints_persist_in_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        {
            let resources = Resources::default();
            resources
                .get_or_default::<DurableStore>()
                .set_dir(dir.path());
            install_checkpoints(&resources);
            let store = resources.get_or_default::<Checkpoints>().store().unwrap();
            store.put("poll/orders", b"7".to_vec()).await.unwrap();
        }
        let resources = Resources::default();
        resources
            .get_or_default::<DurableStore>()
            .set_dir(dir.path());
        install_checkpoints(&resources);
        let store = resources.get_or_default::<Checkpoints>().store().unwrap();
        assert_eq!(store.get("poll/orders").await.unwrap(), Some(b"7".to_vec()));
        assert_eq!(store.get("other").await.unwrap(), None);
    }

    #[test]
    fn opens_once_in_the_configured_directory_and_reports_a_lock_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let first = DurableStore::default();
        assert!(first.if_open().is_none(), "nothing opened before first use");
        first.set_dir(dir.path());
        first.store().unwrap();
        assert!(dir.path().join(sluice_store::DATABASE_FILE).exists());
        assert!(first.if_open().is_some());

        let second = DurableStore::default();
        second.set_dir(dir.path());
        let error = second.store().unwrap_err().to_string();
        assert!(error.contains("--data"), "{error}");
        assert!(error.contains(&dir.path().display().to_string()), "{error}");

        let checking = DurableStore::default();
        checking.set_dir(dir.path());
        checking.use_memory();
        checking
            .store()
            .expect("in memory: the directory's lock does not matter");
    }
}
