//! A simulated disk for redb: reads see every write, but a crash keeps only what was synced plus
//! a chosen prefix of the later writes, the last of them possibly torn. It can also "lose power"
//! after a given number of writes, failing every later write and sync, to crash in the middle
//! of a commit.

use std::io;
use std::sync::{Arc, Mutex};

use redb::StorageBackend;

#[derive(Debug, Default)]
struct Disk {
    /// What a reader sees now.
    current: Vec<u8>,
    /// What survives a crash for sure.
    durable: Vec<u8>,
    /// Writes (and resizes, as `None` data) since the last sync, oldest first.
    unsynced: Vec<Change>,
    /// Writes left before power is lost (or the disk fills up); `None`: never.
    writes_left: Option<usize>,
    /// What failing writes report.
    failure: Option<io::ErrorKind>,
}

#[derive(Debug, Clone)]
enum Change {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

/// A handle on a shared simulated disk; the store owns one clone, the test another.
#[derive(Debug, Clone, Default)]
pub(crate) struct SimDisk(Arc<Mutex<Disk>>);

fn apply(image: &mut Vec<u8>, change: &Change) {
    match change {
        Change::Write(offset, data) => {
            let start = *offset as usize;
            let end = start + data.len();
            if image.len() < end {
                image.resize(end, 0);
            }
            image[start..end].copy_from_slice(data);
        }
        Change::SetLen(len) => image.resize(*len as usize, 0),
    }
}

impl Disk {
    fn failure(&self) -> io::Error {
        match self.failure {
            Some(kind) => io::Error::new(kind, "simulated full disk"),
            None => io::Error::other("simulated power loss"),
        }
    }
}

impl SimDisk {
    /// Loses power after `writes` more writes.
    pub(crate) fn fail_after(&self, writes: usize) {
        self.0.lock().unwrap().writes_left = Some(writes);
    }

    /// Fails every write and sync with "storage full" until [`free_space`](Self::free_space).
    pub(crate) fn fill_up(&self) {
        let mut disk = self.0.lock().unwrap();
        disk.writes_left = Some(0);
        disk.failure = Some(io::ErrorKind::StorageFull);
    }

    /// Undoes [`fill_up`](Self::fill_up).
    pub(crate) fn free_space(&self) {
        let mut disk = self.0.lock().unwrap();
        disk.writes_left = None;
        disk.failure = None;
    }

    /// The disk as found after a crash now: the synced image plus the first `keep` of
    /// `unsynced.len()` later changes (scaled from `keep_per_255`), the last one cut to half
    /// when `tear` is set.
    pub(crate) fn crash_image(&self, keep_per_255: u8, tear: bool) -> SimDisk {
        let disk = self.0.lock().unwrap();
        let mut image = disk.durable.clone();
        let keep = disk.unsynced.len() * usize::from(keep_per_255) / 255;
        for (i, change) in disk.unsynced.iter().take(keep).enumerate() {
            match change {
                Change::Write(offset, data) if tear && i + 1 == keep => {
                    apply(
                        &mut image,
                        &Change::Write(*offset, data[..data.len() / 2].to_vec()),
                    );
                }
                change => apply(&mut image, change),
            }
        }
        SimDisk(Arc::new(Mutex::new(Disk {
            current: image.clone(),
            durable: image,
            ..Disk::default()
        })))
    }
}

impl StorageBackend for SimDisk {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.lock().unwrap().current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let disk = self.0.lock().unwrap();
        let start = offset as usize;
        let bytes = disk
            .current
            .get(start..start + out.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past end"))?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut disk = self.0.lock().unwrap();
        if disk.writes_left == Some(0) {
            return Err(disk.failure());
        }
        apply(&mut disk.current, &Change::SetLen(len));
        disk.unsynced.push(Change::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut disk = self.0.lock().unwrap();
        if disk.writes_left == Some(0) {
            return Err(disk.failure());
        }
        let Disk {
            durable, unsynced, ..
        } = &mut *disk;
        for change in unsynced.drain(..) {
            apply(durable, &change);
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut disk = self.0.lock().unwrap();
        match disk.writes_left {
            Some(0) => return Err(disk.failure()),
            Some(ref mut left) => *left -= 1,
            None => {}
        }
        let change = Change::Write(offset, data.to_vec());
        apply(&mut disk.current, &change);
        disk.unsynced.push(change);
        Ok(())
    }
}
