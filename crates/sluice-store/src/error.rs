//! The store's error type.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::codec::{DecodeError, PayloadTooLarge};

/// What went wrong in the store. Messages are lower case and say what to do where there is
/// something to do.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The data directory could not be created or opened.
    #[error("cannot use data directory {dir}: {source}")]
    Directory {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Another process (or another `Store` in this one) holds the directory.
    #[error(
        "data directory {dir} is in use by another Sluice process{}; stop it or choose another directory",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// The pid recorded by the holder, when it could be read.
        holder: Option<u32>,
    },
    /// The writer thread could not be started.
    #[error("cannot start the store's writer thread: {0}")]
    Thread(io::Error),
    /// The database failed: an I/O error, a full disk, or a damaged file.
    #[error("storage failed: {0}")]
    Storage(#[from] redb::Error),
    /// A value read back from a table that is not a valid frame (only where no quarantine applies).
    #[error("corrupt value in table {table}: {source}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// Why it could not be decoded.
        source: DecodeError,
    },
    /// A payload too large for one record.
    #[error(transparent)]
    TooLarge(#[from] PayloadTooLarge),
    /// The store's writer stopped (the store was dropped or its thread panicked); nothing of the
    /// request was committed.
    #[error("the store is closed")]
    Closed,
    /// The disk (or the quota) is full: nothing of the request was stored. Answer with
    /// backpressure (HTTP 503 with Retry-After, a broker nack) and retry later.
    #[error("the disk is full, nothing was stored; free space and retry: {0}")]
    DiskFull(String),
    /// The batch was rolled back because another request in the same commit failed.
    #[error("the commit was abandoned: {0}")]
    Abandoned(String),
}

impl StoreError {
    /// Whether the request failed because the disk or quota is full (a retry may succeed once
    /// space returns).
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::DiskFull(_) => true,
            StoreError::Storage(redb::Error::Io(error)) => is_full(error),
            StoreError::Directory { source, .. } => is_full(source),
            _ => false,
        }
    }
}

impl StoreError {
    /// Whether the database met an I/O error: redb then refuses every later operation until it
    /// is reopened.
    pub(crate) fn is_io(&self) -> bool {
        matches!(
            self,
            StoreError::Storage(
                redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed
            )
        ) || self.is_disk_full()
    }
}

/// Whether an I/O error says the disk or the quota is full.
pub(crate) fn is_full(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

macro_rules! from_redb {
    ($($ty:ty),*) => {$(
        impl From<$ty> for StoreError {
            fn from(error: $ty) -> Self {
                StoreError::Storage(redb::Error::from(error))
            }
        }
    )*};
}

from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);
