//! The disk reserve: a ballast file that keeps room for draining a store whose disk is full.
//!
//! redb is copy-on-write: even an ack, which frees space once committed, first writes new pages.
//! On a full disk nothing would commit, so consumers could not drain the queue that fills it.
//! The store therefore holds `<dir>/reserve` (a few MiB of real, written bytes). When a commit
//! fails because the disk is full, the writer deletes it, and from then on refuses the requests
//! that store new payloads (appends, dead letters, replays) while leases, acks, nacks and
//! deletes run on the freed room. It writes the file again, with a capped backoff, and lets
//! producers back in once that succeeds with as much again to spare (written, synced, then cut
//! off): only the reserve's own room being free again does not mean the disk has room, and
//! without that margin producers would fill it again at once.
//!
//! The reserve is either wholly on disk or absent: a write that fails part-way removes what it
//! wrote, so a probe on a still-full disk takes nothing from the drain.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;

/// The reserve file's name inside the data directory.
pub const RESERVE_FILE: &str = "reserve";

/// The default [`StoreOptions::reserve`](crate::StoreOptions::reserve): 4 MiB.
pub const DEFAULT_RESERVE: u64 = 4 << 20;

/// Bytes written per `write` call while filling the reserve.
const CHUNK: usize = 64 << 10;

/// The ballast file of one data directory.
#[derive(Debug)]
pub(crate) struct Reserve {
    path: PathBuf,
    size: u64,
}

impl Reserve {
    pub(crate) fn new(path: PathBuf, size: u64) -> Self {
        Self { path, size }
    }

    /// Makes sure the whole reserve is on disk: keeps a complete file, writes it otherwise. On
    /// failure nothing of it is left behind.
    pub(crate) fn fill(&self) -> io::Result<()> {
        if fs::metadata(&self.path).is_ok_and(|meta| meta.len() == self.size) {
            return Ok(());
        }
        self.write(self.size).inspect_err(|_| self.release())
    }

    /// Writes the reserve again after it was released, succeeding only if the disk also has as
    /// much room again; on failure nothing of it is left behind.
    pub(crate) fn refill(&self) -> io::Result<()> {
        self.write(self.size.saturating_mul(2))
            .and_then(|()| {
                let file = OpenOptions::new().write(true).open(&self.path)?;
                file.set_len(self.size)?;
                file.sync_all()
            })
            .inspect_err(|_| self.release())
    }

    /// Writes `len` bytes to the reserve file, durably.
    fn write(&self, len: u64) -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.path)?;
        // Pseudo-random bytes, not zeros and not set_len: a sparse file, or a filesystem that
        // compresses or drops zero blocks (btrfs, ZFS), would hold no room at all.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut chunk = vec![0u8; CHUNK];
        let mut left = len;
        while left > 0 {
            for word in chunk.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            let len = usize::try_from(left).map_or(CHUNK, |left| left.min(CHUNK));
            file.write_all(&chunk[..len])?;
            left -= len as u64;
        }
        // Allocation errors (a full disk) may surface only when the blocks are made durable.
        file.sync_all()
    }

    /// Deletes the reserve, giving its room to the store. A missing file is fine; another
    /// failure only means the room stays taken, which the next failed commit reports again.
    pub(crate) fn release(&self) {
        let _ = fs::remove_file(&self.path);
    }
}
