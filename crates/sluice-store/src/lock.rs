//! The data directory's exclusive lock: two processes writing one store would each believe they
//! own its leases and cursors, so the second one must fail at open, loudly.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::StoreError;

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "sluice.lock";

/// Holds the lock while alive; the OS releases it when the file closes, also when the process
/// dies, so a crash never leaves a stale lock behind.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    dir: PathBuf,
}

impl DirLock {
    /// Creates `dir` if needed and locks it, recording this process's pid in the lock file.
    pub fn acquire(dir: &Path) -> Result<Self, StoreError> {
        let io_error = |source| StoreError::Directory {
            dir: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(io_error)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))
            .map_err(io_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    dir: dir.to_path_buf(),
                    holder: read_pid(&mut file),
                });
            }
            Err(TryLockError::Error(source)) => return Err(io_error(source)),
        }
        // The pid is informational (for the error above); failing to write it is not fatal.
        let _ = file
            .set_len(0)
            .and_then(|()| file.write_all(std::process::id().to_string().as_bytes()))
            .and_then(|()| file.sync_data());
        Ok(Self {
            _file: file,
            dir: dir.to_path_buf(),
        })
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_the_directory_and_records_the_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested/data");
        let lock = DirLock::acquire(&dir).unwrap();
        assert_eq!(lock.dir(), dir);
        let pid = fs::read_to_string(dir.join(LOCK_FILE)).unwrap();
        assert_eq!(pid, std::process::id().to_string());
    }

    #[test]
    fn a_second_holder_is_refused_with_the_directory_and_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let _first = DirLock::acquire(tmp.path()).unwrap();
        let err = DirLock::acquire(tmp.path()).unwrap_err();
        let StoreError::Locked { dir, holder } = &err else {
            panic!("expected Locked, got {err}");
        };
        assert_eq!(dir, tmp.path());
        assert_eq!(*holder, Some(std::process::id()));
        let text = err.to_string();
        assert!(text.contains(&tmp.path().display().to_string()), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
    }

    #[test]
    fn the_lock_is_released_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        drop(DirLock::acquire(tmp.path()).unwrap());
        DirLock::acquire(tmp.path()).unwrap();
    }
}
