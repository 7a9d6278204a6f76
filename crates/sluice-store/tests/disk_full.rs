//! A store on a real, small filesystem that runs full: writes fail with a clear disk-full error,
//! and nothing that was acknowledged before is lost once space returns.
//!
//! Needs permission to mount a tmpfs (root, as in this project's CI); without it the test says
//! so in one line and returns.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use sluice_store::{Store, StoreOptions};

/// A tmpfs mounted on a fresh directory, unmounted when dropped (also when the test fails).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(SmallDisk { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Gives the filesystem more room, as an operator freeing space would.
    fn grow(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "remount failed");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_appends_as_disk_full_and_loses_nothing_acknowledged() {
    let disk = match SmallDisk::mount("4m") {
        Ok(disk) => disk,
        Err(why) => {
            println!("skipping the disk-full test: cannot mount a tmpfs ({why})");
            return;
        }
    };
    let data: PathBuf = disk.path().join("data");
    let store = Store::open(&data, StoreOptions::default()).unwrap();
    let queue = store.queue("orders");
    let payload = Bytes::from(vec![b'x'; 1024]);

    let mut acknowledged = 0usize;
    let error = loop {
        match queue.append(vec![payload.clone(); 16]).await {
            Ok(ids) => acknowledged += ids.len(),
            Err(e) => break e,
        }
        assert!(
            acknowledged < 100_000,
            "4 MiB never filled up: the store is not writing to the tmpfs"
        );
    };
    assert!(error.is_disk_full(), "not reported as disk full: {error}");
    let text = error.to_string();
    assert!(!text.is_empty());
    assert!(acknowledged > 0, "nothing fit before the disk was full");

    // Space comes back; everything acknowledged before the failure is there after a restart.
    // (On a disk that stays full, leasing fails too: it is a write. Known gap, issue 4.)
    drop(queue);
    drop(store);
    disk.grow("16m");
    let store = Store::open(&data, StoreOptions::default()).unwrap();
    let queue = store.queue("orders");
    let mut found = 0usize;
    loop {
        let batch = queue.lease(1000, Duration::from_secs(60)).await.unwrap();
        if batch.is_empty() {
            break;
        }
        found += batch.len();
    }
    assert_eq!(
        found, acknowledged,
        "acknowledged records lost on a full disk"
    );
}
